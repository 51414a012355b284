//! Values handed to JavaScript as one array, built value by value on the
//! script's thread instead of as JSON text it would parse.
//!
//! A dispatch batch is mostly short scalars (keys, column values, small
//! integer headers). Writing them as JSON and having `JSON.parse` read them
//! back costs more than the script's own work per row; here the request's
//! thread only copies them into a [`FlatArray`] (strings into one buffer),
//! and [`FlatArray::into_array`] creates the JavaScript values directly. Each
//! value comes out as `JSON.parse` would have produced it from the same
//! JSON: objects and arrays still go through it, all of a batch's in one
//! call.

use rquickjs::{Array, Ctx, IntoJs, Value};

/// One entry: where its value comes from.
#[derive(Debug, Clone, Copy)]
enum Item {
    Null,
    Bool(bool),
    Int(i32),
    Float(f64),
    /// A string: a range of the text buffer.
    Str(usize, usize),
    /// An object or array: an element of the JSON array `json`.
    Json(u32),
}

/// An array of values under construction, sent to a script thread.
#[derive(Debug, Default)]
pub struct FlatArray {
    items: Vec<Item>,
    text: String,
    /// The objects and arrays, as the elements of one JSON array (without
    /// its closing bracket).
    json: Vec<u8>,
    nested: u32,
}

impl FlatArray {
    pub fn with_capacity(items: usize) -> Self {
        FlatArray {
            items: Vec::with_capacity(items),
            text: String::with_capacity(items * 12),
            json: Vec::new(),
            nested: 0,
        }
    }

    /// Appends a small integer (a header field).
    pub fn push_int(&mut self, n: i32) {
        self.items.push(Item::Int(n));
    }

    /// Copies `text` into the buffer; returns its range there.
    fn copy(&mut self, text: &str) -> (usize, usize) {
        let start = self.text.len();
        self.text.push_str(text);
        (start, self.text.len())
    }

    fn push_json(&mut self, v: &impl serde::Serialize) {
        self.json.push(if self.nested == 0 { b'[' } else { b',' });
        // Serializing JSON values into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.json, v);
        self.items.push(Item::Json(self.nested));
        self.nested += 1;
    }

    /// Appends a JSON value.
    pub fn push(&mut self, v: &serde_json::Value) {
        use serde_json::Value as J;
        let item = match v {
            J::Null => Item::Null,
            J::Bool(b) => Item::Bool(*b),
            J::Number(n) => number(n.as_str()),
            J::String(s) => {
                let (a, b) = self.copy(s);
                Item::Str(a, b)
            }
            J::Array(_) | J::Object(_) => return self.push_json(v),
        };
        self.items.push(item);
    }

    /// Appends a whole document (an object).
    pub fn push_document(&mut self, doc: &crate::changefeed::Document) {
        self.push_json(doc);
    }

    /// The JavaScript array, created in `ctx`.
    pub fn into_array<'js>(mut self, ctx: &Ctx<'js>) -> rquickjs::Result<Array<'js>> {
        let nested: Option<Array> = if self.nested > 0 {
            self.json.push(b']');
            ctx.json_parse(std::mem::take(&mut self.json))?.into_array()
        } else {
            None
        };
        let arr = Array::new(ctx.clone())?;
        for (i, item) in self.items.iter().enumerate() {
            let text = |a: usize, b: usize| &self.text[a..b];
            let v: Value = match *item {
                Item::Null => Value::new_null(ctx.clone()),
                Item::Bool(b) => Value::new_bool(ctx.clone(), b),
                Item::Int(n) => Value::new_int(ctx.clone(), n),
                Item::Float(f) => Value::new_float(ctx.clone(), f),
                Item::Str(a, b) => text(a, b).into_js(ctx)?,
                Item::Json(k) => match &nested {
                    Some(n) => n.get(k as usize)?,
                    None => Value::new_undefined(ctx.clone()),
                },
            };
            arr.set(i, v)?;
        }
        Ok(arr)
    }
}

/// A JSON number as `JSON.parse` reads it: the nearest double (an integer
/// that fits kept as one, as QuickJS does).
fn number(text: &str) -> Item {
    // serde_json only holds valid JSON numbers, which all parse (1e400 as
    // infinity, as JSON.parse reads it).
    let f: f64 = text.parse().unwrap_or(f64::NAN);
    let i = f as i32;
    if i as f64 == f && !(f == 0.0 && f.is_sign_negative()) {
        Item::Int(i)
    } else {
        Item::Float(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rquickjs::{Context, Function, Runtime};

    /// Every value reaches the script exactly as `JSON.parse` gives it.
    #[test]
    fn values_arrive_as_json_parse_reads_them() {
        let json = r#"[0, -0, 7, -2147483648, 2147483648, 9007199254740993, 1.5, 1e400, -1e-400,
            3.0, "", "east", "a\"b\\c\n", "ünï 😀", "\\x01", true, false, null,
            {"a": [1, {"b": null}], "__proto__": 1}, [], [9007199254740993]]"#;
        let values: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
        let mut flat = FlatArray::with_capacity(values.len());
        for v in &values {
            flat.push(v);
        }
        let doc = serde_json::json!({"k": 1, "s": "x"});
        flat.push_document(&doc.clone().try_into().unwrap());
        flat.push_int(-2);
        let rt = Runtime::new().unwrap();
        let ctx = Context::full(&rt).unwrap();
        ctx.with(|ctx| {
            let compare: Function = ctx
                .eval(
                    r#"(a, json) => {
                        const b = JSON.parse(json);
                        if (a.length !== b.length) return "length " + a.length + " vs " + b.length;
                        for (let i = 0; i < b.length; i++) {
                            const same = typeof b[i] === "object" && b[i] !== null
                                ? JSON.stringify(a[i]) === JSON.stringify(b[i]) &&
                                  Object.getPrototypeOf(a[i]) === Object.getPrototypeOf(b[i])
                                : Object.is(a[i], b[i]);
                            if (!same) return "value " + i + ": " + String(a[i]) + " vs " + String(b[i]);
                        }
                        return "ok";
                    }"#,
                )
                .unwrap();
            // What the JSON path sent: the values as meridian holds them.
            let mut expected = values.clone();
            expected.extend([doc.clone(), serde_json::json!(-2)]);
            let expected = serde_json::to_string(&expected).unwrap();
            let got: String = compare
                .call((flat.into_array(&ctx).unwrap(), expected))
                .unwrap();
            assert_eq!(got, "ok");
        });
    }
}

//! PostgreSQL text-format values (as pgoutput sends them) → JSON values, the
//! way a CockroachDB changefeed encodes the same SQL types.

use serde_json::Value;

// Type OIDs (pg_type.h).
const BOOL: u32 = 16;
const BYTEA: u32 = 17;
const INT8: u32 = 20;
const INT2: u32 = 21;
const INT4: u32 = 23;
const OID: u32 = 26;
const JSON: u32 = 114;
const FLOAT4: u32 = 700;
const FLOAT8: u32 = 701;
const NUMERIC: u32 = 1700;
const JSONB: u32 = 3802;

/// The element type of an array type this module knows, if `oid` is one.
fn array_element(oid: u32) -> Option<u32> {
    Some(match oid {
        1000 => BOOL,
        1001 => BYTEA,
        1005 => INT2,
        1007 => INT4,
        1016 => INT8,
        1028 => OID,
        1021 => FLOAT4,
        1022 => FLOAT8,
        1231 => NUMERIC,
        199 => JSON,
        3807 => JSONB,
        // Text-like arrays: elements stay strings.
        1009 | 1015 | 1014 | 2951 | 1115 | 1185 | 1182 | 1183 | 1270 | 1187 | 1041 | 651 | 1040
        | 1003 => 25,
        _ => return None,
    })
}

/// Converts one non-null column value in PostgreSQL's text form to JSON.
pub fn text_to_json(type_oid: u32, text: &str) -> Value {
    match type_oid {
        BOOL => match text {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => Value::String(text.to_string()),
        },
        INT2 | INT4 | INT8 | OID | NUMERIC | FLOAT4 | FLOAT8 => number(text),
        JSON | JSONB => {
            serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
        }
        _ => match array_element(type_oid) {
            Some(elem) => match parse_array(text) {
                Some(arr) => array_to_json(elem, arr),
                None => Value::String(text.to_string()),
            },
            None => Value::String(text.to_string()),
        },
    }
}

/// Writes one non-null column value in PostgreSQL's text form as JSON, the
/// same bytes as serializing [`text_to_json`]'s value, without building it
/// for the common types.
pub fn write_json(out: &mut Vec<u8>, type_oid: u32, text: &str) {
    match type_oid {
        BOOL => match text {
            "t" | "true" => out.extend_from_slice(b"true"),
            "f" | "false" => out.extend_from_slice(b"false"),
            _ => write_str(out, text),
        },
        INT2 | INT4 | INT8 | OID | NUMERIC | FLOAT4 | FLOAT8 => {
            // serde_json writes an exponent's `E` as `e`: leave those to it.
            if is_json_number(text.as_bytes()) && !text.contains('E') {
                out.extend_from_slice(text.as_bytes());
            } else {
                write_value(out, &text_to_json(type_oid, text));
            }
        }
        JSON | JSONB => write_value(out, &text_to_json(type_oid, text)),
        _ if array_element(type_oid).is_some() => write_value(out, &text_to_json(type_oid, text)),
        _ => write_str(out, text),
    }
}

/// A JSON string literal.
pub fn write_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

fn write_value(out: &mut Vec<u8>, v: &Value) {
    serde_json::to_writer(&mut *out, v).expect("writing to a Vec cannot fail");
}

/// True when `b` is a number in JSON's grammar:
/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
fn is_json_number(b: &[u8]) -> bool {
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    if b.first() == Some(&b'-') {
        i += 1;
    }
    match b.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => {
            digits(&mut i);
        }
        _ => return false,
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// A JSON number keeping every digit (serde_json's arbitrary_precision), or
/// a string for NaN and the infinities, which JSON cannot express.
fn number(text: &str) -> Value {
    let plain = !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'));
    if plain {
        if let Ok(v @ Value::Number(_)) = serde_json::from_str::<Value>(text) {
            return v;
        }
    }
    Value::String(text.to_string())
}

/// A parsed array literal: elements are `None` for NULL.
#[derive(Debug, PartialEq)]
enum ArrayItem {
    Null,
    Elem(String),
    Nested(Vec<ArrayItem>),
}

fn array_to_json(elem: u32, items: Vec<ArrayItem>) -> Value {
    Value::Array(
        items
            .into_iter()
            .map(|i| match i {
                ArrayItem::Null => Value::Null,
                ArrayItem::Elem(s) => text_to_json(elem, &s),
                ArrayItem::Nested(v) => array_to_json(elem, v),
            })
            .collect(),
    )
}

/// Parses an array literal such as `{1,2,NULL}`, `{"a b","c\"d"}` or
/// `{{1,2},{3,4}}`. Arrays with explicit bounds (`[0:1]={…}`) are not
/// handled (None: the caller sends the text).
fn parse_array(text: &str) -> Option<Vec<ArrayItem>> {
    let bytes: Vec<char> = text.chars().collect();
    let mut pos = 0;
    let out = parse_level(&bytes, &mut pos)?;
    (pos == bytes.len()).then_some(out)
}

fn parse_level(s: &[char], pos: &mut usize) -> Option<Vec<ArrayItem>> {
    if s.get(*pos) != Some(&'{') {
        return None;
    }
    *pos += 1;
    let mut items = Vec::new();
    if s.get(*pos) == Some(&'}') {
        *pos += 1;
        return Some(items);
    }
    loop {
        match s.get(*pos)? {
            '{' => items.push(ArrayItem::Nested(parse_level(s, pos)?)),
            '"' => {
                *pos += 1;
                let mut v = String::new();
                loop {
                    match s.get(*pos)? {
                        '\\' => {
                            v.push(*s.get(*pos + 1)?);
                            *pos += 2;
                        }
                        '"' => {
                            *pos += 1;
                            break;
                        }
                        c => {
                            v.push(*c);
                            *pos += 1;
                        }
                    }
                }
                items.push(ArrayItem::Elem(v));
            }
            _ => {
                let start = *pos;
                while !matches!(s.get(*pos)?, ',' | '}') {
                    *pos += 1;
                }
                let raw: String = s[start..*pos].iter().collect();
                let raw = raw.trim();
                if raw.eq_ignore_ascii_case("NULL") {
                    items.push(ArrayItem::Null);
                } else {
                    items.push(ArrayItem::Elem(raw.to_string()));
                }
            }
        }
        match s.get(*pos)? {
            ',' => *pos += 1,
            '}' => {
                *pos += 1;
                return Some(items);
            }
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn scalars() {
        assert_eq!(text_to_json(INT4, "42"), json!(42));
        assert_eq!(
            text_to_json(INT8, "-9223372036854775808").to_string(),
            "-9223372036854775808"
        );
        assert_eq!(
            text_to_json(NUMERIC, "12345678901234567890.123456789012345").to_string(),
            "12345678901234567890.123456789012345"
        );
        assert_eq!(text_to_json(NUMERIC, "1.50").to_string(), "1.50");
        assert_eq!(text_to_json(NUMERIC, "NaN"), json!("NaN"));
        assert_eq!(text_to_json(FLOAT8, "Infinity"), json!("Infinity"));
        assert_eq!(text_to_json(FLOAT8, "-1.5e-07").to_string(), "-1.5e-07");
        assert_eq!(text_to_json(BOOL, "t"), json!(true));
        assert_eq!(
            text_to_json(JSONB, r#"{"a": [1, 2]}"#),
            json!({"a": [1, 2]})
        );
        assert_eq!(text_to_json(BYTEA, "\\x0102"), json!("\\x0102"));
        assert_eq!(text_to_json(25, "hello"), json!("hello"));
    }

    #[test]
    fn write_json_matches_text_to_json() {
        let cases: &[(u32, &str)] = &[
            (INT4, "42"),
            (INT8, "-9223372036854775808"),
            (NUMERIC, "12345678901234567890.123456789012345"),
            (NUMERIC, "1.50"),
            (NUMERIC, "NaN"),
            (NUMERIC, "-0"),
            (NUMERIC, "007"),
            (NUMERIC, "1."),
            (NUMERIC, ".5"),
            (FLOAT8, "Infinity"),
            (FLOAT8, "-Infinity"),
            (FLOAT8, "-1.5e-07"),
            (FLOAT8, "1E+300"),
            (FLOAT8, "1e+300"),
            (FLOAT8, "1e"),
            (FLOAT4, "+1"),
            (BOOL, "t"),
            (BOOL, "f"),
            (BOOL, "maybe"),
            (JSONB, r#"{"a": [1, 2]}"#),
            (JSON, "not json"),
            (BYTEA, "\\x0102"),
            (25, "hello \"quoted\" \n\t\u{1} é"),
            (1007, "{1,2,NULL}"),
            (1009, r#"{"a b","c\"d",NULL}"#),
            (1007, "[0:1]={1,2}"),
            (1184, "2026-01-01 00:00:00.123456+00"),
        ];
        for &(oid, text) in cases {
            let mut out = Vec::new();
            write_json(&mut out, oid, text);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&text_to_json(oid, text)).unwrap(),
                "type {oid}, text {text:?}"
            );
        }
    }

    #[test]
    fn arrays() {
        assert_eq!(text_to_json(1007, "{1,2,NULL}"), json!([1, 2, null]));
        assert_eq!(text_to_json(1007, "{{1,2},{3,4}}"), json!([[1, 2], [3, 4]]));
        assert_eq!(
            text_to_json(1009, r#"{"a b","c\"d",NULL,"NULL",plain}"#),
            json!(["a b", "c\"d", null, "NULL", "plain"])
        );
        assert_eq!(text_to_json(1009, "{}"), json!([]));
        assert_eq!(text_to_json(1007, "[0:1]={1,2}"), json!("[0:1]={1,2}"));
    }
}

//! One row's columns by name: [`Document`], and how a batch's rows share
//! their property names.
//!
//! A changefeed sends every column of its table in every row, in the same
//! order, so the rows of a batch nearly always have the same property names.
//! A document keeps its values in a `Vec` and shares the list of names (its
//! shape) with the rows parsed before it: reading a row allocates no key
//! and no tree node, and every later pass over a batch (dispatch, folding
//! duplicate keys, conversion, freeing) touches far less memory than a map
//! per row. In the apply benchmark this cut the receiver's CPU per row by
//! about a sixth against a `serde_json::Map` per row.
//!
//! Lookups by name scan the names, which for the usual row (a few to a few
//! dozen columns) is as fast as a hash; wide shapes also carry an index.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use serde::de::{DeserializeSeed, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Shapes with more names than this get a name index.
const INDEXED: usize = 16;

/// The property names of a document, in order, without repeats.
#[derive(Clone, Default)]
struct Shape {
    names: Vec<String>,
    index: Option<HashMap<String, usize>>,
}

impl Shape {
    fn new(names: Vec<String>) -> Self {
        let mut shape = Shape { names, index: None };
        shape.reindex();
        shape
    }

    fn reindex(&mut self) {
        self.index = (self.names.len() > INDEXED).then(|| {
            self.names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.clone(), i))
                .collect()
        });
    }

    fn position(&self, name: &str) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(name).copied(),
            None => self.names.iter().position(|n| n == name),
        }
    }
}

/// One document's list of property names, held so that the documents
/// sharing it are recognized by [`Document::has_names`].
#[derive(Clone)]
pub struct NamesId(Arc<Shape>);

/// A JSON object: one row's properties by name, in the order they arrived.
/// Compares, prints and serializes as the object it is.
#[derive(Clone, Default)]
pub struct Document {
    shape: Arc<Shape>,
    values: Vec<Value>,
}

impl Document {
    pub fn new() -> Self {
        Document::default()
    }

    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.shape.position(name).map(|i| &self.values[i])
    }

    /// Sets a property; returns its previous value.
    pub fn insert(&mut self, name: String, value: Value) -> Option<Value> {
        if let Some(i) = self.shape.position(&name) {
            return Some(std::mem::replace(&mut self.values[i], value));
        }
        let shape = Arc::make_mut(&mut self.shape);
        shape.names.push(name);
        shape.reindex();
        self.values.push(value);
        None
    }

    /// The property names, in order.
    pub fn keys(&self) -> impl Iterator<Item = &String> + '_ {
        self.shape.names.iter()
    }

    /// The values, in the order of [`Document::keys`].
    pub fn values(&self) -> impl Iterator<Item = &Value> + '_ {
        self.values.iter()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Value)> + '_ {
        self.shape.names.iter().zip(&self.values)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut Value)> + '_ {
        self.shape.names.iter().zip(&mut self.values)
    }

    /// Whether two documents share one list of names (rows of one batch).
    #[cfg(test)]
    fn shares_shape(&self, other: &Document) -> bool {
        Arc::ptr_eq(&self.shape, &other.shape)
    }

    /// Its list of names, to recognize the rows that share it.
    pub fn names_id(&self) -> NamesId {
        NamesId(self.shape.clone())
    }

    /// Whether its names are that list (known without comparing them).
    pub fn has_names(&self, id: &NamesId) -> bool {
        Arc::ptr_eq(&self.shape, &id.0)
    }

    /// As a JSON object value.
    pub fn to_value(&self) -> Value {
        Value::Object(self.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
    }
}

impl From<Map<String, Value>> for Document {
    fn from(map: Map<String, Value>) -> Self {
        let (names, values) = map.into_iter().unzip();
        Document {
            shape: Arc::new(Shape::new(names)),
            values,
        }
    }
}

/// A JSON object; any other value is given back.
impl TryFrom<Value> for Document {
    type Error = Value;

    fn try_from(v: Value) -> Result<Self, Value> {
        match v {
            Value::Object(map) => Ok(map.into()),
            other => Err(other),
        }
    }
}

impl From<Document> for Value {
    fn from(doc: Document) -> Self {
        Value::Object(doc.into_iter().collect())
    }
}

impl IntoIterator for Document {
    type Item = (String, Value);
    type IntoIter = std::iter::Zip<std::vec::IntoIter<String>, std::vec::IntoIter<Value>>;

    fn into_iter(self) -> Self::IntoIter {
        let names = Arc::try_unwrap(self.shape)
            .map(|s| s.names)
            .unwrap_or_else(|s| s.names.clone());
        names.into_iter().zip(self.values)
    }
}

impl<'a> IntoIterator for &'a Document {
    type Item = (&'a String, &'a Value);
    type IntoIter = std::iter::Zip<std::slice::Iter<'a, String>, std::slice::Iter<'a, Value>>;

    fn into_iter(self) -> Self::IntoIter {
        self.shape.names.iter().zip(&self.values)
    }
}

/// `doc["name"]`: the property's value; panics when there is none.
impl std::ops::Index<&str> for Document {
    type Output = Value;

    fn index(&self, name: &str) -> &Value {
        match self.get(name) {
            Some(v) => v,
            None => panic!("no property {name:?} in {self:?}"),
        }
    }
}

/// Equal when they have the same properties with equal values, in any order.
impl PartialEq for Document {
    fn eq(&self, other: &Self) -> bool {
        if self.len() != other.len() {
            return false;
        }
        if Arc::ptr_eq(&self.shape, &other.shape) || self.shape.names == other.shape.names {
            return self.values == other.values;
        }
        self.iter().all(|(k, v)| other.get(k) == Some(v))
    }
}

impl fmt::Debug for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Document {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.len()))?;
        for (k, v) in self {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

thread_local! {
    /// The shape of the last document parsed on this thread: the next row
    /// of a batch nearly always has it too.
    static LAST_SHAPE: RefCell<Arc<Shape>> = RefCell::default();
}

impl<'de> Deserialize<'de> for Document {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(DocumentVisitor)
    }
}

struct DocumentVisitor;

impl<'de> Visitor<'de> for DocumentVisitor {
    type Value = Document;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Document, A::Error> {
        let last = LAST_SHAPE.with(|l| l.borrow().clone());
        let mut values = Vec::with_capacity(last.names.len().max(4));
        // While the names match the last shape's, nothing is copied; after
        // the first difference they are collected here.
        let mut names: Option<Vec<String>> = None;
        while let Some(key) = map.next_key_seed(Name)? {
            let value: Value = map.next_value()?;
            if names.is_none() {
                if last.names.get(values.len()).is_some_and(|n| *n == key) {
                    values.push(value);
                    continue;
                }
                names = Some(last.names[..values.len()].to_vec());
            }
            let own = names.get_or_insert_default();
            // A repeated name keeps its last value, as a map would.
            match own.iter().position(|n| *n == key) {
                Some(i) => values[i] = value,
                None => {
                    own.push(key.into_owned());
                    values.push(value);
                }
            }
        }
        let shape = match names {
            None if values.len() == last.names.len() => last,
            None => Arc::new(Shape::new(last.names[..values.len()].to_vec())),
            Some(own) => Arc::new(Shape::new(own)),
        };
        LAST_SHAPE.with(|l| {
            if !Arc::ptr_eq(&l.borrow(), &shape) {
                *l.borrow_mut() = shape.clone();
            }
        });
        Ok(Document { shape, values })
    }
}

/// A property name, borrowed from the input when it has no escapes.
struct Name;

impl<'de> DeserializeSeed<'de> for Name {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Name {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a property name")
    }

    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_string()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(s: &str) -> Document {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn rows_with_the_same_names_share_them() {
        let a = parse(r#"{"k":1,"v":"a"}"#);
        let b = parse(r#"{"k":2,"v":"b"}"#);
        assert!(a.shares_shape(&b));
        assert_eq!(b.get("v"), Some(&json!("b")));
        let c = parse(r#"{"v":"c","k":3}"#);
        assert!(!c.shares_shape(&b));
        assert_eq!(c.keys().collect::<Vec<_>>(), ["v", "k"]);
        assert_eq!(c.get("k"), Some(&json!(3)));
    }

    #[test]
    fn a_prefix_or_longer_row_gets_its_own_names() {
        parse(r#"{"k":1,"v":"a","w":2}"#);
        let short = parse(r#"{"k":1}"#);
        assert_eq!(short.keys().collect::<Vec<_>>(), ["k"]);
        assert_eq!(short.get("v"), None);
        let long = parse(r#"{"k":1,"w":2,"x":3,"y":4}"#);
        assert_eq!(long.len(), 4);
        assert_eq!(long.get("y"), Some(&json!(4)));
    }

    #[test]
    fn a_repeated_name_keeps_its_last_value_like_a_map() {
        parse(r#"{"k":1,"v":2}"#);
        for text in [r#"{"k":1,"k":5,"v":2}"#, r#"{"k":1,"v":2,"k":5}"#] {
            let doc = parse(text);
            let map: Map<String, Value> = serde_json::from_str(text).unwrap();
            assert_eq!(doc, Document::from(map), "{text}");
            assert_eq!(doc.len(), 2);
            assert_eq!(doc.get("k"), Some(&json!(5)));
        }
    }

    #[test]
    fn equality_and_json_ignore_property_order() {
        let a = parse(r#"{"a":1,"b":[true]}"#);
        let b = parse(r#"{"b":[true],"a":1}"#);
        assert_eq!(a, b);
        assert_ne!(a, parse(r#"{"a":1,"b":[false]}"#));
        assert_eq!(Value::from(a.clone()), json!({"b": [true], "a": 1}));
        assert_eq!(serde_json::to_string(&a).unwrap(), r#"{"a":1,"b":[true]}"#);
    }

    #[test]
    fn insert_does_not_change_rows_sharing_the_names() {
        let a = parse(r#"{"k":1,"v":"a"}"#);
        let mut b = parse(r#"{"k":2,"v":"b"}"#);
        assert_eq!(b.insert("w".into(), json!(true)), None);
        assert_eq!(b.insert("k".into(), json!(3)), Some(json!(2)));
        assert_eq!(
            b,
            Document::try_from(json!({"k": 3, "v": "b", "w": true})).unwrap()
        );
        assert_eq!(a.keys().collect::<Vec<_>>(), ["k", "v"]);
    }

    #[test]
    fn wide_rows_are_found_by_name() {
        let names: Vec<String> = (0..40).map(|i| format!("c{i}")).collect();
        let doc = Document::from(
            names
                .iter()
                .map(|n| (n.clone(), json!(n)))
                .collect::<Map<_, _>>(),
        );
        assert!(doc.shape.index.is_some());
        assert_eq!(doc.get("c33"), Some(&json!("c33")));
        assert_eq!(doc.get("c40"), None);
    }

    #[test]
    fn escaped_names_are_read() {
        let doc = parse(r#"{"a\"b":1,"\u00e9":2}"#);
        assert_eq!(doc.get("a\"b"), Some(&json!(1)));
        assert_eq!(doc.get("é"), Some(&json!(2)));
    }
}

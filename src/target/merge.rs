//! The standard three-way merge (`standardMerge`): reconciles a proposed row
//! that lost compare-and-set with the stored row, using the source's `before`.

use serde_json::Value;

use crate::changefeed::Document;
use crate::target::convert::decimal;

/// What the three-way merge made of one conflict.
#[derive(Debug, Clone, PartialEq)]
pub enum ThreeWay {
    /// The stored row already equals the proposed one: nothing to do
    /// (a replayed change lands here).
    Unchanged,
    /// Every property reconciled: write this row.
    Merged(Document),
    /// These properties changed on both sides.
    Unmerged(Vec<String>),
}

/// Merges `proposed` into `stored`: a property whose `before` equals the
/// stored value takes the proposed value; one whose stored value already
/// equals the proposed value needs nothing; any other is unmerged. All three
/// documents must be canonical (as the target's types print them).
///
/// The compare-and-set columns are left out: the proposed row lost on them
/// by definition, so they always differ; a merged row keeps the stored (newer)
/// CAS values, and stays newer than the change it absorbed.
pub fn three_way(
    before: Option<&Document>,
    proposed: &Document,
    stored: &Document,
    cas: &[String],
) -> ThreeWay {
    let mut merged = stored.clone();
    let mut unmerged = Vec::new();
    let mut changed = false;
    for (prop, value) in proposed {
        if cas.contains(prop) {
            continue;
        }
        let current = stored.get(prop);
        if current.is_some_and(|c| same(c, value)) {
            continue;
        }
        let base = before.and_then(|b| b.get(prop));
        let stored_is_base = matches!((base, current), (Some(b), Some(c)) if same(b, c));
        if stored_is_base {
            merged.insert(prop.clone(), value.clone());
            changed = true;
        } else {
            unmerged.push(prop.clone());
        }
    }
    if !unmerged.is_empty() {
        ThreeWay::Unmerged(unmerged)
    } else if changed {
        ThreeWay::Merged(merged)
    } else {
        ThreeWay::Unchanged
    }
}

/// Equal as PostgreSQL compares the values: numbers by value (numeric
/// `1.0` equals `1`, as in jsonb), the rest as JSON.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y || decimal(x.as_str()).is_some_and(|x| decimal(y.as_str()) == Some(x))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(v: serde_json::Value) -> Document {
        v.try_into().unwrap()
    }

    #[test]
    fn merges_disjoint_changes() {
        let before = doc(json!({"k":1,"a":1,"b":1}));
        let stored = doc(json!({"k":1,"a":1,"b":2}));
        let proposed = doc(json!({"k":1,"a":5,"b":1}));
        // b: before(1) != stored(2) and proposed(1) != stored(2) -> unmerged
        assert_eq!(
            three_way(Some(&before), &proposed, &stored, &[]),
            ThreeWay::Unmerged(vec!["b".into()])
        );
        let proposed = doc(json!({"k":1,"a":5,"b":2}));
        assert_eq!(
            three_way(Some(&before), &proposed, &stored, &[]),
            ThreeWay::Merged(doc(json!({"k":1,"a":5,"b":2})))
        );
    }

    #[test]
    fn identical_rows_need_nothing() {
        let stored = doc(json!({"k":1,"v":"\\x01"}));
        assert_eq!(
            three_way(None, &stored.clone(), &stored, &[]),
            ThreeWay::Unchanged
        );
    }

    #[test]
    fn cas_columns_do_not_block_a_merge() {
        let before = doc(json!({"k":1,"a":1,"ts":5}));
        let stored = doc(json!({"k":1,"a":1,"ts":20}));
        let proposed = doc(json!({"k":1,"a":2,"ts":10}));
        let cas = ["ts".to_string()];
        assert_eq!(
            three_way(Some(&before), &proposed, &stored, &cas),
            ThreeWay::Merged(doc(json!({"k":1,"a":2,"ts":20})))
        );
    }

    #[test]
    fn numbers_compare_by_value() {
        let num = |t: &str| -> Value { serde_json::from_str(t).unwrap() };
        for (a, b) in [
            ("1", "1.0"),
            ("10e-1", "1"),
            ("0.1e1", "1.00"),
            ("-0", "0.0"),
            ("120", "1.2e2"),
        ] {
            assert!(same(&num(a), &num(b)), "{a} = {b}");
        }
        for (a, b) in [("1", "10"), ("0.1", "1"), ("-1", "1"), ("1.5", "15e-2")] {
            assert!(!same(&num(a), &num(b)), "{a} != {b}");
        }
        // numeric 1.0 stored, 1 proposed and in `before`: only b changed.
        let before = doc(json!({"k":1,"n":1,"b":"b0"}));
        let stored = doc(serde_json::from_str(r#"{"k":1,"n":1.0,"b":"b0"}"#).unwrap());
        let proposed = doc(json!({"k":1,"n":1,"b":"b1"}));
        assert_eq!(
            three_way(Some(&before), &proposed, &stored, &[]),
            ThreeWay::Merged(doc(
                serde_json::from_str(r#"{"k":1,"n":1.0,"b":"b1"}"#).unwrap()
            ))
        );
    }

    #[test]
    fn no_before_means_unmerged() {
        let stored = doc(json!({"k":1,"v":1}));
        let proposed = doc(json!({"k":1,"v":2}));
        assert_eq!(
            three_way(None, &proposed, &stored, &[]),
            ThreeWay::Unmerged(vec!["v".into()])
        );
    }
}

//! `meridian start` against real PostgreSQL: routing, conversion, CAS, merges,
//! DLQ, deletes, deadlines, errors and metrics.

mod common;
use common::*;

#[tokio::test]
async fn plain_upserts_without_userscript() {
    let f = fixture("plain_upserts", KV_SCHEMA, &[]).await;
    let body = batch(&[
        kv_row(1, "\\\\x01", "east", "2026-01-01T00:00:01Z", None, "1.0"),
        kv_row(2, "AQI=", "east", "2026-01-01T00:00:01Z", None, "1.0"),
    ]);
    f.post_ok("/plain_upserts/public", body).await;
    assert_eq!(
        f.dump("SELECT k, v, _source, _timestamp FROM kv ORDER BY k")
            .await,
        vec![
            "1|\\x01|east|2026-01-01 00:00:01+00",
            "2|\\x0102|east|2026-01-01 00:00:01+00"
        ]
    );
}

/// CAS on `_timestamp`; losers go to the DLQ named after the table.
const CAS_DLQ: &str = r#"
import * as api from "replicator@v1";
api.configureTable("kv", { cas: ["_timestamp"], merge: api.standardMerge(() => ({ dlq: "kv" })) });
"#;

#[tokio::test]
async fn values_convert_by_column_type() {
    let f = fixture(
        "convert_types",
        "CREATE TABLE t (id INT8 PRIMARY KEY, n NUMERIC, s TEXT, b BOOL, j JSONB, a JSONB,
           ts TIMESTAMPTZ, u UUID, arr INT4[], tags TEXT[], blob BYTEA, blob64 BYTEA, f FLOAT8, nul TEXT)",
        &[],
    )
    .await;
    let body = r#"{"payload":[{"after":{"id":1,"n":12345678901234567890.123456789012345678,"s":"héllo \"q\"","b":true,
        "j":{"x":[1,2,{"y":null}]},"a":[1,"two"],"ts":"2026-03-04T05:06:07.123456Z","u":"6f1c1a58-5d0b-4a55-8f5e-0d9b6a3b2c11",
        "arr":[1,2,null],"tags":["a,b","c\"d"],"blob":"\\xdeadbeef","blob64":"3q2+7w==","f":1.5,"nul":null},
        "key":[1],"topic":"t","updated":"1.0"}],"length":1}"#;
    f.post_ok("/convert_types/public", body).await;
    assert_eq!(
        f.dump("SELECT id, n, s, b, j, a, ts, u, arr, tags, blob, blob64, f, nul FROM t").await,
        vec![concat!(
            "1|12345678901234567890.123456789012345678|héllo \"q\"|t|{\"x\": [1, 2, {\"y\": null}]}|[1, \"two\"]|",
            "2026-03-04 05:06:07.123456+00|6f1c1a58-5d0b-4a55-8f5e-0d9b6a3b2c11|{1,2,NULL}|{\"a,b\",\"c\\\"d\"}|",
            "\\xdeadbeef|\\xdeadbeef|1.5|NULL"
        )]
    );
}

#[tokio::test]
async fn table_route_and_other_database() {
    let f = fixture("route_main", KV_SCHEMA, &[]).await;
    let (_, other_db) = fresh_db(
        "route_other",
        "CREATE SCHEMA app; CREATE TABLE app.items (id INT8 PRIMARY KEY, name TEXT)",
    )
    .await;
    // No topic in the payload: the URL names the table.
    let body =
        r#"{"payload":[{"after":{"id":7,"name":"seven"},"key":[7],"updated":"5.0"}],"length":1}"#;
    f.post_ok("/route_other/app/items", body).await;
    let name: String = other_db
        .query_one("SELECT name FROM app.items WHERE id = 7", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(name, "seven");
    // No topic and no table in the URL: the request cannot be routed.
    let text = f.post_refused("/route_main/public", body).await;
    assert!(text.contains("no topic"), "{text}");
}

#[tokio::test]
async fn cas_newer_wins_older_goes_to_dlq() {
    let (_dir, path) = script(CAS_DLQ);
    let f = fixture("cas_win_loss", KV_SCHEMA, &["--userscript", &path]).await;
    seed_row(&f, 1, "aa", "west", T2).await;
    seed_row(&f, 2, "bb", "west", T2).await;
    let body = batch(&[
        kv_row(1, "\\\\x01", "east", T1, None, "10.0"), // older: loses
        kv_row(2, "\\\\x02", "east", T3, None, "10.0"), // newer: wins
        kv_row(3, "\\\\x03", "east", T1, None, "10.0"), // no stored row: applies
    ]);
    f.post_ok("/cas_win_loss/public", body.clone()).await;
    let rows = f.dump("SELECT k, v, _source FROM kv ORDER BY k").await;
    assert_eq!(rows, vec!["1|\\xaa|west", "2|\\x02|east", "3|\\x03|east"]);
    let dlq = f
        .dump("SELECT dlq_name, source_nanos, source_logical, data_after->>'k', data_before FROM cdc_sink_dlq")
        .await;
    assert_eq!(dlq, vec!["kv|10|0|1|null"]);

    // Replaying the same request changes nothing and adds nothing to the DLQ.
    f.post_ok("/cas_win_loss/public", body).await;
    assert_eq!(
        f.dump("SELECT k, v, _source FROM kv ORDER BY k").await,
        rows
    );
    assert_eq!(f.count("SELECT count(*) FROM cdc_sink_dlq").await, 1);

    let metrics = f.metrics().await;
    assert!(
        metrics.contains(r#"apply_upserts_total{schema="public",table="kv"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"dlq_enqueued_total{schema="public",table="kv"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"http_status_codes_total{code="200"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn cas_loss_without_merge_is_discarded_and_counted() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1"; api.configureTable("kv", { cas: ["_timestamp"] });"#,
    );
    let f = fixture("cas_nomerge", KV_SCHEMA, &["--userscript", &path]).await;
    seed_row(&f, 1, "aa", "west", T2).await;
    f.post_ok(
        "/cas_nomerge/public",
        batch(&[kv_row(1, "\\\\x01", "east", T1, None, "1.0")]),
    )
    .await;
    assert_eq!(f.dump("SELECT k, v FROM kv").await, vec!["1|\\xaa"]);
    assert_eq!(f.count("SELECT count(*) FROM cdc_sink_dlq").await, 0);
    let metrics = f.metrics().await;
    assert!(
        metrics.contains(r#"apply_conflicts_total{schema="public",table="kv"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn equal_cas_ties_break_on_source() {
    // With (_timestamp, _source), a tie resolves the same way on both sides.
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("kv", { cas: ["_timestamp", "_source"], merge: api.standardMerge(() => ({ dlq: "kv" })) });"#,
    );
    let f = fixture("cas_tie", KV_SCHEMA, &["--userscript", &path]).await;
    seed_row(&f, 1, "aa", "east", T2).await;
    seed_row(&f, 2, "bb", "west", T2).await;
    let body = batch(&[
        kv_row(1, "\\\\x01", "west", T2, None, "1.0"), // 'west' > 'east': wins
        kv_row(2, "\\\\x02", "east", T2, None, "1.0"), // 'east' < 'west': loses
    ]);
    f.post_ok("/cas_tie/public", body).await;
    assert_eq!(
        f.dump("SELECT k, v, _source FROM kv ORDER BY k").await,
        vec!["1|\\x01|west", "2|\\xbb|west"]
    );
    assert_eq!(f.count("SELECT count(*) FROM cdc_sink_dlq").await, 1);
}

#[tokio::test]
async fn standard_merge_three_way_and_fallbacks() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("docs", { cas: ["ts"], merge: api.standardMerge() });
        api.configureTable("apply_fb", { cas: ["ts"], merge: api.standardMerge((op) => ({ apply: { ...op.target, a: "fallback" } })) });
        api.configureTable("drop_fb", { cas: ["ts"], merge: api.standardMerge(() => ({ drop: true })) });
        api.configureTable("custom", { cas: ["ts"], merge: (op) => ({ dlq: "custom-" + op.proposed.id }) });"#,
    );
    let mut setup = String::from(KV_SCHEMA);
    for t in ["docs", "apply_fb", "drop_fb", "custom"] {
        setup.push_str(&format!(
            "CREATE TABLE {t} (id INT8 PRIMARY KEY, a TEXT, b TEXT, ts INT8);
             INSERT INTO {t} VALUES (1, 'a0', 'b1', 20);"
        ));
    }
    let f = fixture("std_merge", &setup, &["--userscript", &path]).await;
    let row = |t: &str, a: &str, b: &str| {
        format!(
            r#"{{"after":{{"id":1,"a":"{a}","b":"{b}","ts":10}},"before":{{"id":1,"a":"a0","b":"b0","ts":5}},"key":[1],"topic":"{t}","updated":"3.2"}}"#
        )
    };
    // b changed on both sides (before b0, stored b1, proposed b2): unmerged,
    // and `docs` has no fallback: the request fails naming table, key, column.
    let before_all = f.dump("SELECT * FROM docs").await;
    let text = f
        .post_refused("/std_merge/public", batch(&[row("docs", "a1", "b2")]))
        .await;
    assert!(
        text.contains("docs") && text.contains("[1]") && text.contains('b'),
        "{text}"
    );
    assert_eq!(f.dump("SELECT * FROM docs").await, before_all);
    // Only a changed (before == stored) and b already equal: merges.
    f.post_ok("/std_merge/public", batch(&[row("docs", "a1", "b1")]))
        .await;
    assert_eq!(
        f.dump("SELECT id, a, b, ts FROM docs").await,
        vec!["1|a1|b1|20"]
    );
    // Fallbacks decide for unmerged rows.
    let body = batch(&[
        row("apply_fb", "a1", "b2"),
        row("drop_fb", "a1", "b2"),
        row("custom", "a1", "b2"),
    ]);
    f.post_ok("/std_merge/public", body).await;
    assert_eq!(
        f.dump("SELECT id, a, b, ts FROM apply_fb").await,
        vec!["1|fallback|b1|20"]
    );
    assert_eq!(
        f.dump("SELECT id, a, b, ts FROM drop_fb").await,
        vec!["1|a0|b1|20"]
    );
    assert_eq!(
        f.dump("SELECT id, a, b, ts FROM custom").await,
        vec!["1|a0|b1|20"]
    );
    assert_eq!(
        f.dump("SELECT dlq_name, source_nanos, source_logical, data_after->>'b', data_before->>'b' FROM cdc_sink_dlq").await,
        vec!["custom-1|3|2|b2|b0"]
    );
}

/// With `exprs`, the stored row holds the expression's result: a merge
/// compares `before` through the same expression and writes the merged row
/// as it is, without applying the expression a second time.
#[tokio::test]
async fn standard_merge_reads_and_writes_through_exprs() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("t", { cas: ["ts"], exprs: { a: "$0 || '!'" }, merge: api.standardMerge() });"#,
    );
    let f = fixture(
        "merge_exprs",
        "CREATE TABLE t (id INT8 PRIMARY KEY, a TEXT, b TEXT, ts INT8);
         INSERT INTO t VALUES (1, 'x!', 'b0', 20), (2, 'x!', 'b0', 20);",
        &["--userscript", &path],
    )
    .await;
    let row = |id: i64, a: &str, b: &str| {
        format!(
            r#"{{"after":{{"id":{id},"a":"{a}","b":"{b}","ts":10}},"before":{{"id":{id},"a":"x","b":"b0","ts":5}},"key":[{id}],"topic":"t","updated":"3.0"}}"#
        )
    };
    // Row 1 changed a (stored 'x!' is the expression of before's 'x'); row 2
    // changed b and left a as it was.
    f.post_ok(
        "/merge_exprs/public",
        batch(&[row(1, "w", "b0"), row(2, "x", "b1")]),
    )
    .await;
    assert_eq!(
        f.dump("SELECT id, a, b, ts FROM t ORDER BY id").await,
        vec!["1|w!|b0|20", "2|x!|b1|20"]
    );
}

/// Properties collected into an `extras` column merge as that column: the
/// proposed and before rows are read as they are written.
#[tokio::test]
async fn standard_merge_reads_extras_as_written() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("t", { cas: ["ts"], extras: "more", merge: api.standardMerge() });"#,
    );
    let setup = format!(
        r#"{KV_SCHEMA} CREATE TABLE t (id INT8 PRIMARY KEY, a TEXT, ts INT8, more JSONB);
         INSERT INTO t VALUES (1, 'a0', 20, '{{"c": "red"}}'), (2, 'a0', 20, '{{"c": "red"}}');"#
    );
    let f = fixture("merge_extras", &setup, &["--userscript", &path]).await;
    let row = |id: i64, a: &str, c: &str| {
        format!(
            r#"{{"after":{{"id":{id},"a":"{a}","c":"{c}","ts":10}},"before":{{"id":{id},"a":"a0","c":"red","ts":5}},"key":[{id}],"topic":"t","updated":"3.0"}}"#
        )
    };
    // Row 1 changed a, row 2 changed the extra property c.
    f.post_ok(
        "/merge_extras/public",
        batch(&[row(1, "a1", "red"), row(2, "a0", "blue")]),
    )
    .await;
    assert_eq!(
        f.dump("SELECT id, a, ts, more FROM t ORDER BY id").await,
        vec![r#"1|a1|20|{"c": "red"}"#, r#"2|a0|20|{"c": "blue"}"#]
    );
    assert_eq!(f.count("SELECT count(*) FROM cdc_sink_dlq").await, 0);
}

/// Quoted names that look like SQL (` AS ` inside a column name) reach the
/// conflict path's statements intact.
#[tokio::test]
async fn conflicts_on_columns_named_like_sql() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("odd", { cas: ["ts AS of"], merge: api.standardMerge(() => ({ dlq: "odd" })) });"#,
    );
    let setup = format!(
        r#"{KV_SCHEMA} CREATE TABLE odd ("my AS key" INT8 PRIMARY KEY, v TEXT, "ts AS of" INT8);
         INSERT INTO odd VALUES (1, 'stored', 20), (2, 'stored', 5);"#
    );
    let f = fixture("odd_names", &setup, &["--userscript", &path]).await;
    let row = |k: i64, v: &str| {
        format!(
            r#"{{"after":{{"my AS key":{k},"v":"{v}","ts AS of":10}},"before":{{"my AS key":{k},"v":"older","ts AS of":1}},"key":[{k}],"topic":"odd","updated":"3.0"}}"#
        )
    };
    f.post_ok(
        "/odd_names/public",
        batch(&[row(1, "loses"), row(2, "wins")]),
    )
    .await;
    assert_eq!(
        f.dump(r#"SELECT "my AS key", v FROM odd ORDER BY 1"#).await,
        vec!["1|stored", "2|wins"]
    );
    assert_eq!(
        f.dump("SELECT dlq_name, data_after->>'v' FROM cdc_sink_dlq")
            .await,
        vec!["odd|loses"]
    );
}

#[tokio::test]
async fn typed_comparison_makes_replays_no_ops() {
    let (_dir, path) = script(CAS_DLQ);
    let f = fixture("typed_cmp", KV_SCHEMA, &["--userscript", &path]).await;
    seed_row(&f, 1, "01", "east", "2026-01-01 00:00:01+00").await;
    // Same row in other spellings: hex escape and RFC 3339: not a conflict.
    f.post_ok(
        "/typed_cmp/public",
        batch(&[kv_row(1, "\\\\x01", "east", T1, None, "1.0")]),
    )
    .await;
    assert_eq!(f.count("SELECT count(*) FROM cdc_sink_dlq").await, 0);
}

#[tokio::test]
async fn duplicate_keys_fold_to_highest_updated() {
    let f = fixture("dup_keys", KV_SCHEMA, &[]).await;
    let body = batch(&[
        kv_row(1, "\\\\x03", "east", T3, None, "30.0"),
        kv_row(1, "\\\\x01", "east", T1, None, "10.0"),
        kv_row(2, "\\\\x01", "east", T1, None, "10.0"),
        kv_row(2, "\\\\x02", "east", T2, None, "10.0"), // same time: the last wins
    ]);
    f.post_ok("/dup_keys/public", body).await;
    assert_eq!(
        f.dump("SELECT k, v FROM kv ORDER BY k").await,
        vec!["1|\\x03", "2|\\x02"]
    );
}

/// One key in several spellings is one row: `3` and `"3"` of an int8 key,
/// `3.5`, `3.50` and `"35e-1"` of a numeric one. The versions fold as for
/// one spelling (else the upsert would touch the row twice and fail).
#[tokio::test]
async fn duplicate_keys_fold_across_spellings() {
    let setup = format!("{KV_SCHEMA} CREATE TABLE nk (n NUMERIC PRIMARY KEY, v TEXT);");
    let f = fixture("dup_spellings", &setup, &[]).await;
    let row = |k: &str, v: &str, updated: &str| {
        format!(
            r#"{{"after":{{"k":{k},"v":"\\x{v}","_source":"east","_timestamp":"{T1}"}},"key":[{k}],"topic":"kv","updated":"{updated}"}}"#
        )
    };
    let num = |n: &str, v: &str, updated: &str| {
        format!(
            r#"{{"after":{{"n":{n},"v":"{v}"}},"key":[{n}],"topic":"nk","updated":"{updated}"}}"#
        )
    };
    let body = batch(&[
        row("3", "01", "10.0"),
        row(r#""3""#, "02", "20.0"),
        row("3", "03", "15.0"),
        num("3.5", "a", "10.0"),
        num(r#""35e-1""#, "b", "30.0"),
        num("3.50", "c", "20.0"),
    ]);
    f.post_ok("/dup_spellings/public", body).await;
    assert_eq!(f.dump("SELECT k, v FROM kv").await, vec!["3|\\x02"]);
    assert_eq!(f.dump("SELECT n, v FROM nk").await, vec!["3.5|b"]);
}

#[tokio::test]
async fn deletes_with_and_without_conflict() {
    let (_dir, path) = script(CAS_DLQ);
    let f = fixture("deletes", KV_SCHEMA, &["--userscript", &path]).await;
    seed_row(&f, 1, "aa", "east", T1).await; // matches the delete's before: deleted
    seed_row(&f, 2, "bb", "west", T3).await; // newer than the delete's before: conflict
    seed_row(&f, 3, "cc", "west", T1).await; // delete with before null: dropped
    let del = |k: i64, before: &str| {
        format!(r#"{{"after":null,"before":{before},"key":[{k}],"topic":"kv","updated":"50.1"}}"#)
    };
    let before = |k: i64, v: &str| {
        format!(r#"{{"k":{k},"v":"\\x{v}","_source":"east","_timestamp":"{T1}"}}"#)
    };
    let body = batch(&[
        del(1, &before(1, "aa")),
        del(2, &before(2, "bb")),
        del(3, "null"),
    ]);
    f.post_ok("/deletes/public", body).await;
    assert_eq!(f.dump("SELECT k FROM kv ORDER BY k").await, vec!["2", "3"]);
    assert_eq!(
        f.dump("SELECT dlq_name, source_nanos, source_logical, data_after, data_before->>'k' FROM cdc_sink_dlq").await,
        vec!["kv|50|1|null|2"]
    );
}

/// `deleteKey: [columns]`: a delete's key finds rows by those columns
/// instead of the primary key, with and without compare-and-set.
#[tokio::test]
async fn delete_key_columns_find_the_rows() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("plain", { deleteKey: ["ext"] });
        api.configureTable("cas", { deleteKey: ["ext"], cas: ["ts"], merge: api.standardMerge(() => ({ dlq: "cas" })) });"#,
    );
    let mut setup = String::from(KV_SCHEMA);
    for t in ["plain", "cas"] {
        setup.push_str(&format!(
            "CREATE TABLE {t} (id INT8 PRIMARY KEY, ext TEXT UNIQUE, ts INT8);
             INSERT INTO {t} VALUES (1, 'a', 5), (2, 'b', 9);"
        ));
    }
    let f = fixture("delete_key", &setup, &["--userscript", &path]).await;
    let del = |t: &str, id: i64, ext: &str| {
        format!(
            r#"{{"after":null,"before":{{"id":{id},"ext":"{ext}","ts":5}},"key":["{ext}"],"topic":"{t}","updated":"20.0"}}"#
        )
    };
    let body = batch(&[
        del("plain", 2, "b"),
        del("cas", 1, "a"), // stored ts 5, not newer than before: deleted
        del("cas", 2, "b"), // stored ts 9, newer: a conflict, to the DLQ
    ]);
    f.post_ok("/delete_key/public", body).await;
    assert_eq!(f.dump("SELECT id FROM plain").await, vec!["1"]);
    assert_eq!(f.dump("SELECT id FROM cas").await, vec!["2"]);
    assert_eq!(
        f.dump("SELECT dlq_name, data_before->>'ext' FROM cdc_sink_dlq")
            .await,
        vec!["cas|b"]
    );
    // A delete with only its `deleteKey` (no `before`) in a batch with
    // another row: nothing names its primary key, and it still applies.
    let body = batch(&[
        r#"{"after":{"id":3,"ext":"c","ts":1},"key":[3],"topic":"plain","updated":"21.0"}"#
            .to_string(),
        r#"{"after":null,"key":["a"],"topic":"plain","updated":"21.0"}"#.to_string(),
    ]);
    f.post_ok("/delete_key/public", body).await;
    assert_eq!(f.dump("SELECT id FROM plain ORDER BY id").await, vec!["3"]);
    // On a table with compare-and-set, such a delete has nothing to compare
    // with: a conflict with the row its `deleteKey` finds, which goes
    // through the merge to the DLQ and stays.
    let body = batch(&[
        r#"{"after":{"id":5,"ext":"e","ts":1},"key":[5],"topic":"cas","updated":"22.0"}"#
            .to_string(),
        r#"{"after":null,"key":["b"],"topic":"cas","updated":"22.0"}"#.to_string(),
    ]);
    f.post_ok("/delete_key/public", body).await;
    assert_eq!(
        f.dump("SELECT id FROM cas ORDER BY id").await,
        vec!["2", "5"]
    );
    assert_eq!(
        f.dump(
            "SELECT dlq_name, data_after::text, data_before::text FROM cdc_sink_dlq \
             ORDER BY source_nanos"
        )
        .await,
        vec![
            r#"cas|null|{"id": 2, "ts": 5, "ext": "b"}"#,
            // With no `before`, the DLQ keeps the key that found the row.
            r#"cas|null|{"ext": "b"}"#
        ]
    );
}

/// A `deleteKey` need not be unique: a delete removes every row it finds
/// that is not newer than its `before` (or was never stamped), and each
/// newer one is a conflict of its own, beside an upsert that lost.
#[tokio::test]
async fn a_delete_key_may_find_several_rows() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("t", { deleteKey: ["ext"], cas: ["ts"], merge: api.standardMerge((op) => ({ dlq: "t" + op.target.id })) });"#,
    );
    let setup = format!(
        "{KV_SCHEMA}
         CREATE TABLE t (id INT8 PRIMARY KEY, ext TEXT, ts INT8);
         INSERT INTO t VALUES (1, 'a', 5), (2, 'a', 9), (3, 'a', 7), (4, 'b', 1), (5, 'a', NULL);"
    );
    let f = fixture("delete_key_many", &setup, &["--userscript", &path]).await;
    let body = batch(&[
        r#"{"after":null,"before":{"id":1,"ext":"a","ts":5},"key":["a"],"topic":"t","updated":"20.0"}"#
            .to_string(),
        // Older than the stored row, and different: a conflict.
        r#"{"after":{"id":4,"ext":"c","ts":0},"key":[4],"topic":"t","updated":"20.0"}"#
            .to_string(),
    ]);
    f.post_ok("/delete_key_many/public", body).await;
    assert_eq!(
        f.dump("SELECT id || ':' || ts FROM t ORDER BY id").await,
        vec!["2:9", "3:7", "4:1"]
    );
    assert_eq!(
        f.dump(
            "SELECT dlq_name, data_after->>'id', data_before->>'id' FROM cdc_sink_dlq ORDER BY dlq_name"
        )
        .await,
        vec!["t2|NULL|1", "t3|NULL|1", "t4|4|NULL"]
    );
}

#[tokio::test]
async fn deletes_without_cas_remove_rows() {
    let f = fixture("plain_deletes", KV_SCHEMA, &[]).await;
    seed_row(&f, 1, "aa", "east", T1).await;
    seed_row(&f, 2, "bb", "east", T1).await;
    let body = r#"{"payload":[{"after":null,"key":[1],"topic":"kv","updated":"2.0"}],"length":1}"#;
    f.post_ok("/plain_deletes/public", body).await;
    assert_eq!(f.dump("SELECT k FROM kv").await, vec!["2"]);
}

#[tokio::test]
async fn deadlines_discard_old_rows() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1"; api.configureTable("kv", { deadlines: { _timestamp: "1h" } });"#,
    );
    let f = fixture("deadlines", KV_SCHEMA, &["--userscript", &path]).await;
    let fresh = chrono::Utc::now().to_rfc3339();
    let body = batch(&[
        kv_row(1, "\\\\x01", "east", T1, None, "1.0"), // 2026-01-01: far too old
        kv_row(2, "\\\\x02", "east", &fresh, None, "1.0"),
    ]);
    f.post_ok("/deadlines/public", body).await;
    assert_eq!(f.dump("SELECT k FROM kv").await, vec!["2"]);
}

/// A deadline reaching back past the calendar's start (chrono's ends at
/// year 262143 BCE; 3,000,000,000 hours is 342,000 years) discards nothing,
/// rather than overflowing the subtraction.
#[tokio::test]
async fn a_deadline_beyond_the_calendar_discards_nothing() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1"; api.configureTable("kv", { deadlines: { _timestamp: "3000000000h" } });"#,
    );
    let f = fixture("long_deadline", KV_SCHEMA, &["--userscript", &path]).await;
    let body = batch(&[kv_row(1, "\\\\x01", "east", T1, None, "1.0")]);
    f.post_ok("/long_deadline/public", body).await;
    assert_eq!(f.dump("SELECT k FROM kv").await, vec!["1"]);
}

#[tokio::test]
async fn bad_input_is_rejected_and_changes_nothing() {
    let (_dir, path) = script(CAS_DLQ);
    let f = fixture(
        "bad_input",
        KV_SCHEMA,
        &["--userscript", &path, "--maxBodyBytes", "4096"],
    )
    .await;
    seed_row(&f, 1, "aa", "west", T2).await;
    let snapshot = || async {
        (
            f.dump("SELECT * FROM kv ORDER BY k").await,
            f.dump("SELECT * FROM cdc_sink_dlq ORDER BY event").await,
        )
    };
    let before = snapshot().await;
    let good = kv_row(2, "\\\\x02", "east", T3, None, "1.0");
    let loser = kv_row(1, "\\\\x01", "east", T1, None, "1.0"); // would reach the DLQ
    let cases: Vec<(String, u16, &str)> = vec![
        (
            r#"{"payload":[{"after":"#.to_string(),
            400,
            "malformed JSON at line 1",
        ),
        (
            batch(&[
                good.clone(),
                loser.clone(),
                kv_row(3, "\\\\x03", "east", T1, None, "1.0")
                    .replace("\"topic\":\"kv\"", "\"topic\":\"nope\""),
            ]),
            400,
            "unknown table",
        ),
        (
            batch(&[
                good.clone(),
                loser.clone(),
                good.replace("\"k\":2", "\"k\":4,\"zz\":1"),
            ]),
            400,
            "unknown column \"zz\"",
        ),
        (
            batch(&[
                good.clone(),
                loser.clone(),
                good.replace("\"k\":2", "\"k\":\"two\""),
            ]),
            400,
            "\"two\"",
        ),
        (
            batch(&[
                good.clone(),
                loser.clone(),
                good.replace("\\\\x02", "\\\\xZZ"),
            ]),
            400,
            "column \"v\"",
        ),
        (
            batch(&[
                good.clone(),
                loser.clone(),
                good.replace(T3, "not a time").replace("\"k\":2", "\"k\":5"),
            ]),
            400,
            "not a time",
        ),
        (
            // Read by PostgreSQL's input function, which refuses it.
            batch(&[
                good.clone(),
                loser.clone(),
                good.replace(T3, "2026-13-01T00:00:01Z")
                    .replace("\"k\":2", "\"k\":6"),
            ]),
            400,
            "column \"_timestamp\" (timestamp with time zone): cannot convert \"2026-13-01T00:00:01Z\"",
        ),
        (batch(&vec![good.clone(); 60]), 413, "maxBodyBytes"),
    ];
    for (body, want, needle) in cases {
        let (status, text) = f.post("/bad_input/public", body.clone()).await;
        assert_eq!(status, want, "{body} -> {text}");
        assert!(text.contains(needle), "expected {needle:?} in {text:?}");
        assert_eq!(snapshot().await, before, "{body} changed the database");
    }
}

#[tokio::test]
async fn target_down_answers_503_and_health_fails() {
    let mut cluster = meridian::pgcluster::PgCluster::start_temp().unwrap();
    let url = cluster.create_database("down").await.unwrap();
    connect(&url).await.batch_execute(KV_SCHEMA).await.unwrap();
    let server = meridian::server::serve(start_args(&url, &["--applyTimeout", "2s"]))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let health = format!("{}/_/healthz", server.base_url());
    assert_eq!(http.get(&health).send().await.unwrap().status(), 200);
    cluster.kill().unwrap();
    let r = http
        .post(format!("{}/down/public", server.base_url()))
        .body(batch(&[kv_row(1, "\\\\x01", "east", T1, None, "1.0")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503, "{}", r.text().await.unwrap());
    assert_eq!(http.get(&health).send().await.unwrap().status(), 503);
    // Once the target is back, the changefeed's retry applies.
    cluster.restart().unwrap();
    assert!(
        meridian::pgcluster::wait_for(std::time::Duration::from_secs(10), || async {
            http.get(&health).send().await.unwrap().status() == 200
        })
        .await,
        "target healthy again"
    );
    let r = http
        .post(format!("{}/down/public", server.base_url()))
        .body(batch(&[kv_row(1, "\\\\x01", "east", T1, None, "1.0")]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn apply_timeout_answers_503_and_rolls_back() {
    let f = fixture("apply_timeout", KV_SCHEMA, &["--applyTimeout", "1s"]).await;
    seed_row(&f, 1, "aa", "west", T1).await;
    // Another session holds the row lock past the apply timeout.
    let blocker = connect(&f.url).await;
    blocker
        .batch_execute("BEGIN; SELECT * FROM kv WHERE k = 1 FOR UPDATE")
        .await
        .unwrap();
    let body = batch(&[
        kv_row(2, "\\\\x02", "east", T2, None, "1.0"),
        kv_row(1, "\\\\x01", "east", T2, None, "1.0"),
    ]);
    let (status, text) = f.post("/apply_timeout/public", body).await;
    assert_eq!(status, 503, "{text}");
    blocker.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        f.dump("SELECT k, v FROM kv ORDER BY k").await,
        vec!["1|\\xaa"]
    );
}

#[tokio::test]
async fn missing_dlq_table_error_gives_create_statement() {
    let (_dir, path) = script(CAS_DLQ);
    let f = fixture(
        "missing_dlq",
        "CREATE TABLE kv (k INT8 PRIMARY KEY, v BYTEA, _source TEXT, _timestamp TIMESTAMPTZ)",
        &["--userscript", &path],
    )
    .await;
    seed_row(&f, 1, "aa", "west", T2).await;
    let (status, text) = f
        .post(
            "/missing_dlq/public",
            batch(&[kv_row(1, "\\\\x01", "east", T1, None, "1.0")]),
        )
        .await;
    assert_eq!(status, 503, "{text}");
    assert!(
        text.contains("CREATE TABLE IF NOT EXISTS \"public\".\"cdc_sink_dlq\""),
        "{text}"
    );
    assert_eq!(f.dump("SELECT k, v FROM kv").await, vec!["1|\\xaa"]);
}

#[tokio::test]
async fn schema_change_is_picked_up() {
    let f = fixture(
        "schema_change",
        "CREATE TABLE t (id INT8 PRIMARY KEY, a TEXT)",
        &[],
    )
    .await;
    let row = |extra: &str| {
        format!(
            r#"{{"payload":[{{"after":{{"id":1,"a":"x"{extra}}},"key":[1],"topic":"t","updated":"1.0"}}],"length":1}}"#
        )
    };
    assert_eq!(f.post("/schema_change/public", row("")).await.0, 200);
    f.db.batch_execute("ALTER TABLE t ADD COLUMN b INT8")
        .await
        .unwrap();
    f.post_ok("/schema_change/public", row(r#","b":5"#)).await;
    assert_eq!(f.dump("SELECT id, a, b FROM t").await, vec!["1|x|5"]);
    // A column that changes type is converted by its new type.
    f.db.batch_execute("ALTER TABLE t ALTER COLUMN b TYPE jsonb USING to_jsonb(b)")
        .await
        .unwrap();
    f.post_ok("/schema_change/public", row(r#","b":{"n":6}"#))
        .await;
    assert_eq!(
        f.dump("SELECT id, a, b FROM t").await,
        vec![r#"1|x|{"n": 6}"#]
    );
}

#[tokio::test]
async fn resolved_checkpoints_are_accepted() {
    let f = fixture("resolved", KV_SCHEMA, &[]).await;
    f.post_ok(
        "/resolved/public",
        r#"{"resolved":"1700000000123456789.0000000000"}"#,
    )
    .await;
    let metrics = f.metrics().await;
    assert!(
        metrics.contains(r#"resolved_timestamp_seconds{schema="public"} 1700000000.1"#),
        "{metrics}"
    );
    // A schema that does not exist is refused and mints no metric series.
    let text = f
        .post_refused(
            "/resolved/nosuch",
            r#"{"resolved":"1700000000123456789.0000000000"}"#,
        )
        .await;
    assert!(text.contains("nosuch"), "{text}");
    let metrics = f.metrics().await;
    assert!(!metrics.contains("nosuch"), "{metrics}");
}

#[tokio::test]
async fn tls_self_signed_and_metrics_addr() {
    let f = fixture(
        "tls",
        KV_SCHEMA,
        &["--tlsSelfSigned", "--metricsAddr", "127.0.0.1:0"],
    )
    .await;
    assert!(f.server.base_url().starts_with("https://"));
    f.post_ok(
        "/tls/public",
        batch(&[kv_row(1, "\\\\x01", "east", T1, None, "1.0")]),
    )
    .await;
    let m = reqwest::get(format!(
        "http://{}/metrics",
        f.server.metrics_addr().unwrap()
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(
        m.contains(r#"apply_upserts_total{schema="public",table="kv"} 1"#),
        "{m}"
    );
}

#[tokio::test]
async fn jwt_authentication() {
    let key = rcgen::KeyPair::generate().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let public = dir.path().join("pub.pem");
    std::fs::write(&public, key.public_key_pem()).unwrap();
    let (url, _) = fresh_db("jwt", KV_SCHEMA).await;
    let mut args = start_args(&url, &[]);
    args.disable_authentication = false;
    args.jwt_public_key = vec![public];
    let server = meridian::server::serve(args).await.unwrap();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256),
        &serde_json::json!({"sub": "changefeed"}),
        &jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap(),
    )
    .unwrap();
    let http = reqwest::Client::new();
    let body = batch(&[kv_row(1, "\\\\x01", "east", T1, None, "1.0")]);
    let url = format!("{}/jwt/public", server.base_url());
    let r = http.post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(&url)
        .bearer_auth("abc.def.ghi")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = http
        .post(&url)
        .bearer_auth(&token)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test]
async fn local_writes_racing_replication_are_never_lost() {
    let (_dir, path) = script(CAS_DLQ);
    let f = fixture("race", KV_SCHEMA, &["--userscript", &path]).await;
    let keys = 20i64;
    for k in 0..keys {
        seed_row(&f, k, "00", "west", "2026-01-01T00:00:00Z").await;
    }
    // A local writer bumps every key to odd seconds, replication sends even
    // seconds, both racing; the newest version of each key must win.
    let local_url = f.url.clone();
    let local = tokio::spawn(async move {
        let c = connect(&local_url).await;
        for round in 0..15i64 {
            for k in 0..keys {
                let ts = format!("2026-01-01T00:00:{:02}Z", round * 2 + 1);
                c.execute(
                    "UPDATE kv SET v = '\\x11', _source = 'west', _timestamp = $2::text::timestamptz
                      WHERE k = $1 AND _timestamp < $2::text::timestamptz",
                    &[&k, &ts],
                )
                .await
                .unwrap();
            }
        }
    });
    for round in 0..15i64 {
        let ts = format!("2026-01-01T00:00:{:02}Z", round * 2);
        let rows: Vec<String> = (0..keys)
            .map(|k| kv_row(k, "\\\\x22", "east", &ts, None, &format!("{}.0", round + 1)))
            .collect();
        f.post_ok("/race/public", batch(&rows)).await;
    }
    local.await.unwrap();
    // Odd seconds run to 29, even to 28: the local write of second 29 wins everywhere.
    let rows = f
        .dump("SELECT DISTINCT v, _source, _timestamp FROM kv")
        .await;
    assert_eq!(rows, vec!["\\x11|west|2026-01-01 00:00:29+00"]);
}

#[tokio::test]
async fn table_options_map_ignore_extras_exprs() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("t", {
            ignore: ["junk"],
            extras: "more",
            exprs: { name: "upper($0)" },
            map: (doc) => ({ ...doc, mapped: true }),
        });"#,
    );
    let f = fixture(
        "table_options",
        "CREATE TABLE t (id INT8 PRIMARY KEY, name TEXT, more JSONB)",
        &["--userscript", &path],
    )
    .await;
    let body = r#"{"payload":[{"after":{"id":1,"name":"ada","junk":"x","color":"red"},"key":[1],"topic":"t","updated":"1.0"}],"length":1}"#;
    f.post_ok("/table_options/public", body).await;
    assert_eq!(
        f.dump("SELECT id, name, more FROM t").await,
        vec![r#"1|ADA|{"color": "red", "mapped": true}"#]
    );
}

/// Typed columns travel as binary arrays when every value converts exactly,
/// and as text for the server to parse otherwise; either way each stored
/// value equals PostgreSQL's own reading of the value sent.
#[tokio::test]
async fn typed_columns_round_trip_exactly() {
    let f = fixture(
        "typed_round_trip",
        "CREATE TABLE t (id INT8 PRIMARY KEY, i2 INT2, i4 INT4, i8 INT8, f4 FLOAT4, f8 FLOAT8,
           b BOOL, by BYTEA, tz TIMESTAMPTZ, ts TIMESTAMP, t3 TIMESTAMPTZ(3), u UUID, n NUMERIC(40,20))",
        &[],
    )
    .await;
    const COLS: [(&str, &str); 12] = [
        ("i2", "int2"),
        ("i4", "int4"),
        ("i8", "int8"),
        ("f4", "float4"),
        ("f8", "float8"),
        ("b", "bool"),
        ("by", "bytea"),
        ("tz", "timestamptz"),
        ("ts", "timestamp"),
        ("t3", "timestamptz(3)"),
        ("u", "uuid"),
        ("n", "numeric(40,20)"),
    ];
    // (JSON value, the SQL literal PostgreSQL must read it as), per column.
    type Row = [(&'static str, &'static str); 12];
    let typed: Vec<Row> = vec![
        [
            ("-32768", "-32768"),
            ("2147483647", "2147483647"),
            ("-9223372036854775808", "-9223372036854775808"),
            ("1.5", "1.5"),
            ("0.1", "0.1"),
            ("true", "true"),
            (r#""\\xdeadBEEF""#, r"\xdeadbeef"),
            (
                r#""2026-03-04T05:06:07.123456Z""#,
                "2026-03-04T05:06:07.123456Z",
            ),
            (r#""2026-03-04 05:06:07.5""#, "2026-03-04 05:06:07.5"),
            (
                r#""2026-03-04T05:06:07.1235Z""#,
                "2026-03-04T05:06:07.1235Z",
            ),
            (
                r#""6f1c1a58-5d0b-4a55-8f5e-0d9b6a3b2c11""#,
                "6f1c1a58-5d0b-4a55-8f5e-0d9b6a3b2c11",
            ),
            (
                "12345678901234567890.12345678901234567891",
                "12345678901234567890.12345678901234567891",
            ),
        ],
        [
            (r#""7""#, "7"),
            ("-0", "0"),
            (r#""0042""#, "42"),
            ("3.4028235e38", "3.4028235e38"),
            ("-2.5e-300", "-2.5e-300"),
            (r#""f""#, "false"),
            (r#""AQI=""#, r"\x0102"),
            (
                r#""2026-03-04T05:06:07+05:30""#,
                "2026-03-04T05:06:07+05:30",
            ),
            (
                r#""2026-03-04T05:06:07.000001-08:00""#,
                "2026-03-04T05:06:07.000001-08:00",
            ),
            (
                r#""1999-12-31 23:59:59.9999-0130""#,
                "1999-12-31 23:59:59.9999-0130",
            ),
            (
                r#""6F1C1A585D0B4A558F5E0D9B6A3B2C11""#,
                "6f1c1a58-5d0b-4a55-8f5e-0d9b6a3b2c11",
            ),
            (r#""-0.5""#, "-0.5"),
        ],
        [
            ("0", "0"),
            ("1", "1"),
            ("9223372036854775807", "9223372036854775807"),
            ("0", "0"),
            ("-0.0", "-0.0"),
            ("false", "false"),
            (r#""\\x""#, r"\x"),
            (r#""0001-01-01T00:00:00Z""#, "0001-01-01T00:00:00Z"),
            (
                r#""9999-12-31T23:59:59.999999+15:59""#,
                "9999-12-31T23:59:59.999999+15:59",
            ),
            (
                r#""2024-02-29T12:00:00.0005+00""#,
                "2024-02-29T12:00:00.0005+00",
            ),
            (
                r#""00000000-0000-0000-0000-000000000000""#,
                "00000000-0000-0000-0000-000000000000",
            ),
            ("1e3", "1e3"),
        ],
        [("null", "NULL"); 12],
    ];
    // Values only the server reads exactly: the whole column goes as text.
    let text: Row = [
        ("1", "1"),
        ("2", "2"),
        ("3", "3"),
        (r#""Infinity""#, "Infinity"),
        (r#""1e-310""#, "1e-310"),
        ("true", "true"),
        (r#""\\x00""#, r"\x00"),
        (r#""2026-03-04 05:06:07""#, "2026-03-04 05:06:07"),
        (r#""infinity""#, "infinity"),
        (
            r#""2026-03-04T05:06:07.1234565Z""#,
            "2026-03-04T05:06:07.1234565Z",
        ),
        (
            r#""{6f1c1a58-5d0b-4a55-8f5e-0d9b6a3b2c11}""#,
            "6f1c1a58-5d0b-4a55-8f5e-0d9b6a3b2c11",
        ),
        (r#""NaN""#, "NaN"),
    ];
    let row = |id: usize, r: &Row| {
        let after: Vec<String> = COLS
            .iter()
            .zip(r)
            .map(|((c, _), (json, _))| format!("\"{c}\":{json}"))
            .collect();
        format!(
            r#"{{"after":{{"id":{id},{}}},"key":[{id}],"topic":"t","updated":"1.0"}}"#,
            after.join(",")
        )
    };
    let mut expect: Vec<(usize, &Row)> = typed.iter().enumerate().collect();
    let first = batch(&expect.iter().map(|(i, r)| row(*i, r)).collect::<Vec<_>>());
    // A typed value before and a NULL after the ones that need text.
    let mixed = [(10, &typed[0]), (11, &text), (12, &typed[3])];
    let second = batch(&mixed.iter().map(|(i, r)| row(*i, r)).collect::<Vec<_>>());
    expect.extend(mixed);
    for body in [&first, &second, &first] {
        f.post_ok("/typed_round_trip/public", body.clone()).await;
    }
    for (id, r) in expect {
        for ((c, ty), (json, lit)) in COLS.iter().zip(r) {
            let want = if *lit == "NULL" {
                "NULL".to_string()
            } else {
                format!("'{lit}'::{ty}")
            };
            let same = f
                .dump(&format!(
                    "SELECT {c} IS NOT DISTINCT FROM {want}, {c} FROM t WHERE id = {id}"
                ))
                .await;
            assert!(
                same.len() == 1 && same[0].starts_with("t|"),
                "row {id} column {c}: sent {json}, want {want}, stored {same:?}"
            );
        }
    }
}

/// Sockets of this process that were accepted on `port`: the server's side
/// of its open connections.
fn accepted_on(port: u16) -> Vec<std::os::fd::RawFd> {
    use nix::sys::socket::{getpeername, getsockname, SockaddrStorage};
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| {
            let local = getsockname::<SockaddrStorage>(fd).ok();
            let local_port = local
                .as_ref()
                .and_then(|a| a.as_sockaddr_in())
                .map(|a| a.port());
            local_port == Some(port) && getpeername::<SockaddrStorage>(fd).is_ok()
        })
        .collect()
}

/// A response leaves in several writes; with Nagle on, the last one waits
/// for the client's delayed ACK (up to 40 ms), which stalled changefeeds
/// sending one small batch at a time.
#[tokio::test]
async fn connections_are_accepted_with_nagle_off() {
    use nix::sys::socket::{getsockopt, sockopt::TcpNoDelay};
    for (name, extra) in [
        ("nodelay_plain", &[][..]),
        ("nodelay_tls", &["--tlsSelfSigned"][..]),
    ] {
        let f = fixture(name, KV_SCHEMA, extra).await;
        f.post_ok(
            &format!("/{name}/public"),
            batch(&[kv_row(1, "\\\\x01", "east", T1, None, "1.0")]),
        )
        .await;
        // The client keeps its connection open for the next request.
        let fds = accepted_on(f.server.addr().port());
        assert!(!fds.is_empty(), "{name}: no open connection found");
        for fd in fds {
            // SAFETY: only read; the descriptor belongs to the server's open
            // connection, which the client's pool keeps alive.
            let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            assert!(
                getsockopt(&sock, TcpNoDelay).unwrap(),
                "{name}: Nagle is on for fd {fd}"
            );
        }
    }
}

/// Conflicting rows of one request that carry different columns (a source
/// mid-way through ADD COLUMN sends both shapes) each merge on their own
/// columns: a column a row does not carry is left as stored, and a column
/// only some rows carry is merged for those rows.
#[tokio::test]
async fn conflicts_with_different_columns_merge_on_their_own() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("wide", { cas: ["ts"], merge: api.standardMerge() });"#,
    );
    let setup = format!(
        "{KV_SCHEMA}
         CREATE TABLE wide (id INT8 PRIMARY KEY, a TEXT, b TEXT, ts INT8);
         INSERT INTO wide VALUES (1, 'a0', 'b0', 20), (2, 'a0', 'b0', 20),
                                 (3, 'a0', 'b0', 20), (4, 'a0', 'b0', 20);"
    );
    let f = fixture("mixed_cols", &setup, &["--userscript", &path]).await;
    // Both rows lost on ts (10 < 20). Row 1 carries only a; row 2 carries a
    // and b. Each changed what its before says was a0/b0: both merge.
    let body = batch(&[
        r#"{"after":{"id":1,"a":"a1","ts":10},"before":{"id":1,"a":"a0","ts":5},"key":[1],"topic":"wide","updated":"3.0"}"#.to_string(),
        r#"{"after":{"id":2,"a":"a2","b":"b2","ts":10},"before":{"id":2,"a":"a0","b":"b0","ts":5},"key":[2],"topic":"wide","updated":"3.0"}"#.to_string(),
    ]);
    f.post_ok("/mixed_cols/public", body).await;
    assert_eq!(
        f.dump("SELECT id, a, b, ts FROM wide WHERE id <= 2 ORDER BY id")
            .await,
        vec!["1|a1|b0|20", "2|a2|b2|20"]
    );
    // The other order: the wider row first.
    let body = batch(&[
        r#"{"after":{"id":3,"a":"a3","b":"b3","ts":10},"before":{"id":3,"a":"a0","b":"b0","ts":5},"key":[3],"topic":"wide","updated":"3.0"}"#.to_string(),
        r#"{"after":{"id":4,"a":"a4","ts":10},"before":{"id":4,"a":"a0","ts":5},"key":[4],"topic":"wide","updated":"3.0"}"#.to_string(),
    ]);
    f.post_ok("/mixed_cols/public", body).await;
    assert_eq!(
        f.dump("SELECT id, a, b, ts FROM wide WHERE id > 2 ORDER BY id")
            .await,
        vec!["3|a3|b3|20", "4|a4|b0|20"]
    );
    assert_eq!(f.count("SELECT count(*) FROM cdc_sink_dlq").await, 0);
}

/// A delete routed by a `deletesTo` function removes the row the returned
/// document names, not the one the source's key would name; a delete whose
/// row never existed at the source (`before: null`) stays a no-op, and does
/// not fold away an older version of its key.
#[tokio::test]
async fn deletes_routed_by_a_function_use_the_returned_key() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureSource("del_fn.public", {
          dispatch: (doc: any) => ({ b: [{ b_id: "a-" + doc.id, v: doc.v }] }),
          deletesTo: (doc: any) => ({ b: [{ b_id: "a-" + doc.id }] }),
        });"#,
    );
    let setup = format!(
        "{KV_SCHEMA} CREATE TABLE b (b_id TEXT PRIMARY KEY, v TEXT);
         INSERT INTO b VALUES ('a-1', 'replicated'), ('1', 'local'), ('a-3', 'kept');"
    );
    let f = fixture("del_fn", &setup, &["--userscript", &path]).await;
    let body = batch(&[
        r#"{"after":null,"before":{"id":1,"v":"replicated"},"key":[1],"topic":"a","updated":"3.0"}"#.to_string(),
        r#"{"after":null,"before":null,"key":[3],"topic":"a","updated":"3.0"}"#.to_string(),
        // Row 4: an upsert, then a delete of a row the source never had.
        r#"{"after":{"id":4,"v":"four"},"before":null,"key":[4],"topic":"a","updated":"4.0"}"#.to_string(),
        r#"{"after":null,"before":null,"key":[4],"topic":"a","updated":"5.0"}"#.to_string(),
    ]);
    f.post_ok("/del_fn/public", body).await;
    assert_eq!(
        f.dump("SELECT b_id, v FROM b ORDER BY b_id").await,
        vec!["1|local", "a-3|kept", "a-4|four"]
    );
}

/// A `before: null` delete shown to a `deletesTo` function and routed as
/// shown is dropped, not applied.
#[tokio::test]
async fn deletes_of_rows_the_source_never_had_are_dropped_through_scripts() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureSource("del_null.public", {
          dispatch: (doc: any) => ({ kv: [doc] }),
          deletesTo: (doc: any) => ({ kv: [doc] }),
        });"#,
    );
    let f = fixture("del_null", KV_SCHEMA, &["--userscript", &path]).await;
    seed_row(&f, 3, "cc", "west", T1).await;
    let body = batch(&[
        r#"{"after":null,"before":null,"key":[3],"topic":"kv","updated":"3.0"}"#.to_string(),
    ]);
    f.post_ok("/del_null/public", body).await;
    assert_eq!(f.dump("SELECT k FROM kv").await, vec!["3"]);
}

/// A statement of an `apply` script that fails aborts the transaction even
/// when the script catches the error: the request fails and nothing is
/// applied (PostgreSQL answers such a COMMIT with a rollback).
#[tokio::test]
async fn a_caught_statement_error_in_apply_fails_the_request() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("kv", {
          apply: async (ops: any) => {
            const tx = api.getTX();
            await tx.apply(ops);
            try { await tx.exec("INSERT INTO audit (n) VALUES (1/0)"); } catch (e) { console.log("audit failed"); }
          },
        });
        api.configureTable("big", {
          apply: async (ops: any) => { await api.getTX().exec("INSERT INTO audit (n) VALUES ($1)", 3000000000); },
        });"#,
    );
    let setup =
        format!("{KV_SCHEMA} CREATE TABLE audit (n INT4); CREATE TABLE big (k INT8 PRIMARY KEY);");
    let f = fixture("caught", &setup, &["--userscript", &path]).await;
    let text = f
        .post_refused(
            "/caught/public",
            batch(&[kv_row(1, "AQ==", "east", T1, None, "1.0")]),
        )
        .await;
    assert!(text.contains("division by zero"), "{text}");
    assert_eq!(f.count("SELECT count(*) FROM kv").await, 0);
    // An integer too large for an int4 parameter is an error, not a wrap.
    let row = r#"{"after":{"k":1},"key":[1],"topic":"big","updated":"1.0"}"#;
    let text = f
        .post_refused("/caught/public", batch(&[row.to_string()]))
        .await;
    assert!(text.contains("3000000000"), "{text}");
    assert_eq!(f.count("SELECT count(*) FROM audit").await, 0);
}

/// A `GENERATED ALWAYS AS IDENTITY` column outside the key takes the
/// replicated value on insert and is left alone on update (PostgreSQL
/// refuses to update it), so updates of such rows apply.
#[tokio::test]
async fn always_identity_columns_do_not_block_updates() {
    let f = fixture(
        "ident_always",
        "CREATE TABLE t (id INT8 PRIMARY KEY, seq INT8 GENERATED ALWAYS AS IDENTITY, v TEXT)",
        &[],
    )
    .await;
    let row = |v: &str, updated: &str| {
        batch(&[format!(
            r#"{{"after":{{"id":1,"seq":42,"v":"{v}"}},"key":[1],"topic":"t","updated":"{updated}"}}"#
        )])
    };
    f.post_ok("/ident_always/public", row("one", "1.0")).await;
    f.post_ok("/ident_always/public", row("two", "2.0")).await;
    assert_eq!(f.dump("SELECT id, seq, v FROM t").await, vec!["1|42|two"]);
}

/// The standard merge compares numbers by value, as PostgreSQL does: a
/// stored numeric 1.0 equals the 1 the source had, so a change elsewhere in
/// the row merges.
#[tokio::test]
async fn merges_compare_numerics_by_value() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("m", { cas: ["ts"], merge: api.standardMerge() });"#,
    );
    let setup = format!(
        "{KV_SCHEMA} CREATE TABLE m (id INT8 PRIMARY KEY, n NUMERIC, b TEXT, ts INT8);
         INSERT INTO m VALUES (1, 1.0, 'b0', 20);"
    );
    let f = fixture("num_merge", &setup, &["--userscript", &path]).await;
    let body = batch(&[r#"{"after":{"id":1,"n":1,"b":"b1","ts":10},"before":{"id":1,"n":1,"b":"b0","ts":5},"key":[1],"topic":"m","updated":"3.0"}"#.to_string()]);
    f.post_ok("/num_merge/public", body).await;
    assert_eq!(f.dump("SELECT n, b, ts FROM m").await, vec!["1.0|b1|20"]);
}

/// A userscript whose `dispatch` for `source` sends each row, unchanged, to
/// its topic's table: what a plain receiver does, through the script.
fn topic_dispatch_script(source: &str) -> (tempfile::TempDir, String) {
    script(&format!(
        r#"import * as api from "replicator@v1";
        api.configureSource("{source}", {{
          dispatch: (doc: any, meta: any) => ({{ [meta.table]: [doc] }}),
        }});"#
    ))
}

/// Rows of one batch need not share their properties: reordered, missing
/// (the column's default on insert) and repeated properties (the last value
/// counts, as in a JSON object) all land as sent, with and without a
/// dispatch function in between.
#[tokio::test]
async fn rows_of_one_batch_may_differ_in_properties() {
    let (_dir, path) = topic_dispatch_script("shapes_script.public");
    let setup = "CREATE TABLE t (id INT8 PRIMARY KEY, a TEXT, b TEXT DEFAULT 'dflt')";
    let body = batch(&[
        r#"{"after":{"id":1,"a":"x","b":"y"},"key":[1],"topic":"t","updated":"1.0"}"#.to_string(),
        r#"{"after":{"b":"q","id":2,"a":"p"},"key":[2],"topic":"t","updated":"1.0"}"#.to_string(),
        r#"{"after":{"id":3,"a":"only"},"key":[3],"topic":"t","updated":"1.0"}"#.to_string(),
        r#"{"after":{"id":4,"a":"first","b":"z","a":"last"},"key":[4],"topic":"t","updated":"1.0"}"#
            .to_string(),
        r#"{"after":{"id":5,"a":"m","b":"n"},"key":[5],"topic":"t","updated":"1.0"}"#.to_string(),
    ]);
    let expected = vec!["1|x|y", "2|p|q", "3|only|dflt", "4|last|z", "5|m|n"];
    for (db, extra) in [
        ("shapes_plain", vec![]),
        ("shapes_script", vec!["--userscript", &path]),
    ] {
        let f = fixture(db, setup, &extra).await;
        f.post_ok(&format!("/{db}/public"), body.clone()).await;
        assert_eq!(
            f.dump("SELECT id, a, b FROM t ORDER BY id").await,
            expected,
            "{db}"
        );
    }
}

/// A row that names no value for a primary-key column is refused with that
/// column's name, whichever column of a composite key it is, and nothing of
/// its batch is applied.
#[tokio::test]
async fn row_without_a_primary_key_value_names_the_column() {
    let f = fixture(
        "missing_key",
        "CREATE TABLE t (a INT8, b TEXT, v TEXT, PRIMARY KEY (a, b))",
        &[],
    )
    .await;
    let good = r#"{"after":{"a":1,"b":"x","v":"v1"},"key":[1,"x"],"topic":"t","updated":"1.0"}"#;
    let cases = [
        // No b in `after`, and no key to take it from.
        r#"{"after":{"a":2,"v":"v2"},"topic":"t","updated":"1.0"}"#,
        // b is null.
        r#"{"after":{"a":2,"b":null,"v":"v2"},"topic":"t","updated":"1.0"}"#,
        // A key too short to name both columns.
        r#"{"after":{"a":2,"v":"v2"},"key":[2],"topic":"t","updated":"1.0"}"#,
        // A delete whose key is too short and whose before lacks b.
        r#"{"after":null,"before":{"a":2,"v":"v2"},"key":[2],"topic":"t","updated":"1.0"}"#,
        // `after` is the row written: a full key does not fill in its columns.
        r#"{"after":{"a":3,"v":"v3"},"key":[3,"z"],"topic":"t","updated":"1.0"}"#,
    ];
    for bad in cases {
        let text = f
            .post_refused(
                "/missing_key/public",
                batch(&[good.to_string(), bad.to_string()]),
            )
            .await;
        assert!(
            text.contains("primary-key column \"b\""),
            "{bad}: expected the missing column b in {text:?}"
        );
        assert_eq!(
            f.dump("SELECT * FROM t").await,
            Vec::<String>::new(),
            "{bad}"
        );
    }
    // The good row alone applies.
    let (status, text) = f
        .post("/missing_key/public", batch(&[good.to_string()]))
        .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(f.dump("SELECT a, b, v FROM t").await, vec!["1|x|v1"]);
}

/// A value meridian passes on as text and PostgreSQL's input function then
/// refuses is reported like meridian's own conversion errors: table, column,
/// type and value, with 400 and nothing applied. The same holds for a
/// conflicting row's `before`, which is read through the column types too.
#[tokio::test]
async fn values_the_target_refuses_name_their_column() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
api.configureTable("t", { cas: ["ts"], merge: api.standardMerge(() => ({ dlq: "t" })) });"#,
    );
    let f = fixture(
        "target_refuses",
        "CREATE TABLE t (id INT8 PRIMARY KEY, i INT4, d DATE, n NUMERIC(5,2), ts TIMESTAMPTZ, s TEXT);
         CREATE TABLE cdc_sink_dlq (event UUID DEFAULT gen_random_uuid() PRIMARY KEY,
           dlq_name TEXT NOT NULL, source_nanos INT8 NOT NULL, source_logical INT8 NOT NULL,
           data_after JSONB NOT NULL, data_before JSONB NOT NULL);
         INSERT INTO t VALUES (1, 1, '2026-01-01', 1.5, '2026-01-01T00:00:09Z', 's');",
        &["--userscript", &path],
    )
    .await;
    let row = |id: i64, props: &str, before: &str| {
        format!(
            r#"{{"after":{{"id":{id},"ts":"{T2}",{props}}},"before":{before},"key":[{id}],"topic":"t","updated":"1.0"}}"#
        )
    };
    let good = row(2, r#""i":2"#, "null");
    let cases = [
        (
            row(3, r#""i":3000000000"#, "null"),
            r#"column "i" (integer): cannot convert "3000000000": value "3000000000" is out of range"#,
        ),
        (
            row(3, r#""d":"2026-02-30""#, "null"),
            r#"column "d" (date): cannot convert "2026-02-30": date/time field value out of range"#,
        ),
        (
            row(3, r#""n":"abc""#, "null"),
            r#"column "n" (numeric(5,2)): cannot convert "abc": invalid input syntax for type numeric"#,
        ),
        // JSON can carry NUL; PostgreSQL text cannot.
        (
            row(3, r#""s":"a\u0000b""#, "null"),
            r#"column "s" (text): cannot convert "a\u0000b": text cannot contain the NUL character (\u0000)"#,
        ),
        // Row 1 is stored newer, so this loses and its before is read.
        (
            row(1, r#""i":5"#, r#"{"id":1,"i":4000000000}"#),
            r#"column "i" (integer): cannot convert "4000000000""#,
        ),
    ];
    let snapshot = || async {
        (
            f.dump("SELECT * FROM t ORDER BY id").await,
            f.dump("SELECT * FROM cdc_sink_dlq").await,
        )
    };
    let before = snapshot().await;
    for (bad, needle) in cases {
        let text = f
            .post_refused(
                "/target_refuses/public",
                batch(&[good.clone(), bad.clone()]),
            )
            .await;
        assert!(
            text.contains(&format!("table target_refuses.public.t: {needle}")),
            "expected {needle:?} in {text:?}"
        );
        assert_eq!(snapshot().await, before, "{bad} changed the database");
    }
}

/// A row whose table cannot be told (no topic on a schema URL, or a topic
/// that is no table name) is refused with 400 and a message that says what
/// is wrong with the row, with or without a dispatch function, and nothing
/// of its batch is applied. Without a topic the script is never called;
/// a dispatch function that routes to a bad topic is the script's result.
#[tokio::test]
async fn rows_without_a_usable_topic_are_refused() {
    let (_dir, path) = topic_dispatch_script("topic_script.public");
    let good = r#"{"after":{"id":1},"key":[1],"topic":"t","updated":"1.0"}"#.to_string();
    let no_topic = r#"{"after":{"id":2},"key":[2],"updated":"1.0"}"#;
    let bad_topic = r#"{"after":{"id":2},"key":[2],"topic":"a.b.c.d","updated":"1.0"}"#;
    let no_topic_says =
        "payload has no topic and the URL names no table; POST to /{database}/{schema}/{table}";
    let bad_name = r#"table name "a.b.c.d" must be table, schema.table or db.schema.table"#;
    let cases = [
        ("topic_plain", no_topic, no_topic_says.to_string()),
        (
            "topic_plain",
            bad_topic,
            format!("topic \"a.b.c.d\": {bad_name}"),
        ),
        ("topic_script", no_topic, no_topic_says.to_string()),
        (
            "topic_script",
            bad_topic,
            format!("userscript returned an invalid result: {bad_name}"),
        ),
    ];
    for db in ["topic_plain", "topic_script"] {
        let extra = if db == "topic_script" {
            vec!["--userscript", &path]
        } else {
            vec![]
        };
        let f = fixture(db, "CREATE TABLE t (id INT8 PRIMARY KEY)", &extra).await;
        for (_, bad, says) in cases.iter().filter(|c| c.0 == db) {
            let body = batch(&[good.clone(), bad.to_string()]);
            let text = f.post_refused(&format!("/{db}/public"), body).await;
            assert_eq!(text.trim_end(), says, "{db}: {bad}");
            assert_eq!(
                f.dump("SELECT id FROM t").await,
                Vec::<String>::new(),
                "{db}"
            );
        }
    }
}

/// A request meridian has no endpoint for says what it serves: 404 for an
/// unknown path, 405 for a known path with the wrong method.
#[tokio::test]
async fn unknown_endpoints_say_what_is_served() {
    let f = fixture("endpoints", KV_SCHEMA, &[]).await;
    let serves = "changefeeds POST to /{database}/{schema} or /{database}/{schema}/{table}; \
                  GET /_/healthz and /_/varz";
    let (status, text) = f.post("/endpoints/public/kv/extra", batch(&[])).await;
    assert_eq!(status, 404);
    assert_eq!(
        text.trim_end(),
        format!("no endpoint for POST /endpoints/public/kv/extra; {serves}")
    );
    let r = f
        .http
        .get(format!("{}/endpoints/public", f.server.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(
        r.text().await.unwrap().trim_end(),
        format!("no endpoint for GET /endpoints/public; {serves}")
    );
}

//! Engine tests without a database: loading, dispatch, map, merge, apply
//! against an in-memory transaction, limits, and error positions.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;
use crate::changefeed::{Before, Hlc, Mutation};

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in files {
        let p = dir.path().join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    dir
}

fn limits() -> Limits {
    Limits {
        call_timeout: Duration::from_millis(500),
        memory_bytes: 32 << 20,
        // Two on any machine, so that large batches are split.
        runtimes: 2,
    }
}

fn load(dir: &tempfile::TempDir, entry: &str) -> Result<Userscript, ScriptError> {
    Userscript::load(&dir.path().join(entry), limits())
}

fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("userscripts")
        .join(name)
}

fn upsert(doc: Value, n: i64) -> Mutation {
    Mutation {
        topic: Some("kv".into()),
        key: Some(vec![doc["k"].clone()]),
        after: Some(doc.try_into().unwrap()),
        before: Before::Null,
        updated: Hlc::new(n, 0),
    }
}

fn delete(k: i64, n: i64) -> Mutation {
    Mutation {
        topic: Some("kv".into()),
        key: Some(vec![json!(k)]),
        after: None,
        before: Before::Row(
            json!({"k": k, "v": "old", "_source": "east"})
                .try_into()
                .unwrap(),
        ),
        updated: Hlc::new(n, 0),
    }
}

/// `m` reads `file:line:col: text`, with `col` inside the throwing statement
/// (QuickJS places a `new Error(...)` at its last argument).
fn assert_at(m: &str, file: &str, line: u32, text: &str) {
    let prefix = format!("{file}:{line}:");
    let rest = m
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{m:?} does not start with {prefix}"));
    let (col, msg) = rest.split_once(": ").unwrap();
    let col: u32 = col.parse().unwrap_or_else(|_| panic!("{m:?}"));
    assert!((3..=45).contains(&col), "{m:?}");
    assert_eq!(msg, text, "{m:?}");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `batch` through the `dispatch` of a script whose only file is `script`
/// (configuring source `db.s`).
fn dispatch_with(script: &str, batch: Vec<Mutation>) -> Vec<Routed> {
    let dir = dir_with(&[("main.ts", script)]);
    let s = load(&dir, "main.ts").unwrap();
    rt().block_on(s.dispatch("db", "s", None, batch)).unwrap()
}

#[test]
fn seed_scripts_drop_local_rows_and_route_the_rest() {
    let script = Userscript::load(&shipped("init.ts"), limits()).unwrap();
    let cfg = script.config();
    let src = cfg.source("kv", "public").expect("kv.public configured");
    assert!(src.has_dispatch);
    assert_eq!(src.deletes_to.as_deref(), Some(""));
    let kv = TableName::new("kv", "public", "kv");
    let t = cfg.table(&kv).expect("kv.public.kv configured");
    assert_eq!(t.cas, vec!["_timestamp".to_string()]);
    assert_eq!(t.merge, Some(MergeKind::Standard { has_fallback: true }));

    let batch = vec![
        upsert(json!({"k": 1, "v": "a", "_source": "east"}), 10),
        upsert(json!({"k": 2, "v": "b", "_source": "west"}), 11),
        delete(3, 12),
        upsert(json!({"k": 4, "v": "d", "_source": "east"}), 13),
    ];
    let routed = rt()
        .block_on(script.dispatch("kv", "public", None, batch))
        .unwrap();
    let keys: Vec<_> = routed
        .iter()
        .map(|r| r.mutation.key.clone().unwrap()[0].clone())
        .collect();
    assert_eq!(keys, vec![json!(1), json!(3), json!(4)]);
    assert!(routed.iter().all(|r| *r.table == kv));
    assert!(routed[1].mutation.is_delete());
    assert_eq!(routed[2].mutation.updated, Hlc::new(13, 0));
    assert_eq!(routed[0].mutation.after.as_ref().unwrap()["v"], json!("a"));

    // The fallback sends losers to a DLQ named after the table.
    let conflict = Conflict {
        before: None,
        proposed: Some(json!({"k": 1, "v": "x"}).try_into().unwrap()),
        target: json!({"k": 1, "v": "y"}).try_into().unwrap(),
        unmerged: vec!["v".into()],
        nanos: 5,
        logical: 0,
    };
    let out = rt().block_on(script.merge(&kv, vec![conflict])).unwrap();
    assert_eq!(out, vec![MergeOutcome::Dlq("kv.public.kv".into())]);
}

/// A batch large enough to be split across the runtimes routes exactly as
/// one call would: every row in order, and an error names the row by its
/// place in the whole batch (past a delete the script does not see).
#[test]
fn a_split_batch_routes_in_order_and_names_rows_by_batch_index() {
    let dir = dir_with(&[(
        "main.ts",
        r#"
import * as api from "replicator@v1";
api.configureSource("db.s", {
  dispatch: (doc, meta) => {
    if (doc.v === "map") return new Map();
    if (doc.v === "number") return { a: 5 };
    if (doc.k % 3 === 0) return null;
    if (doc.k % 3 === 1) return { a: [doc] };
    return { b: [{ k: doc.k, twice: doc.k * 2 }] };
  },
  deletesTo: "gone",
});
"#,
    )]);
    // Four runtimes: the batch goes in three parts (of at least 256 rows).
    let limits = Limits {
        runtimes: 4,
        ..limits()
    };
    let s = Userscript::load(&dir.path().join("main.ts"), limits).unwrap();
    let batch = |bad: Option<&str>| -> Vec<Mutation> {
        (0..1000)
            .map(|k| match k {
                700 => delete(k, k),
                900 if bad.is_some() => upsert(json!({"k": k, "v": bad.unwrap()}), k),
                _ => upsert(json!({"k": k, "v": "x"}), k),
            })
            .collect()
    };
    let routed = rt()
        .block_on(s.dispatch("db", "s", None, batch(None)))
        .unwrap();
    let mut expected = Vec::new();
    for k in 0..1000i64 {
        let (table, doc) = match (k, k % 3) {
            (700, _) => ("gone", None),
            (_, 0) => continue,
            (_, 1) => ("a", Some(json!({"k": k, "v": "x"}))),
            _ => ("b", Some(json!({"k": k, "twice": k * 2}))),
        };
        expected.push((table.to_string(), k, doc));
    }
    let got: Vec<_> = routed
        .iter()
        .map(|r| {
            let m = &r.mutation;
            let doc = m.after.as_ref().map(|d| d.to_value());
            (r.table.table.clone(), m.updated.nanos, doc)
        })
        .collect();
    assert_eq!(got.len(), expected.len());
    assert_eq!(got, expected);

    for (bad, needle) in [
        ("map", "returned a Map for row 900"),
        ("number", "returned {\"a\": 5} for row 900"),
    ] {
        let err = rt()
            .block_on(s.dispatch("db", "s", None, batch(Some(bad))))
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{bad}: {err}");
    }
}

#[test]
fn dispatch_can_fan_out_rename_and_target() {
    let dir = dir_with(&[(
        "main.ts",
        r#"
import * as api from "replicator@v1";
api.configureSource("db.s", {
  dispatch: (doc, meta) => {
    if (doc.k === 0) return null;
    return { [meta.table as string]: [doc], "other.audit": [{ k: doc.k, at: meta.nanos, t: meta.table }] };
  },
  deletesTo: "gone",
});
api.configureSource("db.t", { target: "fixed" });
"#,
    )]);
    let s = load(&dir, "main.ts").unwrap();
    let batch = vec![
        upsert(json!({"k": 0}), 1),
        upsert(json!({"k": 7}), 2),
        delete(8, 3),
    ];
    let routed = rt()
        .block_on(s.dispatch("db", "s", Some("tbl"), batch))
        .unwrap();
    let tables: Vec<String> = routed.iter().map(|r| r.table.to_string()).collect();
    // A result's destinations come in name order (documents are sorted maps).
    assert_eq!(tables, vec!["db.other.audit", "db.s.tbl", "db.s.gone"]);
    assert_eq!(routed[0].mutation.after.as_ref().unwrap()["at"], json!(2));
    assert_eq!(
        routed[0].mutation.after.as_ref().unwrap()["t"],
        json!("tbl")
    );

    let routed = rt()
        .block_on(s.dispatch(
            "db",
            "t",
            None,
            vec![upsert(json!({"k": 1}), 1), delete(2, 2)],
        ))
        .unwrap();
    assert!(routed
        .iter()
        .all(|r| *r.table == TableName::new("db", "t", "fixed")));
    assert_eq!(routed.len(), 2);
}

#[test]
fn configuration_is_read_into_script_config() {
    let dir = dir_with(&[(
        "cfg.ts",
        r#"
import { configureTable, standardMerge, setOptions, randomUUID } from "cdc-sink@v1";
configureTable("db.public.\"My.Table\"", {
  cas: ["_timestamp", "_source"],
  deadlines: { _timestamp: "1h30m" },
  deleteKey: ["id"],
  exprs: { v: "lower($0)" },
  extras: "more",
  ignore: { junk: true, kept: false },
  map: (d) => d,
  rowLimit: 100,
  merge: (op) => ({ drop: true }),
});
configureTable("t2", { merge: standardMerge() });
setOptions({ bestEffortOnly: "true", flushSize: 1000 });
if (randomUUID().length !== 36) throw new Error("bad uuid");
"#,
    )]);
    let s = load(&dir, "cfg.ts").unwrap();
    let c = s.config();
    let t = c
        .table(&TableName::new("db", "public", "My.Table"))
        .unwrap();
    assert_eq!(t.cas, vec!["_timestamp", "_source"]);
    assert_eq!(
        t.deadlines,
        vec![("_timestamp".to_string(), Duration::from_secs(5400))]
    );
    assert_eq!(t.delete_key, vec!["id"]);
    assert_eq!(t.exprs.get("v").map(String::as_str), Some("lower($0)"));
    assert_eq!(t.extras.as_deref(), Some("more"));
    assert_eq!(t.ignore, vec!["junk"]);
    assert!(t.has_map && !t.has_apply);
    assert_eq!(t.row_limit, Some(100));
    assert_eq!(t.merge, Some(MergeKind::Custom));
    let t2 = c.table(&TableName::new("x", "y", "t2")).unwrap();
    assert_eq!(
        t2.merge,
        Some(MergeKind::Standard {
            has_fallback: false
        })
    );
    assert_eq!(
        c.options.get("bestEffortOnly").map(String::as_str),
        Some("true")
    );
    assert_eq!(c.options.get("flushSize").map(String::as_str), Some("1000"));
}

#[test]
fn bad_configuration_fails_to_load_with_position() {
    let dir = dir_with(&[(
        "bad.ts",
        "import * as api from \"replicator@v1\";\n\napi.configureTable(\"t\", { cas: \"_timestamp\" });\n",
    )]);
    match load(&dir, "bad.ts") {
        Err(ScriptError::Load(m)) => {
            assert!(m.starts_with("bad.ts:3:"), "{m}");
            assert!(m.contains("cas must be an array"), "{m}");
        }
        Err(e) => panic!("unexpected {e}"),
        Ok(_) => panic!("loaded"),
    }
    let dir = dir_with(&[("d.ts", "import * as api from \"replicator@v1\";\napi.configureTable(\"t\", { deadlines: { ts: \"soon\" } });\n")]);
    let Err(ScriptError::Load(m)) = load(&dir, "d.ts") else {
        panic!("loaded")
    };
    assert!(m.contains("deadlines.ts") && m.contains("soon"), "{m}");
}

#[test]
fn load_errors_carry_file_line_col() {
    let dir = dir_with(&[
        ("syntax.ts", "let a: number = 1;\nlet b = ;\n"),
        ("missing.ts", "// hi\nimport { x } from \"nope\";\nconsole.log(x);\n"),
        ("escape.ts", "import { x } from \"../outside\";\nconsole.log(x);\n"),
        ("url.ts", "import { x } from \"https://example.com/x.js\";\nconsole.log(x);\n"),
        ("deep.ts", "import { f } from \"./lib/helper\";\nf();\n"),
        ("lib/helper.ts", "export function f(): void {\n  const x: number = 1;\n  throw new Error(\"from helper \" + x);\n}\n"),
        ("top.ts", "const n: number = 2;\nthrow new Error(\"top level \" + n);\n"),
    ]);
    let err = |f: &str| match load(&dir, f) {
        Err(ScriptError::Load(m)) => m,
        Err(e) => panic!("{f}: unexpected {e}"),
        Ok(_) => panic!("{f}: loaded"),
    };
    assert!(
        err("syntax.ts").starts_with("syntax.ts:2:9: "),
        "{}",
        err("syntax.ts")
    );
    let m = err("missing.ts");
    assert!(
        m.starts_with("missing.ts:2:19: cannot find module \"nope\""),
        "{m}"
    );
    assert!(err("escape.ts").contains("outside the script's folder"));
    assert!(err("url.ts").starts_with("url.ts:1:19: cannot import"));
    assert_at(&err("deep.ts"), "lib/helper.ts", 3, "Error: from helper 1");
    assert_at(&err("top.ts"), "top.ts", 2, "Error: top level 2");
    let m = match Userscript::load(&dir.path().join("absent.ts"), limits()) {
        Err(ScriptError::Load(m)) => m,
        _ => panic!("loaded"),
    };
    assert!(m.contains("absent.ts"), "{m}");
}

const FAILING: &str = r#"
import * as api from "replicator@v1";

type Row = { k: number; mode?: string };

api.configureSource("db.s", {
  dispatch: (doc: Row, meta) => {
    if (doc.mode === "throw") {
      throw new Error("bad row " + doc.k);
    }
    if (doc.mode === "loop") {
      while (true) {}
    }
    if (doc.mode === "oom") {
      const hog: string[] = [];
      for (;;) hog.push("x".repeat(1 << 16) + hog.length);
    }
    if (doc.mode === "bad") return 42 as any;
    return { t: [doc] };
  },
});
"#;

#[test]
fn exceptions_timeouts_and_oom_fail_one_call_only() {
    let dir = dir_with(&[("fail.ts", FAILING)]);
    let s = load(&dir, "fail.ts").unwrap();
    let rt = rt();
    let call = |mode: &str| {
        rt.block_on(s.dispatch(
            "db",
            "s",
            None,
            vec![upsert(json!({"k": 1, "mode": mode}), 1)],
        ))
    };

    match call("throw") {
        Err(ScriptError::Exception(m)) => assert_at(&m, "fail.ts", 9, "Error: bad row 1"),
        other => panic!("{other:?}"),
    }
    assert_eq!(call("ok").unwrap().len(), 1);

    let started = Instant::now();
    match call("loop") {
        Err(ScriptError::Timeout(d)) => assert_eq!(d, Duration::from_millis(500)),
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(call("ok").unwrap().len(), 1);

    match call("oom") {
        Err(ScriptError::OutOfMemory(_)) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(call("ok").unwrap().len(), 1);

    match call("bad") {
        Err(ScriptError::Invalid(m)) => assert!(m.contains("db.s") && m.contains("42"), "{m}"),
        other => panic!("{other:?}"),
    }
    // Every worker in the pool still serves.
    for _ in 0..8 {
        assert_eq!(call("ok").unwrap().len(), 1);
    }
}

#[test]
fn map_rewrites_and_drops_rows() {
    let dir = dir_with(&[(
        "map.ts",
        r#"
import * as api from "replicator@v1";
api.configureTable("kv", {
  map: (d, meta) => (d.skip ? null : { ...d, v: String(d.v).toUpperCase(), tbl: meta.table }),
});
"#,
    )]);
    let s = load(&dir, "map.ts").unwrap();
    let t = TableName::new("db", "public", "kv");
    let out = rt()
        .block_on(s.map(
            &t,
            vec![
                upsert(json!({"k": 1, "v": "a"}), 1),
                upsert(json!({"k": 2, "skip": true}), 2),
                delete(3, 3),
            ],
        ))
        .unwrap();
    assert_eq!(out.len(), 2);
    assert_eq!(out[0].after.as_ref().unwrap()["v"], json!("A"));
    assert_eq!(out[0].after.as_ref().unwrap()["tbl"], json!("kv"));
    assert!(out[1].is_delete());
}

#[test]
fn custom_merge_outcomes_and_invalid_results() {
    let dir = dir_with(&[(
        "merge.ts",
        r#"
import * as api from "replicator@v1";
api.configureTable("kv", {
  cas: ["ts"],
  merge: (op) => {
    if (op.proposed.k === 1) return { apply: { ...op.target, v: op.proposed.v + op.target.v } };
    if (op.proposed.k === 2) return { dlq: "conflicts" };
    if (op.proposed.k === 3) return { drop: true };
    return { nope: 1 };
  },
});
"#,
    )]);
    let s = load(&dir, "merge.ts").unwrap();
    let t = TableName::new("db", "public", "kv");
    let c = |k: i64| Conflict {
        before: None,
        proposed: Some(json!({"k": k, "v": "p"}).try_into().unwrap()),
        target: json!({"k": k, "v": "t"}).try_into().unwrap(),
        unmerged: vec![],
        nanos: 1,
        logical: 0,
    };
    let out = rt().block_on(s.merge(&t, vec![c(1), c(2), c(3)])).unwrap();
    assert_eq!(
        out,
        vec![
            MergeOutcome::Apply(json!({"k": 1, "v": "pt"}).try_into().unwrap()),
            MergeOutcome::Dlq("conflicts".into()),
            MergeOutcome::Drop
        ]
    );
    match rt().block_on(s.merge(&t, vec![c(4)])) {
        Err(ScriptError::Invalid(m)) => {
            assert!(m.contains("db.public.kv") && m.contains("nope"), "{m}")
        }
        other => panic!("{other:?}"),
    }
}

/// A transaction that records what the script asked for.
#[derive(Default)]
struct FakeTx {
    log: Vec<String>,
    fail_exec: bool,
}

#[async_trait::async_trait]
impl ScriptTx for FakeTx {
    async fn exec(&mut self, sql: &str, args: Vec<Value>) -> Result<u64, String> {
        self.log.push(format!("exec {sql} {}", Value::Array(args)));
        if self.fail_exec {
            return Err("relation \"nope\" does not exist".into());
        }
        Ok(1)
    }
    async fn query(&mut self, sql: &str, args: Vec<Value>) -> Result<Vec<Vec<Value>>, String> {
        self.log.push(format!("query {sql} {}", Value::Array(args)));
        Ok(vec![
            vec![json!(1), json!("one")],
            vec![json!(2), json!("two")],
        ])
    }
    async fn apply(&mut self, ops: Vec<ApplyOp>) -> Result<(), String> {
        for op in ops {
            self.log.push(match op {
                ApplyOp::Upsert { data, .. } => format!("upsert {}", Value::from(data)),
                ApplyOp::Delete { pk, .. } => format!("delete {}", Value::Array(pk)),
            });
        }
        Ok(())
    }
    fn columns(&self) -> Vec<ColumnInfo> {
        vec![
            ColumnInfo {
                name: "k".into(),
                sql_type: "INT8".into(),
                primary: true,
                ignored: false,
            },
            ColumnInfo {
                name: "v".into(),
                sql_type: "TEXT".into(),
                primary: false,
                ignored: false,
            },
        ]
    }
    fn schema(&self) -> String {
        "\"public\"".into()
    }
    fn table(&self) -> String {
        "\"public\".\"kv\"".into()
    }
}

const APPLY: &str = r#"
import * as api from "replicator@v1";
api.configureTable("kv", {
  apply: async (ops: api.ApplyOp[]) => {
    const tx = api.getTX();
    const rows = [...(await tx.query("SELECT k, v FROM " + tx.table() + " WHERE k > $1", 0))];
    await tx.exec("INSERT INTO audit VALUES ($1, $2)", rows.length, tx.columns().map((c) => c.name).join(","));
    const keep = ops.filter((o) => o.action === "delete" || o.data.v !== "skip");
    await tx.apply(keep);
    if (ops.some((o) => o.action === "upsert" && o.data.v === "reject")) {
      await tx.exec("SELECT 1");
      throw new Error("rejected " + ops.length);
    }
  },
});
"#;

#[test]
fn apply_services_get_tx_through_the_caller() {
    let dir = dir_with(&[("apply.ts", APPLY.replace("api.ApplyOp[]", "any[]").as_str())]);
    let s = load(&dir, "apply.ts").unwrap();
    assert!(
        s.config()
            .table(&TableName::new("db", "public", "kv"))
            .unwrap()
            .has_apply
    );
    let t = TableName::new("db", "public", "kv");
    let ops = vec![
        ApplyOp::Upsert {
            data: json!({"k": 1, "v": "a"}).try_into().unwrap(),
            before: None,
            updated: None,
        },
        ApplyOp::Upsert {
            data: json!({"k": 2, "v": "skip"}).try_into().unwrap(),
            before: None,
            updated: None,
        },
        ApplyOp::Delete {
            pk: vec![json!(3)],
            before: None,
            updated: None,
        },
    ];
    let mut tx = FakeTx::default();
    rt().block_on(s.apply(&t, ops, &mut tx)).unwrap();
    assert_eq!(
        tx.log,
        vec![
            "query SELECT k, v FROM \"public\".\"kv\" WHERE k > $1 [0]".to_string(),
            "exec INSERT INTO audit VALUES ($1, $2) [2,\"k,v\"]".to_string(),
            "upsert {\"k\":1,\"v\":\"a\"}".to_string(),
            "delete [3]".to_string(),
        ]
    );

    // A rejected promise fails the call, with the position in the .ts.
    let ops = vec![ApplyOp::Upsert {
        data: json!({"k": 1, "v": "reject"}).try_into().unwrap(),
        before: None,
        updated: None,
    }];
    let mut tx = FakeTx::default();
    match rt().block_on(s.apply(&t, ops.clone(), &mut tx)) {
        Err(ScriptError::Exception(m)) => assert_at(&m, "apply.ts", 12, "Error: rejected 1"),
        other => panic!("{other:?}"),
    }
    // A failing statement rejects exec's promise; unhandled, it fails the call.
    let mut tx = FakeTx {
        fail_exec: true,
        ..FakeTx::default()
    };
    match rt().block_on(s.apply(&t, ops, &mut tx)) {
        Err(ScriptError::Exception(m)) => {
            assert!(m.contains("relation \"nope\" does not exist"), "{m}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn get_tx_outside_apply_throws() {
    let dir = dir_with(&[(
        "gt.ts",
        "import * as api from \"replicator@v1\";\napi.configureSource(\"db.s\", { dispatch: (d) => { api.getTX(); return null; } });\n",
    )]);
    let s = load(&dir, "gt.ts").unwrap();
    match rt().block_on(s.dispatch("db", "s", None, vec![upsert(json!({"k": 1}), 1)])) {
        Err(ScriptError::Exception(m)) => assert!(m.contains("getTX() may only be called"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn parses_go_durations() {
    use super::engine::parse_duration;
    assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
    assert_eq!(parse_duration("2.5s").unwrap(), Duration::from_millis(2500));
    assert!(parse_duration("soon").is_err());
    assert!(parse_duration("10").is_err());
    // Past what a Duration holds: an error, not a panic.
    assert!(parse_duration("99999999999999999999h")
        .unwrap_err()
        .contains("too long"));
}

/// Rows cross into `dispatch` by property list and come back as "unchanged"
/// markers when the script returns its own document untouched: a document
/// changed in place, copied, sent to two tables, or holding nested values
/// must still come back as the script left it.
#[test]
fn dispatch_returns_documents_as_the_script_left_them() {
    let script = r#"import * as api from "replicator@v1";
api.configureSource("db.s", {
  dispatch: (doc: any, meta: any) => {
    switch (doc.k) {
      case 1: return { t: [doc] };
      case 2: doc.v = "changed"; return { t: [doc] };
      case 3: delete doc.v; doc.w = "new"; return { t: [doc] };
      case 4: return { t: [doc], u: [doc] };
      case 5: return { t: [Object.assign({}, doc, { v: "copy" })] };
      case 6: doc.n.x = 2; return { t: [doc] };
      case 7: return { t: [doc, { k: 70 }], u: null };
      case 8: return null;
      case 12: return { t: [{ k: 12, meta: JSON.stringify(meta) }] };
      default: return undefined;
    }
  },
  deletesTo: (doc: any, meta: any) => ({ d: [doc] }),
});
"#;
    let big: Value = serde_json::from_str("12345678901234567890.50").unwrap();
    let row = |doc: Value| upsert(doc, 1);
    let batch = vec![
        row(json!({"k": 1, "v": "a", "big": big})),
        row(json!({"k": 2, "v": "a"})),
        row(json!({"k": 3, "v": "a"})),
        row(json!({"k": 4, "v": "a"})),
        row(json!({"k": 5, "v": "a"})),
        row(json!({"k": 6, "n": {"x": 1}})),
        row(json!({"k": 7, "v": "a"})),
        row(json!({"k": 8})),
        row(json!({"k": 9})),
        delete(10, 1),
        Mutation {
            before: Before::Null,
            ..delete(11, 1)
        },
        Mutation {
            key: None,
            ..row(json!({"k": 12}))
        },
        Mutation {
            updated: Hlc::new(1_700_000_000_123_456_789, 7),
            ..row(json!({"k": 12}))
        },
    ];
    let routed = dispatch_with(script, batch);
    let got: Vec<(String, Value, Value)> = routed
        .iter()
        .map(|r| {
            (
                r.table.table.clone(),
                r.mutation
                    .after
                    .clone()
                    .map(Value::from)
                    .unwrap_or(Value::Null),
                r.mutation.before.to_json(),
            )
        })
        .collect();
    let big: Value = serde_json::from_str("12345678901234567890.50").unwrap();
    let up = |t: &str, doc: Value| (t.to_string(), doc, Value::Null);
    assert_eq!(
        got,
        vec![
            // Unchanged: the row's own document, numbers exactly as sent.
            up("t", json!({"k": 1, "v": "a", "big": big})),
            up("t", json!({"k": 2, "v": "changed"})),
            up("t", json!({"k": 3, "w": "new"})),
            up("t", json!({"k": 4, "v": "a"})),
            up("u", json!({"k": 4, "v": "a"})),
            up("t", json!({"k": 5, "v": "copy"})),
            up("t", json!({"k": 6, "n": {"x": 2}})),
            up("t", json!({"k": 7, "v": "a"})),
            up("t", json!({"k": 70})),
            (
                "d".into(),
                Value::Null,
                json!({"k": 10, "v": "old", "_source": "east"})
            ),
            // A delete of a row the source never had stays `before: null`
            // (the receiver drops it).
            ("d".into(), Value::Null, Value::Null),
            up(
                "t",
                json!({"k": 12, "meta": r#"{"schema":"s","table":"kv","nanos":1,"logical":0}"#})
            ),
            up(
                "t",
                json!({"k": 12, "meta": r#"{"schema":"s","table":"kv","nanos":1700000000123456800,"logical":7,"key":[12]}"#})
            ),
        ]
    );
}

/// The per-property-list "unchanged" check reads properties whose names are
/// not identifiers too, and notices an added property; `meta.key` holds every
/// key value.
#[test]
fn dispatch_notices_changes_under_any_property_name() {
    let script = r#"import * as api from "replicator@v1";
api.configureSource("db.s", {
  dispatch: (doc: any, meta: any) => {
    switch (doc.k) {
      case 1: return { t: [doc] };
      case 2: doc["a-b"] = "z"; return { t: [doc] };
      case 3: doc["0"] = "z"; return { t: [doc] };
      case 4: doc.extra = 1; return { t: [doc] };
      default: return { t: [{ k: doc.k, key: JSON.stringify(meta.key) }] };
    }
  },
});
"#;
    let doc = |k: i64| json!({"k": k, "a-b": "x", "class": true, "0": null, "x y": 1.5});
    let mut batch: Vec<Mutation> = (1..=4).map(|k| upsert(doc(k), 1)).collect();
    batch.push(Mutation {
        key: Some(vec![json!(5), json!("b")]),
        ..upsert(json!({"k": 5}), 1)
    });
    let routed = dispatch_with(script, batch);
    let got: Vec<Value> = routed
        .iter()
        .map(|r| Value::from(r.mutation.after.clone().unwrap()))
        .collect();
    let changed = |k: i64, f: &dyn Fn(&mut Value)| {
        let mut d = doc(k);
        f(&mut d);
        d
    };
    assert_eq!(
        got,
        vec![
            doc(1),
            changed(2, &|d| d["a-b"] = json!("z")),
            changed(3, &|d| d["0"] = json!("z")),
            changed(4, &|d| d["extra"] = json!(1)),
            json!({"k": 5, "key": "[5,\"b\"]"}),
        ]
    );
}

/// Rows of one transaction share their header and `updated` in what crosses
/// into the script; each row must still see its own `meta`, also where
/// tables, kinds and times change between rows.
#[test]
fn dispatch_meta_follows_each_row_of_a_transaction() {
    let script = r#"import * as api from "replicator@v1";
const show = (doc: any, meta: any) =>
  ({ out: [{ k: doc.k, m: [meta.table, meta.nanos, meta.logical, meta.key].join("|") }] });
api.configureSource("db.s", { dispatch: show, deletesTo: show });
"#;
    let at = |m: Mutation, nanos: i64, logical: i32, topic: &str| Mutation {
        updated: Hlc::new(nanos, logical),
        topic: Some(topic.into()),
        ..m
    };
    let batch = vec![
        at(upsert(json!({"k": 1, "v": "a"}), 0), 100, 0, "kv"),
        at(upsert(json!({"k": 2, "v": "b"}), 0), 100, 0, "kv"),
        at(upsert(json!({"k": 3, "v": "c"}), 0), 100, 0, "kv"),
        at(upsert(json!({"k": 4, "v": "d"}), 0), 100, 0, "other"),
        at(delete(5, 0), 100, 0, "other"),
        at(upsert(json!({"k": 6, "v": "f"}), 0), 100, 1, "other"),
        at(upsert(json!({"k": 7, "v": "g"}), 0), 200, 0, "other"),
        at(upsert(json!({"k": 8, "v": "h"}), 0), 200, 0, "other"),
        at(upsert(json!({"k": 9, "v": "i"}), 0), 100, 0, "kv"),
    ];
    let routed = dispatch_with(script, batch);
    let seen: Vec<String> = routed
        .iter()
        .map(|r| {
            // A delete's returned document names the row: it is in `before`.
            let d = r
                .mutation
                .after
                .as_ref()
                .or(r.mutation.before.row())
                .unwrap();
            format!("{}:{}", d["k"], d["m"].as_str().unwrap())
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            "1:kv|100|0|1",
            "2:kv|100|0|2",
            "3:kv|100|0|3",
            "4:other|100|0|4",
            "5:other|100|0|5",
            "6:other|100|1|6",
            "7:other|200|0|7",
            "8:other|200|0|8",
            "9:kv|100|0|9",
        ]
    );
}

/// Work an `apply` function starts without awaiting it (an async forEach)
/// runs within its own call, in its own transaction: none of it is left for
/// the next call's transaction.
#[test]
fn unawaited_async_work_in_apply_finishes_in_its_own_call() {
    let script = r#"import * as api from "replicator@v1";
api.configureTable("kv", {
  apply: async (ops: any[]) => {
    const tx = api.getTX();
    ops.forEach(async (op) => {
      const rows = await tx.query("SELECT v FROM kv WHERE k = $1", op.data.k);
      await tx.exec("UPDATE stats SET n = n + 1");
      await tx.exec("UPDATE stats SET m = m + 1");
      await tx.exec("UPDATE stats SET o = o + 1");
      if (rows.length) await tx.exec("INSERT INTO audit VALUES ($1)", op.data.v);
    });
    await tx.apply(ops);
  },
});
"#;
    let dir = dir_with(&[("main.ts", script)]);
    let s = Userscript::load(&dir.path().join("main.ts"), limits()).unwrap();
    let t = TableName::new("db", "public", "kv");
    let op = |v: &str| ApplyOp::Upsert {
        data: json!({"k": 1, "v": v}).try_into().unwrap(),
        before: None,
        updated: None,
    };
    let rt = rt();
    for i in 0..3 {
        let mut tx = FakeTx::default();
        let (a, b) = (format!("req{i}a"), format!("req{i}b"));
        rt.block_on(s.apply(&t, vec![op(&a), op(&b)], &mut tx))
            .unwrap();
        let audits: Vec<&String> = tx.log.iter().filter(|l| l.contains("audit")).collect();
        assert_eq!(audits.len(), 2, "call {i}: {:?}", tx.log);
        assert!(
            audits[0].contains(&a) && audits[1].contains(&b),
            "call {i}: {:?}",
            tx.log
        );
    }
}

/// A dispatch that provably only reads `doc` and `meta` gets one meta object
/// reused row after row (see readonly_params.rs): each row must still see its
/// own key, table and time, and its document must still arrive unchanged.
#[test]
fn read_only_dispatch_sees_each_rows_own_meta() {
    let script = r#"import * as api from "replicator@v1";
api.configureSource("db.s", {
  dispatch: (doc: any, meta: any) => ({
    t: [doc],
    m: [{ k: meta.key ? meta.key[0] : null, n: meta.key ? meta.key.length : -1, table: meta.table, at: meta.nanos, meta: JSON.stringify(meta) }],
  }),
});
"#;
    let batch = vec![
        upsert(json!({"k": 1, "v": "a"}), 5),
        upsert(json!({"k": 2, "v": "b"}), 5),
        Mutation {
            topic: Some("other".into()),
            ..upsert(json!({"k": 3, "v": "c"}), 5)
        },
        Mutation {
            key: Some(vec![json!(4), json!("x")]),
            ..upsert(json!({"k": 4, "v": "d"}), 6)
        },
        Mutation {
            key: None,
            ..upsert(json!({"k": 5, "v": "e"}), 6)
        },
        upsert(json!({"k": 6, "v": "f"}), 7),
    ];
    let routed = dispatch_with(script, batch);
    let got: Vec<(String, Value)> = routed
        .iter()
        .map(|r| {
            let doc = r.mutation.after.clone().map(Value::from);
            (r.table.table.clone(), doc.unwrap_or(Value::Null))
        })
        .collect();
    // What the script saw of `meta`, given the row's key (null: none).
    let meta = |key: Value, table: &str, at: i64| {
        let (k, n, key_json) = match key.as_array() {
            Some(a) => (a[0].clone(), a.len() as i64, format!(",\"key\":{key}")),
            None => (Value::Null, -1, String::new()),
        };
        let json =
            format!(r#"{{"schema":"s","table":"{table}","nanos":{at},"logical":0{key_json}}}"#);
        let seen = json!({"k": k, "n": n, "table": table, "at": at, "meta": json});
        ("m".to_string(), seen)
    };
    let t = |doc: Value| ("t".to_string(), doc);
    // Each row's tables come in name order.
    assert_eq!(
        got,
        vec![
            meta(json!([1]), "kv", 5),
            t(json!({"k": 1, "v": "a"})),
            meta(json!([2]), "kv", 5),
            t(json!({"k": 2, "v": "b"})),
            meta(json!([3]), "other", 5),
            t(json!({"k": 3, "v": "c"})),
            meta(json!([4, "x"]), "kv", 6),
            t(json!({"k": 4, "v": "d"})),
            meta(Value::Null, "kv", 6),
            t(json!({"k": 5, "v": "e"})),
            meta(json!([6]), "kv", 7),
            t(json!({"k": 6, "v": "f"})),
        ]
    );
}

/// A marked dispatch keeps its name in stack traces.
#[test]
fn read_only_dispatch_keeps_its_name_in_stack_traces() {
    let script = r#"import * as api from "replicator@v1";
api.configureSource("db.s", {
  dispatch: (doc: any, meta: any) => {
    if (doc.k === 1) throw new Error("bad " + meta.table + " " + new Error("x").stack.split("\n")[0].trim());
    return { t: [doc] };
  },
});
"#;
    let dir = dir_with(&[("main.ts", script)]);
    let s = load(&dir, "main.ts").unwrap();
    let got = rt().block_on(s.dispatch("db", "s", None, vec![upsert(json!({"k": 1}), 1)]));
    match got {
        Err(ScriptError::Exception(m)) => assert!(m.contains("bad kv at dispatch ("), "{m}"),
        other => panic!("{other:?}"),
    }
}

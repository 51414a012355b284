//! Userscripts against real PostgreSQL: the seed's scripts verbatim, the
//! paired east/west scripts, apply + getTX() inside the request's
//! transaction, merge functions reaching the DLQ, every failure mode failing
//! only its request, and `meridian userscript --check/--api`.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

fn shipped(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("userscripts")
        .join(name)
        .display()
        .to_string()
}

/// The seed's scripts address `kv.public`, so these run one after another on
/// a database named `kv`.
#[tokio::test]
async fn shipped_scripts_against_kv() {
    // init.ts + repl.ts, verbatim from the seed: west drops rows from west,
    // applies the rest with CAS on _timestamp, losers to the DLQ.
    let f = fixture("kv", KV_SCHEMA, &["--userscript", &shipped("init.ts")]).await;
    seed_row(&f, 3, "cc", "west", T2).await;
    let body = batch(&[
        kv_row(1, "\\\\x01", "east", T1, None, "10.0"),
        kv_row(2, "\\\\x02", "west", T1, None, "10.0"), // originated here: dropped
        kv_row(3, "\\\\x03", "east", T1, None, "11.0"), // older than the local row: DLQ
    ]);
    f.post_ok("/kv/public", body).await;
    assert_eq!(
        f.dump("SELECT k, v, _source FROM kv ORDER BY k").await,
        vec!["1|\\x01|east", "3|\\xcc|west"]
    );
    assert_eq!(
        f.dump("SELECT dlq_name, source_nanos, data_after->>'k' FROM cdc_sink_dlq")
            .await,
        vec!["kv.public.kv|11|3"]
    );
    drop(f);

    // east_west.ts (applies to west): equal timestamps tie-break on _source,
    // so east's version loses to the local west row; west's own rows drop.
    let f = fixture("kv", KV_SCHEMA, &["--userscript", &shipped("east_west.ts")]).await;
    seed_row(&f, 1, "aa", "west", T2).await;
    let body = batch(&[
        kv_row(1, "\\\\x01", "east", T2, None, "20.0"),
        kv_row(2, "\\\\x02", "west", T3, None, "20.0"),
        kv_row(4, "\\\\x04", "east", T1, None, "20.0"),
    ]);
    f.post_ok("/kv/public", body).await;
    assert_eq!(
        f.dump("SELECT k, v, _source FROM kv ORDER BY k").await,
        vec!["1|\\xaa|west", "4|\\x04|east"]
    );
    assert_eq!(
        f.dump("SELECT dlq_name, data_after->>'_source' FROM cdc_sink_dlq")
            .await,
        vec!["kv.public.kv|east"]
    );
    drop(f);

    // west_east.ts (applies to east): the same tie, seen from the other side,
    // lets west's version win, so both regions end with west's row.
    let f = fixture("kv", KV_SCHEMA, &["--userscript", &shipped("west_east.ts")]).await;
    seed_row(&f, 1, "01", "east", T2).await;
    let body = batch(&[
        kv_row(1, "\\\\xaa", "west", T2, None, "30.0"),
        kv_row(5, "\\\\x05", "east", T3, None, "30.0"),
    ]);
    f.post_ok("/kv/public", body).await;
    assert_eq!(
        f.dump("SELECT k, v, _source FROM kv ORDER BY k").await,
        vec!["1|\\xaa|west"]
    );
    assert_eq!(f.count("SELECT count(*) FROM cdc_sink_dlq").await, 0);
    drop(f);

    // init_apply.ts + repl_apply.ts: filtering in apply, then getTX().apply.
    let f = fixture(
        "kv",
        KV_SCHEMA,
        &["--userscript", &shipped("init_apply.ts")],
    )
    .await;
    seed_row(&f, 3, "cc", "west", T2).await;
    seed_row(&f, 6, "66", "east", T1).await;
    let body = batch(&[
        kv_row(1, "\\\\x01", "east", T1, None, "40.0"),
        kv_row(2, "\\\\x02", "west", T1, None, "40.0"),
        kv_row(3, "\\\\x03", "east", T1, None, "40.0"),
        r#"{"after":null,"before":{"k":6,"v":"Zg==","_source":"east","_timestamp":"2026-01-01T00:00:01Z"},"key":[6],"topic":"kv","updated":"41.0"}"#.to_string(),
    ]);
    f.post_ok("/kv/public", body).await;
    assert_eq!(
        f.dump("SELECT k, v, _source FROM kv ORDER BY k").await,
        vec!["1|\\x01|east", "3|\\xcc|west"]
    );
    // k=3 lost: its DLQ row carries its own time (40), not the request's
    // newest (the delete's 41), because repl_apply.ts passes the ops on.
    assert_eq!(
        f.dump("SELECT dlq_name, source_nanos, source_logical FROM cdc_sink_dlq")
            .await,
        vec!["kv.public.kv|40|0"]
    );
}

const APPLY_TX: &str = r#"
import * as api from "replicator@v1";
import { ApplyOp } from "replicator@v1";

api.configureTable("kv", {
  apply: async (ops: ApplyOp[]) => {
    const tx = api.getTX();
    for (const op of ops) {
      if (op.action !== "upsert") continue;
      await tx.exec("INSERT INTO audit (k, note) VALUES ($1, $2)", op.data.k, "seen " + tx.table());
      if (op.data._source === "boom") {
        throw new Error("boom at " + op.data.k);
      }
    }
    const rows = [...(await tx.query("SELECT count(*) FROM audit"))];
    await tx.exec("UPDATE audit SET note = note || ' of ' || $1 WHERE k = $2", String(rows[0][0]), ops.length);
    await tx.apply(ops.filter((o) => o.action !== "upsert" || o.data._source !== "west"));
  },
});
"#;

#[tokio::test]
async fn apply_and_get_tx_commit_and_roll_back_with_the_request() {
    let (_dir, path) = script(APPLY_TX);
    let setup = format!("{KV_SCHEMA}; CREATE TABLE audit (k INT8, note TEXT);");
    let f = fixture("apply_tx", &setup, &["--userscript", &path]).await;
    let body = batch(&[
        kv_row(1, "\\\\x01", "east", T1, None, "1.0"),
        kv_row(2, "\\\\x02", "west", T1, None, "1.0"),
    ]);
    f.post_ok("/apply_tx/public", body).await;
    assert_eq!(
        f.dump("SELECT k, v FROM kv ORDER BY k").await,
        vec!["1|\\x01"]
    );
    assert_eq!(
        f.dump("SELECT k, note FROM audit ORDER BY k").await,
        vec![
            "1|seen apply_tx.public.kv",
            "2|seen apply_tx.public.kv of 2"
        ]
    );

    // The script throws after exec: the request fails with the position in
    // the .ts, and neither its exec nor any row is kept.
    let body = batch(&[
        kv_row(3, "\\\\x03", "east", T1, None, "2.0"),
        kv_row(4, "\\\\x04", "boom", T1, None, "2.0"),
    ]);
    let text = f.post_refused("/apply_tx/public", body).await;
    assert!(text.contains("init.ts:12:"), "{text}");
    assert!(text.contains("Error: boom at 4"), "{text}");
    assert_eq!(f.count("SELECT count(*) FROM audit").await, 2);
    assert_eq!(f.count("SELECT count(*) FROM kv").await, 1);
}

const CUSTOM_MERGE: &str = r#"
import * as api from "replicator@v1";
api.configureTable("kv", {
  cas: ["_timestamp"],
  merge: (op) => {
    if (op.proposed.k === 1) return { dlq: "custom_" + op.meta.table };
    if (op.proposed.k === 2) return { apply: { ...op.proposed, _source: "merged" } };
    return { drop: true };
  },
});
"#;

#[tokio::test]
async fn merge_functions_reach_the_dlq() {
    let (_dir, path) = script(CUSTOM_MERGE);
    let f = fixture("custom_merge", KV_SCHEMA, &["--userscript", &path]).await;
    for k in 1..=3 {
        seed_row(&f, k, "aa", "west", T2).await;
    }
    let body = batch(&[
        kv_row(1, "\\\\x01", "east", T1, None, "7.0"),
        kv_row(2, "\\\\x02", "east", T1, None, "7.0"),
        kv_row(3, "\\\\x03", "east", T1, None, "7.0"),
    ]);
    f.post_ok("/custom_merge/public", body).await;
    assert_eq!(
        f.dump("SELECT k, v, _source FROM kv ORDER BY k").await,
        vec!["1|\\xaa|west", "2|\\x02|merged", "3|\\xaa|west"]
    );
    assert_eq!(
        f.dump("SELECT dlq_name, source_nanos, data_after->>'k' FROM cdc_sink_dlq")
            .await,
        vec!["custom_kv|7|1"]
    );
}

const FAILING: &str = r#"
import * as api from "replicator@v1";

type Doc = { k: number; v: string };

api.configureSource("failures.public", {
  dispatch: (doc: any, meta) => {
    const d = doc as Doc;
    if (d.v === "dGhyb3c=") throw new TypeError("cannot route " + d.k);
    if (d.v === "bG9vcA==") { for (;;) {} }
    if (d.v === "b29t") { const a: string[] = []; for (;;) a.push("y".repeat(65536) + a.length); }
    // Not routes: JSON would carry both as {} and drop the row unseen.
    if (d.v === "UHJvbWlzZQ==") return Promise.resolve({ [meta.table as string]: [doc] });
    if (d.v === "TWFw") return new Map([[meta.table as string, [doc]]]);
    return { [meta.table as string]: [doc] };
  },
  deletesTo: "",
});
"#;

#[tokio::test]
async fn each_failure_fails_only_its_request() {
    let (_dir, path) = script(FAILING);
    let f = fixture(
        "failures",
        KV_SCHEMA,
        &[
            "--userscript",
            &path,
            "--userscriptTimeout",
            "500ms",
            "--userscriptMemoryMiB",
            "16",
        ],
    )
    .await;
    let good = |k: i64| batch(&[kv_row(k, "AQ==", "east", T1, None, "1.0")]);
    let bad = |mode: &str| {
        batch(&[
            kv_row(100, "AQ==", "east", T1, None, "1.0"),
            kv_row(101, mode, "east", T1, None, "1.0"),
        ])
    };
    let cases = [
        ("dGhyb3c=", 400, "TypeError: cannot route 101"),
        ("bG9vcA==", 503, "timed out"),
        ("b29t", 400, "out of memory"),
        (
            "UHJvbWlzZQ==",
            400,
            "returned a Promise (dispatch must not be async)",
        ),
        ("TWFw", 400, "returned a Map for row 1"),
    ];
    for (i, (mode, code, needle)) in cases.iter().enumerate() {
        let (status, text) = f.post("/failures/public", bad(mode)).await;
        assert_eq!(status, *code, "{mode}: {text}");
        assert!(text.contains(needle), "{mode}: {text}");
        if i == 0 {
            assert!(text.contains("init.ts:9:"), "{text}");
        }
        assert_eq!(
            f.count("SELECT count(*) FROM kv WHERE k >= 100").await,
            0,
            "{mode}"
        );
        // The next request is served.
        let (status, text) = f.post("/failures/public", good(i as i64)).await;
        assert_eq!(status, 200, "after {mode}: {text}");
    }
    assert_eq!(f.count("SELECT count(*) FROM kv").await, 5);
    // A delete the script does not see (deletesTo is a table) still counts:
    // the error names the row by its place in the payload.
    let delete = r#"{"after":null,"before":{"k":0},"key":[0],"topic":"kv","updated":"2.0"}"#;
    let text = f
        .post_refused(
            "/failures/public",
            batch(&[
                delete.to_string(),
                kv_row(101, "TWFw", "east", T1, None, "2.0"),
            ]),
        )
        .await;
    assert!(text.contains("returned a Map for row 1"), "{text}");
    assert_eq!(f.count("SELECT count(*) FROM kv").await, 5);
}

/// JavaScript numbers are doubles. Values a script passes through unchanged
/// (an int8 key past 2^53 as CockroachDB's unique_rowid() makes, a numeric
/// of 24 digits, numbers inside jsonb) reach the table exactly, through a
/// dispatch and a map that both return new objects; a number the script
/// computes is the script's own.
#[tokio::test]
async fn numbers_passed_through_a_script_stay_exact() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureSource("exact.public", {
          dispatch: (doc: any, meta) => ({ [meta.table as string]: [{ ...doc, note: "seen" }] }),
          deletesTo: "",
        });
        api.configureTable("big", { map: (doc: any) => ({ ...doc, half: doc.id / 2 }) });"#,
    );
    let f = fixture(
        "exact",
        "CREATE TABLE big (id INT8 PRIMARY KEY, n NUMERIC, j JSONB, note TEXT, half FLOAT8)",
        &["--userscript", &path],
    )
    .await;
    let body = batch(&[r#"{"after":{"id":9007199254740993,"n":3.14159265358979323846264,"j":{"id":1234567890123456789,"xs":[9007199254740995,1.5]}},"key":[9007199254740993],"topic":"big","updated":"1.0"}"#.to_string()]);
    f.post_ok("/exact/public", body).await;
    assert_eq!(
        f.dump("SELECT id, n, j->>'id', j->'xs', note, half FROM big").await,
        vec!["9007199254740993|3.14159265358979323846264|1234567890123456789|[9007199254740995, 1.5]|seen|4.503599627370496e+15"]
    );
}

/// A merge function's `{apply: doc}` built from the conflict's rows keeps
/// their numbers exact: a key past 2^53 names the stored row, not its
/// rounded neighbour.
#[tokio::test]
async fn numbers_passed_through_a_merge_stay_exact() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("big", { cas: ["ts"], merge: (op: any) => ({ apply: { ...op.proposed, ts: op.target.ts } }) });"#,
    );
    let f = fixture(
        "exact_merge",
        "CREATE TABLE big (id INT8 PRIMARY KEY, a TEXT, ts INT8);
         INSERT INTO big VALUES (9007199254740993, 'a0', 20);",
        &["--userscript", &path],
    )
    .await;
    let body = batch(&[r#"{"after":{"id":9007199254740993,"a":"a1","ts":10},"key":[9007199254740993],"topic":"big","updated":"1.0"}"#.to_string()]);
    f.post_ok("/exact_merge/public", body).await;
    assert_eq!(
        f.dump("SELECT id, a, ts FROM big").await,
        vec!["9007199254740993|a1|20"]
    );
}

/// Ops an `apply` function hands on through `getTX().apply` keep their
/// numbers exact, whether the script passes the ops themselves (as
/// repl_apply.ts's filter does) or rebuilds them around the same data; a
/// number the script computes is its own.
#[tokio::test]
async fn numbers_passed_through_get_tx_apply_stay_exact() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureTable("big", {
          apply: async (ops: any[]) => {
            const kept = ops.filter((op) => op.data.keep);
            const rebuilt = ops
              .filter((op) => !op.data.keep)
              .map((op) => ({ action: op.action, meta: op.meta, data: { ...op.data, half: op.data.id / 2 } }));
            await api.getTX().apply([...kept, ...rebuilt]);
          },
        });"#,
    );
    let f = fixture(
        "exact_apply",
        "CREATE TABLE big (id INT8 PRIMARY KEY, n NUMERIC, keep BOOL, half FLOAT8)",
        &["--userscript", &path],
    )
    .await;
    let body = batch(&[
        r#"{"after":{"id":9007199254740993,"n":3.14159265358979323846264,"keep":true},"key":[9007199254740993],"topic":"big","updated":"1.0"}"#.to_string(),
        r#"{"after":{"id":9007199254740995,"n":2.71828182845904523536028,"keep":false},"key":[9007199254740995],"topic":"big","updated":"1.0"}"#.to_string(),
    ]);
    f.post_ok("/exact_apply/public/big", body).await;
    assert_eq!(
        f.dump("SELECT id, n, keep, half FROM big ORDER BY id")
            .await,
        vec![
            "9007199254740993|3.14159265358979323846264|t|NULL",
            "9007199254740995|2.71828182845904523536028|f|4.503599627370498e+15",
        ]
    );
}

/// A promise a `dispatch` starts and does not return settles before the
/// dispatch call ends, under its deadline: a runaway loop in it fails the
/// request that started it, not a later one (where it would also have run
/// inside that request's `apply`, with its `getTX()`).
#[tokio::test]
async fn promises_left_by_dispatch_settle_within_their_request() {
    let (_dir, path) = script(
        r#"import * as api from "replicator@v1";
        api.configureSource("stray.public", {
          dispatch: (doc: any, meta) => {
            if (doc.k === 2) Promise.resolve().then(() => { for (;;) {} });
            return { [meta.table as string]: [doc] };
          },
          deletesTo: "",
        });"#,
    );
    let f = fixture(
        "stray",
        "CREATE TABLE t (k INT8 PRIMARY KEY)",
        &["--userscript", &path, "--userscriptTimeout", "500ms"],
    )
    .await;
    let row = |k: i64| {
        batch(&[format!(
            r#"{{"after":{{"k":{k}}},"key":[{k}],"topic":"t","updated":"{k}.0"}}"#
        )])
    };
    f.post_ok("/stray/public", row(1)).await;
    let (status, text) = f.post("/stray/public", row(2)).await;
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("timed out"), "{text}");
    for k in 3..=6 {
        f.post_ok("/stray/public", row(k)).await;
    }
    assert_eq!(
        f.dump("SELECT string_agg(k::text, ',' ORDER BY k) FROM t")
            .await,
        vec!["1,3,4,5,6"]
    );
}

#[tokio::test]
async fn a_script_that_does_not_compile_stops_start() {
    let (_dir, path) = script("import * as api from \"replicator@v1\";\napi.configureTable(\"kv\", {\n  cas: [\"_timestamp\"\n});\n");
    let (url, _) = fresh_db("no_compile", "").await;
    let err = match meridian::server::serve(start_args(&url, &["--userscript", &path])).await {
        Err(e) => format!("{e:#}"),
        Ok(_) => panic!("started with a broken script"),
    };
    assert!(err.contains("init.ts:4:1:"), "{err}");
}

fn meridian() -> Command {
    Command::new(env!("CARGO_BIN_EXE_meridian"))
}

#[test]
fn check_and_api_commands() {
    let out = meridian()
        .args(["userscript", "--check", &shipped("init.ts")])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("kv.public: dispatch function; deletes to the topic's table"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "kv.public.kv:\n    cas: _timestamp\n    merge: standardMerge with a fallback function"
        ),
        "{stdout}"
    );

    let (_dir, path) = script("const x: number = 1;\nexport const y = x +;\n");
    let out = meridian()
        .args(["userscript", "--check", &path])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("init.ts:2:21: "), "{stderr}");

    let out = meridian().args(["userscript", "--api"]).output().unwrap();
    let api = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        api.contains("declare module \"replicator@v1\"")
            && api.contains("declare module \"cdc-sink@v1\"")
    );
    assert!(
        api.contains("function configureSource(") && api.contains("function getTX(): TargetTX;")
    );
}

/// Console output reaches the daemon's log with the script's name, at the
/// method's level; a disabled level does not even build its message (the
/// probe's `toJSON` runs only for the enabled `info` call), while a call
/// whose arguments have effects runs them whatever the level.
#[test]
fn console_logs_and_skips_disabled_messages() {
    let (_dir, path) = script(
        "let built = 0;\nlet counted = 0;\nconst probe = { toJSON() { built++; return \"p\"; } };\nconsole.trace(\"trace \" + JSON.stringify(probe));\nconsole.debug(counted++);\nconsole.info(\"info \" + JSON.stringify(probe));\nconsole.warn(`built ${built} counted ${counted}`);\n",
    );
    let run = |filter: &str| {
        let out = meridian()
            .args(["userscript", "--check", &path])
            .env("RUST_LOG", filter)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let info = run("info");
    assert!(info.contains("info \"p\""), "{info}");
    assert!(info.contains("script=\"init.ts\""), "{info}");
    assert!(info.contains("built 1 counted 1"), "{info}");
    assert!(!info.contains("trace "), "{info}");
    let trace = run("trace");
    assert!(trace.contains("trace \"p\""), "{trace}");
    assert!(trace.contains("built 2 counted 1"), "{trace}");
    // The README's production filter: meridian at info, the script at warn.
    let quiet = run("info,meridian::userscript=warn");
    assert!(!quiet.contains("info "), "{quiet}");
    assert!(quiet.contains("built 0 counted 1"), "{quiet}");
}

/// Logs written to a pipe or a file (a service manager, a container) carry
/// no terminal colour codes.
#[test]
fn logs_to_a_pipe_are_plain_text() {
    let (_dir, path) = script("console.info(\"hello from the script\");\n");
    let out = meridian()
        .args(["userscript", "--check", &path])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("INFO"), "{stderr}");
    assert!(stderr.contains("hello from the script"), "{stderr}");
    assert!(!stderr.contains('\x1b'), "escape codes in {stderr:?}");
}

fn shipped_ts() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("userscripts");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "ts") && !p.to_string_lossy().ends_with(".d.ts")
        })
        .collect();
    v.sort();
    v
}

/// Every shipped script loads in meridian, and (when `npx` can fetch
/// TypeScript) type-checks against `meridian.d.ts` with `tsc --noEmit`.
#[test]
fn shipped_scripts_load_and_type_check() {
    let scripts = shipped_ts();
    assert!(scripts.len() >= 6, "{scripts:?}");
    for p in &scripts {
        let out = meridian()
            .args(["userscript", "--check"])
            .arg(p)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("userscripts");
    let tsc = Command::new("npx")
        .args(["-y", "-p", "typescript", "tsc", "--noEmit", "-p", "."])
        .current_dir(&dir)
        .output();
    match tsc {
        Ok(out) if out.status.code() == Some(0) => {}
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("error TS") => {
            panic!(
                "tsc --noEmit failed:\n{}",
                String::from_utf8_lossy(&out.stdout)
            )
        }
        Ok(out) => eprintln!(
            "skipping tsc: npx could not run TypeScript: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("skipping tsc: no npx ({e})"),
    }
}

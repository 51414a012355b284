//! Userscript throughput: rows/s through the seed's dispatch (init.ts +
//! repl.ts, verbatim) and through a filtering `apply` that hands survivors to
//! `getTX().apply`. Run with `cargo bench --bench userscript`.
//!
//! `BENCH_SCRIPT_DIR=dir` loads `init.ts` (and `init_apply.ts`) from another
//! folder, to price a variant of the script (a dispatch that returns null
//! prices meridian's side of a call); `BENCH_NOCHECK=1` then skips the check
//! that the seed's half of the rows were kept.

use std::path::Path;
use std::time::{Duration, Instant};

use meridian::changefeed::{Before, Hlc, Mutation};
use meridian::script::{ApplyOp, ColumnInfo, Limits, ScriptTx, TableName, Userscript};
use serde_json::{json, Value};

fn row(k: i64, source: &str) -> Mutation {
    let after =
        json!({"k": k, "v": "AQIDBA==", "_source": source, "_timestamp": "2026-01-01T00:00:01Z"});
    Mutation {
        topic: Some("kv".into()),
        key: Some(vec![json!(k)]),
        after: Some(after.try_into().unwrap()),
        before: Before::Null,
        // Rows of one source transaction share `updated`: 100 per transaction.
        updated: Hlc::new(1_700_000_000_000_000_000 + k / 100, 0),
    }
}

/// A transaction that only counts what reaches it.
struct CountingTx(usize);

#[async_trait::async_trait]
impl ScriptTx for CountingTx {
    async fn exec(&mut self, _: &str, _: Vec<Value>) -> Result<u64, String> {
        Ok(0)
    }
    async fn query(&mut self, _: &str, _: Vec<Value>) -> Result<Vec<Vec<Value>>, String> {
        Ok(vec![])
    }
    async fn apply(&mut self, ops: Vec<ApplyOp>) -> Result<(), String> {
        self.0 += ops.len();
        Ok(())
    }
    fn columns(&self) -> Vec<ColumnInfo> {
        vec![ColumnInfo {
            name: "k".into(),
            sql_type: "INT8".into(),
            primary: true,
            ignored: false,
        }]
    }
    fn schema(&self) -> String {
        "public".into()
    }
    fn table(&self) -> String {
        "kv.public.kv".into()
    }
}

/// `BENCH_ONLY=<substring>` runs only the matching measurements.
fn wanted(what: &str) -> bool {
    std::env::var("BENCH_ONLY")
        .map(|f| what.contains(&f))
        .unwrap_or(true)
}

fn report(what: &str, rows: usize, elapsed: Duration) {
    println!(
        "{what:<58} {:>10.0} rows/s  ({rows} rows in {:.2?})",
        rows as f64 / elapsed.as_secs_f64(),
        elapsed
    );
}

fn main() {
    // As the `meridian` binary does.
    meridian::tune_allocator();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = std::env::var("BENCH_SCRIPT_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("userscripts"));
    let script = Userscript::load(&dir.join("init.ts"), Limits::default()).expect("init.ts loads");
    let apply_script = Userscript::load(&dir.join("init_apply.ts"), Limits::default())
        .expect("init_apply.ts loads");
    let table = TableName::new("kv", "public", "kv");

    for &size in &[1usize, 100, 1000] {
        let what = format!("dispatch (seed repl.ts), {size}-row batches, 1 caller");
        if !wanted(&what) {
            continue;
        }
        let batches = (200_000 / size).max(2000);
        let batch: Vec<Mutation> = (0..size as i64)
            .map(|k| row(k, if k % 2 == 0 { "east" } else { "west" }))
            .collect();
        // Warm up.
        rt.block_on(script.dispatch("kv", "public", None, batch.clone()))
            .unwrap();
        let started = Instant::now();
        let mut kept = 0;
        for _ in 0..batches {
            kept += rt
                .block_on(script.dispatch("kv", "public", None, batch.clone()))
                .unwrap()
                .len();
        }
        if std::env::var("BENCH_NOCHECK").is_err() {
            assert_eq!(kept, batches * size.div_ceil(2));
        }
        report(&what, batches * size, started.elapsed());
    }

    // Concurrent callers use the whole pool.
    let what = "dispatch (seed repl.ts), 1000-row batches, 4 callers";
    if wanted(what) {
        let size = 1000;
        let batch: Vec<Mutation> = (0..size as i64)
            .map(|k| row(k, if k % 2 == 0 { "east" } else { "west" }))
            .collect();
        let started = Instant::now();
        let per_task = 200;
        rt.block_on(async {
            let tasks: Vec<_> = (0..4)
                .map(|_| {
                    let s = script.clone();
                    let b = batch.clone();
                    tokio::spawn(async move {
                        for _ in 0..per_task {
                            s.dispatch("kv", "public", None, b.clone()).await.unwrap();
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        report(what, 4 * per_task * size, started.elapsed());
    }

    for &size in &[1usize, 1000] {
        let what = format!("filtering apply (repl_apply.ts), {size}-row batches");
        if !wanted(&what) {
            continue;
        }
        let batches = (200_000 / size).max(2000);
        let ops: Vec<ApplyOp> = (0..size as i64)
            .map(|k| {
                let m = row(k, if k % 2 == 0 { "east" } else { "west" });
                ApplyOp::Upsert {
                    data: m.after.unwrap(),
                    before: None,
                    updated: Some(m.updated),
                }
            })
            .collect();
        let started = Instant::now();
        let mut tx = CountingTx(0);
        for _ in 0..batches {
            rt.block_on(apply_script.apply(&table, ops.clone(), &mut tx))
                .unwrap();
        }
        assert_eq!(tx.0, batches * size.div_ceil(2));
        report(&what, batches * size, started.elapsed());
    }
}

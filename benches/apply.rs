//! Receiver throughput against its ceiling, measured in one run on one server.
//!
//! Meridian: batches of 1,000 rows of the seed's `kv` table POSTed over HTTP
//! to `meridian start` with the seed's userscript (`userscripts/init.ts` +
//! `repl.ts`, CAS on `_timestamp`, losers to the DLQ).
//! Baseline: the same rows through a plain
//! `INSERT … SELECT … FROM unnest(…) ON CONFLICT … DO UPDATE … WHERE …`
//! on the same PostgreSQL server, with the same number of requests in flight.
//! Each side runs an insert pass and an update pass (newer `_timestamp`), in
//! `BENCH_ROUNDS` rounds (default 3) on fresh keys; the figure is the median
//! round's ratio.
//!
//! Run: `cargo bench --bench apply` (env: BENCH_ROWS, BENCH_BATCH, BENCH_CONCURRENCY, BENCH_ROUNDS,
//! BENCH_USERSCRIPT=path|none, BENCH_ONLY=meridian|baseline to profile one side,
//! BENCH_LOG=<filter> to log as the daemon does, e.g. info).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::stream::{self, StreamExt};
use meridian::cli::{Cli, Command};
use meridian::pgcluster::PgCluster;
use tokio_postgres::NoTls;

mod common;
use common::{machine_cpu, process_cpu};

const SCHEMA: &str = "
CREATE TABLE kv (k INT8 PRIMARY KEY, v BYTEA, _source TEXT, _timestamp TIMESTAMPTZ);
CREATE TABLE cdc_sink_dlq (event UUID DEFAULT gen_random_uuid() PRIMARY KEY, dlq_name TEXT NOT NULL,
  source_nanos INT8 NOT NULL, source_logical INT8 NOT NULL, data_after JSONB NOT NULL, data_before JSONB NOT NULL);";

/// Where the warm-up rows go: far above any measured key.
const WARM_KEYS: usize = 1 << 40;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ts(pass: usize) -> String {
    format!("2026-01-01T00:00:{:02}.123456Z", pass + 1)
}

/// One request body: rows `start..start+n` at `pass`.
fn body(start: usize, n: usize, pass: usize) -> String {
    let rows: Vec<String> = (start..start + n)
        .map(|k| {
            format!(
                r#"{{"after":{{"k":{k},"v":"\\x{:016x}","_source":"east","_timestamp":"{}"}},"key":[{k}],"topic":"kv","updated":"{}.0"}}"#,
                k * 31 + pass,
                ts(pass),
                1_700_000_000_000_000_000u64 + pass as u64
            )
        })
        .collect();
    format!(r#"{{"payload":[{}],"length":{n}}}"#, rows.join(","))
}

/// Rows/s, CPU µs per row spent in this process (mostly meridian): steadier
/// than rows/s on a busy machine, and CPU µs per row of the whole machine.
async fn meridian_pass(
    base: &str,
    first: usize,
    rows: usize,
    batch: usize,
    conc: usize,
    pass: usize,
) -> (f64, f64, f64) {
    let http = reqwest::Client::new();
    let end = first + rows;
    let bodies: Vec<String> = (first..end)
        .step_by(batch)
        .map(|s| body(s, batch.min(end - s), pass))
        .collect();
    let cpu = process_cpu();
    let machine = machine_cpu();
    let started = Instant::now();
    let results: Vec<u16> = stream::iter(bodies)
        .map(|b| {
            let http = http.clone();
            let url = format!("{base}/kv/public");
            async move {
                http.post(url)
                    .body(b)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            }
        })
        .buffer_unordered(conc)
        .collect()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let cpu = process_cpu() - cpu;
    let machine = machine_cpu() - machine;
    assert!(
        results.iter().all(|&s| s == 200),
        "meridian answered {results:?}"
    );
    let per_row = |s: f64| s * 1e6 / rows as f64;
    (rows as f64 / secs, per_row(cpu), per_row(machine))
}

async fn baseline_pass(
    url: &str,
    first: usize,
    rows: usize,
    batch: usize,
    conc: usize,
    pass: usize,
) -> (f64, f64) {
    let mut clients = Vec::new();
    for _ in 0..conc {
        let (c, conn) = tokio_postgres::connect(url, NoTls).await.unwrap();
        tokio::spawn(conn);
        clients.push(Arc::new(c));
    }
    let sql = "INSERT INTO kv (k, v, _source, _timestamp)
               SELECT * FROM unnest($1::int8[], $2::bytea[], $3::text[], $4::timestamptz[])
               ON CONFLICT (k) DO UPDATE SET v = excluded.v, _source = excluded._source, _timestamp = excluded._timestamp
               WHERE excluded._timestamp > kv._timestamp";
    let when = chrono::DateTime::parse_from_rfc3339(&ts(pass)).unwrap();
    let end = first + rows;
    let starts: Vec<usize> = (first..end).step_by(batch).collect();
    let machine = machine_cpu();
    let started = Instant::now();
    stream::iter(starts.into_iter().enumerate())
        .map(|(i, s)| {
            let c = clients[i % conc].clone();
            async move {
                let n = batch.min(end - s);
                let ks: Vec<i64> = (s..s + n).map(|k| k as i64).collect();
                let vs: Vec<Vec<u8>> = ks
                    .iter()
                    .map(|k| ((*k as u64) * 31 + pass as u64).to_be_bytes().to_vec())
                    .collect();
                let src: Vec<&str> = vec!["east"; n];
                let tss = vec![when; n];
                let tx = c.execute(sql, &[&ks, &vs, &src, &tss]).await.unwrap();
                assert_eq!(tx as usize, n);
            }
        })
        .buffer_unordered(conc)
        .collect::<Vec<()>>()
        .await;
    let secs = started.elapsed().as_secs_f64();
    let machine = machine_cpu() - machine;
    (rows as f64 / secs, machine * 1e6 / rows as f64)
}

fn main() {
    // As the `meridian` binary does.
    meridian::tune_allocator();
    // No log output by default, as with RUST_LOG=warn. BENCH_LOG=info logs
    // as `meridian start` does by default (the seed's script then logs a
    // line per row), formatted and thrown away.
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::sink)
            .with_ansi(false)
            .init();
    }
    let rows = env("BENCH_ROWS", 100_000);
    let batch = env("BENCH_BATCH", 1_000);
    let conc = env("BENCH_CONCURRENCY", 4);
    let rounds = env("BENCH_ROUNDS", 3).max(1);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let cluster = PgCluster::start_temp().expect("PostgreSQL cluster");
        let m_url = cluster.create_database("kv").await.unwrap();
        let b_url = cluster.create_database("baseline").await.unwrap();
        for u in [&m_url, &b_url] {
            let (c, conn) = tokio_postgres::connect(u, NoTls).await.unwrap();
            tokio::spawn(conn);
            c.batch_execute(SCHEMA).await.unwrap();
        }
        // BENCH_USERSCRIPT=none measures the receiver without a script.
        let script = std::env::var("BENCH_USERSCRIPT")
            .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/userscripts/init.ts").to_string());
        let mut argv = vec![
            "meridian", "start", "--bindAddr", "127.0.0.1:0", "--disableAuthentication",
            "--targetConn", &m_url,
        ];
        if script != "none" {
            argv.extend(["--userscript", &script]);
        }
        println!("userscript: {script}");
        let Command::Start(args) = Cli::parse_from(argv).command else { unreachable!() };
        let server = meridian::server::serve(args).await.expect("meridian starts");
        let base = server.base_url();
        println!("apply benchmark: {rows} rows in batches of {batch}, {conc} requests in flight, PostgreSQL on this machine");
        // BENCH_ONLY=meridian|baseline runs one side (for profiling); no ratio.
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        // Warm both sides up (connections, prepared statements, the script
        // pool, allocator pages) on keys outside the measured range.
        let warm = (2 * conc * batch).min(rows);
        if only != "baseline" {
            meridian_pass(&base, WARM_KEYS, warm, batch, conc, 0).await;
        }
        if only != "meridian" {
            baseline_pass(&b_url, WARM_KEYS, warm, batch, conc, 0).await;
        }
        if !only.is_empty() {
            for (pass, label) in [(0, "insert"), (1, "update")] {
                if only == "baseline" {
                    let (r, all) = baseline_pass(&b_url, 0, rows, batch, conc, pass).await;
                    println!("{label:>7}: baseline {r:>10.0} rows/s, machine {all:.2} CPU µs/row");
                } else {
                    let (r, cpu, all) = meridian_pass(&base, 0, rows, batch, conc, pass).await;
                    println!("{label:>7}: meridian {r:>10.0} rows/s, {cpu:.2} CPU µs/row, machine {all:.2}");
                }
            }
            server.shutdown().await;
            return;
        }
        // Several rounds on fresh keys, each side going first in turn: on a
        // shared machine whose speed drifts, the median round is the figure
        // (every round is printed).
        let mut ratios = Vec::new();
        let mut sum = (0.0, 0.0);
        for round in 0..rounds {
            let first = round * rows;
            let mut total = (0.0, 0.0);
            for (pass, label) in [(0, "insert"), (1, "update")] {
                // Alternate which side goes first so neither always gets the warmer cache.
                let ((m, cpu, m_all), (b, b_all)) = if (pass + round) % 2 == 0 {
                    let m = meridian_pass(&base, first, rows, batch, conc, pass).await;
                    (m, baseline_pass(&b_url, first, rows, batch, conc, pass).await)
                } else {
                    let b = baseline_pass(&b_url, first, rows, batch, conc, pass).await;
                    (meridian_pass(&base, first, rows, batch, conc, pass).await, b)
                };
                println!("round {} {label:>7}: meridian {m:>10.0} rows/s   baseline {b:>10.0} rows/s   ratio {:.2}", round + 1, m / b);
                println!("                CPU µs/row: meridian process {cpu:.2}, machine {m_all:.2} (baseline machine {b_all:.2})");
                total.0 += rows as f64 / m;
                total.1 += rows as f64 / b;
            }
            let (m, b) = (2.0 * rows as f64 / total.0, 2.0 * rows as f64 / total.1);
            println!("round {} overall: meridian {m:.0} rows/s, baseline {b:.0} rows/s, ratio {:.2}", round + 1, m / b);
            ratios.push(m / b);
            sum.0 += total.0;
            sum.1 += total.1;
        }
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        let n = (2 * rows * rounds) as f64;
        println!(
            "overall: meridian {:.0} rows/s, baseline {:.0} rows/s over {rounds} rounds; median round ratio {median:.2} (target >= 0.60)",
            n / sum.0,
            n / sum.1
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        server.shutdown().await;
    });
}

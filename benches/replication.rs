//! One-direction replication, east → west, against PostgreSQL's own logical
//! replication, measured in one run on this machine.
//!
//! Native: `CREATE PUBLICATION` on east, `CREATE SUBSCRIPTION … WITH
//! (copy_data = false)` on west, a plain `kv` table on both.
//! meridian: `sql/postgres/setup.sql` + `meridian_enable` on both clusters,
//! `meridian changefeed` reading east's slot and posting to `meridian start`
//! applying to west with `userscripts/east_west.ts` (CAS on
//! `(_timestamp, _source)`, DLQ, loop filter).
//!
//! The hop between the regions is encrypted for both, as it would be across
//! a WAN: the subscription connects with `sslmode=require` (east serves a
//! self-signed certificate) and the changefeed posts over HTTPS;
//! `BENCH_TLS=off` runs both in plaintext instead.
//!
//! Each system gets two fresh clusters and three phases:
//! 1. insert: `BENCH_ROWS` rows written on east in transactions of `BENCH_TXN`
//!    rows; the clock runs from the first write until west holds them all;
//! 2. update: the same rows again with a new value and a newer `_timestamp`,
//!    timed the same way;
//! 3. lag: `BENCH_RATE` rows a second for `BENCH_LAG_SECS` seconds in one
//!    small transaction every 10 ms; the lag of a row is from its commit
//!    being acknowledged on east until a poll of west (every 5 ms) first sees it.
//!
//! West is checked cheaply (the last key) and then fully (every row holds the
//! pass's value); the time is the first full check that passes. At the end
//! east and west are compared row by row through a checksum. Each bulk phase
//! also prints the CPU it cost per row, on the whole machine and in this
//! process (where meridian's changefeed and receiver run).
//!
//! Run: `cargo bench --bench replication` (env: BENCH_ROWS, BENCH_TXN,
//! BENCH_RATE, BENCH_LAG_SECS, BENCH_TLS=off, BENCH_ONLY=native|meridian, RUST_LOG).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use meridian::demo;
use meridian::pgcluster::PgCluster;
use tokio_postgres::Client;

mod common;
use common::{machine_cpu, process_cpu};

const EAST_WEST_TS: &str = include_str!("../userscripts/east_west.ts");
/// Keys of the lag phase start here, above the bulk phases' keys.
const LAG_BASE: i64 = 1_000_000_000;
/// Longest wait for west to catch up in one phase.
const CATCH_UP: Duration = Duration::from_secs(180);

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[derive(Clone, Copy)]
struct Sizes {
    rows: i64,
    txn: i64,
    rate: i64,
    lag_secs: u64,
    /// Whether the hop between the regions is encrypted, for both systems.
    tls: bool,
}

#[derive(Clone, Copy, PartialEq)]
enum System {
    Native,
    Meridian,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Native => "native",
            System::Meridian => "meridian",
        }
    }

    /// Inserts keys `$1..=$2` with the value of `pass`. meridian's trigger
    /// stamps `_source` and `_timestamp`; the native table has none, so the
    /// statement writes them itself.
    fn write_sql(self, update: bool) -> &'static str {
        match (self, update) {
            (System::Native, false) => {
                "INSERT INTO kv (k, v, _source, _timestamp) \
                 SELECT k, decode(md5(k::text || ':' || $3::text), 'hex'), 'east', now() \
                 FROM generate_series($1::int8, $2::int8) AS k"
            }
            (System::Meridian, false) => {
                "INSERT INTO kv (k, v) \
                 SELECT k, decode(md5(k::text || ':' || $3::text), 'hex') \
                 FROM generate_series($1::int8, $2::int8) AS k"
            }
            (System::Native, true) => {
                "UPDATE kv SET v = decode(md5(k::text || ':' || $3::text), 'hex'), _timestamp = now() \
                 WHERE k BETWEEN $1 AND $2"
            }
            (System::Meridian, true) => {
                "UPDATE kv SET v = decode(md5(k::text || ':' || $3::text), 'hex') \
                 WHERE k BETWEEN $1 AND $2"
            }
        }
    }
}

struct Bulk {
    /// Until east committed the last transaction.
    write: Duration,
    /// Until west held every row.
    total: Duration,
    /// CPU µs per row over the phase: the whole machine (both clusters and,
    /// for meridian, the changefeed and receiver), and this process alone
    /// (for meridian: the changefeed and receiver; for native: the polls).
    machine_us: f64,
    process_us: f64,
}

impl Bulk {
    fn rows_per_sec(&self, rows: i64) -> f64 {
        rows as f64 / self.total.as_secs_f64()
    }

    /// Prints the phase `label` of `rows` rows.
    fn print(&self, sys: System, label: &str, rows: i64) {
        println!(
            "  {:<8} {label:<7} {:>8.0} rows/s  (east wrote in {:.2}s, west complete after {:.2}s; \
             CPU µs/row: machine {:.1}, this process {:.1})",
            sys.name(),
            self.rows_per_sec(rows),
            self.write.as_secs_f64(),
            self.total.as_secs_f64(),
            self.machine_us,
            self.process_us
        );
    }
}

struct Lag {
    rows: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

struct Report {
    insert: Bulk,
    update: Bulk,
    lag: Lag,
    consistent: std::result::Result<(), String>,
    notes: Vec<String>,
}

async fn connect(url: &str) -> Result<Client> {
    demo::connect(url).await
}

/// Writes `sizes.rows` rows (pass 1: insert, later passes: update) in
/// transactions of `sizes.txn` rows on east while polling west.
async fn bulk(sys: System, east: &Client, west: &Client, sizes: Sizes, pass: i32) -> Result<Bulk> {
    let stmt = east.prepare(sys.write_sql(pass > 1)).await?;
    let n = sizes.rows;
    let cpu = (machine_cpu(), process_cpu());
    let started = Instant::now();
    let writer = async {
        let mut k = 1;
        while k <= n {
            let hi = (k + sizes.txn - 1).min(n);
            east.execute(&stmt, &[&k, &hi, &pass.to_string()]).await?;
            k = hi + 1;
        }
        anyhow::Ok(started.elapsed())
    };
    let last_ok = west
        .prepare("SELECT coalesce(bool_and(v = decode(md5(k::text || ':' || $2::text), 'hex')), false) FROM kv WHERE k = $1")
        .await?;
    let all_ok = west
        .prepare(
            "SELECT count(*) FROM kv WHERE k BETWEEN 1 AND $1 \
             AND v = decode(md5(k::text || ':' || $2::text), 'hex')",
        )
        .await?;
    let pass_s = pass.to_string();
    let watcher = async {
        loop {
            if started.elapsed() > CATCH_UP {
                let have: i64 = west.query_one(&all_ok, &[&n, &pass_s]).await?.get(0);
                bail!(
                    "{}: west holds {have} of {n} rows after {CATCH_UP:?}",
                    sys.name()
                );
            }
            let last: bool = west.query_one(&last_ok, &[&n, &pass_s]).await?.get(0);
            if last {
                let have: i64 = west.query_one(&all_ok, &[&n, &pass_s]).await?.get(0);
                if have == n {
                    return Ok(started.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (write, total) = tokio::try_join!(writer, watcher)?;
    let per_row = |s: f64| s * 1e6 / n as f64;
    Ok(Bulk {
        write,
        total,
        machine_us: per_row(machine_cpu() - cpu.0),
        process_us: per_row(process_cpu() - cpu.1),
    })
}

/// A steady `sizes.rate` rows a second, one transaction every 10 ms; the lag
/// of each row from its commit on east to its first sighting on west.
async fn lag(sys: System, east: &Client, west: &Client, sizes: Sizes) -> Result<Lag> {
    let stmt = east.prepare(sys.write_sql(false)).await?;
    let total = sizes.rate * sizes.lag_secs as i64;
    let started = Instant::now();
    let writer = async {
        // (last key of the transaction, commit acknowledged)
        let mut commits: Vec<(i64, Instant)> = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next = 0;
        while next < total {
            tick.tick().await;
            let due = ((started.elapsed().as_secs_f64() * sizes.rate as f64) as i64).min(total);
            if due <= next {
                continue;
            }
            let (lo, hi) = (LAG_BASE + next, LAG_BASE + due - 1);
            east.execute(&stmt, &[&lo, &hi, &"1"]).await?;
            commits.push((hi, Instant::now()));
            next = due;
        }
        anyhow::Ok(commits)
    };
    let poll = west
        .prepare("SELECT k FROM kv WHERE k >= $1 ORDER BY k")
        .await?;
    let watcher = async {
        let mut seen: HashMap<i64, Instant> = HashMap::new();
        // Every key below this has been seen.
        let mut low = LAG_BASE;
        while low < LAG_BASE + total {
            if started.elapsed() > Duration::from_secs(sizes.lag_secs) + CATCH_UP {
                bail!("{}: west saw {} of {total} rows", sys.name(), seen.len());
            }
            let rows = west.query(&poll, &[&low]).await?;
            let now = Instant::now();
            for r in rows {
                seen.entry(r.get(0)).or_insert(now);
            }
            while seen.contains_key(&low) {
                low += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::Ok(seen)
    };
    let (commits, seen) = tokio::try_join!(writer, watcher)?;
    let by_last: BTreeMap<i64, Instant> = commits.into_iter().collect();
    let mut lags: Vec<Duration> = seen
        .iter()
        .map(|(k, at)| {
            let (_, committed) = by_last.range(k..).next().expect("every key was committed");
            at.saturating_duration_since(*committed)
        })
        .collect();
    lags.sort();
    let q = |p: f64| lags[((lags.len() - 1) as f64 * p).round() as usize];
    Ok(Lag {
        rows: lags.len(),
        p50: q(0.5),
        p99: q(0.99),
        max: *lags.last().unwrap(),
    })
}

const CHECKSUM: &str = "SELECT count(*), coalesce(md5(string_agg(k::text || '|' || encode(v, 'hex') || '|' || \
    coalesce(_source, '') || '|' || (extract(epoch FROM _timestamp) * 1000000)::int8::text, ',' ORDER BY k)), '') FROM kv";

async fn compare(east: &Client, west: &Client) -> Result<std::result::Result<(), String>> {
    let e = east.query_one(CHECKSUM, &[]).await?;
    let w = west.query_one(CHECKSUM, &[]).await?;
    let (en, eh): (i64, String) = (e.get(0), e.get(1));
    let (wn, wh): (i64, String) = (w.get(0), w.get(1));
    Ok(if en == wn && eh == wh {
        Ok(())
    } else {
        Err(format!("east {en} rows md5 {eh}, west {wn} rows md5 {wh}"))
    })
}

async fn phases(
    sys: System,
    east: &Client,
    west: &Client,
    sizes: Sizes,
) -> Result<(Bulk, Bulk, Lag)> {
    let insert = bulk(sys, east, west, sizes, 1).await?;
    insert.print(sys, "insert", sizes.rows);
    let update = bulk(sys, east, west, sizes, 2).await?;
    update.print(sys, "update", sizes.rows);
    let lag = lag(sys, east, west, sizes).await?;
    println!(
        "  {:<8} lag     p50 {:>6.1} ms  p99 {:>6.1} ms  max {:>6.1} ms  ({} rows at {}/s)",
        sys.name(),
        ms(lag.p50),
        ms(lag.p99),
        ms(lag.max),
        lag.rows,
        sizes.rate
    );
    Ok((insert, update, lag))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

const NATIVE_SCHEMA: &str =
    "CREATE TABLE kv (k INT8 PRIMARY KEY, v BYTEA, _source TEXT, _timestamp TIMESTAMPTZ)";

async fn native(sizes: Sizes) -> Result<Report> {
    let east_cluster = PgCluster::start_temp()?;
    let west_cluster = PgCluster::start_temp()?;
    if sizes.tls {
        east_cluster.enable_ssl().await?;
    }
    let east_url = east_cluster.create_database("kv").await?;
    let west_url = west_cluster.create_database("kv").await?;
    let east = connect(&east_url).await?;
    let west = connect(&west_url).await?;
    east.batch_execute(&format!(
        "{NATIVE_SCHEMA}; CREATE PUBLICATION bench FOR TABLE kv"
    ))
    .await?;
    west.batch_execute(NATIVE_SCHEMA).await?;
    west.batch_execute(&format!(
        "CREATE SUBSCRIPTION bench \
         CONNECTION 'host=127.0.0.1 port={} dbname=kv user=postgres sslmode={}' \
         PUBLICATION bench WITH (copy_data = false)",
        east_cluster.port(),
        if sizes.tls { "require" } else { "disable" }
    ))
    .await
    .context("creating the subscription")?;
    // The apply worker is streaming once it reports a received LSN.
    let ready = meridian::pgcluster::wait_for(Duration::from_secs(30), || async {
        west.query_one(
            "SELECT count(*) FROM pg_stat_subscription WHERE subname = 'bench' AND received_lsn IS NOT NULL",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) > 0)
        .unwrap_or(false)
    })
    .await;
    if !ready {
        bail!("the native subscription did not start");
    }
    let encrypted: bool = east
        .query_one(
            "SELECT coalesce(bool_and(s.ssl), false) FROM pg_stat_replication r \
             JOIN pg_stat_ssl s USING (pid)",
            &[],
        )
        .await?
        .get(0);
    if encrypted != sizes.tls {
        bail!("the subscription's connection is not as asked: ssl = {encrypted}");
    }
    let (insert, update, lag) = phases(System::Native, &east, &west, sizes).await?;
    let consistent = compare(&east, &west).await?;
    Ok(Report {
        insert,
        update,
        lag,
        consistent,
        notes: Vec::new(),
    })
}

async fn meridian_system(sizes: Sizes) -> Result<Report> {
    let east_cluster = PgCluster::start_temp()?;
    let west_cluster = PgCluster::start_temp()?;
    let scratch = tempfile::Builder::new()
        .prefix("meridian-bench-")
        .tempdir()?;
    let east_url = demo::setup_region(&east_cluster, "east", scratch.path()).await?;
    let west_url = demo::setup_region(&west_cluster, "west", scratch.path()).await?;
    let script = scratch.path().join("east_west.ts");
    std::fs::write(&script, EAST_WEST_TS)?;
    let receiver = demo::start_receiver(&west_url, &script, sizes.tls).await?;
    let feed = demo::start_changefeed(&east_url, demo::sink_url(&receiver), Duration::from_secs(2))
        .await?;
    let east = connect(&east_url).await?;
    let west = connect(&west_url).await?;
    let ready = meridian::pgcluster::wait_for(Duration::from_secs(30), || async {
        east.query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'meridian' \
             AND confirmed_flush_lsn IS NOT NULL",
            &[],
        )
        .await
        .map(|r| r.get::<_, i64>(0) > 0)
        .unwrap_or(false)
    })
    .await;
    if !ready {
        bail!("the changefeed's slot was not created");
    }
    let result = phases(System::Meridian, &east, &west, sizes).await;
    let m = &receiver.metrics;
    let label = ["public", "kv"];
    let notes = vec![
        format!(
            "changefeed: {} batches, {} retries; receiver: {} upserts, {} conflicts, {} dropped, {} DLQ",
            feed.metrics.batches_sent.get(),
            feed.metrics.retries.get(),
            m.apply_upserts.with_label_values(&label).get(),
            m.apply_conflicts.with_label_values(&label).get(),
            m.apply_dropped.with_label_values(&label).get(),
            m.dlq_enqueued.with_label_values(&label).get(),
        ),
        // Requests differ in size: the lag phase's carry a few rows, the bulk
        // phases' thousands, and those make up the slowest percent.
        format!(
            "receiver apply p50 {:.1} ms, p99 {:.1} ms per request ({:.0} rows per request on average)",
            demo::histogram_quantile(&m.apply_duration.with_label_values(&label), 0.5).unwrap_or(0.0) * 1000.0,
            demo::histogram_quantile(&m.apply_duration.with_label_values(&label), 0.99).unwrap_or(0.0) * 1000.0,
            m.apply_upserts.with_label_values(&label).get() as f64
                / feed.metrics.batches_sent.get().max(1) as f64,
        ),
    ];
    let consistent = compare(&east, &west).await;
    feed.stop().await?;
    receiver.shutdown().await;
    let (insert, update, lag) = result?;
    Ok(Report {
        insert,
        update,
        lag,
        consistent: consistent?,
        notes,
    })
}

fn main() -> Result<()> {
    // As the `meridian` binary does.
    meridian::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let sizes = Sizes {
        rows: env("BENCH_ROWS", 200_000) as i64,
        txn: env("BENCH_TXN", 1_000).max(1) as i64,
        rate: env("BENCH_RATE", 2_000).max(1) as i64,
        lag_secs: env("BENCH_LAG_SECS", 10).max(1) as u64,
        tls: std::env::var("BENCH_TLS").map_or(true, |v| v != "off"),
    };
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "replication benchmark east → west: {} rows in transactions of {}, then updated; lag at {} rows/s for {}s",
        sizes.rows, sizes.txn, sizes.rate, sizes.lag_secs
    );
    println!(
        "between the regions: {}",
        if sizes.tls {
            "TLS for both (subscription sslmode=require; changefeed → receiver over HTTPS)"
        } else {
            "plaintext for both (subscription sslmode=disable; changefeed → receiver over HTTP)"
        }
    );
    rt.block_on(async move {
        let native = if only.is_empty() || only == "native" {
            println!("native logical replication (publication → subscription):");
            Some(native(sizes).await?)
        } else {
            None
        };
        let meridian = if only.is_empty() || only == "meridian" {
            println!("meridian (changefeed → receiver, east_west.ts: CAS, DLQ, loop filter):");
            Some(meridian_system(sizes).await?)
        } else {
            None
        };
        println!();
        println!("results ({} rows, transactions of {}):", sizes.rows, sizes.txn);
        println!("  {:<10} {:>14} {:>14} {:>12} {:>12}", "", "insert rows/s", "update rows/s", "lag p50", "lag p99");
        for (name, r) in [("native", &native), ("meridian", &meridian)] {
            if let Some(r) = r {
                println!(
                    "  {:<10} {:>14.0} {:>14.0} {:>9.1} ms {:>9.1} ms   east = west: {}",
                    name,
                    r.insert.rows_per_sec(sizes.rows),
                    r.update.rows_per_sec(sizes.rows),
                    ms(r.lag.p50),
                    ms(r.lag.p99),
                    match &r.consistent {
                        Ok(()) => "yes".to_string(),
                        Err(e) => format!("NO ({e})"),
                    }
                );
                for n in &r.notes {
                    println!("  {:<10} {n}", "");
                }
            }
        }
        if let (Some(n), Some(m)) = (&native, &meridian) {
            println!(
                "  ratio meridian/native: insert {:.2}  update {:.2}  (throughput; > 1 is faster)   lag p50 {:.2}  p99 {:.2}  (< 1 is lower)",
                m.insert.rows_per_sec(sizes.rows) / n.insert.rows_per_sec(sizes.rows),
                m.update.rows_per_sec(sizes.rows) / n.update.rows_per_sec(sizes.rows),
                m.lag.p50.as_secs_f64() / n.lag.p50.as_secs_f64(),
                m.lag.p99.as_secs_f64() / n.lag.p99.as_secs_f64(),
            );
            // On a machine where both clusters and the pipeline share the
            // cores, throughput follows the CPU each row costs everywhere.
            println!(
                "  machine CPU µs/row, meridian/native: insert {:.1}/{:.1}  update {:.1}/{:.1}",
                m.insert.machine_us, n.insert.machine_us, m.update.machine_us, n.update.machine_us,
            );
        }
        for r in [&native, &meridian].into_iter().flatten() {
            if let Err(e) = &r.consistent {
                bail!("east and west differ: {e}");
            }
        }
        Ok(())
    })
}

//! `meridian demo`: the seed's east/west active-active demo on an embedded
//! default. Two PostgreSQL clusters, two receivers and two changefeeds in
//! this process, the seed's kv workload on both sides, then a report: rows on
//! each side, whether they are identical, DLQ rows, conflicts, throughput and
//! replication lag.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tokio::sync::watch;
use tokio_postgres::{Client, NoTls};

use crate::cli::{Cli, Command};
use crate::metrics::{ChangefeedMetrics, ReceiverMetrics};
use crate::pgcluster::PgCluster;
use crate::server::RunningServer;
use crate::source::postgres::{run_changefeed, ChangefeedOptions};

/// Flags of `meridian demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Where the east and west clusters live (default: a temporary directory, removed afterwards).
    #[arg(long = "dataDir")]
    pub data_dir: Option<PathBuf>,
    /// Writes per second on each side.
    #[arg(long = "rate", default_value_t = 100)]
    pub rate: u32,
    /// How long the workload runs.
    #[arg(long = "duration", default_value = "20s", value_parser = crate::cli::parse_duration)]
    pub duration: Duration,
    /// First key east writes (equal starts write the same keys: conflicts).
    #[arg(long = "startEast", default_value_t = 0)]
    pub start_east: i64,
    /// First key west writes.
    #[arg(long = "startWest", default_value_t = 0)]
    pub start_west: i64,
    /// Leave everything running after the report, for SQL inspection, until Ctrl-C.
    #[arg(long = "keep")]
    pub keep: bool,
    /// Longest wait for both sides to become quiet after the workload.
    #[arg(long = "settleTimeout", default_value = "60s", value_parser = crate::cli::parse_duration)]
    pub settle_timeout: Duration,
}

/// The schema kit, applied with psql as an operator would.
const SETUP_SQL: &str = include_str!("../sql/postgres/setup.sql");
const EAST_WEST_TS: &str = include_str!("../userscripts/east_west.ts");
const WEST_EAST_TS: &str = include_str!("../userscripts/west_east.ts");

/// One region: its cluster and the `kv` database URL.
pub struct Region {
    pub name: &'static str,
    pub cluster: PgCluster,
    pub url: String,
}

/// Finds psql beside the server binaries or on PATH.
fn psql() -> PathBuf {
    crate::pgcluster::find_bin_dir()
        .map(|d| d.join("psql"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("psql"))
}

/// Creates the `kv` database with the seed's table, applies
/// `sql/postgres/setup.sql` for `region` and enables replication on `kv`.
pub async fn setup_region(cluster: &PgCluster, region: &str, scratch: &Path) -> Result<String> {
    let url = cluster.create_database("kv").await?;
    let setup = scratch.join("setup.sql");
    std::fs::write(&setup, SETUP_SQL)?;
    let out = tokio::process::Command::new(psql())
        .args(["-X", "-q", "-v", &format!("region={region}"), "-f"])
        .arg(&setup)
        .arg(&url)
        .output()
        .await
        .context("running psql (install the PostgreSQL client)")?;
    if !out.status.success() {
        bail!(
            "sql/postgres/setup.sql failed on {region}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let c = connect(&url).await?;
    c.batch_execute(&format!(
        "CREATE TABLE IF NOT EXISTS kv (k INT8 PRIMARY KEY, v BYTEA);
         SELECT meridian_enable('kv', '{region}');"
    ))
    .await
    .with_context(|| format!("enabling kv on {region}"))?;
    Ok(url)
}

pub async fn connect(url: &str) -> Result<Client> {
    let (c, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    tokio::spawn(conn);
    Ok(c)
}

/// Starts a receiver applying to `target_url` with `script`, serving HTTPS
/// with a self-signed certificate when `tls`, else plain HTTP.
pub async fn start_receiver(target_url: &str, script: &Path, tls: bool) -> Result<RunningServer> {
    let script = script.display().to_string();
    let mut argv = vec![
        "meridian",
        "start",
        "--bindAddr",
        "127.0.0.1:0",
        "--metricsAddr",
        "127.0.0.1:0",
        "--disableAuthentication",
        "--targetConn",
        target_url,
        "--userscript",
        &script,
    ];
    if tls {
        argv.push("--tlsSelfSigned");
    }
    let Command::Start(args) = Cli::try_parse_from(argv)?.command else {
        unreachable!("argv names start")
    };
    crate::server::serve(args).await
}

/// A changefeed running in this process.
pub struct RunningChangefeed {
    pub metrics: ChangefeedMetrics,
    pub metrics_addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl RunningChangefeed {
    /// Asks the changefeed to stop and waits for it.
    pub async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        self.task.await.context("changefeed task")?
    }
}

/// The webhook sink URL of a receiver started by [`start_receiver`]
/// (its self-signed certificate is not verified).
pub fn sink_url(receiver: &RunningServer) -> String {
    let base = receiver.base_url();
    if base.starts_with("https:") {
        format!("webhook-{base}/kv/public?insecure_tls_skip_verify=true")
    } else {
        format!("webhook-{base}/kv/public")
    }
}

/// Starts a changefeed from `source_url`'s kv table to `sink`, retrying a
/// sink that does not answer at least every `retry_max`.
pub async fn start_changefeed(
    source_url: &str,
    sink: String,
    retry_max: Duration,
) -> Result<RunningChangefeed> {
    let mut opts = ChangefeedOptions::new(source_url, vec!["kv.public.kv".into()], sink);
    opts.resolved_interval = Some(Duration::from_secs(1));
    opts.retry_max = retry_max;
    let metrics = ChangefeedMetrics::new();
    let metrics_addr = crate::metrics::serve(
        "127.0.0.1:0".parse().expect("address"),
        metrics.registry.clone(),
    )
    .await?;
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(run_changefeed(opts, metrics.clone(), rx));
    Ok(RunningChangefeed {
        metrics,
        metrics_addr,
        stop,
        task,
    })
}

/// The seed's kv workload on one side: sequential keys from `start`, `rate`
/// upserts a second for `duration`. Returns the number of rows written.
pub async fn workload(
    url: String,
    start: i64,
    rate: u32,
    duration: Duration,
    written: Arc<AtomicU64>,
) -> Result<()> {
    let c = connect(&url).await?;
    let stmt = c
        .prepare(
            "INSERT INTO kv (k, v) SELECT k, decode(md5(random()::text), 'hex') FROM unnest($1::int8[]) AS k
             ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        )
        .await?;
    let tick = Duration::from_millis(10);
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut next = start;
    while started.elapsed() < duration {
        interval.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate as f64) as i64 + start;
        if due <= next {
            continue;
        }
        let keys: Vec<i64> = (next..due).collect();
        c.execute(&stmt, &[&keys]).await?;
        written.fetch_add(keys.len() as u64, Ordering::Relaxed);
        next = due;
    }
    Ok(())
}

/// Rows of kv in key order, with the replication columns, as comparable text.
pub async fn kv_rows(c: &Client) -> Result<Vec<String>> {
    let rows = c
        .query(
            "SELECT k::text || '|' || encode(v, 'hex') || '|' || _source || '|' ||
                    (extract(epoch FROM _timestamp) * 1000000)::int8::text
               FROM kv ORDER BY k",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

async fn count(c: &Client, sql: &str) -> Result<i64> {
    Ok(c.query_one(sql, &[]).await?.get(0))
}

/// A quantile from a Prometheus histogram's buckets, interpolating within a
/// bucket as `histogram_quantile` does.
pub fn histogram_quantile(h: &prometheus::Histogram, q: f64) -> Option<f64> {
    use prometheus::core::Collector;
    let mf = h.collect();
    let m = mf.first()?.get_metric().first()?.get_histogram().clone();
    let total = m.get_sample_count() as f64;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev_bound = 0.0;
    let mut prev_count = 0.0;
    for b in m.get_bucket() {
        let count = b.cumulative_count() as f64;
        if count >= rank {
            let within = if count > prev_count {
                (rank - prev_count) / (count - prev_count)
            } else {
                0.0
            };
            return Some(prev_bound + (b.upper_bound() - prev_bound) * within);
        }
        prev_bound = b.upper_bound();
        prev_count = count;
    }
    Some(prev_bound)
}

fn receiver_count(
    m: &ReceiverMetrics,
    pick: fn(&ReceiverMetrics) -> &prometheus::IntCounterVec,
) -> u64 {
    pick(m).with_label_values(&["public", "kv"]).get()
}

/// The whole demo. Exits non-zero when east and west do not converge.
pub async fn run(args: DemoArgs) -> Result<()> {
    let interrupted = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    let (root, temporary) = match &args.data_dir {
        Some(d) => (d.clone(), false),
        None => (
            tempfile::Builder::new()
                .prefix("meridian-demo-")
                .tempdir()?
                .keep(),
            true,
        ),
    };
    let result = tokio::select! {
        r = demo(&args, &root) => r,
        _ = interrupted => {
            println!("\ninterrupted: stopping everything");
            Ok(())
        }
    };
    if temporary {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

async fn demo(args: &DemoArgs, root: &Path) -> Result<()> {
    std::fs::create_dir_all(root)?;
    println!(
        "meridian demo: east and west PostgreSQL clusters under {}",
        root.display()
    );
    let keep_data = args.data_dir.is_some();
    let east_cluster = PgCluster::start_in(&root.join("east"), keep_data)?;
    let west_cluster = PgCluster::start_in(&root.join("west"), keep_data)?;
    let scratch = root.join("scripts");
    std::fs::create_dir_all(&scratch)?;
    let east = Region {
        name: "east",
        url: setup_region(&east_cluster, "east", &scratch).await?,
        cluster: east_cluster,
    };
    let west = Region {
        name: "west",
        url: setup_region(&west_cluster, "west", &scratch).await?,
        cluster: west_cluster,
    };
    let ew_script = scratch.join("east_west.ts");
    let we_script = scratch.join("west_east.ts");
    std::fs::write(&ew_script, EAST_WEST_TS)?;
    std::fs::write(&we_script, WEST_EAST_TS)?;

    // east → west: east's changefeed posts to the receiver applying to west.
    let east_west = start_receiver(&west.url, &ew_script, true).await?;
    let west_east = start_receiver(&east.url, &we_script, true).await?;
    let cf_east = start_changefeed(&east.url, sink_url(&east_west), Duration::from_secs(2)).await?;
    let cf_west = start_changefeed(&west.url, sink_url(&west_east), Duration::from_secs(2)).await?;
    for (component, region, addr) in [
        (
            "east_west",
            "west",
            east_west.metrics_addr().expect("metricsAddr set"),
        ),
        (
            "west_east",
            "east",
            west_east.metrics_addr().expect("metricsAddr set"),
        ),
        ("changefeed_east", "east", cf_east.metrics_addr),
        ("changefeed_west", "west", cf_west.metrics_addr),
    ] {
        println!(
            "metrics: {component} {region} http://127.0.0.1:{}/metrics",
            addr.port()
        );
    }

    let conflicts_expected = args.start_east == args.start_west;
    println!(
        "workload: {} upserts/s on each side for {:?}, keys from {} (east) and {} (west){}",
        args.rate,
        args.duration,
        args.start_east,
        args.start_west,
        if conflicts_expected {
            ": the same keys, so conflicts"
        } else {
            ""
        }
    );
    let east_written = Arc::new(AtomicU64::new(0));
    let west_written = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let we = tokio::spawn(workload(
        east.url.clone(),
        args.start_east,
        args.rate,
        args.duration,
        east_written.clone(),
    ));
    let ww = tokio::spawn(workload(
        west.url.clone(),
        args.start_west,
        args.rate,
        args.duration,
        west_written.clone(),
    ));
    let progress = |label: &str| {
        let ew = &east_west.metrics;
        let wem = &west_east.metrics;
        println!(
            "[{:>5.1}s] {label:<9} written east {:>6} west {:>6} | applied east→west {:>6} west→east {:>6} | conflicts west {:>5} east {:>5} | lag east→west {:.2}s west→east {:.2}s",
            started.elapsed().as_secs_f64(),
            east_written.load(Ordering::Relaxed),
            west_written.load(Ordering::Relaxed),
            receiver_count(ew, |m| &m.apply_upserts),
            receiver_count(wem, |m| &m.apply_upserts),
            receiver_count(ew, |m| &m.apply_conflicts),
            receiver_count(wem, |m| &m.apply_conflicts),
            cf_east.metrics.lag_seconds.get(),
            cf_west.metrics.lag_seconds.get(),
        );
    };
    let mut last_progress = Instant::now();
    while !(we.is_finished() && ww.is_finished()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if last_progress.elapsed() >= Duration::from_secs(2) {
            progress("writing");
            last_progress = Instant::now();
        }
    }
    we.await??;
    ww.await??;
    let write_secs = started.elapsed().as_secs_f64();

    // Quiet: both sides hold the same rows and nothing moved for two checks.
    let ec = connect(&east.url).await?;
    let wc = connect(&west.url).await?;
    let settle_start = Instant::now();
    let mut last = None;
    let mut stable = 0;
    while settle_start.elapsed() < args.settle_timeout {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let e = kv_rows(&ec).await?;
        let w = kv_rows(&wc).await?;
        let snapshot = (
            e.len(),
            w.len(),
            e == w,
            applied_total(&east_west, &west_east),
        );
        if e == w && last.as_ref() == Some(&snapshot) {
            stable += 1;
            if stable >= 2 {
                break;
            }
        } else {
            stable = 0;
        }
        last = Some(snapshot);
        progress("settling");
    }
    let total_secs = started.elapsed().as_secs_f64();

    let e_rows = kv_rows(&ec).await?;
    let w_rows = kv_rows(&wc).await?;
    let identical = e_rows == w_rows;
    let e_dlq = count(&ec, "SELECT count(*) FROM cdc_sink_dlq").await?;
    let w_dlq = count(&wc, "SELECT count(*) FROM cdc_sink_dlq").await?;
    let applied = applied_total(&east_west, &west_east);
    let lag = |q| {
        let ew = histogram_quantile(
            &east_west
                .metrics
                .apply_mutation_age
                .with_label_values(&["public", "kv"]),
            q,
        );
        let we = histogram_quantile(
            &west_east
                .metrics
                .apply_mutation_age
                .with_label_values(&["public", "kv"]),
            q,
        );
        match (ew, we) {
            (Some(a), Some(b)) => format!("{:.3}s", a.max(b)),
            (Some(a), None) | (None, Some(a)) => format!("{a:.3}s"),
            (None, None) => "n/a".into(),
        }
    };
    println!();
    println!("meridian demo report");
    println!(
        "  workload     {} upserts/s per side for {write_secs:.1}s; settled after {total_secs:.1}s",
        args.rate
    );
    println!(
        "  written      east {}  west {}",
        east_written.load(Ordering::Relaxed),
        west_written.load(Ordering::Relaxed)
    );
    println!(
        "  rows         east {}  west {}",
        e_rows.len(),
        w_rows.len()
    );
    if identical {
        println!(
            "  identical    yes: {} rows compared one by one, including _source and _timestamp",
            e_rows.len()
        );
    } else {
        let diff = e_rows
            .iter()
            .zip(&w_rows)
            .find(|(a, b)| a != b)
            .map(|(a, b)| format!("first difference: east {a} vs west {b}"))
            .unwrap_or_else(|| "row counts differ".into());
        println!("  identical    NO: {diff}");
    }
    println!("  DLQ rows     east {e_dlq}  west {w_dlq}   (SELECT * FROM cdc_sink_dlq)");
    println!(
        "  conflicts    applied to east {}  applied to west {}",
        receiver_count(&west_east.metrics, |m| &m.apply_conflicts),
        receiver_count(&east_west.metrics, |m| &m.apply_conflicts)
    );
    println!(
        "  replicated   {applied} rows applied in {write_secs:.1}s of workload: {:.0} rows/s",
        applied as f64 / write_secs
    );
    println!(
        "  lag          p50 {}  p99 {}  (commit at the source → applied at the target)",
        lag(0.5),
        lag(0.99)
    );

    if args.keep {
        println!();
        println!("everything keeps running until Ctrl-C. Inspect with:");
        for r in [&east, &west] {
            println!(
                "  {}: psql '{}' -c 'SELECT * FROM cdc_sink_dlq LIMIT 10'",
                r.name, r.url
            );
        }
        println!(
            "  receivers: {}/_/healthz (applies to west), {}/_/healthz (applies to east)",
            east_west.base_url(),
            west_east.base_url()
        );
        std::future::pending::<()>().await;
    }

    cf_east.stop().await?;
    cf_west.stop().await?;
    east_west.shutdown().await;
    west_east.shutdown().await;
    drop(east);
    drop(west);
    if !identical {
        bail!("east and west did not converge");
    }
    Ok(())
}

fn applied_total(a: &RunningServer, b: &RunningServer) -> u64 {
    receiver_count(&a.metrics, |m| &m.apply_upserts)
        + receiver_count(&b.metrics, |m| &m.apply_upserts)
}

//! East/west convergence against real PostgreSQL: two clusters, two
//! `meridian start` processes, two changefeeds, conflicting writes on both
//! sides, a receiver killed with SIGKILL and restarted, a changefeed restarted.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian::demo::{connect, kv_rows, setup_region, start_changefeed, workload};
use meridian::pgcluster::{free_port, wait_for, PgCluster};

/// A `meridian start` child process, killed when dropped.
struct Receiver {
    child: Option<Child>,
    port: u16,
    target: String,
    script: String,
}

impl Receiver {
    fn spawn(port: u16, target: &str, script: &Path) -> Self {
        let mut r = Receiver {
            child: None,
            port,
            target: target.to_string(),
            script: script.display().to_string(),
        };
        r.start();
        r
    }

    fn start(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_meridian"))
            .args(["start", "--bindAddr", &format!("127.0.0.1:{}", self.port)])
            .args(["--disableAuthentication", "--targetConn", &self.target])
            .args(["--userscript", &self.script])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("meridian start");
        self.child = Some(child);
    }

    /// SIGKILL: no shutdown, requests in flight are cut off.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn sink(&self) -> String {
        format!("webhook-http://127.0.0.1:{}/kv/public", self.port)
    }

    async fn wait_healthy(&self) {
        let url = format!("http://127.0.0.1:{}/_/healthz", self.port);
        let ok = wait_for(Duration::from_secs(20), || async {
            reqwest::get(&url)
                .await
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        })
        .await;
        assert!(ok, "receiver on {} did not become healthy", self.port);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn slot_ready(url: &str) {
    let c = connect(url).await.unwrap();
    let ready = wait_for(Duration::from_secs(20), || async {
        c.query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'meridian' AND confirmed_flush_lsn IS NOT NULL",
            &[],
        )
        .await
        .map(|r| r.is_some())
        .unwrap_or(false)
    })
    .await;
    assert!(ready, "replication slot on {url} not ready");
}

const DLQ_DUPLICATES: &str = "SELECT count(*) FROM (SELECT 1 FROM cdc_sink_dlq
    GROUP BY dlq_name, source_nanos, source_logical, data_after HAVING count(*) > 1) d";

/// DLQ rows that are not older than the row that stands: not genuine losers.
const DLQ_NOT_LOSERS: &str = "SELECT count(*) FROM cdc_sink_dlq d JOIN kv ON kv.k = (d.data_after->>'k')::int8
    WHERE ((d.data_after->>'_timestamp')::timestamptz, d.data_after->>'_source') >= (kv._timestamp, kv._source)";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn east_and_west_converge_through_crashes_and_restarts() {
    let east_cluster = PgCluster::start_temp().unwrap();
    let west_cluster = PgCluster::start_temp().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let east = setup_region(&east_cluster, "east", scratch.path())
        .await
        .unwrap();
    let west = setup_region(&west_cluster, "west", scratch.path())
        .await
        .unwrap();
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("userscripts");

    // Changefeeds first, receivers not up yet: everything written now is
    // concurrent on both sides, so every key of phase 1 is a real conflict.
    let mut east_west = Receiver::spawn(free_port().unwrap(), &west, &scripts.join("east_west.ts"));
    east_west.kill();
    let west_east = Receiver::spawn(free_port().unwrap(), &east, &scripts.join("west_east.ts"));
    let mut west_east = west_east;
    west_east.kill();
    let retry = Duration::from_millis(500);
    let cf_east = start_changefeed(&east, east_west.sink(), retry)
        .await
        .unwrap();
    let mut cf_west = Some(
        start_changefeed(&west, west_east.sink(), retry)
            .await
            .unwrap(),
    );
    slot_ready(&east).await;
    slot_ready(&west).await;

    // Each statement stamps a later `_timestamp` than the one before, so
    // west wins the lower half of the keys and east the upper half: both
    // DLQs must fill, whatever the timing of phase 2.
    let phase1 = 200i64;
    let ec = connect(&east).await.unwrap();
    let wc = connect(&west).await.unwrap();
    let insert = "INSERT INTO kv (k, v) SELECT k, decode(md5(random()::text), 'hex')
                  FROM generate_series($1::int8, $2::int8 - 1) k";
    let half = phase1 / 2;
    ec.execute(insert, &[&0i64, &half]).await.unwrap();
    wc.execute(insert, &[&0i64, &phase1]).await.unwrap();
    ec.execute(insert, &[&half, &phase1]).await.unwrap();
    east_west.start();
    west_east.start();
    east_west.wait_healthy().await;
    west_east.wait_healthy().await;

    // Phase 2: both sides write the same new keys while a receiver is killed
    // and restarted and a changefeed is stopped and started again.
    let duration = Duration::from_secs(8);
    let we = tokio::spawn(workload(
        east.clone(),
        10_000,
        150,
        duration,
        Arc::new(AtomicU64::new(0)),
    ));
    let ww = tokio::spawn(workload(
        west.clone(),
        10_000,
        150,
        duration,
        Arc::new(AtomicU64::new(0)),
    ));
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    east_west.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    east_west.start();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cf_west.take().unwrap().stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cf_west = start_changefeed(&west, west_east.sink(), retry)
        .await
        .unwrap();
    we.await.unwrap().unwrap();
    ww.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_secs(6));

    // Converged: identical rows, _source and _timestamp included.
    let converged = wait_for(Duration::from_secs(60), || async {
        kv_rows(&ec).await.unwrap() == kv_rows(&wc).await.unwrap()
    })
    .await;
    let (e_rows, w_rows) = (kv_rows(&ec).await.unwrap(), kv_rows(&wc).await.unwrap());
    assert!(
        converged,
        "east and west differ: {} vs {} rows",
        e_rows.len(),
        w_rows.len()
    );
    assert!(
        e_rows.len() as i64 >= phase1 + 1000,
        "workload wrote {} rows",
        e_rows.len()
    );
    // Let in-flight retries land before checking the DLQs.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Phase 1: every key's losing version is in the winner's DLQ, once, and
    // nothing of that key in the loser's.
    for (winner, winner_c, loser, loser_c) in
        [("east", &ec, "west", &wc), ("west", &wc, "east", &ec)]
    {
        let in_winner: i64 = winner_c
            .query_one(
                "SELECT count(*) FROM cdc_sink_dlq d JOIN kv ON kv.k = (d.data_after->>'k')::int8
                  WHERE kv.k < $1 AND kv._source = $2 AND d.data_after->>'_source' = $3",
                &[&phase1, &winner, &loser],
            )
            .await
            .unwrap()
            .get(0);
        let won: i64 = winner_c
            .query_one(
                "SELECT count(*) FROM kv WHERE k < $1 AND _source = $2",
                &[&phase1, &winner],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(won, half, "{winner} wrote last on half of the phase-1 keys");
        assert_eq!(
            in_winner, won,
            "{winner} won {won} phase-1 keys; its DLQ must hold each {loser} version once"
        );
        let in_loser: i64 = loser_c
            .query_one(
                "SELECT count(*) FROM cdc_sink_dlq WHERE (data_after->>'k')::int8 IN
                   (SELECT k FROM kv WHERE k < $1 AND _source = $2)",
                &[&phase1, &winner],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            in_loser, 0,
            "{loser} lost those keys: nothing of them belongs in its DLQ"
        );
    }
    // Everywhere: nothing twice in a DLQ (replays after the kill and restart),
    // and every DLQ row is older than the row that stands.
    for (name, c) in [("east", &ec), ("west", &wc)] {
        let dups: i64 = c.query_one(DLQ_DUPLICATES, &[]).await.unwrap().get(0);
        assert_eq!(dups, 0, "{name} DLQ holds a change twice");
        let bad: i64 = c.query_one(DLQ_NOT_LOSERS, &[]).await.unwrap().get(0);
        assert_eq!(bad, 0, "{name} DLQ holds a change that should have won");
        let total: i64 = c
            .query_one("SELECT count(*) FROM cdc_sink_dlq", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            total > 0,
            "{name} DLQ is empty although both sides wrote the same keys"
        );
    }
    cf_east.stop().await.unwrap();
    cf_west.stop().await.unwrap();
}

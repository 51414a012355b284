//! `meridian changefeed` against real PostgreSQL, sending to a small
//! in-test webhook receiver that records what it accepted and can be told to
//! fail.

mod common;
use common::{connect, fresh_db, sql};

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use meridian::changefeed::Hlc;
use meridian::metrics::ChangefeedMetrics;
use meridian::pgcluster::{self, wait_for};
use meridian::source::postgres::{run_changefeed, ChangefeedOptions};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Default)]
struct SinkState {
    /// Bodies answered 2xx, in order.
    accepted: Vec<Value>,
    /// Every request, with the status it got.
    attempts: Vec<(u16, Value)>,
    /// Statuses to answer next (then 200).
    fail_next: VecDeque<u16>,
    /// Answer this to everything while set.
    fail_all: Option<u16>,
    auth: Vec<Option<String>>,
    /// Throughput mode: answer 200 without parsing or keeping bodies.
    fast: bool,
    fast_bytes: usize,
}

#[derive(Clone)]
struct TestSink {
    addr: SocketAddr,
    state: Arc<Mutex<SinkState>>,
}

impl TestSink {
    async fn start() -> TestSink {
        let state = Arc::new(Mutex::new(SinkState::default()));
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(handle))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TestSink { addr, state }
    }

    /// The same recorder behind HTTPS with a self-signed certificate.
    async fn start_tls() -> TestSink {
        let state = Arc::new(Mutex::new(SinkState::default()));
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::post(handle))
            .with_state(state.clone());
        let cfg = meridian::server::tls::self_signed().await.unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", pgcluster::free_port().unwrap())
            .parse()
            .unwrap();
        tokio::spawn(async move {
            axum_server::bind_rustls(addr, cfg)
                .serve(app.into_make_service())
                .await
                .unwrap()
        });
        TestSink { addr, state }
    }

    fn url(&self) -> String {
        format!("webhook-http://{}/db/public", self.addr)
    }

    /// Rows accepted, in order (payload entries only).
    fn rows(&self) -> Vec<Value> {
        let s = self.state.lock().unwrap();
        s.accepted
            .iter()
            .filter_map(|b| b.get("payload").and_then(|p| p.as_array()).cloned())
            .flatten()
            .collect()
    }

    fn accepted(&self) -> Vec<Value> {
        self.state.lock().unwrap().accepted.clone()
    }

    async fn wait_rows(&self, n: usize) -> Vec<Value> {
        let ok = wait_for(Duration::from_secs(30), || {
            let me = self.clone();
            async move { me.rows().len() >= n }
        })
        .await;
        let rows = self.rows();
        assert!(ok, "expected {n} rows, got {}: {rows:#?}", rows.len());
        rows
    }
}

async fn handle(
    State(state): State<Arc<Mutex<SinkState>>>,
    headers: axum::http::HeaderMap,
    body: String,
) -> (StatusCode, String) {
    {
        let mut s = state.lock().unwrap();
        if s.fast {
            s.fast_bytes += body.len();
            return (StatusCode::OK, String::new());
        }
    }
    let v: Value = serde_json::from_str(&body).expect("the changefeed sends JSON");
    let mut s = state.lock().unwrap();
    s.auth.push(
        headers
            .get("authorization")
            .map(|h| h.to_str().unwrap().to_string()),
    );
    let status = s
        .fail_all
        .or_else(|| s.fail_next.pop_front())
        .unwrap_or(200);
    s.attempts.push((status, v.clone()));
    if status == 200 {
        s.accepted.push(v);
        (StatusCode::OK, String::new())
    } else {
        (
            StatusCode::from_u16(status).unwrap(),
            format!("test sink says {status}"),
        )
    }
}

struct Running {
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
    metrics: ChangefeedMetrics,
}

impl Running {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("changefeed stops")
            .unwrap()
            .unwrap();
    }
}

fn options(url: &str, tables: &[&str], sink: &TestSink) -> ChangefeedOptions {
    let mut o = ChangefeedOptions::new(
        url,
        tables.iter().map(|s| s.to_string()).collect(),
        sink.url(),
    );
    o.retry_initial = Duration::from_millis(20);
    o.retry_max = Duration::from_millis(100);
    o.client_timeout = Duration::from_secs(5);
    o
}

fn start(opts: ChangefeedOptions) -> Running {
    let (tx, rx) = watch::channel(false);
    let metrics = ChangefeedMetrics::new();
    let m = metrics.clone();
    let task = tokio::spawn(async move { run_changefeed(opts, m, rx).await });
    Running {
        stop: tx,
        task,
        metrics,
    }
}

/// Starts a changefeed and waits until its slot streams.
async fn start_streaming(db: &tokio_postgres::Client, opts: ChangefeedOptions) -> Running {
    let slot = opts.slot_name();
    let feed = start(opts);
    wait_slot(db, &slot).await;
    feed
}

/// Waits until the changefeed's slot exists and is consistent (so later
/// writes are captured).
async fn wait_slot(db: &tokio_postgres::Client, slot: &str) {
    let ok = wait_for(Duration::from_secs(60), || async {
        db.query_opt(
            // confirmed_flush_lsn is set once the slot reached a consistent
            // point; changes committed before that are not decoded.
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 \
             AND confirmed_flush_lsn IS NOT NULL",
            &[&slot],
        )
        .await
        .unwrap()
        .is_some()
    })
    .await;
    assert!(ok, "slot {slot} was not created");
}

fn updated(row: &Value) -> Hlc {
    row["updated"].as_str().unwrap().parse().unwrap()
}

async fn kv_db(name: &str) -> (String, tokio_postgres::Client) {
    fresh_db(
        name,
        "CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT, n NUMERIC, j JSONB, b BOOL, f FLOAT8, \
         a INT4[], ts TIMESTAMPTZ, by BYTEA); ALTER TABLE kv REPLICA IDENTITY FULL;",
    )
    .await
}

/// A fresh `kv` database, a sink, and the options of a changefeed of its
/// `kv` table named `name` (so are its slot and publication).
async fn kv_feed(name: &str) -> (String, tokio_postgres::Client, TestSink, ChangefeedOptions) {
    let (url, db) = kv_db(name).await;
    let sink = TestSink::start().await;
    let mut o = options(&url, &["kv"], &sink);
    o.name = name.into();
    (url, db, sink, o)
}

fn ks(rows: &[Value]) -> Vec<i64> {
    rows.iter().map(|r| r["key"][0].as_i64().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wire_format_of_insert_update_delete() {
    let (url, db) = kv_db("cf_wire").await;
    let sink = TestSink::start().await;
    let mut o = options(&url, &["cf_wire.public.kv"], &sink);
    o.name = "cf_wire".into();
    o.auth_token = Some("sekret".into());
    let feed = start_streaming(&db, o).await;

    sql(&db, "INSERT INTO kv VALUES (1, 'one', 12345678901234567890.000000000001, '{\"x\": [1, 2]}', true, \
         1.5, '{1,NULL,3}', '2024-01-02 03:04:05.678901+00', '\\x0102');",).await;
    sql(
        &db,
        "UPDATE kv SET v = 'uno', n = 'NaN', f = 'Infinity' WHERE k = 1",
    )
    .await;
    sql(&db, "DELETE FROM kv WHERE k = 1").await;
    // One transaction, two rows: one `updated`.
    sql(&db, "BEGIN; INSERT INTO kv (k, v) VALUES (2, 'two'); INSERT INTO kv (k, v) VALUES (3, 'three'); COMMIT;").await;

    let rows = sink.wait_rows(5).await;
    assert_eq!(rows.len(), 5, "{rows:#?}");
    let ins = &rows[0];
    let keys: Vec<&str> = ins
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    assert_eq!(keys, ["after", "before", "key", "topic", "updated"]);
    assert_eq!(ins["topic"], json!("kv"));
    assert_eq!(ins["key"], json!([1]));
    assert_eq!(ins["before"], Value::Null);
    let after = &ins["after"];
    assert_eq!(after["k"], json!(1));
    assert_eq!(after["v"], json!("one"));
    assert_eq!(
        serde_json::to_string(&after["n"]).unwrap(),
        "12345678901234567890.000000000001"
    );
    assert_eq!(after["j"], json!({"x": [1, 2]}));
    assert_eq!(after["b"], json!(true));
    assert_eq!(after["f"], json!(1.5));
    assert_eq!(after["a"], json!([1, null, 3]));
    assert_eq!(after["ts"], json!("2024-01-02 03:04:05.678901+00"));
    assert_eq!(after["by"], json!("\\x0102"));

    let upd = &rows[1];
    assert_eq!(upd["before"]["v"], json!("one"));
    assert_eq!(upd["after"]["v"], json!("uno"));
    assert_eq!(upd["after"]["n"], json!("NaN"));
    assert_eq!(upd["after"]["f"], json!("Infinity"));
    assert_eq!(upd["after"]["j"], json!({"x": [1, 2]}));

    let del = &rows[2];
    assert_eq!(del["after"], Value::Null);
    assert_eq!(del["before"]["v"], json!("uno"));
    assert_eq!(del["key"], json!([1]));

    assert_eq!(
        rows[3]["updated"], rows[4]["updated"],
        "one txn, one updated"
    );
    for w in rows[..4].windows(2) {
        assert!(
            updated(&w[0]) < updated(&w[1]),
            "updated strictly increases: {w:?}"
        );
    }
    // updated is the commit time: close to now, nanosecond wall time.
    let age = now_nanos() - updated(&rows[0]).nanos;
    assert!(
        (0..60_000_000_000).contains(&age),
        "updated is a recent commit time: {age}"
    );

    // Envelope and auth.
    let bodies = sink.accepted();
    for b in &bodies {
        let n = b["payload"].as_array().unwrap().len();
        assert_eq!(b["length"], json!(n));
    }
    assert!(sink
        .state
        .lock()
        .unwrap()
        .auth
        .iter()
        .all(|a| a.as_deref() == Some("Bearer sekret")));
    // The sink records a batch before the changefeed has read its answer:
    // the counters follow shortly after.
    let rows_sent = feed.metrics.rows_sent.with_label_values(&["public", "kv"]);
    assert!(
        wait_for(Duration::from_secs(5), || async { rows_sent.get() >= 5 }).await,
        "rows_sent is {}",
        rows_sent.get()
    );
    assert_eq!(rows_sent.get(), 5);
    assert!(feed.metrics.batches_sent.get() >= 1);
    feed.stop().await;
}

fn now_nanos() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolved_is_monotonic_and_never_ahead_of_unsent_rows() {
    let (url, db, sink, mut o) = kv_feed("cf_resolved").await;
    o.resolved_interval = Some(Duration::from_millis(100));
    let feed = start_streaming(&db, o).await;

    // Idle: resolved still advances.
    let ok = wait_for(Duration::from_secs(10), || {
        let s = sink.clone();
        async move {
            s.accepted()
                .iter()
                .filter(|b| b.get("resolved").is_some())
                .count()
                >= 3
        }
    })
    .await;
    assert!(ok, "resolved timestamps while idle");

    // Concurrent writers while resolved timestamps flow.
    let mut tasks = Vec::new();
    for w in 0..4i64 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let db = connect(&url).await;
            for i in 0..50i64 {
                let k = w * 1000 + i;
                db.execute("INSERT INTO kv (k, v) VALUES ($1, 'x')", &[&k])
                    .await
                    .unwrap();
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    sink.wait_rows(200).await;
    let last_row_updated = sink.rows().iter().map(updated).max().unwrap();
    // A resolved at or past the last row arrives.
    let ok = wait_for(Duration::from_secs(10), || {
        let s = sink.clone();
        async move {
            s.accepted().iter().any(|b| {
                b.get("resolved").is_some_and(|r| {
                    r.as_str().unwrap().parse::<Hlc>().unwrap() >= last_row_updated
                })
            })
        }
    })
    .await;
    assert!(ok, "resolved catches up with the rows");
    feed.stop().await;

    let mut last_resolved = Hlc::default();
    let mut last_updated = Hlc::default();
    for b in sink.accepted() {
        if let Some(r) = b.get("resolved") {
            let r: Hlc = r.as_str().unwrap().parse().unwrap();
            assert!(r > last_resolved, "resolved never goes backwards");
            assert!(r >= last_updated, "resolved covers what was sent");
            last_resolved = r;
        } else {
            for row in b["payload"].as_array().unwrap() {
                let u = updated(row);
                assert!(
                    u > last_resolved,
                    "row {row} sent after resolved {last_resolved}"
                );
                assert!(u >= last_updated, "updated never goes backwards");
                last_updated = u;
            }
        }
    }
    let mut keys = ks(&sink.rows());
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_and_4xx_are_retried_not_skipped() {
    let (_, db, sink, o) = kv_feed("cf_retry").await;
    let feed = start_streaming(&db, o).await;

    sink.state.lock().unwrap().fail_next.extend([500, 503]);
    sql(&db, "INSERT INTO kv (k, v) VALUES (1, 'a'), (2, 'b')").await;
    let rows = sink.wait_rows(2).await;
    assert_eq!(ks(&rows), [1, 2]);

    sink.state.lock().unwrap().fail_next.extend([400, 400, 422]);
    sql(&db, "INSERT INTO kv (k, v) VALUES (3, 'c')").await;
    sql(&db, "INSERT INTO kv (k, v) VALUES (4, 'd')").await;
    let rows = sink.wait_rows(4).await;
    assert_eq!(ks(&rows), [1, 2, 3, 4], "nothing skipped, order kept");
    {
        let s = sink.state.lock().unwrap();
        let failed: Vec<u16> = s
            .attempts
            .iter()
            .map(|a| a.0)
            .filter(|&c| c != 200)
            .collect();
        assert_eq!(failed, [500, 503, 400, 400, 422]);
        // The rejected batch is the one sent again.
        let rejected = &s.attempts.iter().find(|a| a.0 == 400).unwrap().1;
        assert_eq!(rejected["payload"][0]["key"], json!([3]));
    }
    assert!(feed.metrics.retries.get() >= 5);
    assert_eq!(feed.metrics.errors.with_label_values(&["5xx"]).get(), 2);
    assert_eq!(feed.metrics.errors.with_label_values(&["4xx"]).get(), 3);
    feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_without_loss_or_endless_resends() {
    let (_, db, sink, o) = kv_feed("cf_restart").await;

    let feed = start_streaming(&db, o.clone()).await;
    sql(
        &db,
        "INSERT INTO kv (k, v) SELECT g, 'first' FROM generate_series(1, 10) g",
    )
    .await;
    sink.wait_rows(10).await;
    feed.stop().await;

    // Written while the changefeed is down.
    sql(
        &db,
        "INSERT INTO kv (k, v) SELECT g, 'second' FROM generate_series(11, 20) g",
    )
    .await;

    // The sink refuses everything: nothing is acknowledged.
    sink.state.lock().unwrap().fail_all = Some(500);
    let feed = start(o.clone());
    let ok = wait_for(Duration::from_secs(20), || {
        let s = sink.clone();
        async move {
            s.state
                .lock()
                .unwrap()
                .attempts
                .iter()
                .filter(|a| a.0 == 500)
                .count()
                >= 2
        }
    })
    .await;
    assert!(
        ok,
        "the changefeed tried to send the rows written while it was down"
    );
    feed.stop().await;

    // Now it accepts: rows 11..20 come (again), rows 1..10 do not.
    {
        let mut s = sink.state.lock().unwrap();
        s.fail_all = None;
        s.accepted.clear();
    }
    let feed = start(o.clone());
    let rows = sink.wait_rows(10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rows2 = sink.rows();
    assert_eq!(rows.len(), rows2.len(), "no endless re-sends");
    assert_eq!(ks(&rows2), (11..=20).collect::<Vec<_>>());
    feed.stop().await;

    // A fresh start after everything was acknowledged sends nothing old.
    sink.state.lock().unwrap().accepted.clear();
    let feed = start(o);
    sql(&db, "INSERT INTO kv (k, v) VALUES (21, 'third')").await;
    let rows = sink.wait_rows(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ks(&sink.rows()), [21], "{rows:?}");
    feed.stop().await;
}

async fn scan_marked(db: &tokio_postgres::Client, slot: &str) -> bool {
    db.query_opt(
        "SELECT 1 FROM public.meridian_initial_scans WHERE slot_name = $1",
        &[&slot],
    )
    .await
    .unwrap()
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_scan_sends_existing_rows_before_changes() {
    let (_, db, sink, mut o) = kv_feed("cf_scan").await;
    sql(
        &db,
        "INSERT INTO kv (k, v) SELECT g, 'v' || g FROM generate_series(1, 2500) g; \
         INSERT INTO kv VALUES (0, 'zero', 12345678901234567890.000000000001, '{\"x\": [1, 2]}', \
         true, 1.5, '{1,NULL,3}', '2024-01-02 03:04:05.678901+00', '\\x0102');",
    )
    .await;
    o.flush_rows = 1000;
    o.resolved_interval = Some(Duration::from_millis(100));
    let feed = start(o.clone());

    // Every row the table held, once, as an insert, all with one `updated`.
    let rows = sink.wait_rows(2501).await;
    let mut keys = ks(&rows);
    keys.sort();
    assert_eq!(keys, (0..=2500).collect::<Vec<_>>());
    assert!(rows
        .iter()
        .all(|r| r["before"].is_null() && r["topic"] == json!("kv")));
    let scanned_at = updated(&rows[0]);
    assert!(rows.iter().all(|r| updated(r) == scanned_at));
    assert_eq!(
        rows.iter().find(|r| r["key"] == json!([7])).unwrap()["after"]["v"],
        json!("v7")
    );
    assert!(
        sink.accepted()
            .iter()
            .filter(|b| b.get("payload").is_some())
            .count()
            >= 3
    );
    let scanned_zero = rows.iter().find(|r| r["key"] == json!([0])).unwrap()["after"].clone();
    let scan_rows = feed.metrics.scan_rows.with_label_values(&["public", "kv"]);
    assert!(wait_for(Duration::from_secs(5), || async { scan_rows.get() == 2501 }).await);

    // Then the stream, above the scan: a changed row's `before` is the
    // scanned row exactly (values print the same both ways).
    sql(
        &db,
        "UPDATE kv SET v = 'changed' WHERE k = 7; UPDATE kv SET k = k WHERE k = 0",
    )
    .await;
    let rows = sink.wait_rows(2503).await;
    let changed = &rows[2501];
    assert_eq!(changed["before"]["v"], json!("v7"));
    assert_eq!(changed["after"]["v"], json!("changed"));
    assert!(updated(changed) > scanned_at);
    assert_eq!(rows[2502]["before"], scanned_zero);
    assert_eq!(rows[2502]["after"], scanned_zero);
    // A resolved checkpoint never claims less than the scan.
    assert!(sink
        .accepted()
        .iter()
        .filter_map(|b| b.get("resolved"))
        .all(|r| r.as_str().unwrap().parse::<Hlc>().unwrap() >= scanned_at));
    assert!(
        !scan_marked(&db, "cf_scan").await,
        "the finished scan is unmarked"
    );
    assert_eq!(feed.metrics.scan_running.get(), 0);
    feed.stop().await;

    // A restart streams on from the slot: nothing is scanned again.
    sink.state.lock().unwrap().accepted.clear();
    let feed = start(o.clone());
    sql(&db, "INSERT INTO kv (k, v) VALUES (9999, 'late')").await;
    sink.wait_rows(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ks(&sink.rows()), [9999]);
    feed.stop().await;

    // A scan that did not finish (the process died, leaving its mark) is
    // done again from a new snapshot, which holds the later changes.
    db.execute(
        "INSERT INTO public.meridian_initial_scans (slot_name) VALUES ('cf_scan')",
        &[],
    )
    .await
    .unwrap();
    sink.state.lock().unwrap().accepted.clear();
    let feed = start(o);
    let rows = sink.wait_rows(2502).await;
    let mut keys = ks(&rows);
    keys.sort();
    assert_eq!(keys, (0..=2500).chain([9999]).collect::<Vec<_>>());
    assert_eq!(
        rows.iter().find(|r| r["key"] == json!([7])).unwrap()["after"]["v"],
        json!("changed")
    );
    assert!(updated(&rows[0]) > scanned_at);
    assert!(
        wait_for(Duration::from_secs(5), || async {
            !scan_marked(&db, "cf_scan").await
        })
        .await
    );
    feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_scan_no_sends_only_later_changes() {
    let (_, db, sink, mut o) = kv_feed("cf_noscan").await;
    sql(
        &db,
        "INSERT INTO kv (k, v) SELECT g, 'old' FROM generate_series(1, 10) g",
    )
    .await;
    o.initial_scan = false;
    let feed = start_streaming(&db, o).await;
    sql(&db, "INSERT INTO kv (k, v) VALUES (11, 'new')").await;
    sink.wait_rows(1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ks(&sink.rows()), [11]);
    feed.stop().await;
}

/// `updated` is forced above the one before it in the WAL; a transaction
/// sent again after a restart must carry the same value as the first time,
/// or a receiver would take the repeat for a new change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resent_transaction_keeps_its_updated_across_a_restart() {
    let (_, db, sink, o) = kv_feed("cf_floor").await;
    let feed = start_streaming(&db, o.clone()).await;
    sql(&db, "INSERT INTO kv (k, v) VALUES (1, 'one')").await;
    sink.wait_rows(1).await;

    // A probe (as the changefeed writes them) carrying a time an hour ahead:
    // every later transaction is stamped above it, whatever its commit time.
    let ahead = now_nanos() + 3_600_000_000_000;
    let probe_lsn: String = db
        .query_one(
            "SELECT pg_logical_emit_message(false, 'meridian.changefeed.cf_floor', $1)::text",
            &[&format!("test:1:{ahead}")],
        )
        .await
        .unwrap()
        .get(0);
    let passed = wait_for(Duration::from_secs(20), || async {
        db.query_one(
            "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'cf_floor'",
            &[&probe_lsn],
        )
        .await
        .unwrap()
        .get::<_, bool>(0)
    })
    .await;
    assert!(passed, "the slot moved past the probe");

    // Row 2 is sent but never acknowledged.
    sink.state.lock().unwrap().fail_all = Some(503);
    sql(&db, "INSERT INTO kv (k, v) VALUES (2, 'two')").await;
    let first_try = || {
        let s = sink.state.lock().unwrap();
        s.attempts
            .iter()
            .filter_map(|(_, b)| b.get("payload").and_then(|p| p.as_array()).cloned())
            .flatten()
            .find(|r| r["key"] == json!([2]))
    };
    assert!(wait_for(Duration::from_secs(20), || async { first_try().is_some() }).await);
    let first = updated(&first_try().unwrap());
    assert!(first.nanos >= ahead, "stamped above the probe: {first:?}");
    feed.stop().await;

    // The restart decodes row 2 again, without the probe before it.
    {
        let mut s = sink.state.lock().unwrap();
        s.fail_all = None;
        s.accepted.clear();
    }
    let feed = start(o);
    let rows = sink.wait_rows(1).await;
    assert_eq!(ks(&rows), [2]);
    assert_eq!(
        updated(&rows[0]),
        first,
        "the same `updated` as the first time"
    );
    feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_crash_and_restart_loses_nothing() {
    let mut cluster = pgcluster::PgCluster::start_temp().unwrap();
    let url = cluster.create_database("kv").await.unwrap();
    let db = connect(&url).await;
    sql(
        &db,
        "CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT); ALTER TABLE kv REPLICA IDENTITY FULL",
    )
    .await;
    let sink = TestSink::start().await;
    let mut o = options(&url, &["kv.public.kv"], &sink);
    o.resolved_interval = Some(Duration::from_millis(200));
    let feed = start_streaming(&db, o).await;
    sql(
        &db,
        "INSERT INTO kv (k, v) SELECT g, 'a' FROM generate_series(1, 100) g",
    )
    .await;
    sink.wait_rows(100).await;
    // Some rows may still be in flight when the server dies.
    sql(
        &db,
        "INSERT INTO kv (k, v) SELECT g, 'b' FROM generate_series(101, 200) g",
    )
    .await;
    drop(db);
    cluster.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart().unwrap();
    let db = connect(&url).await;
    sql(
        &db,
        "INSERT INTO kv (k, v) SELECT g, 'c' FROM generate_series(201, 300) g",
    )
    .await;
    let mut in_table: Vec<i64> = db
        .query("SELECT k FROM kv ORDER BY k", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    in_table.sort();
    let ok = wait_for(Duration::from_secs(30), || {
        let s = sink.clone();
        let want = in_table.clone();
        async move {
            let mut got = ks(&s.rows());
            got.sort();
            got.dedup();
            want.iter().all(|k| got.binary_search(k).is_ok())
        }
    })
    .await;
    assert!(ok, "every committed row reached the sink after the crash");
    assert!(feed.metrics.errors.with_label_values(&["source"]).get() >= 1);
    feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flush_frequency_holds_small_batches() {
    let (_, db, sink, mut o) = kv_feed("cf_freq").await;
    o.flush_frequency = Duration::from_millis(700);
    o.flush_rows = 1000;
    let feed = start_streaming(&db, o).await;
    for k in 1..=5i64 {
        db.execute("INSERT INTO kv (k) VALUES ($1)", &[&k])
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rows = sink.wait_rows(5).await;
    assert_eq!(ks(&rows), [1, 2, 3, 4, 5]);
    assert!(
        sink.accepted().len() <= 2,
        "five quick commits go in one or two batches: {:?}",
        sink.accepted()
    );
    feed.stop().await;
}

/// A TRUNCATE has no changefeed form: it is counted per table (for an
/// alert), nothing is sent for it, and the feed goes on with later changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_is_counted_and_the_feed_goes_on() {
    let (_, db, sink, o) = kv_feed("cf_truncate").await;
    let feed = start_streaming(&db, o).await;
    sql(&db, "INSERT INTO kv (k) VALUES (1), (2)").await;
    sink.wait_rows(2).await;
    sql(&db, "TRUNCATE kv").await;
    sql(&db, "INSERT INTO kv (k) VALUES (3)").await;
    let rows = sink.wait_rows(3).await;
    assert_eq!(ks(&rows), [1, 2, 3]);
    let skipped = feed
        .metrics
        .truncates_skipped
        .with_label_values(&["public", "kv"]);
    assert_eq!(skipped.get(), 1);
    feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_by_rows_and_large_transactions() {
    let (_, db, sink, mut o) = kv_feed("cf_batch").await;
    o.flush_rows = 100;
    let feed = start_streaming(&db, o).await;
    sql(
        &db,
        "INSERT INTO kv (k, v) SELECT g, 'x' FROM generate_series(1, 1000) g",
    )
    .await;
    let rows = sink.wait_rows(1000).await;
    assert_eq!(ks(&rows), (1..=1000).collect::<Vec<_>>());
    let bodies = sink.accepted();
    assert!(bodies.len() >= 10);
    assert!(bodies.iter().all(|b| b["length"].as_u64().unwrap() <= 100));
    let first = rows[0]["updated"].clone();
    assert!(
        rows.iter().all(|r| r["updated"] == first),
        "one txn, one updated"
    );
    feed.stop().await;
}

/// DDL on a streamed table (a key column renamed, the primary key replaced)
/// is followed by a new Relation message, and rows then carry their new key
/// rather than one the changefeed remembered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changes_by_ddl_are_read_again() {
    let (_, db, sink, o) = kv_feed("cf_key_ddl").await;
    let feed = start_streaming(&db, o).await;
    sql(&db, "INSERT INTO kv (k, v) VALUES (1, 'a')").await;
    sink.wait_rows(1).await;
    sql(&db, "ALTER TABLE kv RENAME COLUMN k TO id").await;
    sql(&db, "INSERT INTO kv (id, v) VALUES (2, 'b')").await;
    let rows = sink.wait_rows(2).await;
    assert_eq!(rows[1]["key"], json!([2]), "{:#}", rows[1]);
    sql(
        &db,
        "ALTER TABLE kv DROP CONSTRAINT kv_pkey; ALTER TABLE kv ADD PRIMARY KEY (v, id)",
    )
    .await;
    sql(&db, "INSERT INTO kv (id, v) VALUES (3, 'c')").await;
    let rows = sink.wait_rows(3).await;
    assert_eq!(rows[2]["key"], json!(["c", 3]), "{:#}", rows[2]);
    feed.stop().await;
}

/// A transaction far larger than a batch goes out as it is decoded: while
/// the sink refuses its first batch, the changefeed holds a few batches of
/// it in memory (the stream waits), not the whole transaction; once the sink
/// answers, every row arrives in order with the transaction's one `updated`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_transaction_is_held_a_few_batches_at_a_time() {
    const ROWS: i64 = 20_000;
    let (_, db, sink, mut o) = kv_feed("cf_huge").await;
    o.flush_bytes = 64 * 1024;
    let feed = start_streaming(&db, o).await;
    sink.state.lock().unwrap().fail_all = Some(503);
    // About 21 MB of payload in one transaction.
    sql(
        &db,
        &format!(
            "INSERT INTO kv (k, v) SELECT g, repeat('x', 1000) FROM generate_series(1, {ROWS}) g"
        ),
    )
    .await;
    let tried = wait_for(Duration::from_secs(30), || {
        let sink = sink.clone();
        async move { sink.state.lock().unwrap().attempts.len() >= 3 }
    })
    .await;
    assert!(tried, "the sink was never tried");
    // Time to decode as far as the changefeed will while the sink refuses.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pending = feed.metrics.pending_bytes.get();
    assert!(
        pending > 0 && pending < 2 << 20,
        "holds {pending} bytes of a 21 MB transaction"
    );
    assert!(sink.accepted().is_empty());
    sink.state.lock().unwrap().fail_all = None;
    let rows = sink.wait_rows(ROWS as usize).await;
    assert_eq!(ks(&rows), (1..=ROWS).collect::<Vec<_>>());
    assert!(
        rows.iter().all(|r| r["updated"] == rows[0]["updated"]),
        "one transaction, one updated"
    );
    assert!(sink
        .accepted()
        .iter()
        .all(|b| b["length"].as_u64().unwrap() < 100));
    feed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misconfigured_sources_say_what_to_fix() {
    let (url, _db) = fresh_db(
        "cf_checks",
        "CREATE TABLE plain (k INT PRIMARY KEY, v TEXT)",
    )
    .await;
    let sink = TestSink::start().await;
    let mut o = options(&url, &["cf_checks.public.plain", "public.missing"], &sink);
    o.name = "cf_checks".into();
    let (_tx, rx) = watch::channel(false);
    let err = run_changefeed(o, ChangefeedMetrics::new(), rx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"ALTER TABLE "public"."plain" REPLICA IDENTITY FULL"#),
        "{err}"
    );
    assert!(err.contains("REPLICA IDENTITY DEFAULT"), "{err}");
    assert!(err.contains("no table public.missing"), "{err}");

    let err = meridian::source::postgres::check_wal_level("replica")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ALTER SYSTEM SET wal_level = logical"),
        "{err}"
    );
    assert!(err.contains("restart PostgreSQL"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_sink_with_self_signed_certificate() {
    let (url, db) = kv_db("cf_tls").await;
    let sink = TestSink::start_tls().await;
    let mut o = options(&url, &["kv"], &sink);
    o.name = "cf_tls".into();
    o.sink_url = format!(
        "webhook-https://{}/db/public?insecure_tls_skip_verify=true",
        sink.addr
    );
    let feed = start_streaming(&db, o).await;
    sql(&db, "INSERT INTO kv (k, v) VALUES (1, 'secure')").await;
    let rows = sink.wait_rows(1).await;
    assert_eq!(rows[0]["after"]["v"], json!("secure"));
    feed.stop().await;
}

fn psql_setup(url: &str, region: &str) {
    let out = std::process::Command::new("psql")
        .arg(url)
        .args(["-X", "-q", "-v", &format!("region={region}"), "-f"])
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/sql/postgres/setup.sql"
        ))
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "setup.sql failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Row `k` of `kv` holds east's stamp: its region and now() + ~1s.
async fn assert_stamped_east(db: &tokio_postgres::Client, k: i64) {
    let row = db
        .query_one(
            "SELECT _source, extract(epoch FROM _timestamp - now())::float8 FROM kv WHERE k = $1",
            &[&k],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "east", "k={k}");
    let ahead: f64 = row.get(1);
    assert!(
        (0.5..1.5).contains(&ahead),
        "k={k} stamped about 1s ahead: {ahead}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_sql_stamps_local_writes_only() {
    let (url, db) = fresh_db(
        "cf_setup",
        "CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT); INSERT INTO kv VALUES (0, 'old')",
    )
    .await;
    psql_setup(&url, "east");
    psql_setup(&url, "east"); // idempotent
    sql(&db, "SELECT meridian_enable('kv', meridian_region())").await;
    sql(&db, "SELECT meridian_enable('public.kv', 'east', '1s')").await;

    // DLQ table with the seed's columns.
    let cols: Vec<(String, String)> = db
        .query(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_name = 'cdc_sink_dlq' ORDER BY ordinal_position",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want = [
        ("event", "uuid"),
        ("dlq_name", "text"),
        ("source_nanos", "bigint"),
        ("source_logical", "bigint"),
        ("data_after", "jsonb"),
        ("data_before", "jsonb"),
    ];
    assert_eq!(
        cols,
        want.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect::<Vec<_>>()
    );

    // Replica identity and publication.
    let ident: String = db
        .query_one(
            "SELECT relreplident::text FROM pg_class WHERE relname = 'kv'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ident, "f");
    let n: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = 'meridian' AND tablename = 'kv'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 1);

    // A local insert is stamped: region, now() + ~1s.
    sql(
        &db,
        "INSERT INTO kv (k, v, _source, _timestamp) VALUES (1, 'local', 'west', '2000-01-01')",
    )
    .await;
    assert_stamped_east(&db, 1).await;

    // An insert naming neither column takes the stamp from the defaults,
    // without a PL/pgSQL call; an update still calls the trigger function.
    let calls = |statement: &'static str| {
        let db = &db;
        async move {
            let tx = format!(
                "BEGIN; SET LOCAL track_functions = 'pl'; {statement}; \
                 CREATE TEMP TABLE calls ON COMMIT DROP AS SELECT coalesce((SELECT calls \
                 FROM pg_stat_xact_user_functions WHERE funcname = 'meridian_stamp'), 0) AS n"
            );
            sql(db, &tx).await;
            let n: i64 = db
                .query_one("SELECT n FROM calls", &[])
                .await
                .unwrap()
                .get(0);
            sql(db, "COMMIT").await;
            n
        }
    };
    assert_eq!(
        calls("INSERT INTO kv (k, v) VALUES (4, 'defaults')").await,
        0
    );
    assert_stamped_east(&db, 4).await;
    assert_eq!(calls("UPDATE kv SET v = 'again' WHERE k = 4").await, 1);

    // Existing rows got the columns' defaults.
    let src: Option<String> = db
        .query_one("SELECT _source FROM kv WHERE k = 0", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(src.as_deref(), Some("east"));

    // meridian's own writes keep what they came with.
    sql(&db, "BEGIN; SELECT set_config('meridian.applying', 'on', true); \
         INSERT INTO kv (k, v, _source, _timestamp) VALUES (2, 'replicated', 'west', '2001-02-03 04:05:06+00'); \
         UPDATE kv SET v = 'replicated', _source = 'west', _timestamp = '2001-02-03 04:05:06+00' WHERE k = 1; \
         COMMIT;",).await;
    for k in [1i64, 2] {
        let row = db
            .query_one(
                "SELECT _source, _timestamp = '2001-02-03 04:05:06+00' FROM kv WHERE k = $1",
                &[&k],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "west", "k={k}");
        assert!(row.get::<_, bool>(1), "k={k} kept its _timestamp");
    }

    // The setting is transaction-local: the next local update is stamped again.
    sql(&db, "UPDATE kv SET v = 'local again' WHERE k = 2").await;
    let src: String = db
        .query_one("SELECT _source FROM kv WHERE k = 2", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(src, "east");

    // The default changefeed name reads setup.sql's publication.
    let sink = TestSink::start().await;
    let o = options(&url, &["kv"], &sink);
    let feed = start_streaming(&db, o).await;
    sql(&db, "INSERT INTO kv (k, v) VALUES (3, 'fed')").await;
    let rows = sink.wait_rows(1).await;
    assert_eq!(rows[0]["after"]["_source"], json!("east"));
    assert!(rows[0]["after"]["_timestamp"].is_string());
    feed.stop().await;
    sql(&db, "SELECT pg_drop_replication_slot('meridian')").await;
}

/// An UPDATE that changes the primary key goes out as CockroachDB sends it:
/// a delete of the old key (with the old row as `before`) and an insert of
/// the new key (`before: null`), so the receiver does not keep the old row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_changing_update_is_a_delete_and_an_insert() {
    let (_, db, sink, mut o) = kv_feed("cf_pk_change").await;
    o.initial_scan = false;
    let feed = start_streaming(&db, o).await;
    sql(
        &db,
        "INSERT INTO kv (k, v, by) VALUES (1, 'one', decode(repeat('ab', 100000), 'hex'))",
    )
    .await;
    // The large bytea stays out of line and unchanged: pgoutput does not
    // resend it, and the insert of the new key must still carry it.
    sql(&db, "UPDATE kv SET k = 2 WHERE k = 1").await;
    sql(&db, "UPDATE kv SET v = 'two' WHERE k = 2").await;
    let rows = sink.wait_rows(4).await;
    assert_eq!(rows.len(), 4, "{rows:#?}");
    let (del, ins) = (&rows[1], &rows[2]);
    assert_eq!(del["key"], json!([1]));
    assert_eq!(del["after"], Value::Null);
    assert_eq!(del["before"]["k"], json!(1));
    assert_eq!(del["before"]["v"], json!("one"));
    assert_eq!(ins["key"], json!([2]));
    assert_eq!(ins["before"], Value::Null);
    assert_eq!(ins["after"]["k"], json!(2));
    assert_eq!(ins["after"]["v"], json!("one"));
    let by = ins["after"]["by"]
        .as_str()
        .expect("the unchanged bytea is sent");
    assert_eq!(by.len(), 2 + 200_000);
    assert_eq!(
        del["updated"], ins["updated"],
        "one transaction, one updated"
    );
    // An update that keeps the key stays one event.
    assert_eq!(rows[3]["key"], json!([2]));
    assert_eq!(rows[3]["before"]["v"], json!("one"));
    assert_eq!(rows[3]["after"]["v"], json!("two"));
    feed.stop().await;
}

/// A database with `pt`, range-partitioned into `pt_low` (k < 100) and
/// `pt_high` (k < 200).
async fn partitioned_db(name: &str) -> (String, tokio_postgres::Client) {
    fresh_db(
        name,
        "CREATE TABLE pt (k INT8 PRIMARY KEY, v TEXT) PARTITION BY RANGE (k);
         CREATE TABLE pt_low PARTITION OF pt FOR VALUES FROM (0) TO (100);
         CREATE TABLE pt_high PARTITION OF pt FOR VALUES FROM (100) TO (200);",
    )
    .await
}

/// A partitioned table replicates under its own name: pgoutput reports its
/// rows under the partition they live in unless the publication publishes
/// through the root. Every partition needs the whole old row too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_tables_stream_through_their_root() {
    let (url, db) = partitioned_db("cf_parts").await;
    sql(
        &db,
        "ALTER TABLE pt REPLICA IDENTITY FULL; ALTER TABLE pt_low REPLICA IDENTITY FULL;
         INSERT INTO pt VALUES (1, 'scanned');",
    )
    .await;
    let sink = TestSink::start().await;
    let mut o = options(&url, &["pt"], &sink);
    o.name = "cf_parts".into();
    let (_tx, rx) = watch::channel(false);
    let err = run_changefeed(o.clone(), ChangefeedMetrics::new(), rx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(r#"ALTER TABLE "public"."pt_high" REPLICA IDENTITY FULL"#),
        "{err}"
    );
    sql(&db, "ALTER TABLE pt_high REPLICA IDENTITY FULL").await;

    let feed = start_streaming(&db, o).await;
    sink.wait_rows(1).await;
    sql(
        &db,
        "INSERT INTO pt VALUES (150, 'streamed'); UPDATE pt SET v = 'moved' WHERE k = 1;",
    )
    .await;
    let rows = sink.wait_rows(3).await;
    assert_eq!(rows[1]["topic"], json!("pt"));
    assert_eq!(rows[1]["key"], json!([150]));
    assert_eq!(rows[2]["topic"], json!("pt"));
    assert_eq!(rows[2]["before"]["v"], json!("scanned"));
    assert_eq!(rows[2]["after"]["v"], json!("moved"));
    feed.stop().await;
}

/// setup.sql enables a partitioned table as a whole: every partition keeps
/// the whole old row, local writes into any partition are stamped, and the
/// default changefeed streams it under the table's own name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_sql_enables_partitioned_tables() {
    let (url, db) = partitioned_db("cf_setup_parts").await;
    psql_setup(&url, "east");
    sql(&db, "SELECT meridian_enable('pt', meridian_region())").await;
    let idents: Vec<String> = db
        .query(
            "SELECT relname || '=' || relreplident::text FROM pg_class \
             WHERE relname IN ('pt', 'pt_low', 'pt_high') ORDER BY relname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(idents, ["pt=f", "pt_high=f", "pt_low=f"]);

    let sink = TestSink::start().await;
    let mut o = options(&url, &["pt"], &sink);
    o.initial_scan = false;
    // setup.sql's publication; slots are per cluster, so a name of its own.
    o.publication = Some("meridian".into());
    o.slot = Some("cf_setup_parts".into());
    let feed = start_streaming(&db, o).await;
    sql(&db, "INSERT INTO pt (k, v) VALUES (150, 'local')").await;
    let rows = sink.wait_rows(1).await;
    assert_eq!(rows[0]["topic"], json!("pt"));
    assert_eq!(rows[0]["after"]["_source"], json!("east"));
    feed.stop().await;
}

/// After the source crashes, the slot resumes from the confirmed position it
/// last wrote to disk, which can be older than the one it reported. The
/// floor there must still be known: re-sent transactions keep the `updated`
/// they had, even those committed while the initial scan began (stamped
/// above the scan, not by their commit time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resent_rows_keep_their_updated_after_a_source_crash() {
    let mut cluster = pgcluster::PgCluster::start_temp().unwrap();
    let url = cluster.create_database("kv").await.unwrap();
    let db = connect(&url).await;
    sql(
        &db,
        "CREATE TABLE kv (k INT8 PRIMARY KEY, v TEXT); ALTER TABLE kv REPLICA IDENTITY FULL; \
         INSERT INTO kv SELECT g, 'scanned' FROM generate_series(1, 10) g",
    )
    .await;
    // One-row transactions commit while the slot and the scan begin.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (url, stop) = (url.clone(), stop.clone());
        tokio::spawn(async move {
            let db = connect(&url).await;
            let mut k = 1000i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                db.execute("INSERT INTO kv (k, v) VALUES ($1, 'w')", &[&k])
                    .await
                    .unwrap();
                k += 1;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sink = TestSink::start().await;
    let feed = start_streaming(&db, options(&url, &["kv.public.kv"], &sink)).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    let total: i64 = db
        .query_one("SELECT count(*) FROM kv", &[])
        .await
        .unwrap()
        .get(0);
    let distinct = |s: &TestSink| {
        let mut k = ks(&s.rows());
        k.sort();
        k.dedup();
        k.len()
    };
    assert!(
        wait_for(Duration::from_secs(60), || async {
            distinct(&sink) >= total as usize
        })
        .await
    );
    // Time for the last acknowledgements and the floors' pruning.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let first: std::collections::HashMap<i64, Value> = sink
        .rows()
        .iter()
        .map(|r| (r["key"][0].as_i64().unwrap(), r["updated"].clone()))
        .collect();
    sink.state.lock().unwrap().accepted.clear();

    drop(db);
    cluster.kill().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.restart().unwrap();
    let db = connect(&url).await;
    db.batch_execute("INSERT INTO kv (k, v) VALUES (1, 'marker')")
        .await
        .unwrap_err(); // k = 1 exists: nothing new, only a failed insert
    sql(
        &db,
        "INSERT INTO kv (k, v) VALUES (999999, 'after the crash')",
    )
    .await;
    assert!(
        wait_for(Duration::from_secs(30), || async {
            ks(&sink.rows()).contains(&999999)
        })
        .await,
        "the change after the crash arrives"
    );
    let mut resent = 0;
    for r in sink.rows() {
        let k = r["key"][0].as_i64().unwrap();
        if let Some(u) = first.get(&k) {
            resent += 1;
            assert_eq!(&r["updated"], u, "row {k} was re-sent with another updated");
        }
    }
    eprintln!("{resent} rows re-sent after the crash");
    feed.stop().await;
}

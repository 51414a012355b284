//! Prometheus metrics: one registry per daemon (so `meridian demo` can run two
//! receivers and two changefeeds in one process), and every metric name the
//! Grafana dashboard queries. Names follow replicator's where the concept is
//! the same. Labels are bounded: schema, table, status code, script function;
//! never keys or error strings.

use prometheus::{
    exponential_buckets, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// Apply latency: a one-row request takes about a millisecond, a large batch
/// up to a few seconds, and the apply timeout defaults to 10s.
fn apply_buckets() -> Vec<f64> {
    exponential_buckets(0.000_25, 2.0, 18).unwrap() // 0.25ms .. ~33s
}

/// Lag: seconds to hours.
fn lag_buckets() -> Vec<f64> {
    vec![
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1.0,
        2.5,
        5.0,
        10.0,
        30.0,
        60.0,
        300.0,
        900.0,
        3600.0,
        4.0 * 3600.0,
    ]
}

/// The receiver's metrics (`meridian start`).
#[derive(Clone)]
pub struct ReceiverMetrics {
    pub registry: Registry,
    pub apply_upserts: IntCounterVec,
    pub apply_deletes: IntCounterVec,
    pub apply_conflicts: IntCounterVec,
    pub apply_errors: IntCounterVec,
    pub apply_dropped: IntCounterVec,
    pub apply_deadlined: IntCounterVec,
    pub dlq_enqueued: IntCounterVec,
    pub apply_duration: HistogramVec,
    pub apply_mutation_age: HistogramVec,
    pub http_status_codes: IntCounterVec,
    pub http_latency: Histogram,
    pub http_payload_in_bytes: IntCounter,
    pub resolved_timestamp: GaugeVec,
    pub script_duration: HistogramVec,
    pub target_pool_size: IntGauge,
    pub target_pool_available: IntGauge,
    pub target_pool_waiting: IntGauge,
}

fn counter_vec(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn histogram_vec(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

const TABLE: &[&str] = &["schema", "table"];

impl ReceiverMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let http_latency = Histogram::with_opts(
            HistogramOpts::new(
                "http_latency_seconds",
                "Time to answer a changefeed request",
            )
            .buckets(apply_buckets()),
        )
        .expect("valid metric");
        r.register(Box::new(http_latency.clone())).unwrap();
        let http_payload_in_bytes = IntCounter::new(
            "http_payload_in_bytes_total",
            "Bytes of changefeed request bodies received",
        )
        .unwrap();
        r.register(Box::new(http_payload_in_bytes.clone())).unwrap();
        let resolved_timestamp = GaugeVec::new(
            Opts::new(
                "resolved_timestamp_seconds",
                "Newest resolved timestamp received, as Unix seconds",
            ),
            &["schema"],
        )
        .unwrap();
        r.register(Box::new(resolved_timestamp.clone())).unwrap();
        ReceiverMetrics {
            apply_upserts: counter_vec(
                &r,
                "apply_upserts_total",
                "Rows upserted into the target",
                TABLE,
            ),
            apply_deletes: counter_vec(
                &r,
                "apply_deletes_total",
                "Rows deleted from the target",
                TABLE,
            ),
            apply_conflicts: counter_vec(
                &r,
                "apply_conflicts_total",
                "Rows that lost compare-and-set against the stored row",
                TABLE,
            ),
            apply_errors: counter_vec(
                &r,
                "apply_errors_total",
                "Requests whose apply failed",
                TABLE,
            ),
            apply_dropped: counter_vec(
                &r,
                "apply_dropped_total",
                "Rows dropped by the userscript or by a merge",
                TABLE,
            ),
            apply_deadlined: counter_vec(
                &r,
                "apply_deadlined_total",
                "Rows discarded because a deadline column was too old",
                TABLE,
            ),
            dlq_enqueued: counter_vec(
                &r,
                "dlq_enqueued_total",
                "Rows written to the DLQ table",
                TABLE,
            ),
            apply_duration: histogram_vec(
                &r,
                "apply_duration_seconds",
                "Time to apply one request's rows to one table",
                TABLE,
                apply_buckets(),
            ),
            apply_mutation_age: histogram_vec(
                &r,
                "apply_mutation_age_seconds",
                "Age of a mutation (now minus its source time) when applied",
                TABLE,
                lag_buckets(),
            ),
            http_status_codes: counter_vec(
                &r,
                "http_status_codes_total",
                "Responses to changefeed requests by status code",
                &["code"],
            ),
            script_duration: histogram_vec(
                &r,
                "script_duration_seconds",
                "Time spent in userscript calls",
                &["function"],
                apply_buckets(),
            ),
            target_pool_size: gauge(&r, "target_pool_size", "Connections in the target pool"),
            target_pool_available: gauge(
                &r,
                "target_pool_available",
                "Idle connections in the target pool",
            ),
            target_pool_waiting: gauge(
                &r,
                "target_pool_waiting",
                "Requests waiting for a target connection",
            ),
            http_latency,
            http_payload_in_bytes,
            resolved_timestamp,
            registry: r,
        }
    }
}

impl Default for ReceiverMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The changefeed producer's metrics (`meridian changefeed`).
#[derive(Clone)]
pub struct ChangefeedMetrics {
    pub registry: Registry,
    pub rows_sent: IntCounterVec,
    pub batches_sent: IntCounter,
    pub retries: IntCounter,
    pub errors: IntCounterVec,
    pub lag_seconds: prometheus::Gauge,
    pub slot_lag_bytes: IntGauge,
    /// Decoded change bytes waiting to be sent (not those in flight).
    pub pending_bytes: IntGauge,
    pub resolved_sent: IntCounter,
    pub send_duration: Histogram,
    /// Rows of the initial scan the sink accepted (also in `rows_sent`).
    pub scan_rows: IntCounterVec,
    /// 1 while an initial scan is being sent.
    pub scan_running: IntGauge,
    /// TRUNCATEs of a replicated table, which no changefeed batch can carry:
    /// the target keeps its rows until an operator acts.
    pub truncates_skipped: IntCounterVec,
}

impl ChangefeedMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let batches_sent = IntCounter::new(
            "changefeed_batches_sent_total",
            "Batches the sink answered 2xx",
        )
        .unwrap();
        let retries = IntCounter::new("changefeed_retries_total", "Batches sent again").unwrap();
        let resolved_sent = IntCounter::new(
            "changefeed_resolved_sent_total",
            "Resolved checkpoints the sink accepted",
        )
        .unwrap();
        let lag_seconds = prometheus::Gauge::new(
            "changefeed_lag_seconds",
            "Now minus the commit time of the newest change sent",
        )
        .unwrap();
        let slot_lag_bytes = IntGauge::new(
            "changefeed_slot_lag_bytes",
            "WAL bytes between the server's position and the slot's confirmed position",
        )
        .unwrap();
        let send_duration = Histogram::with_opts(
            HistogramOpts::new(
                "changefeed_send_seconds",
                "Time for the sink to answer a batch",
            )
            .buckets(apply_buckets()),
        )
        .unwrap();
        for c in [&batches_sent, &retries, &resolved_sent] {
            r.register(Box::new(c.clone())).unwrap();
        }
        r.register(Box::new(lag_seconds.clone())).unwrap();
        r.register(Box::new(slot_lag_bytes.clone())).unwrap();
        r.register(Box::new(send_duration.clone())).unwrap();
        let pending_bytes = gauge(
            &r,
            "changefeed_pending_bytes",
            "Decoded change bytes waiting to be sent: the open transaction's rows \
             not yet in a batch, the batch being filled and queued batches",
        );
        let scan_running = gauge(
            &r,
            "changefeed_initial_scan_running",
            "1 while the initial scan of a new slot is being sent",
        );
        let errors = counter_vec(
            &r,
            "changefeed_errors_total",
            "Failed sends by kind (status class or transport)",
            &["kind"],
        );
        // Every kind exists from the start, so increase() sees the first error.
        for kind in ["4xx", "5xx", "timeout", "transport", "source"] {
            errors.with_label_values(&[kind]);
        }
        ChangefeedMetrics {
            errors,
            rows_sent: counter_vec(
                &r,
                "changefeed_rows_sent_total",
                "Rows the sink answered 2xx",
                TABLE,
            ),
            batches_sent,
            retries,
            lag_seconds,
            slot_lag_bytes,
            pending_bytes,
            resolved_sent,
            send_duration,
            scan_rows: counter_vec(
                &r,
                "changefeed_initial_scan_rows_total",
                "Rows of the initial scan the sink answered 2xx",
                TABLE,
            ),
            scan_running,
            truncates_skipped: counter_vec(
                &r,
                "changefeed_truncates_skipped_total",
                "TRUNCATEs of a replicated table at the source, not sent (the target keeps its rows)",
                TABLE,
            ),
            registry: r,
        }
    }

    /// Counts one batch the sink accepted, with its rows per (schema, table);
    /// `scanned`: rows of the initial scan.
    pub fn record_sent<'a>(
        &self,
        counts: impl Iterator<Item = (&'a str, &'a str, u64)>,
        scanned: bool,
    ) {
        self.batches_sent.inc();
        for (schema, table, n) in counts {
            self.rows_sent.with_label_values(&[schema, table]).inc_by(n);
            if scanned {
                self.scan_rows.with_label_values(&[schema, table]).inc_by(n);
            }
        }
    }
}

impl Default for ChangefeedMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Prometheus text exposition of one or more registries.
pub fn render(registries: &[&Registry]) -> String {
    let mut families = Vec::new();
    for r in registries {
        families.extend(r.gather());
    }
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&families, &mut buf)
        .expect("text encoding cannot fail");
    String::from_utf8(buf).expect("prometheus text is UTF-8")
}

/// Serves `registry` as Prometheus text at `/metrics` on `addr` (port 0 picks
/// one); returns the bound address.
pub async fn serve(
    addr: std::net::SocketAddr,
    registry: Registry,
) -> std::io::Result<std::net::SocketAddr> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let r = registry.clone();
            async move { render(&[&r]) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server on {bound}: {e}");
        }
    });
    Ok(bound)
}

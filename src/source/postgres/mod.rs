//! PostgreSQL logical decoding → CockroachDB-style webhook batches
//! (`meridian changefeed`).
//!
//! How it works: the changefeed opens a replication connection and streams
//! the built-in `pgoutput` plugin's messages from its slot
//! (`START_REPLICATION … LOGICAL`, through the `pgwire-replication` crate), so
//! every WAL record is decoded once, as it is written, and a change reaches
//! the sink without polling. The slot's confirmed position is reported to the
//! server (standby status feedback) only after the sink answered 2xx for every
//! row of every transaction up to that point, so a crash or restart of either
//! side re-sends (at least once) and loses nothing. A second, ordinary
//! connection reads catalog facts (primary keys), the server clock for probes,
//! and the slot's lag.
//!
//! Delivery is per-key ordered. Batches are cut at transaction boundaries
//! where they fit; full batches of whole transactions may travel
//! concurrently (up to `max_in_flight`) as long as no key is in two requests
//! at once; any other batch (a trickle, part of a large transaction) goes
//! alone, after everything before it was acknowledged, so a trickle arrives
//! in commit order. While batches are in flight the stream keeps being read
//! and decoded into the next batches.
//!
//! `updated` is the transaction's commit time as an HLC (`nanos.logical`),
//! forced strictly increasing in WAL order: a commit time at or below the
//! previous transaction's value (or a probe's time before it) becomes that
//! value with the logical counter plus one. It depends only on the WAL and on
//! the floor at the position decoding starts from, which `floors` keeps in
//! the source, so a transaction sent again after a restart carries the same
//! value. `resolved` is either the newest fully acknowledged transaction's
//! `updated` or, when nothing is pending, a *probe*: meridian writes a
//! non-transactional `pg_logical_emit_message` holding the server clock it
//! read first; once decoding reaches it, every transaction that committed
//! before it has been sent, and every later one is stamped above that time.
//!
//! A new slot starts with an initial scan of the rows the tables hold (`scan`).

mod floors;
pub mod pgoutput;
mod scan;
pub mod sink;
pub mod values;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use futures::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent};
use tokio::sync::watch;

use crate::changefeed::Hlc;
use crate::metrics::ChangefeedMetrics;
use pgoutput::{Column, Datum, Message, PG_EPOCH_MICROS};
use sink::{SendError, Sink, SinkConfig};

/// How often the slot's confirmed position is reported to the server (the
/// standby status interval), and so how often the floor is written.
const STATUS_INTERVAL: Duration = Duration::from_millis(250);

/// The publication (and slot) name used when `--name` is not given. It is
/// also the publication `sql/postgres/setup.sql`'s `meridian_enable` adds
/// tables to, so the defaults line up.
pub const DEFAULT_NAME: &str = "meridian";

/// Flags of `meridian changefeed`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChangefeedArgs {
    /// Source database connection string (the database holding the tables).
    #[arg(long = "sourceConn")]
    pub source_conn: String,

    /// A table to replicate, as db.schema.table (schema.table and table also
    /// accepted). Repeat for more tables.
    #[arg(long = "table", required = true)]
    pub tables: Vec<String>,

    /// Where to send: webhook-https://host:port/db/schema[?insecure_tls_skip_verify=true]
    /// or webhook-http://….
    #[arg(long = "sink")]
    pub sink: String,

    /// Send resolved checkpoints at this interval (e.g. 1s); 0 disables them.
    #[arg(long = "resolved", default_value = "0s", value_parser = crate::cli::parse_duration)]
    pub resolved: Duration,

    /// Changefeed name: the default publication and replication slot name.
    #[arg(long = "name", default_value = DEFAULT_NAME)]
    pub name: String,

    /// Publication to read (created when absent). Defaults to --name.
    #[arg(long = "publication")]
    pub publication: Option<String>,

    /// Logical replication slot to read (created when absent). Defaults to --name.
    #[arg(long = "slot")]
    pub slot: Option<String>,

    /// Bearer token sent as `Authorization: Bearer …`.
    #[arg(long = "authToken", env = "MERIDIAN_AUTH_TOKEN")]
    pub auth_token: Option<String>,

    /// Flush a batch once it holds this many rows.
    #[arg(long = "flushRows", default_value_t = 10_000)]
    pub flush_rows: usize,

    /// Flush a batch once its body reaches this many bytes.
    #[arg(long = "flushBytes", default_value_t = 1 << 20)]
    pub flush_bytes: usize,

    /// Hold changes up to this long to fill a batch; 0 sends what the stream
    /// has delivered as soon as nothing is in flight.
    #[arg(long = "flushFrequency", default_value = "0s", value_parser = crate::cli::parse_duration)]
    pub flush_frequency: Duration,

    /// Longest wait, while the source is quiet, before timers (resolved
    /// checkpoints, --flushFrequency, probes) are looked at again.
    #[arg(long = "pollInterval", default_value = "25ms", value_parser = crate::cli::parse_duration)]
    pub poll_interval: Duration,

    /// Time allowed for the sink to answer one request.
    #[arg(long = "clientTimeout", default_value = "30s", value_parser = crate::cli::parse_duration)]
    pub client_timeout: Duration,

    /// Longest wait between retries of a failed request.
    #[arg(long = "retryMax", default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub retry_max: Duration,

    /// Most requests in flight at once. Only full batches of whole
    /// transactions travel together, never two holding the same key; the
    /// rest go one at a time in commit order.
    #[arg(long = "maxInFlight", default_value_t = 4)]
    pub max_in_flight: usize,

    /// When the changefeed creates its slot: `yes` first sends every row
    /// the tables already hold (as CockroachDB's `initial_scan`), read from
    /// the snapshot the slot starts at; `no` sends only later changes.
    #[arg(long = "initialScan", default_value = "yes", value_parser = ["yes", "no"])]
    pub initial_scan: String,

    /// Address to serve Prometheus metrics on at /metrics.
    #[arg(long = "metricsAddr", value_parser = crate::cli::parse_addr)]
    pub metrics_addr: Option<SocketAddr>,
}

/// Everything a changefeed needs; what `meridian demo` builds in-process.
#[derive(Debug, Clone)]
pub struct ChangefeedOptions {
    pub source_conn: String,
    /// `db.schema.table`, `schema.table` or `table` (schema `public`).
    pub tables: Vec<String>,
    /// `webhook-https://…` or `webhook-http://…`.
    pub sink_url: String,
    /// Interval between resolved checkpoints; `None` or zero: none sent.
    pub resolved_interval: Option<Duration>,
    pub name: String,
    pub publication: Option<String>,
    pub slot: Option<String>,
    pub auth_token: Option<String>,
    pub flush_rows: usize,
    pub flush_bytes: usize,
    pub flush_frequency: Duration,
    pub poll_interval: Duration,
    pub client_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    /// Most requests in flight at once (full batches of whole transactions
    /// whose keys are not already in flight).
    pub max_in_flight: usize,
    /// Send the rows the tables hold when the slot is created (see `scan`).
    pub initial_scan: bool,
}

impl ChangefeedOptions {
    /// Options with the CLI's defaults.
    pub fn new(
        source_conn: impl Into<String>,
        tables: Vec<String>,
        sink_url: impl Into<String>,
    ) -> Self {
        ChangefeedOptions {
            source_conn: source_conn.into(),
            tables,
            sink_url: sink_url.into(),
            resolved_interval: None,
            name: DEFAULT_NAME.to_string(),
            publication: None,
            slot: None,
            auth_token: None,
            flush_rows: 10_000,
            flush_bytes: 1 << 20,
            flush_frequency: Duration::ZERO,
            poll_interval: Duration::from_millis(25),
            client_timeout: Duration::from_secs(30),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            max_in_flight: 4,
            initial_scan: true,
        }
    }

    /// The publication read: `--publication`, else the changefeed name.
    pub fn publication_name(&self) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| self.name.clone())
    }

    /// The slot read: `--slot`, else the changefeed name made a valid slot
    /// name (lower case letters, digits and underscores).
    pub fn slot_name(&self) -> String {
        self.slot.clone().unwrap_or_else(|| {
            self.name
                .chars()
                .map(|c| {
                    let c = c.to_ascii_lowercase();
                    if c.is_ascii_alphanumeric() || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect()
        })
    }
}

impl From<ChangefeedArgs> for ChangefeedOptions {
    fn from(a: ChangefeedArgs) -> Self {
        ChangefeedOptions {
            source_conn: a.source_conn,
            tables: a.tables,
            sink_url: a.sink,
            resolved_interval: (!a.resolved.is_zero()).then_some(a.resolved),
            name: a.name,
            publication: a.publication,
            slot: a.slot,
            auth_token: a.auth_token,
            flush_rows: a.flush_rows.max(1),
            flush_bytes: a.flush_bytes.max(1),
            flush_frequency: a.flush_frequency,
            poll_interval: a.poll_interval,
            client_timeout: a.client_timeout,
            retry_initial: Duration::from_millis(100),
            retry_max: a.retry_max,
            max_in_flight: a.max_in_flight.max(1),
            initial_scan: a.initial_scan == "yes",
        }
    }
}

/// Runs the changefeed until interrupted (Ctrl-C or SIGTERM).
pub async fn run(args: ChangefeedArgs) -> Result<()> {
    let metrics = ChangefeedMetrics::new();
    if let Some(addr) = args.metrics_addr {
        let bound = crate::metrics::serve(addr, metrics.registry.clone())
            .await
            .with_context(|| format!("binding --metricsAddr {addr}"))?;
        tracing::info!("serving metrics on http://{bound}/metrics");
    }
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        tracing::info!("shutting down the changefeed");
        let _ = tx.send(true);
    });
    run_changefeed(args.into(), metrics, rx).await
}

/// Runs a changefeed until `shutdown` turns true. Fails at once when the
/// source is misconfigured (wal_level, replica identity, unknown table);
/// after a successful start, lost connections are retried with backoff.
pub async fn run_changefeed(
    opts: ChangefeedOptions,
    metrics: ChangefeedMetrics,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let sink = Sink::new(
        &SinkConfig {
            url: opts.sink_url.clone(),
            auth_token: opts.auth_token.clone(),
            timeout: opts.client_timeout,
            retry_initial: opts.retry_initial,
            retry_max: opts.retry_max,
        },
        metrics.clone(),
    )?;
    let mut feed = Feed::new(opts, metrics, sink);
    let mut started = false;
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let result = match feed.connect_and_setup().await {
            Ok(db) => {
                if !started {
                    tracing::info!(
                        slot = %feed.slot, publication = %feed.publication, sink = %feed.sink.url(),
                        "changefeed started"
                    );
                }
                started = true;
                backoff = Duration::from_millis(200);
                match feed.initial_scan(&db, &mut shutdown).await {
                    Ok(true) => feed.stream(&db, &mut shutdown).await,
                    Ok(false) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(e) if !started => return Err(e),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) => {
                feed.metrics.errors.with_label_values(&["source"]).inc();
                tracing::warn!("changefeed source error, reconnecting in {backoff:?}: {e:#}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }
}

/// One replicated table.
#[derive(Clone)]
struct TableInfo {
    schema: Arc<str>,
    name: Arc<str>,
    /// A hasher that has taken the table's name: a row's key hash goes on
    /// from here.
    key_hasher: foldhash::fast::FoldHasher<'static>,
}

impl TableInfo {
    fn new(schema: &str, name: &str) -> Arc<Self> {
        use std::hash::{BuildHasher, Hash};
        let mut key_hasher =
            foldhash::fast::FixedState::with_seed(0x6d65_7269_6469_616e).build_hasher();
        schema.hash(&mut key_hasher);
        name.hash(&mut key_hasher);
        Arc::new(TableInfo {
            schema: schema.into(),
            name: name.into(),
            key_hasher,
        })
    }

    /// Which rows must not travel in two requests at once. A collision only
    /// holds a batch back until the other is acknowledged, so a fast hash
    /// with a fixed seed does (SipHash cost more than the rest of the row's
    /// bookkeeping).
    fn key_hash(&self, key: &[u8]) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = self.key_hasher.clone();
        key.hash(&mut h);
        h.finish()
    }
}

/// What pgoutput told us about a relation, plus where its key columns are.
struct Rel {
    table: Option<Arc<TableInfo>>,
    columns: Vec<Column>,
    key_idx: Vec<usize>,
    /// `"column":` per column, escaped once.
    name_json: Vec<Vec<u8>>,
    /// The table name as a JSON string.
    topic_json: Vec<u8>,
}

impl Rel {
    /// `pk`: the primary key's column names (none: every column is the key).
    fn new(table: Option<Arc<TableInfo>>, columns: Vec<Column>, pk: &[String]) -> Rel {
        let mut key_idx = Vec::new();
        if table.is_some() {
            for k in pk {
                if let Some(i) = columns.iter().position(|c| &c.name == k) {
                    key_idx.push(i);
                }
            }
            if key_idx.is_empty() {
                key_idx = (0..columns.len()).collect();
            }
        }
        let name_json = columns
            .iter()
            .map(|c| {
                let mut v = Vec::new();
                values::write_str(&mut v, &c.name);
                v.push(b':');
                v
            })
            .collect();
        let topic_json = table.as_ref().map(|t| {
            let mut v = Vec::new();
            values::write_str(&mut v, &t.name);
            v
        });
        Rel {
            table,
            columns,
            key_idx,
            name_json,
            topic_json: topic_json.unwrap_or_default(),
        }
    }
}

/// One row's payload entry: a range of its transaction's buffer.
struct Line {
    start: usize,
    end: usize,
    /// Hash of (table, key): rows of one key never travel in two requests
    /// at once.
    key_hash: u64,
    table: Arc<TableInfo>,
}

/// One source transaction (only its replicated rows), its payload entries
/// already written with its `updated`: the one being decoded, or, once its
/// commit was decoded, a committed one. `buf` and `lines` hold the rows not
/// yet handed to batches.
struct Txn {
    end_lsn: u64,
    hlc: Hlc,
    commit_micros: i64,
    buf: Vec<u8>,
    lines: Vec<Line>,
    /// Rows already handed to batches before the commit was decoded (a
    /// transaction larger than a batch goes out as it is decoded, so that
    /// memory holds a few batches of it, not all of it).
    handed_over: usize,
}

impl Txn {
    /// An empty transaction stamped `hlc`, writing into `buffers` (empty;
    /// those of the last transaction, whose capacity they keep).
    fn new(hlc: Hlc, commit_micros: i64, buffers: TxnBuffers) -> Self {
        let (buf, lines) = buffers;
        Txn {
            end_lsn: 0,
            hlc,
            commit_micros,
            buf,
            lines,
            handed_over: 0,
        }
    }

    /// Its buffers, emptied, for the next transaction.
    fn into_buffers(mut self) -> TxnBuffers {
        self.buf.clear();
        self.lines.clear();
        (self.buf, self.lines)
    }

    /// Whether the rows decoded so far are more than one batch holds: the
    /// transaction is split whatever follows. (One that just fills a batch
    /// waits for its commit, so that its batch may travel beside others.)
    fn exceeds_batch(&self, flush_rows: usize, flush_bytes: usize) -> bool {
        self.lines.len() > flush_rows || self.buf.len() > flush_bytes
    }
}

/// A transaction's row buffer and row list.
type TxnBuffers = (Vec<u8>, Vec<Line>);

/// Decoding state of one replication stream: the open transaction and the
/// newest `updated` stamped.
struct DecodeState {
    /// The transaction being decoded (between Begin and Commit).
    cur: Option<Txn>,
    /// `updated` of the newest transaction with rows (or of a probe reached).
    hlc: Hlc,
    /// `cur`'s `updated`, as text.
    updated: String,
    scratch: Vec<Option<(usize, usize)>>,
    /// The last transaction's buffers, emptied, for the next: bulk writes
    /// come as runs of like transactions, and a transaction larger than a
    /// batch keeps them at about a batch (see `hand_over`).
    spare: TxnBuffers,
}

impl DecodeState {
    fn new(floor: Hlc) -> Self {
        DecodeState {
            cur: None,
            hlc: floor,
            updated: String::new(),
            scratch: Vec::new(),
            spare: TxnBuffers::default(),
        }
    }
}

/// A request body ready to send, and what its acknowledgement means.
struct OutBatch {
    body: Vec<u8>,
    rows: usize,
    keys: Vec<u64>,
    /// May travel while other batches are in flight: it is full and holds
    /// whole transactions only. Other batches go alone, after everything
    /// before them was acknowledged, so a trickle arrives in commit order.
    concurrent: bool,
    /// The newest transaction all of whose rows are in this batch or earlier ones.
    boundary: Option<(u64, Hlc)>,
    counts: RowCounts,
    newest_commit_micros: i64,
}

enum Step {
    Batch(OutBatch),
    Probe { lsn: u64, content: String, at: Hlc },
}

/// The batch being filled.
#[derive(Default)]
struct Builder {
    body: Vec<u8>,
    rows: usize,
    keys: Vec<u64>,
    counts: RowCounts,
    newest_commit_micros: i64,
    boundary: Option<(u64, Hlc)>,
    /// Holds part of a transaction too large for one batch.
    split: bool,
    /// The last finished body's size, to reserve for the next one.
    capacity: usize,
}

const BODY_HEAD: &[u8] = b"{\"payload\":[";

/// Rows per table of one batch. Rows come in runs of one table, so the
/// last entry is checked first and usually is the one.
#[derive(Default)]
struct RowCounts(Vec<(Arc<TableInfo>, u64)>);

impl RowCounts {
    fn add(&mut self, table: &Arc<TableInfo>) {
        match self.0.iter_mut().rev().find(|(t, _)| Arc::ptr_eq(t, table)) {
            Some((_, n)) => *n += 1,
            None => self.0.push((table.clone(), 1)),
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.0.iter().map(|(t, n)| (&*t.schema, &*t.name, *n))
    }
}

impl Builder {
    fn is_empty(&self) -> bool {
        self.rows == 0 && self.boundary.is_none()
    }

    /// Payload bytes so far.
    fn bytes(&self) -> usize {
        self.body.len().saturating_sub(BODY_HEAD.len())
    }

    fn push(&mut self, line: &[u8], key_hash: u64, table: &Arc<TableInfo>) {
        if self.body.is_empty() {
            // As large as the last batch: under load batches fill up, and
            // growing a body of hundreds of kilobytes copies it each time.
            self.body.reserve(self.capacity.max(64 * 1024));
            self.body.extend_from_slice(BODY_HEAD);
        } else if self.rows > 0 {
            self.body.push(b',');
        }
        self.body.extend_from_slice(line);
        self.rows += 1;
        self.keys.push(key_hash);
        self.counts.add(table);
    }

    fn finish(&mut self, full: bool) -> OutBatch {
        let mut b = std::mem::take(self);
        if b.rows > 0 {
            b.body
                .extend_from_slice(format!("],\"length\":{}}}", b.rows).as_bytes());
        }
        self.capacity = b.body.len().min(4 << 20);
        OutBatch {
            concurrent: full && !b.split && b.rows > 0,
            body: b.body,
            rows: b.rows,
            keys: b.keys,
            boundary: b.boundary,
            counts: b.counts,
            newest_commit_micros: b.newest_commit_micros,
        }
    }
}

/// A dispatched batch, in commit order.
struct Flight {
    seq: u64,
    done: bool,
    exclusive: bool,
    keys: Vec<u64>,
    boundary: Option<(u64, Hlc)>,
    counts: RowCounts,
    newest_commit_micros: i64,
}

/// Delivery state of one replication stream (rebuilt after a reconnect:
/// whatever was not acknowledged is streamed from the slot again).
struct Pipeline {
    queue: VecDeque<Step>,
    builder: Builder,
    window: VecDeque<Flight>,
    tasks: tokio::task::JoinSet<(u64, Result<(), SendError>)>,
    /// Key hashes of batches in flight (foldhash: they are hashes already,
    /// and each row of each batch is counted in and out).
    keys: foldhash::HashMap<u64, u32>,
    in_flight: usize,
    exclusive: bool,
    next_seq: u64,
}

impl Pipeline {
    fn new() -> Self {
        Pipeline {
            queue: VecDeque::new(),
            builder: Builder::default(),
            window: VecDeque::new(),
            tasks: tokio::task::JoinSet::new(),
            keys: foldhash::HashMap::default(),
            in_flight: 0,
            exclusive: false,
            next_seq: 0,
        }
    }

    fn idle(&self) -> bool {
        self.queue.is_empty() && self.window.is_empty() && self.builder.is_empty()
    }

    /// Bytes of the batch being filled and of the queued batches.
    fn queued_bytes(&self) -> usize {
        let queued: usize = self
            .queue
            .iter()
            .map(|s| match s {
                Step::Batch(b) => b.body.len(),
                Step::Probe { .. } => 0,
            })
            .sum();
        queued + self.builder.body.len()
    }

    fn can_dispatch_front(&self, max_in_flight: usize) -> bool {
        match self.queue.front() {
            Some(Step::Batch(b)) => self.can_dispatch(b, max_in_flight),
            Some(Step::Probe { .. }) => self.in_flight == 0,
            None => false,
        }
    }

    fn can_dispatch(&self, b: &OutBatch, max_in_flight: usize) -> bool {
        if b.rows == 0 {
            return true;
        }
        if self.exclusive {
            return false;
        }
        if !b.concurrent {
            return self.in_flight == 0;
        }
        self.in_flight < max_in_flight && b.keys.iter().all(|k| !self.keys.contains_key(k))
    }
}

/// Queues one of our resolved/advance probes (pg_logical_emit_message) at
/// `lsn`; it ends the batch being filled.
fn push_probe(p: &mut Pipeline, lsn: u64, content: String, at: Hlc) {
    flush_tail(p, false);
    p.queue.push_back(Step::Probe { lsn, content, at });
}

/// Queues a committed transaction's rows (those not handed over yet): whole
/// transactions per batch while they fit, a transaction larger than a batch
/// across several. The batch they end in carries its boundary.
fn push_txn(p: &mut Pipeline, t: &Txn, flush_rows: usize, flush_bytes: usize) {
    push_rows(p, t, flush_rows, flush_bytes);
    let b = &mut p.builder;
    b.boundary = Some((t.end_lsn, t.hlc));
    b.newest_commit_micros = b.newest_commit_micros.max(t.commit_micros);
}

/// Hands the rows of a transaction still being decoded to batches once they
/// are more than one holds (it will be split anyway), so that a huge
/// transaction is held a few batches at a time: the stream is not read while
/// the queue is full.
fn hand_over(p: &mut Pipeline, t: &mut Txn, flush_rows: usize, flush_bytes: usize) {
    if !t.exceeds_batch(flush_rows, flush_bytes) {
        return;
    }
    push_rows(p, t, flush_rows, flush_bytes);
    t.handed_over += t.lines.len();
    t.lines.clear();
    t.buf.clear();
}

/// Appends a transaction's decoded rows to the batches; those of a
/// transaction that does not fit one batch are marked split (they go alone,
/// in order).
fn push_rows(p: &mut Pipeline, t: &Txn, flush_rows: usize, flush_bytes: usize) {
    if t.lines.is_empty() {
        return;
    }
    // Handed over before its commit, a transaction exceeds a batch.
    let fits = t.handed_over == 0 && !t.exceeds_batch(flush_rows, flush_bytes);
    // A transaction starts a new batch when it does not fit beside the
    // transactions already there; once part of it was handed over, the
    // batch being filled holds its own rows, and the rest follows them.
    let b = &mut p.builder;
    if t.handed_over == 0
        && b.rows > 0
        && (b.rows + t.lines.len() > flush_rows || b.bytes() + t.buf.len() > flush_bytes)
    {
        let out = b.finish(true);
        p.queue.push_back(Step::Batch(out));
    }
    for l in &t.lines {
        let b = &mut p.builder;
        let len = l.end - l.start;
        if b.rows > 0 && (b.rows >= flush_rows || b.bytes() + len + 1 > flush_bytes) {
            let out = b.finish(false);
            p.queue.push_back(Step::Batch(out));
        }
        let b = &mut p.builder;
        if !fits {
            b.split = true;
        }
        b.push(&t.buf[l.start..l.end], l.key_hash, &l.table);
        b.newest_commit_micros = b.newest_commit_micros.max(t.commit_micros);
    }
}

/// Queues the batch being filled, however small; `concurrent`: it may travel
/// beside batches in flight when its keys are not there.
fn flush_tail(p: &mut Pipeline, concurrent: bool) {
    if !p.builder.is_empty() {
        let out = p.builder.finish(concurrent);
        p.queue.push_back(Step::Batch(out));
    }
}

struct Probe {
    content: String,
    emitted: Instant,
}

struct Feed {
    opts: ChangefeedOptions,
    metrics: ChangefeedMetrics,
    sink: Sink,
    slot: String,
    publication: String,
    probe_prefix: String,
    /// Replicated tables by (schema, name).
    wanted: HashSet<(String, String)>,
    rels: HashMap<u32, Rel>,
    /// Every `updated` or resolved sent so far is at or below this.
    floor: Hlc,
    last_resolved: Hlc,
    last_resolved_at: Instant,
    probe: Option<Probe>,
    probe_seq: u64,
    last_probe_at: Instant,
    /// Probe reached: its time may be sent as resolved.
    reached: Option<Hlc>,
    advanced_to: u64,
    /// When the position was last reported (see [`STATUS_INTERVAL`]).
    last_reported: Option<Instant>,
    /// Acknowledged through here; reported to the server as the slot's
    /// confirmed position.
    want_advance: u64,
    /// Since when the batch being filled holds rows (for --flushFrequency).
    pending_since: Option<Instant>,
    last_slot_lag: Instant,
    /// The initial scan to send before streaming (the slot was just created).
    pending_scan: Option<scan::PendingScan>,
    /// The floor last recorded in the source (see `floors`).
    persisted_floor: Option<Hlc>,
    /// Floors were recorded since the last pruning.
    floors_to_prune: bool,
    /// The batches sent are the initial scan's.
    scanning: bool,
}

/// An ordinary connection to the source, with the session settings that make
/// values print as the walsender prints them (UTC, ISO dates, hex bytea,
/// round-trip floats), so scanned and streamed rows read the same.
async fn source_session(conn: &str) -> Result<tokio_postgres::Client> {
    let (db, conn) = tokio_postgres::connect(conn, tokio_postgres::NoTls)
        .await
        .context("connecting to the source (--sourceConn)")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("source connection closed: {e}");
        }
    });
    let mut set = String::from("SET application_name = 'meridian changefeed';");
    for (name, value) in OUTPUT_SETTINGS {
        let _ = write!(set, " SET {name} = '{value}';");
    }
    db.batch_execute(&set).await?;
    Ok(db)
}

/// The settings under which the source prints values the way the wire
/// format wants them (UTC ISO timestamps, floats that read back exactly, hex
/// bytea): the scan's session and the replication connection both use them.
const OUTPUT_SETTINGS: [(&str, &str); 5] = [
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO,MDY"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
];

async fn table_exists(db: &tokio_postgres::Client, table: &str) -> Result<bool> {
    Ok(db
        .query_one(&format!("SELECT to_regclass('{table}') IS NOT NULL"), &[])
        .await?
        .get(0))
}

/// The source server's clock, in nanoseconds since the Unix epoch.
async fn server_nanos(db: &tokio_postgres::Client) -> Result<i64> {
    let now: chrono::DateTime<chrono::Utc> =
        db.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
    Ok(now.timestamp_nanos_opt().unwrap_or(0))
}

/// Creates a bookkeeping table unless it exists; checked first, as CREATE
/// TABLE IF NOT EXISTS needs the right to create in the schema even when
/// the table is there (a DBA may create it for a less privileged user).
async fn create_if_absent(
    db: &tokio_postgres::Client,
    table: &str,
    columns: &str,
    purpose: &str,
) -> Result<()> {
    if !table_exists(db, table).await? {
        db.batch_execute(&format!("CREATE TABLE IF NOT EXISTS {table} {columns}"))
            .await
            .with_context(|| {
                format!(
                    "creating {table}, {purpose} (the changefeed's user needs CREATE on the schema, \
                     or a DBA creates the table: CREATE TABLE {table} {columns})"
                )
            })?;
    }
    Ok(())
}

/// A replication-connection error, with what to fix where the cause is known.
fn replication_error(e: pgwire_replication::PgWireError, slot: &str) -> anyhow::Error {
    let text = e.to_string();
    if text.contains("pg_hba.conf") || text.contains("replication connection") {
        anyhow::anyhow!(
            "the source refused a replication connection: {text}. Fix: allow it in pg_hba.conf \
             (a line such as  host replication <user> <address> scram-sha-256) and give the user \
             the REPLICATION attribute (ALTER ROLE <user> REPLICATION)"
        )
    } else {
        anyhow::anyhow!("replication stream of slot {slot}: {text}")
    }
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn micros_to_hlc(commit_micros: i64) -> Hlc {
    Hlc::new((commit_micros + PG_EPOCH_MICROS) * 1000, 0)
}

/// The time in a probe's content (`pid:seq:nanos`); zero when it has none.
fn probe_time(content: &str) -> Hlc {
    let nanos = content
        .rsplit(':')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Hlc::new(nanos, 0)
}

fn next(h: Hlc) -> Hlc {
    Hlc::new(h.nanos, h.logical + 1)
}

fn quote_ident(s: &str) -> String {
    crate::target::sql::quote_ident(s)
}

/// Logical decoding needs `wal_level = logical`; says how to get it.
pub fn check_wal_level(wal_level: &str) -> Result<()> {
    if wal_level != "logical" {
        bail!(
            "the source has wal_level = {wal_level}; logical decoding needs wal_level = logical. \
             Fix: run  ALTER SYSTEM SET wal_level = logical;  and restart PostgreSQL"
        );
    }
    Ok(())
}

/// Splits `db.schema.table`, `schema.table` or `table`.
fn parse_table(spec: &str) -> Result<(Option<String>, String, String)> {
    let parts: Vec<&str> = spec.split('.').collect();
    let strip = |s: &str| s.trim_matches('"').to_string();
    Ok(match parts.as_slice() {
        [t] => (None, "public".into(), strip(t)),
        [s, t] => (None, strip(s), strip(t)),
        [d, s, t] => (Some(strip(d)), strip(s), strip(t)),
        _ => bail!("--table {spec:?}: expected db.schema.table"),
    })
}

impl Feed {
    fn new(opts: ChangefeedOptions, metrics: ChangefeedMetrics, sink: Sink) -> Self {
        let slot = opts.slot_name();
        let publication = opts.publication_name();
        Feed {
            probe_prefix: format!("meridian.changefeed.{slot}"),
            slot,
            publication,
            opts,
            metrics,
            sink,
            wanted: HashSet::new(),
            rels: HashMap::new(),
            floor: Hlc::default(),
            last_resolved: Hlc::default(),
            last_resolved_at: Instant::now() - Duration::from_secs(3600),
            probe: None,
            probe_seq: 0,
            last_probe_at: Instant::now() - Duration::from_secs(3600),
            reached: None,
            advanced_to: 0,
            last_reported: None,
            want_advance: 0,
            pending_since: None,
            last_slot_lag: Instant::now() - Duration::from_secs(3600),
            pending_scan: None,
            persisted_floor: None,
            floors_to_prune: false,
            scanning: false,
        }
    }

    /// Connects, checks the source and creates the publication and slot.
    async fn connect_and_setup(&mut self) -> Result<tokio_postgres::Client> {
        let db = source_session(&self.opts.source_conn).await?;

        let wal_level: String = db.query_one("SHOW wal_level", &[]).await?.get(0);
        check_wal_level(&wal_level)?;
        let current_db: String = db.query_one("SELECT current_database()", &[]).await?.get(0);

        let mut problems = Vec::new();
        let mut found = Vec::new();
        self.wanted.clear();
        for spec in &self.opts.tables {
            let (d, schema, table) = parse_table(spec)?;
            if let Some(d) = &d {
                if d != &current_db {
                    problems.push(format!(
                        "table {spec} is in database {d:?} but --sourceConn connects to database {current_db:?}"
                    ));
                    continue;
                }
            }
            let row = db
                .query_opt(
                    "SELECT c.oid, c.relreplident::text, c.relkind = 'p' FROM pg_class c \
                     JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
                    &[&schema, &table],
                )
                .await?;
            let Some(row) = row else {
                problems.push(format!(
                    "table {spec}: no table {schema}.{table} in database {current_db:?}"
                ));
                continue;
            };
            let oid: u32 = row.get(0);
            let ident: String = row.get(1);
            let partitioned: bool = row.get(2);
            let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
            // A partitioned table's rows live in its partitions: each one
            // keeps (or not) the whole old row.
            let mut identities = vec![(spec.clone(), qualified.clone(), ident)];
            if partitioned {
                for r in db
                    .query(
                        "SELECT n.nspname::text, c.relname::text, c.relreplident::text \
                         FROM pg_partition_tree($1::oid::regclass) t JOIN pg_class c ON c.oid = t.relid \
                         JOIN pg_namespace n ON n.oid = c.relnamespace WHERE t.isleaf ORDER BY 1, 2",
                        &[&oid],
                    )
                    .await?
                {
                    let name = format!(
                        "{}.{}",
                        quote_ident(&r.get::<_, String>(0)),
                        quote_ident(&r.get::<_, String>(1))
                    );
                    identities.push((format!("{spec}'s partition {name}"), name, r.get(2)));
                }
            }
            for (what, name, ident) in identities {
                if ident == "f" {
                    continue;
                }
                let has = match ident.as_str() {
                    "d" => "DEFAULT",
                    "n" => "NOTHING",
                    "i" => "USING INDEX",
                    _ => "not FULL",
                };
                problems.push(format!(
                    "table {what} has REPLICA IDENTITY {has}, but the changefeed needs the whole old row \
                     for \"before\". Fix: run  ALTER TABLE {name} REPLICA IDENTITY FULL;  \
                     (or SELECT meridian_enable('{qualified}', '<region>'); from sql/postgres/setup.sql)"
                ));
            }
            // The series exists from the start, so increase() sees the first.
            self.metrics
                .truncates_skipped
                .with_label_values(&[&schema, &table]);
            self.wanted.insert((schema.clone(), table.clone()));
            found.push((schema, table, qualified, partitioned));
        }
        if !problems.is_empty() {
            bail!(
                "the source is not ready for a changefeed:\n  - {}",
                problems.join("\n  - ")
            );
        }

        // Publication: create it, or add the tables it lacks. It publishes
        // through partition roots: otherwise pgoutput names the partition a
        // row lives in, which is not a table of the feed.
        let pub_row = db
            .query_opt(
                "SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1",
                &[&self.publication],
            )
            .await?;
        let qpub = quote_ident(&self.publication);
        if let Some(r) = &pub_row {
            if !r.get::<_, bool>(1) && found.iter().any(|f| f.3) {
                db.batch_execute(&format!(
                    "ALTER PUBLICATION {qpub} SET (publish_via_partition_root = true)"
                ))
                .await
                .with_context(|| {
                    format!("making publication {qpub} publish through partition roots")
                })?;
                tracing::info!(
                    "publication {qpub} now publishes partitioned tables through their root"
                );
            }
        }
        match pub_row {
            None => {
                let list: Vec<&str> = found.iter().map(|f| f.2.as_str()).collect();
                db.batch_execute(&format!(
                    "CREATE PUBLICATION {qpub} FOR TABLE {} WITH (publish_via_partition_root = true)",
                    list.join(", ")
                ))
                .await
                .with_context(|| format!("creating publication {qpub}"))?;
                tracing::info!("created publication {qpub}");
            }
            Some(r) if r.get::<_, bool>(0) => {}
            Some(_) => {
                let rows = db
                    .query(
                        "SELECT schemaname::text, tablename::text FROM pg_publication_tables WHERE pubname = $1",
                        &[&self.publication],
                    )
                    .await?;
                let have: HashSet<(String, String)> =
                    rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                for (schema, table, qualified, _) in &found {
                    if !have.contains(&(schema.clone(), table.clone())) {
                        db.batch_execute(&format!(
                            "ALTER PUBLICATION {qpub} ADD TABLE {qualified}"
                        ))
                        .await
                        .with_context(|| format!("adding {qualified} to publication {qpub}"))?;
                        tracing::info!("added {qualified} to publication {qpub}");
                    }
                }
            }
        }

        // Slot: create it (after the publication, which decoding must see).
        let mut slot_row = db
            .query_opt(
                "SELECT plugin::text, database::text, confirmed_flush_lsn::text FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        self.pending_scan = None;
        if slot_row.is_some() && self.opts.initial_scan && self.scan_interrupted(&db).await? {
            tracing::warn!(
                slot = %self.slot,
                "the initial scan did not finish: dropping the slot to scan again from a new snapshot"
            );
            db.execute("SELECT pg_drop_replication_slot($1)", &[&self.slot])
                .await
                .with_context(|| format!("dropping replication slot {:?}", self.slot))?;
            slot_row = None;
        }
        let mut created = false;
        let confirmed = match slot_row {
            None if self.opts.initial_scan => {
                let (lsn, scan) = self.create_slot_for_scan(&db).await?;
                self.pending_scan = Some(scan);
                created = true;
                lsn
            }
            None => {
                let row = db
                    .query_one(
                        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                        &[&self.slot],
                    )
                    .await
                    .with_context(|| format!("creating replication slot {:?}", self.slot))?;
                tracing::info!(slot = %self.slot, "created replication slot: changes committed from here on are sent (existing rows are not scanned)");
                created = true;
                row.get::<_, String>(0)
            }
            Some(r) => {
                let plugin: Option<String> = r.get(0);
                let database: Option<String> = r.get(1);
                if plugin.as_deref() != Some("pgoutput") {
                    bail!(
                        "replication slot {:?} exists but uses plugin {:?}, not pgoutput; \
                         choose another --slot (or --name), or drop it with SELECT pg_drop_replication_slot('{}')",
                        self.slot, plugin, self.slot
                    );
                }
                if database.as_deref() != Some(current_db.as_str()) {
                    bail!(
                        "replication slot {:?} belongs to database {:?}, not {:?} (slot names are cluster-wide); \
                         choose another --name or --slot",
                        self.slot, database, current_db
                    );
                }
                r.get::<_, Option<String>>(2)
                    .unwrap_or_else(|| "0/0".into())
            }
        };
        // The slot's own position is the truth after a (re)connect.
        self.advanced_to = pgoutput::parse_lsn(&confirmed)?;
        self.want_advance = self.want_advance.max(self.advanced_to);
        self.load_floor(&db, self.advanced_to, created).await?;
        self.rels.clear();
        Ok(db)
    }

    /// The replication connection's settings, from `--sourceConn`. Decoded
    /// values are printed by the walsender's session, so it gets the same
    /// output settings a query session would (UTC, ISO dates, hex bytea,
    /// round-trip floats).
    fn replication_config(&self) -> Result<ReplicationConfig> {
        use tokio_postgres::config::Host;
        let cfg: tokio_postgres::Config = self
            .opts
            .source_conn
            .parse()
            .context("parsing --sourceConn")?;
        let host = match cfg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".to_string(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let user = cfg.get_user().unwrap_or("postgres").to_string();
        let password = cfg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let database = cfg.get_dbname().unwrap_or(&user).to_string();
        let mut rc = ReplicationConfig::new(
            host,
            user,
            password,
            database,
            self.slot.clone(),
            // Quoted: pgoutput folds unquoted publication names to lower case.
            quote_ident(&self.publication),
        )
        .with_port(port)
        .with_start_lsn(Lsn::from_u64(self.advanced_to))
        // Acknowledged positions reach the server within this.
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(Duration::from_secs(5))
        .with_application_name("meridian changefeed")
        .with_options(
            OUTPUT_SETTINGS
                .iter()
                .map(|(name, value)| format!("-c {name}={value}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
        rc.buffer_events = 16 * 1024;
        Ok(rc)
    }

    /// Streams, sends and acknowledges until shutdown (Ok) or a source error
    /// (Err). On a clean stop, the acknowledged position is written to the
    /// slot before returning, so a restart sends nothing twice.
    async fn stream(
        &mut self,
        db: &tokio_postgres::Client,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let mut repl = ReplicationClient::connect(self.replication_config()?)
            .await
            .map_err(|e| replication_error(e, &self.slot))?;
        let result = self.stream_events(db, &mut repl, shutdown).await;
        match &result {
            Ok(()) => {
                let _ = tokio::time::timeout(Duration::from_secs(5), repl.shutdown()).await;
                self.persist_position(db).await;
            }
            Err(_) => repl.abort(),
        }
        result
    }

    /// The stream loop: acknowledgements, resolved checkpoints, dispatch of
    /// queued batches, then whatever the stream has delivered.
    async fn stream_events(
        &mut self,
        db: &tokio_postgres::Client,
        repl: &mut ReplicationClient,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let mut p = Pipeline::new();
        let mut st = DecodeState::new(self.floor);
        let max_in_flight = self.opts.max_in_flight.max(1);
        // Decoded batches waiting to be sent, at most: beyond this the stream
        // is left unread and PostgreSQL waits (TCP backpressure).
        let queue_max = 2 * max_in_flight + 2;
        // Rows seen since the last quiet moment: no probe while the source is busy.
        let mut idle = true;
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            // Acknowledgements.
            while let Some(done) = p.tasks.try_join_next() {
                if !self.sent(&mut p, done)? {
                    return Ok(());
                }
            }
            self.take_acknowledged(&mut p);
            self.report_position(db, repl).await?;

            // Resolved checkpoints need everything before them acknowledged:
            // when one is due, let the window drain first.
            let mut resolved_due = self.resolved_due();
            if p.in_flight == 0 && (resolved_due || p.idle()) {
                let quiet = idle && p.idle() && st.cur.is_none();
                if !self.maybe_resolved(db, quiet, shutdown).await? {
                    return Ok(());
                }
                resolved_due = self.resolved_due();
            }

            // Dispatch what may go now. Nothing goes while a resolved
            // checkpoint waits for the window to drain.
            if !resolved_due {
                loop {
                    self.dispatch_ready(&mut p, shutdown);
                    if p.in_flight > 0 || !matches!(p.queue.front(), Some(Step::Probe { .. })) {
                        break;
                    }
                    self.take_acknowledged(&mut p);
                    let Some(Step::Probe { lsn, content, at }) = p.queue.pop_front() else {
                        unreachable!()
                    };
                    // As decoding did (see on_event): the floor at this position
                    // depends only on the WAL.
                    self.acked_through(lsn, at);
                    if self.probe.as_ref().is_some_and(|pr| pr.content == content) {
                        self.probe = None;
                        self.reached = Some(self.floor);
                    }
                }
            }
            self.report_position(db, repl).await?;

            // Decode what the stream has delivered, without waiting.
            // `caught_up`: the stream had nothing more to give.
            let mut caught_up = false;
            let mut rows = 0;
            let t0 = Instant::now();
            if p.queue.len() < queue_max {
                for _ in 0..50_000 {
                    let Some(ev) = repl.recv().now_or_never() else {
                        caught_up = true;
                        break;
                    };
                    rows += self.on_event(db, &mut p, &mut st, ev).await?;
                    if p.queue.len() >= queue_max {
                        break;
                    }
                }
            }
            if rows > 0 {
                idle = false;
                tracing::trace!(
                    rows,
                    queued = p.queue.len(),
                    in_flight = p.in_flight,
                    "decoded in {:?}",
                    t0.elapsed()
                );
            }
            // The batch being filled goes when the stream has nothing more for
            // now, after --flushFrequency: at once when nothing is in flight (a
            // trickle goes in commit order, one batch at a time); beside
            // batches in flight only once it is a bulk batch of whole
            // transactions (a tenth of --flushRows), which may travel
            // concurrently like a full one. Under load batches fill up while
            // others travel.
            let bulk = p.builder.rows >= (self.opts.flush_rows / 10).max(1) && !p.builder.split;
            // A tail that may go (now or when its time is up): not while the
            // rest of a transaction being handed over is on its way (a
            // transaction is streamed once committed): that batch fills up.
            let tail = !p.builder.is_empty() && st.cur.as_ref().is_none_or(|t| t.handed_over == 0);
            if caught_up
                && tail
                && (p.in_flight == 0 || bulk && p.in_flight < max_in_flight)
                && p.queue.is_empty()
                && self
                    .pending_since
                    .is_none_or(|t| t.elapsed() >= self.opts.flush_frequency)
            {
                flush_tail(&mut p, bulk);
                self.pending_since = None;
            }
            if p.idle() && st.cur.is_none() {
                self.metrics.lag_seconds.set(0.0);
            }
            let open = st.cur.as_ref().map_or(0, |t| t.buf.len());
            self.metrics
                .pending_bytes
                .set((open + p.queued_bytes()) as i64);

            if self.last_slot_lag.elapsed() >= Duration::from_secs(1) {
                self.last_slot_lag = Instant::now();
                let lag: Option<i64> = db
                    .query_opt(
                        "SELECT (pg_current_wal_lsn() - confirmed_flush_lsn)::int8 \
                         FROM pg_replication_slots WHERE slot_name = $1",
                        &[&self.slot],
                    )
                    .await?
                    .and_then(|r| r.get(0));
                self.metrics.slot_lag_bytes.set(lag.unwrap_or(0));
                self.prune_floors(db).await?;
            }

            if !p.queue.is_empty() && p.can_dispatch_front(max_in_flight) && !resolved_due {
                continue;
            }
            if !caught_up && p.queue.len() < queue_max {
                continue;
            }
            // Wait for an acknowledgement, the stream, a timer or shutdown.
            let room = p.queue.len() < queue_max;
            let wait = match self.pending_since {
                // Only a tail that may go once its time is up needs the timer;
                // one behind batches in flight goes when they are answered.
                Some(t) if tail && p.in_flight == 0 && p.queue.is_empty() => self
                    .opts
                    .flush_frequency
                    .saturating_sub(t.elapsed())
                    .min(self.opts.poll_interval)
                    .max(Duration::from_millis(1)),
                _ => self.opts.poll_interval,
            };
            tokio::select! {
                ev = repl.recv(), if room => {
                    idle &= self.on_event(db, &mut p, &mut st, ev).await? == 0;
                }
                done = p.tasks.join_next(), if p.in_flight > 0 => {
                    if let Some(done) = done {
                        if !self.sent(&mut p, done)? {
                            return Ok(());
                        }
                    }
                }
                _ = tokio::time::sleep(wait) => {
                    if p.idle() && st.cur.is_none() {
                        idle = true;
                    }
                }
                _ = shutdown.changed() => {}
            }
        }
    }

    /// Handles one event of the replication stream; returns the rows it added
    /// (and starts the --flushFrequency clock when it added some).
    async fn on_event(
        &mut self,
        db: &tokio_postgres::Client,
        p: &mut Pipeline,
        st: &mut DecodeState,
        ev: pgwire_replication::Result<Option<ReplicationEvent>>,
    ) -> Result<usize> {
        let ev = ev
            .map_err(|e| replication_error(e, &self.slot))?
            .context("the replication stream ended")?;
        let (flush_rows, flush_bytes) = (self.opts.flush_rows, self.opts.flush_bytes);
        match ev {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                let hlc = micros_to_hlc(commit_time_micros).max(next(st.hlc));
                st.updated.clear();
                let _ = write!(st.updated, "{hlc}");
                let buffers = std::mem::take(&mut st.spare);
                st.cur = Some(Txn::new(hlc, commit_time_micros, buffers));
                Ok(0)
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                let Some(mut t) = st.cur.take() else {
                    return Ok(0);
                };
                t.end_lsn = end_lsn.as_u64();
                let rows = t.handed_over + t.lines.len();
                if rows == 0 {
                    t.hlc = st.hlc;
                } else {
                    st.hlc = t.hlc;
                }
                push_txn(p, &t, flush_rows, flush_bytes);
                st.spare = t.into_buffers();
                if rows > 0 {
                    self.pending_since.get_or_insert_with(Instant::now);
                }
                Ok(rows)
            }
            ReplicationEvent::XLogData { data, .. } => {
                let msg = pgoutput::decode(&data)?;
                self.on_message(db, st, msg).await?;
                if let Some(t) = st.cur.as_mut() {
                    hand_over(p, t, flush_rows, flush_bytes);
                }
                Ok(0)
            }
            ReplicationEvent::Message {
                transactional: false,
                lsn,
                prefix,
                content,
            } if prefix == self.probe_prefix => {
                let content = String::from_utf8_lossy(&content).into_owned();
                // Everything after a probe is stamped above the time written
                // in it, whichever process wrote it: `updated` is then a
                // function of the WAL, the same when a restart decodes it again.
                let at = probe_time(&content);
                st.hlc = st.hlc.max(at);
                push_probe(p, lsn.as_u64(), content, at);
                Ok(0)
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // Every change before this point was decoded; with nothing
                // pending, the slot may move past WAL of other tables.
                if p.idle() && st.cur.is_none() {
                    self.pending_advance(wal_end.as_u64());
                }
                Ok(0)
            }
            ReplicationEvent::StoppedAt { .. } | ReplicationEvent::Message { .. } => Ok(0),
        }
    }

    /// Decodes one pgoutput message inside (or about) the open transaction.
    async fn on_message(
        &mut self,
        db: &tokio_postgres::Client,
        st: &mut DecodeState,
        msg: Message<'_>,
    ) -> Result<()> {
        match msg {
            Message::Relation {
                relid,
                namespace,
                name,
                columns,
            } => {
                let table = self
                    .wanted
                    .contains(&(namespace.clone(), name.clone()))
                    .then(|| TableInfo::new(&namespace, &name));
                // A Relation message comes at the start of a stream and
                // again after DDL on the table, which may have renamed or
                // replaced its key: the key is read again each time.
                let pk = match table {
                    Some(_) => self.primary_key(db, relid).await?,
                    None => Vec::new(),
                };
                self.rels.insert(relid, Rel::new(table, columns, &pk));
            }
            Message::Insert { relid, new } => {
                if let Some(t) = st.cur.as_mut() {
                    let (u, scratch) = (&st.updated, &mut st.scratch);
                    self.write_row(t, relid, None, Some((&new, None)), u, scratch);
                }
            }
            Message::Update { relid, old, new } => {
                if let Some(t) = st.cur.as_mut() {
                    match old.as_deref() {
                        // CockroachDB sends a primary key change as a delete
                        // of the old key and an insert of the new one: as one
                        // event, the receiver would keep the old row for ever.
                        Some(old) if self.key_changed(relid, old, &new) => {
                            let (u, scratch) = (&st.updated, &mut st.scratch);
                            self.write_row(t, relid, Some(old), None, u, scratch);
                            // Unchanged TOASTed values come from the old row.
                            self.write_row(t, relid, None, Some((&new, Some(old))), u, scratch);
                        }
                        old => {
                            let (u, scratch) = (&st.updated, &mut st.scratch);
                            self.write_row(t, relid, old, Some((&new, old)), u, scratch);
                        }
                    }
                }
            }
            Message::Delete { relid, old } => {
                if let Some(t) = st.cur.as_mut() {
                    self.write_row(t, relid, Some(&old), None, &st.updated, &mut st.scratch);
                }
            }
            Message::Truncate { relids } => {
                // A changefeed batch has no way to say "every row": the
                // target keeps its rows, and the operator must be told.
                for t in relids
                    .iter()
                    .filter_map(|r| self.rels.get(r).and_then(|r| r.table.as_ref()))
                {
                    tracing::warn!(
                        table = %format!("{}.{}", t.schema, t.name),
                        "TRUNCATE at the source is not replicated (changefeeds carry rows, not truncates): \
                         truncate the table on the target too, or the two sides differ"
                    );
                    self.metrics
                        .truncates_skipped
                        .with_label_values(&[&t.schema, &t.name])
                        .inc();
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A resolved checkpoint is due and would say something new.
    fn resolved_due(&self) -> bool {
        self.opts
            .resolved_interval
            .filter(|d| !d.is_zero())
            .is_some_and(|d| self.last_resolved_at.elapsed() >= d)
            && self.floor.max(self.reached.unwrap_or_default()) > self.last_resolved
    }

    /// Whether an update moved its row to another primary key. An unchanged
    /// TOASTed value was not changed, key or not.
    fn key_changed(&self, relid: u32, old: &[Datum], new: &[Datum]) -> bool {
        self.rels.get(&relid).is_some_and(|rel| {
            rel.table.is_some()
                && rel.key_idx.iter().any(|&i| match new.get(i) {
                    None | Some(Datum::Unchanged) => false,
                    n => n != old.get(i),
                })
        })
    }

    /// Writes one row's payload entry into its transaction: `old` as
    /// `before`, `new` as `after` with its unchanged (TOASTed) values taken
    /// from the row beside it.
    fn write_row(
        &self,
        t: &mut Txn,
        relid: u32,
        old: Option<&[Datum]>,
        new: Option<(&[Datum], Option<&[Datum]>)>,
        updated: &str,
        frags: &mut Vec<Option<(usize, usize)>>,
    ) {
        let Some(rel) = self.rels.get(&relid) else {
            return;
        };
        let Some(table) = &rel.table else {
            return;
        };
        let buf = &mut t.buf;
        let start = buf.len();
        // Where each column's value of the key source (after, else before) is.
        frags.clear();
        frags.resize(rel.columns.len(), None);
        let key_from_new = new.is_some();
        let mut write_tuple =
            |buf: &mut Vec<u8>, tuple: &[Datum], fallback: Option<&[Datum]>, record: bool| {
                buf.push(b'{');
                let mut first = true;
                for (i, col) in rel.columns.iter().enumerate() {
                    let d = tuple.get(i).unwrap_or(&Datum::Null);
                    let d = match d {
                        Datum::Unchanged => match fallback.and_then(|f| f.get(i)) {
                            Some(d @ Datum::Text(_)) | Some(d @ Datum::Null) => d,
                            _ => {
                                tracing::warn!(
                                    table = %table.name, column = %col.name,
                                    "unchanged TOAST value without the old row; column left out"
                                );
                                continue;
                            }
                        },
                        d => d,
                    };
                    if !first {
                        buf.push(b',');
                    }
                    first = false;
                    buf.extend_from_slice(&rel.name_json[i]);
                    let vstart = buf.len();
                    match d {
                        Datum::Text(s) => values::write_json(buf, col.type_oid, s),
                        _ => buf.extend_from_slice(b"null"),
                    }
                    if record {
                        frags[i] = Some((vstart, buf.len()));
                    }
                }
                buf.push(b'}');
            };
        buf.extend_from_slice(b"{\"after\":");
        match new {
            Some((n, unchanged_from)) => write_tuple(buf, n, unchanged_from, true),
            None => buf.extend_from_slice(b"null"),
        }
        buf.extend_from_slice(b",\"before\":");
        match old {
            Some(o) => write_tuple(buf, o, None, !key_from_new),
            None => buf.extend_from_slice(b"null"),
        }
        buf.extend_from_slice(b",\"key\":[");
        let key_start = buf.len();
        for (n, &i) in rel.key_idx.iter().enumerate() {
            if n > 0 {
                buf.push(b',');
            }
            match frags[i] {
                Some((a, b)) => buf.extend_from_within(a..b),
                None => buf.extend_from_slice(b"null"),
            }
        }
        let key_hash = table.key_hash(&buf[key_start..]);
        buf.extend_from_slice(b"],\"topic\":");
        buf.extend_from_slice(&rel.topic_json);
        buf.extend_from_slice(b",\"updated\":\"");
        buf.extend_from_slice(updated.as_bytes());
        buf.extend_from_slice(b"\"}");
        t.lines.push(Line {
            start,
            end: buf.len(),
            key_hash,
            table: table.clone(),
        });
    }

    /// Starts sending `b` (or records it as acknowledged when it has no rows).
    fn dispatch(&mut self, p: &mut Pipeline, b: OutBatch, shutdown: &watch::Receiver<bool>) {
        let seq = p.next_seq;
        p.next_seq += 1;
        let exclusive = !b.concurrent;
        if b.rows > 0 {
            for k in &b.keys {
                *p.keys.entry(*k).or_default() += 1;
            }
            p.in_flight += 1;
            p.exclusive |= exclusive;
            let sink = self.sink.clone();
            let mut sd = shutdown.clone();
            let body = b.body;
            p.tasks
                .spawn(async move { (seq, sink.send(body, &mut sd).await) });
        }
        p.window.push_back(Flight {
            seq,
            done: b.rows == 0,
            exclusive: exclusive && b.rows > 0,
            keys: b.keys,
            boundary: b.boundary,
            counts: b.counts,
            newest_commit_micros: b.newest_commit_micros,
        });
    }

    /// Records one finished send. False on shutdown.
    fn sent(
        &mut self,
        p: &mut Pipeline,
        done: std::result::Result<(u64, Result<(), SendError>), tokio::task::JoinError>,
    ) -> Result<bool> {
        let (seq, result) = done.context("sending task")?;
        match result {
            Ok(()) => {}
            Err(SendError::Shutdown) => return Ok(false),
        }
        let f = p
            .window
            .iter_mut()
            .find(|f| f.seq == seq)
            .context("acknowledged batch not in flight")?;
        f.done = true;
        p.in_flight -= 1;
        if f.exclusive {
            p.exclusive = false;
        }
        for k in &f.keys {
            if let Some(n) = p.keys.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    p.keys.remove(k);
                }
            }
        }
        self.metrics.record_sent(f.counts.iter(), self.scanning);
        let newest = micros_to_hlc(f.newest_commit_micros);
        self.metrics
            .lag_seconds
            .set(((now_nanos() - newest.nanos) as f64 / 1e9).max(0.0));
        Ok(true)
    }

    /// Moves the acknowledged point past the leading batches that are done.
    fn take_acknowledged(&mut self, p: &mut Pipeline) {
        while p.window.front().is_some_and(|f| f.done) {
            let f = p.window.pop_front().unwrap();
            if let Some((lsn, hlc)) = f.boundary {
                self.acked_through(lsn, hlc);
            }
        }
    }

    /// Everything up to `lsn` is acknowledged, and `updated` reached `hlc`
    /// there.
    fn acked_through(&mut self, lsn: u64, hlc: Hlc) {
        self.floor = self.floor.max(hlc);
        self.pending_advance(lsn);
    }

    /// Sends the batches at the front of the queue that may go now.
    fn dispatch_ready(&mut self, p: &mut Pipeline, shutdown: &watch::Receiver<bool>) {
        let max_in_flight = self.opts.max_in_flight.max(1);
        while let Some(Step::Batch(b)) = p.queue.front() {
            if !p.can_dispatch(b, max_in_flight) {
                break;
            }
            let Some(Step::Batch(b)) = p.queue.pop_front() else {
                unreachable!()
            };
            self.dispatch(p, b, shutdown);
        }
    }

    /// The table's primary-key column names, in key order, as the catalog
    /// holds them now.
    async fn primary_key(&self, db: &tokio_postgres::Client, relid: u32) -> Result<Vec<String>> {
        let rows = db
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisprimary \
                 ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&relid],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// Reports the acknowledged position to the server (sent with the next
    /// standby status update): the slot's confirmed position moves there.
    async fn report_position(
        &mut self,
        db: &tokio_postgres::Client,
        repl: &ReplicationClient,
    ) -> Result<()> {
        // The server hears the position only with the next status update, so
        // reporting (and writing the floor, a commit on the source) more
        // often than that would stall the stream for nothing.
        let due = self
            .last_reported
            .is_none_or(|at| at.elapsed() >= STATUS_INTERVAL);
        if self.want_advance > self.advanced_to && due {
            self.record_floor(db).await?;
            repl.update_applied_lsn(Lsn::from_u64(self.want_advance));
            self.advanced_to = self.want_advance;
            self.last_reported = Some(Instant::now());
        }
        Ok(())
    }

    /// After the stream stopped: writes the acknowledged position into the
    /// slot (the last status update may not have reached the server). The
    /// walsender releases the slot as it exits, so this waits a little for it.
    async fn persist_position(&mut self, db: &tokio_postgres::Client) {
        if self.want_advance == 0 {
            return;
        }
        if let Err(e) = self.record_floor(db).await {
            tracing::warn!(slot = %self.slot, "the slot keeps its position: {e:#}");
            return;
        }
        let to = pgoutput::lsn_to_string(self.want_advance);
        for _ in 0..40 {
            match db
                .execute(
                    "SELECT pg_replication_slot_advance($1::text::name, $2::text::pg_lsn) \
                     FROM pg_replication_slots WHERE slot_name = $1 AND confirmed_flush_lsn < $2::text::pg_lsn",
                    &[&self.slot, &to],
                )
                .await
            {
                Ok(_) => return,
                Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => {
                    tracing::debug!(slot = %self.slot, "could not record the position {to} in the slot: {e}");
                    return;
                }
            }
        }
    }

    fn pending_advance(&mut self, lsn: u64) {
        self.want_advance = self.want_advance.max(lsn);
    }

    /// Sends a resolved checkpoint when one is due; emits probes when idle.
    /// False on shutdown.
    async fn maybe_resolved(
        &mut self,
        db: &tokio_postgres::Client,
        idle: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        if self
            .probe
            .as_ref()
            .is_some_and(|p| p.emitted.elapsed() > Duration::from_secs(30))
        {
            self.probe = None; // lost (e.g. the server restarted before flushing it)
        }
        let interval = self.opts.resolved_interval.filter(|d| !d.is_zero());
        let Some(interval) = interval else {
            // No checkpoints; still probe now and then so the slot advances
            // past WAL of other tables while idle.
            if idle
                && self.probe.is_none()
                && self.last_probe_at.elapsed() >= Duration::from_secs(5)
            {
                self.emit_probe(db).await?;
            }
            self.reached = None;
            return Ok(true);
        };
        if self.last_resolved_at.elapsed() < interval {
            return Ok(true);
        }
        let mut candidate = self.floor;
        if let Some(r) = self.reached.take() {
            candidate = candidate.max(r);
        } else if idle && self.probe.is_none() {
            self.emit_probe(db).await?;
        }
        if candidate > self.last_resolved {
            let body = format!("{{\"resolved\":\"{candidate}\"}}");
            match self.sink.send(body, shutdown).await {
                Ok(()) => {}
                Err(SendError::Shutdown) => return Ok(false),
            }
            self.metrics.resolved_sent.inc();
            self.last_resolved = candidate;
            self.floor = self.floor.max(candidate);
            self.last_resolved_at = Instant::now();
        }
        Ok(true)
    }

    async fn emit_probe(&mut self, db: &tokio_postgres::Client) -> Result<()> {
        // Read the clock first: any transaction committing after this point
        // either precedes the message in the WAL (and is sent before the probe
        // is reached) or is stamped above the probe's time.
        let nanos = server_nanos(db).await?;
        self.probe_seq += 1;
        let content = format!("{}:{}:{nanos}", std::process::id(), self.probe_seq);
        db.execute(
            "SELECT pg_logical_emit_message(false, $1::text, $2::text)",
            &[&self.probe_prefix, &content],
        )
        .await?;
        self.probe = Some(Probe {
            content,
            emitted: Instant::now(),
        });
        self.last_probe_at = Instant::now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_specs() {
        assert_eq!(
            parse_table("kv.public.kv").unwrap(),
            (Some("kv".into()), "public".into(), "kv".into())
        );
        assert_eq!(parse_table("s.t").unwrap(), (None, "s".into(), "t".into()));
        assert_eq!(
            parse_table("t").unwrap(),
            (None, "public".into(), "t".into())
        );
        assert!(parse_table("a.b.c.d").is_err());
    }

    #[test]
    fn slot_names() {
        let mut o = ChangefeedOptions::new("x", vec![], "webhook-http://h/db/s");
        assert_eq!(o.slot_name(), "meridian");
        assert_eq!(o.publication_name(), "meridian");
        o.name = "East-West".into();
        assert_eq!(o.slot_name(), "east_west");
        assert_eq!(o.publication_name(), "East-West");
    }

    /// Decodes `rows` rows of ten bytes into `t`, handing them over as a
    /// running changefeed does after each message.
    fn decode_rows(
        p: &mut Pipeline,
        t: &mut Txn,
        keys: std::ops::Range<u64>,
        limits: (usize, usize),
    ) {
        let table = TableInfo::new("public", "kv");
        for k in keys {
            let start = t.buf.len();
            t.buf
                .extend_from_slice(format!("{{\"k\":{k:>4}}}").as_bytes());
            t.lines.push(Line {
                start,
                end: t.buf.len(),
                key_hash: k,
                table: table.clone(),
            });
            hand_over(p, t, limits.0, limits.1);
        }
    }

    /// Commits `t` at `lsn` and queues whatever is still being filled (as
    /// a batch that may travel beside others, with `concurrent`).
    fn commit(
        p: &mut Pipeline,
        mut t: Txn,
        lsn: u64,
        limits: (usize, usize),
        concurrent: bool,
    ) -> Vec<OutBatch> {
        t.end_lsn = lsn;
        push_txn(p, &t, limits.0, limits.1);
        flush_tail(p, concurrent);
        p.queue
            .drain(..)
            .map(|s| match s {
                Step::Batch(b) => b,
                Step::Probe { .. } => unreachable!(),
            })
            .collect()
    }

    fn shape(batches: &[OutBatch]) -> Vec<(usize, bool, Option<u64>)> {
        batches
            .iter()
            .map(|b| (b.rows, b.concurrent, b.boundary.map(|(lsn, _)| lsn)))
            .collect()
    }

    /// A transaction larger than a batch goes out while it is decoded, in
    /// full batches that travel alone; whole transactions before it keep
    /// their own batch, and only its last batch carries its boundary.
    #[test]
    fn a_large_transaction_is_handed_over_in_full_batches() {
        let limits = (10, 1 << 20);
        let mut p = Pipeline::new();
        let mut a = Txn::new(Hlc::new(1, 0), 0, TxnBuffers::default());
        decode_rows(&mut p, &mut a, 0..3, limits);
        a.end_lsn = 100;
        push_txn(&mut p, &a, limits.0, limits.1);
        let mut b = Txn::new(Hlc::new(2, 0), 0, TxnBuffers::default());
        decode_rows(&mut p, &mut b, 3..28, limits);
        assert_eq!(
            p.queue.len(),
            3,
            "a, then two of b's batches before its commit"
        );
        let batches = commit(&mut p, b, 200, limits, false);
        assert_eq!(
            shape(&batches),
            [
                (3, true, Some(100)),
                (10, false, None),
                (10, false, None),
                (5, false, Some(200))
            ]
        );
        let keys: Vec<u64> = batches.iter().flat_map(|b| b.keys.clone()).collect();
        assert_eq!(keys, (0..28).collect::<Vec<_>>());

        // A transaction that just fills a batch waits for its commit and
        // may travel beside others; one row more, and it is split.
        let mut p = Pipeline::new();
        let mut c = Txn::new(Hlc::new(3, 0), 0, TxnBuffers::default());
        decode_rows(&mut p, &mut c, 0..10, limits);
        assert!(p.queue.is_empty() && p.builder.is_empty());
        assert_eq!(
            shape(&commit(&mut p, c, 300, limits, true)),
            [(10, true, Some(300))]
        );
        let mut d = Txn::new(Hlc::new(4, 0), 0, TxnBuffers::default());
        decode_rows(&mut p, &mut d, 0..11, limits);
        assert_eq!(
            shape(&commit(&mut p, d, 400, limits, false)),
            [(10, false, None), (1, false, Some(400))]
        );
    }

    /// Cut by bytes, the batches of a large transaction are full ones, not
    /// a full one and a single row by turns.
    #[test]
    fn batches_cut_by_bytes_stay_full() {
        // Rows take 10 bytes and a comma: nine fit in 100 bytes.
        let limits = (1000, 100);
        let mut p = Pipeline::new();
        let mut t = Txn::new(Hlc::new(1, 0), 0, TxnBuffers::default());
        decode_rows(&mut p, &mut t, 0..50, limits);
        let batches = commit(&mut p, t, 100, limits, false);
        let rows: Vec<usize> = batches.iter().map(|b| b.rows).collect();
        assert_eq!(rows, [9, 9, 9, 9, 9, 5]);
    }

    #[test]
    fn commit_micros_to_hlc() {
        // 2000-01-01 is 946684800 Unix seconds.
        assert_eq!(
            micros_to_hlc(1).to_string(),
            "946684800000001000.0000000000"
        );
        assert!(micros_to_hlc(5).max(next(micros_to_hlc(5))) > micros_to_hlc(5));
    }
}

//! PostgreSQL logical decoding → CockroachDB-style webhook batches
//! (`meridian changefeed`).
//!
//! How it works: the built-in `pgoutput` plugin is read over SQL with
//! `pg_logical_slot_peek_binary_changes` every poll interval. Peeking does not
//! consume anything; the slot's confirmed position is moved with
//! `pg_replication_slot_advance` only after the sink answered 2xx for every row
//! of every transaction up to that point, so a crash or restart of either side
//! re-sends (at least once) and loses nothing. Batches go out one at a time,
//! in commit order, so delivery is per-key ordered.
//!
//! `updated` is the transaction's commit time as an HLC (`nanos.logical`),
//! forced strictly increasing: a commit time at or below the last value sent
//! (or the last resolved) becomes that value with the logical counter plus one.
//! `resolved` is either the newest fully acknowledged transaction's `updated`
//! or, when nothing is pending, a *probe*: meridian writes a non-transactional
//! `pg_logical_emit_message` after reading the server clock; once decoding
//! reaches it, every transaction that committed before it has been sent, and
//! every later one is stamped above the probe's time.

pub mod pgoutput;
pub mod sink;
pub mod values;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::changefeed::Hlc;
use crate::metrics::ChangefeedMetrics;
use pgoutput::{Column, Datum, Message, PG_EPOCH_MICROS};
use sink::{SendError, Sink, SinkConfig};

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

    /// Hold changes up to this long to fill a batch; 0 sends what each poll finds.
    #[arg(long = "flushFrequency", default_value = "0s", value_parser = crate::cli::parse_duration)]
    pub flush_frequency: Duration,

    /// How often to look for new changes.
    #[arg(long = "pollInterval", default_value = "25ms", value_parser = crate::cli::parse_duration)]
    pub poll_interval: Duration,

    /// Most decoded messages to read per poll (larger transactions are read whole).
    #[arg(long = "pollChanges", default_value_t = 50_000)]
    pub poll_changes: i32,

    /// Time allowed for the sink to answer one request.
    #[arg(long = "clientTimeout", default_value = "30s", value_parser = crate::cli::parse_duration)]
    pub client_timeout: Duration,

    /// Longest wait between retries of a failed request.
    #[arg(long = "retryMax", default_value = "10s", value_parser = crate::cli::parse_duration)]
    pub retry_max: Duration,

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
    pub poll_changes: i32,
    pub client_timeout: Duration,
    pub retry_initial: Duration,
    pub retry_max: Duration,
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
            poll_changes: 50_000,
            client_timeout: Duration::from_secs(30),
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
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
            poll_changes: a.poll_changes.max(1),
            client_timeout: a.client_timeout,
            retry_initial: Duration::from_millis(100),
            retry_max: a.retry_max,
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
                feed.stream(&db, &mut shutdown).await
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
#[derive(Debug, Clone)]
struct TableInfo {
    schema: Arc<str>,
    name: Arc<str>,
}

/// What pgoutput told us about a relation, plus where its key columns are.
struct Rel {
    table: Option<TableInfo>,
    columns: Vec<Column>,
    key_idx: Vec<usize>,
}

/// One changed row of a replicated table.
struct Change {
    table: TableInfo,
    after: Option<Map<String, Value>>,
    before: Option<Map<String, Value>>,
    key: Vec<Value>,
}

/// One committed source transaction (only its replicated rows).
struct Txn {
    commit_micros: i64,
    end_lsn: u64,
    changes: Vec<Change>,
}

enum Item {
    Txn(Txn),
    /// One of our resolved/advance probes (pg_logical_emit_message).
    Probe {
        lsn: u64,
        content: String,
    },
}

/// A transaction with its `updated` and serialized payload lines.
struct PlannedTxn {
    end_lsn: u64,
    hlc: Hlc,
    commit_micros: i64,
    lines: Vec<(String, TableInfo)>,
}

enum Planned {
    Txn(PlannedTxn),
    Probe { lsn: u64, content: String },
}

struct Probe {
    content: String,
    at: Hlc,
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
    /// Primary key column names by relation oid.
    pk_cache: HashMap<u32, Vec<String>>,
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
    /// Acknowledged through here; the slot is moved here when convenient.
    want_advance: u64,
    pending_since: Option<Instant>,
    last_slot_lag: Instant,
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
            pk_cache: HashMap::new(),
            rels: HashMap::new(),
            floor: Hlc::default(),
            last_resolved: Hlc::default(),
            last_resolved_at: Instant::now() - Duration::from_secs(3600),
            probe: None,
            probe_seq: 0,
            last_probe_at: Instant::now() - Duration::from_secs(3600),
            reached: None,
            advanced_to: 0,
            want_advance: 0,
            pending_since: None,
            last_slot_lag: Instant::now() - Duration::from_secs(3600),
        }
    }

    /// Connects, checks the source and creates the publication and slot.
    async fn connect_and_setup(&mut self) -> Result<tokio_postgres::Client> {
        let (db, conn) = tokio_postgres::connect(&self.opts.source_conn, tokio_postgres::NoTls)
            .await
            .context("connecting to the source (--sourceConn)")?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("source connection closed: {e}");
            }
        });
        // Deterministic text output of decoded values.
        db.batch_execute(
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, MDY'; SET IntervalStyle = 'postgres'; \
             SET extra_float_digits = 3; SET bytea_output = 'hex'; \
             SET application_name = 'meridian changefeed'",
        )
        .await?;

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
                    "SELECT c.oid, c.relreplident::text FROM pg_class c \
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
            let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&table));
            if ident != "f" {
                let what = match ident.as_str() {
                    "d" => "DEFAULT",
                    "n" => "NOTHING",
                    "i" => "USING INDEX",
                    _ => "not FULL",
                };
                problems.push(format!(
                    "table {spec} has REPLICA IDENTITY {what}, but the changefeed needs the whole old row \
                     for \"before\". Fix: run  ALTER TABLE {qualified} REPLICA IDENTITY FULL;  \
                     (or SELECT meridian_enable('{qualified}', '<region>'); from sql/postgres/setup.sql)"
                ));
            }
            self.wanted.insert((schema.clone(), table.clone()));
            self.pk_cache.remove(&oid);
            found.push((schema, table, qualified));
        }
        if !problems.is_empty() {
            bail!(
                "the source is not ready for a changefeed:\n  - {}",
                problems.join("\n  - ")
            );
        }

        // Publication: create it, or add the tables it lacks.
        let pub_row = db
            .query_opt(
                "SELECT puballtables FROM pg_publication WHERE pubname = $1",
                &[&self.publication],
            )
            .await?;
        let qpub = quote_ident(&self.publication);
        match pub_row {
            None => {
                let list: Vec<&str> = found.iter().map(|f| f.2.as_str()).collect();
                db.batch_execute(&format!(
                    "CREATE PUBLICATION {qpub} FOR TABLE {}",
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
                for (schema, table, qualified) in &found {
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
        let slot_row = db
            .query_opt(
                "SELECT plugin::text, database::text, confirmed_flush_lsn::text FROM pg_replication_slots \
                 WHERE slot_name = $1",
                &[&self.slot],
            )
            .await?;
        let confirmed = match slot_row {
            None => {
                let row = db
                    .query_one(
                        "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
                        &[&self.slot],
                    )
                    .await
                    .with_context(|| format!("creating replication slot {:?}", self.slot))?;
                tracing::info!(slot = %self.slot, "created replication slot: changes committed from here on are sent (existing rows are not scanned)");
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
        self.rels.clear();
        Ok(db)
    }

    /// Polls, sends and advances until shutdown (Ok) or a source error (Err).
    async fn stream(
        &mut self,
        db: &tokio_postgres::Client,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<()> {
        let peek = db
            .prepare(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1::text::name, NULL, $2::int4, \
                 'proto_version', '1', 'publication_names', $3::text, 'messages', 'true')",
            )
            .await?;
        let pubs = quote_ident(&self.publication);
        let mut limit: Option<i32> = Some(self.opts.poll_changes);
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            let t0 = Instant::now();
            let rows = db.query(&peek, &[&self.slot, &limit, &pubs]).await?;
            let t_peek = t0.elapsed();
            let nmsgs = rows.len();
            let truncated = limit.is_some_and(|l| nmsgs >= l as usize);
            let (items, incomplete) = self.decode(db, &rows).await?;
            drop(rows);
            let t_decode = t0.elapsed() - t_peek;
            if items.is_empty() && incomplete {
                // One transaction larger than the limit: read it whole.
                limit = None;
                continue;
            }
            limit = Some(self.opts.poll_changes);
            let plan = self.plan(items);
            let (nrows, nbytes, has_probe) = plan.iter().fold((0, 0, false), |acc, p| match p {
                Planned::Txn(t) => (
                    acc.0 + t.lines.len(),
                    acc.1 + t.lines.iter().map(|l| l.0.len() + 1).sum::<usize>(),
                    acc.2,
                ),
                Planned::Probe { .. } => (acc.0, acc.1, true),
            });
            let busy = nrows > 0;
            let due = !busy
                || self.opts.flush_frequency.is_zero()
                || truncated
                || has_probe
                || nrows >= self.opts.flush_rows
                || nbytes >= self.opts.flush_bytes
                || self
                    .pending_since
                    .is_some_and(|t| t.elapsed() >= self.opts.flush_frequency);
            if due {
                let t1 = Instant::now();
                if !self.deliver(db, plan, shutdown).await? {
                    return Ok(());
                }
                if busy {
                    tracing::debug!(
                        messages = nmsgs,
                        rows = nrows,
                        bytes = nbytes,
                        "peeked in {t_peek:?}, decoded in {t_decode:?}, delivered in {:?}",
                        t1.elapsed()
                    );
                }
                self.pending_since = None;
                if !busy {
                    self.metrics.lag_seconds.set(0.0);
                }
            } else {
                self.pending_since.get_or_insert_with(Instant::now);
            }
            if !self.maybe_resolved(db, !busy, shutdown).await? {
                return Ok(());
            }
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
            }
            if !(truncated || busy && due) {
                tokio::select! {
                    _ = tokio::time::sleep(self.opts.poll_interval) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
    }

    /// Decodes peeked rows into complete transactions and probes. The second
    /// value is true when the rows end inside a transaction (left for later).
    async fn decode(
        &mut self,
        db: &tokio_postgres::Client,
        rows: &[tokio_postgres::Row],
    ) -> Result<(Vec<Item>, bool)> {
        let mut items = Vec::new();
        let mut cur: Option<Txn> = None;
        for row in rows {
            let data: &[u8] = row.get(0);
            match pgoutput::decode(data)? {
                Message::Begin { commit_micros, .. } => {
                    cur = Some(Txn {
                        commit_micros,
                        end_lsn: 0,
                        changes: Vec::new(),
                    })
                }
                Message::Commit { end_lsn, .. } => {
                    if let Some(mut t) = cur.take() {
                        t.end_lsn = end_lsn;
                        items.push(Item::Txn(t));
                    }
                }
                Message::Relation {
                    relid,
                    namespace,
                    name,
                    columns,
                } => {
                    let table = self
                        .wanted
                        .contains(&(namespace.clone(), name.clone()))
                        .then(|| TableInfo {
                            schema: namespace.as_str().into(),
                            name: name.as_str().into(),
                        });
                    let mut key_idx = Vec::new();
                    if table.is_some() {
                        let pk = self.primary_key(db, relid).await?;
                        for k in &pk {
                            if let Some(i) = columns.iter().position(|c| &c.name == k) {
                                key_idx.push(i);
                            }
                        }
                        if key_idx.is_empty() {
                            key_idx = (0..columns.len()).collect();
                        }
                    }
                    self.rels.insert(
                        relid,
                        Rel {
                            table,
                            columns,
                            key_idx,
                        },
                    );
                }
                Message::Insert { relid, new } => {
                    if let (Some(t), Some(c)) = (cur.as_mut(), self.change(relid, None, Some(new)))
                    {
                        t.changes.push(c);
                    }
                }
                Message::Update { relid, old, new } => {
                    if let (Some(t), Some(c)) = (cur.as_mut(), self.change(relid, old, Some(new))) {
                        t.changes.push(c);
                    }
                }
                Message::Delete { relid, old } => {
                    if let (Some(t), Some(c)) = (cur.as_mut(), self.change(relid, Some(old), None))
                    {
                        t.changes.push(c);
                    }
                }
                Message::Truncate { relids }
                    if relids
                        .iter()
                        .any(|r| self.rels.get(r).is_some_and(|r| r.table.is_some())) =>
                {
                    tracing::warn!(
                        "TRUNCATE of a replicated table is not sent (changefeeds have no truncate)"
                    );
                }
                Message::LogicalMessage {
                    transactional: false,
                    lsn,
                    prefix,
                    content,
                } if prefix == self.probe_prefix => items.push(Item::Probe {
                    lsn,
                    content: String::from_utf8_lossy(&content).into_owned(),
                }),
                _ => {}
            }
        }
        Ok((items, cur.is_some()))
    }

    async fn primary_key(
        &mut self,
        db: &tokio_postgres::Client,
        relid: u32,
    ) -> Result<Vec<String>> {
        if let Some(pk) = self.pk_cache.get(&relid) {
            return Ok(pk.clone());
        }
        let rows = db
            .query(
                "SELECT a.attname::text FROM pg_index i \
                 JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                 WHERE i.indrelid = $1 AND i.indisprimary \
                 ORDER BY array_position(i.indkey::int2[], a.attnum)",
                &[&relid],
            )
            .await?;
        let pk: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        self.pk_cache.insert(relid, pk.clone());
        Ok(pk)
    }

    fn change(
        &self,
        relid: u32,
        old: Option<Vec<Datum>>,
        new: Option<Vec<Datum>>,
    ) -> Option<Change> {
        let rel = self.rels.get(&relid)?;
        let table = rel.table.clone()?;
        let to_map = |tuple: &[Datum], fallback: Option<&[Datum]>| -> Map<String, Value> {
            let mut m = Map::with_capacity(rel.columns.len());
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
                let v = match d {
                    Datum::Text(s) => values::text_to_json(col.type_oid, s),
                    _ => Value::Null,
                };
                m.insert(col.name.clone(), v);
            }
            m
        };
        let before = old.as_deref().map(|o| to_map(o, None));
        let after = new.as_deref().map(|n| to_map(n, old.as_deref()));
        let src = after.as_ref().or(before.as_ref())?;
        let key = rel
            .key_idx
            .iter()
            .map(|&i| {
                src.get(&rel.columns[i].name)
                    .cloned()
                    .unwrap_or(Value::Null)
            })
            .collect();
        Some(Change {
            table,
            after,
            before,
            key,
        })
    }

    /// Gives each transaction its `updated` (strictly above everything sent)
    /// and serializes its payload lines.
    fn plan(&self, items: Vec<Item>) -> Vec<Planned> {
        let mut hlc = self.floor;
        items
            .into_iter()
            .map(|item| match item {
                Item::Probe { lsn, content } => Planned::Probe { lsn, content },
                Item::Txn(t) => {
                    let mut lines = Vec::with_capacity(t.changes.len());
                    if !t.changes.is_empty() {
                        hlc = micros_to_hlc(t.commit_micros).max(next(hlc));
                        for c in t.changes {
                            lines.push((payload_line(&c, hlc), c.table));
                        }
                    }
                    Planned::Txn(PlannedTxn {
                        end_lsn: t.end_lsn,
                        hlc,
                        commit_micros: t.commit_micros,
                        lines,
                    })
                }
            })
            .collect()
    }

    /// Sends the planned transactions in batches and advances the slot past
    /// what was acknowledged. Stops at a probe of ours (the rest is read again
    /// with the probe's time as the floor). False on shutdown.
    async fn deliver(
        &mut self,
        db: &tokio_postgres::Client,
        plan: Vec<Planned>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let mut batch = Batch::default();
        // The newest transaction whose lines are all in `batch` or sent.
        let mut boundary: Option<(u64, Hlc)> = None;
        for p in plan {
            match p {
                Planned::Txn(t) => {
                    for (line, table) in t.lines {
                        if !batch.lines.is_empty()
                            && (batch.lines.len() >= self.opts.flush_rows
                                || batch.bytes + line.len() + 1 > self.opts.flush_bytes)
                        {
                            if !self.send_batch(&mut batch, shutdown).await? {
                                return Ok(false);
                            }
                            self.acknowledge(db, boundary.take(), false).await?;
                        }
                        batch.push(line, table, t.commit_micros);
                    }
                    boundary = Some((t.end_lsn, t.hlc));
                }
                Planned::Probe { lsn, content } => {
                    if !self.send_batch(&mut batch, shutdown).await? {
                        return Ok(false);
                    }
                    self.acknowledge(db, boundary.take(), false).await?;
                    self.acknowledge(db, Some((lsn, self.floor)), true).await?;
                    if self.probe.as_ref().is_some_and(|p| p.content == content) {
                        let p = self.probe.take().unwrap();
                        let at = p.at.max(self.floor);
                        self.floor = at;
                        self.reached = Some(at);
                        return Ok(true);
                    }
                }
            }
        }
        if !self.send_batch(&mut batch, shutdown).await? {
            return Ok(false);
        }
        self.acknowledge(db, boundary.take(), true).await?;
        Ok(true)
    }

    /// Records that everything through `boundary` was acknowledged; with
    /// `advance`, moves the slot there.
    async fn acknowledge(
        &mut self,
        db: &tokio_postgres::Client,
        boundary: Option<(u64, Hlc)>,
        advance: bool,
    ) -> Result<()> {
        if let Some((lsn, hlc)) = boundary {
            self.floor = self.floor.max(hlc);
            self.pending_advance(lsn);
        }
        if advance && self.want_advance > self.advanced_to {
            let to = pgoutput::lsn_to_string(self.want_advance);
            db.execute(
                "SELECT pg_replication_slot_advance($1::text::name, $2::text::pg_lsn)",
                &[&self.slot, &to],
            )
            .await
            .with_context(|| format!("advancing slot {} to {to}", self.slot))?;
            tracing::trace!(slot = %self.slot, "advanced to {to}");
            self.advanced_to = self.want_advance;
        }
        Ok(())
    }

    fn pending_advance(&mut self, lsn: u64) {
        self.want_advance = self.want_advance.max(lsn);
    }

    async fn send_batch(
        &mut self,
        batch: &mut Batch,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        if batch.lines.is_empty() {
            return Ok(true);
        }
        let b = std::mem::take(batch);
        let mut body = String::with_capacity(b.bytes + 32);
        body.push_str("{\"payload\":[");
        for (i, l) in b.lines.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(l);
        }
        body.push_str(&format!("],\"length\":{}}}", b.lines.len()));
        match self.sink.send(body, shutdown).await {
            Ok(()) => {}
            Err(SendError::Shutdown) => return Ok(false),
        }
        self.metrics.batches_sent.inc();
        for ((schema, table), n) in &b.counts {
            self.metrics
                .rows_sent
                .with_label_values(&[schema, table])
                .inc_by(*n);
        }
        let newest = micros_to_hlc(b.newest_commit_micros);
        self.metrics
            .lag_seconds
            .set(((now_nanos() - newest.nanos) as f64 / 1e9).max(0.0));
        Ok(true)
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
        let now: chrono::DateTime<chrono::Utc> =
            db.query_one("SELECT clock_timestamp()", &[]).await?.get(0);
        self.probe_seq += 1;
        let content = format!("{}:{}", std::process::id(), self.probe_seq);
        db.execute(
            "SELECT pg_logical_emit_message(false, $1::text, $2::text)",
            &[&self.probe_prefix, &content],
        )
        .await?;
        let nanos = now.timestamp_nanos_opt().unwrap_or(0);
        self.probe = Some(Probe {
            content,
            at: Hlc::new(nanos, 0),
            emitted: Instant::now(),
        });
        self.last_probe_at = Instant::now();
        Ok(())
    }
}

#[derive(Default)]
struct Batch {
    lines: Vec<String>,
    bytes: usize,
    counts: HashMap<(Arc<str>, Arc<str>), u64>,
    newest_commit_micros: i64,
}

impl Batch {
    fn push(&mut self, line: String, table: TableInfo, commit_micros: i64) {
        self.bytes += line.len() + 1;
        self.lines.push(line);
        *self.counts.entry((table.schema, table.name)).or_default() += 1;
        self.newest_commit_micros = self.newest_commit_micros.max(commit_micros);
    }
}

/// One payload entry: `{"after":…,"before":…,"key":[…],"topic":"t","updated":"…"}`.
fn payload_line(c: &Change, updated: Hlc) -> String {
    let mut s = String::with_capacity(256);
    s.push_str("{\"after\":");
    push_json(&mut s, c.after.as_ref());
    s.push_str(",\"before\":");
    push_json(&mut s, c.before.as_ref());
    s.push_str(",\"key\":");
    s.push_str(&serde_json::to_string(&c.key).expect("JSON values serialize"));
    s.push_str(",\"topic\":");
    s.push_str(&serde_json::to_string(&*c.table.name).expect("strings serialize"));
    s.push_str(&format!(",\"updated\":\"{updated}\"}}"));
    s
}

fn push_json(s: &mut String, m: Option<&Map<String, Value>>) {
    match m {
        Some(m) => s.push_str(&serde_json::to_string(m).expect("JSON values serialize")),
        None => s.push_str("null"),
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

//! The initial scan: when a changefeed creates its slot, every row the
//! tables already hold is sent first, as CockroachDB's changefeeds do
//! (`initial_scan`), so the other side starts from the same data.
//!
//! The slot is created over the replication protocol with `EXPORT_SNAPSHOT`,
//! and the scan reads that snapshot: it holds exactly the transactions that
//! committed before the slot's first decoded change, so nothing is missed
//! between the scan and the stream and nothing is sent by both. Scanned rows
//! carry `before: null` and one `updated`, the time the snapshot was taken;
//! the stream's first `updated` is above it.
//!
//! A crash during the scan must not leave a slot that streams as if the
//! scan had finished: a row in `public.meridian_initial_scans` marks a scan
//! under way (written before the slot is created, removed once every
//! scanned row was acknowledged), and a changefeed that finds its slot with
//! that mark drops the slot and scans again from a new snapshot.

use std::borrow::Cow;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use pgwire_replication::ReplicationClient;
use tokio::sync::watch;
use tokio_postgres::SimpleQueryMessage;

use super::pgoutput::PG_EPOCH_MICROS;
use super::pgoutput::{Column, Datum};
use super::{
    create_if_absent, flush_tail, push_txn, quote_ident, replication_error, server_nanos,
    source_session, table_exists, Feed, Pipeline, Rel, TableInfo, Txn, TxnBuffers,
};
use crate::changefeed::Hlc;

/// Where a scan under way is marked, in the source database.
const MARKS: &str = "public.meridian_initial_scans";

/// Rows read from the snapshot per round trip.
const FETCH_ROWS: usize = 2_000;

/// A snapshot to scan, held open by its own transaction.
pub(super) struct PendingScan {
    /// A connection inside `BEGIN ISOLATION LEVEL REPEATABLE READ` with the
    /// slot's snapshot imported.
    db: tokio_postgres::Client,
    /// `updated` of every scanned row.
    at: Hlc,
}

impl Feed {
    /// Whether this changefeed's slot was created for a scan that did not finish.
    pub(super) async fn scan_interrupted(&self, db: &tokio_postgres::Client) -> Result<bool> {
        if !table_exists(db, MARKS).await? {
            return Ok(false);
        }
        Ok(db
            .query_opt(
                &format!("SELECT 1 FROM {MARKS} WHERE slot_name = $1"),
                &[&self.slot],
            )
            .await?
            .is_some())
    }

    /// Marks a scan under way, creates the slot with an exported snapshot and
    /// opens a transaction on that snapshot. Returns the slot's consistent
    /// point (where streaming starts) and the scan.
    pub(super) async fn create_slot_for_scan(
        &self,
        db: &tokio_postgres::Client,
    ) -> Result<(String, PendingScan)> {
        create_if_absent(
            db,
            MARKS,
            "(slot_name TEXT PRIMARY KEY, started_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            "where the changefeed marks an initial scan under way",
        )
        .await?;
        db.execute(
            &format!("INSERT INTO {MARKS} (slot_name) VALUES ($1) ON CONFLICT DO NOTHING"),
            &[&self.slot],
        )
        .await?;

        // The exported snapshot lives while the replication session that
        // created the slot stays idle: import it before closing the session.
        let mut repl = ReplicationClient::connect_gated(self.replication_config()?)
            .await
            .map_err(|e| replication_error(e, &self.slot))?;
        let rows = repl
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(&self.slot)
            ))
            .await
            .map_err(|e| replication_error(e, &self.slot))
            .with_context(|| format!("creating replication slot {:?}", self.slot))?;
        let text = |i: usize| -> Result<String> {
            rows.first()
                .and_then(|r| r.get(i))
                .and_then(|v| v.as_ref())
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .with_context(|| format!("CREATE_REPLICATION_SLOT returned no column {i}"))
        };
        let (consistent_point, snapshot) = (text(1)?, text(2)?);
        let scan_db = source_session(&self.opts.source_conn).await?;
        scan_db
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
                snapshot.replace('\'', "''")
            ))
            .await
            .context("reading the slot's snapshot for the initial scan")?;
        drop(repl);
        // Every transaction in the snapshot committed before now; every one
        // the stream sends is stamped above it (the floor).
        let now = server_nanos(&scan_db).await?;
        tracing::info!(
            slot = %self.slot, snapshot = %snapshot, consistent_point = %consistent_point,
            "created replication slot; sending the rows the tables hold first (initial scan)"
        );
        let at = Hlc::new(now, 0);
        Ok((consistent_point, PendingScan { db: scan_db, at }))
    }

    /// Sends the pending initial scan, if any, and waits until every row was
    /// acknowledged. False on shutdown (the scan is then redone next time).
    pub(super) async fn initial_scan(
        &mut self,
        db: &tokio_postgres::Client,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let Some(scan) = self.pending_scan.take() else {
            return Ok(true);
        };
        self.metrics.scan_running.set(1);
        self.scanning = true;
        let result = self.send_scan(db, &scan, shutdown).await;
        self.scanning = false;
        self.metrics.scan_running.set(0);
        self.rels.clear();
        if !result? {
            return Ok(false);
        }
        scan.db.batch_execute("COMMIT").await?;
        db.execute(
            &format!("DELETE FROM {MARKS} WHERE slot_name = $1"),
            &[&self.slot],
        )
        .await?;
        self.floor = self.floor.max(scan.at);
        self.record_floor(db).await?;
        Ok(true)
    }

    async fn send_scan(
        &mut self,
        db: &tokio_postgres::Client,
        scan: &PendingScan,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<bool> {
        let started = Instant::now();
        let mut last_report = Instant::now();
        let updated = scan.at.to_string();
        let commit_micros = scan.at.nanos / 1000 - PG_EPOCH_MICROS;
        // Scanned rows go through the stream's own batching and window, as
        // transactions of one fetch each: one version per key, so full
        // batches travel side by side.
        let mut p = Pipeline::new();
        let queue_max = 2 * self.opts.max_in_flight.max(1);
        // A fetch never outgrows a batch, so none is split (split batches go alone).
        let fetch_rows = FETCH_ROWS.min(self.opts.flush_rows.max(1));
        let mut total = 0u64;
        let mut tables: Vec<(String, String)> = self.wanted.iter().cloned().collect();
        tables.sort();
        for (schema, name) in tables {
            let qualified = format!("{}.{}", quote_ident(&schema), quote_ident(&name));
            let (relid, columns) = table_columns(&scan.db, &qualified).await?;
            let pk = self.primary_key(db, relid).await?;
            let table = TableInfo::new(&schema, &name);
            // The series exists from the start: an empty table scanned is news too.
            self.metrics.scan_rows.with_label_values(&[&schema, &name]);
            let select: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
            self.rels.insert(relid, Rel::new(Some(table), columns, &pk));
            scan.db
                .batch_execute(&format!(
                    "DECLARE meridian_scan NO SCROLL CURSOR FOR SELECT {} FROM {qualified}",
                    select.join(", ")
                ))
                .await
                .with_context(|| format!("scanning {qualified}"))?;
            let mut rows_of_table = 0u64;
            let mut frags = Vec::new();
            let mut spare = TxnBuffers::default();
            loop {
                let fetched = scan
                    .db
                    .simple_query(&format!("FETCH {fetch_rows} FROM meridian_scan"))
                    .await
                    .with_context(|| format!("scanning {qualified}"))?;
                let mut txn = Txn::new(scan.at, commit_micros, std::mem::take(&mut spare));
                let mut datums: Vec<Datum> = Vec::new();
                for m in &fetched {
                    let SimpleQueryMessage::Row(row) = m else {
                        continue;
                    };
                    datums.clear();
                    for i in 0..row.len() {
                        datums.push(match row.get(i) {
                            Some(s) => Datum::Text(Cow::Borrowed(s)),
                            None => Datum::Null,
                        });
                    }
                    self.write_row(
                        &mut txn,
                        relid,
                        None,
                        Some((&datums, None)),
                        &updated,
                        &mut frags,
                    );
                }
                let n = txn.lines.len() as u64;
                push_txn(&mut p, &txn, self.opts.flush_rows, self.opts.flush_bytes);
                spare = txn.into_buffers();
                if !self.pump(&mut p, shutdown, queue_max).await? {
                    return Ok(false);
                }
                rows_of_table += n;
                total += n;
                if last_report.elapsed() >= Duration::from_secs(5) {
                    last_report = Instant::now();
                    tracing::info!(
                        table = %qualified, rows = rows_of_table, total,
                        "initial scan: rows read so far"
                    );
                }
                if n < fetch_rows as u64 {
                    break;
                }
            }
            scan.db.batch_execute("CLOSE meridian_scan").await?;
            tracing::info!(table = %qualified, rows = rows_of_table, "initial scan: table read");
        }
        flush_tail(&mut p, true);
        if !self.pump(&mut p, shutdown, 0).await? {
            return Ok(false);
        }
        tracing::info!(
            rows = total,
            "initial scan sent and acknowledged in {:.1?}; streaming changes from here",
            started.elapsed()
        );
        Ok(true)
    }

    /// Sends what may go of `p`'s queue, then waits for acknowledgements
    /// until at most `queued` batches wait (0: until everything was
    /// acknowledged). False on shutdown.
    async fn pump(
        &mut self,
        p: &mut Pipeline,
        shutdown: &watch::Receiver<bool>,
        queued: usize,
    ) -> Result<bool> {
        loop {
            self.dispatch_ready(p, shutdown);
            self.take_acknowledged(p);
            let enough = match queued {
                0 => p.idle(),
                n => p.queue.len() <= n,
            };
            if enough {
                return Ok(true);
            }
            let done = p
                .tasks
                .join_next()
                .await
                .context("batches wait, but none is in flight")?;
            if !self.sent(p, done)? {
                return Ok(false);
            }
        }
    }
}

/// A table's oid and the columns pgoutput would send (generated columns
/// are not replicated), in order.
async fn table_columns(db: &tokio_postgres::Client, qualified: &str) -> Result<(u32, Vec<Column>)> {
    let rows = db
        .query(
            "SELECT a.attrelid::oid, a.attname::text, a.atttypid::oid FROM pg_attribute a \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
             AND a.attgenerated = '' ORDER BY a.attnum",
            &[&qualified],
        )
        .await
        .with_context(|| format!("reading the columns of {qualified}"))?;
    let relid = rows
        .first()
        .map(|r| r.get::<_, u32>(0))
        .with_context(|| format!("{qualified} has no columns"))?;
    let columns = rows
        .iter()
        .map(|r| Column {
            name: r.get(1),
            type_oid: r.get(2),
        })
        .collect();
    Ok((relid, columns))
}

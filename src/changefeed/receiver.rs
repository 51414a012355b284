//! The receive pipeline: one request's batch through the userscript into the
//! target, all or nothing.
//!
//! parse → dispatch (userscript) → per table: map, fold duplicate keys,
//! deadlines → one database transaction: compare-and-set upserts and deletes,
//! losers through the table's merge → DLQ | apply | drop → commit.

use std::borrow::Cow;
use std::collections::hash_map::Entry;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use deadpool_postgres::Transaction;
use foldhash::HashMapExt;
use serde_json::Value;
use smallvec::SmallVec;

use super::{parse_body, Before, Document, Envelope, Hlc, Mutation, ParseError};
use crate::metrics::ReceiverMetrics;
use crate::script::{
    ApplyOp, ColumnInfo, Conflict, MergeKind, MergeOutcome, Routed, ScriptError, ScriptTx,
    TableConfig, TableName, Userscript,
};
use crate::target::apply::{self, DlqEntry, KeyValues, TableBatch, WriteRules};
use crate::target::convert::key_text;
use crate::target::merge::{three_way, ThreeWay};
use crate::target::schema::Kind;
use crate::target::{TableSchema, Target, TargetError};

/// Why a request was not applied. Mapped to an HTTP status in `server::error`.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Parse(#[from] ParseError),
    #[error(transparent)]
    Script(#[from] ScriptError),
    #[error(transparent)]
    Target(#[from] TargetError),
    /// The request asks for something meridian cannot route.
    #[error("{0}")]
    Route(String),
}

/// What a request did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Outcome {
    pub upserts: u64,
    pub deletes: u64,
    pub conflicts: u64,
    pub dlq: u64,
    pub dropped: u64,
    pub deadlined: u64,
    pub resolved: Option<Hlc>,
}

/// Per-table counts, reported to metrics after commit.
#[derive(Debug, Default, Clone)]
struct TableStats {
    upserts: u64,
    deletes: u64,
    conflicts: u64,
    dlq: u64,
    dropped: u64,
    deadlined: u64,
    ages: Vec<f64>,
}

/// Receives changefeed requests for one target.
pub struct Receiver {
    pub target: Arc<Target>,
    pub script: Userscript,
    pub metrics: ReceiverMetrics,
}

fn now_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

impl Receiver {
    pub fn new(target: Arc<Target>, script: Userscript, metrics: ReceiverMetrics) -> Self {
        Receiver {
            target,
            script,
            metrics,
        }
    }

    /// Handles one request body for `/{database}/{schema}[/{table}]`.
    pub async fn receive(
        &self,
        database: &str,
        schema: &str,
        table: Option<&str>,
        body: &[u8],
    ) -> Result<Outcome, ReceiveError> {
        let envelope = parse_body(body)?;
        // The URL's schema becomes a metric label: it must name a real schema,
        // or any client could mint new series.
        if !self.target.schema_exists(database, schema).await? {
            return Err(ReceiveError::Route(format!(
                "schema {schema:?} does not exist in database {database:?}"
            )));
        }
        match envelope {
            Envelope::Resolved(hlc) => {
                self.metrics
                    .resolved_timestamp
                    .with_label_values(&[schema])
                    .set(hlc.seconds());
                Ok(Outcome {
                    resolved: Some(hlc),
                    ..Outcome::default()
                })
            }
            Envelope::Batch(rows) => self.apply_batch(database, schema, table, rows).await,
        }
    }

    /// Routes and applies a batch in one transaction.
    pub async fn apply_batch(
        &self,
        database: &str,
        schema: &str,
        table: Option<&str>,
        rows: Vec<Mutation>,
    ) -> Result<Outcome, ReceiveError> {
        let incoming = rows.len() as u64;
        let started = Instant::now();
        let routed = self.script.dispatch(database, schema, table, rows).await?;
        self.metrics
            .script_duration
            .with_label_values(&["dispatch"])
            .observe(started.elapsed().as_secs_f64());
        let dispatched_away = incoming.saturating_sub(routed.len() as u64);
        if dispatched_away > 0 && self.script.is_loaded() {
            self.metrics
                .apply_dropped
                .with_label_values(&[schema, "(dispatch)"])
                .inc_by(dispatched_away);
        }
        // Rows of one table arrive together and share one name: the newest
        // group is searched first, and `Arc`'s `==` compares pointers before
        // values (TableName is Eq).
        let mut groups: Vec<(Arc<TableName>, Vec<Mutation>)> = Vec::new();
        for Routed { table, mutation } in routed {
            match groups.iter_mut().rev().find(|(t, _)| *t == table) {
                Some((_, muts)) => muts.push(mutation),
                None => groups.push((table, vec![mutation])),
            }
        }
        let mut by_table: BTreeMap<TableName, Vec<Mutation>> = groups
            .into_iter()
            .map(|(t, muts)| (Arc::unwrap_or_clone(t), muts))
            .collect();
        for (t, muts) in by_table.iter_mut() {
            if t.database != database {
                return Err(ReceiveError::Route(format!(
                    "rows for {t} are in another database than the request's ({database}); \
                     one request applies to one database"
                )));
            }
            let started = Instant::now();
            *muts = self.script.map(t, std::mem::take(muts)).await?;
            if self.script.config().table(t).is_some_and(|c| c.has_map) {
                self.metrics
                    .script_duration
                    .with_label_values(&["map"])
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        if by_table.is_empty() {
            return Ok(Outcome {
                dropped: dispatched_away,
                ..Outcome::default()
            });
        }
        // A schema change shows up as an unknown column or table: read the
        // schema again and run the whole transaction once more.
        let mut attempt = 0;
        let stats = loop {
            let timeout = self.target.options.apply_timeout;
            let run = tokio::time::timeout(timeout, self.apply_tables(database, &by_table)).await;
            match run {
                Err(_) => {
                    self.count_error(schema, &by_table);
                    return Err(TargetError::Timeout(timeout).into());
                }
                Ok(Ok(stats)) => break stats,
                Ok(Err(e)) if attempt == 0 && schema_may_be_stale(&e) => {
                    for t in by_table.keys() {
                        self.target.schemas.invalidate(t);
                    }
                    attempt += 1;
                }
                Ok(Err(e)) => {
                    self.count_error(schema, &by_table);
                    return Err(e);
                }
            }
        };
        let mut outcome = Outcome {
            dropped: dispatched_away,
            ..Outcome::default()
        };
        for (t, s) in &stats {
            let l = [t.schema.as_str(), t.table.as_str()];
            let m = &self.metrics;
            // Present from the first request, so increase() sees the first error.
            m.apply_errors.with_label_values(&l);
            m.apply_upserts.with_label_values(&l).inc_by(s.upserts);
            m.apply_deletes.with_label_values(&l).inc_by(s.deletes);
            m.apply_conflicts.with_label_values(&l).inc_by(s.conflicts);
            m.dlq_enqueued.with_label_values(&l).inc_by(s.dlq);
            m.apply_dropped.with_label_values(&l).inc_by(s.dropped);
            m.apply_deadlined.with_label_values(&l).inc_by(s.deadlined);
            let age = m.apply_mutation_age.with_label_values(&l);
            for a in &s.ages {
                age.observe(*a);
            }
            m.apply_duration
                .with_label_values(&l)
                .observe(started.elapsed().as_secs_f64());
            outcome.upserts += s.upserts;
            outcome.deletes += s.deletes;
            outcome.conflicts += s.conflicts;
            outcome.dlq += s.dlq;
            outcome.dropped += s.dropped;
            outcome.deadlined += s.deadlined;
        }
        Ok(outcome)
    }

    fn count_error(&self, schema: &str, tables: &BTreeMap<TableName, Vec<Mutation>>) {
        for t in tables.keys() {
            // Only tables that exist get their own series (bounded labels).
            let table = if self.target.schemas.contains(t) {
                t.table.as_str()
            } else {
                "(unknown)"
            };
            self.metrics
                .apply_errors
                .with_label_values(&[schema, table])
                .inc();
        }
    }

    async fn apply_tables(
        &self,
        database: &str,
        tables: &BTreeMap<TableName, Vec<Mutation>>,
    ) -> Result<Vec<(TableName, TableStats)>, ReceiveError> {
        let mut conn = self.target.connect(database).await?;
        let tx = conn
            .build_transaction()
            .start()
            .await
            .map_err(TargetError::db)?;
        let mut all = Vec::with_capacity(tables.len());
        for (name, muts) in tables {
            let schema = self.target.schemas.get(&*tx, name).await?;
            let cfg = self
                .script
                .config()
                .table(name)
                .cloned()
                .unwrap_or_default();
            let mut stats = TableStats::default();
            let muts = fold_duplicates(&schema, &cfg, muts.iter().collect())?;
            let muts = apply_deadlines(&schema, &cfg, muts, &mut stats)?;
            if cfg.has_apply {
                let ops = muts
                    .iter()
                    .map(|m| to_op(m))
                    .collect::<Result<Vec<_>, _>>()?;
                let updated = muts.iter().map(|m| m.updated).max().unwrap_or_default();
                let started = Instant::now();
                let mut bridge = TxBridge {
                    receiver: self,
                    tx: &tx,
                    schema: schema.clone(),
                    cfg: &cfg,
                    updated,
                    stats: &mut stats,
                    aborted: None,
                };
                let run = self.script.apply(name, ops, &mut bridge).await;
                // A failed statement aborted the transaction, whether or not
                // the script caught it: COMMIT would roll back and answer as
                // if it had worked. The database's error decides the status.
                if let Some(e) = bridge.aborted {
                    return Err(e);
                }
                run?;
                self.metrics
                    .script_duration
                    .with_label_values(&["apply"])
                    .observe(started.elapsed().as_secs_f64());
            } else {
                self.apply_standard(&tx, &schema, &cfg, muts, &mut stats)
                    .await?;
            }
            all.push((name.clone(), stats));
        }
        tx.commit().await.map_err(TargetError::db)?;
        Ok(all)
    }

    /// Applies one table's mutations the standard way: compare-and-set on the
    /// table's CAS columns, losers through its merge.
    async fn apply_standard(
        &self,
        tx: &Transaction<'_>,
        schema: &TableSchema,
        cfg: &TableConfig,
        muts: Vec<&Mutation>,
        stats: &mut TableStats,
    ) -> Result<(), ReceiveError> {
        let rules = write_rules(cfg);
        let cas = column_indexes(schema, &cfg.cas)?;
        let now = now_nanos();
        let (upserts, deletes): (Vec<&Mutation>, Vec<&Mutation>) =
            muts.into_iter().partition(|m| !m.is_delete());

        // Upserts.
        let docs: Vec<(usize, &Document)> = upserts
            .iter()
            .enumerate()
            .map(|(i, m)| (i, m.after.as_ref().expect("upserts have after")))
            .collect();
        // Rows that lost, with the columns their batch wrote: rows that carry
        // different columns merge on their own columns.
        let mut losers: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
        for batch in apply::prepare(schema, &docs, &rules)? {
            for &c in &cas {
                if !batch.columns.contains(&c) {
                    return Err(ReceiveError::Route(format!(
                        "table {}: compare-and-set column {:?} is missing from the row",
                        schema.name, schema.columns[c].name
                    )));
                }
            }
            let done = apply::upsert(tx, schema, &batch, &cas, &rules).await?;
            stats.upserts += done.written;
            if !done.losers.is_empty() {
                losers.push((batch.columns.clone(), done.losers));
            }
        }
        for m in &upserts {
            stats.ages.push((now - m.updated.nanos).max(0) as f64 / 1e9);
        }

        // Deletes: a delete whose row never existed at the source is dropped.
        // Rows are found by primary key, or by the columns of `deleteKey`.
        let delete_key = column_indexes(schema, &cfg.delete_key)?;
        let key_columns: &[usize] = if delete_key.is_empty() {
            &schema.pk
        } else {
            &delete_key
        };
        let mut del: Vec<(usize, KeyValues)> = Vec::new();
        let mut del_muts: Vec<&Mutation> = Vec::new();
        for &m in &deletes {
            if m.before == Before::Null {
                stats.dropped += 1;
                continue;
            }
            // A delete's `key` holds the values of whichever key finds it.
            let key = key_values(schema, key_columns, true, m)
                .map_err(|c| TargetError::missing_key(schema, c))?;
            del.push((del_muts.len(), key));
            del_muts.push(m);
        }
        let mut delete_conflicts: Vec<usize> = Vec::new();
        if !del.is_empty() {
            let keys = apply::prepare_keys(schema, &del, key_columns)?;
            if cas.is_empty() {
                apply::delete(tx, schema, &keys, &[], &keys).await?;
                stats.deletes += del.len() as u64;
            } else {
                // Without a `before` there is nothing to compare: a conflict.
                let (known, unknown): (Vec<usize>, Vec<usize>) =
                    (0..del_muts.len()).partition(|&i| del_muts[i].before.row().is_some());
                delete_conflicts.extend(unknown);
                if !known.is_empty() {
                    let keys = select_rows(&keys, &known);
                    let befores: Vec<(usize, Option<&Document>)> = known
                        .iter()
                        .map(|&i| (i, del_muts[i].before.row()))
                        .collect();
                    let (cas_values, _) =
                        apply::batch_for_columns(schema, &befores, &cas, &rules, false)?;
                    let lost = apply::delete(tx, schema, &keys, &cas, &cas_values).await?;
                    stats.deletes += (known.len() - lost.len()) as u64;
                    delete_conflicts.extend(lost);
                }
            }
            for m in &del_muts {
                stats.ages.push((now - m.updated.nanos).max(0) as f64 / 1e9);
            }
        }

        for (columns, lost) in losers {
            let lost = Lost {
                columns,
                muts: lost.iter().map(|&i| upserts[i]).collect(),
                key_columns: &schema.pk,
            };
            self.resolve_conflicts(tx, schema, cfg, &rules, lost, stats)
                .await?;
        }
        if !delete_conflicts.is_empty() {
            delete_conflicts.sort_unstable();
            let lost = Lost {
                columns: writable_columns(schema),
                muts: delete_conflicts.iter().map(|&i| del_muts[i]).collect(),
                key_columns,
            };
            self.resolve_conflicts(tx, schema, cfg, &rules, lost, stats)
                .await?;
        }
        Ok(())
    }

    /// Takes rows that lost compare-and-set through the table's merge,
    /// comparing them on the columns they were written with.
    async fn resolve_conflicts(
        &self,
        tx: &Transaction<'_>,
        schema: &TableSchema,
        cfg: &TableConfig,
        rules: &WriteRules,
        lost: Lost<'_>,
        stats: &mut TableStats,
    ) -> Result<(), ReceiveError> {
        let Lost {
            columns,
            muts,
            key_columns,
        } = lost;
        let columns = &columns[..];
        // Every upsert has its key in `after`, every delete got here with
        // its key (see apply_standard).
        let keys: Vec<(usize, KeyValues)> = muts
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let key = key_values(schema, key_columns, true, m);
                key.map(|k| (i, k))
                    .map_err(|c| TargetError::missing_key(schema, c))
            })
            .collect::<Result<_, _>>()?;
        let key_batch = apply::prepare_keys(schema, &keys, key_columns)?;
        let proposed_docs: Vec<(usize, Option<&Document>)> = muts
            .iter()
            .enumerate()
            .map(|(i, m)| (i, m.after.as_ref()))
            .collect();
        let is_delete = muts.iter().all(|m| m.is_delete());
        let (proposed, _) =
            apply::batch_for_columns(schema, &proposed_docs, columns, rules, false)?;
        let before_docs: Vec<(usize, Option<&Document>)> = muts
            .iter()
            .enumerate()
            .map(|(i, m)| (i, m.before.row()))
            .collect();
        let (before, has_before) =
            apply::batch_for_columns(schema, &before_docs, columns, rules, true)?;
        let losers = apply::fetch_losers(
            tx,
            schema,
            &key_batch,
            (!is_delete).then_some(&proposed),
            Some((&before, &has_before)),
            rules,
        )
        .await?;

        // Documents as they arrive (written through the table's `exprs`),
        // and merged rows, already in stored form (written as they are).
        let mut to_write: Vec<Document> = Vec::new();
        let mut merged_rows: Vec<Document> = Vec::new();
        let mut for_script: Vec<(usize, Conflict)> = Vec::new();
        let mut dlq: Vec<DlqEntry> = Vec::new();
        for loser in losers {
            let m = muts[loser.ord];
            let Some(stored) = loser.stored else {
                // No stored row (it went away after the check, or a delete
                // without `before` found none): nothing to lose to.
                if let Some(after) = &m.after {
                    to_write.push(after.clone());
                }
                continue;
            };
            let merged = match &loser.proposed {
                Some(p) => three_way(loser.before.as_ref(), p, &stored, &cfg.cas),
                None => ThreeWay::Unmerged(
                    cfg.cas.clone(), // a delete of a newer row cannot merge
                ),
            };
            if merged == ThreeWay::Unchanged {
                // Already applied (a replayed request): not a conflict.
                continue;
            }
            stats.conflicts += 1;
            let conflict = |unmerged: Vec<String>| Conflict {
                before: loser.before.clone(),
                proposed: m.after.clone(),
                target: stored.clone(),
                unmerged,
                nanos: m.updated.nanos,
                logical: m.updated.logical,
            };
            match (&cfg.merge, merged) {
                (None, _) => stats.dropped += 1,
                (Some(MergeKind::Standard { .. }), ThreeWay::Merged(doc)) => merged_rows.push(doc),
                (Some(MergeKind::Standard { has_fallback: true }), ThreeWay::Unmerged(cols)) => {
                    for_script.push((loser.ord, conflict(cols)))
                }
                (
                    Some(MergeKind::Standard {
                        has_fallback: false,
                    }),
                    ThreeWay::Unmerged(cols),
                ) => {
                    let key = schema
                        .pk_columns()
                        .map(|c| {
                            stored
                                .get(&c.name)
                                .cloned()
                                .unwrap_or(Value::Null)
                                .to_string()
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(TargetError::Unmerged {
                        table: schema.name.to_string(),
                        key: format!("[{key}]"),
                        columns: cols.join(", "),
                    }
                    .into());
                }
                (Some(MergeKind::Custom), _) => for_script.push((loser.ord, conflict(Vec::new()))),
                (Some(_), ThreeWay::Unchanged) => unreachable!("handled above"),
            }
        }
        if !for_script.is_empty() {
            let started = Instant::now();
            let (ords, conflicts): (Vec<usize>, Vec<Conflict>) = for_script.into_iter().unzip();
            let outcomes = self.script.merge(&schema.name, conflicts).await?;
            self.metrics
                .script_duration
                .with_label_values(&["merge"])
                .observe(started.elapsed().as_secs_f64());
            if outcomes.len() != ords.len() {
                return Err(ScriptError::Invalid(format!(
                    "merge for {} returned {} results for {} conflicts",
                    schema.name,
                    outcomes.len(),
                    ords.len()
                ))
                .into());
            }
            for (ord, outcome) in ords.into_iter().zip(outcomes) {
                let m = muts[ord];
                match outcome {
                    MergeOutcome::Apply(doc) => to_write.push(doc),
                    MergeOutcome::Drop => stats.dropped += 1,
                    MergeOutcome::Dlq(name) => dlq.push(DlqEntry {
                        dlq_name: name,
                        source_nanos: m.updated.nanos,
                        source_logical: m.updated.logical as i64,
                        data_after: m.after.as_ref().map_or(Value::Null, Document::to_value),
                        data_before: match m.before.row() {
                            Some(_) => m.before.to_json(),
                            // A delete sent without `before`: its key is all
                            // that tells it apart from another such delete.
                            None if m.is_delete() => {
                                key_document(schema, key_columns, &keys[ord].1)
                            }
                            None => Value::Null,
                        },
                    }),
                }
            }
        }
        write_rows(tx, schema, &to_write, rules, stats).await?;
        if !merged_rows.is_empty() {
            // Merged rows are already in stored form: no `exprs` again.
            let stored_form = WriteRules {
                exprs: Default::default(),
                ..rules.clone()
            };
            write_rows(tx, schema, &merged_rows, &stored_form, stats).await?;
        }
        stats.dlq += apply::write_dlq(
            tx,
            &schema.name.schema,
            &self.target.options.dlq_table,
            &dlq,
        )
        .await?;
        Ok(())
    }
}

/// Writes `rows` as they are (no compare-and-set): the results of merges.
async fn write_rows(
    tx: &Transaction<'_>,
    schema: &TableSchema,
    rows: &[Document],
    rules: &WriteRules,
    stats: &mut TableStats,
) -> Result<(), ReceiveError> {
    if rows.is_empty() {
        return Ok(());
    }
    let docs: Vec<(usize, &Document)> = rows.iter().enumerate().collect();
    for batch in apply::prepare(schema, &docs, rules)? {
        stats.upserts += apply::upsert(tx, schema, &batch, &[], rules).await?.written;
    }
    Ok(())
}

/// Rows that lost compare-and-set (or deletes that found a newer row, or
/// sent no `before` to compare), with the columns they were written with:
/// rows of one request may carry different columns, and each merges on its
/// own.
struct Lost<'m> {
    columns: Vec<usize>,
    muts: Vec<&'m Mutation>,
    /// The columns that find the stored rows: the primary key, or for
    /// deletes the table's `deleteKey`, which need not be unique.
    key_columns: &'m [usize],
}

fn schema_may_be_stale(e: &ReceiveError) -> bool {
    match e {
        // A value that does not convert may be for a column whose type
        // changed; a key column may have changed (42P10).
        ReceiveError::Target(TargetError::UnknownColumn { .. })
        | ReceiveError::Target(TargetError::UnknownTable(_))
        | ReceiveError::Target(TargetError::Convert { .. }) => true,
        ReceiveError::Target(t) => matches!(
            t.code(),
            Some("42703") | Some("42P01") | Some("0A000") | Some("42804") | Some("42P10")
        ),
        _ => false,
    }
}

fn write_rules(cfg: &TableConfig) -> WriteRules {
    WriteRules {
        ignore: cfg.ignore.clone(),
        extras: cfg.extras.clone(),
        exprs: cfg.exprs.clone(),
    }
}

/// The indexes of the columns `names` names; an unknown name is an error.
fn column_indexes(schema: &TableSchema, names: &[String]) -> Result<Vec<usize>, ReceiveError> {
    names
        .iter()
        .map(|name| {
            schema.column(name).map(|(i, _)| i).ok_or_else(|| {
                TargetError::UnknownColumn {
                    table: schema.name.to_string(),
                    column: name.clone(),
                }
                .into()
            })
        })
        .collect()
}

fn writable_columns(schema: &TableSchema) -> Vec<usize> {
    (0..schema.columns.len())
        .filter(|&i| !schema.columns[i].generated)
        .collect()
}

/// `key` (values of `columns`) as a JSON object by column name.
fn key_document(schema: &TableSchema, columns: &[usize], key: &KeyValues) -> Value {
    let doc = columns
        .iter()
        .zip(key)
        .map(|(&c, &v)| (schema.columns[c].name.clone(), v.clone()))
        .collect();
    Value::Object(doc)
}

/// Several versions of one key in a request fold to the one with the highest
/// `updated` (then the last), so each key is written once.
fn fold_duplicates<'m>(
    schema: &TableSchema,
    cfg: &TableConfig,
    muts: Vec<&'m Mutation>,
) -> Result<Vec<&'m Mutation>, ReceiveError> {
    if muts.len() < 2 {
        return Ok(muts);
    }
    // foldhash: randomly seeded like std's SipHash, several times cheaper
    // per key, and this runs for every row of every request.
    let mut index: foldhash::HashMap<SmallVec<[Cow<'m, str>; 2]>, usize> =
        HashMapExt::with_capacity(muts.len());
    let mut out: Vec<&Mutation> = Vec::with_capacity(muts.len());
    for m in muts {
        // A delete of a row that never existed at the source changes nothing
        // (apply drops it); it must not fold away an older version of its key.
        if m.is_delete() && m.before == Before::Null {
            out.push(m);
            continue;
        }
        let key_is_pk = key_is_pk(cfg, m);
        let key = match key_values(schema, &schema.pk, key_is_pk, m) {
            Ok(key) => key,
            // A delete found by its `deleteKey` alone (no `before`) names
            // no primary key to fold on; it applies as sent.
            Err(_) if !key_is_pk => {
                out.push(m);
                continue;
            }
            Err(c) => return Err(TargetError::missing_key(schema, c).into()),
        };
        let key = key
            .into_iter()
            .zip(schema.pk_columns())
            .map(|(v, c)| key_text(v, matches!(c.kind, Kind::Integer | Kind::Number)))
            .collect();
        match index.entry(key) {
            Entry::Occupied(e) => {
                let i = *e.get();
                if out[i].updated <= m.updated {
                    out[i] = m;
                }
            }
            Entry::Vacant(e) => {
                e.insert(out.len());
                out.push(m);
            }
        }
    }
    Ok(out)
}

/// Whether a mutation's `key` holds its primary key: a delete's does not
/// when the table has a `deleteKey`.
fn key_is_pk(cfg: &TableConfig, m: &Mutation) -> bool {
    m.after.is_some() || cfg.delete_key.is_empty()
}

/// The values of `columns` that name a mutation's row: its `after`'s, else
/// its `key` (with `use_key`, when it has one value per column), else its
/// `before`'s. `Err` holds the first column none of them gives.
fn key_values<'a>(
    schema: &TableSchema,
    columns: &[usize],
    use_key: bool,
    m: &'a Mutation,
) -> Result<KeyValues<'a>, usize> {
    let from_doc = |d: &'a Document| -> Result<KeyValues<'a>, usize> {
        columns
            .iter()
            .map(|&c| {
                d.get(&schema.columns[c].name)
                    .filter(|v| !v.is_null())
                    .ok_or(c)
            })
            .collect()
    };
    let after = m.after.as_ref().map(from_doc);
    if let Some(Ok(k)) = after {
        return Ok(k);
    }
    if let Some(k) = m
        .key
        .as_ref()
        .filter(|k| use_key && k.len() == columns.len())
    {
        return Ok(k.iter().collect());
    }
    match m.before.row().map(from_doc) {
        Some(Ok(k)) => Ok(k),
        // Name a column the row's own documents lack: `after`'s first, as
        // that is the document being written.
        before => Err(after.or(before).and_then(Result::err).unwrap_or(columns[0])),
    }
}

/// Drops upserts whose deadline column is older than now minus its duration.
fn apply_deadlines<'m>(
    schema: &TableSchema,
    cfg: &TableConfig,
    muts: Vec<&'m Mutation>,
    stats: &mut TableStats,
) -> Result<Vec<&'m Mutation>, ReceiveError> {
    if cfg.deadlines.is_empty() {
        return Ok(muts);
    }
    let now = chrono::Utc::now();
    // The oldest time each column may hold. A deadline reaching before the
    // calendar's start (`1000000y`) has no limit: no row is that old.
    let limits: Vec<(&String, Option<chrono::DateTime<chrono::Utc>>)> = cfg
        .deadlines
        .iter()
        .map(|(col, within)| {
            let limit = chrono::Duration::from_std(*within)
                .ok()
                .and_then(|d| now.checked_sub_signed(d));
            (col, limit)
        })
        .collect();
    let mut kept = Vec::with_capacity(muts.len());
    'rows: for m in muts {
        if let Some(after) = &m.after {
            for &(col, limit) in &limits {
                let Some(v) = after.get(col).filter(|v| !v.is_null()) else {
                    continue;
                };
                let ts = parse_timestamp(v).ok_or_else(|| TargetError::BadDeadline {
                    table: schema.name.to_string(),
                    column: col.clone(),
                    value: v.to_string(),
                })?;
                if limit.is_some_and(|limit| ts < limit) {
                    stats.deadlined += 1;
                    continue 'rows;
                }
            }
        }
        kept.push(m);
    }
    Ok(kept)
}

fn parse_timestamp(v: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    let s = v.as_str()?;
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&chrono::Utc));
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%dT%H:%M:%S%.f%#z"] {
        if let Ok(t) = chrono::DateTime::parse_from_str(s, f) {
            return Some(t.with_timezone(&chrono::Utc));
        }
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    None
}

/// The rows of `batch` at positions `rows`.
fn select_rows<'a>(batch: &TableBatch<'a>, rows: &[usize]) -> TableBatch<'a> {
    TableBatch {
        ords: rows.iter().map(|&r| batch.ords[r]).collect(),
        columns: batch.columns.clone(),
        values: batch.values.iter().map(|col| col.select(rows)).collect(),
    }
}

fn to_op(m: &Mutation) -> Result<ApplyOp, ReceiveError> {
    Ok(match &m.after {
        Some(after) => ApplyOp::Upsert {
            data: after.clone(),
            before: m.before.row().cloned(),
            updated: Some(m.updated),
        },
        None => ApplyOp::Delete {
            pk: m.key.clone().unwrap_or_default(),
            before: m.before.row().cloned(),
            updated: Some(m.updated),
        },
    })
}

/// `getTX()` for a script's `apply` function: the request's transaction.
struct TxBridge<'a, 't> {
    receiver: &'a Receiver,
    tx: &'a Transaction<'t>,
    schema: Arc<TableSchema>,
    cfg: &'a TableConfig,
    /// The time of an op that carries none (one the script made up): the
    /// newest of the request.
    updated: Hlc,
    stats: &'a mut TableStats,
    /// The first error that aborted the transaction.
    aborted: Option<ReceiveError>,
}

impl TxBridge<'_, '_> {
    /// The script sees the message; the request fails with the error.
    fn abort(&mut self, e: tokio_postgres::Error) -> String {
        let message = db_message(&e);
        self.aborted.get_or_insert(TargetError::db(e).into());
        message
    }

    /// A script's statement, prepared, and its arguments bound to its types.
    async fn prepare(
        &mut self,
        sql: &str,
        args: &[Value],
    ) -> Result<(tokio_postgres::Statement, Vec<Param>), String> {
        let prepared = self.tx.prepare(sql).await;
        let stmt = prepared.map_err(|e| self.abort(e))?;
        let params = bind_args(stmt.params(), args)?;
        Ok((stmt, params))
    }
}

fn param_refs(params: &[Param]) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
    params.iter().map(|p| p.as_ref() as _).collect()
}

#[async_trait::async_trait]
impl ScriptTx for TxBridge<'_, '_> {
    async fn exec(&mut self, sql: &str, args: Vec<Value>) -> Result<u64, String> {
        let (stmt, params) = self.prepare(sql, &args).await?;
        let done = self.tx.execute(&stmt, &param_refs(&params)).await;
        done.map_err(|e| self.abort(e))
    }

    async fn query(&mut self, sql: &str, args: Vec<Value>) -> Result<Vec<Vec<Value>>, String> {
        let (stmt, params) = self.prepare(sql, &args).await?;
        let rows = self.tx.query(&stmt, &param_refs(&params)).await;
        rows.map_err(|e| self.abort(e))?
            .iter()
            .map(row_to_json)
            .collect()
    }

    async fn apply(&mut self, ops: Vec<ApplyOp>) -> Result<(), String> {
        let muts: Vec<Mutation> = ops
            .into_iter()
            .map(|op| match op {
                ApplyOp::Upsert {
                    data,
                    before,
                    updated,
                } => Mutation {
                    topic: None,
                    key: None,
                    after: Some(data),
                    before: before.map(Before::Row).unwrap_or(Before::Absent),
                    updated: updated.unwrap_or(self.updated),
                },
                ApplyOp::Delete {
                    pk,
                    before,
                    updated,
                } => Mutation {
                    topic: None,
                    key: Some(pk),
                    after: None,
                    before: before.map(Before::Row).unwrap_or(Before::Absent),
                    updated: updated.unwrap_or(self.updated),
                },
            })
            .collect();
        let muts = fold_duplicates(&self.schema, self.cfg, muts.iter().collect())
            .map_err(|e| e.to_string())?;
        let done = self
            .receiver
            .apply_standard(self.tx, &self.schema, self.cfg, muts, self.stats)
            .await;
        // Part of the rows may be written: the request cannot go on.
        done.map_err(|e| {
            let message = e.to_string();
            self.aborted.get_or_insert(e);
            message
        })
    }

    fn columns(&self) -> Vec<ColumnInfo> {
        self.schema
            .columns
            .iter()
            .map(|c| ColumnInfo {
                name: c.name.clone(),
                sql_type: c.sql_type.clone(),
                primary: c.pk_position.is_some(),
                ignored: c.generated || self.cfg.ignore.contains(&c.name),
            })
            .collect()
    }

    fn schema(&self) -> String {
        format!("{}.{}", self.schema.name.database, self.schema.name.schema)
    }

    fn table(&self) -> String {
        self.schema.name.to_string()
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.code().code(), d.message()),
        None => e.to_string(),
    }
}

type Param = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

/// Binds JSON arguments to a statement's parameter types.
fn bind_args(types: &[tokio_postgres::types::Type], args: &[Value]) -> Result<Vec<Param>, String> {
    use tokio_postgres::types::Type;
    if types.len() != args.len() {
        return Err(format!(
            "statement has {} parameters but {} arguments were given",
            types.len(),
            args.len()
        ));
    }
    types
        .iter()
        .zip(args)
        .enumerate()
        .map(|(i, (t, v))| {
            let bad = || format!("argument {} ({v}) does not fit parameter type {t}; cast the parameter, e.g. ${}::text", i + 1, i + 1);
            let p: Param = match *t {
                Type::INT2 => Box::new(
                    v.as_i64()
                        .and_then(|x| i16::try_from(x).ok())
                        .ok_or_else(bad)?,
                ),
                Type::INT4 => Box::new(
                    v.as_i64()
                        .and_then(|x| i32::try_from(x).ok())
                        .ok_or_else(bad)?,
                ),
                Type::INT8 => Box::new(v.as_i64().ok_or_else(bad)?),
                Type::FLOAT4 => Box::new(v.as_f64().map(|x| x as f32).ok_or_else(bad)?),
                Type::FLOAT8 => Box::new(v.as_f64().ok_or_else(bad)?),
                Type::BOOL => Box::new(v.as_bool().ok_or_else(bad)?),
                Type::JSON | Type::JSONB => Box::new(v.clone()),
                Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                    Box::new(match v {
                        Value::Null => None,
                        Value::String(s) => Some(s.clone()),
                        other => Some(other.to_string()),
                    })
                }
                _ => return Err(bad()),
            };
            Ok(p)
        })
        .collect()
}

/// One result row as JSON values (common types; others as text when possible).
fn row_to_json(row: &tokio_postgres::Row) -> Result<Vec<Value>, String> {
    use tokio_postgres::types::Type;
    (0..row.len())
        .map(|i| {
            let t = row.columns()[i].type_();
            let v = match *t {
                Type::INT2 => row.get::<_, Option<i16>>(i).map(Value::from),
                Type::INT4 => row.get::<_, Option<i32>>(i).map(Value::from),
                Type::INT8 => row.get::<_, Option<i64>>(i).map(Value::from),
                Type::FLOAT4 => row.get::<_, Option<f32>>(i).map(|f| Value::from(f as f64)),
                Type::FLOAT8 => row.get::<_, Option<f64>>(i).map(Value::from),
                Type::BOOL => row.get::<_, Option<bool>>(i).map(Value::from),
                Type::JSON | Type::JSONB => row.get::<_, Option<Value>>(i),
                _ => match row.try_get::<_, Option<String>>(i) {
                    Ok(s) => s.map(Value::from),
                    Err(_) => {
                        return Err(format!(
                            "column {} has type {t}; cast it to text in the query",
                            row.columns()[i].name()
                        ))
                    }
                },
            };
            Ok(v.unwrap_or(Value::Null))
        })
        .collect()
}

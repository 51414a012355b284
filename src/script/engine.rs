//! The engine behind [`super::Userscript`]: a small pool of threads, each with
//! its own QuickJS runtime that loaded the same script. Calls cross into
//! JavaScript once per batch (a large dispatch batch once per part, the parts
//! on several runtimes at once): dispatch rows as values built on the
//! script's thread ([`FlatArray`]), everything else and every answer as JSON
//! text.
//! While an `apply` call runs, its `getTX()` requests come back to the async
//! caller, which runs them on the request's transaction and replies.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use std::io::Write as _;

use serde_json::{Map, Value};

use super::flat::FlatArray;
use super::runtime::{load_program, Arg, Program, TxBridge, TxKind, TxRequest, Worker};
use super::*;
use crate::changefeed::document::NamesId;
use crate::changefeed::{Before, Document, Mutation};

struct Job {
    func: &'static str,
    args: Vec<Arg>,
    tx: Option<TxBridge>,
    reply: tokio::sync::oneshot::Sender<Result<String, ScriptError>>,
}

pub struct Engine {
    config: ScriptConfig,
    /// Normalized `database.schema` → the source name as the script wrote it.
    source_names: HashMap<String, String>,
    /// Sources whose `deletesTo` is a function.
    delete_fns: Vec<String>,
    /// Tables with a `map` function / a `deleteKey` function.
    map_fns: HashSet<String>,
    delete_key_fns: HashSet<String>,
    jobs: Mutex<mpsc::Sender<Job>>,
    /// How many runtimes serve calls.
    workers: usize,
    name: String,
}

/// Fewest rows a part of a split dispatch batch has: below this, a call's
/// fixed cost (crossing threads, the batch's header) outweighs the overlap.
const MIN_SPLIT_ROWS: usize = 256;

/// How many runtimes serve calls: as `limits` says, else one per core, at
/// most four.
fn pool_size(limits: &Limits) -> usize {
    if limits.runtimes > 0 {
        return limits.runtimes;
    }
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

fn worker_thread(
    program: Arc<Program>,
    limits: Limits,
    jobs: Arc<Mutex<mpsc::Receiver<Job>>>,
    mut worker: Option<Worker>,
) {
    loop {
        if worker.is_none() {
            match Worker::new(program.clone(), limits.clone(), true) {
                Ok((w, _)) => worker = Some(w),
                Err(e) => {
                    tracing::error!(script = %program.entry, "cannot restart the userscript runtime: {e}")
                }
            }
        }
        let job = {
            let rx = jobs.lock().unwrap_or_else(|e| e.into_inner());
            rx.recv()
        };
        let Ok(job) = job else { return };
        let res = match worker.as_mut() {
            Some(w) => w.call(job.func, job.args, job.tx),
            None => Err(ScriptError::Exception(format!(
                "{}: the userscript runtime could not be restarted",
                program.entry
            ))),
        };
        if let Err(e) = &res {
            if Worker::needs_restart(e) {
                // Its heap or state may be inconsistent: start afresh.
                worker = None;
            }
        }
        let _ = job.reply.send(res);
    }
}

impl Engine {
    pub fn load(path: &Path, limits: Limits) -> Result<Self, ScriptError> {
        let program = Arc::new(load_program(path)?);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let (init_tx, init_rx) = mpsc::channel();
        let n = pool_size(&limits);
        for i in 0..n {
            let program = program.clone();
            let limits = limits.clone();
            let rx = rx.clone();
            let init_tx = init_tx.clone();
            std::thread::Builder::new()
                .name(format!("userscript-{i}"))
                .stack_size(8 << 20)
                .spawn(move || {
                    // Only the first runtime's top level may log.
                    match Worker::new(program.clone(), limits.clone(), i > 0) {
                        Ok((w, config)) => {
                            let _ = init_tx.send(Ok(config));
                            drop(init_tx);
                            worker_thread(program, limits, rx, Some(w));
                        }
                        Err(e) => {
                            let _ = init_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| ScriptError::Load(format!("cannot start a userscript thread: {e}")))?;
        }
        drop(init_tx);
        let mut config_json = None;
        for _ in 0..n {
            match init_rx.recv() {
                Ok(Ok(c)) => {
                    config_json.get_or_insert(c);
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => break,
            }
        }
        let config_json = config_json.ok_or_else(|| {
            ScriptError::Load(format!("{}: the runtime did not start", program.entry))
        })?;
        let p = parse_config(&config_json)?;
        Ok(Engine {
            config: p.config,
            source_names: p.source_names,
            delete_fns: p.delete_fns,
            map_fns: p.map_fns,
            delete_key_fns: p.delete_key_fns,
            jobs: Mutex::new(tx),
            workers: n,
            name: program.entry.clone(),
        })
    }

    pub fn config(&self) -> &ScriptConfig {
        &self.config
    }

    async fn run(&self, func: &'static str, args: Vec<Arg>) -> Result<String, ScriptError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.submit(Job {
            func,
            args,
            tx: None,
            reply,
        })?;
        answer.await.map_err(|_| self.gone())?
    }

    fn submit(&self, job: Job) -> Result<(), ScriptError> {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(job)
            .map_err(|_| self.gone())
    }

    fn gone(&self) -> ScriptError {
        ScriptError::Exception(format!("{}: the userscript runtime stopped", self.name))
    }

    /// The name the script used for `table` in `configureTable`.
    fn table_key(&self, table: &TableName) -> Option<&str> {
        self.config.tables.keys().map(String::as_str).find(|name| {
            TableName::resolve(name, &table.database, &table.schema)
                .map(|t| &t == table)
                .unwrap_or(false)
        })
    }

    pub async fn dispatch(
        &self,
        database: &str,
        schema: &str,
        default_table: Option<&str>,
        batch: Vec<Mutation>,
    ) -> Result<Vec<Routed>, ScriptError> {
        let key = source_key(&format!("{database}.{schema}")).map_err(ScriptError::Invalid)?;
        let (Some(src), Some(written)) =
            (self.config.sources.get(&key), self.source_names.get(&key))
        else {
            return route_by_topic(database, schema, default_table, batch);
        };
        if let Some(target) = &src.target {
            let mut names = TableNames::new(database, schema);
            let parts = split_ident(target).map_err(ScriptError::Invalid)?;
            // A `target` of two parts is a database and schema for the topic.
            // Otherwise it is one table for every row, resolved once.
            enum Target<'a> {
                Schema(TableNames<'a>),
                Table(Arc<TableName>),
            }
            let mut to = match &parts[..] {
                [db, schema] => Target::Schema(TableNames::new(db, schema)),
                _ => Target::Table(names.get(target)?),
            };
            return batch
                .into_iter()
                .map(|m| {
                    let table = match &mut to {
                        Target::Schema(n) => n.topic(default_table, &m)?,
                        Target::Table(t) => t.clone(),
                    };
                    Ok(Routed { table, mutation: m })
                })
                .collect();
        }

        // A large batch is split across the pool's runtimes, which run its
        // parts at once: a request then waits for the slowest part instead of
        // the whole batch on one core. Each part keeps its rows in order and
        // the parts are joined in order, so the routed rows are as one call
        // would give them; dispatch sees one row at a time and cannot tell.
        let from = DispatchSource {
            key: &key,
            src,
            written,
            database,
            schema,
            default_table,
        };
        let parts = (batch.len() / MIN_SPLIT_ROWS).clamp(1, self.workers);
        if parts > 1 {
            let size = batch.len().div_ceil(parts);
            let mut batch = batch;
            // Cut from the end, so that each row moves once.
            let mut chunks: Vec<Vec<Mutation>> = (1..parts)
                .rev()
                .map(|p| batch.split_off(p * size))
                .collect();
            chunks.push(batch);
            let runs = chunks
                .into_iter()
                .rev()
                .enumerate()
                .map(|(p, chunk)| self.dispatch_part(&from, chunk, p * size));
            let mut routed = Vec::new();
            // The first part's error, as one call would have reported it.
            for part in futures::future::join_all(runs).await {
                routed.append(&mut part?);
            }
            return Ok(routed);
        }
        self.dispatch_part(&from, batch, 0).await
    }

    /// Dispatches the rows of `batch` (rows `offset..` of the request)
    /// through the source's `dispatch` in one call.
    async fn dispatch_part(
        &self,
        from: &DispatchSource<'_>,
        batch: Vec<Mutation>,
        offset: usize,
    ) -> Result<Vec<Routed>, ScriptError> {
        let &DispatchSource {
            key,
            src,
            written,
            database,
            schema,
            default_table,
        } = from;
        let mut names = TableNames::new(database, schema);
        let delete_fn = self.delete_fns.iter().any(|f| f == key);
        // The document each crossing row shows the script: its `after`, or
        // for a delete handed to a `deletesTo` function, its `before` (or {}).
        let empty = Document::new();
        let mut input = DispatchInput::with_capacity(schema, batch.len(), offset);
        for (i, m) in batch.iter().enumerate() {
            let topic = topic_of(default_table, m)?;
            let shown = match (&m.after, delete_fn) {
                (Some(after), _) => Some(after),
                (None, true) => Some(m.before.row().unwrap_or(&empty)),
                (None, false) => None,
            };
            if let Some(doc) = shown {
                input.push(offset + i, doc, topic, m);
            }
        }

        let simple = std::mem::take(&mut input.simple);
        let output: DispatchOutput = if input.rows > 0 {
            let (header, flat) = input.finish();
            let out = self
                .run(
                    "dispatchBatch",
                    vec![written.to_string().into(), header.into(), Arg::Flat(flat)],
                )
                .await?;
            serde_json::from_str(&out)
                .map_err(|e| ScriptError::Invalid(format!("dispatch output: {e}")))?
        } else {
            DispatchOutput::default()
        };
        let DispatchOutput(tables, codes, mut results) = output;
        let tables = tables
            .iter()
            .map(|t| names.get(t))
            .collect::<Result<Vec<_>, _>>()?;
        let mut codes = codes.into_iter();
        let mut simple = simple.into_iter();
        let mut routed = Vec::with_capacity(batch.len());
        // One row's destinations: a table and a document (None: the row's
        // own document, which the script returned unchanged).
        let mut targets: Vec<(Arc<TableName>, Option<Document>)> = Vec::new();
        for (i, m) in batch.into_iter().enumerate() {
            let i = offset + i;
            if m.after.is_none() && !delete_fn {
                let table = match src.deletes_to.as_deref() {
                    Some(t) if !t.is_empty() => names.get(t)?,
                    _ => names.topic(default_table, &m)?,
                };
                routed.push(Routed { table, mutation: m });
                continue;
            }
            let encoded = simple.next().unwrap_or(false);
            let r = match codes.next().unwrap_or(-1) {
                -1 => continue,
                t if t >= 0 => {
                    let table = tables.get(t as usize).ok_or_else(|| {
                        ScriptError::Invalid(format!("dispatch output: no table {t}"))
                    })?;
                    let mut mutation = m;
                    take_routed_document(&mut mutation, None);
                    routed.push(Routed {
                        table: table.clone(),
                        mutation,
                    });
                    continue;
                }
                r => results
                    .get_mut((-2 - r) as usize)
                    .map(std::mem::take)
                    .unwrap_or(Value::Null),
            };
            let bad = |what: &str| {
                ScriptError::Invalid(format!(
                    "dispatch for source {written} returned {what} for row {i}; expected {{table: [documents]}} or null"
                ))
            };
            let map = match r {
                Value::Null => continue,
                Value::Object(map) => map,
                other => return Err(bad(&short(&other))),
            };
            targets.clear();
            // What a returned document's numbers are restored from.
            let own = m.after.as_ref().or(m.before.row());
            for (table, docs) in map {
                let docs = match docs {
                    Value::Null => continue,
                    Value::Array(d) => d,
                    other => return Err(bad(&format!("{{{table:?}: {}}}", short(&other)))),
                };
                let table = names.get(&table)?;
                for d in docs {
                    // Rows sent by columns come back as 0 (unchanged) or [document].
                    let d = match d {
                        Value::Number(_) if encoded => {
                            targets.push((table.clone(), None));
                            continue;
                        }
                        Value::Array(mut one) if encoded && one.len() == 1 => {
                            one.pop().unwrap_or_default()
                        }
                        d if !encoded => d,
                        other => {
                            return Err(ScriptError::Invalid(format!(
                                "dispatch for source {written}: unexpected result {} for row {i}",
                                short(&other)
                            )))
                        }
                    };
                    match d {
                        Value::Object(doc) => {
                            let mut doc = Document::from(doc);
                            if let Some(own) = own {
                                restore_exact_numbers(&mut doc, own);
                            }
                            targets.push((table.clone(), Some(doc)))
                        }
                        other => return Err(bad(&format!("a non-document {}", short(&other)))),
                    }
                }
            }
            // Every destination but the last gets a copy.
            let n = targets.len();
            let mut m = Some(m);
            for (j, (table, doc)) in targets.drain(..).enumerate() {
                let Some(mut mutation) = (if j + 1 == n { m.take() } else { m.clone() }) else {
                    break;
                };
                take_routed_document(&mut mutation, doc);
                routed.push(Routed { table, mutation });
            }
        }
        Ok(routed)
    }

    pub async fn map(
        &self,
        table: &TableName,
        batch: Vec<Mutation>,
    ) -> Result<Vec<Mutation>, ScriptError> {
        let Some(key) = self.table_key(table) else {
            return Ok(batch);
        };
        let raw = self.raw_table(key);
        let mut json = Vec::with_capacity(batch.len() * 128);
        json.push(b'[');
        let mut crossing = 0usize;
        for m in &batch {
            let shown = match &m.after {
                Some(after) if raw.map => Shown::Document(after),
                None if raw.delete_key_fn => Shown::Key(m.key.as_deref().unwrap_or_default()),
                _ => continue,
            };
            if crossing > 0 {
                json.push(b',');
            }
            crossing += 1;
            json.push(b'[');
            serde_json::to_writer(&mut json, &shown)
                .map_err(|e| ScriptError::Invalid(e.to_string()))?;
            json.push(b',');
            write_meta(&mut json, &table.database, &table.schema, &table.table, m);
            json.extend_from_slice(if m.after.is_none() {
                b",true]"
            } else {
                b",false]"
            });
        }
        json.push(b']');
        if crossing == 0 {
            return Ok(batch);
        }
        let out = self
            .run(
                "mapBatch",
                vec![
                    key.to_string().into(),
                    String::from_utf8(json).unwrap_or_default().into(),
                ],
            )
            .await?;
        let results: Vec<Value> = serde_json::from_str(&out)
            .map_err(|e| ScriptError::Invalid(format!("map output: {e}")))?;
        let mut results = results.into_iter();
        let mut out = Vec::with_capacity(batch.len());
        for (i, mut m) in batch.into_iter().enumerate() {
            let crosses = if m.after.is_some() {
                raw.map
            } else {
                raw.delete_key_fn
            };
            if !crosses {
                out.push(m);
                continue;
            }
            match (results.next().unwrap_or(Value::Null), m.after.is_some()) {
                (Value::Null, _) => {}
                (Value::Object(doc), true) => {
                    let mut doc = Document::from(doc);
                    if let Some(own) = &m.after {
                        restore_exact_numbers(&mut doc, own);
                    }
                    m.after = Some(doc);
                    out.push(m);
                }
                (Value::Array(k), false) => {
                    m.key = Some(k);
                    out.push(m);
                }
                (other, upsert) => {
                    return Err(ScriptError::Invalid(format!(
                        "{} for table {table} returned {} for row {i}; expected {}",
                        if upsert { "map" } else { "deleteKey" },
                        short(&other),
                        if upsert {
                            "a document or null"
                        } else {
                            "an array of key values or null"
                        }
                    )))
                }
            }
        }
        Ok(out)
    }

    pub async fn merge(
        &self,
        table: &TableName,
        conflicts: Vec<Conflict>,
    ) -> Result<Vec<MergeOutcome>, ScriptError> {
        let key = self.table_key(table);
        let has_fn = key
            .and_then(|k| self.config.tables.get(k))
            .map(|c| {
                matches!(
                    c.merge,
                    Some(MergeKind::Custom) | Some(MergeKind::Standard { has_fallback: true })
                )
            })
            .unwrap_or(false);
        let (Some(key), true) = (key, has_fn) else {
            return Err(ScriptError::Invalid(format!(
                "table {table} has no merge function"
            )));
        };
        if conflicts.is_empty() {
            return Ok(Vec::new());
        }
        let ops: Vec<Value> = conflicts
            .iter()
            .map(|c| {
                let mut op = Map::new();
                if let Some(b) = &c.before {
                    op.insert("before".into(), b.to_value());
                }
                op.insert(
                    "proposed".into(),
                    c.proposed.as_ref().map_or(Value::Null, Document::to_value),
                );
                op.insert("target".into(), c.target.to_value());
                op.insert(
                    "unmerged".into(),
                    Value::Array(c.unmerged.iter().cloned().map(Value::String).collect()),
                );
                let mut meta = Map::new();
                meta.insert("database".into(), table.database.clone().into());
                meta.insert("schema".into(), table.schema.clone().into());
                meta.insert("table".into(), table.table.clone().into());
                meta.insert("nanos".into(), c.nanos.into());
                meta.insert("logical".into(), c.logical.into());
                op.insert("meta".into(), Value::Object(meta));
                Value::Object(op)
            })
            .collect();
        let json = serde_json::to_string(&ops).map_err(|e| ScriptError::Invalid(e.to_string()))?;
        let out = self
            .run("mergeBatch", vec![key.to_string().into(), json.into()])
            .await?;
        let results: Vec<Value> = serde_json::from_str(&out)
            .map_err(|e| ScriptError::Invalid(format!("merge output: {e}")))?;
        if results.len() != conflicts.len() {
            return Err(ScriptError::Invalid(format!(
                "merge for table {table} returned the wrong number of results"
            )));
        }
        results
            .into_iter()
            .zip(&conflicts)
            .map(|(r, c)| {
                let outcome = match &r {
                    Value::Object(o) if o.len() == 1 => match o.iter().next() {
                        Some((k, Value::Object(doc))) if k == "apply" => {
                            // Numbers passed through from either side stay
                            // exact; the stored row's reading wins a tie.
                            let mut doc = Document::from(doc.clone());
                            if let Some(p) = &c.proposed {
                                restore_exact_numbers(&mut doc, p);
                            }
                            restore_exact_numbers(&mut doc, &c.target);
                            Some(MergeOutcome::Apply(doc))
                        }
                        Some((k, Value::String(name))) if k == "dlq" && !name.is_empty() => {
                            Some(MergeOutcome::Dlq(name.clone()))
                        }
                        Some((k, Value::Bool(true))) if k == "drop" => Some(MergeOutcome::Drop),
                        _ => None,
                    },
                    _ => None,
                };
                outcome.ok_or_else(|| {
                    ScriptError::Invalid(format!(
                        "merge for table {table} returned {}; expected {{apply: document}}, {{dlq: name}} or {{drop: true}}",
                        short(&r)
                    ))
                })
            })
            .collect()
    }

    pub async fn apply(
        &self,
        table: &TableName,
        ops: Vec<ApplyOp>,
        tx: &mut dyn ScriptTx,
    ) -> Result<(), ScriptError> {
        let key = match self.table_key(table) {
            Some(k) if self.config.tables[k].has_apply => k.to_string(),
            _ => {
                return Err(ScriptError::Invalid(format!(
                    "table {table} has no apply function"
                )))
            }
        };
        let columns = tx.columns();
        let primary: Vec<&str> = columns
            .iter()
            .filter(|c| c.primary)
            .map(|c| c.name.as_str())
            .collect();
        let ops_json: Vec<Value> = ops
            .into_iter()
            .map(|op| {
                let mut o = Map::new();
                let mut meta = Map::new();
                meta.insert("table".into(), table.table.clone().into());
                meta.insert("schema".into(), table.schema.clone().into());
                let (before, updated) = match op {
                    ApplyOp::Upsert {
                        data,
                        before,
                        updated,
                    } => {
                        o.insert("action".into(), "upsert".into());
                        let pk = primary
                            .iter()
                            .map(|c| {
                                data.get(c)
                                    .or_else(|| data.get(&unquote(c)))
                                    .cloned()
                                    .unwrap_or(Value::Null)
                            })
                            .collect();
                        o.insert("pk".into(), Value::Array(pk));
                        o.insert("data".into(), data.into());
                        (before, updated)
                    }
                    ApplyOp::Delete {
                        pk,
                        before,
                        updated,
                    } => {
                        o.insert("action".into(), "delete".into());
                        o.insert("pk".into(), Value::Array(pk));
                        (before, updated)
                    }
                };
                if let Some(t) = updated {
                    // `updated` exactly, as text: nanos do not fit a JS number.
                    meta.insert("updated".into(), t.to_string().into());
                    meta.insert("nanos".into(), t.nanos.into());
                    meta.insert("logical".into(), t.logical.into());
                }
                if let Some(b) = before {
                    o.insert("before".into(), b.into());
                }
                o.insert("meta".into(), Value::Object(meta));
                Value::Object(o)
            })
            .collect();
        let json =
            serde_json::to_string(&ops_json).map_err(|e| ScriptError::Invalid(e.to_string()))?;
        let columns_json =
            serde_json::to_string(&columns).map_err(|e| ScriptError::Invalid(e.to_string()))?;
        let (requests, mut incoming) = tokio::sync::mpsc::unbounded_channel::<TxRequest>();
        let (reply, mut answer) = tokio::sync::oneshot::channel();
        self.submit(Job {
            func: "runApply",
            args: vec![key.into(), json.into()],
            tx: Some(TxBridge {
                requests,
                columns_json,
                schema: tx.schema(),
                table: tx.table(),
            }),
            reply,
        })?;
        let result = loop {
            tokio::select! {
                biased;
                Some(req) = incoming.recv() => {
                    let res = serve_tx(&mut *tx, req.kind, &req.sql, &req.args_json, &ops_json).await;
                    let _ = req.reply.send(res);
                }
                res = &mut answer => break res.map_err(|_| self.gone())?,
            }
        };
        result.map(|_| ())
    }

    fn raw_table(&self, key: &str) -> RawTable {
        RawTable {
            map: self.map_fns.contains(key),
            delete_key_fn: self.delete_key_fns.contains(key),
        }
    }
}

struct RawTable {
    map: bool,
    delete_key_fn: bool,
}

/// Serves one `getTX()` call. `handed`: the ops the script's apply was
/// given, which the ops it passes on take their exact numbers from.
async fn serve_tx(
    tx: &mut dyn ScriptTx,
    kind: TxKind,
    sql: &str,
    args_json: &str,
    handed: &[Value],
) -> Result<String, String> {
    match kind {
        TxKind::Exec => {
            let args: Vec<Value> = serde_json::from_str(args_json).map_err(|e| e.to_string())?;
            tx.exec(sql, args).await.map(|n| n.to_string())
        }
        TxKind::Query => {
            let args: Vec<Value> = serde_json::from_str(args_json).map_err(|e| e.to_string())?;
            let rows = tx.query(sql, args).await?;
            serde_json::to_string(&rows).map_err(|e| e.to_string())
        }
        TxKind::Apply => {
            // [from, ops]: from[i] is the handed op ops[i] came from, or -1.
            let (from, ops): (Vec<i64>, Value) =
                serde_json::from_str(args_json).map_err(|e| e.to_string())?;
            let Value::Array(ops) = ops else {
                return Err(format!(
                    "apply: the argument must be an array of operations, not {}",
                    short(&ops)
                ));
            };
            let ops = ops
                .into_iter()
                .enumerate()
                .map(|(i, mut op)| {
                    let origin = from.get(i).and_then(|&f| usize::try_from(f).ok());
                    if let Some(own) = origin.and_then(|f| handed.get(f)) {
                        restore_exact_number(&mut op, own);
                    }
                    parse_op(op)
                })
                .collect::<Result<Vec<_>, _>>()?;
            tx.apply(ops).await.map(|_| "null".to_string())
        }
    }
}

/// Reads one `getTX().apply` operation: `{action: "upsert", data, before?,
/// meta?}` or `{action: "delete", pk: [...], before?, meta?}`; the change's
/// time comes from `meta.updated`, as the op handed to `apply` carried it.
fn parse_op(v: Value) -> Result<ApplyOp, String> {
    let Value::Object(mut o) = v else {
        return Err(format!(
            "apply: each operation must be an object, not {}",
            short(&v)
        ));
    };
    let before = match o.remove("before") {
        Some(Value::Object(b)) => Some(Document::from(b)),
        _ => None,
    };
    let updated = match o.get("meta").and_then(|m| m.get("updated")) {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) => Some(t.parse().map_err(|e| format!("apply: meta.updated: {e}"))?),
        Some(other) => {
            return Err(format!(
                "apply: meta.updated must be the string the op came with, not {}",
                short(other)
            ))
        }
    };
    match o.get("action").and_then(Value::as_str) {
        Some("upsert") => match o.remove("data") {
            Some(Value::Object(data)) => Ok(ApplyOp::Upsert {
                data: data.into(),
                before,
                updated,
            }),
            _ => Err("apply: an upsert needs data: {column: value, ...}".to_string()),
        },
        Some("delete") => match o.remove("pk") {
            Some(Value::Array(pk)) => Ok(ApplyOp::Delete {
                pk,
                before,
                updated,
            }),
            _ => Err("apply: a delete needs pk: [key values]".to_string()),
        },
        _ => Err("apply: action must be \"upsert\" or \"delete\"".to_string()),
    }
}

fn unquote(c: &str) -> String {
    c.trim_matches('"').replace("\"\"", "\"")
}

/// `{"schema":…,"table":…,"nanos":…,"logical":…,"key":[…]}`: kept small,
/// since scripts commonly `JSON.stringify(meta)` for every row.
fn write_meta(out: &mut Vec<u8>, _database: &str, schema: &str, table: &str, m: &Mutation) {
    out.extend_from_slice(b"{\"schema\":");
    let _ = serde_json::to_writer(&mut *out, schema);
    out.extend_from_slice(b",\"table\":");
    let _ = serde_json::to_writer(&mut *out, table);
    let _ = write!(
        out,
        ",\"nanos\":{},\"logical\":{}",
        m.updated.nanos, m.updated.logical
    );
    if let Some(k) = &m.key {
        out.extend_from_slice(b",\"key\":");
        let _ = serde_json::to_writer(&mut *out, k);
    }
    out.push(b'}');
}

/// JavaScript numbers are doubles: an integer past 2^53 (CockroachDB's
/// `unique_rowid()` keys, snowflake ids) or a numeric of many digits comes
/// back from a script rounded. Where a returned number has the same double
/// as the row's own number at the same place (same property, same array
/// index), the script passed it through: its exact text is put back. A
/// number the script computed differs from the original and is left alone.
fn restore_exact_numbers(returned: &mut Document, own: &Document) {
    restore_by_name(returned.iter_mut(), |k| own.get(k));
}

/// Restores each returned property from the one of the same name in `own`.
fn restore_by_name<'r, 'o>(
    returned: impl Iterator<Item = (&'r String, &'r mut Value)>,
    own: impl Fn(&str) -> Option<&'o Value>,
) {
    for (k, r) in returned {
        if let Some(o) = own(k) {
            restore_exact_number(r, o);
        }
    }
}

/// [`restore_exact_numbers`] for one value and what it holds.
fn restore_exact_number(r: &mut Value, o: &Value) {
    match (r, o) {
        // Equal text (nearly every number) needs no parse.
        (Value::Number(rn), Value::Number(on))
            if rn.as_str() != on.as_str()
                && rn.as_f64().is_some_and(|f| on.as_f64() == Some(f)) =>
        {
            *rn = on.clone();
        }
        (Value::Object(r), Value::Object(o)) => restore_by_name(r.iter_mut(), |k| o.get(k)),
        (Value::Array(r), Value::Array(o)) => {
            for (r, o) in r.iter_mut().zip(o) {
                restore_exact_number(r, o);
            }
        }
        _ => {}
    }
}

/// What a map function is shown of a row: its document, or for a delete
/// handed to a `deleteKey` function, its key.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Shown<'a> {
    Document(&'a Document),
    Key(&'a [Value]),
}

/// Gives a row the document dispatch routed it with (`None`: its own,
/// unchanged).
fn take_routed_document(mutation: &mut Mutation, doc: Option<Document>) {
    match doc {
        Some(doc) if mutation.after.is_some() => mutation.after = Some(doc),
        // A delete whose row never existed at the source stays a no-op,
        // wherever it goes.
        _ if mutation.after.is_none() && mutation.before == Before::Null => {}
        // A delete: the returned document names the row by its key; the
        // source's key names a row of another shape.
        Some(doc) => {
            mutation.before = Before::Row(doc);
            mutation.key = None;
        }
        None if mutation.after.is_some() => {}
        // A delete routed as shown: the document the script saw ({} when
        // the source sent no `before`) names the row.
        None => {
            if mutation.before == Before::Absent {
                mutation.before = Before::Row(Document::new());
            }
        }
    }
}

/// What `dispatchBatch` answers: `[tables, codes, results]`, one code per
/// row (see bootstrap.js): -1 dropped, `t >= 0` routed unchanged to
/// `tables[t]`, `-2 - i` described by `results[i]`.
#[derive(Default, serde::Deserialize)]
struct DispatchOutput(Vec<String>, Vec<i64>, Vec<Value>);

/// Where a dispatched batch came from: the request's database, schema and
/// default table, and the source configured for them.
struct DispatchSource<'a> {
    /// The source's normalized `database.schema`.
    key: &'a str,
    src: &'a SourceConfig,
    /// The source's name as the script wrote it.
    written: &'a str,
    database: &'a str,
    schema: &'a str,
    default_table: Option<&'a str>,
}

/// The rows `dispatchBatch` receives: a JSON text `[schema, shapes, topics,
/// times, positions, offset]` (see `dispatchBatch` in bootstrap.js) and a
/// [`FlatArray`] `flat`. `shapes` lists property-name lists;
/// `times` holds one nanos, logical pair per run of rows sharing `updated`
/// (rows of one source transaction share one, so each pair travels once);
/// `flat` holds the rows
/// one after another as plain values (no array per row, which QuickJS would
/// have to build): a header (shape, isDelete (0/1), topic, time (an index
/// into `times`), the number of key values (-1: no key); or -2 when it is the
/// previous row's, as it nearly always is), the key values, then the
/// document's values in the
/// order of `shapes[shape]`, which the script builds into an object and
/// which lets it answer with one number for a row routed unchanged.
/// Documents with nested values (which could change unseen) or a
/// `__proto__` property go whole, with shape -1. The script builds `meta`
/// (`{schema, table, nanos, logical, key}`) from the rest.
struct DispatchInput {
    schema: String,
    shapes: Vec<Vec<String>>,
    /// The names of the last row that had a shape, and that shape.
    last_names: Option<(NamesId, usize)>,
    topics: Vec<String>,
    /// `updated` values seen, flattened as nanos, logical.
    times: Vec<i64>,
    flat: FlatArray,
    /// The last row's header: shape, isDelete, topic, time, key length.
    last_header: Option<[i32; 5]>,
    /// Rows pushed.
    rows: usize,
    /// For each row, whether it went by shape.
    simple: Vec<bool>,
    /// Each row's index in the batch, once a row of the batch was not
    /// pushed (a delete `dispatch` does not see); `None` while they agree.
    /// Errors the script's rows raise name the batch's index.
    positions: Option<Vec<usize>>,
    /// The batch index of the first row (of a part of a split batch).
    offset: usize,
}

/// More distinct property lists than this in one batch go whole.
const MAX_SHAPES: usize = 64;

impl DispatchInput {
    fn with_capacity(schema: &str, rows: usize, offset: usize) -> Self {
        DispatchInput {
            schema: schema.to_string(),
            shapes: Vec::new(),
            last_names: None,
            topics: Vec::new(),
            times: Vec::new(),
            flat: FlatArray::with_capacity(rows * 8),
            last_header: None,
            rows: 0,
            simple: Vec::with_capacity(rows),
            positions: None,
            offset,
        }
    }

    fn shape_of(&mut self, doc: &Document) -> Option<usize> {
        if doc
            .values()
            .any(|v| matches!(v, Value::Object(_) | Value::Array(_)))
        {
            return None;
        }
        // Rows parsed from one request share their list of names: only a
        // row with another list needs its names compared.
        if let Some((names, shape)) = &self.last_names {
            if doc.has_names(names) {
                return Some(*shape);
            }
        }
        if doc.keys().any(|k| k == "__proto__") {
            return None;
        }
        let same = |shape: &Vec<String>| {
            shape.len() == doc.len() && shape.iter().zip(doc.keys()).all(|(a, b)| a == b)
        };
        let found = match self.shapes.iter().position(same) {
            Some(i) => i,
            None if self.shapes.len() < MAX_SHAPES => {
                self.shapes.push(doc.keys().cloned().collect());
                self.shapes.len() - 1
            }
            None => return None,
        };
        self.last_names = Some((doc.names_id(), found));
        Some(found)
    }

    fn topic(&mut self, topic: &str) -> usize {
        match self.topics.iter().rposition(|t| t == topic) {
            Some(i) => i,
            None => {
                self.topics.push(topic.to_string());
                self.topics.len() - 1
            }
        }
    }

    /// The index of `updated` in `times`. Consecutive rows nearly always
    /// share it (one source transaction), so only the last entry is checked.
    fn time(&mut self, nanos: i64, logical: i64) -> usize {
        if let [.., n, l] = self.times[..] {
            if n == nanos && l == logical {
                return self.times.len() / 2 - 1;
            }
        }
        self.times.extend([nanos, logical]);
        self.times.len() / 2 - 1
    }

    /// Adds row `index` of the batch, showing the script `doc` for mutation
    /// `m` of table `topic`.
    fn push(&mut self, index: usize, doc: &Document, topic: &str, m: &Mutation) {
        match &mut self.positions {
            Some(p) => p.push(index),
            None if index != self.offset + self.rows => {
                let mut p: Vec<usize> = (self.offset..self.offset + self.rows).collect();
                p.push(index);
                self.positions = Some(p);
            }
            None => {}
        }
        self.rows += 1;
        let shape = self.shape_of(doc);
        self.simple.push(shape.is_some());
        let topic = self.topic(topic);
        let time = self.time(m.updated.nanos, m.updated.logical.into());
        let key = m.key.as_deref().unwrap_or_default();
        // Indexes into lists a request builds: far below i32::MAX.
        let header = [
            shape.map_or(-1, |i| i as i32),
            i32::from(m.after.is_none()),
            topic as i32,
            time as i32,
            m.key.as_ref().map_or(-1, |k| k.len() as i32),
        ];
        if self.last_header == Some(header) {
            self.flat.push_int(-2);
        } else {
            for h in header {
                self.flat.push_int(h);
            }
            self.last_header = Some(header);
        }
        for v in key {
            self.flat.push(v);
        }
        match shape {
            Some(_) => {
                for v in doc.values() {
                    self.flat.push(v);
                }
            }
            None => self.flat.push_document(doc),
        }
    }

    /// The header JSON and the flat values.
    fn finish(self) -> (String, FlatArray) {
        let header = serde_json::to_string(&(
            &self.schema,
            &self.shapes,
            &self.topics,
            &self.times,
            &self.positions,
            self.offset,
        ))
        .unwrap_or_default();
        (header, self.flat)
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        format!("{}…", &s[..s.floor_char_boundary_compat(80)])
    } else {
        s
    }
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for str {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while i > 0 && !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}

/// The normalized `database.schema` key of a source name (`kv` means `kv.public`).
pub fn source_key(name: &str) -> Result<String, String> {
    let mut parts = split_ident(name)?;
    if parts.len() == 1 {
        parts.push("public".to_string());
    }
    if parts.len() != 2 {
        return Err(format!("source name {name:?} must be database.schema"));
    }
    Ok(parts.join("."))
}

/// Parses a Go-style duration (`1h`, `90m`, `1h30m`, `500ms`, `2.5s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let err =
        || format!("invalid duration {s:?}: expected e.g. \"1h\", \"30m\", \"1h30m\", \"500ms\"");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_end == 0 {
            return Err(err());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| err())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(err()),
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| format!("duration {s:?} is too long"))
}

struct Parsed {
    config: ScriptConfig,
    source_names: HashMap<String, String>,
    delete_fns: Vec<String>,
    map_fns: HashSet<String>,
    delete_key_fns: HashSet<String>,
}

fn parse_config(json: &str) -> Result<Parsed, ScriptError> {
    let bad = |m: String| ScriptError::Load(m);
    let v: Value = serde_json::from_str(json).map_err(|e| bad(format!("configuration: {e}")))?;
    let mut config = ScriptConfig::default();
    let mut names = HashMap::new();
    let mut delete_fns = Vec::new();
    let mut map_fns = HashSet::new();
    let mut delete_key_fns = HashSet::new();
    let strs = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    if let Some(sources) = v.get("sources").and_then(Value::as_object) {
        for (name, s) in sources {
            let key = source_key(name).map_err(|e| bad(format!("configureSource: {e}")))?;
            let target = s.get("target").and_then(Value::as_str).map(str::to_string);
            if let Some(t) = &target {
                split_ident(t)
                    .map_err(|e| bad(format!("configureSource({name:?}): target: {e}")))?;
            }
            if s.get("deletesToFn")
                .and_then(Value::as_bool)
                .unwrap_or(false)
            {
                delete_fns.push(key.clone());
            }
            config.sources.insert(
                key.clone(),
                SourceConfig {
                    has_dispatch: s.get("dispatch").and_then(Value::as_bool).unwrap_or(false),
                    deletes_to: s
                        .get("deletesTo")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    target,
                },
            );
            names.insert(key, name.clone());
        }
    }
    if let Some(tables) = v.get("tables").and_then(Value::as_object) {
        for (name, t) in tables {
            TableName::resolve(name, "db", "schema")
                .map_err(|e| bad(format!("configureTable: {e}")))?;
            let mut deadlines = Vec::new();
            if let Some(d) = t.get("deadlines").and_then(Value::as_object) {
                for (col, dur) in d {
                    let dur = dur.as_str().unwrap_or_default();
                    let parsed = parse_duration(dur).map_err(|e| {
                        bad(format!("configureTable({name:?}): deadlines.{col}: {e}"))
                    })?;
                    deadlines.push((col.clone(), parsed));
                }
            }
            let exprs = t
                .get("exprs")
                .and_then(Value::as_object)
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default();
            let merge = match t.get("merge").and_then(Value::as_str) {
                Some("custom") => Some(MergeKind::Custom),
                Some("standard") => Some(MergeKind::Standard {
                    has_fallback: false,
                }),
                Some("standard+fallback") => Some(MergeKind::Standard { has_fallback: true }),
                _ => None,
            };
            let has_map = t.get("map").and_then(Value::as_bool).unwrap_or(false);
            let delete_key_fn = t
                .get("deleteKeyFn")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if has_map {
                map_fns.insert(name.clone());
            }
            if delete_key_fn {
                delete_key_fns.insert(name.clone());
            }
            config.tables.insert(
                name.clone(),
                TableConfig {
                    cas: strs(t.get("cas")),
                    deadlines,
                    delete_key: strs(t.get("deleteKey")),
                    exprs,
                    extras: t.get("extras").and_then(Value::as_str).map(str::to_string),
                    ignore: strs(t.get("ignore")),
                    has_map: has_map || delete_key_fn,
                    has_apply: t.get("apply").and_then(Value::as_bool).unwrap_or(false),
                    merge,
                    row_limit: t
                        .get("rowLimit")
                        .and_then(Value::as_u64)
                        .map(|n| n as usize),
                },
            );
        }
    }
    if let Some(opts) = v.get("options").and_then(Value::as_object) {
        for (k, val) in opts {
            config
                .options
                .insert(k.clone(), val.as_str().unwrap_or_default().to_string());
        }
    }
    Ok(Parsed {
        config,
        source_names: names,
        delete_fns,
        map_fns,
        delete_key_fns,
    })
}

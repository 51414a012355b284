//! Userscripts: what replicates and how conflicts merge.
//!
//! This module owns the interface the receive pipeline uses ([`Userscript`]) and
//! the configuration a script declares ([`ScriptConfig`]). With no script loaded,
//! every mutation goes to the table its topic names, with plain upserts.
//!
//! The JavaScript engine (QuickJS via rquickjs, TypeScript via oxc) lives in the
//! submodules; nothing here knows SQL beyond what [`ScriptTx`] hands a script.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::changefeed::{Document, Hlc, Mutation};

pub use crate::target::name::{split_ident, TableName};

/// How a table resolves rows that lose compare-and-set.
#[derive(Debug, Clone, PartialEq)]
pub enum MergeKind {
    /// `standardMerge(fallback?)`: three-way merge in Rust; the script's
    /// fallback (if any) is called for rows that do not merge.
    Standard { has_fallback: bool },
    /// A merge function written in the script.
    Custom,
}

/// What a script declared for one target table with `configureTable`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableConfig {
    /// Compare-and-set columns, in comparison order.
    pub cas: Vec<String>,
    /// Columns whose value must be newer than now minus the duration.
    pub deadlines: Vec<(String, Duration)>,
    /// Columns that identify a row for deletes (defaults to the primary key).
    pub delete_key: Vec<String>,
    /// SQL expressions for columns (`$0` is the incoming value).
    pub exprs: BTreeMap<String, String>,
    /// A JSONB column that collects properties with no matching column.
    pub extras: Option<String>,
    /// Columns never written.
    pub ignore: Vec<String>,
    /// True when the table has a `map` function.
    pub has_map: bool,
    /// True when the table has an `apply` function (the script writes rows itself).
    pub has_apply: bool,
    pub merge: Option<MergeKind>,
    /// Largest number of rows per apply call, if limited.
    pub row_limit: Option<usize>,
}

/// What a script declared for a source (the URL's `database.schema`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceConfig {
    /// True when rows go through a `dispatch` function.
    pub has_dispatch: bool,
    /// Where deletes go when dispatching: a table name, or "" for the topic's table.
    pub deletes_to: Option<String>,
    /// `{target}`: every row goes to this table (or schema when it has two parts).
    pub target: Option<String>,
}

/// Everything a script configured when its top level ran.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScriptConfig {
    /// By `database.schema` as the script wrote it (lower-cased).
    pub sources: BTreeMap<String, SourceConfig>,
    /// By table name as the script wrote it; resolve with [`TableName::resolve`].
    pub tables: BTreeMap<String, TableConfig>,
    /// Options set with `setOptions`, by flag name.
    pub options: BTreeMap<String, String>,
}

impl ScriptConfig {
    /// The configuration for `table`, matching any of the names a script may use.
    pub fn table(&self, table: &TableName) -> Option<&TableConfig> {
        self.tables.iter().find_map(|(name, cfg)| {
            TableName::resolve(name, &table.database, &table.schema)
                .ok()
                .filter(|t| t == table)
                .map(|_| cfg)
        })
    }

    /// The configuration for the source at `database.schema`.
    pub fn source(&self, database: &str, schema: &str) -> Option<&SourceConfig> {
        let key = format!("{database}.{schema}");
        self.sources.get(&key)
    }
}

/// A mutation routed to a table by `dispatch` (or by its topic).
#[derive(Debug, Clone, PartialEq)]
pub struct Routed {
    /// Shared by the rows routed to one table (a clone per row would copy
    /// three names).
    pub table: Arc<TableName>,
    pub mutation: Mutation,
}

/// A row that lost compare-and-set, handed to a merge function.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// The row as the source had it before this change (`null` when unknown).
    pub before: Option<Document>,
    /// The row the source proposes (`None` for a delete).
    pub proposed: Option<Document>,
    /// The row stored in the target now.
    pub target: Document,
    /// Properties the standard merge could not reconcile (empty for a custom merge).
    pub unmerged: Vec<String>,
    /// Source time of the proposed change, as `meta.nanos` / `meta.logical`.
    pub nanos: i64,
    pub logical: i32,
}

/// What a merge decided for one conflict.
#[derive(Debug, Clone, PartialEq)]
pub enum MergeOutcome {
    /// Write this row.
    Apply(Document),
    /// Record the proposed change in the DLQ under this name.
    Dlq(String),
    /// Forget the proposed change.
    Drop,
}

/// One operation handed to a script's `apply` function or to `getTX().apply`.
#[derive(Debug, Clone, PartialEq)]
/// `updated` is the change's time: a script passes it on in the op's
/// `meta`, and an op a script made up has none.
pub enum ApplyOp {
    Upsert {
        data: Document,
        before: Option<Document>,
        updated: Option<Hlc>,
    },
    Delete {
        pk: Vec<Value>,
        before: Option<Document>,
        updated: Option<Hlc>,
    },
}

/// A target column as `getTX().columns()` describes it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ColumnInfo {
    pub name: String,
    #[serde(rename = "type")]
    pub sql_type: String,
    pub primary: bool,
    pub ignored: bool,
}

/// The request's database transaction as a script sees it through `getTX()`.
#[async_trait::async_trait]
pub trait ScriptTx: Send {
    /// Runs a statement; returns the number of rows affected.
    async fn exec(&mut self, sql: &str, args: Vec<Value>) -> Result<u64, String>;
    /// Runs a query; returns rows as arrays of JSON values.
    async fn query(&mut self, sql: &str, args: Vec<Value>) -> Result<Vec<Vec<Value>>, String>;
    /// Applies operations to the current table the standard way (CAS, merge, DLQ).
    async fn apply(&mut self, ops: Vec<ApplyOp>) -> Result<(), String>;
    fn columns(&self) -> Vec<ColumnInfo>;
    fn schema(&self) -> String;
    fn table(&self) -> String;
}

/// Why a userscript call failed. Every variant fails only the request at hand.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The script threw or rejected; the message carries `file:line:col`.
    #[error("userscript error: {0}")]
    Exception(String),
    /// The call ran past the per-call time limit.
    #[error("userscript timed out after {0:?}")]
    Timeout(Duration),
    /// The script ran out of its memory limit.
    #[error("userscript ran out of memory: {0}")]
    OutOfMemory(String),
    /// The script returned something the API does not allow.
    #[error("userscript returned an invalid result: {0}")]
    Invalid(String),
    /// A row names no table it can go to (no topic, or a topic that is not
    /// a table name): the sender's mistake, not the script's.
    #[error("{0}")]
    Unroutable(String),
    /// The script does not load (syntax error, missing import): `file:line:col: message`.
    #[error("userscript failed to load: {0}")]
    Load(String),
}

/// Limits a script runs under.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long one call into the script may run.
    pub call_timeout: Duration,
    /// How many bytes the script's heap may use (each runtime's).
    pub memory_bytes: usize,
    /// How many runtimes (threads) serve calls; 0: one per core, at most four.
    pub runtimes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            call_timeout: Duration::from_secs(5),
            memory_bytes: 256 << 20,
            runtimes: 0,
        }
    }
}

/// A loaded userscript, or none. Cheap to clone; safe to call from many requests.
#[derive(Clone, Default)]
pub struct Userscript {
    inner: Option<Arc<engine::Engine>>,
    config: Arc<ScriptConfig>,
}

impl Userscript {
    /// No script: rows go to their topic's table.
    pub fn none() -> Self {
        Userscript::default()
    }

    /// Loads, transpiles and runs the top level of the script at `path`.
    pub fn load(path: &Path, limits: Limits) -> Result<Self, ScriptError> {
        let engine = engine::Engine::load(path, limits)?;
        let config = Arc::new(engine.config().clone());
        Ok(Userscript {
            inner: Some(Arc::new(engine)),
            config,
        })
    }

    /// What the script configured (empty with no script).
    pub fn config(&self) -> &ScriptConfig {
        &self.config
    }

    /// True when a script is loaded.
    pub fn is_loaded(&self) -> bool {
        self.inner.is_some()
    }

    /// Routes a request's mutations to target tables. `database`/`schema` come
    /// from the URL; `default_table` from the URL's third segment, if any.
    /// Sources with a `dispatch` function call it for each row, a batch per
    /// call into the script (a large batch in parts, on several runtimes at
    /// once); others route each mutation to its topic's (or the URL's) table.
    pub async fn dispatch(
        &self,
        database: &str,
        schema: &str,
        default_table: Option<&str>,
        batch: Vec<Mutation>,
    ) -> Result<Vec<Routed>, ScriptError> {
        let source = self.config.source(database, schema);
        if let (Some(engine), Some(src)) = (&self.inner, source) {
            if src.has_dispatch || src.target.is_some() {
                return engine
                    .dispatch(database, schema, default_table, batch)
                    .await;
            }
        }
        route_by_topic(database, schema, default_table, batch)
    }

    /// Applies the table's `map` function, if any, to upserts (one call per batch).
    pub async fn map(
        &self,
        table: &TableName,
        batch: Vec<Mutation>,
    ) -> Result<Vec<Mutation>, ScriptError> {
        match (&self.inner, self.config.table(table)) {
            (Some(engine), Some(cfg)) if cfg.has_map => engine.map(table, batch).await,
            _ => Ok(batch),
        }
    }

    /// Resolves conflicts with the table's merge function (custom) or the
    /// standard merge's fallback, one outcome per conflict, in order.
    pub async fn merge(
        &self,
        table: &TableName,
        conflicts: Vec<Conflict>,
    ) -> Result<Vec<MergeOutcome>, ScriptError> {
        match &self.inner {
            Some(engine) => engine.merge(table, conflicts).await,
            None => Err(ScriptError::Invalid(format!(
                "table {table} has no merge function"
            ))),
        }
    }

    /// Calls the table's `apply` function with `ops`, servicing its `getTX()`
    /// calls through `tx`, until the returned promise settles.
    pub async fn apply(
        &self,
        table: &TableName,
        ops: Vec<ApplyOp>,
        tx: &mut dyn ScriptTx,
    ) -> Result<(), ScriptError> {
        match &self.inner {
            Some(engine) => engine.apply(table, ops, tx).await,
            None => Err(ScriptError::Invalid(format!(
                "table {table} has no apply function"
            ))),
        }
    }
}

/// Routes each mutation to the table its topic names (or the URL's table).
pub fn route_by_topic(
    database: &str,
    schema: &str,
    default_table: Option<&str>,
    batch: Vec<Mutation>,
) -> Result<Vec<Routed>, ScriptError> {
    let mut names = TableNames::new(database, schema);
    batch
        .into_iter()
        .map(|m| {
            let table = names.topic(default_table, &m)?;
            Ok(Routed { table, mutation: m })
        })
        .collect()
}

/// The table a mutation names: the URL's, else its topic.
fn topic_of<'a>(default_table: Option<&'a str>, m: &'a Mutation) -> Result<&'a str, ScriptError> {
    default_table.or(m.topic.as_deref()).ok_or_else(|| {
        ScriptError::Unroutable(
            "payload has no topic and the URL names no table; POST to /{database}/{schema}/{table}"
                .to_string(),
        )
    })
}

/// Table names resolved against one database and schema, each distinct name
/// once per request (a batch names few tables), so that the rows routed to
/// one table share its name.
struct TableNames<'a> {
    database: &'a str,
    schema: &'a str,
    seen: Vec<(String, Arc<TableName>)>,
}

impl<'a> TableNames<'a> {
    fn new(database: &'a str, schema: &'a str) -> Self {
        TableNames {
            database,
            schema,
            seen: Vec::new(),
        }
    }

    /// The table a name the script gave resolves to.
    fn get(&mut self, name: &str) -> Result<Arc<TableName>, ScriptError> {
        self.resolve(name).map_err(ScriptError::Invalid)
    }

    /// The table a mutation's topic (or the URL) names.
    fn topic(
        &mut self,
        default_table: Option<&str>,
        m: &Mutation,
    ) -> Result<Arc<TableName>, ScriptError> {
        let name = topic_of(default_table, m)?;
        self.resolve(name)
            .map_err(|e| ScriptError::Unroutable(format!("topic {name:?}: {e}")))
    }

    fn resolve(&mut self, name: &str) -> Result<Arc<TableName>, String> {
        if let Some((_, t)) = self.seen.iter().rev().find(|(n, _)| n == name) {
            return Ok(t.clone());
        }
        let t = Arc::new(TableName::resolve(name, self.database, self.schema)?);
        self.seen.push((name.to_string(), t.clone()));
        Ok(t)
    }
}

/// The `.d.ts` describing the userscript API (`meridian userscript --api`).
pub const API_DTS: &str = include_str!("../../userscripts/meridian.d.ts");

mod alloc;
mod check;
mod console_guard;
pub(crate) mod engine;
mod flat;
mod readonly_params;
mod runtime;
mod transpile;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_table_names() {
        let t = TableName::resolve("kv", "kv", "public").unwrap();
        assert_eq!(t, TableName::new("kv", "public", "kv"));
        let t = TableName::resolve("other.t", "kv", "public").unwrap();
        assert_eq!(t, TableName::new("kv", "other", "t"));
        let t = TableName::resolve("KV.public.\"My.Table\"", "x", "y").unwrap();
        assert_eq!(t, TableName::new("kv", "public", "My.Table"));
        assert!(TableName::resolve("a..b", "x", "y").is_err());
        assert!(TableName::resolve("a.b.c.d", "x", "y").is_err());
    }
}

/// Flags of `meridian userscript`.
#[derive(Debug, Clone, clap::Args)]
pub struct UserscriptArgs {
    /// Print the TypeScript declarations of the userscript API.
    #[arg(long = "api")]
    pub api: bool,
    /// Load this script, run its top level and print what it configured.
    #[arg(long = "check")]
    pub check: Option<std::path::PathBuf>,
}

/// Runs `meridian userscript`: `--api` prints the declarations, `--check`
/// loads a script and prints its configuration.
pub fn run_command(args: UserscriptArgs) -> anyhow::Result<()> {
    if args.api {
        print!("{API_DTS}");
        return Ok(());
    }
    match args.check {
        Some(path) => {
            let script = Userscript::load(&path, Limits::default())?;
            print!(
                "{}",
                check::summary(&path.display().to_string(), script.config())
            );
            Ok(())
        }
        None => anyhow::bail!("nothing to do: pass --api or --check <script>"),
    }
}

#[cfg(test)]
mod tests_engine;

//! The target database: connection pools (one per database a request names),
//! schema introspection, value conversion, the one path that builds apply SQL
//! (compare-and-set upserts and deletes), the three-way merge and the DLQ.
//! Nothing here knows about HTTP or userscripts.

pub mod apply;
pub mod convert;
pub mod merge;
pub mod name;
pub mod schema;
pub mod sql;

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;

pub use apply::{Loser, TableBatch};
pub use schema::{SchemaCache, TableSchema};

/// Why applying to the target failed. [`TargetError::is_transient`] tells a
/// failure worth retrying (HTTP 503) from input that will never apply (400).
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("unknown table {0}")]
    UnknownTable(String),
    #[error("table {0} has no primary key")]
    NoPrimaryKey(String),
    #[error("table {table}: unknown column {column:?}")]
    UnknownColumn { table: String, column: String },
    #[error("table {table}: {source}")]
    Convert {
        table: String,
        // Boxed: keeps every Result carrying this error small.
        source: Box<convert::ConvertError>,
    },
    #[error("table {table}: row has no value for primary-key column {column:?}")]
    MissingKey { table: String, column: String },
    #[error(
        "table {table}: deadline column {column:?} has a value that is not a timestamp: {value}"
    )]
    BadDeadline {
        table: String,
        column: String,
        value: String,
    },
    #[error("DLQ table {table} does not exist; create it with:\n{create}")]
    MissingDlq { table: String, create: String },
    #[error("table {table}: conflict on key {key} could not be merged (unmerged columns: {columns}) and the merge has no fallback")]
    Unmerged {
        table: String,
        key: String,
        columns: String,
    },
    #[error("database {database:?} does not exist on the target")]
    UnknownDatabase { database: String },
    #[error("target database error{}: {message}", code.as_ref().map(|c| format!(" {c}")).unwrap_or_default())]
    Database {
        code: Option<String>,
        message: String,
        transient: bool,
    },
    #[error("target database unavailable: {0}")]
    Unavailable(String),
    #[error("apply timed out after {0:?}")]
    Timeout(Duration),
}

impl TargetError {
    /// A row that gives no value for `schema`'s key column `column`.
    pub fn missing_key(schema: &TableSchema, column: usize) -> Self {
        TargetError::MissingKey {
            table: schema.name.to_string(),
            column: schema.columns[column].name.clone(),
        }
    }

    /// Classifies a driver error by SQLSTATE: connection loss, serialization
    /// failures, deadlocks, cancels (statement timeout), resource exhaustion
    /// and foreign keys whose parent may yet arrive are worth retrying.
    pub fn db(e: tokio_postgres::Error) -> Self {
        let Some(db) = e.as_db_error() else {
            return TargetError::Unavailable(e.to_string());
        };
        let code = db.code();
        let class = &code.code()[..2];
        let transient = matches!(class, "08" | "40" | "53" | "57" | "58")
            || *code == SqlState::FOREIGN_KEY_VIOLATION
            || *code == SqlState::LOCK_NOT_AVAILABLE;
        let mut message = db.message().to_string();
        if let Some(d) = db.detail() {
            message.push_str(": ");
            message.push_str(d);
        }
        if let Some(c) = db.column() {
            message.push_str(&format!(" (column {c})"));
        }
        TargetError::Database {
            code: Some(code.code().to_string()),
            message,
            transient,
        }
    }

    /// True when the same request may succeed later.
    pub fn is_transient(&self) -> bool {
        match self {
            TargetError::Database { transient, .. } => *transient,
            TargetError::Unavailable(_) | TargetError::Timeout(_) => true,
            _ => false,
        }
    }

    /// The SQLSTATE of a database error, if any.
    pub fn code(&self) -> Option<&str> {
        match self {
            TargetError::Database { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// Where and how rows are applied.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// Connection string; its database is the default.
    pub conn: String,
    pub dlq_table: String,
    pub max_pool_size: usize,
    pub apply_timeout: Duration,
}

/// The target: pools by database name and the schema cache.
pub struct Target {
    base: tokio_postgres::Config,
    default_db: String,
    pools: Mutex<HashMap<String, Pool>>,
    known_schemas: Mutex<std::collections::HashSet<(String, String)>>,
    pub schemas: SchemaCache,
    pub options: TargetOptions,
}

impl Target {
    pub fn new(options: TargetOptions) -> Result<Self, TargetError> {
        let base: tokio_postgres::Config = options
            .conn
            .parse()
            .map_err(|e| TargetError::Unavailable(format!("invalid --targetConn: {e}")))?;
        let default_db = base
            .get_dbname()
            .map(str::to_string)
            .or_else(|| base.get_user().map(str::to_string))
            .unwrap_or_else(|| "postgres".to_string());
        Ok(Target {
            base,
            default_db,
            pools: Mutex::new(HashMap::new()),
            known_schemas: Mutex::new(Default::default()),
            schemas: SchemaCache::default(),
            options,
        })
    }

    /// The database `--targetConn` names.
    pub fn default_database(&self) -> &str {
        &self.default_db
    }

    /// The pool for `database`, created on first use.
    pub fn pool(&self, database: &str) -> Pool {
        let mut pools = self.pools.lock().unwrap();
        if let Some(p) = pools.get(database) {
            return p.clone();
        }
        let mut cfg = self.base.clone();
        cfg.dbname(database);
        cfg.application_name("meridian");
        // Every session in these pools is meridian's: mark it once at connect
        // (the stamping trigger of sql/postgres/setup.sql then leaves
        // _source/_timestamp as they came) and bound each statement by the
        // apply timeout, instead of two extra round trips per request.
        let timeout_ms = self.options.apply_timeout.as_millis().max(1);
        let mut opts = format!("-c meridian.applying=on -c statement_timeout={timeout_ms}");
        if let Some(user) = self.base.get_options() {
            opts = format!("{user} {opts}");
        }
        cfg.options(opts);
        let mgr = Manager::from_config(
            cfg,
            tokio_postgres::NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(self.options.max_pool_size)
            .wait_timeout(Some(self.options.apply_timeout))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .expect("pool config is valid");
        pools.insert(database.to_string(), pool.clone());
        pool
    }

    /// A connection to `database`.
    pub async fn connect(&self, database: &str) -> Result<deadpool_postgres::Object, TargetError> {
        self.pool(database).get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => {
                if e.as_db_error().map(|d| d.code()) == Some(&SqlState::INVALID_CATALOG_NAME) {
                    TargetError::UnknownDatabase {
                        database: database.to_string(),
                    }
                } else {
                    TargetError::db(e)
                }
            }
            deadpool_postgres::PoolError::Timeout(_) => TargetError::Unavailable(format!(
                "no connection to {database} within the apply timeout"
            )),
            other => TargetError::Unavailable(other.to_string()),
        })
    }

    /// True when `schema` exists in `database` (positive answers are cached).
    pub async fn schema_exists(&self, database: &str, schema: &str) -> Result<bool, TargetError> {
        let key = (database.to_string(), schema.to_string());
        if self.known_schemas.lock().unwrap().contains(&key) {
            return Ok(true);
        }
        let c = self.connect(database).await?;
        let found = c
            .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&schema])
            .await
            .map_err(TargetError::db)?
            .is_some();
        if found {
            self.known_schemas.lock().unwrap().insert(key);
        }
        Ok(found)
    }

    /// Pool use across databases: (size, available, waiting).
    pub fn pool_status(&self) -> (usize, usize, usize) {
        let pools = self.pools.lock().unwrap();
        pools.values().fold((0, 0, 0), |(s, a, w), p| {
            let st = p.status();
            (s + st.size, a + st.available, w + st.waiting)
        })
    }

    /// True while the default database answers a query.
    pub async fn healthy(&self) -> Result<(), TargetError> {
        let c = self.connect(&self.default_db).await?;
        c.simple_query("SELECT 1").await.map_err(TargetError::db)?;
        Ok(())
    }
}

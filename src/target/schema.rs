//! Target schema introspection: columns in order, their types, nullability,
//! defaults, generated and identity columns, and the primary key in key order.
//! Cached per table and re-read when a statement meets a column it does not know.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio_postgres::GenericClient;

use super::convert::Wire;
use super::name::TableName;
use super::TargetError;

/// How a column's JSON values are checked and turned into SQL input text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Integer,
    /// numeric, real, double precision: exact text passes through.
    Number,
    Bool,
    Json,
    Bytea,
    Uuid,
    Array,
    /// text, varchar, timestamps, dates, enums and everything else PostgreSQL
    /// parses from text.
    Text,
}

/// One column of a target table.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// The SQL type as `format_type` prints it (`bigint`, `numeric(10,2)`, `text[]`).
    pub sql_type: String,
    pub kind: Kind,
    /// How its values travel to the server.
    pub wire: Wire,
    pub not_null: bool,
    pub has_default: bool,
    /// A `GENERATED ALWAYS AS (…) STORED` column: never written.
    pub generated: bool,
    /// An identity column (`GENERATED … AS IDENTITY`).
    pub identity: bool,
    /// `GENERATED ALWAYS AS IDENTITY`: an insert may set it (OVERRIDING
    /// SYSTEM VALUE), an update may not.
    pub always_identity: bool,
    /// Position in the primary key (0-based), if part of it.
    pub pk_position: Option<usize>,
}

/// A target table's shape.
#[derive(Debug, Clone)]
pub struct TableSchema {
    pub name: TableName,
    pub columns: Vec<Column>,
    /// Indexes into `columns`, in primary-key order.
    pub pk: Vec<usize>,
    /// Wide tables: column indexes by name (a scan is faster for a few).
    by_name: Option<foldhash::HashMap<String, usize>>,
}

/// Tables with more columns than this find them by name through a map.
const SCAN_UP_TO: usize = 16;

impl TableSchema {
    pub fn new(name: TableName, columns: Vec<Column>, pk: Vec<usize>) -> Self {
        let by_name = (columns.len() > SCAN_UP_TO).then(|| {
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), i))
                .collect()
        });
        TableSchema {
            name,
            columns,
            pk,
            by_name,
        }
    }

    pub fn column(&self, name: &str) -> Option<(usize, &Column)> {
        match &self.by_name {
            Some(m) => m.get(name).map(|&i| (i, &self.columns[i])),
            None => self
                .columns
                .iter()
                .enumerate()
                .find(|(_, c)| c.name == name),
        }
    }

    pub fn pk_columns(&self) -> impl Iterator<Item = &Column> {
        self.pk.iter().map(|&i| &self.columns[i])
    }
}

/// How a column of type `typname` (`pg_type.typname`, in `pg_type`
/// `category`) checks JSON values, and how its values travel. numeric
/// travels as text (every digit kept by the server's own input function),
/// and so do json and jsonb, whose binary input is the same JSON parse;
/// oid is checked as an integer but travels as text.
fn types_of(typname: &str, category: &str) -> (Kind, Wire) {
    match typname {
        "int2" => (Kind::Integer, Wire::Int2),
        "int4" => (Kind::Integer, Wire::Int4),
        "int8" => (Kind::Integer, Wire::Int8),
        "oid" => (Kind::Integer, Wire::Text),
        "numeric" => (Kind::Number, Wire::Text),
        "float4" => (Kind::Number, Wire::Float4),
        "float8" => (Kind::Number, Wire::Float8),
        "bool" => (Kind::Bool, Wire::Bool),
        "json" | "jsonb" => (Kind::Json, Wire::Text),
        "bytea" => (Kind::Bytea, Wire::Bytea),
        "uuid" => (Kind::Uuid, Wire::Uuid),
        "timestamptz" => (Kind::Text, Wire::Timestamptz),
        "timestamp" => (Kind::Text, Wire::Timestamp),
        _ if category == "A" => (Kind::Array, Wire::Text),
        _ => (Kind::Text, Wire::Text),
    }
}

const INTROSPECT: &str = "
SELECT a.attname::text,
       format_type(a.atttypid, a.atttypmod),
       t.typname::text,
       t.typcategory::text,
       a.attnotnull,
       a.atthasdef,
       a.attgenerated <> '',
       a.attidentity <> '',
       a.attidentity = 'a',
       (SELECT k.ord::int4
          FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(att, ord)
         WHERE i.indrelid = c.oid AND i.indisprimary AND k.att = a.attnum)
  FROM pg_attribute a
  JOIN pg_class c ON c.oid = a.attrelid
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_type t ON t.oid = a.atttypid
 WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')
   AND a.attnum > 0 AND NOT a.attisdropped
 ORDER BY a.attnum";

/// Reads a table's schema from the catalog.
pub async fn introspect(
    client: &impl GenericClient,
    name: &TableName,
) -> Result<TableSchema, TargetError> {
    let rows = client
        .query(INTROSPECT, &[&name.schema, &name.table])
        .await
        .map_err(TargetError::db)?;
    if rows.is_empty() {
        return Err(TargetError::UnknownTable(name.to_string()));
    }
    let mut columns = Vec::with_capacity(rows.len());
    for r in rows {
        let pk: Option<i32> = r.get(9);
        let (kind, wire) = types_of(r.get(2), r.get(3));
        columns.push(Column {
            name: r.get(0),
            sql_type: r.get(1),
            kind,
            wire,
            not_null: r.get(4),
            has_default: r.get(5),
            generated: r.get(6),
            identity: r.get(7),
            always_identity: r.get(8),
            pk_position: pk.map(|p| p as usize - 1),
        });
    }
    let mut pk: Vec<usize> = (0..columns.len())
        .filter(|&i| columns[i].pk_position.is_some())
        .collect();
    pk.sort_by_key(|&i| columns[i].pk_position);
    if pk.is_empty() {
        return Err(TargetError::NoPrimaryKey(name.to_string()));
    }
    Ok(TableSchema::new(name.clone(), columns, pk))
}

/// Table schemas by name, shared by every request.
#[derive(Default)]
pub struct SchemaCache {
    tables: RwLock<HashMap<TableName, Arc<TableSchema>>>,
}

impl SchemaCache {
    /// The cached schema, read from the catalog on first use.
    pub async fn get(
        &self,
        client: &impl GenericClient,
        name: &TableName,
    ) -> Result<Arc<TableSchema>, TargetError> {
        if let Some(s) = self.tables.read().unwrap().get(name) {
            return Ok(s.clone());
        }
        self.refresh(client, name).await
    }

    /// Reads the schema again (after a schema change).
    pub async fn refresh(
        &self,
        client: &impl GenericClient,
        name: &TableName,
    ) -> Result<Arc<TableSchema>, TargetError> {
        let s = Arc::new(introspect(client, name).await?);
        self.tables.write().unwrap().insert(name.clone(), s.clone());
        Ok(s)
    }

    /// True when the table's schema has been read (it exists).
    pub fn contains(&self, name: &TableName) -> bool {
        self.tables.read().unwrap().contains_key(name)
    }

    /// Forgets a table so the next use reads it again.
    pub fn invalidate(&self, name: &TableName) {
        self.tables.write().unwrap().remove(name);
    }
}

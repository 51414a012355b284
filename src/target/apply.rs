//! The one path that builds and runs apply SQL.
//!
//! Rows travel as one array per column through `unnest` (typed binary arrays
//! for the common types, `text[]` for the rest; see [`Values`]) and are cast
//! to the column types on the server: one statement per table, kind and set
//! of array types, however many rows, with no bind-parameter ceiling.
//! Compare-and-set is a single statement
//! (`INSERT … ON CONFLICT … DO UPDATE … WHERE cas > stored`) that locks and
//! re-checks the stored row, so a concurrent local write cannot slip between
//! the check and the write; rows the statement did not write are returned as
//! losers.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use deadpool_postgres::Transaction;
use serde_json::Value;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;

use super::convert::{to_sql, ConvertError, Values};
use super::schema::{Column, TableSchema};
use super::sql::quote_ident;
use super::TargetError;
use crate::changefeed::Document;

/// How documents map onto columns (from the userscript's `configureTable`).
#[derive(Debug, Clone, Default)]
pub struct WriteRules {
    /// Properties never written.
    pub ignore: Vec<String>,
    /// A JSONB column collecting properties that match no column.
    pub extras: Option<String>,
    /// SQL expressions by column; `$0` is the incoming value.
    pub exprs: BTreeMap<String, String>,
}

/// Rows for one table sharing one set of columns, column-major. Values
/// borrow from the documents they came from where they can.
#[derive(Debug, Clone)]
pub struct TableBatch<'a> {
    /// The caller's index of each row.
    pub ords: Vec<usize>,
    /// Indexes into the schema's columns, in table order.
    pub columns: Vec<usize>,
    /// `values[c]`: column `c`'s values, one per row.
    pub values: Vec<Values<'a>>,
}

impl TableBatch<'_> {
    pub fn len(&self) -> usize {
        self.ords.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ords.is_empty()
    }

    /// The column arrays as statement parameters, in column order.
    pub fn params(&self) -> impl Iterator<Item = &(dyn ToSql + Sync)> + '_ {
        self.values.iter().map(Values::as_param)
    }
}

/// Empty arrays for `columns`, each typed as its column's values travel,
/// with room for `rows` values.
pub fn empty_values<'a>(schema: &TableSchema, columns: &[usize], rows: usize) -> Vec<Values<'a>> {
    columns
        .iter()
        .map(|&c| Values::new(schema.columns[c].wire, rows))
        .collect()
}

/// `v` as input text for column `col` of `schema`'s table (None is NULL);
/// an error names the table, the column and the value.
pub fn convert<'a>(
    schema: &TableSchema,
    col: &Column,
    v: &'a Value,
) -> Result<Option<Cow<'a, str>>, TargetError> {
    to_sql(col, v).map_err(|source| TargetError::Convert {
        table: schema.name.to_string(),
        source: Box::new(source),
    })
}

/// Reads a document's properties as column values: ignored properties
/// skipped, generated columns left out, unknown properties collected into
/// the `extras` column. A reader for writing (`only: None`) reads every
/// property, and one matching no column (without `extras`) is an error; a
/// reader for comparing reads only the columns `only` marks and leaves the
/// rest out.
struct RowReader<'s> {
    schema: &'s TableSchema,
    rules: &'s WriteRules,
    /// By column index: the columns to read (`None`: all, strictly).
    only: Option<Vec<bool>>,
    /// The same columns in column order, read directly by name when no
    /// extras column is among them (a CAS compare reads one or two columns
    /// of rows that may have many).
    only_cols: Option<Vec<usize>>,
    extras: Option<usize>,
}

/// One row's values, by column index, in column order.
type RowValues<'a> = Vec<(usize, Option<Cow<'a, str>>)>;

impl<'s> RowReader<'s> {
    fn new(
        schema: &'s TableSchema,
        rules: &'s WriteRules,
        only: Option<&[usize]>,
    ) -> Result<Self, TargetError> {
        let extras = match &rules.extras {
            Some(name) => Some(schema.column(name).map(|(i, _)| i).ok_or_else(|| {
                TargetError::UnknownColumn {
                    table: schema.name.to_string(),
                    column: name.clone(),
                }
            })?),
            None => None,
        };
        let only = only.map(|cols| {
            let mut mask = vec![false; schema.columns.len()];
            for &c in cols {
                mask[c] = true;
            }
            mask
        });
        // Extras are gathered only when their column is read.
        let extras = extras.filter(|&i| only.as_ref().is_none_or(|m| m[i]));
        // Generated and ignored columns are never written: left out once.
        let only_cols = only.as_ref().map(|m| {
            m.iter()
                .enumerate()
                .filter(|&(i, &read)| {
                    let col = &schema.columns[i];
                    read && !col.generated && !rules.ignore.contains(&col.name)
                })
                .map(|(i, _)| i)
                .collect()
        });
        Ok(RowReader {
            schema,
            rules,
            only,
            only_cols,
            extras,
        })
    }

    /// Replaces `row` with `doc`'s values.
    fn read<'a>(&self, doc: &'a Document, row: &mut RowValues<'a>) -> Result<(), TargetError> {
        let schema = self.schema;
        row.clear();
        if let (Some(cols), None) = (&self.only_cols, self.extras) {
            for &i in cols {
                let col = &schema.columns[i];
                if let Some(value) = doc.get(&col.name) {
                    row.push((i, convert(schema, col, value)?));
                }
            }
            return Ok(());
        }
        let mut extras = serde_json::Map::new();
        for (prop, value) in doc {
            if self.rules.ignore.iter().any(|i| i == prop) {
                continue;
            }
            match self.schema.column(prop) {
                Some((_, col)) if col.generated => continue,
                Some((i, _)) if self.only.as_ref().is_some_and(|m| !m[i]) => continue,
                Some((i, col)) => row.push((i, convert(schema, col, value)?)),
                None if self.extras.is_some() => {
                    extras.insert(prop.clone(), value.clone());
                }
                None if self.only.is_some() => {}
                None => {
                    return Err(TargetError::UnknownColumn {
                        table: schema.name.to_string(),
                        column: prop.clone(),
                    })
                }
            }
        }
        if let Some(i) = self.extras {
            if !extras.is_empty() {
                row.retain(|(c, _)| *c != i);
                row.push((i, Some(Cow::Owned(Value::Object(extras).to_string()))));
            }
        }
        row.sort_by_key(|(i, _)| *i);
        Ok(())
    }
}

/// Converts documents into batches, one per distinct set of columns (a
/// changefeed sends every column, so there is normally one). Unknown
/// properties are an error unless ignored or collected into `extras`.
pub fn prepare<'a>(
    schema: &TableSchema,
    docs: &[(usize, &'a Document)],
    rules: &WriteRules,
) -> Result<Vec<TableBatch<'a>>, TargetError> {
    let reader = RowReader::new(schema, rules, None)?;
    let mut groups: Vec<TableBatch<'a>> = Vec::new();
    let mut by_cols: HashMap<Vec<usize>, usize> = HashMap::new();
    let mut last_group = usize::MAX;
    let mut row: RowValues<'a> = Vec::new();
    for &(ord, doc) in docs {
        reader.read(doc, &mut row)?;
        for &pk in &schema.pk {
            if !row.iter().any(|(i, v)| *i == pk && v.is_some()) {
                return Err(TargetError::missing_key(schema, pk));
            }
        }
        // Rows of one batch nearly always share the previous row's columns.
        let same_as_last = groups
            .get(last_group)
            .is_some_and(|g| g.columns.iter().copied().eq(row.iter().map(|(i, _)| *i)));
        if !same_as_last {
            let cols: Vec<usize> = row.iter().map(|(i, _)| *i).collect();
            last_group = *by_cols.entry(cols.clone()).or_insert_with(|| {
                groups.push(TableBatch {
                    ords: Vec::with_capacity(docs.len()),
                    values: empty_values(schema, &cols, docs.len()),
                    columns: cols,
                });
                groups.len() - 1
            });
        }
        let batch = &mut groups[last_group];
        batch.ords.push(ord);
        for (c, (_, v)) in row.drain(..).enumerate() {
            batch.values[c].push(v);
        }
    }
    Ok(groups)
}

/// Converts documents (`None`: no row) into one batch over `columns`, read
/// as [`prepare`] reads them; a column a document lacks is NULL. With
/// `present_only`, the batch keeps only the columns some document has.
/// Also returns which documents were present. These rows are compared, not
/// written: a property that matches no column is left out, not an error.
pub fn batch_for_columns<'a>(
    schema: &TableSchema,
    docs: &[(usize, Option<&'a Document>)],
    columns: &[usize],
    rules: &WriteRules,
    present_only: bool,
) -> Result<(TableBatch<'a>, Vec<bool>), TargetError> {
    let reader = RowReader::new(schema, rules, Some(columns))?;
    let mut values = empty_values(schema, columns, docs.len());
    let mut present = vec![false; columns.len()];
    let mut row: RowValues<'a> = Vec::new();
    for (_, doc) in docs {
        row.clear();
        if let Some(doc) = doc {
            reader.read(doc, &mut row)?;
        }
        for (n, &c) in columns.iter().enumerate() {
            // `read` leaves a row sorted by column.
            let v = match row.binary_search_by_key(&c, |(i, _)| *i) {
                Ok(k) => {
                    present[n] = true;
                    row[k].1.take()
                }
                Err(_) => None,
            };
            values[n].push(v);
        }
    }
    // A column no row has is left out (all its values are NULL).
    let (columns, values): (Vec<usize>, Vec<Values<'a>>) = if present_only {
        columns
            .iter()
            .copied()
            .zip(values)
            .zip(&present)
            .filter_map(|(cv, &p)| p.then_some(cv))
            .unzip()
    } else {
        (columns.to_vec(), values)
    };
    Ok((
        TableBatch {
            ords: docs.iter().map(|(i, _)| *i).collect(),
            columns,
            values,
        },
        docs.iter().map(|(_, d)| d.is_some()).collect(),
    ))
}

/// One row's key values, borrowed from its mutation (nearly every key has
/// one or two columns).
pub type KeyValues<'a> = smallvec::SmallVec<[&'a Value; 2]>;

/// Builds the batch of key values that identifies rows: over the primary
/// key, or over the columns a table's `deleteKey` names.
pub fn prepare_keys<'a>(
    schema: &TableSchema,
    keys: &[(usize, KeyValues<'a>)],
    columns: &[usize],
) -> Result<TableBatch<'a>, TargetError> {
    let mut values = empty_values(schema, columns, keys.len());
    for (_, key) in keys {
        if key.len() != columns.len() {
            return Err(TargetError::missing_key(
                schema,
                columns[key.len().min(columns.len() - 1)],
            ));
        }
        for (k, &c) in columns.iter().enumerate() {
            let col = &schema.columns[c];
            let text = convert(schema, col, key[k])?;
            if text.is_none() {
                return Err(TargetError::missing_key(schema, c));
            }
            values[k].push(text);
        }
    }
    Ok(TableBatch {
        ords: keys.iter().map(|(o, _)| *o).collect(),
        columns: columns.to_vec(),
        values,
    })
}

fn table_ref(schema: &TableSchema) -> String {
    format!(
        "{}.{}",
        quote_ident(&schema.name.schema),
        quote_ident(&schema.name.table)
    )
}

/// The arrays `$2::int8[], $3::text[], …` for `batch`'s columns (parameters
/// numbered from `first_param`, typed as its values travel) and the typed
/// values `(u.c0)::bigint, …` over the aliases `u.c0, u.c1, …` (see
/// [`select_list`]). The cast is a no-op for a typed array and the server's
/// input function for a text one.
fn unnest_source(
    schema: &TableSchema,
    batch: &TableBatch,
    rules: &WriteRules,
    prefix: &str,
    first_param: usize,
) -> (Vec<String>, Vec<String>) {
    let mut arrays = Vec::new();
    let mut select = Vec::new();
    for (n, &ci) in batch.columns.iter().enumerate() {
        let col = &schema.columns[ci];
        arrays.push(format!(
            "${}::{}",
            first_param + n,
            batch.values[n].array_type()
        ));
        let raw = format!("(u.{prefix}{n})::{}", col.sql_type);
        let value = match rules.exprs.get(&col.name) {
            Some(expr) => format!("({})::{}", expr.replace("$0", &raw), col.sql_type),
            None => raw,
        };
        select.push(value);
    }
    (arrays, select)
}

/// `values` (from [`unnest_source`]) named by `batch`'s columns:
/// `(u.c0)::bigint AS "k", …`.
fn select_list(schema: &TableSchema, batch: &TableBatch, values: &[String]) -> String {
    values
        .iter()
        .zip(&batch.columns)
        .map(|(v, &c)| format!("{v} AS {}", quote_ident(&schema.columns[c].name)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn aliases(prefix: &str, n: usize) -> String {
    (0..n).map(|i| format!(", {prefix}{i}")).collect()
}

fn columns_match(schema: &TableSchema, columns: &[usize], left: &str, right: &str) -> String {
    columns
        .iter()
        .map(|&c| {
            let q = quote_ident(&schema.columns[c].name);
            format!("{left}.{q} = {right}.{q}")
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// `alias."a", alias."b"` for `cols`.
fn qualified(schema: &TableSchema, alias: &str, cols: &[usize]) -> String {
    cols.iter()
        .map(|&i| format!("{alias}.{}", quote_ident(&schema.columns[i].name)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn tuple(schema: &TableSchema, alias: &str, cols: &[usize]) -> String {
    format!("ROW({})", qualified(schema, alias, cols))
}

/// The stored row `cur` was never stamped (its first CAS column is NULL):
/// any replicated version may overwrite or delete it.
fn unstamped(schema: &TableSchema, cas: &[usize]) -> String {
    format!("cur.{} IS NULL", quote_ident(&schema.columns[cas[0]].name))
}

/// The upsert statement for `batch`'s columns. With `cas`, a row is written
/// only when no row has its key or its CAS tuple is strictly greater than the
/// stored one; the statement's row count then tells whether any row lost.
pub fn upsert_sql(
    schema: &TableSchema,
    batch: &TableBatch,
    cas: &[usize],
    rules: &WriteRules,
) -> String {
    let columns = &batch.columns;
    let (arrays, select) = unnest_source(schema, batch, rules, "c", 1);
    let names: Vec<String> = columns
        .iter()
        .map(|&i| quote_ident(&schema.columns[i].name))
        .collect();
    let pk: Vec<String> = schema.pk_columns().map(|c| quote_ident(&c.name)).collect();
    let updates: Vec<String> = columns
        .iter()
        .filter(|&&i| {
            let col = &schema.columns[i];
            col.pk_position.is_none() && !col.always_identity
        })
        .map(|&i| {
            let q = quote_ident(&schema.columns[i].name);
            format!("{q} = excluded.{q}")
        })
        .collect();
    let overriding = if columns.iter().any(|&i| schema.columns[i].identity) {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    let mut sql = format!(
        "INSERT INTO {} AS cur ({}){overriding} SELECT {} FROM unnest({}) AS u({}) ON CONFLICT ({}) ",
        table_ref(schema),
        names.join(", "),
        select_list(schema, batch, &select),
        arrays.join(", "),
        aliases("c", columns.len()).trim_start_matches(", "),
        pk.join(", "),
    );
    if updates.is_empty() {
        sql.push_str("DO NOTHING");
    } else {
        let _ = write!(sql, "DO UPDATE SET {}", updates.join(", "));
        if !cas.is_empty() {
            let _ = write!(
                sql,
                " WHERE {} > {} OR {}",
                tuple(schema, "excluded", cas),
                tuple(schema, "cur", cas),
                unstamped(schema, cas)
            );
        }
    }
    sql
}

/// Finds the rows of a batch that the upsert did not write: those whose
/// stored row differs from the proposed one on any written column. The
/// upsert locked every conflicting row, so the stored rows cannot change
/// between the two statements.
fn losers_sql(schema: &TableSchema, batch: &TableBatch, rules: &WriteRules) -> String {
    let columns = &batch.columns;
    let (arrays, select) = unnest_source(schema, batch, rules, "c", 2);
    let comparable = |alias: &str| -> String {
        let parts: Vec<String> = columns
            .iter()
            .map(|&i| {
                let col = &schema.columns[i];
                let q = format!("{alias}.{}", quote_ident(&col.name));
                // json has no equality operator; compare its jsonb form.
                if col.sql_type == "json" {
                    format!("{q}::jsonb")
                } else {
                    q
                }
            })
            .collect();
        format!("ROW({})", parts.join(", "))
    };
    format!(
        "WITH u AS (SELECT u.mrd_o, {} FROM unnest($1::int4[], {}) AS u(mrd_o{})) \
         SELECT u.mrd_o FROM u JOIN {} AS cur ON {} WHERE {} IS DISTINCT FROM {}",
        select_list(schema, batch, &select),
        arrays.join(", "),
        aliases("c", columns.len()),
        table_ref(schema),
        columns_match(schema, &schema.pk, "cur", "u"),
        comparable("cur"),
        comparable("u"),
    )
}

#[allow(clippy::ptr_arg)] // ToSql is implemented for Vec<T>, not [T].
fn params<'a>(ords: &'a Vec<i32>, batch: &'a TableBatch) -> Vec<&'a (dyn ToSql + Sync)> {
    let mut p: Vec<&(dyn ToSql + Sync)> = vec![ords];
    p.extend(batch.params());
    p
}

/// What an upsert did.
#[derive(Debug, Default)]
pub struct Upserted {
    /// Rows inserted or updated.
    pub written: u64,
    /// Caller ordinals of rows that lost to a different stored row.
    pub losers: Vec<usize>,
}

/// Upserts `batch`; with CAS columns, also finds the rows that lost to the
/// stored row. `cas` must be a subset of `batch.columns`.
pub async fn upsert(
    tx: &Transaction<'_>,
    schema: &TableSchema,
    batch: &TableBatch<'_>,
    cas: &[usize],
    rules: &WriteRules,
) -> Result<Upserted, TargetError> {
    let sql = upsert_sql(schema, batch, cas, rules);
    let values: Vec<&(dyn ToSql + Sync)> = batch.params().collect();
    let stmt = tx.prepare_cached(&sql).await.map_err(TargetError::db)?;
    let written = tx
        .execute(&stmt, &values)
        .await
        .map_err(|e| statement_error(e, schema, &[batch]))?;
    if cas.is_empty() || written as usize == batch.len() {
        return Ok(Upserted {
            written,
            losers: Vec::new(),
        });
    }
    let sql = losers_sql(schema, batch, rules);
    let ords: Vec<i32> = (0..batch.len() as i32).collect();
    let stmt = tx.prepare_cached(&sql).await.map_err(TargetError::db)?;
    let rows = tx
        .query(&stmt, &params(&ords, batch))
        .await
        .map_err(|e| statement_error(e, schema, &[batch]))?;
    Ok(Upserted {
        written,
        losers: rows
            .iter()
            .map(|r| batch.ords[r.get::<_, i32>(0) as usize])
            .collect(),
    })
}

/// Deletes the rows `keys` identifies (by its columns: the primary key or a
/// `deleteKey`). With CAS, a row is deleted only when the stored CAS tuple
/// is not newer than the one in `cas_values` (the delete's `before`) or was
/// never stamped ([`unstamped`], as for the upsert);
/// returns caller ordinals of keys that found a row that was kept
/// (conflicts), each once. The check goes by what the delete did, not by
/// the statement's snapshot: a row a concurrent local write made newer
/// while the delete waited for it is kept and reported.
pub async fn delete(
    tx: &Transaction<'_>,
    schema: &TableSchema,
    keys: &TableBatch<'_>,
    cas: &[usize],
    cas_values: &TableBatch<'_>,
) -> Result<Vec<usize>, TargetError> {
    let rules = WriteRules::default();
    let (key_arrays, key_select) = unnest_source(schema, keys, &rules, "k", 2);
    let ords: Vec<i32> = (0..keys.len() as i32).collect();
    let mut p = params(&ords, keys);
    // The key that finds the rows: the primary key or a `deleteKey`.
    let key_match = columns_match(schema, &keys.columns, "cur", "u");
    let sql = if cas.is_empty() {
        format!(
            "WITH u AS (SELECT u.mrd_o, {} FROM unnest($1::int4[], {}) AS u(mrd_o{})) \
             DELETE FROM {} AS cur USING u WHERE {key_match}",
            select_list(schema, keys, &key_select),
            key_arrays.join(", "),
            aliases("k", keys.columns.len()),
            table_ref(schema),
        )
    } else {
        let (cas_arrays, cas_select) =
            unnest_source(schema, cas_values, &rules, "x", 2 + keys.columns.len());
        // The CAS values are aliased so they cannot collide with key columns.
        let cas_select: Vec<String> = cas_select
            .iter()
            .enumerate()
            .map(|(n, expr)| format!("{expr} AS cas{n}"))
            .collect();
        let cas_u = format!(
            "ROW({})",
            (0..cas.len())
                .map(|n| format!("u.cas{n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        p.extend(cas_values.params());
        format!(
            "WITH u AS (SELECT u.mrd_o, {}, {} FROM unnest($1::int4[], {}, {}) AS u(mrd_o{}{})), \
             d AS (DELETE FROM {t} AS cur USING u WHERE {key_match} \
             AND ({unstamped} OR NOT ({} > {cas_u})) RETURNING {}) \
             SELECT u.mrd_o FROM u WHERE EXISTS (SELECT 1 FROM {t} AS cur WHERE {key_match} \
             AND NOT EXISTS (SELECT 1 FROM d WHERE {}))",
            select_list(schema, keys, &key_select),
            cas_select.join(", "),
            key_arrays.join(", "),
            cas_arrays.join(", "),
            aliases("k", keys.columns.len()),
            aliases("x", cas.len()),
            tuple(schema, "cur", cas),
            qualified(schema, "cur", &schema.pk),
            columns_match(schema, &schema.pk, "d", "cur"),
            t = table_ref(schema),
            unstamped = unstamped(schema, cas),
        )
    };
    let stmt = tx.prepare_cached(&sql).await.map_err(TargetError::db)?;
    let rows = tx
        .query(&stmt, &p)
        .await
        .map_err(|e| statement_error(e, schema, &[keys, cas_values]))?;
    Ok(rows
        .iter()
        .map(|r| keys.ords[r.get::<_, i32>(0) as usize])
        .collect())
}

/// A statement's error. For a value its input function refused (SQLSTATE
/// class 22), the server quotes the value but says not which column it was
/// for: the column of `batches` whose text holds it is named, as meridian's
/// own conversions name theirs. So is a text value with a NUL character,
/// which PostgreSQL refuses without quoting it.
fn statement_error(
    e: tokio_postgres::Error,
    schema: &TableSchema,
    batches: &[&TableBatch],
) -> TargetError {
    let refused = e.as_db_error().and_then(|db| {
        let message = db.message();
        let (quoted, reason) = if *db.code() == SqlState::CHARACTER_NOT_IN_REPERTOIRE {
            // `invalid byte sequence for encoding "UTF8": 0x00`: PostgreSQL
            // text cannot hold NUL, which JSON's `\u0000` can carry.
            if !message.ends_with(": 0x00") {
                return None;
            }
            (None, "text cannot contain the NUL character (\\u0000)")
        } else if db.code().code().starts_with("22") {
            // `invalid input syntax for type uuid: "x"`, `value "x" is out
            // of range for type integer`: the first quoted text is the value.
            let (head, rest) = message.split_once('"')?;
            let (text, tail) = rest.split_once('"')?;
            let reason = match head.strip_suffix(": ") {
                Some(reason) if tail.is_empty() => reason,
                _ => message,
            };
            (Some(text), reason)
        } else {
            return None;
        };
        let is_value = |t: &str| match quoted {
            Some(q) => t == q,
            None => t.contains('\0'),
        };
        batches.iter().find_map(|b| {
            b.values.iter().zip(&b.columns).find_map(|(v, &c)| {
                let text = v.find_text(is_value)?;
                Some(ConvertError::refused(&schema.columns[c], text, reason))
            })
        })
    });
    match refused {
        Some(source) => TargetError::Convert {
            table: schema.name.to_string(),
            source: Box::new(source),
        },
        None => TargetError::db(e),
    }
}

/// A row that lost compare-and-set, with every side as the target's types
/// print it in JSON (so values compare as typed values, not raw text).
#[derive(Debug, Clone, PartialEq)]
pub struct Loser {
    /// The caller's index of the row (shared by the rows one key found).
    pub ord: usize,
    /// The stored row (locked until the transaction ends); `None` if gone.
    pub stored: Option<Document>,
    /// The proposed row, canonical; `None` for a delete.
    pub proposed: Option<Document>,
    /// The source's previous row, canonical; `None` when not sent.
    pub before: Option<Document>,
}

/// Reads the stored rows `keys` find (locking them) and canonicalises the
/// proposed and before documents through the columns' types and `rules`'
/// expressions, so that all three read as stored values. A key over other
/// columns than the primary key may find several rows: one [`Loser`] each.
/// `proposed` and `before` are batches over the same rows as `keys` (either
/// may be absent).
pub async fn fetch_losers(
    tx: &Transaction<'_>,
    schema: &TableSchema,
    keys: &TableBatch<'_>,
    proposed: Option<&TableBatch<'_>>,
    before: Option<(&TableBatch<'_>, &[bool])>,
    rules: &WriteRules,
) -> Result<Vec<Loser>, TargetError> {
    let none = WriteRules::default();
    let ords: Vec<i32> = (0..keys.len() as i32).collect();
    let has_before: Vec<bool> = match before {
        Some((_, flags)) => flags.to_vec(),
        None => vec![false; keys.len()],
    };
    let mut p: Vec<&(dyn ToSql + Sync)> = vec![&ords, &has_before];
    let mut arrays = vec!["$1::int4[]".to_string(), "$2::bool[]".to_string()];
    let mut alias = String::from("mrd_o, hb");
    let (ka, ks) = unnest_source(schema, keys, &none, "k", 3);
    p.extend(keys.params());
    arrays.extend(ka);
    alias.push_str(&aliases("k", keys.columns.len()));
    let key_cond = keys
        .columns
        .iter()
        .zip(&ks)
        .map(|(&c, k)| format!("cur.{} = {k}", quote_ident(&schema.columns[c].name)))
        .collect::<Vec<_>>()
        .join(" AND ");
    let mut next = 3 + keys.columns.len();
    let proposed_expr = match proposed {
        Some(b) => {
            let (pa, ps) = unnest_source(schema, b, rules, "p", next);
            next += b.columns.len();
            p.extend(b.params());
            arrays.extend(pa);
            alias.push_str(&aliases("p", b.columns.len()));
            format!(
                "(SELECT to_jsonb(x) FROM (SELECT {}) x)",
                select_list(schema, b, &ps)
            )
        }
        None => "NULL::jsonb".to_string(),
    };
    let before_expr = match before {
        Some((b, _)) if !b.columns.is_empty() => {
            // Through the same expressions as the proposed row: the stored
            // value it is compared with was written through them.
            let (ba, bs) = unnest_source(schema, b, rules, "b", next);
            p.extend(b.params());
            arrays.extend(ba);
            alias.push_str(&aliases("b", b.columns.len()));
            format!(
                "CASE WHEN u.hb THEN (SELECT to_jsonb(x) FROM (SELECT {}) x) END",
                select_list(schema, b, &bs)
            )
        }
        _ => "NULL::jsonb".to_string(),
    };
    // A lateral join, not a scalar subquery: a `deleteKey` need not be
    // unique, and each stored row it finds is a conflict of its own.
    let sql = format!(
        "SELECT u.mrd_o, to_jsonb(cur), {proposed_expr}, {before_expr} \
         FROM unnest({}) AS u({alias}) \
         LEFT JOIN LATERAL (SELECT * FROM {} AS cur WHERE {key_cond} FOR UPDATE) AS cur ON true \
         ORDER BY u.mrd_o, {}",
        arrays.join(", "),
        table_ref(schema),
        // Several rows of one key come in primary-key order.
        qualified(schema, "cur", &schema.pk),
    );
    let stmt = tx.prepare_cached(&sql).await.map_err(TargetError::db)?;
    let rows = tx.query(&stmt, &p).await.map_err(|e| {
        let batches: Vec<&TableBatch> = [Some(keys), proposed, before.map(|(b, _)| b)]
            .into_iter()
            .flatten()
            .collect();
        statement_error(e, schema, &batches)
    })?;
    let obj = |v: Option<Value>| match v {
        Some(Value::Object(m)) => Some(Document::from(m)),
        _ => None,
    };
    Ok(rows
        .iter()
        .map(|r| Loser {
            ord: keys.ords[r.get::<_, i32>(0) as usize],
            stored: obj(r.get(1)),
            proposed: obj(r.get(2)),
            before: obj(r.get(3)),
        })
        .collect())
}

/// One row for the DLQ table.
#[derive(Debug, Clone)]
pub struct DlqEntry {
    pub dlq_name: String,
    pub source_nanos: i64,
    pub source_logical: i64,
    pub data_after: Value,
    pub data_before: Value,
}

/// The DLQ table as the seed defines it.
pub fn dlq_create_sql(schema: &str, table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {}.{} (\n  event UUID DEFAULT gen_random_uuid() PRIMARY KEY,\n  dlq_name TEXT NOT NULL,\n  source_nanos INT8 NOT NULL,\n  source_logical INT8 NOT NULL,\n  data_after JSONB NOT NULL,\n  data_before JSONB NOT NULL\n);",
        quote_ident(schema),
        quote_ident(table)
    )
}

/// Writes entries to `schema`'s DLQ table, in the caller's transaction;
/// returns how many were new.
pub async fn write_dlq(
    tx: &Transaction<'_>,
    schema: &str,
    dlq_table: &str,
    entries: &[DlqEntry],
) -> Result<u64, TargetError> {
    if entries.is_empty() {
        return Ok(0);
    }
    // Delivery is at-least-once: a change already in the DLQ (same name,
    // source time and row) is not added again when its request is replayed.
    let sql = format!(
        "INSERT INTO {t} (dlq_name, source_nanos, source_logical, data_after, data_before) \
         SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::jsonb[], $5::jsonb[]) AS u(n, sn, sl, a, b) \
         WHERE NOT EXISTS (SELECT 1 FROM {t} d WHERE d.source_nanos = u.sn AND d.source_logical = u.sl \
           AND d.dlq_name = u.n AND d.data_after = u.a AND d.data_before = u.b)",
        t = format!("{}.{}", quote_ident(schema), quote_ident(dlq_table))
    );
    let names: Vec<&str> = entries.iter().map(|e| e.dlq_name.as_str()).collect();
    let nanos: Vec<i64> = entries.iter().map(|e| e.source_nanos).collect();
    let logical: Vec<i64> = entries.iter().map(|e| e.source_logical).collect();
    let after: Vec<&Value> = entries.iter().map(|e| &e.data_after).collect();
    let before: Vec<&Value> = entries.iter().map(|e| &e.data_before).collect();
    let stmt = tx
        .prepare_cached(&sql)
        .await
        .map_err(|e| missing_dlq(e, schema, dlq_table))?;
    tx.execute(&stmt, &[&names, &nanos, &logical, &after, &before])
        .await
        .map_err(|e| missing_dlq(e, schema, dlq_table))
}

fn missing_dlq(e: tokio_postgres::Error, schema: &str, table: &str) -> TargetError {
    if e.as_db_error().map(|d| d.code()) == Some(&SqlState::UNDEFINED_TABLE) {
        TargetError::MissingDlq {
            table: format!("{schema}.{table}"),
            create: dlq_create_sql(schema, table),
        }
    } else {
        TargetError::db(e)
    }
}

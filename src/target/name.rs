//! Table names: `table`, `schema.table` or `db.schema.table`, with SQL's
//! quoting and case folding.

/// A table name as a script or URL gives it: `table`, `schema.table` or
/// `db.schema.table`, resolved against the request's database and schema.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TableName {
    pub database: String,
    pub schema: String,
    pub table: String,
}

impl TableName {
    pub fn new(database: &str, schema: &str, table: &str) -> Self {
        TableName {
            database: database.to_string(),
            schema: schema.to_string(),
            table: table.to_string(),
        }
    }

    /// Parses `table`, `schema.table` or `db.schema.table` (parts may be
    /// double-quoted), filling missing parts from `database` and `schema`.
    pub fn resolve(name: &str, database: &str, schema: &str) -> Result<Self, String> {
        let parts = split_ident(name)?;
        match parts.as_slice() {
            [t] => Ok(TableName::new(database, schema, t)),
            [s, t] => Ok(TableName::new(database, s, t)),
            [d, s, t] => Ok(TableName::new(d, s, t)),
            _ => Err(format!(
                "table name {name:?} must be table, schema.table or db.schema.table"
            )),
        }
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.database, self.schema, self.table)
    }
}

/// Splits a dotted identifier, honouring double quotes (`"a.b".c` is two parts).
/// Unquoted parts are lower-cased, as SQL folds them.
pub fn split_ident(name: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = name.chars().peekable();
    let mut quoted_part = false;
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted_part = true;
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            cur.push('"');
                        }
                        Some('"') => break,
                        Some(c) => cur.push(c),
                        None => return Err(format!("unterminated quote in {name:?}")),
                    }
                }
            }
            '.' => {
                if cur.is_empty() {
                    return Err(format!("empty name part in {name:?}"));
                }
                parts.push(std::mem::take(&mut cur));
                quoted_part = false;
            }
            c if quoted_part => return Err(format!("unexpected {c:?} after quote in {name:?}")),
            c => cur.extend(c.to_lowercase()),
        }
    }
    if cur.is_empty() {
        return Err(format!("empty name part in {name:?}"));
    }
    parts.push(cur);
    Ok(parts)
}

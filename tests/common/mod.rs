//! Shared test support: a receiver on a fresh database of the one throwaway
//! PostgreSQL cluster per test binary (see `meridian::pgcluster`).
#![allow(dead_code)]

use std::path::Path;

use clap::Parser;
use meridian::cli::{Cli, Command, StartArgs};
use meridian::server::RunningServer;
use tokio_postgres::{Client, NoTls};

/// A test database with a receiver in front of it.
pub struct Fixture {
    pub url: String,
    pub db: Client,
    pub server: RunningServer,
    pub http: reqwest::Client,
}

/// `meridian start` flags for `url`, plus `extra` flags.
pub fn start_args(url: &str, extra: &[&str]) -> StartArgs {
    let mut argv = vec![
        "meridian",
        "start",
        "--bindAddr",
        "127.0.0.1:0",
        "--disableAuthentication",
        "--targetConn",
        url,
    ];
    argv.extend_from_slice(extra);
    match Cli::try_parse_from(argv).expect("valid flags").command {
        Command::Start(a) => a,
        _ => unreachable!(),
    }
}

pub async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

/// A fresh database named `name` on the shared cluster, set up with `setup`
/// SQL (a failure names the SQL): its URL and a connection.
pub async fn fresh_db(name: &str, setup: &str) -> (String, Client) {
    let url = meridian::pgcluster::shared()
        .expect("test cluster")
        .fresh_database(name)
        .await
        .expect("database");
    let db = connect(&url).await;
    sql(&db, setup).await;
    (url, db)
}

/// Runs `text` (one or more statements) on `db`; a failure names the SQL.
pub async fn sql(db: &Client, text: &str) {
    if let Err(e) = db.batch_execute(text).await {
        panic!("{text}: {e}");
    }
}

/// A fresh database (see [`fresh_db`]) and a receiver started on it with
/// `extra` flags.
pub async fn fixture(name: &str, setup: &str, extra: &[&str]) -> Fixture {
    let (url, db) = fresh_db(name, setup).await;
    let server = meridian::server::serve(start_args(&url, extra))
        .await
        .expect("server starts");
    let http = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    Fixture {
        url,
        db,
        server,
        http,
    }
}

impl Fixture {
    /// POSTs `body` to `path`; returns status and response text.
    pub async fn post(&self, path: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}{}", self.server.base_url(), path))
            .body(body)
            .send()
            .await
            .expect("request");
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    }

    /// POSTs `body` and asserts the receiver answered 200 (showing its
    /// answer when it did not).
    pub async fn post_ok(&self, path: &str, body: impl Into<reqwest::Body>) {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, 200, "{text}");
    }

    /// POSTs `body` and asserts the receiver refused it as input that will
    /// never apply (400, showing its answer when it did not); returns the
    /// answer.
    pub async fn post_refused(&self, path: &str, body: impl Into<reqwest::Body>) -> String {
        let (status, text) = self.post(path, body).await;
        assert_eq!(status, 400, "{path}: {text}");
        text
    }

    /// The rows of a query, each as one text line (for byte-for-byte comparison).
    pub async fn dump(&self, sql: &str) -> Vec<String> {
        self.db
            .simple_query(sql)
            .await
            .expect("query")
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("NULL").to_string())
                        .collect::<Vec<_>>()
                        .join("|"),
                ),
                _ => None,
            })
            .collect()
    }

    /// The receiver's Prometheus text from `/_/varz`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/_/varz", self.server.base_url()))
            .send()
            .await
            .expect("metrics request")
            .text()
            .await
            .expect("metrics text")
    }

    pub async fn count(&self, sql: &str) -> i64 {
        self.db.query_one(sql, &[]).await.expect("count").get(0)
    }
}

/// The seed's kv table with replication columns, and the seed's DLQ table.
pub const KV_SCHEMA: &str = "
CREATE TABLE kv (k INT8 PRIMARY KEY, v BYTEA, _source TEXT, _timestamp TIMESTAMPTZ);
CREATE TABLE cdc_sink_dlq (
  event UUID DEFAULT gen_random_uuid() PRIMARY KEY,
  dlq_name TEXT NOT NULL,
  source_nanos INT8 NOT NULL,
  source_logical INT8 NOT NULL,
  data_after JSONB NOT NULL,
  data_before JSONB NOT NULL
);";

/// A userscript written next to the test, returned as a path.
pub fn write_script(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// A one-row kv batch.
pub fn kv_row(
    k: i64,
    v: &str,
    source: &str,
    ts: &str,
    before: Option<&str>,
    updated: &str,
) -> String {
    format!(
        r#"{{"after":{{"k":{k},"v":"{v}","_source":"{source}","_timestamp":"{ts}"}},"before":{},"key":[{k}],"topic":"kv","updated":"{updated}"}}"#,
        before.unwrap_or("null")
    )
}

pub fn batch(rows: &[String]) -> String {
    format!(
        r#"{{"payload":[{}],"length":{}}}"#,
        rows.join(","),
        rows.len()
    )
}

pub const T1: &str = "2026-01-01T00:00:01Z";
pub const T2: &str = "2026-01-01T00:00:02Z";
pub const T3: &str = "2026-01-01T00:00:03Z";

/// A userscript `init.ts` in its own temporary folder.
pub fn script(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_script(dir.path(), "init.ts", text);
    (dir, path)
}

/// A kv row written directly (as a local write would be).
pub async fn seed_row(f: &Fixture, k: i64, v: &str, source: &str, ts: &str) {
    f.db.execute(
        "INSERT INTO kv VALUES ($1, decode($2, 'hex'), $3, $4::text::timestamptz)",
        &[&k, &v, &source, &ts],
    )
    .await
    .unwrap();
}

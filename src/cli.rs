//! The `meridian` command line: subcommands and their flags, spelled as
//! cdc-sink/replicator spell them (camelCase, Go-style `:port` addresses).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "meridian",
    version,
    about = "Active-active change-data-capture between two SQL clusters"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Receive changefeed batches over HTTP(S) and apply them to the target.
    #[command(
        after_help = "Logging: RUST_LOG filters the log (default info). A userscript's \
console.log and console.info log at info, so a script that logs per row (the seed's does) \
writes a line per row; RUST_LOG=info,meridian::userscript=warn keeps meridian's own \
messages and drops those."
    )]
    Start(StartArgs),
    /// Read a PostgreSQL source through logical decoding and send webhook batches.
    Changefeed(crate::source::postgres::ChangefeedArgs),
    /// Print the userscript API or check a userscript without starting a server.
    Userscript(crate::script::UserscriptArgs),
    /// Run the east/west active-active demo on embedded PostgreSQL clusters.
    Demo(crate::demo::DemoArgs),
}

/// Flags of `meridian start`.
#[derive(Debug, Clone, Args)]
pub struct StartArgs {
    /// Address to serve changefeed requests on (`:30004`, `127.0.0.1:30004`).
    #[arg(long = "bindAddr", default_value = ":26258", value_parser = parse_addr)]
    pub bind_addr: SocketAddr,

    /// Address to serve Prometheus metrics on at /metrics (also at /_/varz on bindAddr).
    #[arg(long = "metricsAddr", value_parser = parse_addr)]
    pub metrics_addr: Option<SocketAddr>,

    /// Target database connection string; its database is the default for requests.
    #[arg(long = "targetConn")]
    pub target_conn: String,

    /// TypeScript or JavaScript userscript that routes, filters and merges rows.
    #[arg(long = "userscript")]
    pub userscript: Option<PathBuf>,

    /// Serve HTTPS with a certificate generated at start.
    #[arg(long = "tlsSelfSigned")]
    pub tls_self_signed: bool,

    /// PEM certificate chain to serve HTTPS with (needs --tlsPrivateKey).
    #[arg(long = "tlsCertificate", requires = "tls_private_key")]
    pub tls_certificate: Option<PathBuf>,

    /// PEM private key for --tlsCertificate.
    #[arg(long = "tlsPrivateKey", requires = "tls_certificate")]
    pub tls_private_key: Option<PathBuf>,

    /// Accept requests without a bearer token.
    #[arg(long = "disableAuthentication")]
    pub disable_authentication: bool,

    /// PEM public key (RSA or EC) that verifies bearer tokens (JWT); repeatable.
    #[arg(long = "jwtPublicKey")]
    pub jwt_public_key: Vec<PathBuf>,

    /// Apply each request as it arrives instead of staging until resolved
    /// (the only mode today; accepted for compatibility).
    #[arg(long = "bestEffortOnly")]
    pub best_effort_only: bool,

    /// Name of the dead-letter-queue table in each target schema.
    #[arg(long = "dlqTableName", default_value = "cdc_sink_dlq")]
    pub dlq_table_name: String,

    /// Largest request body accepted, in bytes (larger ones get 413).
    #[arg(long = "maxBodyBytes", default_value_t = 64 << 20)]
    pub max_body_bytes: usize,

    /// Longest one request's transaction may take before it is rolled back (503).
    #[arg(long = "applyTimeout", default_value = "10s", value_parser = parse_duration)]
    pub apply_timeout: Duration,

    /// Most connections to the target database.
    #[arg(long = "targetMaxPoolSize", default_value_t = 32)]
    pub target_max_pool_size: usize,

    /// Longest one userscript call may run.
    #[arg(long = "userscriptTimeout", default_value = "5s", value_parser = parse_duration)]
    pub userscript_timeout: Duration,

    /// Most memory the userscript's heap may use, in MiB.
    #[arg(long = "userscriptMemoryMiB", default_value_t = 256)]
    pub userscript_memory_mib: usize,
}

/// Reads `:port`, `host:port` or `[v6]:port`; an empty host means all interfaces.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else if s.chars().all(|c| c.is_ascii_digit()) {
        format!("0.0.0.0:{s}")
    } else {
        s.to_string()
    };
    if let Ok(a) = full.parse() {
        return Ok(a);
    }
    use std::net::ToSocketAddrs;
    full.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .ok_or_else(|| format!("invalid address {s:?}: expected :port or host:port"))
}

/// Reads durations in Go style (`500ms`, `3s`, `1h`, `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_addresses() {
        assert_eq!(parse_addr(":30004").unwrap().to_string(), "0.0.0.0:30004");
        assert_eq!(
            parse_addr("127.0.0.1:1").unwrap().to_string(),
            "127.0.0.1:1"
        );
        assert!(parse_addr("nope").is_err());
    }

    #[test]
    fn seed_command_line_parses() {
        let cli = Cli::try_parse_from([
            "meridian",
            "start",
            "--bindAddr",
            ":30004",
            "--metricsAddr",
            ":30005",
            "--tlsSelfSigned",
            "--disableAuthentication",
            "--targetConn",
            "postgresql://root@localhost:26257/?sslmode=disable",
            "--userscript",
            "init.ts",
        ])
        .unwrap();
        let Command::Start(a) = cli.command else {
            panic!("expected start")
        };
        assert_eq!(a.bind_addr.port(), 30004);
        assert_eq!(a.metrics_addr.unwrap().port(), 30005);
        assert!(a.tls_self_signed && a.disable_authentication);
        assert_eq!(a.dlq_table_name, "cdc_sink_dlq");
    }
}

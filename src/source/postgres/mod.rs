//! PostgreSQL logical decoding → CockroachDB-style webhook batches
//! (`meridian changefeed`). Placeholder until the producer lands.

/// Flags of `meridian changefeed`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChangefeedArgs {
    /// Source database connection string.
    #[arg(long = "sourceConn")]
    pub source_conn: String,
}

/// Runs the changefeed until interrupted.
pub async fn run(_args: ChangefeedArgs) -> anyhow::Result<()> {
    anyhow::bail!("meridian changefeed is not implemented yet")
}

//! The HTTP(S) front: axum router, TLS, authentication, health, limits.

/// Runs `meridian start` until interrupted.
pub async fn run(_args: crate::cli::StartArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}

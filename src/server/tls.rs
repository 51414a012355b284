//! TLS for the changefeed endpoint: a certificate generated at start
//! (`--tlsSelfSigned`) or one read from PEM files.

use std::path::Path;

use anyhow::{Context, Result};
use axum_server::tls_rustls::RustlsConfig;

/// Installs rustls' ring provider once per process (both the server and the
/// changefeed client use it).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A self-signed certificate for localhost and this host's name.
pub async fn self_signed() -> Result<RustlsConfig> {
    install_crypto_provider();
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(h) = std::fs::read_to_string("/etc/hostname") {
        let h = h.trim();
        if !h.is_empty() {
            names.push(h.to_string());
        }
    }
    let ck = rcgen::generate_simple_self_signed(names).context("generating a certificate")?;
    RustlsConfig::from_pem(
        ck.cert.pem().into_bytes(),
        ck.key_pair.serialize_pem().into_bytes(),
    )
    .await
    .context("loading the generated certificate")
}

/// A certificate chain and key from PEM files.
pub async fn from_files(cert: &Path, key: &Path) -> Result<RustlsConfig> {
    install_crypto_provider();
    RustlsConfig::from_pem_file(cert, key)
        .await
        .with_context(|| {
            format!(
                "loading TLS certificate {} and key {}",
                cert.display(),
                key.display()
            )
        })
}

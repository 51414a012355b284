//! The webhook sink: POSTs batch and resolved bodies, retrying until the
//! receiver answers 2xx. Nothing is ever skipped: a 4xx halts the batch, logs
//! the answer and keeps retrying (as a CockroachDB webhook changefeed does).

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::sync::watch;

use crate::metrics::ChangefeedMetrics;

/// Where and how to send.
#[derive(Debug, Clone)]
pub struct SinkConfig {
    /// The sink as given: `webhook-https://host:port/db/schema?insecure_tls_skip_verify=true`.
    pub url: String,
    pub auth_token: Option<String>,
    /// Time allowed for one request.
    pub timeout: Duration,
    /// First retry delay; doubles up to `retry_max`.
    pub retry_initial: Duration,
    pub retry_max: Duration,
}

/// Why a send stopped without a 2xx.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("shutting down")]
    Shutdown,
}

#[derive(Clone)]
pub struct Sink {
    client: reqwest::Client,
    url: reqwest::Url,
    auth: Option<String>,
    retry_initial: Duration,
    retry_max: Duration,
    metrics: ChangefeedMetrics,
}

/// Splits `webhook-https://…?insecure_tls_skip_verify=true` into the URL to
/// POST to and whether to accept any certificate.
pub fn parse_sink_url(sink: &str) -> Result<(reqwest::Url, bool)> {
    let raw = sink.strip_prefix("webhook-").unwrap_or(sink);
    let mut url = reqwest::Url::parse(raw).with_context(|| format!("invalid sink URL {sink:?}"))?;
    if url.scheme() != "http" && url.scheme() != "https" {
        bail!("sink URL {sink:?}: expected webhook-https://… or webhook-http://…");
    }
    let mut insecure = false;
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, v)| {
            if k == "insecure_tls_skip_verify" {
                insecure = v == "true";
                false
            } else {
                true
            }
        })
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok((url, insecure))
}

impl Sink {
    pub fn new(cfg: &SinkConfig, metrics: ChangefeedMetrics) -> Result<Self> {
        let (url, insecure) = parse_sink_url(&cfg.url)?;
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(insecure)
            .timeout(cfg.timeout)
            .pool_max_idle_per_host(4)
            .build()
            .context("building the HTTP client")?;
        Ok(Sink {
            client,
            url,
            auth: cfg.auth_token.clone(),
            retry_initial: cfg.retry_initial,
            retry_max: cfg.retry_max,
            metrics,
        })
    }

    pub fn url(&self) -> &reqwest::Url {
        &self.url
    }

    /// Sends `body` until the sink answers 2xx, or until shutdown.
    pub async fn send(
        &self,
        body: impl Into<reqwest::Body>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), SendError> {
        // An in-memory body: each attempt clones the request, sharing the bytes.
        let mut template = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(t) = &self.auth {
            template = template.bearer_auth(t);
        }
        let mut delay = self.retry_initial;
        let mut attempt = 0u32;
        loop {
            if *shutdown.borrow() {
                return Err(SendError::Shutdown);
            }
            if attempt > 0 {
                self.metrics.retries.inc();
            }
            attempt += 1;
            let started = Instant::now();
            let req = template
                .try_clone()
                .expect("in-memory request bodies clone");
            let result = tokio::select! {
                r = req.send() => r,
                _ = shutdown.changed() => return Err(SendError::Shutdown),
            };
            match result {
                Ok(resp) if resp.status().is_success() => {
                    self.metrics
                        .send_duration
                        .observe(started.elapsed().as_secs_f64());
                    return Ok(());
                }
                Ok(resp) => {
                    let status = resp.status();
                    let kind = if status.is_client_error() {
                        "4xx"
                    } else {
                        "5xx"
                    };
                    self.metrics.errors.with_label_values(&[kind]).inc();
                    let text = resp.text().await.unwrap_or_default();
                    let text: String = text.chars().take(2000).collect();
                    if status.is_client_error() {
                        tracing::error!(
                            %status, body = %text, attempt,
                            "sink rejected a batch; not skipping it, retrying in {delay:?}"
                        );
                    } else {
                        tracing::warn!(%status, body = %text, attempt, "sink error; retrying in {delay:?}");
                    }
                }
                Err(e) => {
                    let kind = if e.is_timeout() {
                        "timeout"
                    } else {
                        "transport"
                    };
                    self.metrics.errors.with_label_values(&[kind]).inc();
                    tracing::warn!(error = %e, attempt, "sending to the sink failed; retrying in {delay:?}");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return Err(SendError::Shutdown),
            }
            delay = (delay * 2).min(self.retry_max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_urls() {
        let (u, i) = parse_sink_url(
            "webhook-https://127.0.0.1:30004/kv/public?insecure_tls_skip_verify=true",
        )
        .unwrap();
        assert_eq!(u.as_str(), "https://127.0.0.1:30004/kv/public");
        assert!(i);
        let (u, i) = parse_sink_url("webhook-http://h:1/kv/public?x=1").unwrap();
        assert_eq!(u.as_str(), "http://h:1/kv/public?x=1");
        assert!(!i);
        assert!(parse_sink_url("kafka://h:1").is_err());
    }
}

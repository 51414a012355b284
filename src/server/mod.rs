//! The HTTP(S) front of `meridian start`: the axum router, TLS, authentication,
//! health, metrics endpoints and request limits. Request bodies go to
//! [`Receiver`]; its errors become statuses in [`error`].

pub mod auth;
pub mod error;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::RustlsAcceptor;
use axum_server::Handle;
use http_body_util::BodyExt;

use crate::changefeed::receiver::Receiver;
use crate::cli::StartArgs;
use crate::metrics::ReceiverMetrics;
use crate::script::{Limits, Userscript};
use crate::target::{Target, TargetOptions};
use auth::Authenticator;
use error::ApiError;

struct AppState {
    receiver: Receiver,
    auth: Authenticator,
    max_body: usize,
}

/// A running `meridian start`: its addresses and a way to stop it.
pub struct RunningServer {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    handles: Vec<Handle>,
    tasks: Vec<tokio::task::JoinHandle<std::io::Result<()>>>,
    pub metrics: ReceiverMetrics,
    tls: bool,
}

impl RunningServer {
    /// The address changefeeds POST to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http(s)://127.0.0.1:port` for the changefeed endpoint.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.addr.port())
    }

    /// The address serving /metrics, if `--metricsAddr` was given.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Stops accepting requests and waits briefly for those in flight.
    pub async fn shutdown(self) {
        for h in &self.handles {
            h.graceful_shutdown(Some(Duration::from_secs(5)));
        }
        for t in self.tasks {
            let _ = t.await;
        }
    }

    /// Waits until the server stops (or fails).
    pub async fn wait(self) -> Result<()> {
        for t in self.tasks {
            t.await.context("server task")?.context("server")?;
        }
        Ok(())
    }

    /// Stops at once, dropping requests in flight (as a crash would).
    pub fn abort(self) {
        for h in &self.handles {
            h.shutdown();
        }
        for t in self.tasks {
            t.abort();
        }
    }
}

/// Loads the userscript, connects the target and starts serving.
pub async fn serve(args: StartArgs) -> Result<RunningServer> {
    let script = match &args.userscript {
        Some(path) => Userscript::load(
            path,
            Limits {
                call_timeout: args.userscript_timeout,
                memory_bytes: args.userscript_memory_mib << 20,
                ..Limits::default()
            },
        )?,
        None => Userscript::none(),
    };
    let target = Target::new(TargetOptions {
        conn: args.target_conn.clone(),
        dlq_table: args.dlq_table_name.clone(),
        max_pool_size: args.target_max_pool_size,
        apply_timeout: args.apply_timeout,
    })?;
    let metrics = ReceiverMetrics::new();
    let auth = Authenticator::new(args.disable_authentication, &args.jwt_public_key)?;
    let state = Arc::new(AppState {
        receiver: Receiver::new(Arc::new(target), script, metrics.clone()),
        auth,
        max_body: args.max_body_bytes,
    });
    if let Err(e) = state.receiver.target.healthy().await {
        // Not fatal: the target may come up later; requests answer 503 meanwhile.
        tracing::warn!("target database not reachable yet: {e}");
    }

    let app = Router::new()
        .route("/{database}/{schema}", post(post_schema))
        .route("/{database}/{schema}/{table}", post(post_table))
        .route("/_/healthz", get(healthz))
        .route("/_/varz", get(varz))
        .fallback(|m: Method, u: Uri| async move { no_route(StatusCode::NOT_FOUND, m, u) })
        .method_not_allowed_fallback(|m: Method, u: Uri| async move {
            no_route(StatusCode::METHOD_NOT_ALLOWED, m, u)
        })
        .layer(DefaultBodyLimit::disable())
        // A bug must cost one request (500), never the daemon or the connection.
        .layer(tower_http::catch_panic::CatchPanicLayer::new())
        .with_state(state.clone());

    let tls = if args.tls_self_signed {
        Some(tls::self_signed().await?)
    } else if let (Some(c), Some(k)) = (&args.tls_certificate, &args.tls_private_key) {
        Some(tls::from_files(c, k).await?)
    } else {
        None
    };
    let mut handles = Vec::new();
    let mut tasks = Vec::new();
    let handle = Handle::new();
    let svc = app.into_make_service();
    let is_tls = tls.is_some();
    // TCP_NODELAY: a response leaves in more than one write (with TLS, one
    // record each), and Nagle would hold the last one until the client's
    // delayed ACK, up to 40 ms, stalling a changefeed that sends one small
    // batch at a time.
    tasks.push(match tls {
        Some(cfg) => tokio::spawn(
            axum_server::bind(args.bind_addr)
                .acceptor(RustlsAcceptor::new(cfg).acceptor(NoDelayAcceptor))
                .handle(handle.clone())
                .serve(svc),
        ),
        None => tokio::spawn(
            axum_server::bind(args.bind_addr)
                .acceptor(NoDelayAcceptor)
                .handle(handle.clone())
                .serve(svc),
        ),
    });
    let addr = listening(&handle, args.bind_addr).await?;
    handles.push(handle);

    let mut metrics_addr = None;
    if let Some(maddr) = args.metrics_addr {
        let mapp = Router::new()
            .route("/metrics", get(varz))
            .route("/_/varz", get(varz))
            .with_state(state.clone());
        let h = Handle::new();
        tasks.push(tokio::spawn(
            axum_server::bind(maddr)
                .acceptor(NoDelayAcceptor)
                .handle(h.clone())
                .serve(mapp.into_make_service()),
        ));
        metrics_addr = Some(listening(&h, maddr).await?);
        handles.push(h);
    }
    tracing::info!(
        "meridian receiving on {}://{addr}{}",
        if is_tls { "https" } else { "http" },
        metrics_addr
            .map(|a| format!(", metrics on http://{a}/metrics"))
            .unwrap_or_default()
    );
    Ok(RunningServer {
        addr,
        metrics_addr,
        handles,
        tasks,
        metrics,
        tls: is_tls,
    })
}

async fn listening(handle: &Handle, wanted: SocketAddr) -> Result<SocketAddr> {
    handle
        .listening()
        .await
        .with_context(|| format!("could not listen on {wanted}"))
}

/// Runs `meridian start` until SIGINT or SIGTERM.
pub async fn run(args: StartArgs) -> Result<()> {
    let server = serve(args).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn post_schema(
    State(state): State<Arc<AppState>>,
    Path((database, schema)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, database, schema, None, headers, body).await
}

async fn post_table(
    State(state): State<Arc<AppState>>,
    Path((database, schema, table)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    handle(state, database, schema, Some(table), headers, body).await
}

async fn handle(
    state: Arc<AppState>,
    database: String,
    schema: String,
    table: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let m = &state.receiver.metrics;
    let result = async {
        let auth = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        state.auth.check(auth).map_err(ApiError::Unauthorized)?;
        let bytes = read_body(body, state.max_body).await?;
        m.http_payload_in_bytes.inc_by(bytes.len() as u64);
        state
            .receiver
            .receive(
                &database.to_lowercase(),
                &schema.to_lowercase(),
                table.as_deref(),
                &bytes,
            )
            .await
            .map_err(ApiError::from)
    }
    .await;
    let response = match result {
        Ok(_) => StatusCode::OK.into_response(),
        Err(e) => e.into_response(),
    };
    m.http_status_codes
        .with_label_values(&[response.status().as_str()])
        .inc();
    m.http_latency.observe(started.elapsed().as_secs_f64());
    response
}

/// Reads the body, stopping as soon as it passes `limit`.
async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(ApiError::TooLarge { limit })
        }
        Err(e) => Err(ApiError::Body(e.to_string())),
    }
}

/// The answer to a request for something meridian does not serve: what it
/// does serve.
fn no_route(status: StatusCode, method: Method, uri: Uri) -> (StatusCode, String) {
    let message = format!(
        "no endpoint for {method} {}; changefeeds POST to /{{database}}/{{schema}} or \
         /{{database}}/{{schema}}/{{table}}; GET /_/healthz and /_/varz\n",
        uri.path()
    );
    (status, message)
}

async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    match state.receiver.target.healthy().await {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

async fn varz(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.receiver.metrics;
    let (size, available, waiting) = state.receiver.target.pool_status();
    m.target_pool_size.set(size as i64);
    m.target_pool_available.set(available as i64);
    m.target_pool_waiting.set(waiting as i64);
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        crate::metrics::render(&[&m.registry]),
    )
        .into_response()
}

//! The one place errors become HTTP statuses: 4xx for input that will never
//! apply, 5xx for failures the changefeed should retry (it retries any non-2xx,
//! but a 5xx tells an operator the request itself was fine).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::changefeed::receiver::ReceiveError;
use crate::script::ScriptError;
use crate::target::TargetError;

/// An error answered to an HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Receive(#[from] ReceiveError),
    #[error("request body is larger than --maxBodyBytes ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("reading the request body failed: {0}")]
    Body(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
}

impl ApiError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Body(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Receive(e) => match e {
                ReceiveError::Parse(_) | ReceiveError::Route(_) => StatusCode::BAD_REQUEST,
                ReceiveError::Script(ScriptError::Timeout(_)) => StatusCode::SERVICE_UNAVAILABLE,
                ReceiveError::Script(_) => StatusCode::BAD_REQUEST,
                // The operator must create the DLQ table; the retry will then apply.
                ReceiveError::Target(TargetError::MissingDlq { .. }) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                ReceiveError::Target(TargetError::UnknownDatabase { .. }) => StatusCode::NOT_FOUND,
                ReceiveError::Target(t) if t.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
                ReceiveError::Target(_) => StatusCode::BAD_REQUEST,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), "request failed: {self}");
        } else {
            tracing::info!(status = status.as_u16(), "request rejected: {self}");
        }
        (status, format!("{self}\n")).into_response()
    }
}

//! Recording decisions in the audit log (wired to the audit store when it lands).

use actix_web::HttpRequest;

use super::errors::ApiError;
use super::route::RouteBody;
use super::state::AppState;
use crate::engine::Decision;

/// Record a route decision; the response must not be sent unless this succeeds.
pub async fn decision(
    _state: &AppState,
    _req: &HttpRequest,
    _body: &RouteBody,
    _decision: &Decision<'_>,
    _policy_version: &str,
    _decision_id: &str,
    _dry_run: bool,
) -> Result<(), ApiError> {
    Ok(())
}

/// The audit head for `/api/status`.
pub fn head(_state: &AppState) -> serde_json::Value {
    serde_json::Value::Null
}

/// Record a reload (success or failure).
pub async fn reload(_state: &AppState, _ok: bool, _version: &str, _errors: &[String]) {}

/// Flush and stop the audit writer on shutdown.
pub async fn shutdown(_state: &AppState) {}

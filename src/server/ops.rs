//! The operator's endpoints: health, readiness, status, metrics, registry, reload.

use actix_web::{web, HttpResponse, ResponseError};
use serde_json::json;

use super::errors::{ApiError, Code};
use super::state::AppState;

fn json_ok(v: serde_json::Value) -> HttpResponse {
    HttpResponse::Ok().json(v)
}

/// `GET /health`: the process lives.
pub async fn health() -> HttpResponse {
    json_ok(json!({"status": "ok"}))
}

/// `GET /ready`: 200 once a policy set is loaded, while the audit log can be written.
pub async fn ready(state: web::Data<AppState>) -> HttpResponse {
    if let Some(why) = super::storage::problem(&state) {
        return ApiError::unavailable(format!("storage cannot be written: {why}")).error_response();
    }
    match state.snapshot.load().as_ref() {
        Some(s) => json_ok(json!({"status": "ready", "policy_version": s.version})),
        None => ApiError::unavailable("no policy set is loaded yet").error_response(),
    }
}

/// `GET /api/status`: which policy version is active, and whether the last reload failed.
///
/// For a tenant-bound token the audit head and the decision counters are left out: they
/// count every tenant's traffic.
pub async fn status(caller: super::auth::Caller, state: web::Data<AppState>) -> HttpResponse {
    let all_tenants = caller.tenant().is_none();
    let snap = state.snapshot.load_full();
    let last = state
        .last_reload
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let loaded_at = state
        .loaded_at
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let audit_head = all_tenants.then(|| super::record::head(&state));
    let decisions = all_tenants.then(|| {
        json!({
            "allowed": state.metrics.allowed_total(),
            "denied": state.metrics.denied_total(),
        })
    });
    let storage = super::storage::problem(&state);
    json_ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": state.started.elapsed().as_secs(),
        "policy_version": snap.as_ref().map(|s| s.version.clone()),
        "loaded_at": loaded_at,
        "counts": {
            "rules": snap.as_ref().map_or(0, |s| s.rules.len()),
            "capabilities": snap.as_ref().map_or(0, |s| s.capabilities.len()),
            "workers": snap.as_ref().map_or(0, |s| s.workers.len()),
        },
        "last_reload": last,
        "audit": audit_head,
        "audit_integrity": all_tenants.then(|| state.stores.audit.integrity()),
        "storage": {
            "ok": storage.is_none(),
            "error": storage,
        },
        "decisions": decisions,
        "watch": state.watch.get().map(|w| w.health()),
        "registry_dir": state.config.registry_dir,
        "policies_dir": state.config.policies_dir,
    }))
}

/// `GET /metrics`: Prometheus text format.
///
/// Refused (403 `tenant_mismatch`) for a tenant-bound token: the counters cover every tenant.
pub async fn metrics(caller: super::auth::Caller, state: web::Data<AppState>) -> HttpResponse {
    if let Err(e) = caller.require_unbound("metrics count the traffic of") {
        return e.error_response();
    }
    let loaded = state.snapshot.load().is_some();
    let failed = !state
        .last_reload
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .ok;
    let mut text = state.metrics.render(loaded, failed);
    text.push_str(&audit_metrics(state.stores.audit.stats()));
    let watch_ok = state.watch.get().is_some_and(|w| w.health().ok);
    let storage_ok = super::storage::problem(&state).is_none();
    text.push_str(&format!(
        "# HELP hall_watch_ok Whether every policy dir (and its parent) is watched.\n# TYPE hall_watch_ok gauge\n\
         hall_watch_ok {}\n\
         # HELP hall_storage_ok Whether the audit log and database can be written.\n# TYPE hall_storage_ok gauge\n\
         hall_storage_ok {}\n",
        u8::from(watch_ok),
        u8::from(storage_ok)
    ));
    text.push_str(&super::approvals::metrics_text(&state));
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(text)
}

/// The audit writer's counters: `appended / batches` is the group-commit batch size, the
/// number to look at when durable throughput lags batched.
fn audit_metrics(a: crate::store::audit::AuditStats) -> String {
    format!(
        "# HELP hall_audit_appended_total Audit records written.\n# TYPE hall_audit_appended_total counter\n\
         hall_audit_appended_total {}\n\
         # HELP hall_audit_failed_total Audit appends refused because their batch failed.\n# TYPE hall_audit_failed_total counter\n\
         hall_audit_failed_total {}\n\
         # HELP hall_audit_batches_total Audit group commits.\n# TYPE hall_audit_batches_total counter\n\
         hall_audit_batches_total {}\n\
         # HELP hall_audit_flushes_total Audit flushes to disk.\n# TYPE hall_audit_flushes_total counter\n\
         hall_audit_flushes_total {}\n\
         # HELP hall_audit_queue_depth Audit appends waiting for the writer.\n# TYPE hall_audit_queue_depth gauge\n\
         hall_audit_queue_depth {}\n",
        a.appended, a.failed, a.batches, a.flushes, a.queue_depth
    )
}

/// `POST /api/reload`: reload now; 422 with the errors if the files are broken.
pub async fn reload(
    caller: super::auth::Caller,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let st = state.into_inner();
    let who = Some(caller.id());
    match st.reload("api").await {
        Ok(version) => {
            super::record::reload(&st, "api", who, true, &version, &[]).await;
            Ok(json_ok(json!({"ok": true, "policy_version": version})))
        }
        Err(errors) => {
            super::record::reload(&st, "api", who, false, "", &errors).await;
            let current = st.snapshot.load().as_ref().map(|s| s.version.clone());
            // The API's error shape, with the load's errors and the version still in force.
            Ok(
                HttpResponse::build(Code::InvalidPolicy.status()).json(json!({
                    "error": "the policy files do not load; the last good set stays in force",
                    "code": Code::InvalidPolicy.as_str(),
                    "errors": errors,
                    "policy_version": current,
                })),
            )
        }
    }
}

/// `GET /api/registry/capabilities`.
pub async fn capabilities(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let snap = state
        .snapshot
        .load_full()
        .ok_or_else(|| ApiError::unavailable("no policy set is loaded yet"))?;
    Ok(json_ok(
        json!({"policy_version": snap.version, "capabilities": snap.capabilities}),
    ))
}

/// `GET /api/registry/workers`.
pub async fn workers(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let snap = state
        .snapshot
        .load_full()
        .ok_or_else(|| ApiError::unavailable("no policy set is loaded yet"))?;
    Ok(json_ok(
        json!({"policy_version": snap.version, "workers": snap.workers}),
    ))
}

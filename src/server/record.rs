//! Writing audit records for what the daemon does. A route response is sent only after
//! its record is appended (and, in durable mode, flushed): never an unrecorded allow.

use super::errors::{ApiError, Code};
use super::state::{now_ms, AppState};
use crate::store::audit::{AuditEntry, RecordKind};

/// Append a route decision's record (built by the route handler) and return its id (the
/// audit writer makes it, see `store::audit`); an error means the response must be 503.
pub async fn decision(state: &AppState, entry: AuditEntry) -> Result<uuid::Uuid, ApiError> {
    state
        .stores
        .audit
        .append(entry)
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "audit write failed: refusing to answer the route request");
            ApiError::unavailable("the audit log cannot be written; no decision can be given")
        })?
        .decision_id
        .ok_or_else(|| ApiError::new(Code::Internal, "the audit log gave no decision id"))
}

/// Record every approval transition an operation made (SPEC 3.1: each is an audit record
/// naming the token and the note). An error means the caller must answer 503.
pub async fn approval_transitions(
    state: &AppState,
    transitions: &[crate::store::approvals::Transition],
) -> Result<(), ApiError> {
    use crate::store::approvals::TransitionKind as T;
    for t in transitions {
        let kind = match t.kind {
            T::Opened => RecordKind::ApprovalOpened,
            T::Voted => RecordKind::ApprovalVoted,
            T::Approved => RecordKind::ApprovalApproved,
            T::Denied => RecordKind::ApprovalDenied,
            T::Expired => RecordKind::ApprovalExpired,
            T::Cancelled => RecordKind::ApprovalCancelled,
            T::Used | T::Reused => RecordKind::ApprovalUsed,
        };
        let a = &t.approval;
        event(state, kind, t.token_id.as_deref(), |e| {
            e.tenant_id = Some(a.tenant_id.clone());
            e.capability_id = Some(a.capability_id.clone());
            e.env = Some(a.env.clone());
            e.data_label = Some(a.data_label.clone());
            e.rule_id = Some(a.rule_id.clone());
            e.worker_id = Some(a.worker_id.clone());
            let mut d = format!("approval_id={} state={} digest={}", a.id, a.state, a.digest);
            if let Some(n) = &t.note {
                d.push_str(" note=");
                d.push_str(n);
            }
            e.detail = Some(d);
        })
        .await?;
    }
    Ok(())
}

/// Append a non-decision record. Failures are logged; the caller decides whether they
/// block the operation (`required`).
pub async fn event(
    state: &AppState,
    kind: RecordKind,
    token_id: Option<&str>,
    fill: impl FnOnce(&mut AuditEntry),
) -> Result<(), ApiError> {
    let mut entry = AuditEntry::new(kind, now_ms());
    entry.token_id = token_id.map(str::to_string);
    fill(&mut entry);
    state
        .stores
        .audit
        .append(entry)
        .await
        .map(|_| ())
        .map_err(|e| {
            tracing::error!(error = %e, ?kind, "audit write failed");
            ApiError::unavailable("the audit log cannot be written")
        })
}

/// The audit head for `/api/status`.
pub fn head(state: &AppState) -> serde_json::Value {
    serde_json::to_value(state.stores.audit.head()).unwrap_or_default()
}

/// Record a reload (success or failure): what triggered it (`startup`, `file change`,
/// `SIGHUP`, `api`) and, for the API, the token that asked. A reload is not refused when
/// this fails: the files are already in force; the failure is logged.
pub async fn reload(
    state: &AppState,
    trigger: &str,
    token_id: Option<&str>,
    ok: bool,
    version: &str,
    errors: &[String],
) {
    let _ = event(state, RecordKind::Reload, token_id, |e| {
        e.allowed = Some(ok);
        if ok {
            e.policy_version = Some(version.to_string());
            e.detail = Some(format!("trigger: {trigger}"));
        } else {
            e.detail = Some(format!("trigger: {trigger}\n{}", errors.join("\n")));
        }
    })
    .await;
}

/// Flush and stop the audit writer, and persist token last-used times.
pub async fn shutdown(state: &AppState) {
    let audit = state.stores.audit.clone();
    let tokens = state.stores.tokens.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Err(e) = tokens.persist_last_used() {
            tracing::warn!(error = %e, "could not save token last-used times");
        }
        audit.shutdown();
    })
    .await;
}

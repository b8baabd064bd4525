//! Approvals over HTTP (SPEC 3.1): opening and redeeming inside `/api/route`, the queue for
//! approvers, one approval (with a long-poll), and approve / deny / cancel.

use std::time::Duration;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::auth::{tenant_mismatch, Caller};
use super::errors::{ApiError, Code};
use super::record;
use super::route::RouteBody;
use super::state::{now_ms, AppState};
use crate::engine::Decision;
use crate::store::approvals::{
    Approval, ApprovalError, NewApproval, Outcome, Redemption, State, MAX_NOTE,
};
use crate::store::tokens::{Authenticated, Scope};

/// The longest `?wait=` a client may ask for, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;
/// How often due expiries and veto windows are written (and audited) without a reader.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// The most approvals one list answer holds.
const MAX_LIST: usize = 1000;

/// What a route request's approval came to.
pub struct Settled {
    pub id: String,
    pub expires_at: Option<String>,
}

/// Why a route request's approval step did not produce a decision.
pub enum Settle {
    /// A policy-level refusal that is still recorded as a denied decision, then answered with
    /// this error (403 `approval_mismatch`, 409 `approval_used`).
    Refused(ApiError),
    /// The request cannot be answered (store or audit failure).
    Failed(ApiError),
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "approval store error");
    ApiError::new(Code::Internal, "internal error; see the daemon's log")
}

fn mismatch() -> ApiError {
    ApiError::new(Code::ApprovalMismatch,
        "this approval does not exist or was given for another request (capability, env, label, tenant, rule or worker differ)",
    )
}

/// Milliseconds since the epoch as RFC 3339 UTC with milliseconds.
fn rfc3339(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    let fmt = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&fmt).ok()
}

/// Record an operation's transitions, then hand back its result.
async fn audited<T>(state: &AppState, (r, transitions): Outcome<T>) -> Result<T, Settle> {
    record::approval_transitions(state, &transitions)
        .await
        .map_err(Settle::Failed)?;
    r.map_err(|e| Settle::Failed(error(e)))
}

/// The approval step of `/api/route`, after the engine decided.
///
/// - With `approval_id`: the fresh decision must reach a `require_approval` rule with the same
///   digest (else 403 `approval_mismatch`); the approval's state decides (`approval_pending`,
///   `approval_denied`, `approval_expired`, `approval_cancelled`, 409 `approval_used`, or
///   allowed with the worker). A dry run reports without using it.
/// - Without: a `require_approval` decision opens an approval (or returns the pending one for
///   the same request). A dry run opens nothing.
pub async fn settle<'s>(
    state: &AppState,
    caller: &Authenticated,
    body: &RouteBody,
    decision: &mut Decision<'s>,
    dry_run: bool,
) -> Result<Option<Settled>, Settle> {
    let now = now_ms();
    let store = &state.stores.approvals;
    let need = decision.approval;
    match (&body.approval_id, need) {
        (Some(_), None) => {
            decision.allowed = false;
            decision.worker_id = None;
            decision.deny_reason = Some("approval_mismatch");
            Err(Settle::Refused(mismatch()))
        }
        (Some(id), Some(need)) => {
            let redemption = if dry_run {
                let a = store
                    .get(id, now)
                    .map_err(|e| Settle::Failed(internal(e)))?;
                match a {
                    Some(a) if a.digest == hex(&need.digest) => match a.state {
                        State::Approved => {
                            Redemption::Allowed(Box::new(crate::store::approvals::Transition {
                                kind: crate::store::approvals::TransitionKind::Reused,
                                approval: a,
                                token_id: None,
                                note: None,
                            }))
                        }
                        s => Redemption::Refused(s),
                    },
                    _ => Redemption::Mismatch,
                }
            } else {
                audited(state, store.redeem(id, &need.digest, caller.id(), now)).await?
            };
            decision.allowed = false;
            decision.worker_id = None;
            let mut expires_at = None;
            match redemption {
                Redemption::Mismatch => {
                    decision.deny_reason = Some("approval_mismatch");
                    return Err(Settle::Refused(mismatch()));
                }
                Redemption::Refused(State::Used) => {
                    decision.deny_reason = Some("approval_used");
                    return Err(Settle::Refused(ApiError::new(
                        Code::ApprovalUsed,
                        "this approval was for one use and has been used",
                    )));
                }
                Redemption::Refused(s) => {
                    decision.deny_reason = Some(match s {
                        State::Pending => "approval_pending",
                        State::Denied => "approval_denied",
                        State::Cancelled => "approval_cancelled",
                        _ => "approval_expired",
                    });
                }
                Redemption::Allowed(t) => {
                    decision.allowed = true;
                    decision.worker_id = Some(need.worker_id);
                    decision.deny_reason = None;
                    expires_at = rfc3339(t.approval.expires_at_ms);
                }
            }
            Ok(Some(Settled {
                id: id.clone(),
                expires_at,
            }))
        }
        (None, Some(need)) if !dry_run => {
            let a = audited(
                state,
                store.open_for(
                    NewApproval {
                        digest: need.digest,
                        tenant_id: &body.tenant_id,
                        capability_id: &body.capability_id,
                        env: &body.env,
                        data_label: &body.data_label,
                        rule_id: decision.rule_id.unwrap_or(""),
                        worker_id: need.worker_id,
                        opened_by: caller.id(),
                        settings: need.settings,
                    },
                    now,
                ),
            )
            .await?;
            Ok(Some(Settled {
                expires_at: rfc3339(a.expires_at_ms),
                id: a.id,
            }))
        }
        _ => Ok(None),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An approval-store error as the client sees it.
fn error(e: ApprovalError) -> ApiError {
    match e {
        ApprovalError::NotFound => ApiError::not_found("no such approval"),
        ApprovalError::Conflict(s) => ApiError::new(Code::ApprovalConflict,
            format!("the approval is {s}: it cannot move that way"),
        ),
        ApprovalError::AlreadyVoted => ApiError::new(Code::ApprovalConflict,
            "the approval is pending: this token has already approved it, and approvers must be distinct",
        ),
        ApprovalError::SelfApproval => ApiError::new(Code::SelfApproval,
            "the token that opened an approval cannot approve it (separation of duties)",
        ),
        ApprovalError::NotOpener => ApiError::new(Code::NotOpener,
            "only the token that opened an approval may cancel it",
        ),
        ApprovalError::TooManyPending(n) => ApiError::new(Code::TooManyPendingApprovals,
            format!("this tenant already has {n} pending approvals; decide or cancel some first"),
        ),
        ApprovalError::Store(e) => internal(e),
    }
}

/// An approval as the API shows it: the stored fields plus RFC 3339 times.
fn view(a: &Approval) -> serde_json::Value {
    let mut v = serde_json::to_value(a).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert("opened_at".into(), json!(rfc3339(a.opened_at_ms)));
        o.insert("expires_at".into(), json!(rfc3339(a.expires_at_ms)));
        o.insert(
            "approved_at".into(),
            json!(a.approved_at_ms.and_then(rfc3339)),
        );
    }
    v
}

/// The approval `id`, visible to this caller (a tenant-bound token: its tenant only).
fn visible(
    state: &AppState,
    caller: &crate::store::tokens::Authenticated,
    id: &str,
) -> Result<Approval, ApiError> {
    let a = state
        .stores
        .approvals
        .get(id, now_ms())
        .map_err(internal)?
        .ok_or_else(|| ApiError::not_found("no such approval"))?;
    if !caller.may_act_for(&a.tenant_id) {
        return Err(super::auth::tenant_mismatch());
    }
    // A route-only token sees the approvals it opened or joined (its identical request was
    // answered with this one); approvers see the queue.
    if !caller.allows(Scope::Approve)
        && a.opened_by != caller.id()
        && !a.joined_by.iter().any(|t| t == caller.id())
    {
        return Err(ApiError::not_found("no such approval"));
    }
    Ok(a)
}

/// One approval as `GET /api/approvals/{id}` shows it, for a caller that is not an HTTP
/// request (the MCP `approval_status` tool): the same visibility rules as [`visible`].
pub fn status_for(
    state: &AppState,
    who: &crate::store::tokens::Authenticated,
    id: &str,
) -> Result<serde_json::Value, ApiError> {
    visible(state, who, id).map(|a| view(&a))
}

/// `GET /api/approvals?state=&tenant_id=&limit=`
pub async fn list(
    caller: Caller,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let (mut st, mut tenant, mut limit) = (None, None, MAX_LIST);
    for (k, v) in super::api::query_pairs(&req)? {
        match k.as_str() {
            "state" => {
                st = Some(State::parse(&v).ok_or_else(|| {
                    ApiError::invalid(
                        "state",
                        "state must be pending, approved, denied, expired, cancelled or used",
                    )
                })?)
            }
            "tenant_id" => tenant = Some(v),
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_LIST).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid("limit", format!("limit must be 1..={MAX_LIST}"))
                    })?
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    if let Some(t) = caller.tenant() {
        match &tenant {
            Some(asked) if asked != t => return Err(tenant_mismatch()),
            _ => tenant = Some(t.to_string()),
        }
    }
    let st2 = state.clone();
    let items = web::block(move || {
        st2.stores
            .approvals
            .list(now_ms(), st, tenant.as_deref(), limit)
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    let items: Vec<_> = items.iter().map(view).collect();
    Ok(HttpResponse::Ok().json(json!({ "approvals": items })))
}

/// `GET /api/approvals/{id}[?wait=SECS]`: with `wait`, answer as soon as the state differs
/// from what it was when the request arrived, or after `wait` seconds (at most 60). Waiting
/// holds no thread: it awaits the store's change signal or the approval's next deadline.
pub async fn show(
    caller: Caller,
    path: web::Path<String>,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut wait = 0u64;
    for (k, v) in super::api::query_pairs(&req)? {
        match k.as_str() {
            "wait" => {
                wait = v
                    .parse()
                    .ok()
                    .filter(|n| *n <= MAX_WAIT_SECS)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "wait",
                            format!("wait must be 0..={MAX_WAIT_SECS} seconds"),
                        )
                    })?
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    let id = path.into_inner();
    let mut rx = state.stores.approvals.subscribe();
    let first = visible(&state, &caller, &id)?;
    let initial = first.state;
    let mut current = first;
    let until = tokio::time::Instant::now() + Duration::from_secs(wait);
    while current.state == initial && tokio::time::Instant::now() < until {
        // Wake for a write, for the approval's own deadline (expiry, veto window), or at the end.
        let mut wake = until;
        if let Some(d) = current.next_deadline() {
            let ms = (d - now_ms()).max(0) as u64 + 5;
            wake = wake.min(tokio::time::Instant::now() + Duration::from_millis(ms));
        }
        tokio::select! {
            r = rx.changed() => { if r.is_err() { break; } }
            _ = tokio::time::sleep_until(wake) => {}
        }
        current = visible(&state, &caller, &id)?;
    }
    Ok(HttpResponse::Ok().json(view(&current)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NoteBody {
    note: Option<String>,
}

/// The optional `{"note": …}` body: empty is fine; a note is bounded, printable text.
async fn note(req: &HttpRequest, payload: web::Payload) -> Result<Option<String>, ApiError> {
    let empty = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == "0")
        || (req.headers().get("content-type").is_none()
            && req.headers().get("transfer-encoding").is_none()
            && req.headers().get("content-length").is_none());
    if empty {
        return Ok(None);
    }
    let bytes = super::route::read_json_body(req, payload).await?;
    let b: NoteBody = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::invalid(
            "body",
            format!("expected {{\"note\": \"…\"}} or no body: {e}"),
        )
    })?;
    if let Some(n) = &b.note {
        crate::text::check(n, MAX_NOTE)
            .map_err(|e| ApiError::invalid("note", format!("note {e}")))?;
    }
    Ok(b.note)
}

enum Act {
    Approve,
    Deny,
    Cancel,
}

async fn act(
    caller: Caller,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
    what: Act,
) -> Result<HttpResponse, ApiError> {
    let note = note(&req, payload).await?;
    let id = path.into_inner();
    let a = visible(&state, &caller, &id)?;
    let store = &state.stores.approvals;
    let now = now_ms();
    let n = note.as_deref();
    let outcome = match what {
        Act::Approve => store.approve(&a.id, caller.id(), n, now),
        Act::Deny => store.deny(&a.id, caller.id(), n, now),
        Act::Cancel => store.cancel(&a.id, caller.id(), n, now),
    };
    let a = match audited(&state, outcome).await {
        Ok(a) => a,
        Err(Settle::Failed(e) | Settle::Refused(e)) => return Err(e),
    };
    Ok(HttpResponse::Ok().json(view(&a)))
}

/// `POST /api/approvals/{id}/approve` (approve scope; not the opener; distinct approvers).
pub async fn approve(
    caller: Caller,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    act(caller, path, req, payload, state, Act::Approve).await
}

/// `POST /api/approvals/{id}/deny` (approve scope).
pub async fn deny(
    caller: Caller,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    act(caller, path, req, payload, state, Act::Deny).await
}

/// `POST /api/approvals/{id}/cancel` (the token that opened it).
pub async fn cancel(
    caller: Caller,
    path: web::Path<String>,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    act(caller, path, req, payload, state, Act::Cancel).await
}

/// Write and audit due expiries and veto windows every few seconds, so they are in the audit
/// log even when nobody reads the approval again (reads apply them regardless).
pub fn spawn_sweep(state: &std::sync::Arc<AppState>) {
    let st = state.clone();
    actix_web::rt::spawn(async move {
        loop {
            actix_web::rt::time::sleep(SWEEP_EVERY).await;
            let s2 = st.clone();
            let Ok(outcome) = web::block(move || s2.stores.approvals.sweep(now_ms())).await else {
                continue;
            };
            if let Err(Settle::Failed(e) | Settle::Refused(e)) = audited(&st, outcome).await {
                tracing::warn!(error = %e, "approval sweep");
            }
        }
    });
}

/// Approval metrics for `/metrics`: the pending gauge and transitions by kind.
pub fn metrics_text(state: &AppState) -> String {
    use std::fmt::Write;
    let store = &state.stores.approvals;
    let mut s = String::new();
    s.push_str("# HELP hall_approvals_pending Approvals pending now.\n# TYPE hall_approvals_pending gauge\n");
    let _ = writeln!(
        s,
        "hall_approvals_pending {}",
        store.pending_now(now_ms()).unwrap_or(0)
    );
    s.push_str("# HELP hall_approval_transitions_total Approval transitions since start, by kind.\n# TYPE hall_approval_transitions_total counter\n");
    for (k, n) in store.transition_counts() {
        let _ = writeln!(
            s,
            "hall_approval_transitions_total{{kind=\"{}\"}} {n}",
            k.as_str()
        );
    }
    s.push_str("# HELP hall_approval_decision_seconds Time from opening an approval to its decision (approved, denied, cancelled, or expired while pending), by outcome.\n# TYPE hall_approval_decision_seconds histogram\n");
    for h in store.decision_histograms() {
        let o = h.outcome;
        for (le, n) in crate::store::approvals::DECISION_BUCKETS
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_string()])
            .zip(&h.cumulative)
        {
            let _ = writeln!(
                s,
                "hall_approval_decision_seconds_bucket{{outcome=\"{o}\",le=\"{le}\"}} {n}"
            );
        }
        let _ = writeln!(
            s,
            "hall_approval_decision_seconds_sum{{outcome=\"{o}\"}} {}",
            h.sum_secs
        );
        let _ = writeln!(
            s,
            "hall_approval_decision_seconds_count{{outcome=\"{o}\"}} {}",
            h.count
        );
    }
    s
}

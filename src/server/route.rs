//! `POST /api/route`: parse strictly, decide, record, answer.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::value::RawValue;

use super::auth::Caller;
use super::errors::{ApiError, Code};
use super::state::AppState;
use crate::engine::{decide, valid_id, Decision, Explain, Request};
use crate::store::audit::{AuditEntry, RecordKind};
use crate::store::tokens::{Authenticated, Scope};

/// Request bodies larger than this are refused with 413.
pub const MAX_BODY: usize = 64 * 1024;
/// The `context` object is recorded in the audit log; it may not exceed this.
pub const MAX_CONTEXT: usize = 8 * 1024;
/// How long a client may take to send a body once its headers are in (the headers themselves
/// have actix's `client_request_timeout`). A client that stalls is answered 408 and its
/// connection closed, so stalled bodies cannot hold connections (and file descriptors).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Length limits, in characters, of the free-text fields that are recorded.
const MAX_CORRELATION_ID: usize = 128;
const MAX_LABEL_TEXT: usize = 64;

/// The request body, exactly as SPEC 4 allows. Unknown fields are rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteBody {
    pub capability_id: String,
    pub env: String,
    pub data_label: String,
    pub tenant_id: String,
    pub correlation_id: Option<String>,
    pub dry_run: Option<bool>,
    pub approval_id: Option<String>,
    pub context: Option<Box<RawValue>>,
    pub tenant_risk: Option<String>,
    pub qos_class: Option<String>,
}

const REQUIRED: [&str; 4] = ["capability_id", "env", "data_label", "tenant_id"];
const OPTIONAL_STRINGS: [&str; 4] = ["correlation_id", "approval_id", "tenant_risk", "qos_class"];

/// The answer. Written by [`RouteResponse::to_json`]; the derive is the oracle its tests
/// hold it to (only there: the daemon never serializes it through serde).
#[cfg_attr(test, derive(serde::Serialize))]
struct RouteResponse<'a> {
    decision_id: &'a str,
    allowed: bool,
    worker_id: Option<&'a str>,
    deny_reason: Option<&'a str>,
    rule_id: Option<&'a str>,
    policy_version: &'a str,
    approval_id: Option<&'a str>,
    /// When an opened approval expires unless decided, or until when a redeemed one holds.
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    approval_expires_at: Option<String>,
    dry_run: bool,
    #[cfg_attr(test, serde(skip_serializing_if = "Option::is_none"))]
    explain: Option<&'a Explain<'a>>,
}

impl RouteResponse<'_> {
    /// The bytes `serde_json::to_vec` makes of the derived form, written directly: serde's
    /// string escaping went over every byte of the answer, a tenth of a decision's
    /// instructions. Only `explain` (asked for, and large) still goes through serde.
    fn to_json(&self) -> Result<Vec<u8>, serde_json::Error> {
        fn text(out: &mut Vec<u8>, key: &str, v: Option<&str>) {
            out.extend_from_slice(key.as_bytes());
            match v {
                Some(v) => json_str(out, v),
                None => out.extend_from_slice(b"null"),
            }
        }
        fn flag(out: &mut Vec<u8>, key: &str, v: bool) {
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(if v { b"true" } else { b"false" });
        }
        let mut out = Vec::with_capacity(320);
        text(&mut out, "{\"decision_id\":", Some(self.decision_id));
        flag(&mut out, ",\"allowed\":", self.allowed);
        text(&mut out, ",\"worker_id\":", self.worker_id);
        text(&mut out, ",\"deny_reason\":", self.deny_reason);
        text(&mut out, ",\"rule_id\":", self.rule_id);
        text(&mut out, ",\"policy_version\":", Some(self.policy_version));
        text(&mut out, ",\"approval_id\":", self.approval_id);
        if let Some(at) = &self.approval_expires_at {
            text(&mut out, ",\"approval_expires_at\":", Some(at));
        }
        flag(&mut out, ",\"dry_run\":", self.dry_run);
        if let Some(explain) = self.explain {
            out.extend_from_slice(b",\"explain\":");
            serde_json::to_writer(&mut out, explain)?;
        }
        out.push(b'}');
        Ok(out)
    }
}

/// `v` as a JSON string, as serde_json writes it: copied when nothing in it needs an escape
/// (ids, versions and reason codes never do), else escaped by serde_json.
fn json_str(out: &mut Vec<u8>, v: &str) {
    // A fold without an early exit, so that the compiler checks 16 or 32 bytes at a time.
    let plain = !v.bytes().fold(false, |esc, b| {
        esc | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(v.as_bytes());
        out.push(b'"');
    } else {
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, v);
    }
}

/// Read a JSON body: `application/json` (415 otherwise), at most `MAX_BODY` (413).
pub async fn read_json_body(
    req: &HttpRequest,
    mut payload: web::Payload,
) -> Result<web::BytesMut, ApiError> {
    use futures_util::StreamExt;
    let ct = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct.split(';').next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::new(
            Code::UnsupportedMediaType,
            format!("Content-Type must be application/json, got {:?}", ct),
        ));
    }
    let too_large = || {
        ApiError::new(
            Code::BodyTooLarge,
            format!("request body is larger than {} KiB", MAX_BODY / 1024),
        )
    };
    if let Some(len) = req
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > MAX_BODY {
            return Err(too_large());
        }
    }
    let read = async {
        let mut body = web::BytesMut::new();
        while let Some(chunk) = payload.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::invalid("body", format!("cannot read body: {e}")))?;
            if body.len() + chunk.len() > MAX_BODY {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    };
    let read = std::pin::pin!(read);
    match (ArmLate {
        fut: read,
        deadline: tokio::time::Instant::now() + BODY_TIMEOUT,
        polled: false,
        sleep: None,
    })
    .await
    {
        Some(r) => r,
        None => Err(ApiError::new(
            Code::RequestTimeout,
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )
        .with_header("Connection", "close".into())),
    }
}

/// `fut` with a deadline (`None` when it passes), whose timer is armed only if `fut` is
/// still pending at its second poll. Arming and cancelling a tokio timer costs more than
/// reading a small body, and a small body is almost always read by then: actix polls the
/// handler once when the request head is decoded (the body not fed yet), then again in the
/// same turn, after feeding what it read with the head. The first poll wakes its own task,
/// so the second poll comes whatever actix does; a body still on its way then gets the
/// timer, with the deadline counted from the first poll. `tests/connections.rs` sends bodies
/// late, stalled halfway, and stalled behind a pipelined request.
struct ArmLate<F> {
    fut: F,
    deadline: tokio::time::Instant,
    polled: bool,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<F: Future + Unpin> Future for ArmLate<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(v) = std::pin::Pin::new(&mut this.fut).poll(cx) {
            return Poll::Ready(Some(v));
        }
        if !std::mem::replace(&mut this.polled, true) {
            // Ask for the second poll rather than count on actix to make it: a pipelined
            // request taken from actix's queue is polled once per turn, and a stalled body
            // would then never arm the timer. When the body is being fed in this turn (the
            // usual case) its waker has this task polled again anyway, and the two wakes
            // are one.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        sleep.as_mut().poll(cx).map(|()| None)
    }
}

/// Turn a failed typed parse into an error naming the field, by looking at the body again.
fn body_error(bytes: &[u8], typed: serde_json::Error) -> ApiError {
    let v: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => return ApiError::invalid("body", format!("malformed JSON: {e}")),
    };
    let Some(obj) = v.as_object() else {
        return ApiError::invalid("body", "the body must be a JSON object");
    };
    for k in obj.keys() {
        if !REQUIRED.contains(&k.as_str())
            && !OPTIONAL_STRINGS.contains(&k.as_str())
            && k != "dry_run"
            && k != "context"
        {
            return ApiError::invalid(k.clone(), format!("unknown field {k:?}"));
        }
    }
    for k in REQUIRED {
        match obj.get(k) {
            None => return ApiError::invalid(k, format!("missing required field {k:?}")),
            Some(v) if !v.is_string() => {
                return ApiError::invalid(k, format!("{k:?} must be a string, got {}", kind(v)))
            }
            _ => {}
        }
    }
    for k in OPTIONAL_STRINGS {
        if let Some(v) = obj.get(k) {
            if !v.is_string() && !v.is_null() {
                return ApiError::invalid(k, format!("{k:?} must be a string, got {}", kind(v)));
            }
        }
    }
    if let Some(v) = obj.get("dry_run") {
        if !v.is_boolean() && !v.is_null() {
            return ApiError::invalid(
                "dry_run",
                format!("\"dry_run\" must be a boolean, got {}", kind(v)),
            );
        }
    }
    ApiError::invalid("body", format!("invalid request: {typed}"))
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// `?explain=true`; other query parameters are refused so a typo is not silently ignored.
fn parse_explain(query: &str) -> Result<bool, ApiError> {
    let mut explain = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        match (k, v) {
            ("explain", "true" | "1") => explain = true,
            ("explain", "false" | "0") => explain = false,
            ("explain", other) => {
                return Err(ApiError::invalid(
                    "explain",
                    format!("explain must be true or false, got {other:?}"),
                ))
            }
            (other, _) => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    Ok(explain)
}

/// Check the optional fields the engine does not see. Every one of them is recorded, so
/// each has a length limit and the character policy of [`crate::text`].
fn check_extras(b: &RouteBody) -> Result<(), ApiError> {
    for (name, v, max) in [
        ("correlation_id", &b.correlation_id, MAX_CORRELATION_ID),
        ("tenant_risk", &b.tenant_risk, MAX_LABEL_TEXT),
        ("qos_class", &b.qos_class, MAX_LABEL_TEXT),
    ] {
        if let Some(v) = v {
            crate::text::check(v, max)
                .map_err(|e| ApiError::invalid(name, format!("{name} {e}")))?;
        }
    }
    if let Some(a) = &b.approval_id {
        if !valid_id(a) {
            return Err(ApiError::invalid(
                "approval_id",
                format!("{a:?} is not a valid id"),
            ));
        }
    }
    if let Some(ctx) = &b.context {
        let raw = ctx.get();
        if !raw.starts_with('{') {
            return Err(ApiError::invalid(
                "context",
                "context must be a JSON object",
            ));
        }
        if raw.len() > MAX_CONTEXT {
            return Err(ApiError::invalid(
                "context",
                format!("context is larger than {} KiB", MAX_CONTEXT / 1024),
            ));
        }
        // It is recorded byte for byte, so it must be JSON every reader can parse: no lone
        // surrogate escapes, no number beyond f64's range, nesting within serde_json's limit.
        if let Err(e) = serde_json::from_str::<serde_json::Value>(raw) {
            return Err(ApiError::invalid(
                "context",
                format!("context is not JSON that can be recorded as sent: {e}"),
            ));
        }
    }
    Ok(())
}

/// The handler. Policy outcomes are 200 with `allowed: false`; HTTP errors are only for
/// requests that cannot be decided or recorded.
pub async fn route(
    caller: Caller,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    let result = route_inner(&caller, &req, payload, state.clone().into_inner(), started).await;
    if let Err(e) = &result {
        state.metrics.refused(e.code);
    }
    result
}

async fn route_inner(
    caller: &Caller,
    req: &HttpRequest,
    payload: web::Payload,
    state: Arc<AppState>,
    started: Instant,
) -> Result<HttpResponse, ApiError> {
    let explain = parse_explain(req.query_string())?;
    let bytes = read_json_body(req, payload).await?;
    let body = parse_body(&bytes)?;
    let out = decide_and_record(&state, caller, body, explain, started).await?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(out))
}

/// Parse and check a route request body: the typed parse, then the optional fields.
/// `/api/route` and the MCP `route` and `explain` tools share it, so they accept exactly
/// the same input.
pub fn parse_body(bytes: &[u8]) -> Result<RouteBody, ApiError> {
    let body: RouteBody = serde_json::from_slice(bytes).map_err(|e| body_error(bytes, e))?;
    check_extras(&body)?;
    Ok(body)
}

/// Decide a parsed request for `caller`, record it (naming the caller's token) and return
/// the response body (JSON). `/api/route` and the MCP `route` and `explain` tools all call
/// this: one decision, one audit record, one answer shape, whichever way the request came.
pub async fn decide_and_record(
    state: &AppState,
    caller: &Authenticated,
    body: RouteBody,
    explain: bool,
    started: Instant,
) -> Result<Vec<u8>, ApiError> {
    require_route_scope(caller)?;
    if !caller.may_act_for(&body.tenant_id) {
        return Err(super::auth::tenant_mismatch());
    }

    let snap = state
        .snapshot
        .load_full()
        .ok_or_else(|| ApiError::unavailable("no policy set is loaded yet; see /api/status"))?;
    let request = Request {
        capability_id: &body.capability_id,
        env: &body.env,
        data_label: &body.data_label,
        tenant_id: &body.tenant_id,
    };
    let mut decision =
        decide(&snap, &request, explain).map_err(|e| ApiError::invalid(e.field, e.message))?;
    let dry_run = body.dry_run.unwrap_or(false);
    let approval = super::approvals::settle(state, caller, &body, &mut decision, dry_run).await;
    let (approval_id, approval_expires_at, refusal) = match approval {
        Ok(Some(s)) => (Some(s.id), s.expires_at, None),
        Ok(None) => (None, None, None),
        // A forged, re-targeted or spent approval is refused, and recorded as such.
        Err(super::approvals::Settle::Refused(e)) => (None, None, Some(e)),
        Err(super::approvals::Settle::Failed(e)) => return Err(e),
    };
    let detail = body
        .approval_id
        .as_deref()
        .or(approval_id.as_deref())
        .map(|id| format!("approval_id={id}"));
    let entry = decision_entry(caller, body, &decision, &snap.version, dry_run, detail);
    let decision_id = super::record::decision(state, entry).await?;
    if let Some(e) = refusal {
        return Err(e);
    }
    let mut id_buf = uuid::Uuid::encode_buffer();
    let decision_id = &*decision_id.hyphenated().encode_lower(&mut id_buf);

    let resp = RouteResponse {
        decision_id,
        allowed: decision.allowed,
        worker_id: decision.worker_id,
        deny_reason: decision.deny_reason,
        rule_id: decision.rule_id,
        policy_version: &snap.version,
        approval_id: approval_id.as_deref(),
        approval_expires_at,
        dry_run,
        explain: decision.explain.as_ref(),
    };
    let out = resp
        .to_json()
        .map_err(|e| ApiError::new(Code::Internal, e.to_string()))?;
    state
        .metrics
        .decision(decision.allowed, decision.deny_reason, started.elapsed());
    Ok(out)
}

/// The audit record of a route decision, taking the request's strings (not copying them).
/// `detail` names the approval a decision opened or redeemed.
fn decision_entry(
    caller: &Authenticated,
    body: RouteBody,
    decision: &Decision<'_>,
    policy_version: &str,
    dry_run: bool,
    detail: Option<String>,
) -> AuditEntry {
    let RouteBody {
        capability_id,
        env,
        data_label,
        tenant_id,
        correlation_id,
        dry_run: _,
        approval_id: _,
        context,
        tenant_risk,
        qos_class,
    } = body;
    AuditEntry {
        tenant_id: Some(tenant_id),
        capability_id: Some(capability_id),
        env: Some(env),
        data_label: Some(data_label),
        allowed: Some(decision.allowed),
        dry_run,
        worker_id: decision.worker_id.map(str::to_string),
        deny_reason: decision.deny_reason.map(str::to_string),
        rule_id: decision.rule_id.map(str::to_string),
        policy_version: Some(policy_version.to_string()),
        correlation_id,
        // The context exactly as the client sent it (bounded to 8 KiB by the handler):
        // numbers are not re-parsed (no rounding), nothing is dropped for being deep.
        context: context.map(|raw| Box::<str>::from(raw).into_string()),
        tenant_risk,
        qos_class,
        token_id: Some(caller.id().to_string()),
        detail,
        ..AuditEntry::new(RecordKind::Decision, super::state::now_ms())
    }
}

/// 403 unless the token has the `route` scope. The gate checks it too, but against the raw
/// path: a percent-encoded spelling (`/api/%72oute`) reached the handler with any token.
/// Checked again here, where the decision is made, so no path spelling can skip it.
pub fn require_route_scope(caller: &Authenticated) -> Result<(), ApiError> {
    if caller.allows(Scope::Route) {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::Forbidden,
            format!("this token lacks the {} scope", Scope::Route),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        // Plain ids, and text with every kind of byte serde_json escapes.
        prop_oneof![
            "[a-z0-9._:-]{0,70}",
            "\\PC{0,12}",
            "[\\x00-\\x7f\"\\\\]{0,12}",
            ".{0,8}"
        ]
    }

    proptest! {
        #[test]
        fn the_answer_is_the_json_serde_writes(
            decision_id in text(),
            allowed in any::<bool>(),
            worker_id in proptest::option::of(text()),
            deny_reason in proptest::option::of(text()),
            rule_id in proptest::option::of(text()),
            policy_version in text(),
            approval_id in proptest::option::of(text()),
            approval_expires_at in proptest::option::of(text()),
            dry_run in any::<bool>(),
            explained in any::<bool>(),
        ) {
            let explain = Explain::default();
            let r = RouteResponse {
                decision_id: &decision_id,
                allowed,
                worker_id: worker_id.as_deref(),
                deny_reason: deny_reason.as_deref(),
                rule_id: rule_id.as_deref(),
                policy_version: &policy_version,
                approval_id: approval_id.as_deref(),
                approval_expires_at,
                dry_run,
                explain: explained.then_some(&explain),
            };
            let got = r.to_json().unwrap();
            prop_assert_eq!(
                String::from_utf8(got).unwrap(),
                serde_json::to_string(&r).unwrap()
            );
        }
    }
}

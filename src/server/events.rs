//! `GET /api/events`: Server-Sent Events read from the audit log.
//!
//! Each event is one audit record: `id:` is its audit seq, so `Last-Event-ID` resumes exactly
//! after the last event a client saw (no gap, no duplicate). The stream reads the log at its
//! own pace (a short poll on `seq > last`), so a slow consumer never slows decisions and holds
//! no buffer beyond one page: it simply falls behind and catches up from disk.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};

use super::auth::Caller;
use super::errors::ApiError;
use super::state::AppState;
use crate::store::audit::{AuditQuery, AuditRecord, RecordKind};

/// The event types, as named in `?types=` and in each event's `event:` line.
pub const TYPES: [&str; 5] = [
    "decision",
    "approval.opened",
    "approval.decided",
    "policy.reloaded",
    "policy.rejected",
];
/// How often the log is read for new records when nothing is pending.
const POLL: Duration = Duration::from_millis(200);
/// A comment line this often keeps proxies from closing an idle stream and detects a gone client.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Records read per page.
const PAGE: usize = 500;

/// The event type of a record, if it is one the stream carries.
fn event_type(r: &AuditRecord) -> Option<&'static str> {
    Some(match r.entry.kind {
        RecordKind::Decision => "decision",
        RecordKind::ApprovalOpened => "approval.opened",
        RecordKind::ApprovalApproved
        | RecordKind::ApprovalDenied
        | RecordKind::ApprovalExpired
        | RecordKind::ApprovalCancelled
        | RecordKind::ApprovalUsed => "approval.decided",
        RecordKind::Reload if r.entry.allowed == Some(true) => "policy.reloaded",
        RecordKind::Reload => "policy.rejected",
        _ => return None,
    })
}

struct Cursor {
    state: web::Data<AppState>,
    after: u64,
    types: Vec<&'static str>,
    tenant: Option<String>,
    ready: VecDeque<String>,
    last_sent: Instant,
    first: bool,
    done: bool,
}

/// `GET /api/events?types=a,b` (scope `audit`; a tenant-bound token sees its tenant's events).
pub async fn events(
    caller: Caller,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut types: Vec<&'static str> = TYPES.to_vec();
    for (k, v) in super::api::query_pairs(&req)? {
        match k.as_str() {
            "types" => {
                types = Vec::new();
                for t in v.split(',').filter(|t| !t.is_empty()) {
                    let known = TYPES.iter().find(|k| **k == t).ok_or_else(|| {
                        ApiError::invalid(
                            "types",
                            format!("unknown event type {t:?} (known: {})", TYPES.join(", ")),
                        )
                    })?;
                    types.push(known);
                }
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    let after = match req.headers().get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::invalid("Last-Event-ID", "Last-Event-ID must be an audit seq number")
            })?,
        // No resume point: from now on.
        None => state.stores.audit.head().seq,
    };
    let cursor = Cursor {
        state,
        after,
        types,
        tenant: caller.tenant().map(str::to_string),
        ready: VecDeque::new(),
        last_sent: Instant::now(),
        first: true,
        done: false,
    };
    let stream = futures_util::stream::unfold(cursor, |mut c| async move {
        loop {
            if c.done && c.ready.is_empty() {
                return None;
            }
            if c.first {
                c.first = false;
                c.last_sent = Instant::now();
                // Tell the client the stream is open (and where it starts) at once.
                return Some((
                    Ok(web::Bytes::from(format!(": from seq {}\n\n", c.after))),
                    c,
                ));
            }
            if let Some(ev) = c.ready.pop_front() {
                c.last_sent = Instant::now();
                return Some((Ok::<_, actix_web::Error>(web::Bytes::from(ev)), c));
            }
            if c.last_sent.elapsed() >= KEEPALIVE {
                c.last_sent = Instant::now();
                return Some((Ok(web::Bytes::from_static(b": keepalive\n\n")), c));
            }
            let q = AuditQuery {
                after_seq: Some(c.after),
                limit: PAGE,
                ..Default::default()
            };
            let audit = c.state.stores.audit.clone();
            let page = match web::block(move || audit.query(&q)).await {
                Ok(Ok(p)) => p,
                _ => {
                    let msg =
                        "event: error\ndata: {\"error\":\"the audit log cannot be read\"}\n\n";
                    // One error event, then the stream ends.
                    c.done = true;
                    return Some((Ok(web::Bytes::from_static(msg.as_bytes())), c));
                }
            };
            if page.is_empty() {
                tokio::time::sleep(POLL).await;
                continue;
            }
            for r in &page {
                c.after = c.after.max(r.seq);
                let Some(t) = event_type(r) else { continue };
                if !c.types.contains(&t) {
                    continue;
                }
                if let Some(tenant) = &c.tenant {
                    if r.entry.tenant_id.as_deref() != Some(tenant) {
                        continue;
                    }
                }
                let data = serde_json::to_string(r).unwrap_or_default();
                c.ready
                    .push_back(format!("id: {}\nevent: {t}\ndata: {data}\n\n", r.seq));
            }
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(stream))
}

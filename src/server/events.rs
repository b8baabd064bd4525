//! `GET /api/events`: Server-Sent Events read from the audit log.
//!
//! Each event is one audit record: `id:` is its audit seq, so `Last-Event-ID` resumes exactly
//! after the last event a client saw (no gap, no duplicate). A stream reads the log itself, a
//! page at a time, and sleeps until the audit writer publishes a new head
//! ([`AuditLog::subscribe_head`](crate::store::audit::AuditLog::subscribe_head)), with a slow
//! poll as a safety net: the decision path only signals, it never waits for a stream.
//!
//! **A slow consumer is dropped.** A stream holds at most one page of records, the server's
//! write buffer and a capped kernel send buffer, whatever the client does. When a client reads
//! so slowly that more than `[events] max_lag` records written since it connected have not been
//! sent, it gets one final `event: dropped` (why, and the `last_event_id` to resume from) and the
//! stream ends. Records that were already in the log when the stream opened (a resume from an
//! old `Last-Event-ID`) are a replay and do not count against it.

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
/// How often the log is read when no new head woke the stream (a safety net only).
const FALLBACK_POLL: Duration = Duration::from_secs(1);
/// The kernel send buffer of an event stream's socket (Linux doubles it): what a client that
/// stops reading can hold there, instead of the several MB autotuning allows on loopback.
const STREAM_SNDBUF: i32 = 32 * 1024;
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
    /// Every record up to this seq has been read (and queued or filtered out).
    after: u64,
    types: Vec<&'static str>,
    tenant: Option<String>,
    /// Events read but not yet handed to the connection: `(seq, frame)`.
    ready: VecDeque<(u64, String)>,
    last_sent: Instant,
    first: bool,
    done: bool,
    /// Wakes the stream when the audit head moves.
    head: tokio::sync::watch::Receiver<u64>,
    /// The head when the stream opened: records up to it are a replay, not lag.
    opened_at: u64,
    /// The id of the last event sent (before any: where the stream started).
    last_id: u64,
    max_lag: u64,
}

impl Cursor {
    /// Records written since the stream opened that the client has not been sent.
    fn unsent(&self) -> u64 {
        let through = self
            .ready
            .front()
            .map_or(self.after, |(seq, _)| seq.saturating_sub(1));
        let head = self.state.stores.audit.head().seq;
        head.saturating_sub(through.max(self.opened_at))
    }

    /// The final event of a stream that fell too far behind.
    fn dropped(&self, unsent: u64) -> String {
        let data = serde_json::json!({
            "reason": "slow_consumer",
            "error": format!(
                "this stream fell {unsent} records behind the audit log (the limit is {}, \
                 [events] max_lag) and was closed; reconnect with Last-Event-ID: {} to resume \
                 without a gap",
                self.max_lag, self.last_id
            ),
            "last_event_id": self.last_id,
            "unsent": unsent,
            "max_lag": self.max_lag,
        });
        format!("event: dropped\ndata: {data}\n\n")
    }
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
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid("Last-Event-ID", "Last-Event-ID must be an audit seq number")
                })?,
        ),
        // No resume point: from now on.
        None => None,
    };
    // Subscribe before reading the head, so no publish between the two is missed.
    let head = state.stores.audit.subscribe_head();
    let opened_at = state.stores.audit.head().seq;
    let after = after.unwrap_or(opened_at);
    if let Some(conn) = req.conn_data::<super::conn::ConnGuard>() {
        conn.limit_send_buffer(STREAM_SNDBUF);
    }
    let cursor = Cursor {
        max_lag: state.config.events_max_lag,
        state,
        after,
        types,
        tenant: caller.tenant().map(str::to_string),
        ready: VecDeque::new(),
        last_sent: Instant::now(),
        first: true,
        done: false,
        head,
        opened_at,
        last_id: after,
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
            if !c.done {
                let unsent = c.unsent();
                if unsent > c.max_lag {
                    // Checked whenever the connection asks for more, i.e. as soon as a stalled
                    // client drains what it was sent: one final event, then the end.
                    tracing::info!(
                        unsent,
                        max_lag = c.max_lag,
                        last_event_id = c.last_id,
                        "event stream dropped: the client reads too slowly"
                    );
                    c.ready.clear();
                    c.done = true;
                    let ev = c.dropped(unsent);
                    return Some((Ok(web::Bytes::from(ev)), c));
                }
            }
            if let Some((seq, ev)) = c.ready.pop_front() {
                c.last_sent = Instant::now();
                c.last_id = seq;
                return Some((Ok::<_, actix_web::Error>(web::Bytes::from(ev)), c));
            }
            if c.last_sent.elapsed() >= KEEPALIVE {
                c.last_sent = Instant::now();
                return Some((Ok(web::Bytes::from_static(b": keepalive\n\n")), c));
            }
            // Seen before reading: a head published after this wakes the wait below.
            c.head.borrow_and_update();
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
                tokio::select! {
                    r = c.head.changed() => {
                        if r.is_err() {
                            tokio::time::sleep(FALLBACK_POLL).await;
                        }
                    }
                    _ = tokio::time::sleep(FALLBACK_POLL) => {}
                }
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
                c.ready.push_back((
                    r.seq,
                    format!("id: {}\nevent: {t}\ndata: {data}\n\n", r.seq),
                ));
            }
        }
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(stream))
}

#[cfg(test)]
mod tests {
    use crate::store::audit::{AuditConfig, AuditEntry, AuditLog, RecordKind};

    #[tokio::test]
    async fn a_new_head_wakes_a_follower() {
        let db = sled::Config::new().temporary(true).open().unwrap();
        let log = AuditLog::open(&db, AuditConfig::default()).unwrap();
        let mut rx = log.subscribe_head();
        let before = *rx.borrow_and_update();
        assert_eq!(before, log.head().seq);
        let a = log
            .append(AuditEntry::new(RecordKind::Reload, 0))
            .await
            .unwrap();
        // Awaited, not polled: the append itself signalled it.
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), a.seq);
        assert!(a.seq > before);
    }
}

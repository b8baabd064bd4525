//! `hall events`: follow the daemon's event stream (`GET /api/events`, Server-Sent Events)
//! and print one JSON object a line: `{"id": SEQ, "event": TYPE, "data": {…}}`. It reconnects
//! after a dropped connection, resuming from the last id it printed, so no event is missed
//! or printed twice.

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use clap::Args;
use serde_json::{json, Value};

use super::client::Client;
use super::{CliResult, ClientArgs};

#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Only these types, comma-separated: decision, approval.opened, approval.decided,
    /// policy.reloaded, policy.rejected (default: all).
    #[arg(long, value_name = "TYPES")]
    pub types: Option<String>,
    /// Start after this audit seq (the `id` of an event already seen) instead of now.
    #[arg(long, value_name = "SEQ")]
    pub last_event_id: Option<u64>,
    /// Stop after this many events (default: follow until interrupted).
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// One event as the stream framed it.
#[derive(Default)]
pub(super) struct Frame {
    pub id: Option<u64>,
    pub event: Option<String>,
    pub data: String,
}

/// What to do after an event.
pub(super) enum Next {
    Continue,
    Stop,
}

pub(super) fn run(a: &EventsArgs) -> CliResult {
    let client = Client::from_args(&a.client)?;
    let path = match &a.types {
        Some(t) => format!("/api/events?types={t}"),
        None => "/api/events".to_string(),
    };
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    follow(
        &client,
        &path,
        a.last_event_id,
        |_| Ok(Next::Continue),
        |f| {
            let data: Value = serde_json::from_str(&f.data).unwrap_or(Value::String(f.data));
            let out = json!({"id": f.id, "event": f.event, "data": data});
            let mut w = stdout.lock();
            if writeln!(w, "{out}").and_then(|_| w.flush()).is_err() {
                return Next::Stop; // reader went away
            }
            printed += 1;
            if a.count.is_some_and(|n| printed >= n) {
                return Next::Stop;
            }
            Next::Continue
        },
    )
}

/// Follow `path` (an `/api/events` URL): call `on_open` once each connection is open (with the
/// resume point, `None` on the first connection without one; `Next::Stop` ends it there), then
/// `on_event` for each event.
/// When the stream ends — the daemon dropped a slow reader, restarted, or the connection
/// broke — reconnect after the last id seen, so no event is missed or repeated.
pub(super) fn follow(
    client: &Client,
    path: &str,
    mut last: Option<u64>,
    mut on_open: impl FnMut(Option<u64>) -> Result<Next, super::CliError>,
    mut on_event: impl FnMut(Frame) -> Next,
) -> CliResult {
    loop {
        let headers: Vec<(&str, String)> = last
            .map(|id| vec![("Last-Event-ID", id.to_string())])
            .unwrap_or_default();
        let reader = client.stream(path, &headers)?;
        if let Next::Stop = on_open(last)? {
            return Ok(std::process::ExitCode::SUCCESS);
        }
        let mut frame = Frame::default();
        let mut dropped = false;
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if line.is_empty() {
                let f = std::mem::take(&mut frame);
                if f.data.is_empty() && f.event.is_none() {
                    continue;
                }
                if f.id.is_some() {
                    last = f.id;
                }
                dropped |= f.event.as_deref() == Some("dropped");
                if let Next::Stop = on_event(f) {
                    return Ok(std::process::ExitCode::SUCCESS);
                }
                continue;
            }
            if let Some(c) = line.strip_prefix(':') {
                // A comment or keep-alive. The first names where the stream starts: resume
                // from there if it ends before any event came.
                if let Some(n) = c.trim().strip_prefix("from seq ") {
                    last = last.or_else(|| n.trim().parse().ok());
                }
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => frame.id = value.parse().ok(),
                "event" => frame.event = Some(value.to_string()),
                "data" => {
                    if !frame.data.is_empty() {
                        frame.data.push('\n');
                    }
                    frame.data.push_str(value);
                }
                _ => {}
            }
        }
        let after = last.map_or_else(|| "now".to_string(), |n| n.to_string());
        if dropped {
            // Behind by more than the daemon keeps for a reader: catch up from the log at once.
            eprintln!(
                "hall: the daemon dropped this stream (reading too slowly); resuming after {after}"
            );
        } else {
            eprintln!("hall: the event stream ended; reconnecting after {after}");
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}

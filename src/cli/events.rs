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
struct Frame {
    id: Option<u64>,
    event: Option<String>,
    data: String,
}

pub(super) fn run(a: &EventsArgs) -> CliResult {
    let client = Client::from_args(&a.client)?;
    let path = match &a.types {
        Some(t) => format!("/api/events?types={t}"),
        None => "/api/events".to_string(),
    };
    let mut last = a.last_event_id;
    let mut printed = 0u64;
    let stdout = std::io::stdout();
    loop {
        let headers: Vec<(&str, String)> = last
            .map(|id| vec![("Last-Event-ID", id.to_string())])
            .unwrap_or_default();
        let reader = client.stream(&path, &headers)?;
        let mut frame = Frame::default();
        for line in BufReader::new(reader).lines() {
            let Ok(line) = line else { break };
            if line.is_empty() {
                let f = std::mem::take(&mut frame);
                if f.data.is_empty() && f.event.is_none() {
                    continue;
                }
                let data: Value = serde_json::from_str(&f.data).unwrap_or(Value::String(f.data));
                let out = json!({"id": f.id, "event": f.event, "data": data});
                let mut w = stdout.lock();
                if writeln!(w, "{out}").and_then(|_| w.flush()).is_err() {
                    return Ok(std::process::ExitCode::SUCCESS); // reader went away
                }
                if f.id.is_some() {
                    last = f.id;
                }
                printed += 1;
                if a.count.is_some_and(|n| printed >= n) {
                    return Ok(std::process::ExitCode::SUCCESS);
                }
                continue;
            }
            if line.starts_with(':') {
                continue; // a comment / keep-alive
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
        eprintln!("hall events: the stream ended; reconnecting after {last:?}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

//! `hall mcp`: the Model Context Protocol on stdin/stdout (the stdio transport), for
//! assistants that launch a command. Every message is forwarded to the running daemon's
//! `POST /mcp` with the token the other client commands use (`HALL_TOKEN`, else the admin
//! token file), so the tools, scopes, tenant binding, rate limit and audit record are the
//! daemon's, exactly as over HTTP.
//!
//! stdout carries nothing but protocol messages, one JSON object a line; anything for a
//! person goes to stderr. When the daemon refuses a request at the HTTP level (401, 403,
//! 429, 503, or it cannot be reached), the request gets a JSON-RPC error that says why,
//! e.g. "this token lacks the route scope (HTTP 403 forbidden)". Messages are handled one at
//! a time, in order; the bridge ends when stdin closes.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use serde_json::{json, Value};

use super::client::Client;
use super::{CliError, CliResult, ClientArgs};

/// The JSON-RPC code for a request the daemon refused before it reached the MCP server
/// (implementation-defined server error range).
const REFUSED: i64 = -32000;

pub(super) fn run(args: &ClientArgs) -> CliResult {
    let client = Client::from_args(args)?;
    let stdin = std::io::stdin();
    let mut input = stdin.lock();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .map_err(|e| CliError::io("reading a message from stdin", e))?;
        if n == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        if let Some(reply) = forward(&client, text) {
            let mut text =
                serde_json::to_vec(&reply).map_err(|e| CliError::json("encoding a reply", e))?;
            text.push(b'\n');
            out.write_all(&text)
                .and_then(|()| out.flush())
                .map_err(|e| CliError::io("writing a reply to stdout", e))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Send one message to the daemon; the line to write back, if any (none for notifications).
fn forward(client: &Client, text: &str) -> Option<Value> {
    // The request id, to answer a refusal the daemon gave in its own (non-JSON-RPC) shape.
    let request_id = serde_json::from_str::<Value>(text).ok().and_then(|m| {
        let is_request = m.get("method").is_some_and(Value::is_string);
        m.get("id")
            .filter(|id| is_request && (id.is_string() || id.is_number()))
            .cloned()
    });
    let (status, body) = match client.send("POST", "/mcp", Some(text.as_bytes())) {
        Ok(r) => r,
        Err(e) => {
            let report = e.report();
            eprintln!("hall mcp: {report}");
            return request_id.map(|id| error(id, REFUSED, report, json!({"code": "unreachable"})));
        }
    };
    if status == 202 {
        return None;
    }
    if body.get("jsonrpc").is_some() {
        return Some(body);
    }
    // The gate's `{"error", "code"}`: 401, 403, 413, 415, 429, 503.
    let msg = body
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("the daemon refused the request");
    let code = body.get("code").and_then(Value::as_str).unwrap_or("");
    let message = format!("{msg} (HTTP {status} {code})");
    match request_id {
        Some(id) => Some(error(
            id,
            REFUSED,
            message,
            json!({"http_status": status, "code": code}),
        )),
        None => {
            eprintln!("hall mcp: a notification was refused: {message}");
            None
        }
    }
}

fn error(id: Value, code: i64, message: String, data: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message, "data": data}})
}

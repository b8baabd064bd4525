//! Client commands: thin HTTP clients of the daemon's API.

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;

use serde_json::{json, Value};

use super::{AuditCmd, CliResult, ClientArgs, RouteArgs, SecretCmd, TokenCmd};
use crate::config::{Config, Flags};

pub(super) struct Client {
    base: String,
    token: Option<String>,
}

impl Client {
    /// `HALL_URL` (default `http://127.0.0.1:8765`), token from `HALL_TOKEN` or the admin
    /// token file in the state dir.
    pub(super) fn new(args: &ClientArgs) -> Result<Client, Box<dyn std::error::Error>> {
        let base = args
            .url
            .clone()
            .or_else(|| std::env::var("HALL_URL").ok().filter(|s| !s.is_empty()))
            .unwrap_or_else(|| "http://127.0.0.1:8765".into());
        let token = match std::env::var("HALL_TOKEN").ok().filter(|s| !s.is_empty()) {
            Some(t) => Some(t),
            None => {
                let cfg = Config::resolve(&Flags::default())?;
                std::fs::read_to_string(cfg.state_dir.join("admin.token"))
                    .ok()
                    .map(|s| s.trim().to_string())
            }
        };
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// Send a request; returns the status and the JSON body (errors included).
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        self.send(method, path, bytes.as_deref())
    }

    pub(super) fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Value), String> {
        let mut req = ureq::request(method, &format!("{}{path}", self.base))
            .timeout(std::time::Duration::from_secs(30));
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => {
                return Err(format!(
                    "cannot reach the daemon at {}: {e} (is `hall serve` running? set HALL_URL to point elsewhere)",
                    self.base
                ))
            }
        };
        let status = resp.status();
        let text = resp.into_string().map_err(|e| e.to_string())?;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Print the body; an HTTP error becomes a message on stderr and exit 1.
fn finish(status: u16, v: &Value) -> CliResult {
    if (200..300).contains(&status) {
        print(v);
        Ok(ExitCode::SUCCESS)
    } else {
        let msg = v
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("request failed");
        let code = v.get("code").and_then(Value::as_str).unwrap_or("");
        Err(format!("{msg} (HTTP {status} {code})").into())
    }
}

pub(super) fn route(a: &RouteArgs) -> CliResult {
    let c = Client::new(&super::ClientArgs::default())?;
    let mut body = json!({
        "capability_id": a.capability, "env": a.env, "data_label": a.label, "tenant_id": a.tenant,
        "dry_run": a.dry_run,
    });
    if let Some(cid) = &a.correlation_id {
        body["correlation_id"] = json!(cid);
    }
    if let Some(id) = &a.approval_id {
        body["approval_id"] = json!(id);
    }
    let path = if a.explain {
        "/api/route?explain=true"
    } else {
        "/api/route"
    };
    let (status, v) = c.call("POST", path, Some(&body))?;
    if status != 200 {
        return finish(status, &v);
    }
    print(&v);
    let allowed = v.get("allowed").and_then(Value::as_bool).unwrap_or(false);
    if let (false, Some(id)) = (allowed, v.get("approval_id").and_then(Value::as_str)) {
        super::approvals::hint(a, id, &v);
        if a.wait && a.approval_id.is_none() {
            return super::approvals::wait_and_redeem(&c, id, body);
        }
    }
    Ok(if allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(super) fn status(a: &ClientArgs) -> CliResult {
    let (s, v) = Client::new(a)?.call("GET", "/api/status", None)?;
    finish(s, &v)
}

pub(super) fn reload(a: &ClientArgs) -> CliResult {
    let (s, v) = Client::new(a)?.call("POST", "/api/reload", None)?;
    if s == 422 {
        print(&v);
        return Ok(ExitCode::FAILURE);
    }
    finish(s, &v)
}

pub(super) fn token(cmd: TokenCmd) -> CliResult {
    match cmd {
        TokenCmd::Create {
            name,
            scopes,
            tenant,
            expires_in,
            rate_limit,
            client,
        } => {
            let body = json!({
                "name": name, "scopes": scopes, "tenant_id": tenant,
                "expires_in_secs": expires_in, "rate_limit_per_minute": rate_limit,
            });
            let (s, v) = Client::new(&client)?.call("POST", "/api/tokens", Some(&body))?;
            if s == 201 || s == 200 {
                eprintln!("Store this token now: it is shown only once.");
            }
            finish(s, &v)
        }
        TokenCmd::List(a) => {
            let (s, v) = Client::new(&a)?.call("GET", "/api/tokens", None)?;
            finish(s, &v)
        }
        TokenCmd::Revoke { id, client } => {
            let (s, v) =
                Client::new(&client)?.call("DELETE", &format!("/api/tokens/{}", enc(&id)), None)?;
            finish(s, &v)
        }
    }
}

pub(super) fn secret(cmd: SecretCmd) -> CliResult {
    match cmd {
        SecretCmd::Set { name, client } => {
            let value = read_secret_value(&name)?;
            // Serialized into a buffer that is wiped on drop, like the value itself.
            let body =
                zeroize::Zeroizing::new(serde_json::to_vec(&json!({ "value": value.as_str() }))?);
            let (s, v) = Client::new(&client)?.send(
                "PUT",
                &format!("/api/secrets/{}", enc(&name)),
                Some(&body),
            )?;
            finish(s, &v)
        }
        SecretCmd::List(a) => {
            let (s, v) = Client::new(&a)?.call("GET", "/api/secrets", None)?;
            finish(s, &v)
        }
        SecretCmd::Rm { name, client } => {
            let (s, v) = Client::new(&client)?.call(
                "DELETE",
                &format!("/api/secrets/{}", enc(&name)),
                None,
            )?;
            finish(s, &v)
        }
        SecretCmd::RotateKey(a) => {
            let (s, v) = Client::new(&a)?.call("POST", "/api/keys/rotate", None)?;
            finish(s, &v)
        }
    }
}

/// The value comes from stdin when it is not a terminal, else from a prompt without echo.
/// Read into one buffer reserved up front and wiped on drop: growing a `String` while
/// reading (as before) freed unwiped copies of the value along the way.
fn read_secret_value(name: &str) -> Result<zeroize::Zeroizing<String>, Box<dyn std::error::Error>> {
    use std::io::BufRead;
    let max = crate::store::secrets::MAX_VALUE_LEN;
    // The limit, a CRLF, and one byte to notice a longer value.
    let cap = max + 3;
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(cap));
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        eprint!("Value for {name} (input hidden): ");
        std::io::stderr().flush()?;
        let _echo = EchoOff::new();
        stdin.lock().take(cap as u64).read_until(b'\n', &mut buf)?;
        eprintln!();
    } else {
        stdin.lock().take(cap as u64).read_to_end(&mut buf)?;
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    if buf.len() > max {
        return Err(format!("the value is longer than {max} bytes: nothing stored").into());
    }
    if buf.is_empty() {
        return Err("empty value: nothing stored".into());
    }
    match String::from_utf8(std::mem::take(&mut *buf)) {
        Ok(s) => Ok(zeroize::Zeroizing::new(s)),
        Err(e) => {
            zeroize::Zeroize::zeroize(&mut e.into_bytes());
            Err("the value must be UTF-8 text: nothing stored".into())
        }
    }
}

/// Turns terminal echo off for its lifetime.
struct EchoOff(Option<libc::termios>);

impl EchoOff {
    fn new() -> EchoOff {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed, then filled, termios.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return EchoOff(None);
            }
            let saved = t;
            t.c_lflag &= !libc::ECHO;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            EchoOff(Some(saved))
        }
    }
}

impl Drop for EchoOff {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the attributes read in `new`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, &t);
            }
        }
    }
}

pub(super) fn audit(cmd: AuditCmd) -> CliResult {
    match cmd {
        AuditCmd::Tail { lines, client } => {
            let (s, v) =
                Client::new(&client)?.call("GET", &format!("/api/audit?tail={lines}"), None)?;
            finish(s, &v)
        }
        AuditCmd::Show {
            decision_id,
            client,
        } => {
            let (s, v) = Client::new(&client)?.call(
                "GET",
                &format!("/api/audit/{}", enc(&decision_id)),
                None,
            )?;
            finish(s, &v)
        }
        AuditCmd::Verify(a) => {
            let (s, v) = Client::new(&a)?.call("GET", "/api/audit/verify", None)?;
            if s == 200 && v.get("ok") == Some(&Value::Bool(false)) {
                print(&v);
                return Ok(ExitCode::FAILURE);
            }
            finish(s, &v)
        }
        AuditCmd::Export {
            after_seq,
            since,
            output,
            client,
        } => {
            let c = Client::new(&client)?;
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p)?)),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let mut after = after_seq;
            let mut n = 0u64;
            loop {
                let mut q = String::from("/api/audit?limit=1000");
                if let Some(a) = after {
                    q.push_str(&format!("&after_seq={a}"));
                }
                if let Some(s) = &since {
                    q.push_str(&format!("&since={}", enc(s)));
                }
                let (s, v) = c.call("GET", &q, None)?;
                if s != 200 {
                    return finish(s, &v);
                }
                let records = v
                    .get("records")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                if records.is_empty() {
                    break;
                }
                for r in &records {
                    writeln!(out, "{}", serde_json::to_string(r)?)?;
                    n += 1;
                }
                after = records
                    .last()
                    .and_then(|r| r.get("seq"))
                    .and_then(Value::as_u64);
                if after.is_none() {
                    break;
                }
            }
            out.flush()?;
            eprintln!("exported {n} records");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Percent-encode a path segment or query value.
fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

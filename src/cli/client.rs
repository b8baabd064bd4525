//! Client commands: thin HTTP clients of the daemon's API.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::{json, Value};

use super::{
    exit, human, AuditCmd, CliError, CliResult, ClientArgs, RouteArgs, SecretCmd, TokenCmd,
};
use crate::config::{Config, ConfigOrigin, Flags};

/// Where the token a client sends came from, for messages that must say so.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// `--token`.
    Flag,
    /// `HALL_TOKEN`.
    Env,
    /// The admin token file in the configured state dir.
    File(PathBuf),
    /// No token: the token file does not exist or cannot be read (`why`).
    Missing { path: PathBuf, why: String },
}

/// A client of the daemon's API: the daemon's URL and the token to send, resolved once from
/// flags, `HALL_URL`/`HALL_TOKEN` and the same `hall.toml` that `hall serve` reads.
pub struct Client {
    base: String,
    /// How `base` was chosen ("--url", "HALL_URL", "listen in FILE", "the default").
    url_origin: String,
    token: Option<zeroize::Zeroizing<String>>,
    token_source: TokenSource,
    /// How the config was found, for hints.
    config_note: String,
}

impl Client {
    /// Resolve the daemon URL and token for a client command:
    ///
    /// - URL: `--url`, else `HALL_URL`, else `http://<listen>` from `hall.toml` (found as
    ///   `hall serve` finds it: `--config`, `HALL_CONFIG`, the per-user then the system file),
    ///   else `http://127.0.0.1:8765`.
    /// - Token: `--token`, else `HALL_TOKEN`, else `<state_dir>/admin.token` of that config.
    ///
    /// The admin token file is sent only to the daemon that config names, or to a loopback
    /// URL the user named: never to another machine (pass `--token` or `HALL_TOKEN` for that).
    pub fn from_args(args: &ClientArgs) -> Result<Client, CliError> {
        Self::from_args_with(args, &|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// [`from_args`](Self::from_args) with an injected environment (for tests).
    pub fn from_args_with(
        args: &ClientArgs,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Client, CliError> {
        Self::discover(args, None, env)
    }

    /// [`from_args`](Self::from_args) for a command with its own `--state-dir` (`hall
    /// replay`): the admin token file is looked for there instead of in the config's.
    pub fn from_args_in(
        args: &ClientArgs,
        state_dir: Option<std::path::PathBuf>,
    ) -> Result<Client, CliError> {
        Self::discover(args, state_dir, &|k| {
            std::env::var(k).ok().filter(|v| !v.is_empty())
        })
    }

    fn discover(
        args: &ClientArgs,
        state_dir: Option<std::path::PathBuf>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Client, CliError> {
        let cfg = Config::resolve_with(
            &Flags {
                config: args.config.clone(),
                state_dir,
                ..Default::default()
            },
            env,
        )?;
        let config_note = match (&cfg.config_file, cfg.config_origin) {
            (Some(f), o) => format!("config {} (from {})", f.display(), o.describe()),
            (None, _) => "no config file".to_string(),
        };
        let (base, url_origin, user_named) = if let Some(u) = &args.url {
            (u.clone(), "--url".to_string(), true)
        } else if let Some(u) = env("HALL_URL") {
            (u, "HALL_URL".to_string(), true)
        } else {
            let origin = match (&cfg.config_file, cfg.config_origin) {
                (Some(f), _) => format!("listen in {}", f.display()),
                (None, ConfigOrigin::None) => "the default address".to_string(),
                (None, _) => "the default address".to_string(),
            };
            (listen_url(cfg.listen), origin, false)
        };
        let base = base.trim_end_matches('/').to_string();
        let host = url_host(&base).ok_or_else(|| {
            CliError::usage(format!(
                "{url_origin} {base:?} is not an http:// or https:// URL (for example http://127.0.0.1:8765)"
            ))
        })?;
        let (token, token_source) = if let Some(t) = &args.token {
            (Some(t.trim().to_string()), TokenSource::Flag)
        } else if let Some(t) = env("HALL_TOKEN") {
            (Some(t.trim().to_string()), TokenSource::Env)
        } else {
            let path = cfg.state_dir.join("admin.token");
            match std::fs::read_to_string(&path) {
                Ok(t) if !t.trim().is_empty() => {
                    (Some(t.trim().to_string()), TokenSource::File(path))
                }
                Ok(_) => (
                    None,
                    TokenSource::Missing {
                        path,
                        why: "is empty".into(),
                    },
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                    None,
                    TokenSource::Missing {
                        path,
                        why: "does not exist".into(),
                    },
                ),
                Err(e) => (
                    None,
                    TokenSource::Missing {
                        path,
                        why: format!("cannot be read ({e})"),
                    },
                ),
            }
        };
        if let TokenSource::File(path) = &token_source {
            if user_named && !is_loopback_host(&host) {
                return Err(CliError::usage(format!(
                    "refusing to send the admin token from {} to {base} ({url_origin}): that is not \
                     this machine. Give that daemon's token with HALL_TOKEN or --token.",
                    path.display()
                )));
            }
        }
        Ok(Client {
            base,
            url_origin,
            token: token.map(zeroize::Zeroizing::new),
            token_source,
            config_note,
        })
    }

    /// The same as [`from_args`](Self::from_args), under its earlier name.
    pub fn new(args: &ClientArgs) -> Result<Client, CliError> {
        Self::from_args(args)
    }

    /// The daemon's base URL, without a trailing slash.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The token this client sends, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref().map(String::as_str)
    }

    /// Where the token came from.
    pub fn token_source(&self) -> &TokenSource {
        &self.token_source
    }

    /// Send a request; returns the status and the JSON body (errors included). Fails with
    /// exit code 3 when the daemon cannot be reached.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), CliError> {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        self.send(method, path, bytes.as_deref())
    }

    pub(super) fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Value), CliError> {
        self.send_timeout(method, path, body, std::time::Duration::from_secs(30))
    }

    fn send_timeout(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: std::time::Duration,
    ) -> Result<(u16, Value), CliError> {
        let mut req = ureq::request(method, &format!("{}{path}", self.base)).timeout(timeout);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {}", t.as_str()));
        }
        let res = match body {
            Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => return Err(self.unreachable(t)),
        };
        let status = resp.status();
        let text = resp.into_string().map_err(|source| CliError::Answer {
            url: self.base.clone(),
            source,
        })?;
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Ok((status, v))
    }

    /// `GET path` as a stream (Server-Sent Events): the body reader once the answer is 200,
    /// else the error the answer stands for. No read timeout: a stream may be quiet for long.
    pub(super) fn stream(
        &self,
        path: &str,
        headers: &[(&str, String)],
    ) -> Result<Box<dyn std::io::Read + Send>, CliError> {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(std::time::Duration::from_secs(10))
            .build();
        let mut req = agent
            .get(&format!("{}{path}", self.base))
            .set("Accept", "text/event-stream");
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {}", t.as_str()));
        }
        for (k, v) in headers {
            req = req.set(k, v);
        }
        match req.call() {
            Ok(r) => Ok(Box::new(r.into_reader())),
            Err(ureq::Error::Status(status, r)) => {
                let text = r.into_string().unwrap_or_default();
                let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
                Err(self.error_for(status, &v))
            }
            Err(ureq::Error::Transport(t)) => Err(self.unreachable(t)),
        }
    }

    fn unreachable(&self, t: ureq::Transport) -> CliError {
        CliError::Unreachable {
            url: self.base.clone(),
            origin: self.url_origin.clone(),
            config_note: self.config_note.clone(),
            source: Box::new(t),
        }
    }

    /// The error for a non-2xx answer: the daemon's message and code, and for 401 and 403
    /// which token was sent and what to do. Its exit code follows from the status
    /// ([`CliError::exit_code`]).
    pub fn error_for(&self, status: u16, v: &Value) -> CliError {
        let message = v
            .get("error")
            .and_then(Value::as_str)
            .or_else(|| v.as_str())
            .unwrap_or("request failed");
        let code = v.get("code").and_then(Value::as_str).unwrap_or("");
        let help = match status {
            401 => Some(self.unauthorized_help()),
            403 => Some(format!(
                "  token: {}\n  fix: use a token with the scope this command needs (admin \
                 has them all), or one bound to the right tenant",
                self.describe_token()
            )),
            _ => None,
        };
        CliError::Http {
            status,
            message: message.to_owned(),
            code: code.to_owned(),
            help,
        }
    }

    fn describe_token(&self) -> String {
        match &self.token_source {
            TokenSource::Flag => "from --token".into(),
            TokenSource::Env => "from HALL_TOKEN".into(),
            TokenSource::File(p) => format!(
                "the admin token file {} ({})",
                p.display(),
                self.config_note
            ),
            TokenSource::Missing { path, why } => format!(
                "none sent: no --token, HALL_TOKEN is unset, and {} {why} ({})",
                path.display(),
                self.config_note
            ),
        }
    }

    /// What a 401 means for the token this client sent, and what to do.
    fn unauthorized_help(&self) -> String {
        let fix = match &self.token_source {
            TokenSource::Flag => "check the token passed with --token: it may be mistyped, revoked or expired \
                 (`hall token list` shows which are live)"
                .to_string(),
            TokenSource::Env => "HALL_TOKEN holds a token this daemon does not accept (mistyped, revoked or \
                 expired; `hall token list` shows which are live); unset HALL_TOKEN to use the admin \
                 token file instead"
                .to_string(),
            TokenSource::File(p) => format!(
                "{} is not a token of the daemon at {}: if that daemon uses another state dir, \
                 name its hall.toml with --config (or HALL_CONFIG), or set HALL_STATE_DIR; if the file \
                 was replaced, restart the daemon so it re-issues it",
                p.display(),
                self.base
            ),
            TokenSource::Missing { path, why } if why.starts_with("cannot be read") => format!(
                "run as the user that can read {} (sudo for a system install), or set HALL_TOKEN",
                path.display()
            ),
            TokenSource::Missing { .. } => "the daemon writes admin.token in its state dir at first start: \
                 name the daemon's hall.toml with --config (or HALL_CONFIG), or set HALL_STATE_DIR to its \
                 state dir, or pass a token with HALL_TOKEN"
                .to_string(),
        };
        format!("  token: {}\n  fix: {fix}", self.describe_token())
    }

    /// Print a 2xx body (JSON, or `human` for a terminal) and succeed; else the error.
    fn finish(&self, status: u16, v: &Value, json: bool, human: impl FnOnce(&Value)) -> CliResult {
        if (200..300).contains(&status) {
            if json {
                print(v);
            } else {
                human(v);
            }
            Ok(ExitCode::SUCCESS)
        } else {
            Err(self.error_for(status, v))
        }
    }
}

/// `http://<listen>`, with an unspecified address (0.0.0.0, ::) replaced by loopback.
fn listen_url(addr: std::net::SocketAddr) -> String {
    let ip = match addr.ip() {
        std::net::IpAddr::V4(v) if v.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(v) if v.is_unspecified() => "[::1]".to_string(),
        std::net::IpAddr::V6(v) => format!("[{v}]"),
        std::net::IpAddr::V4(v) => v.to_string(),
    };
    format!("http://{ip}:{}", addr.port())
}

/// The host of an http(s) URL, lowercased, without port or brackets.
fn url_host(url: &str) -> Option<String> {
    let lower = url.to_ascii_lowercase();
    let rest = lower
        .strip_prefix("http://")
        .or_else(|| lower.strip_prefix("https://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(r) = authority.strip_prefix('[') {
        r.split(']').next()?.to_string()
    } else {
        authority.split(':').next()?.to_string()
    };
    (!host.is_empty()).then_some(host)
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub(super) fn route(a: &RouteArgs, json: bool) -> CliResult {
    let c = Client::from_args(&a.client_args())?;
    let mut body = json!({
        "capability_id": a.capability, "env": a.env, "data_label": a.label, "tenant_id": a.tenant,
        "dry_run": a.dry_run,
    });
    if let Some(cid) = &a.correlation_id {
        body["correlation_id"] = json!(cid);
    }
    if let Some(ctx) = &a.context {
        let v: Value = serde_json::from_str(ctx).map_err(CliError::ContextJson)?;
        if !v.is_object() {
            return Err(CliError::usage(
                "--context must be a JSON object, e.g. '{\"ticket\":\"T-1\"}'",
            ));
        }
        body["context"] = v;
    }
    if let Some(v) = &a.tenant_risk {
        body["tenant_risk"] = json!(v);
    }
    if let Some(v) = &a.qos_class {
        body["qos_class"] = json!(v);
    }
    if let Some(v) = &a.approval_id {
        body["approval_id"] = json!(v);
    }
    let path = if a.explain {
        "/api/route?explain=true"
    } else {
        "/api/route"
    };
    let (status, mut v) = c.call("POST", path, Some(&body))?;
    if status != 200 {
        return Err(c.error_for(status, &v));
    }
    if let Some(x) = v.get_mut("explain") {
        // The daemon's trace names what failed; the loaded workers give the values. (Its
        // rules are not served: a rule's miss names the request's value only.)
        let workers = match c.call("GET", "/api/registry/workers", None) {
            Ok((200, w)) => w
                .get("workers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        human::explain_why(x, &super::offline::asked(a), &[], &workers);
    }
    if json {
        print(&v);
    } else {
        human::decision(&v);
    }
    if v.get("deny_reason").and_then(Value::as_str) == Some(crate::engine::UNKNOWN_CAPABILITY) {
        if let Ok((200, caps)) = c.call("GET", "/api/registry/capabilities", None) {
            let known: Vec<String> = caps
                .get("capabilities")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|c| c.get("id").and_then(Value::as_str).map(str::to_string))
                .collect();
            super::offline::hint_capability(&a.capability, known);
        }
    }
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
        ExitCode::from(exit::FAILURE)
    })
}

pub(super) fn status(a: &ClientArgs, json: bool) -> CliResult {
    let c = Client::from_args(a)?;
    let (s, v) = c.call("GET", "/api/status", None)?;
    c.finish(s, &v, json, human::object)
}

pub(super) fn reload(a: &ClientArgs, json: bool) -> CliResult {
    let c = Client::from_args(a)?;
    let (s, v) = c.call("POST", "/api/reload", None)?;
    if s == 422 {
        if json {
            print(&v);
        } else {
            human::object(&v);
        }
        return Ok(ExitCode::from(exit::FAILURE));
    }
    c.finish(s, &v, json, human::object)
}

pub(super) fn token(cmd: TokenCmd, json: bool) -> CliResult {
    match cmd {
        TokenCmd::Create {
            name,
            scopes,
            tenant,
            expires_in,
            rate_limit,
            client,
        } => {
            for sc in &scopes {
                if sc.parse::<crate::store::tokens::Scope>().is_err() {
                    let known = crate::store::tokens::Scope::ALL.map(|s| s.as_str());
                    return Err(CliError::usage(format!(
                        "unknown scope {sc:?}{} (scopes: {})",
                        super::suggest::hint(sc, known),
                        known.join(", ")
                    )));
                }
            }
            let body = json!({
                "name": name, "scopes": scopes, "tenant_id": tenant,
                "expires_in_secs": expires_in, "rate_limit_per_minute": rate_limit,
            });
            let c = Client::from_args(&client)?;
            let (s, v) = c.call("POST", "/api/tokens", Some(&body))?;
            if s == 201 || s == 200 {
                eprintln!("Store this token now: it is shown only once.");
            }
            c.finish(s, &v, json, human::object)
        }
        TokenCmd::List(a) => {
            let c = Client::from_args(&a)?;
            let (s, v) = c.call("GET", "/api/tokens", None)?;
            c.finish(s, &v, json, |v| human::list(v, "tokens"))
        }
        TokenCmd::Revoke { id, client } => {
            let c = Client::from_args(&client)?;
            let (s, v) = c.call("DELETE", &format!("/api/tokens/{}", enc(&id)), None)?;
            c.finish(s, &v, json, human::object)
        }
    }
}

pub(super) fn secret(cmd: SecretCmd, json: bool) -> CliResult {
    match cmd {
        SecretCmd::Set { name, client } => {
            let value = read_secret_value(&name)?;
            // Serialized into a buffer that is wiped on drop, like the value itself.
            let body = zeroize::Zeroizing::new(
                serde_json::to_vec(&json!({ "value": value.as_str() }))
                    .map_err(|e| CliError::json("encoding the secret for the request", e))?,
            );
            let c = Client::from_args(&client)?;
            let (s, v) = c.send("PUT", &format!("/api/secrets/{}", enc(&name)), Some(&body))?;
            c.finish(s, &v, json, human::object)
        }
        SecretCmd::List(a) => {
            let c = Client::from_args(&a)?;
            let (s, v) = c.call("GET", "/api/secrets", None)?;
            c.finish(s, &v, json, |v| human::list(v, "secrets"))
        }
        SecretCmd::Rm { name, client } => {
            let c = Client::from_args(&client)?;
            let (s, v) = c.call("DELETE", &format!("/api/secrets/{}", enc(&name)), None)?;
            c.finish(s, &v, json, human::object)
        }
        SecretCmd::RotateKey(a) => {
            let c = Client::from_args(&a)?;
            let (s, v) = c.call("POST", "/api/keys/rotate", None)?;
            c.finish(s, &v, json, human::object)
        }
    }
}

/// The value comes from stdin when it is not a terminal, else from a prompt without echo.
/// Read into one buffer reserved up front and wiped on drop: growing a `String` while
/// reading (as before) freed unwiped copies of the value along the way.
fn read_secret_value(name: &str) -> Result<zeroize::Zeroizing<String>, CliError> {
    use std::io::BufRead;
    let max = crate::store::secrets::MAX_VALUE_LEN;
    // The limit, a CRLF, and one byte to notice a longer value.
    let cap = max + 3;
    let mut buf = zeroize::Zeroizing::new(Vec::with_capacity(cap));
    let stdin = std::io::stdin();
    let reading = |e| CliError::io(format!("reading the value of {name} from stdin"), e);
    if stdin.is_terminal() {
        eprint!("Value for {name} (input hidden): ");
        std::io::stderr()
            .flush()
            .map_err(|e| CliError::io("writing the prompt to stderr", e))?;
        let _echo = EchoOff::new();
        stdin
            .lock()
            .take(cap as u64)
            .read_until(b'\n', &mut buf)
            .map_err(reading)?;
        eprintln!();
    } else {
        stdin
            .lock()
            .take(cap as u64)
            .read_to_end(&mut buf)
            .map_err(reading)?;
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    if buf.len() > max {
        return Err(CliError::SecretValue(format!(
            "the value is longer than {max} bytes"
        )));
    }
    if buf.is_empty() {
        return Err(CliError::SecretValue("empty value".into()));
    }
    match String::from_utf8(std::mem::take(&mut *buf)) {
        Ok(s) => Ok(zeroize::Zeroizing::new(s)),
        Err(e) => {
            zeroize::Zeroize::zeroize(&mut e.into_bytes());
            Err(CliError::SecretValue("the value must be UTF-8 text".into()))
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

pub(super) fn audit(cmd: AuditCmd, json: bool) -> CliResult {
    match cmd {
        AuditCmd::Tail {
            lines,
            follow,
            client,
        } => {
            let c = Client::from_args(&client)?;
            let (s, v) = c.call("GET", &format!("/api/audit?tail={lines}"), None)?;
            if !(200..300).contains(&s) {
                return Err(c.error_for(s, &v));
            }
            let records = records_of(&v);
            if json && !follow {
                // The API's answer as it is; with -f, one record per line instead.
                print(&v);
            } else {
                print_records(&records, json);
            }
            if follow {
                let mut after = records
                    .last()
                    .and_then(|r| r.get("seq"))
                    .and_then(Value::as_u64)
                    .unwrap_or(0);
                if records.is_empty() {
                    after = newest_seq(&c)?;
                }
                follow_records(&c, after, json)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCmd::Show {
            decision_id,
            client,
        } => {
            let c = Client::from_args(&client)?;
            let (s, v) = c.call("GET", &format!("/api/audit/{}", enc(&decision_id)), None)?;
            c.finish(s, &v, json, human::object)
        }
        AuditCmd::Verify { state_dir, client } => {
            let v = match state_dir {
                Some(dir) => serde_json::to_value(super::offline::verify_audit(&dir)?)
                    .map_err(|e| CliError::json("encoding the verify report", e))?,
                None => {
                    let c = Client::from_args(&client)?;
                    let (s, v) = c.call("GET", "/api/audit/verify", None)?;
                    if !(200..300).contains(&s) {
                        return Err(c.error_for(s, &v));
                    }
                    v
                }
            };
            if json {
                print(&v);
            } else {
                human::verify(&v);
            }
            Ok(if v.get("ok") == Some(&Value::Bool(true)) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(exit::FAILURE)
            })
        }
        AuditCmd::Export {
            state_dir,
            after_seq,
            since,
            output,
            client,
        } => {
            let mut out: Box<dyn Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .map_err(|e| CliError::io(format!("cannot create {}", p.display()), e))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            if let Some(dir) = state_dir {
                let n = super::offline::export_audit(&dir, after_seq, since.as_deref(), &mut out)?;
                eprintln!("exported {n} records");
                return Ok(ExitCode::SUCCESS);
            }
            let c = Client::from_args(&client)?;
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
                    return Err(c.error_for(s, &v));
                }
                let records = records_of(&v);
                if records.is_empty() {
                    break;
                }
                for r in &records {
                    let line = serde_json::to_string(r)
                        .map_err(|e| CliError::json("encoding an audit record", e))?;
                    writeln!(out, "{line}").map_err(|e| CliError::io("writing the export", e))?;
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
            out.flush()
                .map_err(|e| CliError::io("writing the export", e))?;
            eprintln!("exported {n} records");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn records_of(v: &Value) -> Vec<Value> {
    v.get("records")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

fn print_records(records: &[Value], json: bool) {
    if json {
        // One record a line: a stream a script can read as it comes.
        for r in records {
            println!("{}", serde_json::to_string(r).unwrap_or_default());
        }
    } else {
        human::records(records);
    }
    let _ = std::io::stdout().flush();
}

/// The newest record's seq (0 for an empty log), so `tail -f` starts after it.
fn newest_seq(c: &Client) -> Result<u64, CliError> {
    let (s, v) = c.call("GET", "/api/status", None)?;
    if !(200..300).contains(&s) {
        return Err(c.error_for(s, &v));
    }
    Ok(v.pointer("/audit/head/seq")
        .or_else(|| v.pointer("/audit_head/seq"))
        .and_then(Value::as_u64)
        .unwrap_or(0))
}

/// `hall audit tail -f`: poll for records after `after` and print them as they come.
fn follow_records(c: &Client, mut after: u64, json: bool) -> Result<(), CliError> {
    loop {
        let (s, v) = c.call(
            "GET",
            &format!("/api/audit?after_seq={after}&limit=1000"),
            None,
        )?;
        if !(200..300).contains(&s) {
            return Err(c.error_for(s, &v));
        }
        let records = records_of(&v);
        if let Some(last) = records
            .last()
            .and_then(|r| r.get("seq"))
            .and_then(Value::as_u64)
        {
            after = last;
            print_records(&records, json);
        }
        if records.len() < 1000 {
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
    }
}

/// Percent-encode a path segment or query value.
pub(super) fn enc(s: &str) -> String {
    /// Everything but RFC 3986's unreserved characters (`A-Z a-z 0-9 - . _ ~`).
    const RESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    percent_encoding::utf8_percent_encode(s, RESERVED).to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn enc_keeps_unreserved_and_escapes_the_rest_bytewise() {
        assert_eq!(super::enc("a-Z_0.9~"), "a-Z_0.9~");
        assert_eq!(super::enc("a/b c?d&e=%"), "a%2Fb%20c%3Fd%26e%3D%25");
        assert_eq!(super::enc("é+"), "%C3%A9%2B");
    }
}

//! `hall approvals …`: the approval queue, as a thin client of `/api/approvals`.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{json, Value};

use super::client::enc;
use super::client::Client;
use super::{CliResult, ClientArgs};

#[derive(Debug, Subcommand)]
pub enum ApprovalsCmd {
    /// List approvals (approve scope); a tenant-bound approver sees its tenant only.
    List {
        /// pending, approved, denied, expired, cancelled or used.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, value_name = "ID")]
        tenant: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show one approval; with --wait, wait (at most 60 s) until its state changes.
    Show {
        id: String,
        #[arg(long, value_name = "SECS")]
        wait: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Approve (approve scope; not the token that opened it).
    Approve {
        id: String,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Deny, or veto during a veto window (approve scope).
    Deny {
        id: String,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Withdraw a pending approval (the token that opened it).
    Cancel {
        id: String,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Follow the queue live: what is pending now, then each approval opened (with the
    /// command that approves it) and each decision. Human lines, or one JSON object a line
    /// with --json. Needs scope audit (the event stream) and approve (the pending list at
    /// start); resumes by itself after a dropped connection.
    Watch {
        /// Only this tenant's approvals.
        #[arg(long, value_name = "ID")]
        tenant: Option<String>,
        /// Stop after this many approvals and decisions (default: follow until interrupted).
        #[arg(long, value_name = "N")]
        count: Option<u64>,
        #[command(flatten)]
        client: ClientArgs,
    },
}

pub(super) fn run(cmd: ApprovalsCmd, json: bool) -> CliResult {
    let (client, method, path, body) = match cmd {
        ApprovalsCmd::Watch {
            tenant,
            count,
            client,
        } => return watch(&client, tenant, count, json),
        ApprovalsCmd::List {
            state,
            tenant,
            client,
        } => {
            let mut q = Vec::new();
            if let Some(s) = state {
                q.push(format!("state={}", enc(&s)));
            }
            if let Some(t) = tenant {
                q.push(format!("tenant_id={}", enc(&t)));
            }
            let path = if q.is_empty() {
                "/api/approvals".to_string()
            } else {
                format!("/api/approvals?{}", q.join("&"))
            };
            (client, "GET", path, None)
        }
        ApprovalsCmd::Show { id, wait, client } => {
            let mut path = format!("/api/approvals/{}", enc(&id));
            if let Some(w) = wait {
                path.push_str(&format!("?wait={w}"));
            }
            (client, "GET", path, None)
        }
        ApprovalsCmd::Approve { id, note, client } => (client, "POST", act(&id, "approve"), note),
        ApprovalsCmd::Deny { id, note, client } => (client, "POST", act(&id, "deny"), note),
        ApprovalsCmd::Cancel { id, note, client } => (client, "POST", act(&id, "cancel"), note),
    };
    let body = (method == "POST").then(|| {
        let v = match body {
            Some(n) => json!({ "note": n }),
            None => json!({}),
        };
        serde_json::to_vec(&v).unwrap_or_default()
    });
    let c = Client::from_args(&client)?;
    let (status, v) = c.send(method, &path, body.as_deref())?;
    if (200..300).contains(&status) {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    Err(c.error_for(status, &v))
}

/// What `hall approvals watch` prints, and how many it has printed.
struct Watcher {
    json: bool,
    tenant: Option<String>,
    count: Option<u64>,
    printed: u64,
    /// Approvals printed from the pending list at start: their `approval.opened` event, if
    /// the stream also carries it, is not printed twice.
    listed: std::collections::HashSet<String>,
}

/// One line about an approval: from the pending list (`approval.pending`) or an event.
struct Line<'a> {
    event: &'a str,
    seq: Option<u64>,
    approval_id: &'a str,
    state: &'a str,
    time: &'a str,
    v: &'a Value,
    token_id: Option<&'a str>,
    note: Option<&'a str>,
}

impl Watcher {
    fn wants(&self, tenant: Option<&str>) -> bool {
        self.tenant.as_deref().is_none_or(|t| Some(t) == tenant)
    }

    /// Print one line; `Next::Stop` once `--count` lines are out or stdout is gone.
    fn print(&mut self, l: Line<'_>) -> super::events::Next {
        use super::events::Next;
        use std::io::Write;
        let s = |k: &str| l.v.get(k).and_then(Value::as_str).unwrap_or("");
        let open = l.event != "approval.decided";
        let approve = format!("hall approvals approve {} --note \"…\"", l.approval_id);
        let deny = format!("hall approvals deny {} --note \"…\"", l.approval_id);
        let text = if self.json {
            let mut o = json!({
                "event": l.event,
                "id": l.seq,
                "approval_id": l.approval_id,
                "state": l.state,
                "time": l.time,
                "tenant_id": s("tenant_id"),
                "capability_id": s("capability_id"),
                "env": s("env"),
                "data_label": s("data_label"),
                "rule_id": s("rule_id"),
                "worker_id": s("worker_id"),
                "token_id": l.token_id,
                "note": l.note,
            });
            if open {
                o["approve_command"] = json!(approve);
                o["deny_command"] = json!(deny);
            }
            o.to_string()
        } else if open {
            format!(
                "{}  {:<9} {}  tenant {}: {} in {} ({}), rule {}, worker {}{}\n    approve: {approve}\n    deny:    {deny}",
                l.time,
                l.state,
                l.approval_id,
                s("tenant_id"),
                s("capability_id"),
                s("env"),
                s("data_label"),
                s("rule_id"),
                s("worker_id"),
                l.token_id.map(|t| format!(", opened by {t}")).unwrap_or_default(),
            )
        } else {
            format!(
                "{}  {:<9} {}  tenant {}{}{}",
                l.time,
                l.state,
                l.approval_id,
                s("tenant_id"),
                l.token_id.map(|t| format!(", by {t}")).unwrap_or_default(),
                l.note.map(|n| format!(", note: {n}")).unwrap_or_default(),
            )
        };
        let mut w = std::io::stdout().lock();
        if writeln!(w, "{text}").and_then(|_| w.flush()).is_err() {
            return Next::Stop;
        }
        self.printed += 1;
        if self.count.is_some_and(|n| self.printed >= n) {
            Next::Stop
        } else {
            Next::Continue
        }
    }

    /// An `approval.opened` / `approval.decided` event (the audit record in its data).
    fn event(&mut self, f: super::events::Frame) -> super::events::Next {
        use super::events::Next;
        let ev = f.event.as_deref().unwrap_or("");
        if !matches!(ev, "approval.opened" | "approval.decided") {
            return Next::Continue; // e.g. the daemon's `dropped`: follow() resumes
        }
        let Ok(v) = serde_json::from_str::<Value>(&f.data) else {
            return Next::Continue;
        };
        if !self.wants(v.get("tenant_id").and_then(Value::as_str)) {
            return Next::Continue;
        }
        // detail: "approval_id=… state=… digest=…[ note=…]"
        let detail = v.get("detail").and_then(Value::as_str).unwrap_or("");
        let (fields, note) = match detail.split_once(" note=") {
            Some((a, n)) => (a, Some(n)),
            None => (detail, None),
        };
        let field = |k: &str| {
            fields
                .split(' ')
                .find_map(|p| p.strip_prefix(k)?.strip_prefix('='))
                .unwrap_or("")
        };
        let id = field("approval_id");
        if ev == "approval.opened" && self.listed.contains(id) {
            return Next::Continue;
        }
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
        let state = kind.strip_prefix("approval_").unwrap_or(kind);
        let state = if ev == "approval.opened" {
            "opened"
        } else {
            state
        };
        let time = v.get("time").and_then(Value::as_str).unwrap_or("");
        let token = v.get("token_id").and_then(Value::as_str);
        self.print(Line {
            event: ev,
            seq: f.id,
            approval_id: id,
            state,
            time,
            v: &v,
            token_id: token,
            note,
        })
    }
}

/// `hall approvals watch`: list what is pending, then follow `approval.*` events.
fn watch(args: &ClientArgs, tenant: Option<String>, count: Option<u64>, json: bool) -> CliResult {
    let c = Client::from_args(args)?;
    let w = std::cell::RefCell::new(Watcher {
        json,
        tenant,
        count,
        printed: 0,
        listed: Default::default(),
    });
    let mut listed_once = false;
    super::events::follow(
        &c,
        "/api/events?types=approval.opened,approval.decided",
        None,
        |_| {
            // Once, after the stream is open: what was already pending. Anything opened
            // after the stream's start comes as an event (and is not printed twice).
            use super::events::Next;
            if std::mem::replace(&mut listed_once, true) {
                return Ok(Next::Continue);
            }
            let mut w = w.borrow_mut();
            let path = match &w.tenant {
                Some(t) => format!("/api/approvals?state=pending&tenant_id={}", enc(t)),
                None => "/api/approvals?state=pending".to_string(),
            };
            let (status, v) = c.send("GET", &path, None)?;
            if status == 403 {
                eprintln!(
                    "hall: this token cannot list the queue (scope approve): showing new approvals only"
                );
                return Ok(Next::Continue);
            }
            if status != 200 {
                return Err(c.error_for(status, &v));
            }
            for a in v["approvals"].as_array().into_iter().flatten() {
                let id = a.get("id").and_then(Value::as_str).unwrap_or("");
                w.listed.insert(id.to_string());
                let time = a.get("opened_at").and_then(Value::as_str).unwrap_or("");
                let opener = a.get("opened_by").and_then(Value::as_str);
                if let Next::Stop = w.print(Line {
                    event: "approval.pending",
                    seq: None,
                    approval_id: id,
                    state: "pending",
                    time,
                    v: a,
                    token_id: opener,
                    note: None,
                }) {
                    return Ok(Next::Stop);
                }
            }
            Ok(Next::Continue)
        },
        |f| w.borrow_mut().event(f),
    )
}

fn act(id: &str, what: &str) -> String {
    format!("/api/approvals/{}/{what}", enc(id))
}

/// After `hall route` opened (or found) an approval: what the approver runs, and how the
/// app redeems it.
pub(super) fn hint(a: &super::RouteArgs, id: &str, v: &Value) {
    let reason = v.get("deny_reason").and_then(Value::as_str).unwrap_or("");
    if !matches!(
        reason,
        "approval_required" | "held_for_veto" | "approval_pending"
    ) {
        return;
    }
    if reason == "held_for_veto" {
        eprintln!("approval {id} is held for veto: it is approved unless someone runs");
        eprintln!("  hall approvals deny {id} --note \"…\"");
    } else {
        eprintln!("approval {id} is pending; an approver runs");
        eprintln!("  hall approvals approve {id} --note \"…\"");
    }
    eprintln!("then redeem it with");
    eprintln!(
        "  hall route --capability {} --env {} --label {} --tenant {} --approval-id {id}",
        a.capability, a.env, a.label, a.tenant
    );
}

/// `hall route --wait`: long-poll the approval until it leaves `pending`, then redeem it with
/// the same request. Exit 0 only when the redemption is allowed.
pub(super) fn wait_and_redeem(c: &Client, id: &str, mut body: Value) -> CliResult {
    eprintln!("waiting for a decision on {id} …");
    loop {
        // Under the client's 30 s request timeout; the daemon answers earlier on any change.
        let (s, v) = c.send("GET", &format!("/api/approvals/{}?wait=25", enc(id)), None)?;
        if s != 200 {
            return Err(c.error_for(s, &v));
        }
        match v.get("state").and_then(Value::as_str) {
            Some("pending") => continue,
            Some("approved") => break,
            other => {
                eprintln!("approval {id} is {}", other.unwrap_or("unknown"));
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    body["approval_id"] = json!(id);
    let body = serde_json::to_vec(&body)
        .map_err(|e| super::CliError::json("encoding the route request", e))?;
    let (s, v) = c.send("POST", "/api/route", Some(&body))?;
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(
        if s == 200 && v.get("allowed").and_then(Value::as_bool) == Some(true) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

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
}

pub(super) fn run(cmd: ApprovalsCmd) -> CliResult {
    let (client, method, path, body) = match cmd {
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
    let (status, v) = Client::from_args(&client)?.send(method, &path, body.as_deref())?;
    if (200..300).contains(&status) {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(ExitCode::SUCCESS);
    }
    let msg = v
        .get("error")
        .and_then(Value::as_str)
        .unwrap_or("request failed");
    let code = v.get("code").and_then(Value::as_str).unwrap_or("");
    Err(format!("{msg} (HTTP {status} {code})").into())
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
            let msg = v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed");
            return Err(format!("{msg} (HTTP {s})").into());
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
    let (s, v) = c.send("POST", "/api/route", Some(&serde_json::to_vec(&body)?))?;
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(
        if s == 200 && v.get("allowed").and_then(Value::as_bool) == Some(true) {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

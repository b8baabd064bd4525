//! End-to-end: human approvals for `require_approval` rules (SPEC 3.1) against the real binary.
//!
//! The shipped policies hold `deploy-prod-approval` (cap.code.deploy in prod). The tests add
//! `05-approvals.toml` with rules for dedicated tenants: a short ttl, a veto window, two
//! approvers.

mod common;

use std::time::{Duration, Instant};

use common::{raw_request, Daemon, Resp};
use serde_json::Value;

const EXTRA: &str = r#"
[[rule]]
id = "t-ttl"
capabilities = ["cap.code.deploy"]
envs = ["prod"]
tenants = ["org.ttl"]
effect = "require_approval"
approval_ttl = "2s"

[[rule]]
id = "t-veto"
capabilities = ["cap.code.deploy"]
envs = ["prod"]
tenants = ["org.veto"]
effect = "require_approval"
auto_approve_after = "1s"

[[rule]]
id = "t-two"
capabilities = ["cap.code.deploy"]
envs = ["prod"]
tenants = ["org.two"]
effect = "require_approval"
approvers_required = 2
"#;

fn start() -> Daemon {
    Daemon::builder()
        .setup(|p| std::fs::write(p.join("policies/05-approvals.toml"), EXTRA).unwrap())
        .start()
}

fn issue(d: &Daemon, name: &str, scopes: &[&str], tenant: Option<&str>) -> String {
    let scopes: Vec<String> = scopes.iter().map(|s| format!("\"{s}\"")).collect();
    let tenant = tenant
        .map(|t| format!(r#","tenant_id":"{t}""#))
        .unwrap_or_default();
    let r = d.post_json(
        "/api/tokens",
        &format!(
            r#"{{"name":"{name}","scopes":[{}]{tenant}}}"#,
            scopes.join(",")
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["token"].as_str().unwrap().to_string()
}

fn call(d: &Daemon, tok: &str, method: &str, path: &str, body: Option<&str>) -> Resp {
    let mut h = vec![
        ("Host".to_string(), d.addr.to_string()),
        ("Authorization".to_string(), format!("Bearer {tok}")),
    ];
    if body.is_some() {
        h.push(("Content-Type".into(), "application/json".into()));
    }
    d.request(method, path, &h, body.map(str::as_bytes))
}

fn deploy_body(tenant: &str, label: &str, approval: Option<&str>) -> String {
    let a = approval
        .map(|a| format!(r#","approval_id":"{a}""#))
        .unwrap_or_default();
    format!(
        r#"{{"capability_id":"cap.code.deploy","env":"prod","data_label":"{label}","tenant_id":"{tenant}"{a}}}"#
    )
}

fn route(d: &Daemon, tok: &str, tenant: &str, approval: Option<&str>) -> Resp {
    call(
        d,
        tok,
        "POST",
        "/api/route",
        Some(&deploy_body(tenant, "INTERNAL", approval)),
    )
}

/// Open an approval as `tok`; return its id.
fn open(d: &Daemon, tok: &str, tenant: &str) -> String {
    let r = route(d, tok, tenant, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["allowed"], false, "{j}");
    let id = j["approval_id"].as_str().expect("approval_id").to_string();
    assert!(id.starts_with("apr_"), "{id}");
    assert!(j["approval_expires_at"].is_string(), "{j}");
    id
}

fn act(d: &Daemon, tok: &str, id: &str, what: &str, note: Option<&str>) -> Resp {
    let body = note.map(|n| format!(r#"{{"note":"{n}"}}"#));
    call(
        d,
        tok,
        "POST",
        &format!("/api/approvals/{id}/{what}"),
        body.as_deref(),
    )
}

fn state_of(d: &Daemon, id: &str) -> String {
    let r = d.get(&format!("/api/approvals/{id}"));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["state"].as_str().unwrap().to_string()
}

fn kinds(d: &Daemon) -> Vec<String> {
    let r = d.get("/api/audit?limit=1000");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["kind"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn open_approve_redeem_then_used() {
    let d = start();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);

    let id = open(&d, &app, "org.acme");
    assert!(d
        .get("/metrics")
        .body
        .contains("\nhall_approvals_pending 1\n"));
    let r = route(&d, &app, "org.acme", None);
    assert_eq!(r.json()["deny_reason"], "approval_required");
    assert_eq!(
        r.json()["approval_id"],
        id.as_str(),
        "a retry gets the same approval"
    );

    // Pending: not yet.
    let r = route(&d, &app, "org.acme", Some(&id));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.json()["allowed"].clone(), r.json()["deny_reason"].clone()),
        (Value::Bool(false), Value::from("approval_pending"))
    );
    // The app cannot approve (no approve scope); the approver can, with a note.
    assert_eq!(act(&d, &app, &id, "approve", None).status, 403);
    let r = act(&d, &boss, &id, "approve", Some("ship it"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "approved");
    // The app sees its own approval; the list is the approver's.
    let r = call(&d, &app, "GET", &format!("/api/approvals/{id}"), None);
    assert_eq!(r.json()["state"], "approved", "{}", r.body);
    assert_eq!(call(&d, &app, "GET", "/api/approvals", None).status, 403);
    let r = call(&d, &boss, "GET", "/api/approvals?state=approved", None);
    assert_eq!(
        r.json()["approvals"].as_array().unwrap().len(),
        1,
        "{}",
        r.body
    );

    // A changed request with the approval: an attack, not a policy outcome.
    let r = call(
        &d,
        &app,
        "POST",
        "/api/route",
        Some(&deploy_body("org.acme", "PUBLIC", Some(&id))),
    );
    r.assert_error(403, "approval_mismatch", None);
    let r = route(
        &d,
        &app,
        "org.acme",
        Some("apr_00000000000000000000000000000000"),
    );
    r.assert_error(403, "approval_mismatch", None);

    let r = route(&d, &app, "org.acme", Some(&id));
    assert_eq!(r.status, 200, "{}", r.body);
    let j = r.json();
    assert_eq!(j["allowed"], true, "{j}");
    assert_eq!(j["worker_id"], "worker.deploy.canary");
    assert_eq!(j["approval_id"], id.as_str());
    route(&d, &app, "org.acme", Some(&id)).assert_error(409, "approval_used", None);
    assert_eq!(state_of(&d, &id), "used");
    // Moving a used approval is a conflict naming its state.
    let r = act(&d, &boss, &id, "deny", None);
    r.assert_error(409, "approval_conflict", None);
    assert!(r.body.contains("used"), "{}", r.body);

    let k = kinds(&d);
    for want in ["approval_opened", "approval_approved", "approval_used"] {
        assert!(k.iter().any(|x| x == want), "{want} missing from {k:?}");
    }
    let r = d.get("/api/audit?kind=approval_approved");
    let rec = &r.json()["records"][0];
    assert!(rec["detail"].as_str().unwrap().contains(&id), "{rec}");
    assert!(
        rec["detail"].as_str().unwrap().contains("note=ship it"),
        "{rec}"
    );
    assert!(
        rec["token_id"].as_str().unwrap().starts_with("tok_"),
        "{rec}"
    );
    assert_eq!(d.get("/api/audit/verify").json()["ok"], true);
    let m = d.get("/metrics").body;
    assert!(m.contains("\nhall_approvals_pending 0\n"), "{m}");
    assert!(
        m.contains("hall_approval_transitions_total{kind=\"used\"} 1\n"),
        "{m}"
    );
    assert!(
        m.contains("hall_approval_transitions_total{kind=\"opened\"} 1\n"),
        "{m}"
    );
}

#[test]
fn thirty_two_concurrent_redemptions_allow_exactly_one() {
    let d = start();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let id = open(&d, &app, "org.acme");
    assert_eq!(act(&d, &boss, &id, "approve", None).status, 200);
    let body = deploy_body("org.acme", "INTERNAL", Some(&id));
    let statuses: Vec<(u16, bool)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..32)
            .map(|_| {
                let (body, app, addr) = (&body, &app, d.addr);
                s.spawn(move || {
                    let h = vec![
                        ("Host".to_string(), addr.to_string()),
                        ("Authorization".to_string(), format!("Bearer {app}")),
                        ("Content-Type".to_string(), "application/json".to_string()),
                    ];
                    let r =
                        raw_request(addr, "POST", "/api/route", &h, Some(body.as_bytes())).unwrap();
                    let allowed = r.status == 200 && r.json()["allowed"] == true;
                    (r.status, allowed)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(statuses.iter().filter(|s| s.1).count(), 1, "{statuses:?}");
    assert_eq!(
        statuses.iter().filter(|s| s.0 == 409).count(),
        31,
        "{statuses:?}"
    );
}

#[test]
fn deny_expiry_and_separation_of_duties() {
    let d = start();
    let app = issue(&d, "app", &["route"], None);
    let both = issue(&d, "both", &["route", "approve"], None);
    let boss = issue(&d, "boss", &["approve"], None);

    // Denied, with a note; deciding twice is a conflict.
    let id = open(&d, &app, "org.acme");
    assert_eq!(act(&d, &boss, &id, "deny", Some("not today")).status, 200);
    assert_eq!(
        route(&d, &app, "org.acme", Some(&id)).json()["deny_reason"],
        "approval_denied"
    );
    let r = act(&d, &boss, &id, "approve", None);
    r.assert_error(409, "approval_conflict", None);
    assert!(r.body.contains("denied"), "{}", r.body);
    // A new request opens a new approval once the old one is decided.
    let id2 = open(&d, &app, "org.acme");
    assert_ne!(id, id2);

    // The opener cannot approve its own approval, even with the scope; it may cancel.
    let own = open(&d, &both, "org.beta");
    act(&d, &both, &own, "approve", None).assert_error(403, "self_approval", None);
    act(&d, &boss, &own, "cancel", None).assert_error(403, "not_opener", None);
    assert_eq!(act(&d, &both, &own, "cancel", None).status, 200);
    assert_eq!(state_of(&d, &own), "cancelled");
    // A note is bounded text.
    let bad = act(&d, &boss, &id2, "deny", Some("a\\u0007b"));
    bad.assert_error(400, "invalid_request", Some("note"));
    assert_eq!(state_of(&d, &id2), "pending");

    // Expiry with a short ttl: expired on read, redemption says so, no transition after.
    let short = open(&d, &app, "org.ttl");
    std::thread::sleep(Duration::from_millis(2200));
    assert_eq!(state_of(&d, &short), "expired");
    assert_eq!(
        route(&d, &app, "org.ttl", Some(&short)).json()["deny_reason"],
        "approval_expired"
    );
    act(&d, &boss, &short, "approve", None).assert_error(409, "approval_conflict", None);
    // Exactly one expiry record for it (read, sweep and conflict did not duplicate it).
    let r = d.get("/api/audit?kind=approval_expired");
    let n = r.json()["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["detail"].as_str().unwrap().contains(&short))
        .count();
    assert_eq!(n, 1, "{}", r.body);
}

#[test]
fn veto_window_and_two_approvers() {
    let d = start();
    let app = issue(&d, "app", &["route"], None);
    let a1 = issue(&d, "a1", &["approve"], None);
    let a2 = issue(&d, "a2", &["approve"], None);

    // Held for veto: approved when nobody denies within the window.
    let r = route(&d, &app, "org.veto", None);
    assert_eq!(r.json()["deny_reason"], "held_for_veto", "{}", r.body);
    let id = r.json()["approval_id"].as_str().unwrap().to_string();
    assert_eq!(
        route(&d, &app, "org.veto", Some(&id)).json()["deny_reason"],
        "approval_pending"
    );
    std::thread::sleep(Duration::from_millis(1200));
    let r = route(&d, &app, "org.veto", Some(&id));
    assert_eq!(r.json()["allowed"], true, "{}", r.body);

    // Vetoed inside the window.
    let r = route(&d, &app, "org.veto", None);
    let id = r.json()["approval_id"].as_str().unwrap().to_string();
    assert_eq!(act(&d, &a1, &id, "deny", Some("veto")).status, 200);
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(
        route(&d, &app, "org.veto", Some(&id)).json()["deny_reason"],
        "approval_denied"
    );

    // Two distinct approvers: the same one twice does not count.
    let id = open(&d, &app, "org.two");
    assert_eq!(
        act(&d, &a1, &id, "approve", None).json()["state"],
        "pending"
    );
    act(&d, &a1, &id, "approve", None).assert_error(409, "approval_conflict", None);
    assert_eq!(
        route(&d, &app, "org.two", Some(&id)).json()["deny_reason"],
        "approval_pending"
    );
    assert_eq!(
        act(&d, &a2, &id, "approve", None).json()["state"],
        "approved"
    );
    assert_eq!(
        route(&d, &app, "org.two", Some(&id)).json()["allowed"],
        true
    );
    assert!(kinds(&d).iter().any(|k| k == "approval_voted"));
}

#[test]
fn tenant_bound_approvers() {
    let d = start();
    let app = issue(&d, "app", &["route"], None);
    let acme_boss = issue(&d, "acme-boss", &["approve"], Some("org.acme"));
    let beta = open(&d, &app, "org.beta");
    let acme = open(&d, &app, "org.acme");
    act(&d, &acme_boss, &beta, "approve", None).assert_error(403, "tenant_mismatch", None);
    assert_eq!(state_of(&d, &beta), "pending");
    let r = call(&d, &acme_boss, "GET", "/api/approvals", None);
    let list = r.json()["approvals"].as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{}", r.body);
    assert_eq!(list[0]["id"], acme.as_str());
    call(
        &d,
        &acme_boss,
        "GET",
        "/api/approvals?tenant_id=org.beta",
        None,
    )
    .assert_error(403, "tenant_mismatch", None);
    assert_eq!(act(&d, &acme_boss, &acme, "approve", None).status, 200);
}

#[test]
fn a_policy_edit_between_open_and_redeem_is_a_mismatch() {
    let d = start();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let id = open(&d, &app, "org.acme");
    assert_eq!(act(&d, &boss, &id, "approve", None).status, 200);
    let before = d.get("/api/status").json()["policy_version"].clone();
    std::fs::write(
        d.policies().join("01-allow-deploys.toml"),
        "[[rule]]\nid = \"deploy-anything\"\ncapabilities = [\"cap.code.deploy\"]\neffect = \"allow\"\n",
    )
    .unwrap();
    d.wait_until(Duration::from_secs(10), || {
        d.get("/api/status").json()["policy_version"] != before
    });
    // The approval was for a require_approval rule: under the new policy it proves nothing.
    route(&d, &app, "org.acme", Some(&id)).assert_error(403, "approval_mismatch", None);
    // Without it, the request is simply allowed by the new rule.
    assert_eq!(route(&d, &app, "org.acme", None).json()["allowed"], true);
}

#[test]
fn approvals_survive_a_restart() {
    let mut d = start();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let pending = open(&d, &app, "org.acme");
    let approved = open(&d, &app, "org.beta");
    assert_eq!(act(&d, &boss, &approved, "approve", None).status, 200);
    assert!(d.stop().success());
    let d = Daemon::spawn(d.into_dir(), &[], &[], true);
    assert_eq!(state_of(&d, &pending), "pending");
    assert_eq!(
        route(&d, &app, "org.acme", None).json()["approval_id"],
        pending.as_str()
    );
    let r = route(&d, &app, "org.beta", Some(&approved));
    assert_eq!(r.json()["allowed"], true, "{}", r.body);
    assert_eq!(d.get("/api/audit/verify").json()["ok"], true);
}

#[test]
fn wait_returns_when_an_approver_acts() {
    let d = start();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let id = open(&d, &app, "org.acme");
    // Nothing happens: the wait runs its course (1 s), state unchanged.
    let t = Instant::now();
    let r = call(
        &d,
        &app,
        "GET",
        &format!("/api/approvals/{id}?wait=1"),
        None,
    );
    assert_eq!(r.json()["state"], "pending");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    call(
        &d,
        &app,
        "GET",
        &format!("/api/approvals/{id}?wait=61"),
        None,
    )
    .assert_error(400, "invalid_request", Some("wait"));

    let (r, took) = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let t = Instant::now();
            let r = call(
                &d,
                &app,
                "GET",
                &format!("/api/approvals/{id}?wait=30"),
                None,
            );
            (r, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(act(&d, &boss, &id, "approve", None).status, 200);
        h.join().unwrap()
    });
    assert_eq!(r.json()["state"], "approved", "{}", r.body);
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn the_cli_opens_approves_and_redeems() {
    let d = start();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let url = format!("http://{}", d.addr);
    let hall = |tok: &str, args: &[&str]| {
        let out = std::process::Command::new(common::HALL)
            .args(args)
            .env("HALL_URL", &url)
            .env("HALL_TOKEN", tok)
            .env_remove("HALL_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let req = [
        "route",
        "--capability",
        "cap.code.deploy",
        "--env",
        "prod",
        "--label",
        "INTERNAL",
        "--tenant",
        "org.acme",
    ];
    let (code, out, err) = hall(&app, &req);
    assert_eq!(code, Some(1), "denied until approved: {out} {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let id = v["approval_id"].as_str().unwrap().to_string();
    assert!(
        err.contains(&format!("hall approvals approve {id}")),
        "the approver's command: {err}"
    );
    let (code, out, _) = hall(&boss, &["approvals", "list", "--state", "pending"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&id), "{out}");
    let (code, out, err) = hall(&boss, &["approvals", "approve", &id, "--note", "ok"]);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("\"approved\""), "{out}");
    let (code, out, err) = hall(&boss, &["approvals", "deny", &id]);
    assert_eq!(code, Some(1), "{out}");
    assert!(err.contains("approval_conflict"), "{err}");
    let mut redeem = req.to_vec();
    redeem.extend(["--approval-id", &id]);
    let (code, out, err) = hall(&app, &redeem);
    assert_eq!(code, Some(0), "{out} {err}");
    assert!(out.contains("worker.deploy.canary"), "{out}");

    // `hall route --wait`: opens, waits for the approver, then redeems.
    let mut args = req.to_vec();
    args[8] = "org.beta";
    args.push("--wait");
    let child = std::process::Command::new(common::HALL)
        .args(&args)
        .env("HALL_URL", &url)
        .env("HALL_TOKEN", &app)
        .env_remove("HALL_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut pending = String::new();
    d.wait_until(Duration::from_secs(20), || {
        let r = d.get("/api/approvals?state=pending&tenant_id=org.beta");
        match r.json()["approvals"][0]["id"].as_str() {
            Some(id) => {
                pending = id.to_string();
                true
            }
            None => false,
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(act(&d, &boss, &pending, "approve", None).status, 200);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("\"allowed\": true"), "{stdout}");
    assert_eq!(state_of(&d, &pending), "used");
}

/// Open an event stream; return the socket and what was read so far (the response head, the
/// stream's opening comment, and any events that came with them).
fn sse(d: &Daemon, tok: &str, query: &str, last_id: Option<u64>) -> (std::net::TcpStream, String) {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    let last = last_id
        .map(|n| format!("Last-Event-ID: {n}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET /api/events{query} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {tok}\r\nAccept: text/event-stream\r\n{last}\r\n",
        d.addr
    )
    .unwrap();
    let head = read_until(&mut s, "", ": from seq", Duration::from_secs(10));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/event-stream"), "{head}");
    (s, head)
}

/// Read from the stream until `needle` has been seen (in `seen` or after it); return all of it.
fn read_until(s: &mut std::net::TcpStream, seen: &str, needle: &str, timeout: Duration) -> String {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut buf = seen.as_bytes().to_vec();
    let mut chunk = [0u8; 4096];
    while start.elapsed() < timeout {
        if String::from_utf8_lossy(&buf).contains(needle) {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => continue,
        }
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    assert!(text.contains(needle), "{needle:?} not seen in:\n{text}");
    text
}

/// The `id:` of the first event of type `ty` in `text`.
fn event_id(text: &str, ty: &str) -> u64 {
    let at = text
        .find(&format!("event: {ty}\n"))
        .unwrap_or_else(|| panic!("no {ty} in {text}"));
    let before = &text[..at];
    let line = before
        .lines()
        .rev()
        .find(|l| l.starts_with("id: "))
        .unwrap();
    line[4..].trim().parse().unwrap()
}

#[test]
fn the_event_stream_shows_opened_then_decided_and_resumes() {
    let d = start();
    let admin = d.admin_token().unwrap();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let (mut s, seen) = sse(&d, &admin, "?types=approval.opened,approval.decided", None);
    let id = open(&d, &app, "org.acme");
    assert_eq!(act(&d, &boss, &id, "approve", None).status, 200);
    let text = read_until(
        &mut s,
        &seen,
        "event: approval.decided",
        Duration::from_secs(10),
    );
    let opened = event_id(&text, "approval.opened");
    let decided = event_id(&text, "approval.decided");
    assert!(opened < decided, "{text}");
    assert!(text.contains(&id), "{text}");
    assert!(
        !text.contains("event: decision\n"),
        "filtered by type: {text}"
    );
    drop(s);

    // Reconnect from the opened event: the next one is the decision, nothing before it.
    let (mut s, seen) = sse(
        &d,
        &admin,
        "?types=approval.opened,approval.decided",
        Some(opened),
    );
    let text = read_until(
        &mut s,
        &seen,
        "event: approval.decided",
        Duration::from_secs(10),
    );
    assert_eq!(event_id(&text, "approval.decided"), decided);
    assert!(!text.contains("event: approval.opened"), "{text}");

    // A tenant-bound audit token sees its tenant only.
    let beta = issue(&d, "beta-audit", &["audit"], Some("org.beta"));
    let (mut s, seen) = sse(&d, &beta, "?types=decision", None);
    assert_eq!(
        d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
            .status,
        200
    );
    assert_eq!(
        d.route("cap.doc.summarize", "dev", "PUBLIC", "org.beta")
            .status,
        200
    );
    let text = read_until(&mut s, &seen, "org.beta", Duration::from_secs(10));
    assert!(!text.contains("org.acme"), "{text}");
    // Unknown types are refused.
    call(&d, &admin, "GET", "/api/events?types=nope", None).assert_error(
        400,
        "invalid_request",
        Some("types"),
    );
}

#[test]
fn hall_events_prints_the_stream_as_json_lines_and_resumes() {
    let d = start();
    let admin = d.admin_token().unwrap();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let id = open(&d, &app, "org.acme");
    assert_eq!(act(&d, &boss, &id, "approve", None).status, 200);
    let events = |extra: &[&str]| {
        let out = std::process::Command::new(common::HALL)
            .args(["events", "--types", "approval.opened,approval.decided"])
            .args(extra)
            .env("HALL_URL", format!("http://{}", d.addr))
            .env("HALL_TOKEN", &admin)
            .env_remove("HALL_CONFIG")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    };
    // From the start of the log: opened, then decided, one JSON object a line.
    let all = events(&["--last-event-id", "0", "--count", "2"]);
    assert_eq!(all[0]["event"], "approval.opened", "{all:?}");
    assert_eq!(all[1]["event"], "approval.decided", "{all:?}");
    assert!(all[0]["data"].to_string().contains(&id), "{all:?}");
    let opened = all[0]["id"].as_u64().unwrap();
    assert!(all[1]["id"].as_u64().unwrap() > opened);
    // Resuming after the first gives the second.
    let rest = events(&["--last-event-id", &opened.to_string(), "--count", "1"]);
    assert_eq!(rest[0]["id"], all[1]["id"], "{rest:?}");
    // A token without the audit scope: exit 3 (refused by the daemon).
    let out = std::process::Command::new(common::HALL)
        .args(["events", "--count", "1"])
        .env("HALL_URL", format!("http://{}", d.addr))
        .env("HALL_TOKEN", &app)
        .env_remove("HALL_CONFIG")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A rule for the cap and watch tests: three distinct requests (staging/PUBLIC,
/// staging/INTERNAL, prod/PUBLIC) for each of two tenants.
const CAP_RULE: &str = r#"
[[rule]]
id = "t-cap"
capabilities = ["cap.code.deploy"]
envs = ["staging", "prod"]
tenants = ["org.cap", "org.cap2"]
effect = "require_approval"
"#;

fn cap_body(tenant: &str, env: &str, label: &str) -> String {
    format!(
        r#"{{"capability_id":"cap.code.deploy","env":"{env}","data_label":"{label}","tenant_id":"{tenant}"}}"#
    )
}

#[test]
fn the_pending_cap_comes_from_hall_toml_and_is_per_tenant() {
    let d = Daemon::builder()
        .setup(|p| {
            std::fs::write(p.join("policies/05-approvals.toml"), CAP_RULE).unwrap();
            // The per-user hall.toml (the harness points XDG_CONFIG_HOME here).
            std::fs::create_dir_all(p.join("xdg-config/hall")).unwrap();
            std::fs::write(
                p.join("xdg-config/hall/hall.toml"),
                "[approvals]\nmax_pending_per_tenant = 2\n",
            )
            .unwrap();
        })
        .start();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let open_as = |tenant: &str, env: &str, label: &str| {
        call(
            &d,
            &app,
            "POST",
            "/api/route",
            Some(&cap_body(tenant, env, label)),
        )
    };
    let first = open_as("org.cap", "staging", "PUBLIC");
    assert_eq!(first.status, 200, "{}", first.body);
    let first = first.json()["approval_id"].as_str().unwrap().to_string();
    let r = open_as("org.cap", "staging", "INTERNAL");
    assert_eq!(r.status, 200, "{}", r.body);
    // The third distinct request of the tenant is over the cap of 2.
    let r = open_as("org.cap", "prod", "PUBLIC");
    r.assert_error(429, "too_many_pending_approvals", None);
    assert!(r.body.contains("2 pending"), "{}", r.body);
    // A retry of a pending one is not a new approval: the same id, at the cap too.
    let again = open_as("org.cap", "staging", "PUBLIC");
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["approval_id"], first.as_str());
    // Another tenant has its own cap.
    for (env, label) in [("staging", "PUBLIC"), ("prod", "PUBLIC")] {
        let r = open_as("org.cap2", env, label);
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(r.json()["approval_id"].is_string(), "{}", r.body);
    }
    // Once one is decided, a new one can open.
    assert_eq!(act(&d, &boss, &first, "deny", None).status, 200);
    let r = open_as("org.cap", "prod", "PUBLIC");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["deny_reason"], "approval_required", "{}", r.body);
}

/// The value of one sample line of `/metrics` (`name{labels}`), 0 when absent.
fn metric(d: &Daemon, sample: &str) -> f64 {
    let r = d.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[test]
fn metrics_have_a_time_to_decision_histogram_by_outcome() {
    let d = start();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let body = d.get("/metrics").body;
    assert!(
        body.contains("# TYPE hall_approval_decision_seconds histogram"),
        "{body}"
    );
    for o in ["approved", "denied", "cancelled", "expired"] {
        assert_eq!(
            metric(
                &d,
                &format!("hall_approval_decision_seconds_count{{outcome=\"{o}\"}}")
            ),
            0.0
        );
    }
    let a = open(&d, &app, "org.acme");
    assert_eq!(act(&d, &boss, &a, "approve", None).status, 200);
    let b = open(&d, &app, "org.beta");
    assert_eq!(act(&d, &boss, &b, "deny", None).status, 200);
    let c = open(&d, &app, "org.two");
    assert_eq!(act(&d, &app, &c, "cancel", None).status, 200);
    // Expires while pending after its 2 s ttl; the sweep writes it (and observes it).
    let e = open(&d, &app, "org.ttl");
    d.wait_until(Duration::from_secs(20), || {
        metric(
            &d,
            "hall_approval_decision_seconds_count{outcome=\"expired\"}",
        ) == 1.0
    });
    for o in ["approved", "denied", "cancelled", "expired"] {
        let count = metric(
            &d,
            &format!("hall_approval_decision_seconds_count{{outcome=\"{o}\"}}"),
        );
        assert_eq!(count, 1.0, "{o}");
        // Every decision here took at most a day: the last finite bucket and +Inf hold it.
        for le in ["86400", "+Inf"] {
            assert_eq!(
                metric(
                    &d,
                    &format!(
                        "hall_approval_decision_seconds_bucket{{outcome=\"{o}\",le=\"{le}\"}}"
                    )
                ),
                1.0,
                "{o} {le}"
            );
        }
    }
    // The expiry is exactly the ttl after opening: 2 s, so in le=5 and not in le=1.
    let exp = |s: &str| metric(&d, &format!("hall_approval_decision_seconds_{s}"));
    assert_eq!(exp("sum{outcome=\"expired\"}"), 2.0);
    assert_eq!(exp("bucket{outcome=\"expired\",le=\"1\"}"), 0.0);
    assert_eq!(exp("bucket{outcome=\"expired\",le=\"5\"}"), 1.0);
    assert_eq!(state_of(&d, &e), "expired");
    // The transitions counter and the pending gauge are still there beside it.
    assert_eq!(
        metric(&d, "hall_approval_transitions_total{kind=\"approved\"}"),
        1.0
    );
    assert_eq!(metric(&d, "hall_approvals_pending"), 0.0);
}

/// A TCP connection to `addr` whose receive buffer is set small before connecting (so the
/// window it advertises stays small), for a client that stops reading.
fn connect_small_rcvbuf(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(v4) = addr else {
        panic!("the test daemon listens on IPv4 loopback")
    };
    // SAFETY: plain socket calls on a fd this function owns until it hands it to TcpStream.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let size: libc::c_int = 4096;
        assert_eq!(
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&size as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            ),
            0
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let r = libc::connect(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(r, 0, "connect: {}", std::io::Error::last_os_error());
        std::net::TcpStream::from_raw_fd(fd)
    }
}

/// Every `(id, event, data)` frame in SSE text.
fn frames(text: &str) -> Vec<(Option<u64>, String, String)> {
    let body = text.split_once("\r\n\r\n").map_or(text, |(_, b)| b);
    let mut out = Vec::new();
    for block in body.split("\n\n") {
        let (mut id, mut ev, mut data) = (None, None, String::new());
        for l in block.lines() {
            if let Some(v) = l.strip_prefix("id: ") {
                id = v.trim().parse().ok();
            } else if let Some(v) = l.strip_prefix("event: ") {
                ev = Some(v.trim().to_string());
            } else if let Some(v) = l.strip_prefix("data: ") {
                data.push_str(v);
            }
        }
        if let Some(ev) = ev {
            out.push((id, ev, data));
        }
    }
    out
}

#[test]
fn a_slow_event_consumer_is_dropped_with_a_final_event_and_can_resume() {
    use std::io::{Read, Write};
    let d = Daemon::builder()
        .setup(|p| {
            std::fs::create_dir_all(p.join("xdg-config/hall")).unwrap();
            std::fs::write(
                p.join("xdg-config/hall/hall.toml"),
                "[events]\nmax_lag = 20\n[audit]\ndurability = \"batched\"\n",
            )
            .unwrap();
        })
        .start();
    let admin = d.admin_token().unwrap();
    let mut s = connect_small_rcvbuf(d.addr);
    write!(
        s,
        "GET /api/events?types=decision HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {admin}\r\n\r\n",
        d.addr
    )
    .unwrap();
    let seen = read_until(&mut s, "", ": from seq", Duration::from_secs(10));
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    // The client stops reading. Decisions go on, each record ~4 KB with its context, far
    // more than the socket buffers hold: none of them waits for the stream.
    const N: usize = 300;
    let context = format!(r#"{{"pad":"{}"}}"#, "x".repeat(4000));
    let body = format!(
        r#"{{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme","context":{context}}}"#
    );
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                for _ in 0..N / 4 {
                    let r = d.post_json("/api/route", &body);
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            });
        }
    });
    // Now it reads on: what was buffered, one final `dropped` event, then the end.
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = seen.into_bytes();
    let mut chunk = [0u8; 65536];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                // The chunked body's last chunk: the server ended the stream.
                if buf.ends_with(b"\r\n0\r\n\r\n") {
                    break;
                }
            }
            Err(e) => panic!(
                "the stream did not end: {e}; read {} bytes:\n{}",
                buf.len(),
                String::from_utf8_lossy(&buf[buf.len().saturating_sub(2000)..])
            ),
        }
    }
    // Drop the chunk-size lines so the SSE text reads as sent.
    let text: String = String::from_utf8_lossy(&buf)
        .split("\r\n")
        .filter(|l| !(l.len() <= 8 && !l.is_empty() && l.chars().all(|c| c.is_ascii_hexdigit())))
        .collect::<Vec<_>>()
        .join("\r\n");
    let got = frames(&text.replace("\r\n", ""));
    let (last, rest) = got.split_last().expect("events");
    assert_eq!(last.1, "dropped", "the final event: {last:?}");
    assert!(
        rest.iter().all(|f| f.1 == "decision"),
        "nothing after the final event"
    );
    assert!(rest.len() < N, "dropped before all {N} were sent");
    let info: Value = serde_json::from_str(&last.2).unwrap();
    assert_eq!(info["reason"], "slow_consumer", "{info}");
    assert!(info["unsent"].as_u64().unwrap() > 20, "{info}");
    assert!(
        info["error"].as_str().unwrap().contains("Last-Event-ID"),
        "{info}"
    );
    let ids: Vec<u64> = rest.iter().map(|f| f.0.unwrap()).collect();
    let resume = info["last_event_id"].as_u64().unwrap();
    if let Some(l) = ids.last() {
        assert_eq!(resume, *l, "resume from the last id sent");
    }
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");

    // Resuming from there gives every remaining decision, in order, without a gap or a
    // repeat (a replay of what was in the log is not lag: this stream is not dropped).
    let (mut s, seen) = sse(&d, &admin, "?types=decision", Some(resume));
    let want = N - ids.len();
    let mut text = seen;
    let start = Instant::now();
    while frames(&text).len() < want && start.elapsed() < Duration::from_secs(30) {
        let more = read_until(&mut s, "", "\n\n", Duration::from_secs(5));
        text.push_str(&more);
    }
    let more = frames(&text);
    assert_eq!(more.len(), want, "{:?}", more.last());
    assert!(more.iter().all(|f| f.1 == "decision"), "not dropped again");
    let more_ids: Vec<u64> = more.iter().map(|f| f.0.unwrap()).collect();
    assert_eq!(more_ids[0], resume + 1);
    assert!(more_ids.windows(2).all(|w| w[1] == w[0] + 1));
    assert!(d.logs().contains("event stream dropped"), "logged");
}

/// `hall approvals watch …` as `tok`, its stdout lines coming through a channel.
fn spawn_watch(
    d: &Daemon,
    tok: &str,
    args: &[&str],
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(common::HALL)
        .args(["approvals", "watch"])
        .args(args)
        .env("HALL_URL", format!("http://{}", d.addr))
        .env("HALL_TOKEN", tok)
        .env_remove("HALL_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(out).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// The next line of a watch, within 20 s.
fn next_line(rx: &std::sync::mpsc::Receiver<String>) -> String {
    rx.recv_timeout(Duration::from_secs(20))
        .expect("a line from hall approvals watch")
}

#[test]
fn hall_approvals_watch_prints_the_queue_live_with_the_approvers_command() {
    let d = start();
    let admin = d.admin_token().unwrap();
    let app = issue(&d, "app", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let already = open(&d, &app, "org.acme");

    // Human lines: what is pending at start, then what opens and how it is decided.
    let (mut child, rx) = spawn_watch(&d, &admin, &["--count", "3"]);
    let l = next_line(&rx);
    assert!(l.contains(&already) && l.contains("pending"), "{l}");
    assert!(
        l.contains("tenant org.acme: cap.code.deploy in prod (INTERNAL)"),
        "{l}"
    );
    assert_eq!(
        next_line(&rx).trim(),
        format!("approve: hall approvals approve {already} --note \"…\"")
    );
    assert_eq!(
        next_line(&rx).trim(),
        format!("deny:    hall approvals deny {already} --note \"…\"")
    );
    // The watch is following now (it lists after its stream opened).
    let id = open(&d, &app, "org.beta");
    let l = next_line(&rx);
    assert!(l.contains(&id) && l.contains("opened"), "{l}");
    assert!(l.contains("worker worker.deploy.canary"), "{l}");
    let cmd = next_line(&rx);
    assert_eq!(
        cmd.trim(),
        format!("approve: hall approvals approve {id} --note \"…\"")
    );
    next_line(&rx);
    // The printed command works as printed (run by an approver).
    let out = std::process::Command::new(common::HALL)
        .args(["approvals", "approve", &id, "--note", "looks fine"])
        .env("HALL_URL", format!("http://{}", d.addr))
        .env("HALL_TOKEN", &boss)
        .env_remove("HALL_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = next_line(&rx);
    assert!(l.contains(&id) && l.contains("approved"), "{l}");
    assert!(
        l.contains("note: looks fine") && l.contains(", by tok_"),
        "{l}"
    );
    // --count 3 reached: it exits 0.
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");

    // --json: one object a line, with the commands; a tenant filter. Opened before or after
    // the watch's stream starts, an approval is printed once: as pending (from the list it
    // takes once its stream is open) or as opened (from the stream).
    let (mut child, rx) = spawn_watch(
        &d,
        &admin,
        &["--json", "--count", "2", "--tenant", "org.two"],
    );
    let two = open(&d, &app, "org.two");
    let _ = open(&d, &app, "org.beta"); // another tenant: not shown
    let v: Value = serde_json::from_str(&next_line(&rx)).unwrap();
    assert!(
        v["event"] == "approval.opened" || v["event"] == "approval.pending",
        "{v}"
    );
    assert_eq!(v["approval_id"], two.as_str(), "{v}");
    assert_eq!(v["tenant_id"], "org.two", "{v}");
    assert_eq!(
        v["approve_command"],
        format!("hall approvals approve {two} --note \"…\""),
        "{v}"
    );
    assert_eq!(act(&d, &boss, &two, "deny", Some("not today")).status, 200);
    let v: Value = serde_json::from_str(&next_line(&rx)).unwrap();
    assert_eq!(v["event"], "approval.decided", "{v}");
    assert_eq!(v["state"], "denied", "{v}");
    assert_eq!(v["approval_id"], two.as_str(), "{v}");
    assert_eq!(v["note"], "not today", "{v}");
    assert!(v["id"].as_u64().is_some(), "the event's audit seq: {v}");
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_second_app_whose_request_joined_an_approval_can_read_it() {
    let d = start();
    let app1 = issue(&d, "app1", &["route"], None);
    let app2 = issue(&d, "app2", &["route"], None);
    let app3 = issue(&d, "app3", &["route"], None);
    let boss = issue(&d, "boss", &["approve"], None);
    let id = open(&d, &app1, "org.acme");
    // The same request from another app: the same approval, which it may now read...
    assert_eq!(open(&d, &app2, "org.acme"), id);
    let get = |tok: &str| call(&d, tok, "GET", &format!("/api/approvals/{id}"), None);
    let r = get(&app2);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["state"], "pending");
    assert_eq!(get(&app1).status, 200);
    // ...and wait on, like its opener.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            let r = call(
                &d,
                &app2,
                "GET",
                &format!("/api/approvals/{id}?wait=30"),
                None,
            );
            tx.send(r).unwrap();
        });
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(act(&d, &boss, &id, "approve", None).status, 200);
        let r = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        assert_eq!(r.json()["state"], "approved", "{}", r.body);
    });
    // A route token that never asked for it still cannot see it; nor can a joiner cancel it.
    get(&app3).assert_error(404, "not_found", None);
    let id2 = open(&d, &app1, "org.beta");
    assert_eq!(open(&d, &app2, "org.beta"), id2);
    act(&d, &app2, &id2, "cancel", None).assert_error(403, "not_opener", None);
    // Redeemed by the joiner: allowed once.
    let r = route(&d, &app2, "org.acme", Some(&id));
    assert_eq!(r.json()["allowed"], true, "{}", r.body);
}

#[test]
fn hall_events_resumes_without_a_gap_after_the_daemon_drops_it() {
    use std::io::BufRead;
    let d = Daemon::builder()
        .setup(|p| {
            std::fs::create_dir_all(p.join("xdg-config/hall")).unwrap();
            std::fs::write(
                p.join("xdg-config/hall/hall.toml"),
                "[events]\nmax_lag = 20\n[audit]\ndurability = \"batched\"\n",
            )
            .unwrap();
        })
        .start();
    let admin = d.admin_token().unwrap();
    // Nobody reads its stdout for now: once the pipe is full, it stops reading the stream.
    let mut child = std::process::Command::new(common::HALL)
        .args(["events", "--types", "decision"])
        .env("HALL_URL", format!("http://{}", d.addr))
        .env("HALL_TOKEN", &admin)
        .env_remove("HALL_CONFIG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Decide until one reaches its stdout: its stream is open. Then nobody reads its
    // stdout for a while.
    let (tx, rx) = std::sync::mpsc::channel();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        tx.send((first, out)).unwrap();
    });
    let (first, out) = loop {
        assert_eq!(
            d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
                .status,
            200
        );
        if let Ok(got) = rx.recv_timeout(Duration::from_millis(200)) {
            break got;
        }
    };
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["event"], "decision", "{first}");
    const N: usize = 300;
    let body = format!(
        r#"{{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme","context":{{"pad":"{}"}}}}"#,
        "x".repeat(4000)
    );
    std::thread::scope(|sc| {
        for _ in 0..4 {
            sc.spawn(|| {
                for _ in 0..N / 4 {
                    assert_eq!(d.post_json("/api/route", &body).status, 200);
                }
            });
        }
    });
    // Now read: every decision exactly once, in order, with the daemon's `dropped` among them.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in out.lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let head = d.get("/api/status").json()["audit"]["seq"]
        .as_u64()
        .unwrap();
    let (mut ids, mut dropped) = (vec![first["id"].as_u64().unwrap()], None);
    while ids.last() != Some(&head) {
        let l = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!("{} decisions up to {head}, dropped: {dropped:?}", ids.len())
            });
        let v: Value = serde_json::from_str(&l).unwrap();
        match v["event"].as_str() {
            Some("decision") => ids.push(v["id"].as_u64().unwrap()),
            Some("dropped") => dropped = Some((ids.len(), v["data"].clone())),
            other => panic!("{other:?}: {l}"),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let stderr = {
        use std::io::Read;
        let mut s = String::new();
        child.stderr.take().unwrap().read_to_string(&mut s).unwrap();
        s
    };
    let (at, info) = dropped.expect("the daemon dropped the slow reader");
    assert!(at < ids.len(), "dropped before the end");
    assert_eq!(info["reason"], "slow_consumer", "{info}");
    // It names the last event it sent, which is where the CLI resumed.
    assert_eq!(info["last_event_id"].as_u64(), Some(ids[at - 1]), "{info}");
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "no gap, no repeat: {ids:?}"
    );
    assert!(stderr.contains("dropped this stream"), "{stderr}");
}

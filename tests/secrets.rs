//! End-to-end: secrets (SPEC section 6) through the real daemon and the real CLI — storage,
//! every release condition, audit records, master key sources, rotation, and the promise
//! that a value never shows up in logs, state files, audit exports or error responses.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use common::{copy_dir, raw_request, repo, Daemon, Resp, HALL};
use serde_json::{json, Value};

// ---- helpers --------------------------------------------------------------------------

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A distinctive value to grep for.
fn secret_value() -> String {
    format!("sk-test-{}", hex(&rand::random::<[u8; 16]>()))
}

/// A request with `token` as the bearer (JSON body when given).
fn call(d: &Daemon, method: &str, path: &str, token: &str, body: Option<&str>) -> Resp {
    let mut h = vec![
        ("Host".to_string(), d.addr.to_string()),
        ("Authorization".to_string(), format!("Bearer {token}")),
    ];
    if body.is_some() {
        h.push(("Content-Type".into(), "application/json".into()));
    }
    d.request(method, path, &h, body.map(str::as_bytes))
}

fn admin(d: &Daemon) -> String {
    d.admin_token().expect("admin token file")
}

fn put(d: &Daemon, name: &str, value: &str) -> Resp {
    call(
        d,
        "PUT",
        &format!("/api/secrets/{name}"),
        &admin(d),
        Some(&json!({ "value": value }).to_string()),
    )
}

fn release(d: &Daemon, token: &str, name: &str, decision_id: &str) -> Resp {
    call(
        d,
        "POST",
        &format!("/api/secrets/{name}/release"),
        token,
        Some(&json!({ "decision_id": decision_id }).to_string()),
    )
}

fn create_token(d: &Daemon, name: &str, scopes: &[&str], tenant: Option<&str>) -> String {
    let mut body = json!({"name": name, "scopes": scopes});
    if let Some(t) = tenant {
        body["tenant_id"] = json!(t);
    }
    let r = call(d, "POST", "/api/tokens", &admin(d), Some(&body.to_string()));
    assert_eq!(r.status, 201, "{}", r.body);
    r.json()["token"].as_str().unwrap().to_string()
}

/// An allowed decision for `worker.doc.summarize` (lists `openai_api_key`).
fn summarize_decision(d: &Daemon) -> String {
    let v = d
        .route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
        .json();
    assert_eq!(v["allowed"], true, "{v}");
    assert_eq!(v["worker_id"], "worker.doc.summarize", "{v}");
    v["decision_id"].as_str().unwrap().to_string()
}

/// Release `name` with the admin token for a fresh decision; the value.
fn released_value(d: &Daemon, name: &str) -> String {
    let id = summarize_decision(d);
    let r = release(d, &admin(d), name, &id);
    assert_eq!(r.status, 200, "{name}: {}", r.body);
    r.json()["value"].as_str().unwrap().to_string()
}

/// Make `worker.doc.summarize` list these secrets too (in the daemon's copy of the registry).
fn worker_lists(names: Vec<String>) -> impl FnOnce(&Path) {
    move |dir: &Path| {
        let p = dir.join("registry/workers.toml");
        let text = std::fs::read_to_string(&p).unwrap();
        let old = r#"secrets = ["openai_api_key"]"#;
        assert!(text.contains(old));
        let list: Vec<String> = std::iter::once("openai_api_key".to_string())
            .chain(names)
            .map(|n| format!("{n:?}"))
            .collect();
        std::fs::write(
            &p,
            text.replacen(old, &format!("secrets = [{}]", list.join(", ")), 1),
        )
        .unwrap();
    }
}

/// Run the real CLI against `d` (HALL_URL, HALL_STATE_DIR -> the admin token file).
fn hall(d: &Daemon, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut cmd = Command::new(HALL);
    cmd.args(args)
        .current_dir(d.dir.path())
        .env_remove("HALL_TOKEN")
        .env_remove("HALL_CONFIG")
        .env("HALL_URL", format!("http://{}", d.addr))
        .env("HALL_STATE_DIR", d.state_dir())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The `master key loaded` line of the daemon's log.
fn key_line(logs: &str) -> String {
    logs.lines()
        .find(|l| l.contains("master key loaded"))
        .unwrap_or_else(|| panic!("no `master key loaded` line in:\n{logs}"))
        .to_string()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn write_key(p: &Path, key: &[u8; 32], mode: u32) {
    std::fs::write(p, format!("{}\n", hex(key))).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A key file's 32 bytes (raw or hex).
fn read_key(p: &Path) -> Vec<u8> {
    let b = std::fs::read(p).unwrap();
    if b.len() == 32 {
        return b;
    }
    let t = String::from_utf8(b).unwrap();
    let t = t.trim();
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&t[i..i + 2], 16).unwrap())
        .collect()
}

/// A fresh dir with the example files, as `Daemon::start` makes it.
fn fresh_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&repo().join("registry"), &dir.path().join("registry"));
    copy_dir(&repo().join("policies"), &dir.path().join("policies"));
    dir
}

/// Start `hall serve` on `dir` expecting it to exit by itself (a refused start); its status
/// and stderr. Panics if it is still running after a generous deadline.
fn serve_expect_exit(dir: &Path, env: &[(&str, &str)]) -> (ExitStatus, String) {
    let mut cmd = common::serve_command(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hall serve was expected to refuse to start; logs:\n{}",
                reader.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (status, reader.join().unwrap())
}

fn audit(d: &Daemon, kind: &str) -> Vec<Value> {
    let r = d.get(&format!("/api/audit?kind={kind}&limit=1000"));
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["records"].as_array().unwrap().clone()
}

// ---- storage round trips --------------------------------------------------------------

#[test]
fn round_trip_via_api_and_cli_and_list_never_shows_values() {
    let d = Daemon::start();
    let v1 = secret_value();
    let r = put(&d, "openai_api_key", &v1);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains(&v1));
    let meta = r.json();
    assert_eq!(meta["name"], "openai_api_key");
    let created = meta["created_ms"].as_i64().unwrap();
    assert_eq!(released_value(&d, "openai_api_key"), v1);

    let list = d.get("/api/secrets");
    assert_eq!(list.status, 200);
    assert!(!list.body.contains(&v1), "{}", list.body);
    assert_eq!(list.json()["secrets"][0]["name"], "openai_api_key");
    assert_eq!(list.json()["secrets"].as_array().unwrap().len(), 1);

    // Replace via the CLI, value on stdin; quotes, backslashes, unicode survive; only the
    // trailing newline is dropped.
    let v2 = format!("{} \"quoted\" \\back ü", secret_value());
    let out = hall(
        &d,
        &["secret", "set", "openai_api_key"],
        Some(format!("{v2}\n").as_bytes()),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stdout).contains(&v2) && !text(&out.stderr).contains(&v2));
    assert_eq!(released_value(&d, "openai_api_key"), v2);
    let l = d.get("/api/secrets").json();
    assert_eq!(
        l["secrets"][0]["created_ms"].as_i64().unwrap(),
        created,
        "a replace keeps created_ms"
    );
    assert!(l["secrets"][0]["updated_ms"].as_i64().unwrap() >= created);

    // A second secret via the CLI; the CLI list shows names only.
    let v3 = secret_value();
    let out = hall(&d, &["secret", "set", "github_token"], Some(v3.as_bytes()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = hall(&d, &["secret", "list"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = listed["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["github_token", "openai_api_key"]);
    for v in [&v1, &v2, &v3] {
        assert!(!text(&out.stdout).contains(v.as_str()));
    }

    // An empty value is refused by the CLI, nothing stored.
    let out = hall(&d, &["secret", "set", "empty_one"], Some(b"\n"));
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("empty value"),
        "{}",
        text(&out.stderr)
    );

    // Too long, or not text: refused by the CLI with a clear message, nothing stored.
    let long = vec![b'x'; 64 * 1024 + 1];
    let out = hall(&d, &["secret", "set", "too_long"], Some(&long));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("longer than 65536 bytes"),
        "{}",
        text(&out.stderr)
    );
    let out = hall(&d, &["secret", "set", "not_text"], Some(b"\xff\xfe"));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("UTF-8"), "{}", text(&out.stderr));
    assert_eq!(
        d.get("/api/secrets").json()["secrets"]
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // rm via the CLI: gone from the list, release says unknown_secret, rm again fails.
    let out = hall(&d, &["secret", "rm", "openai_api_key"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list = d.get("/api/secrets").json();
    assert_eq!(list["secrets"].as_array().unwrap().len(), 1);
    let id = summarize_decision(&d);
    release(&d, &admin(&d), "openai_api_key", &id).assert_error(404, "unknown_secret", None);
    let out = hall(&d, &["secret", "rm", "openai_api_key"], None);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    // And via the API.
    call(&d, "DELETE", "/api/secrets/github_token", &admin(&d), None);
    call(&d, "DELETE", "/api/secrets/github_token", &admin(&d), None).assert_error(
        404,
        "not_found",
        None,
    );

    // Stores and deletes are audited, by name.
    let stores: Vec<Value> = audit(&d, "secret_store");
    assert_eq!(stores.len(), 3, "{stores:?}");
    assert!(stores.iter().all(|r| r["token_id"].is_string()));
    let deletes = audit(&d, "secret_delete");
    let deleted: Vec<&str> = deletes
        .iter()
        .map(|r| r["detail"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, ["openai_api_key", "github_token"]);
}

#[test]
fn secret_endpoints_check_scopes() {
    let d = Daemon::start();
    let writer = create_token(&d, "writer", &["secrets:write"], None);
    let releaser = create_token(&d, "releaser", &["secrets:release"], Some("org.acme"));
    let v = secret_value();
    let body = json!({ "value": v }).to_string();
    let r = call(
        &d,
        "PUT",
        "/api/secrets/openai_api_key",
        &writer,
        Some(&body),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(call(&d, "GET", "/api/secrets", &writer, None).status, 200);
    // A release token cannot write, list or delete; a write token cannot rotate.
    call(
        &d,
        "PUT",
        "/api/secrets/openai_api_key",
        &releaser,
        Some(&body),
    )
    .assert_error(403, "forbidden", None);
    call(&d, "GET", "/api/secrets", &releaser, None).assert_error(403, "forbidden", None);
    call(&d, "DELETE", "/api/secrets/openai_api_key", &releaser, None).assert_error(
        403,
        "forbidden",
        None,
    );
    call(&d, "POST", "/api/keys/rotate", &writer, None).assert_error(403, "forbidden", None);
    call(
        &d,
        "PUT",
        "/api/secrets/openai_api_key",
        "not-a-token",
        Some(&body),
    )
    .assert_error(401, "unauthorized", None);
    assert_eq!(released_value(&d, "openai_api_key"), v);
}

// ---- release conditions -----------------------------------------------------------------

#[test]
fn every_release_condition_over_http_and_every_outcome_audited() {
    let d = Daemon::start();
    let acme = create_token(&d, "acme-release", &["secrets:release"], Some("org.acme"));
    let other = create_token(&d, "other-release", &["secrets:release"], Some("org.other"));
    let unbound = create_token(&d, "unbound-release", &["secrets:release"], None);
    let no_scope = create_token(&d, "acme-route", &["route"], Some("org.acme"));
    // Admin bound to a tenant is still bound.
    let admin_other = create_token(&d, "other-admin", &["admin"], Some("org.other"));
    let admin_acme = create_token(&d, "acme-admin", &["admin"], Some("org.acme"));

    let ok = summarize_decision(&d);
    let denied = d.route("cap.unknown", "dev", "PUBLIC", "org.acme").json();
    assert_eq!(denied["allowed"], false);
    let denied = denied["decision_id"].as_str().unwrap().to_string();
    let dry = d
        .post_json(
            "/api/route",
            r#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme","dry_run":true}"#,
        )
        .json();
    assert_eq!(
        (dry["allowed"].clone(), dry["dry_run"].clone()),
        (json!(true), json!(true)),
        "{dry}"
    );
    let dry = dry["decision_id"].as_str().unwrap().to_string();
    let search = d
        .route("cap.web.search", "dev", "PUBLIC", "org.acme")
        .json();
    assert_eq!(
        (search["allowed"].clone(), search["worker_id"].clone()),
        (json!(true), json!("worker.web.search")),
        "{search}"
    );
    let search = search["decision_id"].as_str().unwrap().to_string();
    let unknown = "0193a000-0000-7000-8000-000000000000";

    // Before the secret exists: everything else holds, so the refusal is unknown_secret.
    release(&d, &acme, "openai_api_key", &ok).assert_error(404, "unknown_secret", None);

    let v = secret_value();
    assert_eq!(put(&d, "openai_api_key", &v).status, 200);

    let cases: Vec<(&str, &str, &str, u16, &str)> = vec![
        ("unknown decision", &acme, unknown, 404, "unknown_decision"),
        ("denied decision", &acme, &denied, 403, "decision_denied"),
        ("dry run", &acme, &dry, 403, "dry_run"),
        (
            "worker not entitled",
            &acme,
            &search,
            403,
            "worker_not_entitled",
        ),
        (
            "token bound to another tenant",
            &other,
            &ok,
            403,
            "tenant_mismatch",
        ),
        // The store's rule: an unbound token may release only if it is admin.
        (
            "unbound non-admin token",
            &unbound,
            &ok,
            403,
            "tenant_mismatch",
        ),
        (
            "admin token bound to another tenant",
            &admin_other,
            &ok,
            403,
            "tenant_mismatch",
        ),
        (
            "token without secrets:release",
            &no_scope,
            &ok,
            403,
            "forbidden",
        ),
    ];
    for (what, token, decision, status, code) in &cases {
        let r = release(&d, token, "openai_api_key", decision);
        assert_eq!(r.status, *status, "{what}: {}", r.body);
        assert_eq!(r.json()["code"], *code, "{what}: {}", r.body);
        assert!(
            !r.body.contains(&v),
            "{what}: the value leaked into a refusal"
        );
    }

    // Success: a token bound to the decision's tenant, and the admin token.
    for token in [&acme, &admin(&d), &admin_acme] {
        let r = release(&d, token, "openai_api_key", &ok);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let j = r.json();
        assert_eq!(j["value"], v.as_str());
        assert_eq!(j["name"], "openai_api_key");
        assert_eq!(j["decision_id"], ok.as_str());
    }

    // Every refusal is a record whose deny_reason is its code; every release a record.
    let refusals = audit(&d, "secret_refusal");
    let mut got: Vec<String> = refusals
        .iter()
        .map(|r| r["deny_reason"].as_str().unwrap().to_string())
        .collect();
    let mut want: Vec<String> = cases
        .iter()
        .map(|c| c.4.to_string())
        .chain(["unknown_secret".to_string()])
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    for r in &refusals {
        assert_eq!(r["allowed"], false, "{r}");
        assert_eq!(r["detail"], "openai_api_key", "{r}");
        assert!(r["token_id"].is_string(), "{r}");
        assert!(r["decision_id"].is_string(), "{r}");
    }
    let by_reason = |code: &str| {
        refusals
            .iter()
            .find(|r| r["deny_reason"] == code)
            .unwrap()
            .clone()
    };
    assert_eq!(
        by_reason("tenant_mismatch")["tenant_id"],
        "org.acme",
        "the decision's tenant is recorded"
    );
    assert_eq!(
        by_reason("worker_not_entitled")["worker_id"],
        "worker.web.search"
    );
    assert_eq!(by_reason("unknown_decision")["decision_id"], unknown);

    let releases = audit(&d, "secret_release");
    assert_eq!(releases.len(), 3, "{releases:?}");
    for r in &releases {
        assert_eq!(r["allowed"], true);
        assert_eq!(r["decision_id"], ok.as_str());
        assert_eq!(r["tenant_id"], "org.acme");
        assert_eq!(r["worker_id"], "worker.doc.summarize");
        assert_eq!(r["detail"], "openai_api_key");
    }
    let ids: std::collections::HashSet<&str> = releases
        .iter()
        .map(|r| r["token_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "each names its own token");

    let everything = d.get("/api/audit?limit=1000");
    assert_eq!(everything.status, 200);
    assert!(everything.body.contains("secret_release") && !everything.body.contains(&v));
    assert_eq!(d.get("/api/audit/verify").json()["ok"], true);
}

#[test]
fn release_after_the_ttl_is_refused() {
    // The TTL from the environment, and from `[secrets] release_ttl` in the config file.
    let by_env = Daemon::builder()
        .env("HALL_SECRETS_RELEASE_TTL", "1")
        .start();
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("hall.toml");
    std::fs::write(&cfg, "[secrets]\nrelease_ttl = 1\n").unwrap();
    let by_file = Daemon::builder()
        .arg("--config")
        .arg(cfg.to_str().unwrap())
        .start();
    for d in [&by_env, &by_file] {
        expires(d);
    }
}

fn expires(d: &Daemon) {
    let v = secret_value();
    assert_eq!(put(d, "openai_api_key", &v).status, 200);
    let id = summarize_decision(d);
    let token = admin(d);
    let mut last = None;
    d.wait_until(Duration::from_secs(30), || {
        let r = release(d, &token, "openai_api_key", &id);
        match r.status {
            // Still young: the value, nothing else.
            200 => assert_eq!(r.json()["value"], v.as_str()),
            _ => {
                last = Some(r);
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        false
    });
    last.unwrap().assert_error(403, "decision_expired", None);
    let refusals = audit(d, "secret_refusal");
    assert_eq!(refusals.len(), 1);
    assert_eq!(refusals[0]["deny_reason"], "decision_expired");
}

// ---- master key sources -----------------------------------------------------------------

#[test]
fn key_file_from_env_is_named_in_the_log_and_secrets_survive_a_restart() {
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("hall.key");
    write_key(&key_path, &rand::random(), 0o600);
    let env = vec![(
        "HALL_MASTER_KEY_FILE".to_string(),
        key_path.display().to_string(),
    )];
    let mut d = Daemon::spawn(fresh_dir(), &[], &env, true);
    let line = key_line(&d.logs());
    assert!(
        line.contains(&format!("file {}", key_path.display())),
        "{line}"
    );
    assert!(
        !d.state_dir().join("master.key").exists(),
        "no state key when a key file is named"
    );
    let v = secret_value();
    assert_eq!(put(&d, "openai_api_key", &v).status, 200);
    assert_eq!(d.stop().code(), Some(0));

    // Same source and key id on the second start.
    let tail = |l: &str| l.split("master key loaded").nth(1).unwrap().to_string();
    let d = Daemon::spawn(d.into_dir(), &[], &env, true);
    assert_eq!(tail(&key_line(&d.logs())), tail(&line));
    assert_eq!(released_value(&d, "openai_api_key"), v);
    assert!(!d.state_dir().join("master.key").exists());

    // Rotation rewrites the named file (still 0600), and a restart reads it.
    let before = read_key(&key_path);
    let r = call(&d, "POST", "/api/keys/rotate", &admin(&d), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_ne!(read_key(&key_path), before);
    assert_eq!(mode(&key_path), 0o600);
    let mut d = d;
    d.stop();
    let d = Daemon::spawn(d.into_dir(), &[], &env, true);
    assert!(key_line(&d.logs()).contains(r.json()["new_key_id"].as_str().unwrap()));
    assert_eq!(released_value(&d, "openai_api_key"), v);
}

#[test]
fn without_a_key_file_the_state_key_is_created_private() {
    let d = Daemon::start();
    let p = d.state_dir().join("master.key");
    assert!(p.exists());
    assert_eq!(mode(&p), 0o600);
    assert_eq!(mode(&d.state_dir()), 0o700);
    assert_eq!(read_key(&p).len(), 32);
    let line = key_line(&d.logs());
    assert!(
        line.contains(&format!("state file {}", p.display())),
        "{line}"
    );
}

#[test]
fn systemd_credential_is_used_and_cannot_be_rotated() {
    let creds = tempfile::tempdir().unwrap();
    let cred = creds.path().join("master.key");
    write_key(&cred, &rand::random(), 0o400);
    let env = vec![(
        "CREDENTIALS_DIRECTORY".to_string(),
        creds.path().display().to_string(),
    )];
    let mut d = Daemon::spawn(fresh_dir(), &[], &env, true);
    let line = key_line(&d.logs());
    assert!(
        line.contains(&format!("systemd credential {}", cred.display())),
        "{line}"
    );
    assert!(!d.state_dir().join("master.key").exists());
    let v = secret_value();
    assert_eq!(put(&d, "openai_api_key", &v).status, 200);
    let r = call(&d, "POST", "/api/keys/rotate", &admin(&d), None);
    r.assert_error(409, "cannot_rotate", None);
    assert_eq!(released_value(&d, "openai_api_key"), v);
    d.stop();
    let d = Daemon::spawn(d.into_dir(), &[], &env, true);
    assert_eq!(released_value(&d, "openai_api_key"), v);
}

#[test]
fn an_open_key_file_is_refused_at_start() {
    // HALL_MASTER_KEY_FILE readable by the group.
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("hall.key");
    let key: [u8; 32] = rand::random();
    write_key(&key_path, &key, 0o640);
    let dir = fresh_dir();
    let kp = key_path.display().to_string();
    let (status, logs) = serve_expect_exit(dir.path(), &[("HALL_MASTER_KEY_FILE", &kp)]);
    assert!(!status.success(), "{logs}");
    assert!(logs.contains(&kp) && logs.contains("chmod 600"), "{logs}");
    assert!(
        !logs.contains(&hex(&key)),
        "the key itself is never printed"
    );
    assert!(!logs.contains("listening on"), "{logs}");

    // A state key someone made world-readable.
    let mut d = Daemon::start();
    d.stop();
    let dir = d.into_dir();
    let sk = dir.path().join("state/master.key");
    std::fs::set_permissions(&sk, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, logs) = serve_expect_exit(dir.path(), &[]);
    assert!(!status.success(), "{logs}");
    assert!(
        logs.contains(&sk.display().to_string()) && logs.contains("chmod 600"),
        "{logs}"
    );

    // A named key file that does not exist is an error, never a fresh key.
    let missing = keys.path().join("missing.key").display().to_string();
    let (status, logs) =
        serve_expect_exit(fresh_dir().path(), &[("HALL_MASTER_KEY_FILE", &missing)]);
    assert!(!status.success(), "{logs}");
    assert!(logs.contains(&missing), "{logs}");
}

#[test]
fn a_different_master_key_fails_at_start_instead_of_serving_garbage() {
    let keys = tempfile::tempdir().unwrap();
    let (a, b) = (keys.path().join("a.key"), keys.path().join("b.key"));
    write_key(&a, &rand::random(), 0o600);
    write_key(&b, &rand::random(), 0o600);
    let env_a = vec![("HALL_MASTER_KEY_FILE".to_string(), a.display().to_string())];
    let mut d = Daemon::spawn(fresh_dir(), &[], &env_a, true);
    let v = secret_value();
    assert_eq!(put(&d, "openai_api_key", &v).status, 200);
    d.stop();
    let dir = d.into_dir();

    let bp = b.display().to_string();
    let (status, logs) = serve_expect_exit(dir.path(), &[("HALL_MASTER_KEY_FILE", &bp)]);
    assert!(!status.success(), "{logs}");
    assert!(logs.contains("wrong master key"), "{logs}");
    assert!(
        logs.contains(&format!("loaded from file {bp} has id")),
        "{logs}"
    );
    assert!(!logs.contains("listening on"), "{logs}");

    // The right key still works afterwards: the failed start changed nothing.
    let d = Daemon::spawn(dir, &[], &env_a, true);
    assert_eq!(released_value(&d, "openai_api_key"), v);

    // A lost state key: the daemon must not start on a new one.
    let mut d = Daemon::start();
    assert_eq!(put(&d, "openai_api_key", &v).status, 200);
    d.stop();
    let dir = d.into_dir();
    std::fs::remove_file(dir.path().join("state/master.key")).unwrap();
    let (status, logs) = serve_expect_exit(dir.path(), &[]);
    assert!(!status.success(), "{logs}");
    assert!(logs.contains("wrong master key"), "{logs}");
    assert!(logs.contains("loaded from state file"), "{logs}");
}

// ---- rotation -------------------------------------------------------------------------------

fn names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("s{i}")).collect()
}

/// Every one of `vals` releases (one decision, admin token).
fn all_release(d: &Daemon, vals: &[(String, String)]) {
    let id = summarize_decision(d);
    for (name, v) in vals {
        let r = release(d, &admin(d), name, &id);
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        assert_eq!(r.json()["value"], v.as_str(), "{name}");
    }
}

fn store_all(d: &Daemon, n: usize) -> Vec<(String, String)> {
    let vals: Vec<(String, String)> = names(n).into_iter().map(|k| (k, secret_value())).collect();
    for (k, v) in &vals {
        let r = put(d, k, v);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    vals
}

#[test]
fn rotate_key_via_cli_then_restart_every_secret_reads() {
    let n = 12;
    let mut d = Daemon::builder().setup(worker_lists(names(n))).start();
    let vals = store_all(&d, n);
    let key_path = d.state_dir().join("master.key");
    let before = read_key(&key_path);
    let line_before = key_line(&d.logs());

    let out = hall(&d, &["secret", "rotate-key"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rep: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(rep["reencrypted"], n as u64, "{rep}");
    assert_eq!(rep["resumed"], false);
    assert_ne!(rep["old_key_id"], rep["new_key_id"]);
    assert!(
        line_before.contains(rep["old_key_id"].as_str().unwrap()),
        "{line_before}"
    );
    assert_ne!(
        read_key(&key_path),
        before,
        "the state key file holds the new key"
    );
    assert_eq!(mode(&key_path), 0o600);
    assert!(!d.state_dir().join("master.key.next").exists());
    all_release(&d, &vals);

    // Via the API too, then restart: the new key is loaded and everything reads.
    let r = call(&d, "POST", "/api/keys/rotate", &admin(&d), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let new_id = r.json()["new_key_id"].as_str().unwrap().to_string();
    assert_eq!(d.stop().code(), Some(0));
    let d = Daemon::spawn(d.into_dir(), &[], &[], true);
    let line = key_line(&d.logs());
    assert!(line.contains(&new_id), "{line}");
    all_release(&d, &vals);
}

#[test]
fn releases_racing_rotations_always_get_the_value() {
    let n = 3;
    let d = Daemon::builder().setup(worker_lists(names(n))).start();
    let vals = store_all(&d, n);
    let id = summarize_decision(&d);
    let token = admin(&d);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    for (name, v) in &vals {
                        let r = release(&d, &token, name, &id);
                        assert_eq!(r.status, 200, "{name}: {}", r.body);
                        assert_eq!(r.json()["value"], v.as_str());
                    }
                }
            });
        }
        for _ in 0..30 {
            let r = call(&d, "POST", "/api/keys/rotate", &token, None);
            assert_eq!(r.status, 200, "{}", r.body);
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
    });
}

#[test]
fn a_pending_key_left_by_an_interrupted_rotation_is_resumed() {
    // The on-disk state right after rotation step 1 (see src/store/secrets.rs): the next
    // key is durably in `master.key.next`, no record re-sealed yet. The store writes exactly
    // this file (hex, 0600) before it seals anything under the new key.
    let n = 6;
    let mut d = Daemon::builder().setup(worker_lists(names(n))).start();
    let vals = store_all(&d, n);
    d.stop();
    let dir = d.into_dir();
    let state = dir.path().join("state");
    let next: [u8; 32] = rand::random();
    write_key(&state.join("master.key.next"), &next, 0o600);

    let d = Daemon::spawn(dir, &[], &[], true);
    all_release(&d, &vals);
    let r = call(&d, "POST", "/api/keys/rotate", &admin(&d), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let rep = r.json();
    assert_eq!(rep["resumed"], true, "{rep}");
    assert_eq!(rep["reencrypted"], n as u64, "{rep}");
    assert_eq!(
        read_key(&state.join("master.key")),
        next.to_vec(),
        "the pending key was promoted"
    );
    assert!(!state.join("master.key.next").exists());
    let mut d = d;
    d.stop();
    let d = Daemon::spawn(d.into_dir(), &[], &[], true);
    all_release(&d, &vals);

    // The state after promotion but before the pending file was removed: rerun finishes.
    let mut d = d;
    d.stop();
    let dir = d.into_dir();
    std::fs::copy(
        dir.path().join("state/master.key"),
        dir.path().join("state/master.key.next"),
    )
    .unwrap();
    let d = Daemon::spawn(dir, &[], &[], true);
    all_release(&d, &vals);
    let r = call(&d, "POST", "/api/keys/rotate", &admin(&d), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["resumed"], true);
    assert_eq!(r.json()["reencrypted"], 0);
    assert!(!d.state_dir().join("master.key.next").exists());
    all_release(&d, &vals);
}

#[test]
fn rotation_killed_mid_run_then_rerun_keeps_every_secret() {
    // kill -9 while a rotation runs (wherever it happens to be: the delays after the pending
    // key file appears vary the point), restart, every secret reads; rotate again (resuming
    // when a pending key was left), restart, every secret reads under the final key.
    let n = 150;
    for delay_us in [0u64, 2_000, 10_000, 50_000] {
        let d = Daemon::builder().setup(worker_lists(names(n))).start();
        let vals = store_all(&d, n);
        let (addr, token, state) = (d.addr, admin(&d), d.state_dir());
        let rot = std::thread::spawn(move || {
            let h = vec![
                ("Host".to_string(), addr.to_string()),
                ("Authorization".to_string(), format!("Bearer {token}")),
            ];
            raw_request(addr, "POST", "/api/keys/rotate", &h, None).ok()
        });
        let pending = state.join("master.key.next");
        let start = Instant::now();
        while !pending.exists() && !rot.is_finished() && start.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(Duration::from_micros(delay_us));
        d.signal(9);
        let answered = rot.join().unwrap().map(|r| r.status);
        let left_pending = pending.exists();
        eprintln!(
            "delay {delay_us} us: pending key left: {left_pending}; rotate answered: {answered:?}"
        );

        let d = Daemon::spawn(d.into_dir(), &[], &[], true);
        all_release(&d, &vals);
        let r = call(&d, "POST", "/api/keys/rotate", &admin(&d), None);
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["resumed"], left_pending, "{}", r.body);
        let new_id = r.json()["new_key_id"].as_str().unwrap().to_string();
        let mut d = d;
        d.stop();
        let d = Daemon::spawn(d.into_dir(), &[], &[], true);
        assert!(key_line(&d.logs()).contains(&new_id));
        assert!(!d.state_dir().join("master.key.next").exists());
        all_release(&d, &vals);
    }
}

#[test]
fn names_with_separators_work_through_the_cli_and_api() {
    let name = "team/db:pw@prod";
    let d = Daemon::builder()
        .setup(worker_lists(vec![name.into()]))
        .start();
    let v = secret_value();
    let out = hall(&d, &["secret", "set", name], Some(v.as_bytes()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(d.get("/api/secrets").json()["secrets"][0]["name"], name);
    let id = summarize_decision(&d);
    let r = release(&d, &admin(&d), "team%2Fdb%3Apw%40prod", &id);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["value"], v.as_str());
    let out = hall(&d, &["secret", "rm", name], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        d.get("/api/secrets").json()["secrets"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
}

// ---- the value is nowhere -------------------------------------------------------------------

fn files_under(p: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(p).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out)
        } else {
            out.push((p.clone(), std::fs::read(&p).unwrap()));
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_value_is_absent_from_trace_logs_state_files_exports_and_error_responses() {
    let mut d = Daemon::builder()
        .env("RUST_LOG", "trace")
        .setup(worker_lists(vec!["cli_secret".into()]))
        .start();
    let v_api = secret_value();
    let v_cli = secret_value();
    assert_eq!(put(&d, "openai_api_key", &v_api).status, 200);
    let out = hall(&d, &["secret", "set", "cli_secret"], Some(v_cli.as_bytes()));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let acme = create_token(&d, "acme", &["secrets:release"], Some("org.acme"));
    let id = summarize_decision(&d);
    for name in ["openai_api_key", "cli_secret"] {
        assert_eq!(release(&d, &acme, name, &id).status, 200);
    }
    assert_eq!(d.get("/api/secrets").status, 200);
    // Refusals too.
    release(&d, "wrong-token", "openai_api_key", &id).assert_error(401, "unauthorized", None);
    // A malformed decision id is a 400 before anything is looked up or recorded.
    assert_eq!(release(&d, &acme, "openai_api_key", "nope").status, 400);

    // Malformed writes carrying the value: the error never echoes it.
    let t = admin(&d);
    let host = ("Host".to_string(), d.addr.to_string());
    let bearer = ("Authorization".to_string(), format!("Bearer {t}"));
    let ct = |c: &str| ("Content-Type".to_string(), c.to_string());
    type Case<'a> = (&'a str, String, Vec<(String, String)>, u16);
    let bad: Vec<Case> = vec![
        (
            "/api/secrets/openai_api_key",
            format!(r#"{{"value":"{v_api}","extra":1}}"#),
            vec![host.clone(), bearer.clone(), ct("application/json")],
            400,
        ),
        (
            "/api/secrets/openai_api_key",
            format!(r#"{{"value":"{v_api}""#),
            vec![host.clone(), bearer.clone(), ct("application/json")],
            400,
        ),
        (
            "/api/secrets/openai_api_key",
            format!(r#"{{"value":["{v_api}"]}}"#),
            vec![host.clone(), bearer.clone(), ct("application/json")],
            400,
        ),
        (
            "/api/secrets/openai_api_key",
            format!(r#"{{"{v_api}":"x"}}"#),
            vec![host.clone(), bearer.clone(), ct("application/json")],
            400,
        ),
        (
            "/api/secrets/openai_api_key",
            format!(r#"{{"value":"{v_api}"}}"#),
            vec![host.clone(), bearer.clone(), ct("text/plain")],
            415,
        ),
        (
            "/api/secrets/-bad-name",
            format!(r#"{{"value":"{v_api}"}}"#),
            vec![host.clone(), bearer.clone(), ct("application/json")],
            400,
        ),
        (
            "/api/secrets/openai_api_key",
            format!(r#"{{"value":"{v_api}"}}"#),
            vec![host.clone(), ct("application/json")],
            401,
        ),
        (
            "/api/secrets/openai_api_key",
            format!(r#"{{"value":"{v_api}"}}"#),
            vec![
                ("Host".into(), "evil.example".into()),
                bearer.clone(),
                ct("application/json"),
            ],
            403,
        ),
    ];
    for (path, body, headers, status) in &bad {
        let r = d.request("PUT", path, headers, Some(body.as_bytes()));
        assert_eq!(r.status, *status, "{body}: {}", r.body);
        assert!(r.json()["code"].is_string(), "{}", r.body);
        assert!(
            !r.body.contains(&v_api),
            "error response echoes the value: {}",
            r.body
        );
    }
    let r = call(
        &d,
        "POST",
        "/api/secrets/openai_api_key/release",
        &acme,
        Some(&format!(r#"{{"decision_id":5,"{v_api}":1}}"#)),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(!r.body.contains(&v_api), "{}", r.body);
    // The stored value is unchanged by the failed writes.
    assert_eq!(
        release(&d, &acme, "openai_api_key", &id).json()["value"],
        v_api.as_str()
    );

    // The audit export, through the CLI.
    let out = hall(&d, &["audit", "export"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let export = text(&out.stdout);
    assert!(
        export.lines().count() >= 8 && export.contains("secret_release"),
        "{export}"
    );

    assert_eq!(d.stop().code(), Some(0));
    let logs = d.logs();
    assert!(
        logs.contains("TRACE"),
        "the daemon really logged at trace level"
    );
    let mut files = Vec::new();
    files_under(&d.state_dir(), &mut files);
    assert!(
        files.iter().any(|(_, b)| contains(b, b"cli_secret")),
        "the scan reads the sled data"
    );

    for v in [&v_api, &v_cli] {
        let hexpart = v.trim_start_matches("sk-test-");
        assert!(!logs.contains(hexpart), "value in the daemon's log");
        assert!(!export.contains(hexpart), "value in the audit export");
        for (p, b) in &files {
            assert!(!contains(b, hexpart.as_bytes()), "value in {}", p.display());
        }
    }
    // Nor are bearer tokens logged.
    assert!(!logs.contains(&t), "admin token in the daemon's log");
    assert!(!logs.contains(&acme), "issued token in the daemon's log");
}

#[test]
fn a_reload_that_drops_the_secret_from_the_worker_stops_its_release() {
    // Entitlement is checked against the policy loaded now, not the one of the decision:
    // taking a secret away from a worker takes effect for decisions already made.
    let d = Daemon::start();
    let v = secret_value();
    assert_eq!(put(&d, "openai_api_key", &v).status, 200);
    let id = summarize_decision(&d);
    assert_eq!(release(&d, &admin(&d), "openai_api_key", &id).status, 200);
    let p = d.registry().join("workers.toml");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replacen(r#"secrets = ["openai_api_key"]"#, "", 1)).unwrap();
    let r = d.post_json("/api/reload", "");
    assert_eq!(r.status, 200, "{}", r.body);
    release(&d, &admin(&d), "openai_api_key", &id).assert_error(403, "worker_not_entitled", None);
}

/// Rotation lives outside `/api/secrets/…`, so every valid name, `rotate-key` included,
/// can be stored and deleted.
#[test]
fn a_secret_may_be_named_like_an_endpoint() {
    let d = Daemon::start();
    let mut h = d.default_headers();
    h.push(("Content-Type".into(), "application/json".into()));
    let r = d.request(
        "PUT",
        "/api/secrets/rotate-key",
        &h,
        Some(br#"{"value":"v"}"#),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = d.request(
        "DELETE",
        "/api/secrets/rotate-key",
        &d.default_headers(),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
}

/// A secret change whose audit record cannot be written is taken back before the 503: no
/// unaudited change stays (like a token issue).
#[test]
fn secret_changes_that_cannot_be_audited_are_undone() {
    let fault_dir = tempfile::tempdir().unwrap();
    let fault = fault_dir.path().join("fail-audit");
    let d = Daemon::builder()
        .env("HALL_FAULT_AUDIT_FAIL_FILE", fault.to_str().unwrap())
        .start();
    assert_eq!(put(&d, "openai_api_key", "old-value").status, 200);
    let listed = || call(&d, "GET", "/api/secrets", &admin(&d), None).json()["secrets"].clone();
    let before = listed();

    std::fs::write(&fault, b"").unwrap();
    put(&d, "openai_api_key", "new-value").assert_error(503, "unavailable", None);
    put(&d, "brand_new", "x").assert_error(503, "unavailable", None);
    call(
        &d,
        "DELETE",
        "/api/secrets/openai_api_key",
        &admin(&d),
        None,
    )
    .assert_error(503, "unavailable", None);
    std::fs::remove_file(&fault).unwrap();

    // Names and times as before, and the old value is the one released.
    assert_eq!(listed(), before);
    assert_eq!(released_value(&d, "openai_api_key"), "old-value");
    assert!(d.logs().contains("secret change undone"));
}

//! End-to-end: the daemon's HTTP API, hot reload, signals.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{raw_request, Daemon};

#[test]
fn allowed_and_denied_decisions() {
    let d = Daemon::start();
    let r = d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["allowed"], true);
    assert_eq!(v["worker_id"], "worker.doc.summarize");
    assert_eq!(v["rule_id"], "docs-dev");
    assert_eq!(v["deny_reason"], serde_json::Value::Null);
    assert_eq!(v["dry_run"], false);
    assert!(v["policy_version"].as_str().unwrap().starts_with("blake3:"));
    let id = uuid::Uuid::parse_str(v["decision_id"].as_str().unwrap()).unwrap();
    assert_eq!(
        id.get_version_num(),
        7,
        "decision ids are time-ordered v7 UUIDs"
    );
    assert!(v.get("explain").is_none());

    // A policy outcome is 200 with allowed: false.
    let v = d
        .route("cap.code.deploy", "prod", "INTERNAL", "org.beta.eu")
        .json();
    assert_eq!(v["allowed"], false);
    assert_eq!(v["deny_reason"], "change_freeze");
    assert_eq!(v["rule_id"], "beta-prod-freeze");
    assert_eq!(v["worker_id"], serde_json::Value::Null);

    let v = d.route("cap.unknown", "dev", "PUBLIC", "org.acme").json();
    assert_eq!(v["deny_reason"], "unknown_capability");

    // Two decisions never share an id.
    let a = d
        .route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
        .json();
    let b = d
        .route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
        .json();
    assert_ne!(a["decision_id"], b["decision_id"]);
}

#[test]
fn explain_and_dry_run() {
    let d = Daemon::start();
    let r = d.post_json(
        "/api/route?explain=true",
        r#"{"capability_id":"cap.code.deploy","env":"dev","data_label":"INTERNAL","tenant_id":"org.acme","dry_run":true,"correlation_id":"req-1"}"#,
    );
    let v = r.json();
    assert_eq!(v["dry_run"], true);
    assert_eq!(v["deny_reason"], "no_eligible_worker");
    let ex = &v["explain"];
    let rules = ex["rules"].as_array().unwrap();
    assert_eq!(rules.last().unwrap()["rule_id"], "deploy-preprod");
    assert_eq!(rules.last().unwrap()["matched"], true);
    assert!(rules[..rules.len() - 1]
        .iter()
        .all(|r| r["matched"] == false && r["mismatch"].is_string()));
    let c = ex["candidates"].as_array().unwrap();
    assert_eq!(c[0]["worker_id"], "worker.deploy.canary");
    assert_eq!(c[0]["skipped"], "env_not_listed");
    assert_eq!(c[1]["worker_id"], "worker.deploy.full");
    assert_eq!(c[1]["skipped"], "blast_radius_exceeded");

    d.post_json("/api/route?explain=maybe", r#"{}"#)
        .assert_error(400, "invalid_request", Some("explain"));
}

#[test]
fn bad_requests_get_json_errors_naming_the_field() {
    let d = Daemon::start();
    let ok = r#""capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme""#;
    let cases: Vec<(String, u16, &str, Option<&str>)> = vec![
        ("{not json".into(), 400, "invalid_request", Some("body")),
        ("[1,2]".into(), 400, "invalid_request", Some("body")),
        (r#"{"env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#.into(), 400, "invalid_request", Some("capability_id")),
        (format!("{{{ok},\"surprise\":1}}"), 400, "invalid_request", Some("surprise")),
        (r#"{"capability_id":7,"env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#.into(), 400, "invalid_request", Some("capability_id")),
        (format!("{{{ok},\"dry_run\":\"yes\"}}"), 400, "invalid_request", Some("dry_run")),
        (r#"{"capability_id":"cap.doc.summarize","env":"moon","data_label":"PUBLIC","tenant_id":"org.acme"}"#.into(), 400, "invalid_request", Some("env")),
        (r#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"TOPSECRET","tenant_id":"org.acme"}"#.into(), 400, "invalid_request", Some("data_label")),
        (r#"{"capability_id":"cap doc","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#.into(), 400, "invalid_request", Some("capability_id")),
        (r#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"../etc"}"#.into(), 400, "invalid_request", Some("tenant_id")),
        (format!("{{{ok},\"context\":[1]}}"), 400, "invalid_request", Some("context")),
        (format!("{{{ok},\"context\":{{\"k\":\"{}\"}}}}", "x".repeat(9000)), 400, "invalid_request", Some("context")),
    ];
    for (body, status, code, field) in cases {
        let r = d.post_json("/api/route", &body);
        r.assert_error(status, code, field);
    }

    // Oversized body: 413 before parsing.
    let big = format!(
        "{{{ok},\"context\":{{\"k\":\"{}\"}}}}",
        "x".repeat(70 * 1024)
    );
    d.post_json("/api/route", &big)
        .assert_error(413, "body_too_large", None);

    // Wrong or missing content type: 415.
    let mut h = d.default_headers();
    d.request(
        "POST",
        "/api/route",
        &h,
        Some(format!("{{{ok}}}").as_bytes()),
    )
    .assert_error(415, "unsupported_media_type", None);
    h.push(("Content-Type".into(), "text/plain".into()));
    d.request(
        "POST",
        "/api/route",
        &h,
        Some(format!("{{{ok}}}").as_bytes()),
    )
    .assert_error(415, "unsupported_media_type", None);

    // Unknown path: JSON 404; wrong method: JSON 405.
    d.get("/api/nope").assert_error(404, "not_found", None);
    d.get("/api/route")
        .assert_error(405, "method_not_allowed", None);

    // Nothing above was a decision.
    let m = d.get("/metrics").body;
    assert!(
        m.contains("hall_route_errors_total{code=\"invalid_request\"} 12"),
        "{m}"
    );
}

#[test]
fn operator_endpoints() {
    let d = Daemon::start();
    assert_eq!(d.get("/health").json()["status"], "ok");
    let ready = d.get("/ready").json();
    assert_eq!(ready["status"], "ready");
    d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme");
    d.route("cap.web.search", "dev", "INTERNAL", "org.acme");

    let s = d.get("/api/status").json();
    assert_eq!(s["policy_version"], ready["policy_version"]);
    assert_eq!(s["counts"]["rules"], 12);
    assert_eq!(s["counts"]["capabilities"], 7);
    assert_eq!(s["counts"]["workers"], 9);
    assert_eq!(s["last_reload"]["ok"], true);
    assert_eq!(s["decisions"]["allowed"], 1);
    assert_eq!(s["decisions"]["denied"], 1);
    assert!(s["loaded_at"].is_string());

    let m = d.get("/metrics");
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    assert!(
        m.body
            .contains("hall_decisions_total{outcome=\"allowed\",reason=\"\"} 1"),
        "{}",
        m.body
    );
    assert!(
        m.body
            .contains("hall_decisions_total{outcome=\"denied\",reason=\"no_matching_rule\"} 1"),
        "{}",
        m.body
    );
    assert!(
        m.body.contains("hall_decision_duration_seconds_count 2"),
        "{}",
        m.body
    );
    assert!(
        m.body.contains("hall_reloads_total{result=\"ok\"} 1"),
        "{}",
        m.body
    );

    let caps = d.get("/api/registry/capabilities").json();
    assert_eq!(caps["capabilities"].as_array().unwrap().len(), 7);
    let ws = d.get("/api/registry/workers").json();
    let legacy = ws["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["id"] == "worker.email.legacy")
        .unwrap();
    assert_eq!(legacy["enabled"], false);
}

fn current_version(d: &Daemon) -> String {
    d.get("/api/status").json()["policy_version"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Write atomically (temp file + rename), as careful editors do.
fn write_atomic(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn policy_edit_takes_effect_broken_edit_keeps_old_set_and_recovers() {
    let d = Daemon::start();
    let v0 = current_version(&d);
    assert_eq!(
        d.route("cap.web.search", "dev", "PUBLIC", "org.acme")
            .json()["allowed"],
        true
    );

    // A valid edit: web search is now denied with a custom reason.
    let file = d.policies().join("40-data.toml");
    let original = std::fs::read_to_string(&file).unwrap();
    let edited = original.replace(
        "data_labels = [\"PUBLIC\"]\neffect = \"allow\"",
        "data_labels = [\"PUBLIC\"]\neffect = \"deny\"\nreason = \"search_paused\"",
    );
    assert_ne!(edited, original);
    std::fs::write(&file, &edited).unwrap();
    let took = d.wait_until(Duration::from_secs(10), || {
        d.route("cap.web.search", "dev", "PUBLIC", "org.acme")
            .json()["deny_reason"]
            == "search_paused"
    });
    eprintln!("edit took effect after {took:?}");
    let v1 = current_version(&d);
    assert_ne!(v0, v1);

    // A broken edit: the last good set keeps serving; the error is visible.
    std::fs::write(&file, "[[rule]\nid = \"x\"\n").unwrap();
    d.wait_until(Duration::from_secs(10), || {
        d.get("/api/status").json()["last_reload"]["ok"] == false
    });
    let s = d.get("/api/status").json();
    assert_eq!(s["policy_version"], v1.as_str());
    let errs = s["last_reload"]["errors"].as_array().unwrap();
    assert!(
        errs[0].as_str().unwrap().contains("40-data.toml:1:"),
        "{errs:?}"
    );
    assert_eq!(
        d.route("cap.web.search", "dev", "PUBLIC", "org.acme")
            .json()["deny_reason"],
        "search_paused"
    );
    assert!(d.get("/metrics").body.contains("hall_last_reload_failed 1"));
    assert!(d
        .get("/metrics")
        .body
        .contains("hall_reloads_total{result=\"error\"}"));
    assert!(d.logs().contains("40-data.toml:1:"), "errors are logged");

    // The next good edit recovers.
    std::fs::write(&file, &original).unwrap();
    d.wait_until(Duration::from_secs(10), || {
        d.get("/api/status").json()["last_reload"]["ok"] == true
    });
    assert_eq!(current_version(&d), v0, "same files, same version");
    assert_eq!(
        d.route("cap.web.search", "dev", "PUBLIC", "org.acme")
            .json()["allowed"],
        true
    );
    assert!(d.get("/metrics").body.contains("hall_last_reload_failed 0"));
}

#[test]
fn removing_a_file_is_an_edit() {
    let d = Daemon::start();
    assert_eq!(
        d.route("cap.code.review", "dev", "INTERNAL", "org.acme")
            .json()["allowed"],
        true
    );
    std::fs::remove_file(d.policies().join("30-code.toml")).unwrap();
    d.wait_until(Duration::from_secs(10), || {
        d.route("cap.code.review", "dev", "INTERNAL", "org.acme")
            .json()["deny_reason"]
            == "no_matching_rule"
    });
    assert_eq!(d.get("/api/status").json()["counts"]["rules"], 9);
}

#[test]
fn sighup_and_api_reload() {
    let d = Daemon::start();
    let before = d.get("/api/status").json()["last_reload"]["at"].clone();
    d.signal(libc::SIGHUP);
    d.wait_until(Duration::from_secs(10), || {
        let s = d.get("/api/status").json();
        s["last_reload"]["trigger"] == "SIGHUP" && s["last_reload"]["at"] != before
    });

    let r = d.post_json("/api/reload", "");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["policy_version"], current_version(&d).as_str());

    // Broken files: 422 with the errors; the old set stays.
    let v = current_version(&d);
    std::fs::write(
        d.registry().join("zz-broken.toml"),
        "[[worker]]\nid = \"w.x\"\nsurprise = 1\n",
    )
    .unwrap();
    let r = d.post_json("/api/reload", "");
    assert_eq!(r.status, 422, "{}", r.body);
    let j = r.json();
    assert_eq!(j["code"], "invalid_policy");
    assert!(
        j["errors"][0]
            .as_str()
            .unwrap()
            .contains("zz-broken.toml:3:1"),
        "{j}"
    );
    assert!(j["errors"][0].as_str().unwrap().contains("surprise"), "{j}");
    assert_eq!(current_version(&d), v);
    assert_eq!(d.get("/ready").status, 200);
}

#[test]
fn starts_without_a_valid_policy_set_and_becomes_ready_when_fixed() {
    let d = Daemon::builder()
        .setup(|p| {
            std::fs::write(
                p.join("policies/50-bad.toml"),
                "[[rule]]\nid = \"r\"\neffect = \"maybe\"\n",
            )
            .unwrap()
        })
        .no_wait_ready()
        .start();
    d.get("/ready").assert_error(503, "unavailable", None);
    d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
        .assert_error(503, "unavailable", None);
    std::fs::remove_file(d.policies().join("50-bad.toml")).unwrap();
    d.wait_until(Duration::from_secs(10), || d.get("/ready").status == 200);
    assert_eq!(
        d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
            .status,
        200
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_and_exits_zero() {
    let mut d = Daemon::start();
    let body = br#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#;
    // Requests in flight: headers and half the body sent before SIGTERM.
    let mut conns: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(d.addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let head = format!(
                "POST /api/route HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{}\r\n",
                d.addr,
                body.len(),
                d.admin_token().map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default()
            );
            s.write_all(head.as_bytes()).unwrap();
            s.write_all(&body[..20]).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    d.signal(libc::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    for s in &mut conns {
        s.write_all(&body[20..]).unwrap();
    }
    for s in &mut conns {
        let r = common::read_response(s).expect("in-flight request answered");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["allowed"], true);
    }
    let status = d.wait_exit(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}; logs:\n{}",
        d.logs()
    );
    assert!(d.logs().contains("shut down cleanly"));
}

#[test]
fn reload_under_load_drops_nothing_and_never_mixes_versions() {
    let d = Daemon::start();
    // Two policy sets that disagree on the worker for summarize in dev.
    let file = d.policies().join("20-docs.toml");
    let a = std::fs::read_to_string(&file).unwrap();
    let b = a.replace(
        "workers = [\"worker.doc.summarize\", \"worker.doc.local\"]",
        "workers = [\"worker.doc.local\", \"worker.doc.summarize\"]",
    );
    assert_ne!(a, b);
    let version_of = |text: &str| {
        std::fs::write(&file, text).unwrap();
        hall::load::load_dirs(&d.registry(), &d.policies())
            .unwrap()
            .snapshot
            .version
    };
    let (va, vb) = (version_of(&b), version_of(&a)); // leaves `a` on disk
    d.wait_until(Duration::from_secs(10), || current_version(&d) == vb);

    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for _ in 0..4 {
        let (addr, stop) = (d.addr, stop.clone());
        let token = d.admin_token();
        let (va, vb) = (va.clone(), vb.clone());
        handles.push(std::thread::spawn(move || {
            let mut h = vec![("Host".to_string(), addr.to_string()), ("Content-Type".into(), "application/json".into())];
            if let Some(t) = token {
                h.push(("Authorization".into(), format!("Bearer {t}")));
            }
            let body = br#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#;
            let mut seen = (0u32, 0u32);
            while !stop.load(Ordering::Relaxed) {
                let r = raw_request(addr, "POST", "/api/route", &h, Some(body)).expect("request answered");
                assert_eq!(r.status, 200, "{}", r.body);
                let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
                let (ver, worker) = (v["policy_version"].as_str().unwrap(), v["worker_id"].as_str().unwrap());
                if ver == va {
                    assert_eq!(worker, "worker.doc.local", "version B answered with A's worker");
                    seen.0 += 1;
                } else if ver == vb {
                    assert_eq!(worker, "worker.doc.summarize", "version A answered with B's worker");
                    seen.1 += 1;
                } else {
                    panic!("answer from an unexpected policy version {ver}");
                }
            }
            seen
        }));
    }
    for i in 0..10 {
        write_atomic(&file, if i % 2 == 0 { &b } else { &a });
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, Ordering::Relaxed);
    let mut total = (0, 0);
    for h in handles {
        let s = h.join().expect("a client thread failed");
        total.0 += s.0;
        total.1 += s.1;
    }
    assert!(
        total.0 > 0 && total.1 > 0,
        "both versions served: {total:?}"
    );
}

#[test]
fn refuses_non_loopback_listen_without_the_flag() {
    let out = std::process::Command::new(common::HALL)
        .args(["serve", "--listen", "0.0.0.0:0", "--state-dir"])
        .arg(tempfile::tempdir().unwrap().path())
        .env("HALL_KEYRING", "off")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--allow-non-loopback"), "{err}");
}

#[test]
fn state_dir_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start();
    let mode = std::fs::metadata(d.state_dir())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
}

//! `hall replay` end to end: decisions recorded by the real daemon, replayed offline under an
//! edited policy set with the real binary.

mod common;

use std::path::Path;
use std::process::Output;

use common::{copy_dir, Daemon};
use serde_json::Value;

fn hall(args: &[&str]) -> Output {
    hall_env(args, &[])
}

/// `hall ARGS` in a clean environment (tests/common): no HALL_* of the caller, and a fresh
/// HOME, so no hall.toml or state dir of the machine is found.
fn hall_env(args: &[&str], env: &[(&str, &str)]) -> Output {
    let home = tempfile::tempdir().expect("a temp HOME");
    common::hall(home.path(), args, env)
}

fn replay(state: &Path, registry: &Path, policies: &Path, extra: &[&str]) -> (Value, i32) {
    let (s, r, p) = (
        state.display().to_string(),
        registry.display().to_string(),
        policies.display().to_string(),
    );
    let mut args = vec![
        "replay",
        "--state-dir",
        &s,
        "--registry",
        &r,
        "--policies",
        &p,
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    let o = hall(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {out}\nstderr: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    });
    (v, o.status.code().unwrap_or(-1))
}

fn decision_id(d: &Daemon, body: &str) -> String {
    let r = d.post_json("/api/route", body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["decision_id"].as_str().unwrap().to_owned()
}

fn route_body(cap: &str, env: &str, label: &str, tenant: &str, dry_run: bool) -> String {
    format!(
        r#"{{"capability_id":"{cap}","env":"{env}","data_label":"{label}","tenant_id":"{tenant}","dry_run":{dry_run}}}"#
    )
}

/// Edit a copy of the example policies: docs-dev prefers the local worker and admits
/// org.other; the beta freeze gets a new reason. code-review is untouched.
fn edited_policies(to: &Path) {
    copy_dir(&common::repo().join("policies"), to);
    let docs = to.join("20-docs.toml");
    let t = std::fs::read_to_string(&docs).unwrap();
    let t = t
        .replace(
            r#"tenants = ["org.acme", "org.beta.*"]"#,
            r#"tenants = ["org.acme", "org.beta.*", "org.other"]"#,
        )
        .replace(
            r#"workers = ["worker.doc.summarize", "worker.doc.local"]"#,
            r#"workers = ["worker.doc.local", "worker.doc.summarize"]"#,
        );
    std::fs::write(&docs, t).unwrap();
    let guard = to.join("10-guardrails.toml");
    let t = std::fs::read_to_string(&guard).unwrap();
    std::fs::write(
        &guard,
        t.replace(
            r#"reason = "change_freeze""#,
            r#"reason = "holiday_freeze""#,
        ),
    )
    .unwrap();
}

fn transition<'a>(report: &'a Value, old: &str, new: &str) -> &'a Value {
    report["transitions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| {
            let side = |v: &Value| match v["outcome"].as_str().unwrap() {
                "allowed" => format!("allowed {}", v["worker_id"].as_str().unwrap()),
                "denied" => format!("denied {}", v["deny_reason"].as_str().unwrap()),
                _ => format!("invalid {}", v["field"].as_str().unwrap()),
            };
            side(&t["old"]) == old && side(&t["new"]) == new
        })
        .unwrap_or_else(|| panic!("no transition {old} -> {new} in {report:#}"))
}

#[test]
fn replay_counts_and_shows_what_an_edit_would_change() {
    let mut d = Daemon::start();
    let mut summarize = Vec::new();
    for _ in 0..3 {
        summarize.push(decision_id(
            &d,
            &route_body("cap.doc.summarize", "dev", "PUBLIC", "org.acme", false),
        ));
    }
    let mut other = Vec::new();
    for dry in [false, true] {
        other.push(decision_id(
            &d,
            &route_body("cap.doc.summarize", "dev", "INTERNAL", "org.other", dry),
        ));
    }
    decision_id(
        &d,
        &route_body("cap.code.review", "dev", "INTERNAL", "org.acme", true),
    );
    let freeze = decision_id(
        &d,
        &route_body("cap.code.deploy", "prod", "INTERNAL", "org.beta.one", false),
    );
    // Records of other kinds in between: a token issue and a reload.
    let r = d.post_json("/api/tokens", r#"{"name":"ci","scopes":["route"]}"#);
    assert!(r.status == 200 || r.status == 201, "{}", r.status);
    let route_only = r.json()["token"]
        .as_str()
        .expect("token shown once")
        .to_owned();
    assert_eq!(d.post_json("/api/reload", "{}").status, 200);
    let head = d.get("/api/status").json()["audit"]["seq"]
        .as_u64()
        .unwrap();
    assert!(head >= 9, "7 decisions + token + reload, head {head}");

    let (state, registry) = (d.state_dir(), d.registry());
    let candidate = d.dir.path().join("candidate");
    edited_policies(&candidate);

    // While the daemon runs, the state dir is locked: a clear error, not a hang ...
    let (st, rg, cand) = (
        state.display().to_string(),
        registry.display().to_string(),
        candidate.display().to_string(),
    );
    let args = [
        "replay",
        "--state-dir",
        &st,
        "--registry",
        &rg,
        "--policies",
        &cand,
        "--format",
        "json",
    ];
    let with_source = |source: &'static str| -> Vec<&str> {
        let mut a = args.to_vec();
        a.extend(["--source", source]);
        a
    };
    let o = hall(&with_source("state-dir"));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("locked") && err.contains("daemon"), "{err}");
    // ... and by default replay reads the same records through the API (audit scope).
    let url = format!("http://{}", d.addr);
    let o = hall_env(&args, &[("HALL_URL", &url)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let via_api: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (via_api["replayed"].as_u64(), via_api["changed"].as_u64()),
        (Some(7), Some(6))
    );
    // A token without the audit scope is refused, with the reason.
    let o = hall_env(
        &with_source("api"),
        &[("HALL_URL", &url), ("HALL_TOKEN", &route_only)],
    );
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("403") && err.contains("audit scope"), "{err}");
    assert!(!err.contains(&route_only), "the token is never printed");

    assert!(d.stop().success());

    let (r, code) = replay(&state, &registry, &candidate, &["--limit", "2"]);
    assert_eq!(code, 0, "{r:#}");
    assert_eq!(r["replayed"], 7, "{r:#}");
    assert_eq!(r["changed"], 6, "{r:#}");
    assert_eq!(r["skipped"], 0);
    assert_eq!(r["transitions"].as_array().unwrap().len(), 4, "{r:#}");

    let t = transition(
        &r,
        "allowed worker.doc.summarize",
        "allowed worker.doc.local",
    );
    assert_eq!(t["count"], 3);
    assert_eq!(t["changed"], true);
    let ids: Vec<&str> = t["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["decision_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec![summarize[0].as_str(), summarize[1].as_str()]);
    assert_eq!(t["examples"][0]["old_rule_id"], "docs-dev");
    assert_eq!(t["examples"][0]["new_rule_id"], "docs-dev");

    let t = transition(&r, "denied no_matching_rule", "allowed worker.doc.local");
    assert_eq!(t["count"], 2);
    let ex = t["examples"].as_array().unwrap();
    assert_eq!(ex[0]["decision_id"], other[0].as_str());
    assert_eq!(ex[1]["decision_id"], other[1].as_str());
    assert_eq!(ex[1]["dry_run"], true);
    assert_eq!(ex[0]["tenant_id"], "org.other");
    assert_eq!(ex[0]["old_rule_id"], Value::Null);

    let t = transition(&r, "denied change_freeze", "denied holiday_freeze");
    assert_eq!(t["count"], 1);
    assert_eq!(t["examples"][0]["decision_id"], freeze.as_str());

    let t = transition(
        &r,
        "allowed worker.code.review",
        "allowed worker.code.review",
    );
    assert_eq!(
        (t["count"].as_u64(), t["changed"].as_bool()),
        (Some(1), Some(false))
    );
    assert_eq!(t["examples"], serde_json::json!([]));

    // --fail-on-change: 1 when anything changes, 0 against the unedited files.
    let (_, code) = replay(&state, &registry, &candidate, &["--fail-on-change"]);
    assert_eq!(code, 1);
    let live = d.policies();
    let (r, code) = replay(&state, &registry, &live, &["--fail-on-change"]);
    assert_eq!(
        (code, r["replayed"].as_u64(), r["changed"].as_u64()),
        (0, Some(7), Some(0))
    );

    // Filters: one tenant; an empty window.
    let (r, _) = replay(&state, &registry, &candidate, &["--tenant", "org.other"]);
    assert_eq!(
        (r["replayed"].as_u64(), r["changed"].as_u64()),
        (Some(2), Some(2))
    );
    let (r, _) = replay(
        &state,
        &registry,
        &candidate,
        &["--capability", "cap.code.deploy"],
    );
    assert_eq!(r["replayed"], 1);
    let (r, code) = replay(
        &state,
        &registry,
        &candidate,
        &["--since", "2099-01-01T00:00:00Z", "--fail-on-change"],
    );
    assert_eq!(code, 0, "an empty window changes nothing");
    assert_eq!(
        (r["replayed"].as_u64(), r["changed"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(r["transitions"], serde_json::json!([]));
    let (r, _) = replay(&state, &registry, &candidate, &["--since", "1h"]);
    assert_eq!(r["replayed"], 7);

    // The text report names the change and the examples.
    let o = hall(&[
        "replay",
        "--state-dir",
        &state.display().to_string(),
        "--registry",
        &registry.display().to_string(),
        "--policies",
        &candidate.display().to_string(),
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("replayed 7 decisions"), "{text}");
    assert!(text.contains("6 would change, 1 would not"), "{text}");
    assert!(
        text.contains("denied change_freeze -> denied holiday_freeze: 1"),
        "{text}"
    );
    assert!(text.contains(&freeze), "{text}");

    // Nothing was written: the log's head is where the daemon left it, and the chain verifies.
    let db = hall::store::open_db(&state).unwrap();
    let log = hall::store::audit::AuditLog::open(&db, Default::default()).unwrap();
    assert_eq!(log.head().seq, head, "replay appended nothing");
    assert!(log.verify().unwrap().is_ok());
    log.shutdown();
}

#[test]
fn replay_refuses_a_missing_log_and_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let root = common::repo();
    let (reg, pol) = (
        root.join("registry").display().to_string(),
        root.join("policies").display().to_string(),
    );
    let state = dir.path().join("nothing-here").display().to_string();
    let o = hall(&[
        "replay",
        "--state-dir",
        &state,
        "--registry",
        &reg,
        "--policies",
        &pol,
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no audit log"));
    assert!(!dir.path().join("nothing-here").exists(), "created nothing");

    let o = hall(&[
        "replay",
        "--state-dir",
        &state,
        "--registry",
        &reg,
        "--policies",
        &pol,
        "--since",
        "yesterday",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("neither a duration"));
}

//! End-to-end: the audit log (SPEC 5) through the daemon's API and the `hall audit` CLI:
//! record contents, tamper detection, queries, export, retention, fail-closed writes
//! (injected and genuine), and crash durability.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{raw_request, Daemon, HALL};
use serde_json::{json, Value};

const ALLOW: &str = r#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#;
const DENY: &str = r#"{"capability_id":"cap.code.deploy","env":"prod","data_label":"INTERNAL","tenant_id":"org.beta.eu"}"#;
const DAY_MS: i64 = 86_400_000;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Every record, oldest first, paged through `GET /api/audit` (1000 a page).
fn all_records(d: &Daemon) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = 0u64;
    loop {
        let r = d.get(&format!("/api/audit?limit=1000&after_seq={after}"));
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        let page = v["records"].as_array().unwrap().clone();
        if page.is_empty() {
            assert_eq!(v["next_after_seq"], Value::Null);
            return out;
        }
        after = page.last().unwrap()["seq"].as_u64().unwrap();
        assert_eq!(v["next_after_seq"], after);
        out.extend(page);
    }
}

fn query(d: &Daemon, q: &str) -> Vec<Value> {
    let r = d.get(&format!("/api/audit?{q}"));
    assert_eq!(r.status, 200, "{q}: {}", r.body);
    r.json()["records"].as_array().unwrap().clone()
}

fn verify(d: &Daemon) -> Value {
    let r = d.get("/api/audit/verify");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn assert_verifies(d: &Daemon) -> u64 {
    let v = verify(d);
    assert_eq!(v["ok"], true, "verify: {v}");
    assert!(v["head"].as_str().is_some_and(|h| h.len() == 64), "{v}");
    v["entries"].as_u64().unwrap()
}

/// Route `body`; expect 200 and return the response.
fn route_ok(d: &Daemon, body: &str) -> Value {
    let r = d.post_json("/api/route", body);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn decision_id(v: &Value) -> String {
    v["decision_id"].as_str().unwrap().to_string()
}

/// Run `hall audit ARGS` against `d` with the admin token.
fn hall_audit(d: &Daemon, args: &[&str]) -> Output {
    Command::new(HALL)
        .arg("audit")
        .args(args)
        .env("HALL_URL", format!("http://{}", d.addr))
        .env("HALL_TOKEN", d.admin_token().unwrap())
        .env_remove("HALL_CONFIG")
        .output()
        .expect("run hall")
}

fn stdout_json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    })
}

fn is_hex64(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn rfc3339_ms(s: &str) -> i64 {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The id of the admin token (the only token on a fresh daemon).
fn admin_token_id(d: &Daemon) -> String {
    let v = d.get("/api/tokens").json();
    let tokens = v["tokens"].as_array().unwrap();
    let admin: Vec<_> = tokens
        .iter()
        .filter(|t| t["scopes"].as_array().unwrap().contains(&json!("admin")))
        .collect();
    assert_eq!(admin.len(), 1, "{v}");
    admin[0]["id"].as_str().unwrap().to_string()
}

#[test]
fn records_hold_every_field_for_allowed_denied_and_dry_run() {
    let d = Daemon::start();
    let token_id = admin_token_id(&d);
    let token = d.admin_token().unwrap();
    let ctx =
        json!({"user": "u-17", "ticket": {"id": 42, "tags": ["a", "b"]}, "ok": true, "none": null});
    let extras = |corr: &str, dry: bool| {
        format!(
            r#""correlation_id":"{corr}","context":{ctx},"tenant_risk":"low","qos_class":"interactive","dry_run":{dry}"#
        )
    };
    let allowed = route_ok(
        &d,
        &format!(
            r#"{{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme",{}}}"#,
            extras("corr-allow", false)
        ),
    );
    let denied = route_ok(
        &d,
        &format!(
            r#"{{"capability_id":"cap.code.deploy","env":"prod","data_label":"INTERNAL","tenant_id":"org.beta.eu",{}}}"#,
            extras("corr-deny", false)
        ),
    );
    let dry = route_ok(
        &d,
        &format!(
            r#"{{"capability_id":"cap.doc.summarize","env":"dev","data_label":"INTERNAL","tenant_id":"org.acme",{}}}"#,
            extras("corr-dry", true)
        ),
    );
    let bare = route_ok(&d, ALLOW);
    assert_eq!(allowed["allowed"], true);
    assert_eq!(denied["allowed"], false);
    assert_eq!(dry["dry_run"], true);

    let expected = [
        (
            &allowed,
            "org.acme",
            "cap.doc.summarize",
            "dev",
            "PUBLIC",
            Some("corr-allow"),
            false,
        ),
        (
            &denied,
            "org.beta.eu",
            "cap.code.deploy",
            "prod",
            "INTERNAL",
            Some("corr-deny"),
            false,
        ),
        (
            &dry,
            "org.acme",
            "cap.doc.summarize",
            "dev",
            "INTERNAL",
            Some("corr-dry"),
            true,
        ),
        (
            &bare,
            "org.acme",
            "cap.doc.summarize",
            "dev",
            "PUBLIC",
            None,
            false,
        ),
    ];
    let mut prev_seq = 0;
    for (resp, tenant, cap, env, label, corr, dry_run) in expected {
        let id = decision_id(resp);
        let r = d.get(&format!("/api/audit/{id}"));
        assert_eq!(r.status, 200, "{}", r.body);
        let rec = r.json();
        for key in [
            "seq",
            "time",
            "kind",
            "decision_id",
            "tenant_id",
            "capability_id",
            "env",
            "data_label",
            "allowed",
            "dry_run",
            "worker_id",
            "deny_reason",
            "rule_id",
            "policy_version",
            "correlation_id",
            "context",
            "tenant_risk",
            "qos_class",
            "token_id",
            "prev_hash",
            "hash",
        ] {
            assert!(rec.get(key).is_some(), "record lacks {key}: {rec}");
        }
        assert_eq!(rec["kind"], "decision");
        assert_eq!(rec["decision_id"], id.as_str());
        assert_eq!(rec["tenant_id"], tenant);
        assert_eq!(rec["capability_id"], cap);
        assert_eq!(rec["env"], env);
        assert_eq!(rec["data_label"], label);
        // The record says what the client was told.
        for k in [
            "allowed",
            "worker_id",
            "deny_reason",
            "rule_id",
            "policy_version",
            "dry_run",
        ] {
            assert_eq!(rec[k], resp[k], "{k}: record {rec} vs response {resp}");
        }
        assert_eq!(rec["dry_run"], dry_run);
        assert_eq!(rec["token_id"], token_id.as_str());
        match corr {
            Some(c) => {
                assert_eq!(rec["correlation_id"], c);
                assert_eq!(
                    rec["context"], ctx,
                    "context is recorded as the object sent"
                );
                assert_eq!(rec["tenant_risk"], "low");
                assert_eq!(rec["qos_class"], "interactive");
            }
            None => {
                for k in ["correlation_id", "context", "tenant_risk", "qos_class"] {
                    assert_eq!(rec[k], Value::Null, "{k}: {rec}");
                }
            }
        }
        let ts = rec["ts_ms"].as_i64().unwrap();
        assert_eq!(rfc3339_ms(rec["time"].as_str().unwrap()), ts);
        assert!(rec["time"].as_str().unwrap().ends_with('Z'));
        assert!((ts - now_ms()).abs() < 3_600_000, "time is now-ish: {rec}");
        assert!(
            is_hex64(&rec["hash"]) && is_hex64(&rec["prev_hash"]),
            "{rec}"
        );
        // The chain: this record links to the one before it.
        let seq = rec["seq"].as_u64().unwrap();
        assert!(seq > prev_seq);
        prev_seq = seq;
        let before = query(&d, &format!("after_seq={}&limit=1", seq - 1));
        assert_eq!(before[0], rec, "GET /api/audit and /api/audit/{{id}} agree");
        if seq > 1 {
            let p = query(&d, &format!("after_seq={}&limit=1", seq - 2));
            assert_eq!(
                rec["prev_hash"],
                p[0]["hash"],
                "prev_hash links to record {}",
                seq - 1
            );
        }
    }
    assert_eq!(allowed["allowed"], true);
    let a = d
        .get(&format!("/api/audit/{}", decision_id(&allowed)))
        .json();
    assert_eq!(a["worker_id"], "worker.doc.summarize");
    assert_eq!(a["deny_reason"], Value::Null);
    let n = d
        .get(&format!("/api/audit/{}", decision_id(&denied)))
        .json();
    assert_eq!(n["deny_reason"], "change_freeze");
    assert_eq!(n["rule_id"], "beta-prod-freeze");
    assert_eq!(n["worker_id"], Value::Null);

    // The token itself is never in the log.
    let everything = serde_json::to_string(&all_records(&d)).unwrap();
    assert!(
        !everything.contains(&token),
        "the admin token leaked into the audit log"
    );

    // Unknown ids: a JSON 404.
    d.get("/api/audit/0193aaaa-0000-7000-8000-000000000000")
        .assert_error(404, "not_found", None);
    assert_verifies(&d);
}

/// Change one byte of record `seq`'s stored value, directly in sled (the daemon must be
/// stopped): the first occurrence of `find` becomes `replace`.
fn tamper(state: &Path, seq: u64, find: &[u8], replace: &[u8]) {
    assert_eq!(find.len(), replace.len());
    let db = hall::store::open_db(state).expect("open sled");
    let tree = db.open_tree("audit").unwrap();
    let key = seq.to_be_bytes();
    let mut v = tree.get(key).unwrap().expect("record exists").to_vec();
    let at = v
        .windows(find.len())
        .position(|w| w == find)
        .unwrap_or_else(|| panic!("{:?} not in record {seq}", String::from_utf8_lossy(find)));
    let diff: Vec<usize> = (0..find.len())
        .filter(|i| find[*i] != replace[*i])
        .collect();
    assert_eq!(diff.len(), 1, "change exactly one byte");
    v[at..at + find.len()].copy_from_slice(replace);
    tree.insert(key, v).unwrap();
    db.flush().unwrap();
}

#[test]
fn verify_passes_on_a_clean_log_and_names_a_changed_record() {
    let mut d = Daemon::start();
    let mut ids = Vec::new();
    for i in 0..6 {
        let v = route_ok(&d, if i % 2 == 0 { ALLOW } else { DENY });
        ids.push(decision_id(&v));
    }
    let entries = assert_verifies(&d);
    let status = d.get("/api/status").json();
    assert_eq!(verify(&d)["head"], status["audit"]["hash"]);
    assert_eq!(entries, status["audit"]["seq"].as_u64().unwrap());
    let cli = hall_audit(&d, &["verify"]);
    assert_eq!(cli.status.code(), Some(0), "{cli:?}");
    assert_eq!(stdout_json(&cli)["ok"], true);

    // Change one byte of a denied decision's tenant ("org.beta.eu" -> "org.beta.ev").
    let victim = d.get(&format!("/api/audit/{}", ids[3])).json();
    let seq = victim["seq"].as_u64().unwrap();
    assert_eq!(d.stop().code(), Some(0));
    let dir = d.into_dir();
    tamper(
        &dir.path().join("state"),
        seq,
        b"org.beta.eu",
        b"org.beta.ev",
    );

    let d = Daemon::spawn(dir, &[], &[], true);
    let v = verify(&d);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["first_bad_seq"], seq, "{v}");
    assert!(
        v["problem"].as_str().is_some_and(|p| p.contains("hash")),
        "{v}"
    );
    let cli = hall_audit(&d, &["verify"]);
    assert_eq!(cli.status.code(), Some(1), "{cli:?}");
    let out = stdout_json(&cli);
    assert_eq!(out["ok"], false);
    assert_eq!(out["first_bad_seq"], seq);
    // The daemon keeps serving (and recording) after it finds the damage.
    route_ok(&d, ALLOW);
    assert_eq!(verify(&d)["first_bad_seq"], seq);
}

#[test]
fn a_changed_prev_hash_byte_is_named_too() {
    // A re-linked record (its stored prev_hash altered) is caught as well as a changed body.
    let mut d = Daemon::start();
    for _ in 0..3 {
        route_ok(&d, ALLOW);
    }
    let seq = query(&d, "tail=1")[0]["seq"].as_u64().unwrap() - 1;
    d.stop();
    let dir = d.into_dir();
    let state = dir.path().join("state");
    {
        let db = hall::store::open_db(&state).unwrap();
        let tree = db.open_tree("audit").unwrap();
        let mut v = tree.get(seq.to_be_bytes()).unwrap().unwrap().to_vec();
        v[0] ^= 0x01; // the first byte of prev_hash
        tree.insert(seq.to_be_bytes(), v).unwrap();
        db.flush().unwrap();
    }
    let d = Daemon::spawn(dir, &[], &[], true);
    let v = verify(&d);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["first_bad_seq"], seq, "{v}");
}

#[test]
fn query_filters_and_paging() {
    let d = Daemon::start();
    // A mix of tenants, capabilities and outcomes, spread over time.
    let bodies = [
        ALLOW,
        DENY,
        r#"{"capability_id":"cap.code.review","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#,
        r#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.beta.eu"}"#,
        r#"{"capability_id":"cap.unknown","env":"dev","data_label":"PUBLIC","tenant_id":"org.gamma"}"#,
    ];
    let mut sent: Vec<(String, Value)> = Vec::new();
    for round in 0..3 {
        for b in bodies {
            let v = route_ok(&d, b);
            sent.push((decision_id(&v), serde_json::from_str(b).unwrap()));
        }
        if round == 1 {
            let r = d.post_json("/api/tokens", r#"{"name":"reader","scopes":["audit"]}"#);
            assert_eq!(r.status, 201, "{}", r.body);
        }
        std::thread::sleep(Duration::from_millis(30)); // distinct timestamps between rounds
    }
    let all = all_records(&d);
    let decisions: Vec<&Value> = all.iter().filter(|r| r["kind"] == "decision").collect();
    let got_ids: Vec<&str> = decisions
        .iter()
        .map(|r| r["decision_id"].as_str().unwrap())
        .collect();
    let sent_ids: Vec<&str> = sent.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(got_ids, sent_ids, "one record per decision, in order");
    for w in all.windows(2) {
        assert_eq!(
            w[1]["seq"].as_u64().unwrap(),
            w[0]["seq"].as_u64().unwrap() + 1
        );
        assert!(
            w[1]["ts_ms"].as_i64() >= w[0]["ts_ms"].as_i64(),
            "time-ordered"
        );
    }

    // Each filter returns exactly the matching records (computed here from the full list).
    let check = |q: &str, pred: &dyn Fn(&Value) -> bool| {
        let want: Vec<Value> = all.iter().filter(|r| pred(r)).cloned().collect();
        assert!(
            !want.is_empty() && want.len() < all.len(),
            "{q}: the test data must split"
        );
        assert_eq!(query(&d, &format!("{q}&limit=1000")), want, "{q}");
    };
    check("tenant_id=org.acme", &|r| r["tenant_id"] == "org.acme");
    check("capability_id=cap.doc.summarize", &|r| {
        r["capability_id"] == "cap.doc.summarize"
    });
    check("allowed=false", &|r| r["allowed"] == false);
    check("allowed=true", &|r| r["allowed"] == true);
    check("kind=decision", &|r| r["kind"] == "decision");
    check("kind=token_issue", &|r| r["kind"] == "token_issue");
    check("kind=reload", &|r| r["kind"] == "reload");
    check(
        "tenant_id=org.acme&allowed=true&capability_id=cap.code.review",
        &|r| {
            r["tenant_id"] == "org.acme"
                && r["allowed"] == true
                && r["capability_id"] == "cap.code.review"
        },
    );
    check(
        "capability_id=cap.doc.summarize&kind=decision&allowed=true",
        &|r| {
            r["capability_id"] == "cap.doc.summarize"
                && r["kind"] == "decision"
                && r["allowed"] == true
        },
    );
    // Percent-encoding in values.
    check("tenant_id=org%2Ebeta%2Eeu", &|r| {
        r["tenant_id"] == "org.beta.eu"
    });
    assert!(query(&d, "tenant_id=org.nobody").is_empty());

    // since/until: epoch ms and RFC 3339, inclusive.
    let pivot = &decisions[sent.len() / 2];
    let p_ms = pivot["ts_ms"].as_i64().unwrap();
    let p_time = pivot["time"].as_str().unwrap();
    check(&format!("since={p_ms}"), &|r| {
        r["ts_ms"].as_i64().unwrap() >= p_ms
    });
    check(&format!("since={p_time}"), &|r| {
        r["ts_ms"].as_i64().unwrap() >= p_ms
    });
    check(&format!("until={p_ms}"), &|r| {
        r["ts_ms"].as_i64().unwrap() <= p_ms
    });
    check(&format!("until={}", p_time.replace(':', "%3A")), &|r| {
        r["ts_ms"].as_i64().unwrap() <= p_ms
    });
    let lo = decisions[3]["ts_ms"].as_i64().unwrap();
    let hi = decisions[sent.len() - 4]["ts_ms"].as_i64().unwrap();
    check(&format!("since={lo}&until={hi}&tenant_id=org.acme"), &|r| {
        let t = r["ts_ms"].as_i64().unwrap();
        t >= lo && t <= hi && r["tenant_id"] == "org.acme"
    });
    assert!(query(&d, &format!("since={}", now_ms() + DAY_MS)).is_empty());
    assert!(query(&d, "until=2000-01-01T00:00:00Z").is_empty());

    // Paging: after_seq + limit walks the same list, with or without a filter.
    for (filter, pred) in [
        ("", &(|_: &Value| true) as &dyn Fn(&Value) -> bool),
        ("tenant_id=org.acme&", &|r: &Value| {
            r["tenant_id"] == "org.acme"
        }),
        ("allowed=false&", &|r: &Value| r["allowed"] == false),
    ] {
        let want: Vec<Value> = all.iter().filter(|r| pred(r)).cloned().collect();
        let mut got = Vec::new();
        let mut after = 0;
        loop {
            let v = d
                .get(&format!("/api/audit?{filter}limit=2&after_seq={after}"))
                .json();
            let page = v["records"].as_array().unwrap().clone();
            assert!(page.len() <= 2);
            if page.is_empty() {
                break;
            }
            after = v["next_after_seq"].as_u64().unwrap();
            assert_eq!(after, page.last().unwrap()["seq"].as_u64().unwrap());
            got.extend(page);
        }
        assert_eq!(got, want, "paging with {filter:?}");
    }
    // Default page size is bounded; tail = the newest N, newest last.
    assert_eq!(query(&d, "limit=3"), all[..3].to_vec());
    assert_eq!(query(&d, "tail=3"), all[all.len() - 3..].to_vec());
    let beta: Vec<Value> = all
        .iter()
        .filter(|r| r["tenant_id"] == "org.beta.eu")
        .cloned()
        .collect();
    assert_eq!(
        query(&d, "tenant_id=org.beta.eu&tail=2"),
        beta[beta.len() - 2..].to_vec()
    );

    // Bad parameters: 400 naming the parameter.
    for (q, field) in [
        ("allowed=yes", "allowed"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("tail=x", "tail"),
        ("after_seq=-1", "after_seq"),
        ("since=yesterday", "since"),
        ("until=2026-13-01T00:00:00Z", "until"),
        ("kind=nope", "kind"),
        ("tenant=org.acme", "tenant"),
    ] {
        d.get(&format!("/api/audit?{q}"))
            .assert_error(400, "invalid_request", Some(field));
    }

    // Scope `audit` is needed; a route-only token is refused, an audit token is not.
    let issue = |scopes: &str| {
        let r = d.post_json(
            "/api/tokens",
            &format!(r#"{{"name":"t","scopes":{scopes}}}"#),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["token"].as_str().unwrap().to_string()
    };
    let host = ("Host".to_string(), d.addr.to_string());
    let with = |t: &str| {
        vec![
            host.clone(),
            ("Authorization".into(), format!("Bearer {t}")),
        ]
    };
    let route_only = issue(r#"["route"]"#);
    let auditor = issue(r#"["audit"]"#);
    for path in [
        "/api/audit",
        "/api/audit/verify",
        &format!("/api/audit/{}", sent[0].0),
    ] {
        d.request("GET", path, &with(&route_only), None)
            .assert_error(403, "forbidden", None);
        assert_eq!(
            d.request("GET", path, &with(&auditor), None).status,
            200,
            "{path}"
        );
        d.request("GET", path, std::slice::from_ref(&host), None)
            .assert_error(401, "unauthorized", None);
    }
}

#[test]
fn export_round_trips_through_the_cli() {
    let d = Daemon::start();
    // More than one 1000-record page, so export has to page.
    let n_threads = 4;
    let per_thread = 260;
    let addr = d.addr;
    let headers = json_headers(&d);
    let handles: Vec<_> = (0..n_threads)
        .map(|t| {
            let headers = headers.clone();
            std::thread::spawn(move || {
                for i in 0..per_thread {
                    let body = if (i + t) % 3 == 0 { DENY } else { ALLOW };
                    let r =
                        raw_request(addr, "POST", "/api/route", &headers, Some(body.as_bytes()))
                            .unwrap();
                    assert_eq!(r.status, 200, "{}", r.body);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let all = all_records(&d);
    assert!(all.len() > 1000, "{}", all.len());

    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("audit.jsonl");
    let o = hall_audit(&d, &["export", "--output", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("exported {} records", all.len())),
        "{o:?}"
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.ends_with('\n'));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), all.len());
    let mut prev_hash = "0".repeat(64);
    for (line, want) in lines.iter().zip(&all) {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(&v, want);
        // A log shipper can read it back as a record and re-check the links.
        let rec: hall::store::audit::AuditRecord = serde_json::from_str(line).unwrap();
        assert_eq!(
            &serde_json::to_value(&rec).unwrap(),
            want,
            "JSON round trip"
        );
        assert_eq!(rec.prev_hash.to_hex(), prev_hash, "seq {}", rec.seq);
        prev_hash = rec.hash.to_hex();
    }

    // --after-seq N: only later records.
    let k = all[all.len() - 7]["seq"].as_u64().unwrap();
    let o = hall_audit(
        &d,
        &[
            "export",
            "--after-seq",
            &k.to_string(),
            "--output",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let got: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got, all[all.len() - 6..].to_vec());

    // --since (RFC 3339) and stdout.
    let pivot = &all[all.len() / 2];
    let since = pivot["time"].as_str().unwrap();
    let t = pivot["ts_ms"].as_i64().unwrap();
    let o = hall_audit(&d, &["export", "--since", since]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let got: Vec<Value> = String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<Value> = all
        .iter()
        .filter(|r| r["ts_ms"].as_i64().unwrap() >= t)
        .cloned()
        .collect();
    assert_eq!(got, want);

    // Past the end: nothing, still success.
    let last = all.last().unwrap()["seq"].as_u64().unwrap();
    let o = hall_audit(&d, &["export", "--after-seq", &last.to_string()]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(o.stdout.is_empty());
    // A bad --since is the daemon's 400, reported as a usage error.
    let o = hall_audit(&d, &["export", "--since", "last tuesday"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("since"),
        "{o:?}"
    );
}

fn json_headers(d: &Daemon) -> Vec<(String, String)> {
    let mut h = d.default_headers();
    h.push(("Content-Type".into(), "application/json".into()));
    h
}

/// Put `n` decision records dated `age_days` ago into a fresh state dir, through the library,
/// as if an older daemon had written them.
fn seed_old_records(state: &Path, n: usize, age_days: i64) {
    use hall::store::audit::{AuditConfig, AuditEntry, AuditLog, RecordKind};
    let db = hall::store::open_db(state).unwrap();
    let log = AuditLog::open(&db, AuditConfig::default()).unwrap();
    let ts = now_ms() - age_days * DAY_MS;
    for i in 0..n {
        log.append_blocking(AuditEntry {
            decision_id: Some(format!("old-{i}")),
            tenant_id: Some("org.old".into()),
            capability_id: Some("cap.doc.summarize".into()),
            allowed: Some(true),
            ..AuditEntry::new(RecordKind::Decision, ts + i as i64)
        })
        .unwrap();
    }
    log.shutdown();
}

#[test]
fn retention_prunes_old_records_and_verify_still_passes() {
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("hall.toml");
    std::fs::write(&config, "[audit]\nretention_days = 7\n").unwrap();
    let with_config = vec!["--config".to_string(), config.to_str().unwrap().to_string()];

    // 1. Five 10-day-old records; no retention configured: they stay.
    let mut d = Daemon::builder()
        .setup(|p| seed_old_records(&p.join("state"), 5, 10))
        .start();
    assert_eq!(query(&d, "tenant_id=org.old").len(), 5);
    route_ok(&d, ALLOW);
    // + the admin token's issue + startup reload + one decision
    assert_eq!(assert_verifies(&d), 5 + 3);
    d.stop();

    // 2. The config says 7 days but HALL_AUDIT_RETENTION_DAYS=30 overrides it: still kept.
    let env30 = vec![("HALL_AUDIT_RETENTION_DAYS".to_string(), "30".to_string())];
    let mut d = Daemon::spawn(d.into_dir(), &with_config, &env30, true);
    // A committed append means the writer's first loop (which prunes) has run.
    route_ok(&d, ALLOW);
    route_ok(&d, ALLOW);
    assert_eq!(query(&d, "tenant_id=org.old").len(), 5);
    assert_eq!(assert_verifies(&d), 5 + 3 + 3);
    d.stop();

    // 3. `[audit] retention_days = 7`: the old records go, the chain still verifies.
    let mut d = Daemon::spawn(d.into_dir(), &with_config, &[], true);
    // Index entries go before the records: wait for both.
    d.wait_until(Duration::from_secs(30), || {
        query(&d, "tenant_id=org.old").is_empty() && query(&d, "limit=1")[0]["seq"] != 1
    });
    d.get("/api/audit/old-0")
        .assert_error(404, "not_found", None);
    let first = &query(&d, "limit=1")[0];
    assert_eq!(first["seq"], 6, "pruned from the front: {first}");
    assert_ne!(first["prev_hash"].as_str().unwrap(), "0".repeat(64));
    let kept = assert_verifies(&d);
    let total = query(&d, "tail=1")[0]["seq"].as_u64().unwrap();
    assert_eq!(kept, total - 5, "verify counts from the checkpoint");
    let v = route_ok(&d, DENY);
    assert_eq!(assert_verifies(&d), kept + 1);
    assert_eq!(
        d.get(&format!("/api/audit/{}", decision_id(&v))).status,
        200
    );
    // The CLI agrees.
    let o = hall_audit(&d, &["verify"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    d.stop();

    // 4. Retention off again: the checkpoint persisted, so the shortened log still verifies.
    let d = Daemon::spawn(d.into_dir(), &[], &[], true);
    assert_eq!(assert_verifies(&d), kept + 2);
    assert!(query(&d, "tenant_id=org.old").is_empty());
}

#[test]
fn an_audit_write_failure_is_503_and_never_an_unrecorded_allow() {
    let fault_dir = tempfile::tempdir().unwrap();
    let fault = fault_dir.path().join("fail-audit");
    let d = Daemon::builder()
        .env("HALL_FAULT_AUDIT_FAIL_FILE", fault.to_str().unwrap())
        .start();
    route_ok(&d, ALLOW);
    let before = d.get("/api/status").json()["audit"].clone();

    std::fs::write(&fault, b"").unwrap();
    let tagged = |corr: &str, base: &str| {
        format!(
            r#"{},"correlation_id":"{corr}"}}"#,
            base.trim_end_matches('}')
        )
    };
    for (i, base) in [ALLOW, DENY].iter().enumerate() {
        let r = d.post_json("/api/route", &tagged(&format!("during-fault-{i}"), base));
        r.assert_error(503, "unavailable", None);
        assert!(
            r.json().get("decision_id").is_none() && r.json().get("allowed").is_none(),
            "{}",
            r.body
        );
    }
    let r = d.post_json(
        "/api/route",
        &tagged(
            "during-fault-dry",
            &ALLOW.replace('}', r#","dry_run":true}"#),
        ),
    );
    r.assert_error(503, "unavailable", None);
    // The CLI reports it as a failure.
    let o = Command::new(HALL)
        .args([
            "route",
            "--capability",
            "cap.doc.summarize",
            "--env",
            "dev",
            "--label",
            "PUBLIC",
            "--tenant",
            "org.acme",
        ])
        .env("HALL_URL", format!("http://{}", d.addr))
        .env("HALL_TOKEN", d.admin_token().unwrap())
        .output()
        .unwrap();
    // A 503 is the daemon refusing the call: exit 3, not a denial.
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("503"), "{o:?}");
    // Reads and liveness still work; the head did not move.
    assert_eq!(d.get("/health").status, 200);
    assert_eq!(d.get("/api/status").json()["audit"], before);
    assert!(d.logs().contains("injected I/O error"));
    // /metrics counts the refused appends (3 over HTTP + 1 from the CLI).
    let metrics = d.get("/metrics").body;
    let failed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("hall_audit_failed_total "))
        .unwrap_or_else(|| panic!("no hall_audit_failed_total in {metrics}"))
        .parse()
        .unwrap();
    assert_eq!(failed, 4, "{metrics}");

    std::fs::remove_file(&fault).unwrap();
    let v = route_ok(&d, ALLOW);
    assert_eq!(v["allowed"], true);
    assert_eq!(
        d.get(&format!("/api/audit/{}", decision_id(&v))).status,
        200
    );
    let all = all_records(&d);
    assert!(
        all.iter().all(|r| !r["correlation_id"]
            .as_str()
            .unwrap_or("")
            .starts_with("during-fault")),
        "a refused request left a record"
    );
    assert_eq!(
        all.last().unwrap()["seq"].as_u64().unwrap(),
        before["seq"].as_u64().unwrap() + 1
    );
    assert_verifies(&d);
}

#[test]
fn a_genuine_disk_failure_efbig_is_503_and_nothing_answered_is_lost() {
    // Under RLIMIT_FSIZE sled's writes fail with EFBIG once its file reaches the limit (the
    // daemon ignores SIGXFSZ, so this is an error rather than a kill).
    let mut d = Daemon::builder().file_size_limit(1_000_000).start();
    let mut answered = Vec::new();
    let mut refused = None;
    for i in 0..50_000 {
        let r = d.post_json("/api/route", if i % 4 == 0 { DENY } else { ALLOW });
        match r.status {
            200 => answered.push(decision_id(&r.json())),
            _ => {
                r.assert_error(503, "unavailable", None);
                refused = Some(i);
                break;
            }
        }
    }
    assert!(
        refused.is_some(),
        "the log never hit the 1 MB file-size limit"
    );
    assert!(!answered.is_empty());
    // Fail closed from then on: no decision without its record.
    for _ in 0..5 {
        d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
            .assert_error(503, "unavailable", None);
    }
    assert!(d.logs().contains("File too large"), "{}", d.logs());
    d.stop();

    // Without the limit: every decision a client received is there and the chain verifies.
    let d = Daemon::spawn(d.into_dir(), &[], &[], true);
    assert_verifies(&d);
    let logged: HashSet<String> = all_records(&d)
        .iter()
        .filter_map(|r| r["decision_id"].as_str().map(String::from))
        .collect();
    let missing: Vec<&String> = answered.iter().filter(|id| !logged.contains(*id)).collect();
    assert!(
        missing.is_empty(),
        "{} answered decisions are not in the log: {missing:?}",
        missing.len()
    );
    route_ok(&d, ALLOW);
    assert_verifies(&d);
}

/// Load `d` from 8 threads, `kill -9` it mid-load, and hand back its dir with the decision
/// ids that clients received complete 200 answers for.
fn load_and_kill(mut d: Daemon) -> (Vec<String>, tempfile::TempDir) {
    let addr: SocketAddr = d.addr;
    let headers = json_headers(&d);
    let received = Arc::new(Mutex::new(Vec::new()));
    let ok = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let (headers, received, ok, stop) =
                (headers.clone(), received.clone(), ok.clone(), stop.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120)
                {
                    let body = if (i + t) % 5 == 0 { DENY } else { ALLOW };
                    i += 1;
                    let Ok(r) =
                        raw_request(addr, "POST", "/api/route", &headers, Some(body.as_bytes()))
                    else {
                        break; // the daemon is gone
                    };
                    if r.status != 200 {
                        break;
                    }
                    // A response cut off by the kill was not received.
                    let Ok(v) = serde_json::from_str::<Value>(&r.body) else {
                        break;
                    };
                    received.lock().unwrap().push(decision_id(&v));
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    d.wait_until(Duration::from_secs(120), || {
        ok.load(Ordering::Relaxed) >= 400
    });
    d.signal(libc::SIGKILL);
    let status = d.wait_exit(Duration::from_secs(30));
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let ids = received.lock().unwrap().clone();
    (ids, d.into_dir())
}

/// Three rounds of load + `kill -9` + restart on one state dir. Returns every id clients
/// received and the daemon restarted after the last crash.
fn crash_rounds(args: &[String]) -> (Vec<String>, Daemon) {
    let mut b = Daemon::builder();
    for a in args {
        b = b.arg(a);
    }
    let mut d = b.start();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (got, dir) = load_and_kill(d);
        assert!(got.len() >= 400);
        ids.extend(got);
        d = Daemon::spawn(dir, args, &[], true);
    }
    (ids, d)
}

fn missing_after_crash(d: &Daemon, ids: &[String]) -> Vec<String> {
    ids.iter()
        .filter(|id| {
            let r = d.get(&format!("/api/audit/{id}"));
            assert!(r.status == 200 || r.status == 404, "{}", r.body);
            if r.status == 200 {
                assert_eq!(r.json()["decision_id"], id.as_str());
            }
            r.status == 404
        })
        .cloned()
        .collect()
}

#[test]
fn crash_durable_every_answered_decision_survives_kill_9() {
    let (ids, d) = crash_rounds(&[]);
    let missing = missing_after_crash(&d, &ids);
    assert!(
        missing.is_empty(),
        "{} of {} answered decisions lost: {missing:?}",
        missing.len(),
        ids.len()
    );
    assert_verifies(&d);
    // And the log keeps growing from the recovered head.
    route_ok(&d, ALLOW);
    assert_verifies(&d);
}

#[test]
fn crash_batched_chain_still_verifies_after_kill_9() {
    // Batched mode may lose what was answered in the last ~50 ms: only the chain is asserted.
    let args = vec!["--audit-durability".to_string(), "batched".to_string()];
    let (ids, d) = crash_rounds(&args);
    let missing = missing_after_crash(&d, &ids);
    eprintln!(
        "batched crash: {} of {} answered decisions not in the log",
        missing.len(),
        ids.len()
    );
    assert_verifies(&d);
    route_ok(&d, ALLOW);
    assert_verifies(&d);
}

#[test]
fn batched_decisions_older_than_the_window_survive_kill_9() {
    // The documented batched window: what was answered more than `batch_interval` (50 ms)
    // before a crash is on disk. 2 s of quiet leaves a wide margin on a slow machine.
    let args = vec!["--audit-durability".to_string(), "batched".to_string()];
    let mut b = Daemon::builder();
    for a in &args {
        b = b.arg(a);
    }
    let mut d = b.start();
    let ids: Vec<String> = (0..50).map(|_| decision_id(&route_ok(&d, ALLOW))).collect();
    std::thread::sleep(Duration::from_secs(2));
    d.signal(libc::SIGKILL);
    d.wait_exit(Duration::from_secs(30));
    let d = Daemon::spawn(d.into_dir(), &args, &[], true);
    let missing = missing_after_crash(&d, &ids);
    assert!(missing.is_empty(), "lost after the window: {missing:?}");
    assert_verifies(&d);
}

/// sled's own periodic flusher thread cleans segments in the background: after a busy minute
/// it paged tens of thousands of cold audit leaves back in while the daemon was idle, and RSS
/// rose ~30 MB (docs/performance.md). The daemon opens sled without it; the audit maintenance
/// thread flushes instead. Thread names are set when a thread starts: nothing to wait for.
#[cfg(target_os = "linux")]
#[test]
fn the_daemon_runs_without_sleds_flusher_thread() {
    let d = Daemon::start();
    route_ok(&d, ALLOW);
    let tasks = format!("/proc/{}/task", d.child.id());
    let names: Vec<String> = std::fs::read_dir(&tasks)
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim_end().to_string())
        .collect();
    // (comm keeps 15 bytes of a thread's name.)
    assert!(names.iter().any(|n| n == "hall-audit-main"), "{names:?}");
    assert!(!names.iter().any(|n| n == "log flusher"), "{names:?}");
}

#[test]
fn cli_tail_show_verify() {
    let d = Daemon::start();
    let a = route_ok(&d, ALLOW);
    let b = route_ok(&d, DENY);

    let o = hall_audit(&d, &["tail", "-n", "2"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v = stdout_json(&o);
    let recs = v["records"].as_array().unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0]["decision_id"], a["decision_id"]);
    assert_eq!(recs[1]["decision_id"], b["decision_id"], "newest last");
    let o = hall_audit(&d, &["tail"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert_eq!(
        stdout_json(&o)["records"].as_array().unwrap().len(),
        4,
        "admin token issue + reload + 2 decisions"
    );

    let o = hall_audit(&d, &["show", &decision_id(&b)]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v = stdout_json(&o);
    assert_eq!(v["decision_id"], b["decision_id"]);
    assert_eq!(v["deny_reason"], "change_freeze");
    assert_eq!(v, d.get(&format!("/api/audit/{}", decision_id(&b))).json());

    let o = hall_audit(&d, &["show", "no-such-decision"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("404"), "{o:?}");

    let o = hall_audit(&d, &["verify"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v = stdout_json(&o);
    assert_eq!(v["ok"], true);
    assert_eq!(v["entries"], 4);

    // Usage errors exit 2; a wrong token or no daemon exit 3 with a message.
    let o = hall_audit(&d, &["show"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let o = Command::new(HALL)
        .args(["audit", "verify"])
        .env("HALL_URL", format!("http://{}", d.addr))
        .env("HALL_TOKEN", "hall_wrong")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("401"), "{o:?}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let o = Command::new(HALL)
        .args(["audit", "tail", "--url", &format!("http://{closed}")])
        .env("HALL_TOKEN", d.admin_token().unwrap())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("cannot reach the daemon"),
        "{o:?}"
    );
}

/// A token whose issue cannot be recorded must not exist: the daemon revokes it and
/// answers 503, so no unaudited credential is ever live.
#[test]
fn a_token_issued_while_the_audit_log_fails_does_not_exist() {
    let fault_dir = tempfile::tempdir().unwrap();
    let fault = fault_dir.path().join("fail-audit");
    let d = Daemon::builder()
        .env("HALL_FAULT_AUDIT_FAIL_FILE", fault.to_str().unwrap())
        .start();
    let before = d.get("/api/tokens").json()["tokens"]
        .as_array()
        .unwrap()
        .len();
    std::fs::write(&fault, b"").unwrap();
    let r = d.post_json("/api/tokens", r#"{"name":"ghost","scopes":["route"]}"#);
    r.assert_error(503, "unavailable", None);
    assert!(
        !r.body.contains("hall_"),
        "no token in a refused answer: {}",
        r.body
    );
    std::fs::remove_file(&fault).unwrap();
    let tokens = d.get("/api/tokens").json()["tokens"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(tokens.len(), before, "{tokens:?}");
    assert!(tokens.iter().all(|t| t["name"] != "ghost"));
}

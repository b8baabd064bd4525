//! End-to-end: an audit log written by an earlier release (a checked-in state dir under
//! `tests/fixtures/golden/`, made by its `make.sh` with that release's binary) still opens,
//! verifies, queries, reads by decision id and exports exactly as it did then.
//!
//! This is the promise that stored formats keep: if a change to the record encoding makes
//! old records undecodable or decode differently, this test fails. Never regenerate a
//! fixture to make it pass; add a new one for a new release instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Daemon, HALL};
use serde_json::Value;

/// Every golden fixture, one directory per release that wrote one.
fn fixtures() -> Vec<PathBuf> {
    let root = common::repo().join("tests/fixtures/golden");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("db").is_dir())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no golden fixture under {}",
        root.display()
    );
    dirs
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A daemon on a copy of the fixture's state (the fixture itself is never written). Its
/// master key is a throwaway made for the fixture; git does not keep file modes, so the copy
/// is made 0600 (the daemon refuses a key file others can read).
fn start_on(fixture: &Path) -> Daemon {
    use std::os::unix::fs::PermissionsExt;
    let fixture = fixture.to_path_buf();
    Daemon::builder()
        .setup(move |dir| {
            let state = dir.join("state");
            std::fs::create_dir_all(&state).unwrap();
            copy_tree(&fixture.join("db"), &state.join("db"));
            let key = state.join("master.key");
            std::fs::copy(fixture.join("master.key"), &key).unwrap();
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        })
        .start()
}

fn lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn seqs(records: &[Value]) -> Vec<u64> {
    records.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
}

fn query(d: &Daemon, q: &str) -> Vec<Value> {
    let r = d.get(&format!("/api/audit?limit=1000&{q}"));
    assert_eq!(r.status, 200, "{q}: {}", r.body);
    r.json()["records"].as_array().unwrap().clone()
}

#[test]
fn golden_logs_open_verify_query_and_export_as_written() {
    for fixture in fixtures() {
        let name = fixture.display().to_string();
        let export = std::fs::read_to_string(fixture.join("export.jsonl")).unwrap();
        let expected = lines(&export);
        let facts: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("facts.json")).unwrap())
                .unwrap();
        let golden_n = expected.len() as u64;
        assert!(golden_n >= 10, "{name}: fixture too small");
        assert_eq!(facts["verify"]["entries"], golden_n, "{name}");

        let d = start_on(&fixture);

        // The chain verifies (the daemon appends its own bootstrap records after the golden ones).
        let v = d.get("/api/audit/verify").json();
        assert_eq!(v["ok"], true, "{name}: {v}");
        assert!(v["entries"].as_u64().unwrap() >= golden_n, "{name}: {v}");

        // Record by record, the API shows what the old release showed.
        let all = query(&d, "");
        assert!(all.len() as u64 >= golden_n, "{name}");
        assert_eq!(&all[..expected.len()], &expected[..], "{name}");
        assert_eq!(
            all[expected.len() - 1]["hash"],
            facts["verify"]["head"],
            "{name}"
        );

        // Queries through the indexes find the same records a filter over the export does.
        let golden = |r: &&Value| r["seq"].as_u64().unwrap() <= golden_n;
        let expect_where = |f: &dyn Fn(&Value) -> bool| -> Vec<u64> {
            seqs(
                &expected
                    .iter()
                    .filter(|r| f(r))
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        };
        let got = |q: &str| -> Vec<u64> {
            seqs(
                &query(&d, q)
                    .iter()
                    .filter(golden)
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        };
        for tenant in ["org.acme", "org.beta.eu", "org.other"] {
            let want = expect_where(&|r| r["tenant_id"] == tenant);
            assert!(!want.is_empty(), "{name}: no record for {tenant}");
            assert_eq!(
                got(&format!("tenant_id={tenant}")),
                want,
                "{name}: {tenant}"
            );
        }
        for cap in ["cap.doc.summarize", "cap.code.deploy"] {
            let want = expect_where(&|r| r["capability_id"] == cap);
            assert!(!want.is_empty(), "{name}: no record for {cap}");
            assert_eq!(got(&format!("capability_id={cap}")), want, "{name}: {cap}");
        }
        for allowed in [true, false] {
            let want = expect_where(&|r| r["allowed"] == allowed);
            assert!(!want.is_empty(), "{name}: no record allowed={allowed}");
            assert_eq!(got(&format!("allowed={allowed}")), want, "{name}");
        }

        // One record by decision id.
        let id = facts["allowed_decision_id"].as_str().unwrap();
        let r = d.get(&format!("/api/audit/{id}"));
        assert_eq!(r.status, 200, "{name}: {}", r.body);
        let one = r.json();
        let want = expected.iter().find(|r| r["decision_id"] == id).unwrap();
        assert_eq!(&one, want, "{name}");
        assert_eq!(one["allowed"], true);
        assert_eq!(one["context"]["nested"]["k"], "välue");

        // `hall audit export` writes the same bytes the old release's export did.
        let out = Command::new(HALL)
            .args(["audit", "export"])
            .env("HALL_URL", format!("http://{}", d.addr))
            .env("HALL_TOKEN", d.admin_token().unwrap())
            .env_remove("HALL_CONFIG")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
        let got = String::from_utf8(out.stdout).unwrap();
        assert!(
            got.starts_with(&export),
            "{name}: export differs from the golden export.jsonl\n--- got\n{got}\n--- want\n{export}"
        );
    }
}

/// Every kind of record is in the fixture, so every kind's old encoding is exercised.
#[test]
fn golden_logs_hold_every_record_kind() {
    for fixture in fixtures() {
        let expected = lines(&std::fs::read_to_string(fixture.join("export.jsonl")).unwrap());
        let has = |pred: &dyn Fn(&Value) -> bool| expected.iter().any(pred);
        for kind in [
            "decision",
            "reload",
            "token_issue",
            "token_revoke",
            "secret_store",
            "secret_delete",
            "secret_release",
            "secret_refusal",
        ] {
            assert!(has(&|r| r["kind"] == kind), "{}: {kind}", fixture.display());
        }
        assert!(has(&|r| r["kind"] == "decision" && r["dry_run"] == true));
        assert!(has(&|r| r["kind"] == "decision" && r["allowed"] == false));
        assert!(has(&|r| r["kind"] == "decision" && r["context"].is_object()));
        assert!(has(&|r| r["kind"] == "reload" && r["allowed"] == false));
    }
}

//! `hall check` and `hall route --offline` end to end, with the real binary.

use std::path::Path;
use std::process::{Command, Output};

fn hall_in(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hall"));
    cmd.args(args).current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("HALL_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run hall")
}

fn hall(args: &[&str]) -> Output {
    hall_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A copy of the shipped set in a temp dir, to break on purpose.
fn copy_example() -> tempfile::TempDir {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    for sub in ["registry", "policies"] {
        std::fs::create_dir(tmp.path().join(sub)).unwrap();
        for e in std::fs::read_dir(root.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), tmp.path().join(sub).join(e.file_name())).unwrap();
        }
    }
    tmp
}

fn append(path: &Path, s: &str) {
    let mut t = std::fs::read_to_string(path).unwrap();
    t.push_str(s);
    std::fs::write(path, t).unwrap();
}

#[test]
fn check_passes_on_the_shipped_set() {
    let o = hall(&["check", "--registry", "registry", "--policies", "policies"]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("0 errors, 0 warnings"), "{out}");
    assert!(out.contains("policy version blake3:"), "{out}");
    // --strict changes nothing on a clean set.
    let o = hall(&[
        "check",
        "--strict",
        "--registry",
        "registry",
        "--policies",
        "policies",
    ]);
    assert_eq!(o.status.code(), Some(0));
}

#[test]
fn check_fails_on_a_broken_copy_and_points_at_the_spot() {
    let tmp = copy_example();
    let code = tmp.path().join("policies/30-code.toml");
    let lines_before = std::fs::read_to_string(&code).unwrap().lines().count();
    append(
        &code,
        "\n[[rule]]\nid = \"typo\"\neffect = \"allow\"\nworkers = [\"worker.nobody\"]\n",
    );
    let o = hall_in(
        tmp.path(),
        &["check", "--registry", "registry", "--policies", "policies"],
    );
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    // The bad value is on the 4th appended line (after a blank one), column 12.
    let want = format!(
        "policies/30-code.toml:{}:12: error: rule[typo].workers: unknown worker \"worker.nobody\"",
        lines_before + 5
    );
    assert!(out.contains(&want), "want {want:?} in:\n{out}");
    assert!(
        out.contains("1 errors, 0 warnings") || out.contains("1 error"),
        "{out}"
    );

    // A syntax error is located too.
    let tmp = copy_example();
    std::fs::write(tmp.path().join("registry/zz.toml"), "[[worker]\n").unwrap();
    let o = hall_in(
        tmp.path(),
        &["check", "--registry", "registry", "--policies", "policies"],
    );
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("registry/zz.toml:1:9: error:"), "{out}");
}

#[test]
fn check_strict_fails_on_a_warning() {
    let tmp = copy_example();
    append(
        &tmp.path().join("registry/capabilities.toml"),
        "\n[[capability]]\nid = \"cap.orphan\"\n",
    );
    let args = ["check", "--registry", "registry", "--policies", "policies"];
    let o = hall_in(tmp.path(), &args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("warning: capability[cap.orphan]: no worker offers this capability"),
        "{out}"
    );
    assert!(out.contains("0 errors, 1 warnings"), "{out}");
    let o = hall_in(
        tmp.path(),
        &[&["check", "--strict"][..], &args[1..]].concat(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o).0);
}

fn route(extra: &[&str]) -> (Option<i32>, String, String) {
    let mut args = vec![
        "route",
        "--offline",
        "--registry",
        "registry",
        "--policies",
        "policies",
    ];
    args.extend_from_slice(extra);
    let o = hall(&args);
    let (out, err) = text(&o);
    (o.status.code(), out, err)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}):\n{s}"))
}

#[test]
fn route_offline_allowed() {
    let (code, out, err) = route(&[
        "--capability",
        "cap.doc.summarize",
        "--env",
        "dev",
        "--label",
        "PUBLIC",
        "--tenant",
        "org.acme",
    ]);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let j = json(&out);
    assert_eq!(j["allowed"], true);
    assert_eq!(j["worker_id"], "worker.doc.summarize");
    assert_eq!(j["rule_id"], "docs-dev");
    assert!(j["deny_reason"].is_null());
    assert!(j["policy_version"].as_str().unwrap().starts_with("blake3:"));
    assert!(j.get("explain").is_none(), "no trace unless asked");
}

#[test]
fn route_offline_denied_exits_1() {
    let (code, out, err) = route(&[
        "--capability",
        "cap.code.deploy",
        "--env",
        "prod",
        "--label",
        "INTERNAL",
        "--tenant",
        "org.beta.eu",
    ]);
    assert_eq!(code, Some(1), "stdout:\n{out}\nstderr:\n{err}");
    let j = json(&out);
    assert_eq!(j["allowed"], false);
    assert_eq!(j["deny_reason"], "change_freeze");
    assert_eq!(j["rule_id"], "beta-prod-freeze");
    assert!(j["worker_id"].is_null());
}

#[test]
fn route_offline_explain_shows_the_trace() {
    let (code, out, err) = route(&[
        "--capability",
        "cap.email.send",
        "--env",
        "dev",
        "--label",
        "INTERNAL",
        "--tenant",
        "org.acme",
        "--explain",
    ]);
    assert_eq!(code, Some(0), "stdout:\n{out}\nstderr:\n{err}");
    let j = json(&out);
    let rules = j["explain"]["rules"].as_array().unwrap();
    // Every rule before email-internal was tried and missed, in file order.
    let ids: Vec<&str> = rules
        .iter()
        .map(|r| r["rule_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.first(), Some(&"no-secret-egress"));
    assert_eq!(ids.last(), Some(&"email-internal"));
    assert_eq!(rules[0]["mismatch"], "data_label");
    assert_eq!(rules.last().unwrap()["matched"], true);
    assert_eq!(
        j["explain"]["candidates"],
        serde_json::json!([
            {"worker_id": "worker.email.legacy", "eligible": false, "skipped": "disabled",
             "why": "disabled (enabled = false)"},
            {"worker_id": "worker.email.send", "eligible": true}
        ])
    );
}

#[test]
fn route_offline_unknown_env_is_a_clear_error() {
    let (code, out, err) = route(&[
        "--capability",
        "cap.doc.summarize",
        "--env",
        "qa",
        "--label",
        "PUBLIC",
        "--tenant",
        "org.acme",
    ]);
    // A bad request is a usage error (2), not a denial (1).
    assert_eq!(code, Some(2), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.is_empty(), "no decision is printed: {out}");
    assert!(
        err.contains(
            "invalid request: env: unknown environment \"qa\" (known: dev, staging, prod)"
        ),
        "{err}"
    );
}

/// `hall … | head` must end quietly when the reader is gone (killed by SIGPIPE like any Unix
/// tool), not panic on EPIPE.
#[test]
fn a_closed_stdout_ends_the_cli_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader); // every write to stdout now fails with EPIPE
    let out = Command::new(env!("CARGO_BIN_EXE_hall"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "route",
            "--offline",
            "--capability",
            "cap.code.deploy",
            "--env",
            "dev",
            "--label",
            "INTERNAL",
            "--tenant",
            "org.acme",
            "--explain",
        ])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(13), "{:?} {stderr}", out.status);
}

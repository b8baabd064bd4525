//! `hall test` end to end: the real binary, the shipped example set, the shipped fixtures.

use std::path::Path;
use std::process::{Command, Output};

/// Run `hall` from the crate root with no `HALL_*` settings leaking in from the caller.
fn hall(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hall"));
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    for (k, _) in std::env::vars() {
        if k.starts_with("HALL_") {
            cmd.env_remove(k);
        }
    }
    cmd.output().expect("run hall")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn case_count(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.trim() == "[[case]]")
        .count()
}

#[test]
fn shipped_fixtures_pass() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/example.toml");
    let n = case_count(&fixtures);
    assert!(
        n >= 20,
        "the example fixtures should pin at least 20 cases, found {n}"
    );
    let o = hall(&[
        "test",
        "--registry",
        "registry",
        "--policies",
        "policies",
        "tests/fixtures/example.toml",
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.lines().any(|l| l == format!("{n} passed, 0 failed")),
        "stdout:\n{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
}

#[test]
fn a_failing_fixture_fails_and_shows_request_expected_actual() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wrong.toml");
    // The docs-dev rule picks worker.doc.summarize; this case claims otherwise.
    std::fs::write(
        &path,
        r#"[[case]]
name = "summarize in dev goes to the on-prem worker (wrong)"
request = { capability_id = "cap.doc.summarize", env = "dev", data_label = "PUBLIC", tenant_id = "org.acme" }
expect = { allowed = true, worker_id = "worker.doc.local" }
"#,
    )
    .unwrap();
    let o = hall(&[
        "test",
        "--registry",
        "registry",
        "--policies",
        "policies",
        path.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.lines().any(|l| l == "0 passed, 1 failed"), "{out}");
    assert!(
        out.contains("FAIL") && out.contains("summarize in dev goes to the on-prem worker (wrong)"),
        "{out}"
    );
    let line = |label: &str| {
        out.lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label:?} line in:\n{out}"))
            .to_string()
    };
    let request = line("request:");
    assert!(
        request.contains("cap.doc.summarize") && request.contains("org.acme"),
        "{request}"
    );
    assert!(line("expected:").contains("worker.doc.local"), "{out}");
    let actual = line("actual:");
    assert!(
        actual.contains("worker.doc.summarize") && actual.contains("docs-dev"),
        "{actual}"
    );
}

#[test]
fn passes_and_failures_are_counted_across_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &good,
        r#"[[case]]
name = "unknown capability"
request = { capability_id = "cap.nope", env = "dev", data_label = "PUBLIC", tenant_id = "org.acme" }
expect = { allowed = false, deny_reason = "unknown_capability" }

[[case]]
name = "web search"
request = { capability_id = "cap.web.search", env = "dev", data_label = "PUBLIC", tenant_id = "org.acme" }
expect = { rule_id = "web-search-public" }
"#,
    )
    .unwrap();
    std::fs::write(
        &bad,
        r#"[[case]]
name = "a request the engine rejects is a failure, not a crash"
request = { capability_id = "cap.web.search", env = "qa", data_label = "PUBLIC", tenant_id = "org.acme" }
expect = { allowed = false }
"#,
    )
    .unwrap();
    let o = hall(&[
        "test",
        "--registry",
        "registry",
        "--policies",
        "policies",
        good.to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.lines().any(|l| l == "2 passed, 1 failed"), "{out}");
    assert!(out.contains("invalid request: env"), "{out}");
}

#[test]
fn a_case_that_expects_nothing_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("empty-expect.toml");
    std::fs::write(
        &f,
        r#"[[case]]
name = "checks something"
request = { capability_id = "cap.web.search", env = "dev", data_label = "PUBLIC", tenant_id = "org.acme" }
expect = { rule_id = "web-search-public" }

[[case]]
name = "checks nothing"
request = { capability_id = "cap.web.search", env = "dev", data_label = "PUBLIC", tenant_id = "org.acme" }
expect = {}
"#,
    )
    .unwrap();
    let o = hall(&[
        "test",
        "--registry",
        "registry",
        "--policies",
        "policies",
        f.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert_ne!(o.status.code(), Some(0), "stdout:\n{out}\nstderr:\n{err}");
    assert!(!out.contains("passed"), "{out}");
    assert!(
        err.contains("empty-expect.toml:9:")
            && err.contains("\"checks nothing\"")
            && err.contains("checks nothing; name at least one of"),
        "{err}"
    );
}

//! The CLI through the real binary: the input it has always accepted (durations spelled as
//! the previous release took them), and errors that keep their causes, say what to do and
//! exit with the documented code.

mod common;

use common::{free_port, hall, out, stderr, Daemon};
use serde_json::Value;

#[test]
fn token_create_expires_in_takes_the_previous_releases_spellings() {
    let d = Daemon::start();
    let home = tempfile::tempdir().unwrap();
    let url = format!("http://{}", d.addr);
    let admin = d.admin_token().unwrap();
    let env = [("HALL_URL", url.as_str()), ("HALL_TOKEN", admin.as_str())];
    for (spelling, secs) in [
        ("30 m", 1800),
        ("+5m", 300),
        ("+3600", 3600),
        ("1234567890s", 1_234_567_890),
        ("00000000010m", 600),
    ] {
        let o = hall(
            home.path(),
            &[
                "token",
                "create",
                "--json",
                "--name",
                "ttl",
                "--scope",
                "route",
                "--expires-in",
                spelling,
            ],
            &env,
        );
        assert_eq!(o.status.code(), Some(0), "{spelling:?}: {}", out(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        let info = &v["info"];
        assert_eq!(
            info["expires_at_ms"].as_i64().unwrap() - info["created_at_ms"].as_i64().unwrap(),
            secs * 1000,
            "{spelling:?}: {info}"
        );
    }
    // Still refused, before anything is sent: a usage error that says how to write it.
    let o = hall(
        home.path(),
        &[
            "token",
            "create",
            "--name",
            "ttl",
            "--scope",
            "route",
            "--expires-in",
            "5 mm",
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(
        stderr(&o).contains(
            "\"5 mm\" is not a duration: write seconds (3600) or a number and one unit, s, m, h \
             or d (30m, 12h, 7d)"
        ),
        "{}",
        out(&o)
    );
}

#[test]
fn replay_since_and_until_take_more_than_nine_digits() {
    let mut d = Daemon::start();
    let r = d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(d.stop().success());
    let home = tempfile::tempdir().unwrap();
    let (state, registry, policies) = (
        d.state_dir().display().to_string(),
        d.registry().display().to_string(),
        d.policies().display().to_string(),
    );
    let replay = |extra: &[&str]| {
        let mut args = vec![
            "replay",
            "--source",
            "state-dir",
            "--state-dir",
            &state,
            "--registry",
            &registry,
            "--policies",
            &policies,
            "--format",
            "json",
        ];
        args.extend_from_slice(extra);
        hall(home.path(), &args, &[])
    };
    // 39 years back (10 digits) and one day back (10 digits, leading zeros): the decision
    // just made is in both windows ...
    for since in ["1234567890s", "0000000001d"] {
        let o = replay(&["--since", since]);
        assert_eq!(o.status.code(), Some(0), "{since}: {}", out(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["replayed"], 1, "{since}: {v}");
    }
    // ... and not in one that ends 39 years ago.
    let o = replay(&["--until", "1234567890s"]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["replayed"], 0, "{v}");
    // Spellings replay never took are still refused (exit 1, as every replay error).
    let o = replay(&["--since", "+5m"]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        stderr(&o).starts_with("hall: --since: \"+5m\" is neither a duration"),
        "{}",
        out(&o)
    );
}

#[test]
fn an_unreachable_daemon_names_the_cause_and_the_fix() {
    let home = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}", free_port());
    let o = hall(
        home.path(),
        &["status", "--url", &url],
        &[("HALL_TOKEN", "x")],
    );
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    let e = stderr(&o);
    let lines: Vec<&str> = e.lines().collect();
    assert!(
        lines[0].starts_with(&format!(
            "hall: cannot reach the daemon at {url} (from --url; no config file): "
        )) && lines[0].to_lowercase().contains("connection refused"),
        "{e}"
    );
    assert!(
        lines[1..lines.len() - 1]
            .iter()
            .any(|l| l.starts_with("  caused by: ")),
        "the transport error is kept: {e}"
    );
    assert!(
        lines[lines.len() - 1].starts_with("  fix: is `hall serve` running there?"),
        "{e}"
    );
}

#[test]
fn an_io_error_is_shown_as_the_cause() {
    let home = tempfile::tempdir().unwrap();
    let missing = home.path().join("no-such-dir").join("audit.jsonl");
    let o = hall(
        home.path(),
        &[
            "audit",
            "export",
            "--state-dir",
            home.path().to_str().unwrap(),
            "--output",
            missing.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert_eq!(
        stderr(&o),
        format!(
            "hall: cannot create {}\n  caused by: No such file or directory (os error 2)\n",
            missing.display()
        )
    );

    let repo = common::repo();
    let o = hall(
        home.path(),
        &[
            "test",
            "--registry",
            repo.join("registry").to_str().unwrap(),
            "--policies",
            repo.join("policies").to_str().unwrap(),
            "missing.toml",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        stderr(&o).contains(
            "cannot read fixture file missing.toml\n  caused by: No such file or directory (os error 2)"
        ),
        "{}",
        out(&o)
    );
}

/// `hall approvals` answers a refused token like every client command: exit 3, which token
/// was sent and what to do (it used to exit 1 with the bare message).
#[test]
fn approvals_refusals_use_the_documented_exit_codes() {
    let d = Daemon::start();
    let home = tempfile::tempdir().unwrap();
    let url = format!("http://{}", d.addr);
    let o = hall(
        home.path(),
        &["approvals", "list"],
        &[("HALL_URL", &url), ("HALL_TOKEN", "hall_not_a_token")],
    );
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    let e = stderr(&o);
    assert!(e.contains("HTTP 401"), "{e}");
    assert!(e.contains("token: from HALL_TOKEN"), "{e}");
    assert!(e.contains("fix:"), "{e}");
    // A conflict or an unknown id is still a plain failure (1).
    let admin = d.admin_token().unwrap();
    let o = hall(
        home.path(),
        &["approvals", "show", "apr_nonexistent"],
        &[("HALL_URL", &url), ("HALL_TOKEN", &admin)],
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(stderr(&o).contains("(HTTP 404"), "{}", out(&o));
}

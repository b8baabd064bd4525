//! Client commands end to end: one `hall.toml` for daemon and CLI, exit codes, the 401
//! message for each token source, offline audit verify/export on a copied state dir.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_port, hall, out, stderr, Daemon, HALL};

/// `hall serve` with only a config file (no flags), waiting until it listens and is ready.
struct ConfigDaemon {
    child: Child,
    addr: SocketAddr,
}

impl ConfigDaemon {
    fn start(home: &Path, env: &[(&str, &str)]) -> ConfigDaemon {
        let mut cmd = Command::new(HALL);
        cmd.arg("serve")
            .current_dir(home)
            .env("HOME", home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("HALL_KEYRING", "off")
            .env("NO_COLOR", "1")
            .env_remove("HALL_TOKEN")
            .env_remove("HALL_CONFIG")
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listening on http://") {
                    let a: String = line[i + 20..]
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect();
                    if let (Some(tx), Ok(a)) = (tx.take(), a.parse::<SocketAddr>()) {
                        let _ = tx.send(a);
                    }
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("daemon did not start");
        ConfigDaemon { child, addr }
    }
}

impl Drop for ConfigDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A home dir with the example files and `hall.toml` at `config_path` naming them, `listen`
/// and a state dir; returns the config path.
fn write_config(home: &Path, config_path: &Path, listen: &str) -> PathBuf {
    common::copy_dir(
        &common::repo().join("registry"),
        &home.join("files/registry"),
    );
    common::copy_dir(
        &common::repo().join("policies"),
        &home.join("files/policies"),
    );
    std::fs::create_dir_all(config_path.parent().unwrap()).unwrap();
    std::fs::write(
        config_path,
        format!(
            "listen = \"{listen}\"\nregistry_dir = \"{0}/files/registry\"\npolicies_dir = \"{0}/files/policies\"\nstate_dir = \"{0}/state\"\n",
            home.display()
        ),
    )
    .unwrap();
    config_path.to_path_buf()
}

#[test]
fn cli_and_daemon_agree_on_a_non_default_listen_from_one_config() {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = write_config(
        home.path(),
        &home.path().join("etc/hall.toml"),
        &format!("127.0.0.1:{port}"),
    );
    let cfg_s = cfg.to_str().unwrap();
    let d = ConfigDaemon::start(home.path(), &[("HALL_CONFIG", cfg_s)]);
    assert_eq!(
        d.addr.port(),
        port,
        "the daemon listens where the config says"
    );

    // HALL_CONFIG: the CLI finds the address and the admin token with no other flag.
    let o = hall(
        home.path(),
        &["status", "--json"],
        &[("HALL_CONFIG", cfg_s)],
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["policy_version"].as_str().unwrap().starts_with("blake3:"));

    // --config on a client command, and on route.
    let o = hall(
        home.path(),
        &[
            "route",
            "--config",
            cfg_s,
            "--capability",
            "cap.doc.summarize",
            "--env",
            "dev",
            "--label",
            "PUBLIC",
            "--tenant",
            "org.acme",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));

    // The per-user default location (where install.sh writes it): no flag, no variable.
    let user_cfg = home.path().join(".config/hall/hall.toml");
    std::fs::create_dir_all(user_cfg.parent().unwrap()).unwrap();
    std::fs::copy(&cfg, &user_cfg).unwrap();
    let o = hall(home.path(), &["token", "list", "--json"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\"tokens\""),
        "{}",
        out(&o)
    );
}

#[test]
fn serve_and_cli_find_the_per_user_config_with_no_flags() {
    let home = tempfile::tempdir().unwrap();
    let port = free_port();
    write_config(
        home.path(),
        &home.path().join(".config/hall/hall.toml"),
        &format!("localhost:{port}"),
    );
    let d = ConfigDaemon::start(home.path(), &[]);
    assert_eq!(d.addr.port(), port);
    let o = hall(home.path(), &["status"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
}

#[test]
fn exit_codes_are_the_documented_ones() {
    let d = Daemon::start();
    let home = tempfile::tempdir().unwrap();
    let url = format!("http://{}", d.addr);
    let token = d.admin_token().unwrap();
    let env = [("HALL_URL", url.as_str()), ("HALL_TOKEN", token.as_str())];
    let route = |cap: &str, env_name: &str, extra: &[(&str, &str)]| {
        let mut e = env.to_vec();
        e.extend_from_slice(extra);
        hall(
            home.path(),
            &[
                "route",
                "--capability",
                cap,
                "--env",
                env_name,
                "--label",
                "PUBLIC",
                "--tenant",
                "org.acme",
            ],
            &e,
        )
    };
    // 0: allowed.
    let o = route("cap.doc.summarize", "dev", &[]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    // 1: denied.
    let o = hall(
        home.path(),
        &[
            "route",
            "--capability",
            "cap.doc.summarize",
            "--env",
            "dev",
            "--label",
            "PUBLIC",
            "--tenant",
            "org.nobody",
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    // 2: a request the daemon calls invalid (unknown env), and a bad flag.
    let o = route("cap.doc.summarize", "production", &[]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    let o = hall(home.path(), &["status", "--no-such-flag"], &env);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    // 3: a refused token (401) and a token without the scope (403).
    let o = route("cap.doc.summarize", "dev", &[("HALL_TOKEN", "hall_wrong")]);
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    let o = hall(
        home.path(),
        &[
            "token", "create", "--name", "r", "--scope", "route", "--json",
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let route_only = v["token"].as_str().unwrap().to_string();
    let o = hall(
        home.path(),
        &["token", "list"],
        &[("HALL_URL", &url), ("HALL_TOKEN", &route_only)],
    );
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    assert!(stderr(&o).contains("HTTP 403"), "{}", out(&o));
    // 3: nothing listening.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let o = hall(
        home.path(),
        &["status", "--url", &closed],
        &[("HALL_TOKEN", "x")],
    );
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    assert!(
        stderr(&o).contains("cannot reach the daemon at"),
        "{}",
        out(&o)
    );
    assert!(
        stderr(&o).contains("--url"),
        "names the source: {}",
        out(&o)
    );
}

#[test]
fn a_401_names_the_token_source_and_the_fix() {
    let d = Daemon::start();
    let home = tempfile::tempdir().unwrap();
    let url = format!("http://{}", d.addr);

    // --token
    let o = hall(
        home.path(),
        &["status", "--url", &url, "--token", "hall_not_a_token"],
        &[],
    );
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    let e = stderr(&o);
    assert!(e.contains("HTTP 401"), "{e}");
    assert!(e.contains("token: from --token"), "{e}");
    assert!(e.contains("fix:"), "{e}");

    // HALL_TOKEN
    let o = hall(
        home.path(),
        &["status", "--url", &url],
        &[("HALL_TOKEN", "hall_not_a_token")],
    );
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    let e = stderr(&o);
    assert!(e.contains("token: from HALL_TOKEN"), "{e}");
    assert!(e.contains("unset HALL_TOKEN"), "{e}");

    // A token file that exists but is not this daemon's (another state dir).
    let cfg = home.path().join("hall.toml");
    let state = home.path().join("other-state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("admin.token"), "hall_someone_elses\n").unwrap();
    std::fs::write(
        &cfg,
        format!(
            "listen = \"{}\"\nstate_dir = \"{}\"\n",
            d.addr,
            state.display()
        ),
    )
    .unwrap();
    let o = hall(
        home.path(),
        &["status", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    let e = stderr(&o);
    let file = state.join("admin.token");
    assert!(
        e.contains(&format!("the admin token file {}", file.display())),
        "{e}"
    );
    assert!(e.contains("--config"), "{e}");

    // No token file at all.
    std::fs::remove_file(&file).unwrap();
    let o = hall(
        home.path(),
        &["status"],
        &[("HALL_CONFIG", cfg.to_str().unwrap())],
    );
    assert_eq!(o.status.code(), Some(3), "{}", out(&o));
    let e = stderr(&o);
    assert!(
        e.contains(&format!("{} does not exist", file.display())),
        "{e}"
    );
    assert!(e.contains("HALL_TOKEN is unset"), "{e}");
}

#[test]
fn the_admin_token_file_is_never_sent_to_another_machine() {
    let home = tempfile::tempdir().unwrap();
    let state = home.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("admin.token"), "hall_secret_admin\n").unwrap();
    let cfg = home.path().join("hall.toml");
    std::fs::write(&cfg, format!("state_dir = \"{}\"\n", state.display())).unwrap();
    let o = hall(
        home.path(),
        &["status", "--url", "http://192.0.2.1:8765"],
        &[("HALL_CONFIG", cfg.to_str().unwrap())],
    );
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    let e = stderr(&o);
    assert!(e.contains("refusing to send the admin token"), "{e}");
    assert!(
        !e.contains("hall_secret_admin"),
        "never print the token: {e}"
    );
}

#[test]
fn audit_verify_and_export_work_offline_on_a_copied_state_dir() {
    let mut d = Daemon::start();
    for t in ["org.acme", "org.nobody"] {
        d.route("cap.doc.summarize", "dev", "PUBLIC", t);
    }
    let home = tempfile::tempdir().unwrap();
    // While it runs, its state dir is locked: a clear error, not a hang or a corruption.
    let running = d.state_dir();
    let o = hall(
        home.path(),
        &["audit", "verify", "--state-dir", running.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        stderr(&o).contains("in use by a running daemon"),
        "{}",
        out(&o)
    );

    assert!(d.stop().success());
    let copy = home.path().join("copy");
    let st = Command::new("cp")
        .arg("-a")
        .arg(d.state_dir())
        .arg(&copy)
        .status()
        .unwrap();
    assert!(st.success());
    let o = hall(
        home.path(),
        &[
            "audit",
            "verify",
            "--json",
            "--state-dir",
            copy.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    // The admin token issue, the startup reload and two decisions at least.
    assert!(v["entries"].as_u64().unwrap() >= 4, "{v}");

    let o = hall(
        home.path(),
        &["audit", "export", "--state-dir", copy.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, v["entries"].as_u64().unwrap());
    assert!(lines.iter().any(|r| r["tenant_id"] == "org.nobody"));

    // Not a state dir: a usage error that says what is missing.
    let o = hall(
        home.path(),
        &[
            "audit",
            "verify",
            "--state-dir",
            home.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(stderr(&o).contains("holds no audit log"), "{}", out(&o));
}

#[test]
fn did_you_mean_for_capability_env_scope_and_config_key() {
    let home = tempfile::tempdir().unwrap();
    let repo = common::repo();
    let files = [
        "--registry",
        repo.join("registry").to_str().unwrap().to_string().leak(),
        "--policies",
        repo.join("policies").to_str().unwrap().to_string().leak(),
    ];
    let offline = |cap: &str, env: &str| {
        let mut args = vec![
            "route",
            "--offline",
            "--capability",
            cap,
            "--env",
            env,
            "--label",
            "PUBLIC",
            "--tenant",
            "org.acme",
        ];
        args.extend_from_slice(&files);
        hall(home.path(), &args, &[])
    };
    let o = offline("cap.doc.summarise", "dev");
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        stderr(&o).contains("did you mean \"cap.doc.summarize\""),
        "{}",
        out(&o)
    );
    let o = offline("cap.doc.summarize", "prdo");
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(stderr(&o).contains("did you mean \"prod\""), "{}", out(&o));

    // Scope: refused before anything is sent.
    let o = hall(
        home.path(),
        &["token", "create", "--name", "x", "--scope", "rout"],
        &[("HALL_URL", "http://127.0.0.1:9"), ("HALL_TOKEN", "x")],
    );
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(stderr(&o).contains("did you mean \"route\""), "{}", out(&o));

    // A config key.
    let cfg = home.path().join("hall.toml");
    std::fs::write(&cfg, "lisen = \"127.0.0.1:1\"\n").unwrap();
    let o = hall(
        home.path(),
        &["status", "--config", cfg.to_str().unwrap()],
        &[],
    );
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));
    assert!(stderr(&o).contains("did you mean `listen`"), "{}", out(&o));
}

#[test]
fn the_daemon_route_suggests_a_capability_and_prints_a_table_free_decision() {
    let d = Daemon::start();
    let home = tempfile::tempdir().unwrap();
    let url = format!("http://{}", d.addr);
    let token = d.admin_token().unwrap();
    let o = hall(
        home.path(),
        &[
            "route",
            "--capability",
            "cap.doc.summarise",
            "--env",
            "dev",
            "--label",
            "PUBLIC",
            "--tenant",
            "org.acme",
            "--context",
            "{\"ticket\":\"T-1\"}",
            "--qos-class",
            "batch",
            "--tenant-risk",
            "low",
        ],
        &[("HALL_URL", &url), ("HALL_TOKEN", &token)],
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    assert!(
        stderr(&o).contains("did you mean \"cap.doc.summarize\""),
        "{}",
        out(&o)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["deny_reason"], "unknown_capability");
}

#[test]
fn check_suggests_keys_and_workers_and_shows_a_caret_under_a_syntax_error() {
    let home = tempfile::tempdir().unwrap();
    common::copy_dir(
        &common::repo().join("registry"),
        &home.path().join("registry"),
    );
    common::copy_dir(
        &common::repo().join("policies"),
        &home.path().join("policies"),
    );
    let extra = home.path().join("policies/90-typos.toml");
    std::fs::write(
        &extra,
        "[[rule]]\nid = \"typo\"\ntenant = [\"org.acme\"]\neffect = \"allow\"\n",
    )
    .unwrap();
    let o = hall(home.path(), &["check"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(text.contains("did you mean `tenants`?"), "{text}");
    assert!(
        stderr(&o).contains(&format!(
            "checking registry {}, policies {}",
            home.path().join("registry").display(),
            home.path().join("policies").display()
        )),
        "names the paths it read: {}",
        out(&o)
    );

    std::fs::write(
        &extra,
        "[[rule]]\nid = \"typo\"\nworkers = [\"worker.doc.sumarize\"]\nenvs = [\"prdo\"]\neffect = \"allow\"\n",
    )
    .unwrap();
    let o = hall(home.path(), &["check"], &[]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.contains("did you mean \"worker.doc.summarize\"?"),
        "{text}"
    );
    assert!(text.contains("did you mean \"prod\"?"), "{text}");

    std::fs::write(&extra, "[[rule]\nid = \"x\"\n").unwrap();
    let o = hall(home.path(), &["check"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        text.contains("policies/90-typos.toml:1:7: error:"),
        "{text}"
    );
    assert!(
        text.contains("1 | [[rule]\n  |       ^\n"),
        "the line and a caret under column 7: {text}"
    );

    // --format json: every diagnostic as data.
    let o = hall(home.path(), &["check", "--format", "json"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["ok"], false);
    assert_eq!(v["diagnostics"][0]["line"], 1);
    assert_eq!(v["diagnostics"][0]["col"], 7);
}

#[test]
fn completions_and_the_man_page_are_generated_from_the_flags() {
    let home = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish"] {
        let o = hall(home.path(), &["completions", shell], &[]);
        assert_eq!(o.status.code(), Some(0), "{}", out(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.contains("capability"), "{shell}: {text}");
        assert!(text.contains("approval-id"), "{shell}: {text}");
    }
    let o = hall(home.path(), &["completions", "tcsh"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", out(&o));

    let o = hall(home.path(), &["man"], &[]);
    assert_eq!(o.status.code(), Some(0), "{}", out(&o));
    let roff = String::from_utf8_lossy(&o.stdout);
    assert!(
        roff.starts_with(".ie") || roff.contains(".TH hall 1"),
        "{roff}"
    );
    for want in [
        "HALL ROUTE",
        "HALL TOKEN CREATE",
        "HALL AUDIT VERIFY",
        "HALL_LISTEN",
        "Exit codes",
    ] {
        assert!(roff.contains(want), "man page lacks {want:?}");
    }
}

#[test]
fn explain_names_the_values_that_failed() {
    let home = tempfile::tempdir().unwrap();
    let repo = common::repo();
    let (reg, pol) = (repo.join("registry"), repo.join("policies"));
    let o = hall(
        home.path(),
        &[
            "route",
            "--offline",
            "--explain",
            "--json",
            "--registry",
            reg.to_str().unwrap(),
            "--policies",
            pol.to_str().unwrap(),
            "--capability",
            "cap.code.deploy",
            "--env",
            "dev",
            "--label",
            "INTERNAL",
            "--tenant",
            "org.acme",
        ],
        &[],
    );
    assert_eq!(o.status.code(), Some(1), "{}", out(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let whys: Vec<&str> = v["explain"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .chain(v["explain"]["candidates"].as_array().unwrap())
        .filter_map(|x| x["why"].as_str())
        .collect();
    assert!(whys.contains(&"env dev not in [prod]"), "{whys:?}");
    assert!(whys.contains(&"env dev not in [staging, prod]"), "{whys:?}");
    assert!(whys.contains(&"blast radius 8 > 5"), "{whys:?}");
}

#[test]
fn audit_tail_follow_prints_new_records_as_they_come() {
    let d = Daemon::start();
    let home = tempfile::tempdir().unwrap();
    let url = format!("http://{}", d.addr);
    let token = d.admin_token().unwrap();
    let mut child = Command::new(HALL)
        .args(["audit", "tail", "-f", "-n", "1", "--json"])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join(".config"))
        .env("HALL_URL", &url)
        .env("HALL_TOKEN", &token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The newest existing record first, then what is written while it follows.
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("a first record");
    assert!(first.contains("\"seq\""), "{first}");
    d.route("cap.doc.summarize", "dev", "PUBLIC", "org.followed");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut seen = false;
    while std::time::Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            if line.contains("org.followed") {
                seen = true;
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen, "tail -f did not print the new decision");
}

#[test]
fn a_start_that_fails_on_a_busy_port_writes_nothing_to_the_audit_log() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    common::copy_dir(
        &common::repo().join("registry"),
        &dir.path().join("registry"),
    );
    common::copy_dir(
        &common::repo().join("policies"),
        &dir.path().join("policies"),
    );
    let p = dir.path();
    let o = Command::new(HALL)
        .arg("serve")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--state-dir")
        .arg(p.join("state"))
        .arg("--registry")
        .arg(p.join("registry"))
        .arg("--policies")
        .arg(p.join("policies"))
        .env("HALL_KEYRING", "off")
        .env("XDG_CONFIG_HOME", p.join("xdg"))
        .env_remove("HALL_CONFIG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!o.status.success(), "{}", out(&o));
    assert!(
        stderr(&o).contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{}",
        out(&o)
    );
    let state = dir.path().join("state");
    assert!(
        !state.join("db").exists(),
        "no database, so no audit record, was written"
    );
    assert!(!state.join("admin.token").exists(), "no admin token issued");
    drop(busy);
}

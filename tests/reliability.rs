//! End-to-end reliability: every way policy files are deployed reloads, a file that cannot be
//! read safely is an error that keeps the last good set, an existing state dir is never
//! chmod'ed, a log cut short by storage damage is detected against its checkpoint, and a full
//! disk heals without a restart. Every wait polls against a deadline.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{serve_command, Daemon};

const WAIT: Duration = Duration::from_secs(20);
const BLOCK: &str = r#"
[[rule]]
id = "test-block"
capabilities = ["cap.doc.summarize"]
tenants = ["org.acme"]
effect = "deny"
reason = "blocked_by_test"
"#;

/// The deny reason (or "allowed") for the request every test here uses.
fn outcome(d: &Daemon) -> String {
    let v = d
        .route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
        .json();
    if v["allowed"] == true {
        "allowed".into()
    } else {
        v["deny_reason"].as_str().unwrap_or("?").to_string()
    }
}

fn wait_outcome(d: &Daemon, want: &str) {
    d.wait_until(WAIT, || outcome(d) == want);
}

fn status(d: &Daemon) -> serde_json::Value {
    let r = d.get("/api/status");
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn copy_tree(from: &Path, to: &Path) {
    common::copy_dir(from, to);
}

fn mkfifo(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

// ---- finding 4: a dangling symlink ---------------------------------------------------

#[test]
fn a_dangling_symlink_is_an_error_that_keeps_the_last_good_set() {
    let d = Daemon::start();
    // Its rules must not silently vanish: the guardrail file becomes a dangling link.
    let guard = d.policies().join("10-guardrails.toml");
    std::fs::rename(&guard, d.dir.path().join("guardrails.bak")).unwrap();
    std::os::unix::fs::symlink(d.dir.path().join("gone/10-guardrails.toml"), &guard).unwrap();
    let r = d.post_json("/api/reload", "{}");
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("dangling symlink"), "{}", r.body);
    // The guardrail still holds: SECRET egress denied.
    let v = d
        .route("cap.web.search", "dev", "SECRET", "org.acme")
        .json();
    assert_eq!(v["deny_reason"], "secret_data_egress", "{v}");
    assert_eq!(status(&d)["last_reload"]["ok"], false);
}

// ---- finding 5: a FIFO ---------------------------------------------------------------

#[test]
fn a_fifo_named_toml_is_an_error_and_never_wedges_reload_or_shutdown() {
    let mut d = Daemon::start();
    let before = status(&d)["policy_version"].clone();
    mkfifo(&d.policies().join("50-pipe.toml"));
    let t = Instant::now();
    let r = d.post_json("/api/reload", "{}");
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.body.contains("named pipe"), "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert_eq!(status(&d)["policy_version"], before);
    // SIGHUP still works (the reload lock is free) and so does SIGTERM.
    d.signal(libc::SIGHUP);
    std::fs::remove_file(d.policies().join("50-pipe.toml")).unwrap();
    d.wait_until(WAIT, || status(&d)["last_reload"]["ok"] == true);
    assert!(d.stop().success());
}

// ---- finding 6: the state dir ----------------------------------------------------------

/// Run `hall serve` on `state` until it is listening (`Ok`) or exits (`Err(stderr)`).
fn try_serve(dir: &Path, state: &Path) -> Result<(), String> {
    let mut child = Command::new(common::HALL)
        .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
        .arg(state)
        .arg("--registry")
        .arg(dir.join("registry"))
        .arg("--policies")
        .arg(dir.join("policies"))
        .env("HALL_KEYRING", "off")
        .env_remove("HALL_CONFIG")
        .env_remove("HALL_MASTER_KEY_FILE")
        .env_remove("NOTIFY_SOCKET")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(_s) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return Err(err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
        // Listening means it accepted the dir: the token file is written before that.
        if state.join("admin.token").exists() {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
    }
}

#[test]
fn an_existing_shared_state_dir_is_refused_and_never_chmoded() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    copy_tree(
        &common::repo().join("registry"),
        &dir.path().join("registry"),
    );
    copy_tree(
        &common::repo().join("policies"),
        &dir.path().join("policies"),
    );
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let err = try_serve(dir.path(), &shared).expect_err("a 1777 state dir must be refused");
    assert!(err.contains("writable by other users"), "{err}");
    let mode = std::fs::metadata(&shared).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o1777, "the shared dir was chmod'ed");
    assert!(std::fs::read_dir(&shared).unwrap().next().is_none());

    // A private dir the user made is used as it is; a missing one is created 0700.
    let own = dir.path().join("own");
    std::fs::create_dir(&own).unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o750)).unwrap();
    try_serve(dir.path(), &own).unwrap();
    assert_eq!(
        std::fs::metadata(&own).unwrap().permissions().mode() & 0o7777,
        0o750
    );
    let fresh = dir.path().join("fresh/state");
    try_serve(dir.path(), &fresh).unwrap();
    assert_eq!(
        std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o7777,
        0o700
    );
}

// ---- finding 3: hot reload follows the path --------------------------------------------

#[test]
fn a_replaced_policies_dir_keeps_reloading() {
    let d = Daemon::start();
    assert_eq!(outcome(&d), "allowed");
    let p = d.policies();
    let old = d.dir.path().join("policies.old");
    // What a new user does: move the dir away and copy it back.
    std::fs::rename(&p, &old).unwrap();
    copy_tree(&old, &p);
    d.wait_until(WAIT, || {
        status(&d)["watch"]["rewatched"].as_u64() >= Some(1)
    });
    // An edit in the new dir is loaded.
    std::fs::write(p.join("05-block.toml"), BLOCK).unwrap();
    wait_outcome(&d, "blocked_by_test");
    // And the old one no longer matters.
    std::fs::write(old.join("06-other.toml"), "garbage = [").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(status(&d)["last_reload"]["ok"], true);
    assert_eq!(status(&d)["watch"]["ok"], true);
    assert!(d.get("/metrics").body.contains("hall_watch_ok 1"));
}

#[test]
fn a_removed_and_recreated_policies_dir_keeps_reloading() {
    let d = Daemon::start();
    let p = d.policies();
    let keep = tempfile::tempdir().unwrap();
    copy_tree(&p, keep.path());
    std::fs::remove_dir_all(&p).unwrap();
    // Gone: the last good set stays, and status says the watch is broken.
    d.wait_until(WAIT, || status(&d)["watch"]["ok"] == false);
    assert_eq!(outcome(&d), "allowed");
    copy_tree(keep.path(), &p);
    d.wait_until(WAIT, || status(&d)["watch"]["ok"] == true);
    std::fs::write(p.join("05-block.toml"), BLOCK).unwrap();
    wait_outcome(&d, "blocked_by_test");
}

#[test]
fn an_atomically_swapped_symlink_is_followed() {
    // policies -> releases/v1, then re-pointed at releases/v2 with a rename (ln -sfn + mv -T).
    let d = Daemon::builder()
        .setup(|p| {
            let rel = p.join("releases");
            std::fs::create_dir(&rel).unwrap();
            std::fs::rename(p.join("policies"), rel.join("v1")).unwrap();
            std::os::unix::fs::symlink(rel.join("v1"), p.join("policies")).unwrap();
        })
        .start();
    assert_eq!(outcome(&d), "allowed");
    let rel = d.dir.path().join("releases");
    copy_tree(&rel.join("v1"), &rel.join("v2"));
    std::fs::write(rel.join("v2/05-block.toml"), BLOCK).unwrap();
    let tmp = d.dir.path().join("policies.tmp");
    std::os::unix::fs::symlink(rel.join("v2"), &tmp).unwrap();
    std::fs::rename(&tmp, d.policies()).unwrap();
    wait_outcome(&d, "blocked_by_test");
    // Later edits in v2 are seen too.
    std::fs::remove_file(rel.join("v2/05-block.toml")).unwrap();
    wait_outcome(&d, "allowed");
}

#[test]
fn a_configmap_style_data_symlink_swap_is_followed() {
    // Kubernetes: dir/..data -> ..2026_1, dir/x.toml -> ..data/x.toml; an update writes
    // ..2026_2, points ..data_tmp at it, renames it over ..data and removes ..2026_1.
    let d = Daemon::builder()
        .setup(|p| {
            let pol = p.join("policies");
            let v1 = pol.join("..2026_1");
            std::fs::create_dir(&v1).unwrap();
            for e in std::fs::read_dir(&pol).unwrap() {
                let e = e.unwrap();
                if e.file_type().unwrap().is_file() {
                    let name = e.file_name();
                    std::fs::rename(e.path(), v1.join(&name)).unwrap();
                    std::os::unix::fs::symlink(Path::new("..data").join(&name), pol.join(&name))
                        .unwrap();
                }
            }
            std::os::unix::fs::symlink("..2026_1", pol.join("..data")).unwrap();
        })
        .start();
    assert_eq!(outcome(&d), "allowed");
    let pol = d.policies();
    let (v1, v2) = (pol.join("..2026_1"), pol.join("..2026_2"));
    copy_tree(&v1, &v2);
    // An edit to an existing key: the docs rule now denies.
    let docs = std::fs::read_to_string(v2.join("20-docs.toml")).unwrap();
    std::fs::write(v2.join("20-docs.toml"), format!("{BLOCK}\n{docs}")).unwrap();
    std::os::unix::fs::symlink("..2026_2", pol.join("..data_tmp")).unwrap();
    std::fs::rename(pol.join("..data_tmp"), pol.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    wait_outcome(&d, "blocked_by_test");
    assert_eq!(status(&d)["last_reload"]["ok"], true);
}

#[test]
fn a_git_checkout_of_many_files_loads_the_final_set() {
    let git = |dir: &Path, args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output();
        match out {
            Ok(o) if o.status.success() => true,
            Ok(o) => panic!("git {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
            Err(_) => false,
        }
    };
    let d = Daemon::start();
    let root = d.dir.path();
    if !git(root, &["--version"]) {
        eprintln!("SKIPPED: git is not installed");
        return;
    }
    std::fs::write(root.join(".gitignore"), "state/\n").unwrap();
    git(root, &["init", "-q", "-b", "main"]);
    git(root, &["add", "-A"]);
    git(root, &["commit", "-qm", "a"]);
    git(root, &["checkout", "-qb", "b"]);
    // Branch b: a new worker in the registry and 30 policy files, one of which needs it.
    std::fs::write(
        root.join("registry/zz-extra.toml"),
        "[[worker]]\nid = \"worker.extra\"\ncapabilities = [\"cap.doc.summarize\"]\n\
         environments = [\"dev\"]\nmax_data_label = \"SECRET\"\nblast_radius = 1\n",
    )
    .unwrap();
    std::fs::write(
        root.join("policies/05-extra.toml"),
        "[[rule]]\nid = \"extra\"\ncapabilities = [\"cap.doc.summarize\"]\ntenants = [\"org.acme\"]\n\
         effect = \"deny\"\nreason = \"blocked_by_test\"\nworkers = [\"worker.extra\"]\n",
    )
    .unwrap();
    for i in 0..30 {
        std::fs::write(
            root.join(format!("policies/6{i:02}-filler.toml")),
            format!("[[rule]]\nid = \"filler-{i}\"\ncapabilities = [\"cap.none.{i}\"]\neffect = \"deny\"\n"),
        )
        .unwrap();
    }
    git(root, &["add", "-A"]);
    git(root, &["commit", "-qm", "b"]);
    wait_outcome(&d, "blocked_by_test");
    git(root, &["checkout", "-q", "main"]);
    wait_outcome(&d, "allowed");
    git(root, &["checkout", "-q", "b"]);
    wait_outcome(&d, "blocked_by_test");
    let s = status(&d);
    assert_eq!(s["last_reload"]["ok"], true, "{s}");
}

/// While git holds its index lock (checkout, pull, reset are writing files) nothing is
/// loaded; once it lets go, the final set loads in one reload.
#[test]
fn a_half_written_git_checkout_is_never_loaded() {
    let d = Daemon::start();
    let root = d.dir.path();
    let git_dir = root.join(".git");
    std::fs::create_dir(&git_dir).unwrap();
    let v0 = status(&d)["policy_version"].clone();
    let reloads = |d: &Daemon| {
        d.get("/api/audit?kind=reload&limit=1000").json()["records"]
            .as_array()
            .map_or(0, |a| a.len())
    };
    let before = reloads(&d);
    // Mid-checkout: the policy that needs a new worker is written, the registry file not yet.
    std::fs::write(git_dir.join("index.lock"), "").unwrap();
    std::fs::write(
        root.join("policies/05-extra.toml"),
        "[[rule]]\nid = \"extra\"\ncapabilities = [\"cap.doc.summarize\"]\ntenants = [\"org.acme\"]\n\
         effect = \"deny\"\nreason = \"blocked_by_test\"\nworkers = [\"worker.extra\"]\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(600));
    let s = status(&d);
    assert_eq!(s["policy_version"], v0, "{s}");
    assert_eq!(
        s["last_reload"]["ok"], true,
        "a half checkout was loaded: {s}"
    );
    std::fs::write(
        root.join("registry/zz-extra.toml"),
        "[[worker]]\nid = \"worker.extra\"\ncapabilities = [\"cap.doc.summarize\"]\n\
         environments = [\"dev\"]\nmax_data_label = \"SECRET\"\nblast_radius = 1\n",
    )
    .unwrap();
    std::fs::remove_file(git_dir.join("index.lock")).unwrap();
    wait_outcome(&d, "blocked_by_test");
    assert_eq!(status(&d)["last_reload"]["ok"], true);
    // One reload for the whole checkout (plus at most one the rescan may add).
    let after = reloads(&d);
    assert!((1..=2).contains(&(after - before)), "{before} -> {after}");
}

#[test]
fn editor_saves_reload() {
    let d = Daemon::start();
    let f = d.policies().join("20-docs.toml");
    let docs = std::fs::read_to_string(&f).unwrap();
    // vim: write a probe file, move the original to a backup, write anew, drop the backup.
    let probe = d.policies().join("4913");
    std::fs::write(&probe, "").unwrap();
    std::fs::remove_file(&probe).unwrap();
    let backup = d.policies().join("20-docs.toml~");
    std::fs::rename(&f, &backup).unwrap();
    std::fs::write(&f, format!("{BLOCK}\n{docs}")).unwrap();
    std::fs::remove_file(&backup).unwrap();
    wait_outcome(&d, "blocked_by_test");
    // Most GUI editors: write a temp file and rename it over the original.
    let tmp = d.policies().join(".20-docs.toml.swp");
    std::fs::write(&tmp, &docs).unwrap();
    std::fs::rename(&tmp, &f).unwrap();
    wait_outcome(&d, "allowed");
}

// ---- finding 1: a log cut short -------------------------------------------------------

fn verify(d: &Daemon) -> serde_json::Value {
    let r = d.get("/api/audit/verify");
    assert_eq!(r.status, 200, "verify must answer, not fail: {}", r.body);
    r.json()
}

fn decisions(d: &Daemon, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| {
            let v = d
                .route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
                .json();
            v["decision_id"].as_str().unwrap().to_string()
        })
        .collect()
}

fn read_checkpoint(d: &Daemon) -> serde_json::Value {
    let text = std::fs::read_to_string(d.state_dir().join("audit.checkpoint")).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn a_log_shorter_than_its_checkpoint_is_refused_then_reported_when_accepted() {
    let mut d = Daemon::start();
    decisions(&d, 20);
    let head = status(&d)["audit"]["seq"].as_u64().unwrap();
    assert!(d.stop().success());
    let cp = read_checkpoint(&d);
    assert_eq!(
        cp["seq"].as_u64(),
        Some(head),
        "clean shutdown checkpoints the head: {cp}"
    );

    // What sled's recovery does to a damaged tail: the log ends earlier than it did. Here
    // the checkpoint is moved ahead instead, which the open cannot tell apart.
    let mut cp2 = cp.clone();
    cp2["seq"] = serde_json::json!(head + 7);
    std::fs::write(d.state_dir().join("audit.checkpoint"), cp2.to_string()).unwrap();
    let dir = d.into_dir();
    let out = serve_command(dir.path()).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let missing = format!("seqs {}..={}", head + 1, head + 7);
    assert!(err.contains(&missing), "{err}");
    assert!(err.contains("--accept-audit-truncation"), "{err}");

    // Acknowledged: it starts, and status and verify say what is missing, across restarts.
    let args = ["--accept-audit-truncation".to_string()];
    let mut d = Daemon::spawn(dir, &args, &[], true);
    let lost = &status(&d)["audit_integrity"]["lost"];
    assert_eq!(lost[0]["from_seq"].as_u64(), Some(head + 1), "{lost}");
    assert_eq!(lost[0]["to_seq"].as_u64(), Some(head + 7), "{lost}");
    let v = verify(&d);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["first_bad_seq"].as_u64(), Some(head + 1), "{v}");
    decisions(&d, 3);
    assert!(d.stop().success());
    let d = Daemon::spawn(d.into_dir(), &[], &[], true);
    assert_eq!(verify(&d)["first_bad_seq"].as_u64(), Some(head + 1));
    assert_eq!(
        status(&d)["audit_integrity"]["lost"][0]["to_seq"].as_u64(),
        Some(head + 7)
    );
}

#[test]
fn a_state_dir_without_a_checkpoint_opens_and_gets_one() {
    let mut d = Daemon::start();
    decisions(&d, 5);
    assert!(d.stop().success());
    std::fs::remove_file(d.state_dir().join("audit.checkpoint")).unwrap();
    let d = Daemon::spawn(d.into_dir(), &[], &[], true);
    assert_eq!(verify(&d)["ok"], true);
    let head = status(&d)["audit"]["seq"].as_u64().unwrap();
    d.wait_until(WAIT, || read_checkpoint(&d)["seq"].as_u64() == Some(head));
}

/// `kill -9` under load never makes the checkpoint claim more than sled kept: the restart
/// needs no flag and verifies, in both durability modes.
#[test]
fn kill_9_under_load_never_trips_the_checkpoint() {
    for mode in ["durable", "batched"] {
        let d = Daemon::builder()
            .arg("--audit-durability")
            .arg(mode)
            .start();
        let (addr, headers) = (d.addr, {
            let mut h = d.default_headers();
            h.push(("Content-Type".into(), "application/json".into()));
            h
        });
        let body = r#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (headers, stop) = (headers.clone(), stop.clone());
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = common::raw_request(
                            addr,
                            "POST",
                            "/api/route",
                            &headers,
                            Some(body.as_bytes()),
                        );
                        if r.is_err() {
                            break;
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(1500));
        let dir = d.into_dir(); // kill -9 mid-load
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        let cp = serde_json::from_str::<serde_json::Value>(
            &std::fs::read_to_string(dir.path().join("state/audit.checkpoint")).unwrap(),
        )
        .unwrap();
        assert!(cp["seq"].as_u64().unwrap() > 10, "{mode}: {cp}");
        let mut d = Daemon::spawn(dir, &["--audit-durability".into(), mode.into()], &[], true);
        let v = verify(&d);
        assert_eq!(v["ok"], true, "{mode}: {v}");
        assert!(
            status(&d)["audit"]["seq"].as_u64() >= cp["seq"].as_u64(),
            "{mode}"
        );
        assert!(d.stop().success());
    }
}

/// Damage the end of sled's file after a `kill -9`: whatever sled's recovery makes of it,
/// the daemon never starts with acknowledged decisions missing and `verify` saying ok.
#[test]
fn a_zeroed_tail_after_kill_9_never_passes_silently() {
    let d = Daemon::start();
    let ids = decisions(&d, 400);
    // Let the checkpoint catch up with the acknowledged head (it lags by at most 100 ms).
    let head = status(&d)["audit"]["seq"].as_u64().unwrap();
    d.wait_until(WAIT, || read_checkpoint(&d)["seq"].as_u64() == Some(head));
    let dir = d.into_dir(); // kill -9
    let db = dir.path().join("state/db/db");
    let len = std::fs::metadata(&db).unwrap().len();
    let zero = len.min(64 * 1024);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        f.seek(SeekFrom::Start(len - zero)).unwrap();
        f.write_all(&vec![0u8; zero as usize]).unwrap();
        f.sync_all().unwrap();
    }
    let out = serve_command(dir.path())
        .spawn()
        .and_then(|mut c| {
            // Either it refuses at once, or it starts: give it a moment, then look.
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Some(s) = c.try_wait()? {
                    return Ok(Some((s, c)));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
            Ok(None)
        })
        .unwrap();
    match out {
        Some((s, mut c)) => {
            // Refused: it must say why.
            assert!(!s.success());
            let mut err = String::new();
            use std::io::Read;
            c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            assert!(
                err.contains("audit log lost records") || err.contains("cannot open"),
                "{err}"
            );
            eprintln!("refused to start after the damage: {err}");
        }
        None => {
            // It started: then nothing acknowledged may be missing while verify says ok.
            let d = Daemon::spawn(dir, &[], &[], true);
            let v = verify(&d);
            eprintln!("started after the damage; verify: {v}");
            let missing = ids
                .iter()
                .filter(|id| d.get(&format!("/api/audit/{id}")).status != 200)
                .count();
            assert!(
                missing == 0 || v["ok"] == false,
                "{missing} acknowledged decisions are gone and verify says {v}"
            );
        }
    }
}

/// A flipped byte anywhere in sled's file: `verify` answers (200, ok or not, naming a seq),
/// never 500, and never ok while acknowledged decisions are missing.
#[test]
fn a_flipped_byte_makes_verify_answer_never_fail() {
    let mut d = Daemon::start();
    let ids = decisions(&d, 300);
    assert!(d.stop().success());
    let mut dir = d.into_dir();
    let db = dir.path().join("state/db/db");
    let len = std::fs::metadata(&db).unwrap().len();
    for at in [len / 4, len / 2, len - len / 8] {
        {
            use std::io::{Read, Seek, SeekFrom, Write};
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&db)
                .unwrap();
            let mut b = [0u8; 1];
            f.seek(SeekFrom::Start(at)).unwrap();
            f.read_exact(&mut b).unwrap();
            f.seek(SeekFrom::Start(at)).unwrap();
            f.write_all(&[b[0] ^ 0x20]).unwrap();
            f.sync_all().unwrap();
        }
        let mut c = serve_command(dir.path())
            .arg("--accept-audit-truncation")
            .spawn()
            .unwrap();
        let t = Instant::now();
        let mut exited = None;
        while t.elapsed() < Duration::from_secs(3) {
            if let Some(s) = c.try_wait().unwrap() {
                exited = Some(s);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        if exited.is_some() {
            eprintln!("byte {at}: sled refused to open the damaged file");
            continue;
        }
        let mut d = Daemon::spawn(dir, &["--accept-audit-truncation".into()], &[], true);
        let v = verify(&d);
        let missing = ids
            .iter()
            .filter(|id| d.get(&format!("/api/audit/{id}")).status != 200)
            .count();
        eprintln!("byte {at}: verify {v}, {missing} missing");
        assert!(
            missing == 0 || v["ok"] == false,
            "{missing} gone, verify {v}"
        );
        assert!(
            v["ok"] == true || v["first_bad_seq"].as_u64().is_some(),
            "{v}"
        );
        d.stop();
        dir = d.into_dir();
    }
}

// ---- finding 2: a full disk heals ------------------------------------------------------

struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_full_disk_is_503_and_heals_without_a_restart() {
    let probe = tempfile::tempdir().unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs"])
        .arg(probe.path())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    }
    let _ = Command::new("umount").arg(probe.path()).status();

    let d = Daemon::builder()
        .setup(|p| {
            let state = p.join("state");
            std::fs::create_dir(&state).unwrap();
            let s = Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs"])
                .arg(&state)
                .status()
                .unwrap();
            assert!(s.success());
        })
        .start();
    let _mount = Mount(d.state_dir());
    let pid = d.child.id();
    let filler = d.state_dir().join("filler");
    let mut acked = decisions(&d, 5);
    // Fill the disk.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![1u8; 1 << 20];
        while f.write_all(&chunk).is_ok() {}
        let one = [1u8; 4096];
        while f.write_all(&one).is_ok() {}
        let _ = f.sync_all();
    }
    // Fail closed: routes answer 503 once sled hits the wall (answered ones were recorded).
    let mut refused = false;
    for _ in 0..20_000 {
        let r = d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme");
        if r.status == 200 {
            acked.push(r.json()["decision_id"].as_str().unwrap().to_string());
            continue;
        }
        r.assert_error(503, "unavailable", None);
        refused = true;
        break;
    }
    assert!(refused, "the full disk was never noticed");
    assert_eq!(d.get("/ready").status, 503);
    let s = status(&d);
    assert_eq!(s["storage"]["ok"], false, "{s}");
    assert!(d.get("/metrics").body.contains("hall_storage_ok 0"));
    assert!(s["storage"]["error"].as_str().is_some(), "{s}");
    // Other write endpoints: 503 too, never 500.
    let r = d.post_json(
        "/api/tokens",
        r#"{"name":"during-full","scopes":["route"]}"#,
    );
    r.assert_error(503, "unavailable", None);
    let mut h = d.default_headers();
    h.push(("Content-Type".into(), "application/json".into()));
    let r = d.request(
        "PUT",
        "/api/secrets/full_disk",
        &h,
        Some(br#"{"value":"x"}"#),
    );
    r.assert_error(503, "unavailable", None);

    // Space returns: it serves again, same process, same address, no operator.
    std::fs::remove_file(&filler).unwrap();
    d.wait_until(Duration::from_secs(30), || {
        common::raw_request(d.addr, "GET", "/ready", &d.default_headers(), None)
            .is_ok_and(|r| r.status == 200)
    });
    assert_eq!(d.child.id(), pid);
    acked.extend(decisions(&d, 5));
    let r = d.post_json("/api/tokens", r#"{"name":"after-full","scopes":["route"]}"#);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(verify(&d)["ok"], true);
    let missing: Vec<_> = acked
        .iter()
        .filter(|id| d.get(&format!("/api/audit/{id}")).status != 200)
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged but not recorded: {missing:?}"
    );
    assert_eq!(status(&d)["storage"]["ok"], true);
}

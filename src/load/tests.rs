//! Loading from directories: file selection, lexical order, and the policy version.

use std::fs;
use std::path::Path;

use super::*;
use crate::engine::{decide, Request, Snapshot};

const REG: &str = "[[capability]]\nid = \"cap.a\"\n\n[[worker]]\nid = \"w.a\"\ncapabilities = [\"cap.a\"]\nenvironments = [\"dev\"]\nmax_data_label = \"PUBLIC\"\nblast_radius = 0\n";

fn write(dir: &Path, name: &str, text: &str) {
    fs::write(dir.join(name), text).unwrap();
}

fn dirs() -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let reg = tmp.path().join("registry");
    let pol = tmp.path().join("policies");
    fs::create_dir(&reg).unwrap();
    fs::create_dir(&pol).unwrap();
    write(&reg, "reg.toml", REG);
    (tmp, reg, pol)
}

fn rule_for(l: &Loaded) -> Option<String> {
    let r = Request {
        capability_id: "cap.a",
        env: "dev",
        data_label: "PUBLIC",
        tenant_id: "t",
    };
    decide(&l.snapshot, &r, false)
        .unwrap()
        .rule_id
        .map(String::from)
}

#[test]
fn policy_files_are_read_in_lexical_order_whatever_the_creation_order() {
    let (_tmp, reg, pol) = dirs();
    // Created in the "wrong" order on purpose; names decide.
    write(
        &pol,
        "20-late.toml",
        "[[rule]]\nid = \"late\"\neffect = \"allow\"\n",
    );
    write(
        &pol,
        "10-early.toml",
        "[[rule]]\nid = \"early\"\neffect = \"deny\"\n",
    );
    write(
        &pol,
        "9-nine.toml",
        "[[rule]]\nid = \"nine\"\neffect = \"deny\"\n",
    );
    let l = load_dirs(&reg, &pol).unwrap();
    // Lexical, not numeric: "10-" < "20-" < "9-".
    let ids: Vec<&str> = l.snapshot.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["early", "late", "nine"]);
    assert_eq!(rule_for(&l).as_deref(), Some("early"));
    let files: Vec<String> = l
        .snapshot
        .files
        .iter()
        .map(|f| {
            Path::new(f)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        files,
        ["reg.toml", "10-early.toml", "20-late.toml", "9-nine.toml"]
    );
}

#[test]
fn only_visible_toml_files_are_read() {
    let (_tmp, reg, pol) = dirs();
    write(
        &pol,
        "10-rule.toml",
        "[[rule]]\nid = \"real\"\neffect = \"allow\"\n",
    );
    // Editor leftovers and notes must not be loaded (they would not even parse).
    write(&pol, ".#10-rule.toml", "garbage [[[");
    write(&pol, "10-rule.toml~", "garbage [[[");
    write(&pol, "10-rule.toml.swp", "garbage [[[");
    write(&pol, "README.md", "# notes");
    fs::create_dir(pol.join("sub")).unwrap();
    write(
        &pol.join("sub"),
        "00-sub.toml",
        "[[rule]]\nid = \"nested\"\neffect = \"deny\"\n",
    );
    let l = load_dirs(&reg, &pol).unwrap();
    assert_eq!(rule_for(&l).as_deref(), Some("real"));
    assert_eq!(l.snapshot.rules.len(), 1);
}

#[test]
fn a_missing_directory_is_an_error_naming_it() {
    let (tmp, reg, _pol) = dirs();
    let missing = tmp.path().join("nope");
    let e = load_dirs(&reg, &missing).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
    assert!(msg.contains("cannot read directory"), "{msg}");
}

#[test]
fn errors_name_the_file_path_as_given() {
    let (_tmp, reg, pol) = dirs();
    write(
        &pol,
        "10.toml",
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\nworkers = [\"w.zz\"]\n",
    );
    let e = load_dirs(&reg, &pol).unwrap_err();
    let want = format!(
        "{}:4:12: error: rule[r].workers:",
        pol.join("10.toml").display()
    );
    assert!(e.to_string().starts_with(&want), "{e}");
}

#[test]
fn the_version_depends_on_contents_and_names_not_on_where_the_files_live() {
    let (_t1, reg1, pol1) = dirs();
    let (_t2, reg2, pol2) = dirs();
    for p in [&pol1, &pol2] {
        write(p, "10.toml", "[[rule]]\nid = \"r\"\neffect = \"allow\"\n");
    }
    let v = |r: &Path, p: &Path| load_dirs(r, p).unwrap().snapshot.version;
    let v1 = v(&reg1, &pol1);
    assert_eq!(v1, v(&reg2, &pol2), "same files in another directory");
    // A rename changes the load order's meaning, so the version.
    fs::rename(pol2.join("10.toml"), pol2.join("11.toml")).unwrap();
    assert_ne!(v1, v(&reg2, &pol2));
    // A byte change does too, and reverting it restores the version.
    write(
        &pol1,
        "10.toml",
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\n ",
    );
    assert_ne!(v1, v(&reg1, &pol1));
    write(
        &pol1,
        "10.toml",
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\n",
    );
    assert_eq!(v1, v(&reg1, &pol1));
}

/// Everything a load produces, as comparable text: the snapshot's version, files, settings,
/// capabilities, workers and rules (with their locations), and every diagnostic, in order.
fn outcome(r: Result<(&Snapshot, &[Diagnostic]), &LoadError>) -> String {
    match r {
        Ok((s, warnings)) => {
            let body = serde_json::json!({
                "version": s.version,
                "files": s.files,
                "settings": s.settings,
                "capabilities": s.capabilities,
                "workers": s.workers,
                "rules": s.rules,
                "locations": s.rules.iter().map(|r| r.location.to_string()).collect::<Vec<_>>(),
                "warnings": warnings.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            });
            format!("ok {body}")
        }
        Err(e) => {
            let all: Vec<String> = e.diagnostics.iter().map(|d| d.to_string()).collect();
            format!("err {}", all.join("\n"))
        }
    }
}

fn fresh(r: &Result<Loaded, LoadError>) -> String {
    outcome(r.as_ref().map(|l| (&l.snapshot, &l.warnings[..])))
}

fn reloaded(r: &Result<Reloaded, LoadError>) -> String {
    outcome(r.as_ref().map(|l| (&*l.snapshot, &l.warnings[..])))
}

#[test]
fn a_reload_reusing_unchanged_files_gives_exactly_what_a_fresh_load_gives() {
    let (_tmp, reg, pol) = dirs();
    let mut reloader = Reloader::default();
    // After each edit: the reload equals a load from scratch, and parsed `n` files.
    let mut check = |step: &str, n: usize| {
        let r = reloader.load_dirs(&reg, &pol);
        assert_eq!(reloaded(&r), fresh(&load_dirs(&reg, &pol)), "{step}");
        assert_eq!(reloader.files_parsed(), n, "{step}: files parsed");
        r
    };
    let a = "[[rule]]\nid = \"a1\"\neffect = \"deny\"\n\n[[rule]]\nid = \"a2\"\neffect = \"allow\"\nreason = \"ignored_on_allow\"\n";
    let b = "[[rule]]\nid = \"b1\"\neffect = \"allow\"\nenvs = [\"dev\"]\n";
    write(&pol, "10-a.toml", a);
    write(&pol, "20-b.toml", b);
    let first = check("first load", 3).unwrap();
    // Reused files bring their validation warnings along (the lint ones are recomputed).
    assert!(
        first.warnings.iter().any(|d| d.key == "rule[a2].reason"),
        "the reason warning"
    );
    check("nothing changed", 0).unwrap();

    // One file edited: only it is parsed again, and its new rule shows up in order.
    write(
        &pol,
        "10-a.toml",
        &format!("{a}\n[[rule]]\nid = \"a3\"\neffect = \"allow\"\n"),
    );
    let l = check("one file edited", 1).unwrap();
    let ids: Vec<&str> = l.snapshot.rules.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["a1", "a2", "a3", "b1"]);

    // A rename moves the file's rules (and its locations) even though its bytes are the same.
    fs::rename(pol.join("20-b.toml"), pol.join("05-b.toml")).unwrap();
    let l = check("renamed", 1).unwrap();
    assert_eq!(l.snapshot.rules[0].id, "b1");
    assert!(l.snapshot.rules[0].location.file.ends_with("05-b.toml"));

    // A removed file's rules are gone.
    fs::remove_file(pol.join("10-a.toml")).unwrap();
    let l = check("removed", 0).unwrap();
    assert_eq!(l.snapshot.rules.len(), 1);

    // A broken edit fails with the same diagnostics; the good edit after it loads.
    // (The registry was reused, so the error sends the load back to a full parse.)
    write(&pol, "05-b.toml", "[[rule]]\nid = \"b1\"\neffect = \n");
    let e = check("broken edit", 2).unwrap_err();
    assert!(e.to_string().contains("05-b.toml:3:"), "{e}");
    write(&pol, "05-b.toml", &format!("{b}workers = [\"w.a\"]\n"));
    let l = check("fixed", 1).unwrap();
    assert_eq!(
        l.snapshot.rules[0].workers.as_deref(),
        Some(&["w.a".to_string()][..])
    );

    // Errors that involve an unchanged file send the load back to a full parse, so they
    // read as a fresh load's: its rule id defined again in a file before it...
    write(&pol, "01-dup.toml", b);
    let e = check("duplicate in an earlier file", 3).unwrap_err();
    assert!(e.to_string().contains("05-b.toml:2:"), "{e}");
    assert!(e.to_string().contains("duplicate rule id"), "{e}");
    fs::remove_file(pol.join("01-dup.toml")).unwrap();
    check("duplicate removed", 0).unwrap();
    // ... a registry edit that removes a worker it names...
    write(&reg, "reg.toml", &REG.replace("w.a", "w.b"));
    let e = check("registry edit", 2).unwrap_err();
    assert!(e.to_string().contains("unknown worker \"w.a\""), "{e}");
    write(&reg, "reg.toml", REG);
    check("registry restored", 0).unwrap();
    // A registry file reused after another one that defines the same capability.
    write(&reg, "00-dup.toml", "[[capability]]\nid = \"cap.a\"\n");
    let e = check("duplicate capability in an earlier file", 3).unwrap_err();
    assert!(e.to_string().contains("duplicate capability id"), "{e}");
    fs::remove_file(reg.join("00-dup.toml")).unwrap();
    check("duplicate capability removed", 0).unwrap();
    // ... or settings that drop an environment or a data label it names.
    write(
        &pol,
        "30-env.toml",
        "[[rule]]\nid = \"e1\"\neffect = \"deny\"\nenvs = [\"staging\"]\ndata_labels = [\"INTERNAL\"]\n",
    );
    check("a file naming staging and INTERNAL", 1).unwrap();
    write(
        &pol,
        "00-settings.toml",
        "[settings]\nenvironments = [\"dev\"]\n",
    );
    let e = check("an environment dropped", 4).unwrap_err();
    assert!(
        e.to_string().contains("unknown environment \"staging\""),
        "{e}"
    );
    write(
        &pol,
        "00-settings.toml",
        "[settings]\ndata_labels = [\"PUBLIC\"]\n",
    );
    let e = check("a data label dropped", 4).unwrap_err();
    assert!(
        e.to_string().contains("unknown data label \"INTERNAL\""),
        "{e}"
    );
    fs::remove_file(pol.join("00-settings.toml")).unwrap();
    fs::remove_file(pol.join("30-env.toml")).unwrap();

    // Back to the first files: the first set again.
    fs::remove_file(pol.join("05-b.toml")).unwrap();
    write(&pol, "10-a.toml", a);
    write(&pol, "20-b.toml", b);
    let again = check("the first files again", 2).unwrap();
    assert_eq!(again.snapshot.version, first.snapshot.version);
}

#[test]
fn a_reloader_keeps_only_the_files_of_the_last_set_that_loaded() {
    let (_tmp, reg, pol) = dirs();
    let mut reloader = Reloader::default();
    write(
        &pol,
        "20.toml",
        "[[rule]]\nid = \"other\"\neffect = \"deny\"\n",
    );
    for i in 0..3 {
        let rule = format!("[[rule]]\nid = \"r{i}\"\neffect = \"allow\"\n");
        write(&pol, "10.toml", &rule);
        reloader.load_dirs(&reg, &pol).unwrap();
        assert_eq!(reloader.reusable_files(), 3, "round {i}");
    }
    // A failed load keeps the last good set's files reusable.
    write(&pol, "10.toml", "[[rule]]\nid = ");
    reloader.load_dirs(&reg, &pol).unwrap_err();
    assert_eq!(reloader.reusable_files(), 3);
    fs::remove_file(pol.join("10.toml")).unwrap();
    reloader.load_dirs(&reg, &pol).unwrap();
    assert_eq!(reloader.reusable_files(), 2);
    assert_eq!(reloader.files_parsed(), 0, "both files left were reused");
}

#[test]
fn a_reused_registry_file_is_checked_against_the_files_that_changed() {
    let (_tmp, reg, pol) = dirs();
    // Only this (unchanged, reused) worker names staging, INTERNAL and, later, a
    // capability defined in the other registry file.
    write(
        &reg,
        "zz-w.toml",
        "[[worker]]\nid = \"w.z\"\ncapabilities = [\"cap.a\"]\nenvironments = [\"staging\"]\nmax_data_label = \"INTERNAL\"\nblast_radius = 0\n",
    );
    let mut reloader = Reloader::default();
    reloader.load_dirs(&reg, &pol).unwrap();
    let mut check = |step: &str, want: &str| {
        let r = reloader.load_dirs(&reg, &pol);
        assert_eq!(reloaded(&r), fresh(&load_dirs(&reg, &pol)), "{step}");
        let e = r.unwrap_err().to_string();
        assert!(e.contains("zz-w.toml") && e.contains(want), "{step}: {e}");
    };
    write(&pol, "00-s.toml", "[settings]\nenvironments = [\"dev\"]\n");
    check("staging dropped", "unknown environment \"staging\"");
    write(
        &pol,
        "00-s.toml",
        "[settings]\ndata_labels = [\"PUBLIC\"]\n",
    );
    check("INTERNAL dropped", "unknown data label \"INTERNAL\"");
    fs::remove_file(pol.join("00-s.toml")).unwrap();
    write(&reg, "reg.toml", &REG.replace("cap.a", "cap.b"));
    check("cap.a gone", "unknown capability \"cap.a\"");
}

fn load_error(reg: &Path, pol: &Path) -> String {
    match load_dirs(reg, pol) {
        Ok(_) => panic!("expected a load error"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_dangling_symlink_is_an_error_not_a_missing_file() {
    let (tmp, reg, pol) = dirs();
    std::os::unix::fs::symlink(tmp.path().join("nowhere.toml"), pol.join("10-r.toml")).unwrap();
    let e = load_error(&reg, &pol);
    assert!(
        e.contains("10-r.toml") && e.contains("dangling symlink"),
        "{e}"
    );
    // A symlink to a regular file is read.
    write(tmp.path(), "nowhere.toml", "");
    assert!(load_dirs(&reg, &pol).is_ok());
}

#[test]
fn a_fifo_a_directory_and_an_oversized_file_are_errors_and_nothing_blocks() {
    use std::os::unix::ffi::OsStrExt;
    let (_tmp, reg, pol) = dirs();
    let fifo = pol.join("20-pipe.toml");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let e = load_error(&reg, &pol);
    assert!(e.contains("named pipe"), "{e}");
    // Through a symlink too.
    fs::remove_file(&fifo).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    fs::rename(&fifo, pol.join("pipe")).unwrap();
    std::os::unix::fs::symlink(pol.join("pipe"), pol.join("20-link.toml")).unwrap();
    assert!(load_error(&reg, &pol).contains("named pipe"));
    fs::remove_file(pol.join("20-link.toml")).unwrap();

    fs::create_dir(pol.join("30-dir.toml")).unwrap();
    assert!(load_error(&reg, &pol).contains("a directory"));
    fs::remove_dir(pol.join("30-dir.toml")).unwrap();

    let big = fs::File::create(pol.join("40-big.toml")).unwrap();
    big.set_len(MAX_FILE_BYTES + 1).unwrap();
    assert!(load_error(&reg, &pol).contains("too large"));
    fs::remove_file(pol.join("40-big.toml")).unwrap();
    assert!(load_dirs(&reg, &pol).is_ok());
}

#[test]
fn the_fingerprint_changes_with_any_byte_name_or_read_error() {
    let (_tmp, reg, pol) = dirs();
    write(&pol, "10-r.toml", "# a");
    let a = fingerprint(&reg, &pol);
    assert_eq!(a, fingerprint(&reg, &pol));
    write(&pol, "10-r.toml", "# b");
    let b = fingerprint(&reg, &pol);
    assert_ne!(a, b);
    fs::rename(pol.join("10-r.toml"), pol.join("11-r.toml")).unwrap();
    assert_ne!(b, fingerprint(&reg, &pol));
    let c = fingerprint(&reg, &pol);
    fs::remove_dir_all(&pol).unwrap();
    assert_ne!(c, fingerprint(&reg, &pol));
}

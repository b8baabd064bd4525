//! Loading from directories: file selection, lexical order, and the policy version.

use std::fs;
use std::path::Path;

use super::*;
use crate::engine::{decide, Request};

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

//! Commands that run the engine locally: `check`, `test`, `route --offline`.

use std::process::ExitCode;

use std::io::Write;
use std::path::Path;

use super::{
    exit, fixtures, human, suggest, CheckArgs, CliError, CliResult, FilesArgs, RouteArgs, TestArgs,
};
use crate::config::{Config, Flags};
use crate::engine::{decide, Request, Severity, Snapshot};
use crate::load::{load_dirs, Loaded};
use crate::store::audit::{AuditConfig, AuditLog, VerifyReport};

/// Resolve the registry/policies dirs exactly as the daemon would.
pub(super) fn resolve_files(f: &FilesArgs) -> Result<Config, crate::config::ConfigError> {
    Config::resolve(&Flags {
        config: f.config.clone(),
        registry_dir: f.registry.clone(),
        policies_dir: f.policies.clone(),
        ..Default::default()
    })
}

fn load(f: &FilesArgs) -> Result<Loaded, CliError> {
    let cfg = resolve_files(f)?;
    load_dirs(&cfg.registry_dir, &cfg.policies_dir).map_err(|source| CliError::PolicyLoad {
        sources: cfg.describe_sources(),
        source,
    })
}

pub(super) fn check(a: &CheckArgs, json: bool) -> CliResult {
    let cfg = resolve_files(&a.files)?;
    let (diags, loaded) = match load_dirs(&cfg.registry_dir, &cfg.policies_dir) {
        Ok(l) => (l.warnings.clone(), Some(l)),
        Err(e) => (e.diagnostics, None),
    };
    let errors = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = diags.len() - errors;
    let fail = errors > 0 || (a.strict && warnings > 0);
    if json || a.format == "json" {
        let v = serde_json::json!({
            "ok": !fail,
            "errors": errors,
            "warnings": warnings,
            "registry_dir": cfg.registry_dir,
            "policies_dir": cfg.policies_dir,
            "config_file": cfg.config_file,
            "policy_version": loaded.as_ref().map(|l| l.snapshot.version.clone()),
            "diagnostics": diags,
        });
        let text = serde_json::to_string_pretty(&v)
            .map_err(|e| CliError::json("encoding the check report", e))?;
        println!("{text}");
        return Ok(ExitCode::from(if fail { exit::FAILURE } else { exit::OK }));
    }
    eprintln!("checking {}", cfg.describe_sources());
    for d in &diags {
        println!("{d}");
        if d.severity == Severity::Error {
            print!("{}", snippet(&d.location));
        }
    }
    match loaded {
        Some(l) => {
            let s = &l.snapshot;
            println!(
                "{} capabilities, {} workers, {} rules in {} files; policy version {}",
                s.capabilities.len(),
                s.workers.len(),
                s.rules.len(),
                s.files.len(),
                s.version
            );
        }
        None => println!("policy set does not load"),
    }
    println!("{errors} errors, {warnings} warnings");
    Ok(ExitCode::from(if fail { exit::FAILURE } else { exit::OK }))
}

/// The source line of a finding with a caret under its column, as rustc and cargo show it:
///
/// ```text
///    |
/// 12 | id = "x
///    |      ^
/// ```
pub(super) fn snippet(loc: &crate::engine::Location) -> String {
    if loc.line == 0 {
        return String::new();
    }
    let Ok(text) = std::fs::read_to_string(&loc.file) else {
        return String::new();
    };
    let Some(line) = text.lines().nth(loc.line - 1) else {
        return String::new();
    };
    let num = loc.line.to_string();
    let pad = " ".repeat(num.len());
    // Tabs keep their width under the caret.
    let lead: String = line
        .chars()
        .take(loc.col.saturating_sub(1))
        .map(|c| if c == '\t' { '\t' } else { ' ' })
        .collect();
    format!("{pad} |\n{num} | {line}\n{pad} | {lead}^\n")
}

pub(super) fn test(a: &TestArgs) -> CliResult {
    let loaded = load(&a.files)?;
    let mut report = fixtures::Report::default();
    for path in &a.fixtures {
        let cases = fixtures::read(path)?;
        fixtures::run(
            &loaded.snapshot,
            &path.display().to_string(),
            &cases,
            &mut report,
        );
    }
    for f in &report.failures {
        println!("{f}");
    }
    println!("{} passed, {} failed", report.passed, report.failed);
    Ok(if report.failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub(super) fn route(a: &RouteArgs, json: bool) -> CliResult {
    let loaded = load(&a.files)?;
    let snap = &loaded.snapshot;
    let req = Request {
        capability_id: &a.capability,
        env: &a.env,
        data_label: &a.label,
        tenant_id: &a.tenant,
    };
    let d = decide(snap, &req, a.explain).map_err(|e| {
        let hint = match e.field {
            "env" => suggest::hint(
                &a.env,
                snap.settings.environments.iter().map(String::as_str),
            ),
            "data_label" => suggest::hint(
                &a.label,
                snap.settings.data_labels.iter().map(String::as_str),
            ),
            _ => String::new(),
        };
        CliError::InvalidRequest { source: e, hint }
    })?;
    let mut out = serde_json::json!({
        "decision_id": null,
        "allowed": d.allowed,
        "worker_id": d.worker_id,
        "deny_reason": d.deny_reason,
        "rule_id": d.rule_id,
        "policy_version": snap.version,
        "approval_id": null,
        "dry_run": a.dry_run,
    });
    if let Some(x) = &d.explain {
        let encode = |e| CliError::json("encoding the explain trace", e);
        let mut x = serde_json::to_value(x).map_err(encode)?;
        let rules: Vec<serde_json::Value> = snap
            .rules
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()
            .map_err(encode)?;
        let workers: Vec<serde_json::Value> = snap
            .workers
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<_, _>>()
            .map_err(encode)?;
        human::explain_why(&mut x, &asked(a), &rules, &workers);
        out["explain"] = x;
    }
    if json {
        let text = serde_json::to_string_pretty(&out)
            .map_err(|e| CliError::json("encoding the decision", e))?;
        println!("{text}");
    } else {
        human::decision(&out);
    }
    if d.deny_reason == Some(crate::engine::UNKNOWN_CAPABILITY) {
        hint_capability(&a.capability, capability_ids(snap));
    }
    Ok(if d.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::FAILURE)
    })
}

pub(super) fn asked(a: &RouteArgs) -> human::Asked<'_> {
    human::Asked {
        capability: &a.capability,
        env: &a.env,
        label: &a.label,
        tenant: &a.tenant,
    }
}

fn capability_ids(snap: &Snapshot) -> Vec<String> {
    snap.capabilities.iter().map(|c| c.id.clone()).collect()
}

/// On stderr, so the decision on stdout stays what it is: `hint: did you mean ...?`.
pub(super) fn hint_capability(asked: &str, known: Vec<String>) {
    match suggest::did_you_mean(asked, known.iter().map(String::as_str)) {
        Some(c) => eprintln!("hint: the registry has no capability {asked:?}; did you mean {c:?}?"),
        None => eprintln!(
            "hint: the registry has no capability {asked:?} ({} known; `hall route --offline --explain` or GET /api/registry/capabilities lists them)",
            known.len()
        ),
    }
}

/// Open a stopped daemon's (or a copied) state dir for reading its audit log. sled has no
/// read-only mode: the database is opened as the daemon opens it, but nothing is appended.
fn open_audit_offline(dir: &Path) -> Result<(sled::Db, AuditLog), CliError> {
    let db_path = dir.join("db");
    if !db_path.is_dir() {
        return Err(CliError::NoAuditLog {
            dir: dir.to_path_buf(),
        });
    }
    let db = crate::store::open_db_waiting(&db_path, std::time::Duration::from_millis(500))
        .map_err(|source| {
            let s = source.to_string();
            let dir = dir.to_path_buf();
            if s.contains("lock") || s.contains("Resource temporarily unavailable") {
                CliError::StateDirInUse { dir, source }
            } else {
                CliError::OpenDatabase { dir, source }
            }
        })?;
    let log =
        AuditLog::open(&db, AuditConfig::default()).map_err(|source| CliError::OpenAuditLog {
            dir: dir.to_path_buf(),
            source,
        })?;
    Ok((db, log))
}

/// `hall audit verify --state-dir DIR`: walk the hash chain offline.
pub(super) fn verify_audit(dir: &Path) -> Result<VerifyReport, CliError> {
    let (_db, log) = open_audit_offline(dir)?;
    let r = log.verify().map_err(|source| CliError::Audit {
        what: "reading",
        source,
    });
    log.shutdown();
    r
}

/// `hall audit export --state-dir DIR`: JSON lines offline. `after_seq` excludes that seq.
pub(super) fn export_audit(
    dir: &Path,
    after_seq: Option<u64>,
    since: Option<&str>,
    out: &mut dyn Write,
) -> Result<u64, CliError> {
    let since_ms = since
        .map(|s| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
                .map_err(|source| CliError::BadTime {
                    flag: "since",
                    value: s.to_owned(),
                    source,
                })
        })
        .transpose()?;
    let (_db, log) = open_audit_offline(dir)?;
    let r = log
        .export(after_seq.map(|a| a + 1), since_ms, out)
        .map_err(|source| CliError::Audit {
            what: "exporting",
            source,
        });
    log.shutdown();
    r
}

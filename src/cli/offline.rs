//! Commands that run the engine locally: `check`, `test`, `route --offline`.

use std::process::ExitCode;

use super::{fixtures, CheckArgs, CliResult, FilesArgs, RouteArgs, TestArgs};
use crate::config::{Config, Flags};
use crate::engine::{decide, Request, Severity};
use crate::load::{load_dirs, Loaded};

/// Resolve the registry/policies dirs exactly as the daemon would.
pub(super) fn resolve_files(f: &FilesArgs) -> Result<Config, crate::config::ConfigError> {
    Config::resolve(&Flags {
        config: f.config.clone(),
        registry_dir: f.registry.clone(),
        policies_dir: f.policies.clone(),
        ..Default::default()
    })
}

fn load(f: &FilesArgs) -> Result<Loaded, Box<dyn std::error::Error>> {
    let cfg = resolve_files(f)?;
    load_dirs(&cfg.registry_dir, &cfg.policies_dir).map_err(|e| {
        let n = e.errors().count();
        format!(
            "the policy set does not load ({n} error{}):\n{e}",
            if n == 1 { "" } else { "s" }
        )
        .into()
    })
}

pub(super) fn check(a: &CheckArgs) -> CliResult {
    let cfg = resolve_files(&a.files)?;
    let (diags, loaded) = match load_dirs(&cfg.registry_dir, &cfg.policies_dir) {
        Ok(l) => (l.warnings.clone(), Some(l)),
        Err(e) => (e.diagnostics, None),
    };
    for d in &diags {
        println!("{d}");
    }
    let errors = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    let warnings = diags.len() - errors;
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
    let fail = errors > 0 || (a.strict && warnings > 0);
    Ok(if fail {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
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

pub(super) fn route(a: &RouteArgs) -> CliResult {
    let loaded = load(&a.files)?;
    let snap = &loaded.snapshot;
    let req = Request {
        capability_id: &a.capability,
        env: &a.env,
        data_label: &a.label,
        tenant_id: &a.tenant,
    };
    let d = decide(snap, &req, a.explain).map_err(|e| format!("invalid request: {e}"))?;
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
        out["explain"] = serde_json::to_value(x)?;
    }
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(if d.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

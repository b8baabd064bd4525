//! Decision fixtures (`hall test`): `[[case]]` tables with a request and the expected outcome.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::{decide, Request, Snapshot};

/// A fixture file: `[[case]]` tables for `hall test`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "Hall decision fixtures")]
pub(crate) struct FixtureFile {
    #[serde(default)]
    case: Vec<Case>,
}

/// One fixture case.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    pub request: CaseRequest,
    /// With its place in the file, to point at an `expect` that checks nothing.
    #[schemars(with = "Expect")]
    pub expect: serde_spanned::Spanned<Expect>,
}

/// The request of a case, as sent to `POST /api/route`.
#[derive(Debug, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    pub capability_id: String,
    pub env: String,
    pub data_label: String,
    pub tenant_id: String,
}

/// What a case expects; fields left out are not checked, but at least one must be given.
#[derive(Debug, Default, Deserialize, Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deny_reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<String>,
}

/// The result of running fixture files.
#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    /// One human-readable block per failing case.
    pub failures: Vec<String>,
}

/// Why a fixture file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    #[error("cannot read fixture file {}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or not the shape of a fixture file (`line` 0: unknown).
    #[error("{}:{line}: {message}", path.display())]
    Parse {
        path: std::path::PathBuf,
        line: usize,
        message: String,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("{}: no [[case]] tables", path.display())]
    NoCases { path: std::path::PathBuf },
    /// A case that checks nothing would pass whatever the policy does.
    #[error("{}:{line}: case {name:?}: `expect` checks nothing; name at least one of allowed, worker_id, deny_reason, rule_id", path.display())]
    ExpectsNothing {
        path: std::path::PathBuf,
        line: usize,
        name: String,
    },
}

/// Read and parse a fixture file.
pub fn read(path: &Path) -> Result<Vec<Case>, FixtureError> {
    let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let f: FixtureFile = toml::from_str(&text).map_err(|e| FixtureError::Parse {
        path: path.to_path_buf(),
        line: e.span().map_or(0, |s| {
            text[..s.start].bytes().filter(|&b| b == b'\n').count() + 1
        }),
        message: e.message().trim().to_owned(),
        source: Box::new(e),
    })?;
    if f.case.is_empty() {
        return Err(FixtureError::NoCases {
            path: path.to_path_buf(),
        });
    }
    // A case that checks nothing passes whatever the policy does: refuse it.
    for c in &f.case {
        let e = c.expect.get_ref();
        if e.allowed.is_none()
            && e.worker_id.is_none()
            && e.deny_reason.is_none()
            && e.rule_id.is_none()
        {
            let line = text[..c.expect.span().start.min(text.len())]
                .bytes()
                .filter(|&b| b == b'\n')
                .count()
                + 1;
            return Err(FixtureError::ExpectsNothing {
                path: path.to_path_buf(),
                line,
                name: c.name.clone(),
            });
        }
    }
    Ok(f.case)
}

/// Run cases against a snapshot, appending to `report`.
pub fn run(snap: &Snapshot, file: &str, cases: &[Case], report: &mut Report) {
    for c in cases {
        let r = &c.request;
        let req = Request {
            capability_id: &r.capability_id,
            env: &r.env,
            data_label: &r.data_label,
            tenant_id: &r.tenant_id,
        };
        let (ok, actual) = match decide(snap, &req, false) {
            Ok(d) => {
                let e = c.expect.get_ref();
                let ok = e.allowed.is_none_or(|a| a == d.allowed)
                    && e.worker_id
                        .as_deref()
                        .is_none_or(|w| Some(w) == d.worker_id)
                    && e.deny_reason
                        .as_deref()
                        .is_none_or(|w| Some(w) == d.deny_reason)
                    && e.rule_id.as_deref().is_none_or(|w| Some(w) == d.rule_id);
                (ok, serde_json::to_string(&d).unwrap_or_default())
            }
            Err(e) => (false, format!("invalid request: {e}")),
        };
        if ok {
            report.passed += 1;
        } else {
            report.failed += 1;
            report.failures.push(format!(
                "FAIL {file}: {}\n  request:  {}\n  expected: {}\n  actual:   {actual}",
                c.name,
                serde_json::to_string(r).unwrap_or_default(),
                serde_json::to_string(c.expect.get_ref()).unwrap_or_default(),
            ));
        }
    }
}

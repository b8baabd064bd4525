//! Warnings about a policy set that loads but probably does not do what its author meant.

use std::fmt;

use serde::Serialize;

use super::decide::eligibility;
use super::snapshot::{Effect, Location, Pattern, Rule, Snapshot};

/// How bad a finding is: errors stop a load, warnings do not (unless `--strict`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One finding, located at `file:line:col`, naming the key at fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    #[serde(flatten)]
    pub location: Location,
    /// The key at fault, as a path: `rule[docs-dev].workers`, `worker[w.x].max_data_label`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sev = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        if self.key.is_empty() {
            write!(f, "{}: {sev}: {}", self.location, self.message)
        } else {
            write!(
                f,
                "{}: {sev}: {}: {}",
                self.location, self.key, self.message
            )
        }
    }
}

/// Lint a compiled snapshot: shadowed rules, capabilities no worker offers, rules that match
/// nothing or can never select a worker.
///
/// Shadowing is checked only against rules that share the shadowed rule's first
/// (capability, env) index slot, so linting 10,000 rules stays near-linear.
pub fn lint(snap: &Snapshot, cap_locations: &[Location]) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    let warn = |location: &Location, key: String, message: String| Diagnostic {
        severity: Severity::Warning,
        location: location.clone(),
        key,
        message,
    };

    for (ci, c) in snap.capabilities.iter().enumerate() {
        if snap.workers_by_cap[ci].is_empty() {
            out.push(warn(
                cap_locations.get(ci).unwrap_or(&Location::default()),
                format!("capability[{}]", c.id),
                "no worker offers this capability".into(),
            ));
        }
    }

    let n_env = snap.settings.environments.len();
    for (ri, r) in snap.rules.iter().enumerate() {
        let key = format!("rule[{}]", r.id);
        let matched_caps = snap.capabilities_matched_by(&r.capabilities);
        let no_tenant = r.tenants.as_ref().is_some_and(|t| t.is_empty());
        if matched_caps.is_empty()
            || r.compiled.env_mask == 0
            || r.compiled.label_mask == 0
            || no_tenant
        {
            let why = if matched_caps.is_empty() {
                "matches no capability in the registry"
            } else if r.compiled.env_mask == 0 {
                "matches no environment"
            } else if r.compiled.label_mask == 0 {
                "matches no data label"
            } else {
                "matches no tenant"
            };
            out.push(warn(
                &r.location,
                key,
                format!("this rule never matches: it {why}"),
            ));
            continue;
        }

        // Shadowing: an earlier rule matching everything this one matches.
        let first_env = r.compiled.env_mask.trailing_zeros() as usize;
        let slot = &snap.rules_by_cap_env[matched_caps[0] as usize * n_env + first_env];
        if let Some(earlier) = slot
            .iter()
            .take_while(|&&e| (e as usize) < ri)
            .map(|&e| &snap.rules[e as usize])
            .find(|e| covers(e, r))
        {
            out.push(warn(
                &r.location,
                key,
                format!(
                    "shadowed by rule {:?} at {}: that earlier rule matches every request this one does",
                    earlier.id, earlier.location
                ),
            ));
            continue;
        }

        if r.effect == Effect::Allow && !can_select(snap, r, &matched_caps) {
            out.push(warn(
                &r.location,
                key,
                "this rule can never select a worker: no candidate is eligible for any request it matches".into(),
            ));
        }
    }
    out
}

/// Whether rule `a` matches every request rule `b` matches.
fn covers(a: &Rule, b: &Rule) -> bool {
    let sub = |x: u64, y: u64| x & y == y;
    sub(a.compiled.env_mask, b.compiled.env_mask)
        && sub(a.compiled.label_mask, b.compiled.label_mask)
        && b.capabilities
            .iter()
            .all(|pb| a.capabilities.iter().any(|pa| pa.covers(pb)))
        && match (&a.tenants, &b.tenants) {
            (None, _) => true,
            // Omitted tenants means any: only a `*` in `a` covers it.
            (Some(ta), None) => ta.contains(&Pattern::Any),
            (Some(ta), Some(tb)) => tb.iter().all(|pb| ta.iter().any(|pa| pa.covers(pb))),
        }
}

/// Whether some request the rule matches could select some candidate worker: one that is
/// eligible ([`eligibility`], the one definition) in some env the rule matches, for the
/// least sensitive label it matches (a worker cleared for a label is cleared for every
/// label below it).
fn can_select(snap: &Snapshot, r: &Rule, caps: &[u32]) -> bool {
    let min_label = r.compiled.label_mask.trailing_zeros() as usize;
    caps.iter().any(|&c| {
        let default;
        let candidates: &[u32] = match &r.compiled.workers {
            Some(ws) => ws,
            None => {
                default = &snap.workers_by_cap[c as usize];
                default
            }
        };
        candidates.iter().any(|&wi| {
            snap.workers
                .get(wi as usize)
                .is_some_and(|w| eligibility(snap, w, r, c, r.compiled.env_mask, min_label).is_ok())
        })
    })
}

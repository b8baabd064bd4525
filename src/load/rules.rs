//! Stage 3 of a load: the rules, in file order (after the registry: a rule names workers).

use std::collections::HashMap;

use super::parse::{strings, Checker, Key, PolicyFile, RawRule, S};
use super::registry::Registry;
use super::reuse::{self, FileRules, NeedsFullParse, PolicyInput};
use super::{parse_duration, Source};
use crate::engine::{
    ApprovalSettings, Diagnostic, Effect, Pattern, Rule, Settings, DENIED_BY_POLICY,
};

/// The longest an approval may stay pending, or be reused: 30 days.
const MAX_APPROVAL_SECS: u64 = 30 * 24 * 3600;
/// The most distinct approvers a rule may require.
const MAX_APPROVERS: i64 = 10;

/// What is wrong with a rule.
#[derive(Debug, thiserror::Error)]
pub(super) enum RuleError {
    #[error("duplicate rule id (first defined at {first})")]
    Duplicate { first: String },
    #[error("a rule may have data_labels or max_data_label, not both")]
    LabelsAndMaxLabel,
    #[error("effect must be \"allow\", \"deny\" or \"require_approval\", got {0:?}")]
    Effect(String),
    #[error("unknown worker {id:?}: no [[worker]] has this id{hint}")]
    UnknownWorker { id: String, hint: String },
    #[error("max_blast_radius must be between 0 and 10, got {0}")]
    MaxBlastRadius(i64),
    #[error("reason {0:?} is not a machine code: use 1-64 characters from a-z, 0-9 and _, starting with a letter")]
    Reason(String),
    #[error("{key} must be {once}a duration from 1s to 30d such as \"90s\", \"15m\", \"2h\" or \"1d\", got {value:?}")]
    Duration {
        key: &'static str,
        /// `"once" or ` where that is also allowed.
        once: &'static str,
        value: String,
    },
    #[error("auto_approve_after ({auto}s) must be shorter than approval_ttl ({ttl}s), or the approval expires before its veto window ends")]
    AutoApproveNotShorter { auto: u64, ttl: u64 },
    #[error("approvers_required must be between 1 and {MAX_APPROVERS}, got {0}")]
    Approvers(i64),
}

/// A rule key that is valid but has no effect.
#[derive(Debug, thiserror::Error)]
pub(super) enum RuleWarning {
    #[error("reason is only used when effect = \"deny\"")]
    ReasonUnused,
    #[error("{0} is only used when effect = \"require_approval\"")]
    ApprovalKeyUnused(&'static str),
}

/// The rules of a set, and what each policy file contributed (for the next load to reuse).
pub(super) struct Rules {
    pub(super) rules: Vec<Rule>,
    /// `files[i]` is `pol_in[i]`'s share; `None`: not reusable (it holds `[settings]`, or
    /// did not parse).
    pub(super) files: Vec<Option<FileRules>>,
}

/// Validate the rules of the policy files (`pol_in[i]` is `pol_files[i]`, parsed or reused).
/// Problems are added to `diags`.
pub(super) fn stage(
    pol_in: &[PolicyInput],
    pol_files: &[(&Source, Option<&PolicyFile>)],
    settings: &Settings,
    reg: &Registry,
    diags: &mut Vec<Diagnostic>,
) -> Result<Rules, NeedsFullParse> {
    let mut rules: Vec<Rule> = Vec::new();
    // Rule id -> index in `rules` of its first definition (borrowing the id: no copies).
    let mut rule_seen: HashMap<&str, usize> = HashMap::new();
    let mut files: Vec<Option<FileRules>> = Vec::with_capacity(pol_in.len());
    for (input, (src, file)) in pol_in.iter().zip(pol_files) {
        let (first_rule, first_diag) = (rules.len(), diags.len());
        if let PolicyInput::Reused(reused, warnings) = input {
            reuse::rules(reused, settings, reg, &mut rule_seen, &mut rules)?;
            diags.extend(warnings.iter().cloned());
            files.push(Some(FileRules {
                rules: first_rule..rules.len(),
                warnings: warnings.to_vec(),
            }));
            continue;
        }
        let Some(file) = file else {
            files.push(None);
            continue;
        };
        let mut ck = Checker::new(src, diags);
        for r in &file.rule {
            let key = Key::new("rule", r.id.get_ref());
            if !ck.id(&r.id, key.at(".id"), "rule id") {
                continue;
            }
            if let Some(&first) = rule_seen.get(r.id.get_ref().as_str()) {
                let first = rules[first].location.to_string();
                ck.error(
                    r.id.span().start,
                    key.at(".id"),
                    RuleError::Duplicate { first },
                );
                continue;
            }
            // Every path from here pushes this rule, at index `rules.len()`.
            rule_seen.insert(r.id.get_ref(), rules.len());
            rules.push(rule(&mut ck, r, key, settings, reg));
        }
        files.push(file.settings.is_none().then(|| FileRules {
            rules: first_rule..rules.len(),
            warnings: diags[first_diag..].to_vec(),
        }));
    }
    Ok(Rules { rules, files })
}

/// One parsed rule, its problems reported through `ck`. A rule with errors is still built
/// (the load fails anyway) so that every error of the set is found.
fn rule(
    ck: &mut Checker<'_>,
    r: &RawRule,
    key: Key<'_>,
    settings: &Settings,
    reg: &Registry,
) -> Rule {
    let location = ck.loc(r.id.span().start);
    let capabilities = match &r.capabilities {
        None => vec![Pattern::Any],
        Some(list) => list
            .iter()
            .filter_map(|p| ck.pattern(p, key.at(".capabilities")))
            .collect(),
    };
    let tenants = r.tenants.as_ref().map(|list| {
        list.iter()
            .filter_map(|p| ck.pattern(p, key.at(".tenants")))
            .collect::<Vec<_>>()
    });
    if let Some(list) = &r.envs {
        for e in list {
            ck.member(e, &settings.environments, key.at(".envs"), "environment");
        }
    }
    if let Some(list) = &r.data_labels {
        for l in list {
            ck.member(
                l,
                &settings.data_labels,
                key.at(".data_labels"),
                "data label",
            );
        }
    }
    if let Some(m) = &r.max_data_label {
        ck.member(
            m,
            &settings.data_labels,
            key.at(".max_data_label"),
            "data label",
        );
        if r.data_labels.is_some() {
            ck.error(
                m.span().start,
                key.at(".max_data_label"),
                RuleError::LabelsAndMaxLabel,
            );
        }
    }
    let effect = match r.effect.get_ref().as_str() {
        "allow" => Some(Effect::Allow),
        "deny" => Some(Effect::Deny),
        "require_approval" => Some(Effect::RequireApproval),
        other => {
            let e = RuleError::Effect(other.to_string());
            ck.error(r.effect.span().start, key.at(".effect"), e);
            None
        }
    };
    if let Some(ws) = &r.workers {
        for w in ws {
            if !reg.worker_seen.contains_key(w.get_ref()) {
                let e = RuleError::UnknownWorker {
                    id: w.get_ref().clone(),
                    hint: crate::suggest::hint(
                        w.get_ref(),
                        reg.worker_seen.keys().map(String::as_str),
                    ),
                };
                ck.error(w.span().start, key.at(".workers"), e);
            }
        }
    }
    for c in &r.require_controls {
        ck.id(c, key.at(".require_controls"), "control");
    }
    let mut max_blast_radius = None;
    if let Some(m) = &r.max_blast_radius {
        let v = *m.get_ref();
        if (0..=10).contains(&v) {
            max_blast_radius = Some(v as u8);
        } else {
            ck.error(
                m.span().start,
                key.at(".max_blast_radius"),
                RuleError::MaxBlastRadius(v),
            );
        }
    }
    let reason = match &r.reason {
        None => DENIED_BY_POLICY.to_string(),
        Some(reason) => {
            if !valid_reason(reason.get_ref()) {
                let e = RuleError::Reason(reason.get_ref().clone());
                ck.error(reason.span().start, key.at(".reason"), e);
            }
            if effect != Some(Effect::Deny) {
                ck.warn(
                    reason.span().start,
                    key.at(".reason"),
                    RuleWarning::ReasonUnused,
                );
            }
            reason.get_ref().clone()
        }
    };
    let approval = approval_settings(ck, r, key, effect);
    Rule {
        id: r.id.get_ref().clone(),
        description: r.description.clone(),
        capabilities,
        envs: r.envs.as_ref().map(|v| strings(v)),
        data_labels: r.data_labels.as_ref().map(|v| strings(v)),
        max_data_label: r.max_data_label.as_ref().map(|m| m.get_ref().clone()),
        tenants,
        effect: effect.unwrap_or(Effect::Deny),
        workers: r.workers.as_ref().map(|v| strings(v)),
        require_controls: strings(&r.require_controls),
        max_blast_radius,
        reason,
        approval,
        location,
        compiled: Default::default(),
    }
}

/// The approval keys of a rule (SPEC 3.1), validated with `file:line:col` diagnostics.
/// On a rule whose effect is not `require_approval` they are warned about and ignored.
fn approval_settings(
    ck: &mut Checker<'_>,
    r: &RawRule,
    key: Key<'_>,
    effect: Option<Effect>,
) -> ApprovalSettings {
    let mut out = ApprovalSettings::default();
    let duration = |ck: &mut Checker<'_>, v: &S, field: &'static str| -> Option<u64> {
        match parse_duration(v.get_ref()) {
            Some(secs) if (1..=MAX_APPROVAL_SECS).contains(&secs) => Some(secs),
            _ => {
                let e = RuleError::Duration {
                    key: &field[1..],
                    once: if field == ".approval_use" {
                        "\"once\" or "
                    } else {
                        ""
                    },
                    value: v.get_ref().clone(),
                };
                ck.error(v.span().start, key.at(field), e);
                None
            }
        }
    };
    if let Some(v) = &r.approval_ttl {
        if let Some(s) = duration(ck, v, ".approval_ttl") {
            out.ttl_secs = s;
        }
    }
    if let Some(v) = &r.auto_approve_after {
        if let Some(s) = duration(ck, v, ".auto_approve_after") {
            if s >= out.ttl_secs {
                let e = RuleError::AutoApproveNotShorter {
                    auto: s,
                    ttl: out.ttl_secs,
                };
                ck.error(v.span().start, key.at(".auto_approve_after"), e);
            }
            out.auto_approve_after_secs = Some(s);
        }
    }
    if let Some(v) = &r.approval_use {
        if v.get_ref() != "once" {
            out.use_window_secs = duration(ck, v, ".approval_use");
        }
    }
    if let Some(n) = &r.approvers_required {
        let v = *n.get_ref();
        if (1..=MAX_APPROVERS).contains(&v) {
            out.approvers_required = v as u32;
        } else {
            ck.error(
                n.span().start,
                key.at(".approvers_required"),
                RuleError::Approvers(v),
            );
        }
    }
    if effect != Some(Effect::RequireApproval) {
        for (field, span) in [
            (".approval_ttl", r.approval_ttl.as_ref().map(|v| v.span())),
            (
                ".approvers_required",
                r.approvers_required.as_ref().map(|v| v.span()),
            ),
            (
                ".auto_approve_after",
                r.auto_approve_after.as_ref().map(|v| v.span()),
            ),
            (".approval_use", r.approval_use.as_ref().map(|v| v.span())),
        ] {
            if let Some(span) = span {
                let w = RuleWarning::ApprovalKeyUnused(&field[1..]);
                ck.warn(span.start, key.at(field), w);
            }
        }
    }
    out
}

/// Deny reasons are machine codes: `[a-z][a-z0-9_]{0,63}`.
fn valid_reason(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

//! `decide()`: SPEC section 3, in that exact order.

use super::model::*;
use super::snapshot::{Effect, Rule, Snapshot, Worker};

/// Decide one request against a snapshot.
///
/// The order of checks is the contract (SPEC 3): unknown capability, first matching rule
/// (none: `no_matching_rule`), `deny`, `require_approval`, then the first eligible candidate
/// worker in rank order (none: `no_eligible_worker`). An `Err` is not a policy outcome but a
/// malformed request (unknown env or label, bad id): the caller answers 400.
///
/// With `explain`, the decision carries a trace. The traced path walks every rule for the
/// capability (any env) instead of the per-(capability, env) index; both paths must agree
/// (a property test says so).
pub fn decide<'s>(
    snap: &'s Snapshot,
    req: &Request<'_>,
    explain: bool,
) -> Result<Decision<'s>, RequestError> {
    if !valid_id(req.capability_id) {
        return Err(bad_id("capability_id", req.capability_id));
    }
    if !valid_id(req.tenant_id) {
        return Err(bad_id("tenant_id", req.tenant_id));
    }
    let env = snap.env_index(req.env).ok_or_else(|| RequestError {
        field: "env",
        message: format!(
            "unknown environment {:?} (known: {})",
            req.env,
            snap.settings.environments.join(", ")
        ),
    })?;
    let label = snap
        .label_index(req.data_label)
        .ok_or_else(|| RequestError {
            field: "data_label",
            message: format!(
                "unknown data label {:?} (known: {})",
                req.data_label,
                snap.settings.data_labels.join(", ")
            ),
        })?;

    // 1. unknown capability
    let Some(&cap) = snap.cap_index.get(req.capability_id) else {
        let mut d = Decision::deny(UNKNOWN_CAPABILITY);
        if explain {
            d.explain = Some(Explain::default());
        }
        return Ok(d);
    };

    // 2. first matching rule
    let mut trace = explain.then(Explain::default);
    let found = match &mut trace {
        None => snap.rules_by_cap_env[cap as usize * snap.settings.environments.len() + env]
            .iter()
            .map(|&ri| &snap.rules[ri as usize])
            // `rule_mismatch` with its env test done by the index: this slot holds only
            // rules for this env (the proptest oracle checks the two agree).
            .find(|r| r.compiled.label_mask & (1 << label) != 0 && r.tenant_matches(req.tenant_id)),
        Some(t) => first_match_traced(snap, req, cap, env, label, t),
    };
    let Some(rule) = found else {
        let mut d = Decision::deny(NO_MATCHING_RULE);
        d.explain = trace;
        return Ok(d);
    };

    let mut d = Decision {
        allowed: false,
        worker_id: None,
        deny_reason: None,
        rule_id: Some(rule.id.as_str()),
        explain: None,
        approval: None,
    };
    match rule.effect {
        // 3. deny with the rule's reason
        Effect::Deny => d.deny_reason = Some(rule.reason.as_str()),
        // 4. require_approval and 5. allow: first eligible candidate. An approval binds the
        // worker step 5 selects; with none eligible nothing can be approved.
        Effect::Allow | Effect::RequireApproval => {
            let default_candidates;
            let candidates: &[u32] = match &rule.compiled.workers {
                Some(ws) => ws,
                None => {
                    default_candidates = &snap.workers_by_cap[cap as usize];
                    default_candidates
                }
            };
            let mut chosen = None;
            // Candidate indices come from `Snapshot::compile`, which resolves every name the
            // loader checked; one that does not resolve is a loader bug and is never chosen.
            for w in candidates
                .iter()
                .filter_map(|&wi| snap.workers.get(wi as usize))
            {
                let verdict = eligibility(snap, w, rule, cap, 1 << env, label);
                if let Some(t) = &mut trace {
                    t.candidates.push(CandidateTrace {
                        worker_id: &w.id,
                        eligible: verdict.is_ok(),
                        skipped: verdict.err().map(|(s, _)| s),
                        detail: verdict.err().and_then(|(_, d)| d),
                    });
                }
                if verdict.is_ok() {
                    chosen = Some(w.id.as_str());
                    break;
                }
            }
            match chosen {
                Some(w) if rule.effect == Effect::Allow => {
                    d.allowed = true;
                    d.worker_id = Some(w);
                }
                Some(w) => {
                    let settings = rule.approval;
                    d.deny_reason = Some(if settings.auto_approve_after_secs.is_some() {
                        HELD_FOR_VETO
                    } else {
                        APPROVAL_REQUIRED
                    });
                    d.approval = Some(ApprovalNeed {
                        digest: approval_digest(req, &rule.id, w),
                        worker_id: w,
                        settings,
                    });
                }
                None => d.deny_reason = Some(NO_ELIGIBLE_WORKER),
            }
        }
    }
    d.explain = trace;
    Ok(d)
}

/// The traced first-match: every rule whose capability patterns match the request, in file
/// order, each with the first condition that failed. Rules for other capabilities are not
/// "tried" and not listed, so a trace stays small on a large policy set.
fn first_match_traced<'s>(
    snap: &'s Snapshot,
    req: &Request<'_>,
    cap: u32,
    env: usize,
    label: usize,
    t: &mut Explain<'s>,
) -> Option<&'s Rule> {
    for &ri in &snap.rules_by_cap[cap as usize] {
        let r = &snap.rules[ri as usize];
        let mismatch = rule_mismatch(r, env, label, req.tenant_id);
        t.rules.push(RuleTrace {
            rule_id: &r.id,
            matched: mismatch.is_none(),
            mismatch,
        });
        if mismatch.is_none() {
            return Some(r);
        }
    }
    None
}

/// SPEC 3 step 2, **the** definition of "does this rule match", for a rule whose capability
/// patterns match the request's capability (the snapshot's per-capability indexes hold only
/// such rules): `None` if it matches, else the first condition that fails (`env`,
/// `data_label`, `tenant`), as the explain trace reports it.
///
/// The fast path, the explain trace and the linter all call this; a property test checks it
/// against the spec's wording (`engine/proptests.rs`).
#[inline]
pub(crate) fn rule_mismatch(
    r: &Rule,
    env: usize,
    label: usize,
    tenant: &str,
) -> Option<&'static str> {
    if r.compiled.env_mask & (1 << env) == 0 {
        Some("env")
    } else if r.compiled.label_mask & (1 << label) == 0 {
        Some("data_label")
    } else if !r.tenant_matches(tenant) {
        Some("tenant")
    } else {
        None
    }
}

/// Why a candidate worker was skipped: a reason code and, for `missing_control`, the control.
pub(crate) type Skip<'s> = (&'static str, Option<&'s str>);

/// SPEC 3 step 5, **the** definition of "is this worker eligible": enabled, offers the
/// capability, lists the env, cleared for the label, implements every required control,
/// blast radius within the rule's bound. `Ok` or the first condition that fails.
///
/// `envs` is a mask of environments and the worker must list at least one of them: a
/// request passes exactly its own (`1 << env`); the linter passes every env a rule matches,
/// asking "eligible for some request this rule matches".
#[inline]
pub(crate) fn eligibility<'s>(
    snap: &'s Snapshot,
    w: &Worker,
    rule: &Rule,
    cap: u32,
    envs: u64,
    label: usize,
) -> Result<(), Skip<'s>> {
    let c = &w.compiled;
    if !w.enabled {
        return Err(("disabled", None));
    }
    if c.caps.binary_search(&cap).is_err() {
        return Err(("capability_not_offered", None));
    }
    if c.env_mask & envs == 0 {
        return Err(("env_not_listed", None));
    }
    if (c.max_label as usize) < label {
        return Err(("label_not_cleared", None));
    }
    for &ctl in &rule.compiled.controls {
        if c.controls.binary_search(&ctl).is_err() {
            return Err((
                "missing_control",
                Some(snap.controls[ctl as usize].as_str()),
            ));
        }
    }
    if let Some(max) = rule.max_blast_radius {
        if w.blast_radius > max {
            return Err(("blast_radius_exceeded", None));
        }
    }
    Ok(())
}

fn bad_id(field: &'static str, value: &str) -> RequestError {
    RequestError {
        field,
        message: format!(
            "{value:?} is not a valid id (1-128 characters: letters, digits and . _ : @ / -, starting with a letter or digit)"
        ),
    }
}

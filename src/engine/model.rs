//! Requests, decisions and the explain trace.

use serde::Serialize;

/// Deny reason: the registry does not know the capability.
pub const UNKNOWN_CAPABILITY: &str = "unknown_capability";
/// Deny reason: no rule matched (fail closed).
pub const NO_MATCHING_RULE: &str = "no_matching_rule";
/// Deny reason: the matching rule has `effect = "deny"` and no `reason` of its own.
pub const DENIED_BY_POLICY: &str = "denied_by_policy";
/// Deny reason: the matching rule requires a human approval.
pub const APPROVAL_REQUIRED: &str = "approval_required";
/// Deny reason: the matching rule requires approval with a veto window; it is approved
/// unless someone denies it within the window.
pub const HELD_FOR_VETO: &str = "held_for_veto";
/// Deny reason: the rule allowed, but none of its candidate workers is eligible.
pub const NO_ELIGIBLE_WORKER: &str = "no_eligible_worker";

/// One capability request, borrowed from whatever carried it (JSON body, CLI flags, fixture).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request<'a> {
    pub capability_id: &'a str,
    pub env: &'a str,
    pub data_label: &'a str,
    pub tenant_id: &'a str,
}

/// A request that cannot be decided at all (a 400, not a policy outcome).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RequestError {
    /// The request field at fault, as named in the API.
    pub field: &'static str,
    pub message: String,
}

/// The outcome of [`crate::engine::decide`]. Borrows ids from the snapshot: no allocation
/// on the hot path unless an explain trace was asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision<'s> {
    pub allowed: bool,
    pub worker_id: Option<&'s str>,
    pub deny_reason: Option<&'s str>,
    pub rule_id: Option<&'s str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub explain: Option<Explain<'s>>,
    /// For a `require_approval` rule with an eligible worker: what a human must approve.
    #[serde(skip)]
    pub approval: Option<ApprovalNeed<'s>>,
}

/// What a `require_approval` decision asks a human to approve: the request digest (SPEC 3.1:
/// blake3 over capability, env, data label, tenant, rule id and the selected worker), the
/// worker that would do it, and the rule's approval settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalNeed<'s> {
    pub digest: [u8; 32],
    pub worker_id: &'s str,
    pub settings: crate::engine::ApprovalSettings,
}

/// The digest an approval is bound to. Each field is length-prefixed so no two different
/// requests can hash the same bytes; the domain string versions the construction.
pub fn approval_digest(req: &Request<'_>, rule_id: &str, worker_id: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"hall.approval.v1");
    for part in [
        req.capability_id,
        req.env,
        req.data_label,
        req.tenant_id,
        rule_id,
        worker_id,
    ] {
        h.update(&(part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    *h.finalize().as_bytes()
}

impl Decision<'_> {
    pub(crate) fn deny(reason: &str) -> Decision<'_> {
        Decision {
            allowed: false,
            worker_id: None,
            deny_reason: Some(reason),
            rule_id: None,
            explain: None,
            approval: None,
        }
    }
}

/// Why the engine decided what it did: every rule it looked at, every candidate worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Explain<'s> {
    pub rules: Vec<RuleTrace<'s>>,
    pub candidates: Vec<CandidateTrace<'s>>,
}

/// One rule as tried, in order. `mismatch` names the first condition that failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleTrace<'s> {
    pub rule_id: &'s str,
    pub matched: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mismatch: Option<&'static str>,
}

/// One candidate worker as walked in rank order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CandidateTrace<'s> {
    pub worker_id: &'s str,
    pub eligible: bool,
    /// Why it was skipped: `disabled`, `capability_not_offered`, `env_not_listed`,
    /// `label_not_cleared`, `missing_control`, `blast_radius_exceeded`, `unknown_worker`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skipped: Option<&'static str>,
    /// The control that was missing, for `missing_control`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'s str>,
}

/// The id syntax of SPEC 2.3: `[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}`.
pub fn valid_id(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b[1..].iter().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b':' | b'@' | b'/' | b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::valid_id;

    #[test]
    fn id_syntax() {
        for ok in [
            "a",
            "cap.doc.summarize",
            "org.acme",
            "A9",
            "x:y@z/w-v_u",
            &"a".repeat(128),
        ] {
            assert!(valid_id(ok), "{ok} should be valid");
        }
        for bad in [
            "",
            ".a",
            "-a",
            "a b",
            "a*",
            "é",
            "a\n",
            &"a".repeat(129),
            "a\"b",
        ] {
            assert!(!valid_id(bad), "{bad:?} should be invalid");
        }
    }
}

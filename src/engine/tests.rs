//! Unit tests for the decision core, driven through the real loader from in-memory TOML.
//!
//! Every test builds its snapshot with [`load_sources`], so what is pinned here is the
//! behaviour a user gets from files, not from hand-built structs.

use super::*;
use crate::load::{load_sources, Loaded, Source};

fn src(name: &str, text: &str) -> Source {
    Source {
        name: name.into(),
        text: text.into(),
    }
}

fn load(reg: &str, pol: &str) -> Loaded {
    load_sources(&[src("reg.toml", reg)], &[src("pol.toml", pol)])
        .unwrap_or_else(|e| panic!("expected the set to load, got:\n{e}"))
}

/// Every diagnostic of a failed load, as the user sees it.
fn load_errors(reg: &[(&str, &str)], pol: &[(&str, &str)]) -> Vec<String> {
    let reg: Vec<Source> = reg.iter().map(|(n, t)| src(n, t)).collect();
    let pol: Vec<Source> = pol.iter().map(|(n, t)| src(n, t)).collect();
    match load_sources(&reg, &pol) {
        Ok(_) => panic!("expected the load to fail"),
        Err(e) => e.diagnostics.iter().map(|d| d.to_string()).collect(),
    }
}

/// Every warning of a load that succeeded, as the user sees it.
fn warnings(reg: &str, pol: &str) -> Vec<String> {
    load(reg, pol)
        .warnings
        .iter()
        .map(|d| {
            assert_eq!(d.severity, Severity::Warning, "{d}");
            d.to_string()
        })
        .collect()
}

fn req<'a>(cap: &'a str, env: &'a str, label: &'a str, tenant: &'a str) -> Request<'a> {
    Request {
        capability_id: cap,
        env,
        data_label: label,
        tenant_id: tenant,
    }
}

/// Decide on both paths, check they agree, and return the traced decision.
fn decide_both<'s>(snap: &'s Snapshot, r: Request<'_>) -> Decision<'s> {
    let fast = decide(snap, &r, false).expect("valid request");
    let traced = decide(snap, &r, true).expect("valid request");
    assert!(fast.explain.is_none());
    assert!(traced.explain.is_some());
    let mut stripped = traced.clone();
    stripped.explain = None;
    assert_eq!(fast, stripped, "fast and explain paths disagree for {r:?}");
    traced
}

/// Capabilities chosen to probe prefix globs; one worker that is eligible for everything.
const REG: &str = r#"
[[capability]]
id = "cap.doc"
[[capability]]
id = "cap.doc.x"
[[capability]]
id = "cap.doc.x.y"
[[capability]]
id = "cap.docs.x"
[[capability]]
id = "cap.other"

[[worker]]
id = "w.all"
capabilities = ["cap.doc", "cap.doc.x", "cap.doc.x.y", "cap.docs.x", "cap.other"]
environments = ["dev", "staging", "prod"]
max_data_label = "SECRET"
controls = ["ctl.a"]
blast_radius = 0
"#;

// ---- deny reasons ------------------------------------------------------------------------

#[test]
fn deny_unknown_capability() {
    let l = load(REG, "[[rule]]\nid = \"any\"\neffect = \"allow\"\n");
    let d = decide_both(&l.snapshot, req("cap.nope", "dev", "PUBLIC", "t"));
    assert!(!d.allowed);
    assert_eq!(d.deny_reason, Some(UNKNOWN_CAPABILITY));
    assert_eq!(d.rule_id, None);
    assert_eq!(d.worker_id, None);
    // The catch-all rule is not even tried: the capability check comes first.
    assert!(d.explain.unwrap().rules.is_empty());
}

#[test]
fn deny_no_matching_rule() {
    let l = load(
        REG,
        "[[rule]]\nid = \"other\"\ncapabilities = [\"cap.other\"]\neffect = \"allow\"\n",
    );
    let d = decide_both(&l.snapshot, req("cap.doc", "dev", "PUBLIC", "t"));
    assert_eq!(
        (d.allowed, d.deny_reason, d.rule_id, d.worker_id),
        (false, Some(NO_MATCHING_RULE), None, None)
    );
    // And with no rules at all: fail closed.
    let l = load(REG, "");
    let d = decide_both(&l.snapshot, req("cap.doc", "dev", "PUBLIC", "t"));
    assert_eq!(d.deny_reason, Some(NO_MATCHING_RULE));
}

#[test]
fn deny_custom_reason_and_default_reason() {
    let l = load(
        REG,
        r#"
[[rule]]
id = "frozen"
capabilities = ["cap.doc"]
effect = "deny"
reason = "docs_frozen"

[[rule]]
id = "plain-deny"
capabilities = ["cap.other"]
effect = "deny"
"#,
    );
    let d = decide_both(&l.snapshot, req("cap.doc", "dev", "PUBLIC", "t"));
    assert_eq!(
        (d.allowed, d.deny_reason, d.rule_id, d.worker_id),
        (false, Some("docs_frozen"), Some("frozen"), None)
    );
    let d = decide_both(&l.snapshot, req("cap.other", "dev", "PUBLIC", "t"));
    assert_eq!(
        (d.allowed, d.deny_reason, d.rule_id, d.worker_id),
        (false, Some(DENIED_BY_POLICY), Some("plain-deny"), None)
    );
    // A deny decides before any worker is looked at.
    assert!(d.explain.unwrap().candidates.is_empty());
}

#[test]
fn deny_approval_required() {
    let l = load(
        REG,
        "[[rule]]\nid = \"ask\"\neffect = \"require_approval\"\nworkers = [\"w.all\"]\n",
    );
    let r = req("cap.doc", "prod", "SECRET", "t");
    let d = decide_both(&l.snapshot, r);
    assert_eq!(
        (d.allowed, d.deny_reason, d.rule_id, d.worker_id),
        (false, Some(APPROVAL_REQUIRED), Some("ask"), None)
    );
    // The approval is bound to the worker step 5 selects, and carries the rule's defaults.
    let need = d.approval.expect("an approval to open");
    assert_eq!(need.worker_id, "w.all");
    assert_eq!(need.digest, approval_digest(&r, "ask", "w.all"));
    assert_eq!(need.settings, ApprovalSettings::default());
    assert_eq!(need.settings.ttl_secs, 900);
    // Any change of the request changes the digest.
    for other in [
        req("cap.doc.x", "prod", "SECRET", "t"),
        req("cap.doc", "dev", "SECRET", "t"),
        req("cap.doc", "prod", "PUBLIC", "t"),
        req("cap.doc", "prod", "SECRET", "u"),
    ] {
        assert_ne!(
            need.digest,
            approval_digest(&other, "ask", "w.all"),
            "{other:?}"
        );
    }
    assert_ne!(need.digest, approval_digest(&r, "ask2", "w.all"));
    assert_ne!(need.digest, approval_digest(&r, "ask", "w.other"));
    // Length-prefixed: moving a character between fields changes the digest.
    assert_ne!(
        approval_digest(&req("ab", "c", "L", "t"), "r", "w"),
        approval_digest(&req("a", "bc", "L", "t"), "r", "w")
    );
}

#[test]
fn approval_keys_and_veto_window() {
    let l = load(
        REG,
        "[[rule]]\nid = \"ask\"\neffect = \"require_approval\"\nworkers = [\"w.all\"]\napproval_ttl = \"2h\"\napprovers_required = 2\nauto_approve_after = \"90s\"\napproval_use = \"10m\"\n",
    );
    let d = decide_both(&l.snapshot, req("cap.doc", "prod", "SECRET", "t"));
    assert_eq!(d.deny_reason, Some(HELD_FOR_VETO));
    assert_eq!(
        d.approval.unwrap().settings,
        ApprovalSettings {
            ttl_secs: 7200,
            approvers_required: 2,
            auto_approve_after_secs: Some(90),
            use_window_secs: Some(600),
        }
    );
}

#[test]
fn approval_without_an_eligible_worker_opens_nothing() {
    let l = load(
        REG,
        "[[rule]]\nid = \"ask\"\neffect = \"require_approval\"\nworkers = [\"w.all\"]\nmax_blast_radius = 0\nrequire_controls = [\"ctrl.none\"]\n",
    );
    let d = decide_both(&l.snapshot, req("cap.doc", "prod", "SECRET", "t"));
    assert_eq!(
        (d.allowed, d.deny_reason, d.approval),
        (false, Some(NO_ELIGIBLE_WORKER), None)
    );
}

#[test]
fn error_bad_approval_keys() {
    let rule = |extra: &str| {
        policy_errors(&format!(
            "[[rule]]\nid = \"r\"\neffect = \"require_approval\"\n{extra}\n"
        ))
    };
    assert_eq!(
        rule("approval_ttl = \"15 minutes\""),
        ["pol.toml:4:16: error: rule[r].approval_ttl: approval_ttl must be a duration from 1s to 30d such as \"90s\", \"15m\", \"2h\" or \"1d\", got \"15 minutes\""]
    );
    assert_eq!(rule("approval_ttl = \"31d\"").len(), 1,);
    assert_eq!(
        rule("approvers_required = 0"),
        ["pol.toml:4:22: error: rule[r].approvers_required: approvers_required must be between 1 and 10, got 0"]
    );
    assert_eq!(
        rule("approval_use = \"twice\""),
        ["pol.toml:4:16: error: rule[r].approval_use: approval_use must be \"once\" or a duration from 1s to 30d such as \"90s\", \"15m\", \"2h\" or \"1d\", got \"twice\""]
    );
    assert_eq!(
        rule("approval_ttl = \"1m\"\nauto_approve_after = \"5m\""),
        ["pol.toml:5:22: error: rule[r].auto_approve_after: auto_approve_after (300s) must be shorter than approval_ttl (60s), or the approval expires before its veto window ends"]
    );
    // On another effect: a warning, not an error.
    let w = warnings(
        REG,
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\napproval_ttl = \"5m\"\n",
    );
    assert!(
        w.iter().any(|w| w.contains(
            "rule[r].approval_ttl: approval_ttl is only used when effect = \"require_approval\""
        )),
        "{w:?}"
    );
}

#[test]
fn durations() {
    use crate::load::parse_duration;
    assert_eq!(parse_duration("15m"), Some(900));
    assert_eq!(parse_duration("1s"), Some(1));
    assert_eq!(parse_duration("2h"), Some(7200));
    assert_eq!(parse_duration("1d"), Some(86_400));
    for bad in [
        "",
        "m",
        "15",
        "1.5h",
        "-1m",
        " 1m",
        "1M",
        "1w",
        "9999999999s",
    ] {
        assert_eq!(parse_duration(bad), None, "{bad:?}");
    }
}

#[test]
fn deny_no_eligible_worker() {
    let reg = format!(
        "{REG}\n[[worker]]\nid = \"w.off\"\ncapabilities = [\"cap.doc\"]\nenvironments = [\"dev\"]\nmax_data_label = \"SECRET\"\nblast_radius = 0\nenabled = false\n"
    );
    let l = load(
        &reg,
        "[[rule]]\nid = \"only-off\"\neffect = \"allow\"\nworkers = [\"w.off\"]\n",
    );
    let d = decide_both(&l.snapshot, req("cap.doc", "dev", "PUBLIC", "t"));
    assert_eq!(
        (d.allowed, d.deny_reason, d.rule_id, d.worker_id),
        (false, Some(NO_ELIGIBLE_WORKER), Some("only-off"), None)
    );
}

// ---- match kinds -------------------------------------------------------------------------

/// Whether a single rule with `body` matches the request (the only worker is eligible for
/// everything, so a match is an allow and a miss is `no_matching_rule`).
fn rule_matches(settings: &str, body: &str, r: Request<'_>) -> bool {
    let pol = format!("{settings}\n[[rule]]\nid = \"r\"\neffect = \"allow\"\n{body}\n");
    let reg = if settings.is_empty() {
        REG.to_string()
    } else {
        REG.replace("SECRET", "HIGH")
    };
    let l = load(&reg, &pol);
    let d = decide_both(&l.snapshot, r);
    if d.allowed {
        assert_eq!((d.rule_id, d.worker_id), (Some("r"), Some("w.all")));
        true
    } else {
        assert_eq!(d.deny_reason, Some(NO_MATCHING_RULE), "{d:?}");
        false
    }
}

fn cap_matches(body: &str, cap: &str) -> bool {
    rule_matches("", body, req(cap, "dev", "PUBLIC", "t"))
}

#[test]
fn match_exact_capability() {
    let b = "capabilities = [\"cap.doc.x\"]";
    assert!(cap_matches(b, "cap.doc.x"));
    assert!(!cap_matches(b, "cap.doc"));
    assert!(!cap_matches(b, "cap.doc.x.y"));
    let b = "capabilities = [\"cap.doc\", \"cap.other\"]";
    assert!(cap_matches(b, "cap.doc"));
    assert!(cap_matches(b, "cap.other"));
    assert!(!cap_matches(b, "cap.doc.x"));
}

#[test]
fn match_prefix_glob_capability() {
    let b = "capabilities = [\"cap.doc.*\"]";
    assert!(cap_matches(b, "cap.doc.x"));
    assert!(cap_matches(b, "cap.doc.x.y"));
    assert!(
        !cap_matches(b, "cap.doc"),
        "the glob's own stem is not under it"
    );
    assert!(
        !cap_matches(b, "cap.docs.x"),
        "a glob matches whole segments"
    );
    assert!(!cap_matches(b, "cap.other"));
}

#[test]
fn match_any_capability_star_and_omitted() {
    for b in ["capabilities = [\"*\"]", ""] {
        for cap in ["cap.doc", "cap.doc.x.y", "cap.docs.x", "cap.other"] {
            assert!(cap_matches(b, cap), "{b:?} should match {cap}");
        }
    }
    // An empty list is not "any": it matches nothing.
    assert!(!cap_matches("capabilities = []", "cap.doc"));
}

#[test]
fn match_envs() {
    let m = |body: &str, env: &str| rule_matches("", body, req("cap.doc", env, "PUBLIC", "t"));
    let b = "envs = [\"dev\", \"prod\"]";
    assert!(m(b, "dev"));
    assert!(m(b, "prod"));
    assert!(!m(b, "staging"));
    for env in ["dev", "staging", "prod"] {
        assert!(m("", env), "omitted envs match {env}");
    }
}

#[test]
fn match_data_labels_list() {
    let m = |label: &str| {
        rule_matches(
            "",
            "data_labels = [\"PUBLIC\", \"CONFIDENTIAL\"]",
            req("cap.doc", "dev", label, "t"),
        )
    };
    assert!(m("PUBLIC"));
    assert!(!m("INTERNAL"), "a list is a set, not a range");
    assert!(m("CONFIDENTIAL"));
    assert!(!m("SECRET"));
}

#[test]
fn match_max_data_label_is_inclusive_and_ordered_by_settings() {
    // Labels in an order that is not alphabetical: the bound must follow [settings].
    let settings = "[settings]\ndata_labels = [\"LOW\", \"MID\", \"HIGH\"]";
    let m = |label: &str| {
        rule_matches(
            settings,
            "max_data_label = \"MID\"",
            req("cap.doc", "dev", label, "t"),
        )
    };
    assert!(m("LOW"));
    assert!(m("MID"), "the bound is inclusive");
    assert!(!m("HIGH"));
    // Omitted: any label.
    for label in ["LOW", "MID", "HIGH"] {
        assert!(rule_matches(
            settings,
            "",
            req("cap.doc", "dev", label, "t")
        ));
    }
}

#[test]
fn match_tenants() {
    let m =
        |body: &str, tenant: &str| rule_matches("", body, req("cap.doc", "dev", "PUBLIC", tenant));
    let b = "tenants = [\"org.acme\", \"org.beta.*\"]";
    assert!(m(b, "org.acme"));
    assert!(!m(b, "org.acme.sub"), "an exact tenant is exact");
    assert!(m(b, "org.beta.eu"));
    assert!(m(b, "org.beta.eu.x"));
    assert!(!m(b, "org.beta"));
    assert!(!m(b, "org.betamax.x"));
    assert!(!m(b, "org.gamma"));
    for t in ["org.acme", "x", "org.beta"] {
        assert!(m("", t), "omitted tenants match {t}");
        assert!(m("tenants = [\"*\"]", t));
    }
    assert!(!m("tenants = []", "org.acme"));
}

// ---- eligibility -------------------------------------------------------------------------

const ELIG_REG: &str = r#"
[[capability]]
id = "cap.x"
[[capability]]
id = "cap.y"

[[worker]]
id = "w.disabled"
capabilities = ["cap.x"]
environments = ["dev", "staging", "prod"]
max_data_label = "SECRET"
controls = ["ctl.a", "ctl.b"]
blast_radius = 0
enabled = false

[[worker]]
id = "w.other"
capabilities = ["cap.y"]
environments = ["dev", "staging", "prod"]
max_data_label = "SECRET"
controls = ["ctl.a", "ctl.b"]
blast_radius = 0

[[worker]]
id = "w.devonly"
capabilities = ["cap.x"]
environments = ["dev"]
max_data_label = "SECRET"
controls = ["ctl.a", "ctl.b"]
blast_radius = 0

[[worker]]
id = "w.internal"
capabilities = ["cap.x"]
environments = ["dev", "staging", "prod"]
max_data_label = "INTERNAL"
controls = ["ctl.a", "ctl.b"]
blast_radius = 0

[[worker]]
id = "w.no-b"
capabilities = ["cap.x"]
environments = ["dev", "staging", "prod"]
max_data_label = "SECRET"
controls = ["ctl.a"]
blast_radius = 0

[[worker]]
id = "w.big"
capabilities = ["cap.x"]
environments = ["dev", "staging", "prod"]
max_data_label = "SECRET"
controls = ["ctl.a", "ctl.b"]
blast_radius = 6

[[worker]]
id = "w.edge"
capabilities = ["cap.x", "cap.y"]
environments = ["prod"]
max_data_label = "CONFIDENTIAL"
controls = ["ctl.b", "ctl.a", "ctl.extra"]
blast_radius = 5
"#;

const ELIG_POL: &str = r#"
[[rule]]
id = "ranked"
capabilities = ["cap.x"]
effect = "allow"
workers = ["w.disabled", "w.other", "w.devonly", "w.internal", "w.no-b", "w.big", "w.edge"]
require_controls = ["ctl.a", "ctl.b"]
max_blast_radius = 5
"#;

fn skips(d: &Decision<'_>) -> Vec<(String, bool, Option<String>, Option<String>)> {
    d.explain
        .as_ref()
        .unwrap()
        .candidates
        .iter()
        .map(|c| {
            (
                c.worker_id.to_string(),
                c.eligible,
                c.skipped.map(String::from),
                c.detail.map(String::from),
            )
        })
        .collect()
}

#[test]
fn eligibility_each_skip_reason_in_rank_order() {
    let l = load(ELIG_REG, ELIG_POL);
    // Every check passes exactly at its boundary for w.edge: prod, CONFIDENTIAL, radius 5.
    let d = decide_both(&l.snapshot, req("cap.x", "prod", "CONFIDENTIAL", "t"));
    assert!(d.allowed);
    assert_eq!(d.worker_id, Some("w.edge"));
    assert_eq!(d.rule_id, Some("ranked"));
    let s = |w: &str, r: Option<&str>, det: Option<&str>| {
        (
            w.to_string(),
            r.is_none(),
            r.map(String::from),
            det.map(String::from),
        )
    };
    assert_eq!(
        skips(&d),
        vec![
            s("w.disabled", Some("disabled"), None),
            s("w.other", Some("capability_not_offered"), None),
            s("w.devonly", Some("env_not_listed"), None),
            s("w.internal", Some("label_not_cleared"), None),
            s("w.no-b", Some("missing_control"), Some("ctl.b")),
            s("w.big", Some("blast_radius_exceeded"), None),
            s("w.edge", None, None),
        ]
    );
}

#[test]
fn eligibility_moves_with_the_request() {
    let l = load(ELIG_REG, ELIG_POL);
    let pick = |env, label| {
        let d = decide_both(&l.snapshot, req("cap.x", env, label, "t"));
        (d.worker_id, d.deny_reason)
    };
    // In dev, w.devonly is the first eligible.
    assert_eq!(pick("dev", "PUBLIC"), (Some("w.devonly"), None));
    // In staging at INTERNAL, w.internal is cleared (label bound is inclusive).
    assert_eq!(pick("staging", "INTERNAL"), (Some("w.internal"), None));
    // In staging at SECRET: w.internal is not cleared, w.no-b misses ctl.b, w.big is too
    // big and w.edge is prod-only: nobody.
    assert_eq!(pick("staging", "SECRET"), (None, Some(NO_ELIGIBLE_WORKER)));
    // In prod at SECRET, w.edge is not cleared either.
    assert_eq!(pick("prod", "SECRET"), (None, Some(NO_ELIGIBLE_WORKER)));
}

#[test]
fn missing_control_names_the_first_missing_one() {
    let l = load(
        ELIG_REG,
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\nworkers = [\"w.no-b\"]\nrequire_controls = [\"ctl.z\", \"ctl.a\"]\n",
    );
    let d = decide_both(&l.snapshot, req("cap.x", "dev", "PUBLIC", "t"));
    assert_eq!(d.deny_reason, Some(NO_ELIGIBLE_WORKER));
    let c = &d.explain.as_ref().unwrap().candidates[0];
    assert_eq!(
        (c.skipped, c.detail),
        (Some("missing_control"), Some("ctl.z"))
    );
}

#[test]
fn no_rule_bounds_means_no_control_or_radius_check() {
    let l = load(
        ELIG_REG,
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\nworkers = [\"w.big\"]\n",
    );
    let d = decide_both(&l.snapshot, req("cap.x", "prod", "SECRET", "t"));
    assert_eq!(d.worker_id, Some("w.big"));
}

// ---- rank order --------------------------------------------------------------------------

const RANK_REG: &str = r#"
[[capability]]
id = "cap.x"
[[capability]]
id = "cap.y"

[[worker]]
id = "w.c"
capabilities = ["cap.x"]
environments = ["dev", "prod"]
max_data_label = "SECRET"
blast_radius = 0

[[worker]]
id = "w.a"
capabilities = ["cap.x"]
environments = ["prod"]
max_data_label = "SECRET"
blast_radius = 0

[[worker]]
id = "w.0"
capabilities = ["cap.y"]
environments = ["dev", "prod"]
max_data_label = "SECRET"
blast_radius = 0

[[worker]]
id = "w.b"
capabilities = ["cap.x"]
environments = ["dev", "prod"]
max_data_label = "SECRET"
blast_radius = 0
"#;

#[test]
fn rank_explicit_workers_list_order_wins() {
    let l = load(
        RANK_REG,
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\nworkers = [\"w.c\", \"w.b\", \"w.a\"]\n",
    );
    let d = decide_both(&l.snapshot, req("cap.x", "prod", "PUBLIC", "t"));
    assert_eq!(d.worker_id, Some("w.c"));
    let ids: Vec<_> = skips(&d).into_iter().map(|s| s.0).collect();
    assert_eq!(ids, ["w.c"], "the walk stops at the first eligible worker");
}

#[test]
fn rank_omitted_workers_are_offering_workers_by_id() {
    let l = load(RANK_REG, "[[rule]]\nid = \"r\"\neffect = \"allow\"\n");
    assert_eq!(l.snapshot.workers_offering("cap.x"), ["w.a", "w.b", "w.c"]);
    // prod: w.a (first by id, though defined second) is eligible.
    let d = decide_both(&l.snapshot, req("cap.x", "prod", "PUBLIC", "t"));
    assert_eq!(d.worker_id, Some("w.a"));
    // dev: w.a is skipped, w.b is next by id (w.0 does not offer cap.x and is not a candidate).
    let d = decide_both(&l.snapshot, req("cap.x", "dev", "PUBLIC", "t"));
    assert_eq!(d.worker_id, Some("w.b"));
    let ids: Vec<_> = skips(&d)
        .into_iter()
        .map(|s| (s.0, s.2.unwrap_or_default()))
        .collect();
    assert_eq!(
        ids,
        [
            ("w.a".to_string(), "env_not_listed".to_string()),
            ("w.b".to_string(), String::new())
        ]
    );
}

#[test]
fn rank_explicit_list_naming_a_non_offering_worker_skips_it() {
    let l = load(
        RANK_REG,
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\nworkers = [\"w.0\", \"w.b\"]\n",
    );
    let d = decide_both(&l.snapshot, req("cap.x", "dev", "PUBLIC", "t"));
    assert_eq!(d.worker_id, Some("w.b"));
    assert_eq!(
        skips(&d)[0],
        (
            "w.0".to_string(),
            false,
            Some("capability_not_offered".to_string()),
            None
        )
    );
}

// ---- first match wins --------------------------------------------------------------------

#[test]
fn first_matching_rule_wins_in_file_then_rule_order() {
    let reg = [src("reg.toml", REG)];
    let a = src(
        "10-a.toml",
        "[[rule]]\nid = \"a1\"\ncapabilities = [\"cap.other\"]\neffect = \"deny\"\nreason = \"a_one\"\n\n[[rule]]\nid = \"a2\"\ncapabilities = [\"cap.doc.*\"]\neffect = \"deny\"\nreason = \"a_two\"\n",
    );
    let b = src("20-b.toml", "[[rule]]\nid = \"b1\"\neffect = \"allow\"\n");
    let l = load_sources(&reg, &[a.clone(), b.clone()]).unwrap();
    let s = &l.snapshot;
    let d = decide_both(s, req("cap.doc.x", "dev", "PUBLIC", "t"));
    assert_eq!((d.rule_id, d.deny_reason), (Some("a2"), Some("a_two")));
    let d = decide_both(s, req("cap.other", "dev", "PUBLIC", "t"));
    assert_eq!((d.rule_id, d.deny_reason), (Some("a1"), Some("a_one")));
    let d = decide_both(s, req("cap.doc", "dev", "PUBLIC", "t"));
    assert_eq!((d.rule_id, d.allowed), (Some("b1"), true));

    // The same files given the other way round: the catch-all now decides everything.
    let l = load_sources(&reg, &[b, a]).unwrap();
    let d = decide_both(&l.snapshot, req("cap.doc.x", "dev", "PUBLIC", "t"));
    assert_eq!((d.rule_id, d.allowed), (Some("b1"), true));
}

// ---- determinism and the policy version --------------------------------------------------

#[test]
fn same_files_same_decisions_across_independent_loads() {
    // Deciding twice on one immutable snapshot could not fail. Two loads of the same files
    // build their own hash maps (each with its own random seed), so a decision that depended
    // on a map's iteration order, or on anything but the files and the request, shows here.
    let pol = format!(
        "{ELIG_POL}\n[[rule]]\nid = \"by-id\"\ncapabilities = [\"cap.y\"]\neffect = \"allow\"\n"
    );
    let loads: Vec<Loaded> = (0..4).map(|_| load(ELIG_REG, &pol)).collect();
    let (mut allowed, mut denied) = (0, 0);
    for cap in ["cap.x", "cap.y", "cap.z"] {
        for env in ["dev", "staging", "prod"] {
            for label in ["PUBLIC", "INTERNAL", "CONFIDENTIAL", "SECRET"] {
                let r = req(cap, env, label, "t");
                for explain in [false, true] {
                    let first = decide(&loads[0].snapshot, &r, explain).unwrap();
                    for l in &loads[1..] {
                        assert_eq!(l.snapshot.version, loads[0].snapshot.version);
                        assert_eq!(decide(&l.snapshot, &r, explain).unwrap(), first, "{r:?}");
                    }
                    if first.allowed {
                        allowed += 1;
                    } else {
                        denied += 1;
                    }
                }
            }
        }
    }
    assert!(
        allowed > 0 && denied > 0,
        "{allowed} allowed, {denied} denied"
    );
}

#[test]
fn policy_version_follows_every_byte_and_the_file_order() {
    let reg = vec![src("reg.toml", REG)];
    let p1 = src("10.toml", "[[rule]]\nid = \"a\"\neffect = \"allow\"\n");
    let p2 = src(
        "20.toml",
        "[[rule]]\nid = \"b\"\neffect = \"deny\"\ncapabilities = [\"cap.doc\"]\n",
    );
    let version = |reg: &[Source], pol: &[Source]| load_sources(reg, pol).unwrap().snapshot.version;
    let v = version(&reg, &[p1.clone(), p2.clone()]);
    assert!(
        v.starts_with("blake3:") && v.len() == "blake3:".len() + 64,
        "{v}"
    );
    assert_eq!(v, version(&reg, &[p1.clone(), p2.clone()]), "same files");

    // One byte anywhere, even a comment or trailing whitespace, is a new version.
    let mut edited_reg = reg.clone();
    edited_reg[0].text.push('\n');
    assert_ne!(v, version(&edited_reg, &[p1.clone(), p2.clone()]));
    let mut q = p2.clone();
    q.text = q.text.replace("cap.doc", "cap.doc.x");
    assert_ne!(v, version(&reg, &[p1.clone(), q]));
    let mut q = p1.clone();
    q.text.insert_str(0, "# hi\n");
    assert_ne!(v, version(&reg, &[q, p2.clone()]));
    // Order is part of the meaning, so part of the version.
    assert_ne!(v, version(&reg, &[p2.clone(), p1.clone()]));
    // Moving a byte from one file to the next is a different set, not the same bytes.
    let mut a = p1.clone();
    let mut b = p2.clone();
    a.text.push('\n');
    b.text.remove(b.text.len() - 1);
    assert_ne!(v, version(&reg, &[a, b]));
}

// ---- request errors ----------------------------------------------------------------------

#[test]
fn request_errors_name_the_field() {
    let l = load(REG, "[[rule]]\nid = \"any\"\neffect = \"allow\"\n");
    let s = &l.snapshot;
    let err = |r: Request<'_>| decide(s, &r, false).unwrap_err();

    let e = err(req("cap.doc", "qa", "PUBLIC", "t"));
    assert_eq!(e.field, "env");
    assert!(
        e.message.contains("\"qa\"") && e.message.contains("dev, staging, prod"),
        "{e}"
    );
    let e = err(req("cap.doc", "dev", "public", "t"));
    assert_eq!(e.field, "data_label");
    assert!(
        e.message.contains("\"public\"") && e.message.contains("PUBLIC, INTERNAL"),
        "{e}"
    );
    for bad in ["", "cap doc", ".cap", "cap.*"] {
        assert_eq!(err(req(bad, "dev", "PUBLIC", "t")).field, "capability_id");
    }
    for bad in ["", "org acme", "org.*", "-x"] {
        assert_eq!(err(req("cap.doc", "dev", "PUBLIC", bad)).field, "tenant_id");
    }
    // The same with explain: errors do not depend on the path.
    assert_eq!(
        decide(s, &req("cap.doc", "qa", "PUBLIC", "t"), true)
            .unwrap_err()
            .field,
        "env"
    );
    assert_eq!(
        err(req("cap.doc", "qa", "PUBLIC", "t"))
            .to_string()
            .split(':')
            .next(),
        Some("env")
    );
}

// ---- validation errors (as the user sees them) -------------------------------------------

const REG_A: &str = r#"[[capability]]
id = "cap.a"

[[worker]]
id = "w.a"
capabilities = ["cap.a"]
environments = ["dev"]
max_data_label = "PUBLIC"
blast_radius = 1
"#;

fn policy_errors(pol: &str) -> Vec<String> {
    load_errors(&[("reg.toml", REG_A)], &[("pol.toml", pol)])
}

#[test]
fn error_toml_syntax() {
    assert_eq!(
        load_errors(&[("reg.toml", "[[capability]\nid = \"x\"\n")], &[]),
        ["reg.toml:1:13: error: invalid table header: expected `.`, `]]`"]
    );
    let e = policy_errors("[[rule]]\nid = \"r\"\neffect = allow\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("pol.toml:3:10: error: "), "{e:?}");
    assert!(!e[0].contains('\n'), "one finding per line: {e:?}");
}

#[test]
fn error_syntax_in_one_file_does_not_hide_another() {
    let e = load_errors(
        &[("reg.toml", REG_A)],
        &[
            ("a.toml", "[[rule]\n"),
            ("b.toml", "[[rule]]\nid = \"r\"\neffect = \"maybe\"\n"),
        ],
    );
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].starts_with("a.toml:1:"), "{e:?}");
    assert!(
        e[1].starts_with("b.toml:3:10: error: rule[r].effect"),
        "{e:?}"
    );
}

#[test]
fn error_unknown_keys() {
    assert_eq!(
        load_errors(&[("reg.toml", "[[capability]]\nid = \"x\"\nname = \"y\"\n")], &[]),
        ["reg.toml:3:1: error: name: unknown key `name`, expected one of `id`, `description`, `owner`, `contact`"]
    );
    let e = load_errors(
        &[(
            "reg.toml",
            &REG_A.replace("blast_radius = 1", "blast_radius = 1\nsecret = []"),
        )],
        &[],
    );
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("reg.toml:10:1: error: secret: unknown key `secret`"),
        "{e:?}"
    );
    assert_eq!(
        load_errors(&[("reg.toml", "[[capabilty]]\nid = \"x\"\n")], &[]),
        ["reg.toml:1:3: error: capabilty: unknown key `capabilty`, expected `capability` or `worker`; did you mean `capability`?"]
    );
    let e = policy_errors("[[rule]]\nid = \"r\"\neffect = \"allow\"\nworker = [\"w.a\"]\n");
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with("pol.toml:4:1: error: worker: unknown key `worker`, expected one of `id`"),
        "{e:?}"
    );
    assert_eq!(
        policy_errors("[settings]\nenvironments = [\"dev\"]\nenvs = [\"dev\"]\n"),
        ["pol.toml:3:1: error: envs: unknown key `envs`, expected `environments` or `data_labels`"]
    );
}

#[test]
fn error_missing_key() {
    assert_eq!(
        load_errors(
            &[(
                "reg.toml",
                "[[capability]]\nid = \"c\"\n\n[[worker]]\nid = \"w\"\n"
            )],
            &[]
        ),
        ["reg.toml:4:1: error: missing key `capabilities`"]
    );
}

#[test]
fn error_duplicate_ids_name_the_first_location() {
    let reg2 = "[[capability]]\nid = \"cap.a\"\n\n[[worker]]\nid = \"w.a\"\ncapabilities = [\"cap.a\"]\nenvironments = [\"dev\"]\nmax_data_label = \"PUBLIC\"\nblast_radius = 1\n";
    assert_eq!(
        load_errors(&[("a.toml", REG_A), ("b.toml", reg2)], &[]),
        [
            "b.toml:2:6: error: capability[cap.a].id: duplicate capability id (first defined at a.toml:2:6)",
            "b.toml:5:6: error: worker[w.a].id: duplicate worker id (first defined at a.toml:5:6)",
        ]
    );
    // Within one file too.
    let e = load_errors(
        &[(
            "a.toml",
            &format!("{REG_A}\n[[capability]]\nid = \"cap.a\"\n"),
        )],
        &[],
    );
    assert_eq!(
        e,
        ["a.toml:12:6: error: capability[cap.a].id: duplicate capability id (first defined at a.toml:2:6)"]
    );
    // Rules: within a file and across files.
    let rule = "[[rule]]\nid = \"r\"\neffect = \"allow\"\n";
    assert_eq!(
        load_errors(
            &[("reg.toml", REG_A)],
            &[
                ("p.toml", &format!("{rule}{rule}")),
                ("q.toml", &format!("\n{rule}"))
            ]
        ),
        [
            "p.toml:5:6: error: rule[r].id: duplicate rule id (first defined at p.toml:2:6)",
            "q.toml:3:6: error: rule[r].id: duplicate rule id (first defined at p.toml:2:6)",
        ]
    );
}

#[test]
fn error_unknown_references() {
    assert_eq!(
        policy_errors("[[rule]]\nid = \"r\"\neffect = \"allow\"\nworkers = [\"w.a\", \"w.zz\"]\n"),
        ["pol.toml:4:19: error: rule[r].workers: unknown worker \"w.zz\": no [[worker]] has this id"]
    );
    let reg = REG_A.replace("[\"cap.a\"]", "[\"cap.a\", \"cap.zz\"]");
    assert_eq!(
        load_errors(&[("reg.toml", &reg)], &[]),
        ["reg.toml:6:26: error: worker[w.a].capabilities: unknown capability \"cap.zz\": no [[capability]] has this id"]
    );
}

#[test]
fn error_env_and_label_not_in_settings() {
    assert_eq!(
        policy_errors("[[rule]]\nid = \"r\"\neffect = \"allow\"\nenvs = [\"dev\", \"qa\"]\n"),
        ["pol.toml:4:16: error: rule[r].envs: unknown environment \"qa\": [settings] defines dev, staging, prod"]
    );
    assert_eq!(
        policy_errors("[[rule]]\nid = \"r\"\neffect = \"allow\"\ndata_labels = [\"TOP\"]\n"),
        ["pol.toml:4:16: error: rule[r].data_labels: unknown data label \"TOP\": [settings] defines PUBLIC, INTERNAL, CONFIDENTIAL, SECRET"]
    );
    assert_eq!(
        policy_errors("[[rule]]\nid = \"r\"\neffect = \"allow\"\nmax_data_label = \"public\"\n"),
        ["pol.toml:4:18: error: rule[r].max_data_label: unknown data label \"public\" (did you mean \"PUBLIC\"?): [settings] defines PUBLIC, INTERNAL, CONFIDENTIAL, SECRET"]
    );
    // Workers are checked against the settings of the policy files.
    let e = load_errors(
        &[("reg.toml", REG_A)],
        &[(
            "pol.toml",
            "[settings]\nenvironments = [\"prod\"]\ndata_labels = [\"OPEN\"]\n",
        )],
    );
    assert_eq!(
        e,
        [
            "reg.toml:7:17: error: worker[w.a].environments: unknown environment \"dev\": [settings] defines prod",
            "reg.toml:8:18: error: worker[w.a].max_data_label: unknown data label \"PUBLIC\": [settings] defines OPEN",
        ]
    );
}

#[test]
fn error_invalid_ids() {
    assert_eq!(
        policy_errors("[[rule]]\nid = \"-r\"\neffect = \"allow\"\n"),
        ["pol.toml:2:6: error: rule[-r].id: rule id \"-r\" is not a valid id: use 1-128 characters from letters, digits and . _ : @ / -, starting with a letter or digit"]
    );
    let e = load_errors(&[("reg.toml", "[[capability]]\nid = \"cap a\"\n")], &[]);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].starts_with(
            "reg.toml:2:6: error: capability[cap a].id: capability id \"cap a\" is not a valid id"
        ),
        "{e:?}"
    );
    let long = "w".repeat(129);
    let e = load_errors(
        &[(
            "reg.toml",
            &REG_A.replace("\"w.a\"", &format!("\"{long}\"")),
        )],
        &[],
    );
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("reg.toml:5:6: error: worker["), "{e:?}");
    assert!(e[0].contains("is not a valid id"), "{e:?}");
    let e = load_errors(
        &[(
            "reg.toml",
            &REG_A.replace(
                "blast_radius = 1",
                "blast_radius = 1\ncontrols = [\"audit log\"]",
            ),
        )],
        &[],
    );
    assert_eq!(
        e,
        ["reg.toml:10:13: error: worker[w.a].controls: control \"audit log\" is not a valid id: use 1-128 characters from letters, digits and . _ : @ / -, starting with a letter or digit"]
    );
}

#[test]
fn error_both_label_forms() {
    assert_eq!(
        policy_errors("[[rule]]\nid = \"r\"\neffect = \"allow\"\ndata_labels = [\"PUBLIC\"]\nmax_data_label = \"PUBLIC\"\n"),
        ["pol.toml:5:18: error: rule[r].max_data_label: a rule may have data_labels or max_data_label, not both"]
    );
}

#[test]
fn error_bad_effect_radius_and_reason() {
    assert_eq!(
        policy_errors("[[rule]]\nid = \"r\"\neffect = \"permit\"\n"),
        ["pol.toml:3:10: error: rule[r].effect: effect must be \"allow\", \"deny\" or \"require_approval\", got \"permit\""]
    );
    assert_eq!(
        policy_errors("[[rule]]\nid = \"r\"\neffect = \"allow\"\nmax_blast_radius = 11\n"),
        ["pol.toml:4:20: error: rule[r].max_blast_radius: max_blast_radius must be between 0 and 10, got 11"]
    );
    assert_eq!(
        policy_errors("[[rule]]\nid = \"r\"\neffect = \"allow\"\nmax_blast_radius = -1\n"),
        ["pol.toml:4:20: error: rule[r].max_blast_radius: max_blast_radius must be between 0 and 10, got -1"]
    );
    for (v, col) in [("11", 16), ("-1", 16)] {
        let e = load_errors(
            &[(
                "reg.toml",
                &REG_A.replace("blast_radius = 1", &format!("blast_radius = {v}")),
            )],
            &[],
        );
        assert_eq!(
            e,
            [format!("reg.toml:9:{col}: error: worker[w.a].blast_radius: blast_radius must be between 0 and 10, got {v}")]
        );
    }
    // Bounds are inclusive: 0 and 10 load.
    load(
        &REG_A.replace("blast_radius = 1", "blast_radius = 10"),
        "[[rule]]\nid = \"r\"\neffect = \"allow\"\nmax_blast_radius = 0\n",
    );
    let e = policy_errors("[[rule]]\nid = \"r\"\neffect = \"deny\"\nreason = \"Docs Frozen\"\n");
    assert_eq!(
        e,
        ["pol.toml:4:10: error: rule[r].reason: reason \"Docs Frozen\" is not a machine code: use 1-64 characters from a-z, 0-9 and _, starting with a letter"]
    );
}

#[test]
fn error_settings_in_two_files() {
    let s = "[settings]\nenvironments = [\"dev\"]\n";
    assert_eq!(
        load_errors(&[("reg.toml", REG_A)], &[("a.toml", s), ("b.toml", &format!("\n{s}"))]),
        ["b.toml:2:1: error: settings: [settings] is already defined at a.toml:1:1; at most one file may hold it"]
    );
}

#[test]
fn error_bad_settings_lists() {
    let e = policy_errors("[settings]\nenvironments = [\"dev\", \"dev\"]\n");
    assert_eq!(
        e,
        ["pol.toml:2:24: error: settings.environments: \"dev\" is listed twice"]
    );
    let e = policy_errors("\n[settings]\ndata_labels = []\n");
    assert!(
        e.contains(
            &"pol.toml:2:1: error: settings.data_labels: must list between 1 and 64 values"
                .to_string()
        ),
        "{e:?}"
    );
}

#[test]
fn error_invalid_patterns() {
    assert_eq!(
        policy_errors("[[rule]]\nid = \"r\"\neffect = \"allow\"\ncapabilities = [\"cap.*.x\", \"ca*\", \"*.*\"]\ntenants = [\"org.*.eu\"]\n"),
        [
            "pol.toml:4:17: error: rule[r].capabilities: \"cap.*.x\" is not a valid pattern: use an exact id, a prefix glob ending in \".*\", or \"*\"",
            "pol.toml:4:28: error: rule[r].capabilities: \"ca*\" is not a valid pattern: use an exact id, a prefix glob ending in \".*\", or \"*\"",
            "pol.toml:4:35: error: rule[r].capabilities: \"*.*\" is not a valid pattern: use an exact id, a prefix glob ending in \".*\", or \"*\"",
            "pol.toml:5:12: error: rule[r].tenants: \"org.*.eu\" is not a valid pattern: use an exact id, a prefix glob ending in \".*\", or \"*\"",
        ]
    );
}

#[test]
fn errors_are_all_reported_not_just_the_first() {
    let e = policy_errors(
        "[[rule]]\nid = \"r\"\neffect = \"permit\"\nenvs = [\"qa\"]\nworkers = [\"w.zz\"]\n",
    );
    assert_eq!(e.len(), 3, "{e:?}");
}

// ---- warnings ----------------------------------------------------------------------------

#[test]
fn warn_shadowed_rule() {
    let w = warnings(
        REG,
        "[[rule]]\nid = \"broad\"\ncapabilities = [\"cap.doc.*\"]\nenvs = [\"dev\", \"prod\"]\neffect = \"allow\"\n\n[[rule]]\nid = \"narrow\"\ncapabilities = [\"cap.doc.x\"]\nenvs = [\"prod\"]\ntenants = [\"org.a\"]\neffect = \"deny\"\n",
    );
    assert_eq!(
        w,
        ["pol.toml:8:6: warning: rule[narrow]: shadowed by rule \"broad\" at pol.toml:2:6: that earlier rule matches every request this one does"]
    );
    // tenants = ["*"] covers an omitted tenants list.
    let w = warnings(
        REG,
        "[[rule]]\nid = \"a\"\ntenants = [\"*\"]\neffect = \"allow\"\n\n[[rule]]\nid = \"b\"\ncapabilities = [\"cap.other\"]\neffect = \"allow\"\n",
    );
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(w[0].contains("rule[b]: shadowed by rule \"a\""), "{w:?}");
}

#[test]
fn not_shadowed_when_broader_in_one_dimension() {
    let first = "[[rule]]\nid = \"first\"\ncapabilities = [\"cap.doc.*\"]\nenvs = [\"prod\"]\ndata_labels = [\"PUBLIC\"]\ntenants = [\"org.*\"]\neffect = \"allow\"\n\n";
    for second in [
        "capabilities = [\"cap.doc\"]\nenvs = [\"prod\"]\ndata_labels = [\"PUBLIC\"]\ntenants = [\"org.a\"]",
        "capabilities = [\"cap.doc.x\"]\nenvs = [\"prod\", \"dev\"]\ndata_labels = [\"PUBLIC\"]\ntenants = [\"org.a\"]",
        "capabilities = [\"cap.doc.x\"]\nenvs = [\"prod\"]\nmax_data_label = \"INTERNAL\"\ntenants = [\"org.a\"]",
        "capabilities = [\"cap.doc.x\"]\nenvs = [\"prod\"]\ndata_labels = [\"PUBLIC\"]\ntenants = [\"org\"]",
        "capabilities = [\"cap.doc.x\"]\nenvs = [\"prod\"]\ndata_labels = [\"PUBLIC\"]",
    ] {
        let pol = format!("{first}[[rule]]\nid = \"second\"\neffect = \"deny\"\n{second}\n");
        assert_eq!(warnings(REG, &pol), Vec::<String>::new(), "{second}");
        // And the second rule really is reachable.
        let l = load(REG, &pol);
        let hits = ["cap.doc", "cap.doc.x"].iter().any(|c| {
            ["prod", "dev"].iter().any(|e| {
                ["PUBLIC", "INTERNAL"].iter().any(|lb| {
                    ["org", "org.a", "x"].iter().any(|t| {
                        decide(&l.snapshot, &req(c, e, lb, t), false).unwrap().rule_id
                            == Some("second")
                    })
                })
            })
        });
        assert!(hits, "{second} should be reachable");
    }
}

#[test]
fn warn_capability_no_worker_offers() {
    let reg = format!("{REG}\n[[capability]]\nid = \"cap.lonely\"\n");
    let w = warnings(&reg, "");
    assert_eq!(
        w,
        ["reg.toml:22:6: warning: capability[cap.lonely]: no worker offers this capability"]
    );
}

#[test]
fn warn_rule_can_never_select_a_worker() {
    let cases = [
        // The only offering worker is disabled.
        ("workers = [\"w.disabled\"]", ""),
        // Needs a control nobody has.
        ("require_controls = [\"ctl.nobody\"]", ""),
        // Radius bound below every worker's.
        ("workers = [\"w.big\"]\nmax_blast_radius = 1", ""),
        // Only SECRET requests, and the worker is cleared to INTERNAL.
        ("workers = [\"w.internal\"]\ndata_labels = [\"SECRET\"]", ""),
        // Only staging, worker lists dev.
        ("workers = [\"w.devonly\"]\nenvs = [\"staging\"]", ""),
        // Explicit list naming a worker that does not offer the capability.
        ("workers = [\"w.other\"]", ""),
        ("workers = []", ""),
    ];
    for (body, _) in cases {
        let pol = format!(
            "[[rule]]\nid = \"r\"\ncapabilities = [\"cap.x\"]\neffect = \"allow\"\n{body}\n"
        );
        assert_eq!(
            warnings(ELIG_REG, &pol),
            ["pol.toml:2:6: warning: rule[r]: this rule can never select a worker: no candidate is eligible for any request it matches"],
            "{body}"
        );
    }
    // A deny rule selects nobody by design: no warning.
    let pol = "[[rule]]\nid = \"r\"\ncapabilities = [\"cap.x\"]\neffect = \"deny\"\nworkers = []\n";
    assert_eq!(warnings(ELIG_REG, pol), Vec::<String>::new());
    // One eligible combination is enough.
    let pol = "[[rule]]\nid = \"r\"\ncapabilities = [\"cap.x\"]\neffect = \"allow\"\nworkers = [\"w.devonly\"]\nenvs = [\"staging\", \"dev\"]\n";
    assert_eq!(warnings(ELIG_REG, pol), Vec::<String>::new());
}

#[test]
fn warn_rule_never_matches() {
    for (body, why) in [
        (
            "capabilities = [\"cap.nope\", \"cap.zz.*\"]",
            "matches no capability in the registry",
        ),
        ("envs = []", "matches no environment"),
        ("data_labels = []", "matches no data label"),
        ("tenants = []", "matches no tenant"),
    ] {
        let pol = format!("[[rule]]\nid = \"r\"\neffect = \"allow\"\n{body}\n");
        assert_eq!(
            warnings(REG, &pol),
            [format!(
                "pol.toml:2:6: warning: rule[r]: this rule never matches: it {why}"
            )],
            "{body}"
        );
    }
}

#[test]
fn warn_reason_on_a_non_deny_rule() {
    assert_eq!(
        warnings(
            REG,
            "[[rule]]\nid = \"r\"\neffect = \"allow\"\nreason = \"nope\"\n"
        ),
        ["pol.toml:4:10: warning: rule[r].reason: reason is only used when effect = \"deny\""]
    );
}

#[test]
fn shipped_example_set_is_clean() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let l = crate::load::load_dirs(&dir.join("registry"), &dir.join("policies"))
        .unwrap_or_else(|e| panic!("{e}"));
    let w: Vec<String> = l.warnings.iter().map(|d| d.to_string()).collect();
    assert_eq!(w, Vec::<String>::new());
}

// ---- explain -----------------------------------------------------------------------------

#[test]
fn explain_lists_rules_in_order_with_mismatch_reasons() {
    let pol = r#"
[[rule]]
id = "r.cap"
capabilities = ["cap.other"]
effect = "allow"

[[rule]]
id = "r.env"
envs = ["dev"]
effect = "allow"

[[rule]]
id = "r.label"
max_data_label = "INTERNAL"
effect = "allow"

[[rule]]
id = "r.tenant"
tenants = ["org.a.*"]
effect = "allow"

[[rule]]
id = "r.hit"
capabilities = ["cap.doc.*"]
effect = "allow"
require_controls = ["ctl.a"]

[[rule]]
id = "r.after"
effect = "deny"
"#;
    let l = load(REG, pol);
    let d = decide_both(&l.snapshot, req("cap.doc.x", "prod", "SECRET", "org.a"));
    assert_eq!((d.rule_id, d.worker_id), (Some("r.hit"), Some("w.all")));
    let x = d.explain.unwrap();
    let rules: Vec<_> = x
        .rules
        .iter()
        .map(|r| (r.rule_id, r.matched, r.mismatch))
        .collect();
    assert_eq!(
        rules,
        [
            ("r.env", false, Some("env")),
            ("r.label", false, Some("data_label")),
            ("r.tenant", false, Some("tenant")),
            ("r.hit", true, None),
        ],
        "rules for other capabilities and rules after the match are not tried"
    );
    assert_eq!(
        x.candidates,
        [CandidateTrace {
            worker_id: "w.all",
            eligible: true,
            skipped: None,
            detail: None
        }]
    );
    // The trace serializes as the API shows it: no null noise.
    let j = serde_json::to_value(&x).unwrap();
    assert_eq!(
        j["rules"][0],
        serde_json::json!({"rule_id": "r.env", "matched": false, "mismatch": "env"})
    );
    assert_eq!(
        j["rules"][3],
        serde_json::json!({"rule_id": "r.hit", "matched": true})
    );
    assert_eq!(
        j["candidates"][0],
        serde_json::json!({"worker_id": "w.all", "eligible": true})
    );

    // No rule matches: every rule is in the trace, no candidates.
    let d = decide_both(&l.snapshot, req("cap.doc", "dev", "SECRET", "org.b"));
    assert_eq!(d.rule_id, Some("r.env"));
    let l = load(REG, "[[rule]]\nid = \"a\"\nenvs = [\"dev\"]\neffect = \"allow\"\n[[rule]]\nid = \"b\"\ntenants = [\"x\"]\neffect = \"allow\"\n");
    let d = decide_both(&l.snapshot, req("cap.doc", "prod", "SECRET", "y"));
    assert_eq!(d.deny_reason, Some(NO_MATCHING_RULE));
    let x = d.explain.unwrap();
    assert_eq!(
        x.rules
            .iter()
            .map(|r| (r.rule_id, r.mismatch))
            .collect::<Vec<_>>(),
        [("a", Some("env")), ("b", Some("tenant"))]
    );
    assert!(x.candidates.is_empty());
}

#[test]
fn explain_candidate_json_includes_skip_and_detail() {
    let l = load(ELIG_REG, ELIG_POL);
    let d = decide(
        &l.snapshot,
        &req("cap.x", "prod", "CONFIDENTIAL", "t"),
        true,
    )
    .unwrap();
    let j = serde_json::to_value(&d).unwrap();
    assert_eq!(
        j["explain"]["candidates"][4],
        serde_json::json!({"worker_id": "w.no-b", "eligible": false, "skipped": "missing_control", "detail": "ctl.b"})
    );
    assert_eq!(j["allowed"], true);
    assert_eq!(j["worker_id"], "w.edge");
    assert!(j["deny_reason"].is_null());
    // Without explain there is no explain key at all.
    let d = decide(
        &l.snapshot,
        &req("cap.x", "prod", "CONFIDENTIAL", "t"),
        false,
    )
    .unwrap();
    assert!(serde_json::to_value(&d).unwrap().get("explain").is_none());
}

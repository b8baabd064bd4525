//! Property tests over generated policy sets.
//!
//! Small random registries and rule lists are rendered to TOML, loaded through the real
//! loader, and every decision is checked against an oracle written here from the spec
//! (SPEC 3) and the snapshot's public fields only: no compiled masks, no index.

use proptest::prelude::*;

use super::*;
use crate::load::{load_sources, Source};

const ENVS: [&str; 3] = ["e0", "e1", "e2"];
const LABELS: [&str; 4] = ["L0", "L1", "L2", "L3"];
/// Ids that probe segment boundaries: `a.*` must match `a.b` and `a.b.c` but not `a` or `ab.c`.
const CAPS: [&str; 6] = ["a", "a.b", "a.b.c", "a.c", "ab.c", "b"];
const CAP_PATTERNS: [&str; 8] = ["*", "a", "a.*", "a.b", "a.b.*", "ab.c", "b", "a.c"];
const TENANTS: [&str; 5] = ["t", "t.x", "t.x.y", "tx.y", "u"];
const TENANT_PATTERNS: [&str; 6] = ["*", "t", "t.*", "t.x", "t.x.*", "u"];
const CONTROLS: [&str; 3] = ["c1", "c2", "c3"];

#[derive(Debug, Clone)]
struct GenWorker {
    caps: Vec<usize>,
    envs: Vec<usize>,
    max_label: usize,
    controls: Vec<usize>,
    blast: u8,
    enabled: bool,
}

#[derive(Debug, Clone)]
enum GenLabels {
    Any,
    List(Vec<usize>),
    Max(usize),
}

#[derive(Debug, Clone)]
struct GenRule {
    caps: Option<Vec<usize>>,
    envs: Option<Vec<usize>>,
    labels: GenLabels,
    tenants: Option<Vec<usize>>,
    effect: usize,
    workers: Option<Vec<usize>>,
    controls: Vec<usize>,
    max_blast: Option<u8>,
    reason: bool,
}

#[derive(Debug, Clone)]
struct GenSet {
    /// Registry capabilities: indices into CAPS (a subset, in a shuffled order).
    caps: Vec<usize>,
    workers: Vec<GenWorker>,
    rules: Vec<GenRule>,
    /// Where the policy list is cut into two files.
    split: usize,
}

fn subset(n: usize, max: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0..n, 0..=max)
}

fn nonempty(n: usize, max: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(0..n, 1..=max)
}

fn gen_set() -> impl Strategy<Value = GenSet> {
    let caps = Just((0..CAPS.len()).collect::<Vec<_>>())
        .prop_shuffle()
        .prop_flat_map(|all| (5..=all.len()).prop_map(move |k| all[..k].to_vec()));
    caps.prop_flat_map(|caps| {
        let nc = caps.len();
        // Biased towards workers that are often eligible, so that allowed decisions and
        // every skip reason are common, not rare.
        let worker = (
            proptest::collection::vec(0..nc, 1..=3),
            prop_oneof![1 => Just(vec![0, 1, 2]), 1 => subset(ENVS.len(), 3)],
            0..LABELS.len(),
            prop_oneof![1 => Just(vec![0, 1, 2]), 1 => subset(CONTROLS.len(), 3)],
            prop_oneof![2 => 0u8..=4, 1 => 0u8..=10],
            prop::bool::weighted(0.9),
        )
            .prop_map(
                |(caps, envs, max_label, controls, blast, enabled)| GenWorker {
                    caps,
                    envs,
                    max_label,
                    controls,
                    blast,
                    enabled,
                },
            );
        let workers = proptest::collection::vec(worker, 1..=5);
        (Just(caps), workers).prop_flat_map(|(caps, workers)| {
            let nw = workers.len();
            let labels = prop_oneof![
                2 => Just(GenLabels::Any),
                1 => subset(LABELS.len(), 3).prop_map(GenLabels::List),
                2 => (0..LABELS.len()).prop_map(GenLabels::Max),
            ];
            let rule = (
                prop::option::weighted(0.8, nonempty(CAP_PATTERNS.len(), 2)),
                prop::option::weighted(0.4, nonempty(ENVS.len(), 2)),
                labels,
                prop::option::weighted(0.4, nonempty(TENANT_PATTERNS.len(), 2)),
                prop_oneof![6 => Just(0usize), 1 => Just(1), 1 => Just(2)],
                prop::option::of(subset(nw, 3)),
                prop_oneof![2 => Just(vec![]), 1 => subset(CONTROLS.len(), 2)],
                prop::option::of(0u8..=10),
                any::<bool>(),
            )
                .prop_map(
                    |(
                        caps,
                        envs,
                        labels,
                        tenants,
                        effect,
                        workers,
                        controls,
                        max_blast,
                        reason,
                    )| {
                        GenRule {
                            caps,
                            envs,
                            labels,
                            tenants,
                            effect,
                            workers,
                            controls,
                            max_blast,
                            reason,
                        }
                    },
                );
            let rules = proptest::collection::vec(rule, 0..=6);
            (Just(caps), Just(workers), rules).prop_flat_map(|(caps, workers, rules)| {
                let nr = rules.len();
                (Just(caps), Just(workers), Just(rules), 0..=nr).prop_map(
                    |(caps, workers, rules, split)| GenSet {
                        caps,
                        workers,
                        rules,
                        split,
                    },
                )
            })
        })
    })
}

fn list(names: impl IntoIterator<Item = impl AsRef<str>>) -> String {
    let items: Vec<String> = names
        .into_iter()
        .map(|s| format!("\"{}\"", s.as_ref()))
        .collect();
    format!("[{}]", items.join(", "))
}

fn render(set: &GenSet) -> (Vec<Source>, Vec<Source>) {
    let mut reg = String::new();
    for &c in &set.caps {
        reg += &format!("[[capability]]\nid = \"{}\"\n\n", CAPS[c]);
    }
    for (k, w) in set.workers.iter().enumerate() {
        reg += &format!(
            "[[worker]]\nid = \"w{k}\"\ncapabilities = {}\nenvironments = {}\nmax_data_label = \"{}\"\ncontrols = {}\nblast_radius = {}\nenabled = {}\n\n",
            list(w.caps.iter().map(|&i| CAPS[set.caps[i]])),
            list(w.envs.iter().map(|&i| ENVS[i])),
            LABELS[w.max_label],
            list(w.controls.iter().map(|&i| CONTROLS[i])),
            w.blast,
            w.enabled,
        );
    }
    let mut files = vec![format!(
        "[settings]\nenvironments = {}\ndata_labels = {}\n\n",
        list(ENVS),
        list(LABELS)
    )];
    files.push(String::new());
    for (k, r) in set.rules.iter().enumerate() {
        let mut t = format!("[[rule]]\nid = \"r{k}\"\n");
        if let Some(c) = &r.caps {
            t += &format!(
                "capabilities = {}\n",
                list(c.iter().map(|&i| CAP_PATTERNS[i]))
            );
        }
        if let Some(e) = &r.envs {
            t += &format!("envs = {}\n", list(e.iter().map(|&i| ENVS[i])));
        }
        match &r.labels {
            GenLabels::Any => {}
            GenLabels::List(l) => {
                t += &format!("data_labels = {}\n", list(l.iter().map(|&i| LABELS[i])))
            }
            GenLabels::Max(m) => t += &format!("max_data_label = \"{}\"\n", LABELS[*m]),
        }
        if let Some(ts) = &r.tenants {
            t += &format!(
                "tenants = {}\n",
                list(ts.iter().map(|&i| TENANT_PATTERNS[i]))
            );
        }
        t += &format!(
            "effect = \"{}\"\n",
            ["allow", "deny", "require_approval"][r.effect]
        );
        if let Some(ws) = &r.workers {
            t += &format!("workers = {}\n", list(ws.iter().map(|w| format!("w{w}"))));
        }
        t += &format!(
            "require_controls = {}\n",
            list(r.controls.iter().map(|&i| CONTROLS[i]))
        );
        if let Some(m) = r.max_blast {
            t += &format!("max_blast_radius = {m}\n");
        }
        if r.reason {
            t += "reason = \"custom_reason\"\n";
        }
        t += "\n";
        let f = if k < set.split { 0 } else { 1 };
        files[f] += &t;
    }
    let policies = files
        .into_iter()
        .enumerate()
        .map(|(i, text)| Source {
            name: format!("{i}.toml"),
            text,
        })
        .collect();
    (
        vec![Source {
            name: "reg.toml".into(),
            text: reg,
        }],
        policies,
    )
}

/// Pattern semantics from SPEC 2.2, written independently of `Pattern::matches`.
fn pattern_matches(p: &str, s: &str) -> bool {
    if p == "*" {
        return true;
    }
    match p.strip_suffix('*') {
        // "x.*": anything strictly under "x.".
        Some(prefix) => s.len() > prefix.len() && s.starts_with(prefix),
        None => p == s,
    }
}

fn label_rank(snap: &Snapshot, l: &str) -> usize {
    snap.settings
        .data_labels
        .iter()
        .position(|x| x == l)
        .unwrap()
}

/// SPEC 3 step 2, from the rule's public fields.
fn rule_matches(snap: &Snapshot, r: &Rule, q: &Request<'_>) -> bool {
    let cap = r
        .capabilities
        .iter()
        .any(|p| pattern_matches(&p.to_string(), q.capability_id));
    let env = r
        .envs
        .as_ref()
        .is_none_or(|es| es.iter().any(|e| e == q.env));
    let label = match (&r.data_labels, &r.max_data_label) {
        (Some(ls), _) => ls.iter().any(|l| l == q.data_label),
        (None, Some(m)) => label_rank(snap, q.data_label) <= label_rank(snap, m),
        (None, None) => true,
    };
    let tenant = r.tenants.as_ref().is_none_or(|ts| {
        ts.iter()
            .any(|p| pattern_matches(&p.to_string(), q.tenant_id))
    });
    cap && env && label && tenant
}

/// SPEC 3 step 5, from the worker's and rule's public fields.
fn eligible(snap: &Snapshot, w: &Worker, r: &Rule, q: &Request<'_>) -> bool {
    w.enabled
        && w.capabilities.iter().any(|c| c == q.capability_id)
        && w.environments.iter().any(|e| e == q.env)
        && label_rank(snap, &w.max_data_label) >= label_rank(snap, q.data_label)
        && r.require_controls.iter().all(|c| w.controls.contains(c))
        && r.max_blast_radius.is_none_or(|m| w.blast_radius <= m)
}

/// The rule's candidates in rank order, from public fields.
fn candidates<'s>(snap: &'s Snapshot, r: &Rule, cap: &str) -> Vec<&'s Worker> {
    match &r.workers {
        Some(ws) => ws.iter().map(|w| snap.worker(w).unwrap()).collect(),
        None => {
            let mut v: Vec<&Worker> = snap
                .workers
                .iter()
                .filter(|w| w.capabilities.iter().any(|c| c == cap))
                .collect();
            v.sort_by(|a, b| a.id.cmp(&b.id));
            v
        }
    }
}

fn request() -> impl Strategy<Value = (String, String, String, String)> {
    (
        prop_oneof![
            19 => prop::sample::select(CAPS.to_vec()).prop_map(String::from),
            1 => Just("zz".to_string()),
        ],
        prop::sample::select(ENVS.to_vec()).prop_map(String::from),
        prop::sample::select(LABELS.to_vec()).prop_map(String::from),
        prop::sample::select(TENANTS.to_vec()).prop_map(String::from),
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn decisions_follow_the_spec(set in gen_set(), reqs in proptest::collection::vec(request(), 1..24)) {
        let (reg, pol) = render(&set);
        // Every generated set is valid, so it must load (warnings are fine).
        let loaded = load_sources(&reg, &pol).unwrap_or_else(|e| panic!("{e}\n{}\n{}", reg[0].text, pol[1].text));
        let snap = &loaded.snapshot;
        prop_assert_eq!(snap.rules.len(), set.rules.len());

        // The one "does this rule match" and the one "is this worker eligible" agree with
        // the oracle, rule by rule and worker by worker, for every request in the grid.
        let env_idx = |e: &str| snap.env_index(e).unwrap();
        let label_idx = |l: &str| snap.label_index(l).unwrap();
        for c in CAPS {
            let Some(&ci) = snap.cap_index.get(c) else { continue };
            for (e, l, t) in ENVS.iter().flat_map(|e| LABELS.iter().flat_map(move |l| TENANTS.iter().map(move |t| (e, l, t)))) {
                let q = Request { capability_id: c, env: e, data_label: l, tenant_id: t };
                for r in &snap.rules {
                    let in_index = snap.rules_by_cap[ci as usize].contains(&(snap.rules.iter().position(|x| x.id == r.id).unwrap() as u32));
                    let one = in_index && super::decide::rule_mismatch(r, env_idx(e), label_idx(l), t).is_none();
                    prop_assert_eq!(one, rule_matches(snap, r, &q), "rule {} on {:?}", &r.id, (c, e, l, t));
                    if t == &TENANTS[0] {
                        for w in &snap.workers {
                            let one = super::decide::eligibility(snap, w, r, ci, 1 << env_idx(e), label_idx(l)).is_ok();
                            prop_assert_eq!(one, eligible(snap, w, r, &q), "worker {} rule {} on {:?}", &w.id, &r.id, (c, e, l));
                        }
                    }
                }
            }
        }
        // The linter's "can never select a worker" agrees with the oracle: no request the rule
        // matches has an eligible candidate. (Rules it reports as never matching or shadowed
        // are not checked further by the linter.)
        for r in &snap.rules {
            let says = |what: &str| loaded.warnings.iter().any(|d| d.key == format!("rule[{}]", r.id) && d.message.contains(what));
            if says("never matches") || says("shadowed by") {
                continue;
            }
            let oracle_can_select = CAPS.iter().filter(|c| snap.cap_index.contains_key(**c)).any(|c| {
                ENVS.iter().any(|e| LABELS.iter().any(|l| TENANTS.iter().any(|t| {
                    let q = Request { capability_id: c, env: e, data_label: l, tenant_id: t };
                    rule_matches(snap, r, &q) && candidates(snap, r, c).iter().any(|w| eligible(snap, w, r, &q))
                })))
            });
            prop_assert_eq!(says("can never select a worker"), r.effect == Effect::Allow && !oracle_can_select, "rule {}", &r.id);
        }

        for (c, e, l, t) in &reqs {
            let q = Request { capability_id: c, env: e, data_label: l, tenant_id: t };
            let fast = decide(snap, &q, false).unwrap();
            // (b) same snapshot and request: same decision.
            prop_assert_eq!(&fast, &decide(snap, &q, false).unwrap());
            // (d) the explain path decides the same.
            let traced = decide(snap, &q, true).unwrap();
            let mut stripped = traced.clone();
            stripped.explain = None;
            prop_assert_eq!(&fast, &stripped);
            prop_assert_eq!(traced.explain.is_some(), true);

            if !snap.cap_index.contains_key(c.as_str()) {
                prop_assert_eq!(fast.deny_reason, Some(UNKNOWN_CAPABILITY));
                continue;
            }
            let first = snap.rules.iter().find(|r| rule_matches(snap, r, &q));
            // (a) no matching rule: denied, no_matching_rule.
            let Some(rule) = first else {
                prop_assert!(!fast.allowed);
                prop_assert_eq!(fast.deny_reason, Some(NO_MATCHING_RULE));
                prop_assert_eq!(fast.rule_id, None);
                continue;
            };
            // First match wins.
            prop_assert_eq!(fast.rule_id, Some(rule.id.as_str()));
            let x = traced.explain.as_ref().unwrap();
            let tried: Vec<&str> = x.rules.iter().map(|r| r.rule_id).collect();
            // "Tried" = every rule whose capability patterns match, in order, up to the match.
            let expect_tried: Vec<&str> = snap.rules.iter()
                .filter(|r| r.capabilities.iter().any(|p| pattern_matches(&p.to_string(), c)))
                .map(|r| r.id.as_str())
                .take_while(|id| *id != rule.id).chain([rule.id.as_str()]).collect();
            prop_assert_eq!(tried, expect_tried);

            match rule.effect {
                Effect::Deny => prop_assert_eq!(fast.deny_reason, Some(rule.reason.as_str())),
                Effect::RequireApproval => {
                    // Opens an approval exactly when a worker is eligible; never allows by itself.
                    prop_assert!(!fast.allowed);
                    let cands = candidates(snap, rule, c);
                    match (fast.approval, cands.iter().find(|w| eligible(snap, w, rule, &q))) {
                        (Some(a), Some(exp)) => {
                            prop_assert_eq!(a.worker_id, exp.id.as_str());
                            prop_assert_eq!(fast.deny_reason, Some(APPROVAL_REQUIRED));
                        }
                        (None, None) => prop_assert_eq!(fast.deny_reason, Some(NO_ELIGIBLE_WORKER)),
                        (got, exp) => prop_assert!(false, "approval {:?}, oracle {:?}", got, exp.map(|w| &w.id)),
                    }
                }
                Effect::Allow => {
                    let cands = candidates(snap, rule, c);
                    let expect = cands.iter().find(|w| eligible(snap, w, rule, &q));
                    match (fast.worker_id, expect) {
                        (Some(w), Some(exp)) => {
                            // (c) the chosen worker is eligible, and the first eligible in rank order.
                            let worker = snap.worker(w).unwrap();
                            prop_assert!(eligible(snap, worker, rule, &q));
                            prop_assert!(cands.iter().any(|cw| cw.id == w));
                            prop_assert_eq!(w, exp.id.as_str());
                            prop_assert!(fast.allowed);
                            prop_assert_eq!(fast.deny_reason, None);
                        }
                        (None, None) => {
                            prop_assert!(!fast.allowed);
                            prop_assert_eq!(fast.deny_reason, Some(NO_ELIGIBLE_WORKER));
                        }
                        (got, exp) => prop_assert!(false, "worker {:?}, oracle {:?}", got, exp.map(|w| &w.id)),
                    }
                    // Every candidate walked before the choice is reported ineligible, with a reason.
                    for ct in &x.candidates {
                        prop_assert_eq!(ct.eligible, ct.skipped.is_none());
                        let w = snap.worker(ct.worker_id).unwrap();
                        prop_assert_eq!(ct.eligible, eligible(snap, w, rule, &q));
                    }
                }
            }
        }
    }

    // Pattern matching against the spec's definition, on ids built from few letters and dots
    // so that near-misses (`a.*` vs `ab.c`, `a.*` vs `a`) are common.
    #[test]
    fn patterns_match_as_specified(p in "[ab]{1,2}(\\.[ab]{1,2}){0,2}(\\.\\*)?|\\*", s in "[ab]{1,2}(\\.[ab]{1,2}){0,3}") {
        let pat = Pattern::parse(&p).expect("generated patterns are valid");
        prop_assert_eq!(pat.matches(&s), pattern_matches(&p, &s));
        prop_assert_eq!(pat.to_string(), p);
    }

    // (e) arbitrary strings never panic; a malformed field is named.
    #[test]
    fn decide_never_panics(c in ".{0,40}", e in ".{0,8}", l in ".{0,8}", t in ".{0,40}", explain in any::<bool>()) {
        let snap = example();
        let q = Request { capability_id: &c, env: &e, data_label: &l, tenant_id: &t };
        match decide(snap, &q, explain) {
            Ok(d) => {
                prop_assert!(valid_id(&c) && valid_id(&t));
                prop_assert!(snap.env_index(&e).is_some() && snap.label_index(&l).is_some());
                prop_assert_eq!(d.allowed, d.worker_id.is_some());
                prop_assert_eq!(d.allowed, d.deny_reason.is_none());
            }
            Err(err) => {
                let expected = if !valid_id(&c) { "capability_id" }
                    else if !valid_id(&t) { "tenant_id" }
                    else if snap.env_index(&e).is_none() { "env" }
                    else { "data_label" };
                prop_assert_eq!(err.field, expected);
            }
        }
    }

    // Strings shaped like ids hit the capability and tenant logic instead of the validator.
    #[test]
    fn decide_never_panics_on_id_like_strings(c in "[a-z.*]{1,20}", t in "[a-z0-9.]{1,20}") {
        let snap = example();
        for (e, l) in [("dev", "PUBLIC"), ("prod", "SECRET")] {
            let q = Request { capability_id: &c, env: e, data_label: l, tenant_id: &t };
            let _ = decide(snap, &q, true);
            let _ = decide(snap, &q, false);
        }
    }
}

/// The shipped example set, loaded once.
fn example() -> &'static Snapshot {
    static SNAP: std::sync::OnceLock<Snapshot> = std::sync::OnceLock::new();
    SNAP.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        crate::load::load_dirs(&dir.join("registry"), &dir.join("policies"))
            .unwrap()
            .snapshot
    })
}

/// Guards the property test against going vacuous: the generator must reach every outcome
/// and every skip reason often enough for the oracle comparisons to mean something.
#[test]
fn generated_sets_reach_every_outcome() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..256 {
        let set = gen_set().new_tree(&mut runner).unwrap().current();
        let reqs = proptest::collection::vec(request(), 1..24)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let (reg, pol) = render(&set);
        let l = load_sources(&reg, &pol).unwrap();
        for (c, e, la, t) in &reqs {
            let q = Request {
                capability_id: c,
                env: e,
                data_label: la,
                tenant_id: t,
            };
            let d = decide(&l.snapshot, &q, true).unwrap();
            *counts
                .entry(d.deny_reason.unwrap_or("allowed").to_string())
                .or_default() += 1;
            for ct in &d.explain.unwrap().candidates {
                *counts
                    .entry(format!("skip {}", ct.skipped.unwrap_or("none")))
                    .or_default() += 1;
            }
        }
    }
    for key in [
        "allowed",
        UNKNOWN_CAPABILITY,
        NO_MATCHING_RULE,
        "custom_reason",
        DENIED_BY_POLICY,
        APPROVAL_REQUIRED,
        NO_ELIGIBLE_WORKER,
        "skip disabled",
        "skip capability_not_offered",
        "skip env_not_listed",
        "skip label_not_cleared",
        "skip missing_control",
        "skip blast_radius_exceeded",
    ] {
        let n = counts.get(key).copied().unwrap_or(0);
        assert!(n >= 10, "{key} reached only {n} times: {counts:#?}");
    }
}

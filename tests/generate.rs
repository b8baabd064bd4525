//! The synthetic policy set the benchmarks and the load script use (benches/support/generate.rs)
//! loads cleanly, decides as its doc says, and is the same for the same size.

#[path = "../benches/support/generate.rs"]
mod generate;

use generate::{capability_id, generate};
use hall::engine::{decide, Request, NO_MATCHING_RULE};
use hall::load::{load_sources, Source};

#[test]
fn generated_sets_load_cleanly_and_decide_as_documented() {
    for n in [1, 2, 25] {
        let (reg, pol) = generate(n);
        let l = load_sources(&reg, &pol).unwrap_or_else(|e| panic!("n={n}: {e}"));
        let s = &l.snapshot;
        assert_eq!(
            (s.capabilities.len(), s.workers.len(), s.rules.len()),
            (n, n, 9 * n + n.div_ceil(10))
        );
        let w: Vec<String> = l.warnings.iter().map(|d| d.to_string()).collect();
        assert_eq!(w, Vec::<String>::new(), "n={n}");
        for i in 0..n {
            let cap = capability_id(i);
            let r = |label, tenant| Request {
                capability_id: &cap,
                env: "prod",
                data_label: label,
                tenant_id: tenant,
            };
            let d = decide(s, &r("INTERNAL", "org.zeta"), false).unwrap();
            let default_rule = format!("r{i}.default");
            assert!(d.allowed, "n={n} i={i}: {d:?}");
            assert_eq!(d.rule_id, Some(default_rule.as_str()));
            let d = decide(s, &r("SECRET", "org.zeta"), false).unwrap();
            assert_eq!(d.deny_reason, Some(NO_MATCHING_RULE));
            let d = decide(s, &r("PUBLIC", "org.frozen.eu"), false).unwrap();
            assert_eq!(d.deny_reason, Some("tenant_frozen"));
        }
    }
}

#[test]
fn generation_is_deterministic() {
    let a = generate(30);
    let b = generate(30);
    let v = |s: &(Vec<Source>, Vec<Source>)| hall::load::policy_version(&s.0, &s.1);
    assert_eq!(v(&a), v(&b));
    assert_ne!(v(&a), v(&generate(31)));
}

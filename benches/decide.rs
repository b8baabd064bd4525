//! `decide()` latency at 10 and at ~10,000 rules, on the generated policy set.
//!
//! The allowed request matches the last rule of its capability's list (every earlier rule
//! in its index slot is tried and fails on the tenant); the denied one matches no rule, so
//! it walks the whole slot. The target: each under 2 µs, and the 10,000-rule figure within
//! 2x of the 10-rule one (the per-(capability, env) index keeps work independent of size).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use hall::engine::{decide, Request, Snapshot, NO_MATCHING_RULE};
use hall::load::load_sources;

#[path = "support/generate.rs"]
mod generate;
use generate::{capability_id, generate};

fn snapshot(n: usize) -> Snapshot {
    let (reg, pol) = generate(n);
    load_sources(&reg, &pol)
        .unwrap_or_else(|e| panic!("generated set does not load: {e}"))
        .snapshot
}

fn bench(c: &mut Criterion) {
    // n = 1: 10 rules. n = 1099: 10,001 rules (nine per capability, one per family of ten).
    for n in [1usize, 1099] {
        let snap = snapshot(n);
        let rules = snap.rules.len();
        let cap = capability_id(n / 2);
        let allowed = Request {
            capability_id: &cap,
            env: "prod",
            data_label: "INTERNAL",
            tenant_id: "org.zeta",
        };
        let denied = Request {
            data_label: "SECRET",
            ..allowed
        };
        // Check the requests do what the names say before timing them.
        let d = decide(&snap, &allowed, false).unwrap();
        assert!(
            d.allowed && d.rule_id.unwrap().ends_with(".default"),
            "{d:?}"
        );
        let d = decide(&snap, &denied, false).unwrap();
        assert_eq!(d.deny_reason, Some(NO_MATCHING_RULE));

        c.bench_function(&format!("decide/{rules}_rules/allowed"), |b| {
            b.iter(|| decide(black_box(&snap), black_box(&allowed), false))
        });
        c.bench_function(&format!("decide/{rules}_rules/denied"), |b| {
            b.iter(|| decide(black_box(&snap), black_box(&denied), false))
        });
        // The explain path walks every rule in file order (no index): it is linear in the
        // size of the set, and only for people debugging a policy.
        c.bench_function(&format!("decide/{rules}_rules/allowed_explain"), |b| {
            b.iter(|| decide(black_box(&snap), black_box(&allowed), true))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

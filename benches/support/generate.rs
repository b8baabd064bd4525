//! A synthetic but realistic policy set of any size, for benchmarks and load tests.
//!
//! The shape mirrors what a real deployment grows into: capabilities in families that
//! guardrail rules address with prefix globs, several tenant-specific rules per capability
//! (exact tenants and tenant globs, env and label bounds), an approval rule, and a
//! catch-all allow at the end of each capability's list that picks its worker by id.
//! Everything is derived from the index, so the same `n` always gives the same bytes.
//!
//! Not part of the library: `benches/decide.rs`, `examples/gen_policies.rs` (which
//! `bench/load.sh` runs) and `tests/generate.rs` include this file with `#[path]`.
#![allow(dead_code)] // each includer uses a different part

use hall::load::Source;

/// Capabilities per family: one guardrail glob rule, ahead of the family's rules, covers it.
const FAMILY: usize = 10;
/// Rules per policy file, so large sets are split across files like real ones.
const RULES_PER_FILE: usize = 1000;

/// The id of capability `i` in a generated set: `cap.f<family>.c<i>`.
pub fn capability_id(i: usize) -> String {
    format!("cap.f{}.c{i:06}", i / FAMILY)
}

/// The id of worker `i` in a generated set.
pub fn worker_id(i: usize) -> String {
    format!("worker.{i:06}")
}

/// Generate registry and policy sources for `n` capabilities, `n` workers and about `10·n`
/// rules (`n` at least 1): nine per capability plus one guardrail per family of ten.
///
/// In file order: for the first capability of each family, a family guardrail
/// (`cap.f<f>.*`, tenants `org.frozen.*`, deny); then for each capability `i`: seven tenant rules (`org.t<j>` or `org.t<j>.*`) with env and
/// label bounds and ranked workers, an approval rule for `org.vip.*` in prod, and a final
/// allow up to CONFIDENTIAL that names no workers and requires `ctl.audit-log`.
/// So a request for tenant `org.zeta` at INTERNAL in prod is allowed by the last rule of
/// its capability's list, and the same at SECRET matches no rule.
pub fn generate(n: usize) -> (Vec<Source>, Vec<Source>) {
    use std::fmt::Write;
    let n = n.max(1);

    let mut caps = String::from("# generated: capabilities\n");
    for i in 0..n {
        let _ = write!(
            caps,
            "\n[[capability]]\nid = \"{}\"\ndescription = \"Generated capability {i}\"\n",
            capability_id(i)
        );
    }
    let mut workers = String::from("# generated: workers\n");
    for i in 0..n {
        // Odd workers lack the audit control, so default candidate walks skip some.
        let controls = if i % 2 == 0 {
            r#"["ctl.audit-log", "ctl.dlp"]"#
        } else {
            r#"["ctl.dlp"]"#
        };
        let _ = write!(
            workers,
            "\n[[worker]]\nid = \"{}\"\ncapabilities = [\"{}\", \"{}\"]\nenvironments = [\"dev\", \"staging\", \"prod\"]\nmax_data_label = \"{}\"\ncontrols = {controls}\nblast_radius = {}\nsecrets = [\"key_{i}\"]\n",
            worker_id(i),
            capability_id(i),
            capability_id((i + 1) % n),
            if i % 3 == 2 { "SECRET" } else { "CONFIDENTIAL" },
            i % 8,
        );
    }
    let registry = vec![
        Source {
            name: "capabilities.toml".into(),
            text: caps,
        },
        Source {
            name: "workers.toml".into(),
            text: workers,
        },
    ];

    let envs = [
        "envs = [\"dev\"]\n",
        "envs = [\"dev\", \"staging\"]\n",
        "envs = [\"staging\", \"prod\"]\n",
        "",
    ];
    let label_bounds = [
        "data_labels = [\"PUBLIC\", \"INTERNAL\"]\n",
        "max_data_label = \"CONFIDENTIAL\"\n",
        "",
    ];
    let mut rules: Vec<String> = Vec::with_capacity(10 * n);
    for i in 0..n {
        let cap = capability_id(i);
        let prev = worker_id((i + n - 1) % n);
        let own = worker_id(i);
        if i % FAMILY == 0 {
            rules.push(format!(
            "[[rule]]\nid = \"f{}.guard\"\ncapabilities = [\"cap.f{}.*\"]\ntenants = [\"org.frozen.*\"]\neffect = \"deny\"\nreason = \"tenant_frozen\"\n",
            i / FAMILY, i / FAMILY
        ));
        }
        for j in 1..=7 {
            let tenant = if j % 2 == 0 {
                format!("org.t{j}.*")
            } else {
                format!("org.t{j}")
            };
            rules.push(format!(
                "[[rule]]\nid = \"r{i}.t{j}\"\ncapabilities = [\"{cap}\"]\ntenants = [\"{tenant}\", \"org.x{j}.{i}\"]\n{}{}effect = \"allow\"\nworkers = [\"{own}\", \"{prev}\"]\n{}",
                envs[(i + j) % envs.len()],
                label_bounds[(i + j) % label_bounds.len()],
                if j % 3 == 0 {
                    "require_controls = [\"ctl.dlp\"]\nmax_blast_radius = 7\n"
                } else {
                    ""
                },
            ));
        }
        rules.push(format!(
            "[[rule]]\nid = \"r{i}.vip\"\ncapabilities = [\"{cap}\"]\nenvs = [\"prod\"]\ntenants = [\"org.vip.*\"]\neffect = \"require_approval\"\n"
        ));
        rules.push(format!(
            "[[rule]]\nid = \"r{i}.default\"\ncapabilities = [\"{cap}\"]\nmax_data_label = \"CONFIDENTIAL\"\neffect = \"allow\"\nrequire_controls = [\"ctl.audit-log\"]\nmax_blast_radius = 9\n"
        ));
    }
    let mut policies = vec![Source {
        name: "00-settings.toml".into(),
        text: "[settings]\nenvironments = [\"dev\", \"staging\", \"prod\"]\ndata_labels = [\"PUBLIC\", \"INTERNAL\", \"CONFIDENTIAL\", \"SECRET\"]\n".into(),
    }];
    for (k, chunk) in rules.chunks(RULES_PER_FILE).enumerate() {
        policies.push(Source {
            name: format!("{:05}-rules.toml", k + 1),
            text: chunk.join("\n"),
        });
    }
    (registry, policies)
}

//! Write a large audit log for measuring `hall replay`.
//!
//! `cargo run --release --example replay_log -- STATE_DIR [N]` appends N (default 1,000,000)
//! route decisions over the example registry's capabilities, envs, labels and a few tenants,
//! each with the outcome the example policy set gives it (plus a token record every 10,000),
//! through the public `AuditLog` API in batched mode. Then, with the daemon not running:
//!
//! ```text
//! time target/release/hall replay --state-dir STATE_DIR --registry registry --policies EDITED
//! ```

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hall::engine::{decide, Request};
use hall::load::load_dirs;
use hall::store::audit::{AuditConfig, AuditEntry, AuditLog, Durability, RecordKind};

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(state) = args.next().map(PathBuf::from) else {
        eprintln!("usage: replay_log STATE_DIR [N]");
        std::process::exit(2);
    };
    let n: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let loaded = load_dirs(&root.join("registry"), &root.join("policies")).expect("example set");
    let snap = &loaded.snapshot;
    let caps: Vec<String> = snap.capabilities.iter().map(|c| c.id.clone()).collect();
    let envs = snap.settings.environments.clone();
    let labels = snap.settings.data_labels.clone();
    let tenants = ["org.acme", "org.beta.one", "org.beta.two", "org.gamma"];

    let db = hall::store::open_db(&state).expect("open the state dir");
    let log = AuditLog::open(
        &db,
        AuditConfig {
            durability: Durability::Batched,
            batch_interval: Duration::from_millis(200),
            ..Default::default()
        },
    )
    .expect("open the audit log");
    let started = Instant::now();
    let threads = 4u64;
    std::thread::scope(|s| {
        for t in 0..threads {
            let (log, caps, envs, labels) = (&log, &caps, &envs, &labels);
            s.spawn(move || {
                let base = 1_700_000_000_000i64;
                for i in (t..n).step_by(threads as usize) {
                    let k = i as usize;
                    let req = Request {
                        capability_id: &caps[k % caps.len()],
                        env: &envs[(k / 7) % envs.len()],
                        data_label: &labels[(k / 13) % labels.len()],
                        tenant_id: tenants[(k / 3) % tenants.len()],
                    };
                    let d = decide(snap, &req, false).expect("decidable");
                    let entry = AuditEntry {
                        decision_id: None,
                        tenant_id: Some(req.tenant_id.into()),
                        capability_id: Some(req.capability_id.into()),
                        env: Some(req.env.into()),
                        data_label: Some(req.data_label.into()),
                        allowed: Some(d.allowed),
                        dry_run: i % 10 == 0,
                        worker_id: d.worker_id.map(Into::into),
                        deny_reason: d.deny_reason.map(Into::into),
                        rule_id: d.rule_id.map(Into::into),
                        policy_version: Some(snap.version.clone()),
                        correlation_id: Some(format!("corr-{i}")),
                        token_id: Some("tok_bench".into()),
                        ..AuditEntry::new(RecordKind::Decision, base + i as i64)
                    };
                    log.append_blocking(entry).expect("append");
                    if i % 10_000 == 0 {
                        let mut e = AuditEntry::new(RecordKind::TokenIssue, base + i as i64);
                        e.detail = Some("bench".into());
                        log.append_blocking(e).expect("append");
                    }
                }
            });
        }
    });
    log.shutdown();
    eprintln!(
        "wrote {n} decisions in {:.1} s, head seq {}",
        started.elapsed().as_secs_f64(),
        log.head().seq
    );
}

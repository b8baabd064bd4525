//! What an audited decision costs on disk: appends N typical route records (allowed, with a
//! worker, rule, policy version and token id; no context) to a fresh log in batched mode and
//! prints the stored value size of one record and the state dir's growth per record (the
//! records after the first go into sled in groups, as the daemon writes them).
//!
//! `cargo run --release --example audit_bytes -- 20000`

use std::path::Path;

use hall::store::audit::{AuditConfig, AuditEntry, AuditLog, Durability, RecordKind};

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.file_type() {
                    Ok(t) if t.is_dir() => dir_size(&e.path()),
                    _ => e.metadata().map(|m| m.len()).unwrap_or(0),
                })
                .sum()
        })
        .unwrap_or(0)
}

fn typical(ts_ms: i64, i: u64) -> AuditEntry {
    AuditEntry {
        tenant_id: Some(format!("org.tenant{}", i % 50)),
        capability_id: Some("cap.doc.summarize".into()),
        env: Some("prod".into()),
        data_label: Some("INTERNAL".into()),
        allowed: Some(true),
        worker_id: Some("worker.doc.summarize".into()),
        rule_id: Some("docs-prod".into()),
        policy_version: Some(format!("blake3:{}", blake3::hash(b"policy").to_hex())),
        token_id: Some("tok_0123456789ab".into()),
        ..AuditEntry::new(RecordKind::Decision, ts_ms)
    }
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20_000);
    let dir = tempfile::tempdir().unwrap();
    let db = sled::open(dir.path().join("db")).unwrap();
    let log = AuditLog::open(
        &db,
        AuditConfig {
            durability: Durability::Batched,
            ..AuditConfig::default()
        },
    )
    .unwrap();
    log.append_blocking(typical(1_764_460_800_000, 0)).unwrap();
    // A read inserts what is pending (here record 1 alone, stored as a single record).
    log.get(1).unwrap();
    db.flush().unwrap();
    let before = dir_size(dir.path());
    let value_len = db
        .open_tree("audit")
        .unwrap()
        .get(1u64.to_be_bytes())
        .unwrap()
        .map_or(0, |v| v.len());
    for i in 1..n {
        log.append_blocking(typical(1_764_460_800_000 + i as i64, i))
            .unwrap();
    }
    log.shutdown();
    db.flush().unwrap();
    drop(log);
    drop(db);
    let after = dir_size(dir.path());
    println!("stored value of one typical route record: {value_len} bytes");
    println!(
        "state dir growth: {} bytes for {} records = {:.0} bytes/record",
        after.saturating_sub(before),
        n - 1,
        after.saturating_sub(before) as f64 / (n - 1) as f64
    );
}

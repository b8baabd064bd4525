use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;

use super::*;

fn temp_db() -> (tempfile::TempDir, sled::Db) {
    let dir = tempfile::tempdir().unwrap();
    let db = crate::store::open_db(dir.path()).unwrap();
    (dir, db)
}

/// A batched log whose maintenance thread flushes within a millisecond of a record.
fn batched_every_ms(db: &sled::Db) -> AuditLog {
    let config = AuditConfig {
        durability: Durability::Batched,
        batch_interval: Duration::from_millis(1),
        ..AuditConfig::default()
    };
    AuditLog::open_with(db, config, None).unwrap()
}

/// A batched log whose maintenance thread never flushes on its timer during a test: records
/// are inserted when a group is full, or when something reads or flushes.
fn batched_without_timer(db: &sled::Db) -> AuditLog {
    let config = AuditConfig {
        durability: Durability::Batched,
        batch_interval: Duration::from_secs(3600),
        ..AuditConfig::default()
    };
    AuditLog::open_with(db, config, None).unwrap()
}

/// Insert an entry without waiting for a flush (nobody else holds the chain): its seq.
fn insert_only(writer: &writer::Writer, entry: AuditEntry) -> u64 {
    match writer.submit(entry) {
        writer::Submitted::Done(r) => r.unwrap().seq,
        writer::Submitted::Queued(_) => unreachable!("nobody else holds the chain"),
    }
}

/// Count two more waiters, so that no durable waiter counts as alone (it then leaves its
/// flush to the maintenance thread unless that thread is busy or gone).
fn not_alone(log: &AuditLog) -> (Waiting<'_>, Waiting<'_>) {
    let stats = &log.inner.shared.stats;
    (Waiting::new(stats), Waiting::new(stats))
}

fn reopen(dir: &tempfile::TempDir) -> sled::Db {
    crate::store::open_db(dir.path()).unwrap()
}

fn open(db: &sled::Db) -> AuditLog {
    AuditLog::open_with(db, AuditConfig::default(), None).unwrap()
}

/// A decision entry with every field set.
fn decision(
    ts_ms: i64,
    n: u64,
    tenant: &str,
    cap: &str,
    allowed: bool,
    dry_run: bool,
) -> AuditEntry {
    AuditEntry {
        ts_ms,
        kind: RecordKind::Decision,
        // The writer gives each decision its id.
        decision_id: None,
        tenant_id: Some(tenant.into()),
        capability_id: Some(cap.into()),
        env: Some("dev".into()),
        data_label: Some("INTERNAL".into()),
        allowed: Some(allowed),
        dry_run,
        worker_id: allowed.then(|| "worker.doc.summarize".into()),
        deny_reason: (!allowed).then(|| "no_matching_rule".into()),
        rule_id: Some("docs-dev".into()),
        policy_version: Some("blake3:9f2c".into()),
        correlation_id: Some(format!("corr-{n}")),
        context: Some(r#"{"a":1,"b":[true,null],"c":{"d":"e"}}"#.into()),
        tenant_risk: Some("low".into()),
        qos_class: Some("interactive".into()),
        token_id: Some("tok_123".into()),
        detail: None,
    }
}

fn records_tree(db: &sled::Db) -> sled::Tree {
    db.open_tree("audit").unwrap()
}

fn all_records(log: &AuditLog) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    for seq in 1..=log.head().seq {
        if let Some(r) = log.get(seq).unwrap() {
            out.push(r);
        }
    }
    out
}

fn bad_seq(report: VerifyReport) -> u64 {
    match report {
        VerifyReport::Bad { first_bad_seq, .. } => first_bad_seq,
        ok => panic!("expected a bad report, got {ok:?}"),
    }
}

#[test]
fn allowed_denied_and_dry_run_records_round_trip_with_every_field() {
    let (_dir, db) = temp_db();
    let log = open(&db);
    let entries = [
        decision(1_700_000_000_123, 1, "org.acme", "cap.doc", true, false),
        decision(1_700_000_000_124, 2, "org.acme", "cap.doc", false, false),
        decision(1_700_000_000_125, 3, "org.beta", "cap.mail", true, true),
    ];
    let mut prev = Hash32::ZERO;
    let mut ids = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let a = log.append_blocking(e.clone()).unwrap();
        assert_eq!(a.seq, i as u64 + 1);
        let id = a.decision_id.expect("a decision gets an id");
        ids.push(id);
        // A UUIDv7 carrying the seq and the record's time, with random bits.
        assert_eq!(id.get_version_num(), 7);
        assert_eq!(
            record::seq_of_decision_id(&log.inner.shared.id_key, &id.to_string()),
            Some(a.seq)
        );
        let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
        assert_eq!(secs as i64 * 1000 + i64::from(nanos / 1_000_000), e.ts_ms);
        let e = &AuditEntry {
            decision_id: Some(id.to_string()),
            ..e.clone()
        };
        assert_eq!(
            log.head(),
            Head {
                seq: a.seq,
                hash: a.hash
            }
        );
        let r = log
            .get(a.seq)
            .unwrap()
            .expect("record is readable after append");
        assert_eq!(&r.entry, e);
        assert_eq!(r.prev_hash, prev);
        assert_eq!(r.hash, a.hash);
        assert_ne!(r.hash, Hash32::ZERO);
        let by_id = log.by_decision(&id.to_string()).unwrap();
        assert_eq!(by_id.as_ref(), Some(&r));
        prev = r.hash;
    }
    // The seq field is masked: not the seq itself, and another log's key masks it otherwise.
    let field = |u: &uuid::Uuid| ((u.as_u128() & ((1 << 62) - 1)) >> 22) as u64;
    assert!(ids.iter().zip(1u64..).any(|(u, seq)| field(u) != seq));
    let other_key = [7u8; 32];
    assert_ne!(
        field(&record::decision_uuid(&other_key, 1_700_000_000_123, 1, 0)),
        field(&record::decision_uuid(
            &log.inner.shared.id_key,
            1_700_000_000_123,
            1,
            0
        ))
    );
    assert_eq!(
        record::seq_of_decision_id(&other_key, &ids[0].to_string()).filter(|s| *s == 1),
        None,
        "another key does not find the seq"
    );
    // Ids are time-ordered, and the random bits differ from id to id.
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert_ne!(ids[0].as_u128() & 0x3f_ffff, ids[1].as_u128() & 0x3f_ffff);
    assert_eq!(log.by_decision("dec-unknown").unwrap(), None);
    assert!(!db.tree_names().iter().any(|n| n == b"audit_by_decision"));
    // The right seq with other random bits, or another record's seq: not this decision.
    let forged =
        record::decision_uuid(&log.inner.shared.id_key, 1_700_000_000_123, 1, !0).to_string();
    assert_ne!(forged, ids[0].to_string());
    assert_eq!(log.by_decision(&forged).unwrap(), None);
    let other_seq =
        record::decision_uuid(&log.inner.shared.id_key, 1_700_000_000_123, 2, 0).to_string();
    assert_eq!(log.by_decision(&other_seq).unwrap(), None);
    assert_eq!(
        log.by_decision(&ids[0].to_string().to_uppercase()).unwrap(),
        None
    );
    assert_eq!(log.get(4).unwrap(), None);

    // JSON: flat, every field, time in RFC 3339 ms, context an object.
    let r = log.get(1).unwrap().unwrap();
    let v = serde_json::to_value(&r).unwrap();
    let obj = v.as_object().unwrap();
    assert_eq!(obj.len(), 23, "{obj:?}");
    assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
    assert_eq!(v["ts_ms"], 1_700_000_000_123i64);
    assert_eq!(v["kind"], "decision");
    assert_eq!(v["allowed"], true);
    assert_eq!(v["deny_reason"], serde_json::Value::Null);
    assert_eq!(v["context"]["c"]["d"], "e");
    assert_eq!(v["prev_hash"], "0".repeat(64));
    assert_eq!(v["hash"], r.hash.to_hex());
    let back: AuditRecord = serde_json::from_str(&v.to_string()).unwrap();
    assert_eq!(back, r);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 3,
            head: prev
        }
    );
}

#[test]
fn non_decision_records_do_not_shadow_the_decision_lookup() {
    let (_dir, db) = temp_db();
    let log = open(&db);
    let id = log
        .append_blocking(decision(10, 1, "t", "c", true, false))
        .unwrap()
        .decision_id
        .unwrap()
        .to_string();
    let release = AuditEntry {
        decision_id: Some(id.clone()),
        detail: Some("db-password".into()),
        ..AuditEntry::new(RecordKind::SecretRelease, 20)
    };
    log.append_blocking(release).unwrap();
    let r = log.by_decision(&id).unwrap().unwrap();
    assert_eq!((r.seq, r.entry.kind), (1, RecordKind::Decision));
    let j = serde_json::to_value(log.get(2).unwrap().unwrap()).unwrap();
    assert_eq!(j["kind"], "secret_release");
    assert_eq!(j["context"], serde_json::Value::Null);
}

#[test]
fn the_log_stays_time_ordered_when_the_clock_steps_back() {
    let (_dir, db) = temp_db();
    let log = open(&db);
    log.append_blocking(AuditEntry::new(RecordKind::Reload, 5000))
        .unwrap();
    let a = log
        .append_blocking(AuditEntry::new(RecordKind::Reload, 3000))
        .unwrap();
    assert_eq!(log.get(a.seq).unwrap().unwrap().entry.ts_ms, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_get_gapless_ordered_seqs() {
    let (_dir, db) = temp_db();
    let log = open(&db);
    const TASKS: u64 = 16;
    const THREADS: u64 = 4;
    const EACH: u64 = 25;
    let mut handles = Vec::new();
    for t in 0..TASKS {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            let mut got = Vec::new();
            for i in 0..EACH {
                let n = t * 1000 + i;
                let a = log
                    .append(decision(n as i64, n, "t", "c", true, false))
                    .await
                    .unwrap();
                got.push((a.seq, n));
            }
            got
        }));
    }
    let mut threads = Vec::new();
    for t in TASKS..TASKS + THREADS {
        let log = log.clone();
        threads.push(std::thread::spawn(move || {
            (0..EACH)
                .map(|i| {
                    let n = t * 1000 + i;
                    let e = decision(n as i64, n, "t", "c", false, false);
                    (log.append_blocking(e).unwrap().seq, n)
                })
                .collect::<Vec<_>>()
        }));
    }
    let mut all = Vec::new();
    for h in handles {
        all.push(h.await.unwrap());
    }
    for t in threads {
        all.push(t.join().unwrap());
    }
    let total = (TASKS + THREADS) * EACH;
    let mut seqs = BTreeSet::new();
    for got in &all {
        // One caller's appends land in the order it made them.
        assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "{got:?}");
        for &(seq, n) in got {
            assert!(seqs.insert(seq), "seq {seq} handed out twice");
            let r = log.get(seq).unwrap().unwrap();
            assert_eq!(r.entry.correlation_id, Some(format!("corr-{n}")));
        }
    }
    assert_eq!(seqs, (1..=total).collect::<BTreeSet<_>>());
    assert_eq!(log.head().seq, total);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: total,
            head: log.head().hash
        }
    );
    let stats = log.stats();
    assert_eq!(
        (stats.appended, stats.failed, stats.queue_depth),
        (total, 0, 0)
    );
}

#[test]
fn waiting_appends_share_one_flush() {
    let (_dir, db) = temp_db();
    let log = AuditLog::open_with(&db, AuditConfig::default(), None).unwrap();
    let hold = log.hold_flushes();
    let threads: Vec<_> = (0..50u64)
        .map(|n| {
            let log = log.clone();
            std::thread::spawn(move || log.append_blocking(decision(1, n, "t", "c", true, false)))
        })
        .collect();
    // Wait (bounded) until all 50 are inserted and waiting behind the held flush.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while log.stats().queue_depth != 50 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(log.stats().queue_depth, 50);
    assert_eq!(
        log.head().seq,
        0,
        "durable: nothing is committed before its flush"
    );
    drop(hold);
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let s = log.stats();
    assert_eq!(
        (s.appended, s.batches, s.flushes, s.queue_depth),
        (50, 1, 1, 0)
    );
    assert_eq!(log.head().seq, 50);
    assert!(log.verify().unwrap().is_ok());
}

#[test]
fn a_batched_append_never_waits_for_a_flush() {
    let (_dir, db) = temp_db();
    let log = batched_every_ms(&db);
    let hold = log.hold_flushes();
    let (tx, rx) = std::sync::mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        for n in 0..100u64 {
            l.append_blocking(decision(1, n, "t", "c", true, false))
                .unwrap();
        }
        tx.send(()).unwrap();
    });
    // Every flush is held, yet all 100 appends are answered.
    rx.recv_timeout(Duration::from_secs(60))
        .expect("a batched append waited for the held flush");
    assert_eq!(log.head().seq, 100);
    assert!(log.inner.shared.durable.load().seq < 100);
    drop(hold);
    // The maintenance thread's periodic flush then makes them durable.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while log.inner.shared.durable.load().seq < 100 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(log.inner.shared.durable.load().seq, 100);
    assert!(log.verify().unwrap().is_ok());
}

#[test]
fn an_append_that_finds_the_chain_held_is_inserted_by_the_holder() {
    let (_dir, db) = temp_db();
    let config = AuditConfig {
        durability: Durability::Batched,
        ..AuditConfig::default()
    };
    let log = AuditLog::open_with(&db, config, None).unwrap();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let holder = {
        let log = log.clone();
        std::thread::spawn(move || {
            log.inner.writer.with_chain(|_| {
                held_tx.send(()).unwrap();
                release_rx.recv().unwrap();
            })
        })
    };
    held_rx.recv().unwrap();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let appender = {
        let log = log.clone();
        std::thread::spawn(move || {
            done_tx
                .send(log.append_blocking(decision(1, 1, "t", "c", true, false)))
                .unwrap()
        })
    };
    // The appender queues its record instead of blocking on the lock...
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !log.inner.writer.has_queued_for_test() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(log.inner.writer.has_queued_for_test());
    assert!(done_rx.try_recv().is_err());
    // ...and the holder inserts it when it lets go.
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let a = done_rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap()
        .unwrap();
    appender.join().unwrap();
    assert_eq!(a.seq, 1);
    assert_eq!(log.head().seq, 1);
    assert!(log.verify().unwrap().is_ok());
}

#[test]
fn a_failed_flush_fails_the_durable_appends_it_covered_and_a_working_one_recovers() {
    let (_dir, db) = temp_db();
    let log = AuditLog::open_with(&db, AuditConfig::default(), None).unwrap();
    let w = &log.inner.writer;
    w.test_fail_flush
        .store(true, std::sync::atomic::Ordering::Release);
    let err = log
        .append_blocking(decision(1, 1, "t", "c", true, false))
        .unwrap_err();
    assert!(
        matches!(err, AuditError::Write { op: "flush", .. }),
        "{err:?}"
    );
    assert!(log.write_error().is_some());
    assert_eq!(log.head().seq, 0, "nothing durable is published");
    w.test_fail_flush
        .store(false, std::sync::atomic::Ordering::Release);
    let a = log
        .append_blocking(decision(2, 2, "t", "c", true, false))
        .unwrap();
    assert_eq!(a.seq, 2, "the chain continues from the unflushed record");
    assert_eq!(log.write_error(), None);
    assert_eq!(log.head().seq, 2);
    assert!(log.verify().unwrap().is_ok());
}

#[test]
fn batched_appends_fail_closed_after_a_failed_periodic_flush_until_one_works() {
    let (_dir, db) = temp_db();
    let log = batched_every_ms(&db);
    let w = &log.inner.writer;
    w.test_fail_flush
        .store(true, std::sync::atomic::Ordering::Release);
    // Answered at once: a batched append does not wait for the flush...
    log.append_blocking(decision(1, 1, "t", "c", true, false))
        .unwrap();
    // ...which then fails on the maintenance thread.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while log.write_error().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(log.write_error().unwrap().contains("flush"));
    // From then on an append waits for a flush of its own, and fails with it.
    let err = log
        .append_blocking(decision(2, 2, "t", "c", true, false))
        .unwrap_err();
    assert!(matches!(err, AuditError::Write { op: "flush", .. }));
    assert!(log.write_error().is_some());
    w.test_fail_flush
        .store(false, std::sync::atomic::Ordering::Release);
    log.append_blocking(decision(3, 3, "t", "c", true, false))
        .unwrap();
    assert_eq!(log.write_error(), None);
    assert_eq!(log.inner.shared.durable.load().seq, 3);
    assert!(log.verify().unwrap().is_ok());
}

#[test]
fn a_durable_append_is_answered_only_after_its_flush() {
    let (_dir, db) = temp_db();
    let log = AuditLog::open_with(&db, AuditConfig::default(), None).unwrap();
    let hold = log.hold_flushes();
    let (tx, rx) = std::sync::mpsc::channel();
    let l = log.clone();
    std::thread::spawn(move || {
        let r = l.append_blocking(decision(1, 1, "t", "c", true, false));
        tx.send(r).unwrap();
    });
    // Bounded wait that must time out: the flush is held.
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
    assert_eq!(log.head().seq, 0);
    drop(hold);
    let a = rx.recv_timeout(Duration::from_secs(60)).unwrap().unwrap();
    assert_eq!(a.seq, 1);
    assert_eq!(log.inner.shared.durable.load().seq, 1);
    assert_eq!(log.stats().flushes, 1);
}

#[test]
fn verify_names_the_exact_seq_of_a_changed_byte_a_deletion_and_a_broken_link() {
    let (_dir, db) = temp_db();
    let log = open(&db);
    append_allowed(&log, 1..=8);
    let head = log.head();
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 8,
            head: head.hash
        }
    );
    let tree = records_tree(&db);
    let original = tree.get(seq_key(5)).unwrap().unwrap();

    // One byte of the body (a string's contents: still decodes, hash no longer matches).
    let mut v = original.to_vec();
    let pos = v.windows(6).position(|w| w == b"corr-5").unwrap() + 5;
    v[pos] = b'9';
    tree.insert(seq_key(5), v).unwrap();
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Bad {
            first_bad_seq: 5,
            problem: Defect::HashMismatch.as_str()
        }
    );

    // Deleted.
    tree.remove(seq_key(5)).unwrap();
    assert_eq!(bad_seq(log.verify().unwrap()), 5);

    // Replaced by a self-consistent record that links elsewhere.
    let mut buf = Vec::new();
    let r5 = decode_value(5, &original, true).unwrap();
    encode_value_for_test(&mut buf, &Hash32([7; 32]), 5, &r5.entry);
    tree.insert(seq_key(5), buf.clone()).unwrap();
    assert_eq!(bad_seq(log.verify().unwrap()), 5);

    // A valid hash over a body that does not decode.
    let mut junk = r5.prev_hash.0.to_vec();
    junk.extend_from_slice(b"\xc1\xc1\xc1");
    let h = blake3::hash(&junk);
    junk.extend_from_slice(h.as_bytes());
    tree.insert(seq_key(5), junk).unwrap();
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Bad {
            first_bad_seq: 5,
            problem: Defect::Undecodable.as_str()
        }
    );

    // Restored: clean again. Then the newest record removed: caught against the head.
    tree.insert(seq_key(5), original).unwrap();
    assert!(log.verify().unwrap().is_ok());
    tree.remove(seq_key(8)).unwrap();
    assert_eq!(bad_seq(log.verify().unwrap()), 8);
}

fn encode_value_for_test(buf: &mut Vec<u8>, prev: &Hash32, seq: u64, e: &AuditEntry) {
    record::encode_value(buf, prev, seq, e).unwrap();
}

#[test]
fn reopening_keeps_the_chain_and_continues_it() {
    let (dir, db) = temp_db();
    let log = open(&db);
    append_allowed(&log, 1..=3);
    let head = log.head();
    drop(log);
    drop(db);

    let db = reopen(&dir);
    let log = open(&db);
    assert_eq!(log.head(), head);
    let a = log
        .append_blocking(decision(4, 4, "t", "c", false, false))
        .unwrap();
    assert_eq!(a.seq, 4);
    assert_eq!(log.get(4).unwrap().unwrap().prev_hash, head.hash);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 4,
            head: a.hash
        }
    );
}

#[test]
fn query_filters_and_pages_like_a_full_scan() {
    let (dir, db) = temp_db();
    let log = open(&db);
    let tenants = ["org.a", "org.b", "org.c"];
    let caps = ["cap.x", "cap.y"];
    for n in 1..=60u64 {
        if n == 31 {
            // 1..=30 go into index chunks; the rest stay after the marker (scanned).
            log.write_index_now();
        }
        let e = decision(
            // Two records per millisecond value: time bounds must include both.
            1000 * n.div_ceil(2) as i64,
            n,
            tenants[(n % 3) as usize],
            caps[(n % 2) as usize],
            n % 5 != 0,
            n % 7 == 0,
        );
        log.append_blocking(e).unwrap();
    }
    log.append_blocking(AuditEntry::new(RecordKind::Reload, 61_000))
        .unwrap();
    let everything = all_records(&log);
    assert_eq!(everything.len(), 61);
    assert_eq!(index::indexed_through(&log.inner.trees).unwrap(), 30);
    check_queries(&log, &everything);
    // Everything indexed.
    log.write_index_now();
    assert_eq!(index::indexed_through(&log.inner.trees).unwrap(), 61);
    check_queries(&log, &everything);
    // The index lost (as if never written): open rebuilds it from the records.
    let postings = db.open_tree("audit_postings").unwrap();
    drop(log);
    postings.clear().unwrap();
    let log = open(&db);
    check_queries(&log, &everything);
    // A chunk that lies (tampered, or stale) cannot add a record that does not match.
    let mut lie = index::posting_prefix(index::TENANT, "org.a");
    lie.extend_from_slice(&61u64.to_be_bytes());
    let mut seqs = Vec::new();
    for seq in [1u64, 2, 3, 4, 60, 61] {
        seqs.extend_from_slice(&seq.to_be_bytes());
    }
    postings.insert(lie, seqs).unwrap();
    check_queries(&log, &everything);
    // Reopened on a fresh sled instance (the chunks written at shutdown are on disk).
    drop(log);
    drop(postings);
    drop(db);
    let db = reopen(&dir);
    let log = open(&db);
    assert_eq!(index::indexed_through(&log.inner.trees).unwrap(), 61);
    check_queries(&log, &everything);
}

/// Every query below, plain, paged and newest-first, against a filter over `everything`.
fn check_queries(log: &AuditLog, everything: &[AuditRecord]) {
    let queries = [
        AuditQuery::default(),
        AuditQuery {
            tenant_id: Some("org.b".into()),
            ..Default::default()
        },
        AuditQuery {
            capability_id: Some("cap.y".into()),
            ..Default::default()
        },
        AuditQuery {
            allowed: Some(false),
            ..Default::default()
        },
        AuditQuery {
            kind: Some(RecordKind::Reload),
            ..Default::default()
        },
        AuditQuery {
            since_ms: Some(10_500),
            until_ms: Some(30_000),
            ..Default::default()
        },
        AuditQuery {
            since_ms: Some(10_000),
            until_ms: Some(10_000),
            ..Default::default()
        },
        AuditQuery {
            tenant_id: Some("org.c".into()),
            since_ms: Some(12_000),
            until_ms: Some(29_000),
            ..Default::default()
        },
        AuditQuery {
            capability_id: Some("cap.x".into()),
            until_ms: Some(20_000),
            ..Default::default()
        },
        AuditQuery {
            tenant_id: Some("org.a".into()),
            capability_id: Some("cap.x".into()),
            allowed: Some(true),
            since_ms: Some(5_000),
            until_ms: Some(50_000),
            ..Default::default()
        },
        AuditQuery {
            tenant_id: Some("org.none".into()),
            ..Default::default()
        },
        AuditQuery {
            since_ms: Some(1_000_000),
            ..Default::default()
        },
        AuditQuery {
            until_ms: Some(10),
            ..Default::default()
        },
        AuditQuery {
            until_ms: Some(i64::MAX),
            since_ms: Some(i64::MIN),
            ..Default::default()
        },
    ];
    for q in queries {
        let expected: Vec<AuditRecord> = everything
            .iter()
            .filter(|r| {
                let e = &r.entry;
                q.tenant_id
                    .as_ref()
                    .is_none_or(|x| e.tenant_id.as_ref() == Some(x))
                    && q.capability_id
                        .as_ref()
                        .is_none_or(|x| e.capability_id.as_ref() == Some(x))
                    && q.allowed.is_none_or(|x| e.allowed == Some(x))
                    && q.kind.is_none_or(|x| e.kind == x)
                    && q.since_ms.is_none_or(|x| e.ts_ms >= x)
                    && q.until_ms.is_none_or(|x| e.ts_ms <= x)
            })
            .cloned()
            .collect();
        assert_eq!(log.query(&q).unwrap(), expected, "{q:?}");
        assert!(expected.iter().all(|r| r.seq <= 61));

        // Paging with after_seq + limit walks the same records.
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let page = log
                .query(&AuditQuery {
                    after_seq: after,
                    limit: 4,
                    ..q.clone()
                })
                .unwrap();
            assert!(page.len() <= 4);
            let Some(last) = page.last() else { break };
            after = Some(last.seq);
            paged.extend(page);
        }
        assert_eq!(paged, expected, "paged {q:?}");

        // The newest N, still oldest first.
        let tail = log
            .query(&AuditQuery {
                limit: 3,
                newest: true,
                ..q.clone()
            })
            .unwrap();
        assert_eq!(
            tail,
            expected[expected.len().saturating_sub(3)..],
            "tail {q:?}"
        );
    }
}

#[test]
fn export_writes_json_lines_that_parse_back_into_the_same_records() {
    let (_dir, db) = temp_db();
    let log = open(&db);
    for n in 1..=10u64 {
        log.append_blocking(decision(1000 * n as i64, n, "t", "c", n % 2 == 0, n == 3))
            .unwrap();
    }
    let everything = all_records(&log);
    let parse = |bytes: &[u8]| -> Vec<AuditRecord> {
        std::str::from_utf8(bytes)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let mut out = Vec::new();
    assert_eq!(log.export(None, None, &mut out).unwrap(), 10);
    assert!(out.ends_with(b"\n"));
    assert_eq!(parse(&out), everything);

    let mut out = Vec::new();
    assert_eq!(log.export(Some(4), None, &mut out).unwrap(), 7);
    assert_eq!(parse(&out), everything[3..]);

    let mut out = Vec::new();
    assert_eq!(log.export(Some(2), Some(6_000), &mut out).unwrap(), 5);
    assert_eq!(parse(&out), everything[5..]);

    let mut out = Vec::new();
    assert_eq!(log.export(None, Some(99_000), &mut out).unwrap(), 0);
    assert!(out.is_empty());
}

#[test]
fn retention_prunes_old_records_and_their_indexes_and_verify_still_passes() {
    let (dir, db) = temp_db();
    let config = AuditConfig {
        retention_days: Some(1),
        ..AuditConfig::default()
    };
    let log = AuditLog::open_with(&db, config.clone(), None).unwrap();
    // Timestamps in the future, so the writer's own (real-clock) pruning never touches them.
    let base = now_ms() + 10 * MS_PER_DAY;
    let mut ids = vec![String::new()]; // ids[seq]
    for n in 1..=5u64 {
        let a = log
            .append_blocking(decision(base + n as i64, n, "t", "c", true, false))
            .unwrap();
        ids.push(a.decision_id.unwrap().to_string());
    }
    // Chunks for 1..=5 (to be pruned whole) and, below, for 6..=8.
    log.write_index_now();
    for n in 6..=8u64 {
        let a = log
            .append_blocking(decision(base + 2 * MS_PER_DAY, n, "t", "c", true, false))
            .unwrap();
        ids.push(a.decision_id.unwrap().to_string());
    }
    let head = log.head();
    assert_eq!(log.prune(base + 2 * MS_PER_DAY).unwrap(), 5);
    assert_eq!(log.prune(base + 2 * MS_PER_DAY).unwrap(), 0);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 3,
            head: head.hash
        }
    );
    assert_eq!(log.get(5).unwrap(), None);
    assert_eq!(log.by_decision(&ids[5]).unwrap(), None);
    assert!(log.by_decision(&ids[6]).unwrap().is_some());
    let seqs: Vec<u64> = log
        .query(&AuditQuery {
            tenant_id: Some("t".into()),
            ..Default::default()
        })
        .unwrap()
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(seqs, [6, 7, 8]);
    // Chunks holding only pruned seqs are gone; what is left still names kept records.
    log.write_index_now();
    for item in db.open_tree("audit_postings").unwrap().iter() {
        let (k, v) = item.unwrap();
        if k[..] != b"indexed_through"[..] {
            assert!(index::chunk_seqs(&v).any(|s| s >= 6), "{k:?}");
        }
    }

    // Everything pruned: the head survives a reopen through the checkpoint.
    assert_eq!(log.prune(base + 5 * MS_PER_DAY).unwrap(), 3);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 0,
            head: head.hash
        }
    );
    drop(log);
    drop(db);
    let db = reopen(&dir);
    let log = AuditLog::open_with(&db, config, None).unwrap();
    assert_eq!(log.head(), head);
    let a = log
        .append_blocking(decision(base + 6 * MS_PER_DAY, 9, "t", "c", true, false))
        .unwrap();
    assert_eq!(a.seq, 9);
    assert_eq!(log.get(9).unwrap().unwrap().prev_hash, head.hash);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 1,
            head: a.hash
        }
    );
}

#[test]
fn the_writer_applies_retention_by_itself() {
    let (dir, db) = temp_db();
    let log = open(&db);
    let old = now_ms() - 3 * MS_PER_DAY;
    for n in 1..=3u64 {
        log.append_blocking(decision(old, n, "t", "c", true, false))
            .unwrap();
    }
    log.append_blocking(decision(now_ms(), 4, "t", "c", true, false))
        .unwrap();
    drop(log);
    drop(db);
    let db = reopen(&dir);
    let config = AuditConfig {
        retention_days: Some(1),
        ..AuditConfig::default()
    };
    let log = AuditLog::open_with(&db, config, None).unwrap();
    // The writer prunes when it starts; wait (bounded, generously: CI machines are busy).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while log.get(3).unwrap().is_some() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(log.get(3).unwrap(), None);
    assert!(log.get(4).unwrap().is_some());
    assert!(matches!(
        log.verify().unwrap(),
        VerifyReport::Ok { entries: 1, .. }
    ));
}

#[tokio::test]
async fn the_fault_hook_fails_appends_without_recording_and_recovery_continues_the_chain() {
    let (_dir, db) = temp_db();
    let flag_dir = tempfile::tempdir().unwrap();
    let flag = flag_dir.path().join("fail");
    let log = AuditLog::open_with(&db, AuditConfig::default(), Some(flag.clone())).unwrap();
    log.append(decision(1, 1, "t", "c", true, false))
        .await
        .unwrap();
    let head = log.head();

    std::fs::write(&flag, b"").unwrap();
    let err = log
        .append(decision(2, 2, "t", "c", true, false))
        .await
        .unwrap_err();
    assert!(matches!(err, AuditError::Injected(_)), "{err:?}");
    let blocking = log.clone();
    let err2 = tokio::task::spawn_blocking(move || {
        blocking.append_blocking(decision(3, 3, "t", "c", true, false))
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(err2, AuditError::Injected(_)));
    assert_eq!(log.head(), head);
    assert_eq!(records_tree(&db).len(), 1);
    let seq2 = record::decision_uuid(&log.inner.shared.id_key, 2, 2, 0).to_string();
    assert_eq!(log.by_decision(&seq2).unwrap(), None);
    assert_eq!(log.stats().failed, 2);

    std::fs::remove_file(&flag).unwrap();
    let a = log
        .append(decision(4, 4, "t", "c", true, false))
        .await
        .unwrap();
    assert_eq!(a.seq, 2);
    assert_eq!(log.get(2).unwrap().unwrap().prev_hash, head.hash);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 2,
            head: a.hash
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_mode_answers_and_the_data_survives_shutdown_and_reopen() {
    let (dir, db) = temp_db();
    let config = AuditConfig {
        durability: Durability::Batched,
        batch_interval: Duration::from_millis(10),
        ..AuditConfig::default()
    };
    let log = AuditLog::open_with(&db, config.clone(), None).unwrap();
    let mut handles = Vec::new();
    for n in 1..=100u64 {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            log.append(decision(n as i64, n, "t", "c", true, false))
                .await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let head = log.head();
    assert_eq!(head.seq, 100);
    let closer = log.clone();
    tokio::task::spawn_blocking(move || closer.shutdown())
        .await
        .unwrap();
    log.shutdown(); // idempotent
    assert!(matches!(
        log.append(decision(0, 0, "t", "c", true, false)).await,
        Err(AuditError::Closed)
    ));
    drop(log);
    drop(db);

    let db = reopen(&dir);
    let log = AuditLog::open_with(&db, config, None).unwrap();
    assert_eq!(log.head(), head);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 100,
            head: head.hash
        }
    );
}

#[test]
fn small_pieces_behave() {
    assert_eq!("durable".parse::<Durability>(), Ok(Durability::Durable));
    assert_eq!("batched".parse::<Durability>(), Ok(Durability::Batched));
    assert!("fast"
        .parse::<Durability>()
        .unwrap_err()
        .contains("\"fast\""));
    assert_eq!(Durability::default(), Durability::Durable);
    assert_eq!(
        serde_json::to_string(&Durability::Batched).unwrap(),
        "\"batched\""
    );
    assert_eq!(
        serde_json::to_string(&RecordKind::SecretRefusal).unwrap(),
        "\"secret_refusal\""
    );

    let h = Hash32(std::array::from_fn(|i| i as u8 * 7));
    assert_eq!(Hash32::from_hex(&h.to_hex()), Some(h));
    assert_eq!(Hash32::from_hex("zz"), None);
    assert_eq!(Hash32::from_hex(&"g".repeat(64)), None);

    assert_eq!(
        record::format_time(0).as_deref(),
        Some("1970-01-01T00:00:00.000Z")
    );
    assert_eq!(record::format_time(i64::MAX), None);

    let ok = serde_json::to_value(VerifyReport::Ok {
        entries: 2,
        head: Hash32::ZERO,
    })
    .unwrap();
    assert_eq!(
        ok,
        serde_json::json!({"ok": true, "entries": 2, "head": "0".repeat(64)})
    );
    let bad = serde_json::to_value(VerifyReport::Bad {
        first_bad_seq: 3,
        problem: "x",
    })
    .unwrap();
    assert_eq!(
        bad,
        serde_json::json!({"ok": false, "first_bad_seq": 3, "problem": "x"})
    );
}

fn arb_entry() -> impl Strategy<Value = AuditEntry> {
    let s = || proptest::option::of("[a-z0-9.\\-\\u{e9}]{0,12}");
    (
        (0usize..16, -1_000_000i64..1_000_000, s(), s(), s()),
        (
            proptest::option::of(any::<bool>()),
            any::<bool>(),
            s(),
            s(),
            s(),
        ),
    )
        .prop_map(
            |((k, ts, tenant, cap, detail), (allowed, dry_run, worker, rule, token))| {
                let kinds = [
                    RecordKind::Decision,
                    RecordKind::Reload,
                    RecordKind::TokenIssue,
                    RecordKind::TokenRevoke,
                    RecordKind::SecretStore,
                    RecordKind::SecretDelete,
                    RecordKind::SecretRelease,
                    RecordKind::SecretRefusal,
                    RecordKind::KeyRotate,
                    RecordKind::ApprovalOpened,
                    RecordKind::ApprovalVoted,
                    RecordKind::ApprovalApproved,
                    RecordKind::ApprovalDenied,
                    RecordKind::ApprovalExpired,
                    RecordKind::ApprovalCancelled,
                    RecordKind::ApprovalUsed,
                ];
                AuditEntry {
                    tenant_id: tenant,
                    capability_id: cap,
                    allowed,
                    dry_run,
                    worker_id: worker,
                    rule_id: rule,
                    token_id: token,
                    detail,
                    ..AuditEntry::new(kinds[k], ts)
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Any sequence of appends verifies, and changing any single byte of any stored record
    /// is reported at exactly that record's seq.
    #[test]
    fn any_log_verifies_and_any_single_byte_change_is_found(
        entries in proptest::collection::vec(arb_entry(), 1..12),
        pick in any::<prop::sample::Index>(),
        offset in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let (_dir, db) = temp_db();
        let log = open(&db);
        for e in &entries {
            log.append_blocking(e.clone()).unwrap();
        }
        let n = entries.len() as u64;
        prop_assert_eq!(log.verify().unwrap(), VerifyReport::Ok { entries: n, head: log.head().hash });

        let seq = pick.index(entries.len()) as u64 + 1;
        let tree = records_tree(&db);
        let mut v = tree.get(seq_key(seq)).unwrap().unwrap().to_vec();
        let at = offset.index(v.len());
        v[at] ^= xor;
        tree.insert(seq_key(seq), v).unwrap();
        prop_assert_eq!(bad_seq(log.verify().unwrap()), seq);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever part of the log the posting lists cover (the writer's chunks written at any
    /// points, lost, or rebuilt at open), every query returns exactly the records a full scan
    /// with the same filters finds, in the same order.
    #[test]
    fn queries_through_the_index_match_a_full_scan(
        appends in proptest::collection::vec(
            (0usize..3, 0usize..3, -3i64..6, any::<bool>(), proptest::bool::weighted(0.15)),
            1..40),
        lose_index in proptest::bool::weighted(0.25),
        tenant in proptest::option::weighted(0.6, 0usize..3),
        cap in proptest::option::weighted(0.4, 0usize..3),
        allowed in proptest::option::weighted(0.4, any::<bool>()),
        since in proptest::option::weighted(0.4, 0i64..50),
        until in proptest::option::weighted(0.4, 0i64..60),
        after in proptest::option::weighted(0.3, 0u64..40),
        limit in prop_oneof![Just(0usize), 1usize..8],
        newest in any::<bool>(),
    ) {
        let names = |p: &str, i: usize| format!("{p}{i}");
        let (_dir, db) = temp_db();
        let config = AuditConfig { durability: Durability::Batched, ..AuditConfig::default() };
        let mut log = AuditLog::open_with(&db, config.clone(), None).unwrap();
        let mut ts = 0i64;
        for (n, &(t, c, step, allowed, write_index)) in appends.iter().enumerate() {
            ts += step; // may step back: the writer keeps the log time-ordered
            let e = decision(ts, n as u64, &names("t", t), &names("c", c), allowed, false);
            log.append_blocking(e).unwrap();
            if write_index {
                log.write_index_now();
            }
        }
        if lose_index {
            drop(log);
            db.open_tree("audit_postings").unwrap().clear().unwrap();
            log = AuditLog::open_with(&db, config, None).unwrap();
        }
        let everything = all_records(&log);
        prop_assert_eq!(everything.len(), appends.len());
        let q = AuditQuery {
            tenant_id: tenant.map(|i| names("t", i)),
            capability_id: cap.map(|i| names("c", i)),
            allowed,
            since_ms: since,
            until_ms: until,
            after_seq: after,
            limit,
            newest,
            ..Default::default()
        };
        let mut expected: Vec<AuditRecord> = everything
            .into_iter()
            .filter(|r| {
                let e = &r.entry;
                q.tenant_id.as_ref().is_none_or(|x| e.tenant_id.as_ref() == Some(x))
                    && q.capability_id.as_ref().is_none_or(|x| e.capability_id.as_ref() == Some(x))
                    && allowed.is_none_or(|x| e.allowed == Some(x))
                    && since.is_none_or(|x| e.ts_ms >= x)
                    && until.is_none_or(|x| e.ts_ms <= x)
                    && after.is_none_or(|x| r.seq > x)
            })
            .collect();
        let limit = if limit == 0 { DEFAULT_QUERY_LIMIT } else { limit };
        if newest {
            expected.drain(..expected.len().saturating_sub(limit));
        } else {
            expected.truncate(limit);
        }
        prop_assert_eq!(log.query(&q).unwrap(), expected);
    }
}

#[test]
fn a_second_shutdown_returns_only_after_the_first_has_flushed() {
    let (_dir, db) = temp_db();
    let log = batched_every_ms(&db);
    let hold = log.hold_flushes();
    log.append_blocking(decision(1, 1, "t", "c", true, false))
        .unwrap();
    let first = {
        let l = log.clone();
        std::thread::spawn(move || l.shutdown())
    };
    // The first shutdown has taken the maintenance thread and is stuck behind the held flush.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let taken = || match log.inner.maintainer.try_lock() {
        Ok(handle) => handle.is_none(),
        Err(_) => true,
    };
    while !taken() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(taken());
    let (tx, rx) = std::sync::mpsc::channel();
    let second = {
        let l = log.clone();
        std::thread::spawn(move || {
            l.shutdown();
            // What a caller may rely on once shutdown returned.
            tx.send(l.inner.shared.durable.load().seq).unwrap();
        })
    };
    assert!(
        rx.recv_timeout(Duration::from_millis(200)).is_err(),
        "the second shutdown returned while the first was still flushing"
    );
    drop(hold);
    assert_eq!(rx.recv_timeout(Duration::from_secs(60)).unwrap(), 1);
    first.join().unwrap();
    second.join().unwrap();
}

#[test]
fn a_durable_waiter_polled_twice_is_registered_once() {
    use std::future::Future;
    let (_dir, db) = temp_db();
    let log = open(&db);
    let writer = &log.inner.writer;
    let seq = insert_only(writer, decision(1, 1, "t", "c", true, false));
    let hold = log.hold_flushes();
    // Others wait too, so this waiter registers and leaves the flush to the maintenance
    // thread (which then blocks on the held flush).
    let _others = not_alone(&log);
    let mut wait = std::pin::pin!(writer.wait_durable(seq));
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    for _ in 0..3 {
        assert!(wait.as_mut().poll(&mut cx).is_pending());
    }
    assert_eq!(writer.waiters_for_test(), 1);
    drop(hold);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let std::task::Poll::Ready(r) = wait.as_mut().poll(&mut cx) {
            r.unwrap();
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never flushed");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(writer.waiters_for_test(), 0);
}

/// A runtime like an actix worker's: one thread, tasks spawned with `spawn_local`.
fn worker_thread() -> (tokio::runtime::Runtime, tokio::task::LocalSet) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (rt, tokio::task::LocalSet::new())
}

#[test]
// Deliberate: the maintenance thread blocks in its flush on this lock while the tasks
// register; nothing on this thread takes it.
#[allow(clippy::await_holding_lock)]
fn a_flush_wakes_the_waiters_of_a_thread_with_a_relay_through_the_relay() {
    let (_dir, db) = temp_db();
    let log = open(&db);
    let writer = log.inner.writer.clone();
    let (rt, local) = worker_thread();
    local.block_on(&rt, async {
        writer::start_relay();
        // The maintenance thread flushes for them, and blocks in that flush until released.
        let hold = log.hold_flushes();
        let _others = not_alone(&log);
        let tasks: Vec<_> = (0..20)
            .map(|i| tokio::task::spawn_local(log.append(decision(1, i, "t", "c", true, false))))
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while writer.waiters_for_test() < 20 {
            assert!(
                std::time::Instant::now() < deadline,
                "the appends never waited"
            );
            tokio::task::yield_now().await;
        }
        assert_eq!(writer::Relay::handed_here_for_test(), 0);
        drop(hold);
        let mut seqs = BTreeSet::new();
        for t in tasks {
            let answered = tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .expect("a waiter handed to the relay was never woken");
            seqs.insert(answered.unwrap().unwrap().seq);
        }
        assert_eq!(seqs, (1..=20).collect::<BTreeSet<u64>>());
        // All twenty were handed to this thread's relay, none woken across threads.
        assert_eq!(writer::Relay::handed_here_for_test(), 20);
    });
    assert_eq!(writer.waiters_for_test(), 0);
    assert!(log.head().seq >= 20);
    assert!(log.verify().unwrap().is_ok());
}

#[test]
fn a_waiter_registered_with_a_relay_that_has_ended_is_woken_by_its_flush() {
    use std::future::Future;
    let (_dir, db) = temp_db();
    let log = open(&db);
    let writer = log.inner.writer.clone();
    let (rt, local) = worker_thread();
    local.block_on(&rt, async { writer::start_relay() });
    // The runtime stops: the relay ends, and stays this thread's (ended) relay.
    drop(local);
    let seq = insert_only(&writer, decision(1, 1, "t", "c", true, false));
    let hold = log.hold_flushes();
    let _others = not_alone(&log);
    let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
    let waker = std::task::Waker::from(flag.clone());
    let mut wait = std::pin::pin!(writer.wait_durable(seq));
    assert!(wait
        .as_mut()
        .poll(&mut std::task::Context::from_waker(&waker))
        .is_pending());
    assert_eq!(writer.waiters_for_test(), 1);
    // The maintenance thread's flush settles it; the ended relay hands the waker back.
    drop(hold);
    eventually("the flush wakes the waiter", || {
        flag.0.load(std::sync::atomic::Ordering::SeqCst)
    });
    let noop = std::task::Waker::noop();
    assert!(wait
        .as_mut()
        .poll(&mut std::task::Context::from_waker(noop))
        .is_ready());
}

#[test]
fn a_blocking_append_on_a_thread_with_a_relay_is_still_answered() {
    let (_dir, db) = temp_db();
    let log = open(&db);
    let (tx, rx) = std::sync::mpsc::channel();
    let appender = {
        let log = log.clone();
        std::thread::spawn(move || {
            // A relay on this thread, whose runtime is not running while the thread blocks.
            let (rt, local) = worker_thread();
            local.block_on(&rt, async { writer::start_relay() });
            // Others wait too, so the maintenance thread flushes and wakes this one.
            let _others = not_alone(&log);
            tx.send(log.append_blocking(decision(1, 1, "t", "c", true, false)))
                .unwrap();
            drop(local);
        })
    };
    let a = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a blocking append waited for a relay that cannot run")
        .unwrap();
    assert_eq!(a.seq, 1);
    appender.join().unwrap();
}

#[test]
fn waiters_of_a_thread_whose_relay_ended_are_woken_directly() {
    let (rt, local) = worker_thread();
    local.block_on(&rt, async {
        writer::start_relay();
        tokio::task::yield_now().await;
    });
    let relay = writer::Relay::here_for_test().expect("this thread has a relay");
    let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
    let mut direct = Vec::new();
    // Running: it takes the waker (and wakes it on its thread).
    relay.hand_for_test(vec![std::task::Waker::from(flag.clone())], &mut direct);
    assert!(direct.is_empty());
    // Its runtime stops: it wakes what it held, and hands back whatever comes later.
    drop(local);
    assert!(flag.0.load(std::sync::atomic::Ordering::SeqCst));
    relay.hand_for_test(vec![std::task::Waker::from(flag.clone())], &mut direct);
    assert_eq!(direct.len(), 1);
    // A new runtime on the thread starts a new relay.
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async { writer::start_relay() });
    let again = writer::Relay::here_for_test().unwrap();
    assert!(!std::sync::Arc::ptr_eq(&relay, &again));
    let mut direct = Vec::new();
    again.hand_for_test(vec![std::task::Waker::from(flag)], &mut direct);
    assert!(direct.is_empty());
}

#[test]
fn durable_appends_are_answered_while_the_maintenance_thread_writes_the_index() {
    let (_dir, db) = temp_db();
    let log = open(&db);
    let writer = log.inner.writer.clone();
    // One record, so that there is an index posting to write.
    log.append_blocking(decision(1, 0, "t", "c", true, false))
        .unwrap();
    // Hold the maintenance thread inside its index write.
    let held = writer.test_busy.lock().unwrap();
    writer.index_now_for_test();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !writer.busy_for_test() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(writer.busy_for_test());
    // Others wait too, so none of these is alone: they would leave their flush to the
    // maintenance thread, which is stuck.
    let _others = not_alone(&log);
    let (tx, rx) = std::sync::mpsc::channel();
    let threads: Vec<_> = (1..=8u64)
        .map(|n| {
            let (l, tx) = (log.clone(), tx.clone());
            std::thread::spawn(move || {
                let r = l.append_blocking(decision(1, n, "t", "c", true, false));
                tx.send(r.map(|a| a.seq)).unwrap();
            })
        })
        .collect();
    for _ in 0..8 {
        let seq = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a durable append waited for the index write")
            .unwrap();
        assert!(log.inner.shared.durable.load().seq >= seq);
    }
    drop(held);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(log.head().seq, 9);
    assert!(log.verify().unwrap().is_ok());
}

/// A waker that records that it was woken.
struct Flag(std::sync::atomic::AtomicBool);

impl std::task::Wake for Flag {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Wait (at most 60 s) until `cond` holds.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(cond(), "{what}");
}

/// A durable log whose maintenance thread is held inside an index write, and a durable
/// append (seq 2) whose own flush has read the tip and is held before its `db.flush()`.
/// Returns the guards (maintenance thread, flush) and the flushing append's thread.
fn busy_with_a_flush_in_progress(
    log: &AuditLog,
) -> (
    std::sync::MutexGuard<'_, ()>,
    std::sync::MutexGuard<'_, ()>,
    std::thread::JoinHandle<Result<Appended, AuditError>>,
) {
    let writer = &log.inner.writer;
    // One record, so that there is an index posting to write.
    log.append_blocking(decision(1, 0, "t", "c", true, false))
        .unwrap();
    let busy = writer.test_busy.lock().unwrap();
    writer.index_now_for_test();
    eventually("the maintenance thread turns busy", || {
        writer.busy_for_test()
    });
    let flushing = writer.test_flushing.hold();
    let leader = {
        let l = log.clone();
        std::thread::spawn(move || l.append_blocking(decision(1, 1, "t", "c", true, false)))
    };
    writer.test_flushing.wait_reached();
    (busy, flushing, leader)
}

#[test]
fn a_waiter_that_went_away_does_not_keep_the_next_flush_from_the_ones_behind_it() {
    use std::future::Future;
    let (_dir, db) = temp_db();
    let log = open(&db);
    let writer = log.inner.writer.clone();
    let (busy, flushing, leader) = busy_with_a_flush_in_progress(&log);
    // Others wait too (none of the waiters below is alone).
    let _others = not_alone(&log);
    // Seq 3 arrives while seq 2's flush runs, registers behind it, and goes away (its client
    // hung up) before that flush ends.
    let seq = insert_only(&writer, decision(1, 2, "t", "c", true, false));
    assert_eq!(seq, 3);
    {
        let mut gone = std::pin::pin!(writer.wait_durable(seq));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(gone.as_mut().poll(&mut cx).is_pending());
        assert_eq!(writer.waiters_for_test(), 1);
    }
    assert_eq!(
        writer.waiters_for_test(),
        0,
        "a waiter that went away is unlisted"
    );
    // Seq 4 waits behind it.
    let listed = writer.waiters_for_test();
    let (tx, rx) = std::sync::mpsc::channel();
    let behind = {
        let l = log.clone();
        std::thread::spawn(move || {
            tx.send(l.append_blocking(decision(1, 3, "t", "c", true, false)))
                .unwrap()
        })
    };
    eventually("seq 4 waits", || writer.waiters_for_test() == listed + 1);
    // Seq 2's flush ends and hands the next one over (the maintenance thread is busy).
    drop(flushing);
    assert_eq!(leader.join().unwrap().unwrap().seq, 2);
    let a = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the waiter behind one that went away waited for the index write")
        .unwrap();
    assert_eq!(a.seq, 4);
    assert!(log.inner.shared.durable.load().seq >= 4);
    drop(busy);
    behind.join().unwrap();
    assert_eq!(writer.waiters_for_test(), 0);
    assert!(log.verify().unwrap().is_ok());
}

#[test]
fn a_waiter_handed_the_next_flush_that_goes_away_passes_it_on() {
    use std::future::Future;
    let (_dir, db) = temp_db();
    let log = open(&db);
    let writer = log.inner.writer.clone();
    let (busy, flushing, leader) = busy_with_a_flush_in_progress(&log);
    let _others = not_alone(&log);
    // Seq 3 registers first behind seq 2's flush, with a waker that shows the hand-over.
    let seq = insert_only(&writer, decision(1, 2, "t", "c", true, false));
    let flag = std::sync::Arc::new(Flag(std::sync::atomic::AtomicBool::new(false)));
    let waker = std::task::Waker::from(flag.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    let mut first = Box::pin(writer.wait_durable(seq));
    assert!(first.as_mut().poll(&mut cx).is_pending());
    // Seq 4 waits behind it.
    let (tx, rx) = std::sync::mpsc::channel();
    let behind = {
        let l = log.clone();
        std::thread::spawn(move || {
            tx.send(l.append_blocking(decision(1, 3, "t", "c", true, false)))
                .unwrap()
        })
    };
    eventually("seq 4 waits", || writer.waiters_for_test() == 2);
    // Seq 2's flush ends and wakes seq 3 to lead the next one...
    drop(flushing);
    assert_eq!(leader.join().unwrap().unwrap().seq, 2);
    eventually("seq 3 is handed the next flush", || {
        flag.0.load(std::sync::atomic::Ordering::SeqCst)
    });
    // ...which goes away instead (its client hung up) without being polled again.
    drop(first);
    let a = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the waiter behind one that went away waited for the index write")
        .unwrap();
    assert_eq!(a.seq, 4);
    drop(busy);
    behind.join().unwrap();
    assert_eq!(writer.waiters_for_test(), 0);
    assert!(log.verify().unwrap().is_ok());
}

#[test]
fn a_waiter_that_registers_as_the_maintenance_thread_dies_still_gets_its_flush() {
    let (_dir, db) = temp_db();
    // No periodic flush during the test: only a waiter's flush covers the record.
    let config = AuditConfig {
        batch_interval: Duration::from_secs(3600),
        ..AuditConfig::default()
    };
    let log = AuditLog::open_with(&db, config, None).unwrap();
    let writer = log.inner.writer.clone();
    // Others wait too: the waiter leaves its flush to the maintenance thread...
    let _others = not_alone(&log);
    let registering = writer.test_registering.hold();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = {
        let l = log.clone();
        std::thread::spawn(move || {
            tx.send(l.append_blocking(decision(1, 1, "t", "c", true, false)))
                .unwrap()
        })
    };
    writer.test_registering.wait_reached();
    // ...which dies (a panic) before the waiter is in the list it wakes on its way out.
    writer
        .test_panic
        .store(true, std::sync::atomic::Ordering::SeqCst);
    writer.maintainer.get().unwrap().unpark();
    eventually("the maintenance thread dies", || {
        !writer
            .maintainer_alive
            .load(std::sync::atomic::Ordering::SeqCst)
    });
    drop(registering);
    let a = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a waiter that registered as the maintenance thread died was never woken")
        .unwrap();
    assert_eq!(a.seq, 1);
    assert_eq!(log.inner.shared.durable.load().seq, 1);
    waiter.join().unwrap();
    log.shutdown();
}

#[test]
fn a_waiter_that_finds_a_flush_running_while_the_maintenance_thread_is_busy_is_not_missed() {
    let (_dir, db) = temp_db();
    let log = open(&db);
    let writer = log.inner.writer.clone();
    let (busy, flushing, leader) = busy_with_a_flush_in_progress(&log);
    // Seq 3 arrives while seq 2's flush runs: it would lead, but the flush lock is taken,
    // so it is to register for that flush's hand-over...
    let registering = writer.test_registering.hold();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = {
        let l = log.clone();
        std::thread::spawn(move || {
            tx.send(l.append_blocking(decision(1, 2, "t", "c", true, false)))
                .unwrap()
        })
    };
    writer.test_registering.wait_reached();
    // ...but seq 2's flush ends (seq 3 is not in the list yet) before it does.
    drop(flushing);
    assert_eq!(leader.join().unwrap().unwrap().seq, 2);
    drop(registering);
    let a = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("a waiter that found the flush lock taken waited for the index write")
        .unwrap();
    assert_eq!(a.seq, 3);
    drop(busy);
    waiter.join().unwrap();
    assert!(log.verify().unwrap().is_ok());
}

/// Decisions 1..=n (time n, tenant "t", capability "c").
/// Append allowed decisions `seqs` (tenant "t", capability "c", `ts_ms` = n) one by one.
fn append_allowed(log: &AuditLog, seqs: std::ops::RangeInclusive<u64>) {
    for n in seqs {
        log.append_blocking(decision(n as i64, n, "t", "c", true, false))
            .unwrap();
    }
}

fn decisions(n: u64, allowed: bool) -> Vec<AuditEntry> {
    (1..=n)
        .map(|i| decision(i as i64, i, "t", "c", allowed, false))
        .collect()
}

/// Write a chained log of `entries` straight into the records tree, `runs[i]` records per
/// tree entry (1: a single record, as releases before groups wrote; more: a group), as the
/// writer would have sealed them. Returns the head.
fn write_grouped(db: &sled::Db, entries: &[AuditEntry], runs: &[usize]) -> Head {
    assert_eq!(runs.iter().sum::<usize>(), entries.len());
    let tree = records_tree(db);
    let mut group = stored::Group::default();
    let mut head = Head {
        seq: 0,
        hash: Hash32::ZERO,
    };
    let mut buf = Vec::new();
    let mut it = entries.iter();
    for &n in runs {
        for e in it.by_ref().take(n) {
            let seq = head.seq + 1;
            let hash = record::encode_value(&mut buf, &head.hash, seq, e).unwrap();
            group.push(seq, &buf);
            head = Head { seq, hash };
        }
        group.seal(&tree).unwrap();
    }
    head
}

/// Where record `seq`'s value sits in the tree: the entry's key and the value's byte range
/// in the entry.
fn locate(db: &sled::Db, seq: u64) -> (sled::IVec, std::ops::Range<usize>) {
    for item in records_tree(db).iter() {
        let (k, v) = item.unwrap();
        let records = stored::unpack(&k, &v).ok().unwrap();
        if let Some(r) = records.iter().find(|r| r.seq == seq) {
            let at = r.value.as_ptr() as usize - v.as_ptr() as usize;
            return (k, at..at + r.value.len());
        }
    }
    panic!("record {seq} is not stored");
}

#[test]
fn a_log_of_groups_reads_verifies_and_reopens_like_one_of_single_records() {
    let (dir, db) = temp_db();
    // No periodic flush during the test: groups are sealed when full (the tests' groups
    // hold 5 records) or when something reads.
    let log = batched_without_timer(&db);
    let mut ids = Vec::new();
    for n in 1..=23u64 {
        let e = decision(n as i64, n, &format!("t{}", n % 3), "c", n % 2 == 0, false);
        ids.push(log.append_blocking(e).unwrap().decision_id.unwrap());
    }
    assert_eq!(log.head().seq, 23);
    // Full groups (1..=20) go to the maintenance thread; 21..=23 wait in memory until a read
    // or a flush. Every read sees every answered append, the pending ones included.
    let r23 = log.by_decision(&ids[22].to_string()).unwrap().unwrap();
    assert_eq!(r23.seq, 23);
    let tree = records_tree(&db);
    let groups = tree
        .iter()
        .keys()
        .filter(|k| k.as_ref().unwrap().len() == 9)
        .count();
    assert!(groups >= 4, "{groups} groups written");
    let everything = all_records(&log);
    assert_eq!(everything.len(), 23);
    for (i, r) in everything.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
        assert_eq!(
            log.by_decision(&ids[i].to_string()).unwrap().as_ref(),
            Some(r)
        );
    }
    check_queries(&log, &everything);
    let head = log.head();
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 23,
            head: head.hash
        }
    );
    let mut out = Vec::new();
    assert_eq!(log.export(Some(8), None, &mut out).unwrap(), 16);

    // Pending records are written at shutdown; the chain continues after a reopen, and
    // durable appends (one record per flush) add single records after the groups.
    for n in 24..=26u64 {
        log.append_blocking(decision(n as i64, n, "t0", "c", true, false))
            .unwrap();
    }
    let head = log.head();
    drop(log);
    drop(tree);
    drop(db);
    let db = reopen(&dir);
    let log = open(&db);
    assert_eq!(log.head(), head);
    let a = log
        .append_blocking(decision(27, 27, "t0", "c", true, false))
        .unwrap();
    assert_eq!(a.seq, 27);
    assert!(records_tree(&db).get(seq_key(27)).unwrap().is_some());
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 27,
            head: a.hash
        }
    );
    let everything = all_records(&log);
    assert_eq!(everything.len(), 27);
    check_queries(&log, &everything);
}

#[test]
fn verify_names_the_exact_seq_of_damage_inside_a_group() {
    let (_dir, db) = temp_db();
    let entries = decisions(12, true);
    // 1 and 2 single, 3..=7 a group, 8 single, 9..=12 a group.
    let head = write_grouped(&db, &entries, &[1, 1, 5, 1, 4]);
    let log = open(&db);
    assert_eq!(log.head(), head);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 12,
            head: head.hash
        }
    );
    let tree = records_tree(&db);
    let (key, span) = locate(&db, 5);
    assert_eq!(key.len(), 9);
    let original = tree.get(&key).unwrap().unwrap();
    let damaged = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut v = original.to_vec();
        f(&mut v);
        tree.insert(&key, v).unwrap();
        let report = log.verify().unwrap();
        tree.insert(&key, original.clone()).unwrap();
        report
    };
    // A byte of record 5's body: its hash no longer matches.
    let pos = span.start
        + original[span.clone()]
            .windows(6)
            .position(|w| w == b"corr-5")
            .unwrap()
        + 5;
    assert_eq!(
        damaged(&|v| v[pos] = b'9'),
        VerifyReport::Bad {
            first_bad_seq: 5,
            problem: Defect::HashMismatch.as_str()
        }
    );
    // Record 5's prev_hash: the link to 4 is broken.
    assert_eq!(bad_seq(damaged(&|v| v[span.start] ^= 1)), 5);
    // The group's framing (the length before record 3) or its layout byte: the group cannot
    // be read, reported at its first record.
    assert_eq!(bad_seq(damaged(&|v| v[1] ^= 0x40)), 3);
    assert_eq!(bad_seq(damaged(&|v| v[0] = 9)), 3);
    // Cut short.
    assert_eq!(bad_seq(damaged(&|v| v.truncate(v.len() - 1))), 3);
    // Record 5 cut out of the group (the rest re-framed): 5 onward are misnumbered.
    let without_5 = |v: &mut Vec<u8>| {
        v.drain(span.start - stored::FRAME_LEN..span.end);
    };
    assert_eq!(bad_seq(damaged(&without_5)), 3);
    assert!(log.verify().unwrap().is_ok());
    // The whole group gone: 3 is missing.
    tree.remove(&key).unwrap();
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Bad {
            first_bad_seq: 3,
            problem: "record is missing"
        }
    );
    tree.insert(&key, original).unwrap();
    // The newest group gone: caught against the head.
    tree.remove(locate(&db, 12).0).unwrap();
    assert_eq!(bad_seq(log.verify().unwrap()), 9);
}

#[test]
fn retention_removes_a_group_only_once_its_newest_record_is_old() {
    let (_dir, db) = temp_db();
    let base = now_ms() + 10 * MS_PER_DAY;
    let day = |d: i64, n: u64| decision(base + d * MS_PER_DAY, n, "t", "c", true, false);
    // 1..=3 old (a group), 4 old (single), 5..=7 a group of two old and one new, 8 new.
    let entries = vec![
        day(0, 1),
        day(0, 2),
        day(0, 3),
        day(0, 4),
        day(0, 5),
        day(0, 6),
        day(3, 7),
        day(3, 8),
    ];
    let head = write_grouped(&db, &entries, &[3, 1, 3, 1]);
    let config = AuditConfig {
        retention_days: Some(1),
        ..AuditConfig::default()
    };
    let log = AuditLog::open_with(&db, config, None).unwrap();
    assert_eq!(log.prune(base + 2 * MS_PER_DAY).unwrap(), 4);
    assert_eq!(log.get(4).unwrap(), None);
    // 5 and 6 are old but share their entry with 7: kept until 7 is old too.
    assert_eq!(log.get(5).unwrap().unwrap().seq, 5);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 4,
            head: head.hash
        }
    );
    assert_eq!(log.prune(base + 5 * MS_PER_DAY).unwrap(), 4);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: 0,
            head: head.hash
        }
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// However the records are split into singles and groups, the log verifies, and changing
    /// any single byte of any record's value is reported at exactly that record's seq.
    #[test]
    fn any_grouping_verifies_and_any_changed_byte_in_it_is_found(
        entries in proptest::collection::vec(arb_entry(), 1..16),
        cuts in proptest::collection::vec(any::<bool>(), 16),
        pick in any::<prop::sample::Index>(),
        offset in any::<prop::sample::Index>(),
        xor in 1u8..=255,
    ) {
        let (_dir, db) = temp_db();
        let mut runs = Vec::new();
        let mut run = 0;
        for (i, cut) in cuts.iter().take(entries.len()).enumerate() {
            run += 1;
            if *cut || i + 1 == entries.len() {
                runs.push(run);
                run = 0;
            }
        }
        let head = write_grouped(&db, &entries, &runs);
        let log = open(&db);
        prop_assert_eq!(log.head(), head);
        let n = entries.len() as u64;
        prop_assert_eq!(log.verify().unwrap(), VerifyReport::Ok { entries: n, head: head.hash });
        prop_assert_eq!(all_records(&log).len(), entries.len());

        let seq = pick.index(entries.len()) as u64 + 1;
        let (key, span) = locate(&db, seq);
        let tree = records_tree(&db);
        let mut v = tree.get(&key).unwrap().unwrap().to_vec();
        v[span.start + offset.index(span.len())] ^= xor;
        tree.insert(&key, v).unwrap();
        prop_assert_eq!(bad_seq(log.verify().unwrap()), seq);
    }
}

/// A forged group that overlaps an earlier entry (key: last seq + 'g', sorting right after the
/// real single record of that seq) fails verify, and readers refuse it rather than return
/// its records.
#[test]
fn a_group_overlapping_an_earlier_entry_does_not_pass_verify() {
    let (_dir, db) = temp_db();
    let entries = decisions(8, false);
    // 1, 2 single; 3..=7 a group keyed [7,'g']; 8 single.
    write_grouped(&db, &entries, &[1, 1, 5, 1]);
    let tree = records_tree(&db);
    // A fabricated record 7 (allowed, tenant "mallory"), then a copy of the real 8, as one
    // group keyed [8,'g']: it sorts after the real [8], so verify reaches it with expected = 9.
    let mut buf = Vec::new();
    encode_value_for_test(
        &mut buf,
        &Hash32::ZERO,
        7,
        &decision(7, 7, "mallory", "c", true, false),
    );
    let real8 = tree.get(seq_key(8)).unwrap().unwrap();
    let mut g = stored::Group::default();
    g.push(7, &buf);
    g.push(8, &real8);
    g.seal(&tree).unwrap();
    let log = open(&db);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Bad {
            first_bad_seq: 9,
            problem: "two entries of the log hold the same record"
        }
    );
    let mut out = Vec::new();
    assert!(matches!(
        log.export(None, None, &mut out),
        Err(AuditError::Corrupt { seq: 7, .. })
    ));
    for newest in [false, true] {
        let q = AuditQuery {
            limit: 100,
            newest,
            ..Default::default()
        };
        assert!(
            matches!(log.query(&q), Err(AuditError::Corrupt { .. })),
            "newest {newest}"
        );
    }
    // Reads that do not reach the overlap still work.
    assert_eq!(
        log.get(7).unwrap().unwrap().entry.tenant_id.as_deref(),
        Some("t")
    );
}

/// A group keyed at u64::MAX (bytes anyone who can write the tree controls) is reported,
/// not an arithmetic overflow.
#[test]
fn a_group_keyed_at_the_largest_seq_does_not_make_open_panic() {
    let (_dir, db) = temp_db();
    let entries = decisions(3, true);
    write_grouped(&db, &entries, &[3]);
    let tree = records_tree(&db);
    let mut v = vec![stored::GROUP_VERSION];
    for rec in [&b"a"[..], &b"b"[..]] {
        v.extend_from_slice(&(rec.len() as u32).to_le_bytes());
        v.extend_from_slice(rec);
    }
    tree.insert(stored::group_key(u64::MAX), v).unwrap();
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        AuditLog::open_with(&db, AuditConfig::default(), None).map(|_| ())
    }));
    assert!(
        opened.is_ok(),
        "opening the log panicked (see the overflow above)"
    );
}

/// A junk key verify cannot read as an entry is reported at the seq where the damage is (the
/// next one expected), as before groups.
#[test]
fn verify_reports_a_junk_key_at_the_seq_where_the_damage_is() {
    let (_dir, db) = temp_db();
    let entries = decisions(6, true);
    write_grouped(&db, &entries, &[1, 1, 1, 1, 1, 1]);
    let tree = records_tree(&db);
    let log = open(&db);
    let mut got = Vec::new();
    // After the last record: a 1-byte key.
    tree.insert([0xFFu8], &b"x"[..]).unwrap();
    got.push(("1-byte key after 6", bad_seq(log.verify().unwrap()), 7));
    tree.remove([0xFFu8]).unwrap();
    // Between 5 and 6: a 10-byte key starting with seq 5.
    let mut k = seq_key(5).to_vec();
    k.extend_from_slice(&[0, 0]);
    tree.insert(&k, &b"x"[..]).unwrap();
    got.push(("10-byte key after 5", bad_seq(log.verify().unwrap()), 6));
    let wrong: Vec<_> = got.iter().filter(|(_, g, w)| g != w).collect();
    assert!(wrong.is_empty(), "(case, reported, expected): {wrong:?}");
}

/// Read-your-writes under concurrency: every answered batched append is readable at once,
/// while the maintenance thread inserts full groups and other threads append.
#[test]
fn every_answered_batched_append_is_readable_at_once() {
    let (_dir, db) = temp_db();
    let config = AuditConfig {
        durability: Durability::Batched,
        batch_interval: Duration::from_millis(2),
        ..AuditConfig::default()
    };
    let log = AuditLog::open_with(&db, config, None).unwrap();
    std::thread::scope(|s| {
        for t in 0..3u64 {
            let log = &log;
            s.spawn(move || {
                for n in 0..400u64 {
                    let a = log
                        .append_blocking(decision(n as i64, t * 1000 + n, "t", "c", true, false))
                        .unwrap();
                    if n % 3 == t % 3 {
                        assert!(
                            log.get(a.seq).unwrap().is_some(),
                            "seq {} not readable",
                            a.seq
                        );
                    }
                }
            });
        }
    });
    assert!(log.verify().unwrap().is_ok());
    assert_eq!(all_records(&log).len(), 1200);
}

/// When inserting the pending records fails, a read fails too: it never answers as if
/// answered appends did not exist, and verify does not report a sound log as tampered.
/// (`FAIL_WRITE` stands in for a failing sled insert.)
#[test]
fn a_read_whose_seal_fails_reports_an_error_not_a_missing_record() {
    let (_dir, db) = temp_db();
    let log = batched_without_timer(&db);
    append_allowed(&log, 1..=3);
    stored::tests::FAIL_WRITE.with(|f| f.set(true));
    let get = log.get(3);
    let mut out = Vec::new();
    let exported = log.export(None, None, &mut out);
    let verified = log.verify();
    stored::tests::FAIL_WRITE.with(|f| f.set(false));
    let get_s = format!("{get:?}");
    let silent = matches!(get, Ok(None)) || matches!(exported, Ok(0));
    let false_alarm = matches!(verified, Ok(VerifyReport::Bad { .. }));
    assert!(
        !silent && !false_alarm,
        "get(3) = {get_s}, export = {exported:?}, verify = {verified:?}"
    );
}

/// A thread that panics while inserting a full group (here a reader's, via `PANIC_WRITE`; in
/// the daemon a panicking request task does not stop the process) loses nothing: the group
/// leaves the queue only once it is in sled, so no flush covers a gap.
#[test]
fn a_panic_while_inserting_a_full_group_loses_nothing() {
    let (_dir, db) = temp_db();
    let log = batched_without_timer(&db);
    let writer = log.inner.writer.clone();
    log.append_blocking(decision(1, 1, "t", "c", true, false))
        .unwrap();
    // Hold the maintenance thread (inside its index step), so full groups stay queued.
    let held = writer.test_busy.lock().unwrap();
    writer.index_now_for_test();
    eventually("the maintenance thread is busy", || writer.busy_for_test());
    append_allowed(&log, 2..=12);
    stored::tests::PANIC_WRITE.with(|f| f.set(true));
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| log.get(12)));
    stored::tests::PANIC_WRITE.with(|f| f.set(false));
    assert!(read.is_err(), "the hook did not fire");
    drop(held);
    // Flush what is pending (as the batch timer or a durable waiter would).
    log.shutdown();
    let durable = log.inner.shared.durable.load().seq;
    let report = log.verify().unwrap();
    assert!(
        report.is_ok(),
        "durable head {durable} (answered appends 1..=12), verify: {report:?}"
    );
}

/// After an insert of pending records fails, batched appends are refused (they flush for
/// themselves, retrying the insert) until writing works again; nothing answered is lost.
#[test]
fn batched_appends_are_refused_while_pending_records_cannot_be_inserted() {
    let (_dir, db) = temp_db();
    let log = batched_without_timer(&db);
    append_allowed(&log, 1..=3);
    stored::tests::FAIL_WRITE.with(|f| f.set(true));
    assert!(matches!(log.get(3), Err(AuditError::Write { .. })));
    assert!(log.write_error().is_some());
    let refused = log.append_blocking(decision(4, 4, "t", "c", true, false));
    stored::tests::FAIL_WRITE.with(|f| f.set(false));
    assert!(
        matches!(refused, Err(AuditError::Write { .. })),
        "{refused:?}"
    );
    // Writing works again: the next append flushes everything pending, its own included.
    let a = log
        .append_blocking(decision(5, 5, "t", "c", true, false))
        .unwrap();
    assert_eq!(log.write_error(), None);
    assert_eq!(log.inner.shared.durable.load().seq, a.seq);
    assert_eq!(
        log.verify().unwrap(),
        VerifyReport::Ok {
            entries: a.seq,
            head: a.hash
        }
    );
}

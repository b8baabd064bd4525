//! The approval state machine: examples, concurrency, and a property test over random
//! interleavings of approve / deny / cancel / time passing / redeem.

use super::*;
use crate::engine::ApprovalSettings;
use proptest::prelude::*;

const D: [u8; 32] = [7; 32];
const OTHER: [u8; 32] = [8; 32];

fn store() -> ApprovalStore {
    let db = sled::Config::new().temporary(true).open().unwrap();
    ApprovalStore::open(&db, 3).unwrap()
}

fn new(digest: [u8; 32], tenant: &str, settings: ApprovalSettings) -> NewApproval<'_> {
    NewApproval {
        digest,
        tenant_id: tenant,
        capability_id: "cap.x",
        env: "prod",
        data_label: "PUBLIC",
        rule_id: "r",
        worker_id: "w",
        opened_by: "tok_opener",
        settings,
    }
}

fn open(s: &ApprovalStore, settings: ApprovalSettings, now: i64) -> Approval {
    let (r, t) = s.open_for(new(D, "t", settings), now);
    let a = r.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].kind, TransitionKind::Opened);
    a
}

#[test]
fn open_approve_redeem_once() {
    let s = store();
    let a = open(&s, ApprovalSettings::default(), 1000);
    assert!(a.id.starts_with("apr_") && a.id.len() == 4 + 32, "{}", a.id);
    assert_eq!(a.expires_at_ms, 1000 + 900_000);
    // The same request while pending: the same approval, nothing new opened.
    let (again, t) = s.open_for(new(D, "t", ApprovalSettings::default()), 2000);
    assert_eq!(again.unwrap().id, a.id);
    assert!(t.is_empty());

    assert_eq!(
        s.redeem(&a.id, &D, "tok_opener", 2000).0.unwrap(),
        Redemption::Refused(State::Pending)
    );
    assert!(matches!(
        s.approve(&a.id, "tok_opener", None, 2000).0,
        Err(ApprovalError::SelfApproval)
    ));
    let (r, t) = s.approve(&a.id, "tok_boss", Some("ok"), 3000);
    assert_eq!(r.unwrap().state, State::Approved);
    assert_eq!(t[0].kind, TransitionKind::Approved);
    assert!(matches!(
        s.deny(&a.id, "tok_boss", None, 3000).0,
        Err(ApprovalError::Conflict(State::Approved))
    ));
    assert_eq!(
        s.redeem(&a.id, &OTHER, "tok_opener", 4000).0.unwrap(),
        Redemption::Mismatch
    );
    assert!(matches!(
        s.redeem(&a.id, &D, "tok_opener", 4000).0.unwrap(),
        Redemption::Allowed(_)
    ));
    assert_eq!(
        s.redeem(&a.id, &D, "tok_opener", 4000).0.unwrap(),
        Redemption::Refused(State::Used)
    );
    assert_eq!(
        s.redeem("apr_nope", &D, "tok_opener", 4000).0.unwrap(),
        Redemption::Mismatch
    );
}

#[test]
fn expiry_holds_on_read_and_the_sweep_records_it_once() {
    let s = store();
    let settings = ApprovalSettings {
        ttl_secs: 10,
        ..Default::default()
    };
    let a = open(&s, settings, 0);
    assert_eq!(s.get(&a.id, 9_999).unwrap().unwrap().state, State::Pending);
    assert_eq!(s.get(&a.id, 10_000).unwrap().unwrap().state, State::Expired);
    assert!(matches!(
        s.approve(&a.id, "tok_boss", None, 10_000),
        (Err(ApprovalError::Conflict(State::Expired)), ref t) if t.len() == 1 && t[0].kind == TransitionKind::Expired
    ));
    // Already written: the sweep finds nothing more to record.
    assert!(s.sweep(20_000).1.is_empty());
    // An approved single-use approval must be redeemed within the ttl after approval.
    let b = s.open_for(new(OTHER, "t", settings), 0).0.unwrap();
    s.approve(&b.id, "tok_boss", None, 5_000).0.unwrap();
    let (r, t) = s.sweep(15_000);
    r.unwrap();
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].approval.id, b.id);
    assert_eq!(
        s.redeem(&b.id, &OTHER, "tok_opener", 15_000).0.unwrap(),
        Redemption::Refused(State::Expired)
    );
}

#[test]
fn time_to_decision_is_observed_once_per_decision_by_outcome() {
    let s = store();
    let h = |s: &ApprovalStore, o: &str| {
        s.decision_histograms()
            .into_iter()
            .find(|h| h.outcome == o)
            .unwrap()
    };
    let ttl = ApprovalSettings {
        ttl_secs: 10,
        ..Default::default()
    };
    // Approved after 3 s (then redeemed, then a later expiry of nothing: not a decision).
    let a = open(&s, ttl, 0);
    s.approve(&a.id, "tok_boss", None, 3_000).0.unwrap();
    s.redeem(&a.id, &D, "tok_opener", 4_000).0.unwrap();
    // Expired while pending: after its ttl, 10 s. An approved one that expires unused was
    // decided when it was approved (counted as approved, not again as expired).
    let b = s.open_for(new(OTHER, "t", ttl), 0).0.unwrap();
    s.sweep(60_000).0.unwrap();
    assert_eq!(s.get(&b.id, 60_000).unwrap().unwrap().state, State::Expired);
    let c = s.open_for(new([9; 32], "t", ttl), 100_000).0.unwrap();
    s.approve(&c.id, "tok_boss", None, 100_500).0.unwrap();
    s.sweep(200_000).0.unwrap();
    // Denied after 2 h.
    let day = ApprovalSettings {
        ttl_secs: 86_400,
        ..Default::default()
    };
    let d = s.open_for(new([10; 32], "t", day), 0).0.unwrap();
    s.deny(&d.id, "tok_boss", None, 7_200_000).0.unwrap();

    let approved = h(&s, "approved");
    assert_eq!(approved.count, 2);
    assert_eq!(approved.sum_secs, 3.5);
    // Buckets 1, 5, ...: 0.5 s is in le=1, 3 s in le=5; cumulative; +Inf last.
    assert_eq!(approved.cumulative[0], 1);
    assert_eq!(approved.cumulative[1], 2);
    assert_eq!(approved.cumulative.len(), DECISION_BUCKETS.len() + 1);
    assert_eq!(*approved.cumulative.last().unwrap(), 2);
    let expired = h(&s, "expired");
    assert_eq!((expired.count, expired.sum_secs), (1, 10.0));
    assert_eq!((expired.cumulative[1], expired.cumulative[2]), (0, 1));
    let denied = h(&s, "denied");
    assert_eq!((denied.count, denied.sum_secs), (1, 7200.0));
    let le_7200 = DECISION_BUCKETS.iter().position(|b| *b == 7200).unwrap();
    assert_eq!(
        (denied.cumulative[le_7200 - 1], denied.cumulative[le_7200]),
        (0, 1)
    );
    assert_eq!(h(&s, "cancelled").count, 0);
}

#[test]
fn the_sweep_reads_only_due_timers_and_deletes_ended_approvals_later() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let s = ApprovalStore::open(&db, 1000).unwrap();
    let ttl = ApprovalSettings {
        ttl_secs: 10,
        ..Default::default()
    };
    // 40 approvals denied at 1 s, one left pending (expires at 10 s).
    let mut denied = Vec::new();
    for i in 0..40u8 {
        let a = s.open_for(new([i; 32], "t", ttl), 0).0.unwrap();
        s.deny(&a.id, "tok_boss", None, 1_000).0.unwrap();
        denied.push(a.id);
    }
    let live = s.open_for(new([200; 32], "t", ttl), 0).0.unwrap();
    // Nothing is due: the sweep reads no approval at all.
    let (r, t) = s.sweep(5_000);
    assert_eq!((r.unwrap(), t.len()), (0, 0));
    // The pending one's expiry is the only timer due at 10 s.
    let (r, t) = s.sweep(10_000);
    assert_eq!(r.unwrap(), 1);
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].kind, TransitionKind::Expired);
    assert_eq!(t[0].approval.id, live.id);
    // The pending queue comes from the pending index (which the expiry left).
    assert!(s
        .list(10_000, Some(State::Pending), None, 100)
        .unwrap()
        .is_empty());
    assert_eq!(s.pending_now(10_000).unwrap(), 0);
    // Ended approvals stay for KEEP_ENDED_MS after they ended, then go.
    let (r, _) = s.sweep(1_000 + KEEP_ENDED_MS - 1);
    assert_eq!(r.unwrap(), 0);
    assert!(s.get(&denied[0], 1_000 + KEEP_ENDED_MS).unwrap().is_some());
    let (r, t) = s.sweep(1_000 + KEEP_ENDED_MS);
    assert_eq!(r.unwrap(), 40);
    assert!(t.is_empty(), "a deletion is not a transition");
    for id in &denied {
        assert!(s.get(id, 0).unwrap().is_none(), "{id} deleted");
    }
    assert_eq!(s.list(0, None, None, 1000).unwrap().len(), 1);
    // The expired one goes KEEP_ENDED_MS after its expiry was written.
    s.sweep(10_000 + KEEP_ENDED_MS).0.unwrap();
    assert!(s.get(&live.id, 0).unwrap().is_none());
    assert!(s.timers.is_empty() && s.pending.is_empty() && s.by_digest.is_empty());
    // The same request again opens a new approval.
    let again = s
        .open_for(new([0; 32], "t", ttl), 2 * KEEP_ENDED_MS)
        .0
        .unwrap();
    assert!(!denied.contains(&again.id));
}

#[test]
fn approvals_stored_before_timers_existed_get_them_at_open() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let s = ApprovalStore::open(&db, 1000).unwrap();
    let ttl = ApprovalSettings {
        ttl_secs: 10,
        ..Default::default()
    };
    let now = crate::clock::now_ms();
    let a = s.open_for(new(D, "t", ttl), now).0.unwrap();
    drop(s);
    // As an older release left it: approvals, no timers.
    db.open_tree(TIMERS).unwrap().clear().unwrap();
    let s = ApprovalStore::open(&db, 1000).unwrap();
    let (r, t) = s.sweep(now + 10_000);
    assert_eq!(r.unwrap(), 1);
    assert_eq!(t[0].kind, TransitionKind::Expired);
    assert_eq!(t[0].approval.id, a.id);
}

#[test]
fn an_approval_stored_by_the_previous_release_without_joined_by_still_reads() {
    let db = sled::Config::new().temporary(true).open().unwrap();
    let s = ApprovalStore::open(&db, 1000).unwrap();
    let now = crate::clock::now_ms();
    let a = s
        .open_for(new(D, "t", ApprovalSettings::default()), now)
        .0
        .unwrap();
    drop(s);
    // Rewrite the record as the previous release wrote it: the same named map, no `joined_by`.
    let tree = db.open_tree(TREE).unwrap();
    let raw = tree.get(a.id.as_bytes()).unwrap().unwrap();
    let mut v: serde_json::Value = rmp_serde::from_slice(&raw).unwrap();
    assert!(v["approval"]
        .as_object_mut()
        .unwrap()
        .remove("joined_by")
        .is_some());
    let old = rmp_serde::to_vec_named(&v).unwrap();
    assert_ne!(old, raw.to_vec());
    tree.insert(a.id.as_bytes(), old).unwrap();
    let s = ApprovalStore::open(&db, 1000).unwrap();
    let got = s.get(&a.id, now).unwrap().expect("the old record opens");
    assert_eq!(got, a);
    assert!(got.joined_by.is_empty());
}

#[test]
fn veto_window_and_distinct_approvers_and_cancel() {
    let s = store();
    let veto = ApprovalSettings {
        auto_approve_after_secs: Some(5),
        ..Default::default()
    };
    let a = open(&s, veto, 0);
    assert_eq!(s.get(&a.id, 4_999).unwrap().unwrap().state, State::Pending);
    assert_eq!(s.get(&a.id, 5_000).unwrap().unwrap().state, State::Approved);
    assert!(matches!(
        s.redeem(&a.id, &D, "tok_opener", 6_000).0.unwrap(),
        Redemption::Allowed(_)
    ));

    let two = ApprovalSettings {
        approvers_required: 2,
        ..Default::default()
    };
    let b = s.open_for(new(OTHER, "t", two), 0).0.unwrap();
    assert_eq!(
        s.approve(&b.id, "tok_a", None, 1).0.unwrap().state,
        State::Pending
    );
    assert!(matches!(
        s.approve(&b.id, "tok_a", None, 2).0,
        Err(ApprovalError::AlreadyVoted)
    ));
    assert!(matches!(
        s.cancel(&b.id, "tok_a", None, 3).0,
        Err(ApprovalError::NotOpener)
    ));
    assert_eq!(
        s.approve(&b.id, "tok_b", None, 4).0.unwrap().state,
        State::Approved
    );

    let c = s.open_for(new([9; 32], "t", two), 0).0.unwrap();
    assert_eq!(
        s.cancel(&c.id, "tok_opener", Some("not needed"), 1)
            .0
            .unwrap()
            .state,
        State::Cancelled
    );
}

#[test]
fn per_tenant_cap() {
    let s = store();
    for i in 0..3u8 {
        s.open_for(new([i; 32], "t", Default::default()), 0)
            .0
            .unwrap();
    }
    assert!(matches!(
        s.open_for(new([50; 32], "t", Default::default()), 0).0,
        Err(ApprovalError::TooManyPending(3))
    ));
    // Another tenant is not affected; once one leaves pending there is room again.
    s.open_for(new([51; 32], "u", Default::default()), 0)
        .0
        .unwrap();
    let first = s.list(0, None, Some("t"), 10).unwrap()[0].id.clone();
    s.deny(&first, "tok_boss", None, 1).0.unwrap();
    s.open_for(new([50; 32], "t", Default::default()), 2)
        .0
        .unwrap();
}

#[test]
fn survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let db = sled::open(dir.path()).unwrap();
        let s = ApprovalStore::open(&db, 10).unwrap();
        let a = s.open_for(new(D, "t", Default::default()), 0).0.unwrap();
        s.approve(&a.id, "tok_boss", None, 1).0.unwrap();
        db.flush().unwrap();
        a.id
    };
    let db = sled::open(dir.path()).unwrap();
    let s = ApprovalStore::open(&db, 10).unwrap();
    assert_eq!(s.get(&id, 2).unwrap().unwrap().state, State::Approved);
}

#[test]
fn concurrent_redemptions_allow_exactly_one() {
    let s = std::sync::Arc::new(store());
    let a = open(&s, Default::default(), 0);
    s.approve(&a.id, "tok_boss", None, 1).0.unwrap();
    let allowed: usize = std::thread::scope(|sc| {
        let hs: Vec<_> = (0..32)
            .map(|_| {
                let s = s.clone();
                let id = a.id.clone();
                sc.spawn(move || {
                    matches!(
                        s.redeem(&id, &D, "tok_opener", 2).0.unwrap(),
                        Redemption::Allowed(_)
                    ) as usize
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    assert_eq!(allowed, 1);
}

#[derive(Debug, Clone)]
enum Op {
    Approve(u8),
    Deny(u8),
    Cancel(u8),
    Advance(i64),
    Redeem(bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..4).prop_map(Op::Approve),
        (0u8..4).prop_map(Op::Deny),
        (0u8..4).prop_map(Op::Cancel),
        (0i64..4_000).prop_map(Op::Advance),
        any::<bool>().prop_map(Op::Redeem),
    ]
}

fn tok(i: u8) -> String {
    // Token 0 is the opener.
    if i == 0 {
        "tok_opener".into()
    } else {
        format!("tok_{i}")
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Whatever the interleaving, a redemption is allowed only when SPEC 3.1 allows it, and a
    /// single-use approval is redeemed at most once.
    #[test]
    fn never_a_forbidden_redemption(
        ops in prop::collection::vec(op(), 1..40),
        required in 1u32..3,
        veto in prop::option::of(1u64..6),
        reuse in prop::option::of(1u64..6),
    ) {
        let s = store();
        let settings = ApprovalSettings {
            ttl_secs: 8,
            approvers_required: required,
            auto_approve_after_secs: veto,
            use_window_secs: reuse,
        };
        let a = open(&s, settings, 0);
        let mut now = 0i64;
        // The model: distinct non-opener approvers, whether a deny/cancel happened (and when),
        // when it became approved, how many redemptions were allowed.
        let mut voters = std::collections::BTreeSet::new();
        let mut closed_at: Option<i64> = None;
        let mut approved_at: Option<i64> = None;
        let mut allowed = 0u32;
        for op in ops {
            // A veto window that passed before any deny/cancel approves it then.
            if let (None, Some(v)) = (approved_at, veto) {
                let at = v as i64 * 1000;
                if at <= now && at < 8_000 && closed_at.is_none_or(|c| c > at) {
                    approved_at = Some(at);
                }
            }
            match op {
                Op::Advance(ms) => now += ms,
                Op::Approve(i) => {
                    let r = s.approve(&a.id, &tok(i), None, now).0;
                    if i == 0 {
                        prop_assert!(r.is_err(), "the opener approved");
                    } else if r.is_ok() {
                        prop_assert!(closed_at.is_none() && approved_at.is_none() && now < 8_000);
                        prop_assert!(voters.insert(i), "one approver counted twice");
                        if voters.len() as u32 >= required {
                            approved_at = Some(now);
                        }
                    }
                }
                Op::Deny(i) | Op::Cancel(i) => {
                    let cancel = matches!(op, Op::Cancel(_));
                    let r = if cancel {
                        s.cancel(&a.id, &tok(i), None, now).0
                    } else {
                        s.deny(&a.id, &tok(i), None, now).0
                    };
                    if r.is_ok() {
                        prop_assert!(closed_at.is_none() && approved_at.is_none() && now < 8_000);
                        prop_assert!(!cancel || i == 0, "only the opener cancels");
                        closed_at = Some(now);
                    }
                }
                Op::Redeem(right) => {
                    let digest = if right { D } else { OTHER };
                    let r = s.redeem(&a.id, &digest, "tok_opener", now).0.unwrap();
                    if let Redemption::Allowed(_) = r {
                        prop_assert!(right, "a redemption with another digest was allowed");
                        let at = approved_at.expect("allowed while never approved");
                        prop_assert!(closed_at.is_none_or(|c| c > at));
                        let until = at + reuse.map_or(8_000, |w| w as i64 * 1000);
                        prop_assert!(now < until, "allowed after expiry: {now} >= {until}");
                        allowed += 1;
                        prop_assert!(reuse.is_some() || allowed == 1, "a single-use approval used twice");
                    } else if !right {
                        prop_assert_eq!(r, Redemption::Mismatch);
                    }
                }
            }
        }
    }
}

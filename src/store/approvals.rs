//! Human approvals for `require_approval` rules (SPEC 3.1): the state machine and its sled tree.
//!
//! ```text
//! pending ──approve (N distinct)──▶ approved ──redeem ("once")──▶ used
//!    │  └──veto window passes──────▶    │
//!    ├──deny──▶ denied                   └──ttl / use window passes──▶ expired
//!    ├──cancel (the opener)──▶ cancelled
//!    └──ttl passes──▶ expired
//! ```
//!
//! Time-driven transitions (expiry, the end of a veto window) hold on every read: [`Approval::at`]
//! computes the state at `now` from the stored record, so an expired approval is expired whether
//! or not a sweep has written it yet. Every write is a sled `compare_and_swap` of the exact bytes
//! that were read, so two racing requests cannot both move the same approval: a single-use
//! approval becomes `used` exactly once. Each write returns the [`Transition`]s it made (including
//! time-driven ones it materialised) so the caller audits each one exactly once.
//!
//! Stored value: `rmp-serde` (named fields) of [`Stored`], which starts with a format version.

use std::sync::Mutex;

use rand::rngs::OsRng;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// sled tree of approvals, keyed by id.
const TREE: &str = "approvals";
/// sled tree `digest (32 bytes) → id` of the pending approval for a request digest.
const BY_DIGEST: &str = "approvals_by_digest";
/// sled tree `tenant \0 id → ()` of approvals opened pending, per tenant (for the cap).
const PENDING: &str = "approvals_pending";
/// sled tree `when_ms (8 bytes, big-endian) ‖ kind ‖ id → ()`: when each approval's next
/// time-driven transition is due ([`DUE`]), or, once it has ended, when it is deleted
/// ([`PURGE`]). The sweep reads only the timers that are due, never the whole store.
const TIMERS: &str = "approvals_timers";
const DUE: u8 = 0;
const PURGE: u8 = 1;
/// How long an approval that ended (denied, cancelled, expired, used) is kept before the sweep
/// deletes it; its audit records stay.
pub const KEEP_ENDED_MS: i64 = 7 * 86_400_000;
/// The stored format's version.
const FORMAT: u8 = 1;
/// Default per-tenant cap on pending approvals.
pub const DEFAULT_MAX_PENDING: usize = 1000;
/// Most tokens recorded as having joined one approval (beyond it, later joiners can still
/// redeem it but not read it).
pub const MAX_JOINED: usize = 16;
/// Longest note accepted with approve/deny/cancel, in characters.
pub const MAX_NOTE: usize = 512;

/// Where an approval is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Pending,
    Approved,
    Denied,
    Expired,
    Cancelled,
    Used,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Approved => "approved",
            State::Denied => "denied",
            State::Expired => "expired",
            State::Cancelled => "cancelled",
            State::Used => "used",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        [
            State::Pending,
            State::Approved,
            State::Denied,
            State::Expired,
            State::Cancelled,
            State::Used,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One approver's yes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vote {
    pub token_id: String,
    pub at_ms: i64,
    pub note: Option<String>,
}

/// One approval, as stored and as the API shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub id: String,
    pub state: State,
    /// blake3 request digest, hex.
    pub digest: String,
    pub tenant_id: String,
    pub capability_id: String,
    pub env: String,
    pub data_label: String,
    pub rule_id: String,
    pub worker_id: String,
    /// The token that opened it (it may cancel, never approve).
    pub opened_by: String,
    pub opened_at_ms: i64,
    /// While pending: when it expires unless decided. Once approved: until when it may be
    /// redeemed (approval time + the rule's `approval_ttl`, or + `approval_use` when that is a
    /// duration).
    pub expires_at_ms: i64,
    pub approvers_required: u32,
    /// The end of the veto window (`auto_approve_after`), if the rule has one.
    pub auto_approve_at_ms: Option<i64>,
    /// `None`: single use. `Some(ms)`: reusable this long after approval.
    pub use_window_ms: Option<i64>,
    /// The rule's `approval_ttl`, in ms (the redemption window of a single-use approval).
    pub ttl_ms: i64,
    pub votes: Vec<Vote>,
    pub approved_at_ms: Option<i64>,
    /// Who denied or cancelled it, when, and their note.
    pub decided_by: Option<String>,
    pub decided_at_ms: Option<i64>,
    pub note: Option<String>,
    /// How many redemptions were allowed.
    pub uses: u32,
    /// Other tokens whose identical request, while it was pending, was answered with this
    /// approval (they may read it like its opener; at most [`MAX_JOINED`]).
    #[serde(default)]
    pub joined_by: Vec<String>,
}

/// What the stored bytes hold.
#[derive(Serialize, Deserialize)]
struct Stored {
    format: u8,
    approval: Approval,
}

/// What happened to an approval, for the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub kind: TransitionKind,
    /// The approval after the transition.
    pub approval: Approval,
    /// The token that caused it (`None` for time-driven ones).
    pub token_id: Option<String>,
    pub note: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransitionKind {
    Opened,
    /// An approver said yes but more distinct approvers are needed.
    Voted,
    Approved,
    Denied,
    Expired,
    Cancelled,
    Used,
    /// A reusable approval was redeemed again (`approval_use` is a duration).
    Reused,
}

impl TransitionKind {
    pub const ALL: [TransitionKind; 8] = [
        TransitionKind::Opened,
        TransitionKind::Voted,
        TransitionKind::Approved,
        TransitionKind::Denied,
        TransitionKind::Expired,
        TransitionKind::Cancelled,
        TransitionKind::Used,
        TransitionKind::Reused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TransitionKind::Opened => "opened",
            TransitionKind::Voted => "voted",
            TransitionKind::Approved => "approved",
            TransitionKind::Denied => "denied",
            TransitionKind::Expired => "expired",
            TransitionKind::Cancelled => "cancelled",
            TransitionKind::Used => "used",
            TransitionKind::Reused => "reused",
        }
    }
}

/// Why an operation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no such approval")]
    NotFound,
    #[error("the approval is {0}; this transition is not allowed")]
    Conflict(State),
    #[error("this token has already approved it; another approver is needed")]
    AlreadyVoted,
    #[error("the token that opened an approval cannot approve it")]
    SelfApproval,
    #[error("only the token that opened an approval may cancel it")]
    NotOpener,
    #[error("too many pending approvals for this tenant (at most {0})")]
    TooManyPending(usize),
    #[error("approval store: {0}")]
    Store(String),
}

impl From<sled::Error> for ApprovalError {
    fn from(e: sled::Error) -> Self {
        ApprovalError::Store(e.to_string())
    }
}

/// What a redemption found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redemption {
    /// Allowed: the approval was approved and this use is counted.
    Allowed(Box<Transition>),
    /// Not allowed: the approval's (current) state.
    Refused(State),
    /// The approval does not exist or is bound to another request.
    Mismatch,
}

/// An operation's result and every transition it wrote (audit each one, whatever the result:
/// a refused approve may still have written the expiry it found due).
pub type Outcome<T> = (Result<T, ApprovalError>, Vec<Transition>);

/// What [`ApprovalStore::open_for`] needs from a decision.
pub struct NewApproval<'a> {
    pub digest: [u8; 32],
    pub tenant_id: &'a str,
    pub capability_id: &'a str,
    pub env: &'a str,
    pub data_label: &'a str,
    pub rule_id: &'a str,
    pub worker_id: &'a str,
    pub opened_by: &'a str,
    pub settings: crate::engine::ApprovalSettings,
}

fn timer_key(at_ms: i64, kind: u8, id: &str) -> Vec<u8> {
    let mut k = (at_ms.max(0) as u64).to_be_bytes().to_vec();
    k.push(kind);
    k.extend_from_slice(id.as_bytes());
    k
}

/// The timer an approval written at `now` holds: its next deadline, or once it has ended,
/// its deletion [`KEEP_ENDED_MS`] later.
fn timer_of(a: &Approval, now: i64) -> Vec<u8> {
    match a.next_deadline() {
        Some(t) => timer_key(t, DUE, &a.id),
        None => timer_key(now.saturating_add(KEEP_ENDED_MS), PURGE, &a.id),
    }
}

fn pending_key(a: &Approval) -> Vec<u8> {
    [a.tenant_id.as_bytes(), b"\0", a.id.as_bytes()].concat()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Approval {
    /// The approval as it stands at `now`, with the time-driven transitions applied: a veto
    /// window that has passed approves it, a deadline that has passed expires it.
    pub fn at(&self, now: i64) -> (Approval, Vec<TransitionKind>) {
        let mut a = self.clone();
        let mut made = Vec::new();
        if a.state == State::Pending {
            match a.auto_approve_at_ms {
                Some(t) if t <= now && t < a.expires_at_ms => {
                    a.approve_at(t);
                    made.push(TransitionKind::Approved);
                }
                _ => {}
            }
        }
        if matches!(a.state, State::Pending | State::Approved) && now >= a.expires_at_ms {
            a.state = State::Expired;
            made.push(TransitionKind::Expired);
        }
        (a, made)
    }

    fn approve_at(&mut self, t: i64) {
        self.state = State::Approved;
        self.approved_at_ms = Some(t);
        self.expires_at_ms = t.saturating_add(self.use_window_ms.unwrap_or(self.ttl_ms));
    }

    /// The next moment a time-driven transition could happen, if any.
    pub fn next_deadline(&self) -> Option<i64> {
        match self.state {
            State::Pending => Some(
                self.auto_approve_at_ms
                    .map_or(self.expires_at_ms, |t| t.min(self.expires_at_ms)),
            ),
            State::Approved => Some(self.expires_at_ms),
            _ => None,
        }
    }
}

/// The approvals tree, its indexes and a change signal for long-polls.
pub struct ApprovalStore {
    tree: sled::Tree,
    by_digest: sled::Tree,
    pending: sled::Tree,
    timers: sled::Tree,
    /// Serialises opening, so the same request cannot open two approvals and the per-tenant
    /// cap is exact. Opening is rare; every other write is a lock-free CAS.
    open_lock: Mutex<()>,
    max_pending: usize,
    /// Bumped after every write; `?wait` long-polls subscribe to it (no thread per waiter).
    changed: tokio::sync::watch::Sender<u64>,
    /// Transitions written since start, by [`TransitionKind::ALL`] index (for /metrics).
    counts: [std::sync::atomic::AtomicU64; 8],
    /// Time from opening to the decision, by outcome (for /metrics).
    decision_times: DecisionTimes,
}

/// Upper bounds (seconds) of the time-to-decision histogram's buckets: 1 s to a day.
pub const DECISION_BUCKETS: [u64; 14] = [
    1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400,
];
/// The outcomes the histogram is labelled by.
pub const DECISION_OUTCOMES: [&str; 4] = ["approved", "denied", "cancelled", "expired"];

/// A Prometheus histogram per outcome of how long approvals waited for their decision.
/// Observed once per decision transition (an atomic add or three).
#[derive(Default)]
struct DecisionTimes {
    /// `[outcome][bucket]`, not cumulative; the last slot is `+Inf`.
    buckets: [[std::sync::atomic::AtomicU64; DECISION_BUCKETS.len() + 1]; 4],
    count: [std::sync::atomic::AtomicU64; 4],
    sum_ms: [std::sync::atomic::AtomicU64; 4],
}

/// One outcome's histogram: cumulative counts per bucket of [`DECISION_BUCKETS`] (then
/// `+Inf`), the count and the sum in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionHistogram {
    pub outcome: &'static str,
    pub cumulative: Vec<u64>,
    pub count: u64,
    pub sum_secs: f64,
}

impl DecisionTimes {
    /// The outcome index and milliseconds from opening to the decision, if `t` decided it.
    /// An approved approval that later expires unused was decided when it was approved.
    fn of(t: &Transition) -> Option<(usize, i64)> {
        let a = &t.approval;
        let (i, at) = match t.kind {
            TransitionKind::Approved => (0, a.approved_at_ms?),
            TransitionKind::Denied => (1, a.decided_at_ms?),
            TransitionKind::Cancelled => (2, a.decided_at_ms?),
            TransitionKind::Expired if a.approved_at_ms.is_none() => (3, a.expires_at_ms),
            _ => return None,
        };
        Some((i, at.saturating_sub(a.opened_at_ms).max(0)))
    }

    fn observe(&self, t: &Transition) {
        use std::sync::atomic::Ordering::Relaxed;
        let Some((i, ms)) = Self::of(t) else { return };
        let b = DECISION_BUCKETS
            .iter()
            .position(|&le| ms as u64 <= le * 1000)
            .unwrap_or(DECISION_BUCKETS.len());
        self.buckets[i][b].fetch_add(1, Relaxed);
        self.count[i].fetch_add(1, Relaxed);
        self.sum_ms[i].fetch_add(ms as u64, Relaxed);
    }

    fn snapshot(&self) -> Vec<DecisionHistogram> {
        use std::sync::atomic::Ordering::Relaxed;
        DECISION_OUTCOMES
            .iter()
            .enumerate()
            .map(|(i, outcome)| {
                let mut cum = 0;
                let cumulative = self.buckets[i]
                    .iter()
                    .map(|c| {
                        cum += c.load(Relaxed);
                        cum
                    })
                    .collect();
                DecisionHistogram {
                    outcome,
                    cumulative,
                    count: self.count[i].load(Relaxed),
                    sum_secs: self.sum_ms[i].load(Relaxed) as f64 / 1000.0,
                }
            })
            .collect()
    }
}

impl ApprovalStore {
    pub fn open(db: &sled::Db, max_pending: usize) -> Result<ApprovalStore, ApprovalError> {
        let store = ApprovalStore {
            tree: db.open_tree(TREE)?,
            by_digest: db.open_tree(BY_DIGEST)?,
            pending: db.open_tree(PENDING)?,
            timers: db.open_tree(TIMERS)?,
            open_lock: Mutex::new(()),
            max_pending,
            changed: tokio::sync::watch::channel(0).0,
            counts: Default::default(),
            decision_times: DecisionTimes::default(),
        };
        store.build_timers(crate::clock::now_ms())?;
        Ok(store)
    }

    /// Approvals written before the timers tree existed get their timers once (an ended one
    /// is kept [`KEEP_ENDED_MS`] from now).
    fn build_timers(&self, now: i64) -> Result<(), ApprovalError> {
        if !self.timers.is_empty() || self.tree.is_empty() {
            return Ok(());
        }
        for kv in self.tree.iter() {
            let (k, _) = kv?;
            let id = String::from_utf8_lossy(&k).into_owned();
            if let Some((_, a)) = self.load_raw(&id)? {
                self.timers.insert(timer_of(&a, now), &[])?;
            }
        }
        Ok(())
    }

    /// After `before` was replaced by `after` at `now`: move its timer and leave the pending
    /// index when it stops being pending. (Not atomic with the write: a race can leave a stale
    /// `DUE` timer, which the sweep drops; the timer of the newest state is always written.)
    fn retime(&self, before: &Approval, after: &Approval, now: i64) -> Result<(), ApprovalError> {
        let new = timer_of(after, now);
        if let Some(t) = before.next_deadline() {
            let old = timer_key(t, DUE, &before.id);
            if old != new {
                self.timers.remove(old)?;
            }
        }
        self.timers.insert(new, &[])?;
        if before.state == State::Pending && after.state != State::Pending {
            self.pending.remove(pending_key(after))?;
        }
        Ok(())
    }

    /// Delete an ended approval and what points to it.
    fn purge(&self, a: &Approval) -> Result<(), ApprovalError> {
        self.tree.remove(a.id.as_bytes())?;
        self.pending.remove(pending_key(a))?;
        if let Ok(d) = ::hex::decode(&a.digest) {
            // Only if it still names this approval (a newer one may have taken the digest).
            let _ = self
                .by_digest
                .compare_and_swap(d, Some(a.id.as_bytes()), None::<&[u8]>)?;
        }
        Ok(())
    }

    /// A receiver that sees a new value after every write.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn count(&self, ts: &[Transition]) {
        for t in ts {
            if let Some(i) = TransitionKind::ALL.iter().position(|k| *k == t.kind) {
                self.counts[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.decision_times.observe(t);
        }
    }

    /// Time from opening to decision since start, per outcome (approved, denied, cancelled,
    /// expired while pending).
    pub fn decision_histograms(&self) -> Vec<DecisionHistogram> {
        self.decision_times.snapshot()
    }

    /// Transitions written since start, by kind.
    pub fn transition_counts(&self) -> Vec<(TransitionKind, u64)> {
        TransitionKind::ALL
            .iter()
            .zip(&self.counts)
            .map(|(k, c)| (*k, c.load(std::sync::atomic::Ordering::Relaxed)))
            .collect()
    }

    /// Approvals pending now, across tenants (walks the pending index).
    pub fn pending_now(&self, now: i64) -> Result<usize, ApprovalError> {
        let mut n = 0;
        for kv in self.pending.iter() {
            let (k, _) = kv?;
            let Some(i) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            let id = String::from_utf8_lossy(&k[i + 1..]).into_owned();
            if self
                .get(&id, now)?
                .is_some_and(|a| a.state == State::Pending)
            {
                n += 1;
            }
        }
        Ok(n)
    }

    fn load_raw(&self, id: &str) -> Result<Option<(sled::IVec, Approval)>, ApprovalError> {
        let Some(raw) = self.tree.get(id.as_bytes())? else {
            return Ok(None);
        };
        let stored: Stored = rmp_serde::from_slice(&raw)
            .map_err(|e| ApprovalError::Store(format!("approval {id} cannot be decoded: {e}")))?;
        if stored.format != FORMAT {
            return Err(ApprovalError::Store(format!(
                "approval {id} has format {}, this release reads {FORMAT}",
                stored.format
            )));
        }
        Ok(Some((raw, stored.approval)))
    }

    fn encode(a: &Approval) -> Result<Vec<u8>, ApprovalError> {
        rmp_serde::to_vec_named(&Stored {
            format: FORMAT,
            approval: a.clone(),
        })
        .map_err(|e| ApprovalError::Store(e.to_string()))
    }

    /// One approval as it stands at `now` (expiry and veto windows applied).
    pub fn get(&self, id: &str, now: i64) -> Result<Option<Approval>, ApprovalError> {
        Ok(self.load_raw(id)?.map(|(_, a)| a.at(now).0))
    }

    /// Every approval as it stands at `now`, filtered, oldest first.
    pub fn list(
        &self,
        now: i64,
        state: Option<State>,
        tenant: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Approval>, ApprovalError> {
        let mut out = Vec::new();
        // The pending queue comes from the pending index, not a walk of every approval.
        let ids: Box<dyn Iterator<Item = Result<String, ApprovalError>>> =
            if state == Some(State::Pending) {
                let prefix = tenant.map(|t| [t.as_bytes(), b"\0"].concat());
                let it = match &prefix {
                    Some(p) => self.pending.scan_prefix(p),
                    None => self.pending.iter(),
                };
                Box::new(it.keys().map(|k| {
                    let k = k?;
                    let i = k.iter().position(|b| *b == 0).unwrap_or(k.len());
                    Ok(String::from_utf8_lossy(k.get(i + 1..).unwrap_or_default()).into_owned())
                }))
            } else {
                Box::new(
                    self.tree
                        .iter()
                        .keys()
                        .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned())),
                )
            };
        for id in ids {
            let id = id?;
            let Some(a) = self.get(&id, now)? else {
                continue;
            };
            if state.is_some_and(|s| s != a.state) || tenant.is_some_and(|t| t != a.tenant_id) {
                continue;
            }
            out.push(a);
        }
        out.sort_by(|a, b| (a.opened_at_ms, &a.id).cmp(&(b.opened_at_ms, &b.id)));
        out.truncate(limit);
        Ok(out)
    }

    /// Open an approval for a decision, or return the one already pending for the same digest
    /// (retries never flood approvers). `Ok((approval, transitions))`: `transitions` is empty when an
    /// existing approval was returned.
    pub fn open_for(&self, new: NewApproval<'_>, now: i64) -> Outcome<Approval> {
        let mut transitions = Vec::new();
        let r = self.open_inner(new, now, &mut transitions);
        (r, transitions)
    }

    fn open_inner(
        &self,
        new: NewApproval<'_>,
        now: i64,
        transitions: &mut Vec<Transition>,
    ) -> Result<Approval, ApprovalError> {
        let _guard = self.open_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = self.by_digest.get(new.digest)? {
            let id = String::from_utf8_lossy(&id).into_owned();
            // Materialise its time-driven transitions (and audit them) before deciding; a
            // token other than the opener that asks the same joins it (so it may read it).
            let joiner = new.opened_by;
            let join = |a: &mut Approval| {
                if a.state == State::Pending
                    && a.tenant_id == new.tenant_id
                    && a.opened_by != joiner
                    && a.joined_by.len() < MAX_JOINED
                    && !a.joined_by.iter().any(|t| t == joiner)
                {
                    a.joined_by.push(joiner.to_string());
                }
                Ok(None)
            };
            match self.update(&id, now, transitions, join) {
                Ok(a) if a.state == State::Pending && a.tenant_id == new.tenant_id => return Ok(a),
                Ok(_) | Err(ApprovalError::NotFound) => {}
                Err(e) => return Err(e),
            }
        }
        // The per-tenant cap, counting what is still pending now; stale index entries go.
        let prefix = [new.tenant_id.as_bytes(), b"\0"].concat();
        let mut pending = 0usize;
        for kv in self.pending.scan_prefix(&prefix) {
            let (k, _) = kv?;
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            match self.get(&id, now)? {
                Some(a) if a.state == State::Pending => pending += 1,
                _ => {
                    self.pending.remove(&k)?;
                }
            }
        }
        if pending >= self.max_pending {
            return Err(ApprovalError::TooManyPending(self.max_pending));
        }
        let mut rnd = [0u8; 16];
        OsRng.fill_bytes(&mut rnd);
        let s = new.settings;
        let ttl_ms = (s.ttl_secs as i64).saturating_mul(1000);
        let a = Approval {
            id: format!("apr_{}", hex(&rnd)),
            state: State::Pending,
            digest: hex(&new.digest),
            tenant_id: new.tenant_id.into(),
            capability_id: new.capability_id.into(),
            env: new.env.into(),
            data_label: new.data_label.into(),
            rule_id: new.rule_id.into(),
            worker_id: new.worker_id.into(),
            opened_by: new.opened_by.into(),
            opened_at_ms: now,
            expires_at_ms: now.saturating_add(ttl_ms),
            approvers_required: s.approvers_required.max(1),
            auto_approve_at_ms: s
                .auto_approve_after_secs
                .map(|v| now.saturating_add((v as i64).saturating_mul(1000))),
            use_window_ms: s.use_window_secs.map(|v| (v as i64).saturating_mul(1000)),
            ttl_ms,
            votes: Vec::new(),
            approved_at_ms: None,
            decided_by: None,
            decided_at_ms: None,
            note: None,
            uses: 0,
            joined_by: Vec::new(),
        };
        let bytes = Self::encode(&a)?;
        self.tree.insert(a.id.as_bytes(), bytes)?;
        self.by_digest.insert(new.digest, a.id.as_bytes())?;
        self.pending
            .insert([prefix.as_slice(), a.id.as_bytes()].concat(), &[])?;
        self.timers.insert(timer_of(&a, now), &[])?;
        self.bump();
        transitions.push(Transition {
            kind: TransitionKind::Opened,
            approval: a.clone(),
            token_id: Some(new.opened_by.into()),
            note: None,
        });
        self.count(&transitions[transitions.len() - 1..]);
        Ok(a)
    }

    /// Read, apply time, apply `f`, and compare-and-swap the result in; retry if another
    /// writer got there first. `f` returns the explicit transition it made, if any.
    /// Every transition (time-driven ones included) is pushed to `out`.
    fn update(
        &self,
        id: &str,
        now: i64,
        out: &mut Vec<Transition>,
        mut f: impl FnMut(&mut Approval) -> Result<Option<Transition>, ApprovalError>,
    ) -> Result<Approval, ApprovalError> {
        loop {
            let Some((raw, stored)) = self.load_raw(id)? else {
                return Err(ApprovalError::NotFound);
            };
            let (mut a, timed) = stored.at(now);
            let timed: Vec<Transition> = timed
                .into_iter()
                .map(|kind| Transition {
                    kind,
                    approval: a.clone(),
                    token_id: None,
                    note: None,
                })
                .collect();
            let explicit = f(&mut a);
            if a == stored {
                // Nothing to write (a refusal, or a read with nothing due).
                return explicit.map(|_| a);
            }
            let bytes = Self::encode(&a)?;
            match self
                .tree
                .compare_and_swap(id.as_bytes(), Some(&raw), Some(bytes))?
            {
                Ok(()) => {
                    self.retime(&stored, &a, now)?;
                    self.bump();
                    self.count(&timed);
                    out.extend(timed);
                    let explicit = explicit?;
                    self.count(explicit.as_slice());
                    out.extend(explicit);
                    return Ok(a);
                }
                // Someone else wrote it first: decide again on what they wrote.
                Err(_) => continue,
            }
        }
    }

    /// An approver says yes. Distinct approvers only; the opener may not.
    pub fn approve(
        &self,
        id: &str,
        token_id: &str,
        note: Option<&str>,
        now: i64,
    ) -> Outcome<Approval> {
        let mut out = Vec::new();
        let r = self.update(id, now, &mut out, |a| {
            if a.state != State::Pending {
                return Err(ApprovalError::Conflict(a.state));
            }
            if a.opened_by == token_id {
                return Err(ApprovalError::SelfApproval);
            }
            if a.votes.iter().any(|v| v.token_id == token_id) {
                return Err(ApprovalError::AlreadyVoted);
            }
            a.votes.push(Vote {
                token_id: token_id.into(),
                at_ms: now,
                note: note.map(str::to_string),
            });
            let kind = if a.votes.len() as u32 >= a.approvers_required {
                a.approve_at(now);
                TransitionKind::Approved
            } else {
                TransitionKind::Voted
            };
            Ok(Some(Transition {
                kind,
                approval: a.clone(),
                token_id: Some(token_id.into()),
                note: note.map(str::to_string),
            }))
        });
        (r, out)
    }

    /// An approver says no (pending only: a veto inside the window, or a plain denial).
    pub fn deny(
        &self,
        id: &str,
        token_id: &str,
        note: Option<&str>,
        now: i64,
    ) -> Outcome<Approval> {
        self.close(id, token_id, note, now, State::Denied, None)
    }

    /// The opener withdraws it (pending only).
    pub fn cancel(
        &self,
        id: &str,
        token_id: &str,
        note: Option<&str>,
        now: i64,
    ) -> Outcome<Approval> {
        self.close(id, token_id, note, now, State::Cancelled, Some(token_id))
    }

    fn close(
        &self,
        id: &str,
        token_id: &str,
        note: Option<&str>,
        now: i64,
        to: State,
        must_be_opener: Option<&str>,
    ) -> Outcome<Approval> {
        let mut out = Vec::new();
        let r = self.update(id, now, &mut out, |a| {
            if a.state != State::Pending {
                return Err(ApprovalError::Conflict(a.state));
            }
            if must_be_opener.is_some_and(|t| t != a.opened_by) {
                return Err(ApprovalError::NotOpener);
            }
            a.state = to;
            a.decided_by = Some(token_id.into());
            a.decided_at_ms = Some(now);
            a.note = note.map(str::to_string);
            Ok(Some(Transition {
                kind: if to == State::Denied {
                    TransitionKind::Denied
                } else {
                    TransitionKind::Cancelled
                },
                approval: a.clone(),
                token_id: Some(token_id.into()),
                note: note.map(str::to_string),
            }))
        });
        (r, out)
    }

    /// Redeem an approval for a request whose fresh decision produced `digest`.
    /// Exactly one concurrent redemption of a single-use approval is allowed.
    pub fn redeem(
        &self,
        id: &str,
        digest: &[u8; 32],
        token_id: &str,
        now: i64,
    ) -> Outcome<Redemption> {
        let want = hex(digest);
        let mut out = Vec::new();
        let mut refused = None;
        let mut mismatch = false;
        let r = self.update(id, now, &mut out, |a| {
            if a.digest != want {
                mismatch = true;
                return Ok(None);
            }
            if a.state != State::Approved {
                refused = Some(a.state);
                return Ok(None);
            }
            a.uses = a.uses.saturating_add(1);
            let kind = if a.use_window_ms.is_none() {
                a.state = State::Used;
                TransitionKind::Used
            } else {
                TransitionKind::Reused
            };
            Ok(Some(Transition {
                kind,
                approval: a.clone(),
                token_id: Some(token_id.into()),
                note: None,
            }))
        });
        let r = match r {
            Err(ApprovalError::NotFound) => Ok(Redemption::Mismatch),
            Err(e) => Err(e),
            Ok(_) if mismatch => Ok(Redemption::Mismatch),
            Ok(_) => match refused {
                Some(s) => Ok(Redemption::Refused(s)),
                None => out
                    .iter()
                    .rev()
                    .find(|t| matches!(t.kind, TransitionKind::Used | TransitionKind::Reused))
                    .cloned()
                    .map(|t| Redemption::Allowed(Box::new(t)))
                    .ok_or_else(|| ApprovalError::Store("redemption made no transition".into())),
            },
        };
        (r, out)
    }

    /// Write the time-driven transitions that are due (expiry, veto windows), so they are
    /// audited even if nobody reads the approval again, and delete approvals that ended more
    /// than [`KEEP_ENDED_MS`] ago. Reads only the timers that are due. Returns how many timers
    /// it handled, and the transitions.
    pub fn sweep(&self, now: i64) -> Outcome<usize> {
        let mut out = Vec::new();
        let r = self.sweep_inner(now, &mut out);
        (r, out)
    }

    fn sweep_inner(&self, now: i64, out: &mut Vec<Transition>) -> Result<usize, ApprovalError> {
        let end = ((now.max(0) as u64).saturating_add(1)).to_be_bytes();
        let due: Vec<sled::IVec> = self
            .timers
            .range(..end.as_slice())
            .keys()
            .collect::<Result<_, _>>()?;
        for k in &due {
            if k.len() < 9 {
                self.timers.remove(k)?;
                continue;
            }
            let kind = k[8];
            let id = String::from_utf8_lossy(&k[9..]).into_owned();
            let Some((_, stored)) = self.load_raw(&id)? else {
                self.timers.remove(k)?;
                continue;
            };
            if kind == PURGE {
                if stored.next_deadline().is_none() {
                    self.purge(&stored)?;
                }
                self.timers.remove(k)?;
                continue;
            }
            let now_a = match self.update(&id, now, out, |_| Ok(None)) {
                Ok(a) => a,
                Err(ApprovalError::NotFound) => continue,
                Err(e) => return Err(e),
            };
            // The update moved the timer if it wrote; one it did not move is stale.
            if now_a
                .next_deadline()
                .map(|t| timer_key(t, DUE, &id))
                .as_deref()
                != Some(k.as_ref())
            {
                self.timers.remove(k)?;
            }
        }
        Ok(due.len())
    }
}

#[cfg(test)]
mod tests;

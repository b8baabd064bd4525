//! The audit log: one hash-chained record per decision, reload, token and secret event.
//!
//! Records live in the sled tree `audit`, one entry per record or per group of consecutive
//! records, keyed by big-endian `seq` (gapless, from 1; a group by its last, see [`stored`]). Each
//! record's `hash = blake3(prev_hash ‖ rmp-serde body)`, the first `prev_hash` being 32 zero
//! bytes, so [`AuditLog::verify`] finds the first record that was altered, removed or
//! re-linked. A decision id carries its record's seq (`record::decision_uuid`), so a lookup by
//! id is one read; the tenant and capability indexes are posting lists the writer adds about
//! once a second ([`index`]); time ranges are binary-searched in the records tree itself.
//!
//! An append chains its record on the caller's thread and adds it to the group the writer
//! inserts into sled when the group is full (on the maintenance thread), at a flush, or
//! before a read ([`writer`]); with
//! [`Durability::Durable`] (the default) it then waits for a `db.flush()` that covers it,
//! run by the first waiter for everyone queued behind it (leader/follower group commit).
//! Batched appends answer once chained; a maintenance thread inserts and flushes within the
//! batch interval and writes index chunks and retention, so no answer waits for them. A
//! storage error fails every append waiting for a flush it breaks, and every append after it
//! until a write works (the daemon answers 503), so a decision is never sent unrecorded in
//! durable mode, and in batched mode none is sent while the log cannot be written. Batched
//! records answered before such an error stay pending and are written when writing works
//! again; like any batched record, they are lost if the process dies first. A failed append
//! may still be in the log; a successful durable one always is.
//!
//! **Fault hook (debug builds only).** If the environment variable `HALL_FAULT_AUDIT_FAIL_FILE`
//! names a path, then while that path exists every batch fails with an injected I/O error,
//! before anything is written. End-to-end tests use it to check the daemon fails closed
//! (create the file: appends fail and the daemon answers 503; remove it: appends work again).
//! Release builds contain no trace of it. A genuine failure works too: with `SIGXFSZ` ignored,
//! a process under `prlimit --fsize=N` gets `EFBIG` from sled's flush once the file reaches N
//! bytes, and every append fails from then on (checked with sled 0.34; without ignoring
//! `SIGXFSZ` the kernel kills the process instead).
//!
//! Open one `AuditLog` per database and share it by cloning: two writers would fork the chain.

pub mod checkpoint;
mod index;
mod record;
mod stored;
mod writer;

#[cfg(test)]
mod tests;

use std::io::Write;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;

pub use checkpoint::LostRange;
use record::{decode_value, split_value, Defect, HASH_LEN};
pub use record::{AuditEntry, AuditRecord, Durability, Hash32, RecordKind};
pub use writer::start_relay;
use writer::Writer;

/// Counts an append waiting for its flush (`queue_depth`) for as long as it waits.
struct Waiting<'a>(&'a Counters);

impl<'a> Waiting<'a> {
    fn new(c: &'a Counters) -> Self {
        c.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(c)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How often the writer applies retention (when `retention_days` is set).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// Most records the writer prunes between two batches, so pruning never stalls appends long.
const PRUNE_STEP: usize = 10_000;
/// `AuditQuery::limit` when 0 is given.
pub const DEFAULT_QUERY_LIMIT: usize = 100;
/// The most records one query returns, whatever `limit` asks for.
pub const MAX_QUERY_LIMIT: usize = 1000;
const CHECKPOINT_KEY: &[u8] = b"checkpoint";
const ID_KEY: &[u8] = b"decision_id_key";
const MS_PER_DAY: i64 = 86_400_000;

/// Settings for the audit log (`[audit]` in hall.toml).
#[derive(Clone, Debug)]
pub struct AuditConfig {
    pub durability: Durability,
    /// Delete records older than this many days; `None` keeps everything.
    pub retention_days: Option<u32>,
    /// Batched mode: the longest a record waits in memory before a flush (default 50 ms).
    pub batch_interval: Duration,
    /// Where to keep the chain head outside sled ([`checkpoint`]); `None`: no checkpoint
    /// (truncation by sled's recovery then goes unnoticed).
    pub checkpoint: Option<PathBuf>,
    /// Open even when the log is shorter than (or differs from) its checkpoint, recording
    /// the loss in the checkpoint so that status and `verify` keep reporting it.
    pub accept_truncation: bool,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            durability: Durability::Durable,
            retention_days: None,
            batch_interval: Duration::from_millis(50),
            checkpoint: None,
            accept_truncation: false,
        }
    }
}

/// Why the audit log could not do what was asked. Every variant means "no record was
/// promised": the daemon answers 503 to an append error. Causes stay attached
/// (`Error::source`) and are also spelled out in the message, which is what status, logs and
/// the CLI show.
#[derive(Clone, Debug, thiserror::Error)]
pub enum AuditError {
    /// sled refused to insert or flush: the append is not committed.
    #[error("the audit log could not be written ({op}): {source}")]
    Write {
        op: &'static str,
        #[source]
        source: sled::Error,
    },
    /// An I/O error outside sled while writing (starting a thread, the checkpoint file).
    #[error("the audit log could not be written ({op}): {source}")]
    Io {
        op: String,
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Debug builds: the fault-injection file exists (see the module docs).
    #[error("the audit log could not be written: injected I/O error ({0} exists)")]
    Injected(String),
    /// Every seq a decision id can carry is used.
    #[error(
        "the audit log holds its maximum of {} records: export it (`hall audit export`) and start a new state dir",
        record::MAX_SEQ
    )]
    Full,
    /// A record could not be encoded (not expected: every field is serializable).
    #[error("the audit log could not be written: a record could not be encoded: {0}")]
    Encode(String),
    /// The log has been shut down (`shutdown`).
    #[error("the audit log is shut down")]
    Closed,
    /// Reading the log failed.
    #[error("the audit log could not be read: {0}")]
    Storage(#[from] sled::Error),
    /// The log changed under a reader in a way it cannot follow (retention ran mid-query).
    #[error("the audit log could not be read: {0}")]
    Moved(&'static str),
    /// A stored record cannot be decoded.
    #[error("audit record {seq} is corrupt: {reason}")]
    Corrupt { seq: u64, reason: &'static str },
    /// Writing an export to its destination failed.
    #[error("could not write the audit export: {0}")]
    Export(#[source] Arc<std::io::Error>),
    /// The log holds fewer (or other) records than its checkpoint says were durable.
    #[error("{0}")]
    Truncated(String),
}

impl AuditError {
    fn io(op: impl Into<String>, e: std::io::Error) -> AuditError {
        AuditError::Io {
            op: op.into(),
            source: Arc::new(e),
        }
    }

    fn export(e: impl Into<std::io::Error>) -> AuditError {
        AuditError::Export(Arc::new(e.into()))
    }
}

/// Where a successful append landed in the chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Appended {
    pub seq: u64,
    pub hash: Hash32,
    /// The id the writer gave a decision record (its entry had none).
    pub decision_id: Option<uuid::Uuid>,
}

/// The newest record: `seq` 0 and the zero hash for an empty log. Serializes as
/// `{"seq": N, "hash": "hex"}` for `/api/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Head {
    pub seq: u64,
    pub hash: Hash32,
}

/// Filters for [`AuditLog::query`]. All given filters must match. Results are in `seq`
/// order (newest last); page forward by passing the last `seq` seen as `after_seq`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuditQuery {
    pub tenant_id: Option<String>,
    pub capability_id: Option<String>,
    pub allowed: Option<bool>,
    pub kind: Option<RecordKind>,
    /// Records at or after this time (ms since the epoch).
    pub since_ms: Option<i64>,
    /// Records at or before this time (ms since the epoch).
    pub until_ms: Option<i64>,
    /// Only records with a greater `seq`.
    pub after_seq: Option<u64>,
    /// 0 means [`DEFAULT_QUERY_LIMIT`]; capped at [`MAX_QUERY_LIMIT`].
    pub limit: usize,
    /// Take the newest `limit` matches instead of the oldest (`hall audit tail`); still
    /// returned newest last.
    pub newest: bool,
}

/// What [`AuditLog::verify`] found. JSON: `{"ok":true,"entries":N,"head":"hex"}` or
/// `{"ok":false,"first_bad_seq":N,"problem":"…"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifyReport {
    /// Every record from the retention checkpoint (or seq 1) links and hashes correctly.
    Ok { entries: u64, head: Hash32 },
    /// `first_bad_seq` is missing, fails to decode, or its hash or link is wrong.
    Bad {
        first_bad_seq: u64,
        problem: &'static str,
    },
    /// The chain links, but records were lost (found against the checkpoint at open and
    /// acknowledged by the operator): `first_bad_seq` is the first one missing.
    Lost {
        first_bad_seq: u64,
        lost: Vec<LostRange>,
    },
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        matches!(self, VerifyReport::Ok { .. })
    }
}

impl Serialize for VerifyReport {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        match self {
            VerifyReport::Ok { entries, head } => {
                let mut st = s.serialize_struct("VerifyReport", 3)?;
                st.serialize_field("ok", &true)?;
                st.serialize_field("entries", entries)?;
                st.serialize_field("head", head)?;
                st.end()
            }
            VerifyReport::Bad {
                first_bad_seq,
                problem,
            } => {
                let mut st = s.serialize_struct("VerifyReport", 3)?;
                st.serialize_field("ok", &false)?;
                st.serialize_field("first_bad_seq", first_bad_seq)?;
                st.serialize_field("problem", problem)?;
                st.end()
            }
            VerifyReport::Lost {
                first_bad_seq,
                lost,
            } => {
                let mut st = s.serialize_struct("VerifyReport", 4)?;
                st.serialize_field("ok", &false)?;
                st.serialize_field("first_bad_seq", first_bad_seq)?;
                st.serialize_field(
                    "problem",
                    "records were lost (found against the checkpoint; start acknowledged with --accept-audit-truncation)",
                )?;
                st.serialize_field("lost", lost)?;
                st.end()
            }
        }
    }
}

/// Counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AuditStats {
    /// Records written.
    pub appended: u64,
    /// Appends refused because their batch failed.
    pub failed: u64,
    /// Group commits (one sled batch each).
    pub batches: u64,
    /// `db.flush()` calls.
    pub flushes: u64,
    /// Appends waiting for a flush that covers them.
    pub queue_depth: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    waiting: AtomicU64,
    appended: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    flushes: AtomicU64,
}

/// State shared by handles and the writer thread.
pub(crate) struct Shared {
    /// The published head. A plain lock, not an `ArcSwap`: batched mode publishes on every
    /// insert (the hot path) and an `ArcSwap` store walks every thread's debt list, while
    /// readers (status, event streams, checkpoints) are rare.
    head: Mutex<Head>,
    /// The newest head known to be on disk (after a flush): what the checkpoint may name.
    pub(crate) durable: ArcSwap<Head>,
    /// Why the last append or flush failed; `None` once one succeeds (readiness, status).
    pub(crate) write_error: Mutex<Option<String>>,
    /// `write_error` is set (so that a successful append clears it without a lock).
    has_write_error: AtomicBool,
    stats: Counters,
    /// Masks the seq in decision ids (`record::decision_uuid`).
    pub(crate) id_key: [u8; 32],
    /// Serializes pruning (the writer's tick and explicit `prune` calls) so checkpoints only
    /// move forward.
    prune_lock: Mutex<()>,
    /// The published head's seq, for readers that follow the log ([`AuditLog::subscribe_head`]).
    head_seq: tokio::sync::watch::Sender<u64>,
}

impl Shared {
    fn publish_head(&self, head: Head) {
        *self.head.lock().unwrap_or_else(|p| p.into_inner()) = head;
        // An O(1) signal that wakes the event streams; skipped while none is open (a stream
        // that subscribes later reads `head` above, stored first).
        if self.head_seq.receiver_count() > 0 {
            self.head_seq.send_replace(head.seq);
        }
    }

    pub(crate) fn publish_durable(&self, head: Head) {
        self.durable.store(Arc::new(head));
    }

    pub(crate) fn set_write_error(&self, e: Option<String>) {
        let mut w = self.write_error.lock().unwrap_or_else(|p| p.into_inner());
        self.has_write_error.store(e.is_some(), Ordering::Release);
        *w = e;
    }
}

/// The sled trees the log uses.
#[derive(Clone)]
pub(crate) struct Trees {
    db: sled::Db,
    records: sled::Tree,
    postings: sled::Tree,
    meta: sled::Tree,
}

impl Trees {
    fn open(db: &sled::Db) -> Result<Trees, sled::Error> {
        Ok(Trees {
            db: db.clone(),
            records: db.open_tree("audit")?,
            postings: db.open_tree("audit_postings")?,
            meta: db.open_tree("audit_meta")?,
        })
    }
}

struct Inner {
    writer: Arc<Writer>,
    trees: Trees,
    shared: Arc<Shared>,
    /// The maintenance thread ([`writer`]); `None` after shutdown.
    maintainer: Mutex<Option<JoinHandle<()>>>,
    retention_days: Option<u32>,
    /// The checkpoint task and the sender that stops it (`None` without a checkpoint).
    checkpointer: Mutex<Option<(JoinHandle<()>, mpsc::Sender<()>)>>,
    checkpoint: Arc<Mutex<checkpoint::Status>>,
}

impl Inner {
    fn shutdown(&self) {
        // Held until the end, so that a second caller returns only once the first is done
        // (and then finds nothing to do): "returned" always means "flushed".
        let mut maintainer = self.maintainer.lock().unwrap_or_else(|p| p.into_inner());
        let Some(handle) = maintainer.take() else {
            return;
        };
        self.writer.stop();
        let _ = handle.join();
        self.writer.finish();
        // After the writer's last flush: the final checkpoint names the final head.
        if let Some((cp, stop)) = self
            .checkpointer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = stop.send(());
            let _ = cp.join();
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The maintainer holds sled handles; stop it so the database can be closed and reopened.
        self.shutdown();
    }
}

/// Handle to the audit log. Cheap to clone; all clones share one chain.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

impl AuditLog {
    /// Open the log in `db`, recover the head from the last record and start the maintenance
    /// thread.
    ///
    /// In debug builds, reads `HALL_FAULT_AUDIT_FAIL_FILE` once (see the module docs).
    pub fn open(db: &sled::Db, config: AuditConfig) -> Result<AuditLog, AuditError> {
        #[cfg(debug_assertions)]
        let fault_file = std::env::var_os("HALL_FAULT_AUDIT_FAIL_FILE").map(PathBuf::from);
        #[cfg(not(debug_assertions))]
        let fault_file = None;
        Self::open_with(db, config, fault_file)
    }

    fn open_with(
        db: &sled::Db,
        config: AuditConfig,
        fault_file: Option<PathBuf>,
    ) -> Result<AuditLog, AuditError> {
        let trees = Trees::open(db)?;
        let (head, last_ts) = recover_head(&trees)?;
        let lost = match &config.checkpoint {
            Some(path) => check_checkpoint(&trees, head, path, config.accept_truncation)?,
            None => Vec::new(),
        };
        let index = index::Pending::rebuild(&trees)?;
        let shared = Arc::new(Shared {
            head: Mutex::new(head),
            durable: ArcSwap::from_pointee(head),
            write_error: Mutex::new(None),
            has_write_error: AtomicBool::new(false),
            stats: Counters::default(),
            id_key: id_key(&trees)?,
            prune_lock: Mutex::new(()),
            head_seq: tokio::sync::watch::channel(head.seq).0,
        });
        let retention_days = config.retention_days;
        let checkpoint_status = Arc::new(Mutex::new(checkpoint::Status {
            lost,
            ..Default::default()
        }));
        let checkpointer = match &config.checkpoint {
            Some(path) => {
                let (stop_tx, stop_rx) = mpsc::channel();
                let (path, sh, st) = (path.clone(), shared.clone(), checkpoint_status.clone());
                let h = std::thread::Builder::new()
                    .name("hall-audit-checkpoint".into())
                    .spawn(move || checkpoint::run(path, sh, st, stop_rx))
                    .map_err(|e| AuditError::io("starting the checkpoint task", e))?;
                Some((h, stop_tx))
            }
            None => None,
        };
        let writer = Arc::new(Writer::new(
            trees.clone(),
            shared.clone(),
            config,
            fault_file,
            head,
            last_ts,
            index,
        ));
        let w = writer.clone();
        let handle = std::thread::Builder::new()
            .name("hall-audit-maint".into())
            .spawn(move || w.maintain())
            .map_err(|e| AuditError::io("starting the maintenance thread", e))?;
        let _ = writer.maintainer.set(handle.thread().clone());
        Ok(AuditLog {
            inner: Arc::new(Inner {
                writer,
                trees,
                shared,
                maintainer: Mutex::new(Some(handle)),
                retention_days,
                checkpointer: Mutex::new(checkpointer),
                checkpoint: checkpoint_status,
            }),
        })
    }

    /// Append a record: it is chained and inserted before this returns, or, when another
    /// thread holds the chain at that moment, queued for that thread to insert as it lets go
    /// (so two appends started before either is awaited may be chained in either order). The
    /// future resolves when the record is committed (durable: flushed to disk, by this caller
    /// or a concurrent one; batched: inserted). Dropping the future does not cancel the write,
    /// except that a record still queued when the log shuts down is refused (`Closed`).
    pub fn append(
        &self,
        entry: AuditEntry,
    ) -> impl std::future::Future<Output = Result<Appended, AuditError>> + Send + 'static {
        let writer = self.inner.writer.clone();
        let inserted = writer.submit(entry);
        async move {
            let a = match inserted {
                writer::Submitted::Done(r) => r?,
                writer::Submitted::Queued(rx) => rx.await.unwrap_or(Err(AuditError::Closed))?,
            };
            if writer.needs_flush() {
                let _waiting = Waiting::new(&writer.shared.stats);
                if let Err(e) = writer.wait_durable(a.seq).await {
                    writer.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                    return Err(e);
                }
            }
            Ok(a)
        }
    }

    /// [`append`](Self::append) for threads outside an async runtime (it blocks the thread).
    pub fn append_blocking(&self, entry: AuditEntry) -> Result<Appended, AuditError> {
        writer::block_on(self.append(entry))
    }

    /// The newest committed record (durable mode: the newest flushed one). After a failed
    /// flush it is re-read from sled and may name records that never reached the disk: the
    /// chain continues from them, and a restart falls back to what was flushed.
    pub fn head(&self) -> Head {
        *self
            .inner
            .shared
            .head
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that sees the head's seq each time a batch is published (after its
    /// records can be read), so a follower waits for new records instead of polling.
    pub fn subscribe_head(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.shared.head_seq.subscribe()
    }

    /// Why the last batch could not be written, while that lasts (a later batch that
    /// succeeds clears it).
    pub fn write_error(&self) -> Option<String> {
        self.inner
            .shared
            .write_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Forget the last write error (storage was probed writable again); the next batch
    /// that fails sets it again.
    pub fn clear_write_error(&self) {
        self.inner.shared.set_write_error(None);
    }

    /// What the checkpoint says, for `/api/status`.
    pub fn integrity(&self) -> Integrity {
        let st = self
            .inner
            .checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        Integrity {
            checkpoint: st.written,
            checkpoint_error: st.error.clone(),
            lost: st.lost.clone(),
        }
    }

    /// Counters for metrics.
    pub fn stats(&self) -> AuditStats {
        let c = &self.inner.shared.stats;
        AuditStats {
            appended: c.appended.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            queue_depth: c.waiting.load(Ordering::Relaxed),
        }
    }

    /// One record by `seq` (`None` if it never existed or was pruned).
    pub fn get(&self, seq: u64) -> Result<Option<AuditRecord>, AuditError> {
        self.inner.writer.seal_pending()?;
        self.get_stored(seq)
    }

    /// [`get`](Self::get) of what the tree holds (the caller sealed what was pending).
    fn get_stored(&self, seq: u64) -> Result<Option<AuditRecord>, AuditError> {
        match stored::get(&self.inner.trees, seq)? {
            Some(v) => decode(seq, &v).map(Some),
            None => Ok(None),
        }
    }

    /// The decision record with this `decision_id` (kind `decision` only).
    pub fn by_decision(&self, decision_id: &str) -> Result<Option<AuditRecord>, AuditError> {
        let is_it = |r: &AuditRecord| {
            r.entry.kind == RecordKind::Decision
                && r.entry.decision_id.as_deref() == Some(decision_id)
        };
        match record::seq_of_decision_id(&self.inner.shared.id_key, decision_id) {
            Some(seq) => Ok(self.get(seq)?.filter(is_it)),
            None => Ok(None),
        }
    }

    /// Records matching `q`, in `seq` order, at most `limit` (see [`AuditQuery`]).
    ///
    /// Uses the tenant, capability or outcome postings when one is given, and binary search for
    /// `since`/`until`; other filters are checked on the records found.
    pub fn query(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>, AuditError> {
        let limit = match q.limit {
            0 => DEFAULT_QUERY_LIMIT,
            n => n.min(MAX_QUERY_LIMIT),
        };
        let t = &self.inner.trees;
        self.inner.writer.seal_pending()?;
        let Some(seqs) = seq_bounds(t, q.after_seq, q.since_ms, q.until_ms)? else {
            return Ok(Vec::new());
        };
        let (lo, hi) = seqs.into_inner();
        let matches = |r: &AuditRecord| {
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
        };
        let mut out = Vec::new();
        // Scan the records in lo..=hi (decoding each), in query order, until the limit.
        let scan = |lo: u64, hi: u64, out: &mut Vec<AuditRecord>| -> Result<(), AuditError> {
            if lo > hi {
                return Ok(());
            }
            let mut iter = if q.newest {
                stored::back(t, lo, hi)
            } else {
                stored::forward(t, lo, hi)
            };
            while out.len() < limit {
                let Some(item) = iter.next() else { break };
                let s = item?;
                let r = decode(s.seq, &s.value)?;
                if matches(&r) {
                    out.push(r);
                }
            }
            Ok(())
        };
        let prefix = q
            .tenant_id
            .as_deref()
            .map(|v| index::posting_prefix(index::TENANT, v))
            .or_else(|| {
                q.capability_id
                    .as_deref()
                    .map(|v| index::posting_prefix(index::CAPABILITY, v))
            })
            .or_else(|| {
                q.allowed
                    .map(|a| index::posting_prefix(index::OUTCOME, index::outcome_value(a)))
            });
        let Some(prefix) = prefix else {
            scan(lo, hi, &mut out)?;
            if q.newest {
                out.reverse();
            }
            return Ok(out);
        };
        // Postings cover seqs up to the marker; the records after it are scanned.
        let through = index::indexed_through(t)?;
        let (tail_lo, indexed_hi) = (lo.max(through.saturating_add(1)), hi.min(through));
        let indexed = |out: &mut Vec<AuditRecord>| {
            index::visit_indexed(t, &prefix, lo, indexed_hi, q.newest, &mut |seq| {
                if let Some(r) = self.get_stored(seq)? {
                    if matches(&r) {
                        out.push(r);
                    }
                }
                Ok(out.len() < limit)
            })
        };
        if q.newest {
            scan(tail_lo, hi, &mut out)?;
            if out.len() < limit {
                indexed(&mut out)?;
            }
            out.reverse();
        } else {
            indexed(&mut out)?;
            if out.len() < limit {
                scan(tail_lo, hi, &mut out)?;
            }
        }
        Ok(out)
    }

    /// Walk the chain from the retention checkpoint (or seq 1) and report the first record
    /// that is missing, undecodable, re-linked or altered.
    ///
    /// Records removed from the *end* are caught only while this process runs (against the
    /// head it committed); after a restart the last surviving record becomes the head.
    pub fn verify(&self) -> Result<VerifyReport, AuditError> {
        self.inner.writer.seal_pending()?;
        let report = self.walk_chain();
        if !report.is_ok() {
            return Ok(report);
        }
        let lost = self.integrity().lost;
        match lost.iter().map(|l| l.from_seq).min() {
            Some(first_bad_seq) => Ok(VerifyReport::Lost {
                first_bad_seq,
                lost,
            }),
            None => Ok(report),
        }
    }

    /// The chain walk of [`verify`](Self::verify). Every problem, a storage read error
    /// included, is a bad report naming a seq: a damaged log is an answer, not a failure.
    fn walk_chain(&self) -> VerifyReport {
        let t = &self.inner.trees;
        // Pruning deletes from the front while we walk; hold it off for the walk.
        let _guard = self
            .inner
            .shared
            .prune_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let committed = self.head();
        let bad = |seq, problem| VerifyReport::Bad {
            first_bad_seq: seq,
            problem,
        };
        let (mut expected, mut prev) = match read_checkpoint(t) {
            Ok(c) => c.unwrap_or((1, Hash32::ZERO)),
            Err(_) => return bad(1, "the retention checkpoint cannot be read"),
        };
        let mut entries = 0u64;
        for item in t.records.range(seq_key(expected)..) {
            let (k, v) = match item {
                Ok(kv) => kv,
                Err(_) => return bad(expected, "the record cannot be read (storage error)"),
            };
            let records = match stored::unpack(&k, &v) {
                Ok(records) => records,
                Err(b) => return bad(expected, b.problem),
            };
            // Every entry starts where the last one ended (pruning removes whole entries, and
            // the checkpoint names the first record of the first one kept).
            for r in records {
                if r.seq < expected {
                    return bad(expected, "two entries of the log hold the same record");
                }
                if r.seq != expected {
                    return bad(expected, "record is missing");
                }
                let (link, _, hash) = match split_value(&r.value) {
                    Ok(parts) => parts,
                    Err(d) => return bad(expected, d.as_str()),
                };
                if link != prev {
                    return bad(expected, "prev_hash does not link to the previous record");
                }
                if let Err(d) = decode_value(expected, &r.value, true) {
                    return bad(expected, d.as_str());
                }
                prev = hash;
                expected += 1;
                entries += 1;
            }
        }
        if expected <= committed.seq {
            return bad(expected, "record is missing");
        }
        VerifyReport::Ok {
            entries,
            head: prev,
        }
    }

    /// Apply retention now: delete records (and their index entries) older than
    /// `retention_days` before `now_ms`, from the front, and move the checkpoint so `verify`
    /// still passes. Returns how many were deleted; 0 without `retention_days`.
    /// The writer also does this every minute.
    pub fn prune(&self, now_ms: i64) -> Result<usize, AuditError> {
        let Some(days) = self.inner.retention_days else {
            return Ok(0);
        };
        let _guard = self
            .inner
            .shared
            .prune_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let cutoff = retention_cutoff(now_ms, days);
        let mut total = 0;
        loop {
            let n = prune_before(&self.inner.trees, cutoff, PRUNE_STEP)?;
            total += n;
            if n < PRUNE_STEP {
                return Ok(total);
            }
        }
    }

    /// Write records as JSON lines (one record a line, for log shippers), starting at
    /// `from_seq` and/or `since_ms`. Returns how many lines were written.
    pub fn export(
        &self,
        from_seq: Option<u64>,
        since_ms: Option<i64>,
        out: &mut dyn Write,
    ) -> Result<u64, AuditError> {
        let t = &self.inner.trees;
        self.inner.writer.seal_pending()?;
        let after = from_seq.map(|s| s.saturating_sub(1));
        let Some(seqs) = seq_bounds(t, after, since_ms, None)? else {
            return Ok(0);
        };
        let mut n = 0;
        let mut line = Vec::with_capacity(1024);
        for s in stored::from(t, *seqs.start()) {
            let s = s?;
            let r = decode(s.seq, &s.value)?;
            if since_ms.is_some_and(|s| r.entry.ts_ms < s) {
                continue;
            }
            line.clear();
            serde_json::to_writer(&mut line, &r).map_err(AuditError::export)?;
            line.push(b'\n');
            out.write_all(&line).map_err(AuditError::export)?;
            n += 1;
        }
        out.flush().map_err(AuditError::export)?;
        Ok(n)
    }

    /// Tests: write the pending index chunks now.
    #[cfg(test)]
    pub(crate) fn write_index_now(&self) {
        self.inner.writer.write_index();
    }

    /// Tests: block every flush until the guard is dropped.
    #[cfg(test)]
    pub(crate) fn hold_flushes(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner.writer.test_hold.lock().unwrap()
    }

    /// Flush everything pending, answer every queued append, and stop the writer. Later
    /// appends get [`AuditError::Closed`]. Blocks until done (call it at SIGTERM, from a
    /// blocking context). Idempotent.
    pub fn shutdown(&self) {
        self.inner.shutdown();
    }
}

fn decode(seq: u64, value: &[u8]) -> Result<AuditRecord, AuditError> {
    decode_value(seq, value, false).map_err(|d: Defect| AuditError::Corrupt {
        seq,
        reason: d.as_str(),
    })
}

pub(crate) fn seq_key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub(crate) use crate::clock::now_ms;

fn retention_cutoff(now_ms: i64, days: u32) -> i64 {
    now_ms.saturating_sub(i64::from(days).saturating_mul(MS_PER_DAY))
}

/// The seqs a query may touch: after `after_seq`, and (the log being time-ordered) between
/// the first record at/after `since` and the last at/before `until`. `None`: nothing.
fn seq_bounds(
    t: &Trees,
    after_seq: Option<u64>,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
) -> Result<Option<RangeInclusive<u64>>, AuditError> {
    let mut lo = after_seq.map_or(Some(1), |s| s.checked_add(1));
    let mut hi = u64::MAX;
    if let Some(since) = since_ms {
        match index::first_seq_where(t, |ts| ts >= since)? {
            Some(seq) => lo = lo.map(|lo| lo.max(seq)),
            None => return Ok(None),
        }
    }
    if let Some(until) = until_ms {
        match index::first_seq_where(t, |ts| ts > until)? {
            Some(0) => return Ok(None),
            Some(seq) => hi = seq - 1,
            None => {}
        }
    }
    Ok(lo.filter(|lo| *lo <= hi).map(|lo| lo..=hi))
}

/// The log's decision-id key: made once (random), then read from `audit_meta`.
fn id_key(t: &Trees) -> Result<[u8; 32], AuditError> {
    if let Some(v) = t.meta.get(ID_KEY)? {
        return <[u8; 32]>::try_from(&v[..]).map_err(|_| AuditError::Corrupt {
            seq: 0,
            reason: "the decision id key is malformed",
        });
    }
    let key: [u8; 32] = rand::random();
    // Another opener may have raced us: whichever key landed first is the key.
    match t
        .meta
        .compare_and_swap(ID_KEY, None as Option<&[u8]>, Some(&key[..]))?
    {
        Ok(()) => {
            t.db.flush()?;
            Ok(key)
        }
        Err(_) => id_key(t),
    }
}

/// The checkpoint's view, for `/api/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Integrity {
    /// The head last written to the checkpoint file (`None`: not yet, or no checkpoint).
    pub checkpoint: Option<Head>,
    /// Why the checkpoint file could not be written, while that lasts.
    pub checkpoint_error: Option<String>,
    /// Records lost, as acknowledged with `--accept-audit-truncation`.
    pub lost: Vec<LostRange>,
}

/// Compare what sled recovered with the checkpoint file, and write a fresh checkpoint.
/// Returns the acknowledged losses (earlier ones, plus one found now if `accept`); a loss
/// found now without `accept` is an error that names the missing seqs.
fn check_checkpoint(
    t: &Trees,
    head: Head,
    path: &Path,
    accept: bool,
) -> Result<Vec<LostRange>, AuditError> {
    const FLAG: &str = "--accept-audit-truncation";
    let cp = match checkpoint::read(path) {
        Ok(cp) => cp,
        Err(e) if accept => {
            tracing::error!(error = %e, "audit checkpoint unreadable; starting anyway ({FLAG})");
            None
        }
        Err(e) => {
            return Err(AuditError::Truncated(format!(
                "the audit checkpoint cannot be used: {e}. It records how far the log was durable, \
                 so that a log cut short is noticed; keep a copy of the state dir, then start with \
                 {FLAG} to continue without that check for the records written so far"
            )))
        }
    };
    let mut lost = cp.as_ref().map(|c| c.lost.clone()).unwrap_or_default();
    let found = cp.as_ref().and_then(|cp| {
        let cp_hash = cp.hash()?;
        if cp.seq == 0 {
            return None;
        }
        if head.seq < cp.seq {
            return Some((
                head.seq + 1,
                cp.seq,
                format!(
                    "the log ends at seq {} but its checkpoint says seq {} was durable",
                    head.seq, cp.seq
                ),
            ));
        }
        let pruned_below = read_checkpoint(t)
            .ok()
            .flatten()
            .map_or(1, |(first, _)| first);
        match stored::get(t, cp.seq) {
            Ok(Some(v)) => match split_value(&v) {
                Ok((_, _, hash)) if hash == cp_hash => None,
                _ => Some((
                    cp.seq,
                    cp.seq,
                    format!("record {} is not the one the checkpoint names", cp.seq),
                )),
            },
            Ok(None) if cp.seq < pruned_below => None,
            Ok(None) => Some((cp.seq, cp.seq, format!("record {} is missing", cp.seq))),
            Err(e) => Some((
                cp.seq,
                cp.seq,
                format!("record {} cannot be read: {e}", cp.seq),
            )),
        }
    });
    if let Some((from_seq, to_seq, reason)) = found {
        let range = if from_seq == to_seq {
            format!("seq {from_seq}")
        } else {
            format!(
                "seqs {from_seq}..={to_seq} ({} records)",
                to_seq - from_seq + 1
            )
        };
        if !accept {
            return Err(AuditError::Truncated(format!(
                "the audit log lost records: {reason}; missing: {range}. sled's crash recovery drops \
                 a damaged tail of its log (a flipped bit or a torn write), so the log opened shorter \
                 than it was. Keep a copy of the state dir for investigation; to start anyway, with \
                 the loss recorded (shown by /api/status and audit verify), pass {FLAG}"
            )));
        }
        tracing::error!(
            missing = %range,
            "{reason}; starting anyway ({FLAG}): the loss is recorded and reported by status and verify"
        );
        lost.push(LostRange {
            from_seq,
            to_seq,
            accepted_at_ms: now_ms(),
            reason,
        });
    }
    let written = checkpoint::write(path, &checkpoint::Checkpoint::new(head, lost.clone()));
    match written {
        Ok(()) => {}
        // An acknowledged loss must be on record before anything else is written.
        Err(e) if found_any(&lost, &cp) => {
            return Err(AuditError::io(format!("writing {}", path.display()), e))
        }
        // Otherwise the checkpoint task retries.
        Err(e) => tracing::warn!(error = %e, "cannot write the audit checkpoint yet"),
    }
    Ok(lost)
}

/// Whether `lost` holds a loss the checkpoint file does not record yet.
fn found_any(lost: &[LostRange], cp: &Option<checkpoint::Checkpoint>) -> bool {
    lost.len() > cp.as_ref().map_or(0, |c| c.lost.len())
}

/// `(first kept seq, its prev_hash)` written by pruning.
fn read_checkpoint(t: &Trees) -> Result<Option<(u64, Hash32)>, AuditError> {
    let Some(v) = t.meta.get(CHECKPOINT_KEY)? else {
        return Ok(None);
    };
    if v.len() != 8 + HASH_LEN {
        return Err(AuditError::Corrupt {
            seq: 0,
            reason: "retention checkpoint is malformed",
        });
    }
    let seq = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
    Ok(Some((seq, Hash32::from_slice(&v[8..]).expect("32 bytes"))))
}

/// The chain's tip (and its time) from what sled holds: the last record, else the
/// checkpoint left by pruning everything, else the empty log.
fn recover_head(t: &Trees) -> Result<(Head, i64), AuditError> {
    if let Some(stored::Stored { seq, value: v }) = stored::last(t)? {
        let (_, _, hash) = split_value(&v).map_err(|d| AuditError::Corrupt {
            seq,
            reason: d.as_str(),
        })?;
        // An undecodable tail still has a hash to chain from; verify will name it.
        let ts = decode_value(seq, &v, false).map_or(i64::MIN, |r| r.entry.ts_ms);
        return Ok((Head { seq, hash }, ts));
    }
    if let Some((first_kept, prev)) = read_checkpoint(t)? {
        return Ok((
            Head {
                seq: first_kept.saturating_sub(1),
                hash: prev,
            },
            i64::MIN,
        ));
    }
    Ok((
        Head {
            seq: 0,
            hash: Hash32::ZERO,
        },
        i64::MIN,
    ))
}

/// Delete about `max` records older than `cutoff_ms` from the front (plus any left below
/// the checkpoint by an interrupted prune), and their index entries. A group goes only once
/// its newest record is old enough. The checkpoint is written first, so a crash midway
/// leaves a log that still verifies.
fn prune_before(t: &Trees, cutoff_ms: i64, max: usize) -> Result<usize, AuditError> {
    let checkpoint = read_checkpoint(t)?;
    let mut doomed: Vec<AuditRecord> = Vec::new();
    let mut keys = Vec::new();
    for item in t.records.iter() {
        if doomed.len() >= max {
            break;
        }
        let (k, v) = item?;
        let records = stored::unpack(&k, &v).map_err(stored::BadEntry::into_error)?;
        let records = records
            .iter()
            .map(|s| decode(s.seq, &s.value))
            .collect::<Result<Vec<_>, _>>()?;
        let Some(newest) = records.last() else {
            continue;
        };
        let below_checkpoint = checkpoint.is_some_and(|(first, _)| newest.seq < first);
        if newest.entry.ts_ms >= cutoff_ms && !below_checkpoint {
            break;
        }
        keys.push(k);
        doomed.extend(records);
    }
    let Some(last) = doomed.last() else {
        return Ok(0);
    };
    let new_first = last.seq + 1;
    if checkpoint.is_none_or(|(first, _)| new_first > first) {
        let mut v = Vec::with_capacity(8 + HASH_LEN);
        v.extend_from_slice(&new_first.to_be_bytes());
        v.extend_from_slice(&last.hash.0);
        t.meta.insert(CHECKPOINT_KEY, v)?;
    }
    let mut records = sled::Batch::default();
    let mut prefixes = std::collections::HashSet::new();
    for k in keys {
        records.remove(k);
    }
    for r in &doomed {
        let e = &r.entry;
        for (kind, value) in index::postings_of(e) {
            prefixes.insert(index::posting_prefix(kind, value));
        }
    }
    for p in &prefixes {
        index::prune_chunks(t, p, new_first)?;
    }
    t.records.apply_batch(records)?;
    Ok(doomed.len())
}

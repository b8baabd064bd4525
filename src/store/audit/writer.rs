//! Appending: chain on the caller's thread, records inserted into sled in groups,
//! leader/follower group commit for the flush, and a maintenance thread for the work no
//! answer waits for.
//!
//! An append takes the chain lock, gives the entry its seq (and a decision its id), encodes
//! it, adds it to the group being filled ([`Group`]) and releases the lock: a few
//! microseconds on the caller's own thread, with no hop to another thread and back, and no
//! sled insert. A full group (64 records or 4 KiB) is handed to the maintenance thread,
//! which inserts it as one sled entry without holding the chain; what is left is inserted
//! by whoever flushes, and before any read, so a read sees every answered append. Groups go
//! into sled strictly in seq order (`seal_lock`), so a flush never covers a group without
//! the ones before it. One insert per group instead of one per record is most of what an
//! audit record used to cost.
//!
//! - **Batched:** that is the whole append. The maintenance thread inserts and flushes
//!   within `batch_interval` of the first unflushed record.
//! - **Durable:** the append then waits for a flush that covers its seq. A waiter that is
//!   alone and finds no flush running flushes on its own thread (one insert of what is
//!   pending, one `db.flush()`), publishes the durable head and wakes any others: a lone
//!   request pays exactly one flush and no hop. When others wait too, the maintenance
//!   thread runs the flushes back to back, each covering every record queued behind the
//!   last (group commit), so that no worker thread blocks in a flush while its other
//!   connections wait to be read.
//!
//! The maintenance thread inserts full groups, writes index chunks, runs batched mode's
//! periodic flush and retention, and flushes the database every `DB_FLUSH_EVERY` (500 ms) in
//! place of sled's own flusher thread, which is off (`store::open_db`: its background segment
//! cleaning grew RSS at idle). It takes the chain lock only to take a full group or the
//! pending postings out, or to insert the partial group before a flush, never while it
//! flushes, so no batched append waits for an index write, a retention step or a flush.
//! While it writes index chunks or prunes, durable waiters do not wait for it: they lead
//! their own flushes, each flusher waking the next waiter when it is done (a waiter that
//! goes away before its flush hands that wake on).
//! After a periodic flush fails, batched appends wait for a flush of their own (fail closed)
//! until one succeeds.

use std::collections::VecDeque;
use std::future::Future;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::index::{self, Pending};
use super::record::{decision_uuid, encode_value, AuditEntry, Durability, RecordKind, MAX_SEQ};
use super::stored::Group;
use super::{Appended, AuditConfig, AuditError, Head, Shared, Trees, PRUNE_EVERY};

/// A durable append waiting for a flush: its seq, its waker, and its thread's [`Relay`].
type Waiter = (u64, Waker, Option<Arc<Relay>>);

/// Full groups that may wait for the maintenance thread before an appender inserts them.
const MAX_FULL_GROUPS: usize = 16;

/// At most this many yields before a group flush, while waiters keep arriving.
const GATHER_ROUNDS: usize = 4;

/// How often the maintenance thread flushes the whole database when the audit log has nothing
/// to flush: sled's own flusher is off (`store::open_db`), and this keeps its promise that any
/// write (another tree's, one no caller flushed) reaches the disk within half a second.
const DB_FLUSH_EVERY: Duration = Duration::from_millis(500);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Tests: a point in the code that a test can hold threads at, and see them reach.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct Gate {
    lock: Mutex<()>,
    reached: AtomicBool,
}

#[cfg(test)]
impl Gate {
    /// Threads that reach the gate from now on wait there until the guard is dropped.
    pub(crate) fn hold(&self) -> MutexGuard<'_, ()> {
        let g = lock(&self.lock);
        self.reached.store(false, Ordering::SeqCst);
        g
    }

    fn pass(&self) {
        self.reached.store(true, Ordering::SeqCst);
        drop(lock(&self.lock));
    }

    /// Wait (at most 60 s) until a thread has reached the gate.
    pub(crate) fn wait_reached(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.reached.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            self.reached.load(Ordering::SeqCst),
            "nobody reached the gate"
        );
    }
}

/// The chain's tip as inserted into sled, and what goes with it. Held only while one record
/// is chained and inserted (or the pending postings are swapped out).
pub(crate) struct Chain {
    /// The last record inserted into sled (ahead of the durable head until a flush).
    pub(crate) head: Head,
    /// Time of the last record, to keep the log time-ordered.
    pub(crate) last_ts: i64,
    /// Index postings of the records after the stored marker, not yet written.
    pub(crate) index: Pending,
    /// Reused encode buffer.
    pub(crate) buf: Vec<u8>,
    /// After `shutdown`: appends get `Closed`.
    pub(crate) closed: bool,
    /// Records chained and not yet inserted into sled (see [`super::stored`]): the group
    /// being filled…
    pub(crate) group: Group,
    /// …and full ones, oldest first, for the maintenance thread to insert.
    pub(crate) full: VecDeque<Arc<Group>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ErrorFrom {
    Insert,
    Flush,
}

/// Where a queued append gets its answer.
type Reply = tokio::sync::oneshot::Sender<Result<Appended, AuditError>>;

/// An append's insert: done, or queued for the thread that held the chain.
pub(crate) enum Submitted {
    Done(Result<Appended, AuditError>),
    Queued(tokio::sync::oneshot::Receiver<Result<Appended, AuditError>>),
}

pub(crate) struct Writer {
    pub(crate) trees: Trees,
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: AuditConfig,
    /// Debug builds only: while this path exists, every insert fails (see `AuditLog::open`).
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    pub(crate) fault_file: Option<PathBuf>,
    pub(crate) chain: Mutex<Chain>,
    /// Held by whoever runs a flush (a durable leader or the maintenance thread).
    flush_lock: Mutex<()>,
    /// Appends waiting for a flush: their seq, how to wake them, and their thread's relay
    /// if it has one. A flush wakes exactly the ones it covered (or failed), not everyone; a
    /// waiter that goes away (its future dropped) takes its entry out.
    waiters: Mutex<Vec<Waiter>>,
    /// Every record up to this seq is on disk.
    durable_seq: AtomicU64,
    /// The last failed flush: the tip it was asked to cover and why. A waiter whose seq it
    /// covered, and that no later flush covered, gets this error.
    flush_failure: Mutex<Option<(u64, AuditError)>>,
    /// The last flush failed: batched appends flush before answering until one works.
    flush_failed: AtomicBool,
    /// The stored write error came from a flush (else from an insert).
    error_from_flush: AtomicBool,
    /// Held by whoever inserts groups into sled, so that they go in in seq order (a flush
    /// of the database must never cover a group without the ones before it).
    seal_lock: Mutex<()>,
    /// Full groups wait: the maintenance thread inserts them.
    seal_requested: AtomicBool,
    /// One index write at a time (the marker only moves forward).
    index_lock: Mutex<()>,
    /// The maintenance thread runs; when it does not (shutdown, a panic), waiters flush.
    pub(crate) maintainer_alive: AtomicBool,
    /// The maintenance thread is writing index chunks or pruning: waiters flush for
    /// themselves meanwhile instead of waiting for it.
    maintainer_busy: AtomicBool,
    /// Tests: hold the maintenance thread inside its busy step.
    #[cfg(test)]
    pub(crate) test_busy: Mutex<()>,
    /// Tests: have the maintenance thread write the index on its next wake.
    #[cfg(test)]
    pub(crate) test_index_now: AtomicBool,
    #[cfg(test)]
    pub(crate) test_fail_flush: AtomicBool,
    /// Tests: a flush that has read the tip, before its `db.flush()`.
    #[cfg(test)]
    pub(crate) test_flushing: Gate,
    /// Tests: a waiter that decided not to lead, before it registers.
    #[cfg(test)]
    pub(crate) test_registering: Gate,
    /// Tests: the maintenance thread panics on its next wake.
    #[cfg(test)]
    pub(crate) test_panic: AtomicBool,
    /// Records (or index chunks) inserted and not yet flushed.
    dirty: AtomicBool,
    /// Durable appends are waiting: the maintenance thread flushes at once.
    flush_requested: AtomicBool,
    /// The maintenance thread, to wake it (set once it runs).
    pub(crate) maintainer: OnceLock<Thread>,
    stopping: AtomicBool,
    /// Appends that found the chain lock held, for the holder to insert (flat combining).
    queue: Mutex<Vec<(AuditEntry, Reply)>>,
    /// `queue` is not empty (checked without its lock).
    has_queued: AtomicBool,
    /// Tests: hold the flush lock so that appends queue behind it.
    #[cfg(test)]
    pub(crate) test_hold: Mutex<()>,
}

impl Writer {
    pub(crate) fn new(
        trees: Trees,
        shared: Arc<Shared>,
        config: AuditConfig,
        fault_file: Option<PathBuf>,
        head: Head,
        last_ts: i64,
        index: Pending,
    ) -> Writer {
        Writer {
            trees,
            shared,
            config,
            fault_file,
            chain: Mutex::new(Chain {
                head,
                last_ts,
                index,
                buf: Vec::with_capacity(1024),
                closed: false,
                group: Group::default(),
                full: VecDeque::new(),
            }),
            flush_lock: Mutex::new(()),
            waiters: Mutex::new(Vec::new()),
            queue: Mutex::new(Vec::new()),
            has_queued: AtomicBool::new(false),
            durable_seq: AtomicU64::new(head.seq),
            flush_failure: Mutex::new(None),
            flush_failed: AtomicBool::new(false),
            error_from_flush: AtomicBool::new(false),
            seal_lock: Mutex::new(()),
            seal_requested: AtomicBool::new(false),
            index_lock: Mutex::new(()),
            maintainer_alive: AtomicBool::new(true),
            maintainer_busy: AtomicBool::new(false),
            #[cfg(test)]
            test_busy: Mutex::new(()),
            #[cfg(test)]
            test_index_now: AtomicBool::new(false),
            #[cfg(test)]
            test_fail_flush: AtomicBool::new(false),
            #[cfg(test)]
            test_flushing: Gate::default(),
            #[cfg(test)]
            test_registering: Gate::default(),
            #[cfg(test)]
            test_panic: AtomicBool::new(false),
            dirty: AtomicBool::new(false),
            flush_requested: AtomicBool::new(false),
            maintainer: OnceLock::new(),
            stopping: AtomicBool::new(false),
            #[cfg(test)]
            test_hold: Mutex::new(()),
        }
    }

    fn wake_maintainer(&self) {
        if let Some(t) = self.maintainer.get() {
            t.unpark();
        }
    }

    /// Chain and insert a record now if the chain is free; if another thread holds it,
    /// queue the record for that thread to insert before it lets go (flat combining), so a
    /// contended append never blocks its thread on the lock.
    pub(crate) fn submit(&self, entry: AuditEntry) -> Submitted {
        match self.chain.try_lock() {
            Ok(chain) => {
                let r = self.insert_batch(chain, std::iter::once(entry)).pop();
                self.combine();
                Submitted::Done(r.expect("one entry in, one result out"))
            }
            Err(std::sync::TryLockError::Poisoned(p)) => {
                let r = self
                    .insert_batch(p.into_inner(), std::iter::once(entry))
                    .pop();
                self.combine();
                Submitted::Done(r.expect("one entry in, one result out"))
            }
            Err(std::sync::TryLockError::WouldBlock) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                {
                    let mut q = lock(&self.queue);
                    q.push((entry, tx));
                    self.has_queued.store(true, Ordering::Release);
                }
                // The holder looks at the queue after it lets go; so does this thread, in
                // case it let go in between. The fences order this thread's flag store before
                // its lock attempt, against the holder's unlock before its flag load.
                std::sync::atomic::fence(Ordering::SeqCst);
                self.combine();
                Submitted::Queued(rx)
            }
        }
    }

    /// Run `f` under the chain lock, then insert what was queued meanwhile. Every holder of
    /// the lock must look at the queue after it lets go: an append that found the lock
    /// held is waiting for exactly that.
    pub(crate) fn with_chain<R>(&self, f: impl FnOnce(&mut Chain) -> R) -> R {
        let r = f(&mut lock(&self.chain));
        self.combine();
        r
    }

    /// Tests: make the maintenance thread write the index now (inside `busy`).
    #[cfg(test)]
    pub(crate) fn index_now_for_test(&self) {
        self.test_index_now.store(true, Ordering::Release);
        self.wake_maintainer();
    }

    #[cfg(test)]
    pub(crate) fn busy_for_test(&self) -> bool {
        self.maintainer_busy.load(Ordering::SeqCst)
    }

    #[cfg(test)]
    pub(crate) fn waiters_for_test(&self) -> usize {
        lock(&self.waiters).len()
    }

    #[cfg(test)]
    pub(crate) fn has_queued_for_test(&self) -> bool {
        self.has_queued.load(Ordering::Acquire)
    }

    /// Insert what others queued, while the chain is free and the queue is not empty.
    fn combine(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        while self.has_queued.load(Ordering::Acquire) {
            let chain = match self.chain.try_lock() {
                Ok(c) => c,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                // The holder will look after it lets go.
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            let queued = {
                let mut q = lock(&self.queue);
                self.has_queued.store(false, Ordering::Release);
                std::mem::take(&mut *q)
            };
            let (entries, replies): (Vec<_>, Vec<_>) = queued.into_iter().unzip();
            let results = self.insert_batch(chain, entries);
            for (reply, r) in replies.into_iter().zip(results) {
                let _ = reply.send(r);
            }
        }
    }

    /// Chain and insert `entries` in order under the held lock, then let go of it and do
    /// what needs no lock. Batched mode publishes the head here; durable mode when a flush
    /// covers it.
    fn insert_batch(
        &self,
        mut chain: MutexGuard<'_, Chain>,
        entries: impl IntoIterator<Item = AuditEntry>,
    ) -> Vec<Result<Appended, AuditError>> {
        let batched = self.config.durability == Durability::Batched;
        let was_empty = chain.index.records == 0;
        let full_before = chain.full.len();
        let results: Vec<_> = entries
            .into_iter()
            .map(|e| self.insert_one(&mut chain, e))
            .collect();
        let ok = results.iter().filter(|r| r.is_ok()).count() as u64;
        if ok == 0 {
            return results;
        }
        if batched {
            self.shared.publish_head(chain.head);
        }
        let index_full = chain.index.records >= index::INDEX_MAX_PENDING;
        // Wake the maintenance thread when a group fills, not on every append while one waits.
        let groups_full = chain.full.len() > full_before;
        let first_pending = was_empty && chain.index.records > 0;
        // Still under the chain lock, so that "not dirty" always means "every inserted record
        // is covered by a flush". In batched mode the first record since a flush starts the
        // maintainer's flush timer; a durable append flushes for itself (the maintainer only
        // catches records whose waiter went away, on its next wake).
        // A load first: between two flushes only the first insert finds `dirty` clear, and
        // the others skip a write to a cache line every worker shares. A stale `true` is
        // safe: a flush clears the flag before it reads the tip under this lock, so a record
        // that saw `true` after the clear is below that tip.
        let was_dirty = self.dirty.load(Ordering::Acquire);
        let wake_for_flush = if batched {
            !was_dirty && !self.dirty.swap(true, Ordering::AcqRel)
        } else {
            if !was_dirty {
                self.dirty.store(true, Ordering::Release);
            }
            false
        };
        // Inserts work again: forget an insert error (under the chain lock, ordered with the
        // insert that set it). A flush error stays until a flush works.
        self.clear_error(ErrorFrom::Insert);
        drop(chain);
        self.shared.stats.appended.fetch_add(ok, Ordering::Relaxed);
        // The first pending posting starts the index timer.
        if groups_full {
            self.seal_requested.store(true, Ordering::Release);
        }
        if wake_for_flush || index_full || first_pending || groups_full {
            self.wake_maintainer();
        }
        results
    }

    fn insert_one(&self, chain: &mut Chain, mut entry: AuditEntry) -> Result<Appended, AuditError> {
        if chain.closed {
            return Err(AuditError::Closed);
        }
        #[cfg(debug_assertions)]
        if let Some(path) = &self.fault_file {
            if path.exists() {
                return Err(self.failed(AuditError::Injected(path.display().to_string())));
            }
        }
        let seq = chain.head.seq + 1;
        if seq > MAX_SEQ {
            return Err(self.failed(AuditError::Full));
        }
        entry.ts_ms = entry.ts_ms.max(chain.last_ts);
        let mut decision_id = None;
        if entry.kind == RecordKind::Decision && entry.decision_id.is_none() {
            let id = decision_uuid(&self.shared.id_key, entry.ts_ms, seq, rand::random());
            entry.decision_id = Some(id.to_string());
            decision_id = Some(id);
        }
        if chain.group.is_full() {
            // The maintenance thread inserts it, so that no answer waits for that. When it
            // falls behind (or is gone), the appender inserts, unless another thread is.
            if chain.full.len() >= MAX_FULL_GROUPS {
                let order = match self.seal_lock.try_lock() {
                    Ok(g) => Some(g),
                    Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                    Err(std::sync::TryLockError::WouldBlock) => None,
                };
                if order.is_some() {
                    self.seal_full(chain).map_err(|e| {
                        self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
                        self.insert_failed(e)
                    })?;
                }
            }
            let full = std::mem::take(&mut chain.group);
            chain.full.push_back(Arc::new(full));
        }
        let hash = encode_value(&mut chain.buf, &chain.head.hash, seq, &entry)
            .map_err(|e| self.failed(AuditError::Encode(e.to_string())))?;
        chain.group.push(seq, &chain.buf);
        chain.head = Head { seq, hash };
        chain.last_ts = entry.ts_ms;
        chain.index.add(seq, &entry);
        Ok(Appended {
            seq,
            hash,
            decision_id,
        })
    }

    /// Insert the full groups still in the chain, oldest first (the caller holds the
    /// chain and the seal lock). A group that fails stays first in line.
    fn seal_full(&self, chain: &mut Chain) -> Result<(), sled::Error> {
        while let Some(g) = chain.full.front() {
            g.write(&self.trees.records)?;
            chain.full.pop_front();
        }
        Ok(())
    }

    /// A group could not be inserted: its records stay pending, and appends are refused
    /// (batched ones flush for themselves, which retries the insert) until a flush works.
    fn insert_failed(&self, source: sled::Error) -> AuditError {
        let e = AuditError::Write {
            op: "insert",
            source,
        };
        tracing::error!(error = %e, "audit records could not be inserted; appends refused until a flush works");
        self.note_error(ErrorFrom::Flush, &e);
        e
    }

    /// The maintenance thread: insert the full groups, each without holding the chain.
    fn insert_full(&self) -> Result<(), sled::Error> {
        let _order = lock(&self.seal_lock);
        self.insert_full_locked()
    }

    /// Insert every record chained so far into sled, in seq order, then run `then` under the
    /// same hold of the chain (with whether that worked), so that it sees exactly what was
    /// inserted. Like every holder, looks at the queue after letting go.
    fn seal_all<R>(
        &self,
        then: impl FnOnce(&mut Chain, bool) -> R,
    ) -> (Result<(), sled::Error>, R) {
        let order = lock(&self.seal_lock);
        // The full groups without the chain held (appends go on meanwhile); what is left
        // (groups filled since, and the one being filled) under it.
        let sealed = self.insert_full_locked();
        let r = {
            let mut chain = lock(&self.chain);
            let sealed = sealed
                .and_then(|()| self.seal_full(&mut chain))
                .and_then(|()| chain.group.seal(&self.trees.records));
            let r = then(&mut chain, sealed.is_ok());
            (sealed, r)
        };
        drop(order);
        self.combine();
        r
    }

    /// [`insert_full`](Self::insert_full) for a caller that holds the seal lock. A group
    /// leaves the queue only once it is in sled (only holders of the seal lock remove
    /// groups, so the first is still the one inserted), so that nothing an unwinding or
    /// failing insert had in hand is lost.
    fn insert_full_locked(&self) -> Result<(), sled::Error> {
        while let Some(g) = self.with_chain(|c| c.full.front().cloned()) {
            g.write(&self.trees.records)?;
            self.with_chain(|c| c.full.pop_front());
        }
        Ok(())
    }

    /// Readers: put what is pending into sled, so that every answered append can be read.
    /// When that fails, the read fails too (it would miss answered appends).
    pub(crate) fn seal_pending(&self) -> Result<(), AuditError> {
        match self.seal_all(|_, _| ()) {
            (Ok(()), ()) => Ok(()),
            (Err(e), ()) => Err(self.insert_failed(e)),
        }
    }

    fn failed(&self, e: AuditError) -> AuditError {
        tracing::error!(error = %e, "audit append failed; appends refused");
        self.shared.stats.failed.fetch_add(1, Ordering::Relaxed);
        self.note_error(ErrorFrom::Insert, &e);
        e
    }

    /// Record why writing failed (for readiness and status), under the error's own lock so
    /// that a concurrent clear cannot undo it.
    fn note_error(&self, from: ErrorFrom, e: &AuditError) {
        let mut w = lock(&self.shared.write_error);
        if from == ErrorFrom::Flush {
            self.flush_failed.store(true, Ordering::Release);
        }
        self.error_from_flush
            .store(from == ErrorFrom::Flush, Ordering::Release);
        self.shared.has_write_error.store(true, Ordering::Release);
        *w = Some(e.to_string());
    }

    /// Forget the error if this kind of success answers it: an insert error by a working
    /// insert (unless flushes are failing), a flush error by a working flush.
    fn clear_error(&self, from: ErrorFrom) {
        if !self.shared.has_write_error.load(Ordering::Acquire) {
            return;
        }
        let mut w = lock(&self.shared.write_error);
        let flush_error = self.error_from_flush.load(Ordering::Acquire);
        let answers = match from {
            ErrorFrom::Insert => !flush_error && !self.flush_failed.load(Ordering::Acquire),
            ErrorFrom::Flush => true,
        };
        if answers {
            self.shared.has_write_error.store(false, Ordering::Release);
            *w = None;
        }
    }

    /// Must this append wait for a flush before it is answered?
    pub(crate) fn needs_flush(&self) -> bool {
        self.config.durability == Durability::Durable || self.flush_failed.load(Ordering::Acquire)
    }

    /// What a waiter for `seq` may answer now, if anything.
    fn outcome(&self, seq: u64) -> Option<Result<(), AuditError>> {
        if self.durable_seq.load(Ordering::Acquire) >= seq {
            return Some(Ok(()));
        }
        match &*lock(&self.flush_failure) {
            Some((tip, e)) if *tip >= seq => Some(Err(e.clone())),
            _ => None,
        }
    }

    /// Wait until a flush covers `seq`, running it when no one else is (group commit).
    pub(crate) fn wait_durable(&self, seq: u64) -> DurableWait<'_> {
        DurableWait {
            writer: self,
            seq,
            listed: false,
        }
    }

    /// `listed` is set once the waiter has an entry in `waiters` that may still be
    /// unsettled (see `leave`).
    fn poll_durable(
        &self,
        seq: u64,
        listed: &mut bool,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), AuditError>> {
        let mut looked_again = false;
        loop {
            if let Some(r) = self.outcome(seq) {
                return Poll::Ready(r);
            }
            // Alone: flush on this thread, with no hop to another one. Others waiting too:
            // the maintenance thread flushes for all of them, so that no worker thread sits
            // in a flush while requests queue behind it, unless it is busy writing the index
            // or pruning: then the waiters lead their own flushes, handing over to the next
            // waiter after each (`flush_done`).
            let no_maintainer = !self.maintainer_alive.load(Ordering::Acquire);
            let busy = self.maintainer_busy.load(Ordering::SeqCst);
            if no_maintainer || busy || self.shared.stats.waiting.load(Ordering::Relaxed) <= 1 {
                let guard = match self.flush_lock.try_lock() {
                    Ok(g) => Some(g),
                    Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                    // Nobody else will flush: wait for the lock (shutdown, or after a panic).
                    Err(std::sync::TryLockError::WouldBlock) if no_maintainer => {
                        Some(lock(&self.flush_lock))
                    }
                    Err(std::sync::TryLockError::WouldBlock) => None,
                };
                if let Some(guard) = guard {
                    let r = self.flush_locked(guard);
                    if let Some(r) = self.outcome(seq) {
                        return Poll::Ready(r);
                    }
                    // Only possible if `seq` was never inserted: do not spin.
                    if let Err(e) = r {
                        return Poll::Ready(Err(e));
                    }
                    continue;
                }
            }
            // Register, then look again: a flush that finished in between published its
            // result before it read the list. Polled again before it was settled (a
            // spurious unpark, a select), a waiter updates its one entry instead of adding
            // another.
            #[cfg(test)]
            self.test_registering.pass();
            {
                // Where the waiter is polled now: a future that moved threads is woken on
                // the new one.
                let relay = Relay::here();
                let mut waiters = lock(&self.waiters);
                match waiters.iter_mut().find(|(s, _, _)| *s == seq) {
                    Some((_, w, r)) => {
                        w.clone_from(cx.waker());
                        *r = relay;
                    }
                    None => waiters.push((seq, cx.waker().clone(), relay)),
                }
                *listed = true;
            }
            if let Some(r) = self.outcome(seq) {
                return Poll::Ready(r);
            }
            // The maintenance thread ended after this waiter looked: on its way out it woke
            // the waiters listed then (`Gone`), maybe before this one was. Lead instead.
            if !no_maintainer && !self.maintainer_alive.load(Ordering::Acquire) {
                continue;
            }
            if !self.flush_requested.swap(true, Ordering::SeqCst) {
                self.wake_maintainer();
            }
            // The maintenance thread looks at the request after it turns busy; if it turned
            // busy after this waiter looked and before it asked, lead instead. If it was busy
            // and the flush lock taken, that flush may have ended (and handed over) before
            // this waiter was listed: try the lock again, now listed. Once: a flusher that
            // holds the lock then sees this entry and settles it or hands over.
            if !looked_again && (busy || self.maintainer_busy.load(Ordering::SeqCst)) {
                looked_again = true;
                continue;
            }
            return Poll::Pending;
        }
    }

    /// A waiter went away (its future was dropped) before a flush settled it: take its entry
    /// out of the list. `flush_done` may have woken it to lead the next flush; it will not,
    /// so hand that on to the next waiter.
    fn leave(&self, seq: u64) {
        let (_gone, next) = {
            let mut w = lock(&self.waiters);
            let Some(i) = w.iter().position(|(s, _, _)| *s == seq) else {
                // Settled (and removed) by a flush, which handed on the lead itself.
                return;
            };
            // Its waker is dropped after the lock is released.
            let gone = w.remove(i);
            // Only the first entry is ever handed the lead, and it stays first until a flush
            // settles it (later ones are pushed behind it).
            let no_leader = self.maintainer_busy.load(Ordering::SeqCst)
                || !self.maintainer_alive.load(Ordering::Acquire);
            let next = match w.first() {
                Some((_, next, _)) if i == 0 && no_leader => Some(next.clone()),
                _ => None,
            };
            (gone, next)
        };
        if let Some(next) = next {
            next.wake();
        }
    }

    /// Flush everything inserted so far (the caller holds the flush lock), publish the
    /// result, release the lock and wake every waiter.
    fn flush_locked(&self, guard: MutexGuard<'_, ()>) -> Result<(), AuditError> {
        #[cfg(test)]
        drop(lock(&self.test_hold));
        // Clear before reading the tip: a record appended after the clear marks the log dirty
        // again, one appended before it is at or below the tip.
        self.dirty.store(false, Ordering::Release);
        // Seal what is pending and read the tip under the chain lock; like every holder,
        // look at the queue after letting go (what it inserts is for the next flush).
        let (sealed, tip) = self.seal_all(|c, _| c.head);
        #[cfg(test)]
        self.test_flushing.pass();
        #[cfg(test)]
        if self.test_fail_flush.load(Ordering::Acquire) {
            return self.flush_done(guard, tip, Err(sled::Error::Unsupported("test".into())));
        }
        let flushed = sealed.and_then(|()| self.trees.db.flush().map(|_| ()));
        self.flush_done(guard, tip, flushed)
    }

    fn flush_done(
        &self,
        guard: MutexGuard<'_, ()>,
        tip: Head,
        flushed: Result<(), sled::Error>,
    ) -> Result<(), AuditError> {
        let stats = &self.shared.stats;
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        let r = match flushed {
            Ok(()) => {
                let before = self.durable_seq.load(Ordering::Acquire);
                if tip.seq > before {
                    stats.batches.fetch_add(1, Ordering::Relaxed);
                    self.shared.publish_durable(tip);
                    if self.config.durability == Durability::Durable {
                        self.shared.publish_head(tip);
                    }
                    self.durable_seq.store(tip.seq, Ordering::Release);
                }
                if self.flush_failed.swap(false, Ordering::AcqRel) {
                    *lock(&self.flush_failure) = None;
                }
                self.clear_error(ErrorFrom::Flush);
                Ok(())
            }
            Err(e) => {
                let e = AuditError::Write {
                    op: "flush",
                    source: e,
                };
                tracing::error!(error = %e, "audit flush failed; appends refused");
                self.dirty.store(true, Ordering::Release);
                *lock(&self.flush_failure) = Some((tip.seq, e.clone()));
                self.note_error(ErrorFrom::Flush, &e);
                Err(e)
            }
        };
        drop(guard);
        // Wake the waiters this flush settled (covered, or failed), and only those.
        let settled = match &r {
            Ok(()) => self.durable_seq.load(Ordering::Acquire),
            Err(_) => tip.seq,
        };
        // Waiters on a thread with a relay are handed to it, one wake-up per thread.
        let mut woken: Vec<Waker> = Vec::new();
        let mut relayed: Vec<(Arc<Relay>, Vec<Waker>)> = Vec::new();
        {
            let mut w = lock(&self.waiters);
            w.retain(|(seq, waker, relay)| {
                if *seq > settled {
                    return true;
                }
                match relay {
                    None => woken.push(waker.clone()),
                    Some(relay) => match relayed.iter_mut().find(|(r, _)| Arc::ptr_eq(r, relay)) {
                        Some((_, list)) => list.push(waker.clone()),
                        None => relayed.push((relay.clone(), vec![waker.clone()])),
                    },
                }
                false
            });
            // Nobody will flush for the rest soon: wake one of them to lead the next flush.
            let no_leader = self.maintainer_busy.load(Ordering::SeqCst)
                || !self.maintainer_alive.load(Ordering::Acquire);
            if no_leader {
                if let Some((_, next, _)) = w.first() {
                    woken.push(next.clone());
                }
            }
        }
        for (relay, list) in relayed {
            relay.hand(list, &mut woken);
        }
        for w in woken {
            w.wake();
        }
        r
    }

    /// A flush from the maintenance thread (or shutdown): waits its turn for the lock.
    /// Nothing to do if a flush ran while it waited.
    fn flush_now(&self) -> Result<(), AuditError> {
        let guard = lock(&self.flush_lock);
        if !self.dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        self.flush_locked(guard)
    }

    /// Write the pending index chunks. The postings are swapped out under the chain lock
    /// and written without it; on failure they are put back in front of the newer ones.
    pub(crate) fn write_index(&self) {
        let _one_writer = lock(&self.index_lock);
        // Postings must not reach the disk ahead of their records (a flush of the database
        // covers everything inserted before it): insert the records first.
        let (sealed, taken) = self.seal_all(|c, sealed| {
            (sealed && c.index.records > 0).then(|| (std::mem::take(&mut c.index), c.head.seq))
        });
        if let Err(e) = sealed {
            self.insert_failed(e);
        }
        let Some((mut taken, through)) = taken else {
            return;
        };
        match taken.write(&self.trees, through) {
            // Reaches the disk with the next flush.
            Ok(()) => {
                self.dirty.store(true, Ordering::Release);
            }
            Err(e) => {
                tracing::error!(error = %e, "could not write the audit index; queries scan instead");
                self.with_chain(|c| {
                    taken.extend(std::mem::take(&mut c.index));
                    c.index = taken;
                });
            }
        }
    }

    fn prune_tick(&self) -> bool {
        let Some(days) = self.config.retention_days else {
            return false;
        };
        let Ok(_guard) = self.shared.prune_lock.try_lock() else {
            return false; // someone is already pruning
        };
        let cutoff = super::retention_cutoff(super::now_ms(), days);
        match super::prune_before(&self.trees, cutoff, super::PRUNE_STEP) {
            // More to do: come back at once.
            Ok(n) => n == super::PRUNE_STEP,
            Err(e) => {
                tracing::error!(error = %e, "audit retention pruning failed");
                false
            }
        }
    }

    /// Run the maintenance thread's index or retention step with `maintainer_busy` set, so
    /// that durable waiters do not wait for it to end (see `poll_durable`).
    fn busy<R>(&self, step: impl FnOnce() -> R) -> R {
        self.maintainer_busy.store(true, Ordering::SeqCst);
        // Waiters that asked before they could see the flag are flushed first.
        if self.flush_requested.swap(false, Ordering::SeqCst) {
            let _ = self.flush_now();
        }
        #[cfg(test)]
        let _held = lock(&self.test_busy);
        let r = step();
        self.maintainer_busy.store(false, Ordering::SeqCst);
        r
    }

    /// Before a flush asked for by waiters: let the appends being answered right now join
    /// it, yielding the CPU while the number of waiters still grows (a few times at most).
    fn gather(&self) {
        let waiting = || self.shared.stats.waiting.load(Ordering::Relaxed);
        let mut seen = waiting();
        for _ in 0..GATHER_ROUNDS {
            std::thread::yield_now();
            let now = waiting();
            if now <= seen {
                return;
            }
            seen = now;
        }
    }

    /// The maintenance thread: index chunks, batched mode's periodic flush, retention, the
    /// database's periodic flush.
    pub(crate) fn maintain(self: Arc<Self>) {
        // However this thread ends (stop, or a panic), waiters stop counting on it.
        struct Gone<'a>(&'a Writer);
        impl Drop for Gone<'_> {
            fn drop(&mut self) {
                self.0.maintainer_alive.store(false, Ordering::Release);
                // Waiters that asked it to flush flush for themselves now.
                let woken: Vec<Waker> =
                    lock(&self.0.waiters).drain(..).map(|(_, w, _)| w).collect();
                for w in woken {
                    w.wake();
                }
            }
        }
        let _gone = Gone(&self);
        let mut last_index = Instant::now();
        let mut flush_due: Option<Instant> = None;
        let mut next_prune = Instant::now();
        let mut next_db_flush = Instant::now() + DB_FLUSH_EVERY;
        loop {
            #[cfg(test)]
            if self.test_panic.load(Ordering::SeqCst) {
                panic!("test: the audit maintenance thread dies");
            }
            if self.flush_requested.swap(false, Ordering::AcqRel) {
                self.gather();
                let _ = self.flush_now();
            }
            if self.seal_requested.swap(false, Ordering::AcqRel) {
                if let Err(e) = self.insert_full() {
                    self.insert_failed(e);
                }
            }
            let stopping = self.stopping.load(Ordering::Acquire);
            let now = Instant::now();
            let pending = self.with_chain(|c| c.index.records);
            #[cfg(not(test))]
            let forced = false;
            #[cfg(test)]
            let forced = self.test_index_now.swap(false, Ordering::AcqRel);
            if pending > 0
                && (stopping
                    || forced
                    || pending >= index::INDEX_MAX_PENDING
                    || now >= last_index + index::INDEX_INTERVAL)
            {
                self.busy(|| self.write_index());
                last_index = Instant::now();
            }
            if self.dirty.load(Ordering::Acquire) {
                let due = *flush_due.get_or_insert(now + self.config.batch_interval);
                if stopping || now >= due {
                    // Durable appends flush for themselves; this covers index chunks and
                    // batched records.
                    let _ = self.flush_now();
                    flush_due = None;
                }
            } else {
                flush_due = None;
            }
            if now >= next_db_flush {
                // Audit records and index chunks are flushed above; this is for whatever else
                // was written to the database and not flushed by its writer (nothing to do,
                // and no fsync, when nothing was).
                if !self.dirty.load(Ordering::Acquire) {
                    if let Err(e) = self.trees.db.flush() {
                        tracing::error!(error = %e, "database flush failed");
                    }
                }
                next_db_flush = Instant::now() + DB_FLUSH_EVERY;
            }
            if self.config.retention_days.is_some() && now >= next_prune {
                next_prune = if self.busy(|| self.prune_tick()) {
                    Instant::now()
                } else {
                    Instant::now() + PRUNE_EVERY
                };
            }
            if stopping {
                return;
            }
            let pending = self.with_chain(|c| c.index.records);
            let index_due = (pending > 0).then_some(last_index + index::INDEX_INTERVAL);
            let prune_due = self.config.retention_days.map(|_| next_prune);
            let deadline = [flush_due, index_due, prune_due]
                .into_iter()
                .flatten()
                .fold(next_db_flush, Instant::min);
            if self.flush_requested.load(Ordering::Acquire) {
                continue;
            }
            let wait = deadline.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::park_timeout(wait.max(Duration::from_millis(1)));
            }
        }
    }

    /// Refuse new appends, then have the maintenance thread write the index and flush.
    pub(crate) fn stop(&self) {
        // Anything still queued is answered (`Closed`).
        self.with_chain(|c| c.closed = true);
        self.stopping.store(true, Ordering::Release);
        self.wake_maintainer();
    }

    /// After the maintenance thread ended (or never started): write and flush what is left.
    pub(crate) fn finish(&self) {
        self.write_index();
        if self.dirty.load(Ordering::Acquire) {
            let _ = self.flush_now();
        }
    }
}

/// A durable append waiting for its flush.
pub(crate) struct DurableWait<'a> {
    writer: &'a Writer,
    seq: u64,
    /// It has an entry in the waker list and has not resolved yet.
    listed: bool,
}

impl Future for DurableWait<'_> {
    type Output = Result<(), AuditError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let r = this.writer.poll_durable(this.seq, &mut this.listed, cx);
        if r.is_ready() {
            this.listed = false;
        }
        r
    }
}

impl Drop for DurableWait<'_> {
    fn drop(&mut self) {
        if self.listed {
            self.writer.leave(self.seq);
        }
    }
}

/// Wakes the durable waiters of one thread for the flushes that settle them.
///
/// A flush that settled ~30 waiters used to wake each from the maintenance thread: a
/// cross-thread wake each (a syscall, and often the maintenance thread preempted by the
/// worker it woke), ~300 µs per flush at 64 connections. On a thread that runs a relay (an
/// HTTP worker, [`start_relay`]), a flush instead hands the relay all of that thread's
/// wakers and wakes the relay once; the relay, a task on that thread, wakes them there,
/// where a wake is a push onto the thread's own run queue. Waiters on threads without a
/// relay, and `append_blocking` on any thread (`block_on` sets the relay aside), are woken
/// directly, as before.
#[derive(Default)]
pub(crate) struct Relay(Mutex<RelayState>);

#[derive(Default)]
struct RelayState {
    /// Handed over and not yet woken.
    wakers: Vec<Waker>,
    /// The relay task, once it has run.
    task: Option<Waker>,
    /// The relay task is gone (its runtime stopped): flushes wake this thread's waiters
    /// directly.
    ended: bool,
    /// Tests: wakers handed over so far.
    #[cfg(test)]
    handed: usize,
}

thread_local! {
    static RELAY: std::cell::RefCell<Option<Arc<Relay>>> = const { std::cell::RefCell::new(None) };
}

impl Relay {
    /// This thread's relay, if it runs one.
    fn here() -> Option<Arc<Relay>> {
        RELAY.with(|r| r.borrow().clone())
    }

    /// Take `wakers` to wake on the relay's thread, waking the relay if it had nothing to
    /// do; once the relay has ended they go to `direct` instead.
    fn hand(&self, wakers: Vec<Waker>, direct: &mut Vec<Waker>) {
        let kick = {
            let mut s = lock(&self.0);
            if s.ended {
                direct.extend(wakers);
                return;
            }
            #[cfg(test)]
            {
                s.handed += wakers.len();
            }
            // Not empty: the relay was woken when it last became non-empty, and has not run
            // since.
            let idle = s.wakers.is_empty();
            if idle {
                s.wakers = wakers;
                s.task.clone()
            } else {
                s.wakers.extend(wakers);
                None
            }
        };
        if let Some(task) = kick {
            task.wake();
        }
    }

    #[cfg(test)]
    pub(crate) fn handed_here_for_test() -> usize {
        Relay::here().map_or(0, |r| lock(&r.0).handed)
    }

    #[cfg(test)]
    pub(crate) fn here_for_test() -> Option<Arc<Relay>> {
        Relay::here()
    }

    #[cfg(test)]
    pub(crate) fn hand_for_test(&self, wakers: Vec<Waker>, direct: &mut Vec<Waker>) {
        self.hand(wakers, direct)
    }
}

/// Run a [`Relay`] for this thread's durable waiters. Call it on a thread that runs a tokio
/// `LocalSet`, such as an actix worker; it is a no-op on a thread whose relay runs.
pub fn start_relay() {
    RELAY.with(|here| {
        let mut here = here.borrow_mut();
        if here.as_ref().is_some_and(|r| !lock(&r.0).ended) {
            return;
        }
        let relay = Arc::new(Relay::default());
        tokio::task::spawn_local(RelayTask(relay.clone()));
        *here = Some(relay);
    });
}

/// The task of a [`Relay`]: each time it is woken, it wakes what was handed to it.
struct RelayTask(Arc<Relay>);

impl Future for RelayTask {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let woken = {
            let mut s = lock(&self.0 .0);
            match &mut s.task {
                Some(task) => task.clone_from(cx.waker()),
                None => s.task = Some(cx.waker().clone()),
            }
            std::mem::take(&mut s.wakers)
        };
        for w in woken {
            w.wake();
        }
        Poll::Pending
    }
}

impl Drop for RelayTask {
    fn drop(&mut self) {
        let woken = {
            let mut s = lock(&self.0 .0);
            s.ended = true;
            s.task = None;
            std::mem::take(&mut s.wakers)
        };
        for w in woken {
            w.wake();
        }
    }
}

/// Run a future to completion on this thread (for `append_blocking`; what it waits for is
/// a flush's wake, which needs no runtime).
///
/// The thread's relay, if it has one, is set aside meanwhile: it is a task on this thread,
/// which is parked here and runs no task, so a wake handed to it would never come.
pub(crate) fn block_on<F: Future>(fut: F) -> F::Output {
    struct SetAside(Option<Arc<Relay>>);
    impl Drop for SetAside {
        fn drop(&mut self) {
            let relay = self.0.take();
            RELAY.with(|r| *r.borrow_mut() = relay);
        }
    }
    let _aside = SetAside(RELAY.with(|r| r.borrow_mut().take()));
    struct Unpark(Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

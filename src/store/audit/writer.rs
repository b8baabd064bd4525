//! The single writer thread: group commit, chaining, retention ticks.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Instant;

use sled::Batch;

use super::index::{self, Pending};
use super::record::{decision_uuid, encode_value, AuditEntry, Durability, RecordKind, MAX_SEQ};
use super::{
    seq_key, Appended, AuditConfig, AuditError, Head, Shared, Trees, PRUNE_EVERY, PRUNE_STEP,
};

/// Most appends committed in one sled batch + flush. Bounds one batch's latency.
const MAX_BATCH: usize = 4096;

/// Where a waiting `append` gets its answer.
pub(crate) type Reply = tokio::sync::oneshot::Sender<Result<Appended, AuditError>>;

// Nearly every message is an Append: boxing it would cost an allocation per record.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Msg {
    Append(AuditEntry, Reply),
    /// Flush what is pending, answer, stop; the sender is told when it is done.
    Shutdown(std::sync::mpsc::Sender<()>),
    /// Tests: write the pending index chunks now.
    #[cfg(test)]
    WriteIndex(std::sync::mpsc::Sender<()>),
}

pub(crate) struct Writer {
    pub(crate) trees: Trees,
    pub(crate) shared: Arc<Shared>,
    pub(crate) config: AuditConfig,
    /// Debug builds only: while this path exists, every batch fails (see `AuditLog::open`).
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    pub(crate) fault_file: Option<PathBuf>,
    /// The chain's tip as written to sled (ahead of the published head in durable mode
    /// between insert and flush).
    pub(crate) head: Head,
    /// Time of the last record, to keep the log time-ordered.
    pub(crate) last_ts: i64,
    /// Index postings of the records after the stored marker, not yet written.
    pub(crate) index: Pending,
    /// `index` could not be rebuilt after a failed batch: rebuild before writing it.
    pub(crate) index_stale: bool,
    pub(crate) last_index: Instant,
    /// Reused encode buffer.
    pub(crate) buf: Vec<u8>,
    /// Batched mode: inserted but not yet flushed.
    pub(crate) dirty: bool,
    pub(crate) last_flush: Instant,
    /// Batched mode: the last periodic flush failed, so flush before answering until one works.
    pub(crate) flush_failed: bool,
    pub(crate) next_prune: Instant,
    #[cfg(test)]
    pub(crate) start_gate: Option<std::sync::mpsc::Receiver<()>>,
}

impl Writer {
    pub(crate) fn run(mut self, rx: Receiver<Msg>) {
        #[cfg(test)]
        if let Some(gate) = self.start_gate.take() {
            let _ = gate.recv();
        }
        let mut pending: Vec<(AuditEntry, Reply)> = Vec::new();
        loop {
            let deadline = self.next_deadline();
            let first = match deadline {
                None => match rx.recv() {
                    Ok(m) => Some(m),
                    Err(_) => break,
                },
                Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                    Ok(m) => Some(m),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
            };
            let mut shutdown = None;
            if let Some(first) = first {
                let mut next = Some(first);
                while let Some(msg) = next.take() {
                    match msg {
                        Msg::Append(entry, reply) => pending.push((entry, reply)),
                        Msg::Shutdown(ack) => {
                            shutdown = Some(ack);
                            break;
                        }
                        #[cfg(test)]
                        Msg::WriteIndex(ack) => {
                            if !pending.is_empty() {
                                self.commit(&mut pending);
                            }
                            self.write_index();
                            let _ = ack.send(());
                        }
                    }
                    if pending.len() < MAX_BATCH {
                        next = rx.try_recv().ok();
                    }
                }
                if !pending.is_empty() {
                    self.commit(&mut pending);
                }
            }
            if self.index.records > 0
                && (shutdown.is_some()
                    || self.index.records >= index::INDEX_MAX_PENDING
                    || self.last_index.elapsed() >= index::INDEX_INTERVAL)
            {
                self.write_index();
            }
            if self.dirty
                && (shutdown.is_some() || self.last_flush.elapsed() >= self.config.batch_interval)
            {
                self.periodic_flush();
            }
            if self.config.retention_days.is_some() && Instant::now() >= self.next_prune {
                self.prune_tick();
            }
            if let Some(ack) = shutdown {
                let _ = ack.send(());
                return;
            }
        }
        // Every `AuditLog` is gone: make what was answered durable before the thread ends.
        if self.index.records > 0 {
            self.write_index();
        }
        if self.dirty {
            self.periodic_flush();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let flush = self
            .dirty
            .then(|| self.last_flush + self.config.batch_interval);
        let prune = self.config.retention_days.map(|_| self.next_prune);
        let index = (self.index.records > 0).then(|| {
            if self.index.records >= index::INDEX_MAX_PENDING {
                Instant::now()
            } else {
                self.last_index + index::INDEX_INTERVAL
            }
        });
        [flush, prune, index].into_iter().flatten().min()
    }

    /// Write the pending index chunks (a failure leaves them pending for the next try).
    fn write_index(&mut self) {
        self.last_index = Instant::now();
        if self.index_stale {
            match Pending::rebuild(&self.trees) {
                Ok(p) => {
                    self.index = p;
                    self.index_stale = false;
                }
                Err(e) => {
                    tracing::error!(error = %e, "could not rebuild the audit index");
                    return;
                }
            }
        }
        match self.index.write(&self.trees, self.head.seq) {
            // Reaches the disk with the next flush (batched mode's timer, or shutdown).
            Ok(()) => self.dirty = true,
            Err(e) => {
                tracing::error!(error = %e, "could not write the audit index; queries scan instead")
            }
        }
    }

    /// Chain, insert and (durable) flush one batch, then answer every waiter.
    fn commit(&mut self, pending: &mut Vec<(AuditEntry, Reply)>) {
        let shared = self.shared.clone();
        let stats = &shared.stats;
        stats.batches.fetch_add(1, Ordering::Relaxed);
        let n = pending.len() as u64;
        match self.write_batch(pending) {
            Ok(appended) => {
                self.shared.publish_head(self.head);
                self.shared.set_write_error(None);
                stats.appended.fetch_add(n, Ordering::Relaxed);
                for ((_, reply), a) in pending.drain(..).zip(appended) {
                    let _ = reply.send(Ok(a));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = n, "audit batch failed; appends refused");
                stats.failed.fetch_add(n, Ordering::Relaxed);
                self.shared.set_write_error(Some(e.to_string()));
                // Do not trust the in-memory tip after a failure: re-read what sled holds.
                match super::recover_head(&self.trees) {
                    Ok((head, ts)) => {
                        self.head = head;
                        self.last_ts = ts;
                        self.shared.publish_head(head);
                    }
                    Err(re) => {
                        tracing::error!(error = %re, "could not re-read the audit head");
                        self.head = *self.shared.head.load_full();
                    }
                }
                // Nor the pending postings: sled may hold some of the failed batch.
                match Pending::rebuild(&self.trees) {
                    Ok(p) => self.index = p,
                    Err(_) => self.index_stale = true,
                }
                for (_, reply) in pending.drain(..) {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
        stats.answered.fetch_add(n, Ordering::Relaxed);
    }

    fn write_batch(
        &mut self,
        pending: &mut [(AuditEntry, Reply)],
    ) -> Result<Vec<Appended>, AuditError> {
        #[cfg(debug_assertions)]
        if let Some(path) = &self.fault_file {
            if path.exists() {
                return Err(AuditError::Write(format!(
                    "injected I/O error ({} exists)",
                    path.display()
                )));
            }
        }
        let mut records = Batch::default();
        let mut appended = Vec::with_capacity(pending.len());
        let mut head = self.head;
        let mut last_ts = self.last_ts;
        for (entry, _) in pending.iter_mut() {
            let seq = head.seq + 1;
            if seq > MAX_SEQ {
                return Err(AuditError::Write(format!(
                    "the audit log holds its maximum of {MAX_SEQ} records"
                )));
            }
            entry.ts_ms = entry.ts_ms.max(last_ts);
            last_ts = entry.ts_ms;
            let mut decision_id = None;
            if entry.kind == RecordKind::Decision && entry.decision_id.is_none() {
                let id = decision_uuid(&self.shared.id_key, entry.ts_ms, seq, rand::random());
                entry.decision_id = Some(id.to_string());
                decision_id = Some(id);
            }
            let hash = encode_value(&mut self.buf, &head.hash, seq, entry)
                .map_err(|e| AuditError::Write(format!("encoding failed: {e}")))?;
            records.insert(&seq_key(seq), self.buf.as_slice());
            head = Head { seq, hash };
            appended.push(Appended {
                seq,
                hash,
                decision_id,
            });
        }
        // One tree: the batch is atomic without a transaction.
        self.trees
            .records
            .apply_batch(records)
            .map_err(|e| AuditError::Write(e.to_string()))?;
        // The records are in sled's memory: the chain continues from them whatever happens next.
        self.head = head;
        self.last_ts = last_ts;
        for ((entry, _), a) in pending.iter().zip(&appended) {
            self.index.add(a.seq, entry);
        }
        if self.config.durability == Durability::Durable || self.flush_failed {
            self.flush()?;
        } else {
            self.dirty = true;
        }
        Ok(appended)
    }

    fn flush(&mut self) -> Result<(), AuditError> {
        self.shared.stats.flushes.fetch_add(1, Ordering::Relaxed);
        match self.trees.db.flush() {
            Ok(_) => {
                self.shared.publish_durable(self.head);
                self.dirty = false;
                self.flush_failed = false;
                self.last_flush = Instant::now();
                Ok(())
            }
            Err(e) => {
                self.flush_failed = true;
                Err(AuditError::Write(format!("flush failed: {e}")))
            }
        }
    }

    /// Batched mode's timer flush. A failure makes every later batch flush before answering
    /// (i.e. fail closed) until a flush succeeds again.
    fn periodic_flush(&mut self) {
        if let Err(e) = self.flush() {
            tracing::error!(error = %e, "audit flush failed");
            // Try again at the next interval rather than spinning.
            self.last_flush = Instant::now();
        }
    }

    fn prune_tick(&mut self) {
        self.next_prune = Instant::now() + PRUNE_EVERY;
        let Some(days) = self.config.retention_days else {
            return;
        };
        let Ok(_guard) = self.shared.prune_lock.try_lock() else {
            return; // someone is already pruning
        };
        let cutoff = super::retention_cutoff(super::now_ms(), days);
        match super::prune_before(&self.trees, cutoff, PRUNE_STEP) {
            Ok(n) if n == PRUNE_STEP => {
                // More to do: come back soon, between batches, instead of stalling appends.
                self.next_prune = Instant::now();
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "audit retention pruning failed"),
        }
    }
}

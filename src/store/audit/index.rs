//! The tenant, capability and outcome (allowed/denied) indexes, kept as **posting lists**
//! off the append path.
//!
//! Inserting one index key per record into sled cost more than the record itself (each
//! insert lands in a different leaf: docs/performance.md). Instead the writer collects, in
//! memory, the seqs of each tenant and capability it appends, and about once a second (or
//! every [`INDEX_MAX_PENDING`] records, and at shutdown) writes them as one chunk per value
//! into the tree `audit_postings`, together with the marker "indexed through seq N", in one
//! sled batch (atomic on one tree):
//!
//! ```text
//! key   = kind ('t' tenant | 'c' capability | 'o' outcome) ‖ value ‖ 0x00 ‖ last seq in the
//!         chunk (BE u64)
//! value = the chunk's seqs, ascending, each a BE u64
//! "indexed_through" → N (BE u64): every record ≤ N is in a chunk
//! ```
//!
//! Chunks of one value cover disjoint, ascending seq ranges, so they sort in seq order.
//! A query reads chunks for the seqs up to the marker and scans the records after it (at
//! most about one interval's worth) directly, so it sees every committed record. A crash
//! loses at most the unwritten chunks; `open` rebuilds them from the records after the
//! marker. Every candidate is re-checked against its record, so a stale chunk (left behind
//! by retention, or tampered with) can hide nothing and add nothing.
//!
//! There is no time index: the writer keeps `ts_ms` non-decreasing along seqs, so the
//! records tree itself is binary-searched for the bounds of a time range.

use std::collections::HashMap;
use std::time::Duration;

use super::record::decode_value;
use super::stored;
use super::{AuditEntry, AuditError, Trees};

/// The longest records wait for their chunk while the writer is busy.
#[cfg(not(test))]
pub(crate) const INDEX_INTERVAL: Duration = Duration::from_secs(1);
/// Unit tests write the index when they say so (`write_index_now`), never on a timer: a
/// slow machine must not move the indexed/scanned split a test set up.
#[cfg(test)]
pub(crate) const INDEX_INTERVAL: Duration = Duration::from_secs(3600);
/// Write the chunks early once this many records are waiting (bounds a query's tail scan).
pub(crate) const INDEX_MAX_PENDING: usize = 16_384;
const INDEXED_THROUGH_KEY: &[u8] = b"indexed_through";

pub(crate) const TENANT: u8 = b't';
pub(crate) const CAPABILITY: u8 = b'c';
/// A decision's outcome: value "allowed" or "denied".
pub(crate) const OUTCOME: u8 = b'o';

/// The outcome posting value for `allowed`.
pub(crate) fn outcome_value(allowed: bool) -> &'static str {
    if allowed {
        "allowed"
    } else {
        "denied"
    }
}

/// Every posting list `e` belongs to, as (kind, value).
pub(crate) fn postings_of(e: &AuditEntry) -> impl Iterator<Item = (u8, &str)> {
    let tenant = e.tenant_id.as_deref().map(|t| (TENANT, t));
    let capability = e.capability_id.as_deref().map(|c| (CAPABILITY, c));
    let outcome = e.allowed.map(|a| (OUTCOME, outcome_value(a)));
    tenant.into_iter().chain(capability).chain(outcome)
}

/// `kind ‖ value ‖ 0x00`: what every chunk key of one value starts with.
pub(crate) fn posting_prefix(kind: u8, value: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(value.len() + 10);
    k.push(kind);
    k.extend_from_slice(value.as_bytes());
    k.push(0);
    k
}

fn chunk_key(prefix: &[u8], last_seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&last_seq.to_be_bytes());
    k
}

/// The seqs in a chunk value (trailing bytes that do not make a whole seq are ignored).
pub(crate) fn chunk_seqs(v: &[u8]) -> impl DoubleEndedIterator<Item = u64> + '_ {
    v.chunks_exact(8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
}

/// The marker: every record up to this seq is in a chunk (0: none).
pub(crate) fn indexed_through(t: &Trees) -> Result<u64, AuditError> {
    Ok(match t.postings.get(INDEXED_THROUGH_KEY)? {
        Some(v) if v.len() == 8 => u64::from_be_bytes(v[..].try_into().expect("8 bytes")),
        Some(_) => {
            return Err(AuditError::Corrupt {
                seq: 0,
                reason: "the audit index marker is malformed",
            })
        }
        None => 0,
    })
}

/// The writer's chunks not yet written: the postings of every record after the stored
/// marker.
#[derive(Default)]
pub(crate) struct Pending {
    /// Records added since the marker.
    pub(crate) records: usize,
    lists: HashMap<Vec<u8>, Vec<u64>>,
    scratch: Vec<u8>,
}

impl Pending {
    /// Rebuild from what sled holds: the marker, and every record after it.
    pub(crate) fn rebuild(t: &Trees) -> Result<Pending, AuditError> {
        let mut p = Pending::default();
        let through = indexed_through(t)?;
        for s in stored::from(t, through.saturating_add(1)) {
            let stored::Stored { seq, value: v } = match s {
                Ok(s) => s,
                // A damaged entry ends what can be indexed; verify names it, and queries
                // that reach it fail.
                Err(e @ AuditError::Corrupt { .. }) => {
                    tracing::error!(error = %e, "the audit log is damaged; records after the damage are not indexed");
                    break;
                }
                Err(e) => return Err(e),
            };
            // An undecodable record cannot be indexed; verify names it, queries skip it.
            if let Ok(r) = decode_value(seq, &v, false) {
                p.add(seq, &r.entry);
            } else {
                p.records += 1;
            }
        }
        Ok(p)
    }

    /// Append `newer`'s postings (all of higher seqs) after these.
    pub(crate) fn extend(&mut self, newer: Pending) {
        self.records += newer.records;
        for (prefix, seqs) in newer.lists {
            self.lists.entry(prefix).or_default().extend(seqs);
        }
    }

    pub(crate) fn add(&mut self, seq: u64, e: &AuditEntry) {
        self.records += 1;
        for (kind, value) in postings_of(e) {
            self.push(kind, value, seq);
        }
    }

    fn push(&mut self, kind: u8, value: &str, seq: u64) {
        self.scratch.clear();
        self.scratch.push(kind);
        self.scratch.extend_from_slice(value.as_bytes());
        self.scratch.push(0);
        match self.lists.get_mut(self.scratch.as_slice()) {
            Some(list) => list.push(seq),
            None => {
                self.lists.insert(self.scratch.clone(), vec![seq]);
            }
        }
    }

    /// Write every chunk and move the marker to `head` in one batch. On error nothing
    /// changed and the postings stay pending.
    pub(crate) fn write(&mut self, t: &Trees, head: u64) -> Result<(), AuditError> {
        let mut batch = sled::Batch::default();
        let mut buf = Vec::new();
        for (prefix, seqs) in &self.lists {
            let last = *seqs.last().expect("lists are never empty");
            buf.clear();
            for s in seqs {
                buf.extend_from_slice(&s.to_be_bytes());
            }
            batch.insert(chunk_key(prefix, last), buf.as_slice());
        }
        batch.insert(INDEXED_THROUGH_KEY, &head.to_be_bytes());
        t.postings.apply_batch(batch)?;
        self.lists.clear();
        self.records = 0;
        Ok(())
    }
}

/// Call `visit` with every indexed seq of `prefix` in `lo..=hi` (ascending, or descending
/// with `newest`) until it returns `false`. Only chunks are read: seqs after the marker are
/// the caller's (clamp `hi` to the marker).
pub(crate) fn visit_indexed(
    t: &Trees,
    prefix: &[u8],
    lo: u64,
    hi: u64,
    newest: bool,
    visit: &mut dyn FnMut(u64) -> Result<bool, AuditError>,
) -> Result<(), AuditError> {
    if lo > hi {
        return Ok(());
    }
    let end = chunk_key(prefix, u64::MAX);
    // Seqs are visited strictly in order even if a chunk was altered to repeat or reorder.
    let mut prev: Option<u64> = None;
    if !newest {
        // Every chunk whose last seq is ≥ lo, until one starts after hi.
        for item in t.postings.range(chunk_key(prefix, lo)..=end) {
            let (_, v) = item?;
            for s in chunk_seqs(&v) {
                if s > hi {
                    return Ok(());
                }
                if s < lo || prev.is_some_and(|p| s <= p) {
                    continue;
                }
                prev = Some(s);
                if !visit(s)? {
                    return Ok(());
                }
            }
        }
        return Ok(());
    }
    // Newest first: the one chunk that may straddle hi, then the chunks wholly below it.
    let straddling = t.postings.range(chunk_key(prefix, hi)..=end).next();
    let below = t
        .postings
        .range(chunk_key(prefix, lo)..chunk_key(prefix, hi))
        .rev();
    for item in straddling.into_iter().chain(below) {
        let (_, v) = item?;
        for s in chunk_seqs(&v).rev() {
            if s < lo {
                return Ok(());
            }
            if s > hi || prev.is_some_and(|p| s >= p) {
                continue;
            }
            prev = Some(s);
            if !visit(s)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Remove the chunks of `prefix` that hold only seqs below `first_kept` (retention). A chunk
/// straddling `first_kept` stays; its pruned seqs no longer resolve to a record.
pub(crate) fn prune_chunks(t: &Trees, prefix: &[u8], first_kept: u64) -> Result<(), AuditError> {
    if first_kept == 0 {
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    for item in t
        .postings
        .range(chunk_key(prefix, 0)..=chunk_key(prefix, first_kept - 1))
    {
        batch.remove(item?.0);
    }
    t.postings.apply_batch(batch)?;
    Ok(())
}

/// The first record's seq whose `ts_ms` satisfies `pred`, given that `pred` is false then
/// true along seqs (the log is time-ordered); `None` if no record does. O(log n) reads.
pub(crate) fn first_seq_where(
    t: &Trees,
    pred: impl Fn(i64) -> bool,
) -> Result<Option<u64>, AuditError> {
    let (Some(first), Some(last)) = (stored::first(t)?, stored::last(t)?) else {
        return Ok(None);
    };
    let last = last.seq;
    // The first record at or after seq x, and whether it satisfies pred. Monotonic in x.
    let at_or_after = |x: u64| -> Result<(u64, bool), AuditError> {
        let stored::Stored { seq, value: v } = stored::from(t, x)
            .next()
            .transpose()?
            .ok_or(AuditError::Moved("the audit log shrank during a query"))?;
        let ts = decode_value(seq, &v, false)
            .map_err(|d| AuditError::Corrupt {
                seq,
                reason: d.as_str(),
            })?
            .entry
            .ts_ms;
        Ok((seq, pred(ts)))
    };
    // Smallest x in [first, last + 1] whose next record satisfies pred (last + 1: none does).
    let (mut lo, mut hi) = (first.seq, last + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match at_or_after(mid)? {
            (_, true) => hi = mid,
            (seq, false) => lo = seq + 1,
        }
    }
    if lo > last {
        return Ok(None);
    }
    Ok(Some(at_or_after(lo)?.0))
}

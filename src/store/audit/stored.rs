//! How records sit in the sled tree `audit`: one entry per record, or one entry per group of
//! consecutive records.
//!
//! ```text
//! single: key = seq (8 bytes, big-endian)          value = record value
//! group:  key = seq of its LAST record ‖ b'g'       value = 0x01 ‖ (u32 LE len ‖ record value)…
//! ```
//!
//! A record value is the same in both (`prev_hash ‖ body ‖ hash`, see [`super::record`]); a
//! group holds two or more of them, for consecutive seqs ending at the seq in its key. Keying a
//! group by its last seq keeps the tree ordered by seq, so `range(seq_key(s)..)` starts at the
//! entry that holds `s` (a single record `s`, or the first group that ends at or after it).
//! Releases before groups wrote single records only; they read every way they always did.
//!
//! A group saves the tree one insert (and its share of sled's page rewriting) per record:
//! the writer seals the records appended since the last seal as one group, at each flush
//! and whenever a group is full ([`GROUP_MAX_RECORDS`], [`GROUP_MAX_BYTES`]).

use sled::IVec;

use super::record::MAX_SEQ;
use super::{seq_key, AuditError, Trees};

/// The byte after the seq in a group's key.
pub(crate) const GROUP_TAG: u8 = b'g';
/// The first byte of a group's value: its layout version.
pub(crate) const GROUP_VERSION: u8 = 1;
/// A group is sealed when it holds this many records… (Tests use small groups, so that
/// every log they write has groups sealed because they were full, at flushes, and singles.)
#[cfg(not(test))]
pub(crate) const GROUP_MAX_RECORDS: usize = 64;
#[cfg(test)]
pub(crate) const GROUP_MAX_RECORDS: usize = 5;
/// …or this many bytes. Larger groups save little more CPU but make sled's cached nodes
/// larger: at 64 connections for 10 s × 5 (`bench/rss.sh`), RSS after the load was 59, 57,
/// 67 and 92 MB with 1, 2, 4 and 8 KiB groups (87 MB with single records), CPU per request
/// 55, 49, 49 and 46 µs.
#[cfg(not(test))]
pub(crate) const GROUP_MAX_BYTES: usize = 4 * 1024;
#[cfg(test)]
pub(crate) const GROUP_MAX_BYTES: usize = 4 * 1024;
/// Bytes before each record value in a group.
pub(crate) const FRAME_LEN: usize = 4;

/// One stored record: its seq and its value (a view into the entry, not a copy).
pub(crate) struct Stored {
    pub(crate) seq: u64,
    pub(crate) value: IVec,
}

/// The key of a group whose last record is `last`.
pub(crate) fn group_key(last: u64) -> [u8; 9] {
    let mut k = [GROUP_TAG; 9];
    k[..8].copy_from_slice(&seq_key(last));
    k
}

/// Why an entry cannot be read as records: the seq it should start at is unknown, so the
/// defect is reported at the seq in its key.
pub(crate) struct BadEntry {
    pub(crate) seq: u64,
    pub(crate) problem: &'static str,
}

impl BadEntry {
    pub(crate) fn into_error(self) -> AuditError {
        AuditError::Corrupt {
            seq: self.seq,
            reason: self.problem,
        }
    }
}

/// The records of one tree entry, in seq order.
pub(crate) fn unpack(k: &[u8], v: &IVec) -> Result<Vec<Stored>, BadEntry> {
    let key_seq = |k: &[u8]| u64::from_be_bytes(k[..8].try_into().expect("8 bytes"));
    match k.len() {
        8 => Ok(vec![Stored {
            seq: key_seq(k),
            value: v.clone(),
        }]),
        9 if k[8] == GROUP_TAG => {
            let last = key_seq(k);
            let bad = |problem| BadEntry { seq: last, problem };
            if v.first() != Some(&GROUP_VERSION) {
                return Err(bad("a group of records has an unknown layout"));
            }
            let mut spans = Vec::new();
            let mut at = 1;
            while at < v.len() {
                let len = v
                    .get(at..at + FRAME_LEN)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
                    .ok_or(bad("a group of records is truncated"))?;
                let start = at + FRAME_LEN;
                if len == 0 || v.len() - start < len {
                    return Err(bad("a group of records is truncated"));
                }
                spans.push((start, len));
                at = start + len;
            }
            let n = spans.len() as u64;
            let first = match (n, last.checked_sub(n.saturating_sub(1))) {
                (2.., Some(first)) if first >= 1 && last <= MAX_SEQ => first,
                _ => return Err(bad("a group of records is malformed")),
            };
            Ok(spans
                .into_iter()
                .enumerate()
                .map(|(i, (start, len))| Stored {
                    seq: first + i as u64,
                    value: v.subslice(start, len),
                })
                .collect())
        }
        _ => Err(BadEntry {
            seq: k.get(..8).map_or(0, key_seq),
            problem: "record key is not a seq",
        }),
    }
}

/// The records from `from` on, in seq order.
pub(crate) fn from(t: &Trees, from: u64) -> Records {
    forward(t, from, u64::MAX)
}

/// The records in `lo..=hi`, oldest first.
pub(crate) fn forward(t: &Trees, lo: u64, hi: u64) -> Records {
    Records::new(Box::new(t.records.range(seq_key(lo)..)), lo, hi, false)
}

/// The records in `lo..=hi`, newest first.
pub(crate) fn back(t: &Trees, lo: u64, hi: u64) -> Records {
    // The entry holding `hi` (if any) is the first at or after its key; everything below it
    // sorts before `seq_key(hi)`.
    let top = t.records.range(seq_key(hi)..).next();
    let below = t.records.range(seq_key(lo)..seq_key(hi)).rev();
    Records::new(Box::new(top.into_iter().chain(below)), lo, hi, true)
}

type Entries = Box<dyn Iterator<Item = sled::Result<(IVec, IVec)>>>;

/// Stored records in `lo..=hi`, entry by entry, oldest or newest first. Seqs must run
/// strictly one way across entries: two entries that hold the same seq are damage (an
/// error), not two records. The walk ends at the first error, and at `hi` (`lo` going back)
/// without reading the entry after it.
pub(crate) struct Records {
    entries: Entries,
    current: std::vec::IntoIter<Stored>,
    lo: u64,
    hi: u64,
    newest: bool,
    prev: Option<u64>,
    done: bool,
}

impl Records {
    fn new(entries: Entries, lo: u64, hi: u64, newest: bool) -> Records {
        Records {
            entries,
            current: Vec::new().into_iter(),
            lo,
            hi,
            newest,
            prev: None,
            done: lo > hi,
        }
    }

    fn fail(&mut self, e: AuditError) -> Option<Result<Stored, AuditError>> {
        self.done = true;
        Some(Err(e))
    }
}

impl Iterator for Records {
    type Item = Result<Stored, AuditError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let Some(r) = self.current.next() else {
                match self.entries.next() {
                    None => self.done = true,
                    Some(Err(e)) => return self.fail(e.into()),
                    Some(Ok((k, v))) => match unpack(&k, &v) {
                        Err(b) => return self.fail(b.into_error()),
                        Ok(mut rs) => {
                            if self.newest {
                                rs.reverse();
                            }
                            self.current = rs.into_iter();
                        }
                    },
                }
                continue;
            };
            let (before, past, last) = if self.newest {
                (r.seq > self.hi, r.seq < self.lo, self.lo)
            } else {
                (r.seq < self.lo, r.seq > self.hi, self.hi)
            };
            if before {
                continue;
            }
            if past {
                self.done = true;
                break;
            }
            let in_order = self
                .prev
                .is_none_or(|p| (r.seq > p) != self.newest && r.seq != p);
            if !in_order {
                return self.fail(AuditError::Corrupt {
                    seq: r.seq,
                    reason: "two entries of the log hold the same record",
                });
            }
            self.prev = Some(r.seq);
            self.done = r.seq == last;
            return Some(Ok(r));
        }
        None
    }
}

/// Record `seq`'s value, if the tree holds it.
pub(crate) fn get(t: &Trees, seq: u64) -> Result<Option<IVec>, AuditError> {
    let Some((k, v)) = t.records.range(seq_key(seq)..).next().transpose()? else {
        return Ok(None);
    };
    if k.len() == 8 {
        // A single record: this one, or a later one (then `seq` is not stored).
        return Ok((k[..] == seq_key(seq)).then_some(v));
    }
    let records = unpack(&k, &v).map_err(BadEntry::into_error)?;
    Ok(records.into_iter().find(|r| r.seq == seq).map(|r| r.value))
}

/// The first stored record.
pub(crate) fn first(t: &Trees) -> Result<Option<Stored>, AuditError> {
    let Some((k, v)) = t.records.first()? else {
        return Ok(None);
    };
    Ok(unpack(&k, &v)
        .map_err(BadEntry::into_error)?
        .into_iter()
        .next())
}

/// The last stored record.
pub(crate) fn last(t: &Trees) -> Result<Option<Stored>, AuditError> {
    let Some((k, v)) = t.records.last()? else {
        return Ok(None);
    };
    Ok(unpack(&k, &v).map_err(BadEntry::into_error)?.pop())
}

/// Records appended and not yet in the tree: framed as a group's value, sealed into one
/// tree entry (a single record when it holds only one).
#[derive(Default)]
pub(crate) struct Group {
    /// `GROUP_VERSION ‖ (len ‖ value)…` (empty when no record is pending).
    buf: Vec<u8>,
    records: usize,
    /// Seq of the last record added.
    last: u64,
}

impl Group {
    /// Full: seal it before adding another record.
    pub(crate) fn is_full(&self) -> bool {
        self.records >= GROUP_MAX_RECORDS || self.buf.len() >= GROUP_MAX_BYTES
    }

    /// Add record `seq` (the next after the last one added).
    pub(crate) fn push(&mut self, seq: u64, value: &[u8]) {
        debug_assert!(self.records == 0 || seq == self.last + 1);
        if self.buf.is_empty() {
            // One allocation per group: it is full soon after passing this size.
            self.buf.reserve(GROUP_MAX_BYTES + 1024);
            self.buf.push(GROUP_VERSION);
        }
        let len = u32::try_from(value.len()).expect("a record is far below 4 GiB");
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf.extend_from_slice(value);
        self.records += 1;
        self.last = seq;
    }

    /// Insert the records into the tree as one entry (nothing when there are none).
    pub(crate) fn write(&self, records: &sled::Tree) -> Result<(), sled::Error> {
        #[cfg(test)]
        if self.records > 0 && tests::FAIL_WRITE.with(|f| f.get()) {
            return Err(sled::Error::Unsupported(
                "test: injected insert failure".into(),
            ));
        }
        #[cfg(test)]
        if self.records > 0 && tests::PANIC_WRITE.with(|f| f.get()) {
            panic!("test: injected panic in an insert");
        }
        match self.records {
            0 => return Ok(()),
            1 => records.insert(seq_key(self.last), &self.buf[1 + FRAME_LEN..])?,
            _ => records.insert(group_key(self.last), self.buf.as_slice())?,
        };
        Ok(())
    }

    /// [`write`](Self::write), then empty the group. On error the records stay in it.
    pub(crate) fn seal(&mut self, records: &sled::Tree) -> Result<(), sled::Error> {
        self.write(records)?;
        self.buf.clear();
        self.records = 0;
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Inserts of groups on this thread fail while set.
        pub(crate) static FAIL_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        /// Inserts of groups on this thread panic while set.
        pub(crate) static PANIC_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn tree() -> (tempfile::TempDir, Trees) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::store::open_db(dir.path()).unwrap();
        (dir, Trees::open(&db).unwrap())
    }

    /// A stand-in record value for `seq` (framing does not look inside values).
    fn value(seq: u64) -> Vec<u8> {
        format!("record-{seq}").into_bytes()
    }

    /// Seal `runs` of consecutive seqs from 1, each as one entry.
    fn write(t: &Trees, runs: &[usize]) -> u64 {
        let mut g = Group::default();
        let mut seq = 0;
        for &n in runs {
            for _ in 0..n {
                seq += 1;
                g.push(seq, &value(seq));
            }
            g.seal(&t.records).unwrap();
        }
        seq
    }

    fn seqs(it: impl Iterator<Item = Result<Stored, AuditError>>) -> Vec<u64> {
        it.map(|r| {
            let r = r.unwrap();
            assert_eq!(r.value, value(r.seq), "seq {}", r.seq);
            r.seq
        })
        .collect()
    }

    /// The stored bytes of both layouts, pinned: what this release writes must stay readable.
    #[test]
    fn a_single_record_and_a_group_are_stored_as_documented() {
        let (_d, t) = tree();
        let mut g = Group::default();
        g.push(7, b"seven");
        g.seal(&t.records).unwrap();
        g.push(8, b"eight!");
        g.push(9, b"nine");
        g.seal(&t.records).unwrap();
        // Nothing pending: sealing again writes nothing.
        g.seal(&t.records).unwrap();
        let entries: Vec<(Vec<u8>, Vec<u8>)> = t
            .records
            .iter()
            .map(|kv| {
                let (k, v) = kv.unwrap();
                (k.to_vec(), v.to_vec())
            })
            .collect();
        let mut group = vec![0x01];
        group.extend_from_slice(&[6, 0, 0, 0]);
        group.extend_from_slice(b"eight!");
        group.extend_from_slice(&[4, 0, 0, 0]);
        group.extend_from_slice(b"nine");
        assert_eq!(
            entries,
            [
                (vec![0, 0, 0, 0, 0, 0, 0, 7], b"seven".to_vec()),
                (vec![0, 0, 0, 0, 0, 0, 0, 9, b'g'], group),
            ]
        );
    }

    #[test]
    fn every_reader_finds_every_record_across_singles_and_groups() {
        let (_d, t) = tree();
        let last = write(&t, &[1, 1, 3, 1, 2, 4, 1]);
        assert_eq!(last, 13);
        for seq in 0..=last + 2 {
            let want = (1..=last).contains(&seq).then(|| value(seq));
            assert_eq!(get(&t, seq).unwrap().map(|v| v.to_vec()), want, "get {seq}");
        }
        assert_eq!(first(&t).unwrap().unwrap().seq, 1);
        assert_eq!(last_seq(&t), 13);
        for lo in 0..=last + 1 {
            let want: Vec<u64> = (lo.max(1)..=last).collect();
            assert_eq!(seqs(from(&t, lo)), want, "from {lo}");
            for hi in lo..=last + 1 {
                let want: Vec<u64> = (lo.max(1)..=hi.min(last)).collect();
                assert_eq!(seqs(forward(&t, lo, hi)), want, "forward {lo}..={hi}");
                let back_want: Vec<u64> = want.iter().rev().copied().collect();
                assert_eq!(seqs(back(&t, lo, hi)), back_want, "back {lo}..={hi}");
            }
        }
    }

    fn last_seq(t: &Trees) -> u64 {
        last(t).unwrap().unwrap().seq
    }

    #[test]
    fn a_damaged_group_is_reported_at_its_key_not_read_as_records() {
        let key = group_key(9);
        let frame = |v: &[u8]| {
            let mut f = (v.len() as u32).to_le_bytes().to_vec();
            f.extend_from_slice(v);
            f
        };
        let good = [vec![GROUP_VERSION], frame(b"a"), frame(b"b")].concat();
        assert_eq!(
            unpack(&key, &IVec::from(good.clone()))
                .ok()
                .unwrap()
                .iter()
                .map(|s| s.seq)
                .collect::<Vec<_>>(),
            [8, 9]
        );
        let cases: [(&str, Vec<u8>, Vec<u8>); 7] = [
            (
                "unknown layout",
                key.to_vec(),
                [vec![2], frame(b"a"), frame(b"b")].concat(),
            ),
            ("truncated", key.to_vec(), good[..good.len() - 1].to_vec()),
            ("truncated", key.to_vec(), [&good[..], &[1, 0]].concat()),
            (
                "truncated",
                key.to_vec(),
                [vec![GROUP_VERSION], frame(b""), frame(b"b")].concat(),
            ),
            (
                "malformed",
                key.to_vec(),
                [vec![GROUP_VERSION], frame(b"a")].concat(),
            ),
            ("malformed", group_key(1).to_vec(), good.clone()),
            ("not a seq", vec![0; 10], good.clone()),
        ];
        for (problem, k, v) in cases {
            match unpack(&k, &IVec::from(v)) {
                Err(b) => assert!(b.problem.contains(problem), "{problem}: got {}", b.problem),
                Ok(_) => panic!("{problem}: read as records"),
            }
        }
        // A 9-byte key with another tag is not a group either.
        let mut other = key;
        other[8] = b'x';
        assert!(unpack(&other, &IVec::from(good)).is_err());
    }
}

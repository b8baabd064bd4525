//! The chain head kept outside sled, so that sled's recovery cannot roll it back.
//!
//! On recovery sled treats a damaged record in its recent log as a torn tail and drops it and
//! everything after it: the log opens shorter, still a valid chain, and nothing inside sled
//! remembers the lost records. This file does: `<state_dir>/audit.checkpoint` holds the newest
//! *durable* head (seq and hash), rewritten (temp file, fsync, rename, fsync dir) at most every
//! [`INTERVAL`] while records are appended and at a clean shutdown. It never names a record
//! sled has not flushed, so a crash never makes it claim more than the log holds. On open, a
//! log that ends before the checkpoint's seq, or holds another hash there, has lost records.
//!
//! Format (JSON, versioned): `{"format":1,"seq":N,"hash":"hex","lost":[…]}`; `lost` lists the
//! losses an operator acknowledged (`hall serve --accept-audit-truncation`), carried forward so
//! that `/api/status` and `verify` keep saying which seqs are gone.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Hash32, Head, Shared};

/// The longest the checkpoint lags the durable head while records are being appended.
pub(crate) const INTERVAL: Duration = Duration::from_millis(100);

/// The file name inside the state dir.
pub const FILE_NAME: &str = "audit.checkpoint";

const FORMAT: u32 = 1;

/// Records the log lost, as acknowledged by the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRange {
    /// First missing seq.
    pub from_seq: u64,
    /// Last missing seq (inclusive).
    pub to_seq: u64,
    /// When the operator started the daemon with the loss acknowledged (ms since the epoch).
    pub accepted_at_ms: i64,
    /// What was found.
    pub reason: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Checkpoint {
    pub format: u32,
    pub seq: u64,
    pub hash: String,
    #[serde(default)]
    pub lost: Vec<LostRange>,
}

impl Checkpoint {
    pub fn new(head: Head, lost: Vec<LostRange>) -> Checkpoint {
        Checkpoint {
            format: FORMAT,
            seq: head.seq,
            hash: head.hash.to_hex(),
            lost,
        }
    }

    pub fn hash(&self) -> Option<Hash32> {
        Hash32::from_hex(&self.hash)
    }
}

/// Read the checkpoint; `Ok(None)` when there is none (a state dir from before checkpoints).
pub(crate) fn read(path: &Path) -> Result<Option<Checkpoint>, String> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    let cp: Checkpoint = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a valid checkpoint: {e}", path.display()))?;
    if cp.format != FORMAT {
        return Err(format!(
            "{} has format {}, which this version does not know (it knows {FORMAT})",
            path.display(),
            cp.format
        ));
    }
    if cp.hash().is_none() {
        return Err(format!("{} holds a malformed hash", path.display()));
    }
    Ok(Some(cp))
}

/// Write the checkpoint durably (temp file + fsync + rename + fsync of the directory), 0600.
pub(crate) fn write(path: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    let json = serde_json::to_vec(cp).map_err(std::io::Error::other)?;
    crate::store::write_private_file(path, &json)
}

/// What the checkpoint task shares with the log's handles.
#[derive(Default)]
pub(crate) struct Status {
    /// The last head written to the file.
    pub written: Option<Head>,
    /// Why the last write failed (cleared by the next one that works).
    pub error: Option<String>,
    pub lost: Vec<LostRange>,
}

/// The task that keeps the file up to date: every [`INTERVAL`], if the durable head moved,
/// write it; once more when told to stop (after the writer's final flush).
pub(crate) fn run(
    path: PathBuf,
    shared: Arc<Shared>,
    status: Arc<Mutex<Status>>,
    stop: Receiver<()>,
) {
    loop {
        let stopping = match stop.recv_timeout(INTERVAL) {
            Err(RecvTimeoutError::Timeout) => false,
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
        };
        let head = **shared.durable.load();
        let (due, lost) = {
            let st = status.lock().unwrap_or_else(|e| e.into_inner());
            (st.written != Some(head), st.lost.clone())
        };
        if due {
            let result = write(&path, &Checkpoint::new(head, lost));
            let mut st = status.lock().unwrap_or_else(|e| e.into_inner());
            match result {
                Ok(()) => {
                    st.written = Some(head);
                    st.error = None;
                }
                Err(e) => {
                    let msg = format!("cannot write {}: {e}", path.display());
                    if st.error.as_deref() != Some(msg.as_str()) {
                        tracing::error!(error = %msg, "audit checkpoint not updated; retrying");
                    }
                    st.error = Some(msg);
                }
            }
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AuditConfig, AuditEntry, AuditError, AuditLog, RecordKind, VerifyReport};
    use super::*;

    fn config(dir: &Path, accept: bool) -> AuditConfig {
        AuditConfig {
            checkpoint: Some(dir.join(FILE_NAME)),
            accept_truncation: accept,
            ..AuditConfig::default()
        }
    }

    fn open(dir: &Path, accept: bool) -> Result<(sled::Db, AuditLog), AuditError> {
        let db = crate::store::test_db_at(&dir.join("db"));
        let log = AuditLog::open_with(&db, config(dir, accept), None)?;
        Ok((db, log))
    }

    fn append(log: &AuditLog, n: usize) {
        for _ in 0..n {
            log.append_blocking(AuditEntry::new(RecordKind::Reload, 1))
                .unwrap();
        }
    }

    /// Five records, shut down cleanly: the checkpoint names seq 5.
    fn five(dir: &Path) -> Head {
        let (_db, log) = open(dir, false).unwrap();
        append(&log, 5);
        let head = log.head();
        log.shutdown();
        head
    }

    #[test]
    fn a_clean_shutdown_checkpoints_the_head_and_reopening_passes() {
        let dir = tempfile::tempdir().unwrap();
        let head = five(dir.path());
        let cp = read(&dir.path().join(FILE_NAME)).unwrap().unwrap();
        assert_eq!((cp.seq, cp.hash()), (5, Some(head.hash)));
        let (_db, log) = open(dir.path(), false).unwrap();
        assert!(log.verify().unwrap().is_ok());
        assert!(log.integrity().lost.is_empty());
    }

    #[test]
    fn the_checkpoint_follows_appends_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, log) = open(dir.path(), false).unwrap();
        append(&log, 3);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.integrity().checkpoint != Some(log.head()) {
            assert!(
                std::time::Instant::now() < deadline,
                "checkpoint never caught up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let cp = read(&dir.path().join(FILE_NAME)).unwrap().unwrap();
        assert_eq!(cp.seq, 3);
    }

    #[test]
    fn a_log_cut_short_is_refused_then_reported_once_accepted() {
        let dir = tempfile::tempdir().unwrap();
        five(dir.path());
        {
            // What sled's recovery does to a damaged tail.
            let db = crate::store::test_db_at(&dir.path().join("db"));
            let t = db.open_tree("audit").unwrap();
            t.remove(4u64.to_be_bytes()).unwrap();
            t.remove(5u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let err = open(dir.path(), false).err().expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("seqs 4..=5"), "{msg}");
        assert!(msg.contains("--accept-audit-truncation"), "{msg}");

        let (db, log) = open(dir.path(), true).unwrap();
        let lost = log.integrity().lost;
        assert_eq!((lost.len(), lost[0].from_seq, lost[0].to_seq), (1, 4, 5));
        assert!(matches!(
            log.verify().unwrap(),
            VerifyReport::Lost {
                first_bad_seq: 4,
                ..
            }
        ));
        append(&log, 1);
        assert_eq!(log.head().seq, 4);
        log.shutdown();
        drop((db, log));
        // Accepted once: later starts need no flag and still report it.
        let (_db, log) = open(dir.path(), false).unwrap();
        assert_eq!(log.integrity().lost.len(), 1);
        let json = serde_json::to_value(log.verify().unwrap()).unwrap();
        assert_eq!(json["ok"], false);
        assert_eq!(json["first_bad_seq"], 4);
        assert_eq!(json["lost"][0]["to_seq"], 5);
    }

    #[test]
    fn another_record_at_the_checkpoint_seq_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        five(dir.path());
        let path = dir.path().join(FILE_NAME);
        let mut cp = read(&path).unwrap().unwrap();
        cp.hash = Hash32([7; 32]).to_hex();
        write(&path, &cp).unwrap();
        let msg = open(dir.path(), false).err().expect("refused").to_string();
        assert!(msg.contains("record 5 is not the one"), "{msg}");
    }

    #[test]
    fn an_unreadable_checkpoint_is_refused_unless_accepted() {
        let dir = tempfile::tempdir().unwrap();
        five(dir.path());
        std::fs::write(dir.path().join(FILE_NAME), b"{not json").unwrap();
        let msg = open(dir.path(), false).err().expect("refused").to_string();
        assert!(msg.contains("not a valid checkpoint"), "{msg}");
        let (_db, log) = open(dir.path(), true).unwrap();
        assert!(log.verify().unwrap().is_ok());
        // …and a fresh checkpoint is written.
        assert_eq!(read(&dir.path().join(FILE_NAME)).unwrap().unwrap().seq, 5);
    }

    #[test]
    fn without_a_checkpoint_file_the_log_opens_and_gets_one() {
        let dir = tempfile::tempdir().unwrap();
        five(dir.path());
        std::fs::remove_file(dir.path().join(FILE_NAME)).unwrap();
        let (_db, log) = open(dir.path(), false).unwrap();
        assert!(log.verify().unwrap().is_ok());
        assert_eq!(read(&dir.path().join(FILE_NAME)).unwrap().unwrap().seq, 5);
    }
}

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

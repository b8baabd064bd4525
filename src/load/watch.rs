//! Watching the policy directories: notify events, debounced, become reload triggers.
//!
//! Editors save in steps (write a temp file, rename, chmod); the debounce waits for a quiet
//! window so one save loads once. Our own reads of the files are not edits, so access
//! events other than "closed after writing" are ignored (otherwise a reload would trigger
//! the next one).

use std::path::PathBuf;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How long the files must be quiet before a reload starts.
///
/// An editor's save (temp file, rename, chmod) lands within a few ms, so 50 ms still
/// coalesces it into one reload, and it is a quarter of the 200 ms write-to-swap budget
/// (docs/performance.md). A writer slower than this at worst causes one rejected reload
/// (last good set kept) followed by a good one on its final close-after-write event.
pub const QUIET: Duration = Duration::from_millis(50);

/// Start watching `dirs`; every relevant event sends a unit on `tx`.
/// Keep the returned watcher alive for as long as you want events.
pub fn watch(dirs: &[PathBuf], tx: mpsc::Sender<()>) -> notify::Result<RecommendedWatcher> {
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let Ok(ev) = res else { return };
        if is_edit(&ev.kind) {
            // A full channel already holds a pending trigger: dropping this one is fine.
            let _ = tx.try_send(());
        }
    })?;
    for d in dirs {
        w.watch(d, RecursiveMode::NonRecursive)?;
    }
    Ok(w)
}

fn is_edit(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// Wait for a trigger, then for `quiet` without another one, then return `true`.
/// Returns `false` when the sender side is gone.
pub async fn next_quiet(rx: &mut mpsc::Receiver<()>, quiet: Duration) -> bool {
    if rx.recv().await.is_none() {
        return false;
    }
    settle(rx, quiet).await
}

/// Wait until `quiet` passes without a trigger, then return `true`.
/// Returns `false` when the sender side is gone.
pub async fn settle(rx: &mut mpsc::Receiver<()>, quiet: Duration) -> bool {
    loop {
        match tokio::time::timeout(quiet, rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

//! Watching the policy directories: notify events, debounced, become reload triggers.
//!
//! inotify watches an inode, not a path: a directory that is replaced (`mv new policies`,
//! `rm -rf policies && cp -r …`) or a symlink that is re-pointed (`policies -> v2`) leaves a
//! watch on the old inode that never fires again. So [`DirWatch`] also watches each
//! directory's parent (for events naming the directory itself), and [`DirWatch::refresh`]
//! re-establishes a watch whenever the path resolves to a different directory than the one
//! watched. The daemon calls it before every reload and on a periodic rescan, which also
//! compares the files' content hash with the loaded one (a safety net for any event missed).
//!
//! Editors save in steps (write a temp file, rename, chmod); the debounce waits for a quiet
//! window so one save loads once. Our own reads of the files are not edits, so access
//! events other than "closed after writing" are ignored (otherwise a reload would trigger
//! the next one).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
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

/// Start watching `dirs` themselves (not their paths: see [`DirWatch`]); every relevant
/// event sends a unit on `tx`. Keep the returned watcher alive for as long as you want events.
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

/// The longest a reload waits for a git operation on the files to finish.
pub const GIT_WAIT: Duration = Duration::from_secs(5);

/// Whether a git command is rewriting a work tree that holds one of `dirs`: git holds
/// `.git/index.lock` while `checkout`, `pull`, `merge` or `reset` write files, and a reload
/// in the middle would load a mix of two commits (a rule may be gone before its
/// replacement is written). Looks for the nearest `.git` above each dir.
pub fn git_busy(dirs: &[PathBuf]) -> bool {
    dirs.iter().any(|d| {
        let d = std::path::absolute(d).unwrap_or_else(|_| d.clone());
        d.ancestors().find_map(|a| {
            let git = a.join(".git");
            // A linked worktree or submodule has a `.git` file naming its git dir.
            if git.is_dir() {
                Some(git.join("index.lock").exists())
            } else if let Ok(text) = std::fs::read_to_string(&git) {
                let dir = text.strip_prefix("gitdir:")?.trim().to_string();
                Some(a.join(dir).join("index.lock").exists())
            } else {
                None
            }
        }) == Some(true)
    })
}

/// Wait (polling) while [`git_busy`], at most [`GIT_WAIT`]; `true` if it waited.
pub async fn wait_for_git(dirs: &[PathBuf]) -> bool {
    let start = std::time::Instant::now();
    let mut waited = false;
    while start.elapsed() < GIT_WAIT {
        let d = dirs.to_vec();
        let busy = tokio::task::spawn_blocking(move || git_busy(&d))
            .await
            .unwrap_or(false);
        if !busy {
            break;
        }
        waited = true;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    waited
}

/// How often the daemon rescans the files by content hash, whatever the events said.
pub const RESCAN: Duration = Duration::from_secs(2);

/// Whether watching works, for `/api/status`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WatchHealth {
    /// Every directory (and its parent) is watched.
    pub ok: bool,
    /// What is wrong, when not ok.
    pub errors: Vec<String>,
    /// How often the files are rescanned by content hash (the safety net).
    pub rescan_secs: u64,
    /// Watches re-established because a directory was replaced or a symlink re-pointed.
    pub rewatched: u64,
}

/// One configured directory: its path as given (made absolute, symlinks kept) and the
/// directory (device, inode) the watch is on, if any.
struct Watched {
    path: PathBuf,
    on: Option<(u64, u64)>,
    error: Option<String>,
}

/// Watches for the policy directories that follow their paths (see the module docs).
pub struct DirWatch {
    inner: Mutex<Inner>,
}

struct Inner {
    watcher: Option<RecommendedWatcher>,
    dirs: Vec<Watched>,
    parents: Vec<(PathBuf, Option<String>)>,
    setup_error: Option<String>,
    rewatched: u64,
}

fn identity(p: &Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p)?;
    if !m.is_dir() {
        return Err(std::io::Error::other("not a directory"));
    }
    Ok((m.dev(), m.ino()))
}

impl DirWatch {
    /// Watch `dirs` and their parents; relevant events send a unit on `tx`. Never fails:
    /// what cannot be watched is reported by [`health`](Self::health) and retried by
    /// [`refresh`](Self::refresh).
    pub fn start(dirs: &[PathBuf], tx: mpsc::Sender<()>) -> DirWatch {
        let dirs: Vec<PathBuf> = dirs
            .iter()
            .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()))
            .collect();
        let names = dirs.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(ev) = res else { return };
            if !is_edit(&ev.kind) {
                return;
            }
            // Inside a watched dir, or the dir itself (created, removed, renamed, re-pointed)
            // as seen from its parent; other entries of the parent are not our business.
            let ours = ev.paths.iter().any(|p| {
                names
                    .iter()
                    .any(|d| p == d || p.parent() == Some(d.as_path()))
            });
            if ours {
                // A full channel already holds a pending trigger: dropping this one is fine.
                let _ = tx.try_send(());
            }
        });
        let mut parents: Vec<(PathBuf, Option<String>)> = Vec::new();
        for d in &dirs {
            if let Some(p) = d.parent() {
                if !parents.iter().any(|(q, _)| q == p) {
                    parents.push((p.to_path_buf(), None));
                }
            }
        }
        let (watcher, setup_error) = match watcher {
            Ok(w) => (Some(w), None),
            Err(e) => (None, Some(format!("cannot start watching files: {e}"))),
        };
        let w = DirWatch {
            inner: Mutex::new(Inner {
                watcher,
                dirs: dirs
                    .into_iter()
                    .map(|path| Watched {
                        path,
                        on: None,
                        error: None,
                    })
                    .collect(),
                parents,
                setup_error,
                rewatched: 0,
            }),
        };
        {
            let mut inner = w.inner.lock().unwrap_or_else(|e| e.into_inner());
            let Inner {
                watcher, parents, ..
            } = &mut *inner;
            if let Some(watcher) = watcher {
                for (p, err) in parents.iter_mut() {
                    *err = watcher
                        .watch(p, RecursiveMode::NonRecursive)
                        .err()
                        .map(|e| format!("cannot watch {}: {e}", p.display()));
                }
            }
        }
        w.refresh();
        w
    }

    /// Re-establish the watch of every directory whose path now resolves to another
    /// directory (replaced, recreated, symlink re-pointed) or that was not watched.
    /// Returns `true` when a watch moved, i.e. the files may have changed unseen.
    pub fn refresh(&self) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Inner {
            watcher,
            dirs,
            rewatched,
            ..
        } = &mut *inner;
        let Some(watcher) = watcher else { return false };
        let mut moved = false;
        for d in dirs.iter_mut() {
            let now = identity(&d.path);
            match now {
                Ok(id) if d.on == Some(id) && d.error.is_none() => {}
                Ok(id) => {
                    // Drop the watch on the old inode first: left in place it would keep
                    // reporting events from wherever that directory went.
                    let _ = watcher.unwatch(&d.path);
                    match watcher.watch(&d.path, RecursiveMode::NonRecursive) {
                        Ok(()) => {
                            if d.on.is_some() {
                                *rewatched += 1;
                                tracing::info!(dir = %d.path.display(), "directory replaced; watching the new one");
                            }
                            moved |= d.on.is_some();
                            d.on = Some(id);
                            d.error = None;
                        }
                        Err(e) => {
                            d.on = None;
                            d.error = Some(format!("cannot watch {}: {e}", d.path.display()));
                        }
                    }
                }
                Err(e) => {
                    if d.on.is_some() {
                        let _ = watcher.unwatch(&d.path);
                        moved = true;
                    }
                    d.on = None;
                    d.error = Some(format!("cannot watch {}: {e}", d.path.display()));
                }
            }
        }
        moved
    }

    /// Whether every directory and parent is watched, for `/api/status`.
    pub fn health(&self) -> WatchHealth {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let errors: Vec<String> = inner
            .setup_error
            .iter()
            .cloned()
            .chain(inner.dirs.iter().filter_map(|d| d.error.clone()))
            .chain(inner.parents.iter().filter_map(|(_, e)| e.clone()))
            .collect();
        WatchHealth {
            ok: errors.is_empty(),
            errors,
            rescan_secs: RESCAN.as_secs(),
            rewatched: inner.rewatched,
        }
    }
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

//! sled-backed state, one module per tree.
//!
//! - [`approvals`]: human approvals for `require_approval` rules (state machine, CAS writes).
//! - [`audit`]: the hash-chained audit log with a group-commit writer.
//! - [`tokens`]: API tokens (stored as blake3 hashes), scopes, rate limits.
//! - [`secrets`]: AEAD-encrypted secrets; [`keys`]: where the master key comes from.

pub mod approvals;
pub mod audit;
pub mod keys;
pub mod secrets;
pub mod tokens;

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

/// Create `dir` (and parents) with mode 0700, or check that an existing one is safe to use.
///
/// The state dir holds the audit log, token hashes, encrypted secrets and possibly a
/// master key file: nobody but the daemon's user may list or read it. A directory Hall
/// creates is made 0700. An existing directory is never chmod'ed (it may be shared: a 1777
/// `/tmp` would lose its sticky bit and lock other users out); instead it is refused when
/// it is group/world-writable or owned by another user, since whoever can write to it could
/// swap the database or the key file. Files inside are created 0600 either way.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(dir) {
        Ok(meta) => {
            if !meta.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} exists and is not a directory", dir.display()),
                ));
            }
            // SAFETY: geteuid has no preconditions.
            let euid = unsafe { libc::geteuid() };
            if meta.uid() != euid {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is owned by uid {}, not by the user running hall (uid {euid}); \
                         use a directory this user owns (Hall does not change ownership or \
                         permissions of a directory it did not create)",
                        dir.display(),
                        meta.uid()
                    ),
                ));
            }
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o022 != 0 {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "{} is writable by other users (mode {mode:04o}): it would hold the audit \
                         log, tokens and secrets. Use a dedicated directory (Hall creates a \
                         missing one with mode 0700), or remove the group/other write bits \
                         yourself (chmod go-w); Hall does not chmod a directory it did not create",
                        dir.display()
                    ),
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
            // We created it: make it exactly 0700 whatever the umask.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        }
        Err(e) => Err(e),
    }
}

/// Write `contents` to `path` atomically (temp file + rename) with mode 0600.
pub fn write_private_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(parent) = path.parent() {
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// sled's page cache bound. Its default (1 GiB) let the daemon grow to 1.3 GB of RSS over a
/// million audited decisions (docs/performance.md): the audit log is written far more than
/// it is read, so a small cache costs little and keeps RSS bounded. 8 MiB rather than 16:
/// per-record inserts make sled clean segments about twice as often per record, and every page
/// it cleans passes through the cache on the inserting thread; with 16 MiB the daemon held
/// 101–105 MB after a million batched decisions, with 8 MiB 87 MB, at the same CPU per request.
const DB_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// sled's own periodic flusher is off. Besides flushing every 500 ms (which the audit log's
/// maintenance thread does instead, `audit::writer`), that thread cleans segments for up to
/// 250 ms of every 500: it reads cold pages back from disk and rewrites them. Per-record audit
/// inserts leave it tens of thousands of pages behind after a busy minute, which it then
/// worked off while the daemon was idle, paging leaves back in on its own thread while the
/// pages they evicted stayed in the idle HTTP workers' heaps: RSS rose ~30 MB in the minute
/// after the load stopped (docs/performance.md). sled still cleans segments as it writes (one
/// page per node consolidation, which did ~97 % of the cleaning under load anyway); a `Tree`
/// that is dropped flushes what is left.
const SLED_FLUSH_EVERY_MS: Option<u64> = None;

/// How long [`open_db`] waits for the database lock. sled's background flusher can hold the
/// lock for a moment after the last handle of an earlier instance is dropped (sled issues
/// #1234, #1289), and a service manager may start the new process while the old one is still
/// exiting; a second daemon on the same state dir still fails, after this wait.
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Open the sled database in `state_dir/db`, creating the state dir 0700 first.
pub fn open_db(state_dir: &Path) -> Result<sled::Db, sled::Error> {
    ensure_private_dir(state_dir)?;
    let path = state_dir.join("db");
    let db = open_db_waiting(&path, LOCK_WAIT)?;
    // sled creates its files with the process umask; tighten them.
    tighten_tree(&path);
    Ok(db)
}

/// Open the sled database at `path`, retrying while another handle holds its lock, for at
/// most `wait`. Any other error is returned at once.
pub fn open_db_waiting(path: &Path, wait: Duration) -> Result<sled::Db, sled::Error> {
    let deadline = Instant::now() + wait;
    loop {
        match sled::Config::new()
            .path(path)
            .cache_capacity(DB_CACHE_BYTES)
            .flush_every_ms(SLED_FLUSH_EVERY_MS)
            .open()
        {
            Err(sled::Error::Io(e)) if is_lock_busy(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// sled reports a held lock as a custom `Other` error wrapping the `flock` EWOULDBLOCK.
fn is_lock_busy(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

fn tighten_tree(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = if meta.is_dir() { 0o700 } else { 0o600 };
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode));
        if meta.is_dir() {
            if let Ok(rd) = fs::read_dir(path) {
                for e in rd.flatten() {
                    tighten_tree(&e.path());
                }
            }
        }
    }
}

/// Open (or reopen) a test database at `path`, waiting out a lock an earlier handle in this
/// process may still hold.
#[cfg(test)]
pub(crate) fn test_db_at(path: &Path) -> sled::Db {
    open_db_waiting(path, Duration::from_secs(20)).expect("open the test database")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn a_missing_state_dir_is_created_0700() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("a/b/state");
        ensure_private_dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn an_existing_dir_is_used_as_it_is_or_refused_never_chmoded() {
        let t = tempfile::tempdir().unwrap();
        for (m, ok) in [
            (0o700, true),
            (0o750, true),
            (0o770, false),
            (0o1777, false),
        ] {
            let d = t.path().join(format!("d{m:o}"));
            fs::create_dir(&d).unwrap();
            fs::set_permissions(&d, fs::Permissions::from_mode(m)).unwrap();
            let r = ensure_private_dir(&d);
            assert_eq!(r.is_ok(), ok, "mode {m:o}: {r:?}");
            if let Err(e) = r {
                assert!(e.to_string().contains("writable by other users"), "{e}");
            }
            assert_eq!(mode(&d), m, "mode {m:o} was changed");
        }
        let f = t.path().join("file");
        fs::write(&f, b"").unwrap();
        assert!(ensure_private_dir(&f).is_err());
    }

    #[test]
    fn a_dir_owned_by_another_user_is_refused() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("theirs");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o700)).unwrap();
        // SAFETY: geteuid has no preconditions.
        let other = unsafe { libc::geteuid() } + 4242;
        if std::os::unix::fs::chown(&d, Some(other), None).is_err() {
            eprintln!("SKIPPED: cannot chown (not root)");
            return;
        }
        let e = ensure_private_dir(&d).unwrap_err();
        assert!(e.to_string().contains("owned by uid"), "{e}");
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn open_waits_for_a_lock_that_is_let_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let first = open_db_waiting(&path, Duration::ZERO).unwrap();
        first.insert(b"k", b"v").unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            first.flush().unwrap();
            drop(first);
        });
        let second = open_db_waiting(&path, Duration::from_secs(20)).unwrap();
        releaser.join().unwrap();
        assert_eq!(second.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn open_gives_up_on_a_lock_that_stays_held() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let _held = open_db_waiting(&path, Duration::ZERO).unwrap();
        let start = Instant::now();
        let err = open_db_waiting(&path, Duration::from_millis(200)).unwrap_err();
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(err.to_string().contains("could not acquire lock"), "{err}");
    }

    #[test]
    fn open_returns_other_errors_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"x").unwrap();
        let start = Instant::now();
        assert!(open_db_waiting(&file.join("db"), Duration::from_secs(20)).is_err());
        assert!(start.elapsed() < Duration::from_secs(20));
    }
}

//! sled-backed state, one module per tree.
//!
//! - [`audit`]: the hash-chained audit log with a group-commit writer.
//! - [`tokens`]: API tokens (stored as blake3 hashes), scopes, rate limits.
//! - [`secrets`]: AEAD-encrypted secrets; [`keys`]: where the master key comes from.

pub mod audit;
pub mod keys;
pub mod secrets;
pub mod tokens;

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

/// Create `dir` (and parents) with mode 0700, or tighten an existing one to 0700.
///
/// The state dir holds the audit log, token hashes, encrypted secrets and possibly a
/// master key file: nobody but the daemon's user may list or read it.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = fs::metadata(dir)?;
    if meta.permissions().mode() & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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
/// it is read, so a small cache costs little and keeps RSS bounded.
const DB_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Open the sled database in `state_dir/db`, creating the state dir 0700 first.
pub fn open_db(state_dir: &Path) -> Result<sled::Db, sled::Error> {
    ensure_private_dir(state_dir)?;
    let path = state_dir.join("db");
    let db = sled::Config::new()
        .path(&path)
        .cache_capacity(DB_CACHE_BYTES)
        .open()?;
    // sled creates its files with the process umask; tighten them.
    tighten_tree(&path);
    Ok(db)
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

//! Reading the `*.toml` files of a directory: which files, in which order, and what may not
//! be read (a dangling symlink, a FIFO, a directory, a file too large, not UTF-8).

use std::path::Path;

use super::Source;
use crate::engine::{Diagnostic, Location, Severity};

/// Why one file could not be read. Each keeps the last good set serving.
#[derive(Debug, thiserror::Error)]
pub(super) enum ReadError {
    #[error("cannot read directory: {0}")]
    Dir(#[source] std::io::Error),
    #[error("dangling symlink (points to {target}, which does not exist): fix or remove it; its rules are not loaded")]
    Dangling { target: String },
    #[error("is {0}, not a regular file: only regular files (or symlinks to them) are read")]
    NotRegular(&'static str),
    #[error("file is too large ({0} bytes; the limit is {MAX_FILE_BYTES})")]
    TooLarge(u64),
    #[error("file is too large (over {MAX_FILE_BYTES} bytes, and still growing)")]
    Growing,
    #[error("cannot read file: {0}")]
    Io(#[source] std::io::Error),
    #[error("cannot read file: not UTF-8 text ({0})")]
    NotUtf8(#[source] std::string::FromUtf8Error),
}

impl ReadError {
    fn diagnostic(&self, file: String) -> Diagnostic {
        Diagnostic {
            severity: Severity::Error,
            location: Location {
                file,
                line: 0,
                col: 0,
            },
            key: String::new(),
            message: self.to_string(),
        }
    }
}

/// Every `*.toml` file of `dir` (not hidden), in lexical order; what cannot be read is
/// added to `diags`.
pub(super) fn read_dir_sources(dir: &Path, diags: &mut Vec<Diagnostic>) -> Vec<Source> {
    let entries = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) => {
            diags.push(ReadError::Dir(e).diagnostic(dir.display().to_string()));
            return Vec::new();
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".toml") && !n.starts_with('.'))
        .collect();
    names.sort();
    let mut out = Vec::new();
    for n in names {
        let path = dir.join(&n);
        let shown = path.display().to_string();
        match read_policy_file(&path) {
            Ok(Some(text)) => out.push(Source { name: shown, text }),
            // A file removed between listing and reading is an edit in progress: skip it.
            Ok(None) => {}
            Err(e) => diags.push(e.diagnostic(shown)),
        }
    }
    out
}

/// The largest registry or policy file read (a 10,000-rule set is ~2 MB in all).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Read one `*.toml` file: only a regular file (after resolving symlinks), at most
/// [`MAX_FILE_BYTES`], UTF-8, and never blocking. `Ok(None)`: the name is gone (removed
/// between listing and reading). Every other problem is an error that keeps the last good
/// set: a dangling symlink (its rules would silently vanish), a FIFO (reading one blocks
/// until a writer appears: it wedged reload), a directory or device, a file too large.
fn read_policy_file(path: &Path) -> Result<Option<String>, ReadError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match std::fs::symlink_metadata(path) {
                // The name is there but what it points to is not.
                Ok(_) => {
                    let target = std::fs::read_link(path)
                        .map(|t| t.display().to_string())
                        .unwrap_or_else(|_| "?".into());
                    Err(ReadError::Dangling { target })
                }
                Err(_) => Ok(None),
            };
        }
        Err(e) => return Err(ReadError::Io(e)),
    };
    let kind = |t: std::fs::FileType| {
        if t.is_dir() {
            "a directory"
        } else if t.is_fifo() {
            "a named pipe (FIFO)"
        } else if t.is_socket() {
            "a socket"
        } else if t.is_block_device() || t.is_char_device() {
            "a device"
        } else {
            "not a regular file"
        }
    };
    if !meta.is_file() {
        return Err(ReadError::NotRegular(kind(meta.file_type())));
    }
    // O_NONBLOCK: if the name became a FIFO since the check above, opening it must not wait
    // for a writer. The type is checked again on the opened file.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path);
    let f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ReadError::Io(e)),
    };
    let meta = f.metadata().map_err(ReadError::Io)?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(kind(meta.file_type())));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(ReadError::TooLarge(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    f.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(ReadError::Io)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ReadError::Growing);
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(ReadError::NotUtf8)
}

//! Storage health: a full or failing disk makes the daemon unready and its writes 503, and
//! once writes work again it serves again, without an operator.
//!
//! Two layers fail differently. The audit writer retries every batch, so a transient error
//! (the fault hook, a quota briefly exceeded) heals with the next batch that succeeds. sled
//! 0.34 does not: after an I/O error while writing its log it keeps a *global error* and
//! refuses every later write for the life of the handle. So while storage is failing, a
//! healer probes every [`PROBE_EVERY`]: sled (a tiny insert + flush), and the file system
//! (a [`FS_PROBE_BYTES`] file written and fsynced in the state dir). When the file system
//! takes writes again but sled still refuses them, the daemon re-executes itself: it stops
//! accepting, finishes in-flight requests, and `exec`s the same command line, handing the
//! listening socket over (`HALL_LISTEN_FD`), so clients see the same address and at most a
//! short pause; the new process reopens sled, which recovers to its last flush. Nothing was
//! acknowledged that was not flushed, so nothing acknowledged is lost.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};

use super::errors::ApiError;
use super::state::AppState;

/// How often the healer probes while storage is failing.
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// The file-system probe: about one sled segment, so "it fits" means sled's next write does.
pub const FS_PROBE_BYTES: usize = 1024 * 1024;

/// A process that re-executed itself does not do it again before this uptime.
const REEXEC_MIN_UPTIME: Duration = Duration::from_secs(60);

/// The variable that hands the listening socket to the re-executed process.
pub const LISTEN_FD_ENV: &str = "HALL_LISTEN_FD";

/// Whether this process was started by a re-exec.
fn reexeced() -> bool {
    static REEXECED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *REEXECED.get_or_init(|| std::env::var_os(LISTEN_FD_ENV).is_some())
}

/// The listening socket: inherited from the process that re-executed into this one, else
/// bound to `addr`.
pub fn listener(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use std::os::fd::FromRawFd;
    let _ = reexeced();
    if let Some(fd) = std::env::var(LISTEN_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    {
        // SAFETY: the fd was handed over by our own re-exec and nothing else owns it. Only
        // an fd that is a listening TCP socket is used. (The variable stays set: removing it
        // with other threads running is unsound, and a later re-exec sets it anew.)
        let l = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        if l.local_addr().is_ok() {
            set_cloexec(fd);
            return Ok(l);
        }
    }
    let l = std::net::TcpListener::bind(addr)?;
    // The backlog HttpServer::bind would use.
    // SAFETY: listen() on a socket we own.
    unsafe {
        libc::listen(std::os::fd::AsRawFd::as_raw_fd(&l), 2048);
    }
    Ok(l)
}

fn set_cloexec(fd: i32) {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
        }
    }
}

/// Replace this process with a fresh run of the same command line, handing it `listener`
/// (see the module docs). Returns only if the exec failed.
pub fn reexec(listener: &std::net::TcpListener) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    // SAFETY: dup() of a listening socket we own; the copy has no FD_CLOEXEC, so it survives exec.
    let fd = unsafe { libc::dup(std::os::fd::AsRawFd::as_raw_fd(listener)) };
    if fd < 0 {
        return std::io::Error::last_os_error();
    }
    // The running binary's inode, even if an upgrade replaced the file meanwhile.
    let proc_exe = std::path::PathBuf::from("/proc/self/exe");
    let exe = if proc_exe.exists() {
        proc_exe
    } else {
        std::env::current_exe().unwrap_or(proc_exe)
    };
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "hall".into());
    std::process::Command::new(exe)
        .arg0(arg0)
        .args(args)
        .env(LISTEN_FD_ENV, fd.to_string())
        .exec()
}

/// Why storage cannot be written right now, if it cannot: the audit writer's last error, or
/// a failure seen on another write path.
pub fn problem(state: &AppState) -> Option<String> {
    if let Some(e) = state.stores.audit.write_error() {
        return Some(e);
    }
    state
        .storage_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Write to sled and flush: fails while sled holds a global error (or the disk is full).
fn probe_sled(db: &sled::Db) -> Result<(), String> {
    let now = super::state::now_ms().to_be_bytes();
    db.open_tree("storage_probe")
        .and_then(|t| t.insert(b"last", &now[..]))
        .map_err(|e| e.to_string())?;
    db.flush().map(|_| ()).map_err(|e| e.to_string())
}

/// Write, fsync and remove a file of [`FS_PROBE_BYTES`] in the state dir.
fn probe_fs(dir: &std::path::Path) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(".storage_probe");
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(&vec![0u8; FS_PROBE_BYTES])?;
        f.sync_all()
    })();
    let _ = std::fs::remove_file(&path);
    result.map_err(|e| e.to_string())
}

/// Middleware: a write request that failed with 500 while storage cannot be written is an
/// outage, not a bug: answer 503 `unavailable` naming the cause (and start the healer).
pub async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let write = !matches!(req.method().as_str(), "GET" | "HEAD" | "OPTIONS");
    let state = req.app_data::<web::Data<AppState>>().cloned();
    let res = next.call(req).await?.map_into_boxed_body();
    let (Some(state), true, 500) = (state, write, res.status().as_u16()) else {
        return Ok(res);
    };
    let why = match problem(&state) {
        Some(why) => Some(why),
        None => {
            let db = state.stores.db.clone();
            match web::block(move || probe_sled(&db)).await {
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "storage cannot be written");
                    *state
                        .storage_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("the database cannot be written: {e}"));
                    Some(e)
                }
                _ => None,
            }
        }
    };
    let Some(why) = why else { return Ok(res) };
    let (req, _) = res.into_parts();
    let resp = ApiError::unavailable(format!(
        "storage cannot be written ({why}); nothing was changed or acknowledged; retry later"
    ))
    .error_response();
    Ok(ServiceResponse::new(req, resp))
}

/// Start the healer (see the module docs). `stop` ends the HTTP server for a re-exec.
pub fn spawn_healer(state: &Arc<AppState>, stop: actix_web::dev::ServerHandle) {
    let st = state.clone();
    actix_web::rt::spawn(async move {
        loop {
            actix_web::rt::time::sleep(PROBE_EVERY).await;
            if problem(&st).is_none() {
                continue;
            }
            let (db, dir) = (st.stores.db.clone(), st.config.state_dir.clone());
            let Ok((sled_ok, fs_ok)) =
                tokio::task::spawn_blocking(move || (probe_sled(&db), probe_fs(&dir))).await
            else {
                continue;
            };
            match (sled_ok, fs_ok) {
                (Ok(()), _) => {
                    // Writes work again: ready; a failing batch would say otherwise at once.
                    *st.storage_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    st.stores.audit.clear_write_error();
                    tracing::info!("storage can be written again; serving");
                }
                (Err(e), Ok(())) if st.started.elapsed() < REEXEC_MIN_UPTIME && reexeced() => {
                    // Just re-executed and failing again: the cause is not free space (e.g. a
                    // file-size limit). Do not loop; keep probing.
                    *st.storage_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("the database cannot be written: {e}"));
                }
                (Err(e), Ok(())) => {
                    tracing::warn!(
                        error = %e,
                        "the disk takes writes again but the database stays failed (sled keeps its \
                         first I/O error): restarting in place to reopen it"
                    );
                    st.reexec.store(true, Ordering::SeqCst);
                    stop.stop(true).await;
                    return;
                }
                (Err(e), Err(fs)) => {
                    *st.storage_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!(
                        "the database cannot be written: {e}; the disk: {fs}"
                    ));
                }
            }
        }
    });
}

//! The throughput floor `/api/route` is measured against (bench/load.sh, docs/performance.md).
//!
//! actix-web on loopback with the daemon's server settings (default worker count, backlog
//! 2048, 30 s shutdown timeout), answering every POST with a constant ~130-byte JSON body
//! and doing nothing else: no auth, no parsing, no decision, no audit. The ratio
//! daemon/floor then says what Hall's own work costs on this machine.
//!
//! With `--sync FILE` it is the floor of a *durable* answer: before answering, each request
//! appends a 400-byte record to FILE and makes it stable with the same call sled uses for
//! `flush` on Linux (`sync_file_range` with WAIT_BEFORE | WRITE | WAIT_AFTER), or with
//! `fdatasync` when `--sync-call fdatasync` is given. Nothing else: no group commit, no
//! thread hop. What that costs in latency and CPU is what no durable design on this disk
//! can go below (docs/performance.md, "The durable floor").
//!
//! With `--group` as well, the sync is a group commit: a request hands its record to one
//! syncing thread and waits; that thread writes everything handed over since its last sync
//! in one write, syncs it once, and wakes the waiting requests. That is the shape of Hall's
//! durable design (one hop, one sync per group) without Hall or sled, kept simple: what
//! durability costs at many connections on this disk (docs/performance.md, "Durable at 64
//! connections").
//!
//! With `--sled DIR` instead of `--sync FILE`, the records go into a sled database opened in
//! DIR exactly as the daemon opens its own (`hall::store::open_db`): one tree entry per write
//! (per request, or per group with `--group`), then sled's `flush`, which hands the write to
//! sled's I/O thread pool and waits for it. That is what durability costs *with sled*, the
//! audit log's store, and nothing of Hall's above it (docs/performance.md, "Durability with
//! and without sled").
//!
//! The floor keeps the system allocator (the daemon uses mimalloc): built both ways, the bare
//! and the sled floors measured the same (docs/performance.md).
//!
//! `cargo run --release --example floor -- [ADDR] [--sync FILE [--sync-call fdatasync] |
//! --sled DIR] [--group]` (default 127.0.0.1:0); logs `listening on http://ADDR` on stderr
//! like the daemon.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};

use tokio::sync::watch;

use actix_web::{web, App, HttpResponse, HttpServer};

/// Shaped like a real decision answer, so response size matches too.
const BODY: &str = r#"{"decision_id":"0190f0e4-7a3b-7c2d-8e9f-0a1b2c3d4e5f","allowed":true,"worker_id":"worker.000001","deny_reason":null,"dry_run":false}"#;

/// About the size of one encoded audit record of the shipped example request.
const RECORD: [u8; 400] = [0x5a; 400];

#[derive(Clone, Copy)]
enum SyncCall {
    SyncFileRange,
    Fdatasync,
}

/// Where a durable floor makes its records stable.
enum Log {
    /// A plain file: write, then `call`.
    File {
        file: File,
        offset: u64,
        call: SyncCall,
    },
    /// A sled tree in a database opened as the daemon opens its own: one entry per write,
    /// then sled's `flush`.
    Sled { tree: sled::Tree, key: u64 },
}

impl Log {
    fn append_stable(&mut self) -> std::io::Result<()> {
        self.write_stable(&RECORD)
    }

    fn write_stable(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Log::File { file, offset, call } => {
                sync_file(file, *offset, bytes, *call)?;
                *offset += bytes.len() as u64;
                Ok(())
            }
            Log::Sled { tree, key } => {
                tree.insert(key.to_be_bytes(), bytes)
                    .map_err(std::io::Error::other)?;
                *key += 1;
                tree.flush().map_err(std::io::Error::other)?;
                Ok(())
            }
        }
    }
}

fn sync_file(file: &File, offset: u64, bytes: &[u8], call: SyncCall) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    file.write_all_at(bytes, offset)?;
    let fd = file.as_raw_fd();
    let rc = match call {
        #[cfg(target_os = "linux")]
        SyncCall::SyncFileRange => unsafe {
            // SAFETY: fd is open for the lifetime of `file`.
            libc::sync_file_range(
                fd,
                offset as libc::off64_t,
                bytes.len() as libc::off64_t,
                libc::SYNC_FILE_RANGE_WAIT_BEFORE
                    | libc::SYNC_FILE_RANGE_WRITE
                    | libc::SYNC_FILE_RANGE_WAIT_AFTER,
            )
        },
        // SAFETY: as above.
        _ => unsafe { libc::fdatasync(fd) },
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Group commit: `pending` holds the bytes handed over since the last sync and how many
/// records were ever handed over; the syncing thread publishes in `stable` how many of them
/// are stable (`u64::MAX` once a sync failed, for good: the file may have lost any of them).
struct Group {
    pending: Mutex<(Vec<u8>, u64)>,
    ready: Condvar,
    stable: watch::Sender<u64>,
}

impl Group {
    fn start(mut log: Log) -> Arc<Group> {
        let group = Arc::new(Group {
            pending: Mutex::new((Vec::new(), 0)),
            ready: Condvar::new(),
            stable: watch::channel(0).0,
        });
        let g = group.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let mut failed = false;
            loop {
                let covered = {
                    let mut p = g.pending.lock().unwrap_or_else(|e| e.into_inner());
                    while p.0.is_empty() {
                        p = g.ready.wait(p).unwrap_or_else(|e| e.into_inner());
                    }
                    std::mem::swap(&mut p.0, &mut bytes);
                    p.1
                };
                failed = failed || log.write_stable(&bytes).is_err();
                let stable = if failed { u64::MAX } else { covered };
                bytes.clear();
                g.stable.send_replace(stable);
            }
        });
        group
    }

    /// Hand one record over and wait until a sync covers it.
    async fn append_stable(&self) -> Result<(), ()> {
        let mut stable = self.stable.subscribe();
        let seq = {
            let mut p = self.pending.lock().map_err(|_| ())?;
            p.0.extend_from_slice(&RECORD);
            p.1 += 1;
            p.1
        };
        self.ready.notify_one();
        match stable.wait_for(|s| *s >= seq).await.map(|s| *s) {
            Ok(u64::MAX) | Err(_) => Err(()),
            Ok(_) => Ok(()),
        }
    }
}

enum Durable {
    None,
    Inline(Mutex<Log>),
    Group(Arc<Group>),
}

async fn answer(_body: web::Bytes, durable: web::Data<Durable>) -> HttpResponse {
    let stable = match durable.get_ref() {
        Durable::None => Ok(()),
        // Inline on the worker, as the daemon's group-commit leader does when uncontended.
        Durable::Inline(log) => log
            .lock()
            .map_err(|_| ())
            .and_then(|mut l| l.append_stable().map_err(|_| ())),
        Durable::Group(group) => group.append_stable().await,
    };
    if stable.is_err() {
        return HttpResponse::InternalServerError().finish();
    }
    HttpResponse::Ok()
        .content_type("application/json")
        .body(BODY)
}

fn main() -> std::io::Result<()> {
    let mut addr = "127.0.0.1:0".to_string();
    let mut sync_file = None;
    let mut sled_dir = None;
    let mut call = SyncCall::SyncFileRange;
    let mut group = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--sync" => sync_file = args.next(),
            "--sled" => sled_dir = args.next(),
            "--group" => group = true,
            "--sync-call" => match args.next().as_deref() {
                Some("fdatasync") => call = SyncCall::Fdatasync,
                Some("sync_file_range") => call = SyncCall::SyncFileRange,
                other => {
                    eprintln!("--sync-call: expected sync_file_range or fdatasync, got {other:?}");
                    std::process::exit(2);
                }
            },
            _ => addr = a,
        }
    }
    let log = match (sync_file, sled_dir) {
        (Some(_), Some(_)) => {
            eprintln!("--sync and --sled: give one");
            std::process::exit(2);
        }
        (Some(path), None) => Some(Log::File {
            file: File::options()
                .create(true)
                .truncate(true)
                .write(true)
                .open(path)?,
            offset: 0,
            call,
        }),
        (None, Some(dir)) => {
            let db = hall::store::open_db(Path::new(&dir)).map_err(std::io::Error::other)?;
            Some(Log::Sled {
                tree: db.open_tree("floor").map_err(std::io::Error::other)?,
                key: 0,
            })
        }
        (None, None) => None,
    };
    let log = match log {
        Some(log) if group => Durable::Group(Group::start(log)),
        Some(log) => Durable::Inline(Mutex::new(log)),
        None if group => {
            eprintln!("--group needs --sync FILE or --sled DIR");
            std::process::exit(2);
        }
        None => Durable::None,
    };
    let log = web::Data::new(log);
    actix_web::rt::System::new().block_on(async move {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(log.clone())
                .default_service(web::to(answer))
        })
        .backlog(2048)
        .shutdown_timeout(30)
        .bind(&addr)?;
        let bound = server.addrs().first().copied();
        let server = server.run();
        if let Some(a) = bound {
            eprintln!("listening on http://{a}");
        }
        server.await
    })
}

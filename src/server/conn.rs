//! Connection reaper: no connection may sit idle — between requests, or holding a request
//! body nobody will read — for longer than [`IDLE_LIMIT`].
//!
//! actix-web's own timers leave two holes (actix-http 3.x): the request-head timeout covers
//! only a connection's *first* request, so a client that completes one request and then
//! trickles (or stalls) the next head holds the connection forever; and a refused request
//! whose chunked body never arrives keeps its connection waiting for that body. Either way
//! a few thousand sockets, with no token at all, would hold every connection slot.
//!
//! So each accepted connection is registered here (with a duplicate of its socket fd), the
//! app-wide middleware marks when a request starts and when its response body is done, and a
//! thread shuts down (`shutdown(2)`, which actix then sees as EOF) every connection that has
//! had no request in flight for [`IDLE_LIMIT`]. The duplicate fd is closed when actix drops
//! the connection, so it can never name another socket.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use actix_web::body::{BodySize, BoxBody, MessageBody};
use actix_web::web::Bytes;

/// How long a connection may have no request in flight before it is shut down. Longer than
/// the keep-alive (5 s) and the head timeout (5 s), so only a connection those timers failed
/// to close is ever reaped.
pub const IDLE_LIMIT: Duration = Duration::from_secs(10);

/// Every open connection.
#[derive(Default)]
pub struct Conns {
    open: Mutex<HashMap<u64, Tracked>>,
    next_id: AtomicU64,
    reaped: AtomicU64,
    epoch: std::sync::OnceLock<Instant>,
}

struct Tracked {
    /// A duplicate of the connection's socket, to shut it down from here.
    socket: OwnedFd,
    state: Arc<ConnState>,
}

/// One connection's activity, shared by its guard, its requests and the reaper.
#[derive(Default)]
pub struct ConnState {
    busy: AtomicU32,
    /// Milliseconds (since [`Conns`] was made) of the last request start or end.
    idle_since_ms: AtomicI64,
    reaped: AtomicBool,
}

/// Lives in the connection's extensions: dropped when actix drops the connection, which
/// unregisters it (and closes the duplicate fd).
pub struct ConnGuard {
    id: u64,
    state: Arc<ConnState>,
    conns: Arc<Conns>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.conns
            .open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

impl ConnGuard {
    /// Cap this connection's kernel send buffer (`SO_SNDBUF`, which also turns off its
    /// autotuning), for a long-lived stream: a client that stops reading then holds at most
    /// about twice `bytes` in the kernel. Best effort.
    pub fn limit_send_buffer(&self, bytes: i32) {
        let open = self.conns.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = open.get(&self.id) {
            // SAFETY: setsockopt on a socket fd we own (our duplicate of the connection's),
            // with a pointer to an int that lives across the call.
            unsafe {
                libc::setsockopt(
                    t.socket.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&bytes as *const i32).cast(),
                    std::mem::size_of::<i32>() as libc::socklen_t,
                );
            }
        }
    }
}

impl Conns {
    fn now_ms(&self) -> i64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as i64
    }

    /// Register a new connection (from `HttpServer::on_connect`).
    pub fn register(self: &Arc<Self>, socket: &impl AsFd) -> Option<ConnGuard> {
        let dup = socket.as_fd().try_clone_to_owned().ok()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::default());
        state.idle_since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.open.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Tracked {
                socket: dup,
                state: state.clone(),
            },
        );
        Some(ConnGuard {
            id,
            state,
            conns: self.clone(),
        })
    }

    /// Shut down every connection idle for longer than `limit`.
    pub fn reap(&self, limit: Duration) -> usize {
        let now = self.now_ms();
        let limit = limit.as_millis() as i64;
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for t in open.values() {
            let s = &t.state;
            if s.busy.load(Ordering::Acquire) == 0
                && now - s.idle_since_ms.load(Ordering::Acquire) > limit
                && !s.reaped.swap(true, Ordering::AcqRel)
            {
                // SAFETY: shutdown(2) on a socket fd we own (our duplicate); it ends the
                // connection for actix's fd too, which then drops it.
                unsafe {
                    libc::shutdown(t.socket.as_raw_fd(), libc::SHUT_RDWR);
                }
                n += 1;
            }
        }
        self.reaped.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// The reaper thread: checks every second.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let conns = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("hall-conn-reaper".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                let Some(c) = conns.upgrade() else { return };
                let n = c.reap(IDLE_LIMIT);
                if n > 0 {
                    tracing::info!(connections = n, "closed idle or stalled connections");
                }
            });
    }
}

impl ConnGuard {
    /// A request started on this connection; it is busy until the returned guard (kept
    /// with the response body) is dropped.
    pub fn begin(&self) -> Busy {
        self.state.busy.fetch_add(1, Ordering::AcqRel);
        self.state
            .idle_since_ms
            .store(self.conns.now_ms(), Ordering::Release);
        Busy {
            state: self.state.clone(),
            conns: self.conns.clone(),
        }
    }
}

/// A request in flight.
pub struct Busy {
    state: Arc<ConnState>,
    conns: Arc<Conns>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.state
            .idle_since_ms
            .store(self.conns.now_ms(), Ordering::Release);
        self.state.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it is sent (or
/// dropped): a long stream is not idle.
pub struct TrackedBody {
    inner: BoxBody,
    _busy: Busy,
}

impl TrackedBody {
    pub fn new(inner: BoxBody, busy: Busy) -> TrackedBody {
        TrackedBody { inner, _busy: busy }
    }
}

impl MessageBody for TrackedBody {
    type Error = Box<dyn std::error::Error>;

    fn size(&self) -> BodySize {
        self.inner.size()
    }

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn idle_connections_are_shut_down_and_busy_ones_are_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client_a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server_a, _) = l.accept().unwrap();
        let _client_b = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (server_b, _) = l.accept().unwrap();
        let conns = Arc::new(Conns::default());
        let guard_a = conns.register(&server_a).unwrap();
        let guard_b = conns.register(&server_b).unwrap();
        let busy = guard_b.begin();
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            conns.reap(Duration::from_millis(10)),
            1,
            "only the idle one"
        );
        // The client of the idle connection sees EOF.
        client_a
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(client_a.read(&mut [0u8; 8]).unwrap(), 0);
        // Not reaped twice; the busy one becomes reapable once its response is done.
        assert_eq!(conns.reap(Duration::from_millis(10)), 0);
        drop(busy);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(conns.reap(Duration::from_millis(10)), 1);
        assert_eq!(conns.reaped.load(Ordering::Relaxed), 2);
        // Dropping a guard unregisters its connection.
        drop(guard_a);
        drop(guard_b);
        assert!(conns.open.lock().unwrap().is_empty());
    }
}

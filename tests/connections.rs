//! End-to-end: connections cannot exhaust the daemon. Clients that send a request head and
//! then stall on the body, and clients that connect and send nothing, are closed after the
//! header/body timeouts, so a well-behaved client is still served — even when the daemon's
//! file-descriptor limit is far below the number of hostile connections.
//!
//! Its own test binary: it lowers RLIMIT_NOFILE for this process, which the daemon inherits.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Daemon;

/// The fd limit the daemon runs under (soft = hard, so it cannot raise it).
const NOFILE: u64 = 256;
/// Hostile connections of each kind: together well past what NOFILE allows.
const STALLED: usize = 150;
const IDLE: usize = 150;

#[test]
fn stalled_and_idle_connections_do_not_starve_a_real_client() {
    // The test process needs more than NOFILE sockets itself; the daemon gets exactly NOFILE.
    let lim = libc::rlimit {
        rlim_cur: 4096,
        rlim_max: 4096,
    };
    // SAFETY: setrlimit with a valid pointer (lowering or keeping the hard limit).
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    let d = Daemon::builder().nofile_limit(NOFILE).start();
    let token = d.admin_token().unwrap();
    let head = |len: usize| {
        format!(
            "POST /api/route HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n",
            d.addr
        )
    };
    // Authenticated requests whose body never comes.
    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        let mut s = TcpStream::connect(d.addr).unwrap();
        let _ = s.write_all(head(1000).as_bytes());
        stalled.push(s);
    }
    // Connections that never send a byte.
    let idle: Vec<TcpStream> = (0..IDLE)
        .map(|_| TcpStream::connect(d.addr).unwrap())
        .collect();

    // A real client is served (bounded wait; the timeouts free the slots).
    let started = Instant::now();
    let r = loop {
        match common::raw_request(
            d.addr,
            "POST",
            "/api/route",
            &[
                ("Host".into(), d.addr.to_string()),
                ("Authorization".into(), format!("Bearer {token}")),
                ("Content-Type".into(), "application/json".into()),
            ],
            Some(
                br#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#,
            ),
        ) {
            Ok(r) => break r,
            Err(e) if started.elapsed() < Duration::from_secs(60) => {
                eprintln!("retrying: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no answer within 60 s: {e}\nlogs:\n{}", d.logs()),
        }
    };
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["allowed"], true);

    // A stalled body got a JSON 408 and its connection was closed.
    let mut s = stalled.swap_remove(0);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let resp = common::parse_response(&buf).expect("a response to the stalled request");
    resp.assert_error(408, "request_timeout", None);
    // An idle connection was closed by the server (EOF, not our timeout).
    let mut s = idle.into_iter().next().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut b = [0u8; 512];
    let n = s
        .read(&mut b)
        .expect("the server closes an idle connection");
    let _ = n; // actix may send a 408 head first; either way the read ends, not times out
               // Still healthy.
    assert_eq!(d.get("/health").status, 200);
    drop(stalled);
}

/// Read until the server closes the connection; `None` if it is still open after `limit`.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let start = Instant::now();
    let mut got = Vec::new();
    let mut b = [0u8; 4096];
    while start.elapsed() < limit {
        match s.read(&mut b) {
            Ok(0) => return Some(got),
            Ok(n) => got.extend_from_slice(&b[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return Some(got),
        }
    }
    None
}

#[test]
fn a_trickled_second_request_and_an_unsent_chunked_body_do_not_hold_a_connection() {
    let d = Daemon::start();
    let host = d.addr.to_string();
    // Keep-alive slowloris: one complete request, then the next head a byte at a time.
    let mut slow = TcpStream::connect(d.addr).unwrap();
    slow.write_all(
        format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\nGET /health HTTP/1.1\r\nHost: {host}\r\nX-a: ")
            .as_bytes(),
    )
    .unwrap();
    let trickle = {
        let mut s = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..60 {
                std::thread::sleep(Duration::from_millis(500));
                if s.write_all(b"a").is_err() {
                    return;
                }
            }
        })
    };
    // A refused request whose chunked body never comes (no token, no body).
    let mut chunked = TcpStream::connect(d.addr).unwrap();
    chunked
        .write_all(
            format!(
                "POST /api/route HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
                 Transfer-Encoding: chunked\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
    let got = closed_within(&mut chunked, Duration::from_secs(25))
        .expect("the stalled chunked request's connection is closed");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 401"),
        "{got:?}"
    );
    let got = closed_within(&mut slow, Duration::from_secs(25))
        .expect("the trickling keep-alive connection is closed");
    assert!(
        String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"),
        "{got:?}"
    );
    trickle.join().unwrap();
    assert_eq!(d.get("/health").status, 200);
}

/// The body deadline is armed only for a body still on its way after the request head
/// (src/server/route.rs, `ArmLate`). A body that comes later, whole or in parts, is read;
/// one that stops halfway gets 408 like one that never starts.
#[test]
fn a_late_body_is_read_and_one_that_stops_halfway_gets_408() {
    let d = Daemon::start();
    let token = d.admin_token().unwrap();
    let body = br#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#;
    let head = format!(
        "POST /api/route HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        d.addr,
        body.len()
    );
    let send = |parts: &[&[u8]]| {
        let mut s = TcpStream::connect(d.addr).unwrap();
        s.set_nodelay(true).unwrap();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(300));
            }
            s.write_all(p).unwrap();
        }
        s
    };
    let half = body.len() / 2;
    for parts in [
        // The head, then the whole body.
        vec![head.as_bytes(), &body[..]],
        // The head with half the body, then the rest.
        vec![
            [head.as_bytes(), &body[..half]].concat().leak() as &[u8],
            &body[half..],
        ],
        // The head, then the body in three parts.
        vec![head.as_bytes(), &body[..10], &body[10..half], &body[half..]],
    ] {
        let mut s = send(&parts);
        let got = closed_within(&mut s, Duration::from_secs(20)).expect("an answer");
        let resp = common::parse_response(&got).expect("a response");
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert_eq!(resp.json()["allowed"], true);
    }
    // The head with half the body, then nothing: 408 after the body deadline, not sooner.
    let started = Instant::now();
    let mut s = send(&[&[head.as_bytes(), &body[..half]].concat()]);
    let got = closed_within(&mut s, Duration::from_secs(30)).expect("the connection is closed");
    let resp = common::parse_response(&got).expect("a response to the stalled request");
    resp.assert_error(408, "request_timeout", None);
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(d.get("/health").status, 200);
}

const BODY: &str = r#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#;

/// A request pipelined behind another is taken from actix's queue and polled once per turn
/// (not twice, as a request handled straight from the read): its stalled body must still get
/// the 408 deadline, not hold the connection until the client goes away.
#[test]
fn a_stalled_body_behind_a_pipelined_request_gets_408() {
    let d = Daemon::start();
    let token = d.admin_token().unwrap();
    let host = d.addr.to_string();
    for first in [
        format!("GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        // A decision (it waits for its audit record) before the stalled one.
        format!(
            "POST /api/route HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{}",
            BODY.len(),
            BODY
        ),
    ] {
        let mut s = TcpStream::connect(d.addr).unwrap();
        let req = format!(
            "{first}POST /api/route HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        );
        s.write_all(req.as_bytes()).unwrap();
        let got = closed_within(&mut s, Duration::from_secs(30))
            .expect("the connection is closed after the body deadline");
        let text = String::from_utf8_lossy(&got);
        assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.rsplit("HTTP/1.1 ").next().unwrap().starts_with("408"),
            "{text}"
        );
    }
    assert_eq!(d.get("/health").status, 200);
}

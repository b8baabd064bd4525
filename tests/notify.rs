//! End-to-end: systemd readiness. The daemon must send READY=1 only once a policy set is
//! loaded and the port is bound, so that when the manager sees READY, /ready is 200.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::Daemon;

fn notify_socket() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    (dir, path, sock)
}

fn recv(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification from the daemon");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn ready_is_sent_after_ready_answers_200() {
    let (_d, path, sock) = notify_socket();
    let d = Daemon::builder()
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .no_wait_ready()
        .start();
    let msg = recv(&sock);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    // At the moment systemd learns we are ready, we are.
    assert_eq!(d.get("/ready").status, 200);
    assert_eq!(
        d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
            .status,
        200
    );

    let mut d = d;
    assert!(d.stop().success());
    let msg = recv(&sock);
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg:?}");
}

#[test]
fn ready_waits_for_a_valid_policy_set() {
    let (_d, path, sock) = notify_socket();
    let d = Daemon::builder()
        .env("NOTIFY_SOCKET", path.to_str().unwrap())
        .setup(|p| std::fs::write(p.join("policies/99-broken.toml"), "[[rule]]\nid = 1\n").unwrap())
        .no_wait_ready()
        .start();
    // Serving, but not ready: no READY=1 yet.
    assert_eq!(d.get("/ready").status, 503);
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 4096];
    assert!(
        sock.recv(&mut buf).is_err(),
        "READY sent before a policy set loaded"
    );

    std::fs::remove_file(d.policies().join("99-broken.toml")).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let msg = recv(&sock);
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg:?}");
    assert_eq!(d.get("/ready").status, 200);
}

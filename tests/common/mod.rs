//! End-to-end harness: start the real `hall` binary on a free loopback port with a temp
//! state dir and its own copy of the example files, and speak raw HTTP/1.1 to it (raw, so a
//! test controls every header, including `Host` and `Origin`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const HALL: &str = env!("CARGO_BIN_EXE_hall");

/// The repository root (where `registry/` and `policies/` live).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Copy every file of `from` into `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    /// Holds `registry/`, `policies/` and `state/`.
    pub dir: tempfile::TempDir,
    logs: Arc<Mutex<String>>,
}

/// A change to the temp dir made before the daemon starts.
type Setup = Box<dyn FnOnce(&Path)>;

pub struct Builder {
    args: Vec<String>,
    env: Vec<(String, String)>,
    setup: Option<Setup>,
    wait_ready: bool,
    file_size_limit: Option<u64>,
    nofile_limit: Option<u64>,
}

impl Builder {
    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.to_string());
        self
    }
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.to_string(), v.to_string()));
        self
    }
    /// Change the temp dir (files, state) before the daemon starts.
    pub fn setup(mut self, f: impl FnOnce(&Path) + 'static) -> Self {
        self.setup = Some(Box::new(f));
        self
    }
    /// Don't wait for `/ready` (for a daemon that starts without a valid policy set).
    pub fn no_wait_ready(mut self) -> Self {
        self.wait_ready = false;
        self
    }
    /// Run the daemon under `RLIMIT_FSIZE = bytes`: writes past it fail with `EFBIG`
    /// (the daemon ignores `SIGXFSZ`), a genuine disk failure for fail-closed tests.
    pub fn file_size_limit(mut self, bytes: u64) -> Self {
        self.file_size_limit = Some(bytes);
        self
    }

    /// Run the daemon under `RLIMIT_NOFILE = n` (soft and hard): it cannot raise it.
    pub fn nofile_limit(mut self, n: u64) -> Self {
        self.nofile_limit = Some(n);
        self
    }

    pub fn start(self) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&repo().join("registry"), &dir.path().join("registry"));
        copy_dir(&repo().join("policies"), &dir.path().join("policies"));
        if let Some(f) = self.setup {
            f(dir.path());
        }
        Daemon::spawn_with_limits(
            dir,
            &self.args,
            &self.env,
            self.wait_ready,
            &[
                (libc::RLIMIT_FSIZE, self.file_size_limit),
                (libc::RLIMIT_NOFILE, self.nofile_limit),
            ],
        )
    }
}

impl Daemon {
    pub fn builder() -> Builder {
        Builder {
            args: Vec::new(),
            env: Vec::new(),
            setup: None,
            wait_ready: true,
            file_size_limit: None,
            nofile_limit: None,
        }
    }

    pub fn start() -> Daemon {
        Daemon::builder().start()
    }

    /// Start (again) on an existing dir, e.g. after a crash.
    pub fn spawn(
        dir: tempfile::TempDir,
        args: &[String],
        env: &[(String, String)],
        wait_ready: bool,
    ) -> Daemon {
        Daemon::spawn_limited(dir, args, env, wait_ready, None)
    }

    /// [`spawn`](Self::spawn), optionally under a file-size limit (see `Builder::file_size_limit`).
    pub fn spawn_limited(
        dir: tempfile::TempDir,
        args: &[String],
        env: &[(String, String)],
        wait_ready: bool,
        file_size_limit: Option<u64>,
    ) -> Daemon {
        Daemon::spawn_with_limits(
            dir,
            args,
            env,
            wait_ready,
            &[(libc::RLIMIT_FSIZE, file_size_limit)],
        )
    }

    /// [`spawn`](Self::spawn) under resource limits (soft = hard = the value), set in the child.
    pub fn spawn_with_limits(
        dir: tempfile::TempDir,
        args: &[String],
        env: &[(String, String)],
        wait_ready: bool,
        limits: &[(libc::__rlimit_resource_t, Option<u64>)],
    ) -> Daemon {
        let mut cmd = serve_command(dir.path());
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        for &(resource, value) in limits {
            let Some(value) = value else { continue };
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; it runs in the child between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: value as libc::rlim_t,
                        rlim_max: value as libc::rlim_t,
                    };
                    if libc::setrlimit(resource, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("start hall");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("listening on http://") {
                    let rest = &line[i + "listening on http://".len()..];
                    let addr: String = rest
                        .chars()
                        .take_while(|c| !c.is_whitespace() && *c != '"')
                        .collect();
                    if let (Some(tx), Ok(a)) = (tx.take(), addr.parse::<SocketAddr>()) {
                        let _ = tx.send(a);
                    }
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                std::thread::sleep(Duration::from_millis(200));
                panic!("daemon did not start; logs:\n{}", logs.lock().unwrap());
            }
        };
        let d = Daemon {
            child,
            addr,
            dir,
            logs,
        };
        if wait_ready {
            d.wait_until(Duration::from_secs(30), || d.get("/ready").status == 200);
        }
        d
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn policies(&self) -> PathBuf {
        self.dir.path().join("policies")
    }
    pub fn registry(&self) -> PathBuf {
        self.dir.path().join("registry")
    }
    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }

    /// The admin token the daemon wrote on first start, if any.
    pub fn admin_token(&self) -> Option<String> {
        std::fs::read_to_string(self.state_dir().join("admin.token"))
            .ok()
            .map(|s| s.trim().to_string())
    }

    pub fn default_headers(&self) -> Vec<(String, String)> {
        let mut h = vec![("Host".to_string(), self.addr.to_string())];
        if let Some(t) = self.admin_token() {
            h.push(("Authorization".into(), format!("Bearer {t}")));
        }
        h
    }

    pub fn get(&self, path: &str) -> Resp {
        self.request("GET", path, &self.default_headers(), None)
    }

    pub fn post_json(&self, path: &str, body: &str) -> Resp {
        let mut h = self.default_headers();
        h.push(("Content-Type".into(), "application/json".into()));
        self.request("POST", path, &h, Some(body.as_bytes()))
    }

    /// A route request for the example set, as JSON.
    pub fn route(&self, cap: &str, env: &str, label: &str, tenant: &str) -> Resp {
        self.post_json(
            "/api/route",
            &format!(r#"{{"capability_id":"{cap}","env":"{env}","data_label":"{label}","tenant_id":"{tenant}"}}"#),
        )
    }

    /// Any request with exactly these headers (no defaults added).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        body: Option<&[u8]>,
    ) -> Resp {
        raw_request(self.addr, method, path, headers, body)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\nlogs:\n{}", self.logs()))
    }

    pub fn wait_until(&self, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if f() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "condition not met within {timeout:?}; logs:\n{}",
            self.logs()
        );
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: sending a signal to our own child process.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill failed");
    }

    /// SIGTERM and wait for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(15);
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                panic!("daemon did not exit; logs:\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Hand the temp dir over (for a restart on the same state after a crash).
    pub fn into_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `hall serve` on a test dir (`registry/`, `policies/`, `state/` inside it), on a free
/// loopback port, with the keyring off and nothing inherited that would change where it
/// reads its config, token or key from; stderr piped for the logs.
pub fn serve_command(p: &Path) -> Command {
    let mut cmd = Command::new(HALL);
    cmd.arg("serve")
        .arg("--listen")
        .arg("127.0.0.1:0")
        .arg("--state-dir")
        .arg(p.join("state"))
        .arg("--registry")
        .arg(p.join("registry"))
        .arg("--policies")
        .arg(p.join("policies"))
        .env_remove("HALL_CONFIG")
        // No per-user hall.toml of the machine's user leaks in (a test names its files).
        .env("XDG_CONFIG_HOME", p.join("xdg-config"))
        .env_remove("HALL_TOKEN")
        .env_remove("HALL_MASTER_KEY_FILE")
        .env_remove("CREDENTIALS_DIRECTORY")
        .env_remove("NOTIFY_SOCKET")
        .env("HALL_KEYRING", "off")
        .env("RUST_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    /// Assert an error response: status, code, and (optionally) field.
    pub fn assert_error(&self, status: u16, code: &str, field: Option<&str>) {
        assert_eq!(self.status, status, "body: {}", self.body);
        let v = self.json();
        assert_eq!(v["code"], code, "body: {}", self.body);
        assert!(
            v["error"].as_str().is_some_and(|s| !s.is_empty()),
            "body: {}",
            self.body
        );
        if let Some(f) = field {
            assert_eq!(v["field"], f, "body: {}", self.body);
        }
    }
}

/// One request on a fresh connection (`Connection: close`), read to the end.
pub fn raw_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("Connection: close\r\n\r\n");
    s.write_all(req.as_bytes())?;
    if let Some(b) = body {
        // A server may answer early (413) and close: a failed write is not an error here.
        let _ = s.write_all(b);
    }
    read_response(&mut s)
}

pub fn read_response(s: &mut TcpStream) -> std::io::Result<Resp> {
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

pub fn parse_response(buf: &[u8]) -> std::io::Result<Resp> {
    let text = String::from_utf8_lossy(buf).to_string();
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("no complete response: {text:?}"),
        ));
    };
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Resp {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `hall ARGS` with a clean environment: no HALL_* of the caller, HOME and the XDG dirs in
/// `home` (so no hall.toml or state dir of the machine is found), plus `env`.
pub fn hall(home: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(HALL);
    cmd.args(args)
        .current_dir(home)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("HALL_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run hall")
}

/// Exit code, stdout and stderr, for assertion messages.
pub fn out(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

//! End-to-end: tokens, scopes, tenants, rate limits, Host/Origin safety and CORS, against the
//! real `hall` binary (SPEC 4 "Tokens and tenants", "Browser and local-network safety").

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Daemon, Resp};
use serde_json::Value;

/// A token issued over the API: its plaintext and its public info.
struct Tok {
    token: String,
    id: String,
}

fn issue(d: &Daemon, body: &str) -> Tok {
    let r = d.post_json("/api/tokens", body);
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    let token = v["token"].as_str().unwrap().to_string();
    assert!(
        token.starts_with("hall_") && token.len() == 5 + 64,
        "{token}"
    );
    let id = v["info"]["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("tok_"), "{id}");
    assert!(
        !v["info"].to_string().contains(&token),
        "info never holds the token"
    );
    Tok { token, id }
}

/// The token's entry in `GET /api/tokens`.
fn token_info(d: &Daemon, id: &str) -> serde_json::Value {
    d.get("/api/tokens").json()["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} is not listed"))
}

fn issue_scopes(d: &Daemon, name: &str, scopes: &[&str]) -> Tok {
    let scopes: Vec<String> = scopes.iter().map(|s| format!("\"{s}\"")).collect();
    issue(
        d,
        &format!(r#"{{"name":"{name}","scopes":[{}]}}"#, scopes.join(",")),
    )
}

fn h(d: &Daemon, token: Option<&str>) -> Vec<(String, String)> {
    let mut h = vec![("Host".to_string(), d.addr.to_string())];
    if let Some(t) = token {
        h.push(("Authorization".into(), format!("Bearer {t}")));
    }
    h
}

fn get_as(d: &Daemon, path: &str, token: Option<&str>) -> Resp {
    d.request("GET", path, &h(d, token), None)
}

fn send_as(d: &Daemon, method: &str, path: &str, token: Option<&str>, body: &str) -> Resp {
    let mut hd = h(d, token);
    hd.push(("Content-Type".into(), "application/json".into()));
    d.request(method, path, &hd, Some(body.as_bytes()))
}

fn route_body(tenant: &str) -> String {
    format!(
        r#"{{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"{tenant}"}}"#
    )
}

fn route_as(d: &Daemon, token: Option<&str>, tenant: &str) -> Resp {
    send_as(d, "POST", "/api/route", token, &route_body(tenant))
}

fn assert_401(r: &Resp) {
    r.assert_error(401, "unauthorized", None);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer"),
        "{:?}",
        r.headers
    );
}

/// A well-formed token the daemon never issued.
fn stranger_token() -> String {
    format!("hall_{}", blake3::hash(b"never issued").to_hex())
}

#[test]
fn unauthenticated_requests_get_401() {
    let d = Daemon::start();
    let bad_tokens = [
        None,
        Some(stranger_token()),
        Some("hall_short".to_string()),
        Some("not-a-hall-token".to_string()),
        Some(String::new()),
    ];
    for path in [
        "/api/route",
        "/api/status",
        "/metrics",
        "/api/audit",
        "/api/tokens",
    ] {
        for t in &bad_tokens {
            let r = if path == "/api/route" {
                route_as(&d, t.as_deref(), "org.acme")
            } else {
                get_as(&d, path, t.as_deref())
            };
            assert_401(&r);
        }
    }
    // Another auth scheme, or the token without a scheme, is not a bearer token.
    let admin = d.admin_token().unwrap();
    for value in [
        format!("Basic {admin}"),
        admin.clone(),
        format!("Bearer{admin}"),
    ] {
        let mut hd = h(&d, None);
        hd.push(("Authorization".into(), value));
        assert_401(&d.request("GET", "/api/status", &hd, None));
    }
    // The scheme is case-insensitive (RFC 7235).
    let mut hd = h(&d, None);
    hd.push(("Authorization".into(), format!("bearer {admin}")));
    assert_eq!(d.request("GET", "/api/status", &hd, None).status, 200);

    // Open endpoints need nothing.
    for path in ["/health", "/ready"] {
        let r = get_as(&d, path, None);
        assert_eq!(r.status, 200, "{path}: {}", r.body);
    }
    // 5 paths x 5 bad tokens, and 3 bad schemes.
    let m = d.get("/metrics").body;
    assert!(
        m.contains("hall_route_errors_total{code=\"unauthorized\"} 28"),
        "{m}"
    );
}

#[test]
fn revoked_token_fails_at_once() {
    let d = Daemon::start();
    let t = issue_scopes(&d, "bot", &["route"]);
    assert_eq!(route_as(&d, Some(&t.token), "org.acme").status, 200);
    let r = d.request(
        "DELETE",
        &format!("/api/tokens/{}", t.id),
        &d.default_headers(),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["revoked"], t.id.as_str());
    // The very next request is refused: no cache, no grace period.
    assert_401(&route_as(&d, Some(&t.token), "org.acme"));
    // It is gone from the list; revoking again is a 404.
    assert!(!d.get("/api/tokens").body.contains(&t.id));
    let r = d.request(
        "DELETE",
        &format!("/api/tokens/{}", t.id),
        &d.default_headers(),
        None,
    );
    r.assert_error(404, "not_found", None);
    // Still refused after a restart (the revocation is durable).
    let dir = d.into_dir();
    let d = Daemon::spawn(dir, &[], &[], true);
    assert_401(&route_as(&d, Some(&t.token), "org.acme"));
}

#[test]
fn expired_token_is_refused() {
    let d = Daemon::start();
    let asked = Instant::now();
    let t = issue(
        &d,
        r#"{"name":"brief","scopes":["route"],"expires_in_secs":1}"#,
    );
    let info = token_info(&d, &t.id);
    assert_eq!(
        info["expires_at_ms"].as_i64().unwrap() - info["created_at_ms"].as_i64().unwrap(),
        1000
    );
    // Usable until it expires (unless this machine was too slow to ask in time).
    let first = route_as(&d, Some(&t.token), "org.acme");
    if first.status != 200 {
        assert_401(&first);
        assert!(
            asked.elapsed() >= Duration::from_secs(1),
            "refused before its expiry"
        );
    }
    d.wait_until(Duration::from_secs(30), || {
        route_as(&d, Some(&t.token), "org.acme").status == 401
    });
    // The daemon cannot have expired it before a second passed since we asked for it.
    assert!(asked.elapsed() >= Duration::from_secs(1));
    assert_401(&route_as(&d, Some(&t.token), "org.acme"));

    // Expiry must be in the future; the error names the field the client sent.
    d.post_json(
        "/api/tokens",
        r#"{"name":"x","scopes":["route"],"expires_in_secs":0}"#,
    )
    .assert_error(400, "invalid_request", Some("expires_in_secs"));
}

/// A lifetime too long for the expiry's milliseconds is the far future, not a number that
/// wrapped around into the past (u64 seconds above i64::MAX were cast to negative ones).
#[test]
fn an_enormous_lifetime_means_no_practical_expiry() {
    let d = Daemon::start();
    for secs in ["9223372036854775808", "18446744073709551615"] {
        let t = issue(
            &d,
            &format!(
                r#"{{"name":"long{}","scopes":["route"],"expires_in_secs":{secs}}}"#,
                secs.len()
            ),
        );
        let info = token_info(&d, &t.id);
        assert_eq!(
            info["expires_at_ms"].as_i64(),
            Some(i64::MAX),
            "{secs}: {info}"
        );
        assert_eq!(
            route_as(&d, Some(&t.token), "org.acme").status,
            200,
            "{secs}"
        );
    }
}

#[test]
fn token_requests_are_validated() {
    let d = Daemon::start();
    let cases = [
        (r#"{"name":"x","scopes":[]}"#, "scopes"),
        (r#"{"name":"x","scopes":["root"]}"#, "scopes"),
        (r#"{"name":"","scopes":["route"]}"#, "name"),
        (
            r#"{"name":"x","scopes":["route"],"tenant_id":"../etc"}"#,
            "tenant_id",
        ),
        (
            r#"{"name":"x","scopes":["route"],"rate_limit_per_minute":0}"#,
            "rate_limit_per_minute",
        ),
        (
            r#"{"name":"x","scopes":["route"],"rate_limit_per_minute":5,"rate_burst":0}"#,
            "rate_burst",
        ),
        (r#"{"name":"x","scopes":["route"],"admin":true}"#, "body"),
        (r#"{"scopes":["route"]}"#, "body"),
    ];
    for (body, field) in cases {
        d.post_json("/api/tokens", body)
            .assert_error(400, "invalid_request", Some(field));
    }
    // Only the bootstrap admin token exists: nothing above was issued.
    assert_eq!(
        d.get("/api/tokens").json()["tokens"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn scopes_gate_each_endpoint() {
    let d = Daemon::start();
    let route = issue_scopes(&d, "router", &["route"]);
    let audit = issue_scopes(&d, "auditor", &["audit"]);
    let metrics = issue_scopes(&d, "scraper", &["metrics"]);
    let writer = issue_scopes(&d, "writer", &["secrets:write"]);
    let releaser = issue_scopes(&d, "releaser", &["secrets:release"]);
    let all = [&route, &audit, &metrics, &writer, &releaser];

    // (method, path, body, which tokens may call it)
    let secret = r#"{"value":"s3cr3t-value"}"#;
    let table: Vec<(&str, &str, Option<String>, Vec<&Tok>)> = vec![
        (
            "POST",
            "/api/route",
            Some(route_body("org.acme")),
            vec![&route],
        ),
        ("GET", "/metrics", None, vec![&metrics]),
        ("GET", "/api/audit", None, vec![&audit]),
        ("GET", "/api/audit/verify", None, vec![&audit]),
        ("POST", "/api/reload", None, vec![]),
        ("GET", "/api/tokens", None, vec![]),
        (
            "POST",
            "/api/tokens",
            Some(r#"{"name":"y","scopes":["route"]}"#.into()),
            vec![],
        ),
        ("DELETE", "/api/tokens/tok_000000000000", None, vec![]),
        ("POST", "/api/keys/rotate", None, vec![]),
        (
            "PUT",
            "/api/secrets/db.password",
            Some(secret.into()),
            vec![&writer],
        ),
        ("GET", "/api/secrets", None, vec![&writer]),
        ("DELETE", "/api/secrets/db.password", None, vec![&writer]),
    ];
    for (method, path, body, allowed) in &table {
        for t in all {
            let may = allowed.iter().any(|a| a.id == t.id);
            let r = match body {
                Some(b) => send_as(&d, method, path, Some(&t.token), b),
                None => d.request(method, path, &h(&d, Some(&t.token)), None),
            };
            if may {
                assert!(
                    (200..300).contains(&r.status),
                    "{method} {path} with {}: {} {}",
                    t.id,
                    r.status,
                    r.body
                );
            } else {
                r.assert_error(403, "forbidden", None);
                assert!(
                    r.json()["error"].as_str().unwrap().contains("scope"),
                    "{}",
                    r.body
                );
            }
        }
    }
    // Any valid token may read the status.
    for t in all {
        assert_eq!(get_as(&d, "/api/status", Some(&t.token)).status, 200);
    }
    // Admin may do everything the table lists (reload included).
    let r = d.post_json("/api/reload", "");
    assert!(r.status == 200, "{} {}", r.status, r.body);
    let m = d.get("/metrics").body;
    assert!(
        m.contains("hall_route_errors_total{code=\"forbidden\"}"),
        "{m}"
    );
}

#[test]
fn tenant_bound_token_routes_only_for_its_tenant() {
    let d = Daemon::start();
    let t = issue(
        &d,
        r#"{"name":"acme-bot","scopes":["route"],"tenant_id":"org.acme"}"#,
    );
    let r = route_as(&d, Some(&t.token), "org.acme");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["allowed"], true);
    for other in ["org.beta.eu", "org.acme.evil", "org.acm", "ORG.ACME"] {
        route_as(&d, Some(&t.token), other).assert_error(403, "tenant_mismatch", None);
    }
    // An unbound token routes for anyone.
    let free = issue_scopes(&d, "free", &["route"]);
    assert_eq!(route_as(&d, Some(&free.token), "org.beta.eu").status, 200);
    // A refused request is not a decision.
    let recs = d
        .get("/api/audit?kind=decision&tenant_id=org.beta.eu")
        .json();
    let recs = recs["records"].as_array().unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!(recs[0]["token_id"], free.id.as_str());
}

fn rate_headers(r: &Resp) -> (u32, u32, u64) {
    let n = |k: &str| -> u64 {
        r.header(k)
            .unwrap_or_else(|| panic!("{k} missing: {:?}", r.headers))
            .parse()
            .unwrap()
    };
    (
        n("x-ratelimit-limit") as u32,
        n("x-ratelimit-remaining") as u32,
        n("x-ratelimit-reset"),
    )
}

#[test]
fn rate_limited_token_gets_429_and_recovers() {
    let d = Daemon::start();
    // One request a second, bursts of two.
    let t = issue(
        &d,
        r#"{"name":"limited","scopes":["route"],"rate_limit_per_minute":60,"rate_burst":2}"#,
    );
    // An unlimited token sends no rate-limit headers.
    let r = d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme");
    assert_eq!(r.status, 200);
    assert!(r.header("x-ratelimit-limit").is_none(), "{:?}", r.headers);

    // Spend the burst; allowed answers carry the headers too. Time passes between requests
    // (refilling one every second), so go until refused rather than counting exactly.
    let mut allowed = 0;
    let refused = loop {
        let r = route_as(&d, Some(&t.token), "org.acme");
        if r.status == 429 {
            break r;
        }
        assert_eq!(r.status, 200, "{}", r.body);
        let (limit, remaining, reset) = rate_headers(&r);
        assert_eq!(limit, 2);
        assert!(remaining <= 1, "{remaining}");
        assert!((1..=2).contains(&reset), "{reset}");
        allowed += 1;
        assert!(allowed < 200, "never rate limited");
    };
    assert!(allowed >= 2, "the burst of 2 was not available");
    refused.assert_error(429, "rate_limited", None);
    let retry: u64 = refused
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert_eq!(retry, 1, "one request a second");
    let (limit, remaining, reset) = rate_headers(&refused);
    assert_eq!((limit, remaining), (2, 0));
    assert!((1..=2).contains(&reset), "{reset}");
    // A refused request was not a decision; scope and tenant were not even looked at.
    assert_eq!(route_as(&d, Some(&t.token), "org.beta.eu").status, 429);

    // After waiting Retry-After, the token works again.
    std::thread::sleep(Duration::from_secs(retry));
    let r = route_as(&d, Some(&t.token), "org.acme");
    assert_eq!(r.status, 200, "{}", r.body);
    rate_headers(&r);

    // Other tokens are not affected by this one's limit.
    assert_eq!(
        d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
            .status,
        200
    );
    let m = d.get("/metrics").body;
    assert!(
        m.contains("hall_route_errors_total{code=\"rate_limited\"}"),
        "{m}"
    );
}

#[test]
fn rebinding_hosts_are_refused() {
    let d = Daemon::start();
    let port = d.addr.port();
    let admin = d.admin_token().unwrap();
    let hostile = [
        format!("evil.example:{port}"),
        "evil.example".to_string(),
        format!("localhost.evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("127.0.0.1:{}", if port == 65535 { 1 } else { port + 1 }),
        format!("localhost:{}", if port == 1 { 2 } else { port - 1 }),
        format!("192.168.1.10:{port}"),
        format!("0.0.0.0:{port}"),
        format!("evil.example@localhost:{port}"),
    ];
    for host in &hostile {
        for (method, path) in [
            ("GET", "/health"),
            ("GET", "/api/status"),
            ("GET", "/api/tokens"),
        ] {
            let hd = vec![
                ("Host".to_string(), host.clone()),
                ("Authorization".to_string(), format!("Bearer {admin}")),
            ];
            let r = d.request(method, path, &hd, None);
            r.assert_error(403, "bad_host", None);
        }
    }
    // Loopback names with the right port (or none) pass.
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
        "localhost".to_string(),
    ] {
        let hd = vec![("Host".to_string(), host.clone())];
        assert_eq!(d.request("GET", "/health", &hd, None).status, 200, "{host}");
    }
    // A request with no Host at all is refused: HTTP/1.1 requires it (actix answers 400
    // itself), and an HTTP/1.0 request without it reaches the gate and gets bad_host.
    assert_eq!(d.request("GET", "/health", &[], None).status, 400);
    let mut s = std::net::TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(
        format!("GET /api/status HTTP/1.0\r\nAuthorization: Bearer {admin}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    common::read_response(&mut s)
        .unwrap()
        .assert_error(403, "bad_host", None);
    assert!(d
        .get("/metrics")
        .body
        .contains("hall_route_errors_total{code=\"bad_host\"}"));
}

#[test]
fn cross_site_origins_are_refused_and_no_cors_by_default() {
    let d = Daemon::start();
    let port = d.addr.port();
    for origin in [
        "https://evil.example".to_string(),
        "null".to_string(),
        format!("http://localhost:{port}"),
        format!("http://127.0.0.1:{port}"),
    ] {
        let mut hd = d.default_headers();
        hd.push(("Origin".into(), origin.clone()));
        let r = d.request("GET", "/api/status", &hd, None);
        r.assert_error(403, "bad_origin", None);
        assert!(cors_headers(&r).is_empty(), "{origin}: {:?}", r.headers);
        // Routing, even with a valid admin token, is refused from a web page.
        hd.push(("Content-Type".into(), "application/json".into()));
        let r = d.request(
            "POST",
            "/api/route",
            &hd,
            Some(route_body("org.acme").as_bytes()),
        );
        r.assert_error(403, "bad_origin", None);
        // So is a preflight.
        let r = preflight(&d, &origin);
        r.assert_error(403, "bad_origin", None);
        assert!(cors_headers(&r).is_empty(), "{:?}", r.headers);
    }
    // Without Origin (CLI, agents): fine, and no CORS header anywhere.
    for r in [
        d.get("/api/status"),
        d.get("/health"),
        get_as(&d, "/api/status", None),
    ] {
        assert!(cors_headers(&r).is_empty(), "{:?}", r.headers);
        assert!(
            r.header("vary").is_none_or(|v| !v.contains("Origin")),
            "{:?}",
            r.headers
        );
    }
}

fn cors_headers(r: &Resp) -> Vec<&(String, String)> {
    r.headers
        .iter()
        .filter(|(k, _)| k.to_ascii_lowercase().starts_with("access-control-"))
        .collect()
}

fn preflight(d: &Daemon, origin: &str) -> Resp {
    let hd = vec![
        ("Host".to_string(), d.addr.to_string()),
        ("Origin".to_string(), origin.to_string()),
        (
            "Access-Control-Request-Method".to_string(),
            "POST".to_string(),
        ),
        (
            "Access-Control-Request-Headers".to_string(),
            "authorization, content-type".to_string(),
        ),
    ];
    d.request("OPTIONS", "/api/route", &hd, None)
}

#[test]
fn cors_for_configured_origins() {
    let app = "http://app.example:3000";
    let d = Daemon::builder()
        .arg("--allowed-origin")
        .arg(app)
        .arg("--allowed-origin")
        .arg("https://ops.example")
        .start();

    // Preflight from an allowed origin: 204, no token needed.
    let r = preflight(&d, app);
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(r.header("access-control-allow-origin"), Some(app));
    let methods = r.header("access-control-allow-methods").unwrap();
    for m in ["GET", "POST", "PUT", "DELETE"] {
        assert!(methods.contains(m), "{methods}");
    }
    let headers = r
        .header("access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        headers.contains("authorization") && headers.contains("content-type"),
        "{headers}"
    );
    assert!(
        r.header("vary").is_some_and(|v| v.contains("Origin")),
        "{:?}",
        r.headers
    );
    // The origin is echoed as the browser sent it.
    let r = preflight(&d, "https://ops.example");
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://ops.example")
    );

    // The actual request from the allowed origin: answered with the CORS headers.
    let mut hd = d.default_headers();
    hd.push(("Origin".into(), app.into()));
    hd.push(("Content-Type".into(), "application/json".into()));
    let r = d.request(
        "POST",
        "/api/route",
        &hd,
        Some(route_body("org.acme").as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("access-control-allow-origin"), Some(app));
    assert!(r.header("vary").is_some_and(|v| v.contains("Origin")));
    // Refusals carry them too, so the page can read why.
    let hd = vec![
        ("Host".to_string(), d.addr.to_string()),
        ("Origin".to_string(), app.to_string()),
    ];
    let r = d.request("GET", "/api/status", &hd, None);
    assert_401(&r);
    assert_eq!(r.header("access-control-allow-origin"), Some(app));
    let mut with_token = h(&d, d.admin_token().as_deref());
    with_token.push(("Origin".into(), app.into()));
    let r = d.request("GET", "/api/nope", &with_token, None);
    assert_eq!(r.status, 404);
    assert_eq!(r.header("access-control-allow-origin"), Some(app));

    // Another origin: refused, and no Allow-Origin for it.
    for origin in [
        "https://evil.example",
        "http://app.example:3001",
        "https://app.example:3000",
        "null",
    ] {
        let r = preflight(&d, origin);
        r.assert_error(403, "bad_origin", None);
        assert!(
            r.header("access-control-allow-origin").is_none(),
            "{:?}",
            r.headers
        );
        let mut hd = d.default_headers();
        hd.push(("Origin".into(), origin.into()));
        let r = d.request("GET", "/api/status", &hd, None);
        r.assert_error(403, "bad_origin", None);
        assert!(r.header("access-control-allow-origin").is_none());
    }
    // A preflight is still subject to the Host check.
    let hd = vec![
        (
            "Host".to_string(),
            format!("evil.example:{}", d.addr.port()),
        ),
        ("Origin".to_string(), app.to_string()),
        (
            "Access-Control-Request-Method".to_string(),
            "POST".to_string(),
        ),
    ];
    d.request("OPTIONS", "/api/route", &hd, None)
        .assert_error(403, "bad_host", None);
    // Without Origin there is no Allow-Origin (only Vary, for caches).
    let r = d.get("/api/status");
    assert_eq!(r.status, 200);
    assert!(r.header("access-control-allow-origin").is_none());
    // An OPTIONS that is not a preflight is an ordinary request: it needs a token.
    let hd = vec![
        ("Host".to_string(), d.addr.to_string()),
        ("Origin".to_string(), app.to_string()),
    ];
    assert_401(&d.request("OPTIONS", "/api/route", &hd, None));
}

#[test]
fn bad_allowed_origin_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(common::HALL)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--allowed-origin",
            "http://localhost:3000/",
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .env("HALL_KEYRING", "off")
        .env_remove("HALL_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("allowed_origins") && err.contains("http://localhost:3000/"),
        "{err}"
    );
}

#[test]
fn admin_token_file_and_state_dir_are_private() {
    let d = Daemon::start();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.state_dir()), 0o700);
    let file = d.state_dir().join("admin.token");
    assert_eq!(mode(&file), 0o600);
    let admin = d.admin_token().unwrap();
    assert!(admin.starts_with("hall_") && admin.len() == 69, "{admin}");
    // A loosened file is tightened again on the next start, and the token kept.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let dir = d.into_dir();
    let d = Daemon::spawn(dir, &[], &[], true);
    assert_eq!(mode(&d.state_dir().join("admin.token")), 0o600);
    assert_eq!(d.admin_token().unwrap(), admin);
    assert_eq!(d.get("/api/tokens").status, 200);
    // The admin token is listed like any other, by id and name only.
    let list = d.get("/api/tokens");
    assert!(!list.body.contains(&admin));
    assert_eq!(list.json()["tokens"][0]["name"], "admin");
    assert_eq!(
        list.json()["tokens"][0]["scopes"],
        serde_json::json!(["admin"])
    );
}

#[test]
fn token_lifecycle_is_audited_with_token_ids() {
    let d = Daemon::start();
    let admin_id = d.get("/api/tokens").json()["tokens"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let t = issue(
        &d,
        r#"{"name":"auditee","scopes":["route","audit"],"tenant_id":"org.acme"}"#,
    );

    let issued = d.get("/api/audit?kind=token_issue").json();
    let issued = issued["records"].as_array().unwrap();
    // The bootstrap admin token is issued before the audit log writes anything over HTTP; the
    // API-issued one is recorded with the issuer's id and the new token's id and name.
    let rec = issued
        .iter()
        .find(|r| r["detail"].as_str().is_some_and(|s| s.contains(&t.id)))
        .unwrap_or_else(|| panic!("no token_issue record for {}: {issued:?}", t.id));
    assert_eq!(rec["token_id"], admin_id.as_str());
    assert_eq!(rec["tenant_id"], "org.acme");
    assert!(rec["detail"].as_str().unwrap().contains("auditee"));
    assert!(!rec.to_string().contains(&t.token));

    // A decision names the token that asked.
    let r = route_as(&d, Some(&t.token), "org.acme");
    let decision_id = r.json()["decision_id"].as_str().unwrap().to_string();
    let rec = get_as(&d, &format!("/api/audit/{decision_id}"), Some(&t.token)).json();
    assert_eq!(rec["kind"], "decision");
    assert_eq!(rec["token_id"], t.id.as_str());
    let rec = d
        .get(&format!(
            "/api/audit/{}",
            d.route("cap.doc.summarize", "dev", "PUBLIC", "org.acme")
                .json()["decision_id"]
                .as_str()
                .unwrap()
        ))
        .json();
    assert_eq!(rec["token_id"], admin_id.as_str());

    // Revocation is a record too.
    let r = d.request(
        "DELETE",
        &format!("/api/tokens/{}", t.id),
        &d.default_headers(),
        None,
    );
    assert_eq!(r.status, 200);
    let revoked = d.get("/api/audit?kind=token_revoke").json();
    let revoked = revoked["records"].as_array().unwrap();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0]["token_id"], admin_id.as_str());
    assert!(revoked[0]["detail"].as_str().unwrap().contains(&t.id));
    // A failed revoke (unknown id) is not.
    d.request(
        "DELETE",
        "/api/tokens/tok_ffffffffffff",
        &d.default_headers(),
        None,
    )
    .assert_error(404, "not_found", None);
    assert_eq!(
        d.get("/api/audit?kind=token_revoke").json()["records"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // And the chain still verifies.
    assert_eq!(d.get("/api/audit/verify").status, 200);
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_token_or_hash_in_logs_or_database() {
    let mut d = Daemon::builder().env("RUST_LOG", "trace").start();
    let admin = d.admin_token().unwrap();
    let a = issue(
        &d,
        r#"{"name":"logged","scopes":["route"],"tenant_id":"org.acme"}"#,
    );
    let b = issue(
        &d,
        r#"{"name":"limited","scopes":["route","audit"],"rate_limit_per_minute":1,"rate_burst":1}"#,
    );
    let c = issue(&d, r#"{"name":"doomed","scopes":["route"]}"#);
    let e = issue(
        &d,
        r#"{"name":"brief","scopes":["route"],"expires_in_secs":1}"#,
    );
    assert_eq!(route_as(&d, Some(&a.token), "org.acme").status, 200);
    assert_eq!(route_as(&d, Some(&a.token), "org.beta.eu").status, 403);
    assert_eq!(route_as(&d, Some(&b.token), "org.acme").status, 200);
    assert_eq!(route_as(&d, Some(&b.token), "org.acme").status, 429);
    assert_eq!(get_as(&d, "/api/tokens", Some(&a.token)).status, 403);
    assert_eq!(d.get("/api/tokens").status, 200);
    assert_eq!(
        d.request(
            "DELETE",
            &format!("/api/tokens/{}", c.id),
            &d.default_headers(),
            None
        )
        .status,
        200
    );
    assert_401(&route_as(&d, Some(&c.token), "org.acme"));
    let stranger = stranger_token();
    assert_401(&route_as(&d, Some(&stranger), "org.acme"));
    d.wait_until(Duration::from_secs(30), || {
        route_as(&d, Some(&e.token), "org.acme").status == 401
    });
    // Bad Host and bad Origin with a token attached.
    let mut hd = vec![
        ("Host".to_string(), "evil.example".to_string()),
        ("Authorization".to_string(), format!("Bearer {}", a.token)),
    ];
    assert_eq!(d.request("GET", "/api/status", &hd, None).status, 403);
    hd[0].1 = d.addr.to_string();
    hd.push(("Origin".into(), "https://evil.example".into()));
    assert_eq!(d.request("GET", "/api/status", &hd, None).status, 403);
    // The CLI, too, with a token in its environment.
    let out = cli(&d, &["status"], Some(&b.token));
    assert!(!out.status.success(), "b's bucket is empty");
    assert!(String::from_utf8_lossy(&out.stderr).contains("429"));
    assert_eq!(d.stop().code(), Some(0));

    let logs = d.logs();
    assert!(
        logs.contains("TRACE") || logs.contains("trace"),
        "RUST_LOG=trace took effect"
    );
    assert!(
        logs.contains(&a.id) && logs.contains(&c.id),
        "token ids are logged (that is fine)"
    );
    let secrets = [&admin, &a.token, &b.token, &c.token, &e.token, &stranger];
    for t in secrets {
        let hash = blake3::hash(t.as_bytes()).to_hex().to_string();
        for needle in [t.as_str(), &t[5..], &hash] {
            assert!(!logs.contains(needle), "{needle} appears in the logs");
        }
    }
    // sled holds only hashes: no plaintext token in any state file (admin.token aside).
    for f in files_under(&d.state_dir()) {
        if f.file_name().is_some_and(|n| n == "admin.token") {
            continue;
        }
        let bytes = std::fs::read(&f).unwrap();
        for t in secrets {
            assert!(
                !contains(&bytes, t.as_bytes()),
                "{} holds a token",
                f.display()
            );
            assert!(
                !contains(&bytes, &t.as_bytes()[5..]),
                "{} holds a token body",
                f.display()
            );
        }
    }
}

fn cli(d: &Daemon, args: &[&str], token: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(common::HALL);
    cmd.args(args)
        .env("HALL_URL", format!("http://{}", d.addr))
        .env("HALL_STATE_DIR", d.state_dir())
        .env_remove("HALL_CONFIG")
        .env_remove("HALL_TOKEN")
        .env("NO_COLOR", "1");
    if let Some(t) = token {
        cmd.env("HALL_TOKEN", t);
    }
    cmd.output().unwrap()
}

#[test]
fn cli_token_create_list_revoke() {
    let d = Daemon::start();
    let out = cli(
        &d,
        &[
            "token",
            "create",
            "--name",
            "cli-bot",
            "--scope",
            "route,audit",
            "--tenant",
            "org.acme",
            "--expires-in",
            "3600",
            "--rate-limit",
            "600",
        ],
        None,
    );
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("only once"), "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let token = v["token"].as_str().unwrap().to_string();
    let id = v["info"]["id"].as_str().unwrap().to_string();
    assert_eq!(stdout.matches(&token).count(), 1, "printed once");
    assert_eq!(v["info"]["scopes"], serde_json::json!(["route", "audit"]));
    assert_eq!(v["info"]["tenant_id"], "org.acme");
    assert_eq!(v["info"]["rate_limit"]["per_minute"], 600);
    assert!(
        v["info"]["expires_at_ms"].as_i64().unwrap() > v["info"]["created_at_ms"].as_i64().unwrap()
    );

    // The token works, within its tenant and scopes.
    let r = route_as(&d, Some(&token), "org.acme");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-ratelimit-limit"), Some("600"));
    route_as(&d, Some(&token), "org.beta.eu").assert_error(403, "tenant_mismatch", None);

    // The CLI with that token: it may route but not list tokens.
    let out = cli(&d, &["token", "list"], Some(&token));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("403") && err.contains("forbidden"), "{err}");

    // List (admin token from the state dir): metadata, never the token or its hash.
    let out = cli(&d, &["token", "list"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        listing.contains(&id) && listing.contains("cli-bot"),
        "{listing}"
    );
    assert!(
        !listing.contains(&token) && !listing.contains(&token[5..]),
        "{listing}"
    );
    assert!(!listing.contains(blake3::hash(token.as_bytes()).to_hex().as_str()));
    let admin = d.admin_token().unwrap();
    assert!(!listing.contains(&admin));
    let tokens: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(tokens["tokens"].as_array().unwrap().len(), 2);
    assert!(tokens.to_string().find("\"token\"").is_none());

    // Revoke: effective at once.
    let out = cli(&d, &["token", "revoke", &id], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_401(&route_as(&d, Some(&token), "org.acme"));
    let out = cli(&d, &["token", "list"], None);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&id));
    // Revoking it again fails clearly.
    let out = cli(&d, &["token", "revoke", &id], None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404") && err.contains("no token with this id"),
        "{err}"
    );

    // A bad scope is refused before anything is sent: a usage error naming the scopes.
    let out = cli(
        &d,
        &["token", "create", "--name", "x", "--scope", "root"],
        None,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown scope \"root\"") && err.contains("route"),
        "{err}"
    );
    // A revoked token in HALL_TOKEN is a clear 401.
    let out = cli(&d, &["status"], Some(&token));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

#[test]
fn tenant_bound_token_releases_only_for_its_tenant() {
    let d = Daemon::start();
    let value = "sk-test-4f1e9a";
    let r = d.request(
        "PUT",
        "/api/secrets/openai_api_key",
        &[
            d.default_headers(),
            vec![("Content-Type".into(), "application/json".into())],
        ]
        .concat(),
        Some(format!(r#"{{"value":"{value}"}}"#).as_bytes()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let acme = issue(
        &d,
        r#"{"name":"acme","scopes":["route","secrets:release"],"tenant_id":"org.acme"}"#,
    );
    let beta = issue(
        &d,
        r#"{"name":"beta","scopes":["route","secrets:release"],"tenant_id":"org.beta.eu"}"#,
    );
    let unbound = issue_scopes(&d, "unbound", &["route", "secrets:release"]);
    let router = issue(
        &d,
        r#"{"name":"router","scopes":["route"],"tenant_id":"org.acme"}"#,
    );

    let dec = route_as(&d, Some(&acme.token), "org.acme").json();
    assert_eq!(dec["worker_id"], "worker.doc.summarize");
    let did = dec["decision_id"].as_str().unwrap().to_string();
    let release = |t: &Tok| {
        send_as(
            &d,
            "POST",
            "/api/secrets/openai_api_key/release",
            Some(&t.token),
            &format!(r#"{{"decision_id":"{did}"}}"#),
        )
    };
    // Another tenant's token, and an unbound non-admin one, are refused.
    release(&beta).assert_error(403, "tenant_mismatch", None);
    release(&unbound).assert_error(403, "tenant_mismatch", None);
    // A token of the right tenant without the scope: forbidden.
    release(&router).assert_error(403, "forbidden", None);
    // The decision's own tenant gets the value.
    let r = release(&acme);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["value"], value);

    // Each refusal and the release are audited under the token that asked.
    let refusals = d.get("/api/audit?kind=secret_refusal").json();
    let ids: Vec<&str> = refusals["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["token_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [beta.id.as_str(), unbound.id.as_str(), router.id.as_str()]
    );
    let released = d.get("/api/audit?kind=secret_release").json();
    assert_eq!(released["records"][0]["token_id"], acme.id.as_str());
    assert_eq!(released["records"][0]["decision_id"], did.as_str());
    assert!(
        !d.get("/api/audit").body.contains(value),
        "the value is never audited"
    );
}

#[test]
fn a_lost_admin_token_file_gets_a_new_token_and_the_old_one_stops_working() {
    let d = Daemon::start();
    let old = d.admin_token().unwrap();
    let dir = d.into_dir();
    std::fs::remove_file(dir.path().join("state/admin.token")).unwrap();
    let d = Daemon::spawn(dir, &[], &[], true);
    let new = d.admin_token().expect("a new admin token file");
    assert_ne!(new, old);
    assert_eq!(d.get("/api/tokens").status, 200);
    let with_old = vec![
        ("Host".to_string(), d.addr.to_string()),
        ("Authorization".to_string(), format!("Bearer {old}")),
    ];
    assert_401(&d.request("GET", "/api/tokens", &with_old, None));
    // Both the issue and the revoke are in the audit log.
    let records = d.get("/api/audit?limit=100").json()["records"].clone();
    let details: Vec<String> = records
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["detail"].as_str().map(str::to_string))
        .collect();
    assert!(
        details
            .iter()
            .any(|x| x.starts_with("revoked tok_") && x.ends_with("(replaced admin token file)")),
        "{details:?}"
    );
    assert_eq!(
        details
            .iter()
            .filter(|x| x.starts_with("issued tok_"))
            .count(),
        2,
        "{details:?}"
    );
}

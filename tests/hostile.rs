//! End-to-end: a hostile client with a low-scope token on the same machine.
//!
//! - The path corpus: every endpoint × every scope × odd spellings of its path
//!   (percent-encoded letters in each segment, `%2F`, `//`, dot segments, a trailing slash,
//!   case, `;params`). A token that lacks an endpoint's scope never reaches its handler,
//!   however the path is spelled; a spelling the router does not match is a JSON 404.
//! - The tenant-isolation matrix: audit queries, single records, verify, secrets and tokens
//!   for tokens bound to one tenant.
//! - Bounded input: what reaches the audit log is bounded and free of control/bidi
//!   characters, and `context` is recorded byte-exact.
//! - Host checks for absolute-form targets and duplicate Host headers.

mod common;

use common::{Daemon, Resp};
use serde_json::Value;

struct Tok {
    token: String,
}

fn issue(d: &Daemon, name: &str, scopes: &[&str], tenant: Option<&str>) -> Tok {
    let scopes: Vec<String> = scopes.iter().map(|s| format!("\"{s}\"")).collect();
    let tenant = tenant
        .map(|t| format!(r#","tenant_id":"{t}""#))
        .unwrap_or_default();
    let r = d.post_json(
        "/api/tokens",
        &format!(
            r#"{{"name":"{name}","scopes":[{}]{tenant}}}"#,
            scopes.join(",")
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    Tok {
        token: r.json()["token"].as_str().unwrap().to_string(),
    }
}

fn send(d: &Daemon, token: Option<&str>, method: &str, path: &str, body: Option<&str>) -> Resp {
    let mut h = vec![("Host".to_string(), d.addr.to_string())];
    if let Some(t) = token {
        h.push(("Authorization".into(), format!("Bearer {t}")));
    }
    if body.is_some() {
        h.push(("Content-Type".into(), "application/json".into()));
    }
    d.request(method, path, &h, body.map(str::as_bytes))
}

/// One endpoint of the API: how to call it harmlessly, and the scope it needs
/// (`None`: any valid token; `"a|b"`: either scope).
struct Endpoint {
    method: &'static str,
    path: &'static str,
    scope: Option<&'static str>,
    body: Option<&'static str>,
}

const UNKNOWN_DECISION: &str = "01234567-89ab-7def-8123-456789abcdef";

fn endpoints() -> Vec<Endpoint> {
    let e = |method, path, scope, body| Endpoint {
        method,
        path,
        scope,
        body,
    };
    vec![
        e("GET", "/metrics", Some("metrics"), None),
        e("GET", "/api/status", None, None),
        e("POST", "/api/reload", Some("admin"), None),
        e(
            "POST",
            "/api/route",
            Some("route"),
            Some(
                r#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#,
            ),
        ),
        e("GET", "/api/registry/capabilities", None, None),
        e("GET", "/api/registry/workers", None, None),
        e("GET", "/api/audit", Some("audit"), None),
        e("GET", "/api/audit/verify", Some("audit"), None),
        e(
            "GET",
            "/api/audit/01234567-89ab-7def-8123-456789abcdef",
            Some("audit"),
            None,
        ),
        // Invalid bodies: an admitted caller gets the handler's 400, nothing is created.
        e("POST", "/api/tokens", Some("admin"), Some("{}")),
        e("GET", "/api/tokens", Some("admin"), None),
        e("DELETE", "/api/tokens/tok_nonexistent", Some("admin"), None),
        e("POST", "/api/keys/rotate", Some("admin"), None),
        e("GET", "/api/secrets", Some("secrets:write"), None),
        e(
            "PUT",
            "/api/secrets/probe",
            Some("secrets:write"),
            Some("{}"),
        ),
        e("DELETE", "/api/secrets/probe", Some("secrets:write"), None),
        e(
            "POST",
            "/api/secrets/probe/release",
            Some("secrets:release"),
            Some(r#"{"decision_id":"01234567-89ab-7def-8123-456789abcdef"}"#),
        ),
        e("GET", "/api/events?types=nope", Some("audit"), None),
        e("GET", "/api/approvals", Some("approve"), None),
        e(
            "GET",
            "/api/approvals/apr_probe",
            Some("route|approve"),
            None,
        ),
        e(
            "POST",
            "/api/approvals/apr_probe/approve",
            Some("approve"),
            None,
        ),
        e(
            "POST",
            "/api/approvals/apr_probe/deny",
            Some("approve"),
            None,
        ),
        e(
            "POST",
            "/api/approvals/apr_probe/cancel",
            Some("route|approve"),
            None,
        ),
        e(
            "POST",
            "/mcp",
            Some("route"),
            Some(r#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#),
        ),
    ]
}

/// Odd spellings of `path`: each must either reach the same endpoint (and so the same check)
/// or no endpoint at all.
fn variants(path: &str) -> Vec<String> {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let join = |s: &[String]| format!("/{}", s.join("/"));
    let owned: Vec<String> = segs.iter().map(|s| s.to_string()).collect();
    let mut out = vec![path.to_string()];
    for i in 0..segs.len() {
        // The first letter of segment i percent-encoded, lower and upper hex.
        let mut s = owned.clone();
        if let Some(c) = s[i].chars().next() {
            s[i] = format!("%{:02x}{}", c as u32, &s[i][c.len_utf8()..]);
            out.push(join(&s));
            s[i] = format!("%{:02X}{}", c as u32, &owned[i][c.len_utf8()..]);
            out.push(join(&s));
        }
        // Every byte of segment i encoded.
        let mut s = owned.clone();
        s[i] = owned[i].bytes().map(|b| format!("%{b:02X}")).collect();
        out.push(join(&s));
        // Upper case.
        let mut s = owned.clone();
        s[i] = owned[i].to_uppercase();
        out.push(join(&s));
        // `;params` on the segment.
        let mut s = owned.clone();
        s[i] = format!("{};x=1", owned[i]);
        out.push(join(&s));
    }
    for i in 1..segs.len() {
        // `%2F` (and `%2f`) instead of the slash before segment i; `//` there.
        for sep in ["%2F", "%2f", "//"] {
            out.push(format!(
                "/{}{}{}",
                owned[..i].join("/"),
                sep,
                owned[i..].join("/")
            ));
        }
        // Dot segments before segment i.
        let (a, b) = (owned[..i].join("/"), owned[i..].join("/"));
        out.push(format!("/{a}/./{b}"));
        out.push(format!("/{a}/x/../{b}"));
        out.push(format!("/{a}/%2e/{b}"));
        out.push(format!("/{a}/x/%2e%2e/{b}"));
    }
    out.push(format!("/{}", path));
    out.push(format!("/./{}", path.trim_start_matches('/')));
    out.push(format!("{path}/"));
    out.push(format!("{path}?x=1"));
    out.push(format!("{path}%00"));
    out
}

/// Whether the response came from the endpoint's handler (as opposed to the scope check or
/// the router's "no such endpoint").
fn reached(r: &Resp) -> bool {
    let body: Value = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    let code = body["code"].as_str().unwrap_or("");
    let not_routed = (r.status == 404 && body["error"] == "no such endpoint")
        || (r.status == 405 && code == "method_not_allowed");
    let refused = matches!((r.status, code), (401, "unauthorized") | (403, "forbidden"));
    !(not_routed || refused)
}

#[test]
fn no_token_reaches_an_endpoint_without_its_scope_by_any_spelling_of_the_path() {
    let d = Daemon::start();
    let admin = d.admin_token().unwrap();
    let scopes = [
        "route",
        "audit",
        "metrics",
        "secrets:write",
        "secrets:release",
        "approve",
    ];
    let tokens: Vec<(&str, String)> = scopes
        .iter()
        .map(|s| (*s, issue(&d, &format!("t-{s}"), &[s], None).token))
        .collect();

    let mut checked = 0usize;
    let mut routed_variants = 0usize;
    for ep in endpoints() {
        for path in variants(ep.path) {
            // No token and a wrong token: never past the gate.
            for bad in [None, Some("hall_not-a-real-token")] {
                let r = send(&d, bad, ep.method, &path, ep.body);
                assert!(
                    !reached(&r) || ep.path == "/health",
                    "{} {path} without a valid token reached the handler: {} {}",
                    ep.method,
                    r.status,
                    r.body
                );
                checked += 1;
            }
            for (scope, tok) in &tokens {
                let r = send(&d, Some(tok), ep.method, &path, ep.body);
                let has = ep
                    .scope
                    .is_none_or(|need| need.split('|').any(|n| n == *scope));
                if !has {
                    assert!(
                        !reached(&r),
                        "{} {path} with a {scope} token reached an endpoint needing {:?}: {} {}",
                        ep.method,
                        ep.scope,
                        r.status,
                        r.body
                    );
                    if r.status == 403 {
                        routed_variants += 1;
                    }
                }
                checked += 1;
            }
        }
        // With the scope, the canonical path and an encoded spelling both reach the handler:
        // the check guards what the router matched, not a string.
        let tok = match ep.scope {
            Some("admin") | None => admin.clone(),
            Some(s) => {
                let first = s.split('|').next().unwrap();
                tokens.iter().find(|(n, _)| *n == first).unwrap().1.clone()
            }
        };
        if ep.path == "/api/keys/rotate" {
            continue; // rotating the key once per spelling is not harmless enough
        }
        for path in [ep.path.to_string(), variants(ep.path)[1].clone()] {
            let r = send(&d, Some(&tok), ep.method, &path, ep.body);
            assert!(
                reached(&r),
                "{} {path} with its scope did not reach the handler: {} {}",
                ep.method,
                r.status,
                r.body
            );
        }
    }
    assert!(checked > 2000, "{checked}");
    // Many spellings do reach an endpoint (and are refused there): the corpus is not only
    // testing the 404 path.
    assert!(routed_variants > 200, "{routed_variants}");
}

#[test]
fn the_encoded_path_that_minted_an_admin_token_is_refused() {
    let d = Daemon::start();
    let metrics = issue(&d, "m", &["metrics"], None);
    for path in [
        "/api/%74okens",
        "/%61pi/tokens",
        "/api/TOKENS",
        "/api/tokens/",
    ] {
        let r = send(
            &d,
            Some(&metrics.token),
            "POST",
            path,
            Some(r#"{"name":"x","scopes":["admin"]}"#),
        );
        assert!(
            r.status == 403 || r.status == 404,
            "{path}: {} {}",
            r.status,
            r.body
        );
        assert!(
            r.body.contains("\"code\""),
            "{path}: JSON error expected: {}",
            r.body
        );
    }
    // Only the bootstrap admin and the metrics token exist.
    let list = d.get("/api/tokens").json();
    assert_eq!(list["tokens"].as_array().unwrap().len(), 2, "{list}");
    // /api/%72oute without the route scope.
    let r = send(
        &d,
        Some(&metrics.token),
        "POST",
        "/api/%72oute",
        Some(
            r#"{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme"}"#,
        ),
    );
    r.assert_error(403, "forbidden", None);
    // /metric%73 is /metrics: a metrics token gets it, a route token does not.
    assert_eq!(
        send(&d, Some(&metrics.token), "GET", "/metric%73", None).status,
        200
    );
}

fn decision(d: &Daemon, tenant: &str) -> String {
    let r = d.route("cap.doc.summarize", "dev", "PUBLIC", tenant);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["decision_id"].as_str().unwrap().to_string()
}

#[test]
fn a_tenant_bound_audit_token_sees_only_its_tenant() {
    let d = Daemon::start();
    let acme_id = decision(&d, "org.acme");
    let beta_id = decision(&d, "org.beta");
    let acme = issue(&d, "acme-audit", &["audit"], Some("org.acme"));

    // No filter: its tenant only, and not nothing.
    let r = send(&d, Some(&acme.token), "GET", "/api/audit", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let recs = r.json()["records"].as_array().unwrap().clone();
    assert!(!recs.is_empty());
    assert!(
        recs.iter().all(|x| x["tenant_id"] == "org.acme"),
        "{recs:?}"
    );
    assert!(recs.iter().any(|x| x["decision_id"] == acme_id.as_str()));
    // Its own tenant by name: fine. Another tenant by name, or encoded: refused.
    let own = send(
        &d,
        Some(&acme.token),
        "GET",
        "/api/audit?tenant_id=org.acme",
        None,
    );
    assert_eq!(own.status, 200);
    for q in [
        "tenant_id=org.beta",
        "tenant_id=org%2Ebeta",
        "tail=5&tenant_id=org.beta",
    ] {
        send(
            &d,
            Some(&acme.token),
            "GET",
            &format!("/api/audit?{q}"),
            None,
        )
        .assert_error(403, "tenant_mismatch", None);
    }
    // Filters that would reach other tenants' records still see only its own.
    let r = send(
        &d,
        Some(&acme.token),
        "GET",
        "/api/audit?capability_id=cap.doc.summarize",
        None,
    );
    let recs = r.json()["records"].as_array().unwrap().clone();
    assert!(
        recs.iter().all(|x| x["tenant_id"] == "org.acme"),
        "{recs:?}"
    );
    // One record: its own yes, another tenant's no.
    assert_eq!(
        send(
            &d,
            Some(&acme.token),
            "GET",
            &format!("/api/audit/{acme_id}"),
            None
        )
        .status,
        200
    );
    send(
        &d,
        Some(&acme.token),
        "GET",
        &format!("/api/audit/{beta_id}"),
        None,
    )
    .assert_error(403, "tenant_mismatch", None);
    // verify walks every tenant's records.
    send(&d, Some(&acme.token), "GET", "/api/audit/verify", None).assert_error(
        403,
        "tenant_mismatch",
        None,
    );
    // Neither status nor metrics count other tenants' traffic for a bound token.
    let bound_metrics = issue(&d, "acme-metrics", &["metrics"], Some("org.acme"));
    send(&d, Some(&bound_metrics.token), "GET", "/metrics", None).assert_error(
        403,
        "tenant_mismatch",
        None,
    );
    let st = send(&d, Some(&acme.token), "GET", "/api/status", None).json();
    assert_eq!(st["audit"], Value::Null, "{st}");
    assert_eq!(st["decisions"], Value::Null, "{st}");
    assert!(st["policy_version"].is_string(), "{st}");
    assert!(d.get("/api/status").json()["audit"]["seq"].is_u64());
    // An unbound audit token sees both.
    let all = issue(&d, "all-audit", &["audit"], None);
    let r = send(
        &d,
        Some(&all.token),
        "GET",
        "/api/audit?capability_id=cap.doc.summarize",
        None,
    );
    let tenants: std::collections::BTreeSet<String> = r.json()["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["tenant_id"].as_str().map(str::to_string))
        .collect();
    assert!(
        tenants.contains("org.acme") && tenants.contains("org.beta"),
        "{tenants:?}"
    );
}

fn put_secret(d: &Daemon, token: &str, name: &str, value: &str) -> Resp {
    send(
        d,
        Some(token),
        "PUT",
        &format!("/api/secrets/{name}"),
        Some(&format!(r#"{{"value":"{value}"}}"#)),
    )
}

fn secret_names(d: &Daemon, token: &str) -> Vec<String> {
    let r = send(d, Some(token), "GET", "/api/secrets", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

fn release(d: &Daemon, token: &str, name: &str, decision_id: &str) -> Resp {
    send(
        d,
        Some(token),
        "POST",
        &format!("/api/secrets/{name}/release"),
        Some(&format!(r#"{{"decision_id":"{decision_id}"}}"#)),
    )
}

#[test]
fn secrets_belong_to_the_tenant_that_wrote_them() {
    // The summarize worker may be given both secrets.
    let d = Daemon::builder()
        .setup(|p| {
            let f = p.join("registry").join("workers.toml");
            let text = std::fs::read_to_string(&f).unwrap();
            let text = text.replacen(
                r#"secrets = ["openai_api_key"]"#,
                r#"secrets = ["openai_api_key", "beta_key"]"#,
                1,
            );
            assert!(
                text.contains("beta_key"),
                "the example worker lists openai_api_key"
            );
            std::fs::write(f, text).unwrap();
        })
        .start();
    let admin = d.admin_token().unwrap();
    assert_eq!(
        put_secret(&d, &admin, "openai_api_key", "operator-value").status,
        200
    );
    let beta_w = issue(&d, "beta-w", &["secrets:write"], Some("org.beta.eu"));
    let acme_w = issue(&d, "acme-w", &["secrets:write"], Some("org.acme"));

    // A bound writer cannot replace or delete an unowned secret, and does not see it.
    put_secret(&d, &beta_w.token, "openai_api_key", "attacker").assert_error(
        403,
        "tenant_mismatch",
        None,
    );
    send(
        &d,
        Some(&beta_w.token),
        "DELETE",
        "/api/secrets/openai_api_key",
        None,
    )
    .assert_error(403, "tenant_mismatch", None);
    assert!(secret_names(&d, &beta_w.token).is_empty());
    // Its own secret: owned by its tenant, listed to it, invisible to the other tenant.
    let r = put_secret(&d, &beta_w.token, "beta_key", "beta-value");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["tenant_id"], "org.beta.eu");
    assert_eq!(secret_names(&d, &beta_w.token), ["beta_key"]);
    assert!(secret_names(&d, &acme_w.token).is_empty());
    put_secret(&d, &acme_w.token, "beta_key", "x").assert_error(403, "tenant_mismatch", None);
    // The operator (unbound) sees and may replace everything, and says who owns what it
    // writes: without tenant_id its value is unowned (a tenant that grabbed a name first
    // does not capture the operator's value), with it the named tenant owns it.
    assert_eq!(secret_names(&d, &admin), ["beta_key", "openai_api_key"]);
    let r = put_secret(&d, &acme_w.token, "github_token", "squatted");
    assert_eq!(r.json()["tenant_id"], "org.acme", "{}", r.body);
    let r = put_secret(&d, &admin, "github_token", "REAL");
    assert_eq!(r.json()["tenant_id"], Value::Null, "{}", r.body);
    assert!(secret_names(&d, &acme_w.token).is_empty());
    let r = send(
        &d,
        Some(&admin),
        "PUT",
        "/api/secrets/beta_key",
        Some(r#"{"value":"beta-value-2","tenant_id":"org.beta.eu"}"#),
    );
    assert_eq!(r.json()["tenant_id"], "org.beta.eu", "{}", r.body);
    // A bound writer cannot give its secret to another tenant.
    send(
        &d,
        Some(&acme_w.token),
        "PUT",
        "/api/secrets/acme_key",
        Some(r#"{"value":"v","tenant_id":"org.beta.eu"}"#),
    )
    .assert_error(403, "tenant_mismatch", None);
    // Changes are recorded under the secret's owner, whoever made them.
    let rec = &d.get("/api/audit?kind=secret_store&tail=1").json()["records"][0];
    assert_eq!(rec["tenant_id"], "org.beta.eu", "{rec}");

    // Release: an owned secret serves its tenant's decisions only.
    let acme_rel = issue(&d, "acme-rel", &["secrets:release"], Some("org.acme"));
    let beta_rel = issue(&d, "beta-rel", &["secrets:release"], Some("org.beta.eu"));
    let acme_dec = decision(&d, "org.acme");
    let beta_dec = decision(&d, "org.beta.eu");
    let r = release(&d, &acme_rel.token, "openai_api_key", &acme_dec);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["value"], "operator-value");
    release(&d, &acme_rel.token, "beta_key", &acme_dec).assert_error(403, "tenant_mismatch", None);
    let r = release(&d, &beta_rel.token, "beta_key", &beta_dec);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["value"], "beta-value-2");
}

#[test]
fn a_tenant_bound_admin_stays_in_its_tenant() {
    let d = Daemon::start();
    let acme_admin = issue(&d, "acme-admin", &["admin"], Some("org.acme"));
    let beta = issue(&d, "beta-route", &["route"], Some("org.beta"));
    let _ = beta;
    // No tenant given: bound to its own. Another tenant, or none: refused.
    let r = send(
        &d,
        Some(&acme_admin.token),
        "POST",
        "/api/tokens",
        Some(r#"{"name":"child","scopes":["admin"]}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["info"]["tenant_id"], "org.acme");
    send(
        &d,
        Some(&acme_admin.token),
        "POST",
        "/api/tokens",
        Some(r#"{"name":"x","scopes":["route"],"tenant_id":"org.beta"}"#),
    )
    .assert_error(403, "tenant_mismatch", None);
    // Lists its tenant's tokens only; cannot revoke another tenant's.
    let r = send(&d, Some(&acme_admin.token), "GET", "/api/tokens", None);
    let list = r.json()["tokens"].as_array().unwrap().clone();
    assert!(
        list.iter().all(|t| t["tenant_id"] == "org.acme"),
        "{list:?}"
    );
    let all = d.get("/api/tokens").json();
    let beta_id = all["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "beta-route")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    send(
        &d,
        Some(&acme_admin.token),
        "DELETE",
        &format!("/api/tokens/{beta_id}"),
        None,
    )
    .assert_error(404, "not_found", None);
    // Revoking its own tenant's token works, and the record is that tenant's.
    let child_id = list.iter().find(|t| t["name"] == "child").unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = send(
        &d,
        Some(&acme_admin.token),
        "DELETE",
        &format!("/api/tokens/{child_id}"),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let rec = &d.get("/api/audit?kind=token_revoke&tail=1").json()["records"][0];
    assert_eq!(rec["tenant_id"], "org.acme", "{rec}");
    // The master key covers every tenant.
    send(
        &d,
        Some(&acme_admin.token),
        "POST",
        "/api/keys/rotate",
        None,
    )
    .assert_error(403, "tenant_mismatch", None);
}

fn audit_count(d: &Daemon) -> u64 {
    d.get("/api/audit/verify").json()["entries"]
        .as_u64()
        .unwrap()
}

#[test]
fn refusals_record_no_unbounded_input() {
    let d = Daemon::start();
    let metrics = issue(&d, "m", &["metrics"], None);
    let releaser = issue(&d, "r", &["secrets:release"], Some("org.acme"));
    let huge = "a".repeat(60_000);
    // With the scope, malformed input is a 400 and nothing is recorded.
    let before = audit_count(&d);
    release(&d, &releaser.token, "openai_api_key", &huge).assert_error(
        400,
        "invalid_request",
        Some("decision_id"),
    );
    release(&d, &releaser.token, &"n".repeat(300), UNKNOWN_DECISION).assert_error(
        400,
        "invalid_request",
        Some("name"),
    );
    assert_eq!(
        audit_count(&d),
        before,
        "a malformed release must not be recorded"
    );
    // Without the scope: refused and recorded, but the record keeps only well-formed parts.
    for _ in 0..20 {
        release(&d, &metrics.token, &"n".repeat(3000), &huge).assert_error(403, "forbidden", None);
    }
    assert_eq!(audit_count(&d), before + 20);
    let tail = d.get("/api/audit?tail=20").json();
    for rec in tail["records"].as_array().unwrap() {
        assert_eq!(rec["kind"], "secret_refusal");
        assert_eq!(rec["decision_id"], Value::Null, "{rec}");
        assert_eq!(rec["detail"], Value::Null, "{rec}");
        assert!(rec.to_string().len() < 2_000, "{rec}");
    }
    // A well-formed refusal names the secret and the decision.
    release(&d, &metrics.token, "openai_api_key", UNKNOWN_DECISION).assert_error(
        403,
        "forbidden",
        None,
    );
    let rec = &d.get("/api/audit?tail=1").json()["records"][0];
    assert_eq!(rec["decision_id"], UNKNOWN_DECISION, "{rec}");
    assert_eq!(rec["detail"], "openai_api_key", "{rec}");
}

#[test]
fn control_and_bidi_characters_are_refused_in_recorded_fields() {
    let d = Daemon::start();
    let base = r#""capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme""#;
    for field in ["correlation_id", "tenant_risk", "qos_class"] {
        for bad in [
            "\\u202Eevil",
            "a\\u0000b",
            "x\\u200By",
            "\\u2066x",
            "a\\nb",
            "\\u001b[31m",
            "a\\u2028b",
            "soft\\u00ADhyphen",
            "\\udb40\\udc41tag",
        ] {
            let r = d.post_json("/api/route", &format!(r#"{{{base},"{field}":"{bad}"}}"#));
            r.assert_error(400, "invalid_request", Some(field));
        }
        let long = "x".repeat(200);
        d.post_json("/api/route", &format!(r#"{{{base},"{field}":"{long}"}}"#))
            .assert_error(400, "invalid_request", Some(field));
        let ok = d.post_json("/api/route", &format!(r#"{{{base},"{field}":"Zürich-1"}}"#));
        assert_eq!(ok.status, 200, "{field}: {}", ok.body);
    }
    let r = d.post_json(
        "/api/tokens",
        r#"{"name":"ad\u202Emin","scopes":["route"]}"#,
    );
    r.assert_error(400, "invalid_request", Some("name"));
}

#[test]
fn context_is_recorded_exactly_as_sent() {
    let d = Daemon::start();
    let deep = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    let contexts = [
        r#"{"big":123456789012345678901234567890,"f":0.1000000000000000055511151231257827}"#
            .to_string(),
        format!(r#"{{"deep":{deep}}}"#),
        r#"{"s":"tab\there","u":"\u00e9", "spaced" : [1, 2.50, -0.0]}"#.to_string(),
        r#"{"a":1,"a":2}"#.to_string(),
    ];
    for ctx in contexts {
        let r = d.post_json(
            "/api/route",
            &format!(
                r#"{{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme","context":{ctx}}}"#
            ),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        let id = r.json()["decision_id"].as_str().unwrap().to_string();
        let rec = d.get(&format!("/api/audit/{id}"));
        assert_eq!(rec.status, 200);
        assert!(
            rec.body.contains(&format!(r#""context":{ctx}"#)),
            "context not recorded byte-exact: sent {ctx}\nrecord {}",
            rec.body
        );
    }
    // What cannot be recorded as sent (every reader must parse it) is refused, never mangled:
    // a number beyond f64, a lone surrogate, nesting past 128.
    let too_deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
    for ctx in [
        r#"{"n":1e999}"#.to_string(),
        r#"{"a":"\udead"}"#.to_string(),
        format!(r#"{{"deep":{too_deep}}}"#),
    ] {
        d.post_json(
            "/api/route",
            &format!(
                r#"{{"capability_id":"cap.doc.summarize","env":"dev","data_label":"PUBLIC","tenant_id":"org.acme","context":{ctx}}}"#
            ),
        )
        .assert_error(400, "invalid_request", Some("context"));
    }
    // And the audit pages that hold such records still serve (they once panicked).
    let page = d.get("/api/audit?limit=100&after_seq=0");
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("123456789012345678901234567890"));
}

#[test]
fn absolute_form_targets_and_duplicate_hosts_are_checked_like_host() {
    let d = Daemon::start();
    let auth = (
        "Authorization".to_string(),
        format!("Bearer {}", d.admin_token().unwrap()),
    );
    let host = ("Host".to_string(), d.addr.to_string());
    let port = d.addr.port();
    let evil = format!("http://evil.example:{port}/api/status");
    d.request("GET", &evil, &[host.clone(), auth.clone()], None)
        .assert_error(403, "bad_host", None);
    let good = format!("http://{}/api/status", d.addr);
    assert_eq!(
        d.request("GET", &good, &[host.clone(), auth.clone()], None)
            .status,
        200
    );
    // Two Host headers: refused (actix's parser answers 400 before any handler; the gate
    // would answer 403 bad_host), never served.
    let evil_host = ("Host".to_string(), format!("evil.example:{port}"));
    let r = d.request(
        "GET",
        "/api/status",
        &[host.clone(), evil_host, auth.clone()],
        None,
    );
    assert!(
        r.status == 400 || r.status == 403,
        "{} {}",
        r.status,
        r.body
    );
    // No Host at all: actix answers 400 itself (HTTP/1.1 requires one).
    let r = d.request("GET", "/api/status", &[auth], None);
    assert!(
        r.status == 400 || r.status == 403,
        "{} {}",
        r.status,
        r.body
    );
}

#[test]
fn admin_actions_are_attributed() {
    let d = Daemon::start();
    let r = d.post_json("/api/reload", "");
    assert_eq!(r.status, 200, "{}", r.body);
    let admin_id = d.get("/api/tokens").json()["tokens"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let rec = &d.get("/api/audit?kind=reload&tail=1").json()["records"][0];
    assert_eq!(rec["token_id"], admin_id.as_str(), "{rec}");
    assert!(rec["detail"].as_str().unwrap().contains("api"), "{rec}");
    let r = d.post_json("/api/keys/rotate", "");
    assert_eq!(r.status, 200, "{}", r.body);
    let rec = &d.get("/api/audit?kind=key_rotate&tail=1").json()["records"][0];
    assert_eq!(rec["token_id"], admin_id.as_str(), "{rec}");
    assert!(rec["detail"].as_str().unwrap().contains("->"), "{rec}");
    d.signal(libc::SIGHUP);
    d.wait_until(std::time::Duration::from_secs(10), || {
        let v = d.get("/api/audit?kind=reload&tail=1").json();
        v["records"][0]["detail"]
            .as_str()
            .is_some_and(|s| s.contains("SIGHUP"))
    });
}

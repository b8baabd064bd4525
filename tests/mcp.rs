//! The MCP server end to end: `POST /mcp` (streamable HTTP) and `hall mcp` (stdio), driven by
//! the official MCP Python SDK (tests/mcp/client.py) against the real daemon, plus raw HTTP
//! and raw stdio for what a well-behaved client never sends.
//!
//! The SDK tests need `python3` with `mcp` installed (.ci/run pins it). Without it they fail
//! under CI (`CI=true`) and are skipped with a printed reason elsewhere.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

/// Whether python3 can import the MCP SDK. In CI its absence is a failure, not a skip.
fn python_mcp() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import mcp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let why = "python3 with the MCP SDK (pip install mcp==2.3.0) is needed to drive the MCP server with a real client";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{why}; CI must provide it (.ci/run installs it)");
        }
        eprintln!("SKIPPED: {why}");
    }
    ok
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Http,
    Stdio,
}

/// Run tests/mcp/client.py: initialize, then `steps`; its JSON report.
fn sdk(d: &Daemon, t: Transport, token: &str, steps: &Value) -> Value {
    let url = format!("http://{}", d.addr);
    let mut cmd = Command::new("python3");
    cmd.arg(repo().join("tests/mcp/client.py"));
    match t {
        Transport::Http => cmd.args(["http", &format!("{url}/mcp"), token]),
        Transport::Stdio => cmd.args(["stdio", HALL, &url, token]),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(steps.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "client.py ({t:?}) printed no JSON ({e}): {stdout}\nstderr:\n{}\ndaemon logs:\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.logs()
        )
    })
}

/// A token with these scopes (and tenant), as (token, id).
fn issue(d: &Daemon, name: &str, scopes: &[&str], tenant: Option<&str>) -> (String, String) {
    let body = json!({"name": name, "scopes": scopes, "tenant_id": tenant});
    let r = d.post_json("/api/tokens", &body.to_string());
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    (
        v["token"].as_str().unwrap().to_string(),
        v["info"]["id"].as_str().unwrap().to_string(),
    )
}

fn route_args(cap: &str, env: &str, label: &str, tenant: &str) -> Value {
    json!({"capability_id": cap, "env": env, "data_label": label, "tenant_id": tenant})
}

fn call(name: &str, args: Value) -> Value {
    json!({"op": "call", "name": name, "arguments": args})
}

/// The structured result of a successful tool call step.
fn structured(step: &Value) -> &Value {
    let r = &step["result"];
    assert_eq!(r["isError"], false, "{step}");
    assert!(r["structuredContent"].is_object(), "{step}");
    // The text content carries the same JSON, for clients that read only `content`.
    let text: Value = serde_json::from_str(r["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(text, r["structuredContent"], "{step}");
    &r["structuredContent"]
}

/// The audit record of a decision, as the admin sees it.
fn audit_record(d: &Daemon, decision_id: &str) -> Value {
    let r = d.get(&format!("/api/audit/{decision_id}"));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    v.get("record").cloned().unwrap_or(v)
}

/// initialize, tools/list, route allowed and denied, explain, list_capabilities and bad
/// arguments, over one transport; the decisions are audited under the caller's token.
fn core_session(t: Transport) {
    if !python_mcp() {
        return;
    }
    let d = Daemon::start();
    let (token, token_id) = issue(&d, "assistant", &["route"], None);
    let steps = json!([
        {"op": "list_tools"},
        call("route", route_args("cap.doc.summarize", "dev", "PUBLIC", "org.acme")),
        call("route", route_args("cap.doc.summarize", "dev", "PUBLIC", "org.other")),
        call("explain", route_args("cap.doc.summarize", "dev", "PUBLIC", "org.other")),
        call("list_capabilities", json!({})),
        call("route", json!({"capability_id": "cap.doc.summarize", "env": "dev", "data_label": "PUBLIC"})),
        call("route", route_args("cap.doc.summarize", "moon", "PUBLIC", "org.acme")),
        call("no_such_tool", json!({})),
        {"op": "ping"},
    ]);
    let out = sdk(&d, t, &token, &steps);
    let init = &out["initialize"];
    // The SDK offers a newer revision than ours; the server answers with the one it speaks.
    assert_eq!(init["protocolVersion"], "2025-06-18", "{out}");
    assert_eq!(init["serverInfo"]["name"], "hall", "{out}");
    assert!(init["capabilities"]["tools"].is_object(), "{out}");
    let s = out["steps"].as_array().unwrap();

    let tools = s[0]["result"]["tools"].as_array().expect("tools");
    let names: BTreeSet<&str> = tools.iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from(["route", "explain", "list_capabilities", "approval_status"]),
        "{out}"
    );
    for tool in tools {
        assert_eq!(tool["inputSchema"]["type"], "object", "{tool}");
        assert!(tool["outputSchema"].is_object(), "{tool}");
    }

    let allowed = structured(&s[1]);
    assert_eq!(allowed["allowed"], true, "{out}");
    assert_eq!(allowed["worker_id"], "worker.doc.summarize");
    assert_eq!(allowed["rule_id"], "docs-dev");
    let rec = audit_record(&d, allowed["decision_id"].as_str().unwrap());
    assert_eq!(rec["token_id"], token_id.as_str(), "{rec}");
    assert_eq!(rec["allowed"], true, "{rec}");
    assert_eq!(rec["tenant_id"], "org.acme", "{rec}");

    // A denial is a normal result, not an error.
    let denied = structured(&s[2]);
    assert_eq!(denied["allowed"], false, "{out}");
    assert_eq!(denied["deny_reason"], "no_matching_rule");
    assert!(denied["worker_id"].is_null());
    let rec = audit_record(&d, denied["decision_id"].as_str().unwrap());
    assert_eq!(rec["token_id"], token_id.as_str(), "{rec}");
    assert_eq!(rec["allowed"], false, "{rec}");

    let explained = structured(&s[3]);
    assert_eq!(explained["deny_reason"], "no_matching_rule");
    let rules = explained["explain"]["rules"].as_array().expect("trace");
    assert!(
        rules
            .iter()
            .any(|r| r["rule_id"] == "docs-dev" && r["matched"] == false),
        "{explained}"
    );

    let caps = structured(&s[4]);
    let listed: Vec<&str> = caps["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 7, "{caps}");
    assert!(listed.contains(&"cap.doc.summarize"));
    assert!(caps["capabilities"][0]["description"].is_string(), "{caps}");

    // Malformed arguments: a JSON-RPC "invalid params" error naming the field.
    for (i, field) in [(5, "tenant_id"), (6, "env")] {
        let e = &s[i]["error"];
        assert_eq!(e["code"], -32602, "{out}");
        assert!(e["message"].as_str().unwrap().contains(field), "{e}");
        assert_eq!(e["data"]["field"], field, "{e}");
    }
    assert_eq!(s[7]["error"]["code"], -32602, "{out}");
    assert!(s[7]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("no_such_tool"));
    assert!(s[8]["result"].is_object(), "ping: {out}");
}

#[test]
fn http_transport_with_the_python_sdk() {
    core_session(Transport::Http);
}

#[test]
fn stdio_transport_with_the_python_sdk() {
    core_session(Transport::Stdio);
}

#[test]
fn a_token_without_the_route_scope_is_refused_naming_the_scope() {
    let d = Daemon::start();
    let (token, _) = issue(&d, "auditor", &["audit"], None);
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let r = mcp_post(&d, Some(&token), &[], &init.to_string());
    r.assert_error(403, "forbidden", None);
    assert!(
        r.json()["error"].as_str().unwrap().contains("route"),
        "{}",
        r.body
    );
    // A percent-encoded spelling of the path is refused just the same, here and on /api/route.
    let h = vec![
        ("Host".to_string(), d.addr.to_string()),
        ("Authorization".to_string(), format!("Bearer {token}")),
        ("Content-Type".to_string(), "application/json".to_string()),
    ];
    let r = d.request("POST", "/%6Dcp", &h, Some(LIST.as_bytes()));
    r.assert_error(403, "forbidden", None);
    assert!(r.body.contains("route scope"), "{}", r.body);
    let body = route_args("cap.doc.summarize", "dev", "PUBLIC", "org.acme").to_string();
    let r = d.request("POST", "/api/%72oute", &h, Some(body.as_bytes()));
    r.assert_error(403, "forbidden", None);
    // No decision was made or recorded for any of it.
    let decisions = d.get("/api/status").json()["decisions"].clone();
    assert_eq!(decisions, json!({"allowed": 0, "denied": 0}));

    // stdio: the bridge turns the 403 into a JSON-RPC error that names the scope.
    let (lines, _) = bridge(&d, &token, &[&init.to_string()]);
    let e = &lines[0]["error"];
    assert_eq!(lines[0]["id"], 1, "{}", lines[0]);
    let msg = e["message"].as_str().unwrap();
    assert!(msg.contains("route scope") && msg.contains("403"), "{msg}");

    if !python_mcp() {
        return;
    }
    for t in [Transport::Http, Transport::Stdio] {
        let out = sdk(&d, t, &token, &json!([]));
        let err = &out["initialize_error"];
        assert!(
            err.is_object(),
            "{t:?} initialized without the route scope: {out}"
        );
        if let Transport::Stdio = t {
            assert!(
                err["message"].as_str().unwrap().contains("route scope"),
                "{out}"
            );
        }
    }
}

/// `POST /mcp` with raw headers: Host and bearer by default, plus `extra`.
fn mcp_post(d: &Daemon, token: Option<&str>, extra: &[(&str, &str)], body: &str) -> Resp {
    let mut h = vec![
        ("Host".to_string(), d.addr.to_string()),
        ("Content-Type".to_string(), "application/json".to_string()),
        (
            "Accept".to_string(),
            "application/json, text/event-stream".to_string(),
        ),
    ];
    if let Some(t) = token {
        h.push(("Authorization".into(), format!("Bearer {t}")));
    }
    for (k, v) in extra {
        match h.iter_mut().find(|(hk, _)| hk.eq_ignore_ascii_case(k)) {
            Some(slot) => slot.1 = v.to_string(),
            None => h.push((k.to_string(), v.to_string())),
        }
    }
    d.request("POST", "/mcp", &h, Some(body.as_bytes()))
}

const LIST: &str = r#"{"jsonrpc":"2.0","id":7,"method":"tools/list"}"#;

#[test]
fn rebinding_host_and_foreign_origin_are_refused() {
    let d = Daemon::start();
    let t = d.admin_token().unwrap();
    let port = d.addr.port().to_string();
    let r = mcp_post(
        &d,
        Some(&t),
        &[("Host", &format!("evil.example:{port}"))],
        LIST,
    );
    r.assert_error(403, "bad_host", None);
    let r = mcp_post(&d, Some(&t), &[("Origin", "http://evil.example")], LIST);
    r.assert_error(403, "bad_origin", None);
    // A loopback page is a foreign origin too unless configured.
    let r = mcp_post(
        &d,
        Some(&t),
        &[("Origin", &format!("http://127.0.0.1:{port}"))],
        LIST,
    );
    r.assert_error(403, "bad_origin", None);
    let r = mcp_post(&d, None, &[], LIST);
    r.assert_error(401, "unauthorized", None);
    // The same request from a proper client works.
    let r = mcp_post(&d, Some(&t), &[], LIST);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["id"], 7);
}

#[test]
fn malformed_and_unsupported_messages_get_protocol_errors() {
    let d = Daemon::start();
    let t = d.admin_token().unwrap();
    let rpc_error = |r: &Resp, status: u16, code: i64| {
        assert_eq!(r.status, status, "{}", r.body);
        assert!(
            r.header("content-type")
                .is_some_and(|c| c.starts_with("application/json")),
            "{:?}",
            r.headers
        );
        let v = r.json();
        assert_eq!(v["jsonrpc"], "2.0", "{v}");
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        v
    };
    let v = rpc_error(
        &mcp_post(&d, Some(&t), &[], "{\"jsonrpc\": \"2.0\", "),
        400,
        -32700,
    );
    assert!(v["id"].is_null());
    let batch = format!("[{LIST},{LIST}]");
    let v = rpc_error(&mcp_post(&d, Some(&t), &[], &batch), 400, -32600);
    assert!(v["error"]["message"].as_str().unwrap().contains("batch"));
    rpc_error(
        &mcp_post(&d, Some(&t), &[], r#"{"id":1,"method":"tools/list"}"#),
        400,
        -32600,
    );
    rpc_error(
        &mcp_post(
            &d,
            Some(&t),
            &[],
            r#"{"jsonrpc":"2.0","id":null,"method":"ping"}"#,
        ),
        400,
        -32600,
    );
    rpc_error(&mcp_post(&d, Some(&t), &[], "42"), 400, -32600);
    let v = rpc_error(
        &mcp_post(
            &d,
            Some(&t),
            &[],
            r#"{"jsonrpc":"2.0","id":"x","method":"resources/list"}"#,
        ),
        200,
        -32601,
    );
    assert_eq!(v["id"], "x");
    rpc_error(
        &mcp_post(
            &d,
            Some(&t),
            &[("MCP-Protocol-Version", "1999-01-01")],
            LIST,
        ),
        400,
        -32600,
    );
    // Notifications and responses are accepted without a body.
    let r = mcp_post(
        &d,
        Some(&t),
        &[],
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    assert!(r.body.is_empty());
    // HTTP-level refusals keep the API's error shape.
    mcp_post(&d, Some(&t), &[("Content-Type", "text/plain")], LIST).assert_error(
        415,
        "unsupported_media_type",
        None,
    );
    d.get("/mcp").assert_error(405, "method_not_allowed", None);

    // The daemon is unharmed: the next request is answered, under a supported version header.
    let r = mcp_post(
        &d,
        Some(&t),
        &[("MCP-Protocol-Version", "2025-06-18")],
        LIST,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["result"]["tools"].as_array().unwrap().len(), 4);
    assert_eq!(d.get("/health").status, 200);
}

/// Run `hall mcp` against the daemon, feed it `lines`, close stdin; what it printed (one JSON
/// value a line) and its stderr.
fn bridge(d: &Daemon, token: &str, lines: &[&str]) -> (Vec<Value>, String) {
    let mut child = Command::new(HALL)
        .arg("mcp")
        .env("HALL_URL", format!("http://{}", d.addr))
        .env("HALL_TOKEN", token)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run hall mcp");
    {
        let mut stdin = child.stdin.take().unwrap();
        for l in lines {
            writeln!(stdin, "{l}").unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "hall mcp exited {:?}", out.status);
    let printed = BufReader::new(&out.stdout[..])
        .lines()
        .map(|l| {
            let l = l.unwrap();
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("stdout line not JSON ({e}): {l:?}"))
        })
        .collect();
    (printed, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn the_stdio_bridge_answers_malformed_lines_and_keeps_going() {
    let d = Daemon::start();
    let t = d.admin_token().unwrap();
    let (out, _) = bridge(
        &d,
        &t,
        &[
            "this is not json",
            r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
            &format!("[{LIST}]"),
            r#"{"jsonrpc":"2.0","id":2,"method":"no/such"}"#,
            r#"{"jsonrpc":"2.0","id":3,"method":"ping"}"#,
        ],
    );
    // The notification gets no line; everything else exactly one, in order.
    assert_eq!(out.len(), 4, "{out:?}");
    assert_eq!(out[0]["error"]["code"], -32700, "{}", out[0]);
    assert_eq!(out[1]["error"]["code"], -32600, "{}", out[1]);
    assert_eq!(out[2]["error"]["code"], -32601, "{}", out[2]);
    assert_eq!(out[2]["id"], 2);
    assert_eq!(out[3]["id"], 3);
    assert_eq!(out[3]["result"], json!({}));

    // A daemon that cannot be reached: a JSON-RPC error for the request, the reason on stderr.
    let mut child = Command::new(HALL)
        .arg("mcp")
        .env("HALL_URL", "http://127.0.0.1:1")
        .env("HALL_TOKEN", &t)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(
        child.stdin.take().unwrap(),
        r#"{{"jsonrpc":"2.0","id":9,"method":"ping"}}"#
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).expect("one JSON line");
    assert_eq!(v["id"], 9);
    assert_eq!(v["error"]["code"], -32000);
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot reach the daemon"));
}

#[test]
fn a_tenant_bound_token_routes_and_lists_only_for_its_tenant() {
    if !python_mcp() {
        return;
    }
    let d = Daemon::start();
    let (token, token_id) = issue(&d, "beta-agent", &["route"], Some("org.beta.eu"));
    let steps = json!([
        call(
            "route",
            route_args("cap.doc.translate", "staging", "INTERNAL", "org.beta.eu")
        ),
        call(
            "route",
            route_args("cap.doc.translate", "staging", "INTERNAL", "org.acme")
        ),
        call("list_capabilities", json!({})),
        call("list_capabilities", json!({"tenant_id": "org.acme"})),
        call("list_capabilities", json!({"env": "prod"})),
    ]);
    let out = sdk(&d, Transport::Http, &token, &steps);
    let s = out["steps"].as_array().expect("steps");
    let own = structured(&s[0]);
    assert_eq!(own["allowed"], true, "{out}");
    assert_eq!(
        audit_record(&d, own["decision_id"].as_str().unwrap())["token_id"],
        token_id.as_str()
    );

    // Another tenant: refused as /api/route refuses it (403 tenant_mismatch there), no decision.
    let other = &s[1]["result"];
    assert_eq!(other["isError"], true, "{out}");
    assert!(other["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("tenant_mismatch"));
    let mut h = vec![
        ("Host".to_string(), d.addr.to_string()),
        ("Authorization".into(), format!("Bearer {token}")),
        ("Content-Type".into(), "application/json".into()),
    ];
    let body = route_args("cap.doc.translate", "staging", "INTERNAL", "org.acme").to_string();
    d.request("POST", "/api/route", &h, Some(body.as_bytes()))
        .assert_error(403, "tenant_mismatch", None);
    assert_eq!(s[3]["result"]["isError"], true, "{out}");

    // The list is what /api/route would allow this tenant, env by env and label by label.
    let listed = structured(&s[2]);
    assert_eq!(listed["tenant_id"], "org.beta.eu");
    let mut from_list = BTreeSet::new();
    for c in listed["capabilities"].as_array().unwrap() {
        for a in c["allowed"].as_array().unwrap() {
            for l in a["data_labels"].as_array().unwrap() {
                from_list.insert((
                    c["id"].as_str().unwrap().to_string(),
                    a["env"].as_str().unwrap().to_string(),
                    l.as_str().unwrap().to_string(),
                ));
            }
        }
    }
    let caps = d.get("/api/registry/capabilities").json();
    let mut from_api = BTreeSet::new();
    h.truncate(3);
    for c in caps["capabilities"].as_array().unwrap() {
        let cap = c["id"].as_str().unwrap();
        for env in ["dev", "staging", "prod"] {
            for label in ["PUBLIC", "INTERNAL", "CONFIDENTIAL", "SECRET"] {
                let mut b = route_args(cap, env, label, "org.beta.eu");
                b["dry_run"] = json!(true);
                let r = d.request("POST", "/api/route", &h, Some(b.to_string().as_bytes()));
                assert_eq!(r.status, 200, "{}", r.body);
                if r.json()["allowed"] == true {
                    from_api.insert((cap.to_string(), env.to_string(), label.to_string()));
                }
            }
        }
    }
    assert!(!from_api.is_empty());
    assert_eq!(from_list, from_api);
    // Export is acme's alone: not offered to beta.
    assert!(!from_list.iter().any(|(c, _, _)| c == "cap.data.export"));
    let prod = structured(&s[4]);
    for c in prod["capabilities"].as_array().unwrap() {
        let envs: Vec<&str> = c["allowed"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["env"].as_str().unwrap())
            .collect();
        assert_eq!(envs, ["prod"], "{c}");
    }
}

#[test]
fn decisions_over_mcp_equal_api_route_for_every_shipped_fixture() {
    if !python_mcp() {
        return;
    }
    let text = std::fs::read_to_string(repo().join("tests/fixtures/example.toml")).unwrap();
    let fixtures: toml::Value = toml::from_str(&text).unwrap();
    let cases = fixtures["case"].as_array().unwrap();
    assert!(cases.len() >= 20, "{} cases", cases.len());
    let requests: Vec<Value> = cases
        .iter()
        .map(|c| serde_json::to_value(&c["request"]).unwrap())
        .collect();

    let d = Daemon::start();
    let (token, token_id) = issue(&d, "assistant", &["route"], None);
    let steps: Vec<Value> = requests.iter().map(|r| call("route", r.clone())).collect();
    for t in [Transport::Http, Transport::Stdio] {
        let out = sdk(&d, t, &token, &json!(steps));
        let s = out["steps"].as_array().expect("steps");
        assert_eq!(s.len(), cases.len());
        for ((case, req), step) in cases.iter().zip(&requests).zip(s) {
            let name = case["name"].as_str().unwrap();
            let over_mcp = structured(step);
            let r = d.post_json("/api/route", &req.to_string());
            assert_eq!(r.status, 200, "{name}: {}", r.body);
            let over_api = r.json();
            for k in [
                "allowed",
                "worker_id",
                "deny_reason",
                "rule_id",
                "policy_version",
                "dry_run",
                "approval_id",
            ] {
                assert_eq!(over_mcp[k], over_api[k], "{t:?} {name}: {k}");
            }
            // And both are what the fixture pins.
            for (k, v) in case["expect"].as_table().unwrap() {
                assert_eq!(
                    over_mcp[k.as_str()],
                    serde_json::to_value(v).unwrap(),
                    "{name}"
                );
            }
            let rec = audit_record(&d, over_mcp["decision_id"].as_str().unwrap());
            assert_eq!(rec["token_id"], token_id.as_str(), "{name}");
            assert_eq!(rec["capability_id"], req["capability_id"], "{name}");
        }
    }
}

#[test]
fn the_token_rate_limit_applies_to_mcp_on_both_transports() {
    let d = Daemon::start();
    let r = d.post_json(
        "/api/tokens",
        r#"{"name":"slow","scopes":["route"],"rate_limit_per_minute":2}"#,
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let token = r.json()["token"].as_str().unwrap().to_string();
    for _ in 0..2 {
        assert_eq!(mcp_post(&d, Some(&token), &[], LIST).status, 200);
    }
    let r = mcp_post(&d, Some(&token), &[], LIST);
    r.assert_error(429, "rate_limited", None);
    assert!(r.header("retry-after").is_some(), "{:?}", r.headers);
    let (out, _) = bridge(&d, &token, &[LIST]);
    assert_eq!(out[0]["id"], 7, "{}", out[0]);
    assert_eq!(out[0]["error"]["code"], -32000, "{}", out[0]);
    assert_eq!(
        out[0]["error"]["data"]["code"], "rate_limited",
        "{}",
        out[0]
    );
}

#[test]
fn approval_status_follows_an_approval_over_both_transports() {
    let d = Daemon::start();
    let (app, _) = issue(&d, "app", &["route"], Some("org.acme"));
    let (approver, _) = issue(&d, "approver", &["approve"], None);
    let (other, _) = issue(&d, "other-app", &["route"], Some("org.acme"));
    // The app opens an approval through MCP itself.
    let open = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "route", "arguments": route_args("cap.code.deploy", "prod", "INTERNAL", "org.acme")}});
    let r = mcp_post(&d, Some(&app), &[], &open.to_string());
    assert_eq!(r.status, 200, "{}", r.body);
    let decision = r.json()["result"]["structuredContent"].clone();
    assert_eq!(decision["deny_reason"], "approval_required", "{decision}");
    let id = decision["approval_id"].as_str().unwrap().to_string();

    let status = |token: &str, id: &str| {
        let msg = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
            "params": {"name": "approval_status", "arguments": {"approval_id": id}}});
        let r = mcp_post(&d, Some(token), &[], &msg.to_string());
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    let v = status(&app, &id);
    assert_eq!(v["result"]["structuredContent"]["state"], "pending", "{v}");
    assert_eq!(v["result"]["structuredContent"]["id"], id.as_str(), "{v}");
    // Another route token of the same tenant did not open it: not found, as over HTTP.
    let v = status(&other, &id);
    assert_eq!(v["result"]["isError"], true, "{v}");
    // An approver approves over HTTP; the app sees it over stdio.
    let mut h = d.default_headers();
    h.retain(|(k, _)| k != "Authorization");
    h.push(("Authorization".into(), format!("Bearer {approver}")));
    let r = d.request("POST", &format!("/api/approvals/{id}/approve"), &h, None);
    assert_eq!(r.status, 200, "{}", r.body);
    let init = r#"{"jsonrpc":"2.0","id":0,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call",
        "params": {"name": "approval_status", "arguments": {"approval_id": id}}})
    .to_string();
    let (out, stderr) = bridge(&d, &app, &[init, &call]);
    let last = out
        .last()
        .unwrap_or_else(|| panic!("no answer; stderr: {stderr}"));
    assert_eq!(
        last["result"]["structuredContent"]["state"], "approved",
        "{last}"
    );
    // It is listed, and a malformed id is a protocol error.
    let list = mcp_post(
        &d,
        Some(&app),
        &[],
        r#"{"jsonrpc":"2.0","id":4,"method":"tools/list"}"#,
    );
    assert!(list.body.contains("approval_status"), "{}", list.body);
    let bad = json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
        "params": {"name": "approval_status", "arguments": {"approval_id": "\u{202e}x"}}});
    let r = mcp_post(&d, Some(&app), &[], &bad.to_string());
    assert_eq!(r.json()["error"]["code"], -32602, "{}", r.body);
}

//! `POST /mcp`: the Model Context Protocol over its streamable HTTP transport (JSON-RPC 2.0).
//!
//! An assistant or agent framework asks Hall "may I, and who does it?" with the tools
//! `route`, `explain` and `list_capabilities`. The endpoint sits behind the same gate as the
//! rest of the API (Host and Origin checks, bearer token with scope `route`, rate limit), and
//! `route`/`explain` go through [`super::route::decide_and_record`], the function behind
//! `/api/route`: the same input checks, the same decision, the same audit record naming the
//! token.
//!
//! What is implemented of the transport, and what is not:
//! - One JSON-RPC message per POST, answered with `application/json` (the transport allows a
//!   plain JSON answer when nothing is streamed). Notifications and responses: 202, no body.
//!   Batches (removed from the protocol in 2025-06-18) are refused with `-32600`.
//! - Stateless: no `Mcp-Session-Id` is issued, so every request stands alone; `initialize`
//!   negotiates the version (`2025-06-18`, else the older `2025-03-26` or `2024-11-05` when the
//!   client asks for one of them) and is not required before other calls.
//! - No server-initiated messages: `GET /mcp` is 405 (no SSE stream), and there are no
//!   resources, prompts, logging or list-change notifications.
//! - Errors that stop a message before it is a request (malformed JSON, not JSON-RPC, a
//!   batch, an unsupported `MCP-Protocol-Version` header) are HTTP 400 with a JSON-RPC error
//!   body and `id: null`, as the transport specifies. Refusals by the gate (401, 403, 429)
//!   keep the API's `{"error","code"}` shape.
//!
//! Why hand-written rather than the `rmcp` SDK: rmcp's streamable HTTP server is a tower
//! service built for axum and hyper; under actix it would need a second HTTP stack beside
//! the gate (which must see every request), a newer `rust-version`, and a sizeable
//! dependency tree, for a protocol surface here of four methods over stateless JSON.

use std::time::Instant;

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Map, Value};

use super::errors::{ApiError, Code};
use super::route::{decide_and_record, parse_body, read_json_body, require_route_scope};
use super::state::AppState;
use crate::engine::{decide, valid_id, Request, Snapshot};
use crate::store::tokens::Authenticated;

/// The protocol revision this server implements, and offers when the client asks for one it
/// does not know.
pub const PROTOCOL_VERSION: &str = "2025-06-18";
/// Revisions a client may choose in `initialize` (or name in `MCP-Protocol-Version`); the
/// tools behave the same under each.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["2025-06-18", "2025-03-26", "2024-11-05"];

const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;

/// A JSON-RPC error object.
#[derive(Debug)]
struct RpcError {
    code: i64,
    message: String,
    data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> RpcError {
        RpcError {
            code,
            message: message.into(),
            data: None,
        }
    }

    fn to_json(&self) -> Value {
        let mut e = json!({"code": self.code, "message": self.message});
        if let Some(d) = &self.data {
            e["data"] = d.clone();
        }
        e
    }
}

/// A message refused before it became a request: HTTP 400 with a JSON-RPC error, `id: null`.
fn rejected(e: RpcError) -> HttpResponse {
    HttpResponse::BadRequest()
        .content_type("application/json")
        .body(json!({"jsonrpc": "2.0", "id": null, "error": e.to_json()}).to_string())
}

/// The version `initialize` answers with: the client's choice when we support it, else ours.
pub fn negotiate(requested: &str) -> &'static str {
    SUPPORTED_VERSIONS
        .iter()
        .find(|v| **v == requested)
        .copied()
        .unwrap_or(PROTOCOL_VERSION)
}

/// The handler for `POST /mcp`.
pub async fn post(
    caller: super::auth::Caller,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let started = Instant::now();
    // The endpoint is registered with scope `route`; every tool needs it. Checked again
    // where decisions are made (belt and braces).
    let caller = caller.0;
    require_route_scope(&caller)?;

    if let Some(v) = req.headers().get("mcp-protocol-version") {
        let v = v.to_str().unwrap_or("");
        if !SUPPORTED_VERSIONS.contains(&v) {
            return Ok(rejected(RpcError::new(
                INVALID_REQUEST,
                format!(
                    "unsupported MCP-Protocol-Version {v:?}; this server speaks {}",
                    SUPPORTED_VERSIONS.join(", ")
                ),
            )));
        }
    }
    let bytes = read_json_body(&req, payload).await?;
    let msg: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => {
            return Ok(rejected(RpcError::new(
                PARSE_ERROR,
                format!("malformed JSON: {e}"),
            )))
        }
    };
    let msg =
        match msg {
            Value::Object(m) => m,
            Value::Array(_) => return Ok(rejected(RpcError::new(
                INVALID_REQUEST,
                "JSON-RPC batches are not supported: send one message per POST (MCP 2025-06-18)",
            ))),
            _ => {
                return Ok(rejected(RpcError::new(
                    INVALID_REQUEST,
                    "a JSON-RPC message must be a JSON object",
                )))
            }
        };
    if msg.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Ok(rejected(RpcError::new(
            INVALID_REQUEST,
            "\"jsonrpc\" must be \"2.0\"",
        )));
    }
    match (msg.get("method"), msg.get("id")) {
        (Some(Value::String(method)), Some(id @ (Value::String(_) | Value::Number(_)))) => {
            let out = match dispatch(&state, &caller, method, msg.get("params"), started).await {
                Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
                Err(e) => json!({"jsonrpc": "2.0", "id": id, "error": e.to_json()}),
            };
            Ok(HttpResponse::Ok()
                .content_type("application/json")
                .body(out.to_string()))
        }
        // A notification (`notifications/initialized`, `notifications/cancelled`, ...): there is
        // nothing to do for any of them in a stateless server that answers at once.
        (Some(Value::String(_)), None) => Ok(HttpResponse::Accepted().finish()),
        // A response to a server request: this server sends none, so there is nothing to match.
        (None, Some(_)) if msg.contains_key("result") || msg.contains_key("error") => {
            Ok(HttpResponse::Accepted().finish())
        }
        _ => Ok(rejected(RpcError::new(
            INVALID_REQUEST,
            "not a JSON-RPC request: it needs a string \"method\" and a string or number \"id\"",
        ))),
    }
}

async fn dispatch(
    state: &AppState,
    caller: &Authenticated,
    method: &str,
    params: Option<&Value>,
    started: Instant,
) -> Result<Value, RpcError> {
    match method {
        "initialize" => initialize(params),
        "ping" => Ok(json!({})),
        "tools/list" => Ok(json!({ "tools": tools() })),
        "tools/call" => call_tool(state, caller, params, started).await,
        other => Err(RpcError::new(
            METHOD_NOT_FOUND,
            format!(
                "method {other:?} is not supported; this server offers initialize, ping, tools/list and tools/call"
            ),
        )),
    }
}

fn initialize(params: Option<&Value>) -> Result<Value, RpcError> {
    let requested = params
        .and_then(|p| p.get("protocolVersion"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            RpcError::new(
                INVALID_PARAMS,
                "initialize needs params.protocolVersion (a string)",
            )
        })?;
    Ok(json!({
        "protocolVersion": negotiate(requested),
        "capabilities": { "tools": { "listChanged": false } },
        "serverInfo": {
            "name": "hall",
            "title": "Hall policy router",
            "version": env!("CARGO_PKG_VERSION"),
        },
        "instructions": "Before using a capability, call `route` with the capability id, environment, \
            data label and tenant: Hall answers whether it is allowed and which worker should do it \
            (a denial is a normal answer with allowed=false and a deny_reason). `explain` adds why. \
            `list_capabilities` shows what the registry offers.",
    }))
}

/// The input both `route` and `explain` take: exactly the body of `POST /api/route`.
fn route_input_schema() -> Value {
    let s = |d: &str| json!({"type": "string", "description": d});
    json!({
        "type": "object",
        "properties": {
            "capability_id": s("The capability to use, e.g. cap.doc.summarize (see list_capabilities)."),
            "env": s("The environment, one of the policy's environments (by default dev, staging, prod)."),
            "data_label": s("The sensitivity of the data, one of the policy's labels (by default PUBLIC, INTERNAL, CONFIDENTIAL, SECRET)."),
            "tenant_id": s("The tenant the work is for. A token bound to a tenant may only ask for that tenant."),
            "correlation_id": s("Your own id for this request (1-128 printable characters), recorded in the audit log."),
            "dry_run": {"type": "boolean", "description": "Ask without the answer counting as a real decision (recorded as a dry run; no secret can be released for it)."},
            "approval_id": s("An approval id from an earlier approval_required answer, to redeem it once a person approved (as for /api/route)."),
            "context": {"type": "object", "description": "Free-form context (at most 8 KiB), recorded in the audit log."},
            "tenant_risk": s("Recorded in the audit log (at most 64 characters)."),
            "qos_class": s("Recorded in the audit log (at most 64 characters)."),
        },
        "required": ["capability_id", "env", "data_label", "tenant_id"],
        "additionalProperties": false,
    })
}

fn decision_output_schema(with_explain: bool) -> Value {
    let opt = json!({"type": ["string", "null"]});
    let mut schema = json!({
        "type": "object",
        "properties": {
            "decision_id": {"type": "string"},
            "allowed": {"type": "boolean"},
            "worker_id": opt,
            "deny_reason": opt,
            "rule_id": opt,
            "policy_version": {"type": "string"},
            "approval_id": opt,
            "dry_run": {"type": "boolean"},
        },
        "required": ["decision_id", "allowed", "worker_id", "deny_reason", "rule_id", "policy_version", "dry_run"],
    });
    if with_explain {
        schema["properties"]["explain"] = json!({
            "type": "object",
            "properties": {
                "rules": {"type": "array", "items": {"type": "object"}},
                "candidates": {"type": "array", "items": {"type": "object"}},
            },
            "required": ["rules", "candidates"],
        });
        if let Some(r) = schema["required"].as_array_mut() {
            r.push(json!("explain"));
        }
    }
    schema
}

/// The tools, with JSON Schemas for their input and their structured result.
fn tools() -> Value {
    json!([
        {
            "name": "route",
            "title": "Ask Hall for a routing decision",
            "description": "May this capability be used in this environment, on data of this label, for this tenant, and which worker should do it? Same as POST /api/route: the decision is recorded in Hall's audit log. A denial is a normal result (allowed=false, deny_reason says why).",
            "inputSchema": route_input_schema(),
            "outputSchema": decision_output_schema(false),
            "annotations": {"readOnlyHint": false, "destructiveHint": false, "idempotentHint": false, "openWorldHint": false},
        },
        {
            "name": "explain",
            "title": "A routing decision with its trace",
            "description": "The same decision as `route` (and recorded the same way), with the trace: every rule tried and why it did not match, every candidate worker and why it was skipped.",
            "inputSchema": route_input_schema(),
            "outputSchema": decision_output_schema(true),
            "annotations": {"readOnlyHint": false, "destructiveHint": false, "idempotentHint": false, "openWorldHint": false},
        },
        {
            "name": "approval_status",
            "title": "The state of an approval",
            "description": "Where an approval that a require_approval rule opened stands: pending, approved, denied, expired, cancelled or used, with its votes, notes and deadlines. A route-only token sees the approvals it opened; an approver sees its tenant's (or every) queue. Once approved, redeem it with the route tool and approval_id.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "approval_id": {"type": "string", "description": "The approval_id a route answer returned (apr_…)."},
                },
                "required": ["approval_id"],
                "additionalProperties": false,
            },
            "outputSchema": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "state": {"type": "string", "enum": ["pending", "approved", "denied", "expired", "cancelled", "used"]},
                    "tenant_id": {"type": "string"},
                    "capability_id": {"type": "string"},
                    "worker_id": {"type": "string"},
                    "expires_at": {"type": ["string", "null"]},
                },
                "required": ["id", "state"],
            },
            "annotations": {"readOnlyHint": true, "destructiveHint": false, "idempotentHint": true, "openWorldHint": false},
        },
        {
            "name": "list_capabilities",
            "title": "What the registry offers",
            "description": "The capabilities Hall knows, with descriptions. With a tenant (a tenant-bound token always uses its own), only those the current policy would allow that tenant, each with the environments and data labels where it is allowed; with env, only those usable in that environment.",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "env": {"type": "string", "description": "Only capabilities usable in this environment."},
                    "tenant_id": {"type": "string", "description": "Only capabilities the policy allows this tenant."},
                },
                "additionalProperties": false,
            },
            "outputSchema": {
                "type": "object",
                "properties": {
                    "policy_version": {"type": "string"},
                    "env": {"type": ["string", "null"]},
                    "tenant_id": {"type": ["string", "null"]},
                    "capabilities": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "id": {"type": "string"},
                                "description": {"type": "string"},
                                "allowed": {"type": "array", "items": {"type": "object"}},
                            },
                            "required": ["id"],
                        },
                    },
                },
                "required": ["policy_version", "capabilities"],
            },
            "annotations": {"readOnlyHint": true, "destructiveHint": false, "idempotentHint": true, "openWorldHint": false},
        },
    ])
}

/// A tool's successful result: the structured value, and the same as JSON text for clients
/// that only read `content`.
fn tool_result(v: Value) -> Value {
    json!({
        "content": [{"type": "text", "text": v.to_string()}],
        "structuredContent": v,
        "isError": false,
    })
}

/// A request the API would refuse. A malformed input (400) is a JSON-RPC "invalid params"
/// error naming the field; anything else (`tenant_mismatch`, `unavailable`, ...) is a tool
/// execution error the assistant can read, with the API's code in the text.
fn tool_failure(state: &AppState, e: ApiError) -> Result<Value, RpcError> {
    state.metrics.refused(e.code);
    if e.code == Code::InvalidRequest.as_str() {
        let mut data = json!({"code": e.code});
        if let Some(f) = &e.field {
            data["field"] = json!(f);
        }
        return Err(RpcError {
            code: INVALID_PARAMS,
            message: e.error,
            data: Some(data),
        });
    }
    Ok(json!({
        "content": [{"type": "text", "text": format!("{} ({})", e.error, e.code)}],
        "isError": true,
    }))
}

async fn call_tool(
    state: &AppState,
    caller: &Authenticated,
    params: Option<&Value>,
    started: Instant,
) -> Result<Value, RpcError> {
    let name = params
        .and_then(|p| p.get("name"))
        .and_then(Value::as_str)
        .ok_or_else(|| RpcError::new(INVALID_PARAMS, "tools/call needs params.name (a string)"))?;
    let empty = Value::Object(Map::new());
    let args = match params.and_then(|p| p.get("arguments")) {
        None | Some(Value::Null) => &empty,
        Some(a @ Value::Object(_)) => a,
        Some(_) => {
            return Err(RpcError::new(
                INVALID_PARAMS,
                "params.arguments must be an object",
            ))
        }
    };
    match name {
        "route" | "explain" => {
            let bytes = serde_json::to_vec(args).unwrap_or_default();
            let answer = match parse_body(&bytes) {
                Ok(body) => {
                    decide_and_record(state, caller, body, name == "explain", started).await
                }
                Err(e) => Err(e),
            };
            match answer.and_then(|out| {
                serde_json::from_slice::<Value>(&out)
                    .map_err(|e| ApiError::new(Code::Internal, e.to_string()))
            }) {
                Ok(v) => Ok(tool_result(v)),
                Err(e) => tool_failure(state, e),
            }
        }
        "list_capabilities" => match list_capabilities(state, caller, args) {
            Ok(v) => Ok(tool_result(v)),
            Err(e) => tool_failure(state, e),
        },
        "approval_status" => {
            let id = args
                .get("approval_id")
                .and_then(Value::as_str)
                .filter(|id| crate::engine::valid_id(id))
                .ok_or_else(|| {
                    RpcError::new(
                        INVALID_PARAMS,
                        "approval_status needs arguments.approval_id (an approval id, apr_…)",
                    )
                })?;
            match super::approvals::status_for(state, caller, id) {
                Ok(v) => Ok(tool_result(v)),
                Err(e) => tool_failure(state, e),
            }
        }
        other => Err(RpcError::new(
            INVALID_PARAMS,
            format!(
                "unknown tool {other:?}; this server offers route, explain, list_capabilities and approval_status"
            ),
        )),
    }
}

fn string_arg<'a>(args: &'a Value, key: &str) -> Result<Option<&'a str>, ApiError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ApiError::invalid(key, format!("{key:?} must be a string"))),
    }
}

/// `list_capabilities`: the registry, narrowed by what the policy allows the tenant (the
/// token's own when it is bound), and by environment.
fn list_capabilities(
    state: &AppState,
    caller: &Authenticated,
    args: &Value,
) -> Result<Value, ApiError> {
    if let Some(obj) = args.as_object() {
        if let Some(k) = obj.keys().find(|k| *k != "env" && *k != "tenant_id") {
            return Err(ApiError::invalid(k.clone(), format!("unknown field {k:?}")));
        }
    }
    let env = string_arg(args, "env")?;
    let asked = string_arg(args, "tenant_id")?;
    let tenant = match (caller.tenant(), asked) {
        (Some(bound), Some(t)) if bound != t => {
            return Err(ApiError::new(
                Code::TenantMismatch,
                "this token is bound to another tenant",
            ))
        }
        (Some(bound), _) => Some(bound),
        (None, t) => t,
    };
    let snap = state
        .snapshot
        .load_full()
        .ok_or_else(|| ApiError::unavailable("no policy set is loaded yet; see /api/status"))?;
    if let Some(e) = env {
        if snap.env_index(e).is_none() {
            return Err(ApiError::invalid(
                "env",
                format!(
                    "unknown environment {e:?} (known: {})",
                    snap.settings.environments.join(", ")
                ),
            ));
        }
    }
    if let Some(t) = tenant {
        if !valid_id(t) {
            return Err(ApiError::invalid(
                "tenant_id",
                format!("{t:?} is not a valid id"),
            ));
        }
    }
    let capabilities = capabilities_for(&snap, env, tenant);
    Ok(json!({
        "policy_version": snap.version,
        "env": env,
        "tenant_id": tenant,
        "capabilities": capabilities,
    }))
}

/// Each capability with its description. With a tenant: only those `decide` allows it for
/// some data label (in `env`, or any environment), listing where; without one, `env` keeps
/// the capabilities an enabled worker offers there. Asking the engine itself, rather than
/// reading rules here, keeps one definition of "allowed".
fn capabilities_for(snap: &Snapshot, env: Option<&str>, tenant: Option<&str>) -> Vec<Value> {
    let envs: Vec<&str> = match env {
        Some(e) => vec![e],
        None => snap
            .settings
            .environments
            .iter()
            .map(String::as_str)
            .collect(),
    };
    let mut out = Vec::new();
    for cap in &snap.capabilities {
        let mut entry = serde_json::to_value(cap).unwrap_or_else(|_| json!({"id": cap.id}));
        match tenant {
            Some(t) => {
                let mut allowed = Vec::new();
                for e in &envs {
                    let labels: Vec<&str> = snap
                        .settings
                        .data_labels
                        .iter()
                        .map(String::as_str)
                        .filter(|l| {
                            let req = Request {
                                capability_id: &cap.id,
                                env: e,
                                data_label: l,
                                tenant_id: t,
                            };
                            decide(snap, &req, false).is_ok_and(|d| d.allowed)
                        })
                        .collect();
                    if !labels.is_empty() {
                        allowed.push(json!({"env": e, "data_labels": labels}));
                    }
                }
                if allowed.is_empty() {
                    continue;
                }
                entry["allowed"] = json!(allowed);
            }
            None => {
                if let Some(e) = env {
                    let offered = snap.workers_offering(&cap.id).iter().any(|w| {
                        snap.worker(w)
                            .is_some_and(|w| w.enabled && w.environments.iter().any(|x| x == e))
                    });
                    if !offered {
                        continue;
                    }
                }
            }
        }
        out.push(entry);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_keeps_a_supported_version_and_offers_ours_otherwise() {
        assert_eq!(negotiate("2025-06-18"), "2025-06-18");
        assert_eq!(negotiate("2025-03-26"), "2025-03-26");
        assert_eq!(negotiate("2024-11-05"), "2024-11-05");
        assert_eq!(negotiate("2025-11-25"), PROTOCOL_VERSION);
        assert_eq!(negotiate(""), PROTOCOL_VERSION);
    }

    #[test]
    fn initialize_needs_a_version() {
        let e = initialize(Some(&json!({}))).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        let r = initialize(Some(&json!({"protocolVersion": "2099-01-01"}))).unwrap();
        assert_eq!(r["protocolVersion"], PROTOCOL_VERSION);
        assert!(r["capabilities"]["tools"].is_object());
    }

    #[test]
    fn every_tool_declares_an_object_input_and_output_schema() {
        let tools = tools();
        let names: Vec<&str> = tools
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["route", "explain", "approval_status", "list_capabilities"]
        );
        for t in tools.as_array().unwrap() {
            assert_eq!(t["inputSchema"]["type"], "object", "{t}");
            assert_eq!(t["outputSchema"]["type"], "object", "{t}");
        }
        // route takes exactly what /api/route takes.
        let props = tools[0]["inputSchema"]["properties"].as_object().unwrap();
        for k in [
            "capability_id",
            "env",
            "data_label",
            "tenant_id",
            "dry_run",
            "context",
        ] {
            assert!(props.contains_key(k), "{k}");
        }
    }
}

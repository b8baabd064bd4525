//! Audit, token and secret endpoints.

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::auth::{tenant_mismatch, Caller};
use super::errors::{ApiError, Code};
use super::record;
use super::route::read_json_body;
use super::state::{now_ms, AppState};
use crate::store::audit::{AuditQuery, RecordKind, MAX_QUERY_LIMIT};
use crate::store::secrets::{
    Caller as ReleaseCaller, DecisionFacts, Refusal, ReleaseError, SecretError,
};
use crate::store::tokens::{NewToken, RateLimit, Scope, TokenError};

fn internal(e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "internal error");
    ApiError::new(Code::Internal, "internal error; see the daemon's log")
}

// ---- audit ---------------------------------------------------------------------------

/// Parse an RFC 3339 time or a number of milliseconds since the epoch.
fn parse_time(field: &str, v: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .map_err(|_| {
            ApiError::invalid(
                field,
                format!("{field} must be RFC 3339 (2026-01-02T03:04:05Z) or epoch milliseconds"),
            )
        })
}

/// `GET /api/audit?tenant_id=&capability_id=&allowed=&since=&until=&after_seq=&limit=&tail=`
pub async fn audit_query(
    caller: Caller,
    req: HttpRequest,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut q = AuditQuery::default();
    for (k, v) in query_pairs(&req)? {
        match k.as_str() {
            "tenant_id" => q.tenant_id = Some(v),
            "capability_id" => q.capability_id = Some(v),
            "allowed" => {
                q.allowed =
                    Some(v.parse().map_err(|_| {
                        ApiError::invalid("allowed", "allowed must be true or false")
                    })?)
            }
            "kind" => {
                q.kind =
                    Some(serde_json::from_value::<RecordKind>(json!(v)).map_err(|_| {
                        ApiError::invalid("kind", format!("unknown record kind {v:?}"))
                    })?)
            }
            "since" => q.since_ms = Some(parse_time("since", &v)?),
            "until" => q.until_ms = Some(parse_time("until", &v)?),
            "after_seq" => {
                q.after_seq =
                    Some(v.parse().map_err(|_| {
                        ApiError::invalid("after_seq", "after_seq must be a number")
                    })?)
            }
            "limit" | "tail" => {
                let n: usize = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_QUERY_LIMIT).contains(n))
                    .ok_or_else(|| {
                        ApiError::invalid(k.clone(), format!("{k} must be 1..={MAX_QUERY_LIMIT}"))
                    })?;
                q.limit = n;
                q.newest = k == "tail";
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    format!("unknown query parameter {other:?}"),
                ))
            }
        }
    }
    // A tenant-bound token reads its tenant's records only.
    if let Some(t) = caller.tenant() {
        match &q.tenant_id {
            Some(asked) if asked != t => return Err(tenant_mismatch()),
            _ => q.tenant_id = Some(t.to_string()),
        }
    }
    let audit = state.stores.audit.clone();
    let records = web::block(move || audit.query(&q))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let next_after = records.last().map(|r| r.seq);
    // Serialized straight to text: a record's context is the client's exact JSON text
    // (a `serde_json::Value` would re-parse, and round, its numbers).
    #[derive(serde::Serialize)]
    struct Page<'a> {
        records: &'a [crate::store::audit::AuditRecord],
        next_after_seq: Option<u64>,
    }
    let body = serde_json::to_vec(&Page {
        records: &records,
        next_after_seq: next_after,
    })
    .map_err(internal)?;
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body))
}

/// `GET /api/audit/{decision_id}`
pub async fn audit_show(
    caller: Caller,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let audit = state.stores.audit.clone();
    match web::block(move || audit.by_decision(&id))
        .await
        .map_err(internal)?
        .map_err(internal)?
    {
        Some(r) => {
            if caller.tenant().is_some() && r.entry.tenant_id.as_deref() != caller.tenant() {
                return Err(tenant_mismatch());
            }
            Ok(HttpResponse::Ok().json(r))
        }
        None => Err(ApiError::not_found(
            "no decision with this id in the audit log",
        )),
    }
}

/// `GET /api/audit/verify`
pub async fn audit_verify(
    caller: Caller,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    // The chain runs through every tenant's records; its length and head are not one
    // tenant's to see.
    caller.require_unbound("verify walks the records of")?;
    let audit = state.stores.audit.clone();
    let report = web::block(move || audit.verify())
        .await
        .map_err(internal)?
        .map_err(internal)?;
    Ok(HttpResponse::Ok().json(report))
}

/// A query string as its decoded `(name, value)` pairs, in order, decoded by serde (the
/// `web::Query` extractor's `application/x-www-form-urlencoded` rules: `+` is a space,
/// `%XX` a byte, a name without `=` has an empty value). Each handler then matches the
/// names itself, so an unknown or malformed parameter is refused with its own message in
/// the order the client wrote them, as before (a typed struct would report them in field
/// order, and refuse a repeated name that today is "last one wins").
pub(crate) fn query_pairs(req: &HttpRequest) -> Result<Vec<(String, String)>, ApiError> {
    web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::invalid("query", format!("the query string does not decode: {e}")))
}

// ---- tokens --------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    name: String,
    scopes: Vec<String>,
    tenant_id: Option<String>,
    expires_in_secs: Option<u64>,
    rate_limit_per_minute: Option<u32>,
    rate_burst: Option<u32>,
}

fn token_error(e: TokenError) -> ApiError {
    match e {
        // The store names its own fields; the client must see the ones it sent.
        TokenError::Invalid { field, message } => {
            let field = match field {
                "expires_at_ms" => "expires_in_secs",
                "rate_limit.per_minute" => "rate_limit_per_minute",
                "rate_limit.burst" => "rate_burst",
                f => f,
            };
            ApiError::invalid(field, message)
        }
        other => internal(other),
    }
}

/// `POST /api/tokens`: the token is in this response and nowhere else, ever.
pub async fn token_create(
    caller: Caller,
    req: HttpRequest,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let bytes = read_json_body(&req, payload).await?;
    let b: TokenBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid("body", format!("invalid token request: {e}")))?;
    // A tenant-bound admin issues tokens for its own tenant only: it cannot mint a wider one.
    let tenant_id = match (caller.tenant(), b.tenant_id) {
        (Some(own), None) => Some(own.to_string()),
        (Some(own), Some(asked)) if asked != own => return Err(tenant_mismatch()),
        (_, asked) => asked,
    };
    let mut scopes = Vec::new();
    for s in &b.scopes {
        scopes.push(
            s.parse::<Scope>()
                .map_err(|e| ApiError::invalid("scopes", e.to_string()))?,
        );
    }
    let now = now_ms();
    let new = NewToken {
        name: b.name,
        scopes,
        tenant_id,
        // Saturating: a lifetime beyond what an i64 of milliseconds holds is "never" in
        // practice, not a wrapped negative number (which read as an expiry in the past).
        expires_at_ms: b
            .expires_in_secs
            .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000))),
        rate_limit: b.rate_limit_per_minute.map(|per_minute| RateLimit {
            per_minute,
            burst: b.rate_burst.unwrap_or(per_minute),
        }),
    };
    let tokens = state.stores.tokens.clone();
    let (issued, info) = web::block(move || tokens.issue(new, now))
        .await
        .map_err(internal)?
        .map_err(token_error)?;
    let (id, name) = (info.id.clone(), info.name.clone());
    let recorded = record::event(&state, RecordKind::TokenIssue, Some(caller.id()), |e| {
        e.tenant_id = info.tenant_id.clone();
        e.detail = Some(format!("issued {id} ({name})"));
    })
    .await;
    if let Err(e) = recorded {
        // Fail closed: a credential that is not in the audit log must not exist.
        let tokens = state.stores.tokens.clone();
        let id = info.id.clone();
        let _ = web::block(move || tokens.revoke(&id)).await;
        return Err(e);
    }
    tracing::info!(token_id = %info.id, name = %info.name, "token issued");
    Ok(HttpResponse::Created().json(json!({"token": issued.expose(), "info": info})))
}

/// `GET /api/tokens`: metadata only.
pub async fn token_list(caller: Caller, state: web::Data<AppState>) -> HttpResponse {
    let mut tokens = state.stores.tokens.list();
    if let Some(t) = caller.tenant() {
        tokens.retain(|i| i.tenant_id.as_deref() == Some(t));
    }
    HttpResponse::Ok().json(json!({ "tokens": tokens }))
}

/// `DELETE /api/tokens/{id}`: effective at once.
pub async fn token_revoke(
    caller: Caller,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let id = path.into_inner();
    let target_tenant = state
        .stores
        .tokens
        .list()
        .into_iter()
        .find(|i| i.id == id)
        .and_then(|i| i.tenant_id);
    if let Some(t) = caller.tenant() {
        // Another tenant's (or an unbound) token is not this token's to see, let alone revoke.
        if target_tenant.as_deref() != Some(t) {
            return Err(ApiError::not_found("no token with this id"));
        }
    }
    let tokens = state.stores.tokens.clone();
    let id2 = id.clone();
    let found = web::block(move || tokens.revoke(&id2))
        .await
        .map_err(internal)?
        .map_err(token_error)?;
    if !found {
        return Err(ApiError::not_found("no token with this id"));
    }
    record::event(&state, RecordKind::TokenRevoke, Some(caller.id()), |e| {
        e.tenant_id = target_tenant;
        e.detail = Some(format!("revoked {id}"))
    })
    .await?;
    tracing::info!(token_id = %id, "token revoked");
    Ok(HttpResponse::Ok().json(json!({"revoked": id})))
}

// ---- secrets -------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretBody {
    value: zeroize::Zeroizing<String>,
    /// The owning tenant (unbound writers only; a bound writer's secrets are its tenant's).
    tenant_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    decision_id: String,
}

fn secret_error(e: SecretError) -> ApiError {
    match e {
        SecretError::InvalidName { .. } => ApiError::invalid("name", e.to_string()),
        SecretError::ValueTooLarge { .. } => ApiError::invalid("value", e.to_string()),
        SecretError::NotOwner { .. } => ApiError::new(Code::TenantMismatch, e.to_string()),
        other => internal(other),
    }
}

/// `PUT /api/secrets/{name}` `{"value": "..."}`
pub async fn secret_put(
    caller: Caller,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    // Parse from the request buffer itself, then wipe it: a copy (as before) left the
    // original buffer holding the value in freed memory.
    let mut bytes = read_json_body(&req, payload).await?;
    let parsed = serde_json::from_slice::<SecretBody>(&bytes);
    zeroize::Zeroize::zeroize(&mut bytes[..]);
    // serde_json's error text can quote input; never echo it for a secret body.
    let body = parsed.map_err(|_| {
        ApiError::invalid(
            "body",
            "the body must be {\"value\": \"<string>\"} (and optionally \"tenant_id\")",
        )
    })?;
    if let Some(t) = &body.tenant_id {
        if !crate::engine::valid_id(t) {
            return Err(ApiError::invalid(
                "tenant_id",
                "tenant_id is not a valid id",
            ));
        }
    }
    let st = state.clone();
    let n = name.clone();
    let writer = caller.tenant().map(str::to_string);
    let (meta, undo) = web::block(move || {
        st.stores.secrets.put_undoable(
            &n,
            body.value.as_bytes(),
            now_ms(),
            writer.as_deref(),
            body.tenant_id.as_deref(),
        )
    })
    .await
    .map_err(internal)?
    .map_err(secret_error)?;
    record_secret_change(&state, &caller, RecordKind::SecretStore, &name, undo).await?;
    Ok(HttpResponse::Ok().json(meta))
}

/// Audit a secret change. Fail closed: a change that is not in the audit log must not stay,
/// so on failure it is taken back (unless a later change already replaced it) before the 503.
async fn record_secret_change(
    state: &web::Data<AppState>,
    caller: &Caller,
    kind: RecordKind,
    name: &str,
    undo: crate::store::secrets::Undo,
) -> Result<(), ApiError> {
    // The record belongs to the secret's tenant (its owner), so that tenant's auditors see
    // every change to it, whoever made it.
    let owner = undo.owner();
    let recorded = record::event(state, kind, Some(caller.id()), |e| {
        e.tenant_id = owner;
        e.detail = Some(name.to_string())
    })
    .await;
    let Err(err) = recorded else {
        return Ok(());
    };
    let st = state.clone();
    match web::block(move || st.stores.secrets.undo(undo)).await {
        Ok(Ok(true)) => tracing::warn!("secret change undone: it could not be audited"),
        Ok(Ok(false)) => tracing::error!(
            "a secret change could not be audited and was not undone: a later change replaced it"
        ),
        Ok(Err(e)) => tracing::error!(error = %e, "could not undo an unaudited secret change"),
        Err(e) => tracing::error!(error = %e, "could not undo an unaudited secret change"),
    }
    Err(err)
}

/// `GET /api/secrets`: names, owners and times, never values. A tenant-bound token sees
/// its tenant's secrets only.
pub async fn secret_list(
    caller: Caller,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let mut list = state.stores.secrets.list().map_err(secret_error)?;
    if let Some(t) = caller.tenant() {
        list.retain(|m| m.tenant_id.as_deref() == Some(t));
    }
    Ok(HttpResponse::Ok().json(json!({"secrets": list})))
}

/// `DELETE /api/secrets/{name}`
pub async fn secret_delete(
    caller: Caller,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    let st = state.clone();
    let n = name.clone();
    let writer = caller.tenant().map(str::to_string);
    let undo = web::block(move || st.stores.secrets.delete_undoable(&n, writer.as_deref()))
        .await
        .map_err(internal)?
        .map_err(secret_error)?;
    let Some(undo) = undo else {
        return Err(ApiError::not_found("no secret with this name"));
    };
    record_secret_change(&state, &caller, RecordKind::SecretDelete, &name, undo).await?;
    Ok(HttpResponse::Ok().json(json!({"deleted": name})))
}

/// `POST /api/secrets/{name}/release` `{"decision_id"}`: the value, only as SPEC 6 allows.
/// Every release and every refusal is audited (without the value).
pub async fn secret_release(
    auth: Caller,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    let name = path.into_inner();
    let bytes = read_json_body(&req, payload).await?;
    // A token without the scope is refused before its input is even looked at (and the
    // refusal is recorded, with the name and id only when they are well-formed).
    if !(auth.allows(Scope::SecretsRelease) || auth.allows(Scope::Admin)) {
        let name = crate::engine::valid_id(&name).then_some(name);
        let did = serde_json::from_slice::<ReleaseBody>(&bytes)
            .ok()
            .map(|b| b.decision_id)
            .filter(|d| well_formed_decision_id(d));
        record::event(&state, RecordKind::SecretRefusal, Some(auth.id()), |e| {
            e.decision_id = did;
            e.allowed = Some(false);
            e.deny_reason = Some(Refusal::MissingScope.code().to_string());
            e.detail = name;
        })
        .await?;
        let r = Refusal::MissingScope;
        return Err(super::errors::refusal(r));
    }
    let body: ReleaseBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::invalid("body", format!("invalid release request: {e}")))?;
    // Malformed input is a 400 before anything is recorded: refusal records hold only a
    // valid secret name and a well-formed decision id, never unbounded client input.
    if !crate::engine::valid_id(&name) {
        return Err(ApiError::invalid(
            "name",
            "a secret name is 1 to 128 characters from A-Z a-z 0-9 . _ : @ / -",
        ));
    }
    if !well_formed_decision_id(&body.decision_id) {
        return Err(ApiError::invalid(
            "decision_id",
            "decision_id must be a decision id as /api/route returned it (a hyphenated UUID)",
        ));
    }

    let audit = state.stores.audit.clone();
    let did = body.decision_id.clone();
    let record = web::block(move || audit.by_decision(&did))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let snap = state.snapshot.load_full();
    let facts = record.as_ref().map(|r| {
        let worker_secrets = r
            .entry
            .worker_id
            .as_deref()
            .and_then(|w| {
                snap.as_ref()
                    .and_then(|s| s.worker(w))
                    .map(|w| w.secrets.clone())
            })
            .unwrap_or_default();
        (
            r.entry.allowed == Some(true),
            r.entry.dry_run,
            r.entry.ts_ms,
            worker_secrets,
            r.entry.tenant_id.clone().unwrap_or_default(),
        )
    });
    let facts_ref = facts
        .as_ref()
        .map(|(allowed, dry_run, ts, ws, tenant)| DecisionFacts {
            allowed: *allowed,
            dry_run: *dry_run,
            decided_at_ms: *ts,
            worker_secrets: ws.as_slice(),
            tenant_id: tenant.as_str(),
        });
    let who = ReleaseCaller {
        tenant: auth.tenant(),
        is_admin: auth.allows(Scope::Admin),
        has_release_scope: auth.allows(Scope::SecretsRelease),
    };
    let ttl_ms = (state.config.release_ttl_secs as i64).saturating_mul(1000);
    let outcome = state
        .stores
        .secrets
        .release(&name, facts_ref.as_ref(), &who, now_ms(), ttl_ms);
    let token_id = auth.id().to_string();
    let decision_tenant = facts.as_ref().map(|f| f.4.clone());
    let worker = record.as_ref().and_then(|r| r.entry.worker_id.clone());
    match outcome {
        Ok(value) => {
            record::event(&state, RecordKind::SecretRelease, Some(&token_id), |e| {
                e.decision_id = Some(body.decision_id.clone());
                e.tenant_id = decision_tenant.clone();
                e.worker_id = worker.clone();
                e.allowed = Some(true);
                e.detail = Some(name.clone());
            })
            .await?;
            let out = released_body(&name, &value, &body.decision_id)?;
            Ok(HttpResponse::Ok()
                .content_type("application/json")
                .body(out))
        }
        Err(ReleaseError::Refused(r)) => {
            record::event(&state, RecordKind::SecretRefusal, Some(&token_id), |e| {
                e.decision_id = Some(body.decision_id.clone());
                e.tenant_id = decision_tenant.clone();
                e.worker_id = worker.clone();
                e.allowed = Some(false);
                e.deny_reason = Some(r.code().to_string());
                e.detail = Some(name.clone());
            })
            .await?;
            Err(super::errors::refusal(r))
        }
        Err(ReleaseError::Store(e)) => Err(secret_error(e)),
    }
}

/// A decision id as `/api/route` returns it: a hyphenated UUID (36 characters).
fn well_formed_decision_id(id: &str) -> bool {
    id.len() == 36 && uuid::Uuid::try_parse(id).is_ok()
}

/// The release response body, serialized straight from borrowed data into a buffer that is
/// wiped when actix drops the body (`Bytes::from_owner`). A `serde_json::Value` (as before)
/// held an unwiped copy of the value, and so did the `Vec` handed to actix.
fn released_body(name: &str, value: &[u8], decision_id: &str) -> Result<web::Bytes, ApiError> {
    #[derive(serde::Serialize)]
    struct Released<'a> {
        name: &'a str,
        value: &'a str,
        decision_id: &'a str,
    }
    // Values arrive as JSON strings, so they are UTF-8; the lossy copy is a fallback only.
    let lossy;
    let text: &str = match std::str::from_utf8(value) {
        Ok(s) => s,
        Err(_) => {
            lossy = zeroize::Zeroizing::new(String::from_utf8_lossy(value).into_owned());
            lossy.as_str()
        }
    };
    // Room for the worst-case escaping (`\u00XX`, 6 bytes a byte) so the buffer never
    // reallocates and leaves a copy behind.
    let cap = 6 * (text.len() + name.len() + decision_id.len()) + 64;
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(cap));
    let released = Released {
        name,
        value: text,
        decision_id,
    };
    serde_json::to_writer(&mut *out, &released).map_err(internal)?;
    Ok(web::Bytes::from_owner(out))
}

/// `POST /api/keys/rotate` (admin): re-encrypt every secret under a new master key.
pub async fn secret_rotate(
    caller: Caller,
    state: web::Data<AppState>,
) -> Result<HttpResponse, ApiError> {
    caller.require_unbound("the master key protects the secrets of")?;
    let st = state.clone();
    let report = web::block(move || {
        st.stores
            .secrets
            .rotate_key(&st.stores.key_sources, &st.stores.key_source)
    })
    .await
    .map_err(internal)?
    .map_err(|e| match e {
        SecretError::Key(k) => ApiError::new(Code::CannotRotate, k.to_string()),
        other => internal(other),
    })?;
    tracing::info!(
        old_key_id = %report.old_key_id,
        new_key_id = %report.new_key_id,
        reencrypted = report.reencrypted,
        token_id = %caller.id(),
        "master key rotated"
    );
    // The keys already changed; a record that cannot be written is a 503 that says so.
    record::event(&state, RecordKind::KeyRotate, Some(caller.id()), |e| {
        e.detail = Some(format!(
            "{} -> {} ({} re-encrypted{})",
            report.old_key_id,
            report.new_key_id,
            report.reencrypted,
            if report.resumed { ", resumed" } else { "" }
        ))
    })
    .await?;
    Ok(HttpResponse::Ok().json(json!({
        "old_key_id": report.old_key_id, "new_key_id": report.new_key_id,
        "reencrypted": report.reencrypted, "resumed": report.resumed,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_decode_in_order_plus_percent_and_bare_names() {
        let req =
            actix_web::test::TestRequest::with_uri("/x?b=1+2&a=%41%zz&&c&b=3").to_http_request();
        let pairs = query_pairs(&req).unwrap();
        let want = [("b", "1 2"), ("a", "A%zz"), ("c", ""), ("b", "3")];
        assert_eq!(
            pairs,
            want.map(|(k, v)| (k.to_string(), v.to_string())).to_vec()
        );
    }
}

//! The gate every request passes: Host and Origin checks (DNS rebinding, cross-site
//! requests), then the bearer token, its rate limit, and the scope the endpoint needs.
//!
//! Handlers never see an unauthenticated request (except `/health` and `/ready`); the
//! caller's token is in the request extensions as `Arc<Authenticated>`.

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage};

use super::errors::ApiError;
use super::guard;
use super::state::{now_ms, AppState};
use crate::store::tokens::{bearer_token, Authenticated, Scope};

/// What an endpoint requires of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token (`/health`, `/ready`).
    Open,
    /// Any valid token.
    AnyToken,
    /// A token with this scope (admin has every scope).
    Scope(Scope),
}

/// The access table: one place that says who may call what.
pub fn access(method: &Method, path: &str) -> Access {
    match path {
        "/health" | "/ready" => Access::Open,
        "/api/route" => Access::Scope(Scope::Route),
        "/metrics" => Access::Scope(Scope::Metrics),
        "/api/reload" | "/api/secrets/rotate-key" => Access::Scope(Scope::Admin),
        p if p.starts_with("/api/tokens") => Access::Scope(Scope::Admin),
        p if p.starts_with("/api/audit") => Access::Scope(Scope::Audit),
        // The release handler checks its own scope so that a refusal is audited.
        p if p.starts_with("/api/secrets/")
            && p.ends_with("/release")
            && method == Method::POST =>
        {
            Access::AnyToken
        }
        p if p == "/api/secrets" || p.starts_with("/api/secrets/") => {
            Access::Scope(Scope::SecretsWrite)
        }
        _ => Access::AnyToken,
    }
}

/// The middleware (`actix_web::middleware::from_fn`).
pub async fn gate(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let state = req
        .app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::new(500, "internal", "state missing"))?;

    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if !guard::host_allowed(header("host"), state.port()) {
        return Err(ApiError::new(
            403,
            "bad_host",
            "the Host header must name this loopback listener (DNS rebinding protection)",
        )
        .into());
    }
    if !guard::origin_allowed(header("origin"), &state.config.allowed_origins) {
        return Err(ApiError::new(
            403,
            "bad_origin",
            "requests from this Origin are not allowed",
        )
        .into());
    }

    let needed = access(req.method(), req.path());
    if needed == Access::Open {
        return next.call(req).await;
    }
    let auth: Arc<Authenticated> = match bearer_token(header("authorization"))
        .and_then(|t| state.stores.tokens.authenticate(t, now_ms()))
    {
        Ok(a) => a,
        Err(e) => {
            state.metrics.refused("unauthorized");
            tracing::debug!(reason = ?e, path = req.path(), "unauthenticated request");
            return Err(
                ApiError::new(401, "unauthorized", "a valid bearer token is required")
                    .with_header("WWW-Authenticate", "Bearer".into())
                    .into(),
            );
        }
    };

    let mut rate_headers: Vec<(&'static str, String)> = Vec::new();
    if let Some(d) = auth.rate_check(Instant::now()) {
        rate_headers.push(("X-RateLimit-Limit", d.limit.to_string()));
        rate_headers.push(("X-RateLimit-Remaining", d.remaining.to_string()));
        rate_headers.push(("X-RateLimit-Reset", d.reset_secs.to_string()));
        if !d.allowed {
            state.metrics.refused("rate_limited");
            let retry = d.retry_after_secs.unwrap_or(1).max(1);
            let mut e = ApiError::new(
                429,
                "rate_limited",
                format!("rate limit exceeded; retry in {retry} s"),
            )
            .with_header("Retry-After", retry.to_string());
            e.headers.extend(rate_headers);
            return Err(e.into());
        }
    }

    if let Access::Scope(scope) = needed {
        if !auth.allows(scope) {
            state.metrics.refused("forbidden");
            let mut e = ApiError::new(
                403,
                "forbidden",
                format!("this token lacks the {scope} scope"),
            );
            e.headers.extend(rate_headers);
            return Err(e.into());
        }
    }

    req.extensions_mut().insert(auth);
    let mut res = next.call(req).await?;
    for (k, v) in rate_headers {
        if let Ok(v) = HeaderValue::from_str(&v) {
            res.headers_mut()
                .insert(HeaderName::from_static(lower(k)), v);
        }
    }
    Ok(res)
}

fn lower(k: &'static str) -> &'static str {
    match k {
        "X-RateLimit-Limit" => "x-ratelimit-limit",
        "X-RateLimit-Remaining" => "x-ratelimit-remaining",
        _ => "x-ratelimit-reset",
    }
}

/// The caller's token, as the gate left it.
pub fn caller(req: &actix_web::HttpRequest) -> Option<Arc<Authenticated>> {
    req.extensions().get::<Arc<Authenticated>>().cloned()
}

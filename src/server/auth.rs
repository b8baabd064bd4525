//! The gate every request passes: Host and Origin checks (DNS rebinding, cross-site
//! requests), then the bearer token, its rate limit, and the scope the endpoint needs.
//!
//! Handlers never see an unauthenticated request (except `/health` and `/ready`); the
//! caller's token is in the request extensions as `Arc<Authenticated>`.
//!
//! CORS exists only when `allowed_origins` is configured: then a listed Origin gets
//! `Access-Control-Allow-Origin` on every answer (refusals included), and its preflight
//! (`OPTIONS` + `Access-Control-Request-Method`) is answered 204 without a token, since
//! browsers never send credentials on a preflight. An unlisted Origin is refused 403
//! `bad_origin`, preflight or not. Without the setting no CORS header is ever sent.

use std::sync::Arc;
use std::time::Instant;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, HttpResponse};

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
        "/mcp" => Access::Scope(Scope::Route),
        "/metrics" => Access::Scope(Scope::Metrics),
        "/api/reload" | "/api/keys/rotate" => Access::Scope(Scope::Admin),
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

/// The rate-limit response headers (lowercase: the form `HeaderName::from_static` wants).
const RATE_LIMIT: &str = "x-ratelimit-limit";
const RATE_REMAINING: &str = "x-ratelimit-remaining";
const RATE_RESET: &str = "x-ratelimit-reset";

/// What a CORS preflight may ask for: every method the API uses, and the two request headers
/// a browser client needs (the bearer token and the JSON content type).
const CORS_METHODS: &str = "GET, POST, PUT, DELETE";
const CORS_HEADERS: &str = "Authorization, Content-Type";
/// Response headers a browser script may read besides the safelisted ones.
const CORS_EXPOSE: &str =
    "Retry-After, WWW-Authenticate, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset";
/// How long a browser may cache a preflight answer (seconds).
const CORS_MAX_AGE: &str = "600";

/// What the checks decided about a request that may proceed.
enum Admit {
    /// An allowed-origin CORS preflight: answered here, never reaches a handler.
    Preflight,
    /// `/health`, `/ready`.
    Open,
    /// A valid token with the scope the endpoint needs, and its rate-limit headers.
    Token(Arc<Authenticated>, Vec<(&'static str, String)>),
}

/// The middleware (`actix_web::middleware::from_fn`).
///
/// Refusals are turned into responses here (not returned as errors) so that the CORS headers
/// an allowed browser origin needs are on them too: a page that cannot read a 401 or 429
/// cannot tell its user why. (Handler errors reach us already as responses; actix converts
/// them inside the route service.)
pub async fn gate<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return Ok(req
            .error_response(ApiError::new(500, "internal", "state missing"))
            .map_into_right_body());
    };
    let cors_configured = !state.config.allowed_origins.is_empty();
    let mut res = match admit(&req, &state) {
        Err(e) => req.error_response(e).map_into_right_body(),
        Ok(Admit::Preflight) => {
            let res = HttpResponse::NoContent()
                .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, CORS_METHODS))
                .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, CORS_HEADERS))
                .insert_header((header::ACCESS_CONTROL_MAX_AGE, CORS_MAX_AGE))
                .finish();
            req.into_response(res).map_into_right_body()
        }
        Ok(Admit::Open) => next.call(req).await?.map_into_left_body(),
        Ok(Admit::Token(auth, rate_headers)) => {
            req.extensions_mut().insert(auth);
            let mut res = next.call(req).await?.map_into_left_body();
            for (k, v) in rate_headers {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    res.headers_mut().insert(HeaderName::from_static(k), v);
                }
            }
            res
        }
    };
    if cors_configured {
        add_cors_headers(&mut res, &state.config.allowed_origins);
    }
    Ok(res)
}

/// `Vary: Origin` on every response (the answer depends on it once CORS is configured), and
/// `Access-Control-Allow-Origin` naming the caller's origin when that origin is listed.
fn add_cors_headers<B>(res: &mut ServiceResponse<B>, allowed_origins: &[String]) {
    let origin = res
        .request()
        .headers()
        .get(header::ORIGIN)
        .filter(|o| guard::origin_allowed(o.to_str().ok(), allowed_origins))
        .cloned();
    let h = res.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = origin {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(CORS_EXPOSE),
        );
    }
}

/// A loopback name or address with our port; beyond loopback (`--allow-non-loopback`) also an
/// IP literal naming the listener (see [`guard::ip_host_allowed`] for why that is safe).
fn host_ok(host: Option<&str>, state: &AppState) -> bool {
    let port = state.port();
    guard::host_allowed(host, port)
        || (!guard::is_loopback_listen(&state.config.listen)
            && guard::ip_host_allowed(host, state.config.listen.ip(), port))
}

/// Every check, in order: Host, Origin, CORS preflight, token, rate limit, scope.
fn admit(req: &ServiceRequest, state: &AppState) -> Result<Admit, ApiError> {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    if !host_ok(header("host"), state) {
        state.metrics.refused("bad_host");
        return Err(ApiError::new(
            403,
            "bad_host",
            "the Host header must name this loopback listener (DNS rebinding protection)",
        ));
    }
    let origin = header("origin");
    if !guard::origin_allowed(origin, &state.config.allowed_origins) {
        state.metrics.refused("bad_origin");
        return Err(ApiError::new(
            403,
            "bad_origin",
            "requests from this Origin are not allowed",
        ));
    }
    // A preflight carries no credentials by design; its origin was just checked.
    if origin.is_some()
        && req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return Ok(Admit::Preflight);
    }

    let needed = access(req.method(), req.path());
    if needed == Access::Open {
        return Ok(Admit::Open);
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
                    .with_header("WWW-Authenticate", "Bearer".into()),
            );
        }
    };

    let mut rate_headers: Vec<(&'static str, String)> = Vec::new();
    if let Some(d) = auth.rate_check(Instant::now()) {
        rate_headers.push((RATE_LIMIT, d.limit.to_string()));
        rate_headers.push((RATE_REMAINING, d.remaining.to_string()));
        rate_headers.push((RATE_RESET, d.reset_secs.to_string()));
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
            return Err(e);
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
            return Err(e);
        }
    }
    Ok(Admit::Token(auth, rate_headers))
}

/// The caller's token, as the gate left it.
pub fn caller(req: &actix_web::HttpRequest) -> Option<Arc<Authenticated>> {
    req.extensions().get::<Arc<Authenticated>>().cloned()
}

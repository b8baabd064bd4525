//! Who may call what. Two layers, both declared where the server is built:
//!
//! 1. [`gate`] wraps the whole app: `Host` (also the authority of an absolute-form target) and
//!    `Origin` checks (DNS rebinding, cross-site requests), CORS preflights and headers. It
//!    runs for every request, known path or not.
//! 2. [`Require`] wraps each endpoint, where `routes()` registers it: the bearer token, its
//!    rate limit and the scope the endpoint needs. It runs **after** the router matched, so it
//!    guards exactly the resource the request reaches, however its path was spelled
//!    (`/api/%74okens` is `/api/tokens` to the router, and so to the check). A path no
//!    endpoint declares reaches no handler: it is a JSON 404.
//!
//! Handlers take the caller as a [`Caller`] argument, which refuses (401) when no token was
//! checked for the request: an endpoint registered without [`Require`] cannot use a caller
//! it was never given. Handlers that act on one tenant's data check the token's binding
//! themselves ([`Caller::check_tenant`]).
//!
//! CORS exists only when `allowed_origins` is configured: then a listed Origin gets
//! `Access-Control-Allow-Origin` on every answer (refusals included), and its preflight
//! (`OPTIONS` + `Access-Control-Request-Method`) is answered 204 without a token, since
//! browsers never send credentials on a preflight. An unlisted Origin is refused 403
//! `bad_origin`, preflight or not. Without the setting no CORS header is ever sent.

use std::future::{ready, Future, Ready};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::{BoxBody, EitherBody, MessageBody};
use actix_web::dev::{forward_ready, Payload, Service, ServiceRequest, ServiceResponse, Transform};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::http::Method;
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest, HttpResponse};

use super::conn::{ConnGuard, TrackedBody};
use super::errors::{ApiError, Code};
use super::guard;
use super::state::{now_ms, AppState};
use crate::store::tokens::{bearer_token, Authenticated, Scope};

/// What an endpoint requires of the caller, declared where it is registered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token (`/health`, `/ready`).
    Open,
    /// Any valid token; the handler checks more itself (the secret release, whose refusals
    /// are audited).
    AnyToken,
    /// A token with this scope (admin has every scope).
    Scope(Scope),
    /// A token with either scope (one approval: the app that opened it, or an approver).
    EitherScope(Scope, Scope),
}

/// `X-RateLimit-*` headers to put on a response.
type RateHeaders = Vec<(&'static str, String)>;

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

/// The app-wide middleware (`actix_web::middleware::from_fn`): Host, Origin, CORS.
///
/// Refusals are turned into responses here (not returned as errors) so that the CORS headers
/// an allowed browser origin needs are on them too: a page that cannot read a 401 or 429
/// cannot tell its user why.
pub async fn gate<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    // The connection is busy from here until the response body is done (see `conn`).
    let busy = req.conn_data::<ConnGuard>().map(ConnGuard::begin);
    let res = gate_inner(req, next).await?.map_into_boxed_body();
    Ok(match busy {
        Some(busy) => res.map_body(|_, body| BoxBody::new(TrackedBody::new(body, busy))),
        None => res,
    })
}

async fn gate_inner<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<EitherBody<B>>, actix_web::Error> {
    let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
        return Ok(req
            .error_response(ApiError::new(Code::Internal, "state missing"))
            .map_into_right_body());
    };
    let cors_configured = !state.config.allowed_origins.is_empty();
    let mut res = match check_host_and_origin(&req, &state) {
        Err(e) => req.error_response(e).map_into_right_body(),
        Ok(true) => {
            let res = HttpResponse::NoContent()
                .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, CORS_METHODS))
                .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, CORS_HEADERS))
                .insert_header((header::ACCESS_CONTROL_MAX_AGE, CORS_MAX_AGE))
                .finish();
            req.into_response(res).map_into_right_body()
        }
        Ok(false) => next.call(req).await?.map_into_left_body(),
    };
    if cors_configured {
        add_cors_headers(&mut res, &state.config.allowed_origins);
    }
    // An error may leave a request body unread (a refused upload, a stalled chunked body):
    // close the connection after answering rather than wait for a body that may never come.
    if res.status().is_client_error() || res.status().is_server_error() {
        res.response_mut()
            .head_mut()
            .set_connection_type(actix_web::http::ConnectionType::Close);
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

fn bad_host(state: &AppState, why: &'static str) -> ApiError {
    state.metrics.refused("bad_host");
    ApiError::new(Code::BadHost, why)
}

/// Host (exactly one header; and the authority of an absolute-form target such as
/// `GET http://evil.example/api/status`, which a proxy-style client may send), then Origin.
/// `Ok(true)`: an allowed-origin CORS preflight, answered without a token.
fn check_host_and_origin(req: &ServiceRequest, state: &AppState) -> Result<bool, ApiError> {
    let mut hosts = req.headers().get_all(header::HOST);
    let host = hosts.next().map(|v| v.to_str().unwrap_or("\u{0}"));
    if hosts.next().is_some() {
        return Err(bad_host(
            state,
            "a request must carry exactly one Host header",
        ));
    }
    if !host_ok(host, state) {
        return Err(bad_host(
            state,
            "the Host header must name this loopback listener (DNS rebinding protection)",
        ));
    }
    if let Some(authority) = req.uri().authority() {
        if !host_ok(Some(authority.as_str()), state) {
            return Err(bad_host(
                state,
                "the request target must name this loopback listener (DNS rebinding protection)",
            ));
        }
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    if !guard::origin_allowed(origin, &state.config.allowed_origins) {
        state.metrics.refused("bad_origin");
        return Err(ApiError::new(
            Code::BadOrigin,
            "requests from this Origin are not allowed",
        ));
    }
    // A preflight carries no credentials by design; its origin was just checked.
    Ok(origin.is_some()
        && req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD))
}

/// The per-endpoint check: `web::resource(path).wrap(Require(Access::Scope(Scope::Admin)))`.
///
/// On success the token is in the request extensions (read it with [`Caller`]) and its
/// rate-limit headers are on the response; on refusal the request never reaches a handler.
#[derive(Debug, Clone, Copy)]
pub struct Require(pub Access);

impl<S, B> Transform<S, ServiceRequest> for Require
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Transform = RequireService<S>;
    type InitError = ();
    type Future = Ready<Result<Self::Transform, Self::InitError>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(RequireService {
            service: Rc::new(service),
            access: self.0,
        }))
    }
}

/// The service [`Require`] wraps an endpoint in.
pub struct RequireService<S> {
    service: Rc<S>,
    access: Access,
}

type LocalBoxFuture<T> = Pin<Box<dyn Future<Output = T>>>;

impl<S, B> Service<ServiceRequest> for RequireService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    B: MessageBody + 'static,
{
    type Response = ServiceResponse<EitherBody<B>>;
    type Error = actix_web::Error;
    type Future = LocalBoxFuture<Result<Self::Response, Self::Error>>;

    forward_ready!(service);

    fn call(&self, req: ServiceRequest) -> Self::Future {
        let service = self.service.clone();
        let access = self.access;
        Box::pin(async move {
            if access == Access::Open {
                return Ok(service.call(req).await?.map_into_left_body());
            }
            let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
                return Ok(req
                    .error_response(ApiError::new(Code::Internal, "state missing"))
                    .map_into_right_body());
            };
            match admit_token(&req, &state, access) {
                Err(e) => Ok(req.error_response(e).map_into_right_body()),
                Ok((auth, rate_headers)) => {
                    req.extensions_mut().insert(auth);
                    let mut res = service.call(req).await?.map_into_left_body();
                    for (k, v) in rate_headers {
                        if let Ok(v) = HeaderValue::from_str(&v) {
                            res.headers_mut().insert(HeaderName::from_static(k), v);
                        }
                    }
                    Ok(res)
                }
            }
        })
    }
}

/// The token, its rate limit, and the scope `access` needs.
fn admit_token(
    req: &ServiceRequest,
    state: &AppState,
    access: Access,
) -> Result<(Arc<Authenticated>, RateHeaders), ApiError> {
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let auth: Arc<Authenticated> = match bearer_token(authorization)
        .and_then(|t| state.stores.tokens.authenticate(t, now_ms()))
    {
        Ok(a) => a,
        Err(e) => {
            state.metrics.refused("unauthorized");
            tracing::debug!(reason = ?e, "unauthenticated request");
            return Err(unauthorized());
        }
    };

    let mut rate_headers: RateHeaders = Vec::new();
    if let Some(d) = auth.rate_check(Instant::now()) {
        rate_headers.push((RATE_LIMIT, d.limit.to_string()));
        rate_headers.push((RATE_REMAINING, d.remaining.to_string()));
        rate_headers.push((RATE_RESET, d.reset_secs.to_string()));
        if !d.allowed {
            state.metrics.refused("rate_limited");
            let retry = d.retry_after_secs.unwrap_or(1).max(1);
            let mut e = ApiError::new(
                Code::RateLimited,
                format!("rate limit exceeded; retry in {retry} s"),
            )
            .with_header("Retry-After", retry.to_string());
            e.headers.extend(rate_headers);
            return Err(e);
        }
    }

    if let Access::EitherScope(a, b) = access {
        if !auth.allows(a) && !auth.allows(b) {
            state.metrics.refused("forbidden");
            let mut e = ApiError::new(
                Code::Forbidden,
                format!("this token lacks the {a} or {b} scope"),
            );
            e.headers.extend(rate_headers);
            return Err(e);
        }
    }
    if let Access::Scope(scope) = access {
        if !auth.allows(scope) {
            state.metrics.refused("forbidden");
            let mut e = ApiError::new(
                Code::Forbidden,
                format!("this token lacks the {scope} scope"),
            );
            e.headers.extend(rate_headers);
            return Err(e);
        }
    }
    Ok((auth, rate_headers))
}

fn unauthorized() -> ApiError {
    ApiError::new(Code::Unauthorized, "a valid bearer token is required")
        .with_header("WWW-Authenticate", "Bearer".into())
}

/// The token [`Require`] checked for this request. Extracting it where none was checked is
/// a 401: fail closed.
#[derive(Debug, Clone)]
pub struct Caller(pub Arc<Authenticated>);

impl std::ops::Deref for Caller {
    type Target = Authenticated;
    fn deref(&self) -> &Authenticated {
        &self.0
    }
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Caller, ApiError>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<Arc<Authenticated>>()
                .cloned()
                .map(Caller)
                .ok_or_else(|| {
                    tracing::error!(
                        path = req.path(),
                        "a handler asked for a caller no check admitted"
                    );
                    unauthorized()
                }),
        )
    }
}

impl Caller {
    /// 403 `tenant_mismatch` unless this token may act for `tenant_id` (unbound tokens may
    /// act for any tenant).
    pub fn check_tenant(&self, tenant_id: &str) -> Result<(), ApiError> {
        if self.may_act_for(tenant_id) {
            Ok(())
        } else {
            Err(tenant_mismatch())
        }
    }

    /// 403 `tenant_mismatch` for a tenant-bound token, on an endpoint whose answer spans
    /// every tenant (`what` says what it covers, for the message).
    pub fn require_unbound(&self, what: &str) -> Result<(), ApiError> {
        match self.tenant() {
            None => Ok(()),
            Some(_) => Err(ApiError::new(
                Code::TenantMismatch,
                format!("{what} every tenant; use a token that is not bound to a tenant"),
            )),
        }
    }
}

/// 403 `tenant_mismatch`.
pub fn tenant_mismatch() -> ApiError {
    ApiError::new(
        Code::TenantMismatch,
        "this token is bound to another tenant",
    )
}

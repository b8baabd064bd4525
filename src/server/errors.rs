//! One error type for the HTTP boundary, one JSON shape: `{"error", "code", "field"?}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// An HTTP error as the client sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ApiError {
    #[serde(skip)]
    pub status: StatusCode,
    /// A sentence for a person.
    pub error: String,
    /// A stable code for a program.
    pub code: &'static str,
    /// The request field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// Extra headers (Retry-After, rate-limit headers).
    #[serde(skip)]
    pub headers: Vec<(&'static str, String)>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, error: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            error: error.into(),
            code,
            field: None,
            headers: Vec::new(),
        }
    }

    pub fn invalid(field: impl Into<String>, error: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(400, "invalid_request", error);
        e.field = Some(field.into());
        e
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(404, "not_found", what)
    }

    pub fn unavailable(why: impl Into<String>) -> ApiError {
        ApiError::new(503, "unavailable", why)
    }

    pub fn with_header(mut self, name: &'static str, value: String) -> ApiError {
        self.headers.push((name, value));
        self
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.error, self.code)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let mut b = HttpResponse::build(self.status);
        for (k, v) in &self.headers {
            b.insert_header((*k, v.as_str()));
        }
        b.content_type("application/json")
            .body(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// JSON 404 for unknown paths.
pub async fn not_found() -> HttpResponse {
    ApiError::not_found("no such endpoint").error_response()
}

/// JSON 405 for a known path with the wrong method.
pub async fn method_not_allowed() -> HttpResponse {
    ApiError::new(
        405,
        "method_not_allowed",
        "method not allowed on this endpoint",
    )
    .error_response()
}

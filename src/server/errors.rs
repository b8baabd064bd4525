//! One error type for the HTTP boundary, one JSON shape: `{"error", "code", "field"?}`.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde::Serialize;

/// Every error code the API answers with, and the HTTP status that goes with it: both are
/// chosen here and nowhere else (a handler names the code, never a status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    BadHost,
    BadOrigin,
    TenantMismatch,
    ApprovalMismatch,
    SelfApproval,
    NotOpener,
    DecisionDenied,
    DryRun,
    DecisionExpired,
    WorkerNotEntitled,
    NotFound,
    UnknownDecision,
    UnknownSecret,
    MethodNotAllowed,
    RequestTimeout,
    ApprovalUsed,
    ApprovalConflict,
    CannotRotate,
    BodyTooLarge,
    UnsupportedMediaType,
    InvalidPolicy,
    RateLimited,
    TooManyPendingApprovals,
    Internal,
    Unavailable,
}

impl Code {
    /// The code as the client sees it (`"code"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Code::InvalidRequest => "invalid_request",
            Code::Unauthorized => "unauthorized",
            Code::Forbidden => "forbidden",
            Code::BadHost => "bad_host",
            Code::BadOrigin => "bad_origin",
            Code::TenantMismatch => "tenant_mismatch",
            Code::ApprovalMismatch => "approval_mismatch",
            Code::SelfApproval => "self_approval",
            Code::NotOpener => "not_opener",
            Code::DecisionDenied => "decision_denied",
            Code::DryRun => "dry_run",
            Code::DecisionExpired => "decision_expired",
            Code::WorkerNotEntitled => "worker_not_entitled",
            Code::NotFound => "not_found",
            Code::UnknownDecision => "unknown_decision",
            Code::UnknownSecret => "unknown_secret",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::RequestTimeout => "request_timeout",
            Code::ApprovalUsed => "approval_used",
            Code::ApprovalConflict => "approval_conflict",
            Code::CannotRotate => "cannot_rotate",
            Code::BodyTooLarge => "body_too_large",
            Code::UnsupportedMediaType => "unsupported_media_type",
            Code::InvalidPolicy => "invalid_policy",
            Code::RateLimited => "rate_limited",
            Code::TooManyPendingApprovals => "too_many_pending_approvals",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
        }
    }

    /// The HTTP status every response with this code has.
    pub fn status(self) -> StatusCode {
        match self {
            Code::InvalidRequest => StatusCode::BAD_REQUEST,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Forbidden
            | Code::BadHost
            | Code::BadOrigin
            | Code::TenantMismatch
            | Code::ApprovalMismatch
            | Code::SelfApproval
            | Code::NotOpener
            | Code::DecisionDenied
            | Code::DryRun
            | Code::DecisionExpired
            | Code::WorkerNotEntitled => StatusCode::FORBIDDEN,
            Code::NotFound | Code::UnknownDecision | Code::UnknownSecret => StatusCode::NOT_FOUND,
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Code::ApprovalUsed | Code::ApprovalConflict | Code::CannotRotate => {
                StatusCode::CONFLICT
            }
            Code::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::InvalidPolicy => StatusCode::UNPROCESSABLE_ENTITY,
            Code::RateLimited | Code::TooManyPendingApprovals => StatusCode::TOO_MANY_REQUESTS,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// A refused secret release as the client sees it: the refusal's code (the one its audit
/// record carries) with that code's status.
pub fn refusal(r: crate::store::secrets::Refusal) -> ApiError {
    use crate::store::secrets::Refusal as R;
    let code = match r {
        R::MissingScope => Code::Forbidden,
        R::UnknownDecision => Code::UnknownDecision,
        R::DecisionDenied => Code::DecisionDenied,
        R::DryRun => Code::DryRun,
        R::DecisionExpired => Code::DecisionExpired,
        R::WorkerNotEntitled => Code::WorkerNotEntitled,
        R::TenantMismatch | R::OwnedByOtherTenant => Code::TenantMismatch,
        R::UnknownSecret => Code::UnknownSecret,
    };
    debug_assert_eq!(code.as_str(), r.code());
    ApiError::new(code, r.to_string())
}

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
    pub fn new(code: Code, error: impl Into<String>) -> ApiError {
        ApiError {
            status: code.status(),
            error: error.into(),
            code: code.as_str(),
            field: None,
            headers: Vec::new(),
        }
    }

    pub fn invalid(field: impl Into<String>, error: impl Into<String>) -> ApiError {
        let mut e = ApiError::new(Code::InvalidRequest, error);
        e.field = Some(field.into());
        e
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(Code::NotFound, what)
    }

    pub fn unavailable(why: impl Into<String>) -> ApiError {
        ApiError::new(Code::Unavailable, why)
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
        Code::MethodNotAllowed,
        "method not allowed on this endpoint",
    )
    .error_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::secrets::Refusal as R;

    #[test]
    fn a_refusal_answers_with_its_audit_code_404_when_unknown_else_403() {
        for r in [
            R::MissingScope,
            R::UnknownDecision,
            R::DecisionDenied,
            R::DryRun,
            R::DecisionExpired,
            R::WorkerNotEntitled,
            R::TenantMismatch,
            R::OwnedByOtherTenant,
            R::UnknownSecret,
        ] {
            let e = refusal(r);
            assert_eq!(e.code, r.code(), "{r:?}");
            let want = match r {
                R::UnknownDecision | R::UnknownSecret => 404,
                _ => 403,
            };
            assert_eq!(e.status.as_u16(), want, "{r:?}");
        }
    }
}

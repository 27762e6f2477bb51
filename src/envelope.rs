//! The one error shape every client sees: `{"error":{"code","message","traceId","retryable"}}`.

use bytes::Bytes;
use serde::Serialize;

use crate::policy::CriticalFailure;

/// Every error the sidecar itself can answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthenticated,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    HeadersTooLarge,
    RateLimited,
    Internal,
    BadUpstreamResponse,
    DependencyUnavailable,
    DeadlineExceeded,
    LoopDetected,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::HeadersTooLarge => 431,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::BadUpstreamResponse => 502,
            ErrorCode::DependencyUnavailable => 503,
            ErrorCode::DeadlineExceeded => 504,
            ErrorCode::LoopDetected => 508,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "BAD_REQUEST",
            ErrorCode::Unauthenticated => "UNAUTHENTICATED",
            ErrorCode::Forbidden => "FORBIDDEN",
            ErrorCode::NotFound => "NOT_FOUND",
            ErrorCode::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            ErrorCode::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            ErrorCode::HeadersTooLarge => "HEADERS_TOO_LARGE",
            ErrorCode::RateLimited => "RATE_LIMITED",
            ErrorCode::Internal => "INTERNAL",
            ErrorCode::BadUpstreamResponse => "BAD_UPSTREAM_RESPONSE",
            ErrorCode::DependencyUnavailable => "DEPENDENCY_UNAVAILABLE",
            ErrorCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            ErrorCode::LoopDetected => "LOOP_DETECTED",
        }
    }

    /// Whether the same request may succeed if the client tries again later.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::RateLimited
                | ErrorCode::Internal
                | ErrorCode::BadUpstreamResponse
                | ErrorCode::DependencyUnavailable
                | ErrorCode::DeadlineExceeded
        )
    }

    /// The client's message comes from the code alone, so nothing internal can leak into it.
    pub fn message(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "The request is not valid.",
            ErrorCode::Unauthenticated => "Authentication is required.",
            ErrorCode::Forbidden => "You are not allowed to do this.",
            ErrorCode::NotFound => "Nothing is here.",
            ErrorCode::MethodNotAllowed => "This method is not allowed here.",
            ErrorCode::PayloadTooLarge => "The request body is too large.",
            ErrorCode::HeadersTooLarge => "The request headers are too large.",
            ErrorCode::RateLimited => "Too many requests. Please slow down.",
            ErrorCode::Internal => "Something went wrong on our side.",
            ErrorCode::BadUpstreamResponse => "A service answered in a way we could not use.",
            ErrorCode::DependencyUnavailable => "A service this depends on is unavailable.",
            ErrorCode::DeadlineExceeded => "This took too long. Please try again.",
            ErrorCode::LoopDetected => "This request already passed through a BFF.",
        }
    }

    /// The envelope for an error status an upstream answered a `proxy` route with.
    pub fn for_upstream_status(status: u16) -> ErrorCode {
        match status {
            // An upstream never sees the client's credential, only the sidecar's: its 401 is
            // about the sidecar, and passing it on would make a client drop a valid session.
            401 => ErrorCode::BadUpstreamResponse,
            403 => ErrorCode::Forbidden,
            404 | 410 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            413 => ErrorCode::PayloadTooLarge,
            429 => ErrorCode::RateLimited,
            400..=499 => ErrorCode::BadRequest,
            _ => ErrorCode::BadUpstreamResponse,
        }
    }
}

/// An error ready to be written: status plus the envelope's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub status: u16,
    pub code: String,
    pub message: String,
    pub retryable: bool,
}

impl From<ErrorCode> for Envelope {
    fn from(code: ErrorCode) -> Self {
        Envelope {
            status: code.status(),
            code: code.as_str().to_string(),
            message: code.message().to_string(),
            retryable: code.retryable(),
        }
    }
}

impl From<&CriticalFailure> for Envelope {
    fn from(f: &CriticalFailure) -> Self {
        Envelope {
            status: f.status,
            code: f.code.clone(),
            message: f.message.clone(),
            retryable: f.retryable,
        }
    }
}

impl Envelope {
    pub fn body(&self, trace_id: &str) -> Bytes {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Inner<'a> {
            code: &'a str,
            message: &'a str,
            trace_id: &'a str,
            retryable: bool,
        }
        #[derive(Serialize)]
        struct Outer<'a> {
            error: Inner<'a>,
        }
        let body = Outer {
            error: Inner {
                code: &self.code,
                message: &self.message,
                trace_id,
                retryable: self.retryable,
            },
        };
        // Serialising plain strings and a bool into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape() {
        let body = Envelope::from(ErrorCode::NotFound).body("t-1");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":{"code":"NOT_FOUND","message":"Nothing is here.","traceId":"t-1","retryable":false}})
        );
    }

    #[test]
    fn upstream_statuses_map_to_codes() {
        assert_eq!(ErrorCode::for_upstream_status(404), ErrorCode::NotFound);
        assert_eq!(
            ErrorCode::for_upstream_status(401),
            ErrorCode::BadUpstreamResponse
        );
        assert_eq!(ErrorCode::for_upstream_status(409), ErrorCode::BadRequest);
        assert_eq!(
            ErrorCode::for_upstream_status(500),
            ErrorCode::BadUpstreamResponse
        );
        assert_eq!(
            ErrorCode::for_upstream_status(503),
            ErrorCode::BadUpstreamResponse
        );
    }
}

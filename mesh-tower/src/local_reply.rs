//! Responses the mesh makes itself ("local replies", in Envoy's words).
//!
//! When the client stack refuses or cuts a request (a circuit breaker
//! overflowed, fault injection aborted it, a timeout or deadline expired),
//! the caller gets a response, as it would from a sidecar, rather than an
//! `Err`: an HTTP status with a plain-text body naming the cause, or, for a
//! gRPC request (`content-type: application/grpc...`), a
//! [Trailers-Only](https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md)
//! response (HTTP 200, `grpc-status` and `grpc-message` in the headers, no
//! body), which every gRPC client reads as a status. A breaker overflow also
//! carries `x-envoy-overloaded: true`, as Envoy's does (response flag UO).
//!
//! The server stack answers itself too: a request denied by an
//! AuthorizationPolicy gets Envoy's RBAC answer (`403` with a body starting
//! `RBAC: access denied`, or gRPC `PERMISSION_DENIED`), naming the policy.
//!
//! Every local reply carries `x-proxyless-local-reply: <cause>` so tests and
//! operators can tell it from an answer of the service.

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Response, StatusCode};
use mesh_core::model::AbortStatus;
use mesh_core::retry::{grpc_to_http_status, http_to_grpc_status};

/// The header naming why the mesh answered itself.
pub const LOCAL_REPLY_HEADER: &str = "x-proxyless-local-reply";

/// Envoy's header on responses refused by a circuit breaker.
pub const OVERLOADED_HEADER: &str = "x-envoy-overloaded";

/// gRPC status codes used here.
pub(crate) use mesh_core::retry::grpc_status as code;

/// Why the mesh answered itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cause {
    /// A circuit breaker limit was reached.
    Overflow,
    /// Fault injection aborted the request.
    FaultAbort,
    /// The route timeout or the request's deadline expired.
    Timeout,
    /// An authorization policy (or STRICT mTLS without a verified peer)
    /// refused the request: Envoy's RBAC filter's 403.
    Denied,
    /// The server's inbound policy (its gRFC A36 listener) has not arrived
    /// from the control server, so the server cannot decide yet.
    NotServing,
}

impl Cause {
    fn name(self) -> &'static str {
        match self {
            Cause::Overflow => "overflow",
            Cause::FaultAbort => "fault-abort",
            Cause::Timeout => "timeout",
            Cause::Denied => "rbac-denied",
            Cause::NotServing => "not-serving",
        }
    }
}

/// What a local reply says: the status for HTTP callers, the code for gRPC
/// callers, and a message.
#[derive(Debug, Clone)]
pub(crate) struct LocalReply {
    pub(crate) cause: Cause,
    pub(crate) http: StatusCode,
    /// `None`: derived from `http` (gRPC's HTTP-to-gRPC status mapping).
    pub(crate) grpc: Option<u32>,
    pub(crate) message: String,
}

impl LocalReply {
    /// A breaker overflow: 503 / UNAVAILABLE.
    pub(crate) fn overflow(message: String) -> Self {
        LocalReply {
            cause: Cause::Overflow,
            http: StatusCode::SERVICE_UNAVAILABLE,
            grpc: Some(code::UNAVAILABLE),
            message,
        }
    }

    /// A timeout: 504 / DEADLINE_EXCEEDED.
    pub(crate) fn timeout(message: String) -> Self {
        LocalReply {
            cause: Cause::Timeout,
            http: StatusCode::GATEWAY_TIMEOUT,
            grpc: Some(code::DEADLINE_EXCEEDED),
            message,
        }
    }

    /// An authorization denial: 403 / PERMISSION_DENIED. The message
    /// starts with Envoy's `RBAC: access denied` so tools and people who
    /// know Envoy recognise it, and names the policy.
    pub(crate) fn denied(message: String) -> Self {
        LocalReply {
            cause: Cause::Denied,
            http: StatusCode::FORBIDDEN,
            grpc: Some(code::PERMISSION_DENIED),
            message,
        }
    }

    /// The server cannot authorize yet (its inbound policy has not
    /// arrived): 503 / UNAVAILABLE, which clients may retry elsewhere.
    pub(crate) fn not_serving(message: String) -> Self {
        LocalReply {
            cause: Cause::NotServing,
            http: StatusCode::SERVICE_UNAVAILABLE,
            grpc: Some(code::UNAVAILABLE),
            message,
        }
    }

    /// A fault-injection abort (Envoy's fault filter: "fault filter
    /// abort"). An HTTP status reaches gRPC callers as its gRPC mapping; a
    /// gRPC status reaches HTTP callers as the HTTP status Envoy maps it to.
    pub(crate) fn fault_abort(status: AbortStatus) -> Self {
        let (http, grpc) = match status {
            AbortStatus::Http(code) => (
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                None,
            ),
            AbortStatus::Grpc(code) => (
                StatusCode::from_u16(grpc_to_http_status(code))
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                Some(code),
            ),
        };
        LocalReply {
            cause: Cause::FaultAbort,
            http,
            grpc,
            message: "fault filter abort".into(),
        }
    }

    /// The headers (and body, for HTTP) of this reply to a request that was
    /// gRPC (`grpc`) or not.
    pub(crate) fn into_parts(self, grpc: bool) -> (Response<()>, Option<Bytes>) {
        let mut response = Response::new(());
        let headers = response.headers_mut();
        headers.insert(
            LOCAL_REPLY_HEADER,
            HeaderValue::from_static(self.cause.name()),
        );
        if self.cause == Cause::Overflow {
            headers.insert(OVERLOADED_HEADER, HeaderValue::from_static("true"));
        }
        if grpc {
            let code = self
                .grpc
                .unwrap_or_else(|| http_to_grpc_status(self.http.as_u16()));
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            insert_grpc_status(headers, code, &self.message);
            (response, None)
        } else {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            *response.status_mut() = self.http;
            let mut body = self.message.into_bytes();
            body.push(b'\n');
            (response, Some(Bytes::from(body)))
        }
    }
}

/// Sets `grpc-status` and a percent-encoded `grpc-message`.
pub(crate) fn insert_grpc_status(headers: &mut HeaderMap, code: u32, message: &str) {
    headers.insert("grpc-status", HeaderValue::from(code));
    if let Ok(value) = HeaderValue::from_str(&percent_encode(message)) {
        headers.insert("grpc-message", value);
    }
}

/// Whether a request is gRPC (by its `content-type`, as Envoy decides).
pub(crate) fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// `grpc-message` encoding: bytes outside printable ASCII, and `%`, as
/// `%XX` (gRPC over HTTP/2).
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grpc_status;

    #[test]
    fn http_callers_get_a_status_and_a_body_naming_the_cause() {
        let (response, body) =
            LocalReply::overflow("max_requests (10) reached".into()).into_parts(false);
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()[OVERLOADED_HEADER], "true");
        assert_eq!(response.headers()[LOCAL_REPLY_HEADER], "overflow");
        assert_eq!(&body.unwrap()[..], b"max_requests (10) reached\n");
    }

    #[test]
    fn grpc_callers_get_trailers_only() {
        let (response, body) = LocalReply::timeout("deadline 5% gone".into()).into_parts(true);
        assert_eq!(response.status(), 200);
        assert!(body.is_none());
        assert_eq!(grpc_status(response.headers()), Some(4));
        assert_eq!(response.headers()["grpc-message"], "deadline 5%25 gone");
    }

    #[test]
    fn denials_are_403_or_permission_denied() {
        let message = "RBAC: access denied (policy shop/deny-all)".to_string();
        let (response, body) = LocalReply::denied(message.clone()).into_parts(false);
        assert_eq!(response.status(), 403);
        assert_eq!(response.headers()[LOCAL_REPLY_HEADER], "rbac-denied");
        assert_eq!(&body.unwrap()[..], format!("{message}\n").as_bytes());
        let (response, body) = LocalReply::denied(message).into_parts(true);
        assert_eq!(response.status(), 200);
        assert!(body.is_none());
        assert_eq!(grpc_status(response.headers()), Some(7));
        assert_eq!(
            response.headers()["grpc-message"],
            "RBAC: access denied (policy shop/deny-all)"
        );
    }

    #[test]
    fn an_http_abort_reaches_grpc_callers_as_the_mapped_code() {
        let reply = LocalReply {
            cause: Cause::FaultAbort,
            http: StatusCode::SERVICE_UNAVAILABLE,
            grpc: None,
            message: "fault filter abort".into(),
        };
        let (response, _) = reply.into_parts(true);
        assert_eq!(grpc_status(response.headers()), Some(14));
        assert_eq!(response.headers()[LOCAL_REPLY_HEADER], "fault-abort");
    }
}

//! Deadlines that shrink across hops instead of resetting.
//!
//! A request that arrives with a deadline must not outlive it downstream:
//! if hop 1 gives a call 100 ms, hop 3 should see what is left of those
//! 100 ms, not a fresh route timeout. gRPC does this with `grpc-timeout`
//! (each hop sends its remaining time); Envoy does it for HTTP with
//! `x-envoy-expected-rq-timeout-ms`, which a sidecar sets on what it sends
//! upstream and the next sidecar can honor. This mesh uses exactly those
//! two headers (see [`mesh_core::deadline`] for the formats), so it
//! interoperates with gRPC peers and Envoy sidecars:
//!
//! - **Server side**: [`ServerLayer`](crate::ServerLayer) reads
//!   `grpc-timeout`, else `x-envoy-expected-rq-timeout-ms`, and puts a
//!   [`Deadline`] in the request's extensions. A request whose deadline has
//!   already passed (a `0` timeout) is answered at once, without calling
//!   the app: `504` for HTTP, `DEADLINE_EXCEEDED` (Trailers-Only) for gRPC.
//! - **Client side**: a request carrying a [`Deadline`] extension (or, for
//!   gRPC, a `grpc-timeout` header the app set) is sent with
//!   `min(remaining, route timeout, per-try timeout)` in the header of its
//!   kind (`grpc-timeout` for gRPC requests, else
//!   `x-envoy-expected-rq-timeout-ms`), and is cut when that time is up. A
//!   request whose deadline has passed is not sent: the mesh answers `504`
//!   / `DEADLINE_EXCEEDED` itself.
//!
//! An app propagates a deadline by copying it from the request it serves to
//! the requests it makes for it:
//!
//! ```no_run
//! use axum::extract::Request;
//! use mesh_tower::{Deadline, MeshClient};
//! use tower::ServiceExt;
//!
//! async fn handler(
//!     axum::extract::State(client): axum::extract::State<MeshClient<axum::body::Body>>,
//!     incoming: Request,
//! ) -> Result<String, String> {
//!     let mut outgoing = http::Request::get("http://catalog/items")
//!         .body(axum::body::Body::empty())
//!         .map_err(|e| e.to_string())?;
//!     // The remaining time of the incoming request bounds this call.
//!     Deadline::propagate(&incoming, &mut outgoing);
//!     let response = client.oneshot(outgoing).await.map_err(|e| e.to_string())?;
//!     Ok(response.status().to_string())
//! }
//! ```
//!
//! With tonic, the extension travels in `tonic::Request::extensions()`:
//! copy it with `outgoing.extensions_mut().insert(deadline)` (or call
//! `outgoing.set_timeout(deadline.remaining())`, which tonic sends as
//! `grpc-timeout`).

use std::time::Duration;

use http::{HeaderMap, HeaderName, Request};
use mesh_core::deadline::{
    EXPECTED_RQ_TIMEOUT_MS, GRPC_TIMEOUT, format_expected_rq_timeout_ms, format_grpc_timeout,
    parse_expected_rq_timeout_ms, parse_grpc_timeout,
};
use tokio::time::Instant;

/// The instant by which a request must be answered: a request extension set
/// by [`ServerLayer`](crate::ServerLayer) from the incoming deadline
/// header, and read by the client stack on outgoing requests (see the
/// [module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline {
    at: Instant,
}

impl Deadline {
    /// A deadline at `at`.
    pub fn new(at: Instant) -> Self {
        Deadline { at }
    }

    /// A deadline `timeout` from now.
    pub fn after(timeout: Duration) -> Self {
        Deadline {
            at: Instant::now() + timeout,
        }
    }

    /// When it is.
    pub fn at(&self) -> Instant {
        self.at
    }

    /// The time left (zero once passed).
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// Whether it has passed.
    pub fn is_expired(&self) -> bool {
        self.at <= Instant::now()
    }

    /// The earlier of two deadlines.
    pub fn min(self, other: Deadline) -> Deadline {
        if other.at < self.at { other } else { self }
    }

    /// The deadline of `request`: its [`Deadline`] extension (set by
    /// [`ServerLayer`](crate::ServerLayer) on incoming requests).
    pub fn from_request<B>(request: &Request<B>) -> Option<Deadline> {
        request.extensions().get::<Deadline>().copied()
    }

    /// Copies `incoming`'s deadline (if it has one) onto `outgoing`, keeping
    /// the earlier one when `outgoing` already has one. Returns it.
    pub fn propagate<B1, B2>(
        incoming: &Request<B1>,
        outgoing: &mut Request<B2>,
    ) -> Option<Deadline> {
        let theirs = Deadline::from_request(incoming)?;
        let deadline = match Deadline::from_request(outgoing) {
            Some(mine) => mine.min(theirs),
            None => theirs,
        };
        outgoing.extensions_mut().insert(deadline);
        Some(deadline)
    }

    /// The deadline announced by `headers`: `grpc-timeout`, else
    /// `x-envoy-expected-rq-timeout-ms`, counted from now. Malformed values
    /// are ignored (as gRPC servers do).
    pub fn from_headers(headers: &HeaderMap) -> Option<Deadline> {
        Deadline::arriving(headers).map(|(deadline, _)| deadline)
    }

    /// [`Deadline::from_headers`], and whether the deadline had already
    /// passed when the request arrived: a timeout of zero. Deciding that
    /// from the timeout rather than with [`Deadline::is_expired`] spares
    /// the server a second clock read per request that carries a deadline
    /// (every gRPC call with one): a deadline counted from the clock read
    /// that made it has passed only if nothing was added.
    pub(crate) fn arriving(headers: &HeaderMap) -> Option<(Deadline, bool)> {
        let timeout = header(headers, &GRPC_TIMEOUT_NAME)
            .and_then(parse_grpc_timeout)
            .or_else(|| {
                header(headers, &EXPECTED_RQ_TIMEOUT_MS_NAME).and_then(parse_expected_rq_timeout_ms)
            })?;
        // A timeout too large to add is as good as none.
        let at = Instant::now().checked_add(timeout)?;
        Some((Deadline::new(at), timeout.is_zero()))
    }
}

/// The deadline headers as header names, built at compile time: looking up
/// by `&str` would parse the name for every request. Statics, not
/// constants: a constant is a new value at each use, made and dropped
/// (a `Bytes`, dropped through its vtable) on every lookup.
static GRPC_TIMEOUT_NAME: HeaderName = HeaderName::from_static(GRPC_TIMEOUT);
static EXPECTED_RQ_TIMEOUT_MS_NAME: HeaderName = HeaderName::from_static(EXPECTED_RQ_TIMEOUT_MS);

fn header<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a str> {
    headers.get(name)?.to_str().ok()
}

/// The `grpc-timeout` an outgoing gRPC request already carries (set by the
/// app, tonic's `Request::set_timeout`), as a deadline from `now`.
pub(crate) fn grpc_timeout_header(headers: &HeaderMap, now: Instant) -> Option<Instant> {
    let timeout = header(headers, &GRPC_TIMEOUT_NAME).and_then(parse_grpc_timeout)?;
    now.checked_add(timeout)
}

/// Writes `timeout` into the deadline header of the request's kind.
pub(crate) fn write_timeout_header(headers: &mut HeaderMap, grpc: bool, timeout: Duration) {
    // Constants here: the header map takes the name by value.
    let (name, value) = if grpc {
        (
            HeaderName::from_static(GRPC_TIMEOUT),
            format_grpc_timeout(timeout),
        )
    } else {
        (
            HeaderName::from_static(EXPECTED_RQ_TIMEOUT_MS),
            format_expected_rq_timeout_ms(timeout),
        )
    };
    if let Ok(value) = http::HeaderValue::from_str(&value) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn headers_become_a_deadline_from_now() {
        let mut h = HeaderMap::new();
        assert_eq!(Deadline::from_headers(&h), None);
        h.insert(EXPECTED_RQ_TIMEOUT_MS, "250".parse().unwrap());
        let d = Deadline::from_headers(&h).unwrap();
        assert!(d.remaining() <= Duration::from_millis(250));
        assert!(d.remaining() > Duration::from_millis(200));
        // gRPC's header wins when both are present.
        h.insert(GRPC_TIMEOUT, "5m".parse().unwrap());
        assert!(Deadline::from_headers(&h).unwrap().remaining() <= Duration::from_millis(5));
        // Malformed values are ignored.
        h.insert(GRPC_TIMEOUT, "soon".parse().unwrap());
        assert!(Deadline::from_headers(&h).unwrap().remaining() > Duration::from_millis(200));
    }

    /// A deadline has passed on arrival exactly when its timeout is zero
    /// (the server answers those itself, with one clock read).
    #[tokio::test]
    async fn a_zero_timeout_has_passed_on_arrival() {
        let mut h = HeaderMap::new();
        assert_eq!(Deadline::arriving(&h), None);
        for (name, zero, some) in [
            (GRPC_TIMEOUT, "0m", "1n"),
            (EXPECTED_RQ_TIMEOUT_MS, "0", "1"),
        ] {
            h.clear();
            h.insert(name, zero.parse().unwrap());
            let (deadline, expired) = Deadline::arriving(&h).unwrap();
            assert!(expired && deadline.is_expired());
            h.insert(name, some.parse().unwrap());
            assert!(!Deadline::arriving(&h).unwrap().1);
        }
    }

    #[tokio::test]
    async fn propagation_keeps_the_earlier_deadline() {
        let soon = Deadline::after(Duration::from_millis(10));
        let later = Deadline::after(Duration::from_secs(10));
        let mut incoming = Request::new(());
        incoming.extensions_mut().insert(soon);
        let mut outgoing = Request::new(());
        assert_eq!(Deadline::propagate(&incoming, &mut outgoing), Some(soon));
        let mut outgoing = Request::new(());
        outgoing.extensions_mut().insert(later);
        Deadline::propagate(&incoming, &mut outgoing);
        assert_eq!(Deadline::from_request(&outgoing), Some(soon));
        // Nothing to propagate: the outgoing request is left alone.
        let mut outgoing = Request::new(());
        assert_eq!(Deadline::propagate(&Request::new(()), &mut outgoing), None);
        assert_eq!(Deadline::from_request(&outgoing), None);
    }

    #[test]
    fn timeouts_are_written_in_the_header_of_the_request_kind() {
        let mut h = HeaderMap::new();
        write_timeout_header(&mut h, true, Duration::from_millis(100));
        assert_eq!(h[GRPC_TIMEOUT], "100000u");
        write_timeout_header(&mut h, false, Duration::from_micros(1500));
        assert_eq!(h[EXPECTED_RQ_TIMEOUT_MS], "2");
    }
}

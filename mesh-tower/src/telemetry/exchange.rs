//! One request's telemetry from its start to the end of its response body,
//! shared by the client and server layers.
//!
//! A request is over when its response body ends (end of stream, trailers,
//! an error, or the body dropped early), not when the headers arrive: a
//! streaming response's duration, byte count and gRPC status (in trailers)
//! are only known then. That is when the span ends and the metrics and the
//! access log are written, exactly once.

use std::any::Any;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::{Instant, SystemTime};

use http::uri::Authority;
use http::{Method, Response, Version};
use http_body::{Body, Frame, SizeHint};
use opentelemetry::KeyValue;
use opentelemetry::trace::{Status, TraceContextExt as _};
use pin_project_lite::pin_project;

use super::Telemetry;
use super::access_log::{self, AccessInfo};
use super::flags::ResponseFlags;
use super::identity::{PEER_HEADER_NAME, PeerRef, strip_port};
use super::metrics::{Observation, Reporter, RequestProtocol, Security};
use super::record::DecisionRecord;
use crate::error::{Error, ErrorKind};
use crate::grpc::grpc_status;

/// The header naming why the client stack answered a request itself
/// (`overflow`, `fault-abort`, `timeout`).
const LOCAL_REPLY_HEADER: http::HeaderName =
    http::HeaderName::from_static("x-proxyless-local-reply");

/// Which side of the request this process is on.
pub(crate) enum Side {
    /// The caller: the service named by the authority dialed is the
    /// destination when the routing layer recorded no cluster.
    Client { dialed: Dialed },
    /// The callee: the caller announced itself (or not) in a peer header.
    Server {
        source: Option<PeerRef>,
        answer_peer: bool,
    },
}

/// The name a client request was addressed to, kept as it came (looked up
/// only when the routing layer recorded no cluster).
pub(crate) enum Dialed {
    /// The URI's authority.
    Authority(Authority),
    /// The `Host` header (a URI without authority).
    Host(http::HeaderValue),
    /// Neither, or no metrics.
    Nothing,
}

impl Dialed {
    /// The host dialed, without its port.
    fn host(&self) -> Option<&str> {
        match self {
            Dialed::Authority(authority) => Some(authority.host()),
            Dialed::Host(value) => Some(strip_port(value.to_str().ok()?)),
            Dialed::Nothing => None,
        }
    }
}

/// How the request ended.
pub(crate) enum End<'a> {
    /// The response body ended normally.
    Complete,
    /// No response, or the body failed: the flags say why.
    Failed {
        flags: ResponseFlags,
        message: &'a dyn fmt::Display,
    },
    /// The response (or its body) was dropped before it ended.
    Cancelled,
}

/// What a request's telemetry knows from its start, kept in its
/// [`DecisionRecord`]'s allocation (see [`Exchange`]).
pub(crate) struct Start {
    pub(crate) telemetry: Telemetry,
    pub(crate) started: Instant,
    pub(crate) side: Side,
    pub(crate) grpc: bool,
    pub(crate) request_size_hint: u64,
    pub(crate) access: Option<Box<AccessInfo>>,
}

/// The state of one request until its response ends: the record (whose
/// allocation holds the request's [`Start`] too) and what the response
/// tells. A few words, moved with the response future and its body.
pub(crate) struct Exchange {
    record: DecisionRecord,
    status: u16,
    done: bool,
    local_flags: ResponseFlags,
    grpc_status: Option<i32>,
    response_bytes: u64,
    destination: Option<PeerRef>,
}

impl Exchange {
    /// The exchange of a request whose record holds its [`Start`] (see
    /// `DecisionRecord::client` and `DecisionRecord::server`).
    pub(crate) fn new(record: DecisionRecord) -> Self {
        Exchange {
            record,
            status: 0,
            done: false,
            local_flags: ResponseFlags::empty(),
            grpc_status: None,
            response_bytes: 0,
            destination: None,
        }
    }

    /// Reads the response head: status, a Trailers-Only gRPC status, the
    /// peer's announcement (removed on the client), the mesh's own local
    /// replies; on the server, answers a mesh caller's announcement.
    pub(crate) fn on_response<B>(&mut self, response: &mut Response<B>) {
        self.status = response.status().as_u16();
        let Some(start) = self.record.start() else {
            return;
        };
        let headers = response.headers_mut();
        if start.grpc {
            self.grpc_status = grpc_status(headers);
        }
        match &start.side {
            // A response without headers has neither to read.
            Side::Client { .. } if !headers.is_empty() => {
                if let Some(value) = headers.remove(PEER_HEADER_NAME)
                    && let Some(metrics) = &start.telemetry.inner().metrics
                {
                    self.destination = Some(metrics.istio().peer_from_header(&value));
                }
                if let Some(cause) = headers.get(LOCAL_REPLY_HEADER) {
                    self.local_flags |= local_reply_flags(cause.as_bytes());
                }
            }
            Side::Client { .. } => {}
            Side::Server { answer_peer, .. } => {
                if *answer_peer && let Some(own) = &start.telemetry.inner().peer_header {
                    headers.insert(PEER_HEADER_NAME, own.clone());
                }
            }
        }
    }

    /// The record the request's decisions are written on.
    pub(crate) fn record(&self) -> &DecisionRecord {
        &self.record
    }

    /// A response body of `n` bytes, sent whole (a local reply).
    pub(crate) fn local_body(&mut self, n: u64) {
        self.response_bytes += n;
    }

    fn on_frame<D: bytes::Buf>(&mut self, frame: &Frame<D>) {
        if let Some(data) = frame.data_ref() {
            self.response_bytes += data.remaining() as u64;
        } else if let Some(trailers) = frame.trailers_ref()
            && self.record.start().is_some_and(|s| s.grpc)
            && let Some(code) = grpc_status(trailers)
        {
            self.grpc_status = Some(code);
        }
    }

    /// Ends the span, records the metrics and writes the access log line.
    pub(crate) fn finish(&mut self, end: End<'_>) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let Some(start) = self.record.start() else {
            return;
        };
        let duration = start.started.elapsed();
        let mut flags = self.record.flags() | self.local_flags;
        let mut error_message = None;
        match &end {
            End::Complete => {}
            End::Failed { flags: f, message } => {
                flags |= *f;
                error_message = Some(message.to_string());
            }
            End::Cancelled => flags |= ResponseFlags::DOWNSTREAM_CONNECTION_TERMINATION,
        }
        let request_bytes = self.record.request_bytes().max(start.request_size_hint);
        self.end_span(start, flags, error_message.as_deref());
        let inner = start.telemetry.inner();
        if let Some(metrics) = &inner.metrics {
            let istio = metrics.istio();
            let protocol = if start.grpc {
                RequestProtocol::Grpc
            } else {
                RequestProtocol::Http
            };
            let grpc_status = if start.grpc {
                self.grpc_status.and_then(|c| u16::try_from(c).ok())
            } else {
                None
            };
            let duration_ms = duration.as_secs_f64() * 1000.0;
            match &start.side {
                Side::Client { dialed } => {
                    let attempt = self.record.last_attempt();
                    let cluster = self.record.cluster_name();
                    let (service, destination) = match (cluster, &self.destination, attempt) {
                        // The usual request (routed, answered without a peer
                        // header): both from one memo lookup.
                        (Some(cluster), None, Some(attempt)) => {
                            istio.destination_of_endpoint(cluster, &attempt.labels)
                        }
                        _ => {
                            let service = match cluster {
                                Some(cluster) => istio.service_of_cluster(cluster),
                                None => match dialed.host() {
                                    Some(host) => istio.service_of_host(host),
                                    None => istio.unknown_service().clone(),
                                },
                            };
                            let destination = match (&self.destination, attempt) {
                                (Some(peer), _) => peer.clone(),
                                (None, Some(attempt)) => {
                                    istio.peer_from_endpoint(&service, &attempt.labels)
                                }
                                (None, None) => istio.unknown_peer().clone(),
                            };
                            (service, destination)
                        }
                    };
                    if !flags.is_empty() || self.record.is_eventful() {
                        let unknown = mesh_core::model::Name::from(super::identity::UNKNOWN);
                        let cluster = self.record.cluster_name().unwrap_or(&unknown);
                        metrics.mesh().client_request(cluster, &self.record, flags);
                    }
                    let own_principal = inner.identity.principal_name();
                    istio.observe(&Observation {
                        reporter: Reporter::Source,
                        source: &inner.peer,
                        source_principal: own_principal,
                        destination: &destination,
                        // The server's SPIFFE ID the pool verified on the
                        // last attempt's connection (mTLS), as Envoy reports
                        // the upstream peer certificate's URI SAN.
                        destination_principal: attempt
                            .and_then(|a| a.principal.get())
                            .or_else(|| self.record.peer_principal_id()),
                        service: &service,
                        protocol,
                        response_code: self.status,
                        grpc_status,
                        flags,
                        security: Security::Unknown,
                        duration_ms,
                        request_bytes,
                        response_bytes: self.response_bytes,
                    });
                }
                Side::Server { source, .. } => {
                    if !flags.is_empty() {
                        metrics.mesh().server_request(flags);
                    }
                    if let Some(dry_run) = self.record.dry_run_result() {
                        metrics.mesh().dry_run(dry_run);
                    }
                    let source = source.as_ref().unwrap_or_else(|| istio.unknown_peer());
                    let own_principal = inner.identity.principal_name();
                    let peer_principal = self.record.peer_principal_id();
                    // One branch for an allowed request.
                    if let Some(policy) = self.record.denied_by() {
                        metrics.mesh().denied(policy, peer_principal, &inner.peer);
                    }
                    istio.observe(&Observation {
                        reporter: Reporter::Destination,
                        source,
                        source_principal: peer_principal,
                        destination: &inner.peer,
                        destination_principal: own_principal,
                        service: &inner.service,
                        protocol,
                        response_code: self.status,
                        grpc_status,
                        flags,
                        security: if peer_principal.is_some() {
                            Security::MutualTls
                        } else {
                            Security::None
                        },
                        duration_ms,
                        request_bytes,
                        response_bytes: self.response_bytes,
                    });
                }
            }
        }
        if let Some(access) = &start.access {
            access_log::write(&access_log::Line {
                info: access,
                outbound: matches!(start.side, Side::Client { .. }),
                record: &self.record,
                response_code: self.status,
                grpc_status: self.grpc_status,
                flags,
                bytes_received: request_bytes,
                bytes_sent: self.response_bytes,
                duration,
            });
        }
    }

    fn end_span(&self, start: &Start, flags: ResponseFlags, error: Option<&str>) {
        let Some(trace) = self.record.trace() else {
            return;
        };
        let span = trace.cx.span();
        let mut attributes = self.record.attributes();
        if self.status != 0 {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(self.status),
            ));
        }
        if let Some(code) = self.grpc_status {
            attributes.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
        }
        if !flags.is_empty() {
            attributes.push(KeyValue::new("mesh.response_flags", flags.to_string()));
        }
        span.set_attributes(attributes);
        let server = matches!(start.side, Side::Server { .. });
        let failed = match self.grpc_status {
            // gRPC semantic conventions: a server span fails on the codes
            // that mean the server failed; a client span on any non-OK.
            Some(code) if server => matches!(code, 2 | 4 | 12 | 13 | 14 | 15),
            Some(code) => code != 0,
            None if server => self.status >= 500,
            None => self.status >= 400,
        };
        if let Some(message) = error {
            span.set_status(Status::error(message.to_owned()));
        } else if failed || self.status == 0 {
            span.set_status(Status::error(""));
        }
        span.end();
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        self.finish(End::Cancelled);
    }
}

/// Envoy's response flag for a local reply of the client stack.
fn local_reply_flags(cause: &[u8]) -> ResponseFlags {
    match cause {
        b"overflow" => ResponseFlags::UPSTREAM_OVERFLOW,
        b"fault-abort" => ResponseFlags::FAULT_INJECTED,
        b"timeout" => ResponseFlags::UPSTREAM_REQUEST_TIMEOUT,
        _ => ResponseFlags::empty(),
    }
}

/// The response flag for a request that got no response.
pub(crate) fn error_flags<E: Any>(error: &E) -> ResponseFlags {
    let error: &dyn Any = error;
    let mesh = error
        .downcast_ref::<Error>()
        .or_else(|| error.downcast_ref::<Box<Error>>().map(|b| &**b));
    match mesh.map(Error::kind) {
        Some(ErrorKind::NotFound | ErrorKind::NoRoute) => ResponseFlags::NO_ROUTE_FOUND,
        Some(ErrorKind::NoEndpoints) => ResponseFlags::NO_HEALTHY_UPSTREAM,
        Some(ErrorKind::Timeout | ErrorKind::Discovery) => ResponseFlags::NO_CLUSTER_FOUND,
        Some(ErrorKind::Connect) => ResponseFlags::UPSTREAM_CONNECTION_FAILURE,
        Some(ErrorKind::Overflow) => ResponseFlags::UPSTREAM_OVERFLOW,
        Some(ErrorKind::Upstream) => ResponseFlags::UPSTREAM_CONNECTION_TERMINATION,
        Some(ErrorKind::InvalidRequest) => ResponseFlags::DOWNSTREAM_PROTOCOL_ERROR,
        _ => ResponseFlags::empty(),
    }
}

pin_project! {
    /// A response body under telemetry: frames pass through unchanged; when
    /// the body ends (or is dropped) the request's span ends and its
    /// metrics and access log line are written.
    pub struct TelemetryBody<B> {
        #[pin]
        inner: B,
        exchange: Option<Exchange>,
    }
}

impl<B> TelemetryBody<B> {
    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The wrapped body (its telemetry is written as if it was dropped).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B> Body for TelemetryBody<B>
where
    B: Body,
    B::Error: fmt::Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let polled = this.inner.as_mut().poll_frame(cx);
        let Poll::Ready(frame) = polled else {
            return Poll::Pending;
        };
        if let Some(exchange) = this.exchange.as_mut() {
            match &frame {
                Some(Ok(f)) => {
                    exchange.on_frame(f);
                    if this.inner.is_end_stream() {
                        exchange.finish(End::Complete);
                    }
                }
                Some(Err(e)) => exchange.finish(End::Failed {
                    flags: ResponseFlags::UPSTREAM_REMOTE_RESET,
                    message: e,
                }),
                None => exchange.finish(End::Complete),
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for TelemetryBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TelemetryBody")
            .field(
                "in_flight",
                &self.exchange.as_ref().is_some_and(|e| !e.done),
            )
            .finish_non_exhaustive()
    }
}

/// What a response future under telemetry returns: the response wrapped
/// (its head read, the request ended at once when the body is empty), or
/// the error, reported with `flags_of` it. Inlined into the futures' `poll`
/// so that the response (hundreds of bytes) is moved once, into the
/// result, not through temporaries.
#[inline(always)]
pub(crate) fn complete<B: Body, E: fmt::Display>(
    exchange: Option<Exchange>,
    result: Result<Response<B>, E>,
    flags_of: impl FnOnce(&E) -> ResponseFlags,
) -> Result<Response<TelemetryBody<B>>, E> {
    match result {
        Ok(mut response) => {
            let exchange = exchange.map(|mut exchange| {
                exchange.on_response(&mut response);
                if response.body().is_end_stream() {
                    exchange.finish(End::Complete);
                }
                exchange
            });
            Ok(response.map(|inner| TelemetryBody { inner, exchange }))
        }
        Err(e) => {
            if let Some(mut exchange) = exchange {
                exchange.finish(End::Failed {
                    flags: flags_of(&e),
                    message: &e,
                });
            }
            Err(e)
        }
    }
}

/// What a request looked like, for the access log (captured only when the
/// access log is on).
pub(crate) fn access_info<B>(
    req: &http::Request<B>,
    downstream: Option<SocketAddr>,
) -> Box<AccessInfo> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    Box::new(AccessInfo {
        start_time: SystemTime::now(),
        method: req.method().clone(),
        path: req
            .uri()
            .path_and_query()
            .map_or_else(|| req.uri().path().to_owned(), |p| p.as_str().to_owned()),
        authority: req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| header("host")),
        protocol: req.version(),
        request_id: header("x-request-id"),
        user_agent: header("user-agent"),
        downstream,
    })
}

/// OpenTelemetry's `network.protocol.version`.
pub(crate) fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "unknown",
    }
}

/// `/pkg.Service/Method` → (`pkg.Service`, `Method`).
pub(crate) fn grpc_method(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (service, method) = rest.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// The span name: `pkg.Service/Method` for gRPC, else the method.
pub(crate) fn span_name(method: &Method, path: &str, grpc: bool) -> String {
    match grpc.then(|| grpc_method(path)).flatten() {
        Some((service, m)) => format!("{service}/{m}"),
        None => method.as_str().to_owned(),
    }
}

/// The attributes every span of a request starts with (HTTP and RPC
/// semantic conventions).
pub(crate) fn request_attributes<B>(req: &http::Request<B>, grpc: bool) -> Vec<KeyValue> {
    let mut out = Vec::with_capacity(8);
    out.push(KeyValue::new(
        "http.request.method",
        req.method().as_str().to_owned(),
    ));
    out.push(KeyValue::new(
        "network.protocol.version",
        protocol_version(req.version()),
    ));
    if grpc && let Some((service, method)) = grpc_method(req.uri().path()) {
        out.push(KeyValue::new("rpc.system", "grpc"));
        out.push(KeyValue::new("rpc.service", service.to_owned()));
        out.push(KeyValue::new("rpc.method", method.to_owned()));
    }
    if let Some(ua) = req
        .headers()
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
    {
        out.push(KeyValue::new("user_agent.original", ua.to_owned()));
    }
    out
}

/// `host` and port of an authority (the scheme's default port when none).
pub(crate) fn server_address(authority: &Authority, https: bool) -> (String, i64) {
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    (authority.host().to_owned(), i64::from(port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_paths_are_split() {
        assert_eq!(
            grpc_method("/shop.Payment/Pay"),
            Some(("shop.Payment", "Pay"))
        );
        assert_eq!(grpc_method("/items"), None);
        assert_eq!(grpc_method("/a/b/c"), None);
        assert_eq!(
            span_name(&Method::POST, "/shop.Payment/Pay", true),
            "shop.Payment/Pay"
        );
        assert_eq!(span_name(&Method::GET, "/items", false), "GET");
    }

    #[test]
    fn mesh_errors_map_to_envoy_flags() {
        let e = Error::new(ErrorKind::Connect, "x");
        assert_eq!(error_flags(&e), ResponseFlags::UPSTREAM_CONNECTION_FAILURE);
        assert_eq!(error_flags(&"other"), ResponseFlags::empty());
        assert_eq!(
            local_reply_flags(b"overflow"),
            ResponseFlags::UPSTREAM_OVERFLOW
        );
    }
}

//! The server side: continue the caller's trace, span the request, report.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use http_body::Body;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanBuilder, SpanKind, TraceContextExt as _, Tracer as _};
use opentelemetry_sdk::trace::SdkTracer;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::Telemetry;
use super::exchange::{
    self, End, Exchange, Side, Start, TelemetryBody, request_attributes, server_address, span_name,
};
use super::flags::ResponseFlags;
use super::identity::PEER_HEADER_NAME;
use super::incoming;
use super::propagation;
use super::record::{DecisionRecord, Trace};
use crate::connection::{Authorized, ConnectionInfo};
use crate::tls::PeerIdentity;

/// Puts [`ServerTelemetry`] over an application (see the
/// [module docs](super)). Works as `axum::Router::layer(...)` (it keeps the
/// request body type) or around any `tower::Service`.
#[derive(Debug, Clone)]
pub struct ServerTelemetryLayer {
    telemetry: Telemetry,
}

impl ServerTelemetryLayer {
    /// A layer reporting as `telemetry`'s service.
    pub fn new(telemetry: Telemetry) -> Self {
        ServerTelemetryLayer { telemetry }
    }
}

impl<S> Layer<S> for ServerTelemetryLayer {
    type Service = ServerTelemetry<S>;

    fn layer(&self, inner: S) -> ServerTelemetry<S> {
        ServerTelemetry {
            inner,
            telemetry: self.telemetry.clone(),
        }
    }
}

/// An application under telemetry: per request the caller's trace context
/// (W3C, or B3), a SERVER span, the `opentelemetry::Context` as a request
/// extension and as the current context while the application runs, a
/// [`DecisionRecord`] extension (peer identity, authorization), and at the
/// end of the response Istio metrics (`reporter="destination"`) and an
/// access log line.
///
/// Request bytes are the body's declared size (`Content-Length`, or the
/// exact size of a buffered body): this layer keeps the request body type
/// so that it works inside an axum `Router`, and so does not count a
/// streamed body.
#[derive(Clone)]
pub struct ServerTelemetry<S> {
    inner: S,
    telemetry: Telemetry,
}

impl<S> ServerTelemetry<S> {
    /// The wrapped application.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped application.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for ServerTelemetry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTelemetry")
            .field("inner", &self.inner)
            .field("telemetry", &self.telemetry)
            .finish()
    }
}

impl<S, B, RB> Service<Request<B>> for ServerTelemetry<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: fmt::Display,
    B: Body,
    RB: Body,
{
    type Response = Response<TelemetryBody<RB>>;
    type Error = S::Error;
    type Future = ServerResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let (scope, exchange) = begin(&self.telemetry, &mut req);
        let future = {
            let _current = scope.enter(exchange.record());
            self.inner.call(req)
        };
        ServerResponseFuture {
            inner: future,
            scope,
            exchange: Some(exchange),
        }
    }
}

/// What is current while the application runs: the trace context (an
/// `opentelemetry::Context`, when spans may be recorded), or the request's
/// record with its trace headers kept unparsed (see
/// [`incoming`](super::incoming)), or nothing (no tracer, no trace headers).
enum Scope {
    Context(opentelemetry::Context),
    Incoming,
    Nothing,
}

/// The guard of [`Scope::enter`]: restores what was current when dropped.
enum Entered {
    Context { _guard: opentelemetry::ContextGuard },
    Incoming { _guard: incoming::Entered },
}

impl Scope {
    fn enter(&self, record: &DecisionRecord) -> Entered {
        match self {
            Scope::Context(cx) => Entered::Context {
                _guard: cx.clone().attach(),
            },
            Scope::Incoming => Entered::Incoming {
                _guard: incoming::enter(Some(record)),
            },
            // No trace to continue: not the one of a request served further
            // out on this thread either.
            Scope::Nothing => Entered::Incoming {
                _guard: incoming::enter(None),
            },
        }
    }
}

/// Starts a request's server-side telemetry: continues the caller's trace,
/// starts the SERVER span (when sampled), puts the trace context and a
/// fresh [`DecisionRecord`] into the request's extensions (with the peer's
/// principal, and the decision of an authorization made before, see
/// [`Authorized`]), and returns what to make current while the application
/// runs and the exchange to finish when the response ends.
///
/// When the telemetry cannot record spans (see
/// [`TraceMode`](super::incoming::TraceMode)) the trace headers are kept on
/// the record unparsed, and no `opentelemetry::Context` is built unless the
/// application's calls need one.
fn begin<B: Body>(telemetry: &Telemetry, req: &mut Request<B>) -> (Scope, Exchange) {
    let started = Instant::now();
    let t = telemetry.inner();
    let mut seen = incoming::scan(req.headers());
    let grpc = seen.grpc;
    let announced = if seen.peer {
        req.headers_mut().remove(PEER_HEADER_NAME)
    } else {
        None
    };
    let source = match (&announced, &t.metrics) {
        (Some(value), Some(metrics)) => Some(metrics.istio().peer_from_header(value)),
        _ => None,
    };
    let access = t.access_log.then(|| {
        let connection = req.extensions().get::<ConnectionInfo>();
        exchange::access_info(req, connection.map(|c| c.peer_addr()))
    });
    let request_size_hint = req
        .body()
        .size_hint()
        .exact()
        .unwrap_or_else(|| seen.content_length.unwrap_or(0));
    let start = Start {
        telemetry: telemetry.clone(),
        started,
        side: Side::Server {
            source,
            answer_peer: announced.is_some(),
        },
        grpc,
        request_size_hint,
        access,
    };
    // Istio's `source_principal`; the app and authorization read the
    // `PeerIdentity` extension itself.
    let principal = req
        .extensions()
        .get::<PeerIdentity>()
        .map(|peer| peer.spiffe_id().uri());
    let (scope, record) = if t.trace_mode.records() {
        let (cx, trace) = start_span(t.tracer.as_ref(), req, grpc);
        let record = DecisionRecord::server(trace, principal, None, start);
        req.extensions_mut().insert(cx.clone());
        (Scope::Context(cx), record)
    } else {
        let kept = seen.incoming(telemetry, req.headers());
        let scope = if kept.is_some() {
            Scope::Incoming
        } else {
            Scope::Nothing
        };
        (scope, DecisionRecord::server(None, principal, kept, start))
    };
    if let Some(authorized) = Authorized::of(req) {
        // `serve_with` (or a `ServerLayer` outside this one) authorized the
        // request before it reached this layer: its decision (and dry-run
        // result) is this request's, whether or not a `ServerLayer` below
        // records it too.
        record.authorized(authorized);
    }
    req.extensions_mut().insert(record.clone());
    (scope, Exchange::new(record))
}

/// Continues the caller's trace with a SERVER span (recorded when
/// sampled): the context for the application, and the span side of the
/// record when sampled.
fn start_span<B>(
    tracer: Option<&SdkTracer>,
    req: &Request<B>,
    grpc: bool,
) -> (opentelemetry::Context, Option<Trace>) {
    let parent = propagation::extract(req.headers());
    let Some(tracer) = tracer else {
        return (parent, None);
    };
    let span = tracer.build_with_context(
        SpanBuilder::from_name("").with_kind(SpanKind::Server),
        &parent,
    );
    if !span.is_recording() {
        // Not sampled: children only need the span context
        // (one allocation instead of boxing the span).
        return (
            parent.with_remote_span_context(span.span_context().clone()),
            None,
        );
    }
    let name = span_name(req.method(), req.uri().path(), grpc);
    let mut span = span;
    span.update_name(name.clone());
    span.set_attributes(server_attributes(req, grpc));
    let cx = parent.with_span(span);
    let trace = Trace {
        tracer: tracer.clone(),
        cx: cx.clone(),
        name,
    };
    (cx, Some(trace))
}

/// Reports a request that the server answers itself before any app (and
/// so any [`ServerTelemetry`] of the app) sees it: `serve_with` refusing
/// it under its inbound policy. The request gets the same SERVER span,
/// Istio metrics and access log line as one the app's telemetry reports;
/// `decide` writes the decision on its record. The reply's head gets the
/// peer metadata answer, if the caller asked; `body` is the whole body.
pub(crate) fn local_reply<B: Body>(
    telemetry: &Telemetry,
    mut req: Request<B>,
    decide: impl FnOnce(&DecisionRecord),
    head: &mut Response<()>,
    body: Option<&bytes::Bytes>,
) {
    let (_scope, mut exchange) = begin(telemetry, &mut req);
    drop(req);
    decide(exchange.record());
    exchange.on_response(head);
    exchange.local_body(body.map_or(0, |b| b.len() as u64));
    exchange.finish(End::Complete);
}

fn server_attributes<B>(req: &Request<B>, grpc: bool) -> Vec<KeyValue> {
    let mut attributes = request_attributes(req, grpc);
    attributes.push(KeyValue::new("url.path", req.uri().path().to_owned()));
    if let Some(query) = req.uri().query() {
        attributes.push(KeyValue::new("url.query", query.to_owned()));
    }
    attributes.push(KeyValue::new(
        "url.scheme",
        req.uri().scheme_str().unwrap_or("http").to_owned(),
    ));
    let authority = req.uri().authority().cloned().or_else(|| {
        let host = req.headers().get(http::header::HOST)?;
        http::uri::Authority::try_from(host.as_bytes()).ok()
    });
    if let Some(authority) = authority {
        let (host, port) = server_address(&authority, false);
        attributes.push(KeyValue::new("server.address", host));
        attributes.push(KeyValue::new("server.port", port));
    }
    if let Some(info) = req.extensions().get::<ConnectionInfo>() {
        attributes.push(KeyValue::new(
            "client.address",
            info.peer_addr().ip().to_string(),
        ));
        attributes.push(KeyValue::new(
            "client.port",
            i64::from(info.peer_addr().port()),
        ));
    }
    attributes
}

pin_project! {
    /// The response future of [`ServerTelemetry`]: the application's, run
    /// with the request's trace context current.
    pub struct ServerResponseFuture<F> {
        #[pin]
        inner: F,
        scope: Scope,
        exchange: Option<Exchange>,
    }
}

impl<F, RB, E> Future for ServerResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: fmt::Display,
    RB: Body,
{
    type Output = Result<Response<TelemetryBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _current = this.exchange.as_ref().map(|e| this.scope.enter(e.record()));
            ready!(this.inner.poll(cx))
        };
        Poll::Ready(exchange::complete(this.exchange.take(), result, |_| {
            ResponseFlags::empty()
        }))
    }
}

impl<F> fmt::Debug for ServerResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerResponseFuture")
            .finish_non_exhaustive()
    }
}

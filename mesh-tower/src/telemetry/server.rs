//! The server side: continue the caller's trace, span the request, report.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use http_body::Body;
use opentelemetry::KeyValue;
use opentelemetry::context::{FutureExt as _, WithContext};
use opentelemetry::trace::{Span as _, SpanBuilder, SpanKind, TraceContextExt as _, Tracer as _};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::Telemetry;
use super::client::is_grpc;
use super::exchange::{
    self, End, Exchange, Side, TelemetryBody, request_attributes, server_address, span_name,
};
use super::flags::ResponseFlags;
use super::identity::PEER_HEADER_NAME;
use super::propagation;
use super::record::{DecisionRecord, Trace};
use crate::connection::ConnectionInfo;
use crate::server::Authorized;
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
        let (cx, exchange) = begin(&self.telemetry, &mut req);
        let future = {
            let _current = cx.clone().attach();
            self.inner.call(req)
        };
        ServerResponseFuture {
            inner: future.with_context(cx),
            exchange: Some(exchange),
        }
    }
}

/// Starts a request's server-side telemetry: continues the caller's trace,
/// starts the SERVER span (when sampled), puts the trace context and a
/// fresh [`DecisionRecord`] into the request's extensions (with the peer's
/// principal, and the decision of an authorization made before, see
/// [`Authorized`]), and returns the context and the exchange to finish when
/// the response ends.
fn begin<B: Body>(
    telemetry: &Telemetry,
    req: &mut Request<B>,
) -> (opentelemetry::Context, Exchange) {
    let started = Instant::now();
    let t = telemetry.inner();
    let grpc = is_grpc(req.headers());
    let parent = propagation::extract(req.headers());
    let announced = req.headers_mut().remove(PEER_HEADER_NAME);
    let source = match (&announced, &t.metrics) {
        (Some(value), Some(metrics)) => Some(metrics.istio().peer_from_header(value)),
        _ => None,
    };
    let (cx, trace) = match &t.tracer {
        Some(tracer) => {
            let span = tracer.build_with_context(
                SpanBuilder::from_name("").with_kind(SpanKind::Server),
                &parent,
            );
            if span.is_recording() {
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
            } else {
                // Not sampled: children only need the span context
                // (one allocation instead of boxing the span).
                (
                    parent.with_remote_span_context(span.span_context().clone()),
                    None,
                )
            }
        }
        None => (parent, None),
    };
    let record = DecisionRecord::with_trace(trace);
    if let Some(peer) = req.extensions().get::<PeerIdentity>() {
        // Istio's `source_principal`; the app and authorization read
        // the `PeerIdentity` extension itself.
        record.peer_principal(peer.spiffe_id().uri());
    }
    if let Some(authorized) = req.extensions().get::<Authorized>() {
        // `serve_with` authorized the request before it reached this layer:
        // its decision (and dry-run result) is this request's, whether or
        // not a `ServerLayer` below records it too.
        authorized.record(&record);
    }
    let connection = req.extensions().get::<ConnectionInfo>().copied();
    let access = t
        .access_log
        .then(|| exchange::access_info(req, connection.map(|c| c.peer_addr())));
    let request_size_hint = req.body().size_hint().exact().unwrap_or_else(|| {
        exchange::header_text(req.headers(), "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    req.extensions_mut().insert(cx.clone());
    req.extensions_mut().insert(record.clone());
    let exchange = Exchange::new(
        telemetry.clone(),
        record,
        started,
        Side::Server {
            source,
            answer_peer: announced.is_some(),
        },
        grpc,
        request_size_hint,
        access,
    );
    (cx, exchange)
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
    let (_cx, mut exchange) = begin(telemetry, &mut req);
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
        inner: WithContext<F>,
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
        let result = ready!(this.inner.poll(cx));
        Poll::Ready(match (result, this.exchange.take()) {
            (Ok(response), Some(exchange)) => Ok(exchange::wrap_response(exchange, response)),
            (Ok(response), None) => Ok(response.map(|b| TelemetryBody::new(b, None))),
            (Err(e), Some(mut exchange)) => {
                exchange.finish(End::Failed {
                    flags: ResponseFlags::empty(),
                    message: &e,
                });
                Err(e)
            }
            (Err(e), None) => Err(e),
        })
    }
}

impl<F> fmt::Debug for ServerResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerResponseFuture")
            .finish_non_exhaustive()
    }
}

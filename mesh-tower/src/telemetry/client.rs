//! The client side: a span, trace headers and a decision record per call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll, ready};
use std::time::Instant;

use http::{Request, Response};
use http_body::Body;
use opentelemetry::Context;
use opentelemetry::KeyValue;
use opentelemetry::trace::{Span as _, SpanBuilder, SpanKind, TraceContextExt as _, Tracer as _};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::Telemetry;
use super::exchange::{
    self, Dialed, Exchange, Side, Start, TelemetryBody, request_attributes, server_address,
    span_name,
};
use super::identity::PEER_HEADER_NAME;
use super::incoming::TraceMode;
use super::propagation;
use super::record::{DecisionRecord, Trace};

/// Puts [`ClientTelemetry`] over a client (see the
/// [module docs](super)): the outermost layer of the client stack.
#[derive(Debug, Clone)]
pub struct ClientTelemetryLayer {
    telemetry: Telemetry,
}

impl ClientTelemetryLayer {
    /// A layer reporting as `telemetry`'s service.
    pub fn new(telemetry: Telemetry) -> Self {
        ClientTelemetryLayer { telemetry }
    }
}

impl<S> Layer<S> for ClientTelemetryLayer {
    type Service = ClientTelemetry<S>;

    fn layer(&self, inner: S) -> ClientTelemetry<S> {
        ClientTelemetry {
            inner,
            telemetry: self.telemetry.clone(),
        }
    }
}

/// A client under telemetry: per request a CLIENT span, `traceparent` /
/// `tracestate` / `baggage` headers, a [`DecisionRecord`] extension for the
/// layers below, and at the end of the response Istio metrics
/// (`reporter="source"`) and an access log line.
///
/// The span's parent is the `opentelemetry::Context` in the request's
/// extensions (put there by [`propagate`](super::propagate)), else the
/// current context.
#[derive(Clone)]
pub struct ClientTelemetry<S> {
    inner: S,
    telemetry: Telemetry,
}

impl<S> ClientTelemetry<S> {
    /// The wrapped client.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped client.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }
}

impl<S: fmt::Debug> fmt::Debug for ClientTelemetry<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTelemetry")
            .field("inner", &self.inner)
            .field("telemetry", &self.telemetry)
            .finish()
    }
}

impl<S, B, RB> Service<Request<B>> for ClientTelemetry<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: fmt::Display + 'static,
    B: Body,
    RB: Body,
{
    type Response = Response<TelemetryBody<RB>>;
    type Error = S::Error;
    type Future = ClientResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let started = Instant::now();
        let t = self.telemetry.inner();
        let grpc = is_grpc(req.headers());
        // Most calls carry no extensions: skip the type-map lookup then.
        let explicit = if req.extensions().is_empty() {
            None
        } else {
            req.extensions_mut().remove::<Context>()
        };
        let trace = match &t.tracer {
            Some(_) if t.trace_mode == TraceMode::Forward => {
                // Never sampled: the trace headers of the child span
                // context the SDK would mint for an unsampled span, written
                // without a span (no sampler call) and without cloning the
                // parent context.
                match &explicit {
                    Some(parent) => propagation::inject_unsampled_child(parent, req.headers_mut()),
                    None => propagation::inject_unsampled_child_of_current(req.headers_mut()),
                }
                None
            }
            Some(tracer) => {
                let parent = explicit.unwrap_or_else(propagation::current_parent);
                let span = tracer.build_with_context(
                    SpanBuilder::from_name("").with_kind(SpanKind::Client),
                    &parent,
                );
                propagation::inject(span.span_context(), &parent, req.headers_mut());
                span.is_recording().then(|| {
                    let name = span_name(req.method(), req.uri().path(), grpc);
                    let mut span = span;
                    span.update_name(name.clone());
                    span.set_attributes(client_attributes(&req, grpc));
                    Trace {
                        tracer: tracer.clone(),
                        cx: parent.with_span(span),
                        name,
                    }
                })
            }
            None => {
                // No tracer of our own: pass the caller's context on.
                let parent = explicit.unwrap_or_else(propagation::current_parent);
                propagation::inject(parent.span().span_context(), &parent, req.headers_mut());
                None
            }
        };
        if let Some(peer) = &t.peer_header {
            req.headers_mut().insert(PEER_HEADER_NAME, peer.clone());
        }
        let access = t.access_log.then(|| exchange::access_info(&req, None));
        // The service dialed names the destination only when the routing
        // layer records no cluster (no mesh below, or it failed first): keep
        // the authority (a reference count) and look it up at the end.
        let dialed = match &t.metrics {
            Some(_) => match req.uri().authority() {
                Some(authority) => Dialed::Authority(authority.clone()),
                None => match req.headers().get(http::header::HOST) {
                    Some(host) => Dialed::Host(host.clone()),
                    None => Dialed::Nothing,
                },
            },
            None => Dialed::Nothing,
        };
        let request_size_hint = req.body().size_hint().exact().unwrap_or(0);
        let record = DecisionRecord::client(
            trace,
            Start {
                telemetry: self.telemetry.clone(),
                started,
                side: Side::Client { dialed },
                grpc,
                request_size_hint,
                access,
            },
        );
        req.extensions_mut().insert(record.clone());
        let exchange = Exchange::new(record);
        ClientResponseFuture {
            inner: self.inner.call(req),
            exchange: Some(exchange),
        }
    }
}

fn client_attributes<B>(req: &Request<B>, grpc: bool) -> Vec<KeyValue> {
    let mut attributes = request_attributes(req, grpc);
    if let Some(authority) = authority_of(req) {
        let https = req.uri().scheme_str() == Some("https");
        let (host, port) = server_address(&authority, https);
        attributes.push(KeyValue::new("server.address", host));
        attributes.push(KeyValue::new("server.port", port));
    }
    if req.uri().authority().is_some() {
        attributes.push(KeyValue::new("url.full", req.uri().to_string()));
    }
    attributes
}

/// The authority a request is addressed to: the URI's, else `Host`.
fn authority_of<B>(req: &Request<B>) -> Option<http::uri::Authority> {
    req.uri().authority().cloned().or_else(|| {
        let host = req.headers().get(http::header::HOST)?;
        http::uri::Authority::try_from(host.as_bytes()).ok()
    })
}

/// Whether a request is gRPC (by its `content-type`, as Envoy decides).
pub(crate) fn is_grpc(headers: &http::HeaderMap) -> bool {
    // A request without headers (common: the trace headers are added
    // after this) skips hashing the name for a lookup in an empty map.
    !headers.is_empty()
        && headers
            .get(http::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

pin_project! {
    /// The response future of [`ClientTelemetry`].
    pub struct ClientResponseFuture<F> {
        #[pin]
        inner: F,
        exchange: Option<Exchange>,
    }
}

impl<F, RB, E> Future for ClientResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: fmt::Display + 'static,
    RB: Body,
{
    type Output = Result<Response<TelemetryBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        Poll::Ready(exchange::complete(
            this.exchange.take(),
            result,
            exchange::error_flags,
        ))
    }
}

impl<F> fmt::Debug for ClientResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientResponseFuture")
            .finish_non_exhaustive()
    }
}

//! The trace context of an incoming request, forwarded without being
//! parsed: what [`ServerTelemetry`](super::ServerTelemetry) keeps when its
//! telemetry cannot record spans.
//!
//! Whether a server span can ever be recorded is known when the
//! [`Telemetry`] is built (see [`TraceMode`]): not without a tracer, and not
//! with a sampler that never samples (`Sampling::AlwaysOff`). Then nothing
//! per request needs the trace context except the calls the application
//! makes while serving the request, which must continue the caller's trace
//! (the mesh propagates context even with sampling off). Most requests make
//! no such call, so parsing `traceparent`, `tracestate` and `baggage`,
//! minting an unsampled server span and building an
//! `opentelemetry::Context` for each of them (about 2,500 instructions, the
//! server's top user symbol with sampling off) is work for nothing.
//!
//! So the server keeps the raw header values (clones of the request's
//! bytes, no parsing) on the request's [`DecisionRecord`], makes that
//! record the thread's *incoming* one while the application runs (a
//! thread-local slot, far cheaper than attaching an `opentelemetry::Context`
//! on every poll), and builds the context only when something asks for it:
//! [`ClientTelemetry`](super::ClientTelemetry) for a call made in the
//! handler, [`propagate`](super::propagate) and
//! [`context_of`](super::context_of). It is built once per request, exactly
//! as the eager path would have built it (the same tracer mints the same
//! kind of unsampled server span context), so every call of one request
//! shares one trace.

use std::cell::Cell;
use std::sync::OnceLock;

use http::{HeaderMap, HeaderValue};
use opentelemetry::Context;
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanKind, TraceContextExt as _, Tracer as _,
};

use super::Telemetry;
use super::identity::PEER_HEADER;
use super::propagation;
use super::record::DecisionRecord;

/// What a [`Telemetry`] does with trace context, decided once when it is
/// built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TraceMode {
    /// A tracer that may record: every request gets its span at once.
    Record,
    /// A tracer whose sampler never samples: spans are never recorded, but
    /// context is continued (unsampled span ids, the caller's trace id).
    Forward,
    /// No tracer: the caller's context is passed on as it came.
    PassThrough,
}

impl TraceMode {
    /// Whether a request's trace context is needed when it starts.
    pub(crate) fn records(self) -> bool {
        self == TraceMode::Record
    }
}

/// A request's trace headers, as received (not parsed), and the context
/// built from them on first use.
pub(crate) struct Incoming {
    /// Whose tracer mints the server's (unsampled) span context.
    telemetry: Telemetry,
    traceparent: Option<HeaderValue>,
    /// The rarer headers, boxed so that the record (which holds this
    /// inline) stays small for the common request.
    rest: Option<Box<Rest>>,
    cx: OnceLock<Context>,
}

/// The trace headers a request seldom carries.
struct Rest {
    tracestate: Option<HeaderValue>,
    baggage: Option<HeaderValue>,
    /// B3 (Envoy, Zipkin peers), parsed at once: rare, and spread over up
    /// to four headers.
    b3: Option<SpanContext>,
}

impl Incoming {
    /// The request's trace context: what `ServerTelemetry` would have made
    /// the current context, built on the first call.
    pub(crate) fn context(&self) -> &Context {
        self.cx.get_or_init(|| self.build())
    }

    fn build(&self) -> Context {
        let rest = self.rest.as_deref();
        let tracestate = rest.and_then(|r| r.tracestate.as_ref());
        let mut parent = match propagation::parse_w3c(self.traceparent.as_ref(), tracestate) {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => match rest.and_then(|r| r.b3.as_ref()) {
                Some(sc) => Context::new().with_remote_span_context(sc.clone()),
                None => Context::new(),
            },
        };
        if let Some(baggage) = rest.and_then(|r| r.baggage.as_ref()) {
            parent = propagation::with_baggage(parent, baggage);
        }
        match &self.telemetry.inner().tracer {
            // The unsampled SERVER span the eager path starts: a fresh
            // span id in the caller's trace (or a new trace), not recorded.
            Some(tracer) => {
                let span = tracer.build_with_context(
                    SpanBuilder::from_name("").with_kind(SpanKind::Server),
                    &parent,
                );
                parent.with_remote_span_context(span.span_context().clone())
            }
            None => parent,
        }
    }
}

/// What one pass over a request's headers found: everything the server
/// side reads from them, with one look at each header instead of a hashed
/// lookup per name.
#[derive(Default)]
pub(crate) struct Seen {
    /// `content-type: application/grpc...`.
    pub(crate) grpc: bool,
    /// An `x-proxyless-peer` announcement (removed by the caller).
    pub(crate) peer: bool,
    /// `content-length`, when valid.
    pub(crate) content_length: Option<u64>,
    traceparent: Option<HeaderValue>,
    tracestate: Option<HeaderValue>,
    baggage: Option<HeaderValue>,
    b3: bool,
}

/// Reads `headers` once (first values win, as `HeaderMap::get` reads them).
///
/// Inlined into its one caller (`begin`, once per request: no call), and a
/// request without headers (an in-process call) skips the header iterator's
/// setup: together about 70 instructions less per such request
/// (`server/strict_allow_telemetry`).
#[inline]
pub(crate) fn scan(headers: &HeaderMap) -> Seen {
    let mut seen = Seen::default();
    let mut content_type = false;
    let mut content_length = false;
    if headers.is_empty() {
        return seen;
    }
    for (name, value) in headers {
        match name.as_str() {
            "content-type" if !content_type => {
                content_type = true;
                seen.grpc = value.as_bytes().starts_with(b"application/grpc");
            }
            "content-length" if !content_length => {
                content_length = true;
                seen.content_length = value.to_str().ok().and_then(|v| v.parse().ok());
            }
            PEER_HEADER => seen.peer = true,
            propagation::TRACEPARENT if seen.traceparent.is_none() => {
                seen.traceparent = Some(value.clone());
            }
            propagation::TRACESTATE if seen.tracestate.is_none() => {
                seen.tracestate = Some(value.clone());
            }
            propagation::BAGGAGE if seen.baggage.is_none() => {
                seen.baggage = Some(value.clone());
            }
            "b3" | "x-b3-traceid" => seen.b3 = true,
            _ => {}
        }
    }
    seen
}

impl Seen {
    /// The request's trace headers, kept for `telemetry` to continue:
    /// `None` when there is nothing to continue (no tracer to mint a span
    /// context, and no trace headers to pass on).
    ///
    /// Inlined into its one caller (`begin`, as `scan` is): the `Seen` it
    /// reads is then the caller's, with no call per request.
    #[inline]
    pub(crate) fn incoming(
        &mut self,
        telemetry: &Telemetry,
        headers: &HeaderMap,
    ) -> Option<Incoming> {
        let b3 = if self.b3 {
            propagation::extract_b3(headers)
        } else {
            None
        };
        let any = self.traceparent.is_some() || self.baggage.is_some() || b3.is_some();
        if !any && telemetry.inner().tracer.is_none() {
            return None;
        }
        let rest =
            (self.tracestate.is_some() || self.baggage.is_some() || b3.is_some()).then(|| {
                Box::new(Rest {
                    tracestate: self.tracestate.take(),
                    baggage: self.baggage.take(),
                    b3,
                })
            });
        Some(Incoming {
            telemetry: telemetry.clone(),
            traceparent: self.traceparent.take(),
            rest,
            cx: OnceLock::new(),
        })
    }
}

thread_local! {
    /// The record of the request whose application is running on this
    /// thread, when its trace context was kept unparsed.
    static CURRENT: Cell<Option<DecisionRecord>> = const { Cell::new(None) };
}

/// Makes `record` the thread's incoming request (`None`: no request with
/// unparsed trace headers) until the guard drops; then the previous one is
/// back (servers can nest).
pub(crate) fn enter(record: Option<&DecisionRecord>) -> Entered {
    Entered(CURRENT.replace(record.cloned()))
}

/// Restores the previous incoming request when dropped.
pub(crate) struct Entered(Option<DecisionRecord>);

impl Drop for Entered {
    fn drop(&mut self) {
        // The record set by `enter` is dropped here, after the slot is
        // restored (no code runs while the slot is half-written).
        let _ = CURRENT.replace(self.0.take());
    }
}

/// Calls `f` with the trace context of the incoming request whose
/// application runs on this thread, if it was kept unparsed (built now if
/// needed); whether there was one.
pub(crate) fn with_current(f: impl FnOnce(&Context)) -> bool {
    let Some(record) = CURRENT.take() else {
        return false;
    };
    let found = match record.incoming() {
        Some(incoming) => {
            f(incoming.context());
            true
        }
        None => false,
    };
    CURRENT.set(Some(record));
    found
}

/// The trace context of the incoming request whose application runs on
/// this thread, if it was kept unparsed (built now if needed).
pub(crate) fn current() -> Option<Context> {
    let record = CURRENT.take()?;
    let cx = record.incoming().map(|i| i.context().clone());
    CURRENT.set(Some(record));
    cx
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::{Request, Response};
    use http_body_util::{BodyExt as _, Empty};
    use opentelemetry::baggage::BaggageExt as _;
    use opentelemetry::trace::{TraceContextExt as _, TraceId};
    use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
    use tower::{Layer as _, Service as _, ServiceExt as _, service_fn};

    use super::*;
    use crate::telemetry::{
        ClientTelemetryLayer, Identity, OtelConfig, OtlpProtocol, Sampling, ServerTelemetryLayer,
        context_of, propagate,
    };

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// Telemetry whose tracer never samples, declared so.
    fn sampling_off() -> Telemetry {
        let provider = SdkTracerProvider::builder()
            .with_sampler(Sampler::AlwaysOff)
            .build();
        Telemetry::builder(Identity::new("frontend", "shop"))
            .tracer_provider(provider)
            .sampling(Sampling::AlwaysOff)
            .build()
    }

    /// What a call made while serving a request carried: its trace headers.
    #[derive(Debug, Clone, Default)]
    struct Sent {
        traceparent: String,
        tracestate: Option<String>,
        baggage: Option<String>,
    }

    impl Sent {
        fn trace_id(&self) -> &str {
            &self.traceparent[3..35]
        }
        fn span_id(&self) -> &str {
            &self.traceparent[36..52]
        }
    }

    /// A client under `telemetry` whose "network" records what it was sent.
    fn client(
        telemetry: Telemetry,
        sent: std::sync::Arc<std::sync::Mutex<Vec<Sent>>>,
    ) -> crate::telemetry::ClientTelemetry<
        impl tower::Service<
            Request<Empty<Bytes>>,
            Response = Response<Empty<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send,
    > {
        let echo = service_fn(move |req: Request<Empty<Bytes>>| {
            let text = |name: &str| {
                req.headers()
                    .get(name)
                    .map(|v| v.to_str().unwrap().to_owned())
            };
            sent.lock().unwrap().push(Sent {
                traceparent: text("traceparent").unwrap_or_default(),
                tracestate: text("tracestate"),
                baggage: text("baggage"),
            });
            async { Ok::<_, Infallible>(Response::new(Empty::new())) }
        });
        ClientTelemetryLayer::new(telemetry).layer(echo)
    }

    fn call() -> Request<Empty<Bytes>> {
        Request::get("http://payment/pay")
            .body(Empty::new())
            .unwrap()
    }

    #[test]
    fn the_trace_mode_is_decided_when_the_telemetry_is_built() {
        let mode = |t: &Telemetry| t.inner().trace_mode;
        let id = || Identity::new("a", "b");
        assert_eq!(
            mode(&Telemetry::builder(id()).build()),
            TraceMode::PassThrough
        );
        assert_eq!(mode(&sampling_off()), TraceMode::Forward);
        // A provider of unknown sampling may record.
        let provider = SdkTracerProvider::builder().build();
        assert_eq!(
            mode(&Telemetry::builder(id()).tracer_provider(provider).build()),
            TraceMode::Record
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _entered = runtime.enter();
        let otel = |sampling| {
            OtelConfig::default()
                .with_protocol(OtlpProtocol::Grpc)
                .with_endpoint("http://127.0.0.1:9")
                .unwrap()
                .with_sampling(sampling)
        };
        let built = |sampling| {
            mode(
                &Telemetry::builder(id())
                    .otel(&otel(sampling))
                    .unwrap()
                    .build(),
            )
        };
        assert_eq!(built(Sampling::AlwaysOff), TraceMode::Forward);
        assert_eq!(built(Sampling::TraceIdRatio(0.0)), TraceMode::Forward);
        assert_eq!(built(Sampling::ParentBasedAlwaysOff), TraceMode::Record);
        assert_eq!(built(Sampling::ParentBasedAlwaysOn), TraceMode::Record);
    }

    /// Sampling off: the server parses nothing per request, yet a call made
    /// in the handler continues the caller's trace (trace id, trace state,
    /// baggage), as an unsampled child; the context is built once, on the
    /// first call.
    #[tokio::test]
    async fn sampling_off_parses_nothing_until_a_call_continues_the_trace() {
        let telemetry = sampling_off();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = client(telemetry.clone(), sent.clone());
        let app = service_fn(move |req: Request<Empty<Bytes>>| {
            let client = client.clone();
            async move {
                // No context was built: the trace headers are kept as they came.
                assert!(req.extensions().get::<Context>().is_none());
                let kept = DecisionRecord::of(&req).unwrap().incoming().unwrap();
                assert!(kept.cx.get().is_none(), "parsed before anything needed it");
                client.clone().oneshot(call()).await.unwrap();
                assert!(kept.cx.get().is_some());
                client.oneshot(call()).await.unwrap();
                // The application's own OpenTelemetry code reads it so.
                let cx = context_of(&req);
                assert_eq!(
                    cx.span().span_context().trace_id(),
                    TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
                );
                assert_eq!(
                    cx.baggage().get("user").map(|v| v.to_string()),
                    Some("beta".into())
                );
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        let server = ServerTelemetryLayer::new(telemetry).layer(app);
        let mut incoming = Request::get("http://frontend/").body(Empty::new()).unwrap();
        let headers = incoming.headers_mut();
        headers.insert("traceparent", PARENT.parse().unwrap());
        headers.insert("tracestate", "vendor=x".parse().unwrap());
        headers.insert("baggage", "user=beta".parse().unwrap());
        let response = server.oneshot(incoming).await.unwrap();
        response.into_body().collect().await.unwrap();
        let sent = sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2);
        for s in &sent {
            assert_eq!(s.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736", "{s:?}");
            assert_ne!(
                s.span_id(),
                "00f067aa0ba902b7",
                "a child, not the caller's span"
            );
            assert!(s.traceparent.ends_with("-00"), "unsampled: {s:?}");
            assert_eq!(s.tracestate.as_deref(), Some("vendor=x"));
            assert_eq!(s.baggage.as_deref(), Some("user=beta"));
        }
        assert_ne!(sent[0].span_id(), sent[1].span_id());
    }

    /// Without trace headers, every call of one request still shares one
    /// (new) trace, as under the eager path's unsampled server span; a task
    /// spawned by the handler continues it through `propagate`.
    #[tokio::test]
    async fn calls_of_one_request_share_its_trace_even_from_a_spawned_task() {
        let telemetry = sampling_off();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = client(telemetry.clone(), sent.clone());
        let app = service_fn(move |req: Request<Empty<Bytes>>| {
            let client = client.clone();
            async move {
                client.clone().oneshot(call()).await.unwrap();
                let mut outgoing = call();
                propagate(&req, &mut outgoing);
                tokio::spawn(client.oneshot(outgoing))
                    .await
                    .unwrap()
                    .unwrap();
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        let mut server = ServerTelemetryLayer::new(telemetry).layer(app);
        for _ in 0..2 {
            let request = Request::get("http://frontend/").body(Empty::new()).unwrap();
            let response = server.ready().await.unwrap().call(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
        let sent = sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 4);
        assert_eq!(sent[0].trace_id(), sent[1].trace_id(), "{sent:?}");
        assert_eq!(sent[2].trace_id(), sent[3].trace_id(), "{sent:?}");
        assert_ne!(
            sent[0].trace_id(),
            sent[2].trace_id(),
            "one trace per request"
        );
        assert!(sent.iter().all(|s| s.traceparent.ends_with("-00")));
    }

    /// No tracer at all: the caller's context passes through unchanged, and
    /// a request without trace headers keeps nothing.
    #[tokio::test]
    async fn without_a_tracer_the_callers_context_passes_through() {
        let telemetry = Telemetry::builder(Identity::new("frontend", "shop")).build();
        let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let client = client(telemetry.clone(), sent.clone());
        let app = service_fn(move |req: Request<Empty<Bytes>>| {
            let client = client.clone();
            async move {
                let traced = req.headers().contains_key("traceparent");
                let record = DecisionRecord::of(&req).unwrap();
                assert_eq!(record.incoming().is_some(), traced);
                client.oneshot(call()).await.unwrap();
                Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
            }
        });
        let mut server = ServerTelemetryLayer::new(telemetry).layer(app);
        for traced in [true, false] {
            let mut request = Request::get("http://frontend/").body(Empty::new()).unwrap();
            if traced {
                request
                    .headers_mut()
                    .insert("traceparent", PARENT.parse().unwrap());
            }
            let response = server.ready().await.unwrap().call(request).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
        let sent = sent.lock().unwrap().clone();
        assert_eq!(sent[0].traceparent, PARENT);
        assert_eq!(sent[1].traceparent, "", "nothing to continue");
    }

    #[test]
    fn one_look_at_the_headers_finds_what_the_server_reads() {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/grpc+proto".parse().unwrap());
        h.insert("content-length", "42".parse().unwrap());
        h.insert(PEER_HEADER, "wl=frontend".parse().unwrap());
        h.insert("traceparent", PARENT.parse().unwrap());
        h.append("traceparent", "garbage".parse().unwrap());
        let seen = scan(&h);
        assert!(seen.grpc && seen.peer && !seen.b3);
        assert_eq!(seen.content_length, Some(42));
        assert_eq!(
            seen.traceparent.as_ref().unwrap(),
            PARENT,
            "the first value"
        );
        assert!(seen.tracestate.is_none() && seen.baggage.is_none());
        let seen = scan(&HeaderMap::new());
        assert!(!seen.grpc && !seen.peer && seen.content_length.is_none());
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "a3ce929d0e0e4736".parse().unwrap());
        assert!(scan(&h).b3);
    }
}

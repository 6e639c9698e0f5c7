//! Trace context on the wire: W3C Trace Context and Baggage out and in,
//! Zipkin B3 in.
//!
//! - Out (every client request): `traceparent` / `tracestate`
//!   ([W3C Trace Context](https://www.w3.org/TR/trace-context/)) and
//!   `baggage` ([W3C Baggage](https://www.w3.org/TR/baggage/)), what
//!   OpenTelemetry SDKs, Envoy's OpenTelemetry tracer and Jaeger read.
//!   `traceparent` is written straight from the span context into a fixed
//!   55-byte buffer (byte-for-byte what the SDK's `TraceContextPropagator`
//!   writes, tested below), so a request whose span is not sampled needs no
//!   `Context` built for it.
//! - In (every server request): W3C first (`traceparent` parsed here
//!   without allocating, as the SDK's `TraceContextPropagator` accepts it,
//!   tested against it below; baggage through the SDK's
//!   `BaggagePropagator`); when there is no
//!   valid `traceparent`, B3 as Envoy/Zipkin/Istio sidecars send it, single
//!   header (`b3: {trace}-{span}-{sampled}-{parent}`) or multi header
//!   (`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, `x-b3-flags`)
//!   ([B3 propagation](https://github.com/openzipkin/b3-propagation)).
//!   B3 is read by the small parser here rather than `opentelemetry-zipkin`,
//!   which would bring the whole Zipkin exporter and an HTTP client for one
//!   function. A B3 context without a sampling decision ("deferred") is
//!   read as not sampled, as OpenTelemetry's Zipkin propagator reads it.

use bytes::Bytes;
use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Request};
use opentelemetry::Context;
use opentelemetry::baggage::BaggageExt as _;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::BaggagePropagator;
use opentelemetry_sdk::trace::{IdGenerator as _, RandomIdGenerator};

use super::incoming;
use super::record::DecisionRecord;

/// The W3C trace context header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C vendor trace state header.
pub const TRACESTATE: &str = "tracestate";
/// The W3C baggage header.
pub const BAGGAGE: &str = "baggage";

const TRACEPARENT_NAME: HeaderName = HeaderName::from_static(TRACEPARENT);
const TRACESTATE_NAME: HeaderName = HeaderName::from_static(TRACESTATE);
const BAGGAGE_NAME: HeaderName = HeaderName::from_static(BAGGAGE);
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// The trace context of an incoming request: W3C (with baggage), else B3,
/// else an empty context. The span context found is marked remote.
pub fn extract(headers: &HeaderMap) -> Context {
    let sc = parse_w3c(headers.get(TRACEPARENT_NAME), headers.get(TRACESTATE_NAME))
        .or_else(|| extract_b3(headers));
    let mut cx = match sc {
        Some(sc) => Context::new().with_remote_span_context(sc),
        None => Context::new(),
    };
    if headers.contains_key(BAGGAGE_NAME) {
        cx = BaggagePropagator::new().extract_with_context(&cx, &HeaderExtractor(headers));
    }
    cx
}

/// The W3C span context of a `traceparent` (with its `tracestate`, which
/// is ignored when malformed), marked remote; `None` when absent or
/// invalid.
pub(crate) fn parse_w3c(
    traceparent: Option<&HeaderValue>,
    tracestate: Option<&HeaderValue>,
) -> Option<SpanContext> {
    let sc = parse_traceparent(traceparent?.as_bytes())?;
    Some(with_trace_state(sc, tracestate))
}

/// `cx` with the baggage of a `baggage` header value (the SDK's
/// `BaggagePropagator`, as [`extract`] reads it).
pub(crate) fn with_baggage(cx: Context, baggage: &HeaderValue) -> Context {
    let mut headers = HeaderMap::with_capacity(1);
    headers.insert(BAGGAGE_NAME, baggage.clone());
    BaggagePropagator::new().extract_with_context(&cx, &HeaderExtractor(&headers))
}

/// A W3C `traceparent` (what the SDK's `TraceContextPropagator` accepts,
/// parsed without allocating): version `00` is exactly
/// `00-{32 hex}-{16 hex}-{2 hex}`; a later version may append
/// `-{more}`; `ff`, uppercase hex and all-zero ids are invalid.
fn parse_traceparent(v: &[u8]) -> Option<SpanContext> {
    let version = v.get(0..2)?;
    let hex = |b: &[u8]| -> Option<u128> {
        if b.is_empty() || b.len() > 32 {
            return None;
        }
        let mut acc = 0u128;
        for &c in b {
            let digit = match c {
                b'0'..=b'9' => c - b'0',
                b'a'..=b'f' => c - b'a' + 10,
                _ => return None,
            };
            acc = (acc << 4) | u128::from(digit);
        }
        Some(acc)
    };
    let version = hex(version)?;
    if version == 0xff
        || v.get(2) != Some(&b'-')
        || v.get(35) != Some(&b'-')
        || v.get(52) != Some(&b'-')
    {
        return None;
    }
    match (version, v.len()) {
        (0, 55) => {}
        (0, _) => return None,
        (_, 55) => {}
        (_, n) if n > 55 && v.get(55) == Some(&b'-') => {}
        _ => return None,
    }
    let trace_id = TraceId::from(hex(v.get(3..35)?)?);
    let span_id = SpanId::from(u64::try_from(hex(v.get(36..52)?)?).ok()?);
    let flags = u8::try_from(hex(v.get(53..55)?)?).ok()?;
    if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let flags = TraceFlags::new(flags) & TraceFlags::SAMPLED;
    Some(SpanContext::new(
        trace_id,
        span_id,
        flags,
        true,
        TraceState::NONE,
    ))
}

/// Adds the request's `tracestate` (ignored when malformed).
fn with_trace_state(sc: SpanContext, tracestate: Option<&HeaderValue>) -> SpanContext {
    let Some(state) = tracestate.and_then(|v| v.to_str().ok()) else {
        return sc;
    };
    match state.parse::<TraceState>() {
        Ok(state) => SpanContext::new(sc.trace_id(), sc.span_id(), sc.trace_flags(), true, state),
        Err(_) => sc,
    }
}

/// Writes `traceparent` (and `tracestate` when not empty) for `sc`, and
/// `baggage` from `cx` when it has any. An invalid span context writes no
/// trace headers.
pub(crate) fn inject(sc: &SpanContext, cx: &Context, headers: &mut HeaderMap) {
    inject_span_context(sc, headers);
    if !cx.baggage().is_empty() {
        BaggagePropagator::new().inject_context(cx, &mut HeaderInjector(headers));
    }
}

/// Writes `traceparent` / `tracestate` for `sc` (nothing if invalid).
pub(crate) fn inject_span_context(sc: &SpanContext, headers: &mut HeaderMap) {
    if !sc.is_valid() {
        return;
    }
    write_trace_headers(
        sc.trace_id(),
        sc.span_id(),
        sc.is_sampled(),
        sc.trace_state(),
        headers,
    );
}

/// Writes the trace headers of an unsampled child of `parent`: what
/// [`inject`] writes for the span context the SDK mints for a span its
/// sampler drops (the parent's trace, or a new one, a new span id, not
/// sampled, the parent's trace state), without building that span context.
pub(crate) fn inject_unsampled_child(parent: &Context, headers: &mut HeaderMap) {
    // Under a suppressed context the SDK's tracer makes an invalid span
    // context: no trace headers.
    if !parent.is_telemetry_suppressed() {
        let ids = RandomIdGenerator::default();
        let span = parent.span();
        let psc = span.span_context();
        if psc.is_valid() {
            let state = psc.trace_state();
            write_trace_headers(psc.trace_id(), ids.new_span_id(), false, state, headers);
        } else {
            write_new_trace(&ids, headers);
        }
    }
    if !parent.baggage().is_empty() {
        BaggagePropagator::new().inject_context(parent, &mut HeaderInjector(headers));
    }
}

/// [`inject_unsampled_child`] of the parent of a client call made without an
/// explicit context (see [`current_parent`]), read in place: no context is
/// cloned or built unless the request being served kept its trace headers
/// unparsed.
pub(crate) fn inject_unsampled_child_of_current(headers: &mut HeaderMap) {
    // `Some(suppressed)`: the current context has no span and no baggage.
    let bare = Context::map_current(|cx| {
        if cx.has_active_span() || !cx.baggage().is_empty() {
            inject_unsampled_child(cx, headers);
            None
        } else {
            Some(cx.is_telemetry_suppressed())
        }
    });
    if let Some(suppressed) = bare
        && !incoming::with_current(|cx| inject_unsampled_child(cx, headers))
        && !suppressed
    {
        // A new trace: what `inject_unsampled_child(&Context::new(), ..)`
        // writes (an empty context is not suppressed, has no valid span and
        // no baggage), without building that context and asking it again
        // for its span and its baggage (a type-map lookup each): this is
        // the path of every call made outside a served request.
        write_new_trace(&RandomIdGenerator::default(), headers);
    }
}

/// The unsampled headers of a new trace: a fresh trace id and span id, no
/// trace state (the trace id is drawn first, as the SDK does).
fn write_new_trace(ids: &RandomIdGenerator, headers: &mut HeaderMap) {
    let trace_id = ids.new_trace_id();
    write_trace_headers(
        trace_id,
        ids.new_span_id(),
        false,
        &TraceState::NONE,
        headers,
    );
}

/// Writes `traceparent` for these ids, and `tracestate` when `state` is not
/// empty (removing a stale one otherwise).
fn write_trace_headers(
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
    state: &TraceState,
    headers: &mut HeaderMap,
) {
    // A request with no headers yet has no stale `tracestate` to remove.
    let may_have_state = !headers.is_empty();
    // Owned by the `Bytes` (one allocation, shared by the clones the
    // client stack makes to replay the request), not copied into a buffer
    // that its first clone would allocate again to share.
    let value = traceparent(trace_id, span_id, sampled);
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from_owner(value)) {
        headers.insert(TRACEPARENT_NAME, value);
    }
    if *state == TraceState::NONE {
        if may_have_state && headers.contains_key(TRACESTATE_NAME) {
            headers.remove(TRACESTATE_NAME);
        }
        return;
    }
    let state = state.header();
    if state.is_empty() {
        headers.remove(TRACESTATE_NAME);
    } else if let Ok(value) = HeaderValue::from_str(&state) {
        headers.insert(TRACESTATE_NAME, value);
    }
}

/// `00-{trace id}-{span id}-{flags}`, lowercase hex.
fn traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> [u8; 55] {
    let mut out = [b'-'; 55];
    out[0] = b'0';
    out[1] = b'0';
    let trace_id = u128::from_be_bytes(trace_id.to_bytes());
    out[3..19].copy_from_slice(&hex16((trace_id >> 64) as u64));
    out[19..35].copy_from_slice(&hex16(trace_id as u64));
    out[36..52].copy_from_slice(&hex16(u64::from_be_bytes(span_id.to_bytes())));
    out[53] = b'0';
    out[54] = if sampled { b'1' } else { b'0' };
    out
}

/// The 16 lowercase hex digits of `x`, eight bytes at a time: each nibble
/// is spread into its own byte, then `0`-`9` and `a`-`f` are made at once
/// (no loop per digit; the id is written for every outgoing request).
fn hex16(x: u64) -> [u8; 16] {
    /// Spreads the 8 nibbles of `x` into the 8 bytes of a u64, most
    /// significant nibble first (in the lowest byte once stored big-endian).
    fn spread(x: u32) -> u64 {
        let x = u64::from(x);
        let x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
        let x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
        (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f
    }
    /// Nibbles (one per byte) to ASCII lowercase hex.
    fn ascii(n: u64) -> u64 {
        // 0x06 added to each nibble carries into bit 4 exactly when it is
        // 10 or more: those bytes get 'a' - '0' - 10 = 39 more.
        let letters = ((n + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
        n + 0x3030_3030_3030_3030 + letters * 39
    }
    let high = ascii(spread((x >> 32) as u32)).to_be_bytes();
    let low = ascii(spread(x as u32)).to_be_bytes();
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&high);
    out[8..].copy_from_slice(&low);
    out
}

/// A B3 span context (single header first, then multi header), marked
/// remote; `None` when absent or malformed.
pub fn extract_b3(headers: &HeaderMap) -> Option<SpanContext> {
    if let Some(single) = headers.get(B3).and_then(|v| v.to_str().ok()) {
        return b3_single(single);
    }
    let get = |name: HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let trace_id = b3_trace_id(get(B3_TRACE_ID)?)?;
    let span_id = b3_span_id(get(B3_SPAN_ID)?)?;
    let debug = get(B3_FLAGS) == Some("1");
    let sampled = match get(B3_SAMPLED) {
        Some("1" | "true") => true,
        Some("0" | "false") | None => false,
        Some(_) => return None,
    };
    Some(remote(trace_id, span_id, debug || sampled))
}

fn b3_single(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let trace_id = b3_trace_id(parts.next()?)?;
    let span_id = b3_span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => false,
        Some("1" | "d") => true,
        Some("0") => false,
        Some(_) => return None,
    };
    if let Some(parent) = parts.next() {
        b3_span_id(parent)?;
    }
    if parts.next().is_some() {
        return None;
    }
    Some(remote(trace_id, span_id, sampled))
}

fn remote(trace_id: TraceId, span_id: SpanId, sampled: bool) -> SpanContext {
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    SpanContext::new(trace_id, span_id, flags, true, TraceState::NONE)
}

/// 16 or 32 lowercase hex digits (64-bit ids are left-padded), not zero.
fn b3_trace_id(s: &str) -> Option<TraceId> {
    if !(s.len() == 16 || s.len() == 32) || !is_lower_hex(s) {
        return None;
    }
    let id = TraceId::from_hex(s).ok()?;
    (id != TraceId::INVALID).then_some(id)
}

/// 16 lowercase hex digits, not zero.
fn b3_span_id(s: &str) -> Option<SpanId> {
    if s.len() != 16 || !is_lower_hex(s) {
        return None;
    }
    let id = SpanId::from_hex(s).ok()?;
    (id != SpanId::INVALID).then_some(id)
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What carries request extensions: an `http::Request`, its `Parts`, or
/// the `Extensions` themselves.
pub trait HasExtensions {
    /// The extensions.
    fn extensions(&self) -> &Extensions;
}

impl HasExtensions for Extensions {
    fn extensions(&self) -> &Extensions {
        self
    }
}

impl HasExtensions for http::request::Parts {
    fn extensions(&self) -> &Extensions {
        &self.extensions
    }
}

impl<B> HasExtensions for Request<B> {
    fn extensions(&self) -> &Extensions {
        Request::extensions(self)
    }
}

/// Carries what an incoming request's context means for the calls made
/// while serving it onto `outgoing`: the trace context that
/// [`ServerTelemetry`](super::ServerTelemetry) stored (so the outgoing
/// call's span is a child of the server span) and the request's
/// [`Deadline`](crate::Deadline) (so the outgoing call gets what is left of
/// it).
///
/// Inside a handler served through
/// [`ServerTelemetryLayer`](super::ServerTelemetryLayer) this is only
/// needed when the call is made outside the handler's future (a spawned
/// task): there the context is not current.
pub fn propagate<B>(incoming: &impl HasExtensions, outgoing: &mut Request<B>) {
    let extensions = incoming.extensions();
    if let Some(cx) = kept_context(extensions) {
        outgoing.extensions_mut().insert(cx);
    }
    if let Some(deadline) = extensions.get::<crate::Deadline>() {
        outgoing.extensions_mut().insert(*deadline);
    }
}

/// The trace context of an incoming request (set by
/// [`ServerTelemetry`](super::ServerTelemetry)), or an empty context.
///
/// When the server's telemetry cannot record spans (no tracer, or a
/// sampler that never samples), the request carries its trace headers
/// unparsed instead of an `opentelemetry::Context` extension (see
/// [`Telemetry`](super::Telemetry)); this builds the context from them, as
/// the application's own OpenTelemetry code should read it.
pub fn context_of(incoming: &impl HasExtensions) -> Context {
    kept_context(incoming.extensions()).unwrap_or_default()
}

/// The context `ServerTelemetry` kept on a request: its `Context`
/// extension, or the one built from the trace headers its record kept.
fn kept_context(extensions: &Extensions) -> Option<Context> {
    if let Some(cx) = extensions.get::<Context>() {
        return Some(cx.clone());
    }
    let incoming = extensions.get::<DecisionRecord>()?.incoming()?;
    Some(incoming.context().clone())
}

/// The parent of a client call made without an explicit context: the
/// current `opentelemetry::Context`, or, when that is empty, the trace of
/// the request being served on this thread (kept unparsed by
/// `ServerTelemetry`, see [`incoming`](super::incoming)).
pub(crate) fn current_parent() -> Context {
    let current = Context::current();
    if current.has_active_span() || !current.baggage().is_empty() {
        return current;
    }
    incoming::current().unwrap_or(current)
}

#[cfg(test)]
mod tests {
    use opentelemetry::KeyValue;
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::*;

    #[test]
    fn traceparent_parsing_agrees_with_the_sdk() {
        for input in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "",
        ] {
            let mut h = HeaderMap::new();
            h.insert(TRACEPARENT, input.parse().unwrap());
            h.insert(TRACESTATE, "a=1,b=2".parse().unwrap());
            let sdk = TraceContextPropagator::new().extract(&HeaderExtractor(&h));
            let ours = extract(&h);
            let (sdk, ours) = (
                sdk.span().span_context().clone(),
                ours.span().span_context().clone(),
            );
            assert_eq!(ours.is_valid(), sdk.is_valid(), "{input:?}");
            if sdk.is_valid() {
                assert_eq!(ours, sdk, "{input:?}");
            }
        }
    }

    fn sc(sampled: bool, state: TraceState) -> SpanContext {
        SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            },
            false,
            state,
        )
    }

    #[test]
    fn traceparent_is_what_the_sdk_writes() {
        let state = TraceState::from_key_value([("vendor", "x")]).unwrap();
        for sampled in [true, false] {
            let sc = sc(sampled, state.clone());
            let cx = Context::new().with_remote_span_context(sc.clone());
            let mut ours = HeaderMap::new();
            inject(&sc, &cx, &mut ours);
            let mut sdk = HeaderMap::new();
            TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(&mut sdk));
            assert_eq!(ours[TRACEPARENT], sdk[TRACEPARENT]);
            assert_eq!(ours[TRACESTATE], sdk[TRACESTATE]);
        }
        let sc = sc(true, TraceState::NONE);
        assert_eq!(
            &traceparent(sc.trace_id(), sc.span_id(), sc.is_sampled())[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
    }

    #[test]
    fn ids_are_written_in_lowercase_hex() {
        for x in [
            0u64,
            1,
            0x0123_4567_89ab_cdef,
            u64::MAX,
            0xa0b1_c2d3_e4f5_0617,
        ] {
            assert_eq!(&hex16(x), format!("{x:016x}").as_bytes(), "{x:#x}");
        }
    }

    #[test]
    fn w3c_and_baggage_round_trip() {
        let cx = Context::new()
            .with_remote_span_context(sc(true, TraceState::NONE))
            .with_baggage([KeyValue::new("user", "beta")]);
        let mut headers = HeaderMap::new();
        inject(cx.span().span_context(), &cx, &mut headers);
        let back = extract(&headers);
        assert_eq!(
            back.span().span_context().trace_id(),
            cx.span().span_context().trace_id()
        );
        assert!(back.span().span_context().is_remote());
        assert!(back.span().span_context().is_sampled());
        assert_eq!(
            back.baggage().get("user").map(|v| v.to_string()),
            Some("beta".into())
        );
    }

    #[test]
    fn b3_single_and_multi_are_accepted() {
        let mut h = HeaderMap::new();
        h.insert(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90"
                .parse()
                .unwrap(),
        );
        let cx = extract(&h);
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "80f198ee56343ba864fe8b2a57d3eff7"
        );
        assert_eq!(sc.span_id().to_string(), "e457b5a2e4d86bd1");
        assert!(sc.is_sampled() && sc.is_remote());

        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "a3ce929d0e0e4736".parse().unwrap());
        h.insert("x-b3-spanid", "00f067aa0ba902b7".parse().unwrap());
        h.insert("x-b3-sampled", "0".parse().unwrap());
        let sc = extract_b3(&h).unwrap();
        assert_eq!(
            sc.trace_id().to_string(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert!(!sc.is_sampled());
        h.insert("x-b3-flags", "1".parse().unwrap());
        assert!(extract_b3(&h).unwrap().is_sampled());
    }

    /// A call made outside any served request and any context starts a
    /// new trace: a valid unsampled `traceparent` with fresh ids per call,
    /// and neither `tracestate` (a stale one is removed) nor `baggage`.
    #[test]
    fn a_call_without_a_context_starts_a_new_unsampled_trace() {
        let mut seen = Vec::new();
        for _ in 0..2 {
            let mut h = HeaderMap::new();
            h.insert(TRACESTATE, "stale=1".parse().unwrap());
            inject_unsampled_child_of_current(&mut h);
            let sc = parse_traceparent(h[TRACEPARENT].as_bytes()).expect("a valid traceparent");
            assert!(!sc.is_sampled());
            assert!(h[TRACEPARENT].as_bytes().ends_with(b"-00"));
            assert!(!h.contains_key(TRACESTATE));
            assert!(!h.contains_key(BAGGAGE));
            seen.push((sc.trace_id(), sc.span_id()));
        }
        assert_ne!(seen[0].0, seen[1].0, "a new trace per call");
        assert_ne!(seen[0].1, seen[1].1);
    }

    #[test]
    fn w3c_wins_over_b3_and_garbage_is_ignored() {
        let mut h = HeaderMap::new();
        h.insert(
            TRACEPARENT,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        h.insert(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            extract(&h).span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        for bad in [
            "zz",
            "80f198ee56343ba864fe8b2a57d3eff7",
            "80F198EE56343BA864FE8B2A57D3EFF7-e457b5a2e4d86bd1",
            "00000000000000000000000000000000-e457b5a2e4d86bd1-1",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-x",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90-extra",
        ] {
            let mut h = HeaderMap::new();
            h.insert("b3", bad.parse().unwrap());
            assert!(extract_b3(&h).is_none(), "{bad}");
            assert!(!extract(&h).span().span_context().is_valid(), "{bad}");
        }
    }
}

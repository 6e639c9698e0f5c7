//! Local rate limiting (Envoy's `local_ratelimit` filter), enforced in
//! process: the server stack ([`ServerLayer`](crate::ServerLayer), from the
//! server listener an EnvoyFilter configures) and, when a client route
//! carries a limit, the client stack.
//!
//! A [`Limiter`] holds one config ([`RateLimitConfig`]) and its buckets:
//! one `AtomicU64` per token bucket (the default one and one per
//! descriptor), taken from with a compare-and-swap loop over
//! [`TokenBucket::take`]. There is no lock, no timer and no task: the
//! clock is the time since the limiter was made, read once per request,
//! and only for a request a limit applies to. A limiter is made per config
//! and kept across config pushes that do not change it, so its buckets
//! survive them.
//!
//! A refused request gets Envoy's answer: `429` with the body
//! `local_rate_limited`, `x-envoy-ratelimited: true` and the config's
//! `response_headers_to_add`; a gRPC request a Trailers-Only
//! `UNAVAILABLE` (or `RESOURCE_EXHAUSTED` with
//! `rate_limited_as_resource_exhausted`). Under telemetry the response
//! carries the response flag `RL` (metrics' `response_flags`, the access
//! log), as Envoy's does, and is counted in
//! `proxyless_rate_limited_total{direction}` (`inbound`: refused by the
//! server stack, `outbound`: by the client stack before any connection;
//! Envoy's `<stat_prefix>.http_local_rate_limit.enforced`).
//!
//! On the client side ([`MeshLayer`](crate::MeshLayer)) each limited route
//! has its limiter ([`RouteLimiters`]); the limit is checked once the route
//! is chosen, before the request's header changes, and a refused request
//! never reaches a connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Request, Response, StatusCode};
use mesh_core::model::Fraction;
use mesh_core::ratelimit::{LocalRateLimit, Packed, RateLimitConfig, Refusal, TokenBucket};
use mesh_core::route::RequestView;

use crate::local_reply::{LOCAL_REPLY_HEADER, insert_grpc_status, is_grpc};

mod client;
pub(crate) use client::RouteLimiters;

/// Envoy's header on a response its rate limit filter refused.
pub const RATE_LIMITED_HEADER: &str = "x-envoy-ratelimited";

/// The body (and gRPC message) of a refused request, as Envoy writes it.
pub const RATE_LIMITED_BODY: &str = "local_rate_limited";

/// The `x-proxyless-local-reply` cause of a refused request.
const CAUSE: &str = "rate-limited";

/// The buckets of one rate limit config (see the [module docs](self)).
#[derive(Debug)]
pub struct Limiter {
    config: Arc<RateLimitConfig>,
    start: Instant,
    /// The default bucket of the effective config.
    default: AtomicU64,
    /// One per descriptor of the effective config.
    descriptors: Box<[AtomicU64]>,
    limited: AtomicU64,
    refused: AtomicU64,
}

/// What the limiter decided for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No limit applies, or a token was taken.
    Pass,
    /// Over the limit but not enforced (`filter_enforced` below 100%):
    /// the request passes, and is counted.
    LimitedNotEnforced,
    /// Over the limit and enforced: answer with [`Limiter::refusal`].
    Refused,
}

impl Limiter {
    /// The buckets of `config`, full.
    pub fn new(config: Arc<RateLimitConfig>) -> Self {
        let effective = config.effective();
        let full = |b: &TokenBucket| AtomicU64::new(b.initial().bits());
        Limiter {
            default: AtomicU64::new(effective.bucket.as_ref().map_or(0, |b| b.initial().bits())),
            descriptors: effective
                .descriptors
                .iter()
                .map(|d| full(&d.bucket))
                .collect(),
            start: Instant::now(),
            limited: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            config,
        }
    }

    /// The config.
    pub fn config(&self) -> &Arc<RateLimitConfig> {
        &self.config
    }

    /// Requests over the limit so far (refused or not enforced; Envoy's
    /// `rate_limited` stat).
    pub fn limited(&self) -> u64 {
        self.limited.load(Ordering::Relaxed)
    }

    /// Requests refused so far (Envoy's `enforced` stat).
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Takes a token for `req`, if a limit applies to it.
    pub fn check<B>(&self, req: &Request<B>) -> Verdict {
        let c = self.config.effective();
        if !sampled(c.enabled) {
            return Verdict::Pass;
        }
        let authority = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        let view = RequestView::new(req.method(), req.uri(), req.headers(), authority);
        let Some((index, bucket)) = c.bucket_for(&self.config.rate_limits, &view) else {
            return Verdict::Pass;
        };
        // The one clock read, once a limit applies.
        let now = self.start.elapsed();
        let mut allowed = match index {
            Some(i) => match self.descriptors.get(i) {
                Some(state) => take(state, bucket, now),
                None => true,
            },
            None => take(&self.default, bucket, now),
        };
        if allowed
            && index.is_some()
            && c.consume_default
            && let Some(default) = &c.bucket
        {
            allowed = take(&self.default, default, now);
        }
        if allowed {
            return Verdict::Pass;
        }
        self.limited.fetch_add(1, Ordering::Relaxed);
        if sampled(c.enforced) {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Verdict::Refused
        } else {
            Verdict::LimitedNotEnforced
        }
    }

    /// The answer to a refused request (gRPC or not, by its headers).
    pub fn refusal(&self, headers: &HeaderMap) -> (Response<()>, Option<Bytes>) {
        refusal(self.config.effective(), is_grpc(headers))
    }
}

/// Whether a request falls in `share` (no random draw for 0% and 100%).
fn sampled(share: Fraction) -> bool {
    match share.per_million() {
        0 => false,
        1_000_000 => true,
        _ => share.hit(rand::random()),
    }
}

/// One token from the bucket whose state is `state`: a compare-and-swap
/// loop over the pure [`TokenBucket::take`].
fn take(state: &AtomicU64, bucket: &TokenBucket, now: Duration) -> bool {
    let mut current = state.load(Ordering::Relaxed);
    loop {
        let (next, ok) = bucket.take(Packed::from_bits(current), now);
        if next.bits() == current {
            return ok;
        }
        match state.compare_exchange_weak(current, next.bits(), Ordering::AcqRel, Ordering::Relaxed)
        {
            Ok(_) => return ok,
            Err(actual) => current = actual,
        }
    }
}

/// Envoy's answer to a request `config` refused.
pub(crate) fn refusal(config: &LocalRateLimit, grpc: bool) -> (Response<()>, Option<Bytes>) {
    let mut response = Response::new(());
    let headers = response.headers_mut();
    headers.insert(LOCAL_REPLY_HEADER, HeaderValue::from_static(CAUSE));
    headers.insert(RATE_LIMITED_HEADER, HeaderValue::from_static("true"));
    config.response_headers.apply(headers);
    if grpc {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        insert_grpc_status(headers, config.refusal.grpc_code(), RATE_LIMITED_BODY);
        (response, None)
    } else {
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        *response.status_mut() =
            StatusCode::from_u16(Refusal::HTTP_STATUS).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
        (response, Some(Bytes::from_static(b"local_rate_limited\n")))
    }
}

/// The limiter for `config`: `previous` when it limits by the same config
/// (its buckets carry on), else a new one; `None` when `config` is `None`
/// or can never limit.
pub(crate) fn carry_over(
    previous: Option<&Arc<Limiter>>,
    config: Option<&Arc<RateLimitConfig>>,
) -> Option<Arc<Limiter>> {
    let config = config.filter(|c| !c.is_inert())?;
    match previous {
        Some(p) if Arc::ptr_eq(&p.config, config) || *p.config == **config => Some(Arc::clone(p)),
        _ => Some(Arc::new(Limiter::new(Arc::clone(config)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::model::{HeaderMatch, ValueMatch};
    use mesh_core::ratelimit::{Action, Descriptor};
    use mesh_core::traffic::HeaderOps;

    fn limit(max: u32, descriptors: Vec<Descriptor>) -> LocalRateLimit {
        LocalRateLimit {
            bucket: Some(TokenBucket::new(max, max, Duration::from_secs(60)).unwrap()),
            descriptors: descriptors.into(),
            enabled: Fraction::ALL,
            enforced: Fraction::ALL,
            refusal: Refusal::default(),
            response_headers: HeaderOps {
                set: Arc::from([]),
                add: Arc::from([(
                    http::HeaderName::from_static("x-local-rate-limit"),
                    HeaderValue::from_static("true"),
                )]),
                remove: Arc::from([]),
            },
            consume_default: true,
        }
    }

    fn config(filter: LocalRateLimit) -> Arc<RateLimitConfig> {
        Arc::new(RateLimitConfig {
            filter,
            route: None,
            rate_limits: Arc::from([]),
        })
    }

    fn get(path: &str) -> Request<()> {
        Request::get(path).body(()).unwrap()
    }

    #[test]
    fn a_full_bucket_passes_its_tokens_then_refuses() {
        let limiter = Limiter::new(config(limit(3, vec![])));
        let verdicts: Vec<Verdict> = (0..5).map(|_| limiter.check(&get("/"))).collect();
        assert_eq!(
            verdicts,
            [
                Verdict::Pass,
                Verdict::Pass,
                Verdict::Pass,
                Verdict::Refused,
                Verdict::Refused
            ]
        );
        assert_eq!((limiter.limited(), limiter.refused()), (2, 2));
        let (head, body) = limiter.refusal(&HeaderMap::new());
        assert_eq!(head.status(), 429);
        assert_eq!(head.headers()["x-local-rate-limit"], "true");
        assert_eq!(head.headers()[RATE_LIMITED_HEADER], "true");
        assert_eq!(body.as_deref(), Some(&b"local_rate_limited\n"[..]));
    }

    #[test]
    fn grpc_refusals_are_unavailable_or_resource_exhausted() {
        let mut grpc = HeaderMap::new();
        grpc.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        let mut c = limit(1, vec![]);
        let (head, body) = refusal(&c, true);
        assert_eq!(head.status(), 200);
        assert_eq!(head.headers()["grpc-status"], "14");
        assert!(body.is_none());
        c.refusal.grpc_resource_exhausted = true;
        let (head, _) = refusal(&c, true);
        assert_eq!(head.headers()["grpc-status"], "8");
        assert!(is_grpc(&grpc));
    }

    #[test]
    fn not_enforced_passes_and_is_counted() {
        let mut c = limit(1, vec![]);
        c.enforced = Fraction::default();
        let limiter = Limiter::new(config(c));
        assert_eq!(limiter.check(&get("/")), Verdict::Pass);
        assert_eq!(limiter.check(&get("/")), Verdict::LimitedNotEnforced);
        assert_eq!((limiter.limited(), limiter.refused()), (1, 0));
    }

    #[test]
    fn descriptors_take_their_bucket_and_the_default_one() {
        let cart = Descriptor {
            entries: Arc::from([("header_match".into(), "Cart".into())]),
            bucket: TokenBucket::new(2, 2, Duration::from_secs(60)).unwrap(),
        };
        let route = limit(3, vec![cart]);
        let limiter = Limiter::new(Arc::new(RateLimitConfig {
            filter: LocalRateLimit::inert(),
            route: Some(route),
            rate_limits: Arc::from([Arc::from([Action::HeaderValueMatch {
                key: "header_match".into(),
                value: "Cart".into(),
                headers: Arc::from([HeaderMatch {
                    name: ":path".into(),
                    value: ValueMatch::Prefix("/cart-api".into()),
                    invert: false,
                }]),
                expect_match: true,
            }]) as Arc<[Action]>]),
        }));
        // Two cart requests pass (their bucket holds 2); each took from the
        // default bucket too (always_consume_default_token_bucket).
        assert_eq!(limiter.check(&get("/cart-api/items")), Verdict::Pass);
        assert_eq!(limiter.check(&get("/cart-api/items")), Verdict::Pass);
        assert_eq!(limiter.check(&get("/cart-api/items")), Verdict::Refused);
        assert_eq!(limiter.check(&get("/other")), Verdict::Pass);
        assert_eq!(limiter.check(&get("/other")), Verdict::Refused);
    }

    #[test]
    fn limiters_carry_over_unchanged_configs_only() {
        let a = config(limit(1, vec![]));
        let first = carry_over(None, Some(&a)).unwrap();
        assert_eq!(first.check(&get("/")), Verdict::Pass);
        let same = carry_over(Some(&first), Some(&config(limit(1, vec![])))).unwrap();
        assert!(
            Arc::ptr_eq(&first, &same),
            "an equal config keeps its buckets"
        );
        assert_eq!(same.check(&get("/")), Verdict::Refused);
        let other = carry_over(Some(&first), Some(&config(limit(2, vec![])))).unwrap();
        assert!(!Arc::ptr_eq(&first, &other));
        assert!(carry_over(Some(&first), None).is_none());
        assert!(carry_over(None, Some(&config(LocalRateLimit::inert()))).is_none());
    }

    #[test]
    fn concurrent_takers_never_overdraw() {
        let limiter = Arc::new(Limiter::new(config(limit(1000, vec![]))));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = Arc::clone(&limiter);
                std::thread::spawn(move || {
                    (0..500)
                        .filter(|_| l.check(&get("/")) == Verdict::Pass)
                        .count()
                })
            })
            .collect();
        let passed: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(passed, 1000);
    }
}

//! Local rate limiting: Envoy's `local_ratelimit` token bucket.
//!
//! A bucket holds at most `max_tokens`; it starts full, and every
//! `fill_interval` it gains `tokens_per_fill` (never above the maximum). A
//! request takes one token or is refused: Envoy answers 429 with the
//! response flag `RL` (for gRPC, UNAVAILABLE, or RESOURCE_EXHAUSTED with
//! `rate_limited_as_resource_exhausted`). Over any window of length `t`
//! starting at the bucket's creation, at most
//! `max_tokens + tokens_per_fill × ⌊t / fill_interval⌋` requests pass.
//!
//! The state is one `u64` ([`Packed`]): the tokens left and the fill tick
//! they were counted at. Deciding is a pure function of that word and the
//! current time, so a driver keeps the bucket in one `AtomicU64` and takes
//! tokens with a compare-and-swap loop: no lock, no timer, no task. Time is
//! a [`Duration`] since the bucket's start, read by the driver.

use std::time::Duration;

use crate::error::Error;

/// A bucket's configuration (Envoy `LocalRateLimit.token_bucket`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenBucket {
    /// The most tokens the bucket holds (and starts with).
    pub max_tokens: u32,
    /// Tokens added every `fill_interval` (Envoy's default: 1).
    pub tokens_per_fill: u32,
    /// How often tokens are added.
    pub fill_interval: Duration,
}

/// The smallest fill interval Envoy accepts.
pub const MIN_FILL_INTERVAL: Duration = Duration::from_millis(50);

impl TokenBucket {
    /// A checked bucket: at least one token, a positive fill, an interval of
    /// at least 50 ms (Envoy's minimum).
    pub fn new(
        max_tokens: u32,
        tokens_per_fill: u32,
        fill_interval: Duration,
    ) -> Result<Self, Error> {
        if max_tokens == 0 {
            return Err(Error::invalid("max_tokens must be at least 1"));
        }
        if tokens_per_fill == 0 {
            return Err(Error::invalid("tokens_per_fill must be at least 1"));
        }
        if fill_interval < MIN_FILL_INTERVAL {
            return Err(Error::invalid(format!(
                "fill_interval {fill_interval:?} is below Envoy's minimum of 50ms"
            )));
        }
        Ok(TokenBucket {
            max_tokens,
            tokens_per_fill,
            fill_interval,
        })
    }

    /// The state of a new bucket: full, at tick 0.
    pub fn initial(&self) -> Packed {
        Packed::new(self.max_tokens, 0)
    }

    /// The fill tick `now` falls in (saturating at `u32::MAX`: a bucket
    /// older than ~6.8 years at 50 ms ticks stops filling, never wraps).
    pub fn tick(&self, now: Duration) -> u32 {
        let ticks = now.as_nanos() / self.fill_interval.as_nanos().max(1);
        u32::try_from(ticks).unwrap_or(u32::MAX)
    }

    /// Takes one token at `now` from a bucket in `state`: the new state, and
    /// whether the request may pass. A refused request leaves the tokens as
    /// they are (the refill is still recorded). Time that goes backwards
    /// (`now` before the state's tick) adds nothing.
    pub fn take(&self, state: Packed, now: Duration) -> (Packed, bool) {
        let tick = self.tick(now);
        let elapsed = tick.saturating_sub(state.tick());
        let refill = u64::from(elapsed) * u64::from(self.tokens_per_fill);
        let tokens = (u64::from(state.tokens()) + refill).min(u64::from(self.max_tokens)) as u32;
        let tick = tick.max(state.tick());
        match tokens.checked_sub(1) {
            Some(left) => (Packed::new(left, tick), true),
            None => (Packed::new(0, tick), false),
        }
    }
}

/// A bucket's state in one word: tokens (high 32 bits) and the fill tick
/// they were counted at (low 32 bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Packed(u64);

impl Packed {
    /// `tokens` at `tick`.
    pub fn new(tokens: u32, tick: u32) -> Self {
        Packed(u64::from(tokens) << 32 | u64::from(tick))
    }

    /// From the word a driver stores.
    pub fn from_bits(bits: u64) -> Self {
        Packed(bits)
    }

    /// The word a driver stores.
    pub fn bits(self) -> u64 {
        self.0
    }

    /// Tokens left.
    pub fn tokens(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// The fill tick the tokens were counted at.
    pub fn tick(self) -> u32 {
        self.0 as u32
    }
}

/// How a refused request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Refusal {
    /// gRPC requests get RESOURCE_EXHAUSTED instead of UNAVAILABLE
    /// (Envoy's `rate_limited_as_resource_exhausted`).
    pub grpc_resource_exhausted: bool,
}

impl Refusal {
    /// The HTTP status of a refused request: 429.
    pub const HTTP_STATUS: u16 = 429;

    /// The gRPC status code of a refused gRPC request.
    pub fn grpc_code(self) -> u32 {
        if self.grpc_resource_exhausted { 8 } else { 14 }
    }
}

/// One `local_ratelimit` filter config (Envoy's `LocalRateLimit`), as a
/// listener's filter or a route's per-filter config.
///
/// Envoy enables and enforces the filter for no request unless
/// `filter_enabled` / `filter_enforced` say otherwise ("defaults to 0% of
/// requests for safety"): Istio's task sets both to 100%. A request that is
/// enabled but not enforced is counted as limited and passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalRateLimit {
    /// The bucket of requests no descriptor matches (`None`: those pass).
    pub bucket: Option<TokenBucket>,
    /// Buckets by descriptor: a request whose route's `rate_limits` actions
    /// produce exactly these entries takes from that bucket instead.
    pub descriptors: std::sync::Arc<[Descriptor]>,
    /// The share of requests the filter looks at.
    pub enabled: crate::model::Fraction,
    /// The share of limited requests that are refused.
    pub enforced: crate::model::Fraction,
    /// How refused gRPC requests are answered.
    pub refusal: Refusal,
    /// Headers added to refused responses (`response_headers_to_add`).
    pub response_headers: crate::traffic::HeaderOps,
    /// Whether a request whose descriptor has a bucket takes from the
    /// default bucket too (Envoy's `always_consume_default_token_bucket`,
    /// default true): then it passes only when both have a token.
    pub consume_default: bool,
}

/// The local rate limit of one side of a workload, as xDS carries it: the
/// `local_ratelimit` filter on the listener (its config limits every route
/// that has none of its own) and the config of the route
/// (`typed_per_filter_config`), which replaces the filter's for that route,
/// with the route's `rate_limits` (what produces its descriptors).
///
/// A server listener has one route (every request), so one value
/// describes it; on the client side each route carries its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// The filter's config (Envoy's `http_filters[].typed_config`).
    pub filter: LocalRateLimit,
    /// The route's config, replacing the filter's for its requests.
    pub route: Option<LocalRateLimit>,
    /// The route's `rate_limits`: one list of actions per descriptor.
    pub rate_limits: std::sync::Arc<[std::sync::Arc<[Action]>]>,
}

impl RateLimitConfig {
    /// The config requests of the route are limited by: the route's, else
    /// the filter's.
    pub fn effective(&self) -> &LocalRateLimit {
        self.route.as_ref().unwrap_or(&self.filter)
    }

    /// Whether no request can ever be limited (no bucket at all, or the
    /// filter enabled for no request): then nothing needs to run.
    pub fn is_inert(&self) -> bool {
        let c = self.effective();
        (c.bucket.is_none() && c.descriptors.is_empty())
            || c.enabled == crate::model::Fraction::default()
    }
}

impl LocalRateLimit {
    /// A config that limits nothing (no bucket, enabled for no request):
    /// the filter Istio's second shape inserts, whose routes carry the
    /// limits.
    pub fn inert() -> Self {
        LocalRateLimit {
            bucket: None,
            descriptors: std::sync::Arc::from([]),
            enabled: crate::model::Fraction::default(),
            enforced: crate::model::Fraction::default(),
            refusal: Refusal::default(),
            response_headers: crate::traffic::HeaderOps::default(),
            consume_default: true,
        }
    }
}

/// A descriptor and its bucket (Envoy `LocalRateLimitDescriptor`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    /// `(key, value)` entries, in order.
    pub entries: std::sync::Arc<[(crate::model::Name, crate::model::Name)]>,
    /// Its bucket.
    pub bucket: TokenBucket,
}

/// One action of a route's `rate_limits` entry (Envoy
/// `RateLimit.Action`): what it adds to the request's descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// `header_value_match`: the entry `(key, value)` when the headers match
    /// (or, with `expect_match: false`, when they do not); otherwise the
    /// descriptor is not produced.
    HeaderValueMatch {
        /// `descriptor_key` (Envoy's default: `header_match`).
        key: crate::model::Name,
        /// `descriptor_value`.
        value: crate::model::Name,
        /// The conditions, all of which must hold.
        headers: std::sync::Arc<[crate::model::HeaderMatch]>,
        /// `expect_match` (default true).
        expect_match: bool,
    },
    /// `request_headers`: the entry `(key, the header's value)`; without the
    /// header the descriptor is not produced.
    RequestHeaders {
        /// `header_name`.
        header: crate::model::Name,
        /// `descriptor_key`.
        key: crate::model::Name,
    },
    /// `generic_key`: the entry `(key, value)` (key default `generic_key`).
    GenericKey {
        /// `descriptor_key`.
        key: crate::model::Name,
        /// `descriptor_value`.
        value: crate::model::Name,
    },
}

impl LocalRateLimit {
    /// The bucket a request takes from: that of the first configured
    /// descriptor equal to a descriptor the route's `rate_limits` produce
    /// for `req` (each entry of `rate_limits` is one list of actions, all
    /// of which must produce an entry), else the default bucket. `None`:
    /// the request is not limited. Returns the index of the descriptor
    /// (`Some(i)`) or `None` for the default bucket, with the bucket.
    pub fn bucket_for(
        &self,
        rate_limits: &[std::sync::Arc<[Action]>],
        req: &crate::route::RequestView<'_>,
    ) -> Option<(Option<usize>, &TokenBucket)> {
        if !self.descriptors.is_empty() {
            for actions in rate_limits {
                // Compared entry by entry, nothing collected: no allocation
                // per request (an action's entry is cheap to make again).
                if actions.iter().any(|a| entry_of(a, req).is_none()) {
                    continue;
                }
                if let Some((i, d)) = self.descriptors.iter().enumerate().find(|(_, d)| {
                    d.entries.len() == actions.len()
                        && d.entries.iter().zip(actions.iter()).all(|((k, v), a)| {
                            entry_of(a, req).is_some_and(|(ek, ev)| **k == *ek && **v == *ev)
                        })
                }) {
                    return Some((Some(i), &d.bucket));
                }
            }
        }
        self.bucket.as_ref().map(|b| (None, b))
    }
}

/// The descriptor entry one action produces for `req`, or `None` when it
/// produces none (then its `rate_limits` entry makes no descriptor).
fn entry_of<'a>(
    action: &'a Action,
    req: &crate::route::RequestView<'a>,
) -> Option<(&'a str, &'a str)> {
    match action {
        Action::HeaderValueMatch {
            key,
            value,
            headers,
            expect_match,
        } => {
            let all = headers.iter().all(|h| h.matches(req));
            (all == *expect_match).then_some((&**key, &**value))
        }
        Action::RequestHeaders { header, key } => {
            let value = req.headers.get(&**header)?.to_str().ok()?;
            Some((&**key, value))
        }
        Action::GenericKey { key, value } => Some((&**key, &**value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn bucket(max: u32, per_fill: u32, interval_ms: u64) -> TokenBucket {
        TokenBucket::new(max, per_fill, ms(interval_ms)).unwrap()
    }

    /// Takes at each time in `at` and returns how many passed.
    fn run(b: &TokenBucket, at: impl IntoIterator<Item = Duration>) -> (usize, Packed) {
        let mut state = b.initial();
        let mut passed = 0;
        for now in at {
            let (next, ok) = b.take(state, now);
            state = next;
            passed += usize::from(ok);
        }
        (passed, state)
    }

    #[test]
    fn starts_full_then_refuses() {
        let b = bucket(3, 1, 1000);
        let (passed, state) = run(&b, [ms(0); 10]);
        assert_eq!(passed, 3);
        assert_eq!(state.tokens(), 0);
    }

    #[test]
    fn refills_by_whole_intervals_up_to_the_maximum() {
        let b = bucket(4, 2, 100);
        let mut state = b.initial();
        for _ in 0..4 {
            state = b.take(state, ms(0)).0;
        }
        assert!(
            !b.take(state, ms(99)).1,
            "no refill before the first interval ends"
        );
        let (state, ok) = b.take(state, ms(100));
        assert!(ok);
        assert_eq!(state.tokens(), 1, "one interval adds 2, one taken");
        // Ten intervals later the bucket is full again, not 21 tokens.
        let (state, ok) = b.take(state, ms(1_100));
        assert!(ok);
        assert_eq!(state.tokens(), 3);
    }

    #[test]
    fn a_steady_load_gets_the_bound_and_no_more() {
        // 10,000 requests over 10 s at 1 per ms: max 5 + 2 per 100 ms.
        let b = bucket(5, 2, 100);
        let (passed, _) = run(&b, (0..10_000).map(ms));
        let bound = 5 + 2 * (9_999 / 100);
        assert_eq!(passed, bound);
    }

    #[test]
    fn time_going_backwards_adds_nothing() {
        let b = bucket(1, 1, 100);
        let (state, ok) = b.take(b.initial(), ms(1_000));
        assert!(ok);
        let (state, ok) = b.take(state, ms(500));
        assert!(!ok, "an earlier clock reading must not refill");
        assert_eq!(state.tick(), 10);
    }

    #[test]
    fn the_tick_saturates() {
        let b = bucket(1, 1, 50);
        assert_eq!(b.tick(Duration::from_secs(u64::MAX / 4)), u32::MAX);
        let (state, ok) = b.take(b.initial(), Duration::from_secs(u64::MAX / 4));
        assert!(ok);
        assert_eq!(state.tick(), u32::MAX);
    }

    #[test]
    fn config_is_checked() {
        assert!(TokenBucket::new(0, 1, ms(100)).is_err());
        assert!(TokenBucket::new(1, 0, ms(100)).is_err());
        assert!(TokenBucket::new(1, 1, ms(10)).is_err());
        assert_eq!(Refusal::default().grpc_code(), 14);
        assert_eq!(
            Refusal {
                grpc_resource_exhausted: true
            }
            .grpc_code(),
            8
        );
    }

    #[test]
    fn descriptors_pick_their_bucket_and_others_take_the_default() {
        use crate::model::{HeaderMatch, ValueMatch};
        use std::sync::Arc;
        let cart = bucket(10, 10, 60_000);
        let default = bucket(100, 100, 60_000);
        let limit = LocalRateLimit {
            bucket: Some(default),
            descriptors: Arc::from([Descriptor {
                entries: Arc::from([("header_match".into(), "Cart".into())]),
                bucket: cart,
            }]),
            enabled: crate::model::Fraction::ALL,
            enforced: crate::model::Fraction::ALL,
            refusal: Refusal::default(),
            response_headers: crate::traffic::HeaderOps::default(),
            consume_default: true,
        };
        let rate_limits: Vec<Arc<[Action]>> = vec![Arc::from([Action::HeaderValueMatch {
            key: "header_match".into(),
            value: "Cart".into(),
            headers: Arc::from([HeaderMatch {
                name: ":path".into(),
                value: ValueMatch::Prefix("/cart-api".into()),
                invert: false,
            }]),
            expect_match: true,
        }])];
        let headers = http::HeaderMap::new();
        let view = |path| crate::route::RequestView {
            method: "GET",
            authority: "shop",
            scheme: "http",
            path,
            query: None,
            headers: &headers,
        };
        assert_eq!(
            limit.bucket_for(&rate_limits, &view("/cart-api/items")),
            Some((Some(0), &cart))
        );
        assert_eq!(
            limit.bucket_for(&rate_limits, &view("/other")),
            Some((None, &default))
        );
        let no_default = LocalRateLimit {
            bucket: None,
            ..limit.clone()
        };
        assert_eq!(no_default.bucket_for(&rate_limits, &view("/other")), None);
        // A request_headers action without its header produces no descriptor.
        let by_header: Vec<Arc<[Action]>> = vec![Arc::from([Action::RequestHeaders {
            header: "x-user".into(),
            key: "header_match".into(),
        }])];
        assert_eq!(
            limit.bucket_for(&by_header, &view("/cart-api")),
            Some((None, &default))
        );
        let mut with_user = http::HeaderMap::new();
        with_user.insert("x-user", http::HeaderValue::from_static("Cart"));
        let req = crate::route::RequestView {
            headers: &with_user,
            ..view("/")
        };
        assert_eq!(limit.bucket_for(&by_header, &req), Some((Some(0), &cart)));
    }

    #[test]
    fn packing_round_trips() {
        let p = Packed::new(u32::MAX, 7);
        assert_eq!(Packed::from_bits(p.bits()), p);
        assert_eq!(p.tokens(), u32::MAX);
        assert_eq!(p.tick(), 7);
    }
}

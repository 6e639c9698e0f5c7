//! The local rate limit's per-request decision allocates nothing: a
//! limiter with descriptors (Istio's second shape: `header_value_match` on
//! `:path`, and a `request_headers` action) takes tokens for requests that
//! match a descriptor, that take the default bucket, and that are over the
//! limit, without one allocation. Only the refusal itself (a response) is
//! built. Allocations are counted process-wide (`stats_alloc`), so this
//! binary holds only this test.

use std::alloc::System;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use proxyless::layers::ratelimit::{Limiter, Verdict};
use proxyless::mesh_core::model::{Fraction, HeaderMatch, ValueMatch};
use proxyless::mesh_core::ratelimit::{
    Action, Descriptor, LocalRateLimit, RateLimitConfig, TokenBucket,
};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static HEAP: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn limiter() -> Limiter {
    let minute = Duration::from_secs(60);
    let descriptor = |key: &str, value: &str, max| Descriptor {
        entries: Arc::from([(key.into(), value.into())]),
        bucket: TokenBucket::new(max, max, minute).expect("bucket"),
    };
    Limiter::new(Arc::new(RateLimitConfig {
        filter: LocalRateLimit::inert(),
        route: Some(LocalRateLimit {
            bucket: Some(TokenBucket::new(1_000, 1_000, minute).expect("bucket")),
            descriptors: Arc::from([
                descriptor("header_match", "Cart", 100),
                descriptor("user", "alice", 10),
            ]),
            enabled: Fraction::ALL,
            enforced: Fraction::ALL,
            ..LocalRateLimit::inert()
        }),
        rate_limits: Arc::from([
            Arc::from([Action::HeaderValueMatch {
                key: "header_match".into(),
                value: "Cart".into(),
                headers: Arc::from([HeaderMatch {
                    name: ":path".into(),
                    value: ValueMatch::Prefix("/cart-api".into()),
                    invert: false,
                }]),
                expect_match: true,
            }]) as Arc<[Action]>,
            Arc::from([Action::RequestHeaders {
                header: "x-user".into(),
                key: "user".into(),
            }]) as Arc<[Action]>,
        ]),
    }))
}

#[test]
fn deciding_allocates_nothing() {
    let limiter = limiter();
    let cart = Request::get("http://shop/cart-api/items")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let alice = Request::get("http://shop/profile")
        .header("x-user", "alice")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let other = Request::get("http://shop/other")
        .body(Full::new(Bytes::new()))
        .expect("request");
    // Warm-up: one of each (nothing is cached, but be fair to lazy statics).
    for r in [&cart, &alice, &other] {
        limiter.check(r);
    }
    let region = Region::new(HEAP);
    let mut verdicts = [0u64; 3];
    for _ in 0..300 {
        for r in [&cart, &alice, &other] {
            match limiter.check(r) {
                Verdict::Pass => verdicts[0] += 1,
                Verdict::LimitedNotEnforced => verdicts[1] += 1,
                Verdict::Refused => verdicts[2] += 1,
            }
        }
    }
    let stats = region.change();
    assert_eq!(
        stats.allocations, 0,
        "{stats:?} over 900 decisions ({verdicts:?})"
    );
    // The descriptors' buckets ran out (cart: 100, alice: 10; each also
    // took from the default 1,000): refusals were decided too.
    assert!(verdicts[2] > 0 && verdicts[0] > 0, "{verdicts:?}");
}

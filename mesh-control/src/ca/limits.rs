//! Rate limits: certificates signed per identity, failed token attempts
//! per source address.
//!
//! A join token is a bearer secret: whoever holds a leaked one can ask for
//! certificates as fast as the CA signs (each one a key-sized signature),
//! and whoever holds none can guess. Both are bounded with token buckets
//! (the shape Envoy's local rate limit filter uses): a bucket holds up to
//! `burst` tokens, refills at `per_second`, and a request that finds it
//! empty is refused with 429 and a `Retry-After` saying when the next
//! token arrives. Guessing is throttled per source IP on *failures* only,
//! and an empty bucket refuses every token from that address, the right
//! one included, before it is looked up: otherwise a guesser would keep
//! learning which guesses are wrong.
//!
//! Buckets are kept per key in memory; a bucket that has refilled to its
//! burst is the same as none, so such buckets are dropped when the map
//! grows past [`MAX_KEYS`], which bounds the memory an address scan can
//! take.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How many keys a limiter tracks before it drops the full buckets.
pub(crate) const MAX_KEYS: usize = 10_000;

/// A token bucket's shape: at most `burst` at once, then `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// How many requests may come at once (at least 1).
    pub burst: u32,
    /// How many more each second after that (above 0).
    pub per_second: f64,
}

impl RateLimit {
    /// Certificates per identity: a deployment of 100 replicas sharing a
    /// service account may start at once; after that, 10 a second.
    pub const SIGNING: RateLimit = RateLimit {
        burst: 100,
        per_second: 10.0,
    };

    /// Failed token attempts per source address: 20 typos, then one a
    /// second.
    pub const FAILED_TOKENS: RateLimit = RateLimit {
        burst: 20,
        per_second: 1.0,
    };

    fn sane(self) -> RateLimit {
        RateLimit {
            burst: self.burst.max(1),
            per_second: if self.per_second.is_finite() && self.per_second > 0.0 {
                self.per_second
            } else {
                1e-9
            },
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets by key (see the module docs).
#[derive(Debug)]
pub(crate) struct Limiter<K> {
    limit: RateLimit,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    pub(crate) fn new(limit: RateLimit) -> Self {
        Limiter {
            limit: limit.sane(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, bucket: Option<&Bucket>, now: Instant) -> f64 {
        let burst = f64::from(self.limit.burst);
        match bucket {
            None => burst,
            Some(b) => {
                let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
                (b.tokens + elapsed * self.limit.per_second).min(burst)
            }
        }
    }

    fn wait_for_one(&self, tokens: f64) -> Duration {
        let missing = (1.0 - tokens).max(0.0);
        Duration::from_secs_f64((missing / self.limit.per_second).min(86_400.0))
    }

    /// Whether `key` has a token left, without taking it: `Err` is how
    /// long until it has one.
    pub(crate) fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = self.refilled(buckets.get(key), now);
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(self.wait_for_one(tokens))
        }
    }

    /// Takes a token of `key`: `Err` (nothing taken) is how long until one
    /// is there.
    pub(crate) fn take(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let tokens = self.refilled(buckets.get(key), now);
        if tokens < 1.0 {
            return Err(self.wait_for_one(tokens));
        }
        if buckets.len() >= MAX_KEYS && !buckets.contains_key(key) {
            let burst = f64::from(self.limit.burst);
            buckets.retain(|_, b| {
                let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
                b.tokens + elapsed * self.limit.per_second < burst
            });
        }
        buckets.insert(
            key.clone(),
            Bucket {
                tokens: tokens - 1.0,
                at: now,
            },
        );
        Ok(())
    }
}

/// `Retry-After` for a wait: whole seconds, rounded up, at least 1.
pub(crate) fn retry_after_seconds(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let limiter = Limiter::new(RateLimit {
            burst: 3,
            per_second: 2.0,
        });
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.take(&"a", t0), Ok(()));
        }
        let wait = limiter.take(&"a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(500));
        assert_eq!(retry_after_seconds(wait), 1);
        assert!(limiter.check(&"a", t0).is_err());
        // Another key has its own bucket.
        assert_eq!(limiter.take(&"b", t0), Ok(()));
        // Half a second later one more.
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!(limiter.check(&"a", t1), Ok(()));
        assert_eq!(limiter.take(&"a", t1), Ok(()));
        assert!(limiter.take(&"a", t1).is_err());
    }

    #[test]
    fn full_buckets_are_dropped_when_there_are_too_many() {
        let limiter = Limiter::new(RateLimit {
            burst: 1,
            per_second: 1.0,
        });
        let t0 = Instant::now();
        for i in 0..MAX_KEYS {
            limiter.take(&i, t0).unwrap();
        }
        // A second later every bucket is full again: one new key drops them.
        limiter
            .take(&MAX_KEYS, t0 + Duration::from_secs(2))
            .unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().len(), 1);
    }
}

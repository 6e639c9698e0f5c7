//! Client-side local rate limits: one [`Limiter`] per limited route, for
//! the routes an EnvoyFilter's `SIDECAR_OUTBOUND` patches limit (served in
//! the route's `typed_per_filter_config`, decoded into
//! [`RoutePolicy::rate_limit`](mesh_core::model::RoutePolicy::rate_limit)).
//!
//! A route's config is an `Arc` the snapshot holds; the limiter of a
//! config is found by that pointer in a small table read lock-free
//! ([`ArcSwap`]): a request on a limited route costs one atomic load, a
//! scan of the table (one entry per distinct limited route of the
//! snapshots in use) and the bucket's compare-and-swap, no allocation.
//! A config seen for the first time (a new snapshot) takes the cold path:
//! under a writer lock, it gets the limiter of an *equal* config already
//! in the table (so its buckets carry over a config push that does not
//! change it, [`carry_over`](super::carry_over)'s rule) or a new one, and
//! entries whose config no snapshot holds any more are dropped.

use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;
use mesh_core::ratelimit::RateLimitConfig;

use super::Limiter;

/// The limiters of the limited routes (see the [module docs](self)).
#[derive(Debug, Default)]
pub(crate) struct RouteLimiters {
    table: ArcSwap<Vec<Entry>>,
    /// Serializes the cold path (table rebuilds).
    writer: Mutex<()>,
}

#[derive(Debug, Clone)]
struct Entry {
    /// The route's config, as the snapshot holds it (compared by pointer).
    config: Arc<RateLimitConfig>,
    limiter: Arc<Limiter>,
}

impl RouteLimiters {
    /// The limiter of the route whose config is `config`.
    pub(crate) fn get(&self, config: &Arc<RateLimitConfig>) -> Arc<Limiter> {
        if let Some(e) = self
            .table
            .load()
            .iter()
            .find(|e| Arc::ptr_eq(&e.config, config))
        {
            return Arc::clone(&e.limiter);
        }
        self.insert(config)
    }

    /// How many limiters the table holds (tests: stale ones go).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.load().len()
    }

    #[cold]
    fn insert(&self, config: &Arc<RateLimitConfig>) -> Arc<Limiter> {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let table = self.table.load_full();
        if let Some(e) = table.iter().find(|e| Arc::ptr_eq(&e.config, config)) {
            return Arc::clone(&e.limiter);
        }
        let limiter = match table.iter().find(|e| *e.config == **config) {
            Some(equal) => Arc::clone(&equal.limiter),
            None => Arc::new(Limiter::new(Arc::clone(config))),
        };
        // Entries whose config only this table (and its own limiter) holds:
        // no snapshot routes with it any more (an equal one was just
        // matched first).
        let mut next: Vec<Entry> = table
            .iter()
            .filter(|e| {
                let own = 1 + usize::from(Arc::ptr_eq(e.limiter.config(), &e.config));
                Arc::strong_count(&e.config) > own
            })
            .cloned()
            .collect();
        next.push(Entry {
            config: Arc::clone(config),
            limiter: Arc::clone(&limiter),
        });
        self.table.store(Arc::new(next));
        limiter
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Request;
    use mesh_core::model::Fraction;
    use mesh_core::ratelimit::{LocalRateLimit, TokenBucket};

    use super::super::Verdict;
    use super::*;

    fn config(max: u32) -> Arc<RateLimitConfig> {
        Arc::new(RateLimitConfig {
            filter: LocalRateLimit::inert(),
            route: Some(LocalRateLimit {
                bucket: Some(TokenBucket::new(max, 1, Duration::from_secs(3600)).unwrap()),
                enabled: Fraction::ALL,
                enforced: Fraction::ALL,
                ..LocalRateLimit::inert()
            }),
            rate_limits: Arc::from([]),
        })
    }

    fn check(limiters: &RouteLimiters, c: &Arc<RateLimitConfig>) -> Verdict {
        limiters.get(c).check(&Request::get("/").body(()).unwrap())
    }

    #[test]
    fn a_route_keeps_its_buckets_across_equal_configs_and_routes_do_not_share() {
        let limiters = RouteLimiters::default();
        let a = config(1);
        let b = config(2);
        assert_eq!(check(&limiters, &a), Verdict::Pass);
        assert_eq!(check(&limiters, &a), Verdict::Refused);
        assert_eq!(
            check(&limiters, &b),
            Verdict::Pass,
            "another route: its own bucket"
        );
        // A new snapshot decodes an equal config into a new Arc: same buckets.
        let a2 = config(1);
        assert_eq!(check(&limiters, &a2), Verdict::Refused);
        assert!(Arc::ptr_eq(&limiters.get(&a), &limiters.get(&a2)));
        // A changed config starts full.
        let a3 = config(3);
        assert_eq!(check(&limiters, &a3), Verdict::Pass);
        // Configs no snapshot holds any more leave the table.
        drop((a, a2, b));
        let fresh = config(5);
        limiters.get(&fresh);
        assert_eq!(limiters.len(), 2, "a3 and fresh");
    }
}

//! Outlier detection: passive health checking of one cluster's endpoints
//! by consecutive errors, as Envoy does it for Istio's `outlierDetection`
//! (Envoy arch overview "Outlier detection"; `DetectorImpl` in
//! `source/common/upstream/outlier_detection_impl.cc`; gRFC A50 for gRPC
//! clients, which implement success-rate and failure-percentage ejection
//! only, so consecutive errors are this client's job).
//!
//! What Envoy does, and this module with it:
//!
//! - Every attempt's result is reported per endpoint. With Istio's
//!   settings (`split_external_local_origin_errors: false`) a connect
//!   failure or reset counts as a 503 and a timeout as a 504; a gRPC
//!   response counts as the HTTP status its `grpc-status` maps to
//!   (UNAVAILABLE → 503), see [`ResultClass::of`]. A 5xx increments the
//!   endpoint's consecutive-5xx counter; a 502/503/504 also increments its
//!   consecutive-gateway-error counter (another 5xx resets that one); any
//!   other status resets both.
//! - When a counter reaches its threshold, the endpoint is ejected, unless
//!   it already is (the counter then keeps counting) or ejecting it would
//!   make more than `max_ejection_percent` of the endpoints ejected:
//!   `100 × (ejected + 1) / endpoints ≤ max_ejection_percent`. Envoy only
//!   ejects one host past that limit with `always_eject_one_host`, which
//!   defaults to off and Istio does not set, so neither does this module
//!   (older Envoy docs said "will eject at least one host regardless";
//!   gRFC A50 also allows one past the limit — not Envoy's rule today).
//!   Either way the counter that fired is reset.
//! - An ejected endpoint stays out for `min(base_ejection_time × n,
//!   max_ejection_time)`, where `n` is a multiplier that grows by one per
//!   ejection and shrinks by one per `interval` the endpoint stays healthy
//!   (Envoy's `ejectTimeBackoff`); `max_ejection_time` is Envoy's default,
//!   `max(300 s, base_ejection_time)`. Envoy returns it at the first
//!   `interval` sweep after that time, so it comes back within `[base × n,
//!   base × n + interval]`. There is no timer here: sweeps happen at
//!   `created + k × interval`, and each endpoint's return time is computed
//!   as the first such instant after its ejection time ends, then read
//!   with a plain comparison. On return its counters are reset.
//! - Istio's `minHealthPercent` is Envoy's `healthy_panic_threshold`: when
//!   fewer than that share of endpoints are healthy, the balancer ignores
//!   ejections and uses every endpoint ([`OutlierDetector::in_panic`];
//!   0 = never, Istio's default).
//!
//! Reads on the request path ([`OutlierDetector::is_ejected`],
//! [`OutlierDetector::eligible`]) are atomic loads; a small mutex is taken
//! only when an ejection is decided or an ejection ends.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::model::OutlierDetection;
use crate::retry::{Outcome, grpc_to_http_status};

/// Envoy's default `max_ejection_time` (when it is below the base
/// ejection time, the base is used instead).
pub const DEFAULT_MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// What an attempt's result means to outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResultClass {
    /// Not a 5xx: resets the endpoint's counters.
    Success,
    /// A 5xx other than 502/503/504.
    Error5xx,
    /// 502, 503, 504, or a connect failure, reset or timeout (which Envoy
    /// counts as 503/504), or a gRPC status that maps to one (UNAVAILABLE,
    /// DEADLINE_EXCEEDED). Counts as a 5xx too.
    GatewayError,
}

impl ResultClass {
    /// The class of an attempt's outcome, Envoy's way: a gRPC status
    /// (when present) is mapped to HTTP with [`grpc_to_http_status`];
    /// connect failures, resets and refused streams are 503; a timeout
    /// (per-try, or the route's while an attempt was in flight) is 504.
    pub fn of(outcome: &Outcome) -> ResultClass {
        match *outcome {
            Outcome::Status { http, grpc } => {
                let code = match grpc {
                    Some(g) => grpc_to_http_status(g),
                    None => http,
                };
                Self::of_http(code)
            }
            Outcome::ConnectFailure
            | Outcome::Reset
            | Outcome::RefusedStream
            | Outcome::PerTryTimeout => ResultClass::GatewayError,
        }
    }

    /// The class of an HTTP status.
    pub fn of_http(status: u16) -> ResultClass {
        match status {
            502..=504 => ResultClass::GatewayError,
            500..=599 => ResultClass::Error5xx,
            _ => ResultClass::Success,
        }
    }
}

/// Which counter ejected an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EjectionReason {
    /// `consecutive_5xx` (Istio `consecutive5xxErrors`).
    Consecutive5xx,
    /// `consecutive_gateway_errors` (Istio `consecutiveGatewayErrors`).
    ConsecutiveGatewayErrors,
}

/// An ejection decided by [`OutlierDetector::on_result`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ejection {
    /// The endpoint index.
    pub endpoint: usize,
    /// Which counter reached its threshold.
    pub reason: EjectionReason,
    /// The ejection-time multiplier `n` (1 for a first ejection).
    pub multiplier: u32,
    /// How long it stays out at least: `min(base × n, max_ejection_time)`;
    /// it returns at the first sweep after that.
    pub duration: Duration,
}

/// Counters of one detector.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutlierStats {
    /// Endpoints ejected now.
    pub ejected: u32,
    /// Ejections so far (Envoy `ejections_enforced_total`).
    pub ejections_total: u64,
    /// Ejections refused by `max_ejection_percent` (Envoy
    /// `ejections_overflow`).
    pub ejections_overflow: u64,
}

/// The outlier-detection state of one cluster's endpoints, indexed as in
/// the [`crate::lb::EndpointSet`] it was built for (pass
/// `set.addresses()`).
#[derive(Debug)]
pub struct OutlierDetector {
    config: OutlierDetection,
    /// Sweeps happen at `epoch + k × interval`.
    epoch: Instant,
    interval: u64,
    max_ejection_time: Duration,
    addresses: Box<[SocketAddr]>,
    hosts: Box<[Host]>,
    /// Endpoints ejected now (maintained under `state`).
    ejected: AtomicU32,
    /// The earliest return time of an ejected endpoint (nanos since
    /// `epoch`), `u64::MAX` when none is ejected: the lock-free test of
    /// whether a sweep is due.
    next_return: AtomicU64,
    ejections_total: AtomicU64,
    ejections_overflow: AtomicU64,
    state: Mutex<Vec<Backoff>>,
}

#[derive(Debug, Default)]
struct Host {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Return time in nanos since `epoch`; 0 = not ejected.
    until: AtomicU64,
}

/// Per-endpoint state changed only under the lock.
#[derive(Debug, Clone, Copy, Default)]
struct Backoff {
    multiplier: u32,
    /// When the last ejection ended (nanos since epoch; a sweep instant).
    returned_at: Option<u64>,
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl OutlierDetector {
    /// A detector for endpoints `addresses` (indexed as given), with no
    /// endpoint ejected; sweeps are aligned on `now`.
    pub fn new(config: &OutlierDetection, addresses: &[SocketAddr], now: Instant) -> Self {
        Self::build(config, addresses, now)
    }

    fn build(config: &OutlierDetection, addresses: &[SocketAddr], epoch: Instant) -> Self {
        OutlierDetector {
            config: config.clone(),
            epoch,
            interval: nanos(config.interval).max(1_000_000),
            max_ejection_time: DEFAULT_MAX_EJECTION_TIME.max(config.base_ejection_time),
            addresses: addresses.into(),
            hosts: addresses.iter().map(|_| Host::default()).collect(),
            ejected: AtomicU32::new(0),
            next_return: AtomicU64::new(u64::MAX),
            ejections_total: AtomicU64::new(0),
            ejections_overflow: AtomicU64::new(0),
            state: Mutex::new(vec![Backoff::default(); addresses.len()]),
        }
    }

    /// A detector for a new endpoint list or config (an EDS or CDS
    /// update) that keeps, for every address present in both, its
    /// counters, its ejection and its multiplier, as Envoy keeps a host's
    /// monitor across updates. Sweeps stay aligned with this detector's.
    pub fn rebuild(
        &self,
        config: &OutlierDetection,
        addresses: &[SocketAddr],
        now: Instant,
    ) -> OutlierDetector {
        self.sweep_if_due(now);
        let fresh = Self::build(config, addresses, self.epoch);
        let old_state = self.lock();
        let mut new_state = fresh.lock();
        let mut ejected = 0u32;
        let mut next_return = u64::MAX;
        let old_index: std::collections::HashMap<SocketAddr, usize> = self
            .addresses
            .iter()
            .enumerate()
            .map(|(j, a)| (*a, j))
            .collect();
        for (i, addr) in addresses.iter().enumerate() {
            let Some(&j) = old_index.get(addr) else {
                continue;
            };
            let (Some(old), Some(new)) = (self.hosts.get(j), fresh.hosts.get(i)) else {
                continue;
            };
            new.consecutive_5xx.store(
                old.consecutive_5xx.load(Ordering::Acquire),
                Ordering::Release,
            );
            new.consecutive_gateway.store(
                old.consecutive_gateway.load(Ordering::Acquire),
                Ordering::Release,
            );
            let until = old.until.load(Ordering::Acquire);
            if until != 0 {
                new.until.store(until, Ordering::Release);
                ejected += 1;
                next_return = next_return.min(until);
            }
            if let (Some(b), Some(slot)) = (old_state.get(j), new_state.get_mut(i)) {
                *slot = *b;
            }
        }
        drop(new_state);
        fresh.ejected.store(ejected, Ordering::Release);
        fresh.next_return.store(next_return, Ordering::Release);
        fresh.ejections_total.store(
            self.ejections_total.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        fresh.ejections_overflow.store(
            self.ejections_overflow.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
        fresh
    }

    /// The config in force.
    pub fn config(&self) -> &OutlierDetection {
        &self.config
    }

    /// Number of endpoints tracked.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    /// Whether no endpoint is tracked.
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Backoff>> {
        // The state stays consistent across a panic in another holder (every
        // update is a single assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn since_epoch(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.epoch))
    }

    /// Reports the result of one attempt to endpoint `endpoint` (an index
    /// out of range is ignored). Returns the ejection it caused, if any.
    pub fn on_result(
        &self,
        endpoint: usize,
        result: ResultClass,
        now: Instant,
    ) -> Option<Ejection> {
        self.sweep_if_due(now);
        let host = self.hosts.get(endpoint)?;
        let bump = |counter: &AtomicU32, threshold: Option<u32>| -> bool {
            let n = counter.fetch_add(1, Ordering::AcqRel).saturating_add(1);
            threshold.is_some_and(|t| n == t.max(1))
        };
        match result {
            ResultClass::Success => {
                host.consecutive_5xx.store(0, Ordering::Release);
                host.consecutive_gateway.store(0, Ordering::Release);
                None
            }
            ResultClass::Error5xx => {
                host.consecutive_gateway.store(0, Ordering::Release);
                if bump(&host.consecutive_5xx, self.config.consecutive_5xx) {
                    self.try_eject(endpoint, EjectionReason::Consecutive5xx, now)
                } else {
                    None
                }
            }
            ResultClass::GatewayError => {
                let gateway = bump(
                    &host.consecutive_gateway,
                    self.config.consecutive_gateway_errors,
                );
                let five_xx = bump(&host.consecutive_5xx, self.config.consecutive_5xx);
                // Envoy posts both events; the second finds the host ejected.
                let mut ejection = None;
                if gateway {
                    ejection =
                        self.try_eject(endpoint, EjectionReason::ConsecutiveGatewayErrors, now);
                }
                if five_xx {
                    let e = self.try_eject(endpoint, EjectionReason::Consecutive5xx, now);
                    ejection = ejection.or(e);
                }
                ejection
            }
        }
    }

    fn try_eject(&self, endpoint: usize, reason: EjectionReason, now: Instant) -> Option<Ejection> {
        let host = self.hosts.get(endpoint)?;
        let t = self.since_epoch(now);
        let mut state = self.lock();
        self.sweep_locked(&mut state, t);
        // Already ejected: Envoy ignores the event and leaves the counter.
        if host.until.load(Ordering::Acquire) > t {
            return None;
        }
        let counter = match reason {
            EjectionReason::Consecutive5xx => &host.consecutive_5xx,
            EjectionReason::ConsecutiveGatewayErrors => &host.consecutive_gateway,
        };
        counter.store(0, Ordering::Release);
        let n = self.hosts.len() as u64;
        let ejected = u64::from(self.ejected.load(Ordering::Acquire));
        let max_percent = u64::from(self.config.max_ejection_percent.min(100));
        if (ejected + 1) * 100 > max_percent * n {
            self.ejections_overflow.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let backoff = state.get_mut(endpoint)?;
        // The multiplier shrank by one per sweep since the endpoint returned
        // (Envoy decrements it at each sweep at least `interval` after the
        // return; returns happen on sweeps, so that is one per interval).
        if let Some(back) = backoff.returned_at {
            let healthy_sweeps = t.saturating_sub(back) / self.interval;
            let shrink = u32::try_from(healthy_sweeps).unwrap_or(u32::MAX);
            backoff.multiplier = backoff.multiplier.saturating_sub(shrink);
            backoff.returned_at = None;
        }
        let base = self.config.base_ejection_time;
        if base
            .checked_mul(backoff.multiplier)
            .is_some_and(|d| d < self.max_ejection_time + base)
        {
            backoff.multiplier += 1;
        }
        let duration = base
            .checked_mul(backoff.multiplier)
            .map_or(self.max_ejection_time, |d| d.min(self.max_ejection_time));
        // Back at the first sweep at or after the end of the ejection time.
        let end = t.saturating_add(nanos(duration));
        let until = end
            .div_ceil(self.interval)
            .saturating_mul(self.interval)
            .max(1);
        host.until.store(until, Ordering::Release);
        self.ejected.fetch_add(1, Ordering::AcqRel);
        self.next_return.fetch_min(until, Ordering::AcqRel);
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        let multiplier = backoff.multiplier;
        drop(state);
        Some(Ejection {
            endpoint,
            reason,
            multiplier,
            duration,
        })
    }

    /// Returns the endpoints whose ejection has ended, if one is due.
    fn sweep_if_due(&self, now: Instant) {
        let t = self.since_epoch(now);
        if t < self.next_return.load(Ordering::Acquire) {
            return;
        }
        let mut state = self.lock();
        self.sweep_locked(&mut state, t);
    }

    fn sweep_locked(&self, state: &mut [Backoff], t: u64) {
        if t < self.next_return.load(Ordering::Acquire) {
            return;
        }
        let mut next = u64::MAX;
        let mut ejected = 0u32;
        for (host, backoff) in self.hosts.iter().zip(state.iter_mut()) {
            let until = host.until.load(Ordering::Acquire);
            if until == 0 {
                continue;
            }
            if until <= t {
                // Envoy resets the counters on return, so that a few new
                // errors do not eject it again at once.
                host.until.store(0, Ordering::Release);
                host.consecutive_5xx.store(0, Ordering::Release);
                host.consecutive_gateway.store(0, Ordering::Release);
                backoff.returned_at = Some(until);
            } else {
                ejected += 1;
                next = next.min(until);
            }
        }
        self.ejected.store(ejected, Ordering::Release);
        self.next_return.store(next, Ordering::Release);
    }

    /// Whether endpoint `endpoint` is ejected at `now` (ignoring panic
    /// mode; an index out of range is not ejected). A lock-free read.
    pub fn is_ejected(&self, endpoint: usize, now: Instant) -> bool {
        let t = self.since_epoch(now);
        self.hosts
            .get(endpoint)
            .is_some_and(|h| h.until.load(Ordering::Acquire) > t)
    }

    /// When endpoint `endpoint` returns, if it is ejected at `now`.
    pub fn returns_at(&self, endpoint: usize, now: Instant) -> Option<Instant> {
        let t = self.since_epoch(now);
        let until = self.hosts.get(endpoint)?.until.load(Ordering::Acquire);
        (until > t).then(|| self.epoch + Duration::from_nanos(until))
    }

    /// Endpoints ejected at `now`.
    pub fn ejected_count(&self, now: Instant) -> u32 {
        self.sweep_if_due(now);
        self.ejected.load(Ordering::Acquire)
    }

    /// Whether the healthy share of endpoints is below `min_health_percent`
    /// at `now` (Envoy's panic mode): balancing then ignores ejections.
    pub fn in_panic(&self, now: Instant) -> bool {
        let n = self.hosts.len() as u64;
        let healthy = n.saturating_sub(u64::from(self.ejected_count(now)));
        n > 0 && healthy * 100 < u64::from(self.config.min_health_percent) * n
    }

    /// The eligibility filter for picks at `now`: an endpoint may be
    /// picked unless it is ejected — and every endpoint may be picked in
    /// panic mode. Computed once per pick; each call of the returned
    /// closure is one atomic load.
    pub fn eligible(&self, now: Instant) -> impl Fn(usize) -> bool + '_ {
        let panic = self.in_panic(now);
        let t = self.since_epoch(now);
        move |i| {
            panic
                || self
                    .hosts
                    .get(i)
                    .is_none_or(|h| h.until.load(Ordering::Acquire) <= t)
        }
    }

    /// The counters at `now`.
    pub fn stats(&self, now: Instant) -> OutlierStats {
        OutlierStats {
            ejected: self.ejected_count(now),
            ejections_total: self.ejections_total.load(Ordering::Relaxed),
            ejections_overflow: self.ejections_overflow.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::retry::grpc_status;

    fn config(max_ejection_percent: u32) -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx: Some(3),
            consecutive_gateway_errors: Some(2),
            interval: Duration::from_millis(100),
            base_ejection_time: Duration::from_millis(200),
            max_ejection_percent,
            min_health_percent: 0,
        }
    }

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([10, 0, 0, 1], 8000 + i)))
            .collect()
    }

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn results_are_classified_as_envoy_does() {
        use ResultClass::*;
        assert_eq!(ResultClass::of(&Outcome::http(200)), Success);
        assert_eq!(ResultClass::of(&Outcome::http(404)), Success);
        assert_eq!(ResultClass::of(&Outcome::http(500)), Error5xx);
        assert_eq!(ResultClass::of(&Outcome::http(503)), GatewayError);
        assert_eq!(
            ResultClass::of(&Outcome::grpc(grpc_status::UNAVAILABLE)),
            GatewayError
        );
        assert_eq!(
            ResultClass::of(&Outcome::grpc(grpc_status::INTERNAL)),
            Error5xx
        );
        assert_eq!(
            ResultClass::of(&Outcome::grpc(grpc_status::NOT_FOUND)),
            Success
        );
        for o in [
            Outcome::ConnectFailure,
            Outcome::Reset,
            Outcome::RefusedStream,
            Outcome::PerTryTimeout,
        ] {
            assert_eq!(ResultClass::of(&o), GatewayError, "{o:?}");
        }
    }

    #[test]
    fn consecutive_5xx_eject_and_a_success_resets_the_count() {
        let t0 = Instant::now();
        let od = OutlierDetector::new(&config(100), &addrs(4), t0);
        assert_eq!(od.on_result(1, ResultClass::Error5xx, t0), None);
        assert_eq!(od.on_result(1, ResultClass::Error5xx, t0), None);
        assert_eq!(od.on_result(1, ResultClass::Success, t0), None);
        assert_eq!(od.on_result(1, ResultClass::Error5xx, t0), None);
        assert_eq!(od.on_result(1, ResultClass::Error5xx, t0), None);
        assert!(!od.is_ejected(1, t0));
        let e = od
            .on_result(1, ResultClass::Error5xx, t0)
            .expect("third 5xx in a row");
        assert_eq!(e.reason, EjectionReason::Consecutive5xx);
        assert_eq!((e.multiplier, e.duration), (1, Duration::from_millis(200)));
        assert!(od.is_ejected(1, t0));
        assert!(!od.eligible(t0)(1));
        assert!(od.eligible(t0)(0));
        assert_eq!(od.stats(t0).ejected, 1);
    }

    #[test]
    fn gateway_errors_have_their_own_counter() {
        let t0 = Instant::now();
        let od = OutlierDetector::new(&config(100), &addrs(4), t0);
        // A 500 between two 503s resets the gateway count but not the 5xx one.
        od.on_result(0, ResultClass::GatewayError, t0);
        od.on_result(0, ResultClass::Error5xx, t0);
        assert!(!od.is_ejected(0, t0));
        let e = od.on_result(0, ResultClass::GatewayError, t0).unwrap();
        assert_eq!(
            e.reason,
            EjectionReason::Consecutive5xx,
            "three 5xx in a row"
        );
        let e = (0..2)
            .find_map(|_| od.on_result(2, ResultClass::GatewayError, t0))
            .unwrap();
        assert_eq!(e.reason, EjectionReason::ConsecutiveGatewayErrors);
    }

    #[test]
    fn an_ejected_endpoint_returns_within_base_times_n_plus_interval() {
        let t0 = Instant::now();
        let od = OutlierDetector::new(&config(100), &addrs(4), t0);
        // Ejected at 30 ms: back at the first sweep (every 100 ms) at or
        // after 230 ms, i.e. at 300 ms.
        let at = t0 + 30 * MS;
        (0..2).for_each(|_| {
            od.on_result(3, ResultClass::GatewayError, at);
        });
        assert!(od.is_ejected(3, at + 199 * MS));
        assert!(od.is_ejected(3, t0 + 299 * MS));
        assert_eq!(od.returns_at(3, at), Some(t0 + 300 * MS));
        assert!(!od.is_ejected(3, t0 + 300 * MS));
        assert_eq!(od.ejected_count(t0 + 300 * MS), 0);
        // Its counters were reset on return: one error does not eject it.
        assert_eq!(
            od.on_result(3, ResultClass::GatewayError, t0 + 301 * MS),
            None
        );
    }

    #[test]
    fn the_ejection_time_grows_with_each_ejection_and_shrinks_when_healthy() {
        let t0 = Instant::now();
        let od = OutlierDetector::new(&config(100), &addrs(2), t0);
        let eject = |at: Instant| {
            (0..2)
                .find_map(|_| od.on_result(0, ResultClass::GatewayError, at))
                .expect("ejected")
        };
        let e1 = eject(t0);
        assert_eq!(e1.duration, 200 * MS);
        // Back at 200 ms; failing again at once: ejected for 2 × base.
        let e2 = eject(t0 + 200 * MS);
        assert_eq!((e2.multiplier, e2.duration), (2, 400 * MS));
        assert!(od.is_ejected(0, t0 + 599 * MS));
        assert!(!od.is_ejected(0, t0 + 600 * MS));
        // Back at 600 ms; healthy for 2 intervals (multiplier 2 → 0),
        // then a new ejection is a first one again.
        let e3 = eject(t0 + 800 * MS);
        assert_eq!((e3.multiplier, e3.duration), (1, 200 * MS));
    }

    #[test]
    fn the_ejection_time_is_capped_by_max_ejection_time() {
        let t0 = Instant::now();
        let mut c = config(100);
        c.base_ejection_time = Duration::from_secs(100);
        c.interval = Duration::from_secs(1);
        let od = OutlierDetector::new(&c, &addrs(2), t0);
        let mut at = t0;
        let mut durations = Vec::new();
        for _ in 0..5 {
            let e = (0..2)
                .find_map(|_| od.on_result(0, ResultClass::GatewayError, at))
                .unwrap();
            durations.push(e.duration.as_secs());
            at = od.returns_at(0, at).unwrap();
        }
        assert_eq!(durations, [100, 200, 300, 300, 300]);
    }

    #[test]
    fn max_ejection_percent_is_respected() {
        let t0 = Instant::now();
        let od = OutlierDetector::new(&config(30), &addrs(10), t0);
        for i in 0..10 {
            for _ in 0..2 {
                od.on_result(i, ResultClass::GatewayError, t0);
            }
        }
        let stats = od.stats(t0);
        assert_eq!(stats.ejected, 3);
        assert_eq!(stats.ejections_total, 3);
        assert_eq!(stats.ejections_overflow, 7);
        assert_eq!((0..10).filter(|&i| od.is_ejected(i, t0)).count(), 3);
    }

    #[test]
    fn below_max_ejection_percent_of_one_host_nothing_is_ejected() {
        // Envoy (without always_eject_one_host): 1 of 3 is 33% > 10%.
        let t0 = Instant::now();
        let od = OutlierDetector::new(&config(10), &addrs(3), t0);
        for _ in 0..10 {
            assert_eq!(od.on_result(0, ResultClass::GatewayError, t0), None);
        }
        assert!(!od.is_ejected(0, t0));
        // Refused 5 times by the gateway counter (every 2nd error) and 3
        // times by the 5xx counter (every 3rd).
        assert_eq!(od.stats(t0).ejections_overflow, 8);
    }

    #[test]
    fn panic_mode_lets_every_endpoint_through() {
        let t0 = Instant::now();
        let mut c = config(100);
        c.min_health_percent = 50;
        let od = OutlierDetector::new(&c, &addrs(4), t0);
        for i in 0..2 {
            (0..2).for_each(|_| {
                od.on_result(i, ResultClass::GatewayError, t0);
            });
        }
        // 2 of 4 healthy = 50%: not below the threshold.
        assert!(!od.in_panic(t0));
        assert!(!od.eligible(t0)(0));
        (0..2).for_each(|_| {
            od.on_result(2, ResultClass::GatewayError, t0);
        });
        assert!(od.in_panic(t0));
        let eligible = od.eligible(t0);
        assert!((0..4).all(eligible));
        assert!(od.is_ejected(0, t0), "still ejected, only ignored");
    }

    #[test]
    fn rebuild_keeps_the_state_of_addresses_that_stay() {
        let t0 = Instant::now();
        let old = addrs(3);
        let od = OutlierDetector::new(&config(100), &old, t0);
        (0..2).for_each(|_| {
            od.on_result(1, ResultClass::GatewayError, t0);
        });
        od.on_result(2, ResultClass::Error5xx, t0);
        od.on_result(2, ResultClass::Error5xx, t0);
        // New list: endpoint 0 gone, order changed, one new.
        let new = vec![old[2], SocketAddr::from(([10, 0, 0, 9], 1)), old[1]];
        let next = od.rebuild(&config(100), &new, t0 + MS);
        assert!(next.is_ejected(2, t0 + MS));
        assert_eq!(next.returns_at(2, t0 + MS), od.returns_at(1, t0 + MS));
        assert_eq!(next.ejected_count(t0 + MS), 1);
        assert!(
            next.on_result(0, ResultClass::Error5xx, t0 + MS).is_some(),
            "count carried"
        );
        assert!(!next.is_ejected(1, t0 + MS));
        assert!(!od.is_ejected(5, t0), "out of range is not ejected");
        assert_eq!(od.on_result(5, ResultClass::Error5xx, t0), None);
    }

    #[derive(Debug, Clone)]
    enum Event {
        Result(usize, u8),
        Wait(u64),
    }

    fn event(n: usize) -> impl Strategy<Value = Event> {
        prop_oneof![
            4 => (0..n, 0u8..3).prop_map(|(i, r)| Event::Result(i, r)),
            1 => (0u64..400).prop_map(Event::Wait),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the results: the ejected share never exceeds
        /// max_ejection_percent; an ejected endpoint stays out at least its
        /// ejection time and returns within one interval after it; the
        /// duration is min(base × n, max).
        #[test]
        fn ejection_bookkeeping(
            n in 1usize..12,
            max_percent in 0u32..=100,
            events in proptest::collection::vec(event(12), 1..400),
        ) {
            let c = config(max_percent);
            let t0 = Instant::now();
            let od = OutlierDetector::new(&c, &addrs(n as u16), t0);
            let mut now = t0;
            // Latest ejection per endpoint: (time, duration).
            let mut latest: Vec<Option<(Instant, Duration)>> = vec![None; n];
            for ev in events {
                match ev {
                    Event::Wait(ms) => now += Duration::from_millis(ms),
                    Event::Result(i, r) => {
                        let class = [ResultClass::Success, ResultClass::Error5xx, ResultClass::GatewayError][usize::from(r)];
                        let was_ejected = od.is_ejected(i % n, now);
                        if let Some(e) = od.on_result(i % n, class, now) {
                            prop_assert!(!was_ejected, "an ejected endpoint is not ejected again");
                            prop_assert!(e.multiplier >= 1);
                            let expected = (c.base_ejection_time * e.multiplier).min(DEFAULT_MAX_EJECTION_TIME);
                            prop_assert_eq!(e.duration, expected);
                            latest[e.endpoint] = Some((now, e.duration));
                        }
                    }
                }
                let ejected = od.ejected_count(now);
                prop_assert!(u64::from(ejected) * 100 <= u64::from(max_percent) * n as u64,
                    "{ejected} of {n} ejected, max {max_percent}%");
                prop_assert_eq!(ejected as usize, (0..n).filter(|&i| od.is_ejected(i, now)).count());
                for (i, l) in latest.iter().enumerate() {
                    if let Some((at, d)) = *l {
                        if now < at + d {
                            prop_assert!(od.is_ejected(i, now), "endpoint {i} back too early");
                        } else if now >= at + d + c.interval {
                            prop_assert!(!od.is_ejected(i, now), "endpoint {i} back too late");
                        }
                    }
                }
            }
        }
    }
}

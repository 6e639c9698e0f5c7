//! Fault injection: Istio's VirtualService `fault` (Envoy's HTTP fault
//! filter, `envoy.filters.http.fault`; gRFC A33 for gRPC clients).
//!
//! Per request, the delay and the abort are decided independently, each
//! with its own uniform random number against its percentage, as the
//! Envoy filter does (`FaultFilter::decodeHeaders`: delay first, then the
//! abort once the delay has elapsed). A request can therefore be both
//! delayed and then aborted. The fault applies once per request, before
//! the retry loop: an injected abort is a local response, never retried,
//! and never reported to outlier detection (Envoy's fault filter sits
//! before the router).

use std::time::Duration;

use crate::model::{AbortStatus, FaultPolicy};

/// What to do to one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultDecision {
    /// Wait this long before going on (`None`: no delay).
    pub delay: Option<Duration>,
    /// Then answer with this status instead of sending the request
    /// (`None`: send it).
    pub abort: Option<AbortStatus>,
}

impl FaultDecision {
    /// Whether the request is left alone.
    pub fn is_none(&self) -> bool {
        self.delay.is_none() && self.abort.is_none()
    }
}

/// Decides the fault for one request: `random_delay` and `random_abort`
/// are independent uniform `u64`s; a delay (abort) applies when its random
/// number falls inside its fraction ([`crate::model::Fraction::hit`]).
pub fn decide(fault: &FaultPolicy, random_delay: u64, random_abort: u64) -> FaultDecision {
    FaultDecision {
        delay: fault
            .delay
            .as_ref()
            .filter(|d| d.fraction.hit(random_delay))
            .map(|d| d.delay),
        abort: fault
            .abort
            .as_ref()
            .filter(|a| a.fraction.hit(random_abort))
            .map(|a| a.status),
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::model::{FaultAbort, FaultDelay, Fraction};

    fn policy(delay_percent: f64, abort_percent: f64) -> FaultPolicy {
        FaultPolicy {
            delay: Some(FaultDelay {
                fraction: Fraction::from_percent(delay_percent).unwrap(),
                delay: Duration::from_millis(5),
            }),
            abort: Some(FaultAbort {
                fraction: Fraction::from_percent(abort_percent).unwrap(),
                status: AbortStatus::Http(503),
            }),
        }
    }

    #[test]
    fn no_fault_and_full_fault() {
        assert!(decide(&FaultPolicy::default(), 0, 0).is_none());
        for r in [0, 1, u64::MAX / 2, u64::MAX] {
            assert!(decide(&policy(0.0, 0.0), r, r).is_none());
            let d = decide(&policy(100.0, 100.0), r, r);
            assert_eq!(d.delay, Some(Duration::from_millis(5)));
            assert_eq!(d.abort, Some(AbortStatus::Http(503)));
        }
    }

    #[test]
    fn shares_match_the_percentages_independently() {
        // Abort 20%, delay 10% over 50,000 requests: each share, and the
        // share of both, within z = 4.5 of its binomial mean.
        let p = policy(10.0, 20.0);
        let mut rng = StdRng::seed_from_u64(4);
        let n = 50_000u32;
        let (mut delayed, mut aborted, mut both) = (0u32, 0u32, 0u32);
        for _ in 0..n {
            let d = decide(&p, rng.random(), rng.random());
            delayed += u32::from(d.delay.is_some());
            aborted += u32::from(d.abort.is_some());
            both += u32::from(d.delay.is_some() && d.abort.is_some());
        }
        for (count, share) in [(delayed, 0.1), (aborted, 0.2), (both, 0.02)] {
            let mean = f64::from(n) * share;
            let sd = (mean * (1.0 - share)).sqrt();
            assert!(
                (f64::from(count) - mean).abs() < 4.5 * sd,
                "{count} vs {mean} ± {sd}"
            );
        }
    }
}

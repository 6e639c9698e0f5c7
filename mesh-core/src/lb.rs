//! Endpoint picking: locality-weighted round robin, random and
//! power-of-two-choices least-request.
//!
//! As in Envoy and gRPC's `wrr_locality` (gRFC A52), a pick first chooses a
//! locality in proportion to its weight, then an endpoint inside it with the
//! cluster's policy. Only the highest priority that has endpoints is used
//! (priority failover). Per-endpoint state (the round-robin counter, active
//! request counts) lives with the caller and is passed in, so the decision
//! stays a pure function.

use std::net::SocketAddr;

use crate::model::{ClusterLoadAssignment, LbPolicy};

/// The endpoints of a cluster flattened for fast picks. Build one per
/// received [`ClusterLoadAssignment`]; picks then never allocate.
#[derive(Debug, Clone)]
pub struct EndpointSet {
    addresses: Vec<SocketAddr>,
    /// Cumulative endpoint weights, aligned with `addresses` (per locality run).
    cumulative: Vec<u64>,
    localities: Vec<Slot>,
    locality_total: u64,
}

#[derive(Debug, Clone)]
struct Slot {
    start: usize,
    len: usize,
    /// Cumulative locality weight up to and including this one.
    cumulative_weight: u64,
    /// Sum of endpoint weights in this locality.
    endpoint_weight: u64,
    uniform: bool,
}

impl EndpointSet {
    /// Flattens the highest non-empty priority of `cla`.
    pub fn new(cla: &ClusterLoadAssignment) -> Self {
        let top = cla
            .localities
            .iter()
            .filter(|l| !l.endpoints.is_empty())
            .map(|l| l.priority)
            .min();
        let mut set = EndpointSet {
            addresses: Vec::new(),
            cumulative: Vec::new(),
            localities: Vec::new(),
            locality_total: 0,
        };
        for l in cla.localities.iter() {
            if Some(l.priority) != top || l.endpoints.is_empty() {
                continue;
            }
            let start = set.addresses.len();
            let mut sum = 0u64;
            let first = l.endpoints[0].weight;
            for e in l.endpoints.iter() {
                sum += u64::from(e.weight.max(1));
                set.addresses.push(e.address);
                set.cumulative.push(sum);
            }
            set.locality_total += u64::from(l.weight.max(1));
            set.localities.push(Slot {
                start,
                len: l.endpoints.len(),
                cumulative_weight: set.locality_total,
                endpoint_weight: sum,
                uniform: l.endpoints.iter().all(|e| e.weight == first),
            });
        }
        set
    }

    /// Number of endpoints that can be picked.
    pub fn len(&self) -> usize {
        self.addresses.len()
    }

    /// Whether there is nothing to pick.
    pub fn is_empty(&self) -> bool {
        self.addresses.is_empty()
    }

    /// The address of endpoint `i`.
    pub fn address(&self, i: usize) -> SocketAddr {
        self.addresses[i]
    }

    /// All addresses, in index order.
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }

    /// Picks an endpoint index. `random` yields uniform `u64`s; `counter` is
    /// the cluster's round-robin counter (incremented by the caller per
    /// pick); `active(i)` is the number of requests in flight to endpoint `i`.
    pub fn pick(
        &self,
        policy: LbPolicy,
        random: &mut impl FnMut() -> u64,
        counter: u64,
        active: impl Fn(usize) -> u32,
    ) -> Option<usize> {
        if self.addresses.is_empty() {
            return None;
        }
        let slot = self.pick_locality(random());
        match policy {
            LbPolicy::RoundRobin => Some(if slot.uniform {
                slot.start + (counter % slot.len as u64) as usize
            } else {
                self.weighted_in(slot, counter % slot.endpoint_weight)
            }),
            // Ring hash is picked by key elsewhere; without a key it is random.
            LbPolicy::Random | LbPolicy::RingHash { .. } => Some(self.random_in(slot, random())),
            LbPolicy::LeastRequest => {
                let a = self.random_in(slot, random());
                if slot.len == 1 {
                    return Some(a);
                }
                let mut b = self.random_in(slot, random());
                if b == a {
                    // A second, distinct choice: the next endpoint of the locality.
                    b = slot.start + (b - slot.start + 1) % slot.len;
                }
                Some(if active(b) < active(a) { b } else { a })
            }
        }
    }

    fn pick_locality(&self, random: u64) -> &Slot {
        if self.localities.len() == 1 {
            return &self.localities[0];
        }
        let point = scale(random, self.locality_total);
        let i = self
            .localities
            .partition_point(|s| s.cumulative_weight <= point);
        &self.localities[i.min(self.localities.len() - 1)]
    }

    fn random_in(&self, slot: &Slot, random: u64) -> usize {
        if slot.uniform {
            slot.start + scale(random, slot.len as u64) as usize
        } else {
            self.weighted_in(slot, scale(random, slot.endpoint_weight))
        }
    }

    fn weighted_in(&self, slot: &Slot, point: u64) -> usize {
        let run = &self.cumulative[slot.start..slot.start + slot.len];
        slot.start + run.partition_point(|&c| c <= point).min(slot.len - 1)
    }
}

/// Maps a uniform `u64` onto `[0, n)`.
fn scale(random: u64, n: u64) -> u64 {
    ((u128::from(random) * u128::from(n)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;
    use crate::model::{Endpoint, Locality, LocalityEndpoints};

    /// (locality weight, priority, [(port, endpoint weight)]) per locality.
    type Spec<'a> = [(u32, u32, &'a [(u16, u32)])];

    fn cla(localities: &Spec<'_>) -> ClusterLoadAssignment {
        let ls = localities
            .iter()
            .enumerate()
            .map(|(i, (weight, priority, eps))| LocalityEndpoints {
                locality: Locality {
                    zone: format!("z{i}").into(),
                    ..Locality::default()
                },
                weight: *weight,
                priority: *priority,
                endpoints: eps
                    .iter()
                    .map(|(port, w)| Endpoint {
                        address: SocketAddr::from(([127, 0, 0, 1], *port)),
                        weight: *w,
                        labels: Arc::from([]),
                    })
                    .collect(),
            })
            .collect();
        ClusterLoadAssignment::new("c".into(), ls).unwrap()
    }

    fn counts(set: &EndpointSet, policy: LbPolicy, n: u64) -> Vec<u64> {
        let mut rng = StdRng::seed_from_u64(7);
        let mut out = vec![0u64; set.len()];
        for i in 0..n {
            let idx = set.pick(policy, &mut || rng.random(), i, |_| 0).unwrap();
            out[idx] += 1;
        }
        out
    }

    #[test]
    fn round_robin_cycles_evenly() {
        let set = EndpointSet::new(&cla(&[(1, 0, &[(1, 1), (2, 1), (3, 1)])]));
        assert_eq!(counts(&set, LbPolicy::RoundRobin, 300), vec![100, 100, 100]);
    }

    #[test]
    fn locality_weights_are_honored() {
        // 3:1 locality weights; z-test at 4.5 sigma.
        let set = EndpointSet::new(&cla(&[(3, 0, &[(1, 1)]), (1, 0, &[(2, 1), (3, 1)])]));
        let n = 40_000u64;
        let c = counts(&set, LbPolicy::Random, n);
        let p = 0.75;
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(((c[0] as f64) - n as f64 * p).abs() < 4.5 * sd, "{c:?}");
        assert!(c[1].abs_diff(c[2]) as f64 <= 4.5 * (n as f64 * 0.125).sqrt() * 2.0);
    }

    #[test]
    fn lower_priority_serves_only_when_higher_is_empty() {
        let set = EndpointSet::new(&cla(&[(1, 1, &[(9, 1)]), (1, 0, &[(1, 1)])]));
        assert_eq!(set.addresses(), &[SocketAddr::from(([127, 0, 0, 1], 1))]);
        let set = EndpointSet::new(&cla(&[(1, 1, &[(9, 1)]), (1, 0, &[])]));
        assert_eq!(set.addresses(), &[SocketAddr::from(([127, 0, 0, 1], 9))]);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let set = EndpointSet::new(&cla(&[(1, 0, &[(1, 1), (2, 1)])]));
        let mut rng = StdRng::seed_from_u64(1);
        for i in 0..1000 {
            // Endpoint 0 is busy: with two endpoints P2C always compares both.
            let idx = set
                .pick(LbPolicy::LeastRequest, &mut || rng.random(), i, |e| {
                    if e == 0 { 10 } else { 0 }
                })
                .unwrap();
            assert_eq!(idx, 1);
        }
    }

    #[test]
    fn endpoint_weights_are_honored_by_round_robin() {
        let set = EndpointSet::new(&cla(&[(1, 0, &[(1, 3), (2, 1)])]));
        assert_eq!(counts(&set, LbPolicy::RoundRobin, 400), vec![300, 100]);
    }

    #[test]
    fn empty_set_picks_nothing() {
        let set = EndpointSet::new(&cla(&[]));
        assert!(
            set.pick(LbPolicy::RoundRobin, &mut || 0, 0, |_| 0)
                .is_none()
        );
    }
}

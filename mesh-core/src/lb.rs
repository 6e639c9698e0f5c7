//! Endpoint picking: locality-weighted round robin, random,
//! power-of-two-choices least-request and ring hash, with endpoint
//! eligibility (outlier ejection), retry host avoidance and locality
//! failover.
//!
//! As in Envoy and gRPC's `wrr_locality` (gRFC A52), a pick first chooses a
//! locality in proportion to its weight, then an endpoint inside it with the
//! cluster's policy. Per-endpoint state (the round-robin counter, active
//! request counts, ejections, the endpoints a request already tried) lives
//! with the caller and is passed in, so the decision stays a pure function.
//!
//! Localities are grouped in *tiers*, tried in order; a pick moves to the
//! next tier only when the better one has no eligible endpoint:
//!
//! - [`EndpointSet::new`] keeps the highest-priority non-empty localities
//!   only, as one tier (the behaviour before failover existed).
//! - [`EndpointSet::new_for`] keeps every priority, in order (Envoy's
//!   priority failover), and with `failover` on also orders the localities
//!   of a priority by how close they are to the client, Istio's
//!   `localityLbSetting` failover (`LbPriority` in istiod): same region,
//!   zone and sub-zone first, then same region and zone, then same region,
//!   then the rest. Envoy spills load gradually from a tier as its healthy
//!   share drops below 1/1.4 (the overprovisioning factor); this client
//!   moves only when no endpoint of the tier is eligible, which keeps
//!   traffic local as long as anything local is up (and what Istio's
//!   failover docs describe).
//!
//! Eligibility ([`PickFilter::eligible`]) is hard: an ineligible endpoint
//! (ejected by outlier detection) is never picked. Avoidance
//! ([`PickFilter::avoid`]) is soft: Envoy's `previous_hosts` retry
//! predicate, which Istio sets on every retry policy with
//! `host_selection_retry_max_attempts: 5` — the pick is redone up to
//! [`HOST_SELECTION_ATTEMPTS`] times while it lands on an endpoint already
//! tried; past that, this client takes an untried eligible endpoint of the
//! tier if there is one (Envoy would accept the last pick), and an already
//! tried one only when nothing else is eligible. With
//! [`PickFilter::spill`] (Istio `retryRemoteLocalities`) a tier whose
//! eligible endpoints were all tried is left for the next tier that has an
//! untried one.
//!
//! Istio's explicit `localityLbSetting` (`distribute`, `failover`,
//! `failoverPriority`) reaches this client as the control server computed
//! it for the caller: locality weights and EDS priorities, which
//! [`EndpointSet::new_for`] takes as given (the cluster then has
//! `locality_failover` off, so no client-side ordering is added).
//!
//! Slow start (Istio `warmupDurationSecs`, Envoy `slow_start_config` with
//! its default aggression 1.0 and minimum weight 10%): an endpoint added
//! after the cluster was first seen weighs
//! [`slow_start_factor`] of its weight until its window has passed.
//! [`EndpointSet::pick_warming`] gets that by rejection: a pick of an
//! endpoint with factor `f` stands with probability `f`, otherwise the
//! pick is redone (at most [`SLOW_START_ATTEMPTS`] times), so shares are
//! proportional to weight × factor. Only round robin and least request
//! have slow start, as in Envoy.
//!
//! Ring hash picks walk the ring from the request's hash and take the
//! first entry whose endpoint is in the tier, eligible and untried; that
//! is where the key would land if the skipped endpoints were not on the
//! ring (Envoy rebuilds the ring from healthy hosts instead, which moves a
//! few more keys). Without a hash the walk starts at a random point.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::OnceLock;

use crate::model::{ClusterLoadAssignment, LbPolicy, Locality, LocalityEndpoints};
use crate::ring_hash::{DEFAULT_MAXIMUM_RING_SIZE, Ring};

/// Envoy's `host_selection_retry_max_attempts` as Istio sets it: how many
/// times a pick is redone while it lands on an endpoint to avoid.
pub const HOST_SELECTION_ATTEMPTS: u64 = 5;

/// The endpoints of a cluster flattened for fast picks. Build one per
/// received [`ClusterLoadAssignment`]; picks then never allocate (a ring
/// hash pick builds the ring once, on first use).
#[derive(Debug, Clone)]
pub struct EndpointSet {
    addresses: Vec<SocketAddr>,
    /// Cumulative endpoint weights, aligned with `addresses` (per locality run).
    cumulative: Vec<u64>,
    /// Endpoint weights (at least 1), aligned with `addresses`.
    weights: Vec<u64>,
    /// Endpoint weight normalized within its locality × locality weight
    /// normalized within its tier (Envoy's ring hash weights).
    ring_weights: Vec<f64>,
    /// The tier of each endpoint.
    tier_of: Vec<u16>,
    /// Localities in tier order.
    localities: Vec<Slot>,
    tiers: Vec<Tier>,
    ring: OnceLock<Ring>,
}

#[derive(Debug, Clone)]
struct Slot {
    start: usize,
    len: usize,
    /// Cumulative locality weight within its tier, up to and including this one.
    cumulative_weight: u64,
    /// Sum of endpoint weights in this locality.
    endpoint_weight: u64,
    uniform: bool,
}

#[derive(Debug, Clone)]
struct Tier {
    /// Indexes into `localities`.
    slots: Range<usize>,
    /// Indexes into `addresses`.
    endpoints: Range<usize>,
    /// Sum of locality weights.
    total: u64,
}

/// What a pick may and should not land on.
#[derive(Clone, Copy)]
pub struct PickFilter<'a> {
    /// Endpoints that may be picked at all (`false`: ejected). Use
    /// [`crate::outlier::OutlierDetector::eligible`], which already lets
    /// every endpoint through in panic mode.
    pub eligible: &'a dyn Fn(usize) -> bool,
    /// Endpoints to avoid when another eligible one exists (`true`:
    /// already tried by this request).
    pub avoid: &'a dyn Fn(usize) -> bool,
    /// Whether avoidance may move the pick to a worse tier (Istio
    /// `retryRemoteLocalities`).
    pub spill: bool,
}

fn always(_: usize) -> bool {
    true
}

fn never(_: usize) -> bool {
    false
}

impl PickFilter<'static> {
    /// Every endpoint eligible, none avoided.
    pub const ALL: PickFilter<'static> = PickFilter {
        eligible: &always,
        avoid: &never,
        spill: false,
    };
}

impl Default for PickFilter<'static> {
    fn default() -> Self {
        PickFilter::ALL
    }
}

impl std::fmt::Debug for PickFilter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PickFilter")
            .field("spill", &self.spill)
            .finish_non_exhaustive()
    }
}

/// How many picks [`EndpointSet::pick_warming`] makes at most before it
/// keeps the last one.
pub const SLOW_START_ATTEMPTS: u64 = 32;

/// Envoy's default minimum weight of an endpoint in slow start (10%).
pub const SLOW_START_MIN_FACTOR: f64 = 0.1;

/// The share of its weight an endpoint `age` old gets in a slow start
/// `window` (Envoy's formula with aggression 1.0: `max(age, 1s) / window`,
/// at least 10%, 1 once the window has passed).
pub fn slow_start_factor(age: std::time::Duration, window: std::time::Duration) -> f64 {
    if age >= window || window.is_zero() {
        return 1.0;
    }
    let age = age.max(std::time::Duration::from_secs(1));
    (age.as_secs_f64() / window.as_secs_f64()).clamp(SLOW_START_MIN_FACTOR, 1.0)
}

/// How close an endpoint's locality is to the client's (Istio's
/// `LbPriority`): 0 same region, zone and sub-zone; 1 same region and
/// zone; 2 same region; 3 elsewhere.
pub fn locality_rank(client: &Locality, endpoint: &Locality) -> u8 {
    if client.region != endpoint.region {
        3
    } else if client.zone != endpoint.zone {
        2
    } else if client.sub_zone != endpoint.sub_zone {
        1
    } else {
        0
    }
}

/// Result of a pick inside one tier.
enum TierPick {
    /// Eligible and not avoided.
    Fresh(usize),
    /// Eligible, but every eligible endpoint of the tier is avoided.
    Avoided(usize),
    /// Nothing eligible in the tier.
    Nothing,
}

impl EndpointSet {
    /// Flattens the highest non-empty priority of `cla`, as one tier.
    pub fn new(cla: &ClusterLoadAssignment) -> Self {
        let top = cla
            .localities
            .iter()
            .filter(|l| !l.endpoints.is_empty())
            .map(|l| l.priority)
            .min();
        let tiers: Vec<Vec<&LocalityEndpoints>> = vec![
            cla.localities
                .iter()
                .filter(|l| Some(l.priority) == top && !l.endpoints.is_empty())
                .collect(),
        ];
        Self::from_tiers(tiers)
    }

    /// Flattens every priority of `cla`, best first, as tiers; with
    /// `failover` and the client's `local` locality, each priority is also
    /// split by [`locality_rank`] (same zone first). Indexes differ from
    /// [`EndpointSet::new`]'s when `cla` has several priorities.
    pub fn new_for(cla: &ClusterLoadAssignment, local: Option<&Locality>, failover: bool) -> Self {
        let key = |l: &LocalityEndpoints| -> (u32, u8) {
            let rank = match (failover, local) {
                (true, Some(client)) => locality_rank(client, &l.locality),
                _ => 0,
            };
            (l.priority, rank)
        };
        let mut keys: Vec<(u32, u8)> = cla
            .localities
            .iter()
            .filter(|l| !l.endpoints.is_empty())
            .map(key)
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let tiers = keys
            .iter()
            .map(|k| {
                cla.localities
                    .iter()
                    .filter(|l| !l.endpoints.is_empty() && key(l) == *k)
                    .collect()
            })
            .collect();
        Self::from_tiers(tiers)
    }

    fn from_tiers(groups: Vec<Vec<&LocalityEndpoints>>) -> Self {
        let mut set = EndpointSet {
            addresses: Vec::new(),
            cumulative: Vec::new(),
            weights: Vec::new(),
            ring_weights: Vec::new(),
            tier_of: Vec::new(),
            localities: Vec::new(),
            tiers: Vec::new(),
            ring: OnceLock::new(),
        };
        for group in &groups {
            if group.is_empty() {
                continue;
            }
            let tier_index = u16::try_from(set.tiers.len()).unwrap_or(u16::MAX);
            let slot_start = set.localities.len();
            let endpoint_start = set.addresses.len();
            let mut total = 0u64;
            let tier_weight: f64 = group.iter().map(|l| f64::from(l.weight.max(1))).sum();
            for l in group {
                let start = set.addresses.len();
                let mut sum = 0u64;
                let first = l.endpoints.first().map_or(1, |e| e.weight);
                let locality_share = f64::from(l.weight.max(1)) / tier_weight;
                let endpoint_sum: f64 =
                    l.endpoints.iter().map(|e| f64::from(e.weight.max(1))).sum();
                for e in l.endpoints.iter() {
                    sum += u64::from(e.weight.max(1));
                    set.addresses.push(e.address);
                    set.cumulative.push(sum);
                    set.weights.push(u64::from(e.weight.max(1)));
                    set.ring_weights
                        .push(f64::from(e.weight.max(1)) / endpoint_sum * locality_share);
                    set.tier_of.push(tier_index);
                }
                total += u64::from(l.weight.max(1));
                set.localities.push(Slot {
                    start,
                    len: l.endpoints.len(),
                    cumulative_weight: total,
                    endpoint_weight: sum,
                    uniform: l.endpoints.iter().all(|e| e.weight == first),
                });
            }
            set.tiers.push(Tier {
                slots: slot_start..set.localities.len(),
                endpoints: endpoint_start..set.addresses.len(),
                total,
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
    ///
    /// # Panics
    /// If `i >= self.len()`.
    pub fn address(&self, i: usize) -> SocketAddr {
        self.addresses[i]
    }

    /// All addresses, in index order.
    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }

    /// Number of tiers (1 without failover and priorities).
    pub fn tier_count(&self) -> usize {
        self.tiers.len()
    }

    /// The tier of endpoint `i` (0 = best), `None` out of range.
    pub fn tier(&self, i: usize) -> Option<usize> {
        self.tier_of.get(i).map(|t| usize::from(*t))
    }

    /// The hash ring of this set for `minimum_ring_size`: built on first
    /// use and kept (a ring of another size is built afresh for each call,
    /// so rebuild the set when a cluster's ring size changes).
    pub fn ring(&self, minimum_ring_size: u64) -> std::borrow::Cow<'_, Ring> {
        let build = || {
            let weighted: Vec<(SocketAddr, f64)> = self
                .addresses
                .iter()
                .copied()
                .zip(self.ring_weights.iter().copied())
                .collect();
            Ring::with_weights(&weighted, minimum_ring_size, DEFAULT_MAXIMUM_RING_SIZE)
        };
        let ring = self.ring.get_or_init(build);
        if ring.minimum_ring_size() == minimum_ring_size {
            std::borrow::Cow::Borrowed(ring)
        } else {
            std::borrow::Cow::Owned(build())
        }
    }

    /// Picks an endpoint index, every endpoint eligible. `random` yields
    /// uniform `u64`s; `counter` is the cluster's round-robin counter
    /// (incremented by the caller per pick); `active(i)` is the number of
    /// requests in flight to endpoint `i`. A ring hash pick without a key
    /// lands at a random point of the ring.
    pub fn pick(
        &self,
        policy: LbPolicy,
        random: &mut impl FnMut() -> u64,
        counter: u64,
        active: impl Fn(usize) -> u32,
    ) -> Option<usize> {
        self.pick_with(policy, None, random, counter, active, &PickFilter::ALL)
    }

    /// Picks an endpoint index as [`EndpointSet::pick`] does, with
    /// `filter`, and for ring hash the request's `hash` (from
    /// [`crate::ring_hash::request_hash`]; `None`: a random point). Tiers
    /// are tried in order; `None` when no endpoint is eligible.
    pub fn pick_with(
        &self,
        policy: LbPolicy,
        hash: Option<u64>,
        random: &mut impl FnMut() -> u64,
        counter: u64,
        active: impl Fn(usize) -> u32,
        filter: &PickFilter<'_>,
    ) -> Option<usize> {
        if self.addresses.len() <= 1 {
            // None, or one endpoint (a common shape: one pod behind a
            // service): whatever the policy, tier and ring, the walk below
            // ends on endpoint 0 when it may be picked at all (avoided or
            // not: it is the only one) and on nothing otherwise. Answered
            // here without the tier walk, the ring or a random draw (about
            // 100 instructions per request on the client fast path).
            return (!self.addresses.is_empty() && (filter.eligible)(0)).then_some(0);
        }
        let ring = match policy {
            LbPolicy::RingHash { minimum_ring_size } => Some(self.ring(minimum_ring_size)),
            _ => None,
        };
        let hash = match (&ring, hash) {
            (Some(_), None) => Some(random()),
            (_, h) => h,
        };
        let mut avoided = None;
        for (t, tier) in self.tiers.iter().enumerate() {
            let pick = match (&ring, hash) {
                (Some(ring), Some(h)) => self.ring_in_tier(ring, h, t, filter),
                _ => self.pick_in_tier(tier, policy, random, counter, &active, filter),
            };
            match pick {
                TierPick::Fresh(i) => return Some(i),
                TierPick::Avoided(i) if !filter.spill => return Some(i),
                TierPick::Avoided(i) => {
                    avoided.get_or_insert(i);
                }
                TierPick::Nothing => {}
            }
        }
        avoided
    }

    /// [`EndpointSet::pick_with`] with slow start: `factor(i)` is endpoint
    /// `i`'s [`slow_start_factor`] (1 for an endpoint out of its window); a
    /// pick stands with that probability and is redone otherwise, up to
    /// [`SLOW_START_ATTEMPTS`] picks (then the last one stands). Round
    /// robin picks at random (by weight) meanwhile: a counter's fixed
    /// cycle would make a redo land on the next endpoint instead of one
    /// drawn by weight, which gives a warming endpoint less than its share.
    #[allow(clippy::too_many_arguments)]
    pub fn pick_warming(
        &self,
        policy: LbPolicy,
        hash: Option<u64>,
        random: &mut impl FnMut() -> u64,
        counter: u64,
        active: impl Fn(usize) -> u32,
        filter: &PickFilter<'_>,
        factor: &dyn Fn(usize) -> f64,
    ) -> Option<usize> {
        let policy = match policy {
            LbPolicy::RoundRobin => LbPolicy::Random,
            other => other,
        };
        let mut last = None;
        for attempt in 0..SLOW_START_ATTEMPTS {
            let i = self.pick_with(
                policy,
                hash,
                random,
                counter.wrapping_add(attempt),
                &active,
                filter,
            )?;
            let f = factor(i);
            // Accept with probability f: a uniform u64 below f × 2^64.
            if f >= 1.0 || (random() as f64) < f * 18_446_744_073_709_551_616.0 {
                return Some(i);
            }
            last = Some(i);
        }
        last
    }

    fn ring_in_tier(
        &self,
        ring: &Ring,
        hash: u64,
        tier: usize,
        filter: &PickFilter<'_>,
    ) -> TierPick {
        let mut avoided = None;
        for i in ring.walk(hash) {
            if self.tier(i) != Some(tier) || !(filter.eligible)(i) {
                continue;
            }
            if !(filter.avoid)(i) {
                return TierPick::Fresh(i);
            }
            avoided.get_or_insert(i);
        }
        avoided.map_or(TierPick::Nothing, TierPick::Avoided)
    }

    fn pick_in_tier(
        &self,
        tier: &Tier,
        policy: LbPolicy,
        random: &mut impl FnMut() -> u64,
        counter: u64,
        active: &impl Fn(usize) -> u32,
        filter: &PickFilter<'_>,
    ) -> TierPick {
        let mut avoided = None;
        // Random choices are redrawn (rejection sampling keeps them fair);
        // round robin goes straight to the scan, which keeps cycling
        // evenly over the acceptable endpoints with the same counter.
        let attempts = match policy {
            LbPolicy::RoundRobin => 1,
            _ => HOST_SELECTION_ATTEMPTS,
        };
        for attempt in 0..attempts {
            let Some(i) = self.policy_pick(
                tier,
                policy,
                random,
                counter.wrapping_add(attempt),
                active,
                filter,
            ) else {
                continue;
            };
            if !(filter.eligible)(i) {
                continue;
            }
            if !(filter.avoid)(i) {
                return TierPick::Fresh(i);
            }
            avoided = Some(i);
        }
        // Rare: the attempts kept landing on ejected or tried endpoints.
        let fresh = |i: usize| (filter.eligible)(i) && !(filter.avoid)(i);
        if let Some(i) = self.scan(tier, policy, random, counter, active, &fresh) {
            return TierPick::Fresh(i);
        }
        if let Some(i) = avoided {
            return TierPick::Avoided(i);
        }
        match self.scan(tier, policy, random, counter, active, &|i| {
            (filter.eligible)(i)
        }) {
            Some(i) => TierPick::Avoided(i),
            None => TierPick::Nothing,
        }
    }

    /// One pick by the policy inside `tier`, ignoring eligibility except
    /// that least-request prefers an acceptable candidate of its two.
    fn policy_pick(
        &self,
        tier: &Tier,
        policy: LbPolicy,
        random: &mut impl FnMut() -> u64,
        counter: u64,
        active: &impl Fn(usize) -> u32,
        filter: &PickFilter<'_>,
    ) -> Option<usize> {
        // A random number is drawn only for a choice there is to make: a
        // cluster of one locality, or of one endpoint, needs none.
        let slot = self.pick_locality(tier, random)?;
        if slot.len == 1 {
            return Some(slot.start);
        }
        Some(match policy {
            LbPolicy::RoundRobin => {
                if slot.uniform {
                    slot.start + (counter % slot.len as u64) as usize
                } else {
                    self.weighted_in(slot, counter % slot.endpoint_weight.max(1))
                }
            }
            LbPolicy::Random | LbPolicy::RingHash { .. } => self.random_in(slot, random()),
            LbPolicy::LeastRequest => {
                let a = self.random_in(slot, random());
                let mut b = self.random_in(slot, random());
                if b == a {
                    // A second, distinct choice, uniform among the others.
                    let skip = 1 + scale(random(), slot.len as u64 - 1) as usize;
                    b = slot.start + (a - slot.start + skip) % slot.len;
                }
                // Prefer an untried eligible candidate, then an eligible
                // one, then the one with fewer requests in flight.
                let rank = |i: usize| {
                    let standing = if !(filter.eligible)(i) {
                        2
                    } else if (filter.avoid)(i) {
                        1
                    } else {
                        0
                    };
                    (standing, active(i))
                };
                if rank(b) < rank(a) { b } else { a }
            }
        })
    }

    /// A pick among the endpoints of `tier` that pass `ok`, by endpoint
    /// weight (round robin: the counter-th; least request: the better of
    /// two). Linear in the tier's size.
    fn scan(
        &self,
        tier: &Tier,
        policy: LbPolicy,
        random: &mut impl FnMut() -> u64,
        counter: u64,
        active: &impl Fn(usize) -> u32,
        ok: &dyn Fn(usize) -> bool,
    ) -> Option<usize> {
        let weight = |i: usize| self.weights.get(i).copied().unwrap_or(1);
        let total: u64 = tier.endpoints.clone().filter(|&i| ok(i)).map(weight).sum();
        if total == 0 {
            return None;
        }
        let nth = |point: u64| {
            let mut point = point;
            for i in tier.endpoints.clone().filter(|&i| ok(i)) {
                let w = weight(i);
                if point < w {
                    return Some(i);
                }
                point -= w;
            }
            None
        };
        match policy {
            LbPolicy::RoundRobin => nth(counter % total),
            LbPolicy::LeastRequest => {
                let a = nth(scale(random(), total))?;
                let b = nth(scale(random(), total))?;
                Some(if active(b) < active(a) { b } else { a })
            }
            LbPolicy::Random | LbPolicy::RingHash { .. } => nth(scale(random(), total)),
        }
    }

    fn pick_locality(&self, tier: &Tier, random: &mut impl FnMut() -> u64) -> Option<&Slot> {
        let slots = self.localities.get(tier.slots.clone())?;
        if slots.len() == 1 {
            return slots.first();
        }
        let point = scale(random(), tier.total);
        let i = slots.partition_point(|s| s.cumulative_weight <= point);
        slots.get(i.min(slots.len().saturating_sub(1)))
    }

    fn random_in(&self, slot: &Slot, random: u64) -> usize {
        if slot.uniform {
            slot.start + scale(random, slot.len as u64) as usize
        } else {
            self.weighted_in(slot, scale(random, slot.endpoint_weight))
        }
    }

    fn weighted_in(&self, slot: &Slot, point: u64) -> usize {
        let run = self
            .cumulative
            .get(slot.start..slot.start + slot.len)
            .unwrap_or(&[]);
        slot.start
            + run
                .partition_point(|&c| c <= point)
                .min(slot.len.saturating_sub(1))
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

    /// The one-endpoint shortcut of `pick_with` answers as the tier walk
    /// does: the endpoint when it may be picked (avoided or not, spilling
    /// or not), nothing when it is ejected, for every policy.
    #[test]
    fn one_endpoint_is_picked_unless_ineligible() {
        let set = EndpointSet::new(&cla(&[(1, 0, &[(1, 1)])]));
        let yes = |_: usize| true;
        let no = |_: usize| false;
        for policy in [
            LbPolicy::RoundRobin,
            LbPolicy::Random,
            LbPolicy::LeastRequest,
            LbPolicy::RingHash {
                minimum_ring_size: 16,
            },
        ] {
            for spill in [false, true] {
                for (eligible, avoid, want) in [
                    (
                        &yes as &dyn Fn(usize) -> bool,
                        &no as &dyn Fn(usize) -> bool,
                        Some(0),
                    ),
                    (&yes, &yes, Some(0)),
                    (&no, &no, None),
                    (&no, &yes, None),
                ] {
                    let filter = PickFilter {
                        eligible,
                        avoid,
                        spill,
                    };
                    for hash in [None, Some(42)] {
                        let got = set.pick_with(policy, hash, &mut || 7, 3, |_| 0, &filter);
                        assert_eq!(got, want, "{policy:?} spill {spill} hash {hash:?}");
                    }
                }
            }
        }
        let empty = EndpointSet::new(&cla(&[(1, 0, &[])]));
        assert_eq!(
            empty.pick_with(
                LbPolicy::RoundRobin,
                None,
                &mut || 7,
                0,
                |_| 0,
                &PickFilter::ALL
            ),
            None
        );
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

    // ---- eligibility, avoidance, failover, ring hash ----

    const POLICIES: [LbPolicy; 4] = [
        LbPolicy::RoundRobin,
        LbPolicy::Random,
        LbPolicy::LeastRequest,
        LbPolicy::RingHash {
            minimum_ring_size: 64,
        },
    ];

    /// (region, zone, sub-zone, priority, ports) per locality.
    type Placed<'a> = [(&'a str, &'a str, &'a str, u32, &'a [u16])];

    fn placed(localities: &Placed<'_>) -> ClusterLoadAssignment {
        let ls = localities
            .iter()
            .map(
                |(region, zone, sub_zone, priority, ports)| LocalityEndpoints {
                    locality: Locality {
                        region: (*region).into(),
                        zone: (*zone).into(),
                        sub_zone: (*sub_zone).into(),
                    },
                    weight: ports.len() as u32,
                    priority: *priority,
                    endpoints: ports
                        .iter()
                        .map(|port| Endpoint {
                            address: SocketAddr::from(([127, 0, 0, 1], *port)),
                            weight: 1,
                            labels: Arc::from([]),
                        })
                        .collect(),
                },
            )
            .collect();
        ClusterLoadAssignment::new("c".into(), ls).unwrap()
    }

    fn local(region: &str, zone: &str, sub_zone: &str) -> Locality {
        Locality {
            region: region.into(),
            zone: zone.into(),
            sub_zone: sub_zone.into(),
        }
    }

    fn port(set: &EndpointSet, i: usize) -> u16 {
        set.address(i).port()
    }

    /// Ports picked over `n` picks with `filter`.
    fn picked_ports(
        set: &EndpointSet,
        policy: LbPolicy,
        filter: &PickFilter<'_>,
        n: u64,
    ) -> std::collections::BTreeMap<u16, u64> {
        let mut rng = StdRng::seed_from_u64(11);
        let mut out = std::collections::BTreeMap::new();
        for c in 0..n {
            let hash = Some(rng.random());
            if let Some(i) = set.pick_with(policy, hash, &mut || rng.random(), c, |_| 0, filter) {
                *out.entry(port(set, i)).or_insert(0) += 1;
            }
        }
        out
    }

    #[test]
    fn ineligible_endpoints_are_never_picked() {
        let set = EndpointSet::new(&cla(&[(1, 0, &[(1, 1), (2, 1), (3, 1), (4, 1)])]));
        let eligible = |i: usize| set.address(i).port() != 2;
        let filter = PickFilter {
            eligible: &eligible,
            ..PickFilter::ALL
        };
        for policy in POLICIES {
            let got = picked_ports(&set, policy, &filter, 3_000);
            assert_eq!(
                got.keys().copied().collect::<Vec<_>>(),
                [1, 3, 4],
                "{policy:?}"
            );
            // The others share the load evenly (z = 4.5); a ring's arcs
            // are uneven by design, so ring hash is left out.
            if matches!(policy, LbPolicy::RingHash { .. }) {
                continue;
            }
            for (&p, &count) in &got {
                let sd = (3_000.0f64 / 3.0 * (2.0 / 3.0)).sqrt();
                assert!(
                    (count as f64 - 1_000.0).abs() < 4.5 * sd,
                    "{policy:?} {p}: {got:?}"
                );
            }
        }
        let none = PickFilter {
            eligible: &|_| false,
            ..PickFilter::ALL
        };
        for policy in POLICIES {
            assert!(
                picked_ports(&set, policy, &none, 10).is_empty(),
                "{policy:?}"
            );
        }
    }

    #[test]
    fn a_retry_avoids_tried_endpoints_while_another_is_eligible() {
        let set = EndpointSet::new(&cla(&[(1, 0, &[(1, 1), (2, 1), (3, 1)])]));
        let tried = |i: usize| set.address(i).port() != 3;
        let filter = PickFilter {
            avoid: &tried,
            ..PickFilter::ALL
        };
        for policy in POLICIES {
            let got = picked_ports(&set, policy, &filter, 2_000);
            assert_eq!(got.keys().copied().collect::<Vec<_>>(), [3], "{policy:?}");
        }
        // Every endpoint tried: a tried one is still better than nothing.
        let all_tried = PickFilter {
            avoid: &|_| true,
            ..PickFilter::ALL
        };
        for policy in POLICIES {
            assert_eq!(
                picked_ports(&set, policy, &all_tried, 300)
                    .values()
                    .sum::<u64>(),
                300
            );
        }
        // Ejection beats avoidance: the only eligible endpoint, although tried.
        let only_one = |i: usize| set.address(i).port() == 1;
        let filter = PickFilter {
            eligible: &only_one,
            avoid: &only_one,
            spill: true,
        };
        for policy in POLICIES {
            let got = picked_ports(&set, policy, &filter, 100);
            assert_eq!(got.keys().copied().collect::<Vec<_>>(), [1], "{policy:?}");
        }
    }

    #[test]
    fn failover_prefers_the_closest_locality_with_an_eligible_endpoint() {
        let cla = placed(&[
            ("eu", "b", "", 0, &[20, 21]),
            ("us", "a", "", 0, &[30]),
            ("eu", "a", "x", 0, &[10, 11]),
            ("eu", "a", "y", 0, &[15]),
        ]);
        let me = local("eu", "a", "x");
        let set = EndpointSet::new_for(&cla, Some(&me), true);
        assert_eq!(set.tier_count(), 4);
        let down = std::cell::RefCell::new(Vec::<u16>::new());
        let eligible = |i: usize| !down.borrow().contains(&set.address(i).port());
        let filter = PickFilter {
            eligible: &eligible,
            ..PickFilter::ALL
        };
        let expect = [
            (vec![], vec![10, 11]),
            (vec![10], vec![11]),
            (vec![10, 11], vec![15]),
            (vec![10, 11, 15], vec![20, 21]),
            (vec![10, 11, 15, 20, 21], vec![30]),
        ];
        for (ejected, want) in expect {
            *down.borrow_mut() = ejected.clone();
            for policy in POLICIES {
                let got = picked_ports(&set, policy, &filter, 400);
                assert_eq!(
                    got.keys().copied().collect::<Vec<_>>(),
                    want,
                    "{policy:?} {ejected:?}"
                );
            }
        }
        // Without failover, every locality of the priority shares the load.
        let flat = EndpointSet::new_for(&cla, Some(&me), false);
        assert_eq!(flat.tier_count(), 1);
        let got = picked_ports(&flat, LbPolicy::Random, &PickFilter::ALL, 2_000);
        assert_eq!(got.len(), 6);
        assert_eq!(locality_rank(&me, &local("eu", "a", "x")), 0);
        assert_eq!(locality_rank(&me, &local("eu", "a", "z")), 1);
        assert_eq!(locality_rank(&me, &local("eu", "c", "x")), 2);
        assert_eq!(locality_rank(&me, &local("ap", "a", "x")), 3);
    }

    #[test]
    fn lower_priorities_are_fallback_tiers() {
        let cla = placed(&[("", "", "", 1, &[9]), ("", "", "", 0, &[1, 2])]);
        let set = EndpointSet::new_for(&cla, None, false);
        assert_eq!(set.tier_count(), 2);
        let got = picked_ports(&set, LbPolicy::RoundRobin, &PickFilter::ALL, 100);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), [1, 2]);
        let p0_down = |i: usize| set.tier(i) != Some(0);
        let filter = PickFilter {
            eligible: &p0_down,
            ..PickFilter::ALL
        };
        let got = picked_ports(&set, LbPolicy::RoundRobin, &filter, 100);
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), [9]);
    }

    #[test]
    fn retry_remote_localities_lets_a_retry_leave_an_exhausted_locality() {
        let cla = placed(&[("eu", "a", "", 0, &[10]), ("eu", "b", "", 0, &[20])]);
        let me = local("eu", "a", "");
        let set = EndpointSet::new_for(&cla, Some(&me), true);
        let tried_local = |i: usize| set.address(i).port() == 10;
        for (spill, want) in [(false, 10), (true, 20)] {
            let filter = PickFilter {
                avoid: &tried_local,
                spill,
                ..PickFilter::ALL
            };
            for policy in POLICIES {
                let got = picked_ports(&set, policy, &filter, 100);
                assert_eq!(
                    got.keys().copied().collect::<Vec<_>>(),
                    [want],
                    "{policy:?} spill {spill}"
                );
            }
        }
    }

    #[test]
    fn ring_hash_picks_follow_the_key_and_skip_ejected_endpoints() {
        let ports: Vec<(u16, u32)> = (1..=10).map(|p| (p, 1)).collect();
        let set = EndpointSet::new(&cla(&[(1, 0, &ports)]));
        let policy = LbPolicy::RingHash {
            minimum_ring_size: 1024,
        };
        let pick = |hash: u64, filter: &PickFilter<'_>| {
            set.pick_with(policy, Some(hash), &mut || 0, 0, |_| 0, filter)
                .unwrap()
        };
        let keys: Vec<u64> = (0..2_000u32)
            .map(|k| crate::ring_hash::hash_key(&k.to_le_bytes()))
            .collect();
        let before: Vec<usize> = keys.iter().map(|&k| pick(k, &PickFilter::ALL)).collect();
        // The same key, the same endpoint; the ring is the one Ring::new builds.
        let ring = Ring::with_weights(
            &set.addresses()
                .iter()
                .map(|a| (*a, 0.1))
                .collect::<Vec<_>>(),
            1024,
            DEFAULT_MAXIMUM_RING_SIZE,
        );
        for (&k, &e) in keys.iter().zip(&before) {
            assert_eq!(pick(k, &PickFilter::ALL), e);
            assert_eq!(ring.pick(k), Some(e));
        }
        // Ejecting endpoint 3 moves only its keys.
        let eligible = |i: usize| i != 3;
        let filter = PickFilter {
            eligible: &eligible,
            ..PickFilter::ALL
        };
        for (&k, &e) in keys.iter().zip(&before) {
            let now = pick(k, &filter);
            if e == 3 {
                assert_ne!(now, 3);
            } else {
                assert_eq!(now, e);
            }
        }
        // A retry of a key goes to another endpoint.
        for (&k, &e) in keys.iter().zip(&before) {
            let tried = move |i: usize| i == e;
            let filter = PickFilter {
                avoid: &tried,
                ..PickFilter::ALL
            };
            assert_ne!(pick(k, &filter), e);
        }
        // Without a key, picks spread over the ring.
        let got = picked_ports(&set, policy, &PickFilter::ALL, 1_000);
        assert_eq!(got.len(), 10);
    }

    #[test]
    fn slow_start_ramps_linearly_from_ten_percent() {
        use std::time::Duration;
        let w = Duration::from_secs(100);
        let s = Duration::from_secs;
        assert_eq!(slow_start_factor(s(0), w), 0.1);
        assert_eq!(slow_start_factor(s(5), w), 0.1);
        assert_eq!(slow_start_factor(s(25), w), 0.25);
        assert_eq!(slow_start_factor(s(50), w), 0.5);
        assert_eq!(slow_start_factor(s(100), w), 1.0);
        assert_eq!(slow_start_factor(s(1_000), w), 1.0);
        assert_eq!(slow_start_factor(s(0), Duration::ZERO), 1.0);
    }

    #[test]
    fn a_warming_endpoint_gets_its_factor_of_the_share() {
        // Endpoint 1 at factor 0.25 beside one out of its window: it gets
        // 0.25 / 1.25 = 20% of the picks (z = 4.5), for both policies with
        // slow start; without it, half.
        let set = EndpointSet::new(&cla(&[(1, 0, &[(1, 1), (2, 1)])]));
        let factor = |i: usize| if i == 1 { 0.25 } else { 1.0 };
        let n = 20_000u64;
        for policy in [LbPolicy::RoundRobin, LbPolicy::LeastRequest] {
            let mut rng = StdRng::seed_from_u64(5);
            let mut warm = 0u64;
            for c in 0..n {
                let i = set
                    .pick_warming(
                        policy,
                        None,
                        &mut || rng.random(),
                        c,
                        |_| 0,
                        &PickFilter::ALL,
                        &factor,
                    )
                    .unwrap();
                warm += (i == 1) as u64;
            }
            let p = 0.2;
            let sd = (n as f64 * p * (1.0 - p)).sqrt();
            assert!(
                (warm as f64 - n as f64 * p).abs() < 4.5 * sd,
                "{policy:?}: {warm} of {n}"
            );
        }
        // Every endpoint warming alike: the shares stay even.
        let mut rng = StdRng::seed_from_u64(6);
        let mut first = 0u64;
        for c in 0..n {
            let i = set
                .pick_warming(
                    LbPolicy::LeastRequest,
                    None,
                    &mut || rng.random(),
                    c,
                    |_| 0,
                    &PickFilter::ALL,
                    &|_| 0.1,
                )
                .unwrap();
            first += (i == 0) as u64;
        }
        let sd = (n as f64 * 0.25).sqrt();
        assert!((first as f64 - n as f64 / 2.0).abs() < 4.5 * sd, "{first}");
    }

    #[test]
    fn server_computed_priorities_are_tiers_as_given() {
        // What the control server sends for failover from r1 to r2: the
        // caller's zone 0, its region 1, r2 2, r3 3. The client keeps them
        // (failover off: no ordering of its own on top).
        let cla = placed(&[
            ("r3", "a", "", 3, &[40]),
            ("r1", "z1", "", 0, &[10]),
            ("r2", "a", "", 2, &[30]),
            ("r1", "z2", "", 1, &[20]),
        ]);
        let set = EndpointSet::new_for(&cla, Some(&local("r1", "z1", "")), false);
        assert_eq!(set.tier_count(), 4);
        let down = std::cell::RefCell::new(Vec::<u16>::new());
        let eligible = |i: usize| !down.borrow().contains(&set.address(i).port());
        let filter = PickFilter {
            eligible: &eligible,
            ..PickFilter::ALL
        };
        for (ejected, want) in [
            (vec![], 10),
            (vec![10], 20),
            (vec![10, 20], 30),
            (vec![10, 20, 30], 40),
        ] {
            *down.borrow_mut() = ejected.clone();
            for policy in POLICIES {
                let got = picked_ports(&set, policy, &filter, 200);
                assert_eq!(
                    got.keys().copied().collect::<Vec<_>>(),
                    [want],
                    "{policy:?}"
                );
            }
        }
    }

    #[test]
    fn the_old_pick_is_the_new_pick_without_filter() {
        let set = EndpointSet::new(&cla(&[(2, 0, &[(1, 1), (2, 3)]), (1, 0, &[(3, 1)])]));
        for policy in POLICIES {
            let (mut a, mut b) = (StdRng::seed_from_u64(3), StdRng::seed_from_u64(3));
            for c in 0..500 {
                let old = set.pick(policy, &mut || a.random(), c, |i| i as u32);
                let new = set.pick_with(
                    policy,
                    None,
                    &mut || b.random(),
                    c,
                    |i| i as u32,
                    &PickFilter::ALL,
                );
                assert_eq!(old, new, "{policy:?}");
            }
        }
    }
}

//! Per-cluster state: what the pure decisions of `mesh_core` need from the
//! process.
//!
//! An endpoint pick ([`mesh_core::lb::EndpointSet::pick_with`]) is a
//! function of the endpoint set, random numbers, a round-robin counter, the
//! requests in flight per endpoint, which endpoints are ejected and which a
//! request already tried (Envoy's balancers keep the same state). The
//! circuit breaker, the retry limiter and the outlier detector are counters
//! and small state machines from `mesh_core` too. They all live here, one
//! [`ClusterState`] per cluster, in a read-mostly map: requests load the map
//! through an atomic pointer and compare the cluster and its assignment by
//! pointer identity; only the first request after a CDS or EDS update
//! rebuilds the entry. In-flight counts start at zero for a new assignment
//! (requests still in flight decrement the counters of the state they were
//! picked from); breaker and retry counts carry over, and outlier detection
//! keeps each endpoint that is still there, with its ejection.
//!
//! A cluster with `tls` (Istio ISTIO_MUTUAL) gets its mTLS connector here,
//! built once per cluster version from the client's certificate store; a
//! client without certificates marks the cluster unusable with the reason,
//! which the mesh layer answers with a local reply.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use http::uri::Authority;
use mesh_core::Snapshot;
use mesh_core::breaker::CircuitBreaker;
use mesh_core::lb::{EndpointSet, PickFilter, slow_start_factor};
use mesh_core::model::{
    Cluster, ClusterLoadAssignment, LbPolicy, Locality, Name, Protocol, TlsOrigination,
};
use mesh_core::outlier::{Ejection, OutlierDetector, ResultClass};
use mesh_core::retry::RetryLimiter;
use rand::Rng;

use crate::pool::{ClusterConnections, ClusterTls, ConnectionPolicy, TargetCluster};
use crate::telemetry::EndpointLabels;
use crate::tls::CertStore;

/// The state of every cluster the process has sent to.
#[derive(Debug, Default)]
pub(crate) struct ClusterStates {
    map: ArcSwap<HashMap<Name, Arc<ClusterState>>>,
    /// The workload's certificates, for clusters that require mTLS.
    certificates: Option<CertStore>,
    /// Bumped whenever the map changes: a [`StateCache`] filled before is
    /// stale.
    generation: AtomicU64,
}

/// The cluster state of a service's last request, with the map's
/// generation then (see [`ClusterStates::get_cached`]). Each clone of a
/// mesh service has its own.
#[derive(Debug, Clone, Default)]
pub(crate) struct StateCache(Option<(Arc<ClusterState>, u64)>);

impl StateCache {
    /// The cached state if the map is still at the `generation` it was
    /// filled at (see [`ClusterStates::generation`]): the answer for a
    /// request that would look up the same cluster and endpoints, which a
    /// caller knows without looking them up (the same route of the same
    /// snapshot).
    pub(crate) fn fresh(&self, generation: u64) -> Option<&Arc<ClusterState>> {
        match &self.0 {
            Some((state, seen)) if *seen == generation => Some(state),
            _ => None,
        }
    }
}

/// The state of one cluster, for one version of its config and endpoints.
#[derive(Debug)]
pub(crate) struct ClusterState {
    cluster: Arc<Cluster>,
    cla: Arc<ClusterLoadAssignment>,
    set: EndpointSet,
    /// Each address as a URI authority, built once (for URI rewriting).
    authorities: Box<[Option<Authority>]>,
    /// Each endpoint's EDS labels (`version: v1`), aligned with the
    /// addresses, for the decision record and Istio's metric labels.
    labels: Box<[EndpointLabels]>,
    /// What an endpoint without labels has.
    no_labels: EndpointLabels,
    /// Requests in flight per endpoint (least-request).
    active: Box<[AtomicU32]>,
    /// The round-robin counter.
    next: AtomicU64,
    /// Slow start: when each endpoint was first seen, aligned with the
    /// addresses; `None` for endpoints of the cluster's first assignment
    /// (they start together: a ramp would change no share).
    born: Box<[Option<Instant>]>,
    /// Until when some endpoint is in its slow start window (`None`: none
    /// is, or the cluster has no slow start): picks before it go through
    /// [`EndpointSet::pick_warming`].
    warm_until: Option<Instant>,
    outlier: Option<OutlierDetector>,
    breaker: CircuitBreaker,
    retries: RetryLimiter,
    connections: ClusterConnections,
    /// Why requests to this cluster cannot be sent (it requires mTLS and
    /// the client cannot do it); `None` for usable clusters.
    unusable: Option<Arc<str>>,
}

impl ClusterStates {
    /// States for a client presenting `store`'s certificate to clusters
    /// that require mTLS.
    pub(crate) fn with_certificates(store: CertStore) -> Self {
        ClusterStates {
            map: ArcSwap::default(),
            certificates: Some(store),
            generation: AtomicU64::new(0),
        }
    }

    /// The state for `cluster` with endpoints `cla`, both in `snapshot`;
    /// built on first use and after every change. `local` is the client's
    /// own locality (for locality failover).
    pub(crate) fn get(
        &self,
        snapshot: &Snapshot,
        cluster: &Cluster,
        cla: &ClusterLoadAssignment,
        local: impl FnOnce() -> Option<Locality>,
    ) -> Arc<ClusterState> {
        if let Some(state) = self.map.load().get(&*cluster.name)
            && std::ptr::eq(Arc::as_ptr(&state.cla), cla)
            && std::ptr::eq(Arc::as_ptr(&state.cluster), cluster)
        {
            return state.clone();
        }
        self.rebuild(snapshot, cluster, cla, local())
    }

    /// [`get`](Self::get), through `cache`, the state of the caller's
    /// previous request: it is the answer when it is for the same `cluster`
    /// and `cla` (by pointer; the state holds both, so their addresses
    /// cannot be reused while it lives) and the map has not changed since
    /// (no state was built or forgotten). Otherwise the map answers (a
    /// hash of the cluster's name and an atomic load), and fills the cache.
    pub(crate) fn get_cached(
        &self,
        cache: &mut StateCache,
        snapshot: &Snapshot,
        cluster: &Cluster,
        cla: &ClusterLoadAssignment,
        local: impl FnOnce() -> Option<Locality>,
    ) -> Arc<ClusterState> {
        let generation = self.generation.load(Ordering::Acquire);
        if let Some((state, seen)) = &cache.0
            && *seen == generation
            && std::ptr::eq(Arc::as_ptr(&state.cla), cla)
            && std::ptr::eq(Arc::as_ptr(&state.cluster), cluster)
        {
            return state.clone();
        }
        let state = self.get(snapshot, cluster, cla, local);
        cache.0 = Some((state.clone(), generation));
        state
    }

    /// The map's generation: a [`StateCache`] filled at this generation
    /// holds what [`get_cached`](Self::get_cached) would answer for the
    /// same cluster and endpoints (see [`StateCache::fresh`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    #[cold]
    fn rebuild(
        &self,
        snapshot: &Snapshot,
        cluster: &Cluster,
        cla: &ClusterLoadAssignment,
        local: Option<Locality>,
    ) -> Arc<ClusterState> {
        let cluster = snapshot
            .clusters
            .get(&*cluster.name)
            .filter(|c| std::ptr::eq(Arc::as_ptr(c), cluster))
            .cloned()
            .unwrap_or_else(|| Arc::new(cluster.clone()));
        let cla = snapshot
            .endpoints
            .get(&*cla.cluster_name)
            .filter(|c| std::ptr::eq(Arc::as_ptr(c), cla))
            .cloned()
            .unwrap_or_else(|| Arc::new(cla.clone()));
        let old = self.map.load().get(&*cluster.name).cloned();
        let fresh = Arc::new(ClusterState::new(
            cluster,
            cla,
            local.as_ref(),
            old.as_deref(),
            self.certificates.as_ref(),
        ));
        let mut winner = fresh.clone();
        self.map.rcu(|map| {
            let mut map = HashMap::clone(map);
            // Forget clusters the current snapshot no longer has.
            map.retain(|name, _| snapshot.clusters.contains_key(name));
            match map.get(&*fresh.cluster.name) {
                Some(current)
                    if Arc::ptr_eq(&current.cla, &fresh.cla)
                        && Arc::ptr_eq(&current.cluster, &fresh.cluster) =>
                {
                    winner = current.clone();
                }
                _ => {
                    winner = fresh.clone();
                    map.insert(fresh.cluster.name.clone(), fresh.clone());
                }
            }
            map
        });
        // After the new map is in place: a cache that sees the new
        // generation also sees the new map.
        self.generation.fetch_add(1, Ordering::Release);
        winner
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.load().len()
    }
}

impl ClusterState {
    fn new(
        cluster: Arc<Cluster>,
        cla: Arc<ClusterLoadAssignment>,
        local: Option<&Locality>,
        old: Option<&ClusterState>,
        certificates: Option<&CertStore>,
    ) -> Self {
        let set = EndpointSet::new_for(&cla, local, cluster.locality_failover);
        let authorities = set
            .addresses()
            .iter()
            .map(|a| Authority::try_from(a.to_string()).ok())
            .collect::<Box<[_]>>();
        let active = set.addresses().iter().map(|_| AtomicU32::new(0)).collect();
        let no_labels: EndpointLabels = Arc::from([]);
        let by_address: HashMap<SocketAddr, &EndpointLabels> = cla
            .localities
            .iter()
            .flat_map(|l| l.endpoints.iter())
            .map(|e| (e.address, &e.labels))
            .collect();
        let labels = set
            .addresses()
            .iter()
            .map(|a| {
                by_address
                    .get(a)
                    .map_or_else(|| no_labels.clone(), |l| Arc::clone(l))
            })
            .collect();
        let now = Instant::now();
        let born: Box<[Option<Instant>]> = match old {
            None => set.addresses().iter().map(|_| None).collect(),
            Some(old) => {
                let before: HashMap<SocketAddr, Option<Instant>> = old
                    .set
                    .addresses()
                    .iter()
                    .copied()
                    .zip(old.born.iter().copied())
                    .collect();
                set.addresses()
                    .iter()
                    .map(|a| before.get(a).copied().unwrap_or(Some(now)))
                    .collect()
            }
        };
        let warm_until = match (cluster.slow_start, cluster.lb_policy) {
            (Some(window), LbPolicy::RoundRobin | LbPolicy::LeastRequest) => born
                .iter()
                .flatten()
                .max()
                .and_then(|latest| latest.checked_add(window))
                .filter(|until| *until > now),
            _ => None,
        };
        let outlier = cluster.outlier_detection.as_ref().map(|config| {
            match old.and_then(|o| o.outlier.as_ref()) {
                Some(previous) => previous.rebuild(config, set.addresses(), now),
                None => OutlierDetector::new(config, set.addresses(), now),
            }
        });
        let breaker = old.map(|o| o.breaker.clone()).unwrap_or_default();
        let retries = old.map(|o| o.retries.clone()).unwrap_or_default();
        let (tls, unusable) = match (&cluster.tls, certificates) {
            (None, _) => (None, None),
            // SIMPLE / MUTUAL (certificate files) need no workload certificate.
            (Some(upstream), store)
                if store.is_some() || upstream.origination != TlsOrigination::IstioMutual =>
            {
                // An upgraded HTTP/1.1 cluster speaks h2: its ALPN must say so.
                let protocol = if cluster.connection.h2_upgrade {
                    Protocol::Http2
                } else {
                    cluster.protocol
                };
                match ClusterTls::new(store, upstream, protocol) {
                    Ok(tls) => (Some(tls), None),
                    Err(e) => (
                        None,
                        Some(Arc::from(format!(
                            "cluster {} requires TLS ({}) but the TLS client cannot be set \
                             up: {e}",
                            cluster.name,
                            match &upstream.origination {
                                TlsOrigination::IstioMutual => "ISTIO_MUTUAL",
                                TlsOrigination::Files(files) => files.mode(),
                            }
                        ))),
                    ),
                }
            }
            (Some(_), _) => (
                None,
                Some(Arc::from(format!(
                    "cluster {} requires mTLS (ISTIO_MUTUAL) but this client has no workload \
                     certificate: configure certificate_providers.mesh in the bootstrap",
                    cluster.name
                ))),
            ),
        };
        let connections = ClusterConnections(Arc::new(TargetCluster {
            name: cluster.name.clone(),
            protocol: cluster.protocol,
            policy: Some(ConnectionPolicy {
                breaker: breaker.clone(),
                limits: cluster.circuit_breakers.clone(),
                settings: cluster.connection.clone(),
                tls,
            }),
        }));
        ClusterState {
            next: AtomicU64::new(old.map_or(0, |o| o.next.load(Ordering::Relaxed))),
            born,
            warm_until,
            cluster,
            cla,
            set,
            authorities,
            labels,
            no_labels,
            active,
            outlier,
            breaker,
            retries,
            connections,
            unusable,
        }
    }

    /// The cluster's config.
    pub(crate) fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The cluster name.
    pub(crate) fn name(&self) -> &Name {
        &self.cluster.name
    }

    /// Number of endpoints.
    pub(crate) fn len(&self) -> usize {
        self.set.len()
    }

    pub(crate) fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    pub(crate) fn retries(&self) -> &RetryLimiter {
        &self.retries
    }

    pub(crate) fn connections(&self) -> &ClusterConnections {
        &self.connections
    }

    /// Why requests to this cluster cannot be sent: it requires mTLS and
    /// the client has no certificate (or no usable TLS config).
    pub(crate) fn unusable(&self) -> Option<&Arc<str>> {
        self.unusable.as_ref()
    }

    /// Endpoints ejected now.
    pub(crate) fn ejected(&self) -> u32 {
        self.outlier
            .as_ref()
            .map_or(0, |o| o.ejected_count(Instant::now()))
    }

    /// Picks an endpoint and counts a request in flight to it until the
    /// returned guard is dropped. Ejected endpoints are skipped (unless in
    /// panic mode); endpoints for which `avoid` is true are picked only when
    /// no other is eligible (`spill`: in another locality tier first).
    /// `None` when no endpoint is eligible.
    pub(crate) fn pick(
        self: &Arc<Self>,
        hash: Option<u64>,
        rng: &mut impl Rng,
        avoid: Option<&dyn Fn(usize) -> bool>,
        spill: bool,
    ) -> Option<ActiveGuard> {
        let policy = self.cluster.lb_policy;
        let counter = match policy {
            mesh_core::model::LbPolicy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
        let active = |i: usize| self.in_flight(i);
        if let Some(until) = self.warm_until {
            let now = Instant::now();
            if now < until {
                return self.pick_warming(hash, rng, avoid, spill, counter, now);
            }
        }
        let index = match (&self.outlier, avoid) {
            (None, None) => self.set.pick_with(
                policy,
                hash,
                &mut || rng.random(),
                counter,
                active,
                &PickFilter::ALL,
            ),
            (outlier, avoid) => {
                let now = Instant::now();
                let never = |_: usize| false;
                let eligible_all = |_: usize| true;
                let ejections = outlier.as_ref().map(|o| o.eligible(now));
                let eligible: &dyn Fn(usize) -> bool = match &ejections {
                    Some(e) => e,
                    None => &eligible_all,
                };
                let filter = PickFilter {
                    eligible,
                    avoid: avoid.unwrap_or(&never),
                    spill,
                };
                self.set
                    .pick_with(policy, hash, &mut || rng.random(), counter, active, &filter)
            }
        }?;
        // An index past the addresses would make the guard's address
        // lookup panic: `active` is as long as the addresses.
        self.active.get(index)?.fetch_add(1, Ordering::Relaxed);
        Some(ActiveGuard {
            state: self.clone(),
            index,
        })
    }

    /// [`pick`](Self::pick) while some endpoint is in its slow start
    /// window (rare: the allocation-free fast path is `pick`'s).
    fn pick_warming(
        self: &Arc<Self>,
        hash: Option<u64>,
        rng: &mut impl Rng,
        avoid: Option<&dyn Fn(usize) -> bool>,
        spill: bool,
        counter: u64,
        now: Instant,
    ) -> Option<ActiveGuard> {
        let window = self.cluster.slow_start?;
        let never = |_: usize| false;
        let eligible_all = |_: usize| true;
        let ejections = self.outlier.as_ref().map(|o| o.eligible(now));
        let eligible: &dyn Fn(usize) -> bool = match &ejections {
            Some(e) => e,
            None => &eligible_all,
        };
        let filter = PickFilter {
            eligible,
            avoid: avoid.unwrap_or(&never),
            spill,
        };
        let factor = |i: usize| match self.born.get(i).copied().flatten() {
            Some(born) => slow_start_factor(now.saturating_duration_since(born), window),
            None => 1.0,
        };
        let index = self.set.pick_warming(
            self.cluster.lb_policy,
            hash,
            &mut || rng.random(),
            counter,
            |i| self.in_flight(i),
            &filter,
            &factor,
        )?;
        self.active.get(index)?.fetch_add(1, Ordering::Relaxed);
        Some(ActiveGuard {
            state: self.clone(),
            index,
        })
    }

    /// Reports the result of an attempt on endpoint `index` to outlier
    /// detection; returns the ejection it caused.
    pub(crate) fn report(&self, index: usize, result: ResultClass) -> Option<Ejection> {
        self.outlier
            .as_ref()?
            .on_result(index, result, Instant::now())
    }

    /// Requests in flight to endpoint `i`.
    pub(crate) fn in_flight(&self, i: usize) -> u32 {
        self.active.get(i).map_or(0, |a| a.load(Ordering::Relaxed))
    }
}

/// One request in flight to one endpoint; dropping it ends the count.
#[derive(Debug)]
pub(crate) struct ActiveGuard {
    /// The endpoint's address and authority are read from the state by
    /// index: the guard is two words, moved with every attempt and held by
    /// every response body, and a pick clones nothing but the state.
    state: Arc<ClusterState>,
    index: usize,
}

impl ActiveGuard {
    pub(crate) fn address(&self) -> SocketAddr {
        self.state.set.addresses()[self.index]
    }

    /// The endpoint's index in its cluster state.
    pub(crate) fn index(&self) -> usize {
        self.index
    }

    /// The address as a URI authority (`None` only for an address a URI
    /// cannot carry, such as an IPv6 literal with a zone).
    pub(crate) fn authority(&self) -> Option<&Authority> {
        self.state.authorities.get(self.index)?.as_ref()
    }

    pub(crate) fn cluster_state(&self) -> &Arc<ClusterState> {
        &self.state
    }

    /// The endpoint's EDS labels.
    pub(crate) fn labels(&self) -> &EndpointLabels {
        self.state
            .labels
            .get(self.index)
            .unwrap_or(&self.state.no_labels)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if let Some(a) = self.state.active.get(self.index) {
            a.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::model::{Endpoint, LbPolicy, LocalityEndpoints};

    fn cla(name: &str, ports: &[u16]) -> Arc<ClusterLoadAssignment> {
        let endpoints = ports
            .iter()
            .map(|p| Endpoint {
                address: SocketAddr::from(([127, 0, 0, 1], *p)),
                weight: 1,
                labels: Arc::from([]),
            })
            .collect();
        Arc::new(
            ClusterLoadAssignment::new(
                name.into(),
                vec![LocalityEndpoints {
                    locality: Locality::default(),
                    weight: 1,
                    priority: 0,
                    endpoints,
                }],
            )
            .unwrap(),
        )
    }

    fn snapshot(clas: &[Arc<ClusterLoadAssignment>], policy: LbPolicy) -> Snapshot {
        let mut s = Snapshot::default();
        for c in clas {
            s.endpoints.insert(c.cluster_name.clone(), c.clone());
            s.clusters.insert(
                c.cluster_name.clone(),
                Arc::new(Cluster {
                    lb_policy: policy,
                    ..Cluster::new(c.cluster_name.clone(), Protocol::Http1)
                }),
            );
        }
        s
    }

    fn state(states: &ClusterStates, snap: &Snapshot, name: &str) -> Arc<ClusterState> {
        let cluster = snap.clusters.get(name).unwrap();
        let cla = snap.endpoints.get(name).unwrap();
        states.get(snap, cluster, cla, || None)
    }

    #[test]
    fn a_cached_state_is_the_maps_even_after_its_cluster_was_forgotten_and_added_again() {
        let states = ClusterStates::default();
        let with_a = snapshot(&[cla("a", &[1]), cla("b", &[2])], LbPolicy::RoundRobin);
        let mut cache = StateCache::default();
        let mut cached = |snap: &Snapshot, name: &str| {
            let cluster = snap.clusters.get(name).unwrap();
            let cla = snap.endpoints.get(name).unwrap();
            states.get_cached(&mut cache, snap, cluster, cla, || None)
        };
        let first = cached(&with_a, "a");
        assert!(Arc::ptr_eq(&first, &cached(&with_a, "a")));
        assert!(Arc::ptr_eq(&first, &state(&states, &with_a, "a")));
        // A snapshot without "a": building "b"'s state forgets "a"'s.
        let without_a = snapshot(&[cla("b", &[3])], LbPolicy::RoundRobin);
        state(&states, &without_a, "b");
        // "a" comes back with the very same resources: the map builds its
        // state afresh, and the cache answers with the map's, not its own.
        let again = state(&states, &with_a, "a");
        assert!(!Arc::ptr_eq(&first, &again));
        let mut cached = |snap: &Snapshot, name: &str| {
            let cluster = snap.clusters.get(name).unwrap();
            let cla = snap.endpoints.get(name).unwrap();
            states.get_cached(&mut cache, snap, cluster, cla, || None)
        };
        assert!(Arc::ptr_eq(&again, &cached(&with_a, "a")));
    }

    #[test]
    fn state_is_reused_until_the_assignment_changes() {
        let states = ClusterStates::default();
        let snap = snapshot(&[cla("a", &[1, 2])], LbPolicy::LeastRequest);
        let s1 = state(&states, &snap, "a");
        let s2 = state(&states, &snap, "a");
        assert!(Arc::ptr_eq(&s1, &s2));

        let snap2 = snapshot(&[cla("a", &[1, 2, 3])], LbPolicy::LeastRequest);
        let s3 = state(&states, &snap2, "a");
        assert!(!Arc::ptr_eq(&s1, &s3));
        assert_eq!(s3.len(), 3);
    }

    #[test]
    fn clusters_gone_from_the_snapshot_are_forgotten() {
        let states = ClusterStates::default();
        let snap = snapshot(&[cla("a", &[1]), cla("b", &[2])], LbPolicy::LeastRequest);
        state(&states, &snap, "a");
        state(&states, &snap, "b");
        assert_eq!(states.len(), 2);
        let snap2 = snapshot(&[cla("a", &[3])], LbPolicy::LeastRequest);
        state(&states, &snap2, "a");
        assert_eq!(states.len(), 1);
    }

    #[test]
    fn guards_count_requests_in_flight() {
        let states = ClusterStates::default();
        let snap = snapshot(&[cla("a", &[1])], LbPolicy::LeastRequest);
        let state = state(&states, &snap, "a");
        let mut rng = rand::rng();
        let g1 = state.pick(None, &mut rng, None, false).unwrap();
        let g2 = state.pick(None, &mut rng, None, false).unwrap();
        assert_eq!(state.in_flight(0), 2);
        assert_eq!(g1.authority().unwrap().as_str(), "127.0.0.1:1");
        drop(g1);
        drop(g2);
        assert_eq!(state.in_flight(0), 0);
    }

    #[test]
    fn round_robin_alternates() {
        let states = ClusterStates::default();
        let snap = snapshot(&[cla("a", &[1, 2])], LbPolicy::RoundRobin);
        let state = state(&states, &snap, "a");
        let mut rng = rand::rng();
        let ports: Vec<u16> = (0..4)
            .map(|_| {
                state
                    .pick(None, &mut rng, None, false)
                    .unwrap()
                    .address()
                    .port()
            })
            .collect();
        assert_eq!(ports, vec![1, 2, 1, 2]);
    }

    #[test]
    fn avoided_endpoints_are_picked_only_when_nothing_else_is_left() {
        let states = ClusterStates::default();
        let snap = snapshot(&[cla("a", &[1, 2, 3])], LbPolicy::Random);
        let state = state(&states, &snap, "a");
        let mut rng = rand::rng();
        for _ in 0..100 {
            let tried = |i: usize| i != 2;
            let g = state.pick(None, &mut rng, Some(&tried), false).unwrap();
            assert_eq!(g.address().port(), 3);
        }
        let all = |_: usize| true;
        assert!(state.pick(None, &mut rng, Some(&all), false).is_some());
    }

    #[test]
    fn breaker_counts_survive_an_endpoint_update() {
        let states = ClusterStates::default();
        let snap = snapshot(&[cla("a", &[1])], LbPolicy::RoundRobin);
        let s1 = state(&states, &snap, "a");
        let permit = s1
            .breaker()
            .try_request(&s1.cluster().circuit_breakers)
            .unwrap();
        let snap2 = snapshot(&[cla("a", &[1, 2])], LbPolicy::RoundRobin);
        let s2 = state(&states, &snap2, "a");
        assert_eq!(s2.breaker().active_requests(), 1);
        drop(permit);
        assert_eq!(s2.breaker().active_requests(), 0);
    }
}

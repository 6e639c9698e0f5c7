//! Per-cluster balancing state: what the pure pick in
//! [`mesh_core::lb::EndpointSet`] needs from the process.
//!
//! The pick itself is a function of the endpoint set, a random number, a
//! round-robin counter and the number of requests in flight per endpoint
//! (Envoy's least-request and round-robin balancers keep the same state). The
//! state lives here, one [`ClusterState`] per received
//! `ClusterLoadAssignment`, in a read-mostly map: requests load the map
//! through an atomic pointer and compare the assignment by pointer identity;
//! only the first request after an EDS update rebuilds the entry. In-flight
//! counts start at zero for a new assignment; requests still in flight
//! decrement the counters of the state they were picked from.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use http::uri::Authority;
use mesh_core::Snapshot;
use mesh_core::lb::EndpointSet;
use mesh_core::model::{ClusterLoadAssignment, LbPolicy, Name};
use rand::Rng;

/// The balancing state of every cluster the process has sent to.
#[derive(Debug, Default)]
pub(crate) struct ClusterStates {
    map: ArcSwap<HashMap<Name, Arc<ClusterState>>>,
}

/// The balancing state of one `ClusterLoadAssignment`.
#[derive(Debug)]
pub(crate) struct ClusterState {
    cla: Arc<ClusterLoadAssignment>,
    set: EndpointSet,
    /// Each address as a URI authority, built once (for URI rewriting).
    authorities: Box<[Option<Authority>]>,
    /// Requests in flight per endpoint (least-request).
    active: Box<[AtomicU32]>,
    /// The round-robin counter.
    next: AtomicU64,
}

impl ClusterStates {
    /// The state for `cla`, the assignment of EDS name `eds_name` in
    /// `snapshot`; built on first use and after every change.
    pub(crate) fn get(
        &self,
        snapshot: &Snapshot,
        eds_name: &Name,
        cla: &ClusterLoadAssignment,
    ) -> Arc<ClusterState> {
        if let Some(state) = self.map.load().get(&**eds_name)
            && std::ptr::eq(Arc::as_ptr(&state.cla), cla)
        {
            return state.clone();
        }
        self.rebuild(snapshot, eds_name, cla)
    }

    #[cold]
    fn rebuild(
        &self,
        snapshot: &Snapshot,
        eds_name: &Name,
        cla: &ClusterLoadAssignment,
    ) -> Arc<ClusterState> {
        let shared = snapshot
            .endpoints
            .get(&**eds_name)
            .filter(|c| std::ptr::eq(Arc::as_ptr(c), cla))
            .cloned()
            .unwrap_or_else(|| Arc::new(cla.clone()));
        let start = self
            .map
            .load()
            .get(&**eds_name)
            .map_or(0, |old| old.next.load(Ordering::Relaxed));
        let fresh = Arc::new(ClusterState::new(shared, start));
        let mut winner = fresh.clone();
        self.map.rcu(|map| {
            let mut map = HashMap::clone(map);
            // Forget clusters the current snapshot no longer has.
            map.retain(|name, _| snapshot.endpoints.contains_key(name));
            match map.get(&**eds_name) {
                Some(current) if Arc::ptr_eq(&current.cla, &fresh.cla) => {
                    winner = current.clone();
                }
                _ => {
                    winner = fresh.clone();
                    map.insert(eds_name.clone(), fresh.clone());
                }
            }
            map
        });
        winner
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.load().len()
    }
}

impl ClusterState {
    fn new(cla: Arc<ClusterLoadAssignment>, start: u64) -> Self {
        let set = EndpointSet::new(&cla);
        let authorities = set
            .addresses()
            .iter()
            .map(|a| Authority::try_from(a.to_string()).ok())
            .collect::<Box<[_]>>();
        let active = set.addresses().iter().map(|_| AtomicU32::new(0)).collect();
        ClusterState {
            cla,
            set,
            authorities,
            active,
            next: AtomicU64::new(start),
        }
    }

    /// The EDS resource name.
    pub(crate) fn name(&self) -> &str {
        &self.cla.cluster_name
    }

    /// Picks an endpoint and counts a request in flight to it until the
    /// returned guard is dropped. `None` when the cluster has no endpoints.
    pub(crate) fn pick(
        self: &Arc<Self>,
        policy: LbPolicy,
        rng: &mut impl Rng,
    ) -> Option<ActiveGuard> {
        let counter = match policy {
            LbPolicy::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed),
            LbPolicy::LeastRequest | LbPolicy::Random | LbPolicy::RingHash { .. } => 0,
        };
        let index = self
            .set
            .pick(policy, &mut || rng.random(), counter, |i| self.in_flight(i))?;
        let address = *self.set.addresses().get(index)?;
        let authority = self.authorities.get(index).cloned().flatten();
        self.active.get(index)?.fetch_add(1, Ordering::Relaxed);
        Some(ActiveGuard {
            state: self.clone(),
            index,
            address,
            authority,
        })
    }

    /// Requests in flight to endpoint `i`.
    pub(crate) fn in_flight(&self, i: usize) -> u32 {
        self.active.get(i).map_or(0, |a| a.load(Ordering::Relaxed))
    }
}

/// One request in flight to one endpoint; dropping it ends the count.
#[derive(Debug)]
pub(crate) struct ActiveGuard {
    state: Arc<ClusterState>,
    index: usize,
    address: SocketAddr,
    authority: Option<Authority>,
}

impl ActiveGuard {
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }

    /// The address as a URI authority (`None` only for an address a URI
    /// cannot carry, such as an IPv6 literal with a zone).
    pub(crate) fn authority(&self) -> Option<&Authority> {
        self.authority.as_ref()
    }

    pub(crate) fn cluster_state(&self) -> &ClusterState {
        &self.state
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
    use mesh_core::model::{Endpoint, Locality, LocalityEndpoints};

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

    fn snapshot(clas: &[Arc<ClusterLoadAssignment>]) -> Snapshot {
        let mut s = Snapshot::default();
        for c in clas {
            s.endpoints.insert(c.cluster_name.clone(), c.clone());
        }
        s
    }

    #[test]
    fn state_is_reused_until_the_assignment_changes() {
        let states = ClusterStates::default();
        let a = cla("a", &[1, 2]);
        let snap = snapshot(std::slice::from_ref(&a));
        let name: Name = "a".into();
        let s1 = states.get(&snap, &name, &a);
        let s2 = states.get(&snap, &name, &a);
        assert!(Arc::ptr_eq(&s1, &s2));

        let a2 = cla("a", &[1, 2, 3]);
        let snap2 = snapshot(std::slice::from_ref(&a2));
        let s3 = states.get(&snap2, &name, &a2);
        assert!(!Arc::ptr_eq(&s1, &s3));
        assert_eq!(s3.set.len(), 3);
    }

    #[test]
    fn clusters_gone_from_the_snapshot_are_forgotten() {
        let states = ClusterStates::default();
        let a = cla("a", &[1]);
        let b = cla("b", &[2]);
        let snap = snapshot(&[a.clone(), b.clone()]);
        states.get(&snap, &"a".into(), &a);
        states.get(&snap, &"b".into(), &b);
        assert_eq!(states.len(), 2);
        let a2 = cla("a", &[3]);
        let snap2 = snapshot(std::slice::from_ref(&a2));
        states.get(&snap2, &"a".into(), &a2);
        assert_eq!(states.len(), 1);
    }

    #[test]
    fn guards_count_requests_in_flight() {
        let states = ClusterStates::default();
        let a = cla("a", &[1]);
        let snap = snapshot(std::slice::from_ref(&a));
        let state = states.get(&snap, &"a".into(), &a);
        let mut rng = rand::rng();
        let g1 = state.pick(LbPolicy::LeastRequest, &mut rng).unwrap();
        let g2 = state.pick(LbPolicy::LeastRequest, &mut rng).unwrap();
        assert_eq!(state.in_flight(0), 2);
        assert_eq!(g1.authority().unwrap().as_str(), "127.0.0.1:1");
        drop(g1);
        drop(g2);
        assert_eq!(state.in_flight(0), 0);
    }

    #[test]
    fn round_robin_alternates() {
        let states = ClusterStates::default();
        let a = cla("a", &[1, 2]);
        let snap = snapshot(std::slice::from_ref(&a));
        let state = states.get(&snap, &"a".into(), &a);
        let mut rng = rand::rng();
        let ports: Vec<u16> = (0..4)
            .map(|_| {
                state
                    .pick(LbPolicy::RoundRobin, &mut rng)
                    .unwrap()
                    .address()
                    .port()
            })
            .collect();
        assert_eq!(ports, vec![1, 2, 1, 2]);
    }
}

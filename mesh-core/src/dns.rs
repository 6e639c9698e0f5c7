//! DNS clusters: when to resolve a name again, and the endpoints an answer
//! makes (the pure half; the resolving is done by the I/O crates: this
//! mesh's xDS client for its own DNS clusters, mesh-control for the gRPC
//! clients it serves them to as EDS).
//!
//! # When to resolve again
//!
//! An answer is good for its TTL (the smallest of its records'), and is
//! asked again when that runs out, clamped to
//! [`MIN_REFRESH`]..=[`MAX_REFRESH`]: a TTL of 0 (common behind load
//! balancers that rotate answers) must not turn into a query loop, and a
//! TTL of a day must not keep a moved service's old address for a day.
//! Envoy does the same with `respect_dns_ttl` (its refresh rate bounds it).
//! A failed lookup (timeout, SERVFAIL, no server) keeps the last answer,
//! as Envoy keeps a STRICT_DNS cluster's hosts, and is retried after
//! [`retry_after`]: 1 s, doubling, capped at [`MAX_RETRY`]. A name that
//! does not exist (NXDOMAIN, or no address records) is an empty answer,
//! not a failure: the cluster has no endpoints, and calls to it fail
//! "no healthy upstream" until the name resolves.
//!
//! # The endpoints of an answer
//!
//! STRICT_DNS (Istio `resolution: DNS`): every address of every host is
//! an endpoint, on the host's port (duplicates once). LOGICAL_DNS
//! (`DNS_ROUND_ROBIN`): the first address of each host only, as Envoy
//! connects a logical DNS cluster to the first address of its latest
//! answer. Endpoints are in one locality, weight 1 each.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::model::{
    ClusterLoadAssignment, DnsDiscovery, Endpoint, Locality, LocalityEndpoints, Name,
};

/// The shortest wait before a name is resolved again, whatever its TTL.
pub const MIN_REFRESH: Duration = Duration::from_secs(1);
/// The longest wait before a name is resolved again, whatever its TTL.
pub const MAX_REFRESH: Duration = Duration::from_secs(300);
/// The longest wait before a failed lookup is tried again.
pub const MAX_RETRY: Duration = Duration::from_secs(30);

/// When to resolve again after an answer whose records live `ttl`
/// (`None`: the answer had no TTL, e.g. an empty one): the TTL clamped to
/// [`MIN_REFRESH`]..=[`MAX_REFRESH`]; no TTL waits [`MIN_REFRESH`] × 5.
pub fn refresh_after(ttl: Option<Duration>) -> Duration {
    ttl.unwrap_or(MIN_REFRESH * 5)
        .clamp(MIN_REFRESH, MAX_REFRESH)
}

/// When to try again after the `failures`-th failed lookup in a row
/// (1 for the first): 1 s, 2 s, 4 s, ... capped at [`MAX_RETRY`].
pub fn retry_after(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (MIN_REFRESH * (1u32 << doublings)).min(MAX_RETRY)
}

/// The endpoints of a DNS cluster under the answers for its hosts:
/// `answers[i]` holds the addresses of `dns.hosts[i]` (a host without an
/// answer yet has none). See the module docs for strict and logical.
pub fn assignment(
    eds_name: Name,
    dns: &DnsDiscovery,
    answers: &[Arc<[IpAddr]>],
) -> ClusterLoadAssignment {
    let mut endpoints: Vec<Endpoint> = Vec::new();
    for (host, addresses) in dns.hosts.iter().zip(answers) {
        let take = if dns.logical { 1 } else { addresses.len() };
        for ip in addresses.iter().take(take) {
            let address = SocketAddr::new(*ip, host.port);
            if endpoints.iter().all(|e| e.address != address) {
                endpoints.push(Endpoint {
                    address,
                    weight: 1,
                    labels: Arc::from([]),
                });
            }
        }
    }
    let localities: Arc<[LocalityEndpoints]> = if endpoints.is_empty() {
        Arc::from([])
    } else {
        Arc::from([LocalityEndpoints {
            locality: Locality::default(),
            weight: 1,
            priority: 0,
            endpoints: endpoints.into(),
        }])
    };
    ClusterLoadAssignment {
        cluster_name: eds_name,
        localities,
    }
}

/// What a resolver knows of one name.
#[derive(Debug, Clone)]
struct NameState {
    /// The last answer (empty until one arrives, and for a name that does
    /// not exist).
    addresses: Arc<[IpAddr]>,
    /// When to ask again.
    due: Instant,
    /// Failed lookups in a row.
    failures: u32,
}

/// The names a resolver keeps resolved and when each is due: the state
/// machine the I/O drivers run (ask [`Resolutions::due`], look each up,
/// report with [`Resolutions::answered`] / [`Resolutions::failed`], sleep
/// until [`Resolutions::next_due`] or a config change).
#[derive(Debug, Clone, Default)]
pub struct Resolutions {
    names: BTreeMap<Name, NameState>,
}

impl Resolutions {
    /// Keeps exactly `wanted` (new names are due at once, dropped names are
    /// forgotten).
    pub fn want(&mut self, wanted: &BTreeSet<Name>, now: Instant) {
        self.names.retain(|name, _| wanted.contains(name));
        for name in wanted {
            self.names.entry(name.clone()).or_insert_with(|| NameState {
                addresses: Arc::from([]),
                due: now,
                failures: 0,
            });
        }
    }

    /// The names due for a lookup at `now`.
    pub fn due(&self, now: Instant) -> Vec<Name> {
        self.names
            .iter()
            .filter(|(_, s)| s.due <= now)
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// When the next name is due (`None`: no name).
    pub fn next_due(&self) -> Option<Instant> {
        self.names.values().map(|s| s.due).min()
    }

    /// `name` resolved to `addresses` (empty: it does not exist) living
    /// `ttl`; true when its addresses changed.
    pub fn answered(
        &mut self,
        name: &str,
        addresses: Vec<IpAddr>,
        ttl: Option<Duration>,
        now: Instant,
    ) -> bool {
        let Some(state) = self.names.get_mut(name) else {
            return false;
        };
        state.failures = 0;
        state.due = now + refresh_after(ttl);
        if *state.addresses == *addresses {
            return false;
        }
        state.addresses = addresses.into();
        true
    }

    /// The lookup of `name` failed: its last answer stays, and it is due
    /// again after [`retry_after`].
    pub fn failed(&mut self, name: &str, now: Instant) {
        if let Some(state) = self.names.get_mut(name) {
            state.failures = state.failures.saturating_add(1);
            state.due = now + retry_after(state.failures);
        }
    }

    /// The last answer for `name` (empty when none).
    pub fn addresses(&self, name: &str) -> Arc<[IpAddr]> {
        self.names
            .get(name)
            .map_or_else(|| Arc::from([]), |s| s.addresses.clone())
    }

    /// The endpoints of a DNS cluster under the answers so far (see
    /// [`assignment`]).
    pub fn assignment(&self, eds_name: Name, dns: &DnsDiscovery) -> ClusterLoadAssignment {
        let answers: Vec<Arc<[IpAddr]>> =
            dns.hosts.iter().map(|h| self.addresses(&h.name)).collect();
        assignment(eds_name, dns, &answers)
    }
}

/// The DNS clusters of `clusters` (EDS name → what it resolves) and every
/// name they need.
pub fn dns_clusters<'a>(
    clusters: impl IntoIterator<Item = &'a crate::model::Cluster>,
) -> (BTreeMap<Name, DnsDiscovery>, BTreeSet<Name>) {
    let mut out = BTreeMap::new();
    let mut names = BTreeSet::new();
    for c in clusters {
        if let Some(dns) = c.discovery.dns() {
            names.extend(dns.hosts.iter().map(|h| h.name.clone()));
            out.insert(c.eds_service_name.clone(), dns.clone());
        }
    }
    (out, names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DnsHost;

    #[test]
    fn the_ttl_is_clamped() {
        assert_eq!(refresh_after(Some(Duration::ZERO)), MIN_REFRESH);
        assert_eq!(
            refresh_after(Some(Duration::from_secs(30))),
            Duration::from_secs(30)
        );
        assert_eq!(
            refresh_after(Some(Duration::from_secs(86_400))),
            MAX_REFRESH
        );
        assert_eq!(refresh_after(None), Duration::from_secs(5));
    }

    #[test]
    fn failures_back_off_to_a_cap() {
        let waits: Vec<u64> = (1..=7).map(|n| retry_after(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(retry_after(0), MIN_REFRESH);
        assert_eq!(retry_after(u32::MAX), MAX_RETRY);
    }

    fn dns(logical: bool) -> DnsDiscovery {
        DnsDiscovery {
            hosts: Arc::from([
                DnsHost {
                    name: "a.example.com".into(),
                    port: 443,
                },
                DnsHost {
                    name: "b.example.com".into(),
                    port: 8443,
                },
            ]),
            logical,
        }
    }

    fn ips(list: &[&str]) -> Arc<[IpAddr]> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn strict_takes_every_address_once() {
        let answers = [ips(&["10.0.0.1", "10.0.0.2", "10.0.0.1"]), ips(&["::1"])];
        let cla = assignment("c".into(), &dns(false), &answers);
        let got: Vec<String> = cla.localities[0]
            .endpoints
            .iter()
            .map(|e| e.address.to_string())
            .collect();
        assert_eq!(got, ["10.0.0.1:443", "10.0.0.2:443", "[::1]:8443"]);
        assert!(ClusterLoadAssignment::new("c".into(), cla.localities.to_vec()).is_ok());
    }

    #[test]
    fn logical_takes_the_first_address_of_each_host() {
        let answers = [ips(&["10.0.0.2", "10.0.0.1"]), ips(&[])];
        let cla = assignment("c".into(), &dns(true), &answers);
        assert_eq!(cla.endpoint_count(), 1);
        assert_eq!(
            cla.localities[0].endpoints[0].address.to_string(),
            "10.0.0.2:443"
        );
    }

    #[test]
    fn names_are_due_at_once_then_on_their_ttl_and_failures_keep_the_answer() {
        let t0 = Instant::now();
        let mut r = Resolutions::default();
        let wanted: BTreeSet<Name> = ["a.example.com".into(), "b.example.com".into()].into();
        r.want(&wanted, t0);
        assert_eq!(r.due(t0).len(), 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(r.answered("a.example.com", vec![ip], Some(Duration::from_secs(2)), t0));
        assert!(!r.answered("a.example.com", vec![ip], Some(Duration::from_secs(2)), t0));
        r.failed("b.example.com", t0);
        assert_eq!(r.next_due(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(
            r.due(t0 + Duration::from_secs(1)),
            [Name::from("b.example.com")]
        );
        assert_eq!(r.due(t0 + Duration::from_secs(2)).len(), 2);
        // A failure keeps the last answer.
        r.failed("a.example.com", t0);
        assert_eq!(&*r.addresses("a.example.com"), &[ip]);
        let cla = r.assignment("c".into(), &dns(false));
        assert_eq!(cla.endpoint_count(), 1);
        // A name no longer wanted is forgotten.
        r.want(&["b.example.com".into()].into(), t0);
        assert!(r.addresses("a.example.com").is_empty());
    }

    #[test]
    fn no_address_is_no_locality() {
        let cla = assignment("c".into(), &dns(false), &[]);
        assert!(cla.localities.is_empty());
    }
}

//! The validated config model: what a client needs to route a request.
//!
//! The model mirrors the four xDS resource kinds a gRPC proxyless client reads
//! (gRFC A27/A28): a [`Listener`] per name an app dials, pointing at a
//! [`RouteConfig`] of virtual hosts and ordered routes, whose actions name
//! [`Cluster`]s, whose members come from a [`ClusterLoadAssignment`]. Keeping
//! that shape (rather than a pre-resolved one) means the xDS conversion is a
//! one-to-one mapping that round-trips, and a resource can change on its own
//! without rebuilding the others.
//!
//! Every type is immutable once built and cheap to clone (`Arc` inside), so a
//! snapshot can be shared by every request of a process through a single
//! atomic pointer load. Constructors validate: a weighted route whose weights
//! are all zero, or a locality without weight, cannot be represented.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::Error;

/// A shared, immutable string: names are cloned into many places of a snapshot.
pub type Name = Arc<str>;

/// A listener: one name an application dials (`catalog`, `catalog:8080`,
/// `catalog.shop.svc.cluster.local:8080`) and the route table that serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// The name as dialed; also the xDS resource name (gRPC's `xds:///<name>`).
    pub name: Name,
    /// Name of the [`RouteConfig`] to fetch over RDS.
    pub route_config_name: Name,
}

/// A route table: virtual hosts selected by the request's host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// The RDS resource name.
    pub name: Name,
    /// Virtual hosts; the one whose domains best match the host wins.
    pub virtual_hosts: Arc<[VirtualHost]>,
}

/// A set of domains and the ordered routes that serve them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirtualHost {
    /// A name for status and traces.
    pub name: Name,
    /// Domains, matched as Envoy does: exact, then `*.suffix` / `prefix*`, then `*`.
    /// Stored lower-case.
    pub domains: Arc<[Name]>,
    /// Routes in order: the first that matches wins, as in Istio.
    pub routes: Arc<[Route]>,
}

/// One route: a match and what to do with a request that matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Name (Istio's `http[].name`, or a generated `<vs>.<index>`), shown in traces.
    pub name: Name,
    /// What a request must look like.
    pub matcher: RouteMatch,
    /// Where it goes.
    pub action: WeightedClusters,
}

/// The conditions of a route; all must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    /// The path condition (query string excluded).
    pub path: PathMatch,
    /// Header conditions. A method condition is a `:method` header condition, as in Envoy.
    pub headers: Arc<[HeaderMatch]>,
    /// Query parameter conditions.
    pub query_params: Arc<[QueryParamMatch]>,
}

impl RouteMatch {
    /// A match for every request: prefix `/`, nothing else.
    pub fn any() -> Self {
        RouteMatch {
            path: PathMatch::Prefix(Arc::from("/")),
            headers: Arc::from([]),
            query_params: Arc::from([]),
        }
    }
}

/// How a path is matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// The path starts with this string.
    Prefix(Name),
    /// The path is exactly this string.
    Exact(Name),
    /// The whole path matches this regular expression (RE2-like syntax, full match).
    Regex(Pattern),
}

/// A header condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Lower-case header name (`:method` for the method).
    pub name: Name,
    /// The condition on the value.
    pub value: ValueMatch,
    /// Negate the result (Envoy's `invert_match`).
    pub invert: bool,
}

/// A query parameter condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryParamMatch {
    /// The parameter name (case-sensitive, as in Envoy).
    pub name: Name,
    /// The condition on the value.
    pub value: ValueMatch,
}

/// A condition on a string value (header or query parameter).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueMatch {
    /// Equal to this string.
    Exact(Name),
    /// Starts with this string.
    Prefix(Name),
    /// Fully matches this regular expression.
    Regex(Pattern),
    /// Present (`true`) or absent (`false`), whatever its value.
    Present(bool),
}

/// A compiled regular expression that remembers its source, so that config
/// compares and round-trips by what the user wrote. Matching is a full match,
/// as Envoy's `safe_regex` (RE2) and Istio's `regex` are.
#[derive(Clone)]
pub struct Pattern {
    source: Name,
    compiled: regex::Regex,
}

impl Pattern {
    /// Compiles `source` for full-string matching.
    pub fn new(source: &str) -> Result<Self, Error> {
        let compiled = regex::Regex::new(&format!("^(?:{source})$"))
            .map_err(|e| Error::invalid(format!("invalid regex {source:?}: {e}")))?;
        Ok(Pattern {
            source: Arc::from(source),
            compiled,
        })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the whole of `s` matches.
    pub fn is_match(&self, s: &str) -> bool {
        self.compiled.is_match(s)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for Pattern {}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", self.source)
    }
}

/// The weighted destinations of a route. Weights are relative (they need not
/// sum to 100, as Istio now allows); at least one is positive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedClusters {
    clusters: Arc<[WeightedCluster]>,
    total: u64,
}

/// One destination of a route and its relative weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightedCluster {
    /// The cluster name (`outbound|8080|v1|catalog.shop.svc.cluster.local`).
    pub name: Name,
    /// Relative weight; 0 means "never", unless it is the only destination.
    pub weight: u32,
}

impl WeightedClusters {
    /// Validates: at least one destination, and a positive total weight
    /// (a single destination may carry weight 0: it then takes everything).
    pub fn new(clusters: Vec<WeightedCluster>) -> Result<Self, Error> {
        if clusters.is_empty() {
            return Err(Error::invalid("a route needs at least one destination"));
        }
        if clusters.len() == 1 {
            return Ok(WeightedClusters {
                clusters: clusters.into(),
                total: 0,
            });
        }
        let total: u64 = clusters.iter().map(|c| u64::from(c.weight)).sum();
        if total == 0 {
            return Err(Error::invalid("all destination weights are zero"));
        }
        Ok(WeightedClusters {
            clusters: clusters.into(),
            total,
        })
    }

    /// A route to one cluster.
    pub fn single(name: impl Into<Name>) -> Self {
        WeightedClusters {
            clusters: Arc::from([WeightedCluster {
                name: name.into(),
                weight: 0,
            }]),
            total: 0,
        }
    }

    /// The destinations in order.
    pub fn clusters(&self) -> &[WeightedCluster] {
        &self.clusters
    }

    /// Sum of the weights (0 for a single destination).
    pub fn total_weight(&self) -> u64 {
        self.total
    }

    /// Picks a destination: `random` is a uniformly random `u64`; the pick is
    /// `clusters[i]` with probability `weight[i] / total`. No allocation.
    pub fn pick(&self, random: u64) -> &WeightedCluster {
        if self.total == 0 {
            return &self.clusters[0];
        }
        // Multiply-shift maps a uniform u64 onto [0, total) without modulo bias
        // worth measuring (total < 2^40 in any sane config).
        let mut point = ((u128::from(random) * u128::from(self.total)) >> 64) as u64;
        for c in self.clusters.iter() {
            let w = u64::from(c.weight);
            if point < w {
                return c;
            }
            point -= w;
        }
        // Unreachable by construction; the last positive-weight cluster is a safe answer.
        self.clusters
            .iter()
            .rev()
            .find(|c| c.weight > 0)
            .unwrap_or(&self.clusters[0])
    }
}

/// The protocol a cluster's endpoints speak, from the ServiceEntry port protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 (prior knowledge, h2c when not TLS).
    Http2,
    /// gRPC: HTTP/2 whose status is read from `grpc-status`.
    Grpc,
}

impl Protocol {
    /// Whether connections use HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

/// How a cluster picks an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LbPolicy {
    /// Each endpoint in turn (weighted by locality and endpoint weight).
    RoundRobin,
    /// Power of two random choices, fewer active requests wins (Istio's default).
    LeastRequest,
    /// Uniformly random (weighted).
    Random,
}

/// An upstream cluster: a service port, or one subset of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// CDS resource name.
    pub name: Name,
    /// EDS resource name for its endpoints (defaults to `name`).
    pub eds_service_name: Name,
    /// Endpoint pick policy.
    pub lb_policy: LbPolicy,
    /// Upstream protocol.
    pub protocol: Protocol,
}

/// Where an endpoint runs, for locality-weighted balancing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Locality {
    /// Region.
    pub region: Name,
    /// Zone.
    pub zone: Name,
    /// Sub-zone.
    pub sub_zone: Name,
}

/// The members of a cluster, grouped by locality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterLoadAssignment {
    /// EDS resource name (the cluster's `eds_service_name`).
    pub cluster_name: Name,
    /// Localities with their weights and endpoints.
    pub localities: Arc<[LocalityEndpoints]>,
}

/// The endpoints of one locality.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalityEndpoints {
    /// Where they are.
    pub locality: Locality,
    /// Relative weight of this locality; positive (gRPC ignores localities without one).
    pub weight: u32,
    /// Priority (0 = highest); lower priorities serve only when higher ones are empty.
    pub priority: u32,
    /// The endpoints.
    pub endpoints: Arc<[Endpoint]>,
}

/// One upstream address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Where to connect.
    pub address: SocketAddr,
    /// Relative weight within the locality; positive.
    pub weight: u32,
    /// Labels (`version: v1`): used by the control server for subsets, carried
    /// for status and traces.
    pub labels: Arc<[(Name, Name)]>,
}

impl ClusterLoadAssignment {
    /// Validates: every locality has a positive weight, every endpoint a
    /// positive weight, and no address appears twice (gRPC NACKs both).
    pub fn new(cluster_name: Name, localities: Vec<LocalityEndpoints>) -> Result<Self, Error> {
        let mut seen = std::collections::HashSet::new();
        for (i, l) in localities.iter().enumerate() {
            if l.weight == 0 {
                return Err(Error::invalid(format!(
                    "endpoints[{i}].load_balancing_weight: a locality needs a positive weight"
                )));
            }
            for e in l.endpoints.iter() {
                if e.weight == 0 {
                    return Err(Error::invalid(format!(
                        "endpoints[{i}]: endpoint {} has weight 0",
                        e.address
                    )));
                }
                if !seen.insert(e.address) {
                    return Err(Error::invalid(format!(
                        "endpoints[{i}]: duplicate endpoint address {}",
                        e.address
                    )));
                }
            }
        }
        Ok(ClusterLoadAssignment {
            cluster_name,
            localities: localities.into(),
        })
    }

    /// Number of endpoints across localities.
    pub fn endpoint_count(&self) -> usize {
        self.localities.iter().map(|l| l.endpoints.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Each destination is picked with probability weight / total: the
        /// observed counts stay within z = 5 standard deviations of the
        /// binomial mean (plus z² of slack for small expected counts).
        #[test]
        fn weighted_pick_frequencies_match_weights(
            weights in proptest::collection::vec(1u32..1000, 2..6),
            seed in any::<u64>(),
        ) {
            const SAMPLES: u32 = 100_000;
            const Z: f64 = 5.0;
            let clusters = weights
                .iter()
                .enumerate()
                .map(|(i, &weight)| WeightedCluster { name: Name::from(i.to_string()), weight })
                .collect();
            let wc = WeightedClusters::new(clusters).unwrap();
            let total = f64::from(weights.iter().sum::<u32>());
            let mut rng = StdRng::seed_from_u64(seed);
            let mut counts = vec![0u32; weights.len()];
            for _ in 0..SAMPLES {
                let picked = wc.pick(rng.random::<u64>());
                let i: usize = picked.name.parse().unwrap();
                counts[i] += 1;
            }
            for (i, (&w, &count)) in weights.iter().zip(&counts).enumerate() {
                let p = f64::from(w) / total;
                let mean = f64::from(SAMPLES) * p;
                let sd = (mean * (1.0 - p)).sqrt();
                let deviation = (f64::from(count) - mean).abs();
                prop_assert!(
                    deviation <= Z * sd + Z * Z,
                    "cluster {i} weight {w}/{total}: {count} picks, expected {mean:.1} ± {sd:.1}"
                );
            }
        }
    }

    #[test]
    fn a_single_destination_takes_everything() {
        let wc = WeightedClusters::single("a");
        assert_eq!(wc.total_weight(), 0);
        for r in [0, 1, u64::MAX / 2, u64::MAX] {
            assert_eq!(&*wc.pick(r).name, "a");
        }
    }

    #[test]
    fn zero_weight_destinations_are_never_picked() {
        let wc = WeightedClusters::new(vec![
            WeightedCluster {
                name: "never".into(),
                weight: 0,
            },
            WeightedCluster {
                name: "always".into(),
                weight: 3,
            },
        ])
        .unwrap();
        for r in [0, 1, u64::MAX / 3, u64::MAX / 2, u64::MAX] {
            assert_eq!(&*wc.pick(r).name, "always");
        }
    }
}

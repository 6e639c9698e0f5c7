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
use std::time::Duration;

use crate::Error;

// Defined below the model, since `rbac` (which the model's server listener
// holds) names things too; re-exported here, where it has always been.
pub use crate::name::Name;

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
    /// Timeout, retries, fault injection and hashing for requests on this route.
    pub policy: RoutePolicy,
}

/// What Istio's `http[]` says about a route besides where it goes: timeout,
/// retries and fault injection (VirtualService), and the consistent-hash key
/// (DestinationRule `consistentHash`, which Envoy carries on the route).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutePolicy {
    /// Overall timeout of a request, retries included (Istio `timeout`);
    /// `None` = no timeout (Istio's default: disabled).
    pub timeout: Option<Duration>,
    /// Retry policy; `None` = no retries.
    pub retry: Option<RetryPolicy>,
    /// Fault injection; `None` = none.
    pub fault: Option<FaultPolicy>,
    /// How to compute the hash of a request for ring-hash clusters; the
    /// first policy that yields a key wins (Envoy semantics).
    pub hash_policy: Arc<[HashPolicy]>,
    /// Header changes, rewrites, mirrors, or an answer instead of a
    /// cluster ([`crate::traffic`]); `None` for a route that only routes
    /// (one pointer to check per request).
    pub traffic: Option<Arc<crate::traffic::Traffic>>,
    /// The local rate limit of the route's requests on the client side (an
    /// EnvoyFilter's `SIDECAR_OUTBOUND` patches for the calling workload,
    /// served as the route's `typed_per_filter_config`); `None`: none.
    pub rate_limit: Option<Arc<crate::ratelimit::RateLimitConfig>>,
}

/// Istio `retries` / Envoy `RetryPolicy` (gRFC A44 for gRPC clients).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Number of retries after the first attempt (Istio `attempts`).
    pub num_retries: u32,
    /// Timeout of each attempt (Istio `perTryTimeout`); `None` = the route timeout.
    pub per_try_timeout: Option<Duration>,
    /// The conditions that allow a retry.
    pub retry_on: RetryOn,
    /// Status codes retried under [`RetryOn::RETRIABLE_STATUS_CODES`].
    pub retriable_status_codes: Arc<[u16]>,
    /// Exponential backoff base (Envoy default 25 ms).
    pub backoff_base: Duration,
    /// Backoff cap (Envoy default 10 × base = 250 ms).
    pub backoff_max: Duration,
    /// Istio `retryRemoteLocalities`: a retry may leave the original locality.
    pub retry_remote_localities: bool,
}

impl RetryPolicy {
    /// Istio's default when a route says nothing: 2 retries on
    /// connect-failure, refused-stream, unavailable, cancelled and
    /// retriable-status-codes (503).
    pub fn istio_default() -> Self {
        RetryPolicy {
            num_retries: 2,
            per_try_timeout: None,
            retry_on: RetryOn::CONNECT_FAILURE
                | RetryOn::REFUSED_STREAM
                | RetryOn::UNAVAILABLE
                | RetryOn::CANCELLED
                | RetryOn::RETRIABLE_STATUS_CODES,
            retriable_status_codes: Arc::from([503u16]),
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            retry_remote_localities: false,
        }
    }
}

/// A set of retry conditions (Envoy `x-envoy-retry-on` / `x-envoy-retry-grpc-on`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RetryOn(u32);

impl RetryOn {
    /// Any 5xx, or a reset / connect failure.
    pub const FIVE_XX: RetryOn = RetryOn(1);
    /// 502, 503, 504, or a reset / connect failure.
    pub const GATEWAY_ERROR: RetryOn = RetryOn(1 << 1);
    /// The connection was reset / closed before a response.
    pub const RESET: RetryOn = RetryOn(1 << 2);
    /// The connection could not be established.
    pub const CONNECT_FAILURE: RetryOn = RetryOn(1 << 3);
    /// HTTP/2 REFUSED_STREAM.
    pub const REFUSED_STREAM: RetryOn = RetryOn(1 << 4);
    /// 409 (Envoy `retriable-4xx`).
    pub const RETRIABLE_4XX: RetryOn = RetryOn(1 << 5);
    /// The codes in [`RetryPolicy::retriable_status_codes`].
    pub const RETRIABLE_STATUS_CODES: RetryOn = RetryOn(1 << 6);
    /// gRPC CANCELLED.
    pub const CANCELLED: RetryOn = RetryOn(1 << 7);
    /// gRPC DEADLINE_EXCEEDED.
    pub const DEADLINE_EXCEEDED: RetryOn = RetryOn(1 << 8);
    /// gRPC INTERNAL.
    pub const INTERNAL: RetryOn = RetryOn(1 << 9);
    /// gRPC RESOURCE_EXHAUSTED.
    pub const RESOURCE_EXHAUSTED: RetryOn = RetryOn(1 << 10);
    /// gRPC UNAVAILABLE.
    pub const UNAVAILABLE: RetryOn = RetryOn(1 << 11);

    /// Every condition with its Envoy/Istio name, in a stable order.
    pub const NAMES: [(&'static str, RetryOn); 12] = [
        ("5xx", Self::FIVE_XX),
        ("gateway-error", Self::GATEWAY_ERROR),
        ("reset", Self::RESET),
        ("connect-failure", Self::CONNECT_FAILURE),
        ("refused-stream", Self::REFUSED_STREAM),
        ("retriable-4xx", Self::RETRIABLE_4XX),
        ("retriable-status-codes", Self::RETRIABLE_STATUS_CODES),
        ("cancelled", Self::CANCELLED),
        ("deadline-exceeded", Self::DEADLINE_EXCEEDED),
        ("internal", Self::INTERNAL),
        ("resource-exhausted", Self::RESOURCE_EXHAUSTED),
        ("unavailable", Self::UNAVAILABLE),
    ];

    /// No condition.
    pub const fn empty() -> Self {
        RetryOn(0)
    }

    /// Both sets of conditions (a `const` form of `|`).
    pub const fn union(self, other: RetryOn) -> RetryOn {
        RetryOn(self.0 | other.0)
    }

    /// Whether every condition of `other` is in `self`.
    pub const fn contains(self, other: RetryOn) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// Whether no condition is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The raw bits (for compact storage).
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// The condition named `name` (Envoy/Istio spelling), if known.
    pub fn from_name(name: &str) -> Option<RetryOn> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| *v)
    }

    /// The names of the conditions set, in [`RetryOn::NAMES`] order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .iter()
            .filter(move |(_, v)| self.contains(*v))
            .map(|(n, _)| *n)
    }
}

impl std::ops::BitOr for RetryOn {
    type Output = RetryOn;
    fn bitor(self, rhs: RetryOn) -> RetryOn {
        RetryOn(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for RetryOn {
    fn bitor_assign(&mut self, rhs: RetryOn) {
        self.0 |= rhs.0;
    }
}

/// A fraction in millionths (Envoy `FractionalPercent` with MILLION), so
/// config compares exactly: 20% is `Fraction::from_per_million(200_000)`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fraction(u32);

impl Fraction {
    /// The whole: 100%.
    pub const ALL: Fraction = Fraction(1_000_000);

    /// A fraction of `n` millionths, clamped to 100%.
    pub fn from_per_million(n: u32) -> Self {
        Fraction(n.min(1_000_000))
    }

    /// A percentage (Istio's `percentage.value`, 0–100, fractional allowed),
    /// rounded to the nearest millionth; `None` if out of range or not finite.
    pub fn from_percent(p: f64) -> Option<Self> {
        (p.is_finite() && (0.0..=100.0).contains(&p))
            .then(|| Fraction((p * 10_000.0).round() as u32))
    }

    /// Millionths.
    pub fn per_million(self) -> u32 {
        self.0
    }

    /// As a percentage.
    pub fn percent(self) -> f64 {
        f64::from(self.0) / 10_000.0
    }

    /// Whether a uniform `random` falls inside this fraction.
    pub fn hit(self, random: u64) -> bool {
        ((u128::from(random) * 1_000_000) >> 64) < u128::from(self.0)
    }
}

/// Istio `fault` / Envoy's fault filter (gRFC A33).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPolicy {
    /// Delay a fraction of requests.
    pub delay: Option<FaultDelay>,
    /// Fail a fraction of requests without sending them.
    pub abort: Option<FaultAbort>,
}

/// A fixed delay for a fraction of requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultDelay {
    /// Which share of requests.
    pub fraction: Fraction,
    /// How long.
    pub delay: Duration,
}

/// An injected failure for a fraction of requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultAbort {
    /// Which share of requests.
    pub fraction: Fraction,
    /// What they fail with.
    pub status: AbortStatus,
}

/// The status of an injected failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortStatus {
    /// An HTTP status (Istio `httpStatus`).
    Http(u16),
    /// A gRPC status code (Istio `grpcStatus`).
    Grpc(u32),
}

/// A source of the consistent-hash key (Envoy `RouteAction.HashPolicy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashPolicy {
    /// The value of a header (lower-case name).
    Header(Name),
    /// The value of a cookie (Istio `httpCookie`); `ttl` set means generate
    /// one when absent (not supported by gRPC clients).
    Cookie {
        /// Cookie name.
        name: Name,
        /// Lifetime of a generated cookie.
        ttl: Option<Duration>,
        /// Path of a generated cookie.
        path: Option<Name>,
    },
    /// The client's IP address (Istio `useSourceIp`).
    SourceIp,
    /// A query parameter (Istio `httpQueryParameterName`).
    QueryParameter(Name),
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
    /// Match prefix and exact paths ignoring ASCII case (Istio
    /// `ignoreUriCase`, Envoy `case_sensitive: false`); regexes are not
    /// affected, as in Envoy.
    pub ignore_case: bool,
}

impl RouteMatch {
    /// A match for every request: prefix `/`, nothing else.
    pub fn any() -> Self {
        RouteMatch {
            path: PathMatch::Prefix(Arc::from("/")),
            headers: Arc::from([]),
            query_params: Arc::from([]),
            ignore_case: false,
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

    /// No destination: the action of a route that answers itself (a
    /// redirect or a direct response, see [`crate::traffic`]). Routing
    /// must not pick from it.
    pub fn none() -> Self {
        WeightedClusters {
            clusters: Arc::from([]),
            total: 0,
        }
    }

    /// Whether there is no destination (see [`WeightedClusters::none`]).
    pub fn is_none(&self) -> bool {
        self.clusters.is_empty()
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
    /// Panics on [`WeightedClusters::none`]: routing checks
    /// [`is_none`](Self::is_none) first.
    pub fn pick(&self, random: u64) -> &WeightedCluster {
        &self.clusters[self.pick_index(random)]
    }

    /// The index in [`clusters`](Self::clusters) of [`pick`](Self::pick)'s
    /// destination (0 for [`WeightedClusters::none`]).
    pub fn pick_index(&self, random: u64) -> usize {
        if self.total == 0 {
            return 0;
        }
        // Multiply-shift maps a uniform u64 onto [0, total) without modulo bias
        // worth measuring (total < 2^40 in any sane config).
        let mut point = ((u128::from(random) * u128::from(self.total)) >> 64) as u64;
        for (i, c) in self.clusters.iter().enumerate() {
            let w = u64::from(c.weight);
            if point < w {
                return i;
            }
            point -= w;
        }
        // Unreachable by construction; the last positive-weight cluster is a safe answer.
        self.clusters
            .iter()
            .rposition(|c| c.weight > 0)
            .unwrap_or(0)
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
    /// Consistent hashing on a ring (Istio `consistentHash`, gRFC A42); the
    /// key comes from the route's [`RoutePolicy::hash_policy`].
    RingHash {
        /// Minimum number of ring entries (Istio `minimumRingSize`, Envoy default 1024).
        minimum_ring_size: u64,
    },
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
    /// Limits (Istio `connectionPool`, `retryBudget`; Envoy `circuit_breakers`).
    pub circuit_breakers: CircuitBreakers,
    /// Passive health checking; `None` = off.
    pub outlier_detection: Option<OutlierDetection>,
    /// Connection settings (Istio `connectionPool.tcp.connectTimeout`,
    /// `http.idleTimeout`, `http.maxRequestsPerConnection`).
    pub connection: ConnectionSettings,
    /// Prefer the client's own locality and fail over to others only when it
    /// has no healthy endpoint (Istio `localityLbSetting.enabled`).
    pub locality_failover: bool,
    /// Slow start: a new endpoint's share ramps up over this window (Istio
    /// `loadBalancer.warmupDurationSecs`; Envoy `slow_start_config`
    /// of round robin and least request). `None` = off.
    pub slow_start: Option<Duration>,
    /// TLS to the endpoints (DestinationRule `trafficPolicy.tls`
    /// ISTIO_MUTUAL, SIMPLE or MUTUAL; gRFC A29 `UpstreamTlsContext`);
    /// `None` = plaintext.
    pub tls: Option<UpstreamTls>,
    /// How its endpoints are found: EDS (the default), or DNS names the
    /// client resolves itself (ServiceEntry `resolution: DNS`).
    pub discovery: Discovery,
}

/// How a cluster's endpoints are found.
///
/// With [`Discovery::Dns`] the cluster names hosts, not addresses: each
/// client resolves them itself (Envoy's STRICT_DNS / LOGICAL_DNS; the
/// encoded shape is the cluster's `load_assignment` of hostnames, see
/// `xds::cluster`), and each A/AAAA record of a strict cluster is one
/// endpoint. gRPC clients know no STRICT_DNS (gRFC A37): mesh-control
/// resolves the names for them and serves the answer as EDS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Discovery {
    /// Endpoints from EDS (the cluster's `eds_service_name`).
    #[default]
    Eds,
    /// Endpoints from resolving host names (ServiceEntry `resolution:
    /// DNS` or `DNS_ROUND_ROBIN`).
    Dns(DnsDiscovery),
}

impl Discovery {
    /// The DNS settings, for a DNS cluster.
    pub fn dns(&self) -> Option<&DnsDiscovery> {
        match self {
            Discovery::Eds => None,
            Discovery::Dns(dns) => Some(dns),
        }
    }
}

/// The names a DNS cluster resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsDiscovery {
    /// The hosts and the port each endpoint is reached on (a ServiceEntry's
    /// hosts, or its `endpoints[].address` names, with the `targetPort`).
    pub hosts: Arc<[DnsHost]>,
    /// Istio's `DNS_ROUND_ROBIN` (Envoy's LOGICAL_DNS): only the first
    /// address of each answer is used, for new connections, instead of
    /// every address being an endpoint (STRICT_DNS).
    pub logical: bool,
}

/// One name of a DNS cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsHost {
    /// The DNS name (`api.example.com`).
    pub name: Name,
    /// The port each of its addresses is reached on.
    pub port: u16,
}

/// How a client secures connections to a cluster's endpoints. By default
/// ([`TlsOrigination::IstioMutual`]): mutual TLS with the workload's own
/// certificate (the `mesh` certificate provider instance), the server's
/// certificate verified against the mesh trust bundle and its SPIFFE ID
/// against `server_identities`. With certificate files
/// ([`TlsOrigination::Files`], Istio's SIMPLE and MUTUAL): TLS to servers
/// outside the mesh's identity system (an external API: egress TLS
/// origination, the app calling `http://api.example.com`), verified like
/// any TLS client does: the chain against a CA file or the system's roots,
/// the name against the SNI or the configured SANs. Never unverified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The SPIFFE IDs the cluster's servers may present (A29
    /// `match_subject_alt_names`, exact URIs): the service accounts allowed
    /// to back the service. Empty accepts any identity of the trust domain.
    /// ISTIO_MUTUAL only: empty with files (their SAN list is in
    /// [`FileTls::subject_alt_names`]).
    pub server_identities: Arc<[crate::spiffe::SpiffeId]>,
    /// The SNI to send (Istio's `outbound_.<port>_.<subset>_.<host>` for
    /// ISTIO_MUTUAL; the DestinationRule's `sni`, else the service host,
    /// for SIMPLE / MUTUAL); empty sends none. With ISTIO_MUTUAL it is not
    /// what is verified (the SPIFFE ID is); with files it is, unless
    /// `subject_alt_names` are given.
    pub sni: Name,
    /// Where the certificates come from and how the server is verified.
    pub origination: TlsOrigination,
}

/// Where a TLS client's certificates come from (Istio's
/// `ClientTLSSettings.mode` other than DISABLE).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum TlsOrigination {
    /// ISTIO_MUTUAL: the workload certificate and the mesh trust bundle
    /// (the bootstrap's `mesh` certificate provider instance).
    #[default]
    IstioMutual,
    /// SIMPLE (no client certificate) or MUTUAL (with one): PEM files on
    /// the client's filesystem, as Istio's sidecar reads them, re-read when
    /// they change; without a CA file, the system's roots.
    Files(FileTls),
}

/// TLS from files (Istio's SIMPLE and MUTUAL modes; Envoy's
/// `tls_certificates` / `validation_context.trusted_ca` with `filename`s).
/// The server's chain must verify against `ca_certificates`, or, when
/// none is given, against the system's roots (the client machine's trust
/// store, as Istio's sidecar uses it for SIMPLE without `caCertificates`);
/// its name must be one of `subject_alt_names` (DNS or URI SANs, exact;
/// any one matching is enough) or, when that is empty, valid for the SNI.
/// The server is always verified: no CA file means the system's roots,
/// never "anything goes" (Istio's `insecureSkipVerify` is refused).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FileTls {
    /// The trusted roots (PEM file; Istio `caCertificates`); `None`: the
    /// system's roots (Envoy's `validation_context.system_root_certs`).
    pub ca_certificates: Option<Name>,
    /// The names the server's certificate may carry (Istio
    /// `subjectAltNames`); empty checks it against the SNI.
    pub subject_alt_names: Arc<[Name]>,
    /// The client certificate (MUTUAL); `None` for SIMPLE.
    pub client_certificate: Option<ClientCertificateFiles>,
}

impl FileTls {
    /// Istio's mode name: `MUTUAL` with a client certificate, else `SIMPLE`.
    pub fn mode(&self) -> &'static str {
        if self.client_certificate.is_some() {
            "MUTUAL"
        } else {
            "SIMPLE"
        }
    }
}

/// A client certificate and its key, as PEM files (Istio
/// `clientCertificate` and `privateKey`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientCertificateFiles {
    /// The certificate chain, leaf first.
    pub certificate_chain: Name,
    /// The private key of the leaf.
    pub private_key: Name,
}

/// Istio's PeerAuthentication `mtls.mode` for a server port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    /// mTLS only: a client certificate of the trust domain is required.
    Strict,
    /// mTLS and plaintext on the same port (a TLS client without a
    /// certificate is accepted too, unauthenticated). Istio's default.
    Permissive,
    /// Plaintext only.
    Disable,
}

impl MtlsMode {
    /// Parses Istio's spelling (`STRICT`, `PERMISSIVE`, `DISABLE`).
    pub fn parse(s: &str) -> Option<MtlsMode> {
        match s {
            "STRICT" => Some(MtlsMode::Strict),
            "PERMISSIVE" => Some(MtlsMode::Permissive),
            "DISABLE" => Some(MtlsMode::Disable),
            _ => None,
        }
    }

    /// Istio's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            MtlsMode::Strict => "STRICT",
            MtlsMode::Permissive => "PERMISSIVE",
            MtlsMode::Disable => "DISABLE",
        }
    }
}

impl fmt::Display for MtlsMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An inbound (server) listener, gRFC A36: how the server listening on
/// `address` accepts connections and which requests it authorizes. The
/// control server builds it from the PeerAuthentication and
/// AuthorizationPolicy resources that select the workload and port; the
/// server asks for it by the name its bootstrap's
/// `server_listener_resource_name_template` gives its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerListener {
    /// LDS resource name (`grpc/server?xds.resource.listening_address=10.0.0.7:8080`).
    pub name: Name,
    /// The address the server listens on.
    pub address: SocketAddr,
    /// The PeerAuthentication mode for this port.
    pub mtls: MtlsMode,
    /// The authorization policies that apply, in evaluation order for
    /// [`crate::rbac::evaluate`] (DENY, then ALLOW, then AUDIT). Empty
    /// allows every request.
    pub policies: Arc<[crate::rbac::AuthorizationPolicy]>,
    /// The local rate limit of the server's requests (an EnvoyFilter's
    /// `local_ratelimit` for the workload; see [`crate::ratelimit`]);
    /// `None`: none.
    pub rate_limit: Option<Arc<crate::ratelimit::RateLimitConfig>>,
    /// The VirtualService `corsPolicy` routes of the services the server
    /// backs, in match order (see [`crate::cors`]); empty: no CORS.
    pub cors: Arc<[crate::cors::CorsRoute]>,
}

/// Envoy `circuit_breakers` thresholds (default priority), from Istio's
/// `connectionPool` and `retryBudget`. Defaults are Envoy's (1024 each,
/// 3 retries), which Istio raises to effectively unlimited
/// (`u32::MAX`) — this mesh uses Istio's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CircuitBreakers {
    /// `tcp.maxConnections`: beyond it requests wait as pending.
    pub max_connections: u32,
    /// `http.http1MaxPendingRequests`: pending overflow fails at once.
    pub max_pending_requests: u32,
    /// `http.http2MaxRequests`: active-request overflow fails at once.
    pub max_requests: u32,
    /// `http.maxRetries`: concurrent retries beyond it are skipped.
    pub max_retries: u32,
    /// `retryBudget`; when set it replaces `max_retries` as the retry limit
    /// (Envoy semantics), and `max_retries` still caps it.
    pub retry_budget: Option<RetryBudget>,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        CircuitBreakers {
            max_connections: u32::MAX,
            max_pending_requests: u32::MAX,
            max_requests: u32::MAX,
            max_retries: u32::MAX,
            retry_budget: None,
        }
    }
}

/// Envoy `RetryBudget` (Istio 1.27 `trafficPolicy.retryBudget`): concurrent
/// retries ≤ max(budget × active requests, min_retry_concurrency).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryBudget {
    /// Share of active requests that may be retries (Envoy default 20%).
    pub budget: Fraction,
    /// Retries always allowed (Envoy default 3).
    pub min_retry_concurrency: u32,
}

/// Envoy `OutlierDetection` as Istio sets it (consecutive errors; success-rate
/// ejection off, `enforcing_success_rate: 0`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutlierDetection {
    /// Eject after this many consecutive 5xx (Istio `consecutive5xxErrors`);
    /// `None` = off.
    pub consecutive_5xx: Option<u32>,
    /// Eject after this many consecutive 502/503/504 or connect failures
    /// (Istio `consecutiveGatewayErrors`); `None` = off.
    pub consecutive_gateway_errors: Option<u32>,
    /// How often ejections are reconsidered (Istio `interval`, default 10 s).
    pub interval: Duration,
    /// Ejection time, multiplied by the number of times ejected (Istio
    /// `baseEjectionTime`, default 30 s).
    pub base_ejection_time: Duration,
    /// At most this share of endpoints ejected (Istio `maxEjectionPercent`, default 10%).
    pub max_ejection_percent: u32,
    /// Below this share of healthy endpoints, ejection is ignored (panic mode;
    /// Istio `minHealthPercent`, default 0 = never).
    pub min_health_percent: u32,
}

/// Per-connection settings of a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// TCP connect timeout (Istio default 10 s when `None`).
    pub connect_timeout: Option<Duration>,
    /// Close a connection idle this long (`None` = Envoy's 1 h default).
    /// Istio's `http.idleTimeout`, else `tcp.idleTimeout` (both are
    /// Envoy's `common_http_protocol_options.idle_timeout`).
    pub idle_timeout: Option<Duration>,
    /// Close a connection after this many requests (`None` = unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// TCP keepalive probes on each connection (Istio
    /// `connectionPool.tcp.tcpKeepalive`; Envoy
    /// `upstream_connection_options.tcp_keepalive`); `None` = the OS default.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// Drain a connection this long after it was opened: it takes no new
    /// request and closes once its requests are done, so that load spreads
    /// to new endpoints (Istio `connectionPool.tcp.maxConnectionDuration`;
    /// Envoy `common_http_protocol_options.max_connection_duration`).
    pub max_connection_duration: Option<Duration>,
    /// At most this many concurrent streams on one HTTP/2 connection; more
    /// open another connection to the same endpoint (Istio
    /// `connectionPool.http.maxConcurrentStreams`; Envoy
    /// `http2_protocol_options.max_concurrent_streams`). HTTP/2 clusters
    /// (and upgraded ones) only: Istio does not set it on HTTP/1.1 ones, and
    /// it is not encoded there.
    pub max_concurrent_streams: Option<u32>,
    /// Speak HTTP/2 to a service declared HTTP/1.1 (Istio
    /// `connectionPool.http.h2UpgradePolicy: UPGRADE`; Envoy: the cluster's
    /// explicit `http2_protocol_options`). `protocol` stays HTTP/1.1.
    pub h2_upgrade: bool,
}

/// TCP keepalive settings (Istio `TcpKeepalive`; Envoy `TcpKeepalive`,
/// which counts time and interval in whole seconds): `SO_KEEPALIVE` on,
/// and a field left `None` keeps the OS default for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TcpKeepalive {
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`).
    pub probes: Option<u32>,
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    pub time: Option<Duration>,
    /// Time between probes (`TCP_KEEPINTVL`).
    pub interval: Option<Duration>,
}

impl Cluster {
    /// A cluster with Istio's defaults: least-request balancing, no limits,
    /// no outlier detection.
    pub fn new(name: impl Into<Name>, protocol: Protocol) -> Self {
        let name = name.into();
        Cluster {
            eds_service_name: name.clone(),
            name,
            lb_policy: LbPolicy::LeastRequest,
            protocol,
            circuit_breakers: CircuitBreakers::default(),
            outlier_detection: None,
            connection: ConnectionSettings::default(),
            locality_failover: false,
            slow_start: None,
            tls: None,
            discovery: Discovery::Eds,
        }
    }
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

//! Prometheus metrics: Istio's standard request metrics, and the mesh's own.
//!
//! Istio's dashboards and alerts query four metrics with one label set
//! ([Istio standard metrics](https://istio.io/latest/docs/reference/config/metrics/)):
//! `istio_requests_total` (counter), `istio_request_duration_milliseconds`,
//! `istio_request_bytes` and `istio_response_bytes` (histograms). Each
//! request is reported twice, as sidecars do: by the client
//! (`reporter="source"`) and by the server (`reporter="destination"`). The
//! names are exactly Istio's: prometheus-client appends `_total` to a
//! counter registered as `istio_requests`, and the histograms are
//! registered under their full names without a unit (a unit would be
//! appended again).
//!
//! Cost per request: the 25 labels are not built per request. Peers and
//! services are interned once (`Arc`s), a request looks up its series by
//! the peers' addresses plus a few integers, and the series holds cloned
//! handles of its counter and three histograms, which count with atomics
//! (no lock per observation, see `histogram.rs`). The series cache holds at
//! most [`SERIES_CACHE_LIMIT`] series: beyond it, a request of a new series
//! is still counted, exactly, but builds its labels and looks its metrics up
//! in the families, as if uncached (a few thousand instructions instead of a
//! few hundred), so a burst of label sets costs time, never unbounded cache
//! memory. The families themselves hold every series Prometheus is sent;
//! their inputs are bounded where a peer controls them (peer announcements,
//! services and endpoint identities are interned up to fixed limits, then
//! counted as `unknown`).
//!
//! The mesh's own metrics (`proxyless_*`) count what the client stack
//! decides — retries, retry-budget refusals, circuit breaker overflows,
//! outlier ejections, deadline drops, faults — through [`MeshMetrics`], and
//! read each [`XdsClient`]'s state at scrape time: connected or not, stale
//! or not (serving the cached config because no control server has answered
//! since start, and since when), the applied version per resource type,
//! resources rejected (NACKed).

use std::borrow::Borrow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use http::HeaderValue;
use mesh_core::model::Name;
use mesh_xds_client::XdsClient;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric as _, LabelValueEncoder,
};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use super::flags::ResponseFlags;
use super::histogram::AtomicHistogram;
use super::identity::{Peer, PeerRef, ServiceLabels, UNKNOWN};
use super::record::{DecisionRecord, EndpointLabels};

/// Istio's duration buckets, in milliseconds (Envoy's default histogram
/// buckets, which Istio's stats use).
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's size buckets, in bytes: powers of ten from 1 B to 10 MB.
pub const SIZE_BUCKETS_BYTES: [f64; 8] = [
    1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1000000.0, 10000000.0,
];

/// Istio's label names, in Istio's order: what every `istio_*` series has.
pub const ISTIO_LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// How many distinct peer announcements are interned; beyond it a peer
/// header counts as `unknown` (a hostile client cannot grow memory or
/// label cardinality without bound).
const PEER_CACHE_LIMIT: usize = 1024;
/// How many services and endpoint identities are interned.
const SERVICE_CACHE_LIMIT: usize = 4096;
/// How many Istio series keep their label set and metric handles cached
/// (a series is one combination of the 25 labels; each cached one holds
/// about 200 bytes beside the families). Beyond it new series are counted
/// uncached.
pub(crate) const SERIES_CACHE_LIMIT: usize = 2048;

/// Who reports a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Reporter {
    Source,
    Destination,
}

/// The request's protocol, as Istio names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum RequestProtocol {
    Http,
    Grpc,
}

/// Istio's `connection_security_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Security {
    /// Reported by the client: it cannot tell.
    Unknown,
    /// Plaintext.
    None,
    /// mTLS with a verified peer.
    MutualTls,
}

impl Reporter {
    fn name(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

impl RequestProtocol {
    fn name(self) -> &'static str {
        match self {
            RequestProtocol::Http => "http",
            RequestProtocol::Grpc => "grpc",
        }
    }
}

impl Security {
    fn name(self) -> &'static str {
        match self {
            Security::Unknown => "unknown",
            Security::None => "none",
            Security::MutualTls => "mutual_tls",
        }
    }
}

/// Istio's full label set, one field per label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct IstioLabels {
    reporter: &'static str,
    source_workload: Name,
    source_workload_namespace: Name,
    source_principal: Name,
    source_app: Name,
    source_version: Name,
    source_canonical_service: Name,
    source_canonical_revision: Name,
    source_cluster: Name,
    destination_workload: Name,
    destination_workload_namespace: Name,
    destination_principal: Name,
    destination_app: Name,
    destination_version: Name,
    destination_service: Name,
    destination_service_name: Name,
    destination_service_namespace: Name,
    destination_canonical_service: Name,
    destination_canonical_revision: Name,
    destination_cluster: Name,
    request_protocol: &'static str,
    response_code: u16,
    grpc_response_status: GrpcStatusLabel,
    response_flags: ResponseFlags,
    connection_security_policy: &'static str,
}

/// A gRPC status code, or `""` for a request that is not gRPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct GrpcStatusLabel(Option<u16>);

impl EncodeLabelValue for GrpcStatusLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        match self.0 {
            Some(code) => EncodeLabelValue::encode(&code, encoder),
            None => EncodeLabelValue::encode(&"", encoder),
        }
    }
}

/// One finished request, as the telemetry layers report it.
pub(crate) struct Observation<'a> {
    pub(crate) reporter: Reporter,
    pub(crate) source: &'a PeerRef,
    pub(crate) source_principal: Option<&'a Name>,
    pub(crate) destination: &'a PeerRef,
    pub(crate) destination_principal: Option<&'a Name>,
    pub(crate) service: &'a Arc<ServiceLabels>,
    pub(crate) protocol: RequestProtocol,
    pub(crate) response_code: u16,
    pub(crate) grpc_status: Option<u16>,
    pub(crate) flags: ResponseFlags,
    pub(crate) security: Security,
    pub(crate) duration_ms: f64,
    pub(crate) request_bytes: u64,
    pub(crate) response_bytes: u64,
}

/// A series' identity without its 25 strings: interned peers and services
/// by address, principals by value, and the small fields.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeriesKey {
    reporter: Reporter,
    source: usize,
    destination: usize,
    service: usize,
    source_principal: Option<Name>,
    destination_principal: Option<Name>,
    protocol: RequestProtocol,
    response_code: u16,
    grpc_status: Option<u16>,
    flags: ResponseFlags,
    security: Security,
}

impl SeriesKey {
    /// Whether `o` belongs to this series (what `SeriesKey::from(o) ==
    /// self` says, without building the key).
    fn is(&self, o: &Observation<'_>) -> bool {
        self.source == Arc::as_ptr(o.source) as usize
            && self.destination == Arc::as_ptr(o.destination) as usize
            && self.service == Arc::as_ptr(o.service) as usize
            && self.response_code == o.response_code
            && self.flags == o.flags
            && self.reporter == o.reporter
            && self.protocol == o.protocol
            && self.grpc_status == o.grpc_status
            && self.security == o.security
            && self.source_principal.as_ref() == o.source_principal
            && self.destination_principal.as_ref() == o.destination_principal
    }
}

/// Hashed per request, so in a few words: the small fields packed, the
/// addresses, and each principal by its length and last eight bytes (SPIFFE
/// IDs of one trust domain share their start). Equality still compares
/// principals whole; principals come from verified certificates only.
impl Hash for SeriesKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        let small = u64::from(self.response_code)
            | self
                .grpc_status
                .map_or(0, |c| (1 << 16) | (u64::from(c) << 17))
            | ((self.reporter as u64) << 33)
            | ((self.protocol as u64) << 34)
            | ((self.security as u64) << 35);
        h.write_u64(small);
        h.write_u32(self.flags.bits());
        h.write_usize(self.source);
        h.write_usize(self.destination);
        h.write_usize(self.service);
        for principal in [&self.source_principal, &self.destination_principal] {
            match principal {
                Some(p) => {
                    let bytes = p.as_bytes();
                    let mut tail = [0u8; 8];
                    let n = bytes.len().min(8);
                    tail[..n].copy_from_slice(&bytes[bytes.len() - n..]);
                    h.write_u64(u64::from_le_bytes(tail) ^ ((bytes.len() as u64) << 56));
                }
                None => h.write_u64(0),
            }
        }
    }
}

/// The handles of one series; keeps the interned values its key points at
/// alive, so their addresses are never reused.
struct Series {
    requests: Counter,
    duration: AtomicHistogram,
    request_bytes: AtomicHistogram,
    response_bytes: AtomicHistogram,
    _pinned: (PeerRef, PeerRef, Arc<ServiceLabels>),
}

type HistogramFamily = Family<IstioLabels, AtomicHistogram, fn() -> AtomicHistogram>;

/// Istio's four request metrics.
pub(crate) struct IstioMetrics {
    requests: Family<IstioLabels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    series: RwLock<HashMap<SeriesKey, Arc<Series>, FastHash>>,
    /// Keyed by what a peer sent: SipHash (no crafted collisions).
    peers_by_header: Interner<HeaderValue, Peer, RandomState>,
    endpoint_peers: Interner<(usize, Option<Name>, Option<Name>), Peer, FastHash>,
    services_by_cluster: Interner<Name, ServiceLabels, FastHash>,
    services_by_host: Interner<Name, ServiceLabels, FastHash>,
    unknown_peer: PeerRef,
    unknown_service: Arc<ServiceLabels>,
}

/// One cached Istio series as [`IstioMetrics::for_each_series`] shows it:
/// its labels as the interned values they are rendered from, and its
/// counts.
pub(crate) struct SeriesView<'a> {
    pub(crate) reporter: Reporter,
    pub(crate) source: &'a Peer,
    pub(crate) destination: &'a Peer,
    pub(crate) service: &'a ServiceLabels,
    /// `None` renders as `unknown`.
    pub(crate) destination_principal: Option<&'a Name>,
    pub(crate) protocol: RequestProtocol,
    pub(crate) response_code: u16,
    pub(crate) grpc_status: Option<u16>,
    pub(crate) security: Security,
    /// `istio_requests_total`.
    pub(crate) requests: u64,
    /// `istio_request_duration_milliseconds` (buckets of
    /// [`DURATION_BUCKETS_MS`]).
    pub(crate) duration: &'a AtomicHistogram,
}

fn duration_histogram() -> AtomicHistogram {
    AtomicHistogram::new(&DURATION_BUCKETS_MS)
}

fn size_histogram() -> AtomicHistogram {
    AtomicHistogram::new(&SIZE_BUCKETS_BYTES)
}

impl IstioMetrics {
    fn new(registry: &mut Registry) -> Self {
        let metrics = IstioMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram as fn() -> AtomicHistogram),
            request_bytes: Family::new_with_constructor(size_histogram as fn() -> AtomicHistogram),
            response_bytes: Family::new_with_constructor(size_histogram as fn() -> AtomicHistogram),
            series: RwLock::new(HashMap::with_hasher(FastHash)),
            peers_by_header: Interner::new(PEER_CACHE_LIMIT),
            endpoint_peers: Interner::new(SERVICE_CACHE_LIMIT),
            services_by_cluster: Interner::new(SERVICE_CACHE_LIMIT),
            services_by_host: Interner::new(SERVICE_CACHE_LIMIT),
            unknown_peer: Arc::new(Peer::unknown()),
            unknown_service: Arc::new(ServiceLabels::unknown()),
        };
        // Registered as "istio_requests": the counter is exported as
        // `istio_requests_total`.
        registry.register(
            "istio_requests",
            "Requests, as Istio counts them (one per request per reporter)",
            metrics.requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, until the response ended",
            metrics.duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body sizes in bytes",
            metrics.request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body sizes in bytes",
            metrics.response_bytes.clone(),
        );
        metrics
    }

    /// Records one request.
    pub(crate) fn observe(&self, o: &Observation<'_>) {
        // The series of the thread's previous request, compared field by
        // field (no key built, no hash, no lock); then the shared cache.
        let id = self.id();
        let recorded = LAST_SERIES.with_borrow(|m| match m.find(id, |key| key.is(o)) {
            Some(series) => {
                series.record(o);
                true
            }
            None => false,
        });
        if recorded {
            return;
        }
        let key = SeriesKey {
            reporter: o.reporter,
            source: Arc::as_ptr(o.source) as usize,
            destination: Arc::as_ptr(o.destination) as usize,
            service: Arc::as_ptr(o.service) as usize,
            source_principal: o.source_principal.cloned(),
            destination_principal: o.destination_principal.cloned(),
            protocol: o.protocol,
            response_code: o.response_code,
            grpc_status: o.grpc_status,
            flags: o.flags,
            security: o.security,
        };
        let cached = self
            .series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        if let Some(series) = cached {
            series.record(o);
            LAST_SERIES.with_borrow_mut(|m| m.set(id, key, series));
            return;
        }
        let labels = self.labels(o);
        let series = Arc::new(Series {
            requests: self.requests.get_or_create_owned(&labels),
            duration: self.duration.get_or_create_owned(&labels),
            request_bytes: self.request_bytes.get_or_create_owned(&labels),
            response_bytes: self.response_bytes.get_or_create_owned(&labels),
            _pinned: (o.source.clone(), o.destination.clone(), o.service.clone()),
        });
        let mut map = self.series.write().unwrap_or_else(PoisonError::into_inner);
        if map.len() < SERIES_CACHE_LIMIT || map.contains_key(&key) {
            let series = map.entry(key.clone()).or_insert(series).clone();
            drop(map);
            series.record(o);
            LAST_SERIES.with_borrow_mut(|m| m.set(id, key, series));
        } else {
            drop(map);
            series.record(o);
        }
    }

    /// Calls `f` with every cached series and returns `true`; or, when the
    /// cache is full, calls nothing and returns `false`. The service
    /// graph's push reads the edges' totals here instead of rendering every
    /// family as text and parsing it back (a thousandth of the cost). It is
    /// only complete while the cache has room: series are never evicted, so
    /// below [`SERIES_CACHE_LIMIT`] every series ever counted is in it, but
    /// once it is full new series live in the families alone (the caller
    /// then reads the rendered families). Holds the cache's read lock for
    /// the walk: requests of cached series do not take it, a request of a
    /// new series waits for the walk (microseconds per hundred series).
    pub(crate) fn for_each_series(&self, mut f: impl FnMut(&SeriesView<'_>)) -> bool {
        let map = self.series.read().unwrap_or_else(PoisonError::into_inner);
        if map.len() >= SERIES_CACHE_LIMIT {
            return false;
        }
        for (key, series) in map.iter() {
            let (source, destination, service) = &series._pinned;
            f(&SeriesView {
                reporter: key.reporter,
                source,
                destination,
                service,
                destination_principal: key.destination_principal.as_ref(),
                protocol: key.protocol,
                response_code: key.response_code,
                grpc_status: key.grpc_status,
                security: key.security,
                requests: series.requests.get(),
                duration: &series.duration,
            });
        }
        true
    }

    /// How many series are cached.
    #[cfg(test)]
    fn cached_series(&self) -> usize {
        self.series
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn labels(&self, o: &Observation<'_>) -> IstioLabels {
        let unknown = || Name::from(UNKNOWN);
        let (s, d, svc) = (o.source, o.destination, o.service);
        IstioLabels {
            reporter: o.reporter.name(),
            source_workload: s.workload.clone(),
            source_workload_namespace: s.namespace.clone(),
            source_principal: o.source_principal.cloned().unwrap_or_else(unknown),
            source_app: s.app.clone(),
            source_version: s.version.clone(),
            source_canonical_service: s.canonical_service.clone(),
            source_canonical_revision: s.canonical_revision.clone(),
            source_cluster: s.cluster.clone(),
            destination_workload: d.workload.clone(),
            destination_workload_namespace: d.namespace.clone(),
            destination_principal: o.destination_principal.cloned().unwrap_or_else(unknown),
            destination_app: d.app.clone(),
            destination_version: d.version.clone(),
            destination_service: svc.host.clone(),
            destination_service_name: svc.name.clone(),
            destination_service_namespace: svc.namespace.clone(),
            destination_canonical_service: d.canonical_service.clone(),
            destination_canonical_revision: d.canonical_revision.clone(),
            destination_cluster: d.cluster.clone(),
            request_protocol: o.protocol.name(),
            response_code: o.response_code,
            grpc_response_status: GrpcStatusLabel(o.grpc_status),
            response_flags: o.flags,
            connection_security_policy: o.security.name(),
        }
    }

    /// This instance, as the per-thread memos key it.
    fn id(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// The peer announced in a `x-proxyless-peer` header (`unknown` when
    /// malformed or when too many distinct peers were seen).
    pub(crate) fn peer_from_header(&self, value: &HeaderValue) -> PeerRef {
        let id = self.id();
        if let Some(peer) = LAST_PEER.with_borrow(|m| m.get(id, |k| k == value)) {
            return peer;
        }
        let peer = self.intern_peer_header(value);
        LAST_PEER.with_borrow_mut(|m| m.set(id, value.clone(), peer.clone()));
        peer
    }

    fn intern_peer_header(&self, value: &HeaderValue) -> PeerRef {
        if let Some(peer) = self.peers_by_header.get(value) {
            return peer;
        }
        match Peer::from_header(value.as_bytes()) {
            Some(peer) => self
                .peers_by_header
                .insert(value.clone(), peer)
                .unwrap_or_else(|| self.unknown_peer.clone()),
            None => self.unknown_peer.clone(),
        }
    }

    /// A destination known by its service and endpoint labels only.
    pub(crate) fn peer_from_endpoint(
        &self,
        service: &Arc<ServiceLabels>,
        labels: &EndpointLabels,
    ) -> PeerRef {
        let id = self.id();
        let same = |(s, l): &(Arc<ServiceLabels>, EndpointLabels)| {
            Arc::ptr_eq(s, service) && Arc::ptr_eq(l, labels)
        };
        if let Some(peer) = LAST_ENDPOINT.with_borrow(|m| m.get(id, same)) {
            return peer;
        }
        let peer = self.intern_endpoint_peer(service, labels);
        LAST_ENDPOINT.with_borrow_mut(|m| {
            m.set(id, (service.clone(), labels.clone()), peer.clone());
        });
        peer
    }

    fn intern_endpoint_peer(
        &self,
        service: &Arc<ServiceLabels>,
        labels: &[(Name, Name)],
    ) -> PeerRef {
        let label = |k: &str| labels.iter().find(|(key, _)| &**key == k).map(|(_, v)| v);
        let (app, version) = (label("app"), label("version"));
        let key = (
            Arc::as_ptr(service) as usize,
            app.cloned(),
            version.cloned(),
        );
        if let Some(peer) = self.endpoint_peers.get(&key) {
            return peer;
        }
        let peer = Peer::from_endpoint(service, app, version);
        self.endpoint_peers
            .insert(key, peer)
            .unwrap_or_else(|| self.unknown_peer.clone())
    }

    /// The destination of a client request routed to `cluster` and
    /// answered by an endpoint with `labels`: its service and its peer,
    /// what [`service_of_cluster`](Self::service_of_cluster) then
    /// [`peer_from_endpoint`](Self::peer_from_endpoint) return, from one
    /// memo of the thread's previous request (both keys compared by
    /// address first) instead of two: the usual request goes where the one
    /// before it went.
    pub(crate) fn destination_of_endpoint(
        &self,
        cluster: &Name,
        labels: &EndpointLabels,
    ) -> (Arc<ServiceLabels>, PeerRef) {
        let id = self.id();
        let same = |(c, l): &(Name, EndpointLabels)| {
            Arc::ptr_eq(l, labels) && (Arc::ptr_eq(c, cluster) || c == cluster)
        };
        if let Some(found) = LAST_DESTINATION.with_borrow(|m| m.get(id, same)) {
            return found;
        }
        let service = self.service_of_cluster(cluster);
        let peer = self.peer_from_endpoint(&service, labels);
        LAST_DESTINATION.with_borrow_mut(|m| {
            m.set(
                id,
                (cluster.clone(), labels.clone()),
                (service.clone(), peer.clone()),
            );
        });
        (service, peer)
    }

    /// The service behind a cluster name.
    pub(crate) fn service_of_cluster(&self, cluster: &Name) -> Arc<ServiceLabels> {
        let id = self.id();
        if let Some(s) =
            LAST_CLUSTER.with_borrow(|m| m.get(id, |k| Arc::ptr_eq(k, cluster) || k == cluster))
        {
            return s;
        }
        let service = self.intern_cluster(cluster);
        LAST_CLUSTER.with_borrow_mut(|m| m.set(id, cluster.clone(), service.clone()));
        service
    }

    fn intern_cluster(&self, cluster: &Name) -> Arc<ServiceLabels> {
        if let Some(s) = self.services_by_cluster.get(&**cluster) {
            return s;
        }
        self.services_by_cluster
            .insert(cluster.clone(), ServiceLabels::from_cluster(cluster))
            .unwrap_or_else(|| self.unknown_service.clone())
    }

    /// The service named by a request's authority.
    pub(crate) fn service_of_host(&self, host: &str) -> Arc<ServiceLabels> {
        if let Some(s) = self.services_by_host.get(host) {
            return s;
        }
        self.services_by_host
            .insert(host.into(), ServiceLabels::from_host(host))
            .unwrap_or_else(|| self.unknown_service.clone())
    }

    pub(crate) fn unknown_peer(&self) -> &PeerRef {
        &self.unknown_peer
    }

    pub(crate) fn unknown_service(&self) -> &Arc<ServiceLabels> {
        &self.unknown_service
    }
}

impl Series {
    fn record(&self, o: &Observation<'_>) {
        self.requests.inc();
        self.duration.observe(o.duration_ms);
        self.request_bytes.observe(o.request_bytes as f64);
        self.response_bytes.observe(o.response_bytes as f64);
    }
}

/// The last answer of one lookup on this thread: a request's peer and
/// service are usually those of the request before it, and comparing with
/// the last key (by address for the snapshot's own `Arc`s) is far cheaper
/// than a locked, hashed lookup in the interner. Keyed by the metrics
/// instance too. If a dropped registry's address is reused by a new one,
/// the memo may hand the new one a value interned by the old: the same
/// labels (they are a function of the key), so counts stay right, and the
/// series cache gets one more entry.
struct Memo<K, V>(Option<(usize, K, V)>);

impl<K, V: Clone> Memo<K, V> {
    fn get(&self, id: usize, same: impl FnOnce(&K) -> bool) -> Option<V> {
        match &self.0 {
            Some((owner, key, value)) if *owner == id && same(key) => Some(value.clone()),
            _ => None,
        }
    }

    /// The value, by reference (no clone to make and drop).
    fn find(&self, id: usize, same: impl FnOnce(&K) -> bool) -> Option<&V> {
        match &self.0 {
            Some((owner, key, value)) if *owner == id && same(key) => Some(value),
            _ => None,
        }
    }

    fn set(&mut self, id: usize, key: K, value: V) {
        self.0 = Some((id, key, value));
    }
}

/// [`IstioMetrics::destination_of_endpoint`]'s memo: (cluster, endpoint
/// labels) to (service, peer).
type DestinationMemo = Memo<(Name, EndpointLabels), (Arc<ServiceLabels>, PeerRef)>;

thread_local! {
    static LAST_SERIES: RefCell<Memo<SeriesKey, Arc<Series>>> = const { RefCell::new(Memo(None)) };
    static LAST_PEER: RefCell<Memo<HeaderValue, PeerRef>> = const { RefCell::new(Memo(None)) };
    static LAST_CLUSTER: RefCell<Memo<Name, Arc<ServiceLabels>>> =
        const { RefCell::new(Memo(None)) };
    static LAST_DESTINATION: RefCell<DestinationMemo> =
        const { RefCell::new(Memo(None)) };
    static LAST_ENDPOINT: RefCell<Memo<(Arc<ServiceLabels>, EndpointLabels), PeerRef>> =
        const { RefCell::new(Memo(None)) };
}

/// A bounded map of shared values, read-mostly.
struct Interner<K, V, S> {
    map: RwLock<HashMap<K, Arc<V>, S>>,
    limit: usize,
}

impl<K: Hash + Eq, V, S: BuildHasher + Default> Interner<K, V, S> {
    fn new(limit: usize) -> Self {
        Interner {
            map: RwLock::new(HashMap::with_hasher(S::default())),
            limit,
        }
    }

    fn get<Q>(&self, key: &Q) -> Option<Arc<V>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Interns `value` under `key` (or returns the value already there);
    /// `None` when full.
    fn insert(&self, key: K, value: V) -> Option<Arc<V>> {
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(v) = map.get(&key) {
            return Some(v.clone());
        }
        if map.len() >= self.limit {
            return None;
        }
        let value = Arc::new(value);
        map.insert(key, value.clone());
        Some(value)
    }
}

/// A fast hash for keys the process controls (addresses, small integers,
/// names from the control server): FxHash's multiply-rotate, as rustc uses.
#[derive(Debug, Clone, Copy, Default)]
struct FastHash;

impl BuildHasher for FastHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(0)
    }
}

struct FastHasher(u64);

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Envoy's short names (`UO,URX`, `-` for none) as the `response_flags`
/// label value, as Istio writes it.
impl EncodeLabelValue for ResponseFlags {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        write!(encoder, "{self}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ClusterLabels {
    cluster_name: Name,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabels {
    cluster_name: Name,
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct LimitLabels {
    cluster_name: Name,
    limit: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabels {
    cluster_name: Name,
    kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DryRunLabels {
    action: &'static str,
    result: &'static str,
    policy: PolicyLabel,
}

/// A policy as `<namespace>/<name>`, or `""` when none matched.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PolicyLabel(Option<Name>);

impl EncodeLabelValue for PolicyLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.as_deref().unwrap_or(""), encoder)
    }
}

/// `mesh_authz_denied_total`'s labels: the deciding policy, the caller and
/// the denying workload (this one).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DeniedLabels {
    policy: PolicyLabel,
    /// The caller's SPIFFE ID; `""` without a verified one (plaintext).
    source_principal: PolicyLabel,
    destination_workload: Name,
    destination_workload_namespace: Name,
}

/// The mesh's own counters, derived from each request's
/// [`DecisionRecord`] when its response ends (so the layers that decide
/// only fill the record):
///
/// | metric | labels | from |
/// |---|---|---|
/// | `proxyless_retries_total` | `cluster_name`, `reason` | [`DecisionRecord::retrying`] |
/// | `proxyless_retry_refusals_total` | `cluster_name`, `reason` (`retry_budget`, `max_retries`) | [`DecisionRecord::retry_refused`] |
/// | `proxyless_breaker_overflows_total` | `cluster_name`, `limit` | [`DecisionRecord::breaker_overflow`] |
/// | `proxyless_outlier_ejections_total` | `cluster_name` | [`DecisionRecord::outlier_ejected`] |
/// | `proxyless_timeouts_total` | `cluster_name` | response flag `UT` |
/// | `proxyless_faults_injected_total` | `cluster_name`, `kind` (`delay`, `abort`) | flags `DI`, `FI` |
/// | `proxyless_deadline_drops_total` | `direction` (`outbound`, `inbound`) | flag `DT` |
/// | `proxyless_rate_limited_total` | `direction` (`outbound`: the client stack, `inbound`: the server stack) | flag `RL` |
/// | `mesh_authz_dry_run_total` | `action` (`allow`, `deny`), `result` (`allowed`, `denied`), `policy` (`<ns>/<name>` of the matching dry-run policy, `""` when none matched) | [`DecisionRecord::dry_run`] |
/// | `mesh_authz_denied_total` | `policy` (`<ns>/<name>` of the DENY policy, `""` for default deny), `source_principal` (caller's SPIFFE ID, `""` when plaintext), `destination_workload`, `destination_workload_namespace` | [`DecisionRecord::authorization`] denied |
///
/// [`DecisionRecord`]: super::DecisionRecord
/// [`DecisionRecord::retrying`]: super::DecisionRecord::retrying
/// [`DecisionRecord::retry_refused`]: super::DecisionRecord::retry_refused
/// [`DecisionRecord::breaker_overflow`]: super::DecisionRecord::breaker_overflow
/// [`DecisionRecord::outlier_ejected`]: super::DecisionRecord::outlier_ejected
/// [`DecisionRecord::dry_run`]: super::DecisionRecord::dry_run
/// [`DecisionRecord::authorization`]: super::DecisionRecord::authorization
///
/// The dry-run counter (Envoy's RBAC `shadow_allowed` / `shadow_denied`
/// statistics, with the policy as a label) goes up once per request and
/// per action that has dry-run policies, on the server that evaluated them.
/// Its name is part of the mesh's interface (dashboards and the
/// control-plane tests read it), so it keeps its `mesh_` prefix.
///
/// The denial counter (Envoy's RBAC `denied` statistic, with the policy
/// and the caller as labels) goes up once per request the server's
/// authorization refused; it is what the service graph's "recent
/// authorization denials" read (pushed to mesh-control, or queried from
/// Prometheus). Its cardinality is bounded by the policies times the
/// verified callers: plaintext callers all count as `""`.
///
/// The rate limit counter is Envoy's local rate limit statistic
/// `<stat_prefix>.http_local_rate_limit.enforced`: requests a local rate
/// limit refused (answered 429 / UNAVAILABLE or RESOURCE_EXHAUSTED, flag
/// `RL`), per side. Requests over the limit but let through
/// (`filter_enforced` below 100%, Envoy's `rate_limited` minus `enforced`)
/// are not in it.
#[derive(Debug, Clone)]
pub(crate) struct MeshMetrics {
    retries: Family<ReasonLabels, Counter>,
    retry_refusals: Family<ReasonLabels, Counter>,
    overflows: Family<LimitLabels, Counter>,
    ejections: Family<ClusterLabels, Counter>,
    timeouts: Family<ClusterLabels, Counter>,
    faults: Family<KindLabels, Counter>,
    deadline_drops: Family<DirectionLabels, Counter>,
    dry_run: Family<DryRunLabels, Counter>,
    rate_limited: Family<DirectionLabels, Counter>,
    denied: Family<DeniedLabels, Counter>,
}

impl MeshMetrics {
    fn new(registry: &mut Registry) -> Self {
        let m = MeshMetrics {
            retries: Family::default(),
            retry_refusals: Family::default(),
            overflows: Family::default(),
            ejections: Family::default(),
            timeouts: Family::default(),
            faults: Family::default(),
            deadline_drops: Family::default(),
            dry_run: Family::default(),
            rate_limited: Family::default(),
            denied: Family::default(),
        };
        registry.register(
            "proxyless_retries",
            "Retries sent, by cluster and retry condition",
            m.retries.clone(),
        );
        registry.register(
            "proxyless_retry_refusals",
            "Retries wanted but refused by the retry budget or max_retries (flag URX)",
            m.retry_refusals.clone(),
        );
        registry.register(
            "proxyless_breaker_overflows",
            "Requests refused by a circuit breaker limit (flag UO)",
            m.overflows.clone(),
        );
        registry.register(
            "proxyless_outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "proxyless_timeouts",
            "Requests ended by their route or per-try timeout (flag UT)",
            m.timeouts.clone(),
        );
        registry.register(
            "proxyless_faults_injected",
            "Faults injected (delays: flag DI, aborts: flag FI)",
            m.faults.clone(),
        );
        registry.register(
            "proxyless_deadline_drops",
            "Requests dropped because their deadline had passed (flag DT)",
            m.deadline_drops.clone(),
        );
        registry.register(
            "proxyless_rate_limited",
            "Requests refused by a local rate limit (EnvoyFilter local_ratelimit; flag RL), by \
             direction: outbound (the client stack, before any connection) or inbound (the \
             server stack)",
            m.rate_limited.clone(),
        );
        registry.register(
            "mesh_authz_dry_run",
            "What dry-run authorization policies (istio.io/dry-run) would have decided, by \
             action, result and matching policy; never enforced",
            m.dry_run.clone(),
        );
        registry.register(
            "mesh_authz_denied",
            "Requests this workload's authorization denied (403 / PERMISSION_DENIED), by deciding \
             policy (\"\" for default deny), caller principal and denying workload",
            m.denied.clone(),
        );
        m
    }

    /// Counts what the client stack did to one request to `cluster`.
    pub(crate) fn client_request(
        &self,
        cluster: &Name,
        record: &DecisionRecord,
        flags: ResponseFlags,
    ) {
        for (reason, n) in record.retries_by_reason() {
            self.retries
                .get_or_create(&ReasonLabels {
                    cluster_name: cluster.clone(),
                    reason,
                })
                .inc_by(u64::from(n));
        }
        for refusal in record.refusals() {
            self.retry_refusals
                .get_or_create(&ReasonLabels {
                    cluster_name: cluster.clone(),
                    reason: refusal.name(),
                })
                .inc();
        }
        for limit in record.overflows() {
            self.overflows
                .get_or_create(&LimitLabels {
                    cluster_name: cluster.clone(),
                    limit: limit.name(),
                })
                .inc();
        }
        let ejections = record.ejections();
        if ejections > 0 {
            self.ejections
                .get_or_create(&ClusterLabels {
                    cluster_name: cluster.clone(),
                })
                .inc_by(u64::from(ejections));
        }
        if flags.contains(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT) {
            self.timeouts
                .get_or_create(&ClusterLabels {
                    cluster_name: cluster.clone(),
                })
                .inc();
        }
        for (flag, kind) in [
            (ResponseFlags::DELAY_INJECTED, "delay"),
            (ResponseFlags::FAULT_INJECTED, "abort"),
        ] {
            if flags.contains(flag) {
                self.faults
                    .get_or_create(&KindLabels {
                        cluster_name: cluster.clone(),
                        kind,
                    })
                    .inc();
            }
        }
        if flags.contains(ResponseFlags::DURATION_TIMEOUT) {
            self.deadline_drop("outbound");
        }
        if flags.contains(ResponseFlags::RATE_LIMITED) {
            self.rate_limited("outbound");
        }
    }

    /// Counts what the server stack did to one request.
    pub(crate) fn server_request(&self, flags: ResponseFlags) {
        if flags.contains(ResponseFlags::DURATION_TIMEOUT) {
            self.deadline_drop("inbound");
        }
        if flags.contains(ResponseFlags::RATE_LIMITED) {
            self.rate_limited("inbound");
        }
    }

    /// Counts what the dry-run policies would have decided for one request.
    pub(crate) fn dry_run(&self, result: &mesh_core::rbac::DryRun) {
        for (action, shadow) in [("allow", &result.allow), ("deny", &result.deny)] {
            if let Some(shadow) = shadow {
                self.dry_run
                    .get_or_create(&DryRunLabels {
                        action,
                        result: super::record::shadow_result(shadow.allowed),
                        policy: PolicyLabel(shadow.policy.clone()),
                    })
                    .inc();
            }
        }
    }

    /// Counts one request this workload's authorization denied: by the
    /// policy that decided (`None`: default deny, or STRICT mTLS without a
    /// client certificate), from `source_principal` (`None`: plaintext),
    /// at `own`, the denying workload. Called only for a denial, so an
    /// allowed request never reaches it.
    pub(crate) fn denied(
        &self,
        policy: Option<&Name>,
        source_principal: Option<&Name>,
        own: &Peer,
    ) {
        self.denied
            .get_or_create(&DeniedLabels {
                policy: PolicyLabel(policy.cloned()),
                source_principal: PolicyLabel(source_principal.cloned()),
                destination_workload: own.workload.clone(),
                destination_workload_namespace: own.namespace.clone(),
            })
            .inc();
    }

    /// `proxyless_retries_total` and `mesh_authz_denied_total` alone, in the
    /// text format: what the service graph's push reads besides the Istio
    /// series. A family cannot be walked, but encoding two small ones (per
    /// cluster and reason; per policy and caller) costs a few lines instead
    /// of the whole registry's thousands.
    pub(crate) fn render_graph_families(&self) -> String {
        let mut registry = Registry::default();
        registry.register("proxyless_retries", "", self.retries.clone());
        registry.register("mesh_authz_denied", "", self.denied.clone());
        let mut out = String::new();
        if prometheus_client::encoding::text::encode_registry(&mut out, &registry).is_err() {
            tracing::warn!("encoding the retry and denial counters failed");
        }
        out
    }

    fn rate_limited(&self, direction: &'static str) {
        self.rate_limited
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    fn deadline_drop(&self, direction: &'static str) {
        self.deadline_drops
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }
}

/// Reads the state of xDS clients at scrape time. Holds them weakly:
/// metrics must not keep a client (its ADS stream, its cache writes) alive
/// after the app dropped its last handle; a dead one leaves the scrape.
#[derive(Debug, Default)]
struct XdsCollector {
    clients: Mutex<Vec<mesh_xds_client::WeakXdsClient>>,
}

const TYPES: [(&str, mesh_core::xds::ResourceType); 4] = [
    ("LDS", mesh_core::xds::ResourceType::Listener),
    ("RDS", mesh_core::xds::ResourceType::RouteConfig),
    ("CDS", mesh_core::xds::ResourceType::Cluster),
    ("EDS", mesh_core::xds::ResourceType::Endpoints),
];

impl Collector for XdsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let clients: Vec<XdsClient> = {
            let mut held = self.clients.lock().unwrap_or_else(PoisonError::into_inner);
            held.retain(|weak| weak.upgrade().is_some());
            held.iter().filter_map(|weak| weak.upgrade()).collect()
        };
        {
            let mut metric = encoder.encode_descriptor(
                "proxyless_xds_connected",
                "1 when the xDS stream to the control server delivers config, else 0.",
                None,
                MetricType::Gauge,
            )?;
            for client in &clients {
                let connected =
                    client.connected_server().is_some() && client.last_error().is_none();
                let labels = [("node_id", client.bootstrap().node_id())];
                ConstGauge::new(i64::from(connected)).encode(metric.encode_family(&labels)?)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "proxyless_xds_stale",
                "1 while the config in use came from the cache file (no control server has answered since start), else 0.",
                None,
                MetricType::Gauge,
            )?;
            for client in &clients {
                let labels = [("node_id", client.bootstrap().node_id())];
                ConstGauge::new(i64::from(client.stale_since().is_some()))
                    .encode(metric.encode_family(&labels)?)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "proxyless_xds_stale_since_timestamp_seconds",
                "When the cached config in use was written (Unix seconds); 0 when not stale.",
                None,
                MetricType::Gauge,
            )?;
            for client in &clients {
                let since = client
                    .stale_since()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
                let labels = [("node_id", client.bootstrap().node_id())];
                ConstGauge::new(since).encode(metric.encode_family(&labels)?)?;
            }
        }
        {
            let mut metric = encoder.encode_descriptor(
                "proxyless_xds_config_version_info",
                "The applied (ACKed) config version per resource type; the value is 1.",
                None,
                MetricType::Gauge,
            )?;
            for client in &clients {
                let snapshot = client.snapshot();
                let v = &snapshot.versions;
                let node_id = client.bootstrap().node_id();
                for (name, version) in [
                    ("LDS", &v.listeners),
                    ("RDS", &v.route_configs),
                    ("CDS", &v.clusters),
                    ("EDS", &v.endpoints),
                ] {
                    let labels = [
                        ("node_id", node_id),
                        ("type", name),
                        ("version", &**version),
                    ];
                    ConstGauge::new(1i64).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "proxyless_xds_rejected_resources",
            "Resources whose latest version was rejected (NACKed), per resource type.",
            None,
            MetricType::Gauge,
        )?;
        for client in &clients {
            let status = client.sync_status();
            let node_id = client.bootstrap().node_id();
            for (name, kind) in TYPES {
                let count = status.rejected().filter(|(t, _, _)| *t == kind).count();
                let labels = [("node_id", node_id), ("type", name)];
                ConstGauge::new(i64::try_from(count).unwrap_or(i64::MAX))
                    .encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The process's metrics: Istio's request metrics, the mesh's own, the xDS
/// clients' state, and any metrics the application registers. Cheap to
/// clone; every service of a process shares one (Istio's labels tell the
/// services apart). Render it with [`MetricsRegistry::render`] or serve it
/// with [`serve_metrics`](super::serve_metrics).
///
/// Istio's label sets are built once per series (one combination of the
/// peers, service, response code, flags, ...) and reused: a request finds
/// its series' counter and histograms in a cache, without building or
/// hashing its 25 labels. The cache holds at most 2,048 series (about
/// 200 bytes each); beyond that, requests of further series are still
/// counted exactly, at the cost of building their labels each time.
#[derive(Clone)]
pub struct MetricsRegistry {
    inner: Arc<RegistryInner>,
}

struct RegistryInner {
    registry: Mutex<Registry>,
    istio: IstioMetrics,
    mesh: MeshMetrics,
    xds: Arc<XdsCollector>,
}

impl MetricsRegistry {
    /// A registry with Istio's metrics and the mesh's own registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let istio = IstioMetrics::new(&mut registry);
        let mesh = MeshMetrics::new(&mut registry);
        let xds = Arc::new(XdsCollector::default());
        registry.register_collector(Box::new(xds.clone()));
        MetricsRegistry {
            inner: Arc::new(RegistryInner {
                registry: Mutex::new(registry),
                istio,
                mesh,
                xds,
            }),
        }
    }

    pub(crate) fn mesh(&self) -> &MeshMetrics {
        &self.inner.mesh
    }

    pub(crate) fn istio(&self) -> &IstioMetrics {
        &self.inner.istio
    }

    /// Reports `client`'s connection state, applied versions and rejected
    /// resources on every scrape (`proxyless_xds_*`, labelled by node id),
    /// for as long as the app holds the client: the registry keeps only a
    /// weak handle, so it never keeps a dropped client running.
    pub fn watch_xds(&self, client: &XdsClient) {
        self.inner
            .xds
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(client.downgrade());
    }

    /// Registers the application's own metrics.
    pub fn register(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self
            .inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner));
    }

    /// Every metric in the Prometheus / OpenMetrics text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let registry = self
            .inner
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Writing to a String does not fail; a collector's error would end
        // the text early, which the trailing `# EOF` then still closes.
        if prometheus_client::encoding::text::encode_registry(&mut out, &registry).is_err() {
            tracing::warn!("encoding the metrics failed");
        }
        let _ = prometheus_client::encoding::text::encode_eof(&mut out);
        out
    }
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        MetricsRegistry::new()
    }
}

impl std::fmt::Debug for MetricsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsRegistry").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{BreakerLimit, Identity, RetryRefusal};

    fn observe(
        m: &IstioMetrics,
        src: &PeerRef,
        dst: &PeerRef,
        svc: &Arc<ServiceLabels>,
        code: u16,
    ) {
        m.observe(&Observation {
            reporter: Reporter::Source,
            source: src,
            source_principal: None,
            destination: dst,
            destination_principal: None,
            service: svc,
            protocol: RequestProtocol::Http,
            response_code: code,
            grpc_status: None,
            flags: ResponseFlags::empty(),
            security: Security::Unknown,
            duration_ms: 3.0,
            request_bytes: 10,
            response_bytes: 2000,
        });
    }

    #[test]
    fn names_and_labels_are_istios() {
        let registry = MetricsRegistry::new();
        let m = registry.istio();
        let src = Arc::new(Identity::new("frontend", "shop").with_version("v1").peer());
        let dst = m.peer_from_header(&Identity::new("catalog", "shop").peer().to_header());
        let svc = m.service_of_cluster(&"outbound|80|v1|catalog.shop.svc.cluster.local".into());
        observe(m, &src, &dst, &svc, 200);
        observe(m, &src, &dst, &svc, 200);
        observe(m, &src, &dst, &svc, 503);
        let text = registry.render();
        let line = |prefix: &str| {
            text.lines()
                .filter(|l| l.starts_with(prefix))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        };
        let counts = line("istio_requests_total{");
        assert_eq!(counts.len(), 2, "{text}");
        assert!(
            counts
                .iter()
                .any(|l| l.contains("response_code=\"200\"") && l.ends_with(" 2"))
        );
        assert!(
            counts
                .iter()
                .any(|l| l.contains("response_code=\"503\"") && l.ends_with(" 1"))
        );
        for l in &counts {
            let keys: Vec<&str> = l
                .split('{')
                .nth(1)
                .unwrap()
                .split("\",")
                .map(|kv| kv.split('=').next().unwrap())
                .collect();
            assert_eq!(keys, ISTIO_LABELS);
        }
        assert!(text.contains("# TYPE istio_request_duration_milliseconds histogram"));
        assert_eq!(line("istio_request_duration_milliseconds_count{").len(), 2);
        assert_eq!(line("istio_request_bytes_count{").len(), 2);
        assert_eq!(line("istio_response_bytes_count{").len(), 2);
        assert!(text.contains("destination_service=\"catalog.shop.svc.cluster.local\""));
        assert!(text.contains("source_version=\"v1\""));
        assert!(text.contains("grpc_response_status=\"\""));
        assert!(text.contains("response_flags=\"-\""));
        assert!(!text.contains("milliseconds_milliseconds"));
        assert!(text.ends_with("# EOF\n"));
    }

    /// The label set of a (peers, service, code, ...) series is built once
    /// and reused; a new code is a new series; past the bound the cache
    /// stops growing and requests are still counted exactly.
    #[test]
    fn label_sets_are_built_once_per_series_and_the_cache_is_bounded() {
        let registry = MetricsRegistry::new();
        let m = registry.istio();
        let src = Arc::new(Identity::new("frontend", "shop").peer());
        let dst = Arc::new(Identity::new("catalog", "shop").peer());
        let svc = m.service_of_cluster(&"outbound|80||catalog.shop.svc.cluster.local".into());
        let count = |code: u16| {
            let needle = format!("response_code=\"{code}\"");
            registry
                .render()
                .lines()
                .filter(|l| l.starts_with("istio_requests_total{") && l.contains(&needle))
                .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        };
        observe(m, &src, &dst, &svc, 200);
        observe(m, &src, &dst, &svc, 200);
        assert_eq!(m.cached_series(), 1, "one label set for the same series");
        assert_eq!(count(200), [2]);
        observe(m, &src, &dst, &svc, 503);
        assert_eq!(m.cached_series(), 2, "a new code is a new series");
        assert_eq!(count(503), [1]);
        let limit = u16::try_from(SERIES_CACHE_LIMIT).unwrap();
        for code in 1000..1000 + limit {
            observe(m, &src, &dst, &svc, code);
        }
        assert_eq!(m.cached_series(), SERIES_CACHE_LIMIT, "the bound holds");
        // Past the bound: counted, exactly, without being cached.
        let past = 1000 + limit;
        observe(m, &src, &dst, &svc, past);
        observe(m, &src, &dst, &svc, past);
        assert_eq!(m.cached_series(), SERIES_CACHE_LIMIT);
        assert_eq!(count(past), [2]);
        // Cached series keep counting.
        observe(m, &src, &dst, &svc, 200);
        assert_eq!(count(200), [3]);
    }

    /// The one-memo destination is what the two lookups give, for the
    /// request before (memo hit) and for a new cluster or new labels
    /// (misses), across two registries on one thread.
    #[test]
    fn a_destination_is_its_service_and_endpoint_peer() {
        let one = MetricsRegistry::new();
        let two = MetricsRegistry::new();
        let v1: EndpointLabels = Arc::from([
            ("app".into(), "catalog".into()),
            ("version".into(), "v1".into()),
        ]);
        let v2: EndpointLabels = Arc::from([
            ("app".into(), "catalog".into()),
            ("version".into(), "v2".into()),
        ]);
        let a: Name = "outbound|80||catalog.shop.svc.cluster.local".into();
        let b: Name = "outbound|80||reviews.shop.svc.cluster.local".into();
        let cases = [
            (&one, &a, &v1),
            (&one, &a, &v1),
            (&one, &b, &v1),
            (&one, &b, &v2),
            (&two, &b, &v2),
            (&one, &b, &v2),
        ];
        for (registry, cluster, labels) in cases {
            let m = registry.istio();
            let (service, peer) = m.destination_of_endpoint(cluster, labels);
            let expected = m.service_of_cluster(cluster);
            assert!(Arc::ptr_eq(&service, &expected), "{cluster}");
            assert!(
                Arc::ptr_eq(&peer, &m.peer_from_endpoint(&expected, labels)),
                "{cluster}"
            );
        }
        // A cluster name equal by value (another allocation) is the same.
        let again: Name = String::from(&*a).into();
        let m = one.istio();
        let (service, _) = m.destination_of_endpoint(&again, &v1);
        assert!(Arc::ptr_eq(&service, &m.service_of_cluster(&a)));
    }

    #[test]
    fn hostile_peer_headers_stop_being_interned() {
        let registry = MetricsRegistry::new();
        let m = registry.istio();
        for i in 0..(PEER_CACHE_LIMIT + 10) {
            let value = HeaderValue::from_str(&format!("wl=w{i}")).unwrap();
            let peer = m.peer_from_header(&value);
            if i >= PEER_CACHE_LIMIT {
                assert!(Arc::ptr_eq(&peer, m.unknown_peer()));
            }
        }
        let bad = m.peer_from_header(&HeaderValue::from_static("not a peer"));
        assert!(Arc::ptr_eq(&bad, m.unknown_peer()));
    }

    #[test]
    fn mesh_metrics_come_from_decision_records() {
        use mesh_core::model::{LbPolicy, RetryOn};
        let registry = MetricsRegistry::new();
        let cluster: Name = "outbound|80||catalog.shop.svc.cluster.local".into();
        let record = DecisionRecord::new();
        record.cluster(&cluster, LbPolicy::Random);
        record.retrying(RetryOn::CONNECT_FAILURE, std::time::Duration::ZERO);
        record.retrying(RetryOn::CONNECT_FAILURE, std::time::Duration::ZERO);
        record.retry_refused(RetryRefusal::Budget);
        record.breaker_overflow(BreakerLimit::MaxRequests);
        record.outlier_ejected("127.0.0.1:1".parse().unwrap());
        record.fault_abort_http(http::StatusCode::SERVICE_UNAVAILABLE);
        let flags = record.flags()
            | ResponseFlags::UPSTREAM_REQUEST_TIMEOUT
            | ResponseFlags::DURATION_TIMEOUT
            | ResponseFlags::RATE_LIMITED;
        registry.mesh().client_request(&cluster, &record, flags);
        registry
            .mesh()
            .server_request(ResponseFlags::DURATION_TIMEOUT);
        registry.mesh().server_request(ResponseFlags::RATE_LIMITED);
        registry.mesh().server_request(ResponseFlags::RATE_LIMITED);
        let text = registry.render();
        let c = "cluster_name=\"outbound|80||catalog.shop.svc.cluster.local\"";
        for expected in [
            format!("proxyless_retries_total{{{c},reason=\"connect-failure\"}} 2"),
            format!("proxyless_retry_refusals_total{{{c},reason=\"retry_budget\"}} 1"),
            format!("proxyless_breaker_overflows_total{{{c},limit=\"max_requests\"}} 1"),
            format!("proxyless_outlier_ejections_total{{{c}}} 1"),
            format!("proxyless_timeouts_total{{{c}}} 1"),
            format!("proxyless_faults_injected_total{{{c},kind=\"abort\"}} 1"),
            "proxyless_deadline_drops_total{direction=\"outbound\"} 1".to_owned(),
            "proxyless_deadline_drops_total{direction=\"inbound\"} 1".to_owned(),
            "proxyless_rate_limited_total{direction=\"outbound\"} 1".to_owned(),
            "proxyless_rate_limited_total{direction=\"inbound\"} 2".to_owned(),
        ] {
            assert!(text.contains(&expected), "missing {expected}\n{text}");
        }
    }
}

//! Who a service is, in the words Istio's telemetry uses.
//!
//! Istio labels every request metric with the workload on each side:
//! workload name and namespace, principal, `app` and `version` labels, the
//! canonical service and revision, and the cluster
//! ([Istio standard metrics](https://istio.io/latest/docs/reference/config/metrics/)).
//! A sidecar learns its own from the pod (labels `app`, `version`,
//! `service.istio.io/canonical-name`, `service.istio.io/canonical-revision`)
//! and the peer's through metadata exchange. Here [`Identity`] is built from
//! the gRPC bootstrap's node (Istio's node metadata keys: `NAMESPACE`,
//! `WORKLOAD_NAME`, `CLUSTER_ID`, `LABELS`) or in code, and the peer's
//! travels in one request and one response header, `x-proxyless-peer`,
//! exchanged only between mesh workloads (a server answers it only to a
//! request that carried it) and removed before the application sees it.
//! Like Istio's metadata exchange it is not authenticated: principals come
//! from mTLS only, never from the header.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use http::HeaderValue;
use mesh_core::model::Name;
use opentelemetry::KeyValue;
use opentelemetry_sdk::Resource;

/// The peer metadata header exchanged between mesh workloads.
pub const PEER_HEADER: &str = "x-proxyless-peer";

/// [`PEER_HEADER`] as a header name (lookups need no parsing).
pub(crate) const PEER_HEADER_NAME: http::HeaderName = http::HeaderName::from_static(PEER_HEADER);

/// What Istio reports when a label's value is not known.
pub(crate) const UNKNOWN: &str = "unknown";

/// The default domain suffix of service hosts.
const DEFAULT_DOMAIN_SUFFIX: &str = "svc.cluster.local";

const CANONICAL_NAME: &str = "service.istio.io/canonical-name";
const CANONICAL_REVISION: &str = "service.istio.io/canonical-revision";
const K8S_NAME: &str = "app.kubernetes.io/name";
const K8S_VERSION: &str = "app.kubernetes.io/version";

/// A service's identity for traces and metrics: its mesh service name and
/// namespace, workload, labels, cluster and principal.
///
/// Derived values follow Istio's rules: the canonical service is the
/// `service.istio.io/canonical-name` label, else `app.kubernetes.io/name`,
/// else `app`, else the service name; the canonical revision is
/// `service.istio.io/canonical-revision`, else `app.kubernetes.io/version`,
/// else `version`, else `latest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    service: Name,
    namespace: Name,
    workload: Option<Name>,
    instance: Option<Name>,
    cluster: Option<Name>,
    principal: Option<Name>,
    domain_suffix: Name,
    labels: BTreeMap<Name, Name>,
}

impl Identity {
    /// The identity of mesh service `service` in `namespace`.
    pub fn new(service: impl Into<Name>, namespace: impl Into<Name>) -> Self {
        Identity {
            service: service.into(),
            namespace: namespace.into(),
            workload: None,
            instance: None,
            cluster: None,
            principal: None,
            domain_suffix: DEFAULT_DOMAIN_SUFFIX.into(),
            labels: BTreeMap::new(),
        }
    }

    /// The identity of the node in `bootstrap`, serving (or calling as)
    /// `service`: the namespace (`NAMESPACE`), the node id as instance,
    /// and from `node.metadata`: `WORKLOAD_NAME`, `CLUSTER_ID` and the
    /// `LABELS` object (`{"app": "catalog", "version": "v2"}`).
    pub fn from_bootstrap(bootstrap: &mesh_xds_client::Bootstrap, service: &str) -> Self {
        let metadata = bootstrap.metadata();
        let text = |key: &str| {
            metadata
                .get(key)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .map(Name::from)
        };
        let mut identity = Identity::new(service, bootstrap.namespace());
        identity.instance = Some(bootstrap.node_id().into());
        identity.workload = text("WORKLOAD_NAME");
        identity.cluster = text("CLUSTER_ID");
        if let Some(labels) = metadata.get("LABELS").and_then(|v| v.as_object()) {
            for (k, v) in labels {
                if let Some(v) = v.as_str() {
                    identity.labels.insert(k.as_str().into(), v.into());
                }
            }
        }
        identity
    }

    /// The workload name (Istio: the Deployment's); default: the service.
    pub fn with_workload(mut self, workload: impl Into<Name>) -> Self {
        self.workload = Some(workload.into());
        self
    }

    /// A label (`app`, `version`, `service.istio.io/canonical-name`, ...).
    pub fn with_label(mut self, key: impl Into<Name>, value: impl Into<Name>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// The `version` label (and so the canonical revision, unless set).
    pub fn with_version(self, version: impl Into<Name>) -> Self {
        self.with_label("version", version)
    }

    /// The cluster this workload runs in (Istio's `CLUSTER_ID`).
    pub fn with_cluster(mut self, cluster: impl Into<Name>) -> Self {
        self.cluster = Some(cluster.into());
        self
    }

    /// The workload's own SPIFFE ID, once it has a certificate.
    pub fn with_principal(mut self, spiffe_id: impl Into<Name>) -> Self {
        self.principal = Some(spiffe_id.into());
        self
    }

    /// The instance id (`service.instance.id`; default: the xDS node id).
    pub fn with_instance(mut self, instance: impl Into<Name>) -> Self {
        self.instance = Some(instance.into());
        self
    }

    /// The domain suffix of service hosts (default `svc.cluster.local`).
    pub fn with_domain_suffix(mut self, suffix: impl Into<Name>) -> Self {
        self.domain_suffix = suffix.into();
        self
    }

    /// The mesh service name (`catalog`).
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The namespace (`shop`).
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The workload name.
    pub fn workload(&self) -> &str {
        self.workload.as_deref().unwrap_or(&self.service)
    }

    /// The instance id.
    pub fn instance(&self) -> &str {
        self.instance.as_deref().unwrap_or(&self.service)
    }

    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(|v| &**v)
    }

    /// The `app` label, or `unknown`.
    pub fn app(&self) -> &str {
        self.label("app").unwrap_or(UNKNOWN)
    }

    /// The `version` label, or `unknown`.
    pub fn version(&self) -> &str {
        self.label("version").unwrap_or(UNKNOWN)
    }

    /// The canonical service (see the type's docs).
    pub fn canonical_service(&self) -> &str {
        self.label(CANONICAL_NAME)
            .or_else(|| self.label(K8S_NAME))
            .or_else(|| self.label("app"))
            .unwrap_or(&self.service)
    }

    /// The canonical revision (see the type's docs).
    pub fn canonical_revision(&self) -> &str {
        self.label(CANONICAL_REVISION)
            .or_else(|| self.label(K8S_VERSION))
            .or_else(|| self.label("version"))
            .unwrap_or("latest")
    }

    /// The cluster, or `unknown`.
    pub fn cluster(&self) -> &str {
        self.cluster.as_deref().unwrap_or(UNKNOWN)
    }

    /// The SPIFFE ID, if known.
    pub fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }

    /// The SPIFFE ID as the shared string, for labels kept per request
    /// (cloned, not copied).
    pub(crate) fn principal_name(&self) -> Option<&Name> {
        self.principal.as_ref()
    }

    /// The service's host: `<service>.<namespace>.<domain suffix>`.
    pub fn service_host(&self) -> String {
        format!("{}.{}.{}", self.service, self.namespace, self.domain_suffix)
    }

    /// The OpenTelemetry resource of this service: `service.name` (the
    /// mesh service), `service.namespace`, `service.version` (the canonical
    /// revision), `service.instance.id`, plus the SDK's `telemetry.sdk.*`.
    pub fn resource(&self) -> Resource {
        self.resource_with(Vec::new())
    }

    /// [`Identity::resource`] with extra attributes (which never override
    /// the identity's own).
    pub fn resource_with(&self, extra: Vec<KeyValue>) -> Resource {
        let own = [
            KeyValue::new("service.name", self.service.to_string()),
            KeyValue::new("service.namespace", self.namespace.to_string()),
            KeyValue::new("service.version", self.canonical_revision().to_string()),
            KeyValue::new("service.instance.id", self.instance().to_string()),
        ];
        let own_keys: Vec<_> = own.iter().map(|kv| kv.key.clone()).collect();
        let extra = extra.into_iter().filter(|kv| !own_keys.contains(&kv.key));
        Resource::builder_empty()
            .with_detector(Box::new(
                opentelemetry_sdk::resource::TelemetryResourceDetector,
            ))
            .with_attributes(extra)
            .with_attributes(own)
            .build()
    }

    /// This workload as a metric peer (the principal is left out: it comes
    /// from mTLS per connection).
    pub(crate) fn peer(&self) -> Peer {
        Peer {
            workload: self.workload().into(),
            namespace: self.namespace.clone(),
            app: self.app().into(),
            version: self.version().into(),
            canonical_service: self.canonical_service().into(),
            canonical_revision: self.canonical_revision().into(),
            cluster: self.cluster().into(),
        }
    }

    /// This service as a metric destination service.
    pub(crate) fn service_labels(&self) -> ServiceLabels {
        ServiceLabels {
            host: self.service_host().into(),
            name: self.service.clone(),
            namespace: self.namespace.clone(),
            subset: None,
        }
    }
}

/// One side of a request in Istio's labels (minus the principal).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Peer {
    pub(crate) workload: Name,
    pub(crate) namespace: Name,
    pub(crate) app: Name,
    pub(crate) version: Name,
    pub(crate) canonical_service: Name,
    pub(crate) canonical_revision: Name,
    pub(crate) cluster: Name,
}

impl Peer {
    /// Every label `unknown`.
    pub(crate) fn unknown() -> Self {
        let u: Name = UNKNOWN.into();
        Peer {
            workload: u.clone(),
            namespace: u.clone(),
            app: u.clone(),
            version: u.clone(),
            canonical_service: u.clone(),
            canonical_revision: u.clone(),
            cluster: u,
        }
    }

    /// A destination known only by its service and endpoint labels (no
    /// metadata exchange): `app` / `version` labels, the subset as the
    /// version otherwise, the service name as canonical service.
    pub(crate) fn from_endpoint(
        service: &ServiceLabels,
        app: Option<&Name>,
        version: Option<&Name>,
    ) -> Self {
        let u: Name = UNKNOWN.into();
        let version = version.or(service.subset.as_ref());
        Peer {
            workload: u.clone(),
            namespace: service.namespace.clone(),
            app: app.cloned().unwrap_or_else(|| u.clone()),
            version: version.cloned().unwrap_or_else(|| u.clone()),
            canonical_service: app.cloned().unwrap_or_else(|| service.name.clone()),
            canonical_revision: version.cloned().unwrap_or_else(|| "latest".into()),
            cluster: u,
        }
    }

    /// The header value announcing this peer:
    /// `wl=..;ns=..;app=..;ver=..;svc=..;rev=..;cl=..`, values
    /// percent-encoded.
    pub(crate) fn to_header(&self) -> HeaderValue {
        let mut s = String::new();
        for (i, (key, value)) in self.fields().into_iter().enumerate() {
            if i > 0 {
                s.push(';');
            }
            s.push_str(key);
            s.push('=');
            percent_encode(value, &mut s);
        }
        HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    /// The peer in a header value; `None` when malformed. Missing fields
    /// are `unknown`.
    pub(crate) fn from_header(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        let mut peer = Peer::unknown();
        for part in text.split(';').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=')?;
            let value: Name = percent_decode(value)?.into();
            match key {
                "wl" => peer.workload = value,
                "ns" => peer.namespace = value,
                "app" => peer.app = value,
                "ver" => peer.version = value,
                "svc" => peer.canonical_service = value,
                "rev" => peer.canonical_revision = value,
                "cl" => peer.cluster = value,
                _ => {}
            }
        }
        Some(peer)
    }

    fn fields(&self) -> [(&'static str, &str); 7] {
        [
            ("wl", &self.workload),
            ("ns", &self.namespace),
            ("app", &self.app),
            ("ver", &self.version),
            ("svc", &self.canonical_service),
            ("rev", &self.canonical_revision),
            ("cl", &self.cluster),
        ]
    }
}

/// A destination service in Istio's labels: `destination_service` (the
/// host), `destination_service_name`, `destination_service_namespace`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ServiceLabels {
    pub(crate) host: Name,
    pub(crate) name: Name,
    pub(crate) namespace: Name,
    /// The DestinationRule subset of the cluster, if any.
    pub(crate) subset: Option<Name>,
}

impl ServiceLabels {
    /// The service of an Istio-style cluster name
    /// (`outbound|8080|v1|catalog.shop.svc.cluster.local`); any other name
    /// is taken as the host.
    pub(crate) fn from_cluster(cluster: &str) -> Self {
        let mut parts = cluster.split('|');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("outbound" | "inbound"), Some(_port), Some(subset), Some(host)) => {
                let mut s = ServiceLabels::from_host(host);
                s.subset = (!subset.is_empty()).then(|| subset.into());
                s
            }
            _ => ServiceLabels::from_host(cluster),
        }
    }

    /// The service of a host: `<name>.<namespace>.svc.<...>` gives name
    /// and namespace (Istio's Kubernetes services); any other host is its
    /// own name, namespace `unknown`. A port is dropped.
    pub(crate) fn from_host(host: &str) -> Self {
        let host = strip_port(host);
        let labels: Vec<&str> = host.split('.').collect();
        let (name, namespace) = match labels.as_slice() {
            [name, namespace, "svc", ..] => ((*name).into(), (*namespace).into()),
            _ => (Name::from(host), Name::from(UNKNOWN)),
        };
        ServiceLabels {
            host: host.into(),
            name,
            namespace,
            subset: None,
        }
    }

    /// Every label `unknown`.
    pub(crate) fn unknown() -> Self {
        ServiceLabels {
            host: UNKNOWN.into(),
            name: UNKNOWN.into(),
            namespace: UNKNOWN.into(),
            subset: None,
        }
    }
}

/// `catalog:8080` → `catalog`; `[::1]:80` → `[::1]`.
pub(crate) fn strip_port(host: &str) -> &str {
    if let Some(end) = host.rfind(']') {
        return &host[..=end];
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

fn percent_encode(value: &str, out: &mut String) {
    for b in value.bytes() {
        if b.is_ascii_graphic() && !matches!(b, b';' | b'=' | b'%' | b',') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn percent_decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A shared, immutable peer.
pub(crate) type PeerRef = Arc<Peer>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_label_rules() {
        let id = Identity::new("catalog", "shop");
        assert_eq!(
            (
                id.workload(),
                id.app(),
                id.version(),
                id.canonical_service(),
                id.canonical_revision()
            ),
            ("catalog", "unknown", "unknown", "catalog", "latest")
        );
        let id = id
            .with_label("app", "catalog-app")
            .with_version("v2")
            .with_workload("catalog-v2");
        assert_eq!(id.canonical_service(), "catalog-app");
        assert_eq!(id.canonical_revision(), "v2");
        let id = id
            .with_label(CANONICAL_NAME, "cat")
            .with_label(CANONICAL_REVISION, "r7");
        assert_eq!(
            (id.canonical_service(), id.canonical_revision()),
            ("cat", "r7")
        );
        assert_eq!(id.service_host(), "catalog.shop.svc.cluster.local");
    }

    #[test]
    fn bootstrap_metadata_is_read() {
        let bootstrap = mesh_xds_client::Bootstrap::builder("127.0.0.1:1", "catalog-1")
            .namespace("shop")
            .metadata("WORKLOAD_NAME", "catalog-v1")
            .metadata("CLUSTER_ID", "east")
            .metadata(
                "LABELS",
                serde_json::json!({"app": "catalog", "version": "v1"}),
            )
            .build()
            .unwrap();
        let id = Identity::from_bootstrap(&bootstrap, "catalog");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.workload(), "catalog-v1");
        assert_eq!(id.cluster(), "east");
        assert_eq!(id.version(), "v1");
        assert_eq!(id.instance(), "catalog-1");
    }

    #[test]
    fn peer_header_round_trips_with_odd_values() {
        let peer = Identity::new("cat;alog", "shop")
            .with_label("app", "a=b %c")
            .with_version("v1,2")
            .peer();
        let header = peer.to_header();
        assert_eq!(Peer::from_header(header.as_bytes()), Some(peer));
        assert_eq!(Peer::from_header(b"ns=%zz"), None);
        assert_eq!(Peer::from_header(b"garbage"), None);
        let partial = Peer::from_header(b"ns=shop").unwrap();
        assert_eq!(&*partial.namespace, "shop");
        assert_eq!(&*partial.workload, "unknown");
    }

    #[test]
    fn services_from_cluster_names_and_hosts() {
        let s = ServiceLabels::from_cluster("outbound|8080|v1|catalog.shop.svc.cluster.local");
        assert_eq!(
            (&*s.host, &*s.name, &*s.namespace, s.subset.as_deref()),
            (
                "catalog.shop.svc.cluster.local",
                "catalog",
                "shop",
                Some("v1")
            )
        );
        let s = ServiceLabels::from_cluster("outbound|443||api.example.com");
        assert_eq!(
            (&*s.name, &*s.namespace, s.subset),
            ("api.example.com", "unknown", None)
        );
        let s = ServiceLabels::from_host("payment:8080");
        assert_eq!((&*s.host, &*s.name), ("payment", "payment"));
        assert_eq!(strip_port("[::1]:80"), "[::1]");
    }
}

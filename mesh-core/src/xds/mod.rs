//! The one place that converts between the mesh-core model and Envoy v3 xDS
//! protos (`envoy-types`), both ways.
//!
//! The control server encodes what it serves with the `encode_*` functions;
//! the client decodes what it receives with the `decode_*` functions, and
//! NACKs with the error's message, which names the resource and the field
//! (`RouteConfiguration "x": virtual_hosts[0].routes[2].match.safe_regex:
//! invalid regex ...`).
//!
//! # The shape
//!
//! What is encoded is the shape gRPC proxyless clients read (gRFC A27 xDS
//! load balancing, A28 routing, A52 custom LB policies, and for resilience
//! A31 timeouts, A32 circuit breaking, A33 fault injection, A42 ring hash,
//! A44 retries, A50 outlier detection), which is also what Istio sends
//! Envoy, so a grpcio client pointed at our control server routes as our
//! own client does:
//!
//! - LDS: an `api_listener` holding an `HttpConnectionManager` with
//!   `rds { config_source { ads {} } }` and the HTTP filters
//!   `[envoy.filters.http.fault (HTTPFault {}), envoy.filters.http.router]`.
//! - RDS: virtual hosts, routes matching on prefix / path / `safe_regex`,
//!   headers and query parameters, with a `cluster` or `weighted_clusters`
//!   action. The route timeout is `timeout` and
//!   `max_stream_duration.max_stream_duration` (gRPC reads only the latter;
//!   no timeout is `timeout: 0s`); retries are `retry_policy` as Istio
//!   writes it (`retry_on` names, `num_retries`, `per_try_timeout`,
//!   `retry_back_off`, `retriable_status_codes`, the `previous_hosts`
//!   predicate, `previous_priorities` for remote localities; zero retries
//!   are no policy, as gRPC NACKs `num_retries: 0`); hash keys are
//!   `hash_policy`; a fault is
//!   `typed_per_filter_config["envoy.filters.http.fault"]` = `HTTPFault`
//!   with `MILLION` denominators.
//! - CDS: `type: EDS` clusters with `eds_config { ads {} }`. Round robin is the
//!   `lb_policy` enum; least-request and random are `load_balancing_policy`
//!   `wrr_locality { [least_request | random, round_robin] }`, because grpcio
//!   NACKs `lb_policy: LEAST_REQUEST` and takes the first child policy it
//!   knows (it does not know `random`); ring hash is `lb_policy: RING_HASH`
//!   with `ring_hash_lb_config { minimum_ring_size, hash_function: XX_HASH }`.
//!   The upstream protocol is in the `HttpProtocolOptions` extension and,
//!   since gRPC is not distinguishable from HTTP/2 there, in
//!   `metadata.filter_metadata["proxyless"].protocol`; the idle timeout and
//!   requests per connection are its `common_http_protocol_options`, the
//!   connect timeout is `connect_timeout`. Limits are
//!   `circuit_breakers.thresholds[0]` (priority DEFAULT, all four limits and
//!   the retry budget); outlier detection enforces consecutive 5xx / gateway
//!   failures at 100% (0% when off) with `enforcing_success_rate: 0`, and
//!   `minHealthPercent` is `common_lb_config.healthy_panic_threshold`
//!   (Istio's mapping). Locality failover is
//!   `metadata.filter_metadata["proxyless"].locality_failover: true` (Envoy
//!   expresses it with EDS priorities; our client applies it from its own
//!   locality).
//! - CDS mTLS (gRFC A29): `transport_socket` `envoy.transport_sockets.tls`
//!   with an `UpstreamTlsContext` naming the bootstrap's `mesh` certificate
//!   provider instance for the workload certificate and the trust bundle,
//!   the allowed server SPIFFE IDs as exact `match_subject_alt_names`, and
//!   the SNI (see the `tls` module).
//! - LDS for servers (gRFC A36, A41): a listener with an `address` and
//!   filter chains for the PeerAuthentication mode, each with an inline,
//!   non-forwarding route and the RBAC filters ([`server_listener_to_proto`]);
//!   [`decode_lds`] tells both kinds apart.
//! - EDS: every locality has a `locality` and a `load_balancing_weight`
//!   (grpcio ignores localities without a weight); endpoints are `HEALTHY`
//!   and carry their labels in `metadata.filter_metadata["proxyless"].labels`.
//!
//! # What decoding rejects
//!
//! The design rule is that config this mesh cannot honor is rejected (NACK),
//! never silently ignored. Decoding therefore returns
//! [`ErrorKind::Unsupported`](crate::ErrorKind::Unsupported) for anything
//! that would change which route matches, which cluster or endpoint is picked,
//! or what is sent upstream: case-insensitive, suffix, contains and range
//! matchers, runtime fractions, redirects, direct responses, rewrites, header
//! mutations, mirrors, per-filter configs other than the fault filter's,
//! HTTP filters other than the fault filter and the router (unless
//! `is_optional`), subset load balancing, upstream TLS other than A29 mTLS
//! with the `mesh` certificate provider and exact SPIFFE ID matchers, lb
//! policies other
//! than round robin / least request / random / ring hash, clusters other
//! than EDS, STRICT_DNS and LOGICAL_DNS, DNS clusters with their own DNS
//! resolver settings or a LOGICAL_DNS cluster of several endpoints (see
//! `cluster_dns`), hostnames in EDS endpoints (names are resolved only for
//! DNS clusters), drop overloads; and for
//! resilience: `retry_on` names outside [`RetryOn::NAMES`](crate::model::RetryOn::NAMES),
//! retry host predicates other than `previous_hosts`, retry priorities
//! other than `previous_priorities`, retriable headers, rate-limited
//! backoff, per-try idle timeouts, hedging, stream idle timeouts,
//! grpc-timeout caps or offsets that differ from the route timeout, HIGH
//! routing priority, hash policies on filter state or with a regex
//! rewrite, non-terminal hash policies followed by others, cookie
//! attributes, header-driven or listener-wide faults, fault
//! `max_active_faults` / rate limits / header and node conditions,
//! MURMUR_HASH_2 rings, hashing by hostname or with bounded load, circuit
//! breaker thresholds of HIGH priority only, per-host thresholds,
//! `max_connection_pools`, retry budgets over an interval, success-rate or
//! failure-percentage ejection (enforcement above 0), enforcement
//! percentages other than 0 and 100, `max_ejection_time` and its jitter,
//! split local-origin errors, outlier monitors, maximum connection and
//! stream durations, and cluster-level retry / hash / mirror policies and
//! upstream filters in the HTTP options.
//!
//! Decoded with Envoy's defaults when absent: `num_retries` 1, backoff
//! 25 ms / 10 × base, circuit breaker limits 1024 (3 retries), retry budget
//! 20% / 3, outlier detection 5 consecutive errors (5xx enforced, gateway
//! not), 10 s interval, 30 s base ejection, 10% max ejection, 50% panic
//! threshold, ring size 1024. An unset `timeout` is no timeout (gRPC's
//! reading; Envoy's 15 s default is a proxy default), and zero timeouts are
//! no timeout, as in Envoy. A virtual host's `retry_policy` applies to its
//! routes that have none.
//!
//! Accepted and ignored because they change nothing for this mesh (Istio
//! or gRPC send them): the `previous_priorities` `update_frequency` and
//! `host_selection_retry_max_attempts` (a retry always prefers an untried
//! endpoint), `terminal` on the last hash policy, circuit breaker
//! `track_remaining` and HIGH thresholds next to DEFAULT ones, the
//! success-rate / failure-percentage parameters when not enforced, local-
//! origin knobs when not split, `successful_active_health_check_uneject_host`,
//! the fault filter's runtime key names, `filter_metadata` and
//! `disable_downstream_cluster_stats`, the ring's `maximum_ring_size` (when
//! not below the minimum) and `locality_weighted_lb_config`,
//! `healthy_panic_threshold` without outlier detection (nothing is ever
//! unhealthy then), `max_headers_count`, `max_response_headers_kb` and
//! `headers_with_underscores_action`, stats and tracing names, metadata
//! other than ours.
//!
//! References: the xDS protocol (<https://www.envoyproxy.io/docs/envoy/latest/api-docs/xds_protocol>),
//! gRFC A27 (<https://github.com/grpc/proposal/blob/master/A27-xds-global-load-balancing.md>),
//! A28 (<https://github.com/grpc/proposal/blob/master/A28-xds-traffic-splitting-and-routing.md>),
//! A31 (<https://github.com/grpc/proposal/blob/master/A31-xds-timeout-support-and-config-selector.md>),
//! A32 (<https://github.com/grpc/proposal/blob/master/A32-xds-circuit-breaking.md>),
//! A33 (<https://github.com/grpc/proposal/blob/master/A33-Fault-Injection.md>),
//! A42 (<https://github.com/grpc/proposal/blob/master/A42-xds-ring-hash-lb-policy.md>),
//! A44 (<https://github.com/grpc/proposal/blob/master/A44-xds-retry.md>),
//! A50 (<https://github.com/grpc/proposal/blob/master/A50-xds-outlier-detection.md>),
//! A52 (<https://github.com/grpc/proposal/blob/master/A52-xds-custom-lb-policies.md>),
//! Istio's retry and traffic policy translation
//! (<https://github.com/istio/istio/tree/master/pilot/pkg/networking/core>).
//!
//! Note: `envoy-types` generates its own `google.protobuf` well-known types,
//! so the [`Any`] here is `envoy_types::pb::google::protobuf::Any` (what
//! `DiscoveryResponse.resources` holds), not `prost_types::Any`.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;
use envoy_types::pb::envoy::config::core::v3::{
    AggregatedConfigSource, ApiVersion, ConfigSource, config_source::ConfigSourceSpecifier,
};
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment as ClaProto;
use envoy_types::pb::envoy::config::listener::v3::Listener as ListenerProto;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::r#type::v3::{
    FractionalPercent, Percent, fractional_percent::DenominatorType,
};
use envoy_types::pb::google::protobuf::Duration as DurationProto;
use prost::Message;

use crate::model::{
    Cluster, ClusterLoadAssignment, Fraction, Listener, RouteConfig, ServerListener,
};
use crate::{Error, ErrorKind};

mod cluster;
mod cluster_dns;
mod cluster_policy;
mod cors;
mod endpoints;
mod listener;
mod ratelimit;
mod route_policy;
mod routes;
mod server_listener;
mod slow_start;
#[cfg(test)]
mod tests;
mod tls;
mod traffic;
mod wire;

/// The `google.protobuf.Any` of envoy-types: what `DiscoveryResponse.resources` holds.
pub use envoy_types::pb::google::protobuf::Any;

pub use cluster::{cluster_from_proto, cluster_to_proto};
pub use endpoints::{endpoints_from_proto, endpoints_to_proto};
pub use listener::{listener_from_proto, listener_to_proto};
pub use routes::{route_config_from_proto, route_config_to_proto};
pub use server_listener::{
    is_server_listener, server_listener_from_proto, server_listener_to_proto,
};
pub use tls::{
    IDENTITY_CERTIFICATE_NAME, MESH_PROVIDER_INSTANCE, ROOT_CERTIFICATE_NAME, SYSTEM_CA_BUNDLE,
    TLS_TRANSPORT_SOCKET,
};

/// LDS type URL.
pub const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// RDS type URL.
pub const ROUTE_CONFIG_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
/// CDS type URL.
pub const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// EDS type URL.
pub const ENDPOINT_TYPE: &str =
    "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";

/// The `filter_metadata` namespace that carries what only this mesh reads
/// (cluster protocol, endpoint labels).
pub const METADATA_NAMESPACE: &str = "proxyless";

/// The four xDS resource kinds, for code that handles them generically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceType {
    /// LDS: [`Listener`].
    Listener,
    /// RDS: [`RouteConfig`].
    RouteConfig,
    /// CDS: [`Cluster`].
    Cluster,
    /// EDS: [`ClusterLoadAssignment`].
    Endpoints,
}

impl ResourceType {
    /// All four, in cascade order (LDS → RDS → CDS → EDS).
    pub const ALL: [ResourceType; 4] = [
        ResourceType::Listener,
        ResourceType::RouteConfig,
        ResourceType::Cluster,
        ResourceType::Endpoints,
    ];

    /// The v3 type URL (`type.googleapis.com/envoy.config.listener.v3.Listener`, ...).
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Listener => LISTENER_TYPE,
            ResourceType::RouteConfig => ROUTE_CONFIG_TYPE,
            ResourceType::Cluster => CLUSTER_TYPE,
            ResourceType::Endpoints => ENDPOINT_TYPE,
        }
    }

    /// The kind for a type URL (exact match, as ADS compares them), or `None`.
    pub fn from_type_url(url: &str) -> Option<Self> {
        ResourceType::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// `"LDS"`, `"RDS"`, `"CDS"` or `"EDS"`.
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceType::Listener => "LDS",
            ResourceType::RouteConfig => "RDS",
            ResourceType::Cluster => "CDS",
            ResourceType::Endpoints => "EDS",
        }
    }

    /// The proto message name (`Listener`, `RouteConfiguration`, `Cluster`,
    /// `ClusterLoadAssignment`), as used in error messages.
    pub fn message_name(self) -> &'static str {
        match self {
            ResourceType::Listener => "Listener",
            ResourceType::RouteConfig => "RouteConfiguration",
            ResourceType::Cluster => "Cluster",
            ResourceType::Endpoints => "ClusterLoadAssignment",
        }
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short_name())
    }
}

/// Encodes a listener (LDS resource).
pub fn encode_listener(listener: &Listener) -> Any {
    pack(&listener_to_proto(listener))
}

/// Encodes a server listener (LDS resource, gRFC A36), for the ADS server
/// to serve next to the client listeners (same type URL).
///
/// The bytes are a deterministic function of the model: the RBAC filter
/// configs are written with their policies in name order (see
/// [`crate::rbac_xds::rbac_filter_config`]), and nothing else in it is a
/// map.
pub fn encode_server_listener(listener: &ServerListener) -> Any {
    pack(&server_listener_to_proto(listener))
}

/// Encodes a route configuration (RDS resource).
pub fn encode_route_config(route_config: &RouteConfig) -> Any {
    pack(&route_config_to_proto(route_config))
}

/// Encodes a cluster (CDS resource).
///
/// The bytes are a deterministic function of the model: the cluster's
/// metadata (a `Struct` with up to two fields, held in `HashMap`s by the
/// generated types) is written last, in a fixed order, by a wire-compatible
/// mirror; protobuf parsers read a field wherever it appears.
pub fn encode_cluster(cluster: &Cluster) -> Any {
    let mut proto = cluster_to_proto(cluster);
    proto.metadata = None;
    let mut value = proto.encode_to_vec();
    value.extend_from_slice(&wire::cluster_metadata(cluster).encode_to_vec());
    Any {
        type_url: CLUSTER_TYPE.to_string(),
        value,
    }
}

/// Encodes endpoints (EDS resource).
///
/// The bytes are a deterministic function of the model (labels are written
/// in the model's order), so a server can compare encodings to decide
/// whether a resource changed; [`endpoints_to_proto`] goes through
/// `HashMap`s and would not be.
pub fn encode_endpoints(endpoints: &ClusterLoadAssignment) -> Any {
    Any {
        type_url: ENDPOINT_TYPE.to_string(),
        value: wire::cluster_load_assignment(endpoints).encode_to_vec(),
    }
}

/// Decodes a listener; the error names the listener and the field.
pub fn decode_listener(any: &Any) -> Result<Listener, Error> {
    listener_from_proto(&unpack_resource::<ListenerProto>(
        any,
        ResourceType::Listener,
    )?)
}

/// An LDS resource: a client (API) listener or a server listener. Both
/// come with the same type URL; which one it is follows from its fields
/// ([`is_server_listener`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LdsResource {
    /// A listener an app dials (`api_listener`).
    Client(Listener),
    /// A server's inbound listener (address and filter chains, gRFC A36).
    Server(ServerListener),
}

impl LdsResource {
    /// The resource name.
    pub fn name(&self) -> &crate::model::Name {
        match self {
            LdsResource::Client(l) => &l.name,
            LdsResource::Server(l) => &l.name,
        }
    }
}

/// Decodes an LDS resource of either kind: with an `api_listener` it is a
/// client listener (as [`decode_listener`]); without one but with an
/// address or filter chains, a server listener
/// ([`server_listener_from_proto`]); otherwise the client listener error
/// (`api_listener: missing`). The error names the listener and the field.
pub fn decode_lds(any: &Any) -> Result<LdsResource, Error> {
    let proto = unpack_resource::<ListenerProto>(any, ResourceType::Listener)?;
    if is_server_listener(&proto) {
        server_listener_from_proto(&proto).map(LdsResource::Server)
    } else {
        listener_from_proto(&proto).map(LdsResource::Client)
    }
}

/// Decodes a server listener; the error names it and the field.
pub fn decode_server_listener(any: &Any) -> Result<ServerListener, Error> {
    server_listener_from_proto(&unpack_resource::<ListenerProto>(
        any,
        ResourceType::Listener,
    )?)
}

/// Decodes a route configuration; the error names it and the field.
pub fn decode_route_config(any: &Any) -> Result<RouteConfig, Error> {
    route_config_from_proto(&unpack_resource::<RouteConfiguration>(
        any,
        ResourceType::RouteConfig,
    )?)
}

/// Decodes a cluster; the error names it and the field.
pub fn decode_cluster(any: &Any) -> Result<Cluster, Error> {
    cluster_from_proto(&unpack_resource::<ClusterProto>(
        any,
        ResourceType::Cluster,
    )?)
}

/// Decodes endpoints; the error names the cluster and the field.
pub fn decode_endpoints(any: &Any) -> Result<ClusterLoadAssignment, Error> {
    endpoints_from_proto(&unpack_resource::<ClaProto>(any, ResourceType::Endpoints)?)
}

/// The resource name inside an `Any` of one of the four types, even when
/// the rest of it is invalid (so a NACK can name it); `None` for another
/// type, or bytes that are not even well-formed protobuf.
pub fn resource_name(any: &Any) -> Option<String> {
    ResourceType::ALL
        .into_iter()
        .find(|t| type_name(t.type_url()) == type_name(&any.type_url))?;
    // All four messages carry their name in field 1 (`name`, or
    // `cluster_name` for ClusterLoadAssignment).
    wire::NameOnly::decode(any.value.as_slice())
        .ok()
        .map(|n| n.name)
}

// ---------------------------------------------------------------------------
// Shared plumbing for the submodules.

/// A decoding problem and the field path where it is, built inside-out.
#[derive(Debug)]
pub(crate) struct FieldError {
    kind: ErrorKind,
    /// Innermost segment first.
    path: Vec<Cow<'static, str>>,
    message: String,
}

pub(crate) type Decoded<T> = Result<T, FieldError>;

impl FieldError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        FieldError {
            kind: ErrorKind::InvalidConfig,
            path: Vec::new(),
            message: message.into(),
        }
    }

    pub(crate) fn unsupported(message: impl Into<String>) -> Self {
        FieldError {
            kind: ErrorKind::Unsupported,
            path: Vec::new(),
            message: message.into(),
        }
    }

    /// Adds the enclosing field (`match`, `headers[0]`, `api_listener.api_listener`).
    pub(crate) fn at(mut self, segment: impl Into<Cow<'static, str>>) -> Self {
        self.path.push(segment.into());
        self
    }

    /// Adds the enclosing repeated field and index (`routes[2]`).
    pub(crate) fn at_index(self, field: &'static str, index: usize) -> Self {
        self.at(format!("{field}[{index}]"))
    }

    /// The public error, prefixed with the resource (`Cluster "x": `).
    fn into_error(self, what: ResourceType, name: Option<&str>) -> Error {
        let mut message = String::new();
        for (i, seg) in self.path.iter().rev().enumerate() {
            if i > 0 {
                message.push('.');
            }
            message.push_str(seg);
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&self.message);
        let error = match self.kind {
            ErrorKind::Unsupported => Error::unsupported(message),
            _ => Error::invalid(message),
        };
        match name {
            Some(name) => error.context(format_args!("{} {name:?}", what.message_name())),
            None => error.context(what.message_name()),
        }
    }
}

impl From<Error> for FieldError {
    fn from(e: Error) -> Self {
        FieldError {
            kind: e.kind(),
            path: Vec::new(),
            message: e.message().to_string(),
        }
    }
}

/// Field-path helpers on results.
pub(crate) trait At<T> {
    /// See [`FieldError::at`].
    fn at(self, segment: &'static str) -> Decoded<T>;
    /// See [`FieldError::at_index`].
    fn at_index(self, field: &'static str, index: usize) -> Decoded<T>;
}

impl<T, E: Into<FieldError>> At<T> for Result<T, E> {
    fn at(self, segment: &'static str) -> Decoded<T> {
        self.map_err(|e| e.into().at(segment))
    }
    fn at_index(self, field: &'static str, index: usize) -> Decoded<T> {
        self.map_err(|e| e.into().at_index(field, index))
    }
}

/// `Err(Unsupported)` at `field` when `present`: for fields this mesh
/// cannot honor.
pub(crate) fn reject_if(present: bool, field: &'static str) -> Decoded<()> {
    if present {
        Err(
            FieldError::unsupported("not supported by this mesh (rejected rather than ignored)")
                .at(field),
        )
    } else {
        Ok(())
    }
}

/// An `Err(Invalid)` saying the field is missing.
pub(crate) fn missing(field: &'static str) -> FieldError {
    FieldError::invalid("missing").at(field)
}

/// The part of a type URL after the last `/` (the message's full name).
pub(crate) fn type_name(url: &str) -> &str {
    url.rsplit_once('/').map_or(url, |(_, name)| name)
}

/// Packs a message into an `Any` with its `type.googleapis.com/` URL.
pub(crate) fn pack<M: Message + prost::Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

/// Unpacks an `Any` that must hold an `M` (any type URL prefix).
pub(crate) fn unpack<M: Message + prost::Name + Default>(any: &Any) -> Decoded<M> {
    if type_name(&any.type_url) != M::full_name() {
        return Err(FieldError::invalid(format!(
            "expected {} but got type {:?}",
            M::type_url(),
            any.type_url
        )));
    }
    M::decode(any.value.as_slice())
        .map_err(|e| FieldError::invalid(format!("cannot decode {}: {e}", M::full_name())))
}

/// Unpacks a top-level resource; the error names the resource when it can.
fn unpack_resource<M: Message + prost::Name + Default>(
    any: &Any,
    what: ResourceType,
) -> Result<M, Error> {
    unpack::<M>(any).map_err(|e| {
        let name = wire::NameOnly::decode(any.value.as_slice())
            .ok()
            .map(|n| n.name);
        e.into_error(what, name.as_deref())
    })
}

/// Wraps a field error for a named resource.
pub(crate) fn named(what: ResourceType, name: &str) -> impl FnOnce(FieldError) -> Error + '_ {
    move |e| e.into_error(what, Some(name))
}

/// `ads {}` with `resource_api_version: V3`: fetch over the same ADS stream.
pub(crate) fn ads_config_source() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

/// Accepts `ads {}` or `self {}` (both mean "this ADS stream" to a client
/// with one xDS server); rejects other sources.
pub(crate) fn check_config_source(source: Option<&ConfigSource>) -> Decoded<()> {
    match source.and_then(|s| s.config_source_specifier.as_ref()) {
        Some(ConfigSourceSpecifier::Ads(_) | ConfigSourceSpecifier::Self_(_)) => Ok(()),
        Some(_) => Err(FieldError::unsupported(
            "only `ads {}` (or `self {}`) config sources are supported",
        )),
        None => Err(FieldError::invalid("missing: set `ads {}`")),
    }
}

/// The largest `google.protobuf.Duration` (10,000 years); gRPC rejects
/// larger ones.
const MAX_PROTO_SECONDS: u64 = 315_576_000_000;

/// A model duration as a `google.protobuf.Duration`, saturating at the
/// largest valid one (10,000 years: "forever" for any timeout).
pub(crate) fn duration_to_proto(d: Duration) -> DurationProto {
    if d.as_secs() >= MAX_PROTO_SECONDS {
        return DurationProto {
            seconds: MAX_PROTO_SECONDS as i64,
            nanos: 0,
        };
    }
    DurationProto {
        // Below MAX_PROTO_SECONDS, and nanos below 10^9: both fit.
        seconds: i64::try_from(d.as_secs()).unwrap_or(0),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// A `google.protobuf.Duration` as a model duration; negative or malformed
/// durations are invalid.
pub(crate) fn duration_from_proto(d: &DurationProto) -> Decoded<Duration> {
    let seconds = u64::try_from(d.seconds)
        .map_err(|_| FieldError::invalid(format!("negative duration ({}s)", d.seconds)))?;
    let nanos = u32::try_from(d.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| FieldError::invalid(format!("invalid nanos {}", d.nanos)))?;
    Ok(Duration::new(seconds, nanos))
}

/// An optional duration field, decoded (`None` stays `None`).
pub(crate) fn opt_duration(
    d: Option<&DurationProto>,
    field: &'static str,
) -> Decoded<Option<Duration>> {
    d.map(duration_from_proto).transpose().at(field)
}

/// A positive duration, or `default` when absent; zero is invalid (Envoy's
/// `gt: 0s` rule for intervals and timeouts).
pub(crate) fn positive_duration(
    d: Option<&DurationProto>,
    default: Duration,
    field: &'static str,
) -> Decoded<Duration> {
    match opt_duration(d, field)? {
        None => Ok(default),
        Some(d) if d.is_zero() => Err(FieldError::invalid("must be positive").at(field)),
        Some(d) => Ok(d),
    }
}

/// A fraction as `FractionalPercent { numerator, denominator: MILLION }`,
/// the exact form of the model's millionths (gRFC A33 reads it).
pub(crate) fn fraction_to_proto(f: Fraction) -> FractionalPercent {
    FractionalPercent {
        numerator: f.per_million(),
        denominator: DenominatorType::Million as i32,
    }
}

/// A `FractionalPercent` of any denominator in millionths; a numerator
/// above its denominator means 100%, as in Envoy.
pub(crate) fn fraction_from_proto(p: &FractionalPercent) -> Decoded<Fraction> {
    let scale: u64 = match DenominatorType::try_from(p.denominator) {
        Ok(DenominatorType::Hundred) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) => 1,
        Err(_) => {
            return Err(
                FieldError::invalid(format!("unknown value {}", p.denominator)).at("denominator"),
            );
        }
    };
    let per_million = (u64::from(p.numerator) * scale).min(1_000_000);
    Ok(Fraction::from_per_million(
        u32::try_from(per_million).unwrap_or(1_000_000),
    ))
}

/// An `envoy.type.v3.Percent` (0–100) as a whole number of percent, for
/// the model fields that are integers; fractional or out-of-range values
/// are errors.
pub(crate) fn whole_percent(p: &Percent) -> Decoded<u32> {
    let v = p.value;
    if !(v.is_finite() && (0.0..=100.0).contains(&v)) {
        return Err(FieldError::invalid(format!(
            "{v} is not a percentage (0 to 100)"
        )));
    }
    if v.fract() != 0.0 {
        return Err(FieldError::unsupported(format!(
            "{v}: only whole percentages are supported"
        )));
    }
    // In 0..=100 and whole: exact.
    Ok(v as u32)
}

/// A non-empty name, or an error at `field`.
pub(crate) fn required_name(name: &str, field: &'static str) -> Decoded<crate::model::Name> {
    if name.is_empty() {
        Err(FieldError::invalid("empty").at(field))
    } else {
        Ok(name.into())
    }
}

//! LDS for servers (gRFC A36): the inbound listener a server asks for by
//! the name its bootstrap's `server_listener_resource_name_template` gives
//! its address, carrying the PeerAuthentication mode as filter chains and
//! the AuthorizationPolicies as RBAC HTTP filters (gRFC A41).
//!
//! The shape (see [`server_listener_to_proto`]):
//!
//! - `address`: the socket address (ip, port) the server listens on;
//! - STRICT: one filter chain whose transport socket is TLS with a
//!   `DownstreamTlsContext { require_client_certificate: true }`;
//!   PERMISSIVE: a chain matching `transport_protocol: "tls"` with a
//!   `DownstreamTlsContext` that verifies a client certificate when one is
//!   presented, and a plaintext chain matching `"raw_buffer"` (gRPC
//!   servers know only `raw_buffer`, so they serve plaintext); DISABLE:
//!   one plaintext chain;
//! - every chain has one network filter, an `HttpConnectionManager` with an
//!   inline route configuration `inbound|<port>` whose one virtual host
//!   (`domains: ["*"]`) has one route, prefix `/` with
//!   `non_forwarding_action` (without it gRPC servers fail every RPC), and
//!   whose HTTP filters are the RBAC filters (DENY, ALLOW, LOG) then the
//!   router; dry-run policies are those filters' `shadow_rules`, and a
//!   filter with only dry-run policies has no `rules` (see
//!   [`crate::rbac_xds`]);
//! - with a local rate limit ([`ServerListener::rate_limit`]), the
//!   `local_ratelimit` filter first (`is_optional: true`: gRPC servers
//!   ignore it), and on the route its per-route config wrapped in
//!   `FilterConfig { is_optional: true }`, and the `rate_limits` on the
//!   virtual host (the route is non-forwarding: it has no `RouteAction`)
//!   (gRFC A39; see [`super::ratelimit`]);
//! - with CORS routes ([`ServerListener::cors`]), the `cors` filter first
//!   of all (`is_optional: true`), as in Istio's inbound chain where CORS
//!   runs before rate limiting and RBAC, and one non-forwarding route per
//!   [`crate::cors::CorsRoute`] before the catch-all, with its match and
//!   its `CorsPolicy` in `typed_per_filter_config` wrapped in
//!   `FilterConfig { is_optional: true }` (see [`super::cors`]); the
//!   rate limit's per-route config is on every route alike.
//!
//! Decoding accepts that shape and what is equivalent to it (the older
//! A29 TLS fields, chains in either order, a `default_filter_chain`, more
//! routes as long as every one is non-forwarding and every virtual host
//! serves every path), and rejects the rest with a field error: routes
//! that forward or answer directly, RDS, per-route filter configs other
//! than `local_ratelimit` and `cors` (and routes that limit differently,
//! CORS policies outside the `*` virtual host or without the filter), filter
//! chain matches on anything but the transport protocol, other network or
//! HTTP filters, chains whose policies differ, and TLS settings a
//! PeerAuthentication mode cannot express.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    Address, SocketAddress, TrafficDirection, address, socket_address::PortSpecifier,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener as ListenerProto, filter,
};
use envoy_types::pb::envoy::config::rbac::v3::{Rbac, rbac::Action as RbacAction};
use envoy_types::pb::envoy::config::route::v3::{
    NonForwardingAction, Route, RouteConfiguration, RouteMatch, VirtualHost, route,
    route_match::PathSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, http_connection_manager::RouteSpecifier,
    http_filter::ConfigType,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::DownstreamTlsContext;
use prost::Name as _;

use super::cors::{CORS_FILTER_NAME, cors_filter, cors_from_route, cors_to_route, is_cors_filter};
use super::listener::{ROUTER_FILTER_NAME, for_each_http_filter};
use super::ratelimit::{
    LOCAL_RATELIMIT_FILTER_NAME, is_local_rate_limit, local_rate_limit_filter,
    local_rate_limit_from_any, rate_limit_from_route, rate_limit_to_route,
};
use super::tls::{Transport, downstream_from_proto, downstream_to_proto, transport_from_proto};
use super::{
    At, Decoded, FieldError, ResourceType, missing, named, pack, required_name, type_name, unpack,
};
use crate::Error;
use crate::cors::CorsRoute;
use crate::model::{MtlsMode, ServerListener};
use crate::ratelimit::{LocalRateLimit, RateLimitConfig};
use crate::rbac::AuthorizationPolicy;
use crate::rbac_xds::{
    RBAC_FILTER_NAME, rbac_filters_from_proto, rbac_filters_to_proto, rbac_from_filter_config,
    rbac_http_filter_config,
};

/// The network filter name of the HTTP connection manager.
pub(crate) const HCM_FILTER_NAME: &str = "envoy.filters.network.http_connection_manager";
/// `filter_chain_match.transport_protocol` of TLS connections.
const TLS_PROTOCOL: &str = "tls";
/// `filter_chain_match.transport_protocol` of plaintext connections.
const RAW_BUFFER_PROTOCOL: &str = "raw_buffer";

/// The proto for a server listener (the module docs describe the shape).
pub fn server_listener_to_proto(listener: &ServerListener) -> ListenerProto {
    let port = listener.address.port();
    let filters = vec![hcm_filter(listener, port)];
    let chain = |name: &str, protocol: &str, tls: Option<bool>| FilterChain {
        name: format!("inbound|{port}|{name}"),
        filter_chain_match: (!protocol.is_empty()).then(|| FilterChainMatch {
            transport_protocol: protocol.to_string(),
            ..Default::default()
        }),
        filters: filters.clone(),
        transport_socket: tls.map(downstream_to_proto),
        ..Default::default()
    };
    let filter_chains = match listener.mtls {
        MtlsMode::Strict => vec![chain("mtls", "", Some(true))],
        MtlsMode::Permissive => vec![
            chain("tls", TLS_PROTOCOL, Some(false)),
            chain("plaintext", RAW_BUFFER_PROTOCOL, None),
        ],
        MtlsMode::Disable => vec![chain("plaintext", "", None)],
    };
    ListenerProto {
        name: listener.name.to_string(),
        address: Some(Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: listener.address.ip().to_string(),
                port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
                ..Default::default()
            })),
        }),
        filter_chains,
        traffic_direction: TrafficDirection::Inbound as i32,
        ..Default::default()
    }
}

fn hcm_filter(listener: &ServerListener, port: u16) -> Filter {
    let route_name = format!("inbound|{port}");
    // CORS first, as in Istio's inbound chain; then the rate limit, which
    // Istio's task inserts before the others (INSERT_BEFORE).
    let mut http_filters: Vec<HttpFilter> = Vec::new();
    if !listener.cors.is_empty() {
        http_filters.push(cors_filter());
    }
    http_filters.extend(
        listener
            .rate_limit
            .iter()
            .map(|r| local_rate_limit_filter(&r.filter)),
    );
    http_filters.extend(
        rbac_filters_to_proto(&listener.policies)
            .iter()
            .map(|rbac| HttpFilter {
                name: RBAC_FILTER_NAME.to_string(),
                config_type: Some(ConfigType::TypedConfig(rbac_http_filter_config(rbac))),
                ..Default::default()
            }),
    );
    http_filters.push(HttpFilter {
        name: ROUTER_FILTER_NAME.to_string(),
        config_type: Some(ConfigType::TypedConfig(pack(&Router::default()))),
        ..Default::default()
    });
    let mut route = Route {
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".to_string())),
            ..Default::default()
        }),
        action: Some(route::Action::NonForwardingAction(NonForwardingAction {})),
        ..Default::default()
    };
    let mut vh_rate_limits = Vec::new();
    if let Some(r) = &listener.rate_limit {
        rate_limit_to_route(r, &mut route.typed_per_filter_config, &mut vh_rate_limits);
    }
    let mut routes: Vec<Route> = listener
        .cors
        .iter()
        .map(|c| {
            let mut r = Route {
                r#match: Some(super::routes::match_to_proto(&c.matcher)),
                action: Some(route::Action::NonForwardingAction(NonForwardingAction {})),
                // The rate limit's per-route config, alike on every route.
                typed_per_filter_config: route.typed_per_filter_config.clone(),
                ..Default::default()
            };
            if let Some(p) = &c.policy {
                cors_to_route(p, &mut r.typed_per_filter_config);
            }
            r
        })
        .collect();
    routes.push(route);
    let hcm = HttpConnectionManager {
        stat_prefix: route_name.clone(),
        route_specifier: Some(RouteSpecifier::RouteConfig(RouteConfiguration {
            name: route_name.clone(),
            virtual_hosts: vec![VirtualHost {
                name: format!("inbound|http|{port}"),
                domains: vec!["*".to_string()],
                routes,
                rate_limits: vh_rate_limits,
                ..Default::default()
            }],
            ..Default::default()
        })),
        http_filters,
        ..Default::default()
    };
    Filter {
        name: HCM_FILTER_NAME.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
    }
}

/// Whether an LDS resource is a server listener (no `api_listener`, but
/// an address or filter chains) rather than a client one.
pub fn is_server_listener(proto: &ListenerProto) -> bool {
    proto.api_listener.is_none()
        && (proto.address.is_some()
            || !proto.filter_chains.is_empty()
            || proto.default_filter_chain.is_some())
}

/// The server listener a proto describes; the error names the listener
/// and the field, for a NACK.
pub fn server_listener_from_proto(proto: &ListenerProto) -> Result<ServerListener, Error> {
    server_fields(proto).map_err(named(ResourceType::Listener, &proto.name))
}

/// What one filter chain says.
struct Chain {
    /// `filter_chain_match.transport_protocol` ("" when not matched on).
    protocol: String,
    /// `None`: plaintext; `Some(require_client_certificate)`: TLS.
    tls: Option<bool>,
    policies: Vec<AuthorizationPolicy>,
    rate_limit: Option<RateLimitConfig>,
    cors: Vec<CorsRoute>,
    /// Where it is, for errors (`filter_chains[1]`).
    at: String,
}

fn server_fields(proto: &ListenerProto) -> Decoded<ServerListener> {
    let name = required_name(&proto.name, "name")?;
    if proto.api_listener.is_some() {
        return Err(FieldError::invalid(
            "a server listener has no api_listener (this is a client listener)",
        )
        .at("api_listener"));
    }
    let address = socket_address(proto.address.as_ref()).at("address")?;
    if proto.filter_chain_matcher.is_some() {
        return Err(FieldError::unsupported(
            "filter_chain_matcher is not supported: match on filter_chain_match.transport_protocol",
        )
        .at("filter_chain_matcher"));
    }
    if let Some(i) = proto
        .listener_filters
        .iter()
        .position(|f| !is_tls_inspector(f))
    {
        return Err(FieldError::unsupported(format!(
            "listener filter {:?} is not supported (only the TLS inspector)",
            proto.listener_filters[i].name
        ))
        .at_index("listener_filters", i));
    }
    let mut chains = Vec::new();
    for (i, c) in proto.filter_chains.iter().enumerate() {
        let at = format!("filter_chains[{i}]");
        chains.push(chain_from_proto(c, address.port(), at.clone()).map_err(|e| e.at(at))?);
    }
    if let Some(c) = &proto.default_filter_chain {
        let at = "default_filter_chain".to_string();
        chains.push(chain_from_proto(c, address.port(), at).at("default_filter_chain")?);
    }
    let mtls = mode_from_chains(&chains)?;
    let Some((first, rest)) = chains.split_first() else {
        return Err(missing("filter_chains"));
    };
    if let Some(other) = rest.iter().find(|c| c.policies != first.policies) {
        return Err(FieldError::unsupported(format!(
            "its RBAC policies differ from those of {}: every filter chain must authorize alike",
            first.at
        ))
        .at(other.at.clone()));
    }
    if let Some(other) = rest.iter().find(|c| c.rate_limit != first.rate_limit) {
        return Err(FieldError::unsupported(format!(
            "its local rate limit differs from that of {}: every filter chain must limit alike",
            first.at
        ))
        .at(other.at.clone()));
    }
    if let Some(other) = rest.iter().find(|c| c.cors != first.cors) {
        return Err(FieldError::unsupported(format!(
            "its CORS routes differ from those of {}: every filter chain must answer alike",
            first.at
        ))
        .at(other.at.clone()));
    }
    Ok(ServerListener {
        name,
        address,
        mtls,
        policies: first.policies.clone().into(),
        rate_limit: first.rate_limit.clone().map(Arc::new),
        cors: first.cors.clone().into(),
    })
}

fn is_tls_inspector(f: &envoy_types::pb::envoy::config::listener::v3::ListenerFilter) -> bool {
    use envoy_types::pb::envoy::config::listener::v3::listener_filter::ConfigType as Lf;
    match &f.config_type {
        Some(Lf::TypedConfig(any)) => {
            type_name(&any.type_url)
                == "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
        }
        _ => f.name == "envoy.filters.listener.tls_inspector",
    }
}

fn socket_address(address: Option<&Address>) -> Decoded<SocketAddr> {
    let Some(address::Address::SocketAddress(sa)) = address.and_then(|a| a.address.as_ref()) else {
        return Err(FieldError::invalid(
            "missing: a server listener needs socket_address { address, port_value }",
        )
        .at("socket_address"));
    };
    let ip: IpAddr = sa.address.parse().map_err(|_| {
        FieldError::invalid(format!("{:?} is not an IP address", sa.address))
            .at("socket_address.address")
    })?;
    let port = match sa.port_specifier {
        Some(PortSpecifier::PortValue(p)) => u16::try_from(p).map_err(|_| {
            FieldError::invalid(format!("{p} is not a port")).at("socket_address.port_value")
        })?,
        Some(PortSpecifier::NamedPort(_)) => {
            return Err(FieldError::unsupported("named ports are not supported")
                .at("socket_address.named_port"));
        }
        None => return Err(missing("socket_address.port_value")),
    };
    Ok(SocketAddr::new(ip, port))
}

/// The PeerAuthentication mode the chains implement.
fn mode_from_chains(chains: &[Chain]) -> Decoded<MtlsMode> {
    for (i, a) in chains.iter().enumerate() {
        if let Some(b) = chains[..i].iter().find(|b| b.protocol == a.protocol) {
            return Err(FieldError::invalid(format!(
                "the same filter_chain_match (transport_protocol {:?}) as {}",
                a.protocol, b.at
            ))
            .at(a.at.clone()));
        }
    }
    let tls: Vec<&Chain> = chains.iter().filter(|c| c.tls.is_some()).collect();
    let plain: Vec<&Chain> = chains.iter().filter(|c| c.tls.is_none()).collect();
    match (tls.as_slice(), plain.as_slice()) {
        ([], []) => Err(missing("filter_chains")),
        ([], [_]) => Ok(MtlsMode::Disable),
        ([t], []) if t.tls == Some(true) => Ok(MtlsMode::Strict),
        ([t], []) => Err(FieldError::unsupported(
            "TLS without a required client certificate and no plaintext chain is not a \
             PeerAuthentication mode: require_client_certificate (STRICT) or add a raw_buffer \
             chain (PERMISSIVE)",
        )
        .at(t.at.clone())),
        ([t], [_]) if t.tls == Some(true) => Err(FieldError::unsupported(
            "a TLS chain next to a plaintext chain (PERMISSIVE) must not require a client \
             certificate: this mesh's PERMISSIVE accepts TLS clients without one",
        )
        .at("require_client_certificate")
        .at("typed_config")
        .at("transport_socket")
        .at(t.at.clone())),
        ([_], [_]) => Ok(MtlsMode::Permissive),
        (_, _) => Err(FieldError::unsupported(format!(
            "{} TLS and {} plaintext filter chains: a server listener has at most one of each",
            tls.len(),
            plain.len()
        ))
        .at("filter_chains")),
    }
}

fn chain_from_proto(c: &FilterChain, port: u16, at: String) -> Decoded<Chain> {
    let protocol = match &c.filter_chain_match {
        Some(m) => match_from_proto(m, port).at("filter_chain_match")?,
        None => String::new(),
    };
    reject_deprecated_proxy_proto(c)?;
    let tls = match transport_from_proto::<DownstreamTlsContext>(c.transport_socket.as_ref())
        .at("transport_socket")?
    {
        Transport::Plaintext => None,
        Transport::Tls(context) => Some(
            downstream_from_proto(&context)
                .at("typed_config")
                .at("transport_socket")?,
        ),
    };
    match (protocol.as_str(), tls) {
        (TLS_PROTOCOL, None) => {
            return Err(FieldError::invalid(
                "a chain matching transport_protocol \"tls\" needs a TLS transport_socket",
            )
            .at("transport_socket"));
        }
        (RAW_BUFFER_PROTOCOL, Some(_)) => {
            return Err(FieldError::invalid(
                "a chain matching transport_protocol \"raw_buffer\" cannot have a TLS \
                 transport_socket",
            )
            .at("transport_socket"));
        }
        _ => {}
    }
    let [filter] = c.filters.as_slice() else {
        return Err(FieldError::unsupported(format!(
            "{} network filters: a server filter chain must have exactly one, {HCM_FILTER_NAME}",
            c.filters.len()
        ))
        .at("filters"));
    };
    let (policies, rate_limit, cors) = hcm_policies(filter).at_index("filters", 0)?;
    Ok(Chain {
        protocol,
        tls,
        policies,
        rate_limit,
        cors,
        at,
    })
}

#[allow(deprecated)] // use_proxy_proto: rejected by name
fn reject_deprecated_proxy_proto(c: &FilterChain) -> Decoded<()> {
    super::reject_if(
        c.use_proxy_proto.as_ref().is_some_and(|b| b.value),
        "use_proxy_proto",
    )
}

/// The transport protocol a chain matches on; a destination port equal to
/// the listener's is accepted (it matches every connection), other
/// criteria are not.
fn match_from_proto(m: &FilterChainMatch, port: u16) -> Decoded<String> {
    if let Some(p) = &m.destination_port
        && p.value != u32::from(port)
    {
        return Err(FieldError::unsupported(format!(
            "{} differs from the listener's port {port}: only transport_protocol matching is \
             supported",
            p.value
        ))
        .at("destination_port"));
    }
    let other = [
        (!m.prefix_ranges.is_empty(), "prefix_ranges"),
        (!m.address_suffix.is_empty(), "address_suffix"),
        (m.suffix_len.is_some(), "suffix_len"),
        (
            !m.direct_source_prefix_ranges.is_empty(),
            "direct_source_prefix_ranges",
        ),
        (m.source_type != 0, "source_type"),
        (!m.source_prefix_ranges.is_empty(), "source_prefix_ranges"),
        (!m.source_ports.is_empty(), "source_ports"),
        (!m.server_names.is_empty(), "server_names"),
        (!m.application_protocols.is_empty(), "application_protocols"),
    ];
    if let Some((_, field)) = other.iter().find(|(set, _)| *set) {
        return Err(
            FieldError::unsupported("only transport_protocol matching is supported").at(*field),
        );
    }
    match m.transport_protocol.as_str() {
        "" | TLS_PROTOCOL | RAW_BUFFER_PROTOCOL => Ok(m.transport_protocol.clone()),
        other => Err(FieldError::unsupported(format!(
            "{other:?} is not supported: use \"tls\" or \"raw_buffer\""
        ))
        .at("transport_protocol")),
    }
}

/// What a chain's HCM says: its policies, rate limit and CORS routes.
type HcmPolicies = (
    Vec<AuthorizationPolicy>,
    Option<RateLimitConfig>,
    Vec<CorsRoute>,
);

/// The policies, the rate limit and the CORS routes of the chain's HCM,
/// which must serve every request locally (non-forwarding routes that
/// match everything).
fn hcm_policies(f: &Filter) -> Decoded<HcmPolicies> {
    let any = match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any)) => any,
        Some(filter::ConfigType::ConfigDiscovery(_)) => {
            return Err(
                FieldError::unsupported("filter config discovery is not supported")
                    .at("config_discovery"),
            );
        }
        None => return Err(missing("typed_config")),
    };
    if type_name(&any.type_url) != HttpConnectionManager::full_name() {
        return Err(FieldError::unsupported(format!(
            "network filter {:?} ({}) is not supported: only {HCM_FILTER_NAME}",
            f.name, any.type_url
        ))
        .at("typed_config"));
    }
    let hcm: HttpConnectionManager = unpack(any).at("typed_config")?;
    let rc = match &hcm.route_specifier {
        Some(RouteSpecifier::RouteConfig(rc)) => {
            check_routes(rc).at("route_config").at("typed_config")?;
            rc
        }
        Some(RouteSpecifier::Rds(_)) => {
            return Err(FieldError::unsupported(
                "RDS is not supported on server listeners: use an inline route_config",
            )
            .at("rds")
            .at("typed_config"));
        }
        Some(RouteSpecifier::ScopedRoutes(_)) => {
            return Err(FieldError::unsupported("scoped routes are not supported")
                .at("scoped_routes")
                .at("typed_config"));
        }
        None => return Err(missing("route_config").at("typed_config")),
    };
    let (policies, filter, has_cors) =
        policies_from_filters(&hcm.http_filters).at("typed_config")?;
    let rate_limit = route_rate_limit(rc, filter.as_ref().map(|(n, c)| (n.as_str(), c)))
        .at("route_config")
        .at("typed_config")?;
    let cors = cors_routes(rc, has_cors)
        .at("route_config")
        .at("typed_config")?;
    Ok((policies, rate_limit, cors))
}

/// The CORS routes: those of the virtual host serving every authority
/// (`*`), in order, up to the last one with a policy; a policy anywhere
/// else, or without the `cors` filter in the HCM, would do something the
/// model cannot say (or nothing at all, in Envoy) and is refused.
fn cors_routes(rc: &RouteConfiguration, has_filter: bool) -> Decoded<Vec<CorsRoute>> {
    let star = rc
        .virtual_hosts
        .iter()
        .position(|vh| vh.domains.iter().any(|d| d == "*"));
    let mut routes = Vec::new();
    for (v, vh) in rc.virtual_hosts.iter().enumerate() {
        for (r, route) in vh.routes.iter().enumerate() {
            let policy = cors_from_route(&route.typed_per_filter_config)
                .at("typed_per_filter_config")
                .at_index("routes", r)
                .at_index("virtual_hosts", v)?;
            if policy.is_some() && !has_filter {
                return Err(FieldError::unsupported(format!(
                    "a {CORS_FILTER_NAME} policy on a route whose listener has no such filter: \
                     it would do nothing"
                ))
                .at("typed_per_filter_config")
                .at_index("routes", r)
                .at_index("virtual_hosts", v));
            }
            if Some(v) != star {
                if policy.is_some() {
                    return Err(FieldError::unsupported(
                        "CORS policies are supported only in the virtual host with domains [\"*\"]",
                    )
                    .at("typed_per_filter_config")
                    .at_index("routes", r)
                    .at_index("virtual_hosts", v));
                }
                continue;
            }
            let matcher = match &route.r#match {
                Some(m) => super::routes::match_from_proto(m)
                    .at("match")
                    .at_index("routes", r)
                    .at_index("virtual_hosts", v)?,
                None => {
                    return Err(missing("match")
                        .at_index("routes", r)
                        .at_index("virtual_hosts", v));
                }
            };
            routes.push(CorsRoute { matcher, policy });
        }
    }
    while routes.last().is_some_and(|r| r.policy.is_none()) {
        routes.pop();
    }
    Ok(routes)
}

/// The rate limit the routes say, with the listener's `filter`: every
/// route must say the same (the model limits the server's requests alike).
fn route_rate_limit(
    rc: &RouteConfiguration,
    filter: Option<(&str, &LocalRateLimit)>,
) -> Decoded<Option<RateLimitConfig>> {
    let mut first: Option<(Option<RateLimitConfig>, String)> = None;
    for (v, vh) in rc.virtual_hosts.iter().enumerate() {
        for (r, route) in vh.routes.iter().enumerate() {
            let limit =
                rate_limit_from_route(filter, &route.typed_per_filter_config, &vh.rate_limits)
                    .at_index("routes", r)
                    .at_index("virtual_hosts", v)?;
            match &first {
                None => first = Some((limit, format!("virtual_hosts[{v}].routes[{r}]"))),
                Some((seen, at)) if *seen != limit => {
                    return Err(FieldError::unsupported(format!(
                        "its local rate limit differs from that of {at}: every route of a \
                         server listener must limit alike"
                    ))
                    .at_index("routes", r)
                    .at_index("virtual_hosts", v));
                }
                Some(_) => {}
            }
        }
    }
    Ok(first.and_then(|(limit, _)| limit))
}

/// Every route must be non-forwarding (the server handles the request),
/// per-filter overrides are not supported, and every virtual host must
/// serve every path, one of them every authority: then serving
/// everything, as the model does, is what the routes say.
fn check_routes(rc: &RouteConfiguration) -> Decoded<()> {
    super::reject_if(rc.vhds.is_some(), "vhds")?;
    super::reject_if(
        !rc.typed_per_filter_config.is_empty(),
        "typed_per_filter_config",
    )?;
    if rc.virtual_hosts.is_empty() {
        return Err(missing("virtual_hosts"));
    }
    for (v, vh) in rc.virtual_hosts.iter().enumerate() {
        check_virtual_host(vh).at_index("virtual_hosts", v)?;
    }
    if !rc
        .virtual_hosts
        .iter()
        .any(|vh| vh.domains.iter().any(|d| d == "*"))
    {
        return Err(FieldError::unsupported(
            "no virtual host with domains [\"*\"]: requests for other authorities would be \
             refused, which this mesh does not model",
        )
        .at("virtual_hosts"));
    }
    Ok(())
}

fn check_virtual_host(vh: &VirtualHost) -> Decoded<()> {
    super::reject_if(
        !vh.typed_per_filter_config.is_empty(),
        "typed_per_filter_config",
    )?;
    super::reject_if(vh.matcher.is_some(), "matcher")?;
    for (r, route) in vh.routes.iter().enumerate() {
        check_route(route).at_index("routes", r)?;
    }
    if !vh
        .routes
        .iter()
        .any(|r| r.r#match.as_ref().is_some_and(matches_everything))
    {
        return Err(FieldError::unsupported(
            "no route matches every request (prefix \"/\" with non_forwarding_action): \
             requests matching no route would be refused, which this mesh does not model",
        )
        .at("routes"));
    }
    Ok(())
}

fn check_route(route: &Route) -> Decoded<()> {
    super::reject_if(
        route
            .typed_per_filter_config
            .keys()
            .any(|k| k != LOCAL_RATELIMIT_FILTER_NAME && k != CORS_FILTER_NAME),
        "typed_per_filter_config",
    )?;
    match &route.action {
        Some(route::Action::NonForwardingAction(_)) => Ok(()),
        Some(_) => Err(FieldError::unsupported(
            "routes of a server listener must have non_forwarding_action (the server handles \
             the request itself)",
        )
        .at("action")),
        None => Err(missing("non_forwarding_action")),
    }
}

fn matches_everything(m: &RouteMatch) -> bool {
    let all_paths =
        matches!(&m.path_specifier, Some(PathSpecifier::Prefix(p)) if p.is_empty() || p == "/");
    all_paths
        && m.headers.is_empty()
        && m.query_parameters.is_empty()
        && m.cookies.is_empty()
        && m.runtime_fraction.is_none()
        && m.grpc.is_none()
        && m.tls_context.is_none()
        && m.dynamic_metadata.is_empty()
        && m.filter_state.is_empty()
}

/// RBAC filters (and at most one `local_ratelimit`, returned with its
/// name) then the router; the RBAC messages are read in DENY,
/// ALLOW, LOG order, each action's `rules` before its `shadow_rules` (the
/// dry-run policies; the result of a request does not depend on the order
/// of the filters, only the evaluation order does). Two ALLOW filters
/// would require a request to match both, which the model cannot say: a
/// second ALLOW `rules` (or a second ALLOW `shadow_rules`) is refused.
type FilterPolicies = (
    Vec<AuthorizationPolicy>,
    Option<(String, LocalRateLimit)>,
    bool,
);

fn policies_from_filters(filters: &[HttpFilter]) -> Decoded<FilterPolicies> {
    let mut rbacs = Vec::new();
    let mut allow_at: Option<usize> = None;
    let mut shadow_allow_at: Option<usize> = None;
    let mut rate_limit: Option<(String, LocalRateLimit)> = None;
    let mut cors = false;
    for_each_http_filter(filters, |i, f, any| {
        if is_cors_filter(any) {
            if f.name != CORS_FILTER_NAME {
                // Per-route policies are keyed by the filter's name.
                return Err(FieldError::unsupported(format!(
                    "the cors filter must be named {CORS_FILTER_NAME:?} (its per-route policies \
                     are keyed by that name)"
                ))
                .at("name")
                .at_index("http_filters", i));
            }
            cors = !f.disabled;
            return Ok(());
        }
        if is_local_rate_limit(any) {
            if rate_limit.is_some() {
                return Err(FieldError::unsupported(
                    "a second local_ratelimit filter is not supported",
                )
                .at_index("http_filters", i));
            }
            // A disabled filter limits only where a route enables it
            // with a config of its own.
            let config = if f.disabled {
                LocalRateLimit::inert()
            } else {
                local_rate_limit_from_any(any)
                    .at("typed_config")
                    .at_index("http_filters", i)?
            };
            rate_limit = Some((f.name.clone(), config));
            return Ok(());
        }
        if type_name(&any.type_url) != type_name(crate::rbac_xds::RBAC_FILTER_TYPE) {
            if f.is_optional {
                return Ok(());
            }
            return Err(FieldError::unsupported(format!(
                "HTTP filter {:?} ({}) is not supported on server listeners: only RBAC and the \
                 router",
                f.name, any.type_url
            ))
            .at_index("http_filters", i));
        }
        if f.disabled {
            return Err(FieldError::unsupported(
                "a disabled RBAC filter (enabled per route) is not supported",
            )
            .at("disabled")
            .at_index("http_filters", i));
        }
        let filter = rbac_from_filter_config(any)
            .at("typed_config")
            .at_index("http_filters", i)?;
        let is_allow = |r: &Option<Rbac>| {
            r.as_ref()
                .is_some_and(|r| r.action == RbacAction::Allow as i32)
        };
        for (present, seen, what) in [
            (is_allow(&filter.rules), &mut allow_at, ""),
            (
                is_allow(&filter.shadow_rules),
                &mut shadow_allow_at,
                " with ALLOW shadow_rules",
            ),
        ] {
            if !present {
                continue;
            }
            if let Some(first) = *seen {
                return Err(FieldError::unsupported(format!(
                    "a second ALLOW RBAC filter{what} (the first is http_filters[{first}]): \
                     requests would have to match both, which is not supported"
                ))
                .at_index("http_filters", i));
            }
            *seen = Some(i);
        }
        rbacs.push(filter);
        Ok(())
    })?;
    Ok((
        rbac_filters_from_proto(&rbacs).at("http_filters")?,
        rate_limit,
        cors,
    ))
}

//! LDS: a client-side (API) listener whose HttpConnectionManager fetches its
//! routes over RDS and whose HTTP filters are the fault filter then the
//! router (gRFC A27, A39, A33).
//!
//! The fault filter is always there, with an empty `HTTPFault {}`: it
//! injects nothing by itself, and routes that carry a fault say so in their
//! `typed_per_filter_config["envoy.filters.http.fault"]`, which Envoy and
//! gRPC (A33) apply only when the filter is in the chain.
//!
//! So is Envoy's local rate limit filter, with a config that limits
//! nothing and `is_optional: true` (gRPC knows no such filter and ignores
//! it instead of NACKing the Listener, gRFC A39): a route limited on the
//! client side carries its config in its `typed_per_filter_config`, which
//! replaces the filter's for its requests (see the `route_policy` module).

use envoy_types::pb::envoy::config::listener::v3::{ApiListener, Listener as ListenerProto};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::HttpFault;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager::RouteSpecifier,
    http_filter::ConfigType,
};
use prost::Name as _;

use super::route_policy::{FAULT_FILTER_NAME, fault_from_proto};
use super::{
    Any, At, Decoded, FieldError, ResourceType, ads_config_source, check_config_source, missing,
    named, pack, required_name, type_name, unpack,
};
use crate::Error;
use crate::model::Listener;

/// The router filter's conventional name (gRPC identifies it by type URL).
pub(crate) const ROUTER_FILTER_NAME: &str = "envoy.filters.http.router";

/// The proto for a listener.
pub fn listener_to_proto(listener: &Listener) -> ListenerProto {
    let hcm = HttpConnectionManager {
        stat_prefix: listener.name.to_string(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: listener.route_config_name.to_string(),
        })),
        http_filters: vec![
            HttpFilter {
                name: FAULT_FILTER_NAME.to_string(),
                config_type: Some(ConfigType::TypedConfig(pack(&HttpFault::default()))),
                ..Default::default()
            },
            super::ratelimit::local_rate_limit_filter(&crate::ratelimit::LocalRateLimit::inert()),
            HttpFilter {
                name: ROUTER_FILTER_NAME.to_string(),
                config_type: Some(ConfigType::TypedConfig(pack(&Router::default()))),
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    ListenerProto {
        name: listener.name.to_string(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack(&hcm)),
        }),
        ..Default::default()
    }
}

/// The listener a proto describes. Only API listeners whose connection
/// manager uses RDS are accepted: an inline `route_config` is rejected as
/// unsupported (the model names its route config), and so is a listener
/// without `api_listener` (a server listener, gRFC A36).
pub fn listener_from_proto(proto: &ListenerProto) -> Result<Listener, Error> {
    listener_fields(proto).map_err(named(ResourceType::Listener, &proto.name))
}

fn listener_fields(proto: &ListenerProto) -> Decoded<Listener> {
    let name = required_name(&proto.name, "name")?;
    let api = proto.api_listener.as_ref().ok_or_else(|| {
        FieldError::unsupported(
            "missing: only client (API) listeners are supported, not server listeners",
        )
        .at("api_listener")
    })?;
    let any = api
        .api_listener
        .as_ref()
        .ok_or_else(|| missing("api_listener.api_listener"))?;
    let hcm: HttpConnectionManager = unpack(any).at("api_listener.api_listener")?;
    let route_config_name = hcm_route_config_name(&hcm).at("api_listener.api_listener")?;
    Ok(Listener {
        name,
        route_config_name,
    })
}

fn hcm_route_config_name(hcm: &HttpConnectionManager) -> Decoded<crate::model::Name> {
    check_http_filters(&hcm.http_filters)?;
    match &hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => {
            check_config_source(rds.config_source.as_ref()).at("rds.config_source")?;
            required_name(&rds.route_config_name, "rds.route_config_name")
        }
        Some(RouteSpecifier::RouteConfig(_)) => Err(FieldError::unsupported(
            "inline route configurations are not supported: use rds",
        )
        .at("route_config")),
        Some(RouteSpecifier::ScopedRoutes(_)) => Err(FieldError::unsupported(
            "scoped routes are not supported: use rds",
        )
        .at("scoped_routes")),
        None => Err(missing("rds")),
    }
}

/// The router must be the last filter (gRPC NACKs otherwise). The fault
/// filter may precede it, with a config that injects nothing by itself
/// (faults are per route). Other filters change what happens to a
/// request, so they are rejected unless optional.
fn check_http_filters(filters: &[HttpFilter]) -> Decoded<()> {
    for_each_http_filter(filters, |i, f, any| {
        if type_name(&any.type_url) == HttpFault::full_name() {
            return check_fault_filter(f).at_index("http_filters", i);
        }
        if f.is_optional {
            return Ok(());
        }
        Err(FieldError::unsupported(format!(
            "HTTP filter {:?} ({}) is not supported",
            f.name, any.type_url
        ))
        .at_index("http_filters", i))
    })
}

/// Walks an HttpConnectionManager's HTTP filters, client or server side:
/// each must carry a `typed_config` (no config discovery), and the router
/// must be the last one (gRPC NACKs otherwise). `filter` sees every filter
/// before the router, with its index and config.
pub(super) fn for_each_http_filter(
    filters: &[HttpFilter],
    mut filter: impl FnMut(usize, &HttpFilter, &Any) -> Decoded<()>,
) -> Decoded<()> {
    let Some(last) = filters.len().checked_sub(1) else {
        return Err(FieldError::invalid("empty: the router filter must be last").at("http_filters"));
    };
    for (i, f) in filters.iter().enumerate() {
        let any = match &f.config_type {
            Some(ConfigType::TypedConfig(any)) => any,
            Some(ConfigType::ConfigDiscovery(_)) => {
                return Err(
                    FieldError::unsupported("filter config discovery is not supported")
                        .at("config_discovery")
                        .at_index("http_filters", i),
                );
            }
            None => {
                return Err(missing("typed_config").at_index("http_filters", i));
            }
        };
        let is_router = type_name(&any.type_url) == Router::full_name();
        if is_router != (i == last) {
            return Err(FieldError::invalid(format!(
                "the router filter must be the last filter (found {:?} at {i} of {})",
                f.name,
                filters.len()
            ))
            .at_index("http_filters", i));
        }
        if !is_router {
            filter(i, f, any)?;
        }
    }
    Ok(())
}

/// The listener-wide fault config must inject nothing: the model carries
/// faults per route only.
fn check_fault_filter(f: &HttpFilter) -> Decoded<()> {
    if f.disabled {
        return Err(FieldError::unsupported(
            "a disabled fault filter (enabled per route) is not supported",
        )
        .at("disabled"));
    }
    let Some(ConfigType::TypedConfig(any)) = &f.config_type else {
        return Err(missing("typed_config"));
    };
    let fault: HttpFault = unpack(any).at("typed_config")?;
    let policy = fault_from_proto(&fault).at("typed_config")?;
    if policy.delay.is_some() || policy.abort.is_some() {
        return Err(FieldError::unsupported(
            "listener-wide fault injection is not supported: put the fault in the route's \
             typed_per_filter_config",
        )
        .at("typed_config"));
    }
    Ok(())
}

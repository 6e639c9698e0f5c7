//! RDS: route configurations, virtual hosts, route matches and weighted
//! cluster actions (gRFC A28). A route's policy (timeout, retries, fault,
//! hash) is in the `route_policy` module.

use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, QueryParameterMatcher, Route as RouteProto, RouteAction, RouteConfiguration,
    RouteMatch as RouteMatchProto, VirtualHost as VirtualHostProto, WeightedCluster as WcProto,
    header_matcher::HeaderMatchSpecifier, query_parameter_matcher::QueryParameterMatchSpecifier,
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier,
    virtual_host::TlsRequirementType, weighted_cluster::ClusterWeight,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};

use super::route_policy::{
    per_filter_config, policy_from_proto, policy_to_action, virtual_host_retry,
};
use super::traffic::{traffic_from_proto, traffic_to_proto};
use super::{At, Decoded, FieldError, ResourceType, missing, named, reject_if, required_name};
use crate::Error;
use crate::model::RetryPolicy;
use crate::model::{
    HeaderMatch, Name, PathMatch, Pattern, QueryParamMatch, Route, RouteConfig, RouteMatch,
    RoutePolicy, ValueMatch, VirtualHost, WeightedCluster, WeightedClusters,
};

/// The proto for a route configuration.
///
/// A route to one cluster of weight 0 (see [`WeightedClusters::single`]) is
/// encoded as `cluster`; anything else as `weighted_clusters` (no
/// `total_weight`: weights are relative).
pub fn route_config_to_proto(route_config: &RouteConfig) -> RouteConfiguration {
    RouteConfiguration {
        name: route_config.name.to_string(),
        virtual_hosts: route_config
            .virtual_hosts
            .iter()
            .map(|vh| VirtualHostProto {
                name: vh.name.to_string(),
                domains: vh.domains.iter().map(|d| d.to_string()).collect(),
                routes: vh.routes.iter().map(route_to_proto).collect(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn route_to_proto(route: &Route) -> RouteProto {
    let mut action = RouteAction {
        cluster_specifier: Some(cluster_specifier(&route.action)),
        ..Default::default()
    };
    policy_to_action(&route.policy, &mut action);
    let mut proto = RouteProto {
        name: route.name.to_string(),
        r#match: Some(match_to_proto(&route.matcher)),
        action: Some(Action::Route(action)),
        typed_per_filter_config: per_filter_config(&route.policy),
        ..Default::default()
    };
    if let Some(traffic) = &route.policy.traffic {
        traffic_to_proto(traffic, &mut proto);
    }
    proto
}

fn cluster_specifier(action: &WeightedClusters) -> ClusterSpecifier {
    match action.clusters() {
        [one] if one.weight == 0 => ClusterSpecifier::Cluster(one.name.to_string()),
        clusters => ClusterSpecifier::WeightedClusters(WcProto {
            clusters: clusters
                .iter()
                .map(|c| ClusterWeight {
                    name: c.name.to_string(),
                    weight: Some(UInt32Value { value: c.weight }),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    }
}

pub(super) fn match_to_proto(m: &RouteMatch) -> RouteMatchProto {
    RouteMatchProto {
        path_specifier: Some(match &m.path {
            PathMatch::Prefix(p) => PathSpecifier::Prefix(p.to_string()),
            PathMatch::Exact(p) => PathSpecifier::Path(p.to_string()),
            PathMatch::Regex(p) => PathSpecifier::SafeRegex(regex_to_proto(p)),
        }),
        headers: m
            .headers
            .iter()
            .map(|h| HeaderMatcher {
                name: h.name.to_string(),
                invert_match: h.invert,
                header_match_specifier: Some(match value_to_proto(&h.value) {
                    Ok(sm) => HeaderMatchSpecifier::StringMatch(sm),
                    Err(present) => HeaderMatchSpecifier::PresentMatch(present),
                }),
                ..Default::default()
            })
            .collect(),
        query_parameters: m
            .query_params
            .iter()
            .map(|q| QueryParameterMatcher {
                name: q.name.to_string(),
                query_parameter_match_specifier: Some(match value_to_proto(&q.value) {
                    Ok(sm) => QueryParameterMatchSpecifier::StringMatch(sm),
                    Err(present) => QueryParameterMatchSpecifier::PresentMatch(present),
                }),
            })
            .collect(),
        // Envoy's default is case-sensitive: written only when it is not,
        // so that routes without `ignoreUriCase` encode as before.
        case_sensitive: m.ignore_case.then_some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// A string matcher, or `Err(present)` for a presence condition
/// (`present_match: false` means "absent", as in Envoy).
fn value_to_proto(v: &ValueMatch) -> Result<StringMatcher, bool> {
    let pattern = match v {
        ValueMatch::Exact(s) => MatchPattern::Exact(s.to_string()),
        ValueMatch::Prefix(s) => MatchPattern::Prefix(s.to_string()),
        ValueMatch::Regex(p) => MatchPattern::SafeRegex(regex_to_proto(p)),
        ValueMatch::Present(present) => return Err(*present),
    };
    Ok(StringMatcher {
        ignore_case: false,
        match_pattern: Some(pattern),
    })
}

/// `safe_regex` without `engine_type`: RE2 is the default (and only) engine.
fn regex_to_proto(p: &Pattern) -> RegexMatcher {
    RegexMatcher {
        regex: p.as_str().to_string(),
        engine_type: None,
    }
}

/// The route configuration a proto describes; everything that would change
/// routing and the model cannot represent is rejected as unsupported.
pub fn route_config_from_proto(proto: &RouteConfiguration) -> Result<RouteConfig, Error> {
    route_config_fields(proto).map_err(named(ResourceType::RouteConfig, &proto.name))
}

fn route_config_fields(p: &RouteConfiguration) -> Decoded<RouteConfig> {
    let name = required_name(&p.name, "name")?;
    reject_if(p.vhds.is_some(), "vhds")?;
    reject_if(
        !p.request_headers_to_add.is_empty(),
        "request_headers_to_add",
    )?;
    reject_if(
        !p.request_headers_to_remove.is_empty(),
        "request_headers_to_remove",
    )?;
    reject_if(
        !p.response_headers_to_add.is_empty(),
        "response_headers_to_add",
    )?;
    reject_if(
        !p.response_headers_to_remove.is_empty(),
        "response_headers_to_remove",
    )?;
    reject_if(
        !p.request_mirror_policies.is_empty(),
        "request_mirror_policies",
    )?;
    reject_if(
        p.ignore_port_in_host_matching,
        "ignore_port_in_host_matching",
    )?;
    reject_if(!p.vhost_header.is_empty(), "vhost_header")?;
    reject_if(
        p.ignore_path_parameters_in_path_matching,
        "ignore_path_parameters_in_path_matching",
    )?;
    reject_if(
        !p.typed_per_filter_config.is_empty(),
        "typed_per_filter_config",
    )?;
    reject_if(!p.route_specifiers.is_empty(), "route_specifiers")?;
    let virtual_hosts = p
        .virtual_hosts
        .iter()
        .enumerate()
        .map(|(i, vh)| virtual_host_from_proto(vh).at_index("virtual_hosts", i))
        .collect::<Decoded<Vec<_>>>()?;
    Ok(RouteConfig {
        name,
        virtual_hosts: virtual_hosts.into(),
    })
}

fn virtual_host_from_proto(vh: &VirtualHostProto) -> Decoded<VirtualHost> {
    reject_if(vh.matcher.is_some(), "matcher")?;
    reject_if(
        vh.require_tls != TlsRequirementType::None as i32,
        "require_tls",
    )?;
    reject_if(
        !vh.request_headers_to_add.is_empty(),
        "request_headers_to_add",
    )?;
    reject_if(
        !vh.request_headers_to_remove.is_empty(),
        "request_headers_to_remove",
    )?;
    reject_if(
        !vh.response_headers_to_add.is_empty(),
        "response_headers_to_add",
    )?;
    reject_if(
        !vh.response_headers_to_remove.is_empty(),
        "response_headers_to_remove",
    )?;
    reject_if(
        !vh.request_mirror_policies.is_empty(),
        "request_mirror_policies",
    )?;
    reject_if(
        !vh.typed_per_filter_config.is_empty(),
        "typed_per_filter_config",
    )?;
    reject_if(!vh.route_specifiers.is_empty(), "route_specifiers")?;
    let vh_retry = virtual_host_retry(vh)?;
    if vh.domains.is_empty() {
        return Err(
            FieldError::invalid("empty: a virtual host needs at least one domain").at("domains"),
        );
    }
    let domains: Arc<[Name]> = vh
        .domains
        .iter()
        .map(|d| Name::from(d.to_ascii_lowercase()))
        .collect();
    let routes = vh
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| route_from_proto(r, vh_retry.as_ref()).at_index("routes", i))
        .collect::<Decoded<Vec<_>>>()?;
    Ok(VirtualHost {
        name: vh.name.as_str().into(),
        domains,
        routes: routes.into(),
    })
}

fn route_from_proto(r: &RouteProto, vh_retry: Option<&RetryPolicy>) -> Decoded<Route> {
    reject_if(!r.route_specifiers.is_empty(), "route_specifiers")?;
    let matcher =
        match_from_proto(r.r#match.as_ref().ok_or_else(|| missing("match"))?).at("match")?;
    let traffic = traffic_from_proto(r, &matcher.path)?;
    let (action, policy) = match &r.action {
        Some(Action::Route(action)) => (
            route_action_from_proto(action).at("route")?,
            RoutePolicy {
                traffic,
                ..policy_from_proto(r, action, vh_retry)?
            },
        ),
        // A route that answers itself: no destination, and nothing of a
        // policy applies (a fault on it is refused, not dropped).
        Some(Action::Redirect(_) | Action::DirectResponse(_)) => {
            reject_if(
                !r.typed_per_filter_config.is_empty(),
                "typed_per_filter_config",
            )?;
            (
                WeightedClusters::none(),
                RoutePolicy {
                    traffic,
                    ..RoutePolicy::default()
                },
            )
        }
        Some(Action::FilterAction(_)) => return Err(unsupported_action("filter_action")),
        Some(Action::NonForwardingAction(_)) => {
            return Err(unsupported_action("non_forwarding_action"));
        }
        None => return Err(missing("route")),
    };
    Ok(Route {
        name: r.name.as_str().into(),
        matcher,
        action,
        policy,
    })
}

fn unsupported_action(field: &'static str) -> FieldError {
    FieldError::unsupported("only `route` actions to clusters are supported").at(field)
}

fn route_action_from_proto(a: &RouteAction) -> Decoded<WeightedClusters> {
    // Rewrites and mirrors are the route's traffic rules (`traffic` module).
    reject_if(a.metadata_match.is_some(), "metadata_match")?;
    match &a.cluster_specifier {
        Some(ClusterSpecifier::Cluster(name)) => {
            Ok(WeightedClusters::single(required_name(name, "cluster")?))
        }
        Some(ClusterSpecifier::WeightedClusters(wc)) => {
            weighted_clusters_from_proto(wc).at("weighted_clusters")
        }
        Some(ClusterSpecifier::ClusterHeader(_)) => Err(FieldError::unsupported(
            "choosing the cluster from a header is not supported",
        )
        .at("cluster_header")),
        Some(ClusterSpecifier::ClusterSpecifierPlugin(_)) => Err(FieldError::unsupported(
            "cluster specifier plugins are not supported",
        )
        .at("cluster_specifier_plugin")),
        Some(ClusterSpecifier::InlineClusterSpecifierPlugin(_)) => Err(FieldError::unsupported(
            "cluster specifier plugins are not supported",
        )
        .at("inline_cluster_specifier_plugin")),
        None => Err(missing("cluster")),
    }
}

#[allow(deprecated)] // total_weight: still sent by some servers, checked when present
fn weighted_clusters_from_proto(wc: &WcProto) -> Decoded<WeightedClusters> {
    reject_if(
        wc.random_value_specifier.is_some(),
        "random_value_specifier",
    )?;
    let mut clusters = Vec::with_capacity(wc.clusters.len());
    // The one destination of a route with destination-level header rules
    // travels as a one-entry `weighted_clusters` (a `cluster` has nowhere to
    // carry them); its weight means nothing, and decodes as 0, as a lone
    // `cluster` does, so that a decoded route encodes and decodes to itself.
    let lone_with_rules = matches!(wc.clusters.as_slice(), [c] if
        !c.request_headers_to_add.is_empty()
            || !c.request_headers_to_remove.is_empty()
            || !c.response_headers_to_add.is_empty()
            || !c.response_headers_to_remove.is_empty());
    for (i, c) in wc.clusters.iter().enumerate() {
        let cluster = (|| {
            reject_if(!c.cluster_header.is_empty(), "cluster_header")?;
            reject_if(c.metadata_match.is_some(), "metadata_match")?;
            // Header rules: the route's traffic rules (`traffic` module).
            reject_if(
                !c.typed_per_filter_config.is_empty(),
                "typed_per_filter_config",
            )?;
            reject_if(c.host_rewrite_specifier.is_some(), "host_rewrite_literal")?;
            Ok::<_, FieldError>(WeightedCluster {
                name: required_name(&c.name, "name")?,
                // An unset weight is 0, as in proto3.
                weight: if lone_with_rules {
                    0
                } else {
                    c.weight.as_ref().map_or(0, |w| w.value)
                },
            })
        })()
        .at_index("clusters", i)?;
        clusters.push(cluster);
    }
    if let Some(total) = &wc.total_weight {
        let sum: u64 = wc
            .clusters
            .iter()
            .map(|c| u64::from(c.weight.as_ref().map_or(0, |w| w.value)))
            .sum();
        if u64::from(total.value) != sum {
            return Err(FieldError::invalid(format!(
                "{} is not the sum of the weights ({sum})",
                total.value
            ))
            .at("total_weight"));
        }
    }
    WeightedClusters::new(clusters).map_err(FieldError::from)
}

pub(super) fn match_from_proto(m: &RouteMatchProto) -> Decoded<RouteMatch> {
    // `case_sensitive: false` (Istio's `ignoreUriCase`): prefix and exact
    // paths ignore ASCII case; Envoy does not apply it to `safe_regex`.
    let ignore_case = m.case_sensitive.as_ref().is_some_and(|c| !c.value);
    reject_if(m.runtime_fraction.is_some(), "runtime_fraction")?;
    reject_if(!m.cookies.is_empty(), "cookies")?;
    reject_if(m.grpc.is_some(), "grpc")?;
    reject_if(m.tls_context.is_some(), "tls_context")?;
    reject_if(!m.dynamic_metadata.is_empty(), "dynamic_metadata")?;
    reject_if(!m.filter_state.is_empty(), "filter_state")?;
    let path = match &m.path_specifier {
        Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.as_str().into()),
        Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.as_str().into()),
        Some(PathSpecifier::SafeRegex(r)) => {
            PathMatch::Regex(regex_from_proto(r).at("safe_regex")?)
        }
        Some(PathSpecifier::ConnectMatcher(_)) => {
            return Err(
                FieldError::unsupported("CONNECT matching is not supported").at("connect_matcher")
            );
        }
        Some(PathSpecifier::PathSeparatedPrefix(_)) => {
            return Err(
                FieldError::unsupported("path-separated prefixes are not supported")
                    .at("path_separated_prefix"),
            );
        }
        Some(PathSpecifier::PathMatchPolicy(_)) => {
            return Err(
                FieldError::unsupported("path match policies are not supported")
                    .at("path_match_policy"),
            );
        }
        None => {
            return Err(FieldError::invalid(
                "missing path specifier: set prefix, path or safe_regex",
            ));
        }
    };
    let headers = m
        .headers
        .iter()
        .enumerate()
        .map(|(i, h)| header_from_proto(h).at_index("headers", i))
        .collect::<Decoded<Vec<_>>>()?;
    let query_params = m
        .query_parameters
        .iter()
        .enumerate()
        .map(|(i, q)| query_param_from_proto(q).at_index("query_parameters", i))
        .collect::<Decoded<Vec<_>>>()?;
    Ok(RouteMatch {
        path,
        headers: headers.into(),
        query_params: query_params.into(),
        ignore_case,
    })
}

#[allow(deprecated)] // the old `*_match` fields are still accepted, as Envoy and gRPC do
fn header_from_proto(h: &HeaderMatcher) -> Decoded<HeaderMatch> {
    let name = required_name(&h.name.to_ascii_lowercase(), "name")?;
    reject_if(
        h.treat_missing_header_as_empty,
        "treat_missing_header_as_empty",
    )?;
    let value = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::StringMatch(sm)) => {
            string_matcher_from_proto(sm).at("string_match")?
        }
        Some(HeaderMatchSpecifier::PresentMatch(present)) => ValueMatch::Present(*present),
        Some(HeaderMatchSpecifier::ExactMatch(s)) => ValueMatch::Exact(s.as_str().into()),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => ValueMatch::Prefix(s.as_str().into()),
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => {
            ValueMatch::Regex(regex_from_proto(r).at("safe_regex_match")?)
        }
        Some(HeaderMatchSpecifier::SuffixMatch(_)) => {
            return Err(
                FieldError::unsupported("suffix matching is not supported").at("suffix_match")
            );
        }
        Some(HeaderMatchSpecifier::ContainsMatch(_)) => {
            return Err(
                FieldError::unsupported("contains matching is not supported").at("contains_match"),
            );
        }
        Some(HeaderMatchSpecifier::RangeMatch(_)) => {
            return Err(
                FieldError::unsupported("range matching is not supported").at("range_match")
            );
        }
        None => {
            return Err(FieldError::invalid(
                "no condition: set string_match or present_match",
            ));
        }
    };
    Ok(HeaderMatch {
        name,
        value,
        invert: h.invert_match,
    })
}

fn query_param_from_proto(q: &QueryParameterMatcher) -> Decoded<QueryParamMatch> {
    let name = required_name(&q.name, "name")?;
    let value = match &q.query_parameter_match_specifier {
        Some(QueryParameterMatchSpecifier::StringMatch(sm)) => {
            string_matcher_from_proto(sm).at("string_match")?
        }
        Some(QueryParameterMatchSpecifier::PresentMatch(present)) => ValueMatch::Present(*present),
        None => {
            return Err(FieldError::invalid(
                "no condition: set string_match or present_match",
            ));
        }
    };
    Ok(QueryParamMatch { name, value })
}

fn string_matcher_from_proto(sm: &StringMatcher) -> Decoded<ValueMatch> {
    // `ignore_case` has no effect on `safe_regex` in Envoy.
    let is_regex = matches!(sm.match_pattern, Some(MatchPattern::SafeRegex(_)));
    if sm.ignore_case && !is_regex {
        return Err(
            FieldError::unsupported("case-insensitive matching is not supported").at("ignore_case"),
        );
    }
    match &sm.match_pattern {
        Some(MatchPattern::Exact(s)) => Ok(ValueMatch::Exact(s.as_str().into())),
        Some(MatchPattern::Prefix(s)) => Ok(ValueMatch::Prefix(s.as_str().into())),
        Some(MatchPattern::SafeRegex(r)) => {
            Ok(ValueMatch::Regex(regex_from_proto(r).at("safe_regex")?))
        }
        Some(MatchPattern::Suffix(_)) => {
            Err(FieldError::unsupported("suffix matching is not supported").at("suffix"))
        }
        Some(MatchPattern::Contains(_)) => {
            Err(FieldError::unsupported("contains matching is not supported").at("contains"))
        }
        Some(MatchPattern::Custom(_)) => {
            Err(FieldError::unsupported("custom matchers are not supported").at("custom"))
        }
        None => Err(FieldError::invalid(
            "no pattern: set exact, prefix or safe_regex",
        )),
    }
}

fn regex_from_proto(r: &RegexMatcher) -> Decoded<Pattern> {
    Pattern::new(&r.regex).map_err(FieldError::from)
}

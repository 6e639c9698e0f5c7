//! A route's [`Traffic`] (header changes, rewrites, redirect, direct
//! response) in Envoy's shape, both ways.
//!
//! | model | Envoy |
//! |---|---|
//! | route `headers.request.set` / `add` / `remove` | `Route.request_headers_to_add` (`OVERWRITE_IF_EXISTS_OR_ADD` / `APPEND_IF_EXISTS_OR_ADD`), `request_headers_to_remove` |
//! | route `headers.response` | `Route.response_headers_to_add` / `_remove` |
//! | destination headers | the same fields on `WeightedCluster.ClusterWeight` |
//! | `rewrite.path` | `RouteAction.prefix_rewrite` or `regex_rewrite` |
//! | `rewrite.authority` | `RouteAction.host_rewrite_literal` |
//! | `answer: Redirect` | `Route.redirect` (`path_redirect`, `host_redirect`, `port_redirect`, `scheme_redirect`, `response_code`) |
//! | `answer: Direct` | `Route.direct_response` (inline body) |
//!
//! What the model cannot carry is refused when decoding, never dropped:
//! the other append actions (`ADD_IF_ABSENT`, `OVERWRITE_IF_EXISTS`), a
//! redirect that strips the query or rewrites by prefix or regex, a body
//! from a file or an environment variable.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, HeaderValue as HeaderValueProto, HeaderValueOption, RuntimeFractionalPercent,
    data_source, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, RedirectAction, Route as RouteProto, RouteAction,
    redirect_action::{PathRewriteSpecifier, RedirectResponseCode, SchemeRewriteSpecifier},
    route::Action,
    route_action::{ClusterSpecifier, HostRewriteSpecifier, RequestMirrorPolicy},
    weighted_cluster::ClusterWeight,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{RegexMatchAndSubstitute, RegexMatcher};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};
use http::StatusCode;

use super::{Decoded, FieldError, reject_if};
use crate::model::{Fraction, PathMatch};
use crate::traffic::{
    DirectResponse, HeaderOps, HeaderRules, LocalAnswer, Mirror, PathRewrite, Redirect,
    RegexRewrite, Rewrite, Traffic, header_name, header_value,
};

/// Writes `traffic` onto `route`, whose action is already the route to its
/// clusters (or nothing): a local answer replaces that action.
pub(crate) fn traffic_to_proto(traffic: &Traffic, route: &mut RouteProto) {
    let (add, remove) = ops_to_proto(&traffic.headers.request);
    route.request_headers_to_add = add;
    route.request_headers_to_remove = remove;
    let (add, remove) = ops_to_proto(&traffic.headers.response);
    route.response_headers_to_add = add;
    route.response_headers_to_remove = remove;
    match &traffic.answer {
        Some(LocalAnswer::Redirect(r)) => {
            route.action = Some(Action::Redirect(redirect_to_proto(r)));
        }
        Some(LocalAnswer::Direct(d)) => {
            route.action = Some(Action::DirectResponse(DirectResponseAction {
                status: u32::from(d.status.as_u16()),
                body: d.body.as_ref().map(|b| DataSource {
                    specifier: Some(match std::str::from_utf8(b) {
                        Ok(s) => data_source::Specifier::InlineString(s.to_owned()),
                        Err(_) => data_source::Specifier::InlineBytes(b.to_vec()),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }));
        }
        None => {
            if let Some(Action::Route(action)) = &mut route.action {
                rewrite_to_proto(&traffic.rewrite, action);
                destinations_to_proto(&traffic.destinations, action);
                action.request_mirror_policies = traffic
                    .mirrors
                    .iter()
                    .map(|m| RequestMirrorPolicy {
                        cluster: m.cluster.to_string(),
                        runtime_fraction: Some(RuntimeFractionalPercent {
                            default_value: Some(FractionalPercent {
                                numerator: m.fraction.per_million(),
                                denominator: DenominatorType::Million as i32,
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })
                    .collect();
            }
        }
    }
}

fn ops_to_proto(ops: &HeaderOps) -> (Vec<HeaderValueOption>, Vec<String>) {
    let option = |(name, value): &(http::HeaderName, http::HeaderValue), action| {
        // A value that is not visible ASCII (obs-text) travels as bytes, so
        // that it decodes to the same value.
        let (value, raw_value) = match value.to_str() {
            Ok(text) => (text.to_owned(), Vec::new()),
            Err(_) => (String::new(), value.as_bytes().to_vec()),
        };
        HeaderValueOption {
            header: Some(HeaderValueProto {
                key: name.as_str().to_owned(),
                value,
                raw_value,
            }),
            append_action: action as i32,
            ..Default::default()
        }
    };
    let add = ops
        .set
        .iter()
        .map(|p| option(p, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .chain(
            ops.add
                .iter()
                .map(|p| option(p, HeaderAppendAction::AppendIfExistsOrAdd)),
        )
        .collect();
    let remove = ops.remove.iter().map(|n| n.as_str().to_owned()).collect();
    (add, remove)
}

fn rewrite_to_proto(rewrite: &Rewrite, action: &mut RouteAction) {
    match &rewrite.path {
        Some(PathRewrite::Prefix(p)) => action.prefix_rewrite = p.to_string(),
        Some(PathRewrite::Regex(r)) => {
            action.regex_rewrite = Some(RegexMatchAndSubstitute {
                pattern: Some(RegexMatcher {
                    regex: r.pattern().to_owned(),
                    engine_type: None,
                }),
                substitution: r.substitution().to_owned(),
            });
        }
        None => {}
    }
    if let Some(authority) = &rewrite.authority {
        action.host_rewrite_specifier = Some(HostRewriteSpecifier::HostRewriteLiteral(
            String::from_utf8_lossy(authority.as_bytes()).into_owned(),
        ));
    }
}

/// Destination rules go on the weighted clusters; a single cluster is
/// written as a one-entry `weighted_clusters` to carry them (weight 1: a
/// weight of 0 means "never" there).
fn destinations_to_proto(destinations: &[HeaderRules], action: &mut RouteAction) {
    if destinations.iter().all(HeaderRules::is_empty) {
        return;
    }
    if let Some(ClusterSpecifier::Cluster(name)) = &action.cluster_specifier {
        action.cluster_specifier = Some(ClusterSpecifier::WeightedClusters(
            envoy_types::pb::envoy::config::route::v3::WeightedCluster {
                clusters: vec![ClusterWeight {
                    name: name.clone(),
                    weight: Some(envoy_types::pb::google::protobuf::UInt32Value { value: 1 }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ));
    }
    if let Some(ClusterSpecifier::WeightedClusters(wc)) = &mut action.cluster_specifier {
        for (cluster, rules) in wc.clusters.iter_mut().zip(destinations) {
            let (add, remove) = ops_to_proto(&rules.request);
            cluster.request_headers_to_add = add;
            cluster.request_headers_to_remove = remove;
            let (add, remove) = ops_to_proto(&rules.response);
            cluster.response_headers_to_add = add;
            cluster.response_headers_to_remove = remove;
        }
    }
}

fn redirect_to_proto(r: &Redirect) -> RedirectAction {
    let code = match r.status.as_u16() {
        302 => RedirectResponseCode::Found,
        303 => RedirectResponseCode::SeeOther,
        307 => RedirectResponseCode::TemporaryRedirect,
        308 => RedirectResponseCode::PermanentRedirect,
        _ => RedirectResponseCode::MovedPermanently,
    };
    RedirectAction {
        host_redirect: r.authority.as_deref().unwrap_or_default().to_owned(),
        port_redirect: r.port.map_or(0, u32::from),
        response_code: code as i32,
        scheme_rewrite_specifier: r
            .scheme
            .as_ref()
            .map(|s| SchemeRewriteSpecifier::SchemeRedirect(s.to_string())),
        path_rewrite_specifier: r
            .path
            .as_ref()
            .map(|p| PathRewriteSpecifier::PathRedirect(p.to_string())),
        ..Default::default()
    }
}

/// The traffic rules of `route` (`None`: it has none). `action` is its
/// route action when it has one, and `matched` its path match (a prefix
/// rewrite needs a prefix or exact match).
pub(crate) fn traffic_from_proto(
    route: &RouteProto,
    matched: &PathMatch,
) -> Decoded<Option<Arc<Traffic>>> {
    let headers = HeaderRules {
        request: ops_from_proto(
            &route.request_headers_to_add,
            &route.request_headers_to_remove,
            REQUEST_FIELDS,
        )?,
        response: ops_from_proto(
            &route.response_headers_to_add,
            &route.response_headers_to_remove,
            RESPONSE_FIELDS,
        )?,
    };
    let mut traffic = Traffic {
        headers,
        ..Traffic::default()
    };
    match &route.action {
        Some(Action::Route(action)) => {
            traffic.rewrite = rewrite_from_proto(action, matched).map_err(|e| e.at("route"))?;
            traffic.mirrors = action
                .request_mirror_policies
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    mirror_from_proto(m)
                        .map_err(|e| e.at_index("request_mirror_policies", i).at("route"))
                })
                .collect::<Decoded<Vec<_>>>()?
                .into();
            if let Some(ClusterSpecifier::WeightedClusters(wc)) = &action.cluster_specifier {
                let mut destinations = Vec::with_capacity(wc.clusters.len());
                for (i, c) in wc.clusters.iter().enumerate() {
                    let rules = destination_from_proto(c).map_err(|e| {
                        e.at_index("clusters", i)
                            .at("weighted_clusters")
                            .at("route")
                    })?;
                    destinations.push(rules);
                }
                if !destinations.iter().all(HeaderRules::is_empty) {
                    traffic.destinations = destinations.into();
                }
            }
        }
        Some(Action::Redirect(r)) => {
            traffic.answer = Some(LocalAnswer::Redirect(
                redirect_from_proto(r).map_err(|e| e.at("redirect"))?,
            ));
        }
        Some(Action::DirectResponse(d)) => {
            traffic.answer = Some(LocalAnswer::Direct(
                direct_from_proto(d).map_err(|e| e.at("direct_response"))?,
            ));
        }
        _ => {}
    }
    Ok((!traffic.is_empty()).then(|| Arc::new(traffic)))
}

fn destination_from_proto(c: &ClusterWeight) -> Decoded<HeaderRules> {
    Ok(HeaderRules {
        request: ops_from_proto(
            &c.request_headers_to_add,
            &c.request_headers_to_remove,
            REQUEST_FIELDS,
        )?,
        response: ops_from_proto(
            &c.response_headers_to_add,
            &c.response_headers_to_remove,
            RESPONSE_FIELDS,
        )?,
    })
}

/// The names of the fields that add and remove headers on one message.
type Fields = (&'static str, &'static str);
const REQUEST_FIELDS: Fields = ("request_headers_to_add", "request_headers_to_remove");
const RESPONSE_FIELDS: Fields = ("response_headers_to_add", "response_headers_to_remove");

#[allow(deprecated)] // `append`: the old form of `append_action`, still sent by some servers
fn ops_from_proto(
    add: &[HeaderValueOption],
    remove: &[String],
    (add_field, remove_field): Fields,
) -> Decoded<HeaderOps> {
    let mut set = Vec::new();
    let mut append = Vec::new();
    for (i, option) in add.iter().enumerate() {
        let at = |e: FieldError| e.at_index(add_field, i);
        let header = option
            .header
            .as_ref()
            .ok_or_else(|| at(FieldError::invalid("missing").at("header")))?;
        let name = header_name(&header.key).map_err(|e| at(FieldError::from(e)))?;
        let value = if header.raw_value.is_empty() {
            header_value(&header.key, &header.value)
        } else {
            http::HeaderValue::from_bytes(&header.raw_value).map_err(|_| {
                crate::Error::invalid(format!("invalid raw value for header {:?}", header.key))
            })
        }
        .map_err(|e| at(FieldError::from(e)))?;
        let overwrite = match (option.append.as_ref(), option.append_action) {
            (Some(append), _) => !append.value,
            (None, a) if a == HeaderAppendAction::AppendIfExistsOrAdd as i32 => false,
            (None, a) if a == HeaderAppendAction::OverwriteIfExistsOrAdd as i32 => true,
            (None, a) => {
                return Err(at(FieldError::unsupported(format!(
                    "append action {} is not supported (APPEND_IF_EXISTS_OR_ADD or \
                     OVERWRITE_IF_EXISTS_OR_ADD)",
                    HeaderAppendAction::try_from(a).map_or("unknown", |a| a.as_str_name())
                ))
                .at("append_action")));
            }
        };
        if overwrite {
            set.push((name, value));
        } else {
            append.push((name, value));
        }
    }
    let remove = remove
        .iter()
        .enumerate()
        .map(|(i, n)| header_name(n).map_err(|e| FieldError::from(e).at_index(remove_field, i)))
        .collect::<Decoded<Vec<_>>>()?;
    Ok(HeaderOps {
        set: set.into(),
        add: append.into(),
        remove: remove.into(),
    })
}

fn rewrite_from_proto(a: &RouteAction, matched: &PathMatch) -> Decoded<Rewrite> {
    reject_if(a.path_rewrite_policy.is_some(), "path_rewrite_policy")?;
    reject_if(!a.path_rewrite.is_empty(), "path_rewrite")?;
    let path = match (a.prefix_rewrite.is_empty(), &a.regex_rewrite) {
        (true, None) => None,
        (false, Some(_)) => {
            return Err(FieldError::invalid(
                "prefix_rewrite and regex_rewrite are mutually exclusive",
            ));
        }
        (false, None) => {
            if matches!(matched, PathMatch::Regex(_)) {
                return Err(FieldError::invalid(
                    "prefix_rewrite needs a prefix or path match (this route matches a regex: \
                     use regex_rewrite)",
                )
                .at("prefix_rewrite"));
            }
            Some(PathRewrite::Prefix(a.prefix_rewrite.as_str().into()))
        }
        (true, Some(r)) => {
            let pattern = r
                .pattern
                .as_ref()
                .ok_or_else(|| FieldError::invalid("missing").at("pattern"))
                .map_err(|e| e.at("regex_rewrite"))?;
            Some(PathRewrite::Regex(
                RegexRewrite::new(&pattern.regex, &r.substitution)
                    .map_err(|e| FieldError::from(e).at("regex_rewrite"))?,
            ))
        }
    };
    let authority = match &a.host_rewrite_specifier {
        None => None,
        Some(HostRewriteSpecifier::HostRewriteLiteral(host)) => Some(
            http::HeaderValue::from_str(host)
                .ok()
                .filter(|_| http::uri::Authority::try_from(host.as_str()).is_ok())
                .ok_or_else(|| {
                    FieldError::invalid(format!("{host:?} is not an authority"))
                        .at("host_rewrite_literal")
                })?,
        ),
        Some(_) => {
            return Err(FieldError::unsupported(
                "only host_rewrite_literal is supported (not auto_host_rewrite, \
                 host_rewrite_header or host_rewrite_path_regex)",
            )
            .at("host_rewrite_specifier"));
        }
    };
    Ok(Rewrite { path, authority })
}

fn mirror_from_proto(m: &RequestMirrorPolicy) -> Decoded<Mirror> {
    reject_if(!m.cluster_header.is_empty(), "cluster_header")?;
    reject_if(m.trace_sampled.is_some(), "trace_sampled")?;
    reject_if(
        m.disable_shadow_host_suffix_append,
        "disable_shadow_host_suffix_append",
    )?;
    reject_if(
        !m.request_headers_mutations.is_empty(),
        "request_headers_mutations",
    )?;
    reject_if(!m.host_rewrite_literal.is_empty(), "host_rewrite_literal")?;
    if m.cluster.is_empty() {
        return Err(super::missing("cluster"));
    }
    let fraction = match m
        .runtime_fraction
        .as_ref()
        .and_then(|r| r.default_value.as_ref())
    {
        // No fraction: every request, as Envoy does.
        None => Fraction::ALL,
        Some(f) => {
            let per_million = match DenominatorType::try_from(f.denominator) {
                Ok(DenominatorType::Hundred) => u64::from(f.numerator) * 10_000,
                Ok(DenominatorType::TenThousand) => u64::from(f.numerator) * 100,
                Ok(DenominatorType::Million) => u64::from(f.numerator),
                Err(_) => {
                    return Err(FieldError::invalid(format!(
                        "unknown denominator {}",
                        f.denominator
                    ))
                    .at("runtime_fraction"));
                }
            };
            Fraction::from_per_million(u32::try_from(per_million).unwrap_or(u32::MAX))
        }
    };
    Ok(Mirror {
        cluster: m.cluster.as_str().into(),
        fraction,
    })
}

fn redirect_from_proto(r: &RedirectAction) -> Decoded<Redirect> {
    reject_if(r.strip_query, "strip_query")?;
    let path = match &r.path_rewrite_specifier {
        None => None,
        Some(PathRewriteSpecifier::PathRedirect(p)) => {
            if !p.starts_with('/') {
                return Err(
                    FieldError::invalid(format!("{p:?} does not start with '/'"))
                        .at("path_redirect"),
                );
            }
            Some(p.as_str().into())
        }
        Some(_) => {
            return Err(FieldError::unsupported(
                "only path_redirect is supported (not prefix_rewrite or regex_rewrite)",
            )
            .at("path_rewrite_specifier"));
        }
    };
    let scheme = match &r.scheme_rewrite_specifier {
        None | Some(SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
        Some(SchemeRewriteSpecifier::HttpsRedirect(true)) => Some("https".into()),
        Some(SchemeRewriteSpecifier::SchemeRedirect(s)) => {
            if s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            {
                return Err(
                    FieldError::invalid(format!("{s:?} is not a scheme")).at("scheme_redirect")
                );
            }
            Some(s.to_ascii_lowercase().into())
        }
    };
    let authority = (!r.host_redirect.is_empty())
        .then(|| {
            http::uri::Authority::try_from(r.host_redirect.as_str())
                .map(|_| r.host_redirect.as_str().into())
                .map_err(|_| {
                    FieldError::invalid(format!("{:?} is not a host", r.host_redirect))
                        .at("host_redirect")
                })
        })
        .transpose()?;
    let port =
        match r.port_redirect {
            0 => None,
            p => Some(u16::try_from(p).map_err(|_| {
                FieldError::invalid(format!("{p} is not a port")).at("port_redirect")
            })?),
        };
    let status = match RedirectResponseCode::try_from(r.response_code) {
        Ok(RedirectResponseCode::MovedPermanently) => StatusCode::MOVED_PERMANENTLY,
        Ok(RedirectResponseCode::Found) => StatusCode::FOUND,
        Ok(RedirectResponseCode::SeeOther) => StatusCode::SEE_OTHER,
        Ok(RedirectResponseCode::TemporaryRedirect) => StatusCode::TEMPORARY_REDIRECT,
        Ok(RedirectResponseCode::PermanentRedirect) => StatusCode::PERMANENT_REDIRECT,
        Err(_) => {
            return Err(
                FieldError::invalid(format!("unknown response code {}", r.response_code))
                    .at("response_code"),
            );
        }
    };
    Ok(Redirect {
        path,
        authority,
        port,
        scheme,
        status,
    })
}

fn direct_from_proto(d: &DirectResponseAction) -> Decoded<DirectResponse> {
    reject_if(d.body_format.is_some(), "body_format")?;
    let status = u16::try_from(d.status)
        .ok()
        .filter(|s| (200..=599).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| {
            FieldError::invalid(format!("status {} is not in 200..=599", d.status)).at("status")
        })?;
    let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        None => None,
        Some(data_source::Specifier::InlineString(s)) => Some(Arc::from(s.as_bytes())),
        Some(data_source::Specifier::InlineBytes(b)) => Some(Arc::from(b.as_slice())),
        Some(_) => {
            return Err(FieldError::unsupported(
                "only inline bodies are supported (not a file or an environment variable)",
            )
            .at("body"));
        }
    };
    Ok(DirectResponse { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::route::v3::RouteAction;

    fn pair(n: &str, v: &str) -> (http::HeaderName, http::HeaderValue) {
        (header_name(n).unwrap(), header_value(n, v).unwrap())
    }

    fn rules(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderOps {
        HeaderOps {
            set: set.iter().map(|(n, v)| pair(n, v)).collect(),
            add: add.iter().map(|(n, v)| pair(n, v)).collect(),
            remove: remove.iter().map(|n| header_name(n).unwrap()).collect(),
        }
    }

    fn route_to(clusters: &[&str]) -> RouteProto {
        let specifier = match clusters {
            [one] => ClusterSpecifier::Cluster((*one).to_owned()),
            many => ClusterSpecifier::WeightedClusters(
                envoy_types::pb::envoy::config::route::v3::WeightedCluster {
                    clusters: many
                        .iter()
                        .map(|c| ClusterWeight {
                            name: (*c).to_owned(),
                            weight: Some(envoy_types::pb::google::protobuf::UInt32Value {
                                value: 50,
                            }),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                },
            ),
        };
        RouteProto {
            action: Some(Action::Route(RouteAction {
                cluster_specifier: Some(specifier),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn round_trip(traffic: Traffic, clusters: &[&str], matched: &PathMatch) -> RouteProto {
        let mut proto = route_to(clusters);
        traffic_to_proto(&traffic, &mut proto);
        let back = traffic_from_proto(&proto, matched).expect("decodes");
        assert_eq!(back.as_deref(), Some(&traffic));
        proto
    }

    #[test]
    fn header_rules_round_trip_at_route_and_destination_level() {
        let traffic = Traffic {
            headers: HeaderRules {
                request: rules(&[("x-set", "1")], &[("x-add", "2")], &["x-remove"]),
                response: rules(&[], &[("x-served", "mesh")], &["server"]),
            },
            destinations: Arc::from([
                HeaderRules {
                    request: rules(&[("x-version", "v1")], &[], &[]),
                    response: HeaderOps::default(),
                },
                HeaderRules::default(),
            ]),
            ..Traffic::default()
        };
        let proto = round_trip(traffic, &["v1", "v2"], &PathMatch::Prefix("/".into()));
        assert_eq!(proto.request_headers_to_add.len(), 2);
        assert_eq!(
            proto.request_headers_to_add[0].append_action,
            HeaderAppendAction::OverwriteIfExistsOrAdd as i32
        );
        // A single destination with rules travels as a one-entry weighted cluster.
        let single = Traffic {
            destinations: Arc::from([HeaderRules {
                request: rules(&[], &[("x-d", "1")], &[]),
                response: HeaderOps::default(),
            }]),
            ..Traffic::default()
        };
        let proto = round_trip(single, &["only"], &PathMatch::Prefix("/".into()));
        let Some(Action::Route(a)) = &proto.action else {
            panic!("a route action")
        };
        assert!(matches!(
            a.cluster_specifier,
            Some(ClusterSpecifier::WeightedClusters(_))
        ));
    }

    #[test]
    fn a_value_that_is_not_ascii_round_trips_as_bytes() {
        let value = http::HeaderValue::from_bytes(b"caf\xe9").unwrap();
        let traffic = Traffic {
            headers: HeaderRules {
                request: HeaderOps {
                    set: Arc::from([(header_name("x-v").unwrap(), value)]),
                    ..HeaderOps::default()
                },
                response: HeaderOps::default(),
            },
            ..Traffic::default()
        };
        round_trip(traffic, &["c"], &PathMatch::Prefix("/".into()));
    }

    #[test]
    fn rewrites_round_trip() {
        let prefix = Traffic {
            rewrite: Rewrite {
                path: Some(PathRewrite::Prefix("/v2".into())),
                authority: Some(http::HeaderValue::from_static("catalog.internal:8080")),
            },
            ..Traffic::default()
        };
        round_trip(prefix, &["c"], &PathMatch::Prefix("/v1".into()));
        let regex = Traffic {
            rewrite: Rewrite {
                path: Some(PathRewrite::Regex(
                    RegexRewrite::new("^/api/(.*)$", "/\\1").unwrap(),
                )),
                authority: None,
            },
            ..Traffic::default()
        };
        round_trip(regex, &["c"], &PathMatch::Prefix("/".into()));
    }

    #[test]
    fn mirrors_round_trip() {
        let traffic = Traffic {
            mirrors: Arc::from([
                Mirror {
                    cluster: "outbound|80||shadow.shop.svc.cluster.local".into(),
                    fraction: Fraction::ALL,
                },
                Mirror {
                    cluster: "outbound|80|v2|catalog.shop.svc.cluster.local".into(),
                    fraction: Fraction::from_percent(12.5).unwrap(),
                },
            ]),
            ..Traffic::default()
        };
        round_trip(traffic, &["c"], &PathMatch::Prefix("/".into()));
    }

    #[test]
    fn local_answers_round_trip() {
        let redirect = Traffic {
            answer: Some(LocalAnswer::Redirect(Redirect {
                path: Some("/v2/items".into()),
                authority: Some("shop.example".into()),
                port: Some(8443),
                scheme: Some("https".into()),
                status: StatusCode::PERMANENT_REDIRECT,
            })),
            headers: HeaderRules {
                request: HeaderOps::default(),
                response: rules(&[("x-why", "moved")], &[], &[]),
            },
            ..Traffic::default()
        };
        let proto = round_trip(redirect, &["c"], &PathMatch::Prefix("/".into()));
        assert!(matches!(proto.action, Some(Action::Redirect(_))));
        let direct = Traffic {
            answer: Some(LocalAnswer::Direct(DirectResponse {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: Some(Arc::from(&b"down for maintenance"[..])),
            })),
            ..Traffic::default()
        };
        round_trip(direct, &["c"], &PathMatch::Prefix("/".into()));
        let binary = Traffic {
            answer: Some(LocalAnswer::Direct(DirectResponse {
                status: StatusCode::OK,
                body: Some(Arc::from(&[0xff_u8, 0x00][..])),
            })),
            ..Traffic::default()
        };
        round_trip(binary, &["c"], &PathMatch::Prefix("/".into()));
    }

    #[test]
    fn nothing_is_none() {
        let proto = route_to(&["c"]);
        assert_eq!(
            traffic_from_proto(&proto, &PathMatch::Prefix("/".into())).unwrap(),
            None
        );
    }

    fn error_of(proto: &RouteProto, matched: &PathMatch) -> String {
        traffic_from_proto(proto, matched)
            .expect_err("refused")
            .into_error(super::super::ResourceType::RouteConfig, Some("r"))
            .to_string()
    }

    #[test]
    fn what_the_model_cannot_carry_is_refused() {
        let prefix = PathMatch::Prefix("/".into());
        let mut p = route_to(&["c"]);
        p.request_headers_to_add.push(HeaderValueOption {
            header: Some(HeaderValueProto {
                key: "x-a".into(),
                value: "1".into(),
                ..Default::default()
            }),
            append_action: HeaderAppendAction::AddIfAbsent as i32,
            ..Default::default()
        });
        assert!(error_of(&p, &prefix).contains("ADD_IF_ABSENT"));

        let mut p = route_to(&["c"]);
        p.request_headers_to_remove.push(":path".into());
        assert!(error_of(&p, &prefix).contains("pseudo-header"));

        let mut p = route_to(&["c"]);
        if let Some(Action::Route(a)) = &mut p.action {
            a.prefix_rewrite = "/x".into();
        }
        assert!(
            error_of(
                &p,
                &PathMatch::Regex(crate::model::Pattern::new("/a.*").unwrap())
            )
            .contains("regex_rewrite")
        );

        let mut p = route_to(&["c"]);
        p.action = Some(Action::Redirect(RedirectAction {
            strip_query: true,
            ..Default::default()
        }));
        assert!(error_of(&p, &prefix).contains("strip_query"));

        let mut p = route_to(&["c"]);
        p.action = Some(Action::DirectResponse(DirectResponseAction {
            status: 99,
            ..Default::default()
        }));
        assert!(error_of(&p, &prefix).contains("status 99"));

        let mut p = route_to(&["c"]);
        p.action = Some(Action::DirectResponse(DirectResponseAction {
            status: 200,
            body: Some(DataSource {
                specifier: Some(data_source::Specifier::Filename("/etc/passwd".into())),
                ..Default::default()
            }),
            ..Default::default()
        }));
        assert!(error_of(&p, &prefix).contains("inline bodies"));
    }
}

//! Envoy's `cors` HTTP filter over xDS (see [`crate::cors`]): the filter
//! (`envoy.filters.http.cors`, config `envoy.extensions.filters.http.cors.v3.Cors`,
//! empty) in a server listener's HCM, and each route's
//! `envoy.extensions.filters.http.cors.v3.CorsPolicy` in its
//! `typed_per_filter_config` (Envoy reads the policy there, not in the
//! deprecated `RouteAction.cors`).
//!
//! **gRPC (gRFC A39).** gRPC has no `cors` filter: the filter is written
//! with `is_optional: true` and every per-route policy wrapped in
//! `FilterConfig { config, is_optional: true }`, so gRPC servers accept
//! the listener and ignore CORS (which `/status` and `check --for grpc`
//! say). Both are needed: grpcio 1.85.1 NACKs the whole server listener
//! ("unsupported filter type") for the filter without `is_optional`, and
//! for a per-route policy whose wrapper is not optional (`tests/cors.rs`
//! runs a grpcio xDS server against it). Decoding accepts the wrapped and
//! the bare form.
//!
//! Written as Istio writes it: lists joined by `,`, `max_age` in seconds,
//! `allow_credentials` and `forward_not_matching_preflights` only when
//! set. `filter_enabled`, `shadow_enabled` (runtime fractions other than
//! 100% enabled / unset) and `allow_private_network_access` are refused by
//! name when decoding, never ignored.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::route::v3::FilterConfig;
use envoy_types::pb::envoy::extensions::filters::http::cors::v3::{
    Cors, CorsPolicy as CorsPolicyProto,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter::ConfigType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use envoy_types::pb::google::protobuf::BoolValue;
use http::HeaderValue;
use prost::Name as _;

use super::{Any, At, Decoded, FieldError, missing, pack, reject_if, type_name, unpack};
use crate::cors::CorsPolicy;
use crate::model::{Pattern, ValueMatch};

/// The filter's name in Envoy (and the key of its per-route configs).
pub(crate) const CORS_FILTER_NAME: &str = "envoy.filters.http.cors";

/// Whether `any` is the `cors` filter's config.
pub(crate) fn is_cors_filter(any: &Any) -> bool {
    type_name(&any.type_url) == Cors::full_name()
}

/// The HCM filter, `is_optional: true` (gRPC ignores it).
pub(crate) fn cors_filter() -> HttpFilter {
    HttpFilter {
        name: CORS_FILTER_NAME.to_string(),
        config_type: Some(ConfigType::TypedConfig(pack(&Cors {}))),
        is_optional: true,
        ..Default::default()
    }
}

/// Writes `policy` under the filter's name in a route's
/// `typed_per_filter_config`, wrapped as gRFC A39 asks.
pub(crate) fn cors_to_route(
    policy: &CorsPolicy,
    typed_per_filter_config: &mut HashMap<String, Any>,
) {
    typed_per_filter_config.insert(
        CORS_FILTER_NAME.to_string(),
        pack(&FilterConfig {
            config: Some(pack(&cors_policy_to_proto(policy))),
            is_optional: true,
            disabled: false,
        }),
    );
}

/// The policy of a route (`None`: none, or `FilterConfig { disabled }`).
pub(crate) fn cors_from_route(
    typed_per_filter_config: &HashMap<String, Any>,
) -> Decoded<Option<Arc<CorsPolicy>>> {
    let Some(any) = typed_per_filter_config.get(CORS_FILTER_NAME) else {
        return Ok(None);
    };
    let inner = if type_name(&any.type_url) == FilterConfig::full_name() {
        let wrapper: FilterConfig = unpack(any).at(CORS_FILTER_NAME)?;
        if wrapper.disabled {
            return Ok(None);
        }
        wrapper
            .config
            .ok_or_else(|| missing("config").at(CORS_FILTER_NAME))?
    } else {
        any.clone()
    };
    let proto: CorsPolicyProto = unpack(&inner).at(CORS_FILTER_NAME)?;
    cors_policy_from_proto(&proto)
        .map(|p| Some(Arc::new(p)))
        .at(CORS_FILTER_NAME)
}

/// The proto of a policy.
pub(crate) fn cors_policy_to_proto(p: &CorsPolicy) -> CorsPolicyProto {
    let text = |v: &Option<HeaderValue>| {
        v.as_ref()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    CorsPolicyProto {
        allow_origin_string_match: p.allow_origins.iter().filter_map(origin_to_proto).collect(),
        allow_methods: text(&p.allow_methods),
        allow_headers: text(&p.allow_headers),
        expose_headers: text(&p.expose_headers),
        max_age: text(&p.max_age),
        allow_credentials: p.allow_credentials.map(|value| BoolValue { value }),
        forward_not_matching_preflights: p
            .forward_not_matching_preflights
            .map(|value| BoolValue { value }),
        ..Default::default()
    }
}

fn origin_to_proto(m: &ValueMatch) -> Option<StringMatcher> {
    let pattern = match m {
        ValueMatch::Exact(s) => MatchPattern::Exact(s.to_string()),
        ValueMatch::Prefix(s) => MatchPattern::Prefix(s.to_string()),
        ValueMatch::Regex(p) => MatchPattern::SafeRegex(RegexMatcher {
            regex: p.as_str().to_string(),
            engine_type: None,
        }),
        ValueMatch::Present(_) => return None,
    };
    Some(StringMatcher {
        ignore_case: false,
        match_pattern: Some(pattern),
    })
}

/// The policy a proto describes.
pub(crate) fn cors_policy_from_proto(p: &CorsPolicyProto) -> Decoded<CorsPolicy> {
    if let Some(f) = &p.filter_enabled {
        let full = f
            .default_value
            .as_ref()
            .is_some_and(|v| v.numerator > 0 && fraction_is_whole(v));
        if !full {
            return Err(FieldError::unsupported(
                "a CORS filter enabled for a fraction of requests is not supported (100% or unset)",
            )
            .at("filter_enabled"));
        }
    }
    reject_if(p.shadow_enabled.is_some(), "shadow_enabled")?;
    reject_if(
        p.allow_private_network_access
            .as_ref()
            .is_some_and(|b| b.value),
        "allow_private_network_access",
    )?;
    let mut allow_origins = Vec::new();
    for (i, m) in p.allow_origin_string_match.iter().enumerate() {
        allow_origins.push(origin_from_proto(m).at_index("allow_origin_string_match", i)?);
    }
    let value = |s: &str, field: &'static str| -> Decoded<Option<HeaderValue>> {
        if s.is_empty() {
            return Ok(None);
        }
        HeaderValue::from_str(s).map(Some).map_err(|_| {
            FieldError::invalid(format!("{s:?} is not a valid header value")).at(field)
        })
    };
    if !p.max_age.is_empty() && p.max_age.parse::<u64>().is_err() {
        return Err(
            FieldError::invalid(format!("{:?} is not a number of seconds", p.max_age))
                .at("max_age"),
        );
    }
    Ok(CorsPolicy {
        allow_origins: allow_origins.into(),
        allow_methods: value(&p.allow_methods, "allow_methods")?,
        allow_headers: value(&p.allow_headers, "allow_headers")?,
        expose_headers: value(&p.expose_headers, "expose_headers")?,
        max_age: value(&p.max_age, "max_age")?,
        allow_credentials: p.allow_credentials.as_ref().map(|b| b.value),
        forward_not_matching_preflights: p
            .forward_not_matching_preflights
            .as_ref()
            .map(|b| b.value),
    })
}

/// Whether a fractional percent is 100%.
fn fraction_is_whole(v: &envoy_types::pb::envoy::r#type::v3::FractionalPercent) -> bool {
    let denominator: u64 = match v.denominator {
        0 => 100,
        1 => 10_000,
        _ => 1_000_000,
    };
    u64::from(v.numerator) >= denominator
}

fn origin_from_proto(m: &StringMatcher) -> Decoded<ValueMatch> {
    if m.ignore_case && !matches!(m.match_pattern, Some(MatchPattern::SafeRegex(_))) {
        return Err(
            FieldError::unsupported("case-insensitive origin matching is not supported")
                .at("ignore_case"),
        );
    }
    match &m.match_pattern {
        Some(MatchPattern::Exact(s)) => Ok(ValueMatch::Exact(s.as_str().into())),
        Some(MatchPattern::Prefix(s)) => Ok(ValueMatch::Prefix(s.as_str().into())),
        Some(MatchPattern::SafeRegex(r)) => Pattern::new(&r.regex)
            .map(ValueMatch::Regex)
            .map_err(FieldError::from)
            .at("safe_regex"),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
    use envoy_types::pb::envoy::config::route::v3::FilterConfig;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
        HttpConnectionManager, http_connection_manager::RouteSpecifier,
    };
    use http::HeaderValue;

    use super::*;
    use crate::cors::{CorsPolicy, CorsRoute};
    use crate::model::{HeaderMatch, MtlsMode, PathMatch, RouteMatch, ServerListener};
    use crate::xds::{decode_server_listener, encode_server_listener};

    fn policy() -> Arc<CorsPolicy> {
        Arc::new(CorsPolicy {
            allow_origins: Arc::from([
                ValueMatch::Exact("https://example.com".into()),
                ValueMatch::Prefix("https://app.".into()),
                ValueMatch::Regex(Pattern::new(r"https://.*\.example\.org").unwrap()),
            ]),
            allow_methods: Some(HeaderValue::from_static("POST,GET")),
            allow_headers: Some(HeaderValue::from_static("X-Foo-Bar")),
            expose_headers: Some(HeaderValue::from_static("X-Expose")),
            max_age: Some(HeaderValue::from_static("86400")),
            allow_credentials: Some(false),
            forward_not_matching_preflights: Some(false),
        })
    }

    fn listener() -> ServerListener {
        let get = HeaderMatch {
            name: ":method".into(),
            value: ValueMatch::Exact("GET".into()),
            invert: false,
        };
        ServerListener {
            name: "grpc/server?xds.resource.listening_address=10.0.0.7:8080".into(),
            address: "10.0.0.7:8080".parse().unwrap(),
            mtls: MtlsMode::Permissive,
            policies: Arc::from([]),
            rate_limit: None,
            cors: Arc::from([
                CorsRoute {
                    matcher: RouteMatch {
                        path: PathMatch::Exact("/healthz".into()),
                        ..RouteMatch::any()
                    },
                    policy: None,
                },
                CorsRoute {
                    matcher: RouteMatch {
                        path: PathMatch::Prefix("/api".into()),
                        headers: Arc::from([get]),
                        ..RouteMatch::any()
                    },
                    policy: Some(policy()),
                },
            ]),
        }
    }

    fn hcm(l: &Listener) -> HttpConnectionManager {
        let Some(filter::ConfigType::TypedConfig(any)) = &l.filter_chains[0].filters[0].config_type
        else {
            panic!("no HCM");
        };
        unpack(any).unwrap()
    }

    #[test]
    fn cors_routes_round_trip_in_the_shape_grpc_accepts() {
        let model = listener();
        let any = encode_server_listener(&model);
        let proto: Listener = unpack(&any).unwrap();
        let hcm = hcm(&proto);
        let first = &hcm.http_filters[0];
        assert_eq!(first.name, CORS_FILTER_NAME, "cors runs first");
        assert!(first.is_optional, "else gRPC NACKs the Listener");
        let Some(RouteSpecifier::RouteConfig(rc)) = &hcm.route_specifier else {
            panic!("inline routes");
        };
        let routes = &rc.virtual_hosts[0].routes;
        assert_eq!(routes.len(), 3, "two CORS routes, then the catch-all");
        assert!(routes[0].typed_per_filter_config.is_empty());
        let per_route = &routes[1].typed_per_filter_config[CORS_FILTER_NAME];
        let wrapper: FilterConfig = unpack(per_route).unwrap();
        assert!(wrapper.is_optional, "else gRPC NACKs the Listener");
        let cors: CorsPolicyProto = unpack(wrapper.config.as_ref().unwrap()).unwrap();
        assert_eq!(cors.allow_methods, "POST,GET");
        assert_eq!(cors.max_age, "86400");
        assert_eq!(cors.allow_origin_string_match.len(), 3);
        assert_eq!(
            cors.forward_not_matching_preflights,
            Some(BoolValue { value: false })
        );
        assert!(routes[2].typed_per_filter_config.is_empty());
        assert_eq!(decode_server_listener(&any).unwrap(), model);
        // With a rate limit too: its per-route config is on every route,
        // so the routes limit alike, as decoding requires.
        let limited = ServerListener {
            rate_limit: Some(Arc::new(crate::ratelimit::RateLimitConfig {
                filter: crate::ratelimit::LocalRateLimit::inert(),
                route: Some(crate::ratelimit::LocalRateLimit::inert()),
                rate_limits: Arc::from([]),
            })),
            ..model.clone()
        };
        let proto: Listener = unpack(&encode_server_listener(&limited)).unwrap();
        let Some(RouteSpecifier::RouteConfig(rc)) = &self::hcm(&proto).route_specifier else {
            panic!("inline routes");
        };
        assert!(rc.virtual_hosts[0].routes.iter().all(|r| {
            r.typed_per_filter_config
                .contains_key("envoy.filters.http.local_ratelimit")
        }));
        assert_eq!(
            decode_server_listener(&encode_server_listener(&limited)).unwrap(),
            limited
        );
        // Without CORS routes: no cors filter, the catch-all alone.
        let none = ServerListener {
            cors: Arc::from([]),
            ..model.clone()
        };
        assert_eq!(
            decode_server_listener(&encode_server_listener(&none)).unwrap(),
            none
        );
    }

    #[test]
    fn a_bare_policy_decodes_and_one_without_the_filter_is_refused() {
        let model = listener();
        let mut proto: Listener = unpack(&encode_server_listener(&model)).unwrap();
        let rewrite = |proto: &mut Listener, f: &dyn Fn(&mut HttpConnectionManager)| {
            for chain in &mut proto.filter_chains {
                let Some(filter::ConfigType::TypedConfig(any)) = &mut chain.filters[0].config_type
                else {
                    panic!("no HCM");
                };
                let mut hcm: HttpConnectionManager = unpack(any).unwrap();
                f(&mut hcm);
                *any = pack(&hcm);
            }
        };
        rewrite(&mut proto, &|hcm| {
            let Some(RouteSpecifier::RouteConfig(rc)) = &mut hcm.route_specifier else {
                panic!("inline routes");
            };
            let cfg = &mut rc.virtual_hosts[0].routes[1].typed_per_filter_config;
            cfg.insert(
                CORS_FILTER_NAME.to_string(),
                pack(&cors_policy_to_proto(&policy())),
            );
        });
        assert_eq!(
            decode_server_listener(&pack(&proto)).unwrap(),
            model,
            "the bare form is read too"
        );
        rewrite(&mut proto, &|hcm| {
            hcm.http_filters.remove(0);
        });
        let err = decode_server_listener(&pack(&proto))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no such filter") && err.contains("typed_per_filter_config"),
            "{err}"
        );
    }

    #[test]
    fn fields_the_model_cannot_honor_are_refused_by_name() {
        let base = cors_policy_to_proto(&policy());
        let shadow = CorsPolicyProto {
            shadow_enabled: Some(Default::default()),
            ..base.clone()
        };
        let err = cors_policy_from_proto(&shadow).unwrap_err();
        assert!(format!("{err:?}").contains("shadow_enabled"), "{err:?}");
        let age = CorsPolicyProto {
            max_age: "1d".into(),
            ..base.clone()
        };
        assert!(format!("{:?}", cors_policy_from_proto(&age).unwrap_err()).contains("max_age"));
        let suffix = CorsPolicyProto {
            allow_origin_string_match: vec![StringMatcher {
                ignore_case: false,
                match_pattern: Some(MatchPattern::Suffix(".com".into())),
            }],
            ..base
        };
        let err = format!("{:?}", cors_policy_from_proto(&suffix).unwrap_err());
        assert!(err.contains("suffix"), "{err}");
    }
}

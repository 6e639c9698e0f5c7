//! Envoy's `local_ratelimit` HTTP filter over xDS: the filter's config
//! (`envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit`) in
//! an HCM's `http_filters`, the per-route config in a route's
//! `typed_per_filter_config`, and the route's `rate_limits` (the actions
//! that make a request's descriptors). See [`crate::ratelimit`].
//!
//! **gRPC (gRFC A39).** gRPC knows no `local_ratelimit`: an HTTP filter it
//! does not know makes it NACK the whole Listener unless the filter says
//! `is_optional: true`, and a per-route config of an unknown filter makes
//! it NACK the whole RouteConfiguration unless the config is wrapped in
//! `envoy.config.route.v3.FilterConfig { config, is_optional: true }`.
//! This module always writes both forms (Envoy reads them too), so one
//! encoding serves every client; gRPC then ignores the limit, which
//! `/status` and `mesh-control check --for grpc` say. Decoding accepts the
//! wrapped and the bare per-route form.
//!
//! Fields the model cannot honor are refused by name (a custom `status`,
//! `x-ratelimit-*` headers, per-connection buckets, shadow descriptors,
//! ...), never ignored.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue as HeaderValueProto, HeaderValueOption, RuntimeFractionalPercent,
    header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::config::route::v3::{
    FilterConfig, HeaderMatcher, RateLimit as RateLimitProto,
    header_matcher::HeaderMatchSpecifier,
    rate_limit::{
        Action as ActionProto,
        action::{ActionSpecifier, GenericKey, HeaderValueMatch, RequestHeaders},
    },
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    LocalRateLimitDescriptor, rate_limit_descriptor::Entry,
};
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit as LocalRateLimitProto;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter::ConfigType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use envoy_types::pb::envoy::r#type::v3::TokenBucket as TokenBucketProto;
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use prost::Name as _;

use super::{
    Any, At, Decoded, FieldError, duration_from_proto, duration_to_proto, fraction_from_proto,
    fraction_to_proto, missing, pack, reject_if, type_name, unpack,
};
use crate::model::{Fraction, HeaderMatch, Name, Pattern, ValueMatch};
use crate::ratelimit::{Action, Descriptor, LocalRateLimit, RateLimitConfig, Refusal, TokenBucket};
use crate::traffic::{HeaderOps, header_name, header_value};

/// The filter's name in Envoy (and the key of its per-route configs).
pub(crate) const LOCAL_RATELIMIT_FILTER_NAME: &str = "envoy.filters.http.local_ratelimit";
/// Envoy's `stat_prefix` (required there): Istio's task uses this one.
const STAT_PREFIX: &str = "http_local_rate_limiter";

/// Whether `any` is a `LocalRateLimit` config.
pub(crate) fn is_local_rate_limit(any: &Any) -> bool {
    type_name(&any.type_url) == LocalRateLimitProto::full_name()
}

/// The HCM filter: the config, `is_optional: true` (gRPC ignores it).
pub(crate) fn local_rate_limit_filter(config: &LocalRateLimit) -> HttpFilter {
    HttpFilter {
        name: LOCAL_RATELIMIT_FILTER_NAME.to_string(),
        config_type: Some(ConfigType::TypedConfig(pack(&local_rate_limit_to_proto(
            config,
        )))),
        is_optional: true,
        ..Default::default()
    }
}

/// A per-route config, wrapped as gRFC A39 asks
/// (`FilterConfig { config, is_optional: true }`).
pub(crate) fn per_route_config(config: &LocalRateLimit) -> Any {
    pack(&FilterConfig {
        config: Some(pack(&local_rate_limit_to_proto(config))),
        is_optional: true,
        disabled: false,
    })
}

/// Writes `config`'s route part: the per-route config under the filter's
/// name in the route's `typed_per_filter_config`, and the `rate_limits`
/// (a client route's `RouteAction.rate_limits`; for a server listener's
/// non-forwarding route, which has no `RouteAction`, its virtual host's,
/// which Envoy's filter reads when the route has none).
pub(crate) fn rate_limit_to_route(
    config: &RateLimitConfig,
    typed_per_filter_config: &mut HashMap<String, Any>,
    rate_limits: &mut Vec<RateLimitProto>,
) {
    if let Some(c) = &config.route {
        typed_per_filter_config
            .insert(LOCAL_RATELIMIT_FILTER_NAME.to_string(), per_route_config(c));
    }
    *rate_limits = rate_limits_to_proto(&config.rate_limits);
}

/// The rate limit of a route whose listener has the filter `filter` (named
/// `filter_name`, the key of per-route configs): `None` when the listener
/// has no such filter and the route says nothing; an error for a per-route
/// config without the filter, as it would limit nothing.
pub(crate) fn rate_limit_from_route(
    filter: Option<(&str, &LocalRateLimit)>,
    typed_per_filter_config: &HashMap<String, Any>,
    rate_limits: &[RateLimitProto],
) -> Decoded<Option<RateLimitConfig>> {
    let name = filter.map_or(LOCAL_RATELIMIT_FILTER_NAME, |(n, _)| n);
    let route = match typed_per_filter_config.get(name) {
        Some(any) => per_route_from_proto(any).at("typed_per_filter_config")?,
        None => None,
    };
    let rate_limits = rate_limits_from_proto(rate_limits)?;
    match filter {
        Some((_, filter)) => Ok(Some(RateLimitConfig {
            filter: filter.clone(),
            route,
            rate_limits,
        })),
        None if route.is_some() => Err(FieldError::unsupported(format!(
            "a {LOCAL_RATELIMIT_FILTER_NAME} config for a route whose listener has no such \
             filter: it would limit nothing"
        ))
        .at("typed_per_filter_config")),
        None => Ok(None),
    }
}

/// A per-route config: `FilterConfig`-wrapped (gRFC A39) or bare; a
/// wrapper saying `disabled` (Envoy's way of turning the filter off on a
/// route) is a config that limits nothing.
pub(crate) fn per_route_from_proto(any: &Any) -> Decoded<Option<LocalRateLimit>> {
    if type_name(&any.type_url) == FilterConfig::full_name() {
        let wrapper: FilterConfig = unpack(any)?;
        if wrapper.disabled {
            return Ok(Some(LocalRateLimit::inert()));
        }
        let inner = wrapper.config.as_ref().ok_or_else(|| missing("config"))?;
        return local_rate_limit_from_any(inner).map(Some).at("config");
    }
    local_rate_limit_from_any(any).map(Some)
}

/// A `LocalRateLimit` in an `Any`.
pub(crate) fn local_rate_limit_from_any(any: &Any) -> Decoded<LocalRateLimit> {
    let proto: LocalRateLimitProto = unpack(any)?;
    local_rate_limit_from_proto(&proto)
}

/// The proto of a config.
pub(crate) fn local_rate_limit_to_proto(c: &LocalRateLimit) -> LocalRateLimitProto {
    let runtime = |f: Fraction, key: &str| RuntimeFractionalPercent {
        default_value: Some(fraction_to_proto(f)),
        runtime_key: key.to_string(),
    };
    LocalRateLimitProto {
        stat_prefix: STAT_PREFIX.to_string(),
        token_bucket: c.bucket.as_ref().map(bucket_to_proto),
        filter_enabled: Some(runtime(c.enabled, "local_rate_limit_enabled")),
        filter_enforced: Some(runtime(c.enforced, "local_rate_limit_enforced")),
        response_headers_to_add: ops_to_proto(&c.response_headers),
        descriptors: c
            .descriptors
            .iter()
            .map(|d| LocalRateLimitDescriptor {
                entries: d
                    .entries
                    .iter()
                    .map(|(k, v)| Entry {
                        key: k.to_string(),
                        value: v.to_string(),
                    })
                    .collect(),
                token_bucket: Some(bucket_to_proto(&d.bucket)),
                shadow_mode: false,
            })
            .collect(),
        always_consume_default_token_bucket: (!c.consume_default)
            .then_some(BoolValue { value: false }),
        rate_limited_as_resource_exhausted: c.refusal.grpc_resource_exhausted,
        ..Default::default()
    }
}

/// The model of a config; what it cannot honor is refused by name.
pub(crate) fn local_rate_limit_from_proto(p: &LocalRateLimitProto) -> Decoded<LocalRateLimit> {
    if let Some(s) = &p.status
        && s.code != i32::from(Refusal::HTTP_STATUS)
    {
        return Err(FieldError::unsupported(format!(
            "status {}: refused requests get 429 here",
            s.code
        ))
        .at("status"));
    }
    reject_if(
        !p.request_headers_to_add_when_not_enforced.is_empty(),
        "request_headers_to_add_when_not_enforced",
    )?;
    reject_if(p.stage != 0, "stage")?;
    reject_if(
        p.local_rate_limit_per_downstream_connection,
        "local_rate_limit_per_downstream_connection",
    )?;
    reject_if(
        p.local_cluster_rate_limit.is_some(),
        "local_cluster_rate_limit",
    )?;
    reject_if(
        p.enable_x_ratelimit_headers != 0,
        "enable_x_ratelimit_headers",
    )?;
    reject_if(!p.rate_limits.is_empty(), "rate_limits")?;
    reject_if(
        p.max_dynamic_descriptors.is_some(),
        "max_dynamic_descriptors",
    )?;
    reject_if(p.enable_retry_after_header, "enable_retry_after_header")?;
    let runtime = |r: Option<&RuntimeFractionalPercent>, field: &'static str| match r
        .and_then(|r| r.default_value.as_ref())
    {
        // Envoy: "defaults to 0% of requests for safety".
        None => Ok(Fraction::default()),
        Some(f) => fraction_from_proto(f).at("default_value").at(field),
    };
    let bucket = p
        .token_bucket
        .as_ref()
        .map(bucket_from_proto)
        .transpose()
        .at("token_bucket")?;
    let descriptors = p
        .descriptors
        .iter()
        .enumerate()
        .map(|(i, d)| descriptor_from_proto(d).at_index("descriptors", i))
        .collect::<Decoded<Vec<_>>>()?;
    Ok(LocalRateLimit {
        bucket,
        descriptors: descriptors.into(),
        enabled: runtime(p.filter_enabled.as_ref(), "filter_enabled")?,
        enforced: runtime(p.filter_enforced.as_ref(), "filter_enforced")?,
        refusal: Refusal {
            grpc_resource_exhausted: p.rate_limited_as_resource_exhausted,
        },
        response_headers: ops_from_proto(&p.response_headers_to_add)
            .at("response_headers_to_add")?,
        consume_default: p
            .always_consume_default_token_bucket
            .as_ref()
            .is_none_or(|b| b.value),
    })
}

fn descriptor_from_proto(d: &LocalRateLimitDescriptor) -> Decoded<Descriptor> {
    reject_if(d.shadow_mode, "shadow_mode")?;
    if d.entries.is_empty() {
        return Err(missing("entries"));
    }
    let entries = d
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            if e.key.is_empty() {
                return Err(FieldError::invalid("empty")
                    .at("key")
                    .at_index("entries", i));
            }
            Ok((Name::from(e.key.as_str()), Name::from(e.value.as_str())))
        })
        .collect::<Decoded<Vec<_>>>()?;
    let bucket = d
        .token_bucket
        .as_ref()
        .ok_or_else(|| missing("token_bucket"))
        .and_then(|b| bucket_from_proto(b).at("token_bucket"))?;
    Ok(Descriptor {
        entries: entries.into(),
        bucket,
    })
}

fn bucket_to_proto(b: &TokenBucket) -> TokenBucketProto {
    TokenBucketProto {
        max_tokens: b.max_tokens,
        tokens_per_fill: Some(UInt32Value {
            value: b.tokens_per_fill,
        }),
        fill_interval: Some(duration_to_proto(b.fill_interval)),
    }
}

fn bucket_from_proto(b: &TokenBucketProto) -> Decoded<TokenBucket> {
    let interval = b
        .fill_interval
        .as_ref()
        .ok_or_else(|| missing("fill_interval"))?;
    let interval = duration_from_proto(interval).at("fill_interval")?;
    let per_fill = b.tokens_per_fill.as_ref().map_or(1, |t| t.value);
    TokenBucket::new(b.max_tokens, per_fill, interval).map_err(FieldError::from)
}

fn ops_to_proto(ops: &HeaderOps) -> Vec<HeaderValueOption> {
    let option =
        |(name, value): &(http::HeaderName, http::HeaderValue), action| HeaderValueOption {
            header: Some(HeaderValueProto {
                key: name.as_str().to_owned(),
                value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                ..Default::default()
            }),
            append_action: action as i32,
            ..Default::default()
        };
    ops.set
        .iter()
        .map(|p| option(p, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .chain(
            ops.add
                .iter()
                .map(|p| option(p, HeaderAppendAction::AppendIfExistsOrAdd)),
        )
        .collect()
}

#[allow(deprecated)] // `append`: the old form of `append_action`
fn ops_from_proto(add: &[HeaderValueOption]) -> Decoded<HeaderOps> {
    let mut set = Vec::new();
    let mut append = Vec::new();
    for (i, option) in add.iter().enumerate() {
        let at = |e: FieldError| e.at_index("response_headers_to_add", i);
        let header = option
            .header
            .as_ref()
            .ok_or_else(|| at(missing("header")))?;
        let name = header_name(&header.key).map_err(|e| at(FieldError::from(e)))?;
        let value = header_value(&header.key, &header.value).map_err(|e| at(e.into()))?;
        let overwrite = match (option.append.as_ref(), option.append_action) {
            (Some(a), _) => !a.value,
            (None, a) if a == HeaderAppendAction::AppendIfExistsOrAdd as i32 => false,
            (None, a) if a == HeaderAppendAction::OverwriteIfExistsOrAdd as i32 => true,
            (None, _) => {
                return Err(at(FieldError::unsupported(
                    "only APPEND_IF_EXISTS_OR_ADD and OVERWRITE_IF_EXISTS_OR_ADD are supported",
                )
                .at("append_action")));
            }
        };
        if overwrite {
            set.push((name, value));
        } else {
            append.push((name, value));
        }
    }
    Ok(HeaderOps {
        set: set.into(),
        add: append.into(),
        remove: Arc::from([]),
    })
}

/// A route's `rate_limits`.
pub(crate) fn rate_limits_to_proto(rate_limits: &[Arc<[Action]>]) -> Vec<RateLimitProto> {
    rate_limits
        .iter()
        .map(|actions| RateLimitProto {
            actions: actions.iter().map(action_to_proto).collect(),
            ..Default::default()
        })
        .collect()
}

/// A route's `rate_limits`, as the model reads them.
pub(crate) fn rate_limits_from_proto(
    rate_limits: &[RateLimitProto],
) -> Decoded<Arc<[Arc<[Action]>]>> {
    rate_limits
        .iter()
        .enumerate()
        .map(|(i, r)| rate_limit_from_proto(r).at_index("rate_limits", i))
        .collect()
}

fn rate_limit_from_proto(r: &RateLimitProto) -> Decoded<Arc<[Action]>> {
    reject_if(r.stage.as_ref().is_some_and(|s| s.value != 0), "stage")?;
    reject_if(!r.disable_key.is_empty(), "disable_key")?;
    reject_if(r.limit.is_some(), "limit")?;
    reject_if(r.hits_addend.is_some(), "hits_addend")?;
    reject_if(r.apply_on_stream_done, "apply_on_stream_done")?;
    if r.actions.is_empty() {
        return Err(missing("actions"));
    }
    r.actions
        .iter()
        .enumerate()
        .map(|(i, a)| action_from_proto(a).at_index("actions", i))
        .collect()
}

fn action_to_proto(a: &Action) -> ActionProto {
    let specifier = match a {
        Action::HeaderValueMatch {
            key,
            value,
            headers,
            expect_match,
        } => ActionSpecifier::HeaderValueMatch(HeaderValueMatch {
            descriptor_value: value.to_string(),
            descriptor_key: key.to_string(),
            expect_match: (!expect_match).then_some(BoolValue { value: false }),
            headers: headers.iter().map(header_to_proto).collect(),
            ..Default::default()
        }),
        Action::RequestHeaders { header, key } => ActionSpecifier::RequestHeaders(RequestHeaders {
            header_name: header.to_string(),
            descriptor_key: key.to_string(),
            skip_if_absent: false,
        }),
        Action::GenericKey { key, value } => ActionSpecifier::GenericKey(GenericKey {
            descriptor_value: value.to_string(),
            descriptor_key: key.to_string(),
            ..Default::default()
        }),
    };
    ActionProto {
        action_specifier: Some(specifier),
    }
}

fn action_from_proto(a: &ActionProto) -> Decoded<Action> {
    match &a.action_specifier {
        Some(ActionSpecifier::HeaderValueMatch(m)) => {
            reject_if(!m.default_value.is_empty(), "default_value").at("header_value_match")?;
            let headers = m
                .headers
                .iter()
                .enumerate()
                .map(|(i, h)| header_from_proto(h).at_index("headers", i))
                .collect::<Decoded<Vec<_>>>()
                .at("header_value_match")?;
            let key = if m.descriptor_key.is_empty() {
                "header_match"
            } else {
                &m.descriptor_key
            };
            Ok(Action::HeaderValueMatch {
                key: key.into(),
                value: m.descriptor_value.as_str().into(),
                headers: headers.into(),
                expect_match: m.expect_match.as_ref().is_none_or(|b| b.value),
            })
        }
        Some(ActionSpecifier::RequestHeaders(r)) => {
            reject_if(r.skip_if_absent, "skip_if_absent").at("request_headers")?;
            if r.header_name.is_empty() || r.descriptor_key.is_empty() {
                return Err(FieldError::invalid(
                    "header_name and descriptor_key must not be empty",
                )
                .at("request_headers"));
            }
            Ok(Action::RequestHeaders {
                header: r.header_name.to_ascii_lowercase().as_str().into(),
                key: r.descriptor_key.as_str().into(),
            })
        }
        Some(ActionSpecifier::GenericKey(g)) => {
            reject_if(!g.default_value.is_empty(), "default_value").at("generic_key")?;
            let key = if g.descriptor_key.is_empty() {
                "generic_key"
            } else {
                &g.descriptor_key
            };
            Ok(Action::GenericKey {
                key: key.into(),
                value: g.descriptor_value.as_str().into(),
            })
        }
        Some(_) => Err(FieldError::unsupported(
            "only header_value_match, request_headers and generic_key actions are supported",
        )),
        None => Err(FieldError::invalid("no action")),
    }
}

fn header_to_proto(h: &HeaderMatch) -> HeaderMatcher {
    let pattern = match &h.value {
        ValueMatch::Exact(s) => MatchPattern::Exact(s.to_string()),
        ValueMatch::Prefix(s) => MatchPattern::Prefix(s.to_string()),
        ValueMatch::Regex(p) => MatchPattern::SafeRegex(RegexMatcher {
            regex: p.as_str().to_string(),
            engine_type: None,
        }),
        ValueMatch::Present(present) => {
            return HeaderMatcher {
                name: h.name.to_string(),
                invert_match: h.invert,
                header_match_specifier: Some(HeaderMatchSpecifier::PresentMatch(*present)),
                ..Default::default()
            };
        }
    };
    HeaderMatcher {
        name: h.name.to_string(),
        invert_match: h.invert,
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            ignore_case: false,
            match_pattern: Some(pattern),
        })),
        ..Default::default()
    }
}

#[allow(deprecated)] // the old `*_match` fields are still accepted, as Envoy does
fn header_from_proto(h: &HeaderMatcher) -> Decoded<HeaderMatch> {
    if h.name.is_empty() {
        return Err(FieldError::invalid("empty").at("name"));
    }
    reject_if(
        h.treat_missing_header_as_empty,
        "treat_missing_header_as_empty",
    )?;
    let pattern = |p: &str| {
        Pattern::new(p)
            .map(ValueMatch::Regex)
            .map_err(FieldError::from)
    };
    let value = match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::StringMatch(sm)) => {
            reject_if(sm.ignore_case, "ignore_case").at("string_match")?;
            match &sm.match_pattern {
                Some(MatchPattern::Exact(s)) => ValueMatch::Exact(s.as_str().into()),
                Some(MatchPattern::Prefix(s)) => ValueMatch::Prefix(s.as_str().into()),
                Some(MatchPattern::SafeRegex(r)) => pattern(&r.regex).at("string_match")?,
                _ => {
                    return Err(FieldError::unsupported(
                        "only exact, prefix and safe_regex are supported",
                    )
                    .at("string_match"));
                }
            }
        }
        Some(HeaderMatchSpecifier::PresentMatch(p)) => ValueMatch::Present(*p),
        Some(HeaderMatchSpecifier::ExactMatch(s)) => ValueMatch::Exact(s.as_str().into()),
        Some(HeaderMatchSpecifier::PrefixMatch(s)) => ValueMatch::Prefix(s.as_str().into()),
        Some(HeaderMatchSpecifier::SafeRegexMatch(r)) => {
            pattern(&r.regex).at("safe_regex_match")?
        }
        Some(_) => {
            return Err(FieldError::unsupported(
                "only exact, prefix, safe_regex and present matching are supported",
            ));
        }
        None => ValueMatch::Present(true),
    };
    Ok(HeaderMatch {
        name: h.name.to_ascii_lowercase().as_str().into(),
        value,
        invert: h.invert_match,
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use envoy_types::pb::envoy::config::route::v3::Route as RouteProto;

    fn sample() -> LocalRateLimit {
        let bucket = TokenBucket::new(4, 4, Duration::from_secs(60)).unwrap();
        LocalRateLimit {
            bucket: Some(bucket),
            descriptors: Arc::from([Descriptor {
                entries: Arc::from([(Name::from("header_match"), Name::from("Cart"))]),
                bucket: TokenBucket::new(10, 10, Duration::from_secs(60)).unwrap(),
            }]),
            enabled: Fraction::ALL,
            enforced: Fraction::from_per_million(500_000),
            refusal: Refusal {
                grpc_resource_exhausted: true,
            },
            response_headers: HeaderOps {
                set: Arc::from([]),
                add: Arc::from([(
                    http::HeaderName::from_static("x-local-rate-limit"),
                    http::HeaderValue::from_static("true"),
                )]),
                remove: Arc::from([]),
            },
            consume_default: false,
        }
    }

    fn actions() -> Arc<[Arc<[Action]>]> {
        Arc::from([Arc::from([
            Action::HeaderValueMatch {
                key: "header_match".into(),
                value: "Cart".into(),
                headers: Arc::from([HeaderMatch {
                    name: ":path".into(),
                    value: ValueMatch::Prefix("/cart-api".into()),
                    invert: false,
                }]),
                expect_match: true,
            },
            Action::RequestHeaders {
                header: "x-user".into(),
                key: "user".into(),
            },
            Action::GenericKey {
                key: "generic_key".into(),
                value: "all".into(),
            },
        ]) as Arc<[Action]>])
    }

    #[test]
    fn configs_round_trip() {
        let c = sample();
        assert_eq!(
            local_rate_limit_from_proto(&local_rate_limit_to_proto(&c)).unwrap(),
            c
        );
        let inert = LocalRateLimit::inert();
        assert_eq!(
            local_rate_limit_from_proto(&local_rate_limit_to_proto(&inert)).unwrap(),
            inert
        );
    }

    #[test]
    fn the_filter_and_route_configs_are_optional_for_grpc() {
        let f = local_rate_limit_filter(&sample());
        assert!(
            f.is_optional,
            "gRPC NACKs an unknown filter that is not optional"
        );
        assert_eq!(f.name, LOCAL_RATELIMIT_FILTER_NAME);
        let any = per_route_config(&sample());
        assert_eq!(
            any.type_url,
            "type.googleapis.com/envoy.config.route.v3.FilterConfig"
        );
        let wrapper: FilterConfig = unpack(&any).unwrap();
        assert!(wrapper.is_optional);
        let inner = wrapper.config.unwrap();
        assert!(is_local_rate_limit(&inner));
        // Both forms decode.
        assert_eq!(per_route_from_proto(&any).unwrap(), Some(sample()));
        assert_eq!(per_route_from_proto(&inner).unwrap(), Some(sample()));
    }

    #[test]
    fn routes_round_trip() {
        let config = RateLimitConfig {
            filter: LocalRateLimit::inert(),
            route: Some(sample()),
            rate_limits: actions(),
        };
        let mut route = RouteProto::default();
        let mut rate_limits = Vec::new();
        rate_limit_to_route(
            &config,
            &mut route.typed_per_filter_config,
            &mut rate_limits,
        );
        let back = rate_limit_from_route(
            Some((LOCAL_RATELIMIT_FILTER_NAME, &config.filter)),
            &route.typed_per_filter_config,
            &rate_limits,
        )
        .unwrap();
        assert_eq!(back, Some(config));
        // A route config without the filter on the listener is refused.
        let err = rate_limit_from_route(None, &route.typed_per_filter_config, &[]).unwrap_err();
        assert!(format!("{err:?}").contains("no such filter"), "{err:?}");
        assert_eq!(
            rate_limit_from_route(None, &HashMap::new(), &[]).unwrap(),
            None
        );
    }

    /// A client route limited on the client side (an outbound EnvoyFilter):
    /// the config in the route's `typed_per_filter_config`, wrapped for
    /// gRPC, the actions in `RouteAction.rate_limits`, through a whole
    /// RouteConfiguration and back.
    #[test]
    fn client_routes_round_trip_through_rds() {
        use crate::model::{Route, RouteConfig, RouteMatch, RoutePolicy, VirtualHost};
        use crate::xds::{route_config_from_proto, route_config_to_proto};
        use envoy_types::pb::envoy::config::route::v3::route::Action as RouteActionKind;
        let limited = RateLimitConfig {
            filter: LocalRateLimit::inert(),
            route: Some(sample()),
            rate_limits: actions(),
        };
        let route = |name: &str, rate_limit: Option<RateLimitConfig>| Route {
            name: name.into(),
            matcher: RouteMatch::any(),
            action: crate::model::WeightedClusters::single("outbound|80||catalog"),
            policy: RoutePolicy {
                rate_limit: rate_limit.map(Arc::new),
                ..RoutePolicy::default()
            },
        };
        let rc = RouteConfig {
            name: "catalog:80".into(),
            virtual_hosts: Arc::from([VirtualHost {
                name: "catalog:80".into(),
                domains: Arc::from([Name::from("catalog")]),
                routes: Arc::from([route("limited", Some(limited)), route("free", None)]),
            }]),
        };
        let proto = route_config_to_proto(&rc);
        let limited_proto = &proto.virtual_hosts[0].routes[0];
        let wrapped = &limited_proto.typed_per_filter_config[LOCAL_RATELIMIT_FILTER_NAME];
        let wrapper: FilterConfig = unpack(wrapped).unwrap();
        assert!(wrapper.is_optional, "gRPC must not NACK the route config");
        let Some(RouteActionKind::Route(action)) = &limited_proto.action else {
            panic!("a route action")
        };
        assert_eq!(action.rate_limits.len(), 1);
        assert!(
            proto.virtual_hosts[0].routes[1]
                .typed_per_filter_config
                .is_empty()
        );
        assert_eq!(route_config_from_proto(&proto).unwrap(), rc);
        // Envoy's bare per-route form decodes too.
        let mut bare = proto.clone();
        bare.virtual_hosts[0].routes[0]
            .typed_per_filter_config
            .insert(
                LOCAL_RATELIMIT_FILTER_NAME.to_string(),
                pack(&local_rate_limit_to_proto(&sample())),
            );
        assert_eq!(route_config_from_proto(&bare).unwrap(), rc);
        // A bad per-route config is an error naming the field.
        let mut bad = proto.clone();
        let mut p = local_rate_limit_to_proto(&sample());
        p.local_rate_limit_per_downstream_connection = true;
        bad.virtual_hosts[0].routes[0]
            .typed_per_filter_config
            .insert(LOCAL_RATELIMIT_FILTER_NAME.to_string(), pack(&p));
        let err = route_config_from_proto(&bad).unwrap_err().to_string();
        assert!(err.contains("typed_per_filter_config"), "{err}");
    }

    #[test]
    fn what_cannot_be_honored_is_refused() {
        let mut p = local_rate_limit_to_proto(&sample());
        p.local_rate_limit_per_downstream_connection = true;
        assert!(local_rate_limit_from_proto(&p).is_err());
        let mut p = local_rate_limit_to_proto(&sample());
        p.descriptors[0].shadow_mode = true;
        assert!(local_rate_limit_from_proto(&p).is_err());
        let mut p = local_rate_limit_to_proto(&sample());
        p.token_bucket.as_mut().unwrap().fill_interval =
            Some(duration_to_proto(Duration::from_millis(10)));
        assert!(
            local_rate_limit_from_proto(&p).is_err(),
            "below Envoy's 50ms"
        );
        let mut p = local_rate_limit_to_proto(&sample());
        p.token_bucket.as_mut().unwrap().max_tokens = 0;
        assert!(local_rate_limit_from_proto(&p).is_err());
        let mut p = local_rate_limit_to_proto(&sample());
        p.status = Some(envoy_types::pb::envoy::r#type::v3::HttpStatus { code: 503 });
        assert!(local_rate_limit_from_proto(&p).is_err());
        let bad = RateLimitProto {
            actions: vec![ActionProto {
                action_specifier: Some(ActionSpecifier::RemoteAddress(Default::default())),
            }],
            ..Default::default()
        };
        assert!(rate_limits_from_proto(&[bad]).is_err());
        assert!(rate_limits_from_proto(&[RateLimitProto::default()]).is_err());
    }

    /// What a gRPC server (gRFC A36) is served: the filter optional, the
    /// per-route config wrapped optional; and the listener decodes back.
    #[test]
    fn a_server_listener_carries_the_limit_for_grpc_and_for_us() {
        use crate::model::{MtlsMode, ServerListener};
        use envoy_types::pb::envoy::config::listener::v3::{Listener, filter};
        use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
            HttpConnectionManager, http_connection_manager::RouteSpecifier,
        };
        let listener = ServerListener {
            name: "grpc/server?xds.resource.listening_address=10.0.0.7:8080".into(),
            address: "10.0.0.7:8080".parse().unwrap(),
            mtls: MtlsMode::Permissive,
            policies: Arc::from([]),
            rate_limit: Some(Arc::new(RateLimitConfig {
                filter: LocalRateLimit::inert(),
                route: Some(sample()),
                rate_limits: actions(),
            })),
            cors: Default::default(),
        };
        let any = super::super::encode_server_listener(&listener);
        let proto: Listener = unpack(&any).unwrap();
        for chain in &proto.filter_chains {
            let Some(filter::ConfigType::TypedConfig(hcm)) = &chain.filters[0].config_type else {
                panic!("typed HCM")
            };
            let hcm: HttpConnectionManager = unpack(hcm).unwrap();
            let first = &hcm.http_filters[0];
            assert_eq!(first.name, LOCAL_RATELIMIT_FILTER_NAME);
            assert!(first.is_optional, "else gRPC NACKs the Listener");
            let Some(RouteSpecifier::RouteConfig(rc)) = &hcm.route_specifier else {
                panic!("inline routes")
            };
            let vh = &rc.virtual_hosts[0];
            assert_eq!(vh.rate_limits.len(), 1);
            let per_route = &vh.routes[0].typed_per_filter_config[LOCAL_RATELIMIT_FILTER_NAME];
            let wrapper: FilterConfig = unpack(per_route).unwrap();
            assert!(wrapper.is_optional, "else gRPC NACKs the Listener");
        }
        let back = super::super::decode_server_listener(&any).unwrap();
        assert_eq!(back, listener);
        // Without a limit: no filter, as before.
        let plain = ServerListener {
            rate_limit: None,
            ..listener
        };
        let back =
            super::super::decode_server_listener(&super::super::encode_server_listener(&plain))
                .unwrap();
        assert_eq!(back, plain);
    }
}

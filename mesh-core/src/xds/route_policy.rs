//! RDS, the part of a route besides its match and destinations: timeout
//! (gRFC A31), retries (A44), fault injection (A33) and consistent-hash keys
//! (A42), in the shape Istio sends and Envoy and gRPC read.
//!
//! - Timeout: `RouteAction.timeout` for Envoy and
//!   `max_stream_duration.max_stream_duration` for gRPC (which ignores
//!   `timeout`). No timeout is `timeout: 0s` (Envoy: disabled) and no
//!   `max_stream_duration`.
//! - Retries: `RouteAction.retry_policy` as Istio writes it: `retry_on` is a
//!   comma list of condition names, `retry_host_predicate` is
//!   `previous_hosts` with `host_selection_retry_max_attempts: 5`, and
//!   `retryRemoteLocalities` is the `previous_priorities` retry priority. A
//!   policy of zero retries is not written at all (Istio's `attempts: 0`),
//!   because gRPC NACKs `num_retries: 0`.
//! - Fault: `typed_per_filter_config["envoy.filters.http.fault"]` =
//!   `HTTPFault { delay, abort }` with `MILLION` denominators; the listener
//!   always has the fault filter (see the listener module).
//! - Hash policies: `RouteAction.hash_policy`, every policy but the last
//!   `terminal`, so that the first one that yields a key decides (the
//!   model's rule; without `terminal` Envoy would combine the hashes).
//! - Client-side local rate limit: the route's whole config (the one its
//!   requests are limited by) in
//!   `typed_per_filter_config["envoy.filters.http.local_ratelimit"]`,
//!   wrapped in `FilterConfig { is_optional: true }` (gRFC A39: gRPC
//!   ignores it instead of NACKing the RouteConfiguration), and its
//!   descriptors' actions in `RouteAction.rate_limits`; the listener always
//!   has the filter with a config that limits nothing (see the listener
//!   module), which a route's config replaces as in Envoy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::RoutingPriority;
use envoy_types::pb::envoy::config::route::v3::{
    FilterConfig, HedgePolicy, RetryPolicy as RetryProto, Route as RouteProto, RouteAction,
    VirtualHost as VirtualHostProto,
    retry_policy::{
        RetryBackOff, RetryHostPredicate, RetryPriority, retry_host_predicate, retry_priority,
    },
    route_action::{
        HashPolicy as HashProto, MaxStreamDuration,
        hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier, QueryParameter},
    },
};
use envoy_types::pb::envoy::extensions::filters::common::fault::v3::{
    FaultDelay as FaultDelayProto, fault_delay::FaultDelaySecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::fault::v3::{
    FaultAbort as FaultAbortProto, HttpFault, fault_abort::ErrorType,
};
use envoy_types::pb::envoy::extensions::retry::host::previous_hosts::v3::PreviousHostsPredicate;
use envoy_types::pb::envoy::extensions::retry::priority::previous_priorities::v3::PreviousPrioritiesConfig;
use envoy_types::pb::google::protobuf::{Duration as DurationProto, UInt32Value};
use prost::Name as _;

use super::ratelimit::LOCAL_RATELIMIT_FILTER_NAME;

use super::{
    Any, At, Decoded, FieldError, duration_to_proto, fraction_from_proto, fraction_to_proto,
    missing, opt_duration, pack, positive_duration, reject_if, required_name, type_name, unpack,
};
use crate::model::{
    AbortStatus, FaultAbort, FaultDelay, FaultPolicy, Fraction, HashPolicy, Name, RetryOn,
    RetryPolicy, RoutePolicy,
};

/// The fault filter's name, which is also the key of a route's fault in
/// `typed_per_filter_config` (per-route configs are keyed by filter name).
pub(crate) const FAULT_FILTER_NAME: &str = "envoy.filters.http.fault";

/// Istio's retry host predicate: prefer hosts not tried yet.
const PREVIOUS_HOSTS_NAME: &str = "envoy.retry_host_predicates.previous_hosts";
/// Istio's retry priority for `retryRemoteLocalities`.
const PREVIOUS_PRIORITIES_NAME: &str = "envoy.retry_priorities.previous_priorities";
/// Istio's `host_selection_retry_max_attempts`.
const HOST_SELECTION_ATTEMPTS: i64 = 5;
/// Istio's `update_frequency` of the previous-priorities retry priority.
const PREVIOUS_PRIORITIES_UPDATE_FREQUENCY: i32 = 2;
/// Envoy's default backoff base (the max defaults to 10 × base).
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
/// The largest gRPC status code (UNAUTHENTICATED); gRPC NACKs larger ones.
const MAX_GRPC_STATUS: u32 = 16;

// ---------------------------------------------------------------------------
// Encoding

/// Sets the policy's fields on the route action (timeout, retries, hash).
pub(crate) fn policy_to_action(policy: &RoutePolicy, action: &mut RouteAction) {
    action.timeout = Some(duration_to_proto(policy.timeout.unwrap_or(Duration::ZERO)));
    action.max_stream_duration = policy.timeout.map(|t| MaxStreamDuration {
        max_stream_duration: Some(duration_to_proto(t)),
        ..Default::default()
    });
    action.retry_policy = policy
        .retry
        .as_ref()
        .filter(|r| r.num_retries > 0)
        .map(retry_to_proto);
    let last = policy.hash_policy.len().saturating_sub(1);
    action.hash_policy = policy
        .hash_policy
        .iter()
        .enumerate()
        .map(|(i, h)| hash_to_proto(h, i < last))
        .collect();
    if let Some(r) = &policy.rate_limit {
        action.rate_limits = super::ratelimit::rate_limits_to_proto(&r.rate_limits);
    }
}

/// The route's `typed_per_filter_config`: the fault and the local rate
/// limit (the config its requests are limited by), if any.
pub(crate) fn per_filter_config(policy: &RoutePolicy) -> HashMap<String, Any> {
    let fault = policy
        .fault
        .as_ref()
        .map(|f| (FAULT_FILTER_NAME.to_string(), pack(&fault_to_proto(f))));
    let rate_limit = policy.rate_limit.as_ref().map(|r| {
        (
            LOCAL_RATELIMIT_FILTER_NAME.to_string(),
            super::ratelimit::per_route_config(r.effective()),
        )
    });
    fault.into_iter().chain(rate_limit).collect()
}

fn retry_to_proto(r: &RetryPolicy) -> RetryProto {
    RetryProto {
        retry_on: r.retry_on.names().collect::<Vec<_>>().join(","),
        num_retries: Some(UInt32Value {
            value: r.num_retries,
        }),
        per_try_timeout: r.per_try_timeout.map(duration_to_proto),
        retriable_status_codes: r
            .retriable_status_codes
            .iter()
            .map(|c| u32::from(*c))
            .collect(),
        retry_back_off: Some(RetryBackOff {
            base_interval: Some(duration_to_proto(r.backoff_base)),
            max_interval: Some(duration_to_proto(r.backoff_max)),
        }),
        retry_host_predicate: vec![RetryHostPredicate {
            name: PREVIOUS_HOSTS_NAME.to_string(),
            config_type: Some(retry_host_predicate::ConfigType::TypedConfig(pack(
                &PreviousHostsPredicate::default(),
            ))),
        }],
        host_selection_retry_max_attempts: HOST_SELECTION_ATTEMPTS,
        retry_priority: r.retry_remote_localities.then(|| RetryPriority {
            name: PREVIOUS_PRIORITIES_NAME.to_string(),
            config_type: Some(retry_priority::ConfigType::TypedConfig(pack(
                &PreviousPrioritiesConfig {
                    update_frequency: PREVIOUS_PRIORITIES_UPDATE_FREQUENCY,
                },
            ))),
        }),
        ..Default::default()
    }
}

fn hash_to_proto(h: &HashPolicy, terminal: bool) -> HashProto {
    let specifier = match h {
        HashPolicy::Header(name) => PolicySpecifier::Header(Header {
            header_name: name.to_string(),
            regex_rewrite: None,
        }),
        HashPolicy::Cookie { name, ttl, path } => PolicySpecifier::Cookie(Cookie {
            name: name.to_string(),
            ttl: ttl.map(duration_to_proto),
            path: path.as_deref().unwrap_or_default().to_string(),
            attributes: Vec::new(),
        }),
        HashPolicy::SourceIp => {
            PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
        }
        HashPolicy::QueryParameter(name) => PolicySpecifier::QueryParameter(QueryParameter {
            name: name.to_string(),
        }),
    };
    HashProto {
        terminal,
        policy_specifier: Some(specifier),
    }
}

fn fault_to_proto(f: &FaultPolicy) -> HttpFault {
    HttpFault {
        delay: f.delay.as_ref().map(|d| FaultDelayProto {
            percentage: Some(fraction_to_proto(d.fraction)),
            fault_delay_secifier: Some(FaultDelaySecifier::FixedDelay(duration_to_proto(d.delay))),
        }),
        abort: f.abort.as_ref().map(|a| FaultAbortProto {
            percentage: Some(fraction_to_proto(a.fraction)),
            error_type: Some(match a.status {
                AbortStatus::Http(code) => ErrorType::HttpStatus(u32::from(code)),
                AbortStatus::Grpc(code) => ErrorType::GrpcStatus(code),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------
// Decoding

/// The virtual host's retry policy, which applies to its routes that have
/// none (Envoy and gRPC A44), and a check of the other virtual-host fields
/// of this module's concern.
pub(crate) fn virtual_host_retry(vh: &VirtualHostProto) -> Decoded<Option<RetryPolicy>> {
    reject_if(
        vh.retry_policy_typed_config.is_some(),
        "retry_policy_typed_config",
    )?;
    check_hedge(vh.hedge_policy.as_ref()).at("hedge_policy")?;
    Ok(vh
        .retry_policy
        .as_ref()
        .map(retry_from_proto)
        .transpose()
        .at("retry_policy")?
        .filter(|r| r.num_retries > 0))
}

/// The policy of a route whose action is `action`; `vh_retry` is the
/// virtual host's retry policy. Errors are relative to the route.
pub(crate) fn policy_from_proto(
    route: &RouteProto,
    action: &RouteAction,
    vh_retry: Option<&RetryPolicy>,
) -> Decoded<RoutePolicy> {
    let fault = fault_from_per_filter_config(&route.typed_per_filter_config)?;
    let (timeout, retry, hash_policy) = action_policy(action, vh_retry).at("route")?;
    let rate_limit = rate_limit_from_proto(route, action)?;
    Ok(RoutePolicy {
        timeout,
        retry,
        fault,
        hash_policy,
        traffic: None,
        rate_limit,
    })
}

/// The route's client-side local rate limit: its per-route config of the
/// `local_ratelimit` filter (wrapped or bare) replaces the listener's
/// filter, whose client config limits nothing; `rate_limits` alone (no
/// per-route config) limit nothing here, as the listener's filter has no
/// descriptors.
fn rate_limit_from_proto(
    route: &RouteProto,
    action: &RouteAction,
) -> Decoded<Option<Arc<crate::ratelimit::RateLimitConfig>>> {
    if !route
        .typed_per_filter_config
        .contains_key(LOCAL_RATELIMIT_FILTER_NAME)
    {
        return Ok(None);
    }
    let inert = crate::ratelimit::LocalRateLimit::inert();
    let rate_limits = super::ratelimit::rate_limits_from_proto(&action.rate_limits).at("route")?;
    let config = super::ratelimit::rate_limit_from_route(
        Some((LOCAL_RATELIMIT_FILTER_NAME, &inert)),
        &route.typed_per_filter_config,
        &[],
    )?;
    Ok(config.map(|c| Arc::new(crate::ratelimit::RateLimitConfig { rate_limits, ..c })))
}

type ActionPolicy = (Option<Duration>, Option<RetryPolicy>, Arc<[HashPolicy]>);

#[allow(deprecated)] // max_grpc_timeout, grpc_timeout_offset: still sent by Istio to Envoy
fn action_policy(a: &RouteAction, vh_retry: Option<&RetryPolicy>) -> Decoded<ActionPolicy> {
    reject_if(
        a.retry_policy_typed_config.is_some(),
        "retry_policy_typed_config",
    )?;
    check_hedge(a.hedge_policy.as_ref()).at("hedge_policy")?;
    if a.priority == RoutingPriority::High as i32 {
        return Err(FieldError::unsupported(
            "HIGH routing priority (separate circuit breaker thresholds) is not supported",
        )
        .at("priority"));
    }
    if opt_duration(a.idle_timeout.as_ref(), "idle_timeout")?.is_some_and(|d| !d.is_zero()) {
        return Err(
            FieldError::unsupported("stream idle timeouts are not supported").at("idle_timeout"),
        );
    }
    let timeout = timeout_from_proto(a)?;
    // Zero retries is no retry policy, as the encoder writes it (a route's
    // still overrides its virtual host's); keeping `num_retries: 0` apart
    // would make a decoded route differ from its own re-encoding.
    let retry = match &a.retry_policy {
        Some(r) => Some(retry_from_proto(r).at("retry_policy")?).filter(|r| r.num_retries > 0),
        None => vh_retry.cloned(),
    };
    let last = a.hash_policy.len().saturating_sub(1);
    let hash_policy = a
        .hash_policy
        .iter()
        .enumerate()
        .map(|(i, h)| hash_from_proto(h, i == last).at_index("hash_policy", i))
        .collect::<Decoded<Arc<[_]>>>()?;
    Ok((timeout, retry, hash_policy))
}

/// A hedge policy that would hedge is rejected; an empty one is fine.
fn check_hedge(h: Option<&HedgePolicy>) -> Decoded<()> {
    let Some(h) = h else { return Ok(()) };
    let hedges = h.initial_requests.is_some_and(|n| n.value > 1)
        || h.additional_request_chance.is_some_and(|c| c.numerator > 0)
        || h.hedge_on_per_try_timeout;
    if hedges {
        Err(FieldError::unsupported("request hedging is not supported"))
    } else {
        Ok(())
    }
}

/// The smaller of the positive `timeout` and
/// `max_stream_duration.max_stream_duration` (Envoy applies both; gRPC reads
/// only the latter); zero or absent means no limit. The gRPC-header knobs
/// are accepted only where they agree with that: a cap equal to the route
/// timeout (what Istio sends) is what this mesh does to a caller's deadline.
#[allow(deprecated)] // max_grpc_timeout, grpc_timeout_offset
fn timeout_from_proto(a: &RouteAction) -> Decoded<Option<Duration>> {
    let positive = |d: Option<Duration>| d.filter(|d| !d.is_zero());
    let timeout = positive(opt_duration(a.timeout.as_ref(), "timeout")?);
    let mut stream = None;
    let mut header_max = None;
    if let Some(m) = &a.max_stream_duration {
        let at = |e: FieldError| e.at("max_stream_duration");
        stream = positive(
            opt_duration(m.max_stream_duration.as_ref(), "max_stream_duration").map_err(at)?,
        );
        header_max = opt_duration(
            m.grpc_timeout_header_max.as_ref(),
            "grpc_timeout_header_max",
        )
        .map_err(at)?;
        if opt_duration(
            m.grpc_timeout_header_offset.as_ref(),
            "grpc_timeout_header_offset",
        )
        .map_err(at)?
        .is_some_and(|d| !d.is_zero())
        {
            return Err(at(FieldError::unsupported(
                "offsetting the caller's grpc-timeout is not supported",
            )
            .at("grpc_timeout_header_offset")));
        }
    }
    let effective = match (timeout, stream) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let agrees = |cap: Option<Duration>| cap.is_none_or(|c| c == effective.unwrap_or_default());
    if !agrees(header_max) {
        return Err(FieldError::unsupported(
            "a grpc-timeout cap different from the route timeout is not supported",
        )
        .at("max_stream_duration.grpc_timeout_header_max"));
    }
    if !agrees(opt_duration(
        a.max_grpc_timeout.as_ref(),
        "max_grpc_timeout",
    )?) {
        return Err(FieldError::unsupported(
            "a grpc-timeout cap different from the route timeout is not supported",
        )
        .at("max_grpc_timeout"));
    }
    if opt_duration(a.grpc_timeout_offset.as_ref(), "grpc_timeout_offset")?
        .is_some_and(|d| !d.is_zero())
    {
        return Err(FieldError::unsupported(
            "offsetting the caller's grpc-timeout is not supported",
        )
        .at("grpc_timeout_offset"));
    }
    Ok(effective)
}

/// A retry policy; unknown `retry_on` names and Envoy features beyond the
/// model are unsupported.
fn retry_from_proto(p: &RetryProto) -> Decoded<RetryPolicy> {
    let mut retry_on = RetryOn::empty();
    for name in p
        .retry_on
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        retry_on |= RetryOn::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = RetryOn::NAMES.iter().map(|(n, _)| *n).collect();
            FieldError::unsupported(format!(
                "unknown retry condition {name:?} (this mesh knows {})",
                known.join(", ")
            ))
            .at("retry_on")
        })?;
    }
    let per_try_timeout =
        opt_duration(p.per_try_timeout.as_ref(), "per_try_timeout")?.filter(|d| !d.is_zero());
    if opt_duration(p.per_try_idle_timeout.as_ref(), "per_try_idle_timeout")?
        .is_some_and(|d| !d.is_zero())
    {
        return Err(
            FieldError::unsupported("per-try idle timeouts are not supported")
                .at("per_try_idle_timeout"),
        );
    }
    reject_if(
        !p.retry_options_predicates.is_empty(),
        "retry_options_predicates",
    )?;
    reject_if(
        p.rate_limited_retry_back_off.is_some(),
        "rate_limited_retry_back_off",
    )?;
    reject_if(!p.retriable_headers.is_empty(), "retriable_headers")?;
    reject_if(
        !p.retriable_request_headers.is_empty(),
        "retriable_request_headers",
    )?;
    reject_if(p.refresh_cluster_on_retry, "refresh_cluster_on_retry")?;
    for (i, h) in p.retry_host_predicate.iter().enumerate() {
        let url = match &h.config_type {
            Some(retry_host_predicate::ConfigType::TypedConfig(any)) => type_name(&any.type_url),
            None => "",
        };
        if h.name != PREVIOUS_HOSTS_NAME && url != PreviousHostsPredicate::full_name() {
            return Err(FieldError::unsupported(format!(
                "retry host predicate {:?} is not supported (only {PREVIOUS_HOSTS_NAME})",
                h.name
            ))
            .at_index("retry_host_predicate", i));
        }
    }
    let retry_remote_localities = match &p.retry_priority {
        None => false,
        Some(rp) => {
            let url = match &rp.config_type {
                Some(retry_priority::ConfigType::TypedConfig(any)) => type_name(&any.type_url),
                None => "",
            };
            if rp.name != PREVIOUS_PRIORITIES_NAME && url != PreviousPrioritiesConfig::full_name() {
                return Err(FieldError::unsupported(format!(
                    "retry priority {:?} is not supported (only {PREVIOUS_PRIORITIES_NAME})",
                    rp.name
                ))
                .at("retry_priority"));
            }
            true
        }
    };
    let retriable_status_codes = p
        .retriable_status_codes
        .iter()
        .enumerate()
        .map(|(i, &code)| {
            u16::try_from(code)
                .ok()
                .filter(|c| (100..=599).contains(c))
                .ok_or_else(|| {
                    FieldError::invalid(format!("{code} is not an HTTP status"))
                        .at_index("retriable_status_codes", i)
                })
        })
        .collect::<Decoded<Arc<[u16]>>>()?;
    let (backoff_base, backoff_max) = backoff_from_proto(p.retry_back_off.as_ref())?;
    Ok(RetryPolicy {
        // Unset is 1, as in Envoy and gRPC.
        num_retries: p.num_retries.map_or(1, |n| n.value),
        per_try_timeout,
        retry_on,
        retriable_status_codes,
        backoff_base,
        backoff_max,
        retry_remote_localities,
    })
}

/// Envoy's (and A44's) rules: absent = 25 ms / 250 ms; `base_interval` is
/// required and positive; `max_interval` defaults to 10 × base and may not
/// be below it.
fn backoff_from_proto(b: Option<&RetryBackOff>) -> Decoded<(Duration, Duration)> {
    let Some(b) = b else {
        return Ok((DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_BASE * 10));
    };
    let at = |e: FieldError| e.at("retry_back_off");
    let base_proto: &DurationProto = b
        .base_interval
        .as_ref()
        .ok_or_else(|| at(missing("base_interval")))?;
    let base = positive_duration(Some(base_proto), Duration::ZERO, "base_interval").map_err(at)?;
    let max = match opt_duration(b.max_interval.as_ref(), "max_interval").map_err(at)? {
        Some(max) if max < base => {
            return Err(at(FieldError::invalid(format!(
                "{max:?} is less than base_interval ({base:?})"
            ))
            .at("max_interval")));
        }
        Some(max) => max,
        None => base.saturating_mul(10),
    };
    Ok((base, max))
}

/// One hash policy; `last` says whether `terminal` matters (it does not on
/// the last policy: nothing follows it).
fn hash_from_proto(h: &HashProto, last: bool) -> Decoded<HashPolicy> {
    if !h.terminal && !last {
        return Err(FieldError::unsupported(
            "a non-terminal hash policy followed by others is not supported: Envoy would \
             combine their hashes, this mesh uses the first key found (set terminal)",
        )
        .at("terminal"));
    }
    match &h.policy_specifier {
        Some(PolicySpecifier::Header(header)) => {
            reject_if(header.regex_rewrite.is_some(), "header.regex_rewrite")?;
            let name = required_name(&header.header_name.to_ascii_lowercase(), "header_name")
                .at("header")?;
            Ok(HashPolicy::Header(name))
        }
        Some(PolicySpecifier::Cookie(c)) => {
            let at = |e: FieldError| e.at("cookie");
            reject_if(!c.attributes.is_empty(), "attributes").map_err(at)?;
            Ok(HashPolicy::Cookie {
                name: required_name(&c.name, "name").map_err(at)?,
                ttl: opt_duration(c.ttl.as_ref(), "ttl").map_err(at)?,
                path: (!c.path.is_empty()).then(|| Name::from(c.path.as_str())),
            })
        }
        Some(PolicySpecifier::ConnectionProperties(p)) => {
            if p.source_ip {
                Ok(HashPolicy::SourceIp)
            } else {
                Err(
                    FieldError::unsupported("false hashes nothing: set it or drop the policy")
                        .at("connection_properties.source_ip"),
                )
            }
        }
        Some(PolicySpecifier::QueryParameter(q)) => Ok(HashPolicy::QueryParameter(
            required_name(&q.name, "name").at("query_parameter")?,
        )),
        Some(PolicySpecifier::FilterState(_)) => Err(FieldError::unsupported(
            "hashing on filter state is not supported",
        )
        .at("filter_state")),
        None => Err(FieldError::invalid(
            "no policy: set header, cookie, connection_properties or query_parameter",
        )),
    }
}

/// The route's fault from its `typed_per_filter_config`: an `HTTPFault`
/// (directly or in a `FilterConfig`) under any key; other filters' configs
/// are unsupported (they would change what the route does). Keys are
/// visited in order, so errors are stable.
fn fault_from_per_filter_config(map: &HashMap<String, Any>) -> Decoded<Option<FaultPolicy>> {
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort_unstable();
    let mut fault = None;
    for key in keys {
        if key == LOCAL_RATELIMIT_FILTER_NAME {
            continue; // `rate_limit_from_proto`'s
        }
        let Some(any) = map.get(key) else { continue };
        let at = |e: FieldError| e.at(format!("typed_per_filter_config[{key:?}]"));
        let found = per_filter_fault(any).map_err(at)?;
        if found.is_some() && fault.is_some() {
            return Err(at(FieldError::unsupported(
                "more than one fault filter config on a route",
            )));
        }
        fault = fault.or(found);
    }
    Ok(fault)
}

/// `Some` fault, `None` for a disabled filter or an optional unknown one.
fn per_filter_fault(any: &Any) -> Decoded<Option<FaultPolicy>> {
    let name = type_name(&any.type_url);
    if name == HttpFault::full_name() {
        let fault: HttpFault = unpack(any)?;
        return fault_from_proto(&fault).map(Some);
    }
    if name == FilterConfig::full_name() {
        let config: FilterConfig = unpack(any)?;
        if config.disabled {
            return Ok(None);
        }
        return match &config.config {
            Some(inner) if type_name(&inner.type_url) == HttpFault::full_name() => {
                let fault: HttpFault = unpack(inner).at("config")?;
                fault_from_proto(&fault).at("config").map(Some)
            }
            Some(_) if config.is_optional => Ok(None),
            Some(inner) => Err(FieldError::unsupported(format!(
                "per-route config of type {:?} is not supported (only the fault filter's)",
                inner.type_url
            ))
            .at("config")),
            None => Err(missing("config")),
        };
    }
    Err(FieldError::unsupported(format!(
        "per-route config of type {:?} is not supported (only the fault filter's)",
        any.type_url
    )))
}

/// An `HTTPFault`; features beyond a fixed delay and an abort status, for
/// a fraction of requests, are unsupported. The runtime key names and
/// `filter_metadata` change nothing without an Envoy runtime, and are
/// ignored.
pub(crate) fn fault_from_proto(f: &HttpFault) -> Decoded<FaultPolicy> {
    reject_if(!f.upstream_cluster.is_empty(), "upstream_cluster")?;
    reject_if(!f.headers.is_empty(), "headers")?;
    reject_if(!f.downstream_nodes.is_empty(), "downstream_nodes")?;
    reject_if(f.max_active_faults.is_some(), "max_active_faults")?;
    reject_if(f.response_rate_limit.is_some(), "response_rate_limit")?;
    let delay = f
        .delay
        .as_ref()
        .map(delay_from_proto)
        .transpose()
        .at("delay")?;
    let abort = f
        .abort
        .as_ref()
        .map(abort_from_proto)
        .transpose()
        .at("abort")?;
    Ok(FaultPolicy { delay, abort })
}

/// An unset percentage is 0% (the proto default), as in Envoy.
fn percentage(
    p: Option<&envoy_types::pb::envoy::r#type::v3::FractionalPercent>,
) -> Decoded<Fraction> {
    p.map_or(Ok(Fraction::default()), fraction_from_proto)
        .at("percentage")
}

fn delay_from_proto(d: &FaultDelayProto) -> Decoded<FaultDelay> {
    let delay = match &d.fault_delay_secifier {
        Some(FaultDelaySecifier::FixedDelay(fixed)) => {
            super::duration_from_proto(fixed).at("fixed_delay")?
        }
        Some(FaultDelaySecifier::HeaderDelay(_)) => {
            return Err(FieldError::unsupported(
                "delays chosen by a request header are not supported",
            )
            .at("header_delay"));
        }
        None => return Err(missing("fixed_delay")),
    };
    Ok(FaultDelay {
        fraction: percentage(d.percentage.as_ref())?,
        delay,
    })
}

fn abort_from_proto(a: &FaultAbortProto) -> Decoded<FaultAbort> {
    reject_if(!a.response_body.is_empty(), "response_body")?;
    let status = match a.error_type {
        Some(ErrorType::HttpStatus(code)) => AbortStatus::Http(
            u16::try_from(code)
                .ok()
                .filter(|c| (200..=599).contains(c))
                .ok_or_else(|| {
                    FieldError::invalid(format!("{code} is not in [200, 600)")).at("http_status")
                })?,
        ),
        Some(ErrorType::GrpcStatus(code)) if code <= MAX_GRPC_STATUS => AbortStatus::Grpc(code),
        Some(ErrorType::GrpcStatus(code)) => {
            return Err(
                FieldError::invalid(format!("{code} is not a gRPC status code")).at("grpc_status"),
            );
        }
        Some(ErrorType::HeaderAbort(_)) => {
            return Err(FieldError::unsupported(
                "aborts chosen by a request header are not supported",
            )
            .at("header_abort"));
        }
        None => return Err(missing("http_status")),
    };
    Ok(FaultAbort {
        fraction: percentage(a.percentage.as_ref())?,
        status,
    })
}

//! CDS, the part of a cluster besides discovery, balancing and protocol:
//! circuit breakers (gRFC A32), outlier detection (A50) and connection
//! settings, in the shape Istio sends.
//!
//! - Circuit breakers: one `thresholds` entry of priority DEFAULT with all
//!   four limits set (Istio writes `u32::MAX` for "unlimited"), and the
//!   retry budget when there is one. Absent limits decode to Envoy's
//!   defaults (1024 connections, pending and active requests, 3 retries),
//!   which is also what gRPC assumes for `max_requests`.
//! - Outlier detection: consecutive 5xx and gateway failures enforced at
//!   100% (0% when off), `enforcing_success_rate: 0` (A50 runs success-rate
//!   ejection whenever that is set); the minimum healthy share is
//!   `common_lb_config.healthy_panic_threshold`, as Istio maps
//!   `minHealthPercent`.
//! - Connections: `connect_timeout`, and the idle timeout and requests per
//!   connection in the upstream `HttpProtocolOptions`'
//!   `common_http_protocol_options`.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers as BreakersProto, OutlierDetection as OutlierProto,
    circuit_breakers::{Thresholds, thresholds::RetryBudget as BudgetProto},
    cluster::CommonLbConfig,
};
use envoy_types::pb::envoy::config::core::v3::{
    HttpProtocolOptions as CommonHttpOptions, RoutingPriority,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::UInt32Value;

use super::{
    At, Decoded, FieldError, duration_to_proto, opt_duration, positive_duration, reject_if,
    whole_percent,
};
use crate::model::{CircuitBreakers, ConnectionSettings, Fraction, OutlierDetection, RetryBudget};

/// Envoy's default for each of the first three limits.
const ENVOY_DEFAULT_LIMIT: u32 = 1024;
/// Envoy's default `max_retries`.
const ENVOY_DEFAULT_MAX_RETRIES: u32 = 3;
/// Envoy's default retry budget share (20%) and minimum concurrency.
const ENVOY_DEFAULT_BUDGET_PERCENT: f64 = 20.0;
const ENVOY_DEFAULT_MIN_RETRY_CONCURRENCY: u32 = 3;
/// Envoy's outlier detection defaults.
const ENVOY_DEFAULT_CONSECUTIVE: u32 = 5;
const ENVOY_DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const ENVOY_DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const ENVOY_DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Envoy's default `healthy_panic_threshold`.
const ENVOY_DEFAULT_PANIC_THRESHOLD: u32 = 50;
/// Enforcement percentages this mesh can honor: always or never.
const ENFORCE_ALWAYS: u32 = 100;
const ENFORCE_NEVER: u32 = 0;

fn value(v: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value: v })
}

// ---------------------------------------------------------------------------
// Encoding

/// `circuit_breakers.thresholds[0]`, priority DEFAULT, every limit set.
pub(crate) fn breakers_to_proto(cb: &CircuitBreakers) -> BreakersProto {
    BreakersProto {
        thresholds: vec![Thresholds {
            priority: RoutingPriority::Default as i32,
            max_connections: value(cb.max_connections),
            max_pending_requests: value(cb.max_pending_requests),
            max_requests: value(cb.max_requests),
            max_retries: value(cb.max_retries),
            retry_budget: cb.retry_budget.as_ref().map(|b| BudgetProto {
                budget_percent: Some(Percent {
                    value: b.budget.percent(),
                }),
                min_retry_concurrency: value(b.min_retry_concurrency),
                budget_interval: None,
            }),
            ..Default::default()
        }],
        per_host_thresholds: Vec::new(),
    }
}

/// Outlier detection as Istio writes it, and the panic threshold that goes
/// with it.
pub(crate) fn outlier_to_proto(o: &OutlierDetection) -> (OutlierProto, CommonLbConfig) {
    let enforcing = |on: Option<u32>| {
        value(if on.is_some() {
            ENFORCE_ALWAYS
        } else {
            ENFORCE_NEVER
        })
    };
    let proto = OutlierProto {
        consecutive_5xx: o.consecutive_5xx.and_then(value),
        enforcing_consecutive_5xx: enforcing(o.consecutive_5xx),
        consecutive_gateway_failure: o.consecutive_gateway_errors.and_then(value),
        enforcing_consecutive_gateway_failure: enforcing(o.consecutive_gateway_errors),
        interval: Some(duration_to_proto(o.interval)),
        base_ejection_time: Some(duration_to_proto(o.base_ejection_time)),
        max_ejection_percent: value(o.max_ejection_percent),
        enforcing_success_rate: value(ENFORCE_NEVER),
        ..Default::default()
    };
    let common = CommonLbConfig {
        healthy_panic_threshold: Some(Percent {
            value: f64::from(o.min_health_percent),
        }),
        ..Default::default()
    };
    (proto, common)
}

/// `common_http_protocol_options`, when the model sets any of its fields.
pub(crate) fn common_http_to_proto(c: &ConnectionSettings) -> Option<CommonHttpOptions> {
    if c.idle_timeout.is_none() && c.max_requests_per_connection.is_none() {
        return None;
    }
    Some(CommonHttpOptions {
        idle_timeout: c.idle_timeout.map(duration_to_proto),
        max_requests_per_connection: c.max_requests_per_connection.and_then(value),
        ..Default::default()
    })
}

// ---------------------------------------------------------------------------
// Decoding

/// The DEFAULT-priority thresholds (Envoy's defaults when absent). HIGH
/// thresholds govern only HIGH-priority routes, which RDS decoding
/// rejects, so they are ignored next to a DEFAULT entry; a list of HIGH
/// thresholds only is unsupported (it looks like limits meant for every
/// request). `track_remaining` only adds stats and is ignored.
pub(crate) fn breakers_from_proto(cb: Option<&BreakersProto>) -> Decoded<CircuitBreakers> {
    let envoy_defaults = CircuitBreakers {
        max_connections: ENVOY_DEFAULT_LIMIT,
        max_pending_requests: ENVOY_DEFAULT_LIMIT,
        max_requests: ENVOY_DEFAULT_LIMIT,
        max_retries: ENVOY_DEFAULT_MAX_RETRIES,
        retry_budget: None,
    };
    let Some(cb) = cb else {
        return Ok(envoy_defaults);
    };
    reject_if(!cb.per_host_thresholds.is_empty(), "per_host_thresholds")?;
    let mut default = None;
    for (i, t) in cb.thresholds.iter().enumerate() {
        match RoutingPriority::try_from(t.priority) {
            Ok(RoutingPriority::Default) if default.is_some() => {
                return Err(FieldError::invalid("a second DEFAULT priority entry")
                    .at_index("thresholds", i));
            }
            Ok(RoutingPriority::Default) => default = Some((i, t)),
            Ok(RoutingPriority::High) => {}
            Err(_) => {
                return Err(FieldError::invalid(format!("unknown value {}", t.priority))
                    .at("priority")
                    .at_index("thresholds", i));
            }
        }
    }
    let Some((i, t)) = default else {
        if cb.thresholds.is_empty() {
            return Ok(envoy_defaults);
        }
        return Err(FieldError::unsupported(
            "only HIGH priority thresholds: HIGH-priority routes are not supported, \
             set the limits at priority DEFAULT",
        )
        .at("thresholds"));
    };
    thresholds_from_proto(t, envoy_defaults).at_index("thresholds", i)
}

fn thresholds_from_proto(t: &Thresholds, defaults: CircuitBreakers) -> Decoded<CircuitBreakers> {
    reject_if(t.max_connection_pools.is_some(), "max_connection_pools")?;
    let or = |v: Option<UInt32Value>, d: u32| v.map_or(d, |v| v.value);
    let retry_budget = t
        .retry_budget
        .as_ref()
        .map(budget_from_proto)
        .transpose()
        .at("retry_budget")?;
    Ok(CircuitBreakers {
        max_connections: or(t.max_connections, defaults.max_connections),
        max_pending_requests: or(t.max_pending_requests, defaults.max_pending_requests),
        max_requests: or(t.max_requests, defaults.max_requests),
        max_retries: or(t.max_retries, defaults.max_retries),
        retry_budget,
    })
}

fn budget_from_proto(b: &BudgetProto) -> Decoded<RetryBudget> {
    if opt_duration(b.budget_interval.as_ref(), "budget_interval")?.is_some() {
        return Err(FieldError::unsupported(
            "retry budgets over an interval are not supported (only concurrent retries)",
        )
        .at("budget_interval"));
    }
    let percent = b
        .budget_percent
        .map_or(ENVOY_DEFAULT_BUDGET_PERCENT, |p| p.value);
    let budget = Fraction::from_percent(percent).ok_or_else(|| {
        FieldError::invalid(format!("{percent} is not a percentage (0 to 100)"))
            .at("budget_percent")
    })?;
    Ok(RetryBudget {
        budget,
        min_retry_concurrency: b
            .min_retry_concurrency
            .map_or(ENVOY_DEFAULT_MIN_RETRY_CONCURRENCY, |v| v.value),
    })
}

/// Outlier detection. Envoy's defaults fill absent fields; only what the
/// model can honor is accepted: enforcement of consecutive 5xx and gateway
/// failures at 0% or 100%, no success-rate or failure-percentage ejection,
/// no cap on the ejection time. `common` carries the panic threshold
/// (Envoy's default 50% when absent).
///
/// Ignored because they change nothing here: the success-rate and
/// failure-percentage parameters when their enforcement is 0, the
/// local-origin knobs when `split_external_local_origin_errors` is off, and
/// `successful_active_health_check_uneject_host` (no active health checks).
pub(crate) fn outlier_from_proto(
    o: &OutlierProto,
    common: Option<&CommonLbConfig>,
) -> Decoded<OutlierDetection> {
    let enforced = |v: Option<UInt32Value>, default: u32, field: &'static str| -> Decoded<bool> {
        match v.map_or(default, |v| v.value) {
            ENFORCE_NEVER => Ok(false),
            ENFORCE_ALWAYS => Ok(true),
            other => Err(FieldError::unsupported(format!(
                "{other}%: only 0 and 100 are supported"
            ))
            .at(field)),
        }
    };
    let disabled = |v: Option<UInt32Value>, default: u32, field: &'static str, what: &str| match v
        .map_or(default, |v| v.value)
    {
        ENFORCE_NEVER => Ok(()),
        other => Err(FieldError::unsupported(format!(
            "{other}%: {what} ejection is not supported (set it to 0, as Istio does)"
        ))
        .at(field)),
    };
    disabled(
        o.enforcing_success_rate,
        ENFORCE_ALWAYS,
        "enforcing_success_rate",
        "success-rate",
    )?;
    disabled(
        o.enforcing_failure_percentage,
        ENFORCE_NEVER,
        "enforcing_failure_percentage",
        "failure-percentage",
    )?;
    reject_if(
        o.split_external_local_origin_errors,
        "split_external_local_origin_errors",
    )?;
    if o.max_ejection_time.is_some() {
        return Err(FieldError::unsupported(
            "a cap on the ejection time is not supported (ejections last base_ejection_time × \
             the number of ejections)",
        )
        .at("max_ejection_time"));
    }
    if opt_duration(
        o.max_ejection_time_jitter.as_ref(),
        "max_ejection_time_jitter",
    )?
    .is_some_and(|d| !d.is_zero())
    {
        return Err(
            FieldError::unsupported("ejection time jitter is not supported")
                .at("max_ejection_time_jitter"),
        );
    }
    reject_if(!o.monitors.is_empty(), "monitors")?;
    reject_if(
        o.always_eject_one_host.is_some_and(|b| b.value),
        "always_eject_one_host",
    )?;
    reject_if(
        o.detect_degraded_hosts.is_some_and(|b| b.value),
        "detect_degraded_hosts",
    )?;
    let consecutive_5xx = enforced(
        o.enforcing_consecutive_5xx,
        ENFORCE_ALWAYS,
        "enforcing_consecutive_5xx",
    )?
    .then(|| {
        o.consecutive_5xx
            .map_or(ENVOY_DEFAULT_CONSECUTIVE, |v| v.value)
    });
    let consecutive_gateway_errors = enforced(
        o.enforcing_consecutive_gateway_failure,
        ENFORCE_NEVER,
        "enforcing_consecutive_gateway_failure",
    )?
    .then(|| {
        o.consecutive_gateway_failure
            .map_or(ENVOY_DEFAULT_CONSECUTIVE, |v| v.value)
    });
    let max_ejection_percent = o
        .max_ejection_percent
        .map_or(ENVOY_DEFAULT_MAX_EJECTION_PERCENT, |v| v.value);
    if max_ejection_percent > 100 {
        return Err(
            FieldError::invalid(format!("{max_ejection_percent} is above 100"))
                .at("max_ejection_percent"),
        );
    }
    let min_health_percent = match common.and_then(|c| c.healthy_panic_threshold.as_ref()) {
        Some(p) => whole_percent(p).at("common_lb_config.healthy_panic_threshold")?,
        None => ENVOY_DEFAULT_PANIC_THRESHOLD,
    };
    Ok(OutlierDetection {
        consecutive_5xx,
        consecutive_gateway_errors,
        interval: positive_duration(o.interval.as_ref(), ENVOY_DEFAULT_INTERVAL, "interval")?,
        base_ejection_time: positive_duration(
            o.base_ejection_time.as_ref(),
            ENVOY_DEFAULT_BASE_EJECTION,
            "base_ejection_time",
        )?,
        max_ejection_percent,
        min_health_percent,
    })
}

/// The model's idle timeout and requests per connection from the common
/// HTTP options (`connect_timeout` is the cluster's, decoded by the
/// caller). Limits the model cannot honor (a maximum connection or stream
/// duration) are unsupported; `max_headers_count`,
/// `max_response_headers_kb` and `headers_with_underscores_action` concern
/// header validation, not routing, and are ignored.
pub(crate) fn connection_from_proto(
    common: Option<&CommonHttpOptions>,
) -> Decoded<ConnectionSettings> {
    let Some(common) = common else {
        return Ok(ConnectionSettings::default());
    };
    if opt_duration(
        common.max_connection_duration.as_ref(),
        "max_connection_duration",
    )?
    .is_some_and(|d| !d.is_zero())
    {
        return Err(
            FieldError::unsupported("a maximum connection duration is not supported")
                .at("max_connection_duration"),
        );
    }
    if opt_duration(common.max_stream_duration.as_ref(), "max_stream_duration")?
        .is_some_and(|d| !d.is_zero())
    {
        return Err(FieldError::unsupported(
            "a cluster-wide maximum stream duration is not supported: use the route timeout",
        )
        .at("max_stream_duration"));
    }
    Ok(ConnectionSettings {
        connect_timeout: None,
        idle_timeout: opt_duration(common.idle_timeout.as_ref(), "idle_timeout")?,
        max_requests_per_connection: common.max_requests_per_connection.map(|v| v.value),
    })
}

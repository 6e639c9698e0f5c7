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
//! - Connections: `connect_timeout`; the idle timeout, requests per
//!   connection and maximum connection duration in the upstream
//!   `HttpProtocolOptions`' `common_http_protocol_options` (Istio writes
//!   `http.idleTimeout`, else `tcp.idleTimeout`, to `idle_timeout`, and
//!   `tcp.maxConnectionDuration` to `max_connection_duration`); TCP
//!   keepalive in `upstream_connection_options.tcp_keepalive` (Envoy counts
//!   its time and interval in whole seconds; an empty message turns
//!   `SO_KEEPALIVE` on with the OS defaults, as Istio's does);
//!   `http.maxConcurrentStreams` in the HTTP/2 protocol options (encoded by
//!   the cluster module, which owns the protocol choice).

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers as BreakersProto, OutlierDetection as OutlierProto, UpstreamConnectionOptions,
    circuit_breakers::{Thresholds, thresholds::RetryBudget as BudgetProto},
    cluster::CommonLbConfig,
};
use envoy_types::pb::envoy::config::core::v3::{
    HttpProtocolOptions as CommonHttpOptions, RoutingPriority, TcpKeepalive as KeepaliveProto,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::UInt32Value;

use super::{
    At, Decoded, FieldError, duration_to_proto, opt_duration, positive_duration, reject_if,
    whole_percent,
};
use crate::model::{
    CircuitBreakers, ConnectionSettings, Fraction, OutlierDetection, RetryBudget, TcpKeepalive,
};

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
    if c.idle_timeout.is_none()
        && c.max_requests_per_connection.is_none()
        && c.max_connection_duration.is_none()
    {
        return None;
    }
    Some(CommonHttpOptions {
        idle_timeout: c.idle_timeout.map(duration_to_proto),
        max_requests_per_connection: c.max_requests_per_connection.and_then(value),
        max_connection_duration: c.max_connection_duration.map(duration_to_proto),
        ..Default::default()
    })
}

/// Whole seconds, as Envoy's keepalive fields count them (saturating).
fn whole_seconds(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

/// `upstream_connection_options { tcp_keepalive }`, when keepalive is on.
pub(crate) fn keepalive_to_proto(c: &ConnectionSettings) -> Option<UpstreamConnectionOptions> {
    let k = c.tcp_keepalive?;
    Some(UpstreamConnectionOptions {
        tcp_keepalive: Some(KeepaliveProto {
            keepalive_probes: k.probes.and_then(value),
            keepalive_time: k.time.map(whole_seconds).and_then(value),
            keepalive_interval: k.interval.map(whole_seconds).and_then(value),
        }),
        ..Default::default()
    })
}

/// TCP keepalive from `upstream_connection_options` (`None`: off). Zero
/// probes, time or interval are invalid (Envoy's validation). The other
/// options (the interface name in metadata, happy eyeballs) do not change
/// what a client with one address per endpoint does and are ignored.
pub(crate) fn keepalive_from_proto(
    o: Option<&UpstreamConnectionOptions>,
) -> Decoded<Option<TcpKeepalive>> {
    let Some(k) = o.and_then(|o| o.tcp_keepalive.as_ref()) else {
        return Ok(None);
    };
    let positive = |v: Option<UInt32Value>, field: &'static str| match v {
        Some(UInt32Value { value: 0 }) => Err(FieldError::invalid("must be positive")
            .at(field)
            .at("tcp_keepalive")),
        other => Ok(other.map(|v| v.value)),
    };
    Ok(Some(TcpKeepalive {
        probes: positive(k.keepalive_probes, "keepalive_probes")?,
        time: positive(k.keepalive_time, "keepalive_time")?
            .map(|s| Duration::from_secs(u64::from(s))),
        interval: positive(k.keepalive_interval, "keepalive_interval")?
            .map(|s| Duration::from_secs(u64::from(s))),
    }))
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

/// The model's idle timeout, requests per connection and maximum
/// connection duration from the common HTTP options (`connect_timeout` is
/// the cluster's, decoded by the caller; zero durations mean "none", as in
/// Envoy). A cluster-wide maximum stream duration is unsupported; `max_headers_count`,
/// `max_response_headers_kb` and `headers_with_underscores_action` concern
/// header validation, not routing, and are ignored.
pub(crate) fn connection_from_proto(
    common: Option<&CommonHttpOptions>,
) -> Decoded<ConnectionSettings> {
    let Some(common) = common else {
        return Ok(ConnectionSettings::default());
    };
    let max_connection_duration = opt_duration(
        common.max_connection_duration.as_ref(),
        "max_connection_duration",
    )?
    .filter(|d| !d.is_zero());
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
        max_connection_duration,
        ..ConnectionSettings::default()
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
        HttpProtocolOptions,
        http_protocol_options::{
            ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
        },
    };
    use prost::Message;

    use super::super::cluster::HTTP_PROTOCOL_OPTIONS_KEY;
    use super::super::{cluster_from_proto, cluster_to_proto, decode_cluster, encode_cluster};
    use crate::model::{Cluster, ConnectionSettings, Protocol, TcpKeepalive};

    fn options(proto: &ClusterProto) -> HttpProtocolOptions {
        HttpProtocolOptions::decode(
            proto.typed_extension_protocol_options[HTTP_PROTOCOL_OPTIONS_KEY]
                .value
                .as_slice(),
        )
        .unwrap()
    }

    fn h2(options: &HttpProtocolOptions) -> Option<u32> {
        match &options.upstream_protocol_options {
            Some(UpstreamProtocolOptions::ExplicitHttpConfig(ExplicitHttpConfig {
                protocol_config: Some(ProtocolConfig::Http2ProtocolOptions(h2)),
            })) => Some(h2.max_concurrent_streams.map_or(0, |v| v.value)),
            _ => None,
        }
    }

    fn round_trip(c: &Cluster) -> ClusterProto {
        let any = encode_cluster(c);
        assert_eq!(decode_cluster(&any).unwrap(), *c);
        cluster_to_proto(c)
    }

    #[test]
    fn connection_options_are_in_envoys_shape_and_round_trip() {
        let c = Cluster {
            connection: ConnectionSettings {
                tcp_keepalive: Some(TcpKeepalive {
                    probes: Some(3),
                    time: Some(Duration::from_secs(7200)),
                    interval: Some(Duration::from_secs(75)),
                }),
                max_connection_duration: Some(Duration::from_millis(300)),
                max_concurrent_streams: Some(2),
                idle_timeout: Some(Duration::from_secs(5)),
                ..ConnectionSettings::default()
            },
            ..Cluster::new("outbound|80||a.ns.svc.cluster.local", Protocol::Grpc)
        };
        let proto = round_trip(&c);
        let k = proto
            .upstream_connection_options
            .as_ref()
            .and_then(|o| o.tcp_keepalive.as_ref())
            .unwrap();
        assert_eq!(k.keepalive_probes.map(|v| v.value), Some(3));
        assert_eq!(k.keepalive_time.map(|v| v.value), Some(7200));
        assert_eq!(k.keepalive_interval.map(|v| v.value), Some(75));
        let o = options(&proto);
        let common = o.common_http_protocol_options.as_ref().unwrap();
        assert_eq!(
            common.max_connection_duration.map(|d| (d.seconds, d.nanos)),
            Some((0, 300_000_000))
        );
        assert_eq!(h2(&o), Some(2));
    }

    #[test]
    fn keepalive_with_os_defaults_is_an_empty_message() {
        let c = Cluster {
            connection: ConnectionSettings {
                tcp_keepalive: Some(TcpKeepalive::default()),
                ..ConnectionSettings::default()
            },
            ..Cluster::new("c", Protocol::Http1)
        };
        let proto = round_trip(&c);
        let k = proto.upstream_connection_options.unwrap().tcp_keepalive;
        assert_eq!(k, Some(Default::default()));
        // Off: no options at all.
        let off = cluster_to_proto(&Cluster::new("c", Protocol::Http1));
        assert_eq!(off.upstream_connection_options, None);
    }

    #[test]
    fn an_upgraded_http1_cluster_speaks_http2_and_stays_http1_by_metadata() {
        let c = Cluster {
            connection: ConnectionSettings {
                h2_upgrade: true,
                max_concurrent_streams: Some(10),
                ..ConnectionSettings::default()
            },
            ..Cluster::new("c", Protocol::Http1)
        };
        let proto = round_trip(&c);
        assert_eq!(h2(&options(&proto)), Some(10));
        // Without our metadata (as Istio sends it), the cluster is HTTP/2.
        let mut istio = proto.clone();
        istio.metadata = None;
        let decoded = cluster_from_proto(&istio).unwrap();
        assert_eq!(decoded.protocol, Protocol::Http2);
        assert!(!decoded.connection.h2_upgrade);
        assert_eq!(decoded.connection.max_concurrent_streams, Some(10));
        // Not upgraded: HTTP/1.1 options.
        let plain = cluster_to_proto(&Cluster::new("c", Protocol::Http1));
        assert_eq!(h2(&options(&plain)), None);
    }

    #[test]
    fn zero_keepalive_values_are_rejected_with_the_field() {
        let c = Cluster {
            connection: ConnectionSettings {
                tcp_keepalive: Some(TcpKeepalive {
                    probes: Some(0),
                    ..TcpKeepalive::default()
                }),
                ..ConnectionSettings::default()
            },
            ..Cluster::new("c", Protocol::Http1)
        };
        let err = cluster_from_proto(&cluster_to_proto(&c)).unwrap_err();
        assert!(
            err.to_string()
                .contains("upstream_connection_options.tcp_keepalive.keepalive_probes"),
            "{err}"
        );
    }
}

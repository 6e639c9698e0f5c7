//! Slow start (Istio `loadBalancer.warmupDurationSecs`) in Envoy's shape:
//! `slow_start_config { slow_start_window }` of the round-robin policy
//! (the cluster's legacy `round_robin_lb_config`, since round robin is the
//! `lb_policy` enum here) or of the typed least-request policy inside
//! `wrr_locality` (the shape Istio writes). Aggression and the minimum
//! weight are left at Envoy's defaults (1.0, linear; 10%), which is what
//! this client implements ([`crate::lb::slow_start_factor`]); other values
//! are refused on decode, naming the field. gRPC clients ignore all of it.

use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster as ClusterProto, LoadBalancingPolicy,
    cluster::{LbConfig, RoundRobinLbConfig, SlowStartConfig as LegacySlowStart},
};
use envoy_types::pb::envoy::config::core::v3::RuntimeDouble;
use envoy_types::pb::envoy::extensions::load_balancing_policies::{
    common::v3::SlowStartConfig, least_request::v3::LeastRequest, random::v3::Random,
    ring_hash::v3::RingHash, round_robin::v3::RoundRobin, wrr_locality::v3::WrrLocality,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use prost::Name as _;

use super::{At, Decoded, FieldError, duration_to_proto, opt_duration, type_name, unpack};

/// Envoy's default minimum weight of an endpoint in slow start, percent.
const MIN_WEIGHT_PERCENT: f64 = 10.0;

/// The typed policies' slow start config for `window`.
pub(crate) fn typed(window: Option<Duration>) -> Option<SlowStartConfig> {
    window.map(|w| SlowStartConfig {
        slow_start_window: Some(duration_to_proto(w)),
        aggression: None,
        min_weight_percent: None,
    })
}

/// The legacy `round_robin_lb_config` for `window`.
pub(crate) fn round_robin_lb_config(window: Option<Duration>) -> Option<LbConfig> {
    window.map(|w| {
        LbConfig::RoundRobinLbConfig(RoundRobinLbConfig {
            slow_start_config: Some(LegacySlowStart {
                slow_start_window: Some(duration_to_proto(w)),
                aggression: None,
                min_weight_percent: None,
            }),
        })
    })
}

/// The slow start window of a cluster: from the policy
/// `load_balancing_policy` picks (the first known one, as the LB policy
/// decoder does), else from the legacy `lb_config`.
pub(crate) fn from_proto(c: &ClusterProto) -> Decoded<Option<Duration>> {
    if let Some(list) = &c.load_balancing_policy {
        return from_list(list).at("load_balancing_policy");
    }
    match &c.lb_config {
        Some(LbConfig::RoundRobinLbConfig(rr)) => rr
            .slow_start_config
            .as_ref()
            .map(|s| {
                window(
                    s.slow_start_window.as_ref(),
                    s.aggression.as_ref(),
                    s.min_weight_percent.as_ref(),
                )
            })
            .transpose()
            .map(Option::flatten)
            .at("slow_start_config")
            .at("round_robin_lb_config"),
        Some(LbConfig::LeastRequestLbConfig(lr)) => lr
            .slow_start_config
            .as_ref()
            .map(|s| {
                window(
                    s.slow_start_window.as_ref(),
                    s.aggression.as_ref(),
                    s.min_weight_percent.as_ref(),
                )
            })
            .transpose()
            .map(Option::flatten)
            .at("slow_start_config")
            .at("least_request_lb_config"),
        _ => Ok(None),
    }
}

fn from_list(list: &LoadBalancingPolicy) -> Decoded<Option<Duration>> {
    for (i, policy) in list.policies.iter().enumerate() {
        let Some(any) = policy
            .typed_extension_config
            .as_ref()
            .and_then(|t| t.typed_config.as_ref())
        else {
            continue;
        };
        let name = type_name(&any.type_url);
        let at = "typed_extension_config.typed_config";
        let config = if name == WrrLocality::full_name() {
            let wrr: WrrLocality = unpack(any).at(at).at_index("policies", i)?;
            return match &wrr.endpoint_picking_policy {
                Some(child) => from_list(child)
                    .at("endpoint_picking_policy")
                    .at(at)
                    .at_index("policies", i),
                None => Ok(None),
            };
        } else if name == RoundRobin::full_name() {
            unpack::<RoundRobin>(any)
                .at(at)
                .at_index("policies", i)?
                .slow_start_config
        } else if name == LeastRequest::full_name() {
            unpack::<LeastRequest>(any)
                .at(at)
                .at_index("policies", i)?
                .slow_start_config
        } else {
            // Ring hash, random, or a policy skipped by the LB decoder:
            // no slow start there.
            if name == Random::full_name() || name == RingHash::full_name() {
                return Ok(None);
            }
            continue;
        };
        return config
            .as_ref()
            .map(|s| {
                window(
                    s.slow_start_window.as_ref(),
                    s.aggression.as_ref(),
                    s.min_weight_percent.as_ref(),
                )
            })
            .transpose()
            .map(Option::flatten)
            .at("slow_start_config")
            .at(at)
            .at_index("policies", i);
    }
    Ok(None)
}

fn window(
    window: Option<&envoy_types::pb::google::protobuf::Duration>,
    aggression: Option<&RuntimeDouble>,
    min_weight: Option<&Percent>,
) -> Decoded<Option<Duration>> {
    if let Some(a) = aggression
        && (a.default_value - 1.0).abs() > f64::EPSILON
    {
        return Err(FieldError::unsupported(format!(
            "{} is not supported: only 1.0 (a linear ramp)",
            a.default_value
        ))
        .at("aggression"));
    }
    if let Some(p) = min_weight
        && (p.value - MIN_WEIGHT_PERCENT).abs() > f64::EPSILON
    {
        return Err(FieldError::unsupported(format!(
            "{} is not supported: only {MIN_WEIGHT_PERCENT} (Envoy's default)",
            p.value
        ))
        .at("min_weight_percent"));
    }
    Ok(opt_duration(window, "slow_start_window")?.filter(|w| !w.is_zero()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use envoy_types::pb::envoy::config::cluster::v3::Cluster as ClusterProto;
    use prost::Message as _;

    use crate::model::{Cluster, LbPolicy, Protocol};
    use crate::xds::{cluster_to_proto, decode_cluster, encode_cluster, pack};

    fn cluster(lb_policy: LbPolicy, slow_start: Option<Duration>) -> Cluster {
        Cluster {
            lb_policy,
            slow_start,
            ..Cluster::new("outbound|80||catalog", Protocol::Http1)
        }
    }

    #[test]
    fn slow_start_round_trips_for_round_robin_and_least_request() {
        for policy in [LbPolicy::RoundRobin, LbPolicy::LeastRequest] {
            for window in [None, Some(Duration::from_secs(30))] {
                let c = cluster(policy, window);
                assert_eq!(
                    decode_cluster(&encode_cluster(&c)).unwrap(),
                    c,
                    "{policy:?}"
                );
            }
        }
        // Round robin: the legacy round_robin_lb_config, as Envoy reads it.
        let proto = cluster_to_proto(&cluster(
            LbPolicy::RoundRobin,
            Some(Duration::from_secs(30)),
        ));
        let Some(super::LbConfig::RoundRobinLbConfig(rr)) = &proto.lb_config else {
            panic!("{:?}", proto.lb_config);
        };
        let window = rr.slow_start_config.as_ref().unwrap().slow_start_window;
        assert_eq!(window.map(|w| w.seconds), Some(30));
    }

    #[test]
    fn aggression_other_than_linear_is_refused_naming_the_field() {
        let c = cluster(LbPolicy::RoundRobin, Some(Duration::from_secs(30)));
        let mut proto = cluster_to_proto(&c);
        if let Some(super::LbConfig::RoundRobinLbConfig(rr)) = &mut proto.lb_config {
            rr.slow_start_config.as_mut().unwrap().aggression = Some(super::RuntimeDouble {
                default_value: 2.0,
                runtime_key: String::new(),
            });
        }
        let any = pack(&proto);
        assert_eq!(ClusterProto::decode(any.value.as_slice()).unwrap(), proto);
        let err = decode_cluster(&any).unwrap_err().to_string();
        assert!(
            err.contains("round_robin_lb_config.slow_start_config.aggression"),
            "{err}"
        );
    }
}

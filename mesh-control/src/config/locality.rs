//! DestinationRule `trafficPolicy.loadBalancer.localityLbSetting`
//! (`distribute`, `failover`, `failoverPriority`) and `warmupDurationSecs`.
//!
//! Istio computes locality settings per proxy, into the EDS it sends that
//! proxy (istiod's `ApplyLocalityLoadBalancer`), and so does this server:
//! the caller's locality (its ADS `node.locality`) and, for
//! `failoverPriority`, the labels it names become per-node view
//! dependencies (see "Per-node views" in `config`), and
//! [`locality_for_view`](super::translate::locality_for_view)
//! rewrites a view's ClusterLoadAssignments by Istio's rules, implemented
//! in [`mesh_core::locality`]
//! (`distribute` sets locality weights for the callers it is `from`;
//! `failover` and `failoverPriority` set EDS priorities, and only with
//! `outlierDetection`, as in Istio: without it a client would never leave
//! a priority).
//!
//! `distribute` and `failover` together are an error (Istio: "can not
//! simultaneously specify"); failover without `outlierDetection` is a note
//! of `check` (istioctl's warning). The client honors what EDS says: it
//! weighs localities by their weight and tries priorities in order (gRPC
//! does too: `wrr_locality` and the priority policy, gRFC A52 / A56), so
//! the client-side locality ordering that Istio's default gives a cluster
//! with outlier detection is turned off for clusters whose rule says any of
//! this.
//!
//! This module reads the settings; `translate.rs` applies them and
//! `policy.rs` holds them (`TrafficPolicy::locality_setting`): as `policy`
//! imports this module, this module does not import `policy` back (issue
//! 14: no two-module cycles).
//!
//! `warmupDurationSecs` becomes [`mesh_core::model::Cluster::slow_start`]
//! for the round-robin and least-request policies (Istio sets Envoy's
//! `slow_start_config` for these only; with another policy `check` notes it
//! is ignored).

pub(crate) use mesh_core::locality::LocalityLbSetting as LocalitySetting;
use mesh_core::locality::{Distribute, Failover, REGION_LABEL, SUBZONE_LABEL, ZONE_LABEL};

use super::yaml::{Field, Fields, Look, Sink};

/// `localityLbSetting`: `enabled` and the rest (`None` when empty).
pub(crate) fn parse(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
) -> Option<(Option<bool>, Option<Box<LocalitySetting>>)> {
    let before = sink.count();
    let l = Fields::of(
        sink,
        field,
        &["enabled", "distribute", "failover", "failoverPriority"],
        &[],
    )?;
    let enabled = l.get("enabled").and_then(|e| e.boolean(sink));
    let mut setting = LocalitySetting::default();
    if let Some(d) = l.get("distribute") {
        for (path, node) in d.list(sink).unwrap_or_default() {
            let Some(entry) = Fields::read(sink, node, &path, &["from", "to"], &[]) else {
                continue;
            };
            let from = entry.require(sink, "from").and_then(|f| f.string(sink));
            if let Some(from) = &from {
                check_locality(sink, from.line, &format!("{path}.from"), &from.value);
            }
            let Some(to_field) = entry.require(sink, "to") else {
                continue;
            };
            let mut to = Vec::new();
            let mut total = 0i64;
            for e in to_field.entries(sink).unwrap_or_default() {
                check_locality(sink, e.line, &e.path, &e.key);
                if let Some(w) =
                    e.field()
                        .integer_in(sink, 1, 100, "a locality weight, as in Istio")
                {
                    total += w;
                    to.push((e.key.clone(), u32::try_from(w).unwrap_or(1)));
                }
            }
            if to.is_empty() {
                sink.error(
                    to_field.key_line,
                    format!("'{}' must name at least one locality", to_field.path),
                );
            } else if total != 100 {
                sink.error(
                    to_field.key_line,
                    format!(
                        "'{}': the weights add up to {total}, they must add up to 100",
                        to_field.path
                    ),
                );
            }
            if let Some(from) = from {
                setting.distribute.push(Distribute {
                    from: from.value,
                    to,
                });
            }
        }
    }
    if let Some(f) = l.get("failover") {
        for (path, node) in f.list(sink).unwrap_or_default() {
            let Some(entry) = Fields::read(sink, node, &path, &["from", "to"], &[]) else {
                continue;
            };
            let from = entry.require(sink, "from").and_then(|f| f.string(sink));
            let to = entry.require(sink, "to").and_then(|f| f.string(sink));
            let (Some(from), Some(to)) = (from, to) else {
                continue;
            };
            for (which, s) in [("from", &from), ("to", &to)] {
                if s.value.contains('/') || s.value.contains('*') || s.value.is_empty() {
                    sink.error(
                        s.line,
                        format!(
                            "'{path}.{which}': failover names a region ('{}' has a '/' or '*' or is empty)",
                            s.value
                        ),
                    );
                }
            }
            if from.value == to.value {
                sink.error(
                    to.line,
                    format!(
                        "'{path}': failover from a region to itself ('{}'); name another region",
                        to.value
                    ),
                );
            }
            setting.failover.push(Failover {
                from: from.value,
                to: to.value,
            });
        }
    }
    if let Some(p) = l.get("failoverPriority") {
        for (path, label) in p.string_list(sink).unwrap_or_default() {
            let key = label.value.split('=').next().unwrap_or_default();
            if key.is_empty() || label.value.matches('=').count() > 1 {
                sink.error(
                    label.line,
                    format!("'{path}': expected a label name or name=value"),
                );
            }
            if !setting.failover.is_empty()
                && [REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL].contains(&key)
            {
                sink.error(
                    label.line,
                    format!(
                        "'{path}': the topology label '{key}' cannot be used together with 'failover' (Istio refuses it)"
                    ),
                );
            }
            setting.failover_priority.push(label.value);
        }
    }
    if let (Some(_), Some(f)) = (l.get("distribute"), l.get("failover"))
        && !setting.distribute.is_empty()
        && !setting.failover.is_empty()
    {
        sink.error(
            f.key_line,
            format!(
                "'{}': only one of distribute or failover may be set (Istio: can not simultaneously specify 'distribute' and 'failover')",
                l.path
            ),
        );
    }
    if sink.count() != before {
        return None;
    }
    Some((enabled, (!setting.is_empty()).then(|| Box::new(setting))))
}

/// Istio's locality pattern: `region`, `region/zone`, `region/zone/subzone`,
/// with at most one `*`, at the end, and no empty part.
fn check_locality(sink: &mut Sink<'_>, line: usize, path: &str, value: &str) {
    let stars = value.matches('*').count();
    if stars > 1 || (stars == 1 && !value.ends_with('*')) {
        sink.error(
            line,
            format!("'{path}': locality '{value}' may hold one '*', at the end"),
        );
    } else if value.split('/').count() > 3 || value.split('/').any(str::is_empty) {
        sink.error(
            line,
            format!(
                "'{path}': locality '{value}' must be region[/zone[/subzone]] without empty parts"
            ),
        );
    }
}

/// What `check` notes about one `trafficPolicy` (`policy`) of a
/// DestinationRule whose top-level policy is `top`: failover without
/// outlier detection (Istio applies no failover then; istioctl warns), and
/// a warmup with a policy that has no slow start.
pub(crate) fn notes(policy: Look<'_, '_>, top: Option<Look<'_, '_>>) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let has_outlier = policy.get("outlierDetection").is_some()
        || top.is_some_and(|t| t.get("outlierDetection").is_some());
    for what in ["failover", "failoverPriority"] {
        if let Some(f) = policy.get(&format!("loadBalancer.localityLbSetting.{what}"))
            && !has_outlier
        {
            out.push((
                f.line,
                format!(
                    "localityLbSetting.{what} has no effect without outlierDetection \
                     (Istio applies failover only with outlier detection; istioctl warns \
                     \"outlier detection policy must be provided for failover\")"
                ),
            ));
        }
    }
    if let Some(w) = policy.get("loadBalancer.warmupDurationSecs")
        && (policy.get("loadBalancer.consistentHash").is_some()
            || policy
                .get("loadBalancer.simple")
                .and_then(|s| s.text())
                .is_some_and(|s| s == "RANDOM" || s == "PASSTHROUGH"))
    {
        out.push((
            w.line,
            "loadBalancer.warmupDurationSecs is ignored: slow start exists only for \
             ROUND_ROBIN and LEAST_REQUEST (as in Envoy)"
                .to_string(),
        ));
    }
    out
}

#[cfg(test)]
#[path = "locality_tests.rs"]
mod tests;

//! A JSON dump of the config a service runs: the snapshot its requests are
//! routed with, resource by resource, with each one's version, update time
//! and ACK/NACK status.
//!
//! CSDS ([`crate::CsdsService`]) reports the same resources as raw protobuf
//! `Any`s for xDS tools; this dump is for people and `jq`, the counterpart of
//! Envoy's `/config_dump` admin page and `istioctl proxy-config`, rendered
//! from the decoded model (what the mesh actually uses, after conversion)
//! rather than from the wire form. mesh-tower serves it at
//! `/debug/mesh/config`.
//!
//! The layout: `node`, `control_server` (the servers, which one delivered
//! the config, the last error, and the cache file: `cache.stale_since` and
//! a one-line `cache.stale` when the config in use is the cached one
//! because no control server has answered since start), `versions` (per
//! type, the last accepted `version_info`), then `listeners`, `server_listeners` (gRFC
//! A36: address, mTLS mode, policies), `route_configs`, `clusters`,
//! `endpoints` (each resource with `version`, `last_updated` and `status`),
//! `missing_listeners` / `missing_clusters` (the server said they do not
//! exist), `requested` (subscribed, not received), `rejections` (resources
//! whose last update was NACKed, and why) and `type_rejections` (each type's
//! last NACK message while no later response of it was accepted). Durations
//! are protobuf JSON strings (`"1.500s"`), times RFC 3339 UTC.

use std::time::{Duration, SystemTime};

use mesh_core::Snapshot;
use mesh_core::model::{
    AbortStatus, Cluster, ClusterLoadAssignment, HashPolicy, LbPolicy, Listener, PathMatch,
    Protocol, Route, RouteConfig, ServerListener, ValueMatch,
};
use mesh_core::xds::ResourceType;
use serde_json::{Map, Value, json};

use crate::client::human_duration;
use crate::state::{Rejection, ResourceReport, ResourceStatus};
use crate::{CacheStatus, XdsClient};

impl XdsClient {
    /// The config this client runs, as JSON for people and `jq` (what
    /// mesh-tower serves at `/debug/mesh/config`), rendered from the snapshot
    /// its requests use.
    ///
    /// Keys: `node`, `control_server` (`servers`, `connected`,
    /// `last_error`, `cache`: `file`, `saved_at`, `problem`, and while the
    /// config in use came from the cache file, `stale_since` (when it was
    /// written) and `stale`, a sentence with its age), `versions` (`LDS`/`RDS`/`CDS`/`EDS`: the last accepted
    /// `version_info`), `listeners`, `route_configs` (virtual hosts, routes
    /// with their match, weighted `clusters` and `policy`), `clusters` (LB
    /// policy, protocol, circuit breakers, outlier detection), `endpoints`
    /// (localities, addresses, weights, labels) — each resource with its
    /// `version`, `last_updated` and `status` — then `missing_listeners`,
    /// `missing_clusters`, `requested` (subscribed, not received),
    /// `rejections` (resources whose last update was NACKed, why, which
    /// version) and `type_rejections` (each type's last NACK). Durations are
    /// protobuf JSON strings (`"1.500s"`), times RFC 3339 UTC.
    pub fn config_dump_json(&self) -> Value {
        let snapshot = self.snapshot();
        let report = self.resource_report();
        let mut dump = config_dump(&snapshot, &report);
        let bootstrap = self.bootstrap();
        let locality = bootstrap.locality();
        if let Value::Object(map) = &mut dump {
            map.insert(
                "node".to_owned(),
                json!({
                    "id": bootstrap.node_id(),
                    "cluster": bootstrap.cluster(),
                    "namespace": bootstrap.namespace(),
                    "locality": {
                        "region": &*locality.region,
                        "zone": &*locality.zone,
                        "sub_zone": &*locality.sub_zone,
                    },
                }),
            );
            map.insert(
                "control_server".to_owned(),
                json!({
                    "servers": bootstrap
                        .xds_servers()
                        .iter()
                        .map(|s| s.server_uri())
                        .collect::<Vec<_>>(),
                    "connected": self.connected_server(),
                    "last_error": self.last_error().map(|e| e.to_string()),
                    "cache": cache_json(&self.cache_status(), SystemTime::now()),
                }),
            );
        }
        dump
    }
}

/// The `control_server.cache` part of the dump.
fn cache_json(cache: &CacheStatus, now: SystemTime) -> Value {
    let stale = match (&cache.file, cache.stale_since) {
        (Some(file), Some(since)) => Value::String(format!(
            "stale since {}: serving the config cached in {} (written {} ago) because no \
             control server has answered since this client started",
            rfc3339(since),
            file.display(),
            human_duration(now.duration_since(since).unwrap_or_default())
        )),
        _ => Value::Null,
    };
    json!({
        "file": cache.file.as_ref().map(|f| f.display().to_string()),
        "stale_since": cache.stale_since.map(rfc3339),
        "stale": stale,
        "saved_at": cache.saved_at.map(rfc3339),
        "problem": cache.problem,
    })
}

/// The dump of a snapshot and the report published with it (no node or
/// connection part).
pub(crate) fn config_dump(snapshot: &Snapshot, report: &ResourceReport) -> Value {
    let meta = |kind: ResourceType, name: &str| -> Map<String, Value> {
        let mut m = Map::new();
        let entry = report.get(kind, name);
        let version = entry
            .and_then(|e| e.accepted.as_ref())
            .map_or_else(|| report.version(kind).to_owned(), |r| r.version.clone());
        m.insert("version".to_owned(), Value::String(version));
        m.insert(
            "last_updated".to_owned(),
            entry
                .and_then(|e| e.accepted.as_ref())
                .map_or(Value::Null, |r| Value::String(rfc3339(r.updated))),
        );
        m.insert(
            "status".to_owned(),
            Value::String(
                entry
                    .map_or(ResourceStatus::Acked, |e| e.status)
                    .as_str()
                    .to_owned(),
            ),
        );
        m
    };
    let with_meta = |kind: ResourceType, name: &str, body: Value| -> Value {
        let mut m = meta(kind, name);
        if let Value::Object(body) = body {
            m.extend(body);
        }
        Value::Object(m)
    };

    let listeners: Vec<Value> = snapshot
        .listeners
        .iter()
        .map(|(name, l)| with_meta(ResourceType::Listener, name, listener(l)))
        .collect();
    let server_listeners: Vec<Value> = snapshot
        .server_listeners
        .iter()
        .map(|(name, l)| with_meta(ResourceType::Listener, name, server_listener(l)))
        .collect();
    let route_configs: Vec<Value> = snapshot
        .route_configs
        .iter()
        .map(|(name, rc)| with_meta(ResourceType::RouteConfig, name, route_config(rc)))
        .collect();
    let clusters: Vec<Value> = snapshot
        .clusters
        .iter()
        .map(|(name, c)| with_meta(ResourceType::Cluster, name, cluster(c)))
        .collect();
    let endpoints: Vec<Value> = snapshot
        .endpoints
        .iter()
        .map(|(name, e)| with_meta(ResourceType::Endpoints, name, load_assignment(e)))
        .collect();

    let entries = report.entries();
    let missing_clusters: Vec<&str> = entries
        .iter()
        .filter(|e| e.kind == ResourceType::Cluster && e.status == ResourceStatus::DoesNotExist)
        .map(|e| &*e.name)
        .collect();
    let requested: Vec<Value> = entries
        .iter()
        .filter(|e| e.status == ResourceStatus::Requested)
        .map(|e| json!({ "type": e.kind.short_name(), "name": &*e.name }))
        .collect();
    let rejections: Vec<Value> = entries
        .iter()
        .filter_map(|e| {
            let r = e.rejection.as_deref()?;
            let mut v = rejection(r);
            if let Value::Object(m) = &mut v {
                m.insert("type".to_owned(), json!(e.kind.short_name()));
                m.insert("name".to_owned(), json!(&*e.name));
                m.insert(
                    "previous_version_in_use".to_owned(),
                    json!(e.accepted.is_some()),
                );
            }
            Some(v)
        })
        .collect();
    let type_rejections: Map<String, Value> = ResourceType::ALL
        .iter()
        .filter_map(|t| {
            report
                .type_rejection(*t)
                .map(|r| (t.short_name().to_owned(), rejection(r)))
        })
        .collect();
    let v = &snapshot.versions;
    json!({
        "versions": {
            "LDS": &*v.listeners,
            "RDS": &*v.route_configs,
            "CDS": &*v.clusters,
            "EDS": &*v.endpoints,
        },
        "listeners": listeners,
        "server_listeners": server_listeners,
        "missing_listeners": snapshot.missing_listeners.iter().map(|n| &**n).collect::<Vec<_>>(),
        "route_configs": route_configs,
        "clusters": clusters,
        "missing_clusters": missing_clusters,
        "endpoints": endpoints,
        "requested": requested,
        "rejections": rejections,
        "type_rejections": type_rejections,
    })
}

fn rejection(r: &Rejection) -> Value {
    json!({
        "version": r.version,
        "details": r.details,
        "at": rfc3339(r.at),
    })
}

fn listener(l: &Listener) -> Value {
    json!({
        "name": &*l.name,
        "route_config_name": &*l.route_config_name,
    })
}

/// A server listener: its address, mTLS mode and the policies by id and
/// action (their rules are in the RBAC filters CSDS reports).
fn server_listener(l: &ServerListener) -> Value {
    json!({
        "name": &*l.name,
        "address": l.address.to_string(),
        "mtls": l.mtls.as_str(),
        "policies": l.policies.iter().map(|p| json!({
            "id": &**p.id(),
            "action": p.action().as_str(),
            "dry_run": p.is_dry_run(),
        })).collect::<Vec<_>>(),
    })
}

fn route_config(rc: &RouteConfig) -> Value {
    let virtual_hosts: Vec<Value> = rc
        .virtual_hosts
        .iter()
        .map(|vh| {
            json!({
                "name": &*vh.name,
                "domains": vh.domains.iter().map(|d| &**d).collect::<Vec<_>>(),
                "routes": vh.routes.iter().map(route).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "name": &*rc.name,
        "virtual_hosts": virtual_hosts,
    })
}

fn value_match(v: &ValueMatch) -> Value {
    match v {
        ValueMatch::Exact(s) => json!({ "exact": &**s }),
        ValueMatch::Prefix(s) => json!({ "prefix": &**s }),
        ValueMatch::Regex(p) => json!({ "regex": p.as_str() }),
        ValueMatch::Present(b) => json!({ "present": b }),
    }
}

fn route(r: &Route) -> Value {
    let path = match &r.matcher.path {
        PathMatch::Prefix(s) => json!({ "prefix": &**s }),
        PathMatch::Exact(s) => json!({ "exact": &**s }),
        PathMatch::Regex(p) => json!({ "regex": p.as_str() }),
    };
    let headers: Vec<Value> = r
        .matcher
        .headers
        .iter()
        .map(|h| {
            json!({
                "name": &*h.name,
                "value": value_match(&h.value),
                "invert": h.invert,
            })
        })
        .collect();
    let query_params: Vec<Value> = r
        .matcher
        .query_params
        .iter()
        .map(|q| json!({ "name": &*q.name, "value": value_match(&q.value) }))
        .collect();
    let clusters: Vec<Value> = r
        .action
        .clusters()
        .iter()
        .map(|c| json!({ "name": &*c.name, "weight": c.weight }))
        .collect();
    let p = &r.policy;
    let retry = p.retry.as_ref().map(|rp| {
        json!({
            "num_retries": rp.num_retries,
            "per_try_timeout": rp.per_try_timeout.map(duration),
            "retry_on": rp.retry_on.names().collect::<Vec<_>>(),
            "retriable_status_codes": &*rp.retriable_status_codes,
            "backoff_base": duration(rp.backoff_base),
            "backoff_max": duration(rp.backoff_max),
            "retry_remote_localities": rp.retry_remote_localities,
        })
    });
    let fault = p.fault.as_ref().map(|f| {
        json!({
            "delay": f.delay.as_ref().map(|d| json!({
                "percent": d.fraction.percent(),
                "delay": duration(d.delay),
            })),
            "abort": f.abort.as_ref().map(|a| {
                let status = match a.status {
                    AbortStatus::Http(code) => json!({ "http_status": code }),
                    AbortStatus::Grpc(code) => json!({ "grpc_status": code }),
                };
                json!({ "percent": a.fraction.percent(), "status": status })
            }),
        })
    });
    let hash_policy: Vec<Value> = p
        .hash_policy
        .iter()
        .map(|h| match h {
            HashPolicy::Header(name) => json!({ "header": &**name }),
            HashPolicy::Cookie { name, ttl, path } => json!({
                "cookie": {
                    "name": &**name,
                    "ttl": ttl.map(duration),
                    "path": path.as_deref(),
                },
            }),
            HashPolicy::SourceIp => json!({ "source_ip": true }),
            HashPolicy::QueryParameter(name) => json!({ "query_parameter": &**name }),
        })
        .collect();
    json!({
        "name": &*r.name,
        "match": {
            "path": path,
            "headers": headers,
            "query_params": query_params,
        },
        "clusters": clusters,
        "total_weight": r.action.total_weight(),
        "policy": {
            "timeout": p.timeout.map(duration),
            "retry": retry,
            "fault": fault,
            "hash_policy": hash_policy,
        },
    })
}

fn cluster(c: &Cluster) -> Value {
    let lb_policy = match c.lb_policy {
        LbPolicy::RoundRobin => json!("ROUND_ROBIN"),
        LbPolicy::LeastRequest => json!("LEAST_REQUEST"),
        LbPolicy::Random => json!("RANDOM"),
        LbPolicy::RingHash { minimum_ring_size } => {
            json!({ "RING_HASH": { "minimum_ring_size": minimum_ring_size } })
        }
    };
    let protocol = match c.protocol {
        Protocol::Http1 => "HTTP",
        Protocol::Http2 => "HTTP2",
        Protocol::Grpc => "GRPC",
    };
    let b = &c.circuit_breakers;
    let outlier = c.outlier_detection.as_ref().map(|o| {
        json!({
            "consecutive_5xx": o.consecutive_5xx,
            "consecutive_gateway_errors": o.consecutive_gateway_errors,
            "interval": duration(o.interval),
            "base_ejection_time": duration(o.base_ejection_time),
            "max_ejection_percent": o.max_ejection_percent,
            "min_health_percent": o.min_health_percent,
        })
    });
    json!({
        "name": &*c.name,
        "eds_service_name": &*c.eds_service_name,
        "lb_policy": lb_policy,
        "protocol": protocol,
        "circuit_breakers": {
            "max_connections": b.max_connections,
            "max_pending_requests": b.max_pending_requests,
            "max_requests": b.max_requests,
            "max_retries": b.max_retries,
            "retry_budget": b.retry_budget.as_ref().map(|rb| json!({
                "budget_percent": rb.budget.percent(),
                "min_retry_concurrency": rb.min_retry_concurrency,
            })),
        },
        "outlier_detection": outlier,
        "tls": c.tls.as_ref().map(|t| json!({
            "server_identities": t.server_identities.iter().map(|id| id.as_str()).collect::<Vec<_>>(),
            "sni": &*t.sni,
        })),
        "connection": {
            "connect_timeout": c.connection.connect_timeout.map(duration),
            "idle_timeout": c.connection.idle_timeout.map(duration),
            "max_requests_per_connection": c.connection.max_requests_per_connection,
        },
        "locality_failover": c.locality_failover,
    })
}

fn load_assignment(e: &ClusterLoadAssignment) -> Value {
    let localities: Vec<Value> = e
        .localities
        .iter()
        .map(|l| {
            let endpoints: Vec<Value> = l
                .endpoints
                .iter()
                .map(|ep| {
                    let labels: Map<String, Value> = ep
                        .labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                        .collect();
                    json!({
                        "address": ep.address.to_string(),
                        "weight": ep.weight,
                        "labels": labels,
                    })
                })
                .collect();
            json!({
                "locality": {
                    "region": &*l.locality.region,
                    "zone": &*l.locality.zone,
                    "sub_zone": &*l.locality.sub_zone,
                },
                "weight": l.weight,
                "priority": l.priority,
                "endpoints": endpoints,
            })
        })
        .collect();
    json!({
        "cluster_name": &*e.cluster_name,
        "endpoint_count": e.endpoint_count(),
        "localities": localities,
    })
}

/// A duration as protobuf JSON writes one: seconds with 0, 3, 6 or 9
/// fractional digits and an `s` (`"1s"`, `"0.250s"`).
fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    if nanos == 0 {
        format!("{secs}s")
    } else if nanos.is_multiple_of(1_000_000) {
        format!("{secs}.{:03}s", nanos / 1_000_000)
    } else if nanos.is_multiple_of(1_000) {
        format!("{secs}.{:06}s", nanos / 1_000)
    } else {
        format!("{secs}.{nanos:09}s")
    }
}

/// A time as RFC 3339 UTC with milliseconds (`2025-01-02T03:04:05.678Z`).
pub(crate) fn rfc3339(t: SystemTime) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from(t)
        .format(FORMAT)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn a_stale_cache_says_so_with_its_age() {
        let since = UNIX_EPOCH + Duration::from_secs(1_767_225_599);
        let cache = CacheStatus {
            file: Some("/c/catalog-v1-0123456789ab.xds".into()),
            stale_since: Some(since),
            ..CacheStatus::default()
        };
        let v = cache_json(&cache, since + Duration::from_secs(185));
        assert_eq!(v["file"], "/c/catalog-v1-0123456789ab.xds");
        assert_eq!(v["stale_since"], "2025-12-31T23:59:59.000Z");
        assert_eq!(
            v["stale"],
            "stale since 2025-12-31T23:59:59.000Z: serving the config cached in \
             /c/catalog-v1-0123456789ab.xds (written 3m05s ago) because no control server has \
             answered since this client started"
        );
        assert_eq!(v["saved_at"], Value::Null);
        let fresh = CacheStatus {
            file: cache.file.clone(),
            saved_at: Some(since),
            ..CacheStatus::default()
        };
        let v = cache_json(&fresh, since);
        assert_eq!(v["stale"], Value::Null);
        assert_eq!(v["stale_since"], Value::Null);
        assert_eq!(v["saved_at"], "2025-12-31T23:59:59.000Z");
        let off = cache_json(&CacheStatus::default(), since);
        assert_eq!(off["file"], Value::Null);
    }

    #[test]
    fn durations_are_written_as_protobuf_json_does() {
        assert_eq!(duration(Duration::from_secs(3)), "3s");
        assert_eq!(duration(Duration::from_millis(250)), "0.250s");
        assert_eq!(duration(Duration::from_micros(1_500_001)), "1.500001s");
        assert_eq!(duration(Duration::new(1, 7)), "1.000000007s");
    }

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2024-02-29T12:34:56.789Z: a leap day.
        let t = UNIX_EPOCH + Duration::from_millis(1_709_210_096_789);
        assert_eq!(rfc3339(t), "2024-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(t), "2000-02-29T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_767_225_599); // 2025-12-31T23:59:59
        assert_eq!(rfc3339(t), "2025-12-31T23:59:59.000Z");
    }
}

//! The access log: one JSON line per request, through `tracing`.
//!
//! The fields are Envoy's (and Istio's JSON access log's) names for the
//! same facts
//! ([Envoy access log format](https://www.envoyproxy.io/docs/envoy/latest/configuration/observability/access_log/usage)):
//! `start_time`, `method`, `path`, `protocol`, `response_code`,
//! `response_flags`, `bytes_received`, `bytes_sent`, `duration` (ms),
//! `upstream_host`, `upstream_cluster`, `route_name`, `authority`,
//! `user_agent`, `request_id` (`x-request-id`), `trace_id`, plus
//! `direction` (`outbound` from the client stack, `inbound` from the server
//! stack), `grpc_status`, `attempts` and `downstream_remote_address`. On
//! the server side, `downstream_peer_principal` (the client's verified
//! SPIFFE ID), and for a request authorization denied
//! `response_code_details` as Envoy's RBAC filter writes it:
//! `rbac_access_denied_matched_policy[<namespace>/<name>]` (`[none]` when
//! no ALLOW policy matched). When dry-run authorization policies
//! (`istio.io/dry-run`) were evaluated, what they would have decided, under
//! the names of the dynamic metadata Envoy's RBAC filter writes for the
//! shadow rules Istio generates (stat prefixes `istio_dry_run_allow_` and
//! `istio_dry_run_deny_`): `istio_dry_run_{allow,deny}_shadow_effective_policy_id`
//! (the matching dry-run policy, `<namespace>/<name>`, or `null`) and
//! `istio_dry_run_{allow,deny}_shadow_engine_result` (`allowed` / `denied`).
//!
//! Each line is the message of an INFO event with target
//! [`ACCESS_LOG_TARGET`]; route it with a `tracing_subscriber` filter
//! (`proxyless::access=info`) and a format without time and level to get
//! bare JSON lines. The line is built only when that event is enabled.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::{Method, Version};
use opentelemetry::trace::TraceContextExt as _;
use serde_json::{Map, Value, json};

use super::flags::ResponseFlags;
use super::record::{DecisionRecord, shadow_result};

/// The `tracing` target of access log events.
pub const ACCESS_LOG_TARGET: &str = "proxyless::access";

/// The request side of a line, captured when the request starts.
#[derive(Debug)]
pub(crate) struct AccessInfo {
    pub(crate) start_time: SystemTime,
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) authority: Option<String>,
    pub(crate) protocol: Version,
    pub(crate) request_id: Option<String>,
    pub(crate) user_agent: Option<String>,
    pub(crate) downstream: Option<SocketAddr>,
}

/// Everything one line says.
pub(crate) struct Line<'a> {
    pub(crate) info: &'a AccessInfo,
    pub(crate) outbound: bool,
    pub(crate) record: &'a DecisionRecord,
    pub(crate) response_code: u16,
    pub(crate) grpc_status: Option<i32>,
    pub(crate) flags: ResponseFlags,
    pub(crate) bytes_received: u64,
    pub(crate) bytes_sent: u64,
    pub(crate) duration: Duration,
}

/// Writes the line, if the access log event is enabled.
pub(crate) fn write(line: &Line<'_>) {
    if tracing::enabled!(target: ACCESS_LOG_TARGET, tracing::Level::INFO) {
        let text = to_json(line).to_string();
        tracing::info!(target: ACCESS_LOG_TARGET, "{text}");
    }
}

fn to_json(line: &Line<'_>) -> Value {
    let info = line.info;
    let mut m = Map::new();
    m.insert("start_time".into(), json!(rfc3339(info.start_time)));
    m.insert(
        "direction".into(),
        json!(if line.outbound { "outbound" } else { "inbound" }),
    );
    m.insert("method".into(), json!(info.method.as_str()));
    m.insert("path".into(), json!(info.path));
    m.insert("protocol".into(), json!(protocol(info.protocol)));
    m.insert("response_code".into(), json!(line.response_code));
    m.insert("response_flags".into(), json!(line.flags.to_string()));
    m.insert("grpc_status".into(), json!(line.grpc_status));
    m.insert("bytes_received".into(), json!(line.bytes_received));
    m.insert("bytes_sent".into(), json!(line.bytes_sent));
    m.insert(
        "duration".into(),
        json!(u64::try_from(line.duration.as_millis()).unwrap_or(u64::MAX)),
    );
    m.insert(
        "upstream_host".into(),
        json!(line.record.endpoint().map(|(addr, _)| addr.to_string())),
    );
    m.insert(
        "upstream_cluster".into(),
        json!(line.record.cluster_name().map(|c| c.to_string())),
    );
    m.insert(
        "route_name".into(),
        json!(line.record.route_name().map(|r| r.to_string())),
    );
    m.insert("attempts".into(), json!(line.record.attempts()));
    m.insert("authority".into(), json!(info.authority));
    m.insert("user_agent".into(), json!(info.user_agent));
    m.insert("request_id".into(), json!(info.request_id));
    m.insert(
        "downstream_remote_address".into(),
        json!(info.downstream.map(|a| a.to_string())),
    );
    if !line.outbound {
        m.insert(
            "downstream_peer_principal".into(),
            json!(line.record.peer_principal_id().map(|p| p.to_string())),
        );
        let details = match line.record.authorization_decision() {
            Some((false, policy)) => Some(format!(
                "rbac_access_denied_matched_policy[{}]",
                policy.map_or("none", |p| &**p)
            )),
            _ => None,
        };
        m.insert("response_code_details".into(), json!(details));
        if let Some(dry_run) = line.record.dry_run_result() {
            for (prefix, result) in [
                ("istio_dry_run_allow_", &dry_run.allow),
                ("istio_dry_run_deny_", &dry_run.deny),
            ] {
                let Some(result) = result else { continue };
                m.insert(
                    format!("{prefix}shadow_effective_policy_id"),
                    json!(result.policy.as_deref()),
                );
                m.insert(
                    format!("{prefix}shadow_engine_result"),
                    json!(shadow_result(result.allowed)),
                );
            }
        }
    }
    let trace_id = line
        .record
        .trace()
        .map(|t| t.cx.span().span_context().trace_id().to_string());
    m.insert("trace_id".into(), json!(trace_id));
    Value::Object(m)
}

/// Envoy's `%PROTOCOL%`.
fn protocol(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// `2026-11-23T09:41:05.123Z`.
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
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_426_865_123);
        assert_eq!(rfc3339(t), "2026-11-23T09:41:05.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn lines_carry_envoys_fields() {
        let record = DecisionRecord::new();
        record.cluster(
            &"outbound|80||catalog".into(),
            mesh_core::model::LbPolicy::Random,
        );
        let info = AccessInfo {
            start_time: UNIX_EPOCH,
            method: Method::GET,
            path: "/items?page=2".into(),
            authority: Some("catalog".into()),
            protocol: Version::HTTP_11,
            request_id: Some("abc".into()),
            user_agent: None,
            downstream: None,
        };
        let v = to_json(&Line {
            info: &info,
            outbound: true,
            record: &record,
            response_code: 503,
            grpc_status: None,
            flags: ResponseFlags::UPSTREAM_OVERFLOW,
            bytes_received: 3,
            bytes_sent: 19,
            duration: Duration::from_millis(12),
        });
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/items?page=2");
        assert_eq!(v["protocol"], "HTTP/1.1");
        assert_eq!(v["response_code"], 503);
        assert_eq!(v["response_flags"], "UO");
        assert_eq!(v["upstream_cluster"], "outbound|80||catalog");
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["duration"], 12);
        assert_eq!(v["direction"], "outbound");
        assert!(v["trace_id"].is_null());
        assert!(v.get("response_code_details").is_none());
    }

    #[test]
    fn inbound_denials_name_the_policy() {
        let record = DecisionRecord::new();
        record.peer_principal(&"spiffe://cluster.local/ns/shop/sa/frontend".into());
        record.authorization(false, Some(&"shop/deny-payments".into()));
        let info = AccessInfo {
            start_time: UNIX_EPOCH,
            method: Method::POST,
            path: "/pay".into(),
            authority: Some("payment".into()),
            protocol: Version::HTTP_2,
            request_id: None,
            user_agent: None,
            downstream: None,
        };
        let v = to_json(&Line {
            info: &info,
            outbound: false,
            record: &record,
            response_code: 403,
            grpc_status: None,
            flags: ResponseFlags::empty(),
            bytes_received: 0,
            bytes_sent: 19,
            duration: Duration::from_millis(1),
        });
        assert_eq!(
            v["response_code_details"],
            "rbac_access_denied_matched_policy[shop/deny-payments]"
        );
        assert_eq!(
            v["downstream_peer_principal"],
            "spiffe://cluster.local/ns/shop/sa/frontend"
        );
    }
}

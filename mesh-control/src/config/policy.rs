//! The resilience fields of VirtualService and DestinationRule, read into
//! the mesh-core model.
//!
//! VirtualService `http[]` (<https://istio.io/latest/docs/reference/config/networking/virtual-service/>):
//! `timeout`, `retries` and `fault`. DestinationRule `trafficPolicy`
//! (<https://istio.io/latest/docs/reference/config/networking/destination-rule/>):
//! `loadBalancer` (`simple`, `consistentHash`, `localityLbSetting` and
//! `warmupDurationSecs`, the last two read in `locality.rs`),
//! `connectionPool`, `outlierDetection`, `retryBudget` (Istio 1.27) and
//! `portLevelSettings`.
//!
//! # Istio semantics kept
//!
//! - A route without `retries` gets Istio's default policy
//!   ([`RetryPolicy::istio_default`]: 2 retries on connect-failure,
//!   refused-stream, unavailable, cancelled and 503). `retries.attempts` is
//!   the number of retries; `attempts: 0` (or absent) disables retries, and
//!   then setting `perTryTimeout`, `retryOn`, `retryRemoteLocalities` or
//!   `backoff` is an error, as Istio's validation says. Fields left out of a
//!   `retries` block keep the default's values (Istio's `ConvertPolicy`
//!   starts from the default policy). `retryOn` is a comma-separated list of
//!   Envoy conditions and HTTP status codes; a code (`"503"`) adds it to the
//!   retriable status codes and turns on `retriable-status-codes`.
//!   `backoff` sets the base interval; the cap is Envoy's 10 × base.
//! - `timeout: 0s` means no timeout, Istio's default.
//! - A fault `percentage` left out means no request is affected (Istio's
//!   documented default); `fixedDelay` is required for a delay, and an abort
//!   needs exactly one of `httpStatus` (200–599) or `grpcStatus` (a name such
//!   as `UNAVAILABLE`, or a code 0–16).
//! - A subset's `trafficPolicy` overrides the rule's one top-level field at a
//!   time (`loadBalancer`, `connectionPool`, `outlierDetection`,
//!   `retryBudget`, `tls`), each replaced whole, as Istio's
//!   `MergeTrafficPolicy` does.
//! - `portLevelSettings`: the entry for a port replaces `loadBalancer`,
//!   `connectionPool`, `outlierDetection` and `tls` whole for that port's
//!   clusters, a field it leaves out taking the default, not the top-level
//!   value (Istio's `GetPortLevelTrafficPolicy`); a subset's policy then
//!   merges over that, and a subset's own entry for the port replaces the
//!   four fields whole again (`MergeSubsetTrafficPolicy`). `retryBudget` is
//!   not a port-level field and stays. `port.number` is required and a port
//!   may appear once (Istio's validation).
//! - `connectionPool`: `http.idleTimeout`, else `tcp.idleTimeout`, is the
//!   idle timeout (Istio's `applyConnectionPool`); `tcp.tcpKeepalive`
//!   turns `SO_KEEPALIVE` on (its `probes`, `time`, `interval` replace the
//!   OS defaults); `tcp.maxConnectionDuration` drains connections that old;
//!   `http.h2UpgradePolicy: UPGRADE` makes an HTTP/1.1 port speak HTTP/2
//!   (DEFAULT follows Istio's mesh default, no upgrade);
//!   `http.maxConcurrentStreams` caps the streams of each HTTP/2
//!   connection and, as in Istio, applies to HTTP/2 clusters only —
//!   upgraded ones included, unlike Istio, whose `applyConnectionPool`
//!   runs before `applyH2Upgrade` and so leaves an upgraded cluster
//!   without it. `useClientProtocol` and `http2KeepAlive` are not
//!   supported yet.
//! - `tls.mode` defaults to `DISABLE`, as in Istio. `ISTIO_MUTUAL` uses the
//!   mesh's own certificates (`subjectAltNames` are SPIFFE IDs); `SIMPLE`
//!   and `MUTUAL` use PEM files on the client (`caCertificates`,
//!   `clientCertificate`, `privateKey`; `subjectAltNames` are DNS names or
//!   URIs). Without `caCertificates` the server is verified against the
//!   system's roots of the client's machine, as Istio's sidecar does
//!   (`check` notes it). Stricter than Istio: file fields a mode does not
//!   use are errors, `credentialName` (Kubernetes secrets),
//!   `insecureSkipVerify: true` and `caCrl` are reported as not supported.
//! - `outlierDetection`: `consecutive5xxErrors` defaults to 5 (0 disables
//!   it), `consecutiveGatewayErrors` is off unless set, `interval` 10 s,
//!   `baseEjectionTime` 30 s, `maxEjectionPercent` 10 (0 means the default,
//!   as in Istio), `minHealthPercent` 0.
//! - Locality failover: `localityLbSetting.enabled` decides; when it is not
//!   set, failover follows Istio's mesh default (locality load balancing
//!   enabled), which takes effect only with `outlierDetection` — so a
//!   cluster with outlier detection fails over by locality unless
//!   `localityLbSetting.enabled: false` says otherwise.
//! - `consistentHash` makes the cluster ring-hash
//!   (`minimumRingSize`, or `ringHash.minimumRingSize`, default 1024) and
//!   gives its hash key to the routes that send to it (see `translate.rs`).
//! - `retryBudget.percent` defaults to 20 and `minRetryConcurrency` to 3
//!   (Envoy's defaults, which Istio keeps).
//!
//! # Stricter than Istio
//!
//! - `connectionPool` numbers must be positive: Istio reads 0 as "unset",
//!   which looks like "none allowed"; leave the field out instead.
//! - `tcpKeepalive.time` and `interval` must be whole seconds (Envoy counts
//!   them in seconds; Istio truncates silently).
//! - Durations have millisecond precision, as Istio validates them, and are
//!   written as Go/Istio duration strings (`1s`, `100ms`, `1.5s`, `2m`,
//!   `1h`, `1m30s`).

use std::sync::Arc;
use std::time::Duration;

use mesh_core::model::{
    AbortStatus, ClientCertificateFiles, Cluster, FaultAbort, FaultDelay, FaultPolicy, FileTls,
    Fraction, HashPolicy, LbPolicy, Name, OutlierDetection, Pattern, RetryBudget, RetryOn,
    RetryPolicy, TcpKeepalive, ValueMatch,
};
use mesh_core::spiffe::SpiffeId;
use saphyr::{Scalar, YamlData};

use super::yaml::{Field, Fields, Look, Sink};

// ------------------------------------------------------------------ durations

/// The smallest value a duration field accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Floor {
    /// `0s` is allowed (and usually means "disabled").
    Zero,
    /// At least `1ms` (Istio: "MUST be >=1ms").
    OneMs,
}

/// Parses a Go / Istio duration string: one or more `<number><unit>` parts
/// (`1h30m`, `1.5s`, `100ms`), units `ns`, `us` (`µs`), `ms`, `s`, `m`, `h`;
/// `0` alone is zero. On failure: why.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, &'static str> {
    if text == "0" {
        return Ok(Duration::ZERO);
    }
    if text.starts_with('-') {
        return Err("it is negative");
    }
    if text.is_empty() {
        return Err("it is empty");
    }
    let mut rest = text;
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(f) => f.split_at(f.bytes().take_while(u8::is_ascii_digit).count()),
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err("a number is expected before each unit");
        }
        // Units are ASCII letters, or `µ`/`μ` followed by `s`: the split
        // point is a digit, a dot, or the end, so it is a char boundary.
        let unit_len = after
            .bytes()
            .take_while(|b| !b.is_ascii_digit() && *b != b'.')
            .count();
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err("a unit is missing"),
            _ => return Err("the unit is not one of ns, us, ms, s, m, h"),
        };
        if int.len() > 20 {
            return Err("it is too large");
        }
        let whole: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| "it is too large")?
        };
        // Digits past nanosecond precision do not matter (Go drops them too).
        let frac = &frac[..frac.len().min(18)];
        let frac_nanos: u128 = if frac.is_empty() {
            0
        } else {
            let digits: u128 = frac.parse().map_err(|_| "it is not a number")?;
            let scale = 10u128.pow(u32::try_from(frac.len()).unwrap_or(18));
            digits * unit_nanos / scale
        };
        nanos = nanos
            .checked_add(whole.checked_mul(unit_nanos).ok_or("it is too large")?)
            .and_then(|n| n.checked_add(frac_nanos))
            .ok_or("it is too large")?;
        rest = after;
    }
    let nanos = u64::try_from(nanos).map_err(|_| "it is too large")?;
    Ok(Duration::from_nanos(nanos))
}

/// Reads `warmupDurationSecs` (a duration of at least 1ms).
fn parse_warmup(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Duration> {
    duration(sink, field, Floor::OneMs)
}

/// Reads a duration field; problems are reported at the value's line.
pub(crate) fn duration(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
    floor: Floor,
) -> Option<Duration> {
    let text = match &field.node.data {
        YamlData::Value(Scalar::String(s)) => s.to_string(),
        YamlData::Value(Scalar::Integer(0)) => "0".to_string(),
        _ => {
            sink.error(
                field.line(),
                format!(
                    "'{}' must be a duration such as 1s, 100ms, 1.5s, 2m or 1h",
                    field.path
                ),
            );
            return None;
        }
    };
    let d = match parse_duration(&text) {
        Ok(d) => d,
        Err(why) => {
            sink.error(
                field.line(),
                format!(
                    "'{}': '{text}' is not a duration: {why} (write e.g. 1s, 100ms, 1.5s, 2m or 1h)",
                    field.path
                ),
            );
            return None;
        }
    };
    if d.subsec_nanos() % 1_000_000 != 0 {
        sink.error(
            field.line(),
            format!(
                "'{}': '{text}' is finer than a millisecond (durations have millisecond precision)",
                field.path
            ),
        );
        return None;
    }
    if floor == Floor::OneMs && d < Duration::from_millis(1) {
        sink.error(
            field.line(),
            format!("'{}' must be at least 1ms, found '{text}'", field.path),
        );
        return None;
    }
    Some(d)
}

/// The last segment of a field path: its key.
fn key_of<'p>(field: &Field<'p, '_, '_>) -> &'p str {
    field.path.rsplit('.').next().unwrap_or(field.path)
}

/// Of several mutually exclusive fields, the ones present, in document order.
fn present_of<'f, 'n, 'a>(f: &'f Fields<'n, 'a>, keys: &[&str]) -> Vec<Field<'f, 'n, 'a>> {
    f.present()
        .filter(|field| keys.contains(&key_of(field)))
        .collect()
}

/// Istio's `Percent` (`{value: 20}`): a fraction; absent means 0%.
pub(crate) fn percentage(
    sink: &mut Sink<'_>,
    field: Option<Field<'_, '_, '_>>,
) -> Option<Fraction> {
    let Some(field) = field else {
        return Some(Fraction::default());
    };
    let p = Fields::of(sink, field, &["value"], &[])?;
    match p.get("value") {
        Some(v) => percent_number(sink, v),
        None => Some(Fraction::default()),
    }
}

/// A number 0–100, fractions allowed.
fn percent_number(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Fraction> {
    let n = field.number(sink)?;
    let fraction = Fraction::from_percent(n);
    if fraction.is_none() {
        sink.error(
            field.line(),
            format!("'{}': {n} is not a percentage (0 to 100)", field.path),
        );
    }
    fraction
}

// ---------------------------------------------------------- VirtualService

/// `http[].timeout`: `None` for `0s` (no timeout).
pub(crate) fn parse_timeout(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Duration> {
    duration(sink, field, Floor::Zero).filter(|d| !d.is_zero())
}

/// The `retryOn` conditions Envoy defines that this mesh does not implement.
const UNSUPPORTED_RETRY_ON: [&str; 4] = [
    "retriable-headers",
    "envoy-ratelimited",
    "http3-post-connect-failure",
    "reset-before-request",
];

/// `retries.retryOn`: conditions, plus status codes (which imply
/// `retriable-status-codes`).
fn parse_retry_on(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<(RetryOn, Vec<u16>)> {
    let text = match &field.node.data {
        YamlData::Value(Scalar::String(s)) => s.to_string(),
        // `retryOn: 503` is read by YAML as a number.
        YamlData::Value(Scalar::Integer(i)) => i.to_string(),
        _ => {
            field.string(sink)?;
            return None;
        }
    };
    let before = sink.count();
    let mut on = RetryOn::empty();
    let mut codes: Vec<u16> = Vec::new();
    for part in text.split(',').map(str::trim) {
        if part.is_empty() {
            sink.error(
                field.line(),
                format!("'{}': empty condition in '{text}'", field.path),
            );
        } else if part.bytes().all(|b| b.is_ascii_digit()) {
            match part.parse::<u16>() {
                Ok(code) if (100..=599).contains(&code) => {
                    if !codes.contains(&code) {
                        codes.push(code);
                    }
                }
                _ => sink.error(
                    field.line(),
                    format!(
                        "'{}': '{part}' is not an HTTP status code (100-599)",
                        field.path
                    ),
                ),
            }
        } else if let Some(flag) = RetryOn::from_name(part) {
            on |= flag;
        } else if UNSUPPORTED_RETRY_ON.contains(&part) {
            sink.error(
                field.line(),
                format!(
                    "'{}': retry condition '{part}' is not supported yet",
                    field.path
                ),
            );
        } else {
            let known: Vec<&str> = RetryOn::NAMES.iter().map(|(n, _)| *n).collect();
            sink.error(
                field.line(),
                format!(
                    "'{}': unknown retry condition '{part}' (expected {}, or an HTTP status code)",
                    field.path,
                    known.join(", ")
                ),
            );
        }
    }
    if !codes.is_empty() {
        on |= RetryOn::RETRIABLE_STATUS_CODES;
    }
    (sink.count() == before).then_some((on, codes))
}

/// `http[].retries`: `None` when retries are disabled (`attempts` 0 or
/// absent) or on a problem (reported).
pub(crate) fn parse_retries(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<RetryPolicy> {
    let f = Fields::of(
        sink,
        field,
        &[
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
            "backoff",
        ],
        &[],
    )?;
    let mut policy = RetryPolicy::istio_default();
    let attempts_field = f.get("attempts");
    let attempts = match attempts_field {
        Some(a) => a.integer_in(sink, 0, i64::from(i32::MAX), "")?,
        None => 0,
    };
    policy.num_retries = u32::try_from(attempts).unwrap_or(0);
    if let Some(t) = f.get("perTryTimeout") {
        policy.per_try_timeout = duration(sink, t, Floor::OneMs);
    }
    if let Some(r) = f.get("retryOn")
        && let Some((on, codes)) = parse_retry_on(sink, r)
    {
        policy.retry_on = on;
        policy.retriable_status_codes = Arc::from(codes);
    }
    if let Some(r) = f.get("retryRemoteLocalities") {
        policy.retry_remote_localities = r.boolean(sink).unwrap_or(false);
    }
    if let Some(r) = f.get("retryIgnorePreviousHosts")
        && r.boolean(sink) == Some(false)
    {
        sink.error(
            r.line(),
            format!(
                "'{}: false' is not supported yet (a retry always prefers another endpoint)",
                r.path
            ),
        );
    }
    if let Some(b) = f.get("backoff")
        && let Some(base) = duration(sink, b, Floor::OneMs)
    {
        policy.backoff_base = base;
        policy.backoff_max = base.saturating_mul(10);
    }
    if attempts == 0 {
        let set: Vec<&str> = [
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "backoff",
        ]
        .into_iter()
        .filter(|k| f.get(k).is_some())
        .collect();
        if !set.is_empty() {
            sink.error(
                attempts_field.map_or(f.line, |a| a.line()),
                format!(
                    "'{}': retries are disabled (attempts is 0) but {} is set; set attempts to the number of retries",
                    f.path,
                    set.join(", ")
                ),
            );
        }
        return None;
    }
    Some(policy)
}

/// gRPC status names (<https://grpc.github.io/grpc/core/md_doc_statuscodes.html>), by code.
const GRPC_STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// `abort.grpcStatus`: a name (`UNAVAILABLE`) or a code (`14`).
fn grpc_status(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<u32> {
    let text = match &field.node.data {
        YamlData::Value(Scalar::String(s)) => s.to_string(),
        YamlData::Value(Scalar::Integer(i)) => i.to_string(),
        _ => {
            field.string(sink)?;
            return None;
        }
    };
    let code = match text.parse::<u32>() {
        Ok(n) => (n <= 16).then_some(n),
        Err(_) => GRPC_STATUS_NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(&text))
            .and_then(|i| u32::try_from(i).ok()),
    };
    if code.is_none() {
        sink.error(
            field.line(),
            format!(
                "'{}': unknown gRPC status '{text}' (expected a name such as UNAVAILABLE, or a code 0-16)",
                field.path
            ),
        );
    }
    code
}

/// `http[].fault`.
pub(crate) fn parse_fault(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<FaultPolicy> {
    let f = Fields::of(sink, field, &["delay", "abort"], &[])?;
    let delay = f.get("delay").and_then(|d| {
        let d = Fields::of(
            sink,
            d,
            &["fixedDelay", "percentage"],
            &["exponentialDelay", "percent"],
        )?;
        let fraction = percentage(sink, d.get("percentage"));
        let delay = d
            .require(sink, "fixedDelay")
            .and_then(|x| duration(sink, x, Floor::OneMs));
        Some(FaultDelay {
            fraction: fraction?,
            delay: delay?,
        })
    });
    let abort = f.get("abort").and_then(|a| {
        let a = Fields::of(
            sink,
            a,
            &["httpStatus", "grpcStatus", "percentage"],
            &["http2Error"],
        )?;
        let fraction = percentage(sink, a.get("percentage"));
        let status = match present_of(&a, &["httpStatus", "grpcStatus"]).as_slice() {
            [] => {
                sink.error(
                    a.line,
                    format!("'{}' needs httpStatus or grpcStatus", a.path),
                );
                None
            }
            [one] if key_of(one) == "httpStatus" => one
                .integer_in(sink, 200, 599, "")
                .and_then(|n| u16::try_from(n).ok())
                .map(AbortStatus::Http),
            [one] => grpc_status(sink, *one).map(AbortStatus::Grpc),
            [_, second, ..] => {
                sink.error(
                    second.key_line,
                    format!(
                        "'{}': only one of httpStatus or grpcStatus may be set",
                        a.path
                    ),
                );
                None
            }
        };
        Some(FaultAbort {
            fraction: fraction?,
            status: status?,
        })
    });
    if f.get("delay").is_none() && f.get("abort").is_none() {
        sink.error(
            f.line,
            format!("'{}' needs a delay, an abort or both", f.path),
        );
        return None;
    }
    Some(FaultPolicy { delay, abort })
}

// ---------------------------------------------------------- DestinationRule

/// A DestinationRule's (or subset's) `trafficPolicy`: each top-level field
/// is `None` when not set, so that a subset's policy can be merged over the
/// rule's one field at a time.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TrafficPolicy {
    pub(crate) load_balancer: Option<LoadBalancer>,
    /// Boxed: most rules set none, and it would make every resource bigger.
    pub(crate) connection_pool: Option<Box<ConnectionPool>>,
    pub(crate) outlier_detection: Option<OutlierDetection>,
    pub(crate) retry_budget: Option<RetryBudget>,
    /// `tls`: `None` when not set (auto mTLS decides, see `translate.rs`).
    pub(crate) tls: Option<ClientTls>,
    /// `portLevelSettings`, each port once.
    pub(crate) port_level: Vec<PortPolicy>,
}

/// One `portLevelSettings` entry: `loadBalancer`, `connectionPool`,
/// `outlierDetection` and `tls` for one port of the service (in `policy`;
/// its `retry_budget` and `port_level` stay empty).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PortPolicy {
    pub(crate) port: u16,
    pub(crate) policy: TrafficPolicy,
}

/// `trafficPolicy.tls`: how clients secure connections to the service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientTls {
    /// `mode` and the fields that go with it.
    pub(crate) mode: ClientTlsMode,
    /// `sni`: replaces Istio's `outbound_.<port>_.<subset>_.<host>`
    /// (ISTIO_MUTUAL) or the service host (SIMPLE / MUTUAL).
    pub(crate) sni: Option<String>,
}

/// `trafficPolicy.tls.mode`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientTlsMode {
    /// `DISABLE`: plaintext.
    Disable,
    /// `ISTIO_MUTUAL`; `subjectAltNames`: the SPIFFE IDs the servers may
    /// present, replacing the service's allowed service accounts.
    IstioMutual { subject_alt_names: Vec<SpiffeId> },
    /// `SIMPLE` (no client certificate) or `MUTUAL`: certificate files
    /// (boxed: rare, and it would make every DestinationRule bigger).
    Files(Box<FileTls>),
}

/// `trafficPolicy.loadBalancer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoadBalancer {
    /// `simple`, or ring hash for `consistentHash`; least request when neither.
    pub(crate) policy: LbPolicy,
    /// The `consistentHash` key.
    pub(crate) hash: Option<HashPolicy>,
    /// `localityLbSetting.enabled`.
    pub(crate) locality_enabled: Option<bool>,
    /// `localityLbSetting` `distribute` / `failover` / `failoverPriority`
    /// (see `locality.rs`); `None` when none is set.
    /// Boxed: rare, and every DestinationRule would be bigger.
    pub(crate) locality: Option<Box<super::locality::LocalitySetting>>,
    /// `warmupDurationSecs`: slow start for new endpoints.
    pub(crate) warmup: Option<Duration>,
}

/// `trafficPolicy.connectionPool`; `None` = Istio's default (no limit).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ConnectionPool {
    pub(crate) max_connections: Option<u32>,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) max_pending_requests: Option<u32>,
    pub(crate) max_requests: Option<u32>,
    pub(crate) max_retries: Option<u32>,
    pub(crate) max_requests_per_connection: Option<u32>,
    /// `http.idleTimeout`.
    pub(crate) idle_timeout: Option<Duration>,
    /// `tcp.idleTimeout`: the idle timeout when `http.idleTimeout` is not
    /// set (Istio's `applyConnectionPool`; both are Envoy's
    /// `common_http_protocol_options.idle_timeout`).
    pub(crate) tcp_idle_timeout: Option<Duration>,
    /// `tcp.tcpKeepalive`.
    pub(crate) tcp_keepalive: Option<TcpKeepalive>,
    /// `tcp.maxConnectionDuration`.
    pub(crate) max_connection_duration: Option<Duration>,
    /// `http.maxConcurrentStreams`.
    pub(crate) max_concurrent_streams: Option<u32>,
    /// `http.h2UpgradePolicy`: `Some(true)` for UPGRADE, `Some(false)` for
    /// DO_NOT_UPGRADE, `None` for DEFAULT (Istio's mesh default: no upgrade).
    pub(crate) h2_upgrade: Option<bool>,
}

impl TrafficPolicy {
    /// The locality settings a cluster with this policy follows, if any.
    pub(crate) fn locality_setting(&self) -> Option<&super::locality::LocalitySetting> {
        let lb = self.load_balancer.as_ref()?;
        if lb.locality_enabled == Some(false) {
            return None;
        }
        lb.locality.as_deref()
    }

    /// Cluster fields from the locality and warmup settings: the client's
    /// own locality ordering off when the server computes the priorities,
    /// and slow start.
    pub(crate) fn apply_locality(&self, cluster: &mut Cluster) {
        if self.locality_setting().is_some() {
            cluster.locality_failover = false;
        }
        if let Some(lb) = &self.load_balancer
            && matches!(lb.policy, LbPolicy::RoundRobin | LbPolicy::LeastRequest)
        {
            cluster.slow_start = lb.warmup;
        }
    }

    /// `subset` over `self`, one top-level field at a time (Istio's
    /// `MergeTrafficPolicy`: a field the subset sets replaces the rule's whole).
    pub(crate) fn merged(&self, subset: &TrafficPolicy) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: subset
                .load_balancer
                .clone()
                .or_else(|| self.load_balancer.clone()),
            connection_pool: subset
                .connection_pool
                .clone()
                .or_else(|| self.connection_pool.clone()),
            outlier_detection: subset
                .outlier_detection
                .clone()
                .or_else(|| self.outlier_detection.clone()),
            retry_budget: subset
                .retry_budget
                .clone()
                .or_else(|| self.retry_budget.clone()),
            tls: subset.tls.clone().or_else(|| self.tls.clone()),
            port_level: Vec::new(),
        }
    }

    /// The policy for the clusters of `port`: its `portLevelSettings` entry
    /// replaces `loadBalancer`, `connectionPool`, `outlierDetection` and
    /// `tls` whole — a field the entry leaves out takes the default, not
    /// the top-level value (Istio's `GetPortLevelTrafficPolicy`: "port
    /// level policies do not inherit"); `retryBudget` (not a port-level
    /// field) stays. Whether an entry matched comes second.
    pub(crate) fn at_port(&self, port: u16) -> (TrafficPolicy, bool) {
        match self.port_level.iter().find(|p| p.port == port) {
            Some(p) => (
                TrafficPolicy {
                    retry_budget: self.retry_budget.clone(),
                    port_level: Vec::new(),
                    ..p.policy.clone()
                },
                true,
            ),
            None => (
                TrafficPolicy {
                    port_level: Vec::new(),
                    ..self.clone()
                },
                false,
            ),
        }
    }

    /// The policy of the cluster of `port` and `subset` (`None`: the whole
    /// service), as Istio's `MergeSubsetTrafficPolicy`: the rule's policy
    /// for the port, with the subset's for the port over it; a subset with
    /// an entry for the port replaces the four port-level fields whole.
    pub(crate) fn for_cluster(&self, subset: Option<&TrafficPolicy>, port: u16) -> TrafficPolicy {
        let (rule, _) = self.at_port(port);
        let Some(subset) = subset else {
            return rule;
        };
        let (subset, port_level) = subset.at_port(port);
        if !port_level {
            return rule.merged(&subset);
        }
        TrafficPolicy {
            retry_budget: subset.retry_budget.clone().or(rule.retry_budget),
            ..subset
        }
    }

    /// The consistent-hash key of requests to a cluster with this policy.
    pub(crate) fn hash_policy(&self) -> Option<&HashPolicy> {
        self.load_balancer.as_ref().and_then(|lb| lb.hash.as_ref())
    }

    /// Sets the fields of `cluster` (built with [`Cluster::new`]'s defaults)
    /// that this policy says something about.
    pub(crate) fn apply(&self, cluster: &mut Cluster) {
        if let Some(lb) = &self.load_balancer {
            cluster.lb_policy = lb.policy;
        }
        if let Some(cp) = &self.connection_pool {
            let cb = &mut cluster.circuit_breakers;
            let limits = [
                (&mut cb.max_connections, cp.max_connections),
                (&mut cb.max_pending_requests, cp.max_pending_requests),
                (&mut cb.max_requests, cp.max_requests),
                (&mut cb.max_retries, cp.max_retries),
            ];
            for (slot, value) in limits {
                if let Some(v) = value {
                    *slot = v;
                }
            }
            let c = &mut cluster.connection;
            c.connect_timeout = cp.connect_timeout;
            c.idle_timeout = cp.idle_timeout.or(cp.tcp_idle_timeout);
            c.max_requests_per_connection = cp.max_requests_per_connection;
            c.tcp_keepalive = cp.tcp_keepalive;
            c.max_connection_duration = cp.max_connection_duration;
            // UPGRADE makes an HTTP/1.1 cluster speak HTTP/2; DO_NOT_UPGRADE
            // leaves a declared HTTP/2 port HTTP/2, as in Istio.
            c.h2_upgrade = cp.h2_upgrade == Some(true) && !cluster.protocol.is_http2();
            // Istio sets it on HTTP/2 clusters only.
            if cluster.protocol.is_http2() || c.h2_upgrade {
                c.max_concurrent_streams = cp.max_concurrent_streams;
            }
        }
        cluster.circuit_breakers.retry_budget = self.retry_budget.clone();
        cluster.outlier_detection = self.outlier_detection.clone();
        // Istio's mesh default enables locality load balancing, and Istio
        // turns it into failover only when outlier detection is set.
        cluster.locality_failover = self
            .load_balancer
            .as_ref()
            .and_then(|lb| lb.locality_enabled)
            .unwrap_or(self.outlier_detection.is_some());
    }
}

/// `trafficPolicy` of a DestinationRule or of one of its subsets.
pub(crate) fn parse_traffic_policy(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
) -> Option<TrafficPolicy> {
    let t = Fields::of(
        sink,
        field,
        &[
            "loadBalancer",
            "connectionPool",
            "outlierDetection",
            "retryBudget",
            "tls",
            "portLevelSettings",
        ],
        &["tunnel", "proxyProtocol"],
    )?;
    let policy = parse_policy_fields(sink, &t);
    let retry_budget = t
        .get("retryBudget")
        .and_then(|f| parse_retry_budget(sink, f));
    let port_level = match t.get("portLevelSettings") {
        Some(f) => parse_port_level(sink, f)?,
        None => Vec::new(),
    };
    Some(TrafficPolicy {
        retry_budget,
        port_level,
        ..policy
    })
}

/// `portLevelSettings`: each entry's `port.number` (required, each port
/// once, as Istio's validation says) and its four policy fields.
fn parse_port_level(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Vec<PortPolicy>> {
    let before = sink.count();
    let mut out: Vec<PortPolicy> = Vec::new();
    let mut lines: Vec<usize> = Vec::new();
    for (path, node) in field.list(sink)? {
        let Some(entry) = Fields::read(
            sink,
            node,
            &path,
            &[
                "port",
                "loadBalancer",
                "connectionPool",
                "outlierDetection",
                "tls",
            ],
            &[],
        ) else {
            continue;
        };
        let port = entry.require(sink, "port").and_then(|p| {
            let p = Fields::of(sink, p, &["number"], &[])?;
            let number = p.require(sink, "number")?;
            number.port(sink).map(|n| (n, number.line()))
        });
        let policy = parse_policy_fields(sink, &entry);
        let Some((port, line)) = port else { continue };
        if let Some(i) = out.iter().position(|p| p.port == port) {
            sink.error(
                line,
                format!(
                    "'{path}.port.number': port {port} already has settings at line {}; \
                     each port may appear once in portLevelSettings",
                    lines[i]
                ),
            );
            continue;
        }
        out.push(PortPolicy { port, policy });
        lines.push(line);
    }
    (sink.count() == before).then_some(out)
}

/// The fields a `trafficPolicy` shares with a `portLevelSettings` entry.
fn parse_policy_fields(sink: &mut Sink<'_>, t: &Fields<'_, '_>) -> TrafficPolicy {
    TrafficPolicy {
        load_balancer: t
            .get("loadBalancer")
            .and_then(|f| parse_load_balancer(sink, f)),
        connection_pool: t
            .get("connectionPool")
            .and_then(|f| parse_connection_pool(sink, f))
            .map(Box::new),
        outlier_detection: t
            .get("outlierDetection")
            .and_then(|f| parse_outlier_detection(sink, f)),
        retry_budget: None,
        tls: t.get("tls").and_then(|f| parse_client_tls(sink, f)),
        port_level: Vec::new(),
    }
}

/// `trafficPolicy.tls` (Istio's `ClientTLSSettings`). `mode` defaults to
/// `DISABLE`, as in Istio. `ISTIO_MUTUAL` uses the mesh's own certificates
/// (`subjectAltNames` are SPIFFE IDs); `SIMPLE` and `MUTUAL` take PEM files
/// on the client's filesystem (`caCertificates`, and for `MUTUAL`
/// `clientCertificate` + `privateKey`), as Istio's sidecar reads them.
/// Stricter than Istio: `caCertificates` is required (verifying against
/// the system's roots is not supported), and file fields a mode does not
/// use are errors rather than ignored.
fn parse_client_tls(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<ClientTls> {
    let before = sink.count();
    let f = Fields::of(
        sink,
        field,
        &[
            "mode",
            "sni",
            "subjectAltNames",
            "clientCertificate",
            "privateKey",
            "caCertificates",
            "credentialName",
            "insecureSkipVerify",
        ],
        &["caCrl"],
    )?;
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Mode {
        Disable,
        IstioMutual,
        Simple,
        Mutual,
    }
    let mode = match f.get("mode") {
        None => Mode::Disable,
        Some(m) => {
            let mode = m.string(sink)?;
            match mode.value.as_str() {
                "ISTIO_MUTUAL" => Mode::IstioMutual,
                "DISABLE" => Mode::Disable,
                "SIMPLE" => Mode::Simple,
                "MUTUAL" => Mode::Mutual,
                other => {
                    sink.error(
                        mode.line,
                        format!(
                            "'{}': unknown TLS mode '{other}' (expected DISABLE, SIMPLE, MUTUAL \
                             or ISTIO_MUTUAL)",
                            m.path
                        ),
                    );
                    return None;
                }
            }
        }
    };
    let files = matches!(mode, Mode::Simple | Mode::Mutual);
    if let Some(c) = f.get("credentialName") {
        sink.error(
            c.key_line,
            format!(
                "'{}' is not supported (no Kubernetes secrets): use clientCertificate/privateKey \
                 (and caCertificates) files",
                c.path
            ),
        );
    }
    if let Some(skip) = f.get("insecureSkipVerify")
        && skip.boolean(sink) == Some(true)
    {
        sink.error(
            skip.key_line,
            format!(
                "'{}: true' is not supported: the server's certificate is always verified",
                skip.path
            ),
        );
    }
    let sni = f.get("sni").and_then(|s| {
        let v = s.string(sink)?;
        let ok = !v.value.is_empty()
            && v.value.len() <= 255
            && v.value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !ok {
            sink.error(
                v.line,
                format!(
                    "'{}': '{}' is not a server name (letters, digits, '-', '_' and '.')",
                    s.path, v.value
                ),
            );
            return None;
        }
        Some((v.value, s.key_line))
    });
    let mut spiffe_ids = Vec::new();
    let mut names: Vec<Name> = Vec::new();
    let mut sans_line = None;
    if let Some(sans) = f.get("subjectAltNames") {
        sans_line = Some(sans.key_line);
        for (path, san) in sans.string_list(sink).unwrap_or_default() {
            if files {
                if san.value.is_empty() || san.value.chars().any(char::is_whitespace) {
                    sink.error(
                        san.line,
                        format!("'{path}': '{}' is not a DNS name or URI", san.value),
                    );
                } else {
                    names.push(Name::from(san.value));
                }
                continue;
            }
            match SpiffeId::parse(&san.value) {
                Ok(id) => spiffe_ids.push(id),
                Err(e) => sink.error(
                    san.line,
                    format!(
                        "'{path}': {e} (ISTIO_MUTUAL verifies SPIFFE IDs; use SIMPLE or MUTUAL \
                         for DNS names)"
                    ),
                ),
            }
        }
    }
    // A file path: a non-empty string (read by the client).
    let mut file = |name: &str| -> Option<(Name, usize)> {
        let field = f.get(name)?;
        let v = field.string(sink)?;
        if v.value.trim().is_empty() {
            sink.error(v.line, format!("'{}' must be a file path", field.path));
            return None;
        }
        Some((Name::from(v.value), field.key_line))
    };
    let client_certificate = file("clientCertificate");
    let private_key = file("privateKey");
    let ca_certificates = file("caCertificates");
    let mode_line = f.get("mode").map_or(f.line, |m| m.key_line);
    let needs = |what: &str| match mode {
        Mode::Disable => format!("'{}.{what}' needs TLS (TLS is disabled)", f.path),
        _ => format!(
            "'{}.{what}' is not used with 'mode: {}'",
            f.path,
            match mode {
                Mode::IstioMutual => "ISTIO_MUTUAL",
                Mode::Simple => "SIMPLE",
                _ => "MUTUAL",
            }
        ),
    };
    let mut unused = Vec::new();
    if mode == Mode::Disable {
        unused.push(("sni", sni.as_ref().map(|(_, l)| *l)));
        unused.push(("subjectAltNames", sans_line));
    }
    if mode != Mode::Mutual {
        unused.push((
            "clientCertificate",
            client_certificate.as_ref().map(|c| c.1),
        ));
        unused.push(("privateKey", private_key.as_ref().map(|c| c.1)));
    }
    if !files {
        unused.push(("caCertificates", ca_certificates.as_ref().map(|c| c.1)));
    }
    for (what, line) in unused {
        if let Some(line) = line {
            let hint = if matches!(what, "clientCertificate" | "privateKey") {
                " (a client certificate needs 'mode: MUTUAL')"
            } else if what == "caCertificates" {
                " (CA files need 'mode: SIMPLE' or 'MUTUAL')"
            } else {
                ""
            };
            sink.error(line, format!("{}{hint}", needs(what)));
        }
    }
    // With credentialName (reported above), the files it stands for are
    // not asked for too. Without caCertificates, SIMPLE and MUTUAL verify
    // the server against the system's roots (as Istio does; `check` notes
    // it, see `client_tls_notes`): never "do not verify".
    let credential = f.get("credentialName").is_some();
    if mode == Mode::Mutual && !credential {
        for (what, present) in [
            ("clientCertificate", client_certificate.is_some()),
            ("privateKey", private_key.is_some()),
        ] {
            // A field that is present but invalid was reported already.
            if !present && f.get(what).is_none() {
                sink.error(
                    mode_line,
                    format!(
                        "'{}': mode MUTUAL needs '{what}' (a PEM file on the client)",
                        f.path
                    ),
                );
            }
        }
    }
    if sink.count() != before {
        return None;
    }
    let mode = match mode {
        Mode::Disable => ClientTlsMode::Disable,
        Mode::IstioMutual => ClientTlsMode::IstioMutual {
            subject_alt_names: spiffe_ids,
        },
        Mode::Simple | Mode::Mutual => ClientTlsMode::Files(Box::new(FileTls {
            ca_certificates: ca_certificates.map(|(ca, _)| ca),
            subject_alt_names: names.into(),
            client_certificate: match (client_certificate, private_key) {
                (Some((chain, _)), Some((key, _))) => Some(ClientCertificateFiles {
                    certificate_chain: chain,
                    private_key: key,
                }),
                _ => None,
            },
        })),
    };
    Some(ClientTls {
        mode,
        sni: sni.map(|(s, _)| s),
    })
}

/// What `check` notes about the `tls` of one `trafficPolicy` (and of its
/// `portLevelSettings`): SIMPLE / MUTUAL without `caCertificates` verify
/// the server against the system's roots of each client's machine, which
/// the YAML does not show and a private CA is not in.
pub(crate) fn client_tls_notes(policy: Look<'_, '_>) -> Vec<(usize, String)> {
    let ports = policy
        .get("portLevelSettings")
        .map(|p| p.items())
        .unwrap_or_default();
    let mut out = Vec::new();
    for tls in std::iter::once(policy)
        .chain(ports)
        .filter_map(|p| p.get("tls"))
    {
        let Some(mode) = tls.get("mode") else {
            continue;
        };
        let name = match mode.text().as_deref() {
            Some("SIMPLE") => "SIMPLE",
            Some("MUTUAL") => "MUTUAL",
            _ => continue,
        };
        if tls.get("caCertificates").is_some() || tls.get("credentialName").is_some() {
            continue;
        }
        out.push((
            mode.line,
            format!(
                "tls.mode {name} without caCertificates: the server's certificate is verified \
                 against the system's roots of each client's machine (the OS trust store: \
                 SSL_CERT_FILE, else {}; Envoy is given that file), as a public API's \
                 certificate is; a server with a private CA needs caCertificates",
                mesh_core::xds::SYSTEM_CA_BUNDLE
            ),
        ));
    }
    out
}

fn parse_load_balancer(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<LoadBalancer> {
    let lb = Fields::of(
        sink,
        field,
        &[
            "simple",
            "consistentHash",
            "localityLbSetting",
            "warmupDurationSecs",
        ],
        &["warmup", "zoneAwareLbSetting"],
    )?;
    let (locality_enabled, locality) = lb
        .get("localityLbSetting")
        .and_then(|l| super::locality::parse(sink, l))
        .unwrap_or_default();
    let warmup = lb
        .get("warmupDurationSecs")
        .and_then(|w| parse_warmup(sink, w));
    let (policy, hash) = match present_of(&lb, &["simple", "consistentHash"]).as_slice() {
        [] => (LbPolicy::LeastRequest, None),
        [one] if key_of(one) == "simple" => (parse_simple(sink, *one)?, None),
        [one] => {
            let (hash, minimum_ring_size) = parse_consistent_hash(sink, *one)?;
            (LbPolicy::RingHash { minimum_ring_size }, Some(hash))
        }
        [_, second, ..] => {
            sink.error(
                second.key_line,
                format!(
                    "'{}': only one of simple or consistentHash may be set",
                    lb.path
                ),
            );
            return None;
        }
    };
    Some(LoadBalancer {
        policy,
        hash,
        locality_enabled,
        locality,
        warmup,
    })
}

fn parse_simple(sink: &mut Sink<'_>, simple: Field<'_, '_, '_>) -> Option<LbPolicy> {
    let s = simple.string(sink)?;
    match s.value.as_str() {
        "ROUND_ROBIN" => Some(LbPolicy::RoundRobin),
        // LEAST_CONN is Istio's deprecated name for LEAST_REQUEST.
        "LEAST_REQUEST" | "LEAST_CONN" | "UNSPECIFIED" => Some(LbPolicy::LeastRequest),
        "RANDOM" => Some(LbPolicy::Random),
        "PASSTHROUGH" => {
            sink.error(
                s.line,
                format!("'{}: PASSTHROUGH' is not supported yet", simple.path),
            );
            None
        }
        other => {
            sink.error(
                s.line,
                format!(
                    "'{}': unknown load balancer '{other}' (expected ROUND_ROBIN, LEAST_REQUEST or RANDOM)",
                    simple.path
                ),
            );
            None
        }
    }
}

/// Envoy's default and largest `minimum_ring_size`.
const DEFAULT_RING_SIZE: u64 = 1024;
const MAX_RING_SIZE: i64 = 8_388_608;

const HASH_KEYS: [&str; 4] = [
    "httpHeaderName",
    "httpCookie",
    "useSourceIp",
    "httpQueryParameterName",
];

/// `loadBalancer.consistentHash`: the hash key and the minimum ring size.
fn parse_consistent_hash(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
) -> Option<(HashPolicy, u64)> {
    let c = Fields::of(
        sink,
        field,
        &[
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
            "ringHash",
            "minimumRingSize",
        ],
        &["maglev"],
    )?;
    let ring = match present_of(&c, &["ringHash", "minimumRingSize"]).as_slice() {
        [] => Some(DEFAULT_RING_SIZE),
        [one] if key_of(one) == "ringHash" => Fields::of(sink, *one, &["minimumRingSize"], &[])
            .and_then(|r| r.get("minimumRingSize").map(|f| ring_size(sink, f)))
            .unwrap_or(Some(DEFAULT_RING_SIZE)),
        [one] => ring_size(sink, *one),
        [_, second, ..] => {
            sink.error(
                second.key_line,
                format!(
                    "'{}': only one of ringHash or minimumRingSize may be set",
                    c.path
                ),
            );
            None
        }
    };
    let hash = match present_of(&c, &HASH_KEYS).as_slice() {
        [] => {
            sink.error(
                c.line,
                format!("'{}' needs one of {}", c.path, or_list(&HASH_KEYS)),
            );
            None
        }
        [one] => parse_hash_key(sink, *one),
        [_, second, ..] => {
            sink.error(
                second.key_line,
                format!(
                    "'{}': only one of {} may be set",
                    c.path,
                    or_list(&HASH_KEYS)
                ),
            );
            None
        }
    };
    Some((hash?, ring?))
}

/// `a, b, c or d`.
fn or_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

/// `minimumRingSize`: 0 means the default.
fn ring_size(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<u64> {
    let n = field.integer_in(sink, 0, MAX_RING_SIZE, "")?;
    Some(match u64::try_from(n) {
        Ok(0) | Err(_) => DEFAULT_RING_SIZE,
        Ok(n) => n,
    })
}

fn parse_hash_key(sink: &mut Sink<'_>, key: Field<'_, '_, '_>) -> Option<HashPolicy> {
    match key_of(&key) {
        "httpHeaderName" => {
            let name = key.string(sink)?;
            let lower = name.value.to_ascii_lowercase();
            if lower.is_empty() || !lower.bytes().all(is_header_name_byte) {
                sink.error(
                    name.line,
                    format!("'{}': '{}' is not a header name", key.path, name.value),
                );
                return None;
            }
            Some(HashPolicy::Header(Arc::from(lower)))
        }
        "httpCookie" => {
            let c = Fields::of(sink, key, &["name", "path", "ttl"], &["attributes"])?;
            let name = c.require(sink, "name").and_then(|n| {
                let s = n.string(sink)?;
                if s.value.is_empty() {
                    sink.error(s.line, format!("'{}' must not be empty", n.path));
                    return None;
                }
                Some(s.value)
            });
            let path = c.get("path").and_then(|p| p.string(sink)).map(|p| p.value);
            let ttl = match c.get("ttl") {
                Some(t) => Some(duration(sink, t, Floor::Zero)?),
                None => None,
            };
            Some(HashPolicy::Cookie {
                name: Arc::from(name?),
                ttl,
                path: path.map(Arc::from),
            })
        }
        "useSourceIp" => match key.boolean(sink)? {
            true => Some(HashPolicy::SourceIp),
            false => {
                sink.error(
                    key.line(),
                    format!(
                        "'{}: false' selects no hash key (set it to true, or use another key)",
                        key.path
                    ),
                );
                None
            }
        },
        _ => {
            let name = key.string(sink)?;
            if name.value.is_empty() {
                sink.error(name.line, format!("'{}' must not be empty", key.path));
                return None;
            }
            Some(HashPolicy::QueryParameter(Arc::from(name.value)))
        }
    }
}

/// A `connectionPool` limit: positive (leave it out for no limit).
fn limit(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<u32> {
    field
        .integer_in(
            sink,
            1,
            i64::from(u32::MAX),
            "leave the field out for no limit",
        )
        .and_then(|n| u32::try_from(n).ok())
}

fn parse_connection_pool(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<ConnectionPool> {
    let cp = Fields::of(sink, field, &["tcp", "http"], &[])?;
    let mut pool = ConnectionPool::default();
    if let Some(tcp) = cp.get("tcp")
        && let Some(t) = Fields::of(
            sink,
            tcp,
            &[
                "maxConnections",
                "connectTimeout",
                "tcpKeepalive",
                "maxConnectionDuration",
                "idleTimeout",
            ],
            &[],
        )
    {
        pool.max_connections = t.get("maxConnections").and_then(|f| limit(sink, f));
        pool.connect_timeout = t
            .get("connectTimeout")
            .and_then(|f| duration(sink, f, Floor::OneMs));
        pool.tcp_keepalive = t
            .get("tcpKeepalive")
            .and_then(|f| parse_tcp_keepalive(sink, f));
        pool.max_connection_duration = t
            .get("maxConnectionDuration")
            .and_then(|f| duration(sink, f, Floor::OneMs));
        pool.tcp_idle_timeout = t
            .get("idleTimeout")
            .and_then(|f| duration(sink, f, Floor::OneMs));
    }
    if let Some(http) = cp.get("http")
        && let Some(h) = Fields::of(
            sink,
            http,
            &[
                "http1MaxPendingRequests",
                "http2MaxRequests",
                "maxRetries",
                "maxRequestsPerConnection",
                "idleTimeout",
                "h2UpgradePolicy",
                "maxConcurrentStreams",
            ],
            &["useClientProtocol", "http2KeepAlive"],
        )
    {
        pool.max_pending_requests = h
            .get("http1MaxPendingRequests")
            .and_then(|f| limit(sink, f));
        pool.max_requests = h.get("http2MaxRequests").and_then(|f| limit(sink, f));
        pool.max_retries = h.get("maxRetries").and_then(|f| limit(sink, f));
        pool.max_requests_per_connection = h
            .get("maxRequestsPerConnection")
            .and_then(|f| limit(sink, f));
        pool.idle_timeout = h
            .get("idleTimeout")
            .and_then(|f| duration(sink, f, Floor::OneMs));
        // Istio's field is an int32, and Envoy's HTTP/2 option at most 2^31 - 1.
        pool.max_concurrent_streams = h.get("maxConcurrentStreams").and_then(|f| {
            f.integer_in(
                sink,
                1,
                i64::from(i32::MAX),
                "leave the field out for no limit",
            )
            .and_then(|n| u32::try_from(n).ok())
        });
        pool.h2_upgrade = h.get("h2UpgradePolicy").and_then(|f| {
            let v = f.string(sink)?;
            match v.value.as_str() {
                "DEFAULT" => None,
                "DO_NOT_UPGRADE" => Some(false),
                "UPGRADE" => Some(true),
                other => {
                    sink.error(
                        v.line,
                        format!(
                            "'{}': unknown policy '{other}' (DEFAULT, DO_NOT_UPGRADE or UPGRADE)",
                            f.path
                        ),
                    );
                    None
                }
            }
        });
    }
    Some(pool)
}

/// `tcp.tcpKeepalive`: `SO_KEEPALIVE` on; `probes`, `time` and `interval`
/// replace the OS defaults. Stricter than Istio, which truncates to
/// seconds: `time` and `interval` must be whole seconds, at least 1s
/// (Envoy counts them in seconds), and `probes` positive.
fn parse_tcp_keepalive(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<TcpKeepalive> {
    let k = Fields::of(sink, field, &["probes", "time", "interval"], &[])?;
    let before = sink.count();
    let probes = k.get("probes").and_then(|f| limit(sink, f));
    let seconds = |sink: &mut Sink<'_>, key: &str| {
        let f = k.get(key)?;
        let d = duration(sink, f, Floor::OneMs)?;
        if d.subsec_nanos() != 0 || d.is_zero() {
            sink.error(
                f.line(),
                format!(
                    "'{}' must be a whole number of seconds, at least 1s (Envoy counts \
                     keepalive times in seconds)",
                    f.path
                ),
            );
            return None;
        }
        Some(d)
    };
    let time = seconds(sink, "time");
    let interval = seconds(sink, "interval");
    (sink.count() == before).then_some(TcpKeepalive {
        probes,
        time,
        interval,
    })
}

fn parse_outlier_detection(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
) -> Option<OutlierDetection> {
    let o = Fields::of(
        sink,
        field,
        &[
            "consecutive5xxErrors",
            "consecutiveGatewayErrors",
            "interval",
            "baseEjectionTime",
            "maxEjectionPercent",
            "minHealthPercent",
        ],
        &[
            "consecutiveErrors",
            "splitExternalLocalOriginErrors",
            "consecutiveLocalOriginFailures",
            "outlierDetectionHttpErrorCodes",
        ],
    )?;
    let before = sink.count();
    // 0 disables a counter; `consecutive5xxErrors` defaults to 5 (Envoy's
    // default, which Istio keeps), `consecutiveGatewayErrors` to off.
    let count = |sink: &mut Sink<'_>, key: &str, default: Option<u32>| match o.get(key) {
        Some(f) => f
            .integer_in(sink, 0, i64::from(u32::MAX), "0 disables it")
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n > 0),
        None => default,
    };
    let consecutive_5xx = count(sink, "consecutive5xxErrors", Some(5));
    let consecutive_gateway_errors = count(sink, "consecutiveGatewayErrors", None);
    let interval = match o.get("interval") {
        Some(f) => duration(sink, f, Floor::OneMs),
        None => Some(Duration::from_secs(10)),
    };
    let base_ejection_time = match o.get("baseEjectionTime") {
        Some(f) => duration(sink, f, Floor::OneMs),
        None => Some(Duration::from_secs(30)),
    };
    let percent = |sink: &mut Sink<'_>, key: &str| match o.get(key) {
        Some(f) => f
            .integer_in(sink, 0, 100, "")
            .and_then(|n| u32::try_from(n).ok()),
        None => Some(0),
    };
    // Istio sets Envoy's max_ejection_percent only when positive: 0 is Envoy's 10%.
    let max_ejection_percent = percent(sink, "maxEjectionPercent").map(|p| match p {
        0 => 10,
        p => p,
    });
    let min_health_percent = percent(sink, "minHealthPercent");
    if sink.count() != before {
        return None;
    }
    Some(OutlierDetection {
        consecutive_5xx,
        consecutive_gateway_errors,
        interval: interval?,
        base_ejection_time: base_ejection_time?,
        max_ejection_percent: max_ejection_percent?,
        min_health_percent: min_health_percent?,
    })
}

/// `trafficPolicy.retryBudget` (Istio 1.27): `percent` is a number (as
/// Istio's CRD has it) or `{value: N}`.
fn parse_retry_budget(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<RetryBudget> {
    let rb = Fields::of(
        sink,
        field,
        &["percent", "minRetryConcurrency"],
        &["budgetInterval"],
    )?;
    let budget = match rb.get("percent") {
        Some(p) if matches!(p.node.data, YamlData::Mapping(_)) => {
            let pf = Fields::of(sink, p, &["value"], &[])?;
            let v = pf.require(sink, "value")?;
            percent_number(sink, v)
        }
        Some(p) => percent_number(sink, p),
        None => Fraction::from_percent(20.0),
    };
    let min_retry_concurrency = match rb.get("minRetryConcurrency") {
        Some(m) => m
            .integer_in(sink, 0, i64::from(u32::MAX), "")
            .and_then(|n| u32::try_from(n).ok()),
        None => Some(3),
    };
    Some(RetryBudget {
        budget: budget?,
        min_retry_concurrency: min_retry_concurrency?,
    })
}

/// Istio's `StringMatch`: one of `exact`, `prefix`, `regex`. An empty mapping
/// means "present" where Istio allows it (headers, query parameters).
///
/// Here, below `resources` and `cors_policy` (both read StringMatches), so
/// that imports run one way.
pub(crate) fn parse_string_match(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
    empty_means_present: bool,
) -> Option<ValueMatch> {
    if empty_means_present && field.node.data.is_null() {
        return Some(ValueMatch::Present(true));
    }
    let before = sink.count();
    let f = Fields::of(sink, field, &["exact", "prefix", "regex"], &[])?;
    let mut set = f.present();
    let Some(first) = set.next() else {
        if empty_means_present {
            return Some(ValueMatch::Present(true));
        }
        if sink.count() != before {
            // A typo'd kind was reported as an unknown field: say it once.
            return None;
        }
        sink.error(
            field.key_line,
            format!("'{}' needs one of exact, prefix or regex", field.path),
        );
        return None;
    };
    if let Some(second) = set.next() {
        sink.error(
            second.key_line,
            format!(
                "'{}': only one of exact, prefix or regex may be set",
                field.path
            ),
        );
        return None;
    }
    let value = first.string(sink)?;
    match first.path.rsplit('.').next() {
        Some("exact") => Some(ValueMatch::Exact(Arc::from(value.value))),
        Some("prefix") => Some(ValueMatch::Prefix(Arc::from(value.value))),
        _ => match Pattern::new(&value.value) {
            Ok(p) => Some(ValueMatch::Regex(p)),
            Err(e) => {
                sink.error(value.line, format!("'{}': {e}", first.path));
                None
            }
        },
    }
}

/// RFC 9110 token characters (`tchar`), plus `:` for pseudo-headers.
///
/// Here, below `resources` (which checks route header matches with it too),
/// so that imports run one way.
pub(crate) fn is_header_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_istio_form() {
        let ok = [
            ("1s", Duration::from_secs(1)),
            ("100ms", Duration::from_millis(100)),
            ("1.5s", Duration::from_millis(1500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            (".5s", Duration::from_millis(500)),
            ("250us", Duration::from_micros(250)),
            ("1µs", Duration::from_micros(1)),
            ("7ns", Duration::from_nanos(7)),
            ("0.001s", Duration::from_millis(1)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in [
            "",
            "1",
            "s",
            "1x",
            "-1s",
            "1.s.",
            "1 s",
            "1sec",
            "abc",
            "1..5s",
            "99999999999999999999999h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }
}

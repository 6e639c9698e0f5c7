//! Tests of the resilience fields: what a user writes in a VirtualService or
//! DestinationRule, what the clients' model says, and where `check` points
//! when a value is wrong.

use std::sync::Arc;
use std::time::Duration;

use mesh_core::Snapshot;
use mesh_core::model::{
    AbortStatus, CircuitBreakers, Cluster, ConnectionSettings, FaultAbort, FaultDelay, FaultPolicy,
    Fraction, HashPolicy, LbPolicy, OutlierDetection, RetryBudget, RetryOn, RetryPolicy, Route,
    RoutePolicy,
};

use super::tests::{DR_CATALOG, FQDN, SE_CATALOG, assert_one, check, route_to, store};

/// The 1-based line of the first line of `text` containing `needle`.
#[track_caller]
fn line_with(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in the text"))
}

/// A VirtualService for `catalog` whose one route (to subset v1, or as
/// `route` says) carries `extra` (fields of `http[0]`, indented 4).
fn vs_with(extra: &str) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - route:
    - destination: {{host: catalog, subset: v1}}
{extra}"
    )
}

/// A DestinationRule for `catalog` with `policy` under `trafficPolicy`
/// (indented 4) and subsets v1, v2 (v1 with `v1_policy` under its
/// `trafficPolicy`, indented 6, when not empty).
fn dr_with(policy: &str, v1_policy: &str) -> String {
    let v1 = if v1_policy.is_empty() {
        String::new()
    } else {
        format!("    trafficPolicy:\n{v1_policy}")
    };
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
  trafficPolicy:
{policy}  subsets:
  - name: v1
    labels: {{version: v1}}
{v1}  - name: v2
    labels: {{version: v2}}
"
    )
}

/// The snapshot of `files`, asserting no problem anywhere.
fn snapshot(files: &[(&str, &str)]) -> Snapshot {
    let (s, _d) = store(files);
    let (snap, diags) = s.snapshot(&[]);
    assert!(diags.is_empty(), "{diags:#?}");
    snap
}

fn routes(snap: &Snapshot) -> Vec<Route> {
    snap.route_configs[&*format!("{FQDN}:80")].virtual_hosts[0]
        .routes
        .to_vec()
}

fn cluster<'s>(snap: &'s Snapshot, subset: &str) -> &'s Cluster {
    &snap.clusters[&*format!("outbound|80|{subset}|{FQDN}")]
}

// ------------------------------------------------------------- VirtualService

#[test]
fn timeout_retries_and_fault_translate_to_the_route() {
    let vs = vs_with(
        "    timeout: 1.5s
    retries:
      attempts: 3
      perTryTimeout: 100ms
      retryOn: 5xx,reset,503,retriable-4xx,504
      retryRemoteLocalities: true
      backoff: 10ms
    fault:
      delay:
        percentage: {value: 10}
        fixedDelay: 2s
      abort:
        percentage: {value: 20.5}
        grpcStatus: UNAVAILABLE
",
    );
    let snap = snapshot(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", DR_CATALOG),
        ("c.yaml", &vs),
    ]);
    let want = RoutePolicy {
        timeout: Some(Duration::from_millis(1500)),
        retry: Some(RetryPolicy {
            num_retries: 3,
            per_try_timeout: Some(Duration::from_millis(100)),
            retry_on: RetryOn::FIVE_XX
                | RetryOn::RESET
                | RetryOn::RETRIABLE_4XX
                | RetryOn::RETRIABLE_STATUS_CODES,
            retriable_status_codes: Arc::from([503u16, 504]),
            backoff_base: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            retry_remote_localities: true,
        }),
        fault: Some(FaultPolicy {
            delay: Some(FaultDelay {
                fraction: Fraction::from_per_million(100_000),
                delay: Duration::from_secs(2),
            }),
            abort: Some(FaultAbort {
                fraction: Fraction::from_per_million(205_000),
                status: AbortStatus::Grpc(14),
            }),
        }),
        hash_policy: Arc::from([]),
        traffic: None,
        rate_limit: None,
    };
    assert_eq!(routes(&snap)[0].policy, want);
}

#[test]
fn fault_forms_http_status_grpc_codes_and_missing_percentage() {
    let cases: [(&str, FaultPolicy); 4] = [
        (
            "      abort: {httpStatus: 503, percentage: {value: 100}}\n",
            FaultPolicy {
                delay: None,
                abort: Some(FaultAbort {
                    fraction: Fraction::ALL,
                    status: AbortStatus::Http(503),
                }),
            },
        ),
        (
            "      abort: {grpcStatus: 4, percentage: {value: 0.0001}}\n",
            FaultPolicy {
                delay: None,
                abort: Some(FaultAbort {
                    fraction: Fraction::from_per_million(1),
                    status: AbortStatus::Grpc(4),
                }),
            },
        ),
        (
            "      abort: {grpcStatus: \"14\"}\n",
            FaultPolicy {
                delay: None,
                abort: Some(FaultAbort {
                    // Istio: without a percentage, no request is aborted.
                    fraction: Fraction::default(),
                    status: AbortStatus::Grpc(14),
                }),
            },
        ),
        (
            "      delay: {fixedDelay: 1m}\n",
            FaultPolicy {
                delay: Some(FaultDelay {
                    fraction: Fraction::default(),
                    delay: Duration::from_secs(60),
                }),
                abort: None,
            },
        ),
    ];
    for (fault, want) in cases {
        let vs = vs_with(&format!("    fault:\n{fault}"));
        let snap = snapshot(&[
            ("a.yaml", SE_CATALOG),
            ("b.yaml", DR_CATALOG),
            ("c.yaml", &vs),
        ]);
        assert_eq!(
            routes(&snap)[0].policy.fault.as_ref(),
            Some(&want),
            "{fault}"
        );
    }
}

#[test]
fn default_retries_attempts_zero_and_zero_timeout() {
    // No `retries`: Istio's default policy, on VirtualService routes and on
    // the default route of a host no VirtualService routes.
    let snap = snapshot(&[("a.yaml", SE_CATALOG), ("b.yaml", DR_CATALOG)]);
    let default_route = &routes(&snap)[0];
    assert_eq!(&*default_route.name, "default");
    assert_eq!(
        default_route.policy.retry,
        Some(RetryPolicy::istio_default())
    );
    assert_eq!(default_route.policy.timeout, None);

    let vs = vs_with("    timeout: 0s\n");
    let snap = snapshot(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", DR_CATALOG),
        ("c.yaml", &vs),
    ]);
    let policy = &routes(&snap)[0].policy;
    assert_eq!(policy.retry, Some(RetryPolicy::istio_default()));
    assert_eq!(policy.timeout, None, "timeout 0s means no timeout");
    assert_eq!(policy.fault, None);

    for disabled in ["    retries: {attempts: 0}\n", "    retries: {}\n"] {
        let vs = vs_with(disabled);
        let snap = snapshot(&[
            ("a.yaml", SE_CATALOG),
            ("b.yaml", DR_CATALOG),
            ("c.yaml", &vs),
        ]);
        assert_eq!(routes(&snap)[0].policy.retry, None, "{disabled}");
    }

    // Fields left out keep the default's values (Istio starts from it).
    let vs = vs_with("    retries: {attempts: 5}\n");
    let snap = snapshot(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", DR_CATALOG),
        ("c.yaml", &vs),
    ]);
    assert_eq!(
        routes(&snap)[0].policy.retry,
        Some(RetryPolicy {
            num_retries: 5,
            ..RetryPolicy::istio_default()
        })
    );

    // A bare status code turns on retriable-status-codes; gRPC names too.
    let vs = vs_with("    retries: {attempts: 1, retryOn: 503}\n");
    let snap = snapshot(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", DR_CATALOG),
        ("c.yaml", &vs),
    ]);
    let retry = routes(&snap)[0].policy.retry.clone().unwrap();
    assert_eq!(retry.retry_on, RetryOn::RETRIABLE_STATUS_CODES);
    assert_eq!(&*retry.retriable_status_codes, &[503]);
    let vs = vs_with(
        "    retries: {attempts: 1, retryOn: \"cancelled, deadline-exceeded,internal,resource-exhausted,unavailable,gateway-error,connect-failure,refused-stream\"}\n",
    );
    let snap = snapshot(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", DR_CATALOG),
        ("c.yaml", &vs),
    ]);
    let retry = routes(&snap)[0].policy.retry.clone().unwrap();
    assert_eq!(
        retry.retry_on.names().collect::<Vec<_>>(),
        vec![
            "gateway-error",
            "connect-failure",
            "refused-stream",
            "cancelled",
            "deadline-exceeded",
            "internal",
            "resource-exhausted",
            "unavailable"
        ]
    );
    assert!(retry.retriable_status_codes.is_empty());
}

#[test]
fn every_matcher_of_a_route_carries_its_policy() {
    let vs = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  http:
  - match:
    - uri: {prefix: /a}
    - uri: {prefix: /b}
    route:
    - destination: {host: catalog, subset: v1}
    timeout: 3s
  - route:
    - destination: {host: catalog, subset: v2}
";
    let snap = snapshot(&[
        ("a.yaml", SE_CATALOG),
        ("b.yaml", DR_CATALOG),
        ("c.yaml", vs),
    ]);
    let routes = routes(&snap);
    assert_eq!(routes.len(), 3);
    assert_eq!(routes[0].policy.timeout, Some(Duration::from_secs(3)));
    assert_eq!(routes[1].policy, routes[0].policy);
    assert_eq!(routes[2].policy.timeout, None);
}

// ------------------------------------------------------------ DestinationRule

#[test]
fn traffic_policy_translates_to_the_cluster() {
    let dr = dr_with(
        "    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting: {enabled: true}
    connectionPool:
      tcp:
        maxConnections: 7
        connectTimeout: 250ms
      http:
        http1MaxPendingRequests: 3
        http2MaxRequests: 10
        maxRetries: 4
        maxRequestsPerConnection: 100
        idleTimeout: 90s
    outlierDetection:
      consecutive5xxErrors: 4
      consecutiveGatewayErrors: 2
      interval: 1s
      baseEjectionTime: 200ms
      maxEjectionPercent: 50
      minHealthPercent: 30
    retryBudget:
      percent: 25
      minRetryConcurrency: 5
",
        "",
    );
    let snap = snapshot(&[("a.yaml", SE_CATALOG), ("b.yaml", &dr)]);
    let want = |name: &str| Cluster {
        lb_policy: LbPolicy::RoundRobin,
        circuit_breakers: CircuitBreakers {
            max_connections: 7,
            max_pending_requests: 3,
            max_requests: 10,
            max_retries: 4,
            retry_budget: Some(RetryBudget {
                budget: Fraction::from_per_million(250_000),
                min_retry_concurrency: 5,
            }),
        },
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx: Some(4),
            consecutive_gateway_errors: Some(2),
            interval: Duration::from_secs(1),
            base_ejection_time: Duration::from_millis(200),
            max_ejection_percent: 50,
            min_health_percent: 30,
        }),
        connection: ConnectionSettings {
            connect_timeout: Some(Duration::from_millis(250)),
            idle_timeout: Some(Duration::from_secs(90)),
            max_requests_per_connection: Some(100),
            ..ConnectionSettings::default()
        },
        locality_failover: true,
        slow_start: None,
        tls: None,
        ..Cluster::new(name, mesh_core::model::Protocol::Http1)
    };
    // Subsets without a policy of their own inherit the rule's.
    for subset in ["", "v1", "v2"] {
        let name = format!("outbound|80|{subset}|{FQDN}");
        assert_eq!(cluster(&snap, subset), &want(&name), "{name}");
    }
}

#[test]
fn no_traffic_policy_keeps_istio_defaults() {
    let snap = snapshot(&[("a.yaml", SE_CATALOG), ("b.yaml", DR_CATALOG)]);
    let name = format!("outbound|80|v1|{FQDN}");
    assert_eq!(
        cluster(&snap, "v1"),
        &Cluster::new(name, mesh_core::model::Protocol::Http1)
    );
}

#[test]
fn subset_policy_overrides_the_rule_one_field_at_a_time() {
    let dr = dr_with(
        "    loadBalancer: {simple: RANDOM}
    connectionPool:
      http: {http2MaxRequests: 10, maxRetries: 2}
    outlierDetection: {consecutive5xxErrors: 3}
    retryBudget: {percent: {value: 50}}
",
        "      connectionPool:
        tcp: {maxConnections: 5}
      loadBalancer:
        consistentHash: {httpHeaderName: X-User}
",
    );
    let snap = snapshot(&[("a.yaml", SE_CATALOG), ("b.yaml", &dr)]);
    let v1 = cluster(&snap, "v1");
    let v2 = cluster(&snap, "v2");
    // The subset's connectionPool replaces the rule's whole: no max_requests.
    assert_eq!(
        v1.circuit_breakers,
        CircuitBreakers {
            max_connections: 5,
            retry_budget: Some(RetryBudget {
                budget: Fraction::from_per_million(500_000),
                min_retry_concurrency: 3,
            }),
            ..CircuitBreakers::default()
        }
    );
    assert_eq!(
        v1.lb_policy,
        LbPolicy::RingHash {
            minimum_ring_size: 1024
        }
    );
    // What the subset does not set comes from the rule.
    assert_eq!(v1.outlier_detection, v2.outlier_detection);
    assert_eq!(
        v1.outlier_detection
            .as_ref()
            .and_then(|o| o.consecutive_5xx),
        Some(3)
    );
    assert_eq!(v2.lb_policy, LbPolicy::Random);
    assert_eq!(v2.circuit_breakers.max_requests, 10);
    assert_eq!(v2.circuit_breakers.max_retries, 2);
    assert_eq!(v2.circuit_breakers.max_connections, u32::MAX);
    assert_eq!(cluster(&snap, ""), &{
        let mut c = v2.clone();
        c.name = format!("outbound|80||{FQDN}").into();
        c.eds_service_name = c.name.clone();
        c
    });
}

#[test]
fn outlier_detection_defaults_and_locality_failover() {
    let cases = [
        // Istio's defaults; its mesh-wide locality LB turns into failover
        // once outlier detection is set.
        (
            "    outlierDetection: {}\n",
            Some(OutlierDetection {
                consecutive_5xx: Some(5),
                consecutive_gateway_errors: None,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_percent: 10,
                min_health_percent: 0,
            }),
            true,
        ),
        (
            "    outlierDetection: {consecutive5xxErrors: 0, consecutiveGatewayErrors: 0, maxEjectionPercent: 0}\n    loadBalancer:\n      localityLbSetting: {enabled: false}\n",
            Some(OutlierDetection {
                consecutive_5xx: None,
                consecutive_gateway_errors: None,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_percent: 10,
                min_health_percent: 0,
            }),
            false,
        ),
        (
            "    loadBalancer:\n      localityLbSetting: {enabled: true}\n",
            None,
            true,
        ),
        ("    loadBalancer: {simple: RANDOM}\n", None, false),
    ];
    for (policy, outlier, failover) in cases {
        let dr = dr_with(policy, "");
        let snap = snapshot(&[("a.yaml", SE_CATALOG), ("b.yaml", &dr)]);
        let c = cluster(&snap, "");
        assert_eq!(c.outlier_detection, outlier, "{policy}");
        assert_eq!(c.locality_failover, failover, "{policy}");
    }
}

#[test]
fn retry_budget_defaults_and_percent_forms() {
    for (budget, percent, min) in [
        ("{}", 20.0, 3),
        ("{percent: 12.5}", 12.5, 3),
        ("{percent: {value: 100}, minRetryConcurrency: 0}", 100.0, 0),
    ] {
        let dr = dr_with(&format!("    retryBudget: {budget}\n"), "");
        let snap = snapshot(&[("a.yaml", SE_CATALOG), ("b.yaml", &dr)]);
        assert_eq!(
            cluster(&snap, "v2").circuit_breakers.retry_budget,
            Some(RetryBudget {
                budget: Fraction::from_percent(percent).unwrap(),
                min_retry_concurrency: min,
            }),
            "{budget}"
        );
    }
}

#[test]
fn consistent_hash_makes_a_ring_and_gives_routes_their_key() {
    let dr = dr_with(
        "    loadBalancer:
      consistentHash:
        httpHeaderName: X-User
        minimumRingSize: 4096
",
        "      loadBalancer:
        consistentHash:
          httpCookie: {name: session, ttl: 0s, path: /}
          ringHash: {minimumRingSize: 2048}
",
    );
    let vs = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  http:
  - match: [{uri: {prefix: /v1}}]
    route:
    - destination: {host: catalog, subset: v1}
  - match: [{uri: {prefix: /v2}}]
    route:
    - destination: {host: catalog, subset: v2}
      weight: 50
    - destination: {host: catalog, subset: v1}
      weight: 50
  - route:
    - destination: {host: catalog}
";
    let snap = snapshot(&[("a.yaml", SE_CATALOG), ("b.yaml", &dr), ("c.yaml", vs)]);
    assert_eq!(
        cluster(&snap, "v1").lb_policy,
        LbPolicy::RingHash {
            minimum_ring_size: 2048
        }
    );
    for subset in ["", "v2"] {
        assert_eq!(
            cluster(&snap, subset).lb_policy,
            LbPolicy::RingHash {
                minimum_ring_size: 4096
            }
        );
    }
    let header: Arc<[HashPolicy]> = Arc::from([HashPolicy::Header("x-user".into())]);
    let cookie: Arc<[HashPolicy]> = Arc::from([HashPolicy::Cookie {
        name: "session".into(),
        ttl: Some(Duration::ZERO),
        path: Some("/".into()),
    }]);
    let routes = routes(&snap);
    assert_eq!(routes[0].policy.hash_policy, cookie, "v1 route");
    // A split takes the key of its first destination (v2: the rule's).
    assert_eq!(routes[1].policy.hash_policy, header, "split");
    assert_eq!(routes[2].policy.hash_policy, header, "whole service");
    // The routing itself is unchanged.
    assert_eq!(
        route_to(&snap, "catalog", "GET", "/v1/x", &[], 0),
        format!("outbound|80|v1|{FQDN}")
    );

    // A host without a VirtualService: its default route gets the key.
    let snap = snapshot(&[("a.yaml", SE_CATALOG), ("b.yaml", &dr)]);
    assert_eq!(routes_of_default(&snap).policy.hash_policy, header);
}

fn routes_of_default(snap: &Snapshot) -> Route {
    let r = routes(snap);
    assert_eq!(&*r[0].name, "default");
    r[0].clone()
}

#[test]
fn consistent_hash_key_kinds() {
    let cases = [
        ("{useSourceIp: true}", HashPolicy::SourceIp),
        (
            "{httpQueryParameterName: user}",
            HashPolicy::QueryParameter("user".into()),
        ),
        (
            "{httpCookie: {name: c}}",
            HashPolicy::Cookie {
                name: "c".into(),
                ttl: None,
                path: None,
            },
        ),
    ];
    for (hash, want) in cases {
        let dr = dr_with(
            &format!("    loadBalancer:\n      consistentHash: {hash}\n"),
            "",
        );
        let snap = snapshot(&[("a.yaml", SE_CATALOG), ("b.yaml", &dr)]);
        assert_eq!(
            &*routes_of_default(&snap).policy.hash_policy,
            &[want],
            "{hash}"
        );
        assert_eq!(
            cluster(&snap, "").lb_policy,
            LbPolicy::RingHash {
                minimum_ring_size: 1024
            }
        );
    }
}

// ----------------------------------------------------------------- problems

/// Checks `text` (SE + DR/VS) and asserts one diagnostic at the line holding
/// `at`, whose message contains `needle`.
#[track_caller]
fn assert_rejected(text: &str, at: &str, needle: &str) {
    let line = line_with(text, at);
    assert_one(&check(text), line, needle);
}

#[test]
fn invalid_virtual_service_values_point_at_their_line() {
    let cases = [
        (
            "    timeout: 1x\n",
            "timeout",
            "'http[0].timeout': '1x' is not a duration",
        ),
        (
            "    timeout: -1s\n",
            "timeout",
            "is not a duration: it is negative",
        ),
        (
            "    timeout: 5\n",
            "timeout",
            "'http[0].timeout' must be a duration",
        ),
        (
            "    timeout: 1500us\n",
            "timeout",
            "finer than a millisecond",
        ),
        (
            "    retries:\n      attempts: 2\n      retryOn: 5xx,bogus\n",
            "retryOn",
            "unknown retry condition 'bogus'",
        ),
        (
            "    retries:\n      attempts: 2\n      retryOn: 5xx,,reset\n",
            "retryOn",
            "empty condition",
        ),
        (
            "    retries:\n      attempts: 2\n      retryOn: \"700\"\n",
            "retryOn",
            "'700' is not an HTTP status code",
        ),
        (
            "    retries:\n      attempts: 2\n      perTryTimeout: 0s\n",
            "perTryTimeout",
            "'http[0].retries.perTryTimeout' must be at least 1ms",
        ),
        (
            "    retries:\n      attempts: -1\n",
            "attempts",
            "'http[0].retries.attempts' must be between 0 and 2147483647, found -1",
        ),
        (
            "    retries:\n      attempts: 0\n      retryOn: 5xx\n",
            "attempts",
            "retries are disabled (attempts is 0) but retryOn is set",
        ),
        (
            "    retries:\n      perTryTimeout: 1s\n",
            "retries:",
            "retries are disabled (attempts is 0) but perTryTimeout is set",
        ),
        (
            "    fault:\n      abort:\n        percentage: {value: 150}\n        httpStatus: 503\n",
            "value: 150",
            "'http[0].fault.abort.percentage.value': 150 is not a percentage (0 to 100)",
        ),
        (
            "    fault:\n      delay:\n        fixedDelay: 1s\n        percentage:\n          value: 100.5\n",
            "value: 100.5",
            "100.5 is not a percentage",
        ),
        (
            "    fault:\n      abort:\n        httpStatus: 503\n        grpcStatus: UNAVAILABLE\n",
            "grpcStatus",
            "only one of httpStatus or grpcStatus may be set",
        ),
        (
            "    fault:\n      abort:\n        percentage: {value: 1}\n",
            "abort:",
            "'http[0].fault.abort' needs httpStatus or grpcStatus",
        ),
        (
            "    fault:\n      abort:\n        httpStatus: 700\n",
            "httpStatus",
            "must be between 200 and 599, found 700",
        ),
        (
            "    fault:\n      abort:\n        grpcStatus: NOT_A_CODE\n",
            "grpcStatus",
            "unknown gRPC status 'NOT_A_CODE'",
        ),
        (
            "    fault:\n      abort:\n        grpcStatus: 17\n",
            "grpcStatus",
            "unknown gRPC status '17'",
        ),
        (
            "    fault:\n      delay:\n        percentage: {value: 5}\n",
            "delay:",
            "missing field 'http[0].fault.delay.fixedDelay'",
        ),
        (
            "    fault:\n      delay:\n        fixedDelay: 0s\n",
            "fixedDelay",
            "must be at least 1ms",
        ),
        (
            "    fault: {}\n",
            "fault",
            "needs a delay, an abort or both",
        ),
    ];
    for (extra, at, needle) in cases {
        let text = format!("{SE_CATALOG}---\n{DR_CATALOG}---\n{}", vs_with(extra));
        assert_rejected(&text, at, needle);
    }
}

#[test]
fn invalid_destination_rule_values_point_at_their_line() {
    let cases = [
        (
            "    loadBalancer:\n      consistentHash:\n        httpHeaderName: x-user\n        useSourceIp: true\n",
            "useSourceIp",
            "only one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName may be set",
        ),
        (
            "    loadBalancer:\n      consistentHash:\n        minimumRingSize: 1024\n",
            "consistentHash",
            "needs one of httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName",
        ),
        (
            "    loadBalancer:\n      consistentHash:\n        useSourceIp: false\n",
            "useSourceIp",
            "selects no hash key",
        ),
        (
            "    loadBalancer:\n      consistentHash:\n        httpHeaderName: \"bad header\"\n",
            "httpHeaderName",
            "is not a header name",
        ),
        (
            "    loadBalancer:\n      consistentHash:\n        httpCookie: {path: /}\n",
            "httpCookie",
            "missing field 'trafficPolicy.loadBalancer.consistentHash.httpCookie.name'",
        ),
        (
            "    loadBalancer:\n      consistentHash:\n        useSourceIp: true\n        ringHash: {minimumRingSize: 8}\n        minimumRingSize: 16\n",
            "minimumRingSize: 16",
            "only one of ringHash or minimumRingSize may be set",
        ),
        (
            "    loadBalancer:\n      consistentHash:\n        useSourceIp: true\n        minimumRingSize: 9000000\n",
            "minimumRingSize",
            "must be between 0 and 8388608",
        ),
        (
            "    loadBalancer:\n      simple: RANDOM\n      consistentHash: {useSourceIp: true}\n",
            "consistentHash",
            "only one of simple or consistentHash may be set",
        ),
        (
            "    connectionPool:\n      http:\n        http2MaxRequests: 0\n",
            "http2MaxRequests",
            "'trafficPolicy.connectionPool.http.http2MaxRequests' must be between 1 and 4294967295, found 0 (leave the field out for no limit)",
        ),
        (
            "    connectionPool:\n      tcp:\n        connectTimeout: 10\n",
            "connectTimeout",
            "must be a duration",
        ),
        (
            "    connectionPool:\n      http:\n        idleTimeout: 1d\n",
            "idleTimeout",
            "'1d' is not a duration",
        ),
        (
            "    outlierDetection:\n      maxEjectionPercent: 101\n",
            "maxEjectionPercent",
            "must be between 0 and 100, found 101",
        ),
        (
            "    outlierDetection:\n      baseEjectionTime: 0s\n",
            "baseEjectionTime",
            "must be at least 1ms",
        ),
        (
            "    outlierDetection:\n      consecutive5xxErrors: -2\n",
            "consecutive5xxErrors",
            "must be between 0 and 4294967295",
        ),
        (
            "    retryBudget:\n      percent: 150\n",
            "percent",
            "'trafficPolicy.retryBudget.percent': 150 is not a percentage",
        ),
        (
            "    retryBudget:\n      percent:\n        value: -1\n",
            "value",
            "-1 is not a percentage",
        ),
        (
            "    loadBalancer:\n      localityLbSetting:\n        enabled: yes please\n",
            "enabled",
            "must be true or false",
        ),
    ];
    for (policy, at, needle) in cases {
        let text = format!("{SE_CATALOG}---\n{}", dr_with(policy, ""));
        assert_rejected(&text, at, needle);
    }
    // In a subset's policy too.
    let text = format!(
        "{SE_CATALOG}---\n{}",
        dr_with("", "      outlierDetection: {interval: 10 s}\n")
    );
    assert_rejected(
        &text,
        "interval",
        "'subsets[0].trafficPolicy.outlierDetection.interval': '10 s' is not a duration",
    );
}

#[test]
fn still_unsupported_fields_are_rejected_with_their_path() {
    let vs_cases = [
        ("    delegate: {name: x}\n", "delegate", "http[0].delegate"),
        (
            "    fault:\n      delay:\n        exponentialDelay: 1s\n        fixedDelay: 1s\n",
            "exponentialDelay",
            "http[0].fault.delay.exponentialDelay",
        ),
        (
            "    fault:\n      abort:\n        http2Error: x\n        httpStatus: 503\n",
            "http2Error",
            "http[0].fault.abort.http2Error",
        ),
    ];
    for (extra, at, path) in vs_cases {
        let text = format!("{SE_CATALOG}---\n{DR_CATALOG}---\n{}", vs_with(extra));
        assert_rejected(&text, at, &format!("field '{path}' is not supported yet"));
    }
    let text = format!(
        "{SE_CATALOG}---\n{DR_CATALOG}---\n{}",
        vs_with("    retries: {attempts: 1, retryOn: \"5xx,retriable-headers\"}\n")
    );
    assert_rejected(
        &text,
        "retryOn",
        "retry condition 'retriable-headers' is not supported yet",
    );

    let tp = "trafficPolicy";
    let dr_cases = [
        (
            "    tls: {mode: SIMPLE, caCertificates: /x.pem, caCrl: /crl.pem}\n",
            "tls",
            format!("{tp}.tls.caCrl"),
        ),
        (
            "    proxyProtocol: {}\n",
            "proxyProtocol",
            format!("{tp}.proxyProtocol"),
        ),
        (
            "    loadBalancer:\n      warmup:\n        duration: 60s\n",
            "warmup",
            format!("{tp}.loadBalancer.warmup"),
        ),
        (
            "    loadBalancer:\n      consistentHash:\n        useSourceIp: true\n        maglev: {tableSize: 7}\n",
            "maglev",
            format!("{tp}.loadBalancer.consistentHash.maglev"),
        ),
        (
            "    loadBalancer:\n      consistentHash:\n        httpCookie:\n          name: c\n          attributes: []\n",
            "attributes",
            format!("{tp}.loadBalancer.consistentHash.httpCookie.attributes"),
        ),
        (
            "    connectionPool:\n      http:\n        useClientProtocol: true\n",
            "useClientProtocol",
            format!("{tp}.connectionPool.http.useClientProtocol"),
        ),
        (
            "    outlierDetection:\n      consecutiveErrors: 3\n",
            "consecutiveErrors",
            format!("{tp}.outlierDetection.consecutiveErrors"),
        ),
        (
            "    retryBudget:\n      budgetInterval: 1s\n",
            "budgetInterval",
            format!("{tp}.retryBudget.budgetInterval"),
        ),
    ];
    for (policy, at, path) in dr_cases {
        let text = format!("{SE_CATALOG}---\n{}", dr_with(policy, ""));
        assert_rejected(&text, at, &format!("field '{path}' is not supported yet"));
    }
}

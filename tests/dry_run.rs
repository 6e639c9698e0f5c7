//! Istio's dry-run AuthorizationPolicy (`istio.io/dry-run: "true"`), end to
//! end over real sockets (issue 13, acceptance 7): mesh-control serves the
//! policy as RBAC `shadow_rules` of the workload's server listener, a
//! proxyless server that follows its inbound policy over xDS
//! (`InboundPolicy::from_xds`) evaluates it beside the enforced policies and
//! changes nothing, and what it would have done shows in the server spans
//! (Istio's `istio.authorization.dry_run.deny_policy.{name,result}`, sent to
//! a real OTLP receiver) and in `/metrics`
//! (`mesh_authz_dry_run_total{action,result,policy}`). A gRPC client
//! served the same listener is told, in `/status`, that gRPC servers ignore
//! the policy's shadow rules (gRFC A41).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_control::ServerHandle;
use mesh_testkit::ads::AdsClient;
use mesh_testkit::otlp::SpanKind;
use mesh_testkit::prometheus::{parse, total};
use proxyless::control::BootstrapSpec;
use proxyless::telemetry::{
    Identity, MetricsRegistry, MetricsServer, OtelConfig, OtlpProtocol, Telemetry, serve_metrics,
};
use proxyless::{Bootstrap, InboundPolicy, Registration, ServerLayer, XdsClient};
use support::eventually_named;
use support::otlp::{Got, find};

const DEADLINE: Duration = Duration::from_secs(10);
/// The dry-run policy, as the span attributes and the metric name it.
const POLICY: &str = "shop/deny-everything";
const REQUESTS: usize = 5;

/// catalog in `shop`, plaintext (DISABLE keeps the test about
/// authorization), with one AuthorizationPolicy: a DENY that matches every
/// request (`rules: [{}]`), in dry-run.
const MESH_YAML: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: catalog-plaintext, namespace: shop}
spec:
  selector: {matchLabels: {app: catalog}}
  mtls: {mode: DISABLE}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-everything
  namespace: shop
  annotations:
    istio.io/dry-run: "true"
spec:
  selector: {matchLabels: {app: catalog}}
  action: DENY
  rules:
  - {}
"#;

async fn start_control(dir: &tempfile::TempDir) -> ServerHandle {
    std::fs::write(dir.path().join("mesh.yaml"), MESH_YAML).expect("write mesh.yaml");
    let control = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start mesh-control");
    assert_eq!(
        control.status()["diagnostics"],
        serde_json::json!([]),
        "mesh-control rejects the test's YAML"
    );
    control
}

fn otlp_grpc(addr: SocketAddr) -> OtelConfig {
    OtelConfig::default()
        .with_protocol(OtlpProtocol::Grpc)
        .with_endpoint(format!("http://{addr}"))
        .unwrap_or_else(|e| panic!("OTLP config: {e}"))
}

async fn get(uri: &str) -> (StatusCode, String) {
    let client: HyperClient<HttpConnector, Full<Bytes>> =
        HyperClient::builder(TokioExecutor::new()).build_http();
    let req = http::Request::get(uri)
        .body(Full::default())
        .expect("request");
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("GET {uri}: {e}"));
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn scrape(metrics: &MetricsServer) -> String {
    let (status, body) = get(&format!("http://{}/metrics", metrics.local_addr())).await;
    assert_eq!(status, StatusCode::OK, "/metrics: {body}");
    body
}

/// The catalog server spans that carry a dry-run result.
fn dry_run_spans(spans: &[Got]) -> Vec<&Got> {
    find(spans, "catalog", SpanKind::Server)
        .into_iter()
        .filter(|s| {
            s.attributes
                .contains_key("istio.authorization.dry_run.deny_policy.result")
        })
        .collect()
}

/// Acceptance 7: a dry-run DENY policy matching every request denies
/// nothing (every request gets 200), and each request's server span and the
/// dry-run counter say it would have been denied by that policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_deny_policy_denies_nothing_and_reports_every_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = start_control(&dir).await;
    let (receiver, otlp_addr, _) = support::otlp::receiver().await;

    // catalog: a proxyless server following its server listener over xDS.
    let spec = BootstrapSpec::new("catalog-1", "shop").label("app", "catalog");
    let bootstrap = Bootstrap::from_json(&control.bootstrap(&spec)).expect("bootstrap");
    let xds = XdsClient::start(bootstrap.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let inbound = InboundPolicy::from_xds(&xds, addr).expect("inbound policy");
    inbound
        .ready(DEADLINE)
        .await
        .expect("the server listener arrives");
    // The policy arrives with the server listener (which follows the
    // registration), as a dry-run policy: served as shadow_rules, decoded
    // back by our client.
    let registration = Registration::from_bootstrap(&bootstrap, "catalog").expect("registration");
    let registry = MetricsRegistry::new();
    let telemetry = Telemetry::builder(
        Identity::from_bootstrap(&bootstrap, "catalog").with_label("app", "catalog"),
    )
    .otel(&otlp_grpc(otlp_addr))
    .unwrap_or_else(|e| panic!("tracer: {e}"))
    .metrics(&registry)
    .build();
    let app = axum::Router::new()
        .fallback(|uri: http::Uri| async move { format!("catalog {}", uri.path()) })
        .layer(
            ServerLayer::from_bootstrap(&bootstrap, "catalog")
                .inbound(inbound.clone())
                .telemetry(telemetry.clone()),
        );
    let serving = proxyless::serve(listener, registration, app)
        .await
        .expect("serve catalog");
    eventually_named("catalog follows the dry-run policy", DEADLINE, || {
        inbound
            .current()
            .policies()
            .iter()
            .any(|p| &**p.id() == POLICY && p.is_dry_run())
    })
    .await;
    let policies = inbound.current().policies().to_vec();
    assert!(
        policies.iter().all(|p| p.is_dry_run()),
        "the only policy is the dry-run one: {policies:?}"
    );

    // Every request goes through: the policy denies nothing.
    for i in 0..REQUESTS {
        let (status, body) = get(&format!("http://{addr}/items/{i}")).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {body}");
        assert_eq!(body, format!("catalog /items/{i}"));
    }

    // Each server span says what the policy would have done.
    let spans = receiver
        .wait_for(&[&telemetry], DEADLINE, |spans| {
            dry_run_spans(spans).len() >= REQUESTS
        })
        .await;
    let reported = dry_run_spans(&spans);
    assert_eq!(reported.len(), REQUESTS, "{reported:#?}");
    for span in reported {
        assert_eq!(
            span.attr("istio.authorization.dry_run.deny_policy.name"),
            POLICY,
            "{span:#?}"
        );
        assert_eq!(
            span.attr("istio.authorization.dry_run.deny_policy.result"),
            "denied",
            "{span:#?}"
        );
        assert!(
            !span
                .attributes
                .contains_key("istio.authorization.dry_run.allow_policy.result"),
            "no dry-run ALLOW policy, no ALLOW result: {span:#?}"
        );
        assert!(!span.error, "the request succeeded: {span:#?}");
    }

    // The counter has counted each of them.
    let metrics = serve_metrics("127.0.0.1:0".parse().expect("addr"), registry.clone())
        .await
        .expect("serve /metrics");
    let text = scrape(&metrics).await;
    let counted = total(
        &parse(&text),
        "mesh_authz_dry_run_total",
        &[("action", "deny"), ("result", "denied"), ("policy", POLICY)],
    );
    assert_eq!(counted, REQUESTS as f64, "{text}");

    metrics.shutdown().await;
    serving.shutdown().await.expect("shut catalog down");
    control.shutdown().await;
}

/// A gRPC server served the same server listener cannot honor the dry run
/// (gRFC A41 reads `rules` only): mesh-control says so in `/status`, for
/// that client, naming the policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_tells_grpc_servers_ignore_the_dry_run_policy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = start_control(&dir).await;
    let server_name = "grpc/server?xds.resource.listening_address=127.0.0.1:9001";
    let node = mesh_testkit::ads::node("grpc-catalog-1")
        .namespace("shop")
        .labels(&[("app", "catalog")])
        .user_agent("gRPC Go")
        .build();
    let mut ads = AdsClient::connect(control.xds_addr(), node).await;
    ads.subscribe(proxyless::mesh_core::xds::LISTENER_TYPE, &[server_name])
        .await;
    let response = ads.recv().await;
    let served = proxyless::mesh_core::xds::decode_server_listener(&response.resources[0])
        .expect("a server listener");
    assert!(
        served
            .policies
            .iter()
            .any(|p| &**p.id() == POLICY && p.is_dry_run()),
        "{served:?}"
    );
    let expected = format!(
        "server listener {server_name:?}: the shadow_rules of dry-run AuthorizationPolicy \
         {POLICY} are ignored by gRPC servers (gRFC A41"
    );
    eventually_named("/status reports the dry-run policy", DEADLINE, || {
        let status = control.status();
        status["clients"].as_array().is_some_and(|clients| {
            clients.iter().any(|c| {
                c["kind"] == "grpc"
                    && c["ignored"].as_array().is_some_and(|found| {
                        found
                            .iter()
                            .any(|f| f.as_str().is_some_and(|f| f.starts_with(&expected)))
                    })
            })
        })
    })
    .await;
}

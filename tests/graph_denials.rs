//! Issue 17's "recent authorization denials, by policy", end to end over
//! real sockets: mesh-control with a CA serves catalog a DENY policy
//! (`shop/deny-x`, the intruder's SPIFFE ID) under STRICT mTLS; catalog
//! counts each denial in `mesh_authz_denied_total` and its graph push sends
//! them to mesh-control with its join token; `GET /v1/graph` lists them by
//! policy, caller and denying workload. A workload that claims another
//! namespace's denials is refused with a 403.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_control::ServerHandle;
use mesh_control::ca::{CertificateAuthority, JoinTokens};
use mesh_testkit::http::json_request_tls_bearer;
use mesh_testkit::wait::eventually_ok_async;
use proxyless::control::BootstrapSpec;
use proxyless::telemetry::{GraphPush, GraphSource, Identity, MetricsRegistry, Telemetry};
use proxyless::{
    Bootstrap, Client, InboundPolicy, Registration, Security, ServerLayer, Serving,
    WorkloadCertificates, XdsClient,
};
use serde_json::{Value, json};
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
/// Long enough for the first pushes (every 5 s) to carry the denials.
const GRAPH_DEADLINE: Duration = Duration::from_secs(30);
const TRUST_DOMAIN: &str = "cluster.local";
const ACCOUNTS: &[&str] = &["catalog", "frontend", "intruder"];
/// The requests the intruder makes, each denied.
const DENIED: u64 = 4;
const INTRUDER: &str = "spiffe://cluster.local/ns/shop/sa/intruder";

/// catalog in `shop`, STRICT mTLS, and one DENY policy for the intruder:
/// everyone else is allowed.
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
metadata: {name: default, namespace: shop}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-x, namespace: shop}
spec:
  selector: {matchLabels: {app: catalog}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/intruder"]
"#;

struct Mesh {
    server: ServerHandle,
    tokens: std::collections::BTreeMap<&'static str, String>,
    _dir: tempfile::TempDir,
}

struct Workload {
    bootstrap: Bootstrap,
    xds: XdsClient,
    certificates: WorkloadCertificates,
}

impl Mesh {
    async fn start() -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mesh.yaml"), MESH_YAML).expect("write mesh.yaml");
        let mut join = JoinTokens::new();
        let mut tokens = std::collections::BTreeMap::new();
        for (i, account) in ACCOUNTS.iter().enumerate() {
            let token = format!(
                "{account}-join-token-{i}-{:016x}",
                support::Coin::new().next_u64()
            );
            join.insert(token.clone(), "shop", account)
                .expect("join token");
            tokens.insert(*account, token);
        }
        let ca = CertificateAuthority::builder(TRUST_DOMAIN)
            .join_tokens(join)
            .build()
            .expect("CA");
        let server = mesh_control::Server::builder()
            .config_dir(dir.path())
            .ca(ca)
            .start()
            .await
            .expect("start mesh-control");
        assert_eq!(
            server.status()["diagnostics"],
            json!([]),
            "the test mesh has problems"
        );
        Mesh {
            server,
            tokens,
            _dir: dir,
        }
    }

    async fn workload(&self, node: &str, account: &'static str) -> Workload {
        let spec = BootstrapSpec::new(node, "shop")
            .service_account(account)
            .label("app", account)
            .join_token(self.tokens[account].clone());
        let bootstrap = Bootstrap::from_json(&self.server.bootstrap(&spec)).expect("bootstrap");
        let certificates = WorkloadCertificates::from_bootstrap(&bootstrap)
            .await
            .expect("certificates from the mesh CA")
            .expect("the bootstrap names a certificate provider");
        let xds = XdsClient::start(bootstrap.clone());
        Workload {
            bootstrap,
            xds,
            certificates,
        }
    }

    /// `method path` on the admin API over https (verified with the trust
    /// bundle), with `account`'s join token.
    async fn admin(&self, account: &str, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let file = self.server.trust_bundle_file().expect("trust bundle file");
        let bundle = std::fs::read_to_string(&file).expect("trust bundle");
        let config = Arc::new(mesh_testkit::pki::client_config(&bundle, None));
        json_request_tls_bearer(
            self.server.admin_addr(),
            config,
            method,
            path,
            Some(&self.tokens[account]),
            body,
        )
        .await
    }
}

/// Serves catalog (workload `catalog-v1`) as the shop does: its server
/// telemetry counts into `registry`, and its graph push sends what the
/// registry holds to mesh-control as `shop/catalog`.
async fn serve_catalog(
    workload: &Workload,
    registry: &MetricsRegistry,
) -> (Serving, GraphPush, Telemetry) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("local addr");
    let inbound = InboundPolicy::from_xds(&workload.xds, addr).expect("inbound policy");
    let identity = Identity::from_bootstrap(&workload.bootstrap, "catalog")
        .with_workload("catalog-v1")
        .with_label("app", "catalog")
        .with_version("v1")
        .with_principal("spiffe://cluster.local/ns/shop/sa/catalog");
    let telemetry = Telemetry::builder(identity).metrics(registry).build();
    let app = axum::Router::new()
        .route("/items", axum::routing::get(|| async { "items" }))
        .layer(
            ServerLayer::from_bootstrap(&workload.bootstrap, "catalog")
                .inbound(inbound.clone())
                .telemetry(telemetry.clone()),
        );
    let registration =
        Registration::from_bootstrap(&workload.bootstrap, "catalog").expect("registration");
    let push = registry
        .push_graph(
            &registration,
            GraphSource::new("shop", "catalog").workload("catalog-v1"),
        )
        .expect("graph push");
    let security = Security::new(inbound)
        .certificates(workload.certificates.store().clone())
        .telemetry(telemetry.clone());
    let serving = proxyless::serve_with(listener, registration, app, security)
        .await
        .expect("serve catalog");
    (serving, push, telemetry)
}

fn client(workload: &Workload) -> Client {
    Client::new(workload.xds.clone()).with_certificates(workload.certificates.store().clone())
}

/// GET http://catalog/items: the status.
async fn get_items(client: &Client) -> Result<u16, String> {
    let request = http::Request::get("http://catalog/items")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = client
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let _ = response.into_body().collect().await;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_reach_the_graph_by_policy_and_caller() {
    let mesh = Mesh::start().await;
    let catalog = mesh.workload("catalog-1", "catalog").await;
    let registry = MetricsRegistry::new();
    let (_serving, _push, _telemetry) = serve_catalog(&catalog, &registry).await;

    // The frontend is allowed (once catalog answers it, the policy and the
    // certificates are in place everywhere).
    let frontend = mesh.workload("frontend-1", "frontend").await;
    let frontend_client = client(&frontend);
    eventually_ok_async("catalog to answer the frontend", DEADLINE, || {
        let c = frontend_client.clone();
        async move {
            match get_items(&c).await {
                Ok(200) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    // The intruder, a valid mesh identity, is denied by shop/deny-x.
    let intruder = mesh.workload("intruder-1", "intruder").await;
    let intruder_client = client(&intruder);
    for i in 0..DENIED {
        let status = get_items(&intruder_client).await;
        assert_eq!(status, Ok(403), "intruder request {i}");
    }

    // Within a push or two, the graph lists them: one row, with the policy,
    // the intruder's SPIFFE ID, the denying workload and every denial.
    let graph = eventually_ok_async("the denials in GET /v1/graph", GRAPH_DEADLINE, || async {
        let (code, graph) = mesh
            .admin("frontend", "GET", "/v1/graph", &Value::Null)
            .await;
        if code != 200 {
            return Err(format!("GET /v1/graph: {code} {graph}"));
        }
        match graph["denials"][0]["count"].as_u64() {
            Some(DENIED) => Ok(graph),
            _ => Err(format!(
                "not all {DENIED} denials yet: {}",
                graph["denials"]
            )),
        }
    })
    .await;
    let denials = graph["denials"].as_array().expect("denials");
    assert_eq!(denials.len(), 1, "{denials:?}");
    let row = &denials[0];
    for (field, expected) in [
        ("policy", json!("shop/deny-x")),
        ("source_principal", json!(INTRUDER)),
        ("destination_namespace", json!("shop")),
        ("destination_workload", json!("catalog-v1")),
        ("count", json!(DENIED)),
    ] {
        assert_eq!(row[field], expected, "{field} of {row}");
    }
    let ago = row["last_seen_seconds_ago"].as_f64().expect("last_seen");
    assert!((0.0..=GRAPH_DEADLINE.as_secs_f64()).contains(&ago), "{row}");

    // The frontend (namespace shop) claims a denial of namespace admin's
    // workload: refused, naming both, and nothing of it is kept.
    let forged = json!({
        "interval_ms": 5000,
        "edges": [],
        "denials": [{
            "policy": "admin/deny-all",
            "source_principal": INTRUDER,
            "destination_namespace": "admin",
            "destination_workload": "vault",
            "count": 1000,
        }],
    });
    let (code, reply) = mesh
        .admin("frontend", "POST", "/v1/graph/summaries", &forged)
        .await;
    assert_eq!(code, 403, "{reply}");
    let message = reply.to_string();
    assert!(
        message.contains("namespace admin") && message.contains("sa/frontend"),
        "{message}"
    );
    let (code, graph) = mesh
        .admin("frontend", "GET", "/v1/graph", &Value::Null)
        .await;
    assert_eq!(code, 200, "{graph}");
    assert!(
        graph["denials"]
            .as_array()
            .is_some_and(|d| d.iter().all(|row| row["destination_namespace"] == "shop")),
        "{graph}"
    );
}

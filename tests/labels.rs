//! One label set per workload (issue 11), end to end over real sockets: the
//! labels a server's bootstrap carries (`node.metadata.LABELS`) pick the
//! DestinationRule subset its endpoint is in *and* select the
//! PeerAuthentication and AuthorizationPolicies its server enforces, with
//! the service's WorkloadGroup labels under them and `Registration::label`
//! over them. Deregistration takes the endpoint out of EDS at once.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_control::ServerHandle;
use proxyless::control::BootstrapSpec;
use proxyless::mesh_core::model::MtlsMode;
use proxyless::{Bootstrap, Client, InboundPolicy, Registration, ServerLayer, Serving, XdsClient};
use support::admin::admin_request;
use support::eventually_named;
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
const CATALOG_V1: &str = "outbound|80|v1|catalog.shop.svc.cluster.local";
const CATALOG_V2: &str = "outbound|80|v2|catalog.shop.svc.cluster.local";

/// catalog in `shop`: subsets v1 and v2 by `version`; everything to v1,
/// except requests with `x-subset: v2`. Its WorkloadGroup gives every
/// catalog endpoint `version: v0` (which any other `version` overrides:
/// no subset selects v0) and `tier: backend`.
///
/// Policies, each selecting by one label: `app: catalog` (from the
/// bootstrap) gets mTLS DISABLE and has `/admin` denied; `version: v2`
/// (from `.label()` only) has `/canary` denied; `tier: backend` (from the
/// WorkloadGroup only) has `/internal` denied.
const MESH_YAML: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {name: catalog, namespace: shop}
spec:
  metadata:
    labels: {version: v0, tier: backend}
  template:
    serviceAccount: catalog
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: shop}
spec:
  host: catalog
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  http:
  - name: pinned-v2
    match:
    - headers:
        x-subset: {exact: v2}
    route:
    - destination: {host: catalog, subset: v2}
  - name: all-to-v1
    route:
    - destination: {host: catalog, subset: v1}
      weight: 100
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
metadata: {name: deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: catalog}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-canary, namespace: shop}
spec:
  selector: {matchLabels: {version: v2}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/canary*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-internal, namespace: shop}
spec:
  selector: {matchLabels: {tier: backend}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/internal*"]}}]
"#;

/// An embedded mesh-control (no CA: plaintext, open registration) on
/// [`MESH_YAML`].
struct Mesh {
    server: ServerHandle,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start() -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mesh.yaml"), MESH_YAML).expect("write mesh.yaml");
        let server = mesh_control::Server::builder()
            .config_dir(dir.path())
            .start()
            .await
            .expect("start mesh-control");
        assert_eq!(
            server.status()["diagnostics"],
            serde_json::json!([]),
            "the test mesh has problems"
        );
        Mesh { server, _dir: dir }
    }

    /// The bootstrap of catalog workload `node`, whose `LABELS` are
    /// `version: v1, app: catalog`.
    fn catalog_bootstrap(&self, node: &str) -> Bootstrap {
        let spec = BootstrapSpec::new(node, "shop")
            .label("version", "v1")
            .label("app", "catalog");
        let bootstrap = Bootstrap::from_json(&self.server.bootstrap(&spec)).expect("bootstrap");
        assert_eq!(
            bootstrap.labels().get("version").map(String::as_str),
            Some("v1")
        );
        bootstrap
    }

    /// Catalog endpoints mesh-control serves right now (its admin API).
    async fn catalog_endpoints(&self) -> u64 {
        let (status, services) =
            admin_request(self.server.admin_addr(), "GET", "/v1/services", "").await;
        assert_eq!(status, 200, "GET /v1/services: {services}");
        services["services"]
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|s| s["host"] == "catalog.shop.svc.cluster.local")
            })
            .and_then(|s| s["endpoints"].as_u64())
            .unwrap_or(0)
    }
}

/// A catalog server: its address, its inbound policy (from mesh-control's
/// server listener for it) and its `Serving`.
struct Catalog {
    addr: SocketAddr,
    inbound: InboundPolicy,
    serving: Serving,
    _xds: XdsClient,
}

/// Serves catalog from `bootstrap` on `bind` (`127.0.0.1:0`, or
/// `0.0.0.0:0` advertised as 127.0.0.1), registered with
/// `Registration::from_bootstrap` and then `tweak`. Every path answers
/// `<name> <path>`; the app is wrapped in a `ServerLayer` enforcing the
/// server listener's policies.
async fn serve_catalog(
    name: &'static str,
    bootstrap: Bootstrap,
    bind: &str,
    tweak: impl FnOnce(Registration) -> Registration,
) -> Catalog {
    let xds = XdsClient::start(bootstrap.clone());
    let listener = tokio::net::TcpListener::bind(bind).await.expect("bind");
    let local = listener.local_addr().expect("local addr");
    let inbound = InboundPolicy::from_xds(&xds, local).expect("inbound policy");
    inbound
        .ready(DEADLINE)
        .await
        .expect("the server listener arrives");
    let app = axum::Router::new()
        .fallback(move |uri: http::Uri| async move { format!("{name} {}", uri.path()) })
        .layer(ServerLayer::from_bootstrap(&bootstrap, "catalog").inbound(inbound.clone()));
    let mut registration =
        tweak(Registration::from_bootstrap(&bootstrap, "catalog").expect("registration"));
    let addr = if local.ip().is_unspecified() {
        registration = registration.advertise_address([127, 0, 0, 1].into());
        SocketAddr::from(([127, 0, 0, 1], local.port()))
    } else {
        local
    };
    let serving = proxyless::serve(listener, registration, app)
        .await
        .expect("serve catalog");
    Catalog {
        addr,
        inbound,
        serving,
        _xds: xds,
    }
}

impl Catalog {
    /// Waits until the server enforces the policy `name` (its server
    /// listener follows its registration, which comes after the first
    /// listener).
    async fn wait_for_policy(&self, name: &str) {
        eventually_named(&format!("the server enforces {name}"), DEADLINE, || {
            self.inbound
                .current()
                .policies()
                .iter()
                .any(|p| &**p.name() == name)
        })
        .await;
    }
}

/// GET http://catalog{path} through the mesh, pinned to subset v2 with
/// `x-subset: v2`: the status and the body.
async fn get(client: &Client, path: &str, subset_v2: bool) -> (u16, String) {
    let mut request = http::Request::get(format!("http://catalog{path}"));
    if subset_v2 {
        request = request.header("x-subset", "v2");
    }
    let response = client
        .clone()
        .oneshot(request.body(Full::new(Bytes::new())).expect("request"))
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

fn endpoints(xds: &XdsClient, cluster: &str) -> Vec<SocketAddr> {
    xds.snapshot()
        .endpoints
        .get(cluster)
        .map_or_else(Vec::new, |c| {
            c.localities
                .iter()
                .flat_map(|l| l.endpoints.iter().map(|e| e.address))
                .collect()
        })
}

#[tokio::test]
async fn the_bootstrap_labels_pick_the_subset_and_select_the_policies() {
    let mesh = Mesh::start().await;
    // No `.label()`: the bootstrap's `version: v1, app: catalog` only.
    let v1 = serve_catalog(
        "bootstrap-v1",
        mesh.catalog_bootstrap("catalog-1"),
        "127.0.0.1:0",
        |r| r,
    )
    .await;
    // The same bootstrap labels, `version` overridden to v2; listening on
    // 0.0.0.0, so its server listener finds its registration by node id.
    let v2 = serve_catalog(
        "label-v2",
        mesh.catalog_bootstrap("catalog-2"),
        "0.0.0.0:0",
        |r| r.label("version", "v2"),
    )
    .await;

    // Subsets: the bootstrap's v1 beats the WorkloadGroup's v0, and
    // `.label()`'s v2 beats both.
    let frontend = XdsClient::start(
        Bootstrap::from_json(&mesh.server.bootstrap_json("frontend-1", "shop")).expect("bootstrap"),
    );
    let client = Client::new(frontend.clone());
    let (status, body) = get(&client, "/items", false).await;
    assert_eq!(status, 200, "{body}");
    eventually_named("each subset has its one endpoint", DEADLINE, || {
        endpoints(&frontend, CATALOG_V1) == [v1.addr]
            && endpoints(&frontend, CATALOG_V2) == [v2.addr]
    })
    .await;
    for i in 0..20 {
        assert_eq!(
            get(&client, &format!("/items/{i}"), false).await,
            (200, format!("bootstrap-v1 /items/{i}")),
            "subset v1 gets all the traffic, and only the server whose bootstrap says v1 is in it"
        );
    }
    assert_eq!(
        get(&client, "/items", true).await,
        (200, "label-v2 /items".to_owned()),
        "subset v2 is the server whose .label() overrode its bootstrap's version"
    );

    // Policies select the same labels. `app: catalog` from the bootstrap:
    // DISABLE and /admin denied, on both servers.
    for (catalog, subset_v2) in [(&v1, false), (&v2, true)] {
        assert_eq!(catalog.inbound.mode(), MtlsMode::Disable);
        let (status, body) = get(&client, "/admin/users", subset_v2).await;
        assert_eq!(
            status, 403,
            "the policy selecting app: catalog applies to the server whose bootstrap says so: {body}"
        );
        assert!(body.contains("RBAC: access denied"), "{body}");
    }
    // `tier: backend` from the WorkloadGroup: both servers have it.
    v1.wait_for_policy("deny-internal").await;
    v2.wait_for_policy("deny-internal").await;
    assert_eq!(get(&client, "/internal", false).await.0, 403);
    assert_eq!(get(&client, "/internal", true).await.0, 403);
    // `version: v2` from `.label()` only: the v2 server (found by its node
    // id behind 0.0.0.0), not the v1 one.
    v2.wait_for_policy("deny-canary").await;
    assert_eq!(get(&client, "/canary", true).await.0, 403);
    assert_eq!(
        get(&client, "/canary", false).await,
        (200, "bootstrap-v1 /canary".to_owned()),
        "a policy selecting version: v2 does not apply to the v1 server"
    );
    assert!(
        !v1.inbound
            .current()
            .policies()
            .iter()
            .any(|p| &**p.name() == "deny-canary")
    );

    // Deregistration takes the endpoint out of EDS at once: mesh-control
    // serves one catalog endpoint fewer as soon as shutdown returns.
    assert_eq!(mesh.catalog_endpoints().await, 2);
    v2.serving.shutdown().await.expect("shutdown");
    assert_eq!(
        mesh.catalog_endpoints().await,
        1,
        "a deregistered endpoint is gone from mesh-control the moment shutdown returns"
    );
    eventually_named("the client sees subset v2 empty", DEADLINE, || {
        endpoints(&frontend, CATALOG_V2).is_empty()
    })
    .await;
    v1.serving.shutdown().await.expect("shutdown");
    assert_eq!(mesh.catalog_endpoints().await, 0);
}

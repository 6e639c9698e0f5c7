//! Workloads that start while the control plane is down (issue 12), end to
//! end over real sockets with an embedded mesh-control.
//!
//! 1. A normal run fills the caches: mesh-control serves "catalog: 100 % to
//!    subset v1", a v1 server registers with `serve`, a frontend calls it
//!    (its xDS client writes the config to its cache file).
//! 2. Everything stops, mesh-control included (its ports are free).
//! 3. Cold start with mesh-control down: the v1 server restarts on its
//!    address (`serve` returns serving, unregistered) and a new frontend
//!    starts; its first call succeeds under the cached routing within
//!    seconds (the cache wait is 1 s; the connect timeout 20 s), and it says
//!    it is stale.
//! 4. mesh-control comes back on the same ports with a new config (100 % to
//!    v2, a v2 server registered): the frontend switches to it and is no
//!    longer stale, and the v1 server registers in the background.
//!
//! The second test does the same for a zero-trust mesh (STRICT mTLS, an
//! AuthorizationPolicy): with mesh-control down, `serve_with` gets its
//! server listener (gRFC A36) from the xDS cache, and both workloads get
//! their certificates from the certificate cache next to it.
//!
//! The xDS caches live in a temporary directory named by the bootstrap's
//! `proxyless.cache_file` (the clients do not consult the environment;
//! the certificate cache follows `PROXYLESS_XDS_CACHE` when it is set, and
//! the bootstrap otherwise).

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_control::ServerHandle;
use std::sync::Arc;

use axum::extract::Extension;
use mesh_control::ca::{CertificateAuthority, JoinTokens};
use proxyless::control::BootstrapSpec;
use proxyless::xds::ClientOptions;
use proxyless::{
    Bootstrap, Client, InboundPolicy, PeerIdentity, Registration, Security, ServerLayer, Serving,
    WorkloadCertificates, XdsClient,
};
use support::{eventually_async, eventually_named};
use tower::ServiceExt;

/// Generous: the point of the test is seconds, not the 20 s connect timeout.
const DEADLINE: Duration = Duration::from_secs(30);
const CATALOG_V1: &str = "outbound|80|v1|catalog.shop.svc.cluster.local";

/// mesh-control on `config` at the given addresses (port 0: any).
async fn control(config: &Path, xds: SocketAddr, admin: SocketAddr) -> ServerHandle {
    mesh_control::Server::builder()
        .config_dir(config)
        .xds_addr(xds)
        .admin_addr(admin)
        .lease_check_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap_or_else(|e| panic!("start mesh-control on {xds} / {admin}: {e}"))
}

/// The bootstrap mesh-control writes for `spec`, with the cache placed in
/// `cache_dir` by the bootstrap's `proxyless` object (gRPC ignores it).
fn bootstrap(control: &ServerHandle, spec: &BootstrapSpec, cache_dir: &Path) -> Bootstrap {
    let mut json: serde_json::Value =
        serde_json::from_str(&control.bootstrap(spec)).expect("bootstrap JSON");
    json["proxyless"] = serde_json::json!({
        "cache_file": format!("{}/", cache_dir.display()),
    });
    Bootstrap::from_json(&json.to_string()).unwrap_or_else(|e| panic!("{e}"))
}

/// The frontend's xDS client: the cache where its bootstrap says (no
/// environment lookup), quick reconnects.
fn frontend_xds(bootstrap: Bootstrap) -> XdsClient {
    XdsClient::start_with(
        bootstrap,
        ClientOptions::default()
            .backoff(Duration::from_millis(10), Duration::from_millis(500))
            .env_lookup(|_| None),
    )
}

/// A catalog server answering its version, served with `serve` and
/// registered as its bootstrap says.
async fn catalog(listener: tokio::net::TcpListener, bootstrap: &Bootstrap) -> Serving {
    let version = bootstrap.labels()["version"].clone();
    let app = axum::Router::new().fallback(move || {
        let version = version.clone();
        async move { version }
    });
    let registration = Registration::from_bootstrap(bootstrap, "catalog").expect("registration");
    mesh_testkit::wait::within("serve", proxyless::serve(listener, registration, app))
        .await
        .unwrap_or_else(|e| panic!("serve catalog: {e}"))
}

/// GET http://catalog/: the version that answered.
async fn call(client: &Client) -> Result<String, String> {
    let request = http::Request::get("http://catalog/")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = client
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| format!("{e}: {:?}", std::error::Error::source(&e)))?;
    if response.status() != 200 {
        return Err(format!("status {}", response.status()));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Endpoints of subset v1 at `xds` (while a route references it).
fn v1_endpoints(xds: &XdsClient) -> usize {
    xds.snapshot()
        .endpoints
        .get(CATALOG_V1)
        .map_or(0, |c| c.endpoint_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_start_with_mesh_control_down_serves_the_cached_config_then_the_new_one() {
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let config_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        config_dir.path().join("mesh.yaml"),
        mesh_testkit::yaml::catalog_routed_to("v1"),
    )
    .expect("write config");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let frontend_spec = BootstrapSpec::new("frontend", "shop");
    let v1_spec = BootstrapSpec::new("catalog-v1", "shop").label("version", "v1");
    let v2_spec = BootstrapSpec::new("catalog-v2", "shop").label("version", "v2");

    // 1. A normal run fills the frontend's cache.
    let mesh = control(config_dir.path(), any, any).await;
    let (xds_addr, admin_addr) = (mesh.xds_addr(), mesh.admin_addr());
    let v1_bootstrap = bootstrap(&mesh, &v1_spec, cache_dir.path());
    let frontend_bootstrap = bootstrap(&mesh, &frontend_spec, cache_dir.path());
    let v1_listener = tokio::net::TcpListener::bind(any).await.expect("bind v1");
    let v1_addr = v1_listener.local_addr().expect("v1 address");
    let v1 = catalog(v1_listener, &v1_bootstrap).await;
    assert!(v1.is_registered(), "mesh-control is up: registered at once");
    let xds = frontend_xds(frontend_bootstrap.clone());
    let client = Client::new(xds.clone());
    mesh_testkit::wait::within_for(
        "catalog's listener at the frontend",
        DEADLINE,
        xds.wait_for_listener("catalog"),
    )
    .await
    .expect("catalog exists");
    eventually_named("the v1 endpoint at the frontend", DEADLINE, || {
        v1_endpoints(&xds) == 1
    })
    .await;
    assert_eq!(call(&client).await.as_deref(), Ok("v1"));
    eventually_named("the frontend's config in its cache file", DEADLINE, || {
        xds.cache_status().saved_version == *xds.changes().borrow()
    })
    .await;
    let cache_file = xds.cache_status().file.expect("a cache file");
    assert!(
        cache_file.starts_with(cache_dir.path()),
        "{}",
        cache_file.display()
    );

    // 2. Everything stops: mesh-control first (its ports are then free),
    //    then the frontend and the server. In this order no push reaches
    //    the frontend after mesh-control is gone: were the server to
    //    deregister first, the frontend (whose xDS task outlives the
    //    handles dropped here) could cache the endpoint list without v1.
    mesh.shutdown().await;
    drop(client);
    drop(xds);
    let deregistered = v1.shutdown().await;
    assert_eq!(
        deregistered.map_err(|e| e.kind()),
        Err(proxyless::ErrorKind::Registration),
        "with mesh-control down, v1 cannot deregister (its lease goes with mesh-control)"
    );

    // 3. Cold start while mesh-control is down.
    let v1_listener = tokio::net::TcpListener::bind(v1_addr)
        .await
        .expect("rebind v1 on its address");
    let started = Instant::now();
    let v1 = catalog(v1_listener, &v1_bootstrap).await;
    assert!(
        !v1.is_registered(),
        "serve returns serving while mesh-control is down"
    );
    let xds = frontend_xds(frontend_bootstrap.clone());
    let client = Client::new(xds.clone());
    let first = call(&client).await;
    let took = started.elapsed();
    assert_eq!(
        first.as_deref(),
        Ok("v1"),
        "the first call of a cold start with mesh-control down succeeds under the cached \
         routing (100 % to v1)"
    );
    assert!(
        took < Duration::from_secs(10),
        "the cold start took {took:?}: it should take about the 1 s cache wait, not the 20 s \
         connect timeout"
    );
    let stale_since = xds.stale_since().expect("the frontend says it is stale");
    let dump = xds.config_dump_json();
    let stale = dump["control_server"]["cache"]["stale"]
        .as_str()
        .unwrap_or_else(|| panic!("stale in the dump: {:#}", dump["control_server"]));
    assert!(stale.starts_with("stale since "), "{stale}");
    assert!(
        stale_since <= std::time::SystemTime::now(),
        "stale since the cache was written"
    );
    for _ in 0..10 {
        assert_eq!(call(&client).await.as_deref(), Ok("v1"));
    }

    // 4. mesh-control is back on its ports with a new config: 100 % to v2,
    //    and a v2 server registered.
    std::fs::write(
        config_dir.path().join("mesh.yaml"),
        mesh_testkit::yaml::catalog_routed_to("v2"),
    )
    .expect("write config");
    let mesh = control(config_dir.path(), xds_addr, admin_addr).await;
    let v2_bootstrap = bootstrap(&mesh, &v2_spec, cache_dir.path());
    let v2 = catalog(
        tokio::net::TcpListener::bind(any).await.expect("bind v2"),
        &v2_bootstrap,
    )
    .await;
    assert!(v2.is_registered());
    eventually_async("the frontend to route to v2", DEADLINE, || {
        let client = client.clone();
        async move { call(&client).await.as_deref() == Ok("v2") }
    })
    .await;
    for _ in 0..10 {
        assert_eq!(call(&client).await.as_deref(), Ok("v2"));
    }
    assert_eq!(xds.stale_since(), None, "the server answered: not stale");
    assert_eq!(
        xds.config_dump_json()["control_server"]["cache"]["stale"],
        serde_json::Value::Null
    );
    // The v1 server registered in the background, with the new mesh-control
    // (after v2: the second registration it has seen).
    eventually_named("the v1 server registered again", DEADLINE, || {
        v1.is_registered() && mesh.status()["counters"]["registrations"] == 2
    })
    .await;

    v2.shutdown().await.expect("v2 shutdown");
    v1.shutdown().await.expect("v1 shutdown");
    mesh.shutdown().await;
}

/// The zero-trust mesh: catalog in `shop`, STRICT mTLS, only the frontend's
/// identity may call catalog.
const SECURE_YAML: &str = r#"
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
metadata: {name: catalog-allow-frontend, namespace: shop}
spec:
  selector: {matchLabels: {app: catalog}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
"#;

/// mesh-control with the CA `ca` (kept across restarts, as a deployment
/// keeps its CA's key), its trust bundle at `bundle` (which outlives it).
async fn secure_control(
    config: &Path,
    bundle: &Path,
    ca: &Arc<CertificateAuthority>,
    xds: SocketAddr,
    admin: SocketAddr,
) -> ServerHandle {
    mesh_control::Server::builder()
        .config_dir(config)
        .ca(ca.clone())
        .trust_bundle_file(bundle)
        .xds_addr(xds)
        .admin_addr(admin)
        .lease_check_interval(Duration::from_millis(20))
        .start()
        .await
        .unwrap_or_else(|e| panic!("start mesh-control with its CA on {xds} / {admin}: {e}"))
}

/// A workload's certificates from its bootstrap's `mesh_ca` provider.
async fn certificates(bootstrap: &Bootstrap) -> WorkloadCertificates {
    mesh_testkit::wait::within(
        "the workload certificates",
        WorkloadCertificates::from_bootstrap(bootstrap),
    )
    .await
    .unwrap_or_else(|e| panic!("certificates: {e}"))
    .expect("a mesh_ca provider")
}

/// catalog under `serve_with`: the mTLS mode and policies of its A36
/// server listener, answering the caller's SPIFFE ID.
struct SecureCatalog {
    serving: Serving,
    xds: XdsClient,
    certificates: WorkloadCertificates,
}

async fn secure_catalog(listener: tokio::net::TcpListener, bootstrap: &Bootstrap) -> SecureCatalog {
    let addr = listener.local_addr().expect("address");
    let xds = frontend_xds(bootstrap.clone());
    let certificates = certificates(bootstrap).await;
    let inbound = InboundPolicy::from_xds(&xds, addr).expect("inbound policy");
    let app = axum::Router::new()
        .fallback(|peer: Option<Extension<PeerIdentity>>| async move {
            peer.map_or_else(|| "anonymous".to_owned(), |p| p.spiffe_id().to_string())
        })
        .layer(ServerLayer::from_bootstrap(bootstrap, "catalog").inbound(inbound.clone()));
    let registration = Registration::from_bootstrap(bootstrap, "catalog").expect("registration");
    let security = Security::new(inbound).certificates(certificates.store().clone());
    let serving = mesh_testkit::wait::within(
        "serve_with",
        proxyless::serve_with(listener, registration, app, security),
    )
    .await
    .unwrap_or_else(|e| panic!("serve_with catalog: {e}"));
    SecureCatalog {
        serving,
        xds,
        certificates,
    }
}

/// Waits until `xds` has written the config it runs to its cache file.
async fn cached(xds: &XdsClient, who: &str) {
    eventually_named(
        &format!("{who}'s config in its cache file"),
        DEADLINE,
        || xds.cache_status().saved_version == *xds.changes().borrow(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_trust_cold_start_takes_its_policy_and_certificates_from_the_caches() {
    let cache_dir = tempfile::tempdir().expect("tempdir");
    let config_dir = tempfile::tempdir().expect("tempdir");
    let bundle_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(config_dir.path().join("mesh.yaml"), SECURE_YAML).expect("write config");
    let bundle = bundle_dir.path().join("root-cert.pem");
    let mut join = JoinTokens::new();
    for account in ["catalog", "frontend"] {
        join.insert(format!("{account}-cold-start-token"), "shop", account)
            .expect("join token");
    }
    let ca = Arc::new(
        CertificateAuthority::builder("cluster.local")
            .join_tokens(join)
            .build()
            .expect("CA"),
    );
    let any: SocketAddr = "127.0.0.1:0".parse().expect("address");
    let spec = |node: &str, account: &str| {
        BootstrapSpec::new(node, "shop")
            .service_account(account)
            .label("app", account)
            .join_token(format!("{account}-cold-start-token"))
    };

    // 1. A normal run: certificates from the CA, config from mesh-control,
    //    all of it cached.
    let mesh = secure_control(config_dir.path(), &bundle, &ca, any, any).await;
    let catalog_bootstrap = bootstrap(&mesh, &spec("catalog-1", "catalog"), cache_dir.path());
    let frontend_bootstrap = bootstrap(&mesh, &spec("frontend-1", "frontend"), cache_dir.path());
    let listener = tokio::net::TcpListener::bind(any).await.expect("bind");
    let catalog_addr = listener.local_addr().expect("address");
    let catalog = secure_catalog(listener, &catalog_bootstrap).await;
    let frontend_certificates = certificates(&frontend_bootstrap).await;
    let frontend = frontend_xds(frontend_bootstrap.clone());
    let client =
        Client::new(frontend.clone()).with_certificates(frontend_certificates.store().clone());
    let frontend_id = "spiffe://cluster.local/ns/shop/sa/frontend";
    eventually_async("catalog to answer the frontend over mTLS", DEADLINE, || {
        let client = client.clone();
        async move { call(&client).await.as_deref() == Ok(frontend_id) }
    })
    .await;
    cached(&frontend, "the frontend").await;
    cached(&catalog.xds, "catalog").await;
    let serials = (
        catalog.certificates.store().serial(),
        frontend_certificates.store().serial(),
    );

    // 2. Everything stops.
    drop(client);
    drop(frontend);
    drop(frontend_certificates);
    let SecureCatalog {
        serving,
        xds,
        certificates: catalog_certificates,
    } = catalog;
    serving.shutdown().await.expect("catalog shutdown");
    drop((xds, catalog_certificates));
    mesh.shutdown().await;

    // 3. Cold start with mesh-control (and its CA) down.
    let listener = tokio::net::TcpListener::bind(catalog_addr)
        .await
        .expect("rebind catalog on its address");
    let catalog = secure_catalog(listener, &catalog_bootstrap).await;
    assert!(!catalog.serving.is_registered());
    assert!(
        catalog.xds.stale_since().is_some(),
        "catalog's policy is the cached one"
    );
    assert_eq!(
        catalog.certificates.store().serial(),
        serials.0,
        "catalog serves with its cached certificate"
    );
    let frontend_certificates = certificates(&frontend_bootstrap).await;
    assert_eq!(
        frontend_certificates.store().serial(),
        serials.1,
        "the frontend calls with its cached certificate"
    );
    let frontend = frontend_xds(frontend_bootstrap.clone());
    let client =
        Client::new(frontend.clone()).with_certificates(frontend_certificates.store().clone());
    assert_eq!(
        call(&client).await.as_deref(),
        Ok(frontend_id),
        "mTLS and the AuthorizationPolicy from the caches"
    );
    // STRICT holds: a plaintext caller gets no HTTP answer.
    let plaintext = tokio::time::timeout(DEADLINE, async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(catalog_addr).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: catalog\r\n\r\n")
            .await?;
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply).await;
        Ok::<_, std::io::Error>(reply)
    })
    .await
    .expect("the connection ends")
    .unwrap_or_default();
    assert!(
        !reply_is_http(&plaintext),
        "plaintext is refused under the cached STRICT mode: {:?}",
        String::from_utf8_lossy(&plaintext)
    );
    catalog
        .serving
        .shutdown()
        .await
        .expect("catalog shutdown (never registered)");
}

fn reply_is_http(reply: &[u8]) -> bool {
    reply.starts_with(b"HTTP/")
}

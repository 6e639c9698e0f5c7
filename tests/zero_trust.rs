//! Zero trust end to end over real sockets (issue 5): mesh-control's CA issues
//! SPIFFE certificates for join tokens, PeerAuthentication STRICT makes clients
//! switch to mTLS on their own, AuthorizationPolicy decides who may call, and
//! certificates and roots rotate under load without a failed request.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::Extension;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use mesh_control::ServerHandle;
use mesh_control::ca::{CertificateAuthority, JoinTokens};
use mesh_testkit::wait::eventually_ok_async;
use proxyless::control::BootstrapSpec;
use proxyless::telemetry::{Identity, MetricsRegistry, Telemetry};
use proxyless::{
    Bootstrap, Client, InboundPolicy, PeerIdentity, Registration, Security, ServerLayer, Serving,
    WorkloadCertificates, XdsClient,
};
use support::eventually_named;
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
const TRUST_DOMAIN: &str = "cluster.local";

/// The service accounts of the test mesh, each with its join token.
const ACCOUNTS: &[&str] = &["catalog", "frontend", "intruder"];

/// catalog in `shop`, STRICT mTLS for the namespace, and only the frontend may call
/// catalog (selected by its `app` label).
const MESH_YAML: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: catalog
  namespace: shop
spec:
  hosts: [catalog]
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: STATIC
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: shop
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: catalog-allow-frontend
  namespace: shop
spec:
  selector:
    matchLabels:
      app: catalog
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/frontend"]
"#;

/// An embedded mesh-control with a CA, and the join tokens it accepts.
struct Mesh {
    server: ServerHandle,
    tokens: BTreeMap<&'static str, String>,
    _dir: tempfile::TempDir,
}

impl Mesh {
    async fn start(lifetime: Duration, overlap: Duration) -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mesh.yaml"), MESH_YAML).expect("write mesh.yaml");
        let mut join = JoinTokens::new();
        let mut tokens = BTreeMap::new();
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
            .default_lifetime(lifetime)
            .rotation_overlap(overlap)
            .build()
            .expect("CA");
        let server = mesh_control::Server::builder()
            .config_dir(dir.path())
            .ca(ca)
            .lease_check_interval(Duration::from_millis(50))
            .start()
            .await
            .expect("start mesh-control");
        assert_eq!(
            server.status()["diagnostics"],
            serde_json::json!([]),
            "the test mesh has problems"
        );
        Mesh {
            server,
            tokens,
            _dir: dir,
        }
    }

    /// A workload running as `account` with the `app: <account>` label: its
    /// bootstrap (TLS to mesh-control, certificates from the CA) and certificates.
    async fn workload(&self, node: &str, account: &'static str) -> Workload {
        let spec = BootstrapSpec::new(node, "shop")
            .service_account(account)
            .label("app", account)
            .join_token(self.tokens[account].clone());
        let bootstrap = Bootstrap::from_json(&self.server.bootstrap(&spec)).expect("bootstrap");
        assert!(
            bootstrap.xds_server_tls().is_some(),
            "with a CA, the bootstrap must speak TLS to mesh-control"
        );
        let certificates = WorkloadCertificates::from_bootstrap(&bootstrap)
            .await
            .expect("certificates from the mesh CA")
            .expect("the bootstrap names a certificate provider");
        assert_eq!(
            certificates.spiffe_id().as_str(),
            format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/{account}")
        );
        let xds = XdsClient::start(bootstrap.clone());
        Workload {
            bootstrap,
            xds,
            certificates,
        }
    }
}

struct Workload {
    bootstrap: Bootstrap,
    xds: XdsClient,
    certificates: WorkloadCertificates,
}

impl Workload {
    /// A mesh client presenting this workload's certificate.
    fn client(&self) -> Client {
        Client::new(self.xds.clone()).with_certificates(self.certificates.store().clone())
    }
}

/// What catalog saw: every caller identity and certificate serial, per request.
#[derive(Default)]
struct Seen {
    serials: Mutex<BTreeSet<String>>,
    requests: AtomicU64,
}

/// Serves catalog as `workload` with the secure serve: the A36 listener from
/// mesh-control decides the mTLS mode and the authorization policies. GET /items
/// answers `<caller SPIFFE ID> <certificate serial>`.
async fn serve_catalog(workload: &Workload) -> (Serving, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("local addr");
    let inbound = InboundPolicy::from_xds(&workload.xds, addr).expect("inbound policy");
    let seen = Arc::new(Seen::default());
    let app =
        axum::Router::new()
            .route(
                "/items",
                axum::routing::get(
                    |Extension(seen): Extension<Arc<Seen>>,
                     peer: Option<Extension<PeerIdentity>>| async move {
                        seen.requests.fetch_add(1, Ordering::Relaxed);
                        match peer {
                            Some(Extension(peer)) => {
                                let serial = peer.serial().unwrap_or("-").to_owned();
                                seen.serials.lock().expect("lock").insert(serial.clone());
                                format!("{} {serial}", peer.spiffe_id())
                            }
                            None => "anonymous -".to_owned(),
                        }
                    },
                ),
            )
            .layer(Extension(seen.clone()))
            .layer(
                ServerLayer::from_bootstrap(&workload.bootstrap, "catalog")
                    .inbound(inbound.clone()),
            );
    let registration =
        Registration::from_bootstrap(&workload.bootstrap, "catalog").expect("registration");
    let security = Security::new(inbound).certificates(workload.certificates.store().clone());
    let serving = proxyless::serve_with(listener, registration, app, security)
        .await
        .expect("serve catalog");
    (serving, seen)
}

/// GET http://catalog/items: the status and the body.
async fn get_items(client: &Client) -> Result<(u16, String), String> {
    let request = http::Request::get("http://catalog/items")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let response = client
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Waits until `client` gets a 200 from catalog (discovery, registration and the
/// first certificates all take a moment).
async fn wait_for_catalog(client: &Client) {
    eventually_ok_async(
        "catalog to answer the frontend",
        DEADLINE,
        move || async move {
            match get_items(client).await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mtls_and_authorization_from_istio_yaml() {
    let mesh = Mesh::start(Duration::from_secs(3600), Duration::from_secs(3600)).await;
    let catalog = mesh.workload("catalog-1", "catalog").await;
    let (serving, seen) = serve_catalog(&catalog).await;

    // The frontend never asked for mTLS: the namespace is STRICT, so CDS says so
    // (auto mTLS), and catalog sees the frontend's SPIFFE ID.
    let frontend = mesh.workload("frontend-1", "frontend").await;
    let client = frontend.client();
    wait_for_catalog(&client).await;
    let (status, body) = get_items(&client).await.expect("frontend → catalog");
    assert_eq!(status, 200, "{body}");
    let serial = frontend.certificates.store().serial();
    assert_eq!(
        body,
        format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend {serial}"),
        "catalog must see the frontend's identity and its current certificate"
    );

    // The frontend's own metrics (reporter="source") name the server by the
    // SPIFFE ID the client verified in the handshake, as Istio's sidecar does:
    // what the Workload dashboard's "Outgoing Requests By Destination" selects
    // (`destination_principal=~"spiffe.*"`). Two calls: the second goes out on
    // the pooled connection, which keeps the identity it was verified with.
    let registry = MetricsRegistry::new();
    let telemetry = Telemetry::builder(Identity::from_bootstrap(&frontend.bootstrap, "frontend"))
        .metrics(&registry)
        .build();
    let traced = frontend.client().with_telemetry(telemetry);
    for _ in 0..2 {
        let request = http::Request::get("http://catalog/items")
            .body(Full::new(Bytes::new()))
            .expect("request");
        let response = traced
            .clone()
            .oneshot(request)
            .await
            .expect("traced frontend → catalog");
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.expect("body");
    }
    let scrape = registry.render();
    let sourced: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("reporter=\"source\""))
        .collect();
    let catalog_id = format!("spiffe://{TRUST_DOMAIN}/ns/shop/sa/catalog");
    assert!(
        matches!(sourced.as_slice(), [line] if line.contains(&format!("destination_principal=\"{catalog_id}\""))
            && line.contains("destination_service_name=\"catalog\"")
            && line.ends_with(" 2")),
        "the frontend's two calls must be one series naming catalog's verified identity \
         {catalog_id}:\n{}",
        sourced.join("\n")
    );

    // A valid mesh identity that no ALLOW policy names: 403 from the policy.
    let intruder = mesh.workload("intruder-1", "intruder").await;
    let before = seen.requests.load(Ordering::Relaxed);
    let (status, body) = get_items(&intruder.client())
        .await
        .expect("intruder → catalog");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("RBAC: access denied"), "{body}");
    assert_eq!(
        seen.requests.load(Ordering::Relaxed),
        before,
        "a denied request must never reach the app"
    );

    // Under the CA a client without credentials gets no config at all: ADS
    // refuses it, and the call says what to send.
    let anonymous = Client::new(XdsClient::start(
        Bootstrap::from_json(
            &mesh
                .server
                .bootstrap(&BootstrapSpec::new("anonymous-1", "shop")),
        )
        .expect("bootstrap"),
    ));
    let error = get_items(&anonymous)
        .await
        .expect_err("an anonymous client must get no config");
    assert!(
        error.contains("requires credentials") && error.contains("join token"),
        "{error}"
    );

    // Plaintext straight to catalog's socket gets no HTTP answer at all.
    let mut plain = tokio::net::TcpStream::connect(serving.local_addr())
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    plain
        .write_all(b"GET /items HTTP/1.1\r\nhost: catalog\r\n\r\n")
        .await
        .expect("write");
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, plain.read_to_end(&mut reply)).await;
    assert!(
        !String::from_utf8_lossy(&reply).contains("HTTP/1.1 200"),
        "plaintext must not be served under STRICT: {}",
        String::from_utf8_lossy(&reply)
    );

    // The intruder's join token cannot register an endpoint of catalog.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let registration =
        Registration::from_bootstrap(&intruder.bootstrap, "catalog").expect("registration");
    let app = axum::Router::new().route("/items", axum::routing::get(|| async { "fake" }));
    let error = proxyless::serve(listener, registration, app)
        .await
        .expect_err("an intruder must not back catalog");
    let message = error.to_string();
    assert!(
        message.contains("403") || message.contains("not allowed") || message.contains("denied"),
        "{message}"
    );

    serving.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_and_roots_rotate_under_load_without_a_failed_request() {
    const LIFETIME: Duration = Duration::from_secs(4);
    const LOAD: Duration = Duration::from_secs(12);
    let mesh = Mesh::start(LIFETIME, Duration::from_secs(3)).await;
    let catalog = mesh.workload("catalog-1", "catalog").await;
    let (serving, seen) = serve_catalog(&catalog).await;
    let frontend = mesh.workload("frontend-1", "frontend").await;
    let client = frontend.client();
    wait_for_catalog(&client).await;
    let ca = mesh.server.ca().expect("the CA").clone();
    let first_root = ca.signing_root_pem();

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let stop = Instant::now() + LOAD;
    let mut load = Vec::new();
    for _ in 0..4 {
        let client = client.clone();
        let ok = ok.clone();
        let failed = failed.clone();
        load.push(tokio::spawn(async move {
            while Instant::now() < stop {
                match get_items(&client).await {
                    Ok((200, _)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed.lock().expect("lock").push(format!("{other:?}")),
                }
            }
        }));
    }

    // After each renewal of the frontend's certificate, a new connection (a fresh
    // client, so a fresh pool) presents the new serial.
    let mut changes = frontend.certificates.store().changes();
    let mut renewals = Vec::new();
    let rotate_at = Instant::now() + Duration::from_secs(4);
    let mut rotated = false;
    while Instant::now() < stop {
        if !rotated && Instant::now() >= rotate_at {
            mesh.server.rotate_root().expect("root rotation");
            rotated = true;
        }
        let wait = tokio::time::timeout(Duration::from_millis(500), changes.changed()).await;
        if !matches!(wait, Ok(Ok(()))) {
            continue;
        }
        let serial = frontend.certificates.store().serial();
        let fresh = frontend.client();
        let (status, body) = get_items(&fresh).await.expect("fresh connection");
        assert_eq!(status, 200, "{body}");
        let presented = body.split(' ').nth(1).unwrap_or_default().to_owned();
        let current = frontend.certificates.store().serial();
        assert!(
            presented == serial || presented == current,
            "a connection opened after the renewal to {serial} presented {presented}"
        );
        renewals.push(serial);
    }
    for task in load {
        task.await.expect("load task");
    }
    let failed = failed.lock().expect("lock").clone();
    let ok = ok.load(Ordering::Relaxed);
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during rotation, e.g. {:?}",
        failed.len(),
        ok + failed.len() as u64,
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 100, "too little load to prove anything: {ok} requests");
    // 4 s lifetimes renewed at half-life: about 6 renewals in 12 s.
    assert!(
        renewals.len() >= 4,
        "expected a renewal every ~2 s, saw {}: {renewals:?}",
        renewals.len()
    );
    let served: BTreeSet<String> = seen.serials.lock().expect("lock").clone();
    for serial in &renewals {
        assert!(served.contains(serial), "catalog never saw serial {serial}");
    }
    // The new root signs once the overlap is over, and the load never noticed.
    assert!(rotated);
    eventually_named("the new root signs", DEADLINE, || {
        ca.signing_root_pem() != first_root
    })
    .await;
    // Workloads keep renewing once the new root signs (mesh-control's own
    // certificate, which they verify on every renewal, now comes from it too).
    let after_root = frontend.certificates.store().serial();
    eventually_named("two renewals under the new root", DEADLINE, || {
        changes.has_changed().unwrap_or(false) && {
            changes.borrow_and_update();
            frontend.certificates.store().serial() != after_root
        }
    })
    .await;
    let (status, body) = get_items(&frontend.client())
        .await
        .expect("after the new root");
    assert_eq!(status, 200, "{body}");
    println!(
        "rotation under load: {ok} requests over {LOAD:?}, 0 failed; {} renewals of the \
         frontend's {LIFETIME:?} certificate, each presented on a new connection; catalog saw \
         {} client serials; root rotated at 4 s with a 3 s overlap",
        renewals.len(),
        served.len()
    );
    serving.shutdown().await.expect("shutdown");
}

/// A workload on another host: its bootstrap names a copy of the trust bundle
/// that nobody updates when the root rotates. It keeps renewing its
/// certificate and heartbeating its registration after the new root signs
/// mesh-control's own certificate, because it also trusts the bundle the CA
/// sends with every certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_whose_ca_file_is_not_updated_survives_a_root_rotation() {
    // The overlap covers half a lifetime, so every workload has renewed (and
    // received the new root in its bundle) before the new root signs.
    let mesh = Mesh::start(Duration::from_secs(4), Duration::from_secs(3)).await;
    let copy = mesh._dir.path().join("stale-root.pem");
    let bundle_file = mesh.server.trust_bundle_file().expect("trust bundle file");
    std::fs::copy(&bundle_file, &copy).expect("copy the bundle");
    let spec = BootstrapSpec::new("catalog-remote", "shop")
        .service_account("catalog")
        .label("app", "catalog")
        .join_token(mesh.tokens["catalog"].clone());
    let json = mesh
        .server
        .bootstrap(&spec)
        .replace(&*bundle_file.to_string_lossy(), &copy.to_string_lossy());
    let bootstrap = Bootstrap::from_json(&json).expect("bootstrap");
    let certificates = WorkloadCertificates::from_bootstrap(&bootstrap)
        .await
        .expect("certificates")
        .expect("a provider");
    let workload = Workload {
        xds: XdsClient::start(bootstrap.clone()),
        bootstrap,
        certificates,
    };
    let (serving, _seen) = serve_catalog(&workload).await;

    let ca = mesh.server.ca().expect("CA").clone();
    let first_root = ca.signing_root_pem();
    mesh.server.rotate_root().expect("rotate");
    eventually_named("the new root signs", DEADLINE, || {
        ca.signing_root_pem() != first_root
    })
    .await;
    // Certificates issued from now on come from the new root, mesh-control's
    // serving certificate included (it renews at half-life).
    let mut changes = workload.certificates.store().changes();
    changes.borrow_and_update();
    let mut renewals = 0;
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        if tokio::time::timeout(Duration::from_millis(500), changes.changed())
            .await
            .is_ok_and(|r| r.is_ok())
        {
            renewals += 1;
        }
    }
    assert!(
        renewals >= 2,
        "the workload renewed {renewals} times in 6 s after the new root took over"
    );
    // The lease is still held: heartbeats verified mesh-control all along.
    let status = mesh.server.status();
    let registered = status
        .to_string()
        .contains(&serving.local_addr().to_string());
    assert!(registered, "the registration was lost: {status}");
    serving.shutdown().await.expect("shutdown");
}

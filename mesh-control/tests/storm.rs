//! A registration storm over real sockets (issue 13, acceptance 6): 100
//! identities register 100 endpoints each, 10,000 in all, through the admin
//! API over TLS with their join tokens, 500 requests in flight on keep-alive
//! connections, while an ADS client watches EDS.
//!
//! What a user would notice if registrations were translated one by one: a
//! storm whose cost grows with the square of its size (each registration
//! re-translating and re-encoding the whole mesh), and a control server
//! whose runtime is busy translating instead of answering. So the test
//! asserts what the operator can see: every registration is accepted, all
//! of them are in `/v1/services` and in EDS, and the number of full
//! translations during the burst (`mesh_control_translations_total`) stays
//! within `duration / debounce + 2`, the debounce read from
//! `mesh_control_registration_debounce_seconds`. The burst's duration and
//! the CPU time per registration are printed, not asserted (they depend on
//! the machine).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use mesh_control::ca::{CertificateAuthority, JoinTokens};
use mesh_core::xds;
use mesh_testkit::ads::AdsClient;
use mesh_testkit::pki::{self, Leaf, csr};
use mesh_testkit::wait::within_for;
use rustls::pki_types::ServerName;
use serde_json::json;

const NAMESPACE: &str = "storm";
const IDENTITIES: usize = 100;
const PER_IDENTITY: usize = 100;
const TOTAL: usize = IDENTITIES * PER_IDENTITY;
/// Requests in flight at once, one keep-alive connection each.
const IN_FLIGHT: usize = 500;
/// Bounds the waits of the test, not what it measures: the burst takes a
/// few seconds in a debug build on a loaded machine.
const GENEROUS: Duration = Duration::from_secs(240);

/// The join token of identity `i` (`ns/storm/sa/svc-<i>`).
fn token(i: usize) -> String {
    format!("storm-join-token-{i:03}-0123456789abcdef")
}

fn tokens() -> JoinTokens {
    let mut tokens = JoinTokens::new();
    for i in 0..IDENTITIES {
        tokens
            .insert(token(i), NAMESPACE, &format!("svc-{i}"))
            .expect("a join token");
    }
    tokens
}

/// One service per identity, declared (a ServiceEntry without endpoints:
/// they register) and backed by the service account of its name in its own
/// namespace, which its WorkloadGroup also names.
fn config() -> String {
    let mut yaml = String::new();
    for i in 0..IDENTITIES {
        yaml.push_str(&format!(
            r#"---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: svc-{i}, namespace: {NAMESPACE}}}
spec:
  hosts: [svc-{i}]
  resolution: STATIC
  ports:
  - {{number: 80, name: grpc, protocol: GRPC}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata: {{name: svc-{i}, namespace: {NAMESPACE}}}
spec:
  template:
    serviceAccount: svc-{i}
"#
        ));
    }
    yaml
}

/// Registration `k`: identity `k % 100` (so that the requests in flight
/// are of many identities), its own address, one port per registration.
fn registration(k: usize) -> (usize, String) {
    let (i, j) = (k % IDENTITIES, k / IDENTITIES);
    let address = IpAddr::V4(Ipv4Addr::new(10, 77, 0, u8::try_from(i + 1).unwrap()));
    let body = json!({
        "service": format!("svc-{i}"),
        "namespace": NAMESPACE,
        "address": address.to_string(),
        "port": 20000 + j,
        "protocol": "grpc",
        "ttl_seconds": 600,
    });
    (i, body.to_string())
}

/// A keep-alive HTTP/1.1 connection to the admin API over TLS, verified
/// with the server's trust bundle for the IP dialled.
struct Admin {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl Admin {
    fn new(server: &mesh_control::ServerHandle) -> Admin {
        let bundle = std::fs::read_to_string(server.trust_bundle_file().unwrap()).unwrap();
        let mut config = pki::client_config(&bundle, None);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Admin {
            addr: server.admin_addr(),
            tls: Arc::new(config),
            sender: None,
        }
    }

    async fn connect(&self) -> SendRequest<Full<Bytes>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(ServerName::from(self.addr.ip()), tcp)
            .await
            .expect("TLS handshake with the admin API");
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .expect("HTTP/1.1 handshake with the admin API");
        tokio::spawn(conn);
        sender
    }

    /// `method path` with `body` as `bearer`: the status and the body. The
    /// connection is reused, and opened again when the server closed it
    /// between two requests.
    async fn call(&mut self, method: &str, path: &str, bearer: &str, body: String) -> (u16, Bytes) {
        let ready = match self.sender.as_mut() {
            Some(sender) => sender.ready().await.is_ok(),
            None => false,
        };
        if !ready {
            self.sender = Some(self.connect().await);
        }
        let sender = self.sender.as_mut().unwrap();
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::AUTHORIZATION, format!("Bearer {bearer}"))
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    }

    /// `GET /metrics`: the samples.
    async fn metrics(&mut self) -> Vec<mesh_testkit::prometheus::Sample> {
        let (code, body) = self.call("GET", "/metrics", &token(0), String::new()).await;
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        mesh_testkit::prometheus::parse(&String::from_utf8_lossy(&body))
    }
}

/// The value of the sample `name` (no labels).
fn sample(samples: &[mesh_testkit::prometheus::Sample], name: &str) -> f64 {
    samples
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no sample {name} in /metrics"))
        .value
}

/// The CPU time this process has used (user and system, all threads), from
/// `/proc/self/stat` in clock ticks of 1/100 s (`USER_HZ`, 100 on Linux).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // After the command name in parentheses, the fields from the 3rd:
    // utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// A TLS channel to ADS, verified with the trust bundle under the name
/// `localhost`, presenting `leaf`.
async fn ads_channel(
    server: &mesh_control::ServerHandle,
    leaf: &Leaf,
) -> tonic::transport::Channel {
    let bundle = std::fs::read_to_string(server.trust_bundle_file().unwrap()).unwrap();
    let mut config = pki::client_config(&bundle, Some(leaf));
    config.alpn_protocols = vec![b"h2".to_vec()];
    let config = Arc::new(config);
    let addr = server.xds_addr();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let config = config.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let name = ServerName::try_from("localhost")
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("a TLS channel to ADS")
}

fn cluster(i: usize) -> String {
    format!("outbound|80||svc-{i}.{NAMESPACE}.svc.cluster.local")
}

/// Watches EDS for every service's cluster, ACKing each response, and
/// returns once the endpoints it was sent add up to `TOTAL`.
async fn watch_until_all(mut ads: AdsClient) -> usize {
    let clusters: Vec<String> = (0..IDENTITIES).map(cluster).collect();
    let names: Vec<&str> = clusters.iter().map(String::as_str).collect();
    ads.subscribe(xds::ENDPOINT_TYPE, &names).await;
    let mut responses = 0;
    loop {
        let response = ads
            .try_recv(GENEROUS)
            .await
            .unwrap_or_else(|e| panic!("EDS during the storm: {e}"));
        responses += 1;
        ads.send(
            xds::ENDPOINT_TYPE,
            &names,
            &response.version_info,
            &response.nonce,
            None,
        )
        .await;
        let endpoints: usize = response
            .resources
            .iter()
            .map(|r| xds::decode_endpoints(r).unwrap().endpoint_count())
            .sum();
        if endpoints == TOTAL {
            assert_eq!(response.resources.len(), IDENTITIES);
            return responses;
        }
        assert!(endpoints < TOTAL, "{endpoints} endpoints in EDS");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_storm_of_10000_registrations_costs_a_bounded_number_of_translations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), config()).unwrap();
    let ca = CertificateAuthority::builder("cluster.local")
        .join_tokens(tokens())
        .build()
        .unwrap();
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .ca(ca)
        .start()
        .await
        .expect("start control server");
    assert!(server.rejected().is_empty(), "{:?}", server.rejected());

    // An ADS client of the mesh (svc-0's workload certificate) watching
    // every service's endpoints throughout.
    let mut admin = Admin::new(&server);
    let (csr_pem, key) = csr(None);
    let (code, cert) = admin
        .call(
            "POST",
            "/v1/certificates",
            &token(0),
            json!({ "csr": csr_pem }).to_string(),
        )
        .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&cert));
    let cert: serde_json::Value = serde_json::from_slice(&cert).unwrap();
    let leaf = Leaf {
        chain: cert["certificate_chain"].as_str().unwrap().to_owned(),
        key,
    };
    let node = mesh_testkit::ads::node("storm-watcher")
        .namespace(NAMESPACE)
        .build();
    let ads = AdsClient::open(ads_channel(&server, &leaf).await, node)
        .await
        .expect("an ADS stream");
    let watcher = tokio::spawn(watch_until_all(ads));

    let before = admin.metrics().await;
    let debounce = sample(&before, "mesh_control_registration_debounce_seconds");
    assert!(debounce > 0.0, "the registration debounce is {debounce} s");
    let translations_before = sample(&before, "mesh_control_translations_total");

    // The storm: IN_FLIGHT connections, each sending the next registration
    // as soon as its previous one is answered.
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = cpu_time();
    let started = Instant::now();
    let workers: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let next = next.clone();
            let mut admin = Admin::new(&server);
            tokio::spawn(async move {
                let mut refused = Vec::new();
                let mut created = 0;
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    if k >= TOTAL {
                        return (created, refused);
                    }
                    let (i, body) = registration(k);
                    let (code, answer) = admin.call("POST", "/v1/endpoints", &token(i), body).await;
                    if code == 201 {
                        created += 1;
                    } else {
                        refused.push(format!("{code} {}", String::from_utf8_lossy(&answer)));
                    }
                }
            })
        })
        .collect();
    let mut created = 0;
    let mut refused = Vec::new();
    for worker in workers {
        let (c, r) = within_for("the storm's registrations", GENEROUS, worker)
            .await
            .unwrap();
        created += c;
        refused.extend(r);
    }
    let duration = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu_before);
    let after = admin.metrics().await;
    let translations = sample(&after, "mesh_control_translations_total") - translations_before;
    let translating = sample(&after, "mesh_control_translation_duration_seconds_sum")
        - sample(&before, "mesh_control_translation_duration_seconds_sum");

    println!(
        "storm: {TOTAL} registrations in {duration:.2?} ({:.0}/s), {translations} full \
         translations (debounce {:.0} ms), CPU {cpu:.2?} in all ({:.0} µs per registration, \
         this process: server, clients and ADS watcher)",
        TOTAL as f64 / duration.as_secs_f64(),
        debounce * 1000.0,
        cpu.as_secs_f64() * 1e6 / TOTAL as f64,
    );
    println!(
        "storm: {translating:.2} s translating, {:.1} ms per translation",
        translating * 1000.0 / translations.max(1.0)
    );
    assert!(
        refused.is_empty(),
        "{} of {TOTAL} registrations refused, the first: {}",
        refused.len(),
        refused[0]
    );
    assert_eq!(created, TOTAL);
    let bound = (duration.as_secs_f64() / debounce).floor() + 2.0;
    assert!(
        translations <= bound,
        "{translations} full translations during a burst of {duration:?} with a debounce of \
         {debounce} s: at most {bound} expected"
    );
    assert!(translations >= 1.0, "no translation during the storm");

    // Every registration is served: in /v1/services ...
    let (code, services) = admin
        .call("GET", "/v1/services", &token(0), String::new())
        .await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&services));
    let services: serde_json::Value = serde_json::from_slice(&services).unwrap();
    let storm: Vec<&serde_json::Value> = services["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["namespace"] == NAMESPACE)
        .collect();
    assert_eq!(storm.len(), IDENTITIES);
    let endpoints: u64 = storm.iter().map(|s| s["endpoints"].as_u64().unwrap()).sum();
    assert_eq!(endpoints, TOTAL as u64, "endpoints in /v1/services");
    assert!(
        storm.iter().all(|s| s["endpoints"] == PER_IDENTITY),
        "{storm:?}"
    );

    // ... and in EDS, to the client that watched the storm.
    let responses = within_for("all endpoints in EDS", GENEROUS, watcher)
        .await
        .unwrap();
    println!("storm: the ADS client got {responses} EDS responses");
    server.shutdown().await;
}

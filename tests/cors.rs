//! VirtualService `corsPolicy` end to end over real sockets (issue 15):
//! Istio's reference example, loaded unchanged from
//! `examples/istio-docs/cors.yaml`, reaches the `ratings` workload's
//! `ServerLayer` as its gRFC A36 server listener (the `cors` filter and the
//! per-route `CorsPolicy`), and the server answers as Envoy's `cors` filter
//! does: a preflight from an allowed origin gets exactly the configured
//! headers without reaching the app; one from another origin reaches the
//! app and gets none; a simple request from an allowed origin gets
//! `access-control-allow-origin` and the exposed headers.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proxyless::control::BootstrapSpec;
use proxyless::{Bootstrap, InboundPolicy, ServerLayer, XdsClient};

const DEADLINE: Duration = Duration::from_secs(10);

/// Istio's CorsPolicy example: `https://example.com`, POST and GET,
/// `X-Foo-Bar`, `maxAge: 24h`, `allowCredentials: false`.
const EXAMPLE: &str = include_str!("../examples/istio-docs/cors.yaml");

/// A ratings workload (namespace prod, `app: ratings`) behind a
/// `ServerLayer` whose inbound policy comes from an embedded mesh-control,
/// with an app that counts the requests it gets.
struct Served {
    addr: SocketAddr,
    inbound: InboundPolicy,
    app_calls: Arc<AtomicU64>,
    _control: mesh_control::ServerHandle,
    _xds: XdsClient,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Served {
    async fn start(yaml: &str) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
        let control = mesh_control::Server::builder()
            .config_dir(dir.path())
            .start()
            .await
            .expect("start mesh-control");
        assert_eq!(
            control.status()["diagnostics"],
            serde_json::json!([]),
            "mesh-control rejects the YAML"
        );
        let spec = BootstrapSpec::new("ratings-1", "prod").label("app", "ratings");
        let bootstrap = Bootstrap::from_json(&control.bootstrap(&spec)).expect("bootstrap");
        let xds = XdsClient::start(bootstrap.clone());
        let inbound =
            InboundPolicy::from_xds(&xds, SocketAddr::from(([0, 0, 0, 0], 9080))).expect("policy");
        inbound
            .ready(DEADLINE)
            .await
            .expect("the server listener arrives");
        let app_calls = Arc::new(AtomicU64::new(0));
        let calls = Arc::clone(&app_calls);
        let app = axum::Router::new()
            .fallback(move || {
                calls.fetch_add(1, Ordering::Relaxed);
                async {
                    (
                        [("x-ratings", "5"), ("access-control-allow-origin", "*")],
                        "ratings",
                    )
                }
            })
            .layer(ServerLayer::from_bootstrap(&bootstrap, "ratings").inbound(inbound.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Served {
            addr,
            inbound,
            app_calls,
            _control: control,
            _xds: xds,
            dir,
            task,
        }
    }

    fn app_calls(&self) -> u64 {
        self.app_calls.load(Ordering::Relaxed)
    }

    /// Sends `method path` with `headers`: the status, the
    /// `access-control-*` response headers (sorted) and the body.
    async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Vec<(String, String)>, String) {
        let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let mut req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = client
            .request(req.body(Full::new(Bytes::new())).expect("request"))
            .await
            .expect("response");
        let status = resp.status().as_u16();
        let mut cors: Vec<(String, String)> = resp
            .headers()
            .iter()
            .filter(|(k, _)| k.as_str().starts_with("access-control-"))
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_string()))
            .collect();
        cors.sort();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, cors, String::from_utf8_lossy(&body).into_owned())
    }
}

fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = v
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    out.sort();
    out
}

fn preflight(origin: &'static str) -> [(&'static str, &'static str); 3] {
    [
        ("origin", origin),
        ("access-control-request-method", "POST"),
        ("access-control-request-headers", "x-foo-bar"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn istio_s_example_answers_preflights_as_envoy_does() {
    let served = Served::start(EXAMPLE).await;
    assert_eq!(
        served.inbound.current().cors().len(),
        1,
        "the VirtualService's one route reaches the server"
    );

    // Allowed origin: answered by the server stack, exactly the configured
    // headers (no allow-credentials: allowCredentials is false), and the
    // app never sees it.
    let (status, cors, body) = served
        .send("OPTIONS", "/ratings/1", &preflight("https://example.com"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, "", "a preflight answer has no body");
    assert_eq!(
        cors,
        pairs(&[
            ("access-control-allow-origin", "https://example.com"),
            ("access-control-allow-methods", "POST,GET"),
            ("access-control-allow-headers", "X-Foo-Bar"),
            ("access-control-max-age", "86400"),
        ])
    );
    assert_eq!(served.app_calls(), 0, "the preflight never reaches the app");

    // Another origin: forwarded to the app (unmatchedPreflights defaults to
    // FORWARD), and no CORS header is added (the app's own stays).
    let (status, cors, body) = served
        .send("OPTIONS", "/ratings/1", &preflight("https://evil.test"))
        .await;
    assert_eq!((status, body.as_str()), (200, "ratings"));
    assert_eq!(served.app_calls(), 1);
    assert_eq!(
        cors,
        pairs(&[("access-control-allow-origin", "*")]),
        "only the app's header: none of the configured ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edited_policy_reaches_the_running_server() {
    let served = Served::start(EXAMPLE).await;
    let version = served.inbound.current().version();
    std::fs::write(
        served.dir.path().join("mesh.yaml"),
        EXAMPLE.replace("exact: https://example.com", "exact: https://shop.example"),
    )
    .expect("rewrite mesh.yaml");
    tokio::time::timeout(DEADLINE, async {
        while served.inbound.current().version() == version {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the server listener is pushed again");
    let (status, cors, _) = served
        .send("OPTIONS", "/ratings/1", &preflight("https://shop.example"))
        .await;
    assert_eq!(status, 200);
    assert!(
        cors.contains(&(
            "access-control-allow-origin".into(),
            "https://shop.example".into()
        )),
        "{cors:?}"
    );
    let (_, cors, body) = served
        .send("OPTIONS", "/ratings/1", &preflight("https://example.com"))
        .await;
    assert_eq!(
        body, "ratings",
        "the old origin's preflight goes to the app now"
    );
    assert_eq!(cors, pairs(&[("access-control-allow-origin", "*")]));
    assert_eq!(served.app_calls(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_requests_from_allowed_origins_get_allow_origin_and_exposed_headers() {
    let yaml = EXAMPLE.replace(
        "      maxAge: \"24h\"\n",
        "      maxAge: \"24h\"\n      exposeHeaders:\n      - x-ratings\n",
    );
    assert_ne!(yaml, EXAMPLE);
    let served = Served::start(&yaml).await;
    let (status, cors, body) = served
        .send("GET", "/ratings/1", &[("origin", "https://example.com")])
        .await;
    assert_eq!((status, body.as_str()), (200, "ratings"));
    assert_eq!(
        cors,
        pairs(&[
            ("access-control-allow-origin", "https://example.com"),
            ("access-control-expose-headers", "x-ratings"),
        ]),
        "the layer's allow-origin replaces the app's, as Envoy's does"
    );
    // Not a CORS request, or another origin: the app's answer as it is.
    for headers in [&[][..], &[("origin", "https://evil.test")][..]] {
        let (status, cors, _) = served.send("GET", "/ratings/1", headers).await;
        assert_eq!(status, 200);
        assert_eq!(cors, pairs(&[("access-control-allow-origin", "*")]));
    }
    assert_eq!(served.app_calls(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_runs_before_authorization_and_ignore_answers_unmatched_preflights() {
    // A DENY policy on OPTIONS and on /denied: a preflight from the
    // allowed origin is still answered (CORS runs first, as in Istio's
    // inbound chain), a denied request's 403 still carries allow-origin
    // (so the browser can read the refusal), and with IGNORE a preflight
    // from another origin is answered without allow-origin instead of
    // being forwarded.
    let yaml = EXAMPLE.replace(
        "      maxAge: \"24h\"\n",
        "      maxAge: \"24h\"\n      unmatchedPreflights: IGNORE\n",
    ) + "---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-some
  namespace: prod
spec:
  selector:
    matchLabels:
      app: ratings
  action: DENY
  rules:
  - to:
    - operation:
        methods: [OPTIONS]
  - to:
    - operation:
        paths: [/denied]
";
    let served = Served::start(&yaml).await;
    let (status, cors, _) = served
        .send("OPTIONS", "/ratings/1", &preflight("https://example.com"))
        .await;
    assert_eq!(status, 200);
    assert!(cors.contains(&(
        "access-control-allow-origin".into(),
        "https://example.com".into()
    )));
    let (status, cors, _) = served
        .send("OPTIONS", "/ratings/1", &preflight("https://evil.test"))
        .await;
    assert_eq!(
        status, 200,
        "IGNORE: answered, not forwarded to RBAC or the app"
    );
    assert_eq!(
        cors,
        pairs(&[
            ("access-control-allow-methods", "POST,GET"),
            ("access-control-allow-headers", "X-Foo-Bar"),
            ("access-control-max-age", "86400"),
        ]),
        "Envoy's answer: everything but allow-origin, so the browser fails the preflight"
    );
    let (status, cors, _) = served
        .send("GET", "/denied", &[("origin", "https://example.com")])
        .await;
    assert_eq!(status, 403);
    assert_eq!(
        cors,
        pairs(&[("access-control-allow-origin", "https://example.com")])
    );
    assert_eq!(served.app_calls(), 0);
}

/// A grpcio xDS server (gRFC A36) asks for its listener: with the `cors`
/// filter and per-route `CorsPolicy` in it (`is_optional`, wrapped in
/// `FilterConfig { is_optional }`, gRFC A39), grpcio ACKs it instead of
/// NACKing the whole listener, and `/status` says that it ignores CORS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_server_accepts_the_listener_with_a_cors_policy() {
    const NODE: &str = "ratings-grpcio";
    let python = support::python::require_grpcio_python().await;
    let dir = tempfile::tempdir().expect("tempdir");
    // Plaintext (DISABLE): PERMISSIVE's TLS chain needs certificate
    // providers this bootstrap has not, which grpcio NACKs for that reason.
    let yaml = format!(
        "{EXAMPLE}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: plaintext
  namespace: prod
spec:
  mtls:
    mode: DISABLE
"
    );
    std::fs::write(dir.path().join("mesh.yaml"), yaml).expect("write mesh.yaml");
    let control = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start mesh-control");
    let spec = BootstrapSpec::new(NODE, "prod").label("app", "ratings");
    let bootstrap = control.bootstrap(&spec);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let script = "import sys, time, grpc\n\
                  from concurrent import futures\n\
                  server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), xds=True)\n\
                  server.add_insecure_port('127.0.0.1:' + sys.argv[1])\n\
                  server.start()\n\
                  time.sleep(30)\n";
    let mut child = tokio::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .arg(port.to_string())
        .env("GRPC_XDS_BOOTSTRAP_CONFIG", &bootstrap)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the grpcio server");
    let mut entry = serde_json::Value::Null;
    let waited = tokio::time::timeout(DEADLINE, async {
        loop {
            let status = control.status();
            if let Some(client) = status["clients"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["node_id"] == NODE))
            {
                let lds = &client["types"]["LDS"];
                if lds["acked"] == true || !lds["last_nack"].is_null() {
                    entry = client.clone();
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if waited.is_err() {
        let _ = child.start_kill();
        let output = child.wait_with_output().await.expect("output");
        panic!(
            "the grpcio server never answered its listener; status {}\nstderr {}",
            control.status(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let lds = &entry["types"]["LDS"];
    assert!(
        lds["acked"] == true && lds["last_nack"].is_null(),
        "grpcio NACKed the listener: {entry:#}"
    );
    let ignored = entry["ignored"].to_string();
    assert!(
        ignored.contains("CORS policy (VirtualService corsPolicy) is ignored by gRPC servers"),
        "{entry:#}"
    );
    let _ = child.start_kill();
}

//! Interop with a real gRPC proxyless client: Python grpcio (pinned, see
//! [`support::python::GRPCIO_VERSION`]) and its built-in xDS client dial `xds:///payment`
//! through an embedded mesh-control serving the demo mesh (`examples/mesh`: payment is
//! split 70/30 between the subsets v1 and v2 by its VirtualService).
//!
//! What a user of the mesh would notice, checked here:
//! - grpcio resolves the target through LDS → RDS → CDS → EDS (gRFC A27, A28) and its
//!   calls follow the same weighted split as the Rust clients do;
//! - the control server's `/status` shows the grpcio client with every resource type
//!   ACKed and no NACK (the resources have the shape grpc-core accepts: an EDS locality
//!   with a weight, an LB policy it knows, ...);
//! - a name the mesh does not know fails the client's calls with UNAVAILABLE naming the
//!   resource before the client's own 15 s does-not-exist timer (A27) could have fired,
//!   because the server says so in xRFC TP3 `resource_errors` (grpc-core does not take a
//!   SotW response without the name as "does not exist" for a resource it never had; see
//!   that test);
//! - grpcio honors the resilience config mesh-control serves: a VirtualService's
//!   `retries` on gRPC status conditions (gRFC A44; its success rate over a flaky
//!   backend is 1 − 0.5⁴) and `fault.abort` (A33; the share of aborted calls).
//!
//! The venv with grpcio is created under the target dir on first use (that run needs
//! PyPI); later runs reuse it. To see grpc-core's xDS traffic in a failure message, run
//! with `GRPC_TRACE=xds_client GRPC_VERBOSITY=debug` (the client inherits the
//! environment).

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use mesh_control::ServerHandle;
use support::admin::admin_request;
use support::python::{
    ClientOptions, ClientReport, grpc_xds_client_script, grpcio_python, run_grpc_xds_client,
    run_grpc_xds_client_with,
};
use support::{PaymentHandle, PaymentServer, assert_split, eventually_named, spawn_payment_with};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// The node id of the grpcio client in its bootstrap (and so in `/status`).
const NODE_ID: &str = "grpc-python-1";
/// The namespace of the grpcio client: short names like `payment` resolve in it.
const NAMESPACE: &str = "shop";
/// Pay calls the weighted-split test makes.
const CALLS: u32 = 2000;
/// The client's deadline for becoming ready and making all its calls.
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);
/// How long a lingering client keeps its channel open after its report; the test kills
/// it as soon as it has read `/status`, so this only bounds a test that failed to.
const LINGER: Duration = Duration::from_secs(60);
/// How long the client may take beyond its deadline to print its report (Python and
/// grpc start-up).
const REPORT_GRACE: Duration = Duration::from_secs(15);
/// Deadline of eventual assertions on `/status`.
const STATUS_DEADLINE: Duration = Duration::from_secs(10);
/// The xDS types a gRPC client subscribes to for a client channel.
const XDS_TYPES: [&str; 4] = ["LDS", "RDS", "CDS", "EDS"];

/// The venv's Python, installing it on first use (pip runs outside the runtime's thread).
async fn python() -> PathBuf {
    match tokio::task::spawn_blocking(grpcio_python).await {
        Ok(Ok(python)) => python,
        Ok(Err(message)) => panic!("{message}"),
        Err(error) => panic!("installing grpcio panicked: {error}"),
    }
}

/// An embedded mesh-control serving a copy of `examples/mesh`, with a bootstrap file for
/// the grpcio client next to the config.
struct Mesh {
    server: ServerHandle,
    bootstrap: PathBuf,
    /// Holds the config and the bootstrap; removed on drop.
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// mesh-control on a copy of the demo mesh (`examples/mesh`).
    async fn start() -> Mesh {
        Mesh::start_with(|config_dir| {
            copy_yaml(
                &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mesh"),
                config_dir,
            );
        })
        .await
    }

    /// mesh-control on a config directory holding just `yaml` (a test's own mesh).
    async fn start_yaml(yaml: &str) -> Mesh {
        Mesh::start_with(|config_dir| {
            if let Err(error) = std::fs::create_dir_all(config_dir) {
                panic!("creating {}: {error}", config_dir.display());
            }
            if let Err(error) = std::fs::write(config_dir.join("mesh.yaml"), yaml) {
                panic!("writing {}: {error}", config_dir.display());
            }
        })
        .await
    }

    /// mesh-control on a config directory that `fill` writes.
    async fn start_with(fill: impl FnOnce(&Path)) -> Mesh {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(error) => panic!("creating a temporary directory: {error}"),
        };
        let config_dir = dir.path().join("mesh");
        fill(&config_dir);
        let server = match mesh_control::Server::builder()
            .config_dir(&config_dir)
            .start()
            .await
        {
            Ok(server) => server,
            Err(error) => panic!("starting mesh-control on {}: {error}", config_dir.display()),
        };
        let status = server.status();
        assert_eq!(
            status["diagnostics"],
            serde_json::json!([]),
            "the mesh config has problems: {status}"
        );
        let bootstrap = dir.path().join("bootstrap.json");
        if let Err(error) = std::fs::write(&bootstrap, server.bootstrap_json(NODE_ID, NAMESPACE)) {
            panic!("writing {}: {error}", bootstrap.display());
        }
        Mesh {
            server,
            bootstrap,
            _dir: dir,
        }
    }

    /// Starts a Payment backend labelled `version` and registers it as an endpoint of
    /// `payment` in `shop`, as a self-registering workload does.
    async fn add_payment_backend(&self, version: &str) -> PaymentHandle {
        self.add_payment_backend_with(version, |addr| {
            PaymentServer::new(addr.to_string(), version)
        })
        .await
    }

    /// [`Mesh::add_payment_backend`] with a server built by `make` from its address (a
    /// failing one, a flaky one).
    async fn add_payment_backend_with(
        &self,
        version: &str,
        make: impl FnOnce(std::net::SocketAddr) -> PaymentServer,
    ) -> PaymentHandle {
        let (addr, backend) = spawn_payment_with(make).await;
        let body = serde_json::json!({
            "service": "payment",
            "namespace": NAMESPACE,
            "address": addr.ip().to_string(),
            "port": addr.port(),
            "protocol": "GRPC",
            "labels": {"version": version},
            "ttl_seconds": 60,
        });
        let (code, reply) = admin_request(
            self.server.admin_addr(),
            "POST",
            "/v1/endpoints",
            &body.to_string(),
        )
        .await;
        assert_eq!(code, 201, "registering {addr} ({version}): {reply}");
        assert!(reply["lease_id"].is_string(), "no lease id: {reply}");
        backend
    }
}

/// Copies every `*.yaml` / `*.yml` file of `from` into `to` (created).
fn copy_yaml(from: &Path, to: &Path) {
    if let Err(error) = std::fs::create_dir_all(to) {
        panic!("creating {}: {error}", to.display());
    }
    let entries = match std::fs::read_dir(from) {
        Ok(entries) => entries,
        Err(error) => panic!("listing {}: {error}", from.display()),
    };
    let mut copied = 0;
    for entry in entries {
        let path = match entry {
            Ok(entry) => entry.path(),
            Err(error) => panic!("listing {}: {error}", from.display()),
        };
        let is_yaml = path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        let Some(name) = path.file_name().filter(|_| is_yaml) else {
            continue;
        };
        if let Err(error) = std::fs::copy(&path, to.join(name)) {
            panic!("copying {}: {error}", path.display());
        }
        copied += 1;
    }
    assert!(copied > 0, "no YAML files in {}", from.display());
}

/// A grpcio client run with `--linger`: it has printed its report and keeps its channel
/// (and so its ADS stream) open until [`LingeringClient::stop`].
struct LingeringClient {
    child: tokio::process::Child,
    stderr: tokio::task::JoinHandle<String>,
}

impl LingeringClient {
    /// Runs the client script on `target` and returns its report once printed; the
    /// process stays alive. Panics (with the client's stderr) when no report comes.
    async fn start(
        python: &Path,
        bootstrap: &Path,
        target: &str,
        calls: u32,
    ) -> (ClientReport, LingeringClient) {
        let script = grpc_xds_client_script();
        let mut command = tokio::process::Command::new(python);
        command
            .arg(&script)
            .arg(target)
            .arg(calls.to_string())
            .arg("--deadline")
            .arg(format!("{:.3}", CLIENT_DEADLINE.as_secs_f64()))
            .arg("--linger")
            .arg(format!("{:.3}", LINGER.as_secs_f64()))
            .env("GRPC_XDS_BOOTSTRAP", bootstrap)
            .env_remove("GRPC_XDS_BOOTSTRAP_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => panic!(
                "starting {} {}: {error}",
                python.display(),
                script.display()
            ),
        };
        let stderr_pipe = child.stderr.take();
        let stderr = tokio::spawn(async move {
            let mut bytes = Vec::new();
            if let Some(mut pipe) = stderr_pipe {
                let _ = pipe.read_to_end(&mut bytes).await;
            }
            String::from_utf8_lossy(&bytes).into_owned()
        });
        let mut client = LingeringClient { child, stderr };
        let Some(stdout) = client.child.stdout.take() else {
            let stderr = client.stop().await;
            panic!("the grpcio client has no stdout pipe; stderr:\n{stderr}");
        };
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = String::new();
        let report_line = tokio::time::timeout(CLIENT_DEADLINE + REPORT_GRACE, async {
            loop {
                match lines.next_line().await {
                    Ok(Some(line)) if line.trim_start().starts_with('{') => return Some(line),
                    Ok(Some(line)) => {
                        seen.push_str(&line);
                        seen.push('\n');
                    }
                    Ok(None) | Err(_) => return None,
                }
            }
        })
        .await;
        let line = match report_line {
            Ok(Some(line)) => line,
            Ok(None) => {
                let stderr = client.stop().await;
                panic!(
                    "the grpcio client ended without a report; stdout:\n{seen}\nstderr:\n{stderr}"
                );
            }
            Err(_) => {
                let stderr = client.stop().await;
                panic!(
                    "no report from the grpcio client within {:?}; stdout:\n{seen}\nstderr:\n{stderr}",
                    CLIENT_DEADLINE + REPORT_GRACE
                );
            }
        };
        // Keep draining stdout so the lingering process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        match ClientReport::parse(&line, "") {
            Ok(report) => (report, client),
            Err(message) => {
                let stderr = client.stop().await;
                panic!("{message}\nstderr:\n{stderr}");
            }
        }
    }

    /// Kills the client and returns everything it wrote to stderr.
    async fn stop(mut self) -> String {
        let _ = self.child.kill().await;
        (&mut self.stderr).await.unwrap_or_default()
    }
}

/// The `/status` entry of the client with node id [`NODE_ID`], if connected.
fn grpcio_client_status(status: &serde_json::Value) -> Option<&serde_json::Value> {
    status["clients"]
        .as_array()?
        .iter()
        .find(|client| client["node_id"] == NODE_ID)
}

/// Whether every type of [`XDS_TYPES`] is ACKed and none has a NACK on record.
fn all_acked(client: &serde_json::Value) -> bool {
    XDS_TYPES.iter().all(|t| {
        let state = &client["types"][*t];
        state["acked"] == true && state["last_nack"].is_null()
    })
}

#[tokio::test]
async fn grpcio_follows_the_weighted_split_and_acks_every_resource() {
    let python = python().await;
    let mesh = Mesh::start().await;
    let v1 = mesh.add_payment_backend("v1").await;
    let v2 = mesh.add_payment_backend("v2").await;

    let (report, client) =
        LingeringClient::start(&python, &mesh.bootstrap, "xds:///payment", CALLS).await;

    // The control server's view, read while the client's ADS stream is still open.
    // Every distinct view is printed, so a failure shows the last one (with any NACK).
    let mut last_view = String::new();
    eventually_named(
        "the grpcio client ACKing LDS, RDS, CDS and EDS in /status",
        STATUS_DEADLINE,
        || {
            let status = mesh.server.status();
            let client = grpcio_client_status(&status);
            let view = client.map_or_else(|| status.to_string(), ToString::to_string);
            if view != last_view {
                eprintln!("/status for {NODE_ID}: {view}");
                last_view = view;
            }
            client.is_some_and(all_acked)
        },
    )
    .await;
    let status = mesh.server.status();
    let user_agent = grpcio_client_status(&status)
        .and_then(|client| client["user_agent"].as_str())
        .unwrap_or_default()
        .to_owned();
    // Issue 6, criterion 4, read while the client is still connected: `/status` knows it
    // is a gRPC client and lists the served config it ignores, and CSDS returns its
    // config, every resource ACKed.
    let entry = grpcio_client_status(&status).cloned().unwrap_or_default();
    let ignored_config = grpcio_ignored(&entry);
    let csds = csds_config_of(&mesh.server, NODE_ID).await;
    let stderr = client.stop().await;
    assert_eq!(entry["kind"], "grpc", "{entry}");
    assert_eq!(entry["stale"], false, "{entry}");
    // The payment route retries on `unavailable,cancelled,connect-failure,refused-stream`;
    // gRPC retries on gRPC status codes only (gRFC A44).
    assert!(
        ignored_config.iter().any(|i| i.contains("payment")
            && i.contains("retryOn")
            && i.contains("connect-failure")
            && i.contains("refused-stream")),
        "/status does not list the retry conditions grpcio ignores: {ignored_config:?}"
    );
    assert_csds_acked(&csds);
    eprintln!(
        "grpcio ({user_agent}): {} ok, by version {:?}, {} errors",
        report.ok,
        report.by_version,
        report.error_count()
    );

    assert!(
        user_agent.starts_with("gRPC"),
        "user agent {user_agent:?} is not grpc-core's"
    );
    assert!(
        report.ready && report.error_count() == 0,
        "the grpcio client failed: {:?}\nreport: {report:?}\nstderr:\n{stderr}",
        report.first_error
    );
    assert_eq!(report.ok, u64::from(CALLS), "{report:?}");
    assert_eq!(
        report.version_count("v1") + report.version_count("v2"),
        report.ok,
        "calls served by neither subset: {report:?}"
    );
    assert_split(report.version_count("v1"), report.ok, 0.7);
    assert_eq!(
        report.by_served_by.get(&v1.addr.to_string()).copied(),
        Some(report.version_count("v1")),
        "{report:?}"
    );
    assert_eq!(v1.stats.pays() + v2.stats.pays(), u64::from(CALLS));

    v1.shutdown().await;
    v2.shutdown().await;
    mesh.server.shutdown().await;
}

/// grpc-core ignores the absence of a never-received resource from a SotW response
/// ("this ADS response may be in reaction to an earlier request", xds_client.cc) and
/// waits out its 15 s timer; the way a server says "does not exist" at once is xRFC TP3
/// `DiscoveryResponse.resource_errors` with NOT_FOUND, which mesh-control sends and
/// grpcio 1.85 reads when `GRPC_EXPERIMENTAL_XDS_DATA_ERROR_HANDLING=true` (gRFC A88).
#[tokio::test]
async fn grpcio_learns_at_once_that_an_unknown_listener_does_not_exist() {
    let python = python().await;
    let mesh = Mesh::start().await;

    // Shorter than grpc-core's 15 s does-not-exist timer: an UNAVAILABLE that names the
    // resource within it can only come from the server's answer; without one the probe
    // call would still be waiting for the resolver and end DEADLINE_EXCEEDED.
    let deadline = Duration::from_secs(5);
    let options = ClientOptions {
        env: vec![(
            "GRPC_EXPERIMENTAL_XDS_DATA_ERROR_HANDLING".to_owned(),
            "true".to_owned(),
        )],
        ..ClientOptions::default()
    };
    let report = match run_grpc_xds_client_with(
        &python,
        &mesh.bootstrap,
        "xds:///nope",
        1,
        deadline,
        &options,
    )
    .await
    {
        Ok(report) => report,
        Err(message) => panic!("{message}"),
    };

    assert!(!report.ready, "{report:?}");
    assert_eq!(report.ok, 0, "{report:?}");
    let first_error = report.first_error.as_deref().unwrap_or_default();
    assert_eq!(
        report.errors.keys().collect::<Vec<_>>(),
        ["UNAVAILABLE"],
        "expected UNAVAILABLE, not a wait for the client's own timer: {first_error}\n\
         stderr:\n{}",
        report.stderr
    );
    assert!(
        first_error.contains("nope"),
        "the error does not name the resource: {first_error}"
    );
    mesh.server.shutdown().await;
}

/// A mesh with one gRPC service, `payment` (port 50051), whose VirtualService route
/// carries `route_fields` (YAML at the level of `route:`, e.g. `retries: ...`).
fn payment_mesh_yaml(route_fields: &str) -> String {
    let fields: String = route_fields
        .lines()
        .map(|line| format!("    {line}\n"))
        .collect();
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: payment
  namespace: {NAMESPACE}
spec:
  hosts:
  - payment
  ports:
  - number: 50051
    name: grpc
    protocol: GRPC
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: payment
  namespace: {NAMESPACE}
spec:
  hosts:
  - payment
  http:
  - name: default
{fields}    route:
    - destination:
        host: payment
"
    )
}

/// Criterion 9, retries: mesh-control serves `retries: {attempts: 3, retryOn:
/// unavailable, backoff: 2ms}` for payment, whose one backend fails UNAVAILABLE in 50 % of calls at
/// random. grpcio (gRFC A44) retries: its success rate is 1 − 0.5⁴ (it would be 0.5
/// without retries, 1 − 0.5³ with one retry too few), and the backend saw exactly one
/// extra attempt per failure that was not a call's last.
///
/// Why 2 ms and not the 1 ms the Rust tests use: grpc-core 1.85.1 jitters the backoff by
/// ±20 % and never fires a retry timer shorter than 1 ms — with `GRPC_TRACE=retry` the
/// call logs "retrying failed call in 0 ms" and then waits for its deadline. A 2 ms base
/// keeps every delay ≥ 1.6 ms.
#[tokio::test]
async fn grpcio_retries_as_the_virtual_service_says() {
    const RETRY_CALLS: u32 = 1000;
    let python = python().await;
    let mesh = Mesh::start_yaml(&payment_mesh_yaml(
        "retries:\n  attempts: 3\n  retryOn: unavailable\n  backoff: 2ms\n",
    ))
    .await;
    let flaky = mesh
        .add_payment_backend_with("v1", |addr| {
            PaymentServer::new(addr.to_string(), "v1")
                .failing_randomly(tonic::Code::Unavailable, 0.5)
        })
        .await;

    let report = match run_grpc_xds_client(
        &python,
        &mesh.bootstrap,
        "xds:///payment",
        RETRY_CALLS,
        CLIENT_DEADLINE,
    )
    .await
    {
        Ok(report) => report,
        Err(message) => panic!("{message}"),
    };
    eprintln!(
        "grpcio with retries: {} ok, errors {:?}; the backend answered {} calls, {} failed",
        report.ok,
        report.errors,
        flaky.stats.pays(),
        flaky.stats.failures()
    );
    assert!(report.ready, "{report:?}");
    assert_eq!(report.attempted, u64::from(RETRY_CALLS), "{report:?}");
    assert!(
        report.errors.keys().all(|code| code == "UNAVAILABLE"),
        "errors other than the backend's UNAVAILABLE: {:?}\nfirst: {:?}\nstderr:\n{}",
        report.errors,
        report.first_error,
        report.stderr
    );
    assert_split(report.ok, u64::from(RETRY_CALLS), 1.0 - 0.5f64.powi(4));
    assert_eq!(
        flaky.stats.pays(),
        u64::from(RETRY_CALLS) + flaky.stats.failures() - report.error_count(),
        "attempts at the backend = calls + retries (every failure but a call's last is retried)"
    );
    flaky.shutdown().await;
    mesh.server.shutdown().await;
}

/// Criterion 9, fault injection: mesh-control serves `fault.abort {percentage 30,
/// grpcStatus: UNAVAILABLE}` for payment (gRFC A33). grpcio aborts 30 % of its calls
/// with UNAVAILABLE itself — the backend never sees them — and does not retry them
/// (the route keeps Istio's default retries, which include unavailable: the fault
/// filter runs above the retries, as in Envoy).
#[tokio::test]
async fn grpcio_honors_injected_aborts() {
    const FAULT_CALLS: u32 = 1000;
    let python = python().await;
    let mesh = Mesh::start_yaml(&payment_mesh_yaml(
        "fault:\n  abort:\n    percentage:\n      value: 30\n    grpcStatus: UNAVAILABLE\n",
    ))
    .await;
    let backend = mesh
        .add_payment_backend_with("v1", |addr| PaymentServer::new(addr.to_string(), "v1"))
        .await;

    let report = match run_grpc_xds_client(
        &python,
        &mesh.bootstrap,
        "xds:///payment",
        FAULT_CALLS,
        CLIENT_DEADLINE,
    )
    .await
    {
        Ok(report) => report,
        Err(message) => panic!("{message}"),
    };
    eprintln!(
        "grpcio with an injected abort: {} ok, errors {:?}",
        report.ok, report.errors
    );
    assert!(report.ready, "{report:?}");
    assert_eq!(report.attempted, u64::from(FAULT_CALLS), "{report:?}");
    assert!(
        report.errors.keys().all(|code| code == "UNAVAILABLE"),
        "errors other than the injected UNAVAILABLE: {:?}\nfirst: {:?}\nstderr:\n{}",
        report.errors,
        report.first_error,
        report.stderr
    );
    assert_split(report.error_count(), u64::from(FAULT_CALLS), 0.3);
    assert_eq!(
        backend.stats.pays(),
        report.ok,
        "an aborted call reached the backend"
    );
    backend.shutdown().await;
    mesh.server.shutdown().await;
}

/// The `ignored` list of a client's `/status` entry.
fn grpcio_ignored(entry: &serde_json::Value) -> Vec<String> {
    entry["ignored"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The config CSDS (`envoy.service.status.v3`, on mesh-control's xDS port) reports for
/// the client `node_id`.
async fn csds_config_of(
    server: &ServerHandle,
    node_id: &str,
) -> envoy_types::pb::envoy::service::status::v3::ClientConfig {
    use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
    use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
    let mut csds =
        match ClientStatusDiscoveryServiceClient::connect(format!("http://{}", server.xds_addr()))
            .await
        {
            Ok(client) => client,
            Err(error) => panic!("connecting to CSDS at {}: {error}", server.xds_addr()),
        };
    let response = match csds
        .fetch_client_status(ClientStatusRequest::default())
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => panic!("CSDS FetchClientStatus: {status}"),
    };
    let ids: Vec<String> = response
        .config
        .iter()
        .map(|c| c.node.as_ref().map(|n| n.id.clone()).unwrap_or_default())
        .collect();
    match response
        .config
        .into_iter()
        .find(|c| c.node.as_ref().is_some_and(|n| n.id == node_id))
    {
        Some(config) => config,
        None => panic!("{node_id} missing from CSDS (clients: {ids:?})"),
    }
}

/// Asserts that a CSDS client config holds the payment listener and its whole cascade
/// (one resource of each xDS type at least), every resource ACKed, with its contents.
fn assert_csds_acked(config: &envoy_types::pb::envoy::service::status::v3::ClientConfig) {
    use envoy_types::pb::envoy::admin::v3::ClientResourceStatus;
    let resources = &config.generic_xds_configs;
    let summary: Vec<String> = resources
        .iter()
        .map(|r| format!("{} {} status {}", r.type_url, r.name, r.client_status))
        .collect();
    for short in [
        "Listener",
        "RouteConfiguration",
        "Cluster",
        "ClusterLoadAssignment",
    ] {
        assert!(
            resources
                .iter()
                .any(|r| r.type_url.ends_with(&format!(".{short}"))),
            "no {short} in CSDS for {NODE_ID}: {summary:?}"
        );
    }
    assert!(
        resources
            .iter()
            .any(|r| r.type_url.ends_with(".Listener") && r.name == "payment"),
        "{summary:?}"
    );
    for r in resources {
        assert_eq!(
            r.client_status,
            ClientResourceStatus::Acked as i32,
            "{} {} is not ACKed: {summary:?}",
            r.type_url,
            r.name
        );
        assert!(
            r.xds_config.is_some(),
            "{} {} has no contents",
            r.type_url,
            r.name
        );
        assert!(!r.version_info.is_empty(), "{} {}", r.type_url, r.name);
    }
}

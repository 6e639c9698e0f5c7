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
//!   backend is 1 − 0.5⁴) and `fault.abort` (A33; the share of aborted calls);
//! - zero trust (issue 5): with certificates our CA issued, handed to grpcio as files
//!   (`file_watcher`, gRFC A29) and xDS channel credentials, grpcio talks TLS to
//!   mesh-control (A65 `tls` channel creds), does mTLS to a STRICT Rust server because
//!   CDS says so, checks the server's SPIFFE ID, and the server's RBAC (A36 + A41)
//!   admits exactly the identity an AuthorizationPolicy names.
//!
//! The venv with grpcio is created under the target dir on first use (that run needs
//! PyPI); later runs reuse it. To see grpc-core's xDS traffic in a failure message, run
//! with `GRPC_TRACE=xds_client GRPC_VERBOSITY=debug` (the client inherits the
//! environment).

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mesh_control::ServerHandle;
use mesh_control::ca::{CertificateAuthority, JoinTokens};
use proxyless::control::BootstrapSpec;
use proxyless::mesh_core::model::Protocol;
use proxyless::{
    Bootstrap, InboundPolicy, PeerIdentity, Registration, Security, ServerLayer, Serving,
    WorkloadCertificates, XdsClient,
};
use support::admin::{admin_request, admin_request_https};
use support::python::{
    ClientOptions, ClientReport, client_command, grpc_xds_client_script, read_all,
    require_grpcio_python, run_grpc_xds_client, run_grpc_xds_client_with,
};
use support::{
    PaymentHandle, PaymentServer, assert_split, copy_demo_mesh, eventually_named, payment_routes,
    spawn_payment_with,
};
use tokio::io::{AsyncBufReadExt, BufReader};

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
        Mesh::start_with(copy_demo_mesh).await
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
        LingeringClient::start_with(python, bootstrap, target, calls, &ClientOptions::default())
            .await
    }

    /// [`LingeringClient::start`] with headers, extra environment and xDS credentials.
    async fn start_with(
        python: &Path,
        bootstrap: &Path,
        target: &str,
        calls: u32,
        options: &ClientOptions,
    ) -> (ClientReport, LingeringClient) {
        let script = grpc_xds_client_script();
        let mut command =
            client_command(python, bootstrap, target, calls, CLIENT_DEADLINE, options);
        command
            .arg("--linger")
            .arg(format!("{:.3}", LINGER.as_secs_f64()));
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(error) => panic!(
                "starting {} {}: {error}",
                python.display(),
                script.display()
            ),
        };
        let stderr = read_all(child.stderr.take());
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
    client_status_of(status, NODE_ID)
}

/// The `/status` entry of the client with node id `node_id`, if connected.
fn client_status_of<'a>(
    status: &'a serde_json::Value,
    node_id: &str,
) -> Option<&'a serde_json::Value> {
    status["clients"]
        .as_array()?
        .iter()
        .find(|client| client["node_id"] == node_id)
}

/// The node ids of the clients connected, as `/status` lists them.
fn node_ids(status: &serde_json::Value) -> String {
    let ids: Vec<&str> = status["clients"]
        .as_array()
        .map(|clients| {
            clients
                .iter()
                .filter_map(|c| c["node_id"].as_str())
                .collect()
        })
        .unwrap_or_default();
    format!("{ids:?}")
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
    let python = require_grpcio_python().await;
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
    let python = require_grpcio_python().await;
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
    let python = require_grpcio_python().await;
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
    let python = require_grpcio_python().await;
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

// --- Zero trust (issue 5, acceptance 5) -------------------------------------------

/// The service accounts of the secured mesh, each given a join token.
const SECURE_ACCOUNTS: [&str; 3] = ["payment", "grpc-client", "intruder"];
/// The SPIFFE ID of the grpcio client allowed to call payment.
const GRPC_CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/grpc-client";
/// The AuthorizationPolicy that lets only that identity call payment.
const ALLOW_POLICY: &str = "payment-allow-grpc-client";
/// Pay calls of each grpcio client in the zero-trust test.
const SECURE_CALLS: u32 = 50;

/// payment (gRPC) in `shop`, STRICT mTLS for the namespace, and one ALLOW policy on
/// the workloads labelled `app: payment`: only the grpc-client service account may
/// call them.
fn secure_mesh_yaml() -> String {
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
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: {NAMESPACE}
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: {ALLOW_POLICY}
  namespace: {NAMESPACE}
spec:
  selector:
    matchLabels:
      app: payment
  action: ALLOW
  rules:
  - from:
    - source:
        principals: [\"cluster.local/ns/{NAMESPACE}/sa/grpc-client\"]
"
    )
}

/// mesh-control with a CA (join tokens for [`SECURE_ACCOUNTS`]) on
/// [`secure_mesh_yaml`]: ADS and the admin API speak TLS.
struct SecureMesh {
    server: ServerHandle,
    tokens: BTreeMap<&'static str, String>,
    /// Holds the config, the certificate files and the bootstraps; removed on drop.
    dir: tempfile::TempDir,
}

impl SecureMesh {
    async fn start() -> SecureMesh {
        SecureMesh::start_with(|config_dir| {
            if let Err(error) = std::fs::create_dir_all(config_dir)
                .and_then(|()| std::fs::write(config_dir.join("mesh.yaml"), secure_mesh_yaml()))
            {
                panic!(
                    "writing the mesh config in {}: {error}",
                    config_dir.display()
                );
            }
        })
        .await
    }

    /// mesh-control with the CA on a config directory that `fill` writes.
    async fn start_with(fill: impl FnOnce(&Path)) -> SecureMesh {
        let dir = match tempfile::tempdir() {
            Ok(dir) => dir,
            Err(error) => panic!("creating a temporary directory: {error}"),
        };
        let config_dir = dir.path().join("mesh");
        fill(&config_dir);
        let mut join = JoinTokens::new();
        let mut tokens = BTreeMap::new();
        let salt = support::Coin::new().next_u64();
        for account in SECURE_ACCOUNTS {
            let token = format!("{account}-join-token-{salt:016x}");
            if let Err(error) = join.insert(token.clone(), NAMESPACE, account) {
                panic!("join token for {account}: {error}");
            }
            tokens.insert(account, token);
        }
        let ca = match CertificateAuthority::builder("cluster.local")
            .join_tokens(join)
            .build()
        {
            Ok(ca) => ca,
            Err(error) => panic!("building the CA: {error}"),
        };
        let server = match mesh_control::Server::builder()
            .config_dir(&config_dir)
            .ca(ca)
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
            "the secured mesh config has problems: {status}"
        );
        SecureMesh {
            server,
            tokens,
            dir,
        }
    }

    /// The join token of `account`.
    fn token(&self, account: &str) -> &str {
        match self.tokens.get(account) {
            Some(token) => token,
            None => panic!("no join token for {account}"),
        }
    }

    /// The roots mesh-control's own certificate chains to (PEM).
    fn trust_bundle(&self) -> Vec<u8> {
        let Some(file) = self.server.trust_bundle_file() else {
            panic!("mesh-control has a CA but no trust bundle file");
        };
        match std::fs::read(&file) {
            Ok(pem) => pem,
            Err(error) => panic!("reading {}: {error}", file.display()),
        }
    }

    /// A certificate for `account` from our CA, obtained as a workload does (a key
    /// that never leaves it, a CSR and its join token over the admin API, https),
    /// written as files for the grpcio client's `file_watcher` provider (gRFC A29),
    /// and a bootstrap naming them for node `node_id`. Returns the bootstrap's path.
    async fn grpcio_bootstrap(&self, account: &str, node_id: &str) -> PathBuf {
        let (csr, key) = mesh_testkit::pki::csr(None);
        let body = serde_json::json!({"csr": csr, "token": self.token(account)});
        let (code, reply) = admin_request_https(
            self.server.admin_addr(),
            &self.trust_bundle(),
            "POST",
            "/v1/certificates",
            &body.to_string(),
        )
        .await;
        assert_eq!(code, 200, "POST /v1/certificates for {account}: {reply}");
        assert_eq!(
            reply["spiffe_id"],
            format!("spiffe://cluster.local/ns/{NAMESPACE}/sa/{account}"),
            "{reply}"
        );
        let (Some(chain), Some(bundle)) = (
            reply["certificate_chain"].as_str(),
            reply["trust_bundle"].as_str(),
        ) else {
            panic!("the certificate reply lacks the chain or the trust bundle: {reply}");
        };

        let files = self.dir.path().join(account);
        let cert_file = files.join("cert-chain.pem");
        let key_file = files.join("key.pem");
        let ca_file = files.join("root-cert.pem");
        let bootstrap_file = files.join("bootstrap.json");
        let spec = BootstrapSpec::new(node_id, NAMESPACE)
            .service_account(account)
            .file_watcher(&cert_file, &key_file, &ca_file);
        let bootstrap = self.server.bootstrap(&spec);
        let written = std::fs::create_dir_all(&files)
            .and_then(|()| std::fs::write(&cert_file, chain))
            .and_then(|()| std::fs::write(&key_file, &key))
            .and_then(|()| std::fs::write(&ca_file, bundle))
            .and_then(|()| std::fs::write(&bootstrap_file, &bootstrap));
        if let Err(error) = written {
            panic!(
                "writing the files of {account} in {}: {error}",
                files.display()
            );
        }
        bootstrap_file
    }
}

/// Issue 13, acceptance 3: with the CA on, mesh-control serves ADS only to
/// authenticated clients, and grpcio, with the bootstrap mesh-control writes for a
/// workload whose certificate is in files, still follows the demo mesh's 70/30 split:
/// the bootstrap names the certificate and key as gRFC A65 `tls` channel credentials,
/// so grpcio presents the certificate to mesh-control, which reads the client's
/// namespace from it.
#[tokio::test]
async fn grpcio_follows_the_split_under_the_ca_with_the_bootstrap_mesh_control_writes() {
    const CLIENT_NODE: &str = "grpc-client-split";
    let python = require_grpcio_python().await;
    let mesh = SecureMesh::start_with(copy_demo_mesh).await;
    let bundle = mesh.trust_bundle();

    // Two plaintext backends (the demo mesh is PERMISSIVE), registered with the
    // payment service account's join token over https.
    let mut backends = Vec::new();
    for version in ["v1", "v2"] {
        let (addr, backend) =
            spawn_payment_with(|addr| PaymentServer::new(addr.to_string(), version)).await;
        let body = serde_json::json!({
            "service": "payment",
            "namespace": NAMESPACE,
            "address": addr.ip().to_string(),
            "port": addr.port(),
            "protocol": "GRPC",
            "labels": {"version": version},
            "ttl_seconds": 60,
        });
        let config = Arc::new(mesh_testkit::pki::client_config(
            &String::from_utf8_lossy(&bundle),
            None,
        ));
        let authorization = format!("Bearer {}", mesh.token("payment"));
        let (code, reply) = mesh_testkit::http::json_request_tls(
            mesh.server.admin_addr(),
            config,
            "POST",
            "/v1/endpoints",
            &[("authorization", authorization.as_str())],
            &body.to_string(),
        )
        .await;
        assert_eq!(code, 201, "registering {addr} ({version}): {reply}");
        backends.push(backend);
    }

    let bootstrap = mesh.grpcio_bootstrap("grpc-client", CLIENT_NODE).await;
    let written: serde_json::Value = match std::fs::read_to_string(&bootstrap)
        .map_err(|e| e.to_string())
        .and_then(|json| serde_json::from_str(&json).map_err(|e| e.to_string()))
    {
        Ok(json) => json,
        Err(error) => panic!("reading {}: {error}", bootstrap.display()),
    };
    let creds = &written["xds_servers"][0]["channel_creds"][0];
    assert_eq!(creds["type"], "tls", "{written}");
    assert!(
        creds["config"]["certificate_file"].is_string()
            && creds["config"]["private_key_file"].is_string(),
        "the bootstrap must present the workload's certificate to mesh-control (A65): {creds}"
    );

    let (report, client) =
        LingeringClient::start(&python, &bootstrap, "xds:///payment", CALLS).await;
    let status = mesh.server.status();
    let entry = client_status_of(&status, CLIENT_NODE).cloned();
    let stderr = client.stop().await;
    eprintln!(
        "grpcio under the CA: {} ok, by version {:?}, {} errors; /status: {entry:?}",
        report.ok,
        report.by_version,
        report.error_count()
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
    for backend in backends {
        backend.shutdown().await;
    }
    mesh.server.shutdown().await;
}

/// The Rust payment server, a real workload of the secured mesh.
struct SecurePayment {
    serving: Serving,
    /// What the Payment service answered.
    stats: Arc<support::PaymentStats>,
    /// Calls that reached the app, by the caller's verified SPIFFE ID
    /// (`PeerIdentity`), or `anonymous`.
    callers: Arc<Mutex<BTreeMap<String, u64>>>,
    /// Kept alive: it feeds the inbound policy (A36 listener).
    _xds: XdsClient,
    _certificates: WorkloadCertificates,
}

impl SecurePayment {
    /// Runs as service account payment with the label `app: payment`, certificates
    /// from the CA for its join token, the mTLS mode and authorization of the A36
    /// listener mesh-control sends, registered as an endpoint of payment (gRPC).
    async fn start(mesh: &SecureMesh) -> SecurePayment {
        SecurePayment::start_presenting(mesh, "payment-1", "payment").await
    }

    /// [`SecurePayment::start`] as node `node_id`, presenting a certificate of the
    /// service account `presenting` (obtained with its join token): with anything but
    /// `payment`, an impostor at an endpoint of payment that clients must refuse.
    async fn start_presenting(mesh: &SecureMesh, node_id: &str, presenting: &str) -> SecurePayment {
        let spec = BootstrapSpec::new(node_id, NAMESPACE)
            .service_account("payment")
            .label("app", "payment")
            .join_token(mesh.token("payment"));
        let bootstrap = match Bootstrap::from_json(&mesh.server.bootstrap(&spec)) {
            Ok(bootstrap) => bootstrap,
            Err(error) => panic!("the payment workload's bootstrap: {error}"),
        };
        let certificate_spec = BootstrapSpec::new(node_id, NAMESPACE)
            .service_account(presenting)
            .join_token(mesh.token(presenting));
        let certificates = match Bootstrap::from_json(&mesh.server.bootstrap(&certificate_spec)) {
            Ok(certificate_bootstrap) => {
                WorkloadCertificates::from_bootstrap(&certificate_bootstrap).await
            }
            Err(error) => panic!("the bootstrap of {presenting}: {error}"),
        };
        let certificates = match certificates {
            Ok(Some(certificates)) => certificates,
            Ok(None) => panic!("the {presenting} bootstrap names no certificate provider"),
            Err(error) => panic!("certificates for {presenting} from the CA: {error}"),
        };
        let xds = XdsClient::start(bootstrap.clone());
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(listener) => listener,
            Err(error) => panic!("binding the payment server: {error}"),
        };
        let addr = match listener.local_addr() {
            Ok(addr) => addr,
            Err(error) => panic!("the payment server's address: {error}"),
        };
        let inbound = match InboundPolicy::from_xds(&xds, addr) {
            Ok(inbound) => inbound,
            Err(error) => panic!("the payment server's inbound policy: {error}"),
        };

        let server = PaymentServer::new(addr.to_string(), "v1");
        let stats = Arc::clone(&server.stats);
        let callers = Arc::new(Mutex::new(BTreeMap::new()));
        let record = {
            let callers = Arc::clone(&callers);
            tower::util::MapRequestLayer::new(move |request: http::Request<axum::body::Body>| {
                let caller = request
                    .extensions()
                    .get::<PeerIdentity>()
                    .map_or_else(|| "anonymous".to_owned(), |p| p.spiffe_id().to_string());
                *callers
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .entry(caller)
                    .or_insert(0) += 1;
                request
            })
        };
        let app = payment_routes(server)
            .into_axum_router()
            .layer(record)
            .layer(ServerLayer::from_bootstrap(&bootstrap, "payment").inbound(inbound.clone()));
        let registration = match Registration::from_bootstrap(&bootstrap, "payment") {
            Ok(registration) => registration.protocol(Protocol::Grpc),
            Err(error) => panic!("the payment registration: {error}"),
        };
        let security = Security::new(inbound).certificates(certificates.store().clone());
        let serving = match proxyless::serve_with(listener, registration, app, security).await {
            Ok(serving) => serving,
            Err(error) => panic!("serving payment under STRICT mTLS: {error}"),
        };
        SecurePayment {
            serving,
            stats,
            callers,
            _xds: xds,
            _certificates: certificates,
        }
    }

    fn callers(&self) -> BTreeMap<String, u64> {
        self.callers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Issue 5, acceptance 5: a grpcio client whose certificates come from files
/// (`file_watcher`, gRFC A29) issued by our CA reaches a Rust server over mTLS, all
/// driven by mesh-control: CDS tells grpcio to use mTLS and which SPIFFE ID the server
/// must present (A29, `match_subject_alt_names`), the A36 listener tells the server
/// to require client certificates and whom to let in (A41 RBAC).
///
/// - grpc-client: every call succeeds and the Rust server saw exactly its SPIFFE ID;
///   grpcio ACKs LDS, RDS, CDS and EDS (over TLS to mesh-control, A65 channel creds).
/// - intruder, a valid mesh identity no ALLOW policy names: every call fails
///   PERMISSION_DENIED naming the policy, and the app is never called.
/// - grpcio without xDS credentials speaks plaintext: the STRICT server never answers.
#[tokio::test]
async fn grpcio_reaches_a_strict_rust_server_over_mtls_with_certificates_from_our_ca() {
    const CLIENT_NODE: &str = "grpc-client-1";
    let python = require_grpcio_python().await;
    let mesh = SecureMesh::start().await;
    let payment = SecurePayment::start(&mesh).await;
    // GRPC_TRACE from the test's environment reaches the client (see the module docs).
    let xds_creds = ClientOptions {
        xds_creds: true,
        ..ClientOptions::default()
    };

    // The allowed client: mTLS both ways, its identity seen by the app.
    let bootstrap = mesh.grpcio_bootstrap("grpc-client", CLIENT_NODE).await;
    let (report, client) = LingeringClient::start_with(
        &python,
        &bootstrap,
        "xds:///payment",
        SECURE_CALLS,
        &xds_creds,
    )
    .await;
    // Read while the client's ADS stream is open; every distinct view is printed, so a
    // failure shows the last one (with any NACK).
    let mut last_view = String::new();
    let waited = std::time::Instant::now();
    let acked = loop {
        let status = mesh.server.status();
        let entry = client_status_of(&status, CLIENT_NODE);
        let view = entry.map_or_else(
            || format!("not connected; clients {}", node_ids(&status)),
            ToString::to_string,
        );
        if view != last_view {
            eprintln!("/status for {CLIENT_NODE}: {view}");
            last_view = view;
        }
        if entry.is_some_and(all_acked) {
            break true;
        }
        if waited.elapsed() > STATUS_DEADLINE {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stderr = client.stop().await;
    assert!(
        acked,
        "/status never showed {CLIENT_NODE} with LDS, RDS, CDS and EDS ACKed in \
         {STATUS_DEADLINE:?}\nreport: {report:?}\nstderr:\n{stderr}"
    );
    eprintln!(
        "grpcio as grpc-client over mTLS: {} ok, errors {:?}; the Rust server saw {:?}",
        report.ok,
        report.errors,
        payment.callers()
    );
    assert!(
        report.ready && report.error_count() == 0,
        "the allowed grpcio client failed: {:?}\nreport: {report:?}\nstderr:\n{stderr}",
        report.first_error
    );
    assert_eq!(report.ok, u64::from(SECURE_CALLS), "{report:?}");
    assert_eq!(
        payment.callers(),
        BTreeMap::from([(GRPC_CLIENT_ID.to_owned(), u64::from(SECURE_CALLS))]),
        "the Rust server must see exactly the grpcio client's SPIFFE ID on every call"
    );
    assert_eq!(payment.stats.pays(), u64::from(SECURE_CALLS));

    // A valid mesh identity that no ALLOW policy names: the handshake succeeds, the
    // RBAC of the A36 listener answers PERMISSION_DENIED, the app never runs.
    let bootstrap = mesh.grpcio_bootstrap("intruder", "intruder-1").await;
    let report = match run_grpc_xds_client_with(
        &python,
        &bootstrap,
        "xds:///payment",
        SECURE_CALLS,
        CLIENT_DEADLINE,
        &xds_creds,
    )
    .await
    {
        Ok(report) => report,
        Err(message) => panic!("{message}"),
    };
    eprintln!(
        "grpcio as intruder over mTLS: {} ok, errors {:?}, first {:?}",
        report.ok, report.errors, report.first_error
    );
    assert!(report.ready, "{report:?}");
    assert_eq!(
        report.errors,
        BTreeMap::from([("PERMISSION_DENIED".to_owned(), u64::from(SECURE_CALLS))]),
        "every intruder call must be denied: {report:?}"
    );
    let first_error = report.first_error.as_deref().unwrap_or_default();
    assert!(
        first_error.contains("RBAC: access denied") && first_error.contains(ALLOW_POLICY),
        "the denial does not name the policy: {first_error}"
    );
    assert_eq!(
        payment.stats.pays(),
        u64::from(SECURE_CALLS),
        "a denied call reached the app"
    );
    assert_eq!(
        payment.callers().keys().collect::<Vec<_>>(),
        [GRPC_CLIENT_ID],
        "a denied call reached the app"
    );

    // Without xDS credentials grpcio speaks plaintext, which a STRICT server refuses.
    let report = match run_grpc_xds_client(
        &python,
        &bootstrap,
        "xds:///payment",
        1,
        Duration::from_secs(5),
    )
    .await
    {
        Ok(report) => report,
        Err(message) => panic!("{message}"),
    };
    eprintln!(
        "grpcio in plaintext: {} ok, errors {:?}, first {:?}",
        report.ok, report.errors, report.first_error
    );
    assert_eq!(
        report.ok, 0,
        "plaintext reached a STRICT server: {report:?}"
    );
    assert_eq!(
        payment.stats.pays(),
        u64::from(SECURE_CALLS),
        "a plaintext call reached the app"
    );

    // An endpoint of payment that presents another identity (intruder's certificate,
    // from the same CA): grpcio checks the server's SPIFFE ID against what CDS says
    // payment may be (A29 match_subject_alt_names) and never sends it a call.
    if let Err(error) = payment.serving.shutdown().await {
        panic!("shutting the payment server down: {error}");
    }
    let impostor = SecurePayment::start_presenting(&mesh, "payment-2", "intruder").await;
    let bootstrap = mesh.grpcio_bootstrap("grpc-client", "grpc-client-2").await;
    let report = match run_grpc_xds_client_with(
        &python,
        &bootstrap,
        "xds:///payment",
        1,
        Duration::from_secs(5),
        &xds_creds,
    )
    .await
    {
        Ok(report) => report,
        Err(message) => panic!("{message}"),
    };
    eprintln!(
        "grpcio to a payment endpoint presenting intruder's identity: {} ok, errors {:?}, \
         first {:?}",
        report.ok, report.errors, report.first_error
    );
    assert_eq!(report.ok, 0, "grpcio called an impostor: {report:?}");
    assert_eq!(
        report.errors.keys().collect::<Vec<_>>(),
        ["UNAVAILABLE"],
        "{report:?}"
    );
    let first_error = report.first_error.as_deref().unwrap_or_default();
    assert!(
        first_error.contains("SANs from certificate did not match"),
        "grpcio did not refuse the server's identity: {first_error}"
    );
    assert_eq!(impostor.stats.pays(), 0, "the impostor was called");
    assert!(impostor.callers().is_empty(), "the impostor was called");

    if let Err(error) = impostor.serving.shutdown().await {
        panic!("shutting the impostor down: {error}");
    }
    mesh.server.shutdown().await;
}

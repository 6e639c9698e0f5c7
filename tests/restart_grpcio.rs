//! Zero failed calls across a crash of the control plane (issue 12,
//! acceptance 2): a real gRPC proxyless client (Python grpcio, as in
//! `interop_grpcio.rs`) and a Rust client call `payment` — a service that
//! exists only through its registrations, split 50/50 by a VirtualService —
//! while mesh-control, with a data directory, is SIGKILLed and restarted on
//! the same ports.
//!
//! Clients keep routing with the config they have while the control plane is
//! away; what the restart must not do is answer them with less than before.
//! So the Rust client calls throughout and after it reconnects, and a grpcio
//! client connecting right after the restart (before any heartbeat could
//! have re-registered the endpoints) must find them: every call succeeds.
//!
//! A SIGKILL needs mesh-control in a process of its own. The facade's tests
//! have no `mesh-control` binary to run, so this test binary runs itself
//! again with only [`control_server_process`], which then serves an embedded
//! mesh-control until it is killed.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mesh_testkit::wait::eventually_ok_async;
use proxyless::mesh_core::model::Protocol;
use proxyless::xds::ClientOptions;
use proxyless::{Bootstrap, Client, Registration, Serving, XdsClient};
use support::admin::admin_request;
use support::python::{require_grpcio_python, run_grpc_xds_client};
use support::shop::PayRequest;
use support::shop::payment_client::PaymentClient;
use support::{PaymentServer, eventually_named, payment_routes};

const DEADLINE: Duration = Duration::from_secs(10);

/// The settings of the control server process: config dir, data dir, xDS
/// and admin addresses, separated by newlines.
const CONTROL_ENV: &str = "PROXYLESS_TEST_RESTART_CONTROL";

/// payment exists only through registrations; its rule and route apply
/// once it is registered (and, after a restart, at once: the registrations
/// are restored before the config is judged).
const MESH: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment, namespace: shop}
spec:
  host: payment
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  http:
  - route:
    - destination: {host: payment, subset: v1}
      weight: 50
    - destination: {host: payment, subset: v2}
      weight: 50
";

/// Not a test of its own: the mesh-control process of the test below,
/// which runs this binary again with [`CONTROL_ENV`] set. Without it (a
/// normal run) it returns at once.
#[test]
fn control_server_process() {
    let Ok(settings) = std::env::var(CONTROL_ENV) else {
        return;
    };
    let parts: Vec<&str> = settings.lines().collect();
    let [config, data, xds, admin] = parts[..] else {
        panic!("{CONTROL_ENV} must hold four lines, not {settings:?}");
    };
    let runtime = tokio::runtime::Runtime::new().expect("a runtime");
    runtime.block_on(async {
        let _server = proxyless::control::Server::builder()
            .config_dir(config)
            .data_dir(data)
            .xds_addr(xds.parse().expect("the xDS address"))
            .admin_addr(admin.parse().expect("the admin address"))
            .lease_check_interval(Duration::from_millis(20))
            .start()
            .await
            .expect("start mesh-control");
        println!("mesh-control serving");
        std::future::pending::<()>().await;
    });
}

/// A port free now on loopback (the restarted process binds the same).
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("its address")
}

/// The control server process.
struct ControlProcess {
    child: Option<Child>,
    settings: String,
    admin: SocketAddr,
    log: PathBuf,
}

impl ControlProcess {
    fn new(config: &Path, data: &Path, xds: SocketAddr, admin: SocketAddr, log: PathBuf) -> Self {
        let settings = format!("{}\n{}\n{xds}\n{admin}", config.display(), data.display());
        ControlProcess {
            child: None,
            settings,
            admin,
            log,
        }
    }

    /// Starts (or restarts) it and waits until its admin API answers.
    async fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(std::env::current_exe().expect("this test binary"))
            .args([
                "control_server_process",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CONTROL_ENV, &self.settings)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("start the control server process");
        self.child = Some(child);
        let admin = self.admin;
        eventually_ok_async(
            "mesh-control's admin API to answer",
            DEADLINE,
            || async move {
                tokio::net::TcpStream::connect(admin)
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            },
        )
        .await;
    }

    /// SIGKILL: a crash, nothing written at the end.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControlProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A payment instance labelled `version`, registered (gRPC) for 30 s
/// leases: a heartbeat every 10 s, so none re-registers an endpoint during
/// the restart.
async fn backend(admin: SocketAddr, version: &str) -> Serving {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let served_by = listener.local_addr().expect("addr").to_string();
    let registration = Registration::new(admin.to_string(), "payment")
        .namespace("shop")
        .protocol(Protocol::Grpc)
        .ttl(Duration::from_secs(30))
        .label("version", version);
    proxyless::serve(
        listener,
        registration,
        payment_routes(PaymentServer::new(served_by, version)),
    )
    .await
    .expect("serve payment")
}

/// Calls made by the Rust client's loop.
#[derive(Default)]
struct Calls {
    ok: AtomicU64,
    failed: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
    stop: AtomicBool,
}

/// Whether the client `node_id` is connected to the control server at
/// `admin` and has acknowledged its endpoints.
async fn synced(admin: SocketAddr, node_id: &str) -> Result<(), String> {
    let (code, status) = admin_request(admin, "GET", "/status", "").await;
    if code != 200 {
        return Err(format!("/status answered {code}"));
    }
    let acked = status["clients"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["node_id"] == node_id && c["types"]["EDS"]["acked"] == true);
    if acked {
        Ok(())
    } else {
        Err(status["clients"].to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_and_rust_clients_lose_no_call_across_a_sigkill_and_restart() {
    let python = require_grpcio_python().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mesh");
    std::fs::create_dir(&config).expect("config dir");
    std::fs::write(config.join("payment.yaml"), MESH).expect("config");
    let (xds_addr, admin) = (free_addr(), free_addr());
    let mut control = ControlProcess::new(
        &config,
        &dir.path().join("data"),
        xds_addr,
        admin,
        dir.path().join("mesh-control.log"),
    );
    control.start().await;
    let _v1 = backend(admin, "v1").await;
    let _v2 = backend(admin, "v2").await;

    // The Rust client, calling all along.
    let bootstrap = proxyless::control::bootstrap_json(xds_addr, admin, "rust-client", "shop");
    let options = ClientOptions::default()
        .no_cache()
        .backoff(Duration::from_millis(10), Duration::from_millis(100));
    let xds = XdsClient::start_with(
        Bootstrap::from_json(&bootstrap).expect("bootstrap"),
        options,
    );
    tokio::time::timeout(DEADLINE, xds.wait_for_listener("payment"))
        .await
        .expect("payment's listener within 10 s")
        .expect("payment exists");
    eventually_named(
        "both payment subsets to have their endpoint",
        DEADLINE,
        || {
            let snapshot = xds.snapshot();
            ["v1", "v2"].iter().all(|v| {
                let cluster = format!("outbound|80|{v}|payment.shop.svc.cluster.local");
                snapshot
                    .endpoints
                    .get(cluster.as_str())
                    .is_some_and(|e| e.endpoint_count() == 1)
            })
        },
    )
    .await;
    let calls = Arc::new(Calls::default());
    let caller = {
        let calls = calls.clone();
        let channel: Client<tonic::body::Body> = Client::new(xds.clone());
        let payment = PaymentClient::with_origin(channel, "http://payment".parse().expect("uri"));
        tokio::spawn(async move {
            let mut n = 0;
            while !calls.stop.load(Ordering::SeqCst) {
                n += 1;
                let request = PayRequest {
                    order_id: format!("o-{n}"),
                    cents: 100,
                };
                match payment.clone().pay(request).await {
                    Ok(_) => {
                        calls.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(status) => {
                        calls.failed.fetch_add(1, Ordering::SeqCst);
                        let mut first = calls.first_error.lock().unwrap_or_else(|e| e.into_inner());
                        first.get_or_insert_with(|| status.to_string());
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };

    // grpcio, before the crash.
    let grpc_bootstrap = dir.path().join("grpc-bootstrap.json");
    let json = proxyless::control::bootstrap_json(xds_addr, admin, "grpc-python-restart", "shop");
    std::fs::write(&grpc_bootstrap, json).expect("bootstrap file");
    let report = run_grpc_xds_client(
        &python,
        &grpc_bootstrap,
        "xds:///payment",
        40,
        Duration::from_secs(20),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nmesh-control:\n{}", control.logs()));
    assert!(report.ready, "{report:?}");
    assert_eq!(report.error_count(), 0, "before the crash: {report:?}");

    // The crash, and a restart on the same ports.
    let before = calls.ok.load(Ordering::SeqCst);
    control.kill();
    control.start().await;

    // A grpcio client connecting right now finds payment's endpoints.
    let report = run_grpc_xds_client(
        &python,
        &grpc_bootstrap,
        "xds:///payment",
        40,
        Duration::from_secs(20),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nmesh-control:\n{}", control.logs()));
    assert!(report.ready, "{report:?}");
    assert_eq!(
        report.error_count(),
        0,
        "right after the restart: {report:?}\nmesh-control:\n{}",
        control.logs()
    );
    assert_eq!(report.ok, 40, "every call succeeded: {report:?}");

    // They were restored, not registered again.
    let (code, status) = admin_request(admin, "GET", "/status", "").await;
    assert_eq!(code, 200);
    assert_eq!(
        status["counters"]["registrations"], 0,
        "the endpoints come from the data directory: {status}"
    );

    // The Rust client reconnected, and calls on.
    eventually_ok_async(
        "the Rust client to reconnect to the restarted mesh-control",
        DEADLINE,
        || synced(admin, "rust-client"),
    )
    .await;
    let reconnected = calls.ok.load(Ordering::SeqCst);
    eventually_named(
        "50 more Rust calls after the reconnection",
        DEADLINE,
        || calls.ok.load(Ordering::SeqCst) >= reconnected + 50,
    )
    .await;
    calls.stop.store(true, Ordering::SeqCst);
    caller.await.expect("the calling task");
    let first_error = calls
        .first_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    assert_eq!(
        calls.failed.load(Ordering::SeqCst),
        0,
        "Rust calls failed across the restart, the first: {first_error:?}"
    );
    assert!(calls.ok.load(Ordering::SeqCst) > before);
}

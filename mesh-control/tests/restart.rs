//! The `mesh-control` binary across restarts, over real sockets, as an
//! operator runs it: with `--data-dir`, a SIGKILL (a crash, an OOM kill) and a
//! restart on the same ports serve the registered endpoints at once and
//! renew the same leases, never reuse a version for other content, and keep
//! the last good config when a broken edit is on disk; SIGTERM stops it
//! gracefully, ADS clients reading a status rather than a reset.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use mesh_core::xds::{self, Any};
use mesh_testkit::ads::{AdsClient, node};
use mesh_testkit::http::{get_text, json_request as admin, lease_request};

use mesh_testkit::wait::{DEADLINE, eventually_ok, eventually_ok_async};

const MESH: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  ports: [{number: 50051, name: grpc, protocol: GRPC}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment, namespace: shop}
spec:
  host: payment
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

/// payment's VirtualService: `v1`/`v2` to the subsets `a`/`b`.
fn vs(a: &str, v1: u32, b: &str, v2: u32) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment, namespace: shop}}
spec:
  hosts: [payment]
  http:
  - route:
    - destination: {{host: payment, subset: {a}}}
      weight: {v1}
    - destination: {{host: payment, subset: {b}}}
      weight: {v2}
"
    )
}

const V1: &str = "outbound|50051|v1|payment.shop.svc.cluster.local";
const ROUTES: &str = "payment.shop.svc.cluster.local:50051";

/// A port free now on loopback (the restarted process must bind the same).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("its address").port()
}

/// A `mesh-control serve` process, its directories and its log.
struct Control {
    child: Option<Child>,
    xds: SocketAddr,
    admin: SocketAddr,
    config: PathBuf,
    data: PathBuf,
    log: PathBuf,
    starts: usize,
    _dir: tempfile::TempDir,
}

impl Control {
    /// A config directory holding `files`, a data directory, two ports.
    fn new(files: &[(&str, &str)]) -> Control {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("mesh");
        std::fs::create_dir(&config).expect("config dir");
        for (name, text) in files {
            std::fs::write(config.join(name), text).expect("write config");
        }
        Control {
            child: None,
            xds: SocketAddr::from(([127, 0, 0, 1], free_port())),
            admin: SocketAddr::from(([127, 0, 0, 1], free_port())),
            data: dir.path().join("data"),
            log: dir.path().join("mesh-control.log"),
            config,
            starts: 0,
            _dir: dir,
        }
    }

    /// Starts the binary (again, on the same ports and directories) and
    /// waits until its admin API answers.
    async fn start(&mut self, data_dir: bool) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_mesh-control"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .arg("--xds")
            .arg(self.xds.to_string())
            .arg("--admin")
            .arg(self.admin.to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        if data_dir {
            command.arg("--data-dir").arg(&self.data);
        }
        self.child = Some(command.spawn().expect("start mesh-control"));
        let admin_addr = self.admin;
        eventually_ok_async(
            "mesh-control's admin API to answer",
            DEADLINE,
            || async move {
                match tokio::net::TcpStream::connect(admin_addr).await {
                    Ok(_) => Ok(()),
                    Err(e) => Err(e.to_string()),
                }
            },
        )
        .await;
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("a running process")
    }

    /// SIGKILL: no chance to write anything.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    /// Sends `signal` (`TERM`, `INT`) and waits for the exit, with how long
    /// it took.
    async fn stop(&mut self, signal: &str) -> (ExitStatus, Duration) {
        let pid = self.pid().to_string();
        let sent = Instant::now();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(&pid)
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid}");
        let mut child = self.child.take().expect("a running process");
        let exit = eventually_ok("mesh-control to exit", DEADLINE, || {
            match child.try_wait() {
                Ok(Some(status)) => Ok(status),
                Ok(None) => Err("still running".to_string()),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
        (exit, sent.elapsed())
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn status(&self) -> serde_json::Value {
        let (code, body) = admin(self.admin, "GET", "/status", "").await;
        assert_eq!(code, 200, "{body}");
        body
    }

    async fn ads(&self, id: &str) -> AdsClient {
        AdsClient::connect(self.xds, node(id).namespace("shop").build()).await
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What one response carried: its version and its resources.
type Sent = BTreeMap<String, Vec<Any>>;

/// Subscribes to `names` of `type_url`, ACKs, and returns the response.
async fn fetch(
    ads: &mut AdsClient,
    type_url: &str,
    names: &[&str],
    sent: &mut Sent,
) -> envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse {
    ads.subscribe(type_url, names).await;
    let response = ads.recv().await;
    ads.send(
        type_url,
        names,
        &response.version_info,
        &response.nonce,
        None,
    )
    .await;
    record(sent, &response);
    response
}

fn record(
    sent: &mut Sent,
    response: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) {
    sent.entry(format!("{} {}", response.type_url, response.version_info))
        .or_insert_with(|| response.resources.clone());
}

/// The endpoints of cluster `V1` in an EDS response.
fn endpoints(
    response: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<SocketAddr> {
    response
        .resources
        .iter()
        .filter_map(|any| xds::decode_endpoints(any).ok())
        .flat_map(|cla| {
            cla.localities
                .iter()
                .flat_map(|l| l.endpoints.iter().map(|e| e.address))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The weights of payment's route in an RDS response.
fn weights(
    response: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse,
) -> Vec<(String, u32)> {
    let any = response.resources.first().expect("payment's route config");
    let rc = xds::decode_route_config(any).expect("a route config");
    rc.virtual_hosts[0].routes[0]
        .action
        .clusters()
        .iter()
        .map(|c| (c.name.to_string(), c.weight))
        .collect()
}

fn register_body(port: u16, version: &str) -> String {
    format!(
        r#"{{"service": "payment", "namespace": "shop", "address": "127.0.0.1", "port": {port},
            "service_port": 50051, "labels": {{"version": "{version}"}}, "ttl_seconds": 60}}"#
    )
}

fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn a_sigkilled_server_restarts_with_its_leases_and_never_reuses_a_version() {
    let mut control = Control::new(&[("mesh.yaml", MESH), ("vs.yaml", &vs("v1", 100, "v2", 0))]);
    control.start(true).await;
    let mut sent = Sent::new();

    // A workload registers; a client watches payment's endpoints and routes.
    let (code, lease) = admin(
        control.admin,
        "POST",
        "/v1/endpoints",
        &register_body(9101, "v1"),
    )
    .await;
    assert_eq!(code, 201, "{lease}");
    let lease_id = lease["lease_id"].as_str().expect("a lease id").to_string();
    let secret = lease["lease_secret"]
        .as_str()
        .expect("a lease secret")
        .to_string();
    let mut ads = control.ads("client-1").await;
    let eds = fetch(&mut ads, xds::ENDPOINT_TYPE, &[V1], &mut sent).await;
    assert_eq!(
        endpoints(&eds),
        ["127.0.0.1:9101".parse::<SocketAddr>().unwrap()]
    );
    fetch(&mut ads, xds::ROUTE_CONFIG_TYPE, &[ROUTES], &mut sent).await;
    // A few more versions: a second endpoint comes and goes.
    let (code, second) = admin(
        control.admin,
        "POST",
        "/v1/endpoints",
        &register_body(9102, "v1"),
    )
    .await;
    assert_eq!(code, 201, "{second}");
    record(&mut sent, &ads.recv().await);
    let second_id = second["lease_id"].as_str().expect("a lease id");
    let second_secret = second["lease_secret"].as_str().expect("a lease secret");
    let (code, _) = lease_request(control.admin, "DELETE", second_id, second_secret).await;
    assert_eq!(code, 204);
    record(&mut sent, &ads.recv().await);
    let last_before: u64 = control.status().await["version"]
        .as_u64()
        .expect("a version");

    // The data directory is private.
    assert_eq!(file_mode(&control.data), 0o700);
    assert_eq!(file_mode(&control.data.join("leases.json")), 0o600);

    // A crash, and a restart on the same ports at once.
    control.kill();
    drop(ads);
    let killed = Instant::now();
    control.start(true).await;
    let restarted_in = killed.elapsed();

    // The endpoint is served at once: the first answer has it.
    let mut ads = control.ads("client-1").await;
    let eds = fetch(&mut ads, xds::ENDPOINT_TYPE, &[V1], &mut Sent::new()).await;
    assert_eq!(
        endpoints(&eds),
        ["127.0.0.1:9101".parse::<SocketAddr>().unwrap()],
        "the registered endpoint, and not the deregistered one, right after the restart \
         ({restarted_in:?} after the kill)\n{}",
        control.logs()
    );
    let rds = fetch(
        &mut ads,
        xds::ROUTE_CONFIG_TYPE,
        &[ROUTES],
        &mut Sent::new(),
    )
    .await;
    // No version sent before is sent again with other content; in fact the
    // restarted server starts above every version it sent.
    for response in [&eds, &rds] {
        let key = format!("{} {}", response.type_url, response.version_info);
        if let Some(before) = sent.get(&key) {
            assert_eq!(
                before, &response.resources,
                "version {key} sent again with other content"
            );
        }
        let version: u64 = response.version_info.parse().expect("a numeric version");
        assert!(
            version > last_before,
            "version {version} after the restart, {last_before} before"
        );
    }

    // The workload's next heartbeat renews the same lease.
    let (code, body) = lease_request(control.admin, "PUT", &lease_id, &secret).await;
    assert_eq!(code, 200, "renewing {lease_id} after the restart: {body}");
    let (code, _) = lease_request(control.admin, "PUT", second_id, second_secret).await;
    assert_eq!(code, 404, "the deregistered lease stays gone");

    // Deregistered after the restart: gone from EDS, and after another crash.
    let (code, _) = lease_request(control.admin, "DELETE", &lease_id, &secret).await;
    assert_eq!(code, 204);
    assert!(endpoints(&ads.recv().await).is_empty());
    control.kill();
    control.start(true).await;
    let mut ads = control.ads("client-2").await;
    let eds = fetch(&mut ads, xds::ENDPOINT_TYPE, &[V1], &mut Sent::new()).await;
    assert!(endpoints(&eds).is_empty(), "{:?}", endpoints(&eds));
}

#[tokio::test]
async fn sigterm_ends_ads_streams_with_a_status_and_exits_zero() {
    let mut control = Control::new(&[("mesh.yaml", MESH)]);

    // Idle: it exits at once.
    control.start(true).await;
    let (exit, took) = control.stop("TERM").await;
    assert_eq!(exit.code(), Some(0), "{}", control.logs());
    assert!(
        took < Duration::from_secs(3),
        "an idle server took {took:?} to stop"
    );

    // With an ADS stream open: the client reads UNAVAILABLE, not a reset.
    control.start(true).await;
    let (code, _) = admin(
        control.admin,
        "POST",
        "/v1/endpoints",
        &register_body(9201, "v1"),
    )
    .await;
    assert_eq!(code, 201);
    let mut ads = control.ads("client-term").await;
    let eds = fetch(&mut ads, xds::ENDPOINT_TYPE, &[V1], &mut Sent::new()).await;
    assert_eq!(endpoints(&eds).len(), 1);
    let (exit, took) = control.stop("TERM").await;
    assert_eq!(exit.code(), Some(0), "{}", control.logs());
    assert!(
        took < mesh_control::SHUTDOWN_GRACE,
        "stopping took {took:?}: the ADS stream was not ended"
    );
    let ended = ads.try_recv(DEADLINE).await.expect_err("the stream ends");
    assert!(
        ended.contains("The service is currently unavailable")
            && ended.contains("mesh-control is shutting down"),
        "the client should read a status, not a reset: {ended}"
    );
    let logs = control.logs();
    assert!(logs.contains("SIGTERM: stopping"), "{logs}");
    assert!(logs.contains("mesh-control stopped"), "{logs}");

    // With a CSDS stream open (a debugging client that keeps it): it ends
    // with UNAVAILABLE too, and the stop does not wait out its grace.
    control.start(true).await;
    let (mut csds, _requests) = csds_stream(control.xds).await;
    let (exit, took) = control.stop("TERM").await;
    assert_eq!(exit.code(), Some(0), "{}", control.logs());
    assert!(
        took < mesh_control::SHUTDOWN_GRACE,
        "stopping took {took:?}: the CSDS stream was not ended"
    );
    let ended = tokio::time::timeout(DEADLINE, csds.message())
        .await
        .expect("the CSDS stream ends")
        .expect_err("the CSDS stream ends with a status");
    assert_eq!(ended.code(), tonic::Code::Unavailable, "{ended}");
    assert!(
        ended.message().contains("mesh-control is shutting down"),
        "{ended}"
    );

    // SIGINT too; and the registration written at the stop is served again.
    control.start(true).await;
    let mut ads = control.ads("client-int").await;
    let eds = fetch(&mut ads, xds::ENDPOINT_TYPE, &[V1], &mut Sent::new()).await;
    assert_eq!(endpoints(&eds).len(), 1, "the lease survived the stop");
    let (exit, _) = control.stop("INT").await;
    assert_eq!(exit.code(), Some(0), "{}", control.logs());
}

#[tokio::test]
async fn a_broken_edit_on_disk_at_restart_serves_the_last_good_config() {
    let mut control = Control::new(&[("mesh.yaml", MESH), ("vs.yaml", &vs("v1", 100, "v2", 0))]);
    control.start(true).await;
    let mut ads = control.ads("client-edit").await;
    let rds = fetch(
        &mut ads,
        xds::ROUTE_CONFIG_TYPE,
        &[ROUTES],
        &mut Sent::new(),
    )
    .await;
    let in_force = weights(&rds);
    assert_eq!(in_force[0].1, 100);

    // The edit with a typo in the subset: rejected while running.
    let broken = vs("v1", 0, "v9", 100);
    std::fs::write(control.config.join("vs.yaml"), &broken).expect("edit");
    let rejected = eventually_ok_async("the edit to be rejected", DEADLINE, || {
        let control = &control;
        async move {
            let status = control.status().await;
            match status["rejected"].as_array() {
                Some(list) if !list.is_empty() => Ok(status),
                _ => Err(status.to_string()),
            }
        }
    })
    .await;
    let subset_line = broken
        .lines()
        .position(|l| l.contains("subset: v9"))
        .map(|i| i + 1)
        .expect("the typo");
    let first = &rejected["rejected"][0];
    assert_eq!(first["resource"], "VirtualService shop/payment");
    assert!(
        first["problems"][0]
            .as_str()
            .is_some_and(|p| p.contains(&format!("vs.yaml:{subset_line}: "))
                && p.contains("subset 'v9' is not defined")),
        "{first}"
    );
    assert!(
        first["kept"]["at"]
            .as_str()
            .is_some_and(|at| at.ends_with("vs.yaml:3")),
        "{first}"
    );
    // mesh-control stores the rejection (what /status shows) before it logs
    // it: the line may land a moment after /status has it.
    eventually_ok("the rejection logged at WARN", DEADLINE, || {
        if control
            .logs()
            .contains("change rejected, its last good version")
        {
            Ok(())
        } else {
            Err(control.logs())
        }
    })
    .await;
    // Counted where it is logged (after /status has it).
    eventually_ok_async("the rejection counted", DEADLINE, || async {
        let (code, metrics) = get_text(control.admin, "/metrics").await;
        assert_eq!(code, 200);
        if metrics.contains("mesh_control_config_rejected_resources 1")
            && metrics.contains("mesh_control_config_rejections_total 1")
        {
            Ok(())
        } else {
            Err(metrics)
        }
    })
    .await;

    // Killed, and restarted with the broken edit still on disk.
    control.kill();
    control.start(true).await;
    let mut ads = control.ads("client-edit-2").await;
    let rds = fetch(
        &mut ads,
        xds::ROUTE_CONFIG_TYPE,
        &[ROUTES],
        &mut Sent::new(),
    )
    .await;
    assert_eq!(weights(&rds), in_force, "the last good split, not the edit");
    let status = control.status().await;
    assert_eq!(
        status["rejected"][0]["resource"], "VirtualService shop/payment",
        "{status}"
    );

    // Without a data directory the edit is new again: rejected, so the
    // VirtualService is left out (what --data-dir is for).
    control.kill();
    control.start(false).await;
    assert!(
        control
            .logs()
            .contains("serving without --data-dir: the last good config"),
        "a WARN says what is lost"
    );
    let status = control.status().await;
    assert_eq!(status["rejected"][0]["kept"], serde_json::Value::Null);
    let mut ads = control.ads("client-edit-3").await;
    let rds = fetch(
        &mut ads,
        xds::ROUTE_CONFIG_TYPE,
        &[ROUTES],
        &mut Sent::new(),
    )
    .await;
    assert_eq!(weights(&rds).len(), 1, "the default route");

    // The fix applies, with or without a data directory.
    std::fs::write(control.config.join("vs.yaml"), vs("v1", 0, "v2", 100)).expect("fix");
    let response = ads.recv().await;
    assert_eq!(weights(&response)[0].1, 0);
}

/// A CSDS stream to `xds` that has had one answer, and the sender of its
/// requests: the stream stays open while the sender lives.
async fn csds_stream(
    xds: SocketAddr,
) -> (
    tonic::Streaming<envoy_types::pb::envoy::service::status::v3::ClientStatusResponse>,
    tokio::sync::mpsc::Sender<envoy_types::pb::envoy::service::status::v3::ClientStatusRequest>,
) {
    use envoy_types::pb::envoy::service::status::v3::ClientStatusRequest;
    use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))
        .expect("an endpoint")
        .connect()
        .await
        .expect("connect to CSDS");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(ClientStatusRequest::default()).await.expect("send");
    let mut stream = ClientStatusDiscoveryServiceClient::new(channel)
        .stream_client_status(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("a CSDS stream")
        .into_inner();
    stream
        .message()
        .await
        .expect("a CSDS answer")
        .expect("one message");
    (stream, tx)
}

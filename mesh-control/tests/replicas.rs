//! Replicas of mesh-control sharing one real etcd (Debian's `etcd-server`,
//! installed by the test when missing), each the `mesh-control` binary as
//! an operator runs it (`serve --etcd URL`), the config put in etcd with
//! `mesh-control apply`, clients speaking raw ADS:
//!
//! - an apply reaches the clients of every replica with one version (etcd's
//!   revision); an invalid apply writes nothing and says why at its lines;
//! - a registration made through one replica is served by all, renewed or
//!   deleted through any, and gone from all when its etcd lease ends;
//! - with etcd down, replicas serve the last state (to new clients too) and
//!   refuse writes with a message naming etcd; with etcd back, an apply
//!   and registrations go through again;
//! - the client of a killed replica reconnects to another and finds its
//!   version and resources;
//! - a replica cut off from etcd while the history it would resume from is
//!   compacted lists the state again, and serves it at its revision;
//! - replicas share one CA root, its key sealed in etcd; a replica with
//!   another encryption key refuses to start.
//!
//! Run: `cargo test -p mesh-control --features etcd --test replicas`.

#![cfg(feature = "etcd")]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use mesh_core::xds::{self, Any};
use mesh_testkit::ads::{AdsClient, node};
use mesh_testkit::etcd::EtcdProcess;
use mesh_testkit::http::{json_request as admin, lease_request};

use mesh_testkit::wait::{DEADLINE, eventually_ok_async, within};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

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

/// payment's VirtualService: `v1` percent to v1, `v2` to v2.
fn vs(v1: u32, v2: u32) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment, namespace: shop}}
spec:
  hosts: [payment]
  http:
  - route:
    - destination: {{host: payment, subset: v1}}
      weight: {v1}
    - destination: {{host: payment, subset: v2}}
      weight: {v2}
"
    )
}

const V1: &str = "outbound|50051|v1|payment.shop.svc.cluster.local";
const ROUTES: &str = "payment.shop.svc.cluster.local:50051";

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("its address").port()
}

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_mesh-control")
}

/// One `mesh-control serve --etcd` process.
struct Replica {
    child: Option<Child>,
    xds: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Replica {
    /// Starts a replica of the mesh in `etcd` (with `extra` arguments) and
    /// waits until its ports accept connections; panics with its log if it
    /// exits first.
    async fn start(etcd: &str, dir: &Path, name: &str, extra: &[&str]) -> Replica {
        let mut replica = Replica::spawn(etcd, dir, name, extra);
        let admin_addr = replica.admin;
        let log = replica.log.clone();
        let child = replica.child.as_mut().expect("a running process");
        eventually_ok_async(
            &format!("replica {name}'s admin API to accept connections"),
            DEADLINE,
            || {
                let exited = child.try_wait().ok().flatten();
                let log = log.clone();
                async move {
                    if let Some(status) = exited {
                        panic!(
                            "replica exited ({status}); its log:\n{}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                    }
                    tokio::net::TcpStream::connect(admin_addr)
                        .await
                        .map(drop)
                        .map_err(|e| e.to_string())
                }
            },
        )
        .await;
        replica
    }

    fn spawn(etcd: &str, dir: &Path, name: &str, extra: &[&str]) -> Replica {
        let xds = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(binary())
            .args(["serve", "--etcd", etcd])
            .arg("--xds")
            .arg(xds.to_string())
            .arg("--admin")
            .arg(admin.to_string())
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log file"))
            .stderr(out)
            .spawn()
            .expect("start mesh-control");
        Replica {
            child: Some(child),
            xds,
            admin,
            log,
        }
    }

    /// SIGKILL.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL");
            child.wait().expect("reap");
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn ads(&self, id: &str) -> AdsClient {
        AdsClient::connect(self.xds, node(id).namespace("shop").build()).await
    }

    /// The version it serves, from `/status` (which also says where the
    /// state comes from and what revision this replica has seen).
    async fn version(&self) -> u64 {
        let (code, status) = admin(self.admin, "GET", "/status", "").await;
        assert_eq!(code, 200, "{status}");
        let version = status["version"].as_u64().expect("a version");
        let shared = &status["shared"];
        assert_eq!(shared["store"], "etcd", "{status}");
        assert_eq!(shared["prefix"], "/proxyless/", "{status}");
        assert!(
            shared["revision"].as_u64().is_some_and(|r| r >= version),
            "the revision seen is at least the version served: {status}"
        );
        version
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An etcd, a config directory, and replicas.
struct Cluster {
    etcd: EtcdProcess,
    _dir: tempfile::TempDir,
    config: PathBuf,
    replicas: Vec<Replica>,
}

impl Cluster {
    /// etcd and `count` replicas of an empty mesh.
    async fn start(count: usize) -> Cluster {
        let etcd = EtcdProcess::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("mesh");
        std::fs::create_dir(&config).expect("config dir");
        let mut replicas = Vec::new();
        for i in 0..count {
            replicas
                .push(Replica::start(&etcd.endpoint(), dir.path(), &format!("r{i}"), &[]).await);
        }
        Cluster {
            etcd,
            _dir: dir,
            config,
            replicas,
        }
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.config.join(name), text).expect("write config");
    }

    /// `mesh-control apply` of the config directory.
    fn apply(&self) -> Output {
        Command::new(binary())
            .arg("apply")
            .arg(&self.config)
            .args(["--etcd", &self.etcd.endpoint()])
            .output()
            .expect("run mesh-control apply")
    }

    /// Applies the config directory, which must succeed; returns the etcd
    /// revision it was written at.
    fn applied(&self) -> u64 {
        let out = self.apply();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "apply failed: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        revision_of(&stdout)
    }

    fn logs(&self) -> String {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| format!("--- replica r{i}:\n{}", r.logs()))
            .collect()
    }
}

/// The revision in `applied N resources at etcd revision R: ...`.
fn revision_of(stdout: &str) -> u64 {
    stdout
        .split("at etcd revision ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|r| r.parse().ok())
        .unwrap_or_else(|| panic!("no revision in the output of apply: {stdout}"))
}

/// Subscribes to `names` of `type_url` and ACKs the first response.
async fn fetch(ads: &mut AdsClient, type_url: &str, names: &[&str]) -> DiscoveryResponse {
    ads.subscribe(type_url, names).await;
    let response = ads.recv().await;
    ack(ads, names, &response).await;
    response
}

async fn ack(ads: &AdsClient, names: &[&str], response: &DiscoveryResponse) {
    ads.send(
        &response.type_url,
        names,
        &response.version_info,
        &response.nonce,
        None,
    )
    .await;
}

/// The next response for which `wanted` holds (ACKing each), within the
/// deadline.
async fn next_where(
    ads: &mut AdsClient,
    names: &[&str],
    what: &str,
    wanted: impl Fn(&DiscoveryResponse) -> bool,
) -> DiscoveryResponse {
    within(what, async {
        loop {
            let response = ads.recv().await;
            ack(ads, names, &response).await;
            if wanted(&response) {
                return response;
            }
        }
    })
    .await
}

/// The weights of payment's route in an RDS response.
fn weights(response: &DiscoveryResponse) -> Vec<u32> {
    let Some(any) = response.resources.first() else {
        return Vec::new();
    };
    let rc = xds::decode_route_config(any).expect("a route config");
    rc.virtual_hosts[0].routes[0]
        .action
        .clusters()
        .iter()
        .map(|c| c.weight)
        .collect()
}

/// The endpoints in an EDS response.
fn endpoints(response: &DiscoveryResponse) -> Vec<SocketAddr> {
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

fn register_body(port: u16, ttl: u64) -> String {
    format!(
        r#"{{"service": "payment", "namespace": "shop", "address": "127.0.0.1", "port": {port},
            "service_port": 50051, "labels": {{"version": "v1"}}, "ttl_seconds": {ttl}}}"#
    )
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Versions and resources of one type, as several clients saw them.
fn same(responses: &[&DiscoveryResponse]) -> (String, Vec<Any>) {
    let first = responses[0];
    for other in &responses[1..] {
        assert_eq!(
            (&other.version_info, &other.resources),
            (&first.version_info, &first.resources),
            "two replicas sent different versions or content"
        );
    }
    (first.version_info.clone(), first.resources.clone())
}

#[tokio::test]
async fn an_apply_reaches_the_clients_of_every_replica_with_one_version() {
    let cluster = Cluster::start(3).await;
    cluster.write("mesh.yaml", MESH);
    cluster.write("vs.yaml", &vs(90, 10));
    let first = cluster.applied();

    let mut clients = Vec::new();
    for (i, replica) in cluster.replicas.iter().enumerate() {
        clients.push(replica.ads(&format!("client-{i}")).await);
    }
    let mut seen = Vec::new();
    for client in &mut clients {
        let rds = next_where_first(client, first).await;
        seen.push(rds);
    }
    let (version, _) = same(&seen.iter().collect::<Vec<_>>());
    assert_eq!(version, first.to_string(), "the version is etcd's revision");
    assert_eq!(weights(&seen[0]), [90, 10]);

    // A change reaches every client, under one new version.
    cluster.write("vs.yaml", &vs(50, 50));
    let second = cluster.applied();
    assert!(second > first);
    let mut pushed = Vec::new();
    for client in &mut clients {
        pushed.push(
            next_where(client, &[ROUTES], "the 50/50 split", |r| {
                weights(r) == [50, 50]
            })
            .await,
        );
    }
    let (version, _) = same(&pushed.iter().collect::<Vec<_>>());
    assert_eq!(version, second.to_string());

    // The same config again writes nothing.
    let out = cluster.apply();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("nothing written"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // An invalid config writes nothing and says where it is wrong.
    cluster.write(
        "vs.yaml",
        &vs(50, 50).replace("  http:\n", "  tcp: []\n  http:\n"),
    );
    cluster.write("broken.yaml", "kind: [unclosed\n");
    let out = cluster.apply();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an invalid apply fails");
    assert!(stderr.contains("vs.yaml:6:"), "{stderr}");
    assert!(
        stderr.contains("broken.yaml:2: YAML syntax error"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was written to etcd"), "{stderr}");
    for replica in &cluster.replicas {
        assert_eq!(replica.version().await, second, "{}", cluster.logs());
    }
}

/// The first RDS response of a new client, which must be at `version`.
async fn next_where_first(client: &mut AdsClient, version: u64) -> DiscoveryResponse {
    let rds = fetch(client, xds::ROUTE_CONFIG_TYPE, &[ROUTES]).await;
    if rds.version_info == version.to_string() {
        return rds;
    }
    // A replica whose watch had not delivered the apply yet: the push follows.
    next_where(client, &[ROUTES], "the applied config", |r| {
        r.version_info == version.to_string()
    })
    .await
}

#[tokio::test]
async fn a_registration_through_one_replica_is_served_by_all_until_its_lease_ends() {
    let cluster = Cluster::start(3).await;
    cluster.write("mesh.yaml", MESH);
    cluster.write("vs.yaml", &vs(100, 0));
    cluster.applied();
    let [a, b, c] = &cluster.replicas[..] else {
        unreachable!("three replicas")
    };
    let mut on_b = b.ads("client-b").await;
    let mut on_c = c.ads("client-c").await;
    for client in [&mut on_b, &mut on_c] {
        let eds = fetch(client, xds::ENDPOINT_TYPE, &[V1]).await;
        assert!(endpoints(&eds).is_empty());
    }

    // Registered through a, with a short lease: served by b and c.
    let (code, lease) = admin(a.admin, "POST", "/v1/endpoints", &register_body(9101, 2)).await;
    assert_eq!(code, 201, "{lease}");
    let lease_id = lease["lease_id"].as_str().expect("a lease id").to_string();
    let secret = lease["lease_secret"]
        .as_str()
        .expect("a lease secret")
        .to_string();
    let mut seen = Vec::new();
    for client in [&mut on_b, &mut on_c] {
        seen.push(
            next_where(client, &[V1], "the registered endpoint", |r| {
                endpoints(r) == [addr(9101)]
            })
            .await,
        );
    }
    same(&seen.iter().collect::<Vec<_>>());

    // The same endpoint again, through another replica: a conflict.
    let (code, body) = admin(c.admin, "POST", "/v1/endpoints", &register_body(9101, 2)).await;
    assert_eq!(code, 409, "{body}");
    // Renewed through b, which did not take the registration; not without
    // the lease's secret.
    let path = format!("/v1/endpoints/{lease_id}");
    let (code, body) = admin(b.admin, "PUT", &path, "").await;
    assert_eq!(code, 403, "renewing without the secret: {body}");
    let (code, body) = lease_request(b.admin, "PUT", &lease_id, &secret).await;
    assert_eq!(
        code, 200,
        "renewing {lease_id} through another replica: {body}"
    );
    let (code, _) = admin(b.admin, "PUT", "/v1/endpoints/1234abcd", "").await;
    assert_eq!(code, 404, "an unknown lease");

    // Another registration, deleted through a third replica: gone everywhere.
    let (code, other) = admin(b.admin, "POST", "/v1/endpoints", &register_body(9102, 30)).await;
    assert_eq!(code, 201, "{other}");
    let other_id = other["lease_id"].as_str().expect("a lease id");
    let other_secret = other["lease_secret"].as_str().expect("a lease secret");
    for client in [&mut on_b, &mut on_c] {
        next_where(client, &[V1], "both endpoints", |r| endpoints(r).len() == 2).await;
    }
    let (code, body) = lease_request(c.admin, "DELETE", other_id, other_secret).await;
    assert_eq!(code, 204, "{body}");

    // The first stops renewing: its etcd lease ends, and every replica
    // stops serving it.
    for client in [&mut on_b, &mut on_c] {
        next_where(client, &[V1], "no endpoint once the lease ended", |r| {
            endpoints(r).is_empty()
        })
        .await;
    }
    let (code, _) = admin(a.admin, "PUT", &path, "").await;
    assert_eq!(code, 404, "the expired lease cannot be renewed");
}

#[tokio::test]
async fn with_etcd_down_replicas_serve_the_last_state_and_refuse_writes() {
    let mut cluster = Cluster::start(2).await;
    cluster.write("mesh.yaml", MESH);
    cluster.write("vs.yaml", &vs(90, 10));
    let applied = cluster.applied();
    let (code, lease) = admin(
        cluster.replicas[0].admin,
        "POST",
        "/v1/endpoints",
        &register_body(9101, 60),
    )
    .await;
    assert_eq!(code, 201, "{lease}");
    let lease_id = lease["lease_id"].as_str().expect("a lease id").to_string();
    let secret = lease["lease_secret"]
        .as_str()
        .expect("a lease secret")
        .to_string();
    let mut before = Vec::new();
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let mut client = replica.ads(&format!("before-{i}")).await;
        let eds = fetch(&mut client, xds::ENDPOINT_TYPE, &[V1]).await;
        let eds = if endpoints(&eds).is_empty() {
            next_where(&mut client, &[V1], "the endpoint", |r| {
                !endpoints(r).is_empty()
            })
            .await
        } else {
            eds
        };
        let rds = fetch(&mut client, xds::ROUTE_CONFIG_TYPE, &[ROUTES]).await;
        before.push((client, eds, rds));
    }

    cluster.etcd.stop();

    // New clients get the last state, at the same version.
    for (i, replica) in cluster.replicas.iter().enumerate() {
        let mut client = replica.ads(&format!("during-{i}")).await;
        let eds = fetch(&mut client, xds::ENDPOINT_TYPE, &[V1]).await;
        let rds = fetch(&mut client, xds::ROUTE_CONFIG_TYPE, &[ROUTES]).await;
        let (_, old_eds, old_rds) = &before[i];
        assert_eq!(
            (&eds.version_info, &eds.resources),
            (&old_eds.version_info, &old_eds.resources)
        );
        assert_eq!(
            (&rds.version_info, &rds.resources),
            (&old_rds.version_info, &old_rds.resources)
        );
        assert_eq!(weights(&rds), [90, 10]);
        assert!(rds.version_info.parse::<u64>().expect("a version") >= applied);
    }

    // Writes are refused, naming etcd.
    let replica = &cluster.replicas[1];
    let (code, body) = admin(
        replica.admin,
        "POST",
        "/v1/endpoints",
        &register_body(9102, 60),
    )
    .await;
    assert_eq!(code, 503, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(message.contains("etcd"), "{message}");
    let (code, body) = lease_request(replica.admin, "PUT", &lease_id, &secret).await;
    assert_eq!(code, 503, "{body}");
    let (code, body) = lease_request(replica.admin, "DELETE", &lease_id, &secret).await;
    assert_eq!(code, 503, "{body}");
    cluster.write("vs.yaml", &vs(10, 90));
    let out = cluster.apply();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("etcd") && stderr.contains("nothing was written"),
        "{stderr}"
    );
    // The clients connected before were left alone.
    for (client, _, _) in &mut before {
        assert!(
            client
                .try_recv(std::time::Duration::from_millis(200))
                .await
                .is_err(),
            "no push while etcd is down"
        );
    }

    // etcd is back: the watch resumes, an apply propagates, registrations
    // work, and the lease made before survived.
    cluster.etcd.restart().await;
    let after = cluster.applied();
    for (client, _, _) in &mut before {
        let rds = next_where(
            client,
            &[ROUTES],
            "the split applied after the outage",
            |r| weights(r) == [10, 90],
        )
        .await;
        assert_eq!(rds.version_info, after.to_string(), "{}", cluster.logs());
    }
    let (code, body) = admin(
        replica.admin,
        "POST",
        "/v1/endpoints",
        &register_body(9102, 60),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = lease_request(replica.admin, "PUT", &lease_id, &secret).await;
    assert_eq!(code, 200, "the lease made before the outage: {body}");
}

#[tokio::test]
async fn the_client_of_a_killed_replica_finds_its_version_on_another() {
    let mut cluster = Cluster::start(2).await;
    cluster.write("mesh.yaml", MESH);
    cluster.write("vs.yaml", &vs(90, 10));
    let applied = cluster.applied();
    let mut client = cluster.replicas[0].ads("client-1").await;
    let rds = next_where_first(&mut client, applied).await;

    cluster.replicas[0].kill();
    let ended = client.try_recv(DEADLINE).await;
    assert!(
        ended.is_err(),
        "the stream ends with its replica: {ended:?}"
    );

    // Our raw client reconnects by itself, to the other replica.
    let mut client = cluster.replicas[1].ads("client-1").await;
    let again = fetch(&mut client, xds::ROUTE_CONFIG_TYPE, &[ROUTES]).await;
    assert_eq!(
        (&again.version_info, &again.resources),
        (&rds.version_info, &rds.resources),
        "the same version and content on the other replica"
    );

    // And follows the next change there.
    cluster.write("vs.yaml", &vs(50, 50));
    let next = cluster.applied();
    let pushed = next_where(&mut client, &[ROUTES], "the 50/50 split", |r| {
        weights(r) == [50, 50]
    })
    .await;
    assert_eq!(pushed.version_info, next.to_string());
}

#[tokio::test]
async fn replicas_share_one_ca_root_sealed_in_etcd() {
    let etcd = EtcdProcess::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("ca.key");
    std::fs::write(&key, format!("{}\n", "5a".repeat(32))).expect("key file");
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, "a5".repeat(32)).expect("key file");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for file in [&key, &other_key] {
            std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
    }
    let tokens = dir.path().join("tokens.json");
    std::fs::write(
        &tokens,
        r#"{"tokens": [{"token": "catalog-token-0123456789abcdef", "namespace": "shop",
            "service_account": "catalog"}]}"#,
    )
    .expect("tokens file");
    let ca_args = |key: &Path, bundle: &Path| {
        vec![
            "--join-tokens".to_string(),
            tokens.display().to_string(),
            "--ca-key-encryption-key".to_string(),
            key.display().to_string(),
            "--trust-bundle-file".to_string(),
            bundle.display().to_string(),
        ]
    };
    let bundles = [dir.path().join("a.pem"), dir.path().join("b.pem")];
    let mut replicas = Vec::new();
    for (i, bundle) in bundles.iter().enumerate() {
        let args = ca_args(&key, bundle);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        replicas.push(Replica::start(&etcd.endpoint(), dir.path(), &format!("ca{i}"), &args).await);
    }
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let first = eventually_ok_async("both trust bundles written", DEADLINE, || async {
        match bundles
            .iter()
            .map(|b| read(b))
            .collect::<Vec<_>>()
            .as_slice()
        {
            [a, b] if !a.is_empty() && !b.is_empty() => Ok(a.clone()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(first.contains("BEGIN CERTIFICATE"), "{first}");
    assert_eq!(read(&bundles[1]), first, "one root for both replicas");

    // etcd holds the certificate, not the key in the clear.
    let client = mesh_control::etcd::Etcd::connect(&[etcd.endpoint()], None)
        .await
        .expect("etcd");
    let stored = client
        .get("/proxyless/ca/root")
        .await
        .expect("read etcd")
        .expect("the shared root");
    let text = String::from_utf8_lossy(&stored.value);
    assert!(text.contains("BEGIN CERTIFICATE"), "{text}");
    assert!(!text.contains("PRIVATE KEY"), "the key is sealed: {text}");

    // A replica with another key cannot open it and does not start.
    let args = ca_args(&other_key, &dir.path().join("c.pem"));
    let mut stranger = Replica::spawn(
        &etcd.endpoint(),
        dir.path(),
        "stranger",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let child = stranger.child.as_mut().expect("a process");
    let status = eventually_ok_async("the replica with another key to exit", DEADLINE, || {
        let status = child.try_wait();
        async move {
            match status {
                Ok(Some(status)) => Ok(status),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    assert!(!status.success());
    let log = stranger.logs();
    assert!(log.contains("--ca-key-encryption-key"), "{log}");
    drop(replicas);
}

/// A TCP proxy in front of etcd, which the test cuts (every connection
/// closed, new ones refused) and restores on the same port: one replica
/// loses etcd while etcd stays up for everyone else.
struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut proxy = Proxy {
            addr: listener.local_addr().expect("its address"),
            target,
            tasks: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (target, tasks) = (self.target, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let connection = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().expect("the task list").push(connection);
            }
        });
        self.tasks.lock().expect("the task list").push(accept);
    }

    /// Closes every connection and the listener.
    fn cut(&self) {
        for task in self.tasks.lock().expect("the task list").drain(..) {
            task.abort();
        }
    }

    /// Listens again on the same port.
    async fn restore(&mut self) {
        let listener = TcpListener::bind(self.addr).await.expect("bind again");
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_a_compaction_lists_the_state_again() {
    let etcd = EtcdProcess::start().await;
    let target: SocketAddr = etcd
        .endpoint()
        .trim_start_matches("http://")
        .parse()
        .expect("etcd's address");
    let mut proxy = Proxy::start(target).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = Cluster {
        etcd,
        config: dir.path().join("mesh"),
        _dir: dir,
        replicas: Vec::new(),
    };
    std::fs::create_dir(&cluster.config).expect("config dir");
    cluster.write("mesh.yaml", MESH);
    cluster.write("vs.yaml", &vs(90, 10));
    let first = cluster.applied();
    let replica = Replica::start(&proxy.endpoint(), cluster._dir.path(), "behind", &[]).await;
    let mut client = replica.ads("client-behind").await;
    let rds = next_where_first(&mut client, first).await;
    assert_eq!(weights(&rds), [90, 10]);

    // Cut off: a change, then a write elsewhere, and the history up to it
    // compacted (the replica would resume from the change's revision).
    proxy.cut();
    let proxy_addr = proxy.addr;
    eventually_ok_async("the proxy to refuse connections", DEADLINE, || async move {
        match TcpStream::connect(proxy_addr).await {
            Ok(_) => Err("still accepting"),
            Err(_) => Ok(()),
        }
    })
    .await;
    cluster.write("vs.yaml", &vs(50, 50));
    let second = cluster.applied();
    let direct = mesh_control::etcd::Etcd::connect(&[cluster.etcd.endpoint()], None)
        .await
        .expect("etcd");
    let later = direct
        .put("/elsewhere/key", "value", None)
        .await
        .expect("a write outside the mesh's prefix");
    direct.compact(later).await.expect("compact");

    // Back: the watch cannot resume, so the replica lists again.
    proxy.restore().await;
    let pushed = next_where(
        &mut client,
        &[ROUTES],
        "the change made while cut off",
        |r| weights(r) == [50, 50],
    )
    .await;
    // A list knows the store's revision, not the revision of the last
    // change under the prefix: the content is published under the list's
    // revision (above the change's, never a version another content had).
    assert_eq!(pushed.version_info, later.to_string(), "{}", replica.logs());
    assert!(
        replica.logs().contains("listing the mesh's state again"),
        "{}",
        replica.logs()
    );
    assert!(
        u64::try_from(later).is_ok_and(|later| later > second),
        "the list's revision {later} is above the change's {second}"
    );

    // The next change is published under its own revision again.
    cluster.write("vs.yaml", &vs(10, 90));
    let third = cluster.applied();
    let pushed = next_where(&mut client, &[ROUTES], "the next change", |r| {
        weights(r) == [10, 90]
    })
    .await;
    assert_eq!(pushed.version_info, third.to_string());
}

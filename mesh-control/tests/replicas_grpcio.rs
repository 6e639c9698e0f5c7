//! A real gRPC proxyless client (Python grpcio, the pin of the facade's
//! interop tests) naming two mesh-control replicas by one DNS name, as
//! production would: the replicas listen on 127.0.0.1:P and 127.0.0.2:P,
//! and the client runs in a mount namespace of its own (`unshare -m`) whose
//! /etc/hosts says `mesh-control.test` is both, read by grpc's native
//! resolver (`GRPC_DNS_RESOLVER=native`). Its bootstrap names
//! `mesh-control.test:P` once. The replica serving it is SIGKILLed while it
//! calls: not one call fails, it reconnects to the other replica, and a
//! routing change applied after the kill reaches it there.
//!
//! (A list of addresses, `ipv4:127.0.0.1:P,127.0.0.2:P`, is not an answer:
//! grpcio 1.85.1's xDS client fails on it; a second `xds_servers` entry is
//! only a fallback for a cold start under gRFC A71, not where a running
//! client goes when its server dies.)
//!
//! It lives here rather than with the facade's interop tests because it
//! needs the `mesh-control` binary built with `etcd`, which only this
//! crate's tests have; it reuses their venv and pin. Needs root for
//! `unshare -m` (as the Debian package install of etcd does).
//!
//! Run: `cargo test -p mesh-control --features etcd --test replicas_grpcio`.

#![cfg(feature = "etcd")]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use mesh_testkit::etcd::EtcdProcess;
use mesh_testkit::http::json_request as admin;
use mesh_testkit::install::Venv;
use mesh_testkit::wait::{DEADLINE, eventually_ok_async, within};
use tokio::io::AsyncBufReadExt;

/// The grpcio the facade's interop tests pin (tests/support/python.rs), in
/// the same venv.
const GRPCIO: &str = "grpcio==1.85.1";
const VENV_DIR: &str = "interop-venv";

/// The name both replicas answer to.
const NAME: &str = "mesh-control.test";
const NODE_ID: &str = "grpcio-replicas";

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

/// Two `shop.Payment/Pay` servers (v1 and v2) with grpcio's generic
/// handlers (no generated code: PayReply{served_by = 1, version = 2} is
/// encoded by hand, as grpc_xds_client.py decodes it). Prints one JSON line
/// with their ports, then serves until killed.
const SERVERS: &str = r#"
import json, sys, time
from concurrent import futures
import grpc

def field(number, text):
    raw = text.encode()
    return bytes([number << 3 | 2, len(raw)]) + raw

def handler(version, served_by):
    reply = field(1, served_by) + field(2, version)
    def pay(request, context):
        return reply
    return grpc.method_handlers_generic_handler("shop.Payment", {
        "Pay": grpc.unary_unary_rpc_method_handler(
            pay, request_deserializer=None, response_serializer=None),
    })

ports = {}
servers = []
for version in ("v1", "v2"):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    port = server.add_insecure_port("127.0.0.1:0")
    server.add_generic_rpc_handlers((handler(version, "127.0.0.1:%d" % port),))
    server.start()
    servers.append(server)
    ports[version] = port
print(json.dumps(ports), flush=True)
while True:
    time.sleep(3600)
"#;

/// A proxyless client calling `xds:///payment` in a loop until the file
/// STOP exists and holds a version it has since had WANT replies from (or
/// the deadline passes). Writes STOP.called after its first reply. Prints
/// one JSON line: ok, errors by code, by_version, first_error.
const CLIENT: &str = r#"
import json, os, sys, time
import grpc

target, stop, want, deadline = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])

def decode(data):
    out, pos = {}, 0
    while pos < len(data):
        key, length = data[pos], data[pos + 1]
        out[key >> 3] = data[pos + 2:pos + 2 + length].decode()
        pos += 2 + length
    return out.get(2, "")

report = {"ok": 0, "errors": {}, "by_version": {}, "first_error": None, "ready": False}
end = time.monotonic() + deadline
channel = grpc.insecure_channel(target)
pay = channel.unary_unary("/shop.Payment/Pay", request_serializer=lambda b: b,
                          response_deserializer=decode)
try:
    grpc.channel_ready_future(channel).result(timeout=deadline)
    report["ready"] = True
    since = 0
    wanted = None
    while time.monotonic() < end:
        if wanted is None and os.path.exists(stop):
            wanted = open(stop).read().strip() or None
        try:
            version = pay(b"\x0a\x01x", timeout=5)
        except grpc.RpcError as error:
            name = error.code().name
            report["errors"][name] = report["errors"].get(name, 0) + 1
            if report["first_error"] is None:
                report["first_error"] = "%s: %s" % (name, error.details())
            continue
        report["ok"] += 1
        if report["ok"] == 1:
            # Tells the test that calls are flowing (STOP.called).
            with open(stop + ".called", "w") as called:
                called.write(version)
        report["by_version"][version] = report["by_version"].get(version, 0) + 1
        if wanted is not None and version == wanted:
            since += 1
            if since >= want:
                break
except Exception as error:
    report["errors"]["SCRIPT_ERROR"] = 1
    report["first_error"] = "%s: %s" % (type(error).__name__, error)
print(json.dumps(report), flush=True)
os._exit(0)
"#;

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("its address").port()
}

/// A port free on both 127.0.0.1 and 127.0.0.2.
fn free_port_on_both() -> u16 {
    for _ in 0..100 {
        let port = free_port();
        if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// A process killed on drop.
struct Process(Option<Child>);

impl Process {
    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A replica on `ip`, its xDS port `xds_port`.
async fn replica(etcd: &str, ip: &str, xds_port: u16, log: &Path) -> (Process, SocketAddr) {
    let admin_addr: SocketAddr = format!("{ip}:{}", free_port()).parse().expect("an address");
    let out = std::fs::File::create(log).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .args(["serve", "--etcd", etcd])
        .args(["--xds", &format!("{ip}:{xds_port}")])
        .args(["--admin", &admin_addr.to_string()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("log file"))
        .stderr(out)
        .spawn()
        .expect("start mesh-control");
    eventually_ok_async("the replica's admin API", DEADLINE, || async move {
        tokio::net::TcpStream::connect(admin_addr)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
    (Process(Some(child)), admin_addr)
}

/// Whether the client is connected to the replica at `admin` and has
/// acknowledged the route config at `version` (any, when `None`).
async fn serves_client(admin_addr: SocketAddr, version: Option<&str>) -> Result<(), String> {
    let (code, status) = admin(admin_addr, "GET", "/status", "").await;
    if code != 200 {
        return Err(format!("/status answered {code}"));
    }
    let synced = status["clients"].as_array().into_iter().flatten().any(|c| {
        let rds = &c["types"]["RDS"];
        c["node_id"] == NODE_ID
            && rds["acked"] == true
            && version.is_none_or(|v| rds["acked_version"] == v)
    });
    if synced {
        Ok(())
    } else {
        Err(status["clients"].to_string())
    }
}

fn apply(etcd: &str, dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .arg("apply")
        .arg(dir)
        .args(["--etcd", etcd])
        .output()
        .expect("run mesh-control apply");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "apply: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .split("at etcd revision ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .unwrap_or_else(|| panic!("no revision in {stdout}"))
        .to_string()
}

/// Panics, saying what to do, unless this process may make a mount
/// namespace (root, or CAP_SYS_ADMIN).
fn require_unshare() {
    let status = Command::new("unshare")
        .args(["-m", "true"])
        .stderr(Stdio::piped())
        .output();
    match status {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "this test gives the grpcio client its own /etc/hosts with `unshare -m`, which \
             failed ({}): run it as root (or with CAP_SYS_ADMIN)",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => panic!(
            "this test needs `unshare` (util-linux) to give the grpcio client its own \
             /etc/hosts: {e}"
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_naming_the_replicas_by_one_name_survives_a_kill() {
    require_unshare();
    let python = match tokio::task::spawn_blocking(|| {
        Venv::in_target_dir(VENV_DIR, &[GRPCIO], &["grpc"]).ensure()
    })
    .await
    {
        Ok(Ok(python)) => python,
        Ok(Err(message)) => panic!("{message}"),
        Err(e) => panic!("installing grpcio: {e}"),
    };
    let etcd = EtcdProcess::start().await;
    let url = etcd.endpoint();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("mesh");
    std::fs::create_dir(&config).expect("config dir");
    std::fs::write(config.join("mesh.yaml"), MESH).expect("write");
    std::fs::write(config.join("vs.yaml"), vs(100, 0)).expect("write");
    apply(&url, &config);

    let port = free_port_on_both();
    let (mut one, one_admin) = replica(&url, "127.0.0.1", port, &dir.path().join("r1.log")).await;
    let (mut two, two_admin) = replica(&url, "127.0.0.2", port, &dir.path().join("r2.log")).await;

    // The two backends, registered through the first replica.
    let script = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write a script");
        path
    };
    let mut servers = tokio::process::Command::new(&python)
        .arg(script("servers.py", SERVERS))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the grpcio servers");
    let mut lines = tokio::io::BufReader::new(servers.stdout.take().expect("stdout")).lines();
    let ports: serde_json::Value = within("the grpcio servers' ports", lines.next_line())
        .await
        .expect("read the servers' output")
        .and_then(|line| serde_json::from_str(&line).ok())
        .expect("a JSON line of ports");
    for version in ["v1", "v2"] {
        let body = format!(
            r#"{{"service": "payment", "namespace": "shop", "address": "127.0.0.1",
                "port": {}, "service_port": 50051, "protocol": "GRPC",
                "labels": {{"version": "{version}"}}, "ttl_seconds": 120}}"#,
            ports[version]
        );
        let (code, lease) = admin(one_admin, "POST", "/v1/endpoints", &body).await;
        assert_eq!(code, 201, "{lease}");
    }

    // The client, in a namespace whose /etc/hosts names both replicas.
    let hosts = script("hosts", &format!("127.0.0.1 {NAME}\n127.0.0.2 {NAME}\n"));
    let bootstrap = script(
        "bootstrap.json",
        &serde_json::json!({
            "xds_servers": [{
                "server_uri": format!("{NAME}:{port}"),
                "channel_creds": [{"type": "insecure"}],
                "server_features": ["xds_v3"],
            }],
            "node": {"id": NODE_ID, "metadata": {"NAMESPACE": "shop"}},
        })
        .to_string(),
    );
    let stop = dir.path().join("stop");
    let client = tokio::process::Command::new("unshare")
        .args([
            "-m",
            "sh",
            "-c",
            r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#,
        ])
        .arg("sh")
        .arg(&hosts)
        .arg(&python)
        .arg(script("client.py", CLIENT))
        .args(["xds:///payment"])
        .arg(&stop)
        .args(["50", "40"])
        .env("GRPC_XDS_BOOTSTRAP", &bootstrap)
        .env("GRPC_DNS_RESOLVER", "native")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the grpcio client under unshare");

    // Calls flow (v1, before any change) before anything is killed: on a
    // fast machine the kill, the reconnect and the change could otherwise
    // all happen before the client's first call.
    let called = dir.path().join("stop.called");
    eventually_ok_async("the client's first reply", DEADLINE, || async {
        std::fs::read_to_string(&called)
            .ok()
            .filter(|v| !v.is_empty())
            .ok_or("no reply yet")
    })
    .await;

    // Which replica serves it: kill that one while it calls.
    let serving = eventually_ok_async("the client to sync with a replica", DEADLINE, || async {
        if serves_client(one_admin, None).await.is_ok() {
            Ok(1)
        } else if serves_client(two_admin, None).await.is_ok() {
            Ok(2)
        } else {
            Err("neither replica lists the client yet")
        }
    })
    .await;
    let survivor = if serving == 1 {
        one.kill();
        two_admin
    } else {
        two.kill();
        one_admin
    };
    eventually_ok_async(
        "the client to reconnect to the other replica",
        DEADLINE,
        || serves_client(survivor, None),
    )
    .await;

    // A routing change after the kill reaches it through the survivor.
    std::fs::write(config.join("vs.yaml"), vs(0, 100)).expect("write");
    let revision = apply(&url, &config);
    eventually_ok_async("the client to acknowledge the change", DEADLINE, || {
        serves_client(survivor, Some(&revision))
    })
    .await;
    std::fs::write(&stop, "v2").expect("write the stop file");
    let output = within("the client to finish", client.wait_with_output())
        .await
        .expect("the client's output");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|line| serde_json::from_str(line).ok())
        .unwrap_or_else(|| panic!("no report from the client: {stdout}\n{stderr}"));
    println!("grpcio client across the kill of replica r{serving}: {report}");
    let logs = || {
        [("r1", "r1.log"), ("r2", "r2.log")]
            .map(|(name, file)| {
                let text = std::fs::read_to_string(dir.path().join(file)).unwrap_or_default();
                format!("--- {name}:\n{text}")
            })
            .join("\n")
    };
    assert_eq!(
        report["errors"],
        serde_json::json!({}),
        "no call fails across the kill: {report}\n{stderr}\n{}",
        logs()
    );
    assert!(
        report["by_version"]["v1"].as_u64().unwrap_or(0) > 0
            && report["by_version"]["v2"].as_u64().unwrap_or(0) >= 50,
        "v1 before the change, v2 after it: {report}"
    );
    drop(etcd);
    drop(servers);
}

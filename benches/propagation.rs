//! `cargo bench --bench propagation`: how fast a config change reaches 1, 100 and
//! 1,000 xDS clients, and what mesh-control pays for it.
//!
//! For each client count N, two processes (besides this one, which only starts them
//! and writes the report):
//!
//! - **mesh-control**, embedded in a process of its own (the `mesh-control serve`
//!   defaults: a file debounce on the leading and the trailing edge with a 10 ms
//!   window, a multi-thread runtime), serving a config directory with one service
//!   `catalog` (namespace `bench`, subsets v1/v2, a weighted route);
//! - **the clients process**: N `XdsClient`s, each with its own connection (as N
//!   workloads would have), subscribed to `catalog`. It makes the changes itself,
//!   so the start and the end of each measurement read the same clock:
//!   - *file*: rewrite the YAML (write aside, rename, as editors do) with new route
//!     weights; the clock starts when the rename returns, so inotify, the debounce
//!     (a rename is read at once: the leading edge), the reload, the translation
//!     and the push are all inside;
//!   - *api*: register a new endpoint (`POST /v1/endpoints`); the clock starts when
//!     the request is sent (mesh-control pushes the new endpoints before it answers
//!     201, so timing from the answer would often give 0).
//!
//!   A client has applied a change when its published snapshot shows it (each
//!   client's `changes()` watch wakes a checker task). Per change: the delay of
//!   every client; over all changes of a kind: p50, p99 and max.
//!
//! mesh-control's CPU time over the changes and its RSS with N clients connected come
//! from `/proc/<pid>` of its process. All three processes share the machine's cores.
//!
//! Settings: `MESH_BENCH_ROUNDS` (changes of each kind per N, default 10),
//! `MESH_BENCH_CLIENTS` (comma-separated N, default `1,100,1000`; smoke `1,10`),
//! `MESH_BENCH_SMOKE=1`. Writes `target/bench/propagation.json` and a markdown table.
//!
//! Then the Sidecar scoping row (see `sidecar_row` below; `MESH_BENCH_SIDECAR=0`
//! skips it, `=only` runs it alone): `target/bench/propagation-sidecar.json`.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proxyless::mesh_core::Snapshot;
use proxyless::{Bootstrap, XdsClient};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use common::{Percentiles, RoleProcess, loud, markdown_table, round1, round2};

const NAMESPACE: &str = "bench";
const ROUTES: &str = "catalog.bench.svc.cluster.local:80";
const V1_CLUSTER: &str = "outbound|80|v1|catalog.bench.svc.cluster.local";
const CONFIG_FILE: &str = "mesh.yaml";

fn main() {
    match std::env::var(common::ROLE_ENV).as_deref() {
        Ok("control") => common::control_main(2),
        Ok("clients") => clients_main(),
        Ok(other) => {
            eprintln!("error: unknown {} {other:?}", common::ROLE_ENV);
            std::process::exit(2);
        }
        Err(_) => orchestrate(),
    }
}

/// The mesh: `catalog` with two static endpoints (v1, v2) and a route split
/// `v1_weight` / `100 - v1_weight`.
fn mesh_yaml(v1_weight: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: {NAMESPACE}}}
spec:
  hosts: [catalog]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: 39001}}, labels: {{version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: 39002}}, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: {NAMESPACE}}}
spec:
  host: catalog
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: {NAMESPACE}}}
spec:
  hosts: [catalog]
  http:
  - name: split
    route:
    - {{destination: {{host: catalog, subset: v1}}, weight: {v1_weight}}}
    - {{destination: {{host: catalog, subset: v2}}, weight: {v2_weight}}}
",
        v2_weight = 100 - v1_weight
    )
}

/// Replaces the config file the way editors do: write aside, then rename.
fn write_config(dir: &Path, yaml: &str) -> Result<(), String> {
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, yaml).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join(CONFIG_FILE)).map_err(|e| format!("renaming the config: {e}"))
}

/// The weights of catalog's split route as a client sees them.
fn split_weights(snapshot: &Snapshot) -> Option<(u32, u32)> {
    let rc = snapshot.route_configs.get(ROUTES)?;
    let route = rc
        .virtual_hosts
        .iter()
        .flat_map(|vh| vh.routes.iter())
        .find(|r| r.action.clusters().len() == 2)?;
    let c = route.action.clusters();
    Some((c.first()?.weight, c.get(1)?.weight))
}

fn has_v1_endpoint(snapshot: &Snapshot, addr: SocketAddr) -> bool {
    snapshot.endpoints.get(V1_CLUSTER).is_some_and(|cla| {
        cla.localities
            .iter()
            .flat_map(|l| l.endpoints.iter())
            .any(|e| e.address == addr)
    })
}

/// What a change must look like once applied.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Weights(u32, u32),
    Endpoint(SocketAddr),
}

impl Target {
    fn applied(self, snapshot: &Snapshot) -> bool {
        match self {
            Target::Weights(a, b) => split_weights(snapshot) == Some((a, b)),
            Target::Endpoint(addr) => has_v1_endpoint(snapshot, addr),
        }
    }
}

// ---------------------------------------------------------------------------------
// The clients process

struct ClientsEnv {
    n: usize,
    rounds: usize,
    config_dir: PathBuf,
    xds: SocketAddr,
    admin: SocketAddr,
    control_pid: u32,
}

fn env_or_fail(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| common::fail_role(format!("{name} is not set")))
}

fn parse_or_fail<T: std::str::FromStr>(name: &str) -> T {
    env_or_fail(name)
        .parse()
        .unwrap_or_else(|_| common::fail_role(format!("{name} is not valid")))
}

fn clients_main() -> ! {
    common::exit_when_stdin_closes();
    let env = ClientsEnv {
        n: parse_or_fail("MESH_BENCH_N"),
        rounds: parse_or_fail("MESH_BENCH_ROUNDS"),
        config_dir: PathBuf::from(env_or_fail("MESH_BENCH_CONFIG_DIR")),
        xds: parse_or_fail("MESH_BENCH_XDS"),
        admin: parse_or_fail("MESH_BENCH_ADMIN"),
        control_pid: parse_or_fail("MESH_BENCH_CONTROL_PID"),
    };
    let rt = common::runtime(std::thread::available_parallelism().map_or(2, |n| n.get()));
    match rt.block_on(run_clients(env)) {
        Ok(report) => {
            common::announce_ready(report);
            std::thread::park();
            std::process::exit(0)
        }
        Err(e) => common::fail_role(e),
    }
}

/// One change: (client index, when it saw it applied).
type Seen = (usize, Instant);

async fn run_clients(env: ClientsEnv) -> Result<Value, String> {
    let (round_tx, round_rx) = watch::channel::<Option<(usize, Target)>>(None);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(usize, usize, Instant)>();

    // Start every client, each with its own connection.
    let sync_started = Instant::now();
    let clients: Vec<XdsClient> = (0..env.n)
        .map(|i| {
            let json = proxyless::control::bootstrap_json(
                env.xds,
                env.admin,
                &format!("bench-client-{i}"),
                NAMESPACE,
            );
            // No disk cache: the bench measures propagation, not 1,000 fsyncs.
            Bootstrap::from_json(&json).map(|b| {
                XdsClient::start_with(b, proxyless::xds::ClientOptions::default().no_cache())
            })
        })
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bootstrap: {e}"))?;
    let synced = async {
        for xds in &clients {
            xds.wait_for_listener("catalog")
                .await
                .map_err(|e| format!("catalog: {e}"))?;
        }
        for (i, xds) in clients.iter().enumerate() {
            let mut changes = xds.changes();
            loop {
                changes.borrow_and_update();
                let snapshot = xds.snapshot();
                if split_weights(&snapshot).is_some()
                    && snapshot
                        .endpoints
                        .get(V1_CLUSTER)
                        .is_some_and(|c| c.endpoint_count() > 0)
                {
                    break;
                }
                changes
                    .changed()
                    .await
                    .map_err(|_| format!("client {i} stopped"))?;
            }
        }
        Ok::<_, String>(())
    };
    tokio::time::timeout(Duration::from_secs(300), synced)
        .await
        .map_err(|_| format!("{} clients not synced after 300 s", env.n))??;
    let sync_all = sync_started.elapsed();
    let control_synced = common::proc_sample(env.control_pid).unwrap_or_default();
    let own_synced = common::self_sample();

    // One checker task per client, for the whole run.
    for (i, xds) in clients.iter().enumerate() {
        let xds = xds.clone();
        let mut rounds = round_rx.clone();
        let seen_tx = seen_tx.clone();
        tokio::spawn(async move {
            let mut changes = xds.changes();
            while rounds.changed().await.is_ok() {
                let Some((round, target)) = *rounds.borrow_and_update() else {
                    continue;
                };
                loop {
                    changes.borrow_and_update();
                    if target.applied(&xds.snapshot()) {
                        let _ = seen_tx.send((round, i, Instant::now()));
                        break;
                    }
                    if changes.changed().await.is_err() {
                        return;
                    }
                }
            }
        });
    }
    drop(seen_tx);

    let pause = Duration::from_millis(if common::smoke() { 20 } else { 200 });
    let mut file_delays: Vec<u64> = Vec::new();
    let mut api_delays: Vec<u64> = Vec::new();
    let mut file_all: Vec<u64> = Vec::new();
    let mut api_all: Vec<u64> = Vec::new();
    let control_before = common::proc_sample(env.control_pid).unwrap_or_default();
    let mut round = 0usize;
    let mut before_accepted = 0usize;
    for kind in ["file", "api"] {
        for r in 0..env.rounds {
            round += 1;
            tokio::time::sleep(pause).await;
            let target = if kind == "file" {
                let w = 20 + (r as u32 % 60);
                Target::Weights(w, 100 - w)
            } else {
                Target::Endpoint(SocketAddr::from(([127, 0, 0, 1], 40_000 + r as u16)))
            };
            round_tx.send_replace(Some((round, target)));
            // The clock starts when the change is made: the rename returned, or the
            // registration was sent (mesh-control pushes before it answers, so
            // clients often have the endpoint before the 201 arrives).
            let (t0, accepted) = match target {
                Target::Weights(w, _) => {
                    write_config(&env.config_dir, &mesh_yaml(w))?;
                    let t = Instant::now();
                    (t, t)
                }
                Target::Endpoint(addr) => {
                    let sent = Instant::now();
                    register(env.admin, addr).await?;
                    (sent, Instant::now())
                }
            };
            let mut seen: Vec<Seen> = Vec::with_capacity(env.n);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while seen.len() < env.n {
                match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
                    Ok(Some((r, i, at))) if r == round => seen.push((i, at)),
                    Ok(Some(_)) => {}
                    Ok(None) => return Err("the checker tasks stopped".into()),
                    Err(_) => {
                        return Err(format!(
                            "{kind} change {r}: only {} of {} clients applied it within 60 s",
                            seen.len(),
                            env.n
                        ));
                    }
                }
            }
            let delays: Vec<u64> = seen
                .iter()
                .map(|(_, at)| {
                    u64::try_from(at.saturating_duration_since(t0).as_nanos()).unwrap_or(u64::MAX)
                })
                .collect();
            let max = delays.iter().copied().max().unwrap_or(0);
            if kind == "api" {
                before_accepted += seen.iter().filter(|(_, at)| *at <= accepted).count();
            }
            if kind == "file" {
                file_delays.extend(&delays);
                file_all.push(max);
            } else {
                api_delays.extend(&delays);
                api_all.push(max);
            }
        }
    }
    let control_after = common::proc_sample(env.control_pid).unwrap_or_default();
    let control_cpu = common::cpu_between(&control_before, &control_after);
    let changes = (2 * env.rounds).max(1) as f64;
    let summary = |delays: &mut Vec<u64>, all: &mut Vec<u64>| {
        let p = Percentiles::from_nanos(delays);
        let all = Percentiles::from_nanos(all);
        json!({
            "changes": env.rounds,
            "samples": p.count,
            "p50_ms": round2(p.p50 / 1000.0),
            "p99_ms": round2(p.p99 / 1000.0),
            "max_ms": round2(p.max / 1000.0),
            "all_clients_median_ms": round2(all.p50 / 1000.0),
        })
    };
    Ok(json!({
        "clients": env.n,
        "sync_all_ms": round1(sync_all.as_secs_f64() * 1000.0),
        "file": summary(&mut file_delays, &mut file_all),
        "api": summary(&mut api_delays, &mut api_all),
        "api_applied_before_201_pct": round1(
            100.0 * before_accepted as f64 / (env.rounds * env.n).max(1) as f64
        ),
        "control": {
            "rss_mb": round1(control_synced.rss_kib as f64 / 1024.0),
            "rss_after_changes_mb": round1(control_after.rss_kib as f64 / 1024.0),
            "peak_rss_mb": round1(control_after.hwm_kib as f64 / 1024.0),
            "cpu_ms_per_change": round2(control_cpu.as_secs_f64() * 1000.0 / changes),
            "cpu_us_per_client_update": round2(control_cpu.as_secs_f64() * 1e6 / changes / env.n as f64),
        },
        "clients_process": {
            "rss_mb": round1(own_synced.rss_kib as f64 / 1024.0),
            "rss_kib_per_client": round1(own_synced.rss_kib as f64 / env.n as f64),
        },
    }))
}

/// Registers `addr` as a v1 endpoint of catalog through the admin API; returns once
/// mesh-control answered 201.
async fn register(admin: SocketAddr, addr: SocketAddr) -> Result<(), String> {
    let body = json!({
        "service": "catalog",
        "namespace": NAMESPACE,
        "address": addr.ip().to_string(),
        "port": addr.port(),
        "service_port": 80,
        "labels": {"version": "v1"},
        "ttl_seconds": 3600,
    })
    .to_string();
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|e| format!("connecting to the admin API {admin}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("admin API handshake: {e}"))?;
    tokio::spawn(conn);
    let request = http::Request::post("/v1/endpoints")
        .header(http::header::HOST, admin.to_string())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| format!("building the registration: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("POST /v1/endpoints: {e}"))?;
    let status = response.status();
    let text = response
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    if status.as_u16() == 201 {
        Ok(())
    } else {
        Err(format!("POST /v1/endpoints answered {status}: {text}"))
    }
}

// ---------------------------------------------------------------------------------
// The orchestrator

fn client_counts() -> Vec<usize> {
    let default = if common::smoke() {
        "1,10"
    } else {
        "1,100,1000"
    };
    std::env::var("MESH_BENCH_CLIENTS")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| default.to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|n| *n > 0)
        .collect()
}

fn run_level(n: usize, rounds: usize) -> Result<Value, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    write_config(dir.path(), &mesh_yaml(90))?;
    let dir_env = (
        "MESH_BENCH_CONFIG_DIR".to_owned(),
        dir.path().display().to_string(),
    );
    let mut control = RoleProcess::spawn_role(
        "mesh-control",
        "control",
        &[],
        std::slice::from_ref(&dir_env),
    )?;
    let (xds, admin) = common::parse_control_ready(&control.wait_ready(Duration::from_secs(60))?)?;
    let idle = control.sample().unwrap_or_default();
    let env = vec![
        dir_env,
        ("MESH_BENCH_N".to_owned(), n.to_string()),
        ("MESH_BENCH_ROUNDS".to_owned(), rounds.to_string()),
        ("MESH_BENCH_XDS".to_owned(), xds.to_string()),
        ("MESH_BENCH_ADMIN".to_owned(), admin.to_string()),
        (
            "MESH_BENCH_CONTROL_PID".to_owned(),
            control.pid().to_string(),
        ),
    ];
    let mut clients = RoleProcess::spawn_role("clients", "clients", &[], &env)?;
    let report = clients.wait_ready(Duration::from_secs(900));
    clients.stop();
    control.stop();
    let report = report?;
    let mut value: Value =
        serde_json::from_str(&report).map_err(|e| format!("clients report: {e}"))?;
    if let Some(control) = value.get_mut("control").and_then(Value::as_object_mut) {
        control.insert(
            "idle_rss_mb".into(),
            json!(round1(idle.rss_kib as f64 / 1024.0)),
        );
    }
    Ok(value)
}

fn orchestrate() {
    common::raise_fd_limit();
    let machine = common::machine();
    let smoke = common::smoke();
    let rounds = common::env_usize("MESH_BENCH_ROUNDS", if smoke { 2 } else { 10 });
    let counts = client_counts();
    println!(
        "propagation bench ({}): {machine}; open-file limit {:?}",
        if smoke { "smoke run" } else { "full run" },
        common::fd_limit()
    );
    let started = Instant::now();
    if sidecar_mode() == "only" {
        std::process::exit(if run_sidecar_row(rounds) { 0 } else { 1 });
    }
    let mut levels = Vec::new();
    let mut rows = Vec::new();
    for &n in &counts {
        println!("{n} client(s), {rounds} changes of each kind");
        match run_level(n, rounds) {
            Ok(v) => {
                let get = |kind: &str, k: &str| v[kind][k].as_f64().unwrap_or(f64::NAN);
                let target_ms = if n <= 1 { 10.0 } else { 1000.0 };
                let verdict = |p99: f64| {
                    if n == 1 || n >= 1000 {
                        if p99 < target_ms {
                            format!("✓ (< {target_ms} ms)")
                        } else {
                            format!("✗ (target < {target_ms} ms)")
                        }
                    } else {
                        String::new()
                    }
                };
                for kind in ["api", "file"] {
                    rows.push(vec![
                        n.to_string(),
                        if kind == "api" {
                            "register endpoint (API)".to_owned()
                        } else {
                            "route weights (YAML file)".to_owned()
                        },
                        format!("{:.2}", get(kind, "p50_ms")),
                        format!("{:.2}", get(kind, "p99_ms")),
                        format!("{:.2}", get(kind, "max_ms")),
                        verdict(get(kind, "p99_ms")),
                        format!("{:.1}", v["control"]["rss_mb"].as_f64().unwrap_or(f64::NAN)),
                        format!(
                            "{:.2}",
                            v["control"]["cpu_ms_per_change"]
                                .as_f64()
                                .unwrap_or(f64::NAN)
                        ),
                        format!("{:.0}", v["sync_all_ms"].as_f64().unwrap_or(f64::NAN)),
                    ]);
                }
                levels.push(v);
            }
            Err(e) => {
                loud(&format!("{n} clients: FAILED: {e}"));
                levels.push(json!({"clients": n, "error": e}));
                rows.push(vec![
                    n.to_string(),
                    format!("**failed: {e}**"),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                    String::new(),
                ]);
            }
        }
    }
    let doc = json!({
        "bench": "propagation",
        "machine": machine,
        "settings": {
            "smoke": smoke,
            "rounds_per_kind": rounds,
            "client_counts": counts,
            "debounce_ms": 10,
            "debounce_edges": "leading (applied when clean) and trailing",
        },
        "levels": levels,
        "wall_secs": round1(started.elapsed().as_secs_f64()),
    });
    let out = common::out_dir();
    common::write_json(&out.join("propagation.json"), &doc);
    let table = markdown_table(
        &[
            "clients",
            "change",
            "p50 ms",
            "p99 ms",
            "max ms",
            "target (p99)",
            "mesh-control RSS MB",
            "mesh-control CPU ms/change",
            "initial sync of all clients ms",
        ],
        &rows,
    );
    println!("\n{table}");
    let _ = std::fs::write(out.join("propagation.md"), &table);
    println!(
        "propagation bench done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let sidecar_ok = sidecar_mode() == "skip" || run_sidecar_row(rounds);
    if levels.iter().any(|l| l.get("error").is_some()) || !sidecar_ok {
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// Sidecar scoping row (issue 16): 1,000 services; `SIDECAR_WORKLOADS` workloads,
// each scoped by a Sidecar (workloadSelector `app: w<k>`) to 10 of them, against
// the same mesh without Sidecars. Per workload: the bytes of LDS+RDS+CDS+EDS it
// is sent subscribing to everything (wildcard, as Envoy does: the most a
// workload can hold), and the time from a config change (an endpoint of a
// service every one of them sees, rewritten in the YAML and reloaded) to its
// EDS update, read off the wire by raw ADS clients in this process (one clock).
// mesh-control is embedded here too; `MESH_BENCH_SIDECAR=0` skips the row.

/// Services in the Sidecar row.
const SIDECAR_SERVICES: usize = 1000;
/// Hosts each workload's Sidecar admits.
const SIDECAR_SCOPE: usize = 10;
/// Workloads (raw ADS clients, each its own view when scoped).
const SIDECAR_WORKLOADS: usize = 10;

/// The 1,000 services; service 0's endpoint is `10.9.0.<round>`; with
/// `scoped`, one Sidecar per workload admitting service 0 and 9 more.
fn sidecar_yaml(round: usize, scoped: bool) -> String {
    let mut yaml = String::new();
    for i in 0..SIDECAR_SERVICES {
        let address = if i == 0 {
            format!("10.9.0.{}", round % 250 + 1)
        } else {
            format!("10.1.{}.{}", i / 250, i % 250 + 1)
        };
        yaml.push_str(&format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: s{i}, namespace: {NAMESPACE}}}
spec:
  hosts: [s{i}]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: {address}}}]
---
"
        ));
    }
    if scoped {
        for w in 0..SIDECAR_WORKLOADS {
            let mut hosts = vec![format!("'./s0.{NAMESPACE}.svc.cluster.local'")];
            for j in 1..SIDECAR_SCOPE {
                let s = (w * SIDECAR_SCOPE + j) % SIDECAR_SERVICES;
                hosts.push(format!("'./s{s}.{NAMESPACE}.svc.cluster.local'"));
            }
            yaml.push_str(&format!(
                "apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: w{w}, namespace: {NAMESPACE}}}
spec:
  workloadSelector: {{labels: {{app: w{w}}}}}
  egress: [{{hosts: [{}]}}]
---
",
                hosts.join(", ")
            ));
        }
    }
    yaml
}

/// A raw ADS client of workload `w` subscribed to every resource of each
/// type; returns it with the bytes of its first response of each type.
async fn sidecar_workload(
    xds: SocketAddr,
    w: usize,
) -> Result<(mesh_testkit::ads::AdsClient, [usize; 4]), String> {
    use prost::Message;
    let node = mesh_testkit::ads::node(&format!("w{w}"))
        .namespace(NAMESPACE)
        .labels(&[("app", &format!("w{w}"))])
        .build();
    let mut ads = mesh_testkit::ads::AdsClient::connect(xds, node).await;
    use proxyless::mesh_core::xds as x;
    let types = [
        x::LISTENER_TYPE,
        x::ROUTE_CONFIG_TYPE,
        x::CLUSTER_TYPE,
        x::ENDPOINT_TYPE,
    ];
    let mut bytes = [0usize; 4];
    for t in types {
        ads.subscribe(t, &[]).await;
    }
    let mut seen = 0;
    while seen < 4 {
        let r = ads.try_recv(Duration::from_secs(60)).await?;
        ads.send(&r.type_url, &[], &r.version_info, &r.nonce, None)
            .await;
        if let Some(i) = types.iter().position(|t| *t == r.type_url)
            && bytes[i] == 0
        {
            bytes[i] = r.encoded_len();
            seen += 1;
        }
    }
    Ok((ads, bytes))
}

/// One side of the row (with or without Sidecars).
fn sidecar_side(scoped: bool, rounds: usize) -> Result<Value, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        write_config(dir.path(), &sidecar_yaml(0, scoped))?;
        let server = mesh_control::Server::builder()
            .config_dir(dir.path())
            .debounce(Duration::from_secs(3600))
            .start()
            .await
            .map_err(|e| format!("mesh-control: {e}"))?;
        let diagnostics = &server.status()["diagnostics"];
        if diagnostics.as_array().is_some_and(|d| !d.is_empty()) {
            return Err(format!("the row's YAML has problems: {diagnostics}"));
        }
        let mut workloads = Vec::new();
        let mut sizes = Vec::new();
        for w in 0..SIDECAR_WORKLOADS {
            let (ads, bytes) = sidecar_workload(server.xds_addr(), w).await?;
            sizes.push(bytes);
            workloads.push(ads);
        }
        let mut delays = Vec::new();
        for round in 1..=rounds {
            let needle = format!("10.9.0.{}", round % 250 + 1);
            write_config(dir.path(), &sidecar_yaml(round, scoped))?;
            let start = Instant::now();
            server.reload();
            for ads in &mut workloads {
                loop {
                    let r = ads.try_recv(Duration::from_secs(60)).await?;
                    ads.send(&r.type_url, &[], &r.version_info, &r.nonce, None)
                        .await;
                    let updated = r.type_url == proxyless::mesh_core::xds::ENDPOINT_TYPE
                        && r.resources.iter().any(|a| {
                            a.value
                                .windows(needle.len())
                                .any(|w| w == needle.as_bytes())
                        });
                    if updated {
                        delays.push(start.elapsed().as_nanos() as u64);
                        break;
                    }
                }
            }
        }
        let delays = Percentiles::from_nanos(&mut delays);
        let per_type = |i: usize| sizes.iter().map(|s| s[i]).sum::<usize>() / sizes.len().max(1);
        Ok(json!({
            "scoped": scoped,
            "bytes_per_workload": {
                "lds": per_type(0), "rds": per_type(1), "cds": per_type(2), "eds": per_type(3),
                "total": (0..4).map(per_type).sum::<usize>(),
            },
            "change_to_eds_ms": {
                "p50": round2(delays.p50 / 1000.0),
                "max": round2(delays.max / 1000.0),
                "samples": delays.count,
            },
        }))
    })
}

/// The Sidecar row: both sides, as JSON and table rows.
fn sidecar_row(rounds: usize) -> (Value, Vec<Vec<String>>) {
    let mut sides = Vec::new();
    let mut rows = Vec::new();
    for scoped in [false, true] {
        let what = if scoped {
            format!("scoped to {SIDECAR_SCOPE} by a Sidecar")
        } else {
            "no Sidecar (sees all)".to_owned()
        };
        match sidecar_side(scoped, rounds) {
            Ok(v) => {
                let b = &v["bytes_per_workload"];
                rows.push(vec![
                    format!("{SIDECAR_SERVICES} services, {SIDECAR_WORKLOADS} workloads"),
                    what,
                    format!("{}", b["total"]),
                    format!("{} / {} / {} / {}", b["lds"], b["rds"], b["cds"], b["eds"]),
                    format!("{}", v["change_to_eds_ms"]["p50"]),
                    format!("{}", v["change_to_eds_ms"]["max"]),
                ]);
                sides.push(v);
            }
            Err(e) => {
                loud(&format!("sidecar row ({what}): FAILED: {e}"));
                rows.push(vec![what, format!("**failed: {e}**")]);
                sides.push(json!({"scoped": scoped, "error": e}));
            }
        }
    }
    (json!(sides), rows)
}

/// `MESH_BENCH_SIDECAR=0` skips the Sidecar row; `=only` runs it alone.
fn sidecar_mode() -> &'static str {
    match std::env::var("MESH_BENCH_SIDECAR").as_deref() {
        Ok("0") => "skip",
        Ok("only") => "only",
        _ => "run",
    }
}

/// Runs the Sidecar row, prints its table and writes
/// `target/bench/propagation-sidecar.json`; false when a side failed.
fn run_sidecar_row(rounds: usize) -> bool {
    println!(
        "sidecar scoping: {SIDECAR_SERVICES} services, {SIDECAR_WORKLOADS} workloads, \
         {rounds} changes"
    );
    let (value, rows) = sidecar_row(rounds);
    let ok = value
        .as_array()
        .is_some_and(|s| s.iter().all(|v| v.get("error").is_none()));
    let out = common::out_dir();
    common::write_json(
        &out.join("propagation-sidecar.json"),
        &json!({"bench": "propagation-sidecar", "machine": common::machine(), "sides": value}),
    );
    let table = markdown_table(
        &[
            "mesh",
            "workload",
            "bytes sent (LDS+RDS+CDS+EDS)",
            "LDS / RDS / CDS / EDS",
            "change → EDS p50 ms",
            "max ms",
        ],
        &rows,
    );
    println!("\n{table}");
    let _ = std::fs::write(out.join("propagation-sidecar.md"), &table);
    ok
}

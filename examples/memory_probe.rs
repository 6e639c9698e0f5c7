//! The memory probe's service: a process that joins a mesh and calls each of
//! its services once, linking what a service binary links for that (the xDS
//! client and the client stack) and nothing else.
//!
//! ```text
//! MESH_BENCH_ROWS=memory cargo bench --bench overhead
//! ```
//!
//! The overhead bench builds it (`cargo build --release --example
//! memory_probe`), runs it and measures it from outside, from `/proc/<pid>`
//! (`benches/overhead/memory.rs`): the bench binary's own probe runs this
//! same code inside a binary that also holds the load generator, the plain
//! apps, the Envoy runner and the plots, whose code shares the 64 KiB
//! fault-around windows the mesh's code touches. A service's binary holds
//! the service and the mesh: this one is its shape.
//!
//! It is not meant to be run by hand. With the xDS bootstrap in the
//! environment (`GRPC_XDS_BOOTSTRAP_CONFIG` or `GRPC_XDS_BOOTSTRAP`) and
//! `MESH_PROBE_SERVICES=N` (services `mem-0` … `mem-<N-1>`) and
//! `MESH_PROBE_ENDPOINTS=M` (endpoints in all), it talks over stdin and
//! stdout, one line each way per step, so that the bench samples its memory
//! between steps while it waits:
//!
//! 1. `READY {"pid":…}`: the runtime is up, the mesh not used yet;
//! 2. `READY synced`: the config of every service arrived (M endpoints);
//! 3. `READY called`: one request sent to each service;
//! 4. `READY {…}`: what it holds (listeners, routes, clusters, endpoints).
//!
//! It exits when stdin closes.

use std::time::Duration;

use proxyless::{Bootstrap, Client, XdsClient};
use tokio::sync::mpsc;
use tower::ServiceExt;

fn main() {
    if let Err(e) = run() {
        println!("ERROR {e}");
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// The probe's steps (see the crate docs); returns when stdin closes after
/// the last one.
pub(crate) fn run() -> Result<(), String> {
    let number = |name: &str| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| format!("{name} is not set to a number"))
    };
    let services = number("MESH_PROBE_SERVICES")?;
    let endpoints_wanted = number("MESH_PROBE_ENDPOINTS")?;
    // Lines from the bench, read by a thread (as a service's own input
    // would be): each one lets the next step run. Stdin closed: done.
    let (lines, mut next) = mpsc::unbounded_channel::<()>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            if line.is_err() || lines.send(()).is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build a tokio runtime: {e}"))?;
    runtime.block_on(async move {
        let mut step = async |say: &str| {
            println!("READY {say}");
            next.recv().await;
        };
        // The process as a service is before it uses the mesh: runtime up.
        tokio::task::yield_now().await;
        step(&format!("{{\"pid\":{}}}", std::process::id())).await;

        let bootstrap = Bootstrap::from_env().map_err(|e| format!("bootstrap: {e}"))?;
        let xds = XdsClient::start(bootstrap);
        let client: Client = Client::new(xds.clone());
        let synced = async {
            for s in 0..services {
                xds.wait_for_listener(&format!("mem-{s}"))
                    .await
                    .map_err(|e| format!("mem-{s}: {e}"))?;
            }
            let mut changes = xds.changes();
            loop {
                let endpoints: usize = xds
                    .snapshot()
                    .endpoints
                    .values()
                    .map(|c| c.endpoint_count())
                    .sum();
                if endpoints >= endpoints_wanted {
                    return Ok::<_, String>(());
                }
                changes
                    .changed()
                    .await
                    .map_err(|_| "the xDS client stopped".to_owned())?;
            }
        };
        tokio::time::timeout(Duration::from_secs(60), synced)
            .await
            .map_err(|_| "the mesh config did not arrive within 60 s".to_owned())??;
        step("synced").await;

        // One request per service: builds each cluster's balancing state
        // (in the bench, the endpoints refuse the connection at once).
        for s in 0..services {
            let req = http::Request::get(format!("http://mem-{s}/"))
                .body(http_body_util::Full::default())
                .map_err(|e| format!("request: {e}"))?;
            let _ = tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(req)).await;
        }
        step("called").await;

        let snapshot = xds.snapshot();
        let routes: usize = snapshot
            .route_configs
            .values()
            .flat_map(|rc| rc.virtual_hosts.iter())
            .map(|vh| vh.routes.len())
            .sum();
        let endpoints: usize = snapshot
            .endpoints
            .values()
            .map(|c| c.endpoint_count())
            .sum();
        // Snapshots published while joining (a control plane that pushes in
        // steps makes more), and the last one the cache file holds (0: not
        // written yet; the write runs off the measured path).
        let changes = *xds.changes().borrow();
        let saved = xds.cache_status().saved_version;
        step(&format!(
            "{{\"listeners\":{},\"route_configs\":{},\"routes\":{routes},\"clusters\":{},\"endpoints\":{endpoints},\"xds_changes\":{changes},\"cache_saved_version\":{saved}}}",
            snapshot.listeners.len(),
            snapshot.route_configs.len(),
            snapshot.clusters.len(),
        ))
        .await;
        // Stdin closed: the reading thread exits the process.
        std::future::pending::<Result<(), String>>().await
    })
}

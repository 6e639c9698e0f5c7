//! What tests need from outside the Rust build, installed by the tests themselves so
//! a fresh machine (a developer's, CI's) needs no manual step: Debian packages
//! ([`ensure_deb`]) and Python venvs from PyPI ([`Venv`]).
//!
//! A test that lacks something fails with the exact command that would provide it;
//! it never skips (docs/ARCHITECTURE.md, Testing): a skipped test is a test that
//! passes without checking anything.
//!
//! Both installers run under an exclusive [`FileLock`] (flock(2)): test binaries run
//! in parallel, and two `apt-get` runs collide on dpkg's lock while two `pip install`s
//! into one venv corrupt it. The lock dies with its process, so a killed test leaves
//! no stale lock behind; within one process, two threads each open the file and so
//! exclude each other too.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use rustix::fs::{FlockOperation, flock};

/// The lock of every `apt-get` run of the tests. Under /tmp, not the target dir:
/// dpkg's lock is the machine's, shared by every checkout on it.
const APT_LOCK: &str = "/tmp/proxyless-apt.lock";
/// Touched after each `apt-get update` of the tests.
const APT_UPDATE_STAMP: &str = "/tmp/proxyless-apt-update.stamp";
/// How old the package lists may be before an install refreshes them.
const APT_UPDATE_EVERY: Duration = Duration::from_secs(3600);
/// How long to wait for another test's install (a browser is a large download).
const APT_LOCK_WAIT: Duration = Duration::from_secs(1200);
/// How long apt-get itself waits for dpkg's lock held by something else than a test
/// (an unattended upgrade, a person's apt-get).
const DPKG_LOCK_TIMEOUT_SECS: u32 = 600;
/// How long to wait for another process building the same venv.
const VENV_LOCK_WAIT: Duration = Duration::from_secs(600);

/// The workspace's root: this crate's parent directory.
fn workspace_root() -> &'static Path {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir)
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the workspace root),
/// else the ancestor of the running executable that holds `CACHEDIR.TAG` (cargo
/// writes one at the target root), else the workspace's `target`.
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return root.join(dir);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe
            .ancestors()
            .skip(1)
            .find(|dir| dir.join("CACHEDIR.TAG").is_file())
    {
        return dir.to_path_buf();
    }
    root.join("target")
}

/// An exclusive flock(2) on a file, released on drop or when the process dies.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Takes the lock on `path` (created if missing), waiting at most `wait` for
    /// whoever holds it; Err names the file and how long it waited.
    pub fn acquire(path: &Path, wait: Duration) -> Result<FileLock, String> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| format!("opening the lock file {}: {e}", path.display()))?;
        let start = Instant::now();
        loop {
            match flock(&file, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => return Ok(FileLock { _file: file }),
                Err(e) if e == rustix::io::Errno::WOULDBLOCK || e == rustix::io::Errno::INTR => {
                    if start.elapsed() >= wait {
                        return Err(format!(
                            "{} is still locked after {wait:?}: another test is installing \
                             (see `fuser -v {}`)",
                            path.display(),
                            path.display()
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(format!("locking {}: {e}", path.display())),
            }
        }
    }
}

/// `binary` in a directory of `PATH`, if it is there and executable.
pub fn find_on_path(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// What a person without root runs to install `packages`.
fn apt_command(packages: &[&str]) -> String {
    format!(
        "sudo apt-get update && sudo apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    )
}

/// Makes sure `binary` is on `PATH`, installing the Debian `packages` that provide
/// it when it is not, and returns its path.
///
/// As root this runs `apt-get update` (when the tests have not in the last hour) and
/// `apt-get install -y --no-install-recommends <packages>` under [`FileLock`] on
/// `/tmp/proxyless-apt.lock`; it blocks until done, so an async test calls it in
/// `spawn_blocking` or before its servers start. Without root, Err is the exact
/// command to run. Tests panic with the Err: they never skip.
///
/// ```ignore
/// let etcd = ensure_deb(&["etcd-server"], "etcd").unwrap_or_else(|e| panic!("{e}"));
/// ```
pub fn ensure_deb(packages: &[&str], binary: &str) -> Result<PathBuf, String> {
    if let Some(found) = find_on_path(binary) {
        return Ok(found);
    }
    if !rustix::process::geteuid().is_root() {
        return Err(format!(
            "this test needs `{binary}` (Debian: {}), which is not on PATH, and installing \
             it needs root. Run:\n  {}",
            packages.join(" "),
            apt_command(packages)
        ));
    }
    let _lock = FileLock::acquire(Path::new(APT_LOCK), APT_LOCK_WAIT)?;
    // Another test may have installed it while this one waited.
    if let Some(found) = find_on_path(binary) {
        return Ok(found);
    }
    let mut updated = false;
    if !apt_lists_fresh() {
        apt_update()?;
        updated = true;
    }
    if let Err(first) = apt_install(packages) {
        if updated {
            return Err(first);
        }
        // Lists older than the stamp says (cleaned, or a new release): once more.
        apt_update()?;
        apt_install(packages)?;
    }
    find_on_path(binary).ok_or_else(|| {
        format!(
            "installed {} but `{binary}` is still not on PATH ({})",
            packages.join(" "),
            std::env::var("PATH").unwrap_or_default()
        )
    })
}

fn apt_lists_fresh() -> bool {
    fs::metadata(APT_UPDATE_STAMP)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|modified| SystemTime::now().duration_since(modified).ok())
        .is_some_and(|age| age < APT_UPDATE_EVERY)
}

fn apt_get(args: &[&str]) -> Result<(), String> {
    let lock_timeout = format!("DPkg::Lock::Timeout={DPKG_LOCK_TIMEOUT_SECS}");
    let mut command = Command::new("apt-get");
    command
        .args(["-o", &lock_timeout])
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive");
    let output = run_captured(&mut command).map_err(|e| format!("running apt-get: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`apt-get {}` failed ({}):\n{}",
            args.join(" "),
            output.status,
            output_tail(&output)
        ))
    }
}

fn apt_update() -> Result<(), String> {
    apt_get(&["update"])?;
    fs::write(APT_UPDATE_STAMP, b"").map_err(|e| format!("writing {APT_UPDATE_STAMP}: {e}"))
}

fn apt_install(packages: &[&str]) -> Result<(), String> {
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend_from_slice(packages);
    apt_get(&args)
}

/// A Python venv with pinned packages from PyPI, created on first use and reused.
///
/// The venv is complete when its marker file (written last) lists exactly
/// `requirements`, so a pin bump rebuilds it and an interrupted install is redone.
/// A venv made by hand with the same versions is taken as it is.
#[derive(Debug, Clone)]
pub struct Venv<'a> {
    /// The venv's directory.
    pub path: PathBuf,
    /// pip requirements, pinned: `grpcio==1.85.1`.
    pub requirements: &'a [&'a str],
    /// Modules that must import afterwards (`grpc`): a wheel that installs but does
    /// not load fails here, not in the middle of a test.
    pub imports: &'a [&'a str],
}

/// Written last into a complete venv.
const VENV_MARKER: &str = ".proxyless-ready";

impl<'a> Venv<'a> {
    /// A venv `name` in the target dir (so `cargo clean` removes it).
    pub fn in_target_dir(name: &str, requirements: &'a [&'a str], imports: &'a [&'a str]) -> Self {
        Venv {
            path: target_dir().join(name),
            requirements,
            imports,
        }
    }

    /// Its Python interpreter (Linux/macOS layout).
    pub fn python(&self) -> PathBuf {
        self.path.join("bin").join("python")
    }

    /// The marker's content: what a complete venv holds.
    fn marker_text(&self) -> String {
        self.requirements.join("\n")
    }

    fn is_complete(&self) -> bool {
        self.python().is_file()
            && fs::read_to_string(self.path.join(VENV_MARKER))
                .is_ok_and(|text| text == self.marker_text())
    }

    /// What to run by hand when the automatic set-up fails.
    fn manual_commands(&self) -> String {
        let venv = self.path.display();
        if self.requirements.is_empty() {
            format!("python3 -m venv {venv}")
        } else {
            format!(
                "python3 -m venv {venv} && {venv}/bin/pip install {}",
                self.requirements.join(" ")
            )
        }
    }

    /// The venv's Python, creating the venv when it is missing or incomplete (this
    /// runs pip: it needs PyPI the first time and blocks until done; call it before
    /// starting servers or in `spawn_blocking`). Err says what failed, pip's output,
    /// and the commands to run by hand.
    pub fn ensure(&self) -> Result<PathBuf, String> {
        let python = self.python();
        if self.is_complete() {
            return Ok(python);
        }
        let parent = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent)
            .map_err(|e| format!("creating {} for a venv: {e}", parent.display()))?;
        let name = self.path.file_name().unwrap_or(OsStr::new("venv"));
        let mut lock_name = name.to_os_string();
        lock_name.push(".lock");
        let _lock = FileLock::acquire(&parent.join(lock_name), VENV_LOCK_WAIT)?;
        if self.is_complete() {
            // Another process finished it while this one waited.
            return Ok(python);
        }
        // A venv made by hand (the commands of `manual_commands`) is fine as it is.
        if python.is_file() && self.check().is_ok() {
            self.write_marker()?;
            return Ok(python);
        }
        if self.path.exists() {
            fs::remove_dir_all(&self.path).map_err(|e| {
                format!(
                    "removing the incomplete venv {}: {e}; remove it by hand",
                    self.path.display()
                )
            })?;
        }
        self.create()?;
        self.pip_install()?;
        self.check()
            .map_err(|e| format!("the venv {} after pip install: {e}", self.path.display()))?;
        self.write_marker()?;
        Ok(python)
    }

    fn create(&self) -> Result<(), String> {
        let venv = self.path.display();
        let mut create = Command::new("python3");
        create.arg("-m").arg("venv").arg(&self.path);
        let output = run_captured(&mut create).map_err(|e| {
            format!(
                "running `python3 -m venv {venv}`: {e}\nInstall Python 3 (with its venv \
                 module: `apt-get install python3-venv` on Debian/Ubuntu), then run:\n  {}",
                self.manual_commands()
            )
        })?;
        if !output.status.success() || !self.python().is_file() {
            return Err(format!(
                "`python3 -m venv {venv}` failed ({}):\n{}\nOn Debian/Ubuntu the venv module \
                 is a separate package: `apt-get install python3-venv`. Then run:\n  {}",
                output.status,
                output_tail(&output),
                self.manual_commands()
            ));
        }
        Ok(())
    }

    fn pip_install(&self) -> Result<(), String> {
        if self.requirements.is_empty() {
            return Ok(());
        }
        let mut install = Command::new(self.python());
        install
            .args([
                "-m",
                "pip",
                "install",
                "--disable-pip-version-check",
                "--no-input",
            ])
            .args(self.requirements);
        let output = run_captured(&mut install)
            .map_err(|e| format!("running pip in {}: {e}", self.path.display()))?;
        if !output.status.success() {
            return Err(format!(
                "`pip install {}` failed ({}):\n{}\nIt needs PyPI (or a pip index/proxy \
                 configured) and wheels for this Python. Run by hand:\n  {}",
                self.requirements.join(" "),
                output.status,
                output_tail(&output),
                self.manual_commands()
            ));
        }
        Ok(())
    }

    /// Whether the pinned versions are installed and the modules import; Err says
    /// which is not.
    fn check(&self) -> Result<(), String> {
        const SCRIPT: &str = r#"
import importlib, importlib.metadata as m, sys
pins, modules = sys.argv[1].split(), sys.argv[2].split()
for pin in pins:
    name, _, want = pin.partition("==")
    have = m.version(name)
    if want and have != want:
        sys.exit(f"{name} is {have}, not {want}")
for module in modules:
    importlib.import_module(module)
"#;
        let output = run_captured(Command::new(self.python()).args([
            "-c",
            SCRIPT,
            &self.requirements.join(" "),
            &self.imports.join(" "),
        ]))
        .map_err(|e| format!("running {}: {e}", self.python().display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(output_tail(&output))
        }
    }

    fn write_marker(&self) -> Result<(), String> {
        let marker = self.path.join(VENV_MARKER);
        fs::write(&marker, self.marker_text())
            .map_err(|e| format!("writing {}: {e}", marker.display()))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether dpkg has `package` installed.
    fn dpkg_installed(package: &str) -> bool {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", package])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout) == "install ok installed")
    }

    // `tree` and `pv` are small (about 120 kB each, libc only) and absent from a
    // fresh Debian image, so on a fresh machine these tests really install them;
    // afterwards they check the fast path.

    #[test]
    fn a_missing_package_is_installed_and_its_binary_found() {
        let path = ensure_deb(&["tree"], "tree").unwrap_or_else(|e| panic!("{e}"));
        assert!(path.ends_with("tree"), "{}", path.display());
        assert!(dpkg_installed("tree"));
        let version = Command::new(&path).arg("--version").output().unwrap();
        assert!(version.status.success());
    }

    #[test]
    fn two_threads_installing_at_once_both_succeed() {
        let [a, b] = std::thread::scope(|scope| {
            let a = scope.spawn(|| ensure_deb(&["pv"], "pv"));
            let b = scope.spawn(|| ensure_deb(&["pv"], "pv"));
            [a.join().unwrap(), b.join().unwrap()]
        });
        let (a, b) = (
            a.unwrap_or_else(|e| panic!("{e}")),
            b.unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(a, b);
        assert!(dpkg_installed("pv"));
    }

    #[test]
    fn without_root_the_error_is_the_command_to_run() {
        assert_eq!(
            apt_command(&["etcd-server", "etcd-client"]),
            "sudo apt-get update && sudo apt-get install -y --no-install-recommends \
             etcd-server etcd-client"
        );
        assert!(find_on_path("sh").is_some());
        assert!(find_on_path("no-such-binary-for-proxyless").is_none());
    }

    #[test]
    fn a_file_lock_excludes_other_holders_until_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.lock");
        let held = FileLock::acquire(&path, Duration::ZERO).unwrap();
        let error = std::thread::scope(|scope| {
            scope
                .spawn(|| FileLock::acquire(&path, Duration::from_millis(200)))
                .join()
                .unwrap()
        })
        .unwrap_err();
        assert!(
            error.contains("test.lock is still locked after 200ms"),
            "{error}"
        );
        drop(held);
        FileLock::acquire(&path, Duration::ZERO).unwrap();
    }

    #[test]
    fn a_venv_is_created_once_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let venv = Venv {
            path: dir.path().join("venv"),
            requirements: &[],
            imports: &["json"],
        };
        let python = venv.ensure().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(python, dir.path().join("venv/bin/python"));
        assert!(venv.is_complete());
        // The second call takes the fast path (no lock, no python3 run).
        assert_eq!(venv.ensure().unwrap(), python);
        let missing = Venv {
            imports: &["no_such_module_for_proxyless"],
            ..venv.clone()
        };
        let error = missing.check().unwrap_err();
        assert!(error.contains("no_such_module_for_proxyless"), "{error}");
        let pinned = Venv {
            requirements: &["pip==0.0.1"],
            ..venv
        };
        let error = pinned.check().unwrap_err();
        assert!(
            error.contains("pip is ") && error.contains("not 0.0.1"),
            "{error}"
        );
    }
}

//! The shop demo (`examples/shop.rs`) in `--serve` mode, for tests that look
//! at a running mesh from outside: built by cargo when missing or stale, run
//! until its stdin closes, its `SHOP-READY key=value` line parsed.
//!
//! Included with `#[path = "support/shop_serve.rs"] mod shop_serve;` by
//! tests/ui_browser.rs (tests/dashboards.rs keeps its own copy of the same
//! code for now; it can switch to this file).
#![allow(dead_code)]

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The shop demo binary, built by cargo first (a no-op when it is up to date):
/// `cargo test -p proxyless --test <name>` alone does not build examples.
pub(crate) fn shop_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>")
        .to_path_buf();
    let mut build = Command::new(env!("CARGO"));
    build
        .args(["build", "--example", "shop", "--quiet"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // The inner build gets the environment a `cargo build` from a shell would
    // have: some build scripts rerun when cargo test's own variables change.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let set_by_cargo_test = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_TARGET_TMPDIR",
            "CARGO_RUSTC_CURRENT_DIR",
            "OUT_DIR",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix));
        if set_by_cargo_test {
            build.env_remove(key);
        }
    }
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let out = build
        .output()
        .expect("run `cargo build --example shop` (run it yourself if cargo is not on PATH)");
    assert!(
        out.status.success(),
        "`cargo build --example shop` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let binary = profile_dir
        .join("examples")
        .join(format!("shop{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.exists(), "{} was not built", binary.display());
    binary
}

/// The shop in `--serve` mode; killed on drop if the test did not stop it.
pub(crate) struct Shop {
    child: Child,
    /// `key=value` pairs of its `SHOP-READY` line.
    ready: Vec<(String, String)>,
    /// What it printed before (for failure messages).
    output: String,
}

impl Shop {
    pub(crate) fn start() -> Shop {
        Shop::start_with(&[])
    }

    /// The shop in `--serve` mode with more arguments (`--prometheus URL`).
    pub(crate) fn start_with(args: &[&str]) -> Shop {
        let mut child = Command::new(shop_binary())
            .arg("--serve")
            .args(args)
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the shop demo");
        let stdout = child.stdout.take().expect("the shop's stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the shop's output to the end (so it never blocks on a full
        // pipe), sending each line.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    // The test stopped listening; keep draining.
                }
            }
        });
        let mut shop = Shop {
            child,
            ready: Vec::new(),
            output: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    shop.output.push_str(&line);
                    shop.output.push('\n');
                    if let Some(rest) = line.strip_prefix("SHOP-READY ") {
                        shop.ready = rest
                            .split_whitespace()
                            .filter_map(|kv| kv.split_once('='))
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect();
                        return shop;
                    }
                }
                Err(_) => panic!(
                    "the shop printed no SHOP-READY line within 60 s ({}); its output:\n{}",
                    match shop.child.try_wait() {
                        Ok(Some(status)) => format!("it exited: {status}"),
                        _ => "still running".to_owned(),
                    },
                    shop.output
                ),
            }
        }
    }

    pub(crate) fn get(&self, key: &str) -> &str {
        self.ready
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("SHOP-READY has no {key}=; output:\n{}", self.output))
    }

    /// Closes its stdin (how a test or a script stops it) and waits for it.
    pub(crate) fn stop(&mut self) -> std::process::ExitStatus {
        drop(self.child.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("the shop did not stop within 20 s of its stdin closing");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

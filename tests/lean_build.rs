//! What a user's crate compiles when it depends on `proxyless`.
//!
//! The facade's features exist so that a service can leave out what it does
//! not use (the control server, the telemetry exporters, the admin
//! endpoint), and the demo's proto lives in the dev-only `shop-proto` crate
//! so that no user runs its codegen. Both are easy to undo by accident: one
//! `workspace = true` that drops `default-features = false`, one
//! non-optional dependency, one proto back in a `build.rs`. This test is the
//! user's view: a fresh crate outside the workspace that depends on
//! `proxyless` by path, resolved with `cargo tree` (which resolves and
//! prints, it does not build: a few seconds).
//!
//! - default features: everything is there (`mesh-control`,
//!   `opentelemetry`, `prometheus-client`, `clap`), and no build-time
//!   protobuf tooling (`protox`, `tonic-prost-build`);
//! - `default-features = false`: none of clap, notify, saphyr,
//!   opentelemetry*, prometheus-client, and the mesh itself still there.
//!
//! The workspace's `Cargo.lock` is copied into the crate so that resolution
//! picks the versions the workspace uses and runs `--offline`, from the
//! registry cache the workspace's own build filled.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// The facade's root, which the probe crate depends on by path.
const FACADE: &str = env!("CARGO_MANIFEST_DIR");

/// Build-time protobuf codegen, which no user crate should compile.
const CODEGEN: [&str; 2] = ["protox", "tonic-prost-build"];

/// What `default-features = false` leaves out (a name ending in `*` is a
/// prefix: every `opentelemetry` crate).
const OPTIONAL: [&str; 5] = [
    "clap",
    "notify",
    "saphyr",
    "opentelemetry*",
    "prometheus-client",
];

/// A probe crate in a temporary directory, depending on the facade.
struct Probe {
    dir: tempfile::TempDir,
    target: tempfile::TempDir,
}

impl Probe {
    /// A crate whose `proxyless` dependency line ends with `options`
    /// (`""`, or `", default-features = false"`).
    fn new(options: &str) -> Probe {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let target = tempfile::tempdir().expect("a temporary target directory");
        let facade = Path::new(FACADE);
        let manifest = format!(
            "[package]\n\
             name = \"lean-build-probe\"\n\
             version = \"0.0.0\"\n\
             edition = \"2024\"\n\
             publish = false\n\
             \n\
             [dependencies]\n\
             proxyless = {{ path = {path:?}{options} }}\n\
             \n\
             # Its own workspace, whatever directory it is in.\n\
             [workspace]\n",
            path = facade.display().to_string(),
        );
        std::fs::write(dir.path().join("Cargo.toml"), manifest).expect("write Cargo.toml");
        std::fs::create_dir(dir.path().join("src")).expect("create src/");
        std::fs::write(dir.path().join("src/main.rs"), "fn main() {}\n").expect("write main.rs");
        std::fs::copy(facade.join("Cargo.lock"), dir.path().join("Cargo.lock"))
            .expect("copy the workspace's Cargo.lock");
        Probe { dir, target }
    }

    /// `cargo tree -e normal,build --offline` with `args`; panics with
    /// cargo's stderr if it fails.
    fn tree(&self, args: &[&str]) -> String {
        let output = Command::new(env!("CARGO"))
            .arg("tree")
            .args(["-e", "normal,build", "--offline"])
            .args(args)
            .current_dir(self.dir.path())
            .env("CARGO_TARGET_DIR", self.target.path())
            // The facade's own test run must not leak into the probe's.
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .expect("run cargo tree");
        assert!(
            output.status.success(),
            "cargo tree {args:?} failed in the probe crate ({}):\n{}",
            self.dir.path().display(),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("cargo tree prints UTF-8")
    }

    /// Every crate name in the probe's normal and build dependency graph.
    fn crates(&self) -> BTreeSet<String> {
        self.tree(&["--prefix", "none", "--format", "{p}"])
            .lines()
            .filter_map(|line| line.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }

    /// How `name` gets into the graph (`cargo tree -i`), for a failure
    /// message.
    fn why(&self, name: &str) -> String {
        let output = Command::new(env!("CARGO"))
            .args(["tree", "-e", "normal,build", "--offline", "-i", name])
            .current_dir(self.dir.path())
            .env("CARGO_TARGET_DIR", self.target.path())
            .output();
        match output {
            Ok(o) => {
                // Cargo's own progress lines ("Blocking waiting for file
                // lock ...": the tests run at once) are not the answer.
                let stderr = String::from_utf8_lossy(&o.stderr);
                let errors: Vec<&str> = stderr
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("Blocking"))
                    .collect();
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    errors.join("\n")
                )
            }
            Err(e) => format!("(cargo tree -i {name} did not run: {e})"),
        }
    }
}

/// The crates of `graph` matched by `pattern` (an exact name, or a prefix
/// ending in `*`).
fn matching<'a>(graph: &'a BTreeSet<String>, pattern: &str) -> Vec<&'a str> {
    graph
        .iter()
        .map(String::as_str)
        .filter(|name| match pattern.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => *name == pattern,
        })
        .collect()
}

/// Panics naming each crate of `graph` that `patterns` match, with the
/// path that brings it in.
fn assert_absent(probe: &Probe, graph: &BTreeSet<String>, patterns: &[&str], build: &str) {
    let found: Vec<&str> = patterns.iter().flat_map(|p| matching(graph, p)).collect();
    if found.is_empty() {
        return;
    }
    let mut message = format!("a user crate with {build} compiles {found:?}, which it must not:\n");
    for name in &found {
        message.push_str(&format!(
            "\n$ cargo tree -e normal,build -i {name}\n{}",
            probe.why(name)
        ));
    }
    panic!("{message}");
}

/// Panics unless every one of `patterns` matches a crate of `graph` (so that
/// an absence check cannot pass on an empty or broken graph).
fn assert_present(graph: &BTreeSet<String>, patterns: &[&str], build: &str) {
    for pattern in patterns {
        assert!(
            !matching(graph, pattern).is_empty(),
            "a user crate with {build} should compile {pattern}, but its graph has only {graph:?}"
        );
    }
}

#[test]
fn default_features_bring_everything_but_no_codegen() {
    let probe = Probe::new("");
    let graph = probe.crates();
    assert_present(
        &graph,
        &[
            "proxyless",
            "mesh-tower",
            "mesh-control",
            "opentelemetry",
            "prometheus-client",
            "clap",
        ],
        "default features",
    );
    assert_absent(&probe, &graph, &CODEGEN, "default features");
}

#[test]
fn no_default_features_leave_out_control_and_telemetry() {
    let probe = Probe::new(", default-features = false");
    let graph = probe.crates();
    assert_present(
        &graph,
        &[
            "proxyless",
            "mesh-tower",
            "mesh-xds-client",
            "hyper",
            "rustls",
        ],
        "default-features = false",
    );
    assert_absent(&probe, &graph, &OPTIONAL, "default-features = false");
    assert_absent(&probe, &graph, &CODEGEN, "default-features = false");
}

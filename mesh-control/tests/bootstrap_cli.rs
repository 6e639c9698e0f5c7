//! `mesh-control envoy-bootstrap` and `gateway-bootstrap` piped into a
//! reader that stops early (`| head`, `| jq` that fails): a closed stdout
//! is not the bootstrap's error, so the command exits 0 without a panic
//! (Rust ignores SIGPIPE; `println!` would panic on EPIPE). Runs the real
//! binary.

use std::process::Command;

/// Runs `mesh-control ARGS...` with stdout a pipe whose reading end is
/// already closed: the exit code and stderr.
fn into_closed_pipe(args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .args(args)
        .stdout(writer)
        .output()
        .expect("run mesh-control");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bootstraps_into_a_closed_pipe_exit_cleanly() {
    for args in [
        &["envoy-bootstrap", "envoy-1", "--namespace", "shop"][..],
        &["gateway-bootstrap", "ingressgateway-1"][..],
    ] {
        let (code, stderr) = into_closed_pipe(args);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
    }
}

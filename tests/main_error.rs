//! What a user sees when `fn main() -> Result<(), proxyless::Error>` fails
//! because the process has no xDS bootstrap (or a broken one).
//!
//! Rust prints an error returned from `main` as `Error: {err:?}`, so what is
//! checked is the `Debug` of `proxyless::Error` as printed by the standard
//! library, by running a real `main`: this test has its own (`harness =
//! false`). Run normally, it is the parent: it re-executes itself with
//! `PROXYLESS_MAIN_ERROR_CHILD` set and the bootstrap variables removed (or
//! set to broken JSON), and checks the child's exit status and stderr. In
//! child mode, `main` is the two lines a user writes.

use std::process::{Command, Output};

/// Marks the child process (the value is unused).
const CHILD: &str = "PROXYLESS_MAIN_ERROR_CHILD";

fn main() -> Result<(), proxyless::Error> {
    if std::env::var_os(CHILD).is_some() {
        // The user's program, up to the first `?`.
        let bootstrap = proxyless::Bootstrap::from_env()?;
        // Not reached when the parent runs it (no valid bootstrap); kept so
        // the child is the program a user writes.
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        let _entered = runtime.enter();
        let _xds = proxyless::XdsClient::start(bootstrap);
        return Ok(());
    }
    parent();
    Ok(())
}

/// One check: `Err` says what is wrong, with the child's stderr.
type Case = fn() -> Result<(), String>;

/// Runs the cases, prints one line per case and a closing count, and exits
/// non-zero when one failed (showing the child's whole stderr).
fn parent() {
    let cases: [(&str, Case); 2] = [
        (
            "no_bootstrap_prints_the_message_with_an_example_not_a_struct",
            no_bootstrap,
        ),
        (
            "malformed_bootstrap_prints_where_and_the_example",
            malformed_bootstrap,
        ),
    ];
    let mut failed = 0;
    for (name, case) in cases {
        match case() {
            Ok(()) => println!("test {name} ... ok"),
            Err(why) => {
                failed += 1;
                println!("test {name} ... FAILED\n{why}");
            }
        }
    }
    println!();
    println!("{} passed, {failed} failed", cases.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

/// Runs this executable in child mode with `GRPC_XDS_BOOTSTRAP` removed and
/// `GRPC_XDS_BOOTSTRAP_CONFIG` set to `inline_config` (removed if `None`).
fn child(inline_config: Option<&str>) -> Result<Output, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.env(CHILD, "1")
        .env_remove("GRPC_XDS_BOOTSTRAP")
        .env_remove("GRPC_XDS_BOOTSTRAP_CONFIG");
    if let Some(json) = inline_config {
        cmd.env("GRPC_XDS_BOOTSTRAP_CONFIG", json);
    }
    cmd.output().map_err(|e| format!("running the child: {e}"))
}

/// Checks common to every bootstrap error as `main` prints it: a failure
/// status, `Error: ` and the message with real line breaks, the variable
/// `names`, the example JSON laid out on its own lines (and valid), and no
/// trace of a derived `Debug`.
fn check_printed(out: &Output, first_line_has: &str, names: &[&str]) -> Result<String, String> {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let fail = |why: &str| Err(format!("{why}\n--- child stderr ---\n{stderr}--- end ---"));
    if out.status.success() {
        return fail("the child exited successfully");
    }
    if !stderr.starts_with("Error: ") {
        return fail("stderr does not start with `Error: `");
    }
    let first = stderr.lines().next().unwrap_or_default();
    if !first.contains(first_line_has) {
        return fail(&format!("the first line does not say {first_line_has:?}"));
    }
    if stderr.lines().count() < 5 {
        return fail("the message is not on several lines");
    }
    for name in names {
        if !stderr.contains(name) {
            return fail(&format!("{name:?} is not named"));
        }
    }
    if !stderr.lines().any(|l| l.starts_with("  \"xds_servers\"")) {
        return fail("no line of the example starts with `  \"xds_servers\"`");
    }
    for key in [
        "\"PROXYLESS_ADMIN\": \"127.0.0.1:15000\"",
        "\"NAMESPACE\": \"shop\"",
        "\"server_features\": [\"xds_v3\"]",
    ] {
        if !stderr.contains(key) {
            return fail(&format!("the example lacks {key}"));
        }
    }
    for escaped in ["Error {", "kind:", "message:", "\\n", "\\\""] {
        if stderr.contains(escaped) {
            return fail(&format!("derived Debug output ({escaped:?}) in stderr"));
        }
    }
    // The example is copied from the terminal as it is: it must parse.
    let Some(start) = stderr.find("\n{") else {
        return fail("no line starting with `{`");
    };
    if let Err(e) = proxyless::Bootstrap::from_json(stderr[start + 1..].trim_end()) {
        return fail(&format!("the printed example does not parse: {e}"));
    }
    Ok(stderr)
}

fn no_bootstrap() -> Result<(), String> {
    let out = child(None)?;
    check_printed(
        &out,
        "Error: no xDS bootstrap: set GRPC_XDS_BOOTSTRAP to",
        &["GRPC_XDS_BOOTSTRAP ", "GRPC_XDS_BOOTSTRAP_CONFIG"],
    )?;
    Ok(())
}

fn malformed_bootstrap() -> Result<(), String> {
    let out = child(Some("{\n  \"xds_servers\": [,]\n}"))?;
    let stderr = check_printed(
        &out,
        "Error: GRPC_XDS_BOOTSTRAP_CONFIG: invalid xDS bootstrap at line 2, column 19: \
         expected value",
        &["GRPC_XDS_BOOTSTRAP_CONFIG"],
    )?;
    // The example is the README's, not the user's broken JSON echoed back.
    if stderr.contains("[,]") {
        return Err(format!("the broken JSON is echoed:\n{stderr}"));
    }
    Ok(())
}

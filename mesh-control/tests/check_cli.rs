//! The `mesh-control` command line a user runs: `check DIR...` (the
//! offline validator), `check --for grpc`, `serve --config DIR...` and
//! `status` against a TLS admin port. Runs the real binary.

use std::ffi::OsStr;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Runs `mesh-control ARGS...`: exit code, stdout, stderr.
fn mesh_control<I, S>(args: I) -> (i32, String, String)
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .args(args)
        .output()
        .expect("run mesh-control");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(dir: &Path) -> (i32, String, String) {
    mesh_control([OsStr::new("check"), dir.as_os_str()])
}

const BROKEN: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: shop-services
  namespace: shop
spec:
  hosts: [catalog, payment]
  resolution: STATIC
  ports:
  - number: 80
    name: http
    protocol: HTTP
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: payment
  namespace: shop
spec:
  host: payment
  subsets:
  - name: v1
    labels: {version: v1}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: catalog
  namespace: shop
spec:
  hosts: [catalog]
  http:
  - match:
    - uri:
        prefx: /api
    route:
    - destination: {host: catalog}
  - route:
    - destination: {host: catalog}
      weight: 50
    - destination: {host: catalog}
      weight: -5
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: payment
  namespace: shop
spec:
  hosts: [payment]
  http:
  - route:
    - destination:
        host: payment
        subset: v3
"#;

#[test]
fn three_mistakes_give_three_errors_at_their_lines() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("catalog.yaml"), BROKEN).unwrap();
    let (code, _stdout, stderr) = check(dir.path());
    assert_eq!(code, 1, "stderr: {stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("catalog.yaml:"))
        .collect();
    assert_eq!(errors.len(), 3, "expected three problems, got:\n{stderr}");
    // Line of the offending field, not of its document.
    let at = |line: usize, needle: &str| {
        errors
            .iter()
            .any(|e| e.contains(&format!("catalog.yaml:{line}:")) && e.contains(needle))
    };
    assert!(at(35, "prefx"), "typo'd field at line 35:\n{stderr}");
    assert!(at(55, "v3"), "undefined subset at line 55:\n{stderr}");
    assert!(at(42, "weight"), "negative weight at line 42:\n{stderr}");
}

#[test]
fn yaml_syntax_error_names_the_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yml"),
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: x\n spec: [\n",
    )
    .unwrap();
    let (code, _, stderr) = check(dir.path());
    assert_eq!(code, 1);
    assert!(stderr.contains("bad.yml:"), "{stderr}");
}

#[test]
fn the_examples_config_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
    let (code, stdout, stderr) = check(&dir);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
}

#[test]
fn a_missing_directory_is_reported() {
    let (code, _, stderr) = check(Path::new("/nonexistent/mesh-config"));
    assert_eq!(code, 1);
    assert!(stderr.contains("not a directory"), "{stderr}");
}

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the text"))
        + 1
}

/// `check --for grpc` on the example mesh: payment's retryOn is reported at
/// its line (gRPC ignores connect-failure and refused-stream), and what the
/// YAML never wrote is only summarized as a default.
#[test]
fn check_for_grpc_reports_what_grpc_clients_ignore_at_its_line() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
    let (code, stdout, stderr) = mesh_control([
        OsStr::new("check"),
        OsStr::new("--for"),
        OsStr::new("grpc"),
        dir.as_os_str(),
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    let yaml = std::fs::read_to_string(dir.join("shop.yaml")).unwrap();
    let retry_on = format!(
        "shop.yaml:{}: grpc: VirtualService shop/payment: 'http[0].retries.retryOn': \
         connect-failure,refused-stream ignored by gRPC clients",
        line_of(&yaml, "retryOn:")
    );
    assert!(stdout.contains(&retry_on), "{retry_on}\nnot in:\n{stdout}");
    let defaults = stdout
        .split_once("grpc defaults (")
        .unwrap_or_else(|| panic!("no defaults section:\n{stdout}"))
        .1;
    assert!(defaults.contains("\n  retries: "), "{stdout}");
    assert!(defaults.contains("\n  load balancing: "), "{stdout}");
}

const SE_AND_VS: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  http:
  - route: [{destination: {host: catalog, subset: v1}}]
";

fn dr(traffic_policy: &str) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: catalog, namespace: shop}}
spec:
  host: catalog
{traffic_policy}  subsets:
  - name: v1
    labels: {{version: v1}}
"
    )
}

fn check_for_grpc(dir: &Path) -> String {
    let (code, stdout, stderr) = mesh_control([
        OsStr::new("check"),
        OsStr::new("--for"),
        OsStr::new("grpc"),
        dir.as_os_str(),
    ]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    stdout
}

/// A config that writes no retries and no load balancer gets no warning at
/// a line about them: Istio's defaults are summarized apart, as defaults.
/// Writing LEAST_REQUEST is reported at the line that says it.
#[test]
fn check_for_grpc_tells_the_yaml_from_the_mesh_defaults() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("a.yaml"), SE_AND_VS).unwrap();
    std::fs::write(d.path().join("dr.yaml"), dr("")).unwrap();
    let stdout = check_for_grpc(d.path());
    let at_a_line: Vec<&str> = stdout.lines().filter(|l| l.contains(": grpc: ")).collect();
    assert!(
        at_a_line.is_empty(),
        "nothing the YAML wrote is ignored:\n{stdout}"
    );
    let (_, defaults) = stdout
        .split_once("grpc defaults (what the mesh applies where the YAML says nothing")
        .unwrap_or_else(|| panic!("no defaults section:\n{stdout}"));
    assert!(
        defaults.contains("\n  retries: 1 route(s) with no retries.retryOn"),
        "{stdout}"
    );
    assert!(
        defaults.contains(
            "\n  load balancing: 2 cluster(s) with no loadBalancer.simple use LEAST_REQUEST"
        ),
        "{stdout}"
    );

    let written = dr("  trafficPolicy:\n    loadBalancer: {simple: LEAST_REQUEST}\n");
    std::fs::write(d.path().join("dr.yaml"), &written).unwrap();
    let stdout = check_for_grpc(d.path());
    let expected = format!(
        "dr.yaml:{}: grpc: DestinationRule shop/catalog: 'trafficPolicy.loadBalancer.simple': \
         LEAST_REQUEST is served inside wrr_locality",
        line_of(&written, "LEAST_REQUEST")
    );
    assert!(stdout.contains(&expected), "{expected}\nnot in:\n{stdout}");
    assert!(
        !stdout.contains("load balancing:"),
        "no cluster is left to the default:\n{stdout}"
    );
}

// ------------------------------------------------------------ dry-run

fn dry_run_policy(value: &str) -> String {
    format!(
        "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-all
  namespace: shop
  annotations:
    istio.io/dry-run: \"{value}\"
spec:
  action: DENY
  rules:
  - {{}}
"
    )
}

/// A dry-run AuthorizationPolicy is valid config, and `check --for grpc`
/// says at the annotation's line that gRPC servers ignore its
/// shadow_rules; a value other than "true" or "false" is an error at its
/// line.
#[test]
fn check_reports_the_dry_run_annotation() {
    let d = tempfile::tempdir().unwrap();
    let yaml = dry_run_policy("true");
    std::fs::write(d.path().join("authz.yaml"), &yaml).unwrap();
    let (code, stdout, stderr) = check(d.path());
    assert_eq!(code, 0, "a dry-run policy is valid:\n{stdout}\n{stderr}");

    let stdout = check_for_grpc(d.path());
    let expected = format!(
        "authz.yaml:{}: grpc: AuthorizationPolicy shop/deny-all: \
         'metadata.annotations.istio.io/dry-run': the policy's shadow_rules are ignored by \
         gRPC servers (gRFC A41 reads an RBAC filter's rules only)",
        line_of(&yaml, "istio.io/dry-run")
    );
    assert!(stdout.contains(&expected), "{expected}\nnot in:\n{stdout}");

    let yaml = dry_run_policy("yes");
    std::fs::write(d.path().join("authz.yaml"), &yaml).unwrap();
    let (code, _stdout, stderr) = check(d.path());
    assert_eq!(code, 1, "{stderr}");
    let expected = format!(
        "authz.yaml:{}: AuthorizationPolicy shop/deny-all: \
         'metadata.annotations.istio.io/dry-run': \"yes\" is neither \"true\"",
        line_of(&yaml, "istio.io/dry-run")
    );
    assert!(stderr.contains(&expected), "{expected}\nnot in:\n{stderr}");
}

// ------------------------------------------------------ several directories

/// `base` declares catalog and its subsets; `routes` routes it. Neither is
/// a valid config alone (a route to an undeclared host), both together are.
fn two_dirs() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("base");
    let routes = root.path().join("routes");
    std::fs::create_dir(&base).unwrap();
    std::fs::create_dir(&routes).unwrap();
    let (se, vs) = SE_AND_VS.split_once("---\n").unwrap();
    std::fs::write(base.join("catalog.yaml"), format!("{se}---\n{}", dr(""))).unwrap();
    std::fs::write(routes.join("catalog.yaml"), vs).unwrap();
    (root, base, routes)
}

#[test]
fn check_reads_several_directories_as_one_config() {
    let (_root, base, routes) = two_dirs();
    let (code, stdout, stderr) =
        mesh_control([OsStr::new("check"), base.as_os_str(), routes.as_os_str()]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("{}, {}: ok", base.display(), routes.display())));

    // Alone, the routes point at a host nothing declares.
    let (code, _, stderr) = check(&routes);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("routes/catalog.yaml:"), "{stderr}");

    // Subdirectories are not read: a broken draft there changes nothing.
    let drafts = base.join("drafts");
    std::fs::create_dir(&drafts).unwrap();
    std::fs::write(drafts.join("wip.yaml"), "kind: [\n").unwrap();
    let (code, stdout, stderr) =
        mesh_control([OsStr::new("check"), base.as_os_str(), routes.as_os_str()]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
}

#[test]
fn a_resource_in_two_directories_is_an_error_at_its_second_line() {
    let (_root, base, routes) = two_dirs();
    let (_, vs) = SE_AND_VS.split_once("---\n").unwrap();
    // The same VirtualService in base too, after a comment (another line).
    std::fs::write(base.join("zz-copy.yaml"), format!("# copy\n{vs}")).unwrap();
    let (code, _, stderr) =
        mesh_control([OsStr::new("check"), base.as_os_str(), routes.as_os_str()]);
    assert_eq!(code, 1, "{stderr}");
    let name_line = line_of(vs, "name: catalog");
    let expected = format!(
        "{}:{name_line}: duplicate VirtualService shop/catalog: already defined at {}:{}",
        routes.join("catalog.yaml").display(),
        base.join("zz-copy.yaml").display(),
        name_line + 1
    );
    assert!(stderr.contains(&expected), "{expected}\nnot in:\n{stderr}");
}

/// `check` judges a directory as a first start would (nothing in force
/// yet): each change it would reject is printed at its line. A
/// VirtualService with a subset typo is rejected at the subset, and it does
/// not hold its host either: a second VirtualService for the host, valid,
/// applies, and the rejected one says so at its host.
#[test]
fn check_prints_each_rejected_change_at_its_line() {
    let root = tempfile::tempdir().unwrap();
    let (se, vs) = SE_AND_VS.split_once("---\n").unwrap();
    std::fs::write(root.path().join("a.yaml"), format!("{se}---\n{}", dr(""))).unwrap();
    let typo = vs.replace("subset: v1", "subset: v9");
    std::fs::write(root.path().join("b.yaml"), &typo).unwrap();
    let second = vs.replace("name: catalog,", "name: catalog-canary,");
    std::fs::write(root.path().join("c.yaml"), &second).unwrap();
    let (code, _, stderr) = check(root.path());
    assert_eq!(code, 1, "{stderr}");
    let b = root.path().join("b.yaml");
    let expected = [
        format!(
            "{}:{}: VirtualService shop/catalog: host 'catalog.shop.svc.cluster.local' already \
             routed by VirtualService shop/catalog-canary at {}:3",
            b.display(),
            line_of(&typo, "hosts:"),
            root.path().join("c.yaml").display()
        ),
        format!(
            "{}:{}: VirtualService shop/catalog: 'http[0].route[0].destination.subset': subset \
             'v9' is not defined",
            b.display(),
            line_of(&typo, "subset: v9")
        ),
    ];
    for line in &expected {
        assert!(stderr.contains(line.as_str()), "{line}\nnot in:\n{stderr}");
    }
    assert!(stderr.contains("2 problem(s)"), "{stderr}");
}

/// Removes terminal colour codes from a log line.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `mesh-control serve` child process, killed on drop, whose log lines
/// arrive on a channel.
struct Serve {
    child: std::process::Child,
    log: mpsc::Receiver<String>,
}

impl Serve {
    fn start(args: &[&OsStr]) -> Serve {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
            .arg("serve")
            .args(args)
            .args(["--xds", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start mesh-control serve");
        let (tx, log) = mpsc::channel();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    let _ = tx.send(plain(&line));
                }
            });
        }
        Serve { child, log }
    }

    /// The first log line containing `needle`, within ten seconds; panics
    /// with everything logged meanwhile.
    fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => panic!(
                    "no log line with {needle:?} within 10 s; logged:\n{}",
                    seen.join("\n")
                ),
            }
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `path` at once (a rename), so that a reload never reads it half
/// written.
fn replace_file(path: &Path, text: &str) {
    let staging = path.with_extension("staging");
    std::fs::write(&staging, text).unwrap();
    std::fs::rename(&staging, path).unwrap();
}

/// `serve --config A --config B` serves both directories as one config,
/// watches both, and logs at INFO what each reload changed with the new
/// version.
#[test]
fn serve_reads_and_watches_several_directories_and_logs_each_change() {
    let (_root, base, routes) = two_dirs();
    let serve = Serve::start(&[
        OsStr::new("--config"),
        base.as_os_str(),
        OsStr::new("--config"),
        routes.as_os_str(),
    ]);
    let first = serve.wait_for("config v1 applied: added ");
    for resource in [
        "VirtualService shop/catalog",
        "DestinationRule shop/catalog",
        "ServiceEntry shop/catalog",
    ] {
        assert!(first.contains(resource), "{first}");
    }
    let serving = serve.wait_for("mesh-control serving");
    let admin = serving
        .split_whitespace()
        .find_map(|w| w.strip_prefix("admin="))
        .unwrap_or_else(|| panic!("no admin address in {serving:?}"))
        .to_string();
    let (code, stdout, stderr) = mesh_control(["status", "--json", "--admin", &admin]);
    assert_eq!(code, 0, "{stderr}");
    let status: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert!(
        status["diagnostics"].as_array().is_some_and(Vec::is_empty),
        "both directories make one valid config: {status:#}"
    );

    // A change in the second directory: picked up, and said what it was.
    let vs = std::fs::read_to_string(routes.join("catalog.yaml")).unwrap();
    replace_file(&routes.join("catalog.yaml"), &(vs + "    timeout: 2s\n"));
    serve.wait_for("config v2 applied: changed VirtualService shop/catalog");
    // A new resource in the first one.
    let (se, _) = SE_AND_VS.split_once("---\n").unwrap();
    replace_file(
        &base.join("payment.yaml"),
        &se.replace("catalog", "payment"),
    );
    serve.wait_for("config v3 applied: added ServiceEntry shop/payment");
}

// ----------------------------------------------------------------- status

/// Runs `mesh-control status --admin ADDR [--ca-file FILE] [--token-file
/// FILE]` off the runtime (the control server under test runs on it).
async fn status(
    admin: std::net::SocketAddr,
    ca_file: Option<PathBuf>,
    token_file: Option<PathBuf>,
) -> (i32, String, String) {
    tokio::task::spawn_blocking(move || {
        let mut args = vec!["status".to_string(), "--admin".into(), admin.to_string()];
        if let Some(file) = ca_file {
            args.extend(["--ca-file".into(), file.display().to_string()]);
        }
        if let Some(file) = token_file {
            args.extend(["--token-file".into(), file.display().to_string()]);
        }
        mesh_control(args)
    })
    .await
    .unwrap()
}

/// `status` without `--ca-file` against a control server with a CA: not
/// hyper's "invalid HTTP version parsed", but what to pass.
#[tokio::test(flavor = "multi_thread")]
async fn status_against_a_tls_admin_port_says_to_pass_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let token = "operator-token-0123456789";
    let token_file = dir.path().join("operator-token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let ca = mesh_control::ca::CertificateAuthority::builder("cluster.local")
        .operator_tokens(mesh_control::ca::OperatorTokens::from_text(token).unwrap())
        .build()
        .unwrap();
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .ca(ca)
        .start()
        .await
        .expect("start a control server with a CA");
    let admin = server.admin_addr();

    let (code, stdout, stderr) = status(admin, None, None).await;
    assert_eq!(code, 1, "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "the admin API at {admin} speaks TLS (mesh-control runs with a CA): pass --ca-file"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("trust-bundle.pem"), "{stderr}");
    assert!(!stderr.contains("invalid HTTP"), "{stderr}");

    // With the trust bundle but no credentials: what to pass next.
    let bundle = server.trust_bundle_file().expect("a trust bundle");
    let (code, _, stderr) = status(admin, Some(bundle.clone()), None).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("401") && stderr.contains("--token-file"),
        "{stderr}"
    );
    // As told: with the trust bundle and the operator token, the table.
    let (code, stdout, stderr) = status(admin, Some(bundle.clone()), Some(token_file)).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.starts_with("config version"), "{stdout}");

    // The other way round: --ca-file against a plaintext admin port.
    let plain = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start a control server without a CA");
    let (code, _, stderr) = status(plain.admin_addr(), Some(bundle), None).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("does not speak TLS (mesh-control runs without a CA): drop --ca-file"),
        "{stderr}"
    );
}

//! `mesh-control check DIR`: the offline validator a user runs before
//! deploying YAML. Runs the real binary.

use std::path::Path;
use std::process::Command;

fn check(dir: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .arg("check")
        .arg(dir)
        .output()
        .expect("run mesh-control");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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

#[test]
fn check_for_grpc_reports_what_grpc_clients_ignore() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/mesh");
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .args(["check", "--for", "grpc"])
        .arg(&dir)
        .output()
        .expect("run mesh-control");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("grpc: cluster \"outbound|50051|")),
        "payment's clusters are reported:\n{stdout}"
    );
}

//! `examples/istio-docs/`: one config per traffic-management field, in the shape
//! Istio's documentation gives it. `mesh-control check` (the real binary) must accept
//! each file alone, and the same file as `kubectl get -o yaml` exports it (the API
//! server's `metadata` bookkeeping and a top-level `status`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn docs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/istio-docs")
}

/// The YAML files of `examples/istio-docs`, sorted.
fn doc_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(docs_dir())
        .expect("examples/istio-docs")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// `mesh-control check DIR` over a directory holding only `text` as `name`.
fn check_alone(name: &str, text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join(name), text).expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_mesh-control"))
        .arg("check")
        .arg(dir.path())
        .output()
        .expect("run mesh-control check");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// `text` as `kubectl get -o yaml` writes each resource: `metadata` gains the API
/// server's fields, and a `status` follows the spec.
fn kubectl_export(text: &str) -> String {
    let mut out = String::new();
    for (i, doc) in text.split("\n---\n").enumerate() {
        if i > 0 {
            out.push_str("\n---\n");
        }
        let doc = doc.replacen(
            "\nmetadata:\n",
            &format!(
                "\nmetadata:\n  uid: 3f6b1c2e-0d4a-4f7e-9c1a-00000000000{i}\n  \
                 resourceVersion: \"12345{i}\"\n  generation: 2\n  \
                 creationTimestamp: \"2026-01-01T00:00:00Z\"\n  \
                 annotations:\n    kubectl.kubernetes.io/last-applied-configuration: |\n      \
                 {{\"apiVersion\":\"networking.istio.io/v1\"}}\n  \
                 managedFields:\n  - apiVersion: networking.istio.io/v1\n    \
                 fieldsType: FieldsV1\n    manager: kubectl-client-side-apply\n    \
                 operation: Update\n"
            ),
            1,
        );
        out.push_str(doc.trim_end());
        out.push_str("\nstatus:\n  observedGeneration: 2\n");
    }
    out
}

#[test]
fn every_file_is_accepted_alone_and_as_kubectl_exports_it() {
    let files = doc_files();
    assert!(
        files.len() >= 6,
        "examples/istio-docs has its files: {files:?}"
    );
    for path in files {
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with("# ") && text.contains("https://istio.io/"),
            "{name} names the Istio page it follows in its first lines"
        );
        let (ok, output) = check_alone(&name, &text);
        assert!(ok, "mesh-control check rejects {name}:\n{output}");
        let exported = kubectl_export(&text);
        let (ok, output) = check_alone(&name, &exported);
        assert!(
            ok,
            "mesh-control check rejects {name} as kubectl exports it:\n{output}\n{exported}"
        );
        let status_line = 1 + exported
            .lines()
            .position(|l| l == "status:")
            .expect("a status");
        assert!(
            output.contains(&format!(
                "{name}:{status_line}: note: top-level 'status' ignored"
            )),
            "check notes the exported status at its line:\n{output}"
        );
    }
}

#[test]
fn an_istio_annotation_that_would_be_ignored_is_reported_at_its_line() {
    let text = std::fs::read_to_string(docs_dir().join("redirect.yaml")).expect("read");
    let annotated = text.replacen(
        "  name: ratings-route\n",
        "  name: ratings-route\n  annotations:\n    networking.istio.io/exportTo: \".\"\n",
        1,
    );
    let line = 1 + annotated
        .lines()
        .position(|l| l.contains("networking.istio.io/exportTo"))
        .expect("the annotation");
    let (ok, output) = check_alone("redirect.yaml", &annotated);
    assert!(
        !ok,
        "an unsupported Istio annotation must not pass silently"
    );
    assert!(
        output.contains(&format!("redirect.yaml:{line}:"))
            && output.contains("annotation 'networking.istio.io/exportTo' is not supported yet"),
        "{output}"
    );
}

#[test]
fn check_notes_what_the_client_accepts_but_does_not_do_as_envoy() {
    let text = std::fs::read_to_string(docs_dir().join("headers.yaml")).expect("read");
    let hashed = text.replacen(
        "  host: reviews\n",
        "  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      consistentHash:\n        \
         httpCookie:\n          name: user\n          ttl: 0s\n",
        1,
    );
    let with_ip = text.replacen(
        "  host: reviews\n",
        "  host: reviews\n  trafficPolicy:\n    loadBalancer:\n      consistentHash:\n        \
         useSourceIp: true\n",
        1,
    );
    for (yaml, needle, field) in [
        (&hashed, "ttl: 0s", "httpCookie.ttl"),
        (&with_ip, "useSourceIp: true", "useSourceIp"),
    ] {
        let line = 1 + yaml
            .lines()
            .position(|l| l.contains(needle))
            .expect("field");
        let (ok, output) = check_alone("headers.yaml", yaml);
        assert!(ok, "a note is not a problem:\n{output}");
        assert!(
            output.contains(&format!(
                "headers.yaml:{line}: note: consistentHash.{field}"
            )),
            "{output}"
        );
    }
}

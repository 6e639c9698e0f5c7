//! Resources kept one document each (what `mesh-control apply` writes to
//! etcd) read back as the files they came from: each document cut out of
//! its file at its line, the same resources in force, problems at the
//! applied file's lines, VirtualServices in file order.

use super::tests::dir;
use super::*;

const TWO: &str = "\
# The catalog service and its rule.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  ports: [{number: 80, name: http, protocol: HTTP}]
--- # the rule
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: shop}
spec:
  host: catalog
  subsets:
  - {name: v1, labels: {version: v1}}
---
# nothing after this separator but a comment
";

const VS: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: catalog, namespace: shop}
spec:
  hosts: [catalog]
  http:
  - route:
    - destination: {host: catalog, subset: v1}
";

#[test]
fn documents_are_cut_out_at_their_lines_and_read_back_the_same() {
    let pieces = split_documents(TWO).unwrap();
    let starts: Vec<usize> = pieces.iter().map(|p| p.line).collect();
    assert_eq!(starts, [2, 9]);
    assert!(pieces[0].text.starts_with("apiVersion"), "{:?}", pieces[0]);
    assert!(
        pieces[1]
            .text
            .ends_with("# nothing after this separator but a comment\n")
    );
    // A text with a syntax error has no documents to cut.
    assert!(split_documents("a: [\n").is_err());
    assert_eq!(at_line(3, "a: 1\n").unwrap(), "\n\na: 1\n");
    assert!(at_line(0, "a: 1\n").is_err());
    assert!(at_line(MAX_LINE + 1, "a: 1\n").is_err());
}

/// A store read from `documents` and settled.
fn from_documents(documents: &[SourceDocument]) -> (ConfigStore, Vec<Diagnostic>) {
    let mut store = ConfigStore::new(MeshOptions::default());
    let problems = store.read_documents(documents);
    store.settle(&[]);
    (store, problems)
}

#[test]
fn exported_documents_read_back_as_the_files_they_came_from() {
    let d = dir(&[("a.yaml", TWO), ("b.yaml", VS)]);
    let mut files = ConfigStore::new(MeshOptions::default());
    assert!(files.load_dir(d.path()).is_empty());
    let exported = files.export_documents().unwrap();
    let keys: Vec<String> = exported
        .iter()
        .map(|r| format!("{} {}/{}", r.kind, r.namespace, r.name))
        .collect();
    assert_eq!(
        keys,
        [
            "VirtualService shop/catalog",
            "DestinationRule shop/catalog",
            "ServiceEntry shop/catalog"
        ]
    );
    let documents: Vec<SourceDocument> = exported.into_iter().map(|r| r.document).collect();
    let dr = &documents[1];
    assert_eq!((dr.line, dr.doc, dr.position), (9, 1, 0));
    assert_eq!(documents[0].position, 1, "b.yaml is read after a.yaml");

    let (stored, problems) = from_documents(&documents);
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(stored.rejections().is_empty());
    assert_eq!(stored.versions(), files.versions(), "the same resources");
    assert_eq!(stored.snapshot(&[]), files.snapshot(&[]));

    // A document changed by other means than apply: rejected at the line
    // of the file it says it came from, the version in force kept.
    let mut edited = documents.clone();
    edited[0].yaml = edited[0].yaml.replace("  http:\n", "  tcp: []\n  http:\n");
    let mut store = stored;
    let problems = store.read_documents(&edited);
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert_eq!(
        (problems[0].file.as_path(), problems[0].line),
        (d.path().join("b.yaml").as_path(), 6)
    );
    assert!(!store.settle(&[]), "nothing applied");
    assert_eq!(
        store.versions(),
        files.versions(),
        "the last good version stays"
    );
    assert_eq!(store.rejections().len(), 1);

    // A document that does not say where it starts sensibly is refused.
    let mut bad = documents;
    bad[2].line = 0;
    let (_, problems) = from_documents(&bad);
    assert!(
        problems[0].message.contains("outside 1..="),
        "{problems:#?}"
    );
}

//! Last good config, per resource, on real YAML: each way an edit can go
//! wrong keeps what is in force (the payment split stays 100/0), is shown at
//! its line with the version kept, and a later valid edit applies.

use std::path::Path;

use tempfile::TempDir;

use super::tests::{SE_CATALOG, dir, reg};
use super::*;

const SE: &str = "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payment, namespace: shop}
spec:
  hosts: [payment]
  ports: [{number: 50051, name: grpc, protocol: GRPC}]
";

const DR: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: payment, namespace: shop}
spec:
  host: payment
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
";

/// The payment VirtualService with weights `v1`/`v2` for the subsets
/// `a` and `b`.
fn vs(a: &str, v1: u32, b: &str, v2: u32) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: payment, namespace: shop}}
spec:
  hosts: [payment]
  http:
  - name: split
    route:
    - destination: {{host: payment, subset: {a}}}
      weight: {v1}
    - destination: {{host: payment, subset: {b}}}
      weight: {v2}
"
    )
}

const V1: &str = "outbound|50051|v1|payment.shop.svc.cluster.local";
const V2: &str = "outbound|50051|v2|payment.shop.svc.cluster.local";

/// payment at 100/0, in three files.
fn mesh() -> (ConfigStore, TempDir) {
    let d = dir(&[
        ("payment-se.yaml", SE),
        ("payment-dr.yaml", DR),
        ("payment-vs.yaml", &vs("v1", 100, "v2", 0)),
    ]);
    let mut s = ConfigStore::new(MeshOptions::default());
    let diags = s.load_dir(d.path());
    assert!(diags.is_empty(), "{diags:#?}");
    assert_eq!(split(&s), [(V1.to_string(), 100), (V2.to_string(), 0)]);
    (s, d)
}

/// The clusters and weights of payment's route, as served.
fn split(s: &ConfigStore) -> Vec<(String, u32)> {
    let (snap, problems) = s.snapshot(&[]);
    assert!(problems.is_empty(), "{problems:#?}");
    let rc = &snap.route_configs["payment.shop.svc.cluster.local:50051"];
    rc.virtual_hosts[0].routes[0]
        .action
        .clusters()
        .iter()
        .map(|c| (c.name.to_string(), c.weight))
        .collect()
}

fn write(d: &TempDir, name: &str, text: &str) {
    std::fs::write(d.path().join(name), text).unwrap();
}

/// The 1-based line of the first line of `text` containing `needle`.
fn line(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .map(|i| i + 1)
        .unwrap_or_else(|| panic!("{needle:?} not in {text}"))
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The one rejection, asserting there is exactly one.
#[track_caller]
fn only(s: &ConfigStore) -> &Rejection {
    assert_eq!(s.rejections().len(), 1, "{:#?}", s.rejections());
    &s.rejections()[0]
}

#[test]
fn an_undefined_subset_keeps_the_split_in_force() {
    let (mut s, d) = mesh();
    let broken = vs("v1", 0, "v9", 100);
    write(&d, "payment-vs.yaml", &broken);
    let diags = s.load_dir(d.path());
    assert_eq!(split(&s), [(V1.into(), 100), (V2.into(), 0)], "still 100/0");

    let r = only(&s);
    assert_eq!(r.resource.as_deref(), Some("VirtualService shop/payment"));
    assert_eq!(r.change, RejectedChange::Changed);
    let subset_line = line(&broken, "subset: v9");
    assert_eq!(r.problems.len(), 1);
    assert_eq!(r.problems[0].line, subset_line);
    assert!(
        r.problems[0]
            .message
            .contains("subset 'v9' is not defined by DestinationRule shop/payment"),
        "{}",
        r.problems[0]
    );
    let kept = r.kept.as_ref().unwrap();
    assert_eq!(file_name(&kept.file), "payment-vs.yaml");
    assert_eq!(kept.line, 3, "its metadata.name line");
    // What `check` and the log show: the line, and what stays in force.
    assert_eq!(diags, r.problems);
    let logged = r.to_string();
    assert!(
        logged.contains("VirtualService shop/payment: change rejected, its last good version (")
            && logged.contains("payment-vs.yaml:3) stays in force: "),
        "{logged}"
    );

    // A later valid edit applies.
    write(&d, "payment-vs.yaml", &vs("v1", 0, "v2", 100));
    assert!(s.load_dir(d.path()).is_empty());
    assert_eq!(split(&s), [(V1.into(), 0), (V2.into(), 100)]);
    assert!(s.rejections().is_empty());
}

#[test]
fn a_yaml_syntax_error_keeps_every_resource_of_the_file() {
    let d = dir(&[
        ("payment-se.yaml", SE),
        (
            "payment.yaml",
            &format!("{DR}---\n{}", vs("v1", 100, "v2", 0)),
        ),
    ]);
    let mut s = ConfigStore::new(MeshOptions::default());
    assert!(s.load_dir(d.path()).is_empty());
    write(
        &d,
        "payment.yaml",
        &format!("{DR}---\n{}", vs("v1", 0, "v2", 100)).replace("weight: 100", "weight: [100"),
    );
    let diags = s.load_dir(d.path());
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert!(diags[0].message.starts_with("YAML syntax error"));
    assert_eq!(s.len(), 3, "nothing removed");
    assert_eq!(split(&s), [(V1.into(), 100), (V2.into(), 0)]);
    // One rejection per resource kept, each at the syntax error.
    let kept: Vec<_> = s
        .rejections()
        .iter()
        .map(|r| {
            assert_eq!(r.change, RejectedChange::Unreadable);
            assert_eq!(r.line, diags[0].line);
            assert!(r.kept.is_some());
            r.resource.clone().unwrap_or_default()
        })
        .collect();
    assert_eq!(
        kept,
        [
            "DestinationRule shop/payment",
            "VirtualService shop/payment"
        ]
    );
    // A new file with a syntax error holds nothing in force: one rejection.
    std::fs::remove_file(d.path().join("payment.yaml")).unwrap();
    write(
        &d,
        "payment.yaml",
        &format!("{DR}---\n{}", vs("v1", 100, "v2", 0)),
    );
    write(&d, "new.yaml", "kind: [\n");
    s.load_dir(d.path());
    let r = only(&s);
    assert_eq!(
        (r.resource.as_ref(), r.change),
        (None, RejectedChange::Unreadable)
    );
}

#[test]
fn a_document_whose_identity_cannot_be_read_keeps_what_its_file_had() {
    let (mut s, d) = mesh();
    // A typo in the kind: which resource the document is cannot be told.
    write(
        &d,
        "payment-vs.yaml",
        &vs("v1", 0, "v2", 100).replace("kind: VirtualService", "kind: VirtualServce"),
    );
    s.load_dir(d.path());
    assert_eq!(split(&s), [(V1.into(), 100), (V2.into(), 0)]);
    let changes: Vec<_> = s.rejections().iter().map(|r| r.change).collect();
    assert_eq!(
        changes,
        [RejectedChange::Unidentified, RejectedChange::Unreadable]
    );
    assert!(
        s.rejections()[0].problems[0]
            .message
            .contains("unknown kind")
    );
}

#[test]
fn a_destination_rule_dropping_a_subset_in_use_is_rejected_at_both_lines() {
    let (mut s, d) = mesh();
    let dropped = DR.replace("  - name: v1\n    labels: {version: v1}\n", "");
    write(&d, "payment-dr.yaml", &dropped);
    let diags = s.load_dir(d.path());
    assert_eq!(split(&s), [(V1.into(), 100), (V2.into(), 0)]);
    let (snap, _) = s.snapshot(&[]);
    assert!(snap.clusters.contains_key(V1), "the rule in force keeps v1");

    let r = only(&s);
    assert_eq!(r.resource.as_deref(), Some("DestinationRule shop/payment"));
    assert_eq!(file_name(&r.file), "payment-dr.yaml");
    assert_eq!(r.line, 3);
    let lines: Vec<(String, usize)> = r
        .problems
        .iter()
        .map(|p| (file_name(&p.file), p.line))
        .collect();
    let vs_text = vs("v1", 100, "v2", 0);
    assert_eq!(
        lines,
        [
            ("payment-dr.yaml".to_string(), 3),
            ("payment-vs.yaml".to_string(), line(&vs_text, "subset: v1")),
        ],
        "the rule's line, and the line it would break"
    );
    assert!(
        r.problems[0].message.contains(
            "this change would make VirtualService shop/payment invalid, so its last good \
             version stays in force"
        ),
        "{}",
        r.problems[0]
    );
    assert!(
        r.problems[1].message.contains("subset 'v1' is not defined")
            && r.problems[1]
                .message
                .ends_with("(with the rejected change to DestinationRule shop/payment)"),
        "{}",
        r.problems[1]
    );
    assert_eq!(diags, r.problems);

    // The route moved off v1 too: both apply.
    let only_v2 = vs("v1", 0, "v2", 100).replace(
        "    - destination: {host: payment, subset: v1}\n      weight: 0\n",
        "",
    );
    write(&d, "payment-vs.yaml", &only_v2);
    assert!(s.load_dir(d.path()).is_empty());
    assert!(s.rejections().is_empty());
    let (snap, _) = s.snapshot(&[]);
    assert!(!snap.clusters.contains_key(V1));
}

#[test]
fn a_subset_renamed_in_both_resources_at_once_applies() {
    let (mut s, d) = mesh();
    write(
        &d,
        "payment-dr.yaml",
        &DR.replace("name: v1", "name: stable"),
    );
    write(&d, "payment-vs.yaml", &vs("stable", 100, "v2", 0));
    assert!(s.load_dir(d.path()).is_empty());
    assert_eq!(
        split(&s),
        [(V1.replace("|v1|", "|stable|"), 100), (V2.to_string(), 0)]
    );
}

#[test]
fn a_new_file_sorting_first_cannot_take_the_host() {
    let (mut s, d) = mesh();
    let second = vs("v2", 100, "v1", 0).replace("name: payment,", "name: payment-canary,");
    write(&d, "00-canary.yaml", &second);
    let diags = s.load_dir(d.path());
    assert_eq!(split(&s), [(V1.into(), 100), (V2.into(), 0)]);
    let r = only(&s);
    assert_eq!(
        r.resource.as_deref(),
        Some("VirtualService shop/payment-canary")
    );
    assert_eq!(r.change, RejectedChange::Added);
    assert_eq!(r.kept, None, "a new resource is left out");
    assert_eq!(file_name(&r.file), "00-canary.yaml");
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert_eq!(
        (file_name(&diags[0].file), diags[0].line),
        ("00-canary.yaml".into(), line(&second, "hosts:"))
    );
    assert!(
        diags[0].message.contains(
            "host 'payment.shop.svc.cluster.local' already routed by VirtualService shop/payment"
        ),
        "{}",
        diags[0]
    );

    // Nor can a second definition of the same resource in a new file.
    std::fs::remove_file(d.path().join("00-canary.yaml")).unwrap();
    write(&d, "00-copy.yaml", &vs("v2", 100, "v1", 0));
    let diags = s.load_dir(d.path());
    assert_eq!(split(&s), [(V1.into(), 100), (V2.into(), 0)]);
    let r = only(&s);
    assert_eq!(r.change, RejectedChange::Duplicate);
    assert_eq!(file_name(&r.file), "00-copy.yaml");
    assert!(
        diags[0]
            .message
            .contains("duplicate VirtualService shop/payment: already defined at "),
        "{}",
        diags[0]
    );
}

#[test]
fn deleting_a_file_removes_its_resources_unless_another_needs_them() {
    let (mut s, d) = mesh();
    std::fs::remove_file(d.path().join("payment-dr.yaml")).unwrap();
    let diags = s.load_dir(d.path());
    assert_eq!(s.len(), 3, "the rule stays in force");
    assert_eq!(split(&s), [(V1.into(), 100), (V2.into(), 0)]);
    let r = only(&s);
    assert_eq!(r.change, RejectedChange::Removed);
    assert_eq!(r.resource.as_deref(), Some("DestinationRule shop/payment"));
    assert_eq!(
        (file_name(&r.file), r.line),
        ("payment-dr.yaml".into(), 3),
        "where it was"
    );
    assert!(
        diags.iter().any(|d| d
            .message
            .contains("removing it would make VirtualService shop/payment invalid")),
        "{diags:#?}"
    );

    // Deleting the VirtualService's file too: both go, together.
    std::fs::remove_file(d.path().join("payment-vs.yaml")).unwrap();
    assert!(s.load_dir(d.path()).is_empty());
    assert_eq!(s.len(), 1);
    let (snap, _) = s.snapshot(&[]);
    assert!(!snap.clusters.contains_key(V1));
}

#[test]
fn an_invalid_new_resource_is_left_out_and_the_rest_applies() {
    let (mut s, d) = mesh();
    let unsupported = format!(
        "{SE_CATALOG}  addresses: ['10.9.9.x']\n---\n{}",
        vs("v1", 50, "v2", 50).replace("name: payment,", "name: other,")
    );
    write(&d, "z.yaml", &unsupported);
    write(&d, "payment-vs.yaml", &vs("v1", 0, "v2", 100));
    let diags = s.load_dir(d.path());
    assert_eq!(split(&s), [(V1.into(), 0), (V2.into(), 100)], "applied");
    let rejected: Vec<_> = s
        .rejections()
        .iter()
        .map(|r| (r.resource.clone().unwrap_or_default(), r.change))
        .collect();
    assert_eq!(
        rejected,
        [
            (
                "ServiceEntry shop/catalog".to_string(),
                RejectedChange::Added
            ),
            (
                "VirtualService shop/other".to_string(),
                RejectedChange::Added
            ),
        ]
    );
    assert_eq!(diags.len(), 2, "{diags:#?}");
}

#[test]
fn the_outcome_does_not_depend_on_file_names() {
    // The same documents, one order of files and its reverse; the edits
    // and the breakage are the same.
    let docs = [SE, DR, &vs("v1", 100, "v2", 0)];
    let edits = [
        SE,
        &*DR.replace("  - name: v1\n    labels: {version: v1}\n", ""),
        &*vs("v1", 0, "v9", 100),
    ];
    let outcome = |names: [&str; 3]| {
        let d = dir(&[
            (names[0], docs[0]),
            (names[1], docs[1]),
            (names[2], docs[2]),
        ]);
        let mut s = ConfigStore::new(MeshOptions::default());
        assert!(s.load_dir(d.path()).is_empty());
        for (name, text) in names.iter().zip(edits) {
            write(&d, name, text);
        }
        s.load_dir(d.path());
        let rejected: Vec<_> = s
            .rejections()
            .iter()
            .map(|r| (r.resource.clone(), r.change))
            .collect();
        (split(&s), rejected, s.versions())
    };
    let (split_a, mut rejected_a, versions_a) = outcome(["a.yaml", "b.yaml", "c.yaml"]);
    let (split_b, mut rejected_b, versions_b) = outcome(["c.yaml", "b.yaml", "a.yaml"]);
    assert_eq!(split_a, [(V1.into(), 100), (V2.into(), 0)]);
    assert_eq!(split_a, split_b);
    assert_eq!(versions_a, versions_b);
    rejected_a.sort();
    rejected_b.sort();
    assert_eq!(rejected_a, rejected_b);
    assert_eq!(rejected_a.len(), 2, "{rejected_a:?}");
}

#[test]
fn a_rejected_change_applies_once_registrations_allow_it() {
    // A route to a host only registrations provide.
    let (mut s, d) = mesh();
    let canary = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ledger, namespace: shop}
spec:
  hosts: [ledger]
  http:
  - route: [{destination: {host: payment, subset: v2}}]
";
    write(&d, "ledger.yaml", canary);
    assert!(s.read_dirs(&[d.path()]).is_empty());
    assert!(!s.settle(&[]));
    assert_eq!(only(&s).change, RejectedChange::Added);
    let regs = [reg("ledger", "shop", "10.0.0.3", 8080, &[])];
    assert!(s.settle(&regs));
    assert!(s.rejections().is_empty());
    // Its registration gone, it stays in force (nothing changed on disk);
    // what is served leaves it out until the host is back.
    assert!(!s.settle(&[]));
    assert!(s.rejections().is_empty());
    assert_eq!(s.len(), 4);
}

#[test]
fn the_config_in_force_survives_a_restart_with_a_broken_edit_on_disk() {
    let (mut s, d) = mesh();
    // Some edits applied, one rejected, the layout of a file changed.
    write(
        &d,
        "payment-vs.yaml",
        &format!("# canary\n\n{}", vs("v1", 90, "v2", 10)),
    );
    assert!(s.load_dir(d.path()).is_empty());
    write(
        &d,
        "payment-dr.yaml",
        &DR.replace("version: v2", "version: [v2"),
    );
    assert_eq!(s.load_dir(d.path()).len(), 1);
    let stored = s.export();
    // The format is JSON, as written to the data directory.
    let json = serde_json::to_string(&stored).unwrap();
    let stored: crate::persist::StoredConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(stored.resources.len(), 3);

    // A new process: the stored config, then the directory (still broken).
    let mut restarted = ConfigStore::new(MeshOptions::default());
    assert!(restarted.restore(&stored).is_empty());
    assert_eq!(restarted.versions(), s.versions());
    assert_eq!(split(&restarted), [(V1.into(), 90), (V2.into(), 10)]);
    let diags = restarted.load_dir(d.path());
    assert_eq!(diags.len(), 1, "{diags:#?}");
    assert_eq!(split(&restarted), [(V1.into(), 90), (V2.into(), 10)]);
    let r = only(&restarted);
    assert_eq!(r.change, RejectedChange::Unreadable);
    let kept = r.kept.as_ref().unwrap();
    assert_eq!(
        (file_name(&kept.file), kept.line),
        ("payment-dr.yaml".into(), 3),
        "the kept version's own lines, as it was read"
    );
    let vs_line = restarted
        .ordered()
        .into_iter()
        .find(|r| r.meta.kind == resources::Kind::VirtualService)
        .map(|r| r.meta.line);
    assert_eq!(vs_line, Some(5), "lines as in the file it was read from");

    // A stored document that no longer parses is left out, and said.
    let mut damaged = stored.clone();
    damaged.texts[0] = "kind: [".into();
    let mut other = ConfigStore::new(MeshOptions::default());
    let problems = other.restore(&damaged);
    assert!(!problems.is_empty());
}

/// What the config watcher's leading read may find mid-save: a trial is
/// clean (applied at once) only when applying it brings no problem that is
/// not standing and removes nothing; anything else waits for the trailing
/// read. Committing a trial does what reading and settling would.
#[test]
fn a_trial_is_clean_only_without_new_problems_or_removals() {
    let half = vs("v1", 50, "v2", 50);
    let half = &half[..half.len() / 2];
    let broken_other = "apiVersion: networking.istio.io/v1\nkind: [\n";
    // (what, a broken file standing before, files written (None: deleted),
    // clean)
    type Case<'a> = (&'a str, bool, &'a [(&'a str, Option<&'a str>)], bool);
    let edit = vs("v1", 50, "v2", 50);
    let undefined = vs("v1", 0, "v9", 100);
    let ledger = SE_CATALOG.replace("catalog", "ledger");
    let cases: &[Case<'_>] = &[
        (
            "a valid edit",
            false,
            &[("payment-vs.yaml", Some(&edit))],
            true,
        ),
        ("nothing changed", false, &[], true),
        (
            "a new resource",
            false,
            &[("ledger.yaml", Some(&ledger))],
            true,
        ),
        (
            "a file truncated mid-save: a syntax error",
            false,
            &[("payment-vs.yaml", Some(half))],
            false,
        ),
        (
            "a file truncated to nothing: a removal",
            false,
            &[("catalog.yaml", Some(""))],
            false,
        ),
        (
            "a file deleted, its removal valid",
            false,
            &[("catalog.yaml", None)],
            false,
        ),
        (
            "an edit rejected between resources",
            false,
            &[("payment-vs.yaml", Some(&undefined))],
            false,
        ),
        (
            "a valid edit next to a problem standing before",
            true,
            &[("payment-vs.yaml", Some(&edit))],
            true,
        ),
        (
            "a new problem next to one standing",
            true,
            &[("payment-vs.yaml", Some(half))],
            false,
        ),
    ];
    for &(what, standing_problem, writes, clean) in cases {
        let (_, d) = mesh();
        write(&d, "catalog.yaml", SE_CATALOG);
        if standing_problem {
            write(&d, "other.yaml", broken_other);
        }
        let mut s = ConfigStore::new(MeshOptions::default());
        let standing = s.read_dirs(&[d.path()]);
        s.settle(&[]);
        assert_eq!(
            standing.is_empty(),
            !standing_problem,
            "{what}: {standing:?}"
        );
        for (file, text) in writes {
            match text {
                Some(text) => write(&d, file, text),
                None => std::fs::remove_file(d.path().join(file)).unwrap(),
            }
        }
        let before = s.versions();
        let rejections = s.rejections().to_vec();
        let trial = s.trial(s.read(&[d.path()]), &[], &standing);
        assert_eq!(trial.is_clean(), clean, "{what}");
        assert_eq!(s.versions(), before, "{what}: a trial changes nothing");
        assert_eq!(
            s.rejections(),
            rejections,
            "{what}: a trial changes nothing"
        );

        // Committed, the trial is what a read and a settle would make.
        let mut expected = ConfigStore::new(MeshOptions::default());
        expected.restore(&s.export());
        expected.read_dirs(&[d.path()]);
        expected.settle(&[]);
        expected.settle(&[]);
        s.commit(trial);
        assert_eq!(s.versions(), expected.versions(), "{what}");
        assert_eq!(s.rejections(), expected.rejections(), "{what}");
        assert!(!s.settle(&[]), "{what}: nothing left to apply");
    }
}

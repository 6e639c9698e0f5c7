//! `mesh-control apply`: putting a config in etcd, all of it or nothing.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use super::Layout;
use super::view::{FORMAT, StoredDocument, View};
use crate::config::{ConfigStore, Diagnostic, MeshOptions, ResourceDocument};
use crate::etcd::{self, Etcd, Op};

/// What [`apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Applied {
    /// The etcd revision the config was validated against.
    pub read_at: i64,
    /// The revision of the transaction that wrote it; `None` when etcd held
    /// this config already (nothing was written).
    pub revision: Option<i64>,
    /// How many resources the config holds.
    pub resources: usize,
    /// Resources added, changed and removed (`VirtualService shop/catalog`).
    pub added: Vec<String>,
    /// See [`Applied::added`].
    pub changed: Vec<String>,
    /// See [`Applied::added`].
    pub removed: Vec<String>,
}

impl fmt::Display for Applied {
    /// `applied 5 resources at etcd revision 42: changed VirtualService
    /// shop/catalog; added ...`, or that nothing changed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(revision) = self.revision else {
            return write!(
                f,
                "etcd already holds this config ({} resources, revision {}): nothing written",
                self.resources, self.read_at
            );
        };
        write!(
            f,
            "applied {} resources at etcd revision {revision}",
            self.resources
        )?;
        let mut first = true;
        for (verb, names) in [
            ("changed", &self.changed),
            ("added", &self.added),
            ("removed", &self.removed),
        ] {
            if names.is_empty() {
                continue;
            }
            f.write_str(if first { ": " } else { "; " })?;
            first = false;
            write!(f, "{verb} {}", names.join(", "))?;
        }
        if first {
            f.write_str(": no resource changed, only where they are read from")?;
        }
        Ok(())
    }
}

/// Why [`apply`] wrote nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApplyErrorKind {
    /// The config has problems ([`ApplyError::diagnostics`], at their lines).
    Invalid,
    /// etcd could not be reached, or refused the write.
    Unavailable,
    /// Another apply changed the config in etcd after this one read it.
    Conflict,
    /// Bad arguments: a directory that does not exist, a bad prefix.
    Config,
}

/// Why [`apply`] wrote nothing: the message says what happened and what to
/// do; for an invalid config, every problem at its `file:line`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyError {
    kind: ApplyErrorKind,
    message: String,
    diagnostics: Vec<Diagnostic>,
}

impl ApplyError {
    fn new(kind: ApplyErrorKind, message: impl Into<String>) -> ApplyError {
        ApplyError {
            kind,
            message: message.into(),
            diagnostics: Vec::new(),
        }
    }

    /// What kind of failure.
    pub fn kind(&self) -> ApplyErrorKind {
        self.kind
    }

    /// The config's problems (for [`ApplyErrorKind::Invalid`]), sorted by
    /// file and line.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        &self.diagnostics
    }
}

impl fmt::Display for ApplyError {
    /// The message, then each problem on a line of its own.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        for d in &self.diagnostics {
            write!(f, "\n{d}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ApplyError {}

/// Validates the Istio YAML of `dirs` and makes it the config of the
/// replicas sharing `etcd` under `prefix`, in one transaction (see the
/// module docs of [`crate::replica`]).
///
/// The directories are read as `serve --config` reads them (their
/// `*.yaml` / `*.yml` files, in the order given, then file name) and
/// judged as `check` judges them, with the registrations etcd holds. Any
/// problem fails the apply with every problem at its line, and nothing is
/// written. Otherwise each resource whose document (or the file and line
/// it comes from) changed is written, each resource the directories no
/// longer hold is deleted, all in one transaction that holds only if no
/// other apply wrote after the revision validated against.
pub async fn apply(
    etcd: &Etcd,
    prefix: &str,
    dirs: &[PathBuf],
    options: &MeshOptions,
) -> Result<Applied, ApplyError> {
    let layout =
        Layout::new(prefix).map_err(|e| ApplyError::new(ApplyErrorKind::Config, e.to_string()))?;
    if dirs.is_empty() {
        return Err(ApplyError::new(
            ApplyErrorKind::Config,
            "no config directory given",
        ));
    }
    if let Some(dir) = dirs.iter().find(|d| !d.is_dir()) {
        return Err(ApplyError::new(
            ApplyErrorKind::Config,
            format!(
                "{} does not exist or is not a directory: nothing was written",
                dir.display()
            ),
        ));
    }
    let (kvs, read_at) = etcd.get_prefix(layout.prefix()).await.map_err(|e| {
        ApplyError::new(
            ApplyErrorKind::Unavailable,
            format!("cannot read the mesh's state from etcd: {e}; nothing was written"),
        )
    })?;
    let view = View::from_list(&layout, kvs, read_at);
    let (registry, _) = view.registry(&layout);
    let registrations = registry.registrations();

    let mut store = ConfigStore::new(options.clone());
    let mut problems = store.read_dirs(dirs);
    store.settle(&registrations);
    problems.extend(
        store
            .rejections()
            .iter()
            .flat_map(|r| r.problems.iter().cloned()),
    );
    problems.extend(store.snapshot(&registrations).1);
    problems.sort();
    problems.dedup();
    if !problems.is_empty() {
        return Err(invalid(problems));
    }
    let documents = store.export_documents().map_err(invalid)?;

    let mut desired = BTreeMap::new();
    for ResourceDocument {
        kind,
        namespace,
        name,
        document,
    } in documents
    {
        let value = serde_json::to_vec(&StoredDocument {
            format: FORMAT,
            document,
        })
        .map_err(|e| {
            ApplyError::new(
                ApplyErrorKind::Config,
                format!("cannot encode {kind} {namespace}/{name}: {e}"),
            )
        })?;
        desired.insert(
            layout.resource(&kind, &namespace, &name).into_bytes(),
            value,
        );
    }
    let resources = desired.len();
    let plan = Plan::new(&layout, &view.resources, desired);
    if plan.ops.is_empty() {
        return Ok(Applied {
            read_at,
            revision: None,
            resources,
            added: plan.added,
            changed: plan.changed,
            removed: plan.removed,
        });
    }
    let op_count = plan.ops.len() + 1;
    let guard = serde_json::json!({
        "format": FORMAT,
        "resources": resources,
        "applied_at_unix": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "from": dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>(),
    });
    let mut ops = plan.ops;
    ops.push(Op::put(layout.applied(), guard.to_string(), None));
    match etcd
        .commit_if_unchanged(layout.config(), read_at, ops)
        .await
    {
        Ok(revision) => Ok(Applied {
            read_at,
            revision: Some(revision),
            resources,
            added: plan.added,
            changed: plan.changed,
            removed: plan.removed,
        }),
        Err(e) if e.kind() == etcd::ErrorKind::Conflict => Err(ApplyError::new(
            ApplyErrorKind::Conflict,
            format!(
                "another apply changed the config in etcd after revision {read_at}, which this \
                 one was validated against: nothing was written; run apply again ({e})"
            ),
        )),
        Err(e) if e.kind() == etcd::ErrorKind::Rejected => Err(ApplyError::new(
            ApplyErrorKind::Unavailable,
            format!(
                "{e}: nothing was written. The transaction has {op_count} operations; etcd limits \
                 one by --max-txn-ops (default 128) and --max-request-bytes (default 1.5 MiB): \
                 raise them on every etcd member"
            ),
        )),
        Err(e) => Err(ApplyError::new(
            ApplyErrorKind::Unavailable,
            format!(
                "cannot write the config to etcd: {e}. Either nothing or all of it was written \
                 (one transaction); running apply again is safe"
            ),
        )),
    }
}

fn invalid(problems: Vec<Diagnostic>) -> ApplyError {
    ApplyError {
        kind: ApplyErrorKind::Invalid,
        message: format!(
            "the config has {} problem(s); nothing was written to etcd:",
            problems.len()
        ),
        diagnostics: problems,
    }
}

/// The writes that turn the resources etcd holds into the desired ones.
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    ops: Vec<Op>,
    added: Vec<String>,
    changed: Vec<String>,
    removed: Vec<String>,
}

impl Plan {
    fn new(
        layout: &Layout,
        existing: &BTreeMap<Vec<u8>, Vec<u8>>,
        desired: BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Plan {
        let resources = layout.resources();
        // `Kind/ns/name` → `Kind ns/name`.
        let name = |key: &[u8]| {
            let path = String::from_utf8_lossy(key.get(resources.len()..).unwrap_or_default())
                .into_owned();
            match path.split_once('/') {
                Some((kind, rest)) => format!("{kind} {rest}"),
                None => path,
            }
        };
        let yaml = |value: &[u8]| {
            serde_json::from_slice::<StoredDocument>(value)
                .ok()
                .map(|d| d.document.yaml)
        };
        let mut plan = Plan::default();
        for key in existing.keys() {
            if !desired.contains_key(key) {
                plan.removed.push(name(key));
                plan.ops.push(Op::delete(key));
            }
        }
        for (key, value) in desired {
            match existing.get(&key) {
                Some(old) if *old == value => continue,
                Some(old) => {
                    // Only where it is read from changed: written, not named.
                    if yaml(old).is_none() || yaml(old) != yaml(&value) {
                        plan.changed.push(name(&key));
                    }
                }
                None => plan.added.push(name(&key)),
            }
            plan.ops.push(Op::put(key, value, None));
        }
        plan
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SourceDocument;

    fn value(yaml: &str, line: usize) -> Vec<u8> {
        serde_json::to_vec(&StoredDocument {
            format: FORMAT,
            document: SourceDocument {
                file: "mesh/a.yaml".into(),
                position: 0,
                doc: 0,
                line,
                yaml: yaml.into(),
            },
        })
        .unwrap()
    }

    #[test]
    fn a_plan_writes_what_changed_and_deletes_what_is_gone() {
        let layout = Layout::new("/p/").unwrap();
        let key = |name: &str| layout.resource("VirtualService", "shop", name).into_bytes();
        let existing = BTreeMap::from([
            (key("same"), value("a: 1\n", 1)),
            (key("edited"), value("a: 1\n", 5)),
            (key("moved"), value("a: 1\n", 9)),
            (key("gone"), value("a: 1\n", 12)),
        ]);
        let desired = BTreeMap::from([
            (key("same"), value("a: 1\n", 1)),
            (key("edited"), value("a: 2\n", 5)),
            (key("moved"), value("a: 1\n", 10)),
            (key("new"), value("a: 1\n", 14)),
        ]);
        let plan = Plan::new(&layout, &existing, desired);
        assert_eq!(plan.added, ["VirtualService shop/new"]);
        assert_eq!(plan.changed, ["VirtualService shop/edited"]);
        assert_eq!(plan.removed, ["VirtualService shop/gone"]);
        assert_eq!(plan.ops.len(), 4, "delete gone; put edited, moved, new");
        assert_eq!(plan.ops[0], Op::delete(key("gone")));

        let unchanged = Plan::new(&layout, &existing, existing.clone());
        assert_eq!(unchanged, Plan::default());
    }

    #[test]
    fn what_an_apply_did_reads_as_a_sentence() {
        let mut applied = Applied {
            read_at: 7,
            revision: Some(9),
            resources: 3,
            added: vec!["DestinationRule shop/a".into()],
            changed: vec!["VirtualService shop/b".into()],
            removed: vec![],
        };
        assert_eq!(
            applied.to_string(),
            "applied 3 resources at etcd revision 9: changed VirtualService shop/b; added \
             DestinationRule shop/a"
        );
        applied.revision = None;
        assert!(applied.to_string().contains("nothing written"));
        let e = invalid(vec![Diagnostic {
            file: "mesh/a.yaml".into(),
            line: 4,
            message: "VirtualService shop/b: unknown field 'x'".into(),
        }]);
        assert_eq!(e.kind(), ApplyErrorKind::Invalid);
        assert_eq!(
            e.to_string(),
            "the config has 1 problem(s); nothing was written to etcd:\nmesh/a.yaml:4: \
             VirtualService shop/b: unknown field 'x'"
        );
    }
}

//! A replica's view of etcd: the keys under the prefix as of one revision,
//! and how they read as config documents and registrations. Pure: the list
//! and the watch feed it, the server is fed from it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::Layout;
use crate::config::{Diagnostic, SourceDocument};
use crate::etcd::{EventKind, KeyValue, WatchBatch};
use crate::persist::StoredLease;
use crate::registry::Registry;

/// The format of the values mesh-control writes; another is refused
/// rather than misread.
pub(crate) const FORMAT: u32 = 1;

/// A resource as stored under `config/resources/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredDocument {
    pub(crate) format: u32,
    #[serde(flatten)]
    pub(crate) document: SourceDocument,
}

/// A registration as stored under `registrations/`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredRegistration {
    pub(crate) format: u32,
    #[serde(flatten)]
    pub(crate) lease: StoredLease,
}

/// What a batch of changes touched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Touched {
    pub(crate) config: bool,
    pub(crate) registrations: bool,
}

impl Touched {
    /// Everything (a fresh list).
    pub(crate) const ALL: Touched = Touched {
        config: true,
        registrations: true,
    };
}

/// The resources and registrations under the prefix, as of `revision`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct View {
    /// Every change up to it is in the view.
    pub(crate) revision: i64,
    /// `config/resources/...` keys and their values.
    pub(crate) resources: BTreeMap<Vec<u8>, Vec<u8>>,
    /// `registrations/<lease>` keys and their values.
    pub(crate) registrations: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl View {
    /// The view of a list of the prefix read at `revision`.
    pub(crate) fn from_list(layout: &Layout, kvs: Vec<KeyValue>, revision: i64) -> View {
        let mut view = View {
            revision,
            ..View::default()
        };
        for kv in kvs {
            view.put(layout, kv.key, kv.value);
        }
        view
    }

    fn put(&mut self, layout: &Layout, key: Vec<u8>, value: Vec<u8>) -> Touched {
        match section(layout, &key) {
            Some(Section::Resource) => {
                self.resources.insert(key, value);
                Touched {
                    config: true,
                    registrations: false,
                }
            }
            Some(Section::Registration) => {
                self.registrations.insert(key, value);
                Touched {
                    config: false,
                    registrations: true,
                }
            }
            None => Touched::default(),
        }
    }

    fn delete(&mut self, layout: &Layout, key: &[u8]) -> Touched {
        match section(layout, key) {
            Some(Section::Resource) => Touched {
                config: self.resources.remove(key).is_some(),
                registrations: false,
            },
            Some(Section::Registration) => Touched {
                config: false,
                registrations: self.registrations.remove(key).is_some(),
            },
            None => Touched::default(),
        }
    }

    /// Applies a batch of the watch (every event of each of its revisions);
    /// returns what it touched.
    pub(crate) fn apply(&mut self, layout: &Layout, batch: &WatchBatch) -> Touched {
        let mut touched = Touched::default();
        for event in &batch.events {
            let t = match event.kind {
                EventKind::Put => self.put(layout, event.kv.key.clone(), event.kv.value.clone()),
                EventKind::Delete => self.delete(layout, &event.kv.key),
            };
            touched.config |= t.config;
            touched.registrations |= t.registrations;
        }
        self.revision = self.revision.max(batch.revision);
        touched
    }

    /// The resources as documents to read, and a problem (at the key) for
    /// each value that is not one.
    pub(crate) fn documents(&self) -> (Vec<SourceDocument>, Vec<Diagnostic>) {
        let mut documents = Vec::with_capacity(self.resources.len());
        let mut problems = Vec::new();
        for (key, value) in &self.resources {
            match serde_json::from_slice::<StoredDocument>(value) {
                Ok(stored) if stored.format == FORMAT => documents.push(stored.document),
                Ok(stored) => problems.push(at_key(
                    key,
                    format!(
                        "format {} (this mesh-control reads format {FORMAT}): left out",
                        stored.format
                    ),
                )),
                Err(e) => problems.push(at_key(
                    key,
                    format!("not a resource written by `mesh-control apply` ({e}): left out"),
                )),
            }
        }
        (documents, problems)
    }

    /// The registrations as a registry (entries without a local expiry:
    /// etcd ends them), and a problem for each that is left out.
    pub(crate) fn registry(&self, layout: &Layout) -> (Registry, Vec<String>) {
        let prefix = layout.registrations();
        let mut stored = Vec::with_capacity(self.registrations.len());
        let mut problems = Vec::new();
        for (key, value) in &self.registrations {
            let lease_id =
                String::from_utf8_lossy(key.get(prefix.len()..).unwrap_or_default()).into_owned();
            match serde_json::from_slice::<StoredRegistration>(value) {
                Ok(r) if r.format == FORMAT => stored.push((lease_id, r.lease)),
                Ok(r) => problems.push(format!(
                    "registration {lease_id}: format {} (this mesh-control reads format \
                     {FORMAT}): left out",
                    r.format
                )),
                Err(e) => problems.push(format!(
                    "registration {lease_id}: not a registration written by mesh-control ({e}): \
                     left out"
                )),
            }
        }
        let (registry, more) = Registry::mirror(stored.iter().map(|(id, l)| (id.as_str(), l)));
        problems.extend(more);
        (registry, problems)
    }
}

/// Which part of the state a key is in.
enum Section {
    Resource,
    Registration,
}

fn section(layout: &Layout, key: &[u8]) -> Option<Section> {
    if key.starts_with(layout.resources().as_bytes()) {
        Some(Section::Resource)
    } else if key.starts_with(layout.registrations().as_bytes()) {
        Some(Section::Registration)
    } else {
        None
    }
}

/// A problem with the value of an etcd key, reported at the key.
fn at_key(key: &[u8], message: String) -> Diagnostic {
    Diagnostic {
        file: PathBuf::from(format!("etcd:{}", String::from_utf8_lossy(key))),
        line: 1,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etcd::Event;

    fn kv(key: &str, value: &str, revision: i64) -> KeyValue {
        KeyValue {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
            lease: None,
        }
    }

    fn document(yaml: &str) -> String {
        serde_json::to_string(&StoredDocument {
            format: FORMAT,
            document: SourceDocument {
                file: "mesh/a.yaml".into(),
                position: 0,
                doc: 0,
                line: 3,
                yaml: yaml.into(),
            },
        })
        .unwrap()
    }

    fn registration(port: u16) -> String {
        serde_json::to_string(&StoredRegistration {
            format: FORMAT,
            lease: StoredLease {
                lease_id: String::new(),
                service: "payment".into(),
                namespace: "shop".into(),
                address: "10.0.0.1".into(),
                port,
                service_port: None,
                protocol: Some("GRPC".into()),
                labels: BTreeMap::new(),
                locality: String::new(),
                owner: None,
                secret: None,
                node_id: None,
                ttl_ms: 5000,
                expires_unix_ms: 0,
            },
        })
        .unwrap()
    }

    #[test]
    fn a_view_follows_lists_and_batches_and_ignores_other_keys() {
        let layout = Layout::new("/p/").unwrap();
        let mut view = View::from_list(
            &layout,
            vec![
                kv(
                    "/p/config/resources/VirtualService/shop/a",
                    &document("kind: X\n"),
                    5,
                ),
                kv("/p/config/applied", "{}", 5),
                kv("/p/ca/root", "{}", 2),
                kv("/p/registrations/1f", &registration(8080), 4),
            ],
            6,
        );
        assert_eq!(view.revision, 6);
        assert_eq!(view.resources.len(), 1);
        assert_eq!(view.registrations.len(), 1);
        let (registry, problems) = view.registry(&layout);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            registry.owner("1f"),
            Some(None),
            "the lease ID is the key's"
        );

        let batch = WatchBatch {
            events: vec![
                Event {
                    kind: EventKind::Delete,
                    kv: kv("/p/registrations/1f", "", 7),
                },
                Event {
                    kind: EventKind::Put,
                    kv: kv("/p/config/applied", "{}", 7),
                },
            ],
            revision: 7,
        };
        let touched = view.apply(&layout, &batch);
        assert_eq!(
            touched,
            Touched {
                config: false,
                registrations: true
            },
            "the guard is no resource"
        );
        assert_eq!(view.revision, 7);
        assert!(view.registrations.is_empty());
        // Deleting what is not there touches nothing.
        assert_eq!(view.apply(&layout, &batch), Touched::default());
    }

    #[test]
    fn values_that_are_not_ours_are_reported_and_left_out() {
        let layout = Layout::new("/p/").unwrap();
        let view = View::from_list(
            &layout,
            vec![
                kv("/p/config/resources/VirtualService/shop/a", "{nope", 2),
                kv(
                    "/p/config/resources/VirtualService/shop/b",
                    &document("kind: X\n").replace("\"format\":1", "\"format\":9"),
                    2,
                ),
                kv(
                    "/p/config/resources/VirtualService/shop/c",
                    &document("kind: X\n"),
                    2,
                ),
                kv("/p/registrations/2a", "[]", 3),
            ],
            3,
        );
        let (documents, problems) = view.documents();
        assert_eq!(documents.len(), 1);
        assert_eq!(documents[0].line, 3);
        assert_eq!(problems.len(), 2);
        assert_eq!(
            problems[0].file,
            PathBuf::from("etcd:/p/config/resources/VirtualService/shop/a")
        );
        assert!(problems[1].message.contains("format 9"), "{problems:?}");
        let (registry, problems) = view.registry(&layout);
        assert!(registry.registrations().is_empty());
        assert!(problems[0].starts_with("registration 2a:"), "{problems:?}");
    }
}

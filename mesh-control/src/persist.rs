//! What survives a restart of mesh-control, and where it is kept.
//!
//! A control plane that forgets on restart turns a restart into an
//! incident: the YAML on disk may hold an edit that was rejected (served
//! as it is, it would undo the last good config), every workload would
//! have to register again before clients see it, and xDS versions would
//! start over at 1 with other content than a client already has under
//! that version. So, with a data directory (`serve --data-dir`,
//! [`crate::ServerBuilder::data_dir`]), mesh-control keeps:
//!
//! - **the last good config**: for each resource in force, the text of the
//!   file it was read from and its document's index, so that it is parsed
//!   again exactly as it was accepted (lines included). Written whenever
//!   the set in force changes, before it is served.
//! - **the leases**: each registration with its owner (the identity that
//!   registered it: only it may renew or delete it) or, registered without
//!   a CA, its secret (only its holder may), its node id, its TTL
//!   and its expiry as wall-clock time, so that a restarted server serves
//!   the endpoint at once with the TTL it has left and the next heartbeat
//!   renews the same lease. A registration or deregistration is written
//!   before its HTTP answer; renewals (a heartbeat every few seconds per
//!   workload) are written at most every [`LEASE_FLUSH`] (a lost renewal
//!   only shortens a lease by one heartbeat).
//! - **the version ceiling**: xDS versions are reserved in blocks of
//!   [`VERSION_BLOCK`], the end of the block written before a version in it
//!   is sent, so a restarted server starts above every version it may have
//!   sent and never sends one number with two contents.
//!
//! Where it is kept is behind [`Store`]: [`LocalDir`] writes three small
//! JSON files, each replaced atomically (a temporary file, fsync, rename,
//! fsync of the directory; mode 0600: `mesh_fs::write_private_file`, the
//! code the workloads' caches use too), so a crash at any point leaves the
//! previous or the new version. The state machines (`config::last_good`,
//! the registry) never see it: they export and import plain values.
//!
//! # Shared state
//!
//! [`Store`] is one server's memory: written after the fact, read once at
//! start. Replicas sharing an etcd (feature `etcd`, `replica.rs`) need the
//! other way round: a change is made *in* the shared store first, and every
//! replica, the one that made it included, learns it from a watch and
//! rebuilds from what it saw. So the registrations of a replica go through
//! [`SharedState`] instead (the admin API calls it rather than its own
//! registry, which then only mirrors the store), the config is written by
//! `mesh-control apply` and read from the watch, and versions are the
//! store's revisions ([`Versions::revisions`]), not a counter: two replicas
//! that saw the same revision send the same version for the same content,
//! and no version is sent twice across restarts or replicas since the
//! store's revision only grows. A write that cannot reach the store is an
//! error the caller sees ([`SharedError::Unavailable`], a 503): a replica
//! never accepts what it could not share.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Error;
use crate::registry::{Lease, LeaseKeeper, Registered};

/// How often renewals are written at most.
pub(crate) const LEASE_FLUSH: Duration = Duration::from_millis(100);

/// How many versions one write of the ceiling reserves.
pub(crate) const VERSION_BLOCK: u64 = 1000;

/// The format of the files; a file of another format is refused rather
/// than misread.
const FORMAT: u32 = 1;

/// The last good config: resources as the documents they were read from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredConfig {
    pub(crate) format: u32,
    /// File texts, each stored once however many resources came from it.
    pub(crate) texts: Vec<String>,
    pub(crate) resources: Vec<StoredResource>,
}

/// One resource of the last good config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredResource {
    /// The file it was read from (its diagnostics name it).
    pub(crate) file: PathBuf,
    /// The index of its document among the file's non-empty documents.
    pub(crate) doc: usize,
    /// The index of the file's text in [`StoredConfig::texts`].
    pub(crate) text: usize,
}

/// The live leases.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredLeases {
    pub(crate) format: u32,
    /// The registry's lease counter (lease ids are never reused).
    pub(crate) next_id: u64,
    pub(crate) leases: Vec<StoredLease>,
}

/// One lease: the registration as accepted, who made it, and when it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoredLease {
    pub(crate) lease_id: String,
    pub(crate) service: String,
    pub(crate) namespace: String,
    pub(crate) address: String,
    pub(crate) port: u16,
    #[serde(default)]
    pub(crate) service_port: Option<u16>,
    /// `HTTP`, `HTTP2` or `GRPC`, as registrations say it.
    #[serde(default)]
    pub(crate) protocol: Option<String>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    /// `region/zone/subzone`.
    #[serde(default)]
    pub(crate) locality: String,
    /// The SPIFFE ID that registered it, when registration is authenticated.
    #[serde(default)]
    pub(crate) owner: Option<String>,
    /// The lease's secret, when registration is open (see "Who may renew
    /// or delete a lease" in `registry.rs`). Absent in files written before
    /// leases had secrets: such a lease can be neither renewed nor deleted
    /// and ends with its TTL (the registry says why that is safe).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) secret: Option<String>,
    #[serde(default)]
    pub(crate) node_id: Option<String>,
    pub(crate) ttl_ms: u64,
    /// When it expires unless renewed, in milliseconds since the Unix epoch.
    pub(crate) expires_unix_ms: u64,
}

/// The version ceiling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StoredVersions {
    format: u32,
    /// No version above it was sent; a restarted server starts above it.
    ceiling: u64,
}

/// Everything a store held at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) config: Option<StoredConfig>,
    pub(crate) leases: Option<StoredLeases>,
    pub(crate) version_ceiling: u64,
}

/// Where mesh-control keeps what must survive a restart (see the module
/// docs). Calls block (a local write is an fsync; a remote store, a round
/// trip): the server calls them from blocking threads, except the rare
/// version reservation, once per [`VERSION_BLOCK`] versions.
pub(crate) trait Store: Send + Sync + fmt::Debug {
    /// What was stored, or nothing on a first start. An unreadable or
    /// corrupt store is an error: starting as if it were empty would serve
    /// the YAML on disk as it is, rejected edits included.
    fn load(&self) -> Result<Stored, Error>;

    /// Replaces the last good config.
    fn save_config(&self, config: &StoredConfig) -> Result<(), Error>;

    /// Replaces the leases.
    fn save_leases(&self, leases: &StoredLeases) -> Result<(), Error>;

    /// Records that no version above `ceiling` will be sent before the
    /// next reservation.
    fn save_version_ceiling(&self, ceiling: u64) -> Result<(), Error>;
}

/// What a [`SharedState`] call returns: a future, boxed so the trait is
/// object-safe (the admin API holds an `Arc<dyn SharedState>`).
pub(crate) type Pending<'a, T> = Pin<Box<dyn Future<Output = Result<T, SharedError>> + Send + 'a>>;

/// Registrations kept in a store several replicas share (see "Shared
/// state" in the module docs). Each call returns once the store has the
/// change, and once this replica's own view has caught up with it, so a
/// client that registered through a replica and then asks it (or reads
/// its EDS) sees its registration.
pub(crate) trait SharedState: Send + Sync + fmt::Debug {
    /// Records `registered` with a lease of `ttl` (already clamped by the
    /// registry's rules), refused as [`crate::registry::Registry::check`]
    /// refuses against the registrations the store holds now. A lease
    /// registered without an owner gets a secret, stored with it and
    /// returned in the [`Lease`].
    fn register(&self, registered: Registered, ttl: Duration) -> Pending<'_, Lease>;

    /// Who may change `lease_id` (its owner or its secret), asking the
    /// store itself (for a lease this replica's mirror does not hold yet):
    /// `None` when it does not exist.
    fn keeper(&self, lease_id: &str) -> Pending<'_, Option<LeaseKeeper>>;

    /// Renews a lease; `false` when it does not exist (expired, deleted).
    fn renew(&self, lease_id: &str) -> Pending<'_, bool>;

    /// Deletes a lease now; `false` when it did not exist.
    fn remove(&self, lease_id: &str) -> Pending<'_, bool>;

    /// What `/status` shows of the store (`"etcd"`: endpoints, revision).
    fn status(&self) -> serde_json::Value;
}

/// Why a [`SharedState`] call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
pub(crate) enum SharedError {
    /// The store cannot be reached, or did not answer: nothing changed, or
    /// (a write whose answer was lost) the change may have been made; a
    /// 503 whose message names the store.
    Unavailable(String),
    /// The registration is refused (409 when the message says "already
    /// registered", else 400).
    Refused(String),
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SharedError::Unavailable(m) | SharedError::Refused(m) => f.write_str(m),
        }
    }
}

/// A [`Store`] in a local directory: `config.json`, `leases.json`,
/// `versions.json`.
#[derive(Debug)]
pub(crate) struct LocalDir {
    dir: PathBuf,
    /// One writer at a time per file, so that the last to lock is the last
    /// on disk (each write has a temporary file of its own).
    writing: [Mutex<()>; 3],
}

const CONFIG_FILE: &str = "config.json";
const LEASES_FILE: &str = "leases.json";
const VERSIONS_FILE: &str = "versions.json";

impl LocalDir {
    /// Opens `dir`, creating it (mode 0700) if needed.
    pub(crate) fn open(dir: impl Into<PathBuf>) -> Result<LocalDir, Error> {
        let dir = dir.into();
        if !dir.is_dir() {
            mesh_fs::create_private_dir(&dir).map_err(|e| {
                Error::io(
                    format!("cannot create the data directory {}", dir.display()),
                    e,
                )
            })?;
        }
        Ok(LocalDir {
            dir,
            writing: Default::default(),
        })
    }

    fn read<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, Error> {
        let path = self.dir.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            Error::config(format!(
                "{} is not a mesh-control data file ({e}); it was not written by this version \
                 of mesh-control, or was damaged: move it away to start without it",
                path.display()
            ))
        })
    }

    fn write<T: Serialize>(&self, slot: usize, name: &str, value: &T) -> Result<(), Error> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| Error::config(format!("cannot encode {name}: {e}")))?;
        let _one = self
            .writing
            .get(slot)
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()));
        let path = self.dir.join(name);
        mesh_fs::write_private_file(&path, &bytes)
            .map_err(|e| Error::io(format!("cannot write {}", path.display()), e))
    }
}

/// Refuses a file of another format.
fn check_format(name: &str, dir: &Path, format: u32) -> Result<(), Error> {
    if format == FORMAT {
        return Ok(());
    }
    Err(Error::config(format!(
        "{} has format {format}, this mesh-control reads format {FORMAT}; move it away to \
         start without it",
        dir.join(name).display()
    )))
}

impl Store for LocalDir {
    fn load(&self) -> Result<Stored, Error> {
        let config: Option<StoredConfig> = self.read(CONFIG_FILE)?;
        if let Some(c) = &config {
            check_format(CONFIG_FILE, &self.dir, c.format)?;
        }
        let leases: Option<StoredLeases> = self.read(LEASES_FILE)?;
        if let Some(l) = &leases {
            check_format(LEASES_FILE, &self.dir, l.format)?;
        }
        let versions: Option<StoredVersions> = self.read(VERSIONS_FILE)?;
        if let Some(v) = &versions {
            check_format(VERSIONS_FILE, &self.dir, v.format)?;
        }
        Ok(Stored {
            config,
            leases,
            version_ceiling: versions.map_or(0, |v| v.ceiling),
        })
    }

    fn save_config(&self, config: &StoredConfig) -> Result<(), Error> {
        self.write(0, CONFIG_FILE, config)
    }

    fn save_leases(&self, leases: &StoredLeases) -> Result<(), Error> {
        self.write(1, LEASES_FILE, leases)
    }

    fn save_version_ceiling(&self, ceiling: u64) -> Result<(), Error> {
        let versions = StoredVersions {
            format: FORMAT,
            ceiling,
        };
        self.write(2, VERSIONS_FILE, &versions)
    }
}

/// The format written now (the exporters set it).
pub(crate) fn format() -> u32 {
    FORMAT
}

/// The xDS version counter and its reserved ceiling (see the module docs).
/// Pure: the server writes the ceiling [`Versions::reservation`] asks for,
/// then calls [`Versions::reserved`].
///
/// With a shared store ([`Versions::revisions`]) a version is the store's
/// revision that produced the content instead, set by whoever feeds the
/// server the store's changes ([`Versions::at_revision`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Versions {
    last: u64,
    ceiling: u64,
    /// The shared store's revision the state is at, in revision mode.
    revision: Option<u64>,
}

impl Versions {
    /// Versions without a store: from 1, nothing to reserve.
    pub(crate) fn in_memory() -> Versions {
        Versions {
            last: 0,
            ceiling: u64::MAX,
            revision: None,
        }
    }

    /// Versions after a start from a store whose ceiling was `ceiling`:
    /// above it, the first one needing a reservation.
    pub(crate) fn after(ceiling: u64) -> Versions {
        Versions {
            last: ceiling,
            ceiling,
            revision: None,
        }
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    /// Versions that are a shared store's revisions: a new content is
    /// published under the revision it was read at (see "Shared state" in
    /// the module docs). Nothing to reserve: the store's revision never
    /// goes back.
    pub(crate) fn revisions() -> Versions {
        Versions {
            last: 0,
            ceiling: u64::MAX,
            revision: Some(0),
        }
    }

    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    /// In revision mode, the state now reflects the store at `revision`.
    pub(crate) fn at_revision(&mut self, revision: u64) {
        if let Some(r) = &mut self.revision {
            *r = (*r).max(revision);
        }
    }

    /// The next version to publish. In revision mode, the revision the
    /// state is at (never below a version already published: only a change
    /// made outside the store, the test hook of raw resources, can publish
    /// twice at one revision).
    pub(crate) fn next(&mut self) -> u64 {
        self.last = match self.revision {
            Some(revision) => self.last.max(revision),
            None => self.last.saturating_add(1),
        };
        self.last
    }

    /// The ceiling to store before publishing the last version from
    /// [`Versions::next`], if it is above the reserved one.
    pub(crate) fn reservation(&self) -> Option<u64> {
        (self.last > self.ceiling).then(|| self.last.saturating_add(VERSION_BLOCK - 1))
    }

    /// The ceiling was stored.
    pub(crate) fn reserved(&mut self, ceiling: u64) {
        self.ceiling = ceiling;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_reserved_in_blocks_and_resume_above_the_ceiling() {
        let mut v = Versions::in_memory();
        assert_eq!(v.next(), 1);
        assert_eq!(v.reservation(), None, "nothing to reserve in memory");

        let mut v = Versions::after(0);
        assert_eq!(v.next(), 1);
        assert_eq!(v.reservation(), Some(VERSION_BLOCK));
        v.reserved(VERSION_BLOCK);
        for want in 2..=VERSION_BLOCK {
            assert_eq!(v.next(), want);
            assert_eq!(v.reservation(), None);
        }
        assert_eq!(v.next(), VERSION_BLOCK + 1);
        assert_eq!(v.reservation(), Some(2 * VERSION_BLOCK));
        // A failed write is retried at the next version.
        assert_eq!(v.next(), VERSION_BLOCK + 2);
        assert_eq!(v.reservation(), Some(2 * VERSION_BLOCK + 1));

        // A restart after the process sent version 7 under ceiling 1000.
        let mut v = Versions::after(VERSION_BLOCK);
        assert_eq!(v.next(), VERSION_BLOCK + 1, "above anything sent before");
        assert!(v.reservation().is_some());
    }

    #[test]
    fn shared_versions_are_the_revisions_that_produced_them() {
        let mut v = Versions::revisions();
        v.at_revision(41);
        assert_eq!(v.next(), 41);
        assert_eq!(v.reservation(), None, "nothing to reserve");
        v.at_revision(40);
        v.at_revision(57);
        assert_eq!(v.next(), 57, "the latest revision seen");
        assert_eq!(v.next(), 57, "a local change at one revision");
        // Not in revision mode: ignored.
        let mut v = Versions::in_memory();
        v.at_revision(99);
        assert_eq!(v.next(), 1);
    }

    #[test]
    fn a_local_dir_round_trips_and_replaces_files_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let store = LocalDir::open(&dir).unwrap();
        assert_eq!(store.load().unwrap(), Stored::default(), "a first start");

        let config = StoredConfig {
            format: format(),
            texts: vec!["kind: VirtualService\n".into()],
            resources: vec![StoredResource {
                file: "/etc/mesh/a.yaml".into(),
                doc: 0,
                text: 0,
            }],
        };
        let leases = StoredLeases {
            format: format(),
            next_id: 3,
            leases: vec![StoredLease {
                lease_id: "3-abc".into(),
                service: "payment".into(),
                namespace: "shop".into(),
                address: "10.0.0.1".into(),
                port: 8080,
                service_port: None,
                protocol: Some("GRPC".into()),
                labels: BTreeMap::from([("version".into(), "v1".into())]),
                locality: "eu/z1/".into(),
                owner: Some("spiffe://cluster.local/ns/shop/sa/payment".into()),
                secret: None,
                node_id: None,
                ttl_ms: 30_000,
                expires_unix_ms: 1_700_000_000_000,
            }],
        };
        store.save_config(&config).unwrap();
        store.save_leases(&leases).unwrap();
        store.save_version_ceiling(2000).unwrap();
        let loaded = store.load().unwrap();
        assert_eq!(loaded.config.as_ref(), Some(&config));
        assert_eq!(loaded.leases.as_ref(), Some(&leases));
        assert_eq!(loaded.version_ceiling, 2000);

        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().all(|n| !n.ends_with(".tmp")),
            "no temporary file left: {names:?}"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join(LEASES_FILE)), 0o600);
        }
    }

    #[test]
    fn a_damaged_or_foreign_file_is_refused_with_what_to_do() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(LEASES_FILE), "{not json").unwrap();
        let store = LocalDir::open(tmp.path()).unwrap();
        let e = store.load().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Config);
        assert!(e.to_string().contains("move it away"), "{e}");

        std::fs::write(
            tmp.path().join(LEASES_FILE),
            r#"{"format": 9, "next_id": 0, "leases": []}"#,
        )
        .unwrap();
        let e = store.load().unwrap_err();
        assert!(e.to_string().contains("format 9"), "{e}");
    }
}

//! A client of etcd's v3 API (feature `etcd`), for mesh-control replicas
//! that share one etcd: registrations as keys attached to leases, the
//! config in keys, every replica watching.
//!
//! Why a client of our own: the `etcd-client` crate generates its code with
//! `protoc` at build time, and this workspace builds without `protoc`. The
//! subset of etcd's API used here (mesh-control/proto: etcd's package,
//! service, message and field names and numbers, so the wire format is
//! etcd's) is compiled by `protox` in build.rs, and the client is plain
//! tonic.
//!
//! What it offers, over a cluster given by its client URLs ([`Etcd`]):
//!
//! - keys: [`Etcd::get`], [`Etcd::get_prefix`] (one consistent view and the
//!   revision it was read at), [`Etcd::put`], [`Etcd::delete`],
//!   [`Etcd::delete_prefix`];
//! - transactions: [`Etcd::txn`] (conditions, then operations, atomically)
//!   and [`Etcd::commit_if_unchanged`], for "write these keys if nothing
//!   under the prefix changed since the revision I validated against";
//! - leases: [`Etcd::grant`], [`Etcd::keep_alive`], [`Etcd::revoke`],
//!   [`Etcd::time_to_live`];
//! - [`Etcd::watch_prefix`]: the changes under a prefix in revision order,
//!   resumed after reconnections from the revision after the last one seen,
//!   ending with [`ErrorKind::Compacted`] if etcd compacted that history;
//! - TLS with rustls ([`EtcdTls`]: a CA, and a client certificate for
//!   `--client-cert-auth`), failover across endpoints, bounded timeouts
//!   ([`EtcdOptions`]), and one [`Error`] whose message names the endpoint
//!   and says what to do.
//!
//! The typical replica: `get_prefix` for the current state and its
//! revision R, `watch_prefix(prefix, R + 1)` for what follows, and writes
//! with `commit_if_unchanged(prefix, R', ...)` where R' is the revision the
//! writer's view was at.
//!
//! Tested against a real etcd (3.4, Debian's `etcd-server`):
//! mesh-control/tests/etcd.rs.

mod client;
mod error;
mod transport;
mod txn;
mod watch;

use std::fmt;
use std::time::Duration;

pub use client::{Etcd, EtcdOptions};
pub use error::{Error, ErrorKind};
pub use transport::EtcdTls;
pub use txn::{Compare, CompareOp, Op, OpResponse, Txn, TxnResponse};
pub use watch::{Event, EventKind, Watch, WatchBatch};

/// The code generated from mesh-control/proto (build.rs).
#[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
mod pb {
    pub(crate) mod mvccpb {
        include!(concat!(env!("OUT_DIR"), "/mvccpb.rs"));
    }
    pub(crate) mod etcdserverpb {
        include!(concat!(env!("OUT_DIR"), "/etcdserverpb.rs"));
    }
}

/// A key as stored, with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// The revision that created the key (since it last did not exist).
    pub create_revision: i64,
    /// The revision of the key's last write: what a transaction compares
    /// to know nobody wrote since.
    pub mod_revision: i64,
    /// Writes since creation (1 after the first put).
    pub version: i64,
    /// The lease the key is attached to.
    pub lease: Option<LeaseId>,
}

impl KeyValue {
    /// The key as text, if it is UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.key).ok()
    }

    /// The value as text, if it is UTF-8.
    pub fn value_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.value).ok()
    }
}

impl From<pb::mvccpb::KeyValue> for KeyValue {
    fn from(kv: pb::mvccpb::KeyValue) -> Self {
        KeyValue {
            key: kv.key,
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: LeaseId::new(kv.lease),
        }
    }
}

/// An etcd lease: keys attached to it are deleted when it ends. Printed in
/// hex, as etcdctl prints lease IDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(i64);

impl LeaseId {
    /// A lease ID as etcd numbers them; `None` for 0, etcd's "no lease".
    pub fn new(id: i64) -> Option<LeaseId> {
        (id != 0).then_some(LeaseId(id))
    }

    /// The number.
    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its ID.
    pub id: LeaseId,
    /// The TTL etcd granted (at least the one asked for).
    pub ttl: Duration,
}

/// What etcd knows of a lease ([`Etcd::time_to_live`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseInfo {
    /// The lease.
    pub id: LeaseId,
    /// Time left, in whole seconds.
    pub ttl: Duration,
    /// The TTL it was granted (and is renewed to).
    pub granted_ttl: Duration,
    /// The keys attached to it.
    pub keys: Vec<Vec<u8>>,
}

/// The status of the etcd member that answered ([`Etcd::status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStatus {
    /// Which endpoint answered.
    pub endpoint: String,
    /// etcd's version (`3.4.23`).
    pub version: String,
    /// The store's current revision.
    pub revision: i64,
    /// The member's ID.
    pub member_id: u64,
    /// The leader's member ID (0: no leader).
    pub leader: u64,
    /// The raft term.
    pub raft_term: u64,
    /// The size of the database file, in bytes.
    pub db_size: i64,
    /// Alarms and errors the member reports (a full database, say).
    pub errors: Vec<String>,
}

/// A key for messages: quoted, bytes outside printable ASCII escaped.
fn show_key(key: &[u8]) -> String {
    format!("\"{}\"", key.escape_ascii())
}

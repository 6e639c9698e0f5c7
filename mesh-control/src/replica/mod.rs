//! Replicas of mesh-control sharing one etcd (feature `etcd`).
//!
//! One control server is one failure away from a mesh that cannot change:
//! while it is down, no workload registers and no config is applied (the
//! clients keep routing with what they have). Several replicas, each
//! serving xDS and the admin API, share their state through etcd, so any
//! of them can stop and the others serve the same config at the same
//! version.
//!
//! # What etcd holds
//!
//! Under a prefix (`--etcd-prefix`, default [`DEFAULT_PREFIX`]):
//!
//! | key | value | written by |
//! |---|---|---|
//! | `config/resources/<Kind>/<namespace>/<name>` | one Istio resource: its YAML document, the file and line it was applied from, the file's position (JSON) | `mesh-control apply` |
//! | `config/applied` | when and what the last apply applied (JSON); rewritten by every apply, so that an apply conditioned on an older revision fails even when the only change since was a deletion | `mesh-control apply` |
//! | `registrations/<lease>` | one registration (JSON, as a data directory stores it), attached to an etcd lease of its TTL; `<lease>` is the etcd lease ID in hex, which is the `lease_id` the workload renews | the replica that took `POST /v1/endpoints` |
//! | `ca/root` | the CA root every replica signs with: its certificate, and its key sealed with AES-256-GCM (`ca/shared.rs`) | the first replica started with `--join-tokens` and `--ca-key-encryption-key` |
//!
//! # Config
//!
//! `mesh-control apply DIR...` reads the directories as `serve --config`
//! would, judges them as `check` does — against the registrations etcd
//! holds, so a route to a host only registrations provide is valid while
//! one is registered — and writes every resource that changed, and deletes
//! every one the directories no longer hold, in one transaction
//! conditioned on nothing under `config/` having changed since the
//! revision it read. A config with any problem writes nothing; a
//! concurrent apply makes the later one fail and write nothing. Replicas
//! never read config directories: they read the resources from etcd as if
//! they were files (problems at the applied file's line) and keep the last
//! good version of each, as a server reading files does, so a resource
//! written to etcd by other means that does not validate leaves the one in
//! force alone.
//!
//! # Registrations
//!
//! A registration is one etcd key attached to one etcd lease of the TTL the
//! workload asked for (etcd grants at least its minimum, about 1.5 election
//! timeouts, and the answer says what it granted). A heartbeat
//! (`PUT /v1/endpoints/<lease>`) renews the etcd lease once; a
//! deregistration revokes it; a workload that stops heartbeating loses its
//! key when the lease runs out, and etcd deletes it for every replica at
//! once. Whether a registration is allowed is checked against what etcd
//! holds at the revision written against (the write fails if a
//! registration was added since, and is judged again). Any replica may
//! renew or delete any lease: each registration carries its owner, checked
//! as one server checks it.
//!
//! # Every replica sees the same thing at the same version
//!
//! Each replica lists the prefix at start and watches it from there. Every
//! batch of changes the watch delivers (a transaction's writes come in one)
//! is applied to the replica's view, and if what a client would be served
//! changed, it is published under the etcd revision of that batch. So the
//! xDS version is the etcd revision that produced the content: two replicas
//! send the same version for the same revision, a replica that restarts
//! goes on above every version any replica sent (the revision only grows),
//! and a client that moves to another replica finds its version again. A
//! replica whose view moved on without a change keeps its version (the
//! content at the older revision is the same). One that lists the state —
//! at start, or when the watch cannot resume because etcd compacted the
//! history it would resume from — knows the store's revision, not the
//! revision of the last change under the prefix (a deletion leaves no key
//! to read it from), so it publishes under the list's revision: perhaps
//! above the version the others send for the same content, never a version
//! any replica sent for another content. The next change aligns them.
//!
//! # While etcd is unreachable
//!
//! Replicas serve the last state they saw, to the clients connected and to
//! new ones; the watch retries in the background and resumes from the
//! revision after the last one seen, so nothing written meanwhile is
//! missed. Writes are refused, never accepted locally: a registration,
//! heartbeat or deregistration is answered 503 with a message naming etcd,
//! and `apply` exits non-zero saying nothing was written. etcd itself keeps
//! leases alive across a restart of its own (their TTL starts again), so a
//! short outage does not expire workloads that could not heartbeat.

mod apply;
mod ca;
mod sync;
mod view;

pub use apply::{Applied, ApplyError, ApplyErrorKind, apply};
pub use ca::shared_ca_root;
pub(crate) use sync::Replica;

use crate::Error;

/// The prefix of mesh-control's keys in etcd when none is given.
pub const DEFAULT_PREFIX: &str = "/proxyless/";

/// Where each kind of state is kept under the prefix (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    prefix: String,
}

impl Layout {
    /// The layout under `prefix` (a trailing `/` is added if missing, so
    /// `/a` and `/ab` never share keys).
    pub(crate) fn new(prefix: &str) -> Result<Layout, Error> {
        if prefix.is_empty() {
            return Err(Error::config(format!(
                "the etcd prefix is empty; give one such as {DEFAULT_PREFIX}"
            )));
        }
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Layout { prefix })
    }

    /// Everything mesh-control keeps (what a replica watches).
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The config: resources and the apply guard (what an apply is
    /// conditioned on).
    pub(crate) fn config(&self) -> String {
        format!("{}config/", self.prefix)
    }

    /// The resources.
    pub(crate) fn resources(&self) -> String {
        format!("{}config/resources/", self.prefix)
    }

    /// One resource.
    pub(crate) fn resource(&self, kind: &str, namespace: &str, name: &str) -> String {
        format!("{}{kind}/{namespace}/{name}", self.resources())
    }

    /// The guard every apply rewrites.
    pub(crate) fn applied(&self) -> String {
        format!("{}config/applied", self.prefix)
    }

    /// The registrations.
    pub(crate) fn registrations(&self) -> String {
        format!("{}registrations/", self.prefix)
    }

    /// One registration, by the etcd lease it is attached to.
    pub(crate) fn registration(&self, lease: crate::etcd::LeaseId) -> String {
        format!("{}{lease}", self.registrations())
    }

    /// The shared CA root.
    pub(crate) fn ca_root(&self) -> String {
        format!("{}ca/root", self.prefix)
    }
}

/// The lease a `lease_id` of the admin API names (etcd's lease ID in hex);
/// `None` for anything else.
pub(crate) fn lease_of(lease_id: &str) -> Option<crate::etcd::LeaseId> {
    if lease_id.is_empty() || lease_id.len() > 16 {
        return None;
    }
    u64::from_str_radix(lease_id, 16)
        .ok()
        .and_then(|id| i64::try_from(id).ok())
        .and_then(crate::etcd::LeaseId::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_live_under_one_prefix() {
        let layout = Layout::new("/mesh").unwrap();
        assert_eq!(layout.prefix(), "/mesh/");
        assert_eq!(
            layout.resource("VirtualService", "shop", "catalog"),
            "/mesh/config/resources/VirtualService/shop/catalog"
        );
        assert!(layout.applied().starts_with(&layout.config()));
        assert!(layout.resources().starts_with(&layout.config()));
        let lease = crate::etcd::LeaseId::new(0x694d_7b2c_1a2b_3c4d).unwrap();
        assert_eq!(
            layout.registration(lease),
            "/mesh/registrations/694d7b2c1a2b3c4d"
        );
        assert_eq!(lease_of("694d7b2c1a2b3c4d"), Some(lease));
        assert_eq!(layout.ca_root(), "/mesh/ca/root");
        assert!(Layout::new("").is_err());
    }

    #[test]
    fn only_etcd_lease_ids_name_leases() {
        for bad in [
            "",
            "0",
            "zz",
            "-1",
            "1-abc",
            "ffffffffffffffff",
            "11111111111111111",
        ] {
            assert_eq!(lease_of(bad), None, "{bad:?}");
        }
        assert_eq!(
            lease_of("7fffffffffffffff").map(|l| l.get()),
            Some(i64::MAX)
        );
    }
}

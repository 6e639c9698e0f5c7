//! DNS clusters for clients that cannot resolve them (gRPC: gRFC A37
//! accepts EDS, LOGICAL_DNS and aggregate clusters only, and a STRICT_DNS
//! cluster gets the whole CDS response NACKed).
//!
//! mesh-control resolves the names of every DNS cluster of the config it
//! serves (ServiceEntry `resolution: DNS` / `DNS_ROUND_ROBIN`), and each
//! rebuild adds the answers to the snapshot as those clusters'
//! ClusterLoadAssignments ([`Answers::fill`]). `dialect::grpc` then serves
//! gRPC clients the cluster as EDS, whose endpoints are these. Envoy and
//! this mesh's client get the DNS cluster itself and resolve it on their
//! own (they never subscribe to its EDS name, so the extra assignment
//! costs them nothing).
//!
//! The resolver task ([`run`]) follows the published config: it resolves
//! new names at once, then each when its answer's TTL runs out (clamped
//! to 1 s .. 5 min; a failure keeps the last answer and backs off: the
//! schedule is `mesh_core::dns::Resolutions`). When an answer changes it
//! stores the new assignments and asks for a rebuild
//! ([`Shared::rebuild_soon`], as a registration does), which publishes a
//! new version and pushes it. It resolves the clusters of the shared
//! translation; a DNS host only some per-node views see (`exportTo`) is
//! resolved all the same, since views are translated from the same
//! ServiceEntries.
//!
//! The DNS server: `serve --dns-server ip:port` / `ServerBuilder::
//! dns_server`, else the system's (`/etc/resolv.conf`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::Snapshot;
use mesh_core::model::{ClusterLoadAssignment, Name};
use mesh_dns::DnsRounds;

use crate::state::{Locked, Shared};

/// The latest answers, as assignments by EDS name.
#[derive(Debug, Default)]
pub(crate) struct Answers {
    resolved: Locked<BTreeMap<Name, Arc<ClusterLoadAssignment>>>,
}

impl Answers {
    /// Adds the assignment of each DNS cluster of `snapshot` resolved so far.
    pub(crate) fn fill(&self, snapshot: &mut Snapshot) {
        let resolved = self.resolved.lock();
        if resolved.is_empty() {
            return;
        }
        let dns: Vec<Name> = snapshot
            .clusters
            .values()
            .filter(|c| c.discovery.dns().is_some())
            .map(|c| c.eds_service_name.clone())
            .collect();
        for name in dns {
            if let Some(cla) = resolved.get(&name) {
                snapshot.endpoints.insert(name, cla.clone());
            }
        }
    }

    /// Stores `resolved`; false when nothing changed.
    fn set(&self, resolved: BTreeMap<Name, Arc<ClusterLoadAssignment>>) -> bool {
        let mut current = self.resolved.lock();
        if *current == resolved {
            return false;
        }
        *current = resolved;
        true
    }
}

/// A view's snapshot gets the assignments of its DNS clusters from the
/// shared one (`base`), where [`Answers::fill`] put them.
pub(crate) fn carry_over(view: &mut Snapshot, base: &Snapshot) {
    let dns: Vec<Name> = view
        .clusters
        .values()
        .filter(|c| c.discovery.dns().is_some())
        .map(|c| c.eds_service_name.clone())
        .collect();
    for name in dns {
        if let Some(cla) = base.endpoints.get(&name) {
            view.endpoints.insert(name, cla.clone());
        }
    }
}

/// The resolver task: runs until the server stops.
pub(crate) async fn run(shared: Arc<Shared>, server: Option<SocketAddr>) {
    let mut served = shared.served.subscribe();
    let mut stop = shared.stop.subscribe();
    let mut rounds = DnsRounds::new(server, "gRPC clients");
    loop {
        let snapshot = served.borrow_and_update().clone();
        let resolved = rounds
            .round(snapshot.snapshot.clusters.values().map(|c| &**c))
            .await;
        drop(snapshot);
        if shared.dns.set(resolved) {
            shared.rebuild_soon().await;
            // The rebuild we asked for is not news.
            served.borrow_and_update();
        }
        tokio::select! {
            () = rounds.sleep() => {}
            changed = served.changed() => if changed.is_err() {
                return;
            },
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

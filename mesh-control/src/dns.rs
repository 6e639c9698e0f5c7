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
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use mesh_core::Snapshot;
use mesh_core::dns::{Resolutions, dns_clusters};
use mesh_core::model::{ClusterLoadAssignment, Name};

use crate::state::{Locked, Shared};

/// How long one lookup may take before it counts as failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A resolver asking `server`, else the system's configuration.
fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
    let mut builder = match server {
        Some(addr) => {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            let config = ResolverConfig::from_parts(
                None,
                Vec::new(),
                vec![NameServerConfig::new(addr.ip(), true, vec![udp, tcp])],
            );
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        }
        None => TokioResolver::builder_tokio()
            .map_err(|e| format!("cannot read the system's DNS configuration: {e}"))?,
    };
    builder.options_mut().timeout = LOOKUP_TIMEOUT;
    builder
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// One lookup: the addresses and how long they live; a name that does
/// not exist is an empty answer, not an error.
async fn lookup(
    resolver: &TokioResolver,
    name: &str,
) -> Result<(Vec<IpAddr>, Option<Duration>), String> {
    let fqdn = if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    };
    match tokio::time::timeout(LOOKUP_TIMEOUT * 2, resolver.lookup_ip(fqdn.as_str())).await {
        Err(_) => Err(format!(
            "resolving {name}: no answer within {:?}",
            LOOKUP_TIMEOUT * 2
        )),
        Ok(Ok(answer)) => {
            let ttl = answer
                .valid_until()
                .checked_duration_since(Instant::now())
                .unwrap_or_default();
            Ok((answer.iter().collect(), Some(ttl)))
        }
        Ok(Err(e)) if e.is_no_records_found() => Ok((Vec::new(), None)),
        Ok(Err(e)) => Err(format!("resolving {name}: {e}")),
    }
}

/// The resolver task: runs until the server stops.
pub(crate) async fn run(shared: Arc<Shared>, server: Option<SocketAddr>) {
    let mut served = shared.served.subscribe();
    let mut stop = shared.stop.subscribe();
    let mut resolver: Option<TokioResolver> = None;
    let mut names = Resolutions::default();
    loop {
        let snapshot = served.borrow_and_update().clone();
        let (clusters, wanted) = dns_clusters(snapshot.snapshot.clusters.values().map(|c| &**c));
        drop(snapshot);
        names.want(&wanted, Instant::now());
        if !wanted.is_empty() {
            if resolver.is_none() {
                match self::resolver(server) {
                    Ok(r) => resolver = Some(r),
                    Err(e) => tracing::warn!("DNS clusters are not resolved for gRPC clients: {e}"),
                }
            }
            if let Some(r) = &resolver {
                // The schedule, not the cache, decides when to ask again.
                r.clear_cache();
                for name in names.due(Instant::now()) {
                    match lookup(r, &name).await {
                        Ok((addresses, ttl)) => {
                            names.answered(&name, addresses, ttl, Instant::now());
                        }
                        Err(e) => {
                            tracing::warn!("{e}: its endpoints stay as they were");
                            names.failed(&name, Instant::now());
                        }
                    }
                }
            }
        }
        let resolved: BTreeMap<Name, Arc<ClusterLoadAssignment>> = clusters
            .iter()
            .map(|(eds, dns)| (eds.clone(), Arc::new(names.assignment(eds.clone(), dns))))
            .collect();
        if shared.dns.set(resolved) {
            shared.rebuild_soon().await;
            // The rebuild we asked for is not news.
            served.borrow_and_update();
        }
        let wake = match names.next_due() {
            Some(at) if resolver.is_some() => Some(tokio::time::Instant::from_std(at)),
            Some(_) => Some(tokio::time::Instant::now() + Duration::from_secs(5)),
            None => None,
        };
        tokio::select! {
            () = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
            changed = served.changed() => if changed.is_err() {
                return;
            },
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

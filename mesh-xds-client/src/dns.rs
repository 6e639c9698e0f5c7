//! DNS clusters (STRICT_DNS / LOGICAL_DNS, from Istio ServiceEntries with
//! `resolution: DNS` / `DNS_ROUND_ROBIN`): this client resolves their
//! names itself and publishes each answer as the cluster's endpoints, so
//! the balancer sees a DNS cluster exactly as an EDS one.
//!
//! A task next to the ADS driver keeps every name of the DNS clusters in
//! the config resolved: at once when a cluster appears, then when its
//! answer's TTL runs out (clamped to 1 s .. 5 min; failures keep the last
//! answer and back off: the schedule is `mesh_core::dns::Resolutions`).
//! Nothing is resolved on the request path: a request reads the
//! published snapshot as always. When an answer changes, the snapshot is
//! republished with the new endpoints and [`crate::XdsClient::changes`]
//! bumps.
//!
//! Publishing goes through one [`Overlay`]: the ADS driver stores the
//! snapshot it built (the base, without DNS endpoints) there, the DNS task
//! its answers, and each store publishes base + answers under one lock,
//! so neither can publish over the other's newer half.
//!
//! The DNS server: `ClientOptions::dns_server`, else the environment's
//! `PROXYLESS_DNS_SERVER` (`ip:port`, or `ip` for port 53), else the
//! system's (`/etc/resolv.conf`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use mesh_core::Snapshot;
use mesh_core::model::{ClusterLoadAssignment, Name};
use mesh_dns::DnsRounds;
use tokio::sync::watch;

/// The environment variable naming the DNS server (`ip:port` or `ip`).
pub const DNS_SERVER_ENV_VAR: &str = "PROXYLESS_DNS_SERVER";

/// The published snapshot's two halves (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct Overlay {
    inner: Mutex<Halves>,
}

#[derive(Debug, Default)]
struct Halves {
    /// The ADS driver's last snapshot.
    base: Arc<Snapshot>,
    /// The DNS clusters' endpoints, by EDS name.
    resolved: BTreeMap<Name, Arc<ClusterLoadAssignment>>,
}

impl Halves {
    fn merged(&self) -> Arc<Snapshot> {
        let wanted = self
            .base
            .clusters
            .values()
            .filter(|c| c.discovery.dns().is_some())
            .filter_map(|c| {
                self.resolved
                    .get(&c.eds_service_name)
                    .map(|cla| (c.eds_service_name.clone(), cla.clone()))
            })
            .collect::<Vec<_>>();
        if wanted.is_empty() {
            return self.base.clone();
        }
        let mut snapshot = (*self.base).clone();
        snapshot.endpoints.extend(wanted);
        Arc::new(snapshot)
    }
}

impl Overlay {
    /// Publishes `base` (from the ADS driver) into `target`, with the DNS
    /// answers.
    pub(crate) fn publish(&self, target: &ArcSwap<Snapshot>, base: Arc<Snapshot>) {
        let mut halves = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        halves.base = base;
        target.store(halves.merged());
    }

    /// The base snapshot (what the DNS task resolves for).
    fn base(&self) -> Arc<Snapshot> {
        self.inner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .base
            .clone()
    }

    /// Publishes the DNS answers `resolved` into `target`, over the
    /// current base; false when they are what is published already.
    fn set_resolved(
        &self,
        target: &ArcSwap<Snapshot>,
        resolved: BTreeMap<Name, Arc<ClusterLoadAssignment>>,
    ) -> bool {
        let mut halves = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if halves.resolved == resolved {
            return false;
        }
        halves.resolved = resolved;
        target.store(halves.merged());
        true
    }
}

/// `ip:port` or `ip` (port 53).
pub(crate) fn parse_server(value: &str) -> Result<SocketAddr, String> {
    let value = value.trim();
    value
        .parse::<SocketAddr>()
        .or_else(|_| value.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{DNS_SERVER_ENV_VAR}={value:?}: expected ip:port or ip"))
}

/// What the DNS task publishes through.
pub(crate) struct Target {
    pub(crate) snapshot: Weak<crate::client::Published>,
    pub(crate) changes: Weak<watch::Sender<u64>>,
}

/// The DNS task: runs until the client's driver is gone (its `changes`
/// sender dropped).
pub(crate) async fn run(
    server: Option<SocketAddr>,
    target: Target,
    mut changes: watch::Receiver<u64>,
) {
    let mut rounds = DnsRounds::new(server, "this workload");
    // Whether the last round had DNS clusters. A config without any (the
    // usual mesh: EDS clusters only) runs no round at all, so that a
    // process that has no use for the resolver does not run (and fault in)
    // its code on every config change; one more round after the last DNS
    // cluster went away clears its endpoints.
    let mut active = false;
    loop {
        let Some(published) = target.snapshot.upgrade() else {
            return;
        };
        let base = published.dns.base();
        let wanted = base.clusters.values().any(|c| c.discovery.dns().is_some());
        if wanted || active {
            active = wanted;
            let resolved = rounds.round(base.clusters.values().map(|c| &**c)).await;
            if published.dns.set_resolved(&published.snapshot, resolved) {
                if let Some(sender) = target.changes.upgrade() {
                    sender.send_modify(|v| *v = v.wrapping_add(1));
                }
                // Our own bump is not news.
                changes.borrow_and_update();
            }
        }
        drop(published);
        tokio::select! {
            // Nothing is due without DNS clusters (the round just run
            // forgot every name).
            () = rounds.sleep(), if active => {}
            changed = changes.changed() => if changed.is_err() {
                return;
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_core::model::{Cluster, Discovery, DnsDiscovery, DnsHost, Protocol};

    use super::*;

    fn dns_snapshot(version: &str) -> Arc<Snapshot> {
        let mut snapshot = Snapshot::default();
        let cluster = Cluster {
            discovery: Discovery::Dns(DnsDiscovery {
                hosts: Arc::from([DnsHost {
                    name: "api.example.com".into(),
                    port: 443,
                }]),
                logical: false,
            }),
            ..Cluster::new("c", Protocol::Http1)
        };
        snapshot.clusters.insert("c".into(), Arc::new(cluster));
        snapshot.versions.clusters = version.into();
        Arc::new(snapshot)
    }

    #[test]
    fn either_half_republishes_with_the_other() {
        let overlay = Overlay::default();
        let target = ArcSwap::from_pointee(Snapshot::default());
        overlay.publish(&target, dns_snapshot("1"));
        assert!(target.load().endpoints.is_empty(), "no answer yet");
        let cla = Arc::new(mesh_core::dns::assignment(
            "c".into(),
            target.load().clusters["c"].discovery.dns().unwrap(),
            &[Arc::from(["10.0.0.1".parse::<IpAddr>().unwrap()])],
        ));
        let answers = BTreeMap::from([(Name::from("c"), cla.clone())]);
        assert!(overlay.set_resolved(&target, answers.clone()));
        assert!(!overlay.set_resolved(&target, answers), "unchanged");
        assert_eq!(target.load().endpoints["c"], cla);
        // A new config from the server keeps the answer...
        overlay.publish(&target, dns_snapshot("2"));
        assert_eq!(&*target.load().versions.clusters, "2");
        assert_eq!(target.load().endpoints["c"], cla);
        // ...until the cluster is gone.
        overlay.publish(&target, Arc::new(Snapshot::default()));
        assert!(target.load().endpoints.is_empty());
    }

    #[test]
    fn the_server_is_ip_port_or_ip() {
        assert_eq!(parse_server("127.0.0.1:5353").unwrap().port(), 5353);
        assert_eq!(parse_server(" ::1 ").unwrap().port(), 53);
        assert!(
            parse_server("dns.example.com")
                .unwrap_err()
                .contains("ip:port")
        );
    }
}

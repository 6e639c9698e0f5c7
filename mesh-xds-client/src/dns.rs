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
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::{TokioResolver, net::runtime::TokioRuntimeProvider};
use mesh_core::Snapshot;
use mesh_core::dns::{Resolutions, dns_clusters};
use mesh_core::model::{ClusterLoadAssignment, Name};
use tokio::sync::watch;

/// The environment variable naming the DNS server (`ip:port` or `ip`).
pub const DNS_SERVER_ENV_VAR: &str = "PROXYLESS_DNS_SERVER";

/// How long one lookup may take before it counts as failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A resolver asking `server`, else the system's configuration.
pub(crate) fn resolver(server: Option<SocketAddr>) -> Result<TokioResolver, String> {
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
    let options: &mut ResolverOpts = builder.options_mut();
    options.timeout = LOOKUP_TIMEOUT;
    builder
        .build()
        .map_err(|e| format!("cannot build the DNS resolver: {e}"))
}

/// `ip:port` or `ip` (port 53).
pub(crate) fn parse_server(value: &str) -> Result<SocketAddr, String> {
    let value = value.trim();
    value
        .parse::<SocketAddr>()
        .or_else(|_| value.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("{DNS_SERVER_ENV_VAR}={value:?}: expected ip:port or ip"))
}

/// One lookup: the addresses and how long they live; a name that does
/// not exist is an empty answer, not an error.
pub(crate) async fn lookup(
    resolver: &TokioResolver,
    name: &str,
) -> Result<(Vec<IpAddr>, Option<Duration>), String> {
    // A trailing dot: the name is absolute, no search domains are tried.
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
    let mut resolver: Option<TokioResolver> = None;
    let mut names = Resolutions::default();
    loop {
        let Some(published) = target.snapshot.upgrade() else {
            return;
        };
        let base = published.dns.base();
        let (clusters, wanted) = dns_clusters(base.clusters.values().map(|c| &**c));
        names.want(&wanted, Instant::now());
        if !wanted.is_empty() {
            if resolver.is_none() {
                match self::resolver(server) {
                    Ok(r) => resolver = Some(r),
                    Err(e) => tracing::warn!("DNS clusters are not resolved: {e}"),
                }
            }
            if let Some(r) = &resolver {
                // Each round asks afresh: the schedule, not the cache,
                // decides when an answer is stale.
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
        if published.dns.set_resolved(&published.snapshot, resolved) {
            if let Some(sender) = target.changes.upgrade() {
                sender.send_modify(|v| *v = v.wrapping_add(1));
            }
            // Our own bump is not news.
            changes.borrow_and_update();
        }
        drop(published);
        let wake = match names.next_due() {
            Some(at) if resolver.is_some() => Some(tokio::time::Instant::from_std(at)),
            // No resolver: tried again in 5 s (or at the next change).
            Some(_) => Some(tokio::time::Instant::now() + Duration::from_secs(5)),
            // No DNS cluster: nothing to do until the config changes.
            None => None,
        };
        tokio::select! {
            () = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {}
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

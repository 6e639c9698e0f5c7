//! DNS clusters resolved with their TTLs: the I/O half of
//! [`mesh_core::dns`], shared by the two places that resolve them.
//!
//! - `mesh-xds-client` resolves a DNS cluster (a `ServiceEntry` with
//!   `resolution: DNS` / `DNS_ROUND_ROBIN`, served to our client as a
//!   `STRICT_DNS` / `LOGICAL_DNS` cluster) for the workload itself;
//! - mesh-control resolves the same clusters for gRPC clients, which read
//!   every cluster as EDS, and serves the answers as endpoints.
//!
//! Which names are due, when an answer is stale and what a failure keeps
//! are decisions of the pure [`Resolutions`] schedule in mesh-core; this
//! crate only asks the resolver and feeds the answers back. It lives below
//! both users because mesh-control does not depend on the client crates
//! (the same reason `mesh-fs` exists).
//!
//! Each round clears hickory's cache before asking: the schedule, not the
//! cache, decides when a name is asked again, so a record that changes is
//! seen one TTL later, never two.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use mesh_core::dns::{Resolutions, dns_clusters};
use mesh_core::model::{Cluster, ClusterLoadAssignment, Name};

/// How long one lookup may take (each attempt; a lookup gives up after
/// twice this).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait before trying again when no resolver could be built
/// (the system's configuration unreadable).
const NO_RESOLVER_RETRY: Duration = Duration::from_secs(5);

/// The DNS clusters of a changing config, resolved round after round.
pub struct DnsRounds {
    server: Option<SocketAddr>,
    resolver: Option<TokioResolver>,
    names: Resolutions,
    /// Who resolves, for the log line when no resolver can be built.
    user: &'static str,
}

impl std::fmt::Debug for DnsRounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsRounds")
            .field("server", &self.server)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl DnsRounds {
    /// Rounds asking `server`, else the system's configuration; `user`
    /// names who the answers are for in the log ("gRPC clients").
    pub fn new(server: Option<SocketAddr>, user: &'static str) -> Self {
        DnsRounds {
            server,
            resolver: None,
            names: Resolutions::default(),
            user,
        }
    }

    /// One round over `clusters` (a snapshot's): the names due are asked
    /// again, and every DNS cluster's endpoints are answered, keyed by the
    /// cluster's EDS name. A failed lookup keeps the name's last answer (and
    /// is logged); a name that does not exist has no endpoints.
    pub async fn round<'a>(
        &mut self,
        clusters: impl IntoIterator<Item = &'a Cluster>,
    ) -> BTreeMap<Name, Arc<ClusterLoadAssignment>> {
        let (clusters, wanted) = dns_clusters(clusters);
        self.names.want(&wanted, Instant::now());
        if !wanted.is_empty() {
            if self.resolver.is_none() {
                match resolver(self.server) {
                    Ok(r) => self.resolver = Some(r),
                    Err(e) => {
                        tracing::warn!("DNS clusters are not resolved for {}: {e}", self.user)
                    }
                }
            }
            if let Some(r) = &self.resolver {
                r.clear_cache();
                for name in self.names.due(Instant::now()) {
                    match lookup(r, &name).await {
                        Ok((addresses, ttl)) => {
                            self.names.answered(&name, addresses, ttl, Instant::now());
                        }
                        Err(e) => {
                            tracing::warn!("{e}: its endpoints stay as they were");
                            self.names.failed(&name, Instant::now());
                        }
                    }
                }
            }
        }
        clusters
            .iter()
            .map(|(eds, dns)| {
                (
                    eds.clone(),
                    Arc::new(self.names.assignment(eds.clone(), dns)),
                )
            })
            .collect()
    }

    /// When the next round is due: a name's TTL running out, a retry when
    /// no resolver could be built, or never (no DNS cluster: the next
    /// config change starts a round).
    pub fn next_wake(&self) -> Option<tokio::time::Instant> {
        match self.names.next_due() {
            Some(at) if self.resolver.is_some() => Some(tokio::time::Instant::from_std(at)),
            Some(_) => Some(tokio::time::Instant::now() + NO_RESOLVER_RETRY),
            None => None,
        }
    }

    /// Sleeps until [`DnsRounds::next_wake`] (forever when none).
    pub async fn sleep(&self) {
        match self.next_wake() {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
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

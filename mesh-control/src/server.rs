//! Running a control server: in a process of its own (`mesh-control serve`)
//! or embedded in tests and demos ([`Server::builder`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::ClientStatusDiscoveryServiceServer;
use futures_util::StreamExt;
use notify::Watcher;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::Error;
use crate::ads::Ads;
use crate::ca::CertificateAuthority;
use crate::ca::serving::ServingTls;
use crate::config::{ConfigStore, MeshOptions};
use crate::debounce::{Action, Change, Debounce, Input};
use crate::persist::{LEASE_FLUSH, LocalDir, Store, Stored, Versions};
use crate::registry::Registry;
use crate::state::{Locked, Shared};

/// How long [`ServerHandle::shutdown`] lets connections drain (admin
/// requests in flight, ADS streams that ignore their end) before closing
/// them.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Entry point for an embedded control server.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// A builder with the defaults of `mesh-control serve`, except that the
    /// addresses default to ephemeral loopback ports (tests, demos).
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            config_dirs: Vec::new(),
            xds_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            debounce: Duration::from_millis(10),
            registration_debounce: crate::state::REGISTRATION_DEBOUNCE,
            dns_server: None,
            lease_check: Duration::from_millis(100),
            stale_after: Duration::from_secs(5),
            options: MeshOptions::default(),
            ca: None,
            trust_bundle_file: None,
            tls_dns_names: Vec::new(),
            data_dir: None,
            insecure_admin: false,
            prometheus: None,
            admin_max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS,
            admin_header_timeout: DEFAULT_ADMIN_HEADER_TIMEOUT,
            ads_max_concurrent_streams: DEFAULT_ADS_MAX_CONCURRENT_STREAMS,
            ads_max_names: crate::ads::DEFAULT_MAX_NAMES_PER_SUBSCRIPTION,
            #[cfg(feature = "etcd")]
            etcd: None,
            #[cfg(feature = "etcd")]
            etcd_prefix: crate::replica::DEFAULT_PREFIX.to_string(),
        }
    }
}

/// Settings of a control server.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    config_dirs: Vec<PathBuf>,
    xds_addr: SocketAddr,
    admin_addr: SocketAddr,
    debounce: Duration,
    registration_debounce: Duration,
    /// The DNS server DNS clusters are resolved through (`None`: the
    /// system's).
    dns_server: Option<SocketAddr>,
    lease_check: Duration,
    stale_after: Duration,
    options: MeshOptions,
    ca: Option<Arc<CertificateAuthority>>,
    trust_bundle_file: Option<PathBuf>,
    tls_dns_names: Vec<String>,
    data_dir: Option<PathBuf>,
    insecure_admin: bool,
    /// The Prometheus the graph is read from (`--prometheus`).
    prometheus: Option<String>,
    admin_max_connections: usize,
    admin_header_timeout: Duration,
    ads_max_concurrent_streams: u32,
    ads_max_names: usize,
    #[cfg(feature = "etcd")]
    etcd: Option<crate::etcd::Etcd>,
    #[cfg(feature = "etcd")]
    etcd_prefix: String,
}

/// The default of [`ServerBuilder::admin_max_connections`].
const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 1024;
/// The default of [`ServerBuilder::admin_header_timeout`].
const DEFAULT_ADMIN_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an admin connection may stay idle after a request (keep-alive)
/// before it is closed: longer than the header timeout, so that a workload
/// heartbeating its lease keeps its connection, still bounded.
const ADMIN_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The default of [`ServerBuilder::ads_max_concurrent_streams`]: a client
/// needs one ADS stream, a CSDS tool one more; gRPC's own servers default to
/// 100 too.
const DEFAULT_ADS_MAX_CONCURRENT_STREAMS: u32 = 100;
/// HTTP/2 streams a client may open and reset before its requests are
/// accepted (h2's default, made explicit): the "rapid reset" flood
/// (CVE-2023-44487) ends in GOAWAY.
const ADS_MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the server may reset for a client's protocol errors on one
/// connection before it sends GOAWAY (hyper's own default, which tonic
/// leaves off unless set: CVE-2023-44487's variants that make the server
/// reset).
const ADS_MAX_LOCAL_ERROR_RESETS: usize = 1024;

impl ServerBuilder {
    /// A directory of Istio YAML to serve and watch. Calling it again adds
    /// another: the directories are read as one config, in the order given
    /// (which orders VirtualServices, see [`crate::config`]), each one's
    /// `*.yaml` / `*.yml` files but not its subdirectories. A resource
    /// defined in two of them is reported like one defined twice in one.
    pub fn config_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config_dirs.push(dir.into());
        self
    }

    /// Several directories at once: [`ServerBuilder::config_dir`] for each.
    pub fn config_dirs(mut self, dirs: impl IntoIterator<Item = impl Into<PathBuf>>) -> Self {
        self.config_dirs.extend(dirs.into_iter().map(Into::into));
        self
    }

    /// Where ADS listens (gRPC).
    pub fn xds_addr(mut self, addr: SocketAddr) -> Self {
        self.xds_addr = addr;
        self
    }

    /// Where the admin HTTP API listens.
    pub fn admin_addr(mut self, addr: SocketAddr) -> Self {
        self.admin_addr = addr;
        self
    }

    /// Allows the admin API on an address beyond loopback without a CA
    /// (`--insecure-admin`): registration is then open to anyone who can
    /// reach the port. Without this, `start` refuses such an address.
    pub fn insecure_admin(mut self, insecure: bool) -> Self {
        self.insecure_admin = insecure;
        self
    }

    /// The most connections the admin API holds open at once (default
    /// 1024). A connection over the cap closes the oldest one that has no
    /// request in progress (one still handshaking or sending its headers, or
    /// idle between requests), so that a flood of half-open connections
    /// cannot lock out `/healthz` or a registration; when every connection
    /// has a request in progress, new ones wait in the listen backlog.
    pub fn admin_max_connections(mut self, max: usize) -> Self {
        self.admin_max_connections = max.max(1);
        self
    }

    /// How long an admin connection may take from accept (TLS handshake
    /// included) to the end of its first request's headers, default 10 s;
    /// a slower one is closed (slowloris). After a request it may idle 60 s
    /// before the next one.
    pub fn admin_header_timeout(mut self, timeout: Duration) -> Self {
        self.admin_header_timeout = timeout;
        self
    }

    /// The most concurrent HTTP/2 streams (ADS, CSDS calls) one client
    /// connection may open, default 100 (`SETTINGS_MAX_CONCURRENT_STREAMS`):
    /// a stream over it is refused with `REFUSED_STREAM`.
    pub fn ads_max_concurrent_streams(mut self, max: u32) -> Self {
        self.ads_max_concurrent_streams = max.max(1);
        self
    }

    /// The most resource names one ADS subscription (one type on one stream)
    /// may hold, default 10,000: a request over it ends the stream with
    /// `RESOURCE_EXHAUSTED` saying so.
    pub fn ads_max_names_per_subscription(mut self, max: usize) -> Self {
        self.ads_max_names = max.max(1);
        self
    }

    /// The config watcher's debounce window (default 10 ms). A save is
    /// read at once, when the file is closed after writing or renamed into
    /// place (the leading edge), and applied if that read is clean: no
    /// problem that is not already standing, nothing removed. What changes
    /// after it is read once more when the directory has been quiet this
    /// long (the trailing edge), and so is a read that was not clean:
    /// editors write files in several steps, so a problem is reported only
    /// when the trailing read still finds it. Changes that never finish a
    /// write (a deletion, a chmod) are read on the trailing edge only.
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
        self
    }

    /// The least time between two full translations asked for by
    /// registrations and deregistrations (default 20 ms): during a storm of
    /// registrations, each translation covers every registration that
    /// arrived while the previous one ran, so n registrations in a burst of
    /// d cost at most d / debounce + 2 translations instead of n. A lone
    /// registration is not delayed; under load one waits at most this much
    /// longer for its 201. Zero still coalesces (one translation at a time).
    pub fn registration_debounce(mut self, debounce: Duration) -> Self {
        self.registration_debounce = debounce;
        self
    }

    /// The DNS server through which the names of DNS clusters (ServiceEntry
    /// `resolution: DNS`) are resolved for the gRPC clients, which are
    /// served them as EDS (see `dns.rs`). Default: the system's
    /// (`/etc/resolv.conf`).
    pub fn dns_server(mut self, server: SocketAddr) -> Self {
        self.dns_server = Some(server);
        self
    }

    /// How often expired registration leases are swept. Default 100 ms.
    pub fn lease_check_interval(mut self, every: Duration) -> Self {
        self.lease_check = every;
        self
    }

    /// How long a client may leave a response unacknowledged before
    /// `/status` calls it stale. Default 5 s.
    pub fn stale_after(mut self, after: Duration) -> Self {
        self.stale_after = after;
        self
    }

    /// Domain suffix and root namespace.
    pub fn options(mut self, options: MeshOptions) -> Self {
        self.options = options;
        self
    }

    /// Turns security on: the CA issues workload certificates over the
    /// admin API (`POST /v1/certificates`), registration requires a join
    /// token or a client certificate and an identity allowed to back the
    /// service, and ADS and the admin API are served over TLS with a
    /// certificate from this CA (renewed at half-life). The mesh's trust
    /// domain becomes the CA's.
    pub fn ca(mut self, ca: impl Into<Arc<CertificateAuthority>>) -> Self {
        self.ca = Some(ca.into());
        self
    }

    /// Reads the service graph (`GET /v1/graph`, the `/ui` page) from the
    /// Prometheus at `url` (`http://host:port`, a path prefix allowed), as
    /// Kiali does: Istio's metrics with `reporter="source"`, scraped from
    /// the workloads, over the same 5 minutes as the embedded window
    /// (which keeps taking summaries: `GET /v1/graph?source=window`
    /// answers it). For a mesh whose workloads a Prometheus already
    /// scrapes, at a scale past one process' window. A URL that is not
    /// `http://` fails [`ServerBuilder::start`] with the reason.
    pub fn prometheus(mut self, url: impl Into<String>) -> Self {
        self.prometheus = Some(url.into());
        self
    }

    /// Where the trust bundle (PEM roots) is written for bootstraps'
    /// `ca_certificate_file`, and rewritten on a root rotation. Default: a
    /// file in a fresh directory under the system's temporary directory,
    /// removed when the server stops.
    pub fn trust_bundle_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.trust_bundle_file = Some(path.into());
        self
    }

    /// DNS names the serving certificate holds besides `localhost` (the
    /// names clients dial mesh-control by when it is not on their host).
    pub fn tls_dns_names(mut self, names: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.tls_dns_names = names.into_iter().map(Into::into).collect();
        self
    }

    /// Keeps what must survive a restart in `dir` (created, mode 0700;
    /// each file replaced atomically, mode 0600): the last good version of
    /// every resource, the leases (with their owners and expiries) and the
    /// xDS version ceiling. A server restarted on it serves the config that
    /// was in force — not an edit still on disk that was rejected — and
    /// every endpoint registered, at once, with the TTL its lease has left
    /// (a heartbeat renews the same lease), and never sends a version
    /// number it sent before with other content. Default: none, everything
    /// in memory (after a restart the YAML on disk is served as it is and
    /// workloads register again on their next heartbeat).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Makes this server a replica of the mesh whose state `etcd` holds
    /// (feature `etcd`; see [`crate::replica`]): the config is read from
    /// etcd (written by `mesh-control apply`), not from config directories;
    /// registrations are made in etcd; versions are etcd's revisions, so
    /// every replica serves the same content under the same version. Not
    /// with [`ServerBuilder::config_dir`] nor [`ServerBuilder::data_dir`]
    /// (etcd keeps what they would). For a CA every replica shares, build
    /// it from [`crate::replica::shared_ca_root`].
    #[cfg(feature = "etcd")]
    pub fn etcd(mut self, etcd: crate::etcd::Etcd) -> Self {
        self.etcd = Some(etcd);
        self
    }

    /// The prefix of the mesh's keys in etcd (default
    /// [`crate::replica::DEFAULT_PREFIX`]): several meshes can share one
    /// etcd under different prefixes.
    #[cfg(feature = "etcd")]
    pub fn etcd_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.etcd_prefix = prefix.into();
        self
    }

    /// Binds both ports, loads what the data directory holds (if any) and
    /// the config directories, and starts serving; no ADS request is
    /// answered before both are loaded. A config with problems still starts
    /// (the problems are logged and shown in `/status`); a missing
    /// directory, or a data directory that cannot be read, is an error.
    pub async fn start(self) -> Result<ServerHandle, Error> {
        #[cfg(feature = "etcd")]
        if self.etcd.is_some() && (!self.config_dirs.is_empty() || self.data_dir.is_some()) {
            return Err(Error::config(
                "a replica sharing etcd reads its config from etcd and keeps its state there: \
                 give it no config directory (apply the YAML with `mesh-control apply DIR... \
                 --etcd URL`) and no data directory",
            ));
        }
        if self.ca.is_none() && !self.admin_addr.ip().is_loopback() && !self.insecure_admin {
            return Err(Error::config(format!(
                "the admin API would listen on {} without a CA: anyone who can reach that \
                 address could register endpoints into the mesh and read its state. Listen on \
                 loopback (127.0.0.1), configure a CA (--ca-dir) so that callers need \
                 credentials, or pass --insecure-admin on a network you trust",
                self.admin_addr
            )));
        }
        if let Some(dir) = self.config_dirs.iter().find(|dir| !dir.is_dir()) {
            return Err(Error::config(format!(
                "config directory {} does not exist or is not a directory",
                dir.display()
            )));
        }
        let persistence: Option<Arc<dyn Store>> = match &self.data_dir {
            Some(dir) => Some(Arc::new(LocalDir::open(dir)?)),
            None => None,
        };
        let stored = match &persistence {
            Some(store) => store.load()?,
            None => Stored::default(),
        };
        let xds_listener = TcpListener::bind(self.xds_addr)
            .await
            .map_err(|e| Error::io(format!("cannot bind xDS address {}", self.xds_addr), e))?;
        let admin_listener = TcpListener::bind(self.admin_addr)
            .await
            .map_err(|e| Error::io(format!("cannot bind admin address {}", self.admin_addr), e))?;
        let xds_addr = xds_listener
            .local_addr()
            .map_err(|e| Error::io("xDS listener address", e))?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|e| Error::io("admin listener address", e))?;

        let mut options = self.options.clone();
        if let Some(ca) = &self.ca {
            options.trust_domain = ca.trust_domain().to_string();
        }
        let mut owned_dir = None;
        let tls = match &self.ca {
            None => None,
            Some(ca) => {
                let identity = mesh_core::spiffe::SpiffeId::new(
                    ca.trust_domain(),
                    &options.root_namespace,
                    "mesh-control",
                )
                .map_err(|e| Error::config(format!("mesh-control's identity: {e}")))?;
                let mut dns_names = vec!["localhost".to_string()];
                dns_names.extend(self.tls_dns_names.iter().cloned());
                let bundle_file = match &self.trust_bundle_file {
                    Some(path) => path.clone(),
                    None => {
                        let dir = std::env::temp_dir().join(format!(
                            "mesh-control-{}-{:x}",
                            std::process::id(),
                            rand::random::<u64>()
                        ));
                        owned_dir = Some(dir.clone());
                        dir.join("root-cert.pem")
                    }
                };
                let tls = ServingTls::new(
                    ca.clone(),
                    identity,
                    dns_names,
                    serving_ips(&[xds_addr, admin_addr]),
                    bundle_file,
                )?;
                Some(Arc::new(tls))
            }
        };

        let mut store = ConfigStore::new(options);
        let mut shared = match &persistence {
            None => Shared::new(store),
            Some(_) => {
                if let Some(config) = &stored.config {
                    for problem in store.restore(config) {
                        tracing::warn!("data directory: a stored resource is left out: {problem}");
                    }
                }
                let resources = store.len();
                let mut shared = Shared::new(store);
                let mut leases = 0;
                if let Some(stored) = &stored.leases {
                    let (registry, problems) =
                        Registry::import(stored, Instant::now(), SystemTime::now());
                    for problem in problems {
                        tracing::warn!("data directory: a stored lease is left out: {problem}");
                    }
                    leases = registry.registrations().len();
                    shared.registry = Locked::new(registry);
                }
                shared.versions = Locked::new(Versions::after(stored.version_ceiling));
                tracing::info!(
                    data_dir = ?self.data_dir,
                    resources,
                    leases,
                    versions_above = stored.version_ceiling,
                    "restored the last good config and the leases"
                );
                shared
            }
        };
        shared.persistence = persistence;
        shared.stale_after = self.stale_after;
        shared.set_registration_debounce(self.registration_debounce);
        shared.ca = self.ca.clone();
        if let Some(url) = &self.prometheus {
            shared.prometheus =
                Some(crate::graph_prom::PromGraph::new(url).map_err(Error::config)?);
        }
        if let Some(ca) = &self.ca {
            shared.metrics.report_rate_limits(ca.clone());
        }
        #[cfg(feature = "etcd")]
        let replica = match &self.etcd {
            Some(etcd) => {
                let (replica, state) =
                    crate::replica::Replica::new(etcd.clone(), &self.etcd_prefix)?;
                shared.shared_state = Some(state);
                shared.versions = Locked::new(crate::replica::Replica::versions());
                Some(replica)
            }
            None => None,
        };
        let shared = Arc::new(shared);
        let config_dirs: Arc<[PathBuf]> = self.config_dirs.clone().into();
        let mut servers = Vec::new();
        let mut tasks = Vec::new();
        #[cfg(feature = "etcd")]
        let replicated = replica.is_some();
        #[cfg(not(feature = "etcd"))]
        let replicated = false;
        #[cfg(feature = "etcd")]
        if let Some(replica) = replica {
            // Loaded from etcd before anything is served.
            tasks.push(replica.start(shared.clone()).await?);
        }
        // Watching before the first read, and before anything is served: an
        // edit made once a client has its first response (or during the
        // read) is never missed.
        let watcher = if config_dirs.is_empty() {
            None
        } else {
            Some(watch_dirs(
                config_dirs.clone(),
                shared.clone(),
                self.debounce,
                &mut tasks,
            )?)
        };
        if !replicated {
            reload(&shared, &config_dirs);
            shared.rebuild();
            // A first start persists its (empty) leases file too.
            shared.persist_leases().await;
        }

        let ads = AggregatedDiscoveryServiceServer::new(Ads {
            shared: shared.clone(),
            max_names: self.ads_max_names,
        })
        .max_decoding_message_size(16 << 20);
        let csds = ClientStatusDiscoveryServiceServer::new(crate::csds::Csds {
            shared: shared.clone(),
        });
        let mut stop = shared.stop.subscribe();
        let mut grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .max_concurrent_streams(Some(self.ads_max_concurrent_streams))
            .http2_max_pending_accept_reset_streams(Some(ADS_MAX_PENDING_ACCEPT_RESETS))
            .http2_max_local_error_reset_streams(Some(ADS_MAX_LOCAL_ERROR_RESETS));
        if let Some(ca) = &self.ca {
            // No ADS stream outlives the serving certificate it was opened
            // with by more than half its lifetime (it is renewed at
            // half-life): GOAWAY, and the client reconnects under the new one.
            grpc = grpc.max_connection_age(ca.default_lifetime());
        }
        let grpc = grpc.add_service(ads).add_service(csds);
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        // Graceful: on stop, tonic stops accepting and sends GOAWAY on every
        // connection, each ADS stream ends with UNAVAILABLE (ads.rs), and
        // serving ends when the connections have closed.
        match &tls {
            None => servers.push(tokio::spawn(async move {
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(xds_listener);
                if let Err(e) = grpc.serve_with_incoming_shutdown(incoming, shutdown).await {
                    tracing::error!(error = %e, "xDS server failed");
                }
            })),
            Some(tls) => {
                let (rx, accept) =
                    crate::ca::serving::incoming(xds_listener, tls.ads.clone(), "xDS");
                tasks.push(accept);
                servers.push(tokio::spawn(async move {
                    let incoming = tokio_stream::wrappers::ReceiverStream::new(rx)
                        .map(Ok::<_, std::io::Error>);
                    if let Err(e) = grpc.serve_with_incoming_shutdown(incoming, shutdown).await {
                        tracing::error!(error = %e, "xDS server failed");
                    }
                }));
            }
        }

        // Served through hyper-util directly, not `axum::serve`, for the
        // limits it cannot set: a connection cap and a header-read timeout
        // (see `admin_conn`). Graceful too: on stop, no new connections, and
        // requests in flight are answered.
        let admin = Arc::new(admin_conn::AdminServing::new(
            crate::admin::router(shared.clone()),
            tls.as_ref()
                .map(|tls| tokio_rustls::TlsAcceptor::from(tls.admin.clone())),
            self.admin_max_connections,
            self.admin_header_timeout,
        ));
        servers.push(tokio::spawn(admin_conn::serve(
            admin_listener,
            admin,
            shared.stop.subscribe(),
        )));

        // Renews the serving certificate at half-life and picks up trust
        // bundle changes (root rotations started through the CA directly).
        if let Some(tls) = &tls {
            let tls = tls.clone();
            tasks.push(tokio::spawn(async move {
                let mut wait = crate::ca::serving::POLL;
                loop {
                    tokio::time::sleep(wait).await;
                    wait = match tls.refresh() {
                        Ok(next) => next,
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot refresh mesh-control's TLS material");
                            crate::ca::serving::POLL
                        }
                    };
                }
            }));
        }

        // Expired leases go. (A replica's registrations mirror etcd's and
        // have no local expiry: etcd ends them, and this sweeps nothing.)
        let sweeper = shared.clone();
        let every = self.lease_check;
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let expired = sweeper.registry.lock().expire(Instant::now());
                if expired {
                    sweeper.leases_changed();
                    sweeper.rebuild_soon().await;
                }
            }
        }));

        // DNS clusters, resolved for the gRPC clients (crate::dns).
        tasks.push(tokio::spawn(crate::dns::run(
            shared.clone(),
            self.dns_server,
        )));

        // Renewals are written in batches, at most every LEASE_FLUSH.
        if shared.persistence.is_some() {
            let flusher = shared.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(LEASE_FLUSH);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if flusher.leases_dirty() {
                        flusher.persist_leases().await;
                    }
                }
            }));
        }

        Ok(ServerHandle {
            xds_addr,
            admin_addr,
            shared,
            tls,
            owned_dir,
            servers,
            tasks,
            config_dirs,
            _watcher: watcher,
        })
    }
}

/// Re-reads the config directories and applies what can be applied
/// (`Shared::rebuild`): each rejected change is logged at WARN once, at its
/// line, with the version kept in force; what the reload applied is logged
/// at INFO with the version it became (`config v7 applied: changed
/// VirtualService shop/catalog; added DestinationRule shop/payment`). The
/// comparison is of one fingerprint per resource, taken as the documents
/// are read.
fn reload(shared: &Shared, dirs: &[PathBuf]) {
    read_config(shared, dirs, |_| true);
}

/// Reads the config directories and judges the read
/// ([`ConfigStore::trial`]); applies it as [`reload`] describes if
/// `apply(clean)` says so, else leaves no trace of it (no log, no metric,
/// nothing in `/status`). Read, judged and applied under one lock of the
/// store, so what is applied is what was judged.
fn read_config(shared: &Shared, dirs: &[PathBuf], apply: impl FnOnce(bool) -> bool) {
    if dirs.is_empty() {
        return;
    }
    let registrations: Vec<_> = shared
        .registry
        .lock()
        .registered()
        .into_iter()
        .map(|r| r.registration)
        .collect();
    let standing = shared.diagnostics.lock().0.clone();
    let (diagnostics, resources_before) = {
        let mut store = shared.store.lock();
        let read = store.read(dirs);
        let trial = store.trial(read, &registrations, &standing);
        if !apply(trial.is_clean()) {
            return;
        }
        let resources_before = store.versions();
        (store.commit(trial), resources_before)
    };
    shared.metrics.reloads.inc();
    shared.diagnostics.lock().0 = diagnostics.clone();
    let before = shared.served.borrow().version;
    shared.rebuild();
    let changes = resources_before.changes_to(&shared.store.lock().versions());
    let after = shared.served.borrow().version;
    let rejected = shared.store.lock().rejections().to_vec();
    // A problem that is no rejection (a directory that cannot be read).
    for d in &diagnostics {
        if !rejected.iter().any(|r| r.problems.contains(d)) {
            tracing::warn!("{d}");
        }
    }
    let problems = match rejected.len() {
        0 => String::new(),
        n => format!(" ({n} change(s) rejected, kept the last good version; see /status)"),
    };
    if changes.is_empty() {
        tracing::debug!(
            version = after,
            "config reloaded: no resource changed{problems}"
        );
    } else if after != before {
        tracing::info!(
            version = after,
            "config v{after} applied: {changes}{problems}"
        );
    } else {
        tracing::info!(
            version = after,
            "config reloaded, xDS unchanged at v{after}: {changes}{problems}"
        );
    }
}

/// Watches every config directory (not its subdirectories, which are not
/// read) and reads them all: at once when a write finishes, applied if
/// that read is clean, and once more when the changes settle for
/// `debounce` (`debounce.rs` decides; this task does what it says).
fn watch_dirs(
    dirs: Arc<[PathBuf]>,
    shared: Arc<Shared>,
    debounce: Duration,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<notify::RecommendedWatcher, Error> {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Change)>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && let Some(change) = classify(&e)
        {
            // Stamped as it arrives: a read that starts later sees it.
            let _ = tx.send((Instant::now(), change));
        }
    })
    .map_err(|e| Error::config(format!("cannot watch the config directories: {e}")))?;
    for dir in dirs.iter() {
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .map_err(|e| Error::config(format!("cannot watch {}: {e}", dir.display())))?;
    }
    tasks.push(tokio::spawn(async move {
        let mut machine = Debounce::new(debounce);
        let mut timer: Option<tokio::time::Instant> = None;
        loop {
            let input = tokio::select! {
                event = rx.recv() => match event {
                    Some((at, change)) => Input::Fs { at, change },
                    None => return,
                },
                () = sleep_until(timer) => {
                    timer = None;
                    Input::Timer
                }
            };
            let mut actions = machine.step(input, Instant::now());
            // A read gives its result to the machine before anything else;
            // the machine's verdict (apply or hold) is taken under the same
            // store lock as the read.
            while let Some(edge) = follow(&actions, &mut timer) {
                let (shared, dirs) = (shared.clone(), dirs.clone());
                let read = tokio::task::spawn_blocking(move || {
                    let mut next = Vec::new();
                    read_config(&shared, &dirs, |clean| {
                        next = machine.step(Input::Read { clean }, Instant::now());
                        next.contains(&Action::Apply)
                    });
                    (machine, next)
                })
                .await;
                (machine, actions) = match read {
                    Ok(done) => done,
                    Err(e) => {
                        tracing::error!(
                            error = %e,
                            ?edge,
                            "reading the config directories failed: the next change is read"
                        );
                        timer = None;
                        (Debounce::new(debounce), Vec::new())
                    }
                };
            }
        }
    }));
    Ok(watcher)
}

/// What a watcher event says, or `None` for one that changes nothing: a
/// file opened, or closed after reading (mesh-control's own reads among
/// them), or closed after writing when the config does not read it (an
/// editor's temporary file, whose rename is what counts).
fn classify(event: &notify::Event) -> Option<Change> {
    use notify::EventKind;
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => event
            .paths
            .iter()
            .any(|p| crate::config::is_config_file(p))
            .then_some(Change::Finished),
        EventKind::Access(_) => None,
        EventKind::Modify(ModifyKind::Name(_)) => Some(Change::Finished),
        _ => Some(Change::Progress),
    }
}

/// Arms `timer` as `actions` say; returns the read they ask for, if any
/// (always their last action).
fn follow(
    actions: &[Action],
    timer: &mut Option<tokio::time::Instant>,
) -> Option<crate::debounce::Edge> {
    let mut read = None;
    for action in actions {
        match *action {
            Action::ArmTimer(at) => *timer = Some(tokio::time::Instant::from_std(at)),
            Action::Read(edge) => read = Some(edge),
            // Done under the store lock, by the read.
            Action::Apply | Action::Hold => {}
        }
    }
    read
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The IP SANs of the serving certificate: the listen addresses, with
/// loopback standing in for an unspecified one (`0.0.0.0` is dialled as
/// `127.0.0.1` on the same host).
fn serving_ips(addrs: &[SocketAddr]) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for addr in addrs {
        let ip = match addr.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips
}

/// A running control server. Dropping it stops it.
pub struct ServerHandle {
    xds_addr: SocketAddr,
    admin_addr: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<Arc<ServingTls>>,
    /// The temporary directory of the trust bundle file, removed on drop.
    owned_dir: Option<PathBuf>,
    /// The xDS and admin servers: drained on shutdown.
    servers: Vec<JoinHandle<()>>,
    /// Everything else (accept loops, sweeper, watcher, flusher): stopped.
    tasks: Vec<JoinHandle<()>>,
    /// The config directories, re-read by [`ServerHandle::reload`].
    config_dirs: Arc<[PathBuf]>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl std::fmt::Debug for ServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandle")
            .field("xds_addr", &self.xds_addr)
            .field("admin_addr", &self.admin_addr)
            .finish_non_exhaustive()
    }
}

impl ServerHandle {
    /// The address ADS listens on.
    pub fn xds_addr(&self) -> SocketAddr {
        self.xds_addr
    }

    /// The address of the admin HTTP API.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The version of the config being served (bumps on every change).
    pub fn version(&self) -> u64 {
        self.shared.served.borrow().version
    }

    /// The `/status` document.
    pub fn status(&self) -> serde_json::Value {
        crate::admin::status_json(&self.shared)
    }

    /// Re-reads the config directories now, without waiting for the watcher.
    pub fn reload(&self) {
        reload(&self.shared, &self.config_dirs);
    }

    /// A gRPC bootstrap (JSON) for a workload of this mesh: Rust clients and
    /// gRPC proxyless clients (grpc-go, grpc-java, grpcio) read the same file.
    /// With a CA, the same as [`ServerHandle::bootstrap`] with only a node id
    /// and namespace (TLS to the control server, no workload certificates).
    pub fn bootstrap_json(&self, node_id: &str, namespace: &str) -> String {
        match &self.tls {
            Some(_) => self.bootstrap(&BootstrapSpec::new(node_id, namespace)),
            None => bootstrap_json(self.xds_addr, self.admin_addr, node_id, namespace),
        }
    }

    /// A bootstrap (JSON) for the workload `spec` describes: its identity
    /// and labels in `node.metadata`, TLS to this control server when it
    /// has a CA (verified with [`ServerHandle::trust_bundle_file`]), where
    /// its certificates come from, and the server listener name template
    /// (gRFC A36).
    pub fn bootstrap(&self, spec: &BootstrapSpec) -> String {
        bootstrap_json_for(
            self.xds_addr,
            self.admin_addr,
            self.trust_bundle_file().as_deref(),
            spec,
        )
    }

    /// Serves `resource` (already encoded, possibly invalid) under `name`
    /// instead of the translated resource of that name, until
    /// [`ServerHandle::clear_raw_resources`]. For tests of NACK handling.
    #[cfg(feature = "test-util")]
    pub fn serve_raw_resource(
        &self,
        name: &str,
        resource: mesh_core::xds::Any,
    ) -> Result<(), Error> {
        let t =
            mesh_core::xds::ResourceType::from_type_url(&resource.type_url).ok_or_else(|| {
                Error::config(format!("unknown resource type {:?}", resource.type_url))
            })?;
        self.shared.raw.lock().push((t, name.to_string(), resource));
        self.shared.rebuild();
        Ok(())
    }

    /// Stops serving raw resources.
    #[cfg(feature = "test-util")]
    pub fn clear_raw_resources(&self) {
        self.shared.raw.lock().clear();
        self.shared.rebuild();
    }

    /// The CA, when security is on ([`ServerBuilder::ca`]).
    pub fn ca(&self) -> Option<&Arc<CertificateAuthority>> {
        self.shared.ca.as_ref()
    }

    /// The trust bundle (PEM roots) on disk, when security is on: what
    /// bootstraps name as `ca_certificate_file`. Rewritten on a root
    /// rotation.
    pub fn trust_bundle_file(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|t| t.bundle_file().to_path_buf())
    }

    /// The certificate chain ADS and the admin API present now (PEM), when
    /// security is on.
    pub fn serving_certificate_pem(&self) -> Option<String> {
        self.tls.as_ref().map(|t| {
            t.serving_chain()
                .iter()
                .map(|c| crate::ca::pem_encode("CERTIFICATE", c.as_ref()))
                .collect()
        })
    }

    /// Starts a root rotation of the CA (see [`CertificateAuthority::rotate_root`])
    /// and, before returning, makes new handshakes trust the new bundle and
    /// rewrites the trust bundle file.
    pub fn rotate_root(&self) -> Result<(), Error> {
        let (Some(ca), Some(tls)) = (&self.shared.ca, &self.tls) else {
            return Err(Error::config(
                "this control server has no CA; configure one with ServerBuilder::ca",
            ));
        };
        if self.shared.shared_state.is_some() {
            return Err(Error::config(
                "this replica shares its CA root with the others through etcd, and a rotation is \
                 not shared yet: it would leave the replicas signing with different roots",
            ));
        }
        ca.rotate_root()?;
        tls.refresh()?;
        Ok(())
    }

    /// What the config directories hold that is not in force: each
    /// rejected change as `file:line: ...` (as `/status` lists them under
    /// `rejected`), empty when everything on disk is applied.
    pub fn rejected(&self) -> Vec<String> {
        self.shared
            .store
            .lock()
            .rejections()
            .iter()
            .map(|r| r.to_string())
            .collect()
    }

    /// Stops gracefully, as `mesh-control serve` does on SIGTERM: stops
    /// accepting, sends GOAWAY on every connection and ends each ADS stream
    /// with `UNAVAILABLE` (clients reconnect at once: elsewhere, or here
    /// after a restart), lets admin requests in flight finish, then stops
    /// the background tasks and writes the leases a last time. Connections
    /// still open after [`SHUTDOWN_GRACE`] are closed. Returns at once when
    /// nothing is connected.
    pub async fn shutdown(mut self) {
        self.shared.stop.send_replace(true);
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        for mut server in self.servers.drain(..) {
            if tokio::time::timeout_at(deadline, &mut server)
                .await
                .is_err()
            {
                tracing::warn!(
                    "connections still open {SHUTDOWN_GRACE:?} after the stop: closing them"
                );
                server.abort();
                let _ = server.await;
            }
        }
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        self.shared.persist_leases().await;
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.write_config()).await;
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shared.stop.send_replace(true);
        for t in self.servers.iter().chain(&self.tasks) {
            t.abort();
        }
        if let Some(dir) = self.owned_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A bootstrap file's JSON for `node_id` in `namespace`, pointing at the
/// given control server.
pub fn bootstrap_json(
    xds_addr: SocketAddr,
    admin_addr: SocketAddr,
    node_id: &str,
    namespace: &str,
) -> String {
    let doc = serde_json::json!({
        "xds_servers": [{
            "server_uri": xds_addr.to_string(),
            "channel_creds": [{ "type": "insecure" }],
            "server_features": SERVER_FEATURES,
        }],
        "node": {
            "id": node_id,
            "cluster": node_id,
            "locality": {},
            "metadata": {
                "NAMESPACE": namespace,
                "PROXYLESS_ADMIN": admin_addr.to_string(),
            },
        },
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// The `server_features` of every bootstrap mesh-control writes: `xds_v3`
/// (gRPC speaks xDS v3 only with it), `ignore_resource_deletion` (gRFC A53:
/// a listener or cluster a response leaves out is kept, so a control plane
/// bug or a half-loaded config cannot take routes away from running
/// clients) and `resource_timer_is_transient_error` (gRFC A88: mesh-control
/// names missing resources in `resource_errors`, xRFC TP3, so the
/// does-not-exist timer only has to catch a slow server: 30 s, reported as
/// a transient error).
const SERVER_FEATURES: [&str; 3] = [
    "xds_v3",
    "ignore_resource_deletion",
    "resource_timer_is_transient_error",
];

/// The gRFC A36 template of server listener names.
pub const SERVER_LISTENER_TEMPLATE: &str = "grpc/server?xds.resource.listening_address=%s";

/// What a workload's bootstrap says about it ([`ServerHandle::bootstrap`],
/// [`bootstrap_json_for`]).
///
/// Every bootstrap written lists the server features `xds_v3`,
/// `ignore_resource_deletion` (gRFC A53) and
/// `resource_timer_is_transient_error` (gRFC A88). Under A88
/// (gRPC with `GRPC_EXPERIMENTAL_XDS_DATA_ERROR_HANDLING=true`) ignoring
/// deletions is the default and `ignore_resource_deletion` is ignored; a
/// workload that would rather drop a deleted or NACKed resource and fail
/// its calls opts out with the `fail_on_data_errors` server feature. Older
/// gRPC (A53) honors `ignore_resource_deletion` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootstrapSpec {
    node_id: String,
    namespace: String,
    service_account: Option<String>,
    labels: BTreeMap<String, String>,
    certificates: Option<CertificateSource>,
}

/// Where a workload's certificates come from (`certificate_providers.mesh`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertificateSource {
    /// mesh-control's CA (`mesh_ca`): the workload generates a key, sends a
    /// CSR with this join token, and renews at half-life.
    JoinToken {
        /// The join token.
        token: String,
        /// The certificate lifetime to ask for (the CA's default if absent).
        lifetime: Option<Duration>,
    },
    /// Files another issuer keeps current (`file_watcher`, gRFC A29):
    /// SPIRE, cert-manager.
    Files {
        /// The certificate chain (PEM), leaf first.
        certificate_file: PathBuf,
        /// Its private key (PEM).
        private_key_file: PathBuf,
        /// The roots to trust (PEM).
        ca_certificate_file: PathBuf,
        /// How often the files are re-read (the provider's default if absent).
        refresh_interval: Option<Duration>,
    },
}

impl BootstrapSpec {
    /// A workload `node_id` in `namespace`, without certificates.
    pub fn new(node_id: impl Into<String>, namespace: impl Into<String>) -> Self {
        BootstrapSpec {
            node_id: node_id.into(),
            namespace: namespace.into(),
            ..BootstrapSpec::default()
        }
    }

    /// `node.metadata.SERVICE_ACCOUNT`: the service account it runs as.
    pub fn service_account(mut self, service_account: impl Into<String>) -> Self {
        self.service_account = Some(service_account.into());
        self
    }

    /// One of `node.metadata.LABELS` (selected by PeerAuthentication and
    /// AuthorizationPolicy selectors, and by DestinationRule subsets).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Certificates from mesh-control's CA, obtained with `token`.
    pub fn join_token(mut self, token: impl Into<String>) -> Self {
        self.certificates = Some(CertificateSource::JoinToken {
            token: token.into(),
            lifetime: None,
        });
        self
    }

    /// Certificates from mesh-control's CA with `token`, asking for
    /// `lifetime` (short lifetimes in rotation tests).
    pub fn join_token_with_lifetime(
        mut self,
        token: impl Into<String>,
        lifetime: Duration,
    ) -> Self {
        self.certificates = Some(CertificateSource::JoinToken {
            token: token.into(),
            lifetime: Some(lifetime),
        });
        self
    }

    /// Certificates from files another issuer keeps current.
    pub fn file_watcher(
        mut self,
        certificate_file: impl Into<PathBuf>,
        private_key_file: impl Into<PathBuf>,
        ca_certificate_file: impl Into<PathBuf>,
    ) -> Self {
        self.certificates = Some(CertificateSource::Files {
            certificate_file: certificate_file.into(),
            private_key_file: private_key_file.into(),
            ca_certificate_file: ca_certificate_file.into(),
            refresh_interval: None,
        });
        self
    }

    /// Any certificate source.
    pub fn certificates(mut self, source: CertificateSource) -> Self {
        self.certificates = Some(source);
        self
    }
}

/// A duration as the bootstrap writes it: whole seconds, `"90s"` (the
/// protobuf JSON form of `google.protobuf.Duration`, which gRPC reads).
fn duration_json(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}.{:09}s", d.as_secs(), d.subsec_nanos())
    }
}

/// A bootstrap's JSON for the workload `spec` describes, pointing at the
/// given control server; `trust_bundle_file` (the control server's CA
/// roots) turns on TLS to it, with the workload's certificate files (when
/// [`CertificateSource::Files`]) as the client certificate of gRFC A65's
/// `tls` channel credentials: mesh-control with a CA serves ADS only to
/// authenticated clients.
pub fn bootstrap_json_for(
    xds_addr: SocketAddr,
    admin_addr: SocketAddr,
    trust_bundle_file: Option<&std::path::Path>,
    spec: &BootstrapSpec,
) -> String {
    let channel_creds = match trust_bundle_file {
        Some(file) => {
            let mut config =
                serde_json::json!({ "ca_certificate_file": file.display().to_string() });
            // With a CA, mesh-control refuses anonymous ADS streams. A
            // workload whose certificate is in files presents it to
            // mesh-control too (gRFC A65's client certificate, which gRPC
            // clients read); a `mesh_ca` workload sends its join token
            // instead (mesh-xds-client does; gRPC clients cannot).
            if let Some(CertificateSource::Files {
                certificate_file,
                private_key_file,
                ..
            }) = &spec.certificates
            {
                config["certificate_file"] = certificate_file.display().to_string().into();
                config["private_key_file"] = private_key_file.display().to_string().into();
            }
            serde_json::json!([{ "type": "tls", "config": config }])
        }
        None => serde_json::json!([{ "type": "insecure" }]),
    };
    let mut metadata = serde_json::Map::new();
    metadata.insert("NAMESPACE".into(), spec.namespace.clone().into());
    metadata.insert("PROXYLESS_ADMIN".into(), admin_addr.to_string().into());
    if let Some(sa) = &spec.service_account {
        metadata.insert("SERVICE_ACCOUNT".into(), sa.clone().into());
    }
    if !spec.labels.is_empty() {
        metadata.insert(
            "LABELS".into(),
            serde_json::Value::Object(
                spec.labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone().into()))
                    .collect(),
            ),
        );
    }
    let mut doc = serde_json::json!({
        "xds_servers": [{
            "server_uri": xds_addr.to_string(),
            "channel_creds": channel_creds,
            "server_features": SERVER_FEATURES,
        }],
        "node": {
            "id": spec.node_id,
            "cluster": spec.node_id,
            "locality": {},
            "metadata": metadata,
        },
        "server_listener_resource_name_template": SERVER_LISTENER_TEMPLATE,
    });
    let provider = match &spec.certificates {
        None => None,
        Some(CertificateSource::JoinToken { token, lifetime }) => {
            let mut config = serde_json::json!({ "token": token });
            if let Some(lifetime) = lifetime {
                config["lifetime"] = duration_json(*lifetime).into();
            }
            Some(serde_json::json!({ "plugin_name": "mesh_ca", "config": config }))
        }
        Some(CertificateSource::Files {
            certificate_file,
            private_key_file,
            ca_certificate_file,
            refresh_interval,
        }) => {
            let mut config = serde_json::json!({
                "certificate_file": certificate_file.display().to_string(),
                "private_key_file": private_key_file.display().to_string(),
                "ca_certificate_file": ca_certificate_file.display().to_string(),
            });
            if let Some(every) = refresh_interval {
                config["refresh_interval"] = duration_json(*every).into();
            }
            Some(serde_json::json!({ "plugin_name": "file_watcher", "config": config }))
        }
    };
    if let Some(provider) = provider {
        doc["certificate_providers"] = serde_json::json!({ "mesh": provider });
    }
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// The admin API's connections: TLS when there is a CA, HTTP/1.1 and
/// HTTP/2, with the limits a port open to a network needs (issue 13):
///
/// - a connection cap: at the cap, a new connection closes the oldest one
///   that has no request in progress (still handshaking, still sending its
///   headers, or idle between requests). Half-open connections therefore
///   cannot lock anyone out, and a request in progress is never cut; when
///   every connection has one, new connections wait in the listen backlog.
///   (nginx's `worker_connections` refuses instead, which is what lets a
///   slowloris take a server down.)
/// - a header-read timeout: a connection that has not delivered a complete
///   request head within it of being accepted (TLS handshake and HTTP/2
///   preface included) is closed; between requests it may idle
///   [`ADMIN_IDLE_TIMEOUT`]. hyper's own HTTP/1 `header_read_timeout` is
///   set too, for the heads of later requests.
mod admin_conn {
    use std::collections::BTreeMap;
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::{Duration, Instant};

    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::service::TowerToHyperService;
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::{Notify, watch};

    use super::ADMIN_IDLE_TIMEOUT;
    use crate::ca::serving::PeerInfo;

    /// What every admin connection is served with.
    pub(super) struct AdminServing {
        router: TowerToHyperService<axum::Router>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        builder: auto::Builder<TokioExecutor>,
        table: Arc<ConnTable>,
        header_timeout: Duration,
    }

    impl AdminServing {
        pub(super) fn new(
            router: axum::Router,
            tls: Option<tokio_rustls::TlsAcceptor>,
            max_connections: usize,
            header_timeout: Duration,
        ) -> AdminServing {
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            builder.http2().timer(TokioTimer::new());
            AdminServing {
                router: TowerToHyperService::new(router),
                tls,
                builder,
                table: Arc::new(ConnTable {
                    max: max_connections.max(1),
                    inner: Mutex::new(TableInner::default()),
                    freed: Arc::new(Notify::new()),
                }),
                header_timeout,
            }
        }
    }

    /// The accept loop; returns once stopped and every connection has
    /// ended (`ServerHandle::shutdown` aborts it after its grace, which
    /// drops the connections).
    pub(super) async fn serve(
        listener: TcpListener,
        serving: Arc<AdminServing>,
        stop: watch::Receiver<bool>,
    ) {
        let mut conns = tokio::task::JoinSet::new();
        let mut stopping = stop.clone();
        loop {
            let accepted = tokio::select! {
                () = async { let _ = stopping.wait_for(|s| *s).await; } => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                accepted = listener.accept() => accepted,
            };
            let (tcp, addr) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "admin: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let guard = tokio::select! {
                () = async { let _ = stopping.wait_for(|s| *s).await; } => break,
                guard = serving.table.admit() => guard,
            };
            conns.spawn(connection(tcp, addr, guard, serving.clone(), stop.clone()));
        }
        while conns.join_next().await.is_some() {}
    }

    /// One connection, from accept to close.
    async fn connection(
        tcp: TcpStream,
        addr: SocketAddr,
        guard: ConnGuard,
        serving: Arc<AdminServing>,
        stop: watch::Receiver<bool>,
    ) {
        let _ = tcp.set_nodelay(true);
        let slot = guard.slot.clone();
        match &serving.tls {
            None => {
                let peer = PeerInfo {
                    addr,
                    identity: None,
                };
                serve_io(tcp, peer, &slot, &serving, stop).await;
            }
            Some(acceptor) => {
                let handshake = crate::ca::serving::handshake(acceptor, tcp, addr, "admin");
                let conn = tokio::select! {
                    conn = handshake => conn,
                    why = closed(&slot, serving.header_timeout) => {
                        tracing::debug!(peer = %addr, "admin connection closed: {why}");
                        None
                    }
                };
                if let Some(conn) = conn {
                    let peer = conn.peer.clone();
                    serve_io(conn, peer, &slot, &serving, stop).await;
                }
            }
        }
        drop(guard);
    }

    async fn serve_io<I>(
        io: I,
        peer: PeerInfo,
        slot: &Arc<ConnSlot>,
        serving: &AdminServing,
        mut stop: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let addr = peer.addr;
        let router = serving.router.clone();
        let tracked = slot.clone();
        let service =
            hyper::service::service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
                // What the handlers read as `ConnectInfo<PeerInfo>`.
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer.clone()));
                let busy = Busy::start(tracked.clone());
                let call = hyper::service::Service::call(&router, request);
                async move {
                    let response = call.await;
                    drop(busy);
                    response
                }
            });
        let conn = serving.builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(peer = %addr, error = %e, "admin connection ended");
                }
            }
            why = closed(slot, serving.header_timeout) => {
                tracing::debug!(peer = %addr, "admin connection closed: {why}");
            }
            () = async { let _ = stop.wait_for(|s| *s).await; } => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }

    /// Completes when the connection must close: evicted at the cap, or
    /// idle past its timeout. Says why.
    async fn closed(slot: &ConnSlot, header_timeout: Duration) -> &'static str {
        tokio::select! {
            () = slot.evict.notified() => {
                "the connection cap was reached and it had no request in progress"
            }
            why = idle_timeout(slot, header_timeout) => why,
        }
    }

    async fn idle_timeout(slot: &ConnSlot, header_timeout: Duration) -> &'static str {
        loop {
            let (busy, since, served) = slot.activity();
            let (limit, why) = if served {
                (ADMIN_IDLE_TIMEOUT, "idle past the keep-alive timeout")
            } else {
                (
                    header_timeout,
                    "no complete request head within the header timeout",
                )
            };
            if busy {
                tokio::time::sleep(limit).await;
                continue;
            }
            let due = since + limit;
            if Instant::now() >= due {
                return why;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    }

    /// The open connections, oldest first.
    struct ConnTable {
        max: usize,
        inner: Mutex<TableInner>,
        /// Signalled when a connection ends or finishes a request: a slot
        /// may be free or evictable.
        freed: Arc<Notify>,
    }

    #[derive(Default)]
    struct TableInner {
        next_id: u64,
        open: BTreeMap<u64, Arc<ConnSlot>>,
        /// Whether reaching the cap was logged (once per episode).
        saturated: bool,
    }

    impl ConnTable {
        fn lock(&self) -> MutexGuard<'_, TableInner> {
            self.inner.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// A slot for a new connection: a free one, or the oldest
        /// connection's without a request in progress (told to close), or
        /// else waits for one.
        async fn admit(self: &Arc<Self>) -> ConnGuard {
            loop {
                let freed = self.freed.notified();
                if let Some(guard) = self.try_admit() {
                    return guard;
                }
                freed.await;
            }
        }

        fn try_admit(self: &Arc<Self>) -> Option<ConnGuard> {
            let mut inner = self.lock();
            if inner.open.len() >= self.max {
                let victim = inner
                    .open
                    .iter()
                    .find(|(_, slot)| slot.in_flight.load(Ordering::Acquire) == 0)
                    .map(|(id, _)| *id)?;
                if let Some(slot) = inner.open.remove(&victim) {
                    slot.evict.notify_one();
                }
                if !inner.saturated {
                    inner.saturated = true;
                    tracing::warn!(
                        max = self.max,
                        "admin API at its connection cap: closing the oldest connections \
                         without a request in progress to admit new ones"
                    );
                }
            }
            let id = inner.next_id;
            inner.next_id += 1;
            let slot = Arc::new(ConnSlot {
                in_flight: AtomicUsize::new(0),
                activity: Mutex::new((Instant::now(), false)),
                evict: Notify::new(),
                freed: self.freed.clone(),
            });
            inner.open.insert(id, slot.clone());
            Some(ConnGuard {
                table: self.clone(),
                id,
                slot,
            })
        }
    }

    /// One connection's state, as the table sees it.
    struct ConnSlot {
        in_flight: AtomicUsize,
        /// When the last request started or ended (or the accept), and
        /// whether any request has started.
        activity: Mutex<(Instant, bool)>,
        evict: Notify,
        freed: Arc<Notify>,
    }

    impl ConnSlot {
        /// (a request in progress, since when idle, any request yet)
        fn activity(&self) -> (bool, Instant, bool) {
            let (since, served) = *self.activity.lock().unwrap_or_else(|e| e.into_inner());
            (self.in_flight.load(Ordering::Acquire) > 0, since, served)
        }

        fn touch(&self) {
            *self.activity.lock().unwrap_or_else(|e| e.into_inner()) = (Instant::now(), true);
        }
    }

    /// A request in progress on a connection.
    struct Busy(Arc<ConnSlot>);

    impl Busy {
        fn start(slot: Arc<ConnSlot>) -> Busy {
            slot.in_flight.fetch_add(1, Ordering::AcqRel);
            slot.touch();
            Busy(slot)
        }
    }

    impl Drop for Busy {
        fn drop(&mut self) {
            self.0.touch();
            self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.0.freed.notify_one();
        }
    }

    /// Holds a connection's place in the table until it ends.
    struct ConnGuard {
        table: Arc<ConnTable>,
        id: u64,
        slot: Arc<ConnSlot>,
    }

    impl Drop for ConnGuard {
        fn drop(&mut self) {
            let mut inner = self.table.lock();
            inner.open.remove(&self.id);
            if inner.open.len() < self.table.max {
                inner.saturated = false;
            }
            drop(inner);
            self.table.freed.notify_one();
        }
    }
}

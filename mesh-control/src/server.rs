//! Running a control server: in a process of its own (`mesh-control serve`)
//! or embedded in tests and demos ([`Server::builder`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::ClientStatusDiscoveryServiceServer;
use notify::Watcher;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use crate::Error;
use crate::ads::Ads;
use crate::config::{ConfigStore, MeshOptions};
use crate::state::Shared;

/// Entry point for an embedded control server.
#[derive(Debug)]
pub struct Server;

impl Server {
    /// A builder with the defaults of `mesh-control serve`, except that the
    /// addresses default to ephemeral loopback ports (tests, demos).
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            config_dir: None,
            xds_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            debounce: Duration::from_millis(10),
            lease_check: Duration::from_millis(100),
            stale_after: Duration::from_secs(5),
            options: MeshOptions::default(),
        }
    }
}

/// Settings of a control server.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    config_dir: Option<PathBuf>,
    xds_addr: SocketAddr,
    admin_addr: SocketAddr,
    debounce: Duration,
    lease_check: Duration,
    stale_after: Duration,
    options: MeshOptions,
}

impl ServerBuilder {
    /// The directory of Istio YAML to serve and watch.
    pub fn config_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config_dir = Some(dir.into());
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

    /// How long to wait after a file change for more changes before
    /// reloading (editors write files in several steps). Default 10 ms.
    pub fn debounce(mut self, debounce: Duration) -> Self {
        self.debounce = debounce;
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

    /// Binds both ports, loads the config directory and starts serving.
    /// A config with problems still starts (the problems are logged and shown
    /// in `/status`); a missing directory is an error.
    pub async fn start(self) -> Result<ServerHandle, Error> {
        if let Some(dir) = &self.config_dir
            && !dir.is_dir()
        {
            return Err(Error::config(format!(
                "config directory {} does not exist or is not a directory",
                dir.display()
            )));
        }
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

        let mut shared = Shared::new(
            ConfigStore::new(self.options.clone()),
            self.config_dir.clone(),
        );
        shared.stale_after = self.stale_after;
        let shared = Arc::new(shared);
        shared.reload();
        shared.rebuild();

        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();

        let ads = AggregatedDiscoveryServiceServer::new(Ads {
            shared: shared.clone(),
        })
        .max_decoding_message_size(16 << 20);
        let csds = ClientStatusDiscoveryServiceServer::new(crate::csds::Csds {
            shared: shared.clone(),
        });
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(xds_listener);
            let result = tonic::transport::Server::builder()
                .http2_keepalive_interval(Some(Duration::from_secs(30)))
                .add_service(ads)
                .add_service(csds)
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "xDS server failed");
            }
        }));

        let app = crate::admin::router(shared.clone());
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let result = axum::serve(admin_listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "admin server failed");
            }
        }));

        let sweeper = shared.clone();
        let every = self.lease_check;
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let expired = sweeper.registry.lock().expire(Instant::now());
                if expired {
                    sweeper.rebuild();
                }
            }
        }));

        let watcher = match &self.config_dir {
            Some(dir) => Some(watch_dir(dir, shared.clone(), self.debounce, &mut tasks)?),
            None => None,
        };

        Ok(ServerHandle {
            xds_addr,
            admin_addr,
            shared,
            stop: stop_tx,
            tasks,
            _watcher: watcher,
        })
    }
}

fn watch_dir(
    dir: &std::path::Path,
    shared: Arc<Shared>,
    debounce: Duration,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Result<notify::RecommendedWatcher, Error> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(e) = event
            && !e.kind.is_access()
        {
            let _ = tx.send(());
        }
    })
    .map_err(|e| Error::config(format!("cannot watch {}: {e}", dir.display())))?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|e| Error::config(format!("cannot watch {}: {e}", dir.display())))?;
    tasks.push(tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: keep absorbing events until the directory is quiet.
            loop {
                match tokio::time::timeout(debounce, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let shared = shared.clone();
            let _ = tokio::task::spawn_blocking(move || shared.reload()).await;
        }
    }));
    Ok(watcher)
}

/// A running control server. Dropping it stops it.
pub struct ServerHandle {
    xds_addr: SocketAddr,
    admin_addr: SocketAddr,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
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

    /// Re-reads the config directory now, without waiting for the watcher.
    pub fn reload(&self) {
        self.shared.reload();
    }

    /// A gRPC bootstrap (JSON) for a workload of this mesh: Rust clients and
    /// gRPC proxyless clients (grpc-go, grpc-java, grpcio) read the same file.
    pub fn bootstrap_json(&self, node_id: &str, namespace: &str) -> String {
        bootstrap_json(self.xds_addr, self.admin_addr, node_id, namespace)
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

    /// Stops accepting, closes streams and waits for the tasks to end.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
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
            "server_features": ["xds_v3"],
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

//! The xDS client: a tokio task that drives [`AdsState`] over a tonic ADS
//! stream and publishes complete snapshots.
//!
//! Requests read the current [`Snapshot`] with one atomic load
//! ([`XdsClient::snapshot`], `arc_swap`); a `tokio::sync::watch` counter
//! ([`XdsClient::changes`]) bumps after every publish so waiters need no
//! polling. The task connects to the bootstrap's `xds_servers` in order,
//! falling back to the next one when a server cannot be reached or its stream
//! fails before answering (gRFC A71's server list, simplified), and reconnects
//! with jittered exponential backoff (gRPC's connection backoff: multiplier
//! 1.6, jitter ±20 %), reset once a stream has delivered a response. On every
//! new stream it re-sends every subscription with the last accepted versions.
//!
//! With `channel_creds` `tls` in the bootstrap the channel is TLS (rustls,
//! ALPN h2, the server verified against `ca_certificate_file` for the host
//! of `server_uri`, a client certificate when configured; see the `tls`
//! module): a verification failure is the connection error
//! [`XdsClient::last_error`] reports, naming the CA file.
//!
//! Static stability: with [`ClientOptions::cache_file`] the raw resources of
//! the last accepted config are written to disk after each change, and loaded
//! when no control server answers, so a restarted service routes with the last
//! good config while the control server is down.
//!
//! The task ends when the last [`XdsClient`] clone is dropped: it owns no
//! handle to itself, only the receiving end of the command channel.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_core::Snapshot;
use mesh_core::model::Name;
use prost::Message;
use prost::bytes::Buf;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::bootstrap::{Bootstrap, XdsServer};
use crate::error::{Error, ErrorKind};
use crate::state::{AdsState, Readiness, ResourceReport, SyncStatus, readiness};

/// Largest ADS response accepted (tonic's default of 4 MiB is small for a big mesh).
const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// Tuning of an [`XdsClient`]; the defaults suit production, tests shrink the backoff.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    backoff_base: Duration,
    backoff_max: Duration,
    connect_timeout: Duration,
    keepalive: Duration,
    listeners: Vec<String>,
    cache_file: Option<PathBuf>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(20),
            keepalive: Duration::from_secs(30),
            listeners: Vec::new(),
            cache_file: None,
        }
    }
}

impl ClientOptions {
    /// Reconnect backoff: the first delay and the cap (default 100 ms, 30 s).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max.max(base);
        self
    }

    /// How long one connection attempt may take (default 20 s, gRPC's minimum connect timeout).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// HTTP/2 keepalive ping interval, to notice a silently dead server (default 30 s).
    pub fn keepalive(mut self, interval: Duration) -> Self {
        self.keepalive = interval;
        self
    }

    /// Listener names to subscribe at start (pre-warming).
    pub fn listeners<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.listeners.extend(names.into_iter().map(Into::into));
        self
    }

    /// Where to keep the last good config (static stability); loaded when
    /// no control server answers.
    pub fn cache_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.cache_file = Some(path.into());
        self
    }
}

/// A handle to the xDS client task. Cheap to clone; the task ends with the last clone.
#[derive(Clone)]
pub struct XdsClient {
    inner: Arc<Inner>,
}

struct Inner {
    bootstrap: Bootstrap,
    published: Arc<Published>,
    commands: mpsc::UnboundedSender<Command>,
    subscribed: Mutex<HashSet<Name>>,
    changes: watch::Receiver<u64>,
}

/// What the task publishes and handles read.
struct Published {
    snapshot: ArcSwap<Snapshot>,
    status: ArcSwap<SyncStatus>,
    /// Per-resource status and raw forms, for CSDS and the config dump.
    report: ArcSwap<ResourceReport>,
    last_error: Mutex<Option<Error>>,
    server: Mutex<Option<String>>,
}

enum Command {
    Subscribe(Name),
}

/// The last handle was dropped: the task ends.
struct Shutdown;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl std::fmt::Debug for XdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XdsClient")
            .field("node_id", &self.inner.bootstrap.node_id())
            .field("version", &*self.inner.changes.borrow())
            .finish_non_exhaustive()
    }
}

impl XdsClient {
    /// Starts the client with default options.
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the client task).
    pub fn start(bootstrap: Bootstrap) -> XdsClient {
        XdsClient::start_with(bootstrap, ClientOptions::default())
    }

    /// Starts the client: spawns the task that connects, subscribes to
    /// `options`' listeners, and keeps the snapshot current.
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the client task).
    pub fn start_with(bootstrap: Bootstrap, options: ClientOptions) -> XdsClient {
        let ignore_deletion = bootstrap
            .xds_servers()
            .first()
            .is_some_and(XdsServer::ignores_resource_deletion);
        // Raw resources are kept for the cache file and for CSDS
        // (`client_status`), which reports each as received.
        let mut state = AdsState::new(bootstrap.node())
            .ignore_resource_deletion(ignore_deletion)
            .keep_raw(true);
        let mut subscribed = HashSet::new();
        for name in &options.listeners {
            state.subscribe(name);
            subscribed.insert(Name::from(name.as_str()));
        }
        let published = Arc::new(Published {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            status: ArcSwap::from_pointee(SyncStatus::default()),
            report: ArcSwap::from_pointee(state.resource_report()),
            last_error: Mutex::new(None),
            server: Mutex::new(None),
        });
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (changes_tx, changes_rx) = watch::channel(0u64);
        let driver = Driver {
            state,
            servers: bootstrap.xds_servers().to_vec(),
            options,
            published: published.clone(),
            changes: changes_tx,
            commands: commands_rx,
            cache_loaded: false,
        };
        tokio::spawn(driver.run());
        XdsClient {
            inner: Arc::new(Inner {
                bootstrap,
                published,
                commands: commands_tx,
                subscribed: Mutex::new(subscribed),
                changes: changes_rx,
            }),
        }
    }

    /// The current snapshot: one lock-free atomic load.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.inner.published.snapshot.load()
    }

    /// Missing clusters and rejected resources, published with each snapshot.
    pub fn sync_status(&self) -> Arc<SyncStatus> {
        self.inner.published.status.load_full()
    }

    /// Every resource subscribed or held with its ACK/NACK status, raw form
    /// and rejection, published with each snapshot: what
    /// [`XdsClient::client_status`] (CSDS) reports.
    pub fn resource_report(&self) -> Arc<ResourceReport> {
        self.inner.published.report.load_full()
    }

    /// Subscribes to a listener name (an authority an app dials). Idempotent
    /// and non-blocking: the task sends the LDS request.
    pub fn subscribe(&self, listener_name: &str) {
        {
            let mut set = lock(&self.inner.subscribed);
            if set.contains(listener_name) {
                return;
            }
            set.insert(Name::from(listener_name));
        }
        // Fails only when the task has ended; waiters then see `Closed`.
        let _ = self
            .inner
            .commands
            .send(Command::Subscribe(Name::from(listener_name)));
    }

    /// Subscribes to `name` and resolves once the listener and its whole
    /// cascade (route config, every cluster it names, their endpoints) are
    /// present; fails at once when the control server says the listener does
    /// not exist, or when its config was rejected. No timeout inside: wrap it
    /// in `tokio::time::timeout`.
    pub async fn wait_for_listener(&self, name: &str) -> Result<(), Error> {
        let mut changes = self.changes();
        self.subscribe(name);
        loop {
            changes.borrow_and_update();
            // Guards are short-lived and not held across the await below.
            let ready = {
                let snapshot = self.snapshot();
                let status = self.inner.published.status.load();
                readiness(&snapshot, &status, name)
            };
            match ready {
                Readiness::Ready => return Ok(()),
                Readiness::Missing => {
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        format!(
                            "xDS listener {name:?} does not exist on the control server ({})",
                            self.server_description()
                        ),
                    ));
                }
                Readiness::Rejected(why) => {
                    return Err(Error::new(
                        ErrorKind::Rejected,
                        format!(
                            "xDS listener {name:?} cannot be used: its config from the control \
                             server ({}) was rejected: {why}",
                            self.server_description()
                        ),
                    ));
                }
                Readiness::Pending => {}
            }
            if changes.changed().await.is_err() {
                return Err(Error::new(
                    ErrorKind::Closed,
                    "the xDS client task has ended (its tokio runtime shut down)",
                ));
            }
        }
    }

    fn server_description(&self) -> String {
        match &*lock(&self.inner.published.server) {
            Some(uri) => format!("server_uri {uri}"),
            None => {
                let uris: Vec<&str> = self
                    .inner
                    .bootstrap
                    .xds_servers()
                    .iter()
                    .map(XdsServer::server_uri)
                    .collect();
                format!("server_uri {}", uris.join(", "))
            }
        }
    }

    /// A receiver whose value bumps on every published snapshot.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.clone()
    }

    /// The bootstrap the client was started with.
    pub fn bootstrap(&self) -> &Bootstrap {
        &self.inner.bootstrap
    }

    /// The last connection or stream error, cleared when a stream delivers a
    /// response: what to tell a user whose wait timed out.
    pub fn last_error(&self) -> Option<Error> {
        lock(&self.inner.published.last_error).clone()
    }

    /// The `server_uri` of the control server whose stream delivered the
    /// current config, if any.
    pub fn connected_server(&self) -> Option<String> {
        lock(&self.inner.published.server).clone()
    }
}

/// Jittered exponential backoff, as gRPC's connection backoff.
struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Self {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    fn reset(&mut self) {
        self.current = self.base;
    }

    fn next_delay(&mut self) -> Duration {
        let delay = self.current;
        self.current = self.current.mul_f64(1.6).min(self.max);
        delay.mul_f64(rand::rng().random_range(0.8..=1.2))
    }
}

type AdsClient = AggregatedDiscoveryServiceClient<Channel>;

/// The task: owns the state machine and the publishing ends.
struct Driver {
    state: AdsState,
    servers: Vec<XdsServer>,
    options: ClientOptions,
    published: Arc<Published>,
    changes: watch::Sender<u64>,
    commands: mpsc::UnboundedReceiver<Command>,
    cache_loaded: bool,
}

impl Driver {
    async fn run(mut self) {
        let _ = self.run_until_shutdown().await;
        tracing::debug!("xDS client task ended: no handle left");
    }

    async fn run_until_shutdown(&mut self) -> Result<(), Shutdown> {
        let mut backoff = Backoff::new(self.options.backoff_base, self.options.backoff_max);
        loop {
            let mut delivered = false;
            for server in self.servers.clone() {
                let Some(client) = self.connect(&server).await? else {
                    continue;
                };
                if self.run_stream(client, &server).await? {
                    delivered = true;
                    // Start over from the first (preferred) server.
                    break;
                }
            }
            if !self.state.has_received() && !self.cache_loaded {
                self.cache_loaded = true;
                self.load_cache();
            }
            if delivered {
                backoff.reset();
            }
            let deadline = Instant::now() + backoff.next_delay();
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => break,
                    cmd = self.commands.recv() => self.on_command(cmd)?,
                }
            }
        }
    }

    fn on_command(&mut self, cmd: Option<Command>) -> Result<(), Shutdown> {
        match cmd {
            None => Err(Shutdown),
            Some(Command::Subscribe(name)) => {
                if self.state.subscribe(&name) {
                    // CSDS shows the new name as REQUESTED right away.
                    self.published
                        .report
                        .store(Arc::new(self.state.resource_report()));
                }
                Ok(())
            }
        }
    }

    fn record_error(&self, error: Error) {
        tracing::warn!("{error}");
        *lock(&self.published.last_error) = Some(error);
    }

    /// One connection attempt; `None` when it failed (the error is recorded).
    async fn connect(&mut self, server: &XdsServer) -> Result<Option<AdsClient>, Shutdown> {
        let endpoint = match Endpoint::from_shared(server.endpoint_uri().to_owned()) {
            Ok(e) => e
                .connect_timeout(self.options.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(self.options.keepalive)
                .keep_alive_timeout(self.options.keepalive)
                .keep_alive_while_idle(true),
            Err(e) => {
                self.record_error(Error::connect(format!(
                    "xDS server {}: invalid URI: {e}",
                    server.server_uri()
                )));
                return Ok(None);
            }
        };
        let mut connecting: std::pin::Pin<
            Box<
                dyn std::future::Future<Output = Result<Channel, tonic::transport::Error>>
                    + Send
                    + '_,
            >,
        > = match server.tls() {
            None => Box::pin(endpoint.connect()),
            Some(tls) => {
                match crate::tls::TlsConnector::new(server, tls, self.options.connect_timeout) {
                    Ok(connector) => Box::pin(endpoint.connect_with_connector(connector)),
                    Err(e) => {
                        self.record_error(Error::connect(format!(
                            "cannot connect to xDS server {}: {e}",
                            server.server_uri()
                        )));
                        return Ok(None);
                    }
                }
            }
        };
        loop {
            tokio::select! {
                result = &mut connecting => return Ok(match result {
                    Ok(channel) => Some(
                        AggregatedDiscoveryServiceClient::new(channel)
                            .max_decoding_message_size(MAX_MESSAGE_SIZE),
                    ),
                    Err(e) => {
                        self.record_error(Error::connect(format!(
                            "cannot connect to xDS server {}: {}",
                            server.server_uri(),
                            error_chain(&e)
                        )));
                        None
                    }
                }),
                cmd = self.commands.recv() => self.on_command(cmd)?,
            }
        }
    }

    /// Runs one ADS stream until it ends; true if it delivered a response.
    async fn run_stream(
        &mut self,
        mut client: AdsClient,
        server: &XdsServer,
    ) -> Result<bool, Shutdown> {
        let (tx, rx) = mpsc::unbounded_channel();
        for req in self.state.on_connected() {
            let _ = tx.send(req);
        }
        let result = self.drive_stream(&mut client, &tx, rx, server).await;
        self.state.on_disconnected();
        result
    }

    async fn drive_stream(
        &mut self,
        client: &mut AdsClient,
        tx: &mpsc::UnboundedSender<
            envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest,
        >,
        rx: mpsc::UnboundedReceiver<
            envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest,
        >,
        server: &XdsServer,
    ) -> Result<bool, Shutdown> {
        let uri = server.server_uri();
        let call = client.stream_aggregated_resources(UnboundedReceiverStream::new(rx));
        tokio::pin!(call);
        let mut inbound = loop {
            tokio::select! {
                result = &mut call => match result {
                    Ok(response) => break response.into_inner(),
                    Err(status) => {
                        self.record_error(Error::connect(format!(
                            "xDS server {uri}: ADS stream failed to open: {}: {}",
                            status.code(),
                            status.message()
                        )));
                        return Ok(false);
                    }
                },
                cmd = self.commands.recv() => {
                    self.on_command(cmd)?;
                    for req in self.state.pending_requests() {
                        let _ = tx.send(req);
                    }
                }
            }
        };
        let mut delivered = false;
        loop {
            tokio::select! {
                message = inbound.message() => match message {
                    Ok(Some(response)) => {
                        if !delivered {
                            delivered = true;
                            *lock(&self.published.last_error) = None;
                            *lock(&self.published.server) = Some(uri.to_owned());
                        }
                        for req in self.state.on_response(response) {
                            let _ = tx.send(req);
                        }
                        self.publish();
                    }
                    Ok(None) => {
                        self.record_error(Error::connect(format!(
                            "xDS server {uri}: the ADS stream was closed by the server"
                        )));
                        return Ok(delivered);
                    }
                    Err(status) => {
                        self.record_error(Error::connect(format!(
                            "xDS server {uri}: ADS stream ended: {}: {}",
                            status.code(),
                            status.message()
                        )));
                        return Ok(delivered);
                    }
                },
                cmd = self.commands.recv() => {
                    self.on_command(cmd)?;
                    for req in self.state.pending_requests() {
                        let _ = tx.send(req);
                    }
                }
            }
        }
    }

    fn publish(&mut self) {
        let Some((snapshot, status)) = self.state.take_changes() else {
            return;
        };
        self.published
            .report
            .store(Arc::new(self.state.resource_report()));
        self.published.status.store(status);
        self.published.snapshot.store(snapshot);
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        if let Some(path) = &self.options.cache_file
            && let Err(e) = save_cache(path, &self.state.cached_responses())
        {
            tracing::warn!("{e}");
        }
    }

    fn load_cache(&mut self) {
        let Some(path) = self.options.cache_file.clone() else {
            return;
        };
        match load_cache(&path) {
            Ok(Some(responses)) => {
                let n = self.state.load_cached(responses);
                tracing::warn!(
                    path = %path.display(),
                    resources = n,
                    "no xDS server answered: serving the cached last good config"
                );
                if let Some((snapshot, status)) = self.state.take_changes() {
                    self.published
                        .report
                        .store(Arc::new(self.state.resource_report()));
                    self.published.status.store(status);
                    self.published.snapshot.store(snapshot);
                    self.changes.send_modify(|v| *v = v.wrapping_add(1));
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Writes the cache atomically: length-delimited `DiscoveryResponse`s, one per type.
fn save_cache(path: &Path, responses: &[DiscoveryResponse]) -> Result<(), Error> {
    let mut buf = Vec::new();
    for r in responses {
        buf.extend_from_slice(&r.encode_length_delimited_to_vec());
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, &buf)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            Error::new(
                ErrorKind::Cache,
                format!("cannot write the xDS cache {}: {e}", path.display()),
            )
        })
}

/// Reads the cache; `None` when there is none.
fn load_cache(path: &Path) -> Result<Option<Vec<DiscoveryResponse>>, Error> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(Error::new(
                ErrorKind::Cache,
                format!("cannot read the xDS cache {}: {e}", path.display()),
            ));
        }
    };
    let mut buf = bytes.as_slice();
    let mut out = Vec::new();
    while buf.has_remaining() {
        let r = DiscoveryResponse::decode_length_delimited(&mut buf).map_err(|e| {
            Error::new(
                ErrorKind::Cache,
                format!("the xDS cache {} is corrupt: {e}", path.display()),
            )
        })?;
        out.push(r);
    }
    Ok(Some(out))
}

/// An error and its sources, `: `-separated (tonic's transport errors say
/// little at the top level).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}
    fn assert_sync<T: Sync>(_: &T) {}

    #[tokio::test]
    async fn waiting_is_send() {
        let b = Bootstrap::builder("127.0.0.1:1", "n")
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let client = XdsClient::start(b);
        let wait = client.wait_for_listener("x");
        assert_send(&wait);
        assert_send(&client);
        assert_sync(&client);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = b.next_delay();
        assert!(first >= Duration::from_millis(80) && first <= Duration::from_millis(120));
        for _ in 0..20 {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(1200), "{d:?}");
        }
        assert_eq!(b.current, Duration::from_secs(1));
        b.reset();
        assert_eq!(b.current, Duration::from_millis(100));
    }

    #[test]
    fn the_cache_file_round_trips_and_a_corrupt_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xds.cache");
        assert!(load_cache(&path).unwrap().is_none());
        let responses = vec![
            DiscoveryResponse {
                version_info: "1".into(),
                type_url: "t".into(),
                ..DiscoveryResponse::default()
            },
            DiscoveryResponse {
                version_info: "2".into(),
                ..DiscoveryResponse::default()
            },
        ];
        save_cache(&path, &responses).unwrap();
        assert_eq!(load_cache(&path).unwrap().unwrap(), responses);
        std::fs::write(&path, [0x7f, 1, 2]).unwrap();
        let err = load_cache(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Cache);
        assert!(err.to_string().contains("corrupt"), "{err}");
    }
}

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
//! Static stability (a workload must be able to start while the control
//! plane is down): the raw resources of the last accepted config are written
//! to a cache file after every change (coalesced, off the task, 0600,
//! fsynced and renamed into place), and a client that starts while no
//! control server answers serves from it. When no server has answered within
//! [`ClientOptions::cache_wait`] (1 s by default: far below the 20 s connect
//! timeout, so a black-holed control plane costs a second, not twenty), the
//! cached config is loaded and published, a WARN names the file and its age,
//! and the client says it is stale ([`XdsClient::stale_since`],
//! [`XdsClient::cache_status`], the config dump's `control_server`) while it
//! keeps reconnecting. The first response of a control server clears the mark,
//! and its config replaces the cached one as it arrives. The cache is on by
//! default; [`cache_file_for`] says where it lives and how to move or turn it
//! off. A cache that cannot be used (corrupt, truncated, written by a newer
//! version, for another node, writable by others) is reported and ignored:
//! the client then waits for a control server as it would without one.
//!
//! The task ends when the last [`XdsClient`] clone is dropped: it owns no
//! handle to itself (nor does the cache writer it spawns), only the
//! receiving end of the command channel whose senders live in the handles.
//! Dropping the last one closes the channel, and the task returns from
//! whatever it awaits (a connection attempt, a stream, a backoff): its ADS
//! stream and connection close, the cache writer finishes the write in
//! hand and stops, and [`XdsClient::changes`] receivers see the end. What
//! holds a handle keeps the client running while it lives: a
//! `CsdsService`, mesh-tower's admin endpoint, client stack and
//! `InboundPolicy::from_xds` (whose follower holds one until the policy's
//! last clone is dropped); an observer that must not (a metrics collector)
//! holds a [`WeakXdsClient`] instead.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use mesh_core::Snapshot;
use mesh_core::model::Name;
use prost::Message;
use rand::Rng;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::bootstrap::{Bootstrap, XdsServer};
use crate::error::{Error, ErrorKind};
use crate::state::{AdsState, RawConfig, Readiness, ResourceReport, SyncStatus, readiness};

/// Largest ADS response accepted (tonic's default of 4 MiB is small for a big mesh).
const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// The environment variable that moves or turns off the xDS cache (see
/// [`cache_file_for`]): `off`, a directory, or a file.
pub const CACHE_ENV_VAR: &str = "PROXYLESS_XDS_CACHE";

/// The key of the cache file in the bootstrap's `proxyless` object (see
/// [`cache_file_for`]).
pub const CACHE_FILE_KEY: &str = "cache_file";

/// How long a starting client waits for a control server before it serves
/// the cached config.
pub const DEFAULT_CACHE_WAIT: Duration = Duration::from_secs(1);

/// The extension of xDS cache files named after their node.
const CACHE_EXTENSION: &str = "xds";

/// A cache file larger than this is reported and ignored (a mesh's whole
/// config is far smaller; the bound keeps a misnamed path such as a device
/// from being read without end).
const MAX_CACHE_BYTES: u64 = 256 << 20;

/// Cache files named after their node that nobody has written for this long
/// are removed from their directory (a node gone for a month, or one of the
/// throwaway nodes of tests and demos), so the default directory does not
/// grow without bound.
const PRUNE_AFTER: Duration = Duration::from_secs(30 * 24 * 3600);

/// The first bytes of a cache file: a line `head -1` shows.
const CACHE_MAGIC: &[u8] = b"proxyless xds cache\n";
/// The layout this client writes and reads; a file of a later layout is
/// reported and ignored rather than misread.
const CACHE_FORMAT: u32 = 1;
/// Magic, format (u32), written at (u64 ms), payload length (u64),
/// checksum (u64), all big-endian.
const CACHE_HEADER_LEN: usize = CACHE_MAGIC.len() + 4 + 8 + 8 + 8;

/// An example of the bootstrap's `proxyless` object, for errors.
const SETTINGS_EXAMPLE: &str = r#""proxyless": {"cache_file": "/var/cache/app/xds.cache"} (or "cache_file": false to turn the cache off)"#;

/// Tuning of an [`XdsClient`]; the defaults suit production, tests shrink the backoff.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    backoff_base: Duration,
    backoff_max: Duration,
    connect_timeout: Duration,
    keepalive: Duration,
    listeners: Vec<String>,
    cache: CacheChoice,
    cache_wait: Duration,
    lookup: Option<Lookup>,
    /// The DNS server for DNS clusters (`None`: the environment's
    /// `PROXYLESS_DNS_SERVER`, else the system's).
    dns_server: Option<std::net::SocketAddr>,
}

/// Where the cache goes, as the options say.
#[derive(Debug, Clone, PartialEq, Eq)]
enum CacheChoice {
    /// As [`cache_file_for`] says (environment, bootstrap, default).
    Resolve,
    File(PathBuf),
    Off,
}

/// An environment stand-in (edition 2024 makes `set_var` unsafe, so tests
/// pass a function instead).
#[derive(Clone)]
struct Lookup(Arc<LookupFn>);

/// What [`ClientOptions::env_lookup`] takes.
type LookupFn = dyn Fn(&str) -> Option<String> + Send + Sync;

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lookup(..)")
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(20),
            keepalive: Duration::from_secs(30),
            listeners: Vec::new(),
            cache: CacheChoice::Resolve,
            cache_wait: DEFAULT_CACHE_WAIT,
            lookup: None,
            dns_server: None,
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

    /// Keeps the last good config in `path` (static stability), whatever
    /// the environment and the bootstrap say (see [`cache_file_for`]).
    pub fn cache_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.cache = CacheChoice::File(path.into());
        self
    }

    /// Keeps no cache file, whatever the environment and the bootstrap say:
    /// a client that starts while no control server answers has no config
    /// until one does.
    pub fn no_cache(mut self) -> Self {
        self.cache = CacheChoice::Off;
        self
    }

    /// How long a starting client waits for a control server to answer
    /// before it serves the cached config ([`DEFAULT_CACHE_WAIT`], 1 s). A
    /// round of connection attempts that all fail (connection refused)
    /// ends the wait sooner.
    pub fn cache_wait(mut self, wait: Duration) -> Self {
        self.cache_wait = wait;
        self
    }

    /// Reads the variables that place the cache ([`CACHE_ENV_VAR`],
    /// `XDG_CACHE_HOME`, `HOME`, `TMPDIR`) through `lookup` instead of the
    /// process environment, as [`Bootstrap::from_lookup`] does.
    pub fn env_lookup(
        mut self,
        lookup: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> Self {
        self.lookup = Some(Lookup(Arc::new(lookup)));
        self
    }

    /// The DNS server DNS clusters (ServiceEntry `resolution: DNS`) are
    /// resolved through, over the environment's `PROXYLESS_DNS_SERVER`
    /// (`ip:port` or `ip`) and the system's configuration.
    pub fn dns_server(mut self, server: std::net::SocketAddr) -> Self {
        self.dns_server = Some(server);
        self
    }

    /// The DNS server these options choose (`None`: the system's); a
    /// malformed `PROXYLESS_DNS_SERVER` is reported and ignored.
    fn resolve_dns_server(&self) -> Option<std::net::SocketAddr> {
        if self.dns_server.is_some() {
            return self.dns_server;
        }
        let value = match &self.lookup {
            Some(lookup) => (lookup.0)(crate::dns::DNS_SERVER_ENV_VAR),
            None => std::env::var(crate::dns::DNS_SERVER_ENV_VAR).ok(),
        }?;
        if value.trim().is_empty() {
            return None;
        }
        crate::dns::parse_server(&value)
            .inspect_err(|e| tracing::warn!("{e}: the system's DNS servers are used"))
            .ok()
    }

    /// The cache file these options choose for `bootstrap`.
    fn resolve_cache_file(&self, bootstrap: &Bootstrap) -> Option<PathBuf> {
        match (&self.cache, &self.lookup) {
            (CacheChoice::Off, _) => None,
            (CacheChoice::File(path), _) => Some(path.clone()),
            (CacheChoice::Resolve, Some(lookup)) => cache_file_for(bootstrap, |k| (lookup.0)(k)),
            (CacheChoice::Resolve, None) => cache_file_for(bootstrap, |k| std::env::var(k).ok()),
        }
    }
}

/// Where the xDS cache of `bootstrap`'s node lives, reading the environment
/// through `lookup`; `None` when the cache is off.
///
/// The first of these that says something wins:
///
/// 1. [`CACHE_ENV_VAR`] (`PROXYLESS_XDS_CACHE`): `off` (or `false`, `0`,
///    `none`) turns the cache off; a value ending in `/`, or naming an
///    existing directory, puts the node's file (named as below) in that
///    directory; any other value is the file itself. Empty counts as unset.
/// 2. The bootstrap's `proxyless` object, a top-level field that gRPC's
///    bootstrap parsers ignore, so the file still serves gRPC clients:
///    `"proxyless": {"cache_file": "/var/cache/app/xds.cache"}` (same
///    forms: a file, or a directory ending in `/`); `"cache_file": false`
///    or `null` turns the cache off, `true` or no key means the default.
/// 3. The default directory ([`default_cache_dir`]):
///    `$XDG_CACHE_HOME/proxyless/`, else `$HOME/.cache/proxyless/`, else
///    `proxyless-cache/` in the temporary directory.
///
/// The environment wins over the bootstrap because a bootstrap is often
/// shared by every replica of a service (one ConfigMap), while the
/// environment is per process: an operator can move or turn off one
/// process's cache without touching the shared file.
///
/// In a directory, the node's file is `<node id>-<hash>.xds`: the node id
/// with every character but `A-Z a-z 0-9 . _ -` replaced by `_` (at most 64
/// of them), and 12 hex digits of a hash of the node id and the
/// `server_uri`s, so two nodes, or one node id in two meshes, never share a
/// file. The workload certificate cache of the `mesh_ca` provider sits next
/// to it ([`sibling_file`], `.svid`). [`ClientOptions::cache_file`] and
/// [`ClientOptions::no_cache`] override all of this.
pub fn cache_file_for(
    bootstrap: &Bootstrap,
    lookup: impl Fn(&str) -> Option<String>,
) -> Option<PathBuf> {
    let from_env = lookup(CACHE_ENV_VAR).and_then(|v| env_placement(&v));
    let placement = match from_env {
        Some(placement) => placement,
        None => match bootstrap.proxyless_settings() {
            None => Placement::Default,
            // Bootstrap validation has checked the settings already.
            Some(settings) => settings_placement(settings).unwrap_or_else(|e| {
                tracing::warn!("{e}; the xDS cache stays in its default place");
                Placement::Default
            }),
        },
    };
    let name = || format!("{}.{CACHE_EXTENSION}", cache_file_stem(bootstrap));
    match placement {
        Placement::Off => None,
        Placement::File(path) => Some(path),
        Placement::Dir(dir) => Some(dir.join(name())),
        Placement::Default => Some(default_cache_dir(lookup).join(name())),
    }
}

/// The directory caches go to when nothing else is said:
/// `$XDG_CACHE_HOME/proxyless/` (when `XDG_CACHE_HOME` is absolute, as the
/// XDG spec asks), else `$HOME/.cache/proxyless/`, else `proxyless-cache/`
/// in the temporary directory (`$TMPDIR`, else the platform's). Created
/// 0700 when the first cache is written.
pub fn default_cache_dir(lookup: impl Fn(&str) -> Option<String>) -> PathBuf {
    let absolute = |name: &str| lookup(name).map(PathBuf::from).filter(|p| p.is_absolute());
    if let Some(xdg) = absolute("XDG_CACHE_HOME") {
        return xdg.join("proxyless");
    }
    if let Some(home) = absolute("HOME") {
        return home.join(".cache").join("proxyless");
    }
    absolute("TMPDIR")
        .unwrap_or_else(std::env::temp_dir)
        .join("proxyless-cache")
}

/// The file next to `cache_file` with the same name and another extension:
/// `svid` holds the workload certificate of the `mesh_ca` provider.
pub fn sibling_file(cache_file: &Path, extension: &str) -> PathBuf {
    let sibling = cache_file.with_extension(extension);
    if sibling == cache_file {
        let mut name = cache_file.as_os_str().to_owned();
        name.push(".");
        name.push(extension);
        PathBuf::from(name)
    } else {
        sibling
    }
}

/// Where one setting puts the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Placement {
    Off,
    Default,
    /// The node's file in this directory.
    Dir(PathBuf),
    File(PathBuf),
}

fn path_placement(value: &str) -> Placement {
    let path = PathBuf::from(value);
    if value.ends_with('/') || value.ends_with(std::path::MAIN_SEPARATOR) || path.is_dir() {
        Placement::Dir(path)
    } else {
        Placement::File(path)
    }
}

/// `PROXYLESS_XDS_CACHE`; `None` when empty.
fn env_placement(value: &str) -> Option<Placement> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    let off = ["off", "false", "0", "none", "disabled"];
    if off.iter().any(|o| value.eq_ignore_ascii_case(o)) {
        return Some(Placement::Off);
    }
    Some(path_placement(value))
}

/// Checks the bootstrap's `proxyless` object: bootstrap validation calls it,
/// so a typo is an error at start rather than a cache silently elsewhere.
pub(crate) fn check_settings(settings: &Value) -> Result<(), String> {
    settings_shape(settings).map(|_| ())
}

fn settings_placement(settings: &Value) -> Result<Placement, String> {
    Ok(match settings_shape(settings)? {
        Some(Value::Bool(true)) | None => Placement::Default,
        Some(Value::String(path)) => path_placement(path.trim()),
        Some(_) => Placement::Off,
    })
}

/// The `cache_file` value of a well-formed `proxyless` object.
fn settings_shape(settings: &Value) -> Result<Option<&Value>, String> {
    let Value::Object(map) = settings else {
        return Err(format!(
            "proxyless must be an object, found {settings}; e.g. {SETTINGS_EXAMPLE}"
        ));
    };
    if let Some(key) = map.keys().find(|k| *k != CACHE_FILE_KEY) {
        return Err(format!(
            "proxyless.{key} is not a proxyless setting (the one there is: {CACHE_FILE_KEY}); \
             e.g. {SETTINGS_EXAMPLE}"
        ));
    }
    match map.get(CACHE_FILE_KEY) {
        None => Ok(None),
        Some(v @ (Value::Null | Value::Bool(_))) => Ok(Some(v)),
        Some(v @ Value::String(s)) if !s.trim().is_empty() => Ok(Some(v)),
        Some(other) => Err(format!(
            "proxyless.{CACHE_FILE_KEY} must be a file path, a directory ending in '/', or \
             false (no cache), found {other}; e.g. {SETTINGS_EXAMPLE}"
        )),
    }
}

/// `<sanitized node id>-<12 hex digits>`: see [`cache_file_for`].
fn cache_file_stem(bootstrap: &Bootstrap) -> String {
    let id = bootstrap.node_id();
    let mut name: String = id
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        name.push_str("node");
    }
    if name.starts_with('.') {
        // Not a hidden file.
        name.replace_range(0..1, "_");
    }
    let mut hash = Fnv::new();
    hash.write(id.as_bytes());
    for server in bootstrap.xds_servers() {
        hash.write(&[0]);
        hash.write(server.server_uri().as_bytes());
    }
    format!("{name}-{:012x}", hash.finish() & 0xffff_ffff_ffff)
}

/// FNV-1a, 64 bits: the stable hash of cache file names and the checksum
/// of their contents (std's `DefaultHasher` may change between Rust
/// releases, which would rename every cache).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The FNV-1a hash of `bytes`, as 16 hex digits: a checksum for cache
/// files (the certificate cache records its join token's this way).
pub fn fnv1a_hex(bytes: &[u8]) -> String {
    let mut hash = Fnv::new();
    hash.write(bytes);
    format!("{:016x}", hash.finish())
}

/// The private, atomic, durable files of the caches (the xDS cache here,
/// mesh-tower's certificate cache next to it), from mesh-fs: the same code
/// writes mesh-control's data directory.
pub use mesh_fs::{read_private_file, write_private_file};

/// What an [`XdsClient`] knows about its cache file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CacheStatus {
    /// The cache file; `None` when the cache is off.
    pub file: Option<PathBuf>,
    /// `Some(t)` while the config in use came from the cache file and no
    /// control server has answered since: `t` is when the file was
    /// written, the last time a control server stood behind that config.
    pub stale_since: Option<SystemTime>,
    /// When this client last wrote the file.
    pub saved_at: Option<SystemTime>,
    /// The [`XdsClient::changes`] value whose config the file holds, once
    /// this client has written it (0 before).
    pub saved_version: u64,
    /// The last problem reading or writing the file (cleared by a
    /// successful write): what the WARN said.
    pub problem: Option<String>,
}

/// A handle to the xDS client task. Cheap to clone; the task ends with the
/// last clone (its ADS stream closes and its cache file is no longer
/// written). [`XdsClient::downgrade`] gives a handle that does not keep it
/// running.
///
/// # Static stability
///
/// A workload must be able to start while the control plane is down. The
/// client writes the last config a control server sent to a cache file
/// (on by default; [`cache_file_for`] says where, and how to move it or
/// turn it off), after every change: coalesced, off the runtime's threads,
/// mode 0600, fsynced and renamed into place. A client that starts and
/// hears from no control server within [`ClientOptions::cache_wait`] (1 s,
/// far below the 20 s connect timeout, so a black-holed control plane
/// costs a second; sooner when every server refuses the connection) loads
/// the cache and routes with it. It says so: a WARN naming the file and
/// the config's age, [`XdsClient::stale_since`] and
/// [`XdsClient::cache_status`], and the config dump's
/// `control_server.cache.stale`. It keeps reconnecting; the first response
/// of a control server clears the mark, and that server's config replaces
/// the cached one as it arrives. A cache that cannot be used (corrupt,
/// truncated, written by a newer version, for another node, writable by
/// others) is reported in the log and in [`CacheStatus::problem`] and
/// ignored: the client then waits for a control server as if it had none.
#[derive(Clone)]
pub struct XdsClient {
    inner: Arc<Inner>,
}

/// A handle that does not keep the client running: what an observer of a
/// client holds (a metrics collector reading it at scrape time), so that
/// dropping the application's last [`XdsClient`] still ends the task.
/// [`WeakXdsClient::upgrade`] gives the client back while it runs.
#[derive(Clone)]
pub struct WeakXdsClient {
    inner: Weak<Inner>,
}

impl WeakXdsClient {
    /// The client, while some [`XdsClient`] handle still keeps it running;
    /// `None` once the last one was dropped (the task has ended or is
    /// ending).
    pub fn upgrade(&self) -> Option<XdsClient> {
        self.inner.upgrade().map(|inner| XdsClient { inner })
    }
}

impl std::fmt::Debug for WeakXdsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.upgrade() {
            Some(client) => f.debug_tuple("WeakXdsClient").field(&client).finish(),
            None => f.write_str("WeakXdsClient(ended)"),
        }
    }
}

/// What the handles share; the task holds none of it but the receiving end
/// of `commands`, so dropping the last `Inner` ends the task.
struct Inner {
    bootstrap: Bootstrap,
    published: Arc<Published>,
    commands: mpsc::UnboundedSender<Command>,
    subscribed: Mutex<HashSet<Name>>,
    changes: watch::Receiver<u64>,
}

/// What the task publishes and handles read.
pub(crate) struct Published {
    /// Shared with the routing layers that cache it per service clone
    /// ([`XdsClient::snapshot_cell`]).
    pub(crate) snapshot: Arc<ArcSwap<Snapshot>>,
    /// The snapshot's halves: the ADS driver's and the DNS answers
    /// (`crate::dns`); every snapshot is stored through it.
    pub(crate) dns: crate::dns::Overlay,
    status: ArcSwap<SyncStatus>,
    /// Per-resource status and raw forms, for CSDS and the config dump.
    report: ArcSwap<ResourceReport>,
    last_error: Mutex<Option<Error>>,
    server: Mutex<Option<String>>,
    cache: Mutex<CacheStatus>,
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
    /// Starts the client with default options: the cache file where
    /// [`cache_file_for`] says (the process environment, then the
    /// bootstrap, then the default directory).
    ///
    /// # Panics
    /// Outside a tokio runtime (it spawns the client task).
    pub fn start(bootstrap: Bootstrap) -> XdsClient {
        XdsClient::start_with(bootstrap, ClientOptions::default())
    }

    /// Starts the client: spawns the task that connects, subscribes to
    /// `options`' listeners, and keeps the snapshot current (and the cache
    /// file: see [`XdsClient`]).
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
        let cache_file = options.resolve_cache_file(&bootstrap);
        let published = Arc::new(Published {
            snapshot: Arc::new(ArcSwap::from_pointee(Snapshot::default())),
            status: ArcSwap::from_pointee(SyncStatus::default()),
            dns: crate::dns::Overlay::default(),
            report: ArcSwap::from_pointee(state.resource_report()),
            last_error: Mutex::new(None),
            server: Mutex::new(None),
            cache: Mutex::new(CacheStatus {
                file: cache_file.clone(),
                ..CacheStatus::default()
            }),
        });
        let node_id = bootstrap.node_id().to_owned();
        let cache = cache_file.map(|path| {
            let (jobs, receiver) = watch::channel(None);
            // Files named after their node may be pruned around them.
            let own_name = format!("{}.{CACHE_EXTENSION}", cache_file_stem(&bootstrap));
            let prune = path.file_name().is_some_and(|n| *n == *own_name);
            tokio::spawn(write_cache(
                CacheWriter {
                    path: path.clone(),
                    node_id: node_id.clone(),
                    prune,
                    published: published.clone(),
                },
                receiver,
            ));
            CacheFile { path, jobs }
        });
        tracing::debug!(
            node = %node_id,
            cache = ?cache.as_ref().map(|c| &c.path),
            "xDS client starting"
        );
        let (commands_tx, commands_rx) = mpsc::unbounded_channel();
        let (changes_tx, changes_rx) = watch::channel(0u64);
        let changes_tx = Arc::new(changes_tx);
        tokio::spawn(crate::dns::run(
            options.resolve_dns_server(),
            crate::dns::Target {
                snapshot: Arc::downgrade(&published),
                changes: Arc::downgrade(&changes_tx),
            },
            changes_rx.clone(),
        ));
        let cache_due = cache.as_ref().map(|_| Instant::now() + options.cache_wait);
        let driver = Driver {
            state,
            servers: bootstrap.xds_servers().to_vec(),
            bootstrap: bootstrap.clone(),
            options,
            published: published.clone(),
            changes: changes_tx,
            commands: commands_rx,
            node_id,
            cache,
            cache_due,
            stale: false,
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

    /// A handle that does not keep this client running (see
    /// [`WeakXdsClient`]).
    pub fn downgrade(&self) -> WeakXdsClient {
        WeakXdsClient {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// What this client knows about its cache file: where it is, whether
    /// the config in use came from it (stale), when it was last written,
    /// and the last problem with it.
    pub fn cache_status(&self) -> CacheStatus {
        lock(&self.inner.published.cache).clone()
    }

    /// `Some(t)` while this client serves the config of its cache file
    /// because no control server has answered since it started: `t` is
    /// when that config was written (see [`CacheStatus::stale_since`]).
    pub fn stale_since(&self) -> Option<SystemTime> {
        lock(&self.inner.published.cache).stale_since
    }

    /// The current snapshot: one lock-free atomic load.
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.inner.published.snapshot.load()
    }

    /// The cell the snapshot is published into, for a reader that keeps
    /// an `arc_swap::Cache` of it: a request then checks one pointer
    /// instead of a full load (mesh-tower's routing layer does, per
    /// service clone; about 50 instructions per request less).
    pub fn snapshot_cell(&self) -> Arc<ArcSwap<Snapshot>> {
        Arc::clone(&self.inner.published.snapshot)
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
                Readiness::Missing(why) => {
                    let server = self.server_description();
                    return Err(Error::new(
                        ErrorKind::NotFound,
                        match why {
                            Some(why) => format!(
                                "xDS listener {name:?} does not exist on the control server \
                                 ({server}): {why}"
                            ),
                            None => format!(
                                "xDS listener {name:?} does not exist on the control server \
                                 ({server})"
                            ),
                        },
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
    /// The bootstrap (its join token is read at every stream).
    bootstrap: Bootstrap,
    options: ClientOptions,
    published: Arc<Published>,
    changes: Arc<watch::Sender<u64>>,
    commands: mpsc::UnboundedReceiver<Command>,
    node_id: String,
    cache: Option<CacheFile>,
    /// When to give up waiting for a control server and load the cache;
    /// `None` once that is decided (loaded, tried, or a server answered).
    cache_due: Option<Instant>,
    /// The config in use came from the cache and no server has answered.
    stale: bool,
}

/// The cache file and the channel to its writer.
struct CacheFile {
    path: PathBuf,
    jobs: watch::Sender<Option<Arc<SaveJob>>>,
}

/// A config to write: the raw resources (shared with the state, not
/// copied) and the `changes` value they are.
struct SaveJob {
    version: u64,
    config: RawConfig,
}

/// Resolves when the start-up wait for a control server is over; never
/// once there is nothing left to decide.
async fn cache_due(due: Option<Instant>) {
    match due {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
            // Every server failed (refused, most likely): no point waiting
            // out the rest of the cache wait.
            if !self.state.has_received() && self.cache_due.is_some() {
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
                    () = cache_due(self.cache_due) => self.load_cache(),
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
                // A server that neither accepts nor refuses (a black hole)
                // holds the connection attempt up to the connect timeout.
                () = cache_due(self.cache_due) => self.load_cache(),
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
            let _ = tx.send(Box::new(req));
        }
        let result = self.drive_stream(&mut client, &tx, rx, server).await;
        self.state.on_disconnected();
        result
    }

    async fn drive_stream(
        &mut self,
        client: &mut AdsClient,
        tx: &mpsc::UnboundedSender<Box<DiscoveryRequest>>,
        rx: mpsc::UnboundedReceiver<Box<DiscoveryRequest>>,
        server: &XdsServer,
    ) -> Result<bool, Shutdown> {
        let uri = server.server_uri();
        // Boxed in the channel: its blocks hold 32 slots of the item, and a
        // request is over 500 bytes (two blocks of 17 KB for a stream's
        // life, against 256 bytes each boxed).
        let mut request = tonic::Request::new(UnboundedReceiverStream::new(rx).map(|req| *req));
        // A `mesh_ca` workload authenticates with its join token (mesh-control
        // with a CA refuses anonymous streams). Over TLS only: over plaintext
        // the token would be readable on the wire, and a control server
        // without TLS has no CA to check it. Read at every stream, so that a
        // token rotated on disk is sent at the next reconnect.
        if server.tls().is_some() {
            match self.bootstrap.join_token() {
                Ok(None) => {}
                Ok(Some(token)) => match format!("Bearer {token}").parse() {
                    Ok(value) => {
                        request.metadata_mut().insert("authorization", value);
                    }
                    Err(_) => {
                        self.record_error(Error::connect(
                            "the join token of certificate_providers.mesh is not valid in a \
                             gRPC header (printable ASCII only); sent without it",
                        ));
                    }
                },
                Err(e) => self.record_error(e),
            }
        }
        let call = client.stream_aggregated_resources(request);
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
                        let _ = tx.send(Box::new(req));
                    }
                }
                () = cache_due(self.cache_due) => {
                    self.load_cache();
                    // The cached listeners are subscribed on this stream too.
                    for req in self.state.pending_requests() {
                        let _ = tx.send(Box::new(req));
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
                            self.on_answered(uri);
                        }
                        for req in self.state.on_response(response) {
                            let _ = tx.send(Box::new(req));
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
                        let _ = tx.send(Box::new(req));
                    }
                }
                () = cache_due(self.cache_due) => {
                    self.load_cache();
                    for req in self.state.pending_requests() {
                        let _ = tx.send(Box::new(req));
                    }
                }
            }
        }
    }

    /// The first response of a stream: the server is there, the cache is
    /// not needed (any more).
    fn on_answered(&mut self, uri: &str) {
        *lock(&self.published.last_error) = None;
        *lock(&self.published.server) = Some(uri.to_owned());
        self.cache_due = None;
        if self.stale {
            self.stale = false;
            lock(&self.published.cache).stale_since = None;
            tracing::info!(
                server = uri,
                "xDS server answered: its config replaces the cached one; no longer stale"
            );
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
        self.published
            .dns
            .publish(&self.published.snapshot, snapshot);
        self.changes.send_modify(|v| *v = v.wrapping_add(1));
        // Only config a control server sent is written: the cache's own
        // config is on disk already.
        if let Some(cache) = &self.cache
            && self.state.has_received()
        {
            let version = *self.changes.borrow();
            cache.jobs.send_replace(Some(Arc::new(SaveJob {
                version,
                config: self.state.raw_config(),
            })));
        }
    }

    /// The start-up wait is over and no server has answered: serve the
    /// cached config, if there is a usable one.
    fn load_cache(&mut self) {
        self.cache_due = None;
        let Some(path) = self.cache.as_ref().map(|c| c.path.clone()) else {
            return;
        };
        if self.state.has_received() {
            return;
        }
        let contents = match load_cache(&path, &self.node_id) {
            Ok(Some(contents)) => contents,
            Ok(None) => {
                tracing::info!(
                    path = %path.display(),
                    "no xDS server has answered yet and there is no cached config: waiting for one"
                );
                return;
            }
            Err(e) => {
                tracing::warn!("{e}");
                lock(&self.published.cache).problem = Some(e.to_string());
                return;
            }
        };
        let written = contents.written_at;
        let age = SystemTime::now()
            .duration_since(written)
            .unwrap_or_default();
        let loaded = self.state.load_cached(contents.responses);
        let last_error = lock(&self.published.last_error)
            .as_ref()
            .map_or_else(|| "none yet".to_owned(), ToString::to_string);
        tracing::warn!(
            path = %path.display(),
            resources = loaded,
            written = %crate::dump::rfc3339(written),
            "no xDS server answered within {:?}: serving the cached config written {} ago \
             (stale); reconnecting in the background (last error: {last_error})",
            self.options.cache_wait,
            human_duration(age),
        );
        self.stale = true;
        lock(&self.published.cache).stale_since = Some(written);
        if let Some((snapshot, status)) = self.state.take_changes() {
            self.published
                .report
                .store(Arc::new(self.state.resource_report()));
            self.published.status.store(status);
            self.published
                .dns
                .publish(&self.published.snapshot, snapshot);
            self.changes.send_modify(|v| *v = v.wrapping_add(1));
        }
    }
}

/// A duration for people: `42s`, `3m05s`, `2h10m`, `4d03h`.
pub(crate) fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// What the cache writer needs.
struct CacheWriter {
    path: PathBuf,
    node_id: String,
    /// The file is named after its node: stale files of other nodes around
    /// it may be removed.
    prune: bool,
    published: Arc<Published>,
}

/// Writes the latest config handed over, one write at a time off the
/// runtime's threads (fsync may take a while): configs that arrive during a
/// write are coalesced into the next one. Ends when the client task does,
/// after writing what it was last given.
async fn write_cache(writer: CacheWriter, mut jobs: watch::Receiver<Option<Arc<SaveJob>>>) {
    let mut last_problem: Option<String> = None;
    let mut pruned = !writer.prune;
    while jobs.changed().await.is_ok() {
        let Some(job) = jobs.borrow_and_update().clone() else {
            continue;
        };
        let (path, node_id) = (writer.path.clone(), writer.node_id.clone());
        let responses = job.clone();
        let prune = !pruned;
        // The file's buffer is allocated here, on the runtime's thread, and
        // filled on the blocking one: a config of a few hundred KB built
        // there would grow that thread's own allocator arena, which stays
        // resident after the write (and the pool may run the next write on
        // another thread, with another arena).
        let buffer = Vec::with_capacity(raw_cache_len(&node_id, &responses.config));
        let written = tokio::task::spawn_blocking(move || {
            let written = save_raw_cache(&path, &node_id, &responses.config, buffer)?;
            if prune && let Some(dir) = path.parent() {
                prune_stale_caches(dir, &path);
            }
            Ok(written)
        })
        .await
        .unwrap_or_else(|e| {
            Err(Error::new(
                ErrorKind::Cache,
                format!(
                    "cannot write the xDS cache {}: the writing thread failed: {e}",
                    writer.path.display()
                ),
            ))
        });
        let mut status = lock(&writer.published.cache);
        match written {
            Ok(at) => {
                pruned = true;
                status.saved_at = Some(at);
                status.saved_version = job.version;
                status.problem = None;
                last_problem = None;
                tracing::debug!(path = %writer.path.display(), version = job.version, "xDS cache written");
            }
            Err(e) => {
                let message = e.to_string();
                // Once per distinct problem, not once per config change.
                if last_problem.as_deref() != Some(message.as_str()) {
                    tracing::warn!("{message}");
                }
                status.problem = Some(message.clone());
                last_problem = Some(message);
            }
        }
    }
}

/// Whether `name` is a cache file named after its node
/// (`<node>-<12 hex>.xds` or `.svid`).
fn is_node_cache_name(name: &str) -> bool {
    let Some((stem, extension)) = name.rsplit_once('.') else {
        return false;
    };
    if extension != CACHE_EXTENSION && extension != "svid" {
        return false;
    }
    let Some((node, hash)) = stem.rsplit_once('-') else {
        return false;
    };
    !node.is_empty()
        && hash.len() == 12
        && hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Removes the node-named cache files in `dir` nobody has written for
/// [`PRUNE_AFTER`] (never `keep`). Best effort: a file that cannot be read
/// or removed stays.
fn prune_stale_caches(dir: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let path = entry.path();
        let stale = entry.file_name().to_str().is_some_and(is_node_cache_name)
            && path != keep
            && entry
                .metadata()
                .ok()
                .filter(std::fs::Metadata::is_file)
                .and_then(|m| m.modified().ok())
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > PRUNE_AFTER);
        if stale && std::fs::remove_file(&path).is_ok() {
            tracing::debug!(path = %path.display(), "removed a cache file unused for 30 days");
        }
    }
}

/// A cache file's contents.
#[derive(Debug, Clone, PartialEq)]
struct CacheContents {
    written_at: SystemTime,
    node_id: String,
    responses: Vec<DiscoveryResponse>,
}

/// The cache file's bytes: the header (magic line, format, when written,
/// payload length, FNV-1a checksum of the payload), then the payload: the
/// node id (u32 length, UTF-8) and one length-delimited `DiscoveryResponse`
/// per resource type. The length and checksum catch a truncated or damaged
/// file that protobuf alone would half-read.
#[cfg(test)]
fn encode_cache(node_id: &str, written_at: SystemTime, responses: &[DiscoveryResponse]) -> Vec<u8> {
    let len = responses
        .iter()
        .map(|r| r.encoded_len())
        .map(|n| prost::length_delimiter_len(n) + n)
        .sum();
    frame_cache(Vec::new(), node_id, written_at, len, |out| {
        for r in responses {
            let _ = r.encode_length_delimited(out);
        }
    })
}

/// [`encode_cache`] of the responses `config` stands for, without copying
/// them, in `out` (cleared; [`raw_cache_len`] bytes are needed).
fn encode_raw_cache(
    node_id: &str,
    written_at: SystemTime,
    config: &RawConfig,
    out: Vec<u8>,
) -> Vec<u8> {
    frame_cache(out, node_id, written_at, config.encoded_len(), |out| {
        config.encode_length_delimited(out);
    })
}

/// The size of the cache file of `config`.
fn raw_cache_len(node_id: &str, config: &RawConfig) -> usize {
    CACHE_HEADER_LEN + 4 + node_id.len() + config.encoded_len()
}

/// The cache file's bytes around responses of `len` bytes that `write`
/// appends, in `out` (cleared) grown once to the final size: a config of a
/// few hundred KB is not built twice, nor grown by doubling.
fn frame_cache(
    mut out: Vec<u8>,
    node_id: &str,
    written_at: SystemTime,
    len: usize,
    write: impl FnOnce(&mut Vec<u8>),
) -> Vec<u8> {
    let id = node_id.as_bytes();
    let payload_len = 4 + id.len() + len;
    let millis = written_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    out.clear();
    out.reserve_exact(CACHE_HEADER_LEN + payload_len);
    out.extend_from_slice(CACHE_MAGIC);
    out.extend_from_slice(&CACHE_FORMAT.to_be_bytes());
    out.extend_from_slice(&millis.to_be_bytes());
    out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    // The checksum, written once the payload is there.
    let checksum_at = out.len();
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&u32::try_from(id.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(id);
    write(&mut out);
    debug_assert_eq!(out.len(), CACHE_HEADER_LEN + payload_len);
    let mut checksum = Fnv::new();
    checksum.write(&out[CACHE_HEADER_LEN..]);
    out[checksum_at..checksum_at + 8].copy_from_slice(&checksum.finish().to_be_bytes());
    out
}

/// Reads the bytes [`encode_cache`] wrote; the error says what is wrong
/// with them.
fn decode_cache(bytes: &[u8]) -> Result<CacheContents, String> {
    if !bytes.starts_with(CACHE_MAGIC) {
        if bytes.is_empty() || CACHE_MAGIC.starts_with(bytes) {
            return Err(format!(
                "it is truncated: {} bytes, not even its header",
                bytes.len()
            ));
        }
        return Err(
            "it is not a proxyless xDS cache (it lacks the cache's first line; a file of an \
             older proxyless, or something else)"
                .to_owned(),
        );
    }
    if bytes.len() < CACHE_HEADER_LEN {
        return Err(format!(
            "it is truncated: {} bytes, shorter than its {CACHE_HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    let mut at = CACHE_MAGIC.len();
    let mut take = |n: usize| {
        let field = &bytes[at..at + n];
        at += n;
        field
    };
    let format = u32::from_be_bytes(take(4).try_into().unwrap_or_default());
    let millis = u64::from_be_bytes(take(8).try_into().unwrap_or_default());
    let length = u64::from_be_bytes(take(8).try_into().unwrap_or_default());
    let checksum = u64::from_be_bytes(take(8).try_into().unwrap_or_default());
    if format > CACHE_FORMAT {
        return Err(format!(
            "it was written by a newer proxyless (cache format {format}; this one reads format \
             {CACHE_FORMAT})"
        ));
    }
    if format == 0 {
        return Err("it is corrupt: its header names format 0".to_owned());
    }
    let payload = &bytes[CACHE_HEADER_LEN..];
    let have = payload.len() as u64;
    if have < length {
        return Err(format!(
            "it is truncated: its header announces {length} bytes of config, {have} follow"
        ));
    }
    if have > length {
        return Err(format!(
            "it is corrupt: {} bytes follow the {length} bytes of config its header announces",
            have - length
        ));
    }
    let mut sum = Fnv::new();
    sum.write(payload);
    if sum.finish() != checksum {
        return Err(
            "it is corrupt: its checksum does not match (the config changed after it was written)"
                .to_owned(),
        );
    }
    let written_at = UNIX_EPOCH
        .checked_add(Duration::from_millis(millis))
        .ok_or_else(|| format!("it is corrupt: its write time ({millis} ms) is out of range"))?;
    let corrupt = |what: &str| format!("it is corrupt: {what}");
    let id_len = payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| corrupt("no node id"))? as usize;
    let id = payload
        .get(4..4 + id_len)
        .ok_or_else(|| corrupt("the node id runs past the end"))?;
    let node_id =
        String::from_utf8(id.to_vec()).map_err(|_| corrupt("the node id is not UTF-8"))?;
    let mut rest = &payload[4 + id_len..];
    let mut responses = Vec::new();
    while !rest.is_empty() {
        let response = DiscoveryResponse::decode_length_delimited(&mut rest).map_err(|e| {
            corrupt(&format!(
                "response {} does not decode: {e}",
                responses.len() + 1
            ))
        })?;
        responses.push(response);
    }
    Ok(CacheContents {
        written_at,
        node_id,
        responses,
    })
}

/// Writes the cache for `node_id` atomically (see [`write_private_file`]);
/// returns when it was written.
#[cfg(test)]
fn save_cache(
    path: &Path,
    node_id: &str,
    responses: &[DiscoveryResponse],
) -> Result<SystemTime, Error> {
    let now = SystemTime::now();
    write_cache_bytes(path, &encode_cache(node_id, now, responses))?;
    Ok(now)
}

/// Writes `config` as the cache of `node_id` to `path`, encoded in
/// `buffer`; when it was written.
fn save_raw_cache(
    path: &Path,
    node_id: &str,
    config: &RawConfig,
    buffer: Vec<u8>,
) -> Result<SystemTime, Error> {
    let now = SystemTime::now();
    write_cache_bytes(path, &encode_raw_cache(node_id, now, config, buffer))?;
    Ok(now)
}

fn write_cache_bytes(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    write_private_file(path, bytes).map_err(|e| {
        Error::new(
            ErrorKind::Cache,
            format!("cannot write the xDS cache {}: {e}", path.display()),
        )
    })
}

/// Reads the cache of `node_id`; `None` when there is none. The error names
/// the file and says what is wrong with it.
fn load_cache(path: &Path, node_id: &str) -> Result<Option<CacheContents>, Error> {
    let ignored = |why: String| {
        Error::new(
            ErrorKind::Cache,
            format!("ignoring the xDS cache {}: {why}", path.display()),
        )
    };
    let bytes = match read_private_file(path, MAX_CACHE_BYTES) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Ok(None),
        Err(e) => return Err(ignored(format!("cannot read it: {e}"))),
    };
    let contents = decode_cache(&bytes).map_err(ignored)?;
    if contents.node_id != node_id {
        return Err(ignored(format!(
            "it was written for node {:?}, and this client is node {node_id:?}",
            contents.node_id
        )));
    }
    Ok(Some(contents))
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

    fn response(version: &str, type_url: &str) -> DiscoveryResponse {
        DiscoveryResponse {
            version_info: version.into(),
            type_url: type_url.into(),
            ..DiscoveryResponse::default()
        }
    }

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn bootstrap_json(extra: &str) -> Bootstrap {
        Bootstrap::from_json(&format!(
            r#"{{"xds_servers": [{{"server_uri": "127.0.0.1:15010",
                "channel_creds": [{{"type": "insecure"}}]}}],
              "node": {{"id": "catalog-v1"}}{extra}}}"#
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_cache_file_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("xds.cache");
        assert!(load_cache(&path, "n").unwrap().is_none());
        let responses = vec![response("1", "t"), response("2", "")];
        let written = save_cache(&path, "n", &responses).unwrap();
        let loaded = load_cache(&path, "n").unwrap().unwrap();
        assert_eq!(loaded.responses, responses);
        assert_eq!(loaded.node_id, "n");
        let drift = written
            .duration_since(loaded.written_at)
            .unwrap_or_default();
        assert!(drift < Duration::from_millis(1), "{drift:?}");
        // Written again in place; no temporary file is left behind.
        save_cache(&path, "n", &responses[..1]).unwrap();
        assert_eq!(load_cache(&path, "n").unwrap().unwrap().responses.len(), 1);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["xds.cache"]);
    }

    #[test]
    fn the_cache_of_held_resources_is_the_cache_of_their_responses() {
        use mesh_testkit::snapshot::xds::{cluster, listener};
        let mut state = AdsState::new(
            Bootstrap::builder("127.0.0.1:1", "n")
                .build()
                .unwrap()
                .node(),
        )
        .keep_raw(true);
        state.load_cached(vec![
            DiscoveryResponse {
                version_info: "1".into(),
                type_url: mesh_core::xds::LISTENER_TYPE.into(),
                resources: vec![listener("a", "rc-a")],
                ..DiscoveryResponse::default()
            },
            DiscoveryResponse {
                type_url: mesh_core::xds::CLUSTER_TYPE.into(),
                resources: vec![cluster("c1", "c1")],
                ..DiscoveryResponse::default()
            },
        ]);
        let config = state.raw_config();
        assert!(!config.is_empty());
        let at = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        // A reused buffer holding something else: cleared first.
        let bytes = encode_raw_cache("node-1", at, &config, vec![7; 3]);
        assert_eq!(bytes, encode_cache("node-1", at, &state.cached_responses()));
        assert_eq!(bytes.len(), raw_cache_len("node-1", &config));
        let decoded = decode_cache(&bytes).unwrap();
        assert_eq!(decoded.responses, state.cached_responses());
        assert_eq!(decoded.node_id, "node-1");
        assert_eq!(decoded.written_at, at);
    }

    #[cfg(unix)]
    #[test]
    fn cache_files_are_private_and_others_files_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("new").join("xds.cache");
        save_cache(&path, "n", &[response("1", "t")]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        // Writable by others: someone else could have written the config.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let e = load_cache(&path, "n").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Cache);
        let msg = e.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("mode 666 lets others write it"), "{msg}");
        // A directory is not a cache.
        let e = load_cache(dir.path(), "n").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    /// Each way a cache can be unusable is an error naming the file and the
    /// problem (the client logs it and carries on without the cache), never
    /// a panic.
    #[test]
    fn corrupt_truncated_foreign_and_future_caches_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("xds.cache");
        let good = encode_cache(
            "n",
            SystemTime::now(),
            &[response(
                "1",
                "type.googleapis.com/envoy.config.listener.v3.Listener",
            )],
        );
        let check = |bytes: &[u8], needle: &str| {
            std::fs::write(&path, bytes).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            }
            let e = load_cache(&path, "n").unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Cache);
            let msg = e.to_string();
            assert!(
                msg.starts_with(&format!("ignoring the xDS cache {}: ", path.display())),
                "{msg}"
            );
            assert!(msg.contains(needle), "{needle:?} in {msg}");
        };
        // Truncated anywhere: inside the magic line, the header, the payload.
        for cut in [
            0,
            5,
            CACHE_MAGIC.len() + 3,
            CACHE_HEADER_LEN,
            good.len() - 1,
        ] {
            check(&good[..cut], "truncated");
        }
        // Damaged: a flipped payload byte, trailing garbage, a foreign file
        // (the previous, headerless format among them).
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        check(&flipped, "checksum does not match");
        let mut longer = good.clone();
        longer.extend_from_slice(b"junk");
        check(&longer, "4 bytes follow");
        check(&[0x7f, 1, 2], "not a proxyless xDS cache");
        check(b"{\"json\": true}", "not a proxyless xDS cache");
        // A payload whose checksum matches but whose protobuf does not decode.
        let mut payload = 1u32.to_be_bytes().to_vec();
        payload.extend_from_slice(b"n\x0a\xff");
        let mut sum = Fnv::new();
        sum.write(&payload);
        let mut bad = CACHE_MAGIC.to_vec();
        bad.extend_from_slice(&1u32.to_be_bytes());
        bad.extend_from_slice(&0u64.to_be_bytes());
        bad.extend_from_slice(&(payload.len() as u64).to_be_bytes());
        bad.extend_from_slice(&sum.finish().to_be_bytes());
        bad.extend_from_slice(&payload);
        check(&bad, "response 1 does not decode");
        // Written by a newer proxyless: not misread.
        let mut future = good.clone();
        future[CACHE_MAGIC.len()..CACHE_MAGIC.len() + 4].copy_from_slice(&7u32.to_be_bytes());
        check(
            &future,
            "newer proxyless (cache format 7; this one reads format 1)",
        );
        let mut zero = good.clone();
        zero[CACHE_MAGIC.len()..CACHE_MAGIC.len() + 4].copy_from_slice(&0u32.to_be_bytes());
        check(&zero, "format 0");
        // Another node's.
        check(
            &encode_cache("other", SystemTime::now(), &[]),
            "written for node \"other\", and this client is node \"n\"",
        );
        // Arbitrary bytes after a valid magic line never panic.
        for n in 0..64u8 {
            let mut noise = CACHE_MAGIC.to_vec();
            noise.extend((0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)));
            let _ = decode_cache(&noise);
        }
    }

    #[test]
    fn the_cache_location_is_env_then_bootstrap_then_default() {
        let plain = bootstrap_json("");
        let stem = cache_file_stem(&plain);
        assert!(stem.starts_with("catalog-v1-"), "{stem}");
        let home = [("HOME", "/home/app")];
        assert_eq!(
            cache_file_for(&plain, env(&home)),
            Some(PathBuf::from(format!(
                "/home/app/.cache/proxyless/{stem}.xds"
            )))
        );
        let xdg = [("HOME", "/home/app"), ("XDG_CACHE_HOME", "/xdg")];
        assert_eq!(
            cache_file_for(&plain, env(&xdg)),
            Some(PathBuf::from(format!("/xdg/proxyless/{stem}.xds")))
        );
        // A relative XDG_CACHE_HOME is ignored, as the XDG spec says.
        let relative = [("HOME", "/home/app"), ("XDG_CACHE_HOME", "cache")];
        assert_eq!(
            default_cache_dir(env(&relative)),
            PathBuf::from("/home/app/.cache/proxyless")
        );
        assert_eq!(
            default_cache_dir(env(&[("TMPDIR", "/scratch")])),
            PathBuf::from("/scratch/proxyless-cache")
        );

        // The bootstrap's proxyless.cache_file.
        let file = bootstrap_json(r#", "proxyless": {"cache_file": "/var/cache/app/xds.cache"}"#);
        assert_eq!(
            cache_file_for(&file, env(&home)),
            Some(PathBuf::from("/var/cache/app/xds.cache"))
        );
        let dir = bootstrap_json(r#", "proxyless": {"cache_file": "/var/cache/app/"}"#);
        assert_eq!(
            cache_file_for(&dir, env(&home)),
            Some(PathBuf::from(format!("/var/cache/app/{stem}.xds")))
        );
        for off in ["false", "null"] {
            let b = bootstrap_json(&format!(r#", "proxyless": {{"cache_file": {off}}}"#));
            assert_eq!(cache_file_for(&b, env(&home)), None, "{off}");
        }
        let on = bootstrap_json(r#", "proxyless": {"cache_file": true}"#);
        assert_eq!(
            cache_file_for(&on, env(&home)),
            cache_file_for(&plain, env(&home))
        );

        // The environment wins over the bootstrap.
        let tmp = tempfile::tempdir().unwrap();
        let existing = tmp.path().to_str().unwrap();
        for (value, expected) in [
            ("off", None),
            ("OFF", None),
            ("0", None),
            ("/x/y.cache", Some(PathBuf::from("/x/y.cache"))),
            ("/x/dir/", Some(PathBuf::from(format!("/x/dir/{stem}.xds")))),
            (existing, Some(tmp.path().join(format!("{stem}.xds")))),
        ] {
            let vars = [("HOME", "/home/app"), (CACHE_ENV_VAR, value)];
            assert_eq!(cache_file_for(&file, env(&vars)), expected, "{value}");
        }
        // Empty counts as unset.
        let vars = [("HOME", "/home/app"), (CACHE_ENV_VAR, " ")];
        assert_eq!(
            cache_file_for(&file, env(&vars)),
            Some(PathBuf::from("/var/cache/app/xds.cache"))
        );

        // Options override everything.
        let options = ClientOptions::default().env_lookup(|_| Some("off".to_owned()));
        assert_eq!(options.resolve_cache_file(&plain), None);
        let options = options.cache_file("/explicit");
        assert_eq!(
            options.resolve_cache_file(&plain),
            Some(PathBuf::from("/explicit"))
        );
        assert_eq!(options.no_cache().resolve_cache_file(&file), None);
    }

    #[test]
    fn cache_file_names_are_per_node_and_per_mesh() {
        let named = |id: &str, servers: &[&str]| {
            let mut b = Bootstrap::builder(servers[0], id);
            for s in &servers[1..] {
                b = b.server(*s);
            }
            cache_file_stem(&b.build().unwrap())
        };
        let a = named("catalog-v1", &["127.0.0.1:15010"]);
        assert_eq!(a.len(), "catalog-v1-".len() + 12);
        assert!(is_node_cache_name(&format!("{a}.xds")), "{a}");
        assert!(is_node_cache_name(&format!("{a}.svid")), "{a}");
        assert_ne!(a, named("catalog-v2", &["127.0.0.1:15010"]));
        assert_ne!(a, named("catalog-v1", &["127.0.0.1:15011"]));
        assert_ne!(
            a,
            named("catalog-v1", &["127.0.0.1:15010", "127.0.0.1:15011"])
        );
        assert_eq!(a, named("catalog-v1", &["127.0.0.1:15010"]), "stable");
        // Sanitized, yet ids that sanitize alike keep apart by the hash.
        let slash = named("ns/pod:1", &["h:1"]);
        assert!(slash.starts_with("ns_pod_1-"), "{slash}");
        assert_ne!(slash, named("ns_pod_1", &["h:1"]));
        assert!(named(".hidden", &["h:1"]).starts_with("_hidden-"));
        assert!(named("", &["h:1"]).starts_with("node-"));
        assert_eq!(
            named(&"x".repeat(300), &["h:1"]).len(),
            64 + 1 + 12,
            "long ids are cut"
        );
        assert!(!is_node_cache_name("xds.cache"));
        assert!(!is_node_cache_name("a-0123456789ab.txt"));
        assert!(!is_node_cache_name("a-0123456789AB.xds"));
        assert_eq!(
            sibling_file(Path::new("/c/catalog-v1-0123456789ab.xds"), "svid"),
            PathBuf::from("/c/catalog-v1-0123456789ab.svid")
        );
        assert_eq!(
            sibling_file(Path::new("/c/xds"), "svid"),
            PathBuf::from("/c/xds.svid")
        );
        assert_eq!(
            sibling_file(Path::new("/c/x.svid"), "svid"),
            PathBuf::from("/c/x.svid.svid")
        );
    }

    #[test]
    fn bad_proxyless_settings_name_the_field() {
        for (settings, needle) in [
            (r#""cache"#, "proxyless must be an object"),
            (
                r#"{"cache_fil": "/x"}"#,
                "proxyless.cache_fil is not a proxyless setting",
            ),
            (
                r#"{"cache_file": 3}"#,
                "proxyless.cache_file must be a file path",
            ),
            (
                r#"{"cache_file": ""}"#,
                "proxyless.cache_file must be a file path",
            ),
        ] {
            let settings: Value = serde_json::from_str(settings)
                .unwrap_or_else(|_| Value::String("cache".to_owned()));
            let e = check_settings(&settings).unwrap_err();
            assert!(e.contains(needle), "{needle:?} in {e}");
            assert!(
                e.contains(r#""proxyless": {"cache_file": "#),
                "example in {e}"
            );
        }
        for good in [
            r#"{}"#,
            r#"{"cache_file": null}"#,
            r#"{"cache_file": "/x"}"#,
        ] {
            let settings: Value = serde_json::from_str(good).unwrap();
            assert!(check_settings(&settings).is_ok(), "{good}");
        }
    }

    #[test]
    fn node_named_caches_unused_for_a_month_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let keep = dir.path().join("me-0123456789ab.xds");
        let old = dir.path().join("gone-0123456789ab.xds");
        let old_cert = dir.path().join("gone-0123456789ab.svid");
        let young = dir.path().join("other-0123456789ab.xds");
        let foreign = dir.path().join("notes.txt");
        for p in [&keep, &old, &old_cert, &young, &foreign] {
            std::fs::write(p, b"x").unwrap();
        }
        let long_ago = SystemTime::now() - PRUNE_AFTER - Duration::from_secs(3600);
        for p in [&keep, &old, &old_cert, &foreign] {
            std::fs::File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_modified(long_ago)
                .unwrap();
        }
        prune_stale_caches(dir.path(), &keep);
        assert!(keep.exists() && young.exists() && foreign.exists());
        assert!(!old.exists() && !old_cert.exists());
    }

    #[test]
    fn ages_read_like_people_write_them() {
        assert_eq!(human_duration(Duration::from_secs(42)), "42s");
        assert_eq!(human_duration(Duration::from_secs(185)), "3m05s");
        assert_eq!(human_duration(Duration::from_secs(7800)), "2h10m");
        assert_eq!(
            human_duration(Duration::from_secs(4 * 86400 + 3 * 3600)),
            "4d03h"
        );
    }
}

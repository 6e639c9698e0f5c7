//! The workload's certificates from the bootstrap's `mesh` certificate
//! provider: files (`file_watcher`, gRFC A29) or mesh-control's CA
//! (`mesh_ca`).
//!
//! ```json
//! "certificate_providers": {"mesh": {"plugin_name": "mesh_ca",
//!   "config": {"token_file": "/etc/mesh/token", "lifetime": "24h"}}}
//! ```
//!
//! With `mesh_ca` the workload generates an ECDSA P-256 key (it never
//! leaves the process), sends a CSR with its join token to mesh-control's
//! admin API (`POST /v1/certificates`; https when the bootstrap's control
//! channel is TLS, verified with its `ca_certificate_file`) and gets its
//! X.509-SVID and the trust bundle back. It renews at half the certificate's
//! remaining lifetime with a new key every time, as Istio's agent does; a
//! failed renewal is logged and retried with backoff while the current
//! certificate keeps serving. Each renewal also brings the current trust
//! bundle, so a root rotation reaches the workload within half a lifetime.
//!
//! Static stability: the certificate, its key and the trust bundle are kept
//! in a cache file next to the xDS cache (the same directory and per-node
//! name, extension `.svid`: see `mesh_xds_client::cache`), written 0600,
//! fsynced and renamed into place after every issue (`mesh_fs`, as the
//! xDS cache is). At start, when
//! mesh-control's CA cannot be reached (or has not answered within 1 s), a
//! cached certificate that is valid for at least another minute is used,
//! with a WARN, and a new one is asked for in the background right away
//! (retried with backoff until the CA answers), so a root that rotated
//! meanwhile is picked up as soon as it can be. The cache never stands in for a refusal: when the CA answers no
//! (an unknown or revoked token), starting fails as it always did. A cache
//! that is corrupt, truncated, written by a newer version, issued for
//! another join token, or writable by others is reported and ignored.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode};
use mesh_core::spiffe::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

use super::admin_client::{AdminClient, control_ca_pem};
use super::file_watcher::{FileWatcher, FileWatcherConfig};
use super::store::{CertStore, Credentials};
use crate::error::{Error, ErrorKind};

/// The certificate provider instance the mesh uses (the name xDS security
/// configs refer to, as Istio's `default` SDS secret).
pub const MESH_PROVIDER_INSTANCE: &str = "mesh";

/// The plugin name of mesh-control's CA provider.
pub const MESH_CA_PLUGIN: &str = "mesh_ca";

const MESH_CA_EXAMPLE: &str = r#""certificate_providers": {"mesh": {"plugin_name": "mesh_ca", "config": {"token_file": "/etc/mesh/token", "lifetime": "24h"}}}"#;
const FILE_WATCHER_EXAMPLE: &str = r#""certificate_providers": {"mesh": {"plugin_name": "file_watcher", "config": {"certificate_file": "cert.pem", "private_key_file": "key.pem", "ca_certificate_file": "ca.pem", "refresh_interval": "600s"}}}"#;

/// Shortest wait before a renewal, so an already expired certificate does
/// not make the renewal loop spin.
const MIN_RENEWAL_WAIT: Duration = Duration::from_millis(200);
/// Backoff after a failed renewal: starts here, doubles, up to the cap.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_CAP: Duration = Duration::from_secs(30);

/// How long a starting workload with a usable cached certificate waits for
/// mesh-control's CA before it starts with the cached one (as the xDS
/// client waits for its control server before using its cache).
const CA_WAIT: Duration = Duration::from_secs(1);

/// A cached certificate is used at start only if it is valid for at least
/// this much longer: enough to serve while the CA comes back, not one that
/// is about to expire under the first connections.
const CACHED_MIN_VALIDITY: Duration = Duration::from_secs(60);

/// The extension of the certificate cache file next to the xDS cache.
const CERT_CACHE_EXTENSION: &str = "svid";
/// The certificate cache's layout; a later one is reported and ignored.
const CERT_CACHE_FORMAT: u64 = 1;
/// A certificate cache larger than this is not a certificate cache.
const CERT_CACHE_MAX_BYTES: u64 = 1 << 20;

/// The workload's certificates, kept current: a [`CertStore`] for the
/// client and the server, fed by the `mesh` certificate provider (see the
/// [module docs](self)). Cheap to clone; the renewal (or file watching)
/// stops when the last clone is dropped.
#[derive(Clone)]
pub struct WorkloadCertificates {
    store: CertStore,
    token: Option<Arc<str>>,
    _background: Arc<Background>,
}

enum Background {
    Files { _watcher: FileWatcher },
    Renewal(JoinHandle<()>),
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Background::Renewal(task) = self {
            task.abort();
        }
    }
}

/// Where `mesh_ca` certificates come from: mesh-control's admin API and the
/// join token that proves the workload's service account.
#[derive(Clone)]
pub struct MeshCaConfig {
    admin: String,
    token: TokenSource,
    ca_pem: Option<Vec<u8>>,
    lifetime: Option<Duration>,
    cache_file: Option<PathBuf>,
}

#[derive(Clone)]
enum TokenSource {
    Inline(String),
    /// Re-read at every renewal: tokens may be rotated on disk.
    File(PathBuf),
}

impl MeshCaConfig {
    /// Certificates from the admin API at `admin` (`host:port`) for the
    /// join `token`; plaintext unless [`MeshCaConfig::ca_pem`] is set.
    pub fn new(admin: impl Into<String>, token: impl Into<String>) -> Self {
        MeshCaConfig {
            admin: admin.into(),
            token: TokenSource::Inline(token.into()),
            ca_pem: None,
            lifetime: None,
            cache_file: None,
        }
    }

    /// Keeps the certificate, its key and the trust bundle in `path` (0600,
    /// rewritten atomically at every issue), and starts from it when the CA
    /// cannot be reached (see [`WorkloadCertificates::from_mesh_ca`]).
    /// [`WorkloadCertificates::from_bootstrap`] sets it next to the xDS
    /// cache; without it nothing is cached.
    pub fn cache_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.cache_file = Some(path.into());
        self
    }

    /// https to the admin API, verified against these PEM roots
    /// (mesh-control's CA root).
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca_pem = Some(pem.into());
        self
    }

    /// The certificate lifetime to ask for (whole seconds; the CA may cap
    /// it). Without it the CA's default applies (24 h).
    pub fn lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = Some(lifetime);
        self
    }

    fn token(&self) -> Result<String, Error> {
        match &self.token {
            TokenSource::Inline(t) => Ok(t.clone()),
            TokenSource::File(path) => read_token(path),
        }
    }
}

impl fmt::Debug for MeshCaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token = match &self.token {
            TokenSource::Inline(_) => "(inline, redacted)".to_owned(),
            TokenSource::File(p) => p.display().to_string(),
        };
        f.debug_struct("MeshCaConfig")
            .field("admin", &self.admin)
            .field("token", &token)
            .field("https", &self.ca_pem.is_some())
            .field("lifetime", &self.lifetime)
            .field("cache_file", &self.cache_file)
            .finish()
    }
}

impl WorkloadCertificates {
    /// The certificates the bootstrap's `certificate_providers.mesh` names;
    /// `Ok(None)` when it names none (plaintext workload). The first
    /// certificate is obtained before this returns, so a misconfiguration
    /// fails here, naming the bootstrap field. Needs a tokio runtime. With
    /// `mesh_ca`, the certificate is cached next to the xDS cache (placed
    /// by `PROXYLESS_XDS_CACHE`, the bootstrap's `proxyless.cache_file`,
    /// or the default directory: `mesh_xds_client::cache::cache_file_for`),
    /// so a restart while mesh-control is down starts with it (see
    /// [`WorkloadCertificates::from_mesh_ca`]).
    pub async fn from_bootstrap(
        bootstrap: &mesh_xds_client::Bootstrap,
    ) -> Result<Option<Self>, Error> {
        let Some(provider) = bootstrap
            .certificate_providers()
            .get(MESH_PROVIDER_INSTANCE)
        else {
            return Ok(None);
        };
        let plugin = provider.get("plugin_name").and_then(Value::as_str);
        match plugin {
            Some(FileWatcherConfig::PLUGIN_NAME) => {
                let config = FileWatcherConfig::from_provider(provider, MESH_PROVIDER_INSTANCE)?;
                WorkloadCertificates::from_files(config).map(Some)
            }
            Some(MESH_CA_PLUGIN) => {
                let config = mesh_ca_config(bootstrap, provider)?;
                WorkloadCertificates::from_mesh_ca(config).await.map(Some)
            }
            other => Err(tls(format!(
                "certificate_providers.mesh.plugin_name {other:?} is not supported: use \
                 \"mesh_ca\" (certificates from mesh-control's CA), e.g.\n  {MESH_CA_EXAMPLE}\n\
                 or \"file_watcher\" (certificate files from SPIRE, cert-manager, ...), e.g.\n  \
                 {FILE_WATCHER_EXAMPLE}"
            ))),
        }
    }

    /// Certificates from files, re-read every `refresh_interval`.
    pub fn from_files(config: FileWatcherConfig) -> Result<Self, Error> {
        let (store, watcher) = FileWatcher::start(config)?;
        Ok(WorkloadCertificates {
            store,
            token: None,
            _background: Arc::new(Background::Files { _watcher: watcher }),
        })
    }

    /// Certificates from mesh-control's CA at `admin` (`host:port`) for the
    /// join `token`, over https verified with `ca_pem` when given: the
    /// first one now, renewals at half-life in the background.
    pub async fn from_ca_endpoint(
        admin: &str,
        token: impl Into<String>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, Error> {
        let mut config = MeshCaConfig::new(admin, token);
        config.ca_pem = ca_pem.map(<[u8]>::to_vec);
        WorkloadCertificates::from_mesh_ca(config).await
    }

    /// Certificates from mesh-control's CA as `config` says: the first one
    /// now, renewals at half-life in the background.
    ///
    /// With a [cache file](MeshCaConfig::cache_file) (what
    /// [`WorkloadCertificates::from_bootstrap`] sets up: the xDS cache's
    /// sibling, `<node>-<hash>.svid`), a workload that starts while the CA
    /// is unreachable, or has not answered within 1 s, starts with its
    /// cached certificate if that is valid for at least another minute
    /// (with a WARN), and asks for a new one in the background right away,
    /// retrying with backoff. A CA that refuses (an unknown or revoked join
    /// token) is obeyed: the cache bridges outages, it does not overrule an
    /// answer. A cache that is corrupt, truncated, written by a newer
    /// version, for another token or writable by others is reported and
    /// ignored.
    pub async fn from_mesh_ca(config: MeshCaConfig) -> Result<Self, Error> {
        let token = config.token()?;
        let client = AdminClient::new(
            &config.admin,
            config.ca_pem.as_deref(),
            None,
            ErrorKind::Tls,
        )?;
        let cached = match &config.cache_file {
            Some(path) => load_cached_certificate(path, &token).await,
            None => None,
        };
        let issued = match cached {
            None => Some(
                request_certificate(&client, &token, config.lifetime)
                    .await
                    .map_err(CaFailure::into_error)?,
            ),
            Some(_) => {
                let asked = tokio::time::timeout(
                    CA_WAIT,
                    request_certificate(&client, &token, config.lifetime),
                )
                .await;
                match asked {
                    Ok(Ok(issued)) => Some(issued),
                    // A refusal is an answer: the cache does not overrule it.
                    Ok(Err(CaFailure::Refused(e))) => return Err(e),
                    Ok(Err(CaFailure::Unavailable(e))) => {
                        tracing::warn!(error = %e, "mesh-control's CA is unreachable");
                        None
                    }
                    Err(_) => {
                        tracing::warn!("mesh-control's CA has not answered within {CA_WAIT:?}");
                        None
                    }
                }
            }
        };
        let (store, from_cache) = match (issued, cached) {
            (Some(issued), _) => {
                let store = CertStore::new(issued.credentials)?;
                if let Some(path) = &config.cache_file {
                    save_certificate(path.clone(), &token, issued.pem).await;
                }
                tracing::info!(
                    identity = %store.identity(),
                    serial = %store.serial(),
                    ca = %client.base(),
                    "workload certificate issued by mesh-control"
                );
                (store, false)
            }
            (None, Some(store)) => {
                let left = store
                    .not_after()
                    .duration_since(SystemTime::now())
                    .unwrap_or_default();
                tracing::warn!(
                    identity = %store.identity(),
                    serial = %store.serial(),
                    path = ?config.cache_file,
                    "starting with the cached workload certificate (valid {}s more); asking \
                     mesh-control's CA for a new one in the background",
                    left.as_secs()
                );
                (store, true)
            }
            // Unreachable: no cache means the request above was awaited.
            (None, None) => return Err(tls("no workload certificate: the CA did not answer")),
        };
        let client = client.trusting(&store);
        let first_wait = if from_cache {
            Duration::ZERO
        } else {
            renewal_wait(store.not_after())
        };
        let task = tokio::spawn(renew(client, config.clone(), store.clone(), first_wait));
        Ok(WorkloadCertificates {
            store,
            token: Some(Arc::from(token)),
            _background: Arc::new(Background::Renewal(task)),
        })
    }

    /// The certificate store: give it to `MeshClient::with_certificates`
    /// and to the server side; it changes on every renewal.
    pub fn store(&self) -> &CertStore {
        &self.store
    }

    /// The join token (`mesh_ca`), which also authenticates registration
    /// with the admin API; `None` for file certificates.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The workload's identity (the current certificate's SPIFFE ID).
    pub fn spiffe_id(&self) -> SpiffeId {
        self.store.identity()
    }
}

impl fmt::Debug for WorkloadCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = match *self._background {
            Background::Files { .. } => "file_watcher",
            Background::Renewal(_) => "mesh_ca",
        };
        f.debug_struct("WorkloadCertificates")
            .field("source", &source)
            .field("store", &self.store)
            .finish()
    }
}

/// The join token of the bootstrap's `mesh_ca` provider, if it has one
/// (registration sends it as its bearer token).
pub(crate) fn bootstrap_token(
    bootstrap: &mesh_xds_client::Bootstrap,
) -> Result<Option<String>, Error> {
    let Some(provider) = bootstrap
        .certificate_providers()
        .get(MESH_PROVIDER_INSTANCE)
    else {
        return Ok(None);
    };
    if provider.get("plugin_name").and_then(Value::as_str) != Some(MESH_CA_PLUGIN) {
        return Ok(None);
    }
    let config = provider.get("config").cloned().unwrap_or(Value::Null);
    token_source(&config)?
        .map(|source| match source {
            TokenSource::Inline(t) => Ok(t),
            TokenSource::File(path) => read_token(&path),
        })
        .transpose()
}

fn mesh_ca_config(
    bootstrap: &mesh_xds_client::Bootstrap,
    provider: &Value,
) -> Result<MeshCaConfig, Error> {
    let empty = Map::new();
    let config = match provider.get("config") {
        None => &empty,
        Some(Value::Object(map)) => map,
        Some(_) => {
            return Err(tls(format!(
                "certificate_providers.mesh.config must be an object, e.g.\n  {MESH_CA_EXAMPLE}"
            )));
        }
    };
    let config = Value::Object(config.clone());
    let token = token_source(&config)?.ok_or_else(|| {
        tls(format!(
            "certificate_providers.mesh (mesh_ca) needs config.token or config.token_file \
             (the join token of the workload's service account), e.g.\n  {MESH_CA_EXAMPLE}"
        ))
    })?;
    let lifetime = match config.get("lifetime") {
        None => None,
        Some(Value::String(s)) => Some(parse_lifetime(s).ok_or_else(|| {
            tls(format!(
                "certificate_providers.mesh.config.lifetime {s:?} is not a duration like \
                 \"24h\", \"90m\" or \"3600s\""
            ))
        })?),
        Some(other) => {
            return Err(tls(format!(
                "certificate_providers.mesh.config.lifetime must be a string like \"24h\", \
                 found {other}"
            )));
        }
    };
    let admin = Some(bootstrap.admin_addresses().join(","))
        .filter(|list| !list.is_empty())
        .ok_or_else(|| {
            tls(
                "certificate_providers.mesh (mesh_ca) needs mesh-control's admin API: set \
             node.metadata.PROXYLESS_ADMIN to its \"host:port\", e.g. \
             \"node\": {\"metadata\": {\"PROXYLESS_ADMIN\": \"127.0.0.1:15000\"}}",
            )
        })?;
    // Next to the xDS cache, as the environment and the bootstrap place it.
    let cache_file = mesh_xds_client::cache::cache_file_for(bootstrap, |k| std::env::var(k).ok())
        .map(|xds| mesh_xds_client::cache::sibling_file(&xds, CERT_CACHE_EXTENSION));
    Ok(MeshCaConfig {
        admin: admin.to_owned(),
        token,
        ca_pem: control_ca_pem(bootstrap, ErrorKind::Tls)?,
        lifetime,
        cache_file,
    })
}

fn token_source(config: &Value) -> Result<Option<TokenSource>, Error> {
    match (config.get("token"), config.get("token_file")) {
        (Some(_), Some(_)) => Err(tls(
            "certificate_providers.mesh.config has both token and token_file: keep one",
        )),
        (Some(Value::String(t)), None) if !t.trim().is_empty() => {
            Ok(Some(TokenSource::Inline(t.trim().to_owned())))
        }
        (Some(_), None) => Err(tls(
            "certificate_providers.mesh.config.token must be a non-empty string",
        )),
        (None, Some(Value::String(p))) if !p.is_empty() => {
            Ok(Some(TokenSource::File(PathBuf::from(p))))
        }
        (None, Some(_)) => Err(tls(
            "certificate_providers.mesh.config.token_file must be a file path",
        )),
        (None, None) => Ok(None),
    }
}

fn read_token(path: &std::path::Path) -> Result<String, Error> {
    let token = std::fs::read_to_string(path).map_err(|e| {
        tls(format!(
            "cannot read the join token file {} (certificate_providers.mesh.config.token_file)",
            path.display()
        ))
        .with_source(e)
    })?;
    let token = token.trim();
    if token.is_empty() {
        return Err(tls(format!(
            "the join token file {} (certificate_providers.mesh.config.token_file) is empty",
            path.display()
        )));
    }
    Ok(token.to_owned())
}

/// `24h`, `90m`, `3600s`, `1.5h`, `500ms`.
fn parse_lifetime(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (number, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return None;
    };
    let value: f64 = number.trim().parse().ok()?;
    let secs = value * unit;
    (secs.is_finite() && secs > 0.0 && secs < 1e9).then(|| Duration::from_secs_f64(secs))
}

/// A certificate mesh-control issued: what the store takes, and the PEM
/// the cache keeps.
struct Issued {
    credentials: Credentials,
    pem: CertificatePem,
}

/// A certificate chain, its key and the trust bundle, as PEM text.
#[derive(Clone, PartialEq, Eq)]
struct CertificatePem {
    chain: String,
    key: String,
    bundle: String,
}

/// Why no certificate was issued.
enum CaFailure {
    /// The CA answered no (4xx but 408 and 429): the token is unknown or
    /// not allowed; a cached certificate must not stand in.
    Refused(Error),
    /// The CA could not be asked: unreachable, no answer in time, a server
    /// error, an answer that makes no sense.
    Unavailable(Error),
}

impl CaFailure {
    fn into_error(self) -> Error {
        match self {
            CaFailure::Refused(e) | CaFailure::Unavailable(e) => e,
        }
    }
}

/// A new key, a CSR for it, `POST /v1/certificates`: the credentials.
async fn request_certificate(
    client: &AdminClient,
    token: &str,
    lifetime: Option<Duration>,
) -> Result<Issued, CaFailure> {
    let unavailable = CaFailure::Unavailable;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| unavailable(tls(format!("cannot generate the workload key: {e}"))))?;
    let mut params = CertificateParams::default();
    // The CA puts the identity the token proves into the certificate; the
    // CSR only carries the key.
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| {
            unavailable(tls(format!(
                "cannot build the certificate signing request: {e}"
            )))
        })?;
    let mut body = json!({"csr": csr, "token": token});
    if let Some(lifetime) = lifetime {
        let secs = lifetime.as_secs() + u64::from(lifetime.subsec_nanos() > 0);
        body["lifetime_seconds"] = json!(secs.max(1));
    }
    let path = "/v1/certificates";
    let (status, reply) = client
        .call(Method::POST, path, Some(&body))
        .await
        .map_err(unavailable)?;
    if status != StatusCode::OK {
        let error = client.refused(&format!("POST {path}"), status, &reply);
        let refused = status.is_client_error()
            && status != StatusCode::REQUEST_TIMEOUT
            && status != StatusCode::TOO_MANY_REQUESTS;
        return Err(if refused {
            CaFailure::Refused(error)
        } else {
            CaFailure::Unavailable(error)
        });
    }
    let reply: Value = serde_json::from_slice(&reply).map_err(|e| {
        unavailable(
            tls(format!(
                "admin API at {}: POST {path}: the answer is not JSON",
                client.base()
            ))
            .with_source(e),
        )
    })?;
    let field = |name: &str| {
        reply
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                unavailable(tls(format!(
                    "admin API at {}: POST {path}: the answer has no {name}",
                    client.base()
                )))
            })
    };
    let pem = CertificatePem {
        chain: field("certificate_chain")?.to_owned(),
        key: key.serialize_pem(),
        bundle: field("trust_bundle")?.to_owned(),
    };
    let credentials = Credentials::from_pem(
        pem.chain.as_bytes(),
        pem.key.as_bytes(),
        pem.bundle.as_bytes(),
    )
    .map_err(|e| {
        unavailable(tls(format!(
            "admin API at {}: POST {path}: the certificate is unusable: {}",
            client.base(),
            e.message()
        )))
    })?;
    Ok(Issued { credentials, pem })
}

/// The certificate cache file's JSON: the layout version, when it was
/// written (Unix seconds), a hash of the join token it was issued for, and
/// the PEM. JSON, so a truncated file fails to parse instead of yielding
/// half a chain.
fn encode_cached(token: &str, pem: &CertificatePem, now: SystemTime) -> Vec<u8> {
    let written = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let doc = json!({
        "format": CERT_CACHE_FORMAT,
        "written_at": written,
        "token_hash": mesh_xds_client::cache::fnv1a_hex(token.as_bytes()),
        "certificate_chain": pem.chain,
        "private_key": pem.key,
        "trust_bundle": pem.bundle,
    });
    doc.to_string().into_bytes()
}

/// Why a cached certificate is not used: a problem with the file (reported
/// as a WARN) or a certificate that is fine but not for now (an INFO).
#[derive(Debug, PartialEq, Eq)]
enum NotUsed {
    Unusable(String),
    Unsuitable(String),
}

/// Reads a certificate cache: the store it makes, if it is for `token` and
/// valid for at least [`CACHED_MIN_VALIDITY`] after `now`.
fn decode_cached(bytes: &[u8], token: &str, now: SystemTime) -> Result<CertStore, NotUsed> {
    let unusable = |why: String| NotUsed::Unusable(why);
    let doc: Value = serde_json::from_slice(bytes)
        .map_err(|e| unusable(format!("it is corrupt or truncated: {e}")))?;
    let format = doc
        .get("format")
        .and_then(Value::as_u64)
        .ok_or_else(|| unusable("it is corrupt: it has no format number".to_owned()))?;
    if format > CERT_CACHE_FORMAT {
        return Err(unusable(format!(
            "it was written by a newer proxyless (format {format}; this one reads format \
             {CERT_CACHE_FORMAT})"
        )));
    }
    let text = |name: &str| {
        doc.get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| unusable(format!("it is corrupt: it has no {name}")))
    };
    if text("token_hash")? != mesh_xds_client::cache::fnv1a_hex(token.as_bytes()) {
        return Err(NotUsed::Unsuitable(
            "it was issued for another join token".to_owned(),
        ));
    }
    let credentials = Credentials::from_pem(
        text("certificate_chain")?.as_bytes(),
        text("private_key")?.as_bytes(),
        text("trust_bundle")?.as_bytes(),
    )
    .map_err(|e| unusable(format!("its certificate is unusable: {}", e.message())))?;
    let store = CertStore::new(credentials)
        .map_err(|e| unusable(format!("its certificate is unusable: {}", e.message())))?;
    let left = store.not_after().duration_since(now).unwrap_or_default();
    if left < CACHED_MIN_VALIDITY {
        return Err(NotUsed::Unsuitable(format!(
            "its certificate expires in {}s, less than the {}s a cached one must have left",
            left.as_secs(),
            CACHED_MIN_VALIDITY.as_secs()
        )));
    }
    Ok(store)
}

/// The cached certificate at `path` for `token`, if it can be used (off the
/// runtime's threads: a file read).
async fn load_cached_certificate(path: &Path, token: &str) -> Option<CertStore> {
    let (file, token_owned) = (path.to_path_buf(), token.to_owned());
    let read = tokio::task::spawn_blocking(move || {
        let bytes = mesh_fs::read_private_file(&file, CERT_CACHE_MAX_BYTES)
            .map_err(|e| NotUsed::Unusable(format!("cannot read it: {e}")))?;
        match bytes {
            None => Ok(None),
            Some(bytes) => decode_cached(&bytes, &token_owned, SystemTime::now()).map(Some),
        }
    })
    .await
    .unwrap_or_else(|e| Err(NotUsed::Unusable(format!("reading it failed: {e}"))));
    match read {
        Ok(store) => store,
        Err(NotUsed::Unusable(why)) => {
            tracing::warn!(
                "ignoring the cached workload certificate {}: {why}",
                path.display()
            );
            None
        }
        Err(NotUsed::Unsuitable(why)) => {
            tracing::info!(
                "not using the cached workload certificate {}: {why}",
                path.display()
            );
            None
        }
    }
}

/// Writes the certificate cache (0600, atomically); a failure is a WARN,
/// never an error: the workload has its certificate either way.
async fn save_certificate(path: PathBuf, token: &str, pem: CertificatePem) {
    let bytes = encode_cached(token, &pem, SystemTime::now());
    let file = path.clone();
    let written = tokio::task::spawn_blocking(move || mesh_fs::write_private_file(&file, &bytes))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
    if let Err(e) = written {
        tracing::warn!(
            "cannot write the workload certificate cache {}: {e}",
            path.display()
        );
    }
}

/// Half of what is left of the certificate's life (at least
/// [`MIN_RENEWAL_WAIT`]).
fn renewal_wait(not_after: SystemTime) -> Duration {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    (left / 2).max(MIN_RENEWAL_WAIT)
}

/// The renewal loop: the first attempt after `first_wait` (at once when the
/// workload started from its cached certificate), then at half-life a new
/// key and certificate, written to the cache; on failure, backoff and retry
/// while the current certificate serves.
async fn renew(client: AdminClient, config: MeshCaConfig, store: CertStore, first_wait: Duration) {
    let mut wait = first_wait;
    let mut backoff = RETRY_FIRST;
    loop {
        tokio::time::sleep(wait).await;
        // The token is read again at every renewal (it may rotate on disk).
        let token = match config.token() {
            Ok(token) => token,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot renew the workload certificate; keeping the current one");
                wait = backoff;
                backoff = (backoff * 2).min(RETRY_CAP);
                continue;
            }
        };
        let result = match request_certificate(&client, &token, config.lifetime).await {
            Ok(issued) => store.update(issued.credentials).map(|()| issued.pem),
            Err(failure) => Err(failure.into_error()),
        };
        match result {
            Ok(pem) => {
                if let Some(path) = &config.cache_file {
                    save_certificate(path.clone(), &token, pem).await;
                }
                backoff = RETRY_FIRST;
                wait = renewal_wait(store.not_after());
                tracing::debug!(
                    serial = %store.serial(),
                    next_in = ?wait,
                    "workload certificate renewed"
                );
            }
            Err(e) => {
                let expired = store.not_after() <= SystemTime::now();
                tracing::warn!(
                    error = %e,
                    retry_in = ?backoff,
                    expired,
                    "cannot renew the workload certificate; keeping the current one"
                );
                wait = backoff;
                backoff = (backoff * 2).min(RETRY_CAP);
            }
        }
    }
}

fn tls(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Tls, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bootstrap(providers: Value) -> mesh_xds_client::Bootstrap {
        let mut b = mesh_xds_client::Bootstrap::builder("http://127.0.0.1:1", "n")
            .admin_address("127.0.0.1:9");
        if let Value::Object(map) = providers {
            for (k, v) in map {
                b = b.certificate_provider(k, v);
            }
        }
        b.build().unwrap()
    }

    #[test]
    fn lifetimes() {
        assert_eq!(parse_lifetime("24h"), Some(Duration::from_secs(86400)));
        assert_eq!(parse_lifetime("90m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_lifetime("4s"), Some(Duration::from_secs(4)));
        assert_eq!(parse_lifetime("500ms"), Some(Duration::from_millis(500)));
        for bad in ["", "24", "h", "-1h", "0s", "xs"] {
            assert_eq!(parse_lifetime(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn bootstrap_errors_name_the_field() {
        let none = bootstrap(json!({}));
        assert!(
            WorkloadCertificates::from_bootstrap(&none)
                .await
                .unwrap()
                .is_none()
        );

        let other = bootstrap(json!({"mesh": {"plugin_name": "spiffe"}}));
        let e = WorkloadCertificates::from_bootstrap(&other)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("plugin_name Some(\"spiffe\")"),
            "{e}"
        );
        assert!(e.to_string().contains("token_file"), "{e}");

        let no_token = bootstrap(json!({"mesh": {"plugin_name": "mesh_ca", "config": {}}}));
        let e = WorkloadCertificates::from_bootstrap(&no_token)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("config.token or config.token_file"),
            "{e}"
        );

        let both = bootstrap(json!({"mesh": {"plugin_name": "mesh_ca",
            "config": {"token": "a", "token_file": "b"}}}));
        let e = WorkloadCertificates::from_bootstrap(&both)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("both token and token_file"), "{e}");

        let bad_lifetime = bootstrap(json!({"mesh": {"plugin_name": "mesh_ca",
            "config": {"token": "a", "lifetime": "1 day"}}}));
        let e = WorkloadCertificates::from_bootstrap(&bad_lifetime)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("config.lifetime \"1 day\""), "{e}");

        let missing_file = bootstrap(json!({"mesh": {"plugin_name": "mesh_ca",
            "config": {"token_file": "/nonexistent/token"}}}));
        let e = WorkloadCertificates::from_bootstrap(&missing_file)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/token"), "{e}");

        let no_admin = mesh_xds_client::Bootstrap::builder("http://127.0.0.1:1", "n")
            .certificate_provider(
                "mesh",
                json!({"plugin_name": "mesh_ca", "config": {"token": "a"}}),
            )
            .build()
            .unwrap();
        let e = WorkloadCertificates::from_bootstrap(&no_admin)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("PROXYLESS_ADMIN"), "{e}");
    }

    #[test]
    fn the_bootstrap_token_is_found_inline_or_in_a_file() {
        let inline =
            bootstrap(json!({"mesh": {"plugin_name": "mesh_ca", "config": {"token": " t1\n"}}}));
        assert_eq!(bootstrap_token(&inline).unwrap().as_deref(), Some("t1"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "t2\n").unwrap();
        let file = bootstrap(json!({"mesh": {"plugin_name": "mesh_ca",
            "config": {"token_file": path.to_str().unwrap()}}}));
        assert_eq!(bootstrap_token(&file).unwrap().as_deref(), Some("t2"));
        let files = bootstrap(json!({"mesh": {"plugin_name": "file_watcher", "config": {}}}));
        assert_eq!(bootstrap_token(&files).unwrap(), None);
    }

    /// A cached certificate's PEM: an SVID of a test CA valid for `lifetime`.
    fn svid(lifetime: Duration) -> CertificatePem {
        use mesh_testkit::pki::{CATALOG, TestCa, Validity};
        let ca = TestCa::new("cache test root");
        let leaf = ca.leaf_with(CATALOG, Validity::For(lifetime));
        CertificatePem {
            chain: leaf.chain,
            key: leaf.key,
            bundle: ca.pem,
        }
    }

    #[test]
    fn a_cached_certificate_round_trips_for_its_token_only() {
        let pem = svid(Duration::from_secs(3600));
        let now = SystemTime::now();
        let bytes = encode_cached("join-1", &pem, now);
        let store = decode_cached(&bytes, "join-1", now).unwrap();
        assert_eq!(
            store.identity().to_string(),
            mesh_testkit::pki::CATALOG,
            "the cached identity"
        );
        assert_eq!(
            decode_cached(&bytes, "join-2", now).err(),
            Some(NotUsed::Unsuitable(
                "it was issued for another join token".to_owned()
            ))
        );
        // Too close to expiry to start with.
        let short = encode_cached("join-1", &svid(Duration::from_secs(30)), now);
        match decode_cached(&short, "join-1", now) {
            Err(NotUsed::Unsuitable(why)) => assert!(why.contains("expires in"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// Each way a certificate cache can be broken is reported (a WARN by
    /// the caller) and the cache not used; nothing panics.
    #[test]
    fn broken_certificate_caches_say_what_is_wrong() {
        let pem = svid(Duration::from_secs(3600));
        let now = SystemTime::now();
        let good = encode_cached("t", &pem, now);
        let unusable = |bytes: &[u8], needle: &str| match decode_cached(bytes, "t", now) {
            Err(NotUsed::Unusable(why)) => assert!(why.contains(needle), "{needle:?} in {why}"),
            other => panic!("{needle}: {other:?}"),
        };
        for cut in [0, 1, good.len() / 2, good.len() - 1] {
            unusable(&good[..cut], "corrupt or truncated");
        }
        let mut doc: Value = serde_json::from_slice(&good).unwrap();
        doc["format"] = json!(2);
        unusable(
            doc.to_string().as_bytes(),
            "newer proxyless (format 2; this one reads format 1)",
        );
        let mut doc: Value = serde_json::from_slice(&good).unwrap();
        doc.as_object_mut().unwrap().remove("private_key");
        unusable(doc.to_string().as_bytes(), "it has no private_key");
        let mut doc: Value = serde_json::from_slice(&good).unwrap();
        doc.as_object_mut().unwrap().remove("format");
        unusable(doc.to_string().as_bytes(), "no format number");
        let mut doc: Value = serde_json::from_slice(&good).unwrap();
        doc["certificate_chain"] = json!("-----BEGIN CERTIFICATE-----\nAAAA\n");
        unusable(doc.to_string().as_bytes(), "unusable");
        // Another key than the certificate's.
        let mut doc: Value = serde_json::from_slice(&good).unwrap();
        doc["private_key"] = json!(svid(Duration::from_secs(3600)).key);
        unusable(doc.to_string().as_bytes(), "unusable");
        unusable(b"[1, 2, 3]", "no format number");
    }

    #[tokio::test]
    async fn the_cache_file_is_private_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node-0123456789ab.svid");
        assert!(
            load_cached_certificate(&path, "t").await.is_none(),
            "none yet"
        );
        save_certificate(path.clone(), "t", svid(Duration::from_secs(3600))).await;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(load_cached_certificate(&path, "t").await.is_some());
        assert!(load_cached_certificate(&path, "other").await.is_none());
        std::fs::write(&path, b"{\"format\": 1, \"token_h").unwrap();
        assert!(load_cached_certificate(&path, "t").await.is_none());
    }

    /// mesh-control down: a workload with a valid cached certificate starts
    /// with it (within the CA wait, not the admin timeout); without one it
    /// fails as before.
    #[tokio::test]
    async fn an_unreachable_ca_falls_back_to_the_cached_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog-0123456789ab.svid");
        let dead = {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap().to_string()
        };
        let config = MeshCaConfig::new(&dead, "join-1").cache_file(&path);
        let e = WorkloadCertificates::from_mesh_ca(config.clone())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Tls);

        save_certificate(path.clone(), "join-1", svid(Duration::from_secs(3600))).await;
        let certificates = mesh_testkit::wait::within(
            "certificates from the cache",
            WorkloadCertificates::from_mesh_ca(config),
        )
        .await
        .unwrap();
        assert_eq!(
            certificates.spiffe_id().to_string(),
            mesh_testkit::pki::CATALOG
        );
        assert_eq!(certificates.token(), Some("join-1"));
    }

    /// A CA that answers no is obeyed even with a valid cached certificate:
    /// the cache bridges outages, it does not overrule a revoked token.
    #[tokio::test]
    async fn a_refusing_ca_is_not_overruled_by_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog-0123456789ab.svid");
        save_certificate(path.clone(), "revoked", svid(Duration::from_secs(3600))).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let admin = listener.local_addr().unwrap().to_string();
        let app = axum::Router::new().route(
            "/v1/certificates",
            axum::routing::post(|| async {
                (
                    axum::http::StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"error": "unknown join token"})),
                )
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let config = MeshCaConfig::new(&admin, "revoked").cache_file(&path);
        let e = WorkloadCertificates::from_mesh_ca(config)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("unknown join token"), "{e}");
    }
}

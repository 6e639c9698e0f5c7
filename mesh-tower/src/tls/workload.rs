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

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

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
        }
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
            .finish()
    }
}

impl WorkloadCertificates {
    /// The certificates the bootstrap's `certificate_providers.mesh` names;
    /// `Ok(None)` when it names none (plaintext workload). The first
    /// certificate is obtained before this returns, so a misconfiguration
    /// fails here, naming the bootstrap field. Needs a tokio runtime.
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
    pub async fn from_mesh_ca(config: MeshCaConfig) -> Result<Self, Error> {
        let token = config.token()?;
        let client = AdminClient::new(
            &config.admin,
            config.ca_pem.as_deref(),
            None,
            ErrorKind::Tls,
        )?;
        let credentials = request_certificate(&client, &token, config.lifetime).await?;
        let store = CertStore::new(credentials)?;
        let client = client.trusting(&store);
        tracing::info!(
            identity = %store.identity(),
            serial = %store.serial(),
            ca = %client.base(),
            "workload certificate issued by mesh-control"
        );
        let task = tokio::spawn(renew(client, config.clone(), store.clone()));
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
    let admin = bootstrap.admin_address().ok_or_else(|| {
        tls(
            "certificate_providers.mesh (mesh_ca) needs mesh-control's admin API: set \
             node.metadata.PROXYLESS_ADMIN to its \"host:port\", e.g. \
             \"node\": {\"metadata\": {\"PROXYLESS_ADMIN\": \"127.0.0.1:15000\"}}",
        )
    })?;
    Ok(MeshCaConfig {
        admin: admin.to_owned(),
        token,
        ca_pem: control_ca_pem(bootstrap, ErrorKind::Tls)?,
        lifetime,
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

/// A new key, a CSR for it, `POST /v1/certificates`: the credentials.
async fn request_certificate(
    client: &AdminClient,
    token: &str,
    lifetime: Option<Duration>,
) -> Result<Credentials, Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| tls(format!("cannot generate the workload key: {e}")))?;
    let mut params = CertificateParams::default();
    // The CA puts the identity the token proves into the certificate; the
    // CSR only carries the key.
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| tls(format!("cannot build the certificate signing request: {e}")))?;
    let mut body = json!({"csr": csr, "token": token});
    if let Some(lifetime) = lifetime {
        let secs = lifetime.as_secs() + u64::from(lifetime.subsec_nanos() > 0);
        body["lifetime_seconds"] = json!(secs.max(1));
    }
    let path = "/v1/certificates";
    let (status, reply) = client.call(Method::POST, path, Some(&body)).await?;
    if status != StatusCode::OK {
        return Err(client.refused(&format!("POST {path}"), status, &reply));
    }
    let reply: Value = serde_json::from_slice(&reply).map_err(|e| {
        tls(format!(
            "admin API at {}: POST {path}: the answer is not JSON",
            client.base()
        ))
        .with_source(e)
    })?;
    let field = |name: &str| {
        reply
            .get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                tls(format!(
                    "admin API at {}: POST {path}: the answer has no {name}",
                    client.base()
                ))
            })
    };
    let chain = field("certificate_chain")?;
    let bundle = field("trust_bundle")?;
    Credentials::from_pem(
        chain.as_bytes(),
        key.serialize_pem().as_bytes(),
        bundle.as_bytes(),
    )
    .map_err(|e| {
        tls(format!(
            "admin API at {}: POST {path}: the certificate is unusable: {}",
            client.base(),
            e.message()
        ))
    })
}

/// Half of what is left of the certificate's life (at least
/// [`MIN_RENEWAL_WAIT`]).
fn renewal_wait(not_after: SystemTime) -> Duration {
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    (left / 2).max(MIN_RENEWAL_WAIT)
}

/// The renewal loop: at half-life a new key and certificate; on failure,
/// backoff and retry while the current certificate serves.
async fn renew(client: AdminClient, config: MeshCaConfig, store: CertStore) {
    let mut wait = renewal_wait(store.not_after());
    let mut backoff = RETRY_FIRST;
    loop {
        tokio::time::sleep(wait).await;
        let result = match config.token() {
            Ok(token) => request_certificate(&client, &token, config.lifetime)
                .await
                .and_then(|credentials| store.update(credentials)),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
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
}

//! TLS origination with certificate files: Istio's DestinationRule
//! `tls.mode` SIMPLE and MUTUAL ([`FileTls`]), for servers outside the
//! mesh's identity system (an external API, a database with its own CA).
//!
//! The server's chain must verify against the `caCertificates` roots, or,
//! without `caCertificates`, against the system's roots (with the
//! `serverAuth` usage, as webpki checks it); its name must be one of the
//! `subjectAltNames` (a DNS SAN, with `*.` wildcards in the certificate,
//! or a URI SAN, exactly; any one is enough), or, when none are
//! configured, valid for the SNI (webpki's hostname check). MUTUAL
//! presents the `clientCertificate` chain with its `privateKey`. A failed
//! check says which one failed and why (`UnknownIssuer`: not signed by
//! the trusted roots; `NotValidForName`: not for this name), in the
//! caller's error and in the telemetry of the request (`UF`, the span's
//! status message).
//!
//! The system's roots are the operating system's trust store, read with
//! `rustls-native-certs`: `SSL_CERT_FILE` / `SSL_CERT_DIR` when set, else
//! the distribution's bundle (`/etc/ssl/certs/ca-certificates.crt` and the
//! other paths OpenSSL probes), the keychain on macOS, the system store on
//! Windows. That, not a bundle compiled into the binary (`webpki-roots`),
//! because it is what Istio's sidecar verifies against (its agent's
//! `file-root:system`, the same file) and what an operator expects: a
//! corporate CA added with `update-ca-certificates` is trusted, a root the
//! distribution distrusts is not, and a CA update reaches every program by
//! the OS's package updates rather than by rebuilding this one. The store
//! is read once per process, on the first connection that needs it (some
//! hundred certificates, milliseconds); a store with no usable certificate
//! fails the connection with the reason (never "verify nothing").
//!
//! The files are read by this process (paths on its filesystem, as Istio's
//! sidecar reads them) when the first connection needs them and again
//! whenever one of them changes: each new connection compares the files'
//! modification times and sizes with those of the last load (three `stat`
//! calls next to a full TLS handshake). A change that cannot be used yet
//! (a certificate without its new key) keeps the last good config;
//! connections fail with the reason only while no config was ever loaded.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use mesh_core::model::{FileTls, Name};
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, verify_server_cert_signed_by_trust_anchor, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::store::tls;
use super::verify::{rejected, signature_checks_by};
use crate::error::Error;

/// Opens TLS connections to the servers of one cluster with SIMPLE or
/// MUTUAL settings (see the [module docs](self)). Cheap to clone; clones
/// share the loaded config.
#[derive(Clone)]
pub struct FileTlsConnector {
    inner: Arc<Inner>,
}

struct Inner {
    files: FileTls,
    alpn: Vec<Vec<u8>>,
    provider: Arc<CryptoProvider>,
    loaded: ArcSwapOption<Loaded>,
    /// One reload at a time.
    reload: Mutex<()>,
}

/// A config built from the files as they were when stamped.
struct Loaded {
    stamps: Stamps,
    connector: TlsConnector,
    /// When the client certificate expires (MUTUAL); `None` for SIMPLE.
    client_not_after: Option<SystemTime>,
}

/// What tells a changed file: its modification time and size (`None`:
/// unreadable).
type Stamps = Vec<Option<(SystemTime, u64)>>;

impl FileTlsConnector {
    /// A connector for `files`, speaking `alpn`. The files are read on the
    /// first connection, not here: a file that appears later is picked up.
    pub fn new(files: &FileTls, alpn: &[&[u8]]) -> Self {
        FileTlsConnector {
            inner: Arc::new(Inner {
                files: files.clone(),
                alpn: alpn.iter().map(|p| p.to_vec()).collect(),
                provider: super::provider(),
                loaded: ArcSwapOption::empty(),
                reload: Mutex::new(()),
            }),
        }
    }

    /// The settings this connector applies.
    pub fn files(&self) -> &FileTls {
        &self.inner.files
    }

    /// Runs the TLS handshake over `io`. `server_name` is sent as SNI (a
    /// DNS name; an IP address sends none) and, without `subjectAltNames`,
    /// is the name the certificate must be valid for. Returns the stream
    /// and when the client certificate expires (MUTUAL).
    pub async fn connect<IO>(
        &self,
        server_name: &str,
        io: IO,
    ) -> Result<(TlsStream<IO>, Option<SystemTime>), Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let loaded = self.current()?;
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
            tls(format!(
                "{server_name:?} is not a DNS name or IP address: {e}"
            ))
        })?;
        let stream = loaded
            .connector
            .connect(name, io)
            .await
            .map_err(|e| self.handshake_error(server_name, e))?;
        Ok((stream, loaded.client_not_after))
    }

    /// A failed handshake, saying which check failed: the chain (not
    /// signed by the roots in use) or the name (not for the SNI or the
    /// `subjectAltNames`); rustls' own words follow as the source.
    fn handshake_error(&self, server_name: &str, e: std::io::Error) -> Error {
        let files = &self.inner.files;
        let rustls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        let why = match rustls {
            Some(rustls::Error::InvalidCertificate(cert)) => match cert {
                CertificateError::UnknownIssuer => Some(format!(
                    "the server's certificate is not signed by {} (UnknownIssuer)",
                    match &files.ca_certificates {
                        Some(ca) => format!("a CA of caCertificates {ca}"),
                        None => "a root of the system's trust store (no caCertificates given)"
                            .to_string(),
                    }
                )),
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Some(format!(
                    "the server's certificate is not valid for {server_name:?}, the SNI it \
                     was verified against (NotValidForName)"
                )),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Some("the server's certificate has expired (Expired)".to_string())
                }
                _ => None,
            },
            _ => None,
        };
        let message = match why {
            Some(why) => format!("TLS handshake with {server_name} failed: {why}"),
            None => format!("TLS handshake with {server_name} failed"),
        };
        tls(message).with_source(e)
    }

    /// The config for the files as they are now: the loaded one when no
    /// file changed, else a fresh load (or the last good one when the
    /// change cannot be used).
    fn current(&self) -> Result<Arc<Loaded>, Error> {
        let inner = &*self.inner;
        let stamps = inner.stamps();
        if let Some(loaded) = inner.loaded.load_full()
            && loaded.stamps == stamps
        {
            return Ok(loaded);
        }
        let _reload = inner
            .reload
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let previous = inner.loaded.load_full();
        if let Some(loaded) = &previous
            && loaded.stamps == stamps
        {
            return Ok(loaded.clone());
        }
        match inner.load(stamps) {
            Ok(loaded) => {
                let loaded = Arc::new(loaded);
                inner.loaded.store(Some(loaded.clone()));
                Ok(loaded)
            }
            Err(e) => match previous {
                Some(previous) => {
                    tracing::warn!(
                        error = %e,
                        "TLS origination ({}): the files changed but cannot be used (yet); \
                         keeping the last good ones",
                        inner.files.mode()
                    );
                    Ok(previous)
                }
                None => Err(e),
            },
        }
    }
}

impl Inner {
    fn paths(&self) -> impl Iterator<Item = &Name> {
        self.files.ca_certificates.iter().chain(
            self.files
                .client_certificate
                .iter()
                .flat_map(|c| [&c.certificate_chain, &c.private_key]),
        )
    }

    fn stamps(&self) -> Stamps {
        self.paths()
            .map(|p| {
                let meta = std::fs::metadata(Path::new(&**p)).ok()?;
                Some((meta.modified().ok()?, meta.len()))
            })
            .collect()
    }

    fn load(&self, stamps: Stamps) -> Result<Loaded, Error> {
        let files = &self.files;
        let roots = match &files.ca_certificates {
            Some(ca) => Arc::new(ca_file_roots(ca)?),
            None => system_roots()?,
        };
        let verifier = FileServerVerifier {
            roots,
            subject_alt_names: files.subject_alt_names.clone(),
            provider: self.provider.clone(),
        };
        let builder = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(format!("TLS client config: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let (mut config, client_not_after) = match &files.client_certificate {
            None => (builder.with_no_client_auth(), None),
            Some(client) => {
                let chain_pem = read(&client.certificate_chain, "clientCertificate")?;
                let chain = CertificateDer::pem_slice_iter(&chain_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        tls(format!(
                            "clientCertificate {}: not PEM certificates: {e}",
                            client.certificate_chain
                        ))
                    })?;
                let Some(leaf) = chain.first() else {
                    return Err(tls(format!(
                        "clientCertificate {}: no PEM certificate in the file",
                        client.certificate_chain
                    )));
                };
                let not_after = not_after(leaf);
                let key_pem = read(&client.private_key, "privateKey")?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
                    tls(format!(
                        "privateKey {}: not a PEM private key: {e}",
                        client.private_key
                    ))
                })?;
                let config = builder.with_client_auth_cert(chain, key).map_err(|e| {
                    tls(format!(
                        "clientCertificate {} and privateKey {} do not go together: {e}",
                        client.certificate_chain, client.private_key
                    ))
                })?;
                (config, not_after)
            }
        };
        config.alpn_protocols = self.alpn.clone();
        // Every connection does a full handshake, so that rotated files
        // apply to each new one (as with the mesh's own certificates).
        config.resumption = Resumption::disabled();
        Ok(Loaded {
            stamps,
            connector: TlsConnector::from(Arc::new(config)),
            client_not_after,
        })
    }
}

/// The roots of a `caCertificates` file: every PEM certificate in it, at
/// least one.
fn ca_file_roots(ca: &Name) -> Result<RootCertStore, Error> {
    let ca_pem = read(ca, "caCertificates")?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&ca_pem) {
        let cert =
            cert.map_err(|e| tls(format!("caCertificates {ca}: not PEM certificates: {e}")))?;
        roots.add(cert).map_err(|e| {
            tls(format!(
                "caCertificates {ca}: not a usable CA certificate: {e}"
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(tls(format!(
            "caCertificates {ca}: no PEM certificate in the file"
        )));
    }
    Ok(roots)
}

/// The operating system's roots (see the [module docs](self)), read once
/// per process: a failed read is not kept, so the next connection tries
/// again (a bundle being installed).
fn system_roots() -> Result<Arc<RootCertStore>, Error> {
    static ROOTS: Mutex<Option<Arc<RootCertStore>>> = Mutex::new(None);
    let mut cached = ROOTS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(roots) = &*cached {
        return Ok(roots.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(tls(format!(
            "no caCertificates given and no usable root certificate in the system's trust \
             store ({ignored} unusable; {}): install the CA bundle (Debian: apt-get install \
             ca-certificates), point SSL_CERT_FILE at one, or set caCertificates",
            if errors.is_empty() {
                "nothing found".to_string()
            } else {
                errors.join("; ")
            }
        )));
    }
    for e in &found.errors {
        tracing::debug!(error = %e, "system trust store: a source could not be read");
    }
    tracing::debug!(added, ignored, "TLS origination: loaded the system's roots");
    let roots = Arc::new(roots);
    *cached = Some(roots.clone());
    Ok(roots)
}

fn read(path: &Name, field: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(Path::new(&**path))
        .map_err(|e| tls(format!("cannot read {field} file {path}")).with_source(e))
}

/// When a certificate expires.
fn not_after(cert: &CertificateDer<'_>) -> Option<SystemTime> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let secs = u64::try_from(parsed.validity().not_after.timestamp()).ok()?;
    Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

impl fmt::Debug for FileTlsConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileTlsConnector")
            .field("files", &self.inner.files)
            .finish_non_exhaustive()
    }
}

/// The check of a server: chain to the CA file's roots, then its name
/// (the configured SANs, else the server name).
struct FileServerVerifier {
    roots: Arc<RootCertStore>,
    subject_alt_names: Arc<[Name]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for FileServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.subject_alt_names.is_empty() {
            verify_server_name(&parsed, server_name)?;
        } else {
            let names = san_names(end_entity);
            let matched = self.subject_alt_names.iter().any(|want| {
                names.iter().any(|have| match have {
                    San::Dns(dns) => dns_matches(dns, want),
                    San::Uri(uri) => uri == &**want,
                })
            });
            if !matched {
                return Err(rejected(format!(
                    "the server certificate's names {names:?} match none of subjectAltNames {:?}",
                    self.subject_alt_names
                )));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks_by!(self => self.provider);
}

impl fmt::Debug for FileServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileServerVerifier")
            .field("subject_alt_names", &self.subject_alt_names)
            .finish_non_exhaustive()
    }
}

/// A DNS or URI subject alternative name of a certificate.
#[derive(Debug)]
enum San {
    Dns(String),
    Uri(String),
}

fn san_names(cert: &CertificateDer<'_>) -> Vec<San> {
    let Ok((_, cert)) = X509Certificate::from_der(cert) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                match name {
                    GeneralName::DNSName(dns) => out.push(San::Dns(dns.to_string())),
                    GeneralName::URI(uri) => out.push(San::Uri(uri.to_string())),
                    _ => {}
                }
            }
        }
    }
    out
}

/// Whether a certificate's DNS name (possibly `*.example.com`, matching
/// one label) covers `want` (case-insensitive, as DNS is).
fn dns_matches(have: &str, want: &str) -> bool {
    if have.eq_ignore_ascii_case(want) {
        return true;
    }
    match (have.strip_prefix("*."), want.split_once('.')) {
        (Some(suffix), Some((label, rest))) => {
            !label.is_empty() && !suffix.is_empty() && rest.eq_ignore_ascii_case(suffix)
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::dns_matches;

    #[test]
    fn dns_wildcards_match_one_label() {
        assert!(dns_matches("api.example.com", "API.example.com"));
        assert!(dns_matches("*.example.com", "api.example.com"));
        assert!(!dns_matches("*.example.com", "a.b.example.com"));
        assert!(!dns_matches("*.example.com", "example.com"));
        assert!(!dns_matches("api.example.com", "web.example.com"));
    }
}

//! The workload's certificate, key and trust bundle, swappable at runtime.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use mesh_core::spiffe::SpiffeId;
use rustls::RootCertStore;
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::identity::spiffe_id_of;
use crate::error::{Error, ErrorKind};

/// An X.509-SVID chain, its private key and the trust bundle, checked to
/// belong together.
pub struct Credentials {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    bundle: Vec<CertificateDer<'static>>,
}

impl Credentials {
    /// From PEM: the certificate chain (leaf first), the private key
    /// (PKCS#8, PKCS#1 or SEC1) and the trust bundle (one or more roots).
    pub fn from_pem(chain_pem: &[u8], key_pem: &[u8], bundle_pem: &[u8]) -> Result<Self, Error> {
        let certs = |what: &str, pem: &[u8]| {
            CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| tls(format!("the {what} is not PEM certificates: {e}")))
        };
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| tls(format!("the private key is not a PEM private key: {e}")))?;
        Credentials::new(
            certs("certificate chain", chain_pem)?,
            key,
            certs("trust bundle", bundle_pem)?,
        )
    }

    /// From DER. Fails when the chain or the bundle is empty; the key and
    /// the leaf are checked when a [`CertStore`] takes them.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        bundle: Vec<CertificateDer<'static>>,
    ) -> Result<Self, Error> {
        if chain.is_empty() {
            return Err(tls("the certificate chain is empty"));
        }
        if bundle.is_empty() {
            return Err(tls("the trust bundle is empty"));
        }
        Ok(Credentials { chain, key, bundle })
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("chain", &self.chain.len())
            .field("bundle", &self.bundle.len())
            .finish_non_exhaustive()
    }
}

/// What a [`CertStore`] holds at one moment.
pub(crate) struct Material {
    pub(crate) certified: Arc<CertifiedKey>,
    pub(crate) identity: SpiffeId,
    pub(crate) not_after: SystemTime,
    pub(crate) serial: String,
    pub(crate) roots: Arc<RootCertStore>,
    /// Chain and `clientAuth` checks against `roots`.
    pub(crate) client_chain_verifier: Arc<dyn ClientCertVerifier>,
}

/// The workload's current credentials (see the [module docs](super)).
/// Cheap to clone; clones share the credentials.
#[derive(Clone)]
pub struct CertStore {
    material: Arc<ArcSwap<Material>>,
    provider: Arc<CryptoProvider>,
    changes: Arc<watch::Sender<u64>>,
}

impl CertStore {
    /// A store holding `credentials`. Fails when the key does not belong to
    /// the leaf certificate, the leaf has no SPIFFE ID, or a root does not
    /// parse.
    pub fn new(credentials: Credentials) -> Result<Self, Error> {
        let provider = super::provider();
        let material = Material::new(credentials, &provider)?;
        Ok(CertStore {
            material: Arc::new(ArcSwap::from_pointee(material)),
            provider,
            changes: Arc::new(watch::channel(0).0),
        })
    }

    /// Replaces the credentials: handshakes from now on use them; live
    /// connections are untouched. On error the old credentials stay.
    pub fn update(&self, credentials: Credentials) -> Result<(), Error> {
        let material = Material::new(credentials, &self.provider)?;
        let (old, new) = (self.identity(), material.identity.clone());
        self.material.store(Arc::new(material));
        self.changes.send_modify(|n| *n += 1);
        tracing::info!(identity = %new, previous = %old, serial = %self.serial(), "mTLS certificate rotated");
        Ok(())
    }

    /// The workload's identity (the leaf's SPIFFE ID).
    pub fn identity(&self) -> SpiffeId {
        self.material.load().identity.clone()
    }

    /// When the current certificate expires: renew before (at half-life),
    /// and close connections older than that.
    pub fn not_after(&self) -> SystemTime {
        self.material.load().not_after
    }

    /// The current certificate's serial number, hex.
    pub fn serial(&self) -> String {
        self.material.load().serial.clone()
    }

    /// A receiver that changes on every [`CertStore::update`].
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub(crate) fn material(&self) -> arc_swap::Guard<Arc<Material>> {
        self.material.load()
    }

    pub(crate) fn crypto(&self) -> &Arc<CryptoProvider> {
        &self.provider
    }
}

impl Material {
    fn new(credentials: Credentials, provider: &Arc<CryptoProvider>) -> Result<Self, Error> {
        let Credentials { chain, key, bundle } = credentials;
        let Some(leaf) = chain.first() else {
            return Err(tls("the certificate chain is empty"));
        };
        let identity =
            spiffe_id_of(leaf).map_err(|e| tls(format!("the workload certificate: {e}")))?;
        let (_, parsed) = X509Certificate::from_der(leaf)
            .map_err(|e| tls(format!("the workload certificate does not parse: {e}")))?;
        let not_after = u64::try_from(parsed.validity().not_after.timestamp())
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .unwrap_or(UNIX_EPOCH);
        let serial = parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let certified = CertifiedKey::from_der(chain, key, provider)
            .map_err(|e| tls(format!("the private key does not fit the certificate: {e}")))?;
        let mut roots = RootCertStore::empty();
        for root in bundle {
            roots
                .add(root)
                .map_err(|e| tls(format!("a trust bundle certificate is unusable: {e}")))?;
        }
        let roots = Arc::new(roots);
        let client_chain_verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .map_err(|e| tls(format!("the trust bundle is unusable: {e}")))?;
        Ok(Material {
            certified: Arc::new(certified),
            identity,
            not_after,
            serial,
            roots,
            client_chain_verifier,
        })
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.material.load().certified.clone())
    }
}

impl ResolvesClientCert for CertStore {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.material.load().certified.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.material.load();
        f.debug_struct("CertStore")
            .field("identity", &m.identity)
            .field("serial", &m.serial)
            .field("not_after", &m.not_after)
            .finish()
    }
}

pub(crate) fn tls(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Tls, message)
}

//! TLS for mesh-control's own listeners (ADS and the admin API) when it
//! runs a CA: its serving certificate comes from that CA and is renewed at
//! half-life; client certificates are optional and, when presented, are
//! verified against the current trust bundle, which changes on a root
//! rotation. Both are swapped atomically (`ArcSwap`) under one rustls
//! `ServerConfig` per listener, so every new handshake sees the current
//! certificate and bundle while established connections are left alone.
//! The bundle is also written to a file that bootstraps name as
//! `ca_certificate_file`, kept current the same way.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use mesh_core::spiffe::SpiffeId;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::CertificateAuthority;
use super::signer::write_file;
use crate::error::Error;

/// How often the trust bundle is compared with the CA's (a root rotation
/// can also be signalled at once, see `ServerHandle::rotate_root`).
pub(crate) const POLL: Duration = Duration::from_secs(1);

/// How long a TLS handshake may take before the connection is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS material of a control server and the configs built on it.
pub(crate) struct ServingTls {
    ca: Arc<CertificateAuthority>,
    identity: SpiffeId,
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
    provider: Arc<CryptoProvider>,
    resolver: Arc<Resolver>,
    verifier: Arc<BundleVerifier>,
    state: Mutex<RefreshState>,
    bundle_file: PathBuf,
    /// ALPN `h2` (ADS is gRPC).
    pub(crate) ads: Arc<ServerConfig>,
    /// ALPN `h2` and `http/1.1` (the admin API speaks both).
    pub(crate) admin: Arc<ServerConfig>,
}

struct RefreshState {
    bundle_pem: String,
    renew_at: SystemTime,
}

impl ServingTls {
    /// Issues the first serving certificate, writes the trust bundle file
    /// and builds the server configs.
    pub(crate) fn new(
        ca: Arc<CertificateAuthority>,
        identity: SpiffeId,
        dns_names: Vec<String>,
        ips: Vec<IpAddr>,
        bundle_file: PathBuf,
    ) -> Result<ServingTls, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let (key, renew_at) = issue(&ca, &identity, &dns_names, &ips, &provider)?;
        let bundle_pem = ca.trust_bundle_pem();
        let verifier = Arc::new(BundleVerifier {
            current: ArcSwap::from_pointee(client_verifier(&bundle_pem, &provider)?),
        });
        write_bundle(&bundle_file, &bundle_pem)?;
        let resolver = Arc::new(Resolver {
            current: ArcSwap::from_pointee(key),
        });
        let config = |alpn: &[&[u8]]| -> Result<Arc<ServerConfig>, Error> {
            let mut config = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::config(format!("TLS: {e}")))?
                .with_client_cert_verifier(verifier.clone())
                .with_cert_resolver(resolver.clone());
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        let ads = config(&[b"h2"])?;
        let admin = config(&[b"h2", b"http/1.1"])?;
        Ok(ServingTls {
            ca,
            identity,
            dns_names,
            ips,
            provider,
            resolver,
            verifier,
            state: Mutex::new(RefreshState {
                bundle_pem,
                renew_at,
            }),
            bundle_file,
            ads,
            admin,
        })
    }

    /// The trust bundle file (PEM).
    pub(crate) fn bundle_file(&self) -> &Path {
        &self.bundle_file
    }

    /// Picks up a changed trust bundle (new verifier, file rewritten) and
    /// renews the serving certificate when it is at half its lifetime.
    /// Returns how long until the next check is due.
    pub(crate) fn refresh(&self) -> Result<Duration, Error> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let bundle_pem = self.ca.trust_bundle_pem();
        if bundle_pem != state.bundle_pem {
            let verifier = client_verifier(&bundle_pem, &self.provider)?;
            write_bundle(&self.bundle_file, &bundle_pem)?;
            self.verifier.current.store(Arc::new(verifier));
            state.bundle_pem = bundle_pem;
            tracing::info!(
                file = %self.bundle_file.display(),
                "trust bundle changed: new handshakes verify with it, the file is rewritten"
            );
        }
        let now = SystemTime::now();
        if now >= state.renew_at {
            let (key, renew_at) = issue(
                &self.ca,
                &self.identity,
                &self.dns_names,
                &self.ips,
                &self.provider,
            )?;
            self.resolver.current.store(Arc::new(key));
            state.renew_at = renew_at;
            tracing::debug!("renewed mesh-control's serving certificate");
        }
        let until_renewal = state.renew_at.duration_since(now).unwrap_or_default();
        Ok(until_renewal.min(POLL))
    }

    /// The serving certificate currently presented (leaf first, DER).
    pub(crate) fn serving_chain(&self) -> Vec<CertificateDer<'static>> {
        self.resolver.current.load().cert.clone()
    }
}

/// Issues a serving certificate; returns it with its renewal time.
fn issue(
    ca: &CertificateAuthority,
    identity: &SpiffeId,
    dns_names: &[String],
    ips: &[IpAddr],
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, SystemTime), Error> {
    let (issued, key_pem) = ca.issue_serving_certificate(identity, dns_names, ips, None)?;
    let chain = CertificateDer::pem_slice_iter(issued.chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::config(format!("serving certificate: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Error::config(format!("serving key: {e}")))?;
    let key = CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| Error::config(format!("serving certificate: {e}")))?;
    let lifetime = issued
        .not_after
        .duration_since(issued.not_before)
        .unwrap_or_default();
    Ok((key, issued.not_before + lifetime / 2))
}

fn client_verifier(
    bundle_pem: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        let cert = cert.map_err(|e| Error::config(format!("trust bundle: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| Error::config(format!("trust bundle: {e}")))?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| Error::config(format!("trust bundle: {e}")))
}

fn write_bundle(path: &Path, pem: &str) -> Result<(), Error> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::io(format!("cannot create {}", parent.display()), e))?;
    }
    write_file(path, pem, false)
}

/// The current serving certificate.
struct Resolver {
    current: ArcSwap<CertifiedKey>,
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Resolver")
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// Verifies optional client certificates against the current bundle.
struct BundleVerifier {
    current: ArcSwap<Arc<dyn ClientCertVerifier>>,
}

impl fmt::Debug for BundleVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BundleVerifier")
    }
}

impl ClientCertVerifier for BundleVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; the bundle changes under us.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().supported_verify_schemes()
    }
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone)]
pub(crate) struct PeerInfo {
    pub(crate) addr: SocketAddr,
    /// The SPIFFE ID of a verified client certificate.
    pub(crate) identity: Option<SpiffeId>,
}

/// An accepted, handshaken TLS connection.
pub(crate) struct TlsConn {
    stream: TlsStream<TcpStream>,
    pub(crate) peer: PeerInfo,
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    /// The peer with its verified identity: ADS and CSDS read it from the
    /// request's extensions to authenticate the stream (`ads::authenticate`).
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

/// Runs the TLS handshake of an accepted connection under
/// [`HANDSHAKE_TIMEOUT`]: the connection, with the SPIFFE ID of a verified
/// client certificate, or `None` (logged at debug: a plaintext client, a
/// port scanner, a client that does not trust this CA, a silent one).
pub(crate) async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
    what: &'static str,
) -> Option<TlsConn> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => {
            let identity = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| spiffe_id_of(leaf));
            Some(TlsConn {
                stream,
                peer: PeerInfo { addr, identity },
            })
        }
        Ok(Err(e)) => {
            tracing::debug!(peer = %addr, error = %e, "{what}: TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(peer = %addr, "{what}: TLS handshake timed out");
            None
        }
    }
}

/// Accepts TCP connections on `listener` and hands out those whose TLS
/// handshake with `config` succeeded. Handshakes run concurrently, so a
/// slow or silent client does not hold up the others; failures are
/// logged at debug level (a plaintext client is one).
pub(crate) fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    what: &'static str,
) -> (mpsc::Receiver<TlsConn>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "{what}: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(conn) = handshake(&acceptor, tcp, addr, what).await {
                    let _ = tx.send(conn).await;
                }
            });
        }
    });
    (rx, task)
}

/// The SPIFFE ID in a certificate's URI SANs.
fn spiffe_id_of(cert: &CertificateDer<'_>) -> Option<SpiffeId> {
    let (_, cert) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) if uri.starts_with("spiffe://") => SpiffeId::parse(uri).ok(),
        _ => None,
    })
}

//! The TLS material of rows (c) and (d-tls): one root, shared by the plain-rustls
//! baselines and the mesh's mTLS rows, so both sides of every comparison handshake
//! with the same kind of certificates (ECDSA P-256, signed by the same root, the
//! same X.509 profile) over the same rustls build (ring, TLS 1.3).
//!
//! The orchestrator generates a root with rcgen and hands its certificate and key to
//! mesh-control (the control role's CA signs the mesh workloads' CSRs with it). For
//! the plain rows it issues a server certificate (`localhost`, `127.0.0.1`) and a
//! client certificate with the same CA code (`CertificateAuthority::signing_pem`,
//! `issue_serving_certificate`), and hands the PEM text to the app processes
//! through environment variables. The plain server requires and verifies the client
//! certificate (rustls' `WebPkiClientVerifier`), the client verifies the server's:
//! the handshake work of a mesh mTLS hop, minus the SPIFFE identity checks. Both
//! plain sides turn TLS session resumption off, as the mesh does, so a new
//! connection costs a full handshake on both.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use proxyless::control::ca::{CertificateAuthority, JoinTokens};
use proxyless::mesh_core::spiffe::SpiffeId;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The trust domain of every bench identity.
pub(crate) const TRUST_DOMAIN: &str = "cluster.local";
/// The service account of the client app (the principal the ALLOW policy names).
pub(crate) const CLIENT_ACCOUNT: &str = "bench-client";

const CA: &str = "MESH_BENCH_TLS_CA";
const CA_KEY: &str = "MESH_BENCH_TLS_CA_KEY";
const SERVER_CERT: &str = "MESH_BENCH_TLS_SERVER_CERT";
const SERVER_KEY: &str = "MESH_BENCH_TLS_SERVER_KEY";
const CLIENT_CERT: &str = "MESH_BENCH_TLS_CLIENT_CERT";
const CLIENT_KEY: &str = "MESH_BENCH_TLS_CLIENT_KEY";
/// For the control role: the join tokens its CA accepts (JoinTokens JSON).
pub(crate) const JOIN_TOKENS_ENV: &str = "MESH_BENCH_JOIN_TOKENS";
/// For the control role: where it writes the trust bundle for bootstraps.
pub(crate) const TRUST_BUNDLE_ENV: &str = "MESH_BENCH_TRUST_BUNDLE_FILE";

/// PEM text of the root (and its key) and of both certificates and keys.
#[derive(Debug, Clone)]
pub(crate) struct TlsMaterial {
    ca: String,
    ca_key: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

impl TlsMaterial {
    /// A fresh root and a server and a client certificate issued under it by the
    /// mesh CA's code.
    pub(crate) fn generate() -> Result<TlsMaterial, String> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let err = |e: rcgen::Error| format!("generating the bench root: {e}");
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "proxyless bench CA");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
        let (ca, ca_key) = (ca_cert.pem(), ca_key.serialize_pem());
        let authority = CertificateAuthority::builder(TRUST_DOMAIN)
            .signing_pem(ca.clone(), ca_key.clone())
            .build()
            .map_err(|e| format!("the bench CA: {e}"))?;
        let issue = |account: &str, dns: &[String], ips: &[IpAddr]| {
            let id = SpiffeId::new(TRUST_DOMAIN, super::apps::NAMESPACE, account)
                .map_err(|e| format!("{account}: {e}"))?;
            let (issued, key) = authority
                .issue_serving_certificate(&id, dns, ips, None)
                .map_err(|e| format!("issuing the {account} certificate: {e}"))?;
            Ok::<_, String>((issued.chain_pem, key))
        };
        let (server_cert, server_key) = issue(
            "bench-server",
            &["localhost".to_owned()],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )?;
        let (client_cert, client_key) = issue(CLIENT_ACCOUNT, &[], &[])?;
        Ok(TlsMaterial {
            ca,
            ca_key,
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }

    /// The environment that hands this material to a plain app process.
    pub(crate) fn to_env(&self) -> Vec<(String, String)> {
        vec![
            (CA.into(), self.ca.clone()),
            (SERVER_CERT.into(), self.server_cert.clone()),
            (SERVER_KEY.into(), self.server_key.clone()),
            (CLIENT_CERT.into(), self.client_cert.clone()),
            (CLIENT_KEY.into(), self.client_key.clone()),
        ]
    }

    /// The environment that makes the control role run a CA with this root,
    /// accepting `tokens`, writing its trust bundle to `bundle_file`.
    pub(crate) fn control_env(
        &self,
        tokens: &[(String, &str)],
        bundle_file: &std::path::Path,
    ) -> Vec<(String, String)> {
        let tokens: Vec<serde_json::Value> = tokens
            .iter()
            .map(|(token, account)| {
                serde_json::json!({
                    "token": token,
                    "namespace": super::apps::NAMESPACE,
                    "service_account": account,
                })
            })
            .collect();
        vec![
            (CA.into(), self.ca.clone()),
            (CA_KEY.into(), self.ca_key.clone()),
            (
                JOIN_TOKENS_ENV.into(),
                serde_json::json!({ "tokens": tokens }).to_string(),
            ),
            (TRUST_BUNDLE_ENV.into(), bundle_file.display().to_string()),
        ]
    }

    /// In an app process: the material from the environment.
    pub(crate) fn from_env() -> Result<TlsMaterial, String> {
        let get = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
        Ok(TlsMaterial {
            ca: get(CA)?,
            ca_key: String::new(),
            server_cert: get(SERVER_CERT)?,
            server_key: get(SERVER_KEY)?,
            client_cert: get(CLIENT_CERT)?,
            client_key: get(CLIENT_KEY)?,
        })
    }

    fn roots(&self) -> Result<rustls::RootCertStore, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs(&self.ca)? {
            roots
                .add(cert)
                .map_err(|e| format!("adding the CA to the trust store: {e}"))?;
        }
        Ok(roots)
    }

    /// The server's config: its certificate, client certificates required, no
    /// session tickets (as the mesh's).
    pub(crate) fn server_config(
        &self,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ServerConfig>, String> {
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(self.roots()?))
            .build()
            .map_err(|e| format!("building the client verifier: {e}"))?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.server_cert)?, key(&self.server_key)?)
            .map_err(|e| format!("the server certificate: {e}"))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The client's config: trusts the CA, presents the client certificate, no
    /// session resumption (as the mesh's).
    pub(crate) fn client_config(
        &self,
        alpn: &[&[u8]],
    ) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs(&self.client_cert)?, key(&self.client_key)?)
            .map_err(|e| format!("the client certificate: {e}"))?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }
}

/// In the control role: the CA the environment describes ([`TlsMaterial::control_env`]),
/// and the trust bundle file, if any.
pub(crate) fn control_ca_from_env()
-> Result<Option<(CertificateAuthority, std::path::PathBuf)>, String> {
    let (Ok(ca), Ok(key)) = (std::env::var(CA), std::env::var(CA_KEY)) else {
        return Ok(None);
    };
    let tokens =
        std::env::var(JOIN_TOKENS_ENV).map_err(|_| format!("{JOIN_TOKENS_ENV} is not set"))?;
    let tokens = JoinTokens::from_json(&tokens).map_err(|e| format!("{JOIN_TOKENS_ENV}: {e}"))?;
    let bundle =
        std::env::var(TRUST_BUNDLE_ENV).map_err(|_| format!("{TRUST_BUNDLE_ENV} is not set"))?;
    let authority = CertificateAuthority::builder(TRUST_DOMAIN)
        .signing_pem(ca, key)
        .join_tokens(tokens)
        .build()
        .map_err(|e| format!("the control role's CA: {e}"))?;
    Ok(Some((authority, bundle.into())))
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("reading a PEM certificate: {e}"))
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("reading a PEM key: {e}"))
}

/// A connector for hyper-util's pooled client that dials TCP, then TLS (server name
/// `localhost`).
#[derive(Clone)]
pub(crate) struct TlsConnector {
    connector: tokio_rustls::TlsConnector,
}

impl TlsConnector {
    /// A connector with `config`.
    pub(crate) fn new(config: Arc<rustls::ClientConfig>) -> Self {
        TlsConnector {
            connector: tokio_rustls::TlsConnector::from(config),
        }
    }
}

type ConnectFuture = Pin<Box<dyn Future<Output = io::Result<TlsIo>> + Send>>;

impl tower::Service<Uri> for TlsConnector {
    type Response = TlsIo;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connector = self.connector.clone();
        Box::pin(async move {
            let host = uri.host().unwrap_or("127.0.0.1").to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from("localhost")
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = connector.connect(name, tcp).await?;
            Ok(TlsIo(TokioIo::new(tls)))
        })
    }
}

/// A client TLS stream as hyper-util's pool wants it.
pub(crate) struct TlsIo(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl Connection for TlsIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
}

/// A server TLS stream as tonic's `serve_with_incoming` wants it.
pub(crate) struct TlsServerConn(pub(crate) tokio_rustls::server::TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsServerConn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for TlsServerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsServerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

//! The plain-rustls baseline of row (c): mutual TLS between the client app and the
//! server app with a throw-away CA, no mesh involved.
//!
//! The orchestrator makes a CA, a server certificate (`localhost`, `127.0.0.1`) and a
//! client certificate with rcgen, and hands the PEM text to the app processes through
//! environment variables. The server requires and verifies the client certificate
//! (rustls' `WebPkiClientVerifier`), the client verifies the server's: the same
//! handshake work a mesh mTLS hop does, minus SPIFFE identity checks.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

const CA: &str = "MESH_BENCH_TLS_CA";
const SERVER_CERT: &str = "MESH_BENCH_TLS_SERVER_CERT";
const SERVER_KEY: &str = "MESH_BENCH_TLS_SERVER_KEY";
const CLIENT_CERT: &str = "MESH_BENCH_TLS_CLIENT_CERT";
const CLIENT_KEY: &str = "MESH_BENCH_TLS_CLIENT_KEY";

/// PEM text of the CA and of both certificates and keys.
#[derive(Debug, Clone)]
pub(crate) struct TlsMaterial {
    ca: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

impl TlsMaterial {
    /// A fresh CA and a server and a client certificate signed by it.
    pub(crate) fn generate() -> Result<TlsMaterial, String> {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let err = |e: rcgen::Error| format!("generating test certificates: {e}");
        let ca_key = KeyPair::generate().map_err(err)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "proxyless bench CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).map_err(err)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, usage: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().map_err(err)?;
            let mut params = CertificateParams::new(names).map_err(err)?;
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).map_err(err)?;
            Ok::<_, String>((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            ExtendedKeyUsagePurpose::ServerAuth,
        )?;
        let (client_cert, client_key) = leaf(
            vec!["bench-client".into()],
            ExtendedKeyUsagePurpose::ClientAuth,
        )?;
        Ok(TlsMaterial {
            ca: ca_cert.pem(),
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }

    /// The environment that hands this material to an app process.
    pub(crate) fn to_env(&self) -> Vec<(String, String)> {
        vec![
            (CA.into(), self.ca.clone()),
            (SERVER_CERT.into(), self.server_cert.clone()),
            (SERVER_KEY.into(), self.server_key.clone()),
            (CLIENT_CERT.into(), self.client_cert.clone()),
            (CLIENT_KEY.into(), self.client_key.clone()),
        ]
    }

    /// In an app process: the material from the environment.
    pub(crate) fn from_env() -> Result<TlsMaterial, String> {
        let get = |k: &str| std::env::var(k).map_err(|_| format!("{k} is not set"));
        Ok(TlsMaterial {
            ca: get(CA)?,
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

    /// The server's config: its certificate, client certificates required.
    pub(crate) fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(self.roots()?))
            .build()
            .map_err(|e| format!("building the client verifier: {e}"))?;
        let mut config = rustls::ServerConfig::builder()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.server_cert)?, key(&self.server_key)?)
            .map_err(|e| format!("the server certificate: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The client's config: trusts the CA, presents the client certificate.
    pub(crate) fn client_config(&self) -> Result<Arc<rustls::ClientConfig>, String> {
        let mut config = rustls::ClientConfig::builder()
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(certs(&self.client_cert)?, key(&self.client_key)?)
            .map_err(|e| format!("the client certificate: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
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

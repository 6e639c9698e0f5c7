//! TLS to the control server (`channel_creds` `tls`, gRFC A65 config).
//!
//! tonic is built without its TLS features in this workspace, so the ADS
//! channel connects through [`TlsConnector`]: TCP, then a rustls handshake
//! (ALPN `h2`) that verifies the server certificate against the bootstrap's
//! `ca_certificate_file` for the host of `server_uri` (an IP address is
//! matched against the certificate's IP SANs), presenting the client
//! certificate when the bootstrap names one. The files are read on every
//! connection attempt, so a rotated CA or client certificate is picked up
//! at the next reconnect.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::Error;
use crate::bootstrap::{ChannelTls, XdsServer};

/// Builds the rustls client config for a server: roots from
/// `ca_certificate_file`, the client certificate if configured, ALPN `h2`.
/// The error names the file and what is wrong with it.
pub(crate) fn client_config(tls: &ChannelTls) -> Result<Arc<ClientConfig>, Error> {
    let ca = tls.ca_certificate_file();
    let pem = std::fs::read(ca).map_err(|e| {
        Error::connect(format!(
            "channel_creds tls: cannot read ca_certificate_file {}: {e}",
            ca.display()
        ))
    })?;
    let mut roots = RootCertStore::empty();
    let mut found = 0usize;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            Error::connect(format!(
                "channel_creds tls: ca_certificate_file {} is not valid PEM: {e}",
                ca.display()
            ))
        })?;
        roots.add(cert).map_err(|e| {
            Error::connect(format!(
                "channel_creds tls: ca_certificate_file {} holds an unusable CA certificate: {e}",
                ca.display()
            ))
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(Error::connect(format!(
            "channel_creds tls: ca_certificate_file {} holds no PEM CERTIFICATE block",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::connect(format!("channel_creds tls: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (tls.certificate_file(), tls.private_key_file()) {
        (Some(cert_file), Some(key_file)) => {
            let chain = CertificateDer::pem_file_iter(cert_file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    Error::connect(format!(
                        "channel_creds tls: cannot read certificate_file {}: {e}",
                        cert_file.display()
                    ))
                })?;
            let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                Error::connect(format!(
                    "channel_creds tls: cannot read private_key_file {}: {e}",
                    key_file.display()
                ))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::connect(format!(
                    "channel_creds tls: certificate_file {} and private_key_file {} do not \
                     make a usable client certificate: {e}",
                    cert_file.display(),
                    key_file.display()
                ))
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Connects to one control server over TLS: the `connector` of tonic's
/// `Endpoint::connect_with_connector` (it is handed the endpoint URI).
#[derive(Clone)]
pub(crate) struct TlsConnector {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    ca_file: Arc<str>,
    /// Bounds TCP connect plus handshake (tonic applies its connect timeout
    /// only to its own connector).
    timeout: Duration,
}

impl TlsConnector {
    /// A connector for `server` (which must have TLS settings).
    pub(crate) fn new(
        server: &XdsServer,
        tls: &ChannelTls,
        timeout: Duration,
    ) -> Result<TlsConnector, Error> {
        let config = client_config(tls)?;
        let server_name = ServerName::try_from(server.host().to_owned()).map_err(|e| {
            Error::connect(format!(
                "xDS server {}: {:?} is not a valid TLS server name: {e}",
                server.server_uri(),
                server.host()
            ))
        })?;
        Ok(TlsConnector {
            config,
            server_name,
            ca_file: tls.ca_certificate_file().display().to_string().into(),
            timeout,
        })
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let timeout = this.timeout;
            tokio::time::timeout(timeout, this.connect(uri))
                .await
                .map_err(|_| format!("TCP connect and TLS handshake took over {timeout:?}"))?
        })
    }
}

impl TlsConnector {
    async fn connect(self, uri: http::Uri) -> Result<TokioIo<TlsStream<TcpStream>>, BoxError> {
        {
            let host = uri.host().ok_or("the endpoint URI has no host")?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let port = uri.port_u16().unwrap_or(443);
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let connector = tokio_rustls::TlsConnector::from(self.config.clone());
            let stream = connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| handshake_error(e, &self.server_name, &self.ca_file))?;
            Ok(TokioIo::new(stream))
        }
    }
}

/// Says what a failed handshake means; a certificate the CA does not
/// verify is the common case (wrong `ca_certificate_file`, or a server
/// name its certificate lacks).
fn handshake_error(e: io::Error, name: &ServerName<'_>, ca_file: &str) -> BoxError {
    let tls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    match tls {
        Some(rustls::Error::InvalidCertificate(why)) => format!(
            "TLS handshake with the xDS server: certificate verification failed ({why:?}): the \
             server's certificate must be issued by the CA in ca_certificate_file {ca_file} and \
             valid for {}",
            name.to_str()
        )
        .into(),
        Some(other) => format!("TLS handshake with the xDS server failed: {other}").into(),
        None => format!("TLS handshake with the xDS server failed: {e}").into(),
    }
}

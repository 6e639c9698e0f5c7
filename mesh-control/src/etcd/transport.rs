//! Channels to etcd's endpoints: plaintext or TLS (rustls), with connect
//! timeouts this module applies itself.
//!
//! tonic is built without its TLS features in this workspace, so, as
//! mesh-xds-client does for ADS (`mesh-xds-client/src/tls.rs`), each
//! channel connects through a connector of ours: TCP, then for `https`
//! endpoints a rustls handshake (ALPN `h2`) verifying etcd's certificate
//! against the configured CA for the endpoint's host, presenting the client
//! certificate when one is configured (etcd's `--client-cert-auth`). The
//! certificate files are read again on every connection, so rotated files
//! are used at the next reconnect.
//!
//! The connectors bound TCP connect plus handshake by the connect timeout
//! themselves (rather than tonic's `connect_timeout`, whose timeout error
//! would not be marked as a connect error): every failure they return is
//! wrapped by tonic in [`tonic::ConnectError`], which is how the client
//! knows a request was never sent and may go to the next endpoint.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use super::Error;

/// TLS to etcd: the CA that issued etcd's server certificate, and the
/// client certificate and key when etcd runs with `--client-cert-auth`
/// (both or neither). PEM files, read at connect and again on every
/// reconnection (so rotated certificates are picked up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA bundle that verifies etcd's certificate (etcdctl's `--cacert`).
    pub ca: PathBuf,
    /// The client certificate chain (etcdctl's `--cert`).
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (etcdctl's `--key`).
    pub key: Option<PathBuf>,
}

/// Builds the rustls config from the files: roots from `ca`, the client
/// certificate when configured, ALPN `h2`. The error names the file and
/// what is wrong with it.
pub(crate) fn client_config(tls: &EtcdTls) -> Result<Arc<ClientConfig>, Error> {
    let ca = &tls.ca;
    let pem = std::fs::read(ca).map_err(|e| {
        Error::tls(format!(
            "etcd TLS: cannot read the CA file {}: {e}",
            ca.display()
        ))
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| {
            Error::tls(format!(
                "etcd TLS: the CA file {} is not valid PEM: {e}",
                ca.display()
            ))
        })?;
        roots.add(cert).map_err(|e| {
            Error::tls(format!(
                "etcd TLS: the CA file {} holds an unusable CA certificate: {e}",
                ca.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(Error::tls(format!(
            "etcd TLS: the CA file {} holds no PEM CERTIFICATE block",
            ca.display()
        )));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::tls(format!("etcd TLS: {e}")))?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert_file), Some(key_file)) => {
            let chain = CertificateDer::pem_file_iter(cert_file)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    Error::tls(format!(
                        "etcd TLS: cannot read the client certificate {}: {e}",
                        cert_file.display()
                    ))
                })?;
            if chain.is_empty() {
                return Err(Error::tls(format!(
                    "etcd TLS: the client certificate file {} holds no PEM CERTIFICATE block",
                    cert_file.display()
                )));
            }
            let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                Error::tls(format!(
                    "etcd TLS: cannot read the client key {}: {e}",
                    key_file.display()
                ))
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                Error::tls(format!(
                    "etcd TLS: the client certificate {} and key {} do not make a usable client \
                     certificate: {e}",
                    cert_file.display(),
                    key_file.display()
                ))
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(file), None) | (None, Some(file)) => {
            return Err(Error::tls(format!(
                "etcd TLS: {} is given without its pair: a client certificate needs both the \
                 certificate and the key",
                file.display()
            )));
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// One configured etcd endpoint, normalized (`http://host:port` or
/// `https://host:port`), and the channel to it.
#[derive(Debug, Clone)]
pub(crate) struct EtcdEndpoint {
    pub(crate) url: String,
    pub(crate) channel: Channel,
}

/// Parses `endpoint` (a client URL as etcd's `--advertise-client-urls`
/// lists them; a bare `host:port` takes the scheme TLS implies) into a
/// URI with scheme, host and port.
pub(crate) fn parse_endpoint(endpoint: &str, tls: bool) -> Result<Uri, Error> {
    let trimmed = endpoint.trim();
    let with_scheme = if trimmed.contains("://") {
        trimmed.to_owned()
    } else if tls {
        format!("https://{trimmed}")
    } else {
        format!("http://{trimmed}")
    };
    let uri: Uri = with_scheme.parse().map_err(|e| {
        Error::config(format!(
            "etcd endpoint {endpoint:?} is not a URL: {e}; write it as etcd's \
             --advertise-client-urls do, e.g. http://127.0.0.1:2379"
        ))
    })?;
    let scheme = uri.scheme_str().unwrap_or_default();
    match (scheme, tls) {
        ("http", false) | ("https", true) => {}
        ("https", false) => {
            return Err(Error::config(format!(
                "etcd endpoint {endpoint} is https, but no TLS settings were given: give the CA \
                 that issued etcd's certificate (and a client certificate if etcd requires one)"
            )));
        }
        ("http", true) => {
            return Err(Error::config(format!(
                "etcd endpoint {endpoint} is plaintext http, but TLS settings were given: use \
                 https:// endpoints with TLS, or drop the TLS settings"
            )));
        }
        _ => {
            return Err(Error::config(format!(
                "etcd endpoint {endpoint}: scheme {scheme:?} is neither http nor https"
            )));
        }
    }
    let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
        return Err(Error::config(format!(
            "etcd endpoint {endpoint} has no host"
        )));
    };
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(Error::config(format!(
            "etcd endpoint {endpoint} has a path; give the client URL only (scheme, host, port)"
        )));
    }
    let port = uri.port_u16().unwrap_or(2379);
    let normalized = if host.contains(':') && !host.starts_with('[') {
        format!("{scheme}://[{host}]:{port}")
    } else {
        format!("{scheme}://{host}:{port}")
    };
    normalized
        .parse()
        .map_err(|e| Error::config(format!("etcd endpoint {endpoint} is not a valid URL: {e}")))
}

/// Timeouts of a channel.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChannelTimeouts {
    pub(crate) connect: Duration,
    pub(crate) keepalive_interval: Duration,
    pub(crate) keepalive_timeout: Duration,
}

/// A lazy channel to `uri`: it connects at the first call and again after
/// the connection breaks. HTTP/2 keepalive pings run only while a stream
/// is open (a watch), which is when a silently dead peer must be noticed;
/// pinging idle connections would break etcd's keepalive policy
/// (`PermitWithoutStream` is false there) and get them closed.
pub(crate) fn channel(
    uri: Uri,
    tls: Option<&EtcdTls>,
    timeouts: ChannelTimeouts,
) -> Result<Channel, Error> {
    let url = uri.to_string();
    let endpoint = Endpoint::from(uri.clone())
        .http2_keep_alive_interval(timeouts.keepalive_interval)
        .keep_alive_timeout(timeouts.keepalive_timeout)
        .keep_alive_while_idle(false);
    match tls {
        None => Ok(endpoint.connect_with_connector_lazy(PlainConnector {
            timeout: timeouts.connect,
        })),
        Some(tls) => {
            // Checked here so a bad file fails `connect`, not every call.
            client_config(tls)?;
            let host = uri.host().unwrap_or_default();
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            let server_name = ServerName::try_from(host.to_owned()).map_err(|e| {
                Error::config(format!(
                    "etcd endpoint {url}: {host:?} is not a valid TLS server name: {e}"
                ))
            })?;
            Ok(endpoint.connect_with_connector_lazy(TlsConnector {
                tls: Arc::new(tls.clone()),
                server_name,
                timeout: timeouts.connect,
            }))
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Connecting<T> = Pin<Box<dyn Future<Output = Result<T, BoxError>> + Send>>;

/// The host and port of a normalized endpoint URI.
fn host_port(uri: &Uri) -> Result<(String, u16), BoxError> {
    let host = uri.host().ok_or("the endpoint has no host")?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Ok((host.to_owned(), uri.port_u16().unwrap_or(2379)))
}

async fn tcp(uri: &Uri) -> Result<TcpStream, BoxError> {
    let (host, port) = host_port(uri)?;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("TCP connect to {host}:{port}: {e}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// Plaintext TCP with a timeout.
#[derive(Clone)]
struct PlainConnector {
    timeout: Duration,
}

impl tonic::codegen::Service<Uri> for PlainConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Connecting<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, tcp(&uri)).await {
                Ok(Ok(tcp)) => Ok(TokioIo::new(tcp)),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(format!("TCP connect to {uri} took over {timeout:?}").into()),
            }
        })
    }
}

/// TCP then a rustls handshake, together within a timeout.
#[derive(Clone)]
struct TlsConnector {
    tls: Arc<EtcdTls>,
    server_name: ServerName<'static>,
    timeout: Duration,
}

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Connecting<Self::Response>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let timeout = this.timeout;
            match tokio::time::timeout(timeout, this.connect(uri.clone())).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "TCP connect and TLS handshake with {uri} took over {timeout:?}"
                )
                .into()),
            }
        })
    }
}

impl TlsConnector {
    async fn connect(self, uri: Uri) -> Result<TokioIo<TlsStream<TcpStream>>, BoxError> {
        let config = client_config(&self.tls).map_err(|e| TlsHandshakeError(e.to_string()))?;
        let tcp = tcp(&uri).await?;
        let stream = tokio_rustls::TlsConnector::from(config)
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| handshake_error(&e, &self.server_name, &self.tls))?;
        Ok(TokioIo::new(stream))
    }
}

/// A failed TLS handshake (or TLS files that no longer load), said the way
/// an operator fixes it. The client's error classification finds it in a
/// status's causes and reports [`super::ErrorKind::Tls`].
#[derive(Debug)]
pub(crate) struct TlsHandshakeError(String);

impl fmt::Display for TlsHandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsHandshakeError {}

fn handshake_error(e: &std::io::Error, name: &ServerName<'_>, tls: &EtcdTls) -> BoxError {
    let rustls = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let text = match rustls {
        Some(rustls::Error::InvalidCertificate(why)) => format!(
            "certificate verification failed ({why:?}): etcd's certificate must be issued by \
             the CA in {} and valid for {}",
            tls.ca.display(),
            name.to_str()
        ),
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {e}"),
    };
    Box::new(TlsHandshakeError(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_normalized() {
        let parse = |e: &str, tls| parse_endpoint(e, tls).map(|u| u.to_string());
        assert_eq!(
            parse("127.0.0.1:2379", false).unwrap(),
            "http://127.0.0.1:2379/"
        );
        assert_eq!(parse("etcd-0:2379", true).unwrap(), "https://etcd-0:2379/");
        assert_eq!(
            parse("http://10.0.0.1", false).unwrap(),
            "http://10.0.0.1:2379/"
        );
        assert_eq!(
            parse("http://[::1]:2379/", false).unwrap(),
            "http://[::1]:2379/"
        );
        let error = parse("https://etcd:2379", false).unwrap_err();
        assert_eq!(error.kind(), super::super::ErrorKind::Config);
        assert!(error.to_string().contains("no TLS settings"), "{error}");
        assert!(parse("http://etcd:2379", true).is_err());
        assert!(parse("unix:///run/etcd.sock", false).is_err());
        assert!(parse("http://etcd:2379/v3", false).is_err());
        assert!(parse("http://", false).is_err());
    }

    #[test]
    fn tls_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let missing = EtcdTls {
            ca: dir.join("missing.pem"),
            cert: None,
            key: None,
        };
        let error = client_config(&missing).unwrap_err();
        assert_eq!(error.kind(), super::super::ErrorKind::Tls);
        assert!(error.to_string().contains("missing.pem"), "{error}");
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate").unwrap();
        let error = client_config(&EtcdTls {
            ca: empty.clone(),
            cert: None,
            key: None,
        })
        .unwrap_err();
        assert!(error.to_string().contains("no PEM CERTIFICATE"), "{error}");
    }
}

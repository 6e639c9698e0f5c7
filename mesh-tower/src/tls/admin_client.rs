//! The small HTTP/1.1 client of mesh-control's admin API, plaintext or
//! https: registration (`serve`) and the `mesh_ca` certificate provider
//! share it.
//!
//! The admin API is https when the bootstrap's control channel is TLS
//! (`xds_servers[0].channel_creds[0].type` `"tls"`); the server certificate
//! is verified against the same `ca_certificate_file` (mesh-control's CA
//! root), with the host of `node.metadata.PROXYLESS_ADMIN` as the server
//! name (mesh-control's certificate carries its listen IPs and `localhost`).
//! One connection per call: the calls are rare (a registration heartbeat
//! every few seconds, a certificate every few hours).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::store::CertStore;
use crate::error::{BoxError, Error, ErrorKind};

/// How long one admin API call may take.
pub(crate) const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of the admin API at one address.
#[derive(Clone)]
pub(crate) struct AdminClient {
    /// `host:port`.
    authority: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// The configured roots (https).
    base_roots: Option<Arc<RootCertStore>>,
    /// The workload's certificate store whose trust bundle is trusted too
    /// (see [`AdminClient::trusting`]).
    store: Option<CertStore>,
    /// `Bearer <token>`, built once.
    authorization: Option<HeaderValue>,
    /// The kind of the errors this client returns.
    kind: ErrorKind,
}

impl AdminClient {
    /// A client of `address` (`host:port`, `http://host:port`,
    /// `https://host:port`): https verified with `ca_pem` (PEM roots) when
    /// given, plaintext otherwise; `token` is sent as a bearer token.
    pub(crate) fn new(
        address: &str,
        ca_pem: Option<&[u8]>,
        token: Option<&str>,
        kind: ErrorKind,
    ) -> Result<Self, Error> {
        let fail = |message: String| Error::new(kind, message);
        let trimmed = address.trim();
        let (https, rest) = if let Some(rest) = trimmed.strip_prefix("https://") {
            (true, rest)
        } else {
            (false, trimmed.strip_prefix("http://").unwrap_or(trimmed))
        };
        let authority = rest.trim_end_matches('/');
        let parsed = http::uri::Authority::try_from(authority).ok();
        let Some(parsed) = parsed.filter(|_| !authority.is_empty() && !authority.contains('/'))
        else {
            return Err(fail(format!("admin address {address:?} is not host:port")));
        };
        let mut base_roots = None;
        let tls = match ca_pem {
            Some(pem) => {
                let host = parsed.host().trim_start_matches('[').trim_end_matches(']');
                let name = ServerName::try_from(host.to_owned()).map_err(|e| {
                    fail(format!(
                        "admin address {address:?}: {host:?} is not a DNS name or IP address \
                         to verify mesh-control's certificate against: {e}"
                    ))
                })?;
                let (config, roots) = client_config(pem, kind)?;
                base_roots = Some(Arc::new(roots));
                Some((TlsConnector::from(config), name))
            }
            None if https => {
                return Err(fail(format!(
                    "admin address {address:?} is https, but no CA certificate was given to \
                     verify mesh-control with (the bootstrap's \
                     xds_servers[0].channel_creds[0].config.ca_certificate_file)"
                )));
            }
            None => None,
        };
        let authorization = match token {
            Some(token) => Some(bearer(token).map_err(|()| {
                fail(
                    "the join token is not a valid HTTP header value (stray whitespace or \
                      control characters?)"
                        .into(),
                )
            })?),
            None => None,
        };
        Ok(AdminClient {
            authority: authority.to_owned(),
            tls,
            base_roots,
            store: None,
            authorization,
            kind,
        })
    }

    /// This client, also trusting the trust bundle `store` holds at each
    /// call: the bundle a workload receives with its certificates carries a
    /// rotated root from the start of the rotation's overlap, so calls
    /// still verify mesh-control once the new root signs mesh-control's own
    /// certificate, even where the configured CA file is not updated.
    pub(crate) fn trusting(mut self, store: &CertStore) -> Self {
        self.store = Some(store.clone());
        self
    }

    fn connector_trusting(
        &self,
        base: &RootCertStore,
        store: &CertStore,
    ) -> Result<TlsConnector, BoxError> {
        let mut roots = base.clone();
        roots
            .roots
            .extend(store.material().roots.roots.iter().cloned());
        Ok(TlsConnector::from(config_with_roots(roots, self.kind)?))
    }

    /// Whether the calls go over https.
    pub(crate) fn is_https(&self) -> bool {
        self.tls.is_some()
    }

    /// `https://host:port` or `http://host:port`, for messages.
    pub(crate) fn base(&self) -> String {
        let scheme = if self.is_https() { "https" } else { "http" };
        format!("{scheme}://{}", self.authority)
    }

    /// One call: the status and the whole reply body.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), Error> {
        let what = format!("admin API at {}: {method} {path}", self.base());
        let exchange = async {
            let stream = TcpStream::connect(&self.authority).await?;
            let bytes = match body {
                Some(v) => Bytes::from(v.to_string()),
                None => Bytes::new(),
            };
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(HOST, &self.authority)
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(bytes))?;
            if let Some(value) = &self.authorization {
                req.headers_mut().insert(AUTHORIZATION, value.clone());
            }
            match &self.tls {
                Some((connector, name)) => {
                    let connector = match (&self.base_roots, &self.store) {
                        (Some(base), Some(store)) => self.connector_trusting(base, store)?,
                        _ => connector.clone(),
                    };
                    let stream = connector.connect(name.clone(), stream).await?;
                    exchange(TokioIo::new(stream), req).await
                }
                None => exchange(TokioIo::new(stream), req).await,
            }
        };
        match tokio::time::timeout(ADMIN_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(Error::new(self.kind, format!("{what} failed")).with_source(e)),
            Err(_) => Err(Error::new(
                self.kind,
                format!("{what}: no answer within {ADMIN_TIMEOUT:?}"),
            )),
        }
    }

    /// An error for a non-success answer, with the server's message (the
    /// `error` field of a JSON body, else the body).
    pub(crate) fn refused(&self, what: &str, status: StatusCode, reply: &[u8]) -> Error {
        let message = serde_json::from_slice::<Value>(reply)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(reply).trim().to_owned());
        let hint = match status {
            StatusCode::UNAUTHORIZED => {
                " (no or unknown credentials: set the join token, e.g. the bootstrap's \
                 certificate_providers.mesh {\"plugin_name\": \"mesh_ca\", \"config\": \
                 {\"token_file\": \"/etc/mesh/token\"}})"
            }
            StatusCode::FORBIDDEN => " (the workload's identity is not allowed to do this)",
            _ => "",
        };
        Error::new(
            self.kind,
            format!(
                "admin API at {}: {what} answered {status}: {message}{hint}",
                self.base()
            ),
        )
    }
}

async fn exchange<IO>(
    io: TokioIo<IO>,
    req: Request<Full<Bytes>>,
) -> Result<(StatusCode, Bytes), BoxError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let response = sender.send_request(req).await?;
    let status = response.status();
    let reply = response.into_body().collect().await?.to_bytes();
    Ok((status, reply))
}

fn bearer(token: &str) -> Result<HeaderValue, ()> {
    let mut value = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| ())?;
    value.set_sensitive(true);
    Ok(value)
}

/// A rustls client config trusting the PEM roots `ca_pem` (standard WebPKI
/// verification of mesh-control's server certificate and name).
fn client_config(
    ca_pem: &[u8],
    kind: ErrorKind,
) -> Result<(Arc<ClientConfig>, RootCertStore), Error> {
    let mut roots = RootCertStore::empty();
    let mut found = 0;
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| {
            Error::new(
                kind,
                format!("the CA certificate for mesh-control is not PEM: {e}"),
            )
        })?;
        roots.add(cert).map_err(|e| {
            Error::new(
                kind,
                format!("the CA certificate for mesh-control is unusable: {e}"),
            )
        })?;
        found += 1;
    }
    if found == 0 {
        return Err(Error::new(
            kind,
            "the CA certificate for mesh-control holds no PEM certificate",
        ));
    }
    Ok((config_with_roots(roots.clone(), kind)?, roots))
}

fn config_with_roots(roots: RootCertStore, kind: ErrorKind) -> Result<Arc<ClientConfig>, Error> {
    let mut config = ClientConfig::builder_with_provider(super::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::new(kind, format!("TLS client config: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // Every call verifies mesh-control's current certificate (a resumed
    // session would skip that, e.g. across a root rotation).
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// What the bootstrap says about reaching mesh-control securely: the CA
/// file of `xds_servers[0].channel_creds[0]` when its type is `"tls"`.
pub(crate) fn control_ca_file(bootstrap: &mesh_xds_client::Bootstrap) -> Option<PathBuf> {
    bootstrap
        .xds_server_tls()
        .map(|tls| tls.ca_certificate_file().to_path_buf())
}

/// The PEM of mesh-control's CA when the bootstrap's control channel is
/// TLS; errors name the file.
pub(crate) fn control_ca_pem(
    bootstrap: &mesh_xds_client::Bootstrap,
    kind: ErrorKind,
) -> Result<Option<Vec<u8>>, Error> {
    let Some(path) = control_ca_file(bootstrap) else {
        return Ok(None);
    };
    std::fs::read(&path).map(Some).map_err(|e| {
        Error::new(
            kind,
            format!(
                "cannot read {} (the bootstrap's xds_servers[0].channel_creds[0].config.\
                 ca_certificate_file, mesh-control's CA root)",
                path.display()
            ),
        )
        .with_source(e)
    })
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base())
            .field("token", &self.authorization.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let plain = AdminClient::new("http://control:9000/", None, None, ErrorKind::Tls).unwrap();
        assert_eq!(plain.base(), "http://control:9000");
        assert!(!plain.is_https());
        let e = AdminClient::new("https://control:9000", None, None, ErrorKind::Tls).unwrap_err();
        assert!(e.to_string().contains("ca_certificate_file"), "{e}");
        assert!(AdminClient::new("control:9000/x", None, None, ErrorKind::Tls).is_err());
        assert!(AdminClient::new("", None, None, ErrorKind::Tls).is_err());
        let e = AdminClient::new("a:1", Some(b"nope"), None, ErrorKind::Tls).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn refusals_carry_the_server_message() {
        let c = AdminClient::new("a:1", None, Some("t"), ErrorKind::Registration).unwrap();
        let e = c.refused(
            "POST /v1/endpoints",
            StatusCode::FORBIDDEN,
            br#"{"error": "sa frontend may not back catalog"}"#,
        );
        assert_eq!(e.kind(), ErrorKind::Registration);
        assert!(
            e.to_string()
                .contains("403 Forbidden: sa frontend may not back catalog"),
            "{e}"
        );
    }
}

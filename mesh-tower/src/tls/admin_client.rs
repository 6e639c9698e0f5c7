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
//!
//! Replicas: `PROXYLESS_ADMIN` may list several addresses
//! (`"10.0.0.2:15000,10.0.0.3:15000"`), or be one DNS name (each connect
//! tries every address it resolves to). A call tries the addresses in
//! order, starting from the last one that answered, and moves on to the
//! next when one cannot be reached, does not answer in time, or answers
//! 503 (a replica cut off from etcd); any other answer, a 4xx included, is
//! the answer.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderName, HeaderValue, Method, Request, StatusCode};
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

/// One address of the admin API.
#[derive(Debug)]
struct Target {
    /// `host:port`.
    authority: String,
    /// The name mesh-control's certificate must be valid for (https).
    name: Option<ServerName<'static>>,
}

/// A client of the admin API at one address, or at the first answering
/// one of several (replicas).
#[derive(Clone)]
pub(crate) struct AdminClient {
    targets: Arc<[Target]>,
    /// The index of the target that answered last: where calls start.
    current: Arc<AtomicUsize>,
    tls: Option<TlsConnector>,
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
    /// `https://host:port`, or a comma-separated list of them: replicas,
    /// tried in order): https verified with `ca_pem` (PEM roots) when
    /// given, plaintext otherwise; `token` is sent as a bearer token.
    pub(crate) fn new(
        address: &str,
        ca_pem: Option<&[u8]>,
        token: Option<&str>,
        kind: ErrorKind,
    ) -> Result<Self, Error> {
        let fail = |message: String| Error::new(kind, message);
        let mut targets = Vec::new();
        for one in address.split(',') {
            let trimmed = one.trim();
            let (https, rest) = if let Some(rest) = trimmed.strip_prefix("https://") {
                (true, rest)
            } else {
                (false, trimmed.strip_prefix("http://").unwrap_or(trimmed))
            };
            let authority = rest.trim_end_matches('/');
            let parsed = http::uri::Authority::try_from(authority).ok();
            let Some(parsed) = parsed.filter(|_| !authority.is_empty() && !authority.contains('/'))
            else {
                return Err(fail(format!("admin address {one:?} is not host:port")));
            };
            let name = match ca_pem {
                Some(_) => {
                    let host = parsed.host().trim_start_matches('[').trim_end_matches(']');
                    Some(ServerName::try_from(host.to_owned()).map_err(|e| {
                        fail(format!(
                            "admin address {one:?}: {host:?} is not a DNS name or IP address \
                             to verify mesh-control's certificate against: {e}"
                        ))
                    })?)
                }
                None if https => {
                    return Err(fail(format!(
                        "admin address {one:?} is https, but no CA certificate was given to \
                         verify mesh-control with (the bootstrap's \
                         xds_servers[0].channel_creds[0].config.ca_certificate_file)"
                    )));
                }
                None => None,
            };
            targets.push(Target {
                authority: authority.to_owned(),
                name,
            });
        }
        let mut base_roots = None;
        let tls = match ca_pem {
            Some(pem) => {
                let (config, roots) = client_config(pem, kind)?;
                base_roots = Some(Arc::new(roots));
                Some(TlsConnector::from(config))
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
            targets: targets.into(),
            current: Arc::new(AtomicUsize::new(0)),
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

    /// `https://host:port` or `http://host:port` of the address calls
    /// start from (the one that answered last), for messages.
    pub(crate) fn base(&self) -> String {
        self.base_of(&self.targets[self.start()])
    }

    fn base_of(&self, target: &Target) -> String {
        let scheme = if self.is_https() { "https" } else { "http" };
        format!("{scheme}://{}", target.authority)
    }

    fn start(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.targets.len()
    }

    /// One call: the status and the whole reply body of the first address
    /// that answers, trying them in order from the one that answered last
    /// (see the module docs). When none answers but with 503, the last 503;
    /// when none answers at all, an error naming each address.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), Error> {
        self.call_with_headers(method, path, body, &[]).await
    }

    /// [`AdminClient::call`] with more request headers (a lease's secret).
    pub(crate) async fn call_with_headers(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<(StatusCode, Bytes), Error> {
        let mut unanswered = Vec::new();
        let mut unavailable = None;
        for i in attempt_order(self.targets.len(), self.start()) {
            let target = &self.targets[i];
            let result = self
                .call_one(target, method.clone(), path, body, headers)
                .await;
            let outcome = match &result {
                Ok((status, _)) => Outcome::Answered(*status),
                Err(_) => Outcome::Unreachable,
            };
            if !fails_over(outcome) {
                self.current.store(i, Ordering::Relaxed);
                return result;
            }
            match result {
                Ok(answer) => {
                    tracing::debug!(
                        "admin API at {}: {method} {path} answered {}; trying the next address",
                        self.base_of(target),
                        answer.0
                    );
                    unavailable = Some((i, answer));
                }
                Err(e) => {
                    tracing::debug!("{e}; trying the next admin API address");
                    unanswered.push(e);
                }
            }
        }
        if let Some((i, answer)) = unavailable {
            self.current.store(i, Ordering::Relaxed);
            return Ok(answer);
        }
        if unanswered.len() == 1 {
            return Err(unanswered.remove(0));
        }
        let each: Vec<String> = unanswered.iter().map(ToString::to_string).collect();
        Err(Error::new(
            self.kind,
            format!(
                "{method} {path}: no admin API address answered ({})",
                each.join("; ")
            ),
        ))
    }

    /// One call to one address.
    async fn call_one(
        &self,
        target: &Target,
        method: Method,
        path: &str,
        body: Option<&Value>,
        headers: &[(HeaderName, HeaderValue)],
    ) -> Result<(StatusCode, Bytes), Error> {
        let what = format!("admin API at {}: {method} {path}", self.base_of(target));
        let exchange = async {
            let stream = TcpStream::connect(&target.authority).await?;
            let bytes = match body {
                Some(v) => Bytes::from(v.to_string()),
                None => Bytes::new(),
            };
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(HOST, &target.authority)
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(bytes))?;
            if let Some(value) = &self.authorization {
                req.headers_mut().insert(AUTHORIZATION, value.clone());
            }
            for (name, value) in headers {
                req.headers_mut().insert(name.clone(), value.clone());
            }
            match (&self.tls, &target.name) {
                (Some(connector), Some(name)) => {
                    let connector = match (&self.base_roots, &self.store) {
                        (Some(base), Some(store)) => self.connector_trusting(base, store)?,
                        _ => connector.clone(),
                    };
                    let stream = connector.connect(name.clone(), stream).await?;
                    exchange(TokioIo::new(stream), req).await
                }
                _ => exchange(TokioIo::new(stream), req).await,
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
            StatusCode::FORBIDDEN => {
                " (the workload's identity, or the lease's secret, does not allow this)"
            }
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

/// What one address did with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// No answer: the connection failed, or no answer within the timeout.
    Unreachable,
    /// An HTTP answer.
    Answered(StatusCode),
}

/// Whether a call moves on to the next address after `outcome`: when the
/// address did not answer, or answered 503 (a replica that lost etcd).
/// Every other answer is final, a refusal (4xx) included.
fn fails_over(outcome: Outcome) -> bool {
    match outcome {
        Outcome::Unreachable => true,
        Outcome::Answered(status) => status == StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// The order to try `len` addresses in, starting at `start`, wrapping around.
fn attempt_order(len: usize, start: usize) -> impl Iterator<Item = usize> {
    (0..len).map(move |i| (start + i) % len)
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
    fn several_addresses() {
        let c = AdminClient::new(" a:1 , http://b:2/ ", None, None, ErrorKind::Tls).unwrap();
        assert_eq!(c.targets.len(), 2);
        assert_eq!(c.base(), "http://a:1");
        assert_eq!(c.base_of(&c.targets[1]), "http://b:2");
        let e = AdminClient::new("a:1,,b:2", None, None, ErrorKind::Tls).unwrap_err();
        assert!(e.to_string().contains("\"\" is not host:port"), "{e}");
        let e = AdminClient::new("a:1,https://b:2", None, None, ErrorKind::Tls).unwrap_err();
        assert!(e.to_string().contains("ca_certificate_file"), "{e}");
    }

    #[test]
    fn addresses_are_tried_from_the_last_that_answered_wrapping_around() {
        assert_eq!(attempt_order(3, 0).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(attempt_order(3, 2).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(attempt_order(1, 0).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn unreachable_and_503_fail_over_other_answers_are_final() {
        assert!(fails_over(Outcome::Unreachable));
        assert!(fails_over(Outcome::Answered(
            StatusCode::SERVICE_UNAVAILABLE
        )));
        for final_answer in [
            StatusCode::OK,
            StatusCode::CREATED,
            StatusCode::NOT_FOUND,
            StatusCode::UNAUTHORIZED,
            StatusCode::FORBIDDEN,
            StatusCode::BAD_REQUEST,
            StatusCode::INTERNAL_SERVER_ERROR,
        ] {
            assert!(
                !fails_over(Outcome::Answered(final_answer)),
                "{final_answer}"
            );
        }
    }

    /// A loopback HTTP/1.1 server answering every request with `status`;
    /// counts the requests.
    async fn answering(status: u16) -> (String, Arc<AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0; 4096];
                    let _ = stream.read(&mut buf).await;
                    let body = format!("{{\"error\": \"status {status}\"}}");
                    let reply = format!(
                        "HTTP/1.1 {status} X\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(reply.as_bytes()).await;
                });
            }
        });
        (address, count)
    }

    /// A loopback address nothing listens on.
    fn refusing() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    }

    #[tokio::test]
    async fn a_call_fails_over_past_unreachable_and_503_and_sticks_to_what_answered() {
        let dead = refusing();
        let (lost_etcd, lost_count) = answering(503).await;
        let (good, good_count) = answering(200).await;
        let list = format!("{dead},{lost_etcd},{good}");
        let c = AdminClient::new(&list, None, None, ErrorKind::Registration).unwrap();
        let (status, _) = c.call(Method::PUT, "/v1/endpoints/x", None).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(lost_count.load(Ordering::SeqCst), 1);
        assert_eq!(c.base(), format!("http://{good}"));
        // The next call starts from the address that answered.
        let (status, _) = c.call(Method::PUT, "/v1/endpoints/x", None).await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(lost_count.load(Ordering::SeqCst), 1, "not asked again");
        assert_eq!(good_count.load(Ordering::SeqCst), 2);

        // A refusal (4xx) is final: the next address is not asked.
        let (forbidding, _) = answering(403).await;
        let (other, other_count) = answering(200).await;
        let c =
            AdminClient::new(&format!("{forbidding},{other}"), None, None, ErrorKind::Tls).unwrap();
        let (status, _) = c
            .call(Method::POST, "/v1/certificates", None)
            .await
            .unwrap();
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(other_count.load(Ordering::SeqCst), 0);

        // Every replica 503: the 503 is the answer (callers retry later).
        let c =
            AdminClient::new(&format!("{dead},{lost_etcd}"), None, None, ErrorKind::Tls).unwrap();
        let (status, _) = c.call(Method::POST, "/v1/endpoints", None).await.unwrap();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

        // Nothing answers: the error names every address.
        let other_dead = refusing();
        let c =
            AdminClient::new(&format!("{dead},{other_dead}"), None, None, ErrorKind::Tls).unwrap();
        let e = c
            .call(Method::POST, "/v1/endpoints", None)
            .await
            .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("no admin API address answered")
                && text.contains(&dead)
                && text.contains(&other_dead),
            "{text}"
        );
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

//! A tiny client for mesh-control's admin HTTP API (`/status`, `/v1/endpoints`, ...),
//! so tests register workloads and read status the way a workload or an operator would:
//! over HTTP/1.1 with JSON bodies, not through the server's Rust handle.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;

/// Sends `method path` with the JSON `body` (empty for none) to the admin API at `addr`
/// and returns the status code and the response body as JSON (`Null` when it is not
/// JSON, e.g. the empty body of a 204). Panics when the request cannot be made.
pub(crate) async fn admin_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(error) => panic!("connecting to the admin API at {addr}: {error}"),
    };
    exchange(stream, addr, method, path, body).await
}

/// [`admin_request`] over https, as a workload of a mesh with a CA talks to the admin
/// API: mesh-control's certificate is verified against `ca_pem` (the trust bundle a
/// bootstrap names as `ca_certificate_file`) for the IP address of `addr`.
pub(crate) async fn admin_request_https(
    addr: SocketAddr,
    ca_pem: &[u8],
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = match cert {
            Ok(cert) => cert,
            Err(error) => panic!("the admin CA PEM does not parse: {error}"),
        };
        if let Err(error) = roots.add(cert) {
            panic!("the admin CA PEM holds a bad root: {error}");
        }
    }
    assert!(!roots.is_empty(), "the admin CA PEM holds no certificate");
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = match rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
        Err(error) => panic!("rustls client config: {error}"),
    };
    let stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(error) => panic!("connecting to the admin API at {addr}: {error}"),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tls = match connector.connect(ServerName::from(addr.ip()), stream).await {
        Ok(tls) => tls,
        Err(error) => panic!("TLS handshake with the admin API at {addr}: {error}"),
    };
    exchange(tls, addr, method, path, body).await
}

/// One HTTP/1.1 request with a JSON body over `io`, and its status and JSON answer.
async fn exchange<IO>(
    io: IO,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await {
            Ok(pair) => pair,
            Err(error) => panic!("HTTP/1 handshake with the admin API at {addr}: {error}"),
        };
    tokio::spawn(conn);
    let request = match http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
    {
        Ok(request) => request,
        Err(error) => panic!("building {method} {path}: {error}"),
    };
    let response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(error) => panic!("{method} {path} on {addr}: {error}"),
    };
    let status = response.status().as_u16();
    let bytes = match response.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(error) => panic!("reading the body of {method} {path}: {error}"),
    };
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

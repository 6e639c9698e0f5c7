//! One HTTP/1.1 request on a new connection, the way an operator's or a workload's
//! tool talks to an admin API (mesh-control's `/status`, `/v1/endpoints`, a
//! workload's `/metrics`): over the wire, not through the server's Rust handle.
//!
//! Each call panics when the request cannot be made: the tests using these check
//! the status and body, and a connection failure is a failed test.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::pki;

/// Sends `method path` with `headers` and `body` over `io` (a TCP or TLS stream to
/// `addr`) and returns the status code and the response body.
pub async fn exchange<IO>(
    io: IO,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, Bytes)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io)).await {
            Ok(pair) => pair,
            Err(e) => panic!("HTTP/1 handshake with {addr}: {e}"),
        };
    tokio::spawn(conn);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = match request.body(Full::new(Bytes::from(body.to_owned()))) {
        Ok(request) => request,
        Err(e) => panic!("building {method} {path}: {e}"),
    };
    let response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(e) => panic!("{method} {path} on {addr}: {e}"),
    };
    let status = response.status().as_u16();
    match response.into_body().collect().await {
        Ok(collected) => (status, collected.to_bytes()),
        Err(e) => panic!("reading the body of {method} {path} on {addr}: {e}"),
    }
}

/// A JSON body, `Null` when it is not JSON (the empty body of a 204, say).
fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or(serde_json::Value::Null)
}

async fn connect(addr: SocketAddr) -> tokio::net::TcpStream {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(e) => panic!("connecting to {addr}: {e}"),
    }
}

/// Sends `method path` with the JSON `body` (empty for none) to the plaintext server
/// at `addr`; returns the status code and the response body as JSON.
pub async fn json_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    json_request_with(addr, method, path, &[], body).await
}

/// [`json_request`] with `headers` too (`authorization`, `x-lease-secret`).
pub async fn json_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let (status, bytes) = exchange(connect(addr).await, addr, method, path, &all, body).await;
    (status, json(&bytes))
}

/// `PUT` or `DELETE` of the lease `lease_id` on mesh-control's plaintext
/// admin API at `addr`, with the lease's secret, as the workload that
/// registered it does (without a CA, only the holder of the secret may
/// change a lease): the status code and the JSON body.
pub async fn lease_request(
    addr: SocketAddr,
    method: &str,
    lease_id: &str,
    secret: &str,
) -> (u16, serde_json::Value) {
    let path = format!("/v1/endpoints/{lease_id}");
    json_request_with(addr, method, &path, &[("x-lease-secret", secret)], "").await
}

/// [`json_request`] over TLS with `config` (its roots, and a client certificate
/// if any), verifying the server's certificate for the IP address of `addr`, as a
/// workload does with the trust bundle a bootstrap names. `headers` go along
/// (`authorization`, say).
pub async fn json_request_tls(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let tls = match connector.connect(name, connect(addr).await).await {
        Ok(tls) => tls,
        Err(e) => panic!("TLS handshake with {addr}: {e}"),
    };
    let mut all = vec![("content-type", "application/json")];
    all.extend_from_slice(headers);
    let (status, bytes) = exchange(tls, addr, method, path, &all, body).await;
    (status, json(&bytes))
}

/// [`json_request_tls`] as a workload or an operator calls mesh-control's
/// admin API: an optional `Authorization: Bearer <token>`, and a JSON value
/// as the body (`Value::Null` for none).
pub async fn json_request_tls_bearer(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    method: &str,
    path: &str,
    bearer: Option<&str>,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let authorization = bearer.map(|token| format!("Bearer {token}"));
    let headers: Vec<(&str, &str)> = authorization
        .iter()
        .map(|value| ("authorization", value.as_str()))
        .collect();
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    json_request_tls(addr, config, method, path, &headers, &body).await
}

/// [`json_request_tls`] trusting the CAs of the PEM bundle `ca_pem`, without a
/// client certificate.
pub async fn json_request_https(
    addr: SocketAddr,
    ca_pem: &[u8],
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let config = pki::client_config(&String::from_utf8_lossy(ca_pem), None);
    json_request_tls(addr, Arc::new(config), method, path, &[], body).await
}

/// `GET path` on the plaintext server at `addr`: the status code and the body as
/// text (a Prometheus scrape, say).
pub async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let (status, bytes) = exchange(connect(addr).await, addr, "GET", path, &[], "").await;
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// A backend on a free loopback port answering `name` (status 200, the name
/// as the body) to every request, over HTTP/1.1 and HTTP/2 cleartext: the
/// endpoint of a subset in routing tests, which count who answered. Runs
/// until the test's runtime ends.
pub async fn named_backend(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port for a backend");
    let addr = listener.local_addr().expect("the backend's address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let service = hyper::service::service_fn(
                move |_req: http::Request<hyper::body::Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(name.as_bytes()),
                    )))
                },
            );
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            });
        }
    });
    addr
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::post;

    use super::*;

    #[tokio::test]
    async fn requests_carry_their_body_and_answers_parse() {
        let app = Router::new()
            .route(
                "/echo",
                post(|headers: http::HeaderMap, body: String| async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    axum::Json(serde_json::json!({"body": body, "auth": auth}))
                }),
            )
            .route("/text", axum::routing::get(|| async { "plain" }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let (status, body) = json_request(addr, "POST", "/echo", r#"{"a":1}"#).await;
        assert_eq!(status, 200);
        assert_eq!(body["body"], r#"{"a":1}"#);
        assert_eq!(get_text(addr, "/text").await, (200, "plain".to_owned()));
        let (status, body) = json_request(addr, "GET", "/nowhere", "").await;
        assert_eq!((status, body), (404, serde_json::Value::Null));
    }
}

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
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await {
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

//! The plaintext ports a workload may open for its operator: the admin
//! endpoint ([`crate::admin`]: config dump, `/metrics`, CSDS) and the bare
//! `/metrics` endpoint (`telemetry::serve_metrics`). One accept loop for
//! both, with the limits every listener of the mesh has, so that a scraper
//! or a debugging tool that misbehaves (or a client that opens connections
//! and sends nothing) cannot take the service's memory or tasks with it:
//!
//! - at most [`MAX_CONNECTIONS`] open at once; a connection beyond it is
//!   closed as soon as it is accepted (a scraper retries; a flood does not
//!   grow the process);
//! - a request head within [`HEADER_TIMEOUT`] on HTTP/1.1 (hyper closes a
//!   connection that sends one slowly: the slowloris case), and HTTP/1.1
//!   buffers of at most [`MAX_BUF`];
//! - on HTTP/2, at most [`MAX_STREAMS`] concurrent streams and a header
//!   list of at most [`MAX_HEADER_LIST`] (a CSDS client holds one stream);
//! - stopping closes the listener and every open connection gracefully
//!   (HTTP/2 GOAWAY, HTTP/1.1 after the request in flight), and waits for
//!   them: a CSDS stream ends with its client.
//!
//! The same figures as mesh-control's admin port where they overlap (10 s
//! for a request head); the connection bound is lower (64, not 1,024): one
//! workload's operator port has a scraper or two, not a fleet.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use crate::error::{Error, ErrorKind};

/// The most connections open at once.
pub(crate) const MAX_CONNECTIONS: usize = 64;
/// How long an HTTP/1.1 request head may take to arrive.
pub(crate) const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/1.1 read buffer bound (the largest request head), bytes.
pub(crate) const MAX_BUF: usize = 64 * 1024;
/// HTTP/2 concurrent streams per connection.
pub(crate) const MAX_STREAMS: u32 = 16;
/// HTTP/2 header list bound, bytes.
pub(crate) const MAX_HEADER_LIST: u32 = 16 * 1024;

/// A running operator port; stops when dropped or shut down.
#[derive(Debug)]
pub(crate) struct Running {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Running {
    /// The address it listens on (the port chosen for port 0).
    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes the open connections gracefully and waits
    /// for them (a request or stream in flight finishes first).
    pub(crate) async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Binds `addr` and serves `answer` on every connection (HTTP/1.1 and
/// HTTP/2 cleartext) within the limits above, a request head within
/// `header_timeout` ([`HEADER_TIMEOUT`] but in tests); `what` names the
/// port in errors and logs ("the admin endpoint", "/metrics").
pub(crate) async fn serve<F, Fut, B>(
    addr: SocketAddr,
    what: &'static str,
    header_timeout: Duration,
    answer: F,
) -> Result<Running, Error>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        Error::new(ErrorKind::Io, format!("cannot listen for {what} on {addr}")).with_source(e)
    })?;
    let local_addr = listener.local_addr().map_err(|e| {
        Error::new(
            ErrorKind::Io,
            format!("cannot read {what}'s listening address"),
        )
        .with_source(e)
    })?;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(MAX_BUF);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST);
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let (closing, closed) = watch::channel(false);
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(e) => {
                            tracing::debug!(error = %e, "{what}: accept failed");
                            continue;
                        }
                    };
                    if connections.len() >= MAX_CONNECTIONS {
                        tracing::debug!(
                            "{what}: {MAX_CONNECTIONS} connections open; closing a new one"
                        );
                        continue;
                    }
                    let answer = answer.clone();
                    let builder = builder.clone();
                    let mut closed = closed.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(answer);
                        let connection =
                            builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                        tokio::pin!(connection);
                        tokio::select! {
                            _ = connection.as_mut() => {}
                            () = async {
                                let _ = closed.wait_for(|closed| *closed).await;
                            } => {
                                connection.as_mut().graceful_shutdown();
                                let _ = connection.await;
                            }
                        }
                    });
                }
            }
        }
        drop(listener);
        let _ = closing.send(true);
        while connections.join_next().await.is_some() {}
    });
    Ok(Running {
        local_addr,
        stop: Some(stop),
        task: Some(task),
    })
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::Full;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    async fn hello(_: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        Ok(Response::new(Full::new(Bytes::from_static(b"hello"))))
    }

    async fn get(addr: SocketAddr) -> std::io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        stream.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn connections_beyond_the_bound_are_closed_and_the_port_recovers() {
        let port = serve(
            ([127, 0, 0, 1], 0).into(),
            "test port",
            HEADER_TIMEOUT,
            hello,
        )
        .await
        .unwrap();
        let addr = port.local_addr();
        // MAX_CONNECTIONS idle connections hold every slot.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the accept loop take them all.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let refused = get(addr).await.unwrap_or_default();
        assert!(
            !refused.contains("hello"),
            "a connection beyond {MAX_CONNECTIONS} was served: {refused:?}"
        );
        drop(idle);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let served = get(addr).await.unwrap();
        assert!(
            served.contains("200 OK") && served.ends_with("hello"),
            "{served}"
        );
        port.shutdown().await;
        assert!(TcpStream::connect(addr).await.is_err(), "still listening");
    }

    #[tokio::test]
    async fn a_request_head_that_never_arrives_is_closed() {
        let timeout = Duration::from_millis(300);
        let port = serve(([127, 0, 0, 1], 0).into(), "test port", timeout, hello)
            .await
            .unwrap();
        let mut slow = TcpStream::connect(port.local_addr()).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nhost:").await.unwrap();
        let mut out = Vec::new();
        // Generous: what matters is that it closes at all (without the
        // timeout it would wait for the rest of the head for ever).
        let read = tokio::time::timeout(timeout * 20, slow.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "the connection was still open after {:?}",
            timeout * 20
        );
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("hello"), "{text}");
    }
}

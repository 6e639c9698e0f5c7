//! The service graph read from Prometheus (`serve --prometheus URL`, issue
//! 17): with it, `GET /v1/graph` answers the graph Prometheus' figures
//! give (Istio's metrics as the workloads expose them, scraped), as Kiali
//! draws its graph, instead of the window of pushed summaries. The PromQL,
//! the labels and what this mode cannot show are documented with the pure
//! part, [`mesh_core::graph::prometheus`]; this is the client.
//!
//! Bounded, because the page polls: each query has [`QUERY_TIMEOUT`] for
//! its answer and [`MAX_ANSWER`] bytes; the graph built is kept for
//! [`CACHE_FOR`], and requests that arrive while it is being built wait
//! for that build rather than start their own, so a page refreshing every
//! 2 s, or many of them, costs Prometheus one round of queries per 2 s.
//! A failed round is kept as long (a Prometheus that is down is not asked
//! again on every refresh); its message names the query and what
//! Prometheus said, and the admin API answers it as a 502.
//!
//! Plain `http://` only: Prometheus is usually reached inside the
//! cluster's network. An `https://` URL is refused at start with that
//! reason (mesh-control has no trust store for public CAs to verify it).

use std::time::{Duration, Instant};

use http::Uri;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mesh_core::graph::prometheus::{self, Answer, PerQuery, QUERIES};
use mesh_core::graph::{Graph, WindowConfig};

/// How long one query may take, answer read included.
pub(crate) const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest answer read, in bytes: a graph of thousands of edges is
/// well under it.
pub(crate) const MAX_ANSWER: usize = 16 * 1024 * 1024;

/// How long a built graph (or a failure) is kept.
pub(crate) const CACHE_FOR: Duration = Duration::from_secs(2);

/// A Prometheus to read the graph from, and the last graph read.
pub(crate) struct PromGraph {
    /// The URL as given, for messages.
    url: String,
    /// `scheme://authority` and the path prefix without its trailing `/`.
    base: String,
    client: Client<HttpConnector, Empty<Bytes>>,
    cache: tokio::sync::Mutex<Option<(Instant, Result<Graph, String>)>>,
}

impl std::fmt::Debug for PromGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromGraph")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// Why `url` cannot name a Prometheus to read, if it cannot: it must be
/// `http://host[:port][/prefix]` without a query or fragment.
pub(crate) fn check_url(url: &str) -> Result<String, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("--prometheus {url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "--prometheus {url:?}: https is not supported (mesh-control has no trust store \
                 to verify a public certificate with); give Prometheus' plain http:// address"
            ));
        }
        _ => {
            return Err(format!(
                "--prometheus {url:?} must be an http:// URL (http://prometheus:9090)"
            ));
        }
    }
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Err(format!("--prometheus {url:?} names no host"));
    };
    if uri.query().is_some() || url.contains('#') {
        return Err(format!(
            "--prometheus {url:?}: give the server's base URL, without a query or fragment"
        ));
    }
    if authority.as_str().contains('@') {
        return Err(format!(
            "--prometheus {url:?}: credentials in the URL are not supported"
        ));
    }
    Ok(format!(
        "http://{}{}",
        authority,
        uri.path().trim_end_matches('/')
    ))
}

impl PromGraph {
    /// A reader of the Prometheus at `url` (checked: [`check_url`]).
    pub(crate) fn new(url: &str) -> Result<PromGraph, String> {
        let base = check_url(url)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(QUERY_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(QUERIES)
            .build(connector);
        Ok(PromGraph {
            url: url.to_owned(),
            base,
            client,
            cache: tokio::sync::Mutex::new(None),
        })
    }

    /// The graph over the window, from the cache when it is younger than
    /// [`CACHE_FOR`]; `Err` names the Prometheus, the query and what went
    /// wrong.
    pub(crate) async fn graph(&self) -> Result<Graph, String> {
        let mut cache = self.cache.lock().await;
        if let Some((at, result)) = &*cache
            && at.elapsed() < CACHE_FOR
        {
            return result.clone();
        }
        let result = self.build().await;
        *cache = Some((Instant::now(), result.clone()));
        result
    }

    async fn build(&self) -> Result<Graph, String> {
        let window = WindowConfig::default().window_ms() / 1000;
        let queries = prometheus::queries(window).into_array();
        let names = [
            "requests",
            "errors",
            "p50",
            "p99",
            "retries",
            "denials",
            "denials_last_seen",
            "first_seen",
        ];
        let answers = futures_util::future::try_join_all(queries.iter().zip(names).map(
            |(promql, name)| async move {
                self.query(promql)
                    .await
                    .map_err(|e| format!("Prometheus at {}: query {name}: {e}", self.url))
            },
        ))
        .await?;
        let answers: [Vec<prometheus::Series>; QUERIES] = answers
            .try_into()
            .map_err(|_| "a query's answer went missing".to_owned())?;
        Ok(prometheus::graph(
            &PerQuery::from_array(answers),
            window as f64,
        ))
    }

    /// `GET {base}/api/v1/query?query=...`: the answer's instant vector.
    async fn query(&self, promql: &str) -> Result<Vec<prometheus::Series>, String> {
        let uri: Uri = format!(
            "{}/api/v1/query?query={}",
            self.base,
            percent_encode(promql)
        )
        .parse()
        .map_err(|e| format!("cannot make a URL of the query: {e}"))?;
        let request = http::Request::get(uri)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("unreachable: {}", chain(&e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| format!("HTTP {status}, reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        let (status, body) = tokio::time::timeout(QUERY_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {QUERY_TIMEOUT:?}"))??;
        // Prometheus answers its errors (400 bad_data, 422 execution, 503
        // timeout) with the same JSON: its message is the one to show.
        match serde_json::from_slice::<Answer>(&body) {
            Ok(answer) => answer
                .into_vector()
                .map_err(|e| format!("HTTP {status}: {e}")),
            Err(e) => {
                let text = String::from_utf8_lossy(&body);
                let text: String = text.chars().take(200).collect();
                Err(format!(
                    "HTTP {status}, not a query answer ({e}): {}",
                    text.trim()
                ))
            }
        }
    }
}

/// An error with its sources (hyper's says `client error (Connect)`, its
/// source `Connection refused`).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// `text` percent-encoded for a URL's query (all but RFC 3986's
/// unreserved characters).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_with_a_reason() {
        let table: [(&str, Result<&str, &str>); 8] = [
            ("http://127.0.0.1:9090", Ok("http://127.0.0.1:9090")),
            ("http://prom:9090/", Ok("http://prom:9090")),
            ("http://prom/prometheus/", Ok("http://prom/prometheus")),
            ("https://prom:9090", Err("https is not supported")),
            ("ftp://prom", Err("must be an http:// URL")),
            ("prom:9090", Err("must be an http:// URL")),
            ("http://prom:9090/?x=1", Err("without a query")),
            ("http://user:pw@prom:9090", Err("credentials")),
        ];
        for (url, want) in table {
            match (check_url(url), want) {
                (Ok(base), Ok(w)) => assert_eq!(base, w, "{url}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{url}: {e:?} lacks {w:?}"),
                (got, want) => panic!("{url}: {got:?}, expected {want:?}"),
            }
        }
    }

    /// A server on a real socket that answers every request with `status`
    /// and `body` (what Prometheus answers a query it refuses), counting
    /// the requests.
    async fn answering(
        status: &'static str,
        body: &'static str,
    ) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = std::sync::Arc::new(AtomicUsize::new(0));
        let counter = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-type: application/json\r\n\
                         content-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(reply.as_bytes()).await;
                });
            }
        });
        (url, seen)
    }

    #[tokio::test]
    async fn prometheus_errors_are_named_and_cached() {
        let (url, seen) = answering(
            "400 Bad Request",
            r#"{"status":"error","errorType":"bad_data","error":"1:5: parse error: unexpected"}"#,
        )
        .await;
        let prom = PromGraph::new(&url).unwrap();
        let e = prom.graph().await.unwrap_err();
        assert!(e.contains(&format!("Prometheus at {url}")), "{e}");
        assert!(
            e.contains("HTTP 400 Bad Request: bad_data: 1:5: parse error"),
            "{e}"
        );
        // The failure is kept: a refresh right after asks nothing.
        let asked = seen.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(asked, QUERIES);
        assert_eq!(prom.graph().await.unwrap_err(), e);
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), asked);
    }

    #[tokio::test]
    async fn an_answer_that_is_not_prometheus_is_named() {
        let (url, _) = answering("200 OK", "<html>login</html>").await;
        let e = PromGraph::new(&url).unwrap().graph().await.unwrap_err();
        assert!(e.contains("not a query answer"), "{e}");
        assert!(e.contains("<html>login</html>"), "{e}");
    }

    #[tokio::test]
    async fn an_unreachable_prometheus_is_named() {
        // A port just released: nothing listens.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let url = format!("http://{addr}");
        let e = PromGraph::new(&url).unwrap().graph().await.unwrap_err();
        assert!(e.contains(&url) && e.contains("unreachable"), "{e}");
    }

    #[test]
    fn queries_are_percent_encoded() {
        assert_eq!(
            percent_encode("sum(x{a=~\"b|c\"}[5m])"),
            "sum%28x%7Ba%3D~%22b%7Cc%22%7D%5B5m%5D%29"
        );
    }
}

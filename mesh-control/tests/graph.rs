//! The service graph's data path over real sockets: workloads push
//! summaries to `POST /v1/graph/summaries` on the admin API (TLS, the
//! mesh CA), attributed to their verified identity, and an operator reads
//! the graph at `GET /v1/graph`.

use std::sync::Arc;

use mesh_control::ca::{CertificateAuthority, JoinTokens, OperatorTokens};
use mesh_testkit::http::json_request_tls_bearer;
use mesh_testkit::pki;
use serde_json::{Value, json};

const PRODUCTPAGE_TOKEN: &str = "productpage-token-0123456789";
const REVIEWS_TOKEN: &str = "reviews-token-0123456789";
const OPERATOR_TOKEN: &str = "operator-token-0123456789";

async fn start() -> (tempfile::TempDir, mesh_control::ServerHandle) {
    let mut tokens = JoinTokens::new();
    tokens
        .insert(PRODUCTPAGE_TOKEN, "shop", "productpage")
        .unwrap()
        .insert(REVIEWS_TOKEN, "shop", "reviews")
        .unwrap();
    let ca = CertificateAuthority::builder("cluster.local")
        .join_tokens(tokens)
        .operator_tokens(OperatorTokens::from_text(OPERATOR_TOKEN).unwrap())
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .ca(ca)
        .start()
        .await
        .expect("start control server");
    (dir, server)
}

/// The admin API over https, trusting the server's bundle.
struct Admin {
    addr: std::net::SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl Admin {
    fn new(server: &mesh_control::ServerHandle) -> Admin {
        let bundle = std::fs::read_to_string(server.trust_bundle_file().unwrap()).unwrap();
        let mut config = pki::client_config(&bundle, None);
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Admin {
            addr: server.admin_addr(),
            tls: Arc::new(config),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: &Value,
    ) -> (u16, Value) {
        json_request_tls_bearer(self.addr, self.tls.clone(), method, path, bearer, body).await
    }
}

/// One edge of productpage (shop/productpage) to reviews `version`.
fn edge(source_sa: &str, version: &str, requests: u64, errors: u64, latency: Value) -> Value {
    json!({
        "source_namespace": "shop",
        "source_service_account": source_sa,
        "source_workload": "productpage",
        "source_version": "v1",
        "destination_service": "reviews.shop.svc.cluster.local",
        "destination_version": version,
        "protocol": "http",
        "mtls": true,
        "requests": requests,
        "errors": errors,
        "retries": 2,
        "latency_ms": latency,
    })
}

#[tokio::test]
async fn summaries_are_attributed_to_their_sender_and_show_in_the_graph() {
    let (_dir, server) = start().await;
    let admin = Admin::new(&server);

    // productpage: 5 s with 50 requests to reviews v1 (10 rps, 10% errors,
    // all in (5, 10] ms) and 50 to v2.
    let summary = json!({
        "interval_ms": 5000,
        "edges": [
            edge("productpage", "v1", 50, 5, json!([0, 0, 0, 50])),
            edge("productpage", "v2", 50, 0, json!([0, 0, 0, 0, 0, 0, 50])),
        ],
    });

    // Without credentials: 401, saying what to send.
    let (code, body) = admin
        .call("POST", "/v1/graph/summaries", None, &summary)
        .await;
    assert_eq!(code, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
    // An operator token only reads.
    let (code, body) = admin
        .call(
            "POST",
            "/v1/graph/summaries",
            Some(OPERATOR_TOKEN),
            &summary,
        )
        .await;
    assert_eq!(code, 403, "{body}");

    // reviews sending productpage's traffic: refused, naming both.
    let (code, body) = admin
        .call("POST", "/v1/graph/summaries", Some(REVIEWS_TOKEN), &summary)
        .await;
    assert_eq!(code, 403, "{body}");
    let message = body["error"].as_str().unwrap();
    assert!(
        message.contains("shop/productpage")
            && message.contains("spiffe://cluster.local/ns/shop/sa/reviews"),
        "{message}"
    );

    // productpage itself: taken.
    let (code, body) = admin
        .call(
            "POST",
            "/v1/graph/summaries",
            Some(PRODUCTPAGE_TOKEN),
            &summary,
        )
        .await;
    assert_eq!(code, 202, "{body}");
    assert_eq!(body["accepted"], 2, "{body}");
    // Again at once: over the rate (one per second per identity).
    let (code, body) = admin
        .call(
            "POST",
            "/v1/graph/summaries",
            Some(PRODUCTPAGE_TOKEN),
            &summary,
        )
        .await;
    assert_eq!(code, 429, "{body}");

    // An invalid summary: 400 naming the edge.
    let bad = json!({"interval_ms": 5000, "edges": [edge("reviews", "v1", 1, 2, json!([]))]});
    let (code, body) = admin
        .call("POST", "/v1/graph/summaries", Some(REVIEWS_TOKEN), &bad)
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("edge 0: 2 errors out of 1"),
        "{body}"
    );

    // Reading the graph needs credentials; the operator token will do.
    let (code, body) = admin.call("GET", "/v1/graph", None, &Value::Null).await;
    assert_eq!(code, 401, "{body}");
    let (code, graph) = admin
        .call("GET", "/v1/graph", Some(OPERATOR_TOKEN), &Value::Null)
        .await;
    assert_eq!(code, 200, "{graph}");
    let edges = graph["edges"].as_array().unwrap();
    assert_eq!(edges.len(), 2, "{graph}");
    let v1 = &edges[0];
    assert_eq!(v1["destination_version"], "v1", "{graph}");
    assert_eq!(v1["source_workload"], "productpage", "{graph}");
    // 50 requests over the 5 s the summary covers (and the moments since).
    let rps = v1["rps"].as_f64().unwrap();
    assert!((9.0..=10.0).contains(&rps), "{rps} rps: {graph}");
    assert!((v1["error_rate"].as_f64().unwrap() - 0.1).abs() < 1e-9);
    assert_eq!(v1["p50_ms"].as_f64(), Some(7.5), "{graph}");
    assert_eq!(edges[1]["error_rate"].as_f64(), Some(0.0), "{graph}");
    let p99 = edges[1]["p99_ms"].as_f64().unwrap();
    assert!(p99 > 50.0 && p99 <= 100.0, "{graph}");
    assert_eq!(v1["observed_share"].as_f64(), Some(0.5), "{graph}");
    let nodes: Vec<&str> = graph["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes,
        ["reviews.shop.svc.cluster.local", "shop/productpage"],
        "{graph}"
    );
    assert_eq!(graph["nodes"][0]["versions"], json!(["v1", "v2"]));
}

#[tokio::test]
async fn oversized_summaries_are_refused() {
    let (_dir, server) = start().await;
    let admin = Admin::new(&server);
    // 2,000 edges: over the body limit (512 KiB) before any parsing.
    let edges: Vec<Value> = (0..2_000)
        .map(|i| edge("productpage", &format!("v{i}"), 1, 0, json!([1])))
        .collect();
    let big = json!({"interval_ms": 5000, "edges": edges});
    let (code, body) = admin
        .call("POST", "/v1/graph/summaries", Some(PRODUCTPAGE_TOKEN), &big)
        .await;
    assert_eq!(code, 413, "{body}");
    // 1,001 edges fit in the body but not the limit of edges per summary.
    let edges: Vec<Value> = (0..1_001)
        .map(|i| edge("productpage", &format!("v{i}"), 1, 0, json!([1])))
        .collect();
    let many = json!({"interval_ms": 5000, "edges": edges});
    let (code, body) = admin
        .call(
            "POST",
            "/v1/graph/summaries",
            Some(PRODUCTPAGE_TOKEN),
            &many,
        )
        .await;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("1001 edges in one summary"),
        "{body}"
    );
}

/// Without a CA (a trusted network), summaries are open, as registration
/// is: taken without credentials, limited per address.
#[tokio::test]
async fn without_a_ca_summaries_are_open() {
    let dir = tempfile::tempdir().unwrap();
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start control server");
    let addr = server.admin_addr();
    let summary = json!({
        "interval_ms": 5000,
        "edges": [edge("anyone", "v1", 25, 0, json!([25]))],
    });
    let body = summary.to_string();
    let (code, reply) =
        mesh_testkit::http::json_request(addr, "POST", "/v1/graph/summaries", &body).await;
    assert_eq!(code, 202, "{reply}");
    let (code, reply) =
        mesh_testkit::http::json_request(addr, "POST", "/v1/graph/summaries", &body).await;
    assert_eq!(code, 429, "{reply}");
    let (code, graph) = mesh_testkit::http::json_request(addr, "GET", "/v1/graph", "").await;
    assert_eq!(code, 200, "{graph}");
    assert_eq!(graph["edges"][0]["requests"], 25, "{graph}");
    assert_eq!(
        graph["edges"][0]["source_service_account"], "anyone",
        "{graph}"
    );
}

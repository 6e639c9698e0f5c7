//! The admin API's rules, over real sockets (issue 13): who may back a host,
//! who may read the mesh's state, what a registration may contain, lease
//! secrets without a CA, rate limits, and join tokens revoked by editing
//! their file.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use mesh_control::ca::{CertificateAuthority, JoinTokens, OperatorTokens, RateLimit};
use mesh_control::config::MeshOptions;
use mesh_testkit::http::{exchange, json_request, json_request_tls_bearer, json_request_with};
use mesh_testkit::pki::{self, Leaf, csr};
use serde_json::{Value, json};

const SHOP_PAYMENTS: &str = "shop-payments-token-0123";
const EVIL_PAYMENTS: &str = "evil-payments-token-0123";
const OPERATOR: &str = "operator-read-only-token-0123";

/// `payments.example.com`, declared in namespace `shop`.
const PAYMENTS_SE: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [payments.example.com]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
"#;

fn tokens() -> JoinTokens {
    let mut tokens = JoinTokens::new();
    tokens
        .insert(SHOP_PAYMENTS, "shop", "payments")
        .unwrap()
        .insert(EVIL_PAYMENTS, "evil", "payments")
        .unwrap();
    tokens
}

fn ca() -> mesh_control::ca::CaBuilder {
    CertificateAuthority::builder("cluster.local")
        .join_tokens(tokens())
        .operator_tokens(OperatorTokens::from_text(OPERATOR).unwrap())
}

async fn start(
    config: &str,
    options: MeshOptions,
    ca: Option<CertificateAuthority>,
) -> (tempfile::TempDir, mesh_control::ServerHandle) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), config).unwrap();
    let mut builder = mesh_control::Server::builder()
        .config_dir(dir.path())
        .options(options);
    if let Some(ca) = ca {
        builder = builder.ca(ca);
    }
    let server = builder.start().await.expect("start control server");
    (dir, server)
}

/// The admin API over https, trusting the server's bundle, with an
/// optional client certificate.
struct Https {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
}

impl Https {
    fn new(server: &mesh_control::ServerHandle, cert: Option<(&str, &str)>) -> Https {
        let bundle = std::fs::read_to_string(server.trust_bundle_file().unwrap()).unwrap();
        let leaf = cert.map(|(chain, key)| Leaf {
            chain: chain.to_owned(),
            key: key.to_owned(),
        });
        let mut config = pki::client_config(&bundle, leaf.as_ref());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Https {
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

    /// The status, the `Retry-After` header and the body of one request.
    async fn raw(
        &self,
        method: &str,
        path: &str,
        bearer: &str,
        body: &Value,
    ) -> (u16, Option<String>, Value) {
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let tls = connector
            .connect(rustls::pki_types::ServerName::from(self.addr.ip()), tcp)
            .await
            .unwrap();
        // A raw exchange to see the headers: hyper directly.
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.to_string())
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {bearer}"))
            .body(http_body_util::Full::new(hyper::body::Bytes::from(
                body.to_string(),
            )))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (
            status,
            retry_after,
            serde_json::from_slice(&body).unwrap_or(Value::Null),
        )
    }
}

fn registration(service: &str, namespace: &str, address: &str, port: u16) -> Value {
    json!({
        "service": service, "namespace": namespace, "address": address,
        "port": port, "ttl_seconds": 30,
    })
}

fn endpoints_of(services: &Value, host: &str) -> u64 {
    services["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["host"] == host)
        .map_or(0, |s| s["endpoints"].as_u64().unwrap())
}

#[tokio::test]
async fn an_external_host_is_backed_only_by_its_namespace_s_identities() {
    let (_dir, server) = start(
        PAYMENTS_SE,
        MeshOptions::default(),
        Some(ca().build().unwrap()),
    )
    .await;
    let https = Https::new(&server, None);
    let (code, body) = https
        .call(
            "POST",
            "/v1/endpoints",
            Some(SHOP_PAYMENTS),
            &registration("payments.example.com", "shop", "127.0.0.8", 80),
        )
        .await;
    assert_eq!(code, 201, "shop's own payments account backs it: {body}");

    // The hijack of issue 13: evil's same-named account, from its own namespace.
    let (code, body) = https
        .call(
            "POST",
            "/v1/endpoints",
            Some(EVIL_PAYMENTS),
            &registration("payments.example.com", "evil", "127.0.0.9", 80),
        )
        .await;
    assert_eq!(code, 403, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains(
            "only identities the configuration of namespace 'shop' names may back its hosts"
        ),
        "the refusal names the rule: {error}"
    );
    // ... nor by claiming the host's namespace.
    let (code, body) = https
        .call(
            "POST",
            "/v1/endpoints",
            Some(EVIL_PAYMENTS),
            &registration("payments.example.com", "shop", "127.0.0.9", 80),
        )
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("registers only in its own namespace"),
        "{body}"
    );
    // An external host nobody declares cannot be claimed at all.
    let (code, body) = https
        .call(
            "POST",
            "/v1/endpoints",
            Some(EVIL_PAYMENTS),
            &registration("ledger.example.com", "evil", "127.0.0.9", 80),
        )
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("no ServiceEntry declares ledger.example.com"),
        "{body}"
    );

    let (code, services) = https
        .call("GET", "/v1/services", Some(OPERATOR), &Value::Null)
        .await;
    assert_eq!(code, 200, "{services}");
    assert_eq!(
        endpoints_of(&services, "payments.example.com"),
        1,
        "{services}"
    );
}

#[tokio::test]
async fn reads_need_credentials_under_the_ca_and_the_operator_token_only_reads() {
    let (_dir, server) = start(
        PAYMENTS_SE,
        MeshOptions::default(),
        Some(ca().build().unwrap()),
    )
    .await;
    let https = Https::new(&server, None);
    for path in ["/status", "/v1/services", "/metrics"] {
        let (code, body) = https.call("GET", path, None, &Value::Null).await;
        assert_eq!(code, 401, "GET {path} without credentials: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("needs credentials"),
            "{body}"
        );
        let (code, body) = https
            .call("GET", path, Some("not-a-token-of-this-mesh"), &Value::Null)
            .await;
        assert_eq!(code, 401, "GET {path} with an unknown token: {body}");
        for token in [OPERATOR, SHOP_PAYMENTS] {
            let (code, _) = https.call("GET", path, Some(token), &Value::Null).await;
            assert_eq!(code, 200, "GET {path} with a token");
        }
    }
    // /healthz and the public roots stay open.
    for path in ["/healthz", "/v1/trust-bundle"] {
        let (code, body) = https.call("GET", path, None, &Value::Null).await;
        assert_eq!(code, 200, "GET {path}: {body}");
    }

    // A client certificate from the mesh CA reads too.
    let (csr_pem, key_pem) = csr(None);
    let (code, cert) = https
        .call(
            "POST",
            "/v1/certificates",
            Some(SHOP_PAYMENTS),
            &json!({"csr": csr_pem}),
        )
        .await;
    assert_eq!(code, 200, "{cert}");
    let mtls = Https::new(
        &server,
        Some((cert["certificate_chain"].as_str().unwrap(), &key_pem)),
    );
    let (code, status) = mtls.call("GET", "/status", None, &Value::Null).await;
    assert_eq!(code, 200, "{status}");

    // The operator token registers nothing and gets no certificate.
    let (code, body) = https
        .call(
            "POST",
            "/v1/endpoints",
            Some(OPERATOR),
            &registration("payments.example.com", "shop", "127.0.0.8", 80),
        )
        .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("may only read"),
        "{body}"
    );
    let (code, body) = https
        .call(
            "POST",
            "/v1/certificates",
            Some(OPERATOR),
            &json!({"csr": csr_pem}),
        )
        .await;
    assert_eq!(code, 403, "{body}");
    let (code, services) = https
        .call("GET", "/v1/services", Some(OPERATOR), &Value::Null)
        .await;
    assert_eq!(code, 200);
    assert_eq!(endpoints_of(&services, "payments.example.com"), 0);
}

#[tokio::test]
async fn malformed_registrations_get_a_4xx_that_says_why() {
    let (_dir, server) = start(PAYMENTS_SE, MeshOptions::default(), None).await;
    let admin = server.admin_addr();
    let many_labels: serde_json::Map<String, Value> =
        (0..50_000).map(|i| (format!("k{i}"), json!("v"))).collect();
    let mut labels_body = registration("catalog", "shop", "127.0.0.1", 9000);
    labels_body["labels"] = Value::Object(many_labels);
    let mut long_value = registration("catalog", "shop", "127.0.0.1", 9000);
    long_value["labels"] = json!({"version": "v".repeat(10_000)});
    let long_service = "s".repeat(300);
    let cases = [
        (
            registration("catalog", "../x", "127.0.0.1", 9000),
            "is not a DNS-1123 label",
        ),
        (
            registration("catalog", "Shop", "127.0.0.1", 9000),
            "is not a DNS-1123 label",
        ),
        (
            registration("catalog", "shop", "169.254.169.254", 80),
            "is link-local",
        ),
        (
            registration("catalog", "shop", "::ffff:169.254.169.254", 80),
            "is link-local",
        ),
        (
            registration("catalog", "shop", "fe80::1", 80),
            "is link-local",
        ),
        (
            registration("catalog", "shop", "224.0.0.1", 80),
            "is multicast",
        ),
        (
            registration("catalog", "shop", "ff02::1", 80),
            "is multicast",
        ),
        (
            registration("catalog", "shop", "255.255.255.255", 80),
            "broadcast",
        ),
        (
            registration("catalog", "shop", "0.0.0.0", 80),
            "is unspecified",
        ),
        (
            labels_body,
            "50000 labels; a registration carries at most 64",
        ),
        (long_value, "at most 256 are allowed"),
        (
            registration(&long_service, "shop", "127.0.0.1", 9000),
            "at most 253",
        ),
    ];
    for (body, expected) in &cases {
        let (code, answer) = json_request(admin, "POST", "/v1/endpoints", &body.to_string()).await;
        assert_eq!(code, 400, "{} -> {answer}", body["address"]);
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(expected), "expected {expected:?}: {error}");
    }
    let (code, services) = json_request(admin, "GET", "/v1/services", "").await;
    assert_eq!(code, 200);
    assert!(
        services["services"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["endpoints"] == 0),
        "nothing was registered: {services}"
    );

    // A good registration answers a lease and its secret.
    let good = registration("catalog", "shop", "127.0.0.1", 9000).to_string();
    let (code, lease) = json_request(admin, "POST", "/v1/endpoints", &good).await;
    assert_eq!(code, 201, "{lease}");
    let id = lease["lease_id"].as_str().unwrap().to_string();
    let secret = lease["lease_secret"].as_str().unwrap().to_string();
    assert!(secret.len() >= 32, "at least 128 bits: {secret}");

    // The same endpoint again: 409, naming no lease id.
    let (code, conflict) = json_request(admin, "POST", "/v1/endpoints", &good).await;
    assert_eq!(code, 409, "{conflict}");
    assert!(
        !conflict.to_string().contains(&id),
        "the 409 names no lease id: {conflict}"
    );
    assert!(
        conflict["error"]
            .as_str()
            .unwrap()
            .contains("already registered"),
        "{conflict}"
    );

    // Without the secret, or with another, the lease cannot be touched.
    let path = format!("/v1/endpoints/{id}");
    let (code, body) = json_request_with(admin, "DELETE", &path, &[], "").await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("X-Lease-Secret"),
        "{body}"
    );
    assert!(!body.to_string().contains(&id), "{body}");
    let wrong = "0".repeat(64);
    let (code, body) =
        json_request_with(admin, "PUT", &path, &[("x-lease-secret", &wrong)], "").await;
    assert_eq!(code, 403, "{body}");
    let (code, _) = json_request_with(admin, "GET", "/v1/services", &[], "").await;
    assert_eq!(code, 200);
    // With it: renewed, then deleted.
    let (code, body) =
        json_request_with(admin, "PUT", &path, &[("x-lease-secret", &secret)], "").await;
    assert_eq!(code, 200, "{body}");
    let (code, body) =
        json_request_with(admin, "DELETE", &path, &[("x-lease-secret", &secret)], "").await;
    assert_eq!(code, 204, "{body}");
    let (code, body) =
        json_request_with(admin, "PUT", &path, &[("x-lease-secret", &secret)], "").await;
    assert_eq!(code, 404, "{body}");
    assert!(!body.to_string().contains(&id), "{body}");
}

#[tokio::test]
async fn link_local_endpoints_need_the_flag() {
    let options = MeshOptions {
        allow_link_local_endpoints: true,
        ..MeshOptions::default()
    };
    let (_dir, server) = start(PAYMENTS_SE, options, None).await;
    let admin = server.admin_addr();
    let body = registration("catalog", "shop", "169.254.10.1", 80).to_string();
    let (code, lease) = json_request(admin, "POST", "/v1/endpoints", &body).await;
    assert_eq!(code, 201, "allowed with the flag: {lease}");
    // Multicast stays refused.
    let body = registration("catalog", "shop", "224.0.0.1", 80).to_string();
    let (code, _) = json_request(admin, "POST", "/v1/endpoints", &body).await;
    assert_eq!(code, 400);
}

#[tokio::test]
async fn one_identity_holds_a_bounded_number_of_leases() {
    let options = MeshOptions {
        max_leases_per_identity: 3,
        ..MeshOptions::default()
    };
    let (_dir, server) = start(PAYMENTS_SE, options, Some(ca().build().unwrap())).await;
    let https = Https::new(&server, None);
    for port in 1..=3 {
        let (code, body) = https
            .call(
                "POST",
                "/v1/endpoints",
                Some(SHOP_PAYMENTS),
                &registration("payments", "shop", "127.0.0.8", port),
            )
            .await;
        assert_eq!(code, 201, "{body}");
    }
    let (code, body) = https
        .call(
            "POST",
            "/v1/endpoints",
            Some(SHOP_PAYMENTS),
            &registration("payments", "shop", "127.0.0.8", 4),
        )
        .await;
    assert_eq!(code, 429, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("holds 3 leases, the most one identity may hold"),
        "{body}"
    );
}

#[tokio::test]
async fn signing_and_failed_tokens_are_rate_limited_with_retry_after() {
    let slow = |burst| RateLimit {
        burst,
        per_second: 0.001,
    };
    let ca = ca()
        .signing_rate_limit(slow(2))
        .failed_token_rate_limit(slow(3))
        .build()
        .unwrap();
    let (_dir, server) = start(PAYMENTS_SE, MeshOptions::default(), Some(ca)).await;
    let https = Https::new(&server, None);
    let (csr_pem, key_pem) = csr(None);
    let request = json!({"csr": csr_pem});
    let mut chain = String::new();
    for _ in 0..2 {
        let (code, _, cert) = https
            .raw("POST", "/v1/certificates", SHOP_PAYMENTS, &request)
            .await;
        assert_eq!(code, 200, "{cert}");
        chain = cert["certificate_chain"].as_str().unwrap().to_string();
    }
    let (code, retry_after, body) = https
        .raw("POST", "/v1/certificates", SHOP_PAYMENTS, &request)
        .await;
    assert_eq!(code, 429, "{body}");
    let retry_after: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!(retry_after >= 1, "{retry_after}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("signing rate limit"),
        "{body}"
    );
    // Another identity has its own budget.
    let (code, _, body) = https
        .raw("POST", "/v1/certificates", EVIL_PAYMENTS, &request)
        .await;
    assert_eq!(code, 200, "{body}");

    // Three wrong tokens from this address: 401s; then even the right one
    // gets 429 until the bucket refills, before it is looked up.
    for _ in 0..3 {
        let (code, _, body) = https
            .raw("GET", "/status", "not-a-token-of-this-mesh", &Value::Null)
            .await;
        assert_eq!(code, 401, "{body}");
    }
    let (code, retry_after, body) = https.raw("GET", "/status", OPERATOR, &Value::Null).await;
    assert_eq!(code, 429, "{body}");
    assert!(retry_after.is_some());
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("too many unknown tokens"),
        "{body}"
    );

    // Counted in /metrics (read with a client certificate: no token).
    let mtls = Https::new(&server, Some((&chain, &key_pem)));
    let connector = tokio_rustls::TlsConnector::from(mtls.tls.clone());
    let tcp = tokio::net::TcpStream::connect(mtls.addr).await.unwrap();
    let tls = connector
        .connect(rustls::pki_types::ServerName::from(mtls.addr.ip()), tcp)
        .await
        .unwrap();
    let (code, metrics) = exchange(tls, mtls.addr, "GET", "/metrics", &[], "").await;
    assert_eq!(code, 200);
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains(r#"mesh_control_rate_limited_total{limit="certificate_signing"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"mesh_control_rate_limited_total{limit="failed_token_attempts"} 1"#),
        "{metrics}"
    );
    assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
}

/// Replaces `path` atomically, as an operator revoking a token should.
fn write_tokens(path: &Path, entries: &[(&str, &str, &str)]) {
    let tokens: Vec<Value> = entries
        .iter()
        .map(|(token, ns, sa)| json!({"token": token, "namespace": ns, "service_account": sa}))
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "tokens": tokens }).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test]
async fn a_join_token_removed_from_its_file_stops_working_without_a_restart() {
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("tokens.json");
    write_tokens(&path, &[(SHOP_PAYMENTS, "shop", "payments")]);
    let ca = CertificateAuthority::builder("cluster.local")
        .join_tokens_file(&path)
        .unwrap()
        .build()
        .unwrap();
    let (_dir, server) = start(PAYMENTS_SE, MeshOptions::default(), Some(ca)).await;
    let https = Https::new(&server, None);
    let register = |token: &'static str, port: u16| {
        let body = registration("payments", "shop", "127.0.0.8", port);
        let https = &https;
        async move {
            https
                .call("POST", "/v1/endpoints", Some(token), &body)
                .await
        }
    };
    let (code, body) = register(SHOP_PAYMENTS, 1).await;
    assert_eq!(code, 201, "{body}");

    // Revoked: the old token is refused; a new one works, no restart.
    const ROTATED: &str = "shop-payments-token-rotated";
    write_tokens(&path, &[(ROTATED, "shop", "payments")]);
    let (code, body) = register(SHOP_PAYMENTS, 2).await;
    assert_eq!(code, 401, "the revoked token: {body}");
    let (code, body) = register(ROTATED, 2).await;
    assert_eq!(code, 201, "the new token: {body}");

    // A broken file keeps the tokens in force.
    std::fs::write(&path, "{ half a file").unwrap();
    let (code, body) = register(ROTATED, 3).await;
    assert_eq!(code, 201, "{body}");
}

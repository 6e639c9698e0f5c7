//! The web page's routes over real sockets (issue 17; the page itself is
//! driven in a browser by the root package's tests/ui_browser.rs): with a
//! CA, the login that turns a read-only operator token into a session
//! cookie, what that cookie opens and that logging out closes it, and the
//! headers every answer carries; without a CA, an open page.

use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use mesh_control::ca::{CertificateAuthority, JoinTokens, OperatorTokens};
use mesh_testkit::pki;

const JOIN_TOKEN: &str = "frontend-token-0123456789";
const OPERATOR_TOKEN: &str = "operator-token-0123456789";

/// Status, headers and body of one request (a new connection each).
struct Answer {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn request(
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = match tls {
        Some(config) => {
            let name = rustls::pki_types::ServerName::from(addr.ip());
            let io = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender.send_request(request).await.unwrap()
        }
        None => {
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            sender.send_request(request).await.unwrap()
        }
    };
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn assert_secured(answer: &Answer, what: &str) {
    let csp = answer.header("content-security-policy");
    assert!(
        csp.contains("default-src 'self'") && !csp.contains("unsafe"),
        "{what}: CSP {csp:?}"
    );
    assert_eq!(answer.header("x-content-type-options"), "nosniff", "{what}");
    assert_eq!(answer.header("x-frame-options"), "DENY", "{what}");
    assert_eq!(answer.header("cache-control"), "no-store", "{what}");
}

#[tokio::test]
async fn login_turns_an_operator_token_into_a_session_cookie_and_logout_ends_it() {
    let mut tokens = JoinTokens::new();
    tokens.insert(JOIN_TOKEN, "shop", "frontend").unwrap();
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
    let bundle = std::fs::read_to_string(server.trust_bundle_file().unwrap()).unwrap();
    let mut config = pki::client_config(&bundle, None);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = Some(Arc::new(config));
    let addr = server.admin_addr();
    let form = "application/x-www-form-urlencoded";

    // Without credentials: the login form, for the page and its assets.
    for path in ["/ui", "/ui/app.js", "/ui/app.css"] {
        let answer = request(addr, tls.clone(), "GET", path, &[], "").await;
        assert_eq!(answer.status, 401, "{path}");
        assert!(
            answer.body.contains("name=\"token\""),
            "{path}: {}",
            answer.body
        );
        assert_secured(&answer, path);
    }
    let answer = request(addr, tls.clone(), "GET", "/v1/routes?service=x", &[], "").await;
    assert_eq!(answer.status, 401, "/v1/routes without credentials");

    // A join token does not log in (the page is an operator's), nor does an
    // unknown one; neither sets a cookie.
    for (token, status) in [(JOIN_TOKEN, 403), ("nope", 401)] {
        let body = format!("token={token}");
        let answer = request(
            addr,
            tls.clone(),
            "POST",
            "/ui/login",
            &[("content-type", form)],
            &body,
        )
        .await;
        assert_eq!(answer.status, status, "login with {token}: {}", answer.body);
        assert_eq!(answer.header("set-cookie"), "", "login with {token}");
    }
    let big = format!("token={}", "a".repeat(5000));
    let answer = request(
        addr,
        tls.clone(),
        "POST",
        "/ui/login",
        &[("content-type", form)],
        &big,
    )
    .await;
    assert_eq!(answer.status, 413, "an oversized login form");

    // The operator token: a redirect to the page with the session cookie.
    let body = format!("token={OPERATOR_TOKEN}");
    let answer = request(
        addr,
        tls.clone(),
        "POST",
        "/ui/login",
        &[("content-type", form)],
        &body,
    )
    .await;
    assert_eq!(answer.status, 303, "{}", answer.body);
    assert_eq!(answer.header("location"), "/ui");
    let set_cookie = answer.header("set-cookie").to_owned();
    for attribute in [
        "HttpOnly",
        "Secure",
        "SameSite=Strict",
        "Path=/",
        "Max-Age=",
    ] {
        assert!(
            set_cookie.contains(attribute),
            "{set_cookie:?} lacks {attribute}"
        );
    }
    assert!(
        !set_cookie.contains(OPERATOR_TOKEN),
        "the cookie holds the token"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let (name, id) = cookie.split_once('=').unwrap();
    assert_eq!(name, "mesh_ui_session");
    assert_eq!(id.len(), 64, "a 256-bit session id in hex: {id}");

    // The cookie opens the page, its assets and the JSON it reads.
    let with_cookie = [("cookie", cookie.as_str())];
    for (path, content_type) in [
        ("/ui", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/app.css", "text/css"),
        ("/status", "application/json"),
        ("/v1/graph", "application/json"),
        (
            "/v1/routes?service=catalog.shop.svc.cluster.local",
            "application/json",
        ),
    ] {
        let answer = request(addr, tls.clone(), "GET", path, &with_cookie, "").await;
        assert_eq!(
            answer.status, 200,
            "{path} with the cookie: {}",
            answer.body
        );
        assert!(
            answer.header("content-type").starts_with(content_type),
            "{path}"
        );
    }
    let page = request(addr, tls.clone(), "GET", "/ui", &with_cookie, "").await;
    assert_secured(&page, "/ui");
    assert!(
        !page.body.contains("<script>") && page.body.contains("src=\"/ui/app.js\""),
        "the page's script is a same-origin file, not inline"
    );
    // A forged id opens nothing.
    let forged = format!("mesh_ui_session={}", "0".repeat(64));
    let answer = request(
        addr,
        tls.clone(),
        "GET",
        "/status",
        &[("cookie", &forged)],
        "",
    )
    .await;
    assert_eq!(answer.status, 401, "a forged session id");

    // Logging out ends the session on the server, not only in the browser.
    let answer = request(addr, tls.clone(), "POST", "/ui/logout", &with_cookie, "").await;
    assert_eq!(answer.status, 200);
    assert!(answer.header("set-cookie").contains("Max-Age=0"));
    let answer = request(addr, tls.clone(), "GET", "/status", &with_cookie, "").await;
    assert_eq!(answer.status, 401, "the cookie after logging out");
    server.shutdown().await;
}

#[tokio::test]
async fn without_a_ca_the_page_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start control server");
    let addr = server.admin_addr();
    let page = request(addr, None, "GET", "/ui", &[], "").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("id=\"sync\""), "{}", page.body);
    assert_secured(&page, "/ui");
    let login = request(addr, None, "POST", "/ui/login", &[], "token=x").await;
    assert_eq!(login.status, 303, "no CA: nothing to log in to");
    assert_eq!(login.header("set-cookie"), "");
    let routes = request(addr, None, "GET", "/v1/routes", &[], "").await;
    assert_eq!(
        routes.status, 400,
        "/v1/routes without ?service=: {}",
        routes.body
    );
    assert!(routes.body.contains("service="), "{}", routes.body);
    server.shutdown().await;
}

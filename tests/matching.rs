//! VirtualService `match.ignoreUriCase`, `match.authority` and `match.scheme`
//! end to end over real sockets (issue 15): the examples of
//! `examples/istio-docs/` (in the shape of Istio's HTTPMatchRequest reference)
//! → embedded mesh-control → ADS → `XdsClient` → `proxyless::Client` → two
//! backends on 127.0.0.1, the v1 and v2 subsets of `ratings`, each answering
//! its name. Which one answers is where the route match sent the call.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use mesh_testkit::http::named_backend;
use proxyless::{Bootstrap, Client, XdsClient};
use tower::ServiceExt;

const DEADLINE: Duration = Duration::from_secs(10);
const IGNORE_CASE: &str = include_str!("../examples/istio-docs/match-ignore-uri-case.yaml");
const AUTHORITY: &str = include_str!("../examples/istio-docs/match-authority.yaml");
const SCHEME: &str = include_str!("../examples/istio-docs/match-scheme.yaml");
const FQDN: &str = "ratings.prod.svc.cluster.local";

/// The example `doc` with its ServiceEntry given the two backends as the
/// endpoints of v1 and v2; mesh-control on it and a client in `prod`.
async fn mesh(doc: &str) -> (mesh_control::ServerHandle, XdsClient, tempfile::TempDir) {
    let (v1, v2) = (named_backend("v1").await, named_backend("v2").await);
    let endpoint = |a: SocketAddr, version: &str| {
        format!(
            "  - address: {}\n    ports: {{http: {}}}\n    labels: {{version: {version}}}\n",
            a.ip(),
            a.port()
        )
    };
    let yaml = doc.replacen(
        "  resolution: STATIC\n",
        &format!(
            "  resolution: STATIC\n  endpoints:\n{}{}",
            endpoint(v1, "v1"),
            endpoint(v2, "v2")
        ),
        1,
    );
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("mesh.yaml"), &yaml).expect("write mesh.yaml");
    let server = mesh_control::Server::builder()
        .config_dir(dir.path())
        .start()
        .await
        .expect("start mesh-control");
    assert_eq!(
        server.status()["diagnostics"],
        serde_json::json!([]),
        "mesh-control rejects the YAML:\n{yaml}"
    );
    let json = server.bootstrap_json("caller", "prod");
    let xds = XdsClient::start(Bootstrap::from_json(&json).expect("bootstrap"));
    let listener = format!("{FQDN}:9080");
    tokio::time::timeout(DEADLINE, xds.wait_for_listener(&listener))
        .await
        .expect("the listener within the deadline")
        .expect("the listener");
    (server, xds, dir)
}

/// Which subset answered `req`.
async fn answered_by(client: &Client, req: Request<Full<Bytes>>) -> String {
    let what = format!("{} {:?}", req.uri(), req.headers().get("host"));
    let resp = client
        .clone()
        .oneshot(req)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(resp.status(), 200, "{what}");
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&body).into_owned()
}

async fn get(client: &Client, uri: &str) -> String {
    let req = Request::get(uri)
        .body(Full::new(Bytes::new()))
        .expect("request");
    answered_by(client, req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_uri_case_matches_prefixes_whatever_their_case() {
    let (_server, xds, _dir) = mesh(IGNORE_CASE).await;
    let client = Client::new(xds);
    let base = format!("http://{FQDN}:9080");
    for path in ["/ratings/v2/1", "/RATINGS/V2/1", "/Ratings/v2/1"] {
        assert_eq!(get(&client, &format!("{base}{path}")).await, "v2", "{path}");
    }
    assert_eq!(get(&client, &format!("{base}/ratings/v1/1")).await, "v1");

    // The same route without ignoreUriCase: only the exact case matches.
    let sensitive = IGNORE_CASE.replace("ignoreUriCase: true", "ignoreUriCase: false");
    let (_server, xds, _dir) = mesh(&sensitive).await;
    let client = Client::new(xds);
    assert_eq!(get(&client, &format!("{base}/ratings/v2/1")).await, "v2");
    assert_eq!(get(&client, &format!("{base}/RATINGS/V2/1")).await, "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authority_matches_the_authority_as_sent_or_the_host_header() {
    let (_server, xds, _dir) = mesh(AUTHORITY).await;
    let client = Client::new(xds);
    assert_eq!(get(&client, &format!("http://{FQDN}:9080/")).await, "v2");
    assert_eq!(get(&client, "http://ratings.prod:9080/").await, "v1");
    // An HTTP/1 request in origin form: its Host header is the authority,
    // as Envoy sees it.
    for (host, want) in [
        (format!("{FQDN}:9080"), "v2"),
        ("ratings.prod:9080".into(), "v1"),
    ] {
        let req = Request::get("/reviews")
            .header("host", host.as_str())
            .body(Full::new(Bytes::new()))
            .expect("request");
        assert_eq!(answered_by(&client, req).await, want, "Host: {host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheme_matches_the_scheme_of_the_request() {
    // The example sends https to v2: a plaintext call is not https.
    let (_server, xds, _dir) = mesh(SCHEME).await;
    let client = Client::new(xds);
    assert_eq!(get(&client, &format!("http://{FQDN}:9080/")).await, "v1");
    // A rule on http takes it, whether the scheme is in the URI or, for an
    // origin-form request, implied.
    let http = SCHEME.replace("exact: https", "exact: http");
    let (_server, xds, _dir) = mesh(&http).await;
    let client = Client::new(xds);
    assert_eq!(get(&client, &format!("http://{FQDN}:9080/")).await, "v2");
    let req = Request::get("/")
        .header("host", format!("{FQDN}:9080"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    assert_eq!(answered_by(&client, req).await, "v2");
}

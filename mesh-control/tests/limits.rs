//! Issue 13, acceptance 5: the limits of mesh-control's ports, over real
//! sockets.
//!
//! - Admin port: the connection cap plus 200 half-open connections (some
//!   silent, some sending a request head they never finish). The oldest are
//!   closed to admit the newest, the rest within the header timeout, and
//!   `/healthz` answers throughout.
//! - ADS: a raw HTTP/2 client (h2) that opens more streams than
//!   `SETTINGS_MAX_CONCURRENT_STREAMS` gets `REFUSED_STREAM` for the excess;
//!   a subscription of 300,000 names ends the stream with
//!   `RESOURCE_EXHAUSTED`, and the server goes on serving.
//! - The test's RSS (mesh-control runs in it) is printed before and after,
//!   and stays within a generous bound.
//! - The admin API refuses to listen beyond loopback without a CA unless
//!   told `insecure_admin`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_core::xds;
use mesh_testkit::ads::{AdsClient, node};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The admin API's default connection cap (`ServerBuilder::admin_max_connections`).
const CAP: usize = 1024;
/// Connections opened beyond the cap.
const OVER: usize = 200;
/// The header timeout the test configures (the default is 10 s).
const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Bounds every wait for a connection to be closed (not a timing assertion).
const CLOSE_WAIT: Duration = Duration::from_secs(30);
/// How much the process may grow over a test: generous, it only catches
/// state that grows with what a client sends.
const RSS_BOUND_KIB: u64 = 300 * 1024;

/// The resident set of this process (mesh-control is embedded), in KiB.
fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}

/// Raises this process's soft open-file limit to its hard limit: the test
/// holds both ends of more than a thousand connections.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    limit.current = limit.maximum;
    if let Err(e) = setrlimit(Resource::Nofile, limit) {
        eprintln!("cannot raise RLIMIT_NOFILE: {e}");
    }
    eprintln!(
        "RLIMIT_NOFILE: {before:?} -> {:?}",
        getrlimit(Resource::Nofile).current
    );
}

async fn healthz(addr: SocketAddr) -> (u16, String) {
    match tokio::time::timeout(CLOSE_WAIT, mesh_testkit::http::get_text(addr, "/healthz")).await {
        Ok(answer) => answer,
        Err(_) => panic!("/healthz did not answer within {CLOSE_WAIT:?}"),
    }
}

/// Whether the server closed `conn` (EOF or reset) within [`CLOSE_WAIT`].
async fn closed_by_server(conn: &mut TcpStream) -> bool {
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout(CLOSE_WAIT, conn.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // A 408 or 400 before the close is fine: read on to the end.
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_admin_connections_are_shed_and_healthz_answers_throughout() {
    raise_open_file_limit();
    let server = mesh_control::Server::builder()
        .admin_header_timeout(HEADER_TIMEOUT)
        .start()
        .await
        .expect("start control server");
    let admin = server.admin_addr();
    let rss_before = rss_kib();

    let mut conns = Vec::with_capacity(CAP + OVER);
    for i in 0..CAP + OVER {
        let mut conn = TcpStream::connect(admin).await.expect("connect");
        if i % 2 == 1 {
            // Slowloris: a request head that never ends.
            conn.write_all(b"GET /status HTTP/1.1\r\nhost: admin\r\nx-slow: ")
                .await
                .expect("write");
        }
        conns.push(conn);
        if i % 256 == 0 {
            let (code, body) = healthz(admin).await;
            assert_eq!(
                (code, body.as_str()),
                (200, "ok\n"),
                "after {i} connections"
            );
        }
    }
    let opened = Instant::now();
    let (code, _) = healthz(admin).await;
    assert_eq!(
        code,
        200,
        "/healthz with {} half-open connections",
        conns.len()
    );
    let rss_flood = rss_kib();

    let mut closed = 0;
    for conn in &mut conns {
        if closed_by_server(conn).await {
            closed += 1;
        }
    }
    let took = opened.elapsed();
    eprintln!(
        "{closed} of {} half-open connections closed by the server, the last {took:?} after \
         the flood (header timeout {HEADER_TIMEOUT:?})",
        conns.len()
    );
    assert_eq!(closed, conns.len(), "half-open connections left open");
    let (code, _) = healthz(admin).await;
    assert_eq!(code, 200);

    let rss_after = rss_kib();
    eprintln!(
        "RSS: {rss_before} KiB before, {rss_flood} KiB during the flood, {rss_after} KiB after"
    );
    assert!(
        rss_flood.saturating_sub(rss_before) < RSS_BOUND_KIB,
        "RSS grew from {rss_before} KiB to {rss_flood} KiB"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn ads_refuses_streams_over_the_limit_with_refused_stream() {
    let server = mesh_control::Server::builder()
        .start()
        .await
        .expect("start control server");
    let addr = server.xds_addr();
    const STREAMS: usize = 150;
    const LIMIT: usize = 100;

    let tcp = TcpStream::connect(addr).await.expect("connect");
    // A client that assumes no limit until the server's SETTINGS arrive,
    // and sends every stream before reading them.
    let (mut client, connection) = h2::client::Builder::new()
        .initial_max_send_streams(STREAMS * 2)
        .handshake::<_, &'static [u8]>(tcp)
        .await
        .expect("HTTP/2 handshake");
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        client = client.ready().await.expect("ready");
        let request = http::Request::post(format!(
            "http://{addr}/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
        // Kept open: neither the body nor the stream ends.
        streams.push(client.send_request(request, false).expect("send"));
    }
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut accepted = 0;
    let mut refused = 0;
    let mut other = Vec::new();
    let mut open = Vec::new();
    for (response, send) in streams {
        match tokio::time::timeout(CLOSE_WAIT, response).await {
            Ok(Ok(response)) => {
                accepted += 1;
                open.push((response, send));
            }
            Ok(Err(e)) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => refused += 1,
            Ok(Err(e)) => other.push(e.to_string()),
            Err(_) => other.push(format!("no answer within {CLOSE_WAIT:?}")),
        }
    }
    eprintln!(
        "{accepted} streams accepted, {refused} refused with REFUSED_STREAM, other {other:?}"
    );
    assert!(other.is_empty(), "{other:?}");
    assert_eq!(accepted, LIMIT, "streams over the limit were served");
    assert_eq!(refused, STREAMS - LIMIT);
    drop(open);
    server.shutdown().await;
}

#[tokio::test]
async fn a_subscription_of_300000_names_is_refused_and_the_server_goes_on() {
    let server = mesh_control::Server::builder()
        .start()
        .await
        .expect("start control server");
    let rss_before = rss_kib();
    let mut ads =
        AdsClient::connect(server.xds_addr(), node("greedy").namespace("shop").build()).await;
    let names: Vec<String> = (0..300_000)
        .map(|i| format!("service-{i}.shop.svc.cluster.local:80"))
        .collect();
    ads.subscribe_owned(xds::LISTENER_TYPE, names).await;
    let status = ads
        .ended_with(CLOSE_WAIT)
        .await
        .expect("the stream must end with a refusal");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("300000") && status.message().contains("10000"),
        "the refusal must say how many names and the limit: {}",
        status.message()
    );
    let rss_after = rss_kib();
    eprintln!("RSS: {rss_before} KiB before the subscription, {rss_after} KiB after");
    assert!(
        rss_after.saturating_sub(rss_before) < RSS_BOUND_KIB,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );

    // A reasonable client is served as before.
    let mut ads =
        AdsClient::connect(server.xds_addr(), node("modest").namespace("shop").build()).await;
    ads.subscribe(xds::LISTENER_TYPE, &["catalog:80"]).await;
    let response = ads.recv().await;
    assert_eq!(response.type_url, xds::LISTENER_TYPE);
    server.shutdown().await;
}

#[tokio::test]
async fn the_admin_api_stays_on_loopback_without_a_ca_unless_told_otherwise() {
    let error = mesh_control::Server::builder()
        .admin_addr(SocketAddr::from(([0, 0, 0, 0], 0)))
        .start()
        .await
        .expect_err("an open admin API beyond loopback without a CA must be refused");
    assert_eq!(error.kind(), mesh_control::ErrorKind::Config);
    assert!(error.to_string().contains("--insecure-admin"), "{error}");

    let server = mesh_control::Server::builder()
        .admin_addr(SocketAddr::from(([0, 0, 0, 0], 0)))
        .insecure_admin(true)
        .start()
        .await
        .expect("--insecure-admin allows it");
    let port = server.admin_addr().port();
    let (code, _) = healthz(SocketAddr::from(([127, 0, 0, 1], port))).await;
    assert_eq!(code, 200);
    server.shutdown().await;
}

//! The client against a tiny in-test ADS server over real sockets on
//! 127.0.0.1: sync, missing listeners, NACKs, server fallback, reconnect and
//! re-subscribe, the static-stability cache, and task shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_core::route::RequestView;
use mesh_core::snapshot::ListenerLookup;
use mesh_core::xds::{self, ResourceType};
use mesh_testkit::ads::{AdsServer, Resources};
use mesh_testkit::snapshot::xds::bad_listener;
use mesh_testkit::wait::within;
use mesh_xds_client::{Bootstrap, ClientOptions, ErrorKind, XdsClient};
use tokio::net::TcpListener;
use tokio::time::timeout;

const DEADLINE: Duration = Duration::from_secs(10);
const LISTENER: &str = "catalog:8080";
const FQDN_PORT: &str = "catalog.default.svc.cluster.local:8080";
const CLUSTER: &str = "outbound|8080||catalog.default.svc.cluster.local";

/// `catalog:8080` → one route to one cluster → one endpoint at `endpoint`.
fn resources(endpoint: SocketAddr) -> Resources {
    Resources::one_service(
        LISTENER,
        FQDN_PORT,
        &["catalog", "catalog:8080"],
        CLUSTER,
        endpoint,
    )
}

fn options() -> ClientOptions {
    // No cache unless a test names one (`.cache_file` after this overrides).
    ClientOptions::default()
        .no_cache()
        .backoff(Duration::from_millis(1), Duration::from_millis(20))
        .connect_timeout(Duration::from_secs(2))
}

fn bootstrap(addr: SocketAddr) -> Bootstrap {
    Bootstrap::builder(addr.to_string(), "test-client")
        .namespace("default")
        .build()
        .unwrap()
}

fn backend() -> SocketAddr {
    ([127, 0, 0, 1], 41000).into()
}

/// A port nothing listens on.
async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Waits until `cond` holds for the client's snapshot.
async fn until(client: &XdsClient, cond: impl Fn(&mesh_core::Snapshot) -> bool) {
    let mut changes = client.changes();
    within("the condition on the client's snapshot", async {
        loop {
            changes.borrow_and_update();
            if cond(&client.snapshot()) {
                return;
            }
            changes.changed().await.expect("client task ended");
        }
    })
    .await;
}

#[tokio::test]
async fn wait_for_listener_syncs_the_cascade_and_the_snapshot_routes() {
    let mut server = AdsServer::start(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr()), options());
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .expect("timed out")
        .expect("listener should sync");

    let snapshot = client.snapshot();
    let ListenerLookup::Found(listener) = snapshot.listener_for(LISTENER) else {
        panic!("listener not found");
    };
    let (method, uri, headers) = (
        http::Method::GET,
        "/items".parse::<http::Uri>().unwrap(),
        http::HeaderMap::new(),
    );
    let resolved = snapshot
        .resolve(
            listener,
            &RequestView::new(&method, &uri, &headers, LISTENER),
            7,
        )
        .unwrap();
    assert_eq!(&*resolved.cluster.name, CLUSTER);
    assert_eq!(
        resolved.endpoints.localities[0].endpoints[0].address,
        backend()
    );
    assert_eq!(&*snapshot.versions.listeners, "v1");
    assert!(*client.changes().borrow() > 0);
    assert_eq!(client.connected_server(), Some(server.addr().to_string()));
    assert!(client.last_error().is_none());

    // The server saw the node once, and ACKs for every type.
    let first = server.request_where(|_| true).await;
    let node = first.node.expect("node on the first request");
    assert_eq!(node.id, "test-client");
    assert_eq!(node.user_agent_name, "proxyless-rust");
    for t in ResourceType::ALL {
        let ack = server
            .request_where(|r| r.type_url == t.type_url() && r.version_info == "v1")
            .await;
        assert!(ack.error_detail.is_none());
        assert!(ack.node.is_none());
    }
    // Subscribing again is a no-op, and a second wait returns at once.
    client.subscribe(LISTENER);
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_listener_the_server_does_not_have_fails_fast_with_its_name() {
    let server = AdsServer::start(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr()), options());
    let err = timeout(DEADLINE, client.wait_for_listener("nope:80"))
        .await
        .expect("a missing listener must not wait for a timeout")
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    let msg = err.to_string();
    assert!(msg.contains("\"nope:80\""), "{msg}");
    assert!(
        msg.contains("does not exist on the control server"),
        "{msg}"
    );
    assert!(msg.contains(&server.addr().to_string()), "{msg}");
    // Other listeners are unaffected.
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn an_invalid_listener_is_nacked_and_the_wait_fails_with_the_reason() {
    let r = resources(backend()).with("broken", bad_listener("broken"));
    let mut server = AdsServer::start(r, "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr()), options());
    let err = timeout(DEADLINE, client.wait_for_listener("broken"))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Rejected);
    assert!(err.to_string().contains("\"broken\""), "{err}");
    let nack = server.request_where(|r| r.error_detail.is_some()).await;
    assert_eq!(nack.type_url, xds::LISTENER_TYPE);
    assert_eq!(nack.version_info, "", "nothing accepted before");
    assert!(nack.error_detail.unwrap().message.contains("\"broken\""));
}

#[tokio::test]
async fn the_next_server_is_used_when_the_first_is_down() {
    let dead = dead_port().await;
    let server = AdsServer::start(resources(backend()), "v1").await;
    let b = Bootstrap::builder(dead.to_string(), "test-client")
        .server(server.addr().to_string())
        .build()
        .unwrap();
    let client = XdsClient::start_with(b, options());
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.connected_server(), Some(server.addr().to_string()));
}

#[tokio::test]
async fn the_client_reconnects_to_a_restarted_server_and_resubscribes_with_versions() {
    let server = AdsServer::start(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr()), options());
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();

    let addr = server.kill().await;
    // The old config stays while the server is away.
    assert!(matches!(
        client.snapshot().listener_for(LISTENER),
        ListenerLookup::Found(_)
    ));
    let mut restarted = AdsServer::start_on(
        TcpListener::bind(addr).await.unwrap(),
        resources(backend()),
        "v2",
    );

    let lds = restarted
        .request_where(|r| r.type_url == xds::LISTENER_TYPE)
        .await;
    assert_eq!(lds.resource_names, [LISTENER]);
    assert_eq!(
        lds.version_info, "v1",
        "re-subscribes with the last accepted version"
    );
    assert_eq!(
        lds.response_nonce, "",
        "a new stream starts without a nonce"
    );
    assert!(lds.node.is_some());
    until(&client, |s| {
        &*s.versions.listeners == "v2" && &*s.versions.endpoints == "v2"
    })
    .await;
    assert!(client.last_error().is_none());
}

#[tokio::test]
async fn pre_warmed_listeners_sync_without_a_subscribe_call() {
    let server = AdsServer::start(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr()), options().listeners([LISTENER]));
    until(&client, |s| s.endpoints.contains_key(CLUSTER)).await;
}

#[tokio::test]
async fn the_cache_serves_the_last_good_config_when_no_server_answers() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("xds.cache");
    let server = AdsServer::start(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr()), options().cache_file(&cache));
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();
    // The cache is written off the client's task: wait until it holds this config.
    mesh_testkit::wait::until("the config in the cache file", || {
        client.cache_status().saved_version == *client.changes().borrow()
    })
    .await;
    drop(client);
    server.kill().await;

    let dead = dead_port().await;
    let client = XdsClient::start_with(bootstrap(dead), options().cache_file(&cache));
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .expect("the cached config should be served")
        .unwrap();
    assert_eq!(
        &*client.snapshot().versions.listeners,
        "",
        "cached config has no version"
    );
    assert!(
        client
            .last_error()
            .is_some_and(|e| e.kind() == ErrorKind::Connect)
    );
}

#[tokio::test]
async fn the_task_ends_with_the_last_handle() {
    let server = AdsServer::start(resources(backend()), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr()), options());
    timeout(DEADLINE, client.wait_for_listener(LISTENER))
        .await
        .unwrap()
        .unwrap();
    let mut changes = client.changes();
    let clone = client.clone();
    drop(client);
    clone.subscribe("still-alive");
    drop(clone);
    let ended = timeout(DEADLINE, async {
        loop {
            if changes.changed().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the task should end when the last handle is dropped"
    );
}

// ---------------------------------------------------------------------------
// TLS to the control server (channel_creds "tls").

mod tls {
    use std::path::Path;

    use mesh_testkit::pki::{self, TestCa, write_pem as write};

    use super::*;
    use mesh_xds_client::ChannelTls;

    /// The test ADS server over TLS presenting `cert`; with `client_ca`, a client
    /// certificate of that CA is required.
    async fn serve_tls(
        resources: Resources,
        cert: &pki::Leaf,
        client_ca: Option<&str>,
    ) -> AdsServer {
        AdsServer::start_tls(resources, "tls-v1", pki::server_config(cert, client_ca)).await
    }

    /// A client of the ADS server at `addr` over TLS verified with the CA
    /// file `ca_file` (no client certificate).
    fn tls_client(addr: SocketAddr, ca_file: impl AsRef<Path>) -> XdsClient {
        let bootstrap = Bootstrap::builder(addr.to_string(), "tls-client")
            .channel_tls(ca_file.as_ref())
            .build()
            .unwrap();
        XdsClient::start_with(bootstrap, options())
    }

    #[tokio::test]
    async fn the_client_syncs_over_tls_verifying_the_server_by_ip_san() {
        let ca = TestCa::new("control root");
        let cert = ca.leaf_for(&["127.0.0.1"]);
        let mut server = serve_tls(resources(backend()), &cert, None).await;
        let dir = tempfile::tempdir().unwrap();
        let ca_file = write(dir.path(), "root-cert.pem", &ca.pem);
        let client = tls_client(server.addr(), &ca_file);
        timeout(DEADLINE, client.wait_for_listener(LISTENER))
            .await
            .expect("timed out")
            .expect("listener should sync over TLS");
        assert!(client.snapshot().clusters.contains_key(CLUSTER));
        let first = server.request_where(|_| true).await;
        assert_eq!(first.node.unwrap().id, "tls-client");
    }

    #[tokio::test]
    async fn a_client_certificate_is_presented_when_configured() {
        let ca = TestCa::new("control root");
        let cert = ca.leaf_for(&["127.0.0.1"]);
        let server = serve_tls(resources(backend()), &cert, Some(&ca.pem)).await;
        let dir = tempfile::tempdir().unwrap();
        let ca_file = write(dir.path(), "root-cert.pem", &ca.pem);
        let (cert_file, key_file) = ca.leaf_for(&["workload"]).write(dir.path());
        let bootstrap = Bootstrap::builder(server.addr().to_string(), "tls-client")
            .channel_credentials(ChannelTls::new(&ca_file).with_identity(&cert_file, &key_file))
            .build()
            .unwrap();
        let client = XdsClient::start_with(bootstrap, options());
        timeout(DEADLINE, client.wait_for_listener(LISTENER))
            .await
            .expect("timed out")
            .expect("listener should sync with a client certificate");
    }

    /// Waits for the client's last error to contain `needle`.
    async fn error_containing(client: &XdsClient, needle: &str) -> String {
        timeout(DEADLINE, async {
            loop {
                if let Some(e) = client.last_error() {
                    let msg = e.to_string();
                    if msg.contains(needle) {
                        assert_eq!(e.kind(), ErrorKind::Connect, "{msg}");
                        return msg;
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no error with {needle:?}: {:?}", client.last_error()))
    }

    #[tokio::test]
    async fn a_server_certificate_of_another_ca_fails_verification() {
        let ca = TestCa::new("control root");
        let server = serve_tls(resources(backend()), &ca.leaf_for(&["127.0.0.1"]), None).await;
        let addr = server.addr();
        let dir = tempfile::tempdir().unwrap();
        let other = write(
            dir.path(),
            "other-root.pem",
            &TestCa::new("another root").pem,
        );
        let client = tls_client(addr, &other);
        let msg = error_containing(&client, "certificate verification failed").await;
        assert!(msg.contains(&addr.to_string()), "{msg}");
        assert!(msg.contains("other-root.pem"), "{msg}");
        assert!(client.snapshot().listeners.is_empty());

        // A certificate of the right CA for another name fails too.
        let server = serve_tls(resources(backend()), &ca.leaf_for(&["10.9.9.9"]), None).await;
        let ca_file = write(dir.path(), "root-cert.pem", &ca.pem);
        let client = tls_client(server.addr(), &ca_file);
        let msg = error_containing(&client, "certificate verification failed").await;
        assert!(msg.contains("valid for 127.0.0.1"), "{msg}");
    }

    #[tokio::test]
    async fn a_missing_ca_file_is_a_clear_error() {
        let addr = dead_port().await;
        let client = tls_client(addr, "/nonexistent/root-cert.pem");
        let msg = error_containing(&client, "cannot read ca_certificate_file").await;
        assert!(msg.contains("/nonexistent/root-cert.pem"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        let empty = write(dir.path(), "empty.pem", "not a certificate\n");
        let client = tls_client(addr, &empty);
        error_containing(&client, "holds no PEM CERTIFICATE block").await;
    }
}

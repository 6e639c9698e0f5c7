//! The client task lives as long as a handle does, over real sockets with a
//! real mesh-control: while any [`XdsClient`] clone is alive the ADS stream
//! stays open and config changes keep arriving (and reaching the cache
//! file); once the last one is dropped the control server sees the stream
//! end (its `/status` no longer lists the node), and the cache file is no
//! longer written, while another client of the same control server goes on
//! receiving the pushes the dropped one would have.

use std::path::Path;
use std::time::Duration;

use mesh_control::ServerHandle;
use mesh_testkit::wait::{eventually, within_for};
use mesh_xds_client::{Bootstrap, ClientOptions, XdsClient};

/// Generous: a loaded CI machine; a client that never lets go fails here.
const DEADLINE: Duration = Duration::from_secs(30);

/// Serves `subset` from now on (mesh-control re-reads its directory).
fn route_to(control: &ServerHandle, config: &Path, subset: &str) {
    std::fs::write(
        config.join("mesh.yaml"),
        mesh_testkit::yaml::catalog_routed_to(subset),
    )
    .expect("write the mesh config");
    control.reload();
}

/// The ADS streams of `node` mesh-control's `/status` lists.
fn streams_of(control: &ServerHandle, node: &str) -> usize {
    control.status()["clients"].as_array().map_or(0, |clients| {
        clients
            .iter()
            .filter(|c| c["node_id"].as_str() == Some(node))
            .count()
    })
}

/// An xDS client of `node` with its cache in `cache`, quick reconnects.
fn client(control: &ServerHandle, node: &str, cache: &Path) -> XdsClient {
    let bootstrap = Bootstrap::from_json(&control.bootstrap_json(node, "shop"))
        .unwrap_or_else(|e| panic!("{e}"));
    XdsClient::start_with(
        bootstrap,
        ClientOptions::default()
            .backoff(Duration::from_millis(10), Duration::from_millis(200))
            .cache_file(cache),
    )
}

/// Waits for `xds` to have catalog's listener and to have written the
/// config it runs to its cache file; returns that config's version.
async fn synced(xds: &XdsClient) -> u64 {
    within_for(
        "catalog's listener at the client",
        DEADLINE,
        xds.wait_for_listener("catalog"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    eventually("the client's config in its cache file", DEADLINE, || {
        xds.cache_status().saved_version == *xds.changes().borrow()
    })
    .await;
    *xds.changes().borrow()
}

/// Waits for a config newer than `version` at `xds`, written to its cache.
async fn pushed_after(xds: &XdsClient, version: u64) -> u64 {
    eventually(
        "the pushed config at the client and in its cache file",
        DEADLINE,
        || {
            let now = *xds.changes().borrow();
            now > version && xds.cache_status().saved_version == now
        },
    )
    .await;
    *xds.changes().borrow()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_and_the_cache_writes_end_with_the_last_handle() {
    let config = tempfile::tempdir().expect("tempdir");
    let caches = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        config.path().join("mesh.yaml"),
        mesh_testkit::yaml::catalog_routed_to("v1"),
    )
    .expect("write config");
    let control = mesh_control::Server::builder()
        .config_dir(config.path())
        .start()
        .await
        .unwrap_or_else(|e| panic!("start mesh-control: {e}"));

    let dropped_cache = caches.path().join("dropped.xds");
    let first = client(&control, "dropped", &dropped_cache);
    let second = first.clone();
    let version = synced(&first).await;
    assert_eq!(streams_of(&control, "dropped"), 1, "{}", control.status());

    // One clone gone, one left: the stream stays and pushes still arrive.
    drop(first);
    route_to(&control, config.path(), "v2");
    pushed_after(&second, version).await;
    assert_eq!(
        streams_of(&control, "dropped"),
        1,
        "a live clone keeps the stream: {}",
        control.status()
    );

    // The last handle gone: mesh-control sees the stream end.
    drop(second);
    eventually(
        "mesh-control to see the dropped client's stream end",
        DEADLINE,
        || streams_of(&control, "dropped") == 0,
    )
    .await;
    let cached = std::fs::read(&dropped_cache).expect("the dropped client's cache file");

    // A push the dropped client would have received and cached: another
    // client gets it; the dropped client's file stays as it was.
    let witness = client(&control, "witness", &caches.path().join("witness.xds"));
    let version = synced(&witness).await;
    route_to(&control, config.path(), "v1");
    pushed_after(&witness, version).await;
    assert_eq!(
        streams_of(&control, "dropped"),
        0,
        "the dropped client did not come back: {}",
        control.status()
    );
    assert!(
        std::fs::read(&dropped_cache).expect("the dropped client's cache file") == cached,
        "the dropped client's cache file was written after its last handle was dropped"
    );
    control.shutdown().await;
}

/// What the black hole saw of a connection.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Accepted,
    Closed,
}

/// A control server that accepts connections and never says a word; the
/// receiver says when it accepts a connection and when the client closes it.
async fn black_hole() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Seen>,
) {
    use tokio::io::AsyncReadExt as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("address");
    let (seen_tx, seen) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let seen = seen_tx.clone();
            let _ = seen.send(Seen::Accepted);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                // Reads whatever the client sends (its HTTP/2 preface and
                // request) until it closes the connection.
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
                let _ = seen.send(Seen::Closed);
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_still_waiting_for_its_server_lets_go_with_the_last_handle() {
    let caches = tempfile::tempdir().expect("tempdir");
    let (addr, mut seen) = black_hole().await;
    let bootstrap = Bootstrap::builder(addr.to_string(), "waiting")
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let xds = XdsClient::start_with(
        bootstrap,
        ClientOptions::default()
            .connect_timeout(Duration::from_secs(120))
            .listeners(["catalog"])
            .cache_file(caches.path().join("waiting.xds")),
    );
    let mut changes = xds.changes();
    // Connected: the server holds the connection and answers nothing.
    let accepted = within_for("the client to connect", DEADLINE, seen.recv()).await;
    assert_eq!(accepted, Some(Seen::Accepted));
    changes.borrow_and_update();
    drop(xds);
    let closed = within_for(
        "the server to see the dropped client's connection close",
        DEADLINE,
        seen.recv(),
    )
    .await;
    assert_eq!(closed, Some(Seen::Closed), "the client connected again");
    let ended = within_for(
        "the changes of the dropped client to end",
        DEADLINE,
        changes.changed(),
    )
    .await;
    assert!(
        ended.is_err(),
        "the client task published after its last handle was dropped"
    );
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_backing_off_from_a_refused_port_ends_with_the_last_strong_handle() {
    let refused = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = refused.local_addr().expect("address");
    drop(refused);
    let bootstrap = Bootstrap::builder(addr.to_string(), "refused")
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let xds = XdsClient::start_with(
        bootstrap,
        ClientOptions::default()
            .backoff(Duration::from_secs(60), Duration::from_secs(60))
            .no_cache(),
    );
    let mut changes = xds.changes();
    eventually("the refused connection", DEADLINE, || {
        xds.last_error().is_some()
    })
    .await;
    changes.borrow_and_update();
    // A weak handle (what a metrics collector holds) reads the client
    // while it runs and does not keep it running.
    let weak = xds.downgrade();
    let upgraded = weak.upgrade().expect("the client runs");
    assert_eq!(upgraded.bootstrap().node_id(), "refused");
    drop(upgraded);
    drop(xds);
    let ended = within_for(
        "the task of the dropped client to end (in its 60 s backoff)",
        DEADLINE,
        changes.changed(),
    )
    .await;
    assert!(
        ended.is_err(),
        "the client task published after its last handle was dropped"
    );
    assert!(
        weak.upgrade().is_none(),
        "a weak handle does not bring the client back"
    );
}

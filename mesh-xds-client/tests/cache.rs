//! The static-stability cache over real sockets: where it is written, what
//! a client that starts while no control server answers does with it (a
//! refused port, and a black hole that accepts and never answers), how the
//! server's config replaces it, and what an unusable cache does (nothing
//! but a report).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_testkit::ads::{AdsServer, Resources};
use mesh_testkit::snapshot::xds::{cluster, endpoints, listener, route_config};
use mesh_testkit::wait::{eventually_ok, within, within_for};
use mesh_xds_client::cache::CACHE_ENV_VAR;
use mesh_xds_client::{Bootstrap, ClientOptions, XdsClient};
use tokio::net::TcpListener;

const DEADLINE: Duration = Duration::from_secs(10);
const LISTENER: &str = "catalog:8080";
const FQDN_PORT: &str = "catalog.default.svc.cluster.local:8080";
const CLUSTER: &str = "outbound|8080||catalog.default.svc.cluster.local";
const NODE: &str = "frontend-1";

/// `catalog:8080` → one route → one cluster → one endpoint at `endpoint`.
fn resources(endpoint: SocketAddr) -> Resources {
    Resources::new()
        .with(LISTENER, listener(LISTENER, FQDN_PORT))
        .with(
            FQDN_PORT,
            route_config(
                FQDN_PORT,
                &["catalog", "catalog:8080"],
                "default",
                &[(CLUSTER, 0)],
            ),
        )
        .with(CLUSTER, cluster(CLUSTER, CLUSTER))
        .with(
            CLUSTER,
            endpoints(CLUSTER, endpoint, Default::default(), &[]),
        )
}

fn backend(port: u16) -> SocketAddr {
    ([127, 0, 0, 1], port).into()
}

fn bootstrap(addr: SocketAddr) -> Bootstrap {
    Bootstrap::builder(addr.to_string(), NODE)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Fast reconnects, and a connect timeout far above the cache wait: a
/// client that waited for it before using the cache would miss every
/// deadline below.
fn options(dir: &Path) -> ClientOptions {
    let dir = format!("{}/", dir.display());
    ClientOptions::default()
        .backoff(Duration::from_millis(5), Duration::from_millis(100))
        .connect_timeout(Duration::from_secs(120))
        .env_lookup(move |name| (name == CACHE_ENV_VAR).then(|| dir.clone()))
}

/// A control server at `addr` that accepts connections and never says a
/// word.
async fn black_hole(addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = l.accept().await {
            held.push(stream);
        }
    })
}

fn endpoint_port(client: &XdsClient) -> Option<u16> {
    let snapshot = client.snapshot();
    let cla = snapshot.endpoints.get(CLUSTER)?;
    let port = cla.localities.first()?.endpoints.first()?.address.port();
    Some(port)
}

/// Syncs a client with a server holding `resources(backend(port))`, waits
/// until its cache file holds that config, stops both, and returns the
/// file and the server's address (the cache belongs to a node and its
/// servers: the later clients use the same address).
async fn fill_cache(dir: &Path, port: u16) -> (PathBuf, SocketAddr) {
    let server = AdsServer::start(resources(backend(port)), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr()), options(dir));
    within("the listener", client.wait_for_listener(LISTENER))
        .await
        .unwrap();
    eventually_ok("the config in the cache file", DEADLINE, || {
        let status = client.cache_status();
        let current = *client.changes().borrow();
        if endpoint_port(&client) == Some(port) && status.saved_version == current {
            Ok(())
        } else {
            Err(format!("{status:?}, config version {current}"))
        }
    })
    .await;
    let file = client.cache_status().file.expect("a cache file");
    drop(client);
    let addr = server.kill().await;
    (file, addr)
}

#[tokio::test]
async fn the_cache_is_written_per_node_privately_where_the_environment_says() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = fill_cache(dir.path(), 41001).await;
    assert_eq!(file.parent(), Some(dir.path()));
    let name = file.file_name().unwrap().to_str().unwrap();
    assert!(
        name.starts_with("frontend-1-") && name.ends_with(".xds"),
        "{name}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
}

#[tokio::test]
async fn the_bootstraps_proxyless_cache_file_places_it_when_the_environment_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app").join("xds.cache");
    let server = AdsServer::start(resources(backend(41002)), "v1").await;
    let json = format!(
        r#"{{"xds_servers": [{{"server_uri": "{}", "channel_creds": [{{"type": "insecure"}}]}}],
            "node": {{"id": "{NODE}"}},
            "proxyless": {{"cache_file": {:?}}}}}"#,
        server.addr(),
        path.display().to_string()
    );
    let bootstrap = Bootstrap::from_json(&json).unwrap_or_else(|e| panic!("{e}"));
    let client = XdsClient::start_with(bootstrap, ClientOptions::default().env_lookup(|_| None));
    assert_eq!(client.cache_status().file.as_deref(), Some(path.as_path()));
    within("the listener", client.wait_for_listener(LISTENER))
        .await
        .unwrap();
    eventually_ok("the cache file", DEADLINE, || {
        if path.is_file() {
            Ok(())
        } else {
            Err("not written yet")
        }
    })
    .await;
}

#[tokio::test]
async fn a_black_holed_control_server_costs_the_cache_wait_not_the_connect_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (file, addr) = fill_cache(dir.path(), 41003).await;
    let written = std::fs::metadata(&file).unwrap().modified().unwrap();

    let _hole = black_hole(addr).await;
    let client = XdsClient::start_with(bootstrap(addr), options(dir.path()));
    assert_eq!(client.stale_since(), None, "not stale before the wait");
    // The connect timeout is two minutes: only the cache wait (1 s) can
    // make this in time.
    within_for(
        "the cached listener, with the control server a black hole",
        DEADLINE,
        client.wait_for_listener(LISTENER),
    )
    .await
    .unwrap();
    assert_eq!(endpoint_port(&client), Some(41003));
    let since = client
        .stale_since()
        .expect("stale: the config is the cache's");
    let drift = written
        .duration_since(since)
        .unwrap_or_else(|e| e.duration());
    assert!(
        drift < Duration::from_secs(2),
        "stale since the cache was written ({since:?} vs {written:?})"
    );
    let dump = client.config_dump_json();
    let stale = dump["control_server"]["cache"]["stale"]
        .as_str()
        .unwrap_or_else(|| panic!("the dump says stale: {:#}", dump["control_server"]));
    assert!(stale.starts_with("stale since "), "{stale}");
    assert!(stale.contains(&file.display().to_string()), "{stale}");
}

#[tokio::test]
async fn the_servers_config_replaces_the_cached_one_and_clears_the_stale_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (_, addr) = fill_cache(dir.path(), 41004).await;

    // The control server is down: the client serves the cache.
    let client = XdsClient::start_with(bootstrap(addr), options(dir.path()));
    within("the cached listener", client.wait_for_listener(LISTENER))
        .await
        .unwrap();
    assert_eq!(endpoint_port(&client), Some(41004));
    assert!(client.stale_since().is_some());
    assert!(client.connected_server().is_none());

    // It comes back on its address with another endpoint.
    let listener = TcpListener::bind(addr).await.unwrap();
    let server = AdsServer::start_on(listener, resources(backend(41005)), "v2");
    eventually_ok("the server's config, not stale", DEADLINE, || {
        let state = (endpoint_port(&client), client.stale_since());
        if state == (Some(41005), None) {
            Ok(())
        } else {
            Err(format!("{state:?}"))
        }
    })
    .await;
    assert_eq!(&*client.snapshot().versions.listeners, "v2");
    assert_eq!(
        client.config_dump_json()["control_server"]["cache"]["stale"],
        serde_json::Value::Null
    );
    // And the cache now holds it.
    eventually_ok("the new config in the cache", DEADLINE, || {
        let status = client.cache_status();
        if status.saved_version == *client.changes().borrow() {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
    drop(server);
}

#[tokio::test]
async fn an_unusable_cache_is_reported_and_ignored_and_then_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (file, addr) = fill_cache(dir.path(), 41006).await;
    let mut bytes = std::fs::read(&file).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&file, &bytes).unwrap();

    let client = XdsClient::start_with(bootstrap(addr), options(dir.path()));
    let problem = eventually_ok("the problem reported", DEADLINE, || {
        client.cache_status().problem.ok_or("no problem yet")
    })
    .await;
    assert!(
        problem.contains(&file.display().to_string()) && problem.contains("truncated"),
        "{problem}"
    );
    assert_eq!(client.stale_since(), None);
    assert!(client.snapshot().listeners.is_empty(), "nothing was loaded");
    let waited = tokio::time::timeout(
        Duration::from_millis(300),
        client.wait_for_listener(LISTENER),
    )
    .await;
    assert!(waited.is_err(), "no config until a server answers");

    // A server answers: its config is used and written over the bad file.
    let listener = TcpListener::bind(addr).await.unwrap();
    let _server = AdsServer::start_on(listener, resources(backend(41007)), "v1");
    within("the listener", client.wait_for_listener(LISTENER))
        .await
        .unwrap();
    eventually_ok("a good cache", DEADLINE, || {
        let status = client.cache_status();
        if status.problem.is_none() && status.saved_version == *client.changes().borrow() {
            Ok(())
        } else {
            Err(format!("{status:?}"))
        }
    })
    .await;
}

#[tokio::test]
async fn without_a_cache_nothing_is_written_or_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let server = AdsServer::start(resources(backend(41008)), "v1").await;
    let client = XdsClient::start_with(bootstrap(server.addr()), options(dir.path()).no_cache());
    within("the listener", client.wait_for_listener(LISTENER))
        .await
        .unwrap();
    assert_eq!(client.cache_status().file, None);
    assert_eq!(
        client.config_dump_json()["control_server"]["cache"]["file"],
        serde_json::Value::Null
    );
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(names.is_empty(), "{names:?}");
}

//! `mesh_control::etcd` against a real etcd (Debian's `etcd-server`, 3.4,
//! installed by the test when missing): keys and prefixes, transactions
//! conditioned on a revision, leases that expire or are kept alive,
//! watches in revision order that resume after etcd restarts or the
//! connection drops without losing what was written meanwhile, compaction,
//! failover across endpoints, failing fast when etcd is down, and TLS with
//! client certificates.
//!
//! Each test runs its own etcd on loopback ports (`mesh_testkit::etcd`).
//!
//! Run: `cargo test -p mesh-control --features etcd --test etcd`.

#![cfg(feature = "etcd")]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_control::etcd::{
    Compare, CompareOp, Error, ErrorKind, Etcd, EtcdOptions, EtcdTls, Event, EventKind, Op,
    OpResponse, Txn, Watch,
};
use mesh_testkit::etcd::{EtcdProcess, ServerTls};
use mesh_testkit::pki::{TestCa, write_pem};
use mesh_testkit::wait::{DEADLINE, eventually_ok_async, within};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A TCP proxy in front of etcd, which a test cuts (every connection closed,
/// new ones refused) and restores on the same port: a client's connection
/// lost while etcd stays up for other writers.
struct Proxy {
    addr: SocketAddr,
    target: SocketAddr,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            target,
            tasks: Arc::default(),
        };
        proxy.serve(listener);
        proxy
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&mut self, listener: TcpListener) {
        let (target, tasks) = (self.target, self.tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let connection = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                tasks.lock().unwrap().push(connection);
            }
        });
        self.tasks.lock().unwrap().push(accept);
    }

    /// Closes every connection and the listener.
    fn cut(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    /// Listens again on the same port.
    async fn restore(&mut self) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
    }
}

async fn client(endpoints: &[String]) -> Etcd {
    match Etcd::connect(endpoints, None).await {
        Ok(etcd) => etcd,
        Err(e) => panic!("connecting to etcd at {endpoints:?}: {e}"),
    }
}

fn ok<T>(result: Result<T, Error>) -> T {
    result.unwrap_or_else(|e| panic!("{e}"))
}

/// A loopback port nothing listens on.
fn dead_endpoint() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

fn client_addr(etcd: &EtcdProcess) -> SocketAddr {
    etcd.endpoint()
        .trim_start_matches("http://")
        .parse()
        .unwrap()
}

/// The next `count` events of `watch`, across batches; panics on an error
/// or when they do not come within the deadline.
async fn next_events(watch: &mut Watch, count: usize) -> Vec<Event> {
    within(&format!("{count} watch events"), async {
        let mut events = Vec::new();
        while events.len() < count {
            match watch.next().await {
                Some(Ok(batch)) => {
                    assert!(!batch.events.is_empty());
                    assert_eq!(batch.revision, batch.events.last().unwrap().kv.mod_revision);
                    events.extend(batch.events);
                }
                Some(Err(e)) => panic!("the watch failed: {e}"),
                None => panic!("the watch ended"),
            }
        }
        events
    })
    .await
}

/// (kind, key, value, revision) of each event, for comparisons.
fn summary(events: &[Event]) -> Vec<(EventKind, String, String, i64)> {
    events
        .iter()
        .map(|e| {
            (
                e.kind,
                e.kv.key_str().unwrap().to_owned(),
                e.kv.value_str().unwrap().to_owned(),
                e.kv.mod_revision,
            )
        })
        .collect()
}

/// Asserts that nothing more arrives on `watch` for a moment (used after
/// the expected events: no duplicates, nothing from outside the prefix).
async fn assert_quiet(watch: &mut Watch) {
    if let Ok(next) = tokio::time::timeout(Duration::from_millis(300), watch.next()).await {
        panic!("the watch yielded more than expected: {next:?}");
    }
}

#[tokio::test]
async fn keys_and_prefixes() {
    let etcd = EtcdProcess::start().await;
    let client = client(&[etcd.endpoint()]).await;
    let status = ok(client.status().await);
    assert!(status.version.starts_with("3."), "{status:?}");
    assert_ne!(status.leader, 0, "{status:?}");
    eprintln!(
        "etcd: {} (server says {})",
        mesh_testkit::etcd::version(&mesh_testkit::etcd::binary()),
        status.version
    );

    let r1 = ok(client.put("/mesh/a", "1", None).await);
    let r2 = ok(client.put("/mesh/b", "2", None).await);
    let r3 = ok(client.put("/mesh/a", "1bis", None).await);
    ok(client.put("/other", "x", None).await);
    assert!(r1 < r2 && r2 < r3, "{r1} {r2} {r3}");

    let a = ok(client.get("/mesh/a").await).expect("/mesh/a exists");
    assert_eq!(a.value_str(), Some("1bis"));
    assert_eq!(
        (a.create_revision, a.mod_revision, a.version, a.lease),
        (r1, r3, 2, None)
    );
    assert_eq!(ok(client.get("/mesh/missing").await), None);

    let (kvs, revision) = ok(client.get_prefix("/mesh/").await);
    let listed: Vec<(&str, &str, i64)> = kvs
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap(),
                kv.value_str().unwrap(),
                kv.mod_revision,
            )
        })
        .collect();
    assert_eq!(listed, [("/mesh/a", "1bis", r3), ("/mesh/b", "2", r2)]);
    assert!(revision > r3, "read at {revision}, after the put of /other");

    // Binary keys and values go through untouched.
    ok(client.put(b"/mesh/\xff\x00", b"\x00\x01", None).await);
    let binary = ok(client.get(b"/mesh/\xff\x00").await).unwrap();
    assert_eq!(binary.value, b"\x00\x01");

    assert!(ok(client.delete("/mesh/a").await));
    assert!(!ok(client.delete("/mesh/a").await));
    assert_eq!(ok(client.delete_prefix("/mesh/").await), 2);
    assert_eq!(ok(client.get_prefix("/mesh/").await).0, []);
    assert!(ok(client.get("/other").await).is_some());
}

#[tokio::test]
async fn a_listing_larger_than_a_page_is_one_consistent_view() {
    let etcd = EtcdProcess::start().await;
    let client = client(&[etcd.endpoint()]).await;
    // 2,500 keys in 25 transactions (etcd's limit is 128 operations each).
    for chunk in 0..25 {
        let ops = (0..100).map(|i| Op::put(format!("/many/{:05}", chunk * 100 + i), "v", None));
        ok(client.txn(Txn::new().and_then(ops)).await);
    }
    let (kvs, revision) = ok(client.get_prefix("/many/").await);
    assert_eq!(kvs.len(), 2500);
    assert!(kvs.windows(2).all(|w| w[0].key < w[1].key), "sorted by key");
    assert_eq!(revision, ok(client.status().await).revision);
}

#[tokio::test]
async fn a_transaction_commits_only_if_the_prefix_is_unchanged_since_the_revision_read() {
    let etcd = EtcdProcess::start().await;
    let replica = client(&[etcd.endpoint()]).await;
    let other = client(&[etcd.endpoint()]).await;
    ok(replica.put("/cfg/a", "1", None).await);

    // Read, decide, commit: nothing changed in between.
    let (_, read_at) = ok(replica.get_prefix("/cfg/").await);
    let committed = ok(replica
        .commit_if_unchanged(
            "/cfg/",
            read_at,
            [Op::put("/cfg/b", "2", None), Op::put("/cfg/c", "3", None)],
        )
        .await);
    assert!(committed > read_at);
    let b = ok(replica.get("/cfg/b").await).unwrap();
    let c = ok(replica.get("/cfg/c").await).unwrap();
    assert_eq!((b.mod_revision, c.mod_revision), (committed, committed));

    // Read, then someone else writes, then commit: refused, nothing applied.
    let (_, read_at) = ok(replica.get_prefix("/cfg/").await);
    ok(other
        .put("/cfg/a", "changed by another replica", None)
        .await);
    let error = replica
        .commit_if_unchanged("/cfg/", read_at, [Op::put("/cfg/d", "4", None)])
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict, "{error}");
    assert!(
        error
            .to_string()
            .contains(&format!("changed after revision {read_at}")),
        "{error}"
    );
    assert_eq!(ok(replica.get("/cfg/d").await), None);

    // A write outside the prefix does not conflict.
    let (_, read_at) = ok(replica.get_prefix("/cfg/").await);
    ok(other.put("/elsewhere", "x", None).await);
    ok(replica
        .commit_if_unchanged("/cfg/", read_at, [Op::delete("/cfg/c")])
        .await);

    // The general form: conditions, then one branch or the other.
    let response = ok(replica
        .txn(
            Txn::new()
                .when([Compare::value("/cfg/a", CompareOp::Equal, "1")])
                .and_then([Op::put("/cfg/a", "2", None)])
                .or_else([Op::get("/cfg/a"), Op::get_prefix("/cfg/")]),
        )
        .await);
    assert!(!response.succeeded);
    let [OpResponse::Get(a), OpResponse::Get(all)] = response.responses.as_slice() else {
        panic!("{response:?}");
    };
    assert_eq!(a[0].value_str(), Some("changed by another replica"));
    assert_eq!(all.len(), 2);
    let response = ok(replica
        .txn(
            Txn::new()
                .when([
                    Compare::absent("/cfg/new"),
                    Compare::mod_revision("/cfg/b", CompareOp::Equal, b.mod_revision),
                ])
                .and_then([Op::put("/cfg/new", "n", None), Op::delete_prefix("/cfg/b")]),
        )
        .await);
    assert!(response.succeeded);
    assert_eq!(response.responses, [OpResponse::Put, OpResponse::Delete(1)]);
}

#[tokio::test]
async fn a_key_on_a_lease_is_deleted_when_the_lease_expires() {
    let etcd = EtcdProcess::start().await;
    let client = client(&[etcd.endpoint()]).await;
    let lease = ok(client.grant(Duration::from_secs(1)).await);
    assert_eq!(lease.ttl, Duration::from_secs(1));
    ok(client.put("/reg/a", "endpoint", Some(lease.id)).await);
    let kv = ok(client.get("/reg/a").await).unwrap();
    assert_eq!(kv.lease, Some(lease.id));
    let info = ok(client.time_to_live(lease.id).await);
    assert_eq!(info.keys, [b"/reg/a".to_vec()]);
    assert_eq!(info.granted_ttl, lease.ttl);

    let started = Instant::now();
    eventually_ok_async("the key of the expired lease deleted", DEADLINE, || async {
        match client.get("/reg/a").await {
            Ok(None) => Ok(()),
            Ok(Some(kv)) => Err(format!("still there: {kv:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    assert!(started.elapsed() >= Duration::from_millis(500));

    let error = client.keep_alive(lease.id).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
    assert!(error.to_string().contains(&lease.id.to_string()), "{error}");
    let error = client.time_to_live(lease.id).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
    let error = client.revoke(lease.id).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
    let error = client
        .put("/reg/b", "late", Some(lease.id))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
}

#[tokio::test]
async fn keep_alive_keeps_the_key_and_revoke_deletes_it() {
    let etcd = EtcdProcess::start().await;
    let client = client(&[etcd.endpoint()]).await;
    let lease = ok(client.grant(Duration::from_secs(2)).await);
    ok(client.put("/reg/kept", "endpoint", Some(lease.id)).await);
    // Renew at a third of the TTL for two TTLs: the key stays.
    let until = Instant::now() + lease.ttl * 2;
    while Instant::now() < until {
        let ttl = ok(client.keep_alive(lease.id).await);
        assert_eq!(ttl, lease.ttl);
        assert!(ok(client.get("/reg/kept").await).is_some());
        tokio::time::sleep(lease.ttl / 3).await;
    }
    assert!(ok(client.get("/reg/kept").await).is_some());
    ok(client.revoke(lease.id).await);
    assert_eq!(ok(client.get("/reg/kept").await), None);
}

#[tokio::test]
async fn a_watch_sees_puts_and_deletes_in_revision_order() {
    let etcd = EtcdProcess::start().await;
    let client = client(&[etcd.endpoint()]).await;
    ok(client.put("/w/before", "x", None).await);
    let (_, read_at) = ok(client.get_prefix("/w/").await);
    let mut watch = ok(client.watch_prefix("/w/", read_at + 1).await);

    let r1 = ok(client.put("/w/a", "1", None).await);
    let r2 = ok(client.put("/w/b", "2", None).await);
    ok(client.put("/elsewhere", "not watched", None).await);
    ok(client.delete("/w/a").await);
    let txn = ok(client
        .txn(Txn::new().and_then([Op::put("/w/c", "3", None), Op::put("/w/d", "4", None)]))
        .await);
    let r_txn = txn.revision;

    let events = next_events(&mut watch, 5).await;
    let seen = summary(&events);
    let deleted_at = seen[2].3;
    assert_eq!(
        seen,
        [
            (EventKind::Put, "/w/a".into(), "1".into(), r1),
            (EventKind::Put, "/w/b".into(), "2".into(), r2),
            (EventKind::Delete, "/w/a".into(), String::new(), deleted_at),
            (EventKind::Put, "/w/c".into(), "3".into(), r_txn),
            (EventKind::Put, "/w/d".into(), "4".into(), r_txn),
        ]
    );
    assert!(r2 < deleted_at && deleted_at < r_txn);
    assert_eq!(events[3].kv.create_revision, r_txn);
    assert_quiet(&mut watch).await;

    // From 0: only what comes after the watch is created.
    let mut from_now = ok(client.watch_prefix("/w/", 0).await);
    let r = ok(client.put("/w/e", "5", None).await);
    assert_eq!(
        summary(&next_events(&mut from_now, 1).await),
        [(EventKind::Put, "/w/e".into(), "5".into(), r)]
    );
    // From an old revision: the history since then.
    let mut replay = ok(client.watch_prefix("/w/", r1).await);
    let replayed = next_events(&mut replay, 6).await;
    assert_eq!(replayed[0].kv.mod_revision, r1);
    assert_eq!(replayed[5].kv.mod_revision, r);
}

#[tokio::test]
async fn a_watch_resumes_after_etcd_restarts() {
    let mut etcd = EtcdProcess::start().await;
    let client = client(&[etcd.endpoint()]).await;
    let mut watch = ok(client.watch_prefix("/r/", 0).await);
    let r1 = ok(client.put("/r/1", "before", None).await);
    assert_eq!(next_events(&mut watch, 1).await[0].kv.mod_revision, r1);

    etcd.stop();
    etcd.restart().await;
    // Written as soon as etcd is back, whether or not the watch has
    // reconnected yet.
    let r2 = ok(client.put("/r/2", "after", None).await);
    ok(client.delete("/r/1").await);
    let r3 = ok(client.put("/r/3", "after", None).await);

    let events = summary(&next_events(&mut watch, 3).await);
    assert_eq!(
        events[0],
        (EventKind::Put, "/r/2".into(), "after".into(), r2)
    );
    assert_eq!(
        (events[1].0, events[1].1.as_str()),
        (EventKind::Delete, "/r/1")
    );
    assert_eq!(
        events[2],
        (EventKind::Put, "/r/3".into(), "after".into(), r3)
    );
    assert_quiet(&mut watch).await;

    // And once more, with writes after the watch is certainly back.
    etcd.restart().await;
    let r4 = ok(client.put("/r/4", "later", None).await);
    let events = next_events(&mut watch, 1).await;
    assert_eq!(events[0].kv.mod_revision, r4);
}

#[tokio::test]
async fn a_watch_loses_nothing_written_while_its_connection_was_down() {
    let etcd = EtcdProcess::start().await;
    let writer = client(&[etcd.endpoint()]).await;
    let mut proxy = Proxy::start(client_addr(&etcd)).await;
    let watcher = client(&[proxy.endpoint()]).await;
    let mut watch = ok(watcher.watch_prefix("/p/", 0).await);
    let r1 = ok(writer.put("/p/1", "seen live", None).await);
    assert_eq!(next_events(&mut watch, 1).await[0].kv.mod_revision, r1);

    proxy.cut();
    let r2 = ok(writer.put("/p/2", "written while cut", None).await);
    ok(writer.delete("/p/1").await);
    let r3 = ok(writer.put("/p/3", "written while cut", None).await);
    // The watcher's own calls fail meanwhile, naming the endpoint.
    let error = watcher.get("/p/2").await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains(&proxy.endpoint()), "{error}");

    proxy.restore().await;
    let events = summary(&next_events(&mut watch, 3).await);
    assert_eq!(events[0].3, r2);
    assert_eq!(
        (events[1].0, events[1].1.as_str()),
        (EventKind::Delete, "/p/1")
    );
    assert_eq!(events[2].3, r3);
    assert_quiet(&mut watch).await;
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_says_so() {
    let etcd = EtcdProcess::start().await;
    let client = client(&[etcd.endpoint()]).await;
    let r1 = ok(client.put("/c/k", "1", None).await);
    ok(client.put("/c/k", "2", None).await);
    let r3 = ok(client.put("/c/k", "3", None).await);
    ok(client.compact(r3).await);

    let error = match client.watch_prefix("/c/", r1).await {
        Err(error) => error,
        Ok(mut watch) => match within("the compaction error", watch.next()).await {
            Some(Err(error)) => error,
            other => panic!("expected the compaction error, got {other:?}"),
        },
    };
    assert_eq!(error.kind(), ErrorKind::Compacted, "{error}");
    assert_eq!(error.compact_revision(), Some(r3));
    assert!(error.to_string().contains("list the keys again"), "{error}");

    // What the message says to do works.
    let (kvs, read_at) = ok(client.get_prefix("/c/").await);
    assert_eq!(kvs[0].value_str(), Some("3"));
    let mut watch = ok(client.watch_prefix("/c/", read_at + 1).await);
    let r4 = ok(client.put("/c/k", "4", None).await);
    assert_eq!(next_events(&mut watch, 1).await[0].kv.mod_revision, r4);
}

#[tokio::test]
async fn with_etcd_down_calls_fail_fast_naming_the_endpoint() {
    let mut etcd = EtcdProcess::start().await;
    let endpoint = etcd.endpoint();
    let client = client(std::slice::from_ref(&endpoint)).await;
    ok(client.put("/k", "v", None).await);
    etcd.stop();

    let started = Instant::now();
    let error = client.get("/k").await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    let message = error.to_string();
    assert!(message.contains(&endpoint), "{message}");
    assert!(message.contains("check that etcd runs"), "{message}");
    eprintln!("etcd down: {message}");

    let started = Instant::now();
    let error = client.put("/k", "v2", None).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains(&endpoint), "{error}");

    let error = Etcd::connect(std::slice::from_ref(&endpoint), None)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains(&endpoint), "{error}");

    // Back up: the same client works again.
    etcd.restart().await;
    assert_eq!(ok(client.get("/k").await).unwrap().value_str(), Some("v"));
}

#[tokio::test]
async fn an_endpoint_that_never_answers_costs_the_request_timeout() {
    // Accepts TCP connections and never says anything.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((connection, _)) = silent.accept().await {
            connections.push(connection);
        }
    });
    let mut options = EtcdOptions::default();
    options.request_timeout = Duration::from_millis(500);
    let started = Instant::now();
    let error = Etcd::connect_with(std::slice::from_ref(&endpoint), None, options)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    assert!(error.to_string().contains(&endpoint), "{error}");
    assert!(error.to_string().contains("no answer"), "{error}");
    held.abort();
}

#[tokio::test]
async fn calls_fail_over_to_the_next_endpoint() {
    let etcd = EtcdProcess::start().await;
    let (dead, live) = (dead_endpoint(), etcd.endpoint());
    let client = client(&[dead.clone(), live.clone()]).await;
    assert_eq!(client.endpoints(), [dead.as_str(), live.as_str()]);
    assert_eq!(ok(client.status().await).endpoint, live);
    let revision = ok(client.put("/f/k", "v", None).await);
    assert_eq!(ok(client.get("/f/k").await).unwrap().mod_revision, revision);
    let mut watch = ok(client.watch_prefix("/f/", 0).await);
    let r = ok(client.put("/f/k", "w", None).await);
    assert_eq!(next_events(&mut watch, 1).await[0].kv.mod_revision, r);

    // Every endpoint down: each is named.
    let (dead1, dead2) = (dead_endpoint(), dead_endpoint());
    let error = Etcd::connect(&[dead1.clone(), dead2.clone()], None)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
    let message = error.to_string();
    assert!(
        message.contains("no etcd endpoint answered status"),
        "{message}"
    );
    assert!(
        message.contains(&dead1) && message.contains(&dead2),
        "{message}"
    );
}

#[tokio::test]
async fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("etcd test CA");
    let server = ca.leaf_for(&["127.0.0.1"]);
    let replica = ca.leaf_for(&["mesh-control"]);
    let ca_file = write_pem(dir.path(), "ca.pem", &ca.pem);
    let server_tls = ServerTls {
        cert: write_pem(dir.path(), "server.pem", &server.chain),
        key: write_pem(dir.path(), "server-key.pem", &server.key),
        client_ca: ca_file.clone(),
    };
    let tls = EtcdTls {
        ca: ca_file.clone(),
        cert: Some(write_pem(dir.path(), "client.pem", &replica.chain)),
        key: Some(write_pem(dir.path(), "client-key.pem", &replica.key)),
    };
    let etcd = EtcdProcess::start_tls(server_tls).await;
    let endpoint = etcd.endpoint();
    assert!(endpoint.starts_with("https://"));

    let client = ok(Etcd::connect(std::slice::from_ref(&endpoint), Some(tls.clone())).await);
    let revision = ok(client.put("/tls/k", "secret", None).await);
    assert_eq!(
        ok(client.get("/tls/k").await).unwrap().mod_revision,
        revision
    );
    let mut watch = ok(client.watch_prefix("/tls/", 0).await);
    let r = ok(client.put("/tls/k", "again", None).await);
    assert_eq!(next_events(&mut watch, 1).await[0].kv.mod_revision, r);

    // A CA that did not issue etcd's certificate.
    let foreign = TestCa::new("another CA");
    let wrong_ca = EtcdTls {
        ca: write_pem(dir.path(), "foreign.pem", &foreign.pem),
        ..tls.clone()
    };
    let error = Etcd::connect(std::slice::from_ref(&endpoint), Some(wrong_ca))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Tls, "{error}");
    assert!(
        error
            .to_string()
            .contains("certificate verification failed"),
        "{error}"
    );
    assert!(error.to_string().contains(&endpoint), "{error}");

    // No client certificate: etcd refuses the connection.
    let anonymous = EtcdTls {
        ca: ca_file.clone(),
        cert: None,
        key: None,
    };
    let error = Etcd::connect(std::slice::from_ref(&endpoint), Some(anonymous))
        .await
        .unwrap_err();
    // With TLS 1.3 the refusal comes after the client's handshake is done:
    // an alert when it is read in time (Tls), else a closed connection
    // (Unavailable). Either way the message points at the certificate.
    assert!(
        matches!(error.kind(), ErrorKind::Tls | ErrorKind::Unavailable),
        "{error}"
    );
    assert!(error.to_string().contains("--client-cert-auth"), "{error}");
    eprintln!("without a client certificate: {error}");

    // Settings that cannot work are refused before dialling.
    let error = Etcd::connect(&[endpoint.replace("https", "http")], Some(tls.clone()))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    let error = Etcd::connect(std::slice::from_ref(&endpoint), None)
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Config, "{error}");
    let missing = EtcdTls {
        ca: dir.path().join("missing.pem"),
        ..tls
    };
    let error = Etcd::connect(std::slice::from_ref(&endpoint), Some(missing))
        .await
        .unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Tls, "{error}");
    assert!(error.to_string().contains("missing.pem"), "{error}");
}

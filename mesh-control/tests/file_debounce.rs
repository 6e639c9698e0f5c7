//! The config watcher's debounce, on real files and real inotify: a save is
//! read at once (the leading edge) and what follows within the window once
//! more when it is quiet (the trailing edge); a read of a file caught
//! mid-save (broken, truncated) is never shown, unless the trailing read
//! finds it still broken, which is then reported at its `file:line` with
//! the last good config kept.
//!
//! What a client sees is recorded from a raw ADS stream (CDS and EDS of
//! `catalog`, every response ACKed): a save must reach it with no state in
//! between — no cluster gone, no endpoint port that no save wrote.

use std::path::Path;
use std::time::Duration;

use envoy_types::pb::envoy::config::core::v3::address;
use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
use mesh_control::ServerHandle;
use mesh_core::xds;
use mesh_testkit::ads::{AdsClient, node};
use mesh_testkit::wait::{DEADLINE, eventually_ok, within};
use notify::Watcher;
use prost::Message;
use serde_json::Value;
use tokio::sync::mpsc;

const CLUSTER: &str = "outbound|80||catalog.shop.svc.cluster.local";
const FILE: &str = "mesh.yaml";

/// The mesh: `catalog`, one static endpoint on `port`.
fn mesh(port: u16) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  resolution: STATIC
  ports:
  - {{number: 80, name: http, protocol: HTTP}}
  endpoints:
  - address: 127.0.0.1
    ports: {{http: {port}}}
"
    )
}

/// [`mesh`] with a YAML syntax error at line 7 (an unclosed flow mapping).
fn broken(port: u16) -> String {
    mesh(port).replace(
        "  - {number: 80, name: http, protocol: HTTP}",
        "  - {number: 80, name: http, protocol: HTTP",
    )
}

/// Replaces the config file the way editors do: write aside, then rename.
fn save_by_rename(dir: &Path, yaml: &str) {
    let tmp = dir.join(format!(".{FILE}.tmp"));
    std::fs::write(&tmp, yaml).expect("write the temporary file");
    std::fs::rename(&tmp, dir.join(FILE)).expect("rename it over the config");
}

/// Rewrites the config file in place (truncate, write, close).
fn save_in_place(dir: &Path, yaml: &str) {
    std::fs::write(dir.join(FILE), yaml).expect("write the config");
}

/// mesh-control on `dir` with a file debounce window of `window`.
async fn start(dir: &Path, window: Duration) -> ServerHandle {
    mesh_control::Server::builder()
        .config_dir(dir)
        .debounce(window)
        .start()
        .await
        .expect("start mesh-control")
}

/// What one response told the client.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Push {
    /// CDS: whether catalog's cluster is in it.
    Clusters { catalog: bool },
    /// EDS: the ports of catalog's endpoints.
    Ports(Vec<u32>),
}

/// A client of catalog: subscribed to every cluster and to catalog's
/// endpoints, recording what each response says.
struct Client {
    ads: AdsClient,
    seen: Vec<Push>,
}

impl Client {
    async fn connect(server: &ServerHandle) -> Client {
        let ads = AdsClient::connect(server.xds_addr(), node("watcher-test").build()).await;
        ads.subscribe(xds::CLUSTER_TYPE, &[]).await;
        ads.subscribe(xds::ENDPOINT_TYPE, &[CLUSTER]).await;
        Client {
            ads,
            seen: Vec::new(),
        }
    }

    /// Receives, records and ACKs responses until catalog's endpoints are
    /// on `port`.
    async fn until_port(&mut self, port: u16) {
        within(&format!("catalog's endpoint on port {port}"), async {
            loop {
                let push = self.next().await;
                if push == Push::Ports(vec![u32::from(port)]) {
                    return;
                }
            }
        })
        .await;
    }

    async fn next(&mut self) -> Push {
        let response = self.ads.recv().await;
        let (names, push): (&[&str], Push) = match response.type_url.as_str() {
            xds::CLUSTER_TYPE => {
                let catalog = response.resources.iter().any(|any| {
                    envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(
                        any.value.as_slice(),
                    )
                    .is_ok_and(|c| c.name == CLUSTER)
                });
                (&[], Push::Clusters { catalog })
            }
            xds::ENDPOINT_TYPE => (&[CLUSTER], Push::Ports(ports(&response.resources))),
            other => panic!("a response of {other}, which the client did not ask for"),
        };
        self.ads
            .send(
                &response.type_url,
                names,
                &response.version_info,
                &response.nonce,
                None,
            )
            .await;
        self.seen.push(push.clone());
        push
    }

    /// Asserts that every response so far showed catalog's cluster, and
    /// endpoints only on the ports of `saves`, in the order they were saved.
    fn saw_only(&self, saves: &[u16]) {
        let mut next_save = 0;
        for push in &self.seen {
            match push {
                Push::Clusters { catalog } => assert!(
                    catalog,
                    "a client was sent the cluster list without catalog: a save was read \
                     mid-write and applied ({:?})",
                    self.seen
                ),
                Push::Ports(ports) => {
                    let [port] = ports.as_slice() else {
                        panic!(
                            "a client was sent catalog's endpoints as {ports:?}, which no save \
                             wrote ({:?})",
                            self.seen
                        );
                    };
                    let Some(i) = saves[next_save..]
                        .iter()
                        .position(|p| u32::from(*p) == *port)
                    else {
                        panic!(
                            "a client was sent port {port}, which no save wrote at that point \
                             (saves {saves:?}, sent {:?})",
                            self.seen
                        );
                    };
                    next_save += i;
                }
            }
        }
    }

    /// How many times catalog's endpoints changed for the client.
    fn port_changes(&self) -> usize {
        let mut ports: Vec<&Vec<u32>> = self
            .seen
            .iter()
            .filter_map(|p| match p {
                Push::Ports(ports) => Some(ports),
                Push::Clusters { .. } => None,
            })
            .collect();
        ports.dedup();
        ports.len().saturating_sub(1)
    }
}

/// The ports of the endpoints of the first ClusterLoadAssignment.
fn ports(resources: &[xds::Any]) -> Vec<u32> {
    let Some(cla) = resources
        .iter()
        .find_map(|any| ClusterLoadAssignment::decode(any.value.as_slice()).ok())
    else {
        return Vec::new();
    };
    cla.endpoints
        .iter()
        .flat_map(|l| l.lb_endpoints.iter())
        .filter_map(|e| match &e.host_identifier {
            Some(HostIdentifier::Endpoint(endpoint)) => endpoint.address.as_ref(),
            _ => None,
        })
        .filter_map(|a| match &a.address {
            Some(address::Address::SocketAddress(s)) => match s.port_specifier {
                Some(PortSpecifier::PortValue(port)) => Some(port),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The counters an operator sees of the config: rejections reported,
/// reloads applied, and what `/status` lists.
struct Reported {
    rejections: u64,
    reloads: u64,
    rejected: Vec<Value>,
    diagnostics: Vec<Value>,
}

fn reported(server: &ServerHandle) -> Reported {
    let status = server.status();
    let counter = |name: &str| {
        status["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("/status has no counter {name}: {status}"))
    };
    Reported {
        rejections: counter("config_rejections"),
        reloads: counter("reloads"),
        rejected: status["rejected"].as_array().cloned().unwrap_or_default(),
        diagnostics: status["diagnostics"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    }
}

/// `/metrics` as a Prometheus scraper reads it: the value of `name`.
async fn metric(server: &ServerHandle, name: &str) -> f64 {
    let (status, text) = mesh_testkit::http::get_text(server.admin_addr(), "/metrics").await;
    assert_eq!(status, 200, "/metrics: {text}");
    text.lines()
        .find_map(|line| {
            let (n, value) = line.split_once(' ')?;
            (n == name).then(|| value.trim().parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("/metrics has no {name}:\n{text}"))
}

/// What the test's own watcher sees of the config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// A save finished: closed after writing, or renamed into place.
    Saved,
    /// Opened (by the test's writes, or by mesh-control's reads).
    Opened,
}

/// The test's own inotify watch of the config directory: how it sees
/// mesh-control read the file (inotify reports opens, not reads).
struct Reads {
    rx: mpsc::UnboundedReceiver<Seen>,
    _watcher: notify::RecommendedWatcher,
}

impl Reads {
    fn watch(dir: &Path) -> Reads {
        use notify::EventKind;
        use notify::event::{AccessKind, AccessMode, ModifyKind, RenameMode};
        let (tx, rx) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if !event
                    .paths
                    .iter()
                    .any(|p| p.file_name().is_some_and(|n| n == FILE))
                {
                    return;
                }
                let seen = match event.kind {
                    EventKind::Access(AccessKind::Close(AccessMode::Write))
                    | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => Seen::Saved,
                    EventKind::Access(AccessKind::Open(_)) => Seen::Opened,
                    _ => return,
                };
                let _ = tx.send(seen);
            })
            .expect("an inotify watcher");
        watcher
            .watch(dir, notify::RecursiveMode::NonRecursive)
            .expect("watch the config directory");
        Reads {
            rx,
            _watcher: watcher,
        }
    }

    /// Waits until the config file, saved since the last call, has been
    /// opened after the save finished: mesh-control's read of it.
    async fn read_after_save(&mut self) {
        within("mesh-control reading the saved config file", async {
            let mut saved = false;
            loop {
                match self.rx.recv().await.expect("the test's watcher stopped") {
                    Seen::Saved => saved = true,
                    Seen::Opened if saved => return,
                    Seen::Opened => {}
                }
            }
        })
        .await;
    }

    /// Forgets what was seen so far.
    fn drain(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }
}

/// Longer than any wait of a test ([`DEADLINE`]): with it, a save applied
/// at all was applied by the leading read.
const NEVER: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn a_save_in_place_is_applied_at_once_with_nothing_in_between() {
    let dir = tempfile::tempdir().unwrap();
    save_by_rename(dir.path(), &mesh(9001));
    let server = start(dir.path(), NEVER).await;
    let mut client = Client::connect(&server).await;
    client.until_port(9001).await;
    let reloads = reported(&server).reloads;

    // Truncate, write, close: read once the file is closed, whole.
    save_in_place(dir.path(), &mesh(9002));
    client.until_port(9002).await;

    client.saw_only(&[9001, 9002]);
    assert_eq!(
        reported(&server).reloads,
        reloads + 1,
        "one save, one reload applied"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_save_by_rename_is_applied_at_once_with_nothing_in_between() {
    let dir = tempfile::tempdir().unwrap();
    save_by_rename(dir.path(), &mesh(9001));
    let server = start(dir.path(), NEVER).await;
    let mut client = Client::connect(&server).await;
    client.until_port(9001).await;
    let reloads = reported(&server).reloads;

    // The temporary file's events only open the window; the rename leads.
    save_by_rename(dir.path(), &mesh(9002));
    client.until_port(9002).await;

    client.saw_only(&[9001, 9002]);
    assert_eq!(
        reported(&server).reloads,
        reloads + 1,
        "one save, one reload applied"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_saves_ends_in_the_last_one_after_one_trailing_read() {
    let dir = tempfile::tempdir().unwrap();
    save_by_rename(dir.path(), &mesh(9001));
    // Long enough that the burst below, written in a tight loop, falls in
    // one window even on a loaded machine.
    let server = start(dir.path(), Duration::from_millis(500)).await;
    let mut client = Client::connect(&server).await;
    client.until_port(9001).await;
    let reloads = reported(&server).reloads;

    let burst = [9002, 9003, 9004, 9005, 9006];
    for port in burst {
        save_by_rename(dir.path(), &mesh(port));
    }
    client.until_port(9006).await;

    let mut saves = vec![9001];
    saves.extend(burst);
    client.saw_only(&saves);
    assert!(
        client.port_changes() <= 2,
        "a burst is read at most twice (leading, trailing), so a client sees at most two \
         changes: {:?}",
        client.seen
    );
    let applied = reported(&server).reloads - reloads;
    assert!(
        (1..=2).contains(&applied),
        "{applied} reloads applied for one burst: at most the leading and the trailing read"
    );
    server.shutdown().await;
}

/// Long enough that the second step of a save (written as soon as the test
/// sees the first one read) falls in the window even on a loaded machine.
const STEPS_WINDOW: Duration = Duration::from_secs(3);

#[tokio::test]
async fn a_save_in_two_steps_never_reports_the_first() {
    let dir = tempfile::tempdir().unwrap();
    save_by_rename(dir.path(), &mesh(9001));
    let server = start(dir.path(), STEPS_WINDOW).await;
    let mut client = Client::connect(&server).await;
    client.until_port(9001).await;
    let mut reads = Reads::watch(dir.path());
    reads.drain();

    // Step one: the file truncated mid-save, half written, closed.
    let whole = mesh(9002);
    save_in_place(dir.path(), &whole[..whole.len() / 2]);
    // mesh-control read it (the leading read): nothing may show.
    reads.read_after_save().await;
    let now = reported(&server);
    assert_eq!(
        (now.rejections, now.rejected.len(), now.diagnostics.len()),
        (0, 0, 0),
        "a half-written file was reported: {:?} {:?}",
        now.rejected,
        now.diagnostics
    );
    // Step two, within the window: the rest.
    save_in_place(dir.path(), &whole);
    client.until_port(9002).await;

    client.saw_only(&[9001, 9002]);
    let after = reported(&server);
    assert_eq!(
        (
            after.rejections,
            after.rejected.len(),
            after.diagnostics.len()
        ),
        (0, 0, 0),
        "the first step of a save was reported: {:?} {:?}",
        after.rejected,
        after.diagnostics
    );
    assert_eq!(
        metric(&server, "mesh_control_config_rejections_total").await,
        0.0
    );
    assert_eq!(
        metric(&server, "mesh_control_config_rejected_resources").await,
        0.0
    );
    server.shutdown().await;
}

#[tokio::test]
async fn a_save_still_broken_at_the_trailing_read_is_reported_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    save_by_rename(dir.path(), &mesh(9001));
    let server = start(dir.path(), STEPS_WINDOW).await;
    let mut client = Client::connect(&server).await;
    client.until_port(9001).await;
    let version = server.version();
    let mut reads = Reads::watch(dir.path());
    reads.drain();

    save_by_rename(dir.path(), &broken(9002));
    // The leading read finds it broken and holds it, without a trace...
    reads.read_after_save().await;
    let now = reported(&server);
    assert_eq!(
        (now.rejections, now.rejected.len(), now.diagnostics.len()),
        (0, 0, 0),
        "reported before the trailing read: {:?} {:?}",
        now.rejected,
        now.diagnostics
    );

    // ... and the trailing read, finding it still broken, reports it where
    // `mesh-control check` does.
    let expected =
        mesh_control::config::check_dir(dir.path(), &mesh_control::config::MeshOptions::default());
    let first = expected.first().expect("check finds the syntax error");
    let at = format!("{}:{}", first.file.display(), first.line);
    let rejected = eventually_ok("the broken save reported", DEADLINE, || {
        let now = reported(&server);
        match now.rejected.first() {
            // Listed in /status, then logged and counted.
            Some(r) if now.rejections > 0 => Ok(r.clone()),
            _ => Err(format!(
                "{} reported, rejected {:?}, diagnostics {:?}",
                now.rejections, now.rejected, now.diagnostics
            )),
        }
    })
    .await;
    assert_eq!(rejected["at"], at.as_str(), "{rejected}");
    assert!(
        reported(&server)
            .diagnostics
            .iter()
            .any(|d| d.as_str().is_some_and(|d| d.starts_with(&at))),
        "/status lists the problem at {at}"
    );
    assert_eq!(reported(&server).rejections, 1, "reported once");
    assert_eq!(
        metric(&server, "mesh_control_config_rejections_total").await,
        1.0
    );
    assert_eq!(server.version(), version, "nothing was published");

    // The last good config stayed in force: the next push a client gets
    // is the next valid save.
    save_by_rename(dir.path(), &mesh(9003));
    client.until_port(9003).await;
    client.saw_only(&[9001, 9003]);
    server.shutdown().await;
}

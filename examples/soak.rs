//! Soak: the mesh under steady load, config changes and registration churn.
//!
//! ```text
//! cargo run --example soak -- 60s     # or 2m, or plain seconds (90)
//! ```
//!
//! One process, real loopback sockets. It starts mesh-control (embedded,
//! its config directory a temp dir holding one Istio YAML file for the
//! service `echo` in namespace `soak`: subsets v1 and v2 by the label
//! `version`, a VirtualService splitting between them, no retry policy of
//! its own, so Istio's default applies), two servers of each subset served
//! and registered with `proxyless::serve`, and two client workloads (each its
//! own `XdsClient`) calling `http://echo/echo` through `proxyless::Client`
//! from 8 tasks (8 requests in flight, each task one after another), until
//! the duration is up. Meanwhile:
//!
//! - every second the VirtualService's weights are rewritten on disk,
//!   cycling 100/0 → 50/50 → 0/100 → 50/50 (always valid), and the run
//!   waits until both clients apply them;
//! - every 2 s one server is replaced, oldest first: a new one of the same
//!   subset starts and registers, then the old one stops gracefully
//!   (`Serving::shutdown`: deregister, then drain). Each subset always has
//!   at least two registered servers.
//!
//! Every 10 s it prints the requests, failures and answers by version so
//! far, the live heap and the RSS. It passes when no request failed
//! (every response a 200 from a server of `echo`, naming its subset and
//! instance), no config change was rejected or left unapplied, no server
//! failed to start or stop, and the live heap at the end is at most the
//! live heap at the half-way mark + 1 MiB. Live heap is bytes allocated
//! minus bytes freed, counted by a counting global allocator
//! (`stats_alloc`), taken at each mark as the minimum of ten samples over
//! the second before it, with the load still running (the samples at
//! quiet instants between allocation bursts). Exit code 1 on any failure,
//! 2 on a bad argument.

use std::alloc::System;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use proxyless::xds::ClientOptions;
use proxyless::{Bootstrap, Client, Registration, Serving, XdsClient};
use stats_alloc::{INSTRUMENTED_SYSTEM, StatsAlloc};
use tokio::time::Instant;
use tower::ServiceExt;

/// Counts every allocation and free of the process.
#[global_allocator]
static HEAP: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const NAMESPACE: &str = "soak";
const SERVICE: &str = "echo";
const URL: &str = "http://echo/echo";
const ROUTE_CONFIG: &str = "echo.soak.svc.cluster.local:80";
const CONFIG_FILE: &str = "echo.yaml";
const VERSIONS: [&str; 2] = ["v1", "v2"];
/// Servers of each subset at every moment (one more for a moment during a
/// replacement).
const SERVERS_PER_SUBSET: usize = 2;
/// Client workloads, each with its own xDS client.
const CLIENTS: usize = 2;
/// Requests in flight, spread over the clients.
const IN_FLIGHT: usize = 8;
/// The split weights (v1, v2), one step per config change.
const WEIGHTS: [(u32, u32); 4] = [(100, 0), (50, 50), (0, 100), (50, 50)];
const CONFIG_EVERY: Duration = Duration::from_secs(1);
const CHURN_EVERY: Duration = Duration::from_secs(2);
/// Replacements start half-way between two config changes.
const CHURN_OFFSET: Duration = Duration::from_millis(500);
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// A request that takes longer than this has failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a config change may take to reach both clients.
const APPLY_TIMEOUT: Duration = Duration::from_millis(900);
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Heap samples per mark, spread over the second before it.
const HEAP_SAMPLES: u32 = 10;
const HEAP_WINDOW: Duration = Duration::from_secs(1);
/// How much the live heap may grow from the half-way mark to the end.
const HEAP_SLACK: u64 = 1 << 20;
const MIN_DURATION: Duration = Duration::from_secs(4);
/// Failures printed in full (all are counted).
const FAILURES_SHOWN: usize = 20;
/// Server lifecycles kept for the failure log.
const LIFECYCLES_KEPT: usize = 16;

#[tokio::main]
async fn main() {
    let arg = std::env::args().nth(1);
    let Some(duration) = arg
        .as_deref()
        .map_or(Some(Duration::from_secs(60)), parse_duration)
    else {
        eprintln!(
            "usage: cargo run --example soak -- DURATION   (60s, 2m or plain seconds; at least {}s)",
            MIN_DURATION.as_secs()
        );
        std::process::exit(2);
    };
    if duration < MIN_DURATION {
        eprintln!(
            "soak: the duration must be at least {}s (the heap marks need a second each)",
            MIN_DURATION.as_secs()
        );
        std::process::exit(2);
    }
    match run(duration).await {
        Ok(()) => println!("soak: PASS"),
        Err(e) => {
            eprintln!("soak: FAIL: {e}");
            std::process::exit(1);
        }
    }
}

/// `60s`, `2m` or `60` (seconds).
fn parse_duration(arg: &str) -> Option<Duration> {
    let arg = arg.trim();
    let (number, unit) = match arg.strip_suffix('m') {
        Some(minutes) => (minutes, 60),
        None => (arg.strip_suffix('s').unwrap_or(arg), 1),
    };
    let n: u64 = number.parse().ok()?;
    Some(Duration::from_secs(n.checked_mul(unit)?))
}

async fn run(duration: Duration) -> Result<(), BoxError> {
    // The control server on a config directory of our own.
    let dir = tempfile::tempdir()?;
    let config_dir = dir.path().join("mesh");
    std::fs::create_dir(&config_dir)?;
    write_config(&config_dir, WEIGHTS[0])?;
    let control = proxyless::control::Server::builder()
        .config_dir(&config_dir)
        .start()
        .await?;
    if let Some(rejected) = control.rejected().first() {
        return Err(format!("the initial config was rejected: {rejected}").into());
    }
    let admin = control.admin_addr().to_string();
    println!(
        "soak: {}s; mesh-control xDS {} admin {admin}; config {}",
        duration.as_secs(),
        control.xds_addr(),
        config_dir.join(CONFIG_FILE).display()
    );

    let stats = Arc::new(Stats::default());

    // The servers: two per subset.
    let mut fleet = Fleet {
        admin,
        next: 0,
        servers: Vec::new(),
    };
    for _ in 0..SERVERS_PER_SUBSET {
        for version in VERSIONS {
            let server = fleet.start(version, &stats).await?;
            fleet.servers.push(server);
        }
    }

    // The clients: their own xDS clients, warmed up.
    let mut xds_clients = Vec::new();
    for i in 0..CLIENTS {
        let bootstrap =
            Bootstrap::from_json(&control.bootstrap_json(&format!("soak-client-{i}"), NAMESPACE))?;
        let options = ClientOptions::default()
            .listeners([SERVICE])
            .cache_file(dir.path().join(format!("soak-client-{i}.xds")));
        xds_clients.push(XdsClient::start_with(bootstrap, options));
    }
    for xds in &xds_clients {
        tokio::time::timeout(SETUP_TIMEOUT, xds.wait_for_listener(SERVICE))
            .await
            .map_err(|_| "the clients did not get the echo listener within 10 s")??;
        wait_until("every subset's endpoints reach the clients", || {
            VERSIONS
                .iter()
                .all(|v| endpoint_count(xds, v) == SERVERS_PER_SUBSET)
                && split_weights(xds) == [WEIGHTS[0].0, WEIGHTS[0].1]
        })
        .await?;
    }
    let clients: Vec<Client> = xds_clients.iter().cloned().map(Client::new).collect();
    for client in &clients {
        call(client).await.map_err(|e| format!("warm-up: {e}"))?;
    }

    // The load, the config changes, the churn and the reports, until the end.
    let start = Instant::now();
    let end = start + duration;
    let mut load = tokio::task::JoinSet::new();
    for i in 0..IN_FLIGHT {
        let client = clients[i % CLIENTS].clone();
        let stats = Arc::clone(&stats);
        load.spawn(async move {
            while Instant::now() < end {
                let outcome = tokio::time::timeout(REQUEST_TIMEOUT, call(&client))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {REQUEST_TIMEOUT:?}")));
                stats.record(start, outcome);
            }
        });
    }
    let configs = tokio::spawn(change_config(
        config_dir.clone(),
        xds_clients.clone(),
        Arc::clone(&stats),
        start,
        end,
    ));
    let churn = tokio::spawn(churn(fleet, Arc::clone(&stats), start, end));
    let reports = tokio::spawn(report(Arc::clone(&stats), start, end));

    // The heap at the half-way mark and at the end, load running.
    let half = heap_at(start + duration / 2).await;
    let last = heap_at(end).await;

    while let Some(done) = load.join_next().await {
        done?;
    }
    configs.await?;
    let fleet = churn.await?;
    reports.await?;
    // What the clients' connection pools remember: an endpoint per
    // (cluster, address) they sent to; those of stopped servers should go.
    let pools: Vec<String> = clients
        .iter()
        .map(|c| {
            let pool = c.pool();
            let known = format!("{pool:?}");
            let known = known
                .rsplit("endpoints: ")
                .next()
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .unwrap_or("?")
                .to_owned();
            format!(
                "{known} endpoints known, {} with open connections",
                pool.open_endpoints()
            )
        })
        .collect();
    for server in fleet.servers {
        if let Err(e) = server.stop(&stats).await {
            stats.problem(e);
        }
    }
    drop(clients);
    drop(xds_clients);
    let status = control.status();
    control.shutdown().await;

    // The verdict.
    let elapsed = start.elapsed().as_secs_f64().min(duration.as_secs_f64());
    let requests = stats.requests.load(Ordering::Relaxed);
    let failures = stats.failures.load(Ordering::Relaxed);
    println!(
        "\nsoak: {requests} requests in {:.0} s ({:.0}/s), {failures} failed; v1 {}, v2 {}",
        elapsed,
        requests as f64 / elapsed,
        stats.v1.load(Ordering::Relaxed),
        stats.v2.load(Ordering::Relaxed)
    );
    println!(
        "   churn: {} servers started, {} stopped (slowest start {:.1} ms, slowest graceful stop {:.1} ms); \
         {} requests reached a server after its deregistration had begun",
        stats.started.load(Ordering::Relaxed),
        stats.stopped.load(Ordering::Relaxed),
        stats.slowest_start_us.load(Ordering::Relaxed) as f64 / 1e3,
        stats.slowest_stop_us.load(Ordering::Relaxed) as f64 / 1e3,
        stats.after_deregistration.load(Ordering::Relaxed)
    );
    println!(
        "   config: {} weight changes, each applied by both clients (slowest {:.1} ms); \
         mesh-control at config version {}, {} NACKs",
        stats.config_changes.load(Ordering::Relaxed),
        stats.slowest_apply_us.load(Ordering::Relaxed) as f64 / 1e3,
        status["version"],
        status["counters"]["nacks"]
    );
    println!(
        "   client pools at the end ({} servers up): {}",
        VERSIONS.len() * SERVERS_PER_SUBSET,
        pools.join("; ")
    );
    let growth = last.heap as i64 - half.heap as i64;
    println!(
        "   heap (live bytes, min of {HEAP_SAMPLES} samples in the second before the mark): \
         half-way {} MiB, end {} MiB ({}{} MiB; allowed +1 MiB); RSS half-way {} MiB, end {} MiB",
        mib(half.heap),
        mib(last.heap),
        if growth >= 0 { "+" } else { "-" },
        mib(growth.unsigned_abs()),
        mib(half.rss),
        mib(last.rss)
    );

    let mut verdict = Vec::new();
    if requests == 0 {
        verdict.push("no request was sent".to_owned());
    }
    if failures > 0 {
        let log = stats
            .failure_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        println!(
            "\n== failed requests ({failures}; the first {} shown)",
            log.len()
        );
        for line in log.iter() {
            println!("   {line}");
        }
        verdict.push(format!("{failures} of {requests} requests failed"));
    }
    let problems = stats
        .problems
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if !problems.is_empty() {
        println!("\n== churn and config problems ({})", problems.len());
        for line in problems.iter() {
            println!("   {line}");
        }
        verdict.push(format!("{} churn or config problems", problems.len()));
    }
    if last.heap > half.heap + HEAP_SLACK {
        verdict.push(format!(
            "the live heap grew by {} MiB from the half-way mark to the end (more than 1 MiB): a leak?",
            mib(last.heap - half.heap)
        ));
    }
    if verdict.is_empty() {
        Ok(())
    } else {
        Err(verdict.join("; ").into())
    }
}

/// One call: `GET http://echo/echo`, a 200 whose body names a subset and an
/// instance of it (`v1 echo-v1-3`). Returns the subset.
async fn call(client: &Client) -> Result<&'static str, String> {
    let request = http::Request::get(URL)
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("building the request: {e}"))?;
    let response = client
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| format!("{:?}: {e}", e.kind()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{status}, then reading the body failed: {e}"))?
        .to_bytes();
    let body = String::from_utf8_lossy(&body);
    if status != http::StatusCode::OK {
        return Err(format!("{status}: {}", body.trim()));
    }
    let (version, instance) = body.split_once(' ').unwrap_or_default();
    match VERSIONS.iter().find(|v| **v == version) {
        Some(v) if instance.starts_with(&format!("{SERVICE}-{v}-")) => Ok(v),
        _ => Err(format!("200 with an unexpected body {body:?}")),
    }
}

/// What the run counts; shared by every task.
#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    failures: AtomicU64,
    v1: AtomicU64,
    v2: AtomicU64,
    /// The first failures, with the time they happened.
    failure_log: Mutex<Vec<String>>,
    /// Churn and config steps that went wrong.
    problems: Mutex<Vec<String>>,
    started: AtomicU64,
    stopped: AtomicU64,
    slowest_start_us: AtomicU64,
    slowest_stop_us: AtomicU64,
    /// Requests a server answered after its shutdown (deregistration) began:
    /// sent by clients that had not heard of the removal yet.
    after_deregistration: AtomicU64,
    config_changes: AtomicU64,
    slowest_apply_us: AtomicU64,
    /// The last servers' lifecycles, to tell what a failed request's
    /// endpoint was doing.
    lifecycles: Mutex<VecDeque<Lifecycle>>,
}

#[derive(Clone, Copy)]
enum Event {
    Started,
    StopBegan,
    Stopped,
}

/// When a server's shutdown began and ended, by its port.
struct Lifecycle {
    port: u16,
    id: String,
    stop_began: Option<Instant>,
    stopped: Option<Instant>,
}

impl Stats {
    fn record(&self, start: Instant, outcome: Result<&'static str, String>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Ok("v1") => {
                self.v1.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {
                self.v2.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let mut log = self
                    .failure_log
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if log.len() < FAILURES_SHOWN {
                    let at = start.elapsed().as_secs_f64();
                    log.push(format!("{at:7.3} s  {e}{}", self.endpoint_state(&e)));
                }
            }
        }
    }

    /// What the server at the endpoint an error names (`127.0.0.1:PORT`)
    /// was doing, when it is one of the last servers.
    fn endpoint_state(&self, error: &str) -> String {
        let Some(port) = error.split("127.0.0.1:").nth(1).and_then(|rest| {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            rest[..digits].parse::<u16>().ok()
        }) else {
            return String::new();
        };
        let now = Instant::now();
        let ago = |t: Instant| format!("{:.1} ms ago", (now - t).as_secs_f64() * 1e3);
        let lifecycles = self
            .lifecycles
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match lifecycles.iter().find(|l| l.port == port) {
            None => String::new(),
            Some(l) => match (l.stop_began, l.stopped) {
                (None, _) => format!("  [{}: serving, no shutdown begun]", l.id),
                (Some(began), None) => {
                    format!(
                        "  [{}: its shutdown began {}, still draining]",
                        l.id,
                        ago(began)
                    )
                }
                (Some(began), Some(stopped)) => format!(
                    "  [{}: its shutdown began {}, ended {}]",
                    l.id,
                    ago(began),
                    ago(stopped)
                ),
            },
        }
    }

    /// Notes a server's start, shutdown or stop.
    fn lifecycle(&self, port: u16, id: &str, event: Event) {
        let mut lifecycles = self
            .lifecycles
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match event {
            Event::Started => {
                if lifecycles.len() == LIFECYCLES_KEPT {
                    lifecycles.pop_front();
                }
                lifecycles.push_back(Lifecycle {
                    port,
                    id: id.to_owned(),
                    stop_began: None,
                    stopped: None,
                });
            }
            Event::StopBegan | Event::Stopped => {
                if let Some(l) = lifecycles.iter_mut().rev().find(|l| l.port == port) {
                    match event {
                        Event::StopBegan => l.stop_began = Some(now),
                        _ => l.stopped = Some(now),
                    }
                }
            }
        }
    }

    fn problem(&self, what: String) {
        eprintln!("soak: {what}");
        self.problems
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(what);
    }
}

/// Records `elapsed` in `slowest` if it is the slowest yet.
fn slowest(slowest: &AtomicU64, elapsed: Duration) {
    slowest.fetch_max(
        u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// The servers of `echo` up now, oldest first.
struct Fleet {
    admin: String,
    next: u64,
    servers: Vec<Server>,
}

struct Server {
    id: String,
    serving: Serving,
    /// Set when its shutdown begins.
    stopping: Arc<AtomicBool>,
}

impl Server {
    /// Shuts down gracefully (deregister, then drain); how long it took.
    async fn stop(self, stats: &Stats) -> Result<Duration, String> {
        let port = self.serving.local_addr().port();
        self.stopping.store(true, Ordering::Relaxed);
        stats.lifecycle(port, &self.id, Event::StopBegan);
        let began = Instant::now();
        let stopped = self.serving.shutdown().await;
        stats.lifecycle(port, &self.id, Event::Stopped);
        match stopped {
            Ok(()) => Ok(began.elapsed()),
            Err(e) => Err(format!("graceful stop of {}: {e}", self.id)),
        }
    }
}

impl Fleet {
    /// Serves and registers a new server of `version`.
    async fn start(
        &mut self,
        version: &'static str,
        stats: &Arc<Stats>,
    ) -> Result<Server, BoxError> {
        self.next += 1;
        let id = format!("{SERVICE}-{version}-{}", self.next);
        let stopping = Arc::new(AtomicBool::new(false));
        let answer = format!("{version} {id}");
        let app = {
            let stopping = Arc::clone(&stopping);
            let stats = Arc::clone(stats);
            axum::Router::new().route(
                "/echo",
                axum::routing::get(move || {
                    if stopping.load(Ordering::Relaxed) {
                        stats.after_deregistration.fetch_add(1, Ordering::Relaxed);
                    }
                    let answer = answer.clone();
                    async move { answer }
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let registration = Registration::new(self.admin.clone(), SERVICE)
            .namespace(NAMESPACE)
            .label("version", version);
        let started = Instant::now();
        let serving = proxyless::serve(listener, registration, app)
            .await
            .map_err(|e| format!("starting {id}: {e:?}"))?;
        if !serving.is_registered() {
            return Err(format!("{id} serves but mesh-control has not registered it").into());
        }
        slowest(&stats.slowest_start_us, started.elapsed());
        stats.started.fetch_add(1, Ordering::Relaxed);
        stats.lifecycle(serving.local_addr().port(), &id, Event::Started);
        Ok(Server {
            id,
            serving,
            stopping,
        })
    }
}

/// Every [`CHURN_EVERY`], replaces the oldest server: a new one of its
/// subset starts and registers, then the old one shuts down gracefully.
async fn churn(mut fleet: Fleet, stats: Arc<Stats>, start: Instant, end: Instant) -> Fleet {
    for round in 1u32.. {
        let at = start + CHURN_EVERY * round - CHURN_OFFSET;
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at).await;
        let old = fleet.servers.remove(0);
        let version = old
            .id
            .split('-')
            .nth(1)
            .and_then(|v| VERSIONS.iter().find(|x| **x == v));
        let Some(version) = version.copied() else {
            stats.problem(format!("cannot tell the subset of {}", old.id));
            fleet.servers.push(old);
            continue;
        };
        match fleet.start(version, &stats).await {
            Ok(new) => fleet.servers.push(new),
            Err(e) => {
                // Keep the old one: the subset must not lose a server.
                stats.problem(e.to_string());
                fleet.servers.push(old);
                continue;
            }
        }
        match old.stop(&stats).await {
            Ok(took) => {
                slowest(&stats.slowest_stop_us, took);
                stats.stopped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => stats.problem(e),
        }
    }
    fleet
}

/// Every [`CONFIG_EVERY`], rewrites the split to the next weights and waits
/// until every client applies them.
async fn change_config(
    dir: PathBuf,
    clients: Vec<XdsClient>,
    stats: Arc<Stats>,
    start: Instant,
    end: Instant,
) {
    for round in 1u32.. {
        let at = start + CONFIG_EVERY * round;
        if at >= end {
            break;
        }
        tokio::time::sleep_until(at).await;
        let weights = WEIGHTS[round as usize % WEIGHTS.len()];
        if let Err(e) = write_config(&dir, weights) {
            stats.problem(format!("writing the config: {e}"));
            continue;
        }
        let written = Instant::now();
        let applied = tokio::time::timeout(APPLY_TIMEOUT, async {
            while !clients
                .iter()
                .all(|xds| split_weights(xds) == [weights.0, weights.1])
            {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await;
        match applied {
            Ok(()) => {
                slowest(&stats.slowest_apply_us, written.elapsed());
                stats.config_changes.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => stats.problem(format!(
                "{:.3} s: the weights {}/{} did not reach every client within {APPLY_TIMEOUT:?}",
                start.elapsed().as_secs_f64(),
                weights.0,
                weights.1
            )),
        }
    }
}

/// Prints the counts so far every [`REPORT_EVERY`].
async fn report(stats: Arc<Stats>, start: Instant, end: Instant) {
    let mut at = start + REPORT_EVERY;
    while at <= end {
        tokio::time::sleep_until(at).await;
        let memory = Memory::now();
        println!(
            "[{:4.0} s] requests {:8}  failures {}  v1 {:8}  v2 {:8}  servers replaced {:3}  \
             config changes {:3}  heap {:6.2} MiB  RSS {:6.2} MiB",
            start.elapsed().as_secs_f64(),
            stats.requests.load(Ordering::Relaxed),
            stats.failures.load(Ordering::Relaxed),
            stats.v1.load(Ordering::Relaxed),
            stats.v2.load(Ordering::Relaxed),
            stats.stopped.load(Ordering::Relaxed),
            stats.config_changes.load(Ordering::Relaxed),
            mib_f(memory.heap),
            mib_f(memory.rss)
        );
        at += REPORT_EVERY;
    }
}

/// Live heap and resident set size, in bytes.
#[derive(Clone, Copy)]
struct Memory {
    heap: u64,
    rss: u64,
}

impl Memory {
    fn now() -> Memory {
        Memory {
            heap: live_heap(),
            rss: rss(),
        }
    }
}

/// The memory at `mark`: the smallest live heap of [`HEAP_SAMPLES`]
/// samples over the [`HEAP_WINDOW`] before it (and the RSS at that sample).
async fn heap_at(mark: Instant) -> Memory {
    let step = HEAP_WINDOW / HEAP_SAMPLES;
    let mut best: Option<Memory> = None;
    for i in (0..HEAP_SAMPLES).rev() {
        tokio::time::sleep_until(mark - step * i).await;
        let now = Memory::now();
        if best.is_none_or(|b| now.heap < b.heap) {
            best = Some(now);
        }
    }
    best.unwrap_or_else(Memory::now)
}

/// Bytes allocated and not freed yet.
fn live_heap() -> u64 {
    let stats = HEAP.stats();
    (stats.bytes_allocated as u64).saturating_sub(stats.bytes_deallocated as u64)
}

/// The resident set size (`/proc/self/statm`), 0 where there is none.
fn rss() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    pages * rustix::param::page_size() as u64
}

fn mib_f(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn mib(bytes: u64) -> String {
    format!("{:.2}", mib_f(bytes))
}

/// Writes the mesh config with the split `weights` (v1, v2), as editors do:
/// aside, then renamed over the old file.
fn write_config(dir: &Path, (v1, v2): (u32, u32)) -> std::io::Result<()> {
    let yaml = format!(
        "# The soak's service: two subsets by the label `version`, split {v1}/{v2}.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {SERVICE}, namespace: {NAMESPACE}}}
spec:
  hosts: [{SERVICE}]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {SERVICE}, namespace: {NAMESPACE}}}
spec:
  host: {SERVICE}
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {SERVICE}, namespace: {NAMESPACE}}}
spec:
  hosts: [{SERVICE}]
  http:
  - name: split
    route:
    - {{destination: {{host: {SERVICE}, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: {SERVICE}, subset: v2}}, weight: {v2}}}
"
    );
    let tmp = dir.join(format!(".{CONFIG_FILE}.tmp"));
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, dir.join(CONFIG_FILE))
}

/// The endpoints of subset `version` a client knows.
fn endpoint_count(xds: &XdsClient, version: &str) -> usize {
    let cluster = format!("outbound|80|{version}|{SERVICE}.{NAMESPACE}.svc.cluster.local");
    xds.snapshot()
        .endpoints
        .get(cluster.as_str())
        .map_or(0, |c| c.endpoint_count())
}

/// The split's weights as a client sees them.
fn split_weights(xds: &XdsClient) -> Vec<u32> {
    let snapshot = xds.snapshot();
    snapshot
        .route_configs
        .get(ROUTE_CONFIG)
        .and_then(|rc| {
            rc.virtual_hosts
                .iter()
                .flat_map(|vh| vh.routes.iter())
                .find(|r| r.action.clusters().len() == 2)
                .map(|r| r.action.clusters().iter().map(|c| c.weight).collect())
        })
        .unwrap_or_default()
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) -> Result<(), BoxError> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    while !condition() {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting until {what}").into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(())
}

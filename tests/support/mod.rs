//! Helpers shared by the facade's integration tests (`mod support;` in each test
//! file). What other test crates need too lives in mesh-testkit; this module keeps
//! what needs the facade's own types (the `shop` service, `proxyless::telemetry`)
//! and the names these tests have always used for the kit's helpers.
//!
//! What is here and why:
//! - [`eventually`]: tests wait on a condition with a deadline, never on a sleep
//!   (docs/ARCHITECTURE.md, Testing); `mesh_testkit::wait` polls and panics naming
//!   the condition and how long it waited.
//! - [`shop`]: the generated `shop` gRPC code (proto/shop.proto), and [`PaymentServer`],
//!   a Payment service whose replies name the instance (`served_by`) and its `version`
//!   label, so a test sees where the mesh routed every call. [`spawn_payment`] runs one
//!   on 127.0.0.1 with tonic's own server; [`payment_routes`] hands the same service to
//!   `proxyless::serve` (or any axum/tower server).
//! - [`assert_split`]: weighted routing is random; `mesh_testkit::stats` checks a
//!   binomial z-score at z ≥ 4.5.
//! - [`admin`]: requests to mesh-control's admin HTTP API (registration, status).
//! - [`copy_demo_mesh`]: the demo's config (`examples/mesh`) in a test's own directory.
//! - [`Coin`]: a seeded-from-the-OS random source for backends that fail a share of
//!   their calls at random (retries are checked against `1 - p^(attempts)`); the
//!   root package has no `rand` dependency and a test needs nothing stronger.
//! - [`python`]: the grpcio venv and the xDS interop client (gRPC proxyless, A27/A28).
//! - [`otlp`]: the kit's OTLP trace receiver, flushed through `Telemetry`.
//!
//! Each test binary uses a subset of these helpers, hence `dead_code` is allowed here.
#![allow(dead_code)]

pub(crate) mod admin;
pub(crate) mod otlp;
pub(crate) mod python;

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

/// The generated `shop` messages, clients (`shop::payment_client::PaymentClient`) and
/// servers (`shop::payment_server::{Payment, PaymentServer}`).
pub(crate) use shop_proto as shop;

/// Statistical assertions (binomial z-scores) for weighted splits and retry rates.
#[allow(unused_imports)] // each test binary uses some
pub(crate) use mesh_testkit::stats::{SPLIT_Z, assert_split, assert_split_z, split_z_score};
/// Waits on a condition that needs `.await`, naming it on failure.
#[allow(unused_imports)] // each test binary uses some
pub(crate) use mesh_testkit::wait::eventually_async;

/// Waits until `condition()` is true, checking every few milliseconds; panics when it is
/// still false after `deadline`.
///
/// ```ignore
/// eventually(Duration::from_secs(5), || client.snapshot().listeners.contains_key("payment")).await;
/// ```
pub(crate) async fn eventually(deadline: Duration, condition: impl FnMut() -> bool) {
    mesh_testkit::wait::eventually("a condition", deadline, condition).await;
}

/// [`eventually`] whose panic message says what was awaited.
pub(crate) async fn eventually_named(
    what: &str,
    deadline: Duration,
    condition: impl FnMut() -> bool,
) {
    mesh_testkit::wait::eventually(what, deadline, condition).await;
}

/// Copies the demo's config (every YAML file of `examples/mesh`) into `to`, created.
pub(crate) fn copy_demo_mesh(to: &Path) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mesh");
    if let Err(error) = std::fs::create_dir_all(to) {
        panic!("creating {}: {error}", to.display());
    }
    let entries = match std::fs::read_dir(&from) {
        Ok(entries) => entries,
        Err(error) => panic!("listing {}: {error}", from.display()),
    };
    let mut copied = 0;
    for entry in entries {
        let path = match entry {
            Ok(entry) => entry.path(),
            Err(error) => panic!("listing {}: {error}", from.display()),
        };
        let is_yaml = path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml");
        let Some(name) = path.file_name().filter(|_| is_yaml) else {
            continue;
        };
        if let Err(error) = std::fs::copy(&path, to.join(name)) {
            panic!("copying {}: {error}", path.display());
        }
        copied += 1;
    }
    assert!(copied > 0, "no YAML files in {}", from.display());
}

/// Counters a test reads to see what a [`PaymentServer`] has done (shared by its clones).
#[derive(Debug, Default)]
pub(crate) struct PaymentStats {
    /// `Pay` calls answered (successfully or with the configured failure).
    pub(crate) pays: AtomicU64,
    /// `Pay` calls answered with the configured failure.
    pub(crate) failures: AtomicU64,
    /// `Stream` messages handed to the response stream, over all streams.
    pub(crate) stream_messages_sent: AtomicU32,
    /// `Stream` calls whose last message has been handed to the response stream.
    pub(crate) streams_completed: AtomicU32,
}

impl PaymentStats {
    /// `Pay` calls answered so far.
    pub(crate) fn pays(&self) -> u64 {
        self.pays.load(Ordering::SeqCst)
    }

    /// `Pay` calls failed on purpose so far.
    pub(crate) fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// `Stream` messages sent so far, over all streams.
    pub(crate) fn stream_messages_sent(&self) -> u32 {
        self.stream_messages_sent.load(Ordering::SeqCst)
    }

    /// `Stream` calls that have sent their last message.
    pub(crate) fn streams_completed(&self) -> u32 {
        self.streams_completed.load(Ordering::SeqCst)
    }
}

/// A `shop.Payment` implementation that answers with its identity.
///
/// `Pay` replies `{served_by, version}`. `Stream` sends `count` messages `{seq: 1..=count,
/// served_by}` through a one-slot mpsc channel from a spawned task, so
/// [`PaymentStats::stream_messages_sent`] follows the client's consumption (at most one
/// message ahead of the channel) and a test can tell when the last one left.
#[derive(Debug, Clone)]
pub(crate) struct PaymentServer {
    /// Names this instance in every reply (e.g. its address).
    pub(crate) served_by: String,
    /// Its `version` label, what subsets and weighted routes select on.
    pub(crate) version: String,
    /// Pause between two stream messages, for tests that need a stream in flight
    /// (e.g. draining); zero by default.
    pub(crate) stream_interval: Duration,
    /// When set, `Pay` fails with this code instead of answering (retries, ejection).
    pub(crate) fail_with: Option<tonic::Code>,
    /// When set, `Pay` fails with this code in this share of calls, at random
    /// (independently per call), and answers the others.
    pub(crate) fail_randomly: Option<(tonic::Code, f64)>,
    /// The random source of `fail_randomly` (shared by clones).
    pub(crate) coin: Coin,
    /// What this instance has done so far.
    pub(crate) stats: Arc<PaymentStats>,
}

impl PaymentServer {
    /// An instance named `served_by` with label `version` that answers every call.
    pub(crate) fn new(served_by: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            served_by: served_by.into(),
            version: version.into(),
            stream_interval: Duration::ZERO,
            fail_with: None,
            fail_randomly: None,
            coin: Coin::new(),
            stats: Arc::default(),
        }
    }

    /// Waits `interval` between stream messages.
    pub(crate) fn with_stream_interval(mut self, interval: Duration) -> Self {
        self.stream_interval = interval;
        self
    }

    /// Fails every `Pay` with `code`.
    pub(crate) fn failing(mut self, code: tonic::Code) -> Self {
        self.fail_with = Some(code);
        self
    }

    /// Fails each `Pay` with `code` with probability `share` (0..=1), independently
    /// per call: a flaky instance.
    pub(crate) fn failing_randomly(mut self, code: tonic::Code, share: f64) -> Self {
        assert!(
            (0.0..=1.0).contains(&share),
            "share {share} is not a probability"
        );
        self.fail_randomly = Some((code, share));
        self
    }
}

#[tonic::async_trait]
impl shop::payment_server::Payment for PaymentServer {
    async fn pay(
        &self,
        _request: Request<shop::PayRequest>,
    ) -> Result<Response<shop::PayReply>, Status> {
        self.stats.pays.fetch_add(1, Ordering::SeqCst);
        let fail = match (self.fail_with, self.fail_randomly) {
            (Some(code), _) => Some(code),
            (None, Some((code, share))) if self.coin.flip(share) => Some(code),
            _ => None,
        };
        if let Some(code) = fail {
            self.stats.failures.fetch_add(1, Ordering::SeqCst);
            return Err(Status::new(
                code,
                format!("{} is configured to fail", self.served_by),
            ));
        }
        Ok(Response::new(shop::PayReply {
            served_by: self.served_by.clone(),
            version: self.version.clone(),
        }))
    }

    type StreamStream = ReceiverStream<Result<shop::StreamReply, Status>>;

    async fn stream(
        &self,
        request: Request<shop::StreamRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let count = request.into_inner().count;
        let (tx, rx) = mpsc::channel(1);
        let served_by = self.served_by.clone();
        let interval = self.stream_interval;
        let stats = Arc::clone(&self.stats);
        tokio::spawn(async move {
            for seq in 1..=count {
                if seq > 1 && !interval.is_zero() {
                    tokio::time::sleep(interval).await;
                }
                let reply = shop::StreamReply {
                    seq,
                    served_by: served_by.clone(),
                };
                if tx.send(Ok(reply)).await.is_err() {
                    // The client went away; nothing left to send to.
                    return;
                }
                stats.stream_messages_sent.fetch_add(1, Ordering::SeqCst);
            }
            stats.streams_completed.fetch_add(1, Ordering::SeqCst);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A random source for tests: SplitMix64 over an atomic counter seeded from the OS
/// (through `RandomState`), so every run differs and clones share one sequence.
/// SplitMix64 passes BigCrush; a test comparing a failure share with a binomial at
/// z = 4.5 needs nothing more.
#[derive(Debug, Clone)]
pub(crate) struct Coin {
    state: Arc<AtomicU64>,
}

impl Coin {
    /// A fresh random source.
    pub(crate) fn new() -> Self {
        Self {
            state: Arc::new(AtomicU64::new(RandomState::new().hash_one(Instant::now()))),
        }
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&self) -> u64 {
        let mut z = self
            .state
            .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            .wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p` (0..=1).
    pub(crate) fn flip(&self, p: f64) -> bool {
        // 53 random bits → a uniform float in [0, 1).
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

impl Default for Coin {
    fn default() -> Self {
        Self::new()
    }
}

/// The Payment service as tonic `Routes`, for `proxyless::serve` or any server that takes
/// a tower service (`routes.into_axum_router()` gives an axum `Router`).
pub(crate) fn payment_routes(server: PaymentServer) -> tonic::service::Routes {
    payment_routes_of(server)
}

/// [`payment_routes`] for any implementation of the Payment service (a test's own).
pub(crate) fn payment_routes_of<P: shop::payment_server::Payment>(
    service: P,
) -> tonic::service::Routes {
    tonic::service::Routes::new(shop::payment_server::PaymentServer::new(service))
}

/// [`payment_routes_of`] for a service the test keeps a handle on (to read what it
/// counted).
pub(crate) fn payment_routes_of_arc<P: shop::payment_server::Payment>(
    service: Arc<P>,
) -> tonic::service::Routes {
    tonic::service::Routes::new(shop::payment_server::PaymentServer::from_arc(service))
}

/// A Payment server running on a local port (see [`spawn_payment`]).
#[derive(Debug)]
pub(crate) struct PaymentHandle {
    /// Where it listens (127.0.0.1, a free port).
    pub(crate) addr: SocketAddr,
    /// What it has done so far (shared with the server).
    pub(crate) stats: Arc<PaymentStats>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
}

impl PaymentHandle {
    /// Stops accepting, lets in-flight calls finish (tonic's graceful shutdown) and waits
    /// for the server to stop.
    pub(crate) async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => panic!("payment server {} failed: {error}", self.addr),
                Err(error) => panic!("payment server {} task failed: {error}", self.addr),
            }
        }
    }
}

impl Drop for PaymentHandle {
    fn drop(&mut self) {
        // Dropped without `shutdown`: stop at once so the port does not outlive the test.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts a Payment server on 127.0.0.1 (a free port) with label `version`, named by its
/// address (`served_by` = `"127.0.0.1:<port>"`).
pub(crate) async fn spawn_payment(version: &str) -> (SocketAddr, PaymentHandle) {
    spawn_payment_with(|addr| PaymentServer::new(addr.to_string(), version)).await
}

/// [`spawn_payment`] with a server built by `make` from the bound address (to set a
/// stream interval, a failure, another name).
pub(crate) async fn spawn_payment_with(
    make: impl FnOnce(SocketAddr) -> PaymentServer,
) -> (SocketAddr, PaymentHandle) {
    let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
        Ok(listener) => listener,
        Err(error) => panic!("binding 127.0.0.1:0 for a payment server: {error}"),
    };
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(error) => panic!("local address of the payment server listener: {error}"),
    };
    let server = make(addr);
    let stats = Arc::clone(&server.stats);
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let signal = async move {
        // Sent by `shutdown`; a dropped handle aborts the task instead.
        let _ = shutdown_rx.await;
    };
    let task = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(shop::payment_server::PaymentServer::new(server))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal),
    );
    let handle = PaymentHandle {
        addr,
        stats,
        shutdown: Some(shutdown_tx),
        task: Some(task),
    };
    (addr, handle)
}

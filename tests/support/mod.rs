//! Helpers shared by the integration tests (`mod support;` in each test file).
//!
//! What is here and why:
//! - [`eventually`]: tests wait on a condition with a deadline, never on a sleep
//!   (DESIGN.md, house style 10). Polling a cheap condition every few milliseconds is
//!   waiting; a panic names the condition and how long it waited.
//! - [`shop`]: the generated `shop` gRPC code (proto/shop.proto), and [`PaymentServer`],
//!   a Payment service whose replies name the instance (`served_by`) and its `version`
//!   label, so a test sees where the mesh routed every call. [`spawn_payment`] runs one
//!   on 127.0.0.1 with tonic's own server; [`payment_routes`] hands the same service to
//!   `proxyless::serve` (or any axum/tower server).
//! - [`assert_split`]: weighted routing is random; a binomial z-score at z ≥ 4.5 keeps a
//!   correct split from failing more than once in ~300,000 runs while still catching a
//!   wrong weight.
//! - [`admin`]: requests to mesh-control's admin HTTP API (registration, status).
//! - [`Coin`]: a seeded-from-the-OS random source for backends that fail a share of
//!   their calls at random (retries are checked against `1 - p^(attempts)`); the
//!   root package has no `rand` dependency and a test needs nothing stronger.
//! - [`python`]: the grpcio venv and the xDS interop client (gRPC proxyless, A27/A28).
//! - [`otlp`]: a real OTLP trace receiver (the collector's gRPC trace service and
//!   `POST /v1/traces`) that flattens the spans it gets, for trace assertions.
//!
//! Each test binary uses a subset of these helpers, hence `dead_code` is allowed here.
#![allow(dead_code)]

pub(crate) mod admin;
pub(crate) mod otlp;
pub(crate) mod python;

use std::future::Future;
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
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

/// How often [`eventually`] re-checks its condition.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// Waits until `condition()` is true, checking every few milliseconds; panics when it is
/// still false after `deadline`.
///
/// ```ignore
/// eventually(Duration::from_secs(5), || client.snapshot().listeners.contains_key("payment")).await;
/// ```
pub(crate) async fn eventually(deadline: Duration, condition: impl FnMut() -> bool) {
    eventually_named("condition", deadline, condition).await;
}

/// [`eventually`] whose panic message says what was awaited.
pub(crate) async fn eventually_named(
    what: &str,
    deadline: Duration,
    mut condition: impl FnMut() -> bool,
) {
    let start = Instant::now();
    loop {
        if condition() {
            return;
        }
        if start.elapsed() >= deadline {
            panic!("{what} still false after {deadline:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`eventually`] for a condition that needs `.await` (an RPC, an HTTP call): each check
/// is one call of `condition`; a check still running at the deadline is abandoned.
pub(crate) async fn eventually_async<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, condition()).await {
            Ok(true) => return,
            Ok(false) if start.elapsed() < deadline => {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            _ => panic!("{what} still false after {deadline:?}"),
        }
    }
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

/// Default z for [`assert_split`]: a correct split fails about once in 300,000 runs.
pub(crate) const SPLIT_Z: f64 = 4.5;

/// How many standard deviations `count` out of `total` lies from the binomial mean
/// `total * expected_p` (0 when it is exactly the mean; infinite when `expected_p` is 0
/// or 1 and the count differs from the mean).
pub(crate) fn split_z_score(count: u64, total: u64, expected_p: f64) -> f64 {
    let n = total as f64;
    let mean = n * expected_p;
    let sd = (n * expected_p * (1.0 - expected_p)).sqrt();
    let diff = count as f64 - mean;
    if diff == 0.0 {
        0.0
    } else if sd == 0.0 {
        f64::INFINITY
    } else {
        diff.abs() / sd
    }
}

/// Asserts that `count` hits out of `total` tries are consistent with probability
/// `expected_p`, at z = [`SPLIT_Z`] (4.5).
#[track_caller]
pub(crate) fn assert_split(count: u64, total: u64, expected_p: f64) {
    assert_split_z(count, total, expected_p, SPLIT_Z);
}

/// [`assert_split`] with an explicit z.
#[track_caller]
pub(crate) fn assert_split_z(count: u64, total: u64, expected_p: f64, z: f64) {
    assert!(
        (0.0..=1.0).contains(&expected_p),
        "expected_p {expected_p} is not a probability"
    );
    assert!(count <= total, "count {count} is larger than total {total}");
    let score = split_z_score(count, total, expected_p);
    assert!(
        score <= z,
        "{count} of {total} ({:.2}%) is {score:.2} standard deviations from the expected \
         {:.2}% (limit z = {z})",
        100.0 * count as f64 / total.max(1) as f64,
        100.0 * expected_p,
    );
}

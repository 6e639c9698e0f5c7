//! The response future of [`Mesh`](super::Mesh): the one driver of the
//! request engine ([`mesh_core::engine`]).
//!
//! Every routed request, with or without a policy, runs the same loop:
//! ask the [`Exchange`] what to do, do it (take a breaker slot, pick an
//! endpoint, send an attempt through the inner service, ask the retry
//! budget, answer), and hand the result back as the next event. The loop
//! runs first inside `Mesh::call`, which sends the first attempt with the
//! readied inner service itself; the future then only waits: for the
//! attempt in flight, for the request body being read ahead, for a
//! service to be ready for a retry, and for at most one timer, armed only
//! when the engine asks for one ([`Exchange::next_timer`]).
//!
//! The whole state lives in the future, in one place: no box, no task, and
//! the request head is kept for a retry only when a retry is possible.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use http::{HeaderValue, Request, Response};
use mesh_core::breaker::{Limit, Overflow, RequestPermit};
use mesh_core::engine::{Action, Event, Exchange, Local, Observer, Start};
use mesh_core::model::{AbortStatus, Name, RetryOn};
use mesh_core::retry::{Outcome, RetryPermit, RetryRefusal};
use mesh_core::snapshot::RouteHandle;
use pin_project_lite::pin_project;
use rand::RngCore;
use std::sync::Arc;
use tokio::time::{Instant, Sleep};
use tower::Service;

use super::ATTEMPT_COUNT_NAME;
use super::attempt::{
    Attempt, Finish, outcome_flags, outcome_of_error, outcome_of_request, overflow_message,
    status_in_trailers,
};
use super::mirror::{Launch, Mirroring, Targets, Ticket};
use super::service::{Config, local as local_response, prepare_target, upstream_error};
use crate::balance::{ActiveGuard, ClusterState};
use crate::body::{BodyTimeout, Kept, MeshBody, Prepared, Preparing, ResponseBody};
use crate::deadline::write_timeout_header;
use crate::error::{BoxError, Error, ErrorKind};
use crate::local_reply::LocalReply;
use crate::stats::MeshStats;
use crate::telemetry::{DecisionRecord, ResponseFlags};

type Output<RB> = Result<Response<ResponseBody<RB>>, Error>;

type Boxed<RB> = Pin<Box<dyn Future<Output = Output<RB>> + Send + 'static>>;

pin_project! {
    /// The future of a request through [`Mesh`](super::Mesh): the driver
    /// of its request engine (see the [module docs](self)), or the answer
    /// when it was known at once, or (for a name whose configuration has
    /// not arrived yet) a boxed wait that ends by running the driver.
    pub struct ResponseFuture<S, B, RB>
    where
        S: Service<Request<MeshBody<B>>, Response = Response<RB>>,
    {
        #[pin]
        kind: Kind<S, B, RB>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, B, RB>
    where
        S: Service<Request<MeshBody<B>>, Response = Response<RB>>,
    {
        Driving {
            // Not boxed: measured, a box made per routed request (malloc +
            // free, ~170 Ir with its drop) cost more than the ~640 bytes it
            // took out of each move of the future (~115 Ir of memcpy over
            // the five moves per call: a move's cost is mostly fixed).
            core: Core<S, B, RB>,
            // The attempt in flight.
            #[pin]
            flight: Option<S::Future>,
        },
        Ready {
            result: Option<Output<RB>>,
        },
        Boxed {
            future: Boxed<RB>,
        },
    }
}

/// A routed request, ready for the engine: what routing decided. Small
/// (the exchange is made in the future's place, not moved there).
pub(crate) struct Routed {
    /// The route (its policy for the engine, its name for messages).
    pub(crate) route: RouteHandle,
    /// What the engine knows when the request starts.
    pub(crate) start: Start,
    /// When the caller's deadline was read (the exchange's clock starts
    /// then, when it needs one from the start).
    pub(crate) now: Option<Instant>,
    pub(crate) state: Arc<ClusterState>,
    /// The request's hash, for ring-hash clusters.
    pub(crate) hash: Option<u64>,
    /// The request's decision record (`None`: nothing is recorded).
    pub(crate) record: Option<DecisionRecord>,
    /// A gRPC request (local answers are gRPC statuses, deadlines go in
    /// `grpc-timeout`).
    pub(crate) grpc: bool,
    /// The index of the destination picked among the route's weighted
    /// clusters (its header rules apply to the response).
    pub(crate) destination: usize,
    /// The mirror clusters this request is copied to (see
    /// [`crate::mesh::mirror`]); `None` for almost every request.
    pub(crate) mirrors: Option<Box<Targets>>,
}

/// The request body, as the engine goes.
enum Payload<B> {
    /// The caller's body, untouched (sent once as it is).
    Raw(B),
    /// Being read ahead ([`Action::PrepareBody`]) and not ready at once
    /// (boxed: rare, and large).
    Preparing(Box<Preparing<B>>),
    /// Sent once, with what was read ahead.
    Once(MeshBody<B>),
    /// Kept whole: every attempt replays it.
    Kept(Arc<Kept>),
    /// Sent, not replayable.
    Gone,
}

/// Where the result of the current attempt is.
enum Result_<R> {
    /// In flight (or none yet).
    None,
    /// Its response or error.
    Got(Result<R, BoxError>),
    /// Its per-try timeout fired.
    TimedOut,
}

/// The result of the attempt that just ended, while the engine decides
/// what becomes of it (within one [`Core::run`]: every decision after an
/// outcome is made at once), so the future does not carry room for a
/// response while it waits.
struct Landed<R> {
    result: Result_<R>,
    outcome: Outcome,
    /// Its response has begun with a status still to come (trailers).
    begun: bool,
}

impl<R> Landed<R> {
    fn none() -> Self {
        Landed {
            result: Result_::None,
            outcome: Outcome::Reset,
            begun: false,
        }
    }
}

/// The unpinned state of a driven request.
struct Core<S, B, RB>
where
    S: Service<Request<MeshBody<B>>, Response = Response<RB>>,
{
    exchange: Exchange<RouteHandle>,
    state: Arc<ClusterState>,
    hash: Option<u64>,
    record: Option<DecisionRecord>,
    stats: MeshStats,
    config: Config,
    grpc: bool,
    /// [`Routed::destination`].
    destination: usize,
    /// The exchange's time zero; started lazily when nothing could time
    /// out at first (see [`Exchange::needs_clock`]).
    clock: Option<Instant>,
    /// The timer `sleep` is armed for (since `clock`).
    timer: Option<Duration>,
    /// The one timer, made the first time the engine asks for one (and
    /// reused after).
    sleep: Option<Pin<Box<Sleep>>>,
    /// The request head: each attempt is sent the head held here, and
    /// one that another attempt may follow leaves a copy in its place
    /// (the caller's own head goes to the first attempt, with the room
    /// its header and extension maps have for the attempt's additions).
    head: Option<http::request::Parts>,
    body: Payload<B>,
    /// A service of its own, for attempts sent after `call` returned.
    svc: Option<S>,
    /// Whether `svc` is ready for a call.
    svc_ready: bool,
    /// An attempt (its number and announced timeout) waiting for `svc`
    /// to be ready.
    unsent: Option<(u32, Option<Duration>)>,
    /// The breaker slot taken for the next attempt.
    slot: Option<RequestPermit>,
    /// The endpoint picked for the next attempt.
    picked: Option<ActiveGuard>,
    /// The retry slot granted for the next attempt.
    retry: Option<RetryPermit>,
    /// The current attempt: its number, what it holds.
    number: u32,
    attempt: Option<Attempt>,
    /// The copies to send with the first attempt (`None` unless the
    /// route mirrors this request).
    mirror: Option<Box<Mirroring<S, B>>>,
    _response: PhantomData<fn() -> RB>,
}

/// A generator made on the first number asked for.
struct LazyRng(Option<rand::rngs::ThreadRng>);

impl LazyRng {
    fn get(&mut self) -> &mut rand::rngs::ThreadRng {
        self.0.get_or_insert_with(rand::rng)
    }
}

impl RngCore for LazyRng {
    fn next_u32(&mut self) -> u32 {
        self.get().next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.get().next_u64()
    }
    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.get().fill_bytes(dst)
    }
}

/// The one observer of the engine's decisions: the mesh's counters and,
/// under telemetry, the request's decision record.
struct Notes<'a> {
    stats: &'a MeshStats,
    record: Option<&'a DecisionRecord>,
    state: &'a ClusterState,
}

impl Observer for Notes<'_> {
    fn fault_delay(&mut self, delay: Duration) {
        self.stats.add_fault_delay();
        if let Some(record) = self.record {
            record.fault_delay(delay);
        }
    }

    fn fault_abort(&mut self, status: AbortStatus) {
        self.stats.add_fault_abort();
        if let Some(record) = self.record {
            match status {
                AbortStatus::Http(code) => record.fault_abort_http(
                    http::StatusCode::from_u16(code)
                        .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
                ),
                AbortStatus::Grpc(code) => record.fault_abort_grpc(code),
            }
        }
    }

    fn deadline_remaining(&mut self, remaining: Duration) {
        if let Some(record) = self.record {
            record.deadline_remaining(remaining);
        }
    }

    fn deadline_passed(&mut self) {
        self.stats.add_timeout();
        if let Some(record) = self.record {
            record.flag(ResponseFlags::DURATION_TIMEOUT);
        }
    }

    fn timed_out(&mut self) {
        self.stats.add_timeout();
        if let Some(record) = self.record {
            record.flag(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
        }
    }

    fn retrying(&mut self, _attempt: u32, reason: RetryOn, backoff: Duration) {
        self.stats.add_retry();
        if let Some(record) = self.record {
            record.retrying(reason, backoff);
        }
    }

    fn retry_refused(&mut self, refusal: RetryRefusal) {
        self.stats.add_retry_refused();
        if let Some(record) = self.record {
            record.retry_refused(refusal.limit);
        }
        tracing::debug!(cluster = %self.state.name(), %refusal, "retry refused");
    }

    fn retries_exhausted(&mut self) {
        if let Some(record) = self.record {
            record.retries_exhausted();
        }
    }

    fn overflow(&mut self, overflow: Overflow) {
        self.stats.add_overflow();
        if let Some(record) = self.record {
            record.breaker_overflow(overflow.limit);
        }
    }

    fn no_endpoint(&mut self) {
        if let Some(record) = self.record {
            record.flag(ResponseFlags::NO_HEALTHY_UPSTREAM);
            if self.state.ejected() > 0 {
                record.outlier("all endpoints ejected", None);
            }
        }
    }
}

/// Where the attempt future goes: the field of a future not pinned yet
/// (inside `Mesh::call`), or the pinned one.
enum Slot<'a, F> {
    Unpinned(&'a mut Option<F>),
    Pinned(Pin<&'a mut Option<F>>),
}

impl<F> Slot<'_, F> {
    fn set(&mut self, value: Option<F>) {
        match self {
            Slot::Unpinned(slot) => **slot = value,
            Slot::Pinned(slot) => slot.set(value),
        }
    }
}

impl<S, B, RB> ResponseFuture<S, B, RB>
where
    S: Service<Request<MeshBody<B>>, Response = Response<RB>>,
{
    pub(crate) fn ready(result: Output<RB>) -> Self {
        ResponseFuture {
            kind: Kind::Ready {
                result: Some(result),
            },
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        Self::ready(Err(error))
    }

    pub(crate) fn waiting(future: Boxed<RB>) -> Self {
        ResponseFuture {
            kind: Kind::Boxed { future },
        }
    }
}

impl<S, B, RB> ResponseFuture<S, B, RB>
where
    S: Service<Request<MeshBody<B>>, Response = Response<RB>> + Clone,
    S::Error: Into<BoxError>,
    B: http_body::Body + Unpin,
    B::Error: Into<BoxError>,
    RB: http_body::Body,
{
    /// Starts the engine of a routed request: everything it decides before
    /// it must wait (the first attempt included, sent with `inner`, which
    /// must be ready) happens here.
    pub(crate) fn start(
        routed: Routed,
        req: Request<B>,
        inner: &mut S,
        stats: &MeshStats,
        config: Config,
        launch: Launch<S, B>,
    ) -> Self {
        let grpc = routed.grpc;
        let mirror = routed.mirrors.map(|targets| {
            Box::new(Mirroring {
                targets,
                svc: inner.clone(),
                launch,
                reading: false,
            })
        });
        let (head, body) = req.into_parts();
        // A body already whole (an empty one) needs no reading ahead: a
        // route that retries replays it from the start (set below, once
        // the exchange says it may retry).
        let replayable = body.is_end_stream();
        // The state is written into its box once and never moves again;
        // the attempt in flight waits aside until the future is made.
        let mut this = ResponseFuture {
            kind: Kind::Driving {
                core: Core {
                    exchange: Exchange::new(
                        routed.route,
                        Start {
                            replayable,
                            ..routed.start
                        },
                    ),
                    state: routed.state,
                    hash: routed.hash,
                    record: routed.record,
                    stats: stats.clone(),
                    config,
                    grpc,
                    destination: routed.destination,
                    clock: None,
                    timer: None,
                    sleep: None,
                    head: Some(head),
                    body: Payload::Raw(body),
                    svc: None,
                    svc_ready: false,
                    unsent: None,
                    slot: None,
                    picked: None,
                    retry: None,
                    number: 0,
                    attempt: None,
                    mirror,
                    _response: PhantomData,
                },
                flight: None,
            },
        };
        let Kind::Driving { core, flight } = &mut this.kind else {
            return this;
        };
        if replayable && core.exchange.may_retry() {
            core.body = Payload::Kept(Kept::empty());
        }
        if core.exchange.needs_clock() {
            core.clock = Some(routed.now.unwrap_or_else(Instant::now));
        }
        let mut cx = Context::from_waker(Waker::noop());
        let ran = core.run(
            Event::Start,
            &mut Landed::none(),
            &mut cx,
            Some(inner),
            &mut Slot::Unpinned(flight),
        );
        if let Poll::Ready(result) = ran {
            this.kind = Kind::Ready {
                result: Some(result),
            };
            return this;
        }
        if core.number == 0 {
            // Nothing sent yet (a fault delay, a body still arriving): the
            // readied service goes with the request; `inner` keeps a clone.
            let clone = inner.clone();
            core.svc = Some(std::mem::replace(inner, clone));
            core.svc_ready = true;
        } else if core.exchange.attempt_budget() > core.number {
            // A retry may follow: it needs a service of its own.
            core.svc = Some(inner.clone());
        }
        this
    }
}

impl<S, B, RB> Core<S, B, RB>
where
    S: Service<Request<MeshBody<B>>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    B: http_body::Body + Unpin,
    B::Error: Into<BoxError>,
    RB: http_body::Body,
{
    /// Time since the exchange started (zero until its clock starts).
    fn now(&self) -> Duration {
        self.clock.map_or(Duration::ZERO, |c| c.elapsed())
    }

    /// Runs the engine from `event` until it waits (`Pending`) or the
    /// exchange ends. Attempts are sent with `inner` when given (inside
    /// `Mesh::call`), else with the future's own service.
    fn run(
        &mut self,
        mut event: Event,
        landed: &mut Landed<Response<RB>>,
        cx: &mut Context<'_>,
        mut inner: Option<&mut S>,
        flight: &mut Slot<'_, S::Future>,
    ) -> Poll<Output<RB>> {
        let mut rng = LazyRng(None);
        // One clock read per run: the steps of one run happen at once.
        let now = self.now();
        let mut action = self.step(now, event, &mut rng);
        loop {
            // The answers to a slot, a pick and a send (every request's
            // first steps) go to the exchange's direct transitions
            // (`continue` with the next action): the same decisions as
            // `step`, without its dispatch and a turn of this loop each.
            event = match action {
                Action::Wait => return Poll::Pending,
                Action::PrepareBody { keep } => {
                    let body = match std::mem::replace(&mut self.body, Payload::Gone) {
                        Payload::Raw(body) => body,
                        _ => return Poll::Ready(Err(already_sent())),
                    };
                    // Copies need the body too: it is kept up to the larger
                    // limit, replayed by retries only within theirs.
                    let limit = match &self.mirror {
                        Some(m) => self
                            .config
                            .retry_buffer_limit
                            .max(m.targets.mirrors.body_limit()),
                        None => self.config.retry_buffer_limit,
                    };
                    match Preparing::start(body, keep, limit) {
                        Ok(prepared) => self.prepared(prepared),
                        Err(mut preparing) => match preparing.poll(cx) {
                            Poll::Ready(Ok(prepared)) => self.prepared(prepared),
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(body_error(e))),
                            Poll::Pending => {
                                self.body = Payload::Preparing(Box::new(preparing));
                                return Poll::Pending;
                            }
                        },
                    }
                }
                Action::TakeSlot => {
                    // A route with mirrors that does not retry: its body is
                    // read ahead for the copies before the first slot.
                    if self.mirror.is_some() && matches!(self.body, Payload::Raw(_)) {
                        match self.read_for_mirrors(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                            Poll::Pending => return Poll::Pending,
                        }
                    }
                    match self.take_slot() {
                        Event::SlotGranted => {
                            action = self.exchange.slot_granted();
                            continue;
                        }
                        refused => refused,
                    }
                }
                Action::Pick { spill } => {
                    let tried = self.exchange.tried();
                    let avoid = |i: usize| tried.contains(&i);
                    let avoid: Option<&dyn Fn(usize) -> bool> =
                        if tried.is_empty() { None } else { Some(&avoid) };
                    match self.state.pick(self.hash, &mut rng, avoid, spill) {
                        Some(active) => {
                            let endpoint = active.index();
                            self.picked = Some(active);
                            action = self.exchange.picked(now, endpoint);
                            continue;
                        }
                        None => Event::NoEndpoint,
                    }
                }
                Action::Send { attempt, timeout } => {
                    match inner.as_deref_mut() {
                        Some(inner) => match self.send_attempt(inner, attempt, timeout) {
                            Ok(future) => flight.set(Some(future)),
                            Err(e) => return Poll::Ready(Err(e)),
                        },
                        None => {
                            self.unsent = Some((attempt, timeout));
                            match self.poll_send(cx, flight) {
                                Poll::Ready(Ok(())) => {}
                                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                                Poll::Pending => return Poll::Pending,
                            }
                        }
                    }
                    action = self.exchange.sent();
                    continue;
                }
                Action::Cancel { .. } => {
                    flight.set(None);
                    self.unsent = None;
                    self.slot = None;
                    self.picked = None;
                    if let Some(attempt) = &self.attempt {
                        attempt.report(&Outcome::PerTryTimeout, &self.stats);
                    }
                    landed.result = Result_::TimedOut;
                    landed.outcome = Outcome::PerTryTimeout;
                    Event::Done
                }
                Action::Release { .. } => {
                    if let Some(mut attempt) = self.attempt.take()
                        && self.record.is_some()
                    {
                        match &landed.result {
                            Result_::Got(Ok(response)) => attempt.answered(
                                response.status(),
                                crate::grpc::grpc_status(response.headers()),
                            ),
                            Result_::Got(Err(e)) => {
                                attempt.failed(outcome_flags(&landed.outcome), Some(e))
                            }
                            Result_::TimedOut | Result_::None => {
                                attempt.failed(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, None)
                            }
                        }
                    }
                    // This attempt's slots and its response go before the
                    // backoff.
                    landed.result = Result_::None;
                    Event::Done
                }
                Action::AskRetry { .. } => {
                    // The attempt's own retry slot is given back before
                    // asking for the next one.
                    if let Some(attempt) = &mut self.attempt {
                        drop(attempt._retry.take());
                    }
                    let limits = &self.state.cluster().circuit_breakers;
                    match self
                        .state
                        .retries()
                        .try_acquire(limits, self.state.breaker().budget_base())
                    {
                        Ok(permit) => {
                            self.retry = Some(permit);
                            Event::RetryGranted
                        }
                        Err(refusal) => Event::RetryRefused(refusal),
                    }
                }
                Action::Answer(local) => {
                    flight.set(None);
                    let result = std::mem::replace(&mut landed.result, Result_::None);
                    return Poll::Ready(self.answer(local, result));
                }
                Action::Deliver { deadline, .. } => {
                    return Poll::Ready(self.deliver(deadline, landed));
                }
            };
            action = self.step(now, event, &mut rng);
        }
    }

    /// Hands `event` to the exchange, with the observer of its decisions.
    #[inline]
    fn step(&mut self, now: Duration, event: Event, rng: &mut LazyRng) -> Action {
        let mut notes = Notes {
            stats: &self.stats,
            record: self.record.as_ref(),
            state: &self.state,
        };
        self.exchange
            .step(now, event, &mut notes, &mut || rng.next_u64())
    }

    /// The engine's breaker slot for the next attempt.
    #[inline]
    fn take_slot(&mut self) -> Event {
        let limits = &self.state.cluster().circuit_breakers;
        match self.state.breaker().try_request(limits) {
            Ok(permit) => {
                self.slot = Some(permit);
                Event::SlotGranted
            }
            Err(overflow) => Event::Overflow(overflow),
        }
    }

    /// Starts reading the body ahead for the copies (a route that does not
    /// retry, so the engine did not ask for it); pending while a body that
    /// declared a size within the limit arrives (the slot is taken then,
    /// see [`poll_body`](Self::poll_body)).
    #[cold]
    fn read_for_mirrors(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let (Some(mirror), Payload::Raw(_)) = (self.mirror.as_mut(), &self.body) else {
            return Poll::Ready(Ok(()));
        };
        let limit = mirror.targets.mirrors.body_limit();
        let Payload::Raw(body) = std::mem::replace(&mut self.body, Payload::Gone) else {
            return Poll::Ready(Err(already_sent()));
        };
        match Preparing::start(body, true, limit) {
            Ok(prepared) => self.body = payload(prepared),
            Err(mut preparing) => match preparing.poll(cx) {
                Poll::Ready(Ok(prepared)) => self.body = payload(prepared),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(body_error(e))),
                Poll::Pending => {
                    self.body = Payload::Preparing(Box::new(preparing));
                    mirror.reading = true;
                    return Poll::Pending;
                }
            },
        }
        Poll::Ready(Ok(()))
    }

    /// Sends the copies of the request (its first attempt is being sent):
    /// the head as it is now (after the route's rules, before the
    /// attempt's own headers), the kept body. What cannot be sent is
    /// counted; nothing here fails the request.
    #[cold]
    fn send_mirrors(&mut self, mirror: Mirroring<S, B>) {
        let Mirroring {
            targets,
            svc,
            launch,
            ..
        } = mirror;
        let stats = &self.stats;
        let kept = match &self.body {
            Payload::Kept(kept) if kept.len() <= targets.mirrors.body_limit() as u64 => kept,
            _ => {
                for _ in &targets.clusters {
                    stats.add_mirror_skipped();
                }
                return;
            }
        };
        let Some(head) = &self.head else {
            return;
        };
        let mut rng = rand::rng();
        for state in &targets.clusters {
            let Some(in_flight) = targets.mirrors.try_acquire() else {
                stats.add_mirror_overflow();
                continue;
            };
            let limits = &state.cluster().circuit_breakers;
            let Ok(slot) = state.breaker().try_request(limits) else {
                stats.add_mirror_failed();
                tracing::debug!(cluster = %state.name(), "mirror refused by the circuit breaker");
                continue;
            };
            let Some(active) = state.pick(None, &mut rng, None, false) else {
                stats.add_mirror_failed();
                tracing::debug!(cluster = %state.name(), "no endpoint for a mirrored request");
                continue;
            };
            let mut req = request_like(head, MeshBody::replay(kept));
            // The copy is no part of the caller's decision record.
            req.extensions_mut().remove::<DecisionRecord>();
            let prepared = super::mirror::shadow(&mut req)
                .and_then(|()| prepare_target(&mut req, &active, state, &self.config));
            if let Err(e) = prepared {
                stats.add_mirror_failed();
                tracing::debug!(cluster = %state.name(), error = %e, "cannot mirror the request");
                continue;
            }
            let ticket = Ticket {
                _in_flight: in_flight,
                active,
                _slot: slot,
                stats: stats.clone(),
                timeout: targets.timeout,
            };
            if launch(&svc, req, ticket) {
                stats.add_mirror_sent();
            } else {
                stats.add_mirror_failed();
            }
        }
    }

    fn prepared(&mut self, prepared: Prepared<B>) -> Event {
        let replayable = match prepared {
            // Kept for copies beyond the retry limit: sent once.
            Prepared::Kept(kept) if kept.len() > self.config.retry_buffer_limit as u64 => {
                self.body = Payload::Kept(kept);
                false
            }
            Prepared::Kept(kept) => {
                self.body = Payload::Kept(kept);
                true
            }
            Prepared::Once(body) => {
                self.body = Payload::Once(body);
                false
            }
        };
        Event::BodyReady { replayable }
    }

    /// Polls the body being read ahead.
    fn poll_body(&mut self, cx: &mut Context<'_>) -> Poll<Result<Event, Error>> {
        let Payload::Preparing(preparing) = &mut self.body else {
            return Poll::Pending;
        };
        match preparing.poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(prepared)) => match self.mirror.as_mut() {
                // Read for the copies: the engine waits for its slot.
                Some(mirror) if mirror.reading => {
                    mirror.reading = false;
                    self.body = payload(prepared);
                    Poll::Ready(Ok(self.take_slot()))
                }
                _ => Poll::Ready(Ok(self.prepared(prepared))),
            },
            Poll::Ready(Err(e)) => {
                self.body = Payload::Gone;
                Poll::Ready(Err(body_error(e)))
            }
        }
    }

    /// Sends the unsent attempt once the future's own service is ready.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        flight: &mut Slot<'_, S::Future>,
    ) -> Poll<Result<(), Error>> {
        let Some(svc) = self.svc.as_mut() else {
            return Poll::Ready(Err(Error::new(
                ErrorKind::Upstream,
                "no service for a retry",
            )));
        };
        if !self.svc_ready {
            match svc.poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Err(Error::from_boxed(
                        e.into(),
                        ErrorKind::Upstream,
                        "the inner service failed",
                    )));
                }
                Poll::Ready(Ok(())) => self.svc_ready = true,
            }
        }
        if let Some((number, timeout)) = self.unsent.take()
            && let Some(mut svc) = self.svc.take()
        {
            self.svc_ready = false;
            let sent = self.send_attempt(&mut svc, number, timeout);
            self.svc = Some(svc);
            flight.set(Some(sent?));
        }
        Poll::Ready(Ok(()))
    }

    /// Sends attempt `number` with `svc` (ready): its request, with its
    /// slot, endpoint and entry in the decision record, goes straight to
    /// the service (not moved out first: it is large).
    fn send_attempt(
        &mut self,
        svc: &mut S,
        number: u32,
        timeout: Option<Duration>,
    ) -> Result<S::Future, Error> {
        if self.mirror.is_some()
            && let Some(mirror) = self.mirror.take()
        {
            self.send_mirrors(*mirror);
        }
        let body = match std::mem::replace(&mut self.body, Payload::Gone) {
            Payload::Kept(kept) => {
                let body = MeshBody::replay(&kept);
                self.body = Payload::Kept(kept);
                body
            }
            Payload::Raw(body) => MeshBody::new(body),
            Payload::Once(body) => body,
            Payload::Preparing(_) | Payload::Gone => return Err(already_sent()),
        };
        // Taken and sent in one expression: the head is large, and a
        // branch between the two costs a move.
        let mut req = match self.head.take() {
            Some(head) => {
                let mut req = Request::from_parts(head, body);
                // A retry's copy was made without the decision record
                // (see `copy_head`): the record goes back in (rare path).
                if number > 1
                    && let Some(record) = &self.record
                    && req.extensions().get::<DecisionRecord>().is_none()
                {
                    req.extensions_mut().insert(record.clone());
                }
                req
            }
            None => {
                return Err(Error::new(
                    ErrorKind::InvalidRequest,
                    "the request was already sent",
                ));
            }
        };
        // Another attempt may follow: it gets a copy, made before this
        // attempt's own headers and target are added (sending the head
        // held and keeping the copy sends the caller's own head first,
        // whose maps have room for those additions).
        if number < self.exchange.attempt_budget() {
            // Filled where it stays (a head returned and then stored was
            // two moves of its 224 bytes).
            let copy = self.head.insert(Request::new(()).into_parts().0);
            copy_head_into(
                copy,
                req.method(),
                req.uri(),
                req.version(),
                req.headers(),
                req.extensions(),
                self.record.is_some(),
            );
        }
        req.headers_mut()
            .insert(ATTEMPT_COUNT_NAME, attempt_count(number));
        if let Some(timeout) = timeout {
            write_timeout_header(req.headers_mut(), self.grpc, timeout);
        }
        let (Some(active), Some(slot)) = (self.picked.take(), self.slot.take()) else {
            return Err(Error::new(
                ErrorKind::Upstream,
                "an attempt without an endpoint or a breaker slot",
            ));
        };
        prepare_target(&mut req, &active, &self.state, &self.config)?;
        self.number = number;
        self.attempt = Some(Attempt::start(
            active,
            slot,
            self.retry.take(),
            self.record.as_ref(),
            req.headers_mut(),
        ));
        Ok(svc.call(req))
    }

    /// The attempt in flight ended with `result`: reported to outlier
    /// detection (unless its status is still to come), and turned into the
    /// engine's event and what [`run`](Self::run) keeps of it.
    fn landed(
        &mut self,
        result: Result<Response<RB>, S::Error>,
        into: &mut Landed<Response<RB>>,
    ) -> Event {
        let attempt = self.number;
        match result {
            Ok(response) => {
                let begun = status_in_trailers(&response);
                // A plain HTTP request's response is not searched for a
                // `grpc-status` (see `outcome_of_request`).
                let outcome = outcome_of_request(&response, self.grpc);
                if !begun && let Some(a) = &self.attempt {
                    a.report(&outcome, &self.stats);
                }
                let event = Event::Outcome {
                    attempt,
                    outcome,
                    begun,
                };
                *into = Landed {
                    result: Result_::Got(Ok(response)),
                    outcome,
                    begun,
                };
                event
            }
            Err(e) => {
                let e: BoxError = e.into();
                if overflow_message(&e).is_some() {
                    let overflow = overflow_of(&*e);
                    *into = Landed {
                        result: Result_::Got(Err(e)),
                        ..Landed::none()
                    };
                    return Event::PendingOverflow { attempt, overflow };
                }
                let outcome = outcome_of_error(&*e);
                if let Some(a) = &self.attempt {
                    a.report(&outcome, &self.stats);
                }
                let event = Event::Outcome {
                    attempt,
                    outcome,
                    begun: false,
                };
                *into = Landed {
                    result: Result_::Got(Err(e)),
                    outcome,
                    begun: false,
                };
                event
            }
        }
    }

    /// The route's name, for messages.
    fn route(&self) -> &Name {
        &self.exchange.policy().name
    }

    fn answer(&mut self, local: Local, result: Result_<Response<RB>>) -> Output<RB> {
        let reply = match local {
            Local::FaultAbort(status) => LocalReply::fault_abort(status),
            Local::Overflow {
                overflow,
                attempt: None,
            } => LocalReply::overflow(format!("cluster {:?}: {overflow}", self.state.name())),
            Local::Overflow {
                overflow,
                attempt: Some(_),
            } => {
                if let Some(attempt) = &mut self.attempt {
                    attempt.failed(ResponseFlags::UPSTREAM_OVERFLOW, None);
                }
                let message = match &result {
                    Result_::Got(Err(e)) => overflow_message(e),
                    _ => None,
                };
                LocalReply::overflow(
                    message
                        .unwrap_or_else(|| format!("cluster {:?}: {overflow}", self.state.name())),
                )
            }
            Local::DeadlinePassed => LocalReply::timeout(format!(
                "the deadline of the request had passed before it was sent to cluster {:?}",
                self.state.name()
            )),
            Local::Timeout { after } => LocalReply::timeout(format!(
                "upstream request timeout: cluster {:?} did not answer within {after:?} \
                 (route {:?})",
                self.state.name(),
                self.route()
            )),
            Local::PerTryTimeout { after, .. } => {
                let endpoint = match &mut self.attempt {
                    Some(attempt) => {
                        attempt.failed(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, None);
                        attempt.active.address().to_string()
                    }
                    None => "?".to_owned(),
                };
                LocalReply::timeout(format!(
                    "upstream request timeout: endpoint {endpoint} of cluster {:?} did not \
                     answer within the per-try timeout of {after:?}",
                    self.state.name()
                ))
            }
            Local::NoEndpoint => return Err(no_eligible_endpoint(&self.state, self.route())),
        };
        // What the attempt held (its slots) goes with the answer, and so
        // does its result.
        self.attempt = None;
        drop(result);
        Ok(local_response(reply, self.grpc))
    }

    fn deliver(
        &mut self,
        deadline: Option<Duration>,
        landed: &mut Landed<Response<RB>>,
    ) -> Output<RB> {
        let Some(mut attempt) = self.attempt.take() else {
            return Err(polled_after_completion());
        };
        match std::mem::replace(&mut landed.result, Result_::None) {
            Result_::Got(Ok(mut response)) => {
                if let Some(traffic) = &self.exchange.policy().policy.traffic {
                    traffic.apply_response_headers(Some(self.destination), response.headers_mut());
                }
                let timeout = match (deadline, self.clock) {
                    (Some(deadline), Some(clock)) => {
                        let at = clock + deadline;
                        // The request's timer, if it had one, runs on.
                        let sleep = match self.sleep.take() {
                            Some(mut sleep) => {
                                sleep.as_mut().reset(at);
                                sleep
                            }
                            None => Box::pin(tokio::time::sleep_until(at)),
                        };
                        Some(Box::new(BodyTimeout {
                            sleep,
                            grpc: self.grpc,
                            limit: deadline,
                        }))
                    }
                    _ => None,
                };
                let finish = Finish::new(attempt, &response, landed.begun, self.stats.clone());
                Ok(response.map(|body| ResponseBody::new(body, Some(finish), timeout)))
            }
            Result_::Got(Err(e)) => {
                attempt.failed(outcome_flags(&landed.outcome), Some(&e));
                Err(upstream_error(e, &attempt.active))
            }
            Result_::TimedOut | Result_::None => Err(polled_after_completion()),
        }
    }
}

impl<S, B, RB> Future for ResponseFuture<S, B, RB>
where
    S: Service<Request<MeshBody<B>>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
    B: http_body::Body + Unpin,
    B::Error: Into<BoxError>,
    RB: http_body::Body,
{
    type Output = Output<RB>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (core, mut flight) = match self.project().kind.project() {
            KindProj::Driving { core, flight } => (core, flight),
            KindProj::Ready { result } => {
                return Poll::Ready(
                    result
                        .take()
                        .unwrap_or_else(|| Err(polled_after_completion())),
                );
            }
            KindProj::Boxed { future } => return future.as_mut().poll(cx),
        };
        loop {
            // The result of an attempt that ends lands here, where `run`
            // reads it (written once in place: passed along by value, it
            // was moved three more times).
            let mut landed = Landed::none();
            if core.exchange.is_done() {
                return Poll::Ready(Err(polled_after_completion()));
            }
            let event = 'event: {
                // An attempt waiting for the service to be ready.
                if core.unsent.is_some() {
                    match core.poll_send(cx, &mut Slot::Pinned(flight.as_mut())) {
                        Poll::Ready(Ok(())) => break 'event Some(Event::Done),
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {}
                    }
                }
                // The body being read ahead.
                match core.poll_body(cx) {
                    Poll::Ready(Ok(event)) => break 'event Some(event),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
                // The attempt in flight.
                if let Some(future) = flight.as_mut().as_pin_mut()
                    && let Poll::Ready(result) = future.poll(cx)
                {
                    flight.set(None);
                    break 'event Some(core.landed(result, &mut landed));
                }
                // The one timer.
                let want = core.exchange.next_timer();
                if want != core.timer {
                    core.timer = want;
                    if let Some(t) = want {
                        let clock = *core.clock.get_or_insert_with(Instant::now);
                        let at = clock + t;
                        match core.sleep.as_mut() {
                            Some(sleep) => sleep.as_mut().reset(at),
                            None => core.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                        }
                    }
                }
                if core.timer.is_some()
                    && let Some(sleep) = core.sleep.as_mut()
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    core.timer = None;
                    break 'event Some(Event::Timer);
                }
                None
            };
            let Some(event) = event else {
                return Poll::Pending;
            };
            if let Poll::Ready(out) = core.run(
                event,
                &mut landed,
                cx,
                None,
                &mut Slot::Pinned(flight.as_mut()),
            ) {
                return Poll::Ready(out);
            }
        }
    }
}

/// The payload of a prepared body.
fn payload<B>(prepared: Prepared<B>) -> Payload<B> {
    match prepared {
        Prepared::Kept(kept) => Payload::Kept(kept),
        Prepared::Once(body) => Payload::Once(body),
    }
}

/// `x-envoy-attempt-count`, without formatting the usual numbers.
fn attempt_count(n: u32) -> HeaderValue {
    match n {
        1 => HeaderValue::from_static("1"),
        2 => HeaderValue::from_static("2"),
        3 => HeaderValue::from_static("3"),
        n => HeaderValue::from(n),
    }
}

/// The limit of a pool overflow error (its source is the breaker's
/// [`Overflow`]); the pending-requests limit if the chain does not say.
fn overflow_of(e: &(dyn std::error::Error + 'static)) -> Overflow {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(overflow) = e.downcast_ref::<Overflow>() {
            return *overflow;
        }
        next = e.source();
    }
    Overflow {
        limit: Limit::MaxPendingRequests,
        value: 0,
    }
}

/// A copy of a request head with another body.
fn request_like<T>(head: &http::request::Parts, body: T) -> Request<T> {
    let copy = copy_head(
        &head.method,
        &head.uri,
        head.version,
        &head.headers,
        &head.extensions,
        false,
    );
    Request::from_parts(copy, body)
}

/// A copy of a request head, field by field: an empty header map or
/// extension map is not cloned (a clone of an empty `HeaderMap` still
/// walks its vectors), so a bare request's copy costs its URI's
/// reference counts.
///
/// With `record_held` (the future holds the request's [`DecisionRecord`]
/// and puts it back into a retry's head, see `send_attempt`), a map whose
/// one entry is that record is not cloned either: under a telemetry layer
/// that is the usual map, and its clone was three allocations (the map,
/// its table, the boxed record) freed again when the request ended
/// without a retry.
fn copy_head(
    method: &http::Method,
    uri: &http::Uri,
    version: http::Version,
    headers: &http::HeaderMap,
    extensions: &http::Extensions,
    record_held: bool,
) -> http::request::Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy_head_into(
        &mut copy,
        method,
        uri,
        version,
        headers,
        extensions,
        record_held,
    );
    copy
}

/// [`copy_head`] into `copy`, a head without headers or extensions.
fn copy_head_into(
    copy: &mut http::request::Parts,
    method: &http::Method,
    uri: &http::Uri,
    version: http::Version,
    headers: &http::HeaderMap,
    extensions: &http::Extensions,
    record_held: bool,
) {
    copy.method = method.clone();
    copy.uri = uri.clone();
    copy.version = version;
    if !headers.is_empty() {
        copy.headers = headers.clone();
    }
    // The record held came from this map (`plan` reads it there) and
    // nothing takes it out of a request's head: with one entry, that
    // entry is the record (no lookup, which cost a fifth of the copy).
    let only_record = record_held && extensions.len() == 1;
    if !extensions.is_empty() && !only_record {
        copy.extensions = extensions.clone();
    }
}

fn no_eligible_endpoint(state: &ClusterState, route: &Name) -> Error {
    Error::new(
        ErrorKind::NoEndpoints,
        format!(
            "cluster {:?} has no healthy endpoint: {} of {} ejected by outlier detection \
             (route {route:?})",
            state.name(),
            state.ejected(),
            state.len()
        ),
    )
}

fn body_error(e: BoxError) -> Error {
    Error::new(
        ErrorKind::InvalidRequest,
        "reading the request body failed before sending it",
    )
    .with_source(e)
}

fn already_sent() -> Error {
    Error::new(
        ErrorKind::InvalidRequest,
        "the request body was already sent and cannot be replayed",
    )
}

fn polled_after_completion() -> Error {
    Error::new(ErrorKind::InvalidRequest, "future polled after completion")
}

impl<S, B, RB> fmt::Debug for ResponseFuture<S, B, RB>
where
    S: Service<Request<MeshBody<B>>, Response = Response<RB>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::Full;
    use std::convert::Infallible;
    use std::mem::size_of;

    /// An app that answers at once (the instruction bench's).
    #[derive(Clone)]
    struct Instant;

    impl<B> Service<Request<B>> for Instant {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _req: Request<B>) -> Self::Future {
            std::future::ready(Ok(Response::new(Full::default())))
        }
    }

    type Body = Full<Bytes>;

    /// The sizes of what a request moves: every byte of the future and of
    /// the response body is copied each time they move (`memcpy` was the
    /// largest cost of a call). The bounds (measured sizes, with a little
    /// room) catch a regrowth: at the time, the future was 936 bytes, `Core`
    /// 792, `Routed` 120, `Exchange` 192, `ResponseBody` 136 (its route
    /// timeout boxed), `Finish` 88. A `ResponseBody` of 128 bytes or less
    /// moves without a `memcpy` call: `Finish` 80 would get it there.
    #[test]
    fn the_state_of_a_request_stays_small() {
        let future = size_of::<ResponseFuture<Instant, Body, Body>>();
        let core = size_of::<Core<Instant, Body, Body>>();
        let routed = size_of::<Routed>();
        let exchange = size_of::<Exchange<RouteHandle>>();
        let body = size_of::<ResponseBody<Body>>();
        let finish = size_of::<Finish>();
        let attempt = size_of::<Attempt>();
        let head = size_of::<http::request::Parts>();
        println!(
            "ResponseFuture {future}, Core {core}, Routed {routed}, Exchange {exchange}, \
             ResponseBody {body}, Finish {finish}, Attempt {attempt}, Parts {head}"
        );
        assert!(future <= 960, "ResponseFuture is {future} bytes");
        assert!(core <= 800, "Core is {core} bytes");
        assert!(routed <= 160, "Routed is {routed} bytes");
        assert!(exchange <= 200, "Exchange is {exchange} bytes");
        assert!(body <= 136, "ResponseBody is {body} bytes");
        assert!(finish <= 88, "Finish is {finish} bytes");
    }

    /// A caller's extension, next to the decision record.
    #[derive(Clone, Debug, PartialEq)]
    struct Mark(u32);

    /// Answers 503 to the first `fail` calls, and notes per call whether
    /// the request carried the decision record and the caller's `Mark`.
    #[derive(Clone, Default)]
    struct Flaky {
        fail: Arc<std::sync::Mutex<u32>>,
        seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    }

    /// Per call: whether the record was there, and the caller's mark.
    type Seen = (bool, Option<Mark>);

    impl<B> Service<Request<B>> for Flaky {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<B>) -> Self::Future {
            let record = req.extensions().get::<DecisionRecord>().is_some();
            let mark = req.extensions().get::<Mark>().cloned();
            self.seen.lock().unwrap().push((record, mark));
            let mut fail = self.fail.lock().unwrap();
            let mut response = Response::new(Full::default());
            if *fail > 0 {
                *fail -= 1;
                *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            }
            std::future::ready(Ok(response))
        }
    }

    /// The routing tests' snapshot (one route to cluster `c`, endpoints on
    /// ports 1-3) with Istio's default retries and no backoff.
    fn retrying_snapshot() -> mesh_core::Snapshot {
        use mesh_core::model::{RetryPolicy, RoutePolicy};
        let policy = RoutePolicy {
            retry: Some(RetryPolicy {
                backoff_base: Duration::ZERO,
                backoff_max: Duration::ZERO,
                ..RetryPolicy::istio_default()
            }),
            ..RoutePolicy::default()
        };
        super::super::service::tests::snapshot(&[1, 2, 3], policy)
    }

    /// The head kept for a retry is copied without the decision record
    /// when it is the map's one entry (`copy_head`): every attempt must
    /// still carry it, and a map with more entries is copied whole.
    #[tokio::test]
    async fn retries_carry_the_callers_extensions_and_the_record() {
        use tower::{Layer, ServiceExt};
        for with_mark in [false, true] {
            let inner = Flaky::default();
            *inner.fail.lock().unwrap() = 2;
            let mut mesh =
                crate::MeshLayer::new(crate::source::StaticSource::new(retrying_snapshot()))
                    .layer(inner.clone());
            let record = DecisionRecord::new();
            let mut req = Request::get("http://svc/")
                .body(Full::<Bytes>::default())
                .unwrap();
            req.extensions_mut().insert(record.clone());
            if with_mark {
                req.extensions_mut().insert(Mark(7));
            }
            ServiceExt::<Request<Full<Bytes>>>::ready(&mut mesh)
                .await
                .unwrap();
            let response = mesh.call(req).await.unwrap();
            assert_eq!(response.status(), 200);
            assert_eq!(record.attempts(), 3);
            let mark = with_mark.then_some(Mark(7));
            assert_eq!(
                *inner.seen.lock().unwrap(),
                [(true, mark.clone()), (true, mark.clone()), (true, mark)]
            );
        }
    }
}

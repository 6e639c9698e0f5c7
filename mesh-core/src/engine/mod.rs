//! The request engine: one exchange of the client stack (a request, its
//! attempts, and the answer) as a sans-io state machine.
//!
//! Envoy splits this between its fault filter, its router and
//! `RetryStateImpl`; here one [`Exchange`] makes every decision of a
//! request, in Envoy's order, and the client stack (mesh-tower's
//! `ResponseFuture`) only performs what it is told:
//!
//! 1. **Fault** (Istio `fault`): a delay, then maybe an abort answered
//!    locally ([`fault::decide`]).
//! 2. **Deadline**: the route timeout, started once the fault delay is
//!    over, and the caller's deadline; the earlier wins. One already passed
//!    is answered at once (`DT`); one that fires later answers `UT`.
//! 3. **Body**: when a retry is possible, the body is read ahead to learn
//!    whether it can be replayed; a body that cannot is sent once (the
//!    attempt budget is then one). A body the driver already holds whole
//!    ([`Start::replayable`], an empty one) is not read.
//! 4. **Per attempt**: a circuit-breaker slot, an endpoint not tried yet,
//!    then the attempt, announcing the time it has (the rest of the
//!    deadline, or the per-try timeout if shorter).
//! 5. **Outcome**: a success, a failure no `retryOn` condition names, or a
//!    status that comes in trailers (the response has begun) is delivered.
//!    A retriable failure is retried while the attempt budget lasts, the
//!    backoff ends before the deadline, and the cluster's retry budget
//!    grants it; otherwise the last result is delivered.
//!
//! The machine is driven by [`Exchange::step`]: every call hands in one
//! [`Event`] (what happened since the last [`Action`]) and returns the next
//! action. Time is a [`Duration`] since the exchange started, passed with
//! every event, so tests need no clock; [`Exchange::next_timer`] says when
//! the driver must wake the machine up with [`Event::Timer`] (at most one
//! timer; `None` when nothing can time out). Every decision worth recording
//! is reported to an [`Observer`]. The answers a driver gives right after
//! the action that asked for them (a slot granted, an endpoint picked, an
//! attempt sent) may go through [`Exchange::slot_granted`],
//! [`Exchange::picked`] and [`Exchange::sent`] instead: the same
//! transitions, without `step`'s dispatch.
//!
//! Attempts are numbered from 1 and kept in a set of attempts in flight:
//! today at most one is in flight at a time, but the set is what hedging
//! (a later attempt started on a per-try timeout, without cancelling the
//! first) needs.
//!
//! ```
//! use std::time::Duration;
//! use mesh_core::engine::{Action, Event, Exchange, Start};
//! use mesh_core::model::RoutePolicy;
//! use mesh_core::retry::Outcome;
//!
//! let policy = RoutePolicy::default();
//! let mut exchange = Exchange::new(&policy, Start::default());
//! let now = Duration::ZERO;
//! let mut random = || 0u64;
//! let mut step = |x: &mut Exchange<&RoutePolicy>, e| x.step(now, e, &mut (), &mut random);
//! assert_eq!(step(&mut exchange, Event::Start), Action::TakeSlot);
//! assert_eq!(step(&mut exchange, Event::SlotGranted), Action::Pick { spill: false });
//! assert_eq!(
//!     step(&mut exchange, Event::Picked { endpoint: 0 }),
//!     Action::Send { attempt: 1, timeout: None }
//! );
//! assert_eq!(step(&mut exchange, Event::Done), Action::Wait);
//! assert_eq!(exchange.next_timer(), None);
//! let outcome = Event::Outcome { attempt: 1, outcome: Outcome::http(200), begun: false };
//! assert_eq!(step(&mut exchange, outcome), Action::Deliver { attempt: 1, deadline: None });
//! ```

use std::borrow::Borrow;
use std::time::Duration;

use crate::breaker::Overflow;
use crate::fault;
use crate::model::{AbortStatus, FaultPolicy, RetryOn, RetryPolicy, RoutePolicy};
use crate::retry::{self, Outcome, RetryRefusal};

#[cfg(test)]
mod tests;

/// At most this many attempts of one exchange are in flight at once.
/// Without hedging the engine never starts a second one before the first
/// is over; the room is there for it.
const IN_FLIGHT: usize = 2;

/// What the driver knows when the request starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Start {
    /// The caller's deadline, from now (its `Deadline`, or a gRPC
    /// `grpc-timeout`); `None` if it has none.
    pub deadline: Option<Duration>,
    /// The driver already holds the whole body, replayable (an empty
    /// body, such as a GET's): a route that retries needs no
    /// [`Action::PrepareBody`], and its attempt budget is known at once.
    /// Saves a step on most requests of a route with Istio's default
    /// retries.
    pub replayable: bool,
}

/// Something that happened, handed to [`Exchange::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The request starts (the first event, once).
    Start,
    /// The last action, which has no result of its own, is done
    /// ([`Action::Send`], [`Action::Cancel`], [`Action::Release`]).
    Done,
    /// The body asked for by [`Action::PrepareBody`] is ready:
    /// `replayable` when it was kept whole, so attempts can resend it.
    BodyReady {
        /// Whether every attempt can send the body.
        replayable: bool,
    },
    /// The circuit breaker granted a request slot ([`Action::TakeSlot`]).
    SlotGranted,
    /// The circuit breaker refused a request slot.
    Overflow(Overflow),
    /// An endpoint was picked ([`Action::Pick`]): its index in the
    /// cluster.
    Picked {
        /// The endpoint's index.
        endpoint: usize,
    },
    /// No endpoint could be picked (none left that is not ejected).
    NoEndpoint,
    /// An attempt in flight ended.
    Outcome {
        /// The attempt's number.
        attempt: u32,
        /// How it ended.
        outcome: Outcome,
        /// The response has begun and its status comes later (a gRPC
        /// status in trailers): it cannot be retried any more.
        begun: bool,
    },
    /// The connection pool refused an attempt: its pending-requests limit
    /// overflowed (the attempt got no connection, and is over).
    PendingOverflow {
        /// The attempt's number.
        attempt: u32,
        /// The limit.
        overflow: Overflow,
    },
    /// The cluster's retry budget granted a retry ([`Action::AskRetry`]).
    RetryGranted,
    /// The cluster's retry budget refused it.
    RetryRefused(RetryRefusal),
    /// The timer of [`Exchange::next_timer`] fired.
    Timer,
}

/// What the driver must do next, returned by [`Exchange::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until an attempt ends or the timer of
    /// [`Exchange::next_timer`] fires.
    Wait,
    /// Read what is ready of the request body, keeping it whole if it can
    /// be (`keep`), then report [`Event::BodyReady`]. Without this action
    /// the body is sent once, as it comes.
    PrepareBody {
        /// Keep the body for replay if it is whole.
        keep: bool,
    },
    /// Take a request slot of the cluster's circuit breaker (held by the
    /// attempt about to start): report [`Event::SlotGranted`] or
    /// [`Event::Overflow`].
    TakeSlot,
    /// Pick an endpoint of the cluster, excluding those already tried
    /// ([`Exchange::tried`]): report [`Event::Picked`] or
    /// [`Event::NoEndpoint`].
    Pick {
        /// Istio `retryRemoteLocalities`: the pick may leave the closest
        /// locality for an endpoint not tried yet.
        spill: bool,
    },
    /// Send attempt `attempt` to the endpoint just picked, with the slot
    /// just taken, then report [`Event::Done`]; its result comes later as
    /// [`Event::Outcome`] or [`Event::PendingOverflow`].
    Send {
        /// The attempt's number (`x-envoy-attempt-count`).
        attempt: u32,
        /// The time the attempt has, to announce to the endpoint
        /// (`grpc-timeout` / `x-envoy-expected-rq-timeout-ms`); `None`
        /// when nothing bounds it.
        timeout: Option<Duration>,
    },
    /// Drop attempt `attempt`, still in flight: its per-try timeout fired
    /// (its outcome is [`Outcome::PerTryTimeout`]). Report [`Event::Done`].
    Cancel {
        /// The attempt's number.
        attempt: u32,
    },
    /// Attempt `attempt` is over and will be retried: release it (its
    /// slots, its response) before the backoff. Report [`Event::Done`].
    Release {
        /// The attempt's number.
        attempt: u32,
    },
    /// Ask the cluster's retry budget for a retry of `attempt` (whose own
    /// retry slot, if any, is given back first): report
    /// [`Event::RetryGranted`] or [`Event::RetryRefused`].
    AskRetry {
        /// The attempt to retry.
        attempt: u32,
    },
    /// Answer the request locally; the exchange is over.
    Answer(Local),
    /// Return attempt `attempt`'s result (its response, or its error) to
    /// the caller; the exchange is over.
    Deliver {
        /// The attempt whose result is returned.
        attempt: u32,
        /// The response body must end by then (since the exchange
        /// started), or be cut with a timeout; `None` when no deadline.
        deadline: Option<Duration>,
    },
}

/// A local answer: the mesh answers the request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Fault injection aborted the request (`FI`).
    FaultAbort(AbortStatus),
    /// A circuit-breaker limit overflowed (`UO`): the breaker's, or the
    /// pool's for attempt `attempt`.
    Overflow {
        /// The limit.
        overflow: Overflow,
        /// The attempt the pool refused; `None` for the breaker's own
        /// request limit (no attempt was sent).
        attempt: Option<u32>,
    },
    /// The deadline had passed before anything was sent (`DT`).
    DeadlinePassed,
    /// The route timeout or the caller's deadline fired (`UT`), this long
    /// after the exchange started.
    Timeout {
        /// When the deadline was, since the exchange started.
        after: Duration,
    },
    /// The per-try timeout of the last attempt fired and it is not
    /// retried (`UT`).
    PerTryTimeout {
        /// The attempt.
        attempt: u32,
        /// The per-try timeout.
        after: Duration,
    },
    /// No endpoint could be picked (`UH`).
    NoEndpoint,
}

/// Hears every decision of an exchange worth recording (stats, decision
/// record, logs). Every method does nothing by default; `()` is the
/// observer that hears nothing.
pub trait Observer {
    /// Fault injection delays the request by `delay` (`DI`).
    fn fault_delay(&mut self, delay: Duration) {
        let _ = delay;
    }
    /// Fault injection aborts the request with `status` (`FI`).
    fn fault_abort(&mut self, status: AbortStatus) {
        let _ = status;
    }
    /// The caller's deadline leaves `remaining` when the request starts.
    fn deadline_remaining(&mut self, remaining: Duration) {
        let _ = remaining;
    }
    /// The deadline had passed before the request was sent (`DT`).
    fn deadline_passed(&mut self) {}
    /// The request timed out (`UT`): the route timeout or the caller's
    /// deadline fired, or the last attempt's per-try timeout did.
    fn timed_out(&mut self) {}
    /// Attempt `attempt`'s per-try timeout fired.
    fn per_try_timeout(&mut self, attempt: u32) {
        let _ = attempt;
    }
    /// Attempt `attempt` will be retried under `reason`, after `backoff`.
    fn retrying(&mut self, attempt: u32, reason: RetryOn, backoff: Duration) {
        let _ = (attempt, reason, backoff);
    }
    /// The cluster's retry limit refused a retry (`URX` in Envoy's sense).
    fn retry_refused(&mut self, refusal: RetryRefusal) {
        let _ = refusal;
    }
    /// The last allowed attempt failed in a way the policy retries.
    fn retries_exhausted(&mut self) {}
    /// A circuit-breaker limit overflowed (`UO`).
    fn overflow(&mut self, overflow: Overflow) {
        let _ = overflow;
    }
    /// No endpoint was left to pick (`UH`).
    fn no_endpoint(&mut self) {}
}

impl Observer for () {}

/// Random numbers for the decisions that need them (fault, backoff):
/// uniform `u64`s. Any `FnMut() -> u64` is one, so a driver can make its
/// generator only when a number is asked for.
pub trait Entropy {
    /// A uniform `u64`.
    fn random(&mut self) -> u64;
}

impl<F: FnMut() -> u64> Entropy for F {
    fn random(&mut self) -> u64 {
        self()
    }
}

/// Whether `outcome` is a success no condition of `policy` can retry: a
/// 2xx without a gRPC error status, unless the route names its code in
/// `retriable_status_codes`. Decided without [`retry::retry_reason`]'s
/// walk over every condition: it is the outcome of almost every attempt.
#[allow(
    clippy::manual_contains,
    reason = "a list of one or two codes: `<[u16]>::contains` took 24 Ir per call, the loop a few"
)]
fn settled(policy: &RetryPolicy, outcome: &Outcome) -> bool {
    match *outcome {
        Outcome::Status {
            http: code @ 200..=299,
            grpc: None | Some(retry::grpc_status::OK),
        } => {
            !(policy.retry_on.contains(RetryOn::RETRIABLE_STATUS_CODES)
                && policy.retriable_status_codes.iter().any(|&c| c == code))
        }
        _ => false,
    }
}

/// One attempt in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Flight {
    attempt: u32,
    /// When its per-try timeout fires, since the exchange started.
    per_try_at: Option<Duration>,
}

/// Inline room for the endpoints tried: Istio's default policy makes at
/// most 3 attempts, so most exchanges never allocate.
const TRIED_INLINE: usize = 3;

/// The endpoints tried, in order: inline up to [`TRIED_INLINE`], then on
/// the heap (an allocation per request was a tenth of the fast path).
#[derive(Debug, Clone)]
enum Tried {
    Inline {
        len: u8,
        slots: [usize; TRIED_INLINE],
    },
    Heap(Vec<usize>),
}

impl Default for Tried {
    fn default() -> Self {
        Tried::Inline {
            len: 0,
            slots: [0; TRIED_INLINE],
        }
    }
}

impl Tried {
    fn as_slice(&self) -> &[usize] {
        match self {
            Tried::Inline { len, slots } => &slots[..usize::from(*len)],
            Tried::Heap(v) => v,
        }
    }

    // Inline: called once per attempt, out of line it cost a call and
    // the spills around it (24 Ir) for a store and an increment.
    #[inline]
    fn push(&mut self, endpoint: usize) {
        match self {
            Tried::Inline { len, slots } if usize::from(*len) < TRIED_INLINE => {
                slots[usize::from(*len)] = endpoint;
                *len += 1;
            }
            Tried::Inline { slots, .. } => {
                let mut v = slots.to_vec();
                v.push(endpoint);
                *self = Tried::Heap(v);
            }
            Tried::Heap(v) => v.push(endpoint),
        }
    }
}

/// Where the exchange is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before [`Event::Start`].
    New,
    /// The fault delay runs until the timer; then `abort` or go on.
    FaultDelay {
        until: Duration,
        abort: Option<AbortStatus>,
    },
    /// [`Action::PrepareBody`] was asked.
    Body,
    /// [`Action::TakeSlot`] was asked.
    Slot,
    /// [`Action::Pick`] was asked.
    Pick,
    /// [`Action::Send`] was asked: the attempt is in flight once it is
    /// done.
    Sending { flight: Flight },
    /// Attempts are in flight.
    Flying,
    /// [`Action::Cancel`] was asked for `attempt` (per-try timeout).
    Cancelling { attempt: u32 },
    /// [`Action::AskRetry`] was asked for `attempt`.
    Asking { retry: Retry },
    /// [`Action::Release`] was asked for the attempt being retried.
    Releasing { retry: Retry },
    /// Waiting for the backoff to end.
    Backoff { until: Duration },
    /// The exchange is over.
    Done,
}

/// A retry being decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Retry {
    attempt: u32,
    reason: RetryOn,
    backoff: Duration,
    /// The attempt timed out (per try) rather than got a result.
    timed_out: bool,
}

/// The decisions of one request (see the [module docs](self)).
///
/// The route's policy is read through `P`, any [`Borrow`] of a
/// [`RoutePolicy`]: a reference, or a handle that keeps the route alive
/// (a driver's exchange outlives the snapshot it was routed with). It is
/// not copied: the exchange is part of every request's state, which a
/// driver moves around, and the policies are most of a route's size.
#[derive(Debug, Clone)]
pub struct Exchange<P> {
    /// The route's policy.
    policy: P,
    /// Whether the route can retry at all (a retry policy with retries
    /// and conditions).
    retries: bool,
    /// The caller's deadline, since the exchange started.
    caller: Option<Duration>,
    /// The overall deadline (route timeout or caller's), once known.
    deadline: Option<Duration>,
    /// Attempts allowed (1 until the body is known replayable).
    budget: u32,
    /// [`Start::replayable`].
    replayable: bool,
    /// Attempts started; the last one's number.
    started: u32,
    in_flight: [Option<Flight>; IN_FLIGHT],
    /// Endpoints tried (or in flight), by index.
    tried: Tried,
    phase: Phase,
}

impl<P: Borrow<RoutePolicy>> Exchange<P> {
    /// An exchange on a route with `policy`.
    pub fn new(policy: P, start: Start) -> Self {
        let retries = policy
            .borrow()
            .retry
            .as_ref()
            .is_some_and(|r| r.num_retries > 0 && !r.retry_on.is_empty());
        Exchange {
            policy,
            retries,
            caller: start.deadline,
            deadline: None,
            budget: 1,
            replayable: start.replayable,
            started: 0,
            in_flight: [None; IN_FLIGHT],
            tried: Tried::default(),
            phase: Phase::New,
        }
    }

    /// Whether the exchange reads `now` from its start: with no fault,
    /// deadline or per-try timeout it does not until it first asks for a
    /// timer (a backoff), so a driver may start its clock then and pass
    /// [`Duration::ZERO`] until that moment.
    pub fn needs_clock(&self) -> bool {
        let policy = self.policy.borrow();
        policy.fault.is_some()
            || policy.timeout.is_some()
            || self.caller.is_some()
            || self.per_try().is_some()
    }

    /// The route's policy.
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The route's retry policy, when it can retry at all.
    fn retry(&self) -> Option<&RetryPolicy> {
        if self.retries {
            self.policy.borrow().retry.as_ref()
        } else {
            None
        }
    }

    fn fault(&self) -> Option<&FaultPolicy> {
        self.policy.borrow().fault.as_ref()
    }

    fn per_try(&self) -> Option<Duration> {
        self.retry().and_then(|r| r.per_try_timeout)
    }

    /// Whether the route may retry this request at all (before the body is
    /// known): a driver keeps what a retry needs only then.
    pub fn may_retry(&self) -> bool {
        self.retries
    }

    /// Attempts allowed: `num_retries + 1` once the body is known
    /// replayable, else 1.
    pub fn attempt_budget(&self) -> u32 {
        self.budget
    }

    /// The endpoints tried so far (and in flight), by index: what
    /// [`Action::Pick`] excludes.
    pub fn tried(&self) -> &[usize] {
        self.tried.as_slice()
    }

    /// The overall deadline since the exchange started (route timeout or
    /// caller's deadline, whichever is earlier), once the request has
    /// started (after any fault delay).
    pub fn deadline(&self) -> Option<Duration> {
        self.deadline
    }

    /// When the driver must send [`Event::Timer`], since the exchange
    /// started: the earliest of the overall deadline, the per-try timeouts
    /// of attempts in flight, the end of a backoff or of a fault delay.
    /// `None`: nothing can time out now, arm no timer.
    pub fn next_timer(&self) -> Option<Duration> {
        let phase = match self.phase {
            Phase::FaultDelay { until, .. } | Phase::Backoff { until } => Some(until),
            Phase::Done | Phase::New => return None,
            _ => None,
        };
        let per_try = self
            .in_flight
            .iter()
            .flatten()
            .filter_map(|f| f.per_try_at)
            .min();
        [phase, per_try, self.deadline].into_iter().flatten().min()
    }

    /// Whether the exchange is over (an answer or a delivery was decided).
    pub fn is_done(&self) -> bool {
        // Not `==`: the derived `PartialEq` compares every field of
        // every phase and was not inlined (a call per poll).
        matches!(self.phase, Phase::Done)
    }

    /// Hands in `event`, at `now` since the exchange started, and returns
    /// what to do next. Decisions are reported to `observer`; `entropy`
    /// is asked for a number only when a decision is random (a fault
    /// fraction, a backoff).
    pub fn step(
        &mut self,
        now: Duration,
        event: Event,
        observer: &mut impl Observer,
        entropy: &mut impl Entropy,
    ) -> Action {
        match (self.phase, event) {
            (Phase::New, Event::Start) => self.start(now, observer, entropy),
            (Phase::Done, _) => Action::Wait,
            // The overall deadline bounds everything until delivery.
            (_, Event::Timer) if self.deadline.is_some_and(|d| d <= now) => {
                observer.timed_out();
                self.answer(Local::Timeout {
                    after: self.deadline.unwrap_or(now),
                })
            }
            (Phase::FaultDelay { until, abort }, Event::Timer) => {
                if until > now {
                    return Action::Wait;
                }
                match abort {
                    Some(status) => {
                        observer.fault_abort(status);
                        self.answer(Local::FaultAbort(status))
                    }
                    None => self.begin(now, observer),
                }
            }
            (Phase::Body, Event::BodyReady { replayable }) => {
                self.body_ready(replayable);
                self.take_slot()
            }
            (Phase::Slot, Event::SlotGranted) => self.slot_granted(),
            (Phase::Slot, Event::Overflow(overflow)) => {
                observer.overflow(overflow);
                self.answer(Local::Overflow {
                    overflow,
                    attempt: None,
                })
            }
            (Phase::Pick, Event::Picked { endpoint }) => self.picked(now, endpoint),
            (Phase::Pick, Event::NoEndpoint) => {
                observer.no_endpoint();
                self.answer(Local::NoEndpoint)
            }
            (Phase::Sending { .. }, Event::Done) => self.sent(),
            (
                Phase::Flying,
                Event::Outcome {
                    attempt,
                    outcome,
                    begun,
                },
            ) if self.land(attempt) => {
                self.outcome(now, attempt, outcome, begun, observer, entropy)
            }
            (Phase::Flying, Event::PendingOverflow { attempt, overflow }) if self.land(attempt) => {
                observer.overflow(overflow);
                self.answer(Local::Overflow {
                    overflow,
                    attempt: Some(attempt),
                })
            }
            (Phase::Flying, Event::Timer) => {
                let expired = self
                    .in_flight
                    .iter()
                    .flatten()
                    .find(|f| f.per_try_at.is_some_and(|at| at <= now))
                    .map(|f| f.attempt);
                match expired {
                    Some(attempt) => {
                        self.land(attempt);
                        observer.per_try_timeout(attempt);
                        self.phase = Phase::Cancelling { attempt };
                        Action::Cancel { attempt }
                    }
                    None => Action::Wait,
                }
            }
            (Phase::Cancelling { attempt }, Event::Done) => {
                self.phase = Phase::Flying;
                self.outcome(
                    now,
                    attempt,
                    Outcome::PerTryTimeout,
                    false,
                    observer,
                    entropy,
                )
            }
            (Phase::Asking { retry }, Event::RetryGranted) => {
                self.phase = Phase::Releasing { retry };
                Action::Release {
                    attempt: retry.attempt,
                }
            }
            (Phase::Asking { retry }, Event::RetryRefused(refusal)) => {
                observer.retry_refused(refusal);
                self.finish(retry.attempt, retry.timed_out, now, observer)
            }
            (Phase::Releasing { retry }, Event::Done) => {
                observer.retrying(retry.attempt, retry.reason, retry.backoff);
                if retry.backoff.is_zero() {
                    self.take_slot()
                } else {
                    self.phase = Phase::Backoff {
                        until: now.saturating_add(retry.backoff),
                    };
                    Action::Wait
                }
            }
            (Phase::Backoff { until }, Event::Timer) if until <= now => self.take_slot(),
            // Anything else (a timer that fired early, an event that does
            // not apply now) changes nothing.
            _ => Action::Wait,
        }
    }

    /// [`step`](Self::step) with [`Event::SlotGranted`], for a driver
    /// answering the [`Action::TakeSlot`] it was just given: the same
    /// transition (nothing is observed on it) without the dispatch over
    /// every phase and event, which each step of a request pays (a driver
    /// sends most of its events right after the action that asked for
    /// them). Out of turn it changes nothing and returns [`Action::Wait`],
    /// as `step` does.
    pub fn slot_granted(&mut self) -> Action {
        if !matches!(self.phase, Phase::Slot) {
            return Action::Wait;
        }
        self.phase = Phase::Pick;
        Action::Pick {
            spill: self.retry().is_some_and(|r| r.retry_remote_localities),
        }
    }

    /// [`step`](Self::step) with [`Event::Picked`] at `now`, for a driver
    /// answering the [`Action::Pick`] it was just given (see
    /// [`slot_granted`](Self::slot_granted)).
    pub fn picked(&mut self, now: Duration, endpoint: usize) -> Action {
        if !matches!(self.phase, Phase::Pick) {
            return Action::Wait;
        }
        self.send(now, endpoint)
    }

    /// [`step`](Self::step) with [`Event::Done`] for a driver that just
    /// sent the attempt of [`Action::Send`] (see
    /// [`slot_granted`](Self::slot_granted)): the attempt is in flight.
    pub fn sent(&mut self) -> Action {
        let Phase::Sending { flight } = self.phase else {
            return Action::Wait;
        };
        if let Some(slot) = self.in_flight.iter_mut().find(|f| f.is_none()) {
            *slot = Some(flight);
        }
        self.phase = Phase::Flying;
        Action::Wait
    }

    fn start(
        &mut self,
        now: Duration,
        observer: &mut impl Observer,
        entropy: &mut impl Entropy,
    ) -> Action {
        if let Some(policy) = self.fault() {
            let decision = fault::decide(policy, entropy.random(), entropy.random());
            if let Some(delay) = decision.delay {
                observer.fault_delay(delay);
                if !delay.is_zero() {
                    self.phase = Phase::FaultDelay {
                        until: now.saturating_add(delay),
                        abort: decision.abort,
                    };
                    return Action::Wait;
                }
            }
            if let Some(status) = decision.abort {
                observer.fault_abort(status);
                return self.answer(Local::FaultAbort(status));
            }
        }
        self.begin(now, observer)
    }

    /// After the fault: the deadline, then the body or the first slot.
    fn begin(&mut self, now: Duration, observer: &mut impl Observer) -> Action {
        let route = self.policy.borrow().timeout.map(|t| now.saturating_add(t));
        self.deadline = match (route, self.caller) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(caller) = self.caller {
            observer.deadline_remaining(caller.saturating_sub(now));
        }
        if self.deadline.is_some_and(|d| d <= now) {
            observer.deadline_passed();
            return self.answer(Local::DeadlinePassed);
        }
        if self.retries {
            if self.replayable {
                self.body_ready(true);
                return self.take_slot();
            }
            self.phase = Phase::Body;
            return Action::PrepareBody { keep: true };
        }
        self.take_slot()
    }

    /// The body is known: a replayable one lets every retry the policy
    /// allows be sent.
    fn body_ready(&mut self, replayable: bool) {
        if replayable && let Some(retries) = self.retry().map(|r| r.num_retries) {
            self.budget = retries.saturating_add(1);
        }
    }

    fn take_slot(&mut self) -> Action {
        self.phase = Phase::Slot;
        Action::TakeSlot
    }

    fn send(&mut self, now: Duration, endpoint: usize) -> Action {
        self.started += 1;
        let attempt = self.started;
        self.tried.push(endpoint);
        let per_try = self.per_try();
        let per_try_at = per_try.map(|t| now.saturating_add(t));
        let left = self.deadline.map(|d| d.saturating_sub(now));
        let timeout = match (left, per_try) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.phase = Phase::Sending {
            flight: Flight {
                attempt,
                per_try_at,
            },
        };
        Action::Send { attempt, timeout }
    }

    /// Takes `attempt` out of the set in flight; false if it was not there.
    fn land(&mut self, attempt: u32) -> bool {
        match self
            .in_flight
            .iter_mut()
            .find(|f| f.is_some_and(|f| f.attempt == attempt))
        {
            Some(slot) => {
                *slot = None;
                true
            }
            None => false,
        }
    }

    fn outcome(
        &mut self,
        now: Duration,
        attempt: u32,
        outcome: Outcome,
        begun: bool,
        observer: &mut impl Observer,
        entropy: &mut impl Entropy,
    ) -> Action {
        let timed_out = outcome == Outcome::PerTryTimeout;
        let reason = match self.retry() {
            Some(policy) if !begun && !settled(policy, &outcome) => {
                retry::retry_reason(policy, &outcome)
            }
            _ => None,
        };
        let (Some(reason), Some(policy)) = (reason, self.retry()) else {
            return self.finish(attempt, timed_out, now, observer);
        };
        if attempt >= self.budget {
            if self.budget > 1 {
                observer.retries_exhausted();
            }
            return self.finish(attempt, timed_out, now, observer);
        }
        let backoff = if retry::backoff_ceiling(policy, attempt).is_zero() {
            Duration::ZERO
        } else {
            retry::backoff(policy, attempt, entropy.random())
        };
        // A retry that could only start after the deadline is not made:
        // the request times out now rather than after a pointless wait.
        if let Some(deadline) = self.deadline
            && now.saturating_add(backoff) >= deadline
        {
            observer.timed_out();
            return self.answer(Local::Timeout { after: deadline });
        }
        let retry = Retry {
            attempt,
            reason,
            backoff,
            timed_out,
        };
        self.phase = Phase::Asking { retry };
        Action::AskRetry { attempt }
    }

    /// `attempt`'s result is the answer.
    fn finish(
        &mut self,
        attempt: u32,
        timed_out: bool,
        now: Duration,
        observer: &mut impl Observer,
    ) -> Action {
        if timed_out {
            observer.timed_out();
            return self.answer(Local::PerTryTimeout {
                attempt,
                after: self.per_try().unwrap_or(now),
            });
        }
        self.phase = Phase::Done;
        Action::Deliver {
            attempt,
            deadline: self.deadline,
        }
    }

    fn answer(&mut self, local: Local) -> Action {
        self.phase = Phase::Done;
        self.in_flight = [None; IN_FLIGHT];
        Action::Answer(local)
    }
}

//! Table tests of the request engine: each row is a route policy, the
//! request's start, and a script of events at given times with the action
//! each must produce and the timer it must leave armed; then the notes the
//! observer must have heard and the endpoints tried. No runtime, no clock.

use std::time::Duration;

use super::*;
use crate::breaker::Limit;
use crate::model::{FaultAbort, FaultDelay, Fraction};
use crate::retry::{RetryLimit, grpc_status};

/// What the observer heard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Note {
    FaultDelay(Duration),
    FaultAbort(AbortStatus),
    DeadlineRemaining(Duration),
    DeadlinePassed,
    TimedOut,
    PerTryTimeout(u32),
    Retrying(u32, RetryOn, Duration),
    RetryRefused(RetryLimit),
    RetriesExhausted,
    Overflow(Limit),
    NoEndpoint,
}

#[derive(Default)]
struct Notes(Vec<Note>);

impl Observer for Notes {
    fn fault_delay(&mut self, delay: Duration) {
        self.0.push(Note::FaultDelay(delay));
    }
    fn fault_abort(&mut self, status: AbortStatus) {
        self.0.push(Note::FaultAbort(status));
    }
    fn deadline_remaining(&mut self, remaining: Duration) {
        self.0.push(Note::DeadlineRemaining(remaining));
    }
    fn deadline_passed(&mut self) {
        self.0.push(Note::DeadlinePassed);
    }
    fn timed_out(&mut self) {
        self.0.push(Note::TimedOut);
    }
    fn per_try_timeout(&mut self, attempt: u32) {
        self.0.push(Note::PerTryTimeout(attempt));
    }
    fn retrying(&mut self, attempt: u32, reason: RetryOn, backoff: Duration) {
        self.0.push(Note::Retrying(attempt, reason, backoff));
    }
    fn retry_refused(&mut self, refusal: RetryRefusal) {
        self.0.push(Note::RetryRefused(refusal.limit));
    }
    fn retries_exhausted(&mut self) {
        self.0.push(Note::RetriesExhausted);
    }
    fn overflow(&mut self, overflow: Overflow) {
        self.0.push(Note::Overflow(overflow.limit));
    }
    fn no_endpoint(&mut self) {
        self.0.push(Note::NoEndpoint);
    }
}

/// One line of a script: at `at` ms, `event` → `then`, leaving the timer
/// at `timer` ms (`None`: no timer armed).
#[derive(Clone)]
struct Line {
    at: u64,
    event: Event,
    then: Action,
    timer: Option<u64>,
}

struct Row {
    name: &'static str,
    policy: RoutePolicy,
    start: Start,
    /// Every random number the engine asks for.
    random: u64,
    script: Vec<Line>,
    notes: Vec<Note>,
    tried: Vec<usize>,
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn line(at: u64, event: Event, then: Action, timer: Option<u64>) -> Line {
    Line {
        at,
        event,
        then,
        timer,
    }
}

/// Istio's default retries (connect-failure, refused-stream, unavailable,
/// cancelled, 503), with the backoff given.
fn retries(num_retries: u32, backoff_base: Duration) -> RetryPolicy {
    RetryPolicy {
        num_retries,
        backoff_base,
        backoff_max: backoff_base * 10,
        ..RetryPolicy::istio_default()
    }
}

fn retrying(retry: RetryPolicy) -> RoutePolicy {
    RoutePolicy {
        retry: Some(retry),
        ..RoutePolicy::default()
    }
}

fn outcome(attempt: u32, outcome: Outcome) -> Event {
    Event::Outcome {
        attempt,
        outcome,
        begun: false,
    }
}

fn send(attempt: u32, timeout: Option<u64>) -> Action {
    Action::Send {
        attempt,
        timeout: timeout.map(ms),
    }
}

fn deliver(attempt: u32, deadline: Option<u64>) -> Action {
    Action::Deliver {
        attempt,
        deadline: deadline.map(ms),
    }
}

const PICK: Action = Action::Pick { spill: false };
const KEEP: Action = Action::PrepareBody { keep: true };
const REPLAYABLE: Event = Event::BodyReady { replayable: true };

/// The attempt's lines, from the slot to its being in flight: the slot is
/// granted, `endpoint` picked, attempt `attempt` sent announcing
/// `timeout`; `before` is the timer until the attempt is in flight
/// (its per-try timeout counts from then), `timer` the one after.
fn attempt(
    at: u64,
    attempt: u32,
    endpoint: usize,
    timeout: Option<u64>,
    before: Option<u64>,
    timer: Option<u64>,
) -> [Line; 3] {
    [
        line(at, Event::SlotGranted, PICK, before),
        line(
            at,
            Event::Picked { endpoint },
            send(attempt, timeout),
            before,
        ),
        line(at, Event::Done, Action::Wait, timer),
    ]
}

fn rows() -> Vec<Row> {
    let refused = RetryRefusal {
        limit: RetryLimit::Budget,
        value: 0,
    };
    let requests = Overflow {
        limit: Limit::MaxRequests,
        value: 1,
    };
    let pending = Overflow {
        limit: Limit::MaxPendingRequests,
        value: 0,
    };
    vec![
        Row {
            name: "a route with no policy: one attempt, no timer at any point",
            policy: RoutePolicy::default(),
            start: Start::default(),
            random: 0,
            script: [
                vec![line(0, Event::Start, Action::TakeSlot, None)],
                attempt(0, 1, 3, None, None, None).into(),
                vec![line(
                    1,
                    outcome(1, Outcome::http(200)),
                    deliver(1, None),
                    None,
                )],
            ]
            .concat(),
            notes: vec![],
            tried: vec![3],
        },
        Row {
            name: "retry on a different endpoint (zero backoff: no timer)",
            policy: retrying(retries(2, Duration::ZERO)),
            start: Start::default(),
            random: u64::MAX,
            script: [
                vec![
                    line(0, Event::Start, KEEP, None),
                    line(0, REPLAYABLE, Action::TakeSlot, None),
                ],
                attempt(0, 1, 0, None, None, None).into(),
                vec![
                    line(
                        1,
                        outcome(1, Outcome::http(503)),
                        Action::AskRetry { attempt: 1 },
                        None,
                    ),
                    line(1, Event::RetryGranted, Action::Release { attempt: 1 }, None),
                    line(1, Event::Done, Action::TakeSlot, None),
                ],
                attempt(1, 2, 1, None, None, None).into(),
                vec![line(
                    2,
                    outcome(2, Outcome::http(200)),
                    deliver(2, None),
                    None,
                )],
            ]
            .concat(),
            notes: vec![Note::Retrying(1, RetryOn::RETRIABLE_STATUS_CODES, ms(0))],
            tried: vec![0, 1],
        },
        Row {
            name: "a body held whole from the start (a GET): no body step, retries allowed",
            policy: retrying(retries(1, Duration::ZERO)),
            start: Start {
                replayable: true,
                ..Start::default()
            },
            random: u64::MAX,
            script: [
                vec![line(0, Event::Start, Action::TakeSlot, None)],
                attempt(0, 1, 0, None, None, None).into(),
                vec![
                    line(
                        1,
                        outcome(1, Outcome::http(503)),
                        Action::AskRetry { attempt: 1 },
                        None,
                    ),
                    line(1, Event::RetryGranted, Action::Release { attempt: 1 }, None),
                    line(1, Event::Done, Action::TakeSlot, None),
                ],
                attempt(1, 2, 1, None, None, None).into(),
                // The budget (1 retry) is used up: the last 503 is delivered.
                vec![line(
                    2,
                    outcome(2, Outcome::http(503)),
                    deliver(2, None),
                    None,
                )],
            ]
            .concat(),
            notes: vec![
                Note::Retrying(1, RetryOn::RETRIABLE_STATUS_CODES, ms(0)),
                Note::RetriesExhausted,
            ],
            tried: vec![0, 1],
        },
        Row {
            name: "per-try timeout, then a retry after a backoff timer",
            policy: retrying(RetryPolicy {
                per_try_timeout: Some(ms(100)),
                retry_on: RetryOn::RESET,
                ..retries(2, ms(25))
            }),
            start: Start::default(),
            // The largest random number: the backoff is its ceiling, 25 ms.
            random: u64::MAX,
            script: [
                vec![
                    line(0, Event::Start, KEEP, None),
                    line(0, REPLAYABLE, Action::TakeSlot, None),
                ],
                attempt(0, 1, 0, Some(100), None, Some(100)).into(),
                vec![
                    // A timer that fires early changes nothing.
                    line(99, Event::Timer, Action::Wait, Some(100)),
                    line(100, Event::Timer, Action::Cancel { attempt: 1 }, None),
                    line(100, Event::Done, Action::AskRetry { attempt: 1 }, None),
                    line(
                        100,
                        Event::RetryGranted,
                        Action::Release { attempt: 1 },
                        None,
                    ),
                    line(100, Event::Done, Action::Wait, Some(125)),
                    line(125, Event::Timer, Action::TakeSlot, None),
                ],
                attempt(125, 2, 1, Some(100), None, Some(225)).into(),
                vec![line(
                    130,
                    outcome(2, Outcome::http(200)),
                    deliver(2, None),
                    None,
                )],
            ]
            .concat(),
            notes: vec![
                Note::PerTryTimeout(1),
                Note::Retrying(1, RetryOn::RESET, ms(25)),
            ],
            tried: vec![0, 1],
        },
        Row {
            name: "the retry budget refuses: the last result is delivered",
            policy: retrying(retries(2, Duration::ZERO)),
            start: Start::default(),
            random: 0,
            script: [
                vec![
                    line(0, Event::Start, KEEP, None),
                    line(0, REPLAYABLE, Action::TakeSlot, None),
                ],
                attempt(0, 1, 0, None, None, None).into(),
                vec![
                    line(
                        1,
                        outcome(1, Outcome::http(503)),
                        Action::AskRetry { attempt: 1 },
                        None,
                    ),
                    line(1, Event::RetryRefused(refused), deliver(1, None), None),
                ],
            ]
            .concat(),
            notes: vec![Note::RetryRefused(RetryLimit::Budget)],
            tried: vec![0],
        },
        Row {
            name: "the breaker overflows: answered locally, nothing sent",
            policy: retrying(retries(2, Duration::ZERO)),
            start: Start::default(),
            random: 0,
            script: vec![
                line(0, Event::Start, KEEP, None),
                line(0, REPLAYABLE, Action::TakeSlot, None),
                line(
                    0,
                    Event::Overflow(requests),
                    Action::Answer(Local::Overflow {
                        overflow: requests,
                        attempt: None,
                    }),
                    None,
                ),
            ],
            notes: vec![Note::Overflow(Limit::MaxRequests)],
            tried: vec![],
        },
        Row {
            name: "the pool's pending limit overflows: answered locally, not retried",
            policy: retrying(retries(2, Duration::ZERO)),
            start: Start::default(),
            random: 0,
            script: [
                vec![
                    line(0, Event::Start, KEEP, None),
                    line(0, REPLAYABLE, Action::TakeSlot, None),
                ],
                attempt(0, 1, 0, None, None, None).into(),
                vec![line(
                    0,
                    Event::PendingOverflow {
                        attempt: 1,
                        overflow: pending,
                    },
                    Action::Answer(Local::Overflow {
                        overflow: pending,
                        attempt: Some(1),
                    }),
                    None,
                )],
            ]
            .concat(),
            notes: vec![Note::Overflow(Limit::MaxPendingRequests)],
            tried: vec![0],
        },
        Row {
            name: "deadline exhausted mid-retry: a backoff past it times out at once",
            policy: RoutePolicy {
                timeout: Some(ms(50)),
                ..retrying(retries(2, ms(25)))
            },
            start: Start::default(),
            random: u64::MAX,
            script: [
                vec![
                    line(0, Event::Start, KEEP, Some(50)),
                    line(0, REPLAYABLE, Action::TakeSlot, Some(50)),
                ],
                attempt(0, 1, 0, Some(50), Some(50), Some(50)).into(),
                vec![line(
                    30,
                    outcome(1, Outcome::http(503)),
                    Action::Answer(Local::Timeout { after: ms(50) }),
                    None,
                )],
            ]
            .concat(),
            notes: vec![Note::TimedOut],
            tried: vec![0],
        },
        Row {
            name: "the route timeout fires while an attempt is in flight",
            policy: RoutePolicy {
                timeout: Some(ms(50)),
                ..RoutePolicy::default()
            },
            start: Start::default(),
            random: 0,
            script: [
                vec![line(0, Event::Start, Action::TakeSlot, Some(50))],
                attempt(0, 1, 0, Some(50), Some(50), Some(50)).into(),
                vec![
                    line(
                        50,
                        Event::Timer,
                        Action::Answer(Local::Timeout { after: ms(50) }),
                        None,
                    ),
                    // Nothing happens after the answer.
                    line(51, outcome(1, Outcome::http(200)), Action::Wait, None),
                ],
            ]
            .concat(),
            notes: vec![Note::TimedOut],
            tried: vec![0],
        },
        Row {
            name: "fault abort: answered locally, never sent",
            policy: RoutePolicy {
                fault: Some(FaultPolicy {
                    delay: None,
                    abort: Some(FaultAbort {
                        fraction: Fraction::ALL,
                        status: AbortStatus::Http(418),
                    }),
                }),
                ..retrying(retries(2, Duration::ZERO))
            },
            start: Start::default(),
            random: 0,
            script: vec![line(
                0,
                Event::Start,
                Action::Answer(Local::FaultAbort(AbortStatus::Http(418))),
                None,
            )],
            notes: vec![Note::FaultAbort(AbortStatus::Http(418))],
            tried: vec![],
        },
        Row {
            name: "fault delay, then the route timeout starts and the attempt is sent",
            policy: RoutePolicy {
                timeout: Some(ms(50)),
                fault: Some(FaultPolicy {
                    delay: Some(FaultDelay {
                        fraction: Fraction::ALL,
                        delay: ms(10),
                    }),
                    abort: None,
                }),
                ..RoutePolicy::default()
            },
            start: Start::default(),
            random: 0,
            script: [
                vec![
                    line(0, Event::Start, Action::Wait, Some(10)),
                    line(10, Event::Timer, Action::TakeSlot, Some(60)),
                ],
                attempt(10, 1, 0, Some(50), Some(60), Some(60)).into(),
                vec![line(
                    20,
                    outcome(1, Outcome::http(200)),
                    deliver(1, Some(60)),
                    None,
                )],
            ]
            .concat(),
            notes: vec![Note::FaultDelay(ms(10))],
            tried: vec![0],
        },
        Row {
            name: "status in trailers: the response has begun, never retried",
            policy: retrying(retries(2, Duration::ZERO)),
            start: Start::default(),
            random: 0,
            script: [
                vec![
                    line(0, Event::Start, KEEP, None),
                    line(0, REPLAYABLE, Action::TakeSlot, None),
                ],
                attempt(0, 1, 0, None, None, None).into(),
                vec![line(
                    1,
                    Event::Outcome {
                        attempt: 1,
                        outcome: Outcome::grpc(grpc_status::UNAVAILABLE),
                        begun: true,
                    },
                    deliver(1, None),
                    None,
                )],
            ]
            .concat(),
            notes: vec![],
            tried: vec![0],
        },
        Row {
            name: "a gRPC UNAVAILABLE in the response head is retried",
            policy: retrying(retries(2, Duration::ZERO)),
            start: Start::default(),
            random: 0,
            script: [
                vec![
                    line(0, Event::Start, KEEP, None),
                    line(0, REPLAYABLE, Action::TakeSlot, None),
                ],
                attempt(0, 1, 0, None, None, None).into(),
                vec![
                    line(
                        1,
                        outcome(1, Outcome::grpc(grpc_status::UNAVAILABLE)),
                        Action::AskRetry { attempt: 1 },
                        None,
                    ),
                    line(1, Event::RetryGranted, Action::Release { attempt: 1 }, None),
                    line(1, Event::Done, Action::TakeSlot, None),
                ],
                attempt(1, 2, 2, None, None, None).into(),
                vec![line(
                    2,
                    outcome(2, Outcome::grpc(0)),
                    deliver(2, None),
                    None,
                )],
            ]
            .concat(),
            notes: vec![Note::Retrying(1, RetryOn::UNAVAILABLE, ms(0))],
            tried: vec![0, 2],
        },
        Row {
            name: "a body that cannot be replayed gets one attempt",
            policy: retrying(retries(2, Duration::ZERO)),
            start: Start::default(),
            random: 0,
            script: [
                vec![
                    line(0, Event::Start, KEEP, None),
                    line(
                        0,
                        Event::BodyReady { replayable: false },
                        Action::TakeSlot,
                        None,
                    ),
                ],
                attempt(0, 1, 0, None, None, None).into(),
                vec![line(
                    1,
                    outcome(1, Outcome::http(503)),
                    deliver(1, None),
                    None,
                )],
            ]
            .concat(),
            notes: vec![],
            tried: vec![0],
        },
        Row {
            name: "retries used up: the last result, noted as exhausted",
            policy: retrying(retries(1, Duration::ZERO)),
            start: Start::default(),
            random: 0,
            script: [
                vec![
                    line(0, Event::Start, KEEP, None),
                    line(0, REPLAYABLE, Action::TakeSlot, None),
                ],
                attempt(0, 1, 0, None, None, None).into(),
                vec![
                    line(
                        1,
                        outcome(1, Outcome::ConnectFailure),
                        Action::AskRetry { attempt: 1 },
                        None,
                    ),
                    line(1, Event::RetryGranted, Action::Release { attempt: 1 }, None),
                    line(1, Event::Done, Action::TakeSlot, None),
                ],
                attempt(1, 2, 1, None, None, None).into(),
                vec![line(
                    2,
                    outcome(2, Outcome::ConnectFailure),
                    deliver(2, None),
                    None,
                )],
            ]
            .concat(),
            notes: vec![
                Note::Retrying(1, RetryOn::CONNECT_FAILURE, ms(0)),
                Note::RetriesExhausted,
            ],
            tried: vec![0, 1],
        },
        Row {
            name: "the last attempt's per-try timeout answers locally",
            policy: retrying(RetryPolicy {
                per_try_timeout: Some(ms(100)),
                retry_on: RetryOn::CONNECT_FAILURE,
                ..retries(2, Duration::ZERO)
            }),
            start: Start::default(),
            random: 0,
            script: [
                vec![
                    line(0, Event::Start, KEEP, None),
                    line(
                        0,
                        Event::BodyReady { replayable: false },
                        Action::TakeSlot,
                        None,
                    ),
                ],
                attempt(0, 1, 0, Some(100), None, Some(100)).into(),
                vec![
                    line(100, Event::Timer, Action::Cancel { attempt: 1 }, None),
                    line(
                        100,
                        Event::Done,
                        Action::Answer(Local::PerTryTimeout {
                            attempt: 1,
                            after: ms(100),
                        }),
                        None,
                    ),
                ],
            ]
            .concat(),
            notes: vec![Note::PerTryTimeout(1), Note::TimedOut],
            tried: vec![0],
        },
        Row {
            name: "a deadline already passed: answered before anything is sent",
            policy: retrying(retries(2, Duration::ZERO)),
            start: Start {
                deadline: Some(Duration::ZERO),
                ..Start::default()
            },
            random: 0,
            script: vec![line(
                0,
                Event::Start,
                Action::Answer(Local::DeadlinePassed),
                None,
            )],
            notes: vec![Note::DeadlineRemaining(ms(0)), Note::DeadlinePassed],
            tried: vec![],
        },
        Row {
            name: "the caller's deadline, shorter than the route timeout, is announced",
            policy: RoutePolicy {
                timeout: Some(ms(500)),
                ..RoutePolicy::default()
            },
            start: Start {
                deadline: Some(ms(80)),
                ..Start::default()
            },
            random: 0,
            script: [
                vec![line(0, Event::Start, Action::TakeSlot, Some(80))],
                attempt(5, 1, 0, Some(75), Some(80), Some(80)).into(),
                vec![line(
                    9,
                    outcome(1, Outcome::http(500)),
                    deliver(1, Some(80)),
                    None,
                )],
            ]
            .concat(),
            notes: vec![Note::DeadlineRemaining(ms(80))],
            tried: vec![0],
        },
        Row {
            name: "no endpoint left",
            policy: RoutePolicy::default(),
            start: Start::default(),
            random: 0,
            script: vec![
                line(0, Event::Start, Action::TakeSlot, None),
                line(0, Event::SlotGranted, PICK, None),
                line(
                    0,
                    Event::NoEndpoint,
                    Action::Answer(Local::NoEndpoint),
                    None,
                ),
            ],
            notes: vec![Note::NoEndpoint],
            tried: vec![],
        },
        Row {
            name: "retryRemoteLocalities lets the pick spill",
            policy: retrying(RetryPolicy {
                retry_remote_localities: true,
                ..retries(2, Duration::ZERO)
            }),
            start: Start::default(),
            random: 0,
            script: vec![
                line(0, Event::Start, KEEP, None),
                line(0, REPLAYABLE, Action::TakeSlot, None),
                line(0, Event::SlotGranted, Action::Pick { spill: true }, None),
            ],
            notes: vec![],
            tried: vec![],
        },
    ]
}

#[test]
fn every_row_produces_its_actions_timers_and_notes() {
    for row in rows() {
        let mut exchange = Exchange::new(&row.policy, row.start);
        let mut notes = Notes::default();
        let mut random = || row.random;
        for (i, l) in row.script.iter().enumerate() {
            let action = exchange.step(ms(l.at), l.event, &mut notes, &mut random);
            assert_eq!(
                action, l.then,
                "{}: line {i} ({:?} at {} ms)",
                row.name, l.event, l.at
            );
            assert_eq!(
                exchange.next_timer(),
                l.timer.map(ms),
                "{}: timer after line {i} ({:?})",
                row.name,
                l.event
            );
        }
        assert_eq!(notes.0, row.notes, "{}: notes", row.name);
        assert_eq!(exchange.tried(), row.tried, "{}: endpoints tried", row.name);
    }
}

/// The direct transitions a driver uses for the answers it gives right
/// after the action (`slot_granted`, `picked`, `sent`) decide exactly what
/// `step` does with those events: every row again, through them.
#[test]
fn the_direct_transitions_match_step() {
    for row in rows() {
        let mut exchange = Exchange::new(&row.policy, row.start);
        let mut notes = Notes::default();
        let mut random = || row.random;
        for (i, l) in row.script.iter().enumerate() {
            let action = match l.event {
                Event::SlotGranted => exchange.slot_granted(),
                Event::Picked { endpoint } => exchange.picked(ms(l.at), endpoint),
                Event::Done if matches!(exchange.phase, Phase::Sending { .. }) => exchange.sent(),
                event => exchange.step(ms(l.at), event, &mut notes, &mut random),
            };
            assert_eq!(
                action, l.then,
                "{}: line {i} ({:?} at {} ms)",
                row.name, l.event, l.at
            );
            assert_eq!(
                exchange.next_timer(),
                l.timer.map(ms),
                "{}: timer",
                row.name
            );
        }
        assert_eq!(notes.0, row.notes, "{}: notes", row.name);
        assert_eq!(exchange.tried(), row.tried, "{}: endpoints tried", row.name);
    }
    // Out of turn they change nothing, as `step` does.
    let policy = RoutePolicy::default();
    let mut exchange = Exchange::new(&policy, Start::default());
    assert_eq!(exchange.slot_granted(), Action::Wait);
    assert_eq!(exchange.picked(ms(0), 1), Action::Wait);
    assert_eq!(exchange.sent(), Action::Wait);
    assert!(exchange.tried().is_empty());
    let start = exchange.step(ms(0), Event::Start, &mut (), &mut || 0);
    assert_eq!(start, Action::TakeSlot);
    assert_eq!(exchange.picked(ms(0), 1), Action::Wait);
    assert_eq!(exchange.sent(), Action::Wait);
    assert_eq!(exchange.slot_granted(), PICK);
}

#[test]
fn the_attempt_budget_needs_a_replayable_body() {
    let policy = retrying(retries(4, Duration::ZERO));
    let mut exchange = Exchange::new(&policy, Start::default());
    assert!(exchange.may_retry());
    assert_eq!(exchange.attempt_budget(), 1);
    let mut random = || 0;
    exchange.step(Duration::ZERO, Event::Start, &mut (), &mut random);
    exchange.step(Duration::ZERO, REPLAYABLE, &mut (), &mut random);
    assert_eq!(exchange.attempt_budget(), 5);
    // No retry condition: nothing to retry, nothing to keep.
    let none = retrying(RetryPolicy {
        retry_on: RetryOn::default(),
        ..retries(4, Duration::ZERO)
    });
    assert!(!Exchange::new(&none, Start::default()).may_retry());
}

#[test]
fn the_clock_is_needed_only_when_something_can_time_out() {
    let start = Start::default();
    assert!(!Exchange::new(&RoutePolicy::default(), start).needs_clock());
    assert!(!Exchange::new(&retrying(RetryPolicy::istio_default()), start).needs_clock());
    let timed = RoutePolicy {
        timeout: Some(ms(1)),
        ..RoutePolicy::default()
    };
    assert!(Exchange::new(&timed, start).needs_clock());
    let deadline = Start {
        deadline: Some(ms(1)),
        ..Start::default()
    };
    assert!(Exchange::new(&RoutePolicy::default(), deadline).needs_clock());
}

#[test]
fn randoms_are_drawn_only_for_random_decisions() {
    // Istio's default retries on a request that succeeds: no random number.
    let policy = retrying(RetryPolicy::istio_default());
    let mut exchange = Exchange::new(&policy, Start::default());
    let mut drawn = 0;
    let mut random = || {
        drawn += 1;
        0
    };
    let now = Duration::ZERO;
    for event in [
        Event::Start,
        REPLAYABLE,
        Event::SlotGranted,
        Event::Picked { endpoint: 0 },
        Event::Done,
        outcome(1, Outcome::http(200)),
    ] {
        exchange.step(now, event, &mut (), &mut random);
    }
    assert!(exchange.is_done());
    assert_eq!(drawn, 0);
}

#[test]
fn limits_keep_istios_names_for_messages() {
    assert_eq!(Limit::MaxRequests.to_string(), "http2MaxRequests");
    assert_eq!(
        Limit::MaxPendingRequests.as_str(),
        "http1MaxPendingRequests"
    );
    assert_eq!(RetryLimit::Budget.to_string(), "retryBudget");
    let bits: u8 = Limit::ALL.iter().map(|l| l.bit()).sum();
    assert_eq!(bits, 0b1111, "one distinct bit per limit");
}

#[test]
fn endpoints_tried_past_the_inline_room_are_all_kept_in_order() {
    let mut tried = super::Tried::default();
    for endpoint in [7, 3, 9, 1, 4] {
        tried.push(endpoint);
    }
    assert_eq!(tried.as_slice(), &[7, 3, 9, 1, 4]);
}

#[test]
fn the_success_shortcut_agrees_with_every_retry_condition() {
    // Istio's default, every condition at once, and a route that retries
    // a 2xx by naming it.
    let all = RetryPolicy {
        retry_on: RetryOn::FIVE_XX
            | RetryOn::GATEWAY_ERROR
            | RetryOn::RETRIABLE_4XX
            | RetryOn::RESET
            | RetryOn::CONNECT_FAILURE
            | RetryOn::REFUSED_STREAM
            | RetryOn::CANCELLED
            | RetryOn::DEADLINE_EXCEEDED
            | RetryOn::INTERNAL
            | RetryOn::RESOURCE_EXHAUSTED
            | RetryOn::UNAVAILABLE,
        ..RetryPolicy::istio_default()
    };
    let names_204 = RetryPolicy {
        retriable_status_codes: std::sync::Arc::from([503u16, 204]),
        ..RetryPolicy::istio_default()
    };
    let grpc = [
        None,
        Some(grpc_status::OK),
        Some(grpc_status::CANCELLED),
        Some(grpc_status::UNAVAILABLE),
        Some(grpc_status::INTERNAL),
    ];
    for policy in [RetryPolicy::istio_default(), all, names_204] {
        for http in 100..=599 {
            for grpc in grpc {
                let outcome = Outcome::Status { http, grpc };
                if settled(&policy, &outcome) {
                    assert_eq!(
                        retry::retry_reason(&policy, &outcome),
                        None,
                        "{outcome:?} under {:?}",
                        policy.retry_on
                    );
                }
            }
        }
        for outcome in [
            Outcome::ConnectFailure,
            Outcome::RefusedStream,
            Outcome::Reset,
            Outcome::PerTryTimeout,
        ] {
            assert!(!settled(&policy, &outcome));
        }
    }
    // The named 2xx is retried; the others and a 200 are settled.
    let names_204 = RetryPolicy {
        retriable_status_codes: std::sync::Arc::from([204u16]),
        ..RetryPolicy::istio_default()
    };
    assert!(!settled(&names_204, &Outcome::http(204)));
    assert!(settled(&names_204, &Outcome::http(200)));
    assert!(settled(&RetryPolicy::istio_default(), &Outcome::http(200)));
}

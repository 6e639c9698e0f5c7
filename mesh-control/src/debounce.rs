//! When the config watcher reads the config directories: a debounce on the
//! leading edge and on the trailing edge, as a pure state machine (inputs
//! in, actions out, no clock and no I/O) that `server.rs` drives with
//! inotify events, one timer and the reads themselves.
//!
//! # Why both edges
//!
//! A trailing-only debounce (read once the directory has been quiet for
//! the window) puts the whole window inside every change: a single save
//! reached clients 10 ms late at the least. Most saves are one atomic
//! step, so the first event that says a write *finished* is read at once
//! (the leading read), and what follows within the window is coalesced
//! into one more read once it is quiet again (the trailing read).
//!
//! # What "finished" means
//!
//! Editors write in steps: truncate then write, write aside then rename,
//! several writes. Reading at the truncation would read an empty or half
//! written file. So only two kinds of event lead ([`Change::Finished`]):
//! a config file (`*.yaml`, `*.yml`) closed after writing, and a rename
//! (atomic: the new name has its whole content; a ConfigMap's `..data`
//! swap is one too). Anything else — a file created, written, truncated,
//! deleted, its metadata changed, any event of a file the config does not
//! read such as an editor's temporary file — is [`Change::Progress`]: it
//! only arms the trailing read, as every event did before.
//!
//! # A leading read is applied only when it is clean
//!
//! Even a finished write can be a step of a longer save (two writes, each
//! closing the file; a file renamed away before the new one is written),
//! and several files can change together. So the leading read is applied
//! only when it is *clean*: it brings no problem that is not already
//! standing (no new parse error, invalid document or rejected change) and
//! it removes nothing in force. Otherwise it is held, silently — no log,
//! no metric, nothing in `/status`, nothing applied — and the trailing
//! read, which always follows a held read, decides exactly as a reload
//! always has: valid changes apply, each rejected one keeps the last good
//! version and is reported at its `file:line`. A transient broken state
//! never surfaces; a broken save is reported one window later than it
//! was read, when the trailing read confirms it. A removal waits for the
//! trailing read too (an empty file mid-write looks like one).
//!
//! # Time
//!
//! Each event carries the time it was received (by the watcher's
//! callback): an event received before a read started was seen by that
//! read; one received after it may not have been, and calls for the
//! trailing read. The window is a quiet period, as before: the trailing
//! read comes once no event has arrived for the window.

use std::time::{Duration, Instant};

/// What a file-system event says about a write under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change {
    /// A write finished: a config file closed after writing, or a rename.
    /// Read at once if no window is open.
    Finished,
    /// Anything else: a write may be under way. Read once quiet.
    Progress,
}

/// Which of the two reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Edge {
    /// At the first finished write: applied only when clean.
    Leading,
    /// Once the events are quiet for the window: applied as it is,
    /// reporting its problems.
    Trailing,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Input {
    /// A file-system event, received at `at`.
    Fs {
        /// When the watcher received it.
        at: Instant,
        /// What it says.
        change: Change,
    },
    /// The timer last armed fired.
    Timer,
    /// The read last asked for is done; `clean`: applying it would bring
    /// no problem that is not already standing and remove nothing.
    Read {
        /// Whether it is clean.
        clean: bool,
    },
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Read the config directories now, and give the result back as
    /// [`Input::Read`] before any other input.
    Read(Edge),
    /// (Re)arm the one timer for this instant, replacing the one armed.
    ArmTimer(Instant),
    /// Apply the read just done (its problems, if any, are reported as a
    /// reload reports them).
    Apply,
    /// Drop the read just done without a trace: the trailing read decides.
    Hold,
}

/// Where the watcher is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing under way.
    Idle,
    /// Events seen, no read yet: a finished write reads now, else the
    /// trailing read comes at `quiet_at`.
    Writing { quiet_at: Instant },
    /// A read is under way since `started`; `last` is the last event
    /// received after it started (one it may have missed).
    Reading {
        edge: Edge,
        started: Instant,
        last: Option<Instant>,
    },
    /// After the leading read (which saw every event received before
    /// `covered`): events are coalesced until `quiet_at`; then a trailing
    /// read if `pending` (an event came after `covered`, or the leading
    /// read was held).
    Window {
        covered: Instant,
        quiet_at: Instant,
        pending: bool,
    },
}

/// The debounce: feed it every [`Input`] with the time it is handled at,
/// do the [`Action`]s it returns, in order.
#[derive(Debug, Clone)]
pub(crate) struct Debounce {
    window: Duration,
    state: State,
}

impl Debounce {
    /// Idle, with a quiet period of `window`.
    pub(crate) fn new(window: Duration) -> Self {
        Debounce {
            window,
            state: State::Idle,
        }
    }

    /// Takes `input`, handled at `now`; returns what to do.
    pub(crate) fn step(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let w = self.window;
        let (next, actions) = match (self.state, input) {
            (State::Idle, Input::Fs { change, at }) => match change {
                Change::Finished => read(Edge::Leading, now),
                Change::Progress => writing(at + w),
            },
            (State::Writing { quiet_at }, Input::Fs { change, at }) => match change {
                Change::Finished => read(Edge::Leading, now),
                Change::Progress => writing(quiet_at.max(at + w)),
            },
            (State::Writing { quiet_at }, Input::Timer) => {
                if now >= quiet_at {
                    read(Edge::Trailing, now)
                } else {
                    writing(quiet_at)
                }
            }
            (
                State::Reading {
                    edge,
                    started,
                    last,
                },
                Input::Fs { at, .. },
            ) => {
                let last = if at >= started {
                    Some(last.map_or(at, |l| l.max(at)))
                } else {
                    last
                };
                let state = State::Reading {
                    edge,
                    started,
                    last,
                };
                (state, Vec::new())
            }
            (
                State::Reading {
                    edge: Edge::Leading,
                    started,
                    last,
                },
                Input::Read { clean },
            ) => {
                let quiet_at = last.unwrap_or(started) + w;
                let state = State::Window {
                    covered: started,
                    quiet_at,
                    pending: !clean || last.is_some(),
                };
                let verdict = if clean { Action::Apply } else { Action::Hold };
                (state, vec![verdict, Action::ArmTimer(quiet_at)])
            }
            (
                State::Reading {
                    edge: Edge::Trailing,
                    last,
                    ..
                },
                Input::Read { .. },
            ) => match last {
                // Written to while it was read: once more when quiet.
                Some(last) => {
                    let (state, mut actions) = writing(last + w);
                    actions.insert(0, Action::Apply);
                    (state, actions)
                }
                None => (State::Idle, vec![Action::Apply]),
            },
            (
                State::Window {
                    covered, quiet_at, ..
                },
                Input::Fs { at, .. },
            ) => {
                if at < covered {
                    // The leading read saw it.
                    (self.state, Vec::new())
                } else {
                    let quiet_at = quiet_at.max(at + w);
                    let state = State::Window {
                        covered,
                        quiet_at,
                        pending: true,
                    };
                    (state, vec![Action::ArmTimer(quiet_at)])
                }
            }
            (
                State::Window {
                    quiet_at, pending, ..
                },
                Input::Timer,
            ) => {
                if now < quiet_at {
                    (self.state, vec![Action::ArmTimer(quiet_at)])
                } else if pending {
                    read(Edge::Trailing, now)
                } else {
                    (State::Idle, Vec::new())
                }
            }
            // A timer left over (Idle, Reading), or a read nobody asked
            // for: nothing to do.
            (state, Input::Timer | Input::Read { .. }) => (state, Vec::new()),
        };
        self.state = next;
        actions
    }
}

/// Read now.
fn read(edge: Edge, now: Instant) -> (State, Vec<Action>) {
    let state = State::Reading {
        edge,
        started: now,
        last: None,
    };
    (state, vec![Action::Read(edge)])
}

/// Wait for quiet until `quiet_at`.
fn writing(quiet_at: Instant) -> (State, Vec<Action>) {
    (
        State::Writing { quiet_at },
        vec![Action::ArmTimer(quiet_at)],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An input at a time in µs from the start (a file-system event is
    /// received when it is handled).
    #[derive(Debug, Clone, Copy)]
    enum In {
        Progress,
        Finished,
        /// A file-system event received at this earlier time (queued while
        /// a read ran).
        LateProgress(u64),
        Timer,
        Clean,
        Broken,
    }

    /// An expected action; times in µs from the start.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Out {
        ReadLeading,
        ReadTrailing,
        Arm(u64),
        Apply,
        Hold,
    }

    use In::*;
    use Out::*;

    const MS: u64 = 1_000;
    const WINDOW: Duration = Duration::from_millis(10);

    /// One step of a case: handled at (µs), the input, the actions expected.
    type Step = (u64, In, &'static [Out]);

    /// Runs `steps` from idle.
    fn run(name: &str, steps: &[Step]) {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let mut debounce = Debounce::new(WINDOW);
        for (i, &(now, input, expected)) in steps.iter().enumerate() {
            let input = match input {
                Progress => Input::Fs {
                    at: at(now),
                    change: Change::Progress,
                },
                Finished => Input::Fs {
                    at: at(now),
                    change: Change::Finished,
                },
                LateProgress(received) => Input::Fs {
                    at: at(received),
                    change: Change::Progress,
                },
                Timer => Input::Timer,
                Clean => Input::Read { clean: true },
                Broken => Input::Read { clean: false },
            };
            let got: Vec<Out> = debounce
                .step(input, at(now))
                .into_iter()
                .map(|a| match a {
                    Action::Read(Edge::Leading) => ReadLeading,
                    Action::Read(Edge::Trailing) => ReadTrailing,
                    Action::ArmTimer(t) => {
                        Arm(u64::try_from(t.duration_since(t0).as_micros()).unwrap())
                    }
                    Action::Apply => Apply,
                    Action::Hold => Hold,
                })
                .collect();
            assert_eq!(got, expected, "{name}: step {i} ({input:?} at {now} µs)");
        }
    }

    #[test]
    fn table() {
        let cases: &[(&str, &[Step])] = &[
            (
                "an atomic save (rename) is read and applied at once, once",
                &[
                    (0, Finished, &[ReadLeading]),
                    (300, Clean, &[Apply, Arm(10 * MS)]),
                    (10 * MS, Timer, &[]),
                    // Idle again: the next save leads again.
                    (50 * MS, Finished, &[ReadLeading]),
                    (50 * MS + 300, Clean, &[Apply, Arm(60 * MS)]),
                ],
            ),
            (
                "write aside, then rename: the temporary file's events only arm the timer",
                &[
                    (0, Progress, &[Arm(10 * MS)]),
                    (100, Progress, &[Arm(10 * MS + 100)]),
                    (200, Finished, &[ReadLeading]),
                    (500, Clean, &[Apply, Arm(10 * MS + 200)]),
                    (10 * MS + 200, Timer, &[]),
                ],
            ),
            (
                "in place (truncate, write, close): read at the close",
                &[
                    (0, Progress, &[Arm(10 * MS)]),
                    (50, Progress, &[Arm(10 * MS + 50)]),
                    (60, Finished, &[ReadLeading]),
                    (400, Clean, &[Apply, Arm(10 * MS + 60)]),
                    (10 * MS + 60, Timer, &[]),
                ],
            ),
            (
                "a burst: the leading read applies, the rest is one trailing read when quiet",
                &[
                    (0, Finished, &[ReadLeading]),
                    // Received while the read ran: it may have missed it.
                    (MS, Progress, &[]),
                    (2 * MS, Clean, &[Apply, Arm(11 * MS)]),
                    (5 * MS, Finished, &[Arm(15 * MS)]),
                    (8 * MS, Progress, &[Arm(18 * MS)]),
                    (18 * MS, Timer, &[ReadTrailing]),
                    (19 * MS, Clean, &[Apply]),
                    (30 * MS, Timer, &[]),
                ],
            ),
            (
                "two steps, the first broken: held without a trace, the trailing read applies",
                &[
                    (0, Finished, &[ReadLeading]),
                    (MS, Broken, &[Hold, Arm(10 * MS)]),
                    (4 * MS, Finished, &[Arm(14 * MS)]),
                    (14 * MS, Timer, &[ReadTrailing]),
                    (15 * MS, Clean, &[Apply]),
                ],
            ),
            (
                "broken and still broken at the trailing read: applied, so reported",
                &[
                    (0, Finished, &[ReadLeading]),
                    (MS, Broken, &[Hold, Arm(10 * MS)]),
                    (10 * MS, Timer, &[ReadTrailing]),
                    (11 * MS, Broken, &[Apply]),
                ],
            ),
            (
                "no finished write (a deletion, a chmod): trailing only, as before",
                &[
                    (0, Progress, &[Arm(10 * MS)]),
                    (3 * MS, Progress, &[Arm(13 * MS)]),
                    (13 * MS, Timer, &[ReadTrailing]),
                    (14 * MS, Clean, &[Apply]),
                ],
            ),
            (
                "a timer armed before the last event fires early: re-armed",
                &[
                    (0, Progress, &[Arm(10 * MS)]),
                    (5 * MS, Progress, &[Arm(15 * MS)]),
                    (10 * MS, Timer, &[Arm(15 * MS)]),
                    (15 * MS, Timer, &[ReadTrailing]),
                    (16 * MS, Broken, &[Apply]),
                ],
            ),
            (
                "events received before the leading read started were seen by it",
                &[
                    (500, Finished, &[ReadLeading]),
                    (700, LateProgress(400), &[]),
                    (800, Clean, &[Apply, Arm(10 * MS + 500)]),
                    (900, LateProgress(450), &[]),
                    (10 * MS + 500, Timer, &[]),
                ],
            ),
            (
                "written to during the trailing read: another trailing read when quiet",
                &[
                    (0, Progress, &[Arm(10 * MS)]),
                    (10 * MS, Timer, &[ReadTrailing]),
                    (10 * MS + 500, Progress, &[]),
                    (11 * MS, Clean, &[Apply, Arm(20 * MS + 500)]),
                    (20 * MS + 500, Timer, &[ReadTrailing]),
                    (21 * MS, Clean, &[Apply]),
                ],
            ),
            (
                "a window after a held read waits for quiet like any other",
                &[
                    (0, Finished, &[ReadLeading]),
                    (MS, Broken, &[Hold, Arm(10 * MS)]),
                    (9 * MS, Progress, &[Arm(19 * MS)]),
                    (10 * MS, Timer, &[Arm(19 * MS)]),
                    (19 * MS, Timer, &[ReadTrailing]),
                    (20 * MS, Clean, &[Apply]),
                ],
            ),
            (
                "a timer or a read result nobody waits for does nothing",
                &[
                    (0, Timer, &[]),
                    (MS, Clean, &[]),
                    (2 * MS, Broken, &[]),
                    (3 * MS, Finished, &[ReadLeading]),
                    (3 * MS + 100, Timer, &[]),
                    (3 * MS + 200, Clean, &[Apply, Arm(13 * MS)]),
                ],
            ),
        ];
        for (name, steps) in cases {
            run(name, steps);
        }
    }
}

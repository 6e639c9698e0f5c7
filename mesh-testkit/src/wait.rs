//! Waiting on a condition with a deadline, never on a sleep (docs/ARCHITECTURE.md,
//! Testing: "Wait on a condition, never sleep").
//!
//! A test that needs something to happen either awaits a future that completes when
//! it does ([`within`]) or polls a cheap condition every [`POLL`] ([`until`],
//! [`eventually`], [`eventually_ok`] and their `_async` forms). Either way a failure
//! panics with what was awaited and how long the test waited for it, so a red test
//! says what did not happen instead of hanging or failing on a later assertion.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// The deadline of [`within`] and [`until`]: long enough for a loaded CI machine,
/// short enough that a test that can never pass fails in seconds.
pub const DEADLINE: Duration = Duration::from_secs(10);

/// How often the polling helpers re-check their condition. A few milliseconds is
/// nothing next to a deadline of seconds, and cheap enough for conditions that build
/// a JSON status or make a local HTTP call.
pub const POLL: Duration = Duration::from_millis(5);

/// Awaits `future` for at most [`DEADLINE`]; panics naming `what` when it is late.
///
/// ```ignore
/// let response = within("the response", client.oneshot(request)).await?;
/// ```
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    within_for(what, DEADLINE, future).await
}

/// [`within`] with another deadline.
pub async fn within_for<F: Future>(what: &str, deadline: Duration, future: F) -> F::Output {
    match tokio::time::timeout(deadline, future).await {
        Ok(output) => output,
        Err(_) => panic!("{}", timed_out(what, deadline)),
    }
}

/// Polls `condition` every [`POLL`] until it holds, for at most [`DEADLINE`].
pub async fn until(what: &str, condition: impl FnMut() -> bool) {
    eventually(what, DEADLINE, condition).await;
}

/// Polls `condition` every [`POLL`] until it holds; panics naming `what` when it is
/// still false after `deadline`.
pub async fn eventually(what: &str, deadline: Duration, mut condition: impl FnMut() -> bool) {
    eventually_ok(what, deadline, || {
        if condition() {
            Ok(())
        } else {
            Err("still false")
        }
    })
    .await;
}

/// Polls `check` every [`POLL`] until it returns `Ok`, and returns its value; panics
/// naming `what` and the last `Err` (what the test saw instead) after `deadline`.
///
/// ```ignore
/// let status = eventually_ok("the ACK in /status", DEADLINE, || {
///     let status = server.status();
///     if status["clients"][0]["types"]["LDS"]["acked"] == true { Ok(status) } else { Err(status) }
/// })
/// .await;
/// ```
pub async fn eventually_ok<T, E: Display>(
    what: &str,
    deadline: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> T {
    let start = Instant::now();
    loop {
        let last = match check() {
            Ok(value) => return value,
            Err(last) => last,
        };
        if start.elapsed() >= deadline {
            panic!("{}; last seen: {last}", timed_out(what, deadline));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// [`eventually`] for a condition that needs `.await` (an RPC, an HTTP call): each
/// check is one call of `condition`; a check still running at the deadline is
/// abandoned.
pub async fn eventually_async<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_ok_async(what, deadline, || {
        let check = condition();
        async move {
            if check.await {
                Ok(())
            } else {
                Err("still false")
            }
        }
    })
    .await;
}

/// [`eventually_ok`] for a check that needs `.await`: each check is one call of
/// `check`; a check still running at the deadline is abandoned.
pub async fn eventually_ok_async<T, E, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    E: Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let start = Instant::now();
    let mut last = None;
    loop {
        let left = deadline.saturating_sub(start.elapsed());
        match tokio::time::timeout(left, check()).await {
            Ok(Ok(value)) => return value,
            Ok(Err(seen)) => last = Some(seen),
            Err(_) => {}
        }
        if start.elapsed() >= deadline {
            match last {
                Some(last) => panic!("{}; last seen: {last}", timed_out(what, deadline)),
                None => panic!("{}", timed_out(what, deadline)),
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The one failure message of this module.
fn timed_out(what: &str, deadline: Duration) -> String {
    format!("timed out after {deadline:?} waiting for {what}")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// The panic message of `future`, which must panic.
    async fn panic_of(future: impl Future<Output = ()> + Send + 'static) -> String {
        let Err(error) = tokio::spawn(future).await else {
            panic!("expected a panic");
        };
        let payload = error.into_panic();
        match payload.downcast::<String>() {
            Ok(message) => *message,
            Err(payload) => payload
                .downcast::<&str>()
                .map(|s| (*s).to_owned())
                .unwrap_or_default(),
        }
    }

    #[tokio::test]
    async fn a_condition_that_becomes_true_ends_the_wait() {
        let calls = Arc::new(AtomicU32::new(0));
        let counted = Arc::clone(&calls);
        until("the third check", move || {
            counted.fetch_add(1, Ordering::SeqCst) >= 2
        })
        .await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(within("a ready future", async { 7 }).await, 7);
        let n = Arc::new(AtomicU32::new(0));
        let value = eventually_ok("an Ok", DEADLINE, || {
            match n.fetch_add(1, Ordering::SeqCst) {
                0 => Err("not yet"),
                k => Ok(k),
            }
        })
        .await;
        assert_eq!(value, 1);
        eventually_async("an async true", DEADLINE, || async { true }).await;
        let value =
            eventually_ok_async("an async Ok", DEADLINE, || async { Ok::<_, String>(3) }).await;
        assert_eq!(value, 3);
    }

    #[tokio::test]
    async fn failures_name_what_was_awaited_and_for_how_long() {
        let message = panic_of(eventually("the moon", Duration::from_millis(20), || false)).await;
        assert_eq!(
            message,
            "timed out after 20ms waiting for the moon; last seen: still false"
        );
        let message = panic_of(async {
            within_for(
                "a pending future",
                Duration::from_millis(20),
                std::future::pending::<()>(),
            )
            .await;
        })
        .await;
        assert_eq!(message, "timed out after 20ms waiting for a pending future");
        let message = panic_of(async {
            eventually_ok("a 200", Duration::from_millis(20), || {
                Err::<(), _>("503 Service Unavailable")
            })
            .await;
        })
        .await;
        assert!(
            message.ends_with("last seen: 503 Service Unavailable"),
            "{message}"
        );
        let message = panic_of(eventually_async(
            "a slow check",
            Duration::from_millis(20),
            std::future::pending::<bool>,
        ))
        .await;
        assert_eq!(message, "timed out after 20ms waiting for a slow check");
        let message = panic_of(async {
            eventually_ok_async("a ready status", Duration::from_millis(20), || async {
                Err::<(), _>("starting")
            })
            .await;
        })
        .await;
        assert_eq!(
            message,
            "timed out after 20ms waiting for a ready status; last seen: starting"
        );
    }
}

//! The response future of [`Mesh`](super::Mesh).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use super::attempt::{
    Attempt, Finish, outcome_flags, outcome_of, outcome_of_error, overflow_message,
    status_in_trailers,
};
use super::service::{local, upstream_error};
use crate::body::ResponseBody;
use crate::error::{BoxError, Error, ErrorKind};
use crate::local_reply::LocalReply;
use crate::stats::MeshStats;
use crate::telemetry::{BreakerLimit, ResponseFlags};

type Boxed<RB> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<RB>>, Error>> + Send + 'static>>;

pin_project! {
    /// The future of a routed request. A request with nothing to retry,
    /// time or inject is sent without boxing; the others run the full
    /// request flow in a boxed future.
    pub struct ResponseFuture<F, RB> {
        #[pin]
        state: State<F, RB>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, RB> {
        Sending {
            #[pin]
            future: F,
            attempt: Option<Attempt>,
            grpc: bool,
            stats: MeshStats,
        },
        Ready {
            result: Option<Result<Response<ResponseBody<RB>>, Error>>,
        },
        Boxed {
            future: Boxed<RB>,
        },
    }
}

impl<F, RB> ResponseFuture<F, RB> {
    pub(crate) fn sending(future: F, attempt: Attempt, grpc: bool, stats: MeshStats) -> Self {
        ResponseFuture {
            state: State::Sending {
                future,
                attempt: Some(attempt),
                grpc,
                stats,
            },
        }
    }

    pub(crate) fn ready(result: Result<Response<ResponseBody<RB>>, Error>) -> Self {
        ResponseFuture {
            state: State::Ready {
                result: Some(result),
            },
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        Self::ready(Err(error))
    }

    pub(crate) fn waiting(future: Boxed<RB>) -> Self {
        ResponseFuture {
            state: State::Boxed { future },
        }
    }
}

impl<F, E, RB> Future for ResponseFuture<F, RB>
where
    F: Future<Output = Result<Response<RB>, E>>,
    E: Into<BoxError>,
    RB: http_body::Body,
{
    type Output = Result<Response<ResponseBody<RB>>, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Sending {
                future,
                attempt,
                grpc,
                stats,
            } => {
                let result = ready!(future.poll(cx));
                let Some(mut attempt) = attempt.take() else {
                    return Poll::Ready(Err(polled_after_completion()));
                };
                Poll::Ready(match result {
                    Ok(response) => {
                        let in_trailers = status_in_trailers(&response);
                        if !in_trailers {
                            attempt.report(&outcome_of(&response), stats);
                        }
                        let finish = Finish::new(attempt, &response, in_trailers, stats.clone());
                        Ok(response.map(|body| ResponseBody::new(body, Some(finish), None)))
                    }
                    Err(e) => {
                        let e: BoxError = e.into();
                        if let Some(message) = overflow_message(&e) {
                            stats.add_overflow();
                            if let Some(record) = &attempt.record {
                                record.breaker_overflow(BreakerLimit::MaxPendingRequests);
                            }
                            attempt.failed(ResponseFlags::UPSTREAM_OVERFLOW, None);
                            Ok(local(LocalReply::overflow(message), *grpc))
                        } else {
                            let outcome = outcome_of_error(&*e);
                            attempt.report(&outcome, stats);
                            attempt.failed(outcome_flags(&outcome), Some(&e));
                            Err(upstream_error(e, &attempt.active))
                        }
                    }
                })
            }
            StateProj::Ready { result } => Poll::Ready(
                result
                    .take()
                    .unwrap_or_else(|| Err(polled_after_completion())),
            ),
            StateProj::Boxed { future } => future.as_mut().poll(cx),
        }
    }
}

fn polled_after_completion() -> Error {
    Error::new(ErrorKind::InvalidRequest, "future polled after completion")
}

impl<F, RB> fmt::Debug for ResponseFuture<F, RB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

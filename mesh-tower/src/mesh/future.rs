//! The response future of [`Mesh`](super::Mesh).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use super::service::upstream_error;
use crate::balance::ActiveGuard;
use crate::body::ResponseBody;
use crate::error::{BoxError, Error};

type Waiting<RB> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<RB>>, Error>> + Send + 'static>>;

pin_project! {
    /// The future of a routed request. Requests to a known service are sent
    /// without boxing; only a request that waits for configuration is boxed.
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
            active: Option<ActiveGuard>,
        },
        Failed {
            error: Option<Error>,
        },
        Waiting {
            future: Waiting<RB>,
        },
    }
}

impl<F, RB> ResponseFuture<F, RB> {
    pub(crate) fn sending(future: F, active: ActiveGuard) -> Self {
        ResponseFuture {
            state: State::Sending {
                future,
                active: Some(active),
            },
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        ResponseFuture {
            state: State::Failed { error: Some(error) },
        }
    }

    pub(crate) fn waiting(future: Waiting<RB>) -> Self {
        ResponseFuture {
            state: State::Waiting { future },
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
            StateProj::Sending { future, active } => {
                let result = ready!(future.poll(cx));
                Poll::Ready(match (result, active.take()) {
                    (Ok(response), active) => {
                        Ok(response.map(|body| ResponseBody::new(body, active)))
                    }
                    (Err(e), Some(active)) => Err(upstream_error(e.into(), &active)),
                    (Err(e), None) => Err(Error::from_boxed(
                        e.into(),
                        crate::ErrorKind::Upstream,
                        "the request failed",
                    )),
                })
            }
            StateProj::Failed { error } => Poll::Ready(Err(error.take().unwrap_or_else(|| {
                Error::new(
                    crate::ErrorKind::InvalidRequest,
                    "future polled after completion",
                )
            }))),
            StateProj::Waiting { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, RB> fmt::Debug for ResponseFuture<F, RB> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

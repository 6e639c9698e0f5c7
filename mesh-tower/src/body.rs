//! The response body of the client stack.
//!
//! The body is passed through frame by frame (data and trailers, so gRPC
//! status trailers arrive untouched); the wrapper only notices when the
//! response is over, which is when a least-request balancer stops counting
//! the request as in flight (Envoy counts a request active until its
//! response stream ends, not until its headers arrive).

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::balance::ActiveGuard;

pin_project! {
    /// A response body from the mesh: the endpoint's body (by default
    /// [`hyper::body::Incoming`]), streamed as it arrives, trailers included.
    pub struct ResponseBody<B = hyper::body::Incoming> {
        #[pin]
        inner: B,
        active: Option<ActiveGuard>,
    }
}

impl<B: Body> ResponseBody<B> {
    pub(crate) fn new(inner: B, active: Option<ActiveGuard>) -> Self {
        let active = if inner.is_end_stream() { None } else { active };
        ResponseBody { inner, active }
    }
}

impl<B> ResponseBody<B> {
    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// The wrapped body; the request stops counting as in flight.
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl<B: Body> Body for ResponseBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let mut inner = this.inner;
        let frame = ready!(inner.as_mut().poll_frame(cx));
        match &frame {
            Some(Ok(_)) => {
                if inner.is_end_stream() {
                    *this.active = None;
                }
            }
            None | Some(Err(_)) => *this.active = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("in_flight", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

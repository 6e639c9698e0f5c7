//! The response body of the client stack.
//!
//! The body is passed through frame by frame (data and trailers, so gRPC
//! status trailers arrive untouched); the wrapper only notices when the
//! response is over, which is when
//!
//! - a least-request balancer stops counting the request as in flight and
//!   the circuit breaker's active-request count drops (Envoy counts a
//!   request active until its response stream ends, not until its headers
//!   arrive);
//! - a gRPC status that arrives in trailers after a `200` is reported to
//!   outlier detection (it cannot be retried any more: the response has
//!   begun, as in Envoy);
//! - the route timeout, which covers the whole response as Envoy's does,
//!   stops running. A timeout that fires while the body streams ends a gRPC
//!   response with `grpc-status: 4` (DEADLINE_EXCEEDED) in trailers, and an
//!   HTTP response with a body error.
//!
//! Responses the mesh makes itself (see [`crate::mesh`]: overflow, fault
//! abort, timeout) are this type too, with a short text body or none.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use crate::error::{BoxError, Error, ErrorKind};
use crate::local_reply::{code, insert_grpc_status};
use crate::mesh::Finish;

pin_project! {
    /// A response body from the mesh: the endpoint's body (by default
    /// [`hyper::body::Incoming`]), streamed as it arrives, trailers
    /// included; or the short body of a response the mesh made itself.
    pub struct ResponseBody<B = hyper::body::Incoming> {
        #[pin]
        inner: Inner<B>,
        finish: Option<Finish>,
        // Boxed: a route timeout still running while the body streams is
        // rare (most routes have none), and inline its 32 bytes were
        // copied with every move of every response (the body went from 160
        // to 136 bytes; each move past 128 bytes is a `memcpy` call).
        timeout: Option<Box<BodyTimeout>>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<B> {
        Upstream {
            #[pin]
            body: B,
        },
        // A local reply has no trailers: a timeout's gRPC status is
        // returned as the frame it makes, not kept here (every response
        // body would carry the room for a header map).
        Local {
            data: Option<Bytes>,
        },
    }
}

/// The rest of the route timeout, running while the body streams.
pub(crate) struct BodyTimeout {
    pub(crate) sleep: Pin<Box<Sleep>>,
    pub(crate) grpc: bool,
    pub(crate) limit: Duration,
}

impl<B: Body> ResponseBody<B> {
    // Inline: once per response, in the request's future, which moves the
    // body it builds straight into the response (out of line it was a call
    // of 33 instructions, and one more move).
    #[inline]
    pub(crate) fn new(body: B, finish: Option<Finish>, timeout: Option<Box<BodyTimeout>>) -> Self {
        let mut this = ResponseBody {
            inner: Inner::Upstream { body },
            finish,
            timeout,
        };
        if this.inner_ended() {
            if let Some(finish) = this.finish.take() {
                finish.end();
            }
            this.timeout = None;
        }
        this
    }
}

impl<B: Body> ResponseBody<B> {
    fn inner_ended(&self) -> bool {
        match &self.inner {
            Inner::Upstream { body } => body.is_end_stream(),
            Inner::Local { data } => data.is_none(),
        }
    }
}

impl<B> ResponseBody<B> {
    /// A body the mesh made: `data` then the end.
    pub(crate) fn local(data: Option<Bytes>) -> Self {
        ResponseBody {
            inner: Inner::Local {
                data: data.filter(|d| !d.is_empty()),
            },
            finish: None,
            timeout: None,
        }
    }

    /// The endpoint's body, unless the mesh made this response.
    pub fn get_ref(&self) -> Option<&B> {
        match &self.inner {
            Inner::Upstream { body } => Some(body),
            Inner::Local { .. } => None,
        }
    }

    /// Whether the mesh made this response itself (a local reply) rather
    /// than the endpoint.
    pub fn is_local(&self) -> bool {
        matches!(self.inner, Inner::Local { .. })
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let body = match this.inner.as_mut().project() {
            InnerProj::Local { data } => {
                return Poll::Ready(data.take().map(|data| Ok(Frame::data(data))));
            }
            InnerProj::Upstream { body } => body,
        };
        let frame = match body.poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => match this.timeout.as_mut() {
                None => return Poll::Pending,
                Some(timeout) => {
                    ready!(timeout.sleep.as_mut().poll(cx));
                    return Poll::Ready(Some(expire(this.inner, this.timeout, this.finish)));
                }
            },
        };
        // The common case, a data frame with more to come, goes straight
        // back: only the end of the response (or trailers) has work to do.
        if let Some(Ok(f)) = &frame
            && f.is_data()
            && !upstream_ended(this.inner.as_ref().get_ref())
        {
            return Poll::Ready(frame.map(|f| {
                f.map(|frame| frame.map_data(|mut d| d.copy_to_bytes(d.remaining())))
                    .map_err(Into::into)
            }));
        }
        let ended = match &frame {
            Some(Ok(frame)) => {
                if let (Some(trailers), Some(finish)) = (frame.trailers_ref(), this.finish.as_mut())
                {
                    finish.trailers(trailers);
                }
                upstream_ended(this.inner.as_ref().get_ref())
            }
            None => true,
            Some(Err(_)) => {
                if let Some(finish) = this.finish.as_mut() {
                    finish.failed();
                }
                true
            }
        };
        if ended {
            *this.timeout = None;
            if let Some(finish) = this.finish.take() {
                finish.end();
            }
        }
        Poll::Ready(frame.map(|f| match f {
            Ok(frame) => Ok(frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))),
            Err(e) => Err(e.into()),
        }))
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream { body } => body.is_end_stream(),
            Inner::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream { body } => body.size_hint(),
            Inner::Local { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Whether the endpoint's stream is over (a local body, here, was just
/// replaced after a timeout: over too).
fn upstream_ended<B: Body>(inner: &Inner<B>) -> bool {
    match inner {
        Inner::Upstream { body } => body.is_end_stream(),
        Inner::Local { .. } => true,
    }
}

/// The route timeout expired while the body streamed: the endpoint's
/// stream is dropped, the attempt finished as timed out, and the caller
/// gets `grpc-status: 4` in trailers (gRPC) or a body error. Out of line:
/// [`ResponseBody::poll_frame`]'s common path stays short.
#[cold]
#[inline(never)]
fn expire<B>(
    mut inner: Pin<&mut Inner<B>>,
    timeout: &mut Option<Box<BodyTimeout>>,
    finish: &mut Option<Finish>,
) -> Result<Frame<Bytes>, BoxError> {
    let (grpc, limit) = match timeout.take() {
        Some(t) => (t.grpc, t.limit),
        None => (false, Duration::ZERO),
    };
    let message = format!("the route timeout of {limit:?} expired while the response streamed");
    // Forget the endpoint's stream (an HTTP/2 reset).
    inner.set(Inner::Local { data: None });
    if let Some(mut finish) = finish.take() {
        finish.timed_out();
        finish.end();
    }
    if grpc {
        let mut trailers = HeaderMap::new();
        insert_grpc_status(&mut trailers, code::DEADLINE_EXCEEDED, &message);
        Ok(Frame::trailers(trailers))
    } else {
        Err(Box::new(Error::new(ErrorKind::Timeout, message)))
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody")
            .field("local", &self.is_local())
            .field("in_flight", &self.finish.is_some())
            .finish_non_exhaustive()
    }
}

//! The response body of the server stack.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use crate::error::BoxError;

pin_project! {
    /// The body of a response from the server stack
    /// ([`ServerLayer`](super::ServerLayer), `serve_with`'s check): the
    /// app's body, passed through frame by frame (trailers included), or
    /// the short body of a reply the stack made itself (a denial, an
    /// expired deadline, a rate-limit refusal, a CORS preflight).
    ///
    /// Not the client's [`ResponseBody`](crate::ResponseBody): that one
    /// carries room for what only a client needs (the attempt's
    /// accounting, the route timeout running while the body streams),
    /// which made every server response five times larger to move around
    /// (160 bytes against 40 over an app's `Full<Bytes>`) and its every
    /// frame pass checks that never apply on a server.
    pub struct ServerBody<B> {
        #[pin]
        inner: Inner<B>,
    }
}

pin_project! {
    #[project = InnerProj]
    enum Inner<B> {
        // The app's body.
        App {
            #[pin]
            body: B,
        },
        // A reply the server stack made: its data, then the end.
        Local {
            data: Option<Bytes>,
        },
    }
}

impl<B> ServerBody<B> {
    /// The app's `body`.
    #[inline]
    pub(crate) fn app(body: B) -> Self {
        ServerBody {
            inner: Inner::App { body },
        }
    }

    /// A body the server stack made: `data` (none when empty), then the end.
    pub(crate) fn local(data: Option<Bytes>) -> Self {
        ServerBody {
            inner: Inner::Local {
                data: data.filter(|d| !d.is_empty()),
            },
        }
    }

    /// The app's body, unless the server stack made this response.
    pub fn get_ref(&self) -> Option<&B> {
        match &self.inner {
            Inner::App { body } => Some(body),
            Inner::Local { .. } => None,
        }
    }

    /// Whether the server stack made this response itself (a local reply)
    /// rather than the app.
    pub fn is_local(&self) -> bool {
        matches!(self.inner, Inner::Local { .. })
    }
}

impl<B> Body for ServerBody<B>
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
        match self.project().inner.project() {
            InnerProj::App { body } => body.poll_frame(cx).map(|frame| {
                frame.map(|f| match f {
                    Ok(frame) => Ok(frame.map_data(|mut d| d.copy_to_bytes(d.remaining()))),
                    Err(e) => Err(e.into()),
                })
            }),
            InnerProj::Local { data } => Poll::Ready(data.take().map(|data| Ok(Frame::data(data)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::App { body } => body.is_end_stream(),
            Inner::Local { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::App { body } => body.size_hint(),
            Inner::Local { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

impl<B> fmt::Debug for ServerBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerBody")
            .field("local", &self.is_local())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};

    use super::*;

    #[tokio::test]
    async fn passes_the_app_body_and_gives_local_data_once() {
        let app = ServerBody::app(Full::new(Bytes::from_static(b"app")));
        assert!(!app.is_local() && app.get_ref().is_some());
        assert_eq!(app.size_hint().exact(), Some(3));
        assert_eq!(app.collect().await.unwrap().to_bytes(), "app");

        let local = ServerBody::<Full<Bytes>>::local(Some(Bytes::from_static(b"denied")));
        assert!(local.is_local() && !local.is_end_stream());
        assert_eq!(local.size_hint().exact(), Some(6));
        assert_eq!(local.collect().await.unwrap().to_bytes(), "denied");

        let empty = ServerBody::<Full<Bytes>>::local(Some(Bytes::new()));
        assert!(empty.is_end_stream());
        assert_eq!(empty.collect().await.unwrap().to_bytes(), "");
    }

    /// The point of the type: a server response's body is the app's plus a
    /// tag, not the client's 160 bytes (every response is moved several
    /// times on its way out; above 128 bytes each move is a memcpy call).
    #[test]
    fn is_the_app_body_and_a_tag() {
        assert!(size_of::<ServerBody<Full<Bytes>>>() <= size_of::<Full<Bytes>>() + 8);
    }
}

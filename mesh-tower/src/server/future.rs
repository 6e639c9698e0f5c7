//! The response future of [`Server`](super::Server).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::{HeaderValue, Response};
use mesh_core::cors::Annotation;
use pin_project_lite::pin_project;

use super::{SERVED_BY, ServerBody};

pin_project! {
    /// The app's response future, adding the server stack's response
    /// headers; or the server stack's own answer (an expired deadline).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        served_by: Option<HeaderValue>,
        // The CORS headers of an allowed cross-origin request (boxed: the
        // future of every other request stays one word larger, not six).
        cors: Option<Box<Annotation>>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        App {
            #[pin]
            inner: F,
        },
        Local {
            reply: Option<(Response<()>, Option<Bytes>)>,
        },
    }
}

impl<F> ResponseFuture<F> {
    /// The app's response future `inner`; the response gets `served_by`
    /// and `cors`'s CORS headers (see [`crate::cors`]). Both are given
    /// here rather than set afterwards: a builder step moves the whole
    /// future (the app's included) once more per request.
    #[inline]
    pub(crate) fn new(
        inner: F,
        served_by: Option<HeaderValue>,
        cors: Option<Box<Annotation>>,
    ) -> Self {
        ResponseFuture {
            state: State::App { inner },
            served_by,
            cors,
        }
    }

    /// The server stack's own answer `reply`, with `served_by` and `cors`
    /// as in [`ResponseFuture::new`].
    pub(crate) fn local(
        reply: (Response<()>, Option<Bytes>),
        served_by: Option<HeaderValue>,
        cors: Option<Box<Annotation>>,
    ) -> Self {
        ResponseFuture {
            state: State::Local { reply: Some(reply) },
            served_by,
            cors,
        }
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: http_body::Body,
{
    type Output = Result<Response<ServerBody<RB>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = match this.state.project() {
            StateProj::App { inner } => ready!(inner.poll(cx))?.map(ServerBody::app),
            StateProj::Local { reply } => match reply.take() {
                Some((head, body)) => head.map(|()| ServerBody::local(body)),
                None => Response::new(ServerBody::local(None)),
            },
        };
        if let Some(value) = this.served_by.take() {
            response.headers_mut().insert(SERVED_BY, value);
        }
        if let Some(annotation) = this.cors.take() {
            (*annotation).apply(response.headers_mut());
        }
        Poll::Ready(Ok(response))
    }
}

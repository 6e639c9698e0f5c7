//! The response future of [`Server`](super::Server).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;

use super::SERVED_BY;

pin_project! {
    /// The app's response future, adding the server stack's response headers.
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        served_by: Option<HeaderValue>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, served_by: Option<HeaderValue>) -> Self {
        ResponseFuture { inner, served_by }
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
{
    type Output = Result<Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = ready!(this.inner.poll(cx))?;
        if let Some(value) = this.served_by.take() {
            response.headers_mut().insert(SERVED_BY, value);
        }
        Poll::Ready(Ok(response))
    }
}

use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tower::Service;

use super::{ResponseFuture, ServerContext};

/// The service built by [`ServerLayer`](super::ServerLayer).
#[derive(Debug, Clone)]
pub struct Server<S> {
    inner: S,
    context: ServerContext,
    served_by: Option<HeaderValue>,
}

impl<S> Server<S> {
    pub(crate) fn new(inner: S, context: ServerContext, served_by: Option<HeaderValue>) -> Self {
        Server {
            inner,
            context,
            served_by,
        }
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B, RB> Service<Request<B>> for Server<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.context.clone());
        ResponseFuture::new(self.inner.call(req), self.served_by.clone())
    }
}

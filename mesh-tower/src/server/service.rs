use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use tower::Service;

use super::inbound::{LAYERED_OWN, UNLAYERED, authorize};
use super::{InboundPolicy, ResponseFuture, ServerContext};
use crate::body::ResponseBody;
use crate::deadline::Deadline;
use crate::local_reply::{LocalReply, is_grpc};
use crate::telemetry::{DecisionRecord, ResponseFlags};

/// The service built by [`ServerLayer`](super::ServerLayer).
#[derive(Debug, Clone)]
pub struct Server<S> {
    inner: S,
    context: ServerContext,
    served_by: Option<HeaderValue>,
    inbound: Option<InboundPolicy>,
}

impl<S> Server<S> {
    pub(crate) fn new(
        inner: S,
        context: ServerContext,
        served_by: Option<HeaderValue>,
        inbound: Option<InboundPolicy>,
    ) -> Self {
        Server {
            inner,
            context,
            served_by,
            inbound,
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
    RB: http_body::Body,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        req.extensions_mut().insert(self.context.clone());
        if let Some(deadline) = Deadline::from_headers(req.headers()) {
            if deadline.is_expired() {
                // Nobody waits for the answer any more: do not run the app.
                if let Some(record) = req.extensions().get::<DecisionRecord>() {
                    record.flag(ResponseFlags::DURATION_TIMEOUT);
                }
                let reply = LocalReply::timeout(
                    "the request's deadline had passed when it arrived (grpc-timeout / \
                     x-envoy-expected-rq-timeout-ms of 0)"
                        .into(),
                );
                return ResponseFuture::local(
                    reply.into_parts(is_grpc(req.headers())),
                    self.served_by.clone(),
                );
            }
            req.extensions_mut().insert(deadline);
        }
        let policy = match &self.inbound {
            Some(own) => Some(own),
            None => {
                let passed = req.extensions().get::<InboundPolicy>();
                if let Some(policy) = passed {
                    // From now on `serve_with` leaves authorization to this layer.
                    policy.mark_layered_by_extension();
                }
                passed
            }
        };
        if let Some(reply) = policy.and_then(|policy| authorize(policy, &req)) {
            return ResponseFuture::local(
                reply.into_parts(is_grpc(req.headers())),
                self.served_by.clone(),
            );
        }
        ResponseFuture::new(self.inner.call(req), self.served_by.clone())
    }
}

/// What `serve` runs every request through. Until a
/// [`ServerLayer`](super::ServerLayer) is known to enforce the policy (one
/// built with [`ServerLayer::inbound`](super::ServerLayer::inbound), or one
/// that has authorized a request with the policy this passes on as a
/// request extension), it authorizes each request itself, so an app served
/// under a policy is never left unchecked; those denials are logged and
/// counted, but not traced. Then it only passes the policy on.
#[derive(Debug, Clone)]
pub(crate) struct Guard<S> {
    inner: S,
    policy: Option<InboundPolicy>,
}

impl<S> Guard<S> {
    pub(crate) fn new(inner: S, policy: Option<InboundPolicy>) -> Self {
        Guard { inner, policy }
    }
}

impl<S, B, RB> Service<Request<B>> for Guard<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    RB: http_body::Body,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(policy) = &self.policy {
            let layering = policy.layering();
            if layering == UNLAYERED
                && let Some(reply) = authorize(policy, &req)
            {
                return ResponseFuture::local(reply.into_parts(is_grpc(req.headers())), None);
            }
            if layering != LAYERED_OWN {
                // A ServerLayer without a policy of its own authorizes with
                // this one (and from then on, only it does).
                req.extensions_mut().insert(policy.clone());
            }
        }
        ResponseFuture::new(self.inner.call(req), None)
    }
}

use std::task::{Context, Poll};

use http::{HeaderValue, Request, Response};
use mesh_core::cors::Decision;
use tower::Service;

use super::inbound::{CachedPolicy, Denial, Outcome};
use super::{InboundPolicy, ResponseFuture, ServerBody, ServerContext};
use crate::connection::Authorized;
use crate::deadline::Deadline;
use crate::local_reply::{LocalReply, is_grpc};
use crate::ratelimit::Verdict;
#[cfg(feature = "telemetry")]
use crate::telemetry::Telemetry;
use crate::telemetry::{DecisionRecord, ResponseFlags};

/// The service built by [`ServerLayer`](super::ServerLayer).
#[derive(Debug, Clone)]
pub struct Server<S> {
    inner: S,
    context: ServerContext,
    served_by: Option<HeaderValue>,
    inbound: Option<CachedPolicy>,
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
            inbound: inbound.map(CachedPolicy::new),
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
    type Response = Response<ServerBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        // One clock read: expired on arrival means a timeout of zero.
        if let Some((deadline, expired)) = Deadline::arriving(req.headers()) {
            if expired {
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
                    None,
                );
            }
            req.extensions_mut().insert(deadline);
        }
        let Some(own) = &mut self.inbound else {
            // No policy of this layer's: a decision made before it (by
            // `serve_with`) is still recorded and passed on.
            let authorized = Authorized::of(&req).cloned();
            if let Some(decided) = &authorized {
                record(decided, &req);
            }
            req.extensions_mut()
                .insert(self.context.on_request(authorized));
            return ResponseFuture::new(self.inner.call(req), self.served_by.clone(), None);
        };
        // The config is loaded once per request: every stage below decides
        // under the same one.
        let loaded = own.current();
        let (policy, config) = (loaded.policy, loaded.config);
        // CORS first, as Istio's inbound chain runs the cors filter before
        // the rate limit and RBAC: a preflight from an allowed origin is
        // answered here; an allowed request's response (the app's, or a
        // refusal below) gets the CORS headers. Without CORS routes, or
        // without an `Origin` header, this costs at most one lookup.
        let cors = match crate::cors::decide(config.cors(), &req) {
            Decision::Pass => None,
            Decision::Annotate(annotation) => Some(Box::new(annotation)),
            Decision::Preflight(headers) => {
                return ResponseFuture::local(
                    crate::cors::preflight_reply(headers),
                    self.served_by.clone(),
                    None,
                );
            }
        };
        // The local rate limit, before authorization: Istio's task inserts
        // the filter first. Nothing runs without a limit.
        if let Some(limiter) = config.rate_limit()
            && limiter.check(&req) == Verdict::Refused
        {
            if let Some(record) = req.extensions().get::<DecisionRecord>() {
                record.flag(ResponseFlags::RATE_LIMITED);
            }
            return ResponseFuture::local(
                limiter.refusal(req.headers()),
                self.served_by.clone(),
                cors,
            );
        }
        // This peer's decision under this config, remembered (see
        // `CachedPolicy`), comes first: it is what deciding again, or an
        // earlier check under this policy and config, gives (recorded by
        // `remembered`), and it spares looking for such a check.
        let remembered = loaded.remembered(&req);
        let authorized = match remembered {
            Some(remembered) => Some(remembered),
            None => match Authorized::of(&req) {
                // `serve_with` (or an outer layer) decided this request under
                // this very policy: record that decision, do not evaluate twice.
                Some(decided) if decided.is_decided_by(policy) => {
                    record(decided, &req);
                    Some(decided.clone())
                }
                // A policy of our own that nobody applied to this request yet:
                // decide it here (the layer alone, or under another policy).
                decided => match loaded.authorize(&req) {
                    Outcome::Allowed(Some(authorized)) => Some(authorized),
                    Outcome::Allowed(None) => decided.cloned(),
                    Outcome::Denied(denial) => {
                        // `authorize` wrote the decision on the record.
                        let Denial { reply, .. } = *denial;
                        return ResponseFuture::local(
                            reply.into_parts(is_grpc(req.headers())),
                            self.served_by.clone(),
                            cors,
                        );
                    }
                },
            },
        };
        // One extension for the context and the decision (see
        // `ServerContext`), put on only once the request is let in.
        req.extensions_mut()
            .insert(self.context.on_request(authorized));
        ResponseFuture::new(self.inner.call(req), self.served_by.clone(), cors)
    }
}

/// Writes a decision made before this layer on the request's record, if
/// a telemetry layer put one there.
fn record<B>(decided: &Authorized, req: &Request<B>) {
    if let Some(record) = req.extensions().get::<DecisionRecord>() {
        record.authorized(decided);
    }
}

/// What [`serve_with`](crate::serve::serve_with) runs every request
/// through, outside the app: it authorizes each request under the server's
/// [`InboundPolicy`], once, and either refuses it (the app never sees it)
/// or passes it on with the decision as an [`Authorized`] extension. There
/// is no state shared between requests beyond the policy itself: whatever
/// the app is made of (routes outside a `ServerLayer`, nested routers,
/// several tonic services), no request reaches it unchecked.
///
/// With telemetry (`Security::telemetry`, feature `telemetry`), a request
/// it refuses gets a SERVER span, Istio metrics and an access log line, as
/// the app's telemetry would have given it. Allowed requests are the app's
/// telemetry's to report, so nothing is recorded twice: the two never see
/// the same request.
#[derive(Debug, Clone)]
pub(crate) struct Guard<S> {
    inner: S,
    /// The policy, its config cached and its last decision remembered
    /// (see `CachedPolicy`: `Guard` is cloned per connection).
    policy: Option<CachedPolicy>,
    #[cfg(feature = "telemetry")]
    telemetry: Option<Telemetry>,
}

impl<S> Guard<S> {
    pub(crate) fn new(inner: S, policy: Option<InboundPolicy>) -> Self {
        Guard {
            inner,
            policy: policy.map(CachedPolicy::new),
            #[cfg(feature = "telemetry")]
            telemetry: None,
        }
    }

    /// Reports the requests this refuses under `telemetry`.
    #[cfg(feature = "telemetry")]
    pub(crate) fn with_telemetry(mut self, telemetry: Option<Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }
}

impl<S, B, RB> Service<Request<B>> for Guard<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    B: http_body::Body,
    RB: http_body::Body,
{
    type Response = Response<ServerBody<RB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut cors = None;
        if let Some(policy) = &mut self.policy {
            let loaded = policy.current();
            let config = loaded.config;
            // CORS before authorization, as in the `ServerLayer` (see
            // `crate::cors`): a browser's preflight carries no
            // credentials, and is answered here, not refused.
            match crate::cors::decide(config.cors(), &req) {
                Decision::Pass => {}
                Decision::Annotate(annotation) => cors = Some(Box::new(annotation)),
                Decision::Preflight(headers) => {
                    return ResponseFuture::local(
                        crate::cors::preflight_reply(headers),
                        None,
                        None,
                    );
                }
            }
            // The remembered decision first (see `CachedPolicy`).
            let outcome = match loaded.remembered(&req) {
                Some(remembered) => Outcome::Allowed(Some(remembered)),
                None => loaded.authorize(&req),
            };
            match outcome {
                Outcome::Allowed(Some(authorized)) => {
                    req.extensions_mut().insert(authorized);
                }
                Outcome::Allowed(None) => {}
                Outcome::Denied(denial) => return self.refuse(req, *denial, cors),
            }
        }
        ResponseFuture::new(self.inner.call(req), None, cors)
    }
}

impl<S> Guard<S> {
    /// The local reply refusing `req`, reported under the telemetry, if any.
    fn refuse<B, F>(
        &self,
        req: Request<B>,
        denial: Denial,
        cors: Option<Box<mesh_core::cors::Annotation>>,
    ) -> ResponseFuture<F>
    where
        B: http_body::Body,
    {
        let Denial { reply, decision } = denial;
        #[cfg_attr(not(feature = "telemetry"), allow(unused_mut))]
        let (mut head, body) = reply.into_parts(is_grpc(req.headers()));
        #[cfg(feature = "telemetry")]
        if let Some(telemetry) = &self.telemetry {
            crate::telemetry::local_reply(
                telemetry,
                req,
                |record| decision.record(record),
                &mut head,
                body.as_ref(),
            );
        }
        #[cfg(not(feature = "telemetry"))]
        let _ = (req, decision);
        ResponseFuture::local((head, body), None, cors)
    }
}

use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HOST;
use http::uri::{Authority, Parts, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use http_body::Body;
use mesh_core::Snapshot;
use mesh_core::breaker::Overflow;
use mesh_core::fault;
use mesh_core::model::{AbortStatus, LbPolicy, Listener, Name, RoutePolicy};
use mesh_core::retry::{Outcome, RetryPermit, backoff, retry_reason};
use mesh_core::ring_hash::request_hash;
use mesh_core::route::RequestView;
use mesh_core::snapshot::ListenerLookup;
use rand::Rng;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use super::attempt::{
    Attempt, Finish, outcome_flags, outcome_of, outcome_of_error, overflow_message,
    status_in_trailers,
};
use super::future::ResponseFuture;
use super::{ATTEMPT_COUNT_NAME, MeshLayer, TargetEndpoint};
use crate::balance::{ActiveGuard, ClusterState, ClusterStates};
use crate::body::{BodyTimeout, MeshBody, Prepared, ResponseBody, prepare};
use crate::connection::ConnectionInfo;
use crate::deadline::{Deadline, grpc_timeout_header, write_timeout_header};
use crate::error::{BoxError, Error, ErrorKind};
use crate::local_reply::{LocalReply, is_grpc};
use crate::pool::{ensure_authority_in_uri, no_authority};
use crate::source::ConfigSource;
use crate::stats::MeshStats;
use crate::telemetry::{BreakerLimit, DecisionRecord, ResponseFlags, RetryRefusal};

/// The routing service built by [`MeshLayer`]: routes each request, then
/// calls the inner service `S` with a `Request<MeshBody<B>>` once per
/// attempt (see the [module docs](crate::mesh)).
pub struct Mesh<S, Src> {
    inner: S,
    shared: Shared<Src>,
}

#[derive(Clone)]
pub(crate) struct Shared<Src> {
    pub(crate) source: Src,
    pub(crate) states: Arc<ClusterStates>,
    pub(crate) config: Config,
    pub(crate) stats: MeshStats,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Config {
    pub(crate) listener_timeout: Duration,
    pub(crate) rewrite_uri: bool,
    pub(crate) retry_buffer_limit: usize,
}

impl<Src> fmt::Debug for Shared<Src> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<S: Clone, Src: Clone> Clone for Mesh<S, Src> {
    fn clone(&self) -> Self {
        Mesh {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, Src> fmt::Debug for Mesh<S, Src> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mesh")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl<S, Src: ConfigSource> Mesh<S, Src> {
    /// Routes through the mesh described by `source`, then calls `inner`
    /// (the same as `MeshLayer::new(source).layer(inner)`).
    pub fn new(inner: S, source: Src) -> Self {
        tower::Layer::layer(&MeshLayer::new(source), inner)
    }
}

impl<S, Src> Mesh<S, Src> {
    pub(crate) fn from_shared(inner: S, shared: Shared<Src>) -> Self {
        Mesh { inner, shared }
    }

    /// Presents `store`'s certificate to clusters that require mTLS (see
    /// [`MeshLayer::certificates`]); the cluster state starts afresh.
    pub(crate) fn set_certificates(&mut self, store: crate::tls::CertStore) {
        self.shared.states = Arc::new(ClusterStates::with_certificates(store));
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The config source.
    pub fn source(&self) -> &Src {
        &self.shared.source
    }

    /// What the stack did to requests (retries, overflows, ejections, ...).
    pub fn stats(&self) -> &MeshStats {
        &self.shared.stats
    }
}

/// A routing decision, made against one snapshot: the route and cluster of
/// a request. The endpoint is picked per attempt.
pub(crate) struct Plan {
    state: Arc<ClusterState>,
    route: Name,
    /// The route's policy when it asks for work beyond one plain attempt
    /// (fault, timeout, retries) or the request has a deadline; `None`
    /// takes the fast path.
    policy: Option<RoutePolicy>,
    /// The request's hash, for ring-hash clusters.
    hash: Option<u64>,
    /// The request's decision record, when a telemetry layer is above
    /// (`None`: nothing is recorded, at no cost).
    record: Option<DecisionRecord>,
}

enum Decision {
    Routed(Plan),
    /// The cluster requires mTLS this client cannot do: a local reply.
    Unusable(Arc<str>),
    Wait(String),
    Fail(Error),
}

impl<S, Src, B, RB> Service<Request<B>> for Mesh<S, Src>
where
    S: Service<Request<MeshBody<B>>, Response = Response<RB>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    Src: ConfigSource,
    B: Body + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    RB: Body + Send + 'static,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = Error;
    type Future = ResponseFuture<S::Future, RB>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(|e| {
            Error::from_boxed(e.into(), ErrorKind::Upstream, "the inner service failed")
        })
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let decision = {
            let snapshot = self.shared.source.snapshot();
            match authority_of(&req) {
                None => Decision::Fail(no_authority()),
                Some(authority) => match snapshot.listener_for(authority) {
                    ListenerLookup::Found(listener) => {
                        match self.shared.plan(&snapshot, listener, &req, authority) {
                            Ok(plan) => match plan.state.unusable() {
                                None => Decision::Routed(plan),
                                Some(reason) => Decision::Unusable(reason.clone()),
                            },
                            Err(e) => Decision::Fail(e),
                        }
                    }
                    ListenerLookup::Missing => Decision::Fail(not_found(authority)),
                    ListenerLookup::Unknown => Decision::Wait(authority.to_owned()),
                },
            }
        };
        match decision {
            Decision::Routed(plan) if plan.policy.is_none() => self.send_once(req, plan),
            Decision::Routed(plan) => {
                let inner = self.take_ready();
                let shared = self.shared.clone();
                // The flow's future itself, boxed where it is built: an
                // `async` block around it would be moved into the box and
                // then move the (large) flow future into itself when first
                // polled.
                ResponseFuture::waiting(Box::pin(shared.run(inner, req, plan)))
            }
            Decision::Fail(e) => ResponseFuture::failed(e),
            Decision::Unusable(reason) => {
                ResponseFuture::ready(Ok(mtls_unavailable(&reason, is_grpc(req.headers()))))
            }
            Decision::Wait(authority) => {
                let inner = self.take_ready();
                let shared = self.shared.clone();
                ResponseFuture::waiting(Box::pin(async move {
                    shared.send_after_wait(inner, req, authority).await
                }))
            }
        }
    }
}

impl<S: Clone, Src> Mesh<S, Src> {
    /// The readied service goes to a request that uses it later; this one
    /// keeps a clone (tower's guidance for services used in a future).
    fn take_ready(&mut self) -> S {
        let clone = self.inner.clone();
        std::mem::replace(&mut self.inner, clone)
    }
}

impl<S, Src: ConfigSource> Mesh<S, Src> {
    /// The fast path: one attempt, nothing to time, keep or retry. No
    /// allocation beyond the inner service's.
    fn send_once<B, RB>(&mut self, req: Request<B>, plan: Plan) -> ResponseFuture<S::Future, RB>
    where
        S: Service<Request<MeshBody<B>>, Response = Response<RB>>,
    {
        let grpc = is_grpc(req.headers());
        let state = &plan.state;
        let request = match state
            .breaker()
            .try_request(&state.cluster().circuit_breakers)
        {
            Ok(permit) => permit,
            Err(overflow) => {
                self.shared.stats.add_overflow();
                if let Some(record) = &plan.record {
                    record.breaker_overflow(breaker_limit(&overflow));
                }
                return ResponseFuture::ready(Ok(local(overflow_reply(state, overflow), grpc)));
            }
        };
        let Some(active) = state.pick(plan.hash, &mut rand::rng(), None, false) else {
            record_no_endpoint(plan.record.as_ref(), state);
            return ResponseFuture::failed(no_eligible_endpoint(state, &plan.route));
        };
        let mut req = req.map(MeshBody::new);
        req.headers_mut()
            .insert(ATTEMPT_COUNT_NAME, HeaderValue::from_static("1"));
        if let Err(e) = self.shared.prepare(&mut req, &active, state) {
            return ResponseFuture::failed(e);
        }
        let attempt = Attempt::start(
            active,
            request,
            None,
            plan.record.as_ref(),
            req.headers_mut(),
        );
        let future = self.inner.call(req);
        ResponseFuture::sending(future, attempt, grpc, self.shared.stats.clone())
    }
}

/// What one attempt came to.
enum Tried<RB> {
    Response(Response<RB>),
    Failed(BoxError),
    PerTryTimeout(Duration),
}

impl<Src: ConfigSource> Shared<Src> {
    /// Routes `req` against `listener`'s route table: the route, and once
    /// per request the weighted cluster (retries stay in it).
    pub(crate) fn plan<B>(
        &self,
        snapshot: &Snapshot,
        listener: &Listener,
        req: &Request<B>,
        authority: &str,
    ) -> Result<Plan, Error> {
        let view = RequestView::new(req.method(), req.uri(), req.headers(), authority);
        let resolved = snapshot
            .resolve(listener, &view, rand::rng().random())
            .map_err(|e| {
                Error::new(
                    ErrorKind::NoRoute,
                    format!(
                        "no route for {} {authority:?} {}",
                        req.method(),
                        req.uri().path()
                    ),
                )
                .with_source(e)
            })?;
        let cluster = resolved.cluster;
        let state = self.states.get(snapshot, cluster, resolved.endpoints, || {
            self.source.locality()
        });
        if state.len() == 0 {
            return Err(Error::new(
                ErrorKind::NoEndpoints,
                format!(
                    "cluster {:?} has no endpoints (request to {authority:?}, route {:?})",
                    cluster.name, resolved.route.name
                ),
            ));
        }
        let policy = &resolved.route.policy;
        let hash = match cluster.lb_policy {
            LbPolicy::RingHash { .. } if !policy.hash_policy.is_empty() => {
                let source_ip = req
                    .extensions()
                    .get::<ConnectionInfo>()
                    .map(|c| c.peer_addr().ip());
                request_hash(&policy.hash_policy, &view, source_ip)
            }
            _ => None,
        };
        let needs_work = policy.fault.is_some()
            || policy.timeout.is_some()
            || retry_of(policy).is_some()
            || req.extensions().get::<Deadline>().is_some();
        let record = req.extensions().get::<DecisionRecord>().cloned();
        if let Some(r) = &record {
            r.route(&snapshot.versions, &listener.name, &resolved.route.name);
            r.cluster(&cluster.name, cluster.lb_policy);
            r.timeouts(
                policy.timeout,
                retry_of(policy).and_then(|p| p.per_try_timeout),
            );
        }
        Ok(Plan {
            state,
            route: resolved.route.name.clone(),
            policy: needs_work.then(|| policy.clone()),
            hash,
            record,
        })
    }

    /// Marks `req` with its target and, in rewrite mode, points its URI at it.
    pub(crate) fn prepare<B>(
        &self,
        req: &mut Request<B>,
        active: &ActiveGuard,
        state: &ClusterState,
    ) -> Result<(), Error> {
        if self.config.rewrite_uri {
            let endpoint = active.authority().cloned().ok_or_else(|| {
                Error::new(
                    ErrorKind::InvalidRequest,
                    format!(
                        "endpoint {} of cluster {:?} cannot be written as a URI authority",
                        active.address(),
                        state.name()
                    ),
                )
            })?;
            rewrite_to_endpoint(req, endpoint)?;
        } else {
            ensure_authority_in_uri(req)?;
        }
        req.extensions_mut()
            .insert(TargetEndpoint::with_connections(
                active.address(),
                state.cluster().protocol,
                state.name().clone(),
                state.connections().clone(),
            ));
        Ok(())
    }

    /// The full request flow (see the [module docs](crate::mesh)): fault
    /// injection, then the overall timeout / deadline around the attempts.
    async fn run<S, B, RB>(
        self,
        inner: S,
        req: Request<B>,
        mut plan: Plan,
    ) -> Result<Response<ResponseBody<RB>>, Error>
    where
        S: Service<Request<MeshBody<B>>, Response = Response<RB>> + Clone,
        S::Error: Into<BoxError>,
        B: Body + Unpin,
        B::Error: Into<BoxError>,
        RB: Body,
    {
        let policy = plan.policy.take().unwrap_or_default();
        let grpc = is_grpc(req.headers());
        if let Some(fault) = &policy.fault {
            let decision = {
                let mut rng = rand::rng();
                fault::decide(fault, rng.random(), rng.random())
            };
            if let Some(delay) = decision.delay {
                self.stats.add_fault_delay();
                if let Some(record) = &plan.record {
                    record.fault_delay(delay);
                }
                tokio::time::sleep(delay).await;
            }
            if let Some(status) = decision.abort {
                self.stats.add_fault_abort();
                if let Some(record) = &plan.record {
                    match status {
                        AbortStatus::Http(code) => record.fault_abort_http(
                            http::StatusCode::from_u16(code)
                                .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR),
                        ),
                        AbortStatus::Grpc(code) => record.fault_abort_grpc(code),
                    }
                }
                return Ok(local(LocalReply::fault_abort(status), grpc));
            }
        }
        let start = Instant::now();
        // The caller's deadline: the `Deadline` extension or a gRPC
        // `grpc-timeout`; the route timeout may end the request earlier.
        let caller = [
            Deadline::from_request(&req).map(|d| d.at()),
            grpc.then(|| grpc_timeout_header(req.headers(), start))
                .flatten(),
        ]
        .into_iter()
        .flatten()
        .min();
        let deadline = [policy.timeout.and_then(|t| start.checked_add(t)), caller]
            .into_iter()
            .flatten()
            .min();
        let Some(at) = deadline else {
            return self.attempts(inner, req, &plan, &policy, grpc, None).await;
        };
        if let (Some(record), Some(caller)) = (&plan.record, caller) {
            record.deadline_remaining(caller.saturating_duration_since(start));
        }
        if at <= start {
            self.stats.add_timeout();
            if let Some(record) = &plan.record {
                record.flag(ResponseFlags::DURATION_TIMEOUT);
            }
            return Ok(local(
                LocalReply::timeout(format!(
                    "the deadline of the request had passed before it was sent to cluster {:?}",
                    plan.state.name()
                )),
                grpc,
            ));
        }
        let attempts = self.attempts(inner, req, &plan, &policy, grpc, Some((at, start)));
        match tokio::time::timeout_at(at, attempts).await {
            Ok(result) => result,
            Err(_) => {
                self.stats.add_timeout();
                if let Some(record) = &plan.record {
                    record.flag(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
                }
                Ok(local(
                    LocalReply::timeout(format!(
                        "upstream request timeout: cluster {:?} did not answer within {:?} \
                         (route {:?})",
                        plan.state.name(),
                        at.saturating_duration_since(start),
                        plan.route
                    )),
                    grpc,
                ))
            }
        }
    }

    /// The retry loop: each attempt takes a circuit-breaker slot, an
    /// endpoint (an untried one if there is one), the per-try timeout; a
    /// failure the policy names is retried after a backoff when the
    /// cluster's retry budget allows.
    async fn attempts<S, B, RB>(
        &self,
        inner: S,
        req: Request<B>,
        plan: &Plan,
        policy: &RoutePolicy,
        grpc: bool,
        deadline: Option<(Instant, Instant)>,
    ) -> Result<Response<ResponseBody<RB>>, Error>
    where
        S: Service<Request<MeshBody<B>>, Response = Response<RB>> + Clone,
        S::Error: Into<BoxError>,
        B: Body + Unpin,
        B::Error: Into<BoxError>,
        RB: Body,
    {
        let state = &plan.state;
        let limits = &state.cluster().circuit_breakers;
        let retry = retry_of(policy);
        let (parts, body) = req.into_parts();
        let prepared = prepare(body, retry.is_some(), self.config.retry_buffer_limit)
            .await
            .map_err(|e| {
                Error::new(
                    ErrorKind::InvalidRequest,
                    "reading the request body failed before sending it",
                )
                .with_source(e)
            })?;
        let (kept, mut once) = match prepared {
            Prepared::Kept(kept) => (Some(kept), None),
            Prepared::Once(body) => (None, Some(body)),
        };
        let attempts = match (&kept, retry) {
            (Some(_), Some(retry)) => retry.num_retries.saturating_add(1),
            _ => 1,
        };
        let template = (attempts > 1).then(|| inner.clone());
        let mut first = Some(inner);
        let mut parts = Some(parts);
        let mut tried: Vec<usize> = Vec::new();
        let mut retry_permit: Option<RetryPermit> = None;
        let per_try = retry.and_then(|r| r.per_try_timeout);
        let spill = retry.is_some_and(|r| r.retry_remote_localities);
        let mut number = 1u32;
        loop {
            let last = number >= attempts;
            let request = match state.breaker().try_request(limits) {
                Ok(permit) => permit,
                Err(overflow) => {
                    self.stats.add_overflow();
                    if let Some(record) = &plan.record {
                        record.breaker_overflow(breaker_limit(&overflow));
                    }
                    return Ok(local(overflow_reply(state, overflow), grpc));
                }
            };
            let picked = {
                let mut rng = rand::rng();
                let avoid = |i: usize| tried.contains(&i);
                let avoid: Option<&dyn Fn(usize) -> bool> =
                    if tried.is_empty() { None } else { Some(&avoid) };
                state.pick(plan.hash, &mut rng, avoid, spill)
            };
            let Some(active) = picked else {
                record_no_endpoint(plan.record.as_ref(), state);
                return Err(no_eligible_endpoint(state, &plan.route));
            };
            let index = active.index();
            let body = match (&kept, once.take()) {
                (Some(kept), _) => MeshBody::replay(kept),
                (None, Some(body)) => body,
                (None, None) => {
                    return Err(Error::new(
                        ErrorKind::InvalidRequest,
                        "the request body was already sent and cannot be replayed",
                    ));
                }
            };
            let mut req = match (last, &parts) {
                (false, Some(head)) => request_like(head, body),
                _ => match parts.take() {
                    Some(head) => Request::from_parts(head, body),
                    None => {
                        return Err(Error::new(
                            ErrorKind::InvalidRequest,
                            "the request was already sent",
                        ));
                    }
                },
            };
            req.headers_mut()
                .insert(ATTEMPT_COUNT_NAME, HeaderValue::from(number));
            let now = Instant::now();
            let left = deadline.map(|(at, _)| at.saturating_duration_since(now));
            if let Some(timeout) = min_some(left, per_try) {
                write_timeout_header(req.headers_mut(), grpc, timeout);
            }
            self.prepare(&mut req, &active, state)?;
            let mut attempt = Attempt::start(
                active,
                request,
                retry_permit.take(),
                plan.record.as_ref(),
                req.headers_mut(),
            );
            let mut svc = match first.take() {
                Some(svc) => svc,
                None => match &template {
                    Some(template) => template.clone().ready_oneshot().await.map_err(|e| {
                        Error::from_boxed(e.into(), ErrorKind::Upstream, "the inner service failed")
                    })?,
                    None => {
                        return Err(Error::new(ErrorKind::Upstream, "no service for a retry"));
                    }
                },
            };
            let call = svc.call(req);
            let tried_now = match per_try {
                Some(timeout) => match tokio::time::timeout(timeout, call).await {
                    Ok(Ok(response)) => Tried::Response(response),
                    Ok(Err(e)) => Tried::Failed(e.into()),
                    Err(_) => Tried::PerTryTimeout(timeout),
                },
                None => match call.await {
                    Ok(response) => Tried::Response(response),
                    Err(e) => Tried::Failed(e.into()),
                },
            };
            let outcome = match &tried_now {
                Tried::Response(response) => outcome_of(response),
                Tried::Failed(e) => match overflow_message(e) {
                    Some(message) => {
                        self.stats.add_overflow();
                        if let Some(record) = &plan.record {
                            record.breaker_overflow(BreakerLimit::MaxPendingRequests);
                        }
                        attempt.failed(ResponseFlags::UPSTREAM_OVERFLOW, None);
                        return Ok(local(LocalReply::overflow(message), grpc));
                    }
                    None => outcome_of_error(&**e),
                },
                Tried::PerTryTimeout(_) => Outcome::PerTryTimeout,
            };
            let in_trailers = matches!(&tried_now, Tried::Response(r) if status_in_trailers(r));
            if !in_trailers {
                attempt.report(&outcome, &self.stats);
            }
            let reason = retry.and_then(|retry| Some((retry, retry_reason(retry, &outcome)?)));
            if let Some((retry, reason)) = reason {
                if last {
                    if attempts > 1
                        && let Some(record) = &plan.record
                    {
                        record.retries_exhausted();
                    }
                } else {
                    // This attempt's own retry slot is given back before
                    // asking for the next one.
                    drop(attempt._retry.take());
                    match state
                        .retries()
                        .try_acquire(limits, state.breaker().budget_base())
                    {
                        Ok(permit) => {
                            self.stats.add_retry();
                            let wait = backoff(retry, number, rand::rng().random());
                            if plan.record.is_some() {
                                end_attempt(&mut attempt, &tried_now, &outcome);
                                if let Some(record) = &plan.record {
                                    record.retrying(reason, wait);
                                }
                            }
                            // Release this attempt's slots (and its response)
                            // before waiting.
                            drop(attempt);
                            drop(tried_now);
                            retry_permit = Some(permit);
                            tried.push(index);
                            if !wait.is_zero() {
                                tokio::time::sleep(wait).await;
                            }
                            number += 1;
                            continue;
                        }
                        Err(refusal) => {
                            self.stats.add_retry_refused();
                            if let Some(record) = &plan.record {
                                record.retry_refused(retry_refusal(&refusal));
                            }
                            tracing::debug!(cluster = %state.name(), %refusal, "retry refused");
                        }
                    }
                }
            }
            return match tried_now {
                Tried::Response(response) => {
                    let timeout = deadline.map(|(at, start)| BodyTimeout {
                        sleep: Box::pin(tokio::time::sleep_until(at)),
                        grpc,
                        limit: at.saturating_duration_since(start),
                    });
                    let finish = Finish::new(attempt, &response, in_trailers, self.stats.clone());
                    Ok(response.map(|body| ResponseBody::new(body, Some(finish), timeout)))
                }
                Tried::Failed(e) => {
                    attempt.failed(outcome_flags(&outcome), Some(&e));
                    Err(upstream_error(e, &attempt.active))
                }
                Tried::PerTryTimeout(timeout) => {
                    self.stats.add_timeout();
                    attempt.failed(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, None);
                    if let Some(record) = &plan.record {
                        record.flag(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT);
                    }
                    Ok(local(
                        LocalReply::timeout(format!(
                            "upstream request timeout: endpoint {} of cluster {:?} did not answer \
                             within the per-try timeout of {timeout:?}",
                            attempt.active.address(),
                            state.name()
                        )),
                        grpc,
                    ))
                }
            };
        }
    }

    /// The slow path: wait for `authority`'s config, then route and send.
    async fn send_after_wait<S, B, RB>(
        self,
        inner: S,
        req: Request<B>,
        authority: String,
    ) -> Result<Response<ResponseBody<RB>>, Error>
    where
        S: Service<Request<MeshBody<B>>, Response = Response<RB>> + Clone,
        S::Error: Into<BoxError>,
        B: Body + Unpin,
        B::Error: Into<BoxError>,
        RB: Body,
    {
        let waited = tokio::time::timeout(
            self.config.listener_timeout,
            self.source.wait_for_listener(&authority),
        )
        .await;
        let plan = {
            let snapshot = self.source.snapshot();
            let lookup = snapshot.listener_for(&authority);
            match (waited, lookup) {
                (_, ListenerLookup::Found(listener)) => {
                    self.plan(&snapshot, listener, &req, &authority)?
                }
                (_, ListenerLookup::Missing) | (Ok(Ok(())), ListenerLookup::Unknown) => {
                    return Err(not_found(&authority));
                }
                (Ok(Err(e)), ListenerLookup::Unknown) if is_not_found(&*e) => {
                    return Err(not_found(&authority).with_source(e));
                }
                (Ok(Err(e)), ListenerLookup::Unknown) => {
                    return Err(Error::new(
                        ErrorKind::Discovery,
                        format!("cannot get the configuration of {authority:?}"),
                    )
                    .with_source(e));
                }
                (Err(_elapsed), ListenerLookup::Unknown) => {
                    let error = Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "no configuration for {authority:?} after {:?}: is the control \
                             server reachable, and does the mesh have this service?",
                            self.config.listener_timeout
                        ),
                    );
                    return Err(match self.source.last_error() {
                        Some(cause) => error.with_source(cause),
                        None => error,
                    });
                }
            }
        };
        if let Some(reason) = plan.state.unusable() {
            return Ok(mtls_unavailable(reason, is_grpc(req.headers())));
        }
        let inner = inner.ready_oneshot().await.map_err(|e| {
            Error::from_boxed(e.into(), ErrorKind::Upstream, "the inner service failed")
        })?;
        self.run(inner, req, plan).await
    }
}

/// The retry policy of a route, when it can retry at all.
fn retry_of(policy: &RoutePolicy) -> Option<&mesh_core::model::RetryPolicy> {
    policy
        .retry
        .as_ref()
        .filter(|r| r.num_retries > 0 && !r.retry_on.is_empty())
}

fn min_some(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// A copy of a request head with another body.
fn request_like<T>(head: &http::request::Parts, body: T) -> Request<T> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    *req.extensions_mut() = head.extensions.clone();
    req
}

/// A response the mesh makes itself.
pub(crate) fn local<RB>(reply: LocalReply, grpc: bool) -> Response<ResponseBody<RB>> {
    let (head, body) = reply.into_parts(grpc);
    head.map(|()| ResponseBody::local(body))
}

/// The local reply to a request for a cluster that requires mTLS this
/// client cannot do: 503 / UNAVAILABLE naming the cluster and the fix,
/// marked `x-proxyless-local-reply: mtls-unavailable`.
fn mtls_unavailable<RB>(reason: &str, grpc: bool) -> Response<ResponseBody<RB>> {
    let reply = LocalReply {
        cause: crate::local_reply::Cause::FaultAbort,
        http: http::StatusCode::SERVICE_UNAVAILABLE,
        grpc: Some(crate::local_reply::code::UNAVAILABLE),
        message: reason.to_owned(),
    };
    let mut response = local(reply, grpc);
    response.headers_mut().insert(
        crate::local_reply::LOCAL_REPLY_HEADER,
        HeaderValue::from_static("mtls-unavailable"),
    );
    response
}

/// Ends a retried attempt's entry in the decision record.
fn end_attempt<RB>(attempt: &mut Attempt, tried: &Tried<RB>, outcome: &Outcome) {
    match tried {
        Tried::Response(response) => attempt.answered(
            response.status(),
            crate::grpc::grpc_status(response.headers()),
        ),
        Tried::Failed(e) => attempt.failed(outcome_flags(outcome), Some(e)),
        Tried::PerTryTimeout(_) => attempt.failed(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT, None),
    }
}

/// The decision record's name of a circuit breaker limit.
fn breaker_limit(overflow: &Overflow) -> BreakerLimit {
    if overflow.limit == mesh_core::breaker::MAX_PENDING_REQUESTS {
        BreakerLimit::MaxPendingRequests
    } else {
        BreakerLimit::MaxRequests
    }
}

/// The decision record's name of the limit that refused a retry.
fn retry_refusal(refusal: &mesh_core::retry::RetryRefusal) -> RetryRefusal {
    if refusal.limit == "retryBudget" {
        RetryRefusal::Budget
    } else {
        RetryRefusal::MaxRetries
    }
}

/// Records that no endpoint could be picked (and why, when outlier
/// detection ejected them).
fn record_no_endpoint(record: Option<&DecisionRecord>, state: &ClusterState) {
    if let Some(record) = record {
        record.flag(ResponseFlags::NO_HEALTHY_UPSTREAM);
        if state.ejected() > 0 {
            record.outlier("all endpoints ejected", None);
        }
    }
}

fn overflow_reply(state: &ClusterState, overflow: Overflow) -> LocalReply {
    LocalReply::overflow(format!("cluster {:?}: {overflow}", state.name()))
}

fn no_eligible_endpoint(state: &ClusterState, route: &Name) -> Error {
    Error::new(
        ErrorKind::NoEndpoints,
        format!(
            "cluster {:?} has no healthy endpoint: {} of {} ejected by outlier detection \
             (route {route:?})",
            state.name(),
            state.ejected(),
            state.len()
        ),
    )
}

/// The authority a request is addressed to: the URI's, else `Host`.
fn authority_of<B>(req: &Request<B>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req.headers().get(HOST)?.to_str().ok(),
    }
}

/// Whether the config source said the listener does not exist.
fn is_not_found(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<mesh_xds_client::Error>()
        .is_some_and(|e| e.kind() == mesh_xds_client::ErrorKind::NotFound)
}

fn not_found(authority: &str) -> Error {
    Error::new(
        ErrorKind::NotFound,
        format!("no such service {authority:?} in the mesh"),
    )
}

pub(crate) fn upstream_error(e: BoxError, active: &ActiveGuard) -> Error {
    Error::from_boxed(
        e,
        ErrorKind::Upstream,
        format_args!(
            "request to endpoint {} of cluster {:?} failed",
            active.address(),
            active.cluster_state().name()
        ),
    )
}

/// `http://catalog/items?x` → `http://10.0.0.7:8080/items?x` with
/// `Host: catalog` (unless the request already has a `Host`).
fn rewrite_to_endpoint<B>(req: &mut Request<B>, endpoint: Authority) -> Result<(), Error> {
    let Parts {
        authority,
        path_and_query,
        ..
    } = std::mem::take(req.uri_mut()).into_parts();
    if let Some(original) = authority
        && !req.headers().contains_key(HOST)
    {
        let value = HeaderValue::from_str(original.as_str()).map_err(|e| {
            Error::new(ErrorKind::InvalidRequest, "invalid authority").with_source(e)
        })?;
        req.headers_mut().insert(HOST, value);
    }
    let mut parts = Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(endpoint);
    parts.path_and_query = Some(path_and_query.unwrap_or_else(|| PathAndQuery::from_static("/")));
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| {
        Error::new(ErrorKind::InvalidRequest, "cannot rewrite the URI").with_source(e)
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, Empty, Full, StreamBody};
    use mesh_core::model::{
        Cluster, ClusterLoadAssignment, Endpoint, Locality, LocalityEndpoints, Protocol, Route,
        RouteConfig, RouteMatch, VirtualHost, WeightedClusters,
    };
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::UnboundedReceiverStream;
    use tower::Layer;

    use super::*;
    use crate::source::StaticSource;
    use crate::telemetry::AttemptOutcome;

    type Chunk = Result<Frame<Bytes>, Infallible>;
    type Body = StreamBody<UnboundedReceiverStream<Chunk>>;
    type Seen = (
        Uri,
        Option<HeaderValue>,
        TargetEndpoint,
        Option<HeaderValue>,
    );

    fn snapshot(ports: &[u16], policy: RoutePolicy) -> Snapshot {
        let mut s = Snapshot::default();
        s.listeners.insert(
            "svc".into(),
            Arc::new(Listener {
                name: "svc".into(),
                route_config_name: "svc:80".into(),
            }),
        );
        s.route_configs.insert(
            "svc:80".into(),
            Arc::new(RouteConfig {
                name: "svc:80".into(),
                virtual_hosts: vec![VirtualHost {
                    name: "svc:80".into(),
                    domains: vec!["svc".into()].into(),
                    routes: vec![Route {
                        name: "all".into(),
                        matcher: RouteMatch::any(),
                        action: WeightedClusters::single("c"),
                        policy,
                    }]
                    .into(),
                }]
                .into(),
            }),
        );
        s.clusters.insert(
            "c".into(),
            Arc::new(Cluster {
                lb_policy: LbPolicy::LeastRequest,
                ..Cluster::new("c", Protocol::Http1)
            }),
        );
        let endpoints = ports
            .iter()
            .map(|p| Endpoint {
                address: SocketAddr::from(([127, 0, 0, 1], *p)),
                weight: 1,
                labels: Arc::from([]),
            })
            .collect();
        let cla = ClusterLoadAssignment::new(
            "c".into(),
            vec![LocalityEndpoints {
                locality: Locality::default(),
                weight: 1,
                priority: 0,
                endpoints,
            }],
        )
        .unwrap();
        s.endpoints.insert("c".into(), Arc::new(cla));
        s
    }

    /// An inner service that records what it was asked and answers with a
    /// body that stays open until its sender is dropped.
    #[derive(Clone, Default)]
    struct Recorder {
        seen: Arc<Mutex<Vec<Seen>>>,
        open: Arc<Mutex<Vec<mpsc::UnboundedSender<Chunk>>>>,
    }

    impl Service<Request<MeshBody<Empty<Bytes>>>> for Recorder {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<MeshBody<Empty<Bytes>>>) -> Self::Future {
            let target = req.extensions().get::<TargetEndpoint>().cloned().unwrap();
            let host = req.headers().get(HOST).cloned();
            let timeout = req.headers().get("x-envoy-expected-rq-timeout-ms").cloned();
            self.seen
                .lock()
                .unwrap()
                .push((req.uri().clone(), host, target, timeout));
            let (tx, rx) = mpsc::unbounded_channel();
            let _ = tx.send(Ok(Frame::data(Bytes::from_static(b"x"))));
            self.open.lock().unwrap().push(tx);
            std::future::ready(Ok(Response::new(StreamBody::new(
                UnboundedReceiverStream::new(rx),
            ))))
        }
    }

    async fn send(
        mesh: &mut Mesh<Recorder, StaticSource>,
        uri: &str,
    ) -> Result<Response<ResponseBody<Body>>, Error> {
        mesh.ready().await?;
        mesh.call(Request::get(uri).body(Empty::new()).unwrap())
            .await
    }

    #[tokio::test]
    async fn rewrite_mode_points_the_uri_at_the_endpoint_and_keeps_the_name_in_host() {
        let recorder = Recorder::default();
        let layer = MeshLayer::new(StaticSource::new(snapshot(
            &[41000],
            RoutePolicy::default(),
        )));
        let mut mesh = layer.layer(recorder.clone());
        let _response = send(&mut mesh, "http://svc/items?page=2").await.unwrap();
        let (uri, host, target, _) = recorder.seen.lock().unwrap().pop().unwrap();
        assert_eq!(uri, "http://127.0.0.1:41000/items?page=2");
        assert_eq!(host.unwrap(), "svc");
        assert_eq!(target.addr(), SocketAddr::from(([127, 0, 0, 1], 41000)));
        assert_eq!(target.cluster(), "c");
        assert_eq!(target.protocol(), Protocol::Http1);
    }

    #[tokio::test]
    async fn keep_mode_leaves_the_uri_alone() {
        let recorder = Recorder::default();
        let layer = MeshLayer::new(StaticSource::new(snapshot(
            &[41000],
            RoutePolicy::default(),
        )))
        .rewrite_uri(false);
        let mut mesh = layer.layer(recorder.clone());
        let _response = send(&mut mesh, "http://svc/items").await.unwrap();
        let (uri, host, _, _) = recorder.seen.lock().unwrap().pop().unwrap();
        assert_eq!(uri, "http://svc/items");
        assert_eq!(host, None);
    }

    #[tokio::test]
    async fn a_route_timeout_is_announced_to_the_endpoint() {
        let recorder = Recorder::default();
        let policy = RoutePolicy {
            timeout: Some(Duration::from_secs(2)),
            ..RoutePolicy::default()
        };
        let layer = MeshLayer::new(StaticSource::new(snapshot(&[41000], policy)));
        let mut mesh = layer.layer(recorder.clone());
        let _response = send(&mut mesh, "http://svc/").await.unwrap();
        let (_, _, _, timeout) = recorder.seen.lock().unwrap().pop().unwrap();
        let ms: u64 = timeout.unwrap().to_str().unwrap().parse().unwrap();
        assert!(ms <= 2000 && ms > 1500, "{ms}");
    }

    #[tokio::test]
    async fn least_request_avoids_the_endpoint_whose_response_is_still_streaming() {
        let recorder = Recorder::default();
        let layer = MeshLayer::new(StaticSource::new(snapshot(&[1, 2], RoutePolicy::default())));
        let mut mesh = layer.layer(recorder.clone());
        // The first response stays open: its endpoint is busy.
        let busy_response = send(&mut mesh, "http://svc/").await.unwrap();
        let busy = recorder.seen.lock().unwrap()[0].2.addr();
        for _ in 0..20 {
            let response = send(&mut mesh, "http://svc/").await.unwrap();
            let target = recorder.seen.lock().unwrap().last().unwrap().2.addr();
            assert_ne!(target, busy);
            // Finish this response: its endpoint is idle again.
            recorder.open.lock().unwrap().pop();
            response.into_body().collect().await.unwrap();
        }
        // Once the busy body ends, nothing is in flight anywhere.
        drop(recorder.open.lock().unwrap().pop());
        busy_response.into_body().collect().await.unwrap();
        let state = {
            let snapshot = mesh.shared.source.snapshot();
            let cluster = snapshot.clusters.get("c").unwrap().clone();
            let cla = snapshot.endpoints.get("c").unwrap().clone();
            mesh.shared.states.get(&snapshot, &cluster, &cla, || None)
        };
        assert_eq!((state.in_flight(0), state.in_flight(1)), (0, 0));
        assert_eq!(state.breaker().active_requests(), 0);
    }

    #[tokio::test]
    async fn a_cluster_without_endpoints_is_an_error_naming_it() {
        let mut mesh = MeshLayer::new(StaticSource::new(snapshot(&[], RoutePolicy::default())))
            .layer(Recorder::default());
        let e = send(&mut mesh, "http://svc/").await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoEndpoints);
        assert!(e.to_string().contains("cluster \"c\""), "{e}");
    }

    /// An inner service answering each request with the next scripted
    /// status (200 once the script is over), with a one-frame body.
    #[derive(Clone, Default)]
    struct Scripted {
        statuses: Arc<Mutex<Vec<u16>>>,
        /// Per call: the endpoint and the `traceparent` sent.
        seen: Arc<Mutex<Vec<Sent>>>,
    }

    type Sent = (SocketAddr, Option<HeaderValue>);

    impl Service<Request<MeshBody<Empty<Bytes>>>> for Scripted {
        type Response = Response<Full<Bytes>>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: Request<MeshBody<Empty<Bytes>>>) -> Self::Future {
            let target = req.extensions().get::<TargetEndpoint>().unwrap().addr();
            let traceparent = req.headers().get("traceparent").cloned();
            self.seen.lock().unwrap().push((target, traceparent));
            let status = {
                let mut statuses = self.statuses.lock().unwrap();
                if statuses.is_empty() {
                    200
                } else {
                    statuses.remove(0)
                }
            };
            let mut response = Response::new(Full::new(Bytes::from_static(b"x")));
            *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
            std::future::ready(Ok(response))
        }
    }

    async fn send_recorded<S>(
        mesh: &mut Mesh<S, StaticSource>,
        uri: &str,
    ) -> (http::StatusCode, DecisionRecord)
    where
        S: Service<Request<MeshBody<Empty<Bytes>>>, Response = Response<Full<Bytes>>>
            + Clone
            + Send
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let record = DecisionRecord::new();
        let mut req = Request::get(uri).body(Empty::new()).unwrap();
        req.extensions_mut().insert(record.clone());
        mesh.ready().await.unwrap();
        let response = mesh.call(req).await.unwrap();
        let status = response.status();
        response.into_body().collect().await.unwrap();
        (status, record)
    }

    fn outcomes(record: &DecisionRecord) -> Vec<AttemptOutcome> {
        record
            .recorded_attempts()
            .map(|a| *a.outcome.get().expect("every attempt is finished"))
            .collect()
    }

    fn answered(status: u16) -> AttemptOutcome {
        AttemptOutcome::Response {
            status: http::StatusCode::from_u16(status).unwrap(),
            grpc_status: None,
        }
    }

    #[tokio::test]
    async fn the_fast_path_records_route_cluster_balancer_and_the_attempt() {
        let inner = Scripted::default();
        let mut mesh = MeshLayer::new(StaticSource::new(snapshot(
            &[41000],
            RoutePolicy::default(),
        )))
        .layer(inner.clone());
        let (status, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(status, 200);
        assert_eq!(record.listener_name().map(|n| &**n), Some("svc"));
        assert_eq!(record.route_name().map(|n| &**n), Some("all"));
        assert_eq!(record.cluster_name().map(|n| &**n), Some("c"));
        assert_eq!(record.attempts(), 1);
        assert_eq!(
            record.endpoint().map(|(a, _)| a),
            Some(SocketAddr::from(([127, 0, 0, 1], 41000)))
        );
        assert_eq!(outcomes(&record), [answered(200)]);
        assert!(record.flags().is_empty());
        // The balancer is read back through the span attributes.
        #[cfg(feature = "telemetry")]
        {
            let attributes: Vec<String> = record
                .attributes()
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect();
            assert!(
                attributes.contains(&"mesh.lb_policy=LEAST_REQUEST".to_owned()),
                "{attributes:?}"
            );
        }
    }

    #[tokio::test]
    async fn each_attempt_is_recorded_with_its_outcome_and_the_retry_reason() {
        let inner = Scripted::default();
        inner.statuses.lock().unwrap().extend([503, 503]);
        let policy = RoutePolicy {
            timeout: Some(Duration::from_secs(5)),
            retry: Some(mesh_core::model::RetryPolicy {
                num_retries: 3,
                backoff_base: Duration::ZERO,
                backoff_max: Duration::ZERO,
                ..mesh_core::model::RetryPolicy::istio_default()
            }),
            ..RoutePolicy::default()
        };
        let mut mesh =
            MeshLayer::new(StaticSource::new(snapshot(&[1, 2, 3], policy))).layer(inner.clone());
        let (status, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(status, 200);
        assert_eq!(record.attempts(), 3);
        assert_eq!(
            outcomes(&record),
            [answered(503), answered(503), answered(200)]
        );
        assert_eq!(
            record.retry_reasons(),
            mesh_core::model::RetryOn::RETRIABLE_STATUS_CODES
        );
        assert_eq!(
            record.retries_by_reason().collect::<Vec<_>>(),
            [("retriable-status-codes", 2)]
        );
        // Retries went to endpoints not tried yet.
        let endpoints: std::collections::BTreeSet<_> =
            inner.seen.lock().unwrap().iter().map(|(a, _)| *a).collect();
        assert_eq!(endpoints.len(), 3);
        assert!(record.flags().is_empty());
    }

    #[tokio::test]
    async fn retries_used_up_are_flagged_urx() {
        let inner = Scripted::default();
        inner.statuses.lock().unwrap().extend([503, 503]);
        let policy = RoutePolicy {
            retry: Some(mesh_core::model::RetryPolicy {
                num_retries: 1,
                backoff_base: Duration::ZERO,
                backoff_max: Duration::ZERO,
                ..mesh_core::model::RetryPolicy::istio_default()
            }),
            ..RoutePolicy::default()
        };
        let mut mesh =
            MeshLayer::new(StaticSource::new(snapshot(&[1, 2], policy))).layer(inner.clone());
        let (status, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(status, 503);
        assert_eq!(record.attempts(), 2);
        assert_eq!(record.flags().to_string(), "URX");
    }

    #[tokio::test]
    async fn an_injected_abort_is_recorded_without_an_attempt() {
        let policy = RoutePolicy {
            fault: Some(mesh_core::model::FaultPolicy {
                delay: None,
                abort: Some(mesh_core::model::FaultAbort {
                    fraction: mesh_core::model::Fraction::ALL,
                    status: AbortStatus::Http(418),
                }),
            }),
            ..RoutePolicy::default()
        };
        let mut mesh =
            MeshLayer::new(StaticSource::new(snapshot(&[1], policy))).layer(Scripted::default());
        let (status, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(status, 418);
        assert_eq!(record.attempts(), 0);
        assert_eq!(record.flags().to_string(), "FI");
        // The abort status is read back through the span attributes.
        #[cfg(feature = "telemetry")]
        {
            let attributes: Vec<String> = record
                .attributes()
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
                .collect();
            assert!(
                attributes.contains(&"mesh.fault.abort_http_status=418".to_owned()),
                "{attributes:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_breaker_overflow_is_recorded_with_its_limit() {
        let recorder = Recorder::default();
        let mut s = snapshot(&[1], RoutePolicy::default());
        let cluster = Arc::new(Cluster {
            lb_policy: LbPolicy::RoundRobin,
            circuit_breakers: mesh_core::model::CircuitBreakers {
                max_requests: 1,
                ..Default::default()
            },
            ..Cluster::new("c", Protocol::Http1)
        });
        s.clusters.insert("c".into(), cluster);
        let mut mesh = MeshLayer::new(StaticSource::new(s)).layer(recorder.clone());
        // The first response stays open: it holds the only request slot.
        let _busy = send(&mut mesh, "http://svc/").await.unwrap();
        let record = DecisionRecord::new();
        let mut req = Request::get("http://svc/").body(Empty::new()).unwrap();
        req.extensions_mut().insert(record.clone());
        mesh.ready().await.unwrap();
        let response = mesh.call(req).await.unwrap();
        assert_eq!(response.status(), 503);
        assert_eq!(record.flags().to_string(), "UO");
        assert_eq!(
            record.overflows().collect::<Vec<_>>(),
            [BreakerLimit::MaxRequests]
        );
        assert_eq!(record.attempts(), 0);
    }

    #[tokio::test]
    async fn a_passed_deadline_is_flagged_and_a_live_one_recorded() {
        let inner = Scripted::default();
        let mut mesh = MeshLayer::new(StaticSource::new(snapshot(&[1], RoutePolicy::default())))
            .layer(inner.clone());
        for (left, flags) in [(Duration::ZERO, "DT"), (Duration::from_secs(30), "")] {
            let record = DecisionRecord::new();
            let mut req = Request::get("http://svc/").body(Empty::new()).unwrap();
            req.extensions_mut().insert(record.clone());
            req.extensions_mut().insert(Deadline::after(left));
            mesh.ready().await.unwrap();
            let response = mesh.call(req).await.unwrap();
            response.into_body().collect().await.unwrap();
            assert!(record.flags().to_string().starts_with(flags));
            // What was left is read back through the span attributes.
            #[cfg(feature = "telemetry")]
            if flags.is_empty() {
                assert!(record.flags().is_empty());
                let remaining = record
                    .attributes()
                    .into_iter()
                    .find(|kv| kv.key.as_str() == "mesh.deadline.remaining_ms")
                    .map(|kv| kv.value.to_string().parse::<f64>().unwrap())
                    .unwrap();
                assert!(remaining > 29_000.0 && remaining <= 30_000.0, "{remaining}");
            }
        }
    }

    #[tokio::test]
    async fn an_ejection_caused_by_the_response_is_recorded() {
        let inner = Scripted::default();
        inner.statuses.lock().unwrap().push(500);
        let mut s = snapshot(&[1, 2], RoutePolicy::default());
        let cluster = Arc::new(Cluster {
            outlier_detection: Some(mesh_core::model::OutlierDetection {
                consecutive_5xx: Some(1),
                consecutive_gateway_errors: None,
                interval: Duration::from_secs(10),
                base_ejection_time: Duration::from_secs(30),
                max_ejection_percent: 100,
                min_health_percent: 0,
            }),
            ..Cluster::new("c", Protocol::Http1)
        });
        s.clusters.insert("c".into(), cluster);
        let mut mesh = MeshLayer::new(StaticSource::new(s)).layer(inner.clone());
        let (status, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(status, 500);
        assert_eq!(record.ejections(), 1);
        let (_, record) = send_recorded(&mut mesh, "http://svc/").await;
        assert_eq!(record.ejections(), 0);
    }

    #[tokio::test]
    async fn without_a_record_nothing_is_recorded_and_no_header_is_added() {
        let inner = Scripted::default();
        let mut mesh = MeshLayer::new(StaticSource::new(snapshot(&[1], RoutePolicy::default())))
            .layer(inner.clone());
        mesh.ready().await.unwrap();
        let response = mesh
            .call(Request::get("http://svc/").body(Empty::new()).unwrap())
            .await
            .unwrap();
        response.into_body().collect().await.unwrap();
        assert_eq!(inner.seen.lock().unwrap()[0].1, None);
    }
}

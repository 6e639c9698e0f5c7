use std::sync::Arc;
use std::time::Duration;

use tower::Layer;

use super::Mesh;
use super::mirror::Mirrors;
use super::service::{Config, Shared};
use crate::balance::ClusterStates;
use crate::body::DEFAULT_RETRY_BUFFER_LIMIT;
use crate::source::ConfigSource;
use crate::stats::MeshStats;

/// Routes each request through the mesh, then hands it to the inner service
/// (see the [module docs](crate::mesh)).
///
/// Every service built from one layer (and its clones) shares the cluster
/// state: round-robin counters, requests in flight, circuit breakers, retry
/// budgets, outlier detection, and the [`MeshStats`].
#[derive(Debug, Clone)]
pub struct MeshLayer<Src> {
    shared: Shared<Src>,
}

impl<Src: ConfigSource> MeshLayer<Src> {
    /// A layer reading its config from `source`, rewriting URIs to the
    /// chosen endpoint, waiting up to 10 s for an unknown name's config,
    /// keeping request bodies up to 64 KiB for retries.
    pub fn new(source: Src) -> Self {
        MeshLayer {
            shared: Shared {
                snapshot_cell: source.snapshot_cell(),
                source,
                states: Arc::new(ClusterStates::default()),
                config: Config {
                    listener_timeout: Duration::from_secs(10),
                    rewrite_uri: true,
                    retry_buffer_limit: DEFAULT_RETRY_BUFFER_LIMIT,
                },
                stats: MeshStats::default(),
                mirrors: Mirrors::default(),
                limiters: Arc::default(),
            },
        }
    }

    /// How long a request to a name the process has not seen before waits
    /// for its configuration (listener, routes, clusters, endpoints).
    pub fn listener_timeout(mut self, timeout: Duration) -> Self {
        self.shared.config.listener_timeout = timeout;
        self
    }

    /// `true` (default): rewrite the URI to `http://<endpoint>/...` and keep
    /// the original authority in `Host`, for inner services that dial the
    /// URI. `false`: keep the URI; the inner service must dial the
    /// request's target, found with
    /// [`TargetEndpoint::of`](super::TargetEndpoint::of) (as
    /// [`Pool`](crate::Pool) does).
    pub fn rewrite_uri(mut self, rewrite: bool) -> Self {
        self.shared.config.rewrite_uri = rewrite;
        self
    }

    /// The largest request body kept so a request can be retried (64 KiB
    /// by default; Envoy's equivalent is `per_request_buffer_limit_bytes`).
    /// Requests with bigger bodies, or bodies still being produced when
    /// they are sent, stream and are not retried (see
    /// [`MeshBody`](crate::MeshBody)). `0` keeps only empty bodies.
    pub fn retry_buffer_limit(mut self, bytes: usize) -> Self {
        self.shared.config.retry_buffer_limit = bytes;
        self
    }

    /// The most mirrored copies (Istio `mirror` / `mirrors`) in flight at
    /// once, for every service this layer builds (64 by default): a copy
    /// over the cap is not sent and is counted in
    /// [`MeshStats::mirrors_overflowed`], so a slow mirror cannot pile up
    /// tasks and memory. `0` sends no copies. Call it before building
    /// services: the count starts afresh.
    pub fn mirror_in_flight(mut self, copies: usize) -> Self {
        self.shared.mirrors = self.shared.mirrors.with_in_flight(copies);
        self
    }

    /// The largest request body copied to a mirror (64 KiB by default):
    /// a request of a route with mirrors has its body read ahead (as for
    /// a retry), and a bigger one, or one still being produced when the
    /// request is sent, goes to the route's cluster only (counted in
    /// [`MeshStats::mirrors_skipped`]). Requests without a body are always
    /// copied. Call it before building services.
    pub fn mirror_body_limit(mut self, bytes: usize) -> Self {
        self.shared.mirrors = self.shared.mirrors.with_body_limit(bytes);
        self
    }

    /// The workload's certificates, for clusters that require mTLS (CDS
    /// `tls`, Istio ISTIO_MUTUAL): their state carries the TLS client the
    /// [`Pool`](crate::Pool) connects with. Without certificates a request
    /// to such a cluster is answered `503` naming the cluster and the fix.
    /// Call it before building services: the cluster state starts afresh.
    pub fn certificates(mut self, store: crate::tls::CertStore) -> Self {
        self.shared.states = Arc::new(ClusterStates::with_certificates(store));
        self
    }

    /// The config source.
    pub fn source(&self) -> &Src {
        &self.shared.source
    }

    /// What the stack did to requests (retries, overflows, ejections, ...),
    /// shared by every service this layer builds.
    pub fn stats(&self) -> &MeshStats {
        &self.shared.stats
    }
}

impl<S, Src: Clone> Layer<S> for MeshLayer<Src> {
    type Service = Mesh<S, Src>;

    fn layer(&self, inner: S) -> Self::Service {
        Mesh::from_shared(inner, self.shared.clone())
    }
}

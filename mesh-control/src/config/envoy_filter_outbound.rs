//! The outbound (client-side) local rate limits of EnvoyFilters, as the
//! translation applies them to each audience's routes.
//!
//! Apart from `envoy_filter.rs`, which reads the EnvoyFilter kind: the
//! resources (`resources.rs`) hold the parsed filters, and this half walks
//! the resources, so with both halves in one module that module and
//! `resources` imported each other (issue 14).

use std::sync::Arc;

use mesh_core::ratelimit::{Action, LocalRateLimit, RateLimitConfig};

use super::envoy_filter::{Context, EnvoyFilter, Patch};
use super::resources::{Meta, Resource, Spec};

/// The outbound (client-side) local rate limits of a config, for one
/// audience: the EnvoyFilters whose `SIDECAR_OUTBOUND` patches apply to
/// its callers, root namespace first, then by namespace and name (see the
/// [`envoy_filter` docs](super::envoy_filter)).
pub(crate) struct Outbound<'r> {
    filters: Vec<OutboundFilter<'r>>,
}

struct OutboundFilter<'r> {
    meta: &'r Meta,
    /// The first outbound `HTTP_FILTER` patch's config.
    filter: Option<&'r LocalRateLimit>,
    /// `(vhost, route, config, rate_limits, line)` of each outbound
    /// `HTTP_ROUTE` patch.
    routes: Vec<OutboundRoute<'r>>,
}

struct OutboundRoute<'r> {
    vhost: Option<&'r str>,
    route: Option<&'r str>,
    config: Option<&'r LocalRateLimit>,
    rate_limits: &'r [Arc<[Action]>],
    line: usize,
}

impl<'r> Outbound<'r> {
    /// The outbound patches of `resources` that apply to the callers of
    /// `audience`: every workload ([`super::Audience::Everyone`]) only
    /// when the EnvoyFilter is in the root namespace without a selector.
    pub(crate) fn new(
        root_namespace: &str,
        resources: &[&'r Resource],
        audience: super::Audience<'_>,
    ) -> Self {
        Self::collect(root_namespace, resources, |root, meta, f| match audience {
            super::Audience::Everyone => root && f.selector.is_none(),
            super::Audience::View(key) => {
                (root || key.namespace.as_deref() == Some(meta.namespace.as_str()))
                    && f.selector
                        .iter()
                        .flatten()
                        .all(|(k, v)| key.labels.get(k) == Some(v))
            }
        })
    }

    /// Every outbound patch, whoever it selects (for [`Outbound::unmatched`]).
    pub(crate) fn all(root_namespace: &str, resources: &[&'r Resource]) -> Self {
        Self::collect(root_namespace, resources, |_, _, _| true)
    }

    fn collect(
        root_namespace: &str,
        resources: &[&'r Resource],
        applies: impl Fn(bool, &Meta, &EnvoyFilter) -> bool,
    ) -> Self {
        let mut filters = Vec::new();
        for r in resources {
            let Spec::EnvoyFilter(f) = &r.spec else {
                continue;
            };
            if !applies(r.meta.namespace == root_namespace, &r.meta, f) {
                continue;
            }
            let mut filter = None;
            let mut routes = Vec::new();
            for p in &f.patches {
                match p {
                    Patch::Filter {
                        context: Context::Outbound,
                        config,
                        ..
                    } => {
                        filter.get_or_insert(config);
                    }
                    Patch::Route {
                        context: Context::Outbound,
                        vhost,
                        route,
                        config,
                        rate_limits,
                        line,
                        ..
                    } => routes.push(OutboundRoute {
                        vhost: vhost.as_deref(),
                        route: route.as_deref(),
                        config: config.as_ref(),
                        rate_limits,
                        line: *line,
                    }),
                    _ => {}
                }
            }
            if filter.is_some() || !routes.is_empty() {
                filters.push(OutboundFilter {
                    meta: &r.meta,
                    filter,
                    routes,
                });
            }
        }
        filters.sort_by(|a, b| {
            let key = |f: &OutboundFilter<'_>| {
                (
                    f.meta.namespace != root_namespace,
                    f.meta.namespace.clone(),
                    f.meta.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        Outbound { filters }
    }

    /// Whether no outbound patch applies.
    pub(crate) fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// The limit of the route `route` of the outbound virtual host `vhost`
    /// (`<fqdn>:<port>`), as its xDS carries it: the config it is limited
    /// by (the last matching route patch's, else the first filter's) as
    /// the route's, and the `rate_limits` of the matching route patches.
    /// `None`: no filter patch applies (a route config without the filter
    /// limits nothing, as in Envoy), or the config can never limit.
    pub(crate) fn for_route(&self, vhost: &str, route: &str) -> Option<Arc<RateLimitConfig>> {
        let mut filter = None;
        let mut route_config = None;
        let mut rate_limits = Vec::new();
        for f in &self.filters {
            if filter.is_none() {
                filter = f.filter;
            }
            for r in &f.routes {
                if r.vhost.is_none_or(|v| v == vhost) && r.route.is_none_or(|n| n == route) {
                    if let Some(c) = r.config {
                        route_config = Some(c);
                    }
                    rate_limits.extend(r.rate_limits.iter().cloned());
                }
            }
        }
        let effective = route_config.or(filter)?;
        filter?;
        let config = RateLimitConfig {
            // The client's listener has the filter with a config that
            // limits nothing: the route carries the config in force.
            filter: LocalRateLimit::inert(),
            route: Some(effective.clone()),
            rate_limits: rate_limits.into(),
        };
        (!config.is_inert()).then(|| Arc::new(config))
    }

    /// The route patches whose vhost name is no virtual host of `vhosts`:
    /// each an error at its line (it would apply to nothing).
    pub(crate) fn unmatched(
        &self,
        vhosts: &std::collections::BTreeSet<String>,
    ) -> Vec<(&'r Meta, super::Diagnostic)> {
        let mut out = Vec::new();
        for f in &self.filters {
            for r in &f.routes {
                if let Some(v) = r.vhost
                    && !vhosts.contains(v)
                {
                    out.push((
                        f.meta,
                        f.meta.diagnostic(
                            r.line,
                            format!(
                                "vhost {v:?} names no outbound virtual host of this mesh \
                                 (Istio's names are <fqdn>:<port> of a service's port, e.g. \
                                 {:?}); this patch applies to nothing",
                                vhosts.iter().next().map_or(
                                    "reviews.default.svc.cluster.local:9080",
                                    String::as_str
                                )
                            ),
                        ),
                    ));
                }
            }
        }
        out
    }
}

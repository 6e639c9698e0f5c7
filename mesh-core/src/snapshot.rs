//! A complete, consistent set of resources: what one process routes with.
//!
//! The control server builds one from Istio YAML and registrations and serves
//! it; the xDS client rebuilds one from what it has accepted and publishes it
//! through an atomic pointer. Requests read it without locks and resolve a
//! destination with [`Snapshot::resolve`].

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::sync::Arc;

use crate::Error;
use crate::model::{
    Cluster, ClusterLoadAssignment, Listener, Name, Route, RouteConfig, RoutePolicy,
    ServerListener, VirtualHost,
};
use crate::route::{RequestView, strip_port};

/// The resources of one config version, keyed by xDS resource name.
///
/// `BTreeMap` keeps iteration (status output, dumps, xDS responses) in a
/// stable order; lookups are by `&str`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// LDS: listeners by the name an app dials.
    pub listeners: BTreeMap<Name, Arc<Listener>>,
    /// LDS: server (inbound, gRFC A36) listeners by resource name.
    pub server_listeners: BTreeMap<Name, Arc<ServerListener>>,
    /// RDS: route configurations by name.
    pub route_configs: BTreeMap<Name, Arc<RouteConfig>>,
    /// CDS: clusters by name.
    pub clusters: BTreeMap<Name, Arc<Cluster>>,
    /// EDS: endpoints by EDS service name.
    pub endpoints: BTreeMap<Name, Arc<ClusterLoadAssignment>>,
    /// Listener names the control server said do not exist (client side only).
    pub missing_listeners: BTreeSet<Name>,
    /// Accepted version per resource type (client side), or the served version.
    pub versions: Versions,
}

/// The accepted version of each resource type.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Versions {
    /// LDS version.
    pub listeners: Name,
    /// RDS version.
    pub route_configs: Name,
    /// CDS version.
    pub clusters: Name,
    /// EDS version.
    pub endpoints: Name,
}

/// Where a request goes, as decided against one snapshot.
#[derive(Debug, Clone, Copy)]
pub struct Resolved<'a> {
    /// The listener the authority selected.
    pub listener: &'a Listener,
    /// The matched route.
    pub route: &'a Route,
    /// The picked cluster.
    pub cluster: &'a Cluster,
    /// Its endpoints.
    pub endpoints: &'a ClusterLoadAssignment,
    /// The index of the picked destination among the route's weighted
    /// clusters (destination-level header rules are by index).
    pub destination: usize,
    /// The route's table (its virtual host's routes) and its index there,
    /// for [`Resolved::route_handle`].
    routes: &'a Arc<[Route]>,
    index: usize,
}

impl Resolved<'_> {
    /// The matched route as an owned handle (a reference count): what a
    /// request that outlives the snapshot reads its route through.
    pub fn route_handle(&self) -> RouteHandle {
        RouteHandle {
            routes: self.routes.clone(),
            index: self.index,
        }
    }
}

/// A route of a snapshot, kept alive by its virtual host's route table:
/// one reference count, where a copy of the route's policies would be
/// most of a route's size (see [`Resolved::route_handle`]). It reads as
/// the [`Route`], and lends its [`RoutePolicy`] (an
/// [`engine::Exchange`](crate::engine::Exchange) holds one).
#[derive(Debug, Clone)]
pub struct RouteHandle {
    routes: Arc<[Route]>,
    /// In bounds (checked when made).
    index: usize,
}

impl RouteHandle {
    /// Route `index` of `routes` (a virtual host's table); `None` when
    /// there is no such route.
    pub fn new(routes: &Arc<[Route]>, index: usize) -> Option<Self> {
        (index < routes.len()).then(|| RouteHandle {
            routes: routes.clone(),
            index,
        })
    }
}

impl Deref for RouteHandle {
    type Target = Route;

    fn deref(&self) -> &Route {
        &self.routes[self.index]
    }
}

impl Borrow<RoutePolicy> for RouteHandle {
    fn borrow(&self) -> &RoutePolicy {
        &self.policy
    }
}

/// What [`Snapshot::listener_for`] found for an authority.
#[derive(Debug, Clone, Copy)]
pub enum ListenerLookup<'a> {
    /// A listener serves it.
    Found(&'a Listener),
    /// The control server said no listener has this name.
    Missing,
    /// Not known yet: subscribe and wait.
    Unknown,
}

impl Snapshot {
    /// The listener for an authority: the exact name first (`catalog:8080`),
    /// then the host without its port (`catalog`).
    pub fn listener_for(&self, authority: &str) -> ListenerLookup<'_> {
        if let Some(l) = self.listener_handle(authority) {
            return ListenerLookup::Found(l);
        }
        if self.missing_listeners.contains(authority) {
            ListenerLookup::Missing
        } else {
            ListenerLookup::Unknown
        }
    }

    /// The listener [`listener_for`](Self::listener_for) finds, as the
    /// map holds it (a caller can keep it past the snapshot).
    pub fn listener_handle(&self, authority: &str) -> Option<&Arc<Listener>> {
        if let Some(l) = self.listeners.get(authority) {
            return Some(l);
        }
        let host = strip_port(authority);
        if host.len() != authority.len() {
            return self.listeners.get(host);
        }
        None
    }

    /// Routes a request: listener → route config → virtual host → first
    /// matching route → weighted cluster (with `random`) → endpoints.
    /// The error names the first missing piece.
    pub fn resolve<'a>(
        &'a self,
        listener: &'a Listener,
        req: &RequestView<'_>,
        random: u64,
    ) -> Result<Resolved<'a>, Error> {
        let (rc, vh) = self.virtual_host_for(listener, req.authority)?;
        let vh = &rc.virtual_hosts[vh];
        let index = route_index(vh, req)?;
        self.destination(listener, &vh.routes, index, || random)
    }

    /// The first steps of [`resolve`](Self::resolve): `listener`'s route
    /// config and the index of its virtual host that serves `authority`.
    /// They depend on the authority only, so a caller may keep them for
    /// the next request to the same authority on the same snapshot.
    pub fn virtual_host_for(
        &self,
        listener: &Listener,
        authority: &str,
    ) -> Result<(&Arc<RouteConfig>, usize), Error> {
        let rc = self
            .route_configs
            .get(&*listener.route_config_name)
            .ok_or_else(|| {
                Error::no_route(format!(
                    "listener {:?}: route config {:?} not received",
                    listener.name, listener.route_config_name
                ))
            })?;
        let vh = rc.virtual_host_index(authority).ok_or_else(|| {
            Error::no_route(format!(
                "route config {:?}: no virtual host for {:?}",
                rc.name, authority
            ))
        })?;
        Ok((rc, vh))
    }

    /// The last steps of [`resolve`](Self::resolve): route `index` of
    /// `routes` (a virtual host's table, see [`route_index`]) → weighted
    /// cluster → endpoints. `random` is asked for a number only when the
    /// route has more than one destination.
    pub fn destination<'a>(
        &'a self,
        listener: &'a Listener,
        routes: &'a Arc<[Route]>,
        index: usize,
        random: impl FnOnce() -> u64,
    ) -> Result<Resolved<'a>, Error> {
        let route = &routes[index];
        if route.action.is_none() {
            return Err(Error::no_route(format!(
                "route {:?} answers requests itself (a redirect or a direct response): \
                 it has no destination",
                route.name
            )));
        }
        let destination = match route.action.clusters() {
            [_] => 0,
            _ => route.action.pick_index(random()),
        };
        let wc = &route.action.clusters()[destination];
        let cluster = self.clusters.get(&*wc.name).ok_or_else(|| {
            Error::no_route(format!(
                "route {:?}: cluster {:?} not received",
                route.name, wc.name
            ))
        })?;
        let endpoints = self
            .endpoints
            .get(&*cluster.eds_service_name)
            .ok_or_else(|| {
                Error::no_route(format!(
                    "cluster {:?}: endpoints {:?} not received",
                    cluster.name, cluster.eds_service_name
                ))
            })?;
        Ok(Resolved {
            listener,
            route,
            cluster,
            endpoints,
            destination,
            routes,
            index,
        })
    }

    /// The route config names the listeners refer to (the RDS subscription).
    pub fn referenced_route_configs(&self) -> BTreeSet<Name> {
        self.listeners
            .values()
            .map(|l| l.route_config_name.clone())
            .collect()
    }

    /// The cluster names the route configs refer to (the CDS subscription).
    pub fn referenced_clusters(&self) -> BTreeSet<Name> {
        self.route_configs
            .values()
            .flat_map(|rc| rc.virtual_hosts.iter())
            .flat_map(|vh| vh.routes.iter())
            .flat_map(|r| {
                let mirrors = r.policy.traffic.iter().flat_map(|t| t.mirrors.iter());
                r.action
                    .clusters()
                    .iter()
                    .map(|c| c.name.clone())
                    .chain(mirrors.map(|m| m.cluster.clone()))
            })
            .collect()
    }

    /// The EDS names the clusters refer to (the EDS subscription).
    pub fn referenced_endpoints(&self) -> BTreeSet<Name> {
        self.clusters
            .values()
            // A DNS cluster's endpoints are resolved, not subscribed to.
            .filter(|c| c.discovery == crate::model::Discovery::Eds)
            .map(|c| c.eds_service_name.clone())
            .collect()
    }
}

/// The step of [`Snapshot::resolve`] between the virtual host and the
/// destination: the index of the first route of `vh` that matches `req`.
pub fn route_index(vh: &VirtualHost, req: &RequestView<'_>) -> Result<usize, Error> {
    vh.find_index(req).ok_or_else(|| {
        Error::no_route(format!(
            "virtual host {:?}: no route matches {} {}",
            vh.name, req.method, req.path
        ))
    })
}

//! A complete, consistent set of resources: what one process routes with.
//!
//! The control server builds one from Istio YAML and registrations and serves
//! it; the xDS client rebuilds one from what it has accepted and publishes it
//! through an atomic pointer. Requests read it without locks and resolve a
//! destination with [`Snapshot::resolve`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::Error;
use crate::model::{
    Cluster, ClusterLoadAssignment, Listener, Name, Route, RouteConfig, ServerListener,
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
        if let Some(l) = self.listeners.get(authority) {
            return ListenerLookup::Found(l);
        }
        let host = strip_port(authority);
        if host.len() != authority.len()
            && let Some(l) = self.listeners.get(host)
        {
            return ListenerLookup::Found(l);
        }
        if self.missing_listeners.contains(authority) {
            ListenerLookup::Missing
        } else {
            ListenerLookup::Unknown
        }
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
        let rc = self
            .route_configs
            .get(&*listener.route_config_name)
            .ok_or_else(|| {
                Error::no_route(format!(
                    "listener {:?}: route config {:?} not received",
                    listener.name, listener.route_config_name
                ))
            })?;
        let vh = rc.virtual_host(req.authority).ok_or_else(|| {
            Error::no_route(format!(
                "route config {:?}: no virtual host for {:?}",
                rc.name, req.authority
            ))
        })?;
        let route = vh.find(req).ok_or_else(|| {
            Error::no_route(format!(
                "virtual host {:?}: no route matches {} {}",
                vh.name, req.method, req.path
            ))
        })?;
        let wc = route.action.pick(random);
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
            .flat_map(|r| r.action.clusters().iter().map(|c| c.name.clone()))
            .collect()
    }

    /// The EDS names the clusters refer to (the EDS subscription).
    pub fn referenced_endpoints(&self) -> BTreeSet<Name> {
        self.clusters
            .values()
            .map(|c| c.eds_service_name.clone())
            .collect()
    }
}

//! The labels a workload has, as its policies and its view see them: those
//! of its registrations (as its EDS endpoints carry them), else its node's
//! `LABELS` over its WorkloadGroup's.
//!
//! A child of `state` because both the ADS stream (`ads`: the server
//! listeners' selectors) and `state` itself (a caller's view key) need
//! them, and `ads` already sits above `state`: written in `ads`, they made
//! the two modules import each other.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use super::{NodeWorkload, Served};
use crate::registry::Registered;

/// The one label set of the workload `node` describes, listening on
/// `address`: the labels of its registration there, so the selectors of
/// its policies see the labels its EDS endpoint carries for subsets (the
/// WorkloadGroup's, under the bootstrap's `LABELS`, under `.label()`s).
///
/// The registration is one of this workload's — in its namespace and,
/// when registration is authenticated, made by the identity the node
/// names (`SERVICE_ACCOUNT`), so no other workload can choose the labels
/// this one's policies see — found, in order:
///
/// 1. registered at the listening `ip:port` itself;
/// 2. registered with the node's id on the listening port: a listener on
///    `0.0.0.0:8080` (or bound to another address than it advertises) is
///    the workload that registered port 8080 from this bootstrap.
///
/// When one endpoint backs several services, their label sets are merged,
/// the first service by name winning a conflict. A workload with no such
/// registration (not registered yet, or not through `proxyless`) gets its
/// node's `LABELS` over the labels of the WorkloadGroup its `node.cluster`
/// names.
pub(crate) fn workload_labels(
    served: &Served,
    address: SocketAddr,
    node: &NodeWorkload,
) -> BTreeMap<String, String> {
    let ours = |r: &&Registered| registered_by(r, node);
    let at_address = |r: &&Registered| {
        !address.ip().is_unspecified()
            && r.registration.address == address.ip()
            && r.registration.port == address.port()
    };
    let by_node = |r: &&Registered| {
        !node.id.is_empty()
            && r.node_id.as_deref() == Some(node.id.as_str())
            && r.registration.port == address.port()
    };
    let mut found: Vec<&Registered> = served
        .registered
        .iter()
        .filter(ours)
        .filter(at_address)
        .collect();
    if found.is_empty() {
        found = served
            .registered
            .iter()
            .filter(ours)
            .filter(by_node)
            .collect();
    }
    merged_labels(served, node, found)
}

/// Whether `r` is one of the workload's own registrations: in its
/// namespace and, when registration is authenticated, made by the identity
/// the node names.
fn registered_by(r: &Registered, node: &NodeWorkload) -> bool {
    r.registration.namespace == node.namespace
        && r.owner.as_ref().is_none_or(|owner| {
            owner.namespace() == node.namespace
                && node.service_account.as_deref() == Some(owner.service_account())
        })
}

/// The labels of registrations `found` merged, the first service by name
/// winning a conflict; none found: the node's `LABELS` over the labels of
/// the WorkloadGroup its `node.cluster` names.
fn merged_labels(
    served: &Served,
    node: &NodeWorkload,
    mut found: Vec<&Registered>,
) -> BTreeMap<String, String> {
    if found.is_empty() {
        return served
            .security
            .node_labels(&node.cluster, &node.namespace, &node.labels);
    }
    found.sort_by(|a, b| a.registration.service.cmp(&b.registration.service));
    let mut labels = BTreeMap::new();
    for r in found {
        for (k, v) in &r.registration.labels {
            labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    labels
}

/// The one label set of the workload `node` describes as a caller: what
/// `match.sourceLabels` is matched against (its view key). As for its
/// server listeners ([`workload_labels`]): the labels of the registrations
/// made from this node (its id, any port; its namespace and identity), as
/// its EDS endpoints carry them, or else its node's `LABELS` over its
/// WorkloadGroup's.
pub(crate) fn caller_labels(served: &Served, node: &NodeWorkload) -> BTreeMap<String, String> {
    let found = if node.id.is_empty() {
        Vec::new()
    } else {
        served
            .registered
            .iter()
            .filter(|r| registered_by(r, node))
            .filter(|r| r.node_id.as_deref() == Some(node.id.as_str()))
            .collect()
    };
    merged_labels(served, node, found)
}

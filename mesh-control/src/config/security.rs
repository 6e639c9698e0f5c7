//! PeerAuthentication and AuthorizationPolicy, resolved per workload into
//! server listeners (gRFC A36), and the service accounts a service allows.
//!
//! CONTRACT STUB (issue 5): the config helper replaces the bodies.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use mesh_core::model::{MtlsMode, ServerListener};
use mesh_core::spiffe::SpiffeId;

use super::resources::Resource;
use super::{MeshOptions, Registration};

/// The workload a server listener is built for, as its xDS node describes
/// it: `node.metadata.NAMESPACE` and `node.metadata.LABELS`.
#[derive(Debug, Clone, Copy)]
pub struct Workload<'a> {
    /// The workload's namespace.
    pub namespace: &'a str,
    /// The workload's labels (matched by `selector.matchLabels`).
    pub labels: &'a BTreeMap<String, String>,
}

/// The security resources of a config, resolved for lookups per workload.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityPolicies {}

impl SecurityPolicies {
    /// The server listener named `name` for `workload` listening on
    /// `address`: the PeerAuthentication mode for the port (workload
    /// selector, then namespace, then root namespace, then PERMISSIVE;
    /// `portLevelMtls` for the port) and the AuthorizationPolicies that
    /// select it.
    pub fn server_listener(
        &self,
        name: &str,
        address: SocketAddr,
        workload: Workload<'_>,
    ) -> ServerListener {
        let _ = workload;
        ServerListener {
            name: name.into(),
            address,
            mtls: MtlsMode::Permissive,
            policies: Arc::from(Vec::new()),
        }
    }
}

pub(super) fn resolve(_options: &MeshOptions, _resources: &[&Resource]) -> SecurityPolicies {
    SecurityPolicies::default()
}

pub(super) fn authorize_registration(
    _options: &MeshOptions,
    _resources: &[&Resource],
    _registration: &Registration,
    _identity: &SpiffeId,
) -> Result<(), String> {
    Ok(())
}

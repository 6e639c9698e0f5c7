//! mesh-control: the control server of the proxyless mesh.
//!
//! It reads Istio YAML (VirtualService, DestinationRule, ServiceEntry,
//! WorkloadEntry) from a directory it watches, accepts endpoint
//! self-registration with leases on an admin HTTP API, translates both into
//! the mesh model, and serves it as Envoy v3 xDS over ADS (state of the world)
//! in the shape gRPC's proxyless clients read — so Rust services using
//! `proxyless` and gRPC services using `xds:///` targets follow one config.
//!
//! With a CA ([`ServerBuilder::ca`], `serve --ca-dir`), it is the mesh's
//! identity provider too: it issues SPIFFE X.509-SVIDs to workloads that
//! present a join token, serves ADS and the admin API over TLS with a
//! certificate of its own CA, authenticates and authorizes registrations,
//! and serves each server its inbound listener (gRFC A36) carrying the
//! PeerAuthentication mode and AuthorizationPolicies (gRFC A41) that apply
//! to it.
//!
//! Run it as a binary (`mesh-control serve --config DIR`), validate YAML
//! offline (`mesh-control check DIR`), or embed it ([`Server::builder`]).

mod admin;
mod ads;
pub mod ca;
mod compat;
pub mod config;
mod csds;
mod error;
mod metrics;
mod registry;
mod server;
mod state;

pub use error::{Error, ErrorKind};
pub use server::{
    BootstrapSpec, CertificateSource, SERVER_LISTENER_TEMPLATE, Server, ServerBuilder,
    ServerHandle, bootstrap_json, bootstrap_json_for,
};

/// What gRPC proxyless clients and xDS-enabled gRPC servers would ignore
/// of the config in `dir`, one sentence per finding (`mesh-control check
/// --for grpc`). The same report appears per connected gRPC client in
/// `/status`, for what that client was served.
pub fn grpc_compatibility(dir: &std::path::Path, options: &config::MeshOptions) -> Vec<String> {
    let mut store = config::ConfigStore::new(options.clone());
    let _ = store.load_dir(dir);
    let (snapshot, _) = store.snapshot(&[]);
    let mut findings = compat::grpc_ignored(&snapshot, None, None);
    findings.extend(compat::grpc_security_ignored(&store.security(), &snapshot));
    findings
}

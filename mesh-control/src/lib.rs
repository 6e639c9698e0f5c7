//! mesh-control: the control server of the proxyless mesh.
//!
//! It reads Istio YAML (VirtualService, DestinationRule, ServiceEntry,
//! WorkloadEntry) from a directory it watches, accepts endpoint
//! self-registration with leases on an admin HTTP API, translates both into
//! the mesh model, and serves it as Envoy v3 xDS over ADS (state of the world)
//! in the shape gRPC's proxyless clients read — so Rust services using
//! `proxyless` and gRPC services using `xds:///` targets follow one config.
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
pub use server::{Server, ServerBuilder, ServerHandle, bootstrap_json};

/// What gRPC proxyless clients would ignore of the config in `dir`, one
/// sentence per finding (`mesh-control check --for grpc`). The same report
/// appears per connected gRPC client in `/status`.
pub fn grpc_compatibility(dir: &std::path::Path, options: &config::MeshOptions) -> Vec<String> {
    let mut store = config::ConfigStore::new(options.clone());
    let _ = store.load_dir(dir);
    let (snapshot, _) = store.snapshot(&[]);
    compat::grpc_ignored(&snapshot, None, None)
}

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
pub mod config;
mod error;
mod registry;
mod server;
mod state;

pub use error::{Error, ErrorKind};
pub use server::{Server, ServerBuilder, ServerHandle, bootstrap_json};

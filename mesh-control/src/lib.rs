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
//! Run it as a binary (`mesh-control serve --config DIR...`), validate YAML
//! offline (`mesh-control check DIR...`), or embed it ([`Server::builder`]).
//! Several config directories are read as one config (their files, not
//! their subdirectories; see [`config`]).
//!
//! With the feature `etcd`, several replicas share one etcd
//! (`mesh-control serve --etcd URL...`, [`ServerBuilder::etcd`]): the config
//! is applied to etcd (`mesh-control apply DIR... --etcd URL...`,
//! [`replica::apply`]), registrations are etcd keys with etcd leases, the
//! CA root is shared, and every replica serves the same content under the
//! same version; see [`replica`].

mod admin;
mod ads;
pub mod ca;
mod compat;
pub mod config;
mod csds;
mod debounce;
mod dialect;
mod dns;
pub mod envoy_bootstrap;
mod error;
#[cfg(feature = "etcd")]
pub mod etcd;
/// The service graph read from Prometheus (`serve --prometheus URL`).
mod graph_prom;
mod metrics;
mod persist;
mod registry;
#[cfg(feature = "etcd")]
pub mod replica;
mod sds;
mod server;
mod state;

pub use compat::GrpcReport;
pub use error::{Error, ErrorKind};
pub use server::{
    BootstrapSpec, CertificateSource, SERVER_LISTENER_TEMPLATE, SHUTDOWN_GRACE, Server,
    ServerBuilder, ServerHandle, bootstrap_json, bootstrap_json_for,
};

/// What gRPC proxyless clients and xDS-enabled gRPC servers would ignore
/// of the config in `dir` as it is served, defaults included, one sentence
/// per finding about a route, cluster or policy. The same report appears
/// per connected gRPC client in `/status`, for what that client was served.
/// `mesh-control check --for grpc` prints [`grpc_report`] instead, which
/// points at the YAML's lines and keeps the mesh's defaults apart.
pub fn grpc_compatibility(dir: &std::path::Path, options: &config::MeshOptions) -> Vec<String> {
    let mut store = config::ConfigStore::new(options.clone());
    let _ = store.load_dir(dir);
    let (snapshot, _) = store.snapshot(&[]);
    let mut findings = compat::grpc_ignored(&snapshot, None, None);
    findings.extend(compat::grpc_security_ignored(&store.security(), &snapshot));
    findings
}

/// What `mesh-control check --for grpc DIR...` reports: what gRPC clients
/// and servers ignore of what the YAML in `dirs` says, at the line of each
/// field, and, apart from it, the mesh's defaults that gRPC clients handle
/// differently (Istio's default retry conditions, LEAST_REQUEST, PERMISSIVE,
/// auto mTLS), which are not problems of the YAML. Unlike
/// [`grpc_compatibility`], a default is never reported as if the YAML had
/// written it.
pub fn grpc_report(
    dirs: &[impl AsRef<std::path::Path>],
    options: &config::MeshOptions,
) -> GrpcReport {
    let mut store = config::ConfigStore::new(options.clone());
    let _ = store.load_dirs(dirs);
    let (snapshot, _) = store.snapshot(&[]);
    compat::grpc_report(&store, &snapshot)
}

/// What `mesh-control check --for envoy DIR...` reports: what an Envoy
/// sidecar (`mesh-control envoy-bootstrap`) would not honor of the config
/// in `dirs`, one sentence per finding, including what it needs from its
/// bootstrap (a locality) and from mesh-control (a CA, for SDS).
pub fn envoy_report(
    dirs: &[impl AsRef<std::path::Path>],
    options: &config::MeshOptions,
) -> Vec<String> {
    let mut store = config::ConfigStore::new(options.clone());
    let _ = store.load_dirs(dirs);
    let (snapshot, _) = store.snapshot(&[]);
    compat::envoy_report(&store, &snapshot)
}

#[doc(hidden)]
pub mod fuzzing {
    //! Entry points for the fuzz targets in `fuzz/` (outside the
    //! workspace), which reach decoders that are crate-private here. Not
    //! part of the API: each is a thin call into the code the server runs
    //! on untrusted or operator input, so that a fuzzer finds what a
    //! request or a file could make it do.

    use std::path::PathBuf;

    use crate::config::{ConfigStore, MeshOptions, Registration, SourceDocument};

    /// Reads `files` (file name, text; each text may hold several YAML
    /// documents) as `serve --config` reads a directory, applies them with
    /// `registrations`, and returns the store (for the caller to translate)
    /// and the number of problems reported.
    pub fn load_config(
        files: &[(String, String)],
        registrations: &[Registration],
    ) -> (ConfigStore, usize) {
        let mut store = ConfigStore::new(MeshOptions::default());
        let documents: Vec<SourceDocument> = files
            .iter()
            .enumerate()
            .map(|(position, (file, yaml))| SourceDocument {
                file: PathBuf::from(file),
                position,
                doc: 0,
                line: 1,
                yaml: yaml.clone(),
            })
            .collect();
        let problems = store.read_documents(&documents).len();
        store.settle(registrations);
        (store, problems)
    }

    /// The body of `POST /v1/endpoints` as the admin API reads it: JSON
    /// into the request, then the request's validation (the 400 message on
    /// error).
    pub fn register_request(body: &[u8]) -> Result<Registration, String> {
        let req: crate::registry::RegisterRequest =
            serde_json::from_slice(body).map_err(|e| e.to_string())?;
        crate::registry::validate(req)
    }

    /// What `gRPC` clients would ignore of `snapshot` (the `/status`
    /// report), so the fuzz targets reach the compatibility checks too.
    pub fn grpc_ignored(store: &ConfigStore, snapshot: &mesh_core::Snapshot) -> usize {
        let mut n = crate::compat::grpc_ignored(snapshot, None, None).len();
        n += crate::compat::grpc_security_ignored(&store.security(), snapshot).len();
        n
    }
}

//! mTLS with SPIFFE identities (rustls), with hot certificate rotation.
//!
//! The pieces Istio's sidecar provides, in-process (gRFC A29 for the xDS
//! side of it):
//!
//! - [`CertStore`]: the workload's X.509-SVID, its key and the mesh trust
//!   bundle, behind one atomic pointer. [`CertStore::update`] swaps them:
//!   handshakes that start afterwards use the new certificate and bundle,
//!   established connections keep the keys they negotiated and are not
//!   dropped (Envoy's SDS rotation behaves the same way). It is the
//!   certificate resolver of both the client and the server config.
//! - [`client_config`]: the client side. The server's chain must verify
//!   against the current trust bundle (with the `serverAuth` usage), its one
//!   URI SAN must be a SPIFFE ID of the mesh's trust domain and, when CDS
//!   names the identities the cluster may have, one of them
//!   ([`ServerIdentities`]; A29's `match_subject_alt_names`). DNS names are
//!   not checked: the SPIFFE ID is the server's name in the mesh.
//! - [`server_config`] and [`MeshAcceptor`]: the server side, with Istio's
//!   PeerAuthentication modes ([`MtlsMode`]). STRICT requires a client
//!   certificate of the trust domain; PERMISSIVE accepts mTLS and plaintext
//!   on one port, telling them apart by the first byte a client sends (a TLS
//!   handshake record starts with `0x16`, which no HTTP/1 method or HTTP/2
//!   preface does), as Envoy's TLS inspector does; DISABLE is plaintext.
//!   The verified identity is the connection's [`PeerIdentity`], which
//!   `serve` puts into every request's extensions for the app and for
//!   authorization.
//! - [`FileWatcher`]: the gRPC bootstrap's `file_watcher` certificate
//!   provider (certificate, key and CA files re-read every
//!   `refresh_interval`), so certificates from SPIRE, cert-manager or any
//!   tool that writes files are rotated without a restart.
//! - [`FileTlsConnector`]: Istio's SIMPLE and MUTUAL modes (DestinationRule
//!   `tls` with `caCertificates`, `clientCertificate`, `privateKey` files):
//!   TLS to servers outside the mesh's identities, verified against the CA
//!   file (without one, the operating system's roots) for the SNI or the
//!   configured SANs, files re-read when changed.
//! - [`WorkloadCertificates`]: the bootstrap's `mesh` certificate provider
//!   made live: `file_watcher` files, or `mesh_ca` (a key generated here, a
//!   CSR to mesh-control's CA, renewal at half-life).
//!
//! TLS session resumption is off on both sides: every connection does a
//! full handshake, so a rotated bundle or identity applies to every new
//! connection. The crypto provider is rustls' `ring`.

mod accept;
mod admin_client;
mod config;
mod file_watcher;
mod identity;
mod origination;
mod store;
mod verify;
mod workload;

pub use self::accept::{MeshAcceptor, MeshStream, MtlsMode};
pub use self::config::{MeshConnector, client_config, server_config};
pub use self::file_watcher::{DEFAULT_REFRESH_INTERVAL, FileWatcher, FileWatcherConfig};
pub use self::identity::{PeerIdentity, ServerIdentities, spiffe_id_of};
pub use self::origination::FileTlsConnector;
pub use self::store::{CertStore, Credentials};
pub use self::workload::{
    MESH_CA_PLUGIN, MESH_PROVIDER_INSTANCE, MeshCaConfig, WorkloadCertificates,
};

pub(crate) use self::admin_client::{AdminClient, control_ca_pem};
pub(crate) use self::workload::bootstrap_token;

/// The ALPN protocols `serve` and the pool speak: HTTP/2, then HTTP/1.1.
pub const ALPN_H2_HTTP11: &[&[u8]] = &[b"h2", b"http/1.1"];

/// The rustls crypto provider of the mesh (ring).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

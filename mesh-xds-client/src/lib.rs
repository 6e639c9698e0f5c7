//! The ADS client of the proxyless mesh.
//!
//! - [`Bootstrap`]: gRPC's xDS bootstrap JSON (`GRPC_XDS_BOOTSTRAP` /
//!   `GRPC_XDS_BOOTSTRAP_CONFIG`), so one file serves Rust and gRPC services.
//! - [`state::AdsState`]: the sans-io state-of-the-world ADS state machine
//!   (subscriptions, versions, nonces, ACK/NACK, the LDS → RDS → CDS → EDS
//!   cascade), tested without a runtime.
//! - [`XdsClient`]: the tokio task that drives it over tonic, reconnects
//!   with backoff across the bootstrap's servers, and publishes complete
//!   [`mesh_core::Snapshot`]s that requests read lock-free.
//! - Static stability: the last good config is kept in a cache file (on by
//!   default, per node; [`cache`] says where and how), and a client that
//!   starts while no control server answers serves it, marked stale
//!   ([`XdsClient::stale_since`]), until one does.
//! - Debugging (gRFC A40): [`XdsClient::client_status`] and [`CsdsService`]
//!   answer CSDS about this client; [`XdsClient::config_dump_json`] renders
//!   the snapshot it runs as JSON.
//!
//! ```no_run
//! # async fn demo() -> Result<(), mesh_xds_client::Error> {
//! use std::time::Duration;
//! use mesh_xds_client::{Bootstrap, XdsClient};
//!
//! let client = XdsClient::start(Bootstrap::from_env()?);
//! let wait = client.wait_for_listener("catalog.shop:8080");
//! match tokio::time::timeout(Duration::from_secs(5), wait).await {
//!     Ok(ready) => ready?,
//!     Err(_) => eprintln!("no config yet; last error: {:?}", client.last_error()),
//! }
//! let snapshot = client.snapshot(); // one atomic load per request
//! # let _ = snapshot;
//! # Ok(())
//! # }
//! ```

pub mod bootstrap;
mod client;
mod csds;
mod dns;
mod dump;
mod error;
pub mod state;
mod tls;

pub use bootstrap::{Bootstrap, BootstrapBuilder, ChannelTls, XdsServer};
pub use client::{CacheStatus, ClientOptions, WeakXdsClient, XdsClient};
pub use csds::CsdsService;
pub use dns::DNS_SERVER_ENV_VAR;
pub use error::{Error, ErrorKind};

pub mod cache {
    //! The static-stability cache files: where they live and how they are
    //! written (what the xDS client uses, and mesh-tower's workload
    //! certificate cache next to it).
    //!
    //! [`cache_file_for`] gives a node's xDS cache file (the environment
    //! variable [`CACHE_ENV_VAR`] over the bootstrap's `proxyless.cache_file`
    //! over [`default_cache_dir`]); [`sibling_file`] the files kept next to
    //! it; [`write_private_file`] and [`read_private_file`] (mesh-fs's, the
    //! code mesh-control's data directory uses too) write atomically and
    //! durably with mode 0600, and refuse to read what others could have
    //! written. The [`XdsClient`](crate::XdsClient) docs say what the client
    //! does with its cache.

    pub use crate::client::{
        CACHE_ENV_VAR, CACHE_FILE_KEY, CacheStatus, DEFAULT_CACHE_WAIT, cache_file_for,
        default_cache_dir, fnv1a_hex, read_private_file, sibling_file, write_private_file,
    };
}

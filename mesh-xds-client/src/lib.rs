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
mod dump;
mod error;
pub mod state;
mod tls;

pub use bootstrap::{Bootstrap, BootstrapBuilder, ChannelTls, XdsServer};
pub use client::{ClientOptions, XdsClient};
pub use csds::CsdsService;
pub use error::{Error, ErrorKind};

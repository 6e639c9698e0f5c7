//! Generates the client of etcd's v3 gRPC API (proto/etcdserverpb/rpc.proto,
//! proto/mvccpb/kv.proto) for the `etcd` feature, and nothing without it.
//!
//! The protos are parsed by `protox`, a protobuf compiler written in Rust, so
//! no `protoc` binary is needed (which is why the `etcd-client` crate, whose
//! build runs `protoc`, is not used); tonic-prost-build turns the descriptor
//! set into prost messages and tonic clients. Both are optional
//! build-dependencies enabled by the feature: a build without it (the lean
//! `proxyless` build) compiles neither.

fn main() {
    #[cfg(feature = "etcd")]
    etcd::generate();
    #[cfg(not(feature = "etcd"))]
    println!("cargo:rerun-if-changed=build.rs");
}

#[cfg(feature = "etcd")]
mod etcd {
    use std::path::Path;

    const PROTOS: [&str; 2] = ["proto/etcdserverpb/rpc.proto", "proto/mvccpb/kv.proto"];

    pub(super) fn generate() {
        println!("cargo:rerun-if-changed=build.rs");
        for proto in PROTOS {
            println!("cargo:rerun-if-changed={proto}");
        }
        let descriptors = match protox::compile(PROTOS.map(Path::new), ["proto"]) {
            Ok(descriptors) => descriptors,
            Err(error) => {
                eprintln!("error: etcd's protos (mesh-control/proto) do not compile: {error:?}");
                std::process::exit(1);
            }
        };
        if let Err(error) = tonic_prost_build::configure()
            .build_client(true)
            .build_server(false)
            .compile_fds(descriptors)
        {
            eprintln!("error: generating Rust code for etcd's protos: {error}");
            std::process::exit(1);
        }
    }
}

//! gRPC's xDS bootstrap (`GRPC_XDS_BOOTSTRAP` / `GRPC_XDS_BOOTSTRAP_CONFIG`,
//! gRFC A27 and A65), as `mesh_xds_client::Bootstrap::from_json` reads it,
//! then everything the client derives from it (node, locality, labels,
//! server listener names, admin addresses, the cache file).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_xds_client::Bootstrap;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(bootstrap) = Bootstrap::from_json(json) else {
        return;
    };
    let _ = bootstrap.node();
    let _ = bootstrap.locality();
    let _ = bootstrap.labels();
    let _ = bootstrap.service_account();
    let _ = bootstrap.admin_addresses();
    let _ = bootstrap.xds_server_tls();
    for server in bootstrap.xds_servers() {
        let _ = server.host();
        let _ = server.endpoint_uri();
        let _ = server.ignores_resource_deletion();
    }
    for address in ["0.0.0.0:8080", "[::]:50051", "10.0.0.7:9000"] {
        let _ = bootstrap.server_listener_name(address);
    }
    let _ = mesh_xds_client::cache::cache_file_for(&bootstrap, |_| None);
});

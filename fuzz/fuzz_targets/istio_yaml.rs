//! The Istio YAML front end of mesh-control: the files of a config
//! directory (`serve --config DIR`, or documents applied to the replicas'
//! store), parsed, checked, applied with registrations and translated into
//! what the ADS server serves.
//!
//! The input is UTF-8 text; a line `#@file` starts another file (so one
//! input can define a resource twice, or in two files). Beyond "no panic",
//! every resource the translation serves must decode on the client: the
//! control server must never send what its own client would NACK.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::xds::ResourceType;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let files: Vec<(String, String)> = text
        .split("#@file\n")
        .enumerate()
        .map(|(i, t)| (format!("/config/{i}.yaml"), t.to_string()))
        .collect();
    let registrations = proxyless_fuzz::registrations();
    let (store, _problems) = mesh_control::fuzzing::load_config(&files, &registrations);
    let (snapshot, _diagnostics) = store.snapshot(&registrations);
    let _ = mesh_control::fuzzing::grpc_ignored(&store, &snapshot);
    let _ = store.services(&registrations);
    for (kind, resources) in proxyless_fuzz::encode_snapshot(&snapshot) {
        for any in resources {
            let decoded = match kind {
                ResourceType::Listener => mesh_core::xds::decode_lds(&any).map(drop),
                ResourceType::RouteConfig => mesh_core::xds::decode_route_config(&any).map(drop),
                ResourceType::Cluster => mesh_core::xds::decode_cluster(&any).map(drop),
                ResourceType::Endpoints => mesh_core::xds::decode_endpoints(&any).map(drop),
            };
            if let Err(e) = decoded {
                panic!("the control server serves a {kind} its client rejects: {e}");
            }
        }
    }
    for any in proxyless_fuzz::server_listeners(&store, &registrations) {
        if let Err(e) = mesh_core::xds::decode_server_listener(&any) {
            panic!("the control server serves a server listener its clients reject: {e}");
        }
    }
});

//! The JSON body of `POST /v1/endpoints` (a registration), as the admin API
//! reads it: `RegisterRequest` from JSON, then its validation, whose error is
//! the 400 message. An accepted registration is then applied to the demo's
//! config, checked against two identities (may they register it?) and
//! translated, as the server does on every registration.
#![no_main]

use libfuzzer_sys::fuzz_target;

const CONFIG: &str = include_str!("../../examples/mesh/shop.yaml");

fuzz_target!(|data: &[u8]| {
    let Ok(registration) = mesh_control::fuzzing::register_request(data) else {
        return;
    };
    let registrations = vec![registration];
    let files = vec![("/config/shop.yaml".to_string(), CONFIG.to_string())];
    let (store, _) = mesh_control::fuzzing::load_config(&files, &registrations);
    let (snapshot, _) = store.snapshot(&registrations);
    let _ = store.services(&registrations);
    for id in [
        "spiffe://cluster.local/ns/shop/sa/catalog",
        "spiffe://cluster.local/ns/evil/sa/payments",
    ] {
        let id = mesh_core::spiffe::SpiffeId::parse(id).expect("a fixed SPIFFE ID parses");
        let _ = store.authorize_registration(&registrations[0], &id);
    }
    for (_, resources) in proxyless_fuzz::encode_snapshot(&snapshot) {
        drop(resources);
    }
    let _ = proxyless_fuzz::server_listeners(&store, &registrations);
});

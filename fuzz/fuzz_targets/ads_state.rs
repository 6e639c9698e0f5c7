//! The ADS client state machine (`mesh_xds_client::state::AdsState`) fed raw
//! `DiscoveryResponse`s, as a control server (or anything that answers on its
//! address) can send them.
//!
//! The input is a flags byte, then a sequence of length-delimited
//! `DiscoveryResponse` protos. Flags: bit 0 keeps raw resources (CSDS and
//! the cache file), bit 1 ignores resource deletion (gRFC A53), bit 2
//! reconnects before every response. The app subscribes to every listener
//! name an LDS response carries before that response arrives (as an app
//! dialing those names would). After each response the state publishes its
//! changes and reports; at the end, what it would write to its cache file
//! is loaded into a fresh state machine, as a restart does.
#![no_main]

use std::time::{Duration, SystemTime};

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use libfuzzer_sys::fuzz_target;
use mesh_core::xds::{self, ResourceType};
use mesh_xds_client::state::{AdsState, readiness};
use prost::Message;

fn new_state(flags: u8) -> AdsState {
    let node = mesh_xds_client::Bootstrap::builder("127.0.0.1:15010", "fuzz-node")
        .build()
        .expect("a fixed bootstrap builds")
        .node();
    AdsState::new(node)
        .keep_raw(flags & 1 != 0)
        .ignore_resource_deletion(flags & 2 != 0)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, mut rest)) = data.split_first() else {
        return;
    };
    let mut state = new_state(flags);
    state.subscribe("catalog");
    state.on_connected();
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut n = 0u64;
    while !rest.is_empty() {
        let Ok(resp) = DiscoveryResponse::decode_length_delimited(&mut rest) else {
            break;
        };
        n += 1;
        if resp.type_url == ResourceType::Listener.type_url() {
            for any in &resp.resources {
                if let Some(name) = xds::resource_name(any) {
                    state.subscribe(&name);
                }
            }
        }
        if flags & 4 != 0 {
            state.on_disconnected();
            state.on_connected();
        }
        let _ = state.pending_requests();
        let _ = state.on_response_at(resp, start + Duration::from_secs(n));
        if let Some((snapshot, status)) = state.take_changes() {
            for name in state.listener_names().clone() {
                let _ = readiness(&snapshot, &status, &name);
            }
        }
        let _ = state.resource_report();
    }
    let cached = state.cached_responses();
    let mut restarted = new_state(flags);
    restarted.subscribe("catalog");
    let _ = restarted.load_cached(cached);
    let _ = restarted.resource_report();
});

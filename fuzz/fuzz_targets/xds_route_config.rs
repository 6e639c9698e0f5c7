//! The bytes of an RDS resource (RouteConfiguration), as the ADS client gets them in
//! `DiscoveryResponse.resources[].value`: decoding must never panic, and what
//! it accepts must survive an encode/decode round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::xds::ResourceType;

fuzz_target!(|data: &[u8]| {
    proxyless_fuzz::check_resource(ResourceType::RouteConfig, data);
});

//! The bytes of a server listener (gRFC A36: filter chains carrying the RBAC
//! filters of the AuthorizationPolicies), as an xDS-enabled server gets
//! them: decoding must never panic, what it accepts must survive an
//! encode/decode round trip unchanged, and the policies it yields must
//! evaluate (enforced and dry-run) on requests without panicking.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use mesh_core::rbac::{RequestAttributes, evaluate, evaluate_dry_run};
use mesh_core::spiffe::SpiffeId;
use mesh_core::xds::{self, Any, LISTENER_TYPE, ResourceType};

fuzz_target!(|data: &[u8]| {
    proxyless_fuzz::check_resource(ResourceType::Listener, data);
    let any = Any {
        type_url: LISTENER_TYPE.to_string(),
        value: data.to_vec(),
    };
    let Ok(listener) = xds::decode_server_listener(&any) else {
        return;
    };
    let peer = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/frontend").ok();
    let mut headers = http::HeaderMap::new();
    headers.insert("x-user", http::HeaderValue::from_static("admin"));
    headers.append("x-user", http::HeaderValue::from_static("guest"));
    for (peer, source_ip, host, method, path) in [
        (
            peer.as_ref(),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
            "catalog.shop.svc.cluster.local:8080",
            "GET",
            "/items/1",
        ),
        (
            None,
            IpAddr::V6(Ipv6Addr::LOCALHOST),
            "[::1]:8080",
            "POST",
            "/shop.Catalog/Get",
        ),
    ] {
        let attrs = RequestAttributes {
            peer,
            source_ip,
            host,
            destination_port: listener.address.port(),
            method,
            path,
            headers: &headers,
        };
        let _ = evaluate(&listener.policies, &attrs);
        let _ = evaluate_dry_run(&listener.policies, &attrs);
    }
});

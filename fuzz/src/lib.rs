//! What the fuzz targets share: the properties every xDS decoder must keep,
//! and the translation of a config into what the ADS server serves (which the
//! seed generator writes out as the targets' seed corpora).
//!
//! The property checked beyond "no panic" is the one the client and the
//! control server rely on together: what a decoder accepts, the encoder
//! writes back in a form the decoder accepts again as the same value
//! (`decode(encode(decode(x))) == decode(x)`). A decoder that accepted a
//! value its own encoder cannot reproduce would make the control server
//! serve something other than what it validated.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse;
use mesh_control::config::{ConfigStore, Registration, Workload};
use mesh_core::Snapshot;
use mesh_core::xds::{self, Any, LdsResource, ResourceType};

/// Decodes `value` as a resource of `kind` and, when it is accepted, checks
/// that its encoding decodes to the same value.
pub fn check_resource(kind: ResourceType, value: &[u8]) {
    let any = Any {
        type_url: kind.type_url().to_string(),
        value: value.to_vec(),
    };
    let _ = xds::resource_name(&any);
    match kind {
        ResourceType::Listener => {
            if let Ok(decoded) = xds::decode_lds(&any) {
                let again = match &decoded {
                    LdsResource::Client(l) => xds::decode_lds(&xds::encode_listener(l)),
                    LdsResource::Server(l) => xds::decode_lds(&xds::encode_server_listener(l)),
                };
                assert_eq!(again.as_ref().ok(), Some(&decoded), "{again:?}");
            }
            if let Ok(decoded) = xds::decode_server_listener(&any) {
                let again = xds::decode_server_listener(&xds::encode_server_listener(&decoded));
                assert_eq!(again.as_ref().ok(), Some(&decoded), "{again:?}");
            }
        }
        ResourceType::RouteConfig => {
            if let Ok(decoded) = xds::decode_route_config(&any) {
                let again = xds::decode_route_config(&xds::encode_route_config(&decoded));
                assert_eq!(again.as_ref().ok(), Some(&decoded), "{again:?}");
            }
        }
        ResourceType::Cluster => {
            if let Ok(decoded) = xds::decode_cluster(&any) {
                let again = xds::decode_cluster(&xds::encode_cluster(&decoded));
                assert_eq!(again.as_ref().ok(), Some(&decoded), "{again:?}");
            }
        }
        ResourceType::Endpoints => {
            if let Ok(decoded) = xds::decode_endpoints(&any) {
                let again = xds::decode_endpoints(&xds::encode_endpoints(&decoded));
                assert_eq!(again.as_ref().ok(), Some(&decoded), "{again:?}");
            }
        }
    }
}

/// The registrations the config targets and the seed generator apply:
/// two endpoints of `catalog` in `shop` (subsets v1 and v2) and one of
/// `payment`, as the demo registers them.
pub fn registrations() -> Vec<Registration> {
    [
        r#"{"service":"catalog","namespace":"shop","address":"127.0.0.1","port":8081,"labels":{"app":"catalog","version":"v1"},"locality":"us-east/a","ttl_seconds":30}"#,
        r#"{"service":"catalog","namespace":"shop","address":"127.0.0.2","port":8082,"labels":{"app":"catalog","version":"v2"},"locality":"us-east/b","ttl_seconds":30}"#,
        r#"{"service":"payment","namespace":"shop","address":"::1","port":9000,"protocol":"GRPC","labels":{"app":"payment"},"ttl_seconds":30}"#,
    ]
    .iter()
    .filter_map(|body| mesh_control::fuzzing::register_request(body.as_bytes()).ok())
    .collect()
}

/// The server listeners the ADS server would build from `store` for the
/// workloads of `registrations` (gRFC A36: one per registered address).
pub fn server_listeners(store: &ConfigStore, registrations: &[Registration]) -> Vec<Any> {
    let security = store.security();
    registrations
        .iter()
        .map(|r| {
            let address = SocketAddr::new(r.address, r.port);
            let labels: BTreeMap<String, String> = r.labels.clone();
            let listener = security.server_listener(
                &format!("grpc/server?xds.resource.listening_address={address}"),
                address,
                Workload {
                    namespace: &r.namespace,
                    labels: &labels,
                },
            );
            xds::encode_server_listener(&listener)
        })
        .collect()
}

/// Every resource of `snapshot`, encoded as the ADS server serves it, by type.
pub fn encode_snapshot(snapshot: &Snapshot) -> Vec<(ResourceType, Vec<Any>)> {
    vec![
        (
            ResourceType::Listener,
            snapshot
                .listeners
                .values()
                .map(|l| xds::encode_listener(l))
                .collect(),
        ),
        (
            ResourceType::RouteConfig,
            snapshot
                .route_configs
                .values()
                .map(|r| xds::encode_route_config(r))
                .collect(),
        ),
        (
            ResourceType::Cluster,
            snapshot
                .clusters
                .values()
                .map(|c| xds::encode_cluster(c))
                .collect(),
        ),
        (
            ResourceType::Endpoints,
            snapshot
                .endpoints
                .values()
                .map(|e| xds::encode_endpoints(e))
                .collect(),
        ),
    ]
}

/// A SotW response of `kind` holding `resources`.
pub fn response(kind: ResourceType, version: &str, resources: Vec<Any>) -> DiscoveryResponse {
    DiscoveryResponse {
        version_info: version.to_string(),
        resources,
        type_url: kind.type_url().to_string(),
        nonce: format!("{kind}-{version}"),
        ..Default::default()
    }
}

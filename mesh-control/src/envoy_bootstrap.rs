//! A stock Envoy's bootstrap for this control server
//! (`mesh-control envoy-bootstrap`).
//!
//! Envoy learns everything but the way to its control server over xDS, so
//! its bootstrap holds only: who it is (`node`: id, cluster, and the
//! metadata this server reads — `NAMESPACE`, `LABELS`, and
//! `PROXYLESS_OUTBOUND_PORT`, the port of the outbound listener it is
//! served, see the Envoy dialect), one static cluster reaching mesh-control
//! over HTTP/2 (TLS against a CA file when given), and
//! `dynamic_resources` sending listeners, clusters and, through them,
//! routes, endpoints and secrets over one ADS stream (v3). A join or
//! operator token goes in the ADS stream's `initial_metadata` as
//! `authorization: Bearer <token>` (Envoy has no call credentials for its
//! own gRPC client), so the bootstrap file is then a secret.
//!
//! The result is JSON (a [`serde_json::Value`]); Envoy reads a bootstrap
//! file named `*.json` as JSON and `*.yaml` as YAML, of which JSON is a
//! subset.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};

/// The name of the static cluster reaching mesh-control.
pub const XDS_CLUSTER: &str = "mesh-control-xds";

/// What goes into an Envoy bootstrap ([`envoy_bootstrap`]).
#[derive(Debug, Clone)]
pub struct EnvoyBootstrapOptions {
    /// `node.id`.
    pub node_id: String,
    /// `node.cluster`: the service the workload runs; `None`: its `app`
    /// label, else the node id.
    pub cluster: Option<String>,
    /// `node.metadata.NAMESPACE`.
    pub namespace: String,
    /// `node.metadata.LABELS` (what `sourceLabels`, `Sidecar` and
    /// `Gateway` selectors match).
    pub labels: BTreeMap<String, String>,
    /// `node.metadata.PROXYLESS_OUTBOUND_PORT`: where the sidecar's
    /// outbound listener is bound (on 127.0.0.1); `None` leaves it out
    /// (mesh-control then uses 15001).
    pub outbound_port: Option<u16>,
    /// mesh-control's ADS address, `host:port` (an IP or a DNS name).
    pub xds: String,
    /// The token sent as `authorization: Bearer <token>` on the ADS stream.
    pub token: Option<String>,
    /// The PEM roots to verify mesh-control's certificate with; `None`:
    /// plaintext.
    pub ca_file: Option<PathBuf>,
    /// Envoy's admin port on 127.0.0.1 (0: any free port).
    pub admin_port: u16,
    /// `node.locality` as `region/zone/sub_zone` (trailing parts may be
    /// left out): what locality-aware balancing and failover compare.
    pub locality: Option<String>,
}

impl EnvoyBootstrapOptions {
    /// Options for `node_id` in `namespace`, against mesh-control's default
    /// ADS address (`127.0.0.1:15010`), plaintext, admin on port 0.
    pub fn new(node_id: impl Into<String>, namespace: impl Into<String>) -> Self {
        EnvoyBootstrapOptions {
            node_id: node_id.into(),
            cluster: None,
            namespace: namespace.into(),
            labels: BTreeMap::new(),
            outbound_port: None,
            xds: "127.0.0.1:15010".into(),
            token: None,
            ca_file: None,
            admin_port: 0,
            locality: None,
        }
    }
}

/// Splits `host:port` (`[v6]:port` too); the error says what is wrong.
fn host_port(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("--xds {address:?}: expected host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("--xds {address:?}: {port:?} is not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("--xds {address:?}: the host is empty"));
    }
    Ok((host.to_string(), port))
}

/// The Envoy bootstrap `options` describe; `Err` when the xDS address is
/// not `host:port`, or a token would be sent in plaintext (no CA file).
pub fn envoy_bootstrap(options: &EnvoyBootstrapOptions) -> Result<Value, String> {
    let (host, port) = host_port(&options.xds)?;
    if options.token.is_some() && options.ca_file.is_none() {
        return Err(
            "a token needs --ca-file (TLS to mesh-control): it would travel in plaintext"
                .to_string(),
        );
    }
    let is_ip = host.parse::<std::net::IpAddr>().is_ok();
    let cluster = options
        .cluster
        .clone()
        .or_else(|| options.labels.get("app").cloned())
        .unwrap_or_else(|| options.node_id.clone());
    let mut metadata = json!({
        "NAMESPACE": options.namespace,
        "LABELS": options.labels,
    });
    if let Some(p) = options.outbound_port {
        metadata["PROXYLESS_OUTBOUND_PORT"] = json!(p.to_string());
    }
    let mut grpc_service = json!({"envoy_grpc": {"cluster_name": XDS_CLUSTER}});
    if let Some(token) = &options.token {
        grpc_service["initial_metadata"] =
            json!([{"key": "authorization", "value": format!("Bearer {token}")}]);
    }
    let mut xds_cluster = json!({
        "name": XDS_CLUSTER,
        "type": if is_ip { "STATIC" } else { "STRICT_DNS" },
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port}
            }}}]}],
        },
    });
    if let Some(ca) = &options.ca_file {
        let mut context = json!({
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": ["h2"],
                "validation_context": {"trusted_ca": {"filename": ca.display().to_string()}},
            },
        });
        if !is_ip {
            context["sni"] = json!(host);
        }
        xds_cluster["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": context,
        });
    }
    let mut node = json!({
        "id": options.node_id,
        "cluster": cluster,
        "metadata": metadata,
    });
    if let Some(locality) = options.locality.as_deref().filter(|l| !l.is_empty()) {
        let mut parts = locality.splitn(3, '/');
        let mut part = || parts.next().unwrap_or_default().to_string();
        node["locality"] = json!({"region": part(), "zone": part(), "sub_zone": part()});
    }
    Ok(json!({
        "node": node,
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": options.admin_port}},
        },
        "dynamic_resources": {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [grpc_service],
                "set_node_on_first_message_only": true,
            },
            "lds_config": {"ads": {}, "resource_api_version": "V3"},
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
        },
        "static_resources": {"clusters": [xds_cluster]},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bootstrap_names_the_node_and_ads() {
        let mut options = EnvoyBootstrapOptions::new("web-1", "shop");
        options.labels.insert("app".into(), "web".into());
        options.outbound_port = Some(18001);
        options.token = Some("t0k".into());
        options.ca_file = Some("/etc/mesh/ca.pem".into());
        options.xds = "mesh-control.mesh:15010".into();
        options.locality = Some("r1/z2".into());
        let b = envoy_bootstrap(&options).unwrap();
        assert_eq!(
            b["node"]["locality"],
            json!({"region": "r1", "zone": "z2", "sub_zone": ""})
        );
        assert_eq!(b["node"]["id"], "web-1");
        assert_eq!(b["node"]["cluster"], "web");
        assert_eq!(b["node"]["metadata"]["NAMESPACE"], "shop");
        assert_eq!(b["node"]["metadata"]["LABELS"]["app"], "web");
        assert_eq!(b["node"]["metadata"]["PROXYLESS_OUTBOUND_PORT"], "18001");
        let ads = &b["dynamic_resources"]["ads_config"];
        assert_eq!(ads["transport_api_version"], "V3");
        assert_eq!(
            ads["grpc_services"][0]["initial_metadata"][0]["value"],
            "Bearer t0k"
        );
        assert_eq!(b["dynamic_resources"]["cds_config"]["ads"], json!({}));
        let cluster = &b["static_resources"]["clusters"][0];
        assert_eq!(cluster["type"], "STRICT_DNS");
        assert_eq!(
            cluster["transport_socket"]["typed_config"]["sni"],
            "mesh-control.mesh"
        );
        assert!(
            envoy_bootstrap(&EnvoyBootstrapOptions {
                xds: "nohost".into(),
                ..options.clone()
            })
            .is_err()
        );
        // A token never travels in plaintext.
        assert!(
            envoy_bootstrap(&EnvoyBootstrapOptions {
                ca_file: None,
                ..options
            })
            .is_err()
        );
    }
}

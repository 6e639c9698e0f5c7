//! The gRPC xDS bootstrap: which control servers to ask and who is asking.
//!
//! This is gRPC's own bootstrap format (gRFC A27 "xDS-Based Global Load
//! Balancing", bootstrap section; gRFC A29 for `certificate_providers`; gRFC
//! A36 for `server_listener_resource_name_template`), so one file serves Rust
//! services and gRPC proxyless services (grpc-go, grpc-java, grpcio) side by
//! side. As in gRPC, `GRPC_XDS_BOOTSTRAP` names a file and takes precedence
//! over `GRPC_XDS_BOOTSTRAP_CONFIG`, which holds the JSON itself.
//!
//! The environment is read through a lookup function
//! ([`Bootstrap::from_lookup`]): edition 2024 makes `std::env::set_var`
//! unsafe, so tests pass a closure instead of mutating the process
//! environment.
//!
//! Only `insecure` channel credentials are supported for now; any other type
//! is rejected with a clear error rather than silently downgraded.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use envoy_types::pb::envoy::config::core::v3::{Locality as LocalityProto, Node, node};
use envoy_types::pb::google::protobuf::{ListValue, NullValue, Struct, Value as ProtoValue, value};
use mesh_core::model::Locality;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::Error;

/// The environment variable holding the path of a bootstrap file (wins when both are set).
pub const BOOTSTRAP_PATH_VAR: &str = "GRPC_XDS_BOOTSTRAP";
/// The environment variable holding the bootstrap JSON itself.
pub const BOOTSTRAP_CONFIG_VAR: &str = "GRPC_XDS_BOOTSTRAP_CONFIG";
/// The `node.metadata` key naming the workload's namespace (default `default`).
pub const NAMESPACE_KEY: &str = "NAMESPACE";
/// The `node.metadata` key naming mesh-control's admin API (`host:port`).
pub const ADMIN_KEY: &str = "PROXYLESS_ADMIN";
/// The `node.user_agent_name` this client sends.
pub const USER_AGENT_NAME: &str = "proxyless-rust";
/// The server feature that makes a control server's deletions ignorable (gRFC A53).
pub const IGNORE_RESOURCE_DELETION: &str = "ignore_resource_deletion";

const EXAMPLE: &str = r#"{
  "xds_servers": [{"server_uri": "127.0.0.1:15010",
                   "channel_creds": [{"type": "insecure"}],
                   "server_features": ["xds_v3"]}],
  "node": {"id": "my-app-1", "metadata": {"NAMESPACE": "default"}}
}"#;

/// A parsed, validated gRPC xDS bootstrap.
#[derive(Debug, Clone, PartialEq)]
pub struct Bootstrap {
    raw: RawBootstrap,
    servers: Vec<XdsServer>,
    namespace: String,
}

/// One control server of the bootstrap's `xds_servers` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XdsServer {
    server_uri: String,
    endpoint: String,
    features: Vec<String>,
}

impl XdsServer {
    /// The `server_uri` as written (a gRPC target: `host:port`, `dns:///host:port`, ...).
    pub fn server_uri(&self) -> &str {
        &self.server_uri
    }

    /// The URI tonic connects to (`http://host:port`).
    pub fn endpoint_uri(&self) -> &str {
        &self.endpoint
    }

    /// The `server_features` list.
    pub fn server_features(&self) -> &[String] {
        &self.features
    }

    /// Whether the server declares `ignore_resource_deletion` (gRFC A53): a
    /// previously received listener or cluster that a response lacks is then kept.
    pub fn ignores_resource_deletion(&self) -> bool {
        self.features.iter().any(|f| f == IGNORE_RESOURCE_DELETION)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RawBootstrap {
    xds_servers: Vec<RawServer>,
    #[serde(default)]
    node: RawNode,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    certificate_providers: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    server_listener_resource_name_template: Option<String>,
    /// Fields this client does not read (`authorities`, ...), kept for `to_json`.
    #[serde(flatten)]
    other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RawServer {
    server_uri: String,
    #[serde(default)]
    channel_creds: Vec<RawCreds>,
    #[serde(default)]
    server_features: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RawCreds {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config: Option<Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct RawNode {
    #[serde(default)]
    id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    cluster: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    locality: Option<RawLocality>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    metadata: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct RawLocality {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    region: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    zone: String,
    #[serde(default, alias = "subZone", skip_serializing_if = "String::is_empty")]
    sub_zone: String,
}

impl Bootstrap {
    /// Reads the bootstrap named by the process environment
    /// (`GRPC_XDS_BOOTSTRAP`, else `GRPC_XDS_BOOTSTRAP_CONFIG`).
    pub fn from_env() -> Result<Bootstrap, Error> {
        Bootstrap::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the bootstrap through `lookup` (an environment stand-in):
    /// `GRPC_XDS_BOOTSTRAP` (a file path) wins over `GRPC_XDS_BOOTSTRAP_CONFIG`
    /// (the JSON itself), as in gRPC. Empty values count as unset.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Bootstrap, Error> {
        if let Some(path) = lookup(BOOTSTRAP_PATH_VAR).filter(|p| !p.trim().is_empty()) {
            let text = std::fs::read_to_string(&path).map_err(|e| {
                Error::bootstrap(format!(
                    "{BOOTSTRAP_PATH_VAR}={path}: cannot read the xDS bootstrap file: {e}"
                ))
            })?;
            return Bootstrap::parse(&text, &format!("{BOOTSTRAP_PATH_VAR}={path}"));
        }
        if let Some(json) = lookup(BOOTSTRAP_CONFIG_VAR).filter(|j| !j.trim().is_empty()) {
            return Bootstrap::parse(&json, BOOTSTRAP_CONFIG_VAR);
        }
        Err(Error::bootstrap(format!(
            "no xDS bootstrap: set {BOOTSTRAP_PATH_VAR} to the path of a bootstrap JSON file, \
             or {BOOTSTRAP_CONFIG_VAR} to the JSON itself. A minimal bootstrap:\n{EXAMPLE}"
        )))
    }

    /// Parses bootstrap JSON.
    pub fn from_json(json: &str) -> Result<Bootstrap, Error> {
        Bootstrap::parse(json, "bootstrap JSON")
    }

    fn parse(json: &str, origin: &str) -> Result<Bootstrap, Error> {
        let raw: RawBootstrap = serde_json::from_str(json).map_err(|e| {
            Error::bootstrap(format!(
                "{origin}: invalid xDS bootstrap at line {}, column {}: {e}\nA minimal bootstrap:\n{EXAMPLE}",
                e.line(),
                e.column()
            ))
        })?;
        Bootstrap::validate(raw).map_err(|e| Error::bootstrap(format!("{origin}: {e}")))
    }

    fn validate(raw: RawBootstrap) -> Result<Bootstrap, String> {
        if raw.xds_servers.is_empty() {
            return Err(format!(
                "xds_servers is empty: name at least one control server, e.g.\n{EXAMPLE}"
            ));
        }
        let mut servers = Vec::with_capacity(raw.xds_servers.len());
        for (i, s) in raw.xds_servers.iter().enumerate() {
            let at = format!("xds_servers[{i}]");
            match s.channel_creds.first() {
                None => {
                    return Err(format!(
                        "{at}.channel_creds is empty: add {{\"type\": \"insecure\"}}"
                    ));
                }
                Some(c) if c.kind == "insecure" => {}
                Some(c) => {
                    return Err(format!(
                        "{at}.channel_creds[0].type {:?} is not supported yet: only \"insecure\" is \
                         (TLS to the control server is planned)",
                        c.kind
                    ));
                }
            }
            let endpoint =
                endpoint_uri(&s.server_uri).map_err(|e| format!("{at}.server_uri: {e}"))?;
            servers.push(XdsServer {
                server_uri: s.server_uri.clone(),
                endpoint,
                features: s.server_features.clone(),
            });
        }
        let namespace = match raw.node.metadata.get(NAMESPACE_KEY) {
            None => "default".to_owned(),
            Some(Value::String(s)) if s.is_empty() => "default".to_owned(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(format!(
                    "node.metadata.{NAMESPACE_KEY} must be a string, found {other}"
                ));
            }
        };
        if let Some(v) = raw.node.metadata.get(ADMIN_KEY)
            && !v.is_string()
        {
            return Err(format!(
                "node.metadata.{ADMIN_KEY} must be a \"host:port\" string, found {v}"
            ));
        }
        if let Some(t) = &raw.server_listener_resource_name_template
            && !t.contains("%s")
        {
            return Err(format!(
                "server_listener_resource_name_template {t:?} lacks the %s placeholder for ip:port"
            ));
        }
        Ok(Bootstrap {
            raw,
            servers,
            namespace,
        })
    }

    /// Starts a bootstrap in code: one control server (insecure, `xds_v3`) and the node id.
    pub fn builder(server_uri: impl Into<String>, node_id: impl Into<String>) -> BootstrapBuilder {
        BootstrapBuilder {
            servers: vec![server_uri.into()],
            node: RawNode {
                id: node_id.into(),
                ..RawNode::default()
            },
            certificate_providers: Map::new(),
            template: None,
            features: vec!["xds_v3".to_owned()],
        }
    }

    /// The control servers, in the order to try them.
    pub fn xds_servers(&self) -> &[XdsServer] {
        &self.servers
    }

    /// `node.id`.
    pub fn node_id(&self) -> &str {
        &self.raw.node.id
    }

    /// `node.cluster` (the service name in gRPC's convention).
    pub fn cluster(&self) -> &str {
        &self.raw.node.cluster
    }

    /// The workload's namespace: `node.metadata.NAMESPACE`, default `default`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// `node.metadata.PROXYLESS_ADMIN`: `host:port` of mesh-control's admin API.
    pub fn admin_address(&self) -> Option<&str> {
        self.raw
            .node
            .metadata
            .get(ADMIN_KEY)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// `node.locality` (empty strings where absent).
    pub fn locality(&self) -> Locality {
        let l = self.raw.node.locality.clone().unwrap_or_default();
        Locality {
            region: l.region.into(),
            zone: l.zone.into(),
            sub_zone: l.sub_zone.into(),
        }
    }

    /// `node.metadata`, as JSON.
    pub fn metadata(&self) -> &Map<String, Value> {
        &self.raw.node.metadata
    }

    /// `certificate_providers` as raw JSON (instance name → `{plugin_name, config}`), gRFC A29.
    pub fn certificate_providers(&self) -> &Map<String, Value> {
        &self.raw.certificate_providers
    }

    /// `server_listener_resource_name_template` (gRFC A36).
    pub fn server_listener_resource_name_template(&self) -> Option<&str> {
        self.raw.server_listener_resource_name_template.as_deref()
    }

    /// The A36 server listener name for a listening address (`0.0.0.0:50051`):
    /// the template with `%s` replaced, or `None` without a template.
    pub fn server_listener_name(&self, listening_address: &str) -> Option<String> {
        self.server_listener_resource_name_template()
            .map(|t| t.replace("%s", listening_address))
    }

    /// The `Node` this client sends in the first request of each ADS stream:
    /// id, cluster, locality, metadata, `user_agent_name` `proxyless-rust` and
    /// this crate's version.
    pub fn node(&self) -> Node {
        let n = &self.raw.node;
        Node {
            id: n.id.clone(),
            cluster: n.cluster.clone(),
            metadata: if n.metadata.is_empty() {
                None
            } else {
                Some(json_to_struct(&n.metadata))
            },
            locality: n.locality.as_ref().map(|l| LocalityProto {
                region: l.region.clone(),
                zone: l.zone.clone(),
                sub_zone: l.sub_zone.clone(),
            }),
            user_agent_name: USER_AGENT_NAME.to_owned(),
            user_agent_version_type: Some(node::UserAgentVersionType::UserAgentVersion(
                env!("CARGO_PKG_VERSION").to_owned(),
            )),
            ..Node::default()
        }
    }

    /// The bootstrap as JSON, in the form gRPC clients read too (every server
    /// lists `server_features: ["xds_v3"]`): write it to a file and point
    /// `GRPC_XDS_BOOTSTRAP` at it.
    pub fn to_json(&self) -> String {
        let mut raw = self.raw.clone();
        for s in &mut raw.xds_servers {
            if !s.server_features.iter().any(|f| f == "xds_v3") {
                s.server_features.insert(0, "xds_v3".to_owned());
            }
        }
        // Cannot fail: every map key is a string and every value is JSON already.
        serde_json::to_string_pretty(&raw).unwrap_or_default()
    }
}

/// Builds a [`Bootstrap`] in code (tests, embedded control servers).
#[derive(Debug, Clone)]
pub struct BootstrapBuilder {
    servers: Vec<String>,
    node: RawNode,
    certificate_providers: Map<String, Value>,
    template: Option<String>,
    features: Vec<String>,
}

impl BootstrapBuilder {
    /// Adds a fallback control server, tried after the ones before it.
    pub fn server(mut self, server_uri: impl Into<String>) -> Self {
        self.servers.push(server_uri.into());
        self
    }

    /// Sets `node.metadata.NAMESPACE`.
    pub fn namespace(self, namespace: impl Into<String>) -> Self {
        self.metadata(NAMESPACE_KEY, namespace.into())
    }

    /// Sets `node.cluster`.
    pub fn cluster(mut self, cluster: impl Into<String>) -> Self {
        self.node.cluster = cluster.into();
        self
    }

    /// Sets `node.locality`.
    pub fn locality(
        mut self,
        region: impl Into<String>,
        zone: impl Into<String>,
        sub_zone: impl Into<String>,
    ) -> Self {
        self.node.locality = Some(RawLocality {
            region: region.into(),
            zone: zone.into(),
            sub_zone: sub_zone.into(),
        });
        self
    }

    /// Sets one `node.metadata` entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.node.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets `node.metadata.PROXYLESS_ADMIN` (`host:port` of mesh-control's admin API).
    pub fn admin_address(self, address: impl Into<String>) -> Self {
        self.metadata(ADMIN_KEY, address.into())
    }

    /// Adds a certificate provider instance (gRFC A29), e.g. `"mesh"` →
    /// `{"plugin_name": "file_watcher", "config": {...}}`.
    pub fn certificate_provider(mut self, instance: impl Into<String>, config: Value) -> Self {
        self.certificate_providers.insert(instance.into(), config);
        self
    }

    /// Sets `server_listener_resource_name_template` (gRFC A36); it must contain `%s`.
    pub fn server_listener_resource_name_template(mut self, template: impl Into<String>) -> Self {
        self.template = Some(template.into());
        self
    }

    /// Adds a server feature to every server (`ignore_resource_deletion`, ...).
    pub fn server_feature(mut self, feature: impl Into<String>) -> Self {
        self.features.push(feature.into());
        self
    }

    /// Validates and builds, as [`Bootstrap::from_json`] would.
    pub fn build(self) -> Result<Bootstrap, Error> {
        let features: Vec<String> = self
            .features
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let raw = RawBootstrap {
            xds_servers: self
                .servers
                .into_iter()
                .map(|server_uri| RawServer {
                    server_uri,
                    channel_creds: vec![RawCreds {
                        kind: "insecure".to_owned(),
                        config: None,
                    }],
                    server_features: features.clone(),
                })
                .collect(),
            node: self.node,
            certificate_providers: self.certificate_providers,
            server_listener_resource_name_template: self.template,
            other: Map::new(),
        };
        Bootstrap::validate(raw).map_err(|e| Error::bootstrap(format!("bootstrap builder: {e}")))
    }
}

/// Turns a gRPC target (`host:port`, `dns:///host:port`, `ipv4:1.2.3.4:5`,
/// `http://host:port`) into the `http://` URI tonic connects to.
fn endpoint_uri(target: &str) -> Result<String, String> {
    let target = target.trim();
    if target.is_empty() {
        return Err("is empty: write host:port".to_owned());
    }
    if target.starts_with("https://") {
        return Err(format!(
            "{target:?}: TLS to the control server is not supported yet; use an insecure host:port"
        ));
    }
    if target.starts_with("unix:") {
        return Err(format!(
            "{target:?}: unix socket control servers are not supported yet; use host:port"
        ));
    }
    let authority = if let Some(rest) = target.strip_prefix("http://") {
        rest.trim_end_matches('/')
    } else if let Some(rest) = target
        .strip_prefix("dns:")
        .or_else(|| target.strip_prefix("passthrough:"))
    {
        // dns:///host:port or dns://resolver/host:port: the host is after the last '/'.
        rest.rsplit('/').next().unwrap_or(rest)
    } else if let Some(rest) = target
        .strip_prefix("ipv4:")
        .or_else(|| target.strip_prefix("ipv6:"))
    {
        // gRPC allows a comma-separated list; the first address is used.
        rest.split(',').next().unwrap_or(rest)
    } else {
        target
    };
    if authority.is_empty() || authority.contains('/') {
        return Err(format!("{target:?} is not a host:port"));
    }
    let has_port = match authority.rsplit_once(':') {
        Some((host, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']'))
        }
        None => false,
    };
    let mut uri = format!("http://{authority}");
    if !has_port {
        // gRPC's default port for a DNS target.
        let _ = write!(uri, ":443");
    }
    tonic::transport::Endpoint::from_shared(uri.clone())
        .map_err(|e| format!("{target:?} is not a valid host:port: {e}"))?;
    Ok(uri)
}

fn json_to_struct(map: &Map<String, Value>) -> Struct {
    Struct {
        fields: map
            .iter()
            .map(|(k, v)| (k.clone(), json_to_proto(v)))
            .collect(),
    }
}

fn json_to_proto(v: &Value) -> ProtoValue {
    let kind = match v {
        Value::Null => value::Kind::NullValue(NullValue::NullValue as i32),
        Value::Bool(b) => value::Kind::BoolValue(*b),
        Value::Number(n) => value::Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => value::Kind::StringValue(s.clone()),
        Value::Array(a) => value::Kind::ListValue(ListValue {
            values: a.iter().map(json_to_proto).collect(),
        }),
        Value::Object(o) => value::Kind::StructValue(json_to_struct(o)),
    };
    ProtoValue { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const GOOD: &str = r#"{"xds_servers":[{"server_uri":"127.0.0.1:15010","channel_creds":[{"type":"insecure"}],
      "server_features":["xds_v3"]}],
     "node":{"id":"payment-7f9c","cluster":"payment","locality":{"zone":"z1"},
      "metadata":{"NAMESPACE":"shop","PROXYLESS_ADMIN":"127.0.0.1:15014"}},
     "certificate_providers":{"mesh":{"plugin_name":"file_watcher","config":{
      "certificate_file":"cert.pem","private_key_file":"key.pem",
      "ca_certificate_file":"ca.pem","refresh_interval":"60s"}}},
     "server_listener_resource_name_template":"grpc/server?xds.resource.listening_address=%s"}"#;

    #[test]
    fn parses_the_documented_bootstrap() {
        let b = Bootstrap::from_lookup(env(&[(BOOTSTRAP_CONFIG_VAR, GOOD)])).unwrap();
        assert_eq!(b.node_id(), "payment-7f9c");
        assert_eq!(b.cluster(), "payment");
        assert_eq!(b.namespace(), "shop");
        assert_eq!(b.admin_address(), Some("127.0.0.1:15014"));
        assert_eq!(&*b.locality().zone, "z1");
        assert_eq!(b.xds_servers().len(), 1);
        assert_eq!(b.xds_servers()[0].server_uri(), "127.0.0.1:15010");
        assert_eq!(b.xds_servers()[0].endpoint_uri(), "http://127.0.0.1:15010");
        assert!(b.certificate_providers().contains_key("mesh"));
        assert_eq!(
            b.server_listener_name("0.0.0.0:50051").as_deref(),
            Some("grpc/server?xds.resource.listening_address=0.0.0.0:50051")
        );
        let node = b.node();
        assert_eq!(node.user_agent_name, "proxyless-rust");
        assert_eq!(node.locality.unwrap().zone, "z1");
        let ns = node.metadata.unwrap().fields.remove("NAMESPACE").unwrap();
        assert_eq!(ns.kind, Some(value::Kind::StringValue("shop".into())));
    }

    #[test]
    fn namespace_defaults_to_default() {
        let b = Bootstrap::builder("localhost:1", "n").build().unwrap();
        assert_eq!(b.namespace(), "default");
        assert_eq!(b.admin_address(), None);
        assert_eq!(b.xds_servers()[0].endpoint_uri(), "http://localhost:1");
    }

    #[test]
    fn the_path_variable_wins_over_the_inline_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bootstrap.json");
        std::fs::write(&path, GOOD).unwrap();
        let path = path.to_str().unwrap();
        let inline =
            r#"{"xds_servers":[{"server_uri":"other:1","channel_creds":[{"type":"insecure"}]}]}"#;
        let b = Bootstrap::from_lookup(env(&[
            (BOOTSTRAP_PATH_VAR, path),
            (BOOTSTRAP_CONFIG_VAR, inline),
        ]))
        .unwrap();
        assert_eq!(b.node_id(), "payment-7f9c");
        let b = Bootstrap::from_lookup(env(&[(BOOTSTRAP_CONFIG_VAR, inline)])).unwrap();
        assert_eq!(b.xds_servers()[0].server_uri(), "other:1");
    }

    #[test]
    fn missing_bootstrap_names_both_variables_and_shows_an_example() {
        let err = Bootstrap::from_lookup(|_| None).unwrap_err();
        assert!(err.is_bootstrap());
        let msg = err.to_string();
        assert!(msg.contains("GRPC_XDS_BOOTSTRAP "), "{msg}");
        assert!(msg.contains("GRPC_XDS_BOOTSTRAP_CONFIG"), "{msg}");
        assert!(msg.contains("\"xds_servers\""), "{msg}");
        assert!(msg.contains("\"insecure\""), "{msg}");
        // The example itself is a valid bootstrap.
        Bootstrap::from_json(EXAMPLE).unwrap();
    }

    #[test]
    fn unreadable_file_names_the_variable_and_path() {
        let err = Bootstrap::from_lookup(env(&[(BOOTSTRAP_PATH_VAR, "/nonexistent/b.json")]))
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("GRPC_XDS_BOOTSTRAP=/nonexistent/b.json"),
            "{msg}"
        );
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let bad = "{\n  \"xds_servers\": [\n    {\"server_uri\": 15010}\n  ]\n}";
        let err = Bootstrap::from_lookup(env(&[(BOOTSTRAP_CONFIG_VAR, bad)])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("GRPC_XDS_BOOTSTRAP_CONFIG:"), "{msg}");
        assert!(msg.contains("line 3, column"), "{msg}");

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.json");
        std::fs::write(&path, "{\"xds_servers\": [,]}").unwrap();
        let path = path.to_str().unwrap();
        let err = Bootstrap::from_lookup(env(&[(BOOTSTRAP_PATH_VAR, path)])).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(path), "{msg}");
        assert!(msg.contains("line 1, column 18"), "{msg}");
    }

    #[test]
    fn unsupported_channel_creds_are_rejected() {
        let json =
            r#"{"xds_servers":[{"server_uri":"a:1","channel_creds":[{"type":"google_default"}]}]}"#;
        let msg = Bootstrap::from_json(json).unwrap_err().to_string();
        assert!(
            msg.contains("xds_servers[0].channel_creds[0].type \"google_default\""),
            "{msg}"
        );
        assert!(msg.contains("insecure"), "{msg}");
        let json = r#"{"xds_servers":[{"server_uri":"a:1"}]}"#;
        let msg = Bootstrap::from_json(json).unwrap_err().to_string();
        assert!(msg.contains("channel_creds is empty"), "{msg}");
        let json = r#"{"xds_servers":[]}"#;
        let msg = Bootstrap::from_json(json).unwrap_err().to_string();
        assert!(msg.contains("xds_servers is empty"), "{msg}");
    }

    #[test]
    fn server_uris_in_grpc_target_syntax() {
        assert_eq!(
            endpoint_uri("dns:///xds.example.com:15010").unwrap(),
            "http://xds.example.com:15010"
        );
        assert_eq!(
            endpoint_uri("xds.example.com").unwrap(),
            "http://xds.example.com:443"
        );
        assert_eq!(endpoint_uri("[::1]:5").unwrap(), "http://[::1]:5");
        assert_eq!(
            endpoint_uri("ipv4:10.0.0.1:7,10.0.0.2:7").unwrap(),
            "http://10.0.0.1:7"
        );
        assert_eq!(endpoint_uri("http://h:9/").unwrap(), "http://h:9");
        assert!(endpoint_uri("unix:///tmp/x.sock").is_err());
        assert!(endpoint_uri("https://h:9").is_err());
        assert!(endpoint_uri("").is_err());
    }

    #[test]
    fn bad_metadata_types_are_rejected() {
        let json = r#"{"xds_servers":[{"server_uri":"a:1","channel_creds":[{"type":"insecure"}]}],
                       "node":{"id":"x","metadata":{"NAMESPACE":3}}}"#;
        let msg = Bootstrap::from_json(json).unwrap_err().to_string();
        assert!(
            msg.contains("node.metadata.NAMESPACE must be a string"),
            "{msg}"
        );
    }

    #[test]
    fn builder_round_trips_through_json_with_xds_v3() {
        let b = Bootstrap::builder("127.0.0.1:15010", "app-1")
            .server("127.0.0.1:15011")
            .namespace("shop")
            .cluster("app")
            .locality("r", "z", "s")
            .admin_address("127.0.0.1:15014")
            .metadata("SERVICE_ACCOUNT", "app")
            .server_listener_resource_name_template("grpc/server?xds.resource.listening_address=%s")
            .certificate_provider("mesh", serde_json::json!({"plugin_name": "file_watcher"}))
            .build()
            .unwrap();
        let json = b.to_json();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v["xds_servers"][0]["server_features"],
            serde_json::json!(["xds_v3"])
        );
        assert_eq!(v["xds_servers"][1]["channel_creds"][0]["type"], "insecure");
        assert_eq!(v["node"]["locality"]["sub_zone"], "s");
        let again = Bootstrap::from_json(&json).unwrap();
        assert_eq!(again, b);
        assert_eq!(again.namespace(), "shop");
        assert_eq!(again.admin_address(), Some("127.0.0.1:15014"));
        assert_eq!(again.xds_servers().len(), 2);
    }

    #[test]
    fn to_json_adds_xds_v3_and_keeps_unknown_fields() {
        let json = r#"{"xds_servers":[{"server_uri":"a:1","channel_creds":[{"type":"insecure"}]}],
                       "authorities":{"x":{}}}"#;
        let v: Value =
            serde_json::from_str(&Bootstrap::from_json(json).unwrap().to_json()).unwrap();
        assert_eq!(
            v["xds_servers"][0]["server_features"],
            serde_json::json!(["xds_v3"])
        );
        assert!(v["authorities"].is_object());
    }
}

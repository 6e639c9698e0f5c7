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
//! Channel credentials: `insecure`, or `tls` with gRFC A65's config
//! (`ca_certificate_file`, and `certificate_file` / `private_key_file` for a
//! client certificate): the ADS stream is then TLS, the control server's
//! certificate verified against that CA for the host of `server_uri`. Any
//! other type is rejected with a clear error rather than silently
//! downgraded. The same CA file verifies mesh-control's admin API.
//!
//! Node metadata this mesh reads, with Istio's names: `NAMESPACE`,
//! `SERVICE_ACCOUNT`, `LABELS` (an object of strings: the workload's labels,
//! which select its PeerAuthentication and AuthorizationPolicies) and
//! `PROXYLESS_ADMIN` (mesh-control's admin API).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

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
/// The `node.metadata` key naming the workload's service account (its
/// SPIFFE identity `spiffe://<td>/ns/<NAMESPACE>/sa/<SERVICE_ACCOUNT>`).
pub const SERVICE_ACCOUNT_KEY: &str = "SERVICE_ACCOUNT";
/// The `node.metadata` key holding the workload's labels (a JSON object of
/// strings).
pub const LABELS_KEY: &str = "LABELS";
/// The `node.metadata` key naming mesh-control's admin API (`host:port`).
pub const ADMIN_KEY: &str = "PROXYLESS_ADMIN";
/// The `node.user_agent_name` this client sends.
pub const USER_AGENT_NAME: &str = "proxyless-rust";
/// The server feature that makes a control server's deletions ignorable (gRFC A53).
pub const IGNORE_RESOURCE_DELETION: &str = "ignore_resource_deletion";
/// The certificate provider instance the mesh's workloads use
/// (`certificate_providers.mesh`).
const MESH_PROVIDER_INSTANCE: &str = "mesh";
/// The plugin of certificates from mesh-control's CA, obtained with a join
/// token.
const MESH_CA_PLUGIN: &str = "mesh_ca";
/// The top-level bootstrap field holding this implementation's own settings
/// (`{"cache_file": ...}`, see [`crate::cache::cache_file_for`]). gRPC's
/// bootstrap parsers ignore top-level fields they do not know, so the same
/// file still serves gRPC clients.
pub const PROXYLESS_KEY: &str = "proxyless";

const TLS_EXAMPLE: &str = r#"{"type": "tls", "config": {"ca_certificate_file": "/etc/mesh/root-cert.pem",
  "certificate_file": "/etc/mesh/cert.pem", "private_key_file": "/etc/mesh/key.pem"}}"#;

/// The bootstrap the errors show: the README's, for a workload of the
/// example mesh (`examples/mesh`, namespace `shop`) with mesh-control on its
/// default ports. `NAMESPACE` is where short names resolve, `PROXYLESS_ADMIN`
/// is where servers register, and `xds_v3` is what gRPC clients need to
/// speak xDS v3.
const EXAMPLE: &str = r#"{
  "xds_servers": [{"server_uri": "127.0.0.1:15010", "channel_creds": [{"type": "insecure"}],
                   "server_features": ["xds_v3"]}],
  "node": {"id": "frontend-1", "cluster": "frontend",
           "metadata": {"NAMESPACE": "shop", "PROXYLESS_ADMIN": "127.0.0.1:15000"}}
}"#;

/// What the example's fields mean, printed above it.
const EXAMPLE_INTRO: &str = "A minimal bootstrap (NAMESPACE: the namespace short service names \
     resolve in; PROXYLESS_ADMIN: mesh-control's admin API, where servers register):";

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
    tls: Option<ChannelTls>,
}

/// `channel_creds` `{"type": "tls", "config": {...}}` (gRFC A65): how to
/// reach a control server over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelTls {
    ca_certificate_file: PathBuf,
    certificate_file: Option<PathBuf>,
    private_key_file: Option<PathBuf>,
}

impl ChannelTls {
    /// Server-authenticated TLS verified with the CA certificates (PEM) in
    /// `ca_certificate_file`.
    pub fn new(ca_certificate_file: impl Into<PathBuf>) -> Self {
        ChannelTls {
            ca_certificate_file: ca_certificate_file.into(),
            certificate_file: None,
            private_key_file: None,
        }
    }

    /// Also presents a client certificate (PEM chain and key files).
    pub fn with_identity(
        mut self,
        certificate_file: impl Into<PathBuf>,
        private_key_file: impl Into<PathBuf>,
    ) -> Self {
        self.certificate_file = Some(certificate_file.into());
        self.private_key_file = Some(private_key_file.into());
        self
    }

    /// `ca_certificate_file`: the roots the server certificate must chain to.
    pub fn ca_certificate_file(&self) -> &Path {
        &self.ca_certificate_file
    }

    /// `certificate_file`: the client certificate chain, if one is presented.
    pub fn certificate_file(&self) -> Option<&Path> {
        self.certificate_file.as_deref()
    }

    /// `private_key_file`: the client certificate's key, if one is presented.
    pub fn private_key_file(&self) -> Option<&Path> {
        self.private_key_file.as_deref()
    }

    fn to_raw(&self) -> RawCreds {
        let mut config = Map::new();
        let path = |p: &Path| Value::String(p.to_string_lossy().into_owned());
        config.insert(
            "ca_certificate_file".to_owned(),
            path(&self.ca_certificate_file),
        );
        if let Some(p) = &self.certificate_file {
            config.insert("certificate_file".to_owned(), path(p));
        }
        if let Some(p) = &self.private_key_file {
            config.insert("private_key_file".to_owned(), path(p));
        }
        RawCreds {
            kind: "tls".to_owned(),
            config: Some(Value::Object(config)),
        }
    }

    /// Reads the A65 `config` object of a `tls` credential.
    fn from_config(config: Option<&Value>, at: &str) -> Result<ChannelTls, String> {
        let missing = || {
            format!(
                "{at}.config.ca_certificate_file is missing: name the PEM file of the CA that \
                 issued the control server's certificate, e.g.\n{TLS_EXAMPLE}"
            )
        };
        let map = match config {
            None => return Err(missing()),
            Some(Value::Object(map)) => map,
            Some(other) => {
                return Err(format!(
                    "{at}.config must be an object, found {other}; e.g.\n{TLS_EXAMPLE}"
                ));
            }
        };
        let file = |key: &str| -> Result<Option<PathBuf>, String> {
            match map.get(key) {
                None => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(PathBuf::from(s))),
                Some(other) => Err(format!(
                    "{at}.config.{key} must be a file path string, found {other}; e.g.\n{TLS_EXAMPLE}"
                )),
            }
        };
        let ca_certificate_file = file("ca_certificate_file")?.ok_or_else(missing)?;
        let certificate_file = file("certificate_file")?;
        let private_key_file = file("private_key_file")?;
        if certificate_file.is_some() != private_key_file.is_some() {
            return Err(format!(
                "{at}.config: certificate_file and private_key_file go together (a client \
                 certificate needs its key); e.g.\n{TLS_EXAMPLE}"
            ));
        }
        Ok(ChannelTls {
            ca_certificate_file,
            certificate_file,
            private_key_file,
        })
    }
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

    /// The host of `server_uri` (brackets of an IPv6 address removed): the
    /// name the server's TLS certificate must be valid for.
    pub fn host(&self) -> &str {
        let authority = self
            .endpoint
            .strip_prefix("http://")
            .unwrap_or(&self.endpoint);
        let host = authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host);
        host.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
    }

    /// The TLS settings when `channel_creds` is `tls`; `None` for `insecure`.
    pub fn tls(&self) -> Option<&ChannelTls> {
        self.tls.as_ref()
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

/// Checks a `PROXYLESS_ADMIN` list: an empty value is "not set", but a
/// list with an empty entry (`"a:1,,b:2"`, a trailing comma) is a mistake.
fn check_admin_list(list: &str) -> Result<(), String> {
    if list.trim().is_empty() {
        return Ok(());
    }
    for (i, entry) in list.split(',').enumerate() {
        if entry.trim().is_empty() {
            return Err(format!(
                "node.metadata.{ADMIN_KEY} {list:?}: entry {} is empty; list mesh-control's \
                 admin addresses separated by commas, e.g. \"10.0.0.2:15000,10.0.0.3:15000\"",
                i + 1
            ));
        }
    }
    Ok(())
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
             or {BOOTSTRAP_CONFIG_VAR} to the JSON itself.\n{EXAMPLE_INTRO}\n{EXAMPLE}"
        )))
    }

    /// Parses bootstrap JSON.
    pub fn from_json(json: &str) -> Result<Bootstrap, Error> {
        Bootstrap::parse(json, "bootstrap JSON")
    }

    fn parse(json: &str, origin: &str) -> Result<Bootstrap, Error> {
        let raw: RawBootstrap = serde_json::from_str(json).map_err(|e| {
            // serde_json ends its message with the position, said once here.
            let text = e.to_string();
            let position = format!(" at line {} column {}", e.line(), e.column());
            let what = text.strip_suffix(&position).unwrap_or(&text);
            Error::bootstrap(format!(
                "{origin}: invalid xDS bootstrap at line {}, column {}: {what}\n{EXAMPLE_INTRO}\n{EXAMPLE}",
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
            let tls = match s.channel_creds.first() {
                None => {
                    return Err(format!(
                        "{at}.channel_creds is empty: add {{\"type\": \"insecure\"}} or \
                         {TLS_EXAMPLE}"
                    ));
                }
                Some(c) if c.kind == "insecure" => None,
                Some(c) if c.kind == "tls" => Some(ChannelTls::from_config(
                    c.config.as_ref(),
                    &format!("{at}.channel_creds[0]"),
                )?),
                Some(c) => {
                    return Err(format!(
                        "{at}.channel_creds[0].type {:?} is not supported: use \"insecure\" or \
                         \"tls\", e.g.\n{TLS_EXAMPLE}",
                        c.kind
                    ));
                }
            };
            let endpoint =
                endpoint_uri(&s.server_uri).map_err(|e| format!("{at}.server_uri: {e}"))?;
            servers.push(XdsServer {
                server_uri: s.server_uri.clone(),
                endpoint,
                features: s.server_features.clone(),
                tls,
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
        if let Some(v) = raw.node.metadata.get(SERVICE_ACCOUNT_KEY)
            && !v.is_string()
        {
            return Err(format!(
                "node.metadata.{SERVICE_ACCOUNT_KEY} must be a string (the service account \
                 name, e.g. \"payment\"), found {v}"
            ));
        }
        match raw.node.metadata.get(LABELS_KEY) {
            None => {}
            Some(Value::Object(labels)) => {
                if let Some((k, v)) = labels.iter().find(|(_, v)| !v.is_string()) {
                    return Err(format!(
                        "node.metadata.{LABELS_KEY}.{k} must be a string, found {v}; e.g. \
                         \"{LABELS_KEY}\": {{\"app\": \"payment\", \"version\": \"v1\"}}"
                    ));
                }
            }
            Some(other) => {
                return Err(format!(
                    "node.metadata.{LABELS_KEY} must be an object of strings, found {other}; \
                     e.g. \"{LABELS_KEY}\": {{\"app\": \"payment\", \"version\": \"v1\"}}"
                ));
            }
        }
        match raw.node.metadata.get(ADMIN_KEY) {
            None => {}
            Some(Value::String(list)) => check_admin_list(list)?,
            Some(v) => {
                return Err(format!(
                    "node.metadata.{ADMIN_KEY} must be a \"host:port\" string (or a \
                     comma-separated list of them), found {v}"
                ));
            }
        }
        if let Some(t) = &raw.server_listener_resource_name_template
            && !t.contains("%s")
        {
            return Err(format!(
                "server_listener_resource_name_template {t:?} lacks the %s placeholder for ip:port"
            ));
        }
        if let Some(settings) = raw.other.get(PROXYLESS_KEY) {
            crate::client::check_settings(settings)?;
        }
        Ok(Bootstrap {
            raw,
            servers,
            namespace,
        })
    }

    /// Starts a bootstrap in code: one control server (insecure unless
    /// [`BootstrapBuilder::channel_tls`], `xds_v3`) and the node id.
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
            tls: None,
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

    /// `node.metadata.SERVICE_ACCOUNT`: the workload's service account
    /// (`None` when absent or empty).
    pub fn service_account(&self) -> Option<&str> {
        self.raw
            .node
            .metadata
            .get(SERVICE_ACCOUNT_KEY)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    }

    /// `node.metadata.LABELS`: the workload's labels (empty when absent).
    pub fn labels(&self) -> BTreeMap<String, String> {
        match self.raw.node.metadata.get(LABELS_KEY) {
            Some(Value::Object(labels)) => labels
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect(),
            _ => BTreeMap::new(),
        }
    }

    /// The TLS settings of the first control server (`xds_servers[0]`)
    /// when its `channel_creds` is `tls`: also what verifies mesh-control's
    /// admin API.
    pub fn xds_server_tls(&self) -> Option<&ChannelTls> {
        self.servers.first().and_then(XdsServer::tls)
    }

    /// `node.metadata.PROXYLESS_ADMIN`: `host:port` of mesh-control's admin
    /// API; the first entry when it lists several (see
    /// [`Bootstrap::admin_addresses`]).
    pub fn admin_address(&self) -> Option<&str> {
        self.admin_addresses().into_iter().next()
    }

    /// Every address `node.metadata.PROXYLESS_ADMIN` names, in order: one
    /// `host:port` (an IP, or a DNS name resolving to every replica), or a
    /// comma-separated list (`"10.0.0.2:15000,10.0.0.3:15000"`), each entry
    /// trimmed. Empty when the field is absent or empty. The admin client
    /// uses the first that answers.
    pub fn admin_addresses(&self) -> Vec<&str> {
        match self
            .raw
            .node
            .metadata
            .get(ADMIN_KEY)
            .and_then(Value::as_str)
        {
            Some(list) if !list.trim().is_empty() => list.split(',').map(str::trim).collect(),
            _ => Vec::new(),
        }
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

    /// The top-level `proxyless` object (this implementation's settings,
    /// which gRPC ignores), as validated JSON; `None` when absent.
    pub fn proxyless_settings(&self) -> Option<&Value> {
        self.raw.other.get(PROXYLESS_KEY)
    }

    /// `certificate_providers` as raw JSON (instance name → `{plugin_name, config}`), gRFC A29.
    pub fn certificate_providers(&self) -> &Map<String, Value> {
        &self.raw.certificate_providers
    }

    /// The join token of the `mesh_ca` certificate provider
    /// (`certificate_providers.mesh.config.token`, or the contents of
    /// `token_file`, read now so that a token rotated on disk is picked up),
    /// `Ok(None)` when the bootstrap has no `mesh_ca` provider or it names
    /// no token. Over a TLS channel to the control server the client sends
    /// it as `authorization: Bearer <token>` metadata on every ADS stream:
    /// that is how a workload that gets its certificate from mesh-control's
    /// CA authenticates before it has one. `Err` says which file cannot be
    /// read.
    pub fn join_token(&self) -> Result<Option<String>, Error> {
        let Some(provider) = self.raw.certificate_providers.get(MESH_PROVIDER_INSTANCE) else {
            return Ok(None);
        };
        if provider.get("plugin_name").and_then(Value::as_str) != Some(MESH_CA_PLUGIN) {
            return Ok(None);
        }
        let config = provider.get("config");
        if let Some(token) = config
            .and_then(|c| c.get("token"))
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            return Ok(Some(token.to_owned()));
        }
        let Some(file) = config
            .and_then(|c| c.get("token_file"))
            .and_then(Value::as_str)
        else {
            return Ok(None);
        };
        let token = std::fs::read_to_string(file).map_err(|e| {
            Error::connect(format!(
                "cannot read the join token file {file} \
                 (certificate_providers.{MESH_PROVIDER_INSTANCE}.config.token_file): {e}"
            ))
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::connect(format!(
                "the join token file {file} \
                 (certificate_providers.{MESH_PROVIDER_INSTANCE}.config.token_file) is empty"
            )));
        }
        Ok(Some(token.to_owned()))
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
    tls: Option<ChannelTls>,
}

impl BootstrapBuilder {
    /// Sets `node.metadata.SERVICE_ACCOUNT`.
    pub fn service_account(self, service_account: impl Into<String>) -> Self {
        self.metadata(SERVICE_ACCOUNT_KEY, service_account.into())
    }

    /// Adds one label to `node.metadata.LABELS`.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        let labels = self
            .node
            .metadata
            .entry(LABELS_KEY)
            .or_insert_with(|| Value::Object(Map::new()));
        if !labels.is_object() {
            *labels = Value::Object(Map::new());
        }
        if let Value::Object(map) = labels {
            map.insert(key.into(), Value::String(value.into()));
        }
        self
    }

    /// Connects to every control server over TLS, verified with the CA
    /// certificates in `ca_certificate_file` (`channel_creds` `tls`).
    pub fn channel_tls(self, ca_certificate_file: impl Into<PathBuf>) -> Self {
        self.channel_credentials(ChannelTls::new(ca_certificate_file))
    }

    /// Connects to every control server over TLS with these settings (a
    /// client certificate too, with [`ChannelTls::with_identity`]).
    pub fn channel_credentials(mut self, tls: ChannelTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Sets `server_listener_resource_name_template` (gRFC A36); it must
    /// contain `%s`. Same as
    /// [`BootstrapBuilder::server_listener_resource_name_template`].
    pub fn server_listener_template(self, template: impl Into<String>) -> Self {
        self.server_listener_resource_name_template(template)
    }

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

    /// Sets `node.metadata.PROXYLESS_ADMIN` (`host:port` of mesh-control's
    /// admin API, or a comma-separated list of its replicas' addresses).
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
                    channel_creds: vec![self.tls.as_ref().map_or_else(
                        || RawCreds {
                            kind: "insecure".to_owned(),
                            config: None,
                        },
                        ChannelTls::to_raw,
                    )],
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
            "{target:?}: write host:port; TLS is chosen by channel_creds {{\"type\": \"tls\"}}, not by the URI"
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
    fn admin_addresses_are_a_list_without_empty_entries() {
        let with = |admin: &str| {
            Bootstrap::builder("127.0.0.1:15010", "n")
                .admin_address(admin)
                .build()
        };
        let b = with("10.0.0.2:15000, 10.0.0.3:15000").unwrap();
        assert_eq!(b.admin_addresses(), ["10.0.0.2:15000", "10.0.0.3:15000"]);
        assert_eq!(b.admin_address(), Some("10.0.0.2:15000"));
        let one = with("mesh-control.internal:15000").unwrap();
        assert_eq!(one.admin_addresses(), ["mesh-control.internal:15000"]);
        let unset = with("").unwrap();
        assert!(unset.admin_addresses().is_empty());
        assert_eq!(unset.admin_address(), None);
        for bad in ["a:1,,b:2", "a:1,", ",a:1", "a:1, "] {
            let e = with(bad).unwrap_err().to_string();
            assert!(
                e.contains("node.metadata.PROXYLESS_ADMIN") && e.contains("is empty"),
                "{bad:?}: {e}"
            );
        }
        let e = Bootstrap::from_json(
            r#"{"xds_servers":[{"server_uri":"a:1","channel_creds":[{"type":"insecure"}]}],
               "node":{"id":"n","metadata":{"PROXYLESS_ADMIN":["a:1"]}}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("node.metadata.PROXYLESS_ADMIN must be"), "{e}");
    }

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
    }

    /// The JSON a user copies out of the error works as it is: cut from the
    /// message (from its first line starting with `{` to the end), it parses
    /// as a bootstrap for the example mesh.
    #[test]
    fn the_example_in_the_error_is_a_working_bootstrap() {
        for (what, err) in [
            ("missing", Bootstrap::from_lookup(|_| None).unwrap_err()),
            (
                "malformed",
                Bootstrap::from_lookup(env(&[(BOOTSTRAP_CONFIG_VAR, "{")])).unwrap_err(),
            ),
        ] {
            let msg = err.to_string();
            let start = msg
                .find("\n{")
                .unwrap_or_else(|| panic!("{what}: no JSON in {msg}"));
            let example = &msg[start + 1..];
            assert!(
                example.lines().count() > 3,
                "{what}: on several lines: {example}"
            );
            let b = Bootstrap::from_json(example)
                .unwrap_or_else(|e| panic!("{what}: the example does not parse: {e}\n{example}"));
            assert_eq!(b.namespace(), "shop", "the example mesh's namespace");
            assert_eq!(b.admin_address(), Some("127.0.0.1:15000"));
            assert_eq!(b.node_id(), "frontend-1");
            assert_eq!(b.cluster(), "frontend");
            let server = &b.xds_servers()[0];
            assert_eq!(server.server_uri(), "127.0.0.1:15010");
            assert_eq!(server.server_features(), ["xds_v3"]);
            assert!(server.tls().is_none());
            // What the fields are for is said above the example.
            assert!(msg.contains("NAMESPACE: the namespace"), "{msg}");
            assert!(
                msg.contains("PROXYLESS_ADMIN: mesh-control's admin API"),
                "{msg}"
            );
        }
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
        // The position is said once, not again at the end of serde's text.
        let first = msg.lines().next().unwrap_or_default();
        assert_eq!(first.matches("column").count(), 1, "{msg}");

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
        assert!(msg.contains("\"tls\""), "{msg}");
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

    #[test]
    fn tls_channel_creds_in_the_a65_shape() {
        let json = r#"{"xds_servers":[{"server_uri":"127.0.0.1:15010","channel_creds":[{"type":"tls",
            "config":{"ca_certificate_file":"/x/root-cert.pem","certificate_file":"/x/cert.pem",
            "private_key_file":"/x/key.pem","refresh_interval":"60s"}}]}],
          "node":{"id":"n","metadata":{"NAMESPACE":"shop","SERVICE_ACCOUNT":"payment",
            "LABELS":{"app":"payment","version":"v1"}}}}"#;
        let b = Bootstrap::from_json(json).unwrap();
        let tls = b.xds_server_tls().unwrap();
        assert_eq!(tls.ca_certificate_file(), Path::new("/x/root-cert.pem"));
        assert_eq!(tls.certificate_file(), Some(Path::new("/x/cert.pem")));
        assert_eq!(tls.private_key_file(), Some(Path::new("/x/key.pem")));
        assert_eq!(b.xds_servers()[0].host(), "127.0.0.1");
        assert_eq!(b.service_account(), Some("payment"));
        assert_eq!(
            b.labels(),
            BTreeMap::from([
                ("app".to_owned(), "payment".to_owned()),
                ("version".to_owned(), "v1".to_owned())
            ])
        );
        // Server-auth only.
        let json = r#"{"xds_servers":[{"server_uri":"[::1]:15010","channel_creds":[{"type":"tls",
            "config":{"ca_certificate_file":"/x/root-cert.pem"}}]}]}"#;
        let b = Bootstrap::from_json(json).unwrap();
        assert_eq!(
            b.xds_server_tls(),
            Some(&ChannelTls::new("/x/root-cert.pem"))
        );
        assert_eq!(b.xds_servers()[0].host(), "::1");
        assert_eq!(b.service_account(), None);
        assert!(b.labels().is_empty());
        // Insecure has none.
        assert_eq!(Bootstrap::from_json(GOOD).unwrap().xds_server_tls(), None);
    }

    #[test]
    fn bad_tls_creds_and_node_metadata_name_the_field_with_an_example() {
        let creds = |c: &str| {
            let json =
                format!(r#"{{"xds_servers":[{{"server_uri":"a:1","channel_creds":[{c}]}}]}}"#);
            Bootstrap::from_json(&json).unwrap_err().to_string()
        };
        for (c, needle) in [
            (
                r#"{"type":"tls"}"#,
                "xds_servers[0].channel_creds[0].config.ca_certificate_file is missing",
            ),
            (
                r#"{"type":"tls","config":{}}"#,
                "xds_servers[0].channel_creds[0].config.ca_certificate_file is missing",
            ),
            (
                r#"{"type":"tls","config":"x"}"#,
                "xds_servers[0].channel_creds[0].config must be an object",
            ),
            (
                r#"{"type":"tls","config":{"ca_certificate_file":7}}"#,
                "config.ca_certificate_file must be a file path string",
            ),
            (
                r#"{"type":"tls","config":{"ca_certificate_file":"/ca","certificate_file":"/c"}}"#,
                "certificate_file and private_key_file go together",
            ),
            (
                r#"{"type":"google_default"}"#,
                "channel_creds[0].type \"google_default\" is not supported: use \"insecure\" or \"tls\"",
            ),
        ] {
            let msg = creds(c);
            assert!(msg.contains(needle), "{c}: {msg}");
            assert!(
                msg.contains("\"ca_certificate_file\": \"/etc/mesh/root-cert.pem\""),
                "example in {msg}"
            );
        }
        let meta = |m: &str| {
            let json = format!(
                r#"{{"xds_servers":[{{"server_uri":"a:1","channel_creds":[{{"type":"insecure"}}]}}],
                   "node":{{"id":"n","metadata":{m}}}}}"#
            );
            Bootstrap::from_json(&json).unwrap_err().to_string()
        };
        let msg = meta(r#"{"SERVICE_ACCOUNT":3}"#);
        assert!(
            msg.contains("node.metadata.SERVICE_ACCOUNT must be a string"),
            "{msg}"
        );
        let msg = meta(r#"{"LABELS":"app=payment"}"#);
        assert!(
            msg.contains("node.metadata.LABELS must be an object of strings"),
            "{msg}"
        );
        assert!(msg.contains(r#""LABELS": {"app": "payment""#), "{msg}");
        let msg = meta(r#"{"LABELS":{"app":1}}"#);
        assert!(
            msg.contains("node.metadata.LABELS.app must be a string"),
            "{msg}"
        );
    }

    #[test]
    fn the_builder_writes_tls_creds_identity_and_labels() {
        let b = Bootstrap::builder("127.0.0.1:15010", "n")
            .namespace("shop")
            .service_account("payment")
            .label("app", "payment")
            .label("version", "v2")
            .channel_tls("/x/root-cert.pem")
            .certificate_provider(
                "mesh",
                serde_json::json!({"plugin_name": "mesh_ca", "config": {"token": "t"}}),
            )
            .server_listener_template("grpc/server?xds.resource.listening_address=%s")
            .build()
            .unwrap();
        assert_eq!(b.service_account(), Some("payment"));
        assert_eq!(b.labels()["version"], "v2");
        assert_eq!(
            b.xds_server_tls(),
            Some(&ChannelTls::new("/x/root-cert.pem"))
        );
        assert_eq!(
            b.server_listener_name("10.0.0.7:8080").as_deref(),
            Some("grpc/server?xds.resource.listening_address=10.0.0.7:8080")
        );
        // The JSON is what gRPC reads, and reads back the same.
        let json = b.to_json();
        let v: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["xds_servers"][0]["channel_creds"][0]["type"], "tls");
        assert_eq!(
            v["xds_servers"][0]["channel_creds"][0]["config"]["ca_certificate_file"],
            "/x/root-cert.pem"
        );
        assert_eq!(v["node"]["metadata"]["LABELS"]["app"], "payment");
        assert_eq!(v["node"]["metadata"]["SERVICE_ACCOUNT"], "payment");
        assert_eq!(v["certificate_providers"]["mesh"]["plugin_name"], "mesh_ca");
        assert_eq!(Bootstrap::from_json(&json).unwrap(), b);
        // With a client certificate.
        let b = Bootstrap::builder("127.0.0.1:15010", "n")
            .channel_credentials(ChannelTls::new("/ca.pem").with_identity("/c.pem", "/k.pem"))
            .build()
            .unwrap();
        let tls = b.xds_server_tls().unwrap();
        assert_eq!(tls.private_key_file(), Some(Path::new("/k.pem")));
        assert_eq!(Bootstrap::from_json(&b.to_json()).unwrap(), b);
    }
}

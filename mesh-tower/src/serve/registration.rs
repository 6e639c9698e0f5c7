//! Self-registration with mesh-control's admin API, and the small HTTP/1.1
//! client that speaks it.
//!
//! The API (owned by mesh-control): `POST /v1/endpoints` registers an
//! endpoint and answers a lease; `PUT /v1/endpoints/{lease}` renews it
//! (404 when it expired: register again); `DELETE /v1/endpoints/{lease}`
//! removes it. A lease not renewed within its TTL expires, so a process that
//! dies without deregistering leaves the mesh on its own (Consul's TTL
//! checks and Istio's WorkloadEntry auto-registration work the same way).
//!
//! When mesh-control runs its CA (issue 5), the admin API is https and
//! registration is authenticated: the client verifies mesh-control's
//! certificate against the CA root of the bootstrap's control channel
//! (`xds_servers[0].channel_creds[0].config.ca_certificate_file`) and sends
//! the workload's join token as `Authorization: Bearer <token>`; the
//! control server allows the identity to register only endpoints of
//! services it may back (401 without credentials, 403 with the reason).
//!
//! Without a CA, a registration's answer carries the lease's secret
//! (`lease_secret`): renewals and the deregistration send it back in an
//! `X-Lease-Secret` header, since mesh-control changes a lease only for
//! whoever holds it (a lease id alone is not proof). It is kept in memory
//! only, out of `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode};
use mesh_core::model::Protocol;
use serde_json::{Map, Value, json};

use crate::error::{Error, ErrorKind};
use crate::tls::AdminClient;

/// What [`serve`](crate::serve()) registers: the service this process serves and
/// where clients should reach it.
///
/// # Labels
///
/// A workload has one label set: DestinationRule subsets pick its endpoint
/// by it, and PeerAuthentication and AuthorizationPolicy selectors select
/// its server by it. From lowest to highest precedence:
///
/// 1. the `metadata.labels` of the WorkloadGroup named like the service, in
///    the service's namespace (mesh-control adds them, as Istio's
///    WorkloadGroup template gives its labels to its workloads);
/// 2. the bootstrap's `node.metadata.LABELS` ([`Registration::from_bootstrap`]);
/// 3. [`Registration::label`].
///
/// So a bootstrap with `"LABELS": {"app": "catalog", "version": "v1"}` is
/// enough for a server to receive the traffic of subset `v1` and be
/// selected by `matchLabels: {app: catalog}`; `.label("version", "v2")`
/// overrides the bootstrap's `version` for this registration.
///
/// mesh-control resolves the server listener of the workload (its policies,
/// see [`InboundPolicy::from_xds`](crate::InboundPolicy::from_xds)) with the
/// labels of its registration at the address it listens on — for a listener
/// on `0.0.0.0`, the registration this bootstrap's node made for that port —
/// so both uses see the same set. Until the registration exists
/// ([`serve_with`](crate::serve_with) waits for the listener before it
/// registers), the listener is resolved with the bootstrap's `LABELS` over
/// the WorkloadGroup's, and it is updated when the registration lands. With
/// authenticated registration, the bootstrap must name the service account
/// it registers as (`node.metadata.SERVICE_ACCOUNT`) for its registration to
/// count: no other identity can choose the labels a workload's policies see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    admin: String,
    service: String,
    namespace: Option<String>,
    address: Option<IpAddr>,
    port: Option<u16>,
    service_port: Option<u16>,
    protocol: Option<Protocol>,
    labels: BTreeMap<String, String>,
    locality: Option<String>,
    /// The bootstrap's `node.id`: mesh-control finds the registration of
    /// a server listening on `0.0.0.0` by it.
    node_id: Option<String>,
    ttl: Duration,
    /// PEM roots to verify mesh-control with: https when set.
    admin_ca: Option<Vec<u8>>,
    token: Option<Token>,
}

/// A join token: kept out of `Debug` output.
#[derive(Clone, PartialEq, Eq)]
struct Token(String);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(redacted)")
    }
}

/// Where and how to reach the admin API: what [`Admin::new`] takes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdminTarget<'a> {
    address: &'a str,
    ca_pem: Option<&'a [u8]>,
    token: Option<&'a str>,
}

impl<'a> From<&'a str> for AdminTarget<'a> {
    fn from(address: &'a str) -> Self {
        AdminTarget {
            address,
            ca_pem: None,
            token: None,
        }
    }
}

impl Registration {
    /// Registers with the admin API at `admin` (`host:port`, or
    /// `http://host:port`; replicas as a comma-separated list, tried in
    /// order from the last that answered, see [`Registration::from_bootstrap`])
    /// as an endpoint of `service`. The TTL is 10 s;
    /// the advertised address is the listener's (set one when it is bound
    /// to an unspecified address such as `0.0.0.0`).
    pub fn new(admin: impl Into<String>, service: impl Into<String>) -> Self {
        Registration {
            admin: admin.into(),
            service: service.into(),
            namespace: None,
            address: None,
            port: None,
            service_port: None,
            protocol: None,
            labels: BTreeMap::new(),
            locality: None,
            node_id: None,
            ttl: Duration::from_secs(10),
            admin_ca: None,
            token: None,
        }
    }

    /// Registers with the admin API named in `bootstrap`
    /// (`node.metadata.PROXYLESS_ADMIN`: one address, or the replicas'
    /// separated by commas; registration, heartbeats and deregistration
    /// move to the next when one is unreachable, silent or answers 503),
    /// in the bootstrap's namespace,
    /// with the bootstrap's labels (`node.metadata.LABELS`; a
    /// [`Registration::label`] overrides one) and its node id (so the
    /// workload's server listener finds this registration even when it
    /// listens on `0.0.0.0`). When the bootstrap's control channel is TLS
    /// (`channel_creds` type `"tls"`), over https verified with its
    /// `ca_certificate_file`; when `certificate_providers.mesh` is
    /// `mesh_ca`, authenticated with its join token (`token` or
    /// `token_file`). Errors name the field.
    pub fn from_bootstrap(
        bootstrap: &mesh_xds_client::Bootstrap,
        service: impl Into<String>,
    ) -> Result<Self, Error> {
        let admin = bootstrap.admin_addresses();
        if admin.is_empty() {
            return Err(Error::new(
                ErrorKind::Registration,
                "the xDS bootstrap names no admin API: set node.metadata.PROXYLESS_ADMIN to \
                 mesh-control's admin address (\"host:port\", or its replicas' separated by \
                 commas)",
            ));
        }
        let mut registration =
            Registration::new(admin.join(","), service).namespace(bootstrap.namespace());
        registration.labels = bootstrap.labels();
        registration.node_id = Some(bootstrap.node_id().to_owned()).filter(|id| !id.is_empty());
        registration.admin_ca = crate::tls::control_ca_pem(bootstrap, ErrorKind::Registration)?;
        registration.token = crate::tls::bootstrap_token(bootstrap)
            .map_err(|e| Error::new(ErrorKind::Registration, e.message().to_owned()))?
            .map(Token);
        Ok(registration)
    }

    /// The join token to authenticate with (`Authorization: Bearer`):
    /// mesh-control requires one when it runs its CA, and lets the token's
    /// service account register only the services it may back.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Token(token.into()));
        self
    }

    /// https to the admin API, verifying mesh-control's certificate against
    /// these PEM roots (its CA root, the bootstrap's
    /// `channel_creds[0].config.ca_certificate_file`).
    pub fn admin_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.admin_ca = Some(pem.into());
        self
    }

    /// The namespace of the service (mesh-control's default: `default`).
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The address clients should dial, when not the listener's own.
    pub fn advertise_address(mut self, address: IpAddr) -> Self {
        self.address = Some(address);
        self
    }

    /// The port clients should dial, when not the listener's own (behind a
    /// port mapping).
    pub fn advertise_port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The service port this endpoint serves (`catalog:8080`); without it,
    /// every port of a declared service, or port 80 of an implicit one.
    pub fn service_port(mut self, port: u16) -> Self {
        self.service_port = Some(port);
        self
    }

    /// The protocol of an implicit service (default HTTP/1.1).
    pub fn protocol(mut self, protocol: Protocol) -> Self {
        self.protocol = Some(protocol);
        self
    }

    /// A label (`version` → `v1`), which DestinationRule subsets and policy
    /// selectors select on. It wins over the same key of the bootstrap's
    /// `node.metadata.LABELS` and of the service's WorkloadGroup (see
    /// [Labels](Registration#labels)).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Where this endpoint runs, `region/zone/subzone`.
    pub fn locality(mut self, locality: impl Into<String>) -> Self {
        self.locality = Some(locality.into());
        self
    }

    /// How long the registration outlives a silent process (rounded up to
    /// whole seconds, at least 1). Heartbeats are sent every third of it.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Where and how to reach the admin API.
    pub(crate) fn admin(&self) -> AdminTarget<'_> {
        AdminTarget {
            address: &self.admin,
            ca_pem: self.admin_ca.as_deref(),
            token: self.token.as_ref().map(|t| t.0.as_str()),
        }
    }

    pub(crate) fn advertised_address(&self) -> Option<IpAddr> {
        self.address
    }

    pub(crate) fn advertised_port(&self) -> Option<u16> {
        self.port
    }

    pub(crate) fn ttl_seconds(&self) -> u64 {
        let secs = self.ttl.as_secs() + u64::from(self.ttl.subsec_nanos() > 0);
        secs.max(1)
    }

    /// The `POST /v1/endpoints` body for an endpoint at `address:port`.
    pub(crate) fn to_json(&self, address: IpAddr, port: u16) -> Value {
        let mut body = Map::new();
        body.insert("service".into(), json!(self.service));
        if let Some(ns) = &self.namespace {
            body.insert("namespace".into(), json!(ns));
        }
        body.insert("address".into(), json!(address.to_string()));
        body.insert("port".into(), json!(port));
        if let Some(p) = self.service_port {
            body.insert("service_port".into(), json!(p));
        }
        if let Some(p) = self.protocol {
            let name = match p {
                Protocol::Http1 => "HTTP",
                Protocol::Http2 => "HTTP2",
                Protocol::Grpc => "GRPC",
            };
            body.insert("protocol".into(), json!(name));
        }
        body.insert("labels".into(), json!(self.labels));
        if let Some(l) = &self.locality {
            body.insert("locality".into(), json!(l));
        }
        if let Some(id) = &self.node_id {
            body.insert("node_id".into(), json!(id));
        }
        body.insert("ttl_seconds".into(), json!(self.ttl_seconds()));
        Value::Object(body)
    }
}

/// A lease granted by the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) id: String,
    pub(crate) ttl: Duration,
    /// The secret that renews and deletes it (registration without a CA).
    pub(crate) secret: Option<LeaseSecret>,
}

/// The header that carries a lease's secret.
const LEASE_SECRET_HEADER: &str = "x-lease-secret";

/// A lease's secret: kept out of `Debug` output, sent as a sensitive
/// header value.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct LeaseSecret(HeaderValue);

impl fmt::Debug for LeaseSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeaseSecret(redacted)")
    }
}

impl Lease {
    /// The headers that prove the caller holds this lease.
    fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        self.secret
            .iter()
            .map(|s| (HeaderName::from_static(LEASE_SECRET_HEADER), s.0.clone()))
            .collect()
    }
}

impl Lease {
    /// How often to renew: a third of the TTL, so two heartbeats may be lost.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }
}

/// Why a registration did not happen.
#[derive(Debug)]
pub(crate) enum RegisterFailure {
    /// mesh-control answered and refused it (a 4xx other than 408 and 429:
    /// an unknown namespace, an identity not allowed to back the service):
    /// trying again as it is cannot help.
    Refused(Error),
    /// mesh-control could not take it: unreachable, no answer in time, a
    /// server error, an answer that makes no sense. Worth trying again.
    Unavailable(Error),
}

impl RegisterFailure {
    /// The error, whichever kind of failure.
    pub(crate) fn into_error(self) -> Error {
        match self {
            RegisterFailure::Refused(e) | RegisterFailure::Unavailable(e) => e,
        }
    }
}

// Written here, not in `telemetry/graph_push.rs`: it takes a
// `Registration`, and telemetry sits below `serve` (it must not import it).
#[cfg(feature = "telemetry")]
impl crate::telemetry::MetricsRegistry {
    /// Starts pushing this registry's outbound edges to mesh-control's
    /// admin API (the one `registration` registers with, with its
    /// credentials) every 5 s, as `source`. Must run inside a tokio
    /// runtime. A failed push is logged and the next one carries its
    /// requests too (the deltas are taken from what was sent).
    pub fn push_graph(
        &self,
        registration: &Registration,
        source: crate::telemetry::GraphSource,
    ) -> Result<crate::telemetry::GraphPush, Error> {
        let client = Admin::new(registration.admin())?.client().clone();
        Ok(self.push_graph_to(
            client,
            source,
            Duration::from_millis(mesh_core::graph::PUSH_INTERVAL),
        ))
    }
}

/// A client of mesh-control's admin API.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    client: AdminClient,
}

impl Admin {
    /// The admin API at a target: `host:port`, `http://host:port` or
    /// `http://host:port/` (a `&str`), or a registration's
    /// [`Registration::admin`] (https and the token included).
    pub(crate) fn new<'a>(target: impl Into<AdminTarget<'a>>) -> Result<Self, Error> {
        let target = target.into();
        Ok(Admin {
            client: AdminClient::new(
                target.address,
                target.ca_pem,
                target.token,
                ErrorKind::Registration,
            )?,
        })
    }

    /// The HTTP client, for other calls to the same admin API with the
    /// same credentials (the graph push, `telemetry/graph_push.rs`).
    #[cfg(feature = "telemetry")]
    pub(crate) fn client(&self) -> &AdminClient {
        &self.client
    }

    /// Also trusts the trust bundle `store` holds, so heartbeats still
    /// verify mesh-control after a root rotation.
    pub(crate) fn trusting(self, store: &crate::tls::CertStore) -> Self {
        Admin {
            client: self.client.trusting(store),
        }
    }

    /// `POST /v1/endpoints`. The failure says whether mesh-control refused
    /// the registration or could not take it.
    pub(crate) async fn register(&self, body: &Value) -> Result<Lease, RegisterFailure> {
        let (status, reply) = self
            .call(Method::POST, "/v1/endpoints", Some(body))
            .await
            .map_err(RegisterFailure::Unavailable)?;
        if !status.is_success() {
            let error = self.refused("POST /v1/endpoints", status, &reply);
            // 408 and 429 say "not now", not "no".
            let refused = status.is_client_error()
                && status != StatusCode::REQUEST_TIMEOUT
                && status != StatusCode::TOO_MANY_REQUESTS;
            return Err(if refused {
                RegisterFailure::Refused(error)
            } else {
                RegisterFailure::Unavailable(error)
            });
        }
        let value: Value = serde_json::from_slice(&reply).map_err(|e| {
            RegisterFailure::Unavailable(
                Error::new(
                    ErrorKind::Registration,
                    format!(
                        "admin API at {}: POST /v1/endpoints: the answer is not JSON",
                        self.client.base()
                    ),
                )
                .with_source(e),
            )
        })?;
        let id = value
            .get("lease_id")
            .and_then(Value::as_str)
            .filter(|id| is_path_safe(id))
            .ok_or_else(|| {
                RegisterFailure::Unavailable(Error::new(
                    ErrorKind::Registration,
                    format!(
                        "admin API at {}: POST /v1/endpoints answered no usable lease_id: {value}",
                        self.client.base()
                    ),
                ))
            })?;
        let requested = body
            .get("ttl_seconds")
            .and_then(Value::as_u64)
            .unwrap_or(10);
        let ttl = value
            .get("ttl_seconds")
            .and_then(Value::as_u64)
            .unwrap_or(requested)
            .max(1);
        let secret = match value.get("lease_secret").and_then(Value::as_str) {
            None => None,
            Some(secret) => {
                let mut header = HeaderValue::from_str(secret).map_err(|_| {
                    RegisterFailure::Unavailable(Error::new(
                        ErrorKind::Registration,
                        format!(
                            "admin API at {}: POST /v1/endpoints answered a lease_secret that \
                             is not a valid header value",
                            self.client.base()
                        ),
                    ))
                })?;
                header.set_sensitive(true);
                Some(LeaseSecret(header))
            }
        };
        Ok(Lease {
            id: id.to_owned(),
            ttl: Duration::from_secs(ttl),
            secret,
        })
    }

    /// `PUT /v1/endpoints/{lease}`: `Ok(false)` when the lease is unknown
    /// (expired, or the control server restarted).
    pub(crate) async fn renew(&self, lease: &Lease) -> Result<bool, Error> {
        let path = format!("/v1/endpoints/{}", lease.id);
        let (status, reply) = self
            .client
            .call_with_headers(Method::PUT, &path, None, &lease.headers())
            .await?;
        match status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(self.refused(&format!("PUT {path}"), s, &reply)),
        }
    }

    /// `DELETE /v1/endpoints/{lease}`; an unknown lease is already gone.
    pub(crate) async fn deregister(&self, lease: &Lease) -> Result<(), Error> {
        let path = format!("/v1/endpoints/{}", lease.id);
        let (status, reply) = self
            .client
            .call_with_headers(Method::DELETE, &path, None, &lease.headers())
            .await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.refused(&format!("DELETE {path}"), status, &reply))
        }
    }

    fn refused(&self, what: &str, status: StatusCode, reply: &[u8]) -> Error {
        self.client.refused(what, status, reply)
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, bytes::Bytes), Error> {
        self.client.call(method, path, body).await
    }
}

fn is_path_safe(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_addresses() {
        assert_eq!(
            Admin::new("127.0.0.1:9000").unwrap().client.base(),
            "http://127.0.0.1:9000"
        );
        assert_eq!(
            Admin::new("http://control:9000/").unwrap().client.base(),
            "http://control:9000"
        );
        assert!(Admin::new("https://control:9000").is_err());
        assert!(Admin::new("control:9000/x").is_err());
        assert!(Admin::new("").is_err());
    }

    #[test]
    fn registration_from_a_bootstrap_listing_replicas() {
        let bootstrap = mesh_xds_client::Bootstrap::builder("http://127.0.0.1:1", "node-1")
            .admin_address("127.0.0.1:9000, 127.0.0.1:9001")
            .build()
            .unwrap();
        let r = Registration::from_bootstrap(&bootstrap, "catalog").unwrap();
        assert_eq!(r.admin().address, "127.0.0.1:9000,127.0.0.1:9001");
        let admin = Admin::new(r.admin()).unwrap();
        assert_eq!(admin.client.base(), "http://127.0.0.1:9000");
    }

    #[test]
    fn registration_body() {
        let r = Registration::new("a:1", "catalog")
            .namespace("shop")
            .service_port(8080)
            .protocol(Protocol::Grpc)
            .label("version", "v1")
            .ttl(Duration::from_millis(1500));
        let body = r.to_json("10.0.0.7".parse().unwrap(), 41000);
        assert_eq!(
            body,
            json!({
                "service": "catalog", "namespace": "shop", "address": "10.0.0.7",
                "port": 41000, "service_port": 8080, "protocol": "GRPC",
                "labels": {"version": "v1"}, "ttl_seconds": 2
            })
        );
    }

    #[test]
    fn registration_from_bootstrap() {
        let bootstrap = mesh_xds_client::Bootstrap::builder("http://127.0.0.1:1", "node-1")
            .namespace("shop")
            .admin_address("127.0.0.1:9000")
            .build()
            .unwrap();
        let r = Registration::from_bootstrap(&bootstrap, "catalog").unwrap();
        assert_eq!(r.admin().address, "127.0.0.1:9000");
        assert!(r.admin().token.is_none() && r.admin().ca_pem.is_none());
        let body = r.to_json("10.0.0.7".parse().unwrap(), 1);
        assert_eq!(body["namespace"], "shop");
        assert_eq!(body["node_id"], "node-1");
        assert_eq!(body["labels"], json!({}));

        let bare = mesh_xds_client::Bootstrap::builder("http://127.0.0.1:1", "node-1")
            .build()
            .unwrap();
        let e = Registration::from_bootstrap(&bare, "catalog").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Registration);
        assert!(e.to_string().contains("PROXYLESS_ADMIN"), "{e}");
    }

    #[test]
    fn registration_labels_are_the_bootstrap_labels_overridden_by_label() {
        let bootstrap = mesh_xds_client::Bootstrap::builder("http://127.0.0.1:1", "catalog-1")
            .admin_address("127.0.0.1:9000")
            .label("app", "catalog")
            .label("version", "v1")
            .build()
            .unwrap();
        let from_bootstrap = Registration::from_bootstrap(&bootstrap, "catalog").unwrap();
        assert_eq!(
            from_bootstrap.to_json("10.0.0.7".parse().unwrap(), 1)["labels"],
            json!({"app": "catalog", "version": "v1"}),
            "a registration from a bootstrap carries its LABELS"
        );
        let overridden = from_bootstrap
            .label("version", "v2")
            .label("track", "canary");
        assert_eq!(
            overridden.to_json("10.0.0.7".parse().unwrap(), 1)["labels"],
            json!({"app": "catalog", "version": "v2", "track": "canary"}),
            ".label() wins over the bootstrap's label of the same key"
        );
    }

    #[test]
    fn registration_takes_the_token_of_the_mesh_ca_provider() {
        let bootstrap = mesh_xds_client::Bootstrap::builder("http://127.0.0.1:1", "node-1")
            .admin_address("127.0.0.1:9000")
            .certificate_provider(
                "mesh",
                json!({"plugin_name": "mesh_ca", "config": {"token": "join-1"}}),
            )
            .build()
            .unwrap();
        let r = Registration::from_bootstrap(&bootstrap, "catalog").unwrap();
        assert_eq!(r.admin().token, Some("join-1"));
        assert!(
            !format!("{r:?}").contains("join-1"),
            "the token is redacted"
        );
        let explicit = Registration::new("a:1", "catalog").token("t2");
        assert_eq!(explicit.admin().token, Some("t2"));
    }

    /// A real admin API on a socket that grants a lease with a secret and
    /// records the `X-Lease-Secret` of each later call.
    #[tokio::test]
    async fn renewals_and_the_deregistration_send_the_lease_s_secret() {
        use axum::routing::{post, put};
        use std::sync::{Arc, Mutex};
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let record = |seen: Arc<Mutex<Vec<String>>>, method: &'static str| {
            move |headers: http::HeaderMap| async move {
                let secret = headers
                    .get("x-lease-secret")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("none")
                    .to_owned();
                seen.lock().unwrap().push(format!("{method} {secret}"));
                StatusCode::OK
            }
        };
        let app = axum::Router::new()
            .route(
                "/v1/endpoints",
                post(|| async {
                    (
                        StatusCode::CREATED,
                        axum::Json(json!({
                            "lease_id": "1-a", "ttl_seconds": 9, "lease_secret": "s3cr3t-0123"
                        })),
                    )
                }),
            )
            .route(
                "/v1/endpoints/{id}",
                put(record(seen.clone(), "PUT")).delete(record(seen.clone(), "DELETE")),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let admin = Admin::new(addr.as_str()).unwrap();
        let body =
            Registration::new(addr.as_str(), "catalog").to_json("10.0.0.7".parse().unwrap(), 1);
        let lease = admin
            .register(&body)
            .await
            .map_err(|f| f.into_error())
            .unwrap();
        assert!(
            !format!("{lease:?}").contains("s3cr3t"),
            "the secret is redacted: {lease:?}"
        );
        assert!(admin.renew(&lease).await.unwrap());
        admin.deregister(&lease).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            ["PUT s3cr3t-0123", "DELETE s3cr3t-0123"]
        );
    }

    #[test]
    fn lease_ids_must_be_path_safe() {
        assert!(is_path_safe("a1-b_2.c"));
        assert!(!is_path_safe("../x"));
        assert!(!is_path_safe(""));
    }
}

//! Self-registration with mesh-control's admin API, and the small HTTP/1.1
//! client that speaks it.
//!
//! The API (owned by mesh-control): `POST /v1/endpoints` registers an
//! endpoint and answers a lease; `PUT /v1/endpoints/{lease}` renews it
//! (404 when it expired: register again); `DELETE /v1/endpoints/{lease}`
//! removes it. A lease not renewed within its TTL expires, so a process that
//! dies without deregistering leaves the mesh on its own (Consul's TTL
//! checks and Istio's WorkloadEntry auto-registration work the same way).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use mesh_core::model::Protocol;
use serde_json::{Map, Value, json};
use tokio::net::TcpStream;

use crate::error::{Error, ErrorKind};

/// How long one admin API call may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What [`serve`](crate::serve()) registers: the service this process serves and
/// where clients should reach it.
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
    ttl: Duration,
}

impl Registration {
    /// Registers with the admin API at `admin` (`host:port`, or
    /// `http://host:port`) as an endpoint of `service`. The TTL is 10 s;
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
            ttl: Duration::from_secs(10),
        }
    }

    /// Registers with the admin API named in `bootstrap`
    /// (`node.metadata.PROXYLESS_ADMIN`), in the bootstrap's namespace.
    pub fn from_bootstrap(
        bootstrap: &mesh_xds_client::Bootstrap,
        service: impl Into<String>,
    ) -> Result<Self, Error> {
        let admin = bootstrap.admin_address().ok_or_else(|| {
            Error::new(
                ErrorKind::Registration,
                "the xDS bootstrap names no admin API: set node.metadata.PROXYLESS_ADMIN to \
                 mesh-control's admin address (\"host:port\")",
            )
        })?;
        Ok(Registration::new(admin, service).namespace(bootstrap.namespace()))
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

    /// A label (`version` → `v1`), which DestinationRule subsets select on.
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

    pub(crate) fn admin(&self) -> &str {
        &self.admin
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
        body.insert("ttl_seconds".into(), json!(self.ttl_seconds()));
        Value::Object(body)
    }
}

/// A lease granted by the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Lease {
    pub(crate) id: String,
    pub(crate) ttl: Duration,
}

impl Lease {
    /// How often to renew: a third of the TTL, so two heartbeats may be lost.
    pub(crate) fn heartbeat_interval(&self) -> Duration {
        (self.ttl / 3).max(Duration::from_millis(100))
    }
}

/// A client of mesh-control's admin API.
#[derive(Debug, Clone)]
pub(crate) struct Admin {
    authority: String,
}

impl Admin {
    /// `host:port`, `http://host:port` or `http://host:port/`.
    pub(crate) fn new(address: &str) -> Result<Self, Error> {
        let trimmed = address.trim();
        if trimmed.starts_with("https://") {
            return Err(Error::new(
                ErrorKind::Registration,
                format!("admin address {address:?}: https is not supported, use host:port"),
            ));
        }
        let authority = trimmed
            .strip_prefix("http://")
            .unwrap_or(trimmed)
            .trim_end_matches('/');
        if authority.is_empty()
            || authority.contains('/')
            || http::uri::Authority::try_from(authority).is_err()
        {
            return Err(Error::new(
                ErrorKind::Registration,
                format!("admin address {address:?} is not host:port"),
            ));
        }
        Ok(Admin {
            authority: authority.to_owned(),
        })
    }

    /// `POST /v1/endpoints`.
    pub(crate) async fn register(&self, body: &Value) -> Result<Lease, Error> {
        let (status, reply) = self.call(Method::POST, "/v1/endpoints", Some(body)).await?;
        if !status.is_success() {
            return Err(self.refused("POST /v1/endpoints", status, &reply));
        }
        let value: Value = serde_json::from_slice(&reply).map_err(|e| {
            Error::new(
                ErrorKind::Registration,
                format!(
                    "admin API at {}: POST /v1/endpoints: the answer is not JSON",
                    self.authority
                ),
            )
            .with_source(e)
        })?;
        let id = value
            .get("lease_id")
            .and_then(Value::as_str)
            .filter(|id| is_path_safe(id))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Registration,
                    format!(
                        "admin API at {}: POST /v1/endpoints answered no usable lease_id: {value}",
                        self.authority
                    ),
                )
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
        Ok(Lease {
            id: id.to_owned(),
            ttl: Duration::from_secs(ttl),
        })
    }

    /// `PUT /v1/endpoints/{lease}`: `Ok(false)` when the lease is unknown
    /// (expired, or the control server restarted).
    pub(crate) async fn renew(&self, lease: &Lease) -> Result<bool, Error> {
        let path = format!("/v1/endpoints/{}", lease.id);
        let (status, reply) = self.call(Method::PUT, &path, None).await?;
        match status {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(self.refused(&format!("PUT {path}"), s, &reply)),
        }
    }

    /// `DELETE /v1/endpoints/{lease}`; an unknown lease is already gone.
    pub(crate) async fn deregister(&self, lease: &Lease) -> Result<(), Error> {
        let path = format!("/v1/endpoints/{}", lease.id);
        let (status, reply) = self.call(Method::DELETE, &path, None).await?;
        if status.is_success() || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(self.refused(&format!("DELETE {path}"), status, &reply))
        }
    }

    fn refused(&self, what: &str, status: StatusCode, reply: &[u8]) -> Error {
        Error::new(
            ErrorKind::Registration,
            format!(
                "admin API at {}: {what} answered {status}: {}",
                self.authority,
                String::from_utf8_lossy(reply).trim()
            ),
        )
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Bytes), Error> {
        let what = format!("admin API at {}: {method} {path}", self.authority);
        let exchange = async {
            let stream = TcpStream::connect(&self.authority).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let bytes = match body {
                Some(v) => Bytes::from(v.to_string()),
                None => Bytes::new(),
            };
            let req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(HOST, &self.authority)
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(bytes))?;
            let response = sender.send_request(req).await?;
            let status = response.status();
            let reply = response.into_body().collect().await?.to_bytes();
            Ok::<_, crate::BoxError>((status, reply))
        };
        match tokio::time::timeout(ADMIN_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => {
                Err(Error::new(ErrorKind::Registration, format!("{what} failed")).with_source(e))
            }
            Err(_) => Err(Error::new(
                ErrorKind::Registration,
                format!("{what}: no answer within {ADMIN_TIMEOUT:?}"),
            )),
        }
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
            Admin::new("127.0.0.1:9000").unwrap().authority,
            "127.0.0.1:9000"
        );
        assert_eq!(
            Admin::new("http://control:9000/").unwrap().authority,
            "control:9000"
        );
        assert!(Admin::new("https://control:9000").is_err());
        assert!(Admin::new("control:9000/x").is_err());
        assert!(Admin::new("").is_err());
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
        assert_eq!(r.admin(), "127.0.0.1:9000");
        let body = r.to_json("10.0.0.7".parse().unwrap(), 1);
        assert_eq!(body["namespace"], "shop");

        let bare = mesh_xds_client::Bootstrap::builder("http://127.0.0.1:1", "node-1")
            .build()
            .unwrap();
        let e = Registration::from_bootstrap(&bare, "catalog").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Registration);
        assert!(e.to_string().contains("PROXYLESS_ADMIN"), "{e}");
    }

    #[test]
    fn lease_ids_must_be_path_safe() {
        assert!(is_path_safe("a1-b_2.c"));
        assert!(!is_path_safe("../x"));
        assert!(!is_path_safe(""));
    }
}

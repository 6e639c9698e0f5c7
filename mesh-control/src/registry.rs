//! Self-registered endpoints and their leases.
//!
//! Without Kubernetes there is no endpoint controller: a workload announces
//! itself (`POST /v1/endpoints`), keeps its lease alive with heartbeats, and
//! disappears from EDS when it deregisters or stops renewing. Like Consul's
//! TTL checks, an expired lease removes the endpoint; the time is passed in so
//! the rules are tested without a clock.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use mesh_core::model::{Locality, Protocol};
use mesh_core::spiffe::SpiffeId;
use serde::{Deserialize, Serialize};

use crate::config::Registration;

/// Longest lease a workload may ask for; a dead workload must not linger for long.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(300);

/// The JSON body of `POST /v1/endpoints`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterRequest {
    pub(crate) service: String,
    #[serde(default)]
    pub(crate) namespace: Option<String>,
    pub(crate) address: String,
    pub(crate) port: u16,
    #[serde(default)]
    pub(crate) service_port: Option<u16>,
    #[serde(default)]
    pub(crate) protocol: Option<String>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) locality: Option<String>,
    pub(crate) ttl_seconds: u64,
    /// The xDS node id of the workload (its bootstrap's `node.id`): how the
    /// server listener of a workload listening on an unspecified address
    /// (`0.0.0.0:8080`) finds its registration.
    #[serde(default)]
    pub(crate) node_id: Option<String>,
}

/// The answer to a registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Lease {
    pub(crate) lease_id: String,
    pub(crate) ttl_seconds: u64,
}

#[derive(Debug, Clone)]
struct Entry {
    registered: Registered,
    ttl: Duration,
    expires: Instant,
}

/// A live registration and who made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Registered {
    pub(crate) registration: Registration,
    /// Who registered it (when registration is authenticated): only the
    /// same identity may renew or delete the lease, and only a workload
    /// running as it gets its labels for its server listener.
    pub(crate) owner: Option<SpiffeId>,
    /// The xDS node id it was registered for, if the workload said.
    pub(crate) node_id: Option<String>,
}

/// Registered endpoints by lease id.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    leases: HashMap<String, Entry>,
    next_id: u64,
}

impl Registry {
    /// Validates and records a registration; returns its lease. Errors are
    /// the 400 message (409 when they say "already registered").
    #[cfg(test)]
    pub(crate) fn register(
        &mut self,
        req: RegisterRequest,
        now: Instant,
        lease_salt: u64,
    ) -> Result<Lease, String> {
        let ttl_seconds = req.ttl_seconds;
        let node_id = req.node_id.clone();
        let registration = validate(req)?;
        let registered = Registered {
            registration,
            owner: None,
            node_id,
        };
        self.insert(registered, ttl_seconds, now, lease_salt)
    }

    /// Records a validated registration made by its `owner` (None when
    /// registration is open). Refused when the same endpoint of the same
    /// service is registered already, or when another identity registered
    /// its ip:port (one workload may back several services on one port;
    /// two workloads cannot share an address).
    pub(crate) fn insert(
        &mut self,
        registered: Registered,
        ttl_seconds: u64,
        now: Instant,
        lease_salt: u64,
    ) -> Result<Lease, String> {
        if ttl_seconds == 0 {
            return Err("ttl_seconds must be at least 1".into());
        }
        let ttl = Duration::from_secs(ttl_seconds).min(MAX_TTL);
        let registration = &registered.registration;
        let owner = &registered.owner;
        let same_address = |e: &&Entry| {
            let r = &e.registered.registration;
            r.address == registration.address && r.port == registration.port
        };
        if let Some((id, _)) = self.leases.iter().find(|(_, e)| {
            let r = &e.registered.registration;
            same_address(e)
                && r.service == registration.service
                && r.namespace == registration.namespace
        }) {
            return Err(format!(
                "{}:{} is already registered for service {:?} under lease {id}; renew or delete that lease",
                registration.address, registration.port, registration.service
            ));
        }
        if let Some((id, e)) = self
            .leases
            .iter()
            .find(|(_, e)| same_address(e) && e.registered.owner != *owner)
        {
            return Err(format!(
                "{}:{} is already registered by {} (service {:?}, lease {id}); two workloads \
                 cannot share an address",
                registration.address,
                registration.port,
                e.registered.owner.as_ref().map_or_else(
                    || "an unauthenticated workload".to_string(),
                    |o| o.to_string()
                ),
                e.registered.registration.service
            ));
        }
        self.next_id += 1;
        let lease_id = format!("{:x}-{:x}", self.next_id, lease_salt & 0xffff_ffff);
        self.leases.insert(
            lease_id.clone(),
            Entry {
                registered,
                ttl,
                expires: now + ttl,
            },
        );
        Ok(Lease {
            lease_id,
            ttl_seconds: ttl.as_secs(),
        })
    }

    /// Who registered a lease: `None` when the lease is unknown,
    /// `Some(None)` when it was registered without authentication.
    pub(crate) fn owner(&self, lease_id: &str) -> Option<Option<&SpiffeId>> {
        self.leases
            .get(lease_id)
            .map(|e| e.registered.owner.as_ref())
    }

    /// Extends a lease by its TTL. False when unknown (expired or deleted).
    pub(crate) fn renew(&mut self, lease_id: &str, now: Instant) -> bool {
        match self.leases.get_mut(lease_id) {
            Some(e) => {
                e.expires = now + e.ttl;
                true
            }
            None => false,
        }
    }

    /// Removes a lease. False when unknown.
    pub(crate) fn remove(&mut self, lease_id: &str) -> bool {
        self.leases.remove(lease_id).is_some()
    }

    /// Drops expired leases; true when any was dropped.
    pub(crate) fn expire(&mut self, now: Instant) -> bool {
        let before = self.leases.len();
        self.leases.retain(|_, e| e.expires > now);
        self.leases.len() != before
    }

    /// The live registrations, in a stable order.
    pub(crate) fn registrations(&self) -> Vec<Registration> {
        self.registered()
            .into_iter()
            .map(|r| r.registration)
            .collect()
    }

    /// The live registrations with who made them, in a stable order (by
    /// lease id).
    pub(crate) fn registered(&self) -> Vec<Registered> {
        let mut ids: Vec<&String> = self.leases.keys().collect();
        ids.sort();
        ids.into_iter()
            .filter_map(|id| self.leases.get(id))
            .map(|e| e.registered.clone())
            .collect()
    }
}

/// Checks a registration request; errors are the 400 message.
pub(crate) fn validate(req: RegisterRequest) -> Result<Registration, String> {
    if req.service.is_empty() {
        return Err("service must not be empty".into());
    }
    if !req
        .service
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(format!(
            "service {:?}: only letters, digits, '-' and '.' are allowed",
            req.service
        ));
    }
    let address: IpAddr = req.address.parse().map_err(|_| {
        format!(
            "address {:?} is not an IP address (hostnames are not resolved)",
            req.address
        )
    })?;
    if address.is_unspecified() {
        return Err(format!(
            "address {address} is unspecified; register the address clients should dial"
        ));
    }
    if req.port == 0 {
        return Err("port must be between 1 and 65535".into());
    }
    if req.service_port == Some(0) {
        return Err("service_port must be between 1 and 65535".into());
    }
    let protocol = match req
        .protocol
        .as_deref()
        .map(str::to_ascii_uppercase)
        .as_deref()
    {
        None => None,
        Some("HTTP") | Some("HTTP1") => Some(Protocol::Http1),
        Some("HTTP2") => Some(Protocol::Http2),
        Some("GRPC") => Some(Protocol::Grpc),
        Some(other) => {
            return Err(format!(
                "protocol {other:?} is not supported; use HTTP, HTTP2 or GRPC"
            ));
        }
    };
    let locality = match req.locality.as_deref() {
        None | Some("") => Locality::default(),
        Some(s) => {
            let mut parts = s.split('/');
            let mut next = || parts.next().unwrap_or("").into();
            Locality {
                region: next(),
                zone: next(),
                sub_zone: next(),
            }
        }
    };
    Ok(Registration {
        service: req.service,
        namespace: req
            .namespace
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "default".into()),
        address,
        port: req.port,
        service_port: req.service_port,
        protocol,
        labels: req.labels,
        locality,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(port: u16, ttl: u64) -> RegisterRequest {
        RegisterRequest {
            service: "catalog".into(),
            namespace: Some("shop".into()),
            address: "127.0.0.1".into(),
            port,
            service_port: None,
            protocol: Some("grpc".into()),
            labels: BTreeMap::from([("version".into(), "v1".into())]),
            locality: Some("eu/z1".into()),
            ttl_seconds: ttl,
            node_id: None,
        }
    }

    #[test]
    fn lease_lifecycle() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        let lease = r.register(req(1000, 2), t0, 7).unwrap();
        assert_eq!(lease.ttl_seconds, 2);
        let regs = r.registrations();
        assert_eq!(regs.len(), 1);
        assert_eq!(regs[0].protocol, Some(Protocol::Grpc));
        assert_eq!(&*regs[0].locality.zone, "z1");
        // Renewed at 1.5 s: still alive at 3 s, gone at 3.6 s.
        assert!(r.renew(&lease.lease_id, t0 + Duration::from_millis(1500)));
        assert!(!r.expire(t0 + Duration::from_secs(3)));
        assert!(r.expire(t0 + Duration::from_millis(3600)));
        assert!(r.registrations().is_empty());
        assert!(
            !r.renew(&lease.lease_id, t0),
            "an expired lease cannot be renewed"
        );
    }

    #[test]
    fn two_identities_cannot_share_an_address() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        let catalog = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/catalog").unwrap();
        let payment = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/payment").unwrap();
        let reg = |service: &str, owner: &SpiffeId| {
            let mut req = req(1000, 5);
            req.service = service.into();
            Registered {
                registration: validate(req).unwrap(),
                owner: Some(owner.clone()),
                node_id: None,
            }
        };
        let lease = r.insert(reg("catalog", &catalog), 5, t0, 1).unwrap();
        assert_eq!(r.owner(&lease.lease_id), Some(Some(&catalog)));
        let taken = r.insert(reg("payment", &payment), 5, t0, 2).unwrap_err();
        assert!(
            taken.contains("already registered by spiffe://cluster.local/ns/shop/sa/catalog"),
            "{taken}"
        );
        // One workload may back two services on one port.
        r.insert(reg("catalog-v2", &catalog), 5, t0, 3).unwrap();
        assert_eq!(r.owner("nope"), None);
    }

    #[test]
    fn duplicates_and_bad_input_are_refused_with_reasons() {
        let t0 = Instant::now();
        let mut r = Registry::default();
        let lease = r.register(req(1000, 5), t0, 1).unwrap();
        let dup = r.register(req(1000, 5), t0, 2).unwrap_err();
        assert!(dup.contains("already registered"), "{dup}");
        assert!(r.remove(&lease.lease_id));
        assert!(!r.remove(&lease.lease_id));

        let mut bad = req(1000, 5);
        bad.address = "catalog.local".into();
        assert!(r.register(bad, t0, 3).unwrap_err().contains("not an IP"));
        let mut bad = req(1000, 5);
        bad.protocol = Some("tcp".into());
        assert!(
            r.register(bad, t0, 3)
                .unwrap_err()
                .contains("not supported")
        );
        assert!(
            r.register(req(0, 5), t0, 3)
                .unwrap_err()
                .contains("port must be")
        );
        assert!(r.register(req(1, 0), t0, 3).unwrap_err().contains("ttl"));
    }
}

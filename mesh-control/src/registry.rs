//! Self-registered endpoints and their leases.
//!
//! Without Kubernetes there is no endpoint controller: a workload announces
//! itself (`POST /v1/endpoints`), keeps its lease alive with heartbeats, and
//! disappears from EDS when it deregisters or stops renewing. Like Consul's
//! TTL checks, an expired lease removes the endpoint; the time is passed in so
//! the rules are tested without a clock.
//!
//! Leases survive a restart through [`Registry::export`] and
//! [`Registry::import`]: an expiry is an `Instant`, meaningless in another
//! process, so it is stored as wall-clock time and turned back into the TTL
//! left (never more than the lease's TTL, should the clock have jumped).
//!
//! Replicas sharing an etcd (feature `etcd`, `replica.rs`) keep no leases of
//! their own: each registration is an etcd key attached to an etcd lease,
//! and every replica mirrors the keys it watches into a registry of entries
//! without a local expiry ([`Registry::mirror`]); etcd deletes a key when
//! its lease ends, and the watch removes the entry. The rules about who may
//! register what ([`Registry::check`]) are the same either way.
//!
//! # Who may renew or delete a lease
//!
//! With a CA, registration is authenticated and a lease belongs to the
//! identity that made it: only that identity may renew or delete it.
//! Without a CA there is no identity, so each lease gets a secret instead,
//! returned once in the registration's answer (`lease_secret`, 256 random
//! bits as hex) and required, in the `X-Lease-Secret` header, to renew or
//! delete it; it is compared in constant time. A lease id alone (it is
//! short, counted and shown in logs) never suffices, and no error body
//! names another registration's lease id. The secret is stored with the
//! lease (data directory, mode 0600; etcd), so a restart keeps it.
//!
//! A lease stored by an older mesh-control has neither an owner nor a
//! secret. Nobody can prove it is theirs, so it is neither renewable nor
//! deletable: it keeps serving its endpoint for the time it has left (at
//! most [`MAX_TTL`]), a renewal answers 404 (the workload registers again,
//! as after a restart without a data directory), and a new registration of
//! exactly the same endpoint (service, namespace, address, port) takes its
//! place, so the endpoint never leaves EDS. Taking over such a lease gives
//! nothing a registration could not: without a CA anyone may register.
//!
//! # Limits
//!
//! What one registration may hold is bounded (labels, their sizes, names;
//! see the constants below), and so is the number of leases one identity
//! holds ([`crate::config::MeshOptions::max_leases_per_identity`]): a
//! leaked join token can fill neither the memory nor the EDS of the mesh.
//! An address must be one clients can dial: unicast, not unspecified,
//! multicast or broadcast; a link-local address (169.254.0.0/16,
//! fe80::/10, where cloud metadata services live) only with
//! [`crate::config::MeshOptions::allow_link_local_endpoints`].

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mesh_core::model::{Locality, Protocol};
use mesh_core::spiffe::SpiffeId;
use serde::{Deserialize, Serialize};

use crate::config::Registration;
use crate::persist::{StoredLease, StoredLeases};

/// Longest lease a workload may ask for; a dead workload must not linger for long.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(300);

/// Most labels one registration may carry.
pub(crate) const MAX_LABELS: usize = 64;

/// Longest label key: a Kubernetes qualified name (a DNS subdomain prefix
/// of 253, a slash, a name of 63).
pub(crate) const MAX_LABEL_KEY: usize = 317;

/// Longest label value.
pub(crate) const MAX_LABEL_VALUE: usize = 256;

/// Longest service name: a DNS name.
pub(crate) const MAX_SERVICE_NAME: usize = 253;

/// Longest node id and locality.
pub(crate) const MAX_NODE_ID: usize = 256;

/// The header that carries a lease's secret (see the module docs).
pub(crate) const LEASE_SECRET_HEADER: &str = "x-lease-secret";

/// A lease's secret (see the module docs): never printed.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct LeaseSecret(Box<str>);

impl LeaseSecret {
    /// 256 random bits, as 64 hex digits.
    pub(crate) fn generate() -> LeaseSecret {
        let bytes: [u8; 32] = rand::random();
        LeaseSecret(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// A stored secret, checked to be one this server could have made.
    fn from_stored(s: &str) -> Result<LeaseSecret, String> {
        if s.len() < 32 || s.len() > 128 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("its secret is not 32 to 128 hex digits".into());
        }
        Ok(LeaseSecret(s.into()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this secret; the time taken depends only on the
    /// lengths.
    pub(crate) fn matches(&self, given: &str) -> bool {
        crate::ca::constant_time_eq(self.0.as_bytes(), given.trim().as_bytes())
    }
}

impl std::fmt::Debug for LeaseSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseSecret(redacted)")
    }
}

/// Who may change a lease: its owner (authenticated registration) or the
/// holder of its secret (open registration); neither for a lease stored
/// by an older mesh-control (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseKeeper {
    pub(crate) owner: Option<SpiffeId>,
    pub(crate) secret: Option<LeaseSecret>,
}

/// Why a caller may not renew or delete a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeeperRefusal {
    /// Another identity registered it, or the secret is missing or wrong
    /// (a 403 with this message).
    Forbidden(String),
    /// A lease without owner or secret (stored by an older mesh-control):
    /// nobody may change it; it ends with its TTL.
    Legacy,
}

impl LeaseKeeper {
    /// Whether `caller` (its authenticated identity) holding `secret` (the
    /// `X-Lease-Secret` header) may renew or delete the lease. The
    /// messages name no lease id.
    pub(crate) fn permits(
        &self,
        caller: Option<&SpiffeId>,
        secret: Option<&str>,
    ) -> Result<(), KeeperRefusal> {
        match (&self.owner, &self.secret) {
            (Some(owner), _) if Some(owner) == caller => Ok(()),
            (Some(owner), _) => Err(KeeperRefusal::Forbidden(format!(
                "this lease was registered by {owner}; {} may not change it",
                caller.map_or_else(
                    || "an unauthenticated caller".to_string(),
                    |c| c.to_string()
                )
            ))),
            (None, Some(known)) => match secret {
                Some(given) if known.matches(given) => Ok(()),
                Some(_) => Err(KeeperRefusal::Forbidden(
                    "the X-Lease-Secret header does not match this lease's secret".into(),
                )),
                None => Err(KeeperRefusal::Forbidden(
                    "renewing or deleting a lease needs its secret: send the lease_secret of \
                     the registration's answer in an X-Lease-Secret header"
                        .into(),
                )),
            },
            (None, None) => Err(KeeperRefusal::Legacy),
        }
    }
}

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
    /// The secret that renews and deletes this lease (open registration
    /// only; see the module docs): in the answer once, never again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) lease_secret: Option<String>,
}

#[derive(Debug, Clone)]
struct Entry {
    registered: Registered,
    /// Set for a lease registered without an identity.
    secret: Option<LeaseSecret>,
    ttl: Duration,
    /// `None` for a mirrored entry: etcd ends it, not this process.
    expires: Option<Instant>,
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

    /// How many leases `owner` holds.
    pub(crate) fn leases_of(&self, owner: &SpiffeId) -> usize {
        self.leases
            .values()
            .filter(|e| e.registered.owner.as_ref() == Some(owner))
            .count()
    }

    /// Records a validated registration made by its `owner` (None when
    /// registration is open, and the lease then gets a secret). Refused as
    /// [`Registry::check`] refuses; it replaces a lease of exactly the
    /// same endpoint stored by an older mesh-control (see the module docs).
    pub(crate) fn insert(
        &mut self,
        registered: Registered,
        ttl_seconds: u64,
        now: Instant,
        lease_salt: u64,
    ) -> Result<Lease, String> {
        let ttl = lease_ttl(ttl_seconds)?;
        let r = &registered.registration;
        self.leases.retain(|_, e| {
            let old = &e.registered.registration;
            let legacy = e.registered.owner.is_none() && e.secret.is_none() && e.expires.is_some();
            !(legacy
                && old.service == r.service
                && old.namespace == r.namespace
                && old.address == r.address
                && old.port == r.port)
        });
        self.check(&registered)?;
        self.next_id += 1;
        let lease_id = format!("{:x}-{:x}", self.next_id, lease_salt & 0xffff_ffff);
        let secret = registered.owner.is_none().then(LeaseSecret::generate);
        let lease_secret = secret.as_ref().map(|s| s.as_str().to_string());
        self.leases.insert(
            lease_id.clone(),
            Entry {
                registered,
                secret,
                ttl,
                expires: Some(now + ttl),
            },
        );
        Ok(Lease {
            lease_id,
            ttl_seconds: ttl.as_secs(),
            lease_secret,
        })
    }

    /// Whether `registered` may join the registrations: refused when the
    /// same endpoint of the same service is registered already, or when
    /// another identity registered its ip:port (one workload may back
    /// several services on one port; two workloads cannot share an
    /// address). The error is the 409 message (it says "already
    /// registered").
    pub(crate) fn check(&self, registered: &Registered) -> Result<(), String> {
        let registration = &registered.registration;
        let owner = &registered.owner;
        let same_address = |e: &Entry| {
            let r = &e.registered.registration;
            r.address == registration.address && r.port == registration.port
        };
        // One pass, no sort and no allocation: this runs under the registry
        // lock for every registration of a storm.
        let entries = || self.leases.iter();
        // The messages name no lease id: an id is how a lease is renewed
        // and deleted, and must not be handed to whoever asks.
        if entries().any(|(_, e)| {
            let r = &e.registered.registration;
            same_address(e)
                && r.service == registration.service
                && r.namespace == registration.namespace
        }) {
            return Err(format!(
                "{}:{} is already registered for service {:?}; renew or delete the lease of \
                 that registration, or wait for it to expire",
                registration.address, registration.port, registration.service
            ));
        }
        if let Some((_, e)) =
            entries().find(|(_, e)| same_address(e) && e.registered.owner != *owner)
        {
            return Err(format!(
                "{}:{} is already registered by {} (service {:?}); two workloads cannot \
                 share an address",
                registration.address,
                registration.port,
                e.registered.owner.as_ref().map_or_else(
                    || "an unauthenticated workload".to_string(),
                    |o| o.to_string()
                ),
                e.registered.registration.service
            ));
        }
        Ok(())
    }

    /// Who registered a lease: `None` when the lease is unknown,
    /// `Some(None)` when it was registered without authentication.
    #[cfg(test)]
    pub(crate) fn owner(&self, lease_id: &str) -> Option<Option<&SpiffeId>> {
        self.leases
            .get(lease_id)
            .map(|e| e.registered.owner.as_ref())
    }

    /// Who may change a lease (see [`LeaseKeeper`]); `None` when unknown.
    pub(crate) fn keeper(&self, lease_id: &str) -> Option<LeaseKeeper> {
        self.leases.get(lease_id).map(|e| LeaseKeeper {
            owner: e.registered.owner.clone(),
            secret: e.secret.clone(),
        })
    }

    /// Extends a lease by its TTL. False when unknown (expired or deleted).
    pub(crate) fn renew(&mut self, lease_id: &str, now: Instant) -> bool {
        match self.leases.get_mut(lease_id) {
            Some(e) => {
                if e.expires.is_some() {
                    e.expires = Some(now + e.ttl);
                }
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
        self.leases.retain(|_, e| e.expires.is_none_or(|t| t > now));
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

    /// The live leases, to persist: expiries as wall-clock time (`now` and
    /// `wall` are the same moment on both clocks).
    pub(crate) fn export(&self, now: Instant, wall: SystemTime) -> StoredLeases {
        let mut leases: Vec<StoredLease> = self
            .leases
            .iter()
            .map(|(id, e)| {
                let left = e
                    .expires
                    .map_or(e.ttl, |t| t.saturating_duration_since(now));
                let mut stored = to_stored(id, &e.registered, e.secret.as_ref(), e.ttl);
                stored.expires_unix_ms = unix_ms(wall.checked_add(left).unwrap_or(wall));
                stored
            })
            .collect();
        leases.sort_by(|a, b| a.lease_id.cmp(&b.lease_id));
        StoredLeases {
            format: crate::persist::format(),
            next_id: self.next_id,
            leases,
        }
    }

    /// The registry `stored` describes, at `now` (`wall` on the wall
    /// clock): each lease with the time it has left; one expired since is
    /// dropped. A lease that does not validate (a damaged file) is left out
    /// and named in the returned problems.
    pub(crate) fn import(
        stored: &StoredLeases,
        now: Instant,
        wall: SystemTime,
    ) -> (Registry, Vec<String>) {
        let wall_ms = unix_ms(wall);
        let mut registry = Registry {
            leases: HashMap::new(),
            next_id: stored.next_id,
        };
        let mut problems = Vec::new();
        for lease in &stored.leases {
            let Some(left) = lease
                .expires_unix_ms
                .checked_sub(wall_ms)
                .filter(|l| *l > 0)
            else {
                continue;
            };
            let (registered, secret, ttl) = match from_stored(lease) {
                Ok(decoded) => decoded,
                Err(e) => {
                    problems.push(format!("lease {}: {e}", lease.lease_id));
                    continue;
                }
            };
            registry.leases.insert(
                lease.lease_id.clone(),
                Entry {
                    registered,
                    secret,
                    ttl,
                    expires: Some(now + Duration::from_millis(left).min(ttl)),
                },
            );
        }
        (registry, problems)
    }

    /// A registry mirroring registrations another store keeps (etcd): each
    /// `(lease id, registration)` as it is stored, with no local expiry.
    /// One that does not validate is left out and named in the returned
    /// problems; the first of two for one endpoint wins, as
    /// [`Registry::check`] would have refused the second.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(crate) fn mirror<'a>(
        stored: impl IntoIterator<Item = (&'a str, &'a StoredLease)>,
    ) -> (Registry, Vec<String>) {
        let mut registry = Registry::default();
        let mut problems = Vec::new();
        for (lease_id, lease) in stored {
            let (registered, secret, ttl) = match from_stored(lease) {
                Ok(decoded) => decoded,
                Err(e) => {
                    problems.push(format!("lease {lease_id}: {e}"));
                    continue;
                }
            };
            if let Err(e) = registry.check(&registered) {
                problems.push(format!("lease {lease_id}: {e}"));
                continue;
            }
            registry.leases.insert(
                lease_id.to_string(),
                Entry {
                    registered,
                    secret,
                    ttl,
                    expires: None,
                },
            );
        }
        (registry, problems)
    }
}

/// A lease's TTL as asked for: at least a second, at most [`MAX_TTL`].
pub(crate) fn lease_ttl(ttl_seconds: u64) -> Result<Duration, String> {
    if ttl_seconds == 0 {
        return Err("ttl_seconds must be at least 1".into());
    }
    Ok(Duration::from_secs(ttl_seconds).min(MAX_TTL))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A registration as it is stored, with its lease's secret (the expiry left
/// at 0: a data directory sets it, etcd keeps its own).
pub(crate) fn to_stored(
    lease_id: &str,
    registered: &Registered,
    secret: Option<&LeaseSecret>,
    ttl: Duration,
) -> StoredLease {
    let r = &registered.registration;
    StoredLease {
        lease_id: lease_id.to_string(),
        service: r.service.clone(),
        namespace: r.namespace.clone(),
        address: r.address.to_string(),
        port: r.port,
        service_port: r.service_port,
        protocol: r.protocol.map(|p| {
            match p {
                Protocol::Http1 => "HTTP",
                Protocol::Http2 => "HTTP2",
                Protocol::Grpc => "GRPC",
            }
            .to_string()
        }),
        labels: r.labels.clone(),
        locality: locality_string(&r.locality),
        owner: registered.owner.as_ref().map(|o| o.to_string()),
        secret: secret.map(|s| s.as_str().to_string()),
        node_id: registered.node_id.clone(),
        ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
        expires_unix_ms: 0,
    }
}

/// A stored registration, validated as a new one would be (but for a
/// link-local address, accepted when it was registered), its lease's
/// secret and its TTL (at most [`MAX_TTL`]).
fn from_stored(lease: &StoredLease) -> Result<(Registered, Option<LeaseSecret>, Duration), String> {
    let ttl = Duration::from_millis(lease.ttl_ms).min(MAX_TTL);
    let owner = match lease.owner.as_deref().map(SpiffeId::parse) {
        None => None,
        Some(Ok(owner)) => Some(owner),
        Some(Err(e)) => return Err(format!("owner: {e}")),
    };
    let secret = lease
        .secret
        .as_deref()
        .map(LeaseSecret::from_stored)
        .transpose()?;
    let request = RegisterRequest {
        service: lease.service.clone(),
        namespace: Some(lease.namespace.clone()),
        address: lease.address.clone(),
        port: lease.port,
        service_port: lease.service_port,
        protocol: lease.protocol.clone(),
        labels: lease.labels.clone(),
        locality: Some(lease.locality.clone()),
        ttl_seconds: ttl.as_secs().max(1),
        node_id: lease.node_id.clone(),
    };
    let registration = validate_with(request, true)?;
    Ok((
        Registered {
            registration,
            owner,
            node_id: lease.node_id.clone(),
        },
        secret,
        ttl,
    ))
}

/// `region/zone/subzone` (what a registration's `locality` says).
fn locality_string(l: &Locality) -> String {
    if l.region.is_empty() && l.zone.is_empty() && l.sub_zone.is_empty() {
        return String::new();
    }
    format!("{}/{}/{}", l.region, l.zone, l.sub_zone)
}

/// Checks a registration request as the admin API does by default (a
/// link-local address refused); errors are the 400 message.
pub(crate) fn validate(req: RegisterRequest) -> Result<Registration, String> {
    validate_with(req, false)
}

/// Whether `namespace` is a DNS-1123 label, as Kubernetes namespaces are:
/// 1 to 63 lowercase letters, digits and '-', starting and ending with a
/// letter or digit (so `../x` or `a/b` never reach a path, a key or a
/// SPIFFE ID).
pub(crate) fn is_dns1123_label(namespace: &str) -> bool {
    let bytes = namespace.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    (1..=63).contains(&bytes.len())
        && bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Why `address` cannot be an endpoint, if it cannot: clients must be able
/// to dial it, and it must not point them at the host they run on in
/// disguise (a link-local address is where cloud metadata services answer,
/// 169.254.169.254), unless `allow_link_local`.
fn address_problem(address: IpAddr, allow_link_local: bool) -> Option<&'static str> {
    // `::ffff:169.254.169.254` is 169.254.169.254.
    let address = address.to_canonical();
    let link_local = "is link-local (169.254.0.0/16, fe80::/10: the address of cloud metadata \
                      services among others); mesh-control refuses it unless started with \
                      --allow-link-local-endpoints";
    match address {
        IpAddr::V4(v4) => {
            if v4.is_unspecified() || v4.octets()[0] == 0 {
                Some("is unspecified (0.0.0.0/8); register the address clients should dial")
            } else if v4.is_broadcast() {
                Some("is the broadcast address")
            } else if v4.is_multicast() {
                Some("is multicast (224.0.0.0/4); an endpoint needs a unicast address")
            } else if (240..=254).contains(&v4.octets()[0]) {
                Some("is reserved (240.0.0.0/4)")
            } else if v4.is_link_local() && !allow_link_local {
                Some(link_local)
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            if v6.is_unspecified() {
                Some("is unspecified (::); register the address clients should dial")
            } else if v6.is_multicast() {
                Some("is multicast (ff00::/8); an endpoint needs a unicast address")
            } else if (first & 0xffc0) == 0xfe80 && !allow_link_local {
                Some(link_local)
            } else {
                None
            }
        }
    }
}

/// Checks a registration request (see "Limits" in the module docs);
/// errors are the 400 message.
pub(crate) fn validate_with(
    req: RegisterRequest,
    allow_link_local: bool,
) -> Result<Registration, String> {
    if req.service.is_empty() {
        return Err("service must not be empty".into());
    }
    if req.service.len() > MAX_SERVICE_NAME {
        return Err(format!(
            "service name is {} bytes long; at most {MAX_SERVICE_NAME} (a DNS name) are allowed",
            req.service.len()
        ));
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
    if req.service.starts_with('.') || req.service.ends_with('.') || req.service.contains("..") {
        return Err(format!(
            "service {:?}: a name has no empty labels (no leading, trailing or double '.')",
            req.service
        ));
    }
    let namespace = req
        .namespace
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    if !is_dns1123_label(&namespace) {
        return Err(format!(
            "namespace {:?} is not a DNS-1123 label: 1 to 63 lowercase letters, digits and \
             '-', starting and ending with a letter or digit",
            truncated(&namespace)
        ));
    }
    let address: IpAddr = req.address.parse().map_err(|_| {
        format!(
            "address {:?} is not an IP address (hostnames are not resolved)",
            truncated(&req.address)
        )
    })?;
    if let Some(problem) = address_problem(address, allow_link_local) {
        return Err(format!("address {address} {problem}"));
    }
    if req.port == 0 {
        return Err("port must be between 1 and 65535".into());
    }
    if req.service_port == Some(0) {
        return Err("service_port must be between 1 and 65535".into());
    }
    if req.labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels; a registration carries at most {MAX_LABELS}",
            req.labels.len()
        ));
    }
    for (key, value) in &req.labels {
        if key.is_empty() || key.len() > MAX_LABEL_KEY {
            return Err(format!(
                "label key {:?}: 1 to {MAX_LABEL_KEY} bytes are allowed",
                truncated(key)
            ));
        }
        if value.len() > MAX_LABEL_VALUE {
            return Err(format!(
                "the value of label {:?} is {} bytes long; at most {MAX_LABEL_VALUE} are allowed",
                truncated(key),
                value.len()
            ));
        }
        if key.chars().chain(value.chars()).any(char::is_control) {
            return Err(format!(
                "label {:?}: control characters are not allowed",
                truncated(key)
            ));
        }
    }
    if req
        .node_id
        .as_ref()
        .is_some_and(|id| id.len() > MAX_NODE_ID)
    {
        return Err(format!("node_id: at most {MAX_NODE_ID} bytes are allowed"));
    }
    if req.locality.as_ref().is_some_and(|l| l.len() > MAX_NODE_ID) {
        return Err(format!("locality: at most {MAX_NODE_ID} bytes are allowed"));
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
                "protocol {:?} is not supported; use HTTP, HTTP2 or GRPC",
                truncated(other)
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
        namespace,
        address,
        port: req.port,
        service_port: req.service_port,
        protocol,
        labels: req.labels,
        locality,
    })
}

/// At most 64 characters of `s`, for messages quoting input.
fn truncated(s: &str) -> String {
    match s.char_indices().nth(64) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
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

    #[test]
    fn leases_survive_an_export_and_import_with_the_time_they_have_left() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut r = Registry::default();
        let owner = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/catalog").unwrap();
        let mut request = req(1000, 30);
        request.node_id = Some("catalog-1".into());
        let registered = Registered {
            node_id: request.node_id.clone(),
            registration: validate(request).unwrap(),
            owner: Some(owner.clone()),
        };
        let lease = r.insert(registered.clone(), 30, t0, 7).unwrap();
        let short = r.register(req(1001, 2), t0, 8).unwrap();
        let stored = r.export(t0 + Duration::from_secs(10), wall);
        assert_eq!(stored.leases.len(), 2);

        // Restarted 5 s later (another process: another Instant origin).
        let t1 = Instant::now() + Duration::from_secs(100);
        let (mut back, problems) = Registry::import(&stored, t1, wall + Duration::from_secs(5));
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(
            back.registered(),
            vec![registered],
            "the expired one is gone"
        );
        assert_eq!(back.owner(&lease.lease_id), Some(Some(&owner)));
        assert_eq!(back.owner(&short.lease_id), None);
        // 30 - 10 - 5 = 15 s left: alive at 14.9 s, gone at 15.1 s.
        assert!(!back.expire(t1 + Duration::from_millis(14_900)));
        assert!(back.renew(&lease.lease_id, t1), "the same lease renews");
        assert!(!back.expire(t1 + Duration::from_millis(29_900)));
        assert!(back.expire(t1 + Duration::from_millis(30_100)));
        // Lease ids go on from where they were.
        let next = back.register(req(1002, 5), t1, 9).unwrap();
        assert!(next.lease_id.starts_with("3-"), "{}", next.lease_id);
    }

    #[test]
    fn a_mirror_has_no_expiry_of_its_own_and_keeps_the_first_of_two_claims() {
        let t0 = Instant::now();
        let owner =
            |sa: &str| SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap();
        let registered = |sa: &str| Registered {
            registration: validate(req(1000, 5)).unwrap(),
            owner: Some(owner(sa)),
            node_id: None,
        };
        let catalog = to_stored("1a", &registered("catalog"), None, Duration::from_secs(5));
        let intruder = to_stored("1b", &registered("intruder"), None, Duration::from_secs(5));
        let mut broken = catalog.clone();
        broken.address = "nowhere".into();
        let (mut mirror, problems) =
            Registry::mirror([("1a", &catalog), ("1b", &intruder), ("1c", &broken)]);
        assert_eq!(mirror.registered(), vec![registered("catalog")]);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("lease 1b: "), "{problems:?}");
        assert!(problems[1].contains("not an IP address"), "{problems:?}");
        assert!(
            !mirror.expire(t0 + Duration::from_secs(3600)),
            "etcd ends mirrored leases, not time here"
        );
        assert!(
            mirror.renew("1a", t0),
            "a renewal of a mirrored lease is etcd's"
        );
        assert_eq!(lease_ttl(0).unwrap_err(), "ttl_seconds must be at least 1");
        assert_eq!(lease_ttl(3600).unwrap(), MAX_TTL);
    }

    #[test]
    fn an_open_lease_has_a_secret_that_survives_an_export_and_a_legacy_one_is_frozen() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut r = Registry::default();
        let lease = r.register(req(1000, 30), t0, 1).unwrap();
        let secret = lease
            .lease_secret
            .clone()
            .expect("an open lease has a secret");
        assert_eq!(secret.len(), 64);
        let keeper = r.keeper(&lease.lease_id).unwrap();
        assert_eq!(keeper.permits(None, Some(&secret)), Ok(()));
        assert!(matches!(
            keeper.permits(None, None),
            Err(KeeperRefusal::Forbidden(m)) if m.contains("X-Lease-Secret")
        ));
        assert!(matches!(
            keeper.permits(None, Some("0123")),
            Err(KeeperRefusal::Forbidden(_))
        ));
        assert!(!format!("{keeper:?}").contains(&secret), "redacted");

        // Kept across a restart.
        let mut stored = r.export(t0, wall);
        assert_eq!(stored.leases[0].secret.as_deref(), Some(secret.as_str()));
        let (back, problems) = Registry::import(&stored, t0, wall);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(back.keeper(&lease.lease_id), Some(keeper));

        // Stored by an older mesh-control: no owner, no secret. Nobody may
        // change it; the same endpoint registered again replaces it.
        stored.leases[0].secret = None;
        let (mut back, _) = Registry::import(&stored, t0, wall);
        let legacy = back.keeper(&lease.lease_id).unwrap();
        assert_eq!(
            legacy.permits(None, Some(&secret)),
            Err(KeeperRefusal::Legacy)
        );
        let other_port = back.register(req(1001, 30), t0, 2).unwrap();
        assert_eq!(back.registrations().len(), 2, "another endpoint is added");
        let fresh = back.register(req(1000, 30), t0, 3).unwrap();
        assert!(back.keeper(&lease.lease_id).is_none(), "replaced");
        assert!(back.keeper(&fresh.lease_id).unwrap().secret.is_some());
        assert!(back.keeper(&other_port.lease_id).is_some());
        assert_eq!(back.registrations().len(), 2);

        // A stored secret that is not one is a damaged lease.
        stored.leases[0].secret = Some("not hex".into());
        let (_, problems) = Registry::import(&stored, t0, wall);
        assert!(problems[0].contains("secret"), "{problems:?}");

        // An authenticated lease has no secret: its owner is the proof.
        let owner = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/catalog").unwrap();
        let registered = Registered {
            registration: validate(req(1002, 5)).unwrap(),
            owner: Some(owner.clone()),
            node_id: None,
        };
        let owned = r.insert(registered, 5, t0, 4).unwrap();
        assert_eq!(owned.lease_secret, None);
        assert_eq!(r.leases_of(&owner), 1);
        let keeper = r.keeper(&owned.lease_id).unwrap();
        assert_eq!(keeper.permits(Some(&owner), None), Ok(()));
        assert!(keeper.permits(None, Some(&secret)).is_err());
    }

    #[test]
    fn addresses_namespaces_and_sizes_are_checked() {
        let check = |f: &dyn Fn(&mut RegisterRequest)| {
            let mut r = req(1000, 5);
            f(&mut r);
            validate(r)
        };
        for (address, why) in [
            ("169.254.169.254", "link-local"),
            ("::ffff:169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("240.0.0.1", "reserved"),
        ] {
            let e = check(&|r| r.address = address.into()).unwrap_err();
            assert!(e.contains(why), "{address}: {e}");
        }
        for ok in ["10.0.0.1", "127.0.0.1", "::1", "2001:db8::1", "fd00::1"] {
            assert!(check(&|r| r.address = ok.into()).is_ok(), "{ok}");
        }
        let mut r = req(1000, 5);
        r.address = "169.254.1.1".into();
        assert!(validate_with(r, true).is_ok(), "allowed by the flag");
        for ns in ["../x", "Shop", "-a", "a-", "a.b", &"a".repeat(64)] {
            let e = check(&|r| r.namespace = Some(ns.into())).unwrap_err();
            assert!(e.contains("DNS-1123"), "{ns}: {e}");
        }
        assert!(check(&|r| r.namespace = Some("a-1".into())).is_ok());
        let e = check(&|r| {
            r.labels = (0..65).map(|i| (format!("k{i}"), "v".into())).collect();
        })
        .unwrap_err();
        assert!(e.contains("at most 64"), "{e}");
        let e = check(&|r| {
            r.labels = BTreeMap::from([("k".into(), "v".repeat(257))]);
        })
        .unwrap_err();
        assert!(e.contains("at most 256"), "{e}");
        let e = check(&|r| {
            r.labels = BTreeMap::from([("k".repeat(318), "v".into())]);
        })
        .unwrap_err();
        assert!(e.contains("label key"), "{e}");
        assert!(e.len() < 300, "input is quoted truncated: {e}");
        let e = check(&|r| r.service = "a..b".into()).unwrap_err();
        assert!(e.contains("empty labels"), "{e}");
        let e = check(&|r| r.service = "s".repeat(254)).unwrap_err();
        assert!(e.contains("at most 253"), "{e}");
    }

    #[test]
    fn an_imported_lease_never_outlives_its_ttl_and_a_damaged_one_is_named() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut r = Registry::default();
        r.register(req(1000, 10), t0, 1).unwrap();
        let mut stored = r.export(t0, wall);
        // The wall clock went back an hour between the runs.
        let (mut back, _) = Registry::import(&stored, t0, wall - Duration::from_secs(3600));
        assert!(
            back.expire(t0 + Duration::from_millis(10_100)),
            "at most its TTL"
        );

        stored.leases[0].address = "not an ip".into();
        let (back, problems) = Registry::import(&stored, t0, wall);
        assert!(back.registrations().is_empty());
        assert!(problems[0].contains("not an IP address"), "{problems:?}");
    }
}

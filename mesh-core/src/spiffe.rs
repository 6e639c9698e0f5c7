//! SPIFFE IDs: the identity every workload of the mesh has.
//!
//! A workload's identity is the URI `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`,
//! carried as the URI subject alternative name of its X.509-SVID, which is the
//! form Istio issues (and what its AuthorizationPolicy `principals` match, with
//! the `spiffe://` scheme left off). The parser follows the SPIFFE ID
//! specification (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>):
//! lower-case scheme and trust domain of `[a-z0-9.-_]`, path segments of
//! `[A-Za-z0-9.-_]` that are neither empty nor `.` / `..`, no query, fragment,
//! port or user info, at most 2048 bytes. On top of that it requires Istio's
//! path shape, `/ns/<namespace>/sa/<service-account>`, because namespace and
//! service account are what authorization and the CA reason about.
//!
//! A [`SpiffeId`] is immutable and cheap to clone (one `Arc<str>`), so it can
//! be put into every request's extensions.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use crate::Error;

/// The URI scheme prefix of every SPIFFE ID.
pub const SCHEME_PREFIX: &str = "spiffe://";

/// The longest SPIFFE ID the specification allows, in bytes.
pub const MAX_LEN: usize = 2048;

/// The longest trust domain the specification allows, in bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// A validated SPIFFE ID of Istio's shape,
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// ```
/// use mesh_core::spiffe::SpiffeId;
///
/// let id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/catalog".parse()?;
/// assert_eq!(id.trust_domain(), "cluster.local");
/// assert_eq!(id.namespace(), "shop");
/// assert_eq!(id.service_account(), "catalog");
/// assert_eq!(id.principal(), "cluster.local/ns/shop/sa/catalog");
/// # Ok::<(), mesh_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole URI.
    uri: Arc<str>,
    /// End of the trust domain in `uri`.
    td_end: usize,
    /// Start and end of the namespace in `uri`.
    ns: (usize, usize),
    /// Start of the service account in `uri` (it runs to the end).
    sa_start: usize,
}

impl SpiffeId {
    /// Parses and validates a SPIFFE ID URI.
    pub fn parse(uri: &str) -> Result<SpiffeId, Error> {
        let fail = |why: &str| Err(Error::invalid(format!("SPIFFE ID {uri:?}: {why}")));
        if uri.len() > MAX_LEN {
            return fail("longer than 2048 bytes");
        }
        let Some(rest) = uri.strip_prefix(SCHEME_PREFIX) else {
            return fail("must start with \"spiffe://\" (lower case)");
        };
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if let Err(why) = check_trust_domain(trust_domain) {
            return fail(&why);
        }
        if path.contains(['?', '#']) {
            return fail("must not have a query or fragment");
        }
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        let [ns_key, namespace, sa_key, service_account] = segments.as_slice() else {
            return fail("the path must be /ns/<namespace>/sa/<service-account>");
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return fail("the path must be /ns/<namespace>/sa/<service-account>");
        }
        for (what, segment) in [
            ("namespace", namespace),
            ("service account", service_account),
        ] {
            if let Err(why) = check_segment(segment) {
                return fail(&format!("{what}: {why}"));
            }
        }
        let td_end = SCHEME_PREFIX.len() + trust_domain.len();
        let ns_start = td_end + "/ns/".len();
        let ns_end = ns_start + namespace.len();
        Ok(SpiffeId {
            uri: Arc::from(uri),
            td_end,
            ns: (ns_start, ns_end),
            sa_start: ns_end + "/sa/".len(),
        })
    }

    /// Builds `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`,
    /// validating each part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, Error> {
        // Validate the parts one by one first, so a `/` inside a part cannot
        // shift the path into another valid shape.
        check_trust_domain(trust_domain)
            .map_err(|why| Error::invalid(format!("trust domain {trust_domain:?}: {why}")))?;
        check_segment(namespace)
            .map_err(|why| Error::invalid(format!("namespace {namespace:?}: {why}")))?;
        check_segment(service_account)
            .map_err(|why| Error::invalid(format!("service account {service_account:?}: {why}")))?;
        SpiffeId::parse(&format!(
            "{SCHEME_PREFIX}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    /// The trust domain (`cluster.local`).
    pub fn trust_domain(&self) -> &str {
        self.uri
            .get(SCHEME_PREFIX.len()..self.td_end)
            .unwrap_or_default()
    }

    /// The namespace (`shop`).
    pub fn namespace(&self) -> &str {
        self.uri.get(self.ns.0..self.ns.1).unwrap_or_default()
    }

    /// The service account (`catalog`).
    pub fn service_account(&self) -> &str {
        self.uri.get(self.sa_start..).unwrap_or_default()
    }

    /// The whole URI (`spiffe://cluster.local/ns/shop/sa/catalog`).
    pub fn as_str(&self) -> &str {
        &self.uri
    }

    /// The whole URI as the shared string this ID holds: a caller that
    /// keeps the URI (telemetry labels, per request) clones it instead of
    /// allocating a copy.
    pub fn uri(&self) -> &Arc<str> {
        &self.uri
    }

    /// The ID without the scheme, as Istio's AuthorizationPolicy writes
    /// principals (`cluster.local/ns/shop/sa/catalog`).
    pub fn principal(&self) -> &str {
        self.uri.get(SCHEME_PREFIX.len()..).unwrap_or_default()
    }
}

/// Checks a trust domain: 1 to 255 bytes of `[a-z0-9.-_]`.
fn check_trust_domain(td: &str) -> Result<(), String> {
    if td.is_empty() {
        return Err("the trust domain is empty".into());
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err("the trust domain is longer than 255 bytes".into());
    }
    if let Some(c) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(format!(
            "the trust domain has {c:?}; only lower-case letters, digits, '.', '-' and '_' are \
             allowed (no port, no user info)"
        ));
    }
    Ok(())
}

/// Checks one path segment: non-empty, not `.` or `..`, of `[A-Za-z0-9.-_]`.
fn check_segment(segment: &str) -> Result<(), String> {
    if segment.is_empty() {
        return Err("is empty".into());
    }
    if segment == "." || segment == ".." {
        return Err("must not be '.' or '..'".into());
    }
    if let Some(c) = segment
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(format!(
            "has {c:?}; only letters, digits, '.', '-' and '_' are allowed"
        ));
    }
    Ok(())
}

impl FromStr for SpiffeId {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SpiffeId::parse(s)
    }
}

impl TryFrom<&str> for SpiffeId {
    type Error = Error;

    fn try_from(s: &str) -> Result<Self, Self::Error> {
        SpiffeId::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({:?})", &*self.uri)
    }
}

impl AsRef<str> for SpiffeId {
    fn as_ref(&self) -> &str {
        &self.uri
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::ErrorKind;

    #[test]
    fn parts_of_a_valid_id() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/catalog").unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "shop");
        assert_eq!(id.service_account(), "catalog");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/catalog");
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/catalog");
        assert_eq!(
            SpiffeId::new("cluster.local", "shop", "catalog").unwrap(),
            id
        );
        assert_eq!(
            format!("{id:?}"),
            "SpiffeId(\"spiffe://cluster.local/ns/shop/sa/catalog\")"
        );
    }

    #[test]
    fn odd_but_valid_ids() {
        for uri in [
            "spiffe://a/ns/b/sa/c",
            "spiffe://my_td-1.example.org/ns/Team.A/sa/svc_account-2",
            "spiffe://td/ns/ns/sa/sa",
            "spiffe://td/ns/.../sa/..a",
        ] {
            let id = SpiffeId::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
            assert_eq!(id.as_str(), uri);
        }
    }

    #[test]
    fn invalid_ids_are_rejected_with_a_reason() {
        let cases = [
            ("", "must start with"),
            ("http://td/ns/a/sa/b", "must start with"),
            ("SPIFFE://td/ns/a/sa/b", "must start with"),
            ("spiffe:///ns/a/sa/b", "trust domain is empty"),
            ("spiffe://TD/ns/a/sa/b", "trust domain has 'T'"),
            ("spiffe://td:8080/ns/a/sa/b", "trust domain has ':'"),
            ("spiffe://user@td/ns/a/sa/b", "trust domain has '@'"),
            ("spiffe://td", "/ns/<namespace>/sa/<service-account>"),
            ("spiffe://td/", "/ns/<namespace>/sa/<service-account>"),
            (
                "spiffe://td/workload",
                "/ns/<namespace>/sa/<service-account>",
            ),
            (
                "spiffe://td/ns/a/sa/b/c",
                "/ns/<namespace>/sa/<service-account>",
            ),
            (
                "spiffe://td/ns/a/sa/b/",
                "/ns/<namespace>/sa/<service-account>",
            ),
            (
                "spiffe://td/sa/a/ns/b",
                "/ns/<namespace>/sa/<service-account>",
            ),
            ("spiffe://td/ns//sa/b", "namespace: is empty"),
            ("spiffe://td/ns/a/sa/", "service account: is empty"),
            (
                "spiffe://td/ns/../sa/b",
                "namespace: must not be '.' or '..'",
            ),
            ("spiffe://td/ns/a/sa/.", "must not be '.' or '..'"),
            ("spiffe://td/ns/a b/sa/c", "namespace: has ' '"),
            ("spiffe://td/ns/a/sa/b?x=1", "query or fragment"),
            ("spiffe://td/ns/a/sa/b#f", "query or fragment"),
            ("spiffe://td/ns/a%20/sa/b", "has '%'"),
        ];
        for (uri, why) in cases {
            let err = SpiffeId::parse(uri).expect_err(uri);
            assert_eq!(err.kind(), ErrorKind::InvalidConfig);
            assert!(err.to_string().contains(why), "{uri}: {err}");
        }
        let long_td = "a".repeat(256);
        let err = SpiffeId::parse(&format!("spiffe://{long_td}/ns/a/sa/b")).unwrap_err();
        assert!(err.to_string().contains("longer than 255"), "{err}");
        let long = "a".repeat(2100);
        let err = SpiffeId::parse(&format!("spiffe://td/ns/a/sa/{long}")).unwrap_err();
        assert!(err.to_string().contains("longer than 2048"), "{err}");
    }

    #[test]
    fn new_rejects_parts_that_would_change_the_shape() {
        assert!(SpiffeId::new("td", "a/sa/b", "c").is_err());
        assert!(SpiffeId::new("td/ns/x", "a", "b").is_err());
        assert!(SpiffeId::new("td", "a", "b/c").is_err());
        let err = SpiffeId::new("td", "", "b").unwrap_err();
        assert!(err.to_string().starts_with("namespace \"\""), "{err}");
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(
            td in "[a-z0-9._-]{1,20}",
            ns in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,15}",
            sa in "[A-Za-z0-9_-][A-Za-z0-9._-]{0,15}",
        ) {
            let id = SpiffeId::new(&td, &ns, &sa).unwrap();
            prop_assert_eq!(id.trust_domain(), td.as_str());
            prop_assert_eq!(id.namespace(), ns.as_str());
            prop_assert_eq!(id.service_account(), sa.as_str());
            let again: SpiffeId = id.to_string().parse().unwrap();
            prop_assert_eq!(again, id);
        }

        #[test]
        fn parse_never_panics(s in "spiffe://[a-z/.]{0,12}(/ns/[a-z.]{0,3}(/sa/[a-z./]{0,4})?)?") {
            let _ = SpiffeId::parse(&s);
        }
    }
}

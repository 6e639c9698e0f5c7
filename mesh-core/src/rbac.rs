//! Authorization: Istio's AuthorizationPolicy, evaluated in-process.
//!
//! The model follows Istio's `security.istio.io/v1` AuthorizationPolicy
//! (<https://istio.io/latest/docs/reference/config/security/authorization-policy/>)
//! and its documented semantics
//! (<https://istio.io/latest/docs/concepts/security/#authorization-policy-precedence>):
//!
//! - A policy has an [`Action`] (ALLOW, DENY or AUDIT; CUSTOM, which calls an
//!   external authorizer, is not representable: the YAML front end reports it
//!   as unsupported) and a list of [`Rule`]s; the policy matches a request when
//!   any rule does. A policy without rules matches nothing (an ALLOW policy
//!   without rules therefore denies everything it selects); a rule without
//!   `from`, `to` and `when` matches everything.
//! - A rule matches when at least one of its `from` [`Source`]s, at least one
//!   of its `to` [`Operation`]s and all of its `when` [`Condition`]s match
//!   (an absent list matches anything).
//! - Inside a source or an operation every field that is set must match (AND);
//!   a field matches when the request's attribute is one of its values (OR),
//!   a `not` field when it is none of them. An attribute the request does not
//!   have (no peer identity on a plaintext connection, a missing header)
//!   matches no value, so it fails `principals` and passes `notPrincipals`:
//!   `DENY` with `notPrincipals: ["*"]` denies unauthenticated requests.
//! - String values use Istio's wildcards ([`StringMatch`]): exact, `prefix*`,
//!   `*suffix`, or `*` (any value, but the attribute must be present). Hosts
//!   compare case-insensitively, everything else case-sensitively.
//! - Precedence ([`evaluate`]): a matching DENY policy denies; otherwise, when
//!   there are ALLOW policies, the request is allowed only if one matches;
//!   without ALLOW policies it is allowed. AUDIT policies never change the
//!   decision; they mark the request for audit logging.
//!
//! Selecting which policies apply to a workload (root namespace, namespace,
//! `selector`) is the control plane's job; [`evaluate`] takes the policies that
//! apply. The same model converts to and from Envoy RBAC protos (gRFC A41) in
//! [`crate::rbac_xds`], so gRPC proxyless servers enforce the same policies.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::Arc;

use crate::Error;
use crate::name::Name;
use crate::spiffe::SpiffeId;

/// What a policy does with the requests it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Deny matching requests; evaluated before any ALLOW policy.
    Deny,
    /// Allow matching requests; when ALLOW policies exist, requests that
    /// match none of them are denied.
    Allow,
    /// Mark matching requests for audit logging; never changes the decision.
    Audit,
}

impl Action {
    /// Istio's spelling (`ALLOW`, `DENY`, `AUDIT`).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Deny => "DENY",
            Action::Allow => "ALLOW",
            Action::Audit => "AUDIT",
        }
    }

    /// Parses Istio's `action` field (absent means ALLOW, which callers
    /// handle). `CUSTOM` is reported as unsupported, never ignored.
    pub fn parse(s: &str) -> Result<Action, Error> {
        match s {
            "ALLOW" => Ok(Action::Allow),
            "DENY" => Ok(Action::Deny),
            "AUDIT" => Ok(Action::Audit),
            "CUSTOM" => Err(Error::unsupported(
                "action CUSTOM (an external authorizer) is not supported; use ALLOW, DENY or AUDIT",
            )),
            other => Err(Error::invalid(format!(
                "action {other:?} is not one of ALLOW, DENY, AUDIT"
            ))),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string value with Istio's wildcards: `abc` (exact), `abc*` (prefix),
/// `*abc` (suffix), or `*` (any value of a present attribute).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StringMatch {
    /// The whole value.
    Exact(Name),
    /// The value starts with this (written `abc*`).
    Prefix(Name),
    /// The value ends with this (written `*abc`).
    Suffix(Name),
    /// Any value (written `*`).
    Any,
}

impl StringMatch {
    /// Parses Istio's wildcard syntax. A `*` anywhere but at one end, or an
    /// empty string, is invalid.
    pub fn parse(s: &str) -> Result<StringMatch, Error> {
        if s.is_empty() {
            return Err(Error::invalid("an empty string matches nothing; remove it"));
        }
        if s == "*" {
            return Ok(StringMatch::Any);
        }
        let (m, inner) = if let Some(rest) = s.strip_suffix('*') {
            (StringMatch::Prefix(Name::from(rest)), rest)
        } else if let Some(rest) = s.strip_prefix('*') {
            (StringMatch::Suffix(Name::from(rest)), rest)
        } else {
            (StringMatch::Exact(Name::from(s)), s)
        };
        if inner.contains('*') {
            return Err(Error::invalid(format!(
                "{s:?}: a wildcard '*' is only allowed at the start or the end"
            )));
        }
        Ok(m)
    }

    /// Parses a path value: like [`StringMatch::parse`], but Istio's path
    /// templates (`/a/{*}/b`, `/a/{**}`) are reported as unsupported.
    pub fn parse_path(s: &str) -> Result<StringMatch, Error> {
        if s.contains("{*") {
            return Err(Error::unsupported(format!(
                "path {s:?}: path templates ({{*}}, {{**}}) are not supported"
            )));
        }
        StringMatch::parse(s)
    }

    /// Whether `value` matches (case-sensitive).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == &**s,
            StringMatch::Prefix(s) => value.starts_with(&**s),
            StringMatch::Suffix(s) => value.ends_with(&**s),
            StringMatch::Any => true,
        }
    }

    /// Whether `value` matches, ignoring ASCII case (hosts).
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        let v = value.as_bytes();
        match self {
            StringMatch::Exact(s) => v.eq_ignore_ascii_case(s.as_bytes()),
            StringMatch::Prefix(s) => v
                .get(..s.len())
                .is_some_and(|h| h.eq_ignore_ascii_case(s.as_bytes())),
            StringMatch::Suffix(s) => v
                .len()
                .checked_sub(s.len())
                .and_then(|start| v.get(start..))
                .is_some_and(|t| t.eq_ignore_ascii_case(s.as_bytes())),
            StringMatch::Any => true,
        }
    }
}

impl fmt::Display for StringMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StringMatch::Exact(s) => f.write_str(s),
            StringMatch::Prefix(s) => write!(f, "{s}*"),
            StringMatch::Suffix(s) => write!(f, "*{s}"),
            StringMatch::Any => f.write_str("*"),
        }
    }
}

impl FromStr for StringMatch {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StringMatch::parse(s)
    }
}

/// An IP address block: `10.0.0.0/16`, or a single address (`10.1.2.3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpBlock {
    addr: IpAddr,
    prefix_len: u8,
}

impl IpBlock {
    /// A block of `prefix_len` leading bits of `addr` (at most 32 for IPv4,
    /// 128 for IPv6). Host bits need not be zero, as in Envoy.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<IpBlock, Error> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return Err(Error::invalid(format!(
                "{addr}/{prefix_len}: the prefix length is at most {max}"
            )));
        }
        Ok(IpBlock { addr, prefix_len })
    }

    /// Parses `addr` or `addr/len` (Istio's `ipBlocks` syntax).
    pub fn parse(s: &str) -> Result<IpBlock, Error> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| Error::invalid(format!("{s:?} is not an IP address or CIDR block")))?;
        let prefix_len = match len {
            Some(len) => len
                .parse::<u8>()
                .map_err(|_| Error::invalid(format!("{s:?}: bad prefix length")))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        IpBlock::new(addr, prefix_len)
    }

    /// The address as written.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is in the block. An IPv4-mapped IPv6 address
    /// (`::ffff:10.1.2.3`, what a dual-stack socket reports) counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(block), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(block) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(block), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(block) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// Istio's `from.source`: who sends the request. Every field that is set
/// must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source {
    /// Peer identities, written without `spiffe://`
    /// (`cluster.local/ns/shop/sa/frontend`, `*/sa/frontend`, `*` = any
    /// authenticated peer).
    pub principals: Arc<[StringMatch]>,
    /// Peer identities that must not match (a plaintext peer passes).
    pub not_principals: Arc<[StringMatch]>,
    /// The peer identity's namespace.
    pub namespaces: Arc<[StringMatch]>,
    /// Namespaces that must not match (a plaintext peer passes).
    pub not_namespaces: Arc<[StringMatch]>,
    /// The peer's IP address (the connection's, not `X-Forwarded-For`).
    pub ip_blocks: Arc<[IpBlock]>,
    /// Addresses that must not match.
    pub not_ip_blocks: Arc<[IpBlock]>,
}

impl Source {
    /// Whether no field is set (Istio rejects an empty `source`).
    pub fn is_empty(&self) -> bool {
        self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.ip_blocks.is_empty()
            && self.not_ip_blocks.is_empty()
    }

    fn reads_only_peer(&self) -> bool {
        let Source {
            principals: _,
            not_principals: _,
            namespaces: _,
            not_namespaces: _,
            ip_blocks,
            not_ip_blocks,
        } = self;
        ip_blocks.is_empty() && not_ip_blocks.is_empty()
    }

    /// Whether the request's source matches.
    pub fn matches(&self, attrs: &RequestAttributes<'_>) -> bool {
        // Each attribute is read only by a field that is set.
        let peer = attrs.peer;
        one_of(&self.principals, &self.not_principals, |p| {
            peer.is_some_and(|v| p.matches(v.principal()))
        }) && one_of(&self.namespaces, &self.not_namespaces, |n| {
            peer.is_some_and(|v| n.matches(v.namespace()))
        }) && one_of(&self.ip_blocks, &self.not_ip_blocks, |b| {
            b.contains(attrs.source_ip)
        })
    }
}

/// Istio's `to.operation`: what the request asks for. Every field that is
/// set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Operation {
    /// The request's `:authority` / `Host`, as sent (a port included),
    /// compared ignoring case.
    pub hosts: Arc<[StringMatch]>,
    /// Hosts that must not match.
    pub not_hosts: Arc<[StringMatch]>,
    /// The port the server accepted the connection on.
    pub ports: Arc<[u16]>,
    /// Ports that must not match.
    pub not_ports: Arc<[u16]>,
    /// The HTTP method (`POST` for every gRPC call).
    pub methods: Arc<[StringMatch]>,
    /// Methods that must not match.
    pub not_methods: Arc<[StringMatch]>,
    /// The request path without its query string (`/pkg.Service/Method` for gRPC).
    pub paths: Arc<[StringMatch]>,
    /// Paths that must not match.
    pub not_paths: Arc<[StringMatch]>,
}

impl Operation {
    /// Whether no field is set (Istio rejects an empty `operation`).
    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
            && self.not_hosts.is_empty()
            && self.ports.is_empty()
            && self.not_ports.is_empty()
            && self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
    }

    fn reads_only_peer(&self) -> bool {
        let Operation {
            hosts,
            not_hosts,
            ports,
            not_ports,
            methods,
            not_methods,
            paths,
            not_paths,
        } = self;
        hosts.is_empty()
            && not_hosts.is_empty()
            && ports.is_empty()
            && not_ports.is_empty()
            && methods.is_empty()
            && not_methods.is_empty()
            && paths.is_empty()
            && not_paths.is_empty()
    }

    /// Whether the request's operation matches.
    pub fn matches(&self, attrs: &RequestAttributes<'_>) -> bool {
        // Each attribute is read only by a field that is set (the path
        // without its query is a search).
        let host = attrs.host;
        one_of(&self.hosts, &self.not_hosts, |h| {
            !host.is_empty() && h.matches_ignore_case(host)
        }) && one_of(&self.ports, &self.not_ports, |p| {
            *p == attrs.destination_port
        }) && one_of(&self.methods, &self.not_methods, |m| {
            m.matches(attrs.method)
        }) && (self.paths.is_empty() && self.not_paths.is_empty() || {
            let path = attrs.path_without_query();
            one_of(&self.paths, &self.not_paths, |p| p.matches(path))
        })
    }
}

/// `values` / `notValues` of a field or condition: the attribute must be
/// one of `values` (when given) and none of `not_values`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values<T> {
    /// The attribute must match one of these (unless empty).
    pub values: Arc<[T]>,
    /// The attribute must match none of these.
    pub not_values: Arc<[T]>,
}

impl<T> Values<T> {
    /// `values` and `not_values`.
    pub fn new(values: Vec<T>, not_values: Vec<T>) -> Self {
        Values {
            values: values.into(),
            not_values: not_values.into(),
        }
    }

    /// Whether neither list has an entry.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }

    fn matches(&self, mut hit: impl FnMut(&T) -> bool) -> bool {
        one_of(&self.values, &self.not_values, &mut hit)
    }
}

/// One `when` condition of a rule. Keys Istio documents for mesh traffic
/// that this mesh evaluates; `request.auth.*` (JWT) and the rest are
/// reported as unsupported by [`Condition::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `request.headers[<name>]`: a request header (name stored lower
    /// case; several values of one header are joined with `,`, as Envoy does).
    RequestHeader {
        /// The header name, lower case.
        name: Name,
        /// The values.
        values: Values<StringMatch>,
    },
    /// `source.principal`: the peer identity without `spiffe://`.
    SourcePrincipal(Values<StringMatch>),
    /// `source.namespace`: the peer identity's namespace.
    SourceNamespace(Values<StringMatch>),
    /// `source.ip`: the peer's address.
    SourceIp(Values<IpBlock>),
    /// `destination.port`: the port the server accepted the connection on.
    DestinationPort(Values<u16>),
}

impl Condition {
    /// Parses Istio's `{key, values, notValues}`.
    pub fn parse(key: &str, values: &[&str], not_values: &[&str]) -> Result<Condition, Error> {
        let fail = |e: Error| e.context(format!("when key {key:?}"));
        if values.is_empty() && not_values.is_empty() {
            return Err(fail(Error::invalid("needs values or notValues")));
        }
        let strings = |list: &[&str]| -> Result<Vec<StringMatch>, Error> {
            list.iter().map(|v| StringMatch::parse(v)).collect()
        };
        let string_values = || -> Result<Values<StringMatch>, Error> {
            Ok(Values::new(strings(values)?, strings(not_values)?))
        };
        let condition = if let Some(rest) = key.strip_prefix("request.headers[") {
            let name = rest
                .strip_suffix(']')
                .ok_or_else(|| fail(Error::invalid("must be request.headers[<name>]")))?;
            Condition::RequestHeader {
                name: header_name(name).map_err(fail)?,
                values: string_values().map_err(fail)?,
            }
        } else {
            match key {
                "source.principal" => Condition::SourcePrincipal(string_values().map_err(fail)?),
                "source.namespace" => Condition::SourceNamespace(string_values().map_err(fail)?),
                "source.ip" => {
                    let blocks = |list: &[&str]| -> Result<Vec<IpBlock>, Error> {
                        list.iter().map(|v| IpBlock::parse(v)).collect()
                    };
                    Condition::SourceIp(Values::new(
                        blocks(values).map_err(fail)?,
                        blocks(not_values).map_err(fail)?,
                    ))
                }
                "destination.port" => {
                    let ports = |list: &[&str]| -> Result<Vec<u16>, Error> {
                        list.iter().map(|v| parse_port(v)).collect()
                    };
                    Condition::DestinationPort(Values::new(
                        ports(values).map_err(fail)?,
                        ports(not_values).map_err(fail)?,
                    ))
                }
                k if k.starts_with("request.auth.") => {
                    return Err(fail(Error::unsupported(
                        "request authentication (JWT) conditions are not supported",
                    )));
                }
                _ => {
                    return Err(fail(Error::unsupported(
                        "supported keys are request.headers[<name>], source.principal, \
                         source.namespace, source.ip and destination.port",
                    )));
                }
            }
        };
        Ok(condition)
    }

    /// The condition's key in Istio's syntax (`request.headers[x-user]`).
    pub fn key(&self) -> String {
        match self {
            Condition::RequestHeader { name, .. } => format!("request.headers[{name}]"),
            Condition::SourcePrincipal(_) => "source.principal".into(),
            Condition::SourceNamespace(_) => "source.namespace".into(),
            Condition::SourceIp(_) => "source.ip".into(),
            Condition::DestinationPort(_) => "destination.port".into(),
        }
    }

    /// Whether neither values nor not-values are set (Istio rejects it).
    pub fn is_empty(&self) -> bool {
        match self {
            Condition::RequestHeader { values, .. }
            | Condition::SourcePrincipal(values)
            | Condition::SourceNamespace(values) => values.is_empty(),
            Condition::SourceIp(values) => values.is_empty(),
            Condition::DestinationPort(values) => values.is_empty(),
        }
    }

    fn reads_only_peer(&self) -> bool {
        match self {
            Condition::SourcePrincipal(_) | Condition::SourceNamespace(_) => true,
            Condition::RequestHeader { .. }
            | Condition::SourceIp(_)
            | Condition::DestinationPort(_) => false,
        }
    }

    /// Whether the request satisfies the condition.
    pub fn matches(&self, attrs: &RequestAttributes<'_>) -> bool {
        match self {
            Condition::RequestHeader { name, values } => {
                let value = attrs.header(name);
                values.matches(|m| value.as_deref().is_some_and(|v| m.matches(v)))
            }
            Condition::SourcePrincipal(values) => {
                let principal = attrs.peer.map(SpiffeId::principal);
                values.matches(|m| principal.is_some_and(|v| m.matches(v)))
            }
            Condition::SourceNamespace(values) => {
                let namespace = attrs.peer.map(SpiffeId::namespace);
                values.matches(|m| namespace.is_some_and(|v| m.matches(v)))
            }
            Condition::SourceIp(values) => values.matches(|b| b.contains(attrs.source_ip)),
            Condition::DestinationPort(values) => values.matches(|p| *p == attrs.destination_port),
        }
    }
}

/// Validates and lower-cases a header name of a `request.headers[...]` key;
/// `:authority`, `:method` and `:path` are allowed.
pub(crate) fn header_name(name: &str) -> Result<Name, Error> {
    let lower = name.to_ascii_lowercase();
    if matches!(lower.as_str(), ":authority" | ":method" | ":path") {
        return Ok(Name::from(lower));
    }
    http::HeaderName::from_bytes(lower.as_bytes())
        .map(|h| Name::from(h.as_str()))
        .map_err(|_| Error::invalid(format!("{name:?} is not a valid header name")))
}

/// Parses a port number of Istio's `ports` / `destination.port` (1-65535).
pub fn parse_port(s: &str) -> Result<u16, Error> {
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(Error::invalid(format!(
            "{s:?} is not a port number (1-65535)"
        ))),
    }
}

/// One rule of a policy: `from`, `to` and `when`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    /// Sources; empty = any source.
    pub from: Arc<[Source]>,
    /// Operations; empty = any operation.
    pub to: Arc<[Operation]>,
    /// Conditions, all of which must hold.
    pub when: Arc<[Condition]>,
}

impl Rule {
    /// See [`AuthorizationPolicy::reads_only_peer`]. Every field is named
    /// (here and below), so a field added later must be classified here.
    fn reads_only_peer(&self) -> bool {
        let Rule { from, to, when } = self;
        from.iter().all(Source::reads_only_peer)
            && to.iter().all(Operation::reads_only_peer)
            && when.iter().all(Condition::reads_only_peer)
    }

    /// Whether the request matches this rule.
    pub fn matches(&self, attrs: &RequestAttributes<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(attrs)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(attrs)))
            && self.when.iter().all(|c| c.matches(attrs))
    }
}

/// An AuthorizationPolicy that applies to the workload being evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    namespace: Name,
    name: Name,
    /// `<namespace>/<name>`, for decisions and logs.
    id: Name,
    action: Action,
    rules: Arc<[Rule]>,
    /// Istio's `istio.io/dry-run: "true"`: evaluated beside the enforced
    /// policies by [`evaluate_dry_run`], never by [`evaluate`].
    dry_run: bool,
}

impl AuthorizationPolicy {
    /// A validated policy. Names are Kubernetes-style (`[A-Za-z0-9._-]`, at
    /// most 253 bytes); every `source`, `operation` and condition must set
    /// something, as Istio requires.
    pub fn new(
        namespace: impl Into<Name>,
        name: impl Into<Name>,
        action: Action,
        rules: Vec<Rule>,
    ) -> Result<AuthorizationPolicy, Error> {
        let namespace = namespace.into();
        let name = name.into();
        let id = Name::from(format!("{namespace}/{name}"));
        let fail = |e: Error| e.context(format!("AuthorizationPolicy {id}"));
        check_name("namespace", &namespace).map_err(fail)?;
        check_name("name", &name).map_err(fail)?;
        for (i, rule) in rules.iter().enumerate() {
            if rule.from.iter().any(Source::is_empty) {
                return Err(fail(Error::invalid(format!(
                    "rules[{i}]: a from.source must set at least one field"
                ))));
            }
            if rule.to.iter().any(Operation::is_empty) {
                return Err(fail(Error::invalid(format!(
                    "rules[{i}]: a to.operation must set at least one field"
                ))));
            }
            if let Some(c) = rule.when.iter().find(|c| c.is_empty()) {
                return Err(fail(Error::invalid(format!(
                    "rules[{i}]: when {:?} needs values or notValues",
                    c.key()
                ))));
            }
        }
        Ok(AuthorizationPolicy {
            namespace,
            name,
            id,
            action,
            rules: rules.into(),
            dry_run: false,
        })
    }

    /// This policy in dry-run mode (Istio's `istio.io/dry-run: "true"`
    /// annotation) or not: a dry-run policy is evaluated and reported
    /// ([`evaluate_dry_run`]) but never enforced ([`evaluate`] skips it).
    /// Over xDS it travels as RBAC `shadow_rules`.
    pub fn with_dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// Whether this policy is only evaluated and reported, never enforced.
    pub fn is_dry_run(&self) -> bool {
        self.dry_run
    }

    /// The policy's namespace (the root namespace for mesh-wide policies).
    pub fn namespace(&self) -> &Name {
        &self.namespace
    }

    /// The policy's name.
    pub fn name(&self) -> &Name {
        &self.name
    }

    /// `<namespace>/<name>`.
    pub fn id(&self) -> &Name {
        &self.id
    }

    /// What the policy does with matching requests.
    pub fn action(&self) -> Action {
        self.action
    }

    /// The rules; the policy matches when any of them does.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether the request matches any rule.
    pub fn matches(&self, attrs: &RequestAttributes<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(attrs))
    }

    /// Whether matching reads nothing of a request but its peer identity
    /// ([`RequestAttributes::peer`]): no rule has an ip block, an
    /// operation, or a condition on anything but `source.principal` /
    /// `source.namespace`. Then [`AuthorizationPolicy::matches`] (and
    /// [`decide`] over such policies) gives the same answer for every
    /// request with an equal peer identity, which a caller may remember.
    pub fn reads_only_peer(&self) -> bool {
        self.rules.iter().all(Rule::reads_only_peer)
    }
}

fn check_name(what: &str, name: &str) -> Result<(), Error> {
    if name.is_empty() || name.len() > 253 {
        return Err(Error::invalid(format!(
            "the {what} must have 1 to 253 bytes"
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(Error::invalid(format!(
            "the {what} {name:?} has {c:?}; use letters, digits, '.', '-', '_'"
        )));
    }
    Ok(())
}

/// What [`evaluate`] looks at: the request and its connection.
#[derive(Debug, Clone, Copy)]
pub struct RequestAttributes<'a> {
    /// The verified peer identity (mTLS), or `None` on a plaintext
    /// connection or a TLS connection without a client certificate.
    pub peer: Option<&'a SpiffeId>,
    /// The peer's IP address.
    pub source_ip: IpAddr,
    /// The `:authority` (or `Host`) as sent, port included if sent.
    pub host: &'a str,
    /// The port the server accepted the connection on.
    pub destination_port: u16,
    /// The HTTP method.
    pub method: &'a str,
    /// The request path; a query string is ignored.
    pub path: &'a str,
    /// The request headers.
    pub headers: &'a http::HeaderMap,
}

impl<'a> RequestAttributes<'a> {
    /// The attributes of an HTTP request (HTTP/2 `:authority` or the
    /// HTTP/1.1 `Host` header as the host) arriving from `peer` at
    /// `source_ip` on the server's `destination_port`.
    pub fn from_request<B>(
        request: &'a http::Request<B>,
        peer: Option<&'a SpiffeId>,
        source_ip: IpAddr,
        destination_port: u16,
    ) -> Self {
        let host = request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                request
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        RequestAttributes {
            peer,
            source_ip,
            host,
            destination_port,
            method: request.method().as_str(),
            path: request.uri().path(),
            headers: request.headers(),
        }
    }

    fn path_without_query(&self) -> &str {
        match self.path.split_once('?') {
            Some((path, _)) => path,
            None => self.path,
        }
    }

    /// The value a header matcher sees: the pseudo-headers, or every value
    /// of the header joined with `,`; `None` when absent.
    fn header(&self, name: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        match name {
            ":authority" | "host" => Some(Cow::Borrowed(self.host)).filter(|h| !h.is_empty()),
            ":method" => Some(Cow::Borrowed(self.method)),
            ":path" => Some(Cow::Borrowed(self.path)),
            _ => {
                let mut values = self.headers.get_all(name).iter();
                let first = values.next()?;
                let first = String::from_utf8_lossy(first.as_bytes());
                let Some(second) = values.next() else {
                    // One value (the usual case): borrowed unless it is
                    // not UTF-8, nothing allocated.
                    return Some(first);
                };
                let mut joined = first.into_owned();
                for v in std::iter::once(second).chain(values) {
                    joined.push(',');
                    joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
                }
                Some(Cow::Owned(joined))
            }
        }
    }
}

/// Why a request was allowed or denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A DENY policy matched.
    DeniedByPolicy,
    /// ALLOW policies apply and none matched.
    NoAllowPolicyMatched,
    /// An ALLOW policy matched.
    AllowedByPolicy,
    /// No DENY policy matched and no ALLOW policy applies.
    NoAllowPolicies,
}

/// The result of [`evaluate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The deciding policy as `<namespace>/<name>`: the DENY policy that
    /// denied or the ALLOW policy that allowed; `None` when no policy
    /// matched.
    pub policy: Option<Name>,
    /// Whether an AUDIT policy matched (the request should be audit-logged).
    pub audit: bool,
    /// Why.
    pub reason: Reason,
}

/// Decides a request with Istio's precedence: DENY policies first (the
/// first matching one, in the given order, is named), then ALLOW policies
/// (when any exists, one must match), AUDIT policies only mark. See the
/// [module docs](self).
///
/// Dry-run policies ([`AuthorizationPolicy::is_dry_run`]) are skipped: they
/// never change a decision (see [`evaluate_dry_run`]).
pub fn evaluate(policies: &[AuthorizationPolicy], attrs: &RequestAttributes<'_>) -> Decision {
    decide(policies, attrs).to_decision(policies)
}

/// [`evaluate`]'s decision naming the deciding policy by its index in the
/// policies instead of a copy of its id: what a caller deciding every
/// request uses (no reference count touched, nothing allocated by the
/// decision itself), keeping per-policy data of its own by index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// The index of the deciding policy (the DENY policy that denied or
    /// the ALLOW policy that allowed); `None` when no policy matched.
    pub policy: Option<usize>,
    /// Whether an AUDIT policy matched.
    pub audit: bool,
    /// Why.
    pub reason: Reason,
}

impl Verdict {
    /// The [`Decision`] this is, for the `policies` it was decided with.
    pub fn to_decision(&self, policies: &[AuthorizationPolicy]) -> Decision {
        Decision {
            allowed: self.allowed,
            policy: self
                .policy
                .and_then(|i| policies.get(i))
                .map(|p| p.id.clone()),
            audit: self.audit,
            reason: self.reason,
        }
    }
}

/// [`evaluate`] without copying the deciding policy's id (see
/// [`Verdict`]). One pass over `policies`: a policy is matched only when
/// its result can still change the decision (an AUDIT policy until one
/// matched, a DENY policy until one matched, an ALLOW policy until one
/// matched and only while no DENY policy did), which gives the same
/// decision as evaluating them all since matching has no side effects.
pub fn decide(policies: &[AuthorizationPolicy], attrs: &RequestAttributes<'_>) -> Verdict {
    let mut audit = false;
    let mut deny = None;
    let mut allow = None;
    let mut any_allow = false;
    for (i, p) in policies.iter().enumerate() {
        if p.dry_run {
            continue;
        }
        match p.action {
            Action::Audit => {
                if !audit && p.matches(attrs) {
                    audit = true;
                }
            }
            Action::Deny => {
                if deny.is_none() && p.matches(attrs) {
                    deny = Some(i);
                }
            }
            Action::Allow => {
                any_allow = true;
                if deny.is_none() && allow.is_none() && p.matches(attrs) {
                    allow = Some(i);
                }
            }
        }
    }
    let (allowed, policy, reason) = match (deny, allow) {
        (Some(deny), _) => (false, Some(deny), Reason::DeniedByPolicy),
        (None, Some(allow)) => (true, Some(allow), Reason::AllowedByPolicy),
        (None, None) if any_allow => (false, None, Reason::NoAllowPolicyMatched),
        (None, None) => (true, None, Reason::NoAllowPolicies),
    };
    Verdict {
        allowed,
        policy,
        audit,
        reason,
    }
}

/// What the dry-run policies of one action would have decided: Istio's
/// `istio.authorization.dry_run.{allow,deny}_policy.{name,result}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowResult {
    /// Whether the request would have been allowed by the dry-run policies
    /// of this action alone.
    pub allowed: bool,
    /// The matching dry-run policy as `<namespace>/<name>` (the first, in
    /// the given order), `None` when none matched.
    pub policy: Option<Name>,
}

/// The result of [`evaluate_dry_run`]: one [`ShadowResult`] per action
/// that has dry-run policies (Envoy's RBAC `shadow_rules` of the ALLOW and
/// the DENY filter that Istio generates).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DryRun {
    /// The dry-run ALLOW policies: allowed when one matches, denied (no
    /// policy) when none does. `None` without dry-run ALLOW policies.
    pub allow: Option<ShadowResult>,
    /// The dry-run DENY policies: denied when one matches (named), allowed
    /// otherwise. `None` without dry-run DENY policies.
    pub deny: Option<ShadowResult>,
}

impl DryRun {
    /// Whether there was nothing to evaluate.
    pub fn is_empty(&self) -> bool {
        self.allow.is_none() && self.deny.is_none()
    }

    /// Whether the dry-run policies would have denied the request.
    pub fn would_deny(&self) -> bool {
        self.allow.as_ref().is_some_and(|r| !r.allowed)
            || self.deny.as_ref().is_some_and(|r| !r.allowed)
    }
}

/// Evaluates the dry-run policies only, as Envoy evaluates `shadow_rules`:
/// the dry-run DENY policies as one engine, the dry-run ALLOW policies as
/// another; enforced policies play no part. Returns an empty [`DryRun`]
/// (no work beyond one pass over `policies`) when none is in dry-run.
pub fn evaluate_dry_run(policies: &[AuthorizationPolicy], attrs: &RequestAttributes<'_>) -> DryRun {
    let mut result = DryRun::default();
    for action in [Action::Deny, Action::Allow] {
        let mut any = false;
        let mut matched = None;
        for p in policies.iter().filter(|p| p.dry_run && p.action == action) {
            any = true;
            if p.matches(attrs) {
                matched = Some(p.id.clone());
                break;
            }
        }
        if !any {
            continue;
        }
        let shadow = ShadowResult {
            allowed: match action {
                Action::Deny => matched.is_none(),
                _ => matched.is_some(),
            },
            policy: matched,
        };
        match action {
            Action::Deny => result.deny = Some(shadow),
            _ => result.allow = Some(shadow),
        }
    }
    result
}

/// `values` / `not_values` semantics: one of `values` (if any), none of
/// `not_values`.
fn one_of<T>(values: &[T], not_values: &[T], mut hit: impl FnMut(&T) -> bool) -> bool {
    (values.is_empty() || values.iter().any(&mut hit)) && !not_values.iter().any(hit)
}

#[cfg(test)]
mod tests;

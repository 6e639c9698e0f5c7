//! The Gateway kind's spec as read from YAML ([`parse_gateway`]).
//!
//! Apart from `gateway.rs`, which translates gateways: the resources
//! (`resources.rs`) hold the parsed spec, and `gateway.rs` walks the
//! resources, so with both halves in one module that module and
//! `resources` imported each other (issue 14).

use std::collections::{BTreeMap, BTreeSet};

use super::yaml::{Field, Fields, Sink, Spanned, line_of};

/// `Gateway.spec`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Gateway {
    /// `selector`: the labels of the Envoy nodes that are this gateway.
    pub(crate) selector: BTreeMap<String, String>,
    /// `servers`, in order.
    pub(crate) servers: Vec<Server>,
}

/// One `servers[]` entry: a port, its hosts and how TLS ends there.
#[derive(Debug, Clone)]
pub(crate) struct Server {
    pub(crate) port: u16,
    /// `port.name` (Istio names HTTPS route configs after it).
    pub(crate) port_name: String,
    /// `hosts`, each `host` or `namespace/host` (`*/`, `./` as in Istio).
    pub(crate) hosts: Vec<Spanned<GatewayHost>>,
    /// `tls` (HTTPS servers).
    pub(crate) tls: Option<ServerTls>,
    /// `tls.httpsRedirect`: plain HTTP requests get a 301 to https.
    pub(crate) https_redirect: bool,
    /// `bind`: the address Envoy listens on (default `0.0.0.0`).
    pub(crate) bind: std::net::IpAddr,
    /// Line of the server's `port`, for messages.
    pub(crate) line: usize,
}

/// A server host: which VirtualServices may bind it (by namespace) and the
/// host pattern (`*`, `*.example.com` or a name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GatewayHost {
    /// `None`: any namespace (`*/` or no prefix).
    pub(crate) namespace: Option<String>,
    pub(crate) host: String,
}

impl GatewayHost {
    /// Whether a VirtualService of `namespace` for `host` is served here.
    pub(super) fn admits(&self, namespace: &str, host: &str) -> bool {
        if self.namespace.as_deref().is_some_and(|ns| ns != namespace) {
            return false;
        }
        match self.host.strip_prefix('*') {
            Some("") => true,
            Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
            None => self.host == host,
        }
    }
}

/// TLS termination with certificate files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerTls {
    /// MUTUAL: clients must present a certificate `ca_certificates` signs.
    pub(crate) mutual: bool,
    pub(crate) server_certificate: String,
    pub(crate) private_key: String,
    pub(crate) ca_certificates: Option<String>,
}

/// Parses `Gateway.spec`.
pub(crate) fn parse_gateway(sink: &mut Sink<'_>, spec: Field<'_, '_, '_>) -> Option<Gateway> {
    let f = Fields::of(sink, spec, &["selector", "servers"], &[])?;
    let before = sink.count();
    let selector = match f.get("selector") {
        Some(s) => s.string_map(sink).unwrap_or_default(),
        None => BTreeMap::new(),
    };
    let mut servers = Vec::new();
    if let Some(field) = f.require(sink, "servers") {
        let items = field.list(sink).unwrap_or_default();
        if items.is_empty() {
            sink.error(field.key_line, "'servers' must not be empty");
        }
        for (path, node) in &items {
            let item = Field {
                path,
                key_line: line_of(node),
                node,
            };
            if let Some(s) = parse_server(sink, item) {
                servers.push(s);
            }
        }
    }
    // Two servers on one port: TLS ones must tell themselves apart by SNI,
    // and plain HTTP cannot share a port with TLS.
    let mut by_port: BTreeMap<u16, Vec<&Server>> = BTreeMap::new();
    for s in &servers {
        by_port.entry(s.port).or_default().push(s);
    }
    for group in by_port.values() {
        let port = group[0].port;
        let tls = group.iter().filter(|s| s.tls.is_some()).count();
        if tls > 0 && tls < group.len() {
            sink.error(
                group[group.len() - 1].line,
                format!("port {port}: plain HTTP and TLS servers cannot share a port"),
            );
        }
        if let Some(s) = group.iter().find(|s| s.bind != group[0].bind) {
            sink.error(
                s.line,
                format!(
                    "port {port}: bound to {} here and to {} by an earlier server: one \
                     listener per port",
                    s.bind, group[0].bind
                ),
            );
        }
        if tls == group.len() && tls > 1 {
            // Each TLS server is a filter chain chosen by SNI: two with a
            // name in common (or two catch-alls) cannot be told apart.
            let mut seen: BTreeSet<&str> = BTreeSet::new();
            for s in group {
                let names: BTreeSet<&str> = s
                    .hosts
                    .iter()
                    .map(|h| {
                        if h.value.host == "*" {
                            ""
                        } else {
                            h.value.host.as_str()
                        }
                    })
                    .collect();
                if let Some(dup) = names.iter().find(|n| seen.contains(*n)) {
                    let what = if dup.is_empty() { "'*'" } else { dup };
                    sink.error(
                        s.line,
                        format!(
                            "port {port}: host {what} is served by an earlier TLS server of \
                             this port: SNI cannot tell them apart"
                        ),
                    );
                }
                seen.extend(names);
            }
        }
    }
    (sink.count() == before).then_some(Gateway { selector, servers })
}

fn parse_server(sink: &mut Sink<'_>, item: Field<'_, '_, '_>) -> Option<Server> {
    let f = Fields::of(
        sink,
        item,
        &["port", "hosts", "tls", "name", "bind"],
        &["defaultEndpoint"],
    )?;
    let before = sink.count();
    let (port, port_name, protocol, line) = match f.require(sink, "port") {
        Some(p) => {
            let pf = Fields::of(sink, p, &["number", "name", "protocol"], &["targetPort"])?;
            let number = pf.require(sink, "number").and_then(|n| n.port(sink));
            let name = pf.get("name").and_then(|n| n.string(sink));
            let protocol = pf.require(sink, "protocol").and_then(|n| n.string(sink));
            (number, name, protocol, p.key_line)
        }
        None => (None, None, None, f.line),
    };
    let mut bind = std::net::IpAddr::from([0, 0, 0, 0]);
    if let Some(field) = f.get("bind")
        && let Some(b) = field.string(sink)
    {
        match b.value.parse() {
            Ok(ip) => bind = ip,
            Err(_) => sink.error(
                b.line,
                format!("'{}': '{}' is not an IP address", field.path, b.value),
            ),
        }
    }
    let https = match protocol.as_ref().map(|p| p.value.to_ascii_uppercase()) {
        Some(p) if matches!(p.as_str(), "HTTP" | "HTTP2" | "GRPC") => false,
        Some(p) if p == "HTTPS" => true,
        Some(p) => {
            let line = protocol.as_ref().map_or(line, |s| s.line);
            sink.error(
                line,
                format!(
                    "port protocol '{p}' is not supported at a gateway yet (HTTP, HTTP2, GRPC, HTTPS)"
                ),
            );
            false
        }
        None => false,
    };
    let mut hosts = Vec::new();
    if let Some(field) = f.require(sink, "hosts") {
        let items = field.string_list(sink).unwrap_or_default();
        if items.is_empty() {
            sink.error(field.key_line, "'hosts' must not be empty");
        }
        for (path, h) in items {
            if let Some(host) = parse_gateway_host(sink, &path, &h) {
                hosts.push(Spanned {
                    value: host,
                    line: h.line,
                });
            }
        }
    }
    let (tls, https_redirect) = match f.get("tls") {
        Some(t) => parse_tls(sink, t)?,
        None => (None, false),
    };
    if https && tls.is_none() {
        sink.error(
            line,
            "an HTTPS server needs 'tls' with mode SIMPLE or MUTUAL",
        );
    }
    if !https && tls.is_some() {
        sink.error(
            line,
            "'tls' with mode SIMPLE or MUTUAL needs port protocol HTTPS",
        );
    }
    if sink.count() != before {
        return None;
    }
    Some(Server {
        port: port?,
        port_name: port_name.map(|n| n.value).unwrap_or_default(),
        hosts,
        tls,
        https_redirect,
        bind,
        line,
    })
}

/// `host`, `ns/host`, `./host` or `*/host`; the host part is `*`,
/// `*.suffix` or a DNS name.
fn parse_gateway_host(sink: &mut Sink<'_>, path: &str, h: &Spanned<String>) -> Option<GatewayHost> {
    let value = h.value.to_ascii_lowercase();
    let (namespace, host) = match value.split_once('/') {
        Some(("*", host)) => (None, host.to_string()),
        Some((".", host)) => (Some(".".to_string()), host.to_string()),
        Some((ns, host)) => (Some(ns.to_string()), host.to_string()),
        None => (None, value.clone()),
    };
    let name = host.strip_prefix("*.").unwrap_or(&host);
    let valid = host == "*"
        || (!name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !name.starts_with('.')
            && !name.ends_with('.')
            && !name.contains(".."));
    let ns_valid = namespace.as_deref().is_none_or(|ns| {
        ns == "."
            || (!ns.is_empty()
                && ns
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
    });
    if !valid || !ns_valid {
        sink.error(
            h.line,
            format!(
                "'{path}': '{}' is not a gateway host ('*', '*.domain', a host name, each optionally \
                 after 'namespace/')",
                h.value
            ),
        );
        return None;
    }
    Some(GatewayHost { namespace, host })
}

fn parse_tls(sink: &mut Sink<'_>, t: Field<'_, '_, '_>) -> Option<(Option<ServerTls>, bool)> {
    let f = Fields::of(
        sink,
        t,
        &[
            "mode",
            "serverCertificate",
            "privateKey",
            "caCertificates",
            "httpsRedirect",
            "credentialName",
            "minProtocolVersion",
            "maxProtocolVersion",
            "subjectAltNames",
            "cipherSuites",
        ],
        &[
            "credentialNames",
            "verifyCertificateSpki",
            "verifyCertificateHash",
            "caCrl",
        ],
    )?;
    let before = sink.count();
    let redirect = f
        .get("httpsRedirect")
        .and_then(|r| r.boolean(sink))
        .unwrap_or(false);
    for name in [
        "credentialName",
        "minProtocolVersion",
        "maxProtocolVersion",
        "subjectAltNames",
        "cipherSuites",
    ] {
        if let Some(field) = f.get(name) {
            let why = if name == "credentialName" {
                "Kubernetes secrets are not read: give the files with 'serverCertificate', \
                 'privateKey' (and 'caCertificates' for MUTUAL)"
            } else {
                "it is not supported yet"
            };
            sink.error(field.key_line, format!("'{}': {why}", field.path));
        }
    }
    let mode = f.get("mode").and_then(|m| m.string(sink));
    let mutual = match mode.as_ref().map(|m| m.value.as_str()) {
        Some("SIMPLE") => false,
        Some("MUTUAL") => true,
        None if redirect => return (sink.count() == before).then_some((None, true)),
        None => {
            sink.error(t.key_line, format!("missing field '{}.mode'", t.path));
            return None;
        }
        Some(other) => {
            let line = mode.as_ref().map_or(t.key_line, |m| m.line);
            sink.error(
                line,
                format!(
                    "'{}.mode': '{other}' is not supported at a gateway (SIMPLE or MUTUAL with \
                     certificate files)",
                    t.path
                ),
            );
            return None;
        }
    };
    let file = |sink: &mut Sink<'_>, name: &str| -> Option<String> {
        let s = f.require(sink, name)?.string(sink)?;
        if !s.value.starts_with('/') {
            sink.error(
                s.line,
                format!(
                    "'{}.{name}': '{}' must be an absolute path (Envoy resolves it from its own \
                     working directory)",
                    t.path, s.value
                ),
            );
            return None;
        }
        Some(s.value)
    };
    let server_certificate = file(sink, "serverCertificate");
    let private_key = file(sink, "privateKey");
    let ca_certificates = if mutual {
        file(sink, "caCertificates")
    } else {
        f.get("caCertificates")
            .and_then(|c| c.string(sink))
            .map(|c| c.value)
    };
    if sink.count() != before {
        return None;
    }
    Some((
        Some(ServerTls {
            mutual,
            server_certificate: server_certificate?,
            private_key: private_key?,
            ca_certificates,
        }),
        redirect,
    ))
}

//! What a route does to a request besides choosing its cluster: header
//! changes, URI and authority rewrites, and answers the client stack gives
//! itself (a redirect or a direct response), without a network call.
//!
//! These are Istio's VirtualService `headers`, `rewrite`, `redirect` and
//! `directResponse`, carried over xDS in Envoy's shape
//! (`Route.request_headers_to_add` / `_remove`, `response_headers_to_add` /
//! `_remove`, the same on each `WeightedCluster.ClusterWeight`,
//! `RouteAction.prefix_rewrite` / `regex_rewrite` / `host_rewrite_literal`,
//! `Route.redirect`, `Route.direct_response`); the `xds` module converts.
//!
//! Everything here is decided once, when the config is read: header names
//! and values are parsed, regexes compiled, so that applying a rule to a
//! request is a few map operations and never fails.
//!
//! **Order, as Envoy applies it.** Within one set of operations, removals
//! come first, then `set` (overwrite, or add when absent), then `add`
//! (append). A destination's operations run before the route's, so a
//! route-level `set` wins over a destination-level one for the same header
//! (Envoy: "headers specified at this level are applied before headers from
//! the enclosing Route").
//!
//! **What gRPC clients do with it** (gRFC A28 knows none of it): header
//! changes and rewrites are ignored; a route whose action is a redirect or a
//! direct response fails every RPC that matches it with UNAVAILABLE
//! ("matching route has inappropriate action"). `/status` and `check --for
//! grpc` say so.

use std::fmt;
use std::sync::Arc;

use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

use crate::error::Error;
use crate::model::{Name, PathMatch};

/// Header operations on one message (a request or a response).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOps {
    /// Overwrite, or add when absent (Istio `set`; Envoy
    /// `OVERWRITE_IF_EXISTS_OR_ADD`).
    pub set: Arc<[(HeaderName, HeaderValue)]>,
    /// Append (Istio `add`; Envoy `APPEND_IF_EXISTS_OR_ADD`).
    pub add: Arc<[(HeaderName, HeaderValue)]>,
    /// Remove every value (Istio `remove`; Envoy `*_headers_to_remove`).
    pub remove: Arc<[HeaderName]>,
}

impl HeaderOps {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the operations to `headers`: removals, then `set`, then `add`.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in self.remove.iter() {
            headers.remove(name);
        }
        for (name, value) in self.set.iter() {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in self.add.iter() {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// Header operations on the request and on its response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    /// On the request sent upstream.
    pub request: HeaderOps,
    /// On the response given to the caller.
    pub response: HeaderOps,
}

impl HeaderRules {
    /// Whether there is nothing to do on either message.
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

/// How the path is rewritten before the request is sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRewrite {
    /// The matched prefix (or, for an exact match, the whole path) is
    /// replaced (Istio `rewrite.uri`; Envoy `prefix_rewrite`).
    Prefix(Name),
    /// Every match of a regex in the path is replaced (Istio
    /// `rewrite.uriRegexRewrite`; Envoy `regex_rewrite`).
    Regex(RegexRewrite),
}

/// A regex and its substitution, as Envoy's `regex_rewrite` has them: the
/// substitution may name capture groups as `\1` … `\9`.
#[derive(Clone)]
pub struct RegexRewrite {
    pattern: Name,
    substitution: Name,
    compiled: regex::Regex,
    /// The substitution in the `regex` crate's syntax (`${1}`, `$$`).
    replacement: String,
}

impl RegexRewrite {
    /// Compiles `pattern` (unanchored: every match in the path is
    /// replaced) and checks that `substitution` names only groups the
    /// pattern has.
    pub fn new(pattern: &str, substitution: &str) -> Result<Self, Error> {
        let compiled = regex::Regex::new(pattern)
            .map_err(|e| Error::invalid(format!("invalid regex {pattern:?}: {e}")))?;
        let mut replacement = String::with_capacity(substitution.len() + 8);
        let mut chars = substitution.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.peek().copied() {
                    Some(d @ '0'..='9') => {
                        chars.next();
                        let group = d as usize - '0' as usize;
                        if group >= compiled.captures_len() {
                            return Err(Error::invalid(format!(
                                "substitution {substitution:?} names group \\{group}, but \
                                 {pattern:?} has {} group(s)",
                                compiled.captures_len() - 1
                            )));
                        }
                        replacement.push_str("${");
                        replacement.push(d);
                        replacement.push('}');
                    }
                    Some('\\') => {
                        chars.next();
                        replacement.push('\\');
                    }
                    _ => replacement.push('\\'),
                },
                '$' => replacement.push_str("$$"),
                c => replacement.push(c),
            }
        }
        Ok(RegexRewrite {
            pattern: Arc::from(pattern),
            substitution: Arc::from(substitution),
            compiled,
            replacement,
        })
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// The substitution as written (Envoy's syntax).
    pub fn substitution(&self) -> &str {
        &self.substitution
    }

    /// `path` with every match replaced.
    pub fn apply(&self, path: &str) -> String {
        self.compiled
            .replace_all(path, self.replacement.as_str())
            .into_owned()
    }
}

impl PartialEq for RegexRewrite {
    fn eq(&self, other: &Self) -> bool {
        self.pattern == other.pattern && self.substitution == other.substitution
    }
}
impl Eq for RegexRewrite {}

impl fmt::Debug for RegexRewrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegexRewrite")
            .field("pattern", &self.pattern)
            .field("substitution", &self.substitution)
            .finish()
    }
}

/// Rewrites before the request is sent (Istio `rewrite`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rewrite {
    /// The path's rewrite, if any; the query string is kept as it is.
    pub path: Option<PathRewrite>,
    /// The new authority (`Host`), if any (Istio `rewrite.authority`; Envoy
    /// `host_rewrite_literal`).
    pub authority: Option<HeaderValue>,
}

impl Rewrite {
    /// Whether nothing is rewritten.
    pub fn is_empty(&self) -> bool {
        self.path.is_none() && self.authority.is_none()
    }

    /// The path `path` becomes on a route matched by `matched`, or `None`
    /// when it stays as it is. A prefix rewrite replaces the prefix the
    /// route matched (the whole path for an exact match; nothing is
    /// replaced under a regex match, which config validation refuses).
    pub fn path_for(&self, path: &str, matched: &PathMatch) -> Option<String> {
        match self.path.as_ref()? {
            PathRewrite::Prefix(new) => {
                let rest = match matched {
                    PathMatch::Exact(_) => "",
                    PathMatch::Prefix(prefix) => path.get(prefix.len()..).unwrap_or(""),
                    PathMatch::Regex(_) => return None,
                };
                let mut out = String::with_capacity(new.len() + rest.len());
                out.push_str(new);
                out.push_str(rest);
                Some(out)
            }
            PathRewrite::Regex(r) => Some(r.apply(path)),
        }
    }
}

/// A redirect the client stack answers itself (Istio `redirect`; Envoy
/// `RedirectAction`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// The new path (the whole path, whatever the route matched); the query
    /// string is kept unless this one has its own.
    pub path: Option<Name>,
    /// The new host (`authority`), port included or not.
    pub authority: Option<Name>,
    /// The new port.
    pub port: Option<u16>,
    /// The new scheme (`http`, `https`).
    pub scheme: Option<Name>,
    /// 301 (Istio's default), 302, 303, 307 or 308.
    pub status: StatusCode,
}

/// The parts of the request a redirect keeps.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// `http` or `https`.
    pub scheme: &'a str,
    /// The authority as sent (`catalog:8080`).
    pub authority: &'a str,
    /// The path.
    pub path: &'a str,
    /// The query string, without `?`.
    pub query: Option<&'a str>,
}

impl Redirect {
    /// The `Location` of the redirect of a request to `origin`. A port that
    /// is the scheme's default is left out, as Envoy does.
    pub fn location(&self, origin: &Origin<'_>) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(origin.scheme);
        let (origin_host, origin_port) = split_port(origin.authority);
        let (host, port) = match self.authority.as_deref() {
            Some(authority) => split_port(authority),
            None => (origin_host, origin_port),
        };
        let port = self.port.or(port);
        let default = match scheme {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        };
        let mut out = String::with_capacity(64);
        out.push_str(scheme);
        out.push_str("://");
        out.push_str(host);
        if let Some(port) = port
            && Some(port) != default
        {
            out.push(':');
            out.push_str(&port.to_string());
        }
        match self.path.as_deref() {
            Some(path) => {
                out.push_str(path);
                if !path.contains('?')
                    && let Some(query) = origin.query
                {
                    out.push('?');
                    out.push_str(query);
                }
            }
            None => {
                out.push_str(origin.path);
                if let Some(query) = origin.query {
                    out.push('?');
                    out.push_str(query);
                }
            }
        }
        out
    }
}

/// `catalog:8080` → (`catalog`, 8080); `[::1]:80` → (`[::1]`, 80).
fn split_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty()
                && (!host.contains(':') || host.ends_with(']'))
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit()) =>
        {
            match port.parse() {
                Ok(p) => (host, Some(p)),
                Err(_) => (authority, None),
            }
        }
        _ => (authority, None),
    }
}

/// A response the client stack gives itself (Istio `directResponse`; Envoy
/// `DirectResponseAction`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectResponse {
    /// The status.
    pub status: StatusCode,
    /// The body (`text/plain` unless the route's response headers say
    /// otherwise), if any.
    pub body: Option<Arc<[u8]>>,
}

/// What a route answers itself instead of calling a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalAnswer {
    /// A redirect.
    Redirect(Redirect),
    /// A fixed response.
    Direct(DirectResponse),
}

/// Everything a route does besides choosing a cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Traffic {
    /// The route's header operations.
    pub headers: HeaderRules,
    /// Header operations per destination, in the order of the route's
    /// weighted clusters (empty: none; otherwise one per destination).
    pub destinations: Arc<[HeaderRules]>,
    /// Rewrites.
    pub rewrite: Rewrite,
    /// An answer instead of a cluster: the route then has no destination
    /// that is ever called.
    pub answer: Option<LocalAnswer>,
    /// Where copies of the requests go (Istio `mirror` / `mirrors`; Envoy
    /// `RouteAction.request_mirror_policies`).
    pub mirrors: Arc<[Mirror]>,
}

/// A copy of a route's requests, sent fire-and-forget to another cluster:
/// its response is discarded and its failure never reaches the caller.
/// The copy's `Host` / `:authority` gets Envoy's `-shadow` suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirror {
    /// The cluster copies go to.
    pub cluster: Name,
    /// The share of requests copied.
    pub fraction: crate::model::Fraction,
}

/// The authority of a mirrored copy: Envoy appends `-shadow` to the host
/// (`catalog:8080` → `catalog-shadow:8080`).
pub fn shadow_authority(authority: &str) -> String {
    let (host, port) = split_port(authority);
    match port {
        Some(p) => format!("{host}-shadow:{p}"),
        None => format!("{host}-shadow"),
    }
}

impl Traffic {
    /// Whether the route does nothing besides choosing a cluster.
    pub fn is_empty(&self) -> bool {
        self.headers.is_empty()
            && self.destinations.iter().all(HeaderRules::is_empty)
            && self.rewrite.is_empty()
            && self.answer.is_none()
            && self.mirrors.is_empty()
    }

    /// The header rules of destination `index` (none when the route has no
    /// destination-level rules).
    pub fn destination(&self, index: usize) -> Option<&HeaderRules> {
        self.destinations.get(index).filter(|r| !r.is_empty())
    }

    /// Applies the request-side header operations for a request sent to
    /// destination `index`: the destination's first, then the route's.
    pub fn apply_request_headers(&self, index: usize, headers: &mut HeaderMap) {
        if let Some(d) = self.destination(index) {
            d.request.apply(headers);
        }
        self.headers.request.apply(headers);
    }

    /// Applies the response-side header operations of a response from
    /// destination `index` (`None`: a local answer, only the route's).
    pub fn apply_response_headers(&self, index: Option<usize>, headers: &mut HeaderMap) {
        if let Some(d) = index.and_then(|i| self.destination(i)) {
            d.response.apply(headers);
        }
        self.headers.response.apply(headers);
    }
}

/// Parses a header name for a rule (lowercase, as HTTP/2 needs). Pseudo
/// headers and the hop-by-hop or framing headers a mesh must own are refused,
/// as Envoy refuses them in `*_headers_to_add` / `_remove`.
pub fn header_name(name: &str) -> Result<HeaderName, Error> {
    if name.starts_with(':') {
        return Err(Error::invalid(format!(
            "pseudo-header {name:?} cannot be changed (use rewrite.authority / rewrite.uri)"
        )));
    }
    let parsed = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        .map_err(|_| Error::invalid(format!("invalid header name {name:?}")))?;
    if matches!(
        parsed.as_str(),
        "host" | "connection" | "transfer-encoding" | "content-length" | "te" | "upgrade"
    ) {
        return Err(Error::invalid(format!(
            "header {name:?} cannot be changed by a route (use rewrite.authority for the host)"
        )));
    }
    Ok(parsed)
}

/// Parses a header value for a rule.
pub fn header_value(name: &str, value: &str) -> Result<HeaderValue, Error> {
    HeaderValue::from_str(value)
        .map_err(|_| Error::invalid(format!("invalid value {value:?} for header {name:?}")))
}

/// The redirect statuses Envoy can send.
pub fn redirect_status(code: u32) -> Result<StatusCode, Error> {
    match code {
        301 | 302 | 303 | 307 | 308 => Ok(StatusCode::from_u16(code as u16).unwrap_or_default()),
        other => Err(Error::invalid(format!(
            "redirect code {other} is not one of 301, 302, 303, 307, 308"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(set: &[(&str, &str)], add: &[(&str, &str)], remove: &[&str]) -> HeaderOps {
        let pair = |(n, v): &(&str, &str)| (header_name(n).unwrap(), header_value(n, v).unwrap());
        HeaderOps {
            set: set.iter().map(pair).collect(),
            add: add.iter().map(pair).collect(),
            remove: remove.iter().map(|n| header_name(n).unwrap()).collect(),
        }
    }

    fn values(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn removals_then_set_then_add() {
        let mut h = HeaderMap::new();
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        h.insert("x-gone", HeaderValue::from_static("v"));
        h.insert("x-b", HeaderValue::from_static("old"));
        // `remove` and `set` of one name: the set value stays.
        ops(
            &[("x-a", "set"), ("X-New", "n")],
            &[("x-b", "more"), ("x-a", "added")],
            &["x-gone", "x-a"],
        )
        .apply(&mut h);
        assert_eq!(values(&h, "x-a"), ["set", "added"]);
        assert_eq!(values(&h, "x-b"), ["old", "more"]);
        assert_eq!(values(&h, "x-new"), ["n"]);
        assert!(h.get("x-gone").is_none());
    }

    #[test]
    fn the_route_s_set_wins_over_the_destination_s() {
        let traffic = Traffic {
            headers: HeaderRules {
                request: ops(&[("x-who", "route")], &[], &[]),
                response: ops(&[], &[("x-resp", "route")], &[]),
            },
            destinations: Arc::from([
                HeaderRules {
                    request: ops(&[("x-who", "v1"), ("x-v1", "yes")], &[], &[]),
                    response: ops(&[], &[("x-resp", "v1")], &[]),
                },
                HeaderRules::default(),
            ]),
            ..Traffic::default()
        };
        let mut h = HeaderMap::new();
        traffic.apply_request_headers(0, &mut h);
        assert_eq!(values(&h, "x-who"), ["route"]);
        assert_eq!(values(&h, "x-v1"), ["yes"]);
        let mut h = HeaderMap::new();
        traffic.apply_request_headers(1, &mut h);
        assert_eq!(values(&h, "x-who"), ["route"]);
        assert!(h.get("x-v1").is_none());
        let mut r = HeaderMap::new();
        traffic.apply_response_headers(Some(0), &mut r);
        assert_eq!(values(&r, "x-resp"), ["v1", "route"]);
        let mut r = HeaderMap::new();
        traffic.apply_response_headers(None, &mut r);
        assert_eq!(values(&r, "x-resp"), ["route"]);
    }

    #[test]
    fn prefix_rewrites_replace_what_the_route_matched() {
        let rw = Rewrite {
            path: Some(PathRewrite::Prefix(Arc::from("/v2"))),
            authority: None,
        };
        let prefix = PathMatch::Prefix(Arc::from("/v1"));
        assert_eq!(
            rw.path_for("/v1/items", &prefix).as_deref(),
            Some("/v2/items")
        );
        assert_eq!(rw.path_for("/v1", &prefix).as_deref(), Some("/v2"));
        let exact = PathMatch::Exact(Arc::from("/old"));
        assert_eq!(rw.path_for("/old", &exact).as_deref(), Some("/v2"));
        let root = Rewrite {
            path: Some(PathRewrite::Prefix(Arc::from("/"))),
            authority: None,
        };
        assert_eq!(
            root.path_for("/api/items", &PathMatch::Prefix(Arc::from("/api/")))
                .as_deref(),
            Some("/items")
        );
        assert_eq!(Rewrite::default().path_for("/x", &prefix), None);
    }

    #[test]
    fn regex_rewrites_take_envoy_s_group_syntax() {
        let r = RegexRewrite::new("^/service/([^/]+)(/.*)$", "\\2/instance/\\1").unwrap();
        assert_eq!(r.apply("/service/foo/v1/api"), "/v1/api/instance/foo");
        // Every match is replaced; a `$` is literal.
        let all = RegexRewrite::new("o", "0$").unwrap();
        assert_eq!(all.apply("/foo/boo"), "/f0$0$/b0$0$");
        let e = RegexRewrite::new("^/(a)$", "/\\2").unwrap_err();
        assert!(e.to_string().contains("names group \\2"), "{e}");
        assert!(RegexRewrite::new("(", "x").is_err());
    }

    #[test]
    fn redirect_locations() {
        let origin = Origin {
            scheme: "http",
            authority: "catalog:8080",
            path: "/v1/items",
            query: Some("page=2"),
        };
        let r =
            |path: Option<&str>, authority: Option<&str>, port, scheme: Option<&str>| Redirect {
                path: path.map(Arc::from),
                authority: authority.map(Arc::from),
                port,
                scheme: scheme.map(Arc::from),
                status: StatusCode::MOVED_PERMANENTLY,
            };
        assert_eq!(
            r(Some("/v2/items"), None, None, None).location(&origin),
            "http://catalog:8080/v2/items?page=2"
        );
        assert_eq!(
            r(None, Some("shop.example"), None, Some("https")).location(&origin),
            "https://shop.example/v1/items?page=2"
        );
        assert_eq!(
            r(Some("/new?x=1"), Some("a:9000"), Some(443), Some("https")).location(&origin),
            "https://a/new?x=1"
        );
        assert_eq!(
            r(None, None, Some(9090), None).location(&Origin {
                query: None,
                ..origin
            }),
            "http://catalog:9090/v1/items"
        );
        assert_eq!(split_port("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_port("[::1]"), ("[::1]", None));
        assert_eq!(split_port("catalog"), ("catalog", None));
    }

    #[test]
    fn rule_headers_are_checked() {
        assert_eq!(header_name("X-Mixed").unwrap().as_str(), "x-mixed");
        for bad in [":path", "host", "Content-Length", "bad name", ""] {
            assert!(header_name(bad).is_err(), "{bad}");
        }
        assert!(header_value("x", "a\nb").is_err());
        assert!(redirect_status(301).is_ok());
        assert!(redirect_status(200).is_err());
    }

    #[test]
    fn shadow_hosts() {
        assert_eq!(shadow_authority("catalog:8080"), "catalog-shadow:8080");
        assert_eq!(shadow_authority("catalog"), "catalog-shadow");
        assert_eq!(shadow_authority("[::1]:80"), "[::1]-shadow:80");
    }

    #[test]
    fn emptiness() {
        assert!(Traffic::default().is_empty());
        let t = Traffic {
            destinations: Arc::from([HeaderRules::default()]),
            ..Traffic::default()
        };
        assert!(t.is_empty());
        assert!(t.destination(0).is_none());
    }
}

//! Route matching, as Envoy and gRPC (gRFC A28) do it.
//!
//! A request is matched in two steps: its host selects one virtual host (the
//! best domain match: exact, then the longest `*.suffix` / `prefix*` wildcard,
//! then `*`), then the first route of that host whose every condition holds
//! wins, which is Istio's "first match wins" over `http[]`. Nothing here
//! allocates: the request is seen through [`RequestView`].
//!
//! As in Envoy, a route with `case_sensitive: false` (Istio's
//! `ignoreUriCase`) compares prefix and exact paths ignoring ASCII case (a
//! regex as written), and the pseudo-headers `:authority` (the `Host`
//! header of an HTTP/1 request in origin form), `:scheme` (`http` when the
//! request line has none), `:method` and `:path` are matched like headers
//! (Istio's `match.authority`, `match.scheme`, `match.method`).

use http::HeaderMap;

use crate::model::{
    HeaderMatch, PathMatch, QueryParamMatch, Route, RouteConfig, RouteMatch, ValueMatch,
    VirtualHost,
};

/// The parts of a request that routing reads.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The method (`GET`).
    pub method: &'a str,
    /// The authority as sent (`catalog:8080`), used for `:authority` matches.
    pub authority: &'a str,
    /// The scheme (`http`, `https`), used for `:scheme` matches: the URI's,
    /// else `http` (what Envoy sets on a plaintext HTTP/1 request, whose
    /// request line carries no scheme).
    pub scheme: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    /// The raw query string, without `?`.
    pub query: Option<&'a str>,
    /// The headers.
    pub headers: &'a HeaderMap,
}

impl<'a> RequestView<'a> {
    /// A view of an `http` request's head; `authority` is what routing
    /// should treat as the host (the URI's, else the `host` header).
    pub fn new(
        method: &'a http::Method,
        uri: &'a http::Uri,
        headers: &'a HeaderMap,
        authority: &'a str,
    ) -> Self {
        RequestView {
            method: method.as_str(),
            authority,
            scheme: uri.scheme_str().unwrap_or("http"),
            path: uri.path(),
            query: uri.query(),
            headers,
        }
    }
}

impl RouteConfig {
    /// The virtual host that serves `host`: a domain equal to the authority
    /// as sent (`catalog:8080`, as gRPC matches its target) wins; otherwise
    /// the best match for the host without its port, or `None`.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        self.virtual_hosts.get(self.virtual_host_index(host)?)
    }

    /// The index in [`virtual_hosts`](RouteConfig::virtual_hosts) of the
    /// virtual host that serves `host` (see [`virtual_host`](Self::virtual_host)).
    pub fn virtual_host_index(&self, host: &str) -> Option<usize> {
        let bare = strip_port(host);
        if bare.len() != host.len()
            && let Some(vh) = self.best_virtual_host(host, true)
        {
            return Some(vh);
        }
        self.best_virtual_host(bare, false)
    }

    fn best_virtual_host(&self, host: &str, exact_only: bool) -> Option<usize> {
        let mut best: Option<(usize, DomainScore)> = None;
        for (i, vh) in self.virtual_hosts.iter().enumerate() {
            for d in vh.domains.iter() {
                if let Some(score) = domain_score(d, host)
                    && (!exact_only || score.class == 3)
                    && best.as_ref().is_none_or(|(_, s)| score > *s)
                {
                    best = Some((i, score));
                }
            }
        }
        best.map(|(i, _)| i)
    }

    /// The first route of the matching virtual host that matches `req`.
    pub fn find(&self, host: &str, req: &RequestView<'_>) -> Option<&Route> {
        self.virtual_host(host)?.find(req)
    }
}

impl VirtualHost {
    /// The first route whose conditions all hold.
    pub fn find(&self, req: &RequestView<'_>) -> Option<&Route> {
        self.routes.get(self.find_index(req)?)
    }

    /// The index in [`routes`](VirtualHost::routes) of the first route
    /// whose conditions all hold.
    pub fn find_index(&self, req: &RequestView<'_>) -> Option<usize> {
        self.routes.iter().position(|r| r.matcher.matches(req))
    }
}

impl RouteMatch {
    /// Whether every condition holds for `req`.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        path_matches(&self.path, req.path, self.ignore_case)
            && self.headers.iter().all(|h| h.matches(req))
            && self.query_params.iter().all(|q| q.matches(req.query))
    }

    /// Whether the path alone decides this matcher (no header or query
    /// parameter condition): then [`matches_path`](Self::matches_path)
    /// answers what [`matches`](Self::matches) would. A caller can check
    /// a route like Istio's catch-all (`prefix: /`) without building a
    /// [`RequestView`].
    pub fn is_path_only(&self) -> bool {
        self.headers.is_empty() && self.query_params.is_empty()
    }

    /// Whether the path condition holds for `path` (without its query
    /// string); the whole match for a [path-only](Self::is_path_only)
    /// matcher.
    pub fn matches_path(&self, path: &str) -> bool {
        path_matches(&self.path, path, self.ignore_case)
    }
}

/// Envoy's path match: with `ignore_case` (`case_sensitive: false`),
/// prefix and exact paths compare ASCII letters case-insensitively (bytes,
/// no allocation); a regex is matched as written.
fn path_matches(m: &PathMatch, path: &str, ignore_case: bool) -> bool {
    match m {
        PathMatch::Prefix(p) if ignore_case => path
            .as_bytes()
            .get(..p.len())
            .is_some_and(|head| head.eq_ignore_ascii_case(p.as_bytes())),
        PathMatch::Exact(p) if ignore_case => path.eq_ignore_ascii_case(p),
        PathMatch::Prefix(p) => path.starts_with(&**p),
        PathMatch::Exact(p) => path == &**p,
        PathMatch::Regex(re) => re.is_match(path),
    }
}

impl HeaderMatch {
    /// Whether this condition holds. Pseudo-headers `:method`, `:authority`,
    /// `:scheme` and `:path` read the request line, as in Envoy (for
    /// HTTP/1, `:authority` is the `Host` header). Several values of one
    /// header are matched joined by `,`, as Envoy does.
    pub fn matches(&self, req: &RequestView<'_>) -> bool {
        let result = match &*self.name {
            ":method" => self.value.matches(Some(req.method)),
            ":authority" | "host" => self.value.matches(Some(req.authority)),
            ":path" => self.value.matches(Some(req.path)),
            ":scheme" => self.value.matches(Some(req.scheme)),
            name => {
                let mut values = req.headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (None, _) => self.value.matches(None),
                    (Some(v), None) => self.value.matches(Some(v.to_str().unwrap_or(""))),
                    (Some(first), Some(second)) => {
                        let mut joined = String::new();
                        for v in [first, second].into_iter().chain(values) {
                            if !joined.is_empty() {
                                joined.push(',');
                            }
                            joined.push_str(v.to_str().unwrap_or(""));
                        }
                        self.value.matches(Some(&joined))
                    }
                }
            }
        };
        result != self.invert
    }
}

impl QueryParamMatch {
    /// Whether this condition holds for the raw query string. Values are
    /// compared as sent (no percent-decoding), as Envoy does.
    pub fn matches(&self, query: Option<&str>) -> bool {
        let value = query.and_then(|q| {
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == &*self.name).then_some(v)
            })
        });
        self.value.matches(value)
    }
}

impl ValueMatch {
    /// Whether `value` (None = absent) satisfies this condition.
    pub fn matches(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (ValueMatch::Present(want), v) => v.is_some() == *want,
            (_, None) => false,
            (ValueMatch::Exact(e), Some(v)) => v == &**e,
            (ValueMatch::Prefix(p), Some(v)) => v.starts_with(&**p),
            (ValueMatch::Regex(re), Some(v)) => re.is_match(v),
        }
    }
}

/// `host:port` → `host`; leaves IPv6 literals (`[::1]:80`) as `[::1]`.
pub fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.find(']') {
            Some(i) => &authority[..i + 2],
            None => authority,
        };
    }
    // The trailing digits, then a ':' before them (what `rsplit_once(':')`
    // with an all-digit port finds, without searching the whole name for a
    // colon it usually does not have).
    let bytes = authority.as_bytes();
    let digits = bytes
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    match (bytes.len() - digits).checked_sub(1) {
        Some(colon) if bytes[colon] == b':' => &authority[..colon],
        _ => authority,
    }
}

/// How well a domain pattern matches: exact beats wildcard, longer wildcard
/// beats shorter, suffix beats prefix at equal length, `*` is last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct DomainScore {
    class: u8,
    len: usize,
}

fn domain_score(pattern: &str, host: &str) -> Option<DomainScore> {
    if pattern == "*" {
        return Some(DomainScore { class: 0, len: 0 });
    }
    let host_matches_ci = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    if let Some(suffix) = pattern.strip_prefix('*') {
        // A host whose suffix of that byte length starts inside a
        // character cannot equal an ASCII-case-insensitive suffix (and
        // slicing there would panic).
        let ok = host.len() > suffix.len()
            && host.is_char_boundary(host.len() - suffix.len())
            && host_matches_ci(&host[host.len() - suffix.len()..], suffix);
        return ok.then_some(DomainScore {
            class: 2,
            len: pattern.len(),
        });
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        let ok = host.len() > prefix.len()
            && host.is_char_boundary(prefix.len())
            && host_matches_ci(&host[..prefix.len()], prefix);
        return ok.then_some(DomainScore {
            class: 1,
            len: pattern.len(),
        });
    }
    host_matches_ci(pattern, host).then_some(DomainScore {
        class: 3,
        len: pattern.len(),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::{Pattern, WeightedClusters};

    fn route(name: &str, matcher: RouteMatch) -> Route {
        Route {
            name: name.into(),
            matcher,
            action: WeightedClusters::single(name),
            policy: Default::default(),
        }
    }

    fn vh(name: &str, domains: &[&str], routes: Vec<Route>) -> VirtualHost {
        VirtualHost {
            name: name.into(),
            domains: domains.iter().map(|d| Arc::from(*d)).collect(),
            routes: routes.into(),
        }
    }

    fn header(name: &str, value: ValueMatch, invert: bool) -> HeaderMatch {
        HeaderMatch {
            name: name.into(),
            value,
            invert,
        }
    }

    fn req<'a>(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method,
            authority: "catalog",
            scheme: "http",
            path,
            query,
            headers,
        }
    }

    #[test]
    fn virtual_host_prefers_exact_then_longest_wildcard_then_star() {
        let rc = RouteConfig {
            name: "r".into(),
            virtual_hosts: vec![
                vh("star", &["*"], vec![]),
                vh("suffix", &["*.shop.svc"], vec![]),
                vh("longsuffix", &["*.catalog.shop.svc"], vec![]),
                vh("exact", &["catalog.shop.svc"], vec![]),
                vh("prefix", &["catalog.*"], vec![]),
            ]
            .into(),
        };
        let name = |h| rc.virtual_host(h).map(|v| v.name.to_string());
        assert_eq!(name("catalog.shop.svc:8080").as_deref(), Some("exact"));
        assert_eq!(name("CATALOG.shop.svc").as_deref(), Some("exact"));
        assert_eq!(name("a.catalog.shop.svc").as_deref(), Some("longsuffix"));
        assert_eq!(name("cart.shop.svc").as_deref(), Some("suffix"));
        assert_eq!(name("catalog.other").as_deref(), Some("prefix"));
        assert_eq!(name("other").as_deref(), Some("star"));
    }

    #[test]
    fn a_port_in_the_authority_selects_that_ports_domains() {
        let rc = RouteConfig {
            name: "r".into(),
            virtual_hosts: vec![
                vh("p8080", &["catalog:8080"], vec![]),
                vh("default", &["catalog"], vec![]),
            ]
            .into(),
        };
        let name = |h| rc.virtual_host(h).map(|v| v.name.to_string());
        assert_eq!(name("catalog:8080").as_deref(), Some("p8080"));
        assert_eq!(name("catalog").as_deref(), Some("default"));
        assert_eq!(name("catalog:9090").as_deref(), Some("default"));
    }

    #[test]
    fn first_matching_route_wins() {
        let beta = RouteMatch {
            headers: vec![header("x-user", ValueMatch::Exact("beta".into()), false)].into(),
            ..RouteMatch::any()
        };
        let api = RouteMatch {
            path: PathMatch::Prefix("/api".into()),
            ..RouteMatch::any()
        };
        let host = vh(
            "h",
            &["*"],
            vec![
                route("beta", beta),
                route("api", api),
                route("all", RouteMatch::any()),
            ],
        );
        let mut h = HeaderMap::new();
        assert_eq!(
            &*host.find(&req("GET", "/api/x", None, &h)).unwrap().name,
            "api"
        );
        assert_eq!(
            &*host.find(&req("GET", "/other", None, &h)).unwrap().name,
            "all"
        );
        h.insert("x-user", "beta".parse().unwrap());
        assert_eq!(
            &*host.find(&req("GET", "/api/x", None, &h)).unwrap().name,
            "beta"
        );
        h.insert("x-user", "gamma".parse().unwrap());
        assert_eq!(
            &*host.find(&req("GET", "/api/x", None, &h)).unwrap().name,
            "api"
        );
    }

    /// A path-only matcher's `matches_path` agrees with `matches`; a
    /// matcher with a header or query condition is not path-only.
    #[test]
    fn path_only_matchers_agree_with_the_full_match() {
        let h = HeaderMap::new();
        let folded = RouteMatch {
            path: PathMatch::Prefix("/Api".into()),
            ignore_case: true,
            ..RouteMatch::any()
        };
        for m in [RouteMatch::any(), folded] {
            assert!(m.is_path_only());
            for path in ["/", "/api/x", "/API", "/other", "*"] {
                assert_eq!(
                    m.matches_path(path),
                    m.matches(&req("GET", path, None, &h)),
                    "{path}"
                );
            }
        }
        let with_header = RouteMatch {
            headers: vec![header("x-user", ValueMatch::Exact("beta".into()), false)].into(),
            ..RouteMatch::any()
        };
        assert!(!with_header.is_path_only());
        let with_query = RouteMatch {
            query_params: vec![QueryParamMatch {
                name: "v".into(),
                value: ValueMatch::Present(true),
            }]
            .into(),
            ..RouteMatch::any()
        };
        assert!(!with_query.is_path_only());
    }

    #[test]
    fn path_kinds() {
        let h = HeaderMap::new();
        assert!(path_matches(&PathMatch::Exact("/a".into()), "/a", false));
        assert!(!path_matches(&PathMatch::Exact("/a".into()), "/a/", false));
        assert!(path_matches(&PathMatch::Prefix("/a".into()), "/ab", false));
        let re = PathMatch::Regex(Pattern::new("/items/[0-9]+").unwrap());
        assert!(path_matches(&re, "/items/42", false));
        assert!(
            !path_matches(&re, "/items/42/x", false),
            "regex is a full match"
        );
        assert!(RouteMatch::any().matches(&req("GET", "/anything", None, &h)));
    }

    #[test]
    fn ignore_case_folds_prefix_and_exact_paths_only() {
        let prefix = PathMatch::Prefix("/Catalog/".into());
        assert!(!path_matches(&prefix, "/catalog/items", false));
        assert!(path_matches(&prefix, "/catalog/items", true));
        assert!(path_matches(&prefix, "/CATALOG/items", true));
        assert!(
            !path_matches(&prefix, "/catalo", true),
            "shorter than the prefix"
        );
        // A multi-byte character where the prefix ends: no panic, no match.
        assert!(!path_matches(&PathMatch::Prefix("/a".into()), "/é", true));
        let exact = PathMatch::Exact("/Health".into());
        assert!(path_matches(&exact, "/HEALTH", true));
        assert!(!path_matches(&exact, "/HEALTH", false));
        assert!(!path_matches(&exact, "/healthz", true));
        // Envoy: case_sensitive does not apply to safe_regex.
        let re = PathMatch::Regex(Pattern::new("/items").unwrap());
        assert!(!path_matches(&re, "/ITEMS", true));
        let h = HeaderMap::new();
        let m = RouteMatch {
            path: prefix,
            ignore_case: true,
            ..RouteMatch::any()
        };
        assert!(m.matches(&req("GET", "/CaTaLoG/x", None, &h)));
    }

    #[test]
    fn authority_and_scheme_are_pseudo_headers() {
        let h = HeaderMap::new();
        let uri: http::Uri = "https://catalog.shop:8443/x".parse().unwrap();
        let method = http::Method::GET;
        let tls = RequestView::new(&method, &uri, &h, "catalog.shop:8443");
        assert_eq!(tls.scheme, "https");
        let origin_form: http::Uri = "/x".parse().unwrap();
        let plain = RequestView::new(&method, &origin_form, &h, "catalog.shop");
        assert_eq!(plain.scheme, "http", "no scheme in the request line: http");
        let scheme = header(":scheme", ValueMatch::Exact("https".into()), false);
        assert!(scheme.matches(&tls));
        assert!(!scheme.matches(&plain));
        let authority = header(
            ":authority",
            ValueMatch::Prefix("catalog.shop".into()),
            false,
        );
        assert!(authority.matches(&tls) && authority.matches(&plain));
        let exact = header(
            ":authority",
            ValueMatch::Exact("catalog.shop".into()),
            false,
        );
        assert!(
            !exact.matches(&tls),
            "the authority is matched as sent, port included"
        );
        assert!(exact.matches(&plain));
    }

    #[test]
    fn header_kinds_and_invert() {
        let mut h = HeaderMap::new();
        h.insert("x-a", "hello".parse().unwrap());
        h.append("x-multi", "a".parse().unwrap());
        h.append("x-multi", "b".parse().unwrap());
        let r = req("POST", "/", None, &h);
        let cases = [
            (
                header("x-a", ValueMatch::Exact("hello".into()), false),
                true,
            ),
            (header("x-a", ValueMatch::Prefix("he".into()), false), true),
            (header("x-a", ValueMatch::Prefix("lo".into()), false), false),
            (
                header(
                    "x-a",
                    ValueMatch::Regex(Pattern::new("h.*o").unwrap()),
                    false,
                ),
                true,
            ),
            (header("x-a", ValueMatch::Present(true), false), true),
            (header("x-b", ValueMatch::Present(true), false), false),
            (header("x-b", ValueMatch::Present(false), false), true),
            (header("x-b", ValueMatch::Exact("x".into()), true), true),
            (
                header("x-a", ValueMatch::Exact("hello".into()), true),
                false,
            ),
            (
                header(":method", ValueMatch::Exact("POST".into()), false),
                true,
            ),
            (
                header(":method", ValueMatch::Exact("GET".into()), false),
                false,
            ),
            (
                header("x-multi", ValueMatch::Exact("a,b".into()), false),
                true,
            ),
        ];
        for (i, (m, want)) in cases.iter().enumerate() {
            assert_eq!(m.matches(&r), *want, "case {i}: {m:?}");
        }
    }

    #[test]
    fn query_params() {
        let m = |v| QueryParamMatch {
            name: "tier".into(),
            value: v,
        };
        assert!(m(ValueMatch::Exact("gold".into())).matches(Some("a=1&tier=gold")));
        assert!(!m(ValueMatch::Exact("gold".into())).matches(Some("tier=silver")));
        assert!(!m(ValueMatch::Exact("gold".into())).matches(None));
        assert!(m(ValueMatch::Present(true)).matches(Some("tier")));
        assert!(m(ValueMatch::Present(false)).matches(Some("other=1")));
        assert!(m(ValueMatch::Prefix("go".into())).matches(Some("tier=gold")));
    }

    #[test]
    fn strip_port_handles_ipv6() {
        assert_eq!(strip_port("catalog:8080"), "catalog");
        assert_eq!(strip_port("catalog"), "catalog");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("[::1]"), "[::1]");
        assert_eq!(strip_port("catalog:"), "catalog");
        assert_eq!(strip_port("a:b:80"), "a:b");
        assert_eq!(strip_port("a:8b"), "a:8b");
        assert_eq!(strip_port("8080"), "8080");
        assert_eq!(strip_port(":80"), "");
    }
}

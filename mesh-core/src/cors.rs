//! Cross-origin resource sharing (CORS), decided as Envoy's `cors` filter
//! decides it (`envoy.filters.http.cors`, per-route
//! `envoy.extensions.filters.http.cors.v3.CorsPolicy`), for Istio's
//! VirtualService `corsPolicy`.
//!
//! The browser talks to the *server*, so the server stack enforces this
//! (see `mesh_tower::cors`). A server has an ordered list of
//! [`CorsRoute`]s (the VirtualService `http[]` routes of the services it
//! backs, with their matches); the first whose match a request meets
//! gives the policy, as Envoy's route lookup does. For a request:
//!
//! - without an `Origin` header (or an empty one), or matching no route
//!   with a policy: [`Decision::Pass`], nothing changes. This is the path
//!   of every non-browser request and costs one header lookup (no route
//!   is matched, nothing is allocated);
//! - a *preflight* (`OPTIONS` with `Origin` and a non-empty
//!   `Access-Control-Request-Method`) from an allowed origin:
//!   [`Decision::Preflight`], answered by the server stack with 200 and
//!   no body, never reaching the app: `access-control-allow-origin` (the
//!   request's origin), `-allow-credentials: true` when set,
//!   `-allow-methods`, `-allow-headers` (a configured `*` echoes the
//!   request's `Access-Control-Request-Method` / `-Headers`, as Envoy
//!   does) and `-max-age`, each when configured;
//! - a preflight from an origin not allowed: passed on to the app (Envoy's
//!   default, Istio's `unmatchedPreflights: FORWARD`) with no CORS header
//!   added; with `IGNORE` (Envoy's `forward_not_matching_preflights:
//!   false`) answered 200 like an allowed one but without
//!   `access-control-allow-origin`, which is what Envoy sends: the browser
//!   fails the preflight, and the app never sees it;
//! - any other request from an allowed origin: [`Decision::Annotate`], the
//!   app's response gets `access-control-allow-origin` (the origin),
//!   `-allow-credentials: true` when set and `-expose-headers` when
//!   configured. From an origin not allowed: nothing is added.
//!
//! An origin is allowed when a matcher of `allow_origins` matches it, or
//! matches the string `*` (so `exact: "*"` allows every origin, as in
//! Envoy). Header values are kept as `HeaderValue`s made once from the
//! config, so answering copies reference-counted values.

use std::sync::Arc;

use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
};
use http::{HeaderMap, HeaderValue};

use crate::model::{RouteMatch, ValueMatch};
use crate::route::RequestView;

/// One route's CORS policy (Envoy's per-route `CorsPolicy`; Istio's
/// `corsPolicy` translated as Istio translates it: lists joined by `,`,
/// `maxAge` in whole seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsPolicy {
    /// `allowOrigins` (exact, prefix or regex; a [`ValueMatch::Present`]
    /// is not an origin matcher and matches nothing).
    pub allow_origins: Arc<[ValueMatch]>,
    /// `Access-Control-Allow-Methods` (`None`: not sent; `*`: echoes the
    /// requested method).
    pub allow_methods: Option<HeaderValue>,
    /// `Access-Control-Allow-Headers` (`None`: not sent; `*`: echoes the
    /// requested headers).
    pub allow_headers: Option<HeaderValue>,
    /// `Access-Control-Expose-Headers` on responses to allowed requests.
    pub expose_headers: Option<HeaderValue>,
    /// `Access-Control-Max-Age` (seconds) on preflight answers.
    pub max_age: Option<HeaderValue>,
    /// `allowCredentials`: `Some(true)` sends
    /// `Access-Control-Allow-Credentials: true`.
    pub allow_credentials: Option<bool>,
    /// Envoy's `forward_not_matching_preflights` (`None`: Envoy's default,
    /// true). Istio's `unmatchedPreflights: IGNORE` is `Some(false)`,
    /// `FORWARD` is `Some(true)`.
    pub forward_not_matching_preflights: Option<bool>,
}

/// A server's route as far as CORS is concerned: the conditions, and the
/// policy of the route (`None`: a route without `corsPolicy`, which still
/// wins over later routes when it matches first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsRoute {
    /// The VirtualService route's match (one entry of its ORed `match[]`).
    pub matcher: RouteMatch,
    /// Its policy.
    pub policy: Option<Arc<CorsPolicy>>,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not a CORS request, or no policy applies: serve as usual.
    Pass,
    /// Answer the preflight now with 200, no body and these headers; the
    /// app never sees the request.
    Preflight(HeaderMap),
    /// Serve it, then add these headers to the app's response.
    Annotate(Annotation),
}

/// The headers to add to the response of an allowed CORS request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Annotation {
    origin: HeaderValue,
    policy: Arc<CorsPolicy>,
}

impl Annotation {
    /// Writes `access-control-allow-origin` (the request's origin),
    /// `-allow-credentials` and `-expose-headers` (when configured) on a
    /// response's headers, replacing what the app set, as Envoy does.
    pub fn apply(self, headers: &mut HeaderMap) {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, self.origin);
        if self.policy.allow_credentials == Some(true) {
            headers.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.policy.expose_headers {
            headers.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

impl CorsPolicy {
    /// Whether `origin` is allowed (see the module docs).
    pub fn allows(&self, origin: &str) -> bool {
        self.allow_origins
            .iter()
            .any(|m| m.matches(Some("*")) || m.matches(Some(origin)))
    }

    /// The decision for a request with `method` (`OPTIONS`) and `headers` under this
    /// policy (the route is already chosen).
    pub fn decide(self: &Arc<Self>, method: &str, headers: &HeaderMap) -> Decision {
        let Some(origin) = headers.get(ORIGIN).filter(|o| !o.is_empty()) else {
            return Decision::Pass;
        };
        // A non-UTF-8 origin matches no matcher (except one matching `*`).
        let allowed = self.allows(origin.to_str().unwrap_or("\u{0}"));
        let requested = headers
            .get(ACCESS_CONTROL_REQUEST_METHOD)
            .filter(|m| !m.is_empty());
        let preflight = method == "OPTIONS" && requested.is_some();
        if !preflight {
            return if allowed {
                Decision::Annotate(Annotation {
                    origin: origin.clone(),
                    policy: Arc::clone(self),
                })
            } else {
                Decision::Pass
            };
        }
        if !allowed && self.forward_not_matching_preflights != Some(false) {
            return Decision::Pass;
        }
        let mut answer = HeaderMap::new();
        if allowed {
            answer.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        }
        if self.allow_credentials == Some(true) {
            answer.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        let echo = |configured: &HeaderValue, requested: Option<&HeaderValue>| {
            if configured == "*" {
                requested.cloned().unwrap_or(HeaderValue::from_static(""))
            } else {
                configured.clone()
            }
        };
        if let Some(m) = &self.allow_methods {
            answer.insert(ACCESS_CONTROL_ALLOW_METHODS, echo(m, requested));
        }
        if let Some(h) = &self.allow_headers {
            let requested = headers.get(ACCESS_CONTROL_REQUEST_HEADERS);
            answer.insert(ACCESS_CONTROL_ALLOW_HEADERS, echo(h, requested));
        }
        if let Some(age) = &self.max_age {
            answer.insert(ACCESS_CONTROL_MAX_AGE, age.clone());
        }
        Decision::Preflight(answer)
    }
}

/// The decision for `req` under a server's `routes`: [`Decision::Pass`]
/// at the cost of one header lookup when the request has no `Origin`;
/// otherwise the first route whose match holds decides with its policy.
pub fn decide(routes: &[CorsRoute], req: &RequestView<'_>) -> Decision {
    if routes.is_empty() || req.headers.get(ORIGIN).is_none_or(|o| o.is_empty()) {
        return Decision::Pass;
    }
    let Some(route) = routes.iter().find(|r| r.matcher.matches(req)) else {
        return Decision::Pass;
    };
    let Some(policy) = &route.policy else {
        return Decision::Pass;
    };
    policy.decide(req.method, req.headers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HeaderMatch, PathMatch, Pattern};

    fn hv(s: &'static str) -> Option<HeaderValue> {
        Some(HeaderValue::from_static(s))
    }

    /// Istio's reference example: `https://example.com`, POST and GET,
    /// `X-Foo-Bar`, 24 h.
    fn policy() -> Arc<CorsPolicy> {
        Arc::new(CorsPolicy {
            allow_origins: Arc::from([
                ValueMatch::Exact("https://example.com".into()),
                ValueMatch::Prefix("https://app.".into()),
                ValueMatch::Regex(Pattern::new(r"https://[a-z]+\.example\.org").unwrap()),
            ]),
            allow_methods: hv("POST,GET"),
            allow_headers: hv("X-Foo-Bar"),
            expose_headers: hv("X-Expose"),
            max_age: hv("86400"),
            allow_credentials: Some(false),
            forward_not_matching_preflights: None,
        })
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn preflight(origin: &'static str) -> HeaderMap {
        headers(&[
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "x-foo-bar"),
        ])
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_gets_exactly_the_configured_headers() {
        let Decision::Preflight(answer) =
            policy().decide("OPTIONS", &preflight("https://example.com"))
        else {
            panic!("not answered");
        };
        let got: Vec<(String, String)> = answer
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        assert_eq!(
            got,
            [
                ("access-control-allow-origin", "https://example.com"),
                ("access-control-allow-methods", "POST,GET"),
                ("access-control-allow-headers", "X-Foo-Bar"),
                ("access-control-max-age", "86400"),
            ]
            .map(|(k, v)| (k.to_string(), v.to_string()))
        );
    }

    #[test]
    fn origins_match_exactly_by_prefix_or_by_regex() {
        let p = policy();
        assert!(p.allows("https://example.com"));
        assert!(!p.allows("https://example.com.evil"));
        assert!(!p.allows("http://example.com"));
        assert!(p.allows("https://app.shop.io"));
        assert!(p.allows("https://www.example.org"));
        assert!(!p.allows("https://www.example.org:8443"));
        let star = CorsPolicy {
            allow_origins: Arc::from([ValueMatch::Exact("*".into())]),
            ..(*p).clone()
        };
        assert!(star.allows("https://anything.test"), "exact * allows all");
    }

    #[test]
    fn a_preflight_from_another_origin_is_forwarded_without_headers() {
        let p = policy();
        assert_eq!(
            p.decide("OPTIONS", &preflight("https://evil.test")),
            Decision::Pass
        );
        let forward = Arc::new(CorsPolicy {
            forward_not_matching_preflights: Some(true),
            ..(*p).clone()
        });
        assert_eq!(
            forward.decide("OPTIONS", &preflight("https://evil.test")),
            Decision::Pass
        );
    }

    #[test]
    fn ignore_answers_unmatched_preflights_without_allow_origin() {
        let p = Arc::new(CorsPolicy {
            forward_not_matching_preflights: Some(false),
            ..(*policy()).clone()
        });
        let Decision::Preflight(answer) = p.decide("OPTIONS", &preflight("https://evil.test"))
        else {
            panic!("IGNORE answers the preflight itself");
        };
        assert!(answer.get(ACCESS_CONTROL_ALLOW_ORIGIN).is_none());
        assert_eq!(answer[ACCESS_CONTROL_ALLOW_METHODS], "POST,GET");
    }

    #[test]
    fn simple_requests_from_allowed_origins_are_annotated() {
        let p = Arc::new(CorsPolicy {
            allow_credentials: Some(true),
            ..(*policy()).clone()
        });
        let Decision::Annotate(a) = p.decide("GET", &headers(&[("origin", "https://example.com")]))
        else {
            panic!("not annotated");
        };
        let mut response = headers(&[("access-control-allow-origin", "*"), ("x-app", "1")]);
        a.apply(&mut response);
        assert_eq!(response[ACCESS_CONTROL_ALLOW_ORIGIN], "https://example.com");
        assert_eq!(response[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert_eq!(response[ACCESS_CONTROL_EXPOSE_HEADERS], "X-Expose");
        assert_eq!(response["x-app"], "1");
        assert_eq!(response.len(), 4);
        // Not allowed: nothing.
        assert_eq!(
            p.decide("GET", &headers(&[("origin", "https://evil.test")])),
            Decision::Pass
        );
        // OPTIONS without Access-Control-Request-Method is not a preflight.
        assert!(matches!(
            p.decide("OPTIONS", &headers(&[("origin", "https://example.com")])),
            Decision::Annotate(_)
        ));
    }

    #[test]
    fn wildcards_echo_the_request_and_credentials_are_sent_when_true() {
        let p = Arc::new(CorsPolicy {
            allow_methods: hv("*"),
            allow_headers: hv("*"),
            max_age: None,
            allow_credentials: Some(true),
            ..(*policy()).clone()
        });
        let Decision::Preflight(answer) = p.decide("OPTIONS", &preflight("https://example.com"))
        else {
            panic!("not answered");
        };
        assert_eq!(answer[ACCESS_CONTROL_ALLOW_METHODS], "POST");
        assert_eq!(answer[ACCESS_CONTROL_ALLOW_HEADERS], "x-foo-bar");
        assert_eq!(answer[ACCESS_CONTROL_ALLOW_CREDENTIALS], "true");
        assert!(answer.get(ACCESS_CONTROL_MAX_AGE).is_none());
    }

    #[test]
    fn the_first_matching_route_decides_and_no_origin_passes() {
        let get = HeaderMatch {
            name: ":method".into(),
            value: ValueMatch::Exact("GET".into()),
            invert: false,
        };
        let api = RouteMatch {
            path: PathMatch::Prefix("/api".into()),
            ..RouteMatch::any()
        };
        let routes = [
            CorsRoute {
                matcher: RouteMatch {
                    path: PathMatch::Prefix("/api/private".into()),
                    ..RouteMatch::any()
                },
                policy: None,
            },
            CorsRoute {
                matcher: RouteMatch {
                    headers: Arc::from([get]),
                    ..api
                },
                policy: Some(policy()),
            },
        ];
        let view = |method: &'static str, path: &'static str, h: &'static HeaderMap| RequestView {
            method,
            authority: "shop",
            scheme: "http",
            path,
            query: None,
            headers: h,
        };
        let with_origin: &'static HeaderMap =
            Box::leak(Box::new(headers(&[("origin", "https://example.com")])));
        let without: &'static HeaderMap = Box::leak(Box::new(HeaderMap::new()));
        assert!(matches!(
            decide(&routes, &view("GET", "/api/items", with_origin)),
            Decision::Annotate(_)
        ));
        assert_eq!(
            decide(&routes, &view("GET", "/api/private/x", with_origin)),
            Decision::Pass,
            "an earlier route without a policy wins"
        );
        assert_eq!(
            decide(&routes, &view("POST", "/api/items", with_origin)),
            Decision::Pass,
            "the route's method condition does not hold"
        );
        assert_eq!(
            decide(&routes, &view("GET", "/other", with_origin)),
            Decision::Pass
        );
        assert_eq!(
            decide(&routes, &view("GET", "/api/items", without)),
            Decision::Pass
        );
        assert_eq!(
            decide(&[], &view("GET", "/api", with_origin)),
            Decision::Pass
        );
    }
}

//! Route matching (`mesh_core::route`), structure-aware: an arbitrary route
//! table (virtual hosts with domain patterns; routes with path, header and
//! query conditions, regexes included) and an arbitrary request (method,
//! authority, path, query, headers), then the virtual host and route lookup
//! and the weighted cluster pick, as the client stack does per request.
//! Beyond "no panic": the route found is the first route of the virtual host
//! found whose conditions hold, and a pick is one of the route's clusters.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mesh_core::model::{
    HeaderMatch, PathMatch, Pattern, QueryParamMatch, Route, RouteConfig, RouteMatch, ValueMatch,
    VirtualHost, WeightedCluster, WeightedClusters,
};
use mesh_core::route::{RequestView, strip_port};

#[derive(Arbitrary, Debug)]
struct Input {
    hosts: Vec<Host>,
    method: String,
    authority: String,
    path: String,
    query: Option<String>,
    headers: Vec<(String, Vec<u8>)>,
    random: u64,
}

#[derive(Arbitrary, Debug)]
struct Host {
    domains: Vec<String>,
    routes: Vec<RouteSpec>,
}

#[derive(Arbitrary, Debug)]
struct RouteSpec {
    path: Value,
    headers: Vec<(String, Value, bool)>,
    query: Vec<(String, Value)>,
    clusters: Vec<(String, u32)>,
}

#[derive(Arbitrary, Debug)]
enum Value {
    Exact(String),
    Prefix(String),
    Regex(String),
    Present(bool),
}

/// A pattern, unless the regex does not compile (the decoders reject those)
/// or is long enough to spend the run compiling it.
fn pattern(source: &str) -> Option<Pattern> {
    (source.len() <= 64).then(|| Pattern::new(source).ok())?
}

fn value(v: &Value) -> Option<ValueMatch> {
    Some(match v {
        Value::Exact(s) => ValueMatch::Exact(s.as_str().into()),
        Value::Prefix(s) => ValueMatch::Prefix(s.as_str().into()),
        Value::Regex(s) => ValueMatch::Regex(pattern(s)?),
        Value::Present(b) => ValueMatch::Present(*b),
    })
}

fn route(i: usize, spec: &RouteSpec) -> Option<Route> {
    let path = match &spec.path {
        Value::Exact(s) => PathMatch::Exact(s.as_str().into()),
        Value::Prefix(s) => PathMatch::Prefix(s.as_str().into()),
        Value::Regex(s) => PathMatch::Regex(pattern(s)?),
        Value::Present(_) => PathMatch::Prefix("/".into()),
    };
    let headers: Option<Vec<HeaderMatch>> = spec
        .headers
        .iter()
        .map(|(name, v, invert)| {
            Some(HeaderMatch {
                name: name.to_ascii_lowercase().into(),
                value: value(v)?,
                invert: *invert,
            })
        })
        .collect();
    let query_params: Option<Vec<QueryParamMatch>> = spec
        .query
        .iter()
        .map(|(name, v)| {
            Some(QueryParamMatch {
                name: name.as_str().into(),
                value: value(v)?,
            })
        })
        .collect();
    let action = WeightedClusters::new(
        spec.clusters
            .iter()
            .map(|(name, weight)| WeightedCluster {
                name: name.as_str().into(),
                weight: *weight,
            })
            .collect(),
    )
    .ok()?;
    Some(Route {
        name: format!("route-{i}").into(),
        matcher: RouteMatch {
            path,
            headers: headers?.into(),
            query_params: query_params?.into(),
            ignore_case: false,
        },
        action,
        policy: Default::default(),
    })
}

fuzz_target!(|input: Input| {
    let mut virtual_hosts = Vec::new();
    for (h, host) in input.hosts.iter().enumerate() {
        let routes: Option<Vec<Route>> = host
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| route(i, r))
            .collect();
        let Some(routes) = routes else {
            return;
        };
        virtual_hosts.push(VirtualHost {
            name: format!("vh-{h}").into(),
            domains: host
                .domains
                .iter()
                .map(|d| Arc::from(d.to_ascii_lowercase()))
                .collect(),
            routes: routes.into(),
        });
    }
    let config = RouteConfig {
        name: "fuzz".into(),
        virtual_hosts: virtual_hosts.into(),
    };
    let mut headers = http::HeaderMap::new();
    for (name, value) in &input.headers {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
    }
    let req = RequestView {
        method: &input.method,
        authority: &input.authority,
        scheme: "http",
        path: &input.path,
        query: input.query.as_deref(),
        headers: &headers,
    };
    let _ = strip_port(&input.authority);
    let found = config.find(&input.authority, &req);
    let vh = config.virtual_host(&input.authority);
    assert_eq!(
        found.is_some(),
        vh.is_some_and(|vh| vh.find(&req).is_some())
    );
    if let (Some(vh), Some(route)) = (vh, found) {
        let first = vh.routes.iter().position(|r| r.matcher.matches(&req));
        assert_eq!(first.map(|i| &vh.routes[i]), Some(route));
        let picked = route.action.pick(input.random);
        assert!(route.action.clusters().contains(picked));
    }
});

//! VirtualService `http[].corsPolicy` on the servers: which workloads
//! enforce a policy ([`CorsServices`], used by [`super::security`]: the
//! workloads backing the VirtualService's hosts) and what `check` notes
//! about it. Reading the policy itself is `cors_policy.rs`'s: `resources`
//! calls that parser while this module reads `resources`, so the two halves
//! live apart and imports run one way (issue 14).

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_core::cors::CorsRoute;
use mesh_core::model::RouteMatch;

use super::names::{cluster_local, resolve_host};
use super::resources::{Resource, Spec, VirtualService};
use super::yaml::Look;

/// What `mesh-control check` notes about a VirtualService's `corsPolicy`
/// entries: who enforces them (the rule of [`CorsServices`]), which is
/// narrower than Istio's (where any sidecar or gateway routing the host
/// does), and that caller matches never hold on the server.
pub(crate) fn notes(doc: Look<'_, '_>) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let http = doc.get("spec.http").map(|h| h.items()).unwrap_or_default();
    for (i, route) in http.iter().enumerate() {
        let Some(cors) = route.get("corsPolicy") else {
            continue;
        };
        out.push((
            cors.line,
            format!(
                "http[{i}].corsPolicy: enforced by the servers of the hosts (ServerLayer, \
                 serve_with), which answer browsers' preflights: the workloads selected by the \
                 host's ServiceEntry workloadSelector, else those of the host's namespace \
                 labelled app=<service> or with the labels of the WorkloadGroup named like it; \
                 clients do not apply it"
            ),
        ));
        let matches = route.get("match").map(|m| m.items()).unwrap_or_default();
        for (k, m) in matches.iter().enumerate() {
            for key in ["sourceLabels", "sourceNamespace"] {
                if let Some(f) = m.get(key) {
                    out.push((
                        f.line,
                        format!(
                            "http[{i}].match[{k}].{key}: a server cannot tell a browser's \
                             caller, so for the corsPolicy of this route this match never holds"
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// The VirtualService `corsPolicy` routes of the mesh, by the service they
/// are for, resolved for a server workload by [`CorsServices::for_workload`].
///
/// **Which servers.** A VirtualService's routes apply to the workloads that
/// back its hosts. The control server sees a server workload only as its
/// namespace, labels and port, so a workload backs a host when:
///
/// - the ServiceEntry declaring the host has a `workloadSelector`: the
///   workload is in the ServiceEntry's namespace and its labels match it
///   (how Istio selects a ServiceEntry's workloads);
/// - otherwise, for a cluster-local host `<name>.<ns>.svc.<suffix>`: the
///   workload is in `<ns>` and either the WorkloadGroup `<name>` there has
///   labels, all of which the workload has, or its `app` label is `<name>`
///   (the Kubernetes convention Istio reads as the canonical service).
///
/// **Which requests.** Every `match[]` entry of a route (or "every request"
/// when it has none) becomes one [`CorsRoute`] with the route's policy,
/// routes without a `corsPolicy` included, so that the first route a
/// request matches decides, as in Envoy; trailing routes without a policy
/// are dropped. Matches on the caller (`sourceLabels`,
/// `sourceNamespace`) cannot be judged for a browser and never match on
/// the server; a `match.port` applies to the server listening on that
/// port. Routes that answer themselves (`redirect`, `directResponse`) are
/// answered by the client and never reach the server (Envoy's `cors`
/// filter skips them too). Several VirtualServices for hosts one workload
/// backs apply in reading order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct CorsServices {
    services: Vec<CorsService>,
}

/// One VirtualService host's routes and how to tell its workloads.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CorsService {
    /// Who backs it.
    backers: Backers,
    /// The routes, with the port their `match.port` restricts them to.
    routes: Vec<(Option<u16>, CorsRoute)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Backers {
    /// A ServiceEntry's `workloadSelector`, in its namespace.
    Selector {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    /// A cluster-local service: its namespace and name, and the labels of
    /// the WorkloadGroup named like it, if any.
    Service {
        namespace: String,
        name: String,
        group: Option<BTreeMap<String, String>>,
    },
}

impl Backers {
    fn back(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        let has =
            |want: &BTreeMap<String, String>| want.iter().all(|(k, v)| labels.get(k) == Some(v));
        match self {
            Backers::Selector {
                namespace: ns,
                labels: want,
            } => ns == namespace && has(want),
            Backers::Service {
                namespace: ns,
                name,
                group,
            } => {
                ns == namespace
                    && (group.as_ref().is_some_and(|g| !g.is_empty() && has(g))
                        || labels.get("app").is_some_and(|a| a == name))
            }
        }
    }
}

impl CorsServices {
    /// The `corsPolicy` routes of `resources` (see the type docs).
    pub(crate) fn resolve(domain_suffix: &str, resources: &[&Resource]) -> Self {
        let mut selectors: BTreeMap<String, (String, BTreeMap<String, String>)> = BTreeMap::new();
        let mut groups: BTreeMap<(String, String), BTreeMap<String, String>> = BTreeMap::new();
        for r in resources {
            match &r.spec {
                Spec::ServiceEntry(se) => {
                    for h in &se.hosts {
                        let host = resolve_host(&h.value, &r.meta.namespace, domain_suffix);
                        if let Some(sel) = &se.selector {
                            selectors
                                .entry(host)
                                .or_insert_with(|| (r.meta.namespace.clone(), sel.clone()));
                        }
                    }
                }
                Spec::WorkloadGroup(g) => {
                    groups.insert(
                        (r.meta.namespace.clone(), r.meta.name.clone()),
                        g.labels.clone(),
                    );
                }
                _ => {}
            }
        }
        let mut services = Vec::new();
        for r in resources {
            let Spec::VirtualService(vs) = &r.spec else {
                continue;
            };
            if vs.http.iter().all(|h| h.cors.is_none()) {
                continue;
            }
            let routes = vs_routes(vs);
            for h in &vs.hosts {
                let host = resolve_host(&h.value, &r.meta.namespace, domain_suffix);
                let backers = if let Some((namespace, labels)) = selectors.get(&host) {
                    Backers::Selector {
                        namespace: namespace.clone(),
                        labels: labels.clone(),
                    }
                } else if let Some((name, ns)) = cluster_local(&host, domain_suffix) {
                    Backers::Service {
                        namespace: ns.to_string(),
                        name: name.to_string(),
                        group: groups.get(&(ns.to_string(), name.to_string())).cloned(),
                    }
                } else {
                    // An external host no workload of the mesh backs.
                    continue;
                };
                services.push(CorsService {
                    backers,
                    routes: routes.clone(),
                });
            }
        }
        CorsServices { services }
    }

    /// The CORS routes of a server workload in `namespace` with `labels`
    /// listening on `port`: empty when no policy applies.
    pub(crate) fn for_workload(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        port: u16,
    ) -> Arc<[CorsRoute]> {
        let mut out: Vec<CorsRoute> = self
            .services
            .iter()
            .filter(|s| s.backers.back(namespace, labels))
            .flat_map(|s| s.routes.iter())
            .filter(|(p, _)| p.is_none_or(|p| p == port))
            .map(|(_, r)| r.clone())
            .collect();
        while out.last().is_some_and(|r| r.policy.is_none()) {
            out.pop();
        }
        out.into()
    }
}

/// A VirtualService's routes as CORS routes (see [`CorsServices`]).
fn vs_routes(vs: &VirtualService) -> Vec<(Option<u16>, CorsRoute)> {
    let mut out = Vec::new();
    for route in &vs.http {
        if route.traffic.answer.is_some() {
            continue;
        }
        let policy = route.cors.clone();
        if route.matches.is_empty() {
            out.push((
                None,
                CorsRoute {
                    matcher: RouteMatch::any(),
                    policy,
                },
            ));
            continue;
        }
        for m in &route.matches {
            if !m.source_labels.is_empty() || m.source_namespace.is_some() {
                continue;
            }
            out.push((
                m.port.as_ref().map(|p| p.value),
                CorsRoute {
                    matcher: RouteMatch {
                        path: m.path.clone(),
                        headers: m.headers.clone().into(),
                        query_params: m.query_params.clone().into(),
                        ignore_case: m.ignore_uri_case,
                    },
                    policy: policy.clone(),
                },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::{IpAddr, SocketAddr};

    use http::HeaderValue;
    use mesh_core::cors::{CorsPolicy, CorsRoute};
    use mesh_core::model::{HeaderMatch, PathMatch, RouteMatch, ServerListener, ValueMatch};

    use super::super::Workload;
    use super::super::tests::{SE_CATALOG, assert_one, check, store};

    /// SE_CATALOG then a VirtualService for catalog whose `http` is `http`
    /// (indented as a list under `http:`); its first line is line 22.
    fn vs(http: &str) -> String {
        format!(
            "{SE_CATALOG}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: catalog
  namespace: shop
spec:
  hosts: [catalog]
  http:
{http}"
        )
    }

    fn server(yaml: &str, ns: &str, labels: &[(&str, &str)], port: u16) -> ServerListener {
        let (s, _d) = store(&[("a.yaml", yaml)]);
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let addr = SocketAddr::new(IpAddr::from([10, 0, 0, 7]), port);
        s.security().server_listener(
            "grpc/server",
            addr,
            Workload {
                namespace: ns,
                labels: &labels,
            },
        )
    }

    const FULL: &str = "  - match:
    - uri:
        prefix: /api
      method:
        exact: GET
    route:
    - destination:
        host: catalog
    corsPolicy:
      allowOrigins:
      - exact: https://example.com
      - prefix: https://app.
      - regex: 'https://.*\\.example\\.org'
      allowMethods: [POST, GET]
      allowHeaders: [X-Foo-Bar, content-type]
      exposeHeaders: [X-Expose]
      maxAge: 24h
      allowCredentials: true
      unmatchedPreflights: IGNORE
";

    #[test]
    fn every_field_reaches_the_servers_of_the_host() {
        let listener = server(&vs(FULL), "shop", &[("app", "catalog")], 8080);
        let get = HeaderMatch {
            name: ":method".into(),
            value: ValueMatch::Exact("GET".into()),
            invert: false,
        };
        let want = CorsRoute {
            matcher: RouteMatch {
                path: PathMatch::Prefix("/api".into()),
                headers: std::sync::Arc::from([get]),
                ..RouteMatch::any()
            },
            policy: Some(std::sync::Arc::new(CorsPolicy {
                allow_origins: std::sync::Arc::from([
                    ValueMatch::Exact("https://example.com".into()),
                    ValueMatch::Prefix("https://app.".into()),
                    ValueMatch::Regex(
                        mesh_core::model::Pattern::new(r"https://.*\.example\.org").unwrap(),
                    ),
                ]),
                allow_methods: Some(HeaderValue::from_static("POST,GET")),
                allow_headers: Some(HeaderValue::from_static("X-Foo-Bar,content-type")),
                expose_headers: Some(HeaderValue::from_static("X-Expose")),
                max_age: Some(HeaderValue::from_static("86400")),
                allow_credentials: Some(true),
                forward_not_matching_preflights: Some(false),
            })),
        };
        assert_eq!(&*listener.cors, &[want]);
        // The deprecated `allowOrigin` strings are exact matches.
        let old = vs("  - route:
    - destination:
        host: catalog
    corsPolicy:
      allowOrigin: ['*']
");
        let listener = server(&old, "shop", &[("app", "catalog")], 8080);
        let policy = listener.cors[0].policy.as_ref().unwrap();
        assert_eq!(&*policy.allow_origins, &[ValueMatch::Exact("*".into())]);
        assert!(policy.allows("https://any.test"));
    }

    #[test]
    fn only_the_workloads_backing_the_host_get_the_routes() {
        let yaml = vs(FULL);
        assert!(
            server(&yaml, "shop", &[("app", "payment")], 8080)
                .cors
                .is_empty()
        );
        assert!(
            server(&yaml, "other", &[("app", "catalog")], 8080)
                .cors
                .is_empty()
        );
        assert!(server(&yaml, "shop", &[], 8080).cors.is_empty());
        // A WorkloadGroup named like the service: its labels say who backs it.
        let group = format!(
            "{yaml}---
apiVersion: networking.istio.io/v1
kind: WorkloadGroup
metadata:
  name: catalog
  namespace: shop
spec:
  metadata:
    labels:
      team: books
  template:
    serviceAccount: catalog
"
        );
        assert_eq!(
            server(&group, "shop", &[("team", "books")], 8080)
                .cors
                .len(),
            1
        );
    }

    #[test]
    fn routes_keep_their_order_and_port() {
        let yaml = vs("  - match:
    - uri:
        prefix: /api/private
    route:
    - destination:
        host: catalog
  - match:
    - uri:
        prefix: /api
      port: 80
    - uri:
        prefix: /v2
    route:
    - destination:
        host: catalog
    corsPolicy:
      allowOrigins:
      - exact: https://example.com
  - route:
    - destination:
        host: catalog
");
        let on = |port| server(&yaml, "shop", &[("app", "catalog")], port);
        assert!(check(&yaml).is_empty(), "{:?}", check(&yaml));
        let paths = |l: &ServerListener| -> Vec<(String, bool)> {
            l.cors
                .iter()
                .map(|r| match &r.matcher.path {
                    PathMatch::Prefix(p) => (p.to_string(), r.policy.is_some()),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let owned = |v: &[(&str, bool)]| -> Vec<(String, bool)> {
            v.iter().map(|(p, b)| (p.to_string(), *b)).collect()
        };
        assert_eq!(
            paths(&on(80)),
            owned(&[("/api/private", false), ("/api", true), ("/v2", true)]),
            "the earlier route stays (it wins where it matches); the last, without a policy, goes"
        );
        assert_eq!(
            paths(&on(8080)),
            owned(&[("/api/private", false), ("/v2", true)]),
            "match.port 80 applies to the server on 80 only"
        );
    }

    #[test]
    fn grpc_findings_name_the_cors_policy() {
        // `/status` for a gRPC server served this listener.
        let listener = server(&vs(FULL), "shop", &[("app", "catalog")], 8080);
        let servers = mesh_core::Snapshot {
            server_listeners: [(listener.name.clone(), std::sync::Arc::new(listener))]
                .into_iter()
                .collect(),
            ..mesh_core::Snapshot::default()
        };
        let none = Default::default();
        let found = crate::compat::grpc_ignored(&servers, Some(&none), Some(&none));
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(
            found.iter().any(|f| f.contains(
                "CORS policy (VirtualService corsPolicy) is \
                                               ignored by gRPC servers"
            )),
            "{found:#?}"
        );
        // A server no policy applies to: no finding about CORS.
        let plain = server(&vs(FULL), "shop", &[("app", "payment")], 8080);
        let servers = mesh_core::Snapshot {
            server_listeners: [(plain.name.clone(), std::sync::Arc::new(plain))]
                .into_iter()
                .collect(),
            ..mesh_core::Snapshot::default()
        };
        let found = crate::compat::grpc_ignored(&servers, Some(&none), Some(&none));
        assert!(found.iter().all(|f| !f.contains("CORS")), "{found:#?}");
        // `check --for grpc` notes the field at its line.
        let d = super::super::tests::dir(&[("a.yaml", &vs(FULL))]);
        let report = crate::grpc_report(&[d.path()], &super::super::MeshOptions::default());
        let text = format!("{report:?}");
        assert!(text.contains("http[0].corsPolicy"), "{text}");
    }

    #[test]
    fn check_notes_who_enforces_a_policy() {
        let d = super::super::tests::dir(&[("a.yaml", &vs(FULL))]);
        let notes = super::super::check_notes(&[d.path()]);
        assert_eq!(notes.len(), 1, "{notes:#?}");
        assert_eq!(notes[0].line, 30, "the corsPolicy line");
        assert!(
            notes[0]
                .message
                .contains("enforced by the servers of the hosts"),
            "{notes:#?}"
        );
    }

    #[test]
    fn problems_are_reported_at_their_line() {
        let bad = |policy: &str, line: usize, needle: &str| {
            let text = vs(&format!(
                "  - route:
    - destination:
        host: catalog
    corsPolicy:
{policy}"
            ));
            assert_one(&check(&text), line, needle);
        };
        // The policy's first line is line 26.
        bad(
            "      allowMethods: [GET, 'BAD METHOD']\n",
            26,
            "is not an HTTP method",
        );
        bad(
            "      allowHeaders: ['x foo']\n",
            26,
            "is not a header name",
        );
        bad(
            "      exposeHeaders: [ok, 'a:b']\n",
            26,
            "is not a header name",
        );
        bad("      maxAge: 1.5s\n", 26, "seconds precision");
        bad("      maxAge: soon\n", 26, "is not a duration");
        bad(
            "      unmatchedPreflights: DROP\n",
            26,
            "UNSPECIFIED, FORWARD or IGNORE",
        );
        bad("      allowCredentials: maybe\n", 26, "allowCredentials");
        bad("      allowOrigins:\n      - suffix: .com\n", 27, "suffix");
        bad(
            "      allowOrigins:\n      - {}\n",
            27,
            "needs one of exact, prefix or regex",
        );
        bad(
            "      allowOrigins:\n      - exact: a\n        prefix: b\n",
            28,
            "only one of exact, prefix or regex",
        );
        bad(
            "      allowOrigins:\n      - regex: '('\n",
            27,
            "invalid regex",
        );
        bad(
            "      allowOrigins:\n      - exact: a\n      allowOrigin: [b]\n",
            28,
            "deprecated",
        );
        bad("      allowOrigns: []\n", 26, "allowOrigns");
    }
}

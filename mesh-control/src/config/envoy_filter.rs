//! EnvoyFilter, for exactly one filter: Envoy's local rate limit
//! (`envoy.filters.http.local_ratelimit`), in the shapes Istio's local rate
//! limit task writes (<https://istio.io/latest/docs/tasks/policy-enforcement/rate-limit/>):
//!
//! - an `HTTP_FILTER` patch (`INSERT_BEFORE` / `INSERT_FIRST` / `ADD`) in
//!   `SIDECAR_INBOUND` or `SIDECAR_OUTBOUND` whose value is the filter, its
//!   config wrapped in a `udpa.type.v1.TypedStruct` (or `xds.type.v3`), or
//!   given directly under its own `@type`;
//! - an `HTTP_ROUTE` patch (`MERGE`) matching the inbound virtual host
//!   `inbound|http|<port>` (Istio's name) with `route.action: ANY` or a route
//!   name, whose value sets `typed_per_filter_config` for the filter (same
//!   wrapping) and, for descriptors, the route's `rate_limits`.
//!
//! **Client side (`SIDECAR_OUTBOUND`).** The same two patches in the
//! outbound context limit the calls the selected workloads *make*: the
//! `HTTP_FILTER` patch's config (when it has a bucket) every outbound route
//! of the caller, an `HTTP_ROUTE` patch the routes of the virtual host it
//! names by Istio's outbound name `<fqdn>:<port>`
//! (`reviews.shop.svc.cluster.local:9080`; no name: every virtual host),
//! optionally one route by name (`http[].name`, or `default` for a
//! service without a VirtualService). [`Outbound`] resolves them per
//! caller: the caller is chosen by the EnvoyFilter's namespace (the root
//! namespace: every namespace) and `workloadSelector`, so an outbound
//! limit makes the config differ per node ([`view_dependencies`]); each
//! limited route of the caller's [`RouteConfig`]s carries its config (in
//! its `typed_per_filter_config`, wrapped for gRPC) and this mesh's
//! client enforces it; gRPC clients ignore it (`check --for grpc` says so). A vhost name that names no outbound virtual host of the
//! config is an error at its line (Istio would silently apply nothing).
//!
//! [`RouteConfig`]: mesh_core::model::RouteConfig
//!
//! Anything else an EnvoyFilter can say is refused at its line: an
//! EnvoyFilter that this mesh half-applied would be worse than one it
//! refused. The config's fields are Envoy's, in Envoy's snake_case
//! (`token_bucket.max_tokens`, `fill_interval`, `filter_enabled`,
//! `filter_enforced`, `response_headers_to_add`, `descriptors`,
//! `rate_limited_as_resource_exhausted`).

use std::collections::BTreeMap;
use std::sync::Arc;

use mesh_core::model::{Fraction, HeaderMatch, Name, Pattern, ValueMatch};
use mesh_core::ratelimit::{Action, Descriptor, LocalRateLimit, Refusal, TokenBucket};
use mesh_core::traffic::{HeaderOps, header_name, header_value};

use super::policy::{Floor, duration};
use super::yaml::{Field, Fields, Sink};

/// The filter's name in Envoy.
pub(crate) const FILTER_NAME: &str = "envoy.filters.http.local_ratelimit";
/// The config's type URL.
pub(crate) const CONFIG_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit";
/// The wrappers Istio's task uses around the config.
const TYPED_STRUCTS: [&str; 2] = [
    "type.googleapis.com/udpa.type.v1.TypedStruct",
    "type.googleapis.com/xds.type.v3.TypedStruct",
];

/// `EnvoyFilter.spec`, reduced to what it does: local rate limits.
#[derive(Debug, Clone)]
pub(crate) struct EnvoyFilter {
    /// `workloadSelector.labels` (`None`: every workload of the namespace,
    /// or of the mesh in the root namespace).
    pub(crate) selector: Option<BTreeMap<String, String>>,
    pub(crate) patches: Vec<Patch>,
}

/// Which side of a workload a patch applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Context {
    /// `SIDECAR_INBOUND`: the server side (`ServerLayer`).
    Inbound,
    /// `SIDECAR_OUTBOUND`: the client side.
    Outbound,
}

/// One `configPatches[]` entry.
#[derive(Debug, Clone)]
pub(crate) enum Patch {
    /// `HTTP_FILTER`: the filter on the listener. Its config (when it has a
    /// bucket) limits every route of the side.
    Filter {
        context: Context,
        config: LocalRateLimit,
        line: usize,
    },
    /// `HTTP_ROUTE`: the filter's config for the routes of a virtual host.
    Route {
        context: Context,
        /// From Istio's vhost name `inbound|http|<port>` (`None`: any).
        port: Option<u16>,
        /// Outbound: Istio's vhost name `<fqdn>:<port>` (`None`: any).
        vhost: Option<String>,
        /// `route.name` (`None`: `action: ANY`, every route).
        route: Option<String>,
        config: Option<LocalRateLimit>,
        /// The route's `rate_limits`: one list of actions per descriptor.
        rate_limits: Vec<Arc<[Action]>>,
        line: usize,
    },
}

/// Parses `EnvoyFilter.spec`.
pub(crate) fn parse_envoy_filter(
    sink: &mut Sink<'_>,
    spec: Field<'_, '_, '_>,
) -> Option<EnvoyFilter> {
    let before = sink.count();
    let f = Fields::of(
        sink,
        spec,
        &["workloadSelector", "configPatches"],
        &["targetRefs", "priority"],
    )?;
    let selector = f.get("workloadSelector").and_then(|w| {
        let w = Fields::of(sink, w, &["labels"], &[])?;
        w.get("labels").and_then(|l| l.string_map(sink))
    });
    let mut patches = Vec::new();
    match f.require(sink, "configPatches") {
        Some(list) => {
            for (path, node) in list.list(sink).unwrap_or_default() {
                let item = Field {
                    path: &path,
                    key_line: super::yaml::line_of(node),
                    node,
                };
                if let Some(p) = parse_patch(sink, item) {
                    patches.push(p);
                }
            }
        }
        None => return None,
    }
    if patches.is_empty() && sink.count() == before {
        sink.error(f.line, "'configPatches' must not be empty");
    }
    (sink.count() == before).then_some(EnvoyFilter { selector, patches })
}

fn parse_patch(sink: &mut Sink<'_>, item: Field<'_, '_, '_>) -> Option<Patch> {
    let f = Fields::of(sink, item, &["applyTo", "match", "patch"], &[])?;
    let apply_to = f.require(sink, "applyTo")?.string(sink)?;
    let m = f.require(sink, "match")?;
    let patch = f.require(sink, "patch")?;
    match apply_to.value.as_str() {
        "HTTP_FILTER" => {
            let m = Fields::of(sink, m, &["context", "listener"], &["proxy"])?;
            let context = context(sink, &m)?;
            if let Some(l) = m.get("listener") {
                check_hcm_match(sink, l)?;
            }
            let p = Fields::of(sink, patch, &["operation", "value"], &["filterClass"])?;
            let op = p.require(sink, "operation")?.string(sink)?;
            if !matches!(op.value.as_str(), "INSERT_BEFORE" | "INSERT_FIRST" | "ADD") {
                sink.error(
                    op.line,
                    format!(
                        "'{}': {} is not supported for the local rate limit filter \
                         (INSERT_BEFORE, INSERT_FIRST or ADD)",
                        op.value, p.path
                    ),
                );
                return None;
            }
            let v = p.require(sink, "value")?;
            let v = Fields::of(sink, v, &["name", "typed_config"], &[])?;
            let name = v.require(sink, "name")?.string(sink)?;
            if name.value != FILTER_NAME {
                sink.error(
                    name.line,
                    format!(
                        "EnvoyFilter: only the filter {FILTER_NAME} is supported, not {:?}",
                        name.value
                    ),
                );
                return None;
            }
            let typed = v.require(sink, "typed_config")?;
            let config = parse_typed_config(sink, typed)?;
            Some(Patch::Filter {
                context,
                config,
                line: apply_to.line,
            })
        }
        "HTTP_ROUTE" => {
            let m = Fields::of(sink, m, &["context", "routeConfiguration"], &["proxy"])?;
            let context = context(sink, &m)?;
            let (port, vhost, route) = match m.get("routeConfiguration") {
                Some(rc) => parse_route_match(sink, rc, context)?,
                None => (None, None, None),
            };
            let p = Fields::of(sink, patch, &["operation", "value"], &[])?;
            let op = p.require(sink, "operation")?.string(sink)?;
            if op.value != "MERGE" {
                sink.error(
                    op.line,
                    format!(
                        "'{}': {} is not supported on a route (MERGE)",
                        p.path, op.value
                    ),
                );
                return None;
            }
            let v = p.require(sink, "value")?;
            // `rate_limits` where Envoy's Route has them (`route:`, its
            // RouteAction) or, as some guides write it, beside the config.
            let v = Fields::of(
                sink,
                v,
                &["typed_per_filter_config", "rate_limits", "route"],
                &[],
            )?;
            let config = match v.get("typed_per_filter_config") {
                Some(t) => {
                    let entries = t.entries(sink)?;
                    let mut config = None;
                    for e in entries {
                        if e.key != FILTER_NAME {
                            sink.error(
                                e.line,
                                format!(
                                    "EnvoyFilter: only the filter {FILTER_NAME} is supported, \
                                     not {:?}",
                                    e.key
                                ),
                            );
                            continue;
                        }
                        config = parse_typed_config(sink, e.field());
                    }
                    config
                }
                None => None,
            };
            let mut rate_limits = Vec::new();
            let action = match v.get("route") {
                Some(a) => Some(Fields::of(sink, a, &["rate_limits"], &[])?),
                None => None,
            };
            let in_action = action.as_ref().and_then(|a| a.get("rate_limits"));
            for r in [v.get("rate_limits"), in_action].into_iter().flatten() {
                for (path, node) in r.list(sink).unwrap_or_default() {
                    let item = Field {
                        path: &path,
                        key_line: super::yaml::line_of(node),
                        node,
                    };
                    if let Some(actions) = parse_rate_limit(sink, item) {
                        rate_limits.push(actions);
                    }
                }
            }
            Some(Patch::Route {
                context,
                port,
                vhost,
                route,
                config,
                rate_limits,
                line: apply_to.line,
            })
        }
        other => {
            sink.error(
                apply_to.line,
                format!(
                    "EnvoyFilter: applyTo {other} is not supported (only HTTP_FILTER and \
                     HTTP_ROUTE patches for {FILTER_NAME})"
                ),
            );
            None
        }
    }
}

fn context(sink: &mut Sink<'_>, m: &Fields<'_, '_>) -> Option<Context> {
    let c = m.require(sink, "context")?.string(sink)?;
    match c.value.as_str() {
        "SIDECAR_INBOUND" => Some(Context::Inbound),
        "SIDECAR_OUTBOUND" => Some(Context::Outbound),
        other => {
            sink.error(
                c.line,
                format!(
                    "EnvoyFilter: context {other} is not supported (SIDECAR_INBOUND or \
                     SIDECAR_OUTBOUND; this mesh has no gateway proxy)"
                ),
            );
            None
        }
    }
}

/// `listener: {filterChain: {filter: {name: envoy.filters.network.http_connection_manager}}}`.
fn check_hcm_match(sink: &mut Sink<'_>, l: Field<'_, '_, '_>) -> Option<()> {
    let l = Fields::of(sink, l, &["filterChain"], &["portNumber", "name"])?;
    let Some(fc) = l.get("filterChain") else {
        return Some(());
    };
    let fc = Fields::of(sink, fc, &["filter"], &["name", "sni", "transportProtocol"])?;
    let Some(filter) = fc.get("filter") else {
        return Some(());
    };
    let filter = Fields::of(sink, filter, &["name", "subFilter"], &[])?;
    // `subFilter: {name: envoy.filters.http.router}` (INSERT_BEFORE the
    // router, as many guides write it) is where the filter goes anyway.
    if let Some(s) = filter.get("subFilter") {
        let s = Fields::of(sink, s, &["name"], &[])?;
        let n = s.require(sink, "name")?.string(sink)?;
        if n.value != "envoy.filters.http.router" {
            sink.error(
                n.line,
                format!(
                    "EnvoyFilter: the local rate limit filter can only be placed relative to \
                     envoy.filters.http.router, not {:?}",
                    n.value
                ),
            );
            return None;
        }
    }
    let name = filter.require(sink, "name")?.string(sink)?;
    if name.value != "envoy.filters.network.http_connection_manager" {
        sink.error(
            name.line,
            format!(
                "EnvoyFilter: the local rate limit filter goes in \
                 envoy.filters.network.http_connection_manager, not {:?}",
                name.value
            ),
        );
        return None;
    }
    Some(())
}

/// `routeConfiguration: {vhost: {name: "inbound|http|9080", route: {action: ANY | name}}}`
/// (outbound: `name: "<fqdn>:<port>"`): the inbound port, the outbound
/// vhost name and the route name.
fn parse_route_match(
    sink: &mut Sink<'_>,
    rc: Field<'_, '_, '_>,
    context: Context,
) -> Option<(Option<u16>, Option<String>, Option<String>)> {
    let rc = Fields::of(
        sink,
        rc,
        &["vhost"],
        &["portNumber", "portName", "gateway", "name"],
    )?;
    let Some(vhost) = rc.get("vhost") else {
        return Some((None, None, None));
    };
    let vhost = Fields::of(sink, vhost, &["name", "route"], &["domainName"])?;
    let mut outbound_name = None;
    let port = match vhost.get("name") {
        Some(n) if context == Context::Outbound => {
            let n = n.string(sink)?;
            let valid = n
                .value
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                sink.error(
                    n.line,
                    format!(
                        "EnvoyFilter: vhost name {:?} is not Istio's outbound name \
                         `<fqdn>:<port>` (e.g. reviews.default.svc.cluster.local:9080)",
                        n.value
                    ),
                );
                return None;
            }
            outbound_name = Some(n.value);
            None
        }
        Some(n) => {
            let n = n.string(sink)?;
            let port = n
                .value
                .strip_prefix("inbound|http|")
                .and_then(|p| p.parse::<u16>().ok());
            if port.is_none() {
                sink.error(
                    n.line,
                    format!(
                        "EnvoyFilter: vhost name {:?} is not Istio's inbound name \
                         `inbound|http|<port>`",
                        n.value
                    ),
                );
                return None;
            }
            port
        }
        None => None,
    };
    let route = match vhost.get("route") {
        Some(r) => {
            let r = Fields::of(sink, r, &["action", "name"], &[])?;
            if let Some(a) = r.get("action") {
                let a = a.string(sink)?;
                if a.value != "ANY" && a.value != "ROUTE" {
                    sink.error(
                        a.line,
                        format!(
                            "EnvoyFilter: route action {} is not supported (ANY or ROUTE)",
                            a.value
                        ),
                    );
                    return None;
                }
            }
            match r.get("name") {
                Some(n) => Some(n.string(sink)?.value),
                None => None,
            }
        }
        None => None,
    };
    Some((port, outbound_name, route))
}

/// A `typed_config`: the TypedStruct wrapper with `type_url` and `value`, or
/// the config under its own `@type`.
fn parse_typed_config(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<LocalRateLimit> {
    let f = Fields::of(sink, field, &["@type", "type_url", "value"], &[])?;
    let at = f.require(sink, "@type")?.string(sink)?;
    if TYPED_STRUCTS.contains(&at.value.as_str()) {
        let url = f.require(sink, "type_url")?.string(sink)?;
        if url.value != CONFIG_TYPE {
            sink.error(
                url.line,
                format!(
                    "EnvoyFilter: type_url must be {CONFIG_TYPE}, not {:?}",
                    url.value
                ),
            );
            return None;
        }
        let value = f.require(sink, "value")?;
        return parse_config(sink, value);
    }
    if at.value == CONFIG_TYPE {
        sink.error(
            at.line,
            "EnvoyFilter: write the config as Istio's task does, in a \
             udpa.type.v1.TypedStruct with type_url and value",
        );
        return None;
    }
    sink.error(
        at.line,
        format!(
            "EnvoyFilter: @type {:?} is not supported (a TypedStruct of {CONFIG_TYPE})",
            at.value
        ),
    );
    None
}

/// `LocalRateLimit`'s fields, snake_case as Envoy's docs and Istio's task write them.
fn parse_config(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<LocalRateLimit> {
    let before = sink.count();
    let f = Fields::of(
        sink,
        field,
        &[
            "stat_prefix",
            "token_bucket",
            "filter_enabled",
            "filter_enforced",
            "response_headers_to_add",
            "descriptors",
            "rate_limited_as_resource_exhausted",
            "always_consume_default_token_bucket",
        ],
        &[
            "status",
            "request_headers_to_add_when_not_enforced",
            "stage",
            "local_rate_limit_per_downstream_connection",
            "enable_x_ratelimit_headers",
            "vh_rate_limits",
            "local_cluster_rate_limit",
            "rate_limits",
            "max_dynamic_descriptors",
        ],
    )?;
    if let Some(p) = f.get("stat_prefix") {
        p.string(sink);
    }
    let bucket = f.get("token_bucket").and_then(|b| parse_bucket(sink, b));
    let enabled = match f.get("filter_enabled") {
        Some(e) => runtime_percent(sink, e)?,
        // Envoy: "defaults to 0% of requests for safety".
        None => Fraction::default(),
    };
    let enforced = match f.get("filter_enforced") {
        Some(e) => runtime_percent(sink, e)?,
        None => Fraction::default(),
    };
    let response_headers = match f.get("response_headers_to_add") {
        Some(h) => parse_header_options(sink, h)?,
        None => HeaderOps::default(),
    };
    let mut descriptors = Vec::new();
    if let Some(d) = f.get("descriptors") {
        for (path, node) in d.list(sink).unwrap_or_default() {
            let Some(d) = Fields::read(sink, node, &path, &["entries", "token_bucket"], &[]) else {
                continue;
            };
            let mut entries = Vec::new();
            if let Some(e) = d.require(sink, "entries") {
                for (path, node) in e.list(sink).unwrap_or_default() {
                    let Some(e) = Fields::read(sink, node, &path, &["key", "value"], &[]) else {
                        continue;
                    };
                    let key = e.require(sink, "key").and_then(|k| k.string(sink));
                    let value = e.require(sink, "value").and_then(|v| v.string(sink));
                    if let (Some(k), Some(v)) = (key, value) {
                        entries.push((Name::from(k.value.as_str()), Name::from(v.value.as_str())));
                    }
                }
            }
            let bucket = d
                .require(sink, "token_bucket")
                .and_then(|b| parse_bucket(sink, b));
            if let Some(bucket) = bucket {
                descriptors.push(Descriptor {
                    entries: entries.into(),
                    bucket,
                });
            }
        }
    }
    let exhausted = match f.get("rate_limited_as_resource_exhausted") {
        Some(b) => b.boolean(sink)?,
        None => false,
    };
    let consume_default = match f.get("always_consume_default_token_bucket") {
        Some(b) => b.boolean(sink)?,
        None => true,
    };
    (sink.count() == before).then(|| LocalRateLimit {
        bucket,
        descriptors: descriptors.into(),
        enabled,
        enforced,
        refusal: Refusal {
            grpc_resource_exhausted: exhausted,
        },
        response_headers,
        consume_default,
    })
}

fn parse_bucket(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<TokenBucket> {
    let f = Fields::of(
        sink,
        field,
        &["max_tokens", "tokens_per_fill", "fill_interval"],
        &[],
    )?;
    let max = f
        .require(sink, "max_tokens")
        .and_then(|m| m.integer_in(sink, 1, i64::from(u32::MAX), ""));
    let per_fill = match f.get("tokens_per_fill") {
        Some(t) => t.integer_in(sink, 1, i64::from(u32::MAX), ""),
        None => Some(1),
    };
    let interval = f
        .require(sink, "fill_interval")
        .and_then(|i| Some((i.line(), duration(sink, i, Floor::OneMs)?)));
    let (line, interval) = interval?;
    match TokenBucket::new(max? as u32, per_fill? as u32, interval) {
        Ok(b) => Some(b),
        Err(e) => {
            sink.error(line, format!("'{}': {e}", f.path));
            None
        }
    }
}

/// `{runtime_key, default_value: {numerator, denominator}}`.
fn runtime_percent(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Fraction> {
    let f = Fields::of(sink, field, &["runtime_key", "default_value"], &[])?;
    if let Some(k) = f.get("runtime_key") {
        k.string(sink);
    }
    let Some(v) = f.get("default_value") else {
        return Some(Fraction::default());
    };
    let v = Fields::of(sink, v, &["numerator", "denominator"], &[])?;
    let numerator = match v.get("numerator") {
        Some(n) => n.integer_in(sink, 0, i64::from(u32::MAX), "")?,
        None => 0,
    };
    let scale = match v.get("denominator") {
        None => 10_000,
        Some(d) => {
            let d = d.string(sink)?;
            match d.value.as_str() {
                "HUNDRED" => 10_000,
                "TEN_THOUSAND" => 100,
                "MILLION" => 1,
                other => {
                    sink.error(
                        d.line,
                        format!(
                            "'{}': {other:?} is not HUNDRED, TEN_THOUSAND or MILLION",
                            v.path
                        ),
                    );
                    return None;
                }
            }
        }
    };
    let per_million = (numerator as u64).saturating_mul(scale);
    Some(Fraction::from_per_million(
        u32::try_from(per_million).unwrap_or(u32::MAX),
    ))
}

/// `response_headers_to_add: [{append_action, header: {key, value}}]`.
fn parse_header_options(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<HeaderOps> {
    let before = sink.count();
    let mut set = Vec::new();
    let mut add = Vec::new();
    for (path, node) in field.list(sink)? {
        let Some(o) = Fields::read(
            sink,
            node,
            &path,
            &["header", "append_action", "append"],
            &["keep_empty_value"],
        ) else {
            continue;
        };
        let Some(h) = o.require(sink, "header") else {
            continue;
        };
        let Some(h) = Fields::of(sink, h, &["key", "value"], &["raw_value"]) else {
            continue;
        };
        let key = h.require(sink, "key").and_then(|k| k.string(sink));
        let value = h.require(sink, "value").and_then(|v| v.string(sink));
        let (Some(key), Some(value)) = (key, value) else {
            continue;
        };
        let pair = match (
            header_name(&key.value),
            header_value(&key.value, &value.value),
        ) {
            (Ok(n), Ok(v)) => (n, v),
            (Err(e), _) | (_, Err(e)) => {
                sink.error(key.line, format!("'{path}': {e}"));
                continue;
            }
        };
        let overwrite = match (o.get("append_action"), o.get("append")) {
            (Some(a), _) => {
                let Some(a) = a.string(sink) else { continue };
                match a.value.as_str() {
                    "APPEND_IF_EXISTS_OR_ADD" => false,
                    "OVERWRITE_IF_EXISTS_OR_ADD" => true,
                    other => {
                        sink.error(
                            a.line,
                            format!(
                                "'{path}': append_action {other} is not supported \
                                 (APPEND_IF_EXISTS_OR_ADD or OVERWRITE_IF_EXISTS_OR_ADD)"
                            ),
                        );
                        continue;
                    }
                }
            }
            (None, Some(a)) => !a.boolean(sink).unwrap_or(true),
            (None, None) => false,
        };
        if overwrite {
            set.push(pair);
        } else {
            add.push(pair);
        }
    }
    (sink.count() == before).then(|| HeaderOps {
        set: set.into(),
        add: add.into(),
        remove: Arc::from([]),
    })
}

/// One `rate_limits[]` entry: `{actions: [...]}`.
fn parse_rate_limit(sink: &mut Sink<'_>, item: Field<'_, '_, '_>) -> Option<Arc<[Action]>> {
    let before = sink.count();
    let f = Fields::of(sink, item, &["actions"], &["stage", "disable_key", "limit"])?;
    let mut actions = Vec::new();
    for (path, node) in f.require(sink, "actions")?.list(sink)? {
        let Some(a) = Fields::read(
            sink,
            node,
            &path,
            &["header_value_match", "request_headers", "generic_key"],
            &[
                "source_cluster",
                "destination_cluster",
                "remote_address",
                "metadata",
                "dynamic_metadata",
                "extension",
                "masked_remote_address",
                "query_parameter_value_match",
                "query_parameters",
            ],
        ) else {
            continue;
        };
        if let Some(m) = a.get("header_value_match") {
            let Some(m) = Fields::of(
                sink,
                m,
                &[
                    "descriptor_key",
                    "descriptor_value",
                    "headers",
                    "expect_match",
                ],
                &[],
            ) else {
                continue;
            };
            let key = match m.get("descriptor_key") {
                Some(k) => k.string(sink).map(|k| k.value),
                None => Some("header_match".to_owned()),
            };
            let value = m
                .require(sink, "descriptor_value")
                .and_then(|v| v.string(sink));
            let expect_match = match m.get("expect_match") {
                Some(e) => e.boolean(sink),
                None => Some(true),
            };
            let mut headers = Vec::new();
            if let Some(h) = m.require(sink, "headers") {
                for (path, node) in h.list(sink).unwrap_or_default() {
                    let item = Field {
                        path: &path,
                        key_line: super::yaml::line_of(node),
                        node,
                    };
                    if let Some(h) = parse_header_matcher(sink, item) {
                        headers.push(h);
                    }
                }
            }
            if let (Some(key), Some(value), Some(expect_match)) = (key, value, expect_match) {
                actions.push(Action::HeaderValueMatch {
                    key: key.as_str().into(),
                    value: value.value.as_str().into(),
                    headers: headers.into(),
                    expect_match,
                });
            }
        } else if let Some(r) = a.get("request_headers") {
            let Some(r) = Fields::of(
                sink,
                r,
                &["header_name", "descriptor_key"],
                &["skip_if_absent"],
            ) else {
                continue;
            };
            let header = r.require(sink, "header_name").and_then(|h| h.string(sink));
            let key = r
                .require(sink, "descriptor_key")
                .and_then(|k| k.string(sink));
            if let (Some(header), Some(key)) = (header, key) {
                actions.push(Action::RequestHeaders {
                    header: header.value.to_ascii_lowercase().as_str().into(),
                    key: key.value.as_str().into(),
                });
            }
        } else if let Some(g) = a.get("generic_key") {
            let Some(g) = Fields::of(sink, g, &["descriptor_key", "descriptor_value"], &[]) else {
                continue;
            };
            let key = match g.get("descriptor_key") {
                Some(k) => k.string(sink).map(|k| k.value),
                None => Some("generic_key".to_owned()),
            };
            let value = g
                .require(sink, "descriptor_value")
                .and_then(|v| v.string(sink));
            if let (Some(key), Some(value)) = (key, value) {
                actions.push(Action::GenericKey {
                    key: key.as_str().into(),
                    value: value.value.as_str().into(),
                });
            }
        } else {
            sink.error(a.line, format!("'{}' names no action", a.path));
        }
    }
    (sink.count() == before).then(|| actions.into())
}

/// An Envoy `HeaderMatcher`: `name` and one of `string_match` (`exact`,
/// `prefix`, `safe_regex`), the older `exact_match` / `prefix_match`, or
/// `present_match`; `invert_match`.
fn parse_header_matcher(sink: &mut Sink<'_>, item: Field<'_, '_, '_>) -> Option<HeaderMatch> {
    let f = Fields::of(
        sink,
        item,
        &[
            "name",
            "string_match",
            "exact_match",
            "prefix_match",
            "present_match",
            "invert_match",
        ],
        &[
            "suffix_match",
            "contains_match",
            "range_match",
            "safe_regex_match",
        ],
    )?;
    let name = f.require(sink, "name")?.string(sink)?;
    let value = if let Some(s) = f.get("string_match") {
        let s = Fields::of(
            sink,
            s,
            &["exact", "prefix", "safe_regex"],
            &["suffix", "contains", "ignore_case"],
        )?;
        if let Some(e) = s.get("exact") {
            ValueMatch::Exact(e.string(sink)?.value.as_str().into())
        } else if let Some(p) = s.get("prefix") {
            ValueMatch::Prefix(p.string(sink)?.value.as_str().into())
        } else if let Some(r) = s.get("safe_regex") {
            let r = Fields::of(sink, r, &["regex"], &["google_re2"])?;
            let regex = r.require(sink, "regex")?.string(sink)?;
            match Pattern::new(&regex.value) {
                Ok(p) => ValueMatch::Regex(p),
                Err(e) => {
                    sink.error(regex.line, format!("'{}': {e}", r.path));
                    return None;
                }
            }
        } else {
            sink.error(
                s.line,
                format!("'{}' needs exact, prefix or safe_regex", s.path),
            );
            return None;
        }
    } else if let Some(e) = f.get("exact_match") {
        ValueMatch::Exact(e.string(sink)?.value.as_str().into())
    } else if let Some(p) = f.get("prefix_match") {
        ValueMatch::Prefix(p.string(sink)?.value.as_str().into())
    } else if let Some(p) = f.get("present_match") {
        ValueMatch::Present(p.boolean(sink)?)
    } else {
        ValueMatch::Present(true)
    };
    let invert = match f.get("invert_match") {
        Some(i) => i.boolean(sink)?,
        None => false,
    };
    Some(HeaderMatch {
        name: name.value.to_ascii_lowercase().as_str().into(),
        value,
        invert,
    })
}

/// What an EnvoyFilter's outbound patches make the config depend on: the
/// caller's namespace (an EnvoyFilter applies to its own namespace's
/// workloads, or to every namespace's from the root namespace, which is not
/// known here: the namespace is always a dependency) and the labels of its
/// `workloadSelector`. Called by [`super::ViewDependencies::of`].
pub(crate) fn view_dependencies(deps: &mut super::ViewDependencies, f: &EnvoyFilter) {
    let outbound = f.patches.iter().any(|p| {
        matches!(
            p,
            Patch::Filter {
                context: Context::Outbound,
                ..
            } | Patch::Route {
                context: Context::Outbound,
                ..
            }
        )
    });
    if !outbound {
        return;
    }
    deps.namespace = true;
    for (k, v) in f.selector.iter().flatten() {
        deps.labels.entry(k.clone()).or_default().insert(v.clone());
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use mesh_core::ratelimit::RateLimitConfig;

    use super::super::yaml::{Fields, Sink, parse_documents};
    use super::*;

    /// Parses the spec of the one EnvoyFilter in `text`: the filter, or the
    /// problems as `line: message`.
    fn parse(text: &str) -> Result<EnvoyFilter, Vec<String>> {
        let docs = parse_documents(text).expect("YAML");
        let mut sink = Sink::new(Path::new("f.yaml"));
        let top = Fields::read(
            &mut sink,
            &docs[0],
            "",
            &["apiVersion", "kind", "metadata", "spec"],
            &[],
        )
        .expect("a mapping");
        let spec = top.get("spec").expect("spec");
        let parsed = parse_envoy_filter(&mut sink, spec);
        let problems: Vec<String> = sink
            .into_diagnostics()
            .iter()
            .map(|d| format!("{}: {}", d.line, d.message))
            .collect();
        match parsed {
            Some(f) if problems.is_empty() => Ok(f),
            _ => Err(problems),
        }
    }

    /// Istio's local rate limit task, first shape: the filter with its bucket.
    pub(crate) const ISTIO_FILTER: &str = r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: filter-local-ratelimit-svc
  namespace: istio-system
spec:
  workloadSelector:
    labels:
      app: productpage
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: SIDECAR_INBOUND
        listener:
          filterChain:
            filter:
              name: "envoy.filters.network.http_connection_manager"
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.local_ratelimit
          typed_config:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
              token_bucket:
                max_tokens: 4
                tokens_per_fill: 4
                fill_interval: 60s
              filter_enabled:
                runtime_key: local_rate_limit_enabled
                default_value:
                  numerator: 100
                  denominator: HUNDRED
              filter_enforced:
                runtime_key: local_rate_limit_enforced
                default_value:
                  numerator: 100
                  denominator: HUNDRED
              response_headers_to_add:
                - append_action: APPEND_IF_EXISTS_OR_ADD
                  header:
                    key: x-local-rate-limit
                    value: 'true'
"#;

    /// Istio's task, second shape: the filter without a bucket, and the
    /// route's config with descriptors and `rate_limits`.
    pub(crate) const ISTIO_ROUTE: &str = r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: filter-local-ratelimit-svc
  namespace: istio-system
spec:
  workloadSelector:
    labels:
      app: productpage
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: SIDECAR_INBOUND
        listener:
          filterChain:
            filter:
              name: "envoy.filters.network.http_connection_manager"
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.local_ratelimit
          typed_config:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
    - applyTo: HTTP_ROUTE
      match:
        context: SIDECAR_INBOUND
        routeConfiguration:
          vhost:
            name: "inbound|http|9080"
            route:
              action: ANY
      patch:
        operation: MERGE
        value:
          rate_limits:
            - actions:
              - header_value_match:
                  descriptor_value: "Cart"
                  headers:
                    - name: ":path"
                      string_match:
                        prefix: "/cart-api"
          typed_per_filter_config:
            envoy.filters.http.local_ratelimit:
              "@type": type.googleapis.com/udpa.type.v1.TypedStruct
              type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              value:
                stat_prefix: http_local_rate_limiter
                descriptors:
                  - entries:
                    - key: header_match
                      value: Cart
                    token_bucket:
                      max_tokens: 10
                      tokens_per_fill: 10
                      fill_interval: 60s
                token_bucket:
                  max_tokens: 100
                  tokens_per_fill: 100
                  fill_interval: 60s
                filter_enabled:
                  runtime_key: local_rate_limit_enabled
                  default_value:
                    numerator: 100
                    denominator: HUNDRED
                filter_enforced:
                  runtime_key: local_rate_limit_enforced
                  default_value:
                    numerator: 100
                    denominator: HUNDRED
                response_headers_to_add:
                  - append_action: APPEND_IF_EXISTS_OR_ADD
                    header:
                      key: x-local-rate-limit
                      value: 'true'
"#;

    #[test]
    fn istio_s_filter_shape_loads() {
        let f = parse(ISTIO_FILTER).expect("loads");
        assert_eq!(
            f.selector
                .as_ref()
                .and_then(|s| s.get("app"))
                .map(String::as_str),
            Some("productpage")
        );
        let [
            Patch::Filter {
                context, config, ..
            },
        ] = f.patches.as_slice()
        else {
            panic!("one filter patch: {:?}", f.patches)
        };
        assert_eq!(*context, Context::Inbound);
        assert_eq!(
            config.bucket,
            Some(TokenBucket::new(4, 4, Duration::from_secs(60)).unwrap())
        );
        assert_eq!(config.enabled, Fraction::ALL);
        assert_eq!(config.enforced, Fraction::ALL);
        assert_eq!(config.response_headers.add.len(), 1);
        assert!(!config.refusal.grpc_resource_exhausted);
    }

    #[test]
    fn istio_s_route_shape_with_descriptors_loads() {
        let f = parse(ISTIO_ROUTE).expect("loads");
        let [
            Patch::Filter { config: filter, .. },
            Patch::Route {
                port,
                route,
                config: Some(config),
                rate_limits,
                ..
            },
        ] = f.patches.as_slice()
        else {
            panic!("a filter and a route patch: {:?}", f.patches)
        };
        assert_eq!(filter.bucket, None, "the filter alone limits nothing");
        assert_eq!(filter.enabled, Fraction::default(), "Envoy's default: 0%");
        assert_eq!(*port, Some(9080));
        assert_eq!(*route, None);
        assert_eq!(config.descriptors.len(), 1);
        assert_eq!(&*config.descriptors[0].entries[0].1, "Cart");
        assert_eq!(rate_limits.len(), 1);
        assert!(matches!(
            &rate_limits[0][0],
            Action::HeaderValueMatch { key, value, .. } if &**key == "header_match" && &**value == "Cart"
        ));
    }

    #[test]
    fn anything_else_is_refused_at_its_line() {
        let lua = ISTIO_FILTER.replace(
            "name: envoy.filters.http.local_ratelimit",
            "name: envoy.filters.http.lua",
        );
        let problems = parse(&lua).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("21: ") && p.contains("only the filter")),
            "{problems:?}"
        );
        let gateway = ISTIO_FILTER.replace("context: SIDECAR_INBOUND", "context: GATEWAY");
        let problems = parse(&gateway).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("13: ") && p.contains("GATEWAY")),
            "{problems:?}"
        );
        let cluster = ISTIO_FILTER.replace("applyTo: HTTP_FILTER", "applyTo: CLUSTER");
        let problems = parse(&cluster).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("11: ") && p.contains("CLUSTER")),
            "{problems:?}"
        );
        let fast = ISTIO_FILTER.replace("fill_interval: 60s", "fill_interval: 10ms");
        let problems = parse(&fast).unwrap_err();
        assert!(
            problems.iter().any(|p| p.contains("minimum of 50ms")),
            "{problems:?}"
        );
    }

    /// The server listener of a workload in `ns` with `labels` on `port`,
    /// under the config `files`.
    fn listener(
        files: &[(&str, &str)],
        ns: &str,
        labels: &[(&str, &str)],
        port: u16,
    ) -> mesh_core::model::ServerListener {
        let (s, _d) = super::super::tests::store(files);
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let addr = std::net::SocketAddr::from(([10, 0, 0, 7], port));
        s.security().server_listener(
            &format!("grpc/server?xds.resource.listening_address={addr}"),
            addr,
            super::super::Workload {
                namespace: ns,
                labels: &labels,
            },
        )
    }

    #[test]
    fn the_kind_loads_and_selects_workloads_as_istio_does() {
        let files = [("rl.yaml", ISTIO_FILTER)];
        let limited = listener(&files, "shop", &[("app", "productpage")], 9080);
        let config = limited
            .rate_limit
            .expect("the selected workload is limited");
        assert_eq!(
            config.effective().bucket,
            Some(TokenBucket::new(4, 4, Duration::from_secs(60)).unwrap())
        );
        assert!(config.route.is_none());
        // Another workload, in any namespace: not selected.
        let other = listener(&files, "shop", &[("app", "reviews")], 9080);
        assert_eq!(other.rate_limit, None);
        // In a namespace other than the root one, only its own workloads.
        let in_shop = ISTIO_FILTER.replace("namespace: istio-system", "namespace: shop");
        let files = [("rl.yaml", in_shop.as_str())];
        assert!(
            listener(&files, "shop", &[("app", "productpage")], 1)
                .rate_limit
                .is_some()
        );
        assert_eq!(
            listener(&files, "other", &[("app", "productpage")], 1).rate_limit,
            None
        );
        // No selector in the root namespace: every workload of the mesh.
        let mesh_wide = ISTIO_FILTER.replace(
            "  workloadSelector:\n    labels:\n      app: productpage\n",
            "",
        );
        let files = [("rl.yaml", mesh_wide.as_str())];
        assert!(listener(&files, "any", &[], 1).rate_limit.is_some());
        // Both API versions.
        let v1 = ISTIO_FILTER.replace("networking.istio.io/v1alpha3", "networking.istio.io/v1");
        let files = [("rl.yaml", v1.as_str())];
        assert!(
            listener(&files, "shop", &[("app", "productpage")], 1)
                .rate_limit
                .is_some()
        );
    }

    #[test]
    fn route_patches_apply_to_their_port_only() {
        let files = [("rl.yaml", ISTIO_ROUTE)];
        let labels = [("app", "productpage")];
        let on_9080 = listener(&files, "shop", &labels, 9080)
            .rate_limit
            .expect("limited");
        let route = on_9080.route.as_ref().expect("the route's config");
        assert_eq!(route.descriptors.len(), 1);
        assert_eq!(on_9080.rate_limits.len(), 1);
        assert_eq!(on_9080.effective(), route);
        // Another port: the filter alone, which limits nothing.
        let on_8080 = listener(&files, "shop", &labels, 8080)
            .rate_limit
            .expect("the filter is there");
        assert!(on_8080.route.is_none() && on_8080.is_inert());
        // Envoy's own place for rate_limits (the RouteAction) is read too.
        let (head, rest) =
            ISTIO_ROUTE.split_at(ISTIO_ROUTE.find("          rate_limits:").unwrap());
        let (block, tail) = rest.split_at(rest.find("          typed_per_filter_config:").unwrap());
        let indented: String = block.lines().map(|l| format!("  {l}\n")).collect();
        let in_action = format!("{head}          route:\n{indented}{tail}");
        let parsed = parse(&in_action).expect("loads");
        assert!(
            matches!(&parsed.patches[1], Patch::Route { rate_limits, .. } if rate_limits.len() == 1),
            "{parsed:?}"
        );
    }

    /// The client side, in the shape of Istio's task and the guides that
    /// limit calls on the caller's sidecar: the filter on the outbound HCM
    /// (INSERT_BEFORE the router) and the config of one outbound virtual
    /// host, named `<fqdn>:<port>`.
    pub(crate) const ISTIO_OUTBOUND: &str = r#"apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata:
  name: filter-local-ratelimit-client
  namespace: istio-system
spec:
  workloadSelector:
    labels:
      app: productpage
  configPatches:
    - applyTo: HTTP_FILTER
      match:
        context: SIDECAR_OUTBOUND
        listener:
          filterChain:
            filter:
              name: "envoy.filters.network.http_connection_manager"
              subFilter:
                name: "envoy.filters.http.router"
      patch:
        operation: INSERT_BEFORE
        value:
          name: envoy.filters.http.local_ratelimit
          typed_config:
            "@type": type.googleapis.com/udpa.type.v1.TypedStruct
            type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
            value:
              stat_prefix: http_local_rate_limiter
    - applyTo: HTTP_ROUTE
      match:
        context: SIDECAR_OUTBOUND
        routeConfiguration:
          vhost:
            name: "reviews.shop.svc.cluster.local:9080"
            route:
              action: ANY
      patch:
        operation: MERGE
        value:
          typed_per_filter_config:
            envoy.filters.http.local_ratelimit:
              "@type": type.googleapis.com/udpa.type.v1.TypedStruct
              type_url: type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit
              value:
                stat_prefix: http_local_rate_limiter
                token_bucket:
                  max_tokens: 10
                  tokens_per_fill: 10
                  fill_interval: 60s
                filter_enabled:
                  runtime_key: local_rate_limit_enabled
                  default_value:
                    numerator: 100
                    denominator: HUNDRED
                filter_enforced:
                  runtime_key: local_rate_limit_enforced
                  default_value:
                    numerator: 100
                    denominator: HUNDRED
                response_headers_to_add:
                  - append_action: APPEND_IF_EXISTS_OR_ADD
                    header:
                      key: x-local-rate-limit
                      value: 'true'
"#;

    /// Two services the EnvoyFilter's callers dial.
    const SERVICES: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.1}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  ports: [{number: 9080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 10.0.0.2}]
";

    /// The limit of the default route of `rc` in the view of a workload of
    /// `ns` with `labels`.
    fn client_limit(
        files: &[(&str, &str)],
        ns: &str,
        labels: &[(&str, &str)],
        rc: &str,
    ) -> Option<Arc<RateLimitConfig>> {
        let (store, _d) = super::super::tests::store(files);
        let source = store.view_source(&[]).expect("outbound limits make views");
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let key = source.dependencies.key(ns, &labels).expect("a view key");
        let view = source.translate(&key);
        assert!(view.diagnostics.is_empty(), "{:#?}", view.diagnostics);
        let rc = view
            .snapshot
            .route_configs
            .get(rc)
            .expect("the route config");
        rc.virtual_hosts[0].routes[0].policy.rate_limit.clone()
    }

    #[test]
    fn istio_s_outbound_shape_loads_unchanged() {
        let f = parse(ISTIO_OUTBOUND).expect("loads");
        let [
            Patch::Filter {
                context: Context::Outbound,
                config: filter,
                ..
            },
            Patch::Route {
                context: Context::Outbound,
                vhost: Some(vhost),
                port: None,
                route: None,
                config: Some(config),
                ..
            },
        ] = f.patches.as_slice()
        else {
            panic!("an outbound filter and route patch: {:?}", f.patches)
        };
        assert!(filter.bucket.is_none());
        assert_eq!(vhost, "reviews.shop.svc.cluster.local:9080");
        assert_eq!(
            config.bucket,
            Some(TokenBucket::new(10, 10, Duration::from_secs(60)).unwrap())
        );
        // An inbound-style name in the outbound context is refused at its line.
        let inbound_name =
            ISTIO_OUTBOUND.replace("reviews.shop.svc.cluster.local:9080", "inbound|http|9080");
        let problems = parse(&inbound_name).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("34: ") && p.contains("outbound name")),
            "{problems:?}"
        );
        let other_sub = ISTIO_OUTBOUND.replace(
            "name: \"envoy.filters.http.router\"",
            "name: \"envoy.filters.http.fault\"",
        );
        assert!(parse(&other_sub).is_err());
    }

    #[test]
    fn outbound_limits_apply_to_the_selected_callers_routes_to_the_named_host() {
        let files = [("svc.yaml", SERVICES), ("rl.yaml", ISTIO_OUTBOUND)];
        let reviews = "reviews.shop.svc.cluster.local:9080";
        let ratings = "ratings.shop.svc.cluster.local:9080";
        let limited = client_limit(&files, "shop", &[("app", "productpage")], reviews)
            .expect("productpage's calls to reviews are limited");
        assert_eq!(
            limited.effective().bucket,
            Some(TokenBucket::new(10, 10, Duration::from_secs(60)).unwrap())
        );
        assert!(
            limited.filter.bucket.is_none(),
            "the route carries the config"
        );
        // Its calls to another host, and other callers' calls: not limited.
        assert_eq!(
            client_limit(&files, "shop", &[("app", "productpage")], ratings),
            None
        );
        assert_eq!(
            client_limit(&files, "shop", &[("app", "reviews")], reviews),
            None
        );
        assert_eq!(client_limit(&files, "other", &[], reviews), None);
        // In a namespace other than the root one: that namespace's callers.
        let in_web = ISTIO_OUTBOUND
            .replace("namespace: istio-system", "namespace: web")
            .replace(
                "  workloadSelector:\n    labels:\n      app: productpage\n",
                "",
            );
        let files = [("svc.yaml", SERVICES), ("rl.yaml", in_web.as_str())];
        assert!(client_limit(&files, "web", &[], reviews).is_some());
        assert_eq!(client_limit(&files, "shop", &[], reviews), None);
        // A filter with a bucket and no route patch: every outbound route.
        let everything = ISTIO_FILTER.replace("SIDECAR_INBOUND", "SIDECAR_OUTBOUND");
        let files = [("svc.yaml", SERVICES), ("rl.yaml", everything.as_str())];
        for rc in [reviews, ratings] {
            let c = client_limit(&files, "shop", &[("app", "productpage")], rc).expect("limited");
            assert_eq!(
                c.effective().bucket,
                Some(TokenBucket::new(4, 4, Duration::from_secs(60)).unwrap())
            );
        }
    }

    #[test]
    fn an_outbound_vhost_that_names_no_service_is_an_error_at_its_line() {
        let typo = ISTIO_OUTBOUND.replace(
            "reviews.shop.svc.cluster.local:9080",
            "reviews.shop.svc.cluster.local:8080",
        );
        let d = super::super::tests::dir(&[("svc.yaml", SERVICES), ("rl.yaml", typo.as_str())]);
        let problems = super::super::check_dir(d.path(), &super::super::MeshOptions::default());
        assert!(
            problems
                .iter()
                .any(|p| p.line == 29 && p.message.contains("names no outbound virtual host")),
            "{problems:#?}"
        );
    }
}

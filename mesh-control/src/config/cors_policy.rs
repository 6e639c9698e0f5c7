//! VirtualService `http[].corsPolicy`
//! (<https://istio.io/latest/docs/reference/config/networking/virtual-service/#CorsPolicy>),
//! parsed into [`mesh_core::cors::CorsPolicy`] as Istio translates it for
//! Envoy: `allowOrigins` (exact / prefix / regex; the deprecated
//! `allowOrigin` strings are exact matches), `allowMethods`,
//! `allowHeaders` and `exposeHeaders` joined by `,`, `maxAge` in whole
//! seconds (Istio refuses sub-second precision), `allowCredentials`, and
//! `unmatchedPreflights` (`FORWARD`, Envoy's default, or `IGNORE`:
//! `forward_not_matching_preflights: false`).
//!
//! Which servers enforce a policy is decided in `cors.rs` and
//! [`super::security`] (the workloads backing the VirtualService's hosts).

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};
use mesh_core::cors::CorsPolicy;
use mesh_core::model::ValueMatch;

use super::policy::{Floor, duration, parse_string_match};
use super::yaml::{Field, Fields, Sink};

/// `corsPolicy: {...}`; `None` (reported at its lines) when anything in it
/// is wrong.
pub(crate) fn parse_cors_policy(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
) -> Option<Arc<CorsPolicy>> {
    let before = sink.count();
    let f = Fields::of(
        sink,
        field,
        &[
            "allowOrigins",
            "allowOrigin",
            "allowMethods",
            "allowHeaders",
            "exposeHeaders",
            "maxAge",
            "allowCredentials",
            "unmatchedPreflights",
        ],
        &[],
    )?;
    let mut allow_origins = Vec::new();
    if let Some(origins) = f.get("allowOrigins") {
        if let Some(old) = f.get("allowOrigin") {
            sink.error(
                old.key_line,
                format!(
                    "'{}' is deprecated and cannot be set with '{}' (Istio uses only the latter)",
                    old.path, origins.path
                ),
            );
        }
        for (path, node) in origins.list(sink).unwrap_or_default() {
            let item = Field {
                path: &path,
                key_line: super::yaml::line_of(node),
                node,
            };
            if let Some(m) = parse_string_match(sink, item, false) {
                allow_origins.push(m);
            }
        }
    } else if let Some(old) = f.get("allowOrigin") {
        for (_, s) in old.string_list(sink).unwrap_or_default() {
            allow_origins.push(ValueMatch::Exact(Arc::from(s.value)));
        }
    }
    let allow_methods = joined(sink, &f, "allowMethods", |m| {
        (m == "*" || Method::from_bytes(m.as_bytes()).is_ok())
            .then_some(())
            .ok_or("is not an HTTP method")
    });
    let header = |h: &str| {
        (h == "*" || HeaderName::from_bytes(h.as_bytes()).is_ok())
            .then_some(())
            .ok_or("is not a header name")
    };
    let allow_headers = joined(sink, &f, "allowHeaders", header);
    let expose_headers = joined(sink, &f, "exposeHeaders", header);
    let max_age = f.get("maxAge").and_then(|m| {
        let d = duration(sink, m, Floor::Zero)?;
        if d.subsec_nanos() != 0 {
            sink.error(
                m.line(),
                format!(
                    "'{}': max_age duration is accurate only to seconds precision",
                    m.path
                ),
            );
            return None;
        }
        Some(HeaderValue::from(d.as_secs()))
    });
    let allow_credentials = f.get("allowCredentials").and_then(|b| b.boolean(sink));
    let forward_not_matching_preflights = f.get("unmatchedPreflights").and_then(|u| {
        let value = u.string(sink)?;
        match value.value.as_str() {
            "UNSPECIFIED" => None,
            "FORWARD" => Some(true),
            "IGNORE" => Some(false),
            other => {
                sink.error(
                    value.line,
                    format!(
                        "'{}': {other:?} is not one of UNSPECIFIED, FORWARD or IGNORE",
                        u.path
                    ),
                );
                None
            }
        }
    });
    if sink.count() != before {
        return None;
    }
    Some(Arc::new(CorsPolicy {
        allow_origins: allow_origins.into(),
        allow_methods,
        allow_headers,
        expose_headers,
        max_age,
        allow_credentials,
        forward_not_matching_preflights,
    }))
}

/// A list of strings joined by `,` (as Istio writes it for Envoy), each
/// checked by `valid`; `None` when absent or empty.
fn joined(
    sink: &mut Sink<'_>,
    f: &Fields<'_, '_>,
    key: &str,
    valid: impl Fn(&str) -> Result<(), &'static str>,
) -> Option<HeaderValue> {
    let items = f.get(key)?.string_list(sink)?;
    let mut out = String::new();
    for (path, s) in &items {
        if let Err(why) = valid(&s.value) {
            sink.error(s.line, format!("'{path}': {:?} {why}", s.value));
            continue;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(&s.value);
    }
    if out.is_empty() {
        return None;
    }
    HeaderValue::from_str(&out).ok()
}

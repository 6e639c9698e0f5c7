//! VirtualService fields that change a request besides routing it: `headers`
//! (at route and destination level), `rewrite`, `redirect` and
//! `directResponse` (<https://istio.io/latest/docs/reference/config/networking/virtual-service/>).
//!
//! Each is parsed into the model of [`mesh_core::traffic`], checked the way
//! Envoy will check it (header names, redirect codes, statuses), and reported
//! at its line when it is wrong; the route is then dropped and the last good
//! version of the VirtualService stays in force.

use std::sync::Arc;

use base64::Engine as _;
use http::StatusCode;
use mesh_core::model::PathMatch;
use mesh_core::traffic::{
    DirectResponse, HeaderOps, HeaderRules, PathRewrite, Redirect, RegexRewrite, Rewrite,
    header_name, header_value, redirect_status,
};

use super::yaml::{Field, Fields, Sink};

/// `headers: {request: {set, add, remove}, response: {...}}`.
pub(crate) fn parse_headers(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<HeaderRules> {
    let f = Fields::of(sink, field, &["request", "response"], &[])?;
    let request = match f.get("request") {
        Some(r) => parse_ops(sink, r)?,
        None => HeaderOps::default(),
    };
    let response = match f.get("response") {
        Some(r) => parse_ops(sink, r)?,
        None => HeaderOps::default(),
    };
    Some(HeaderRules { request, response })
}

fn parse_ops(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<HeaderOps> {
    let before = sink.count();
    let f = Fields::of(sink, field, &["set", "add", "remove"], &[])?;
    let mut pairs = |key: &str| {
        let mut out = Vec::new();
        if let Some(m) = f.get(key) {
            for e in m.entries(sink).unwrap_or_default() {
                let name = header_name(&e.key);
                let value = e.field().string(sink);
                match (name, value) {
                    (Ok(name), Some(value)) => match header_value(&e.key, &value.value) {
                        Ok(value) => out.push((name, value)),
                        Err(err) => sink.error(e.line, format!("'{}': {err}", e.path)),
                    },
                    (Err(err), _) => sink.error(e.line, format!("'{}': {err}", e.path)),
                    (Ok(_), None) => {}
                }
            }
        }
        out
    };
    let set = pairs("set");
    let add = pairs("add");
    let mut remove = Vec::new();
    if let Some(r) = f.get("remove") {
        for (path, name) in r.string_list(sink).unwrap_or_default() {
            match header_name(&name.value) {
                Ok(n) => remove.push(n),
                Err(err) => sink.error(name.line, format!("'{path}': {err}")),
            }
        }
    }
    (sink.count() == before).then(|| HeaderOps {
        set: set.into(),
        add: add.into(),
        remove: remove.into(),
    })
}

/// `rewrite: {uri, uriRegexRewrite: {match, rewrite}, authority}`. A `uri`
/// rewrite replaces the matched prefix, so every `match[].uri` of the route
/// must be a prefix or an exact match (`paths`).
pub(crate) fn parse_rewrite(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
    paths: &[&PathMatch],
) -> Option<Rewrite> {
    let before = sink.count();
    let f = Fields::of(sink, field, &["uri", "uriRegexRewrite", "authority"], &[])?;
    let path = match (f.get("uri"), f.get("uriRegexRewrite")) {
        (Some(_), Some(regex)) => {
            sink.error(
                regex.key_line,
                format!(
                    "'{}': only one of uri or uriRegexRewrite may be set",
                    f.path
                ),
            );
            None
        }
        (Some(uri), None) => {
            let value = uri.string(sink)?;
            if !value.value.starts_with('/') {
                sink.error(
                    value.line,
                    format!("'{}': {:?} must start with '/'", uri.path, value.value),
                );
            } else if paths.iter().any(|p| matches!(p, PathMatch::Regex(_))) {
                sink.error(
                    value.line,
                    format!(
                        "'{}' replaces the matched prefix, but this route matches a uri regex: \
                         use uriRegexRewrite",
                        uri.path
                    ),
                );
            }
            Some(PathRewrite::Prefix(value.value.as_str().into()))
        }
        (None, Some(regex)) => {
            let r = Fields::of(sink, regex, &["match", "rewrite"], &[])?;
            let pattern = r.require(sink, "match").and_then(|m| m.string(sink));
            let rewrite = r.require(sink, "rewrite").and_then(|m| m.string(sink));
            match (pattern, rewrite) {
                (Some(pattern), Some(rewrite)) => {
                    match RegexRewrite::new(&pattern.value, &rewrite.value) {
                        Ok(r) => Some(PathRewrite::Regex(r)),
                        Err(e) => {
                            sink.error(pattern.line, format!("'{}': {e}", regex.path));
                            None
                        }
                    }
                }
                _ => None,
            }
        }
        (None, None) => None,
    };
    let authority = match f.get("authority") {
        Some(a) => {
            let value = a.string(sink)?;
            match http::uri::Authority::try_from(value.value.as_str())
                .ok()
                .and_then(|_| http::HeaderValue::from_str(&value.value).ok())
            {
                Some(v) => Some(v),
                None => {
                    sink.error(
                        value.line,
                        format!("'{}': {:?} is not an authority", a.path, value.value),
                    );
                    None
                }
            }
        }
        None => None,
    };
    (sink.count() == before).then_some(Rewrite { path, authority })
}

/// `redirect: {uri, authority, port | derivePort, scheme, redirectCode}`.
pub(crate) fn parse_redirect(sink: &mut Sink<'_>, field: Field<'_, '_, '_>) -> Option<Redirect> {
    let before = sink.count();
    let f = Fields::of(
        sink,
        field,
        &[
            "uri",
            "authority",
            "port",
            "derivePort",
            "scheme",
            "redirectCode",
        ],
        &[],
    )?;
    let path = f.get("uri").and_then(|u| {
        let value = u.string(sink)?;
        if !value.value.starts_with('/') {
            sink.error(
                value.line,
                format!("'{}': {:?} must start with '/'", u.path, value.value),
            );
        }
        Some(Arc::<str>::from(value.value.as_str()))
    });
    let authority = f.get("authority").and_then(|a| {
        let value = a.string(sink)?;
        if http::uri::Authority::try_from(value.value.as_str()).is_err() {
            sink.error(
                value.line,
                format!("'{}': {:?} is not a host", a.path, value.value),
            );
        }
        Some(Arc::<str>::from(value.value.as_str()))
    });
    let scheme = f.get("scheme").and_then(|s| {
        let value = s.string(sink)?;
        let lower = value.value.to_ascii_lowercase();
        if !matches!(lower.as_str(), "http" | "https") {
            sink.error(
                value.line,
                format!("'{}': {:?} is not http or https", s.path, value.value),
            );
        }
        Some(Arc::<str>::from(lower.as_str()))
    });
    let mut port = f.get("port").and_then(|p| p.port(sink));
    if let Some(derive) = f.get("derivePort") {
        if f.get("port").is_some() {
            sink.error(
                derive.key_line,
                format!("'{}': only one of port or derivePort may be set", f.path),
            );
        }
        if let Some(value) = derive.string(sink) {
            match value.value.as_str() {
                // The request's port: what a redirect keeps anyway.
                "FROM_REQUEST_PORT" => {}
                "FROM_PROTOCOL_DEFAULT" => match scheme.as_deref() {
                    Some("https") => port = Some(443),
                    Some("http") => port = Some(80),
                    _ => sink.error(
                        value.line,
                        format!(
                            "'{}: FROM_PROTOCOL_DEFAULT' needs 'scheme' on this redirect \
                             (the port is the scheme's default)",
                            derive.path
                        ),
                    ),
                },
                other => sink.error(
                    value.line,
                    format!(
                        "'{}': {other:?} is not FROM_PROTOCOL_DEFAULT or FROM_REQUEST_PORT",
                        derive.path
                    ),
                ),
            }
        }
    }
    let status = match f.get("redirectCode") {
        Some(c) => {
            let n = c.integer(sink)?;
            match u32::try_from(n)
                .map_err(|_| format!("{n} is not a redirect code"))
                .and_then(|n| redirect_status(n).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    sink.error(c.line(), format!("'{}': {e}", c.path));
                    return None;
                }
            }
        }
        None => StatusCode::MOVED_PERMANENTLY,
    };
    (sink.count() == before).then_some(Redirect {
        path,
        authority,
        port,
        scheme,
        status,
    })
}

/// `directResponse: {status, body: {string | bytes}}` (`bytes` is base64).
pub(crate) fn parse_direct_response(
    sink: &mut Sink<'_>,
    field: Field<'_, '_, '_>,
) -> Option<DirectResponse> {
    let before = sink.count();
    let f = Fields::of(sink, field, &["status", "body"], &[])?;
    let status = f
        .require(sink, "status")
        .and_then(|s| s.integer_in(sink, 200, 599, ""))
        .and_then(|n| StatusCode::from_u16(u16::try_from(n).ok()?).ok());
    let body = match f.get("body") {
        Some(b) => {
            let b = Fields::of(sink, b, &["string", "bytes"], &[])?;
            match (b.get("string"), b.get("bytes")) {
                (Some(_), Some(bytes)) => {
                    sink.error(
                        bytes.key_line,
                        format!("'{}': only one of string or bytes may be set", b.path),
                    );
                    None
                }
                (Some(s), None) => s.string(sink).map(|s| Arc::from(s.value.as_bytes())),
                (None, Some(bytes)) => {
                    let value = bytes.string(sink)?;
                    match base64::engine::general_purpose::STANDARD.decode(value.value.trim()) {
                        Ok(decoded) => Some(Arc::from(decoded.as_slice())),
                        Err(e) => {
                            sink.error(value.line, format!("'{}' is not base64: {e}", bytes.path));
                            None
                        }
                    }
                }
                (None, None) => {
                    sink.error(b.line, format!("'{}' needs string or bytes", b.path));
                    None
                }
            }
        }
        None => None,
    };
    (sink.count() == before).then_some(DirectResponse {
        status: status?,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::super::Diagnostic;
    use super::super::tests::{DR_CATALOG, SE_CATALOG, assert_one, check};

    /// The catalog ServiceEntry and DestinationRule, then a VirtualService whose
    /// `http[0]` is `route` (YAML at the level of `- match:`, indented by 4); the
    /// VirtualService's first line is line 29.
    fn with_route(route: &str) -> String {
        format!(
            "{SE_CATALOG}---\n{DR_CATALOG}---\napiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: catalog, namespace: shop}}
spec:
  hosts: [catalog]
  http:
  - {}",
            route.trim_start()
        )
    }

    /// The 1-based line of the first line of `text` containing `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        1 + text
            .lines()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("{needle:?} in {text}"))
    }

    #[track_caller]
    fn rejected_at(route: &str, needle_line: &str, message: &str) -> Vec<Diagnostic> {
        let text = with_route(route);
        let diags = check(&text);
        assert_one(&diags, line_of(&text, needle_line), message);
        diags
    }

    #[test]
    fn the_istio_shapes_load() {
        let text = with_route(
            "match:
    - uri: {prefix: /v1}
    headers:
      request:
        set: {x-a: \"1\"}
        add: {x-b: \"2\"}
        remove: [x-c]
      response:
        set: {x-d: \"4\"}
    rewrite:
      uri: /v2
      authority: catalog.internal
    route:
    - destination: {host: catalog, subset: v1}
      headers:
        request:
          set: {x-dest: v1}
    mirror: {host: catalog, subset: v2}
    mirrorPercentage: {value: 12.5}
  - match:
    - uri: {prefix: /m}
    mirrors:
    - destination: {host: catalog, subset: v1}
      percentage: {value: 50}
    - destination: {host: catalog, subset: v2}
    route:
    - destination: {host: catalog}
  - match:
    - uri: {regex: /r/.*}
    rewrite:
      uriRegexRewrite: {match: '^/r/(.*)$', rewrite: '/\\1'}
    route:
    - destination: {host: catalog}
  - match:
    - uri: {exact: /old}
    redirect: {uri: /new, authority: other, port: 8080, scheme: https, redirectCode: 307}
  - match:
    - uri: {exact: /down}
    directResponse:
      status: 503
      body: {bytes: ZG93bg==}
  - route:
    - destination: {host: catalog}
",
        );
        assert_eq!(check(&text), Vec::<Diagnostic>::new());
    }

    #[test]
    fn bad_values_are_reported_at_their_line() {
        rejected_at(
            "headers:
      request:
        set: {\"bad name\": x}
    route:
    - destination: {host: catalog}",
            "bad name",
            "invalid header name",
        );
        rejected_at(
            "headers:
      request:
        remove: [\":path\"]
    route:
    - destination: {host: catalog}",
            ":path",
            "pseudo-header",
        );
        rejected_at(
            "match:
    - uri: {regex: /a.*}
    rewrite:
      uri: /b
    route:
    - destination: {host: catalog}",
            "uri: /b",
            "use uriRegexRewrite",
        );
        rejected_at(
            "rewrite:
      uriRegexRewrite: {match: '^/(a)$', rewrite: '/\\2'}
    route:
    - destination: {host: catalog}",
            "uriRegexRewrite",
            "names group \\2",
        );
        rejected_at(
            "redirect: {uri: /new, redirectCode: 200}",
            "redirectCode",
            "redirect code 200",
        );
        rejected_at(
            "redirect: {uri: /new, derivePort: FROM_PROTOCOL_DEFAULT}",
            "derivePort",
            "needs 'scheme'",
        );
        rejected_at(
            "directResponse: {status: 99}",
            "status: 99",
            "between 200 and 599",
        );
        rejected_at(
            "directResponse:
      status: 200
      body: {bytes: '%%%'}",
            "bytes:",
            "is not base64",
        );
        rejected_at(
            "redirect: {uri: /new}
    route:
    - destination: {host: catalog}",
            "route:",
            "cannot be set with",
        );
        rejected_at(
            "mirror: {host: catalog}
    mirrors: [{destination: {host: catalog}}]
    route:
    - destination: {host: catalog}",
            "mirrors:",
            "only one of mirror or mirrors",
        );
        rejected_at(
            "mirrorPercentage: {value: 5}
    route:
    - destination: {host: catalog}",
            "mirrorPercentage",
            "needs 'mirror'",
        );
        rejected_at(
            "redirect: {uri: /new}
    directResponse: {status: 200}",
            "directResponse",
            "only one of redirect or directResponse",
        );
    }
}

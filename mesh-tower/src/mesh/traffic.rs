//! A route's traffic rules ([`mesh_core::traffic`]) applied by the client
//! stack: header changes and rewrites on the request before its first
//! attempt, header changes on the response, and the answers a route gives
//! itself (a redirect, a direct response) without any connection.
//!
//! The request is changed once, before the engine runs: every attempt
//! (and the head kept for a retry) is the changed request, as with Envoy,
//! where the router filter sends the headers the route rewrote. The
//! destination-level header operations depend on the destination the
//! weighted pick chose, which is fixed for the whole request (retries stay
//! in the cluster).

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, LOCATION};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri};
use mesh_core::model::PathMatch;
use mesh_core::traffic::{LocalAnswer, Origin, Traffic};

use crate::body::ResponseBody;
use crate::error::{Error, ErrorKind};

/// Applies the request side of `traffic` for destination `destination` of
/// a route matched by `matched`: header operations (the destination's,
/// then the route's), then the path and authority rewrites.
pub(crate) fn apply_to_request<B>(
    traffic: &Traffic,
    destination: usize,
    matched: &PathMatch,
    req: &mut Request<B>,
) -> Result<(), Error> {
    traffic.apply_request_headers(destination, req.headers_mut());
    let rewrite = &traffic.rewrite;
    if rewrite.is_empty() {
        return Ok(());
    }
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    if let Some(path) = parts
        .path_and_query
        .as_ref()
        .and_then(|pq| {
            rewrite
                .path_for(pq.path(), matched)
                .map(|p| (p, pq.query()))
        })
        .map(|(path, query)| match query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        })
    {
        parts.path_and_query = Some(PathAndQuery::try_from(path).map_err(|e| {
            Error::new(
                ErrorKind::InvalidRequest,
                "the route's rewrite made an invalid path",
            )
            .with_source(e)
        })?);
    }
    if let Some(authority) = &rewrite.authority {
        // Validated as an authority when the config was read.
        let parsed = Authority::try_from(authority.as_bytes()).map_err(|e| {
            Error::new(
                ErrorKind::InvalidRequest,
                "the route's authority rewrite is not an authority",
            )
            .with_source(e)
        })?;
        if parts.authority.is_some() {
            parts.authority = Some(parsed);
        }
        if parts.authority.is_none() || req.headers().contains_key(HOST) {
            req.headers_mut().insert(HOST, authority.clone());
        }
    }
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| {
        Error::new(ErrorKind::InvalidRequest, "cannot rewrite the URI").with_source(e)
    })?;
    Ok(())
}

/// The response a route answers itself: a redirect (`Location`, the
/// route's status) or a direct response (its status and body,
/// `text/plain` as Envoy sends a body), with the route's response header
/// operations applied.
pub(crate) fn local_answer<B, RB>(
    answer: &LocalAnswer,
    traffic: &Traffic,
    req: &Request<B>,
) -> Response<ResponseBody<RB>> {
    let mut response = match answer {
        LocalAnswer::Redirect(redirect) => {
            let authority = req
                .uri()
                .authority()
                .map(Authority::as_str)
                .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()))
                .unwrap_or("");
            let origin = Origin {
                scheme: req.uri().scheme_str().unwrap_or("http"),
                authority,
                path: req.uri().path(),
                query: req.uri().query(),
            };
            let mut response = Response::new(ResponseBody::local(None));
            *response.status_mut() = redirect.status;
            if let Ok(location) = HeaderValue::try_from(redirect.location(&origin)) {
                response.headers_mut().insert(LOCATION, location);
            }
            response
        }
        LocalAnswer::Direct(direct) => {
            let body = direct.body.as_ref().map(|b| Bytes::copy_from_slice(b));
            let mut response = Response::new(ResponseBody::local(body.clone()));
            *response.status_mut() = direct.status;
            if body.is_some_and(|b| !b.is_empty()) {
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
            response
        }
    };
    traffic.apply_response_headers(None, response.headers_mut());
    response
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use http::StatusCode;
    use http_body_util::{BodyExt, Empty};
    use mesh_core::traffic::{
        DirectResponse, HeaderOps, HeaderRules, PathRewrite, Redirect, Rewrite, header_name,
        header_value,
    };

    use super::*;

    fn req(uri: &str) -> Request<Empty<Bytes>> {
        Request::get(uri).body(Empty::new()).expect("request")
    }

    #[test]
    fn rewrites_keep_the_query_and_move_the_authority() {
        let traffic = Traffic {
            rewrite: Rewrite {
                path: Some(PathRewrite::Prefix("/v2".into())),
                authority: Some(HeaderValue::from_static("catalog.internal:8080")),
            },
            ..Traffic::default()
        };
        let mut r = req("http://catalog/v1/items?page=2");
        apply_to_request(&traffic, 0, &PathMatch::Prefix("/v1".into()), &mut r).unwrap();
        assert_eq!(
            r.uri().to_string(),
            "http://catalog.internal:8080/v2/items?page=2"
        );
        assert!(
            r.headers().get(HOST).is_none(),
            "no Host added to an absolute URI"
        );
        // A relative URI with a Host header: the header is rewritten.
        let mut r = Request::get("/v1/x")
            .header(HOST, "catalog")
            .body(Empty::<Bytes>::new())
            .unwrap();
        apply_to_request(&traffic, 0, &PathMatch::Prefix("/v1".into()), &mut r).unwrap();
        assert_eq!(r.uri().to_string(), "/v2/x");
        assert_eq!(r.headers()[HOST], "catalog.internal:8080");
    }

    #[tokio::test]
    async fn local_answers() {
        let set = HeaderOps {
            set: Arc::from([(
                header_name("x-why").unwrap(),
                header_value("x-why", "moved").unwrap(),
            )]),
            ..HeaderOps::default()
        };
        let traffic = Traffic {
            headers: HeaderRules {
                request: HeaderOps::default(),
                response: set,
            },
            ..Traffic::default()
        };
        let redirect = LocalAnswer::Redirect(Redirect {
            path: Some("/new".into()),
            authority: None,
            port: None,
            scheme: Some("https".into()),
            status: StatusCode::FOUND,
        });
        let r: Response<ResponseBody<Empty<Bytes>>> =
            local_answer(&redirect, &traffic, &req("http://catalog:8080/old?a=1"));
        assert_eq!(r.status(), StatusCode::FOUND);
        assert_eq!(r.headers()[LOCATION], "https://catalog:8080/new?a=1");
        assert_eq!(r.headers()["x-why"], "moved");

        let direct = LocalAnswer::Direct(DirectResponse {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: Some(Arc::from(&b"down"[..])),
        });
        let r: Response<ResponseBody<Empty<Bytes>>> =
            local_answer(&direct, &Traffic::default(), &req("http://catalog/"));
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[CONTENT_TYPE], "text/plain");
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"down");
    }
}

//! OTLP export and sampling from the standard `OTEL_*` variables.
//!
//! [`OtelConfig`] reads the variables of the OpenTelemetry SDK
//! specification
//! ([SDK environment variables](https://opentelemetry.io/docs/specs/otel/configuration/sdk-environment-variables/),
//! [OTLP exporter](https://opentelemetry.io/docs/specs/otel/protocol/exporter/))
//! through a lookup function (edition 2024: tests do not set the process
//! environment), and builds one `SdkTracerProvider` per service with that
//! service's resource: there is no global provider, so three services in
//! one process export as three services.
//!
//! | variable | meaning |
//! |---|---|
//! | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | the full traces URL (HTTP: used as is) |
//! | `OTEL_EXPORTER_OTLP_ENDPOINT` | the collector's base URL (HTTP: `/v1/traces` is appended) |
//! | `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` or `http/protobuf` (the default, as the specification says) |
//! | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | `always_on`, `always_off`, `traceidratio`, `parentbased_always_on` (default), `parentbased_always_off`, `parentbased_traceidratio` with a ratio in 0..=1 |
//! | `OTEL_RESOURCE_ATTRIBUTES` | extra resource attributes (`key=value,...`; the service's own win) |
//! | `OTEL_TRACES_EXPORTER` | `otlp` (default) or `none` |
//! | `OTEL_SDK_DISABLED` | `true`: no tracing |
//!
//! Export is opt-in: without an endpoint variable no exporter is built and
//! the mesh only propagates trace context (a library should not send spans
//! to `localhost:4318` unasked). Headers, timeout and compression
//! (`OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`, `..._COMPRESSION`) are read
//! by opentelemetry-otlp itself. `OTEL_SERVICE_NAME` is ignored: each
//! service's name comes from its [`Identity`].
//!
//! Spans are exported in batches by the SDK's batch processor, on its own
//! thread. The gRPC exporter (tonic) and the HTTP exporter (a hyper client
//! that runs each request on the tokio runtime that built it) both need a
//! tokio runtime at build time and while exporting.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::KeyValue;
use opentelemetry_http::{HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use super::Identity;
use crate::error::{Error, ErrorKind};

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP/gRPC (collector port 4317).
    Grpc,
    /// OTLP/HTTP with protobuf bodies (collector port 4318).
    HttpProtobuf,
}

/// How traces are sampled (the `OTEL_TRACES_SAMPLER` values).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Every trace.
    AlwaysOn,
    /// No trace (context is still propagated).
    AlwaysOff,
    /// A ratio of traces, by trace id, ignoring the parent's decision.
    TraceIdRatio(f64),
    /// Follow the parent's decision; sample every new trace (the default).
    ParentBasedAlwaysOn,
    /// Follow the parent's decision; sample no new trace.
    ParentBasedAlwaysOff,
    /// Follow the parent's decision; sample this ratio of new traces.
    ParentBasedTraceIdRatio(f64),
}

impl Sampling {
    /// Whether no span is ever sampled, whatever the parent says:
    /// `AlwaysOff`, or a trace id ratio of 0 (parent-based samplers follow
    /// a sampled parent, so they can always sample).
    pub fn never_samples(self) -> bool {
        match self {
            Sampling::AlwaysOff => true,
            Sampling::TraceIdRatio(r) => r <= 0.0,
            _ => false,
        }
    }

    /// The SDK sampler.
    pub fn sampler(self) -> Sampler {
        match self {
            Sampling::AlwaysOn => Sampler::AlwaysOn,
            Sampling::AlwaysOff => Sampler::AlwaysOff,
            Sampling::TraceIdRatio(r) => Sampler::TraceIdRatioBased(r),
            Sampling::ParentBasedAlwaysOn => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            Sampling::ParentBasedAlwaysOff => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            Sampling::ParentBasedTraceIdRatio(r) => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(r)))
            }
        }
    }
}

/// Trace export settings, usually from the standard `OTEL_*` variables:
///
/// | variable | meaning |
/// |---|---|
/// | `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` | the full traces URL (HTTP: used as is) |
/// | `OTEL_EXPORTER_OTLP_ENDPOINT` | the collector's base URL (HTTP: `/v1/traces` is appended) |
/// | `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`, `OTEL_EXPORTER_OTLP_PROTOCOL` | `grpc` or `http/protobuf` (the default, as the specification says) |
/// | `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG` | `always_on`, `always_off`, `traceidratio`, `parentbased_always_on` (default), `parentbased_always_off`, `parentbased_traceidratio` with a ratio in 0..=1 |
/// | `OTEL_RESOURCE_ATTRIBUTES` | extra resource attributes (`key=value,...`; the service's own win) |
/// | `OTEL_TRACES_EXPORTER` | `otlp` (default) or `none` |
/// | `OTEL_SDK_DISABLED` | `true`: no tracing |
///
/// Export is opt-in: without an endpoint variable no exporter is built and
/// the mesh only propagates trace context (a library should not send spans
/// to `localhost:4318` unasked). Headers, timeout and compression
/// (`OTEL_EXPORTER_OTLP_HEADERS`, `..._TIMEOUT`, `..._COMPRESSION`) are read
/// by opentelemetry-otlp itself. `OTEL_SERVICE_NAME` is ignored: each
/// service's name comes from its [`Identity`].
///
/// One tracer provider is built per service ([`OtelConfig::tracer_provider`]),
/// with that service's resource: no global provider.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelConfig {
    endpoint: Option<String>,
    protocol: OtlpProtocol,
    sampling: Sampling,
    resource_attributes: Vec<(String, String)>,
    enabled: bool,
}

impl Default for OtelConfig {
    /// No export, parent-based sampling of every new trace.
    fn default() -> Self {
        OtelConfig {
            endpoint: None,
            protocol: OtlpProtocol::HttpProtobuf,
            sampling: Sampling::ParentBasedAlwaysOn,
            resource_attributes: Vec::new(),
            enabled: true,
        }
    }
}

impl OtelConfig {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads the variables through `lookup` (a name → value function), so
    /// tests and embedders can supply them.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let get = |name: &str| {
            lookup(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let mut config = OtelConfig::default();
        if get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            config.enabled = false;
        }
        match get("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => config.enabled = false,
            Some(other) => {
                return Err(config_error(format!(
                    "OTEL_TRACES_EXPORTER={other:?} is not supported: use \"otlp\" or \"none\""
                )));
            }
        }
        let protocol_var = [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ]
        .into_iter()
        .find_map(|name| get(name).map(|v| (name, v)));
        if let Some((name, value)) = protocol_var {
            config.protocol = match value.as_str() {
                "grpc" => OtlpProtocol::Grpc,
                "http/protobuf" => OtlpProtocol::HttpProtobuf,
                other => {
                    return Err(config_error(format!(
                        "{name}={other:?} is not supported: use \"grpc\" or \"http/protobuf\""
                    )));
                }
            };
        }
        config.endpoint = match (
            get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        ) {
            (Some(full), _) => Some(full),
            (None, Some(base)) if config.protocol == OtlpProtocol::HttpProtobuf => {
                Some(format!("{}/v1/traces", base.trim_end_matches('/')))
            }
            (None, base) => base,
        };
        if let Some(endpoint) = &config.endpoint {
            check_endpoint(endpoint)?;
        }
        let arg = get("OTEL_TRACES_SAMPLER_ARG");
        let ratio = || -> Result<f64, Error> {
            match &arg {
                None => Ok(1.0),
                Some(a) => a
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| {
                        config_error(format!(
                            "OTEL_TRACES_SAMPLER_ARG={a:?} is not a ratio between 0 and 1"
                        ))
                    }),
            }
        };
        if let Some(sampler) = get("OTEL_TRACES_SAMPLER") {
            config.sampling = match sampler.as_str() {
                "always_on" => Sampling::AlwaysOn,
                "always_off" => Sampling::AlwaysOff,
                "traceidratio" => Sampling::TraceIdRatio(ratio()?),
                "parentbased_always_on" => Sampling::ParentBasedAlwaysOn,
                "parentbased_always_off" => Sampling::ParentBasedAlwaysOff,
                "parentbased_traceidratio" => Sampling::ParentBasedTraceIdRatio(ratio()?),
                other => {
                    return Err(config_error(format!(
                        "OTEL_TRACES_SAMPLER={other:?} is not supported: use always_on, \
                         always_off, traceidratio, parentbased_always_on, \
                         parentbased_always_off or parentbased_traceidratio"
                    )));
                }
            };
        }
        if let Some(attributes) = get("OTEL_RESOURCE_ATTRIBUTES") {
            for pair in attributes.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, v) = pair.split_once('=').ok_or_else(|| {
                    config_error(format!(
                        "OTEL_RESOURCE_ATTRIBUTES: {pair:?} is not key=value"
                    ))
                })?;
                config
                    .resource_attributes
                    .push((k.trim().to_owned(), v.trim().to_owned()));
            }
        }
        Ok(config)
    }

    /// Exports to `endpoint` (for HTTP, the full traces URL).
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Result<Self, Error> {
        let endpoint = endpoint.into();
        check_endpoint(&endpoint)?;
        self.endpoint = Some(endpoint);
        Ok(self)
    }

    /// The transport.
    pub fn with_protocol(mut self, protocol: OtlpProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// The sampling (mesh config can override the environment's).
    pub fn with_sampling(mut self, sampling: Sampling) -> Self {
        self.sampling = sampling;
        self
    }

    /// Where spans go, if anywhere.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref().filter(|_| self.enabled)
    }

    /// The transport.
    pub fn protocol(&self) -> OtlpProtocol {
        self.protocol
    }

    /// The sampling.
    pub fn sampling(&self) -> Sampling {
        self.sampling
    }

    /// A tracer provider for `identity`, exporting over OTLP; `None` when
    /// export is off (no endpoint, `OTEL_TRACES_EXPORTER=none`,
    /// `OTEL_SDK_DISABLED=true`). Needs a tokio runtime.
    pub fn tracer_provider(&self, identity: &Identity) -> Result<Option<SdkTracerProvider>, Error> {
        let Some(endpoint) = self.endpoint() else {
            return Ok(None);
        };
        let handle = tokio::runtime::Handle::try_current().map_err(|_| {
            config_error("the OTLP exporter needs a tokio runtime: build telemetry inside one")
        })?;
        let exporter = match self.protocol {
            OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_protocol(Protocol::Grpc)
                .build(),
            OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint)
                .with_protocol(Protocol::HttpBinary)
                .with_http_client(TokioHttpClient::new(handle))
                .build(),
        }
        .map_err(|e| {
            config_error(format!("cannot build the OTLP exporter for {endpoint}")).with_source(e)
        })?;
        let extra = self
            .resource_attributes
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
            .collect();
        Ok(Some(
            SdkTracerProvider::builder()
                .with_resource(identity.resource_with(extra))
                .with_sampler(self.sampling.sampler())
                .with_batch_exporter(exporter)
                .build(),
        ))
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), Error> {
    let uri: http::Uri = endpoint.parse().map_err(|e| {
        config_error(format!("the OTLP endpoint {endpoint:?} is not a URL")).with_source(e)
    })?;
    match uri.scheme_str() {
        Some("http") => Ok(()),
        Some("https") => Err(config_error(format!(
            "the OTLP endpoint {endpoint:?} uses https, which this build cannot export to: \
             use an http:// endpoint (a local collector or agent)"
        ))),
        _ => Err(config_error(format!(
            "the OTLP endpoint {endpoint:?} must be an http:// URL"
        ))),
    }
}

/// An error in the telemetry configuration.
pub(crate) fn config_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidRequest, message)
}

/// The largest collector response read (the SDK's limit for its clients).
const MAX_RESPONSE_BYTES: usize = 4 * 1024 * 1024;

/// OTLP/HTTP client: hyper, with each request run on the tokio runtime it
/// was built on (the SDK's batch processor calls it from its own thread).
#[derive(Clone)]
struct TokioHttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
    handle: tokio::runtime::Handle,
}

impl TokioHttpClient {
    fn new(handle: tokio::runtime::Handle) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        connector.set_nodelay(true);
        TokioHttpClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            handle,
        }
    }
}

impl fmt::Debug for TokioHttpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokioHttpClient").finish_non_exhaustive()
    }
}

type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'a>>;

impl HttpClient for TokioHttpClient {
    fn send_bytes<'s, 'f>(&'s self, request: Request<Bytes>) -> SendFuture<'f>
    where
        's: 'f,
        Self: 'f,
    {
        let client = self.client.clone();
        let task = self.handle.spawn(async move {
            let response = client.request(request.map(Full::new)).await?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_RESPONSE_BYTES)
                .collect()
                .await?
                .to_bytes();
            Ok::<_, HttpError>(Response::from_parts(parts, body))
        });
        Box::pin(async move { task.await.map_err(|e| Box::new(e) as HttpError)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<OtelConfig, Error> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        OtelConfig::from_lookup(move |name| {
            vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
        })
    }

    #[test]
    fn nothing_set_means_no_export() {
        let c = config(&[]).unwrap();
        assert_eq!(c.endpoint(), None);
        assert_eq!(c.sampling(), Sampling::ParentBasedAlwaysOn);
        assert_eq!(c.protocol(), OtlpProtocol::HttpProtobuf);
    }

    #[test]
    fn endpoints_follow_the_specification() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).unwrap();
        assert_eq!(c.endpoint(), Some("http://collector:4318/v1/traces"));
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ])
        .unwrap();
        assert_eq!(c.endpoint(), Some("http://collector:4317"));
        assert_eq!(c.protocol(), OtlpProtocol::Grpc);
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4318/custom"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
            ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
        ])
        .unwrap();
        assert_eq!(c.endpoint(), Some("http://b:4318/custom"));
        assert_eq!(c.protocol(), OtlpProtocol::HttpProtobuf);
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ])
        .unwrap();
        assert_eq!(c.endpoint(), None);
        let c = config(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4318"),
            ("OTEL_SDK_DISABLED", "true"),
        ])
        .unwrap();
        assert_eq!(c.endpoint(), None);
    }

    #[test]
    fn samplers_are_read() {
        let c = config(&[
            ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ])
        .unwrap();
        assert_eq!(c.sampling(), Sampling::ParentBasedTraceIdRatio(0.25));
        let c = config(&[("OTEL_TRACES_SAMPLER", "always_off")]).unwrap();
        assert_eq!(c.sampling(), Sampling::AlwaysOff);
        let c = config(&[("OTEL_TRACES_SAMPLER", "traceidratio")]).unwrap();
        assert_eq!(c.sampling(), Sampling::TraceIdRatio(1.0));
    }

    #[test]
    fn mistakes_are_errors_naming_the_variable() {
        for (vars, needle) in [
            (
                vec![("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            (
                vec![
                    ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                    ("OTEL_TRACES_SAMPLER_ARG", "2"),
                ],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (vec![("OTEL_TRACES_SAMPLER", "xray")], "OTEL_TRACES_SAMPLER"),
            (
                vec![("OTEL_TRACES_EXPORTER", "zipkin")],
                "OTEL_TRACES_EXPORTER",
            ),
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "https://x:4318")],
                "https",
            ),
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")],
                "not a URL",
            ),
            (
                vec![("OTEL_RESOURCE_ATTRIBUTES", "a=b,c")],
                "OTEL_RESOURCE_ATTRIBUTES",
            ),
        ] {
            let e = config(&vars).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn no_runtime_is_an_error_not_a_panic() {
        let c = config(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")]).unwrap();
        let e = c.tracer_provider(&Identity::new("a", "b")).unwrap_err();
        assert!(e.to_string().contains("tokio runtime"), "{e}");
    }
}

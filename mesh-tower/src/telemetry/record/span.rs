//! The span side of a decision record (feature `telemetry`): a sampled
//! request's span and tracer, a child span per attempt, span events for
//! the engine's decisions, and the record as `mesh.*` span attributes.
//!
//! Nothing here runs for a request that is not sampled: the record holds
//! no [`Trace`] then, and the engine's calls stop at the `None`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use http::HeaderMap;
use mesh_core::model::{LbPolicy, Name, RetryOn};
use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanKind, Status, TraceContextExt as _, Tracer as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::trace::SdkTracer;

use super::super::flags::{BreakerLimit, RetryRefusal};
use super::super::propagation;
use super::{AttemptOutcome, DecisionRecord, GRPC_ABORT, shadow_result};

/// The span side of a sampled request: the context holding its span (the
/// parent of attempt spans) and the tracer that makes them.
pub(crate) struct Trace {
    pub(crate) tracer: SdkTracer,
    pub(crate) cx: Context,
    /// The request span's name, which attempt spans share (OpenTelemetry
    /// names every physical HTTP request like its logical one).
    pub(crate) name: String,
}

impl Trace {
    /// The child span of attempt `index` (0 for the first try) to
    /// `endpoint` in `cluster`.
    pub(super) fn attempt_span(
        &self,
        endpoint: SocketAddr,
        index: u32,
        cluster: Option<&Name>,
    ) -> AttemptSpan {
        let mut attributes = vec![
            KeyValue::new("network.peer.address", endpoint.ip().to_string()),
            KeyValue::new("network.peer.port", i64::from(endpoint.port())),
            KeyValue::new("mesh.attempt", i64::from(index) + 1),
        ];
        if index > 0 {
            attributes.push(KeyValue::new("http.request.resend_count", i64::from(index)));
        }
        if let Some(cluster) = cluster {
            attributes.push(KeyValue::new("mesh.cluster", cluster.to_string()));
        }
        let builder = SpanBuilder::from_name(self.name.clone())
            .with_kind(SpanKind::Client)
            .with_attributes(attributes);
        AttemptSpan(self.tracer.build_with_context(builder, &self.cx))
    }

    fn event(&self, name: &'static str, attributes: Vec<KeyValue>) {
        self.cx.span().add_event(name, attributes);
    }

    pub(super) fn retrying(&self, reason: RetryOn, backoff: Duration) {
        self.event(
            "retry",
            vec![
                KeyValue::new("mesh.retry.reason", retry_names(reason)),
                KeyValue::new("mesh.retry.backoff_ms", backoff.as_secs_f64() * 1000.0),
            ],
        );
    }

    pub(super) fn retry_refused(&self, why: RetryRefusal) {
        self.event(
            "retry refused",
            vec![KeyValue::new("mesh.reason", why.name())],
        );
    }

    pub(super) fn breaker_overflow(&self, limit: BreakerLimit) {
        self.event(
            "circuit breaker overflow",
            vec![KeyValue::new("mesh.limit", limit.name())],
        );
    }

    pub(super) fn outlier_ejected(&self, endpoint: SocketAddr) {
        self.event(
            "outlier ejection",
            vec![KeyValue::new("network.peer.address", endpoint.to_string())],
        );
    }

    pub(super) fn outlier(&self, decision: &'static str, endpoint: Option<SocketAddr>) {
        let mut attributes = vec![KeyValue::new("mesh.decision", decision)];
        if let Some(endpoint) = endpoint {
            attributes.push(KeyValue::new("network.peer.address", endpoint.to_string()));
        }
        self.event("outlier detection", attributes);
    }
}

/// A sampled attempt's child span (OpenTelemetry: one span per physical
/// HTTP request).
pub(super) struct AttemptSpan(opentelemetry_sdk::trace::Span);

impl AttemptSpan {
    /// Points `traceparent` at this span.
    pub(super) fn inject(&self, headers: &mut HeaderMap) {
        propagation::inject_span_context(self.0.span_context(), headers);
    }

    pub(super) fn record_error(&mut self, error: &dyn std::error::Error) {
        self.0.record_error(error);
    }

    /// Ends the span with the attempt's outcome.
    pub(super) fn end(self, outcome: AttemptOutcome) {
        let mut span = self.0;
        match outcome {
            AttemptOutcome::Response {
                status,
                grpc_status,
            } => {
                span.set_attribute(KeyValue::new(
                    "http.response.status_code",
                    i64::from(status.as_u16()),
                ));
                if let Some(code) = grpc_status {
                    span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
                }
                if status.as_u16() >= 400 || grpc_status.is_some_and(|c| c != 0) {
                    span.set_status(Status::error(""));
                }
            }
            AttemptOutcome::Failed(flags) => {
                span.set_attribute(KeyValue::new("mesh.response_flags", flags.to_string()));
                span.set_status(Status::error(flags.to_string()));
            }
        }
        span.end();
    }

    /// Ends the span of an attempt dropped before its outcome was known.
    pub(super) fn cancel(self) {
        let mut span = self.0;
        span.set_status(Status::error("attempt cancelled"));
        span.end();
    }
}

impl DecisionRecord {
    /// A span event built only when the request is sampled (`make` returns
    /// the event's name and attributes).
    pub fn event(&self, make: impl FnOnce() -> (&'static str, Vec<KeyValue>)) {
        if let Some(trace) = self.trace() {
            let (name, attributes) = make();
            trace.event(name, attributes);
        }
    }

    /// The decision record as span attributes (`mesh.*`; the response
    /// flags are added by the caller, with the final ones).
    pub(crate) fn attributes(&self) -> Vec<KeyValue> {
        let i = &*self.inner;
        let mut out = Vec::with_capacity(16);
        if let Some(v) = i.routed.get().map(|r| &r.versions) {
            out.push(KeyValue::new(
                "mesh.config.version.lds",
                v.listeners.to_string(),
            ));
            out.push(KeyValue::new(
                "mesh.config.version.rds",
                v.route_configs.to_string(),
            ));
            out.push(KeyValue::new(
                "mesh.config.version.cds",
                v.clusters.to_string(),
            ));
            out.push(KeyValue::new(
                "mesh.config.version.eds",
                v.endpoints.to_string(),
            ));
        }
        if let Some(routed) = i.routed.get() {
            out.push(KeyValue::new("mesh.listener", routed.listener.to_string()));
            out.push(KeyValue::new("mesh.route", routed.route.to_string()));
        }
        if let Some((c, p)) = self.picked() {
            out.push(KeyValue::new("mesh.cluster", c.to_string()));
            out.push(KeyValue::new("mesh.lb_policy", lb_policy_name(p)));
        }
        if let Some(a) = self.last_attempt() {
            out.push(KeyValue::new("mesh.endpoint", a.endpoint.to_string()));
        }
        let attempts = self.attempts();
        if attempts > 0 {
            out.push(KeyValue::new("mesh.attempts", i64::from(attempts)));
        }
        let reasons = self.retry_reasons();
        if !reasons.is_empty() {
            out.push(KeyValue::new("mesh.retry.reasons", retry_names(reasons)));
        }
        for (key, value) in [
            ("mesh.timeout_ms", i.route_timeout.get()),
            ("mesh.per_try_timeout_ms", i.per_try_timeout.get()),
            ("mesh.deadline.remaining_ms", i.deadline.get()),
            ("mesh.fault.delay_ms", i.fault_delay.get()),
        ] {
            if let Some(d) = value {
                out.push(KeyValue::new(key, d.as_secs_f64() * 1000.0));
            }
        }
        match i.fault_abort.load(Ordering::Relaxed) {
            0 => {}
            n if n & GRPC_ABORT != 0 => {
                out.push(KeyValue::new(
                    "mesh.fault.abort_grpc_status",
                    i64::from(n & 0xffff),
                ));
            }
            n => out.push(KeyValue::new("mesh.fault.abort_http_status", i64::from(n))),
        }
        if let Some(p) = self.peer_principal_id() {
            out.push(KeyValue::new("mesh.peer.principal", p.to_string()));
        }
        if let Some(a) = i.denial.get().or_else(|| i.authorization.get()) {
            let decision = if a.allowed { "allow" } else { "deny" };
            out.push(KeyValue::new("mesh.authz.decision", decision));
            if let Some(policy) = &a.policy {
                out.push(KeyValue::new("mesh.authz.policy", policy.to_string()));
            }
        }
        if let Some(dry_run) = i.dry_run.get() {
            for (result, name_key, result_key) in [
                (
                    &dry_run.allow,
                    DRY_RUN_ALLOW_POLICY_NAME,
                    DRY_RUN_ALLOW_POLICY_RESULT,
                ),
                (
                    &dry_run.deny,
                    DRY_RUN_DENY_POLICY_NAME,
                    DRY_RUN_DENY_POLICY_RESULT,
                ),
            ] {
                let Some(result) = result else { continue };
                if let Some(policy) = &result.policy {
                    out.push(KeyValue::new(name_key, policy.to_string()));
                }
                out.push(KeyValue::new(result_key, shadow_result(result.allowed)));
            }
        }
        out
    }
}

/// Istio's span tags for dry-run authorization policies (Envoy's RBAC
/// `shadow_rules` of the ALLOW and the DENY filter): the matching dry-run
/// policy (`<namespace>/<name>`; absent when none matched) and what the
/// dry-run policies of that action would have decided.
const DRY_RUN_ALLOW_POLICY_NAME: &str = "istio.authorization.dry_run.allow_policy.name";
const DRY_RUN_ALLOW_POLICY_RESULT: &str = "istio.authorization.dry_run.allow_policy.result";
const DRY_RUN_DENY_POLICY_NAME: &str = "istio.authorization.dry_run.deny_policy.name";
const DRY_RUN_DENY_POLICY_RESULT: &str = "istio.authorization.dry_run.deny_policy.result";

fn lb_policy_name(p: &LbPolicy) -> &'static str {
    match p {
        LbPolicy::RoundRobin => "ROUND_ROBIN",
        LbPolicy::LeastRequest => "LEAST_REQUEST",
        LbPolicy::Random => "RANDOM",
        LbPolicy::RingHash { .. } => "RING_HASH",
    }
}

fn retry_names(r: RetryOn) -> String {
    let names: Vec<&str> = r.names().collect();
    names.join(",")
}

#[cfg(test)]
mod tests {
    use mesh_core::snapshot::Versions;

    use super::*;

    #[test]
    fn attributes_name_every_decision() {
        let record = DecisionRecord::new();
        let versions = Versions {
            listeners: "1".into(),
            route_configs: "2".into(),
            clusters: "3".into(),
            endpoints: "4".into(),
        };
        record.route(&versions, &"catalog".into(), &"split".into());
        record.cluster(&"c".into(), LbPolicy::RoundRobin);
        record.timeouts(Some(Duration::from_secs(1)), None);
        record.deadline_remaining(Duration::from_millis(500));
        record.fault_abort_grpc(14);
        record.authorization(false, Some(&"deny-all".into()));
        let attrs: Vec<(String, String)> = record
            .attributes()
            .into_iter()
            .map(|kv| (kv.key.to_string(), kv.value.to_string()))
            .collect();
        let get = |k: &str| {
            attrs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("mesh.config.version.cds"), Some("3"));
        assert_eq!(get("mesh.route"), Some("split"));
        assert_eq!(get("mesh.lb_policy"), Some("ROUND_ROBIN"));
        assert_eq!(get("mesh.timeout_ms"), Some("1000"));
        assert_eq!(get("mesh.deadline.remaining_ms"), Some("500"));
        assert_eq!(get("mesh.fault.abort_grpc_status"), Some("14"));
        assert_eq!(record.flags().to_string(), "FI");
        assert_eq!(get("mesh.authz.decision"), Some("deny"));
        assert_eq!(get("mesh.authz.policy"), Some("deny-all"));
    }

    #[test]
    fn a_denial_wins_and_dry_run_results_use_istios_tags() {
        use mesh_core::rbac::{DryRun, ShadowResult};

        let attrs = |record: &DecisionRecord| -> Vec<(String, String)> {
            record
                .attributes()
                .into_iter()
                .map(|kv| (kv.key.to_string(), kv.value.to_string()))
                .collect()
        };
        let get = |attrs: &[(String, String)], k: &str| {
            attrs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let record = DecisionRecord::new();
        // serve_with allowed under one policy, a layer's own policy denied.
        record.authorization(true, Some(&"shop/allow-frontend".into()));
        record.authorization(false, Some(&"shop/deny-admin".into()));
        record.authorization(true, None);
        assert_eq!(
            record.authorization_decision(),
            Some((false, Some(&"shop/deny-admin".into())))
        );
        record.dry_run(&DryRun {
            allow: Some(ShadowResult {
                allowed: false,
                policy: None,
            }),
            deny: Some(ShadowResult {
                allowed: false,
                policy: Some("shop/deny-all".into()),
            }),
        });
        // The first dry-run result is kept.
        record.dry_run(&DryRun::default());
        let a = attrs(&record);
        assert_eq!(get(&a, "mesh.authz.decision").as_deref(), Some("deny"));
        assert_eq!(
            get(&a, "istio.authorization.dry_run.deny_policy.name").as_deref(),
            Some("shop/deny-all")
        );
        assert_eq!(
            get(&a, "istio.authorization.dry_run.deny_policy.result").as_deref(),
            Some("denied")
        );
        assert_eq!(
            get(&a, "istio.authorization.dry_run.allow_policy.result").as_deref(),
            Some("denied")
        );
        assert_eq!(
            get(&a, "istio.authorization.dry_run.allow_policy.name"),
            None
        );

        // Without dry-run policies: no dry-run tags.
        let plain = DecisionRecord::new();
        plain.authorization(true, None);
        assert!(
            attrs(&plain)
                .iter()
                .all(|(k, _)| !k.starts_with("istio.authorization"))
        );
    }
}

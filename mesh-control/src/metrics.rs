//! mesh-control's own Prometheus metrics (`GET /metrics` on the admin API).
//!
//! What an operator of the control plane watches: how many clients are
//! connected, how often and how fast config reaches them, how many responses
//! they rejected, registration churn, config changes rejected (an edit that
//! is not in force: the mesh runs its last good version), and failed writes
//! of the data directory, and how much translating the mesh costs (a
//! registration storm must cost a bounded number of full translations, see
//! `Shared::rebuild_soon`). Counters are the prometheus-client
//! types, so `/status` reads the same numbers `/metrics` exports.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The control server's metrics.
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) pushes: Counter,
    pub(crate) nacks: Counter,
    pub(crate) registrations: Counter,
    pub(crate) reloads: Counter,
    pub(crate) registrations_denied: Counter,
    pub(crate) certificates_issued: Counter,
    pub(crate) certificates_denied: Counter,
    pub(crate) clients: Gauge,
    pub(crate) config_version: Gauge,
    /// Changes read from disk not in force now (by resource or document).
    pub(crate) config_rejected: Gauge,
    /// Rejections reported (each distinct one once).
    pub(crate) config_rejections: Counter,
    /// Failed writes to the data directory.
    pub(crate) persist_errors: Counter,
    /// Full translations of the mesh (config and registrations into
    /// encoded xDS), whatever asked for them.
    pub(crate) translations: Counter,
    translation_seconds: Histogram,
    /// The minimum interval between two translations asked for by
    /// registrations (`Shared::rebuild_soon`), so that an operator can
    /// tell `translations` per second from its ceiling.
    registration_debounce: Gauge<f64, AtomicU64>,
    push_latency: Histogram,
    registry: Registry,
}

impl Default for Counters {
    fn default() -> Self {
        let pushes = Counter::default();
        let nacks = Counter::default();
        let registrations = Counter::default();
        let reloads = Counter::default();
        let registrations_denied = Counter::default();
        let certificates_issued = Counter::default();
        let certificates_denied = Counter::default();
        let clients = Gauge::default();
        let config_version = Gauge::default();
        let config_rejected = Gauge::default();
        let config_rejections = Counter::default();
        let persist_errors = Counter::default();
        let translations = Counter::default();
        // 100 µs .. ~3 s: one translation of a small mesh is well under a
        // millisecond, of 10,000 endpoints tens of milliseconds.
        let translation_seconds = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 15),
        );
        let registration_debounce = Gauge::<f64, AtomicU64>::default();
        // 100 µs .. ~3 s.
        let push_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 15),
        );
        let mut registry = Registry::with_prefix("mesh_control");
        registry.register(
            "xds_pushes",
            "xDS responses sent to clients",
            pushes.clone(),
        );
        registry.register(
            "xds_nacks",
            "xDS responses rejected by clients (NACK)",
            nacks.clone(),
        );
        registry.register(
            "registrations",
            "endpoint registrations accepted",
            registrations.clone(),
        );
        registry.register(
            "config_reloads",
            "reloads of the config directory",
            reloads.clone(),
        );
        registry.register(
            "registrations_denied",
            "endpoint registrations, renewals and deletions refused for lack of credentials or \
             of permission",
            registrations_denied.clone(),
        );
        registry.register(
            "certificates_issued",
            "workload certificates issued by the CA",
            certificates_issued.clone(),
        );
        registry.register(
            "certificates_denied",
            "certificate requests refused (unknown join token, another identity)",
            certificates_denied.clone(),
        );
        registry.register("xds_clients", "connected ADS streams", clients.clone());
        registry.register(
            "config_version",
            "version of the config being served",
            config_version.clone(),
        );
        registry.register(
            "config_rejected_resources",
            "changes read from the config directories that are not in force (the resource \
             keeps its last good version, or a new one is left out); see /status `rejected`",
            config_rejected.clone(),
        );
        registry.register(
            "config_rejections",
            "changes to the config rejected (each distinct rejection counted once)",
            config_rejections.clone(),
        );
        registry.register(
            "persist_errors",
            "failed writes to the data directory (config in force, leases, version ceiling)",
            persist_errors.clone(),
        );
        registry.register(
            "translations",
            "full translations of the config and registrations into xDS (startup, reloads, \
             expiries, batches of registrations)",
            translations.clone(),
        );
        registry.register(
            "translation_duration_seconds",
            "time one full translation took (translate, encode, publish)",
            translation_seconds.clone(),
        );
        registry.register(
            "registration_debounce_seconds",
            "minimum interval between two translations asked for by registrations: a storm of \
             registrations costs at most one translation per interval",
            registration_debounce.clone(),
        );
        registry.register(
            "xds_push_latency_seconds",
            "time from a config change being published to a client's response being sent",
            push_latency.clone(),
        );
        Counters {
            pushes,
            nacks,
            registrations,
            reloads,
            registrations_denied,
            certificates_issued,
            certificates_denied,
            clients,
            config_version,
            config_rejected,
            config_rejections,
            persist_errors,
            translations,
            translation_seconds,
            registration_debounce,
            push_latency,
            registry,
        }
    }
}

impl Counters {
    pub(crate) fn observe_push_latency(&self, latency: Duration) {
        self.push_latency.observe(latency.as_secs_f64());
    }

    /// Counts one full translation that took `took`.
    pub(crate) fn observe_translation(&self, took: Duration) {
        self.translations.inc();
        self.translation_seconds.observe(took.as_secs_f64());
    }

    pub(crate) fn set_registration_debounce(&self, debounce: Duration) {
        self.registration_debounce.set(debounce.as_secs_f64());
    }

    /// The Prometheus text exposition (OpenMetrics flavour).
    /// Adds `mesh_control_rate_limited_total{limit}` to the exposition, read
    /// from `ca` at every scrape: the CA counts its refusals itself, since it
    /// enforces the limits for ADS and the admin API alike.
    pub(crate) fn report_rate_limits(
        &mut self,
        ca: std::sync::Arc<crate::ca::CertificateAuthority>,
    ) {
        self.registry.register_collector(Box::new(RateLimits(ca)));
    }

    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The CA's rate-limit refusals, as a counter per limit.
#[derive(Debug)]
struct RateLimits(std::sync::Arc<crate::ca::CertificateAuthority>);

impl Collector for RateLimits {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (signing, tokens) = self.0.throttled();
        let mut metric = encoder.encode_descriptor(
            "rate_limited",
            "requests refused with 429 by a rate limit: certificate_signing (per identity), \
             failed_token_attempts (per source address)",
            None,
            MetricType::Counter,
        )?;
        for (limit, count) in [
            ("certificate_signing", signing),
            ("failed_token_attempts", tokens),
        ] {
            ConstCounter::new(count).encode(metric.encode_family(&[("limit", limit)])?)?;
        }
        Ok(())
    }
}

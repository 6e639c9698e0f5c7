//! Envoy's response flags: why a request did not get a normal answer.
//!
//! Istio puts them in the `response_flags` label of its standard metrics
//! and Envoy in `%RESPONSE_FLAGS%` of its access log, with the same short
//! names (`UO`, `URX`, `UT`, ... or `-` for none), joined by commas in
//! Envoy's order
//! ([Envoy access log: response flags](https://www.envoyproxy.io/docs/envoy/latest/configuration/observability/access_log/usage#config-access-log-format-response-flags)).
//! Dashboards and alerts written for Istio read them unchanged.
//!
//! Two flags have a finer reason the mesh knows and Envoy's flag does not
//! say: which circuit breaker limit overflowed (`UO`: [`BreakerLimit`])
//! and why a retry was refused (`URX`: [`RetryRefusal`]). The decision
//! record keeps them, and the mesh's own metrics label by them.
//!
//! Pure data, compiled without the `telemetry` feature too: the request
//! engine reports in these terms whether or not anything exports them.

use std::fmt;

/// A set of Envoy response flags.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ResponseFlags(u32);

impl ResponseFlags {
    /// `UH`: no healthy upstream endpoint (all ejected, or none).
    pub const NO_HEALTHY_UPSTREAM: ResponseFlags = ResponseFlags(1);
    /// `UT`: the upstream request timed out (route or per-try timeout).
    pub const UPSTREAM_REQUEST_TIMEOUT: ResponseFlags = ResponseFlags(1 << 1);
    /// `LR`: the mesh reset the request locally.
    pub const LOCAL_RESET: ResponseFlags = ResponseFlags(1 << 2);
    /// `UR`: the upstream reset the stream.
    pub const UPSTREAM_REMOTE_RESET: ResponseFlags = ResponseFlags(1 << 3);
    /// `UF`: the upstream connection could not be established.
    pub const UPSTREAM_CONNECTION_FAILURE: ResponseFlags = ResponseFlags(1 << 4);
    /// `UC`: the upstream connection closed before the response.
    pub const UPSTREAM_CONNECTION_TERMINATION: ResponseFlags = ResponseFlags(1 << 5);
    /// `UO`: a circuit breaker limit refused the request.
    pub const UPSTREAM_OVERFLOW: ResponseFlags = ResponseFlags(1 << 6);
    /// `NR`: no route (or no such service) for the request.
    pub const NO_ROUTE_FOUND: ResponseFlags = ResponseFlags(1 << 7);
    /// `DI`: fault injection delayed the request.
    pub const DELAY_INJECTED: ResponseFlags = ResponseFlags(1 << 8);
    /// `FI`: fault injection aborted the request.
    pub const FAULT_INJECTED: ResponseFlags = ResponseFlags(1 << 9);
    /// `DC`: the caller went away before the response ended.
    pub const DOWNSTREAM_CONNECTION_TERMINATION: ResponseFlags = ResponseFlags(1 << 10);
    /// `URX`: a retry was wanted but the retry limit or budget refused it.
    pub const UPSTREAM_RETRY_LIMIT_EXCEEDED: ResponseFlags = ResponseFlags(1 << 11);
    /// `DPE`: the request was malformed (no authority, bad URI).
    pub const DOWNSTREAM_PROTOCOL_ERROR: ResponseFlags = ResponseFlags(1 << 12);
    /// `UMSDR`: the upstream stream exceeded its maximum duration.
    pub const UPSTREAM_MAX_STREAM_DURATION_REACHED: ResponseFlags = ResponseFlags(1 << 13);
    /// `DT`: the request's deadline (duration) expired.
    pub const DURATION_TIMEOUT: ResponseFlags = ResponseFlags(1 << 14);
    /// `UPE`: the upstream answered with a protocol error.
    pub const UPSTREAM_PROTOCOL_ERROR: ResponseFlags = ResponseFlags(1 << 15);
    /// `NC`: the configuration for the target was not found or did not arrive.
    pub const NO_CLUSTER_FOUND: ResponseFlags = ResponseFlags(1 << 16);
    /// `RL`: a local rate limit refused the request (Envoy's
    /// `local_ratelimit` filter).
    pub const RATE_LIMITED: ResponseFlags = ResponseFlags(1 << 17);

    /// Every flag with its short name, in Envoy's order.
    pub const NAMES: [(&'static str, ResponseFlags); 18] = [
        ("UH", Self::NO_HEALTHY_UPSTREAM),
        ("UT", Self::UPSTREAM_REQUEST_TIMEOUT),
        ("LR", Self::LOCAL_RESET),
        ("UR", Self::UPSTREAM_REMOTE_RESET),
        ("UF", Self::UPSTREAM_CONNECTION_FAILURE),
        ("UC", Self::UPSTREAM_CONNECTION_TERMINATION),
        ("UO", Self::UPSTREAM_OVERFLOW),
        ("NR", Self::NO_ROUTE_FOUND),
        ("DI", Self::DELAY_INJECTED),
        ("FI", Self::FAULT_INJECTED),
        ("RL", Self::RATE_LIMITED),
        ("DC", Self::DOWNSTREAM_CONNECTION_TERMINATION),
        ("URX", Self::UPSTREAM_RETRY_LIMIT_EXCEEDED),
        ("DPE", Self::DOWNSTREAM_PROTOCOL_ERROR),
        ("UMSDR", Self::UPSTREAM_MAX_STREAM_DURATION_REACHED),
        ("DT", Self::DURATION_TIMEOUT),
        ("UPE", Self::UPSTREAM_PROTOCOL_ERROR),
        ("NC", Self::NO_CLUSTER_FOUND),
    ];

    /// No flag.
    pub const fn empty() -> Self {
        ResponseFlags(0)
    }

    /// Whether no flag is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: ResponseFlags) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    /// The raw bits.
    pub const fn bits(self) -> u32 {
        self.0
    }

    /// Flags from raw bits (unknown bits are dropped).
    pub const fn from_bits(bits: u32) -> Self {
        ResponseFlags(bits & ((1 << Self::NAMES.len()) - 1))
    }

    /// The flag with this short name (`"UO"`), if known.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, f)| *f)
    }

    /// The short names of the flags set, in Envoy's order.
    pub fn names(self) -> impl Iterator<Item = &'static str> {
        Self::NAMES
            .iter()
            .filter(move |(_, f)| self.contains(*f))
            .map(|(n, _)| *n)
    }
}

impl std::ops::BitOr for ResponseFlags {
    type Output = ResponseFlags;
    fn bitor(self, rhs: ResponseFlags) -> ResponseFlags {
        ResponseFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for ResponseFlags {
    fn bitor_assign(&mut self, rhs: ResponseFlags) {
        self.0 |= rhs.0;
    }
}

/// `-` for none, else the short names joined by commas (`UO,URX`).
impl fmt::Display for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("-");
        }
        for (i, name) in self.names().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

impl fmt::Debug for ResponseFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResponseFlags({self})")
    }
}

/// Why a retry was refused: the retry limit of mesh-core (the request
/// engine decides in these terms), under the name telemetry has always
/// used for it.
pub use mesh_core::retry::RetryLimit as RetryRefusal;

/// Which circuit breaker limit overflowed (Envoy `circuit_breakers`): the
/// breaker limit of mesh-core, under telemetry's name for it.
pub use mesh_core::breaker::Limit as BreakerLimit;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_is_envoys() {
        assert_eq!(ResponseFlags::empty().to_string(), "-");
        let f = ResponseFlags::UPSTREAM_RETRY_LIMIT_EXCEEDED | ResponseFlags::UPSTREAM_OVERFLOW;
        assert_eq!(f.to_string(), "UO,URX");
        assert_eq!(
            ResponseFlags::from_name("UT"),
            Some(ResponseFlags::UPSTREAM_REQUEST_TIMEOUT)
        );
        assert_eq!(ResponseFlags::from_bits(f.bits()), f);
        assert_eq!(ResponseFlags::from_bits(u32::MAX).names().count(), 18);
        let rl = ResponseFlags::RATE_LIMITED | ResponseFlags::FAULT_INJECTED;
        assert_eq!(rl.to_string(), "FI,RL", "Envoy's order");
        assert_eq!(
            ResponseFlags::from_name("RL"),
            Some(ResponseFlags::RATE_LIMITED)
        );
    }
}

//! Deadline headers: how the remaining time of a request travels to the
//! next hop, so a deadline shrinks across hops instead of resetting.
//!
//! - gRPC: `grpc-timeout` (gRPC over HTTP/2 spec, "PROTOCOL-HTTP2.md":
//!   `TimeoutValue TimeoutUnit`, at most 8 ASCII digits and one of `H`
//!   hours, `M` minutes, `S` seconds, `m` milliseconds, `u` microseconds,
//!   `n` nanoseconds). Every gRPC client and server reads it.
//! - HTTP: `x-envoy-expected-rq-timeout-ms`, the header an Envoy sidecar
//!   sets on the requests it sends upstream with the time the request has
//!   left, and that the next Envoy honors with `respect_expected_rq_timeout`
//!   (Envoy router filter docs). It is the one header in this role that an
//!   existing mesh both writes and reads, so an Envoy sidecar and this
//!   client can sit on the same path. `x-envoy-upstream-rq-timeout-ms` is a
//!   caller's request to set the timeout, not a deadline, and is not used.
//!
//! Formatting rounds up (a remaining 1.2 ms is sent as 2 ms, never as 0),
//! so a deadline is never announced as already expired when it is not;
//! callers must not send a request whose deadline has passed (they fail it
//! with DEADLINE_EXCEEDED / 504 instead). A received `0` is an expired
//! deadline. (Envoy itself treats a `0` timeout as "none"; this mesh never
//! sends `0`.)

use std::time::Duration;

/// The gRPC deadline header.
pub const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The HTTP deadline header (Envoy's), in whole milliseconds.
pub const EXPECTED_RQ_TIMEOUT_MS: &str = "x-envoy-expected-rq-timeout-ms";

/// The largest `TimeoutValue`: 8 digits.
const MAX_GRPC_VALUE: u64 = 99_999_999;

/// Parses a `grpc-timeout` value (`"100m"`, `"5S"`): 1 to 8 ASCII digits
/// and a unit. `None` when malformed (gRPC servers then ignore the header).
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let value = value.trim();
    let unit = value.chars().last()?;
    let digits = &value[..value.len() - unit.len_utf8()];
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        'H' => Duration::from_secs(n * 3600),
        'M' => Duration::from_secs(n * 60),
        'S' => Duration::from_secs(n),
        'm' => Duration::from_millis(n),
        'u' => Duration::from_micros(n),
        'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a remaining time as a `grpc-timeout` value: the finest unit
/// whose value fits in 8 digits, rounded up to that unit (`100 ms` →
/// `"100000u"`, `2 s` → `"2000000u"`, `5 min` → `"300000m"`). Durations
/// beyond 99,999,999 hours are sent as that.
pub fn format_grpc_timeout(remaining: Duration) -> String {
    let nanos = remaining.as_nanos();
    const UNITS: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (size, unit) in UNITS {
        let value = nanos.div_ceil(size);
        if value <= u128::from(MAX_GRPC_VALUE) {
            return format!("{value}{unit}");
        }
    }
    format!("{MAX_GRPC_VALUE}H")
}

/// Parses an `x-envoy-expected-rq-timeout-ms` value: a whole number of
/// milliseconds. `None` when malformed.
pub fn parse_expected_rq_timeout_ms(value: &str) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() || value.len() > 19 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().map(Duration::from_millis)
}

/// Formats a remaining time for `x-envoy-expected-rq-timeout-ms`: whole
/// milliseconds, rounded up.
pub fn format_expected_rq_timeout_ms(remaining: Duration) -> String {
    remaining.as_nanos().div_ceil(1_000_000).to_string()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_every_unit() {
        let cases = [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("100m", Duration::from_millis(100)),
            ("250u", Duration::from_micros(250)),
            ("7n", Duration::from_nanos(7)),
            ("0m", Duration::ZERO),
            ("99999999S", Duration::from_secs(99_999_999)),
            (" 5S ", Duration::from_secs(5)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_grpc_timeout(text), Some(want), "{text}");
        }
    }

    #[test]
    fn rejects_malformed_timeouts() {
        for text in [
            "",
            "m",
            "100",
            "123456789m",
            "1.5S",
            "-1S",
            "10s",
            "10 m",
            "1é",
            "+1S",
        ] {
            assert_eq!(parse_grpc_timeout(text), None, "{text:?}");
        }
    }

    #[test]
    fn formats_with_the_finest_unit_that_fits_rounding_up() {
        let cases = [
            (Duration::ZERO, "0n"),
            (Duration::from_nanos(1), "1n"),
            (Duration::from_nanos(99_999_999), "99999999n"),
            (Duration::from_millis(100), "100000u"),
            (Duration::from_nanos(100_000_001), "100001u"),
            (Duration::from_secs(2), "2000000u"),
            (Duration::from_secs(300), "300000m"),
            (Duration::from_secs(200_000), "200000S"),
            (Duration::from_secs(100_000_000 * 60), "1666667H"),
            (Duration::MAX, "99999999H"),
        ];
        for (d, want) in cases {
            assert_eq!(format_grpc_timeout(d), want, "{d:?}");
        }
    }

    #[test]
    fn the_http_header_is_whole_milliseconds_rounded_up() {
        assert_eq!(
            format_expected_rq_timeout_ms(Duration::from_micros(1200)),
            "2"
        );
        assert_eq!(format_expected_rq_timeout_ms(Duration::from_nanos(1)), "1");
        assert_eq!(format_expected_rq_timeout_ms(Duration::ZERO), "0");
        assert_eq!(
            format_expected_rq_timeout_ms(Duration::from_millis(250)),
            "250"
        );
        assert_eq!(
            parse_expected_rq_timeout_ms("250"),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_expected_rq_timeout_ms("0"), Some(Duration::ZERO));
        for bad in ["", "-1", "1.5", "1e3", "ten", "99999999999999999999999"] {
            assert_eq!(parse_expected_rq_timeout_ms(bad), None, "{bad:?}");
        }
    }

    proptest! {
        /// What is sent is never shorter than what remains, and longer by
        /// less than one unit (so by at most 1 part in 10^5); it fits in 8
        /// digits and reads back.
        #[test]
        fn grpc_timeout_round_trips_upward(nanos in any::<u64>()) {
            let d = Duration::from_nanos(nanos);
            let text = format_grpc_timeout(d);
            prop_assert!(text.len() <= 9);
            let back = parse_grpc_timeout(&text).unwrap();
            prop_assert!(back >= d);
            let slack = (back - d).as_nanos();
            prop_assert!(slack <= d.as_nanos() / 100_000, "{d:?} -> {text}");
            let ms = parse_expected_rq_timeout_ms(&format_expected_rq_timeout_ms(d)).unwrap();
            prop_assert!(ms >= d && ms - d < Duration::from_millis(1));
        }
    }
}

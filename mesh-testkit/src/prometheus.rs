//! Reading a Prometheus text exposition (what a scrape of `/metrics` returns) into
//! samples, and Istio's standard metric labels as Istio documents them.
//!
//! Metrics tests compare a scrape with numbers, so they need the samples, not the
//! text; and they compare the label set with [`ISTIO_STANDARD_LABELS`], written here
//! (and [`ISTIO_STANDARD_SAMPLES`]), written here from Istio's documentation rather
//! than taken from the code under test, so a label dropped there is caught.

use std::collections::BTreeMap;

/// Istio's standard metric labels, as the Istio documentation lists them
/// (<https://istio.io/latest/docs/reference/config/metrics/#labels>), in that order.
pub const ISTIO_STANDARD_LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// The samples Istio's standard metrics expose: the counter `istio_requests` (as
/// `istio_requests_total`) and three histograms, as Istio's dashboards query them.
pub const ISTIO_STANDARD_SAMPLES: [&str; 10] = [
    "istio_requests_total",
    "istio_request_duration_milliseconds_bucket",
    "istio_request_duration_milliseconds_sum",
    "istio_request_duration_milliseconds_count",
    "istio_request_bytes_bucket",
    "istio_request_bytes_sum",
    "istio_request_bytes_count",
    "istio_response_bytes_bucket",
    "istio_response_bytes_sum",
    "istio_response_bytes_count",
];

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (a histogram's `_bucket`, `_sum`, `_count` included).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The label `key`'s value; empty when it is missing.
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map_or("", String::as_str)
    }
}

/// The samples of a text exposition (comments and blank lines skipped); panics
/// naming a line that is not a sample.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| match sample(line) {
            Some(sample) => sample,
            None => panic!("not a sample: {line}"),
        })
        .collect()
}

fn sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, mut rest) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut labels = BTreeMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        // A value ends at the first quote not escaped by a backslash.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after[end + 1..];
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The sum of `name` over the samples whose labels include every pair of `filter`.
pub fn total(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            filter
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_and_totals() {
        let text = "# TYPE istio_requests counter\n\
            istio_requests_total{reporter=\"source\",response_code=\"200\",grpc_response_status=\"\"} 5\n\
            istio_requests_total{reporter=\"destination\",response_code=\"503\",path=\"a\\\"b,c\"} 2\n\
            up 1\n\
            # EOF\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].label("grpc_response_status"), "");
        assert_eq!(samples[1].label("path"), "a\"b,c");
        assert_eq!(samples[2].name, "up");
        assert_eq!(total(&samples, "istio_requests_total", &[]), 7.0);
        assert_eq!(
            total(&samples, "istio_requests_total", &[("reporter", "source")]),
            5.0
        );
        assert_eq!(
            total(&samples, "istio_requests_total", &[("missing", "")]),
            0.0
        );
    }
}

//! A Prometheus histogram recorded with atomics.
//!
//! prometheus-client's `Histogram` takes a mutex for every observation
//! (it also keeps native-histogram state this mesh does not export); Istio's
//! metrics observe three histograms per request and per side, so that lock
//! was about a third of the metrics' cost per request. This one counts into
//! a fixed array of atomic buckets and adds to an atomic sum, and encodes
//! exactly as prometheus-client encodes a classic histogram (the same
//! `MetricEncoder::encode_histogram` call), so the exposition is unchanged.
//!
//! A scrape reads the buckets one by one while requests may be counted:
//! `_count` is computed from the buckets it read (so it always equals the
//! `+Inf` bucket, as Prometheus requires), and `_sum` may include an
//! observation whose bucket was read just before it landed (the same skew
//! any lock-free client library has; it is gone at the next scrape).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// A histogram over fixed, finite, increasing upper bounds (and `+Inf`).
/// Cheap to clone: clones count into the same buckets.
#[derive(Clone)]
pub(crate) struct AtomicHistogram {
    inner: Arc<Inner>,
}

struct Inner {
    bounds: &'static [f64],
    /// One per bound, then `+Inf`.
    counts: Box<[AtomicU64]>,
    /// The sum of the observations, as `f64` bits.
    sum: AtomicU64,
}

impl AtomicHistogram {
    /// A histogram with `bounds` as its buckets' upper bounds.
    pub(crate) fn new(bounds: &'static [f64]) -> Self {
        AtomicHistogram {
            inner: Arc::new(Inner {
                bounds,
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum: AtomicU64::new(0f64.to_bits()),
            }),
        }
    }

    /// Counts `v` in the first bucket whose bound is at least `v` (`+Inf`
    /// for larger values and NaN, as prometheus-client does).
    pub(crate) fn observe(&self, v: f64) {
        let i = &*self.inner;
        let bucket = i
            .bounds
            .iter()
            .position(|bound| v <= *bound)
            .unwrap_or(i.bounds.len());
        if let Some(count) = i.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        let mut current = i.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(current) + v).to_bits();
            match i
                .sum
                .compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(seen) => current = seen,
            }
        }
    }

    /// The count of each bucket alone (not cumulative), one per bound and
    /// then `+Inf`: what the service graph's push reads, without encoding
    /// the histogram as text and parsing it back.
    pub(crate) fn bucket_counts(&self) -> impl Iterator<Item = u64> + '_ {
        self.inner.counts.iter().map(|c| c.load(Ordering::Relaxed))
    }

    /// The buckets as prometheus-client's encoder takes them (upper bound,
    /// count in that bucket alone), the count, and the sum.
    fn snapshot(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let i = &*self.inner;
        let buckets: Vec<(f64, u64)> = i
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(i.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = f64::from_bits(i.sum.load(Ordering::Relaxed));
        (buckets, count, sum)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        let (buckets, count, sum) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

impl fmt::Debug for AtomicHistogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (_, count, sum) = self.snapshot();
        f.debug_struct("AtomicHistogram")
            .field("count", &count)
            .field("sum", &sum)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;

    use super::*;

    const BOUNDS: [f64; 4] = [0.5, 1.0, 5.0, 10.0];

    /// The same observations give the same text as prometheus-client's own
    /// histogram: bucket boundaries (inclusive), `+Inf`, NaN, sum, count.
    #[test]
    fn encodes_exactly_as_prometheus_clients_histogram() {
        let ours = AtomicHistogram::new(&BOUNDS);
        let theirs = Histogram::new(BOUNDS);
        for v in [
            0.0,
            0.5,
            0.7,
            1.0,
            3.0,
            5.0,
            9.99,
            10.0,
            11.0,
            1e9,
            f64::NAN,
        ] {
            ours.observe(v);
            theirs.observe(v);
        }
        fn render(metric: impl prometheus_client::registry::Metric) -> String {
            let mut registry = Registry::default();
            registry.register("latency", "help", metric);
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            text
        }
        let (ours, theirs) = (render(ours), render(theirs));
        assert_eq!(ours, theirs);
        assert!(ours.contains("latency_bucket{le=\"+Inf\"} 11"), "{ours}");
        assert!(ours.contains("latency_bucket{le=\"0.5\"} 2"), "{ours}");
    }

    #[test]
    fn clones_count_into_the_same_buckets() {
        let a = AtomicHistogram::new(&BOUNDS);
        let b = a.clone();
        a.observe(2.0);
        b.observe(20.0);
        let (buckets, count, sum) = a.snapshot();
        assert_eq!(count, 2);
        assert_eq!(sum, 22.0);
        assert_eq!(buckets[2], (5.0, 1));
        assert_eq!(buckets[4], (f64::INFINITY, 1));
    }
}

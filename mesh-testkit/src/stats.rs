//! Statistical assertions for random behaviour (weighted splits, retry success
//! rates, fault injection shares): a binomial z-score at z ≥ 4.5 keeps a correct
//! implementation from failing more than about once in 300,000 runs while a wrong
//! weight still fails (docs/ARCHITECTURE.md, Testing).

/// The default z: a correct split fails about once in 300,000 runs.
pub const SPLIT_Z: f64 = 4.5;

/// How many standard deviations `count` out of `total` lies from the binomial mean
/// `total * expected_p` (0 when it is exactly the mean; infinite when `expected_p` is
/// 0 or 1 and the count differs from the mean).
pub fn split_z_score(count: u64, total: u64, expected_p: f64) -> f64 {
    let n = total as f64;
    let mean = n * expected_p;
    let sd = (n * expected_p * (1.0 - expected_p)).sqrt();
    let diff = count as f64 - mean;
    if diff == 0.0 {
        0.0
    } else if sd == 0.0 {
        f64::INFINITY
    } else {
        diff.abs() / sd
    }
}

/// Asserts that `count` hits out of `total` tries are consistent with probability
/// `expected_p`, at z = [`SPLIT_Z`].
#[track_caller]
pub fn assert_split(count: u64, total: u64, expected_p: f64) {
    assert_split_z(count, total, expected_p, SPLIT_Z);
}

/// [`assert_split`] with an explicit z.
#[track_caller]
pub fn assert_split_z(count: u64, total: u64, expected_p: f64, z: f64) {
    assert!(
        (0.0..=1.0).contains(&expected_p),
        "expected_p {expected_p} is not a probability"
    );
    assert!(count <= total, "count {count} is larger than total {total}");
    let score = split_z_score(count, total, expected_p);
    assert!(
        score <= z,
        "{count} of {total} ({:.2}%) is {score:.2} standard deviations from the expected \
         {:.2}% (limit z = {z})",
        100.0 * count as f64 / total.max(1) as f64,
        100.0 * expected_p,
    );
}

/// [`assert_split`] naming what was counted: `what: <count> of <total>, expected
/// <mean> ± <z·sd>`.
#[track_caller]
pub fn assert_binomial(what: &str, count: usize, total: usize, p: f64) {
    let mean = total as f64 * p;
    let sd = (total as f64 * p * (1.0 - p)).sqrt();
    assert!(
        split_z_score(count as u64, total as u64, p) <= SPLIT_Z,
        "{what}: {count} of {total}, expected {mean:.1} ± {:.1}",
        SPLIT_Z * sd
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fair_split_passes_and_a_wrong_weight_fails() {
        assert_split(5_010, 10_000, 0.5);
        assert_binomial("heads", 5_010, 10_000, 0.5);
        assert!(std::panic::catch_unwind(|| assert_split(5_600, 10_000, 0.5)).is_err());
        assert!(std::panic::catch_unwind(|| assert_split(1, 1_000, 0.0)).is_err());
        assert!(std::panic::catch_unwind(|| assert_binomial("heads", 5_600, 10_000, 0.5)).is_err());
        assert_eq!(split_z_score(0, 1_000, 0.0), 0.0);
    }
}

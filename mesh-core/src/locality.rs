//! Istio's per-proxy locality load balancing (`localityLbSetting`
//! `distribute`, `failover`, `failoverPriority`; istiod's
//! `ApplyLocalityLoadBalancer`), as pure functions over a cluster's
//! localities: the control server applies [`apply`] to the EDS of each
//! caller, from the caller's locality and labels, and every client then
//! honors the weights and priorities it receives (this mesh's
//! [`crate::lb::EndpointSet::new_for`], gRPC's `wrr_locality` and priority
//! policies).
//!
//! - `distribute`: the first entry whose `from` matches the caller's
//!   locality sets the locality weights: each `to` entry's weight is shared
//!   among the localities it matches (and no earlier entry did) in
//!   proportion to their own weights, rounded up; a locality no `to`
//!   matches is left out. Patterns as Istio's `LocalityMatch`:
//!   `region/zone/subzone`, where `*` or a missing part matches anything.
//! - `failover` (only with outlier detection, which the caller decides):
//!   each locality's priority is its closeness to the caller
//!   ([`crate::lb::locality_rank`]: same sub-zone 0, same zone 1, same
//!   region 2, elsewhere 3), except that when a `failover` entry's `from`
//!   is the caller's region, regions other than its `to` drop to 4; an
//!   existing priority `p` becomes `5p + rank`; priorities are then
//!   renumbered from 0 without gaps, as EDS requires.
//! - `failoverPriority`: each locality is split by how many of the named
//!   labels, in order, an endpoint shares with the caller (`label=value`
//!   compares with `value`); the first label that differs, at index `j` of
//!   `n`, gives priority `n - j`. Istio's topology labels
//!   ([`REGION_LABEL`], [`ZONE_LABEL`], [`SUBZONE_LABEL`]) come from the
//!   localities when the labels do not carry them, as Istio adds them to
//!   both sides. A caller without labels is left as is (Istio). With
//!   `failover` too, locality failover then orders those priorities.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::lb::locality_rank;
use crate::model::{Locality, LocalityEndpoints};

/// Istio's topology label of the region (a caller and an endpoint carry
/// the topology labels of their locality).
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
/// The zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The sub-zone label.
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// `localityLbSetting` beyond `enabled`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalityLbSetting {
    /// `distribute[]`, in order.
    pub distribute: Vec<Distribute>,
    /// `failover[]`, in order.
    pub failover: Vec<Failover>,
    /// `failoverPriority[]` as written (`label` or `label=value`).
    pub failover_priority: Vec<String>,
}

/// One `distribute[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Distribute {
    /// The callers it is for (a locality pattern).
    pub from: String,
    /// Locality patterns and their weights, in the order written.
    pub to: Vec<(String, u32)>,
}

/// One `failover[]` entry (regions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    /// The caller's region.
    pub from: String,
    /// The region to fail over to first.
    pub to: String,
}

impl LocalityLbSetting {
    /// Whether it says nothing that depends on the caller.
    pub fn is_empty(&self) -> bool {
        self.distribute.is_empty() && self.failover.is_empty() && self.failover_priority.is_empty()
    }

    /// The caller labels `failoverPriority` compares (not those given a
    /// value, nor the topology labels, which come from the locality).
    pub fn caller_label_keys(&self) -> impl Iterator<Item = &str> {
        self.failover_priority
            .iter()
            .filter(|l| !l.contains('='))
            .map(String::as_str)
            .filter(|l| ![REGION_LABEL, ZONE_LABEL, SUBZONE_LABEL].contains(l))
    }
}

/// Istio's `LocalityMatch`: `rule` (`region/zone/subzone`, `*` or a missing
/// part matching anything) against `locality`.
pub fn matches(locality: &Locality, rule: &str) -> bool {
    let mut parts = rule.splitn(3, '/');
    let region = parts.next().unwrap_or("");
    let zone = parts.next().unwrap_or("");
    let sub_zone = parts.next().unwrap_or("");
    (region == "*" || *locality.region == *region)
        && (zone == "*" || zone.is_empty() || *locality.zone == *zone)
        && (sub_zone == "*" || sub_zone.is_empty() || *locality.sub_zone == *sub_zone)
}

/// A caller's labels as `failoverPriority` compares them: `labels` over
/// the topology labels of its `locality`.
pub fn caller_labels(
    locality: &Locality,
    labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = topology(locality);
    out.extend(labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    out
}

/// Istio's topology labels of `l` (its non-empty parts).
pub fn topology(l: &Locality) -> BTreeMap<String, String> {
    [
        (REGION_LABEL, &l.region),
        (ZONE_LABEL, &l.zone),
        (SUBZONE_LABEL, &l.sub_zone),
    ]
    .into_iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The localities a caller at `local` with `labels` (its own over its
/// locality's topology labels, see [`caller_labels`]) gets; `failover`:
/// the cluster has outlier detection (Istio applies no failover without).
pub fn apply(
    localities: &[LocalityEndpoints],
    setting: &LocalityLbSetting,
    failover: bool,
    local: &Locality,
    labels: &BTreeMap<String, String>,
) -> Vec<LocalityEndpoints> {
    if !setting.distribute.is_empty() {
        return distribute(localities, &setting.distribute, local);
    }
    if !failover {
        return localities.to_vec();
    }
    let mut out = localities.to_vec();
    if !setting.failover_priority.is_empty() {
        // Istio skips the labels for a caller without any, and orders by
        // locality only when `failover` is set too.
        if !labels.is_empty() {
            out = failover_priority(&out, &setting.failover_priority, labels);
        }
        if setting.failover.is_empty() {
            return out;
        }
    }
    locality_failover(&mut out, &setting.failover, local);
    out
}

fn distribute(
    localities: &[LocalityEndpoints],
    rules: &[Distribute],
    local: &Locality,
) -> Vec<LocalityEndpoints> {
    let Some(rule) = rules.iter().find(|d| matches(local, &d.from)) else {
        return localities.to_vec();
    };
    let mut weights: Vec<Option<u32>> = vec![None; localities.len()];
    for (pattern, weight) in &rule.to {
        let hits: Vec<usize> = (0..localities.len())
            .filter(|&i| weights[i].is_none() && matches(&localities[i].locality, pattern))
            .collect();
        let total: u64 = hits
            .iter()
            .map(|&i| u64::from(localities[i].weight.max(1)))
            .sum();
        for i in hits {
            let own = u64::from(localities[i].weight.max(1));
            let share = (own * u64::from(*weight)).div_ceil(total.max(1));
            weights[i] = Some(u32::try_from(share.max(1)).unwrap_or(u32::MAX));
        }
    }
    localities
        .iter()
        .zip(weights)
        .filter_map(|(l, w)| {
            Some(LocalityEndpoints {
                weight: w?,
                ..l.clone()
            })
        })
        .collect()
}

fn locality_failover(localities: &mut [LocalityEndpoints], rules: &[Failover], local: &Locality) {
    for l in localities.iter_mut() {
        let mut rank = u32::from(locality_rank(local, &l.locality));
        if rank == 3
            && let Some(rule) = rules.iter().find(|f| *f.from == *local.region)
            && *l.locality.region != *rule.to
        {
            rank = 4;
        }
        l.priority = l.priority.saturating_mul(5).saturating_add(rank);
    }
    renumber(localities);
}

fn failover_priority(
    localities: &[LocalityEndpoints],
    priority: &[String],
    caller: &BTreeMap<String, String>,
) -> Vec<LocalityEndpoints> {
    let wanted: Vec<(&str, &str)> = priority
        .iter()
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k, v),
            None => (p.as_str(), caller.get(p).map_or("", String::as_str)),
        })
        .collect();
    let lowest = u32::try_from(wanted.len()).unwrap_or(u32::MAX);
    let mut out = Vec::new();
    for l in localities {
        let topo = topology(&l.locality);
        let mut groups: BTreeMap<u32, Vec<_>> = BTreeMap::new();
        for e in l.endpoints.iter() {
            let label = |k: &str| -> String {
                e.labels
                    .iter()
                    .find(|(lk, _)| **lk == *k)
                    .map(|(_, v)| v.to_string())
                    .or_else(|| topo.get(k).cloned())
                    .unwrap_or_default()
            };
            let p = wanted
                .iter()
                .enumerate()
                .find(|(_, (k, v))| label(k) != *v)
                .map_or(0, |(j, _)| lowest - u32::try_from(j).unwrap_or(0));
            groups.entry(p).or_default().push(e.clone());
        }
        for (p, endpoints) in groups {
            let weight: u64 = endpoints.iter().map(|e| u64::from(e.weight.max(1))).sum();
            out.push(LocalityEndpoints {
                locality: l.locality.clone(),
                weight: u32::try_from(weight).unwrap_or(u32::MAX),
                priority: p,
                endpoints: Arc::from(endpoints),
            });
        }
    }
    renumber(&mut out);
    out
}

/// Priorities 0..N without gaps, order kept (EDS requires it).
fn renumber(localities: &mut [LocalityEndpoints]) {
    let used: BTreeSet<u32> = localities.iter().map(|l| l.priority).collect();
    let index: BTreeMap<u32, u32> = used
        .into_iter()
        .enumerate()
        .map(|(i, p)| (p, u32::try_from(i).unwrap_or(u32::MAX)))
        .collect();
    for l in localities {
        l.priority = index.get(&l.priority).copied().unwrap_or(l.priority);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Endpoint;
    use std::net::SocketAddr;

    /// (region/zone/subzone, weight, priority, [(port, labels)]).
    type Spec<'a> = [(&'a str, u32, u32, &'a [(u16, &'a [(&'a str, &'a str)])])];

    fn localities(spec: &Spec<'_>) -> Vec<LocalityEndpoints> {
        spec.iter()
            .map(|(at, weight, priority, eps)| {
                let mut parts = at.split('/');
                LocalityEndpoints {
                    locality: Locality {
                        region: parts.next().unwrap_or("").into(),
                        zone: parts.next().unwrap_or("").into(),
                        sub_zone: parts.next().unwrap_or("").into(),
                    },
                    weight: *weight,
                    priority: *priority,
                    endpoints: eps
                        .iter()
                        .map(|(port, labels)| Endpoint {
                            address: SocketAddr::from(([127, 0, 0, 1], *port)),
                            weight: 1,
                            labels: labels
                                .iter()
                                .map(|(k, v)| ((*k).into(), (*v).into()))
                                .collect(),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    fn at(s: &str) -> Locality {
        let mut parts = s.split('/');
        Locality {
            region: parts.next().unwrap_or("").into(),
            zone: parts.next().unwrap_or("").into(),
            sub_zone: parts.next().unwrap_or("").into(),
        }
    }

    /// (locality, weight, priority, ports) of each result, in order.
    fn summary(ls: &[LocalityEndpoints]) -> Vec<(String, u32, u32, Vec<u16>)> {
        ls.iter()
            .map(|l| {
                (
                    format!("{}/{}", l.locality.region, l.locality.zone),
                    l.weight,
                    l.priority,
                    l.endpoints.iter().map(|e| e.address.port()).collect(),
                )
            })
            .collect()
    }

    const FOUR: &Spec<'static> = &[
        (
            "r1/z1/a",
            2,
            0,
            &[(1, &[("team", "a")]), (2, &[("team", "b")])],
        ),
        ("r1/z2/a", 1, 0, &[(3, &[("team", "a")])]),
        ("r2/z3/a", 1, 0, &[(4, &[("team", "b")])]),
        ("r3/z4/a", 1, 0, &[(5, &[("team", "a")])]),
    ];

    #[test]
    fn locality_patterns_match_as_istio_does() {
        let l = at("r1/z1/s1");
        for rule in ["r1", "r1/z1", "r1/z1/s1", "r1/*", "r1/z1/*", "*"] {
            assert!(matches(&l, rule), "{rule}");
        }
        for rule in ["r2", "r1/z2", "r1/z1/s2", "r2/*", "r1/z2/*"] {
            assert!(!matches(&l, rule), "{rule}");
        }
    }

    #[test]
    fn distribute_weighs_by_the_first_from_that_matches() {
        let setting = LocalityLbSetting {
            distribute: vec![
                Distribute {
                    from: "r1/z1/*".into(),
                    to: vec![
                        ("r1/z1/*".into(), 70),
                        ("r1/*".into(), 20),
                        ("r2/*".into(), 10),
                    ],
                },
                Distribute {
                    from: "*".into(),
                    to: vec![("*".into(), 100)],
                },
            ],
            ..LocalityLbSetting::default()
        };
        let none = BTreeMap::new();
        // r1/z1 is taken by the first `to`, so `r1/*` gets r1/z2 only; r3
        // matches no `to` and is left out.
        let got = apply(&localities(FOUR), &setting, true, &at("r1/z1/x"), &none);
        assert_eq!(
            summary(&got),
            [
                ("r1/z1".into(), 70, 0, vec![1, 2]),
                ("r1/z2".into(), 20, 0, vec![3]),
                ("r2/z3".into(), 10, 0, vec![4]),
            ]
        );
        // The second entry for everyone else: 100 shared 2:1:1:1, rounded up.
        let got = apply(&localities(FOUR), &setting, true, &at("r2/z3"), &none);
        assert_eq!(
            got.iter().map(|l| l.weight).collect::<Vec<_>>(),
            [40, 20, 20, 20]
        );
        // No `from` matches: unchanged.
        let only_z1 = LocalityLbSetting {
            distribute: vec![setting.distribute[0].clone()],
            ..LocalityLbSetting::default()
        };
        assert_eq!(
            apply(&localities(FOUR), &only_z1, true, &at("r9"), &none),
            localities(FOUR)
        );
    }

    #[test]
    fn failover_ranks_by_closeness_and_the_named_region() {
        let setting = LocalityLbSetting {
            failover: vec![Failover {
                from: "r1".into(),
                to: "r3".into(),
            }],
            ..LocalityLbSetting::default()
        };
        let none = BTreeMap::new();
        let prio = |local: &str, failover: bool| -> Vec<u32> {
            apply(&localities(FOUR), &setting, failover, &at(local), &none)
                .iter()
                .map(|l| l.priority)
                .collect()
        };
        // Ranks 0, 2, 4, 3 renumbered without gaps: 0, 1, 3, 2.
        assert_eq!(prio("r1/z1/a", true), [0, 1, 3, 2]);
        // Sub-zone differs: rank 1 for r1/z1, no gap left at 0.
        assert_eq!(prio("r1/z1/b", true), [0, 1, 3, 2]);
        // No entry from r2: closeness only (0 and 3 → 0 and 1).
        assert_eq!(prio("r2/z3/a", true), [1, 1, 0, 1]);
        // Without outlier detection: untouched.
        assert_eq!(prio("r1/z1/a", false), [0, 0, 0, 0]);
        // An existing priority stays the major key (5p + rank).
        let mut ls = localities(FOUR);
        ls[0].priority = 1;
        let got = apply(&ls, &setting, true, &at("r1/z1/a"), &none);
        assert_eq!(
            got.iter().map(|l| l.priority).collect::<Vec<_>>(),
            [3, 0, 2, 1]
        );
    }

    #[test]
    fn failover_priority_splits_by_the_labels_shared_in_order() {
        let setting = LocalityLbSetting {
            failover_priority: vec!["team".into(), REGION_LABEL.into()],
            ..LocalityLbSetting::default()
        };
        let caller = caller_labels(
            &at("r1/z9"),
            &BTreeMap::from([("team".to_string(), "a".to_string())]),
        );
        assert_eq!(caller.get(REGION_LABEL).map(String::as_str), Some("r1"));
        let got = apply(&localities(FOUR), &setting, true, &at("r1/z9"), &caller);
        // team a in r1: 0; team a elsewhere: 1; another team: 2. r1/z1 is
        // split in two, each weighing its endpoints.
        assert_eq!(
            summary(&got),
            [
                ("r1/z1".into(), 1, 0, vec![1]),
                ("r1/z1".into(), 1, 2, vec![2]),
                ("r1/z2".into(), 1, 0, vec![3]),
                ("r2/z3".into(), 1, 2, vec![4]),
                ("r3/z4".into(), 1, 1, vec![5]),
            ]
        );
        // `label=value` compares with the value given.
        let fixed = LocalityLbSetting {
            failover_priority: vec!["team=b".into()],
            ..LocalityLbSetting::default()
        };
        let got = apply(&localities(FOUR), &fixed, true, &at("r1/z1"), &caller);
        let first: Vec<u16> = got
            .iter()
            .filter(|l| l.priority == 0)
            .flat_map(|l| l.endpoints.iter().map(|e| e.address.port()))
            .collect();
        assert_eq!(first, [2, 4]);
        // A caller without labels is left as is (Istio); so is a cluster
        // without outlier detection.
        assert_eq!(
            apply(
                &localities(FOUR),
                &setting,
                true,
                &Locality::default(),
                &BTreeMap::new()
            ),
            localities(FOUR)
        );
        assert_eq!(
            apply(&localities(FOUR), &setting, false, &at("r1/z9"), &caller),
            localities(FOUR)
        );
    }
}

//! Which changes read from disk are applied: last good config, per resource.
//!
//! An operator edits one file of a running mesh. If the edit is wrong — a
//! subset that does not exist, a DestinationRule that drops a subset a
//! VirtualService still routes to, a second VirtualService for a host — the
//! mesh must keep routing as it did, not fall back to a default route (a
//! 100/0 canary becoming 50/50 is an outage). So mesh-control keeps the
//! *last good set*: the version of each resource that is in force, and
//! applies a change read from disk only when the set stays valid with it.
//!
//! [`settle`] is that decision, pure: given the last good set, the changes
//! the files propose (a new or edited resource, or a removed one) and a
//! function saying which resources of a set are invalid in it (the
//! translation's cross-resource checks, with the registrations of the
//! moment), it returns the new good set and, for each change it refused,
//! why: the changed resource's own problems, and the other resources it
//! would make invalid. It is deterministic: changes are tried in key order
//! (kind, namespace, name), never in file or arrival order.
//!
//! How:
//!
//! 1. **All together.** Most reloads are one coherent edit, sometimes across
//!    files (a subset renamed in the DestinationRule and in the
//!    VirtualService at once, which neither half allows alone). So the
//!    pending changes are first tried together. While the result is
//!    invalid, the changes whose own resource is invalid are dropped from
//!    the attempt; when only unchanged resources are invalid, the first
//!    change (in key order) whose removal leaves fewer invalid resources
//!    is dropped. What remains, if valid, is applied.
//! 2. **One at a time.** Each change still pending is tried alone, in key
//!    order, against the good set as it now is, and applied if the set
//!    stays valid.
//! 3. Both steps repeat until neither applies anything (each round applies
//!    at least one change, so this ends).
//!
//! "Valid" means: no resource is invalid that was valid before, and no
//! changed resource is invalid. A resource that was already invalid (a
//! VirtualService whose registered-only destination has no registration
//! right now) does not block other changes.
//!
//! A removal is a change like any other: a removed DestinationRule whose
//! subsets a VirtualService uses stays in force.

use std::collections::{BTreeMap, BTreeSet};

/// What the files propose for one resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change<R> {
    /// Add it, or replace the version in force.
    Put(R),
    /// Remove it: no file defines it any more.
    Remove,
}

/// Why a change was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal<K, D> {
    /// The changed resource's own problems with the change applied (none
    /// for a removal).
    pub(crate) own: Vec<D>,
    /// The other resources the change would make invalid, and their
    /// problems with it applied.
    pub(crate) breaks: Vec<(K, Vec<D>)>,
}

/// What [`settle`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Outcome<K, R, D> {
    /// The set in force: the last good set with every accepted change.
    pub(crate) good: BTreeMap<K, R>,
    /// The keys whose change was applied.
    pub(crate) accepted: BTreeSet<K>,
    /// The changes not applied, and why (against the final good set).
    pub(crate) refused: BTreeMap<K, Refusal<K, D>>,
}

/// Applies what can be applied of `changes` to `good` (see the module
/// docs). `problems(set, changed)` returns the resources of `set` that are
/// invalid in it, with their problems; `changed` holds the keys whose
/// version in `set` is not the good one (a validator lets the resources in
/// force win where the first of two wins, so that a newcomer is the one
/// reported).
pub(crate) fn settle<K, R, D, F>(
    good: &BTreeMap<K, R>,
    changes: &BTreeMap<K, Change<R>>,
    problems: F,
) -> Outcome<K, R, D>
where
    K: Ord + Clone,
    R: Clone,
    D: Clone,
    F: FnMut(&BTreeMap<&K, &R>, &BTreeSet<K>) -> BTreeMap<K, Vec<D>>,
{
    let mut state = State {
        current: good.clone(),
        current_bad: BTreeSet::new(),
        changes,
        problems,
    };
    let mut pending: BTreeSet<K> = changes.keys().cloned().collect();
    let mut accepted = BTreeSet::new();
    if pending.is_empty() {
        return Outcome {
            good: state.current,
            accepted,
            refused: BTreeMap::new(),
        };
    }
    state.current_bad = state.trial(&BTreeSet::new()).problems.into_keys().collect();
    loop {
        let before = pending.len();
        // 1. All together, dropping culprits until what remains is valid.
        let mut joint = pending.clone();
        while !joint.is_empty() {
            let trial = state.trial(&joint);
            if trial.failing.is_empty() {
                state.apply(&joint, trial);
                for k in &joint {
                    pending.remove(k);
                }
                accepted.append(&mut joint);
                break;
            }
            let invalid_changes: Vec<K> = trial
                .failing
                .iter()
                .filter(|k| joint.contains(*k))
                .cloned()
                .collect();
            if !invalid_changes.is_empty() {
                for k in &invalid_changes {
                    joint.remove(k);
                }
                continue;
            }
            let culprit = joint.iter().find(|c| {
                let mut without = joint.clone();
                without.remove(*c);
                state.trial(&without).failing.len() < trial.failing.len()
            });
            match culprit.cloned() {
                Some(c) => {
                    joint.remove(&c);
                }
                None => break,
            }
        }
        // 2. One at a time, in key order.
        for key in pending.clone() {
            let one = BTreeSet::from([key.clone()]);
            let trial = state.trial(&one);
            if trial.failing.is_empty() {
                state.apply(&one, trial);
                pending.remove(&key);
                accepted.insert(key);
            }
        }
        if pending.is_empty() || pending.len() == before {
            break;
        }
    }
    let mut refused = BTreeMap::new();
    for key in &pending {
        let mut trial = state.trial(&BTreeSet::from([key.clone()]));
        let own = trial.problems.remove(key).unwrap_or_default();
        let breaks = trial
            .failing
            .iter()
            .filter(|k| *k != key)
            .filter_map(|k| Some((k.clone(), trial.problems.get(k)?.clone())))
            .collect();
        refused.insert(key.clone(), Refusal { own, breaks });
    }
    Outcome {
        good: state.current,
        accepted,
        refused,
    }
}

/// The good set as it grows, and how to try changes on it.
struct State<'c, K, R, F> {
    current: BTreeMap<K, R>,
    /// The resources already invalid in `current`.
    current_bad: BTreeSet<K>,
    changes: &'c BTreeMap<K, Change<R>>,
    problems: F,
}

/// The good set with some changes applied, judged.
struct Trial<K, D> {
    problems: BTreeMap<K, Vec<D>>,
    /// What makes it unacceptable: the resources invalid in it that were
    /// valid before, and the changed resources that are invalid.
    failing: BTreeSet<K>,
}

impl<K, R, D, F> State<'_, K, R, F>
where
    K: Ord + Clone,
    R: Clone,
    F: FnMut(&BTreeMap<&K, &R>, &BTreeSet<K>) -> BTreeMap<K, Vec<D>>,
{
    fn trial(&mut self, subset: &BTreeSet<K>) -> Trial<K, D> {
        let mut set: BTreeMap<&K, &R> = self.current.iter().collect();
        for key in subset {
            match self.changes.get(key) {
                Some(Change::Put(r)) => {
                    set.insert(key, r);
                }
                Some(Change::Remove) => {
                    set.remove(key);
                }
                None => {}
            }
        }
        let problems = (self.problems)(&set, subset);
        let failing = problems
            .keys()
            .filter(|k| subset.contains(*k) || !self.current_bad.contains(*k))
            .cloned()
            .collect();
        Trial { problems, failing }
    }

    fn apply(&mut self, subset: &BTreeSet<K>, trial: Trial<K, D>) {
        for key in subset {
            match self.changes.get(key) {
                Some(Change::Put(r)) => {
                    self.current.insert(key.clone(), r.clone());
                }
                Some(Change::Remove) => {
                    self.current.remove(key);
                }
                None => {}
            }
        }
        self.current_bad = trial.problems.into_keys().collect();
    }
}

#[cfg(test)]
mod tests {
    //! The algorithm on a toy world: resources are named, each says which
    //! names it needs ("routes to") and which name it claims (a host only
    //! one may claim, the first in name order winning, as VirtualServices
    //! do in file order). The YAML cases are in `last_good_tests.rs`.

    use super::*;

    /// A toy resource: the names it needs, and the host it claims.
    #[derive(Debug, Clone, PartialEq, Eq)]
    struct Toy {
        needs: Vec<&'static str>,
        claims: Option<&'static str>,
    }

    fn needs(names: &[&'static str]) -> Toy {
        Toy {
            needs: names.to_vec(),
            claims: None,
        }
    }

    fn claims(host: &'static str) -> Toy {
        Toy {
            needs: Vec::new(),
            claims: Some(host),
        }
    }

    /// Invalid: a resource needing a name not in the set, or claiming a
    /// host an earlier one claims (unchanged resources first, as the YAML
    /// validator orders them).
    fn problems(
        set: &BTreeMap<&&'static str, &Toy>,
        changed: &BTreeSet<&'static str>,
    ) -> BTreeMap<&'static str, Vec<String>> {
        let mut out: BTreeMap<&'static str, Vec<String>> = BTreeMap::new();
        for (name, toy) in set {
            for need in &toy.needs {
                if !set.contains_key(need) {
                    out.entry(**name)
                        .or_default()
                        .push(format!("{need} is missing"));
                }
            }
        }
        let mut order: Vec<(&'static str, &Toy)> = set.iter().map(|(n, t)| (**n, *t)).collect();
        order.sort_by_key(|(name, _)| (changed.contains(name), *name));
        let mut claimed: BTreeMap<&str, &str> = BTreeMap::new();
        for (name, toy) in order {
            if let Some(host) = toy.claims {
                match claimed.get(host) {
                    Some(first) => out
                        .entry(name)
                        .or_default()
                        .push(format!("{host} already claimed by {first}")),
                    None => {
                        claimed.insert(host, name);
                    }
                }
            }
        }
        out
    }

    type Set = BTreeMap<&'static str, Toy>;

    fn run(
        good: &Set,
        changes: &[(&'static str, Change<Toy>)],
    ) -> Outcome<&'static str, Toy, String> {
        let changes: BTreeMap<_, _> = changes.iter().cloned().collect();
        settle(good, &changes, problems)
    }

    /// vs needs dr; dr needs se.
    fn mesh() -> Set {
        BTreeMap::from([
            ("se", needs(&[])),
            ("dr", needs(&["se"])),
            ("vs", needs(&["dr"])),
        ])
    }

    #[test]
    fn nothing_to_do_costs_no_validation() {
        let good = mesh();
        let changes = BTreeMap::new();
        let outcome = settle(&good, &changes, |_, _| -> BTreeMap<_, Vec<String>> {
            panic!("validated without a change")
        });
        assert_eq!(outcome.good, good);
        assert!(outcome.accepted.is_empty() && outcome.refused.is_empty());
    }

    #[test]
    fn an_invalid_edit_keeps_the_last_good_version() {
        let good = mesh();
        let outcome = run(&good, &[("vs", Change::Put(needs(&["nope"])))]);
        assert_eq!(outcome.good, good);
        assert_eq!(outcome.refused["vs"].own, ["nope is missing"]);
        assert!(outcome.refused["vs"].breaks.is_empty());
    }

    #[test]
    fn an_invalid_new_resource_is_left_out() {
        let outcome = run(&mesh(), &[("vs2", Change::Put(needs(&["nope"])))]);
        assert!(!outcome.good.contains_key("vs2"));
        assert!(outcome.refused.contains_key("vs2"));
    }

    #[test]
    fn a_change_that_breaks_another_resource_is_refused_naming_it() {
        let good = mesh();
        // The rule stops needing se... and is replaced by one vs cannot use:
        // modelled as its removal.
        let outcome = run(&good, &[("dr", Change::Remove)]);
        assert_eq!(outcome.good, good, "the rule stays in force");
        let refusal = &outcome.refused["dr"];
        assert!(refusal.own.is_empty());
        assert_eq!(
            refusal.breaks,
            vec![("vs", vec!["dr is missing".to_string()])]
        );
    }

    #[test]
    fn a_removal_nothing_needs_is_applied() {
        let outcome = run(&mesh(), &[("vs", Change::Remove)]);
        assert!(!outcome.good.contains_key("vs"));
        assert!(outcome.refused.is_empty());
    }

    #[test]
    fn a_newcomer_cannot_displace_the_claim_in_force() {
        let good = BTreeMap::from([("b-payment", claims("payment"))]);
        // "a-payment" sorts first: in a fresh set it would win.
        let outcome = run(&good, &[("a-payment", Change::Put(claims("payment")))]);
        assert_eq!(outcome.good, good);
        assert_eq!(
            outcome.refused["a-payment"].own,
            ["payment already claimed by b-payment"]
        );
        // From nothing, the first one wins.
        let outcome = run(
            &BTreeMap::new(),
            &[
                ("a-payment", Change::Put(claims("payment"))),
                ("b-payment", Change::Put(claims("payment"))),
            ],
        );
        assert!(outcome.good.contains_key("a-payment"));
        assert!(outcome.refused.contains_key("b-payment"));
    }

    #[test]
    fn changes_valid_only_together_are_applied_together() {
        // A rename: dr2 replaces dr, vs moves to dr2, in one reload.
        let good = mesh();
        let outcome = run(
            &good,
            &[
                ("dr", Change::Remove),
                ("dr2", Change::Put(needs(&["se"]))),
                ("vs", Change::Put(needs(&["dr2"]))),
            ],
        );
        assert!(outcome.refused.is_empty(), "{:?}", outcome.refused);
        assert_eq!(outcome.good["vs"], needs(&["dr2"]));
        assert!(!outcome.good.contains_key("dr"));
    }

    #[test]
    fn a_coherent_edit_survives_an_unrelated_broken_one() {
        let mut good = mesh();
        good.insert("vs-other", needs(&["se"]));
        let outcome = run(
            &good,
            &[
                ("dr", Change::Remove),
                ("dr2", Change::Put(needs(&["se"]))),
                ("vs", Change::Put(needs(&["dr2"]))),
                // Broken on its own.
                ("vs-other", Change::Put(needs(&["typo"]))),
                // Breaks an unchanged resource: se is needed by dr2.
                ("se", Change::Remove),
            ],
        );
        assert_eq!(outcome.good["vs"], needs(&["dr2"]));
        assert!(!outcome.good.contains_key("dr"));
        assert_eq!(outcome.good["vs-other"], needs(&["se"]), "kept");
        assert!(outcome.good.contains_key("se"), "kept");
        let refused: Vec<&str> = outcome.refused.keys().copied().collect();
        assert_eq!(refused, ["se", "vs-other"]);
        let breaks: Vec<&str> = outcome.refused["se"]
            .breaks
            .iter()
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(breaks, ["dr2", "vs-other"]);
    }

    #[test]
    fn new_resources_arrive_in_any_order_of_dependency() {
        // From an empty set: vs needs dr needs se, applied together.
        let changes: Vec<(&'static str, Change<Toy>)> = mesh()
            .into_iter()
            .map(|(k, v)| (k, Change::Put(v)))
            .collect();
        let outcome = run(&BTreeMap::new(), &changes);
        assert_eq!(outcome.good, mesh());
    }

    #[test]
    fn an_already_invalid_resource_does_not_block_other_changes() {
        // vs needs a name no one provides (a registration that is gone).
        let mut good = mesh();
        good.insert("vs-reg", needs(&["registered"]));
        let outcome = run(&good, &[("vs", Change::Put(needs(&["se"])))]);
        assert!(outcome.refused.is_empty());
        assert_eq!(outcome.good["vs"], needs(&["se"]));
        // But an edit of it that is still invalid is not applied.
        let outcome = run(&good, &[("vs-reg", Change::Put(needs(&["other"])))]);
        assert!(outcome.refused.contains_key("vs-reg"));
    }

    #[test]
    fn the_outcome_does_not_depend_on_the_order_changes_are_listed_in() {
        let good = mesh();
        let a = [
            ("dr", Change::Remove),
            ("vs2", Change::Put(claims("x"))),
            ("vs3", Change::Put(claims("x"))),
            ("vs", Change::Put(needs(&["se"]))),
        ];
        let mut b = a.clone();
        b.reverse();
        assert_eq!(run(&good, &a), run(&good, &b));
        let outcome = run(&good, &a);
        assert!(!outcome.good.contains_key("dr"), "vs stopped needing it");
        assert!(outcome.good.contains_key("vs2"));
        assert!(outcome.refused.contains_key("vs3"));
    }
}

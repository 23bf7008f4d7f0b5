//! Package zygotes' policy (SOCK's import cache): which package sets, per namespace,
//! are kept warm in a package fork server whose zygote has imported them.
//!
//! A **set** is a Python function's packages in one namespace ([`SetKey`]). Every
//! cold start of a function with packages that no package zygote of exactly its set
//! served counts as demand for its set. The pool manager asks [`Policy::next`] each
//! pass what to do: a package zygote unused for the idle TTL goes; while the live
//! ones' memory limits exceed the budget (`--package-zygotes-mb`), the least
//! recently used goes; then the set with the most demand (the most recent first on a
//! tie) is made, if its limit (as last made, else [`FIRST_ESTIMATE_MB`] and the
//! headroom) fits, after evicting less recently used ones if it must. One is made at
//! a time; a namespace whose zygote failed to start waits before it gets another
//! (30 s, doubling while it keeps failing), and demand for a set no registered
//! function has any more is forgotten ([`Policy::retain`]). A package zygote's limit
//! is its memory as measured once it imported and its headroom (`Sandboxes`). Only a
//! package zygote with no
//! live sandbox forked from it may go (its idle stem cells are destroyed with it):
//! its sandboxes' pid namespaces are nested in its own and would die with it. Making
//! one satisfies its set's demand (the count starts again), so an evicted set comes
//! back only after another cold start wants it.
//!
//! Nothing here makes or destroys anything: it only decides ([`Step`]); the
//! sandboxes do the work. Its lock is a leaf.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::packages::{Kind, Package};
use crate::registry::Function;
use crate::runtime::Runtime;

/// The memory a package zygote is assumed to take before it was measured once (its
/// headroom comes on top).
pub const FIRST_ESTIMATE_MB: u64 = 16;
/// After a package zygote of a namespace failed to start, no set of the namespace is
/// tried for this long, doubled at each failure in a row up to [`RETRY_MAX`].
const RETRY_AFTER: Duration = Duration::from_secs(30);
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// A set whose zygote alone exceeded the budget is not tried again for this long.
const TOO_BIG_FOR: Duration = Duration::from_secs(600);

/// A function's package set in its namespace: what a package zygote holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SetKey {
    pub namespace: String,
    /// The packages' cache keys, sorted.
    pub keys: Vec<String>,
}

impl SetKey {
    /// The set of `function`, if it is a Python function with packages.
    pub fn of(function: &Function) -> Option<SetKey> {
        if function.runtime != Runtime::Python || function.deps.is_empty() {
            return None;
        }
        let mut keys: Vec<String> = python_packages(function)
            .map(|p| p.entry.key.clone())
            .collect();
        keys.sort();
        keys.dedup();
        (!keys.is_empty()).then(|| SetKey {
            namespace: function.namespace.clone(),
            keys,
        })
    }
}

fn python_packages(function: &Function) -> impl Iterator<Item = &Package> {
    function
        .deps
        .packages
        .iter()
        .filter(|p| p.entry.kind == Kind::Python)
}

/// A live package zygote as the scheduler and the sandboxes know it.
#[derive(Debug, PartialEq, Eq)]
pub struct ZygoteTag {
    /// Its number (its fork server is `sprout-<agent>.pz-<id>`).
    pub id: u64,
    pub namespace: String,
    /// The cache keys of the packages it imported (and keeps mounted).
    pub keys: BTreeSet<String>,
}

impl ZygoteTag {
    /// Whether a sandbox forked from it may serve `function`: same namespace, and
    /// every package it holds is one of the function's.
    pub fn serves(&self, function: &Function) -> bool {
        self.namespace == function.namespace
            && self
                .keys
                .iter()
                .all(|k| python_packages(function).any(|p| &p.entry.key == k))
    }

    /// Whether it holds exactly set `key`.
    pub fn is(&self, key: &SetKey) -> bool {
        self.namespace == key.namespace && self.keys.iter().eq(key.keys.iter())
    }
}

/// Of `tags`, the one that serves `function` with the most packages.
pub fn best<'a>(
    tags: impl IntoIterator<Item = &'a Arc<ZygoteTag>>,
    function: &Function,
) -> Option<&'a Arc<ZygoteTag>> {
    tags.into_iter()
        .filter(|t| t.serves(function))
        .max_by_key(|t| (t.keys.len(), std::cmp::Reverse(t.id)))
}

/// What the policy knows of a live package zygote.
#[derive(Debug, Clone)]
pub struct Live {
    pub tag: Arc<ZygoteTag>,
    /// Its fork server's memory limit: what it counts at against the budget.
    pub limit_mb: u64,
    /// Live sandboxes forked from it, its idle stem cells left out.
    pub busy: bool,
    /// When a sandbox was last forked from it (or it was made).
    pub last_used: Instant,
}

/// One thing for the manager to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Destroy package zygote `id` (and its idle stem cells).
    Evict(u64),
    /// Make a package zygote of this set, with these packages.
    Start(SetKey, Vec<Package>),
}

#[derive(Debug)]
struct Candidate {
    packages: Vec<Package>,
    /// Cold starts wanting this set since its zygote was last made.
    demand: u64,
    last_wanted: Instant,
    /// Its zygote's limit when last made.
    measured_mb: Option<u64>,
    not_before: Option<Instant>,
}

/// A namespace whose package zygotes failed to start lately.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    /// The wait after its next failure.
    next: Duration,
    not_before: Instant,
}

/// What the policy's lock guards.
#[derive(Debug, Default)]
struct State {
    candidates: HashMap<SetKey, Candidate>,
    /// The set whose zygote is being made (at most one at a time).
    starting: Option<SetKey>,
    backoff: HashMap<String, Backoff>,
}

/// The policy: the budget, and the demand for each set seen.
#[derive(Debug)]
pub struct Policy {
    budget_mb: u64,
    /// What a zygote not made yet is assumed to count at (MiB).
    first_estimate_mb: u64,
    idle_ttl: Duration,
    state: Mutex<State>,
}

impl Policy {
    /// `budget_mb` 0 turns package zygotes off; `headroom_mb`: what a package
    /// zygote's limit adds to its measured memory.
    pub fn new(budget_mb: u64, headroom_mb: u64, idle_ttl: Duration) -> Policy {
        Policy {
            budget_mb,
            first_estimate_mb: FIRST_ESTIMATE_MB + headroom_mb,
            idle_ttl,
            state: Mutex::new(State::default()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.budget_mb > 0
    }

    /// A cold start of `function`; `exact`: a package zygote of exactly its set
    /// served it (no demand then).
    pub fn cold_start(&self, function: &Function, exact: bool, now: Instant) {
        if !self.enabled() || exact {
            return;
        }
        let Some(key) = SetKey::of(function) else {
            return;
        };
        let packages: Vec<Package> = python_packages(function).cloned().collect();
        let mut state = self.state.lock();
        let c = state.candidates.entry(key).or_insert_with(|| Candidate {
            packages: Vec::new(),
            demand: 0,
            last_wanted: now,
            measured_mb: None,
            not_before: None,
        });
        c.packages = packages;
        c.demand += 1;
        c.last_wanted = now;
    }

    /// The zygote of set `key` was made with a limit of `limit_mb`: its demand is
    /// met, and its namespace's failures are forgiven.
    pub fn made(&self, key: &SetKey, limit_mb: u64, now: Instant) {
        let mut state = self.state.lock();
        state.starting = None;
        state.backoff.remove(&key.namespace);
        if let Some(c) = state.candidates.get_mut(key) {
            c.demand = 0;
            c.measured_mb = Some(limit_mb);
            if limit_mb > self.budget_mb {
                c.not_before = Some(now + TOO_BIG_FOR);
            }
        }
    }

    /// Making the zygote of set `key` failed: its namespace waits (twice as long as
    /// last time if that failed too). Returns how long.
    pub fn failed(&self, key: &SetKey, now: Instant) -> Duration {
        let mut state = self.state.lock();
        state.starting = None;
        if let Some(c) = state.candidates.get_mut(key) {
            c.demand = 0;
        }
        let b = state
            .backoff
            .entry(key.namespace.clone())
            .or_insert(Backoff {
                next: RETRY_AFTER,
                not_before: now,
            });
        let wait = b.next;
        b.not_before = now + wait;
        b.next = (wait * 2).min(RETRY_MAX);
        wait
    }

    /// Forgets the demand for every set not in `registered` (the sets of the
    /// registered functions), and the failures of namespaces without any.
    pub fn retain(&self, registered: &HashSet<SetKey>) {
        let namespaces: HashSet<&str> = registered.iter().map(|k| k.namespace.as_str()).collect();
        let mut state = self.state.lock();
        state.candidates.retain(|key, _| registered.contains(key));
        state
            .backoff
            .retain(|ns, _| namespaces.contains(ns.as_str()));
    }

    /// Whether a zygote with a limit of `limit_mb` fits the budget on its own.
    pub fn fits_alone(&self, limit_mb: u64) -> bool {
        limit_mb <= self.budget_mb
    }

    /// What to do now, given the live package zygotes and how many more could be
    /// made (free uid windows): evictions first, then at most one start, unless one
    /// is under way (until [`Policy::made`] or [`Policy::failed`] of it).
    pub fn next(&self, live: &[Live], free_windows: usize, now: Instant) -> Vec<Step> {
        if !self.enabled() {
            return live
                .iter()
                .filter(|l| !l.busy)
                .map(|l| Step::Evict(l.tag.id))
                .collect();
        }
        let mut steps = Vec::new();
        // Least recently used first.
        let mut kept: Vec<&Live> = live.iter().collect();
        kept.sort_by_key(|l| l.last_used);
        let evict = |kept: &mut Vec<&Live>, steps: &mut Vec<Step>, i: usize| {
            steps.push(Step::Evict(kept[i].tag.id));
            kept.remove(i);
        };
        // Unused for the idle TTL.
        while let Some(i) = kept
            .iter()
            .position(|l| !l.busy && l.last_used + self.idle_ttl <= now)
        {
            evict(&mut kept, &mut steps, i);
        }
        let used = |kept: &Vec<&Live>| kept.iter().map(|l| l.limit_mb).sum::<u64>();
        while used(&kept) > self.budget_mb {
            let Some(i) = kept.iter().position(|l| !l.busy) else {
                break;
            };
            evict(&mut kept, &mut steps, i);
        }
        let mut free = free_windows + (live.len() - kept.len());
        let mut state = self.state.lock();
        if state.starting.is_some() {
            return steps;
        }
        let backoff = &state.backoff;
        let wanted = state
            .candidates
            .iter()
            .filter(|(key, c)| {
                c.demand > 0
                    && c.not_before.is_none_or(|t| t <= now)
                    && backoff
                        .get(&key.namespace)
                        .is_none_or(|b| b.not_before <= now)
                    && !live.iter().any(|l| l.tag.is(key))
            })
            .max_by_key(|(key, c)| (c.demand, c.last_wanted, std::cmp::Reverse(*key)));
        let Some((key, c)) = wanted else {
            return steps;
        };
        // Not measured yet: assumed, but tried even under a smaller budget (once made
        // it is measured, and evicted if it alone does not fit).
        let need = c
            .measured_mb
            .unwrap_or(self.first_estimate_mb.min(self.budget_mb));
        if need > self.budget_mb {
            return steps;
        }
        // Room is made only of zygotes used less recently than the set was wanted.
        let mut evictions = Vec::new();
        let mut room = kept.clone();
        while used(&room) + need > self.budget_mb || free == 0 {
            let Some(i) = room
                .iter()
                .position(|l| !l.busy && l.last_used < c.last_wanted)
            else {
                return steps;
            };
            evictions.push(Step::Evict(room[i].tag.id));
            room.remove(i);
            free += 1;
        }
        steps.extend(evictions);
        let (key, packages) = (key.clone(), c.packages.clone());
        steps.push(Step::Start(key.clone(), packages));
        state.starting = Some(key);
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(id: u64, ns: &str, keys: &[&str]) -> Arc<ZygoteTag> {
        Arc::new(ZygoteTag {
            id,
            namespace: ns.into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
        })
    }

    fn live(tag: Arc<ZygoteTag>, limit_mb: u64, busy: bool, last_used: Instant) -> Live {
        Live {
            tag,
            limit_mb,
            busy,
            last_used,
        }
    }

    /// A Python function of namespace `ns` with packages `keys`.
    pub(crate) fn python_function(ns: &str, keys: &[&str]) -> Function {
        let packages = keys
            .iter()
            .map(|k| Package {
                entry: crate::packages::Entry {
                    kind: Kind::Python,
                    key: k.to_string(),
                    name: k.to_string(),
                    version: "1".into(),
                    sha256: String::new(),
                    modules: vec![k.to_string()],
                    bytes: 0,
                },
                dir: format!("/cache/{k}").into(),
            })
            .collect();
        Function {
            namespace: ns.into(),
            name: "f".into(),
            runtime: Runtime::Python,
            network: pool::network::Network::None,
            dir: "/code".into(),
            handler: ipc::proto::Handler {
                module: "f".into(),
                function: "f".into(),
            },
            memory_mb: 128,
            timeout_ms: 1000,
            pids: 64,
            cpus: 1.0,
            max_instances: 1,
            version: 1,
            owns_dir: false,
            deps: crate::packages::Deps { packages },
            env: Default::default(),
            http_methods: None,
            openwhisk: None,
        }
    }

    #[test]
    fn a_set_is_a_python_functions_packages_in_its_namespace() {
        let f = python_function("ns", &["b", "a", "a"]);
        assert_eq!(SetKey::of(&f), Some(set("ns", &["a", "b"])));
        assert!(SetKey::of(&python_function("ns", &[])).is_none());
        let mut node = python_function("ns", &["a"]);
        node.runtime = Runtime::Nodejs;
        assert!(SetKey::of(&node).is_none());
        // A cold start an exact zygote served is no demand; others are.
        let p = Policy::new(100, 0, Duration::from_secs(600));
        let t0 = Instant::now();
        p.cold_start(&f, true, t0);
        assert!(p.next(&[], 4, t0).is_empty());
        p.cold_start(&f, false, t0);
        match &p.next(&[], 4, t0)[..] {
            [Step::Start(key, packages)] => {
                assert_eq!(key, &set("ns", &["a", "b"]));
                assert_eq!(packages.len(), 3);
            }
            other => panic!("{other:?}"),
        }
        let off = Policy::new(0, 0, Duration::from_secs(600));
        off.cold_start(&f, false, t0);
        assert!(off.next(&[], 4, t0).is_empty());
    }

    fn set(ns: &str, keys: &[&str]) -> SetKey {
        SetKey {
            namespace: ns.into(),
            keys: keys.iter().map(|k| k.to_string()).collect(),
        }
    }

    /// Demand for `key` as `n` cold starts at `at`.
    fn want(policy: &Policy, key: &SetKey, n: u64, at: Instant) {
        policy.state.lock().candidates.insert(
            key.clone(),
            Candidate {
                packages: Vec::new(),
                demand: n,
                last_wanted: at,
                measured_mb: None,
                not_before: None,
            },
        );
    }

    #[test]
    fn the_most_wanted_set_is_made_once_and_its_demand_is_met() {
        let t0 = Instant::now();
        let p = Policy::new(100, 0, Duration::from_secs(600));
        assert!(p.next(&[], 4, t0).is_empty());
        let (a, b) = (set("ns", &["six"]), set("ns", &["idna"]));
        want(&p, &a, 1, t0);
        want(&p, &b, 2, t0);
        assert_eq!(p.next(&[], 4, t0), [Step::Start(b.clone(), vec![])]);
        p.made(&b, 20, t0);
        let lb = live(tag(1, "ns", &["idna"]), 20, false, t0);
        assert_eq!(
            p.next(std::slice::from_ref(&lb), 3, t0),
            [Step::Start(a.clone(), vec![])]
        );
        p.made(&a, 20, t0);
        let la = live(tag(2, "ns", &["six"]), 20, false, t0);
        assert!(p.next(&[lb, la], 2, t0).is_empty());
        // The same set in another namespace is another set.
        let other = set("other", &["six"]);
        want(&p, &other, 1, t0);
        let la = live(tag(2, "ns", &["six"]), 20, false, t0);
        assert_eq!(p.next(&[la], 3, t0), [Step::Start(other, vec![])]);
    }

    #[test]
    fn over_the_budget_the_least_recently_used_idle_zygote_goes() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(1);
        let t2 = t0 + Duration::from_secs(2);
        let p = Policy::new(50, 0, Duration::from_secs(600));
        let old = live(tag(1, "ns", &["a"]), 30, false, t0);
        let new = live(tag(2, "ns", &["b"]), 30, false, t1);
        assert_eq!(p.next(&[new.clone(), old.clone()], 2, t1), [Step::Evict(1)]);
        // One with live sandboxes stays, whatever it costs.
        let busy_old = live(tag(1, "ns", &["a"]), 30, true, t0);
        assert_eq!(
            p.next(&[busy_old.clone(), new.clone()], 2, t1),
            [Step::Evict(2)]
        );
        let busy_new = live(tag(2, "ns", &["b"]), 30, true, t1);
        assert!(p.next(&[busy_old, busy_new], 2, t1).is_empty());
        // A new set evicts those used before it was wanted, not after.
        let c = set("ns", &["c"]);
        want(&p, &c, 1, t2);
        p.state.lock().candidates.get_mut(&c).unwrap().measured_mb = Some(30);
        let a = live(tag(1, "ns", &["a"]), 20, false, t0);
        assert_eq!(
            p.next(std::slice::from_ref(&a), 0, t2),
            [Step::Evict(1), Step::Start(c.clone(), vec![])]
        );
        p.state.lock().starting = None; // as if it was not made
        let recent = live(tag(1, "ns", &["a"]), 30, false, t2 + Duration::from_secs(1));
        assert!(p.next(&[recent], 4, t2).is_empty());
        // Too big for the budget on its own: never made.
        p.state.lock().candidates.get_mut(&c).unwrap().measured_mb = Some(60);
        assert!(p.next(&[], 4, t2).is_empty());
        // Unused for the idle TTL: goes, budget or not.
        let p = Policy::new(500, 0, Duration::from_secs(10));
        let stale = live(tag(3, "ns", &["a"]), 1, false, t0);
        assert_eq!(
            p.next(&[stale], 4, t0 + Duration::from_secs(10)),
            [Step::Evict(3)]
        );
        // Off: every idle one goes, nothing is made.
        let off = Policy::new(0, 0, Duration::from_secs(10));
        want(&off, &c, 5, t0);
        let l = live(tag(4, "ns", &["a"]), 1, false, t0);
        assert_eq!(off.next(&[l], 4, t0), [Step::Evict(4)]);
    }

    #[test]
    fn a_failed_namespace_waits_longer_each_time_and_a_too_big_set_waits_too() {
        let t0 = Instant::now();
        let p = Policy::new(50, 0, Duration::from_secs(600));
        let (a, a2, b) = (set("ns", &["a"]), set("ns", &["a2"]), set("other", &["a"]));
        want(&p, &a, 1, t0);
        assert_eq!(p.next(&[], 4, t0), [Step::Start(a.clone(), vec![])]);
        assert_eq!(p.failed(&a, t0), RETRY_AFTER);
        // Every set of the namespace waits; another namespace does not.
        want(&p, &a, 1, t0);
        want(&p, &a2, 1, t0);
        assert!(p.next(&[], 4, t0).is_empty());
        want(&p, &b, 1, t0);
        assert_eq!(p.next(&[], 4, t0), [Step::Start(b.clone(), vec![])]);
        p.made(&b, 10, t0);
        let t1 = t0 + RETRY_AFTER;
        match &p.next(&[], 4, t1)[..] {
            [Step::Start(key, _)] => {
                assert_eq!(key.namespace, "ns");
                assert_eq!(p.failed(key, t1), RETRY_AFTER * 2);
            }
            other => panic!("{other:?}"),
        }
        want(&p, &a, 1, t1);
        assert!(p.next(&[], 4, t1 + RETRY_AFTER).is_empty());
        let t2 = t1 + RETRY_AFTER * 2;
        assert_eq!(p.next(&[], 4, t2), [Step::Start(a.clone(), vec![])]);
        // Doubling stops at RETRY_MAX; a success forgives.
        for _ in 0..12 {
            p.failed(&a, t2);
        }
        assert_eq!(p.failed(&a, t2), RETRY_MAX);
        p.made(&a, 10, t2);
        assert_eq!(p.failed(&a, t2), RETRY_AFTER);
        want(&p, &a, 1, t2 + RETRY_AFTER);
        assert_eq!(
            p.next(&[], 4, t2 + RETRY_AFTER),
            [Step::Start(a.clone(), vec![])]
        );
        p.made(&a, 80, t0);
        assert!(!p.fits_alone(80));
        want(&p, &a, 1, t0);
        p.state.lock().candidates.get_mut(&a).unwrap().not_before = Some(t0 + TOO_BIG_FOR);
        // Too big, a waits longer; the other set of its namespace may go.
        assert_eq!(
            p.next(&[], 4, t0 + RETRY_AFTER),
            [Step::Start(a2.clone(), vec![])]
        );
    }

    #[test]
    fn one_zygote_is_made_at_a_time() {
        let t0 = Instant::now();
        let p = Policy::new(100, 0, Duration::from_secs(600));
        let (a, b) = (set("ns", &["a"]), set("ns", &["b"]));
        want(&p, &a, 2, t0);
        want(&p, &b, 1, t0);
        assert_eq!(p.next(&[], 4, t0), [Step::Start(a.clone(), vec![])]);
        // While a's is made: nothing else starts, but evictions go on.
        assert!(p.next(&[], 3, t0).is_empty());
        let stale = live(tag(7, "ns", &["c"]), 1, false, t0);
        let later = t0 + Duration::from_secs(600);
        assert_eq!(p.next(&[stale], 3, later), [Step::Evict(7)]);
        p.made(&a, 20, t0);
        assert_eq!(p.next(&[], 3, t0), [Step::Start(b.clone(), vec![])]);
        p.failed(&b, t0);
        // Made ones are counted at their limit, not made ones at the estimate and
        // the headroom.
        let p = Policy::new(100, 60, Duration::from_secs(600));
        want(&p, &a, 1, t0);
        let other = live(tag(1, "ns", &["x"]), 30, false, t0 + Duration::from_secs(1));
        assert!(p.next(std::slice::from_ref(&other), 3, t0).is_empty());
        assert_eq!(p.next(&[], 3, t0), [Step::Start(a.clone(), vec![])]);
    }

    #[test]
    fn demand_for_sets_no_registered_function_has_is_forgotten() {
        let t0 = Instant::now();
        let p = Policy::new(100, 0, Duration::from_secs(600));
        let (a, b) = (set("ns", &["a"]), set("gone", &["b"]));
        want(&p, &a, 1, t0);
        want(&p, &b, 5, t0);
        p.failed(&b, t0);
        assert_eq!(p.state.lock().backoff.len(), 1);
        p.retain(&HashSet::from([a.clone()]));
        let state = p.state.lock();
        assert_eq!(state.candidates.keys().collect::<Vec<_>>(), [&a]);
        assert!(state.backoff.is_empty());
    }

    #[test]
    fn the_largest_set_that_fits_serves() {
        let tags = [
            tag(1, "ns", &["a"]),
            tag(2, "ns", &["a", "b"]),
            tag(3, "other", &["a", "b", "c"]),
            tag(4, "ns", &["a", "b", "d"]),
        ];
        let t = |keys: &[&str], ns: &str| -> Option<u64> {
            let function = python_function(ns, keys);
            best(tags.iter(), &function).map(|t| t.id)
        };
        assert_eq!(t(&["a", "b", "c"], "ns"), Some(2));
        assert_eq!(t(&["a"], "ns"), Some(1));
        assert_eq!(t(&["b"], "ns"), None);
        assert_eq!(t(&["a", "b", "c"], "other"), Some(3));
        assert_eq!(t(&["a", "b", "c"], "third"), None);
        assert_eq!(t(&["a", "b", "d", "e"], "ns"), Some(4));
    }
}

//! The node's metrics: one typed struct, [`Metrics`] (as Firecracker's `METRICS`),
//! holding what only it counts — invocations by function, start path and status,
//! latency histograms, per-namespace usage (invocations, errors, execution time,
//! GB-seconds), admission refusals, and the gauge the activation record store sets —
//! and [`Gauges`], what the components already know (queues, sandboxes, stem cells,
//! memory, packages), read from them at scrape time. `GET /status` and `GET
//! /metrics` read both; [`Metrics::encode`] writes them in Prometheus' text format
//! (version 0.0.4) with `prometheus-client`.
//!
//! An invocation is counted once, when it ends ([`Metrics::invocation_finished`]),
//! at depth 0 only: calls a function makes are part of its invocation. The warm
//! path pays two read locks and a few atomic adds.
//!
//! Labels: functions and namespaces are the tenants' names, so series grow with
//! registered functions (by function: invocations, queue depth, in flight) and
//! namespaces (usage, refusals, latency histograms — per namespace and start path,
//! not per function, to keep the histograms' series few). A removed function's
//! counters stay (counters never go back).

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipc::api::{ActivationStatus, NamespaceUsage};
use parking_lot::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::names::FunctionKey;
use crate::request::Start;

/// The content type of [`Metrics::encode`]'s text: Prometheus' text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The function's queue was full (`--max-queue`).
    QueueFull,
    /// The namespace had its limit of invocations in flight.
    Concurrent,
    /// The namespace had its limit of invocations in the last minute.
    PerMinute,
}

impl Refusal {
    const ALL: [Refusal; 3] = [Refusal::QueueFull, Refusal::Concurrent, Refusal::PerMinute];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue_full",
            Refusal::Concurrent => "concurrent",
            Refusal::PerMinute => "per_minute",
        }
    }
}

/// The start paths an invocation is counted under: [`Start`]'s, and `none` for one
/// that ended before an instance was found for it (a load failure, a queue timeout,
/// its client gone while it waited).
const STARTS: [Option<Start>; 6] = [
    Some(Start::Warm),
    Some(Start::Thawed),
    Some(Start::StemCell),
    Some(Start::NewSandbox),
    Some(Start::PackageZygote),
    None,
];

fn start_index(start: Option<Start>) -> usize {
    match start {
        Some(Start::Warm) => 0,
        Some(Start::Thawed) => 1,
        Some(Start::StemCell) => 2,
        Some(Start::NewSandbox) => 3,
        Some(Start::PackageZygote) => 4,
        None => 5,
    }
}

fn start_name(start: Option<Start>) -> &'static str {
    start.map_or("none", Start::as_str)
}

/// The latency histogram's bucket bounds, in seconds: 100 µs to 60 s.
pub const LATENCY_BUCKETS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// A histogram of durations in atomics (the last bucket is `+Inf`).
#[derive(Debug, Default)]
struct Latency {
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

impl Latency {
    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        let at = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[at].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.count.fetch_add(1, Ordering::Relaxed);
    }
}

/// One function's invocations by start path and status.
#[derive(Debug, Default)]
struct FunctionCounts {
    by: [[AtomicU64; ActivationStatus::ALL.len()]; STARTS.len()],
}

/// One namespace's usage, refusals and latencies.
#[derive(Debug, Default)]
struct NamespaceCounts {
    by_status: [AtomicU64; ActivationStatus::ALL.len()],
    duration_ms: AtomicU64,
    /// Memory limit (MiB) × duration (ms), summed: GB-seconds × 1024 × 1000.
    mb_ms: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
    latency: [Latency; STARTS.len()],
}

impl NamespaceCounts {
    fn usage(&self, namespace: &str) -> NamespaceUsage {
        let by: Vec<u64> = self
            .by_status
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect();
        let mb_ms = self.mb_ms.load(Ordering::Relaxed);
        NamespaceUsage {
            namespace: namespace.to_owned(),
            invocations: by.iter().sum(),
            errors: by[1..].iter().sum(),
            duration_ms: self.duration_ms.load(Ordering::Relaxed),
            mb_ms,
            gb_seconds: gb_seconds(mb_ms),
            statuses: ActivationStatus::ALL
                .iter()
                .zip(&by)
                .map(|(s, n)| (s.as_str().to_owned(), *n))
                .collect(),
        }
    }
}

/// GB-seconds from MiB × ms (a GB is 1024 MiB, as AWS and OpenWhisk count memory).
fn gb_seconds(mb_ms: u64) -> f64 {
    mb_ms as f64 / 1024.0 / 1000.0
}

/// What the node counts itself. One per agent, shared (`Arc`) by the components
/// that count; each count is an atomic, each map behind its own read-write lock (a
/// leaf: nothing else is locked under it).
#[derive(Debug, Default)]
pub struct Metrics {
    /// Invocations started, at any depth (`GET /status`'s `invocations`).
    started: AtomicU64,
    functions: RwLock<HashMap<FunctionKey, Arc<FunctionCounts>>>,
    namespaces: RwLock<HashMap<String, Arc<NamespaceCounts>>>,
    /// Set by the activation record store: records it holds (-1: no store).
    activations_stored: AtomicI64,
}

/// One function's scheduling gauges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionGauges {
    pub key: FunctionKey,
    /// Requests waiting in its queue.
    pub queued: usize,
    /// Requests queued or running (an instance starting for one counts as running).
    pub in_flight: usize,
}

/// Sandboxes by what they are doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SandboxStates {
    /// Ready stem cells (plain and package ones), frozen.
    pub stem_cells: usize,
    /// Idle warm instances, thawed.
    pub idle: usize,
    /// Idle warm instances, frozen.
    pub frozen: usize,
    /// The rest: running an invocation, starting, or being destroyed.
    pub busy: usize,
}

/// What the components know, read from them when asked (`GET /status`, `GET
/// /metrics`): never counted twice.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub functions: usize,
    pub per_function: Vec<FunctionGauges>,
    pub sandboxes: SandboxStates,
    /// Ready stem cells by runtime name (every runtime).
    pub stem_cells_by_runtime: Vec<(&'static str, usize)>,
    pub package_zygotes: usize,
    pub reserved_mb: u64,
    pub memory_budget_mb: u64,
    pub packages_installed: u64,
    pub package_cache_hits: u64,
    pub sandboxes_forked: u64,
    pub sandboxes_created: u64,
    pub uptime: Duration,
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {
            activations_stored: AtomicI64::new(-1),
            ..Metrics::default()
        }
    }

    /// An invocation started (any depth).
    pub fn invocation_started(&self) {
        self.started.fetch_add(1, Ordering::Relaxed);
    }

    /// Invocations started so far, at any depth.
    pub fn invocations_started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// A client's invocation (depth 0) of `key` ended with `status` after
    /// `duration` (its integer milliseconds are the usage's), in an instance found
    /// by `start` (`None`: none was), with a memory limit of `memory_mb`.
    pub fn invocation_finished(
        &self,
        key: &FunctionKey,
        start: Option<Start>,
        status: ActivationStatus,
        duration: Duration,
        memory_mb: u64,
    ) {
        let (s, st) = (start_index(start), status.code() as usize);
        with_entry(&self.functions, key, |f| {
            f.by[s][st].fetch_add(1, Ordering::Relaxed);
        });
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        with_entry(&self.namespaces, &key.namespace, |n| {
            n.by_status[st].fetch_add(1, Ordering::Relaxed);
            n.duration_ms.fetch_add(ms, Ordering::Relaxed);
            n.mb_ms
                .fetch_add(ms.saturating_mul(memory_mb), Ordering::Relaxed);
            n.latency[s].observe(duration);
        });
    }

    /// A request of `namespace` refused by a limit.
    pub fn refused(&self, namespace: &str, why: Refusal) {
        let at = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        with_entry(&self.namespaces, namespace, |n| {
            n.refusals[at].fetch_add(1, Ordering::Relaxed);
        });
    }

    /// Requests of `namespace` refused for `why` so far.
    pub fn refusals(&self, namespace: &str, why: Refusal) -> u64 {
        let at = Refusal::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.namespaces
            .read()
            .get(namespace)
            .map_or(0, |n| n.refusals[at].load(Ordering::Relaxed))
    }

    /// `namespace`'s usage since the agent started (zero for one never invoked).
    pub fn usage(&self, namespace: &str) -> NamespaceUsage {
        match self.namespaces.read().get(namespace) {
            Some(n) => n.usage(namespace),
            None => NamespaceCounts::default().usage(namespace),
        }
    }

    /// For the activation record store: the records it holds now.
    pub fn set_activations_stored(&self, n: u64) {
        self.activations_stored
            .store(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }

    /// The metrics in Prometheus' text format ([`CONTENT_TYPE`]), with `gauges`
    /// read from the components just now.
    pub fn encode(self: &Arc<Self>, gauges: Gauges) -> String {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Scrape {
            metrics: self.clone(),
            gauges,
        }));
        let mut text = String::new();
        // Writing into a String does not fail; the collector's encoders neither.
        if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
            tracing::error!(error = %e, "encoding the metrics failed");
        }
        text
    }
}

/// Runs `f` on `map`'s entry for `key`, made on first use (under the write lock
/// only then).
fn with_entry<K, Q, V>(map: &RwLock<HashMap<K, Arc<V>>>, key: &Q, f: impl FnOnce(&V))
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ToOwned<Owned = K> + ?Sized,
    V: Default,
{
    if let Some(v) = map.read().get(key) {
        return f(v);
    }
    let v = map.write().entry(key.to_owned()).or_default().clone();
    f(&v)
}

/// One scrape: the counters and the gauges read for it.
#[derive(Debug)]
struct Scrape {
    metrics: Arc<Metrics>,
    gauges: Gauges,
}

type Result = std::result::Result<(), std::fmt::Error>;

/// Writes one family of `kind` named `name`: each of `samples` is its labels and
/// value.
fn family<L, V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, V)>,
) -> Result
where
    L: prometheus_client::encoding::EncodeLabelSet,
    V: Sample,
{
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let sample = metric.encode_family(&labels)?;
        value.encode(sample)?;
    }
    Ok(())
}

/// A value of a family: a counter's or a gauge's.
trait Sample {
    fn encode(self, encoder: prometheus_client::encoding::MetricEncoder) -> Result;
}

/// A counter's value.
struct Count<N>(N);
/// A gauge's value.
struct Level<N>(N);

impl<N> Sample for Count<N>
where
    N: prometheus_client::encoding::EncodeCounterValue + std::fmt::Debug,
{
    fn encode(self, encoder: prometheus_client::encoding::MetricEncoder) -> Result {
        ConstCounter::new(self.0).encode(encoder)
    }
}

impl<N> Sample for Level<N>
where
    N: prometheus_client::encoding::EncodeGaugeValue + std::fmt::Debug,
{
    fn encode(self, encoder: prometheus_client::encoding::MetricEncoder) -> Result {
        ConstGauge::new(self.0).encode(encoder)
    }
}

/// A family without labels.
fn single<V: Sample>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    value: V,
) -> Result {
    let metric = encoder.encode_descriptor(name, help, None, kind)?;
    value.encode(metric)
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result {
        use MetricType::{Counter, Gauge};
        let m = &self.metrics;
        let g = &self.gauges;
        // Sorted, so that a scrape reads the same way every time.
        let mut functions: Vec<(FunctionKey, Arc<FunctionCounts>)> = m
            .functions
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        functions.sort_by(|a, b| a.0.cmp(&b.0));
        let mut namespaces: Vec<(String, Arc<NamespaceCounts>)> = m
            .namespaces
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        namespaces.sort_by(|a, b| a.0.cmp(&b.0));

        single(
            &mut e,
            "sprout_invocations_started",
            "Invocations started, at any depth (calls between functions and workflow steps included).",
            Counter,
            Count(m.invocations_started()),
        )?;
        let mut by_function = Vec::new();
        for (key, counts) in &functions {
            for (s, start) in STARTS.iter().enumerate() {
                for (st, status) in ActivationStatus::ALL.iter().enumerate() {
                    let n = counts.by[s][st].load(Ordering::Relaxed);
                    if n > 0 {
                        let labels = [
                            ("namespace", key.namespace.as_str()),
                            ("function", key.name.as_str()),
                            ("start", start_name(*start)),
                            ("status", status.as_str()),
                        ];
                        by_function.push((labels, Count(n)));
                    }
                }
            }
        }
        family(
            &mut e,
            "sprout_invocations",
            "Client invocations (depth 0) that ended, by function, start path (none: no instance was found for it) and activation status.",
            Counter,
            by_function,
        )?;
        {
            let mut metric = e.encode_descriptor(
                "sprout_invocation_duration_seconds",
                "Client invocations' durations (from arrival to answer, queueing included), by namespace and start path.",
                None,
                MetricType::Histogram,
            )?;
            for (ns, counts) in &namespaces {
                for (s, start) in STARTS.iter().enumerate() {
                    let latency = &counts.latency[s];
                    let count = latency.count.load(Ordering::Relaxed);
                    if count == 0 {
                        continue;
                    }
                    let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
                        .iter()
                        .zip(&latency.buckets)
                        .map(|(b, n)| (*b, n.load(Ordering::Relaxed)))
                        .collect();
                    buckets.push((
                        f64::INFINITY,
                        latency.buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed),
                    ));
                    // The total is the buckets' (they may move on while read).
                    let count: u64 = buckets.iter().map(|b| b.1).sum();
                    let sum = latency.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
                    let labels = [("namespace", ns.as_str()), ("start", start_name(*start))];
                    let mut sample = metric.encode_family(&labels)?;
                    sample.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
                }
            }
        }
        let usage: Vec<_> = namespaces
            .iter()
            .map(|(ns, counts)| counts.usage(ns))
            .collect();
        let by_ns = |f: fn(&NamespaceUsage) -> u64| {
            usage
                .iter()
                .map(move |u| ([("namespace", u.namespace.as_str())], Count(f(u))))
        };
        family(
            &mut e,
            "sprout_namespace_invocations",
            "Client invocations of each namespace that ended.",
            Counter,
            by_ns(|u| u.invocations),
        )?;
        family(
            &mut e,
            "sprout_namespace_errors",
            "Client invocations of each namespace whose status is not success.",
            Counter,
            by_ns(|u| u.errors),
        )?;
        family(
            &mut e,
            "sprout_namespace_execution_milliseconds",
            "Execution time of each namespace's invocations, in whole milliseconds per invocation.",
            Counter,
            by_ns(|u| u.duration_ms),
        )?;
        family(
            &mut e,
            "sprout_namespace_gb_seconds",
            "Memory limit (GB of 1024 MiB) times duration (s) of each namespace's invocations.",
            Counter,
            usage
                .iter()
                .map(|u| ([("namespace", u.namespace.as_str())], Count(u.gb_seconds))),
        )?;
        let mut refusals = Vec::new();
        for (ns, counts) in &namespaces {
            for (at, why) in Refusal::ALL.iter().enumerate() {
                let n = counts.refusals[at].load(Ordering::Relaxed);
                if n > 0 {
                    refusals.push((
                        [("namespace", ns.as_str()), ("reason", why.as_str())],
                        Count(n),
                    ));
                }
            }
        }
        family(
            &mut e,
            "sprout_admission_refusals",
            "Requests refused with 429 before they were queued, by namespace and limit (queue_full, concurrent, per_minute).",
            Counter,
            refusals,
        )?;
        let fn_labels = |f: &FunctionGauges| {
            [
                ("namespace", f.key.namespace.clone()),
                ("function", f.key.name.clone()),
            ]
        };
        family(
            &mut e,
            "sprout_queue_depth",
            "Requests waiting in each function's queue.",
            Gauge,
            g.per_function
                .iter()
                .map(|f| (fn_labels(f), Level(f.queued as i64))),
        )?;
        family(
            &mut e,
            "sprout_in_flight",
            "Requests of each function queued or running.",
            Gauge,
            g.per_function
                .iter()
                .map(|f| (fn_labels(f), Level(f.in_flight as i64))),
        )?;
        let s = g.sandboxes;
        family(
            &mut e,
            "sprout_sandboxes",
            "Live sandboxes by state: stem_cell (ready, frozen), idle (warm), frozen (warm, frozen), busy (running, starting or being destroyed).",
            Gauge,
            [
                ("stem_cell", s.stem_cells),
                ("idle", s.idle),
                ("frozen", s.frozen),
                ("busy", s.busy),
            ]
            .map(|(state, n)| ([("state", state)], Level(n as i64))),
        )?;
        family(
            &mut e,
            "sprout_stem_cells",
            "Ready plain stem cells by runtime.",
            Gauge,
            g.stem_cells_by_runtime
                .iter()
                .map(|(r, n)| ([("runtime", *r)], Level(*n as i64))),
        )?;
        family(
            &mut e,
            "sprout_sandboxes_made",
            "Sandboxes made so far, by how: forked from the fork server's zygote, or created by libcontainer.",
            Counter,
            [
                ("fork", g.sandboxes_forked),
                ("create", g.sandboxes_created),
            ]
            .map(|(how, n)| ([("how", how)], Count(n))),
        )?;
        single(
            &mut e,
            "sprout_package_zygotes",
            "Live package zygotes.",
            Gauge,
            Level(g.package_zygotes as i64),
        )?;
        single(
            &mut e,
            "sprout_memory_reserved_bytes",
            "Memory reserved by live sandboxes' limits.",
            Gauge,
            Level(mib_bytes(g.reserved_mb)),
        )?;
        single(
            &mut e,
            "sprout_memory_budget_bytes",
            "The memory budget the sandboxes' limits may reserve (--memory-budget).",
            Gauge,
            Level(mib_bytes(g.memory_budget_mb)),
        )?;
        single(
            &mut e,
            "sprout_package_installs",
            "Packages this agent installed into the package cache.",
            Counter,
            Count(g.packages_installed),
        )?;
        single(
            &mut e,
            "sprout_package_cache_hits",
            "Packages a registration needed and found in the cache already.",
            Counter,
            Count(g.package_cache_hits),
        )?;
        single(
            &mut e,
            "sprout_functions",
            "Registered functions.",
            Gauge,
            Level(g.functions as i64),
        )?;
        single(
            &mut e,
            "sprout_uptime_seconds",
            "Time since the agent started.",
            Gauge,
            Level(g.uptime.as_secs_f64()),
        )?;
        let stored = m.activations_stored.load(Ordering::Relaxed);
        if stored >= 0 {
            single(
                &mut e,
                "sprout_activations_stored",
                "Activation records in the record store.",
                Gauge,
                Level(stored),
            )?;
        }
        Ok(())
    }
}

fn mib_bytes(mb: u64) -> i64 {
    i64::try_from(mb.saturating_mul(1 << 20)).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(ns: &str, name: &str) -> FunctionKey {
        FunctionKey::new(ns, name).unwrap()
    }

    #[test]
    fn usage_sums_invocations_errors_time_and_gb_seconds() {
        let m = Metrics::new();
        let f = key("a", "f");
        m.invocation_finished(
            &f,
            Some(Start::StemCell),
            ActivationStatus::Success,
            Duration::from_micros(1_500_900),
            256,
        );
        m.invocation_finished(
            &f,
            Some(Start::Warm),
            ActivationStatus::ApplicationError,
            Duration::from_millis(500),
            256,
        );
        m.invocation_finished(
            &key("a", "g"),
            None,
            ActivationStatus::WhiskInternalError,
            Duration::from_millis(10),
            1024,
        );
        m.invocation_finished(
            &key("b", "f"),
            Some(Start::Warm),
            ActivationStatus::Success,
            Duration::from_millis(7),
            128,
        );
        let u = m.usage("a");
        assert_eq!((u.invocations, u.errors), (3, 2));
        // Whole milliseconds per invocation: 1500 + 500 + 10.
        assert_eq!(u.duration_ms, 2010);
        assert_eq!(u.mb_ms, 1500 * 256 + 500 * 256 + 10 * 1024);
        assert!((u.gb_seconds - (0.25 * 1.5 + 0.25 * 0.5 + 0.01)).abs() < 1e-9);
        assert_eq!(u.statuses["success"], 1);
        assert_eq!(u.statuses["application_error"], 1);
        assert_eq!(u.statuses["action_developer_error"], 0);
        assert_eq!(u.statuses["whisk_internal_error"], 1);
        assert_eq!(m.usage("b").invocations, 1);
        let none = m.usage("nobody");
        assert_eq!(
            (none.invocations, none.mb_ms, none.statuses.len()),
            (0, 0, 4)
        );
    }

    #[test]
    fn the_text_has_every_family_with_the_counted_values() {
        let m = Arc::new(Metrics::new());
        let f = key("a", "f");
        for _ in 0..3 {
            m.invocation_started();
            m.invocation_finished(
                &f,
                Some(Start::Warm),
                ActivationStatus::Success,
                Duration::from_micros(700),
                128,
            );
        }
        m.invocation_finished(
            &f,
            None,
            ActivationStatus::WhiskInternalError,
            Duration::from_secs(90),
            128,
        );
        m.refused("a", Refusal::QueueFull);
        m.refused("a", Refusal::PerMinute);
        m.refused("a", Refusal::PerMinute);
        let gauges = Gauges {
            functions: 1,
            per_function: vec![FunctionGauges {
                key: f.clone(),
                queued: 2,
                in_flight: 5,
            }],
            sandboxes: SandboxStates {
                stem_cells: 2,
                idle: 1,
                frozen: 3,
                busy: 4,
            },
            stem_cells_by_runtime: vec![("python", 2), ("nodejs", 0)],
            reserved_mb: 384,
            memory_budget_mb: 1024,
            packages_installed: 7,
            package_cache_hits: 9,
            ..Gauges::default()
        };
        let text = m.encode(gauges.clone());
        let has = |line: &str| {
            assert!(
                text.lines().any(|l| l == line),
                "no line {line:?} in:\n{text}"
            )
        };
        has("# TYPE sprout_invocations_total counter");
        has("sprout_invocations_total{namespace=\"a\",function=\"f\",start=\"warm\",status=\"success\"} 3");
        has("sprout_invocations_total{namespace=\"a\",function=\"f\",start=\"none\",status=\"whisk_internal_error\"} 1");
        has("sprout_invocations_started_total 3");
        has("# TYPE sprout_invocation_duration_seconds histogram");
        has("sprout_invocation_duration_seconds_bucket{namespace=\"a\",start=\"warm\",le=\"0.0005\"} 0");
        has("sprout_invocation_duration_seconds_bucket{namespace=\"a\",start=\"warm\",le=\"0.001\"} 3");
        has("sprout_invocation_duration_seconds_bucket{namespace=\"a\",start=\"warm\",le=\"+Inf\"} 3");
        has("sprout_invocation_duration_seconds_count{namespace=\"a\",start=\"warm\"} 3");
        has(
            "sprout_invocation_duration_seconds_bucket{namespace=\"a\",start=\"none\",le=\"60\"} 0",
        );
        has("sprout_invocation_duration_seconds_bucket{namespace=\"a\",start=\"none\",le=\"+Inf\"} 1");
        has("sprout_namespace_invocations_total{namespace=\"a\"} 4");
        has("sprout_namespace_errors_total{namespace=\"a\"} 1");
        has("sprout_namespace_execution_milliseconds_total{namespace=\"a\"} 90000");
        has("sprout_admission_refusals_total{namespace=\"a\",reason=\"queue_full\"} 1");
        has("sprout_admission_refusals_total{namespace=\"a\",reason=\"per_minute\"} 2");
        has("sprout_queue_depth{namespace=\"a\",function=\"f\"} 2");
        has("sprout_in_flight{namespace=\"a\",function=\"f\"} 5");
        has("sprout_sandboxes{state=\"busy\"} 4");
        has("sprout_stem_cells{runtime=\"python\"} 2");
        has("sprout_memory_reserved_bytes 402653184");
        has("sprout_memory_budget_bytes 1073741824");
        has("sprout_package_installs_total 7");
        has("sprout_package_cache_hits_total 9");
        // No store: no gauge; once the store sets it, there it is.
        assert!(!text.contains("sprout_activations_stored"), "{text}");
        m.set_activations_stored(12);
        let text = m.encode(gauges);
        assert!(
            text.lines().any(|l| l == "sprout_activations_stored 12"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        // Namespaces may hold '@' and '.', which need no escaping; the encoder must
        // keep them as they are.
        let m = Arc::new(Metrics::new());
        m.invocation_finished(
            &key("user@example.com", "f.v2"),
            Some(Start::Warm),
            ActivationStatus::Success,
            Duration::from_millis(1),
            128,
        );
        let text = m.encode(Gauges::default());
        assert!(
            text.contains("sprout_namespace_invocations_total{namespace=\"user@example.com\"} 1"),
            "{text}"
        );
    }
}

//! Admission control: per-namespace limits on client invocations, as OpenWhisk's
//! `user.limits` (`concurrentInvocations`, `invocationsPerMinute`). [`Admission`] is
//! asked once per client invocation (depth 0: calls a function makes are part of its
//! invocation and are not admitted again) before the request goes near a function's
//! queue; a refusal is a `429` and touches nothing else. An admitted request holds a
//! [`Ticket`] until it ends (queued or running, it is in flight); dropping the ticket
//! ends it, on whatever thread holds it then.
//!
//! The per-minute limit is a sliding window in one-second steps: a namespace may have
//! at most `per_minute` invocations admitted in the current second and the 59 before
//! it. Refused requests do not count. A namespace with neither limit costs no lock.
//!
//! The per-function queue bound (`--max-queue`) is the scheduler's: it is the
//! queue's own size ([`crate::scheduler`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use crate::error::Error as AgentError;
use crate::metrics::{Metrics, Refusal};
use crate::names::FunctionKey;

/// The most a limit may be (either of them).
pub const MAX_LIMIT: u64 = 1 << 32;

/// A namespace's limits; 0 is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Invocations in flight (queued or running) at once.
    pub concurrent: u64,
    /// Invocations admitted in any 60 s (in one-second steps).
    pub per_minute: u64,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        self.concurrent == 0 && self.per_minute == 0
    }
}

/// The limits of every namespace: defaults (`--namespace-concurrent`,
/// `--namespace-per-minute`) and overrides per namespace (`--namespace-limits FILE`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamespaceLimits {
    pub defaults: Limits,
    pub overrides: HashMap<String, Limits>,
}

/// Why a limits file was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("read namespace limits {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("namespace limits {path}, line {line} ({text:?}): {why}")]
    Line {
        path: PathBuf,
        line: usize,
        text: String,
        why: String,
    },
}

impl NamespaceLimits {
    /// The limits of `namespace`: its override, else the defaults.
    pub fn of(&self, namespace: &str) -> Limits {
        self.overrides
            .get(namespace)
            .copied()
            .unwrap_or(self.defaults)
    }

    /// Reads a limits file over `defaults` ([`NamespaceLimits::parse`]).
    pub fn load(path: &Path, defaults: Limits) -> Result<NamespaceLimits, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        NamespaceLimits::parse(path, &text, defaults)
    }

    /// One namespace per line: `NAMESPACE concurrent=N per_minute=M` (either key may
    /// be left out: it is then the default; 0 is unlimited). Blank lines and lines
    /// starting with `#` are skipped. A bad namespace, key or number, a key given
    /// twice, or a namespace listed twice is refused, naming the line.
    pub fn parse(path: &Path, text: &str, defaults: Limits) -> Result<NamespaceLimits, Error> {
        let mut overrides = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |why: String| Error::Line {
                path: path.to_owned(),
                line: i + 1,
                text: raw.chars().take(200).collect(),
                why,
            };
            let mut words = line.split_whitespace();
            let namespace = words.next().unwrap_or_default();
            crate::names::validate_namespace(namespace).map_err(|e| bad(e.to_string()))?;
            let mut limits = defaults;
            let (mut concurrent, mut per_minute) = (false, false);
            for word in words {
                let (key, value) = word.split_once('=').ok_or_else(|| {
                    bad(format!(
                        "{word:?} is not KEY=N: use concurrent=N and per_minute=N"
                    ))
                })?;
                let n = value
                    .parse::<u64>()
                    .ok()
                    .filter(|n| *n <= MAX_LIMIT)
                    .ok_or_else(|| {
                        bad(format!(
                            "{key}={value:?}: give a number from 0 (unlimited) to {MAX_LIMIT}"
                        ))
                    })?;
                let seen = match key {
                    "concurrent" => {
                        limits.concurrent = n;
                        &mut concurrent
                    }
                    "per_minute" => {
                        limits.per_minute = n;
                        &mut per_minute
                    }
                    other => {
                        return Err(bad(format!(
                            "unknown limit {other:?}: use concurrent=N and per_minute=N"
                        )))
                    }
                };
                if std::mem::replace(seen, true) {
                    return Err(bad(format!("{key} is given twice")));
                }
            }
            if overrides.insert(namespace.to_owned(), limits).is_some() {
                return Err(bad(format!("namespace {namespace:?} is listed twice")));
            }
        }
        Ok(NamespaceLimits {
            defaults,
            overrides,
        })
    }
}

/// Asks each client invocation past its namespace's limits.
#[derive(Debug)]
pub struct Admission {
    limits: NamespaceLimits,
    /// No namespace has a limit: admitting costs nothing.
    unlimited: bool,
    /// The namespaces that have a limit and have asked, by name.
    namespaces: Mutex<HashMap<String, Arc<Counted>>>,
    /// Second 0 of every window.
    epoch: Instant,
    metrics: Arc<Metrics>,
}

/// One limited namespace's counts.
#[derive(Debug)]
struct Counted {
    namespace: String,
    limits: Limits,
    state: Mutex<Window>,
}

/// Invocations in flight, and those admitted in each of the last 60 seconds.
#[derive(Debug)]
struct Window {
    in_flight: u64,
    /// Admitted in second `s` at `s % 60`, for the 60 seconds up to `now`.
    seconds: [u64; 60],
    /// The sum of `seconds`.
    in_window: u64,
    /// The latest second counted (seconds since [`Admission::epoch`]).
    now: u64,
}

impl Default for Window {
    fn default() -> Window {
        Window {
            in_flight: 0,
            seconds: [0; 60],
            in_window: 0,
            now: 0,
        }
    }
}

impl Window {
    /// Moves the window on to second `now`: what fell out of it is forgotten.
    fn advance(&mut self, now: u64) {
        if now <= self.now {
            return;
        }
        if now - self.now >= 60 {
            self.seconds = [0; 60];
            self.in_window = 0;
        } else {
            for s in self.now + 1..=now {
                let slot = &mut self.seconds[(s % 60) as usize];
                self.in_window -= *slot;
                *slot = 0;
            }
        }
        self.now = now;
    }
}

/// A request admitted past its namespace's limits: in flight until dropped. It may
/// move to another thread (an asynchronous invocation takes it along).
#[derive(Debug)]
#[must_use = "the request is in flight only while its ticket lives"]
pub struct Ticket(Option<Arc<Counted>>);

impl Ticket {
    /// A ticket for a request no limit applies to.
    pub fn unlimited() -> Ticket {
        Ticket(None)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(counted) = self.0.take() {
            let mut window = counted.state.lock();
            window.in_flight = window.in_flight.saturating_sub(1);
        }
    }
}

impl Admission {
    pub fn new(limits: NamespaceLimits, metrics: Arc<Metrics>) -> Admission {
        let unlimited =
            limits.defaults.is_unlimited() && limits.overrides.values().all(Limits::is_unlimited);
        Admission {
            limits,
            unlimited,
            namespaces: Mutex::new(HashMap::new()),
            epoch: Instant::now(),
            metrics,
        }
    }

    /// Admits a client's invocation of `key`, or refuses it (`429`, counted in the
    /// metrics) when its namespace is at a limit.
    pub fn admit(&self, key: &FunctionKey) -> Result<Ticket, AgentError> {
        self.admit_at(key, Instant::now()).map_err(|refused| {
            let reason = match refused {
                AgentError::RateLimit { .. } => Refusal::PerMinute,
                _ => Refusal::Concurrent,
            };
            self.metrics.refused(&key.namespace, reason);
            refused
        })
    }

    /// [`Admission::admit`] without counting a refusal: for a path that, refused,
    /// goes on to the ordinary one (which asks again and counts it).
    pub fn try_admit(&self, key: &FunctionKey) -> Result<Ticket, AgentError> {
        self.admit_at(key, Instant::now())
    }

    fn admit_at(&self, key: &FunctionKey, now: Instant) -> Result<Ticket, AgentError> {
        if self.unlimited {
            return Ok(Ticket(None));
        }
        let limits = self.limits.of(&key.namespace);
        if limits.is_unlimited() {
            return Ok(Ticket(None));
        }
        let counted = {
            let mut namespaces = self.namespaces.lock();
            match namespaces.get(&key.namespace) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(Counted {
                        namespace: key.namespace.clone(),
                        limits,
                        state: Mutex::new(Window::default()),
                    });
                    namespaces.insert(key.namespace.clone(), c.clone());
                    c
                }
            }
        };
        {
            let mut window = counted.state.lock();
            let limits = counted.limits;
            if limits.concurrent > 0 && window.in_flight >= limits.concurrent {
                return Err(AgentError::ConcurrencyLimit {
                    namespace: counted.namespace.clone(),
                    limit: limits.concurrent,
                });
            }
            if limits.per_minute > 0 {
                window.advance(now.saturating_duration_since(self.epoch).as_secs());
                if window.in_window >= limits.per_minute {
                    return Err(AgentError::RateLimit {
                        namespace: counted.namespace.clone(),
                        limit: limits.per_minute,
                    });
                }
                let at = (window.now % 60) as usize;
                window.seconds[at] += 1;
                window.in_window += 1;
            }
            window.in_flight += 1;
        }
        Ok(Ticket(Some(counted)))
    }

    /// Invocations of `namespace` in flight now (counted only for a namespace with a
    /// limit).
    pub fn in_flight(&self, namespace: &str) -> u64 {
        self.namespaces
            .lock()
            .get(namespace)
            .map_or(0, |c| c.state.lock().in_flight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key(ns: &str) -> FunctionKey {
        FunctionKey::new(ns, "f").unwrap()
    }

    fn admission(defaults: Limits, overrides: &[(&str, Limits)]) -> Admission {
        let limits = NamespaceLimits {
            defaults,
            overrides: overrides
                .iter()
                .map(|(ns, l)| ((*ns).to_owned(), *l))
                .collect(),
        };
        Admission::new(limits, Arc::new(Metrics::default()))
    }

    #[test]
    fn concurrency_counts_tickets_in_flight_until_they_drop() {
        let a = admission(
            Limits {
                concurrent: 2,
                per_minute: 0,
            },
            &[],
        );
        let one = a.admit(&key("a")).unwrap();
        let two = a.admit(&key("a")).unwrap();
        assert_eq!(a.in_flight("a"), 2);
        let e = a.admit(&key("a")).unwrap_err();
        assert!(
            matches!(e, AgentError::ConcurrencyLimit { limit: 2, .. }),
            "{e}"
        );
        assert_eq!(e.kind(), crate::ErrorKind::TooManyRequests);
        assert_eq!(e.kind().http_status(), 429);
        let text = e.to_string();
        assert!(
            text.contains("namespace \"a\"") && text.contains("2 concurrent"),
            "{text}"
        );
        // Another namespace has its own count.
        let other = a.admit(&key("b")).unwrap();
        // A ticket ends its request on any thread.
        std::thread::spawn(move || drop(one)).join().unwrap();
        assert_eq!(a.in_flight("a"), 1);
        let three = a.admit(&key("a")).unwrap();
        assert!(a.admit(&key("a")).is_err());
        drop((two, three, other));
        assert_eq!(a.in_flight("a"), 0);
        assert_eq!(a.metrics.refusals("a", Refusal::Concurrent), 2);
        assert_eq!(a.metrics.refusals("b", Refusal::Concurrent), 0);
    }

    #[test]
    fn the_per_minute_window_slides_in_seconds() {
        let a = admission(
            Limits {
                concurrent: 0,
                per_minute: 3,
            },
            &[],
        );
        let t0 = a.epoch;
        let at = |s: u64| t0 + Duration::from_millis(s * 1000 + 500);
        // Three in seconds 0, 10 and 20; the fourth (second 30) is refused.
        for s in [0, 10, 20] {
            drop(a.admit_at(&key("a"), at(s)).unwrap());
        }
        let e = a.admit_at(&key("a"), at(30)).unwrap_err();
        assert!(matches!(e, AgentError::RateLimit { limit: 3, .. }), "{e}");
        assert!(e.to_string().contains("3 invocations per minute"), "{e}");
        // Refusals do not count: at second 59 the window still holds 3.
        assert!(a.admit_at(&key("a"), at(59)).is_err());
        // At second 60, second 0 has left the window: one more fits, not two.
        drop(a.admit_at(&key("a"), at(60)).unwrap());
        assert!(a.admit_at(&key("a"), at(60)).is_err());
        // At 70 the one of second 10 is gone.
        drop(a.admit_at(&key("a"), at(70)).unwrap());
        // Long after, the window is empty again.
        for _ in 0..3 {
            drop(a.admit_at(&key("a"), at(500)).unwrap());
        }
        assert!(a.admit_at(&key("a"), at(500)).is_err());
        // Tickets that ended do not free the window: it counts admissions.
        assert_eq!(a.in_flight("a"), 0);
    }

    #[test]
    fn overrides_replace_the_defaults_and_unlimited_namespaces_take_no_count() {
        let a = admission(
            Limits {
                concurrent: 1,
                per_minute: 0,
            },
            &[
                (
                    "big",
                    Limits {
                        concurrent: 3,
                        per_minute: 0,
                    },
                ),
                ("free", Limits::default()),
            ],
        );
        let held: Vec<Ticket> = (0..3).map(|_| a.admit(&key("big")).unwrap()).collect();
        assert!(a.admit(&key("big")).is_err());
        let _one = a.admit(&key("small")).unwrap();
        assert!(a.admit(&key("small")).is_err());
        let free: Vec<Ticket> = (0..100).map(|_| a.admit(&key("free")).unwrap()).collect();
        assert_eq!(a.in_flight("free"), 0);
        drop((held, free));
        // No limit anywhere: nothing is counted at all.
        let none = admission(Limits::default(), &[]);
        assert!(none.unlimited);
        let tickets: Vec<Ticket> = (0..1000).map(|_| none.admit(&key("a")).unwrap()).collect();
        assert_eq!(none.in_flight("a"), 0);
        drop(tickets);
    }

    #[test]
    fn try_admit_counts_no_refusal() {
        let a = admission(
            Limits {
                concurrent: 1,
                per_minute: 0,
            },
            &[],
        );
        let _held = a.admit(&key("a")).unwrap();
        assert!(a.try_admit(&key("a")).is_err());
        assert_eq!(a.metrics.refusals("a", Refusal::Concurrent), 0);
        assert!(a.admit(&key("a")).is_err());
        assert_eq!(a.metrics.refusals("a", Refusal::Concurrent), 1);
    }

    #[test]
    fn limits_files_are_read_and_bad_lines_named() {
        let path = Path::new("/etc/sprout/limits");
        let defaults = Limits {
            concurrent: 10,
            per_minute: 600,
        };
        let text = "# tenants\n\nalice concurrent=2 per_minute=60\n  bob per_minute=0\ncarol\n";
        let limits = NamespaceLimits::parse(path, text, defaults).unwrap();
        assert_eq!(
            limits.of("alice"),
            Limits {
                concurrent: 2,
                per_minute: 60
            }
        );
        assert_eq!(
            limits.of("bob"),
            Limits {
                concurrent: 10,
                per_minute: 0
            }
        );
        assert_eq!(limits.of("carol"), defaults);
        assert_eq!(limits.of("dave"), defaults);
        for (bad, line, says) in [
            ("a concurrent=x", 1, "give a number"),
            ("a concurrent=-1", 1, "give a number"),
            ("a concurrent=99999999999", 1, "give a number"),
            ("ok\na burst=3", 2, "unknown limit \"burst\""),
            ("a concurrent", 1, "is not KEY=N"),
            ("a concurrent=1 concurrent=2", 1, "given twice"),
            ("a\n#\na per_minute=1", 3, "listed twice"),
            ("bad/ns concurrent=1", 1, "invalid namespace"),
            ("_ concurrent=1", 1, "invalid namespace"),
        ] {
            let e = NamespaceLimits::parse(path, bad, defaults).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(&format!("line {line} ")) && text.contains(says),
                "{bad:?}: {text}"
            );
            assert!(text.contains("/etc/sprout/limits"), "{text}");
        }
        let e = NamespaceLimits::load(Path::new("/nonexistent/limits"), defaults).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/limits"), "{e}");
    }
}

//! Result rows and percentiles.

use std::time::Duration;

use serde::Serialize;

/// One measured path, as written to `latency.json`.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    pub path: String,
    pub n: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub min_us: f64,
    pub max_us: f64,
    /// Throughput rows: completed invocations per second over the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops_per_s: Option<f64>,
    /// Transfer rows: bytes moved per second at the median, in GB/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gb_per_s: Option<f64>,
    /// Every sample, for the plots (not written to the JSON).
    #[serde(skip)]
    pub samples_us: Vec<f64>,
}

impl Row {
    pub fn new(path: &str, samples: &[Duration]) -> Row {
        assert!(!samples.is_empty(), "{path}: no samples");
        let mut us: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        us.sort_by(f64::total_cmp);
        Row {
            path: path.to_owned(),
            n: us.len(),
            p50_us: percentile(&us, 0.50),
            p99_us: percentile(&us, 0.99),
            min_us: us[0],
            max_us: us[us.len() - 1],
            ops_per_s: None,
            gb_per_s: None,
            samples_us: us,
        }
    }

    pub fn with_ops_per_s(mut self, ops: f64) -> Row {
        self.ops_per_s = Some(ops);
        self
    }
}

/// Nearest-rank percentile of sorted samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// Prints the table.
pub fn print(rows: &[Row]) {
    println!(
        "{:<66} {:>6} {:>12} {:>12} {:>12}",
        "path", "n", "p50", "p99", "ops/s|GB/s"
    );
    for r in rows {
        let ops = match (r.ops_per_s, r.gb_per_s) {
            (Some(o), _) => format!("{o:.0}"),
            (None, Some(g)) => format!("{g:.2} GB/s"),
            (None, None) => String::new(),
        };
        println!(
            "{:<66} {:>6} {:>12} {:>12} {:>12}",
            r.path,
            r.n,
            human(r.p50_us),
            human(r.p99_us),
            ops
        );
    }
}

/// 812 µs, 4.21 ms, 1.30 s.
pub fn human(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 0.5), 50.0);
        assert_eq!(percentile(&s, 0.99), 99.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        let r = Row::new(
            "x",
            &[
                Duration::from_micros(3),
                Duration::from_micros(1),
                Duration::from_micros(2),
            ],
        );
        assert_eq!((r.n, r.p50_us, r.min_us, r.max_us), (3, 2.0, 1.0, 3.0));
        assert_eq!(human(812.0), "812 µs");
        assert_eq!(human(4210.0), "4.21 ms");
    }
}

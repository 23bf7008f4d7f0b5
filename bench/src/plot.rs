//! One latency-distribution plot per path: the empirical CDF of its samples, as SVG.
//! A linear axis from zero, so plots of one run compare at a glance.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::stats::Row;

/// A file name from a path's description.
pub fn slug(path: &str) -> String {
    let s: String = path
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    s.split('-')
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// Writes `<dir>/<slug>.svg` for `row`; returns its path.
pub fn cdf(dir: &Path, row: &Row) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join(format!("{}.svg", slug(&row.path)));
    let samples = &row.samples_us;
    // Linear axis from 0; a long tail beyond 1.5 x p99 is cut off (and said so).
    let max = samples[samples.len() - 1];
    let hi = if max > 1.5 * row.p99_us {
        1.5 * row.p99_us
    } else {
        max * 1.05
    }
    .max(1.0);
    let x_desc = if max > hi {
        format!("latency (µs; axis ends at 1.5 x p99, max {max:.0})")
    } else {
        "latency (µs)".to_owned()
    };
    let root = SVGBackend::new(&file, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{} (n={}, p50 {:.0} µs, p99 {:.0} µs)",
                row.path, row.n, row.p50_us, row.p99_us
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..hi, 0.0..100.0)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("% of invocations at or below")
        .draw()?;
    let n = samples.len() as f64;
    chart.draw_series(LineSeries::new(
        samples
            .iter()
            .enumerate()
            .filter(|(_, &us)| us <= hi)
            .map(|(i, &us)| (us, (i + 1) as f64 * 100.0 / n)),
        &BLUE,
    ))?;
    for (p, color) in [(50.0, &GREEN), (99.0, &RED)] {
        chart.draw_series(LineSeries::new([(0.0, p), (hi, p)], color.mix(0.4)))?;
    }
    root.present()?;
    drop(chart);
    drop(root);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn writes_an_svg_named_after_the_path() {
        assert_eq!(
            slug("cold invoke, empty pool (new sandbox)"),
            "cold-invoke-empty-pool-new-sandbox"
        );
        let t = tempfile::tempdir().unwrap();
        let samples: Vec<Duration> = (1..200).map(|i| Duration::from_micros(i * 7)).collect();
        let file = cdf(t.path(), &Row::new("warm invoke", &samples)).unwrap();
        let svg = std::fs::read_to_string(file).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{}",
            &svg[..200.min(svg.len())]
        );
    }
}

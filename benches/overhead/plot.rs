//! The latency plot of BENCHMARKS.md: open-loop latency of rows (a), (b) and (e), as
//! a CDF (top) and as a percentile spectrum (bottom, HdrHistogram style: the x axis
//! stretches the tail so p99 and p99.9 get as much room as the median).

use std::path::Path;

use plotters::prelude::*;

use crate::common::quantile;

/// One curve: a name and its latency samples in ns, sorted ascending.
pub(crate) struct Series<'a> {
    /// Legend text.
    pub(crate) name: String,
    /// Sorted samples (ns).
    pub(crate) sorted_ns: &'a [u64],
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

/// Draws `series` into an SVG file at `path`.
pub(crate) fn latency_svg(path: &Path, title: &str, series: &[Series<'_>]) -> Result<(), String> {
    let series: Vec<&Series<'_>> = series.iter().filter(|s| !s.sorted_ns.is_empty()).collect();
    if series.is_empty() {
        return Err("no latency samples to plot".into());
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    let lo = series
        .iter()
        .filter_map(|s| s.sorted_ns.first().copied())
        .min()
        .map_or(1.0, us)
        .max(1.0);
    let hi = series
        .iter()
        .map(|s| quantile(s.sorted_ns, 0.9999))
        .max()
        .map_or(1000.0, us)
        .max(lo * 2.0);
    let err = |e: String| format!("drawing {}: {e}", path.display());

    let root = SVGBackend::new(path, (960, 960)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (top, bottom) = root.split_vertically(480);

    // CDF: x = latency (log), y = fraction of requests at or below it.
    let mut cdf = ChartBuilder::on(&top)
        .caption(format!("{title}: CDF"), ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0f64..1f64)
        .map_err(|e| err(e.to_string()))?;
    cdf.configure_mesh()
        .x_desc("latency from intended start (µs, log scale)")
        .y_desc("fraction of requests")
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let n = s.sorted_ns.len();
        let step = (n / 2000).max(1);
        let points = s
            .sorted_ns
            .iter()
            .enumerate()
            .filter(|(j, _)| j % step == 0 || *j + 1 == n)
            .map(|(j, &v)| (us(v).clamp(lo * 0.9, hi * 1.1), (j + 1) as f64 / n as f64));
        cdf.draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    cdf.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;

    // Percentile spectrum: x = -log10(1 - p), so 90 %, 99 %, 99.9 % are evenly spaced.
    let max_nines = 4.0;
    let mut spectrum = ChartBuilder::on(&bottom)
        .caption(
            format!("{title}: latency by percentile"),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..max_nines, (lo * 0.9..hi * 1.1).log_scale())
        .map_err(|e| err(e.to_string()))?;
    spectrum
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs, log scale)")
        .x_labels(5)
        .x_label_formatter(&|x| {
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            if p < 99.0 {
                format!("{p:.0}%")
            } else {
                format!("{p}%")
            }
        })
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let points = (0..=400).map(|k| {
            let nines = max_nines * f64::from(k) / 400.0;
            let p = 1.0 - 10f64.powf(-nines);
            (
                nines,
                us(quantile(s.sorted_ns, p)).clamp(lo * 0.9, hi * 1.1),
            )
        });
        spectrum
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    spectrum
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

//! `latency.png`: latency percentiles (p50 … p99.99) of every target at the fixed rate, one
//! panel per connection count, log scale, drawn with plotters' bitmap backend. Text uses the
//! system's DejaVu Sans (Debian `fonts-dejavu-core`), read once; nothing else is loaded.

use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::compare::Comparison;
use crate::load::PERCENTILES;

const FONT_FILES: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

fn register_font() -> anyhow::Result<()> {
    let bytes = FONT_FILES
        .iter()
        .find_map(|path| std::fs::read(path).ok())
        .context("DejaVu Sans is missing (apt-get install fonts-dejavu-core)")?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("DejaVu Sans did not load"))
}

/// Draws the chart of `comparisons` at each of `connections` to `path` (PNG).
pub fn draw(path: &Path, comparisons: &[&Comparison], connections: &[u32]) -> anyhow::Result<()> {
    register_font()?;
    let panels = connections.len().max(1);
    let root = BitMapBackend::new(path, (1000, 520 * panels as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let areas = root.split_evenly((panels, 1));
    // A target measured again in a later comparison (the origin and its floor beside a peer)
    // is drawn once, from the first.
    let mut seen = std::collections::HashSet::new();
    let series: Vec<(String, &crate::compare::Series)> = comparisons
        .iter()
        .flat_map(|c| {
            std::iter::once(&c.floor)
                .chain(&c.subjects)
                .map(move |s| (format!("{}: {}", c.tier, s.name), s))
        })
        .filter(|(_, s)| seen.insert(s.name.clone()))
        .collect();
    for (area, &conns) in areas.iter().zip(connections) {
        let values: Vec<f64> = series
            .iter()
            .filter_map(|(_, s)| s.at(conns))
            .flat_map(|p| p.fixed.latency_ms.iter().copied())
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let low = values
            .iter()
            .copied()
            .fold(f64::INFINITY, f64::min)
            .max(0.01)
            / 1.5;
        // Room above the highest line for the legend (upper left).
        let high = values.iter().copied().fold(0.0, f64::max).max(low * 10.0) * 40.0;
        let last = (PERCENTILES.len() - 1) as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("Latency percentiles at a fixed rate, {conns} connection(s)"),
                ("sans-serif", 22),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.2f64..last + 0.2, (low..high).log_scale())
            .map_err(|e| anyhow!("{e}"))?;
        chart
            .configure_mesh()
            .x_labels(PERCENTILES.len())
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    PERCENTILES
                        .get(i as usize)
                        .map_or(String::new(), |(name, _)| (*name).to_owned())
                } else {
                    String::new()
                }
            })
            .y_desc("latency (ms)")
            .y_label_formatter(&|y| format!("{y}"))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
        for (i, (name, s)) in series.iter().enumerate() {
            let Some(point) = s.at(conns) else { continue };
            let color = Palette99::pick(i).to_rgba();
            let line: Vec<(f64, f64)> = point
                .fixed
                .latency_ms
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite() && **v > 0.0)
                .map(|(x, v)| (x as f64, *v))
                .collect();
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(|e| anyhow!("{e}"))?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow!("{e}"))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| anyhow!("{e}"))?;
    }
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

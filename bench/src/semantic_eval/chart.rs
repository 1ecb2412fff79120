//! The precision–recall chart as a hand-written SVG (no font files, no plotting crate needed):
//! precision, recall and false-hit rate against the threshold, the default marked.

use std::fmt::Write as _;

use super::measure::Counts;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 160.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;

fn x(threshold: f32) -> f64 {
    LEFT + (f64::from(threshold) - 0.80) / 0.18 * (W - LEFT - RIGHT)
}

fn y(value: f64) -> f64 {
    TOP + (1.0 - value) * (H - TOP - BOTTOM)
}

/// A plotted measure: its name, colour and value at one threshold.
type Series = (&'static str, &'static str, fn(&Counts) -> f64);

pub fn svg(counts: &[Counts], chosen: Option<f32>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    for i in 0..=10 {
        let v = f64::from(i) / 10.0;
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.1}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y(v) + 4.0,
            y = y(v)
        );
    }
    for t in (80..=98).step_by(2) {
        let t = t as f32 / 100.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{t:.2}</text>"#,
            x(t),
            H - BOTTOM + 18.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">similarity threshold</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 10.0
    );
    let series: [Series; 3] = [
        ("precision", "#1f77b4", Counts::precision),
        ("recall", "#2ca02c", Counts::recall),
        ("false-hit rate", "#d62728", Counts::false_hit_rate),
    ];
    for (i, (name, colour, value)) in series.iter().enumerate() {
        let points: Vec<String> = counts
            .iter()
            .map(|c| format!("{:.1},{:.1}", x(c.threshold), y(value(c))))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        let ly = TOP + 20.0 * i as f64 + 10.0;
        let _ = writeln!(
            out,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{name}</text>"#,
            W - RIGHT + 10.0,
            W - RIGHT + 30.0,
            W - RIGHT + 36.0,
            ly + 4.0
        );
    }
    if let Some(t) = chosen {
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" x2="{x:.1}" y1="{TOP}" y2="{}" stroke="black" stroke-dasharray="4 3"/><text x="{:.1}" y="{}">default {t:.2}</text>"#,
            H - BOTTOM,
            x(t) + 4.0,
            TOP - 8.0,
            x = x(t)
        );
    }
    out.push_str("</svg>\n");
    out
}

//! The operator's page: `service::Dashboard` rendered as one self-contained HTML document
//! (inline CSS and SVG, no script, no external asset, so it works offline and behind any
//! proxy). Numbers carry `data-*` attributes so a browser test can read them back. Pure: data
//! in, text out.

use std::fmt::Write as _;

use crate::service::{Dashboard, TenantRow};

const TIERS: [&str; 3] = ["edge", "origin", "upstream"];
const COLORS: [&str; 3] = ["#2b8a3e", "#1c7ed6", "#e8590c"];

/// The whole page. `refresh_secs` makes the browser reload it.
pub fn render(d: &Dashboard, refresh_secs: u32) -> String {
    let mut h = String::with_capacity(32 * 1024);
    let _ = write!(
        h,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{refresh_secs}">
<title>Gateway: the last hour</title>
<style>
body{{font:14px system-ui,sans-serif;margin:24px;color:#212529;background:#f8f9fa}}
h1{{font-size:20px;margin:0 0 4px}} h2{{font-size:16px;margin:24px 0 8px}}
table{{border-collapse:collapse;background:#fff}} td,th{{padding:4px 10px;border:1px solid #dee2e6;text-align:right}}
th:first-child,td:first-child{{text-align:left}} .muted{{color:#868e96}}
.legend span{{display:inline-block;width:10px;height:10px;margin:0 4px 0 12px}}
svg{{background:#fff;border:1px solid #dee2e6}} a{{color:#1c7ed6}}
.warn{{background:#fff3bf;padding:8px;border:1px solid #fab005}}
</style></head><body>
<h1>Which tier answers: the last hour</h1>
<div class="muted">Read at <span data-field="now">{now}</span> (unix seconds). Shared across replicas (Redis);
edge answers arrive through the usage ingest, within its batching delay. Showing:
<b data-field="selected">{selected}</b> (<a href="?">everyone</a>)</div>
"#,
        now = d.now,
        selected = escape(if d.selected == "*" {
            "every tenant"
        } else {
            &d.selected
        }),
    );
    if !d.series_available {
        h.push_str(
            r#"<p class="warn">Redis did not answer: the traffic series are unavailable.</p>"#,
        );
    }

    h.push_str("<h2>Answers by tier, per tenant</h2><table><tr><th>tenant</th>");
    for tier in TIERS {
        let _ = write!(h, "<th>{tier}</th>");
    }
    h.push_str(
        "<th>edge share</th><th>cache hits</th><th>tokens saved</th><th>est. cost saved</th></tr>",
    );
    for row in &d.tenants {
        tenant_row(&mut h, row);
    }
    h.push_str("</table>");

    let _ = write!(
        h,
        r#"<h2>Share of answers by tier, per minute</h2><div class="legend">{}</div>"#,
        TIERS
            .iter()
            .zip(COLORS)
            .map(|(t, c)| format!(r#"<span style="background:{c}"></span>{t}"#))
            .collect::<String>()
    );
    share_chart(&mut h, d);

    h.push_str("<h2>Tokens and estimated cost saved, per minute</h2>");
    saved_chart(&mut h, d);

    h.push_str("<h2>Latency by tier (the hour)</h2><table><tr><th>tier</th><th>answers</th><th>mean</th><th>p50 ≤</th><th>p99 ≤</th></tr>");
    for l in &d.latency {
        let _ = write!(
            h,
            r#"<tr><td>{tier}</td><td data-latency="{tier}" data-field="answers">{n}</td><td>{mean}</td><td>{p50}</td><td>{p99}</td></tr>"#,
            tier = l.tier,
            n = l.answers,
            mean = ms(l.mean_ms),
            p50 = ms(l.p50_le_ms),
            p99 = ms(l.p99_le_ms),
        );
    }
    h.push_str("</table>");

    let r = &d.replication;
    let _ = write!(
        h,
        r#"<h2>Replication to the edge (this replica's view of the shared log)</h2><table>
<tr><td>entries waiting</td><td data-field="queue_depth">{}</td></tr>
<tr><td>purges waiting</td><td data-field="purge_queue_depth">{}</td></tr>
<tr><td>mean lag (offer to KV write)</td><td data-field="lag_mean">{}</td></tr>
<tr><td>entries written</td><td data-field="written">{}</td></tr>
<tr><td>entries dropped</td><td data-field="dropped">{}</td></tr></table>
<p class="muted">Also at <a href="/metrics">/metrics</a> and as JSON at <a href="/dashboard.json">/dashboard.json</a>.</p>
</body></html>"#,
        r.queue_depth,
        r.purge_queue_depth,
        r.lag_mean_secs
            .map_or("–".to_owned(), |s| format!("{:.2} s", s)),
        r.written,
        r.dropped,
    );
    h
}

fn tenant_row(h: &mut String, row: &TenantRow) {
    let t = escape(&row.tenant);
    let _ = write!(
        h,
        r#"<tr data-tenant="{t}"><td><a href="?tenant={t}">{t}</a></td>"#
    );
    for (tier, n) in TIERS.iter().zip(row.answers) {
        let _ = write!(h, r#"<td data-field="answers_{tier}">{n}</td>"#);
    }
    let _ = write!(
        h,
        r#"<td data-field="edge_share">{:.1}%</td><td data-field="hits">{}</td><td data-field="saved_tokens">{}</td><td data-field="saved_dollars">${:.6}</td></tr>"#,
        row.edge_share() * 100.0,
        row.hits.iter().sum::<u64>(),
        row.saved_tokens,
        row.saved_dollars,
    );
}

const W: f64 = 720.0;
const H: f64 = 160.0;

/// Stacked bars: each minute's answers split by tier, as shares of that minute (100% high).
fn share_chart(h: &mut String, d: &Dashboard) {
    let n = d.minutes.len().max(1) as f64;
    let bar = W / n;
    let _ = write!(
        h,
        r#"<svg width="{W}" height="{H}" role="img" aria-label="share of answers by tier">"#
    );
    for (i, m) in d.minutes.iter().enumerate() {
        let total: u64 = m.answers.iter().sum();
        if total == 0 {
            continue;
        }
        let mut y = H;
        for (k, count) in m.answers.iter().enumerate() {
            let height = H * *count as f64 / total as f64;
            y -= height;
            let _ = write!(
                h,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{height:.1}" fill="{}"><title>{}: {count} of {total}</title></rect>"#,
                i as f64 * bar,
                (bar - 1.0).max(1.0),
                COLORS[k],
                TIERS[k],
            );
        }
    }
    h.push_str("</svg>");
}

/// Bars of tokens saved per minute, scaled to the hour's busiest minute.
fn saved_chart(h: &mut String, d: &Dashboard) {
    let n = d.minutes.len().max(1) as f64;
    let bar = W / n;
    let peak = d
        .minutes
        .iter()
        .map(|m| m.saved_tokens)
        .max()
        .unwrap_or(0)
        .max(1);
    let tokens: u64 = d.minutes.iter().map(|m| m.saved_tokens).sum();
    let dollars: f64 = d.minutes.iter().map(|m| m.saved_dollars).sum();
    let _ = write!(
        h,
        r#"<div>Selection total: <b data-field="selected_saved_tokens">{tokens}</b> tokens, <b>${dollars:.6}</b> estimated (busiest minute {peak}).</div><svg width="{W}" height="{H}" role="img" aria-label="tokens saved per minute">"#
    );
    for (i, m) in d.minutes.iter().enumerate() {
        let height = H * m.saved_tokens as f64 / peak as f64;
        let _ = write!(
            h,
            r##"<rect x="{:.1}" y="{:.1}" width="{:.1}" height="{height:.1}" fill="#5f3dc4"><title>{} tokens, ${:.6}</title></rect>"##,
            i as f64 * bar,
            H - height,
            (bar - 1.0).max(1.0),
            m.saved_tokens,
            m.saved_dollars,
        );
    }
    h.push_str("</svg>");
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "–".to_owned(),
        Some(v) if v.is_infinite() => "slower".to_owned(),
        Some(v) => format!("{v:.2} ms"),
    }
}

/// Text for HTML: tenant ids are already restricted, but nothing reaches the page unescaped.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::{Minute, Replication, TierLatency};

    #[test]
    fn the_page_carries_each_number_in_a_data_attribute_and_needs_nothing_external() {
        let d = Dashboard {
            now: 1_800_000_000,
            selected: "*".into(),
            tenants: vec![TenantRow {
                tenant: "acme".into(),
                answers: [100, 3, 1],
                hits: [100, 3, 0],
                saved_tokens: 700,
                saved_dollars: 0.0042,
            }],
            minutes: vec![Minute {
                at: 1_799_999_940,
                answers: [100, 3, 1],
                saved_tokens: 700,
                saved_dollars: 0.0042,
            }],
            latency: vec![TierLatency {
                tier: "edge",
                answers: 100,
                mean_ms: Some(1.5),
                p50_le_ms: Some(5.0),
                p99_le_ms: Some(f64::INFINITY),
            }],
            replication: Replication::default(),
            series_available: true,
        };
        let page = render(&d, 15);
        assert!(
            page.contains(r#"<td data-field="answers_edge">100</td>"#),
            "{page}"
        );
        assert!(
            page.contains(r#"<td data-field="edge_share">96.2%</td>"#),
            "{page}"
        );
        assert!(page.contains(r#"<td data-field="saved_tokens">700</td>"#));
        assert!(page.contains("slower"));
        assert!(
            !page.contains("http://") && !page.contains("https://") && !page.contains("<script")
        );
    }
}

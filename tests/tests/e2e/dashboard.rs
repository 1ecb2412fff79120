//! The operator's dashboard in a real browser: headless Chromium (Debian's `chromium`) loads
//! `/dashboard` from a stack that served traffic through every tier, the numbers it shows are
//! read back from the rendered page and compared with `/metrics`, and a screenshot is kept in
//! `target/e2e-artifacts/dashboard.png`.

use std::process::Command;
use std::time::Duration;

use gateway_e2e::stack::{ACME, ADMIN_TOKEN, Stack, StackOptions, header};
use gateway_e2e::{eventually, eventually_async, repo_root};

/// Chromium, headless, with `args` and `url`; its stdout. Fails loudly when it is missing.
fn chromium(args: &[&str], url: &str) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1100,1500",
        ])
        .args(args)
        .arg(url)
        .output()
        .expect("chromium is installed (just setup installs Debian's chromium)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the first element carrying `attrs` after `anchor` in `dom`.
fn cell(dom: &str, anchor: &str, attrs: &str) -> String {
    let from = dom
        .find(anchor)
        .unwrap_or_else(|| panic!("{anchor} not in the page"));
    let rest = &dom[from..];
    let at = rest
        .find(attrs)
        .unwrap_or_else(|| panic!("{attrs} not after {anchor}"));
    let text = &rest[at..];
    let open = text.find('>').expect("tag end") + 1;
    let close = text[open..].find('<').expect("text end");
    text[open..open + close].trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_in_a_browser_shows_what_the_metrics_count() {
    let stack = Stack::start_with(StackOptions {
        usage: true,
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");
    // Every tier answers: a provider miss, an origin hit, then edge hits.
    let prompt = "shown on the dashboard";
    assert_eq!(
        header(&stack.edge_chat(ACME, prompt).await, "x-cache"),
        "MISS"
    );
    stack.settle().await;
    stack.edge_chat(ACME, prompt).await;
    stack.settle().await;
    for _ in 0..12 {
        let hit = stack.edge_chat(ACME, prompt).await;
        assert_eq!(header(&hit, "x-cache-layer"), "edge");
    }
    stack.settle().await;
    let edge = ["outcome=\"hit\"", "tenant=\"acme\"", "tier=\"edge\""];
    eventually(
        "the edge's usage of 12 hits",
        Duration::from_secs(10),
        || stack.metric("gateway_answers_total", &edge) >= 12.0,
    )
    .await;
    // The traffic series reach Redis with the next flush (every second, retried on the next
    // tick if it fails): wait until the page's data shows every answer the metrics count.
    let counted = stack.metric("gateway_answers_total", &["tenant=\"acme\""]);
    let what = format!("the dashboard data showing the {counted} answers /metrics counts for acme");
    eventually_async(&what, Duration::from_secs(15), || async {
        let data: serde_json::Value = stack
            .http
            .get(format!("{}/dashboard.json", stack.origin_url))
            .basic_auth("admin", Some(ADMIN_TOKEN))
            .send()
            .await
            .expect("the origin answers")
            .json()
            .await
            .expect("JSON");
        let shown: f64 = data["tenants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| t["tenant"] == "acme")
            .flat_map(|t| t["answers"].as_array().cloned().unwrap_or_default())
            .filter_map(|n| n.as_f64())
            .sum();
        shown == counted
    })
    .await;

    let base = stack.origin_url.trim_start_matches("http://");
    let url = format!("http://admin:{ADMIN_TOKEN}@{base}/dashboard");
    let dom = tokio::task::spawn_blocking({
        let url = url.clone();
        move || chromium(&["--dump-dom"], &url)
    })
    .await
    .unwrap();
    let row = r#"data-tenant="acme""#;
    for tier in ["edge", "origin", "upstream"] {
        let shown: f64 = cell(&dom, row, &format!(r#"data-field="answers_{tier}""#))
            .parse()
            .unwrap();
        let tier_label = format!("tier=\"{tier}\"");
        let per_tier = stack.metric("gateway_answers_total", &["tenant=\"acme\"", &tier_label]);
        assert_eq!(shown, per_tier, "answers by {tier}: page vs /metrics");
    }
    let saved: f64 = cell(&dom, row, r#"data-field="saved_tokens""#)
        .parse()
        .unwrap();
    assert_eq!(
        saved,
        stack.metric("gateway_tokens_saved_total", &["tenant=\"acme\""]),
        "tokens saved: page vs /metrics"
    );
    assert!(saved > 0.0);
    println!(
        "dashboard shows acme: {} edge answers, {saved} tokens saved",
        cell(&dom, row, r#"data-field="answers_edge""#)
    );

    let artifacts = repo_root().join("target/e2e-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let png = artifacts.join("dashboard.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    tokio::task::spawn_blocking(move || chromium(&[&shot], &url))
        .await
        .unwrap();
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "a screenshot of the page ({size} bytes)");
    println!("screenshot: {}", png.display());
}

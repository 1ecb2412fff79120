//! The edge's KV-hit path under Viceroy against the bare Compute service under Viceroy, both
//! answering the bytes of `hit.json`: the bench seeds the edge's KV store with an entry whose
//! body is exactly those bytes. The edge runs twice: as deployed (one usage record per request
//! to the `usage` log endpoint, which Viceroy writes to its output) and with `usage_log` off,
//! so the report shows what metering costs a hit in the same run; once more with the same
//! entry unsealed (entry version 1, as before sealing), so the report shows what opening a
//! sealed entry costs a hit; and with a `baseline`, an earlier revision's edge wasm serves the
//! unsealed entry as one more subject. Starts and stops the Viceroys.

use std::path::Path;

use anyhow::{Context, bail};
use gateway_common::entry::ENTRY_VERSION;
use gateway_e2e::edge::{Edge, EdgeConfig};
use gateway_e2e::entry::{kv_seed, kv_seed_plain};
use gateway_e2e::free_port;
use gateway_e2e::stack::SECRET;

use crate::baseline::Baseline;
use crate::compare::{self, Comparison};
use crate::cpu::Process;
use crate::origin_hit::{API_KEY, HIT_REQUEST, hit_entry, json_target};
use crate::viceroy::{HIT_BODY, start_bare};

pub async fn run(
    settings: &compare::Settings,
    scratch: &Path,
    baseline: Option<&Baseline>,
) -> anyhow::Result<Comparison> {
    let (_, entry) = hit_entry(ENTRY_VERSION, HIT_BODY)?;
    // A hit never reaches the origin; its backend points at a closed port, so a miss would
    // show up as an error in the figures rather than pass unnoticed.
    let mut config = EdgeConfig::new(format!("http://127.0.0.1:{}", free_port()?), SECRET);
    config.kv = vec![kv_seed(&entry)];
    config.populate_on_fallback = false;
    let mut quiet = config.clone();
    quiet.usage_log = false;
    let mut unsealed = config.clone();
    unsealed.kv = vec![kv_seed_plain(&entry)];
    // The earlier revision predates sealing: it reads the unsealed entry.
    let earlier_config = unsealed.clone();
    let earlier_wasm = baseline.map(|b| b.edge_wasm.clone());
    let (edge, unlogged, plain, bare, earlier) = tokio::task::spawn_blocking(move || {
        let edge = Edge::start(&config)?;
        let unlogged = Edge::start(&quiet)?;
        let plain = Edge::start(&unsealed)?;
        let bare = start_bare()?;
        // The earlier revision's edge, as deployed (usage log on).
        let earlier = earlier_wasm
            .map(|wasm| Edge::start_with_wasm(&earlier_config, &wasm))
            .transpose()?;
        anyhow::Ok((edge, unlogged, plain, bare, earlier))
    })
    .await??;
    let earlier_url = earlier
        .as_ref()
        .map(|e| format!("{}/v1/chat/completions", e.url()));
    let edge_url = format!("{}/v1/chat/completions", edge.url());
    let unlogged_url = format!("{}/v1/chat/completions", unlogged.url());
    let plain_url = format!("{}/v1/chat/completions", plain.url());
    let bare_url = format!("{}/v1/chat/completions", bare.url());

    let http = reqwest::Client::new();
    let mut answering = vec![
        ("edge", &edge_url),
        ("edge", &unlogged_url),
        ("edge", &plain_url),
        ("bare service", &bare_url),
    ];
    if let Some(url) = &earlier_url {
        answering.push(("edge", url));
    }
    for (name, url) in answering {
        let resp = http
            .post(url)
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(HIT_REQUEST)
            .send()
            .await?;
        let cache = resp
            .headers()
            .get("x-cache")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned();
        let body = resp.bytes().await?;
        if body.as_ref() != HIT_BODY {
            bail!(
                "the {name} does not answer the cached bytes (x-cache: {cache}):\n{}",
                String::from_utf8_lossy(&body)
            );
        }
        if name == "edge" && cache != "HIT" {
            bail!("the edge's answer was not a hit (x-cache: {cache})");
        }
    }

    let body = scratch.join("hit-request.json");
    std::fs::write(&body, HIT_REQUEST)?;
    let floor = json_target("bare Compute (Viceroy)", bare_url, Some(API_KEY), &body)
        .serving(viceroy(&bare)?);
    // The first subject is the one the report judges: the edge as deployed, usage log on.
    let subject = json_target("edge KV hit (Viceroy)", edge_url, Some(API_KEY), &body)
        .serving(viceroy(&edge)?);
    let without = json_target(
        "edge KV hit, usage log off (Viceroy)",
        unlogged_url,
        Some(API_KEY),
        &body,
    )
    .serving(viceroy(&unlogged)?);
    let unsealed = json_target(
        "edge KV hit, entry unsealed (v1) (Viceroy)",
        plain_url,
        Some(API_KEY),
        &body,
    )
    .serving(viceroy(&plain)?);
    let mut subjects = vec![subject, without, unsealed];
    if let (Some(url), Some(baseline), Some(earlier)) = (earlier_url, baseline, &earlier) {
        subjects.push(
            json_target(
                &baseline.label("edge KV hit (Viceroy)"),
                url,
                Some(API_KEY),
                &body,
            )
            .serving(viceroy(earlier)?),
        );
    }
    if let Some(baseline) = baseline {
        subjects = baseline.select(subjects);
    }
    let settings = settings.clone();
    let comparison = tokio::task::spawn_blocking(move || {
        compare::compare(&settings, "edge hit", &floor, &subjects)
    })
    .await??;
    if !edge.log().contains("usage :: ") {
        bail!("the edge under test wrote no usage records");
    }
    drop((edge, unlogged, plain, bare, earlier));
    Ok(comparison)
}

/// The Viceroy process serving `edge`, whose CPU a hit costs (the guest runs inside it).
fn viceroy(edge: &Edge) -> anyhow::Result<Vec<Process>> {
    Ok(vec![Process::new(
        "viceroy",
        edge.pid().context("Viceroy stopped")?,
    )])
}

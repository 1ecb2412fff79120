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
use gateway_e2e::stack::{SECRET, header};

use crate::baseline::Baseline;
use crate::compare::{self, Comparison};
use crate::cpu::Process;
use crate::origin_hit::{API_KEY, HIT_REQUEST, hit_entry, json_target};
use crate::viceroy::{HIT_BODY, start_bare};

/// The edge as deployed holding the hit's entry sealed, and the same edge holding it unsealed
/// (entry version 1, as before sealing). A hit never reaches the origin; the backend points at
/// a closed port, so a miss shows up as an error in the figures rather than pass unnoticed.
pub fn hit_configs() -> anyhow::Result<(EdgeConfig, EdgeConfig)> {
    let (_, entry) = hit_entry(ENTRY_VERSION, HIT_BODY)?;
    let mut sealed = EdgeConfig::new(format!("http://127.0.0.1:{}", free_port()?), SECRET);
    sealed.kv = vec![kv_seed(&entry)];
    sealed.populate_on_fallback = false;
    let mut unsealed = sealed.clone();
    unsealed.kv = vec![kv_seed_plain(&entry)];
    Ok((sealed, unsealed))
}

/// Sends the hit request to `url` (an edge, or the bare service with `edge` false) and fails
/// unless the answer is `hit.json`'s bytes and, from an edge, a HIT.
pub async fn check_answer(
    http: &reqwest::Client,
    url: &str,
    name: &str,
    edge: bool,
) -> anyhow::Result<()> {
    let resp = http
        .post(url)
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(HIT_REQUEST)
        .send()
        .await?;
    let cache = header(&resp, "x-cache");
    let body = resp.bytes().await?;
    if body.as_ref() != HIT_BODY {
        bail!(
            "the {name} does not answer the cached bytes (x-cache: {cache}):\n{}",
            String::from_utf8_lossy(&body)
        );
    }
    if edge && cache != "HIT" {
        bail!("the {name}'s answer was not a hit (x-cache: {cache})");
    }
    Ok(())
}

pub async fn run(
    settings: &compare::Settings,
    scratch: &Path,
    baseline: Option<&Baseline>,
) -> anyhow::Result<Comparison> {
    let (config, unsealed) = hit_configs()?;
    let mut quiet = config.clone();
    quiet.usage_log = false;
    // The earlier revision predates sealing: it reads the unsealed entry.
    let earlier_config = unsealed.clone();
    let earlier = baseline.map(|b| (b.label("edge KV hit (Viceroy)"), b.edge_wasm.clone()));
    // Only what is measured is started: `--judged-only` leaves the other subjects out.
    let judged_only = Baseline::judged_only(baseline);
    let (bare, edges) = tokio::task::spawn_blocking(move || {
        let bare = start_bare()?;
        // The first is the one the report judges: the edge as deployed, usage log on.
        let mut edges = vec![("edge KV hit (Viceroy)".to_owned(), Edge::start(&config)?)];
        if !judged_only {
            edges.push((
                "edge KV hit, usage log off (Viceroy)".to_owned(),
                Edge::start(&quiet)?,
            ));
            edges.push((
                "edge KV hit, entry unsealed (v1) (Viceroy)".to_owned(),
                Edge::start(&unsealed)?,
            ));
        }
        // The earlier revision's edge, as deployed (usage log on).
        if let Some((name, wasm)) = earlier {
            edges.push((name, Edge::start_with_wasm(&earlier_config, &wasm)?));
        }
        anyhow::Ok((bare, edges))
    })
    .await??;
    let url = |edge: &Edge| format!("{}/v1/chat/completions", edge.url());

    let http = reqwest::Client::new();
    let answering = edges
        .iter()
        .map(|(_, edge)| ("edge", edge))
        .chain([("bare service", &bare)]);
    for (name, answering) in answering {
        check_answer(&http, &url(answering), name, name == "edge").await?;
    }

    let body = scratch.join("hit-request.json");
    std::fs::write(&body, HIT_REQUEST)?;
    let floor = json_target("bare Compute (Viceroy)", url(&bare), Some(API_KEY), &body)
        .serving(viceroy(&bare)?);
    let subjects = edges
        .iter()
        .map(|(name, edge)| {
            anyhow::Ok(json_target(name, url(edge), Some(API_KEY), &body).serving(viceroy(edge)?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let settings = settings.clone();
    let comparison = tokio::task::spawn_blocking(move || {
        compare::compare(&settings, "edge hit", &floor, &subjects)
    })
    .await??;
    if !edges[0].1.log().contains("usage :: ") {
        bail!("the edge under test wrote no usage records");
    }
    drop((bare, edges));
    Ok(comparison)
}

/// The Viceroy process serving `edge`, whose CPU a hit costs (the guest runs inside it).
fn viceroy(edge: &Edge) -> anyhow::Result<Vec<Process>> {
    Ok(vec![Process::new(
        "viceroy",
        edge.pid().context("Viceroy stopped")?,
    )])
}

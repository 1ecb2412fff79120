//! The gateway's overhead on a miss: the mock provider with a fixed latency alone (the floor),
//! then the origin in front of it, then the edge in front of the origin, every request with a
//! prompt not seen before. Starts and stops Redis, the provider, the origin and Viceroy.

use std::path::Path;
use std::time::Duration;

use anyhow::bail;
use gateway_e2e::edge::{Edge, EdgeConfig};
use gateway_e2e::stack::SECRET;
use gateway_fixtures::{MockProvider, ProviderConfig, RedisServer};

use crate::compare::{self, Comparison};
use crate::load::{Body, Target};
use crate::origin::{OriginConfig, OriginProcess};
use crate::origin_hit::API_KEY;

/// What this part produced.
pub struct Miss {
    pub comparison: Comparison,
    pub provider_latency_ms: u64,
    /// Provider calls made for the origin and edge runs, and the requests those runs sent
    /// (answered, warm-up included): their ratio is the share of misses.
    pub gateway_provider_calls: u64,
    pub gateway_requests: u64,
}

fn target(name: &str, url: String, key: &str, dir: &Path) -> Target {
    Target {
        name: name.to_owned(),
        url,
        headers: vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("authorization".to_owned(), format!("Bearer {key}")),
        ],
        body: Body::Distinct(dir.to_path_buf()),
        processes: Vec::new(),
    }
}

pub async fn run(
    settings: &compare::Settings,
    scratch: &Path,
    workers: usize,
    provider_latency_ms: u64,
) -> anyhow::Result<Miss> {
    let redis = RedisServer::start()?;
    let provider = MockProvider::start(ProviderConfig {
        latency_ms: provider_latency_ms,
        ..ProviderConfig::default()
    })
    .await?;
    let config = OriginConfig::single(redis.url(), provider.base_url(), workers);
    let origin = tokio::task::spawn_blocking(move || OriginProcess::start(&config)).await??;
    let mut edge_config = EdgeConfig::new(origin.url(), SECRET);
    // As in production: the edge's KV store is written by the origin's dual-write, not here.
    edge_config.populate_on_fallback = false;
    let edge = tokio::task::spawn_blocking(move || Edge::start(&edge_config)).await??;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let provider_url = format!("{}/chat/completions", provider.base_url());
    let origin_url = format!("{}/v1/chat/completions", origin.url());
    let edge_url = format!("{}/v1/chat/completions", edge.url());
    let http = reqwest::Client::new();
    for (name, url, key) in [
        ("provider", &provider_url, "sk-bench"),
        ("origin", &origin_url, API_KEY),
        ("edge", &edge_url, API_KEY),
    ] {
        let resp = http
            .post(url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"miss check"}]}"#)
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!(
                "the {name} answered {} before the miss benchmark",
                resp.status()
            );
        }
    }

    let floor = target(
        &format!("mock provider alone ({provider_latency_ms} ms)"),
        provider_url,
        "sk-bench",
        scratch,
    );
    let subjects = [
        target("origin miss", origin_url, API_KEY, scratch),
        target("edge + origin miss", edge_url, API_KEY, scratch),
    ];
    let calls_before = provider.calls();
    let comparison = {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || {
            compare::compare(&settings, "miss overhead", &floor, &subjects)
        })
        .await??
    };
    let all_calls = provider.calls() - calls_before;
    let floor_requests = comparison.floor_requests();
    let gateway_requests: u64 = comparison.subjects.iter().map(|s| s.requests()).sum();
    drop(edge);
    drop(origin);
    provider.stop().await;
    drop(redis);
    Ok(Miss {
        comparison,
        provider_latency_ms,
        gateway_provider_calls: all_calls.saturating_sub(floor_requests),
        gateway_requests,
    })
}

//! End-to-end test harness: starts the real processes (Redis, mock provider, fake Fastly API,
//! origin in-process or as N replica processes behind a round-robin proxy, Viceroy) on free
//! ports and stops them afterwards.

pub mod blackhole;
pub mod edge;
pub mod entry;
pub mod origin_binary;
pub mod origin_config;
pub mod regions;
pub mod replica_stack;
pub mod replicas;
pub mod sdk_script;
pub mod sse;
pub mod stack;

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use gateway_common::tenant::TenantsFile;
pub use gateway_fixtures::{RedisDeployment, RedisKind, RedisServer, free_port};

/// Which Redis the e2e stacks run on: `GATEWAY_E2E_REDIS=cluster` for a six-node Redis
/// Cluster, a single node otherwise. The one place the harness reads it (`just test-cluster`).
pub fn redis_kind() -> RedisKind {
    RedisKind::parse(std::env::var("GATEWAY_E2E_REDIS").ok().as_deref())
}

/// Polls `done` every 20 ms until it holds; fails naming `what` after `within`.
pub async fn eventually(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    eventually_async(what, within, || std::future::ready(done())).await;
}

/// [`eventually`] for a condition that has to ask a server.
pub async fn eventually_async<F: Future<Output = bool>>(
    what: &str,
    within: Duration,
    mut done: impl FnMut() -> F,
) {
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The workspace root (where `fastly.toml` and `fixtures/` live).
pub fn repo_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The edge's Config Store `tenants` as a flat JSON object, sorted by key digest, one entry
/// per API key: what `fastly.toml` loads locally and what an operator uploads in production.
pub fn edge_tenants_json(tenants_file: &[u8]) -> anyhow::Result<String> {
    let file = TenantsFile::parse(tenants_file)
        .map_err(anyhow::Error::msg)
        .context("invalid tenants file")?;
    let entries: std::collections::BTreeMap<String, String> =
        file.config_store_entries().into_iter().collect();
    Ok(serde_json::to_string_pretty(&entries)?)
}

//! The origin's Redis-hit path against a bare actix-web handler answering the same bytes, and
//! the origin's peak RSS under that load; in the same run, the same hit with the other
//! `redis.pool` (deadpool-redis or our multiplexed manager), on a six-node Redis Cluster, and
//! with the entry unsealed (entry version 1, as before sealing: what opening costs a hit).
//! With `peers`, LiteLLM's Redis-cache hit joins as a second comparison in the same run; with a
//! `baseline`, an earlier revision's origin joins as one more subject.
//! Starts and stops everything it uses.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, bail};
use gateway_common::entry::{Entry, Envelope, PLAIN_VERSION};
use gateway_common::key::CacheKey;
use gateway_common::route::Route;
use gateway_e2e::entry::now;
use gateway_e2e::stack::key_for;
use gateway_fixtures::{MockProvider, ProviderConfig, RedisCluster, RedisServer};
use gateway_origin::settings::{RedisPool, Settings};

use crate::baseline::Baseline;
use crate::compare::{self, Comparison};
use crate::cpu::Process;
use crate::floor::BareActix;
use crate::load::{Body, Target};
use crate::origin::{OriginConfig, OriginProcess};
use crate::peers::LiteLlm;
use crate::report::Memory;

/// The request every hit benchmark sends (the same for origin, floor and peers).
pub const HIT_REQUEST: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Benchmark the hit path."}]}"#;

/// API key of the fixture tenant `acme`.
pub const API_KEY: &str = "sk-dev-acme";

/// What this part produced.
pub struct OriginHit {
    pub comparison: Comparison,
    pub memory: Memory,
    /// LiteLLM against the same floor, when asked for.
    pub peers: Option<Comparison>,
    /// Provider calls during the peer runs (0 when every answer was a cache hit).
    pub peer_provider_calls: u64,
    /// Provider calls during the measured runs (0 when every answer was a hit).
    pub provider_calls: u64,
}

pub fn json_target(name: &str, url: String, key: Option<&str>, body: &Path) -> Target {
    let mut headers = vec![("content-type".to_owned(), "application/json".to_owned())];
    if let Some(key) = key {
        headers.push(("authorization".to_owned(), format!("Bearer {key}")));
    }
    Target {
        name: name.to_owned(),
        url,
        headers,
        body: Body::Fixed(body.to_path_buf()),
        processes: Vec::new(),
    }
}

pub async fn run(
    settings: &compare::Settings,
    scratch: &Path,
    workers: usize,
    litellm: Option<&Path>,
    baseline: Option<&Baseline>,
) -> anyhow::Result<OriginHit> {
    let redis = RedisServer::start()?;
    let provider = MockProvider::start(ProviderConfig::default()).await?;
    let config = OriginConfig::single(redis.url(), provider.base_url(), workers);
    let (default_pool, other_pool) = match Settings::for_tests().redis.pool {
        RedisPool::DeadpoolRedis => ("deadpool-redis", "multiplexed"),
        RedisPool::Multiplexed => ("multiplexed", "deadpool-redis"),
    };
    // The earlier revision's origin on the same Redis: its keys are its own, so the two never
    // answer each other's entries.
    let baseline_config = baseline.map(|b| OriginConfig {
        revision: Some((b.origin.clone(), b.tenants.clone())),
        ..config.clone()
    });
    // Only what is measured is started: `--judged-only` leaves the other subjects out.
    let others = if Baseline::judged_only(baseline) {
        None
    } else {
        Some(Others::start(&config, other_pool).await?)
    };
    let origin = tokio::task::spawn_blocking(move || OriginProcess::start(&config)).await??;
    let earlier = match baseline_config {
        Some(config) => {
            Some(tokio::task::spawn_blocking(move || OriginProcess::start(&config)).await??)
        }
        None => None,
    };
    let origin_url = format!("{}/v1/chat/completions", origin.url());
    let idle_rss_kib = origin.rss_kib()?;

    // Warm the entry and take the exact bytes a hit answers with.
    let http = reqwest::Client::new();
    let post = |url: &str, key: &str| {
        http.post(url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(HIT_REQUEST)
            .send()
    };
    // The exact bytes a hit answers with, from the default origin; the others must hit too.
    let bytes = warm_hit(&http, &origin, "default").await?;
    if let Some(others) = &others {
        others.warm(&http, &bytes).await?;
    }
    if let Some(process) = &earlier {
        warm_hit(&http, process, "baseline").await?;
    }
    let bare = BareActix::start(bytes.clone(), workers)?;
    let bare_answer = post(bare.url(), API_KEY).await?.bytes().await?;
    if bare_answer != bytes {
        bail!("the bare handler does not answer the origin's bytes");
    }

    let body = scratch.join("hit-request.json");
    std::fs::write(&body, HIT_REQUEST)?;
    // The floor runs inside this process: its CPU time is the bench's own (its other
    // threads are idle during a run).
    let floor = json_target(
        "bare actix-web",
        bare.url().to_owned(),
        Some(API_KEY),
        &body,
    )
    .serving(vec![Process::new("bench (floor)", std::process::id())]);
    let redis_pids = [redis.pid().context("redis stopped")?];
    // The first subject is the one the report judges: the default pool on one Redis node.
    let subject = json_target(
        &format!("origin Redis hit ({default_pool})"),
        origin_url.clone(),
        Some(API_KEY),
        &body,
    )
    .serving(serving(&origin, &redis_pids)?);
    let mut subjects = vec![subject.clone()];
    if let Some(others) = &others {
        subjects.extend(others.targets(&body, default_pool, other_pool, &redis_pids)?);
    }
    if let (Some(process), Some(baseline)) = (&earlier, baseline) {
        subjects.push(
            json_target(
                &baseline.label(&format!("origin Redis hit ({default_pool})")),
                format!("{}/v1/chat/completions", process.url()),
                Some(API_KEY),
                &body,
            )
            .serving(serving(process, &redis_pids)?),
        );
    }
    let calls_before = provider.calls();
    let comparison = {
        let (settings, floor) = (settings.clone(), floor.clone());
        tokio::task::spawn_blocking(move || {
            compare::compare(&settings, "origin hit", &floor, &subjects)
        })
        .await??
    };
    let provider_calls = provider.calls() - calls_before;
    let memory = Memory {
        origin_peak_rss_kib: origin.peak_rss_kib()?,
        origin_idle_rss_kib: idle_rss_kib,
        workers,
    };

    let mut peer_calls_before = provider.calls();
    let peers = match litellm {
        Some(litellm) => {
            let peer = LiteLlm::start(litellm, &provider.base_url(), &redis).await?;
            let peer_url = peer.chat_url();
            let peer_key = peer.api_key().to_owned();
            post(&peer_url, &peer_key)
                .await?
                .error_for_status()
                .context("LiteLLM's first answer")?
                .bytes()
                .await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = provider.calls();
            post(&peer_url, &peer_key)
                .await?
                .error_for_status()
                .context("LiteLLM's second answer")?
                .bytes()
                .await?;
            if provider.calls() != before {
                bail!("LiteLLM's second answer was not a cache hit (the provider was called)");
            }
            let peer_target = json_target("LiteLLM Redis hit", peer_url, Some(&peer_key), &body);
            let settings = settings.clone();
            peer_calls_before = provider.calls();
            let result = tokio::task::spawn_blocking(move || {
                compare::compare(&settings, "peer hit", &floor, &[subject, peer_target])
            })
            .await?
            .context("measuring LiteLLM");
            drop(peer);
            Some(result?)
        }
        None => None,
    };

    let peer_provider_calls = provider.calls() - peer_calls_before;
    bare.stop().await;
    drop(origin);
    drop(others);
    drop(earlier);
    provider.stop().await;
    drop(redis);
    Ok(OriginHit {
        comparison,
        memory,
        peers,
        peer_provider_calls,
        provider_calls,
    })
}

/// The subjects beside the judged one: the same origin with the pool that is not the default,
/// the default pool on a six-node cluster, and the default pool reading the entry unsealed.
struct Others {
    other: OriginProcess,
    cluster: RedisCluster,
    on_cluster: OriginProcess,
    plain_redis: RedisServer,
    unsealed: OriginProcess,
}

impl Others {
    async fn start(config: &OriginConfig, other_pool: &'static str) -> anyhow::Result<Others> {
        let cluster = tokio::task::spawn_blocking(RedisCluster::start).await??;
        let plain_redis = RedisServer::start()?;
        let other_config = OriginConfig {
            redis_pool: Some(other_pool),
            ..config.clone()
        };
        let cluster_config = OriginConfig {
            redis_cluster: cluster.urls(),
            ..config.clone()
        };
        let plain_config = OriginConfig {
            redis_url: plain_redis.url(),
            ..config.clone()
        };
        let other =
            tokio::task::spawn_blocking(move || OriginProcess::start(&other_config)).await??;
        let on_cluster =
            tokio::task::spawn_blocking(move || OriginProcess::start(&cluster_config)).await??;
        let unsealed =
            tokio::task::spawn_blocking(move || OriginProcess::start(&plain_config)).await??;
        Ok(Others {
            other,
            cluster,
            on_cluster,
            plain_redis,
            unsealed,
        })
    }

    /// Makes each answer the hit request with `bytes` (the default origin's answer) from
    /// Redis. The unsealed origin stores a sealed entry like any other; it is replaced by the
    /// same answer in the version-1 form, which every origin still reads.
    async fn warm(&self, http: &reqwest::Client, bytes: &[u8]) -> anyhow::Result<()> {
        for (name, process) in [("other pool", &self.other), ("cluster", &self.on_cluster)] {
            warm_hit(http, process, name).await?;
        }
        warm_hit(http, &self.unsealed, "unsealed").await?;
        unseal(&self.plain_redis, bytes)?;
        if warm_hit(http, &self.unsealed, "unsealed").await? != bytes {
            bail!("the unsealed entry does not answer the same bytes");
        }
        Ok(())
    }

    fn targets(
        &self,
        body: &Path,
        default_pool: &str,
        other_pool: &str,
        redis_pids: &[u32],
    ) -> anyhow::Result<Vec<Target>> {
        let target = |name: String, process: &OriginProcess, redis: &[u32]| {
            anyhow::Ok(
                json_target(
                    &name,
                    format!("{}/v1/chat/completions", process.url()),
                    Some(API_KEY),
                    body,
                )
                .serving(serving(process, redis)?),
            )
        };
        Ok(vec![
            target(
                format!("origin Redis hit ({other_pool})"),
                &self.other,
                redis_pids,
            )?,
            target(
                format!("origin Redis Cluster hit ({default_pool})"),
                &self.on_cluster,
                &self.cluster.pids(),
            )?,
            target(
                format!("origin Redis hit, entry unsealed (v1) ({default_pool})"),
                &self.unsealed,
                &[self.plain_redis.pid().context("redis stopped")?],
            )?,
        ])
    }
}

/// The processes whose CPU a hit of `origin` costs: the origin and the Redis nodes it reads.
fn serving(origin: &OriginProcess, redis: &[u32]) -> anyhow::Result<Vec<Process>> {
    let mut processes = vec![Process::new(
        "origin",
        origin.pid().context("the origin stopped")?,
    )];
    processes.extend(redis.iter().map(|&pid| Process::new("redis", pid)));
    Ok(processes)
}

/// The entry that answers the hit request for tenant `acme`: `body`, written now, in envelope
/// version `v` (sealed or plain).
pub fn hit_entry(v: u32, body: &[u8]) -> anyhow::Result<(CacheKey, Entry)> {
    let request: serde_json::Value = serde_json::from_str(HIT_REQUEST)?;
    let key = key_for("acme", Route::ChatCompletions, &request);
    let entry = Entry {
        envelope: Envelope {
            v,
            tenant: "acme".to_owned(),
            key: key.hex().to_owned(),
            created: now(),
            ttl: 86_400,
            status: 200,
            content_type: "application/json".to_owned(),
            model: "gpt-4o-mini".to_owned(),
            provider: "mock".to_owned(),
            usage: None,
            generation: 0,
        },
        body: body.to_vec(),
    };
    Ok((key, entry))
}

/// Overwrites the hit request's entry in `redis` with the same answer (`body`) in the plain
/// version-1 form.
pub(crate) fn unseal(redis: &RedisServer, body: &[u8]) -> anyhow::Result<()> {
    let (key, entry) = hit_entry(PLAIN_VERSION, body)?;
    let plain = String::from_utf8(entry.encode_plain()?)?;
    redis.cli(&["SET", &key.redis_key(), &plain, "EX", "86400"])?;
    Ok(())
}

/// Asks `process` the hit request twice (a miss that stores it, then the hit) and returns the
/// hit's body; an error with the origin's log when the second answer is not a hit.
pub(crate) async fn warm_hit(
    http: &reqwest::Client,
    process: &OriginProcess,
    name: &str,
) -> anyhow::Result<bytes::Bytes> {
    let url = format!("{}/v1/chat/completions", process.url());
    let post = || {
        http.post(&url)
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(HIT_REQUEST)
            .send()
    };
    post().await?.bytes().await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let hit = post().await?;
    let cache = hit
        .headers()
        .get("x-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    if cache != "HIT" {
        bail!(
            "the {name} origin's second answer was not a hit (x-cache: {cache:?}):\n{}",
            process.log_tail()
        );
    }
    Ok(hit.bytes().await?)
}

//! The production shape on loopback for one test: Redis, a mock provider and the fake Fastly API
//! shared by N origin replica processes, the round-robin proxy in front of them, and the edge
//! under Viceroy pointed at the proxy. Everything is stopped on drop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use gateway_common::key::CacheKey;
use gateway_common::tenant::{Tenant, TenantsFile};
use gateway_fixtures::{
    ChildProcess, FakeFastlyApi, FastlyApiConfig, MockProvider, ProviderConfig, RedisDeployment,
    RedisKind,
};
use serde_json::Value;

use crate::edge::{Edge, EdgeConfig, KvSeed};
use crate::origin_config::{OriginConfig, inline_table, quote};
use crate::replicas::{ReplicaOptions, Replicas, SettingsHook, metric_total};
use crate::repo_root;
use crate::stack::{SEAL_KEY, SECRET, chat_body, post};

/// The environment variable the replicas read the fake Fastly API's token from.
pub const FASTLY_TOKEN_ENV: &str = "FASTLY_API_TOKEN";
/// The environment variable the replicas read the mock provider's key from.
pub const PROVIDER_KEY_ENV: &str = "MOCK_PROVIDER_API_KEY";

/// How a test wants its replicated stack.
pub struct ReplicaStackOptions {
    pub replicas: usize,
    pub provider: ProviderConfig,
    /// Tenants instead of `fixtures/tenants.json`: the replicas' tenants file and the fake
    /// API's Config Store (which seeds the edge's `tenants`) both hold them.
    pub tenants: Option<Vec<Tenant>>,
    /// The fake Fastly API; an empty `config_seed` is filled with the tenants' records.
    pub fastly_api: FastlyApiConfig,
    /// Local populate at the edge (on, as in `[local_server]`; off, as in production, makes
    /// the dual-write the only way into the edge's KV store).
    pub populate_on_fallback: bool,
    /// A change to each replica's settings (`index`, settings) before its first start; the
    /// base is [`ReplicaStack::base_config`].
    pub settings: Option<SettingsHook>,
    /// Extra environment for every replica process.
    pub env: Vec<(String, String)>,
}

impl Default for ReplicaStackOptions {
    fn default() -> ReplicaStackOptions {
        ReplicaStackOptions {
            replicas: 3,
            provider: ProviderConfig::default(),
            tenants: None,
            fastly_api: FastlyApiConfig::default(),
            populate_on_fallback: true,
            settings: None,
            env: Vec::new(),
        }
    }
}

pub struct ReplicaStack {
    pub redis: RedisDeployment,
    pub provider: MockProvider,
    pub fastly_api: FakeFastlyApi,
    pub replicas: Replicas,
    /// The edge, whose origin backend is the proxy.
    pub edge: Edge,
    /// A pooled client, for the edge and for replicas addressed one by one.
    pub http: reqwest::Client,
    /// A client that opens a new connection for every request, so each request through the
    /// proxy takes the next replica's turn (a pooled connection stays on one replica).
    pub fresh: reqwest::Client,
    /// Holds the tenants file the replicas read, when the test brought its own tenants.
    _scratch: ChildProcess,
    edge_requests: AtomicU64,
}

impl ReplicaStack {
    /// `replicas` replicas with the defaults.
    pub async fn start(replicas: usize) -> anyhow::Result<ReplicaStack> {
        ReplicaStack::start_with(ReplicaStackOptions {
            replicas,
            ..ReplicaStackOptions::default()
        })
        .await
    }

    pub async fn start_with(options: ReplicaStackOptions) -> anyhow::Result<ReplicaStack> {
        let redis = RedisDeployment::start(crate::redis_kind())?;
        let provider = MockProvider::start(options.provider).await?;
        let scratch = ChildProcess::new("gw-replica-stack")?;
        let (tenants_path, tenants_file) = match options.tenants {
            None => {
                let path = repo_root().join("fixtures/tenants.json");
                let raw = std::fs::read(&path)?;
                (path, raw)
            }
            Some(tenants) => {
                let raw = serde_json::to_vec(&serde_json::json!({ "tenants": tenants }))?;
                let path = scratch.dir().join("tenants.json");
                std::fs::write(&path, &raw)?;
                (path, raw)
            }
        };
        let mut api_config = options.fastly_api;
        if api_config.config_seed.is_empty() {
            api_config.config_seed = TenantsFile::parse(&tenants_file)
                .map_err(anyhow::Error::msg)
                .context("invalid tenants file")?
                .config_store_entries();
        }
        let fastly_api = FakeFastlyApi::start(api_config).await?;

        let base = ReplicaStack::base_config(&redis, &provider, &fastly_api, &tenants_path);
        let mut env = vec![
            (PROVIDER_KEY_ENV.to_owned(), "sk-provider-e2e".to_owned()),
            (FASTLY_TOKEN_ENV.to_owned(), fastly_api.token().to_owned()),
        ];
        env.extend(options.env);
        let replica_options = ReplicaOptions {
            config: base,
            env,
            settings: options.settings,
            ..ReplicaOptions::default()
        };
        let replicas = Replicas::start(options.replicas, replica_options).await?;

        let mut edge_config = EdgeConfig::new(replicas.proxy_url(), SECRET);
        edge_config.populate_on_fallback = options.populate_on_fallback;
        edge_config.tenants_store = Some(fastly_api.export_viceroy_config_json().to_string());
        let edge = tokio::task::spawn_blocking(move || Edge::start(&edge_config)).await??;
        // Connections made while the edge started (none expected) are not the test's.
        replicas.proxy().reset_counters();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let fresh = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(0)
            .build()?;
        Ok(ReplicaStack {
            redis,
            provider,
            fastly_api,
            replicas,
            edge,
            http,
            fresh,
            _scratch: scratch,
            edge_requests: AtomicU64::new(0),
        })
    }

    /// The settings every replica starts from: `dev_mode`, the e2e cache key secret, the
    /// shared Redis, the tenants file, the mock provider for the development models, one
    /// worker, replication to the fake Fastly API (its KV store, and its Config Store for
    /// tenant purge generations) with a 50 ms linger and a 1.5 s takeover of a dead replica's
    /// work, and Redis timeouts loose enough for a loaded 2-core machine.
    pub fn base_config(
        redis: &RedisDeployment,
        provider: &MockProvider,
        fastly_api: &FakeFastlyApi,
        tenants_file: &std::path::Path,
    ) -> OriginConfig {
        let models = inline_table(&[
            ("gpt-4o-mini", "gpt-4o-mini"),
            ("text-embedding-3-small", "text-embedding-3-small"),
        ]);
        let provider_table = format!(
            "{{ name = {}, base_url = {}, api_key_env = {}, models = {models}, timeout_ms = 5000, connect_timeout_ms = 500 }}",
            quote(provider.name()),
            quote(&provider.base_url()),
            quote(PROVIDER_KEY_ENV),
        );
        let mut config = OriginConfig::default();
        config
            .set("", "dev_mode", "true")
            .set("", "providers", format!("[{provider_table}]"))
            .set("server", "workers", "1")
            .set("server", "shutdown_timeout_secs", "10")
            // Tests with thousands of requests on a loaded 2-core machine can starve a client
            // between its connect and its request head for longer than the 5 s default.
            .set("server", "client_request_timeout_ms", "60000")
            .set("redis", "response_timeout_ms", "250")
            .set("redis", "pool_wait_timeout_ms", "250")
            // A replica opens its pool's connections cold, many at once, on a busy machine.
            .set("redis", "connect_timeout_ms", "1000")
            .set_str("cache", "key_secret", SECRET)
            .set(
                "seal",
                "current",
                format!(
                    "{{ id = {}, secret = {} }}",
                    quote(SEAL_KEY.0),
                    quote(SEAL_KEY.1)
                ),
            )
            .set_str("tenants", "file", &tenants_file.to_string_lossy())
            .set("router", "breaker_cooldown_ms", "500")
            .set_str("log", "format", "text")
            .set_str("log", "filter", "info")
            .set("replication", "enabled", "true")
            .set_str("replication", "api_base_url", &fastly_api.base_url())
            .set_str("replication", "store_id", fastly_api.store_id())
            .set_str("replication", "api_token_env", FASTLY_TOKEN_ENV)
            .set("replication", "linger_ms", "50")
            // Tenant purges go to the fake API's Config Store as a new purge generation.
            .set_str(
                "replication",
                "config_store_id",
                fastly_api.config_store_id(),
            )
            // A killed replica's records are taken over within seconds, not a minute.
            .set("replication", "claim_idle_ms", "1500")
            .set("replication", "poll_ms", "50");
        let urls = redis.urls();
        match redis.kind() {
            RedisKind::Single => config.set_str("redis", "url", &urls.concat()),
            // One comma-separated string: what `GATEWAY__REDIS__CLUSTER_URLS` would hold.
            RedisKind::Cluster => config.set_str("redis", "mode", "cluster").set_str(
                "redis",
                "cluster_urls",
                &urls.join(","),
            ),
        };
        config
    }

    /// A fresh edge ("a new POP") in front of the same proxy, seeded with what the fake
    /// Fastly API holds now: its KV store as `edge_cache` and its Config Store as `tenants`.
    /// Local populate is off, as in production.
    pub async fn start_pop(&self) -> anyhow::Result<Edge> {
        let mut config = EdgeConfig::new(self.replicas.proxy_url(), SECRET);
        config.populate_on_fallback = false;
        config.kv = KvSeed::from_api(&self.fastly_api);
        config.tenants_store = Some(self.fastly_api.export_viceroy_config_json().to_string());
        tokio::task::spawn_blocking(move || Edge::start(&config)).await?
    }

    /// POST a JSON body to the edge.
    pub async fn edge_post(
        &self,
        path: &str,
        key: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        self.edge_requests.fetch_add(1, Ordering::SeqCst);
        post(&self.http, &self.edge.url(), path, key, body, headers).await
    }

    pub async fn edge_chat(&self, key: &str, prompt: &str) -> reqwest::Response {
        self.edge_post("/v1/chat/completions", key, &chat_body(prompt), &[])
            .await
    }

    /// POST a JSON body through the proxy, on a new connection (so to the next replica).
    pub async fn proxy_post(
        &self,
        path: &str,
        key: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        post(
            &self.fresh,
            &self.replicas.proxy_url(),
            path,
            key,
            body,
            headers,
        )
        .await
    }

    pub async fn proxy_chat(&self, key: &str, prompt: &str) -> reqwest::Response {
        self.proxy_post("/v1/chat/completions", key, &chat_body(prompt), &[])
            .await
    }

    /// POST a JSON body straight to replica `index`.
    pub async fn replica_post(
        &self,
        index: usize,
        path: &str,
        key: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        post(
            &self.http,
            &self.replicas.url(index),
            path,
            key,
            body,
            headers,
        )
        .await
    }

    pub async fn replica_chat(&self, index: usize, key: &str, prompt: &str) -> reqwest::Response {
        self.replica_post(index, "/v1/chat/completions", key, &chat_body(prompt), &[])
            .await
    }

    /// The sum of metric `name` (every label set) on replica `index`.
    pub async fn metric(&self, index: usize, name: &str) -> anyhow::Result<f64> {
        Ok(metric_total(&self.replicas.metrics(index).await?, name))
    }

    /// The sum of metric `name` over every running replica.
    pub async fn metric_all(&self, name: &str) -> anyhow::Result<f64> {
        let mut total = 0.0;
        for index in (0..self.replicas.len()).filter(|&i| self.replicas.is_running(i)) {
            total += self.metric(index, name).await?;
        }
        Ok(total)
    }

    /// Wait (at most `within`) until Redis holds `key`: a replica writes its cache entry after
    /// it has answered, so the next request may otherwise reach another replica first.
    pub async fn wait_for_redis(&self, key: &CacheKey, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let exists = self.redis.cli(&["EXISTS", &key.redis_key()]);
            if exists.as_deref().is_ok_and(|n| n == "1") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "Redis does not hold {} after {within:?} ({exists:?})",
                key.redis_key()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Wait until the edge has finished every request sent to it through
    /// [`ReplicaStack::edge_post`] (a local populate runs after the response is sent).
    pub async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let sent = usize::try_from(self.edge_requests.load(Ordering::SeqCst)).unwrap_or(usize::MAX);
        while self.edge.finished() < sent {
            assert!(
                Instant::now() < deadline,
                "the edge did not settle within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

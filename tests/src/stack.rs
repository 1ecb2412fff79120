//! The whole stack for one test: Redis, the mock provider, the origin (in-process, port 0),
//! a counting (optionally delaying) proxy standing for the distance to the origin, and the
//! edge under Viceroy in front of it. Everything is stopped on drop.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use anyhow::Context;
use gateway_common::key::{CacheKey, api_key_digest};
use gateway_common::route::Route;
use gateway_common::tenant::{Tenant, TenantsFile};
use gateway_fixtures::{
    DelayProxy, FakeFastlyApi, FastlyApiConfig, MockProvider, ProviderConfig, RedisDeployment,
    RedisKind,
};
use gateway_origin::provider_api::ProviderApi;
use gateway_origin::service::Service;
use gateway_origin::settings::{ProviderSettings, RedisMode, Secret, Settings};
use gateway_origin::tenants::Tenants;
use gateway_origin::{Application, Parts};
use serde_json::{Value, json};

use crate::edge::{Edge, EdgeConfig, KvSeed};
use crate::repo_root;

/// The development API keys of `fixtures/tenants.json`.
pub const ACME: &str = "sk-dev-acme";
pub const GLOBEX: &str = "sk-dev-globex";
/// The third development tenant, with the semantic cache on.
pub const INITECH: &str = "sk-dev-initech";
/// The cache key secret both tiers get in tests.
pub const SECRET: &str = "e2e-cache-key-secret-0123456789";

/// The seal key (id, secret) both tiers get in tests, unless a test rotates.
pub const SEAL_KEY: (&str, &str) = ("e2e1", "e2e-seal-secret-0123456789abcdef");

/// The edge's secret `seal_key_current` / `seal_key_previous` for a key: `<id>:<secret>`.
pub fn edge_seal_secret(id: &str, secret: &str) -> String {
    format!("{id}:{secret}")
}

/// The origin's `[seal]` key for (id, secret).
pub fn origin_seal_key(id: &str, secret: &str) -> gateway_origin::settings::SealKeySettings {
    gateway_origin::settings::SealKeySettings {
        id: id.to_owned(),
        secret: Secret::new(secret),
    }
}

/// A last change to the origin's settings, made just before it starts.
pub type AdjustSettings = Box<dyn FnOnce(&mut Settings) + Send>;

/// How a test wants its stack.
pub struct StackOptions {
    /// Extra delay the proxy adds each way between edge and origin.
    pub distance: Duration,
    /// Entries the edge's KV store starts with.
    pub kv: Vec<KvSeed>,
    /// Local populate at the edge (on by default, as in `[local_server]`).
    pub populate_on_fallback: bool,
    /// Mock providers in priority order (the first is preferred); one plain mock by default.
    pub providers: Vec<ProviderConfig>,
    /// Tenants instead of `fixtures/tenants.json` (both tiers get the same set).
    pub tenants: Option<Vec<Tenant>>,
    /// Last word on the origin's settings.
    pub origin_settings: Option<AdjustSettings>,
    /// Run the fake Fastly KV API and have the origin dual-write to it.
    pub replicate: bool,
    /// Forward the edge's usage records to the origin's ingest route ([`USAGE_TOKEN`]) and
    /// protect `/metrics` and `/dashboard` with [`ADMIN_TOKEN`].
    pub usage: bool,
    /// One Redis node or a six-node cluster; by default what `GATEWAY_E2E_REDIS` says
    /// ([`crate::redis_kind`]).
    pub redis: RedisKind,
}

/// The origin's `usage.ingest_token` in stacks with `usage`.
pub const USAGE_TOKEN: &str = "e2e-usage-ingest-token";
/// The origin's admin token in stacks with `usage`.
pub const ADMIN_TOKEN: &str = "e2e-admin-token-0123456789";

impl Default for StackOptions {
    fn default() -> StackOptions {
        StackOptions {
            distance: Duration::ZERO,
            kv: Vec::new(),
            populate_on_fallback: true,
            providers: vec![ProviderConfig::default()],
            tenants: None,
            origin_settings: None,
            replicate: false,
            usage: false,
            redis: crate::redis_kind(),
        }
    }
}

pub struct Stack {
    pub redis: RedisDeployment,
    /// The first (preferred) provider.
    pub provider: MockProvider,
    /// Every provider after the first, in priority order.
    pub fallbacks: Vec<MockProvider>,
    /// The network path to the origin; `None` once the origin is stopped.
    pub proxy: Option<DelayProxy>,
    proxied_before_stop: u64,
    pub edge: Edge,
    pub origin_url: String,
    pub service: Arc<Service>,
    pub http: reqwest::Client,
    /// The fake Fastly KV API the origin replicates to (with `replicate`).
    pub kv_api: Option<FakeFastlyApi>,
    origin: Option<ServerHandle>,
    /// Requests the proxy had forwarded when the stack was ready (Viceroy probes its backends).
    proxy_baseline: u64,
    /// Requests sent to the edge, so `settle` can wait for the edge to finish them.
    edge_requests: AtomicU64,
}

fn tenants_file() -> PathBuf {
    repo_root().join("fixtures/tenants.json")
}

/// Origin settings for tests: the mock providers (in priority order) serving the development
/// models.
pub fn origin_settings(redis: &RedisDeployment, providers: &[&MockProvider]) -> Settings {
    let mut settings = Settings::for_tests();
    point_at(&mut settings, redis);
    settings.cache.key_secret = Some(Secret::new(SECRET));
    settings.seal.current = Some(origin_seal_key(SEAL_KEY.0, SEAL_KEY.1));
    settings.tenants.file = Some(tenants_file());
    // The model as `just setup` installs it (the default path is relative to the repository).
    settings.semantic.model_dir = repo_root().join(gateway_origin::semantic::DEFAULT_MODEL_DIR);
    // As with Redis above: an embedding takes milliseconds, but on a loaded 2-core machine a
    // queued one can pass the production bound and turn an expected hit into a (correct) miss.
    settings.semantic.embed_timeout_ms = 5_000;
    settings.router.breaker_cooldown_ms = 500;
    // The defaults (50 ms response, 20 ms pool wait) are right for production, but on a
    // loaded 2-core CI machine a healthy Redis can miss them, which turns an expected hit into
    // a (correct, fail-open) miss and makes tier-walk assertions flaky.
    settings.redis.response_timeout_ms = 250;
    settings.redis.pool_wait_timeout_ms = 250;
    settings.providers = providers
        .iter()
        .zip(0u32..)
        .map(|(provider, priority)| ProviderSettings {
            name: provider.name().to_owned(),
            base_url: provider.base_url(),
            base_url_env: None,
            api_key_env: None,
            api_key: Some(Secret::new("sk-provider-e2e")),
            models: ["gpt-4o-mini", "text-embedding-3-small", "claude-haiku-4-5"]
                .iter()
                .map(|m| (m.to_string(), m.to_string()))
                .collect(),
            apis: vec![
                ProviderApi::Chat,
                ProviderApi::Responses,
                ProviderApi::Messages,
            ],
            priority,
            weight: 1,
            timeout_ms: 5_000,
            connect_timeout_ms: 500,
        })
        .collect();
    settings
}

/// Points the origin's settings at `redis`, a single node or a cluster.
pub fn point_at(settings: &mut Settings, redis: &RedisDeployment) {
    let urls = redis.urls();
    match redis.kind() {
        RedisKind::Single => {
            settings.redis.mode = RedisMode::Single;
            settings.redis.url = Secret::new(urls.concat());
        }
        RedisKind::Cluster => {
            settings.redis.mode = RedisMode::Cluster;
            settings.redis.cluster_urls = urls.into_iter().map(Secret::new).collect();
            // Opening a cluster connection reaches every node: slower than one connect on a
            // loaded 2-core machine.
            settings.redis.connect_timeout_ms = settings.redis.connect_timeout_ms.max(1000);
        }
    }
}

/// The tenants of `fixtures/tenants.json` (`ACME`, `GLOBEX`), each changed by `adjust`.
/// Panics if the fixture does not parse (a broken checkout).
#[allow(
    clippy::expect_used,
    reason = "test harness: a broken fixture is a failed test"
)]
pub fn fixture_tenants(adjust: impl Fn(&mut Tenant)) -> Vec<Tenant> {
    let file = std::fs::read(tenants_file()).expect("fixtures/tenants.json");
    TenantsFile::parse(&file)
        .expect("the fixture tenants parse")
        .tenants
        .into_iter()
        .map(|mut tenant| {
            adjust(&mut tenant);
            tenant
        })
        .collect()
}

/// `count` tenants `t00`, `t01`, ... with API keys `sk-t00`, ... allowed the development models.
pub fn many_tenants(count: usize) -> Vec<Tenant> {
    (0..count)
        .map(|i| Tenant {
            id: format!("t{i:02}"),
            api_key_sha256: vec![api_key_digest(&format!("sk-t{i:02}"))],
            allowed_models: vec![
                "gpt-4o-mini".to_owned(),
                "text-embedding-3-small".to_owned(),
            ],
            cache_ttl_secs: 3600,
            stale_if_error_secs: 86_400,
            monthly_token_budget: None,
            requests_per_second: None,
            cache_sampled: true,
            cache_store_requests: false,
            purge_generation: 0,
            semantic: Default::default(),
        })
        .collect()
}

impl Stack {
    pub async fn start() -> anyhow::Result<Stack> {
        Stack::start_with(StackOptions::default()).await
    }

    pub async fn start_with(options: StackOptions) -> anyhow::Result<Stack> {
        let redis = RedisDeployment::start(options.redis)?;
        let mut providers = Vec::new();
        for config in options.providers {
            providers.push(MockProvider::start(config).await?);
        }
        let mut settings = origin_settings(&redis, &providers.iter().collect::<Vec<_>>());
        let kv_api = if options.replicate {
            let api = FakeFastlyApi::start(FastlyApiConfig::default()).await?;
            settings.replication.enabled = true;
            settings.replication.api_base_url = api.base_url();
            settings.replication.store_id = api.store_id().to_owned();
            settings.replication.api_token = Some(Secret::new(api.token()));
            settings.replication.linger_ms = 50;
            Some(api)
        } else {
            None
        };
        if options.usage {
            settings.usage.ingest_token = Some(Secret::new(USAGE_TOKEN));
            settings.security.admin_token = Some(Secret::new(ADMIN_TOKEN));
            settings.pricing.insert(
                "gpt-4o-mini".into(),
                gateway_origin::settings::ModelPrice {
                    prompt_per_million: 0.15,
                    completion_per_million: 0.6,
                },
            );
        }
        if let Some(adjust) = options.origin_settings {
            adjust(&mut settings);
        }
        let mut parts = Parts::default();
        let mut edge_tenants = None;
        if let Some(tenants) = options.tenants {
            let file = serde_json::to_vec(&serde_json::json!({ "tenants": tenants }))?;
            edge_tenants = Some(crate::edge_tenants_json(&file)?);
            parts.tenants = Some(Tenants::new(tenants));
        }
        let app = Application::build_with(settings, parts).context("origin builds")?;
        let origin_url = app.base_url();
        let service = Arc::clone(app.service());
        let origin = app.handle();
        tokio::spawn(app.run());
        let proxy = DelayProxy::start(origin_url.clone(), options.distance).await?;
        let mut config = EdgeConfig::new(proxy.url(), SECRET);
        config.populate_on_fallback = options.populate_on_fallback;
        config.kv = options.kv;
        config.tenants_store = edge_tenants;
        if options.usage {
            config.usage_ingest = Some((
                format!("{origin_url}/ingest/edge-usage"),
                USAGE_TOKEN.to_owned(),
            ));
        }
        let edge = tokio::task::spawn_blocking(move || Edge::start(&config)).await??;
        // Viceroy probes each backend once at start-up; wait for it so counts start clean.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let proxy_baseline = proxy.requests();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()?;
        let mut providers = providers.into_iter();
        let provider = providers.next().context("at least one provider")?;
        Ok(Stack {
            redis,
            provider,
            fallbacks: providers.collect(),
            proxy: Some(proxy),
            proxied_before_stop: 0,
            edge,
            origin_url,
            service,
            http,
            kv_api,
            origin: Some(origin),
            proxy_baseline,
            edge_requests: AtomicU64::new(0),
        })
    }

    /// Requests that crossed from the edge to the origin since the stack was ready.
    pub fn origin_requests(&self) -> u64 {
        self.proxy
            .as_ref()
            .map_or(self.proxied_before_stop, DelayProxy::requests)
            - self.proxy_baseline
    }

    /// A fresh edge ("a new POP") in front of the same origin, starting with `kv` and with
    /// local populate off, as in production; with its own counting proxy to the origin.
    pub async fn start_pop(&self, kv: Vec<KvSeed>) -> anyhow::Result<(Edge, DelayProxy)> {
        let proxy = DelayProxy::start(self.origin_url.clone(), Duration::ZERO).await?;
        let mut config = EdgeConfig::new(proxy.url(), SECRET);
        config.populate_on_fallback = false;
        config.kv = kv;
        let edge = tokio::task::spawn_blocking(move || Edge::start(&config)).await??;
        Ok((edge, proxy))
    }

    /// Requests that crossed from the edge to the origin carrying the header `name`; 0 once
    /// the origin is stopped.
    pub fn origin_requests_with_header(&self, name: &str) -> u64 {
        self.proxy
            .as_ref()
            .map_or(0, |proxy| proxy.requests_with_header(name))
    }

    /// The edge's log line for the last request keyed `key`, once the edge has finished every
    /// request sent to it. Panics when there is none (a test failure).
    pub async fn edge_log_line(&self, key: &CacheKey) -> Value {
        self.settle().await;
        self.edge
            .log_lines()
            .into_iter()
            .rev()
            .find(|line| line["key"] == key.hex())
            .unwrap_or_else(|| panic!("no edge log line for key {}", key.hex()))
    }

    /// Take the origin down: the origin stops and its address refuses connections.
    pub async fn stop_origin(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            self.proxied_before_stop = proxy.requests();
            proxy.stop().await;
        }
        if let Some(handle) = self.origin.take() {
            handle.stop(false).await;
        }
    }

    /// Wait until the origin has no provider call or cache write in flight and the edge has
    /// finished every request sent to it (a local populate runs after the response is sent).
    /// Gives up silently after 10 s: the assertions that follow then say what is missing.
    pub async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.service.in_flight() > 0 {
            assert!(
                Instant::now() < deadline,
                "the origin did not settle within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let sent = usize::try_from(self.edge_requests.load(Ordering::SeqCst)).unwrap_or(usize::MAX);
        while self.edge.finished() < sent {
            assert!(
                Instant::now() < deadline,
                "the edge did not settle within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Count `n` requests sent to the edge by something other than [`Stack::edge_post`] (an
    /// external client), so that [`Stack::settle`] waits for them too.
    pub fn count_edge_requests(&self, n: u64) {
        self.edge_requests.fetch_add(n, Ordering::SeqCst);
    }

    /// The sum of the origin's samples of metric `name` whose labels include every `labels`
    /// pair (`tenant="acme"`); 0 when none (see [`crate::replicas::metric_where`]).
    pub fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let page = String::from_utf8_lossy(&self.service.metrics().render()).into_owned();
        crate::replicas::metric_where(&page, name, labels)
    }

    /// POST a JSON body to the edge.
    pub async fn edge_post(
        &self,
        path: &str,
        key: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        self.count_edge_requests(1);
        post(&self.http, &self.edge.url(), path, key, body, headers).await
    }

    /// POST a JSON body straight to the origin.
    pub async fn origin_post(&self, path: &str, key: &str, body: &Value) -> reqwest::Response {
        post(&self.http, &self.origin_url, path, key, body, &[]).await
    }

    pub async fn edge_chat(&self, key: &str, prompt: &str) -> reqwest::Response {
        self.edge_post("/v1/chat/completions", key, &chat_body(prompt), &[])
            .await
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(handle) = self.origin.take() {
            drop(handle.stop(false));
        }
    }
}

/// POST `body` as JSON with `key` as the bearer token; a transport error panics (a test failure).
pub async fn post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    key: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = http
        .post(format!("{base}{path}"))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    match request.send().await {
        Ok(resp) => resp,
        Err(e) => panic!("POST {base}{path} failed: {e}"),
    }
}

/// A chat completion request for `prompt` with the development model.
pub fn chat_body(prompt: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]})
}

/// The assistant's text in a (non-streamed) chat completion body; "" when absent.
pub fn completion_text(body: &Value) -> String {
    body.pointer("/choices/0/message/content")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The cache key both tiers derive for `body` on `route` for `tenant`.
pub fn key_for(tenant: &str, route: Route, body: &Value) -> CacheKey {
    let parsed =
        gateway_common::canonical::parse_request(route, body.to_string().as_bytes(), usize::MAX)
            .unwrap_or_else(|e| panic!("test body does not parse: {e}"));
    let canonical = parsed
        .canonical
        .unwrap_or_else(|| panic!("test body is not cacheable"));
    CacheKey::derive(SECRET.as_bytes(), tenant, route, &canonical)
}

/// A response header as a string ("" when absent).
pub fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

//! Test harness: a real `redis-server` and mock providers on free ports, and the origin built
//! from settings in code on port 0. Never skips: a missing `redis-server` fails loudly.
#![allow(
    clippy::expect_used,
    reason = "test harness: a failed expectation is a failed test"
)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::dev::ServerHandle;
use gateway_common::tenant::{Tenant, TenantsFile};
use gateway_fixtures::provider::{MockProvider, ProviderConfig};
use gateway_fixtures::redis::RedisServer;
use gateway_origin::provider_api::ProviderApi;
use gateway_origin::replicate::RecordingReplicator;
use gateway_origin::service::Service;
use gateway_origin::settings::{ProviderSettings, Secret, Settings};
use gateway_origin::tenants::Tenants;
use gateway_origin::{Application, Parts};
use serde_json::{Value, json};

pub const ACME: &str = "sk-dev-acme";
pub const GLOBEX: &str = "sk-dev-globex";
pub const PROVIDER_KEY: &str = "sk-provider-test";

/// The seal keys of an origin in `dev_mode` without `[seal]` (every stack here): to open
/// what it stored, as the edge would.
pub fn dev_keys() -> gateway_common::seal::Keyring {
    use gateway_origin::settings::{DEV_SEAL_KEY_ID, DEV_SEAL_SECRET};
    let key = gateway_common::seal::SealKey::new(DEV_SEAL_KEY_ID, DEV_SEAL_SECRET.as_bytes())
        .expect("the development seal key is valid");
    gateway_common::seal::Keyring::new(key, None).expect("one key")
}

/// The shared fixture `redis-server` (configured as a cache, stopped on drop), with the few
/// helpers these tests use. Panics with a clear message when Redis is not installed.
pub struct Redis(RedisServer);

impl Redis {
    pub fn start() -> Redis {
        match RedisServer::start() {
            Ok(server) => Redis(server),
            Err(e) => panic!("these tests need a real Redis: {e:#}"),
        }
    }

    pub fn url(&self) -> String {
        self.0.url()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        self.0.kill();
    }

    /// A new, empty server on the same port.
    pub fn restart(&mut self) {
        self.0.restart().expect("redis-server restarts");
    }

    /// SIGSTOP: connections stay open, nothing answers.
    pub fn freeze(&self) {
        self.0.freeze().expect("kill -STOP");
    }

    pub fn thaw(&self) {
        self.0.thaw().expect("kill -CONT");
    }

    /// `redis-cli` output for one command.
    pub fn cli(&self, args: &[&str]) -> String {
        self.0.cli(args).expect("redis-cli runs")
    }

    pub fn keys(&self, pattern: &str) -> Vec<String> {
        self.0.keys(pattern).expect("redis-cli KEYS")
    }

    /// How many cache entries (`gw:v1:*`) Redis holds.
    pub fn entries(&self) -> usize {
        self.keys("gw:v1:*").len()
    }
}

/// How a test wants its stack.
pub struct Options {
    /// One mock per entry, in priority order (the first is preferred).
    pub providers: Vec<ProviderConfig>,
    /// Applied after the harness filled in Redis, providers and tenants.
    pub settings: Box<dyn FnOnce(&mut Settings)>,
    /// Applied to every tenant of `fixtures/tenants.json`.
    pub tenants: Box<dyn Fn(&mut Tenant)>,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            providers: vec![mock_config("mock", 0)],
            settings: Box::new(|_| {}),
            tenants: Box::new(|_| {}),
        }
    }
}

pub fn mock_config(name: &str, latency_ms: u64) -> ProviderConfig {
    ProviderConfig {
        name: name.into(),
        latency_ms,
        ..ProviderConfig::default()
    }
}

pub struct Stack {
    pub redis: Redis,
    pub providers: Vec<MockProvider>,
    pub url: String,
    pub service: Arc<Service>,
    pub replicator: Arc<RecordingReplicator>,
    pub http: reqwest::Client,
    pub settings: Settings,
    tenants: Tenants,
    handle: ServerHandle,
}

/// One running origin (the stack's own, or another replica of it). Stopped on drop.
pub struct Replica {
    pub url: String,
    pub service: Arc<Service>,
    handle: ServerHandle,
}

/// Builds and runs an origin on port 0: its URL, service and handle.
fn launch(
    settings: &Settings,
    tenants: &Tenants,
    replicator: &Arc<RecordingReplicator>,
) -> (String, Arc<Service>, ServerHandle) {
    {
        let app = Application::build_with(
            settings.clone(),
            Parts {
                // With replication enabled the origin builds its own KvReplicator.
                replicator: (!settings.replication.enabled)
                    .then(|| replicator.clone() as Arc<dyn gateway_origin::replicate::Replicator>),
                tenants: Some(tenants.clone()),
                ..Parts::default()
            },
        )
        .expect("origin builds");
        let url = app.base_url();
        let service = Arc::clone(app.service());
        let handle = app.handle();
        tokio::spawn(app.run());
        (url, service, handle)
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        stop(&self.handle);
    }
}

/// Stops a server from a destructor (when a runtime is still there to run the stop).
fn stop(handle: &ServerHandle) {
    let handle = handle.clone();
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move { handle.stop(false).await });
    }
}

pub fn tenants_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/tenants.json")
}

impl Stack {
    pub async fn start() -> Stack {
        Stack::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Stack {
        let redis = Redis::start();
        let mut providers = Vec::new();
        for config in options.providers {
            providers.push(
                MockProvider::start(config)
                    .await
                    .expect("mock provider starts"),
            );
        }
        let mut settings = Settings::for_tests();
        settings.redis.url = Secret::new(redis.url());
        // Short cool-downs so tests see recovery quickly.
        settings.redis.breaker_cooldown_ms = 200;
        // The production bound (50 ms response, 20 ms pool wait) can be missed by a healthy
        // Redis on a loaded 2-core machine, turning an expected hit into a (correct, fail-open)
        // miss; `redis_outage` puts it back to measure it.
        settings.redis.response_timeout_ms = 1_000;
        settings.redis.pool_wait_timeout_ms = 1_000;
        settings.router.breaker_cooldown_ms = 500;
        settings.cache.usage_flush_ms = 100;
        settings.tenants.file = Some(tenants_file());
        settings.providers = providers
            .iter()
            .enumerate()
            .map(|(i, p)| ProviderSettings {
                name: p.name().to_string(),
                base_url: p.base_url(),
                base_url_env: None,
                api_key_env: None,
                api_key: Some(Secret::new(PROVIDER_KEY)),
                models: [
                    ("gpt-4o-mini", "gpt-4o-mini"),
                    ("text-embedding-3-small", "text-embedding-3-small"),
                    ("claude-haiku-4-5", "claude-haiku-4-5"),
                ]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
                apis: vec![
                    ProviderApi::Chat,
                    ProviderApi::Responses,
                    ProviderApi::Messages,
                ],
                priority: i as u32,
                weight: 1,
                timeout_ms: 5_000,
                connect_timeout_ms: 500,
            })
            .collect();
        (options.settings)(&mut settings);

        let file =
            TenantsFile::parse(&std::fs::read(tenants_file()).expect("fixtures/tenants.json"))
                .expect("fixtures/tenants.json parses");
        let tenants: Vec<Tenant> = file
            .tenants
            .into_iter()
            .map(|mut t| {
                (options.tenants)(&mut t);
                t
            })
            .collect();
        let replicator = Arc::new(RecordingReplicator::new());
        let tenants = Tenants::new(tenants);
        let (url, service, handle) = launch(&settings, &tenants, &replicator);
        Stack {
            redis,
            providers,
            url,
            service,
            replicator,
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .build()
                .expect("client"),
            settings,
            tenants,
            handle,
        }
    }

    /// Another origin replica on the same Redis, providers, tenants and settings (and its own
    /// recording replicator when replication is off).
    pub fn replica(&self) -> Replica {
        let (url, service, handle) = launch(
            &self.settings,
            &self.tenants,
            &Arc::new(RecordingReplicator::new()),
        );
        Replica {
            url,
            service,
            handle,
        }
    }

    pub fn provider(&self) -> &MockProvider {
        &self.providers[0]
    }

    /// Total API calls the mock providers saw.
    pub fn provider_calls(&self) -> u64 {
        self.providers.iter().map(|p| p.calls()).sum()
    }

    pub async fn post(&self, path: &str, key: &str, body: &Value) -> reqwest::Response {
        self.post_with(path, key, body, &[]).await
    }

    pub async fn post_with(
        &self,
        path: &str,
        key: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}{path}", self.url))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("origin answers")
    }

    pub async fn chat(&self, key: &str, prompt: &str) -> reqwest::Response {
        self.post("/v1/chat/completions", key, &chat_body(prompt))
            .await
    }

    /// Waits until no provider call or cache write is in flight, so the next identical request
    /// is a clean hit rather than a coalesced wait on a write still landing.
    pub async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.service.in_flight() > 0 {
            assert!(
                Instant::now() < deadline,
                "in-flight work did not settle within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The value of one sample of the Prometheus page, e.g.
    /// `gateway_cache_results_total{layer="origin",outcome="hit"}` (labels in name order, as
    /// Prometheus renders them); 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let page = String::from_utf8(self.service.metrics().render()).expect("utf-8 metrics");
        page.lines()
            .find_map(|line| {
                line.strip_prefix(sample)
                    .and_then(|rest| rest.strip_prefix(' '))
            })
            .map_or(0.0, |v| v.trim().parse().expect("a number"))
    }
}

impl Stack {
    /// The sum of every sample of a metric family, e.g. `gateway_redis_errors_total`.
    pub fn metric_sum(&self, family: &str) -> f64 {
        let page = String::from_utf8(self.service.metrics().render()).expect("utf-8 metrics");
        page.lines()
            .filter(|line| line.starts_with(family) && line[family.len()..].starts_with(['{', ' ']))
            .filter_map(|line| {
                line.rsplit_once(' ')
                    .and_then(|(_, v)| v.parse::<f64>().ok())
            })
            .sum()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        stop(&self.handle);
    }
}

/// Polls `done` every 20 ms until it holds; fails naming `what` after `within`.
pub(crate) async fn eventually<F, Fut>(what: &str, within: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !done().await {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn chat_body(prompt: &str) -> Value {
    json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]})
}

pub fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Asserts an OpenAI-shaped error body and returns it.
pub async fn openai_error(response: reqwest::Response) -> Value {
    let body: Value = response.json().await.expect("a JSON error body");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    assert!(body["error"].get("code").is_some(), "{body}");
    body
}

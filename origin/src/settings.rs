//! Settings: compiled-in defaults, then an optional file, then `GATEWAY__SECTION__KEY`
//! environment variables, validated once at start-up. The environment is passed in as a map
//! so tests build settings in code and never touch the process environment.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

mod region;
mod seal;
mod usage;
mod validate;

pub use region::{PeerSettings, RegionSettings, valid_region_name};
pub use seal::{DEV_SEAL_KEY_ID, DEV_SEAL_SECRET, SealKeySettings, SealSettings};
pub use usage::{ModelPrice, Pricing, UsageSettings};

use validate::decode_key_secret;

/// The compiled-in defaults, the first layer of every load.
const DEFAULTS_TOML: &str = r#"
dev_mode = false

[server]
listen = "127.0.0.1:8080"
workers = 0
max_body_bytes = 4194304
max_upstream_body_bytes = 67108864
shutdown_timeout_secs = 10
client_request_timeout_ms = 5000

[redis]
mode = "single"
url = "redis://127.0.0.1:6379"
cluster_urls = []
pool = "multiplexed"
pool_size = 32
response_timeout_ms = 50
pool_wait_timeout_ms = 20
connect_timeout_ms = 100
breaker_failure_threshold = 5
breaker_cooldown_ms = 1000
error_log_interval_secs = 10

[cache]
ttl_cap_secs = 604800
coalesce_wait_timeout_ms = 300000
usage_flush_ms = 1000

[tenants]

[security]
require_edge_secret = false

[purge]
tenant_per_minute = 30
tenant_burst = 10

[router]
retry_budget_ratio = 0.2
retry_budget_min_per_sec = 10.0
breaker_failure_threshold = 5
breaker_cooldown_ms = 10000
stream_idle_timeout_ms = 60000

[log]
format = "text"
filter = "info"

[replication]
enabled = false
api_base_url = "https://api.fastly.com"
store_id = ""
api_token_env = "FASTLY_API_TOKEN"
queue_capacity = 10000
batch_max_entries = 500
batch_max_bytes = 8388608
linger_ms = 1000
dedup_window_ms = 30000
request_timeout_ms = 10000
max_retries = 8
backoff_base_ms = 500
backoff_max_ms = 60000
hourly_request_budget = 900
purge_queue_capacity = 1024
config_store_id = ""
claim_idle_ms = 60000
poll_ms = 200

[usage]
max_batch_bytes = 16777216

[region]
name = "default"
peers = []
peer_timeout_ms = 2000
peer_retry_ms = 1000
peer_outbox_capacity = 100000
[seal]

[semantic]
model_dir = ".local/models/all-minilm-l6-v2"
max_concurrent = 2
embed_timeout_ms = 250
default_threshold = 0.87
"#;

/// The tenants file loaded in `dev_mode` when `tenants.file` is not set. Its keys are in the
/// README: outside `dev_mode` a tenants file must be named explicitly.
pub const DEV_TENANTS_FILE: &str = "fixtures/tenants.json";

/// The cache key secret used when `dev_mode = true` and none is configured. It matches the
/// edge's development secret (`fastly.toml` `[local_server]`), so local runs agree on keys.
pub const DEV_CACHE_KEY_SECRET: &str = "gateway-dev-cache-key-secret";

/// A secret value: provider keys, the cache key secret, the admin token, the edge shared secret.
/// `Debug` and `Display` print `[redacted]`; the value is only reachable through [`Secret::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself. Callers must not log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret)
    }
}

/// Everything the origin needs to start. Build it with [`Settings::load`] (binary) or in code
/// (tests: start from [`Settings::for_tests`] and change fields).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Allows development conveniences: the built-in cache key secret, the fixture tenants, an
    /// origin callable without the edge secret, `/metrics` without a token. Never in
    /// production: outside it the origin refuses to start without its production settings.
    pub dev_mode: bool,
    pub server: ServerSettings,
    pub redis: RedisSettings,
    pub cache: CacheSettings,
    pub tenants: TenantsSettings,
    pub security: SecuritySettings,
    pub purge: PurgeSettings,
    pub router: RouterSettings,
    #[serde(default)]
    pub providers: Vec<ProviderSettings>,
    pub log: LogSettings,
    pub replication: ReplicationSettings,
    pub usage: UsageSettings,
    /// This origin's region and its peers (`[region]`).
    pub region: RegionSettings,
    /// Estimated provider prices, for the cost the cache saved.
    #[serde(default)]
    pub pricing: Pricing,
    pub semantic: SemanticSettings,
    /// The keys cache entries are sealed with (`[seal]`).
    pub seal: SealSettings,
}

/// The semantic cache's model and bounds (which tenants use it is in the tenant records).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SemanticSettings {
    /// all-MiniLM-L6-v2 as `just setup` installs it. Loaded at start when a tenant uses the
    /// local embedder; missing or broken, semantic lookups are counted as errors and served
    /// as exact misses (the origin still starts).
    pub model_dir: PathBuf,
    /// Embeddings computed at once (each takes one core for a few milliseconds).
    pub max_concurrent: usize,
    /// Longest wait for an embedding (queueing included); past it the request is an exact miss.
    pub embed_timeout_ms: u64,
    /// The similarity threshold of a tenant that sets none: from docs/semantic-eval.md, the
    /// lowest threshold with at most 1% false hits on the labelled set (0.87: 0.6%, 1 of 160,
    /// with 63% of paraphrases answered).
    pub default_threshold: f32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    /// Address to bind; port 0 picks a free port (tests).
    pub listen: String,
    /// actix workers; 0 means one per core.
    pub workers: usize,
    /// Largest accepted request body; larger bodies get 413.
    pub max_body_bytes: usize,
    /// Largest non-streamed provider answer read into memory.
    pub max_upstream_body_bytes: usize,
    pub shutdown_timeout_secs: u64,
    /// How long a new connection may take to send its first request head before it is
    /// answered 408 and closed (the guard against slow clients holding connections open).
    pub client_request_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisSettings {
    /// One node (`url`) or a Redis Cluster (`cluster_urls`).
    pub mode: RedisMode,
    /// `redis://[user:password@]host:port[/db]` (`rediss://` for TLS). May carry a password:
    /// never logged. Used when `mode = "single"`.
    pub url: Secret,
    /// Seed nodes of the cluster (`redis://host:port` or `rediss://`, any few of them; the
    /// client discovers the rest). A TOML list, or one comma-separated string (for
    /// `GATEWAY__REDIS__CLUSTER_URLS`). Used when `mode = "cluster"`. May carry passwords.
    #[serde(deserialize_with = "seed_list")]
    pub cluster_urls: Vec<Secret>,
    /// Which pool hands out connections (see the README, "Redis Cluster": measured).
    pub pool: RedisPool,
    pub pool_size: usize,
    /// Bound on one command's round trip; past it the command is a miss.
    pub response_timeout_ms: u64,
    /// Bound on waiting for a free pooled connection.
    pub pool_wait_timeout_ms: u64,
    /// Bound on opening a new connection.
    pub connect_timeout_ms: u64,
    /// Consecutive Redis failures after which calls are skipped for `breaker_cooldown_ms`.
    pub breaker_failure_threshold: u32,
    pub breaker_cooldown_ms: u64,
    /// At most one error log line per this interval (the rest are counted in metrics).
    pub error_log_interval_secs: u64,
}

/// `redis.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisMode {
    Single,
    Cluster,
}

/// `redis.pool`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RedisPool {
    /// deadpool-redis's pool (its recycle PINGs on every checkout).
    #[serde(rename = "deadpool-redis")]
    DeadpoolRedis,
    /// deadpool with our own manager: no PING on checkout, a failed connection is detached.
    #[serde(rename = "multiplexed")]
    Multiplexed,
}

/// A list of secrets from a TOML list or a comma-separated string (environment variables).
fn seed_list<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Secret>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seeds {
        List(Vec<String>),
        Joined(String),
    }
    let seeds = match Seeds::deserialize(d)? {
        Seeds::List(list) => list,
        Seeds::Joined(joined) => joined.split(',').map(str::to_owned).collect(),
    };
    Ok(seeds
        .into_iter()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .map(Secret::new)
        .collect())
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSettings {
    /// The HMAC secret for cache keys; must equal the edge's. `hex:` prefix for hex-encoded bytes,
    /// otherwise the UTF-8 bytes of the string. Required unless `dev_mode`.
    #[serde(default)]
    pub key_secret: Option<Secret>,
    /// Upper bound on any entry's TTL (a tenant's `cache_ttl_secs` is capped to it).
    pub ttl_cap_secs: u64,
    /// How long a coalesced waiter waits for the leader before answering 504.
    pub coalesce_wait_timeout_ms: u64,
    /// How often token counters are flushed to Redis.
    pub usage_flush_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsSettings {
    /// Path of `tenants.json` (the same file fills the edge's Config Store). Required outside
    /// `dev_mode`; in it, [`DEV_TENANTS_FILE`] when unset.
    #[serde(default)]
    pub file: Option<PathBuf>,
}

/// Limits on the cache purge routes (`DELETE /v1/cache`, `DELETE /v1/cache/{key}`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeSettings {
    /// Purge requests a tenant may make per minute on one replica (a token bucket); past it,
    /// 429 with `Retry-After`. Each purge costs Fastly API requests from the shared budget.
    pub tenant_per_minute: u32,
    /// How many purge requests a tenant may make at once before the rate applies.
    pub tenant_burst: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySettings {
    /// Require `x-gateway-edge-secret` on every API request (the origin is only reachable
    /// through the edge).
    pub require_edge_secret: bool,
    /// Must not be empty; at least 16 bytes outside `dev_mode`.
    #[serde(default)]
    pub edge_secret: Option<Secret>,
    /// `/metrics` and the admin purge require `Authorization: Bearer <admin_token>`. Required
    /// outside `dev_mode`; in it, `/metrics` is open when unset.
    #[serde(default)]
    pub admin_token: Option<Secret>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSettings {
    /// Retries allowed per request, on average (0.2 = at most 20 % extra load).
    pub retry_budget_ratio: f64,
    /// Retries always allowed per second regardless of traffic (the floor).
    pub retry_budget_min_per_sec: f64,
    /// Consecutive failures that open a provider's breaker.
    pub breaker_failure_threshold: u32,
    /// How long an open breaker skips its provider before one probe.
    pub breaker_cooldown_ms: u64,
    /// Longest silence between two chunks of a streamed answer.
    pub stream_idle_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    pub name: String,
    /// OpenAI-compatible base URL including the version, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Name of an environment variable that, when set, replaces `base_url` (local runs point
    /// the mock provider's address in this way).
    #[serde(default)]
    pub base_url_env: Option<String>,
    /// Name of the environment variable holding this provider's API key (optional).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Resolved from `api_key_env` at load; tests set it directly.
    #[serde(skip)]
    pub api_key: Option<Secret>,
    /// Client model → provider model. A client model `*` forwards any model unchanged.
    pub models: BTreeMap<String, String>,
    /// The APIs it serves (`chat`, `responses`, `messages`); the router sends a route only to
    /// providers that serve its API. Default: `["chat"]`.
    #[serde(default = "crate::provider_api::ProviderApi::default_set")]
    pub apis: Vec<crate::provider_api::ProviderApi>,
    /// Lower is tried first.
    #[serde(default)]
    pub priority: u32,
    /// Share of traffic among providers of equal priority.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Per attempt: until the full answer (non-stream) or the response head (stream).
    #[serde(default = "default_provider_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "default_provider_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
}

fn default_weight() -> u32 {
    1
}
fn default_provider_timeout_ms() -> u64 {
    60_000
}
fn default_provider_connect_timeout_ms() -> u64 {
    2_000
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    /// `tracing_subscriber::EnvFilter` syntax.
    pub filter: String,
    /// OTLP/HTTP collector base URL (e.g. `http://127.0.0.1:4318`); spans are posted as JSON to
    /// `<url>/v1/traces`. Unset: no spans are exported.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_service_name() -> String {
    "gateway-origin".to_owned()
}

/// The dual-write to the edge tier through the Fastly KV REST API (`replicator.rs`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationSettings {
    /// Off: nothing is written to KV (the edge still works from what it holds).
    pub enabled: bool,
    /// `https://api.fastly.com`; plain `http` is only accepted for a loopback host (a fake).
    pub api_base_url: String,
    /// Name of an environment variable that, when set, replaces `api_base_url` (local runs
    /// point the fake Fastly API's address in this way).
    #[serde(default)]
    pub api_base_url_env: Option<String>,
    /// The KV store's id (not its link name). Required when enabled.
    pub store_id: String,
    /// Name of the environment variable holding the Fastly API token (`Fastly-Key`).
    pub api_token_env: String,
    /// Resolved from `api_token_env` at load; tests set it directly. Never logged.
    #[serde(skip)]
    pub api_token: Option<Secret>,
    /// Writes the shared replication log may hold (all replicas' offers together); beyond
    /// it offers are dropped and counted.
    pub queue_capacity: usize,
    /// Most entries in one batch request.
    pub batch_max_entries: usize,
    /// Most bytes in one batch body (base64 values included); a larger entry goes alone.
    pub batch_max_bytes: usize,
    /// How long a batch waits for more entries after its first one.
    pub linger_ms: u64,
    /// Offers of an entry already queued or written within this window are skipped.
    pub dedup_window_ms: u64,
    /// Bound on one API request, connection included.
    pub request_timeout_ms: u64,
    /// Retries of one request after 5xx, timeouts and resets (429s wait, they do not count).
    pub max_retries: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// API requests this region's replicas may make per hour together (writes, lists and
    /// deletes; a token bucket in this region's Redis). The Fastly limit (~1000/h) is per
    /// user: regions sharing a token each get a static share here, and the shares must sum to
    /// at most the limit (README, "Regions").
    pub hourly_request_budget: u32,
    /// Purges waiting for the API (a tenant purge counts once, a key purge once per key;
    /// pending purges of a tenant merge). Past it a purge is refused with 503, never dropped
    /// after the caller was told it was accepted.
    pub purge_queue_capacity: usize,
    /// The id of the Config Store `tenants` the edge reads. When set, a tenant purge is one
    /// bulk update of the tenant's records there (its new purge generation) instead of a
    /// listing and one delete per KV key.
    pub config_store_id: String,
    /// Records of the shared replication log that a replica took and has not acknowledged
    /// for this long are taken over by another (a crashed replica's work).
    pub claim_idle_ms: u64,
    /// How often an idle lane looks at the shared log for work another replica logged.
    pub poll_ms: u64,
}

/// Why settings could not be loaded. Every message names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings: {0}")]
    Load(#[from] config::ConfigError),
    #[error("settings: invalid value for `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error(
        "settings: refusing to start outside dev_mode without the production settings: {0}. (For a local run, set dev_mode = true.)"
    )]
    Production(String),
}

pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> SettingsError {
    SettingsError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

impl Settings {
    /// Defaults, then `file` (if any), then `GATEWAY__SECTION__KEY` entries of `env`; provider
    /// keys are read from `env` under the names their settings give. Validated before returning.
    pub fn load(
        file: Option<&Path>,
        env: &HashMap<String, String>,
    ) -> Result<Settings, SettingsError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULTS_TOML,
            config::FileFormat::Toml,
        ));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let gateway_env: config::Map<String, String> = env
            .iter()
            .filter(|(k, _)| k.starts_with("GATEWAY__"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("GATEWAY")
                .prefix_separator("__")
                .separator("__")
                .source(Some(gateway_env)),
        );
        let mut settings: Settings = builder.build()?.try_deserialize()?;
        for (i, provider) in settings.providers.iter_mut().enumerate() {
            if let Some(url) = provider.base_url_env.as_ref().and_then(|var| env.get(var))
                && !url.is_empty()
            {
                provider.base_url = url.clone();
            }
            if let Some(var) = &provider.api_key_env {
                match env.get(var) {
                    Some(value) if !value.is_empty() => {
                        provider.api_key = Some(Secret::new(value.clone()))
                    }
                    _ => {
                        return Err(invalid(
                            format!("providers[{i}].api_key_env"),
                            format!("environment variable {var} is not set"),
                        ));
                    }
                }
            }
        }
        if let Some(url) = settings
            .replication
            .api_base_url_env
            .as_ref()
            .and_then(|var| env.get(var))
            && !url.is_empty()
        {
            settings.replication.api_base_url = url.clone();
        }
        if settings.replication.enabled {
            let var = &settings.replication.api_token_env;
            match env.get(var) {
                Some(value) if !value.is_empty() => {
                    settings.replication.api_token = Some(Secret::new(value.clone()))
                }
                _ => {
                    return Err(invalid(
                        "replication.api_token_env",
                        format!("environment variable {var} is not set"),
                    ));
                }
            }
        }
        settings.validate()?;
        Ok(settings)
    }

    /// The compiled-in defaults alone, in `dev_mode`, with no provider: a base for tests,
    /// which then set the listen port to 0, the Redis URL, the tenants file and providers.
    pub fn for_tests() -> Settings {
        let mut settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(
                DEFAULTS_TOML,
                config::FileFormat::Toml,
            ))
            .build()
            .and_then(|c| c.try_deserialize())
            .unwrap_or_else(|e| unreachable!("the compiled-in defaults always parse: {e}"));
        settings.dev_mode = true;
        settings.server.listen = "127.0.0.1:0".into();
        settings.server.workers = 2;
        settings
    }

    /// The tenants file to load: `tenants.file`, or in `dev_mode` the development fixture.
    /// `None` only outside `dev_mode` without a file, which validation refuses.
    pub fn tenants_file(&self) -> Option<PathBuf> {
        match &self.tenants.file {
            Some(file) => Some(file.clone()),
            None if self.dev_mode => Some(PathBuf::from(DEV_TENANTS_FILE)),
            None => None,
        }
    }

    /// The cache key secret's bytes (validated at load).
    pub fn cache_key_secret(&self) -> Vec<u8> {
        match &self.cache.key_secret {
            Some(secret) => {
                decode_key_secret(secret).unwrap_or_else(|_| secret.expose().as_bytes().to_vec())
            }
            None => DEV_CACHE_KEY_SECRET.as_bytes().to_vec(),
        }
    }

    pub fn listen_addr(&self) -> Result<SocketAddr, SettingsError> {
        self.server
            .listen
            .parse()
            .map_err(|e: std::net::AddrParseError| invalid("server.listen", e.to_string()))
    }
}

impl RedisSettings {
    /// The same Redis with the bounds of the replication log: its calls carry whole batches
    /// (hundreds of entries) and run off the request path, so they may take longer than a
    /// cache read, on a few connections of their own.
    pub fn for_replication(&self) -> RedisSettings {
        RedisSettings {
            pool_size: 4,
            response_timeout_ms: self.response_timeout_ms.max(2_000),
            pool_wait_timeout_ms: self.pool_wait_timeout_ms.max(1_000),
            connect_timeout_ms: self.connect_timeout_ms.max(1_000),
            ..self.clone()
        }
    }
}

/// Milliseconds → `Duration`, for the `*_ms` settings.
pub fn ms(value: u64) -> Duration {
    Duration::from_millis(value)
}

#[cfg(test)]
pub(crate) mod tests;

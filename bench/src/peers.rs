//! A peer for comparison: the LiteLLM proxy (installed by `just bench-peers` into
//! `.local/bench-venv`) with its Redis cache on the bench's Redis, in front of the same mock
//! provider. One worker, like the origin. Killed on drop.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use gateway_e2e::{RedisServer, free_port};
use gateway_fixtures::ChildProcess;

/// A running `litellm` proxy.
pub struct LiteLlm {
    /// Only held: dropping it stops the proxy.
    _process: ChildProcess,
    port: u16,
    master_key: String,
}

impl LiteLlm {
    /// Starts `litellm` (the executable at `litellm`) routing `gpt-4o-mini` to the mock
    /// provider at `provider_base_url`, caching in `redis`; waits until it listens.
    pub async fn start(
        litellm: &Path,
        provider_base_url: &str,
        redis: &RedisServer,
    ) -> anyhow::Result<LiteLlm> {
        let port = free_port()?;
        let mut process = ChildProcess::new("gw-bench-litellm")?;
        // LiteLLM refuses to start without a master key; a fresh one per run, used as the
        // clients' API key.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let master_key = format!("sk-bench-{nanos:032x}{:08x}", std::process::id());
        let config = format!(
            "general_settings:\n  master_key: {master_key}\nmodel_list:\n  - model_name: gpt-4o-mini\n    litellm_params:\n      model: openai/gpt-4o-mini\n      api_base: {provider_base_url}\n      api_key: sk-bench\nlitellm_settings:\n  cache: true\n  cache_params:\n    type: redis\n    host: 127.0.0.1\n    port: {}\n    ttl: 3600\n",
            redis.port()
        );
        let config_file = process.dir().join("litellm.yaml");
        std::fs::write(&config_file, config)?;
        let mut command = Command::new(litellm);
        command
            .arg("--config")
            .arg(&config_file)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--num_workers", "1"])
            // Offline: no telemetry, no fetching of the model price map.
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_TELEMETRY", "False")
            .env("LITELLM_LOG", "ERROR");
        process
            .spawn(command)
            .with_context(|| format!("starting {}", litellm.display()))?;
        // Start-up takes tens of seconds (imports), too long to block this runtime's thread.
        let process = tokio::task::spawn_blocking(move || {
            process
                .wait_for_port(port, Duration::from_secs(180))
                .context("litellm did not start")
                .map(|()| process)
        })
        .await??;
        Ok(LiteLlm {
            _process: process,
            port,
            master_key,
        })
    }

    /// The API key clients send (the proxy's master key).
    pub fn api_key(&self) -> &str {
        &self.master_key
    }

    pub fn chat_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/chat/completions", self.port)
    }
}

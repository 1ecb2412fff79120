//! A peer for comparison: the LiteLLM proxy (installed by `just bench-peers` into
//! `.local/bench-venv`) with its Redis cache on the bench's Redis, in front of the same mock
//! provider. One worker, like the origin. Killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use gateway_e2e::{RedisServer, free_port, wait_for_port};

/// A running `litellm` proxy.
pub struct LiteLlm {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    master_key: String,
}

impl LiteLlm {
    /// Starts `litellm` (the executable at `litellm`) routing `gpt-4o-mini` to the mock
    /// provider at `provider_base_url`, caching in `redis`; waits until it listens.
    pub async fn start(
        litellm: &Path,
        provider_base_url: &str,
        redis: &RedisServer,
        scratch: &Path,
    ) -> anyhow::Result<LiteLlm> {
        let port = free_port()?;
        let dir = scratch.join(format!("litellm-{port}"));
        std::fs::create_dir_all(&dir)?;
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
        let config_file = dir.join("litellm.yaml");
        std::fs::write(&config_file, config)?;
        let log = std::fs::File::create(dir.join("litellm.log"))?;
        let child = Command::new(litellm)
            .arg("--config")
            .arg(&config_file)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--num_workers", "1"])
            // Offline: no telemetry, no fetching of the model price map.
            .env("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            .env("LITELLM_TELEMETRY", "False")
            .env("LITELLM_LOG", "ERROR")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", litellm.display()))?;
        let mut peer = LiteLlm {
            child: Some(child),
            port,
            dir,
            master_key,
        };
        // Start-up takes tens of seconds (imports); give up early if the process exits.
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        loop {
            if wait_for_port(port, Duration::from_millis(500)).is_ok() {
                return Ok(peer);
            }
            let exited = peer
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited || std::time::Instant::now() > deadline {
                peer.stop();
                bail!("litellm did not start:\n{}", peer.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The API key clients send (the proxy's master key).
    pub fn api_key(&self) -> &str {
        &self.master_key
    }

    pub fn chat_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1/chat/completions", self.port)
    }

    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("litellm.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for LiteLlm {
    fn drop(&mut self) {
        self.stop();
    }
}

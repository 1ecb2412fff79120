//! The origin as its own process: the release `gateway-origin` binary with a generated settings
//! file, so its peak RSS (`VmHWM`) is the origin's alone. Killed on drop; it logs to a file in
//! its scratch directory, which goes with it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use gateway_e2e::stack::SECRET;
use gateway_e2e::{free_port, repo_root};
use gateway_fixtures::ChildProcess;

/// What the origin is started with.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// One Redis node's URL, or (with `redis_cluster`) ignored.
    pub redis_url: String,
    /// Seed URLs of a Redis Cluster: when not empty, `redis.mode = "cluster"` on these.
    pub redis_cluster: Vec<String>,
    /// `redis.pool` (`deadpool-redis` or `multiplexed`); `None` keeps the origin's default.
    pub redis_pool: Option<&'static str>,
    /// The mock provider's `http://127.0.0.1:PORT/v1`.
    pub provider_base_url: String,
    /// actix workers (the bare floor gets the same number).
    pub workers: usize,
    /// Another revision's `gateway-origin` and its `tenants.json` (a `--baseline`); `None`
    /// runs today's with `fixtures/tenants.json`.
    pub revision: Option<(PathBuf, PathBuf)>,
    /// A program and its arguments the origin runs under (`valgrind --tool=callgrind ...`);
    /// empty to run it directly.
    pub wrapper: Vec<String>,
}

/// A running `gateway-origin` process.
pub struct OriginProcess {
    process: ChildProcess,
    port: u16,
}

/// The `gateway-origin` binary built beside this one (`cargo build --release` builds both).
fn origin_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let binary = exe
        .parent()
        .context("the bench binary has a directory")?
        .join("gateway-origin");
    if !binary.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p gateway-origin` (`just bench` does)",
            binary.display()
        );
    }
    Ok(binary)
}

/// The fixture tenants with their request-rate limit raised out of reach: the hit path still
/// pays for the rate and budget accounting (one pipelined Redis call beside the cache read),
/// but no request is refused, so every answer measured is a real hit.
fn bench_tenants(source: &Path) -> anyhow::Result<String> {
    // Edited as JSON, not through today's tenant types: a baseline revision's file must reach
    // its origin without the fields (and defaults) today's types would add.
    let mut file: serde_json::Value = serde_json::from_slice(&std::fs::read(source)?)?;
    let tenants = file
        .get_mut("tenants")
        .and_then(serde_json::Value::as_array_mut)
        .with_context(|| format!("{}: no tenants array", source.display()))?;
    for tenant in tenants {
        for (field, out_of_reach) in [
            ("requests_per_second", 1_000_000_000_u64),
            ("monthly_token_budget", u64::MAX / 4),
        ] {
            if let Some(value) = tenant.get_mut(field).filter(|v| !v.is_null()) {
                *value = out_of_reach.into();
            }
        }
    }
    Ok(serde_json::to_string(&file)?)
}

impl OriginConfig {
    /// A plain origin on one Redis node, with the default pool.
    pub fn single(redis_url: String, provider_base_url: String, workers: usize) -> OriginConfig {
        OriginConfig {
            redis_url,
            redis_cluster: Vec::new(),
            redis_pool: None,
            provider_base_url,
            workers,
            revision: None,
            wrapper: Vec::new(),
        }
    }

    /// The body of the settings file's `[redis]` table.
    fn redis_section(&self) -> String {
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let mut lines = if self.redis_cluster.is_empty() {
            vec![format!("url = {}", q(&self.redis_url))]
        } else {
            let seeds: Vec<String> = self.redis_cluster.iter().map(|u| q(u)).collect();
            vec![
                "mode = \"cluster\"".to_owned(),
                format!("cluster_urls = [{}]", seeds.join(", ")),
            ]
        };
        if let Some(pool) = self.redis_pool {
            lines.push(format!("pool = {}", q(pool)));
        }
        lines.join("\n")
    }
}

impl OriginProcess {
    pub fn start(config: &OriginConfig) -> anyhow::Result<OriginProcess> {
        let (binary, tenants_source) = match &config.revision {
            Some((binary, tenants)) => (binary.clone(), tenants.clone()),
            None => (origin_binary()?, repo_root().join("fixtures/tenants.json")),
        };
        let port = free_port()?;
        let mut process = ChildProcess::new("gw-bench-origin")?;
        let tenants = process.dir().join("tenants.json");
        std::fs::write(&tenants, bench_tenants(&tenants_source)?)?;
        let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
        let settings = format!(
            r#"dev_mode = true

[server]
listen = "127.0.0.1:{port}"
workers = {workers}

[redis]
{redis}

[cache]
key_secret = {secret}

[tenants]
file = {tenants}

[[providers]]
name = "mock"
base_url = {provider}
api_key_env = "BENCH_PROVIDER_API_KEY"
models = {{ "gpt-4o-mini" = "gpt-4o-mini" }}
timeout_ms = 10000
connect_timeout_ms = 1000

[log]
format = "json"
filter = "info"

[replication]
enabled = false
"#,
            workers = config.workers,
            redis = config.redis_section(),
            secret = q(SECRET),
            tenants = q(&tenants.to_string_lossy()),
            provider = q(&config.provider_base_url),
        );
        let settings_file = process.dir().join("origin.toml");
        std::fs::write(&settings_file, settings)?;
        let mut command = match config.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => Command::new(binary),
        };
        command
            .arg("--config")
            .arg(&settings_file)
            .env("BENCH_PROVIDER_API_KEY", "sk-bench")
            .env_remove("RUST_LOG");
        process.spawn(command).context("starting gateway-origin")?;
        // Under a wrapper like valgrind, start-up (the semantic model's load) is ~50x slower.
        let start_timeout = if config.wrapper.is_empty() { 20 } else { 600 };
        process
            .wait_for_port(port, Duration::from_secs(start_timeout))
            .context("gateway-origin did not start")?;
        Ok(OriginProcess { process, port })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The origin's process id (`None` once it is stopped).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Peak resident set size so far (`VmHWM`), in KiB.
    pub fn peak_rss_kib(&self) -> anyhow::Result<u64> {
        let pid = self.process.pid().context("the origin is stopped")?;
        proc_status_kib(pid, "VmHWM:")
    }

    /// Resident set size now (`VmRSS`), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let pid = self.process.pid().context("the origin is stopped")?;
        proc_status_kib(pid, "VmRSS:")
    }

    /// The last lines the origin wrote (for error messages).
    pub fn log_tail(&self) -> String {
        self.process.log_tail(20)
    }
}

/// A `kB` field of `/proc/<pid>/status`.
pub fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("{field} in /proc/{pid}/status"))
}

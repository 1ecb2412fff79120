//! N origin replicas as real `gateway-origin` processes on free ports, behind one round-robin
//! TCP proxy, so a test can `kill -9` one, stop one with SIGTERM, and start it again. It owns
//! the processes and the proxy; what they share (Redis, providers, the fake API) is the caller's.
//!
//! The methods that wait (start, stop, restart) block a runtime thread while they do, so tests
//! using them run on the multi-threaded runtime (as every e2e test does).

use std::net::SocketAddr;
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gateway_fixtures::{ChildProcess, RoundRobinProxy, free_port};

use crate::origin_binary::origin_binary;
use crate::origin_config::OriginConfig;
use crate::repo_root;

/// A change to one replica's settings before its first start: `(index, settings)`.
pub type SettingsHook = Box<dyn Fn(usize, &mut OriginConfig) + Send + Sync>;

/// How the replicas start.
pub struct ReplicaOptions {
    /// The settings every replica starts from; `server.listen` is set per replica.
    pub config: OriginConfig,
    /// Environment of every replica process (the API keys the settings name, say, or
    /// `GATEWAY__SECTION__KEY` overrides), on top of the test's own environment.
    pub env: Vec<(String, String)>,
    /// Called once per replica, after `config` and before its first start (it must leave
    /// `server.listen` alone: the proxy already points at that port).
    pub settings: Option<SettingsHook>,
    /// How long a replica may take to listen.
    pub start_timeout: Duration,
    /// How long [`Replicas::stop`] waits for a replica to exit after SIGTERM.
    pub stop_timeout: Duration,
}

impl Default for ReplicaOptions {
    fn default() -> ReplicaOptions {
        ReplicaOptions {
            config: OriginConfig::default(),
            env: Vec::new(),
            settings: None,
            start_timeout: Duration::from_secs(30),
            stop_timeout: Duration::from_secs(20),
        }
    }
}

struct Replica {
    port: u16,
    config: OriginConfig,
    process: ChildProcess,
}

/// Running origin replicas (index 0..n) and the proxy in front of them. Dropping it kills
/// every replica and closes the proxy.
pub struct Replicas {
    replicas: Vec<Replica>,
    proxy: RoundRobinProxy,
    env: Vec<(String, String)>,
    start_timeout: Duration,
    stop_timeout: Duration,
}

impl Replicas {
    /// Starts `count` replicas (all at once, then waits until each listens) and the proxy.
    pub async fn start(count: usize, options: ReplicaOptions) -> anyhow::Result<Replicas> {
        if count == 0 {
            bail!("at least one replica");
        }
        let mut replicas = Vec::with_capacity(count);
        for index in 0..count {
            let port = free_port()?;
            let mut config = options.config.clone();
            config.set_str("server", "listen", &format!("127.0.0.1:{port}"));
            if let Some(hook) = &options.settings {
                hook(index, &mut config);
            }
            replicas.push(Replica {
                port,
                config,
                process: ChildProcess::new(&format!("gw-replica-{index}"))?,
            });
        }
        let upstreams: Vec<_> = replicas
            .iter()
            .map(|r| SocketAddr::from(([127, 0, 0, 1], r.port)))
            .collect();
        let proxy = RoundRobinProxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), &upstreams)
            .await
            .context("the round-robin proxy starts")?;
        let mut all = Replicas {
            replicas,
            proxy,
            env: options.env,
            start_timeout: options.start_timeout,
            stop_timeout: options.stop_timeout,
        };
        for index in 0..count {
            all.spawn(index)?;
        }
        let timeout = all.start_timeout;
        for (index, replica) in all.replicas.iter_mut().enumerate() {
            tokio::task::block_in_place(|| replica.process.wait_for_port(replica.port, timeout))
                .with_context(|| format!("replica {index} starts"))?;
        }
        Ok(all)
    }

    /// How many replicas there are (running or not).
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Never true: there is at least one replica.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// `http://127.0.0.1:<port>` of replica `index`, straight (not through the proxy).
    pub fn url(&self, index: usize) -> String {
        format!("http://127.0.0.1:{}", self.replica(index).port)
    }

    pub fn port(&self, index: usize) -> u16 {
        self.replica(index).port
    }

    /// `http://127.0.0.1:<port>` of the round-robin proxy in front of every replica.
    pub fn proxy_url(&self) -> String {
        self.proxy.url()
    }

    /// The proxy: its per-replica counters, and `take_out` / `put_back` for drains.
    pub fn proxy(&self) -> &RoundRobinProxy {
        &self.proxy
    }

    /// Everything replica `index` has logged, over all its starts.
    pub fn log(&self, index: usize) -> String {
        self.replica(index).process.log()
    }

    /// The last `lines` lines of [`Replicas::log`], for assertion messages.
    pub fn log_tail(&self, index: usize, lines: usize) -> String {
        self.replica(index).process.log_tail(lines)
    }

    /// The process id of replica `index`; `None` while it is not running.
    pub fn pid(&self, index: usize) -> Option<u32> {
        self.replica(index).process.pid()
    }

    /// Whether replica `index` was started and neither killed nor stopped since (a crash on
    /// its own is not noticed until [`Replicas::stop`] or [`Replicas::restart`]).
    pub fn is_running(&self, index: usize) -> bool {
        self.pid(index).is_some()
    }

    /// The settings replica `index` runs with; a change applies at its next
    /// [`Replicas::restart`].
    pub fn config_mut(&mut self, index: usize) -> &mut OriginConfig {
        &mut self.replica_mut(index).config
    }

    /// Crashes replica `index`: SIGKILL, nothing flushed, nothing drained. A no-op if it is
    /// not running.
    pub fn kill(&mut self, index: usize) {
        self.replica_mut(index).process.kill();
    }

    /// Sends `signal` as `kill` spells it (`-STOP`, `-CONT`) to replica `index`.
    pub fn signal(&self, index: usize, signal: &str) -> anyhow::Result<()> {
        self.replica(index).process.signal(signal)
    }

    /// A deploy's stop: SIGTERM, then waits (at most the stop timeout) for the replica to drain
    /// and exit. Fails if it is not running or does not exit in time (it is then left running).
    pub async fn stop(&mut self, index: usize) -> anyhow::Result<ExitStatus> {
        let timeout = self.stop_timeout;
        let replica = self.replica_mut(index);
        replica.process.signal("-TERM")?;
        tokio::task::block_in_place(|| replica.process.wait_exit(timeout))
            .with_context(|| format!("replica {index} after SIGTERM"))
    }

    /// Starts replica `index` again, on its port, with its current settings, and waits until it
    /// listens (not until `/readyz` says ready: see [`Replicas::wait_ready`]). Fails if it is
    /// running: kill or stop it first.
    pub async fn restart(&mut self, index: usize) -> anyhow::Result<()> {
        if self.is_running(index) {
            bail!("replica {index} is running: kill or stop it before restarting it");
        }
        self.spawn(index)?;
        let timeout = self.start_timeout;
        let replica = self.replica_mut(index);
        tokio::task::block_in_place(|| replica.process.wait_for_port(replica.port, timeout))
            .with_context(|| format!("replica {index} restarts"))
    }

    /// Waits until replica `index` answers `/readyz` with 200, at most `within`.
    pub async fn wait_ready(&self, index: usize, within: Duration) -> anyhow::Result<()> {
        let url = format!("{}/readyz", self.url(index));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let deadline = Instant::now() + within;
        loop {
            if let Ok(response) = http.get(&url).send().await
                && response.status() == 200
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "replica {index} not ready after {within:?}:\n{}",
                    self.log_tail(index, 20)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Replica `index`'s Prometheus page.
    pub async fn metrics(&self, index: usize) -> anyhow::Result<String> {
        let url = format!("{}/metrics", self.url(index));
        let response = reqwest::get(&url)
            .await
            .with_context(|| format!("GET {url}"))?;
        if response.status() != 200 {
            bail!("GET {url}: {}", response.status());
        }
        Ok(response.text().await?)
    }

    /// Writes replica `index`'s settings file and starts its process (without waiting).
    fn spawn(&mut self, index: usize) -> anyhow::Result<()> {
        let binary = origin_binary()?;
        let env = self.env.clone();
        let replica = self.replica_mut(index);
        let file = replica.process.dir().join("origin.toml");
        std::fs::write(&file, replica.config.render())
            .with_context(|| format!("writing {}", file.display()))?;
        let mut command = Command::new(&binary);
        command
            .arg("--config")
            .arg(&file)
            .envs(env)
            .current_dir(repo_root());
        replica
            .process
            .spawn(command)
            .with_context(|| format!("starting {}", binary.display()))
    }

    fn replica(&self, index: usize) -> &Replica {
        let count = self.replicas.len();
        self.replicas
            .get(index)
            .unwrap_or_else(|| panic!("replica {index} of {count}: no such replica"))
    }

    fn replica_mut(&mut self, index: usize) -> &mut Replica {
        let count = self.replicas.len();
        self.replicas
            .get_mut(index)
            .unwrap_or_else(|| panic!("replica {index} of {count}: no such replica"))
    }
}

/// The sum of every sample of metric `name` (all label sets) on a Prometheus page; 0 when the
/// page has none (a counter never incremented is often not printed at all).
pub fn metric_total(page: &str, name: &str) -> f64 {
    metric_where(page, name, &[])
}

/// The sum of the samples of metric `name` whose labels include every `labels` pair, each
/// written as on the page (`tenant="acme"`); 0 when none matches.
pub fn metric_where(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            let set = line
                .split_once('{')
                .and_then(|(_, rest)| rest.split_once('}'));
            labels
                .iter()
                .all(|label| set.is_some_and(|(set, _)| set.split(',').any(|pair| pair == *label)))
        })
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            // `name{labels} value` or `name value`, not a longer name sharing the prefix.
            let value = if rest.starts_with('{') {
                rest.rsplit_once('}')?.1
            } else if rest.starts_with(' ') {
                rest
            } else {
                return None;
            };
            value.split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_where_sums_only_the_label_sets_holding_every_pair() {
        let page = "gateway_answers_total{outcome=\"hit\",tenant=\"acme\",tier=\"edge\"} 4\n\
            gateway_answers_total{outcome=\"miss\",tenant=\"acme\",tier=\"upstream\"} 1\n\
            gateway_answers_total{outcome=\"hit\",tenant=\"acme-2\",tier=\"edge\"} 7\n";
        let acme = ["tenant=\"acme\""];
        assert_eq!(metric_where(page, "gateway_answers_total", &acme), 5.0);
        let edge = ["tenant=\"acme\"", "tier=\"edge\""];
        assert_eq!(metric_where(page, "gateway_answers_total", &edge), 4.0);
        assert_eq!(
            metric_where(page, "gateway_answers_total", &["tier=\"origin\""]),
            0.0
        );
    }

    #[test]
    fn metric_total_sums_every_label_set_of_exactly_that_name() {
        let page = "# HELP gateway_requests_total Requests.\n\
            gateway_requests_total{route=\"chat\",status=\"200\"} 3\n\
            gateway_requests_total{route=\"chat\",status=\"429\"} 2\n\
            gateway_requests_total_other 100\n\
            gateway_coalesced_waiters_total 4\n";
        assert_eq!(metric_total(page, "gateway_requests_total"), 5.0);
        assert_eq!(metric_total(page, "gateway_coalesced_waiters_total"), 4.0);
        assert_eq!(metric_total(page, "gateway_missing_total"), 0.0);
    }
}

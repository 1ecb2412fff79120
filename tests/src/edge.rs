//! The edge under Viceroy for one test: writes the `fastly.toml` it needs (origin backend,
//! KV seed, stores) into a temp dir and runs the release wasm on a free port. Killed on drop.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use gateway_fixtures::{
    ChildProcess, FakeFastlyApi, LogForwarder, LogForwarderConfig, LogSource, free_port,
    retry_taken_port,
};

use crate::repo_root;

/// One KV entry to preload. Values are bytes (sealed entries are binary): each is written to
/// a file of its own that Viceroy's JSON seed names (`"file"`), since its `"data"` is a string.
#[derive(Debug, Clone)]
pub struct KvSeed {
    pub key: String,
    pub data: Vec<u8>,
    pub metadata: Option<String>,
}

impl KvSeed {
    /// Every live item of a fake Fastly API, to seed a new POP with.
    pub fn from_api(api: &FakeFastlyApi) -> Vec<KvSeed> {
        api.entries()
            .into_iter()
            .map(|item| KvSeed {
                key: item.key,
                data: item.value.to_vec(),
                metadata: item.metadata,
            })
            .collect()
    }
}

/// What the generated `fastly.toml` says.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    /// `http://127.0.0.1:PORT` of the origin (or of a proxy in front of it).
    pub origin_url: String,
    pub populate_on_fallback: bool,
    pub cache_key_secret: String,
    /// `seal_key_current` (`<id>:<secret>`): [`crate::stack::SEAL_KEY`] by default; `None`
    /// leaves it out (an edge that can open no sealed entry and stores nothing).
    pub seal_key_current: Option<String>,
    /// `seal_key_previous`, during a rotation.
    pub seal_key_previous: Option<String>,
    pub edge_shared_secret: Option<String>,
    /// Entries the "POP" starts with (e.g. exported from the fake Fastly KV API).
    pub kv: Vec<KvSeed>,
    pub origin_connect_timeout_ms: u64,
    pub origin_first_byte_timeout_ms: u64,
    /// `edge_config.ttl_cap_secs`: 86400, as in `fastly.toml`'s `[local_server]`.
    pub ttl_cap_secs: u64,
    /// The Config Store `tenants` contents (as `edge_tenants_json` renders them), written
    /// into this edge's scratch directory; `fixtures/edge/tenants.json` when `None`.
    pub tenants_store: Option<String>,
    /// Forward the edge's `usage :: <line>` output in batches to this ingest URL with this
    /// token, as Fastly's HTTPS log endpoint would; `None` leaves the lines in the log.
    pub usage_ingest: Option<(String, String)>,
    /// `edge_config.usage_log` (default true, as in production).
    pub usage_log: bool,
    /// Origin regions `(name, url)`: each becomes backend `origin_<name>`; empty, only the
    /// one `origin` backend (the one-region setup).
    pub regions: Vec<(String, String)>,
    /// `edge_config.regions` (the order per POP) as written; `None` leaves it out.
    pub regions_order: Option<String>,
    /// `edge_config.pop`: the POP this edge pretends to be (Viceroy calls every POP `XXX`).
    pub pop: Option<String>,
    /// A program and its arguments Viceroy runs under (`valgrind --tool=callgrind ...`, for
    /// the bench's instruction counts); empty, Viceroy runs alone.
    pub wrapper: Vec<String>,
}

impl EdgeConfig {
    pub fn new(origin_url: impl Into<String>, cache_key_secret: impl Into<String>) -> EdgeConfig {
        EdgeConfig {
            origin_url: origin_url.into(),
            populate_on_fallback: true,
            cache_key_secret: cache_key_secret.into(),
            seal_key_current: Some(crate::stack::edge_seal_secret(
                crate::stack::SEAL_KEY.0,
                crate::stack::SEAL_KEY.1,
            )),
            seal_key_previous: None,
            edge_shared_secret: None,
            kv: Vec::new(),
            origin_connect_timeout_ms: 1000,
            origin_first_byte_timeout_ms: 30_000,
            ttl_cap_secs: 86_400,
            tenants_store: None,
            usage_ingest: None,
            usage_log: true,
            regions: Vec::new(),
            regions_order: None,
            pop: None,
            wrapper: Vec::new(),
        }
    }
}

/// A running Viceroy serving the edge wasm.
pub struct Edge {
    port: u16,
    process: ChildProcess,
    forwarder: Option<LogForwarder>,
}

/// The wasm `just build-edge` produces (the `edge` profile).
pub fn edge_wasm() -> anyhow::Result<PathBuf> {
    let wasm = repo_root().join("target/wasm32-wasip1/edge/gateway-compute.wasm");
    if !wasm.exists() {
        bail!(
            "{} is missing: run `just build-edge` (or `just test`, which builds it)",
            wasm.display()
        );
    }
    Ok(wasm)
}

impl Edge {
    /// Must run inside a Tokio runtime when `usage_ingest` is set (the forwarder runs on it).
    pub fn start(config: &EdgeConfig) -> anyhow::Result<Edge> {
        Edge::start_with_wasm(config, &edge_wasm()?)
    }

    /// `start` with another build of the edge (e.g. an earlier revision's, as a benchmark
    /// baseline) under the same manifest.
    pub fn start_with_wasm(config: &EdgeConfig, wasm: &Path) -> anyhow::Result<Edge> {
        let mut edge = Edge::start_wasm_under(&config.wrapper, wasm, "gw-edge", |dir| {
            manifest_toml(config, dir)
        })?;
        if let Some((url, token)) = &config.usage_ingest {
            let mut forward = LogForwarderConfig::new(url.clone(), token.clone());
            // Short batches, so a test sees its records within a second.
            forward.linger = Duration::from_millis(200);
            let source = LogSource::file(edge.process.log_path());
            edge.forwarder = Some(LogForwarder::start(forward, source)?);
        }
        Ok(edge)
    }

    /// The usage forwarder, when the edge was started with `usage_ingest`.
    pub fn forwarder(&self) -> Option<&LogForwarder> {
        self.forwarder.as_ref()
    }

    /// Stops the usage forwarder (as if Fastly's log delivery stopped); the edge runs on.
    pub async fn stop_forwarder(&mut self) {
        if let Some(forwarder) = self.forwarder.take() {
            forwarder.stop().await;
        }
    }

    /// Any Compute wasm under Viceroy on a free port, with the manifest `manifest` writes
    /// for a scratch directory (e.g. a bare service as a benchmark floor). `label` names the
    /// scratch directory and the log in it. Started again on fresh ports if Viceroy found its
    /// port taken.
    pub fn start_wasm(
        wasm: &Path,
        label: &str,
        manifest: impl Fn(&Path) -> anyhow::Result<String>,
    ) -> anyhow::Result<Edge> {
        Edge::start_wasm_under(&[], wasm, label, manifest)
    }

    /// `start_wasm` with Viceroy run under `wrapper` (a program and its arguments; empty for
    /// none). A wrapped Viceroy is given ten minutes to listen: under valgrind, compiling the
    /// wasm takes most of one.
    pub fn start_wasm_under(
        wrapper: &[String],
        wasm: &Path,
        label: &str,
        manifest: impl Fn(&Path) -> anyhow::Result<String>,
    ) -> anyhow::Result<Edge> {
        retry_taken_port(|| Edge::spawn_wasm(wrapper, wasm, label, &manifest))
    }

    fn spawn_wasm(
        wrapper: &[String],
        wasm: &Path,
        label: &str,
        manifest: &impl Fn(&Path) -> anyhow::Result<String>,
    ) -> anyhow::Result<Edge> {
        let port = free_port()?;
        let mut process = ChildProcess::new(label)?;
        let manifest_path = process.dir().join("fastly.toml");
        std::fs::write(&manifest_path, manifest(process.dir())?)?;
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg("viceroy");
                command
            }
            None => Command::new("viceroy"),
        };
        let listen_within = if wrapper.is_empty() {
            Duration::from_secs(60)
        } else {
            Duration::from_secs(600)
        };
        command
            .arg("-C")
            .arg(&manifest_path)
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .arg(wasm)
            .current_dir(repo_root());
        process
            .spawn(command)
            .context("viceroy is not installed (run `just setup`)")?;
        process
            .wait_for_port(port, listen_within)
            .context("viceroy did not start")?;
        Ok(Edge {
            port,
            process,
            forwarder: None,
        })
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Viceroy's process id (`None` once it is stopped).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// What Viceroy and the guest printed (the edge's log lines).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The edge's per-request log lines (`"tier":"edge"`), parsed, oldest first.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter(|line| line.contains("\"tier\":\"edge\""))
            .filter_map(|line| serde_json::from_str(line.get(line.find('{')?..)?).ok())
            .collect()
    }

    /// Requests the edge has finished, work after the response (local populate) included:
    /// its last step for each request is one `"tier":"edge"` log line.
    pub fn finished(&self) -> usize {
        self.log()
            .lines()
            .filter(|line| line.contains("\"tier\":\"edge\""))
            .count()
    }

    pub fn stop(&mut self) {
        self.process.kill();
    }
}

fn manifest_toml(config: &EdgeConfig, dir: &Path) -> anyhow::Result<String> {
    let values = dir.join("kv-values");
    std::fs::create_dir_all(&values)?;
    let mut seed: BTreeMap<&str, serde_json::Value> = BTreeMap::new();
    for (i, e) in config.kv.iter().enumerate() {
        let file = values.join(format!("{i}.bin"));
        std::fs::write(&file, &e.data)?;
        let mut item = serde_json::json!({ "file": file.to_string_lossy() });
        if let Some(m) = &e.metadata {
            item["metadata"] = serde_json::Value::String(m.clone());
        }
        seed.insert(e.key.as_str(), item);
    }
    let seed_file = dir.join("kv-seed.json");
    std::fs::write(&seed_file, serde_json::to_vec(&seed)?)?;
    let tenants = match &config.tenants_store {
        Some(contents) => {
            let file = dir.join("tenants.json");
            std::fs::write(&file, contents)?;
            file
        }
        None => repo_root().join("fixtures/edge/tenants.json"),
    };
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let mut t = String::new();
    writeln!(
        t,
        "manifest_version = 3\nname = \"gateway-edge-test\"\nlanguage = \"rust\"\n"
    )?;
    writeln!(
        t,
        "[local_server.backends.origin]\nurl = {}",
        q(&config.origin_url)
    )?;
    writeln!(
        t,
        "first_byte_timeout_ms = {}",
        config.origin_first_byte_timeout_ms
    )?;
    writeln!(
        t,
        "between_bytes_timeout_ms = {}\n",
        config.origin_first_byte_timeout_ms
    )?;
    for (name, url) in &config.regions {
        writeln!(
            t,
            "[local_server.backends.origin_{name}]\nurl = {}\nfirst_byte_timeout_ms = {}\n",
            q(url),
            config.origin_first_byte_timeout_ms
        )?;
    }
    if config.kv.is_empty() {
        writeln!(t, "[local_server.kv_stores]\nedge_cache = []\n")?;
    } else {
        let file = seed_file.to_string_lossy();
        writeln!(
            t,
            "[local_server.kv_stores.edge_cache]\nfile = {}\nformat = \"json\"\n",
            q(&file)
        )?;
    }
    let tenants = tenants.to_string_lossy();
    writeln!(
        t,
        "[local_server.config_stores.tenants]\nformat = \"json\"\nfile = {}\n",
        q(&tenants)
    )?;
    writeln!(
        t,
        "[local_server.config_stores.edge_config]\nformat = \"inline-toml\"\n"
    )?;
    writeln!(t, "[local_server.config_stores.edge_config.contents]")?;
    writeln!(
        t,
        "populate_on_fallback = \"{}\"",
        config.populate_on_fallback
    )?;
    writeln!(
        t,
        "origin_connect_timeout_ms = \"{}\"",
        config.origin_connect_timeout_ms
    )?;
    writeln!(
        t,
        "origin_first_byte_timeout_ms = \"{}\"",
        config.origin_first_byte_timeout_ms
    )?;
    writeln!(t, "usage_log = \"{}\"", config.usage_log)?;
    if let Some(order) = &config.regions_order {
        writeln!(t, "regions = {}", q(order))?;
    }
    if let Some(pop) = &config.pop {
        writeln!(t, "pop = {}", q(pop))?;
    }
    writeln!(t, "ttl_cap_secs = \"{}\"\n", config.ttl_cap_secs)?;
    writeln!(
        t,
        "[[local_server.secret_stores.gateway_secrets]]\nkey = \"cache_key_secret\""
    )?;
    writeln!(t, "data = {}\n", q(&config.cache_key_secret))?;
    for (name, value) in [
        ("seal_key_current", &config.seal_key_current),
        ("seal_key_previous", &config.seal_key_previous),
    ] {
        if let Some(value) = value {
            writeln!(
                t,
                "[[local_server.secret_stores.gateway_secrets]]\nkey = \"{name}\"\ndata = {}\n",
                q(value)
            )?;
        }
    }
    if let Some(secret) = &config.edge_shared_secret {
        writeln!(
            t,
            "[[local_server.secret_stores.gateway_secrets]]\nkey = \"edge_shared_secret\""
        )?;
        writeln!(t, "data = {}\n", q(secret))?;
    }
    Ok(t)
}

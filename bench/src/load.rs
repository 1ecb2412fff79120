//! The load generator: runs `oha` against one target, closed-loop (as fast as the target
//! answers, for throughput) or at a fixed rate with latency correction (for percentiles free of
//! coordinated omission), and reads its JSON summary. Starts no server and judges nothing.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::cpu::{self, Process};

/// The percentiles every measure carries, in the order tables and charts show them.
pub const PERCENTILES: [(&str, f64); 7] = [
    ("p50", 50.0),
    ("p75", 75.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
    ("p99.99", 99.99),
];

/// Where requests go and what they carry.
#[derive(Debug, Clone)]
pub struct Target {
    /// Short name shown in tables and charts ("origin hit", "bare actix-web").
    pub name: String,
    pub url: String,
    pub headers: Vec<(String, String)>,
    pub body: Body,
    /// The processes that serve it, whose CPU time per request each run reports (empty: none
    /// is measured).
    pub processes: Vec<Process>,
}

impl Target {
    /// The same target with its CPU time measured over `processes`.
    pub fn serving(mut self, processes: Vec<Process>) -> Target {
        self.processes = processes;
        self
    }
}

/// A request body: the same bytes each time, or a chat request with a prompt never sent before.
#[derive(Debug, Clone)]
pub enum Body {
    Fixed(PathBuf),
    /// Before each run, [`DISTINCT_PROMPTS`] chat requests whose prompts carry a run id no
    /// earlier run used are written to a file in this directory; oha sends one line picked at
    /// random per request (`-Z`). So nearly every request is a cache miss: within one run of
    /// n requests about n / (2 x DISTINCT_PROMPTS) repeat a prompt (< 1% here).
    Distinct(PathBuf),
}

/// Lines in a [`Body::Distinct`] file.
pub const DISTINCT_PROMPTS: u64 = 400_000;

static RUNS: AtomicU64 = AtomicU64::new(0);

fn distinct_prompts(dir: &Path) -> anyhow::Result<PathBuf> {
    let run = RUNS.fetch_add(1, Ordering::Relaxed);
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let path = dir.join(format!("prompts-{run}.jsonl"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
    for i in 0..DISTINCT_PROMPTS {
        writeln!(
            out,
            r#"{{"model":"gpt-4o-mini","messages":[{{"role":"user","content":"Miss {nonce}-{run}-{i}: say something new."}}]}}"#
        )?;
    }
    out.flush()?;
    Ok(path)
}

/// How hard to push.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Each connection sends its next request as soon as the last one is answered.
    Closed,
    /// This many requests per second in total, each timed from when it was due
    /// (`--latency-correction`), whatever the connections are doing.
    Rate(f64),
}

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Measure {
    pub pace: Pace,
    /// Requests answered per second over the run.
    pub rps: f64,
    /// Latency in milliseconds at each of [`PERCENTILES`] (all answers, errors included).
    pub latency_ms: Vec<f64>,
    /// Answers that were not 2xx, and transport errors, by kind.
    pub failures: BTreeMap<String, u64>,
    pub answered: u64,
    /// Microseconds of CPU per answered request of each of the target's processes, by role,
    /// in [`Target::processes`] order (empty when none is measured).
    pub cpu_us: Vec<(String, f64)>,
}

impl Measure {
    /// Latency in milliseconds at percentile `name` ("p50", "p99").
    pub fn at(&self, name: &str) -> f64 {
        PERCENTILES
            .iter()
            .position(|(n, _)| *n == name)
            .and_then(|i| self.latency_ms.get(i).copied())
            .unwrap_or(f64::NAN)
    }

    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    /// CPU microseconds per request over all the target's processes (`None`: not measured).
    pub fn cpu_total_us(&self) -> Option<f64> {
        (!self.cpu_us.is_empty()).then(|| self.cpu_us.iter().map(|(_, us)| us).sum())
    }
}

#[derive(Debug, Deserialize)]
struct OhaJson {
    summary: OhaSummary,
    #[serde(rename = "latencyPercentiles")]
    latency_percentiles: BTreeMap<String, Option<f64>>,
    #[serde(rename = "statusCodeDistribution", default)]
    status_codes: BTreeMap<String, u64>,
    #[serde(rename = "errorDistribution", default)]
    errors: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
struct OhaSummary {
    #[serde(rename = "requestsPerSec")]
    requests_per_sec: f64,
}

/// The `oha` on PATH (or in `~/.cargo/bin`), or an error saying how to install it.
pub fn oha() -> anyhow::Result<PathBuf> {
    let candidates = std::env::var_os("HOME")
        .map(|home| Path::new(&home).join(".cargo/bin/oha"))
        .into_iter()
        .chain(std::iter::once(PathBuf::from("oha")));
    for candidate in candidates {
        if Command::new(&candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Ok(candidate);
        }
    }
    bail!(
        "the load generator `oha` is not installed: `cargo install oha --locked` (`just bench` does it)"
    )
}

/// How long a run lasts.
#[derive(Debug, Clone, Copy)]
pub enum Length {
    For(Duration),
    /// Exactly this many requests (a count per request must divide by a known number).
    Requests(u64),
}

/// Runs `oha` against `target` for `duration` with `connections` connections at `pace`.
/// Blocking: call it off the runtime that drives in-process servers.
pub fn run(
    oha: &Path,
    target: &Target,
    connections: u32,
    duration: Duration,
    pace: Pace,
) -> anyhow::Result<Measure> {
    run_for(oha, target, connections, Length::For(duration), pace)
}

/// [`run`] for a [`Length`] of time or of requests.
pub fn run_for(
    oha: &Path,
    target: &Target,
    connections: u32,
    length: Length,
    pace: Pace,
) -> anyhow::Result<Measure> {
    let mut cmd = Command::new(oha);
    cmd.args(["--no-tui", "--output-format", "json", "-m", "POST"])
        .args(["-c", &connections.to_string()])
        // A slow answer must not hang the run; it is counted as an error instead.
        .args(["-t", "10s"]);
    match length {
        Length::For(duration) => cmd.args(["-z", &format!("{}ms", duration.as_millis())]),
        Length::Requests(n) => cmd.args(["-n", &n.to_string()]),
    };
    for (name, value) in &target.headers {
        cmd.args(["-H", &format!("{name}: {value}")]);
    }
    let prompts = match &target.body {
        Body::Fixed(path) => {
            cmd.arg("-D").arg(path);
            None
        }
        Body::Distinct(dir) => {
            let path = distinct_prompts(dir)?;
            cmd.arg("-Z").arg(&path);
            Some(path)
        }
    };
    if let Pace::Rate(rate) = pace {
        cmd.args(["-q", &format!("{rate:.0}"), "--latency-correction"]);
    }
    cmd.arg(&target.url);
    let before = cpu::snapshot(&target.processes)?;
    let output = cmd
        .output()
        .with_context(|| format!("running oha against {}", target.name))?;
    let after = cpu::snapshot(&target.processes)?;
    if let Some(path) = prompts {
        let _ = std::fs::remove_file(path);
    }
    if !output.status.success() {
        bail!(
            "oha failed against {}: {}",
            target.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let json: OhaJson = serde_json::from_slice(&output.stdout)
        .with_context(|| format!("oha's JSON for {}", target.name))?;
    let latency_ms = PERCENTILES
        .iter()
        .map(|(name, _)| {
            json.latency_percentiles
                .get(*name)
                .copied()
                .flatten()
                .map_or(f64::NAN, |secs| secs * 1000.0)
        })
        .collect();
    let mut failures: BTreeMap<String, u64> = json
        .status_codes
        .iter()
        .filter(|(code, _)| !code.starts_with('2'))
        .map(|(code, n)| (format!("HTTP {code}"), *n))
        .collect();
    for (error, n) in json.errors {
        // Requests still in flight at the deadline are cut by oha itself, not failures.
        if !error.contains("deadline") {
            *failures.entry(error).or_default() += n;
        }
    }
    let answered = json.status_codes.values().sum();
    Ok(Measure {
        pace,
        rps: json.summary.requests_per_sec,
        latency_ms,
        failures,
        answered,
        cpu_us: before.per_request(&after, &target.processes, answered),
    })
}

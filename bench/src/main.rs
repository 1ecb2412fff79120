//! `gateway-bench`: runs every benchmark of issue 7 in one process (each tier back to back with
//! its floor), then writes `bench/REPORT.md` and `bench/latency.png`. `just bench` is the way in;
//! `--part origin-hit` alone is `just bench-origin`, `--litellm PATH` adds the peer.

mod baseline;
mod chart;
mod compare;
mod cpu;
mod edge_hit;
mod floor;
mod instructions;
mod load;
mod miss;
mod origin;
mod origin_hit;
mod peers;
mod replication;
mod report;
mod seal_wasm;
mod semantic;
mod viceroy;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use gateway_e2e::repo_root;

use crate::report::Results;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Part {
    OriginHit,
    EdgeHit,
    Miss,
    Replication,
    /// The semantic cache: embedding, lookup and hit latencies, RSS with the model.
    Semantic,
    /// Sealing and opening an entry in wasm32-wasip1 under Viceroy, ns per KiB.
    SealWasm,
    /// Instructions per origin hit and per edge hit under callgrind (today's, and a
    /// `--baseline`'s).
    Instructions,
}

#[derive(Debug, Parser)]
#[command(about = "Benchmarks every gateway tier against its floor, in one run")]
struct Args {
    /// Parts to run (repeatable); all of them by default.
    #[arg(long = "part", value_enum)]
    parts: Vec<Part>,
    /// Seconds of each measured run.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Rounds of every comparison (alternating order); the report gives medians and ranges.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds of closed-loop warm-up per target before its measured runs.
    #[arg(long, default_value_t = 1.0)]
    warmup_secs: f64,
    /// Connection counts to measure at.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    connections: Vec<u32>,
    /// Fixed rate of the latency runs, as a fraction of the slowest target's closed-loop max.
    #[arg(long, default_value_t = 0.5)]
    rate_fraction: f64,
    /// actix workers of the origin and of the bare actix floor.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// The mock provider's latency in the miss benchmark.
    #[arg(long, default_value_t = 20)]
    provider_latency_ms: u64,
    /// Entries the replicator benchmark writes.
    #[arg(long, default_value_t = 20_000)]
    replication_entries: u64,
    /// Hits counted per origin and per Viceroy by the instructions part.
    #[arg(long, default_value_t = 2000)]
    instruction_hits: u64,
    /// Samples of each semantic-cache measure.
    #[arg(long, default_value_t = 200)]
    semantic_samples: usize,
    /// The `litellm` executable: adds LiteLLM's Redis-cache hit as a peer (`just bench-peers`).
    #[arg(long)]
    litellm: Option<PathBuf>,
    /// A directory from `scripts/bench-baseline.sh <rev>`: that revision's origin and edge join
    /// the hit comparisons, and the report judges today's hits against them (`just
    /// bench-against <rev>`).
    #[arg(long)]
    baseline: Option<PathBuf>,
    /// With `--baseline`: measure only each tier's floor, today's hit as deployed and the
    /// baseline's hit (the judged pair), so more rounds fit in the same time.
    #[arg(long, requires = "baseline")]
    judged_only: bool,
    /// Where to write the markdown report (printed to stdout either way).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Where to draw the latency chart (PNG).
    #[arg(long)]
    chart: Option<PathBuf>,
    /// A markdown file appended to the report (the analysis of the figures; `bench/NOTES.md`).
    #[arg(long)]
    notes: Option<PathBuf>,
}

fn version(program: &str) -> String {
    Command::new(program)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| format!("{program} (version unknown)"))
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let parts = if args.parts.is_empty() {
        vec![
            Part::OriginHit,
            Part::EdgeHit,
            Part::Miss,
            Part::Replication,
            Part::Semantic,
            Part::SealWasm,
            Part::Instructions,
        ]
    } else {
        args.parts.clone()
    };
    let baseline = args
        .baseline
        .as_deref()
        .map(|dir| baseline::Baseline::open(dir, args.judged_only))
        .transpose()?;
    let oha = load::oha()?;
    let settings = compare::Settings {
        oha: oha.clone(),
        connections: args.connections.clone(),
        duration: Duration::from_secs_f64(args.secs),
        rounds: args.rounds,
        warmup: Duration::from_secs_f64(args.warmup_secs),
        rate_fraction: args.rate_fraction,
    };
    let scratch = std::env::temp_dir().join(format!("gw-bench-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;

    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut results = Results {
        setup: vec![
            format!("Run: {date}, {cores} cores, shared with the load generator and every server."),
            format!(
                "Load: {}, HTTP/1.1 keep-alive, {} rounds (floor and subjects in alternating order) of {} s per measured run, after {} s of warm-up per target, at {:?} connections; fixed rate = {} × the slowest target's closed-loop max in that round. Figures are medians over the rounds; ranges in brackets are the lowest and highest round.",
                version(&oha.to_string_lossy()),
                args.rounds,
                args.secs,
                args.warmup_secs,
                args.connections,
                args.rate_fraction
            ),
            format!(
                "Servers: origin = the release `gateway-origin` binary in its own process ({} actix worker, JSON request log at INFO to a file, tenants' rate limit and token budget on but out of reach), Redis {}, edge = release `gateway-compute.wasm` under {}; the bare actix-web floor has the same worker count.",
                args.workers,
                version("redis-server")
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("v="))
                    .unwrap_or("?"),
                version("viceroy")
            ),
        ],
        baseline: baseline.as_ref().map(|b| b.revision.clone()),
        ..Results::default()
    };

    let run = async {
        if parts.contains(&Part::OriginHit) {
            let hit = origin_hit::run(
                &settings,
                &scratch,
                args.workers,
                args.litellm.as_deref(),
                baseline.as_ref(),
            )
            .await
            .context("origin hit")?;
            results.origin_hit = Some(hit.comparison);
            results.origin_hit_provider_calls = hit.provider_calls;
            results.memory = Some(hit.memory);
            results.peers = hit.peers;
            results.peer_provider_calls = hit.peer_provider_calls;
        }
        if parts.contains(&Part::EdgeHit) {
            results.edge_hit = Some(
                edge_hit::run(&settings, &scratch, baseline.as_ref())
                    .await
                    .context("edge hit")?,
            );
        }
        if parts.contains(&Part::Miss) {
            results.miss = Some(
                miss::run(&settings, &scratch, args.workers, args.provider_latency_ms)
                    .await
                    .context("miss overhead")?,
            );
        }
        if parts.contains(&Part::Replication) {
            results.replication = Some(
                replication::run(args.replication_entries)
                    .await
                    .context("replicator")?,
            );
        }
        if parts.contains(&Part::Instructions) {
            results.instructions = Some(
                instructions::run(&scratch, args.instruction_hits, baseline.as_ref())
                    .await
                    .context("instructions per hit")?,
            );
        }
        if parts.contains(&Part::SealWasm) {
            results.seal_wasm = Some(seal_wasm::run().context("sealing in wasm")?);
        }
        if parts.contains(&Part::Semantic) {
            results.semantic = Some(
                semantic::run(args.semantic_samples)
                    .await
                    .context("semantic cache")?,
            );
        }
        anyhow::Ok(())
    };
    let outcome = run.await;
    let _ = std::fs::remove_dir_all(&scratch);
    outcome?;

    for (name, path) in [
        (
            "gateway-compute.wasm",
            "target/wasm32-wasip1/edge/gateway-compute.wasm",
        ),
        (
            "gateway-bench-bare-compute.wasm",
            "target/wasm32-wasip1/edge/gateway-bench-bare-compute.wasm",
        ),
    ] {
        if let Ok(meta) = std::fs::metadata(repo_root().join(path)) {
            results.wasm.push((name.to_owned(), meta.len()));
        }
    }
    if let Some(notes) = &args.notes {
        results.notes = Some(
            std::fs::read_to_string(notes)
                .with_context(|| format!("reading {}", notes.display()))?,
        );
    }
    let markdown = results.markdown();
    println!("{markdown}");
    if let Some(path) = &args.report {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    if let Some(path) = &args.chart {
        chart::draw(path, &results.comparisons(), &args.connections)?;
        eprintln!("bench: drew {}", path.display());
    }
    Ok(())
}

//! Instructions per hit, counted by callgrind, at both tiers. The origin's Redis hit (sealed
//! entry, and the same answer unsealed) and, with a baseline, the earlier revision's, each
//! origin running under `valgrind --tool=callgrind`; then the edge's KV hit the same way, each
//! Viceroy under callgrind (the bare Compute service as the floor, today's edge with the sealed
//! and the unsealed entry, and the earlier revision's edge). A count does not move with the
//! machine's load the way time does, so a change of a percent shows in one run; it counts
//! every thread of the process measured, not Redis nor the load generator. Starts and stops
//! everything it uses.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use gateway_e2e::edge::Edge;
use gateway_fixtures::{MockProvider, ProviderConfig, RedisServer};

use crate::baseline::Baseline;
use crate::edge_hit;
use crate::load::{self, Length, Pace, Target};
use crate::origin::{OriginConfig, OriginProcess};
use crate::origin_hit::{API_KEY, json_target, unseal, warm_hit};
use crate::viceroy::start_bare_under;

/// Hits sent before counting (pools, connections and the allocator warm).
const WARMUP_HITS: u64 = 300;
/// Connections the counted hits are sent over.
const CONNECTIONS: u32 = 4;

/// One origin's count.
#[derive(Debug, Clone)]
pub struct Count {
    pub name: String,
    /// Instructions the origin executed per hit (all threads).
    pub per_hit: f64,
    pub hits: u64,
}

/// What this part produced: at each tier, today's sealed hit first, then the others.
#[derive(Debug, Clone)]
pub struct Instructions {
    pub counts: Vec<Count>,
    /// The edge's, today's sealed hit first.
    pub edge: Vec<Count>,
    /// The bare Compute service under Viceroy: the edge's floor.
    pub edge_floor: Count,
}

pub async fn run(
    scratch: &Path,
    hits: u64,
    baseline: Option<&Baseline>,
) -> anyhow::Result<Instructions> {
    valgrind_available()?;
    let redis = RedisServer::start()?;
    let plain_redis = RedisServer::start()?;
    let provider = MockProvider::start(ProviderConfig::default()).await?;
    let config = OriginConfig {
        wrapper: callgrind(scratch),
        ..OriginConfig::single(redis.url(), provider.base_url(), 1)
    };
    let body = scratch.join("instructions-request.json");
    std::fs::write(&body, crate::origin_hit::HIT_REQUEST)?;
    let oha = load::oha()?;

    let mut subjects: Vec<(String, OriginConfig, bool)> = vec![
        ("today, sealed entry".to_owned(), config.clone(), false),
        (
            "today, entry unsealed (v1)".to_owned(),
            OriginConfig {
                redis_url: plain_redis.url(),
                ..config.clone()
            },
            true,
        ),
    ];
    if let Some(b) = baseline {
        subjects.push((
            b.label("earlier revision"),
            OriginConfig {
                revision: Some((b.origin.clone(), b.tenants.clone())),
                ..config.clone()
            },
            false,
        ));
    }

    let http = reqwest::Client::new();
    let mut counts = Vec::new();
    for (name, config, unsealed) in subjects {
        eprintln!("bench: instructions: starting the {name} origin under callgrind");
        let origin = tokio::task::spawn_blocking(move || OriginProcess::start(&config)).await??;
        let bytes = warm_hit(&http, &origin, &name).await?;
        if unsealed {
            unseal(&plain_redis, &bytes)?;
            if warm_hit(&http, &origin, &name).await? != bytes {
                bail!("the unsealed entry does not answer the same bytes");
            }
        }
        let pid = origin.pid().context("the origin stopped")?;
        let target = json_target(
            &name,
            format!("{}/v1/chat/completions", origin.url()),
            Some(API_KEY),
            &body,
        );
        let calls_before = provider.calls();
        let per_hit = per_hit(&oha, target, pid, hits).await?;
        if provider.calls() != calls_before {
            bail!("{name}: the provider was called during the counted hits");
        }
        eprintln!("bench: instructions: {name}: {per_hit:.0} per hit");
        counts.push(Count {
            name,
            per_hit,
            hits,
        });
        drop(origin);
    }
    provider.stop().await;
    let (edge, edge_floor) = edges(scratch, hits, baseline, &body, &oha).await?;
    Ok(Instructions {
        counts,
        edge,
        edge_floor,
    })
}

/// `valgrind --tool=callgrind`, quiet, its profile (never read: only the live counters are,
/// through `callgrind_control -e`) in `scratch`.
fn callgrind(scratch: &Path) -> Vec<String> {
    vec![
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        "--quiet".to_owned(),
        format!(
            "--callgrind-out-file={}",
            scratch.join("callgrind.out.%p").display()
        ),
    ]
}

/// Instructions process `pid` executes per hit of `target`: warm-up hits first, then `hits`
/// counted (all answered, or an error).
async fn per_hit(oha: &Path, target: Target, pid: u32, hits: u64) -> anyhow::Result<f64> {
    let oha = oha.to_path_buf();
    tokio::task::spawn_blocking(move || -> anyhow::Result<f64> {
        let send = |n| {
            load::run_for(
                &oha,
                &target,
                CONNECTIONS,
                Length::Requests(n),
                Pace::Closed,
            )
        };
        send(WARMUP_HITS)?;
        let before = instructions(pid)?;
        let measure = send(hits)?;
        let after = instructions(pid)?;
        if measure.failed() > 0 || measure.answered != hits {
            bail!(
                "{}: {} of {hits} hits answered, failures {:?}",
                target.name,
                measure.answered,
                measure.failures
            );
        }
        Ok(after.saturating_sub(before) as f64 / hits as f64)
    })
    .await?
}

/// How one edge subject's Viceroy starts (under callgrind).
type StartEdge = Box<dyn FnOnce() -> anyhow::Result<Edge> + Send>;

/// The edge's KV hit under callgrind, one Viceroy at a time: today's edge with the sealed
/// entry (as deployed, usage log on), with the same answer unsealed, the earlier revision's
/// edge (which predates sealing) on the unsealed entry; then the bare Compute service, the
/// floor. Every edge answers `hit.json`'s bytes as a hit, or this fails.
async fn edges(
    scratch: &Path,
    hits: u64,
    baseline: Option<&Baseline>,
    body: &Path,
    oha: &Path,
) -> anyhow::Result<(Vec<Count>, Count)> {
    let wrapper = callgrind(scratch);
    let (mut sealed, mut unsealed) = edge_hit::hit_configs()?;
    sealed.wrapper = wrapper.clone();
    unsealed.wrapper = wrapper.clone();
    let mut subjects: Vec<(String, StartEdge)> = vec![
        (
            "today's edge, sealed entry".to_owned(),
            Box::new(move || Edge::start(&sealed)),
        ),
        ("today's edge, entry unsealed (v1)".to_owned(), {
            let unsealed = unsealed.clone();
            Box::new(move || Edge::start(&unsealed))
        }),
    ];
    if let Some(b) = baseline {
        let wasm: PathBuf = b.edge_wasm.clone();
        subjects.push((
            b.label("edge, entry unsealed (v1)"),
            Box::new(move || Edge::start_with_wasm(&unsealed, &wasm)),
        ));
    }

    let http = reqwest::Client::new();
    let mut counts = Vec::new();
    for (name, start) in subjects {
        counts.push(count_edge(&http, name, true, start, body, oha, hits).await?);
    }
    let floor = Box::new(move || start_bare_under(&wrapper));
    let name = "bare Compute service (the floor)".to_owned();
    let floor = count_edge(&http, name, false, floor, body, oha, hits).await?;
    Ok((counts, floor))
}

/// One Viceroy's count: started by `start`, checked to answer the hit's bytes (as a HIT when
/// `is_edge`), counted, stopped.
async fn count_edge(
    http: &reqwest::Client,
    name: String,
    is_edge: bool,
    start: StartEdge,
    body: &Path,
    oha: &Path,
    hits: u64,
) -> anyhow::Result<Count> {
    eprintln!("bench: instructions: starting {name} under callgrind");
    let edge = tokio::task::spawn_blocking(start).await??;
    let url = format!("{}/v1/chat/completions", edge.url());
    edge_hit::check_answer(http, &url, &name, is_edge).await?;
    let pid = edge.pid().context("Viceroy stopped")?;
    let target = json_target(&name, url, Some(API_KEY), body);
    let per_hit = per_hit(oha, target, pid, hits).await?;
    eprintln!("bench: instructions: {name}: {per_hit:.0} per hit");
    Ok(Count {
        name,
        per_hit,
        hits,
    })
}

fn valgrind_available() -> anyhow::Result<()> {
    for program in ["valgrind", "callgrind_control"] {
        if Command::new(program).arg("--version").output().is_err() {
            bail!("`{program}` is missing: apt-get install valgrind (`just bench-tools` does it)");
        }
    }
    Ok(())
}

/// Instructions the callgrind-run process `pid` has executed so far, all threads
/// (`callgrind_control -e Ir`).
fn instructions(pid: u32) -> anyhow::Result<u64> {
    let output = Command::new("callgrind_control")
        .args(["-e", "Ir", &pid.to_string()])
        .output()
        .context("running callgrind_control")?;
    let text = String::from_utf8_lossy(&output.stdout);
    total_ir(&text).with_context(|| format!("no counters in callgrind_control's answer:\n{text}"))
}

/// The sum of the per-thread `Ir` totals in `callgrind_control -e Ir` output:
///
/// ```text
///   Totals:     Ir
///    Th 1  300,209
///    Th 2   12,004
/// ```
fn total_ir(text: &str) -> Option<u64> {
    let mut total = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("Th") {
            continue;
        }
        let count: u64 = words.nth(1)?.replace(',', "").parse().ok()?;
        total = Some(total.unwrap_or(0) + count);
    }
    total
}

impl Instructions {
    /// The report's section.
    pub fn markdown(&self) -> String {
        let mut out = String::from("## Instructions per origin hit (callgrind)\n\n");
        out.push_str(
            "Each origin runs alone under `valgrind --tool=callgrind` (1 actix worker); after \
             warm-up hits, the instructions its threads execute over a fixed number of hits \
             (4 connections) are divided by that number. The count is the same from run to \
             run within a fraction of a percent, whatever else the machine does; valgrind \
             runs SHA-256 without the CPU's SHA extensions, so the key's share is larger than \
             natively.\n\n",
        );
        out.push_str("| origin | hits counted | instructions per hit | × today's |\n");
        out.push_str("|---|---:|---:|---:|\n");
        let today = self.counts.first().map(|c| c.per_hit);
        for c in &self.counts {
            let ratio = today
                .filter(|t| *t > 0.0)
                .map_or_else(|| "-".to_owned(), |t| format!("{:.3}", c.per_hit / t));
            out.push_str(&format!(
                "| {} | {} | {:.0} | {ratio} |\n",
                c.name, c.hits, c.per_hit
            ));
        }
        out.push_str(&self.edge_markdown());
        out
    }

    /// The edge's table: each Viceroy's count, and the part above the bare service's (what
    /// the guest's own work costs, Viceroy's per-request work taken out).
    fn edge_markdown(&self) -> String {
        let floor = self.edge_floor.per_hit;
        let mut out = String::from("\n## Instructions per edge hit (Viceroy under callgrind)\n\n");
        out.push_str(
            "Each Viceroy runs alone under `valgrind --tool=callgrind`, after its one-off \
             compile of the wasm; the count covers Viceroy's own work for each request (its \
             HTTP server, a new instance, the host calls) and the guest's. The bare Compute \
             service answers the same bytes with no work of its own: the edge's share is the \
             count above it. Production runs the guest on Fastly's runtime, not Viceroy's, so \
             only the share above the floor carries over, and as a relative figure.\n\n",
        );
        out.push_str("| Viceroy serving | hits counted | instructions per hit | above the floor | × today's |\n");
        out.push_str("|---|---:|---:|---:|---:|\n");
        let today = self
            .edge
            .first()
            .map(|c| c.per_hit - floor)
            .filter(|t| *t > 0.0);
        for c in &self.edge {
            let above = c.per_hit - floor;
            let ratio = today.map_or_else(|| "-".to_owned(), |t| format!("{:.3}", above / t));
            out.push_str(&format!(
                "| {} | {} | {:.0} | {above:.0} | {ratio} |\n",
                c.name, c.hits, c.per_hit
            ));
        }
        let f = &self.edge_floor;
        out.push_str(&format!(
            "| {} | {} | {:.0} | 0 | - |\n",
            f.name, f.hits, f.per_hit
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threads_totals_are_summed() {
        let text =
            "PID 9082: gateway-origin\n\n  Totals:     Ir \n   Th 1  300,209 \n   Th 2   12,004\n";
        assert_eq!(total_ir(text), Some(312_213));
        assert_eq!(total_ir("PID 1: x\n"), None);
    }

    #[test]
    fn the_edge_table_counts_each_viceroy_above_the_floor() {
        let count = |name: &str, per_hit| Count {
            name: name.to_owned(),
            per_hit,
            hits: 2000,
        };
        let table = Instructions {
            counts: Vec::new(),
            edge: vec![count("sealed", 900.0), count("unsealed", 700.0)],
            edge_floor: count("bare", 300.0),
        }
        .edge_markdown();
        assert!(
            table.contains("| sealed | 2000 | 900 | 600 | 1.000 |"),
            "{table}"
        );
        assert!(
            table.contains("| unsealed | 2000 | 700 | 400 | 0.667 |"),
            "{table}"
        );
        assert!(table.contains("| bare | 2000 | 300 | 0 | - |"), "{table}");
    }
}

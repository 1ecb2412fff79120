//! One comparison: a floor and its subjects measured back to back with the same settings, at
//! each connection count, first closed-loop (throughput), then all at one fixed rate (latency),
//! over several rounds in alternating order. Knows nothing of what the targets are.

use std::path::PathBuf;
use std::time::Duration;

use crate::load::{self, Measure, Pace, Target};

/// How every comparison is run.
#[derive(Debug, Clone)]
pub struct Settings {
    pub oha: PathBuf,
    pub connections: Vec<u32>,
    /// Length of each measured run.
    pub duration: Duration,
    /// Times every run is repeated (in alternating order); figures are the medians.
    pub rounds: usize,
    /// Closed-loop run per target before measuring (warm caches, pools and connections).
    pub warmup: Duration,
    /// The fixed rate is this fraction of the slowest target's closed-loop throughput, so no
    /// target is saturated and queueing does not dominate the percentiles.
    pub rate_fraction: f64,
}

/// The figures of one target at one connection count.
#[derive(Debug, Clone)]
pub struct Point {
    pub connections: u32,
    /// Closed loop: throughput (its latencies are those of a saturated server).
    pub closed: Measure,
    /// Fixed rate: latency percentiles without coordinated omission.
    pub fixed: Measure,
    /// Each round's own figures (`closed` and `fixed` above are their medians).
    pub rounds: Vec<Point>,
}

/// One target's points.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<Point>,
    /// Requests answered during the (unrecorded) warm-up.
    pub warmup_requests: u64,
}

impl Series {
    /// Requests answered over all of this target's runs, warm-up included.
    pub fn requests(&self) -> u64 {
        self.warmup_requests
            + self
                .points
                .iter()
                .flat_map(|p| &p.rounds)
                .map(|p| p.closed.answered + p.fixed.answered)
                .sum::<u64>()
    }

    pub fn at(&self, connections: u32) -> Option<&Point> {
        self.points.iter().find(|p| p.connections == connections)
    }
}

/// A tier's result: the floor first, then each subject.
#[derive(Debug, Clone)]
pub struct Comparison {
    pub tier: String,
    pub floor: Series,
    pub subjects: Vec<Series>,
}

impl Comparison {
    /// Requests the floor answered over all its runs.
    pub fn floor_requests(&self) -> u64 {
        self.floor.requests()
    }
}

/// Measures `floor` and `subjects`. Blocking (oha runs as a child process): call it from a
/// blocking thread so in-process servers keep being driven.
pub fn compare(
    settings: &Settings,
    tier: &str,
    floor: &Target,
    subjects: &[Target],
) -> anyhow::Result<Comparison> {
    let targets: Vec<&Target> = std::iter::once(floor).chain(subjects).collect();
    let mut warmups = Vec::new();
    for target in &targets {
        warmups.push(load::run(&settings.oha, target, 4, settings.warmup, Pace::Closed)?.answered);
    }
    // runs[target][connections index] = one Point per round.
    let mut runs: Vec<Vec<Vec<Point>>> =
        vec![vec![Vec::new(); settings.connections.len()]; targets.len()];
    for round in 0..settings.rounds.max(1) {
        // Alternate the order, so a drift of the machine during a round favours no one.
        let mut order: Vec<usize> = (0..targets.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for (c, &connections) in settings.connections.iter().enumerate() {
            let mut closed = vec![None; targets.len()];
            for &t in &order {
                let m = load::run(
                    &settings.oha,
                    targets[t],
                    connections,
                    settings.duration,
                    Pace::Closed,
                )?;
                eprintln!(
                    "bench: {tier} round {round}: {} c={connections} closed loop: {:.0} req/s",
                    targets[t].name, m.rps
                );
                closed[t] = Some(m);
            }
            let slowest = closed
                .iter()
                .flatten()
                .map(|m| m.rps)
                .fold(f64::INFINITY, f64::min);
            let rate = (slowest * settings.rate_fraction).max(1.0);
            for &t in &order {
                let fixed = load::run(
                    &settings.oha,
                    targets[t],
                    connections,
                    settings.duration,
                    Pace::Rate(rate),
                )?;
                eprintln!(
                    "bench: {tier} round {round}: {} c={connections} at {rate:.0} req/s: p50 {:.3} ms, p99 {:.3} ms",
                    targets[t].name,
                    fixed.at("p50"),
                    fixed.at("p99")
                );
                if let Some(closed) = closed[t].take() {
                    runs[t][c].push(Point {
                        connections,
                        closed,
                        fixed,
                        rounds: Vec::new(),
                    });
                }
            }
        }
    }
    let mut series =
        targets
            .iter()
            .zip(runs)
            .zip(warmups)
            .map(|((target, runs), warmup_requests)| Series {
                name: target.name.clone(),
                points: runs.into_iter().filter_map(Point::median).collect(),
                warmup_requests,
            });
    let floor = series.next().unwrap_or_else(|| Series {
        name: floor.name.clone(),
        points: Vec::new(),
        warmup_requests: 0,
    });
    Ok(Comparison {
        tier: tier.to_owned(),
        floor,
        subjects: series.collect(),
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The median of each figure over `runs`, failures and answers summed.
fn median_measure(runs: &[&Measure]) -> Option<Measure> {
    let first = runs.first()?;
    let pace = match first.pace {
        Pace::Closed => Pace::Closed,
        Pace::Rate(_) => Pace::Rate(median(
            &mut runs
                .iter()
                .map(|m| match m.pace {
                    Pace::Rate(r) => r,
                    Pace::Closed => f64::NAN,
                })
                .collect::<Vec<_>>(),
        )),
    };
    let latency_ms = (0..first.latency_ms.len())
        .map(|i| {
            median(
                &mut runs
                    .iter()
                    .filter_map(|m| m.latency_ms.get(i).copied())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut failures = std::collections::BTreeMap::new();
    for m in runs {
        for (kind, n) in &m.failures {
            *failures.entry(kind.clone()).or_insert(0) += n;
        }
    }
    // Per process, the median over the runs that measured it.
    let cpu_us = first
        .cpu_us
        .iter()
        .enumerate()
        .map(|(i, (role, _))| {
            let mut values: Vec<f64> = runs
                .iter()
                .filter_map(|m| m.cpu_us.get(i).map(|(_, us)| *us))
                .collect();
            (role.clone(), median(&mut values))
        })
        .collect();
    Some(Measure {
        pace,
        rps: median(&mut runs.iter().map(|m| m.rps).collect::<Vec<_>>()),
        latency_ms,
        failures,
        answered: runs.iter().map(|m| m.answered).sum(),
        cpu_us,
    })
}

impl Point {
    /// One point from the rounds at one connection count: the median of each figure, with
    /// the rounds kept for their spread.
    fn median(rounds: Vec<Point>) -> Option<Point> {
        let closed: Vec<&Measure> = rounds.iter().map(|p| &p.closed).collect();
        let fixed: Vec<&Measure> = rounds.iter().map(|p| &p.fixed).collect();
        Some(Point {
            connections: rounds.first()?.connections,
            closed: median_measure(&closed)?,
            fixed: median_measure(&fixed)?,
            rounds,
        })
    }
}

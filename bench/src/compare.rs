//! One comparison: a floor and its subjects measured back to back with the same settings, at
//! each connection count, first closed-loop (throughput), then all at one fixed rate (latency).
//! Knows nothing of what the targets are; the figures become ratios in the report.

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
    let mut points: Vec<Vec<Point>> = vec![Vec::new(); targets.len()];
    for &connections in &settings.connections {
        let mut closed = Vec::new();
        for target in &targets {
            let m = load::run(
                &settings.oha,
                target,
                connections,
                settings.duration,
                Pace::Closed,
            )?;
            eprintln!(
                "bench: {tier}: {} c={connections} closed loop: {:.0} req/s",
                target.name, m.rps
            );
            closed.push(m);
        }
        let slowest = closed.iter().map(|m| m.rps).fold(f64::INFINITY, f64::min);
        let rate = (slowest * settings.rate_fraction).max(1.0);
        for ((target, closed), points) in targets.iter().zip(closed).zip(points.iter_mut()) {
            let fixed = load::run(
                &settings.oha,
                target,
                connections,
                settings.duration,
                Pace::Rate(rate),
            )?;
            eprintln!(
                "bench: {tier}: {} c={connections} at {rate:.0} req/s: p50 {:.3} ms, p99 {:.3} ms",
                target.name,
                fixed.at("p50"),
                fixed.at("p99")
            );
            points.push(Point {
                connections,
                closed,
                fixed,
            });
        }
    }
    let mut series =
        targets
            .iter()
            .zip(points)
            .zip(warmups)
            .map(|((target, points), warmup_requests)| Series {
                name: target.name.clone(),
                points,
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

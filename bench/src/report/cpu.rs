//! The report's CPU section: for every target whose processes were measured, the CPU time they
//! spent per answered request in the closed-loop runs, split by process. Formatting only.

use std::fmt::Write as _;

use super::{label, range};
use crate::compare::{Comparison, Point};
use crate::load::Measure;

/// The CPU table, or nothing when no target was measured.
pub(super) fn write(out: &mut String, comparisons: &[&Comparison]) -> std::fmt::Result {
    let measured = comparisons.iter().any(|c| {
        std::iter::once(&c.floor)
            .chain(&c.subjects)
            .flat_map(|s| &s.points)
            .any(|p| p.closed.cpu_total_us().is_some())
    });
    if !measured {
        return Ok(());
    }
    writeln!(out, "## CPU per request\n")?;
    writeln!(
        out,
        "User + system CPU time of the processes serving each target (every thread; from \
         `/proc/<pid>/stat` before and after each closed-loop run) divided by the requests it \
         answered; medians over rounds, brackets the lowest and highest round. The load \
         generator's own CPU is not counted. On this shared machine this moves much less than \
         throughput, and it says which process a change made busier. The floors run inside \
         the bench process (bare actix-web) or their own Viceroy.\n"
    )?;
    writeln!(
        out,
        "| tier | target | conns | CPU µs / request | by process | × floor |"
    )?;
    writeln!(out, "|---|---|---:|---:|---|---:|")?;
    for comparison in comparisons {
        for series in std::iter::once(&comparison.floor).chain(&comparison.subjects) {
            let is_floor = std::ptr::eq(series, &comparison.floor);
            for point in &series.points {
                let Some(total) = point.closed.cpu_total_us() else {
                    continue;
                };
                let rounds = round_totals(point);
                let floor = comparison
                    .floor
                    .at(point.connections)
                    .and_then(|f| f.closed.cpu_total_us());
                let ratio = match floor {
                    Some(floor) if !is_floor && floor > 0.0 => format!("{:.2}", total / floor),
                    _ => "-".to_owned(),
                };
                let name = label(series, is_floor);
                writeln!(
                    out,
                    "| {} | {name} | {} | {total:.1}{} | {} | {ratio} |",
                    comparison.tier,
                    point.connections,
                    range(&rounds, 1, false),
                    by_process(&point.closed),
                )?;
            }
        }
    }
    writeln!(out)
}

/// "today µs vs earlier µs (ratio)" of the closed-loop CPU per request at one connection
/// count, for the baseline row; `None` when either was not measured.
pub(super) fn against(today: &Point, earlier: &Point) -> Option<String> {
    let (now, then) = (today.closed.cpu_total_us()?, earlier.closed.cpu_total_us()?);
    Some(format!(
        "CPU {now:.1} vs {then:.1} µs/request ({:.2} ×)",
        now / then
    ))
}

/// Each round's total CPU per request.
fn round_totals(point: &Point) -> Vec<f64> {
    point
        .rounds
        .iter()
        .filter_map(|p| p.closed.cpu_total_us())
        .collect()
}

/// "origin 41.2 + redis 11.3": processes of the same role (a cluster's nodes) summed, in
/// first-seen order.
fn by_process(measure: &Measure) -> String {
    let mut roles: Vec<(&str, f64)> = Vec::new();
    for (role, us) in &measure.cpu_us {
        match roles.iter_mut().find(|(r, _)| r == role) {
            Some((_, sum)) => *sum += us,
            None => roles.push((role, *us)),
        }
    }
    roles
        .iter()
        .map(|(role, us)| format!("{role} {us:.1}"))
        .collect::<Vec<_>>()
        .join(" + ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Pace;

    fn measure(cpu_us: &[(&str, f64)]) -> Measure {
        Measure {
            pace: Pace::Closed,
            rps: 1000.0,
            latency_ms: Vec::new(),
            failures: Default::default(),
            answered: 1000,
            cpu_us: cpu_us
                .iter()
                .map(|(r, us)| ((*r).to_owned(), *us))
                .collect(),
        }
    }

    #[test]
    fn a_clusters_nodes_are_summed_under_one_role() {
        let m = measure(&[("origin", 40.0), ("redis", 2.0), ("redis", 3.5)]);
        assert_eq!(by_process(&m), "origin 40.0 + redis 5.5");
    }

    #[test]
    fn the_baseline_figure_is_a_ratio_of_totals() {
        let point = |m: Measure| Point {
            connections: 32,
            closed: m.clone(),
            fixed: m,
            rounds: Vec::new(),
        };
        let today = point(measure(&[("origin", 45.0), ("redis", 10.0)]));
        let earlier = point(measure(&[("origin", 40.0), ("redis", 10.0)]));
        assert_eq!(
            against(&today, &earlier).as_deref(),
            Some("CPU 55.0 vs 50.0 µs/request (1.10 ×)")
        );
        assert_eq!(against(&today, &point(measure(&[]))), None);
    }
}

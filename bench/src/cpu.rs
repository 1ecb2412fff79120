//! CPU time the processes behind a target spend per answered request, read from
//! `/proc/<pid>/stat` before and after a run. On a shared 2-core machine this moves far less
//! than throughput does, and it says which process (the origin, its Redis, Viceroy) a change
//! made busier. Reads `/proc` only; Linux only, like the rest of the bench.

use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// A process whose CPU time is charged to a target's requests.
#[derive(Debug, Clone)]
pub struct Process {
    /// What it is in the report ("origin", "redis", "viceroy").
    pub role: String,
    pub pid: u32,
}

impl Process {
    pub fn new(role: &str, pid: u32) -> Process {
        Process {
            role: role.to_owned(),
            pid,
        }
    }
}

/// The CPU seconds each of a target's processes had used at one moment, in their order.
#[derive(Debug, Clone)]
pub struct Snapshot(Vec<f64>);

/// Reads the CPU time of every process in `processes`.
pub fn snapshot(processes: &[Process]) -> anyhow::Result<Snapshot> {
    processes
        .iter()
        .map(|p| cpu_secs(p.pid).with_context(|| format!("CPU time of the {}", p.role)))
        .collect::<anyhow::Result<_>>()
        .map(Snapshot)
}

impl Snapshot {
    /// Microseconds of CPU per answered request each process spent between `self` and
    /// `later`, by role. Empty when nothing was answered.
    pub fn per_request(
        &self,
        later: &Snapshot,
        processes: &[Process],
        answered: u64,
    ) -> Vec<(String, f64)> {
        if answered == 0 {
            return Vec::new();
        }
        processes
            .iter()
            .zip(self.0.iter().zip(&later.0))
            .map(|(p, (before, after))| (p.role.clone(), (after - before) * 1e6 / answered as f64))
            .collect()
    }
}

/// User plus system CPU seconds `pid` has used, over all its threads, exited ones included
/// (fields 14 and 15 of `/proc/<pid>/stat`, in clock ticks).
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("/proc/{pid}/stat"))?;
    ticks_in_stat(&stat).map(|ticks| ticks as f64 / ticks_per_sec())
}

/// utime + stime of a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses
/// and may hold spaces or parentheses itself, so fields are counted from the last `)`.
fn ticks_in_stat(stat: &str) -> anyhow::Result<u64> {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        bail!("no command name in a /proc stat line");
    };
    // `rest` starts at field 3 (state): utime is field 14, stime field 15.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .context("short /proc stat line")?
            .parse::<u64>()
            .with_context(|| format!("field {n} of a /proc stat line"))
    };
    Ok(field(14)? + field(15)?)
}

/// The kernel's clock ticks per second for `/proc` times (`USER_HZ`: 100 on every Linux
/// architecture the bench runs on). Asked of `getconf` once rather than assumed, since the
/// workspace forbids the `unsafe` a direct `sysconf` call needs.
fn ticks_per_sec() -> f64 {
    static HZ: OnceLock<f64> = OnceLock::new();
    *HZ.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|hz| *hz > 0.0)
            .unwrap_or(100.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_system_ticks_are_read_after_a_command_name_with_spaces_and_parentheses() {
        let line = "4242 (tokio (x) 1) S 1 4242 4242 0 -1 4194560 2043 0 0 0 731 269 0 0 20 0 9 0";
        assert_eq!(ticks_in_stat(line).unwrap(), 731 + 269);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_secs(std::process::id()).unwrap() > 0.0);
    }

    #[test]
    fn per_request_divides_each_process_time_by_the_answers() {
        let processes = [Process::new("origin", 1), Process::new("redis", 2)];
        let before = Snapshot(vec![1.0, 2.0]);
        let after = Snapshot(vec![1.5, 2.1]);
        let per = before.per_request(&after, &processes, 10_000);
        assert_eq!(per.len(), 2);
        assert_eq!(per[0].0, "origin");
        assert!((per[0].1 - 50.0).abs() < 1e-9);
        assert!((per[1].1 - 10.0).abs() < 1e-9);
        assert!(before.per_request(&after, &processes, 0).is_empty());
    }
}

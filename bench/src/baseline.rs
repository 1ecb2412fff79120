//! An earlier revision's release origin and edge wasm (`scripts/bench-baseline.sh` builds them
//! into one directory), measured as one more subject beside today's hit paths in the same run,
//! so "did this change make a hit slower" is answered by a paired comparison, not by two runs
//! on a noisy machine. Knows where the files are; the hit parts start them.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

/// The baseline's binaries and the revision they were built from.
#[derive(Debug, Clone)]
pub struct Baseline {
    /// `gateway-origin` of that revision.
    pub origin: PathBuf,
    /// `gateway-compute.wasm` of that revision.
    pub edge_wasm: PathBuf,
    /// That revision's `fixtures/tenants.json` (today's may carry fields it refuses).
    pub tenants: PathBuf,
    /// The short revision (the directory's `REVISION` file), for labels.
    pub revision: String,
    /// Measure only today's judged hit and this revision's beside the floor (`--judged-only`):
    /// the other subjects are not started, so more rounds fit in the same time.
    pub judged_only: bool,
}

impl Baseline {
    /// Reads a directory written by `scripts/bench-baseline.sh`.
    pub fn open(dir: &Path, judged_only: bool) -> anyhow::Result<Baseline> {
        let origin = dir.join("gateway-origin");
        let edge_wasm = dir.join("gateway-compute.wasm");
        let tenants = dir.join("tenants.json");
        for file in [&origin, &edge_wasm, &tenants] {
            if !file.exists() {
                bail!(
                    "{} is missing: build the baseline with scripts/bench-baseline.sh <rev>",
                    file.display()
                );
            }
        }
        let revision = std::fs::read_to_string(dir.join("REVISION"))
            .with_context(|| format!("{}/REVISION", dir.display()))?
            .trim()
            .to_owned();
        Ok(Baseline {
            origin,
            edge_wasm,
            tenants,
            revision,
            judged_only,
        })
    }

    /// Whether a run measures only the judged pair: `--judged-only` with a baseline.
    pub fn judged_only(baseline: Option<&Baseline>) -> bool {
        baseline.is_some_and(|b| b.judged_only)
    }

    /// The subject's name in the report: `<what> (<revision>)`.
    pub fn label(&self, what: &str) -> String {
        format!("{what} ({})", self.revision)
    }
}

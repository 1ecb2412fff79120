//! Finds the `gateway-origin` binary of this build for tests that run the origin as a process,
//! and refuses one that is missing or older than the sources it is built from: `cargo test -p
//! gateway-e2e` rebuilds the origin library it links, but not the binary.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Context, bail};

use crate::repo_root;

const BUILD_HINT: &str = "run `cargo build -p gateway-origin --bins` (`just test` builds it)";

/// `target/<profile>/gateway-origin` of the profile this test binary was built with.
pub fn origin_binary() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    // A test binary lives in target/<profile>/deps, a harness binary in target/<profile>.
    let binary = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("gateway-origin"))
        .find(|candidate| candidate.is_file())
        .with_context(|| {
            format!(
                "no gateway-origin binary beside {} or in its parent directory: {BUILD_HINT}",
                exe.display()
            )
        })?;
    let built = modified(&binary)?;
    let repo = repo_root().canonicalize().unwrap_or_else(|_| repo_root());
    let roots = [
        "origin/src",
        "origin/Cargo.toml",
        "common/src",
        "common/Cargo.toml",
    ];
    for root in roots {
        if let Some((source, changed)) = newest(&repo.join(root))?
            && changed > built
        {
            bail!(
                "{} is older than {}: {BUILD_HINT}",
                binary.display(),
                source.display()
            );
        }
    }
    Ok(binary)
}

fn modified(path: &Path) -> anyhow::Result<SystemTime> {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .with_context(|| format!("reading the modification time of {}", path.display()))
}

/// The most recently modified file under `path` (or `path` itself), with its time.
fn newest(path: &Path) -> anyhow::Result<Option<(PathBuf, SystemTime)>> {
    if path.is_file() {
        return Ok(Some((path.to_owned(), modified(path)?)));
    }
    let mut latest: Option<(PathBuf, SystemTime)> = None;
    let entries = std::fs::read_dir(path).with_context(|| format!("listing {}", path.display()))?;
    for entry in entries {
        if let Some((file, time)) = newest(&entry?.path())?
            && latest.as_ref().is_none_or(|(_, t)| time > *t)
        {
            latest = Some((file, time));
        }
    }
    Ok(latest)
}

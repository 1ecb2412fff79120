//! The edge's floor under Viceroy: the `gateway-bench-bare-compute` wasm served on a free
//! loopback port with a minimal manifest (no stores, no backends). Killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use gateway_e2e::{free_port, repo_root, wait_for_port};

/// The bytes the bare service answers, which the bench also seeds as the edge's cached body.
pub const HIT_BODY: &[u8] = include_bytes!("../bare-compute/src/hit.json");

/// The release wasm of the bare service (`cargo build -p gateway-bench-bare-compute --release
/// --target wasm32-wasip1`, which `just bench` runs).
pub fn bare_wasm() -> anyhow::Result<PathBuf> {
    let wasm = repo_root().join("target/wasm32-wasip1/release/gateway-bench-bare-compute.wasm");
    if !wasm.exists() {
        bail!(
            "{} is missing: `cargo build -p gateway-bench-bare-compute --release --target wasm32-wasip1` (`just bench` does it)",
            wasm.display()
        );
    }
    Ok(wasm)
}

/// Viceroy running the bare service.
pub struct BareCompute {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
}

impl BareCompute {
    pub fn start() -> anyhow::Result<BareCompute> {
        let wasm = bare_wasm()?;
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("gw-bench-bare-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let manifest = dir.join("fastly.toml");
        std::fs::write(
            &manifest,
            "manifest_version = 3\nname = \"gateway-bench-bare\"\nlanguage = \"rust\"\n",
        )?;
        let log = std::fs::File::create(dir.join("viceroy.log"))?;
        let child = Command::new("viceroy")
            .arg("-C")
            .arg(&manifest)
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .arg(&wasm)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("viceroy is not installed (run `just setup`)")?;
        let mut bare = BareCompute {
            child: Some(child),
            port,
            dir,
        };
        if let Err(e) = wait_for_port(port, Duration::from_secs(60)) {
            bare.stop();
            bail!("viceroy (bare service) did not start: {e}");
        }
        Ok(bare)
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for BareCompute {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

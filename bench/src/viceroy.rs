//! The edge's floor under Viceroy: the `gateway-bench-bare-compute` wasm served on a free
//! loopback port with a minimal manifest (no stores, no backends). Killed on drop.

use std::path::PathBuf;

use anyhow::bail;
use gateway_e2e::edge::Edge;
use gateway_e2e::repo_root;

/// The bytes the bare service answers, which the bench also seeds as the edge's cached body.
pub const HIT_BODY: &[u8] = include_bytes!("../bare-compute/src/hit.json");

/// The wasm of the bare service, built as the edge is (`cargo build -p
/// gateway-bench-bare-compute --profile edge --target wasm32-wasip1`, which `just bench` runs).
pub fn bare_wasm() -> anyhow::Result<PathBuf> {
    let wasm = repo_root().join("target/wasm32-wasip1/edge/gateway-bench-bare-compute.wasm");
    if !wasm.exists() {
        bail!(
            "{} is missing: `cargo build -p gateway-bench-bare-compute --profile edge --target wasm32-wasip1` (`just bench` does it)",
            wasm.display()
        );
    }
    Ok(wasm)
}

/// Viceroy running the bare service (the edge harness's Viceroy process, with a minimal
/// manifest: no stores, no backends).
pub fn start_bare() -> anyhow::Result<Edge> {
    start_bare_under(&[])
}

/// [`start_bare`] with Viceroy run under `wrapper` (see [`Edge::start_wasm_under`]).
pub fn start_bare_under(wrapper: &[String]) -> anyhow::Result<Edge> {
    Edge::start_wasm_under(wrapper, &bare_wasm()?, "gw-bench-bare", |_| {
        Ok("manifest_version = 3\nname = \"gateway-bench-bare\"\nlanguage = \"rust\"\n".to_owned())
    })
}

//! The sealing cost per KiB in wasm: runs `gateway-bench-seal-wasm.wasm` under `viceroy run`
//! (the edge's runtime, no AES instructions) and reads the JSON it prints. Starts no server.

use std::process::Command;

use anyhow::{Context, bail};
use gateway_e2e::repo_root;
use serde_json::Value;

/// ns per KiB to seal and open, by body size and cipher (`bench/seal-wasm/src/main.rs`).
pub fn run() -> anyhow::Result<Value> {
    let wasm = repo_root().join("target/wasm32-wasip1/release/gateway-bench-seal-wasm.wasm");
    if !wasm.exists() {
        bail!(
            "{} is missing: `cargo build -p gateway-bench-seal-wasm --release --target wasm32-wasip1` (`just bench` does it)",
            wasm.display()
        );
    }
    let output = Command::new("viceroy")
        .arg("run")
        .arg(&wasm)
        .output()
        .context("viceroy is not installed (run `just setup`)")?;
    if !output.status.success() {
        bail!(
            "the seal benchmark failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = String::from_utf8_lossy(&output.stdout);
    let json = line
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .context("the seal benchmark printed no JSON")?;
    Ok(serde_json::from_str(json)?)
}

/// The report's section: one row per body size and cipher.
pub fn markdown(figures: &Value) -> String {
    let mut out = String::from(
        "## Sealing in wasm\n\nns per KiB of body in wasm32-wasip1 under `viceroy run` (release, \
         one core; `gateway_entry` is what the edge pays: the whole entry sealed or opened, the \
         tenant key derived each time). XChaCha20-Poly1305 is what entries use.\n\n\
         | body | cipher | seal ns/KiB | open ns/KiB |\n|---|---|---:|---:|\n",
    );
    if let Some(sizes) = figures.as_object() {
        for (size, ciphers) in sizes {
            for (cipher, f) in ciphers.as_object().into_iter().flatten() {
                out.push_str(&format!(
                    "| {size} | {cipher} | {} | {} |\n",
                    f["seal_ns_per_kib"], f["open_ns_per_kib"]
                ));
            }
        }
    }
    out
}

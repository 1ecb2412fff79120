//! Writes the edge's Config Store `tenants` (sha256(key) -> tenant record) from the tenants
//! file the origin reads, as the flat JSON object Viceroy's `format = "json"` config stores take.
//! Usage: edge-tenants fixtures/tenants.json > fixtures/edge/tenants.json

use anyhow::Context;

fn main() -> anyhow::Result<()> {
    let path = std::env::args()
        .nth(1)
        .context("usage: edge-tenants TENANTS_JSON")?;
    let raw = std::fs::read(&path).with_context(|| format!("reading {path}"))?;
    println!("{}", gateway_e2e::edge_tenants_json(&raw)?);
    Ok(())
}

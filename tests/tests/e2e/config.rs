//! The edge's local Config Store `tenants` must be generated from the same tenants file the
//! origin reads; a stale copy would let the tiers disagree on who a caller is.

#[test]
fn committed_edge_tenants_store_matches_the_tenants_file() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let tenants =
        std::fs::read(format!("{root}/fixtures/tenants.json")).expect("fixtures/tenants.json");
    let committed = std::fs::read_to_string(format!("{root}/fixtures/edge/tenants.json"))
        .expect("fixtures/edge/tenants.json");
    let expected = gateway_e2e::edge_tenants_json(&tenants).expect("valid tenants file");
    assert_eq!(
        committed.trim_end(),
        expected,
        "regenerate with `just edge-tenants`"
    );
}

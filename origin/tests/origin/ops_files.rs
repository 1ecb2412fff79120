//! The operations files name only metrics the origin registers: a metric renamed or removed in
//! the code fails here, not as an empty dashboard panel or an alert that can never fire.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::harness::Stack;
use crate::replication::{fake_api, replicating_to};

/// Every file under `ops/` that names `gateway_*` metrics (the alert tests included: their
/// input series must be what the origin exposes, or the tests prove nothing).
const OPS_FILES: [&str; 3] = [
    "ops/grafana/gateway.json",
    "ops/prometheus/alerts.yml",
    "ops/prometheus/alerts.test.yml",
];

/// The series a histogram family `x` is exposed as: `x_bucket`, `x_sum`, `x_count`.
const HISTOGRAM_SERIES: [&str; 3] = ["_bucket", "_sum", "_count"];

/// Every `gateway_<name>` in `text` (a name is lower-case letters, digits and underscores, and
/// does not continue a longer word). A bare `gateway_` (the prefix itself) is not a name.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (at, _) in text.match_indices("gateway_") {
        let continues_a_word = text[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if continues_a_word {
            continue;
        }
        let name: String = text[at..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        if name.len() > "gateway_".len() {
            names.insert(name);
        }
    }
    names
}

/// Whether `name` is a registered family, or one of a registered histogram's series (a
/// counter, `…_total`, has no `_count`).
fn is_registered(name: &str, registered: &BTreeSet<String>) -> bool {
    registered.contains(name)
        || HISTOGRAM_SERIES.iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|family| !family.ends_with("_total") && registered.contains(family))
        })
}

#[test]
fn metric_names_are_found_in_expressions_and_prose() {
    let text = r#"sum(rate(gateway_answers_total{tier="edge"}[5m])) / x_gateway_not_this
        histogram_quantile(0.99, rate(gateway_usage_delay_seconds_bucket[5m])) prefix `gateway_`"#;
    assert_eq!(
        metric_names(text).into_iter().collect::<Vec<_>>(),
        [
            "gateway_answers_total",
            "gateway_usage_delay_seconds_bucket"
        ]
    );
    let registered: BTreeSet<String> = ["gateway_usage_delay_seconds", "gateway_answers_total"]
        .map(String::from)
        .into();
    assert!(is_registered(
        "gateway_usage_delay_seconds_bucket",
        &registered
    ));
    assert!(is_registered("gateway_answers_total", &registered));
    assert!(!is_registered("gateway_answers_total_count", &registered));
    assert!(!is_registered("gateway_answers", &registered));
}

/// The origin is started with replication on, so the replicator's families are registered
/// too, and asked for every family it registered (including labelled families that have no
/// sample yet, which `/metrics` leaves out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_alert_rules_name_is_registered_by_the_origin() {
    let api = fake_api().await;
    let stack = Stack::start_with(replicating_to(&api, |_| {})).await;
    let registered: BTreeSet<String> = stack.service.metrics().family_names().into_iter().collect();
    assert!(
        registered.contains("gateway_replication_queue_depth"),
        "the replicator's families are registered: {registered:?}"
    );

    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut missing = Vec::new();
    for file in OPS_FILES {
        let text = std::fs::read_to_string(root.join(file))
            .unwrap_or_else(|e| panic!("{file} is readable: {e}"));
        let names = metric_names(&text);
        // A scan that finds next to nothing is a broken scan, not a clean file.
        assert!(
            names.len() >= 10,
            "only {} metric names found in {file}: {names:?}",
            names.len()
        );
        missing.extend(
            names
                .into_iter()
                .filter(|name| !is_registered(name, &registered))
                .map(|name| format!("{file}: {name}")),
        );
    }
    assert!(
        missing.is_empty(),
        "metrics named in ops files but not registered by the origin:\n  {}\nregistered: {registered:?}",
        missing.join("\n  ")
    );
}

//! Real clients for the two newer APIs: the official `openai` package (Responses API) and the
//! official `anthropic` package (Messages API), unmodified, pointed at the edge. The script
//! (tests/python/apis_client_check.py) reports; this test asserts. Both packages live in
//! `.local/venv` (`just python-venv`); without them the test fails, never skips.

use std::time::Duration;

use gateway_e2e::sdk_script::run_sdk_script;
use gateway_e2e::stack::Stack;
use serde_json::Value;

/// Runs the script against the stack's edge (`gateway_e2e::sdk_script`).
async fn run_script(stack: &Stack) -> Value {
    run_sdk_script(stack, "apis_client_check.py", Duration::from_secs(180))
        .await
        .expect("the SDK script ran")
}

fn layers(answers: &Value) -> Vec<(String, String)> {
    answers
        .as_array()
        .expect("answers")
        .iter()
        .map(|a| {
            (
                a["x_cache"].as_str().unwrap_or_default().to_owned(),
                a["x_cache_layer"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn walk() -> Vec<(String, String)> {
    [("MISS", "upstream"), ("HIT", "origin"), ("HIT", "edge")]
        .map(|(c, l)| (c.to_owned(), l.to_owned()))
        .to_vec()
}

/// Every answer of `answers` says the same text with the same usage as the first (the live
/// one): the replays from either tier parse in the SDK exactly as the live answer did.
fn same_answer(name: &str, answers: &Value) {
    let answers = answers.as_array().expect("answers");
    let first = &answers[0];
    assert!(
        first["text"]
            .as_str()
            .is_some_and(|t| t.starts_with("echo:")),
        "{name}: {first}"
    );
    assert!(first["usage"].is_object(), "{name}: {first}");
    for answer in answers {
        assert_eq!(answer["text"], first["text"], "{name}");
        assert_eq!(answer["usage"], first["usage"], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_and_anthropic_clients_cache_through_both_tiers() {
    let stack = Stack::start().await.expect("stack starts");
    let summary = run_script(&stack).await;
    println!(
        "openai {}, anthropic {}: {} requests",
        summary["openai_version"], summary["anthropic_version"], summary["requests"]
    );

    for name in [
        "responses",
        "responses_stream",
        "messages",
        "messages_stream",
        "messages_helper",
    ] {
        assert_eq!(layers(&summary[name]), walk(), "{name}");
        same_answer(name, &summary[name]);
    }
    for answer in summary["responses_stream"].as_array().unwrap() {
        assert_eq!(answer["first"], "response.created");
        assert_eq!(answer["last"], "response.completed");
    }
    for answer in summary["messages_helper"].as_array().unwrap() {
        assert_eq!(answer["final_text"], answer["text"]);
        assert_eq!(answer["stop_reason"], "end_turn");
    }

    for name in [
        "responses_stream_then_plain",
        "responses_plain_then_stream",
        "messages_stream_then_plain",
        "messages_plain_then_stream",
    ] {
        let pair = &summary[name];
        assert_eq!(
            layers(pair),
            [("MISS", "upstream"), ("HIT", "origin")].map(|(c, l)| (c.to_owned(), l.to_owned())),
            "{name}"
        );
        same_answer(name, pair);
    }

    for (name, detail) in [
        ("previous_response_id", "previous-response-id"),
        ("background", "background"),
    ] {
        for answer in summary[name].as_array().unwrap() {
            assert_eq!(answer["x_cache"], "BYPASS", "{name}");
            let status = answer["cache_status"].as_str().unwrap_or_default();
            assert!(
                status.contains(&format!("detail={detail}")),
                "{name}: {status}"
            );
        }
    }

    let bad = &summary["bad_responses"];
    assert_eq!(bad["status"], 400, "{bad}");
    assert_eq!(bad["body"]["param"], "input", "{bad}");
    let bad = &summary["bad_messages"];
    assert_eq!(bad["status"], 400, "{bad}");
    assert_eq!(bad["body"]["type"], "error", "{bad}");
    assert_eq!(
        bad["body"]["error"]["type"], "invalid_request_error",
        "{bad}"
    );
    let unknown = &summary["messages_unknown_key"];
    assert_eq!(unknown["status"], 401, "{unknown}");
    assert_eq!(unknown["body"]["error"]["type"], "authentication_error");

    // One provider call per distinct cacheable request, two per never-cached pair.
    let stats = stack.provider.stats();
    assert_eq!(stats.responses, 2 + 2 + 4, "{stats:?}");
    assert_eq!(stats.messages, 3 + 2, "{stats:?}");
}

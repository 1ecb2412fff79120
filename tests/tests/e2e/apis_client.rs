//! Real clients for the two newer APIs: the official `openai` package (Responses API) and the
//! official `anthropic` package (Messages API), unmodified, pointed at the edge. The script
//! (tests/python/apis_client_check.py) reports; this test asserts. Both packages live in
//! `.local/venv` (`just python-venv`); without them the test fails, never skips.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use gateway_e2e::repo_root;
use gateway_e2e::stack::{ACME, Stack};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

fn venv_python() -> PathBuf {
    let python = repo_root().join(".local/venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `just python-venv` (or `just setup`) to install the official \
         openai and anthropic clients this test drives",
        python.display()
    );
    python
}

/// Runs the script against the stack's edge, settling the stack whenever it asks.
async fn run_script(stack: &Stack) -> Value {
    let script = repo_root().join("tests/python/apis_client_check.py");
    let mut child = Command::new(venv_python())
        .arg(&script)
        .arg(stack.edge.url())
        .args(["--api-key", ACME, "--settle-on-stdin"])
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the venv's python runs");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut stderr = child.stderr.take().expect("stderr");
    let mut summary = None;
    let talk = async {
        while let Some(line) = lines.next_line().await.expect("script output") {
            let Ok(message) = serde_json::from_str::<Value>(&line) else {
                println!("apis_client_check.py: {line}");
                continue;
            };
            if let Some(sent) = message["settle"].as_u64() {
                stack.count_edge_requests(sent);
                stack.settle().await;
                stdin.write_all(b"\n").await.expect("script stdin");
            } else if message["summary"].is_object() {
                summary = Some(message["summary"].clone());
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(180), talk)
        .await
        .expect("the script finished within 3 minutes");
    let status = child.wait().await.expect("script exit status");
    let mut errors = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut errors)
        .await
        .expect("script stderr");
    assert!(
        status.success(),
        "the client script failed ({status}):\n{errors}"
    );
    summary.unwrap_or_else(|| panic!("the script printed no summary:\n{errors}"))
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

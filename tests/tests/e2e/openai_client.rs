//! A real client: the official `openai` Python package, unmodified, pointed at the edge with
//! `base_url`. The script (tests/python/openai_client_check.py) reports; this test asserts.
//! The package lives in `.local/venv` (`just python-venv`); without it the test fails.

use std::time::Duration;

use gateway_common::route::Route;
use gateway_e2e::sdk_script::{run_sdk_script, venv_python};
use gateway_e2e::stack::{Stack, chat_body, key_for};
use serde_json::{Value, json};

/// Runs the script against the stack's edge (`gateway_e2e::sdk_script`).
async fn run_script(stack: &Stack) -> Value {
    run_sdk_script(stack, "openai_client_check.py", Duration::from_secs(120))
        .await
        .expect("the SDK script ran")
}

fn cache(answer: &Value) -> (&str, &str) {
    (
        answer["x_cache"].as_str().unwrap_or_default(),
        answer["x_cache_layer"].as_str().unwrap_or_default(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_official_openai_python_client_works_unmodified_through_the_edge() {
    let python = venv_python();
    let stack = Stack::start().await.expect("stack starts");
    let summary = run_script(&stack).await;
    println!(
        "openai {} ({}): {} requests",
        summary["openai_version"],
        python.display(),
        summary["requests"]
    );

    // Chat, plain: provider, then origin, then edge; one answer throughout.
    let chat = summary["chat"].as_array().expect("chat answers");
    let layers: Vec<(&str, &str)> = chat.iter().map(cache).collect();
    assert_eq!(
        layers,
        [("MISS", "upstream"), ("HIT", "origin"), ("HIT", "edge")]
    );
    let content = chat[0]["content"].as_str().expect("content");
    assert!(content.starts_with("echo:"), "{content:?}");
    for answer in chat {
        assert_eq!(answer["content"], content);
        assert_eq!(answer["id"], chat[0]["id"]);
        assert_eq!(answer["finish_reason"], "stop");
    }
    let key = key_for(
        "acme",
        Route::ChatCompletions,
        &chat_body("a question from the official client"),
    );
    assert_eq!(chat[2]["x_cache_key"], key.hex());

    // Chat, streamed from the cached completion, with and without the usage chunk.
    for (name, usage) in [("stream", false), ("stream_usage", true)] {
        let stream = &summary[name];
        assert_eq!(cache(stream), ("HIT", "edge"), "{name}");
        assert_eq!(
            stream["content"], content,
            "{name}: the stream says what the JSON said"
        );
        assert_eq!(stream["ids"], json!([chat[0]["id"]]), "{name}");
        assert_eq!(stream["finish_reason"], "stop", "{name}");
        assert_eq!(
            stream["usage"].is_object(),
            usage,
            "{name}: {}",
            stream["usage"]
        );
    }
    assert!(summary["stream_usage"]["usage"]["total_tokens"].as_u64() > Some(0));

    // Streamed first (live from the provider), then asked plainly: one answer.
    let first = &summary["stream_first"];
    assert_eq!(cache(first), ("MISS", "upstream"));
    assert!(
        first["content_type"]
            .as_str()
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    assert!(
        first["chunks"].as_u64() > Some(3),
        "a real stream: {}",
        first["chunks"]
    );
    assert!(first["usage"].is_object());
    let after = &summary["chat_after_stream"];
    assert_eq!(cache(after), ("HIT", "origin"));
    assert_eq!(after["content"], first["content"]);
    assert_eq!(json!([after["id"]]), first["ids"]);

    // Embeddings: provider, origin, edge; the client's base64 decoded to the same vector.
    let embeddings = summary["embeddings"].as_array().expect("embeddings");
    let layers: Vec<(&str, &str)> = embeddings.iter().map(cache).collect();
    assert_eq!(
        layers,
        [("MISS", "upstream"), ("HIT", "origin"), ("HIT", "edge")]
    );
    for answer in embeddings {
        assert_eq!(answer["length"], 8, "the mock's default dimension");
        assert_eq!(answer["vector"], embeddings[0]["vector"]);
    }

    assert_eq!(stack.provider.calls(), 3, "one call per distinct request");
    let stats = stack.provider.stats();
    assert_eq!((stats.chat, stats.streams, stats.embeddings), (2, 1, 1));
    assert_eq!(stack.redis.keys("gw:v1:acme:*").expect("keys").len(), 3);
}

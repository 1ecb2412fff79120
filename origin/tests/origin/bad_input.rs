//! Bad input: the right status, an OpenAI-shaped body, no provider call, nothing cached.

use serde_json::json;

use crate::harness::{ACME, Options, Stack, openai_error};

const LIMIT: usize = 2048;

struct Case {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    key: Option<&'static str>,
    body: String,
    status: u16,
}

fn case(
    name: &'static str,
    method: &'static str,
    path: &'static str,
    body: &str,
    status: u16,
) -> Case {
    Case {
        name,
        method,
        path,
        key: Some(ACME),
        body: body.to_string(),
        status,
    }
}

fn cases() -> Vec<Case> {
    let chat = "/v1/chat/completions";
    let msgs = r#"[{"role":"user","content":"hi"}]"#;
    vec![
        case("invalid JSON", "POST", chat, "{\"model\":", 400),
        case("not JSON at all", "POST", chat, "hello", 400),
        case("empty body", "POST", chat, "", 400),
        case("a top-level array", "POST", chat, "[1,2]", 400),
        case("model of the wrong type", "POST", chat, &format!(r#"{{"model":5,"messages":{msgs}}}"#), 400),
        case("messages of the wrong type", "POST", chat, r#"{"model":"gpt-4o-mini","messages":"hi"}"#, 400),
        case("missing model", "POST", chat, &format!(r#"{{"messages":{msgs}}}"#), 400),
        case("missing messages", "POST", chat, r#"{"model":"gpt-4o-mini"}"#, 400),
        case("empty messages", "POST", chat, r#"{"model":"gpt-4o-mini","messages":[]}"#, 400),
        case("a message without a role", "POST", chat, r#"{"model":"gpt-4o-mini","messages":[{"content":"x"}]}"#, 400),
        case(
            "a duplicate key",
            "POST",
            chat,
            &format!(r#"{{"model":"gpt-4o-mini","model":"gpt-4o","messages":{msgs}}}"#),
            400,
        ),
        case("stream of the wrong type", "POST", chat, &format!(r#"{{"model":"gpt-4o-mini","stream":"yes","messages":{msgs}}}"#), 400),
        case("trailing garbage", "POST", chat, &format!(r#"{{"model":"gpt-4o-mini","messages":{msgs}}} x"#), 400),
        case("embeddings without input", "POST", "/v1/embeddings", r#"{"model":"text-embedding-3-small"}"#, 400),
        case("completions without prompt", "POST", "/v1/completions", r#"{"model":"gpt-4o-mini"}"#, 400),
        case(
            "a body over the limit",
            "POST",
            chat,
            &json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x".repeat(LIMIT)}]}).to_string(),
            413,
        ),
        case("a model the tenant may not use", "POST", chat, &format!(r#"{{"model":"gpt-4o","messages":{msgs}}}"#), 403),
        case("an unknown route", "POST", "/v1/nope", "{}", 404),
        case("an unknown top-level path", "GET", "/", "", 404),
        case("GET on a POST route", "GET", chat, "", 405),
        case("PUT on a POST route", "PUT", chat, "{}", 405),
        case("DELETE on the models route", "DELETE", "/v1/models", "", 405),
        Case {
            key: None,
            ..case("no API key", "POST", chat, &format!(r#"{{"model":"gpt-4o-mini","messages":{msgs}}}"#), 401)
        },
        Case {
            key: Some("sk-unknown"),
            ..case("an unknown API key", "POST", chat, &format!(r#"{{"model":"gpt-4o-mini","messages":{msgs}}}"#), 401)
        },
        Case {
            key: None,
            ..case("models without a key", "GET", "/v1/models", "", 401)
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_an_openai_shaped_error_and_nothing_is_cached() {
    let stack = Stack::start_with(Options {
        settings: Box::new(|s| s.server.max_body_bytes = LIMIT),
        ..Options::default()
    })
    .await;
    for case in cases() {
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).unwrap();
        let mut request = stack
            .http
            .request(method, format!("{}{}", stack.url, case.path))
            .header("content-type", "application/json")
            .body(case.body.clone());
        if let Some(key) = case.key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), case.status, "{}", case.name);
        assert!(
            response.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with("application/json"),
            "{}",
            case.name
        );
        let body = openai_error(response).await;
        if case.status == 401 {
            assert_eq!(
                body["error"]["type"], "authentication_error",
                "{}",
                case.name
            );
        }
    }
    stack.settle().await;
    assert_eq!(
        stack.provider_calls(),
        0,
        "bad input never reaches a provider"
    );
    assert_eq!(
        stack.redis.entries(),
        0,
        "bad input never reaches the cache"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_declared_over_the_limit_is_refused_before_it_is_read() {
    let stack = Stack::start_with(Options {
        settings: Box::new(|s| s.server.max_body_bytes = LIMIT),
        ..Options::default()
    })
    .await;
    let big = "x".repeat(LIMIT * 4);
    let response = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.url))
        .bearer_auth(ACME)
        .header("content-length", big.len())
        .body(big)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body = openai_error(response).await;
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_request_head_in_time_gets_408_and_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let stack = Stack::start_with(Options {
        settings: Box::new(|s| s.server.client_request_timeout_ms = 1_500),
        ..Options::default()
    })
    .await;
    let addr = stack.url.trim_start_matches("http://");
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Half a request head, then nothing.
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: origin\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // Before actix's own 5 s default: the answer comes from the setting. (actix measures it
    // from a clock it refreshes every 500 ms, so the wait can be up to that much shorter.)
    tokio::time::timeout(
        std::time::Duration::from_secs(4),
        slow.read_to_end(&mut answer),
    )
    .await
    .expect("the origin closes the connection")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // A client that sends its request promptly is unaffected.
    let response = stack.chat(ACME, "sent in time").await;
    assert_eq!(response.status(), 200);
}

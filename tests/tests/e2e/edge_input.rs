//! Bad input at the edge: every case is a clean OpenAI-shaped error with the right status,
//! never a 500, a panic or an origin request for something the edge can refuse itself.

use gateway_e2e::stack::{ACME, Stack};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde_json::Value;

async fn error_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.expect("an OpenAI-shaped JSON error");
    assert!(body["error"]["message"].is_string(), "{body}");
    assert!(body["error"]["type"].is_string(), "{body}");
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_get_clean_errors_from_the_edge_without_reaching_the_origin() {
    let stack = Stack::start().await.expect("stack starts");
    let url = format!("{}/v1/chat/completions", stack.edge.url());
    let post = |body: Vec<u8>| stack.http.post(&url).bearer_auth(ACME).body(body).send();

    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("invalid JSON", b"{\"model\":".to_vec(), 400),
        ("not an object", b"[1,2,3]".to_vec(), 400),
        (
            "duplicate key",
            br#"{"model":"gpt-4o-mini","model":"x","messages":[]}"#.to_vec(),
            400,
        ),
        (
            "missing messages",
            br#"{"model":"gpt-4o-mini"}"#.to_vec(),
            400,
        ),
        (
            "wrong type",
            br#"{"model":42,"messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            400,
        ),
        ("not UTF-8", vec![0xff, 0xfe, 0x00], 400),
        ("too large", vec![b' '; 5 * 1024 * 1024], 413),
    ];
    for (name, body, expected) in cases {
        let (status, body) = error_of(post(body).await.expect(name)).await;
        assert_eq!(status, expected, "{name}: {body}");
    }

    // A body over the limit without a Content-Length (chunked) is refused as it streams in.
    let chunks =
        futures_util::stream::iter((0..80).map(|_| Ok::<_, std::io::Error>(vec![b' '; 64 * 1024])));
    let resp = stack
        .http
        .post(&url)
        .bearer_auth(ACME)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("chunked upload");
    assert_eq!(error_of(resp).await.0, 413);

    let resp = stack
        .http
        .post(&url)
        .header(
            AUTHORIZATION,
            HeaderValue::from_bytes(b"Bearer \xff\xfe").expect("obs-text"),
        )
        .body("{}")
        .send()
        .await
        .expect("non-UTF-8 key");
    assert_eq!(error_of(resp).await.0, 401);

    let resp = stack
        .http
        .get(format!("{}/not-an-api", stack.edge.url()))
        .send()
        .await
        .expect("404");
    assert_eq!(error_of(resp).await.0, 404);

    assert_eq!(
        stack.origin_requests(),
        0,
        "the edge refused all of these itself"
    );
    assert_eq!(stack.provider.calls(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wrong_method_on_an_api_route_is_answered_by_the_origin_as_405() {
    let stack = Stack::start().await.expect("stack starts");
    let resp = stack
        .http
        .get(format!("{}/v1/chat/completions", stack.edge.url()))
        .bearer_auth(ACME)
        .send()
        .await
        .expect("answers");
    let (status, _) = error_of(resp).await;
    assert_eq!(status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_traceparent_that_is_not_utf8_starts_a_new_trace() {
    let stack = Stack::start().await.expect("stack starts");
    let resp = stack
        .http
        .post(format!("{}/v1/chat/completions", stack.edge.url()))
        .bearer_auth(ACME)
        .header(
            "traceparent",
            HeaderValue::from_bytes(b"00-\xff\xfe").expect("obs-text"),
        )
        .json(&gateway_e2e::stack::chat_body(
            "a question with a broken traceparent",
        ))
        .send()
        .await
        .expect("non-UTF-8 traceparent");
    assert_eq!(resp.status().as_u16(), 200, "{:?}", resp.text().await);
    // Sent past `edge_post`: counted, so `settle` waits for its log line.
    stack.count_edge_requests(1);
    stack.settle().await;
    let lines = stack.edge.log_lines();
    let trace_id = lines.last().expect("the edge's log line")["trace_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        trace_id.len() == 32 && trace_id.bytes().all(|b| b.is_ascii_hexdigit()),
        "a new trace id: {trace_id:?}"
    );
}

//! A deploy: the origin binary under SIGTERM sends what it accepted for the edge before it
//! exits, instead of losing it with the process.
#![allow(
    clippy::expect_used,
    reason = "test: a failed expectation is a failed test"
)]

use std::process::Command;
use std::time::{Duration, Instant};

use gateway_fixtures::process::{ChildProcess, free_port};
use gateway_fixtures::provider::MockProvider;

use crate::harness::{ACME, Redis, chat_body, mock_config, tenants_file};
use crate::replication::{EDGE_MISS, fake_api};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_replication_queue_before_the_process_exits() {
    let redis = Redis::start();
    let provider = MockProvider::start(mock_config("mock", 0))
        .await
        .expect("mock provider");
    let api = fake_api().await;
    let port = free_port().expect("a free port");
    let mut origin = ChildProcess::new("gw-shutdown-origin").expect("scratch dir");
    let config = origin.dir().join("origin.toml");
    let q = |s: &str| serde_json::to_string(s).expect("a string");
    std::fs::write(
        &config,
        format!(
            r#"dev_mode = true
[server]
listen = "127.0.0.1:{port}"
workers = 1
shutdown_timeout_secs = 10
[redis]
url = {redis}
[tenants]
file = {tenants}
[[providers]]
name = "mock"
base_url = {provider}
api_key_env = "MOCK_KEY"
models = {{ "gpt-4o-mini" = "gpt-4o-mini" }}
[replication]
enabled = true
api_base_url = {api}
store_id = {store}
api_token_env = "FASTLY_TOKEN"
# Nothing is sent before the signal: the entries are only queued.
linger_ms = 600000
"#,
            redis = q(&redis.url()),
            tenants = q(&tenants_file().to_string_lossy()),
            provider = q(&provider.base_url()),
            api = q(&api.base_url()),
            store = q(api.store_id()),
        ),
    )
    .expect("config written");
    let mut command = Command::new(env!("CARGO_BIN_EXE_gateway-origin"));
    command
        .arg("--config")
        .arg(&config)
        .env("MOCK_KEY", "sk-mock")
        .env("FASTLY_TOKEN", api.token());
    origin.spawn(command).expect("the origin starts");
    origin
        .wait_for_port(port, Duration::from_secs(20))
        .expect("the origin listens");

    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}");
    for i in 0..3 {
        let response = http
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(ACME)
            .header(EDGE_MISS[0].0, EDGE_MISS[0].1)
            .json(&chat_body(&format!("deploy {i}")))
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = http
            .get(format!("{url}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        if page.contains("gateway_replication_queued_total 3") {
            break;
        }
        assert!(Instant::now() < deadline, "three entries never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(api.entries().is_empty(), "nothing sent before the signal");

    origin.signal("-TERM").expect("SIGTERM sent");
    let status = tokio::task::block_in_place(|| origin.wait_exit(Duration::from_secs(15)))
        .expect("the origin exits within its shutdown timeout");
    assert!(status.success(), "{status:?}: {}", origin.log_tail(20));
    assert_eq!(api.entries().len(), 3, "{}", origin.log_tail(20));
    assert!(
        origin.log().contains("replication drained"),
        "{}",
        origin.log_tail(20)
    );
}

//! Hit-path benchmark: `wrk` against the origin answering a warm Redis entry, then against a
//! bare actix-web handler returning the same bytes, in one run; prints both and their ratio.
//! Run with `cargo run --release -p gateway-origin --example bench-origin -- --help`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use actix_web::{App, HttpResponse, HttpServer, web};
use anyhow::{Context, bail};
use clap::Parser;
use gateway_common::tenant::TenantsFile;
use gateway_fixtures::provider::{MockProvider, ProviderConfig};
use gateway_fixtures::redis::RedisServer;
use gateway_origin::settings::{ProviderSettings, Secret, Settings};
use gateway_origin::tenants::Tenants;
use gateway_origin::{Application, Parts};

#[derive(Debug, Parser)]
struct Args {
    /// Seconds of load per target.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    connections: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: u32,
    /// actix workers for each server (the same for both, so the comparison is fair).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Keep the fixture tenants' rate limits and token budgets (adds a Redis round trip per
    /// request, in parallel with the cache read; the 100 req/s limit then refuses most requests).
    #[arg(long)]
    with_limits: bool,
}

const BODY: &str =
    r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Benchmark the hit path."}]}"#;

#[derive(Debug)]
struct Measure {
    requests_per_sec: f64,
    p50: String,
    p99: String,
    errors: String,
}

#[actix_web::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    Command::new("wrk")
        .arg("--version")
        .output()
        .context("the load generator `wrk` is not installed (apt-get install wrk)")?;

    let redis = RedisServer::start()?;
    let provider = MockProvider::start(ProviderConfig::default()).await?;
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut settings = Settings::for_tests();
    settings.server.workers = args.workers;
    settings.redis.url = Secret::new(redis.url());
    settings.providers = vec![ProviderSettings {
        name: "mock".into(),
        base_url: provider.base_url(),
        base_url_env: None,
        api_key_env: None,
        api_key: Some(Secret::new("sk-bench")),
        models: [("gpt-4o-mini".to_string(), "gpt-4o-mini".to_string())].into(),
        priority: 0,
        weight: 1,
        timeout_ms: 5_000,
        connect_timeout_ms: 500,
    }];
    let file = TenantsFile::parse(&std::fs::read(workspace.join("fixtures/tenants.json"))?)
        .map_err(anyhow::Error::msg)?;
    let tenants = file
        .tenants
        .into_iter()
        .map(|mut t| {
            if !args.with_limits {
                t.requests_per_second = None;
                t.monthly_token_budget = None;
            }
            t
        })
        .collect();
    let app = Application::build_with(
        settings,
        Parts {
            tenants: Some(Tenants::new(tenants)),
            ..Parts::default()
        },
    )?;
    let origin_url = format!("{}/v1/chat/completions", app.base_url());
    let origin = app.handle();
    let service = std::sync::Arc::clone(app.service());
    actix_web::rt::spawn(app.run());

    // Warm the entry and take the exact bytes a hit answers with.
    let client = reqwest::Client::new();
    let send = || {
        client
            .post(&origin_url)
            .bearer_auth("sk-dev-acme")
            .header("content-type", "application/json")
            .body(BODY)
            .send()
    };
    send().await?.bytes().await?;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let hit = send().await?;
    if hit.headers().get("x-cache").and_then(|v| v.to_str().ok()) != Some("HIT") {
        bail!("the warm-up request was not a hit; is Redis up?");
    }
    let bytes = Arc::new(hit.bytes().await?);

    let bare_bytes = Arc::clone(&bytes);
    let bare = HttpServer::new(move || {
        let bytes = Arc::clone(&bare_bytes);
        App::new().route(
            "/v1/chat/completions",
            web::post().to(move |_body: web::Bytes| {
                let bytes = Arc::clone(&bytes);
                async move {
                    HttpResponse::Ok()
                        .content_type("application/json")
                        .body(bytes.as_ref().clone())
                }
            }),
        )
    })
    .workers(args.workers)
    .bind("127.0.0.1:0")?;
    let bare_url = format!("http://{}/v1/chat/completions", bare.addrs()[0]);
    let bare = bare.run();
    let bare_handle = bare.handle();
    actix_web::rt::spawn(bare);

    let script = std::env::temp_dir().join(format!("bench-origin-{}.lua", std::process::id()));
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = [==[{BODY}]==]\n\
             wrk.headers[\"Content-Type\"] = \"application/json\"\n\
             wrk.headers[\"Authorization\"] = \"Bearer sk-dev-acme\"\n"
        ),
    )?;
    println!(
        "bench-origin: {} s per target, {} connections, {} wrk thread(s), {} actix worker(s) each, {} response bytes",
        args.duration_secs,
        args.connections,
        args.threads,
        args.workers,
        bytes.len()
    );
    // Both servers answer the same bytes before anything is measured.
    let bare_answer = client
        .post(&bare_url)
        .header("content-type", "application/json")
        .body(BODY)
        .send()
        .await?
        .bytes()
        .await?;
    if bare_answer != *bytes {
        bail!("the bare handler does not answer the origin's bytes");
    }
    // wrk blocks; run it off this runtime's thread so both servers keep being driven.
    let measure = |url: String| {
        let (threads, connections, duration) = (args.threads, args.connections, args.duration_secs);
        let script = script.clone();
        tokio::task::spawn_blocking(move || run_wrk(threads, connections, duration, &script, &url))
    };
    let origin_measure = measure(origin_url.clone()).await??;
    let bare_measure = measure(bare_url.clone()).await??;
    let _ = std::fs::remove_file(&script);
    let provider_calls = provider.calls();

    println!();
    println!("| target | requests/s | p50 | p99 | errors |");
    println!("|---|---:|---:|---:|---|");
    for (name, m) in [
        ("origin (Redis hit)", &origin_measure),
        ("bare actix handler", &bare_measure),
    ] {
        println!(
            "| {name} | {:.0} | {} | {} | {} |",
            m.requests_per_sec, m.p50, m.p99, m.errors
        );
    }
    println!();
    println!(
        "ratio origin/bare throughput: {:.2} (provider calls during the run: {provider_calls})",
        origin_measure.requests_per_sec / bare_measure.requests_per_sec
    );

    let page = String::from_utf8(service.metrics().render())?;
    for line in page.lines().filter(|l| {
        l.starts_with("gateway_cache_results_total") || l.starts_with("gateway_redis_errors_total")
    }) {
        println!("  {line}");
    }

    origin.stop(true).await;
    bare_handle.stop(true).await;
    provider.stop().await;
    drop(redis);
    Ok(())
}

fn run_wrk(
    threads: u32,
    connections: u32,
    duration_secs: u64,
    script: &std::path::Path,
    url: &str,
) -> anyhow::Result<Measure> {
    let output = Command::new("wrk")
        .arg(format!("-t{threads}"))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{duration_secs}s"))
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() {
        bail!("wrk failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|v| v.trim().to_string())
    };
    Ok(Measure {
        requests_per_sec: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .context("wrk printed no Requests/sec")?,
        p50: field("50%").unwrap_or_default(),
        p99: field("99%").unwrap_or_default(),
        errors: field("Non-2xx or 3xx responses:")
            .map(|n| format!("{n} non-2xx"))
            .or_else(|| field("Socket errors:"))
            .unwrap_or_else(|| "none".into()),
    })
}

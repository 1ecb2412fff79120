//! The semantic cache's costs: embedding time (short and long prompts, through the origin's
//! embedder: its thread pool of the default `max_concurrent`, as a request embeds), the time
//! a semantic lookup adds to an exact miss (embed, the index's two Redis round trips, the
//! candidate's GET, on a redis-server holding the labelled set's questions), the semantic hit
//! through the origin binary over HTTP, and that origin's RSS with the model loaded.
//! Sequential requests, one at a time: latencies, not throughput.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use gateway_e2e::repo_root;
use gateway_e2e::stack::header;
use gateway_fixtures::{MockProvider, ProviderConfig, RedisServer};
use gateway_origin::metrics::Metrics;
use gateway_origin::semantic::DEFAULT_MODEL_DIR;
use gateway_origin::semantic::embed::{DIMENSIONS, Embedding};
use gateway_origin::semantic::embedder::LocalEmbedder;
use gateway_origin::semantic::index::{Index, Place};
use gateway_origin::semantic::order::WordKey;
use gateway_origin::settings::{Secret, Settings};
use gateway_origin::store::{RedisStore, Store};
use serde_json::json;

use crate::origin::{OriginConfig, OriginProcess};

const SHORT: &str = "How do I reverse a list in Python?";
const INITECH: &str = "sk-dev-initech";

/// p50 and p99 in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
}

fn spread(mut ms: Vec<f64>) -> Spread {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    Spread {
        p50: at(0.5),
        p99: at(0.99),
    }
}

#[derive(Debug)]
pub struct SemanticBench {
    pub samples: usize,
    pub long_words: usize,
    pub embed_short: Spread,
    pub embed_long: Spread,
    pub lookup: Spread,
    pub indexed: usize,
    /// The embedder's threads.
    pub threads: usize,
    pub hit: Spread,
    pub exact_hit: Spread,
    pub hits_seen: usize,
    pub rss_mib: f64,
}

pub async fn run(samples: usize) -> anyhow::Result<SemanticBench> {
    let root = repo_root();
    let embedding = Arc::new(
        Embedding::load(&root.join(DEFAULT_MODEL_DIR)).context("the model (run `just setup`)")?,
    );
    let defaults = Settings::for_tests().semantic;
    let embedder = LocalEmbedder::new(
        embedding,
        defaults.max_concurrent,
        // Generous: this measures the embedding, it does not test the timeout.
        Duration::from_secs(10),
    )?;
    let long = "Explain, step by step and with examples, how a Rust program should handle \
        errors that come from reading a configuration file, parsing it, validating its fields \
        and connecting to a database whose address it names, and when to prefer an error enum "
        .repeat(3);
    let long_words = long.split_whitespace().count();
    let time = async |text: &str| -> anyhow::Result<Vec<f64>> {
        let mut times = Vec::with_capacity(samples);
        for _ in 0..samples {
            let started = Instant::now();
            embedder.embed(text.to_owned()).await?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
        }
        Ok(times)
    };
    let embed_short = spread(time(SHORT).await?);
    let embed_long = spread(time(&long).await?);

    // The lookup a semantic tenant's exact miss adds, on a Redis holding the set's questions.
    let redis = RedisServer::start()?;
    let mut redis_settings = Settings::for_tests().redis;
    redis_settings.url = Secret::new(redis.url());
    // Generous bounds: this measures the round trips, it does not test the fail-open path.
    redis_settings.response_timeout_ms = 10_000;
    redis_settings.pool_wait_timeout_ms = 10_000;
    redis_settings.connect_timeout_ms = 10_000;
    let store: Arc<dyn Store> = Arc::new(RedisStore::new(&redis_settings, Metrics::new()?)?);
    let index = Index::new(DIMENSIONS);
    let place = Place {
        tenant: "bench",
        scope: "s",
    };
    let pairs = std::fs::read_to_string(root.join("fixtures/semantic/pairs.jsonl"))?;
    let mut questions: Vec<String> = pairs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["a"].as_str().map(str::to_owned))
        .collect();
    questions.sort();
    questions.dedup();
    let word_key = WordKey::new(&gateway_common::KeySecret::new(b"bench"), "bench");
    for (i, q) in questions.iter().enumerate() {
        let key = format!("{i:064x}");
        index
            .insert(
                &*store,
                place,
                &key,
                &embedder.embed(q.clone()).await?,
                &word_key.words(q),
                0,
                3600,
            )
            .await?;
        store
            .set_ex(&format!("gw:v1:bench:{key}"), b"entry".to_vec(), 3600)
            .await?;
    }
    let mut lookup = Vec::with_capacity(samples);
    for i in 0..samples {
        let query = format!("{} ({i})", questions[i % questions.len()]);
        let started = Instant::now();
        let vector = embedder.embed(query.clone()).await?;
        let words = word_key.words(&query);
        if let Some(found) = index
            .nearest(&store, place, &vector, &words, 0, 0.5)
            .await?
        {
            store.get(&format!("gw:v1:bench:{}", found.member)).await?;
        }
        lookup.push(started.elapsed().as_secs_f64() * 1000.0);
    }

    // The semantic hit through the release origin: every request a new wording of one
    // question, so each is a semantic hit (an exact repeat would be an exact hit).
    let provider = MockProvider::start(ProviderConfig::default()).await?;
    let config = OriginConfig::single(redis.url(), provider.base_url(), 1);
    let origin = tokio::task::spawn_blocking(move || OriginProcess::start(&config)).await??;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", origin.url());
    let ask = |prompt: String| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let body =
                json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}]});
            let started = Instant::now();
            let resp = http
                .post(&url)
                .bearer_auth(INITECH)
                .json(&body)
                .send()
                .await?;
            let status = header(&resp, "cache-status");
            resp.bytes().await?;
            anyhow::Ok((started.elapsed().as_secs_f64() * 1000.0, status))
        }
    };
    ask(SHORT.to_owned()).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut hit = Vec::with_capacity(samples);
    let mut hits_seen = 0;
    // Distinct wordings without digits (a number would change the guard's fingerprint, so
    // the scope): prefixes x wordings x endings.
    let prefixes = [
        "",
        "quick question: ",
        "please tell me: ",
        "I wonder: ",
        "hi! ",
    ];
    let wordings = [
        "what's the way to reverse a Python list",
        "how can I reverse a list in Python",
        "how do you reverse a Python list",
        "what is the way to reverse a list in Python",
    ];
    let endings = ["?", " please?", ", thanks?", " quickly?"];
    let mut variants = Vec::new();
    for prefix in prefixes {
        for wording in wordings {
            for ending in endings {
                variants.push(format!("{prefix}{wording}{ending}"));
            }
        }
    }
    for prompt in variants.into_iter().take(samples) {
        let (ms, status) = ask(prompt).await?;
        if status.contains("detail=semantic") {
            hits_seen += 1;
            hit.push(ms);
        }
    }
    if hit.is_empty() {
        bail!("no semantic hit through the origin: is the model installed (`just setup`)?");
    }
    let mut exact_hit = Vec::with_capacity(samples);
    for _ in 0..samples {
        exact_hit.push(ask(SHORT.to_owned()).await?.0);
    }
    let rss_mib = origin.rss_kib()? as f64 / 1024.0;
    Ok(SemanticBench {
        samples,
        long_words,
        embed_short,
        embed_long,
        lookup: spread(lookup),
        indexed: questions.len(),
        threads: defaults.max_concurrent,
        hit: spread(hit),
        exact_hit: spread(exact_hit),
        hits_seen,
        rss_mib,
    })
}

impl SemanticBench {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "## Semantic cache\n");
        let _ = writeln!(
            out,
            "Sequential, one request at a time, {} samples each (`--part semantic`). Embedding: \
             all-MiniLM-L6-v2 through the origin's embedder (its pool of {} threads, the default \
             `max_concurrent`). Lookup: what a \
             semantic tenant's exact miss adds (embed, the LSH bucket union and the candidates' \
             vectors from Redis, the best candidate's GET), over an index of the labelled set's \
             {} questions. Hits: the `gateway-origin` binary built beside the bench (release under `just bench`) over HTTP (tenant initech), each request a \
             new wording (a semantic hit), then the same question repeated (an exact hit).\n",
            self.samples, self.threads, self.indexed
        );
        let _ = writeln!(out, "| measure | p50 | p99 |\n|---|---|---|");
        for (name, s) in [
            ("embed, short prompt (7 words)".to_owned(), self.embed_short),
            (
                format!("embed, long prompt ({} words)", self.long_words),
                self.embed_long,
            ),
            (
                "semantic lookup added to an exact miss".to_owned(),
                self.lookup,
            ),
            (
                format!(
                    "semantic hit via origin ({} of {} were semantic hits)",
                    self.hits_seen, self.samples
                ),
                self.hit,
            ),
            (
                "exact hit via origin, same process".to_owned(),
                self.exact_hit,
            ),
        ] {
            let _ = writeln!(out, "| {name} | {:.2} ms | {:.2} ms |", s.p50, s.p99);
        }
        let _ = writeln!(
            out,
            "\nOrigin RSS with the model loaded (after the runs above): {:.0} MiB.",
            self.rss_mib
        );
        out
    }
}

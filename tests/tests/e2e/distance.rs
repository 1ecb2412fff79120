//! Distance: 150 ms each way between edge and origin. After warm-up, repeat requests are
//! answered by the edge without crossing; asserted on headers and counters, never on time.

use std::time::{Duration, Instant};

use gateway_e2e::stack::{ACME, Stack, StackOptions, header};

const ONE_WAY: Duration = Duration::from_millis(150);
const PROMPTS: [&str; 3] = ["far away 0", "far away 1", "far away 2"];
const REPEATS: usize = 5;

/// Ask `prompt` through the edge: (x-cache-layer, how long it took).
async fn timed(stack: &Stack, prompt: &str) -> (String, Duration) {
    let started = Instant::now();
    let resp = stack.edge_chat(ACME, prompt).await;
    assert_eq!(resp.status(), 200, "{prompt:?}");
    let layer = header(&resp, "x-cache-layer");
    resp.bytes().await.expect("body");
    (layer, started.elapsed())
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_warm_up_repeat_requests_are_answered_at_the_edge_without_crossing_the_distance() {
    let stack = Stack::start_with(StackOptions {
        distance: ONE_WAY,
        ..StackOptions::default()
    })
    .await
    .expect("stack starts");

    let (mut misses, mut origin_hits) = (Vec::new(), Vec::new());
    for prompt in PROMPTS {
        let (layer, took) = timed(&stack, prompt).await;
        assert_eq!(layer, "upstream", "{prompt:?}");
        misses.push(took);
        stack.settle().await;
        let (layer, took) = timed(&stack, prompt).await;
        assert_eq!(layer, "origin", "{prompt:?}");
        origin_hits.push(took);
        stack.settle().await;
    }
    let warm = stack.origin_requests();
    assert_eq!(
        warm,
        2 * PROMPTS.len() as u64,
        "warm-up crossed twice per prompt"
    );

    let mut edge_hits = Vec::new();
    for _ in 0..REPEATS {
        for prompt in PROMPTS {
            let (layer, took) = timed(&stack, prompt).await;
            assert_eq!(layer, "edge", "{prompt:?}");
            edge_hits.push(took);
        }
    }
    assert_eq!(
        stack.origin_requests(),
        warm,
        "no repeat crossed to the origin"
    );
    assert_eq!(stack.provider.calls(), PROMPTS.len() as u64);
    println!(
        "distance {ONE_WAY:?} each way: median miss {:?}, origin hit {:?}, edge hit {:?} ({} edge hits)",
        median(misses),
        median(origin_hits),
        median(edge_hits.clone()),
        edge_hits.len()
    );
}

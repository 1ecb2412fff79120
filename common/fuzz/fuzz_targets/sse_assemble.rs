//! For arbitrary bytes split at an arbitrary point: the assembler never panics, and whatever it
//! assembles is a chat completion that replays and assembles back to itself.
#![no_main]

use gateway_common::sse::{ChatAssembler, replay_chat};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(stream.len());
    let mut assembler = ChatAssembler::new();
    if assembler.push(&stream[..split]).is_err() || assembler.push(&stream[split..]).is_err() {
        return;
    }
    let Ok(completion) = assembler.finish() else {
        return;
    };
    let completion_value: Value = serde_json::from_slice(&completion).expect("assembled is JSON");
    let Ok(replayed) = replay_chat(&completion, true) else {
        return;
    };
    let mut again = ChatAssembler::new();
    again.push(&replayed).expect("a replay is well-formed");
    let again: Value = serde_json::from_slice(&again.finish().expect("a replay is complete"))
        .expect("assembled is JSON");
    assert_eq!(
        again, completion_value,
        "replay/assemble is not a round trip"
    );
});

//! What the local populate (`populate_on_fallback`, Viceroy only) may store from a streamed
//! origin hit: the answer assembled back from the replayed events, for the APIs whose replay
//! round-trips exactly. Pure; `main.rs` decides when to populate and `kv.rs` writes.

use gateway_common::route::Route;
use gateway_common::sse::Assembler;

/// Whether a streamed origin hit on `route` may populate the KV store. The Responses and
/// Messages replays carry the whole answer (usage included), so assembling them gives the
/// stored entry back. A chat replay without `include_usage` drops the usage, so chat entries
/// are populated from plain hits only, as before.
pub fn from_stream(route: Route) -> bool {
    matches!(route, Route::Responses | Route::Messages)
}

/// The answer's JSON assembled from a complete replayed stream; `None` if it does not
/// assemble (then nothing is stored).
pub fn assemble(route: Route, sse: &[u8]) -> Option<Vec<u8>> {
    let mut assembler = Assembler::for_route(route)?;
    assembler.push(sse).ok()?;
    assembler.finish().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_message_assembles_back_and_chat_streams_never_populate() {
        let message = br#"{"id":"msg_1","type":"message","role":"assistant","model":"m","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":1,"output_tokens":1}}"#;
        let sse = gateway_common::sse::replay(Route::Messages, message, false).unwrap();
        let back: serde_json::Value =
            serde_json::from_slice(&assemble(Route::Messages, &sse).unwrap()).unwrap();
        let original: serde_json::Value = serde_json::from_slice(message).unwrap();
        assert_eq!(back, original);
        assert!(assemble(Route::Messages, &sse[..sse.len() / 2]).is_none());
        assert!(!from_stream(Route::ChatCompletions));
    }
}

//! Chat completions as Server-Sent Events: replaying a cached completion as the stream OpenAI
//! would send, and assembling a streamed completion back into one `chat.completion`.
//! Pure: bytes in, bytes out; no I/O, no clock, no buffering policy beyond one event.
//! `replay.rs` turns an entry into events, `assemble.rs` events into an entry; this file holds
//! what both share.

mod assemble;
mod replay;
#[cfg(test)]
mod tests;

pub use assemble::ChatAssembler;
pub use replay::{replay_chat, replay_chat_with};

/// The default size of replayed content pieces, in characters (not bytes, so a piece never
/// splits a UTF-8 sequence).
pub const REPLAY_CHUNK_CHARS: usize = 32;

/// Why a replay or an assembly failed. Callers treat every variant as "do not use / do not
/// cache"; none of them is a client error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// The body is not a `chat.completion` with at least one choice.
    #[error("body is not a chat completion")]
    NotChatCompletion,
    /// The stream is not well-formed SSE carrying completion chunks.
    #[error("malformed event stream: {0}")]
    Malformed(String),
    /// The stream ended before `data: [DONE]`, or a choice has no finish_reason.
    #[error("stream ended before the completion was complete")]
    Incomplete,
    /// The upstream sent an error event or an error object.
    #[error("upstream sent an error in the stream")]
    UpstreamError,
}

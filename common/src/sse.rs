//! Answers as Server-Sent Events: replaying a cached answer as the stream its API would send,
//! and assembling a streamed answer back into the one JSON answer it stands for.
//! Pure: bytes in, bytes out; no I/O, no clock, no buffering policy beyond one event.
//! Chat: `replay.rs` turns an entry into events, `assemble.rs` events into an entry. The
//! Responses API (`responses.rs`) and the Messages API (`messages.rs`) do both for theirs;
//! this file holds what they share and picks one by route.

mod assemble;
mod events;
mod messages;
mod replay;
mod responses;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod typed_tests;

pub use assemble::ChatAssembler;
pub use messages::{MessagesAssembler, replay_messages, replay_messages_with};
pub use replay::{replay_chat, replay_chat_with};
pub use responses::{ResponsesAssembler, replay_responses, replay_responses_with};

use crate::entry::Usage;
use crate::route::Route;

/// A cached answer of `route` as the event stream its API sends (`include_usage` only matters
/// for chat). Err when the route has no stream form or the body is not its answer.
pub fn replay(route: Route, body: &[u8], include_usage: bool) -> Result<Vec<u8>, SseError> {
    match route {
        Route::ChatCompletions => replay_chat(body, include_usage),
        Route::Responses => replay_responses(body),
        Route::Messages => replay_messages(body),
        Route::Completions | Route::Embeddings => {
            Err(SseError::NotReplayable("a streamable answer"))
        }
    }
}

/// The assembler of a streamed answer, for the routes that have one (`Route::replays_streams`).
#[derive(Debug)]
pub enum Assembler {
    Chat(ChatAssembler),
    Responses(ResponsesAssembler),
    Messages(MessagesAssembler),
}

impl Assembler {
    /// `None` for a route whose streams are not assembled.
    pub fn for_route(route: Route) -> Option<Assembler> {
        match route {
            Route::ChatCompletions => Some(Assembler::Chat(ChatAssembler::new())),
            Route::Responses => Some(Assembler::Responses(ResponsesAssembler::new())),
            Route::Messages => Some(Assembler::Messages(MessagesAssembler::new())),
            Route::Completions | Route::Embeddings => None,
        }
    }

    /// Feed raw bytes as they arrive; Err once the stream is known to be unusable.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        match self {
            Assembler::Chat(a) => a.push(bytes),
            Assembler::Responses(a) => a.push(bytes),
            Assembler::Messages(a) => a.push(bytes),
        }
    }

    /// The whole answer's JSON, only if the stream completed (see each assembler).
    pub fn finish(self) -> Result<Vec<u8>, SseError> {
        match self {
            Assembler::Chat(a) => a.finish(),
            Assembler::Responses(a) => a.finish(),
            Assembler::Messages(a) => a.finish(),
        }
    }

    /// The tokens the typed streams reported so far (`None` for chat, whose usage chunks the
    /// caller reads itself, and before any usage arrived).
    pub fn usage(&self) -> Option<Usage> {
        match self {
            Assembler::Chat(_) => None,
            Assembler::Responses(a) => a.usage(),
            Assembler::Messages(a) => a.usage(),
        }
    }
}

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
    /// The body is not what the route replays (names what was expected).
    #[error("body is not {0}")]
    NotReplayable(&'static str),
}

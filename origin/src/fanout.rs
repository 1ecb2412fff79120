//! One live provider stream, many readers: the leading request's client and every coalesced
//! waiter read the same events as they arrive, each from its own position, so a waiter that
//! joins late first catches up and then follows live. The forwarder (`stream::forward`) is
//! the only writer and bounds what is kept; a slow reader never slows the provider's stream.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::stream::ClientStream;

/// One complete SSE event, byte for byte as the provider sent it.
#[derive(Debug, Clone)]
pub struct Event {
    pub bytes: Bytes,
    /// A chunk that only reports usage (`"choices": []` with a `usage`): shown only to readers
    /// that asked for it (`stream_options.include_usage`).
    pub usage_only: bool,
}

#[derive(Debug, Default)]
struct State {
    events: Vec<Event>,
    /// Set once: `Some(tail)` ends every reader's stream after `tail` (empty for a clean end,
    /// an error event for a broken one).
    end: Option<Bytes>,
    /// Readers joined through [`Fanout::join`], and whether one came from an edge miss;
    /// `None` once sealed.
    joined: Option<(usize, bool)>,
}

/// See the module doc. Shared as `Arc<Fanout>`.
#[derive(Debug, Default)]
pub struct Fanout {
    state: Mutex<State>,
    changed: Notify,
}

impl Fanout {
    pub fn new() -> Arc<Fanout> {
        Arc::new(Fanout {
            state: Mutex::new(State {
                joined: Some((0, false)),
                ..State::default()
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Appends and one-time sets only: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an event for every reader.
    pub fn push(&self, event: Event) {
        self.lock().events.push(event);
        self.changed.notify_waiters();
    }

    /// Ends the stream for every reader, after `tail` (an error event, or empty).
    pub fn finish(&self, tail: Bytes) {
        let mut state = self.lock();
        if state.end.is_none() {
            state.end = Some(tail);
        }
        drop(state);
        self.changed.notify_waiters();
    }

    /// A reader from the first event on (the leading request's own client).
    pub fn read(self: &Arc<Self>, show_usage: bool) -> ClientStream {
        Box::pin(futures_util::stream::unfold(
            Reader {
                fanout: Arc::clone(self),
                next: 0,
                show_usage,
                done: false,
            },
            Reader::next_chunk,
        ))
    }

    /// A coalesced waiter's reader, counted so the leader knows how many shared its answer
    /// (and whether one was an edge miss, whose entry the edge tier should get); `None` once
    /// [`Fanout::seal`] ran (the waiter then takes the finished answer instead).
    pub fn join(self: &Arc<Self>, show_usage: bool, edge_miss: bool) -> Option<ClientStream> {
        {
            let mut state = self.lock();
            let (count, from_edge) = state.joined.as_mut()?;
            *count += 1;
            *from_edge |= edge_miss;
        }
        Some(self.read(show_usage))
    }

    /// Closes [`Fanout::join`]: how many waiters joined, and whether one was an edge miss.
    pub fn seal(&self) -> (usize, bool) {
        self.lock().joined.take().unwrap_or((0, false))
    }
}

struct Reader {
    fanout: Arc<Fanout>,
    next: usize,
    show_usage: bool,
    done: bool,
}

impl Reader {
    /// Everything available past this reader's position, as one chunk; waits when there is
    /// nothing yet; `None` after the end.
    async fn next_chunk(mut self) -> Option<(Result<Bytes, std::io::Error>, Reader)> {
        if self.done {
            return None;
        }
        let fanout = Arc::clone(&self.fanout);
        loop {
            let changed = fanout.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a push between the read and the wait
            // still wakes this reader.
            changed.as_mut().enable();
            {
                let state = fanout.lock();
                let fresh = &state.events[self.next.min(state.events.len())..];
                self.next = state.events.len();
                let mut chunk: Vec<u8> = Vec::new();
                for event in fresh.iter().filter(|e| self.show_usage || !e.usage_only) {
                    chunk.extend_from_slice(&event.bytes);
                }
                if let Some(tail) = &state.end {
                    chunk.extend_from_slice(tail);
                    self.done = true;
                }
                if !chunk.is_empty() {
                    return Some((Ok(Bytes::from(chunk)), self));
                }
                if self.done {
                    return None;
                }
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn event(text: &str, usage_only: bool) -> Event {
        Event {
            bytes: Bytes::from(text.to_string()),
            usage_only,
        }
    }

    #[tokio::test]
    async fn a_late_reader_catches_up_then_follows_live() {
        let fanout = Fanout::new();
        let mut early = fanout.read(false);
        fanout.push(event("a", false));
        assert_eq!(early.next().await.unwrap().unwrap(), "a");
        fanout.push(event("b", false));
        let mut late = fanout.join(false, true).unwrap();
        assert_eq!(
            late.next().await.unwrap().unwrap(),
            "ab",
            "caught up at once"
        );
        let live = tokio::spawn(async move { late.next().await.unwrap().unwrap() });
        tokio::task::yield_now().await;
        fanout.push(event("c", false));
        assert_eq!(live.await.unwrap(), "c");
        assert_eq!(early.next().await.unwrap().unwrap(), "bc");
        fanout.finish(Bytes::new());
        assert!(early.next().await.is_none());
        assert_eq!(fanout.seal(), (1, true));
        assert!(fanout.join(false, false).is_none(), "sealed");
    }

    #[tokio::test]
    async fn the_usage_chunk_reaches_only_readers_that_asked_and_the_tail_ends_everyone() {
        let fanout = Fanout::new();
        let plain = fanout.read(false);
        let with_usage = fanout.read(true);
        fanout.push(event("x", false));
        fanout.push(event("u", true));
        fanout.finish(Bytes::from_static(b"!"));
        let all = |s: ClientStream| async move {
            s.map(|c| c.unwrap()).collect::<Vec<_>>().await.concat()
        };
        assert_eq!(all(plain).await, b"x!");
        assert_eq!(all(with_usage).await, b"xu!");
    }
}

//! The task that carries one peer region's outbox to it: sends each forward to the peer's
//! internal purge route and acknowledges what the peer took (or refused for good); what it
//! could not deliver stays in the outbox and is taken again after `peer_retry_ms`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::sync::Notify;

use super::PeerMetrics;
use super::outbox::{Forward, Outbox};
use crate::settings::Secret;

/// The route every region's origin serves for its peers.
pub const PURGE_ROUTE: &str = "/internal/region/purge";

/// How one delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    /// The peer applied it.
    Delivered,
    /// The peer said it is malformed (a 4xx other than auth and throttling): never retried.
    Refused,
    /// Down, slow, throttling or not accepting our token (yet): tried again later.
    Retry,
}

/// What a peer's answer status means for the forward.
pub(super) fn judge(status: StatusCode) -> Delivery {
    match status.as_u16() {
        200..=299 => Delivery::Delivered,
        // A token being rotated, or a peer not yet configured: keep the purge until it is.
        401 | 403 | 408 | 429 => Delivery::Retry,
        400..=499 => Delivery::Refused,
        _ => Delivery::Retry,
    }
}

pub(super) struct Lane {
    pub(super) peer: String,
    /// `<peer url>/internal/region/purge`.
    pub(super) url: String,
    pub(super) token: Secret,
    pub(super) http: reqwest::Client,
    pub(super) outbox: Arc<Outbox>,
    pub(super) ready: Arc<Notify>,
    pub(super) retry: Duration,
    pub(super) metrics: PeerMetrics,
    /// The origin stopped: leave the rest in the outbox for the next one.
    pub(super) closed: Arc<AtomicBool>,
}

impl Lane {
    pub(super) async fn run(self) {
        if let Err(error) = self.outbox.ensure_group(&self.peer).await {
            tracing::warn!(peer = %self.peer, %error, "region: the peer outbox is not reachable yet");
        }
        let poll = self.retry.min(Duration::from_millis(200));
        let mut next_claim = Instant::now();
        while !self.closed.load(Ordering::SeqCst) {
            let mut work = Vec::new();
            if Instant::now() >= next_claim {
                next_claim = Instant::now() + self.retry / 2;
                work.extend(
                    self.outbox
                        .claim(&self.peer, self.retry, 100)
                        .await
                        .unwrap_or_default(),
                );
            }
            match self.outbox.read(&self.peer, 100).await {
                Ok(fresh) => work.extend(fresh),
                // The stream or group may be gone (a Redis restart): make them again.
                Err(_) => {
                    let _ = self.outbox.ensure_group(&self.peer).await;
                }
            }
            if let Ok(depth) = self.outbox.len(&self.peer).await {
                self.metrics
                    .outbox_depth
                    .with_label_values(&[&self.peer])
                    .set(depth as i64);
            }
            if work.is_empty() {
                tokio::select! {
                    () = self.ready.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                }
                continue;
            }
            let mut done = Vec::new();
            for forward in &work {
                let delivery = self.deliver(forward).await;
                self.metrics
                    .forwards
                    .with_label_values(&[&self.peer, outcome(delivery)])
                    .inc();
                match delivery {
                    Delivery::Delivered | Delivery::Refused => done.push(forward.id.clone()),
                    // The peer is not taking purges now: the rest wait with this one.
                    Delivery::Retry => break,
                }
            }
            let _ = self.outbox.ack(&self.peer, &done).await;
            if done.len() < work.len() {
                tokio::time::sleep(self.retry).await;
            }
        }
    }

    async fn deliver(&self, forward: &Forward) -> Delivery {
        let sent = self
            .http
            .post(&self.url)
            .bearer_auth(self.token.expose())
            .header("content-type", "application/json")
            .body(forward.body.clone())
            .send()
            .await;
        match sent {
            Ok(answer) => {
                let delivery = judge(answer.status());
                if delivery != Delivery::Delivered {
                    tracing::warn!(peer = %self.peer, status = answer.status().as_u16(), "region: a peer did not take a purge");
                }
                delivery
            }
            Err(error) => {
                tracing::warn!(peer = %self.peer, error = %error.without_url(), "region: a peer is not reachable; the purge waits in the outbox");
                Delivery::Retry
            }
        }
    }
}

fn outcome(delivery: Delivery) -> &'static str {
    match delivery {
        Delivery::Delivered => "delivered",
        Delivery::Refused => "refused",
        Delivery::Retry => "retried",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_that_is_down_throttling_or_refusing_our_token_gets_the_purge_again() {
        for status in [401, 403, 408, 429, 500, 502, 503, 504] {
            assert_eq!(
                judge(StatusCode::from_u16(status).unwrap()),
                Delivery::Retry,
                "{status}"
            );
        }
    }

    #[test]
    fn a_purge_the_peer_took_or_called_malformed_is_done() {
        assert_eq!(judge(StatusCode::OK), Delivery::Delivered);
        assert_eq!(judge(StatusCode::NO_CONTENT), Delivery::Delivered);
        assert_eq!(judge(StatusCode::BAD_REQUEST), Delivery::Refused);
        assert_eq!(judge(StatusCode::NOT_FOUND), Delivery::Refused);
    }
}

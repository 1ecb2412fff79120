//! Background work on a timer for as long as its owner lives: the task holds only a weak
//! reference, so dropping the owner everywhere else ends it. Knows nothing of the work.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Runs `work` with the owner every `interval` (a late tick is delayed, never bunched) until
/// the owner is dropped everywhere else. Must be called inside a Tokio runtime.
pub fn every<T, F, Fut>(owner: &Arc<T>, interval: Duration, work: F)
where
    T: Send + Sync + 'static,
    F: Fn(Arc<T>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let weak = Arc::downgrade(owner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(owner) = weak.upgrade() else { return };
            work(owner).await;
        }
    });
}

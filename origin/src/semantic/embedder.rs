//! Embedding off the async executor: the model runs on its own pool of `max_concurrent`
//! threads, one text per thread (a semaphore in front; a waiter past `timeout_ms` gives up),
//! so a burst of semantic lookups never starves the request handlers of their cores.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Semaphore, oneshot};

use super::embed::{EmbedError, Embedding};

#[derive(Debug, thiserror::Error)]
pub enum EmbedderError {
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("embedding took longer than its timeout")]
    Timeout,
    #[error("embedding task failed: {0}")]
    Task(String),
    #[error("the embedding pool could not start: {0}")]
    Pool(String),
}

/// The local model behind a concurrency bound. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalEmbedder {
    embedding: Arc<Embedding>,
    permits: Arc<Semaphore>,
    pool: Arc<rayon::ThreadPool>,
    timeout: Duration,
}

impl LocalEmbedder {
    /// Loads the model from `dir` (see [`Embedding::load`]).
    pub fn load(
        dir: &Path,
        max_concurrent: usize,
        timeout: Duration,
    ) -> Result<LocalEmbedder, EmbedderError> {
        LocalEmbedder::new(Arc::new(Embedding::load(dir)?), max_concurrent, timeout)
    }

    pub fn new(
        embedding: Arc<Embedding>,
        max_concurrent: usize,
        timeout: Duration,
    ) -> Result<Self, EmbedderError> {
        let threads = max_concurrent.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("embed-{i}"))
            // rayon aborts the process on a panic in a spawned job unless a handler takes it:
            // a panicking model call is one failed lookup (its sender is dropped unsent, the
            // caller sees `Task`), as it was on tokio's blocking pool.
            .panic_handler(|_| tracing::warn!("the semantic model panicked; an exact miss"))
            .build()
            .map_err(|e| EmbedderError::Pool(e.to_string()))?;
        Ok(LocalEmbedder {
            embedding,
            permits: Arc::new(Semaphore::new(threads)),
            pool: Arc::new(pool),
            timeout,
        })
    }

    /// The embedding of `text`, computed on the embedding pool. The timeout covers the wait
    /// for a permit and the computation; a computation that overruns finishes in the
    /// background (it cannot be interrupted) but still holds its permit, so the bound holds.
    pub async fn embed(&self, text: String) -> Result<Vec<f32>, EmbedderError> {
        let work = async {
            let permit = Arc::clone(&self.permits)
                .acquire_owned()
                .await
                .map_err(|e| EmbedderError::Task(e.to_string()))?;
            let embedding = Arc::clone(&self.embedding);
            let (done, result) = oneshot::channel();
            self.pool.spawn(move || {
                let _permit = permit;
                // The receiver is gone only when the caller timed out; nothing to tell it.
                let _ = done.send(embedding.embed(&text));
            });
            result
                .await
                .map_err(|e| EmbedderError::Task(e.to_string()))?
                .map_err(EmbedderError::from)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| EmbedderError::Timeout)?
    }

    /// The blocking model itself (the evaluation and the benchmark call it directly).
    pub fn embedding(&self) -> &Arc<Embedding> {
        &self.embedding
    }
}

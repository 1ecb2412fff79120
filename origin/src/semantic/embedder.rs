//! Embedding off the async executor: the model runs on tokio's blocking pool, at most
//! `max_concurrent` texts at a time (a semaphore; a waiter past `timeout_ms` gives up), so a
//! burst of semantic lookups never starves the request handlers of their cores.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::embed::{EmbedError, Embedding};

#[derive(Debug, thiserror::Error)]
pub enum EmbedderError {
    #[error(transparent)]
    Embed(#[from] EmbedError),
    #[error("embedding took longer than its timeout")]
    Timeout,
    #[error("embedding task failed: {0}")]
    Task(String),
}

/// The local model behind a concurrency bound. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalEmbedder {
    embedding: Arc<Embedding>,
    permits: Arc<Semaphore>,
    timeout: Duration,
}

impl LocalEmbedder {
    /// Loads the model from `dir` (see [`Embedding::load`]).
    pub fn load(
        dir: &Path,
        max_concurrent: usize,
        timeout: Duration,
    ) -> Result<LocalEmbedder, EmbedError> {
        Ok(LocalEmbedder::new(
            Arc::new(Embedding::load(dir)?),
            max_concurrent,
            timeout,
        ))
    }

    pub fn new(embedding: Arc<Embedding>, max_concurrent: usize, timeout: Duration) -> Self {
        LocalEmbedder {
            embedding,
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            timeout,
        }
    }

    /// The embedding of `text`, computed on the blocking pool. The timeout covers the wait
    /// for a permit and the computation; a computation that overruns finishes in the
    /// background (it cannot be interrupted) but still holds its permit, so the bound holds.
    pub async fn embed(&self, text: String) -> Result<Vec<f32>, EmbedderError> {
        let work = async {
            let permit = Arc::clone(&self.permits)
                .acquire_owned()
                .await
                .map_err(|e| EmbedderError::Task(e.to_string()))?;
            let embedding = Arc::clone(&self.embedding);
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                embedding.embed(&text)
            })
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

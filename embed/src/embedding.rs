//! all-MiniLM-L6-v2 in-process: the WordPiece tokenizer, the BERT encoder (`bert.rs`) on the
//! CPU, mean pooling and normalisation (`pool.rs`); 384 dimensions. Blocking and CPU-bound: callers go through
//! the origin's `semantic/embedder.rs`, which runs it off the async executor with bounded
//! concurrency.

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationParams};

use crate::bert::{Bert, Config};
use crate::pool::{mean_pool, normalize};

/// The model's output width.
pub const DIMENSIONS: usize = 384;

/// Word pieces kept per text: the model's `max_seq_length` (sentence-transformers truncates
/// there; the tokenizer.json in the package says 128, which would cut long prompts shorter
/// than the reference implementation does).
pub const MAX_TOKENS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("semantic model file {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("model: a word piece or type id outside the model's tables, or too many pieces")]
    Model,
    #[error("model output has {0} dimensions, expected {DIMENSIONS}")]
    Shape(usize),
}

/// The loaded model. `embed` is synchronous and takes a few milliseconds of one core for a
/// short question; concurrency comes from `embedder.rs`'s bounded pool.
pub struct Embedding {
    model: Bert,
    tokenizer: Tokenizer,
}

impl std::fmt::Debug for Embedding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedding").finish_non_exhaustive()
    }
}

impl Embedding {
    /// Loads `config.json`, `model.safetensors` and `tokenizer.json` from `dir` (what
    /// `scripts/semantic-model.sh` installs; it checks their SHA-256).
    pub fn load(dir: &Path) -> Result<Embedding, EmbedError> {
        let load = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|e| EmbedError::Load {
                path,
                reason: e.to_string(),
            })
        };
        let config: Config =
            serde_json::from_slice(&load("config.json")?).map_err(|e| EmbedError::Load {
                path: dir.join("config.json"),
                reason: e.to_string(),
            })?;
        let mut tokenizer =
            Tokenizer::from_bytes(load("tokenizer.json")?).map_err(|e| EmbedError::Load {
                path: dir.join("tokenizer.json"),
                reason: e.to_string(),
            })?;
        // One text per call: padding would only add masked tokens to compute.
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS,
                ..TruncationParams::default()
            }))
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        // Read into memory rather than mmap: the workspace forbids unsafe code, and 90 MB
        // read once at start is cheap. The encoder copies what it keeps.
        let model =
            Bert::load(&config, &load("model.safetensors")?).map_err(|e| EmbedError::Load {
                path: dir.join("model.safetensors"),
                reason: e.to_string(),
            })?;
        if model.hidden() != DIMENSIONS {
            return Err(EmbedError::Shape(model.hidden()));
        }
        Ok(Embedding { model, tokenizer })
    }

    /// The unit-length embedding of `text`.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        let mask = encoding.get_attention_mask();
        let hidden = self
            .model
            .forward(encoding.get_ids(), encoding.get_type_ids())
            .ok_or(EmbedError::Model)?;
        Ok(normalize(mean_pool(&hidden, mask, DIMENSIONS)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::dot;

    fn model_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(crate::DEFAULT_MODEL_DIR)
    }

    #[test]
    fn embeddings_match_the_independent_numpy_reference() {
        let embedding = Embedding::load(&model_dir())
            .unwrap_or_else(|e| panic!("{e} (run `just setup` to install the model)"));
        let reference: serde_json::Value =
            serde_json::from_str(include_str!("../../fixtures/semantic/reference.json")).unwrap();
        let texts = reference["texts"].as_array().unwrap();
        let mut ours = Vec::new();
        for item in texts {
            let text = item["text"].as_str().unwrap();
            let want: Vec<f32> = item["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            let got = embedding.embed(text).unwrap();
            assert_eq!(got.len(), DIMENSIONS);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "{text:?}: largest difference {worst}");
            assert!((dot(&got, &want) - 1.0).abs() < 1e-5, "{text:?}");
            ours.push(got);
        }
        // The sentence-transformers quickstart's documented similarities for this model.
        let n = ours.len();
        let (a, b, c) = (&ours[n - 3], &ours[n - 2], &ours[n - 1]);
        assert!((dot(a, b) - 0.6660).abs() < 1e-3);
        assert!((dot(a, c) - 0.1046).abs() < 1e-3);
        assert!((dot(b, c) - 0.1411).abs() < 1e-3);
    }
}

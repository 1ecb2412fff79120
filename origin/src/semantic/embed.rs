//! all-MiniLM-L6-v2 in-process: the WordPiece tokenizer, candle's BERT on the CPU, mean pooling
//! and normalisation (`pool.rs`); 384 dimensions. Blocking and CPU-bound: callers go through
//! `embedder.rs`, which runs it off the async executor with bounded concurrency.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use tokenizers::{Tokenizer, TruncationParams};

use super::pool::{mean_pool, normalize};

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
    #[error("model: {0}")]
    Model(#[from] candle_core::Error),
    #[error("model output has {0} dimensions, expected {DIMENSIONS}")]
    Shape(usize),
}

/// The loaded model. `embed` is synchronous and takes ~milliseconds of one core (its
/// matrix multiplies single-threaded, see [`Embedding::load`]).
pub struct Embedding {
    model: BertModel,
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
    ///
    /// Also makes every matrix multiply of the process single-threaded (gemm's threading
    /// threshold is process-wide; this model is the process's only user of it). candle would
    /// otherwise split each multiply of a one-question batch over every core: on two cores
    /// that already serve requests and run `max_concurrent` embeddings, the split costs more
    /// than it gains (measured: 35 ms p50 for a short prompt against 13 ms on one thread,
    /// release build, loaded machine). Concurrency comes from `embedder.rs`'s bounded pool.
    pub fn load(dir: &Path) -> Result<Embedding, EmbedError> {
        gemm::set_threading_threshold(usize::MAX);
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
        // read once at start is cheap.
        let weights = VarBuilder::from_buffered_safetensors(
            load("model.safetensors")?,
            DType::F32,
            &Device::Cpu,
        )
        .map_err(|e| EmbedError::Load {
            path: dir.join("model.safetensors"),
            reason: e.to_string(),
        })?;
        let model = BertModel::load(weights, &config).map_err(|e| EmbedError::Load {
            path: dir.join("model.safetensors"),
            reason: e.to_string(),
        })?;
        Ok(Embedding { model, tokenizer })
    }

    /// The unit-length embedding of `text`.
    pub fn embed(&self, text: &str) -> Result<Vec<f32>, EmbedError> {
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
        let ids = encoding.get_ids();
        let mask = encoding.get_attention_mask();
        let device = &self.model.device;
        let input = Tensor::new(ids, device)?.unsqueeze(0)?;
        let types = Tensor::new(encoding.get_type_ids(), device)?.unsqueeze(0)?;
        let attention = Tensor::new(mask, device)?.unsqueeze(0)?;
        let hidden = self.model.forward(&input, &types, Some(&attention))?;
        let (_, tokens, dim) = hidden.dims3()?;
        if dim != DIMENSIONS {
            return Err(EmbedError::Shape(dim));
        }
        let flat: Vec<f32> = hidden.squeeze(0)?.flatten_all()?.to_vec1()?;
        debug_assert_eq!(flat.len(), tokens * dim);
        Ok(normalize(mean_pool(&flat, mask, dim)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::semantic::pool::dot;

    fn model_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(crate::semantic::DEFAULT_MODEL_DIR)
    }

    #[test]
    fn embeddings_match_the_independent_numpy_reference() {
        let embedding = Embedding::load(&model_dir())
            .unwrap_or_else(|e| panic!("{e} (run `just setup` to install the model)"));
        let reference: serde_json::Value =
            serde_json::from_str(include_str!("../../../fixtures/semantic/reference.json"))
                .unwrap();
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

//! The semantic cache: a paraphrase of a cached question answered from the cache. The model
//! (`embed`, `embedder`, `pool`), the approximate index on plain Redis (`lsh`, `index`), and
//! what may match (`scope`, `guard`, `order`). The request flow that uses them is in
//! `service/semantic.rs`.

pub mod embed;
pub mod embedder;
pub mod guard;
pub mod index;
pub mod lsh;
pub mod order;
pub mod pool;
pub mod scope;

/// Where `just setup` installs the model, relative to the repository root.
pub const DEFAULT_MODEL_DIR: &str = ".local/models/all-minilm-l6-v2";

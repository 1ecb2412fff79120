//! all-MiniLM-L6-v2 in-process: the WordPiece tokenizer and the model files (`embedding`), the
//! BERT encoder (`bert`) and its dense layers (`linear`), mean pooling and normalisation
//! (`pool`). Pure computation on files read once at load; no async, no network. Its own crate so
//! debug builds (the tests) can optimise it alone.

pub mod bert;
pub mod embedding;
pub mod linear;
pub mod pool;

pub use embedding::{DIMENSIONS, EmbedError, Embedding, MAX_TOKENS};

/// Where `just setup` installs the model, relative to the repository root.
pub const DEFAULT_MODEL_DIR: &str = ".local/models/all-minilm-l6-v2";

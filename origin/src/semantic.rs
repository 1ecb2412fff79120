//! The semantic cache: a paraphrase of a cached question answered from the cache. The model
//! (the `gateway-embed` crate, run by `embedder`), the approximate index on plain Redis (`lsh`,
//! `index`), and what may match (`scope`, `guard`, `order`). The request flow that uses them is in
//! `service/semantic.rs`.

pub mod embedder;
pub mod guard;
pub mod index;
pub mod lsh;
pub mod order;
pub mod scope;

/// The model itself is the `gateway-embed` crate; these names are where the origin's code has
/// always found it.
pub use gateway_embed::{DEFAULT_MODEL_DIR, embedding as embed, pool};

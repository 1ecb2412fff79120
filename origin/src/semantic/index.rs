//! The semantic index on plain Redis (no modules): per tenant and scope, one key per vector
//! (expiring with the entry it points to) and LSH bucket sets of entry keys, all under one
//! hash tag `gw:sem:{<tenant>:<scope>}` so that every multi-key call stays in one cluster
//! slot. A lookup unions the query's buckets, reads the candidates' vectors and re-ranks them
//! by exact cosine, refusing a candidate whose stored words the query's invert (`order.rs`).
//! Vectors never leave Redis (nothing here reaches the edge's KV store).

use std::sync::Arc;

use crate::store::{Store, StoreError};

use super::lsh::Lsh;
use super::order::Words;
use super::pool::dot;

/// Default LSH shape: 16 tables of 8 planes (256 buckets per table). At cosine 0.9 a pair
/// shares a bucket with probability 1-(1-0.857^8)^16 ≈ 0.996; `just eval-semantic` measures
/// the recall this gives against brute force on the labelled set.
pub const TABLES: usize = 16;
pub const BITS: usize = 8;
pub const SEED: u64 = 0x5e_6a_17_1c;

/// Candidates re-ranked at most per lookup (the rest of a crowded bucket union is skipped).
pub const MAX_CANDIDATES: usize = 256;

/// The entry that answered a lookup, and how close it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Match {
    /// The entry's cache key (hex).
    pub member: String,
    pub similarity: f32,
}

/// The stored format's version (the first byte).
const FORMAT: u8 = 2;

/// A stored vector, format 2: the version byte, the purge generation of its entry, its
/// question's words (`Words::encode`), then the floats (little-endian). Format 1 (generation
/// and floats only, `8 + 4 * dim` bytes, no version byte) had no words: such a vector is
/// not decoded, so it never matches (its scopes are "sem1" ones, which are no longer asked
/// anyway), and expires with its entry.
fn encode(vector: &[f32], words: &Words, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + words.encoded_len() + 4 * vector.len());
    out.push(FORMAT);
    out.extend_from_slice(&generation.to_le_bytes());
    words.encode(&mut out);
    for x in vector {
        out.extend_from_slice(&x.to_le_bytes());
    }
    out
}

/// A stored vector of the current format: (generation, words, floats).
fn decode(bytes: &[u8], dim: usize) -> Option<(u64, Words, Vec<f32>)> {
    let (&version, rest) = bytes.split_first()?;
    if version != FORMAT || rest.len() < 8 {
        return None;
    }
    let (head, rest) = rest.split_at(8);
    let generation = u64::from_le_bytes(head.try_into().ok()?);
    let (words, floats) = Words::decode(rest)?;
    if floats.len() != 4 * dim {
        return None;
    }
    let vector = floats
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((generation, words, vector))
}

/// Where a vector lives: a tenant and a scope (`scope.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub tenant: &'a str,
    pub scope: &'a str,
}

impl Place<'_> {
    /// Every key of the place shares this hash tag (one cluster slot).
    fn prefix(&self) -> String {
        format!("gw:sem:{{{}:{}}}", self.tenant, self.scope)
    }
}

/// The index over a [`Store`]. Cheap to share.
#[derive(Debug)]
pub struct Index {
    lsh: Lsh,
    dim: usize,
}

impl Index {
    pub fn new(dim: usize) -> Index {
        Index::with_shape(dim, TABLES, BITS)
    }

    pub fn with_shape(dim: usize, tables: usize, bits: usize) -> Index {
        Index {
            lsh: Lsh::new(tables, bits, dim, SEED),
            dim,
        }
    }

    fn buckets(&self, prefix: &str, vector: &[f32]) -> Vec<String> {
        self.lsh
            .signatures(vector)
            .iter()
            .enumerate()
            .map(|(table, sig)| format!("{prefix}:b:{table}:{sig:x}"))
            .collect()
    }

    /// Records `vector` and `words` (its question's, `order.rs`) for the entry `member` (its
    /// cache key hex) written under purge `generation`, for `ttl_secs` (the entry's own TTL).
    /// One round trip.
    #[allow(
        clippy::too_many_arguments,
        reason = "one write of one record's fields"
    )]
    pub async fn insert(
        &self,
        store: &dyn Store,
        place: Place<'_>,
        member: &str,
        vector: &[f32],
        words: &Words,
        generation: u64,
        ttl_secs: u64,
    ) -> Result<(), StoreError> {
        let prefix = place.prefix();
        let buckets = self.buckets(&prefix, vector);
        let vector_key = format!("{prefix}:v:{member}");
        store
            .index_add(
                &buckets,
                member,
                &vector_key,
                encode(vector, words, generation),
                ttl_secs,
            )
            .await
    }

    /// The closest entry in the scope at or above `threshold`, written under a purge
    /// generation not older than `generation`, whose words `words` (the query's) do not
    /// invert. `Ok(None)` is a miss. Two round trips: the bucket union, then the candidates'
    /// vectors. Members whose vector expired (or is of an older format) are dropped from the
    /// buckets that named them (in the background, by the caller's runtime).
    pub async fn nearest(
        &self,
        store: &Arc<dyn Store>,
        place: Place<'_>,
        vector: &[f32],
        words: &Words,
        generation: u64,
        threshold: f32,
    ) -> Result<Option<Match>, StoreError> {
        let prefix = place.prefix();
        let buckets = self.buckets(&prefix, vector);
        let mut members = store.index_union(&buckets).await?;
        if members.is_empty() {
            return Ok(None);
        }
        members.truncate(MAX_CANDIDATES);
        let keys: Vec<String> = members.iter().map(|m| format!("{prefix}:v:{m}")).collect();
        let vectors = store.get_many(&keys).await?;
        let mut best: Option<Match> = None;
        let mut gone = Vec::new();
        for (member, stored) in members.into_iter().zip(vectors) {
            let Some((written, their_words, candidate)) =
                stored.as_deref().and_then(|b| decode(b, self.dim))
            else {
                gone.push(member);
                continue;
            };
            if written < generation {
                continue;
            }
            let similarity = dot(vector, &candidate);
            if similarity >= threshold
                && best.as_ref().is_none_or(|b| similarity > b.similarity)
                && !words.inverted(&their_words)
            {
                best = Some(Match { member, similarity });
            }
        }
        if !gone.is_empty() {
            let store = Arc::clone(store);
            tokio::spawn(async move {
                // Best effort: a leftover member only costs a wasted candidate read.
                let _ = store.index_remove(&buckets, &gone).await;
            });
        }
        Ok(best)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::semantic::order::WordKey;
    use crate::semantic::pool::normalize;
    use crate::store::MemoryStore;

    fn unit(seed: u32) -> Vec<f32> {
        normalize(
            (0..16)
                .map(|i| ((seed * 31 + i * 7) % 13) as f32 - 6.0)
                .collect(),
        )
    }

    fn store() -> Arc<dyn Store> {
        Arc::new(MemoryStore::new())
    }

    #[tokio::test]
    async fn an_identical_vector_in_the_same_scope_is_found_and_other_scopes_see_nothing() {
        let store = store();
        let index = Index::new(16);
        let none = Words::default();
        let v = unit(1);
        index
            .insert(
                &*store,
                Place {
                    tenant: "acme",
                    scope: "s1",
                },
                "k1",
                &v,
                &none,
                0,
                60,
            )
            .await
            .unwrap();
        let hit = index
            .nearest(
                &store,
                Place {
                    tenant: "acme",
                    scope: "s1",
                },
                &v,
                &none,
                0,
                0.9,
            )
            .await
            .unwrap();
        assert_eq!(hit.map(|m| m.member), Some("k1".to_string()));
        let other_scope = index
            .nearest(
                &store,
                Place {
                    tenant: "acme",
                    scope: "s2",
                },
                &v,
                &none,
                0,
                0.9,
            )
            .await;
        assert_eq!(other_scope.unwrap(), None);
        let other_tenant = index
            .nearest(
                &store,
                Place {
                    tenant: "globex",
                    scope: "s1",
                },
                &v,
                &none,
                0,
                0.9,
            )
            .await;
        assert_eq!(other_tenant.unwrap(), None);
    }

    #[tokio::test]
    async fn a_vector_from_an_older_purge_generation_or_below_threshold_is_refused() {
        let store = store();
        let index = Index::new(16);
        let none = Words::default();
        let v = unit(2);
        index
            .insert(
                &*store,
                Place {
                    tenant: "acme",
                    scope: "s",
                },
                "old",
                &v,
                &none,
                3,
                60,
            )
            .await
            .unwrap();
        let after_purge = index
            .nearest(
                &store,
                Place {
                    tenant: "acme",
                    scope: "s",
                },
                &v,
                &none,
                4,
                0.5,
            )
            .await;
        assert_eq!(after_purge.unwrap(), None);
        let w = unit(5);
        let below = index
            .nearest(
                &store,
                Place {
                    tenant: "acme",
                    scope: "s",
                },
                &w,
                &none,
                3,
                dot(&v, &w) + 0.01,
            )
            .await;
        assert_eq!(below.unwrap(), None);
    }

    #[tokio::test]
    async fn a_candidate_whose_words_the_query_inverts_is_passed_over_for_the_next() {
        let store = store();
        let index = Index::new(16);
        let key = WordKey::new(&gateway_common::KeySecret::new(b"secret"), "acme");
        let place = Place {
            tenant: "acme",
            scope: "s",
        };
        let v = unit(4);
        let swapped = key.words("convert an integer to a string");
        let same_way = key.words("turn a string into an integer");
        index
            .insert(&*store, place, "swapped", &v, &swapped, 0, 60)
            .await
            .unwrap();
        let query = key.words("convert a string to an integer");
        let refused = index.nearest(&store, place, &v, &query, 0, 0.5).await;
        assert_eq!(refused.unwrap(), None);
        // The same vector under another entry: only the words tell them apart.
        index
            .insert(&*store, place, "same_way", &v, &same_way, 0, 60)
            .await
            .unwrap();
        let found = index.nearest(&store, place, &v, &query, 0, 0.5).await;
        assert_eq!(found.unwrap().map(|m| m.member), Some("same_way".into()));
    }

    #[tokio::test]
    async fn a_vector_of_the_first_format_without_words_is_never_a_match() {
        let store = store();
        let index = Index::new(16);
        let place = Place {
            tenant: "acme",
            scope: "s",
        };
        let v = unit(7);
        index
            .insert(&*store, place, "k", &v, &Words::default(), 0, 60)
            .await
            .unwrap();
        let mut first_format = 0u64.to_le_bytes().to_vec();
        first_format.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        store
            .set_ex("gw:sem:{acme:s}:v:k", first_format, 60)
            .await
            .unwrap();
        let found = index
            .nearest(&store, place, &v, &Words::default(), 0, 0.5)
            .await;
        assert_eq!(found.unwrap(), None);
    }

    #[test]
    fn stored_vectors_round_trip_and_a_wrong_length_or_version_is_refused() {
        let v = unit(3);
        let words = WordKey::new(&gateway_common::KeySecret::new(b"k"), "t")
            .words("copy a file from src to dst");
        let bytes = encode(&v, &words, 9);
        assert_eq!(decode(&bytes, 16), Some((9, words, v.clone())));
        assert_eq!(decode(&bytes[..bytes.len() - 1], 16), None);
        let mut other_version = bytes.clone();
        other_version[0] = 3;
        assert_eq!(decode(&other_version, 16), None);
        let mut first_format = 2u64.to_le_bytes().to_vec();
        first_format.extend(v.iter().flat_map(|x| x.to_le_bytes()));
        assert_eq!(decode(&first_format, 16), None);
        assert_eq!(decode(&[0; 11], 16), None);
    }
}

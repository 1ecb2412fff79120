//! The numbers of the evaluation: pair-level counts per threshold, and the LSH index against
//! brute force over one shared scope holding every cached question of the set.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use gateway_origin::semantic::guard::fingerprint;
use gateway_origin::semantic::index::{Index, Place};
use gateway_origin::semantic::order::Words;
use gateway_origin::semantic::pool::dot;
use gateway_origin::store::Store;

use super::{Label, Pair, thresholds};

/// Pair-level outcome at one threshold.
#[derive(Debug, Clone)]
pub struct Counts {
    pub threshold: f32,
    true_hits: usize,
    paraphrases: usize,
    /// Per category of hard negative: (hits, pairs).
    negatives: BTreeMap<String, (usize, usize)>,
}

impl Counts {
    pub fn at(pairs: &[Pair], cosines: &[f32], threshold: f32) -> Counts {
        let mut counts = Counts {
            threshold,
            true_hits: 0,
            paraphrases: 0,
            negatives: BTreeMap::new(),
        };
        for (pair, &cos) in pairs.iter().zip(cosines) {
            let hit = cos >= threshold;
            match pair.label {
                Label::Same => {
                    counts.paraphrases += 1;
                    counts.true_hits += usize::from(hit);
                }
                Label::Different => {
                    let slot = counts.negatives.entry(pair.category.clone()).or_default();
                    slot.0 += usize::from(hit);
                    slot.1 += 1;
                }
            }
        }
        counts
    }

    pub fn false_hits(&self) -> usize {
        self.negatives.values().map(|(h, _)| h).sum()
    }

    pub fn negatives(&self) -> usize {
        self.negatives.values().map(|(_, n)| n).sum()
    }

    pub fn false_hit_rate(&self) -> f64 {
        ratio(self.false_hits(), self.negatives())
    }

    pub fn category_rate(&self, category: &str) -> f64 {
        self.negatives
            .get(category)
            .map_or(0.0, |(h, n)| ratio(*h, *n))
    }

    /// Of the hits, the share that are paraphrases (1 when there are no hits).
    pub fn precision(&self) -> f64 {
        let hits = self.true_hits + self.false_hits();
        if hits == 0 {
            1.0
        } else {
            ratio(self.true_hits, hits)
        }
    }

    pub fn recall(&self) -> f64 {
        ratio(self.true_hits, self.paraphrases)
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 { 0.0 } else { a as f64 / b as f64 }
}

/// The index against brute force at one threshold, every `b` of the set asked of an index
/// holding every distinct `a`.
#[derive(Debug, Clone)]
pub struct IndexRun {
    pub threshold: f32,
    /// Queries for which brute force finds an entry at or above the threshold.
    pub brute_answers: usize,
    /// Of those, the index returned the same entry.
    pub index_agrees: usize,
    /// Queries the index answered with an entry that is not labelled `same` for them.
    pub wrong_answers: usize,
    /// Those wrong answers: (query, the cached question that answered it, similarity).
    pub wrong: Vec<(String, String, f32)>,
    pub queries: usize,
    pub lookup_ms_p50: f64,
}

/// The scope a text's guard fingerprint puts it in (hex, as the origin's scope is).
fn scope_of(text: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    fingerprint(text).hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Inserts every distinct `a` into one tenant on `store` (in its guard scope), then asks for
/// every `b`.
pub async fn index_runs(
    store: &Arc<dyn Store>,
    pairs: &[Pair],
    vectors: &BTreeMap<&str, Vec<f32>>,
    words: &BTreeMap<&str, Words>,
    dim: usize,
) -> anyhow::Result<Vec<IndexRun>> {
    let index = Index::new(dim);
    let mut ids: HashMap<&str, String> = HashMap::new();
    for pair in pairs {
        let next = format!("{:04}", ids.len());
        ids.entry(pair.a.as_str()).or_insert(next);
    }
    for (text, id) in &ids {
        let scope = scope_of(text);
        let place = Place {
            tenant: "eval",
            scope: &scope,
        };
        index
            .insert(&**store, place, id, &vectors[text], &words[text], 0, 3600)
            .await?;
    }
    let same: std::collections::HashSet<(&str, &str)> = pairs
        .iter()
        .filter(|p| p.label == Label::Same)
        .map(|p| (ids[p.a.as_str()].as_str(), p.b.as_str()))
        .collect();
    let text_of: HashMap<&str, &str> = ids.iter().map(|(t, id)| (id.as_str(), *t)).collect();
    let mut queries: Vec<&str> = pairs.iter().map(|p| p.b.as_str()).collect();
    queries.sort_unstable();
    queries.dedup();
    let mut runs = Vec::new();
    for threshold in thresholds() {
        let mut run = IndexRun {
            threshold,
            brute_answers: 0,
            index_agrees: 0,
            wrong_answers: 0,
            wrong: Vec::new(),
            queries: queries.len(),
            lookup_ms_p50: 0.0,
        };
        let mut times = Vec::with_capacity(queries.len());
        for query in &queries {
            let q = &vectors[query];
            let scope = scope_of(query);
            let place = Place {
                tenant: "eval",
                scope: &scope,
            };
            let brute = ids
                .iter()
                .filter(|(text, _)| scope_of(text) == scope)
                .filter(|(text, _)| !words[query].inverted(&words[*text]))
                .map(|(id_text, id)| (id.as_str(), dot(q, &vectors[id_text])))
                .filter(|(_, s)| *s >= threshold)
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(id, _)| id);
            let started = Instant::now();
            let found = index
                .nearest(store, place, q, &words[query], 0, threshold)
                .await?;
            times.push(started.elapsed().as_secs_f64() * 1000.0);
            if let Some(brute) = brute {
                run.brute_answers += 1;
                run.index_agrees += usize::from(found.as_ref().is_some_and(|m| m.member == brute));
            }
            // The very same text cached is the right answer (in the origin, an exact hit).
            if let Some(m) = found {
                let right = same.contains(&(m.member.as_str(), *query))
                    || text_of.get(m.member.as_str()) == Some(query);
                if !right {
                    run.wrong_answers += 1;
                    let answer = text_of.get(m.member.as_str()).copied().unwrap_or_default();
                    run.wrong
                        .push(((*query).to_owned(), answer.to_owned(), m.similarity));
                }
            }
        }
        times.sort_by(f64::total_cmp);
        run.lookup_ms_p50 = times.get(times.len() / 2).copied().unwrap_or(0.0);
        runs.push(run);
    }
    Ok(runs)
}

/// The index section of the report.
pub fn describe_index_runs(runs: &[IndexRun]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Every distinct first question of the set is cached for one tenant, as if asked with the \
         same system prompt (so in the scope of its guard fingerprint); every second question is then asked of the \
         index (LSH, {} tables of {} bits, candidates re-ranked by exact cosine, word order \
         checked) and of brute force over all cached vectors of its scope (word order checked \
         too). Index recall: of the queries brute force answers, the share the index answers \
         with the same entry. Wrong answers: queries the index answered with an entry neither \
         labelled a paraphrase of them nor the very same text (a false hit in a shared cache, \
         which pair-level counts do not see). Lookup time: the index's two Redis round trips and \
         re-ranking, median.\n",
        gateway_origin::semantic::index::TABLES,
        gateway_origin::semantic::index::BITS,
    );
    let _ = writeln!(
        out,
        "| threshold | brute-force answers | index recall | wrong answers (of {} queries) | lookup p50 |",
        runs.first().map_or(0, |r| r.queries)
    );
    let _ = writeln!(out, "|---|---|---|---|---|");
    for r in runs {
        let recall = ratio(r.index_agrees, r.brute_answers);
        let _ = writeln!(
            out,
            "| {:.2} | {} | {:.1}% ({}/{}) | {} | {:.2} ms |",
            r.threshold,
            r.brute_answers,
            recall * 100.0,
            r.index_agrees,
            r.brute_answers,
            r.wrong_answers,
            r.lookup_ms_p50
        );
    }
    out
}

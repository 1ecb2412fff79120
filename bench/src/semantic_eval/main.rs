//! `semantic-eval` (`just eval-semantic`): the real model and the real index, on a Redis this
//! tool starts, over the labelled pairs in fixtures/semantic/pairs.jsonl. Writes the report
//! (precision, recall and false-hit rate per category and threshold, index recall against
//! brute force) and a precision–recall chart (SVG). Decides nothing at run time: the origin's
//! default threshold is the constant the report recommends, written in by hand.

mod chart;
mod measure;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use gateway_e2e::repo_root;
use gateway_fixtures::redis::RedisServer;
use gateway_origin::metrics::Metrics;
use gateway_origin::semantic::embed::{DIMENSIONS, Embedding};
use gateway_origin::semantic::guard::fingerprint;
use gateway_origin::semantic::order::{WordKey, Words};
use gateway_origin::settings::{Secret, Settings};
use gateway_origin::store::{RedisStore, Store};
use serde::Deserialize;

use measure::{Counts, IndexRun};

#[derive(Debug, Parser)]
#[command(about = "Evaluates the semantic cache on the labelled pairs")]
struct Args {
    #[arg(long, default_value = "fixtures/semantic/pairs.jsonl")]
    pairs: PathBuf,
    #[arg(long, default_value = ".local/models/all-minilm-l6-v2")]
    model: PathBuf,
    #[arg(long, default_value = "docs/semantic-eval.md")]
    report: PathBuf,
    #[arg(long, default_value = "docs/semantic-eval.svg")]
    chart: PathBuf,
    /// The highest false-hit rate (all hard negatives together) the default may have.
    #[arg(long, default_value_t = 0.01)]
    max_false_hits: f64,
}

/// One labelled pair.
#[derive(Debug, Clone, Deserialize)]
pub struct Pair {
    pub a: String,
    pub b: String,
    pub label: Label,
    pub category: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    Same,
    Different,
}

/// Thresholds 0.80, 0.81, …, 0.98.
pub fn thresholds() -> Vec<f32> {
    (80..=98).map(|t| t as f32 / 100.0).collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let root = repo_root();
    let pairs: Vec<Pair> = std::fs::read_to_string(root.join(&args.pairs))
        .with_context(|| format!("reading {}", args.pairs.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("a line of the pairs file")?;
    let embedding =
        Embedding::load(&root.join(&args.model)).context("loading the model (run `just setup`)")?;

    let mut texts: BTreeMap<&str, Vec<f32>> = BTreeMap::new();
    for pair in &pairs {
        texts.insert(&pair.a, Vec::new());
        texts.insert(&pair.b, Vec::new());
    }
    let started = Instant::now();
    for (text, vector) in texts.iter_mut() {
        *vector = embedding.embed(text)?;
    }
    let embed_ms = started.elapsed().as_secs_f64() * 1000.0 / texts.len() as f64;
    println!(
        "semantic-eval: {} pairs, {} texts embedded ({embed_ms:.1} ms each)",
        pairs.len(),
        texts.len()
    );

    let cosines: Vec<f32> = pairs
        .iter()
        .map(|p| gateway_origin::semantic::pool::dot(&texts[p.a.as_str()], &texts[p.b.as_str()]))
        .collect();
    // The origin keys the words with the cache key secret and the tenant; any key compares alike.
    let key = WordKey::new(&gateway_common::KeySecret::new(b"semantic-eval"), "eval");
    let words: BTreeMap<&str, Words> = texts.keys().map(|t| (*t, key.words(t))).collect();
    let refusals: Vec<Option<&'static str>> =
        pairs.iter().map(|p| refusal(&p.a, &p.b, &words)).collect();
    // What the origin does: a pair the guard or the word order refuses is never a hit.
    let score = |refused: &dyn Fn(Option<&str>) -> bool| -> Vec<f32> {
        cosines
            .iter()
            .zip(&refusals)
            .map(|(&c, &r)| if refused(r) { -1.0 } else { c })
            .collect()
    };
    let guarded = score(&|r| r.is_some());
    let fingerprint_only = score(&|r| r.is_some_and(|r| r != "order"));
    let at_each = |scores: &[f32]| -> Vec<Counts> {
        thresholds()
            .iter()
            .map(|&t| Counts::at(&pairs, scores, t))
            .collect()
    };
    let counts = at_each(&guarded);
    let without_order = at_each(&fingerprint_only);
    let unguarded = at_each(&cosines);

    let redis = RedisServer::start().context("starting redis-server")?;
    let mut settings = Settings::for_tests().redis;
    settings.url = Secret::new(redis.url());
    settings.response_timeout_ms = 10_000;
    settings.pool_wait_timeout_ms = 10_000;
    settings.connect_timeout_ms = 10_000;
    let store: Arc<dyn Store> = Arc::new(RedisStore::new(&settings, Metrics::new()?)?);
    let index_runs = measure::index_runs(&store, &pairs, &texts, &words, DIMENSIONS).await?;

    // The lowest threshold within the target; failing that (the report says so), the lowest
    // at the smallest false-hit rate reachable while at least half the paraphrases still hit.
    let within = counts
        .iter()
        .find(|c| c.false_hit_rate() <= args.max_false_hits);
    let fallback = || {
        let useful: Vec<&Counts> = counts.iter().filter(|c| c.recall() >= 0.5).collect();
        let least = useful
            .iter()
            .map(|c| c.false_hits())
            .min()
            .unwrap_or(usize::MAX);
        useful.into_iter().find(|c| c.false_hits() == least)
    };
    let met = within.is_some();
    let chosen = within.or_else(fallback).map(|c| c.threshold);
    let listing = listing(&pairs, &cosines, &refusals, &index_runs, chosen);
    print!("{listing}");
    let report = render(
        &pairs,
        [&counts, &without_order, &unguarded],
        &index_runs,
        (chosen, met),
        &args,
        embed_ms,
        &listing,
    );
    std::fs::write(root.join(&args.report), report)?;
    std::fs::write(root.join(&args.chart), chart::svg(&counts, chosen))?;
    println!(
        "semantic-eval: wrote {} and {}; recommended threshold {}",
        args.report.display(),
        args.chart.display(),
        chosen.map_or("none".into(), |t| format!("{t:.2}"))
    );
    Ok(())
}

/// What refuses the pair `a`, `b` whatever its cosine: the first part of the guard's
/// fingerprint that differs (`numbers`, `negation`, `reversal`, `names`), else `order` when
/// their words invert, else nothing (the cosine decides).
fn refusal(a: &str, b: &str, words: &BTreeMap<&str, Words>) -> Option<&'static str> {
    const PARTS: [&str; 4] = ["numbers", "negation", "reversal", "names"];
    let (fa, fb) = (fingerprint(a), fingerprint(b));
    if let Some((part, _)) = PARTS
        .iter()
        .zip(fa.split('|').zip(fb.split('|')))
        .find(|(_, (x, y))| x != y)
    {
        return Some(part);
    }
    words[a].inverted(&words[b]).then_some("order")
}

/// The pairs behind the numbers: every hard negative that is a hit at some threshold of the
/// table (a hit at every threshold up to its cosine), every paraphrase the guard or the word
/// order refuses although its cosine reaches the table, and the index's wrong answers at the
/// chosen threshold.
fn listing(
    pairs: &[Pair],
    cosines: &[f32],
    refusals: &[Option<&str>],
    index_runs: &[IndexRun],
    chosen: Option<f32>,
) -> String {
    let lowest = thresholds().first().copied().unwrap_or(0.8);
    let mut rows: Vec<(f32, &Pair, Option<&str>)> = pairs
        .iter()
        .zip(cosines)
        .zip(refusals)
        .filter(|&((_, &c), _)| c >= lowest)
        .map(|((p, &c), &r)| (c, p, r))
        .collect();
    rows.sort_by(|x, y| y.0.total_cmp(&x.0));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## False hits, pair by pair\n\nEvery hard negative that passes the guard and the word \
         order check with a cosine of at least {lowest:.2}: a hit at every threshold up to its \
         cosine.\n"
    );
    let _ = writeln!(
        out,
        "| cosine | category | first | second |\n|---|---|---|---|"
    );
    let mut none = true;
    for (c, p, r) in &rows {
        if p.label == Label::Different && r.is_none() {
            none = false;
            let _ = writeln!(out, "| {c:.3} | {} | {} | {} |", p.category, p.a, p.b);
        }
    }
    if none {
        let _ = writeln!(out, "| – | none | | |");
    }
    let mut caught: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, p, r) in &rows {
        if let (Label::Different, Some(r)) = (p.label, r) {
            *caught.entry(r).or_default() += 1;
        }
    }
    let _ = writeln!(
        out,
        "\nHard negatives with a cosine of at least {lowest:.2} that are refused, by the part \
         that refuses them first (fingerprint parts in the order numbers, negation, reversal, \
         names; then word order): {}.",
        if caught.is_empty() {
            "none".to_owned()
        } else {
            caught
                .iter()
                .map(|(part, n)| format!("{part} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );
    let _ = writeln!(
        out,
        "\n## Paraphrases refused, pair by pair\n\nEvery paraphrase with a cosine of at least \
         {lowest:.2} that the guard or the word order check refuses (the recall they cost), with \
         the part that refuses it.\n"
    );
    let _ = writeln!(
        out,
        "| cosine | refused by | first | second |\n|---|---|---|---|"
    );
    let mut none = true;
    for (c, p, r) in &rows {
        if let (Label::Same, Some(r)) = (p.label, r) {
            none = false;
            let _ = writeln!(out, "| {c:.3} | {r} | {} | {} |", p.a, p.b);
        }
    }
    if none {
        let _ = writeln!(out, "| – | none | | |");
    }
    if let Some(run) = chosen.and_then(|t| index_runs.iter().find(|r| r.threshold == t)) {
        let _ = writeln!(
            out,
            "\n## Wrong answers of the index at {:.2}, one by one\n",
            run.threshold
        );
        let _ = writeln!(
            out,
            "| similarity | query | answered by the entry of |\n|---|---|---|"
        );
        for (query, answer, similarity) in &run.wrong {
            let _ = writeln!(out, "| {similarity:.3} | {query} | {answer} |");
        }
        if run.wrong.is_empty() {
            let _ = writeln!(out, "| – | none | |");
        }
    }
    out
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn render(
    pairs: &[Pair],
    [counts, without_order, unguarded]: [&[Counts]; 3],
    index_runs: &[IndexRun],
    (chosen, met): (Option<f32>, bool),
    args: &Args,
    embed_ms: f64,
    listing: &str,
) -> String {
    let mut out = String::new();
    let same = pairs.iter().filter(|p| p.label == Label::Same).count();
    let mut categories: BTreeMap<&str, usize> = BTreeMap::new();
    for p in pairs.iter().filter(|p| p.label == Label::Different) {
        *categories.entry(p.category.as_str()).or_default() += 1;
    }
    let _ = writeln!(out, "# Semantic cache: evaluation\n");
    let _ = writeln!(
        out,
        "Written by `just eval-semantic` (bench/src/semantic_eval/) from `{}`: {} pairs, {same} \
         paraphrases (label `same`) and {} hard negatives ({}). Model all-MiniLM-L6-v2 run by the \
         origin's own embedder (gateway-embed, {embed_ms:.1} ms per text here), index: the origin's LSH \
         index on a redis-server the tool starts. A pair is a hit at threshold t when the cosine of \
         its two texts is at least t **and** their lexical guard fingerprints (numbers, negation \
         parity, reversal parity, named terms: origin/src/semantic/guard.rs) are equal, as in \
         the origin, where the fingerprint is part of the scope, **and** neither inverts the \
         other's word order across a direction word (origin/src/semantic/order.rs), as the \
         origin's index checks each candidate.\n",
        args.pairs.display(),
        pairs.len(),
        pairs.len() - same,
        categories
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    match chosen.and_then(|t| counts.iter().find(|c| c.threshold == t)) {
        Some(c) => {
            let why = if met {
                format!(
                    "the lowest with at most {} false hits over all hard negatives",
                    pct(args.max_false_hits)
                )
            } else {
                format!(
                    "**the target of at most {} false hits is not met at any threshold up to \
                     0.98**; this is the lowest threshold at the fewest false hits reachable \
                     while at least half the paraphrases still hit",
                    pct(args.max_false_hits)
                )
            };
            let _ = writeln!(
                out,
                "**Default threshold: {:.2}**, {why}: false-hit rate {} ({} of {}), precision {}, \
                 recall {} of the paraphrases.\n",
                c.threshold,
                pct(c.false_hit_rate()),
                c.false_hits(),
                c.negatives(),
                pct(c.precision()),
                pct(c.recall()),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "**No threshold up to 0.98 keeps false hits at or under {}.**\n",
                pct(args.max_false_hits)
            );
        }
    }
    let _ = writeln!(out, "![precision and recall]({})\n", chart_name(args));
    let names: Vec<&str> = categories.keys().copied().collect();
    for (title, table) in [
        (
            "## Per threshold, as the origin decides (cosine, guard and word order)",
            counts,
        ),
        (
            "## Per threshold, without the word order check (cosine and guard), for comparison",
            without_order,
        ),
        (
            "## Per threshold, cosine alone (no guard), for comparison",
            unguarded,
        ),
    ] {
        let _ = writeln!(
            out,
            "{title}\n\nFalse-hit rate per hard-negative category: the share of that \
             category's pairs scored as a hit.\n"
        );
        table_rows(&mut out, &names, table);
    }
    let _ = writeln!(out, "\n## The index against brute force\n");
    let _ = writeln!(out, "{}", measure::describe_index_runs(index_runs));
    let _ = writeln!(out, "{listing}");
    notes(&mut out);
    out
}

fn table_rows(out: &mut String, names: &[&str], counts: &[Counts]) {
    let _ = writeln!(
        out,
        "| threshold | precision | recall | false hits (all) | {} |",
        names.join(" | ")
    );
    let _ = writeln!(out, "|---|---|---|---|{}", "---|".repeat(names.len()));
    for c in counts {
        let per: Vec<String> = names.iter().map(|n| pct(c.category_rate(n))).collect();
        let _ = writeln!(
            out,
            "| {:.2} | {} | {} | {} ({}) | {} |",
            c.threshold,
            pct(c.precision()),
            pct(c.recall()),
            pct(c.false_hit_rate()),
            c.false_hits(),
            per.join(" | ")
        );
    }
    let _ = writeln!(out);
}

fn notes(out: &mut String) {
    let _ = writeln!(out, "\n## Honest notes\n");
    let _ = writeln!(
        out,
        "- The set is small (written by hand for this repository) and English-centred; a false-hit \
         rate of 0 out of ~30 in a category means under ~10% with 95% confidence, not zero.\n\
         - Hard negatives of the kinds a sentence embedding is weakest at (negation, changed \
         numbers and units, swapped entities) score close to paraphrases; the per-category \
         columns show how close. At the default, the remaining misses of the paraphrase set are \
         the price of those categories.\n\
         - A different language is a hard negative here on purpose: the answer would be in the \
         wrong language. all-MiniLM-L6-v2 is an English model, so such pairs score low anyway.\n\
         - Only the last user message is compared; everything else must match exactly (the \
         scope), so these pairs measure the one part that can differ.\n\
         - The guard and the word order check are lexical. They cannot see an opposite \
         outside their lists (include / leave off), another question on the same topic in \
         other words (when was it built / who designed it) or a changed quantity without a \
         number (leap year / normal year): those are the false hits listed above. They cost \
         recall: a paraphrase that capitalises or names a thing differently (Go / Golang, \
         JavaScript / JS), that uses a reversal word the other does not (stop / keep from, \
         parse / deserialize) or that reorders two words across a direction word is a miss; \
         the refused paraphrases are listed above with the part that refused them.\n\
         - The word lists of the guard and of the order check are general English lists, but \
         they were written by the same hand as the set, and the reversal parity and the order \
         check were added after reading this set's false hits: expect more false hits on real \
         traffic than here.\n\
         - Some of the index's wrong answers are right in meaning: a question answered by the \
         entry of a paraphrase of it that the set does not label as one (the other-language \
         pairs reuse English questions that paraphrase other pairs' questions)."
    );
}

fn chart_name(args: &Args) -> String {
    args.chart
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

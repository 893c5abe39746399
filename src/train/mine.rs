//! Hard-negative mining, as sentence-transformers' `mine_hard_negatives`
//! (sentence_transformers/util/hard_negatives.py) with a bi-encoder and no FAISS.
//!
//! The corpus is the extra corpus texts followed by the positives, each text once. An anchor
//! given on several rows is one query whose positives are those rows' positives. Each query's
//! candidates are the `range_max + max_positives` corpus texts most similar to it (cosine); its
//! positives, and candidates the margins or `max_score` rule out, are dropped; of those left, in
//! order of similarity, ranks `range_min..range_max` form the window, from which `num_negatives`
//! are taken: the first ones (`top`) or a seeded random choice (`random`, kept in score order).
//! `max_positives` is the most rows any anchor has, as Python counts it.
//!
//! Memory stays bounded: the queries are embedded once, the corpus `CORPUS_CHUNK` texts at a
//! time, and each query keeps only its best candidates, so a corpus of a million texts costs
//! one chunk of embeddings and one (queries x chunk) score block at a time.
//!
//! Ties: equal scores are ranked by corpus position (extra corpus first, then positives in row
//! order); torch.topk leaves their order unspecified.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::SeedableRng;

use crate::data::{Dataset, RowShape};
use crate::error::{Error, Result};
use crate::model::SentenceModel;

/// Corpus texts embedded and scored at a time.
pub const CORPUS_CHUNK: usize = 8192;
/// Queries scored against a corpus chunk at a time: at most QUERY_CHUNK x CORPUS_CHUNK f32.
const QUERY_CHUNK: usize = 1024;

/// How negatives are picked from the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sampling {
    /// The most similar candidates.
    Top,
    /// A random choice among the window's candidates (seeded).
    Random,
}

/// The options of `mine_hard_negatives`, with its defaults.
#[derive(Debug, Clone)]
pub struct MineOptions {
    pub num_negatives: usize,
    pub range_min: usize,
    /// `None`: `range_min + num_negatives + max_positives`, or `10 * num_negatives` instead of
    /// `num_negatives` when a margin or `max_score` may drop candidates (as Python).
    pub range_max: Option<usize>,
    pub max_score: Option<f32>,
    pub absolute_margin: Option<f32>,
    pub relative_margin: Option<f32>,
    pub sampling: Sampling,
    pub seed: u64,
    /// Prompt texts put before the anchors and the corpus texts.
    pub query_prompt: Option<String>,
    pub corpus_prompt: Option<String>,
}

impl Default for MineOptions {
    fn default() -> Self {
        Self {
            num_negatives: 3,
            range_min: 0,
            range_max: None,
            max_score: None,
            absolute_margin: None,
            relative_margin: None,
            sampling: Sampling::Top,
            seed: 12,
            query_prompt: None,
            corpus_prompt: None,
        }
    }
}

/// One anchor's result: its distinct positives and its negatives, most similar first (fewer
/// than asked when the filters left too few candidates).
#[derive(Debug, Clone, PartialEq)]
pub struct Mined {
    pub anchor: String,
    pub positives: Vec<String>,
    pub negatives: Vec<Negative>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Negative {
    pub text: String,
    pub score: f32,
}

/// The queries, the corpus and which corpus texts are each query's positives.
struct Task {
    queries: Vec<String>,
    corpus: Vec<String>,
    positives: Vec<Vec<usize>>,
    max_positives: usize,
}

impl Task {
    fn new(pairs: &Dataset, extra_corpus: &[String]) -> Result<Self> {
        if pairs.shape != RowShape::Pair {
            return Err(Error::data(
                &pairs.path,
                1,
                "mine takes (anchor, positive) rows: a header anchor,positive",
            ));
        }
        let mut corpus = Vec::new();
        let mut corpus_ids: HashMap<&str, usize> = HashMap::new();
        let texts = extra_corpus
            .iter()
            .chain(pairs.rows.iter().map(|r| &r.texts[1]));
        for t in texts {
            corpus_ids.entry(t.as_str()).or_insert_with(|| {
                corpus.push(t.clone());
                corpus.len() - 1
            });
        }
        let mut queries = Vec::new();
        let mut positives: Vec<Vec<usize>> = Vec::new();
        let mut rows_of: Vec<usize> = Vec::new();
        let mut query_ids: HashMap<&str, usize> = HashMap::new();
        for r in &pairs.rows {
            let q = *query_ids.entry(r.texts[0].as_str()).or_insert_with(|| {
                queries.push(r.texts[0].clone());
                positives.push(Vec::new());
                rows_of.push(0);
                queries.len() - 1
            });
            rows_of[q] += 1;
            let doc = corpus_ids[r.texts[1].as_str()];
            if !positives[q].contains(&doc) {
                positives[q].push(doc);
            }
        }
        // Python counts rows per anchor (pandas groupby), not distinct positives.
        let max_positives = rows_of.into_iter().max().unwrap_or(0);
        Ok(Self {
            queries,
            corpus,
            positives,
            max_positives,
        })
    }
}

/// A candidate: its similarity to the query and its corpus index.
#[derive(Debug, Clone, Copy)]
struct Hit {
    score: f32,
    doc: usize,
}

/// Higher score first, equal scores by corpus index.
fn rank(a: &Hit, b: &Hit) -> std::cmp::Ordering {
    b.score.total_cmp(&a.score).then(a.doc.cmp(&b.doc))
}

/// Keeps the `k` best hits (unordered).
fn keep_best(hits: &mut Vec<Hit>, k: usize) {
    if hits.len() > k {
        hits.select_nth_unstable_by(k - 1, rank);
        hits.truncate(k);
    }
}

/// The rank window's upper end: `range_max`, or Python's default for it.
fn window_end(o: &MineOptions, max_positives: usize) -> usize {
    let filtered =
        o.max_score.is_some() || o.absolute_margin.is_some() || o.relative_margin.is_some();
    let per_negative = if filtered { 10 } else { 1 };
    o.range_max
        .unwrap_or(o.range_min + o.num_negatives * per_negative + max_positives)
}

/// Python's checks of the options, plus one it does not make: a corpus too small to give
/// `range_min + num_negatives` candidates besides an anchor's positives.
fn check(o: &MineOptions, range_max: usize, task: &Task) -> Result<()> {
    if o.num_negatives < 1 {
        return Err(Error::Usage("--num-negatives must be at least 1".into()));
    }
    if o.range_min >= range_max {
        return Err(Error::Usage(format!(
            "--range-min ({}) must be smaller than --range-max ({range_max})",
            o.range_min
        )));
    }
    if o.num_negatives > range_max - o.range_min {
        return Err(Error::Usage(format!(
            "cannot mine {} negatives per anchor: only {} candidates remain after skipping the \
             first --range-min {} of --range-max {range_max}; lower --num-negatives or \
             --range-min, or raise --range-max",
            o.num_negatives,
            range_max - o.range_min,
            o.range_min
        )));
    }
    let available = task.corpus.len().saturating_sub(task.max_positives);
    if o.range_min + o.num_negatives > available {
        return Err(Error::Usage(format!(
            "cannot mine {} negatives after skipping --range-min {}: the corpus has {} distinct \
             texts and an anchor with {} positives leaves {available}; add a --corpus or ask \
             for fewer",
            o.num_negatives,
            o.range_min,
            task.corpus.len(),
            task.max_positives
        )));
    }
    Ok(())
}

/// Mines negatives for every distinct anchor of `pairs` (in first-appearance order), with
/// `extra_corpus` as further candidates. `progress` is told how many corpus texts are done.
pub fn mine(
    model: &SentenceModel,
    device: &Device,
    pairs: &Dataset,
    extra_corpus: &[String],
    o: &MineOptions,
    batch_size: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<Mined>> {
    mine_in_chunks(
        model,
        device,
        pairs,
        extra_corpus,
        o,
        batch_size,
        CORPUS_CHUNK,
        progress,
    )
}

/// [`mine`] with the corpus chunk size given (tests check that it changes nothing).
#[allow(clippy::too_many_arguments)]
pub fn mine_in_chunks(
    model: &SentenceModel,
    device: &Device,
    pairs: &Dataset,
    extra_corpus: &[String],
    o: &MineOptions,
    batch_size: usize,
    corpus_chunk: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<Mined>> {
    let corpus_chunk = corpus_chunk.max(1);
    let task = Task::new(pairs, extra_corpus)?;
    let range_max = window_end(o, task.max_positives);
    check(o, range_max, &task)?;
    let k = (range_max + task.max_positives).min(task.corpus.len());

    let query_refs: Vec<&str> = task.queries.iter().map(String::as_str).collect();
    let queries = normalized(
        &model.encode_prompted(&query_refs, o.query_prompt.as_deref(), batch_size)?,
        device,
    )?;
    let mut pos_scores: Vec<Vec<f32>> = vec![Vec::new(); task.queries.len()];
    let mut hits: Vec<Vec<Hit>> = vec![Vec::new(); task.queries.len()];
    progress(0, task.corpus.len());
    for (c, texts) in task.corpus.chunks(corpus_chunk).enumerate() {
        let first = c * corpus_chunk;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let emb = model.encode_prompted(&refs, o.corpus_prompt.as_deref(), batch_size)?;
        let docs = normalized(&emb, device)?.t()?;
        for q0 in (0..task.queries.len()).step_by(QUERY_CHUNK) {
            let n = QUERY_CHUNK.min(task.queries.len() - q0);
            let block = queries.narrow(0, q0, n)?.matmul(&docs)?.to_vec2::<f32>()?;
            for (i, row) in block.into_iter().enumerate() {
                let q = q0 + i;
                let best = &mut hits[q];
                best.extend(row.iter().enumerate().map(|(j, &score)| Hit {
                    score,
                    doc: first + j,
                }));
                keep_best(best, k);
                // The query's positive scores, for the margins, as their chunk passes.
                for &d in &task.positives[q] {
                    if (first..first + row.len()).contains(&d) {
                        pos_scores[q].push(row[d - first]);
                    }
                }
            }
        }
        progress(first + texts.len(), task.corpus.len());
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let mut out = Vec::with_capacity(task.queries.len());
    for (q, mut pool) in hits.into_iter().enumerate() {
        pool.sort_unstable_by(rank);
        let min_positive = pos_scores[q].iter().copied().fold(f32::INFINITY, f32::min);
        let window: Vec<Hit> = pool
            .into_iter()
            .filter(|h| !task.positives[q].contains(&h.doc) && allowed(h.score, min_positive, o))
            .skip(o.range_min)
            .take(range_max - o.range_min)
            .collect();
        let negatives = pick(window, o, &mut rng);
        out.push(Mined {
            anchor: task.queries[q].clone(),
            positives: task.positives[q]
                .iter()
                .map(|&d| task.corpus[d].clone())
                .collect(),
            negatives: negatives
                .into_iter()
                .map(|h| Negative {
                    text: task.corpus[h.doc].clone(),
                    score: h.score,
                })
                .collect(),
        });
    }
    Ok(out)
}

/// Whether a candidate passes the margins (against the query's lowest positive score) and
/// `max_score`, with Python's comparisons.
fn allowed(score: f32, min_positive: f32, o: &MineOptions) -> bool {
    if o.absolute_margin.is_some_and(|m| score + m > min_positive) {
        return false;
    }
    let relative = |m: f32| min_positive - min_positive.abs() * m;
    if o.relative_margin.is_some_and(|m| score > relative(m)) {
        return false;
    }
    !o.max_score.is_some_and(|m| score > m)
}

/// The negatives from a window in score order: its first `num_negatives`, or a random choice
/// of them (all of them when the window holds no more).
fn pick(window: Vec<Hit>, o: &MineOptions, rng: &mut rand::rngs::StdRng) -> Vec<Hit> {
    let n = o.num_negatives;
    if o.sampling == Sampling::Top || window.len() <= n {
        return window.into_iter().take(n).collect();
    }
    let mut chosen = rand::seq::index::sample(rng, window.len(), n).into_vec();
    chosen.sort_unstable(); // the window is in score order
    chosen.into_iter().map(|i| window[i]).collect()
}

/// [n, dim] rows scaled to unit length, on `device`.
fn normalized(rows: &[Vec<f32>], device: &Device) -> Result<Tensor> {
    let dim = rows.first().map_or(0, Vec::len);
    let mut flat = Vec::with_capacity(rows.len() * dim);
    for r in rows {
        let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        flat.extend(r.iter().map(|x| x / norm));
    }
    Ok(Tensor::from_vec(flat, (rows.len(), dim), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> MineOptions {
        MineOptions::default()
    }

    fn hits(scores: &[f32]) -> Vec<Hit> {
        scores
            .iter()
            .enumerate()
            .map(|(doc, &score)| Hit { score, doc })
            .collect()
    }

    #[test]
    fn the_default_window_is_pythons() {
        let o = opts();
        assert_eq!(window_end(&o, 2), 3 + 2);
        let o = MineOptions {
            range_min: 4,
            max_score: Some(0.9),
            ..opts()
        };
        assert_eq!(window_end(&o, 1), 4 + 30 + 1);
    }

    #[test]
    fn margins_and_max_score_compare_as_python() {
        let abs = MineOptions {
            absolute_margin: Some(0.1),
            ..opts()
        };
        assert!(allowed(0.5, 0.7, &abs));
        assert!(!allowed(0.65, 0.7, &abs));
        // |positive| * margin below the positive, also for a negative positive score.
        let rel = MineOptions {
            relative_margin: Some(0.5),
            ..opts()
        };
        assert!(allowed(0.3, 0.8, &rel) && !allowed(0.41, 0.8, &rel));
        assert!(allowed(-0.31, -0.2, &rel) && !allowed(-0.29, -0.2, &rel));
        let max = MineOptions {
            max_score: Some(0.6),
            ..opts()
        };
        assert!(allowed(0.6, 1.0, &max) && !allowed(0.61, 1.0, &max));
    }

    #[test]
    fn ties_are_ranked_by_corpus_position_and_only_k_kept() {
        let mut h = hits(&[0.5, 0.9, 0.5, 0.1, 0.9]);
        keep_best(&mut h, 3);
        h.sort_unstable_by(rank);
        let docs: Vec<usize> = h.iter().map(|h| h.doc).collect();
        assert_eq!(docs, [1, 4, 0]);
    }

    #[test]
    fn random_picks_stay_in_the_window_in_score_order_and_follow_the_seed() {
        let window = hits(&[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]);
        let o = MineOptions {
            sampling: Sampling::Random,
            num_negatives: 3,
            ..opts()
        };
        let draw = |seed| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            pick(window.clone(), &o, &mut rng)
                .iter()
                .map(|h| h.doc)
                .collect::<Vec<_>>()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_eq!(a.len(), 3);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert!((0..20).any(|s| draw(s) != a), "the seed changes the choice");
        // Too few candidates: all of them.
        let mut rng = rand::rngs::StdRng::seed_from_u64(0);
        assert_eq!(pick(hits(&[0.3, 0.2]), &o, &mut rng).len(), 2);
    }
}

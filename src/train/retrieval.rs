//! Retrieval evaluation on (anchor, positive) or (anchor, positive, negative) rows, as
//! sentence-transformers' InformationRetrievalEvaluator computes it with its defaults and the
//! cosine similarity: accuracy@k, precision@k and recall@k (k = 1, 3, 5, 10), MRR@10, NDCG@10
//! and MAP@100.
//!
//! The anchors are the queries and every positive and negative text of the file is the corpus;
//! a query's relevant documents are the positives of its rows. Every id is the text itself (as
//! scripts/make_retrieval_fixture.py gives the Python evaluator): identical texts are one
//! document, a repeated anchor is one query with the positives of all its rows, and score ties
//! are broken by the text, as the evaluator breaks them by corpus id. Ids per row would make a
//! text that appears twice two documents, one of them wrongly irrelevant to the other's anchor.
//!
//! Memory stays bounded: the corpus is embedded `CORPUS_CHUNK` texts at a time, similarities
//! are computed `QUERY_CHUNK` queries by one corpus chunk at a time, and each query keeps only
//! its best `MAX_K` documents.

use std::cmp::Ordering;
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::SentenceModel;

/// The cut-offs of the Python evaluator's defaults.
const ACCURACY_AT: [usize; 4] = [1, 3, 5, 10];
const MRR_AT: usize = 10;
const NDCG_AT: usize = 10;
const MAP_AT: usize = 100;
/// The most documents any metric looks at.
const MAX_K: usize = MAP_AT;
/// Corpus texts embedded (and scored) at a time.
pub const CORPUS_CHUNK: usize = 8192;

/// Queries scored against a corpus chunk at a time: at most QUERY_CHUNK x CORPUS_CHUNK f32.
pub const QUERY_CHUNK: usize = 512;

/// The figures, keyed as `st-tune eval --json` and metrics.jsonl print them ("ndcg@10").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Retrieval {
    #[serde(rename = "accuracy@1")]
    pub accuracy_1: f64,
    #[serde(rename = "accuracy@3")]
    pub accuracy_3: f64,
    #[serde(rename = "accuracy@5")]
    pub accuracy_5: f64,
    #[serde(rename = "accuracy@10")]
    pub accuracy_10: f64,
    #[serde(rename = "precision@1")]
    pub precision_1: f64,
    #[serde(rename = "precision@3")]
    pub precision_3: f64,
    #[serde(rename = "precision@5")]
    pub precision_5: f64,
    #[serde(rename = "precision@10")]
    pub precision_10: f64,
    #[serde(rename = "recall@1")]
    pub recall_1: f64,
    #[serde(rename = "recall@3")]
    pub recall_3: f64,
    #[serde(rename = "recall@5")]
    pub recall_5: f64,
    #[serde(rename = "recall@10")]
    pub recall_10: f64,
    #[serde(rename = "mrr@10")]
    pub mrr_10: f64,
    #[serde(rename = "ndcg@10")]
    pub ndcg_10: f64,
    #[serde(rename = "map@100")]
    pub map_100: f64,
    /// Distinct anchors.
    pub queries: usize,
    /// Distinct positive and negative texts.
    pub corpus: usize,
    /// The similarity the documents are ranked by.
    pub similarity: String,
    /// For files with a negative per row: TripletEvaluator's accuracy, the share of rows whose
    /// anchor is more similar (cosine) to its positive than to its negative.
    #[serde(
        rename = "cosine_accuracy",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub triplet_accuracy: Option<f64>,
}

/// Queries, corpus and relevance of a file, with every text once.
#[derive(Debug)]
pub struct Task<'a> {
    pub queries: Vec<&'a str>,
    pub corpus: Vec<&'a str>,
    /// Per query, the corpus indices of its positives, ascending.
    pub relevant: Vec<Vec<usize>>,
}

impl<'a> Task<'a> {
    /// Distinct anchors and distinct positive/negative texts, in order of first appearance.
    pub fn new(data: &'a Dataset) -> Result<Self> {
        if !data.shape.is_retrieval() {
            return Err(Error::data(
                &data.path,
                0,
                "retrieval evaluation needs anchor,positive[,negative] columns",
            ));
        }
        if data.rows.is_empty() {
            return Err(Error::data(&data.path, 0, "holds no rows to evaluate"));
        }
        let mut task = Task {
            queries: Vec::new(),
            corpus: Vec::new(),
            relevant: Vec::new(),
        };
        let mut query_ids: HashMap<&str, usize> = HashMap::new();
        let mut corpus_ids: HashMap<&str, usize> = HashMap::new();
        for row in &data.rows {
            let mut doc = |text: &'a str| {
                *corpus_ids.entry(text).or_insert_with(|| {
                    task.corpus.push(text);
                    task.corpus.len() - 1
                })
            };
            let positive = doc(&row.texts[1]);
            for negative in &row.texts[2..] {
                doc(negative);
            }
            let q = *query_ids.entry(&row.texts[0]).or_insert_with(|| {
                task.queries.push(&row.texts[0]);
                task.relevant.push(Vec::new());
                task.queries.len() - 1
            });
            if let Err(at) = task.relevant[q].binary_search(&positive) {
                task.relevant[q].insert(at, positive);
            }
        }
        // Distractors after the file's documents (a text already there is that document).
        for text in &data.distractors {
            if !corpus_ids.contains_key(text.as_str()) {
                corpus_ids.insert(text, task.corpus.len());
                task.corpus.push(text);
            }
        }
        Ok(task)
    }
}

/// One retrieved document: its similarity and corpus index.
#[derive(Debug, Clone, Copy)]
struct Hit {
    score: f32,
    doc: usize,
}

/// Embeds queries and corpus and computes the evaluator's figures.
pub fn evaluate_retrieval(
    model: &SentenceModel,
    data: &Dataset,
    batch_size: usize,
) -> Result<Retrieval> {
    evaluate_in_chunks(model, data, batch_size, CORPUS_CHUNK, QUERY_CHUNK)
}

/// [`evaluate_retrieval`] with the chunk sizes given (tests check that they change nothing).
pub fn evaluate_in_chunks(
    model: &SentenceModel,
    data: &Dataset,
    batch_size: usize,
    corpus_chunk: usize,
    query_chunk: usize,
) -> Result<Retrieval> {
    let mut all = evaluate_at_widths(model, data, batch_size, corpus_chunk, query_chunk, &[None])?;
    Ok(all.remove(0))
}

/// The figures at each of `widths`: `None` the full embeddings, `Some(n)` their first n
/// components (re-normalised, as sentence-transformers' `truncate_dim`). Every text is embedded
/// once, whatever the number of widths.
pub fn evaluate_at_widths(
    model: &SentenceModel,
    data: &Dataset,
    batch_size: usize,
    corpus_chunk: usize,
    query_chunk: usize,
    widths: &[Option<usize>],
) -> Result<Vec<Retrieval>> {
    let (corpus_chunk, query_chunk) = (corpus_chunk.max(1), query_chunk.max(1));
    let task = Task::new(data)?;
    // As the Python evaluator's query and corpus prompts: the anchor's and the positive's.
    let query_emb = model.encode_prompted(&task.queries, data.prompt(0), batch_size)?;
    let queries = widths
        .iter()
        .map(|w| normalized(&cut(&query_emb, *w)))
        .collect::<Result<Vec<_>>>()?;
    drop(query_emb);
    let mut hits: Vec<Vec<Vec<Hit>>> = vec![vec![Vec::new(); task.queries.len()]; widths.len()];
    let bar = corpus_bar(task.corpus.len(), corpus_chunk);
    for (c, texts) in task.corpus.chunks(corpus_chunk).enumerate() {
        let first_doc = c * corpus_chunk;
        let doc_emb = model.encode_prompted(texts, data.prompt(1), batch_size)?;
        bar.inc(texts.len() as u64);
        for ((w, queries), hits) in widths.iter().zip(&queries).zip(&mut hits) {
            let docs = normalized(&cut(&doc_emb, *w))?.t()?;
            for q0 in (0..task.queries.len()).step_by(query_chunk) {
                let n = query_chunk.min(task.queries.len() - q0);
                let scores = queries.narrow(0, q0, n)?.matmul(&docs)?.to_vec2::<f32>()?;
                for (i, row) in scores.into_iter().enumerate() {
                    let best = &mut hits[q0 + i];
                    best.extend(row.into_iter().enumerate().map(|(j, score)| Hit {
                        score,
                        doc: first_doc + j,
                    }));
                    keep_best(best, &task.corpus);
                }
            }
        }
    }
    bar.finish_and_clear();
    Ok(hits.into_iter().map(|h| metrics(&task, h)).collect())
}

/// A progress bar on stderr for a corpus of more than one chunk, when stderr is a terminal.
fn corpus_bar(docs: usize, chunk: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if docs <= chunk || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(docs as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "retrieval corpus {bar:30} {pos}/{len} texts  ETA {eta}",
        )
        .expect("static template"),
    );
    bar
}

/// The first `width` components of each row (all of them for `None`); `normalized` then
/// scales them to unit length.
fn cut(rows: &[Vec<f32>], width: Option<usize>) -> Vec<Vec<f32>> {
    match width {
        Some(w) => rows.iter().map(|r| r[..w.min(r.len())].to_vec()).collect(),
        None => rows.to_vec(),
    }
}

/// [n, dim] f32 rows scaled to unit length (as sentence-transformers' cos_sim normalizes).
fn normalized(rows: &[Vec<f32>]) -> Result<Tensor> {
    let dim = rows.first().map_or(0, Vec::len);
    let mut flat = Vec::with_capacity(rows.len() * dim);
    for r in rows {
        let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
        flat.extend(r.iter().map(|x| x / norm));
    }
    Ok(Tensor::from_vec(flat, (rows.len(), dim), &Device::Cpu)?)
}

/// The evaluator's order: higher score first, equal scores by id (the text) ascending.
fn rank(a: &Hit, b: &Hit, corpus: &[&str]) -> Ordering {
    b.score
        .total_cmp(&a.score)
        .then_with(|| corpus[a.doc].cmp(corpus[b.doc]))
}

/// Keeps the `MAX_K` best hits, in rank order.
fn keep_best(hits: &mut Vec<Hit>, corpus: &[&str]) {
    if hits.len() > MAX_K {
        hits.select_nth_unstable_by(MAX_K - 1, |a, b| rank(a, b, corpus));
        hits.truncate(MAX_K);
    }
    hits.sort_unstable_by(|a, b| rank(a, b, corpus));
}

/// The figures from each query's ranked hits, as InformationRetrievalEvaluator.compute_metrics.
fn metrics(task: &Task, hits: Vec<Vec<Hit>>) -> Retrieval {
    let n = task.queries.len() as f64;
    let mut accuracy = [0.0; 4];
    let mut precision = [0.0; 4];
    let mut recall = [0.0; 4];
    let (mut mrr, mut ndcg, mut map) = (0.0, 0.0, 0.0);
    for (ranked, relevant) in hits.iter().zip(&task.relevant) {
        let is_rel: Vec<bool> = ranked
            .iter()
            .map(|h| relevant.binary_search(&h.doc).is_ok())
            .collect();
        let first = is_rel.iter().position(|&r| r);
        let found = |k: usize| is_rel.iter().take(k).filter(|&&r| r).count() as f64;
        for (i, &k) in ACCURACY_AT.iter().enumerate() {
            if first.is_some_and(|p| p < k) {
                accuracy[i] += 1.0;
            }
            precision[i] += found(k) / k as f64;
            recall[i] += found(k) / relevant.len() as f64;
        }
        if let Some(p) = first.filter(|&p| p < MRR_AT) {
            mrr += 1.0 / (p + 1) as f64;
        }
        let dcg: f64 = is_rel
            .iter()
            .take(NDCG_AT)
            .enumerate()
            .filter(|(_, &r)| r)
            .map(|(i, _)| 1.0 / (i as f64 + 2.0).log2())
            .sum();
        let ideal: f64 = (0..relevant.len().min(NDCG_AT))
            .map(|i| 1.0 / (i as f64 + 2.0).log2())
            .sum();
        ndcg += dcg / ideal;
        let (mut correct, mut sum) = (0.0, 0.0);
        for (i, _) in is_rel.iter().take(MAP_AT).enumerate().filter(|(_, &r)| r) {
            correct += 1.0;
            sum += correct / (i + 1) as f64;
        }
        map += sum / MAP_AT.min(relevant.len()) as f64;
    }
    Retrieval {
        accuracy_1: accuracy[0] / n,
        accuracy_3: accuracy[1] / n,
        accuracy_5: accuracy[2] / n,
        accuracy_10: accuracy[3] / n,
        precision_1: precision[0] / n,
        precision_3: precision[1] / n,
        precision_5: precision[2] / n,
        precision_10: precision[3] / n,
        recall_1: recall[0] / n,
        recall_3: recall[1] / n,
        recall_5: recall[2] / n,
        recall_10: recall[3] / n,
        mrr_10: mrr / n,
        ndcg_10: ndcg / n,
        map_100: map / n,
        queries: task.queries.len(),
        corpus: task.corpus.len(),
        similarity: "cosine".into(),
        triplet_accuracy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{Row, RowShape};

    fn dataset(shape: RowShape, rows: &[&[&str]]) -> Dataset {
        Dataset {
            path: "t.csv".into(),
            prompts: vec![None; shape.text_columns()],
            shape,
            rows: rows
                .iter()
                .enumerate()
                .map(|(i, texts)| Row {
                    texts: texts.iter().map(|t| t.to_string()).collect(),
                    score: None,
                    teacher: None,
                    line: i + 2,
                })
                .collect(),
            distractors: Vec::new(),
        }
    }

    #[test]
    fn identical_texts_are_one_query_or_one_document() {
        let d = dataset(
            RowShape::TRIPLET,
            &[&["q1", "p1", "n"], &["q2", "p2", "p1"], &["q1", "p3", "n"]],
        );
        let t = Task::new(&d).unwrap();
        assert_eq!(t.queries, ["q1", "q2"]);
        assert_eq!(t.corpus, ["p1", "n", "p2", "p3"]);
        assert_eq!(t.relevant, [vec![0, 3], vec![2]]);
    }

    #[test]
    fn scored_rows_are_refused() {
        let d = dataset(RowShape::Scored, &[&["a", "b"]]);
        let e = Task::new(&d).unwrap_err().to_string();
        assert!(e.contains("t.csv") && e.contains("anchor,positive"), "{e}");
    }

    #[test]
    fn ties_are_broken_by_the_text_and_only_max_k_kept() {
        let corpus: Vec<String> = (0..150).map(|i| format!("doc{i:03}")).collect();
        let corpus: Vec<&str> = corpus.iter().map(String::as_str).collect();
        let mut hits: Vec<Hit> = (0..150)
            .rev()
            .map(|doc| Hit {
                score: if doc == 140 { 0.9 } else { 0.5 },
                doc,
            })
            .collect();
        keep_best(&mut hits, &corpus);
        assert_eq!(hits.len(), MAX_K);
        assert_eq!(hits[0].doc, 140);
        assert!(hits[1..].iter().enumerate().all(|(i, h)| h.doc == i));
    }

    #[test]
    fn metrics_follow_the_python_formulas() {
        // One query, relevant docs 0 and 2, ranked [1, 0, 3, 2]: hits at ranks 2 and 4.
        let task = Task {
            queries: vec!["q"],
            corpus: vec!["a", "b", "c", "d"],
            relevant: vec![vec![0, 2]],
        };
        let hits = vec![[1, 0, 3, 2]
            .iter()
            .map(|&doc| Hit { score: 0.0, doc })
            .collect()];
        let m = metrics(&task, hits);
        assert_eq!((m.accuracy_1, m.accuracy_3), (0.0, 1.0));
        assert_eq!(
            (m.precision_1, m.precision_3, m.precision_5),
            (0.0, 1.0 / 3.0, 0.4)
        );
        assert_eq!((m.recall_1, m.recall_3, m.recall_5), (0.0, 0.5, 1.0));
        assert_eq!(m.mrr_10, 0.5);
        let ndcg = (1.0 / 3f64.log2() + 1.0 / 5f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert!((m.ndcg_10 - ndcg).abs() < 1e-15);
        assert!((m.map_100 - (0.5 + 0.5) / 2.0).abs() < 1e-15);
    }
}

//! Evaluation on scored pairs: Spearman and Pearson correlation between the cosine similarity
//! of the two embeddings and the gold score, as sentence-transformers'
//! EmbeddingSimilarityEvaluator computes them (Spearman with average ranks for ties); and
//! [`evaluate_any`], which picks the evaluation from a file's row shape:
//!
//! | rows | evaluation | default `train.metric` |
//! | --- | --- | --- |
//! | sentence1, sentence2, score | Spearman, Pearson (EmbeddingSimilarityEvaluator) | spearman |
//! | sentence1, sentence2, label 0/1 | BinaryClassificationEvaluator (`binary.rs`) | cosine_ap |
//! | anchor, positive | retrieval (InformationRetrievalEvaluator, `retrieval.rs`) | ndcg@10 |
//! | anchor, positive, negative[, margin] | retrieval and TripletEvaluator's cosine_accuracy | ndcg@10 |
//!
//! Triplet files get both: retrieval over the distinct texts, as before triplet accuracy was
//! added (so the default metric of such runs is unchanged), and the triplet accuracy, which
//! `train.metric = "cosine_accuracy"` picks. [`evaluate_widths`] also scores truncated
//! embeddings (Matryoshka training).

use serde::{Deserialize, Serialize};

use crate::data::{Dataset, RowShape};
use crate::error::{Error, Result};
use crate::model::SentenceModel;
use crate::train::binary::{classify, Binary};
use crate::train::retrieval::{evaluate_at_widths, Retrieval, CORPUS_CHUNK, QUERY_CHUNK};

/// The figures of an evaluation file: correlation for scored pairs, binary classification for
/// labelled pairs, retrieval for pairs and triplets. Serialized as the inner figures alone (no
/// tag), so a scored file's JSON is `{"spearman", "pearson", "pairs"}` as before retrieval
/// existed. Read back, the first variant whose fields are all there wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Scores {
    Similarity(Correlation),
    Binary(Binary),
    Retrieval(Retrieval),
}

impl Scores {
    /// The figure that picks the best model: Spearman, cosine AP, or NDCG@10 for retrieval
    /// (the sentence-transformers evaluators' primary metrics).
    pub fn metric(&self) -> &'static str {
        match self {
            Scores::Similarity(_) => "spearman",
            Scores::Binary(_) => "cosine_ap",
            Scores::Retrieval(_) => "ndcg@10",
        }
    }

    pub fn value(&self) -> f64 {
        match self {
            Scores::Similarity(c) => c.spearman,
            Scores::Binary(b) => b.ap,
            Scores::Retrieval(r) => r.ndcg_10,
        }
    }

    /// The figure that picks the best model, `name` (`train.metric`) or else [`Scores::metric`],
    /// and its value; `None` when this kind of evaluation has no such figure.
    pub fn chosen(&self, name: Option<&str>) -> Option<(String, f64)> {
        let name = name.unwrap_or(self.metric());
        Some((name.to_string(), self.figure(name)?))
    }

    /// Any figure by the name the JSON output gives it ("spearman", "mrr@10", ...); `None`
    /// when this kind of evaluation has no such figure.
    pub fn figure(&self, name: &str) -> Option<f64> {
        serde_json::to_value(self).ok()?.get(name)?.as_f64()
    }
}

/// The evaluation a file of `shape` rows gets, for messages.
pub fn evaluation_name(shape: RowShape) -> &'static str {
    match shape {
        RowShape::Scored => "similarity",
        RowShape::Labeled => "binary classification",
        RowShape::Pair => "retrieval",
        RowShape::Negatives(1) | RowShape::Margin => "retrieval and triplet accuracy",
        RowShape::Negatives(_) => "retrieval",
        RowShape::Distill => "none",
    }
}

/// The error for a file whose rows fit no evaluation (text,embedding rows).
pub fn no_evaluation(data: &Dataset) -> Error {
    Error::data(
        &data.path,
        0,
        "text,embedding rows fit no evaluation; evaluate on sentence1,sentence2,score, \
         sentence1,sentence2,label or anchor,positive[,negative] rows",
    )
}

/// Scored pairs: [`evaluate`]; labelled pairs: binary classification; (anchor, positive[,
/// negative]) rows: retrieval, and with negatives triplet accuracy.
pub fn evaluate_any(model: &SentenceModel, data: &Dataset, batch_size: usize) -> Result<Scores> {
    Ok(evaluate_widths(model, data, batch_size, &[])?.full)
}

/// A dev evaluation at the full width and, for Matryoshka training, at each truncated width.
#[derive(Debug, Clone, PartialEq)]
pub struct DevScores {
    pub full: Scores,
    /// (width, figures on the embeddings cut to that width and re-normalised).
    pub widths: Vec<(usize, Scores)>,
}

/// [`evaluate_any`] at the full width and at each of `widths`: the first n components of every
/// embedding, re-normalised (sentence-transformers' `truncate_dim`). Each text is embedded once.
pub fn evaluate_widths(
    model: &SentenceModel,
    data: &Dataset,
    batch_size: usize,
    widths: &[usize],
) -> Result<DevScores> {
    let all: Vec<Option<usize>> = std::iter::once(None)
        .chain(widths.iter().map(|&w| Some(w)))
        .collect();
    let mut scores: Vec<Scores> = match data.shape {
        RowShape::Scored => correlations(model, data, batch_size, &all)?
            .into_iter()
            .map(Scores::Similarity)
            .collect(),
        RowShape::Labeled => binary_at_widths(model, data, batch_size, &all)?
            .into_iter()
            .map(Scores::Binary)
            .collect(),
        RowShape::Pair | RowShape::Negatives(_) | RowShape::Margin => {
            let mut r =
                evaluate_at_widths(model, data, batch_size, CORPUS_CHUNK, QUERY_CHUNK, &all)?;
            if matches!(data.shape, RowShape::Negatives(1) | RowShape::Margin) {
                let accuracy = triplet_accuracies(model, data, batch_size, &all)?;
                for (r, a) in r.iter_mut().zip(accuracy) {
                    r.triplet_accuracy = Some(a);
                }
            }
            r.into_iter().map(Scores::Retrieval).collect()
        }
        RowShape::Distill => return Err(no_evaluation(data)),
    };
    let full = scores.remove(0);
    Ok(DevScores {
        full,
        widths: widths.iter().copied().zip(scores).collect(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Correlation {
    pub spearman: f64,
    pub pearson: f64,
    pub pairs: usize,
}

/// Embeds both sides of every scored row (no graph) and correlates cosine with score.
pub fn evaluate(model: &SentenceModel, data: &Dataset, batch_size: usize) -> Result<Correlation> {
    Ok(correlations(model, data, batch_size, &[None])?.remove(0))
}

/// [`evaluate`] at each width: `None` the full embeddings, `Some(n)` their first n components
/// (the cosine re-normalises them).
fn correlations(
    model: &SentenceModel,
    data: &Dataset,
    batch_size: usize,
    widths: &[Option<usize>],
) -> Result<Vec<Correlation>> {
    let a: Vec<&str> = data.rows.iter().map(|r| r.texts[0].as_str()).collect();
    let b: Vec<&str> = data.rows.iter().map(|r| r.texts[1].as_str()).collect();
    let ea = model.encode_prompted(&a, data.prompt(0), batch_size)?;
    let eb = model.encode_prompted(&b, data.prompt(1), batch_size)?;
    let gold: Vec<f64> = data
        .rows
        .iter()
        .map(|r| r.score.unwrap_or(0.0) as f64)
        .collect();
    Ok(widths
        .iter()
        .map(|w| {
            let cos: Vec<f64> = ea
                .iter()
                .zip(&eb)
                .map(|(x, y)| {
                    let n = w.unwrap_or(x.len()).min(x.len());
                    cosine(&x[..n], &y[..n])
                })
                .collect();
            Correlation {
                spearman: spearman(&cos, &gold),
                pearson: pearson(&cos, &gold),
                pairs: cos.len(),
            }
        })
        .collect())
}

/// The embedding of column `c`'s text of every row.
fn embed_column(
    model: &SentenceModel,
    data: &Dataset,
    c: usize,
    batch_size: usize,
) -> Result<Vec<Vec<f32>>> {
    let texts: Vec<&str> = data.rows.iter().map(|r| r.texts[c].as_str()).collect();
    model.encode(&texts, batch_size)
}

/// The cosine of `x` and `y` cut to `width` components (`None`: all), re-normalised.
fn cosine_at(x: &[f32], y: &[f32], width: Option<usize>) -> f64 {
    let n = width.unwrap_or(x.len()).min(x.len());
    cosine(&x[..n], &y[..n])
}

/// BinaryClassificationEvaluator's figures at each width.
fn binary_at_widths(
    model: &SentenceModel,
    data: &Dataset,
    batch_size: usize,
    widths: &[Option<usize>],
) -> Result<Vec<Binary>> {
    let ea = embed_column(model, data, 0, batch_size)?;
    let eb = embed_column(model, data, 1, batch_size)?;
    let labels: Vec<bool> = data.rows.iter().map(|r| r.score == Some(1.0)).collect();
    Ok(widths
        .iter()
        .map(|&w| {
            // numpy's cosines are float32: the thresholds are computed from those.
            let cos: Vec<f32> = ea
                .iter()
                .zip(&eb)
                .map(|(x, y)| cosine_at(x, y, w) as f32)
                .collect();
            classify(&cos, &labels)
        })
        .collect())
}

/// TripletEvaluator's cosine accuracy at each width: the share of rows with
/// cos(anchor, positive) > cos(anchor, negative).
fn triplet_accuracies(
    model: &SentenceModel,
    data: &Dataset,
    batch_size: usize,
    widths: &[Option<usize>],
) -> Result<Vec<f64>> {
    let [a, p, n] = [0, 1, 2].map(|c| embed_column(model, data, c, batch_size));
    let (a, p, n) = (a?, p?, n?);
    Ok(widths
        .iter()
        .map(|&w| {
            let right = (0..a.len())
                .filter(|&i| cosine_at(&a[i], &p[i], w) > cosine_at(&a[i], &n[i], w))
                .count();
            right as f64 / a.len() as f64
        })
        .collect())
}

pub fn cosine(x: &[f32], y: &[f32]) -> f64 {
    let dot: f64 = x.iter().zip(y).map(|(a, b)| *a as f64 * *b as f64).sum();
    let nx: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let ny: f64 = y.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    dot / (nx * ny).max(1e-12)
}

pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}

pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}

/// 1-based ranks, ties get the average of the ranks they span (scipy's "average").
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            r[idx[k]] = avg;
        }
        i = j + 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_averages_tied_ranks_like_scipy() {
        // scipy.stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]).correlation == 0.9486832980505138
        let s = spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]);
        assert!((s - 0.9486832980505138).abs() < 1e-12, "{s}");
    }

    #[test]
    fn scores_read_back_as_the_variant_they_were_written_as() {
        // Checkpoints store the dev figures before training as JSON without a tag.
        let c = Scores::Similarity(Correlation {
            spearman: 0.5,
            pearson: 0.25,
            pairs: 3,
        });
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(text, r#"{"spearman":0.5,"pearson":0.25,"pairs":3}"#);
        assert_eq!(serde_json::from_str::<Scores>(&text).unwrap(), c);
        let v = serde_json::json!({"queries": 4, "corpus": 9, "similarity": "cosine",
            "ndcg@10": 0.75, "accuracy@1": 0.5, "accuracy@3": 0.5, "accuracy@5": 0.5,
            "accuracy@10": 0.5, "precision@1": 0.5, "precision@3": 0.5, "precision@5": 0.5,
            "precision@10": 0.5, "recall@1": 0.5, "recall@3": 0.5, "recall@5": 0.5,
            "recall@10": 0.5, "mrr@10": 0.5, "map@100": 0.5});
        let r: Scores = serde_json::from_value(v).unwrap();
        assert!(matches!(&r, Scores::Retrieval(x) if x.corpus == 9), "{r:?}");
        assert_eq!((r.metric(), r.value()), ("ndcg@10", 0.75));
        let back: Scores = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);

        let b = Scores::Binary(classify(&[0.9, 0.1, 0.5], &[true, false, true]));
        let back: Scores = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(back, b);
        assert_eq!((b.metric(), b.value()), ("cosine_ap", 1.0));
        let Scores::Retrieval(mut triplets) = r else {
            unreachable!()
        };
        triplets.triplet_accuracy = Some(0.25);
        let t = Scores::Retrieval(triplets);
        let text = serde_json::to_string(&t).unwrap();
        assert!(text.contains("\"cosine_accuracy\":0.25"), "{text}");
        assert_eq!(serde_json::from_str::<Scores>(&text).unwrap(), t);
        assert_eq!(t.figure("cosine_accuracy"), Some(0.25));
    }

    #[test]
    fn pearson_of_a_linear_relation_is_one() {
        assert!((pearson(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 1.0).abs() < 1e-12);
    }
}

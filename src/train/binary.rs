//! Binary classification of labelled pairs (sentence1, sentence2, label 0/1), as
//! sentence-transformers' BinaryClassificationEvaluator computes it with the cosine similarity
//! (the default `similarity_fn_name`): the best accuracy and the best F1 over every threshold on
//! the cosine, each with its threshold, the precision and recall at the best F1, the average
//! precision (scikit-learn's `average_precision_score`) and the Matthews correlation at the F1
//! threshold. Thresholds are midpoints between neighbouring cosines, computed in f32 as numpy
//! computes them from float32 embeddings.
//!
//! The pairs' embeddings are made elsewhere (`eval.rs`); this module only counts.

use serde::{Deserialize, Serialize};

/// The figures, keyed as sentence-transformers names them (without the evaluator's name).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Binary {
    #[serde(rename = "cosine_accuracy")]
    pub accuracy: f64,
    #[serde(rename = "cosine_accuracy_threshold")]
    pub accuracy_threshold: f64,
    #[serde(rename = "cosine_f1")]
    pub f1: f64,
    #[serde(rename = "cosine_f1_threshold")]
    pub f1_threshold: f64,
    #[serde(rename = "cosine_precision")]
    pub precision: f64,
    #[serde(rename = "cosine_recall")]
    pub recall: f64,
    #[serde(rename = "cosine_ap")]
    pub ap: f64,
    #[serde(rename = "cosine_mcc")]
    pub mcc: f64,
    pub pairs: usize,
}

/// The figures of pairs with cosine `scores` and `labels` (true: similar).
pub fn classify(scores: &[f32], labels: &[bool]) -> Binary {
    // Highest cosine first; ties keep their order (Python's stable sort).
    let mut rows: Vec<(f32, bool)> = scores.iter().copied().zip(labels.iter().copied()).collect();
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (accuracy, accuracy_threshold) = best_accuracy(&rows);
    let (f1, precision, recall, f1_threshold) = best_f1(&rows);
    Binary {
        accuracy,
        accuracy_threshold: accuracy_threshold as f64,
        f1,
        f1_threshold: f1_threshold as f64,
        precision,
        recall,
        ap: average_precision(&rows),
        mcc: mcc(scores, labels, f1_threshold),
        pairs: scores.len(),
    }
}

/// The threshold cut after row `i` of `rows`: the midpoint to the next cosine (or the cosine
/// itself after the last row, or when the midpoint rounds onto the next cosine).
fn cut(rows: &[(f32, bool)], i: usize) -> f32 {
    match rows.get(i + 1) {
        None => rows[i].0,
        Some(&(next, _)) => {
            let mid = (rows[i].0 + next) / 2.0;
            if mid == next {
                rows[i].0
            } else {
                mid
            }
        }
    }
}

/// Whether a threshold after row `i` would split a group of equal cosines.
fn inside_tie(rows: &[(f32, bool)], i: usize) -> bool {
    rows.get(i + 1).is_some_and(|next| next.0 == rows[i].0)
}

/// `find_best_acc_and_threshold`: start from "every pair dissimilar", then move the threshold
/// down one group of equal cosines at a time.
fn best_accuracy(rows: &[(f32, bool)]) -> (f64, f32) {
    let n = rows.len() as f64;
    let mut remaining_negatives = rows.iter().filter(|r| !r.1).count();
    let mut positives_so_far = 0;
    let (mut best, mut threshold) = match rows.first() {
        Some(first) => (remaining_negatives as f64 / n, next_up(first.0)),
        None => (0.0, -1.0),
    };
    for i in 0..rows.len() {
        if rows[i].1 {
            positives_so_far += 1;
        } else {
            remaining_negatives -= 1;
        }
        if inside_tie(rows, i) {
            continue;
        }
        let accuracy = (positives_so_far + remaining_negatives) as f64 / n;
        if accuracy > best {
            best = accuracy;
            threshold = cut(rows, i);
        }
    }
    (best, threshold)
}

/// `find_best_f1_and_threshold`: (F1, precision, recall, threshold) at the best F1.
fn best_f1(rows: &[(f32, bool)]) -> (f64, f64, f64, f32) {
    let duplicates = rows.iter().filter(|r| r.1).count() as f64;
    let (mut best_f1, mut best_precision, mut best_recall, mut threshold) = (0.0, 0.0, 0.0, 0.0);
    let mut correct = 0usize;
    for i in 0..rows.len() {
        if rows[i].1 {
            correct += 1;
        }
        if inside_tie(rows, i) || correct == 0 {
            continue;
        }
        let precision = correct as f64 / (i + 1) as f64;
        let recall = correct as f64 / duplicates;
        let f1 = 2.0 * precision * recall / (precision + recall);
        if f1 > best_f1 {
            (best_f1, best_precision, best_recall) = (f1, precision, recall);
            threshold = cut(rows, i);
        }
    }
    (best_f1, best_precision, best_recall, threshold)
}

/// scikit-learn's average precision: Σ (Rₖ − Rₖ₋₁) Pₖ over the distinct cosines, highest
/// first; 0 without positives.
fn average_precision(rows: &[(f32, bool)]) -> f64 {
    let positives = rows.iter().filter(|r| r.1).count() as f64;
    if positives == 0.0 {
        return 0.0;
    }
    let (mut ap, mut tp, mut last_recall) = (0.0, 0usize, 0.0);
    for i in 0..rows.len() {
        tp += usize::from(rows[i].1);
        if inside_tie(rows, i) {
            continue;
        }
        let recall = tp as f64 / positives;
        ap += (recall - last_recall) * tp as f64 / (i + 1) as f64;
        last_recall = recall;
    }
    ap
}

/// Matthews correlation of "cosine ≥ threshold" with the labels (scikit-learn: 0 when a
/// marginal is empty).
fn mcc(scores: &[f32], labels: &[bool], threshold: f32) -> f64 {
    let (mut tp, mut tn, mut fp, mut fn_) = (0f64, 0f64, 0f64, 0f64);
    for (&s, &y) in scores.iter().zip(labels) {
        match (s >= threshold, y) {
            (true, true) => tp += 1.0,
            (false, false) => tn += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fn_ += 1.0,
        }
    }
    let denominator = ((tp + fp) * (tp + fn_) * (tn + fp) * (tn + fn_)).sqrt();
    if denominator == 0.0 {
        0.0
    } else {
        (tp * tn - fp * fn_) / denominator
    }
}

/// The next f32 above `x` (numpy's `nextafter(x, inf)`).
fn next_up(x: f32) -> f32 {
    if x.is_nan() || x == f32::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f32::from_bits(1);
    }
    let bits = x.to_bits();
    f32::from_bits(if x > 0.0 { bits + 1 } else { bits - 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_separable_set_is_classified_perfectly_between_the_groups() {
        let b = classify(&[0.9, 0.2, 0.8, 0.1], &[true, false, true, false]);
        assert_eq!(
            (b.accuracy, b.f1, b.precision, b.recall),
            (1.0, 1.0, 1.0, 1.0)
        );
        assert_eq!(b.accuracy_threshold, 0.5);
        assert_eq!(b.f1_threshold, 0.5);
        assert_eq!((b.ap, b.mcc), (1.0, 1.0));
    }

    #[test]
    fn average_precision_matches_scikit_learn_with_ties() {
        // sklearn.metrics.average_precision_score([1, 0, 1, 0, 1], [0.9, 0.9, 0.7, 0.5, 0.5])
        // == 0.5888888888888889
        let ap = average_precision_of(
            &[0.9, 0.9, 0.7, 0.5, 0.5],
            &[true, false, true, false, true],
        );
        assert!((ap - 0.5888888888888889).abs() < 1e-12, "{ap}");
    }

    fn average_precision_of(scores: &[f32], labels: &[bool]) -> f64 {
        classify(scores, labels).ap
    }

    #[test]
    fn all_negative_stays_the_best_accuracy_just_above_the_top_cosine() {
        let b = classify(&[0.3, 0.9], &[false, false]);
        assert_eq!(b.accuracy, 1.0);
        assert!(b.accuracy_threshold > 0.9 && (b.accuracy_threshold as f32) == next_up(0.9));
        assert_eq!((b.f1, b.ap), (0.0, 0.0));
    }
}

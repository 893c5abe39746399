//! The names of the dev evaluation's figures (`eval --json`, metrics.jsonl, sweeps' `dev.NAME`)
//! and [`Metric`], the one that picks `best/` (`train.metric`). The evaluations computing them
//! live in `train/` (`eval.rs`, `binary.rs`, `retrieval.rs`); their names live here, below
//! both the config that names one and the code that computes it.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::data::RowShape;

/// The similarity figures (scored pairs).
pub const SIMILARITY: [&str; 2] = ["spearman", "pearson"];

/// The binary-classification figures (`train/binary.rs`).
pub const BINARY: [&str; 8] = [
    "cosine_accuracy",
    "cosine_accuracy_threshold",
    "cosine_f1",
    "cosine_f1_threshold",
    "cosine_precision",
    "cosine_recall",
    "cosine_ap",
    "cosine_mcc",
];

/// The retrieval figures (`train/retrieval.rs`), by the names `eval --json`, metrics.jsonl and sweeps (`dev.NAME`) use.
pub const RETRIEVAL: [&str; 15] = [
    "accuracy@1",
    "accuracy@3",
    "accuracy@5",
    "accuracy@10",
    "precision@1",
    "precision@3",
    "precision@5",
    "precision@10",
    "recall@1",
    "recall@3",
    "recall@5",
    "recall@10",
    "mrr@10",
    "ndcg@10",
    "map@100",
];

/// The figures a file of `shape` rows gets, by name (`train.metric` must be one of them).
pub fn figures(shape: RowShape) -> Vec<&'static str> {
    match shape {
        RowShape::Scored => SIMILARITY.to_vec(),
        RowShape::Labeled => BINARY.to_vec(),
        RowShape::Negatives(1) | RowShape::Margin => {
            RETRIEVAL.into_iter().chain(["cosine_accuracy"]).collect()
        }
        // TripletEvaluator takes one negative: an n-tuple gets retrieval only.
        RowShape::Pair | RowShape::Negatives(_) => RETRIEVAL.to_vec(),
        RowShape::Distill => Vec::new(),
    }
}

/// The figures a dev evaluation reports, by name (`train.metric`).
pub fn dev_figures() -> Vec<&'static str> {
    let mut all = Vec::new();
    for shape in crate::data::RowShape::ALL {
        for name in figures(shape) {
            if !all.contains(&name) {
                all.push(name);
            }
        }
    }
    all
}

/// A dev figure by name, one some evaluation reports (`train.metric`); whether the dev file's
/// evaluation reports it is checked when the file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metric(&'static str);

impl Metric {
    /// The figure named `name`, if any evaluation reports one by that name.
    pub fn parse(name: &str) -> Option<Metric> {
        dev_figures().into_iter().find(|f| *f == name).map(Metric)
    }

    pub fn as_str(self) -> &'static str {
        self.0
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl Serialize for Metric {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Metric {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Metric::parse(&name).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "\"{name}\" is not a figure of the dev evaluation; use one of {}",
                dev_figures().join(", ")
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metric_parses_from_any_evaluations_figure_names_only() {
        assert_eq!(
            Metric::parse("ndcg@10").map(Metric::as_str),
            Some("ndcg@10")
        );
        assert_eq!(
            Metric::parse("cosine_ap").map(Metric::as_str),
            Some("cosine_ap")
        );
        assert_eq!(
            Metric::parse("spearman").map(Metric::as_str),
            Some("spearman")
        );
        assert_eq!(Metric::parse("ndcg@11"), None);
    }
}

//! Training and evaluation data: rows of texts (and a score, a 0/1 label, a margin or a
//! teacher's embedding), read from CSV, TSV, JSON lines or Parquet, tokenized, and cut into
//! micro-batches packed without padding. Nothing here knows about models or losses.

pub mod batch;
pub mod mix;
pub mod read;
pub mod tokenize;
pub mod tokenized;

use std::path::PathBuf;

/// What one row holds; picked from the header (or `data.columns`) before training starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowShape {
    /// (anchor, positive): for MultipleNegativesRankingLoss.
    Pair,
    /// (anchor, positive, n hard negatives): the ranking losses with hard negatives. One
    /// negative is a triplet (columns anchor,positive,negative); more are an n-tuple
    /// (anchor,positive,negative_1..negative_n), as `st-tune mine --output-format n-tuple`
    /// writes them.
    Negatives(usize),
    /// (sentence1, sentence2, score): for CoSENT, CosineSimilarity and evaluation.
    Scored,
    /// (sentence1, sentence2, label), label 0 or 1: for the contrastive losses and
    /// binary-classification evaluation.
    Labeled,
    /// (anchor, positive, negative, margin), the margin a teacher's score of the positive minus
    /// its score of the negative: for MarginMSELoss.
    Margin,
    /// (text, embedding), the embedding a teacher's: for MSELoss (distillation).
    Distill,
}

impl RowShape {
    /// (anchor, positive, negative).
    pub const TRIPLET: RowShape = RowShape::Negatives(1);

    /// Every kind of shape (n-tuples by their triplet), in the order a header is matched
    /// against them.
    pub const ALL: [RowShape; 6] = [
        RowShape::Pair,
        RowShape::TRIPLET,
        RowShape::Scored,
        RowShape::Labeled,
        RowShape::Margin,
        RowShape::Distill,
    ];

    /// Number of text columns a row of this shape holds.
    pub fn text_columns(self) -> usize {
        match self {
            RowShape::Distill => 1,
            RowShape::Pair | RowShape::Scored | RowShape::Labeled => 2,
            RowShape::Margin => 3,
            RowShape::Negatives(n) => 2 + n,
        }
    }

    /// The role names of the columns, in the order `Row::texts` holds them (then the label):
    /// also the column names a header without `data.columns` has.
    pub fn roles(self) -> Vec<String> {
        let fixed: &[&str] = match self {
            RowShape::Pair => &["anchor", "positive"],
            RowShape::Negatives(1) => &["anchor", "positive", "negative"],
            RowShape::Negatives(n) => {
                let numbered = (1..=n).map(|i| format!("negative_{i}"));
                return ["anchor".to_string(), "positive".to_string()]
                    .into_iter()
                    .chain(numbered)
                    .collect();
            }
            RowShape::Scored => &["sentence1", "sentence2", "score"],
            RowShape::Labeled => &["sentence1", "sentence2", "label"],
            RowShape::Margin => &["anchor", "positive", "negative", "margin"],
            RowShape::Distill => &["text", "embedding"],
        };
        fixed.iter().map(|r| r.to_string()).collect()
    }

    /// The role each text column is prompted by (`data.prompts`): every negative of an
    /// n-tuple is a "negative".
    pub fn prompt_roles(self) -> Vec<&'static str> {
        match self {
            RowShape::Pair => vec!["anchor", "positive"],
            RowShape::Negatives(n) => {
                [["anchor", "positive"].as_slice(), &vec!["negative"; n]].concat()
            }
            RowShape::Margin => vec!["anchor", "positive", "negative"],
            RowShape::Scored | RowShape::Labeled => vec!["sentence1", "sentence2"],
            RowShape::Distill => vec!["text"],
        }
    }

    /// What the rows are, for messages ("scored pairs").
    pub fn name(self) -> String {
        match self {
            RowShape::Pair => "anchor-positive pairs".into(),
            RowShape::Negatives(1) => "triplets".into(),
            RowShape::Negatives(n) => format!("n-tuples with {n} negatives"),
            RowShape::Scored => "scored pairs".into(),
            RowShape::Labeled => "labelled pairs".into(),
            RowShape::Margin => "triplets with margins".into(),
            RowShape::Distill => "texts with teacher embeddings".into(),
        }
    }

    /// Whether rows start with (anchor, positive[, negatives]): what the ranking losses and
    /// retrieval evaluation take.
    pub fn is_retrieval(self) -> bool {
        matches!(
            self,
            RowShape::Pair | RowShape::Negatives(_) | RowShape::Margin
        )
    }
}

/// One example: `texts` in role order (see [`RowShape::roles`]); `score` holds the score, the
/// 0/1 label or the margin of shapes that have one, `teacher` the embedding of distillation
/// rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub texts: Vec<String>,
    pub score: Option<f32>,
    pub teacher: Option<Vec<f32>>,
    /// 1-based line in the source file, for error messages.
    pub line: usize,
}

/// A whole data file, checked: every row has `shape.text_columns()` non-empty texts, a finite
/// score (0 or 1 for `Labeled`) when the shape has one, and for `Distill` a teacher embedding
/// as long as every other row's.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub shape: RowShape,
    pub rows: Vec<Row>,
    /// Extra corpus texts for retrieval evaluation (`data.corpus`): distractors no query is
    /// relevant to.
    pub distractors: Vec<String>,
    /// The prompt text put before each text column (role order), from `data.prompts`.
    pub prompts: Vec<Option<String>>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The prompt of text column `c`, if it has one.
    pub fn prompt(&self, c: usize) -> Option<&str> {
        self.prompts.get(c).and_then(|p| p.as_deref())
    }
}

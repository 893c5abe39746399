//! Training and evaluation data: rows of texts (and a score), read from CSV, TSV or JSON lines,
//! tokenized and cut into padded micro-batches. Nothing here knows about models or losses.

pub mod batch;
pub mod read;
pub mod tokenize;

use std::path::PathBuf;

/// What one row holds; picked from the header (or `data.columns`) before training starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RowShape {
    /// (anchor, positive): for MultipleNegativesRankingLoss.
    Pair,
    /// (anchor, positive, negative): MultipleNegativesRankingLoss with hard negatives.
    Triplet,
    /// (sentence1, sentence2, score): for CoSENT, CosineSimilarity and evaluation.
    Scored,
}

impl RowShape {
    /// Number of text columns a row of this shape holds.
    pub fn text_columns(self) -> usize {
        match self {
            RowShape::Pair | RowShape::Scored => 2,
            RowShape::Triplet => 3,
        }
    }

    /// The role names of the columns, in the order `Row::texts` holds them.
    pub fn roles(self) -> &'static [&'static str] {
        match self {
            RowShape::Pair => &["anchor", "positive"],
            RowShape::Triplet => &["anchor", "positive", "negative"],
            RowShape::Scored => &["sentence1", "sentence2", "score"],
        }
    }
}

/// One example: `texts` in role order (see [`RowShape::roles`]), `score` for scored rows.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub texts: Vec<String>,
    pub score: Option<f32>,
    /// 1-based line in the source file, for error messages.
    pub line: usize,
}

/// A whole data file, checked: every row has `shape.text_columns()` non-empty texts, and a
/// finite score when the shape is `Scored`.
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

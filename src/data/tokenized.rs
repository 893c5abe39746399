//! The training set tokenized once, before training: every text of every row after its
//! column's prompt, with the scores and teacher embeddings the losses take beside them.

use candle_core::{Device, Tensor};

use crate::data::tokenize::TextTokenizer;
use crate::data::Dataset;
use crate::error::Result;

/// The tokenized training set: `tokens[row][column]`, `scores[row]`, and for distillation
/// `teachers[row]` (empty otherwise).
pub struct TokenizedData {
    pub tokens: Vec<Vec<Vec<u32>>>,
    pub scores: Vec<Option<f32>>,
    pub teachers: Vec<Vec<f32>>,
    pub columns: usize,
    /// Per column, the leading tokens of its prompt (see `TokenBatch::prompt_tokens`).
    pub prompt_tokens: Vec<usize>,
}

impl TokenizedData {
    /// The different token ids the rows hold.
    pub fn distinct_ids(&self) -> std::collections::HashSet<u32> {
        self.tokens.iter().flatten().flatten().copied().collect()
    }

    /// What the loss takes besides the embeddings for `rows`: the teacher embeddings
    /// (rows, dim), else the scores (rows,), else nothing.
    pub fn labels(&self, rows: &[usize], device: &Device) -> Result<Option<Tensor>> {
        if let Some(first) = self.teachers.first() {
            let flat: Vec<f32> = rows
                .iter()
                .flat_map(|&r| self.teachers[r].iter().copied())
                .collect();
            return Ok(Some(Tensor::from_vec(
                flat,
                (rows.len(), first.len()),
                device,
            )?));
        }
        if self.scores.first().is_none_or(|s| s.is_none()) {
            return Ok(None);
        }
        let s: Vec<f32> = rows
            .iter()
            .map(|&r| self.scores[r].unwrap_or(0.0))
            .collect();
        Ok(Some(Tensor::from_vec(s, rows.len(), device)?))
    }
}

/// Tokenizes every text of every row once, before training, each after its column's prompt.
pub fn tokenize(tokenizer: &TextTokenizer, set: &Dataset) -> Result<TokenizedData> {
    let columns = set.shape.text_columns();
    let mut per_col = Vec::new();
    let mut prompt_tokens = Vec::new();
    for c in 0..columns {
        let prompt = set.prompt(c).unwrap_or("");
        let texts: Vec<String> = set
            .rows
            .iter()
            .map(|r| format!("{prompt}{}", r.texts[c]))
            .collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        per_col.push(tokenizer.encode(&texts)?);
        prompt_tokens.push(match prompt {
            "" => 0,
            p => tokenizer.prompt_length(p)?,
        });
    }
    let tokens = (0..set.len())
        .map(|r| (0..columns).map(|c| per_col[c][r].clone()).collect())
        .collect();
    Ok(TokenizedData {
        tokens,
        scores: set.rows.iter().map(|r| r.score).collect(),
        teachers: set.rows.iter().filter_map(|r| r.teacher.clone()).collect(),
        columns,
        prompt_tokens,
    })
}

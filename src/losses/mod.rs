//! Training losses. A loss is a function of sentence embeddings (and scores), never of the
//! model: the plain path, the cached (GradCache) path and OOM retries all call the same code.
//!
//! | loss | data | batch-coupled |
//! | --- | --- | --- |
//! | [`mnrl`] MultipleNegativesRankingLoss | (anchor, positive[, negative]) | yes |
//! | [`cosent`] CoSENTLoss | (sentence1, sentence2, score) | yes |
//! | [`cosine`] CosineSimilarityLoss | (sentence1, sentence2, score) | no |
//!
//! A batch-coupled loss compares every row with every other row of the batch, so it is not the
//! mean of per-micro-batch losses: the trainer computes it over the whole batch (cached scheme).
//!
//! [`matryoshka`] wraps any of them: the same loss at several truncated widths, summed
//! (`train.matryoshka_dims`).

pub mod cosent;
pub mod cosine;
pub mod matryoshka;
pub mod mnrl;

use candle_core::{Tensor, D};

pub use crate::config::LossKind;
use crate::data::RowShape;
use crate::error::{Error, Result};
pub use matryoshka::Matryoshka;

/// The loss of one batch. `columns[i]` holds the embeddings of the i-th text column,
/// (batch, dim) f32; `scores` (batch,) for scored rows. With `matryoshka`, the loss is summed
/// over its widths (see [`matryoshka`]).
pub fn compute(
    kind: LossKind,
    scale: f64,
    matryoshka: Option<&Matryoshka>,
    columns: &[Tensor],
    scores: Option<&Tensor>,
) -> Result<Tensor> {
    match matryoshka {
        Some(m) => m.loss(columns, |cut| single(kind, scale, cut, scores)),
        None => single(kind, scale, columns, scores),
    }
}

/// One loss at the embeddings' full width.
fn single(
    kind: LossKind,
    scale: f64,
    columns: &[Tensor],
    scores: Option<&Tensor>,
) -> Result<Tensor> {
    match kind {
        LossKind::Mnrl => mnrl::loss(columns, scale),
        LossKind::Cosent => cosent::loss(&columns[0], &columns[1], need(scores)?, scale),
        LossKind::Cosine => cosine::loss(&columns[0], &columns[1], need(scores)?),
    }
}

fn need(scores: Option<&Tensor>) -> Result<&Tensor> {
    scores.ok_or_else(|| Error::Internal("this loss needs a score column".into()))
}

/// Whether the loss couples the rows of a batch (and so needs the cached scheme to be exact
/// under micro-batching).
pub fn couples_batch(kind: LossKind) -> bool {
    !matches!(kind, LossKind::Cosine)
}

/// Checks, before training, that the data has what the loss needs.
pub fn check_fits(kind: LossKind, shape: RowShape) -> Result<()> {
    let ok = match kind {
        LossKind::Mnrl => matches!(shape, RowShape::Pair | RowShape::Triplet),
        LossKind::Cosent | LossKind::Cosine => shape == RowShape::Scored,
    };
    if ok {
        return Ok(());
    }
    let (needs, hint) = match kind {
        LossKind::Mnrl => (
            "(anchor, positive[, negative]) rows",
            "use train.loss = \"cosent\" or \"cosine\" for scored pairs, or map columns with data.columns.anchor / data.columns.positive",
        ),
        _ => (
            "(sentence1, sentence2, score) rows",
            "use train.loss = \"mnrl\" for pairs without scores, or map a score column with data.columns.score",
        ),
    };
    Err(Error::config(
        "train.loss",
        format!(
            "`{}` needs {needs}, but the training data has {shape:?} rows; {hint}",
            kind.as_str()
        ),
    ))
}

/// Cosine similarity of every row of `a` with every row of `b`: (n, m).
pub fn cos_sim_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a = crate::model::pooling::normalize(a)?;
    let b = crate::model::pooling::normalize(b)?;
    Ok(a.matmul(&b.t()?)?)
}

/// Cosine similarity of matching rows: (n,).
pub fn cos_sim_pairwise(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a = crate::model::pooling::normalize(a)?;
    let b = crate::model::pooling::normalize(b)?;
    Ok((a * b)?.sum(D::Minus1)?)
}

/// log Σ exp(x) over the last dimension, stable, with a gradient.
pub fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let s = x
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?;
    Ok((s + max)?.squeeze(D::Minus1)?)
}

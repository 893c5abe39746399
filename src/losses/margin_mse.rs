//! MarginMSELoss: the mean squared error between the student's margin
//! `q·p − q·n` (dot products) and the teacher's margin for the same (query, positive, negative).
//!
//! | input | shape |
//! | --- | --- |
//! | anchor, positive, negative | (batch, dim) each |
//! | margin (the teacher's `score(q, p) − score(q, n)`) | (batch,) |
//!
//! Use it to distil a cross-encoder (or any scorer) into the model on MS MARCO-like
//! (query, positive, hard negative) triplets: the student learns how much better the positive
//! is, not only that it is. Similarity is the dot product, as sentence-transformers' default
//! (`pairwise_dot_score`). Per row (no coupling). Hofstätter et al. 2020, "Improving Efficient
//! Neural Ranking Models with Cross-Architecture Knowledge Distillation".

use candle_core::{DType, Tensor, D};

use crate::error::Result;

pub fn loss(q: &Tensor, p: &Tensor, n: &Tensor, margins: &Tensor) -> Result<Tensor> {
    let dot = |x: &Tensor, y: &Tensor| -> Result<Tensor> { Ok((x * y)?.sum(D::Minus1)?) };
    let predicted = (dot(q, p)? - dot(q, n)?)?;
    let gold = margins.to_dtype(DType::F32)?.detach();
    Ok((predicted - gold)?.sqr()?.mean_all()?)
}

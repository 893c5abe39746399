//! MultipleNegativesRankingLoss (InfoNCE with in-batch negatives).
//!
//! For each anchor aᵢ the candidates are every positive of the batch (pⱼ) and, when given,
//! every hard negative (nⱼ). The loss is the cross-entropy of `scale · cos(aᵢ, candidates)`
//! with the target pᵢ, averaged over anchors: the model learns to rank the true positive
//! above all other texts of the batch.
//!
//! | input | shape |
//! | --- | --- |
//! | anchor, positive[, negative_1, …, negative_k] | (batch, dim) each |
//!
//! Use it for (query, relevant passage) or (sentence, paraphrase) pairs without scores;
//! larger batches give more negatives and usually better models. `scale` is 1/temperature
//! (20 by default, as in sentence-transformers). Henderson et al. 2017, "Efficient Natural
//! Language Response Suggestion for Smart Reply".

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::losses::{cos_sim_matrix, logsumexp};

pub fn loss(columns: &[Tensor], scale: f64) -> Result<Tensor> {
    let anchors = &columns[0];
    let candidates = Tensor::cat(&columns[1..], 0)?; // (batch * (columns-1), dim)
    let logits = (cos_sim_matrix(anchors, &candidates)? * scale)?; // (batch, candidates)
    let n = anchors.dim(0)?;
    // The target of anchor i is candidate i: the diagonal of the first block.
    let target = logits
        .narrow(1, 0, n)?
        .broadcast_mul(&Tensor::eye(n, logits.dtype(), logits.device())?)?
        .sum(D::Minus1)?;
    Ok((logsumexp(&logits)? - target)?.mean_all()?)
}

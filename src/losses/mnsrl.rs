//! MultipleNegativesSymmetricRankingLoss: MNRL in both directions.
//!
//! With logits `scale · cos(·, ·)`, the forward term is MNRL's: each anchor aᵢ against every
//! positive and hard negative of the batch, target pᵢ. The backward term searches the other
//! way: each positive pᵢ against every anchor of the batch, target aᵢ. The loss is
//! `mean_i [ (lse(forwardᵢ) + lse(backwardᵢ)) / 2 − scale · cos(aᵢ, pᵢ) ]`, the mean of the two
//! cross-entropies (sentence-transformers 6.2 computes it as MultipleNegativesRankingLoss with
//! `directions = ("query_to_doc", "doc_to_query")`, `partition_mode = "per_direction"`).
//!
//! | input | shape |
//! | --- | --- |
//! | anchor, positive[, negative_1, …, negative_k] | (batch, dim) each |
//!
//! Use it instead of MNRL when both sides of a pair should find each other (question ↔ answer,
//! sentence ↔ translation), as in symmetric search. Like MNRL it couples the rows of a batch.
//! `scale` is 1/temperature, 20 by default. Henderson et al. 2017, "Efficient Natural Language
//! Response Suggestion for Smart Reply".

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::losses::{cos_sim_matrix, logsumexp};

pub fn loss(columns: &[Tensor], scale: f64) -> Result<Tensor> {
    let anchors = &columns[0];
    let positives = &columns[1];
    let candidates = Tensor::cat(&columns[1..], 0)?; // (batch * (columns-1), dim)
    let forward = (cos_sim_matrix(anchors, &candidates)? * scale)?; // (batch, candidates)
    let backward = (cos_sim_matrix(positives, anchors)? * scale)?; // (batch, batch)
    let n = anchors.dim(0)?;
    let target = backward
        .broadcast_mul(&Tensor::eye(n, backward.dtype(), backward.device())?)?
        .sum(D::Minus1)?;
    let log_z = ((logsumexp(&forward)? + logsumexp(&backward)?)? * 0.5)?;
    Ok((log_z - target)?.mean_all()?)
}

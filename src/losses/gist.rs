//! GISTEmbedLoss: MNRL with in-batch negatives vetted by a guide model.
//!
//! A second, fixed model (the guide, `[guide]`) embeds the same texts. With `g(·,·)` the
//! guide's cosine similarity and `tᵢ = g(aᵢ, pᵢ) − margin`, every candidate c of anchor aᵢ
//! with `g(aᵢ, c) > tᵢ` is a likely false negative (the guide finds it closer to the anchor
//! than the positive is) and leaves the softmax (its logit becomes −∞). The candidates are
//! every positive pⱼ (pᵢ itself is never dropped), every other anchor aⱼ, every positive again
//! as seen from pᵢ (`g(pᵢ, pⱼ) > tᵢ` drops it) and, when given, every hard negative nⱼ of
//! every negative column (one block per column). The loss is the cross-entropy of
//! `scale · cos(·, ·)` over `[a·p | a·a | p·p | a·n₁ | … | a·nₖ]` with the
//! target pᵢ, averaged over anchors. Each text's own entry in the a·a and p·p blocks has guide
//! similarity 1 and so drops out, unless the guide finds the pair identical.
//!
//! | input | shape |
//! | --- | --- |
//! | anchor, positive[, negative_1, …, negative_k] | (batch, dim) each, the trained model's |
//! | guide anchor, positive[, negatives] | (batch, guide dim) each, no gradient |
//!
//! With more than one negative column this is 6.2's `CachedGISTEmbedLoss` (its
//! `GISTEmbedLoss` takes at most one). Parameters, as sentence-transformers 6.2's
//! `GISTEmbedLoss`: `scale` is 1/temperature (100 by default: temperature 0.01); `margin`
//! (`train.margin`, default 0) is the "absolute" margin strategy. Not supported: the "relative" strategy, `contrast_anchors = False` and
//! `contrast_positives = False` (both blocks are always in, as by default), and
//! `gather_across_devices` (one device).
//!
//! Use it instead of MNRL when the data holds near-duplicates or several right answers per
//! query, so that in-batch "negatives" are often positives in disguise: the guide (a strong
//! existing model, or the model being trained) keeps them from being pushed away. It costs a
//! forward pass of the guide per batch. Like MNRL it couples the rows of a batch; the trainer
//! runs it under the cached scheme when the batch is cut. Solatorio 2024, "GISTEmbed: Guided
//! In-sample Selection of Training Negatives for Text Embedding Fine-tuning".

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};
use crate::losses::{cos_sim_matrix, logsumexp};

/// `columns` the trained model's embeddings, `guide` the guide's of the same texts, in the
/// same order.
pub fn loss(columns: &[Tensor], guide: &[Tensor], scale: f64, margin: f64) -> Result<Tensor> {
    if guide.len() != columns.len() {
        return Err(Error::Internal(format!(
            "GISTEmbedLoss got {} guide columns for {} columns",
            guide.len(),
            columns.len()
        )));
    }
    let (a, p, ga, gp) = (&columns[0], &columns[1], &guide[0], &guide[1]);
    let n = a.dim(0)?;
    let guided_ap = cos_sim_matrix(ga, gp)?; // (batch, batch)
    let eye = Tensor::eye(n, DType::F32, a.device())?;
    // Per anchor, the guide's similarity to its own positive, less the margin: (batch, 1).
    let threshold = ((&guided_ap * &eye)?.sum_keepdim(D::Minus1)? - margin)?;
    let ap = cos_sim_matrix(a, p)?;
    let target = (&ap * &eye)?.sum(D::Minus1)?;
    // The positive itself never drops out, whatever the margin.
    let mut blocks = vec![masked(&ap, &guided_ap, &threshold, Some(&eye))?];
    blocks.push(masked(
        &cos_sim_matrix(a, a)?,
        &cos_sim_matrix(ga, ga)?,
        &threshold,
        None,
    )?);
    blocks.push(masked(
        &cos_sim_matrix(p, p)?,
        &cos_sim_matrix(gp, gp)?,
        &threshold,
        None,
    )?);
    for (neg, gn) in columns[2..].iter().zip(&guide[2..]) {
        blocks.push(masked(
            &cos_sim_matrix(a, neg)?,
            &cos_sim_matrix(ga, gn)?,
            &threshold,
            None,
        )?);
    }
    let logits = (Tensor::cat(&blocks, 1)? * scale)?; // (batch, (3 + negatives) · batch)
    Ok((logsumexp(&logits)? - (target * scale)?)?.mean_all()?)
}

/// `sim` with −∞ where the guide's similarity exceeds the row's threshold, except where
/// `keep` is 1. The mask is added, not multiplied, so the gradient of a kept entry is
/// untouched and a dropped one gets exactly 0 (no 0 · ∞).
fn masked(
    sim: &Tensor,
    guided: &Tensor,
    threshold: &Tensor,
    keep: Option<&Tensor>,
) -> Result<Tensor> {
    let mut drop = guided.broadcast_gt(threshold)?.to_dtype(DType::F32)?;
    if let Some(keep) = keep {
        drop = (drop * (1.0 - keep)?)?;
    }
    let neg_inf = Tensor::full(f32::NEG_INFINITY, sim.shape(), sim.device())?;
    let zeros = sim.zeros_like()?;
    let bias = drop.to_dtype(DType::U8)?.where_cond(&neg_inf, &zeros)?;
    Ok((sim + bias)?)
}

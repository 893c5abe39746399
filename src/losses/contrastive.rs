//! ContrastiveLoss: `mean_i ½ (yᵢ · dᵢ² + (1 − yᵢ) · max(margin − dᵢ, 0)²)`, dᵢ = d(uᵢ, vᵢ).
//!
//! Pairs labelled 1 are pulled together; pairs labelled 0 are pushed until they are at least
//! `margin` apart (`train.margin`, 0.5 by default), and no further. `d` is `train.distance`:
//! "cosine" (default, 1 − cos), "euclidean" or "manhattan", as sentence-transformers'
//! SiameseDistanceMetric computes them (`F.pairwise_distance`, which adds 1e-6 to x − y).
//!
//! | input | shape |
//! | --- | --- |
//! | sentence1, sentence2 | (batch, dim) each |
//! | label | (batch,), 0 or 1 |
//!
//! Use it for pairs labelled similar / dissimilar (duplicate questions, paraphrase or not);
//! OnlineContrastiveLoss on the same data usually trains better. Per row (no coupling), so it
//! micro-batches exactly with plain accumulation. Hadsell et al. 2006, "Dimensionality
//! Reduction by Learning an Invariant Mapping".

use candle_core::{DType, Tensor};

use crate::config::Distance;
use crate::error::Result;
use crate::losses::distance;

/// What `F.pairwise_distance` adds to x − y (its `eps`).
pub const PAIRWISE_EPS: f64 = 1e-6;

pub fn loss(
    a: &Tensor,
    b: &Tensor,
    labels: &Tensor,
    metric: Distance,
    margin: f64,
) -> Result<Tensor> {
    let d = distance(a, b, metric, PAIRWISE_EPS)?;
    let y = labels.to_dtype(DType::F32)?;
    let pull = (&y * d.sqr()?)?;
    let push = ((1.0 - &y)? * (margin - d)?.relu()?.sqr()?)?;
    Ok(((pull + push)? * 0.5)?.mean_all()?)
}

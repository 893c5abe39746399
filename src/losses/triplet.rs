//! TripletLoss: `mean_i max(d(aᵢ, pᵢ) − d(aᵢ, nᵢ) + margin, 0)`.
//!
//! Each anchor must be closer to its positive than to its negative by at least `margin`
//! (`train.margin`, 5 by default). `d` is `train.distance`: "euclidean" (default, ‖x − y‖₂),
//! "cosine" (1 − cos) or "manhattan" (‖x − y‖₁), sentence-transformers' TripletDistanceMetric.
//! With "cosine", distances lie in [0, 2]: choose a margin below 1 (e.g. 0.5).
//!
//! | input | shape |
//! | --- | --- |
//! | anchor, positive, negative | (batch, dim) each |
//!
//! Use it for (anchor, positive, negative) triplets when the negative is the only contrast you
//! want, e.g. hard negatives mined for each anchor; MNRL on the same triplets also uses every
//! other row of the batch as a negative and usually trains better. Per row (no coupling), so
//! it micro-batches exactly with plain accumulation. Hermans et al. 2017, "In Defense of the
//! Triplet Loss for Person Re-Identification".

use candle_core::Tensor;

use crate::config::Distance;
use crate::error::Result;
use crate::losses::distance;

pub fn loss(a: &Tensor, p: &Tensor, n: &Tensor, metric: Distance, margin: f64) -> Result<Tensor> {
    let d_pos = distance(a, p, metric, 0.0)?;
    let d_neg = distance(a, n, metric, 0.0)?;
    Ok(((d_pos - d_neg)? + margin)?.relu()?.mean_all()?)
}

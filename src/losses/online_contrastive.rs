//! OnlineContrastiveLoss: ContrastiveLoss on the hard pairs of the batch only, summed.
//!
//! With dᵢ = d(uᵢ, vᵢ), the hard positives are the pairs labelled 1 farther apart than the
//! closest pair labelled 0, and the hard negatives the pairs labelled 0 closer than the farthest
//! pair labelled 1 (without pairs of the other label, the mean distance of their own label is
//! the bar). The loss is `Σ_hard pos dᵢ² + Σ_hard neg max(margin − dᵢ, 0)²`: a sum, not a mean,
//! as in sentence-transformers. `train.margin` (0.5) and `train.distance` ("cosine") as for
//! ContrastiveLoss.
//!
//! | input | shape |
//! | --- | --- |
//! | sentence1, sentence2 | (batch, dim) each |
//! | label | (batch,), 0 or 1 |
//!
//! Use it for pairs labelled similar / dissimilar; it usually beats ContrastiveLoss, as easy
//! pairs stop pulling on the model. Which pairs are hard depends on the whole batch, so it
//! couples the rows of a batch (cached scheme under micro-batching). Hadsell et al. 2006,
//! "Dimensionality Reduction by Learning an Invariant Mapping".

use candle_core::{DType, Tensor};

use crate::config::Distance;
use crate::error::Result;
use crate::losses::contrastive::PAIRWISE_EPS;
use crate::losses::distance;

pub fn loss(
    a: &Tensor,
    b: &Tensor,
    labels: &Tensor,
    metric: Distance,
    margin: f64,
) -> Result<Tensor> {
    let d = distance(a, b, metric, PAIRWISE_EPS)?; // (batch,)
    let dist = d.to_vec1::<f32>()?;
    let label = labels.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let of = |want: f32| -> Vec<f32> {
        dist.iter()
            .zip(&label)
            .filter(|(_, y)| **y == want)
            .map(|(d, _)| *d)
            .collect()
    };
    let (poss, negs) = (of(1.0), of(0.0));
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    let neg_bar = match poss.is_empty() {
        false => poss.iter().copied().fold(f32::MIN, f32::max),
        true => mean(&negs),
    };
    let pos_bar = match negs.is_empty() {
        false => negs.iter().copied().fold(f32::MAX, f32::min),
        true => mean(&poss),
    };
    // Masks of the hard pairs: constants, as the selection has no gradient.
    let hard = |want: f32, keep: &dyn Fn(f32) -> bool| -> Result<Tensor> {
        let m: Vec<f32> = dist
            .iter()
            .zip(&label)
            .map(|(d, y)| f32::from(*y == want && keep(*d)))
            .collect();
        Ok(Tensor::from_vec(m, dist.len(), d.device())?)
    };
    let hard_pos = hard(1.0, &|x| x > pos_bar)?;
    let hard_neg = hard(0.0, &|x| x < neg_bar)?;
    let pull = (hard_pos * d.sqr()?)?.sum_all()?;
    let push = (hard_neg * (margin - d)?.relu()?.sqr()?)?.sum_all()?;
    Ok((pull + push)?)
}

//! CosineSimilarityLoss: the mean squared error between cos(uᵢ, vᵢ) and the gold score yᵢ.
//!
//! | input | shape |
//! | --- | --- |
//! | sentence1, sentence2 | (batch, dim) each |
//! | score | (batch,), in the range the cosine should reach (0..1 for STS-B here) |
//!
//! Use it when the scores are calibrated similarities and you want cosines that match them;
//! it is per-pair (no coupling between rows), so it micro-batches exactly with plain gradient
//! accumulation. Reimers & Gurevych 2019, "Sentence-BERT".

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::losses::cos_sim_pairwise;

pub fn loss(a: &Tensor, b: &Tensor, scores: &Tensor) -> Result<Tensor> {
    let cos = cos_sim_pairwise(a, b)?;
    Ok((cos - scores.to_dtype(DType::F32)?)?.sqr()?.mean_all()?)
}

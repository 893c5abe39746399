//! CoSENTLoss.
//!
//! With sᵢ = scale · cos(uᵢ, vᵢ) for each pair and scores yᵢ, the loss is
//! `log(1 + Σ_{yᵢ < yⱼ} exp(sᵢ − sⱼ))`: every pair the gold scores rank lower must get a lower
//! cosine than every pair they rank higher. Only the order of the scores matters.
//!
//! | input | shape |
//! | --- | --- |
//! | sentence1, sentence2 | (batch, dim) each |
//! | score | (batch,) |
//!
//! Use it for scored pairs (STS-like data); it usually beats CosineSimilarityLoss there. It
//! couples the rows of a batch. `scale` is 1/temperature, 20 by default. Su 2022,
//! "CoSENT: A more efficient sentence vector scheme than Sentence-BERT".

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::losses::{cos_sim_pairwise, logsumexp};

pub fn loss(a: &Tensor, b: &Tensor, scores: &Tensor, scale: f64) -> Result<Tensor> {
    let s = (cos_sim_pairwise(a, b)? * scale)?; // (n,)
    let n = s.dim(0)?;
    let diff = s.unsqueeze(1)?.broadcast_sub(&s.unsqueeze(0)?)?; // sᵢ − sⱼ, (n, n)
    let y = scores.to_dtype(DType::F32)?;
    let lower = y
        .unsqueeze(1)?
        .broadcast_lt(&y.unsqueeze(0)?)?
        .to_dtype(DType::F32)?; // yᵢ < yⱼ
                                // The other pairs (yᵢ ≥ yⱼ) are moved 1e12 lower, so exp() makes them vanish.
    let masked = (diff - ((lower.ones_like()? - lower)? * 1e12)?)?;
    // The leading zero is the "1 +" of the formula.
    let all = Tensor::cat(
        &[
            Tensor::zeros(1, DType::F32, s.device())?,
            masked.reshape(n * n)?,
        ],
        0,
    )?;
    logsumexp(&all)
}

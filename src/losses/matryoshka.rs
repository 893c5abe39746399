//! MatryoshkaLoss: the chosen loss at several embedding widths, weighted and summed.
//!
//! For widths d₁ > d₂ > … and weights wₖ, the loss is `Σₖ wₖ · L(cut(u, dₖ), cut(v, dₖ), …)`
//! where `cut(x, d)` keeps the first d components of each embedding and re-normalises them to
//! unit length, as sentence-transformers' `MatryoshkaLoss` does (`shrink`: `x[..., :d]`, then
//! `F.normalize`; a sum over widths, not a mean; weights 1 by default). The model learns
//! embeddings whose prefixes are good embeddings too, so users can keep only the first d
//! components at inference (`truncate_dim`) and trade a little quality for smaller indexes.
//!
//! | input | shape |
//! | --- | --- |
//! | whatever the wrapped loss takes | (batch, dim) per text column, dim ≥ d₁ |
//!
//! It is a function of the embeddings like every loss here, so it works unchanged on the plain
//! path, under the cached (GradCache) scheme and through OOM retries; it couples the rows of a
//! batch exactly when the wrapped loss does. Kusupati et al. 2022, "Matryoshka Representation
//! Learning".

use candle_core::{Tensor, D};

use crate::config::TrainSection;
use crate::error::{Error, Result};
use crate::model::pooling::normalize;

/// The widths and their weights, from `train.matryoshka_dims` / `train.matryoshka_weights`.
#[derive(Debug, Clone, PartialEq)]
pub struct Matryoshka {
    /// Strictly decreasing, each ≥ 1 (checked with the config).
    pub dims: Vec<usize>,
    /// One per width, positive.
    pub weights: Vec<f64>,
}

impl Matryoshka {
    /// The `[train]` section's widths, if it sets any (weights default to 1).
    pub fn from_train(t: &TrainSection) -> Option<Self> {
        let dims = t.matryoshka_dims.clone()?;
        let weights = t
            .matryoshka_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; dims.len()]);
        Some(Self { dims, weights })
    }

    /// `Σₖ wₖ · inner(columns cut to dₖ)`.
    pub fn loss(
        &self,
        columns: &[Tensor],
        inner: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for (&dim, &weight) in self.dims.iter().zip(&self.weights) {
            let cut = columns
                .iter()
                .map(|c| truncate(c, dim))
                .collect::<Result<Vec<_>>>()?;
            let part = (inner(&cut)? * weight)?;
            total = Some(match total {
                Some(t) => (t + part)?,
                None => part,
            });
        }
        total.ok_or_else(|| Error::Internal("train.matryoshka_dims is empty".into()))
    }
}

/// The first `dim` components of each row, re-normalised to unit length: (n, dim).
pub fn truncate(x: &Tensor, dim: usize) -> Result<Tensor> {
    let full = x.dim(D::Minus1)?;
    if dim > full {
        return Err(Error::config(
            "train.matryoshka_dims",
            format!(
                "holds {dim}, but the embeddings have {full} dimensions; use widths of at most \
                 {full}"
            ),
        ));
    }
    normalize(&x.narrow(D::Minus1, 0, dim)?)
}

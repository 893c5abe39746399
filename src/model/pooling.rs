//! Pooling (token embeddings -> one sentence embedding), as sentence-transformers'
//! `models/Pooling.py`, and L2 normalisation (`models/Normalize.py`).

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::batch::TokenBatch;
use crate::error::Result;

/// `1_Pooling/config.json`. Several modes may be on: their outputs are concatenated in the
/// order cls, max, mean, mean-sqrt-len, as sentence-transformers does.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolingConfig {
    pub word_embedding_dimension: usize,
    #[serde(default)]
    pub pooling_mode_cls_token: bool,
    #[serde(default)]
    pub pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pub pooling_mode_max_tokens: bool,
    #[serde(default)]
    pub pooling_mode_mean_sqrt_len_tokens: bool,
}

impl PoolingConfig {
    pub fn mean(dim: usize) -> Self {
        Self {
            word_embedding_dimension: dim,
            pooling_mode_cls_token: false,
            pooling_mode_mean_tokens: true,
            pooling_mode_max_tokens: false,
            pooling_mode_mean_sqrt_len_tokens: false,
        }
    }

    pub fn output_dim(&self) -> usize {
        let modes = [
            self.pooling_mode_cls_token,
            self.pooling_mode_max_tokens,
            self.pooling_mode_mean_tokens,
            self.pooling_mode_mean_sqrt_len_tokens,
        ];
        modes.iter().filter(|m| **m).count() * self.word_embedding_dimension
    }

    /// tokens: (tokens, hidden), rows packed as in `batch`. Returns (rows, out_dim), f32.
    pub fn forward(&self, tokens: &Tensor, batch: &TokenBatch) -> Result<Tensor> {
        let tokens = tokens.to_dtype(DType::F32)?;
        let mut parts = Vec::new();
        if self.pooling_mode_cls_token {
            let first: Vec<u32> = batch.offsets.iter().map(|&o| o as u32).collect();
            let first = Tensor::from_vec(first, batch.len(), tokens.device())?;
            parts.push(tokens.index_select(&first, 0)?);
        }
        if self.pooling_mode_max_tokens {
            let rows: Vec<Tensor> = batch
                .rows()
                .map(|(o, l)| tokens.narrow(0, o, l)?.max_keepdim(0))
                .collect::<candle_core::Result<_>>()?;
            parts.push(Tensor::cat(&rows, 0)?);
        }
        if self.pooling_mode_mean_tokens || self.pooling_mode_mean_sqrt_len_tokens {
            // Each token added into its row's sum, in token order: a row's sum does not depend
            // on the other rows (a (rows, tokens) x (tokens, hidden) product did, through the
            // depth blocking of the whole batch's tokens).
            let row_of: Vec<u32> = batch
                .rows()
                .enumerate()
                .flat_map(|(r, (_, l))| std::iter::repeat_n(r as u32, l))
                .collect();
            let row_of = Tensor::from_vec(row_of, batch.tokens(), tokens.device())?;
            let (_, hidden) = tokens.dims2()?;
            let sum = Tensor::zeros((batch.len(), hidden), DType::F32, tokens.device())?
                .index_add(&row_of, &tokens, 0)?;
            let lens: Vec<f32> = batch
                .lengths
                .iter()
                .map(|&l| (l as f32).max(1e-9))
                .collect();
            let count = Tensor::from_vec(lens, (batch.len(), 1), tokens.device())?;
            if self.pooling_mode_mean_tokens {
                parts.push(sum.broadcast_div(&count)?);
            }
            if self.pooling_mode_mean_sqrt_len_tokens {
                parts.push(sum.broadcast_div(&count.sqrt()?)?);
            }
        }
        Ok(Tensor::cat(&parts, D::Minus1)?)
    }
}

/// x / max(‖x‖₂, 1e-12) per row, as torch.nn.functional.normalize.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

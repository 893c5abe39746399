//! Pooling (token embeddings -> one sentence embedding), as sentence-transformers'
//! `models/Pooling.py`, and L2 normalisation (`models/Normalize.py`).

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

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

    /// tokens: (batch, seq, hidden); mask: (batch, seq) of 0/1. Returns (batch, out_dim), f32.
    pub fn forward(&self, tokens: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let tokens = tokens.to_dtype(DType::F32)?;
        let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?; // (b, s, 1)
        let mut parts = Vec::new();
        if self.pooling_mode_cls_token {
            parts.push(tokens.narrow(1, 0, 1)?.squeeze(1)?);
        }
        if self.pooling_mode_max_tokens {
            // Padding is pushed to -1e9 so it never wins the maximum.
            let pad = ((m.ones_like()? - &m)? * -1e9)?;
            parts.push(tokens.broadcast_add(&pad)?.max(1)?);
        }
        if self.pooling_mode_mean_tokens || self.pooling_mode_mean_sqrt_len_tokens {
            let sum = tokens.broadcast_mul(&m)?.sum(1)?; // (b, h)
            let count = m.sum(1)?.clamp(1e-9, f64::MAX)?; // (b, 1)
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

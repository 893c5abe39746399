//! Dropout with masks that are a pure function of (seed, step, row, site, position), never of
//! the batch a row happens to sit in. So a row gets the same mask whether it is encoded in a
//! micro-batch of 32, of 4 after an OOM, or recomputed by the cached (GradCache) scheme or by
//! gradient checkpointing, and a run with retries ends with the same weights as one without.

use candle_core::{Device, Tensor};

use crate::engine::mask::{mask_value, mix, pack, AttentionMasks, HiddenMask};
use crate::error::Result;

/// Where to draw masks from; `Dropout::off()` for inference (identity, no work).
#[derive(Debug, Clone)]
pub struct Dropout {
    /// Dropout probability on hidden states (`hidden_dropout_prob`).
    pub hidden_p: f32,
    /// Dropout probability on attention weights (`attention_probs_dropout_prob`).
    pub attention_p: f32,
    /// Key of the run and optimizer step: `mix(seed, step)`.
    step_key: u64,
    /// One global id per row of the batch (its index in the data set, and which column).
    row_ids: Vec<u64>,
    on: bool,
}

impl Dropout {
    pub fn off() -> Self {
        Self {
            hidden_p: 0.0,
            attention_p: 0.0,
            step_key: 0,
            row_ids: Vec::new(),
            on: false,
        }
    }

    pub fn train(hidden_p: f32, attention_p: f32, seed: u64, step: u64, row_ids: Vec<u64>) -> Self {
        Self {
            hidden_p,
            attention_p,
            step_key: mix(seed ^ mix(step)),
            row_ids,
            on: hidden_p > 0.0 || attention_p > 0.0,
        }
    }

    /// x: (tokens, hidden), rows packed as `lengths` says. On CPU one op whose backward
    /// regenerates the mask: a product with a mask tensor would keep the mask, and candle
    /// would also keep a gradient for it until the backward pass ends.
    pub fn hidden(&self, x: &Tensor, lengths: &[usize], site: u64) -> Result<Tensor> {
        let Some(op) = self.hidden_mask(lengths, site) else {
            return Ok(x.clone());
        };
        if x.device().is_cpu() {
            return Ok(x.contiguous()?.apply_op1(op)?);
        }
        self.hidden_composed(x, &op)
    }

    /// `x ⊙ mask` as a product with the whole mask, drawn on the host (devices without the CPU
    /// op, and the composed reference layer on every device).
    pub fn hidden_composed(&self, x: &Tensor, mask: &HiddenMask) -> Result<Tensor> {
        let mask = Tensor::from_vec(mask.values(x.dim(1)?), x.shape(), &Device::Cpu)?;
        Ok(x.mul(&mask.to_device(x.device())?.to_dtype(x.dtype())?)?)
    }

    /// The hidden-state mask of this batch at `site`, as keys (None when off): for kernels that
    /// fuse dropout into another op (`norm::add_layer_norm`).
    pub fn hidden_mask(&self, lengths: &[usize], site: u64) -> Option<HiddenMask> {
        if !self.on || self.hidden_p == 0.0 {
            return None;
        }
        let keys = (0..lengths.len()).map(|r| self.row_key(r, site)).collect();
        Some(HiddenMask::new(self.hidden_p, keys, lengths))
    }

    /// p: one row's attention weights, (heads, len, len).
    pub fn attention(&self, p: &Tensor, row: usize, site: u64) -> Result<Tensor> {
        if !self.on || self.attention_p == 0.0 {
            return Ok(p.clone());
        }
        let (heads, q, k) = p.dims3()?;
        let mut data = Vec::with_capacity(p.elem_count());
        self.fill(&mut data, row, &[heads, q, k], self.attention_p, site);
        let mask = Tensor::from_vec(data, p.shape(), &Device::Cpu)?;
        Ok(p.mul(&mask.to_device(p.device())?.to_dtype(p.dtype())?)?)
    }

    /// The attention-dropout masks of this batch at `site`, as keys (None when off).
    pub fn attention_masks(&self, site: u64) -> Option<AttentionMasks> {
        if !self.on || self.attention_p == 0.0 {
            return None;
        }
        Some(AttentionMasks {
            p: self.attention_p,
            row_keys: (0..self.row_ids.len())
                .map(|r| self.row_key(r, site))
                .collect(),
        })
    }

    fn row_key(&self, row: usize, site: u64) -> u64 {
        mix(self.step_key ^ mix(self.row_ids[row] ^ mix(site)))
    }

    /// Appends row `row`'s mask over `dims` (0 or 1/(1-p)). Each element's draw is keyed by its
    /// coordinates, not its offset, so neither padding nor packing shifts the masks.
    fn fill(&self, out: &mut Vec<f32>, row: usize, dims: &[usize], p: f32, site: u64) {
        let row_key = self.row_key(row, site);
        let inner: usize = dims.iter().product();
        let mut coords = vec![0usize; dims.len()];
        for _ in 0..inner {
            out.push(mask_value(row_key, pack(&coords), p));
            for d in (0..dims.len()).rev() {
                coords[d] += 1;
                if coords[d] < dims[d] {
                    break;
                }
                coords[d] = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_diff;
    use candle_core::Var;

    #[test]
    fn the_hidden_dropout_op_draws_the_masks_of_fill_and_passes_gradients_through_them() {
        let drop = Dropout::train(0.4, 0.1, 3, 9, vec![5, 6]);
        let lengths = [3usize, 4];
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 6), &Device::Cpu).unwrap()).unwrap();
        let y = drop.hidden(x.as_tensor(), &lengths, 2).unwrap();
        let mut mask = Vec::new();
        for (r, &len) in lengths.iter().enumerate() {
            drop.fill(&mut mask, r, &[len, 6], 0.4, 2);
        }
        assert!(mask.contains(&0.0) && mask.iter().any(|&m| m > 1.0));
        let mask = Tensor::from_vec(mask, (7, 6), &Device::Cpu).unwrap();
        let expected = x.as_tensor().mul(&mask).unwrap();
        assert!(max_diff(&y, &expected) < 1e-6);
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(max_diff(g.get(x.as_tensor()).unwrap(), &mask) < 1e-6);
    }
}

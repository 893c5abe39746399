//! Dropout with masks that are a pure function of (seed, step, row, site, position), never of
//! the batch a row happens to sit in. So a row gets the same mask whether it is encoded in a
//! micro-batch of 32, of 4 after an OOM, or recomputed by the cached (GradCache) scheme or by
//! gradient checkpointing, and a run with retries ends with the same weights as one without.

use candle_core::{Device, Tensor};

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

    /// x: (tokens, hidden), rows packed as `lengths` says.
    pub fn hidden(&self, x: &Tensor, lengths: &[usize], site: u64) -> Result<Tensor> {
        if !self.on || self.hidden_p == 0.0 {
            return Ok(x.clone());
        }
        let h = x.dim(1)?;
        let mut data = Vec::with_capacity(x.elem_count());
        for (r, &len) in lengths.iter().enumerate() {
            self.fill(&mut data, r, &[len, h], self.hidden_p, site);
        }
        let mask = Tensor::from_vec(data, x.shape(), &Device::Cpu)?;
        Ok(x.mul(&mask.to_device(x.device())?.to_dtype(x.dtype())?)?)
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

    /// Appends row `row`'s mask over `dims` (0 or 1/(1-p)). Each element's draw is keyed by its
    /// coordinates, not its offset, so neither padding nor packing shifts the masks.
    fn fill(&self, out: &mut Vec<f32>, row: usize, dims: &[usize], p: f32, site: u64) {
        let keep = 1.0 / (1.0 - p);
        let row_key = mix(self.step_key ^ mix(self.row_ids[row] ^ mix(site)));
        let inner: usize = dims.iter().product();
        let mut coords = vec![0usize; dims.len()];
        for _ in 0..inner {
            // Coordinates packed into 16 bits each: sequences and widths stay below 65536.
            let pos = coords.iter().fold(0u64, |acc, &c| (acc << 16) | c as u64);
            let u = (mix(row_key ^ pos) >> 40) as f32 / (1u64 << 24) as f32;
            out.push(if u < p { 0.0 } else { keep });
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

/// SplitMix64 finaliser: a cheap, well-mixed hash of one u64.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

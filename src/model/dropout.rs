//! Dropout with masks that are a pure function of (seed, step, row, site, position), never of
//! the batch a row happens to sit in. So a row gets the same mask whether it is encoded in a
//! micro-batch of 32, of 4 after an OOM, or recomputed by the cached (GradCache) scheme, and
//! a run with retries ends with the same weights as one without.

use candle_core::{DType, Tensor};

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

    pub fn is_on(&self) -> bool {
        self.on
    }

    /// x: (batch, seq, hidden).
    pub fn hidden(&self, x: &Tensor, site: u64) -> Result<Tensor> {
        if !self.on || self.hidden_p == 0.0 {
            return Ok(x.clone());
        }
        let (b, s, h) = x.dims3()?;
        let mask = self.mask(b, &[s, h], self.hidden_p, site)?;
        Ok(x.mul(&mask.to_device(x.device())?.to_dtype(x.dtype())?)?)
    }

    /// p: (batch, heads, seq, seq).
    pub fn attention(&self, p: &Tensor, site: u64) -> Result<Tensor> {
        if !self.on || self.attention_p == 0.0 {
            return Ok(p.clone());
        }
        let (b, heads, s, s2) = p.dims4()?;
        let mask = self.mask(b, &[heads, s, s2], self.attention_p, site)?;
        Ok(p.mul(&mask.to_device(p.device())?.to_dtype(p.dtype())?)?)
    }

    /// A (batch, dims...) mask of 0 and 1/(1-p). Each element's draw is keyed by its
    /// coordinates, not its flat offset, so padding length does not shift the masks.
    fn mask(&self, batch: usize, dims: &[usize], p: f32, site: u64) -> Result<Tensor> {
        assert_eq!(
            batch,
            self.row_ids.len(),
            "dropout needs one row id per batch row"
        );
        let keep = 1.0 / (1.0 - p);
        let inner: usize = dims.iter().product();
        let mut data = Vec::with_capacity(batch * inner);
        let mut coords = vec![0usize; dims.len()];
        for &row in &self.row_ids {
            let row_key = mix(self.step_key ^ mix(row ^ mix(site)));
            coords.iter_mut().for_each(|c| *c = 0);
            for _ in 0..inner {
                // Coordinates packed into 16 bits each: sequences and widths stay below 65536.
                let pos = coords.iter().fold(0u64, |acc, &c| (acc << 16) | c as u64);
                let u = (mix(row_key ^ pos) >> 40) as f32 / (1u64 << 24) as f32;
                data.push(if u < p { 0.0 } else { keep });
                for d in (0..dims.len()).rev() {
                    coords[d] += 1;
                    if coords[d] < dims[d] {
                        break;
                    }
                    coords[d] = 0;
                }
            }
        }
        let mut shape = vec![batch];
        shape.extend_from_slice(dims);
        Ok(Tensor::from_vec(data, shape, &candle_core::Device::Cpu)?.to_dtype(DType::F32)?)
    }
}

/// SplitMix64 finaliser: a cheap, well-mixed hash of one u64.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

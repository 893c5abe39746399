//! Dropout with masks that are a pure function of (seed, step, row, site, position), never of
//! the batch a row happens to sit in. So a row gets the same mask whether it is encoded in a
//! micro-batch of 32, of 4 after an OOM, or recomputed by the cached (GradCache) scheme or by
//! gradient checkpointing, and a run with retries ends with the same weights as one without.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::fused::{cpu_rows, read_row};

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
        let mask = Tensor::from_vec(op.values(x.dim(1)?), x.shape(), &Device::Cpu)?;
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

/// A batch's attention-dropout masks at one site, kept as keys: a fused attention kernel
/// regenerates any (row, head) block on demand instead of keeping (heads, len, len) per row.
#[derive(Debug, Clone)]
pub struct AttentionMasks {
    p: f32,
    row_keys: Vec<u64>,
}

impl AttentionMasks {
    /// Writes the (len, len) mask of `row` and `head` into `out`, row-major; the same values
    /// `Dropout::attention` multiplies by.
    pub fn fill_head(&self, row: usize, head: usize, len: usize, out: &mut [f32]) {
        let key = self.row_keys[row];
        for (i, line) in out[..len * len].chunks_mut(len).enumerate() {
            line.fill(1.0);
            scale_by_mask(key ^ pack(&[head, i, 0]), self.p, line);
        }
    }
}

/// Dropout on packed hidden states, (tokens, hidden): the mask of row r at (i, c) is keyed by
/// (row key, i, c), as `Dropout::fill` draws it. Each token's mask is drawn when needed, in
/// the forward pass and again in the backward pass, and never stored.
#[derive(Debug, Clone)]
pub struct HiddenMask {
    p: f32,
    row_keys: Vec<u64>,
    /// Index of each row's first token in the packed batch, and the total after the last.
    starts: Vec<usize>,
}

impl HiddenMask {
    fn new(p: f32, row_keys: Vec<u64>, lengths: &[usize]) -> Self {
        let mut starts = vec![0];
        for len in lengths {
            starts.push(starts.last().unwrap_or(&0) + len);
        }
        Self {
            p,
            row_keys,
            starts,
        }
    }

    pub fn tokens(&self) -> usize {
        self.starts.last().copied().unwrap_or(0)
    }

    /// Token `t`'s mask over `out.len()` features, multiplied into `out`.
    pub fn apply_row(&self, t: usize, out: &mut [f32]) {
        let row = self.starts.partition_point(|&s| s <= t) - 1;
        let (key, i) = (self.row_keys[row], t - self.starts[row]);
        scale_by_mask(key ^ pack(&[i, 0]), self.p, out);
    }

    /// The whole mask, (tokens, width) row-major (devices without the CPU kernel).
    fn values(&self, width: usize) -> Vec<f32> {
        let mut out = vec![1f32; self.tokens() * width];
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(t, row)| self.apply_row(t, row));
        out
    }
}

/// `x ⊙ mask` in `x`'s type. The backward pass applies the same op to the gradient.
impl CustomOp1 for HiddenMask {
    fn name(&self) -> &'static str {
        "st-tune-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (tokens, width) = l.shape().dims2()?;
        if tokens != self.tokens() {
            candle_core::bail!("dropout: {tokens} tokens, the rows hold {}", self.tokens());
        }
        let out = cpu_rows(s.dtype(), tokens * width, width, |t, row| {
            read_row(s, l, t, row)?;
            self.apply_row(t, row);
            Ok(())
        })?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// Coordinates packed into 16 bits each: sequences and widths stay below 65536.
fn pack(coords: &[usize]) -> u64 {
    coords.iter().fold(0u64, |acc, &c| (acc << 16) | c as u64)
}

/// 0 with probability `p`, else 1/(1-p), drawn from `hash(row_key, pos)`.
fn mask_value(row_key: u64, pos: u64, p: f32) -> f32 {
    let u = (mix(row_key ^ pos) >> 40) as f32 / (1u64 << 24) as f32;
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// `out[c] *= mask_value(row_key, pos + c, p)` for every c, where `base = row_key ^ pos` and the
/// last packed coordinate of `pos` is 0 (so `pos + c = pos ^ c`). 16 lanes at a time where the
/// CPU has AVX-512 DQ (64-bit multiplies; detected at run time), else one at a time: the same
/// integer hash and comparison either way, so the masks are identical.
fn scale_by_mask(base: u64, p: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512dq") {
        // SAFETY: the CPU has AVX-512 F and DQ (checked).
        return unsafe { scale_by_mask_avx512(base, p, out) };
    }
    scale_by_mask_lanes(base, p, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn scale_by_mask_avx512(base: u64, p: f32, out: &mut [f32]) {
    scale_by_mask_lanes(base, p, out)
}

#[inline(always)]
fn scale_by_mask_lanes(base: u64, p: f32, out: &mut [f32]) {
    // `mask_value`'s test u < p, with u = h / 2²⁴ for the integer h < 2²⁴, is h < ⌈p·2²⁴⌉
    // (p·2²⁴ is exact in f32): an integer comparison, which vectorises.
    let threshold = (p * (1u64 << 24) as f32).ceil() as u64;
    let keep = 1.0 / (1.0 - p);
    for (c, v) in out.iter_mut().enumerate() {
        let h = mix(base ^ c as u64) >> 40;
        *v *= if h < threshold { 0.0 } else { keep };
    }
}

/// SplitMix64 finaliser: a cheap, well-mixed hash of one u64.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::max_diff;
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

    #[test]
    fn the_vector_mask_equals_mask_value_everywhere() {
        // Odd widths (a short last vector), probabilities whose p·2²⁴ is and is not an integer.
        for p in [0.1f32, 0.25, 0.5, 1e-7] {
            for width in [1usize, 17, 384] {
                let (key, i) = (mix(7), 3usize);
                let mut got = vec![1f32; width];
                scale_by_mask(key ^ pack(&[i, 0]), p, &mut got);
                let want: Vec<f32> = (0..width)
                    .map(|c| mask_value(key, pack(&[i, c]), p))
                    .collect();
                assert_eq!(got, want, "p {p}, width {width}");
                let mut lanes = vec![1f32; width];
                scale_by_mask_lanes(key ^ pack(&[i, 0]), p, &mut lanes);
                assert_eq!(lanes, want, "scalar path, p {p}, width {width}");
            }
        }
    }
}

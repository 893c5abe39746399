//! Dropout masks as a pure function of (row key, position): 0 with probability p, else
//! 1/(1-p). They never depend on the batch a row sits in, so a retried, re-cut or recomputed row
//! sees the same mask on every engine. `model::dropout::Dropout` derives the row keys.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::engine::cpu::features;
use crate::engine::cpu::storage::{cpu_rows, read_row};

/// A batch's attention-dropout masks at one site, kept as keys: a fused attention kernel
/// regenerates any (row, head) block on demand instead of keeping (heads, len, len) per row.
#[derive(Debug, Clone)]
pub struct AttentionMasks {
    pub(crate) p: f32,
    pub(crate) row_keys: Vec<u64>,
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

impl AttentionMasks {
    /// The keys of every line of the padded (rows, heads, L, L) masks, with the number of
    /// columns each keeps (its row's length; 0 on a padded line): the `cuda` dropout kernel's
    /// input, giving [`AttentionMasks::fill_head`]'s values and zeros in the padding.
    pub fn padded_line_bases(
        &self,
        lens: &[usize],
        heads: usize,
        l: usize,
    ) -> (Vec<u64>, Vec<u32>) {
        let lines = lens.len() * heads * l;
        let (mut bases, mut valid) = (Vec::with_capacity(lines), Vec::with_capacity(lines));
        for (r, &len) in lens.iter().enumerate() {
            for h in 0..heads {
                for i in 0..l {
                    bases.push(self.row_keys[r] ^ pack(&[h, i, 0]));
                    valid.push(if i < len { len as u32 } else { 0 });
                }
            }
        }
        (bases, valid)
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
    pub(crate) fn new(p: f32, row_keys: Vec<u64>, lengths: &[usize]) -> Self {
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

    /// Each token's key: its row key xor its packed position; column c's value is drawn from
    /// this xor c (the `cuda` dropout kernel's input).
    pub fn token_bases(&self) -> Vec<u64> {
        (0..self.tokens())
            .map(|t| {
                let row = self.starts.partition_point(|&s| s <= t) - 1;
                self.row_keys[row] ^ pack(&[t - self.starts[row], 0])
            })
            .collect()
    }

    /// The dropout probability.
    pub fn p(&self) -> f32 {
        self.p
    }

    /// The whole mask, (tokens, width) row-major (devices without the CPU kernel).
    pub fn values(&self, width: usize) -> Vec<f32> {
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
pub(crate) fn pack(coords: &[usize]) -> u64 {
    coords.iter().fold(0u64, |acc, &c| (acc << 16) | c as u64)
}

/// 0 with probability `p`, else 1/(1-p), drawn from `hash(row_key, pos)`.
pub(crate) fn mask_value(row_key: u64, pos: u64, p: f32) -> f32 {
    let u = (mix(row_key ^ pos) >> 40) as f32 / (1u64 << 24) as f32;
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// `out[c] *= mask_value(row_key, pos + c, p)` for every c, where `base = row_key ^ pos` and the
/// last packed coordinate of `pos` is 0 (so `pos + c = pos ^ c`). 16 lanes at a time where the
/// CPU has AVX-512 DQ (64-bit multiplies; detected at run time), 4 with AVX2 (each 64-bit
/// multiply from three 32-bit ones), else one at a time: the same integer hash and comparison
/// every way, so the masks are identical.
fn scale_by_mask(base: u64, p: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if features::get().avx512dq {
        // SAFETY: the CPU has AVX-512 F and DQ (checked).
        return unsafe { scale_by_mask_avx512(base, p, out) };
    }
    #[cfg(target_arch = "x86_64")]
    if features::get().avx2 {
        // SAFETY: the CPU has AVX2 (checked).
        return unsafe { scale_by_mask_avx2(base, p, out) };
    }
    scale_by_mask_lanes(base, p, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scale_by_mask_avx2(base: u64, p: f32, out: &mut [f32]) {
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
    let (threshold, keep) = threshold_and_keep(p);
    for (c, v) in out.iter_mut().enumerate() {
        let h = mix(base ^ c as u64) >> 40;
        *v *= if h < threshold { 0.0 } else { keep };
    }
}

/// A draw h < 2²⁴ drops its element when h < threshold; a kept one is scaled by `keep`.
pub fn threshold_and_keep(p: f32) -> (u64, f32) {
    ((p * (1u64 << 24) as f32).ceil() as u64, 1.0 / (1.0 - p))
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
                #[cfg(target_arch = "x86_64")]
                if is_x86_feature_detected!("avx2") {
                    let mut avx2 = vec![1f32; width];
                    // SAFETY: the CPU has AVX2 (checked).
                    unsafe { scale_by_mask_avx2(key ^ pack(&[i, 0]), p, &mut avx2) };
                    assert_eq!(avx2, want, "AVX2 path, p {p}, width {width}");
                }
            }
        }
    }

    /// The `cuda` dropout kernel's formula (kernels.cu, `st_dropout_mask`) over `bases`.
    fn kernel_formula(bases: &[u64], valid: &[u32], width: usize, p: f32) -> Vec<f32> {
        let (threshold, keep) = threshold_and_keep(p);
        let mut out = Vec::new();
        for (&base, &valid) in bases.iter().zip(valid) {
            for c in 0..width as u32 {
                let h = mix(base ^ c as u64) >> 40;
                out.push(if c >= valid || h < threshold {
                    0.0
                } else {
                    keep
                });
            }
        }
        out
    }

    #[test]
    fn the_cuda_kernel_s_inputs_give_the_cpu_masks() {
        let lengths = [5usize, 9, 3];
        let keys: Vec<u64> = (0..3).map(|r| mix(40 + r)).collect();
        let hidden = HiddenMask::new(0.3, keys.clone(), &lengths);
        let width = 37;
        let valid = vec![width as u32; hidden.tokens()];
        let got = kernel_formula(&hidden.token_bases(), &valid, width, 0.3);
        assert_eq!(got, hidden.values(width));
        let (heads, l) = (2, 9);
        let att = AttentionMasks {
            p: 0.3,
            row_keys: keys,
        };
        let (bases, valid) = att.padded_line_bases(&lengths, heads, l);
        let got = kernel_formula(&bases, &valid, l, 0.3);
        let mut block = vec![0f32; l * l];
        for (r, &len) in lengths.iter().enumerate() {
            for h in 0..heads {
                att.fill_head(r, h, len, &mut block);
                for i in 0..l {
                    let line = &got[((r * heads + h) * l + i) * l..][..l];
                    for (j, &v) in line.iter().enumerate() {
                        let want = if i < len && j < len {
                            block[i * len + j]
                        } else {
                            0.0
                        };
                        assert_eq!(v, want, "row {r} head {h} ({i}, {j})");
                    }
                }
            }
        }
        assert!(got.contains(&0.0) && got.iter().any(|&v| v > 1.0));
    }

    /// Nanoseconds per mask value of each path this CPU has (a timing, not a test:
    /// `cargo test --lib mask_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "timing; run with --ignored --nocapture on a quiet machine"]
    fn mask_speed() {
        let mut out = vec![1f32; 384 * 4096];
        let time = |f: &mut dyn FnMut(u64, &mut [f32]), out: &mut [f32]| {
            let t = std::time::Instant::now();
            for (r, row) in out.chunks_mut(384).enumerate() {
                f(mix(r as u64), row);
            }
            t.elapsed().as_nanos() as f64 / out.len() as f64
        };
        let scalar = time(&mut |k, row| scale_by_mask_lanes(k, 0.1, row), &mut out);
        println!("scalar {scalar:.2} ns");
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY (both): each path runs only where the CPU has it (checked).
            if is_x86_feature_detected!("avx2") {
                let t = time(
                    &mut |k, row| unsafe { scale_by_mask_avx2(k, 0.1, row) },
                    &mut out,
                );
                println!("avx2 {t:.2} ns");
            }
            if is_x86_feature_detected!("avx512dq") {
                let t = time(
                    &mut |k, row| unsafe { scale_by_mask_avx512(k, 0.1, row) },
                    &mut out,
                );
                println!("avx512 {t:.2} ns");
            }
        }
    }
}

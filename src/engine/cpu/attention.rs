//! Self-attention over packed rows as one CPU op with its own backward, in the manner of flash
//! attention: the autograd graph keeps only the fused q|k|v projection and the output, and the
//! backward recomputes each row's scores, softmax and dropout mask (masks are functions of
//! their keys, see `dropout.rs`). The composed path in `layers.rs` keeps four
//! (heads, len, len) tensors per row instead, which dominate memory at long sequences.
//!
//! Work is split by head (every row of one head on one thread), so MPNet's bias gradient sums
//! over rows without sharing. A local layer (ModernBERT's sliding window) takes a block of
//! queries at a time with only the keys their windows reach, so its scratch and work grow with
//! the window, not with the row's length squared. Arithmetic is f32; q|k|v and the output may be bf16 or f16.

#[cfg(test)]
use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor,
};
use rayon::prelude::*;

#[cfg(test)]
use super::storage::{cpu_f32, cpu_storage};
use super::vmath;
pub use crate::engine::Attention;
#[cfg(test)]
use crate::error::Result;

#[cfg(test)]
/// qkv: (tokens, 3·hidden), the q, k and v projections side by side; bias: (heads, L, L) f32
/// with L at least the longest row (a row of length n uses its top-left n × n block).
/// Returns (tokens, hidden) in qkv's type.
pub fn attention(qkv: &Tensor, bias: Option<&Tensor>, op: Attention) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    Ok(match bias {
        Some(b) => qkv.apply_op2(&b.contiguous()?, op)?,
        None => qkv.apply_op1(op)?,
    })
}

/// Queries per block of a local layer's banded path.
const BLOCK: usize = 64;

/// A strided read-only matrix inside a slice.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    off: usize,
    /// Row and column strides.
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], off: usize, rs: usize, cs: usize) -> Self {
        Self { data, off, rs, cs }
    }

    fn covers(&self, rows: usize, cols: usize) -> bool {
        rows == 0
            || cols == 0
            || self.off + (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// dst[m×n, row stride dst_rs] = beta · a[m×k] · b[k×n].
fn matmul(
    dst: &mut [f32],
    dst_rs: usize,
    dims: (usize, usize, usize),
    a: View,
    b: View,
    beta: f32,
) {
    gemm_into(dst, dst_rs, dims, a, b, beta, false)
}

/// dst[m×n, row stride dst_rs] += beta · a[m×k] · b[k×n].
fn matmul_add(
    dst: &mut [f32],
    dst_rs: usize,
    dims: (usize, usize, usize),
    a: View,
    b: View,
    beta: f32,
) {
    gemm_into(dst, dst_rs, dims, a, b, beta, true)
}

fn gemm_into(
    dst: &mut [f32],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: View,
    b: View,
    beta: f32,
    add: bool,
) {
    assert!(View::new(dst, 0, dst_rs, 1).covers(m, n) && a.covers(m, k) && b.covers(k, n));
    // SAFETY: the assert above keeps every index gemm touches inside the three slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            add,
            a.data.as_ptr().add(a.off),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr().add(b.off),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Gradients of one head: d q, d k, d v as (tokens, head_dim) each, and d bias (L × L).
struct HeadGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dbias: Vec<f32>,
}

impl Attention {
    fn dims(&self, qkv_len: usize, width: usize) -> (usize, usize, usize) {
        let hidden = width / 3;
        (qkv_len / width, hidden, hidden / self.heads)
    }

    /// Row `r`'s attention probabilities for head `hh` into `p` (len × len), and its dropout
    /// mask into `mask` (when dropout is on).
    #[allow(clippy::too_many_arguments)]
    fn probs(
        &self,
        qkv: &[f32],
        bias: Option<(&[f32], usize)>,
        hh: usize,
        r: usize,
        p: &mut Vec<f32>,
        mask: &mut Vec<f32>,
        hidden: usize,
    ) {
        let (off, len) = self.rows[r];
        let (w, hd) = (3 * hidden, hidden / self.heads);
        p.resize(len * len, 0.0);
        let q = View::new(qkv, off * w + hh * hd, w, 1);
        let kt = View::new(qkv, off * w + hidden + hh * hd, 1, w);
        matmul(p, len, (len, len, hd), q, kt, self.scale);
        if let Some((b, l)) = bias {
            let b = &b[hh * l * l..];
            for (i, line) in p.chunks_mut(len).enumerate() {
                line.iter_mut().zip(&b[i * l..]).for_each(|(v, b)| *v += b);
            }
        }
        for (i, line) in p.chunks_mut(len).enumerate() {
            // Keys outside a local layer's window get probability 0.
            let keys = self.keys(i, len);
            line[..keys.start].fill(0.0);
            line[keys.end..].fill(0.0);
            let line = &mut line[keys];
            let max = line.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum = vmath::exp_shifted_sum(line, max);
            line.iter_mut().for_each(|v| *v /= sum);
        }
        if let Some(m) = &self.masks {
            mask.resize(len * len, 0.0);
            m.fill_head(r, hh, len, mask);
        }
    }

    /// The window when the banded path runs: a local layer without bias or dropout (ModernBERT).
    fn band(&self, bias: Option<(&[f32], usize)>) -> Option<usize> {
        self.window
            .filter(|_| bias.is_none() && self.masks.is_none())
    }

    /// The query blocks of a row of `len` tokens, [a, b), and the keys [lo, hi) their
    /// windows reach.
    fn blocks(&self, window: usize, len: usize) -> impl Iterator<Item = [usize; 4]> {
        (0..len).step_by(BLOCK).map(move |a| {
            let b = (a + BLOCK).min(len);
            [a, b, a.saturating_sub(window), (b + window).min(len)]
        })
    }

    /// The probabilities of queries [a, b) of row `r` over keys [lo, hi), for head `hh`,
    /// into `p` ((b − a) × (hi − lo)); keys outside a query's window get 0.
    fn block_probs(
        &self,
        qkv: &[f32],
        hh: usize,
        r: usize,
        [a, b, lo, hi]: [usize; 4],
        p: &mut Vec<f32>,
        hidden: usize,
    ) {
        let (off, len) = self.rows[r];
        let (w, hd, n) = (3 * hidden, hidden / self.heads, hi - lo);
        p.resize((b - a) * n, 0.0);
        let q = View::new(qkv, (off + a) * w + hh * hd, w, 1);
        let kt = View::new(qkv, (off + lo) * w + hidden + hh * hd, 1, w);
        matmul(p, n, (b - a, n, hd), q, kt, self.scale);
        for (i, line) in p.chunks_mut(n).enumerate() {
            let keys = self.keys(a + i, len);
            let (s, e) = (keys.start - lo, keys.end - lo);
            line[..s].fill(0.0);
            line[e..].fill(0.0);
            let line = &mut line[s..e];
            let max = line.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum = vmath::exp_shifted_sum(line, max);
            line.iter_mut().for_each(|v| *v /= sum);
        }
    }

    /// [`Self::head_forward`] of a local layer, a block of queries at a time: scratch of
    /// BLOCK × (BLOCK + 2·window), whatever the row's length.
    fn head_forward_banded(
        &self,
        qkv: &[f32],
        window: usize,
        hh: usize,
        hidden: usize,
    ) -> Vec<f32> {
        let (tokens, _, hd) = self.dims(qkv.len(), 3 * hidden);
        let w = 3 * hidden;
        let mut out = vec![0f32; tokens * hd];
        let mut p = Vec::new();
        for (r, &(off, len)) in self.rows.iter().enumerate() {
            for block in self.blocks(window, len) {
                let [a, b, lo, hi] = block;
                self.block_probs(qkv, hh, r, block, &mut p, hidden);
                let v = View::new(qkv, (off + lo) * w + 2 * hidden + hh * hd, w, 1);
                let pv = View::new(&p, 0, hi - lo, 1);
                matmul(
                    &mut out[(off + a) * hd..],
                    hd,
                    (b - a, hd, hi - lo),
                    pv,
                    v,
                    1.0,
                );
            }
        }
        out
    }

    /// [`Self::head_backward`] of a local layer, a block of queries at a time.
    fn head_backward_banded(
        &self,
        qkv: &[f32],
        g: &[f32],
        window: usize,
        hh: usize,
        hidden: usize,
    ) -> HeadGrads {
        let (tokens, _, hd) = self.dims(qkv.len(), 3 * hidden);
        let w = 3 * hidden;
        let mut grads = HeadGrads {
            dq: vec![0f32; tokens * hd],
            dk: vec![0f32; tokens * hd],
            dv: vec![0f32; tokens * hd],
            dbias: Vec::new(),
        };
        let (mut p, mut ds) = (Vec::new(), Vec::new());
        for (r, &(off, len)) in self.rows.iter().enumerate() {
            for block in self.blocks(window, len) {
                let [a, b, lo, hi] = block;
                let (m, n) = (b - a, hi - lo);
                self.block_probs(qkv, hh, r, block, &mut p, hidden);
                let go = View::new(g, (off + a) * hidden + hh * hd, hidden, 1);
                let q = View::new(qkv, (off + a) * w + hh * hd, w, 1);
                let k = View::new(qkv, (off + lo) * w + hidden + hh * hd, w, 1);
                let vt = View::new(qkv, (off + lo) * w + 2 * hidden + hh * hd, 1, w);
                // dv[lo..hi] += pᵀ g (key ranges of neighbouring blocks overlap).
                let pt = View::new(&p, 0, 1, n);
                matmul_add(
                    &mut grads.dv[(off + lo) * hd..],
                    hd,
                    (n, hd, m),
                    pt,
                    go,
                    1.0,
                );
                // d p = g vᵀ, then through the softmax (0 outside the window, as p is).
                ds.resize(m * n, 0.0);
                matmul(&mut ds, n, (m, n, hd), go, vt, 1.0);
                for (d, p) in ds.chunks_mut(n).zip(p.chunks(n)) {
                    let dot: f32 = d.iter().zip(p).map(|(d, p)| d * p).sum();
                    d.iter_mut().zip(p).for_each(|(d, p)| *d = p * (*d - dot));
                }
                // dq[a..b] = scale · ds k, dk[lo..hi] += scale · dsᵀ q
                let dsv = View::new(&ds, 0, n, 1);
                matmul(
                    &mut grads.dq[(off + a) * hd..],
                    hd,
                    (m, hd, n),
                    dsv,
                    k,
                    self.scale,
                );
                let dst = View::new(&ds, 0, 1, n);
                matmul_add(
                    &mut grads.dk[(off + lo) * hd..],
                    hd,
                    (n, hd, m),
                    dst,
                    q,
                    self.scale,
                );
            }
        }
        grads
    }

    /// One head's output for every row, (tokens, head_dim).
    fn head_forward(
        &self,
        qkv: &[f32],
        bias: Option<(&[f32], usize)>,
        hh: usize,
        hidden: usize,
    ) -> Vec<f32> {
        if let Some(window) = self.band(bias) {
            return self.head_forward_banded(qkv, window, hh, hidden);
        }
        let (tokens, _, hd) = self.dims(qkv.len(), 3 * hidden);
        let w = 3 * hidden;
        let mut out = vec![0f32; tokens * hd];
        let (mut p, mut mask) = (Vec::new(), Vec::new());
        for (r, &(off, len)) in self.rows.iter().enumerate() {
            self.probs(qkv, bias, hh, r, &mut p, &mut mask, hidden);
            if self.masks.is_some() {
                p.iter_mut().zip(&mask).for_each(|(p, m)| *p *= m);
            }
            let v = View::new(qkv, off * w + 2 * hidden + hh * hd, w, 1);
            matmul(
                &mut out[off * hd..],
                hd,
                (len, hd, len),
                View::new(&p, 0, len, 1),
                v,
                1.0,
            );
        }
        out
    }

    /// One head's gradients from the output gradient `g`, (tokens, hidden).
    fn head_backward(
        &self,
        qkv: &[f32],
        bias: Option<(&[f32], usize)>,
        g: &[f32],
        (hh, hidden): (usize, usize),
        into: Option<(&[u32], Vec<f32>)>,
    ) -> HeadGrads {
        if let Some(window) = self.band(bias) {
            return self.head_backward_banded(qkv, g, window, hh, hidden);
        }
        let (tokens, _, hd) = self.dims(qkv.len(), 3 * hidden);
        let w = 3 * hidden;
        // The bias gradient: (L × L) summed over the rows, or the head's bucket sums continued.
        let (bucket_of, dbias) = match into {
            Some((b, sums)) => (Some(b), sums),
            None => (None, vec![0f32; bias.map_or(0, |(_, l)| l * l)]),
        };
        let mut grads = HeadGrads {
            dq: vec![0f32; tokens * hd],
            dk: vec![0f32; tokens * hd],
            dv: vec![0f32; tokens * hd],
            dbias,
        };
        let (mut p, mut mask, mut pd, mut ds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (r, &(off, len)) in self.rows.iter().enumerate() {
            self.probs(qkv, bias, hh, r, &mut p, &mut mask, hidden);
            let dropped = match self.masks {
                Some(_) => {
                    pd.clear();
                    pd.extend(p.iter().zip(&mask).map(|(p, m)| p * m));
                    &pd
                }
                None => &p,
            };
            let go = View::new(g, off * hidden + hh * hd, hidden, 1);
            let q = View::new(qkv, off * w + hh * hd, w, 1);
            let k = View::new(qkv, off * w + hidden + hh * hd, w, 1);
            let v = View::new(qkv, off * w + 2 * hidden + hh * hd, w, 1);
            // dv = dropped(p)ᵀ g
            let pt = View::new(dropped, 0, 1, len);
            matmul(&mut grads.dv[off * hd..], hd, (len, hd, len), pt, go, 1.0);
            // d dropped(p) = g vᵀ, then through the mask and the softmax.
            ds.resize(len * len, 0.0);
            let vt = View::new(qkv, v.off, 1, w);
            matmul(&mut ds, len, (len, len, hd), go, vt, 1.0);
            if self.masks.is_some() {
                ds.iter_mut().zip(&mask).for_each(|(d, m)| *d *= m);
            }
            for (d, p) in ds.chunks_mut(len).zip(p.chunks(len)) {
                let dot: f32 = d.iter().zip(p).map(|(d, p)| d * p).sum();
                d.iter_mut().zip(p).for_each(|(d, p)| *d = p * (*d - dot));
            }
            match (bias, bucket_of) {
                (Some((_, l)), Some(b)) => add_by_bucket(&mut grads.dbias, &ds, len, b, l),
                (Some((_, l)), None) => {
                    for (i, line) in ds.chunks(len).enumerate() {
                        grads.dbias[i * l..i * l + len]
                            .iter_mut()
                            .zip(line)
                            .for_each(|(b, d)| *b += d);
                    }
                }
                _ => {}
            }
            // dq = scale · ds k, dk = scale · dsᵀ q
            let dsv = View::new(&ds, 0, len, 1);
            matmul(
                &mut grads.dq[off * hd..],
                hd,
                (len, hd, len),
                dsv,
                k,
                self.scale,
            );
            let dst = View::new(&ds, 0, 1, len);
            matmul(
                &mut grads.dk[off * hd..],
                hd,
                (len, hd, len),
                dst,
                q,
                self.scale,
            );
        }
        grads
    }

    /// The output, (tokens, hidden), of q|k|v given as f32 (tokens, `width` = 3·hidden).
    pub(crate) fn forward_cpu(
        &self,
        qkv: &[f32],
        bias: Option<(&[f32], usize)>,
        width: usize,
    ) -> Vec<f32> {
        let (tokens, hidden, hd) = self.dims(qkv.len(), width);
        let per_head: Vec<Vec<f32>> = (0..self.heads)
            .into_par_iter()
            .map(|hh| self.head_forward(qkv, bias, hh, hidden))
            .collect();
        let mut out = vec![0f32; tokens * hidden];
        for (hh, o) in per_head.iter().enumerate() {
            for (t, src) in o.chunks(hd).enumerate() {
                out[t * hidden + hh * hd..][..hd].copy_from_slice(src);
            }
        }
        out
    }

    #[cfg(test)]
    /// (d qkv, d bias) for output gradient `g`.
    fn backward_cpu(
        &self,
        qkv: &Tensor,
        bias: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let flat = |t: &Tensor| {
            t.detach()
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()
        };
        let (q32, g32) = (flat(qkv)?, flat(g)?);
        let b32 = bias.map(flat).transpose()?;
        let l = bias.map(|b| b.dim(1)).transpose()?.unwrap_or(0);
        let b = b32.as_deref().map(|b| (b, l));
        let per_head = self.head_grads(&q32, b, &g32, qkv.dim(1)?);
        // Free the f32 inputs before the output exists: the peak of a layer's backward.
        let tokens = q32.len() / qkv.dim(1)?;
        drop((q32, g32, b32));
        let (dqkv, dbias) = self.assemble(per_head, tokens, qkv.dim(1)?, l);
        let dqkv = Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?.to_dtype(qkv.dtype())?;
        let dbias = match bias {
            Some(b) => Some(Tensor::from_vec(dbias, b.shape(), b.device())?.to_dtype(b.dtype())?),
            None => None,
        };
        Ok((dqkv, dbias))
    }

    /// (d qkv as (tokens, `width`), d bias as (heads, L, L) or empty) from f32 slices.
    pub(crate) fn backward_slices(
        &self,
        qkv: &[f32],
        bias: Option<(&[f32], usize)>,
        g: &[f32],
        width: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let per_head = self.head_grads(qkv, bias, g, width);
        let l = bias.map_or(0, |(_, l)| l);
        self.assemble(per_head, qkv.len() / width, width, l)
    }

    /// d qkv as (tokens, `width`), with the bias gradient added into `sums`, (buckets,
    /// heads) row-major: row after row, each (query, key) score gradient of the row in turn
    /// into the bucket `bucket_of` gives the pair (L × L, row-major). The sums go on where they
    /// stood, so a step's rows cut into any micro-batches sum as the uncut step's. The caller
    /// checks that every bucket is below `sums.len() / heads`.
    pub(crate) fn backward_slices_into(
        &self,
        qkv: &[f32],
        bias: (&[f32], usize),
        bucket_of: &[u32],
        sums: &mut [f32],
        g: &[f32],
        width: usize,
    ) -> Vec<f32> {
        let heads = self.heads;
        let current = &*sums;
        let mut per_head: Vec<HeadGrads> = (0..heads)
            .into_par_iter()
            .map(|hh| {
                let column = current.iter().skip(hh).step_by(heads).copied().collect();
                let into = Some((bucket_of, column));
                self.head_backward(qkv, Some(bias), g, (hh, width / 3), into)
            })
            .collect();
        for (hh, hg) in per_head.iter_mut().enumerate() {
            for (b, v) in std::mem::take(&mut hg.dbias).into_iter().enumerate() {
                sums[b * heads + hh] = v;
            }
        }
        self.assemble(per_head, qkv.len() / width, width, 0).0
    }

    fn head_grads(
        &self,
        qkv: &[f32],
        bias: Option<(&[f32], usize)>,
        g: &[f32],
        width: usize,
    ) -> Vec<HeadGrads> {
        (0..self.heads)
            .into_par_iter()
            .map(|hh| self.head_backward(qkv, bias, g, (hh, width / 3), None))
            .collect()
    }

    /// Every head's gradients side by side: (tokens, width) and (heads, L, L).
    fn assemble(
        &self,
        per_head: Vec<HeadGrads>,
        tokens: usize,
        width: usize,
        l: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (hidden, hd) = (width / 3, width / 3 / self.heads);
        let mut dqkv = vec![0f32; tokens * width];
        let mut dbias = Vec::with_capacity(self.heads * l * l);
        for (hh, hg) in per_head.into_iter().enumerate() {
            for (part, src) in [hg.dq, hg.dk, hg.dv].iter().enumerate() {
                for (t, s) in src.chunks(hd).enumerate() {
                    dqkv[t * width + part * hidden + hh * hd..][..hd].copy_from_slice(s);
                }
            }
            dbias.extend(hg.dbias);
        }
        (dqkv, dbias)
    }

    #[cfg(test)]
    fn fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = "st-tune-attention";
        let (tokens, width) = l.shape().dims2()?;
        if width % 3 != 0 || (width / 3) % self.heads != 0 {
            candle_core::bail!("{name}: width {width} is not 3 × heads × head_dim");
        }
        if let Some(&(off, len)) = self.rows.last() {
            if off + len > tokens {
                candle_core::bail!(
                    "{name}: rows cover {} tokens, the input has {tokens}",
                    off + len
                );
            }
        }
        let qkv = cpu_f32(s, l, name)?;
        let b = match bias {
            Some((bs, bl)) => {
                let (heads, lq, lk) = bl.shape().dims3()?;
                let longest = self.rows.iter().map(|r| r.1).max().unwrap_or(0);
                if heads != self.heads || lq != lk || lq < longest {
                    candle_core::bail!(
                        "{name}: bias {:?} does not cover {} heads × {longest}²",
                        bl.dims(),
                        self.heads
                    );
                }
                Some((cpu_f32(bs, bl, name)?, lq))
            }
            None => None,
        };
        let out = self.forward_cpu(&qkv, b.as_ref().map(|(b, l)| (&b[..], *l)), width);
        Ok((
            cpu_storage(s.dtype(), out)?,
            Shape::from((tokens, width / 3)),
        ))
    }
}

#[cfg(test)]
impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "st-tune-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd(s, l, None)
    }

    fn bwd(&self, qkv: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward_cpu(qkv, None, g)?.0))
    }
}

#[cfg(test)]
impl CustomOp2 for Attention {
    fn name(&self) -> &'static str {
        "st-tune-attention-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.fwd(s1, l1, Some((s2, l2)))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dqkv, dbias) = self.backward_cpu(qkv, Some(bias), g)?;
        Ok((Some(dqkv), dbias))
    }
}

/// Adds a row's score gradients `ds` (len × len) into `sums` by bucket, where `bucket_of`
/// (l × l, l ≥ len) gives each (query, key) pair's bucket, which depends only on key − query:
/// first summed along the diagonals, query after query (a vector add a query, where adding
/// pair after pair into its bucket was a chain of dependent scalar adds), then the diagonals
/// in order into their buckets. A fixed order for the row alone, so a step's rows cut into
/// any micro-batches sum as the uncut step's.
fn add_by_bucket(sums: &mut [f32], ds: &[f32], len: usize, bucket_of: &[u32], l: usize) {
    if len == 0 {
        return;
    }
    // Diagonal `len - 1 + key - query`.
    let mut diagonals = vec![0f32; 2 * len - 1];
    for (i, line) in ds.chunks(len).enumerate() {
        diagonals[len - 1 - i..][..len]
            .iter_mut()
            .zip(line)
            .for_each(|(s, d)| *s += d);
    }
    for (at, v) in diagonals.into_iter().enumerate() {
        let bucket = match at.checked_sub(len - 1) {
            Some(key) => bucket_of[key],
            None => bucket_of[(len - 1 - at) * l],
        };
        sums[bucket as usize] += v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::TokenBatch;
    use crate::model::dropout::Dropout;
    use crate::model::layers::attention_composed;
    use crate::testing::{grads_through, max_diff};
    use candle_core::{Device, Var};

    /// Bucket sums by diagonal equal the pair-by-pair ones to rounding, for a bucket that
    /// depends on key − query only, with the row shorter than the table's side.
    #[test]
    fn bucket_sums_by_diagonal() {
        let (l, len, buckets) = (40, 33, 7);
        let bucket = |q: usize, k: usize| (k as i64 - q as i64).rem_euclid(buckets as i64) as u32;
        let bucket_of: Vec<u32> = (0..l * l).map(|p| bucket(p / l, p % l)).collect();
        let ds: Vec<f32> = (0..len * len)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let start: Vec<f32> = (0..buckets).map(|b| b as f32).collect();
        let mut ours = start.clone();
        add_by_bucket(&mut ours, &ds, len, &bucket_of, l);
        let mut plain: Vec<f64> = start.iter().map(|&v| v as f64).collect();
        for q in 0..len {
            for k in 0..len {
                plain[bucket(q, k) as usize] += ds[q * len + k] as f64;
            }
        }
        for (o, p) in ours.iter().zip(&plain) {
            assert!((*o as f64 - p).abs() < 1e-4, "{o} against {p}");
        }
    }

    /// Three packed rows (5, 3 and 7 tokens), 2 heads of width 4.
    fn setup() -> (TokenBatch, Var, Var, Tensor) {
        let dev = Device::Cpu;
        let rows: Vec<Vec<u32>> = [5u32, 3, 7].iter().map(|&n| (0..n).collect()).collect();
        let rows: Vec<&[u32]> = rows.iter().map(|r| &r[..]).collect();
        let batch = TokenBatch::new(&rows, &dev).unwrap();
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (15, 24), &dev).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 7, 7), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (15, 8), &dev).unwrap();
        (batch, qkv, bias, probe)
    }

    fn op(batch: &TokenBatch, drop: &Dropout, site: u64) -> Attention {
        Attention {
            heads: 2,
            scale: 0.5,
            rows: batch.rows().collect(),
            masks: drop.attention_masks(site),
            window: None,
        }
    }

    #[test]
    fn fused_attention_matches_the_composed_one_with_bias_and_dropout() {
        let (batch, qkv, bias, probe) = setup();
        let drop = Dropout::train(0.1, 0.3, 7, 3, vec![11, 12, 13]);
        let fused = attention(
            qkv.as_tensor(),
            Some(bias.as_tensor()),
            op(&batch, &drop, 4),
        )
        .unwrap();
        let composed =
            attention_composed(qkv.as_tensor(), &batch, Some(bias.as_tensor()), &drop, 4, 2)
                .unwrap();
        assert!(max_diff(&fused, &composed) < 1e-5);
        let gf = grads_through(&fused, &probe);
        let gc = grads_through(&composed, &probe);
        for v in [&qkv, &bias] {
            let (a, b) = (
                gf.get(v.as_tensor()).unwrap(),
                gc.get(v.as_tensor()).unwrap(),
            );
            assert!(
                b.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 1e-3
            );
            assert!(
                max_diff(a, b) < 1e-5,
                "gradient differs by {}",
                max_diff(a, b)
            );
        }
    }

    #[test]
    fn fused_attention_without_bias_or_dropout_matches_the_composed_one() {
        let (batch, qkv, _, probe) = setup();
        let drop = Dropout::off();
        let fused = attention(qkv.as_tensor(), None, op(&batch, &drop, 1)).unwrap();
        let composed = attention_composed(qkv.as_tensor(), &batch, None, &drop, 1, 2).unwrap();
        assert!(max_diff(&fused, &composed) < 1e-5);
        let gf = grads_through(&fused, &probe);
        let gc = grads_through(&composed, &probe);
        assert!(
            max_diff(
                gf.get(qkv.as_tensor()).unwrap(),
                gc.get(qkv.as_tensor()).unwrap()
            ) < 1e-5
        );
    }

    #[test]
    fn bf16_attention_keeps_bf16_and_stays_close_to_f32() {
        let (batch, qkv, bias, _) = setup();
        let drop = Dropout::off();
        let half = qkv.as_tensor().to_dtype(DType::BF16).unwrap();
        let out = attention(&half, Some(bias.as_tensor()), op(&batch, &drop, 1)).unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        let reference = attention(
            qkv.as_tensor(),
            Some(bias.as_tensor()),
            op(&batch, &drop, 1),
        )
        .unwrap();
        assert!(max_diff(&out, &reference) < 0.05);
    }

    #[test]
    fn a_local_layer_s_banded_blocks_equal_the_masked_full_scores() {
        // Rows of several query blocks (150 = 64 + 64 + 22), one and a short one; window 20.
        let dev = Device::Cpu;
        let rows: Vec<Vec<u32>> = [150u32, 70, 5].iter().map(|&n| (0..n).collect()).collect();
        let rows: Vec<&[u32]> = rows.iter().map(|r| &r[..]).collect();
        let batch = TokenBatch::new(&rows, &dev).unwrap();
        let qkv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (225, 24), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (225, 8), &dev).unwrap();
        let mut local = op(&batch, &Dropout::off(), 1);
        local.window = Some(20);
        // A zero bias sends the same window through the full L × L path, which masks it.
        let zeros = Tensor::zeros((2, 150, 150), DType::F32, &dev).unwrap();
        let banded = attention(qkv.as_tensor(), None, local.clone()).unwrap();
        let full = attention(qkv.as_tensor(), Some(&zeros), local.clone()).unwrap();
        assert!(
            max_diff(&banded, &full) < 1e-5,
            "{}",
            max_diff(&banded, &full)
        );
        let global = Attention {
            window: None,
            ..local
        };
        let everywhere = attention(qkv.as_tensor(), None, global).unwrap();
        assert!(max_diff(&everywhere, &banded) > 1e-2);
        let (gb, gf) = (grads_through(&banded, &probe), grads_through(&full, &probe));
        let (a, b) = (
            gb.get(qkv.as_tensor()).unwrap(),
            gf.get(qkv.as_tensor()).unwrap(),
        );
        assert!(
            max_diff(a, b) < 1e-5,
            "gradients differ by {}",
            max_diff(a, b)
        );
    }

    #[test]
    fn a_bias_smaller_than_the_longest_row_is_an_error() {
        let (batch, qkv, _, _) = setup();
        let small = Tensor::zeros((2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(attention(
            qkv.as_tensor(),
            Some(&small),
            op(&batch, &Dropout::off(), 1)
        )
        .is_err());
    }
}

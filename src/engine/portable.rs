//! The primitives as candle tensor ops only: on a GPU that is cuBLAS for the products and
//! candle's own kernels for the rest, including its fused `layer_norm` and `softmax_last_dim`
//! forwards (they record no backward, and need none here: every backward is written out). On
//! CPU it runs in tests against the CPU kernels, and `ST_TUNE_ENGINE=portable` trains through it.
//!
//! Attention pads the packed rows into one (rows, heads, L, L) batch so that each step is one
//! launch, not one per row; padded keys are masked out and padded queries dropped. A local
//! (sliding-window) layer cuts the queries into blocks, each against only the keys its window
//! reaches, still one launch a step: (rows, heads, L, 2·window) scores, not L × L. Nothing of
//! it is kept: the backward pass recomputes the probabilities. Dropout masks are drawn from the
//! same keys as the CPU's, so both engines drop the same elements: on the host, or on a CUDA
//! device by st-tune's kernel, which with the layer-norm backward is the `cuda` part here.

use candle_core::{DType, Device, Tensor, D};

use crate::engine::launches;
use crate::engine::mask::{AttentionMasks, HiddenMask};
use crate::engine::rotary::Rotary;
use crate::engine::{Attention, LinearGrads, NormGrads, Primitives};
use crate::error::Result;

/// The portable engine, for activations stored as `dtype`.
pub struct Portable {
    pub dtype: DType,
}

fn f32(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?)
}

/// The mask of `m` as a (tokens, width) tensor on `device`, f32: st-tune's kernel on CUDA,
/// drawn on the host elsewhere.
pub fn mask_tensor(m: &HiddenMask, width: usize, device: &Device) -> Result<Tensor> {
    launches::planned_kernel(|| {
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            let valid = vec![width as u32; m.tokens()];
            let shape = (m.tokens(), width);
            return super::cuda::dropout_mask(
                device,
                &m.token_bases(),
                &valid,
                width,
                m.p(),
                shape,
            );
        }
        let v = m.values(width);
        Ok(Tensor::from_vec(v, (m.tokens(), width), &Device::Cpu)?.to_device(device)?)
    })
}

/// The packed rows of a batch laid out as (rows, L) padded slots.
struct Padding {
    rows: usize,
    len: usize,
    /// For each padded slot, its packed token, or `tokens` (a zero row) for padding.
    gather: Tensor,
    /// For each packed token, its padded slot.
    scatter: Tensor,
}

impl Padding {
    /// `att`'s rows padded to `len` slots each (at least the longest row).
    fn new(att: &Attention, len: usize, device: &Device) -> Result<Self> {
        let rows = att.rows.len();
        let tokens: usize = att.rows.iter().map(|&(_, l)| l).sum();
        let mut gather = vec![tokens as u32; rows * len];
        let mut scatter = Vec::with_capacity(tokens);
        for (r, &(off, l)) in att.rows.iter().enumerate() {
            for i in 0..l {
                gather[r * len + i] = (off + i) as u32;
                scatter.push((r * len + i) as u32);
            }
        }
        Ok(Self {
            rows,
            len,
            gather: Tensor::from_vec(gather, rows * len, device)?,
            scatter: Tensor::from_vec(scatter, tokens, device)?,
        })
    }

    /// (tokens, w) -> (rows, L, w), zeros in the padding.
    fn pad(&self, x: &Tensor) -> Result<Tensor> {
        let zero = Tensor::zeros((1, x.dim(1)?), x.dtype(), x.device())?;
        let x = Tensor::cat(&[x, &zero], 0)?;
        Ok(x.index_select(&self.gather, 0)?
            .reshape((self.rows, self.len, ()))?)
    }

    /// (rows, L, w) -> (tokens, w), padding dropped.
    fn unpad(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.reshape((self.rows * self.len, ()))?;
        Ok(x.index_select(&self.scatter, 0)?)
    }

    /// The dropout masks of every (row, head), (rows, heads, L, L); None when off.
    fn dropout(&self, att: &Attention, device: &Device) -> Result<Option<Tensor>> {
        let Some(masks) = &att.masks else {
            return Ok(None);
        };
        launches::planned_kernel(|| self.draw_dropout(att, masks, device).map(Some))
    }

    fn draw_dropout(
        &self,
        att: &Attention,
        masks: &AttentionMasks,
        device: &Device,
    ) -> Result<Tensor> {
        let (l, heads) = (self.len, att.heads);
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            let lens: Vec<usize> = att.rows.iter().map(|&(_, len)| len).collect();
            let (bases, valid) = masks.padded_line_bases(&lens, heads, l);
            let shape = (self.rows, heads, l, l);
            return super::cuda::dropout_mask(device, &bases, &valid, l, masks.p, shape);
        }
        let mut v = vec![0f32; self.rows * heads * l * l];
        let mut block = vec![0f32; l * l];
        for (r, &(_, len)) in att.rows.iter().enumerate() {
            for h in 0..heads {
                masks.fill_head(r, h, len, &mut block);
                let at = (r * heads + h) * l * l;
                for i in 0..len {
                    v[at + i * l..at + i * l + len].copy_from_slice(&block[i * len..(i + 1) * len]);
                }
            }
        }
        Ok(Tensor::from_vec(v, (self.rows, heads, l, l), &Device::Cpu)?.to_device(device)?)
    }
}

/// (d s, d weight, d bias) of `layer_norm(s)` (f32, (tokens, width)) from its output
/// gradient `g` (f32): the normalised sum is recomputed from `s`.
pub fn layer_norm_backward(s: &Tensor, w: &Tensor, eps: f32, g: &Tensor) -> Result<NormGrads> {
    #[cfg(feature = "cuda")]
    if s.device().is_cuda() {
        return super::cuda::layer_norm_backward(s, w, eps, g);
    }
    let centred = s.broadcast_sub(&s.mean_keepdim(D::Minus1)?)?;
    let rstd = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?
        .sqrt()?
        .recip()?;
    let xhat = centred.broadcast_mul(&rstd)?;
    let dw = (g * &xhat)?.sum(0)?;
    let db = g.sum(0)?;
    let dxhat = g.broadcast_mul(w)?;
    let mean_d = dxhat.mean_keepdim(D::Minus1)?;
    let mean_dx = (&dxhat * &xhat)?.mean_keepdim(D::Minus1)?;
    let ds = dxhat
        .broadcast_sub(&mean_d)?
        .sub(&xhat.broadcast_mul(&mean_dx)?)?
        .broadcast_mul(&rstd)?;
    Ok((ds, dw, db))
}

/// The attention-dropout masks of `att`'s rows, padded to (rows, heads, L, L) with zeros beyond
/// each row's length, on `device`; None when attention dropout is off.
pub fn attention_mask_tensor(att: &Attention, device: &Device) -> Result<Option<Tensor>> {
    let longest = att.rows.iter().map(|&(_, l)| l).max().unwrap_or(0);
    Padding::new(att, longest, device)?.dropout(att, device)
}

/// q, k and v of a padded q|k|v, each (rows, heads, L, head_dim), f32.
fn split_heads(qkv: &Tensor, heads: usize) -> Result<[Tensor; 3]> {
    let (rows, len, w) = qkv.dims3()?;
    let h = w / 3;
    let part = |i: usize| -> Result<Tensor> {
        Ok(f32(&qkv.narrow(2, i * h, h)?)?
            .reshape((rows, len, heads, h / heads))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    Ok([part(0)?, part(1)?, part(2)?])
}

/// (rows, heads, L, head_dim) -> (rows, L, hidden).
fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (rows, heads, len, hd) = x.dims4()?;
    Ok(x.transpose(1, 2)?.reshape((rows, len, heads * hd))?)
}

/// Added to a score where a query must not see a key: its probability becomes 0.
const HIDDEN: f32 = -1e30;

/// How the queries of a padded batch meet its keys: in `blocks` blocks of `block` queries, each
/// against the `span` keys it may see. A global layer (or one with a bias or attention dropout)
/// is one block of every query against every key; a local layer's blocks see only the keys
/// their windows reach, so its scores are (rows, heads, L, span), not (rows, heads, L, L).
struct Tiles {
    heads: usize,
    blocks: usize,
    block: usize,
    span: usize,
    /// The padded slot of each block's keys, (blocks · span); None for the one block of all.
    keys: Option<Tensor>,
    /// Added to the scores, each broadcast to (rows, heads, blocks, block, span): padded keys,
    /// keys outside the window, a bias.
    masks: Vec<Tensor>,
}

impl Tiles {
    fn new(att: &Attention, bias: Option<&Tensor>, device: &Device) -> Result<Self> {
        let longest = att.rows.iter().map(|&(_, l)| l).max().unwrap_or(0);
        let band = att.window.filter(|_| bias.is_none() && att.masks.is_none());
        match band.and_then(|w| local_tiles(w, longest)) {
            Some((block, span)) => Self::local(att, block, span, longest, device),
            None => Self::whole(att, bias, longest, device),
        }
    }

    /// Padded slots per row.
    fn len(&self) -> usize {
        self.blocks * self.block
    }

    /// One block: every query against every key of the longest row's length.
    fn whole(att: &Attention, bias: Option<&Tensor>, len: usize, device: &Device) -> Result<Self> {
        let rows = att.rows.len();
        let mut padding = vec![HIDDEN; rows * len];
        for (r, &(_, l)) in att.rows.iter().enumerate() {
            padding[r * len..r * len + l].fill(0.0);
        }
        let mut masks = vec![Tensor::from_vec(padding, (rows, 1, 1, 1, len), device)?];
        if att.window.is_some() {
            let mut band = vec![HIDDEN; len * len];
            for i in 0..len {
                band[i * len..(i + 1) * len][att.keys(i, len)].fill(0.0);
            }
            masks.push(Tensor::from_vec(band, (1, 1, 1, len, len), device)?);
        }
        if let Some(b) = bias {
            let b = f32(&b.narrow(1, 0, len)?.narrow(2, 0, len)?)?;
            masks.push(b.reshape((1, att.heads, 1, len, len))?);
        }
        Ok(Self {
            heads: att.heads,
            blocks: 1,
            block: len,
            span: len,
            keys: None,
            masks,
        })
    }

    /// Blocks of `block` queries; block b sees the keys from `b · block − window` on, `span` of
    /// them. One mask per row hides the keys outside each query's window and row.
    fn local(
        att: &Attention,
        block: usize,
        span: usize,
        longest: usize,
        device: &Device,
    ) -> Result<Self> {
        let (rows, blocks) = (att.rows.len(), longest.div_ceil(block));
        let reach = (span - block) / 2;
        let last = blocks * block - 1;
        // A key slot before the row or past its padding only ever gets probability 0.
        let first = |b: usize| (b * block) as isize - reach as isize;
        let keys: Vec<u32> = (0..blocks)
            .flat_map(|b| {
                (0..span).map(move |c| (first(b) + c as isize).clamp(0, last as isize) as u32)
            })
            .collect();
        let mut mask = vec![HIDDEN; rows * blocks * block * span];
        for (r, &(_, len)) in att.rows.iter().enumerate() {
            for i in 0..len {
                let (b, at) = (i / block, (r * blocks * block + i) * span);
                for j in att.keys(i, len) {
                    mask[at + (j as isize - first(b)) as usize] = 0.0;
                }
            }
        }
        Ok(Self {
            heads: att.heads,
            blocks,
            block,
            span,
            keys: Some(Tensor::from_vec(keys, blocks * span, device)?),
            masks: vec![Tensor::from_vec(
                mask,
                (rows, 1, blocks, block, span),
                device,
            )?],
        })
    }

    /// (rows, heads, L, hd) -> the queries of each block, (rows, heads · blocks, block, hd).
    fn queries(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, _, _, hd) = x.dims4()?;
        Ok(x.reshape((rows, self.heads * self.blocks, self.block, hd))?)
    }

    /// The inverse of [`Tiles::queries`].
    fn untile_queries(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, _, _, hd) = x.dims4()?;
        Ok(x.reshape((rows, self.heads, self.len(), hd))?)
    }

    /// (rows, heads, L, hd) -> the keys each block sees, (rows, heads · blocks, span, hd).
    fn keys(&self, x: &Tensor) -> Result<Tensor> {
        let Some(keys) = &self.keys else {
            return Ok(x.clone());
        };
        let (rows, _, _, hd) = x.dims4()?;
        let x = x.index_select(keys, 2)?;
        Ok(x.reshape((rows, self.heads * self.blocks, self.span, hd))?)
    }

    /// The gradient of [`Tiles::keys`]: each block's key gradients added into their slots.
    fn untile_keys(&self, g: &Tensor) -> Result<Tensor> {
        let Some(keys) = &self.keys else {
            return Ok(g.clone());
        };
        let (rows, _, _, hd) = g.dims4()?;
        let g = g.reshape((rows, self.heads, self.blocks * self.span, hd))?;
        let zeros = Tensor::zeros((rows, self.heads, self.len(), hd), g.dtype(), g.device())?;
        Ok(zeros.index_add(keys, &g, 2)?)
    }

    /// Softmax over each query's keys of `scores`, (rows, heads · blocks, block, span), with
    /// the masks added.
    fn softmax(&self, scores: Tensor) -> Result<Tensor> {
        let shape = scores.dims().to_vec();
        let rows = shape[0];
        let mut scores = scores.reshape((rows, self.heads, self.blocks, self.block, self.span))?;
        for m in &self.masks {
            scores = scores.broadcast_add(m)?;
        }
        Ok(candle_nn::ops::softmax_last_dim(&scores)?.reshape(shape)?)
    }
}

/// A local layer's (queries a block, keys a block) for rows of up to `len` tokens that see
/// `window` keys either side; None where one (L, L) block is no larger. A block is the whole
/// window (2 · window queries) and sees twice that: the keys it holds beside the queries' own
/// are half its scores, while the number of blocks (and the gathered copy of the keys, span /
/// block times their size) stays small.
pub fn local_tiles(window: usize, len: usize) -> Option<(usize, usize)> {
    let block = (2 * window).max(1);
    let span = block + 2 * window;
    (len.div_ceil(block) * block * span < len * len).then_some((block, span))
}

/// The operands of one padded batch laid out for `tiles`, f32: q (rows, heads · blocks, block,
/// head_dim), k and v (rows, heads · blocks, span, head_dim).
struct Operands {
    q: Tensor,
    k: Tensor,
    v: Tensor,
}

/// The padding, tiles, operands and softmax probabilities (rows, heads · blocks, block, span)
/// of `att` over q|k|v.
fn probabilities(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    att: &Attention,
) -> Result<(Padding, Tiles, Operands, Tensor)> {
    let tiles = Tiles::new(att, bias, qkv.device())?;
    let pad = Padding::new(att, tiles.len(), qkv.device())?;
    let [q, k, v] = split_heads(&pad.pad(qkv)?, att.heads)?;
    let ops = Operands {
        q: tiles.queries(&q)?,
        k: tiles.keys(&k)?,
        v: tiles.keys(&v)?,
    };
    let scores = (ops.q.matmul(&ops.k.t()?)? * att.scale as f64)?;
    let p = tiles.softmax(scores)?;
    Ok((pad, tiles, ops, p))
}

impl Primitives for Portable {
    fn dtype(&self) -> DType {
        self.dtype
    }

    fn linear(&self, x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
        let dt = self.dtype;
        let y = x
            .to_dtype(dt)?
            .matmul(&w.to_dtype(dt)?.t()?)?
            .broadcast_add(&b.to_dtype(dt)?)?;
        Ok(y)
    }

    fn linear_backward(&self, dy: &Tensor, x: &Tensor, w: &Tensor) -> Result<LinearGrads> {
        let dt = self.dtype;
        let dyt = dy.to_dtype(dt)?;
        let dw = f32(&dyt.t()?.matmul(&x.to_dtype(dt)?)?)?;
        let db = f32(dy)?.sum(0)?;
        let dx = f32(&dyt.matmul(&w.to_dtype(dt)?)?)?;
        Ok((dx, dw, db))
    }

    fn gelu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(f32(x)?.gelu_erf()?.to_dtype(self.dtype)?)
    }

    fn gelu_backward(&self, x: &Tensor, d: &Tensor) -> Result<Tensor> {
        // gelu'(x) = Φ(x) + x φ(x).
        // One (tokens, intermediate) temporary at a time: each step replaces its input, where a
        // chained expression would keep every intermediate alive to the statement's end (this
        // was the portable engine's peak of a MiniLM step).
        let x = f32(x)?;
        let mut cdf = x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?;
        cdf = cdf.erf()?;
        cdf = ((cdf + 1.0)? * 0.5)?;
        let mut pdf = x.sqr()?;
        pdf = pdf.affine(-0.5, 0.0)?;
        pdf = pdf.exp()?;
        pdf = (pdf * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
        pdf = (x * pdf)?;
        let slope = (cdf + pdf)?;
        Ok((slope * f32(d)?)?)
    }

    fn add_norm(
        &self,
        x: &Tensor,
        y: &Tensor,
        mask: Option<&HiddenMask>,
        (w, b): (&Tensor, &Tensor),
        eps: f32,
    ) -> Result<Tensor> {
        let s = (f32(x)? + self.masked(y, mask)?)?;
        Ok(candle_nn::ops::layer_norm(&s, w, b, eps)?.to_dtype(self.dtype)?)
    }

    fn add_norm_backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        mask: Option<&HiddenMask>,
        w: &Tensor,
        eps: f32,
        g: &Tensor,
    ) -> Result<NormGrads> {
        let s = (f32(x)? + self.masked(y, mask)?)?;
        let g = f32(g)?;
        launches::planned_kernel(|| layer_norm_backward(&s, w, eps, &g))
    }

    fn masked(&self, g: &Tensor, mask: Option<&HiddenMask>) -> Result<Tensor> {
        let g = f32(g)?;
        Ok(match mask {
            Some(m) => (&g * mask_tensor(m, g.dim(1)?, g.device())?)?,
            None => g,
        })
    }

    fn attention(&self, qkv: &Tensor, bias: Option<&Tensor>, att: &Attention) -> Result<Tensor> {
        let (pad, tiles, ops, mut p) = probabilities(qkv, bias, att)?;
        if let Some(m) = pad.dropout(att, qkv.device())? {
            p = (p * m)?;
        }
        let ctx = merge_heads(&tiles.untile_queries(&p.matmul(&ops.v)?)?)?;
        Ok(pad.unpad(&ctx)?.to_dtype(self.dtype)?)
    }

    fn attention_backward(
        &self,
        qkv: &Tensor,
        bias: Option<&Tensor>,
        att: &Attention,
        d: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (pad, tiles, Operands { q, k, v }, p) = probabilities(qkv, bias, att)?;
        let hd = q.dim(3)?;
        let d = pad
            .pad(&f32(d)?)?
            .reshape((pad.rows, pad.len, att.heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let d = tiles.queries(&d)?;
        // At most three score-sized tensors are alive at once below: each is dropped as soon
        // as it is used, never left to a statement's or the function's end.
        let mask = pad.dropout(att, qkv.device())?;
        let dropped = match &mask {
            Some(m) => (&p * m)?,
            None => p.clone(),
        };
        let dv = tiles.untile_keys(&dropped.t()?.matmul(&d)?)?;
        drop(dropped);
        let mut dp = d.matmul(&v.t()?)?;
        if let Some(m) = mask {
            dp = (dp * m)?;
        }
        // Softmax: d scores = p ⊙ (d p − Σ d p ⊙ p).
        let row_sums = (&dp * &p)?.sum_keepdim(D::Minus1)?;
        dp = dp.broadcast_sub(&row_sums)?;
        let ds = (&p * dp)?;
        drop(p);
        let dbias = match bias {
            // A bias comes only with the one block of (L, L) scores.
            Some(b) => {
                let (_, l, _) = b.dims3()?;
                let sum = ds.sum(0)?;
                let sum =
                    sum.pad_with_zeros(1, 0, l - pad.len)?
                        .pad_with_zeros(2, 0, l - pad.len)?;
                Some(sum.to_dtype(b.dtype())?)
            }
            None => None,
        };
        let dq = tiles.untile_queries(&(ds.matmul(&k)? * att.scale as f64)?)?;
        let dk = tiles.untile_keys(&(ds.t()?.matmul(&q)? * att.scale as f64)?)?;
        let dqkv = Tensor::cat(
            &[merge_heads(&dq)?, merge_heads(&dk)?, merge_heads(&dv)?],
            2,
        )?;
        Ok((pad.unpad(&dqkv)?, dbias))
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        Ok((f32(a)? + f32(b)?)?)
    }

    fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        Ok(t.to_dtype(dtype)?)
    }

    fn norm(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f32) -> Result<Tensor> {
        let zero;
        let b = match b {
            Some(b) => b,
            None => {
                zero = w.zeros_like()?;
                &zero
            }
        };
        Ok(candle_nn::ops::layer_norm(&f32(x)?, w, b, eps)?.to_dtype(self.dtype)?)
    }

    fn norm_backward(&self, x: &Tensor, w: &Tensor, eps: f32, g: &Tensor) -> Result<NormGrads> {
        // `add_norm_backward` of x + 0.
        let zero = x.zeros_like()?;
        self.add_norm_backward(x, &zero, None, w, eps, g)
    }

    fn rotary(&self, qkv: &Tensor, rope: &Rotary) -> Result<Tensor> {
        Ok(rotate(&f32(qkv)?, rope, 1.0)?.to_dtype(self.dtype)?)
    }

    fn rotary_backward(&self, d: &Tensor, rope: &Rotary) -> Result<Tensor> {
        rotate(&f32(d)?, rope, -1.0)
    }

    fn geglu(&self, h: &Tensor) -> Result<Tensor> {
        let h = f32(h)?;
        let i = h.dim(1)? / 2;
        let act = (h.narrow(1, 0, i)?.gelu_erf()? * h.narrow(1, i, i)?)?;
        Ok(act.to_dtype(self.dtype)?)
    }

    fn geglu_backward(&self, h: &Tensor, d: &Tensor) -> Result<Tensor> {
        let h = f32(h)?;
        let i = h.dim(1)? / 2;
        let (input, gate, d) = (h.narrow(1, 0, i)?, h.narrow(1, i, i)?, f32(d)?);
        let d_input = self.gelu_backward(&input, &(&d * &gate)?)?;
        let d_gate = (d * input.gelu_erf()?)?;
        Ok(Tensor::cat(&[d_input, d_gate], 1)?)
    }
}

/// q and k of q|k|v (tokens, 3·hidden, f32) rotated by `sign` times their angles, as
/// transformers does: `x cos + rotate_half(x) sin` per head.
fn rotate(x: &Tensor, rope: &Rotary, sign: f64) -> Result<Tensor> {
    let (tokens, w) = x.dims2()?;
    let hidden = w / 3;
    let (heads, half) = (rope.heads, hidden / rope.heads / 2);
    // (tokens, 2·heads, 2, half): q's and k's heads, each as its two halves.
    let qk = x
        .narrow(1, 0, 2 * hidden)?
        .reshape((tokens, 2 * heads, 2, half))?;
    let (x1, x2) = (qk.narrow(2, 0, 1)?, qk.narrow(2, 1, 1)?);
    let cos = rope.cos.reshape((tokens, 1, 1, half))?;
    let sin = (rope.sin.reshape((tokens, 1, 1, half))? * sign)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    let qk = Tensor::cat(&[r1, r2], 2)?.reshape((tokens, 2 * hidden))?;
    Ok(Tensor::cat(&[&qk, &x.narrow(1, 2 * hidden, hidden)?], 1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::plan::local_scores;
    use crate::testing::{max_abs, max_diff};

    /// Rows of 150 (several blocks and a short last one), 70 and 5 tokens, 2 heads of width 4,
    /// window 20: q|k|v and an output gradient, random.
    fn local_case() -> (Attention, Tensor, Tensor) {
        let (dev, lens) = (Device::Cpu, [150usize, 70, 5]);
        let rows = lens.iter().scan(0, |off, &l| {
            *off += l;
            Some((*off - l, l))
        });
        let att = Attention {
            heads: 2,
            scale: 0.5,
            rows: rows.collect(),
            masks: None,
            window: Some(20),
        };
        let qkv = Tensor::randn(0f32, 1.0, (225, 24), &dev).unwrap();
        let d = Tensor::randn(0f32, 1.0, (225, 8), &dev).unwrap();
        (att, qkv, d)
    }

    #[test]
    fn a_local_layer_s_blocks_equal_the_masked_full_scores_forward_and_backward() {
        let (att, qkv, d) = local_case();
        let engine = Portable { dtype: DType::F32 };
        // The window is cut into blocks here (4 of 40 queries, 80 keys each) ...
        assert_eq!(local_tiles(20, 150), Some((40, 80)));
        // ... while a zero bias sends the same window through the one (L, L) block, masked.
        let zeros = Tensor::zeros((2, 150, 150), DType::F32, &Device::Cpu).unwrap();
        let tiled = engine.attention(&qkv, None, &att).unwrap();
        let full = engine.attention(&qkv, Some(&zeros), &att).unwrap();
        assert!(
            max_diff(&tiled, &full) < 1e-5,
            "{}",
            max_diff(&tiled, &full)
        );
        let global = Attention {
            window: None,
            ..att.clone()
        };
        let everywhere = engine.attention(&qkv, None, &global).unwrap();
        assert!(max_diff(&everywhere, &tiled) > 1e-2);
        let (dt, _) = engine.attention_backward(&qkv, None, &att, &d).unwrap();
        let (df, _) = engine
            .attention_backward(&qkv, Some(&zeros), &att, &d)
            .unwrap();
        assert!(max_abs(&df) > 1e-2);
        assert!(
            max_diff(&dt, &df) < 1e-5,
            "gradients differ by {}",
            max_diff(&dt, &df)
        );
    }

    #[test]
    fn local_blocks_run_only_where_they_are_smaller_than_the_full_scores() {
        // ModernBERT's window (64 either side): blocks of 128 queries, 256 keys each.
        assert_eq!(local_tiles(64, 256), None);
        assert_eq!(local_tiles(64, 8192), Some((128, 256)));
        assert_eq!(local_tiles(0, 10), Some((1, 1)));
    }

    #[test]
    fn the_planner_counts_the_scores_the_local_blocks_hold() {
        for window in [0, 3, 20, 64] {
            for len in [1, 5, 40, 127, 128, 300, 1000] {
                let held = match local_tiles(window, len) {
                    Some((block, span)) => len.div_ceil(block) * block * span,
                    None => len * len,
                };
                assert_eq!(local_scores(window as u64, len as u64), held as u64);
            }
        }
    }
}

//! The primitives as candle tensor ops only: on a GPU that is cuBLAS for the products and
//! candle's own kernels for the rest, including its fused `layer_norm` and `softmax_last_dim`
//! forwards (they record no backward, and need none here: every backward is written out). On
//! CPU it runs in tests against the CPU kernels, and `ST_TUNE_ENGINE=portable` trains through it.
//!
//! Attention pads the packed rows into one (rows, heads, L, L) batch so that each step is one
//! launch, not one per row; padded keys are masked out and padded queries dropped. Nothing of
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
    /// 0 for a real key, a large negative number for padding: (rows, 1, 1, L).
    key_mask: Tensor,
}

impl Padding {
    fn new(att: &Attention, device: &Device) -> Result<Self> {
        let rows = att.rows.len();
        let len = att.rows.iter().map(|&(_, l)| l).max().unwrap_or(0);
        let tokens: usize = att.rows.iter().map(|&(_, l)| l).sum();
        let mut gather = vec![tokens as u32; rows * len];
        let mut scatter = Vec::with_capacity(tokens);
        let mut key_mask = vec![-1e30f32; rows * len];
        for (r, &(off, l)) in att.rows.iter().enumerate() {
            for i in 0..l {
                gather[r * len + i] = (off + i) as u32;
                scatter.push((r * len + i) as u32);
                key_mask[r * len + i] = 0.0;
            }
        }
        Ok(Self {
            rows,
            len,
            gather: Tensor::from_vec(gather, rows * len, device)?,
            scatter: Tensor::from_vec(scatter, tokens, device)?,
            key_mask: Tensor::from_vec(key_mask, (rows, 1, 1, len), device)?,
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
    Padding::new(att, device)?.dropout(att, device)
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

/// A local layer's window as an additive (L, L) mask: 0 where query i sees key j, a large
/// negative number elsewhere; None for global attention.
fn window_mask(att: &Attention, len: usize, device: &Device) -> Result<Option<Tensor>> {
    if att.window.is_none() {
        return Ok(None);
    }
    let mut v = vec![-1e30f32; len * len];
    for i in 0..len {
        v[i * len..(i + 1) * len][att.keys(i, len)].fill(0.0);
    }
    Ok(Some(Tensor::from_vec(v, (len, len), device)?))
}

/// Softmax probabilities of one padded batch, (rows, heads, L, L), and q, k, v.
fn probabilities(
    qkv: &Tensor,
    bias: Option<&Tensor>,
    att: &Attention,
    pad: &Padding,
) -> Result<(Tensor, [Tensor; 3])> {
    let [q, k, v] = split_heads(&pad.pad(qkv)?, att.heads)?;
    // Each step replaces `scores` (a shadowing `let` would keep every (rows, heads, L, L)
    // version alive to the end).
    let mut scores = (q.matmul(&k.t()?)? * att.scale as f64)?;
    if let Some(b) = bias {
        let b = f32(&b.narrow(1, 0, pad.len)?.narrow(2, 0, pad.len)?)?;
        scores = scores.broadcast_add(&b.unsqueeze(0)?)?;
    }
    scores = scores.broadcast_add(&pad.key_mask)?;
    if let Some(band) = window_mask(att, pad.len, qkv.device())? {
        scores = scores.broadcast_add(&band)?;
    }
    Ok((candle_nn::ops::softmax_last_dim(&scores)?, [q, k, v]))
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
        let pad = Padding::new(att, qkv.device())?;
        let (mut p, [_, _, v]) = probabilities(qkv, bias, att, &pad)?;
        if let Some(m) = pad.dropout(att, qkv.device())? {
            p = (p * m)?;
        }
        let ctx = merge_heads(&p.matmul(&v)?)?;
        Ok(pad.unpad(&ctx)?.to_dtype(self.dtype)?)
    }

    fn attention_backward(
        &self,
        qkv: &Tensor,
        bias: Option<&Tensor>,
        att: &Attention,
        d: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let pad = Padding::new(att, qkv.device())?;
        let (p, [q, k, v]) = probabilities(qkv, bias, att, &pad)?;
        let (rows, heads, len, hd) = q.dims4()?;
        let d = pad
            .pad(&f32(d)?)?
            .reshape((rows, len, heads, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        // At most three (rows, heads, L, L) tensors are alive at once below: each is dropped
        // as soon as it is used, never left to a statement's or the function's end.
        let mask = pad.dropout(att, qkv.device())?;
        let dropped = match &mask {
            Some(m) => (&p * m)?,
            None => p.clone(),
        };
        let dv = dropped.t()?.matmul(&d)?;
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
            Some(b) => {
                let (_, l, _) = b.dims3()?;
                let sum = ds.sum(0)?;
                let sum = sum
                    .pad_with_zeros(1, 0, l - len)?
                    .pad_with_zeros(2, 0, l - len)?;
                Some(sum.to_dtype(b.dtype())?)
            }
            None => None,
        };
        let dq = (ds.matmul(&k)? * att.scale as f64)?;
        let dk = (ds.t()?.matmul(&q)? * att.scale as f64)?;
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

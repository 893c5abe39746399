//! Building blocks shared by the BERT and MPNet encoders, written for training: every op here
//! records a backward pass. candle-nn's fused `layer_norm` and `softmax_last_dim` record none, so
//! gradients would silently stop at them; this file composes the same maths from plain ops.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::model::dropout::Dropout;
use crate::model::weights::Weights;

/// `y = x Wᵀ + b`, with `W` stored `[out, in]` as in PyTorch checkpoints.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(w: &dyn Weights, name: &str, input: usize, output: usize) -> Result<Self> {
        let mut l = Self::load_weight(w, name, input, output)?;
        l.bias = Some(w.get(&format!("{name}.bias"), &[output])?);
        Ok(l)
    }

    /// Loads only `{name}.weight` (for layers without a bias).
    pub fn load_weight(w: &dyn Weights, name: &str, input: usize, output: usize) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[output, input])?,
            bias: None,
        })
    }

    /// x: (..., in) -> (..., out). Flattens leading dims so one 2-D matmul does the work.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = *dims.last().expect("linear input has a last dimension");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let w = self.weight.to_dtype(x.dtype())?;
        let y = x.reshape((rows, inner))?.matmul(&w.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        Ok(y.reshape(out)?)
    }
}

/// Layer normalisation over the last dimension, computed in f32 whatever the input type
/// (half-precision variance loses too much), with a backward pass.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &dyn Weights, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&format!("{name}.weight"), &[size])?,
            bias: w.get(&format!("{name}.bias"), &[size])?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let y = normed
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?)?;
        Ok(y.to_dtype(dtype)?)
    }
}

/// Softmax over the last dimension in f32, with a backward pass. Subtracting the (detached)
/// row maximum keeps `exp` finite and does not change the result or its gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Names of one post-LN transformer layer's tensors; BERT and MPNet differ only in these.
pub struct LayerNames {
    pub q: String,
    pub k: String,
    pub v: String,
    pub o: String,
    pub attn_norm: String,
    pub ffn_in: String,
    pub ffn_out: String,
    pub ffn_norm: String,
}

/// Sizes of the transformer stack, shared by both encoders.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub eps: f64,
}

/// One post-LN transformer layer: self-attention, add & norm, GELU feed-forward, add & norm.
#[derive(Debug, Clone)]
pub struct EncoderLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    attn_norm: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    ffn_norm: LayerNorm,
    heads: usize,
}

impl EncoderLayer {
    pub fn load(w: &dyn Weights, n: &LayerNames, d: Dims) -> Result<Self> {
        let h = d.hidden;
        Ok(Self {
            q: Linear::load(w, &n.q, h, h)?,
            k: Linear::load(w, &n.k, h, h)?,
            v: Linear::load(w, &n.v, h, h)?,
            o: Linear::load(w, &n.o, h, h)?,
            attn_norm: LayerNorm::load(w, &n.attn_norm, h, d.eps)?,
            ffn_in: Linear::load(w, &n.ffn_in, h, d.intermediate)?,
            ffn_out: Linear::load(w, &n.ffn_out, d.intermediate, h)?,
            ffn_norm: LayerNorm::load(w, &n.ffn_norm, h, d.eps)?,
            heads: d.heads,
        })
    }

    /// x: (batch, seq, hidden); `bias`: additive attention bias broadcastable to
    /// (batch, heads, seq, seq) (padding mask, plus MPNet's relative positions).
    /// `site` numbers this layer's dropout sites so every mask is distinct.
    pub fn forward(&self, x: &Tensor, bias: &Tensor, drop: &Dropout, site: u64) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let hd = h / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        // (b, heads, s, s); scores and softmax in f32 for stable half-precision training.
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?
            .to_dtype(DType::F32)?
            .broadcast_add(bias)?;
        let probs = softmax_last_dim(&scores)?;
        let probs = drop.attention(&probs, site)?.to_dtype(x.dtype())?;
        let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))?;
        let attn = drop.hidden(&self.o.forward(&ctx)?, site + 1)?;
        let x = self.attn_norm.forward(&(attn + x)?)?;
        let ffn = self.ffn_in.forward(&x)?.gelu_erf()?;
        let ffn = drop.hidden(&self.ffn_out.forward(&ffn)?, site + 2)?;
        self.ffn_norm.forward(&(ffn + x)?)
    }
}

/// Additive attention bias from a (batch, seq) 0/1 mask: 0 where a token is real, a large
/// negative number on padding, shaped (batch, 1, 1, seq) to broadcast over heads and queries.
pub fn padding_bias(mask: &Tensor) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    // (1 - m) * f32::MIN, as transformers does; softmax then gives padding exactly zero weight.
    let bias = ((m.ones_like()? - m)? * f32::MIN as f64)?;
    Ok(bias.reshape((b, 1, 1, s))?)
}

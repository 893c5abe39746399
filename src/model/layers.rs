//! Building blocks shared by the BERT and MPNet encoders, written for training: every op here
//! records a backward pass. candle-nn's fused `layer_norm` and `softmax_last_dim` record none, so
//! gradients would silently stop at them; this file composes the same maths from plain ops, and
//! uses the kernels of `fused.rs`, `norm.rs` and `attention.rs` (which have a backward) on CPU.

use candle_core::{DType, Tensor, D};

use crate::data::batch::TokenBatch;
use crate::error::Result;
use crate::model::attention::{self, Attention};
use crate::model::dropout::Dropout;
use crate::model::weights::Weights;
use crate::model::{fused, norm};

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

    /// x: (tokens, in) -> (tokens, out): the fused kernel on CPU (f32 weights), plain ops
    /// otherwise.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(b) = self.fused_bias(x) {
            return fused::linear(x, &self.weight, b);
        }
        let w = self.weight.to_dtype(x.dtype())?;
        let y = x.matmul(&w.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
            None => y,
        })
    }

    /// The bias, when the fused CPU kernels apply: a 2-D CPU input, f32 weight and bias.
    fn fused_bias(&self, x: &Tensor) -> Option<&Tensor> {
        let b = self.bias.as_ref()?;
        let f32_params = self.weight.dtype() == DType::F32 && b.dtype() == DType::F32;
        (x.device().is_cpu() && x.rank() == 2 && f32_params).then_some(b)
    }

    /// `gelu(x) Wᵀ + b`: on CPU one kernel that recomputes `gelu(x)` in the backward pass
    /// instead of keeping it.
    pub fn forward_gelu_input(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(b) = self.fused_bias(x) {
            return fused::gelu_linear(x, &self.weight, b);
        }
        self.forward(&x.gelu_erf()?)
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
        let y = if x.device().is_cpu() {
            norm::layer_norm(x, &self.weight, &self.bias, self.eps)?
        } else {
            layer_norm_composed(x, &self.weight, &self.bias, self.eps)?
        };
        Ok(y.to_dtype(x.dtype())?)
    }

    /// `norm(x + dropout(y))`, a post-LN layer's residual connection: one kernel on CPU.
    /// `lengths` are the packed rows' lengths and `site` the dropout site, as for
    /// [`Dropout::hidden`].
    pub fn forward_residual(
        &self,
        x: &Tensor,
        y: &Tensor,
        drop: &Dropout,
        lengths: &[usize],
        site: u64,
    ) -> Result<Tensor> {
        if x.device().is_cpu() && x.rank() == 2 {
            let mask = drop.hidden_mask(lengths, site);
            return norm::add_layer_norm(x, y, &self.weight, &self.bias, self.eps, mask);
        }
        self.forward(&(drop.hidden(y, lengths, site)? + x)?)
    }
}

/// Layer norm from plain ops (every device), in f32.
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(normed
        .broadcast_mul(&w.to_dtype(DType::F32)?)?
        .broadcast_add(&b.to_dtype(DType::F32)?)?)
}

/// Softmax over the last dimension from plain ops (every device). Subtracting the (detached) row maximum keeps `exp`
/// finite and does not change the result or its gradient.
pub fn softmax_composed(x: &Tensor) -> Result<Tensor> {
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
    /// Loads `count` layers; `names(prefix)` maps "encoder.layer.{i}" to the layer's tensor names.
    pub fn load_stack(
        w: &dyn Weights,
        count: usize,
        d: Dims,
        names: impl Fn(&str) -> LayerNames,
    ) -> Result<Vec<Self>> {
        (0..count)
            .map(|i| Self::load(w, &names(&format!("encoder.layer.{i}")), d))
            .collect()
    }

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

    /// q, k and v as one linear layer (tokens, hidden) -> (tokens, 3·hidden): one matrix
    /// product instead of three, and the layout the fused attention reads.
    fn qkv(&self) -> Result<Linear> {
        let bias = |l: &Linear| l.bias.clone().expect("q, k and v have biases");
        Ok(Linear {
            weight: Tensor::cat(&[&self.q.weight, &self.k.weight, &self.v.weight], 0)?,
            bias: Some(Tensor::cat(
                &[bias(&self.q), bias(&self.k), bias(&self.v)],
                0,
            )?),
        })
    }

    /// x: (tokens, hidden), the rows of `batch` packed; `bias`: additive attention bias,
    /// (heads, L, L) with L the longest row (MPNet's relative positions; None for BERT).
    /// `site` numbers this layer's dropout sites so every mask is distinct.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &TokenBatch,
        bias: Option<&Tensor>,
        drop: &Dropout,
        site: u64,
    ) -> Result<Tensor> {
        let hd = x.dim(1)? / self.heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let qkv = self.qkv()?.forward(x)?;
        let ctx = if x.device().is_cpu() {
            let op = Attention {
                heads: self.heads,
                scale: scale as f32,
                rows: batch.rows().collect(),
                masks: drop.attention_masks(site),
            };
            attention::attention(&qkv, bias, op)?
        } else {
            attention_composed(&qkv, batch, bias, drop, site, self.heads)?
        };
        let lengths = &batch.lengths;
        let attn = self.o.forward(&ctx)?;
        let x = self.attn_norm.forward_residual(x, &attn, drop, lengths, site + 1)?;
        let ffn = self.ffn_out.forward_gelu_input(&self.ffn_in.forward(&x)?)?;
        self.ffn_norm.forward_residual(&x, &ffn, drop, lengths, site + 2)
    }
}

/// Self-attention from plain ops, one row at a time (every device): what `attention.rs`
/// computes, with scores and softmax in f32. qkv: (tokens, 3·hidden) -> (tokens, hidden).
pub fn attention_composed(
    qkv: &Tensor,
    batch: &TokenBatch,
    bias: Option<&Tensor>,
    drop: &Dropout,
    site: u64,
    heads: usize,
) -> Result<Tensor> {
    let h = qkv.dim(1)? / 3;
    let hd = h / heads;
    let q = (qkv.narrow(1, 0, h)? * (1.0 / (hd as f64).sqrt()))?;
    let (k, v) = (qkv.narrow(1, h, h)?, qkv.narrow(1, 2 * h, h)?);
    let split = |t: &Tensor, off: usize, len: usize| -> Result<Tensor> {
        // (len, hidden) -> (heads, len, head_dim)
        Ok(t.narrow(0, off, len)?
            .reshape((len, heads, hd))?
            .transpose(0, 1)?
            .contiguous()?)
    };
    let mut ctx = Vec::with_capacity(batch.len());
    for (r, (off, len)) in batch.rows().enumerate() {
        let (qr, kr, vr) = (
            split(&q, off, len)?,
            split(&k, off, len)?,
            split(&v, off, len)?,
        );
        let mut scores = qr.matmul(&kr.t()?)?.to_dtype(DType::F32)?;
        if let Some(b) = bias {
            scores = scores.broadcast_add(&b.narrow(1, 0, len)?.narrow(2, 0, len)?)?;
        }
        let probs = drop
            .attention(&softmax_composed(&scores)?, r, site)?
            .to_dtype(qkv.dtype())?;
        ctx.push(probs.matmul(&vr)?.transpose(0, 1)?.reshape((len, h))?);
    }
    Ok(Tensor::cat(&ctx, 0)?)
}

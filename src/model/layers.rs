//! Building blocks shared by every encoder family, written for training: every op here
//! records a backward pass. candle-nn's fused `layer_norm` and `softmax_last_dim` record none, so
//! gradients would silently stop at them; this file composes the same maths from plain ops, and
//! uses the kernels of `fused.rs`, `norm.rs` and `attention.rs` (which have a backward) on CPU.

use candle_core::{DType, Tensor, Var, D};

use crate::data::batch::TokenBatch;
#[cfg(test)]
use crate::engine::cpu::attention;
use crate::engine::cpu::{fused, norm};
use crate::engine::Attention;
use crate::engine::Engine;
use crate::error::Result;
use crate::model::dropout::Dropout;
use crate::model::layer_op::{LayerDims, LayerOp, ParamGrads};
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

    /// A norm without a bias (ModernBERT's): a constant zero stands in, which never trains.
    pub fn load_without_bias(w: &dyn Weights, name: &str, size: usize, eps: f64) -> Result<Self> {
        let weight = w.get(&format!("{name}.weight"), &[size])?;
        Ok(Self {
            bias: Tensor::zeros(size, weight.dtype(), weight.device())?,
            weight,
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

    #[cfg(test)]
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

/// Names of one post-LN transformer layer's tensors; the families differ mostly in these.
#[derive(Debug, PartialEq)]
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

/// Sizes of one layer.
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
    /// Hidden dropout on the attention block's output (all but DistilBERT).
    pub drops_attention_output: bool,
    /// The primitives the one-op layer runs on.
    pub engine: Engine,
    /// Where the one-op layer leaves its parameters' gradients (`Network::backward` collects).
    pub param_grads: ParamGrads,
}

impl EncoderLayer {
    pub fn load(w: &dyn Weights, n: &LayerNames, d: Dims) -> Result<Self> {
        let h = d.hidden;
        let q = Linear::load(w, &n.q, h, h)?;
        Ok(Self {
            engine: Engine::for_device(q.weight.device()),
            q,
            k: Linear::load(w, &n.k, h, h)?,
            v: Linear::load(w, &n.v, h, h)?,
            o: Linear::load(w, &n.o, h, h)?,
            attn_norm: LayerNorm::load(w, &n.attn_norm, h, d.eps)?,
            ffn_in: Linear::load(w, &n.ffn_in, h, d.intermediate)?,
            ffn_out: Linear::load(w, &n.ffn_out, d.intermediate, h)?,
            ffn_norm: LayerNorm::load(w, &n.ffn_norm, h, d.eps)?,
            heads: d.heads,
            drops_attention_output: true,
            param_grads: ParamGrads::default(),
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
        if self.engine == Engine::Composed {
            return self.forward_composed(x, batch, bias, drop, site);
        }
        if !self.one_op(x) {
            return Err(crate::Error::Internal(format!(
                "encoder layer: expected (tokens, hidden) input and f32 weights, got {:?} {:?}",
                x.dims(),
                self.q.weight.dtype()
            )));
        }
        self.forward_one_op(x, batch, bias, drop, site)
    }

    /// The layer as a chain of autograd ops (the fused CPU kernels on CPU): what `layer_op.rs`
    /// computes in one op, kept as the tests' independent reference for both engines.
    #[cfg(test)]
    fn forward_ops(
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
                window: None,
            };
            attention::attention(&qkv, bias, op)?
        } else {
            attention_composed(&qkv, batch, bias, drop, site, self.heads)?
        };
        let lengths = &batch.lengths;
        let attn = self.o.forward(&ctx)?;
        let off = Dropout::off();
        let attn_drop = if self.drops_attention_output {
            drop
        } else {
            &off
        };
        let x = self
            .attn_norm
            .forward_residual(x, &attn, attn_drop, lengths, site + 1)?;
        let ffn = self.ffn_out.forward_gelu_input(&self.ffn_in.forward(&x)?)?;
        self.ffn_norm
            .forward_residual(&x, &ffn, drop, lengths, site + 2)
    }
}

impl EncoderLayer {
    /// The layer as a chain of plain candle ops recorded by the autograd tape, on every device
    /// as CUDA ran it before the one-op layer (`Engine::Composed`): what `st-tune bench
    /// launches` counts against.
    fn forward_composed(
        &self,
        x: &Tensor,
        batch: &TokenBatch,
        bias: Option<&Tensor>,
        drop: &Dropout,
        site: u64,
    ) -> Result<Tensor> {
        let plain = |l: &Linear, x: &Tensor| -> Result<Tensor> {
            let y = x.matmul(&l.weight.to_dtype(x.dtype())?.t()?)?;
            Ok(match &l.bias {
                Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?)?,
                None => y,
            })
        };
        // The residual sum with dropout at `site` (None: no dropout there), then the norm.
        let add_norm = |x: &Tensor, y: &Tensor, norm: &LayerNorm, site: Option<u64>| {
            let mask = site.and_then(|s| drop.hidden_mask(&batch.lengths, s));
            let y = match mask {
                Some(m) => drop.hidden_composed(y, &m)?,
                None => y.clone(),
            };
            let s = (y + x)?;
            let out = layer_norm_composed(&s, &norm.weight, &norm.bias, norm.eps)?;
            Ok::<_, crate::Error>(out.to_dtype(x.dtype())?)
        };
        let qkv = plain(&self.qkv()?, x)?;
        let ctx = attention_composed(&qkv, batch, bias, drop, site, self.heads)?;
        let attn = plain(&self.o, &ctx)?;
        let attn_site = self.drops_attention_output.then_some(site + 1);
        let x1 = add_norm(x, &attn, &self.attn_norm, attn_site)?;
        let ffn = plain(&self.ffn_out, &plain(&self.ffn_in, &x1)?.gelu_erf()?)?;
        add_norm(&x1, &ffn, &self.ffn_norm, Some(site + 2))
    }

    /// Whether the layer runs as one op (`layer_op.rs`): a 2-D input, f32 parameters.
    fn one_op(&self, x: &Tensor) -> bool {
        let params = [
            &self.q,
            &self.k,
            &self.v,
            &self.o,
            &self.ffn_in,
            &self.ffn_out,
        ];
        let f32_params = |l: &&Linear| {
            l.weight.dtype() == DType::F32
                && l.bias.as_ref().is_some_and(|b| b.dtype() == DType::F32)
        };
        x.rank() == 2
            && params.iter().all(f32_params)
            && self.attn_norm.weight.dtype() == DType::F32
            && self.ffn_norm.weight.dtype() == DType::F32
    }

    /// Every parameter of the layer, in the order `LayerOp` reads them.
    pub(crate) fn params(&self) -> Vec<Tensor> {
        let mut parts = Vec::with_capacity(16);
        let (qkv, ffn) = ([&self.q, &self.k, &self.v], [&self.ffn_in, &self.ffn_out]);
        parts.extend(qkv.iter().map(|l| l.weight.clone()));
        parts.extend(qkv.iter().flat_map(|l| l.bias.clone()));
        parts.extend(
            [self.o.weight.clone()]
                .into_iter()
                .chain(self.o.bias.clone()),
        );
        parts.extend([self.attn_norm.weight.clone(), self.attn_norm.bias.clone()]);
        for l in ffn {
            parts.extend([l.weight.clone()].into_iter().chain(l.bias.clone()));
        }
        parts.extend([self.ffn_norm.weight.clone(), self.ffn_norm.bias.clone()]);
        parts
    }

    fn forward_one_op(
        &self,
        x: &Tensor,
        batch: &TokenBatch,
        bias: Option<&Tensor>,
        drop: &Dropout,
        site: u64,
    ) -> Result<Tensor> {
        let scale = 1.0 / ((x.dim(1)? / self.heads) as f32).sqrt();
        let dims = LayerDims {
            hidden: x.dim(1)?,
            intermediate: self.ffn_in.weight.dim(0)?,
            eps: self.attn_norm.eps as f32,
        };
        let attention = Attention {
            heads: self.heads,
            scale,
            rows: batch.rows().collect(),
            masks: drop.attention_masks(site),
            window: None,
        };
        let lengths = &batch.lengths;
        let masks = [
            (self.drops_attention_output)
                .then(|| drop.hidden_mask(lengths, site + 1))
                .flatten(),
            drop.hidden_mask(lengths, site + 2),
        ];
        let params = self.params();
        let trains = params.iter().any(Tensor::track_op);
        let mut op = LayerOp::new(self.engine, dims, params, attention, masks);
        op.sink = trains.then(|| self.param_grads.clone());
        op.keep = trains || x.track_op() || bias.is_some_and(|b| b.track_op());
        // The parameters are no graph inputs: below the first trained layer, a leaf stands in
        // for the input so that the backward pass reaches this op.
        let x = if trains && !x.track_op() {
            Var::from_tensor(&x.detach())?.as_tensor().clone()
        } else {
            x.contiguous()?
        };
        Ok(match bias {
            Some(b) => x.apply_op2(&b.contiguous()?, op)?,
            None => x.apply_op1(op)?,
        })
    }
}

/// Self-attention from plain ops, one row at a time (every device): what `attention.rs`
/// computes, with scores and softmax in f32. qkv: (tokens, 3·hidden) -> (tokens, hidden).
/// The tests' reference, and the composed layer's attention.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{grads_through, max_abs, max_diff};
    use candle_core::{Device, Var};
    use std::cell::RefCell;

    /// Random trainable weights, kept so the test can ask for their gradients.
    struct VarWeights(RefCell<Vec<Var>>);

    impl Weights for VarWeights {
        fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
            let mean = if name.ends_with("norm.weight") {
                1.0
            } else {
                0.0
            };
            let v = Var::from_tensor(&Tensor::randn(mean, 0.3f32, shape, &Device::Cpu)?)?;
            self.0.borrow_mut().push(v.clone());
            Ok(v.as_tensor().clone())
        }
    }

    fn names() -> LayerNames {
        let n = |s: &str| s.to_string();
        LayerNames {
            q: n("q"),
            k: n("k"),
            v: n("v"),
            o: n("o"),
            attn_norm: n("attn_norm"),
            ffn_in: n("ffn_in"),
            ffn_out: n("ffn_out"),
            ffn_norm: n("ffn_norm"),
        }
    }

    #[test]
    fn the_one_op_layer_matches_the_chain_of_ops_in_value_and_every_gradient() {
        let dev = Device::Cpu;
        let w = VarWeights(RefCell::new(Vec::new()));
        let dims = Dims {
            hidden: 8,
            heads: 2,
            intermediate: 12,
            eps: 1e-5,
        };
        let mut layer = EncoderLayer::load(&w, &names(), dims).unwrap();
        let params = w.0.borrow().clone();
        assert_eq!(params.len(), 16);
        let batch = TokenBatch::new(&[&[1, 2, 3], &[4, 5, 6, 7]], &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 8), &dev).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.5, (2, 5, 5), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (7, 8), &dev).unwrap();
        // The last case is DistilBERT's layer: no dropout on the attention output.
        for (drop, with_bias, drops_attention_output) in [
            (Dropout::off(), false, true),
            (Dropout::train(0.2, 0.3, 7, 3, vec![10, 11]), false, true),
            (Dropout::train(0.2, 0.3, 7, 3, vec![10, 11]), true, true),
            (Dropout::train(0.2, 0.3, 7, 3, vec![10, 11]), false, false),
        ] {
            layer.drops_attention_output = drops_attention_output;
            let b = with_bias.then(|| bias.as_tensor());
            assert!(layer.one_op(x.as_tensor()));
            let a = layer.forward(x.as_tensor(), &batch, b, &drop, 4).unwrap();
            let c = layer
                .forward_ops(x.as_tensor(), &batch, b, &drop, 4)
                .unwrap();
            let mut vars: Vec<&Var> = params.iter().collect();
            vars.push(&x);
            if with_bias {
                vars.push(&bias);
            }
            assert!(
                max_diff(&a, &c) < 1e-5,
                "values differ by {}",
                max_diff(&a, &c)
            );
            // The one-op layer's parameter gradients leave through its sink.
            let mut ga = grads_through(&a, &probe);
            layer.param_grads.drain_into(&mut ga).unwrap();
            let gc = grads_through(&c, &probe);
            // The composed layer (plain ops through the tape, what bench launches counts).
            let engine = layer.engine;
            layer.engine = Engine::Composed;
            let e = layer.forward(x.as_tensor(), &batch, b, &drop, 4).unwrap();
            layer.engine = engine;
            assert!(max_diff(&e, &c) < 1e-5, "composed values differ");
            let ge = grads_through(&e, &probe);
            for v in vars {
                let d = max_diff(ga.get(v).unwrap(), gc.get(v).unwrap());
                assert!(d < 1e-5, "gradients differ by {d}");
                let d = max_diff(ge.get(v).unwrap(), gc.get(v).unwrap());
                assert!(d < 1e-5, "composed gradients differ by {d}");
            }
        }
    }

    #[test]
    fn the_portable_engine_gives_the_cpu_engine_s_value_and_every_gradient() {
        let dev = Device::Cpu;
        let w = VarWeights(RefCell::new(Vec::new()));
        let dims = Dims {
            hidden: 16,
            heads: 4,
            intermediate: 24,
            eps: 1e-5,
        };
        let mut layer = EncoderLayer::load(&w, &names(), dims).unwrap();
        let params = w.0.borrow().clone();
        let batch = TokenBatch::new(&[&[1, 2, 3], &[4, 5, 6, 7, 8], &[9]], &dev).unwrap();
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (9, 16), &dev).unwrap()).unwrap();
        let bias = Var::from_tensor(&Tensor::randn(0f32, 0.5, (4, 6, 6), &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (9, 16), &dev).unwrap();
        let drop = Dropout::train(0.2, 0.3, 7, 3, vec![10, 11, 12]);
        // (activations' type, tolerance): bf16 rounds each kept activation, where the two
        // engines' f32 sums may fall on either side of a rounding boundary.
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 0.1)] {
            for with_bias in [false, true] {
                let b = with_bias.then(|| bias.as_tensor());
                let mut run = |engine| {
                    layer.engine = engine;
                    let xd = x.as_tensor().to_dtype(dtype).unwrap();
                    let y = layer.forward(&xd, &batch, b, &drop, 4).unwrap();
                    let mut g = grads_through(&y.to_dtype(DType::F32).unwrap(), &probe);
                    layer.param_grads.drain_into(&mut g).unwrap();
                    (y, g)
                };
                let (yc, gc) = run(Engine::Cpu);
                let (yp, gp) = run(Engine::Portable);
                assert!(
                    max_diff(&yc, &yp) < tol,
                    "{dtype:?}: values differ by {}",
                    max_diff(&yc, &yp)
                );
                let mut vars: Vec<&Var> = params.iter().collect();
                vars.push(&x);
                if with_bias {
                    vars.push(&bias);
                }
                for (i, v) in vars.iter().enumerate() {
                    let (a, c) = (gc.get(v).unwrap(), gp.get(v).unwrap());
                    // Relative to the gradient's size: sums of many products.
                    let scale = max_abs(a).max(1.0);
                    let d = max_diff(a, c) / scale;
                    assert!(
                        d < tol,
                        "{dtype:?}, bias {with_bias}: gradient {i} differs by {d}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_one_op_layer_keeps_half_precision_and_stays_close_to_f32() {
        let dev = Device::Cpu;
        let w = VarWeights(RefCell::new(Vec::new()));
        let dims = Dims {
            hidden: 8,
            heads: 2,
            intermediate: 12,
            eps: 1e-5,
        };
        let layer = EncoderLayer::load(&w, &names(), dims).unwrap();
        let batch = TokenBatch::new(&[&[1, 2, 3], &[4, 5, 6, 7]], &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (7, 8), &dev).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (7, 8), &dev).unwrap();
        let drop = Dropout::train(0.2, 0.3, 7, 3, vec![10, 11]);
        let run = |dtype| {
            let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
            let y = layer
                .forward(x.as_tensor(), &batch, None, &drop, 4)
                .unwrap();
            assert_eq!(y.dtype(), dtype);
            let g = grads_through(&y.to_dtype(DType::F32).unwrap(), &probe);
            let dx = g.get(x.as_tensor()).unwrap().clone();
            assert_eq!(dx.dtype(), dtype);
            (y, dx)
        };
        let full = run(DType::F32);
        for dtype in [DType::BF16, DType::F16] {
            let half = run(dtype);
            assert!(max_diff(&half.0, &full.0) < 0.05, "{dtype:?} output");
            assert!(max_diff(&half.1, &full.1) < 0.1, "{dtype:?} d x");
        }
    }
}

//! One ModernBERT layer as one op with an explicit forward and backward pass over the device
//! primitives of `engine`, as `layer_op.rs` is for the post-LN families: pre-norm attention
//! with rotary positions (global, or local within a window), then a pre-norm GeGLU
//! feed-forward block, each added to its input; the last layer also applies the final norm.
//! The forward pass keeps q|k|v after rotation, the attention context, the residual sum
//! between the blocks, the GeGLU input and (last layer) the layer's output; the norms' outputs
//! and the GeGLU activation are recomputed in the backward pass.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use crate::engine::rotary::Rotary;
use crate::engine::{Attention, Engine, Primitives};
use crate::error::Result;
use crate::model::layer_op::{cpu_output, input, to_candle, ParamGrads};

/// A weight and its optional bias (ModernBERT checkpoints have none by default).
pub type Affine = (Tensor, Option<Tensor>);

/// The layer's parameters (f32), as the checkpoint holds them.
#[derive(Debug, Clone)]
pub struct PreNormParams {
    /// None for layer 0, whose attention norm is the identity.
    pub attn_norm: Option<Affine>,
    /// q|k|v fused, (3·hidden, hidden).
    pub qkv: Affine,
    pub o: Affine,
    pub mlp_norm: Affine,
    /// [input | gate], (2·I, hidden).
    pub wi: Affine,
    pub wo: Affine,
    /// The model's final norm, on the last layer only.
    pub final_norm: Option<Affine>,
}

impl PreNormParams {
    /// Every tensor, in one fixed order (weights, then each present bias).
    pub fn tensors(&self) -> Vec<Tensor> {
        self.slots()
            .into_iter()
            .flat_map(|(w, b)| std::iter::once(w.clone()).chain(b.cloned()))
            .collect()
    }

    fn slots(&self) -> Vec<(&Tensor, Option<&Tensor>)> {
        [
            self.attn_norm.as_ref(),
            Some(&self.qkv),
            Some(&self.o),
            Some(&self.mlp_norm),
            Some(&self.wi),
            Some(&self.wo),
            self.final_norm.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|(w, b)| (w, b.as_ref()))
        .collect()
    }

    fn detached(&self) -> Self {
        let a = |(w, b): &Affine| (w.detach(), b.as_ref().map(Tensor::detach));
        Self {
            attn_norm: self.attn_norm.as_ref().map(a),
            qkv: a(&self.qkv),
            o: a(&self.o),
            mlp_norm: a(&self.mlp_norm),
            wi: a(&self.wi),
            wo: a(&self.wo),
            final_norm: self.final_norm.as_ref().map(a),
        }
    }
}

/// The gradient of each weight and bias, in `PreNormParams::slots` order.
type SlotGrads = Vec<(Tensor, Tensor)>;

/// What the backward pass needs besides the layer input.
struct Kept {
    qkv: Tensor,
    ctx: Tensor,
    h: Tensor,
    u: Tensor,
    /// The layer's output before the final norm (last layer only).
    out: Option<Tensor>,
}

/// The op: its engine, parameters, attention (window and rows), rotary angles, and the
/// activations its forward pass keeps.
pub struct PreNormOp {
    pub engine: Engine,
    pub eps: f32,
    pub params: PreNormParams,
    pub attention: Attention,
    pub rope: Rotary,
    pub sink: Option<ParamGrads>,
    pub keep: bool,
    kept: Mutex<Option<Kept>>,
}

/// A zero bias of `n` for a linear layer or norm without one.
fn bias_or_zero(b: &Option<Tensor>, w: &Tensor) -> Result<Tensor> {
    Ok(match b {
        Some(b) => b.clone(),
        None => Tensor::zeros(w.dim(0)?, w.dtype(), w.device())?,
    })
}

impl PreNormOp {
    pub fn new(
        engine: Engine,
        eps: f32,
        params: PreNormParams,
        attention: Attention,
        rope: Rotary,
    ) -> Self {
        Self {
            engine,
            eps,
            params,
            attention,
            rope,
            sink: None,
            keep: false,
            kept: Mutex::new(None),
        }
    }

    fn linear(&self, p: &dyn Primitives, x: &Tensor, (w, b): &Affine) -> Result<Tensor> {
        p.linear(x, w, &bias_or_zero(b, w)?)
    }

    fn norm(&self, p: &dyn Primitives, x: &Tensor, (w, b): &Affine) -> Result<Tensor> {
        p.norm(x, w, b.as_ref(), self.eps)
    }

    /// The attention block's input: the attention norm's output, or x itself on layer 0.
    fn attn_input(&self, p: &dyn Primitives, x: &Tensor, w: &PreNormParams) -> Result<Tensor> {
        match &w.attn_norm {
            Some(n) => self.norm(p, x, n),
            None => Ok(x.clone()),
        }
    }

    fn forward(&self, p: &dyn Primitives, x: &Tensor, w: &PreNormParams) -> Result<(Tensor, Kept)> {
        let dt = p.dtype();
        let xn = self.attn_input(p, x, w)?;
        let qkv = p.rotary(&self.linear(p, &xn, &w.qkv)?, &self.rope)?;
        drop(xn);
        let ctx = p.attention(&qkv, None, &self.attention)?;
        let attn = self.linear(p, &ctx, &w.o)?;
        let h = p.cast(&p.add(x, &attn)?, dt)?;
        drop(attn);
        let u = self.linear(p, &self.norm(p, &h, &w.mlp_norm)?, &w.wi)?;
        let mlp = self.linear(p, &p.geglu(&u)?, &w.wo)?;
        let out = p.cast(&p.add(&h, &mlp)?, dt)?;
        drop(mlp);
        let (y, out) = match &w.final_norm {
            Some(n) => (self.norm(p, &out, n)?, Some(out)),
            None => (out, None),
        };
        let kept = Kept {
            qkv,
            ctx,
            h,
            u,
            out,
        };
        Ok((y, kept))
    }

    /// (d x, the gradient of every weight and bias in `slots` order) from the output gradient.
    fn backward(
        &self,
        p: &dyn Primitives,
        x: &Tensor,
        w: &PreNormParams,
        g: &Tensor,
        kept: Kept,
    ) -> Result<(Tensor, SlotGrads)> {
        let Kept {
            qkv,
            ctx,
            h,
            u,
            out,
        } = kept;
        let eps = self.eps;
        let mut final_grads = None;
        let dout = match (&w.final_norm, out) {
            (Some((fw, _)), Some(out)) => {
                let (d, dw, db) = p.norm_backward(&out, fw, eps, g)?;
                final_grads = Some((dw, db));
                d
            }
            _ => p.cast(g, candle_core::DType::F32)?,
        };
        // out = h + Wo geglu(u), u = Wi norm(h).
        let act = p.geglu(&u)?;
        let (dact, dwo, dwo_b) = p.linear_backward(&dout, &act, &w.wo.0)?;
        drop(act);
        let du = p.geglu_backward(&u, &dact)?;
        drop((u, dact));
        let hn = self.norm(p, &h, &w.mlp_norm)?;
        let (dhn, dwi, dwi_b) = p.linear_backward(&du, &hn, &w.wi.0)?;
        drop((du, hn));
        let (dh_mlp, dmn_w, dmn_b) = p.norm_backward(&h, &w.mlp_norm.0, eps, &dhn)?;
        drop((dhn, h));
        let dh = p.add(&dout, &dh_mlp)?;
        drop((dout, dh_mlp));
        // h = x + Wo attention(rotary(Wqkv norm(x))).
        let (dctx, do_w, do_b) = p.linear_backward(&dh, &ctx, &w.o.0)?;
        drop(ctx);
        let (dqkv, _) = p.attention_backward(&qkv, None, &self.attention, &dctx)?;
        drop((qkv, dctx));
        let dqkv = p.rotary_backward(&dqkv, &self.rope)?;
        let xn = self.attn_input(p, x, w)?;
        let (dxn, dqkv_w, dqkv_b) = p.linear_backward(&dqkv, &xn, &w.qkv.0)?;
        drop((dqkv, xn));
        let mut grads: SlotGrads = Vec::with_capacity(7);
        let dx_attn = match &w.attn_norm {
            Some((nw, _)) => {
                let (d, dw, db) = p.norm_backward(x, nw, eps, &dxn)?;
                grads.push((dw, db));
                d
            }
            None => dxn,
        };
        let dx = p.add(&dh, &dx_attn)?;
        grads.extend([
            (dqkv_w, dqkv_b),
            (do_w, do_b),
            (dmn_w, dmn_b),
            (dwi, dwi_b),
            (dwo, dwo_b),
        ]);
        grads.extend(final_grads);
        Ok((dx, grads))
    }

    fn run_forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.engine.primitives(x.dtype());
        let w = self.params.detached();
        let (out, kept) = self.forward(p.as_ref(), x, &w)?;
        if self.keep {
            *self.kept.lock().expect("layer stash") = Some(kept);
        }
        Ok(out)
    }

    /// d x from the output gradient `g`; the parameters' gradients go to the sink.
    fn grads(&self, x: &Tensor, g: &Tensor) -> candle_core::Result<Tensor> {
        let run = || -> Result<_> {
            let x = x.detach();
            let p = self.engine.primitives(x.dtype());
            let w = self.params.detached();
            let kept = self.kept.lock().expect("layer stash").take();
            let kept = match kept {
                Some(k) => k,
                None => self.forward(p.as_ref(), &x, &w)?.1,
            };
            let (dx, grads) = self.backward(p.as_ref(), &x, &w, g, kept)?;
            if let Some(sink) = &self.sink {
                let mut pairs = Vec::new();
                for ((pw, pb), (dw, db)) in self.params.slots().into_iter().zip(grads) {
                    pairs.push((pw.clone(), dw));
                    if let Some(pb) = pb {
                        pairs.push((pb.clone(), db));
                    }
                }
                sink.push(pairs);
            }
            p.cast(&dx, x.dtype())
        };
        run().map_err(to_candle)
    }
}

impl CustomOp1 for PreNormOp {
    fn name(&self) -> &'static str {
        "st-tune-prenorm-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = input(Storage::Cpu(s.clone()), l)?;
        cpu_output(&self.run_forward(&x).map_err(to_candle)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let x = input(Storage::Cuda(s.try_clone(l)?), l)?;
        crate::model::layer_op::cuda_output(&self.run_forward(&x).map_err(to_candle)?)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.grads(x, g)?))
    }
}

//! One post-LN transformer layer as one op with an explicit forward and backward pass, in the
//! manner of karpathy/llm.c, written once over the device primitives of `engine` (the CPU
//! kernels, or candle ops on any device): the forward pass keeps the few activations the
//! backward pass needs, and the backward pass walks the layer in reverse.
//!
//! Why: candle's backward pass gives every graph node a zeroed gradient buffer and adds into it,
//! and a layer built from ops is a dozen nodes; composed attention also keeps every row's
//! scores and probabilities. Here a layer is one node whose only graph input is the layer input
//! (and MPNet's attention bias). The parameters are read where they live, and their gradients
//! leave through a [`ParamGrads`] sink that `Network::backward` empties into the gradient store:
//! as graph inputs they would have to be one concatenated copy, kept alive by the graph until
//! the backward pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::op::BackpropOp;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Storage, Tensor, TensorId};

use crate::engine::mask::HiddenMask;
use crate::engine::{Attention, Engine, Primitives};
use crate::error::Result;
use crate::model::relative_buckets::buckets_of_pairs;

/// The sizes of one layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub eps: f32,
}

/// Where one-op layers leave their parameters' gradients during a backward pass: pending
/// tensors, or, where the engine sums in token order, the step's sums themselves.
#[derive(Debug, Clone, Default)]
pub struct ParamGrads {
    pending: Arc<Mutex<Vec<(Tensor, Tensor)>>>,
    sums: Arc<Mutex<StepSums>>,
    /// This layer's sums of MPNet's relative-bias table, (buckets, heads), where they go to
    /// the step's sums (`Network::set_step_sums`).
    bias_sums: Arc<Mutex<Option<Tensor>>>,
}

/// A step's gradient sums by parameter (f32 CPU tensors that live for the whole step), for
/// engines that add into them token after token (`Primitives::sums_in_order`): each element
/// then sums the step's tokens in one fixed order, however the step is cut into micro-batches.
pub type StepSums = HashMap<TensorId, Tensor>;

impl ParamGrads {
    pub(crate) fn push(&self, grads: Vec<(Tensor, Tensor)>) {
        self.pending.lock().expect("param grads").extend(grads);
    }

    /// Drops what an earlier, failed backward pass left.
    pub fn clear(&self) {
        self.pending.lock().expect("param grads").clear();
    }

    /// Where the following backward passes add their gradients, for the parameters `sums`
    /// holds (empty: pending tensors, as without), and the attention bias's by bucket into
    /// `bias_sums` where given.
    pub fn set_sums(&self, sums: StepSums, bias_sums: Option<Tensor>) {
        *self.sums.lock().expect("param sums") = sums;
        *self.bias_sums.lock().expect("bias sums") = bias_sums;
    }

    fn bias_sums(&self) -> Option<Tensor> {
        self.bias_sums.lock().expect("bias sums").clone()
    }

    /// The sums of all of `params`, in order; None unless every one has its sum.
    fn sums_of(&self, params: &[Tensor]) -> Option<Vec<Tensor>> {
        let sums = self.sums.lock().expect("param sums");
        params.iter().map(|p| sums.get(&p.id()).cloned()).collect()
    }

    /// Adds every pending gradient into `store` under its parameter (summed when a layer ran
    /// more than once), in the order the backward pass left them.
    pub fn drain_into(&self, store: &mut GradStore) -> candle_core::Result<()> {
        let pending = std::mem::take(&mut *self.pending.lock().expect("param grads"));
        for (p, mut g) in pending {
            if let Some(prev) = store.remove(&p) {
                g = (prev + g)?;
            }
            store.insert(&p, g);
        }
        Ok(())
    }
}

/// Where a backward pass puts each parameter's gradient (by index in `LayerOp::params`): a
/// fresh tensor each, or the step's sums.
struct Out<'a> {
    params: &'a [Tensor],
    sums: Option<Vec<Tensor>>,
    /// The attention bias's gradient, by bucket (see `ParamGrads::set_sums`).
    bias_sums: Option<Tensor>,
    fresh: Vec<Option<Tensor>>,
}

impl<'a> Out<'a> {
    fn new(params: &'a [Tensor], sums: Option<Vec<Tensor>>, bias_sums: Option<Tensor>) -> Self {
        Self {
            params,
            sums,
            bias_sums,
            fresh: vec![None; params.len()],
        }
    }

    /// `attention_backward`: (d qkv, d bias), d bias None where it went to the bias sums.
    fn attention(
        &self,
        p: &dyn Primitives,
        (qkv, bias): (&Tensor, Option<&Tensor>),
        att: &Attention,
        d: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        if let (Some(sums), Some(b)) = (&self.bias_sums, bias) {
            let bucket_of = buckets_of_pairs(b.dim(1)?, sums.dim(0)?);
            let dqkv = p.attention_backward_into(qkv, b, att, d, &bucket_of, sums)?;
            return Ok((dqkv, None));
        }
        p.attention_backward(qkv, bias, att, d)
    }

    /// Keeps `g` as the gradients of parameters `at`, split by rows into their shapes.
    fn keep(&mut self, g: Tensor, at: &[usize]) -> Result<()> {
        if let [i] = at {
            self.fresh[*i] = Some(g);
            return Ok(());
        }
        let mut row = 0;
        for &i in at {
            let rows = self.params[i].dim(0)?;
            self.fresh[i] = Some(g.narrow(0, row, rows)?.copy()?);
            row += rows;
        }
        Ok(())
    }

    /// `linear_backward`, the weight's gradient to parameters `w_at` (rows split over them)
    /// and the bias's to `b_at`; returns d input.
    fn linear(
        &mut self,
        p: &dyn Primitives,
        (dy, x, w): (&Tensor, &Tensor, &Tensor),
        w_at: &[usize],
        b_at: &[usize],
    ) -> Result<Tensor> {
        if let Some(s) = &self.sums {
            let pick = |at: &[usize]| at.iter().map(|&i| &s[i]).collect::<Vec<_>>();
            return p.linear_backward_into(dy, x, w, &pick(w_at), &pick(b_at));
        }
        let (dx, dw, db) = p.linear_backward(dy, x, w)?;
        self.keep(dw, w_at)?;
        self.keep(db, b_at)?;
        Ok(dx)
    }

    /// `add_norm_backward`, the norm's weight and bias gradients to parameters `at`; returns
    /// d sum.
    #[allow(clippy::too_many_arguments)]
    fn add_norm(
        &mut self,
        p: &dyn Primitives,
        (x, y, mask): (&Tensor, &Tensor, Option<&HiddenMask>),
        w: &Tensor,
        eps: f32,
        g: &Tensor,
        [wi, bi]: [usize; 2],
    ) -> Result<Tensor> {
        if let Some(s) = &self.sums {
            return p.add_norm_backward_into(x, y, mask, w, eps, g, (&s[wi], &s[bi]));
        }
        let (ds, dw, db) = p.add_norm_backward(x, y, mask, w, eps, g)?;
        self.keep(dw, &[wi])?;
        self.keep(db, &[bi])?;
        Ok(ds)
    }

    /// The fresh gradients, in `params` order (none when they went to the sums).
    fn into_fresh(self) -> Result<Vec<Tensor>> {
        if self.sums.is_some() {
            return Ok(Vec::new());
        }
        self.fresh
            .into_iter()
            .map(|g| {
                g.ok_or_else(|| crate::Error::Internal("layer op: a gradient is missing".into()))
            })
            .collect()
    }
}

/// The layer's parameters; q, k and v side by side as one product.
struct Weights {
    qkv_w: Tensor,
    qkv_b: Tensor,
    o_w: Tensor,
    o_b: Tensor,
    ln1: (Tensor, Tensor),
    in_w: Tensor,
    in_b: Tensor,
    out_w: Tensor,
    out_b: Tensor,
    ln2: (Tensor, Tensor),
}

impl Weights {
    /// From the 16 tensors in `EncoderLayer::params` order.
    fn new(p: &[Tensor]) -> Result<Self> {
        let [qw, kw, vw, qb, kb, vb, o_w, o_b, l1w, l1b, in_w, in_b, out_w, out_b, l2w, l2b] = p
        else {
            return Err(crate::Error::Internal(format!(
                "layer op: {} parameters, expected 16",
                p.len()
            )));
        };
        let d = |t: &Tensor| t.detach();
        Ok(Self {
            qkv_w: Tensor::cat(&[d(qw), d(kw), d(vw)], 0)?,
            qkv_b: Tensor::cat(&[d(qb), d(kb), d(vb)], 0)?,
            o_w: d(o_w),
            o_b: d(o_b),
            ln1: (d(l1w), d(l1b)),
            in_w: d(in_w),
            in_b: d(in_b),
            out_w: d(out_w),
            out_b: d(out_b),
            ln2: (d(l2w), d(l2b)),
        })
    }
}

/// What the backward pass needs besides the layer input: q|k|v, the attention context, the
/// attention output projection, the first norm's output, the first feed-forward projection
/// (before GELU) and the second one. Each in the activations' type.
struct Kept {
    qkv: Tensor,
    ctx: Tensor,
    attn: Tensor,
    x1: Tensor,
    h: Tensor,
    ffn: Tensor,
}

/// The layer: its engine, parameters, attention (with its dropout masks), the two
/// hidden-dropout masks, and the activations its forward pass keeps for its backward pass.
pub struct LayerOp {
    pub engine: Engine,
    pub dims: LayerDims,
    /// The 16 parameter tensors (f32), in `EncoderLayer::params` order.
    pub params: Vec<Tensor>,
    pub attention: Attention,
    /// Hidden dropout after attention and after the feed-forward block.
    pub masks: [Option<HiddenMask>; 2],
    /// Where the backward pass leaves the parameters' gradients; None when they do not train.
    pub sink: Option<ParamGrads>,
    /// Keep activations (the op is on a graph); inference keeps nothing.
    pub keep: bool,
    kept: Mutex<Option<Kept>>,
}

impl LayerOp {
    pub fn new(
        engine: Engine,
        dims: LayerDims,
        params: Vec<Tensor>,
        attention: Attention,
        masks: [Option<HiddenMask>; 2],
    ) -> Self {
        Self {
            engine,
            dims,
            params,
            attention,
            masks,
            sink: None,
            keep: false,
            kept: Mutex::new(None),
        }
    }

    fn forward(
        &self,
        p: &dyn Primitives,
        x: &Tensor,
        w: &Weights,
        bias: Option<&Tensor>,
    ) -> Result<(Tensor, Kept)> {
        let [m1, m2] = &self.masks;
        let eps = self.dims.eps;
        let qkv = p.linear(x, &w.qkv_w, &w.qkv_b)?;
        let ctx = p.attention(&qkv, bias, &self.attention)?;
        let attn = p.linear(&ctx, &w.o_w, &w.o_b)?;
        let x1 = p.add_norm(x, &attn, m1.as_ref(), (&w.ln1.0, &w.ln1.1), eps)?;
        let h = p.linear(&x1, &w.in_w, &w.in_b)?;
        let act = p.gelu(&h)?;
        let ffn = p.linear(&act, &w.out_w, &w.out_b)?;
        drop(act);
        let out = p.add_norm(&x1, &ffn, m2.as_ref(), (&w.ln2.0, &w.ln2.1), eps)?;
        let kept = Kept {
            qkv,
            ctx,
            attn,
            x1,
            h,
            ffn,
        };
        Ok((out, kept))
    }

    /// (d x, d bias) from the output gradient `g`; the parameters' gradients go to `out`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        p: &dyn Primitives,
        x: &Tensor,
        w: &Weights,
        bias: Option<&Tensor>,
        g: &Tensor,
        kept: Kept,
        out: &mut Out,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let [m1, m2] = &self.masks;
        let eps = self.dims.eps;
        let Kept {
            qkv,
            ctx,
            attn,
            x1,
            h,
            ffn,
        } = kept;
        // Parameter indices, in `EncoderLayer::params` order.
        const QKV_W: [usize; 3] = [0, 1, 2];
        const QKV_B: [usize; 3] = [3, 4, 5];
        // Second norm, over x1 + mask ⊙ ffn.
        let ds2 = out.add_norm(p, (&x1, &ffn, m2.as_ref()), &w.ln2.0, eps, g, [14, 15])?;
        drop(ffn);
        let dffn = p.masked(&ds2, m2.as_ref())?;
        // Feed-forward: ffn = gelu(h) W2ᵀ + b2, h = x1 W1ᵀ + b1; gelu(h) is recomputed.
        let act = p.gelu(&h)?;
        let dact = out.linear(p, (&dffn, &act, &w.out_w), &[12], &[13])?;
        drop((act, dffn));
        let dh = p.gelu_backward(&h, &dact)?;
        drop((h, dact));
        let dx1_ffn = out.linear(p, (&dh, &x1, &w.in_w), &[10], &[11])?;
        drop((dh, x1));
        let dx1 = p.add(&ds2, &dx1_ffn)?;
        drop((ds2, dx1_ffn));
        // First norm, over x + mask ⊙ attn.
        let ds1 = out.add_norm(p, (x, &attn, m1.as_ref()), &w.ln1.0, eps, &dx1, [8, 9])?;
        drop((attn, dx1));
        let dattn = p.masked(&ds1, m1.as_ref())?;
        // Attention output projection, attention, q|k|v projection.
        let dctx = out.linear(p, (&dattn, &ctx, &w.o_w), &[6], &[7])?;
        drop((ctx, dattn));
        let (dqkv, dbias) = out.attention(p, (&qkv, bias), &self.attention, &dctx)?;
        drop((qkv, dctx));
        let dx_attn = out.linear(p, (&dqkv, x, &w.qkv_w), &QKV_W, &QKV_B)?;
        drop(dqkv);
        let dx = p.add(&ds1, &dx_attn)?;
        Ok((dx, dbias))
    }

    /// The forward pass over a tensor made from the op's input storage.
    fn run_forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let p = self.engine.primitives(x.dtype());
        let w = Weights::new(&self.params)?;
        let (out, kept) = self.forward(p.as_ref(), x, &w, bias)?;
        if self.keep {
            *self.kept.lock().expect("layer stash") = Some(kept);
        }
        Ok(out)
    }

    /// The backward pass from the op's inputs: the kept activations when there are, else a
    /// second forward pass to rebuild them. (d x, d bias); the parameters' gradients go to
    /// the sink.
    fn grads(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        // A bias with a graph needs its gradient back (candle fails on a node left without).
        let bias_graph = bias.is_some_and(Tensor::track_op);
        let run = || -> Result<_> {
            let (x, bias) = (x.detach(), bias.map(Tensor::detach));
            let p = self.engine.primitives(x.dtype());
            let w = Weights::new(&self.params)?;
            let kept = self.kept.lock().expect("layer stash").take();
            let kept = match kept {
                Some(k) => k,
                None => self.forward(p.as_ref(), &x, &w, bias.as_ref())?.1,
            };
            let (sums, bias_sums) = match (&self.sink, p.sums_in_order()) {
                (Some(sink), true) => (sink.sums_of(&self.params), sink.bias_sums()),
                _ => (None, None),
            };
            if bias_graph && bias_sums.is_some() {
                return Err(crate::Error::Internal(
                    "layer op: the attention bias has a graph, but its gradient goes to the step's sums".into(),
                ));
            }
            let mut out = Out::new(&self.params, sums, bias_sums);
            let (dx, dbias) =
                self.backward(p.as_ref(), &x, &w, bias.as_ref(), g, kept, &mut out)?;
            drop(w);
            let dp = out.into_fresh()?;
            if let (Some(sink), false) = (&self.sink, dp.is_empty()) {
                sink.push(self.params.iter().cloned().zip(dp).collect());
            }
            Ok((p.cast(&dx, x.dtype())?, dbias))
        };
        run().map_err(to_candle)
    }
}

/// Back to candle's error type, for the custom-op interface (an OOM stays recognisable).
pub(crate) fn to_candle(e: crate::Error) -> candle_core::Error {
    match e {
        crate::Error::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

/// A tensor over a custom op's input storage (a copy: the op only borrows it).
pub(crate) fn input(s: Storage, l: &Layout) -> candle_core::Result<Tensor> {
    if l.contiguous_offsets().is_none() {
        candle_core::bail!("st-tune-layer: expected a contiguous input");
    }
    // A view of the storage from its first element up to the input's last.
    let (start, n) = (l.start_offset(), l.shape().elem_count());
    let t = Tensor::from_storage(s, start + n, BackpropOp::none(), false);
    if start == 0 {
        return t.reshape(l.shape());
    }
    t.narrow(0, start, n)?.reshape(l.shape())?.copy()
}

fn cpu_len(c: &CpuStorage) -> usize {
    match c {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        _ => 0,
    }
}

pub(crate) fn cpu_output(t: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) if l.start_offset() == 0 && cpu_len(c) == l.shape().elem_count() => {
            Ok((c.clone(), l.shape().clone()))
        }
        Storage::Cpu(_) => {
            drop(s);
            cpu_output(&t.copy()?)
        }
        _ => candle_core::bail!("st-tune-layer: expected a CPU output"),
    }
}

#[cfg(feature = "cuda")]
pub(crate) fn cuda_output(t: &Tensor) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    use candle_core::backend::BackendStorage;
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
        _ => candle_core::bail!("st-tune-layer: expected a CUDA output"),
    }
}

impl CustomOp1 for LayerOp {
    fn name(&self) -> &'static str {
        "st-tune-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = input(Storage::Cpu(s.clone()), l)?;
        cpu_output(&self.run_forward(&x, None).map_err(to_candle)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let x = input(Storage::Cuda(s.try_clone(l)?), l)?;
        cuda_output(&self.run_forward(&x, None).map_err(to_candle)?)
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.grads(x, None, g)?.0))
    }
}

impl CustomOp2 for LayerOp {
    fn name(&self) -> &'static str {
        "st-tune-layer-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = input(Storage::Cpu(s1.clone()), l1)?;
        let b = input(Storage::Cpu(s2.clone()), l2)?;
        cpu_output(&self.run_forward(&x, Some(&b)).map_err(to_candle)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let x = input(Storage::Cuda(s1.try_clone(l1)?), l1)?;
        let b = input(Storage::Cuda(s2.try_clone(l2)?), l2)?;
        cuda_output(&self.run_forward(&x, Some(&b)).map_err(to_candle)?)
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dbias) = self.grads(x, Some(bias), g)?;
        Ok((Some(dx), dbias))
    }
}

//! One post-LN transformer layer as one CPU op with an explicit forward and backward pass, in
//! the manner of karpathy/llm.c: the forward pass keeps the few activations the backward pass
//! needs, and the backward pass walks the layer in reverse over plain slices.
//!
//! Why: candle's backward pass gives every graph node a zeroed gradient buffer and adds into it,
//! and a layer built from ops is a dozen nodes (projections, attention, dropout, residuals,
//! norms); in bf16 those adds also convert every element twice. Here a layer is one node whose
//! only graph input is the layer input (and MPNet's attention bias). The parameters are read
//! where they live, and their gradients leave through a [`ParamGrads`] sink that
//! `Network::backward` empties into the gradient store: as graph inputs they would have to be
//! one concatenated copy, kept alive by the graph until the backward pass (the size of the
//! model again, for small steps). The maths is that of `layers.rs`'s composed layer, which the tests compare
//! it with; attention, layer norm, GELU and dropout reuse the kernels of `attention.rs`,
//! `norm.rs`, `vmath.rs` and `dropout.rs`. Arithmetic is f32; with half-precision activations
//! each kept activation is rounded to (and kept in) that type, as the composed ops would.

use std::borrow::Cow;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use crate::model::attention::Attention;
use crate::model::dropout::HiddenMask;
use crate::model::fused::{add_column_sums, cpu_f32, cpu_storage, f32_params};
use crate::model::{bf16_gemm, f32_gemm, norm, vmath};

/// The sizes of one layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub eps: f32,
}

/// Where one-op layers leave their parameters' gradients during a backward pass: each entry
/// is a layer's parameters and their gradients side by side, in [`Offsets`] order.
#[derive(Debug, Clone, Default)]
pub struct ParamGrads(Arc<Mutex<Vec<Pending>>>);

/// One layer's parameters and their gradients, side by side.
type Pending = (Vec<Tensor>, Vec<f32>);

impl ParamGrads {
    fn push(&self, params: Vec<Tensor>, grads: Vec<f32>) {
        self.0.lock().expect("param grads").push((params, grads));
    }

    /// Drops what an earlier, failed backward pass left.
    pub fn clear(&self) {
        self.0.lock().expect("param grads").clear();
    }

    /// Adds every pending gradient into `store` under its parameter (summed when a layer ran
    /// more than once, once per text column), in the order the backward pass left them.
    pub fn drain_into(&self, store: &mut GradStore) -> candle_core::Result<()> {
        let pending = std::mem::take(&mut *self.0.lock().expect("param grads"));
        for (params, grads) in pending {
            let mut at = 0;
            for p in params {
                let n = p.elem_count();
                let mut g = Tensor::from_slice(&grads[at..at + n], p.shape(), p.device())?;
                at += n;
                if let Some(prev) = store.remove(&p) {
                    g = (prev + g)?;
                }
                store.insert(&p, g);
            }
        }
        Ok(())
    }
}

/// Where each parameter sits in the layer's flat parameter vector, in the order
/// `EncoderLayer::params` lists them.
struct Offsets {
    qkv_w: usize,
    qkv_b: usize,
    o_w: usize,
    o_b: usize,
    /// The first norm's weight, then its bias.
    ln1_w: usize,
    in_w: usize,
    in_b: usize,
    out_w: usize,
    out_b: usize,
    /// The second norm's weight, then its bias.
    ln2_w: usize,
    len: usize,
}

impl LayerDims {
    fn offsets(&self) -> Offsets {
        let (h, i) = (self.hidden, self.intermediate);
        let sizes = [3 * h * h, 3 * h, h * h, h, h, h, i * h, i, h * i, h, h, h];
        let mut at = [0usize; 13];
        for (k, s) in sizes.iter().enumerate() {
            at[k + 1] = at[k] + s;
        }
        Offsets {
            qkv_w: at[0],
            qkv_b: at[1],
            o_w: at[2],
            o_b: at[3],
            ln1_w: at[4],
            in_w: at[6],
            in_b: at[7],
            out_w: at[8],
            out_b: at[9],
            ln2_w: at[10],
            len: at[12],
        }
    }
}

/// The layer: its parameters, attention (with its dropout masks), the two hidden-dropout
/// masks, and the activations its forward pass keeps for its backward pass.
pub struct LayerOp {
    pub dims: LayerDims,
    /// The 16 parameter tensors (f32, CPU), in [`Offsets`] order.
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

/// What the backward pass needs besides the layer input: q|k|v, the attention context, the
/// attention output projection, the first norm's output, the first feed-forward projection
/// (before GELU) and the second one. Each in the activations' type.
struct Kept {
    qkv: CpuStorage,
    ctx: CpuStorage,
    attn: CpuStorage,
    x1: CpuStorage,
    h: CpuStorage,
    ffn: CpuStorage,
}

/// How the layer's matrix products run: in f32 (the `gemm` crate, and `f32_gemm` for the
/// forward product with AVX-512), or, with bf16 activations
/// on a CPU with bf16 dot-product instructions, with bf16 operands and f32 sums (`bf16_gemm`;
/// weights and gradients are rounded to bf16 as `torch.autocast` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Products {
    F32,
    Bf16,
}

impl Products {
    fn for_dtype(dtype: DType) -> Self {
        if dtype == DType::BF16 && bf16_gemm::path() != bf16_gemm::Path::F32 {
            Products::Bf16
        } else {
            Products::F32
        }
    }
}

/// An operand of `matmul`: a slice read with (row, column) strides.
type Operand<'a> = f32_gemm::Strided<'a>;

/// The operand as `bf16_gemm` takes it (`rows × cols` of the product): row-major, or the
/// transpose of a row-major matrix. None for other strides.
fn as_mat<'a>(
    (data, (rs, cs)): Operand<'a>,
    rows: usize,
    cols: usize,
) -> Option<bf16_gemm::Mat<'a>> {
    let elems = bf16_gemm::Elems::F32(data);
    if cs == 1 && rs == cols && data.len() == rows * cols {
        Some(bf16_gemm::Mat::new(elems, rows, cols))
    } else if rs == 1 && cs == rows && data.len() == rows * cols {
        Some(bf16_gemm::Mat::new(elems, cols, rows).t())
    } else {
        None
    }
}

/// `dst (m × n, row-major) (+)= a (m × k) · b (k × n)`.
fn matmul(
    how: Products,
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    a: Operand,
    b: Operand,
    accumulate: bool,
) -> candle_core::Result<()> {
    if let (Some(am), Some(bm)) = (as_mat(a, m, k), as_mat(b, k, n)) {
        if how == Products::Bf16 {
            let out = bf16_gemm::Out::F32 {
                c: &mut dst[..m * n],
                accumulate,
            };
            return bf16_gemm::matmul(out, am, bm);
        }
        // Only the forward product (B = Wᵀ): there the `gemm` crate packs W a scalar at a
        // time. For the gradients' products it is as fast or a few percent faster
        // (`f32_gemm_speed`).
        if bm.t && f32_gemm::available() {
            f32_gemm::matmul(&mut dst[..m * n], accumulate, am, bm);
            return Ok(());
        }
    }
    f32_gemm::gemm_crate(dst, (m, n, k), a, b, accumulate);
    Ok(())
}

/// `x (t × k) · Wᵀ + bias` with W stored (n × k), as PyTorch's `Linear`.
fn linear(
    how: Products,
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    k: usize,
) -> candle_core::Result<Vec<f32>> {
    let (t, n) = (x.len() / k, bias.len());
    let mut y = Vec::with_capacity(t * n);
    for _ in 0..t {
        y.extend_from_slice(bias);
    }
    matmul(how, &mut y, (t, n, k), (x, (k, 1)), (w, (1, k)), true)?;
    Ok(y)
}

/// The gradients of `linear`: adds `dyᵀ x` to `dw` and the column sums of `dy` to `db`, and
/// returns `dy W` (t × k).
fn linear_backward(
    how: Products,
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    (dw, db): (&mut [f32], &mut [f32]),
    k: usize,
) -> candle_core::Result<Vec<f32>> {
    let n = db.len();
    let t = dy.len() / n;
    matmul(how, dw, (n, k, t), (dy, (1, n)), (x, (k, 1)), true)?;
    add_column_sums(bf16_gemm::Elems::F32(dy), db);
    let mut dx = vec![0f32; t * k];
    matmul(how, &mut dx, (t, k, n), (dy, (n, 1)), (w, (k, 1)), false)?;
    Ok(dx)
}

/// `x + mask ⊙ y`, rows of `width` (the packed tokens, as the masks number them).
fn add_masked(x: &[f32], y: &[f32], mask: Option<&HiddenMask>, width: usize) -> Vec<f32> {
    let mut out = y.to_vec();
    out.par_chunks_mut(width)
        .zip(x.par_chunks(width))
        .enumerate()
        .for_each(|(t, (o, x))| {
            if let Some(m) = mask {
                m.apply_row(t, o);
            }
            o.iter_mut().zip(x).for_each(|(o, x)| *o += x);
        });
    out
}

/// `g ⊙ mask` (the gradient reaching a dropped-out input).
fn masked(g: &[f32], mask: Option<&HiddenMask>, width: usize) -> Vec<f32> {
    let mut out = g.to_vec();
    if let Some(m) = mask {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each(|(t, o)| m.apply_row(t, o));
    }
    out
}

/// Rounds f32 values to `dtype` and back, in place: a kept half-precision activation is used
/// in the forward pass as the backward pass will read it.
fn round_to(dtype: DType, v: &mut [f32]) {
    match dtype {
        DType::BF16 => v.par_chunks_mut(1 << 14).for_each(|c| {
            c.iter_mut()
                .for_each(|x| *x = half::bf16::from_f32(*x).to_f32())
        }),
        DType::F16 => v.par_chunks_mut(1 << 14).for_each(|c| {
            c.iter_mut()
                .for_each(|x| *x = half::f16::from_f32(*x).to_f32())
        }),
        _ => {}
    }
}

/// A kept activation as f32 (borrowed when f32).
fn read(s: &CpuStorage) -> candle_core::Result<Cow<'_, [f32]>> {
    let len = match s {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        _ => candle_core::bail!("st-tune-layer: expected a float activation"),
    };
    cpu_f32(s, &Layout::contiguous(len), "st-tune-layer")
}

/// f32 values as a tensor of `dtype`, converted on every core (candle's own conversion runs on
/// one thread).
fn tensor(v: Vec<f32>, dtype: DType, shape: &Shape, dev: &Device) -> candle_core::Result<Tensor> {
    match cpu_storage(dtype, v)? {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, dev),
        CpuStorage::BF16(v) => Tensor::from_vec(v, shape, dev),
        CpuStorage::F16(v) => Tensor::from_vec(v, shape, dev),
        _ => candle_core::bail!("st-tune-layer: expected a float type"),
    }
}

/// The layer's parameters, read in place; only q, k and v are copied side by side, to be one
/// product. (A concatenated copy of them all as a graph input would live until the backward
/// pass.)
struct Params<'a> {
    qkv_w: Vec<f32>,
    qkv_b: Vec<f32>,
    o_w: &'a [f32],
    o_b: &'a [f32],
    ln1_w: &'a [f32],
    ln1_b: &'a [f32],
    in_w: &'a [f32],
    in_b: &'a [f32],
    out_w: &'a [f32],
    out_b: &'a [f32],
    ln2_w: &'a [f32],
    ln2_b: &'a [f32],
}

/// The forward pass's results: the output, and the activations to keep.
struct Forward {
    out: Vec<f32>,
    kept: Kept,
}

impl LayerOp {
    pub fn new(
        dims: LayerDims,
        params: Vec<Tensor>,
        attention: Attention,
        masks: [Option<HiddenMask>; 2],
    ) -> Self {
        Self {
            dims,
            params,
            attention,
            masks,
            sink: None,
            keep: false,
            kept: Mutex::new(None),
        }
    }

    /// Runs `f` over the parameters, read where they live (see [`Params`]).
    fn with_params<R>(
        &self,
        f: impl FnOnce(&Params) -> candle_core::Result<R>,
    ) -> candle_core::Result<R> {
        let guards: Vec<_> = self.params.iter().map(|t| t.storage_and_layout()).collect();
        let slices = guards
            .iter()
            .map(|(s, l)| match &**s {
                Storage::Cpu(s) => f32_params(s, l, "st-tune-layer"),
                _ => candle_core::bail!("st-tune-layer: expected CPU parameters"),
            })
            .collect::<candle_core::Result<Vec<&[f32]>>>()?;
        let [qw, kw, vw, qb, kb, vb, o_w, o_b, ln1_w, ln1_b, in_w, in_b, out_w, out_b, ln2_w, ln2_b] =
            slices[..]
        else {
            candle_core::bail!("st-tune-layer: {} parameters, expected 16", slices.len())
        };
        let p = Params {
            qkv_w: [qw, kw, vw].concat(),
            qkv_b: [qb, kb, vb].concat(),
            o_w,
            o_b,
            ln1_w,
            ln1_b,
            in_w,
            in_b,
            out_w,
            out_b,
            ln2_w,
            ln2_b,
        };
        f(&p)
    }

    fn forward(
        &self,
        x: &[f32],
        p: &Params,
        bias: Option<(&[f32], usize)>,
        dtype: DType,
    ) -> candle_core::Result<Forward> {
        let LayerDims {
            hidden: h,
            intermediate: i,
            eps,
        } = self.dims;
        let how = Products::for_dtype(dtype);
        // Each activation is stored in `dtype` and read back from there (no copy in f32).
        let keep = |mut v: Vec<f32>| {
            round_to(dtype, &mut v);
            cpu_storage(dtype, v)
        };
        let qkv = keep(linear(how, x, &p.qkv_w, &p.qkv_b, h)?)?;
        let ctx = keep(self.attention.forward_cpu(&read(&qkv)?, bias, 3 * h))?;
        let attn = keep(linear(how, &read(&ctx)?, p.o_w, p.o_b, h)?)?;
        let mut x1 = add_masked(x, &read(&attn)?, self.masks[0].as_ref(), h);
        norm::norm_rows(&mut x1, p.ln1_w, p.ln1_b, eps);
        let x1 = keep(x1)?;
        let x1_32 = read(&x1)?;
        let hid = keep(linear(how, &x1_32, p.in_w, p.in_b, h)?)?;
        let mut act = read(&hid)?.into_owned();
        act.par_chunks_mut(1 << 14).for_each(vmath::gelu);
        round_to(dtype, &mut act);
        let ffn = keep(linear(how, &act, p.out_w, p.out_b, i)?)?;
        drop(act);
        let mut out = add_masked(&x1_32, &read(&ffn)?, self.masks[1].as_ref(), h);
        drop(x1_32);
        norm::norm_rows(&mut out, p.ln2_w, p.ln2_b, eps);
        Ok(Forward {
            out,
            kept: Kept {
                qkv,
                ctx,
                attn,
                x1,
                h: hid,
                ffn,
            },
        })
    }

    /// (d x, d params, d bias) from the output gradient `g`.
    fn backward(
        &self,
        x: &[f32],
        p: &Params,
        bias: Option<(&[f32], usize)>,
        g: &[f32],
        kept: &Kept,
    ) -> candle_core::Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let LayerDims {
            hidden: h,
            intermediate: i,
            eps,
        } = self.dims;
        let o = self.dims.offsets();
        let how = Products::for_dtype(kept.qkv.dtype());
        let mut dp = vec![0f32; o.len];

        // Second norm, over x1 + mask ⊙ ffn.
        let x1 = read(&kept.x1)?;
        let ffn = read(&kept.ffn)?;
        let s2 = add_masked(&x1, &ffn, self.masks[1].as_ref(), h);
        drop(ffn);
        let (ds2, dln2) = norm::norm_rows_backward(&s2, g, p.ln2_w, eps)?;
        drop(s2);
        dp[o.ln2_w..o.len].copy_from_slice(&dln2);
        let dffn = masked(&ds2, self.masks[1].as_ref(), h);

        // Feed-forward: ffn = gelu(hid) W2ᵀ + b2, hid = x1 W1ᵀ + b1.
        let hid = read(&kept.h)?;
        let mut act = hid.to_vec();
        act.par_chunks_mut(1 << 14).for_each(vmath::gelu);
        let (dw2, db2) = dp[o.out_w..o.ln2_w].split_at_mut(o.out_b - o.out_w);
        let dhid = linear_backward(how, &dffn, &act, p.out_w, (dw2, db2), i)?;
        drop((act, dffn));
        // d hid = d act ⊙ gelu'(hid), computed over a copy of hid.
        let mut grad = hid.to_vec();
        drop(hid);
        grad.par_chunks_mut(i)
            .zip(dhid.par_chunks(i))
            .for_each(|(x, d)| vmath::gelu_grad_mul(x, d));
        let dhid = grad;
        let (dw1, db1) = dp[o.in_w..o.out_w].split_at_mut(o.in_b - o.in_w);
        let dx1 = linear_backward(how, &dhid, &x1, p.in_w, (dw1, db1), h)?;
        drop((dhid, x1));
        let mut ds2 = ds2;
        ds2.iter_mut().zip(&dx1).for_each(|(a, b)| *a += b);
        drop(dx1);
        let dx1 = ds2;

        // First norm, over x + mask ⊙ attn.
        let attn = read(&kept.attn)?;
        let s1 = add_masked(x, &attn, self.masks[0].as_ref(), h);
        drop(attn);
        let (ds1, dln1) = norm::norm_rows_backward(&s1, &dx1, p.ln1_w, eps)?;
        drop((s1, dx1));
        dp[o.ln1_w..o.in_w].copy_from_slice(&dln1);
        let dattn = masked(&ds1, self.masks[0].as_ref(), h);

        // Attention output projection, attention, q|k|v projection.
        let ctx = read(&kept.ctx)?;
        let (dwo, dbo) = dp[o.o_w..o.ln1_w].split_at_mut(o.o_b - o.o_w);
        let dctx = linear_backward(how, &dattn, &ctx, p.o_w, (dwo, dbo), h)?;
        drop((ctx, dattn));
        let qkv = read(&kept.qkv)?;
        let (dqkv, dbias) = self.attention.backward_slices(&qkv, bias, &dctx, 3 * h);
        drop((qkv, dctx));
        let (dwqkv, dbqkv) = dp[o.qkv_w..o.o_w].split_at_mut(o.qkv_b - o.qkv_w);
        let dx_attn = linear_backward(how, &dqkv, x, &p.qkv_w, (dwqkv, dbqkv), h)?;
        let mut dx = ds1;
        dx.iter_mut().zip(&dx_attn).for_each(|(a, b)| *a += b);
        Ok((dx, dp, dbias))
    }

    fn cpu_forward(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        bias: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = "st-tune-layer";
        let (tokens, h) = l1.shape().dims2()?;
        if h != self.dims.hidden {
            candle_core::bail!("{name}: input {:?}, hidden size {h}", l1.dims());
        }
        let x = cpu_f32(s1, l1, name)?;
        let b = bias.map(|(s, l)| cpu_f32(s, l, name)).transpose()?;
        let l = bias.map(|(_, l)| l.dims()[1]).unwrap_or(0);
        let b = b.as_deref().map(|b| (b, l));
        let f = self.with_params(|p| self.forward(&x, p, b, s1.dtype()))?;
        if self.keep {
            *self.kept.lock().expect("layer stash") = Some(f.kept);
        }
        Ok((cpu_storage(s1.dtype(), f.out)?, Shape::from((tokens, h))))
    }

    /// The backward pass from the op's inputs: the kept activations when there are, else a
    /// second forward pass to rebuild them.
    /// (d x, d bias); the parameters' gradients go to the sink.
    fn grads(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let name = "st-tune-layer";
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let bs = bias.map(|b| b.storage_and_layout());
        let (Storage::Cpu(xs), Storage::Cpu(gs)) = (&*xs, &*gs) else {
            candle_core::bail!("{name}: expected CPU tensors")
        };
        let x32 = cpu_f32(xs, xl, name)?;
        let g32 = match gl.contiguous_offsets() {
            Some(_) => cpu_f32(gs, gl, name)?,
            None => Cow::Owned(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        };
        let b32 = match &bs {
            Some((s, l)) => match &**s {
                Storage::Cpu(s) => Some((cpu_f32(s, l, name)?, l.dims()[1])),
                _ => candle_core::bail!("{name}: expected a CPU bias"),
            },
            None => None,
        };
        let b = b32.as_ref().map(|(b, l)| (&b[..], *l));
        let kept = self.kept.lock().expect("layer stash").take();
        let (dx, dp, dbias) = self.with_params(|p| {
            let kept = match kept {
                Some(k) => k,
                None => self.forward(&x32, p, b, x.dtype())?.kept,
            };
            self.backward(&x32, p, b, &g32, &kept)
        })?;
        drop((x32, g32));
        if let Some(sink) = &self.sink {
            sink.push(self.params.clone(), dp);
        }
        let dx = tensor(dx, x.dtype(), x.shape(), x.device())?;
        let dbias = match bias {
            Some(t) => Some(Tensor::from_vec(dbias, t.shape(), t.device())?),
            None => None,
        };
        Ok((dx, dbias))
    }
}

impl CustomOp1 for LayerOp {
    fn name(&self) -> &'static str {
        "st-tune-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_forward(s, l, None)
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
        self.cpu_forward(s1, l1, Some((s2, l2)))
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

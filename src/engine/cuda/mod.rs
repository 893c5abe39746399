//! st-tune's own CUDA kernels (`kernels.cu`, compiled to PTX by nvcc when the crate builds with
//! `--features cuda`, loaded by candle's device on first use), only where the portable engine's
//! candle ops are known to be slow on a GPU: dropout masks drawn on the device from their keys,
//! the layer-norm backward pass, and AdamW over every parameter in one launch. The portable
//! engine and the optimizer call these on a CUDA device and their candle-op forms elsewhere;
//! `st-tune bench kernels` compares each with its CPU twin. NONE HAS RUN ON A GPU YET
//! (docs/gpu.md).

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Shape, Storage, Tensor};

use crate::engine::mask::threshold_and_keep;
use crate::engine::NormGrads;
use crate::error::{Error, Result};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/st_tune_kernels.ptx"));
const MODULE: &str = "st_tune_kernels";
/// Threads per block; blocks of a grid-stride loop.
const THREADS: u32 = 256;
const MAX_BLOCKS: u64 = 4096;

fn bad(what: &str) -> Error {
    Error::Internal(format!("cuda kernel: {what}"))
}

/// A contiguous f32 CUDA tensor's elements.
fn view<'a>(s: &'a Storage, l: &Layout) -> Result<CudaView<'a, f32>> {
    let Storage::Cuda(c) = s else {
        return Err(bad("expected a CUDA tensor"));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| bad("expected a contiguous tensor"))?;
    Ok(c.as_cuda_slice::<f32>()?.slice(a..b))
}

fn tensor(slice: CudaSlice<f32>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn grid(n: u64) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(THREADS as u64).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Dropout masks, `lines` x `width` f32 on `device` (shaped `shape`): line l keeps its first
/// `valid[l]` columns, drawn from `bases[l]` as `engine::mask` draws them, and is 0 beyond.
pub fn dropout_mask(
    device: &Device,
    bases: &[u64],
    valid: &[u32],
    width: usize,
    p: f32,
    shape: impl Into<Shape>,
) -> Result<Tensor> {
    let dev = device.as_cuda_device()?;
    let stream = dev.cuda_stream();
    let n = bases.len() * width;
    let bases_d = stream.clone_htod(bases).w()?;
    let valid_d = stream.clone_htod(valid).w()?;
    // SAFETY: every element is written by the kernel.
    let out = unsafe { dev.alloc::<f32>(n)? };
    let func = dev.get_or_load_custom_func("st_dropout_mask", MODULE, PTX)?;
    let (threshold, keep) = threshold_and_keep(p);
    let (lines, width_u) = (bases.len() as u32, width as u32);
    {
        let mut b = func.builder();
        b.arg(&out);
        b.arg(&bases_d);
        b.arg(&valid_d);
        b.arg(&lines);
        b.arg(&width_u);
        b.arg(&threshold);
        b.arg(&keep);
        // SAFETY: the arguments match the kernel's signature; sizes as allocated above.
        unsafe { b.launch(grid(n as u64)) }.w()?;
    }
    Ok(tensor(out, dev, shape))
}

/// (d s, d weight, d bias) of `layer_norm(s)` from its output gradient `g`, all f32,
/// (tokens, width): one block per token, the weight's and bias's gradients summed by atomics.
pub fn layer_norm_backward(s: &Tensor, w: &Tensor, eps: f32, g: &Tensor) -> Result<NormGrads> {
    let (s, g) = (s.contiguous()?, g.contiguous()?);
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    let (rows, width) = s.dims2()?;
    let dev = s.device().as_cuda_device()?.clone();
    // SAFETY: every element of d s is written by the kernel.
    let ds = unsafe { dev.alloc::<f32>(rows * width)? };
    let dw = dev.alloc_zeros::<f32>(width)?;
    let db = dev.alloc_zeros::<f32>(width)?;
    let func = dev.get_or_load_custom_func("st_layer_norm_backward", MODULE, PTX)?;
    let (rows_u, width_u) = (rows as u32, width as u32);
    {
        let (ss, sl) = s.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (sv, wv, gv) = (view(&ss, sl)?, view(&ws, wl)?, view(&gs, gl)?);
        let mut b = func.builder();
        b.arg(&sv);
        b.arg(&wv);
        b.arg(&gv);
        b.arg(&ds);
        b.arg(&dw);
        b.arg(&db);
        b.arg(&rows_u);
        b.arg(&width_u);
        b.arg(&eps);
        let cfg = LaunchConfig {
            grid_dim: (rows_u.max(1), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature; sizes as allocated above.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((
        tensor(ds, &dev, (rows, width)),
        tensor(dw, &dev, width),
        tensor(db, &dev, width),
    ))
}

/// One parameter's part of an AdamW step: the weight (updated in place), its f32 gradient,
/// its moments (updated in place) and `1 - lr * weight_decay`.
pub struct AdamwTensor<'a> {
    pub w: &'a Tensor,
    pub g: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub keep: f32,
}

/// The step's constants, as `train::optim`'s in-place update takes them.
pub struct AdamwStep {
    pub grad_scale: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub step: f32,
    pub inv_sqrt_bc2: f32,
    pub eps: f32,
}

/// Every tensor's AdamW update in one launch. The weights and moments are written through
/// their device addresses (taken under candle's read access: all on the device's one stream).
pub fn adamw(tensors: &[AdamwTensor], k: &AdamwStep) -> Result<()> {
    let Some(first) = tensors.first() else {
        return Ok(());
    };
    let dev = first.w.device().as_cuda_device()?.clone();
    let stream = dev.cuda_stream();
    let mut ptrs: [Vec<u64>; 4] = Default::default();
    let (mut ends, mut keeps) = (Vec::new(), Vec::new());
    let mut total = 0u64;
    for t in tensors {
        let n = t.w.elem_count();
        for (i, x) in [t.w, t.g, t.m, t.v].into_iter().enumerate() {
            if x.elem_count() != n || x.dtype() != DType::F32 {
                return Err(bad(
                    "AdamW: weight, gradient and moments differ in size or type",
                ));
            }
            let (s, l) = x.storage_and_layout();
            let v = view(&s, l)?;
            let (ptr, _sync) = v.device_ptr(&stream);
            ptrs[i].push(ptr);
        }
        total += n as u64;
        ends.push(total);
        keeps.push(t.keep);
    }
    let [w, g, m, v] = ptrs;
    let up = |x: &[u64]| stream.clone_htod(x).w();
    let (w, g, m, v, ends) = (up(&w)?, up(&g)?, up(&m)?, up(&v)?, up(&ends)?);
    let keeps = stream.clone_htod(keeps.as_slice()).w()?;
    let func = dev.get_or_load_custom_func("st_adamw", MODULE, PTX)?;
    let count = tensors.len() as u32;
    {
        let mut b = func.builder();
        b.arg(&w);
        b.arg(&g);
        b.arg(&m);
        b.arg(&v);
        b.arg(&ends);
        b.arg(&keeps);
        b.arg(&count);
        b.arg(&total);
        b.arg(&k.grad_scale);
        b.arg(&k.beta1);
        b.arg(&k.beta2);
        b.arg(&k.step);
        b.arg(&k.inv_sqrt_bc2);
        b.arg(&k.eps);
        // SAFETY: the arguments match the kernel's signature; every address is a live f32 tensor
        // of the size its `ends` entry says (checked above), and the tensors outlive the launch on
        // this stream.
        unsafe { b.launch(grid(total)) }.w()?;
    }
    Ok(())
}

/// Whether `t` lives on a CUDA device.
pub fn on_cuda(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cuda(_))
}

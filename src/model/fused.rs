//! CPU kernels for linear (and GELU fused into it), as candle custom ops *with* a backward
//! pass, and the helpers every CPU kernel shares (reading and writing f32/bf16/f16 storage).
//!
//! The composed versions in `layers.rs` are correct on every device but keep several
//! intermediate tensors per call alive in the autograd graph, and pass over memory as often.
//! These keep only their inputs and output (the backward recomputes the rest, transiently), one
//! pass each way. Inputs may be f32, bf16 or f16: the arithmetic is f32 and the output takes the
//! input's type, so half precision halves what the graph keeps without losing precision in the
//! norms. Used on CPU; other devices take the composed path.

use std::borrow::Cow;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::vmath;
use crate::error::Result;

/// The contiguous elements of a CPU tensor as f32 (borrowed when already f32).
pub fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous input")
    };
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[a..b]),
        CpuStorage::BF16(v) => {
            let mut out = vec![0f32; b - a];
            v[a..b].convert_to_f32_slice(&mut out);
            Cow::Owned(out)
        }
        CpuStorage::F16(v) => {
            let mut out = vec![0f32; b - a];
            v[a..b].convert_to_f32_slice(&mut out);
            Cow::Owned(out)
        }
        _ => candle_core::bail!("{op}: expected a float input"),
    })
}

/// f32 results stored as `dtype` (f32, bf16 or f16).
pub fn cpu_storage(dtype: DType, v: Vec<f32>) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect()),
        DType::F16 => CpuStorage::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
        other => candle_core::bail!("expected a float type, got {other:?}"),
    })
}

/// Row `row` (of `out.len()` elements) of a contiguous CPU float tensor, as f32.
pub fn read_row(
    s: &CpuStorage,
    l: &Layout,
    row: usize,
    out: &mut [f32],
) -> candle_core::Result<()> {
    let Some((start, _)) = l.contiguous_offsets() else {
        candle_core::bail!("expected a contiguous input")
    };
    let r = start + row * out.len()..start + (row + 1) * out.len();
    match s {
        CpuStorage::F32(v) => out.copy_from_slice(&v[r]),
        CpuStorage::BF16(v) => v[r].convert_to_f32_slice(out),
        CpuStorage::F16(v) => v[r].convert_to_f32_slice(out),
        _ => candle_core::bail!("expected a float input"),
    }
    Ok(())
}

/// `n` elements of type `dtype`, computed `d` at a time (one row) in f32 by `f(row, buffer)`,
/// rows in parallel: a half-precision result never exists as a full f32 copy.
pub fn cpu_rows(
    dtype: DType,
    n: usize,
    d: usize,
    f: impl Fn(usize, &mut [f32]) -> candle_core::Result<()> + Sync,
) -> candle_core::Result<CpuStorage> {
    fn fill<T: Copy + Send + Sync>(
        n: usize,
        d: usize,
        zero: T,
        from_f32: impl Fn(f32) -> T + Sync,
        f: impl Fn(usize, &mut [f32]) -> candle_core::Result<()> + Sync,
    ) -> candle_core::Result<Vec<T>> {
        let mut out = vec![zero; n];
        out.par_chunks_mut(d).enumerate().try_for_each_init(
            || vec![0f32; d],
            |buf, (row, o)| {
                f(row, buf)?;
                o.iter_mut()
                    .zip(buf.iter())
                    .for_each(|(o, &v)| *o = from_f32(v));
                Ok::<_, candle_core::Error>(())
            },
        )?;
        Ok(out)
    }
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(fill(n, d, 0f32, |v| v, f)?),
        DType::BF16 => CpuStorage::BF16(fill(n, d, half::bf16::ZERO, half::bf16::from_f32, f)?),
        DType::F16 => CpuStorage::F16(fill(n, d, half::f16::ZERO, half::f16::from_f32, f)?),
        other => candle_core::bail!("expected a float type, got {other:?}"),
    })
}

/// A contiguous f32 CPU tensor as a slice: parameters (f32 whatever the activations' type), or an
/// f32 gradient.
pub fn f32_params<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    match cpu_f32(s, l, op)? {
        Cow::Borrowed(v) => Ok(v),
        Cow::Owned(_) => candle_core::bail!("{op}: expected f32 parameters"),
    }
}

/// `y = a Wᵀ + b` in one gemm call (the bias pre-loaded into the output), so the graph keeps
/// only `y`, not the product and the sum besides. With `gelu`, `a = gelu(x)` is computed here
/// and recomputed in the backward pass, so the feed-forward's widest activation is never kept;
/// otherwise `a = x`.
struct LinearOp {
    gelu: bool,
}

/// Elements per parallel task of the element-wise GELU passes.
const GELU_CHUNK: usize = 1 << 14;

/// `gelu(x)` as f32 from any float `x`, one pass (backward helper, no graph).
struct GeluF32;

impl CustomOp1 for GeluF32 {
    fn name(&self) -> &'static str {
        "st-tune-gelu-f32"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut x = cpu_f32(s, l, self.name())?.into_owned();
        x.par_chunks_mut(GELU_CHUNK).for_each(vmath::gelu);
        Ok((CpuStorage::F32(x), l.shape().clone()))
    }
}

/// `d ⊙ gelu'(x)` for an f32 `d`, in `x`'s type, one pass (backward helper, no graph). Rows
/// of `x` convert on the fly: an f32 copy of a half-precision `x` would be the widest
/// temporary of the backward pass.
struct GeluGradMul;

impl CustomOp2 for GeluGradMul {
    fn name(&self) -> &'static str {
        "st-tune-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = f32_params(s1, l1, self.name())?;
        let width = l2.dims().last().copied().unwrap_or(1);
        let out = cpu_rows(s2.dtype(), l2.shape().elem_count(), width, |row, x| {
            read_row(s2, l2, row, x)?;
            let d = &d[row * width..(row + 1) * width];
            vmath::gelu_grad_mul(x, d);
            Ok(())
        })?;
        Ok((out, l2.shape().clone()))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "st-tune-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let mut x = cpu_f32(s1, l1, self.name())?;
        if self.gelu {
            x.to_mut().par_chunks_mut(GELU_CHUNK).for_each(vmath::gelu);
        }
        let w = f32_params(s2, l2, self.name())?;
        let b = f32_params(s3, l3, self.name())?;
        let (n_out, k) = (b.len(), l2.dims()[1]);
        let m = x.len() / k;
        let mut out: Vec<f32> = Vec::with_capacity(m * n_out);
        for _ in 0..m {
            out.extend_from_slice(b);
        }
        // SAFETY: every pointer covers the extents given: x is (m, k) row-major, w is
        // (n_out, k) row-major read as its transpose, out is (m, n_out) row-major.
        unsafe {
            gemm::gemm(
                m,
                n_out,
                k,
                out.as_mut_ptr(),
                1,
                n_out as isize,
                true,
                x.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                1.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("2-D input") = n_out;
        Ok((cpu_storage(s1.dtype(), out)?, Shape::from(dims)))
    }

    /// dW = gᵀ a, db = Σ_rows g, dx = g W (⊙ gelu'(x) with `gelu`).
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The f32 temporaries as large as x or g live one or two at a time.
        let (x, w) = (x.detach().contiguous()?, w.detach());
        let g = g.to_dtype(DType::F32)?;
        let db = g.sum(0)?;
        let a = if self.gelu {
            x.apply_op1_no_bwd(&GeluF32)?
        } else {
            x.to_dtype(DType::F32)?
        };
        let dw = g.t()?.matmul(&a)?;
        drop(a);
        let dx = g.matmul(&w)?;
        drop(g);
        let dx = if self.gelu {
            dx.apply_op2_no_bwd(&x, &GeluGradMul)?
        } else {
            dx.to_dtype(x.dtype())?
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `x Wᵀ + b` for a 2-D CPU `x` (f32, bf16 or f16; `w`, `b` f32), with a backward pass. The
/// output has `x`'s type.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(w, b, LinearOp { gelu: false })?)
}

/// `gelu(x) Wᵀ + b` for a 2-D CPU `x`, keeping only `x` and the output for the backward pass.
pub fn gelu_linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(w, b, LinearOp { gelu: true })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{assert_same_function, max_diff as close};
    use candle_core::{Device, Var};

    #[test]
    fn fused_linear_matches_matmul_plus_bias_in_value_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 3, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (6, 3), &dev).unwrap();
        let a = linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let c = x
            .as_tensor()
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert_same_function(&a, &c, &probe, &[&x, &w, &b], 1e-5);
    }

    #[test]
    fn fused_gelu_linear_matches_gelu_then_matmul_in_value_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (6, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 3, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (6, 3), &dev).unwrap();
        let a = gelu_linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let c = x
            .as_tensor()
            .gelu_erf()
            .unwrap()
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert_same_function(&a, &c, &probe, &[&x, &w, &b], 1e-5);
    }

    #[test]
    fn half_precision_inputs_keep_their_type_and_gradients_stay_close_to_f32() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.3, (3, 8), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::zeros(3, DType::F32, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap();
        for op in [linear, gelu_linear] {
            // (output, d x, d w) with x in `dtype`.
            let run = |dtype| {
                let x = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
                let y = op(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
                assert_eq!(y.dtype(), dtype);
                let y = y.to_dtype(DType::F32).unwrap();
                let g = crate::model::testing::grads_through(&y, &probe);
                let dx = g.get(x.as_tensor()).unwrap().clone();
                assert_eq!(dx.dtype(), dtype);
                (y, dx, g.get(&w).unwrap().clone())
            };
            let full = run(DType::F32);
            for dtype in [DType::BF16, DType::F16] {
                let half = run(dtype);
                assert!(close(&half.0, &full.0) < 0.05, "{dtype:?} output");
                assert!(close(&half.1, &full.1) < 0.05, "{dtype:?} d x");
                assert!(close(&half.2, &full.2) < 0.05, "{dtype:?} d w");
            }
        }
    }
}

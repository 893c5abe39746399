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

use super::bf16_gemm::{self, Elems, Mat, Out};
use super::storage::{cpu_f32, cpu_rows, cpu_storage, f32_params, read_row};
use super::vmath;
use crate::error::Result;

/// A contiguous f32 or bf16 CPU tensor as an operand of [`bf16_gemm`].
fn gemm_elems<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<Elems<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous input")
    };
    Ok(match s {
        CpuStorage::F32(v) => Elems::F32(&v[a..b]),
        CpuStorage::BF16(v) => Elems::Bf16(&v[a..b]),
        _ => candle_core::bail!("{op}: expected an f32 or bf16 input"),
    })
}

/// The contiguous elements of a bf16 CPU tensor.
fn bf16_elems<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [half::bf16]> {
    match gemm_elems(s, l, op)? {
        Elems::Bf16(v) => Ok(v),
        Elems::F32(_) => candle_core::bail!("{op}: expected a bf16 input"),
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

/// `gelu(x)` rounded to bf16, computed in f32 a chunk at a time: the operand of the products
/// when `x` is bf16.
fn gelu_bf16(x: &[half::bf16]) -> Vec<half::bf16> {
    let mut out = vec![half::bf16::ZERO; x.len()];
    out.par_chunks_mut(GELU_CHUNK)
        .zip(x.par_chunks(GELU_CHUNK))
        .for_each_init(
            || vec![0f32; GELU_CHUNK],
            |buf, (o, x)| {
                let buf = &mut buf[..x.len()];
                x.convert_to_f32_slice(buf);
                vmath::gelu(buf);
                bf16_gemm::narrow(buf, o);
            },
        );
    out
}

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

/// `g W` stored as `dtype` (f32 or bf16), for `g` (tokens, out) in bf16 or f32 and f32 `W`
/// (out, in), multiplied in bf16 with f32 sums (backward helper of bf16 linears, no graph).
struct GradInput {
    dtype: DType,
}

impl CustomOp2 for GradInput {
    fn name(&self) -> &'static str {
        "st-tune-linear-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = gemm_elems(s1, l1, self.name())?;
        let w = f32_params(s2, l2, self.name())?;
        let (n_out, k) = l2.shape().dims2()?;
        let m = l1.shape().elem_count() / n_out.max(1);
        let (g, w) = (Mat::new(g, m, n_out), Mat::new(Elems::F32(w), n_out, k));
        let dx = if self.dtype == DType::BF16 {
            let mut dx = vec![half::bf16::ZERO; m * k];
            let out = Out::Bf16 {
                c: &mut dx,
                bias: None,
            };
            bf16_gemm::matmul(out, g, w)?;
            CpuStorage::BF16(dx)
        } else {
            let mut dx = vec![0f32; m * k];
            let out = Out::F32 {
                c: &mut dx,
                accumulate: false,
            };
            bf16_gemm::matmul(out, g, w)?;
            CpuStorage::F32(dx)
        };
        Ok((dx, Shape::from((m, k))))
    }
}

/// `gᵀ a` as f32, for `g` (tokens, out) in bf16 or f32 and `a` = `x` or `gelu(x)` for a bf16
/// `x` (tokens, in), multiplied in bf16 with f32 sums (backward helper, no graph).
struct GradWeight {
    gelu: bool,
}

impl CustomOp2 for GradWeight {
    fn name(&self) -> &'static str {
        "st-tune-linear-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = gemm_elems(s1, l1, self.name())?;
        let x = bf16_elems(s2, l2, self.name())?;
        let k = l2.dims().last().copied().unwrap_or(1).max(1);
        let m = x.len() / k;
        let n_out = l1.shape().elem_count() / m.max(1);
        let a = if self.gelu {
            Cow::Owned(gelu_bf16(x))
        } else {
            Cow::Borrowed(x)
        };
        let mut dw = vec![0f32; n_out * k];
        let (g, a) = (Mat::new(g, m, n_out).t(), Mat::new(Elems::Bf16(&a), m, k));
        let out = Out::F32 {
            c: &mut dw,
            accumulate: false,
        };
        bf16_gemm::matmul(out, g, a)?;
        Ok((CpuStorage::F32(dw), Shape::from((n_out, k))))
    }
}

/// Column sums of a 2-D bf16 or f32 `g`, as f32: the bias gradient.
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "st-tune-column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let mut sum = vec![0f32; n];
        add_column_sums(gemm_elems(s, l, self.name())?, &mut sum);
        Ok((CpuStorage::F32(sum), Shape::from(n)))
    }
}

/// Adds the column sums of `g` (rows × out.len(), row-major) to `out`. Column chunks in
/// parallel, rows summed in order: the result does not depend on the threads (resumed runs are
/// bit-identical).
pub(crate) fn add_column_sums(g: Elems, out: &mut [f32]) {
    const COLS: usize = 64;
    let n = out.len().max(1);
    let m = g.len() / n;
    out.par_chunks_mut(COLS).enumerate().for_each(|(c, sum)| {
        let c = c * COLS;
        for r in 0..m {
            let at = r * n + c..r * n + c + sum.len();
            match g {
                Elems::F32(v) => sum.iter_mut().zip(&v[at]).for_each(|(s, v)| *s += v),
                Elems::Bf16(v) => sum
                    .iter_mut()
                    .zip(&v[at])
                    .for_each(|(s, v)| *s += v.to_f32()),
            }
        }
    });
}

impl LinearOp {
    /// The forward pass for a bf16 `x`: the product in bf16 with f32 sums, the bias added in
    /// f32, one rounding to bf16.
    fn cpu_fwd_bf16(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        w: &[f32],
        b: &[f32],
        k: usize,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = bf16_elems(s1, l1, self.name())?;
        let n_out = b.len();
        let m = x.len() / k.max(1);
        let a = if self.gelu {
            Cow::Owned(gelu_bf16(x))
        } else {
            Cow::Borrowed(x)
        };
        let mut y = vec![half::bf16::ZERO; m * n_out];
        let (a, w) = (
            Mat::new(Elems::Bf16(&a), m, k),
            Mat::new(Elems::F32(w), n_out, k),
        );
        let out = Out::Bf16 {
            c: &mut y,
            bias: Some(b),
        };
        bf16_gemm::matmul(out, a, w.t())?;
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("2-D input") = n_out;
        Ok((CpuStorage::BF16(y), Shape::from(dims)))
    }

    /// The backward pass for a bf16 `x`: both products in bf16 with f32 sums; dW and db in f32
    /// (they update f32 master weights), dx in bf16.
    fn bwd_bf16(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.detach().contiguous()?, w.detach(), g.contiguous()?);
        let db = g.apply_op1_no_bwd(&ColumnSums)?;
        let dw = g.apply_op2_no_bwd(&x, &GradWeight { gelu: self.gelu })?;
        // With gelu, dx stays f32 until multiplied by gelu'(x).
        let dtype = if self.gelu { DType::F32 } else { DType::BF16 };
        let dx = g.apply_op2_no_bwd(&w, &GradInput { dtype })?;
        let dx = dx.reshape(x.shape())?;
        let dx = if self.gelu {
            dx.apply_op2_no_bwd(&x, &GeluGradMul)?
        } else {
            dx
        };
        Ok((Some(dx), Some(dw), Some(db)))
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
        if s1.dtype() == DType::BF16 {
            let w = f32_params(s2, l2, self.name())?;
            let b = f32_params(s3, l3, self.name())?;
            return self.cpu_fwd_bf16(s1, l1, w, b, l2.dims()[1]);
        }
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
        // x is (m, k) row-major; w is (n_out, k) row-major, read as its transpose.
        super::gemm_crate::gemm_crate(&mut out, (m, n_out, k), (&x, (k, 1)), (w, (1, k)), true);
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
        if x.dtype() == DType::BF16 {
            return self.bwd_bf16(x, w, g);
        }
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
    use crate::testing::{assert_same_function, max_diff as close};
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
                let g = crate::testing::grads_through(&y, &probe);
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

//! CPU kernels for softmax and layer norm, as candle custom ops *with* a backward pass.
//!
//! The composed versions in `layers.rs` are correct on every device but keep five or six
//! intermediate tensors per call alive in the autograd graph, and pass over memory as often.
//! These keep only their input and output (the backward recomputes the rest, transiently), one
//! pass each way. Used on CPU; other devices take the composed path.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::error::Result;

fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: expected an f32 input")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous input"),
    }
}

/// Softmax over the last dimension.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "st-tune-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let d = l.dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, x)| {
                let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0f32;
                for (o, &v) in o.iter_mut().zip(x) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                let inv = 1.0 / sum;
                o.iter_mut().for_each(|v| *v *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    /// dx = y ⊙ (g − Σ g⊙y)
    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let y = res.detach();
        let gy = (grad * &y)?.sum_keepdim(D::Minus1)?;
        Ok(Some(y.mul(&grad.broadcast_sub(&gy)?)?))
    }
}

/// Layer norm over the last dimension: (x − mean) / sqrt(var + eps) · w + b.
struct LayerNormOp {
    eps: f32,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "st-tune-layer-norm"
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
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, x)| {
                let mean = x.iter().sum::<f32>() / d as f32;
                let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                let rstd = 1.0 / (var + self.eps).sqrt();
                for i in 0..d {
                    o[i] = (x[i] - mean) * rstd * w[i] + b[i];
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// With x̂ = (x − μ)·r and ĝ = g ⊙ w: dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂)),
    /// dw = Σ_rows g ⊙ x̂, db = Σ_rows g.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w) = (x.detach(), w.detach());
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let rstd = (centered.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?
            .sqrt()?
            .recip()?;
        let xhat = centered.broadcast_mul(&rstd)?;
        let rows = x.elem_count() / w.elem_count();
        let flat = |t: &Tensor| t.reshape((rows, w.elem_count()));
        let dw = flat(&(g * &xhat)?)?.sum(0)?;
        let db = flat(g)?.sum(0)?;
        let gh = g.broadcast_mul(&w)?;
        let m1 = gh.mean_keepdim(D::Minus1)?;
        let m2 = (&gh * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gh
            .broadcast_sub(&m1)?
            .sub(&xhat.broadcast_mul(&m2)?)?
            .broadcast_mul(&rstd)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `y = scale · (x Wᵀ + b)` in one gemm call (the bias pre-loaded into the output), so the graph
/// keeps only `y`, not the product and the sum besides.
struct LinearOp {
    scale: f32,
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
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let (n_out, k) = (b.len(), l2.dims()[1]);
        let m = x.len() / k;
        let mut out: Vec<f32> = Vec::with_capacity(m * n_out);
        for _ in 0..m {
            out.extend(b.iter().map(|v| v * self.scale));
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
                self.scale,
                false,
                false,
                false,
                gemm::Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("2-D input") = n_out;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    /// dx = s·g W, dW = s·gᵀ x, db = s·Σ_rows g.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w) = (x.detach(), w.detach());
        let g = if self.scale == 1.0 {
            g.clone()
        } else {
            (g * self.scale as f64)?
        };
        let dx = g.matmul(&w)?;
        let dw = g.t()?.matmul(&x)?;
        let db = g.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `scale · (x Wᵀ + b)` for a 2-D f32 CPU `x`, with a backward pass.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(
        w,
        b,
        LinearOp {
            scale: scale as f32,
        },
    )?)
}

/// Softmax over the last dimension of an f32 CPU tensor, with a backward pass.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::F32)?.contiguous()?.apply_op1(Softmax)?)
}

/// Layer norm of an f32 CPU tensor over its last dimension, with a backward pass.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?.contiguous()?;
    Ok(x.apply_op3(w, b, LayerNormOp { eps: eps as f32 })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fused_linear_matches_matmul_plus_bias_in_value_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 5), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 3, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (6, 3), &dev).unwrap();
        let a = linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), 0.5).unwrap();
        let c = ((x
            .as_tensor()
            .matmul(&w.as_tensor().t().unwrap())
            .unwrap()
            .broadcast_add(b.as_tensor()))
        .unwrap()
            * 0.5)
            .unwrap();
        assert!(close(&a, &c) < 1e-5);
        let ga = (&a * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&c * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            assert!(close(ga.get(v).unwrap(), gc.get(v).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn fused_softmax_matches_the_composed_one_in_value_and_gradient() {
        let x =
            Var::from_tensor(&(Tensor::randn(0f32, 3.0, (4, 7), &Device::Cpu).unwrap())).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 7), &Device::Cpu).unwrap();
        let a = softmax(x.as_tensor()).unwrap();
        let b = layers::softmax_composed(x.as_tensor()).unwrap();
        assert!(close(&a, &b) < 1e-6);
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(close(ga.get(&x).unwrap(), gb.get(&x).unwrap()) < 1e-6);
    }

    #[test]
    fn fused_layer_norm_matches_the_composed_one_in_value_and_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0.5f32, 2.0, (5, 8), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 8, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, 8, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (5, 8), &dev).unwrap();
        let a = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let c =
            layers::layer_norm_composed(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        assert!(close(&a, &c) < 1e-5);
        let ga = (&a * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&c * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w, &b] {
            assert!(close(ga.get(v).unwrap(), gc.get(v).unwrap()) < 1e-5);
        }
    }
}

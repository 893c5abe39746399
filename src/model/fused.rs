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

//! Layer norm as a CPU kernel with its own backward pass, row by row.
//!
//! Each row is read into a small f32 buffer, normalised, and written back in the input's type,
//! so neither pass makes a full-size f32 copy of a half-precision input. The backward pass
//! recomputes the row's mean and deviation instead of keeping them, and sums the weight and
//! bias gradients per block of rows.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::storage::{cpu_rows, f32_params, read_row};
#[cfg(test)]
use crate::engine::mask::HiddenMask;
use crate::error::Result;

/// Layer norm of a CPU tensor (f32, bf16 or f16; `w`, `b` f32) over its last dimension, with a
/// backward pass. The output has `x`'s type.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(x.apply_op3(w, b, LayerNormOp { eps: eps as f32 })?)
}

/// Layer norm over the last dimension: (x − mean) / sqrt(var + eps) · w + b.
struct LayerNormOp {
    eps: f32,
}

/// x̂ = (x − μ)·r in place; returns r = 1 / sqrt(var + eps).
fn normalise(x: &mut [f32], eps: f32) -> f32 {
    let d = x.len() as f32;
    let mean = x.iter().sum::<f32>() / d;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d;
    let rstd = 1.0 / (var + eps).sqrt();
    x.iter_mut().for_each(|v| *v = (*v - mean) * rstd);
    rstd
}

/// One row of layer norm in place: normalised, then scaled by `w` and shifted by `b`.
fn normalise_affine(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    normalise(x, eps);
    for ((x, w), b) in x.iter_mut().zip(w).zip(b) {
        *x = *x * w + b;
    }
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
        let w = f32_params(s2, l2, self.name())?;
        let b = f32_params(s3, l3, self.name())?;
        let out = cpu_rows(s1.dtype(), l1.shape().elem_count(), w.len(), |row, o| {
            read_row(s1, l1, row, o)?;
            normalise_affine(o, w, b, self.eps);
            Ok(())
        })?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, w, g) = (x.detach(), w.detach(), g.contiguous()?);
        let grad = |part| LayerNormGrad {
            eps: self.eps,
            part,
        };
        let dx = x.apply_op3_no_bwd(&w, &g, &grad(Part::Input))?;
        let params = x.apply_op3_no_bwd(&w, &g, &grad(Part::Params))?;
        Ok((Some(dx), Some(params.get(0)?), Some(params.get(1)?)))
    }
}

/// Which gradient of layer norm to compute from its input and output gradient.
#[derive(Clone, Copy)]
enum Part {
    /// dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂)) with ĝ = g ⊙ w, in x's type.
    Input,
    /// (2, d) f32: dw = Σ_rows g ⊙ x̂ and db = Σ_rows g.
    Params,
}

struct LayerNormGrad {
    eps: f32,
    part: Part,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "st-tune-layer-norm-grad"
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
        let w = f32_params(s2, l2, self.name())?;
        let input = |row: usize, out: &mut [f32]| read_row(s1, l1, row, out);
        let grad = |row: usize, out: &mut [f32]| read_row(s3, l3, row, out);
        grads(self.part, s1.dtype(), l1.shape(), w, self.eps, input, grad)
    }
}

/// One part of layer norm's backward pass, from a reader of the norm's input rows and one of
/// the output gradient's rows (the plain and the residual kernels differ only in the first).
fn grads(
    part: Part,
    dtype: DType,
    shape: &Shape,
    w: &[f32],
    eps: f32,
    input: impl Fn(usize, &mut [f32]) -> candle_core::Result<()> + Sync,
    grad: impl Fn(usize, &mut [f32]) -> candle_core::Result<()> + Sync,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let d = w.len();
    let rows = shape.elem_count() / d;
    match part {
        Part::Input => {
            let out = cpu_rows(dtype, rows * d, d, |row, dx| {
                let mut g = vec![0f32; d];
                input(row, dx)?;
                grad(row, &mut g)?;
                let rstd = normalise(dx, eps);
                let (mut m1, mut m2) = (0f32, 0f32);
                for i in 0..d {
                    g[i] *= w[i];
                    m1 += g[i];
                    m2 += g[i] * dx[i];
                }
                let (m1, m2) = (m1 / d as f32, m2 / d as f32);
                for i in 0..d {
                    dx[i] = rstd * (g[i] - m1 - dx[i] * m2);
                }
                Ok(())
            })?;
            Ok((out, shape.clone()))
        }
        Part::Params => {
            // Fixed blocks of rows summed in block order: the same sums, bit for bit,
            // whatever the thread count or scheduling (a rayon reduce is not).
            let blocks = (0..rows.div_ceil(ROWS_PER_BLOCK))
                .into_par_iter()
                .map(|b| {
                    let (mut acc, mut xh, mut g) =
                        (vec![0f32; 2 * d], vec![0f32; d], vec![0f32; d]);
                    for row in b * ROWS_PER_BLOCK..((b + 1) * ROWS_PER_BLOCK).min(rows) {
                        input(row, &mut xh)?;
                        grad(row, &mut g)?;
                        normalise(&mut xh, eps);
                        let (dw, db) = acc.split_at_mut(d);
                        for i in 0..d {
                            dw[i] += g[i] * xh[i];
                            db[i] += g[i];
                        }
                    }
                    Ok::<_, candle_core::Error>(acc)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let mut sums = vec![0f32; 2 * d];
            for block in blocks {
                sums.iter_mut().zip(&block).for_each(|(a, b)| *a += b);
            }
            Ok((CpuStorage::F32(sums), Shape::from((2, d))))
        }
    }
}

/// Layer norm of `x`, (rows, w.len()) f32, in place: what the kernels above compute, for
/// kernels that hold their activations as plain slices (`layer_op.rs`).
pub(crate) fn norm_rows(x: &mut [f32], w: &[f32], b: &[f32], eps: f32) {
    x.par_chunks_mut(w.len())
        .for_each(|o| normalise_affine(o, w, b, eps));
}

/// Row `row` of `s`, rows `d` wide, as the kernels above read their inputs.
fn rows(s: &[f32], d: usize) -> impl Fn(usize, &mut [f32]) -> candle_core::Result<()> + Sync + '_ {
    move |row, out| {
        out.copy_from_slice(&s[row * d..(row + 1) * d]);
        Ok(())
    }
}

fn f32s((s, _): (CpuStorage, Shape)) -> candle_core::Result<Vec<f32>> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("layer norm: expected f32 gradients"),
    }
}

/// Layer norm's backward pass over plain slices: (d input, d w ‖ d b) from the norm's input
/// `x` and output gradient `g`, both (rows, w.len()) f32.
pub(crate) fn norm_rows_backward(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    eps: f32,
) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let d = w.len();
    let shape = Shape::from((x.len() / d, d));
    let dx = norm_rows_backward_input(x, g, w, eps)?;
    let dwb = f32s(grads(
        Part::Params,
        DType::F32,
        &shape,
        w,
        eps,
        rows(x, d),
        rows(g, d),
    )?)?;
    Ok((dx, dwb))
}

/// d input of layer norm over plain slices.
fn norm_rows_backward_input(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    eps: f32,
) -> candle_core::Result<Vec<f32>> {
    let d = w.len();
    let shape = Shape::from((x.len() / d, d));
    f32s(grads(
        Part::Input,
        DType::F32,
        &shape,
        w,
        eps,
        rows(x, d),
        rows(g, d),
    )?)
}

/// [`norm_rows_backward`] with the weight and bias gradients summed row after row, in order,
/// into `dw` and `db` (the step's sums): the same bits however the step's rows are cut into
/// calls. Returns d input.
pub(crate) fn norm_rows_backward_in_order(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    eps: f32,
    (dw, db): (&mut [f32], &mut [f32]),
) -> candle_core::Result<Vec<f32>> {
    let d = w.len();
    let dx = norm_rows_backward_input(x, g, w, eps)?;
    let mut xh = x.to_vec();
    xh.par_chunks_mut(d).for_each(|row| {
        normalise(row, eps);
    });
    // Column blocks in parallel, each summing every row in turn.
    const COLS: usize = 64;
    dw.par_chunks_mut(COLS)
        .zip(db.par_chunks_mut(COLS))
        .enumerate()
        .for_each(|(c, (dw, db))| {
            let c = c * COLS;
            for (xh, g) in xh.chunks(d).zip(g.chunks(d)) {
                let (xh, g) = (&xh[c..c + dw.len()], &g[c..c + dw.len()]);
                for i in 0..dw.len() {
                    dw[i] += g[i] * xh[i];
                    db[i] += g[i];
                }
            }
        });
    Ok(dx)
}

#[cfg(test)]
/// `layer_norm(x + mask ⊙ y)`: the residual connection, the sublayer's dropout and the norm
/// after it as one op. Neither the dropped-out `y` nor the sum is kept for the backward pass
/// (both are recomputed row by row from `x` and `y`, which the graph holds anyway), and one
/// node replaces three, each of which candle's backward pass gives a zeroed gradient buffer.
pub fn add_layer_norm(
    x: &Tensor,
    y: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    mask: Option<HiddenMask>,
) -> Result<Tensor> {
    let wb = Tensor::stack(&[w, b], 0)?;
    let y = y.to_dtype(x.dtype())?.contiguous()?;
    let op = AddLayerNormOp {
        eps: eps as f32,
        mask,
    };
    Ok(x.contiguous()?.apply_op3(&y, &wb, op)?)
}

#[cfg(test)]
struct AddLayerNormOp {
    eps: f32,
    mask: Option<HiddenMask>,
}

#[cfg(test)]
impl AddLayerNormOp {
    /// Row `row` of `x + mask ⊙ y` into `out`.
    fn sum_row(
        &self,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        row: usize,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let mut y = vec![0f32; out.len()];
        read_row(s1, l1, row, out)?;
        read_row(s2, l2, row, &mut y)?;
        if let Some(m) = &self.mask {
            m.apply_row(row, &mut y);
        }
        out.iter_mut().zip(&y).for_each(|(o, y)| *o += y);
        Ok(())
    }
}

#[cfg(test)]
impl CustomOp3 for AddLayerNormOp {
    fn name(&self) -> &'static str {
        "st-tune-add-layer-norm"
    }

    /// Inputs: x, y (same shape and type), and (2, d) f32 holding w then b.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("add-layer-norm: {:?} + {:?}", l1.shape(), l2.shape());
        }
        let wb = f32_params(s3, l3, self.name())?;
        let (w, b) = wb.split_at(wb.len() / 2);
        let out = cpu_rows(s1.dtype(), l1.shape().elem_count(), w.len(), |row, o| {
            self.sum_row((s1, l1), (s2, l2), row, o)?;
            normalise_affine(o, w, b, self.eps);
            Ok(())
        })?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        y: &Tensor,
        wb: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, y, g) = (x.detach(), y.detach(), g.contiguous()?);
        let w = wb.detach().get(0)?.to_vec1::<f32>()?;
        let grad = |part| AddLayerNormGrad {
            norm: AddLayerNormOp {
                eps: self.eps,
                mask: self.mask.clone(),
            },
            w: w.clone(),
            part,
        };
        let dx = x.apply_op3_no_bwd(&y, &g, &grad(Part::Input))?;
        let dwb = x.apply_op3_no_bwd(&y, &g, &grad(Part::Params))?;
        // d(x + mask ⊙ y): the sum's gradient for x, masked for y.
        let dy = match &self.mask {
            Some(m) => dx.apply_op1_no_bwd(m)?,
            None => dx.clone(),
        };
        Ok((Some(dx), Some(dy), Some(dwb)))
    }
}

#[cfg(test)]
/// The gradients of [`AddLayerNormOp`] from (x, y, g): d(sum) in x's type, or d(w, b) as (2, d).
struct AddLayerNormGrad {
    norm: AddLayerNormOp,
    w: Vec<f32>,
    part: Part,
}

#[cfg(test)]
impl CustomOp3 for AddLayerNormGrad {
    fn name(&self) -> &'static str {
        "st-tune-add-layer-norm-grad"
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
        let input = |row: usize, out: &mut [f32]| self.norm.sum_row((s1, l1), (s2, l2), row, out);
        let grad = |row: usize, out: &mut [f32]| read_row(s3, l3, row, out);
        let eps = self.norm.eps;
        grads(self.part, s1.dtype(), l1.shape(), &self.w, eps, input, grad)
    }
}

/// Rows per partial sum of the weight and bias gradients.
const ROWS_PER_BLOCK: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::layers;
    use crate::testing::{assert_same_function, max_diff};
    use candle_core::{DType, Device, Var};

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
        assert_same_function(&a, &c, &probe, &[&x, &w, &b], 1e-5);
    }

    #[test]
    fn the_residual_kernel_matches_dropout_add_and_norm_composed_in_value_and_gradients() {
        use crate::model::dropout::Dropout;
        let dev = Device::Cpu;
        let var = |t: Tensor| Var::from_tensor(&t).unwrap();
        let x = var(Tensor::randn(0.5f32, 2.0, (7, 8), &dev).unwrap());
        let y = var(Tensor::randn(0f32, 1.0, (7, 8), &dev).unwrap());
        let w = var(Tensor::randn(1f32, 0.1, 8, &dev).unwrap());
        let b = var(Tensor::randn(0f32, 0.1, 8, &dev).unwrap());
        let probe = Tensor::randn(0f32, 1.0, (7, 8), &dev).unwrap();
        let lengths = [3usize, 4];
        for drop in [Dropout::off(), Dropout::train(0.3, 0.0, 5, 2, vec![11, 12])] {
            let mask = drop.hidden_mask(&lengths, 4);
            assert_eq!(mask.is_some(), drop.hidden_p > 0.0);
            let (xt, yt) = (x.as_tensor(), y.as_tensor());
            let a = add_layer_norm(xt, yt, w.as_tensor(), b.as_tensor(), 1e-5, mask).unwrap();
            let sum = (drop.hidden(yt, &lengths, 4).unwrap() + xt).unwrap();
            let c = layers::layer_norm_composed(&sum, w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
            assert_same_function(&a, &c, &probe, &[&x, &y, &w, &b], 1e-5);
        }
    }

    #[test]
    fn half_precision_inputs_keep_their_type_and_stay_close_to_f32() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0.5f32, 2.0, (7, 16), &dev).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.1, 16, &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 0.1, 16, &dev).unwrap()).unwrap();
        let probe = Tensor::randn(0f32, 1.0, (7, 16), &dev).unwrap();
        let y32 = layer_norm(&x, w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
        let grads = |x: &Var| {
            let y = layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap();
            assert_eq!(y.dtype(), x.dtype());
            assert!(max_diff(&y, &y32) < 0.05, "output {:?}", x.dtype());
            let p = probe.to_dtype(y.dtype()).unwrap();
            let s = (y.to_dtype(DType::F32).unwrap() * p.to_dtype(DType::F32).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gx = s.get(x.as_tensor()).unwrap().clone();
            (gx, s.get(&w).unwrap().clone(), s.get(&b).unwrap().clone())
        };
        let full = grads(&Var::from_tensor(&x).unwrap());
        for dtype in [DType::BF16, DType::F16] {
            let half = grads(&Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap());
            assert_eq!(half.0.dtype(), dtype);
            assert_eq!(half.1.dtype(), DType::F32);
            assert!(max_diff(&half.0, &full.0) < 0.05, "dx {:?}", dtype);
            assert!(max_diff(&half.1, &full.1) < 0.1, "dw {:?}", dtype);
            assert!(max_diff(&half.2, &full.2) < 0.05, "db {:?}", dtype);
        }
    }
}

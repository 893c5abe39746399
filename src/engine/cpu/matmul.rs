//! The one matrix-product dispatch of the CPU kernels: bf16 operands with f32 sums where the
//! CPU has bf16 dot products and the activations are bf16 (`bf16_gemm`), st-tune's AVX-512 f32
//! kernel for the forward product (`f32_gemm`), and the gemm crate for everything else (on
//! AVX2-only CPUs too: its AVX2 kernel beat a port of `f32_gemm` to AVX2, docs/benchmarks.md).

use candle_core::DType;

use super::fused::add_column_sums;
use super::{bf16_gemm, f32_gemm, gemm_crate, wgrad};

/// How the layer's matrix products run: in f32 (the `gemm` crate, and `f32_gemm` for the
/// forward product with AVX-512), or, with bf16 activations
/// on a CPU with bf16 dot-product instructions, with bf16 operands and f32 sums (`bf16_gemm`;
/// weights and gradients are rounded to bf16 as `torch.autocast` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    F32,
    Bf16,
}

impl Products {
    pub fn for_dtype(dtype: DType) -> Self {
        if dtype == DType::BF16 && bf16_gemm::path() != bf16_gemm::Path::F32 {
            Products::Bf16
        } else {
            Products::F32
        }
    }
}

/// An operand of `matmul`: a slice read with (row, column) strides.
pub type Operand<'a> = gemm_crate::Strided<'a>;

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
pub fn matmul(
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
    let rows = rows_for_gemm_crate(m, n);
    if rows == m || m == 0 {
        gemm_crate::gemm_crate(dst, (m, n, k), a, b, accumulate);
        return Ok(());
    }
    // Too few rows for the blocked kernel: the same product over zero rows added below.
    let ((a, (rs, cs)), mut out) = (a, vec![0f32; rows * n]);
    let mut padded = vec![0f32; rows * k];
    for (r, row) in padded.chunks_mut(k).take(m).enumerate() {
        row.iter_mut()
            .enumerate()
            .for_each(|(c, v)| *v = a[r * rs + c * cs]);
    }
    out[..m * n].copy_from_slice(&dst[..m * n]);
    gemm_crate::gemm_crate(&mut out, (rows, n, k), (&padded, (k, 1)), b, accumulate);
    dst[..m * n].copy_from_slice(&out[..m * n]);
    Ok(())
}

/// Rows the gemm crate is given for a product of `m` rows and `n` columns. It sums a row's
/// products in another order when a call has few rows (a matrix-vector product at one row, a
/// horizontal-sum kernel while m·n ≤ 256, another depth blocking while m, n ≤ 64): a row's
/// result would then depend on the rows beside it, and a micro-batch's rows would not come out
/// as in the whole batch. Fewer rows than this are padded with zero rows.
fn rows_for_gemm_crate(m: usize, n: usize) -> usize {
    match n {
        0 | 1 => m,
        2..=64 => m.max(65).max(256 / n + 1),
        _ => m.max(2).max(256 / n + 1),
    }
}

/// `x (t × k) · Wᵀ + bias` with W stored (n × k), as PyTorch's `Linear`.
pub fn linear(
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
pub fn linear_backward(
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
    bias_and_input_grads(how, dy, w, db, k)
}

/// `linear_backward` in f32 with the parameter gradients summed over tokens in order into
/// `dw` and `db` (the step's sums, see `wgrad.rs`): the same bits however the step's tokens
/// are cut into calls.
pub fn linear_backward_in_order(
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    (dw, db): (&mut [f32], &mut [f32]),
    k: usize,
) -> candle_core::Result<Vec<f32>> {
    let n = db.len();
    wgrad::add_weight_grad(dw, dy, (n, 0, n), x, k);
    bias_and_input_grads(Products::F32, dy, w, db, k)
}

/// The rest of a linear layer's backward pass, after its weight gradient: adds the column sums
/// of `dy` to `db` (row after row), and returns `dy W` (t × k).
fn bias_and_input_grads(
    how: Products,
    dy: &[f32],
    w: &[f32],
    db: &mut [f32],
    k: usize,
) -> candle_core::Result<Vec<f32>> {
    let n = db.len();
    let t = dy.len() / n;
    add_column_sums(bf16_gemm::Elems::F32(dy), db);
    let mut dx = vec![0f32; t * k];
    matmul(how, &mut dx, (t, k, n), (dy, (n, 1)), (w, (k, 1)), false)?;
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    /// A row's output and input gradient do not depend on the other rows of the call: a
    /// micro-batch's rows come out as they do in the whole batch (what makes cut steps exact).
    #[test]
    fn a_row_does_not_depend_on_the_rows_beside_it() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut values =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
        for (t, k, n) in [
            (37, 48, 40),
            (300, 384, 1536),
            (260, 1536, 384),
            (70, 16, 32),
            (90, 32, 16),
        ] {
            let (x, w, b, dy) = (values(t * k), values(n * k), values(n), values(t * n));
            let y = linear(Products::F32, &x, &w, &b, k).unwrap();
            let (mut dw, mut db) = (vec![0f32; n * k], vec![0f32; n]);
            let dx = linear_backward_in_order(&dy, &x, &w, (&mut dw, &mut db), k).unwrap();
            for rows in [0..1, 3..8, 5..t, 0..t - 1] {
                let part =
                    linear(Products::F32, &x[rows.start * k..rows.end * k], &w, &b, k).unwrap();
                assert!(
                    part == y[rows.start * n..rows.end * n],
                    "forward, t={t} rows {rows:?}"
                );
                let (mut dw, mut db) = (vec![0f32; n * k], vec![0f32; n]);
                let dy = &dy[rows.start * n..rows.end * n];
                let x = &x[rows.start * k..rows.end * k];
                let part = linear_backward_in_order(dy, x, &w, (&mut dw, &mut db), k).unwrap();
                assert!(
                    part == dx[rows.start * k..rows.end * k],
                    "d input, t={t} rows {rows:?}"
                );
            }
        }
    }
}

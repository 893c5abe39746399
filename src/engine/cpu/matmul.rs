//! The one matrix-product dispatch of the CPU kernels: bf16 operands with f32 sums where the
//! CPU has bf16 dot products and the activations are bf16 (`bf16_gemm`), st-tune's AVX-512 f32
//! kernel for the forward product (`f32_gemm`), and the gemm crate for everything else (on
//! AVX2-only CPUs too: its AVX2 kernel beat a port of `f32_gemm` to AVX2, docs/benchmarks.md).

use candle_core::DType;

use super::fused::add_column_sums;
use super::{bf16_gemm, f32_gemm, gemm_crate};

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
    gemm_crate::gemm_crate(dst, (m, n, k), a, b, accumulate);
    Ok(())
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
    add_column_sums(bf16_gemm::Elems::F32(dy), db);
    let mut dx = vec![0f32; t * k];
    matmul(how, &mut dx, (t, k, n), (dy, (n, 1)), (w, (k, 1)), false)?;
    Ok(dx)
}

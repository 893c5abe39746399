//! Reading and writing CPU tensor storage as f32, the one type every CPU kernel computes in:
//! half-precision activations are widened or narrowed on every core (candle's own conversion
//! runs on one thread), and f32 is borrowed in place.

use std::borrow::Cow;

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Shape, Tensor};
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::bf16_gemm;

/// The contiguous elements of a CPU tensor as f32 (borrowed when already f32).
pub fn cpu_f32<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &'static str,
) -> candle_core::Result<Cow<'a, [f32]>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous input")
    };
    /// Elements per parallel task of the conversion.
    const CHUNK: usize = 1 << 14;
    fn widen<T: Sync>(v: &[T], f: impl Fn(&[T], &mut [f32]) + Sync) -> Cow<'static, [f32]> {
        let mut out = vec![0f32; v.len()];
        out.par_chunks_mut(CHUNK)
            .zip(v.par_chunks(CHUNK))
            .for_each(|(o, v)| f(v, o));
        Cow::Owned(out)
    }
    Ok(match s {
        CpuStorage::F32(v) => Cow::Borrowed(&v[a..b]),
        CpuStorage::BF16(v) => widen(&v[a..b], |v, o| v.convert_to_f32_slice(o)),
        CpuStorage::F16(v) => widen(&v[a..b], |v, o| v.convert_to_f32_slice(o)),
        _ => candle_core::bail!("{op}: expected a float input"),
    })
}

/// f32 results stored as `dtype` (f32, bf16 or f16).
pub fn cpu_storage(dtype: DType, v: Vec<f32>) -> candle_core::Result<CpuStorage> {
    /// Elements per parallel task of the conversion.
    const CHUNK: usize = 1 << 14;
    fn narrow<T: Copy + Send + Sync>(
        v: &[f32],
        zero: T,
        f: impl Fn(&[f32], &mut [T]) + Sync,
    ) -> Vec<T> {
        let mut out = vec![zero; v.len()];
        out.par_chunks_mut(CHUNK)
            .zip(v.par_chunks(CHUNK))
            .for_each(|(o, v)| f(v, o));
        out
    }
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v),
        DType::BF16 => CpuStorage::BF16(narrow(&v, half::bf16::ZERO, bf16_gemm::narrow)),
        DType::F16 => CpuStorage::F16(narrow(&v, half::f16::ZERO, |v, o| {
            o.convert_from_f32_slice(v)
        })),
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

/// Rounds f32 values to `dtype` and back, in place: a kept half-precision activation is used
/// in the forward pass as the backward pass will read it.
pub fn round_to(dtype: DType, v: &mut [f32]) {
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
pub fn read(s: &CpuStorage) -> candle_core::Result<Cow<'_, [f32]>> {
    let len = match s {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        _ => candle_core::bail!("expected a float activation"),
    };
    cpu_f32(s, &Layout::contiguous(len), "activation")
}

/// f32 values as a tensor of `dtype`, converted on every core (candle's own conversion runs on
/// one thread).
pub fn tensor(
    v: Vec<f32>,
    dtype: DType,
    shape: &Shape,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    match cpu_storage(dtype, v)? {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, dev),
        CpuStorage::BF16(v) => Tensor::from_vec(v, shape, dev),
        CpuStorage::F16(v) => Tensor::from_vec(v, shape, dev),
        _ => candle_core::bail!("expected a float type"),
    }
}

fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> candle_core::Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("expected a contiguous f32 tensor to write in place"),
    }
}

/// Runs `f` on the f32 elements of a contiguous CPU tensor, mutably (the optimizer's state,
/// a step's gradient sums). Nested calls give one pass several mutable tensors at once (candle
/// hands out one per in-place op); the tensors must not share storage, or the inner call waits
/// forever on the outer's write lock.
pub(crate) fn with_slice(
    t: &Tensor,
    f: impl FnMut(&mut [f32]) -> candle_core::Result<()> + Send,
) -> candle_core::Result<()> {
    struct WithSlice<F>(Mutex<F>);
    impl<F: FnMut(&mut [f32]) -> candle_core::Result<()> + Send> InplaceOp1 for WithSlice<F> {
        fn name(&self) -> &'static str {
            "in-place f32"
        }

        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
            let mut f = self.0.lock().expect("not poisoned: the op runs once");
            f(slice_mut(s, l)?)
        }
    }
    t.inplace_op1(&WithSlice(Mutex::new(f)))
}

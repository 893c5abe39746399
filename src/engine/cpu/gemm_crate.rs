//! `C (+)= A·B` in f32 with the `gemm` crate: the product every CPU can run, used where the
//! AVX-512 kernels ([`super::f32_gemm`], [`super::bf16_gemm`]) do not apply. Its own file so
//! those two kernels both lean on it without leaning on each other.

/// A slice read as a matrix with (row, column) strides.
pub(crate) type Strided<'a> = (&'a [f32], (usize, usize));

/// `dst (m × n, row-major) (+)= a (m × k) · b (k × n)` with the `gemm` crate, on all of
/// rayon's threads.
///
/// # Panics
/// If an operand's strides reach past its slice.
pub(crate) fn gemm_crate(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    (a, (a_rs, a_cs)): Strided,
    (b, (b_rs, b_cs)): Strided,
    accumulate: bool,
) {
    let last = |rs: usize, cs: usize, r: usize, c: usize| (r - 1) * rs + (c - 1) * cs;
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    assert!(
        m * n <= dst.len() && last(a_rs, a_cs, m, k) < a.len() && last(b_rs, b_cs, k, n) < b.len()
    );
    // SAFETY: the assert keeps every index gemm reads or writes inside the three slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
}

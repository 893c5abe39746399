//! Vectorised `exp`, `erf` and GELU over f32 slices for the CPU kernels.
//!
//! libm's scalar `erff` and `expf` took about a fifth of a training step. On x86-64 with
//! AVX-512 (detected at run time) these run 16 lanes at a time; elsewhere a scalar version of the
//! same formulas runs. `erf` is the Abramowitz-Stegun 7.1.26 approximation PyTorch's CPU
//! kernels use (absolute error at most 5.3e-7 against libm in f32, as PyTorch's); `exp` is
//! Cephes' `expf` polynomial (about 1 ulp). The result depends on the machine (lanes use fused multiply-adds) but never on
//! the number of threads.
// The published constants (A&S, Cephes) are kept digit for digit, so they can be checked.
#![allow(clippy::excessive_precision)]

use std::f32::consts::{FRAC_1_SQRT_2, FRAC_2_SQRT_PI};

/// erf(x) = sign(x) (1 − t·P(t)·exp(−x²)), t = 1 / (1 + p|x|) (A&S 7.1.26).
const ERF_P: f32 = 0.3275911;
const ERF_A: [f32; 5] = [
    0.254829592,
    -0.284496736,
    1.421413741,
    -1.453152027,
    1.061405429,
];

/// φ(x)'s constant, 1/√(2π).
const INV_SQRT_2PI: f32 = 0.5 * FRAC_2_SQRT_PI * FRAC_1_SQRT_2;

#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    super::features::get().avx512
}

/// AVX2 with FMA, for CPUs without AVX-512 (8 lanes).
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    let f = super::features::get();
    f.avx2 && f.fma
}

/// `x ← exp(x − shift)`, returning the sum of the results (a softmax's numerator and
/// denominator). The sum's order is fixed by the slice's length alone.
pub fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { avx::exp_shifted_sum(x, shift) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are present (checked above).
        return unsafe { avx2::exp_shifted_sum(x, shift) };
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        sum += *v;
    }
    sum
}

/// `x ← erf(x)` (the kernels use it through GELU; the tests check it alone).
#[cfg(test)]
pub(crate) fn erf(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { avx::erf_slice(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are present (checked above).
        return unsafe { avx2::erf_slice(x) };
    }
    x.iter_mut().for_each(|v| *v = erf_scalar(*v));
}

/// `x ← gelu(x) = x Φ(x)`, with Φ through erf, as PyTorch's `gelu` (approximate="none").
pub fn gelu(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { avx::gelu_slice(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are present (checked above).
        return unsafe { avx2::gelu_slice(x) };
    }
    x.iter_mut().for_each(|v| *v = gelu_scalar(*v));
}

/// `x ← d · gelu'(x)`, gelu'(x) = Φ(x) + x φ(x).
pub fn gelu_grad_mul(x: &mut [f32], d: &[f32]) {
    assert_eq!(x.len(), d.len(), "gelu_grad_mul: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present (checked above); the lengths are equal.
        return unsafe { avx::gelu_grad_mul(x, d) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are present (checked above); the lengths are equal.
        return unsafe { avx2::gelu_grad_mul(x, d) };
    }
    x.iter_mut()
        .zip(d)
        .for_each(|(x, d)| *x = d * gelu_grad_scalar(*x));
}

fn erf_scalar(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (ERF_P * a + 1.0);
    let r = ERF_A.iter().rev().fold(0.0, |acc, c| acc * t + c);
    (1.0 - r * t * (-a * a).exp()).copysign(x)
}

fn cdf_scalar(x: f32) -> f32 {
    0.5 * (1.0 + erf_scalar(x * FRAC_1_SQRT_2))
}

fn gelu_scalar(x: f32) -> f32 {
    x * cdf_scalar(x)
}

fn gelu_grad_scalar(x: f32) -> f32 {
    cdf_scalar(x) + x * (-0.5 * x * x).exp() * INV_SQRT_2PI
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{ERF_A, ERF_P, FRAC_1_SQRT_2, INV_SQRT_2PI};

    /// Lanes of a slice: full vectors, then the tail under a mask.
    fn lanes(n: usize) -> impl Iterator<Item = (usize, __mmask16)> {
        (0..n).step_by(16).map(move |i| {
            let left = n - i;
            let mask = if left >= 16 {
                u16::MAX
            } else {
                (1u16 << left) - 1
            };
            (i, mask)
        })
    }

    /// `x ← f(x)`; inlined into each caller below, so `f` runs with AVX-512 enabled.
    #[inline(always)]
    unsafe fn map(x: &mut [f32], f: impl Fn(__m512) -> __m512) {
        let p = x.as_mut_ptr();
        for (i, k) in lanes(x.len()) {
            let v = _mm512_maskz_loadu_ps(k, p.add(i));
            _mm512_mask_storeu_ps(p.add(i), k, f(v));
        }
    }

    #[cfg(test)]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn erf_slice(x: &mut [f32]) {
        map(x, |v| erf(v))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_slice(x: &mut [f32]) {
        map(x, |v| _mm512_mul_ps(v, cdf(v)))
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        let (p, s) = (x.as_mut_ptr(), _mm512_set1_ps(shift));
        let mut sum = _mm512_setzero_ps();
        for (i, k) in lanes(x.len()) {
            let v = _mm512_maskz_loadu_ps(k, p.add(i));
            let e = exp(_mm512_sub_ps(v, s));
            _mm512_mask_storeu_ps(p.add(i), k, e);
            sum = _mm512_mask_add_ps(sum, k, sum, e);
        }
        _mm512_reduce_add_ps(sum)
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn gelu_grad_mul(x: &mut [f32], d: &[f32]) {
        let (p, q) = (x.as_mut_ptr(), d.as_ptr());
        let (half, c) = (_mm512_set1_ps(-0.5), _mm512_set1_ps(INV_SQRT_2PI));
        for (i, k) in lanes(x.len()) {
            let v = _mm512_maskz_loadu_ps(k, p.add(i));
            let g = _mm512_maskz_loadu_ps(k, q.add(i));
            let pdf = _mm512_mul_ps(exp(_mm512_mul_ps(_mm512_mul_ps(half, v), v)), c);
            let grad = _mm512_fmadd_ps(v, pdf, cdf(v));
            _mm512_mask_storeu_ps(p.add(i), k, _mm512_mul_ps(g, grad));
        }
    }

    /// exp(x): 2ⁿ · e^r with n = round(x / ln 2), |r| ≤ ln 2 / 2, e^r by Cephes' polynomial;
    /// `scalef` gives the overflow to ∞ and the underflow through subnormals to 0.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn exp(x: __m512) -> __m512 {
        // Past these exp is ∞ or 0 anyway; the clamp keeps n finite. NaN passes (second operand).
        let x = _mm512_min_ps(_mm512_set1_ps(89.0), x);
        let x = _mm512_max_ps(_mm512_set1_ps(-104.0), x);
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4), r);
        let mut y = _mm512_set1_ps(1.9875691500E-4);
        for c in [
            1.3981999507E-3,
            8.3334519073E-3,
            4.1665795894E-2,
            1.6666665459E-1,
            5.0000001201E-1,
        ] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
        }
        let y = _mm512_fmadd_ps(
            _mm512_mul_ps(y, r),
            r,
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(y, n)
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn erf(x: __m512) -> __m512 {
        let sign = _mm512_set1_epi32(i32::MIN);
        let a = _mm512_abs_ps(x);
        let one = _mm512_set1_ps(1.0);
        let t = _mm512_div_ps(one, _mm512_fmadd_ps(_mm512_set1_ps(ERF_P), a, one));
        let mut r = _mm512_set1_ps(ERF_A[4]);
        for c in ERF_A[..4].iter().rev() {
            r = _mm512_fmadd_ps(r, t, _mm512_set1_ps(*c));
        }
        let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
        let y = _mm512_fnmadd_ps(_mm512_mul_ps(r, t), e, one);
        let s = _mm512_and_si512(_mm512_castps_si512(x), sign);
        _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), s))
    }

    /// Φ(x) = (1 + erf(x / √2)) / 2.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn cdf(x: __m512) -> __m512 {
        let e = erf(_mm512_mul_ps(x, _mm512_set1_ps(FRAC_1_SQRT_2)));
        let half = _mm512_set1_ps(0.5);
        _mm512_fmadd_ps(e, half, half)
    }
}

/// The same formulas 8 lanes at a time with AVX2 and FMA. AVX2 has no `scalef`: 2ⁿ is built
/// from its exponent bits, in two halves so that results down to the subnormals stay exact.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ERF_A, ERF_P, FRAC_1_SQRT_2, INV_SQRT_2PI};

    /// Vectors of a slice: (start, mask), the mask `None` for a full vector and the lanes in
    /// use for the tail. Only the tail goes through `vmaskmovps`: AMD CPUs microcode it, and
    /// with every vector masked it cost a GELU most of its time.
    #[inline(always)]
    unsafe fn lanes(n: usize) -> impl Iterator<Item = (usize, Option<__m256i>)> {
        (0..n).step_by(8).map(move |i| {
            let left = n - i;
            let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(left.min(8) as i32), idx);
            (i, (left < 8).then_some(tail))
        })
    }

    #[inline(always)]
    unsafe fn load(p: *const f32, k: Option<__m256i>) -> __m256 {
        match k {
            None => _mm256_loadu_ps(p),
            Some(k) => _mm256_maskload_ps(p, k),
        }
    }

    #[inline(always)]
    unsafe fn store(p: *mut f32, k: Option<__m256i>, v: __m256) {
        match k {
            None => _mm256_storeu_ps(p, v),
            Some(k) => _mm256_maskstore_ps(p, k, v),
        }
    }

    #[inline(always)]
    unsafe fn map(x: &mut [f32], f: impl Fn(__m256) -> __m256) {
        let p = x.as_mut_ptr();
        for (i, k) in lanes(x.len()) {
            let v = load(p.add(i), k);
            store(p.add(i), k, f(v));
        }
    }

    #[cfg(test)]
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn erf_slice(x: &mut [f32]) {
        map(x, |v| erf(v))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_slice(x: &mut [f32]) {
        map(x, |v| _mm256_mul_ps(v, cdf(v)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted_sum(x: &mut [f32], shift: f32) -> f32 {
        let (p, s) = (x.as_mut_ptr(), _mm256_set1_ps(shift));
        let mut sum = _mm256_setzero_ps();
        for (i, k) in lanes(x.len()) {
            let v = load(p.add(i), k);
            let e = exp(_mm256_sub_ps(v, s));
            store(p.add(i), k, e);
            // The tail's unused lanes hold exp(−shift): kept out of the sum.
            let e = k.map_or(e, |k| _mm256_and_ps(e, _mm256_castsi256_ps(k)));
            sum = _mm256_add_ps(sum, e);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        lanes.iter().sum()
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_grad_mul(x: &mut [f32], d: &[f32]) {
        let (p, q) = (x.as_mut_ptr(), d.as_ptr());
        let (half, c) = (_mm256_set1_ps(-0.5), _mm256_set1_ps(INV_SQRT_2PI));
        for (i, k) in lanes(x.len()) {
            let v = load(p.add(i), k);
            let g = load(q.add(i), k);
            let pdf = _mm256_mul_ps(exp(_mm256_mul_ps(_mm256_mul_ps(half, v), v)), c);
            let grad = _mm256_fmadd_ps(v, pdf, cdf(v));
            store(p.add(i), k, _mm256_mul_ps(g, grad));
        }
    }

    /// 2ⁿ for integral n in [-126, 127], from the exponent bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pow2(n: __m256) -> __m256 {
        let e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
        _mm256_castsi256_ps(_mm256_slli_epi32::<23>(e))
    }

    /// exp(x) as the AVX-512 version computes it: 2ⁿ · e^r, e^r by Cephes' polynomial.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp(x: __m256) -> __m256 {
        // Past these exp is ∞ or 0 anyway; the clamp keeps n in range. NaN passes (second operand).
        let x = _mm256_min_ps(_mm256_set1_ps(89.0), x);
        let x = _mm256_max_ps(_mm256_set1_ps(-104.0), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4), r);
        let mut y = _mm256_set1_ps(1.9875691500E-4);
        for c in [
            1.3981999507E-3,
            8.3334519073E-3,
            4.1665795894E-2,
            1.6666665459E-1,
            5.0000001201E-1,
        ] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            _mm256_mul_ps(y, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        // n in [-150, 129]: two factors each within a normal float's exponent range.
        let n1 = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            n,
            _mm256_set1_ps(0.5),
        ));
        let n2 = _mm256_sub_ps(n, n1);
        let y = _mm256_mul_ps(_mm256_mul_ps(y, pow2(n1)), pow2(n2));
        // NaN in, NaN out (the clamps above turned it into a bound).
        let nan = _mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        _mm256_blendv_ps(y, x, nan)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn erf(x: __m256) -> __m256 {
        let sign = _mm256_set1_ps(-0.0);
        let a = _mm256_andnot_ps(sign, x);
        let one = _mm256_set1_ps(1.0);
        let t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(ERF_P), a, one));
        let mut r = _mm256_set1_ps(ERF_A[4]);
        for c in ERF_A[..4].iter().rev() {
            r = _mm256_fmadd_ps(r, t, _mm256_set1_ps(*c));
        }
        let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(a, a)));
        let y = _mm256_fnmadd_ps(_mm256_mul_ps(r, t), e, one);
        _mm256_or_ps(y, _mm256_and_ps(x, sign))
    }

    /// Φ(x) = (1 + erf(x / √2)) / 2.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn cdf(x: __m256) -> __m256 {
        let e = erf(_mm256_mul_ps(x, _mm256_set1_ps(FRAC_1_SQRT_2)));
        let half = _mm256_set1_ps(0.5);
        _mm256_fmadd_ps(e, half, half)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every `step` from `lo` to `hi`.
    fn grid(lo: f32, hi: f32, step: f32) -> Vec<f32> {
        let n = ((hi - lo) / step) as usize + 1;
        (0..n).map(|i| lo + i as f32 * step).collect()
    }

    fn max_abs_err(got: &[f32], want: impl Fn(f32) -> f32, x: &[f32]) -> f32 {
        got.iter()
            .zip(x)
            .map(|(g, &x)| (g - want(x)).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn erf_is_within_6e_7_of_libm_over_a_dense_range() {
        let x = grid(-6.0, 6.0, 1e-4);
        let mut fast = x.clone();
        erf(&mut fast);
        let slow: Vec<f32> = x.iter().map(|&v| erf_scalar(v)).collect();
        for got in [&fast, &slow] {
            let err = max_abs_err(got, candle_core::cpu::erf::erf_f32, &x);
            assert!(err < 6e-7, "max abs error {err:e}");
        }
        // Exactly ±1 far out.
        let mut ends = vec![10.0, -10.0, f32::INFINITY, f32::NEG_INFINITY];
        erf(&mut ends);
        assert_eq!(ends, [1.0, -1.0, 1.0, -1.0]);
    }

    #[test]
    fn exp_is_within_2_ulp_of_libm_and_handles_the_ends() {
        let x = grid(-87.0, 88.0, 3e-3);
        let mut fast = x.clone();
        exp_shifted_sum(&mut fast, 0.0);
        for (g, &x) in fast.iter().zip(&x) {
            let want = x.exp();
            assert!(
                (g - want).abs() <= 2.0 * f32::EPSILON * want,
                "exp({x}) = {g}, not {want}"
            );
        }
        let mut ends = vec![f32::NEG_INFINITY, -200.0, 0.0, 100.0, f32::INFINITY];
        exp_shifted_sum(&mut ends, 0.0);
        assert_eq!(ends, [0.0, 0.0, 1.0, f32::INFINITY, f32::INFINITY]);
        let mut nan = vec![f32::NAN; 3];
        exp_shifted_sum(&mut nan, 0.0);
        assert!(nan.iter().all(|v| v.is_nan()));
    }

    #[test]
    fn exp_shifted_sum_matches_the_scalar_softmax_numerator() {
        // 37: two full vectors and a masked tail.
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let mut got = x.clone();
        let sum = exp_shifted_sum(&mut got, 3.0);
        let want: Vec<f32> = x.iter().map(|v| (v - 3.0).exp()).collect();
        // Relative: the values reach e⁶ ≈ 403, where one unit in the last place is 3e-5 (the
        // AVX-512 path is within a few of libm).
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-6 * w.max(1.0), "{g} vs {w}");
        }
        let total = want.iter().sum::<f32>();
        assert!((sum - total).abs() <= 1e-6 * total, "{sum} vs {total}");
    }

    /// The AVX2 path on a machine that also has AVX-512 (where the kernels would not pick it).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_path_matches_libm_and_the_scalar_formulas() {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
            return;
        }
        let x = grid(-6.0, 6.0, 1e-4);
        let mut e = x.clone();
        // SAFETY: AVX2 and FMA are present (checked above).
        unsafe { avx2::erf_slice(&mut e) };
        assert!(max_abs_err(&e, candle_core::cpu::erf::erf_f32, &x) < 6e-7);
        let x = grid(-87.0, 88.0, 3e-3);
        let mut ex = x.clone();
        // SAFETY: as above.
        let sum = unsafe { avx2::exp_shifted_sum(&mut ex, 0.0) };
        for (g, &x) in ex.iter().zip(&x) {
            let want = x.exp();
            assert!(
                (g - want).abs() <= 2.0 * f32::EPSILON * want,
                "exp({x}) = {g}, not {want}"
            );
        }
        assert_eq!(sum, f32::INFINITY);
        // The sum of a softmax's numerators, over 37 values: a masked tail of 5.
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 9.0).collect();
        let mut e = x.clone();
        // SAFETY: as above.
        let sum = unsafe { avx2::exp_shifted_sum(&mut e, 3.0) };
        let total: f32 = x.iter().map(|v| (v - 3.0).exp()).sum();
        assert!((sum - total).abs() <= 1e-6 * total, "{sum} vs {total}");
        let mut ends = vec![f32::NEG_INFINITY, -200.0, 0.0, 100.0, f32::INFINITY];
        // SAFETY: as above.
        unsafe { avx2::exp_shifted_sum(&mut ends, 0.0) };
        assert_eq!(ends, [0.0, 0.0, 1.0, f32::INFINITY, f32::INFINITY]);
        let mut nan = vec![f32::NAN; 3];
        // SAFETY: as above.
        unsafe { avx2::exp_shifted_sum(&mut nan, 0.0) };
        assert!(nan.iter().all(|v| v.is_nan()));
        // GELU and its gradient against the scalar formulas, on a length with a masked tail.
        let x = grid(-10.0, 10.0, 1e-3);
        let mut y = x.clone();
        // SAFETY: as above.
        unsafe { avx2::gelu_slice(&mut y) };
        let want: Vec<f32> = x.iter().map(|&v| gelu_scalar(v)).collect();
        assert!(max_abs_err(&y, |v| v, &want) < 2e-6);
        let d: Vec<f32> = x.iter().map(|v| 1.0 + v.sin()).collect();
        let mut g = x.clone();
        // SAFETY: as above; the lengths are equal.
        unsafe { avx2::gelu_grad_mul(&mut g, &d) };
        let want: Vec<f32> = x
            .iter()
            .zip(&d)
            .map(|(&v, d)| d * gelu_grad_scalar(v))
            .collect();
        assert!(max_abs_err(&g, |v| v, &want) < 2e-6);
    }

    #[test]
    fn gelu_and_its_gradient_match_the_libm_formulas() {
        let x = grid(-10.0, 10.0, 1e-3);
        let cdf = |v: f32| 0.5 * (1.0 + candle_core::cpu::erf::erf_f32(v * FRAC_1_SQRT_2));
        let mut y = x.clone();
        gelu(&mut y);
        assert!(max_abs_err(&y, |v| v * cdf(v), &x) < 2e-6);
        let y: Vec<f32> = x.iter().map(|&v| gelu_scalar(v)).collect();
        assert!(max_abs_err(&y, |v| v * cdf(v), &x) < 2e-6);
        let d: Vec<f32> = x.iter().map(|v| 1.0 + v.sin()).collect();
        let mut g = x.clone();
        gelu_grad_mul(&mut g, &d);
        let want: Vec<f32> = x
            .iter()
            .zip(&d)
            .map(|(&v, d)| d * (cdf(v) + v * (-0.5 * v * v).exp() * INV_SQRT_2PI))
            .collect();
        assert!(max_abs_err(&g, |v| v, &want) < 2e-6);
        let g: Vec<f32> = x
            .iter()
            .zip(&d)
            .map(|(&v, d)| d * gelu_grad_scalar(v))
            .collect();
        assert!(max_abs_err(&g, |v| v, &want) < 2e-6);
    }
}

//! `C = A·B` or `C += A·B` in f32 with AVX-512: the matrix products of the fused encoder layer
//! (`layer_op.rs`): its forward product `x·Wᵀ` when activations are f32 (`layer_op::matmul`
//! says why not the gradients' products).
//!
//! Why not the `gemm` crate: its kernel runs along C's rows, so it packs the weights (stored
//! n × k, PyTorch's layout) one scalar at a time into columns, on every call: a sixth of
//! `encode`. Here B is packed 16 × 16 at a time by register transposes, as `bf16_gemm` does.
//!
//! Every element of C is summed in one fixed order: from zero (or C's old value, when adding),
//! depth 0, 1, 2, … one fused multiply-add at a time. So a row of C never depends on the other
//! rows, on the number of rows, or on how the work is split, and `C += A·B` over depth cut in
//! two calls equals one call over the whole depth, bit for bit (the ground for batch-invariant
//! products).
//!
//! Needs AVX-512F ([`available`]); elsewhere `layer_op` keeps the `gemm` crate.

use super::bf16_gemm::{Elems, Mat};

/// Whether this CPU runs the kernel (decided once per process).
pub fn available() -> bool {
    super::features::get().avx512
}

/// `c (m × n, row-major) = a·b` (`+=` with `accumulate`) for f32 `a` (m × k) and `b` (k × n).
///
/// # Panics
/// If the CPU lacks AVX-512F, an operand is not f32, or the shapes disagree.
pub fn matmul(c: &mut [f32], accumulate: bool, a: Mat, b: Mat) {
    assert!(available(), "f32_gemm needs AVX-512F");
    let (Elems::F32(av), Elems::F32(bv)) = (a.elems, b.elems) else {
        panic!("f32_gemm takes f32 operands");
    };
    let ((m, k), (kb, n)) = (a.dims(), b.dims());
    assert!(k == kb && av.len() >= m * k && bv.len() >= k * n && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    fast::matmul(&mut c[..m * n], accumulate, (m, n, k), (av, a.t), (bv, b.t));
}

#[cfg(target_arch = "x86_64")]
mod fast {
    use std::arch::x86_64::{
        __m512i, _mm512_fmadd_ps, _mm512_mask_storeu_epi32, _mm512_maskz_loadu_epi32,
        _mm512_setzero_ps, _mm512_setzero_si512, _mm512_storeu_si512, _mm_prefetch, _MM_HINT_T0,
    };
    use std::ops::Range;

    use rayon::prelude::*;

    use crate::engine::cpu::bf16_gemm::transpose16;

    /// Columns of B per packed block (one register of f32).
    const NB: usize = 16;
    /// Blocks per kernel call, and rows: 24 accumulators of the 32 registers.
    const NR: usize = 3;
    const MR: usize = 8;
    /// Depth per pass over a block of C: 3 blocks of B (48 KiB) stay in L1/L2.
    const KC: usize = 256;
    /// Columns of C per parallel task (a multiple of NR · NB), and the fewest rows of C a
    /// task takes when rows are split too.
    const TASK_N: usize = 96;
    const TASK_M_MIN: usize = 128;
    /// Rows of A per pass over a task's columns: 128 rows of KC (128 KiB) stay in L2.
    const MC: usize = 128;
    /// Rows of C per band (see `matmul`): 512 rows of packed A up to depth 3072 (6 MiB)
    /// stay in L3.
    const BAND_M: usize = 512;
    /// How many lines ahead `pack_b` prefetches the rows of a transposed B.
    const PREFETCH_AHEAD: usize = 4;
    thread_local! {
        /// The calling thread's packed A, taken out during a call and put back after, reused
        /// from call to call: fresh pages cost more than the packing.
        static PACKED_A: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
        /// Each thread's packed columns of B, reused from call to call.
        static PACKED_B: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    /// An operand's storage and whether the product reads its transpose.
    type Operand<'a> = (&'a [f32], bool);

    pub fn matmul(
        c: &mut [f32],
        accumulate: bool,
        (m, n, k): (usize, usize, usize),
        a: Operand,
        b: Operand,
    ) {
        // Bands of rows, one after the other: every column task reads all of its band's
        // packed A, which must stay in cache (one band of a long batch used to be read from
        // memory by every task).
        let mut buf = PACKED_A.take();
        for band in (0..m).step_by(BAND_M) {
            let band = band..(band + BAND_M).min(m);
            let rows_a = PackedA::new(a, m, k, band.clone(), buf);
            run_band(c, accumulate, (m, n, k), &rows_a, band, b);
            buf = rows_a.v;
        }
        PACKED_A.set(buf);
    }

    /// The rows `band` of C: tasks own column chunks (each packs its part of B, once); rows
    /// are split too only when there are too few chunks to keep every thread busy.
    fn run_band(
        c: &mut [f32],
        accumulate: bool,
        (m, n, k): (usize, usize, usize),
        rows_a: &PackedA,
        band: Range<usize>,
        b: Operand,
    ) {
        let col_tasks = n.div_ceil(TASK_N);
        let want = (2 * rayon::current_num_threads()).div_ceil(col_tasks);
        let row_tasks = want.min(band.len().div_ceil(TASK_M_MIN)).max(1);
        let rows_per = band.len().div_ceil(row_tasks).div_ceil(MR) * MR;
        let c = CPtr(c.as_mut_ptr());
        (0..col_tasks * row_tasks).into_par_iter().for_each(|t| {
            let (i, j) = (
                band.start + t % row_tasks * rows_per,
                t / row_tasks * TASK_N,
            );
            if i >= band.end {
                return;
            }
            let cols = j..(j + TASK_N).min(n);
            let blocks = cols.len().div_ceil(NB);
            PACKED_B.with_borrow_mut(|pb| {
                if pb.len() < blocks * k * NB {
                    pb.resize(blocks * k * NB, 0.0);
                }
                let pb = &mut pb[..blocks * k * NB];
                // SAFETY: `available()` (asserted by the caller): AVX-512F.
                unsafe { pack_b(b, k, n, j, pb) };
                let task = Task {
                    a: rows_a,
                    pb,
                    c,
                    accumulate,
                    m,
                    n,
                    k,
                    rows: i..(i + rows_per).min(band.end),
                    cols,
                };
                // SAFETY: AVX-512F; the tasks' rectangles of C are disjoint and C outlives
                // them.
                unsafe { task.run() }
            });
        });
    }

    /// C's storage, written by tasks in disjoint rectangles.
    #[derive(Clone, Copy)]
    struct CPtr(*mut f32);
    // SAFETY: each task writes only its own rectangle of C (see `Task`).
    unsafe impl Send for CPtr {}
    unsafe impl Sync for CPtr {}

    /// Rows `first..` of A (m × k) in panels of MR rows, interleaved (panel element (r, p) at
    /// `p · MR + r`, rows past m zero): the kernel's MR broadcasts per depth come from one
    /// stream.
    struct PackedA {
        v: Vec<f32>,
        k: usize,
        first: usize,
    }

    impl PackedA {
        /// Packs the rows `rows` of A into `out` (its storage, reused; see `PACKED_A`).
        fn new((v, t): Operand, m: usize, k: usize, rows: Range<usize>, mut out: Vec<f32>) -> Self {
            // Every element is written below: no clearing needed.
            out.resize(rows.len().div_ceil(MR) * MR * k, 0.0);
            out.par_chunks_mut(MR * k)
                .enumerate()
                .for_each(|(panel, o)| {
                    // SAFETY: AVX-512F (the caller's); o is panel `panel` of the rows.
                    unsafe { pack_a_panel((v, t), m, k, rows.start + panel * MR, o) }
                });
            Self {
                v: out,
                k,
                first: rows.start,
            }
        }

        /// The panel of rows i.. (i − first a multiple of MR), from depth p.
        fn panel(&self, i: usize, p: usize) -> &[f32] {
            let i = i - self.first;
            &self.v[i * self.k + p * MR..(i + MR) * self.k]
        }
    }

    /// One rectangle of C and the packed operands.
    struct Task<'a> {
        a: &'a PackedA,
        /// B's columns `cols.start..` in blocks of NB columns, each k rows of NB.
        pb: &'a [f32],
        c: CPtr,
        accumulate: bool,
        m: usize,
        n: usize,
        k: usize,
        rows: Range<usize>,
        cols: Range<usize>,
    }

    impl Task<'_> {
        /// # Safety
        /// AVX-512F; no other thread touches this task's rectangle of C.
        #[target_feature(enable = "avx512f")]
        unsafe fn run(&self) {
            let (m, n, k) = (self.m, self.n, self.k);
            let blocks = self.pb.len() / (k * NB);
            let mut buf = [0f32; MR * NR * NB];
            for p0 in (0..k).step_by(KC) {
                let depth = KC.min(k - p0);
                // Adds to C past the first depth block, so every sum runs in depth order.
                let load = self.accumulate || p0 > 0;
                for i0 in self.rows.clone().step_by(MC) {
                    for j in self.cols.clone().step_by(NR * NB) {
                        let blk = (j - self.cols.start) / NB;
                        let w = (blocks - blk).min(NR);
                        let b = &self.pb[blk * k * NB + p0 * NB..];
                        for i in (i0..(i0 + MC).min(self.rows.end)).step_by(MR) {
                            let a = self.a.panel(i, p0);
                            let (rows, cols) = (MR.min(m - i), (w * NB).min(n - j));
                            // SAFETY (both): (i.., j..) of rows × cols lies in C and in this
                            // task's rectangle.
                            let at = unsafe { self.c.0.add(i * n + j) };
                            let inside = rows == MR && cols == w * NB;
                            let (c, ldc) = if inside {
                                (at, n)
                            } else {
                                buf.fill(0.0);
                                if load {
                                    for r in 0..rows {
                                        let src = unsafe {
                                            std::slice::from_raw_parts(at.add(r * n), cols)
                                        };
                                        buf[r * NR * NB..][..cols].copy_from_slice(src);
                                    }
                                }
                                (buf.as_mut_ptr(), NR * NB)
                            };
                            let (a, b) = (a.as_ptr(), b.as_ptr());
                            // SAFETY: a holds MR rows interleaved from depth p0, b `w` blocks of k
                            // rows of NB (stride k · NB) from depth p0, c MR rows of w · NB at
                            // stride ldc; AVX-512F is this function's.
                            unsafe {
                                match w {
                                    1 => kernel::<1>(a, b, k * NB, depth, c, ldc, load),
                                    2 => kernel::<2>(a, b, k * NB, depth, c, ldc, load),
                                    _ => kernel::<3>(a, b, k * NB, depth, c, ldc, load),
                                }
                            }
                            if !inside {
                                for r in 0..rows {
                                    let dst = unsafe {
                                        std::slice::from_raw_parts_mut(at.add(r * n), cols)
                                    };
                                    dst.copy_from_slice(&buf[r * NR * NB..][..cols]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// C (MR × 16W at `c`, row stride `ldc`) = (or, with `load`, C +) the MR interleaved rows
    /// of `a` times `depth` rows of the W blocks of `b` (stride `ldb`), one depth at a
    /// time.
    ///
    /// # Safety
    /// AVX-512F; the pointers cover what the strides and sizes say.
    #[target_feature(enable = "avx512f")]
    #[inline(never)] // inlined, its accumulators spill
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const W: usize>(
        a: *const f32,
        b: *const f32,
        ldb: usize,
        depth: usize,
        c: *mut f32,
        ldc: usize,
        load: bool,
    ) {
        // Loads and stores through `zmm` and wrapping_add (see `zmm.rs`).
        let mut acc = [[_mm512_setzero_ps(); W]; MR];
        if load {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (w, v) in acc.iter_mut().enumerate() {
                    // SAFETY: (r, 16w..16w + 16) lies in the block at c.
                    *v =
                        unsafe { crate::engine::cpu::zmm::load!(c.wrapping_add(r * ldc + w * NB)) };
                }
            }
        }
        for p in 0..depth {
            let mut bv = [_mm512_setzero_ps(); W];
            for (w, v) in bv.iter_mut().enumerate() {
                // SAFETY: block w, depth p (NB f32) lies in b.
                *v = unsafe { crate::engine::cpu::zmm::load!(b.wrapping_add(w * ldb + p * NB)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: element p of row r of a, to all 16 lanes.
                let av = unsafe { crate::engine::cpu::zmm::broadcast!(a.wrapping_add(p * MR + r)) };
                for (c, &v) in acc.iter_mut().zip(&bv) {
                    *c = _mm512_fmadd_ps(av, v, *c);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (w, &v) in acc.iter().enumerate() {
                // SAFETY: (r, 16w..16w + 16) lies in the block at c.
                unsafe { crate::engine::cpu::zmm::store!(c.wrapping_add(r * ldc + w * NB), v) };
            }
        }
    }

    /// Lanes below `len` (at most 16).
    fn mask(len: usize) -> u16 {
        ((1u32 << len) - 1) as u16
    }

    /// Up to 16 f32 of `v` from `start` (as u32 bits), zeros from lane `len` on.
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load16(v: &[f32], start: usize, len: usize) -> __m512i {
        assert!(len == 0 || start + len <= v.len());
        // SAFETY: the lanes read lie in v (asserted).
        unsafe { _mm512_maskz_loadu_epi32(mask(len), v.as_ptr().wrapping_add(start).cast()) }
    }

    /// Columns `j0..` of B into `o` (blocks of NB columns, k rows of NB, zeros past n): from
    /// S stored k × n, or with `t` from S stored n × k (B = Sᵀ).
    ///
    /// # Safety
    /// AVX-512F; S has k × n elements.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_b((s, t): Operand, k: usize, n: usize, j0: usize, o: &mut [f32]) {
        for (blk, o) in o.chunks_exact_mut(k * NB).enumerate() {
            let j = j0 + blk * NB;
            let w = NB.min(n.saturating_sub(j));
            if !t {
                for (p, o) in o.chunks_exact_mut(NB).enumerate() {
                    // SAFETY: row p < k, columns j..j + w ≤ n of S; o holds NB f32.
                    unsafe { _mm512_storeu_si512(o.as_mut_ptr().cast(), load16(s, p * n + j, w)) };
                }
                continue;
            }
            let mut r = [_mm512_setzero_si512(); NB];
            for p0 in (0..k).step_by(NB) {
                let len = NB.min(k - p0);
                // Each row's line PREFETCH_AHEAD lines on: 16 rows read a line at a time are
                // more streams than the hardware prefetcher follows.
                if p0 + PREFETCH_AHEAD * NB < k {
                    for l in 0..w {
                        let at = s
                            .as_ptr()
                            .wrapping_add((j + l) * k + p0 + PREFETCH_AHEAD * NB);
                        _mm_prefetch::<_MM_HINT_T0>(at.cast());
                    }
                }
                for (l, v) in r.iter_mut().enumerate() {
                    // SAFETY: row j + l < n of S, elements p0..p0 + len ≤ k of it.
                    *v = if l < w {
                        unsafe { load16(s, (j + l) * k + p0, len) }
                    } else {
                        _mm512_setzero_si512()
                    };
                }
                transpose16(&mut r);
                for (q, &v) in r.iter().enumerate().take(len) {
                    // SAFETY: row p0 + q < k of the block: NB f32 inside o.
                    unsafe { _mm512_storeu_si512(o[(p0 + q) * NB..][..NB].as_mut_ptr().cast(), v) };
                }
            }
        }
    }

    /// Rows `i0..i0 + MR` of A into the interleaved panel `o` (zeros past m): from S stored
    /// m × k, or with `t` from S stored k × m (A = Sᵀ, whose MR values at a depth lie side by
    /// side).
    ///
    /// # Safety
    /// AVX-512F; S has m × k elements; o holds MR · k.
    #[target_feature(enable = "avx512f")]
    unsafe fn pack_a_panel((s, t): Operand, m: usize, k: usize, i0: usize, o: &mut [f32]) {
        let w = MR.min(m - i0);
        if t {
            for (p, o) in o.chunks_exact_mut(MR).enumerate() {
                o[..w].copy_from_slice(&s[p * m + i0..][..w]);
                o[w..].fill(0.0);
            }
            return;
        }
        let mut r = [_mm512_setzero_si512(); NB];
        for p0 in (0..k).step_by(NB) {
            let len = NB.min(k - p0);
            for (l, v) in r.iter_mut().enumerate().take(w) {
                // SAFETY: row i0 + l < m of S, elements p0..p0 + len ≤ k of it.
                *v = unsafe { load16(s, (i0 + l) * k + p0, len) };
            }
            transpose16(&mut r);
            for (q, &v) in r.iter().enumerate().take(len) {
                let at = &mut o[(p0 + q) * MR..][..MR];
                // SAFETY: MR (8) f32 inside o: the low lanes, rows i0..i0 + MR at depth p0 + q.
                unsafe { _mm512_mask_storeu_epi32(at.as_mut_ptr().cast(), 0xff, v) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::gemm_crate::gemm_crate;
    use rand::{Rng, SeedableRng};

    fn values(rng: &mut impl Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// C from an f64 reference, for every combination of transposes, odd shapes included.
    #[test]
    fn f32_gemm_matches_an_f64_reference_on_odd_shapes() {
        if !available() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (m, n, k) in [
            (1, 1, 1),
            (7, 17, 5),
            (8, 48, 16),
            (13, 100, 300),
            (130, 97, 513),
            (3, 200, 40),
            (1037, 50, 33), // three bands of rows, the last partial
        ] {
            let (av, bv) = (values(&mut rng, m * k), values(&mut rng, k * n));
            for (a_t, b_t) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = if a_t {
                    Mat::new(Elems::F32(&av), k, m).t()
                } else {
                    Mat::new(Elems::F32(&av), m, k)
                };
                let b = if b_t {
                    Mat::new(Elems::F32(&bv), n, k).t()
                } else {
                    Mat::new(Elems::F32(&bv), k, n)
                };
                let at =
                    |i: usize, p: usize| f64::from(if a_t { av[p * m + i] } else { av[i * k + p] });
                let bt =
                    |p: usize, j: usize| f64::from(if b_t { bv[j * k + p] } else { bv[p * n + j] });
                let old = values(&mut rng, m * n);
                for accumulate in [false, true] {
                    let mut c = old.clone();
                    matmul(&mut c, accumulate, a, b);
                    for i in 0..m {
                        for j in 0..n {
                            let mut want: f64 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                            if accumulate {
                                want += f64::from(old[i * n + j]);
                            }
                            let got = f64::from(c[i * n + j]);
                            assert!(
                                (got - want).abs() <= 1e-5 * (k as f64).sqrt().max(1.0),
                                "{m}x{n}x{k} a_t={a_t} b_t={b_t} acc={accumulate} ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// A row of C is the same bits whatever the other rows, and depth cut in two calls (the
    /// second adding) equals one call.
    #[test]
    fn f32_gemm_rows_and_depth_cuts_are_bit_identical() {
        if !available() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let (m, n, k) = (301, 200, 700);
        let (av, wv) = (values(&mut rng, m * k), values(&mut rng, n * k));
        let w = Mat::new(Elems::F32(&wv), n, k).t();
        let mut whole = vec![0f32; m * n];
        matmul(&mut whole, false, Mat::new(Elems::F32(&av), m, k), w);
        for (lo, hi) in [(0, 1), (5, 22), (100, 301), (296, 301)] {
            let mut part = vec![0f32; (hi - lo) * n];
            matmul(
                &mut part,
                false,
                Mat::new(Elems::F32(&av[lo * k..hi * k]), hi - lo, k),
                w,
            );
            assert!(part == whole[lo * n..hi * n], "rows {lo}..{hi}");
        }
        // dW = Σ over rows (the depth of Aᵀ·B): rows 0..cut, then cut..m added.
        let bv = values(&mut rng, m * n);
        let mut once = vec![0f32; k * n];
        matmul(
            &mut once,
            false,
            Mat::new(Elems::F32(&av), m, k).t(),
            Mat::new(Elems::F32(&bv), m, n),
        );
        for cut in [1, 77, 256, 300] {
            let mut twice = vec![0f32; k * n];
            let top = (
                Mat::new(Elems::F32(&av[..cut * k]), cut, k).t(),
                Mat::new(Elems::F32(&bv[..cut * n]), cut, n),
            );
            matmul(&mut twice, false, top.0, top.1);
            let rest = m - cut;
            let bottom = (
                Mat::new(Elems::F32(&av[cut * k..]), rest, k).t(),
                Mat::new(Elems::F32(&bv[cut * n..]), rest, n),
            );
            matmul(&mut twice, true, bottom.0, bottom.1);
            assert!(twice == once, "cut at {cut}");
        }
    }

    /// GFLOP/s of this kernel and of the `gemm` crate on a linear layer's three products (a
    /// timing, not a test: `cargo test --lib f32_gemm_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "timing; run with --ignored --nocapture on a quiet machine"]
    fn f32_gemm_speed() {
        if !available() {
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (t, d_in, d_out) in [
            (480, 768, 2304),
            (480, 768, 3072),
            (480, 3072, 768),
            (600, 384, 1536),
            (400, 384, 1152),
            (400, 1536, 384),
            (2048, 768, 3072),
        ] {
            let (x, g, w) = (
                values(&mut rng, t * d_in),
                values(&mut rng, t * d_out),
                values(&mut rng, d_out * d_in),
            );
            let flops = 2.0 * (t * d_in * d_out) as f64;
            let time = |f: &mut dyn FnMut()| crate::testing::gflops(flops, f);
            let mut c = vec![0f32; t * d_out.max(d_in) + d_in * d_out];
            let (xm, gm, wm) = (
                Mat::new(Elems::F32(&x), t, d_in),
                Mat::new(Elems::F32(&g), t, d_out),
                Mat::new(Elems::F32(&w), d_out, d_in),
            );
            let ours = [
                ("y=xWt", time(&mut || matmul(&mut c, false, xm, wm.t()))),
                ("dx=gW", time(&mut || matmul(&mut c, false, gm, wm))),
                ("dW=gtx", time(&mut || matmul(&mut c, false, gm.t(), xm))),
            ];
            let theirs = [
                time(&mut || {
                    gemm_crate(
                        &mut c,
                        (t, d_out, d_in),
                        (&x, (d_in, 1)),
                        (&w, (1, d_in)),
                        false,
                    )
                }),
                time(&mut || {
                    gemm_crate(
                        &mut c,
                        (t, d_in, d_out),
                        (&g, (d_out, 1)),
                        (&w, (d_in, 1)),
                        false,
                    )
                }),
                time(&mut || {
                    gemm_crate(
                        &mut c,
                        (d_out, d_in, t),
                        (&g, (1, d_out)),
                        (&x, (d_in, 1)),
                        false,
                    )
                }),
            ];
            for ((name, o), g) in ours.iter().zip(theirs) {
                println!("tokens={t} in={d_in} out={d_out} {name:7} GFLOP/s: f32_gemm {o:.0} gemm crate {g:.0}");
            }
        }
    }
}

//! `C = A·B` (or `C += A·B`, or `C = bf16(A·B + bias)`) with A and B rounded to bf16 and the
//! sums in f32: the matrix products of the fused linear kernels when the activations are bf16
//! (`train.precision = "bf16"`).
//!
//! One path is picked per process from the CPU it runs on:
//! - AMX (`amx_bf16` + `amx_tile`, Intel Sapphire Rapids and later): 16×16 f32 tiles summed by
//!   `tdpbf16ps`, written with `asm!` because Rust's AMX intrinsics and detection are unstable;
//! - AVX-512 BF16 on AMD (Zen 4 and later): `vdpbf16ps`. Intel CPUs run it at 2/3 of their f32
//!   FMA rate (measured on Sapphire Rapids), so Intel without AMX takes the next path;
//! - otherwise the operands are widened to f32 and multiplied by the `gemm` crate, as the fused
//!   kernels did before this module, so any CPU gets the right result.
//!
//! The two fast paths need AVX-512 F/BW/VL/BF16 to pack the operands: A row-major with its
//! rows and depth padded with zeros (bf16 A of a fitting shape is read in place), B as 16-column
//! blocks of bf16 pairs along the depth (what both instructions read). f32 operands are rounded
//! to nearest bf16 (ties to even; f32 denormals may become zero) as they are packed; the f32
//! path uses them unrounded.

use std::sync::OnceLock;

use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// The elements of an operand, stored row-major.
#[derive(Clone, Copy)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl Elems<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Elems::F32(v) => v.len(),
            Elems::Bf16(v) => v.len(),
        }
    }
}

/// An operand: `rows × cols` elements stored row-major; the product uses its transpose when
/// `t` is set.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    pub elems: Elems<'a>,
    pub rows: usize,
    pub cols: usize,
    pub t: bool,
}

impl<'a> Mat<'a> {
    pub fn new(elems: Elems<'a>, rows: usize, cols: usize) -> Self {
        Self {
            elems,
            rows,
            cols,
            t: false,
        }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Self { t: !self.t, ..self }
    }

    /// (rows, cols) as the product sees them.
    pub(crate) fn dims(&self) -> (usize, usize) {
        if self.t {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
}

/// How the products are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Amx,
    Avx512,
    /// Widened to f32, `gemm` crate.
    F32,
}

/// The fastest path this CPU (and OS) allows, decided once per process.
pub fn path() -> Path {
    static PATH: OnceLock<Path> = OnceLock::new();
    *PATH.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if fast::amx::supported() {
                return Path::Amx;
            }
            if fast::avx512::preferred() {
                return Path::Avx512;
            }
        }
        Path::F32
    })
}

/// `dst = src` rounded to bf16 (to nearest, ties to even; the bits of `half::bf16::from_f32`),
/// with AVX-512 where the CPU has it: half's own slice conversion goes one element at a time.
pub fn narrow(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "narrow: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if fast::has_avx512() {
        // SAFETY: AVX-512 F/BW/VL checked; src and dst have the same length.
        unsafe { fast::simd::narrow(Elems::F32(src), 0, dst) };
        return;
    }
    dst.convert_from_f32_slice(src);
}

/// Where a product `C` (`m × n`, row-major) goes.
pub enum Out<'a> {
    /// `C = A·B`, or `C += A·B` with `accumulate`.
    F32 { c: &'a mut [f32], accumulate: bool },
    /// `C = A·B + bias` (one f32 per column), rounded to bf16 once, at the end.
    Bf16 {
        c: &'a mut [bf16],
        bias: Option<&'a [f32]>,
    },
}

impl Out<'_> {
    fn len(&self) -> usize {
        match self {
            Out::F32 { c, .. } => c.len(),
            Out::Bf16 { c, .. } => c.len(),
        }
    }
}

/// `C (+)= A·B` for `A` `m × k` and `B` `k × n`, into `out`, on the fastest path.
pub fn matmul(out: Out, a: Mat, b: Mat) -> candle_core::Result<()> {
    matmul_on(path(), out, a, b)
}

/// [`matmul`] on a given path, which must be available (a fast path is only picked by `path()`
/// or a test that checked it).
fn matmul_on(path: Path, out: Out, a: Mat, b: Mat) -> candle_core::Result<()> {
    let ((m, k), (kb, n)) = (a.dims(), b.dims());
    let bias_ok = match &out {
        Out::Bf16 { bias: Some(b), .. } => b.len() == n,
        _ => true,
    };
    if k != kb || a.elems.len() != m * k || b.elems.len() != k * n || out.len() != m * n || !bias_ok
    {
        candle_core::bail!(
            "bf16 matmul: ({m}×{k}) · ({kb}×{n}) into {} elements does not fit",
            out.len()
        )
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        Path::Amx | Path::Avx512 if k > 0 => fast::matmul(path, out, (m, n, k), &a, &b),
        _ => widened(out, (m, n, k), &a, &b),
    }
    Ok(())
}

/// The operands as f32 (borrowed when they are), multiplied by the `gemm` crate.
fn widened(out: Out, (m, n, k): (usize, usize, usize), a: &Mat, b: &Mat) {
    fn f32s<'a>(e: Elems<'a>) -> std::borrow::Cow<'a, [f32]> {
        match e {
            Elems::F32(v) => v.into(),
            Elems::Bf16(v) => {
                let mut out = vec![0f32; v.len()];
                v.convert_to_f32_slice(&mut out);
                out.into()
            }
        }
    }
    let mut tmp;
    let (c, accumulate, bf16_out) = match out {
        Out::F32 { c, accumulate } => (c, accumulate, None),
        Out::Bf16 { c, bias } => {
            tmp = match bias {
                Some(b) => b.repeat(m),
                None => vec![0f32; m * n],
            };
            (&mut tmp[..], bias.is_some(), Some(c))
        }
    };
    let (av, bv) = (f32s(a.elems), f32s(b.elems));
    // (row, column) strides of each logical operand in its storage.
    let a_strides = if a.t { (1, m) } else { (k, 1) };
    let b_strides = if b.t { (1, k) } else { (n, 1) };
    super::gemm_crate::gemm_crate(c, (m, n, k), (&av, a_strides), (&bv, b_strides), accumulate);
    if let Some(dst) = bf16_out {
        dst.par_chunks_mut(1 << 14)
            .zip(c.par_chunks(1 << 14))
            .for_each(|(d, c)| narrow(c, d));
    }
}

/// The transpose of 16 × 16 u32 (or f32 bits) held in 16 registers, for `f32_gemm`'s packing.
#[cfg(target_arch = "x86_64")]
pub(crate) use fast::simd::transpose as transpose16;

#[cfg(target_arch = "x86_64")]
mod fast {
    use std::ops::Range;

    use half::bf16;
    use rayon::prelude::*;

    use super::{Elems, Mat, Out, Path};

    /// Depth is padded to a multiple of this (one AMX tile row: 32 bf16).
    const KB: usize = 32;
    /// Columns of B per packed block (one AMX tile, one AVX-512 register of f32).
    const NB: usize = 16;
    /// Columns of C per parallel task: a multiple of both paths' register blocks (32, 48).
    const TASK_N: usize = 96;
    /// Fewest rows of C a task takes when rows are split too.
    const TASK_M_MIN: usize = 128;

    thread_local! {
        /// Each thread's packed columns of B, reused from product to product (fresh pages
        /// would cost more than packing).
        static PACKED_B: std::cell::RefCell<Vec<bf16>> = const { std::cell::RefCell::new(Vec::new()) };
    }

    pub fn matmul(path: Path, out: Out, (m, n, k): (usize, usize, usize), a: &Mat, b: &Mat) {
        let (row_mult, col_mult, task): (usize, usize, unsafe fn(&Task)) = match path {
            Path::Amx => (32, 32, amx::task),
            _ => (avx512::MR, NB, avx512::task),
        };
        let kp = k.div_ceil(KB) * KB;
        let pa = PackedA::new(a, m, k, kp, row_mult);
        // Tasks own column chunks (each packs its part of B, once); rows are split too only
        // when there are too few chunks to keep every thread busy.
        let col_tasks = n.div_ceil(TASK_N);
        let want = (2 * rayon::current_num_threads()).div_ceil(col_tasks);
        let row_tasks = want.min(m.div_ceil(TASK_M_MIN)).max(1);
        let rows_per = m.div_ceil(row_tasks).div_ceil(32) * 32;
        let (c, accumulate, bias) = match out {
            Out::F32 { c, accumulate } => (C::F32(c.as_mut_ptr()), accumulate, None),
            Out::Bf16 { c, bias } => (C::Bf16(c.as_mut_ptr()), false, bias),
        };
        (0..col_tasks * row_tasks).into_par_iter().for_each(|t| {
            let (i, j) = (t % row_tasks * rows_per, t / row_tasks * TASK_N);
            if i >= m {
                return;
            }
            let cols = j..(j + TASK_N).min(n);
            let blocks = cols.len().div_ceil(col_mult) * col_mult / NB;
            PACKED_B.with_borrow_mut(|pb| {
                if pb.len() < blocks * kp * NB {
                    pb.resize(blocks * kp * NB, bf16::ZERO);
                }
                let pb = &mut pb[..blocks * kp * NB];
                // SAFETY: the fast paths run only where AVX-512 F/BW/VL is (`supported()`).
                unsafe { pack_b(b, k, n, j, pb) };
                let t = Task {
                    a: &pa,
                    pb,
                    kp,
                    c,
                    accumulate,
                    bias,
                    m,
                    n,
                    rows: i..(i + rows_per).min(m),
                    cols,
                };
                // SAFETY: `path` is supported (see `matmul_on`); the tasks' rectangles of C
                // are disjoint and C outlives them.
                unsafe { task(&t) }
            });
        });
    }

    /// C's storage, written by tasks in disjoint rectangles.
    #[derive(Clone, Copy)]
    enum C {
        F32(*mut f32),
        Bf16(*mut bf16),
    }
    // SAFETY: each task writes only its own rectangle of C (see `Task`).
    unsafe impl Send for C {}
    unsafe impl Sync for C {}

    /// One rectangle of C to compute, and the packed operands.
    pub struct Task<'a> {
        a: &'a PackedA<'a>,
        /// B's columns `cols.start..`, blocks of `NB` columns, each `kp / 2` rows of `NB`
        /// pairs.
        pb: &'a [bf16],
        kp: usize,
        c: C,
        /// Whether f32 C is added to.
        accumulate: bool,
        /// Added to bf16 C's columns.
        bias: Option<&'a [f32]>,
        m: usize,
        n: usize,
        rows: Range<usize>,
        cols: Range<usize>,
    }

    impl Task<'_> {
        /// Where the block of C at (i, j) of `rows × cols` goes: straight into f32 C
        /// (pointer, row stride, whether to add to it) when it lies inside, else into `buf`
        /// (row stride `ld`), for [`Task::store`].
        fn target(
            &self,
            i: usize,
            j: usize,
            rows: usize,
            cols: usize,
            buf: &mut [f32],
            ld: usize,
        ) -> (*mut f32, usize, bool) {
            match self.c {
                C::F32(c) if i + rows <= self.m && j + cols <= self.n => {
                    // SAFETY: (i, j) lies in C.
                    (unsafe { c.add(i * self.n + j) }, self.n, self.accumulate)
                }
                _ => (buf.as_mut_ptr(), ld, false),
            }
        }

        /// Puts `buf`, a block with row stride `ld` whose top left is C(i, j), into C (added,
        /// written, or with the bias and rounded), clipped to C.
        fn store(&self, i: usize, j: usize, buf: &[f32], ld: usize, rows: usize, cols: usize) {
            let (rows, cols) = (rows.min(self.m - i), cols.min(self.n - j));
            for r in 0..rows {
                let src = &buf[r * ld..r * ld + cols];
                let at = (i + r) * self.n + j;
                // SAFETY (both): (i + r, j..j + cols) lies in C (clipped above) and in this
                // task's rectangle (blocks start inside it and only the last reaches C's edge).
                match self.c {
                    C::F32(c) => {
                        let dst = unsafe { std::slice::from_raw_parts_mut(c.add(at), cols) };
                        if self.accumulate {
                            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                        } else {
                            dst.copy_from_slice(src);
                        }
                    }
                    C::Bf16(c) => {
                        let dst = unsafe { std::slice::from_raw_parts_mut(c.add(at), cols) };
                        let bias = self.bias.map(|b| &b[j..j + cols]);
                        // SAFETY: the fast paths run where AVX-512 F/BW/VL is.
                        unsafe { simd::add_narrow(src, bias, dst) };
                    }
                }
            }
        }
    }

    /// A (m × k) as rows of `kp` bf16, in blocks of `mult` rows, zeros beyond A: the first
    /// `head_rows` straight from A's storage when it already is bf16 of that shape (no copy),
    /// the rest packed.
    pub struct PackedA<'a> {
        head: &'a [bf16],
        head_rows: usize,
        tail: Vec<bf16>,
        kp: usize,
    }

    impl<'a> PackedA<'a> {
        fn new(a: &Mat<'a>, m: usize, k: usize, kp: usize, mult: usize) -> Self {
            let (head, head_rows) = match a.elems {
                Elems::Bf16(v) if !a.t && k == kp => (v, m / mult * mult),
                _ => (&[][..], 0),
            };
            let rows = m.div_ceil(mult) * mult - head_rows;
            let mut tail = vec![bf16::ZERO; rows * kp];
            // SAFETY (both branches): the fast paths run only where AVX-512 F/BW/VL is; the
            // chunks are the packed rows the functions expect.
            if !a.t {
                // Only the last few rows when A is bf16 already; in parallel otherwise.
                tail.par_chunks_mut(kp)
                    .take(m - head_rows)
                    .enumerate()
                    .with_min_len(if head_rows > 0 { usize::MAX } else { 1 })
                    .for_each(|(i, row)| unsafe {
                        simd::narrow(a.elems, (head_rows + i) * k, &mut row[..k])
                    });
            } else {
                // Bands of 32 rows of the storage, read whole: column strips of a large
                // matrix would be a cache miss per row.
                let dst = simd::Dst::new(&mut tail);
                (0..kp / 32)
                    .into_par_iter()
                    .for_each(|band| unsafe { simd::a_t_band(a.elems, m, k, 32 * band, dst) });
            }
            Self {
                head: &head[..head_rows * kp],
                head_rows,
                tail,
                kp,
            }
        }

        /// Rows i.. (at least one block of `mult` rows, starting at a multiple of it).
        fn rows(&self, i: usize) -> &[bf16] {
            if i < self.head_rows {
                &self.head[i * self.kp..]
            } else {
                &self.tail[(i - self.head_rows) * self.kp..]
            }
        }
    }

    /// Columns `j0..` of B (k × n) into `o`: blocks of NB columns, each `kp / 2` rows of NB
    /// (even, odd) depth pairs, zeros past B: row q of a block holds B(2q, j), B(2q + 1, j).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL.
    unsafe fn pack_b(b: &Mat, k: usize, n: usize, j0: usize, o: &mut [bf16]) {
        // SAFETY: AVX-512 F/BW/VL (the caller's); B has k × n elements.
        unsafe {
            if b.t {
                for (blk, o) in o.chunks_exact_mut(k.div_ceil(KB) * KB * NB).enumerate() {
                    simd::b_t_block(b.elems, k, n, j0 + blk * NB, o);
                }
            } else {
                simd::b_rows(b.elems, k, n, j0, o);
            }
        }
    }

    /// Whether the CPU has the AVX-512 subsets the packing uses.
    pub fn has_avx512() -> bool {
        crate::engine::cpu::features::get().avx512
    }

    /// Packing with AVX-512, 16 elements (or bf16 pairs, in u32 lanes) at a time.
    pub mod simd {
        use std::arch::x86_64::{
            __m256i, __m512, __m512bh, __m512i, _mm256_mask_storeu_epi16, _mm256_maskz_loadu_epi16,
            _mm512_add_epi32, _mm512_add_ps, _mm512_and_si512, _mm512_castps_si512,
            _mm512_castsi256_si512, _mm512_cmpgt_epu32_mask, _mm512_cvtepi32_epi16,
            _mm512_cvtepu16_epi32, _mm512_cvtne2ps_pbh, _mm512_inserti64x4, _mm512_loadu_si512,
            _mm512_mask_blend_epi32, _mm512_maskz_loadu_epi32, _mm512_maskz_loadu_ps,
            _mm512_or_si512, _mm512_permutexvar_epi16, _mm512_set1_epi32, _mm512_setzero_si512,
            _mm512_shuffle_i32x4, _mm512_srli_epi32, _mm512_storeu_si512, _mm512_unpackhi_epi32,
            _mm512_unpackhi_epi64, _mm512_unpacklo_epi32, _mm512_unpacklo_epi64, _mm_prefetch,
            _MM_HINT_T0,
        };

        use half::bf16;

        use super::{Elems, NB};

        /// How many rows ahead `b_rows` prefetches.
        const PREFETCH_ROWS: usize = 8;

        /// Lanes below `len` (at most 16).
        fn mask(len: usize) -> u16 {
            ((1u32 << len) - 1) as u16
        }

        /// Elements `start..start + len` of `e` (len ≤ 16) as bf16 bits in the low halves of
        /// u32 lanes, zeros from lane `len` on. f32 rounds to nearest, ties to even, NaNs stay
        /// quiet NaNs: the bits of `half::bf16::from_f32`.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL; `start + len <= e`'s length (masked-off lanes are not read).
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn row16(e: Elems, start: usize, len: usize) -> __m512i {
            let k = mask(len);
            match e {
                Elems::Bf16(v) => {
                    debug_assert!(len == 0 || start + len <= v.len());
                    let p = v.as_ptr().wrapping_add(start).cast();
                    // SAFETY: the lanes read lie in v.
                    _mm512_cvtepu16_epi32(unsafe { _mm256_maskz_loadu_epi16(k, p) })
                }
                Elems::F32(v) => {
                    debug_assert!(len == 0 || start + len <= v.len());
                    let p = v.as_ptr().wrapping_add(start).cast();
                    // SAFETY: the lanes read lie in v.
                    round(unsafe { _mm512_maskz_loadu_epi32(k, p) })
                }
            }
        }

        /// The bits of 16 f32 rounded to bf16 (in the low halves of the lanes) as
        /// `half::bf16::from_f32` rounds them.
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn round(x: __m512i) -> __m512i {
            let high = _mm512_srli_epi32::<16>(x);
            let odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
            let bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(x, bias));
            let quiet = _mm512_or_si512(high, _mm512_set1_epi32(0x40));
            let abs = _mm512_and_si512(x, _mm512_set1_epi32(0x7fff_ffff));
            let nan = _mm512_cmpgt_epu32_mask(abs, _mm512_set1_epi32(0x7f80_0000));
            _mm512_mask_blend_epi32(nan, rounded, quiet)
        }

        /// `dst = src + bias`, rounded to bf16 as [`narrow`] rounds.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        pub unsafe fn add_narrow(src: &[f32], bias: Option<&[f32]>, dst: &mut [bf16]) {
            assert!(src.len() >= dst.len() && bias.is_none_or(|b| b.len() >= dst.len()));
            for (c, d) in dst.chunks_mut(16).enumerate() {
                // SAFETY: 16c + d.len() <= dst.len() <= src.len(), bias.len() (asserted).
                unsafe {
                    let mut v = f32x16(src, 16 * c, d.len());
                    if let Some(b) = bias {
                        v = _mm512_add_ps(v, f32x16(b, 16 * c, d.len()));
                    }
                    let v = _mm512_cvtepi32_epi16(round(_mm512_castps_si512(v)));
                    _mm256_mask_storeu_epi16(d.as_mut_ptr().cast(), mask(d.len()), v);
                }
            }
        }

        /// Up to 16 f32 of `v` from `start`, zeros after `len`.
        ///
        /// # Safety
        /// AVX-512 F; `start + len <= v.len()`.
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn f32x16(v: &[f32], start: usize, len: usize) -> __m512 {
            debug_assert!(len == 0 || start + len <= v.len());
            // SAFETY: the lanes read lie in v.
            unsafe { _mm512_maskz_loadu_ps(mask(len), v.as_ptr().wrapping_add(start)) }
        }

        /// Up to 16 bf16 of `v` from `start`, zeros after `len`.
        ///
        /// # Safety
        /// AVX-512 BW/VL; `start + len <= v.len()`.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[inline]
        unsafe fn bf16x16(v: &[bf16], start: usize, len: usize) -> __m256i {
            debug_assert!(len == 0 || start + len <= v.len());
            let p = v.as_ptr().wrapping_add(start).cast();
            // SAFETY: the lanes read lie in v.
            unsafe { _mm256_maskz_loadu_epi16(mask(len), p) }
        }

        /// Two rows of 16 bf16 (the low and high halves of the argument) as 16 (low, high)
        /// pairs.
        #[target_feature(enable = "avx512f,avx512bw")]
        #[inline]
        fn zip(v: __m512i) -> __m512i {
            static ORDER: [u16; 32] = {
                let mut o = [0u16; 32];
                let mut i = 0;
                while i < 16 {
                    o[2 * i] = i as u16;
                    o[2 * i + 1] = 16 + i as u16;
                    i += 1;
                }
                o
            };
            // SAFETY: ORDER holds 64 bytes.
            let order = unsafe { _mm512_loadu_si512(ORDER.as_ptr().cast()) };
            _mm512_permutexvar_epi16(order, v)
        }

        /// Elements `start..start + len` of `e` (len ≤ 32) as 32 bf16, zeros after: f32 rounded
        /// by `vcvtne2ps2bf16` (to nearest, ties to even; denormals become zero).
        ///
        /// # Safety
        /// AVX-512 F/BW/VL/BF16; `start + len <= e`'s length.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        #[inline]
        unsafe fn bf16x32(e: Elems, start: usize, len: usize) -> __m512i {
            let (lo, hi) = (len.min(16), len.saturating_sub(16));
            // SAFETY: the callers' bounds, in two halves.
            unsafe {
                match e {
                    Elems::Bf16(v) => {
                        let (lo, hi) = (bf16x16(v, start, lo), bf16x16(v, start + 16, hi));
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
                    }
                    Elems::F32(v) => {
                        let (lo, hi) = (f32x16(v, start, lo), f32x16(v, start + 16, hi));
                        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
                    }
                }
            }
        }

        /// Rows (or zeros past `k`) `p, p + 1` at columns `j0..j0 + w` of S (stored · × n), as
        /// 16 lanes of (row p, row p + 1) pairs.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL/BF16; S has k × n elements, j0 + w <= n, w <= 16.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        #[inline]
        unsafe fn row_pair(s: Elems, k: usize, n: usize, p: usize, j0: usize, w: usize) -> __m512i {
            let (lo, hi) = (if p < k { w } else { 0 }, if p + 1 < k { w } else { 0 });
            // SAFETY: rows p, p + 1 (when < k), columns j0..j0 + w: inside S.
            let v = unsafe {
                match s {
                    Elems::Bf16(v) => {
                        let (a, b) = (bf16x16(v, p * n + j0, lo), bf16x16(v, (p + 1) * n + j0, hi));
                        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(a), b)
                    }
                    Elems::F32(v) => {
                        let (a, b) = (f32x16(v, p * n + j0, lo), f32x16(v, (p + 1) * n + j0, hi));
                        std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a))
                    }
                }
            };
            zip(v)
        }

        /// The transpose of a 16 × 16 matrix of u32, rows in registers.
        #[target_feature(enable = "avx512f")]
        #[inline]
        pub fn transpose(r: &mut [__m512i; 16]) {
            // 4×4 blocks within 128-bit lanes, then the lanes: u[4b + c], lane l, holds column
            // 4l + c of rows 4b..4b + 4.
            let mut u = [_mm512_setzero_si512(); 16];
            for b in 0..4 {
                let t0 = _mm512_unpacklo_epi32(r[4 * b], r[4 * b + 1]);
                let t1 = _mm512_unpackhi_epi32(r[4 * b], r[4 * b + 1]);
                let t2 = _mm512_unpacklo_epi32(r[4 * b + 2], r[4 * b + 3]);
                let t3 = _mm512_unpackhi_epi32(r[4 * b + 2], r[4 * b + 3]);
                u[4 * b] = _mm512_unpacklo_epi64(t0, t2);
                u[4 * b + 1] = _mm512_unpackhi_epi64(t0, t2);
                u[4 * b + 2] = _mm512_unpacklo_epi64(t1, t3);
                u[4 * b + 3] = _mm512_unpackhi_epi64(t1, t3);
            }
            let mut v = [_mm512_setzero_si512(); 16];
            for c in 0..4 {
                v[c] = _mm512_shuffle_i32x4::<0x88>(u[c], u[c + 4]);
                v[c + 4] = _mm512_shuffle_i32x4::<0xdd>(u[c], u[c + 4]);
                v[c + 8] = _mm512_shuffle_i32x4::<0x88>(u[c + 8], u[c + 12]);
                v[c + 12] = _mm512_shuffle_i32x4::<0xdd>(u[c + 8], u[c + 12]);
            }
            for c in 0..8 {
                r[c] = _mm512_shuffle_i32x4::<0x88>(v[c], v[c + 8]);
                r[c + 8] = _mm512_shuffle_i32x4::<0xdd>(v[c], v[c + 8]);
            }
        }

        /// Stores 64 bytes at `o[at..]`.
        #[target_feature(enable = "avx512f")]
        #[inline]
        fn store(o: &mut [bf16], at: usize, v: __m512i) {
            assert!(at + 32 <= o.len());
            // SAFETY: 32 bf16 from `at` lie in o (checked).
            unsafe { _mm512_storeu_si512(o.as_mut_ptr().add(at).cast(), v) }
        }

        /// `dst.len()` elements of `e` from `start`, as bf16.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL; `start + dst.len() <= e`'s length.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        pub unsafe fn narrow(e: Elems, start: usize, dst: &mut [bf16]) {
            for (c, d) in dst.chunks_mut(16).enumerate() {
                // SAFETY: elements start + 16c.. of d's length lie in e; d takes them.
                unsafe {
                    let v = _mm512_cvtepi32_epi16(row16(e, start + 16 * c, d.len()));
                    _mm256_mask_storeu_epi16(d.as_mut_ptr().cast(), mask(d.len()), v);
                }
            }
        }

        /// The destination of packing tasks that write disjoint parts of one buffer.
        #[derive(Clone, Copy)]
        pub struct Dst(*mut bf16, usize);

        // SAFETY: the tasks given a Dst write disjoint elements of it (see the callers).
        unsafe impl Send for Dst {}
        unsafe impl Sync for Dst {}

        impl Dst {
            pub fn new(v: &mut [bf16]) -> Self {
                Self(v.as_mut_ptr(), v.len())
            }

            /// Stores 64 bytes at element `at`.
            #[target_feature(enable = "avx512f")]
            #[inline]
            fn store(self, at: usize, v: __m512i) {
                assert!(at + 32 <= self.1);
                // SAFETY: 32 bf16 from `at` lie in the buffer (checked), which outlives the
                // tasks; no other task writes them.
                unsafe { _mm512_storeu_si512(self.0.add(at).cast(), v) }
            }
        }

        /// Depth `p0..p0 + 32` of every row of A = Sᵀ (S stored k × m), into rows of kp.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL; S has k × m elements; dst holds whole rows of kp ≥ m... at least
        /// m rows; no other task writes this depth band.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        pub unsafe fn a_t_band(s: Elems, m: usize, k: usize, p0: usize, dst: Dst) {
            let kp = k.div_ceil(32) * 32;
            let rows = dst.1 / kp;
            let mut r = [_mm512_setzero_si512(); NB];
            for i0 in (0..m).step_by(NB) {
                let w = NB.min(m - i0);
                for (q, v) in r.iter_mut().enumerate() {
                    // SAFETY: rows < k, columns i0..i0 + w ≤ m of S.
                    *v = unsafe { row_pair(s, k, m, p0 + 2 * q, i0, w) };
                }
                transpose(&mut r);
                for (l, &v) in r.iter().enumerate().take(rows - i0) {
                    dst.store((i0 + l) * kp + p0, v);
                }
            }
        }

        /// The blocks of `o` (each kp / 2 rows of NB pairs) from columns `j0..` of B = S
        /// (stored k × n), a pair of rows at a time.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL; S has k × n elements.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        pub unsafe fn b_rows(s: Elems, k: usize, n: usize, j0: usize, o: &mut [bf16]) {
            let kp = k.div_ceil(32) * 32;
            let blocks = o.len() / (kp * NB);
            let (bytes, start) = match s {
                Elems::F32(v) => (4, v.as_ptr().cast::<u8>()),
                Elems::Bf16(v) => (2, v.as_ptr().cast::<u8>()),
            };
            let span = (n.saturating_sub(j0)).min(blocks * NB) * bytes;
            for q in 0..kp / 2 {
                // Rows further down, ahead of use: rows of a wide B lie a page or more apart,
                // which the hardware prefetcher does not follow, and the loads waited on memory.
                for r in [2 * q + PREFETCH_ROWS, 2 * q + PREFETCH_ROWS + 1] {
                    if r < k {
                        let row = start.wrapping_add((r * n + j0) * bytes);
                        for line in (0..span).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(line).cast());
                        }
                    }
                }
                for blk in 0..blocks {
                    let j = j0 + blk * NB;
                    let w = NB.min(n.saturating_sub(j));
                    // SAFETY: rows < k, columns j..j + w ≤ n of S.
                    let v = unsafe { row_pair(s, k, n, 2 * q, j, w) };
                    store(o, blk * kp * NB + q * 2 * NB, v);
                }
            }
        }

        /// Block of columns `j0..j0 + NB` of B = Sᵀ (S stored n × k) into `o`.
        ///
        /// # Safety
        /// AVX-512 F/BW/VL; S has n × k elements.
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        pub unsafe fn b_t_block(s: Elems, k: usize, n: usize, j0: usize, o: &mut [bf16]) {
            let w = NB.min(n.saturating_sub(j0));
            let kp = o.len() / NB;
            let mut r = [_mm512_setzero_si512(); NB];
            for p0 in (0..kp).step_by(32) {
                let len = 32.min(k.saturating_sub(p0));
                for (l, v) in r.iter_mut().enumerate() {
                    *v = if l < w {
                        // SAFETY: row j0 + l < n, elements p0..p0 + len ≤ k of it.
                        unsafe { bf16x32(s, (j0 + l) * k + p0, len) }
                    } else {
                        _mm512_setzero_si512()
                    };
                }
                transpose(&mut r);
                for (q, &v) in r.iter().enumerate() {
                    store(o, (p0 / 2 + q) * 2 * NB, v);
                }
            }
        }
    }

    /// AMX: 32×32 blocks of C in four tiles, A and B two tiles each per 32-deep step.
    pub mod amx {
        use std::arch::asm;

        use super::{Task, NB};

        /// CPUID leaf 7 EDX bits, and Linux's arch_prctl request for the tile data state.
        const AMX_BF16: u32 = 1 << 22;
        const AMX_TILE: u32 = 1 << 24;
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;

        /// Whether the CPU has AMX-BF16 and the kernel lets this process use the tiles.
        pub fn supported() -> bool {
            let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
            if leaf7.edx & (AMX_BF16 | AMX_TILE) != AMX_BF16 | AMX_TILE
                || !crate::engine::cpu::features::get().avx512bf16
            {
                return false;
            }
            // Linux hands out the 8 KiB tile state only on request, once per process (all
            // threads); an older kernel or a small signal stack refuses.
            // SAFETY: arch_prctl with these arguments only changes the process's permissions.
            unsafe {
                libc::syscall(
                    libc::SYS_arch_prctl,
                    ARCH_REQ_XCOMP_PERM,
                    XFEATURE_XTILEDATA,
                ) == 0
            }
        }

        /// Palette 1, eight tiles of 16 rows × 64 bytes: C in tmm0-3, A in tmm4-5, B in tmm6-7.
        #[repr(C, align(64))]
        struct TileConfig([u8; 64]);

        fn config() -> TileConfig {
            let mut c = [0u8; 64];
            c[0] = 1;
            for t in 0..8 {
                c[16 + 2 * t] = 64; // bytes per row (little-endian u16)
                c[48 + t] = 16; // rows
            }
            TileConfig(c)
        }

        /// # Safety
        /// The CPU has AMX-BF16 and the tile permission was granted (`supported()`).
        pub unsafe fn task(t: &Task) {
            let cfg = config();
            // SAFETY: a valid palette-1 configuration; the tiles are this thread's until
            // `tilerelease` below, and no other code touches them meanwhile.
            unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack, readonly)) };
            let mut buf = [0f32; 32 * 32];
            let kp = t.kp;
            let a_stride = kp * 2; // bytes between rows of A
            for j in t.cols.clone().step_by(32) {
                let blk = (j - t.cols.start) / NB;
                let b0 = t.pb[blk * kp * NB..].as_ptr();
                let b1 = t.pb[(blk + 1) * kp * NB..].as_ptr();
                for i in t.rows.clone().step_by(32) {
                    let a0 = t.a.rows(i).as_ptr();
                    let a1 = t.a.rows(i)[16 * kp..].as_ptr();
                    let (c, ldc, load) = t.target(i, j, 32, 32, &mut buf, 32);
                    let s = ldc * 4;
                    // SAFETY: c points to 32 rows of 32 f32 with row stride ldc (C or buf).
                    let (c0, c1, c2, c3) =
                        unsafe { (c, c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16)) };
                    if load {
                        // SAFETY: the four 16×16 quarters of that block.
                        unsafe {
                            asm!(
                                "tileloadd tmm0, [{c0} + {s}]",
                                "tileloadd tmm1, [{c1} + {s}]",
                                "tileloadd tmm2, [{c2} + {s}]",
                                "tileloadd tmm3, [{c3} + {s}]",
                                c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                                s = in(reg) s,
                                options(nostack, readonly, preserves_flags)
                            )
                        };
                    } else {
                        // SAFETY: tile ops only.
                        unsafe {
                            asm!(
                                "tilezero tmm0",
                                "tilezero tmm1",
                                "tilezero tmm2",
                                "tilezero tmm3",
                                options(nostack, nomem, preserves_flags)
                            )
                        };
                    }
                    for s in 0..kp / 32 {
                        // SAFETY: A's blocks are 32 rows of kp (a multiple of 32), B's pairs of
                        // NB-column blocks of kp / 2 rows of 64 bytes: every tile read (16 rows
                        // of 64 bytes) lies inside them.
                        unsafe {
                            asm!(
                                "tileloadd tmm4, [{a0} + {sa}]",
                                "tileloadd tmm5, [{a1} + {sa}]",
                                "tileloadd tmm6, [{b0} + {sb}]",
                                "tileloadd tmm7, [{b1} + {sb}]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                a0 = in(reg) a0.add(32 * s),
                                a1 = in(reg) a1.add(32 * s),
                                b0 = in(reg) b0.add(32 * NB * s),
                                b1 = in(reg) b1.add(32 * NB * s),
                                sa = in(reg) a_stride,
                                sb = in(reg) 64usize,
                                options(nostack, readonly, preserves_flags)
                            )
                        };
                    }
                    // SAFETY: the four tiles back where they were loaded from.
                    unsafe {
                        asm!(
                            "tilestored [{c0} + {s}], tmm0",
                            "tilestored [{c1} + {s}], tmm1",
                            "tilestored [{c2} + {s}], tmm2",
                            "tilestored [{c3} + {s}], tmm3",
                            c0 = in(reg) c0, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3,
                            s = in(reg) s,
                            options(nostack, preserves_flags)
                        )
                    };
                    if c == buf.as_mut_ptr() {
                        t.store(i, j, &buf, 32, 32, 32);
                    }
                }
            }
            // SAFETY: gives the tile state back (the next task configures it again).
            unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
        }
    }

    /// AVX-512 BF16: MR × 48 blocks of C in 24 registers, `vdpbf16ps` per depth pair.
    pub mod avx512 {
        use std::arch::x86_64::{
            __m512, __m512bh, _mm512_add_ps, _mm512_dpbf16_ps, _mm512_loadu_ps, _mm512_setzero_ps,
            _mm512_storeu_ps,
        };

        use super::{Task, NB};

        pub const MR: usize = 8;
        const NR: usize = 3;

        /// Whether the CPU can run this path.
        pub fn supported() -> bool {
            crate::engine::cpu::features::get().avx512bf16
        }

        /// Whether this path beats widening to f32 here: on AMD `vdpbf16ps` does twice the
        /// multiply-adds of an f32 FMA per cycle (measured on an EPYC: 540-760 GFLOP/s against
        /// 280-400 for f32 on 2 cores); on Intel (Sapphire Rapids, measured) it runs at 2/3 of
        /// the f32 FMA rate, so there f32 wins.
        pub fn preferred() -> bool {
            crate::engine::cpu::features::get().amd && supported()
        }

        /// # Safety
        /// The CPU has AVX-512F and AVX-512 BF16.
        #[target_feature(enable = "avx512f,avx512bf16")]
        pub unsafe fn task(t: &Task) {
            let mut buf = [0f32; MR * NR * NB];
            let blocks = t.pb.len() / (t.kp * NB);
            for j in t.cols.clone().step_by(NR * NB) {
                let blk = (j - t.cols.start) / NB;
                let b = &t.pb[blk * t.kp * NB..];
                let w = (blocks - blk).min(NR);
                for i in t.rows.clone().step_by(MR) {
                    let a = &t.a.rows(i)[..MR * t.kp];
                    let (c, ldc, load) = t.target(i, j, MR, w * NB, &mut buf, NR * NB);
                    // SAFETY: a holds MR rows and b `w` blocks, of kp depth; c takes MR rows
                    // of w * NB f32 at stride ldc; the CPU features are this function's.
                    unsafe {
                        match w {
                            1 => kernel::<1>(a, &b[..t.kp * NB], t.kp, c, ldc, load),
                            2 => kernel::<2>(a, &b[..2 * t.kp * NB], t.kp, c, ldc, load),
                            _ => kernel::<3>(a, &b[..3 * t.kp * NB], t.kp, c, ldc, load),
                        }
                    }
                    if c == buf.as_mut_ptr() {
                        t.store(i, j, &buf, NR * NB, MR, w * NB);
                    }
                }
            }
        }

        /// C (MR × 16W at `c`, row stride `ldc`) = (or +=, with `load`) the MR rows of `a`
        /// times the `W` blocks of `b`.
        #[target_feature(enable = "avx512f,avx512bf16")]
        #[inline(never)] // inlined, its accumulators spill
        unsafe fn kernel<const W: usize>(
            a: &[half::bf16],
            b: &[half::bf16],
            kp: usize,
            c: *mut f32,
            ldc: usize,
            load: bool,
        ) {
            let mut acc = [[_mm512_setzero_ps(); W]; MR];
            // Loads through `zmm` and wrapping_add (see `zmm.rs`).
            let (a, b) = (a.as_ptr(), b.as_ptr());
            for q in 0..kp / 2 {
                let mut bv = [_mm512_setzero_ps(); W];
                for (w, v) in bv.iter_mut().enumerate() {
                    // SAFETY: block w, row q (NB pairs = 64 bytes) lies in b (W blocks).
                    *v = unsafe {
                        crate::engine::cpu::zmm::load!(b
                            .wrapping_add(w * kp * NB + q * 2 * NB)
                            .cast::<f32>())
                    };
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    // SAFETY: pair q of row r of a (MR rows of kp), to all 16 lanes.
                    let av = unsafe {
                        crate::engine::cpu::zmm::broadcast!(a
                            .wrapping_add(r * kp + 2 * q)
                            .cast::<f32>())
                    };
                    for (c, &v) in acc.iter_mut().zip(&bv) {
                        *c = _mm512_dpbf16_ps(*c, bh(av), bh(v));
                    }
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                for (w, &v) in acc.iter().enumerate() {
                    // SAFETY: (r, 16w..16w + 16) lies in the block at c.
                    unsafe {
                        let p = c.add(r * ldc + w * NB);
                        let v = if load {
                            _mm512_add_ps(_mm512_loadu_ps(p), v)
                        } else {
                            v
                        };
                        _mm512_storeu_ps(p, v);
                    }
                }
            }
        }

        /// The 32 bf16 in a register's bits.
        #[inline(always)]
        fn bh(v: __m512) -> __m512bh {
            // SAFETY: both are 64-byte vectors; every bit pattern is a valid bf16 vector.
            unsafe { std::mem::transmute::<__m512, __m512bh>(v) }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn narrow_rounds_as_half_does() {
            if !has_avx512() {
                return;
            }
            let mut bits: Vec<u32> = (0..1u64 << 32).step_by(65_521).map(|b| b as u32).collect();
            bits.extend([
                0,
                0x8000_0000,
                0x7f80_0000,
                0xff80_0000,
                0x7f7f_ffff,
                0x7f80_0001,
                0xffc0_0000,
                0xffff_ffff,
                0x3f80_8000,
                0x3f81_8000,
                0x0000_8000,
            ]);
            let src: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
            let mut got = vec![bf16::ZERO; src.len()];
            // SAFETY: AVX-512 checked above; got has src's length.
            unsafe { simd::narrow(Elems::F32(&src), 0, &mut got) };
            for (s, g) in src.iter().zip(&got) {
                assert_eq!(
                    g.to_bits(),
                    bf16::from_f32(*s).to_bits(),
                    "{:#x}",
                    s.to_bits()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// Every path this machine can run, whether `path()` picks it or not.
    fn paths() -> Vec<Path> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if path() == Path::Amx {
                v.push(Path::Amx);
            }
            if fast::avx512::supported() {
                v.push(Path::Avx512);
            }
        }
        v.push(Path::F32);
        v
    }

    /// `n` random values already representable in bf16.
    fn values(rng: &mut impl Rng, n: usize) -> Vec<bf16> {
        (0..n)
            .map(|_| bf16::from_f32(rng.gen_range(-2.0f32..2.0)))
            .collect()
    }

    /// How a product's result is checked.
    #[derive(Clone, Copy, Debug)]
    enum Kind {
        Overwrite,
        Accumulate,
        Bf16,
        Bf16Bias,
    }

    /// Checks every path on `C = A·B` (or the `kind`'s variant) for A given as m×k (or its
    /// transpose stored k×m) and B as k×n (or stored n×k), against an f64 sum of the same bf16
    /// values, each operand given as bf16 and as f32.
    fn check(m: usize, n: usize, k: usize, a_t: bool, b_t: bool, kind: Kind, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (av, bv) = (values(&mut rng, m * k), values(&mut rng, k * n));
        let c0: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let a_at = |i: usize, p: usize| av[if a_t { p * m + i } else { i * k + p }].to_f64();
        let b_at = |p: usize, j: usize| bv[if b_t { j * k + p } else { p * n + j }].to_f64();
        let (af, bf): (Vec<f32>, Vec<f32>) = (
            av.iter().map(|v| v.to_f32()).collect(),
            bv.iter().map(|v| v.to_f32()).collect(),
        );
        let mat = |e, t, rows, cols| Mat {
            elems: e,
            rows: if t { cols } else { rows },
            cols: if t { rows } else { cols },
            t,
        };
        for path in paths() {
            for f32_elems in [false, true] {
                // The fast paths must round f32 operands to the same bf16 values.
                let (a, b) = if f32_elems {
                    (
                        mat(Elems::F32(&af), a_t, m, k),
                        mat(Elems::F32(&bf), b_t, k, n),
                    )
                } else {
                    (
                        mat(Elems::Bf16(&av), a_t, m, k),
                        mat(Elems::Bf16(&bv), b_t, k, n),
                    )
                };
                let (mut c, mut c16) = (c0.clone(), vec![bf16::ZERO; m * n]);
                let out = match kind {
                    Kind::Overwrite | Kind::Accumulate => Out::F32 {
                        c: &mut c,
                        accumulate: matches!(kind, Kind::Accumulate),
                    },
                    Kind::Bf16 | Kind::Bf16Bias => Out::Bf16 {
                        c: &mut c16,
                        bias: matches!(kind, Kind::Bf16Bias).then_some(&bias[..]),
                    },
                };
                matmul_on(path, out, a, b).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        let start = match kind {
                            Kind::Accumulate => c0[i * n + j] as f64,
                            Kind::Bf16Bias => bias[j] as f64,
                            _ => 0.0,
                        };
                        let (mut want, mut scale) = (start, start.abs());
                        for p in 0..k {
                            want += a_at(i, p) * b_at(p, j);
                            scale += (a_at(i, p) * b_at(p, j)).abs();
                        }
                        // f32 rounding of each of k + 1 additions, at most, and the final
                        // rounding to bf16 (8 bits).
                        let mut tol = (k as f64 + 2.0) * f32::EPSILON as f64 * scale + 1e-30;
                        let got = match kind {
                            Kind::Overwrite | Kind::Accumulate => c[i * n + j] as f64,
                            Kind::Bf16 | Kind::Bf16Bias => {
                                tol += want.abs() / 256.0;
                                c16[i * n + j].to_f64()
                            }
                        };
                        assert!(
                            (got - want).abs() <= tol,
                            "{path:?} {kind:?} f32 input {f32_elems} {m}×{k}·{k}×{n} (a_t {a_t}, \
                             b_t {b_t}) at ({i}, {j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bf16_gemm_every_path_matches_an_f64_reference_on_odd_shapes() {
        let kinds = [
            Kind::Overwrite,
            Kind::Accumulate,
            Kind::Bf16,
            Kind::Bf16Bias,
        ];
        let mut seed = 0;
        for (m, n, k) in [
            (1, 1, 1),
            (3, 5, 7),
            (17, 33, 31),
            (31, 16, 32),
            (32, 32, 33),
            (33, 47, 65),
            (40, 49, 2),
            (129, 97, 63),
            (130, 200, 96),
            (257, 193, 45),
            (300, 100, 64),
        ] {
            for (a_t, b_t) in [(false, true), (false, false), (true, false), (true, true)] {
                seed += 1;
                check(m, n, k, a_t, b_t, kinds[seed as usize % 4], seed);
            }
        }
    }

    fn f32_out(c: &mut [f32], accumulate: bool) -> Out<'_> {
        Out::F32 { c, accumulate }
    }

    #[test]
    fn bf16_gemm_overwrites_or_accumulates_and_handles_empty_depth() {
        for path in paths() {
            let (a, b) = ([bf16::ONE; 6], [bf16::ONE; 6]);
            let a = Mat::new(Elems::Bf16(&a), 2, 3);
            let b = Mat::new(Elems::Bf16(&b), 3, 2);
            let mut c = vec![1.0; 4];
            matmul_on(path, f32_out(&mut c, true), a, b).unwrap();
            assert_eq!(c, [4.0; 4], "{path:?}");
            matmul_on(path, f32_out(&mut c, false), a, b).unwrap();
            assert_eq!(c, [3.0; 4], "{path:?}");
            let (e0, e1) = (
                Mat::new(Elems::Bf16(&[]), 2, 0),
                Mat::new(Elems::Bf16(&[]), 0, 2),
            );
            matmul_on(path, f32_out(&mut c, false), e0, e1).unwrap();
            assert_eq!(c, [0.0; 4], "{path:?}");
            let mut c16 = [bf16::ONE; 4];
            let bias = Some(&[0.5f32, -2.0][..]);
            matmul_on(path, Out::Bf16 { c: &mut c16, bias }, e0, e1).unwrap();
            assert_eq!(c16.map(|v| v.to_f32()), [0.5, -2.0, 0.5, -2.0], "{path:?}");
            assert!(
                matmul_on(path, f32_out(&mut c, false), a, a).is_err(),
                "{path:?}"
            );
        }
    }

    #[test]
    #[ignore = "timing; run with --ignored --nocapture on a quiet machine"]
    fn bf16_gemm_speed() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (tokens, d_in, d_out) in [
            (2048, 384, 1536),
            (2048, 1536, 384),
            (2048, 384, 384),
            (600, 384, 1536),
            (400, 384, 1152),
            (400, 384, 1536),
            (400, 1536, 384),
            (2048, 768, 3072),
        ] {
            let x = values(&mut rng, tokens * d_in);
            let g = values(&mut rng, tokens * d_out);
            let w: Vec<f32> = (0..d_out * d_in)
                .map(|_| rng.gen_range(-1.0..1.0))
                .collect();
            let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
            let gf: Vec<f32> = g.iter().map(|v| v.to_f32()).collect();
            let flops = 2.0 * (tokens * d_in * d_out) as f64;
            let time = |f: &mut dyn FnMut()| crate::testing::gflops(flops, f);
            let wm = Mat::new(Elems::F32(&w), d_out, d_in);
            // The three products of a linear layer: y = x Wᵀ, dx = g W, dW = gᵀ x.
            let products = |x, g| {
                let (xm, gm) = (Mat::new(x, tokens, d_in), Mat::new(g, tokens, d_out));
                [
                    ("y=xWt", xm, wm.t(), tokens * d_out),
                    ("dx=gW", gm, wm, tokens * d_in),
                    ("dW=gtx", gm.t(), xm, d_out * d_in),
                ]
            };
            let mut c = vec![0f32; tokens * d_out.max(d_in)];
            // GFLOP/s of each path in `on` for the product a·b into `len` values of c.
            let mut rates = |on: &[Path], a: Mat, b: Mat, len: usize| {
                let mut line = String::new();
                for &p in on {
                    let out = &mut c[..len];
                    let g = time(&mut || {
                        let out = Out::F32 {
                            c: out,
                            accumulate: false,
                        };
                        matmul_on(p, out, a, b).unwrap()
                    });
                    line += &format!(" {p:?} {g:.0}");
                }
                line
            };
            let bf16s = products(Elems::Bf16(&x[..]), Elems::Bf16(&g[..]));
            for (i, (name, a, b, len)) in bf16s.into_iter().enumerate() {
                let mut line = format!("tokens={tokens} in={d_in} out={d_out} {name:7} GFLOP/s:");
                line += &rates(&paths(), a, b, len);
                // f32 inputs: on the picked path (rounded as packed), and the gemm crate (what
                // f32 training runs).
                let (_, a, b, _) = products(Elems::F32(&xf[..]), Elems::F32(&gf[..]))[i];
                line += " | f32 inputs:";
                line += &rates(&[path(), Path::F32], a, b, len);
                println!("{line}");
            }
        }
    }
}

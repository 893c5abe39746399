//! The weight gradient of a linear layer, `dw += dyᵀ x` summed over tokens, in one fixed order:
//! each element of `dw` is a chain of fused multiply-adds over the tokens in turn, starting
//! from the value `dw` holds. A step cut into micro-batches then continues the same chains
//! where the previous micro-batch left them, so its sums are the uncut step's, bit for bit
//! (the gemm crate adds per-block partial sums into `dw`, in an order that depends on the call).
//!
//! Every path computes `acc = fma(dy[t,i], x[t,j], acc)` (one rounding per token), so the
//! AVX-512 and AVX2 tiles and the scalar fallback give the same bits. The rows of `dw` are cut
//! into chunks, one parallel task each; tokens go in blocks: the block's `x` is packed once
//! into column panels for all chunks, each chunk packs its `dy` (it stays in L2), and each
//! panel (in L1) passes over every tile of the chunk.

use rayon::prelude::*;

use super::features;

/// Columns of `dw` (input features) per register tile: one 16-lane register (AVX-512) or two
/// 8-lane ones (AVX2) a row.
const NR: usize = 16;
/// Rows of `dw` per register tile at most (AVX-512's 24 accumulators of its 32 registers).
const MR_MAX: usize = 24;
/// Rows of `dw` per AVX2 (and scalar) tile: 12 accumulators of AVX2's 16 registers.
const MR_AVX2: usize = 6;
/// Tokens per packed block: a column panel (`NR·TB` floats, 16 KiB) stays in L1.
const TB: usize = 256;
/// Rows of `dw` per parallel task at most: the chunk's packed `dy` (`MC_ROWS·TB` floats,
/// 96 KiB) stays in L2 while the column panels pass.
const MC_ROWS: usize = 96;

/// One token's `NR` values of a column panel (or a row of a register tile), on a 64-byte
/// boundary: the tiles read them with aligned loads, plain dereferences (`_mm256_loadu_ps`
/// is a `copy_nonoverlapping`, whose checks in the test build spilled every load to the stack).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Row([f32; NR]);

/// The register tile this CPU runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Avx512,
    Avx2,
    Scalar,
}

impl Kernel {
    fn get() -> Self {
        let f = features::get();
        if cfg!(target_arch = "x86_64") && f.avx512 {
            Kernel::Avx512
        } else if cfg!(target_arch = "x86_64") && f.avx2 && f.fma {
            Kernel::Avx2
        } else {
            Kernel::Scalar
        }
    }

    /// Rows of `dw` per register tile.
    fn rows(self) -> usize {
        match self {
            Kernel::Avx512 => MR_MAX,
            Kernel::Avx2 | Kernel::Scalar => MR_AVX2,
        }
    }
}

/// `dw[i, j] += Σ_t dy[t, i0 + i] · x[t, j]` in token order, for `i < n`, `j < k`: `dy` is
/// (tokens × `ld`) row-major and its columns `i0..i0 + n` are used, `x` is (tokens × k), `dw`
/// is (n × k) row-major.
pub fn add_weight_grad(
    dw: &mut [f32],
    dy: &[f32],
    (ld, i0, n): (usize, usize, usize),
    x: &[f32],
    k: usize,
) {
    assert!(dw.len() == n * k && i0 + n <= ld, "add_weight_grad: shapes");
    if n == 0 || k == 0 || ld == 0 {
        return;
    }
    let t = dy.len() / ld;
    assert!(x.len() == t * k, "add_weight_grad: tokens differ");
    let kernel = Kernel::get();
    let rows = chunk_rows(n, kernel.rows(), rayon::current_num_threads());
    // A token block's column panels of x, packed once for every chunk of rows: packed by each
    // chunk for itself, x was read (strided, from L3) once a chunk, 8 % of an MPNet step on
    // Zen 3 (profile, docs/benchmarks.md).
    let mut panels = vec![Row([0.0; NR]); k.div_ceil(NR) * TB];
    for t0 in (0..t).step_by(TB) {
        let tb = TB.min(t - t0);
        panels
            .par_chunks_mut(TB)
            .enumerate()
            .for_each(|(p, panel)| {
                let j0 = p * NR;
                pack_cols(panel, x, k, j0, NR.min(k - j0), t0, tb);
            });
        dw.par_chunks_mut(rows * k).enumerate().for_each(|(c, dw)| {
            let dy = (dy, ld, i0 + c * rows);
            add_block(kernel, dw, dy, (&panels, k), t0, tb);
        });
    }
}

/// Continues the chains of `dw` (a chunk of rows, row-major, `k` wide) over tokens
/// `t0..t0 + tb`: the chunk's columns of `dy` (rows `ld` wide, from column `c0`) against the
/// block's column panels of x (`TB` rows each).
fn add_block(
    kernel: Kernel,
    dw: &mut [f32],
    (dy, ld, c0): (&[f32], usize, usize),
    (panels, k): (&[Row], usize),
    t0: usize,
    tb: usize,
) {
    let (mr, nr) = (kernel.rows(), dw.len() / k);
    let ip = nr.div_ceil(mr);
    let mut a = vec![0f32; ip * mr * TB];
    pack(&mut a, dy, ld, c0, nr, mr, t0, tb);
    for (j0, b) in (0..k).step_by(NR).zip(panels.chunks(TB)) {
        let (nj, b) = (NR.min(k - j0), &b[..tb]);
        for ib in 0..ip {
            let ap = &a[ib * mr * TB..][..mr * tb];
            let ni = mr.min(nr - ib * mr);
            let at = (ib * mr) * k + j0;
            if ni == mr && nj == NR && run_tile_in_place(kernel, &mut dw[at..], k, ap, b) {
                continue;
            }
            let mut tile = [Row([0.0; NR]); MR_MAX];
            for (r, row) in tile.iter_mut().enumerate().take(ni) {
                row.0[..nj].copy_from_slice(&dw[(ib * mr + r) * k + j0..][..nj]);
            }
            run_tile(kernel, &mut tile, ap, b);
            for (r, row) in tile.iter().enumerate().take(ni) {
                dw[(ib * mr + r) * k + j0..][..nj].copy_from_slice(&row.0[..nj]);
            }
        }
    }
}

/// Rows per parallel task: whole register tiles of `mr` rows, at least two tasks per thread
/// (the machine is shared, so a slow thread leaves work to steal), and at most `MC_ROWS` rows.
fn chunk_rows(n: usize, mr: usize, threads: usize) -> usize {
    let tiles = n.div_ceil(mr).div_ceil(2 * threads.max(1));
    mr * tiles.clamp(1, MC_ROWS / mr)
}

/// Packs tokens `t0..t0 + tb` of columns `c0..c0 + c` of `src` (rows `ld` wide) into panels
/// of `w` columns, token after token: panel `p` holds, per token, its `w` values (zero past `c`).
#[allow(clippy::too_many_arguments)]
fn pack(
    dst: &mut [f32],
    src: &[f32],
    ld: usize,
    c0: usize,
    c: usize,
    w: usize,
    t0: usize,
    tb: usize,
) {
    for (p, panel) in dst.chunks_mut(w * TB).take(c.div_ceil(w)).enumerate() {
        let (from, nw) = (c0 + p * w, w.min(c - p * w));
        for t in 0..tb {
            let row = &src[(t0 + t) * ld + from..][..nw];
            let out = &mut panel[t * w..(t + 1) * w];
            match (nw == w, w) {
                // Fixed-length copies: a few moves where a run-time length calls memmove.
                (true, MR_AVX2) => copy_n::<MR_AVX2>(out, row),
                (true, MR_MAX) => copy_n::<MR_MAX>(out, row),
                _ => {
                    out[..nw].copy_from_slice(row);
                    out[nw..].fill(0.0);
                }
            }
        }
    }
}

/// `dst = src`, both `N` long.
fn copy_n<const N: usize>(dst: &mut [f32], src: &[f32]) {
    let dst: &mut [f32; N] = dst.try_into().expect("N values");
    *dst = src.try_into().expect("N values");
}

/// Packs tokens `t0..t0 + tb` of columns `j0..j0 + nj` of `x` (rows `k` wide) into one column
/// panel, a row per token (zero past `nj`).
fn pack_cols(dst: &mut [Row], x: &[f32], k: usize, j0: usize, nj: usize, t0: usize, tb: usize) {
    for (t, out) in dst[..tb].iter_mut().enumerate() {
        let from = &x[(t0 + t) * k + j0..];
        if nj == NR {
            // A copy of fixed length: a few vector moves where `copy_from_slice` of a run-time
            // length calls memmove, a fifth of the tiles' time at 64 bytes a call.
            out.0 = from[..NR].try_into().expect("NR values");
        } else {
            out.0[..nj].copy_from_slice(&from[..nj]);
            out.0[nj..].fill(0.0);
        }
    }
}

/// Continues the chains of the tile's first `kernel.rows()` rows over `tb` tokens of the panels
/// `a` (that many values per token) and `b` (a row per token).
fn run_tile(kernel: Kernel, tile: &mut [Row; MR_MAX], a: &[f32], b: &[Row]) {
    let (mr, tb) = (kernel.rows(), b.len());
    assert!(a.len() >= mr * tb, "wgrad: short panels");
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: the CPU has the tile's instructions (`Kernel::get`); the panels hold tb
        // tokens (asserted above).
        Kernel::Avx512 => return unsafe { avx512::tile(tile, a, b) },
        Kernel::Avx2 => return unsafe { avx2::tile(tile, a, b) },
        Kernel::Scalar => {}
    }
    scalar_tile(&mut tile[..mr], a, b);
}

/// `run_tile` on a full tile read and written where it lies in `dw` (rows `ld` apart): no
/// copies through a `Row` tile, which cost a memset and a dozen memmove calls a tile. False,
/// doing nothing, where the CPU has no register tile.
fn run_tile_in_place(kernel: Kernel, dw: &mut [f32], ld: usize, a: &[f32], b: &[Row]) -> bool {
    let (mr, tb) = (kernel.rows(), b.len());
    assert!(
        a.len() >= mr * tb && dw.len() >= (mr - 1) * ld + NR,
        "wgrad: short tile"
    );
    #[cfg(target_arch = "x86_64")]
    match kernel {
        // SAFETY: as in `run_tile`; the assert keeps the tile's rows inside `dw`.
        Kernel::Avx512 => unsafe { avx512::tile_at(dw.as_mut_ptr(), ld, a, b) },
        Kernel::Avx2 => unsafe { avx2::tile_at(dw.as_mut_ptr(), ld, a, b) },
        Kernel::Scalar => return false,
    }
    cfg!(target_arch = "x86_64")
}

/// The register tile's chains, one fused multiply-add per token, as `f32::mul_add` rounds.
fn scalar_tile(tile: &mut [Row], a: &[f32], b: &[Row]) {
    for (a, b) in a.chunks_exact(tile.len()).zip(b) {
        for (row, &ai) in tile.iter_mut().zip(a) {
            for (acc, &bj) in row.0.iter_mut().zip(&b.0) {
                *acc = ai.mul_add(bj, *acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{Row, MR_AVX2 as MR, MR_MAX, NR};

    /// The tile's rows held in a `Row` tile.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(tile: &mut [Row; MR_MAX], a: &[f32], b: &[Row]) {
        tile_at(tile.as_mut_ptr().cast(), NR, a, b);
    }

    /// The 6×16 tile in twelve registers, one broadcast of `dy` and two loads of `x` per row;
    /// its rows are `ld` floats apart from `c` on.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_at(c: *mut f32, ld: usize, a: &[f32], b: &[Row]) {
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        for (r, acc) in acc.iter_mut().enumerate() {
            *acc = [
                _mm256_loadu_ps(c.add(r * ld)),
                _mm256_loadu_ps(c.add(r * ld + 8)),
            ];
        }
        let mut ap = a.as_ptr();
        for row in b {
            let (b0, b1) = (
                _mm256_load_ps(row.0.as_ptr()),
                _mm256_load_ps(row.0.as_ptr().add(8)),
            );
            for (r, acc) in acc.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*ap.add(r));
                acc[0] = _mm256_fmadd_ps(ai, b0, acc[0]);
                acc[1] = _mm256_fmadd_ps(ai, b1, acc[1]);
            }
            ap = ap.add(MR);
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(c.add(r * ld), acc[0]);
            _mm256_storeu_ps(c.add(r * ld + 8), acc[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Row, MR_MAX, NR};

    /// The tile's rows held in a `Row` tile.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile(tile: &mut [Row; MR_MAX], a: &[f32], b: &[Row]) {
        tile_at(tile.as_mut_ptr().cast(), NR, a, b);
    }

    /// The 24×16 tile in 24 registers, one load of `x` and one broadcast of `dy` per row: on
    /// a CPU with full-width AVX-512 units twice the AVX2 tile's work per instruction. Its
    /// rows are `ld` floats apart from `c` on.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile_at(c: *mut f32, ld: usize, a: &[f32], b: &[Row]) {
        let mut acc = [_mm512_setzero_ps(); MR_MAX];
        for (r, acc) in acc.iter_mut().enumerate() {
            *acc = _mm512_loadu_ps(c.add(r * ld));
        }
        let mut ap = a.as_ptr();
        for row in b {
            let bv = _mm512_load_ps(row.0.as_ptr());
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(_mm512_set1_ps(*ap.add(r)), bv, *acc);
            }
            ap = ap.add(MR_MAX);
        }
        for (r, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ld), *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    use super::*;

    fn values(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
    }

    /// The chains as plainly as they can be written.
    fn reference(
        dw: &mut [f32],
        dy: &[f32],
        (ld, i0, n): (usize, usize, usize),
        x: &[f32],
        k: usize,
    ) {
        for t in 0..dy.len() / ld {
            for i in 0..n {
                for j in 0..k {
                    dw[i * k + j] = dy[t * ld + i0 + i].mul_add(x[t * k + j], dw[i * k + j]);
                }
            }
        }
    }

    /// Ragged shapes (tiles and token blocks cut short), a column range of `dy`, and a
    /// nonzero start: the bits of the plain chains.
    #[test]
    fn same_bits_as_the_plain_chains() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (t, ld, i0, n, k) in [
            (1, 7, 0, 7, 5),
            (300, 40, 13, 20, 37),
            (517, 96, 32, 32, 48),
            (600, 50, 0, 50, 70),
        ] {
            let (dy, x) = (values(&mut rng, t * ld), values(&mut rng, t * k));
            let start = values(&mut rng, n * k);
            let (mut ours, mut plain) = (start.clone(), start);
            add_weight_grad(&mut ours, &dy, (ld, i0, n), &x, k);
            reference(&mut plain, &dy, (ld, i0, n), &x, k);
            assert!(ours == plain, "t={t} n={n} k={k}");
        }
    }

    /// The sum over all tokens equals the sums over any cut of them, added in turn: what makes
    /// micro-batching exact.
    #[test]
    fn a_cut_continues_the_same_chains() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let (t, n, k) = (700, 30, 50);
        let (dy, x) = (values(&mut rng, t * n), values(&mut rng, t * k));
        let mut whole = vec![0f32; n * k];
        add_weight_grad(&mut whole, &dy, (n, 0, n), &x, k);
        for cut in [1, 5, 255, 256, 257, 699] {
            let mut parts = vec![0f32; n * k];
            add_weight_grad(&mut parts, &dy[..cut * n], (n, 0, n), &x[..cut * k], k);
            add_weight_grad(&mut parts, &dy[cut * n..], (n, 0, n), &x[cut * k..], k);
            assert!(parts == whole, "cut at {cut}");
        }
        // And the sums are sums: the gemm crate agrees to rounding.
        let mut theirs = vec![0f32; n * k];
        super::super::gemm_crate::gemm_crate(
            &mut theirs,
            (n, k, t),
            (&dy, (1, n)),
            (&x, (k, 1)),
            false,
        );
        let err = whole
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-3, "differs from the gemm crate by {err}");
    }

    /// GFLOP/s of these chains and of the gemm crate on the weight gradients of MiniLM and
    /// MPNet (a timing, not a test: `cargo test --lib wgrad_speed -- --ignored --nocapture`).
    #[test]
    #[ignore = "timing; run with --ignored --nocapture on a quiet machine"]
    fn wgrad_speed() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for (t, d_in, d_out) in [
            (4096, 384, 384),
            (4096, 384, 1152),
            (4096, 384, 1536),
            (4096, 1536, 384),
            (8192, 384, 1536),
            (4096, 768, 3072),
            (8192, 3072, 768),
        ] {
            let (x, g) = (values(&mut rng, t * d_in), values(&mut rng, t * d_out));
            let flops = 2.0 * (t * d_in * d_out) as f64;
            let mut dw = vec![0f32; d_out * d_in];
            let ours = crate::testing::gflops(flops, &mut || {
                add_weight_grad(&mut dw, &g, (d_out, 0, d_out), &x, d_in)
            });
            let theirs = crate::testing::gflops(flops, &mut || {
                super::super::gemm_crate::gemm_crate(
                    &mut dw,
                    (d_out, d_in, t),
                    (&g, (1, d_out)),
                    (&x, (d_in, 1)),
                    true,
                )
            });
            println!(
                "t={t} {d_out}x{d_in}: chains {ours:.1} GFLOP/s, gemm crate {theirs:.1} GFLOP/s ({:.2}x)",
                ours / theirs
            );
        }
    }
}

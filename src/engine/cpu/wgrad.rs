//! The weight gradient of a linear layer, `dw += dyᵀ x` summed over tokens, in one fixed order:
//! each element of `dw` is a chain of fused multiply-adds over the tokens in turn, starting
//! from the value `dw` holds. A step cut into micro-batches then continues the same chains
//! where the previous micro-batch left them, so its sums are the uncut step's, bit for bit
//! (the gemm crate adds per-block partial sums into `dw`, in an order that depends on the call).
//!
//! Every path computes `acc = fma(dy[t,i], x[t,j], acc)` (one rounding per token), so the
//! AVX2 tiles and the scalar fallback give the same bits. Tokens go in blocks sized for the
//! caches, each block's `dy` and `x` packed into the panels the register tile reads.

use rayon::prelude::*;

use super::features;

/// Rows of `dw` (output features) per register tile.
const MR: usize = 6;
/// Columns of `dw` (input features) per register tile: two 8-lane registers.
const NR: usize = 16;
/// Tokens per packed block: a tile's panels (`(MR + NR)·TB` floats, 22 KiB) stay in L1/L2.
const TB: usize = 256;

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
    let f = features::get();
    let simd = cfg!(target_arch = "x86_64") && f.avx2 && f.fma;
    let (ip, jp) = (n.div_ceil(MR), k.div_ceil(NR));
    let mut a = vec![0f32; ip * MR * TB];
    let mut b = vec![0f32; jp * NR * TB];
    for t0 in (0..t).step_by(TB) {
        let tb = TB.min(t - t0);
        pack(&mut a, dy, ld, i0, n, MR, t0, tb);
        pack(&mut b, x, k, 0, k, NR, t0, tb);
        let (a, b) = (&a, &b);
        // Column panels in parallel: each writes its own columns of every row of `dw`.
        let cols = DwCols(dw.as_mut_ptr());
        (0..jp).into_par_iter().for_each(|jb| {
            let cols = &cols;
            let bp = &b[jb * NR * TB..][..NR * tb];
            let nj = NR.min(k - jb * NR);
            for ib in 0..ip {
                let ap = &a[ib * MR * TB..][..MR * tb];
                let ni = MR.min(n - ib * MR);
                let mut tile = [[0f32; NR]; MR];
                for (r, row) in tile.iter_mut().enumerate().take(ni) {
                    // SAFETY: panel `jb` owns columns jb·NR..+nj of every row; no other task
                    // touches them.
                    let src = unsafe { cols.row(ib * MR + r, k, jb * NR, nj) };
                    row[..nj].copy_from_slice(src);
                }
                run_tile(simd, &mut tile, ap, bp, tb);
                for (r, row) in tile.iter().enumerate().take(ni) {
                    // SAFETY: as above.
                    let dst = unsafe { cols.row(ib * MR + r, k, jb * NR, nj) };
                    dst.copy_from_slice(&row[..nj]);
                }
            }
        });
    }
}

/// `dw`'s storage shared by the column-panel tasks, which write disjoint columns.
struct DwCols(*mut f32);

// SAFETY: the tasks write disjoint elements (see `add_weight_grad`).
unsafe impl Sync for DwCols {}

impl DwCols {
    /// Columns `j0..j0 + nj` of row `i` of a row-major matrix `k` wide.
    ///
    /// # Safety
    /// The caller is the only one touching those elements while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, i: usize, k: usize, j0: usize, nj: usize) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(i * k + j0), nj)
    }
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
    dst.par_chunks_mut(w * TB)
        .enumerate()
        .for_each(|(p, panel)| {
            let (from, nw) = (c0 + p * w, w.min(c - p * w));
            for t in 0..tb {
                let row = &src[(t0 + t) * ld + from..][..nw];
                let out = &mut panel[t * w..(t + 1) * w];
                out[..nw].copy_from_slice(row);
                out[nw..].fill(0.0);
            }
        });
}

/// Continues the tile's chains over `tb` tokens of the panels `a` (MR values per token) and
/// `b` (NR values per token), with AVX2 and FMA where `simd`.
fn run_tile(simd: bool, tile: &mut [[f32; NR]; MR], a: &[f32], b: &[f32], tb: usize) {
    assert!(
        a.len() >= MR * tb && b.len() >= NR * tb,
        "wgrad: short panels"
    );
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: AVX2 and FMA are present (the caller checked); the panels hold tb tokens
        // (asserted above).
        return unsafe { avx2::tile(tile, a, b, tb) };
    }
    let _ = simd;
    scalar_tile(tile, a, b, tb);
}

/// The register tile's chains, one fused multiply-add per token, as `f32::mul_add` rounds.
fn scalar_tile(tile: &mut [[f32; NR]; MR], a: &[f32], b: &[f32], tb: usize) {
    for t in 0..tb {
        let (a, b) = (&a[t * MR..(t + 1) * MR], &b[t * NR..(t + 1) * NR]);
        for (row, &ai) in tile.iter_mut().zip(a) {
            for (acc, &bj) in row.iter_mut().zip(b) {
                *acc = ai.mul_add(bj, *acc);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// The 6×16 tile in twelve registers, one broadcast of `dy` and two loads of `x` per row.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(tile: &mut [[f32; NR]; MR], a: &[f32], b: &[f32], tb: usize) {
        let mut c = [[_mm256_setzero_ps(); 2]; MR];
        for (r, row) in tile.iter().enumerate() {
            c[r][0] = _mm256_loadu_ps(row.as_ptr());
            c[r][1] = _mm256_loadu_ps(row.as_ptr().add(8));
        }
        let (mut ap, mut bp) = (a.as_ptr(), b.as_ptr());
        for _ in 0..tb {
            let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
            for (r, cr) in c.iter_mut().enumerate() {
                let ai = _mm256_broadcast_ss(&*ap.add(r));
                cr[0] = _mm256_fmadd_ps(ai, b0, cr[0]);
                cr[1] = _mm256_fmadd_ps(ai, b1, cr[1]);
            }
            ap = ap.add(MR);
            bp = bp.add(NR);
        }
        for (r, row) in tile.iter_mut().enumerate() {
            _mm256_storeu_ps(row.as_mut_ptr(), c[r][0]);
            _mm256_storeu_ps(row.as_mut_ptr().add(8), c[r][1]);
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
    #[ignore]
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

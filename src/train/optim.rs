//! AdamW (decoupled weight decay, as `torch.optim.AdamW`) over the trainable `Var`s, with f32
//! state, plus global gradient-norm clipping. Backward is kept apart: `step` takes the
//! gradients of one optimizer step, already accumulated over its micro-batches.
//!
//! A gradient that comes as summed rows (the word table's on the CPU, `summed_rows.rs`) is
//! updated with moments for the rows ever touched only (`row_moments.rs`): the same weights,
//! bit for bit, without the dense table's two moments.

use std::collections::BTreeMap;

use candle_core::{CpuStorage, DType, Storage, Tensor, Var};
use rayon::prelude::*;

use crate::engine::launches;
use crate::error::Result;
use crate::model::weights::decays;
use crate::train::row_moments::RowMoments;
use crate::train::summed_rows::SummedRows;

/// Gradients of one optimizer step, by tensor name, f32.
pub type Grads = BTreeMap<String, Grad>;

/// One tensor's gradient of a step: dense, or (the word table's on the CPU) the rows the step
/// touched, summed.
#[derive(Debug, Clone)]
pub enum Grad {
    Dense(Tensor),
    Rows(SummedRows),
}

impl From<Tensor> for Grad {
    fn from(t: Tensor) -> Self {
        Grad::Dense(t)
    }
}

impl Grad {
    /// The dense gradient on `device` (summed rows are written into a zeroed table).
    pub fn dense(&self, device: &candle_core::Device) -> Result<Tensor> {
        match self {
            Grad::Dense(t) => Ok(t.clone()),
            Grad::Rows(r) => r.to_dense(device),
        }
    }
}

/// AdamW's moments of one tensor: dense (m, v), or those of the rows ever touched.
#[derive(Debug, Clone)]
enum Moments {
    Dense(Tensor, Tensor),
    Rows(RowMoments),
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Number of updates applied so far (bias correction).
    pub t: u64,
    /// Update CPU tensors in place (the default); the tensor-op path serves other devices.
    pub in_place: bool,
    /// First and second moments by tensor name.
    state: BTreeMap<String, Moments>,
}

impl AdamW {
    pub fn new(weight_decay: f64) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            in_place: true,
            state: BTreeMap::new(),
        }
    }

    /// Applies one update to every var that has a gradient, each gradient multiplied by
    /// `grad_scale` first (the clipping coefficient, [`clip_coefficient`]: one pass over the
    /// gradients instead of two). Resumable: if it fails part way (an OOM), calling it again
    /// with the same `t` skips the tensors already updated, so the update is never applied
    /// twice. `done` records which ones are.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &Grads,
        grad_scale: f32,
        lr: f64,
        done: &mut std::collections::BTreeSet<String>,
        mut before_each: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let t = self.t + 1;
        let bc1 = 1.0 - self.beta1.powi(t as i32);
        let bc2 = 1.0 - self.beta2.powi(t as i32);
        // Every tensor's update: one `cuda` kernel's work (`bench launches` counts it so).
        launches::planned_kernel(|| {
            self.update_all(
                vars,
                grads,
                grad_scale,
                lr,
                (bc1, bc2),
                done,
                &mut before_each,
            )
        })?;
        self.t = t;
        done.clear();
        Ok(())
    }

    /// [`AdamW::step`]'s updates, with the bias corrections `bc` of this step.
    #[allow(clippy::too_many_arguments)]
    fn update_all(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &Grads,
        grad_scale: f32,
        lr: f64,
        (bc1, bc2): (f64, f64),
        done: &mut std::collections::BTreeSet<String>,
        before_each: &mut impl FnMut() -> Result<()>,
    ) -> Result<()> {
        #[cfg(feature = "cuda")]
        if vars.values().next().is_some_and(|v| v.device().is_cuda()) {
            before_each()?;
            return self.update_on_cuda(vars, grads, grad_scale, lr, (bc1, bc2), done);
        }
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            if done.contains(name) {
                continue;
            }
            before_each()?;
            let wd = if decays(name) { self.weight_decay } else { 0.0 };
            let update = Update {
                grad_scale,
                beta1: self.beta1 as f32,
                beta2: self.beta2 as f32,
                keep: (1.0 - lr * wd) as f32,
                step: (lr / bc1) as f32,
                inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
                eps: self.eps as f32,
            };
            if let (Grad::Rows(rows), true) = (g, self.in_place && row_table(var)) {
                self.update_rows(name, var, rows, &update)?;
                done.insert(name.clone());
                continue;
            }
            let g = g.dense(var.device())?.to_dtype(DType::F32)?;
            if self.in_place && g.device().is_cpu() {
                // In place, one pass, no temporaries: the optimizer phase would otherwise
                // allocate several copies of the largest tensor (the word embeddings).
                let (m, v) = self.dense_moments(name, &g)?;
                update.apply(var.as_tensor(), &m, &v, &g.contiguous()?)?;
                self.state.insert(name.clone(), Moments::Dense(m, v));
                done.insert(name.clone());
                continue;
            }
            let (m, v) = self.dense_moments(name, &g)?;
            let g = (g * grad_scale as f64)?;
            let m = ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
            let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let w = (var.as_tensor() * (1.0 - lr * wd))?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
            let w = (w - ((&m / denom)? * (lr / bc1))?)?;
            // All three computed before any is stored: a failure above changes nothing.
            var.set(&w)?;
            self.state.insert(name.clone(), Moments::Dense(m, v));
            done.insert(name.clone());
        }
        Ok(())
    }

    /// The in-place update of a table whose gradient is `rows`, with moments for the rows
    /// ever touched (dense moments, from a checkpoint of an earlier version, become those).
    fn update_rows(
        &mut self,
        name: &str,
        var: &Var,
        rows: &SummedRows,
        update: &Update,
    ) -> Result<()> {
        let width = rows.table_dims().1;
        let mut state = match self.state.remove(name) {
            Some(Moments::Rows(r)) => r,
            Some(Moments::Dense(m, v)) => RowMoments::from_dense(
                &m.flatten_all()?.to_vec1::<f32>()?,
                &v.flatten_all()?.to_vec1::<f32>()?,
                width,
            ),
            None => RowMoments::new(width),
        };
        let mut outcome = Ok(());
        let applied = with_slice(var.as_tensor(), |w| {
            outcome = state.update(w, rows, update.keep, &|w, m, v, g| update.chunk(w, m, v, g));
            Ok(())
        });
        self.state.insert(name.to_string(), Moments::Rows(state));
        applied?;
        outcome
    }

    /// `name`'s dense (m, v) for a gradient like `g`: zeros at first (row moments, after a
    /// switch of path, written out dense).
    fn dense_moments(&self, name: &str, g: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(match self.state.get(name) {
            Some(Moments::Dense(m, v)) => (m.clone(), v.clone()),
            Some(Moments::Rows(r)) => {
                let rows = g.dim(0)?;
                let (m, v) = r.to_dense(rows);
                let dense = |x: Vec<f32>| -> Result<Tensor> {
                    Ok(
                        Tensor::from_vec(x, g.dims().to_vec(), &candle_core::Device::Cpu)?
                            .to_device(g.device())?,
                    )
                };
                (dense(m)?, dense(v)?)
            }
            None => (g.zeros_like()?, g.zeros_like()?),
        })
    }

    /// [`AdamW::update_all`] on a CUDA device: every tensor in one launch of st-tune's kernel
    /// (`engine::cuda::adamw`), the maths of the in-place CPU update. All or nothing, so an
    /// OOM leaves nothing updated.
    #[cfg(feature = "cuda")]
    fn update_on_cuda(
        &mut self,
        vars: &BTreeMap<String, Var>,
        grads: &Grads,
        grad_scale: f32,
        lr: f64,
        (bc1, bc2): (f64, f64),
        done: &mut std::collections::BTreeSet<String>,
    ) -> Result<()> {
        use crate::engine::cuda::{adamw, AdamwStep, AdamwTensor};
        let mut parts = Vec::new();
        for (name, var) in vars {
            let Some(g) = grads.get(name) else { continue };
            if done.contains(name) {
                continue;
            }
            let g = g.dense(var.device())?.to_dtype(DType::F32)?.contiguous()?;
            let (m, v) = self.dense_moments(name, &g)?;
            let wd = if decays(name) { self.weight_decay } else { 0.0 };
            parts.push((
                name,
                var.as_tensor().clone(),
                g,
                m,
                v,
                (1.0 - lr * wd) as f32,
            ));
        }
        let tensors: Vec<AdamwTensor> = parts
            .iter()
            .map(|(_, w, g, m, v, keep)| AdamwTensor {
                w,
                g,
                m,
                v,
                keep: *keep,
            })
            .collect();
        let k = AdamwStep {
            grad_scale,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            step: (lr / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            eps: self.eps as f32,
        };
        adamw(&tensors, &k)?;
        drop(tensors);
        for (name, _, _, m, v, _) in parts {
            self.state.insert(name.clone(), Moments::Dense(m, v));
            done.insert(name.clone());
        }
        Ok(())
    }

    /// The dense first and second moments by tensor name (what a checkpoint saves).
    pub fn moments(&self) -> impl Iterator<Item = (&String, &Tensor, &Tensor)> {
        self.state.iter().filter_map(|(n, s)| match s {
            Moments::Dense(m, v) => Some((n, m, v)),
            Moments::Rows(_) => None,
        })
    }

    /// The moments kept for touched rows only, by tensor name (a checkpoint saves them too).
    pub fn row_moments(&self) -> impl Iterator<Item = (&String, &RowMoments)> {
        self.state.iter().filter_map(|(n, s)| match s {
            Moments::Rows(r) => Some((n, r)),
            Moments::Dense(..) => None,
        })
    }

    /// Continues from a checkpoint: `t` updates done, with these dense moments and these
    /// moments of touched rows.
    pub fn restore(
        &mut self,
        t: u64,
        moments: BTreeMap<String, (Tensor, Tensor)>,
        rows: BTreeMap<String, RowMoments>,
    ) {
        self.t = t;
        self.state = moments
            .into_iter()
            .map(|(n, (m, v))| (n, Moments::Dense(m, v)))
            .chain(rows.into_iter().map(|(n, r)| (n, Moments::Rows(r))))
            .collect();
    }
}

/// Whether `var` is a table the row update can step in place: contiguous f32 on the CPU.
fn row_table(var: &Var) -> bool {
    let t = var.as_tensor();
    t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 2 && t.is_contiguous()
}

pub(crate) use crate::engine::cpu::storage::with_slice;

/// Elements per parallel task of the update (each element is independent, so the result does
/// not depend on how the tasks are scheduled).
const CHUNK: usize = 1 << 14;

/// One AdamW update of a tensor, torch.optim.AdamW's maths in f32:
/// g ← grad_scale·g, m ← β₁·m + (1−β₁)·g, v ← β₂·v + (1−β₂)·g²,
/// w ← keep·w − step · m / (√v · inv_sqrt_bc2 + eps).
struct Update {
    grad_scale: f32,
    beta1: f32,
    beta2: f32,
    keep: f32,
    step: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
}

impl Update {
    /// Updates `w`, `m` and `v` in place from the contiguous gradient `g`, in one pass over
    /// the four, on every rayon thread. `m` and `v` are separate allocations (zeros or loaded).
    fn apply(&self, w: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor) -> candle_core::Result<()> {
        let (g, gl) = g.storage_and_layout();
        let g = match (&*g, gl.contiguous_offsets()) {
            (Storage::Cpu(CpuStorage::F32(g)), Some((a, b))) => &g[a..b],
            _ => candle_core::bail!("AdamW: expected a contiguous f32 CPU gradient"),
        };
        with_slice(m, |m| {
            with_slice(v, |v| {
                with_slice(w, |w| {
                    if w.len() != g.len() || m.len() != g.len() || v.len() != g.len() {
                        candle_core::bail!("AdamW: state and gradient sizes differ");
                    }
                    w.par_chunks_mut(CHUNK)
                        .zip(m.par_chunks_mut(CHUNK))
                        .zip(v.par_chunks_mut(CHUNK))
                        .zip(g.par_chunks(CHUNK))
                        .for_each(|(((w, m), v), g)| self.chunk(w, m, v, g));
                    Ok(())
                })
            })
        })
    }

    /// One chunk, with the widest vectors the CPU has (detected at run time). Every path does
    /// the same IEEE operations in the same order (no fused multiply-adds), so the results are
    /// bit-identical; the scalar build leaves the square root and the division 4 lanes wide,
    /// which made the update compute-bound.
    fn chunk(&self, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            let cpu = crate::engine::cpu::features::get();
            if cpu.avx512 {
                // SAFETY: the CPU has AVX-512F (checked).
                return unsafe { self.chunk_avx512(w, m, v, g) };
            }
            if cpu.avx2 {
                // SAFETY: the CPU has AVX2 (checked).
                return unsafe { self.chunk_avx2(w, m, v, g) };
            }
        }
        self.chunk_lanes(w, m, v, g)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn chunk_avx512(&self, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        self.chunk_lanes(w, m, v, g)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk_avx2(&self, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        self.chunk_lanes(w, m, v, g)
    }

    #[inline(always)]
    fn chunk_lanes(&self, w: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        let (b1, c1) = (self.beta1, 1.0 - self.beta1);
        let (b2, c2) = (self.beta2, 1.0 - self.beta2);
        for (((w, m), v), g) in w.iter_mut().zip(m).zip(v).zip(g) {
            let g = self.grad_scale * g;
            *m = b1 * *m + c1 * g;
            *v = b2 * *v + c2 * g * g;
            *w = self.keep * *w - self.step * *m / (v.sqrt() * self.inv_sqrt_bc2 + self.eps);
        }
    }
}

/// Σ x² in f64, over 8 running sums (vectorisable; one running sum would wait on each add),
/// then the tail: a fixed order for a given length.
fn sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let mut lanes = x.chunks_exact(8);
    for v in &mut lanes {
        for (a, &x) in acc.iter_mut().zip(v) {
            *a += x as f64 * x as f64;
        }
    }
    let tail: f64 = lanes.remainder().iter().map(|&x| x as f64 * x as f64).sum();
    acc.iter().sum::<f64>() + tail
}

/// The global L2 norm of `grads`, as `torch.nn.utils.clip_grad_norm_` computes it: read in
/// place and on every core for contiguous f32 CPU gradients (no squared copy), in chunks of a
/// fixed size summed in a fixed order, so the result does not depend on the scheduling.
pub fn grad_norm(grads: &Grads) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        let dense;
        let g = match g {
            // In the dense table's order, so the norm is the dense one bit for bit.
            Grad::Rows(r) if r.table_dims().1 % 8 == 0 => {
                sq += r.sum_squares_in_dense_order(CHUNK, sum_squares);
                continue;
            }
            Grad::Rows(r) => {
                dense = r.to_dense(&candle_core::Device::Cpu)?;
                &dense
            }
            Grad::Dense(t) => t,
        };
        let (s, l) = g.storage_and_layout();
        sq += match &*s {
            Storage::Cpu(s @ CpuStorage::F32(_)) if l.is_contiguous() => {
                let g = crate::engine::cpu::storage::f32_params(s, l, "grad norm")?;
                let parts: Vec<f64> = g.par_chunks(CHUNK).map(sum_squares).collect();
                parts.iter().sum()
            }
            _ => sum_squares_by_ops(g)?,
        };
    }
    Ok(sq.sqrt())
}

/// Σ g² of one gradient as tensor ops: what [`grad_norm`] does on devices other than the CPU.
pub fn sum_squares_by_ops(g: &Tensor) -> Result<f64> {
    Ok(g.to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?)
}

/// What `torch.nn.utils.clip_grad_norm_` multiplies the gradients by so that their global
/// norm `norm` is at most `max_norm` (no clipping when `max_norm` ≤ 0). Pass it to
/// [`AdamW::step`].
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0) as f32
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn first_adamw_step_moves_each_weight_by_lr_against_its_gradient() {
        let var = Var::from_vec(vec![1.0f32, -2.0], 2, &Device::Cpu).unwrap();
        let vars = BTreeMap::from([("w.weight".to_string(), var.clone())]);
        let grads = Grads::from([(
            "w.weight".to_string(),
            Tensor::new(&[0.5f32, -3.0], &Device::Cpu).unwrap().into(),
        )]);
        let mut opt = AdamW::new(0.0);
        opt.step(&vars, &grads, 1.0, 0.1, &mut Default::default(), || Ok(()))
            .unwrap();
        let w = var.as_tensor().to_vec1::<f32>().unwrap();
        // After bias correction the first update is lr * g / (|g| + eps) = ±lr.
        assert!(
            (w[0] - 0.9).abs() < 1e-6 && (w[1] + 1.9).abs() < 1e-6,
            "{w:?}"
        );
    }

    #[test]
    fn the_in_place_update_matches_the_tensor_op_update_over_several_steps() {
        // Several parallel chunks and a short last one.
        let n = 3 * CHUNK + 5;
        let wave = |k: f32| (0..n).map(move |i| (i as f32 * k).sin());
        let run = |in_place: bool| {
            let w0: Vec<f32> = wave(0.37).map(|x| 2.0 * x).collect();
            let var = Var::from_vec(w0, n, &Device::Cpu).unwrap();
            let vars = BTreeMap::from([("l.weight".to_string(), var.clone())]);
            let mut opt = AdamW::new(0.01);
            opt.in_place = in_place;
            for step in 0..5 {
                let g: Vec<f32> = wave(0.11 + step as f32).map(|x| 0.3 * x).collect();
                let g = Tensor::from_vec(g, n, &Device::Cpu).unwrap();
                let grads = Grads::from([("l.weight".to_string(), g.into())]);
                opt.step(&vars, &grads, 0.5, 1e-2, &mut Default::default(), || Ok(()))
                    .unwrap();
            }
            var.as_tensor().to_vec1::<f32>().unwrap()
        };
        let (a, b) = (run(true), run(false));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-6, "max difference {worst}");
    }

    #[test]
    fn the_norm_is_read_in_place_and_the_coefficient_clips_to_the_max_norm() {
        // Contiguous f32 (read in place, several chunks) and a strided view (tensor ops).
        let n = 2 * CHUNK + 3;
        let big = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
        let m = Tensor::new(&[[3.0f32, 1.0], [4.0, 1.0]], &Device::Cpu).unwrap();
        let grads = Grads::from([
            ("a".into(), big.into()),
            ("b".into(), m.t().unwrap().get(0).unwrap().into()),
        ]);
        let norm = grad_norm(&grads).unwrap();
        assert!((norm - (n as f64 + 25.0).sqrt()).abs() < 1e-9, "{norm}");
        let coef = clip_coefficient(norm, 1.0);
        assert!((coef as f64 - 1.0 / (norm + 1e-6)).abs() < 1e-7);
        assert_eq!(clip_coefficient(0.5, 1.0), 1.0);
        assert_eq!(clip_coefficient(norm, 0.0), 1.0);
    }

    /// One run of AdamW on a (rows, width) table over `steps`, each a list of (token id, its
    /// gradient row seed): the gradient as summed rows, or the same sums dense. Returns the
    /// table's bits and each step's gradient norm.
    fn table_run(dense: bool, wd: f64, steps: &[Vec<u32>]) -> (Vec<u32>, Vec<u64>) {
        let (rows, width) = (2100, 16); // 33,600 values: the norm spans three chunks
        let w0: Vec<f32> = (0..rows * width).map(|i| (i as f32 * 0.37).sin()).collect();
        let var = Var::from_vec(w0, (rows, width), &Device::Cpu).unwrap();
        let name = "embeddings.word_embeddings.weight".to_string();
        let vars = BTreeMap::from([(name.clone(), var.clone())]);
        let mut opt = AdamW::new(wd);
        let mut norms = Vec::new();
        for (step, ids) in steps.iter().enumerate() {
            let g: Vec<f32> = (0..ids.len() * width)
                .map(|i| ((i + 7 * step) as f32 * 0.11).cos() * 3.0)
                .collect();
            let mut summed = SummedRows::new(rows, width);
            summed.add_tokens(ids, &g).unwrap();
            let grad = match dense {
                true => Grad::Dense(summed.to_dense(&Device::Cpu).unwrap()),
                false => Grad::Rows(summed),
            };
            let grads = Grads::from([(name.clone(), grad)]);
            let norm = grad_norm(&grads).unwrap();
            norms.push(norm.to_bits());
            // Clipping at 1 scales every step's gradient (the loss scale's division is
            // tested in precision.rs).
            let clip = clip_coefficient(norm, 1.0);
            opt.step(
                &vars,
                &grads,
                clip,
                1e-2,
                &mut Default::default(),
                || Ok(()),
            )
            .unwrap();
        }
        let w = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (w.iter().map(|x| x.to_bits()).collect(), norms)
    }

    #[test]
    fn moments_of_touched_rows_give_the_dense_update_bit_for_bit() {
        // Rows first touched at different steps, repeated within a step, in both halves of
        // the table; a step that touches none of the earlier rows.
        let steps = vec![
            vec![5, 2099, 5, 1030],
            vec![1030, 7, 2000],
            vec![11, 12],
            vec![5, 1024, 1023, 5, 5],
        ];
        for wd in [0.0, 0.01] {
            let (rows, rows_norms) = table_run(false, wd, &steps);
            let (dense, dense_norms) = table_run(true, wd, &steps);
            assert_eq!(rows_norms, dense_norms, "weight decay {wd}: gradient norms");
            let differ = rows.iter().zip(&dense).filter(|(a, b)| a != b).count();
            assert_eq!(differ, 0, "weight decay {wd}: {differ} weights differ");
        }
        // The run moved the weights (a comparison of two unchanged tables proves nothing).
        let (moved, _) = table_run(false, 0.01, &steps);
        let (still, _) = table_run(false, 0.01, &[]);
        assert_ne!(moved, still);
    }

    #[test]
    fn dense_moments_of_an_earlier_checkpoint_go_on_as_row_moments_exactly() {
        // Two steps with a dense gradient (what an earlier version kept), then rows: the
        // same as rows throughout.
        let (rows, width) = (40, 8);
        let run = |switch: bool| {
            let var =
                Var::from_vec(vec![0.5f32; rows * width], (rows, width), &Device::Cpu).unwrap();
            let vars = BTreeMap::from([("t.weight".to_string(), var.clone())]);
            let mut opt = AdamW::new(0.01);
            for step in 0..4u32 {
                let mut summed = SummedRows::new(rows, width);
                let g: Vec<f32> = (0..2 * width)
                    .map(|i| (i as f32 + step as f32).sin())
                    .collect();
                summed.add_tokens(&[step * 3, 39 - step], &g).unwrap();
                let grad = match switch && step < 2 {
                    true => Grad::Dense(summed.to_dense(&Device::Cpu).unwrap()),
                    false => Grad::Rows(summed),
                };
                let grads = Grads::from([("t.weight".to_string(), grad)]);
                opt.step(&vars, &grads, 1.0, 1e-2, &mut Default::default(), || Ok(()))
                    .unwrap();
            }
            assert_eq!(opt.row_moments().count(), 1);
            var.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (run(true), run(false));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}

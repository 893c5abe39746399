//! Measuring one optimizer step: peak memory (the counting allocator on CPU) and time, on
//! synthetic rows of an exact length, so `st-tune bench memory` and the planner's calibration
//! see a step of known shape; and the tensor ops a step issues (about its kernel launches on a
//! GPU). Two steps run: the first allocates the optimizer state, the second is measured.

use std::time::Instant;

use serde::Serialize;

use crate::config::TrainSection;
use candle_core::Tensor;

use crate::data::tokenized::TokenizedData;
use crate::engine::launches;
use crate::error::{Error, Result};
use crate::memory::alloc;
use crate::memory::oom::Injector;
use crate::memory::policy::MemState;
use crate::memory::MemoryBudget;
use crate::model::SentenceModel;
use crate::train::precision::LossScaler;
use crate::train::step::{StepAt, Stepped, Trainer};

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepMeasure {
    /// Heap in use before the measured step (weights, optimizer state, data).
    pub baseline_bytes: u64,
    /// Highest heap use during the measured step.
    pub peak_bytes: u64,
    pub seconds: f64,
}

/// `rows` scored pairs whose two texts are each exactly `seq` tokens long, ids below `vocab`.
pub fn synthetic_pairs(rows: usize, seq: usize, vocab: usize) -> TokenizedData {
    // Ids 1000..1997, inside every real vocabulary (the lower half of a tiny test one);
    // varied so attention is not degenerate.
    let (first, span) = if vocab >= 1997 {
        (1000, 997)
    } else {
        (0, (vocab / 2).max(1))
    };
    let text = |r: usize, c: usize| -> Vec<u32> {
        (0..seq)
            .map(|i| (first + (r * 31 + c * 17 + i * 7) % span) as u32)
            .collect()
    };
    TokenizedData {
        tokens: (0..rows).map(|r| vec![text(r, 0), text(r, 1)]).collect(),
        scores: (0..rows).map(|r| Some((r % 5) as f32 / 4.0)).collect(),
        teachers: Vec::new(),
        columns: 2,
        prompt_tokens: vec![0, 0],
    }
}

/// Runs two optimizer steps of `t.batch_size` rows of `seq` tokens (micro-batch as `t` says),
/// the training loop's own step function, and measures the second.
pub fn measure_step(model: &SentenceModel, t: &TrainSection, seq: usize) -> Result<StepMeasure> {
    let budget = MemoryBudget::unlimited();
    let injector = Injector::default();
    let data = synthetic_pairs(t.batch_size, seq, model.spec.model.sizes().vocab);
    let mut trainer = Trainer::new(model, t, &[], &budget, &injector, data, None)?;
    let rows: Vec<usize> = (0..t.batch_size).collect();
    let micro = super::configured_micro(t);
    let mut mem = MemState::new(micro, micro, usize::MAX);
    let mut scaler = LossScaler::new(t.precision);
    let mut measure = StepMeasure {
        baseline_bytes: 0,
        peak_bytes: 0,
        seconds: 0.0,
    };
    for step in 0..2u64 {
        measure.baseline_bytes = alloc::current() as u64;
        alloc::reset_peak();
        let started = Instant::now();
        let at = StepAt {
            step,
            set: 0,
            rows: &rows,
            lr: t.lr,
        };
        if let Stepped::NothingFits(unfit) =
            trainer.optimizer_step(at, &mut scaler, &mut mem, &mut |_| {})?
        {
            return Err(Error::OutOfMemory(unfit.to_string()));
        }
        measure.seconds = started.elapsed().as_secs_f64();
        measure.peak_bytes = alloc::peak() as u64;
    }
    Ok(measure)
}

/// The tensor ops of one optimizer step, by engine (`st-tune bench launches`).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepLaunches {
    /// Tensors the step made (views included; `engine::launches`), the optimizer's in-place
    /// CPU update replaced by its tensor-op form, as on a GPU.
    pub tensors: usize,
    /// Of those, made in regions that are one `cuda` kernel each, and how many such regions ran.
    pub in_planned_kernels: usize,
    pub planned_kernels: usize,
    /// The gradient norm's ops on a GPU (a CPU reads the gradients in place instead): the
    /// trainable tensors times the ops of one tensor's sum of squares.
    pub grad_norm: usize,
}

impl StepLaunches {
    /// The step as a GPU would run it today.
    pub fn total(&self) -> usize {
        self.tensors + self.grad_norm
    }

    /// The same with each planned `cuda` kernel as one launch.
    pub fn with_planned_kernels(&self) -> usize {
        self.total() - self.in_planned_kernels + self.planned_kernels
    }
}

/// Counts the tensor ops of the second of two optimizer steps of `t.batch_size` rows of `seq`
/// tokens (the first makes the optimizer's state), on the engine `model.layer_engine` names.
pub fn count_step_launches(
    model: &SentenceModel,
    t: &TrainSection,
    seq: usize,
) -> Result<StepLaunches> {
    let budget = MemoryBudget::unlimited();
    let injector = Injector::default();
    let data = synthetic_pairs(t.batch_size, seq, model.spec.model.sizes().vocab);
    let mut trainer = Trainer::new(model, t, &[], &budget, &injector, data, None)?;
    // The tensor-op update a GPU runs, not the CPU's in-place one.
    trainer.optimizer.in_place = false;
    let rows: Vec<usize> = (0..t.batch_size).collect();
    let micro = super::configured_micro(t);
    let mut mem = MemState::new(micro, micro, usize::MAX);
    let mut scaler = LossScaler::new(t.precision);
    let mut step = |step: u64| -> Result<()> {
        let at = StepAt {
            step,
            set: 0,
            rows: &rows,
            lr: t.lr,
        };
        match trainer.optimizer_step(at, &mut scaler, &mut mem, &mut |_| {})? {
            Stepped::NothingFits(unfit) => Err(Error::OutOfMemory(unfit.to_string())),
            _ => Ok(()),
        }
    };
    step(0)?;
    let ((), counted) = launches::count(|| step(1))?;
    let probe = Tensor::zeros(4, candle_core::DType::F32, &model.device)?;
    let (_, per_tensor) = launches::count(|| crate::train::optim::sum_squares_by_ops(&probe))?;
    Ok(StepLaunches {
        tensors: counted.tensors,
        in_planned_kernels: counted.in_regions,
        planned_kernels: counted.regions,
        grad_norm: per_tensor.tensors * model.params.vars.len(),
    })
}

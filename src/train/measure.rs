//! Measuring one optimizer step: peak memory (the counting allocator on CPU) and time, on
//! synthetic rows of an exact length, so `st-tune bench memory` and the planner's calibration
//! see a step of known shape. Two steps run: the first allocates the optimizer state, the
//! second is measured.

use std::time::Instant;

use serde::Serialize;

use crate::config::TrainSection;
use crate::data::tokenized::TokenizedData;
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

/// `rows` scored pairs whose two texts are each exactly `seq` tokens long.
pub fn synthetic_pairs(rows: usize, seq: usize) -> TokenizedData {
    let text = |r: usize, c: usize| -> Vec<u32> {
        // Ids well inside every vocabulary; varied so attention is not degenerate.
        (0..seq)
            .map(|i| 1000 + ((r * 31 + c * 17 + i * 7) % 997) as u32)
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
    let data = synthetic_pairs(t.batch_size, seq);
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

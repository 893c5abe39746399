//! Hyperparameter sweeps: a sweep file names a base training config and the keys to vary
//! (`spec.rs`); trial N's keys are a function of (file, N) (`trials.rs`); each trial runs as
//! its own `st-tune train --resume` process in its own folder (`run.rs`), whose state lives in
//! plain files that any number of processes or cluster jobs can share (`store.rs`); `report.rs`
//! reads them back.
//!
//! A sweep does not lose trials to memory: each trial keeps its batch size and loss exact
//! under OOM (the trainer's handler), what one trial learns about the micro-batch that fits is
//! passed to later trials with the same memory settings, and a trial that cannot fit at all is
//! `infeasible`, not failed.

pub mod draw;
pub mod prune;
pub mod report;
pub mod run;
pub mod spec;
pub mod store;
pub mod tpe;
pub mod trials;

use std::sync::atomic::{AtomicI32, Ordering};

use crate::error::Result;
use spec::Sweep;
use store::{Status, Store, TrialRecord};

/// Runs every trial not finished yet, in order, skipping those another process holds; calls
/// `progress` after each. Stops early when `interrupt` is set (the running trial is stopped
/// after a checkpoint and resumes on the next run).
pub fn run_all(
    sweep: &Sweep,
    interrupt: &AtomicI32,
    mut progress: impl FnMut(&TrialRecord),
) -> Result<Vec<TrialRecord>> {
    let store = Store::open(sweep)?;
    let mut done = Vec::new();
    for index in 0..sweep.trials {
        if interrupt.load(Ordering::SeqCst) != 0 {
            break;
        }
        if let Ok(r) = run::run_trial(sweep, &store, index, false, interrupt)? {
            progress(&r);
            let stop = r.status == Status::Interrupted;
            done.push(r);
            if stop {
                break;
            }
        }
    }
    Ok(done)
}

/// The best complete trial by the sweep's metric and goal.
pub fn best<'a>(sweep: &Sweep, records: &'a [TrialRecord]) -> Option<&'a TrialRecord> {
    records
        .iter()
        .filter(|r| r.status == Status::Complete && r.metric.is_some_and(f64::is_finite))
        .min_by(|a, b| {
            let (x, y) = (a.metric.unwrap_or(f64::NAN), b.metric.unwrap_or(f64::NAN));
            // Ties go to the lower index.
            sweep.goal.best_first(x, y).then(a.index.cmp(&b.index))
        })
}

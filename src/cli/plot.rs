//! `st-tune plot DIR`: redraw a run's `training.png` and `training.svg`.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;

/// Draw a run's curves (loss, one curve per training set when there are several, learning
/// rate, dev metric, samples/s, memory in use against memory.limit with each out-of-memory
/// event) from its metrics.jsonl and events.jsonl, into DIR/training.png and
/// DIR/training.svg. Works on a run still going.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// The run's output folder (output.dir).
    pub dir: PathBuf,
}

pub fn run(a: PlotArgs) -> Result<()> {
    let png = crate::plot::training(&a.dir)?;
    crate::say!("{}", png.display());
    Ok(())
}

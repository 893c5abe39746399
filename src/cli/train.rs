//! `st-tune train`: config file + `--set` overrides -> `train::train` -> summary.

use std::path::PathBuf;

use clap::Args;

use std::sync::Arc;

use crate::config::Config;
use crate::error::Result;
use crate::memory::oom::Injector;
use crate::sweep::prune::TrialPruner;
use crate::train::eval::Scores;
use crate::train::report::Output;
use crate::train::{train, RunOptions};

/// Fine-tune a model as a TOML config describes.
///
/// The config holds everything a run needs (`st-tune config --defaults` prints every key with
/// its default and meaning). The output folder gets `final/` and `best/` (sentence-transformers
/// folders), `metrics.jsonl`, `events.jsonl` and `checkpoints/` (every
/// `output.checkpoint_steps` steps). Ctrl-C or SIGTERM stops after the current step, saves a
/// checkpoint and exits with 130 or 143; `--resume` then continues exactly where it stopped.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The run's TOML config file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set train.lr=3e-5`; repeatable; wins over the file.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Output folder; same as `--set output.dir=DIR`.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Print progress and the summary as JSON lines (for scripts and sweeps).
    #[arg(long)]
    pub json: bool,
    /// Continue from the newest checkpoint in the output folder (same steps, data order and
    /// dropout as if never stopped); with none there yet, start from the beginning, so a job
    /// script can always pass it.
    #[arg(long)]
    pub resume: bool,
    /// A sweep trial's pruner file (written by `st-tune sweep run`).
    #[arg(long, hide = true, value_name = "FILE")]
    pub prune: Option<PathBuf>,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let mut overrides = a.set.clone();
    if let Some(dir) = &a.output {
        overrides.push(format!(
            "output.dir={}",
            toml_string(&dir.to_string_lossy())
        ));
    }
    let cfg = Config::load(&a.config, &overrides)?;
    let opts = RunOptions {
        output: if a.json { Output::Json } else { Output::Human },
        inject_oom: std::env::var(Injector::ENV).ok(),
        inject_nonfinite: std::env::var(crate::train::nonfinite::INJECT_ENV).ok(),
        resume: a.resume,
        pruner: match a.prune.as_deref() {
            Some(path) => Some(Arc::new(TrialPruner::read(path)?)),
            None => None,
        },
        curves: Some(crate::plot::training),
        ..Default::default()
    };
    super::watch_signals(
        opts.interrupt.clone(),
        Some("stopping after this step and saving a checkpoint (again to quit now; --resume continues)"),
    );
    let s = train(&cfg, &opts)?;
    if a.json {
        crate::say!("{}", serde_json::json!({"event": "summary", "data": s}));
        return Ok(());
    }
    if let (Some(b), Some(a)) = (&s.dev_before, &s.dev_after) {
        let size = match a {
            Scores::Similarity(c) => format!("{} pairs", c.pairs),
            Scores::Binary(b) => format!("{} pairs", b.pairs),
            Scores::Retrieval(r) => format!("{} queries, {} documents", r.queries, r.corpus),
        };
        crate::say!(
            "dev {}: {:.4} before, {:.4} after ({size})",
            a.metric(),
            b.value(),
            a.value()
        );
    }
    crate::say!(
        "{} steps in {:.1} s ({:.1} samples/s), final loss {:.4}, peak memory {}",
        s.steps,
        s.train_seconds,
        s.samples_per_s,
        s.final_loss,
        crate::memory::human_bytes(s.peak_memory)
    );
    crate::say!("engine: {}", s.engine);
    crate::say!(
        "out-of-memory events recovered: {}; micro-batch at the end: {}",
        s.ooms_recovered,
        s.final_micro_batch_size
    );
    let p = &s.planned;
    let mb = crate::memory::human_bytes;
    crate::say!(
        "memory: measured peak {}; planned {} = weights {} + gradients {} + optimizer state {} \
         + activations and scratch {}",
        mb(s.peak_memory),
        mb(p.total),
        mb(p.weights),
        mb(p.gradients),
        mb(p.optimizer),
        mb(p.total - p.weights - p.gradients - p.optimizer)
    );
    if let Some(step) = s.resumed_from {
        crate::say!("resumed after step {step}");
    }
    crate::say!("model saved to {}", s.output_dir.join("final").display());
    Ok(())
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

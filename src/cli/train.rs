//! `st-tune train`: config file + `--set` overrides -> `train::train` -> summary.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use clap::Args;

use crate::config::Config;
use crate::error::Result;
use crate::memory::oom::Injector;
use crate::train::report::Output;
use crate::train::{train, RunOptions};

/// Fine-tune a model as a TOML config describes.
///
/// The config holds everything a run needs (`st-tune config --defaults` prints every key with
/// its default and meaning). The output folder gets `final/` and `best/` (sentence-transformers
/// folders), `metrics.jsonl` and `events.jsonl`. Ctrl-C stops after the current step and saves.
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
        ..Default::default()
    };
    let flag = opts.interrupt.clone();
    // A second Ctrl-C falls through to the default handler and kills the process.
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this step and saving (Ctrl-C again to quit now)");
    });
    let s = train(&cfg, &opts)?;
    if a.json {
        println!("{}", serde_json::json!({"event": "summary", "data": s}));
        return Ok(());
    }
    if let (Some(b), Some(a)) = (&s.dev_before, &s.dev_after) {
        println!(
            "dev spearman: {:.4} before, {:.4} after ({} pairs)",
            b.spearman, a.spearman, a.pairs
        );
    }
    println!(
        "{} steps in {:.1} s ({:.1} samples/s), final loss {:.4}, peak memory {}",
        s.steps,
        s.train_seconds,
        s.samples_per_s,
        s.final_loss,
        crate::memory::human_bytes(s.peak_memory)
    );
    println!(
        "out-of-memory events recovered: {}; micro-batch at the end: {}",
        s.ooms_recovered, s.final_micro_batch_size
    );
    println!("model saved to {}", s.output_dir.join("final").display());
    Ok(())
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

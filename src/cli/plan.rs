//! `st-tune plan`: before training, the estimated peak memory of a step and the micro-batch
//! that fits the budget.

use std::path::PathBuf;

use clap::Args;

use crate::config::Config;
use crate::error::Result;
use crate::memory::{human_bytes, MemoryBudget};

/// Estimate a run's peak memory per step and the largest micro-batch that fits.
///
/// The estimate counts the f32 master weights, AdamW state and gradients of the trainable
/// tensors, and the activations each token keeps for the backward pass, for a micro-batch of
/// the longest rows in the training data. The budget is `memory.limit`, or the memory available
/// on this machine. `train.micro_batch_size = "auto"` starts from the micro-batch printed here.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The run's TOML config file.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override a config key, as for `train`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: PlanArgs) -> Result<()> {
    let cfg = Config::load(&a.config, &a.set)?;
    let loaded = crate::train::load(&cfg)?;
    let budget = MemoryBudget::new(cfg.memory.limit.as_ref(), &loaded.model.device)?;
    let p = crate::train::plan(&cfg, &loaded, &budget)?;
    if a.json {
        println!("{}", serde_json::to_string(&p).expect("plain struct"));
        return Ok(());
    }
    let e = &p.estimate;
    println!(
        "longest row: {} tokens; micro-batch {} of such rows per pass",
        p.longest_row_tokens, p.micro_batch_size
    );
    println!("  weights      {:>10}", human_bytes(e.weights));
    println!("  optimizer    {:>10}", human_bytes(e.optimizer));
    println!("  gradients    {:>10}", human_bytes(e.gradients));
    println!("  activations  {:>10}", human_bytes(e.activations));
    if e.guide > 0 {
        println!("  guide model  {:>10}", human_bytes(e.guide));
    }
    println!("  peak (est.)  {:>10}", human_bytes(e.total));
    println!(
        "budget: {} ({})",
        human_bytes(p.budget_bytes),
        p.budget_source
    );
    match p.largest_fitting_micro_batch {
        Some(m) => println!(
            "largest micro-batch that fits: {m} (train.micro_batch_size = \"auto\" starts there)"
        ),
        None => {
            println!(
                "not even one row fits: consider model.max_seq_length, \
                 train.gradient_checkpointing, train.freeze_layers or a larger memory.limit"
            );
            let input = crate::memory::plan::plan_input(
                &loaded.model.plan_shape()?,
                &cfg.train,
                loaded.columns(),
            )
            .with_touched_word_rows(loaded.distinct_ids());
            println!(
                "{}",
                crate::memory::alternatives::advice(
                    &input,
                    &crate::model::known::smaller_than(&loaded.model.spec.model)?,
                    p.micro_batch_size,
                    p.longest_row_tokens,
                    Some(p.budget_bytes),
                )
            );
        }
    }
    Ok(())
}

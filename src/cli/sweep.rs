//! `st-tune sweep list|run|report SWEEP.toml`: hyperparameter sweeps (see `sweep/`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use clap::{Args, Subcommand};
use serde_json::json;

use crate::error::Result;
use crate::memory::{human_bytes, MemoryBudget};
use crate::sweep::spec::Sweep;
use crate::sweep::store::{self, Status, Store};
use crate::sweep::{self as sw, report, run, trials};

/// Search hyperparameters: each trial is a `train` run of its own, in its own folder.
///
/// The sweep file has `[sweep]` (base = the training config, dir, method = "grid", "random" or "tpe",
/// trials, seed, metric = "dev.spearman" | "dev.pearson" | "train.loss", goal = "max" | "min")
/// `[space]` (config key = [values] or { uniform | log_uniform | int_uniform = [lo, hi] }) and
/// optionally `[prune]` (method = "median" or "asha", min_rows, reduction, min_trials).
/// Trials keep their batch size and loss exact under OOM; one that cannot fit at all is
/// "infeasible", and the sweep goes on. See docs/sweeps.md.
#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(subcommand)]
    pub command: SweepCommand,
}

#[derive(Debug, Subcommand)]
pub enum SweepCommand {
    /// Every trial with the keys it sets, its planned peak memory and starting micro-batch.
    List(ListArgs),
    /// Run the trials not finished yet (or one, with --trial): a stopped sweep resumes.
    Run(RunArgs),
    /// The trials' results, best first.
    Report(ReportArgs),
}

#[derive(Debug, Args)]
pub struct ListArgs {
    pub sweep: PathBuf,
    /// One JSON object per trial.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    pub sweep: PathBuf,
    /// Run trial N only (for a job scheduler: SLURM's $SLURM_ARRAY_TASK_ID, Kubernetes'
    /// $JOB_COMPLETION_INDEX); a failed trial is tried again, a finished one is left alone.
    #[arg(long, value_name = "N")]
    pub trial: Option<usize>,
    /// One JSON line per finished trial.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    pub sweep: PathBuf,
    /// {"metric", "trials": [...], "best": {...}} as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Copy the best trial's model folder here.
    #[arg(long, value_name = "DIR")]
    pub export: Option<PathBuf>,
}

pub fn run(a: SweepArgs) -> Result<()> {
    match a.command {
        SweepCommand::List(a) => list(a),
        SweepCommand::Run(a) => run_sweep(a),
        SweepCommand::Report(a) => report_sweep(a),
    }
}

fn list(a: ListArgs) -> Result<()> {
    let sweep = Sweep::load(&a.sweep)?;
    let store = Store {
        dir: sweep.dir.clone(),
    };
    // Planning loads the model and tokenizes the data: once per distinct memory setting.
    let mut plans = HashMap::new();
    for index in 0..sweep.trials {
        let Some(params) = trials::params(&sweep, index) else {
            if a.json {
                crate::say!("{}", json!({"index": index, "params": null}));
            } else {
                crate::say!("trial {index:>4}  keys chosen by TPE when it starts");
            }
            continue;
        };
        let cfg = run::trial_config(&sweep, &store, index, &params)?;
        let key = (store::memory_key(&cfg), cfg.train.micro_batch().to_string());
        if !plans.contains_key(&key) {
            let loaded = crate::train::load(&cfg)?;
            let budget = MemoryBudget::new(cfg.memory.limit.as_ref(), &loaded.model.device)?;
            plans.insert(key.clone(), crate::train::plan(&cfg, &loaded, &budget)?);
        }
        let plan = &plans[&key];
        let params: serde_json::Map<String, serde_json::Value> = params
            .into_iter()
            .map(|(k, v)| (k, serde_json::to_value(v).expect("TOML values are JSON")))
            .collect();
        let start =
            store::configured_micro(&cfg).unwrap_or(plan.largest_fitting_micro_batch.unwrap_or(1));
        if a.json {
            crate::say!(
                "{}",
                json!({"index": index, "params": params, "planned_peak": plan.estimate.total,
                       "micro_batch_size": start})
            );
        } else {
            let shown: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
            crate::say!(
                "trial {index:>4}  planned peak {:>10}  micro-batch {start:>3}  {}",
                human_bytes(plan.estimate.total),
                shown.join(" ")
            );
        }
    }
    Ok(())
}

fn run_sweep(a: RunArgs) -> Result<()> {
    let sweep = Sweep::load(&a.sweep)?;
    let interrupt = Arc::new(AtomicI32::new(0));
    // The running trial gets the signal too, saves a checkpoint and stops; the sweep stops
    // after it, and the next `sweep run` resumes that trial.
    super::watch_signals(interrupt.clone(), None);
    if let Some(index) = a.trial {
        let store = Store::open(&sweep)?;
        return match run::run_trial(&sweep, &store, index, true, &interrupt)? {
            Err(busy) => Err(crate::Error::sweep(
                store.trial_dir(index),
                format!(
                    "is in use by {} (it holds {}); run the trial again once that process \
                     has ended",
                    busy.who(),
                    busy.path.display()
                ),
            )),
            Ok(r) => {
                print_trial(&r, a.json);
                trial_exit(r.status, &interrupt)
            }
        };
    }
    let bar = (!a.json && std::io::stdout().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(sweep.trials as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} trials  {msg}")
                .expect("static template"),
        );
        bar
    });
    let mut best: Option<(f64, usize)> = None;
    let done = sw::run_all(&sweep, &interrupt, |r| {
        if let (Status::Complete, Some(m)) = (r.status, r.metric) {
            if best.is_none_or(|(b, _)| sweep.goal.better(m, b)) {
                best = Some((m, r.index));
            }
        }
        match &bar {
            Some(bar) => {
                bar.inc(1);
                if let Some((m, i)) = best {
                    bar.set_message(format!("best {} {m:.4} (trial {i})", sweep.metric));
                }
            }
            None => print_trial(r, a.json),
        }
    })?;
    if let Some(bar) = &bar {
        bar.finish();
    }
    let signal = interrupt.load(Ordering::SeqCst);
    if signal != 0 {
        return Err(crate::Error::Interrupted { signal });
    }
    if !a.json {
        let skipped = sweep.trials - done.len();
        crate::say!(
            "{} trials run or already finished{}; `st-tune sweep report {}` shows them",
            done.len(),
            if skipped > 0 {
                format!(", {skipped} held by other processes")
            } else {
                String::new()
            },
            a.sweep.display()
        );
    }
    Ok(())
}

/// `--trial N`'s exit code: 0 once the trial has a result (complete, infeasible or failed, all
/// recorded for the report), 128 + signal when it was stopped.
fn trial_exit(status: Status, interrupt: &AtomicI32) -> Result<()> {
    match (status, interrupt.load(Ordering::SeqCst)) {
        (Status::Interrupted, s) => Err(crate::Error::Interrupted {
            signal: if s != 0 { s } else { libc::SIGTERM },
        }),
        _ => Ok(()),
    }
}

fn print_trial(r: &store::TrialRecord, as_json: bool) {
    if as_json {
        crate::say!("{}", serde_json::to_string(r).expect("plain data"));
        return;
    }
    let metric = r.metric.map_or("-".into(), |m| format!("{m:.4}"));
    let why = r
        .message
        .as_deref()
        .map_or(String::new(), |m| format!(": {m}"));
    crate::say!("trial {:>4}: {:?} metric {metric}{why}", r.index, r.status);
}

fn report_sweep(a: ReportArgs) -> Result<()> {
    let sweep = Sweep::load(&a.sweep)?;
    let store = Store::open(&sweep)?;
    let records = report::records(&sweep, &store)?;
    if let Some(to) = &a.export {
        report::export_best(&sweep, &store, &records, to)?;
    }
    // The metric against each searched key, once a trial has a result.
    let results: Vec<(Vec<(String, toml::Value)>, f64)> = records
        .iter()
        .filter(|r| matches!(r.status, Status::Complete | Status::Pruned))
        .filter_map(|r| Some((r.params.clone().into_iter().collect(), r.metric?)))
        .collect();
    let picture = if results.is_empty() {
        None
    } else {
        Some(crate::plot::sweep(&store.dir, &sweep.metric, &results)?)
    };
    if a.json {
        let mut v = report::to_json(&sweep, &records);
        v["plot"] = json!(picture);
        crate::say!("{v}");
    } else {
        crate::say!("{}", report::to_table(&sweep, &records).trim_end());
        if let Some(p) = &picture {
            crate::say!("{} against each key: {}", sweep.metric, p.display());
        }
        if let Some(to) = &a.export {
            crate::say!("best model copied to {}", to.display());
        }
    }
    Ok(())
}

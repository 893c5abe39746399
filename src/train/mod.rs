//! `train(config) -> Summary`: the fine-tuning loop, top to bottom.
//!
//! Per optimizer step, in order: the rows and learning rate; the optimizer step itself
//! (`step.rs`: gradients over micro-batches, unscale, clip, AdamW, and everything done about
//! an OOM); log; evaluate and save the best; prune; checkpoint.

pub mod binary;
pub mod card;
pub mod checkpoint;
pub mod eval;
pub mod measure;
pub mod mine;
pub mod nonfinite;
pub mod optim;
pub mod passes;
pub mod precision;
pub mod recompute;
pub mod report;
pub mod retrieval;
pub mod schedule;
pub mod step;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::config::{Config, MicroBatch, TrainSection};
use crate::data::batch::{text_ids, EpochBatches};
use crate::data::read::read_dataset;
use crate::data::tokenize::TextTokenizer;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::losses;
use crate::memory::oom::Injector;
use crate::memory::policy::{MemState, RunState};
use crate::memory::{alloc, MemoryBudget};
use crate::model::weights::Freeze;
use crate::model::SentenceModel;
use checkpoint::Progress;
use eval::{evaluate_widths, DevScores, Scores};
use precision::LossScaler;
use report::{Output, Reporter, StepLog};
use schedule::LinearSchedule;
use step::{Note, StepAt, Stepped, TokenizedData, Trainer};

/// How a run talks to its caller.
#[derive(Clone)]
pub struct RunOptions {
    pub output: Output,
    /// The number of the signal (SIGINT, SIGTERM) that asked the run to stop, 0 while none
    /// has: the loop then saves a checkpoint after the current step and returns.
    pub interrupt: Arc<AtomicI32>,
    /// OOMs to inject, as `ST_TUNE_INJECT_OOM` takes them (the CLI passes that variable on).
    pub inject_oom: Option<String>,
    /// Steps whose gradients to make NaN, as `ST_TUNE_INJECT_NONFINITE` takes them.
    pub inject_nonfinite: Option<String>,
    /// Continue from the newest checkpoint in `output.dir` (`train --resume`).
    pub resume: bool,
    /// A sweep trial's pruner: report at rungs, stop when out (`train --prune FILE`).
    pub pruner: Option<crate::sweep::prune::Pruner>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            output: Output::Quiet,
            interrupt: Arc::new(AtomicI32::new(0)),
            inject_oom: None,
            inject_nonfinite: None,
            resume: false,
            pruner: None,
        }
    }
}

/// The end-of-run report (also printed as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: usize,
    /// The checkpoint step this run continued from (`--resume`), if any.
    pub resumed_from: Option<usize>,
    /// The step after which a sweep's pruner stopped this trial, if it did.
    pub pruned_at: Option<usize>,
    /// Spearman/Pearson for a scored dev file, retrieval figures for pairs or triplets.
    pub dev_before: Option<Scores>,
    pub dev_after: Option<Scores>,
    /// With train.matryoshka_dims: the final dev figures at each width, keyed by the width.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub dev_after_dims: std::collections::BTreeMap<usize, Scores>,
    /// The best dev Spearman (scored dev files only; see `best_dev`).
    pub best_spearman: Option<f64>,
    /// The best dev figure and its name: "spearman", or "ndcg@10" for a retrieval dev file.
    pub best_dev: Option<BestDev>,
    pub train_seconds: f64,
    pub samples_per_s: f64,
    pub final_loss: f32,
    pub ooms_recovered: usize,
    pub final_micro_batch_size: usize,
    /// The heap's peak during training, measured.
    pub peak_memory: u64,
    /// The engine the encoder ran on (`cpu` or `portable`) and the CPU kernels in use.
    pub engine: String,
    /// The planner's estimate of a step at the configured micro-batch on the longest rows,
    /// part by part, to read beside the measured peak.
    pub planned: crate::memory::plan::Estimate,
    pub output_dir: PathBuf,
}

/// The dev figure `best/` was chosen by.
#[derive(Debug, Clone, Serialize)]
pub struct BestDev {
    pub metric: String,
    pub value: f64,
}

/// Rows per evaluation batch: evaluation keeps no graph, so it can be larger than training's.
const EVAL_BATCH: usize = 64;

/// The model and data of a run, loaded and checked (everything that can fail on bad input
/// fails here, before any training).
pub struct Loaded {
    pub model: SentenceModel,
    pub train_set: Dataset,
    pub dev_set: Option<Dataset>,
    pub data: TokenizedData,
}

pub fn load(cfg: &Config) -> Result<Loaded> {
    cfg.validate()?;
    let device = crate::device::parse(&cfg.model.device)?;
    let freeze = Freeze {
        embeddings: cfg.train.freezes_embeddings(),
        layers: cfg.train.freeze_layers,
    };
    let mut model = SentenceModel::load(&cfg.model.path, &device, Some(freeze))?;
    let layers = model.num_layers();
    if cfg.train.freeze_layers > layers {
        return Err(Error::config(
            "train.freeze_layers",
            format!(
                "is {}, but {} has {layers} layers; use at most {layers} (with {layers} \
                 nothing but the pooling would train)",
                cfg.train.freeze_layers, cfg.model.path
            ),
        ));
    }
    if let Some(dims) = &cfg.train.matryoshka_dims {
        let width = model.spec.embedding_dim();
        if let Some(d) = dims.iter().find(|&&d| d > width) {
            return Err(Error::config(
                "train.matryoshka_dims",
                format!(
                    "holds {d}, but {} makes embeddings of {width} dimensions; use widths of \
                     at most {width} (and include {width} to keep training the full width)",
                    cfg.model.path
                ),
            ));
        }
    }
    if let Some(max) = cfg.model.max_seq_length {
        let limit = model.spec.model.max_tokens();
        if max > limit {
            return Err(Error::config(
                "model.max_seq_length",
                format!(
                    "is {max}, but {} has positions for {limit} tokens; use at most {limit}",
                    cfg.model.path
                ),
            ));
        }
        model.set_max_seq_length(max)?;
    }
    let mut train_set = read_dataset(
        &cfg.data.train,
        cfg.data.format,
        cfg.data.columns.as_ref(),
        cfg.data.limit,
    )?;
    losses::check_fits(cfg.train.loss, train_set.shape)?;
    check_teacher_width(&train_set, model.spec.embedding_dim())?;
    let mut dev_set = match &cfg.data.dev {
        Some(p) => Some(read_dev(p, cfg)?),
        None => None,
    };
    if let Some(dev) = &dev_set {
        if eval::figures(dev.shape).is_empty() {
            return Err(eval::no_evaluation(dev));
        }
    }
    set_prompts(cfg, &mut model, &mut train_set, dev_set.as_mut())?;
    if let Some(metric) = &cfg.train.metric {
        let Some(dev) = &dev_set else {
            return Err(Error::config(
                "train.metric",
                "picks the best model by a dev figure, but data.dev is not set",
            ));
        };
        let figures = eval::figures(dev.shape);
        if !figures.contains(&metric.as_str()) {
            return Err(Error::config(
                "train.metric",
                format!(
                    "\"{metric}\" is not a figure of {}'s evaluation ({}: {}); use one of {}",
                    dev.path.display(),
                    dev.shape.name(),
                    eval::evaluation_name(dev.shape),
                    figures.join(", ")
                ),
            ));
        }
    }
    let data = tokenize(&model.tokenizer, &train_set)?;
    Ok(Loaded {
        model,
        train_set,
        dev_set,
        data,
    })
}

/// What `st-tune plan` reports: the estimated peak of a step at the configured micro-batch on
/// the longest rows, the budget, and the largest micro-batch the estimate says fits.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub longest_row_tokens: usize,
    pub micro_batch_size: usize,
    pub estimate: crate::memory::plan::Estimate,
    pub budget_bytes: u64,
    pub budget_source: String,
    pub largest_fitting_micro_batch: Option<usize>,
}

pub fn plan(cfg: &Config, loaded: &Loaded, budget: &MemoryBudget) -> Result<Plan> {
    let t = &cfg.train;
    let input = loaded.model.plan_input(t, loaded.data.columns)?;
    let longest = loaded
        .data
        .tokens
        .iter()
        .flat_map(|r| r.iter().map(Vec::len))
        .max()
        .unwrap_or(1);
    let micro = configured_micro(t);
    let (budget_bytes, budget_source) = match budget.limit {
        Some(b) => (
            b,
            match &cfg.memory.limit {
                Some(l) => format!("memory.limit = {:?}", l.as_str()),
                None => "free device memory".to_string(),
            },
        ),
        None => (
            crate::memory::available_memory(),
            "memory available on this machine".to_string(),
        ),
    };
    Ok(Plan {
        longest_row_tokens: longest,
        micro_batch_size: micro,
        estimate: crate::memory::plan::estimate(&input, &vec![longest; micro]),
        budget_bytes,
        budget_source,
        largest_fitting_micro_batch: crate::memory::plan::largest_fitting(
            &input,
            t.batch_size,
            longest,
            budget_bytes,
        ),
    })
}

pub fn train(cfg: &Config, opts: &RunOptions) -> Result<Summary> {
    let out_dir = &cfg.output.dir;
    // A bad config is reported before what the folder holds.
    cfg.validate()?;
    // One run per folder (src/lock.rs), locked before it is read. A folder that does not
    // exist yet is made once the model and data have loaded, so bad input writes nothing.
    let early = match out_dir.exists() {
        true => Some(crate::lock::output_dir(out_dir)?),
        false => None,
    };
    // Decided before anything is written, so a refused run leaves the folder as it was.
    let resume = early
        .is_some()
        .then(|| checkpoint_to_resume(cfg, opts.resume))
        .transpose()?;
    let loaded = load(cfg)?;
    let (_lock, resume) = match (early, resume) {
        (Some(lock), Some(resume)) => (lock, resume),
        _ => (
            crate::lock::output_dir(out_dir)?,
            checkpoint_to_resume(cfg, opts.resume)?,
        ),
    };
    let budget = MemoryBudget::new(cfg.memory.limit.as_ref(), &loaded.model.device)?;
    let planned = plan(cfg, &loaded, &budget)?;
    let restored = match &resume {
        Resume::From { path, fallback } => {
            Some(restore(path, fallback.as_deref(), cfg, &loaded.model)?)
        }
        _ => None,
    };
    let Loaded {
        model,
        train_set,
        dev_set,
        data,
    } = loaded;
    let t = &cfg.train;

    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let lengths: Vec<usize> = data
        .tokens
        .iter()
        .map(|cols| cols.iter().map(Vec::len).max().unwrap_or(0))
        .collect();
    let row_texts: Vec<Vec<&str>> = train_set
        .rows
        .iter()
        .map(|r| r.texts.iter().map(String::as_str).collect())
        .collect();
    let texts = text_ids(&row_texts);
    let mut batches = EpochBatches::new(
        &lengths,
        &texts,
        t.batch_size,
        t.seed,
        cfg.data.group_by_length,
        t.batch_sampler(),
    );
    let total = t.max_steps.unwrap_or_else(|| batches.steps(t.epochs));
    let schedule = LinearSchedule::new(t.lr, t.warmup_ratio, total);
    let start = restored.as_ref().map_or(0, |r| r.progress.step);
    let mut reporter = Reporter::new(
        out_dir,
        opts.output,
        total,
        restored.as_ref().map(|r| r.progress.step),
    )?;
    let engine = crate::engine::describe(&model.device);
    reporter.message(&format!("engine: {engine}"));
    if let Resume::NothingYet = resume {
        reporter.message(&format!(
            "--resume: no checkpoint in {} yet, starting from the beginning",
            checkpoint::folder(out_dir).display()
        ));
    }
    if t.freeze_layers > 0 && t.freeze_embeddings == Some(false) {
        reporter.message(
            "warning: train.freeze_embeddings = false with train.freeze_layers > 0: the \
             embeddings' gradient flows back through the frozen layers, so they keep their \
             activations and freezing saves little memory",
        );
    }
    let injector = match &opts.inject_oom {
        Some(spec) => Injector::parse(spec)?,
        None => Injector::default(),
    };
    let micro = match t.micro_batch() {
        MicroBatch::Size(n) => n,
        // The planner's pick (one row if not even that fits: the OOM handler takes over).
        MicroBatch::Auto => planned.largest_fitting_micro_batch.unwrap_or(1),
    };
    // A repeated run starts from the micro-batch the last one ended with, if that was smaller.
    let micro = match RunState::read(out_dir)? {
        Some(s) if restored.is_none() && s.max_micro == micro && s.micro < micro => {
            reporter.message(&format!(
                "starting at micro-batch {} (the last run in this folder ended there)",
                s.micro
            ));
            s.micro
        }
        _ => micro,
    };
    let mut progress = Progress {
        step: 0,
        scaler: LossScaler::new(t.precision),
        mem: MemState::new(micro, configured_micro(t), cfg.memory.regrow_after),
        best: None,
        dev_before: None,
        nonfinite_streak: 0,
    };
    let escalate = &cfg.memory.escalate;
    let mut trainer = Trainer::new(
        &model,
        t,
        escalate,
        &budget,
        &injector,
        data,
        Some(&train_set),
    )?;
    if let Some(spec) = &opts.inject_nonfinite {
        trainer.inject_nonfinite = nonfinite::parse_injection(spec)?;
    }
    // The dev figures, and with train.matryoshka_dims those at each width too.
    let widths = t.matryoshka_dims.clone().unwrap_or_default();
    let dev_eval_at = |m: &SentenceModel, widths: &[usize]| {
        dev_set
            .as_ref()
            .map(|d| evaluate_widths(m, d, EVAL_BATCH, widths))
            .transpose()
    };
    let dev_eval = |m: &SentenceModel| dev_eval_at(m, &widths);
    match restored {
        Some(r) => {
            // The levers the OOM handler had pulled, in the order it pulled them.
            for &lever in &escalate[..r.progress.mem.escalated] {
                trainer.pull(lever)?;
            }
            trainer.optimizer.restore(r.adam_step, r.moments);
            progress = r.progress;
            reporter.resumed(start, &r.path);
            reporter.start_at(start);
        }
        None => {
            let dev = dev_eval(&model)?;
            if let Some(d) = &dev {
                reporter.eval(0, "before", &d.full, &d.widths);
            }
            progress.dev_before = dev.map(|d| d.full);
            progress.best = progress
                .dev_before
                .as_ref()
                .and_then(|c| c.chosen(t.metric.as_deref()))
                .map(|(_, value)| value);
        }
    }
    reporter.message(&format!(
        "training {} ({} trainable parameters) on {} rows of {}: {} steps of {} rows, micro-batch {}",
        cfg.model.path,
        model.params.trainable_count(),
        train_set.len(),
        cfg.data.train.display(),
        total,
        t.batch_size,
        progress.mem.micro
    ));

    let mut epoch_batches = Vec::new();
    let (mut last_loss, mut samples, mut window_start) = (0f32, 0usize, Instant::now());
    let mut rows_trained = 0usize;
    let started = Instant::now();
    let info = RunInfo {
        train_rows: train_set.len(),
        columns: train_set.shape.roles(),
        started,
    };
    alloc::reset_peak();
    let mut peak_memory = 0u64;
    // Set when a sweep's pruner stops the run: the evaluation at the rung, if any.
    let mut pruned: Option<Option<Scores>> = None;

    for step in start..total {
        let (epoch, in_epoch) = batches.locate(step);
        let epoch = epoch as usize;
        // The batches are a function of (seed, epoch): a resumed run rebuilds them mid-epoch.
        if in_epoch == 0 || step == start {
            epoch_batches = batches.epoch(epoch as u64);
        }
        let rows = &epoch_batches[in_epoch][..];
        let at = StepAt {
            step: step as u64,
            rows,
            lr: schedule.lr(step),
        };
        let mut last_nonfinite = None;
        let mut note = |note: Note| {
            if let Note::NonFinite(e) = &note {
                last_nonfinite = Some(e.clone());
            }
            report(&mut reporter, step + 1, note)
        };
        let (scaler, mem) = (&mut progress.scaler, &mut progress.mem);
        let loss = match trainer.optimizer_step(at, scaler, mem, &mut note)? {
            Stepped::Done { loss } => {
                progress.nonfinite_streak = 0;
                loss
            }
            Stepped::NonFinite { loss } => {
                progress.nonfinite_streak += 1;
                if progress.nonfinite_streak >= t.max_nonfinite_steps {
                    // Nothing is saved: the weights are those of the last good update, but
                    // they are what made these steps non-finite.
                    reporter.finish();
                    let last = last_nonfinite.expect("a skipped step is reported");
                    let newest = checkpoint::list(out_dir)?.pop().map(|(_, p)| p);
                    let newest = newest.map(|p| p.display().to_string());
                    let streak = progress.nonfinite_streak;
                    return Err(nonfinite::diverged(t, streak, &last, newest.as_deref()));
                }
                loss
            }
            Stepped::NothingFits(why) => {
                let stopped = "stopped: out of memory";
                save_final(&model, cfg, &info, step, stopped, 1, mem.max_micro)?;
                let longest = lengths.iter().copied().max().unwrap_or(1);
                let columns = trainer.data().columns;
                let advice = what_would_fit(&model, t, columns, mem.max_micro, longest, &budget)?;
                return Err(Error::OutOfMemory(format!("{why}. {advice}")));
            }
        };
        peak_memory = peak_memory.max(alloc::peak() as u64);
        last_loss = loss;
        samples += rows.len();
        rows_trained += rows.len();
        let done = step + 1;
        progress.step = done;
        let log_now = done % t.log_steps.max(1) == 0 || done == total;
        let secs = window_start.elapsed().as_secs_f64();
        reporter.step(
            &StepLog {
                step: done,
                epoch,
                loss,
                lr: at.lr,
                samples_per_s: samples as f64 / secs.max(1e-9),
                micro_batch_size: progress.mem.micro,
                memory_in_use: budget.in_use(),
                memory_limit: budget.limit,
            },
            log_now,
        );
        if log_now {
            samples = 0;
            window_start = Instant::now();
        }
        let mut dev_now = None;
        if t.eval_steps > 0 && done % t.eval_steps == 0 && done < total {
            checkpoint::crash_point("eval", done);
            let dev = dev_eval(&model)?;
            if let Some(d) = &dev {
                reporter.eval(done, "periodic", &d.full, &d.widths);
            }
            dev_now = dev.map(|d| d.full);
            if let Some(c) = &dev_now {
                let (name, value) = c.chosen(t.metric.as_deref()).unwrap_or_default();
                if cfg.output.save_best && progress.best.is_none_or(|b| value > b) {
                    progress.best = Some(value);
                    save(
                        &model,
                        cfg,
                        &info,
                        &out_dir.join("best"),
                        done,
                        &format!("best dev {name} {value:.4}"),
                        progress.mem.micro,
                        false,
                    )?;
                }
            }
        }
        if let Some(p) = &opts.pruner {
            let rows = (step * t.batch_size, done * t.batch_size);
            if let Some(k) = crate::sweep::prune::rung_crossed(p, rows.0, rows.1) {
                if dev_now.is_none() && p.metric != "loss" {
                    dev_now = dev_eval_at(&model, &[])?.map(|d| d.full);
                }
                let value = match p.metric.as_str() {
                    "loss" => Some(loss as f64),
                    name => dev_now.as_ref().and_then(|c| c.figure(name)),
                };
                if let Some(v) = value.filter(|v| v.is_finite()) {
                    if p.report(k, rows.1, v)? {
                        reporter.pruned(done, rows.1, v);
                        pruned = Some(dev_now);
                        break;
                    }
                }
            }
        }
        let signal = opts.interrupt.load(Ordering::SeqCst);
        let every = cfg.output.checkpoint_steps;
        // No checkpoint amid non-finite steps: the newest stays one taken before them.
        let periodic = every > 0 && (done % every == 0 || done == total);
        if signal != 0 || (periodic && progress.nonfinite_streak == 0) {
            let staged = checkpoint::stage(
                out_dir,
                &progress,
                cfg,
                &model.params.vars,
                &trainer.optimizer,
            )?;
            // Logged before it is published: a kill in between leaves a line for a step after
            // the newest checkpoint, which --resume drops.
            reporter.checkpoint(done, staged.path());
            staged.publish(cfg.output.keep_checkpoints)?;
        }
        if signal != 0 {
            reporter.interrupted(done, signal);
            reporter.finish();
            let status = format!("interrupted by signal {signal}");
            save_final(
                &model,
                cfg,
                &info,
                done,
                &status,
                progress.mem.micro,
                progress.mem.max_micro,
            )?;
            return Err(Error::Interrupted { signal });
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    reporter.finish();

    let steps = progress.step;
    let was_pruned = pruned.is_some();
    let (dev_after, dev_after_dims) = match pruned {
        Some(at_rung) => (at_rung, Vec::new()),
        None => match dev_eval(&model)? {
            Some(DevScores { full, widths }) => (Some(full), widths),
            None => (None, Vec::new()),
        },
    };
    if let (Some(c), false) = (&dev_after, was_pruned) {
        reporter.eval(total, "after", c, &dev_after_dims);
        let (name, value) = c.chosen(t.metric.as_deref()).unwrap_or_default();
        if cfg.output.save_best && progress.best.is_none_or(|b| value >= b) {
            progress.best = Some(value);
            save(
                &model,
                cfg,
                &info,
                &out_dir.join("best"),
                total,
                &format!("best dev {name} {value:.4}"),
                progress.mem.micro,
                false,
            )?;
        }
    }
    let mem = &progress.mem;
    let status = if was_pruned {
        "stopped early by the sweep's pruner"
    } else {
        "finished"
    };
    save_final(&model, cfg, &info, steps, status, mem.micro, mem.max_micro)?;
    let metric = dev_after
        .as_ref()
        .and_then(|c| c.chosen(t.metric.as_deref()))
        .map(|(name, _)| name);
    Ok(Summary {
        steps,
        resumed_from: (start > 0).then_some(start),
        pruned_at: was_pruned.then_some(steps),
        dev_before: progress.dev_before,
        dev_after,
        dev_after_dims: dev_after_dims.into_iter().collect(),
        best_spearman: progress
            .best
            .filter(|_| metric.as_deref() == Some("spearman")),
        best_dev: metric
            .zip(progress.best)
            .map(|(metric, value)| BestDev { metric, value }),
        train_seconds,
        samples_per_s: rows_trained as f64 / train_seconds.max(1e-9),
        final_loss: last_loss,
        ooms_recovered: mem.recovered,
        final_micro_batch_size: mem.micro,
        peak_memory,
        engine,
        planned: planned.estimate,
        output_dir: out_dir.clone(),
    })
}

/// Where a run starts: from scratch, or from a checkpoint (and the one before it, offered
/// if this one turns out damaged).
enum Resume {
    Fresh,
    /// `--resume` with no checkpoint yet: from scratch, said so.
    NothingYet,
    From {
        path: PathBuf,
        fallback: Option<PathBuf>,
    },
}

fn checkpoint_to_resume(cfg: &Config, resume: bool) -> Result<Resume> {
    let mut found = checkpoint::list(&cfg.output.dir)?;
    let newest = found.pop();
    match (resume, newest) {
        (false, None) => Ok(Resume::Fresh),
        (true, None) => Ok(Resume::NothingYet),
        (true, Some((_, path))) => Ok(Resume::From {
            path,
            fallback: found.pop().map(|(_, p)| p),
        }),
        (false, Some(_)) => Err(Error::Usage(format!(
            "{} already holds checkpoints of a run, the newest {}. Run the same command with \
             --resume to continue it, or choose another output.dir (--output DIR) to start \
             afresh; st-tune does not overwrite them",
            cfg.output.dir.display(),
            checkpoint::describe_newest(&cfg.output.dir)?.unwrap_or_default()
        ))),
    }
}

/// Reads the checkpoint at `path`, checks it belongs to this run (same result-changing config,
/// same trainable tensors) and loads its weights into `model`.
fn restore(
    path: &Path,
    fallback: Option<&Path>,
    cfg: &Config,
    model: &SentenceModel,
) -> Result<checkpoint::Restored> {
    let r = checkpoint::load(path, fallback, &model.device)?;
    let differences = checkpoint::config_differences(&r.config, cfg);
    if !differences.is_empty() {
        return Err(Error::checkpoint(
            path,
            format!(
                "was saved by a run with another config, and resuming would not give the same \
                 model: {}. Resume with the checkpoint's values, or start afresh in another \
                 output.dir",
                differences.join("; ")
            ),
        ));
    }
    let weights_file = path.join("weights.safetensors");
    let vars = &model.params.vars;
    for (name, var) in vars {
        let Some(t) = r.weights.get(name) else {
            return Err(Error::checkpoint(
                &weights_file,
                format!("has no tensor `{name}`: it was saved from another model"),
            ));
        };
        if t.dims() != var.dims() {
            return Err(Error::checkpoint(
                &weights_file,
                format!(
                    "holds `{name}` with shape {:?}, the model's is {:?}: it was saved from \
                     another model",
                    t.dims(),
                    var.dims()
                ),
            ));
        }
    }
    if let Some(extra) = r.weights.keys().find(|n| !vars.contains_key(*n)) {
        return Err(Error::checkpoint(
            &weights_file,
            format!("holds `{extra}`, which this model does not train: it was saved from another model or with other train.freeze_* settings"),
        ));
    }
    for (name, var) in vars {
        var.set(&r.weights[name])?;
    }
    Ok(r)
}

/// The dev file; its row shape picks the evaluation (scored pairs: Spearman, which also picks
/// `best/`; pairs or triplets: retrieval, NDCG@10).
/// The dev file, with `data.corpus`'s distractors when it is a retrieval file.
fn read_dev(path: &Path, cfg: &Config) -> Result<Dataset> {
    let mut dev = read_dataset(path, cfg.data.format, None, cfg.data.limit)?;
    if let Some(corpus) = &cfg.data.corpus {
        if !dev.shape.is_retrieval() {
            return Err(Error::config(
                "data.corpus",
                format!(
                    "adds documents to a retrieval evaluation, but {} holds {}; \
                     remove data.corpus or use a pairs or triplets dev file",
                    path.display(),
                    dev.shape.name()
                ),
            ));
        }
        dev.distractors = crate::data::read::read_corpus(corpus)?;
    }
    Ok(dev)
}

/// Writes what a step reported to events.jsonl and the terminal; `step` counts from 1.
fn report(reporter: &mut Reporter, step: usize, note: Note) {
    match note {
        Note::Oom(e) => reporter.oom(&e),
        Note::Escalated(lever) => reporter.escalated(step, lever.as_str()),
        Note::Skipped { loss_scale } => reporter.skipped(step, loss_scale),
        Note::Regrew { micro } => reporter.regrew(step, micro),
        Note::NonFinite(e) => reporter.nonfinite(&e),
    }
}

/// When nothing fits: the memory this run needs (at `micro` rows of `longest` tokens) and the
/// smaller models that would fit the budget.
fn what_would_fit(
    model: &SentenceModel,
    t: &TrainSection,
    columns: usize,
    micro: usize,
    longest: usize,
    budget: &MemoryBudget,
) -> Result<String> {
    let input = model.plan_input(t, columns)?;
    Ok(crate::memory::alternatives::advice(
        &input,
        model.spec.model.model_type(),
        micro,
        longest,
        budget.limit,
    ))
}

/// `train.micro_batch_size` in rows, "auto" counting as the whole batch: what the planner
/// estimates by default and the most a regrow goes back to.
fn configured_micro(t: &TrainSection) -> usize {
    match t.micro_batch() {
        MicroBatch::Size(n) => n,
        MicroBatch::Auto => t.batch_size,
    }
}

/// Adds `model.prompts` to the model's own and puts the prompts `data.prompts` names on the
/// columns of the training and dev sets. Dev columns without one get the model's default
/// prompt, as Python's evaluators (which encode without naming a prompt) do; training, as
/// Python's trainer, only the prompts named.
fn set_prompts(
    cfg: &Config,
    model: &mut SentenceModel,
    train: &mut Dataset,
    dev: Option<&mut Dataset>,
) -> Result<()> {
    let prompts = &mut model.spec.prompts;
    prompts.extend(cfg.model.prompts.clone().unwrap_or_default());
    let default = model
        .spec
        .default_prompt_name
        .as_ref()
        .map(|n| prompts[n].clone());
    let chosen = cfg.data.prompts.clone().unwrap_or_default();
    let text_roles = |set: &Dataset| set.shape.roles()[..set.shape.text_columns()].to_vec();
    let dev_roles = dev.as_deref().map(text_roles).unwrap_or_default();
    for (role, name) in &chosen {
        let key = format!("data.prompts.{role}");
        if !prompts.contains_key(name) {
            let known: Vec<&str> = prompts.keys().map(String::as_str).collect();
            return Err(Error::config(
                key,
                format!(
                    "names the prompt \"{name}\", which neither model.prompts nor {} declares; \
                     declared: {}",
                    cfg.model.path,
                    if known.is_empty() {
                        "none".into()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        if !text_roles(train).contains(&role.as_str()) && !dev_roles.contains(&role.as_str()) {
            return Err(Error::config(
                key,
                format!(
                    "is for a column role \"{role}\" that {} does not have; its text columns \
                     are {}",
                    cfg.data.train.display(),
                    text_roles(train).join(", ")
                ),
            ));
        }
    }
    let prompt_of = |role: &str| chosen.get(role).map(|name| prompts[name].clone());
    train.prompts = text_roles(train).iter().map(|r| prompt_of(r)).collect();
    if let Some(dev) = dev {
        dev.prompts = text_roles(dev)
            .iter()
            .map(|r| prompt_of(r).or_else(|| default.clone()))
            .collect();
    }
    Ok(())
}

/// A distillation file's teacher embeddings must be as wide as the model's (the reader has
/// checked that they are all as wide as the first).
fn check_teacher_width(set: &Dataset, width: usize) -> Result<()> {
    match set
        .rows
        .first()
        .and_then(|r| Some((r.line, r.teacher.as_ref()?.len())))
    {
        Some((line, w)) if w != width => Err(Error::data(
            &set.path,
            line,
            format!(
                "the embedding has {w} numbers, but the model's embeddings have {width}; \
                 the teacher's dimension must equal the model's"
            ),
        )),
        _ => Ok(()),
    }
}

/// Tokenizes every text of every row once, before training, each after its column's prompt.
fn tokenize(tokenizer: &TextTokenizer, set: &Dataset) -> Result<TokenizedData> {
    let columns = set.shape.text_columns();
    let mut per_col = Vec::new();
    let mut prompt_tokens = Vec::new();
    for c in 0..columns {
        let prompt = set.prompt(c).unwrap_or("");
        let texts: Vec<String> = set
            .rows
            .iter()
            .map(|r| format!("{prompt}{}", r.texts[c]))
            .collect();
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        per_col.push(tokenizer.encode(&texts)?);
        prompt_tokens.push(match prompt {
            "" => 0,
            p => tokenizer.prompt_length(p)?,
        });
    }
    let tokens = (0..set.len())
        .map(|r| (0..columns).map(|c| per_col[c][r].clone()).collect())
        .collect();
    Ok(TokenizedData {
        tokens,
        scores: set.rows.iter().map(|r| r.score).collect(),
        teachers: set.rows.iter().filter_map(|r| r.teacher.clone()).collect(),
        columns,
        prompt_tokens,
    })
}

/// What the model card says about the run besides the config and the run's own files.
struct RunInfo {
    train_rows: usize,
    columns: &'static [&'static str],
    started: Instant,
}

/// Saves `output.dir/final` with the training curves (`training.png`, also beside it) and the
/// run state a repeated run starts from.
fn save_final(
    model: &SentenceModel,
    cfg: &Config,
    info: &RunInfo,
    step: usize,
    status: &str,
    micro: usize,
    max_micro: usize,
) -> Result<()> {
    let out = &cfg.output.dir;
    // The picture is a by-product: failing to draw it must not fail the run.
    let curves = match crate::plot::training(out) {
        Ok(png) => Some(png),
        Err(e) => {
            eprintln!(
                "warning: training.png not drawn ({e}); `st-tune plot {}` draws it",
                out.display()
            );
            None
        }
    };
    let dir = out.join("final");
    save(
        model,
        cfg,
        info,
        &dir,
        step,
        status,
        micro,
        curves.is_some(),
    )?;
    if let Some(png) = curves {
        let bytes = std::fs::read(&png).map_err(|e| Error::io(&png, e))?;
        crate::atomic::write_file(&dir.join("training.png"), &bytes)?;
    }
    RunState { micro, max_micro }.write(out)
}

/// Saves the model with a model card saying how it was trained (`card.rs`).
#[allow(clippy::too_many_arguments)]
fn save(
    model: &SentenceModel,
    cfg: &Config,
    info: &RunInfo,
    dir: &Path,
    step: usize,
    status: &str,
    micro: usize,
    curves: bool,
) -> Result<()> {
    let card = card::render(&card::Facts {
        cfg,
        dir,
        step,
        status,
        max_seq_length: model.spec.max_seq_length,
        train_rows: info.train_rows,
        columns: info.columns,
        micro_batch: micro,
        seconds: info.started.elapsed().as_secs_f64(),
        curves,
    });
    model.save(dir, &card)
}

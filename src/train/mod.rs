//! `train(config) -> Summary`: the fine-tuning loop, top to bottom.
//!
//! Per optimizer step, in order: learning rate from the schedule; gradients over the step's
//! micro-batches (`step.rs`, which survives OOM); clip; AdamW update (retried on OOM without
//! recomputing gradients); memory policy bookkeeping (regrow); log; evaluate and save the best.

pub mod eval;
pub mod measure;
pub mod optim;
pub mod precision;
pub mod recompute;
pub mod report;
pub mod schedule;
pub mod step;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::config::{Config, MicroBatch, Precision};
use crate::data::batch::{epoch_order, longest_first};
use crate::data::read::read_dataset;
use crate::data::tokenize::TextTokenizer;
use crate::data::{Dataset, RowShape};
use crate::error::{Error, Result};
use crate::losses;
use crate::memory::oom::{is_oom, Injector, Phase};
use crate::memory::policy::{Action, Event, MemState, RunState};
use crate::memory::{alloc, MemoryBudget};
use crate::model::weights::Freeze;
use crate::model::SentenceModel;
use eval::{evaluate, Correlation};
use optim::{clip_grad_norm, AdamW};
use precision::LossScaler;
use report::{Output, Reporter, StepLog};
use schedule::LinearSchedule;
use step::{OomEvent, StepRunner, TokenizedData};

/// How a run talks to its caller.
#[derive(Clone)]
pub struct RunOptions {
    pub output: Output,
    /// Set by the Ctrl-C handler; the loop stops after the current step and saves.
    pub interrupt: Arc<AtomicBool>,
    /// OOMs to inject, as `ST_TUNE_INJECT_OOM` takes them (the CLI passes that variable on).
    pub inject_oom: Option<String>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            output: Output::Quiet,
            interrupt: Arc::new(AtomicBool::new(false)),
            inject_oom: None,
        }
    }
}

/// The end-of-run report (also printed as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: usize,
    pub dev_before: Option<Correlation>,
    pub dev_after: Option<Correlation>,
    pub best_spearman: Option<f64>,
    pub train_seconds: f64,
    pub samples_per_s: f64,
    pub final_loss: f32,
    pub ooms_recovered: usize,
    pub final_micro_batch_size: usize,
    pub peak_memory: u64,
    pub output_dir: PathBuf,
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
        embeddings: cfg.train.freeze_embeddings,
        layers: cfg.train.freeze_layers,
    };
    let mut model = SentenceModel::load(&cfg.model.path, &device, Some(freeze))?;
    if let Some(max) = cfg.model.max_seq_length {
        model.set_max_seq_length(max)?;
    }
    let train_set = read_dataset(
        &cfg.data.train,
        cfg.data.format,
        cfg.data.columns.as_ref(),
        cfg.data.limit,
    )?;
    losses::check_fits(cfg.train.loss, train_set.shape)?;
    let dev_set = match &cfg.data.dev {
        Some(p) => Some(read_dev(p, cfg)?),
        None => None,
    };
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
    let micro = match t.micro_batch() {
        MicroBatch::Size(n) => n,
        MicroBatch::Auto => t.batch_size,
    };
    let (budget_bytes, budget_source) = match budget.limit {
        Some(b) => (
            b,
            match &cfg.memory.limit {
                Some(l) => format!("memory.limit = {l:?}"),
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
    let loaded = load(cfg)?;
    let budget = MemoryBudget::new(cfg.memory.limit.as_deref(), &loaded.model.device)?;
    let planned = plan(cfg, &loaded, &budget)?;
    let Loaded {
        model,
        train_set,
        dev_set,
        mut data,
    } = loaded;
    let t = &cfg.train;

    let out_dir = &cfg.output.dir;
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let steps_per_epoch = train_set.len().div_ceil(t.batch_size);
    let total = t.max_steps.unwrap_or(steps_per_epoch * t.epochs);
    let schedule = LinearSchedule::new(t.lr, t.warmup_ratio, total);
    let mut reporter = Reporter::new(out_dir, opts.output, total)?;
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
    let micro = match RunState::read(&cfg.output.dir) {
        Some(s) if s.max_micro == micro && s.micro < micro => {
            reporter.message(&format!(
                "starting at micro-batch {} (the last run in this folder ended there)",
                s.micro
            ));
            s.micro
        }
        _ => micro,
    };
    let mut mem = MemState::new(micro, cfg.memory.regrow_after);
    mem.max_micro = match t.micro_batch() {
        MicroBatch::Size(n) => n,
        MicroBatch::Auto => t.batch_size,
    };
    let mut scaler = LossScaler::new(t.precision);
    let mut runner = StepRunner::new(&model, t, &budget, &injector)?;
    let mut levers = Levers {
        precision: t.precision,
        checkpointing: t.gradient_checkpointing,
        max_seq_length: model.tokenizer.max_seq_length,
    };
    let mut optimizer = AdamW::new(t.weight_decay);
    reporter.message(&format!(
        "training {} ({} trainable parameters) on {} rows of {}: {} steps of {} rows, micro-batch {}",
        cfg.model.path,
        model.params.trainable_count(),
        train_set.len(),
        cfg.data.train.display(),
        total,
        t.batch_size,
        micro
    ));

    let dev_eval = |m: &SentenceModel| {
        dev_set
            .as_ref()
            .map(|d| evaluate(m, d, EVAL_BATCH))
            .transpose()
    };
    let dev_before = dev_eval(&model)?;
    if let Some(c) = &dev_before {
        reporter.eval(0, "before", c);
    }
    let mut best = dev_before.map(|c| c.spearman);

    let lengths: Vec<usize> = data
        .tokens
        .iter()
        .map(|cols| cols.iter().map(Vec::len).max().unwrap_or(0))
        .collect();
    let mut order = Vec::new();
    let mut events: Vec<OomEvent> = Vec::new();
    let (mut last_loss, mut samples, mut window_start) = (0f32, 0usize, Instant::now());
    let started = Instant::now();
    alloc::reset_peak();
    let mut peak_memory = 0u64;

    for step in 0..total {
        let epoch = step / steps_per_epoch;
        let in_epoch = step % steps_per_epoch;
        if in_epoch == 0 {
            order = epoch_order(
                &lengths,
                t.batch_size,
                t.seed,
                epoch as u64,
                cfg.data.group_by_length,
            );
            if epoch == 0 {
                longest_first(&mut order, &lengths, t.batch_size);
            }
        }
        let rows =
            &order[in_epoch * t.batch_size..((in_epoch + 1) * t.batch_size).min(order.len())];
        let lr = schedule.lr(step);

        let mut out = loop {
            let grads = runner.gradients(&data, rows, step as u64, &mut mem, &mut events);
            for e in events.drain(..) {
                reporter.oom(&e);
            }
            match grads {
                Ok(o) => break o,
                Err(e @ Error::OutOfMemory(_)) => match mem.escalate(&cfg.memory.escalate) {
                    // Pull the next allowed lever and retry the same step from scratch.
                    Some(lever) => {
                        levers.pull(
                            lever,
                            &mut runner,
                            &mut scaler,
                            &mut data,
                            &model,
                            &train_set,
                        )?;
                        reporter.escalated(step + 1, lever);
                    }
                    None => {
                        save_final(
                            &model,
                            cfg,
                            step,
                            "stopped: out of memory",
                            1,
                            mem.max_micro,
                        )?;
                        return Err(e);
                    }
                },
                Err(e) => return Err(e),
            }
        };
        // f16: unscale, and skip the update if a gradient overflowed (the scale halves).
        if scaler.unscale(&mut out.grads)? {
            clip_grad_norm(&mut out.grads, t.max_grad_norm)?;
            apply_update(
                &mut optimizer,
                &model,
                &out.grads,
                lr,
                step as u64,
                &injector,
                &budget,
                &mut mem,
                &mut reporter,
            )?;
        } else {
            reporter.skipped(step + 1, scaler.scale);
        }
        runner.loss_scale = scaler.scale;
        drop(out.grads);
        if let Action::Regrow { micro } = mem.decide(Event::StepDone) {
            reporter.message(&format!(
                "step {step}: {} clean steps, trying micro-batch {micro}",
                cfg.memory.regrow_after
            ));
        }

        peak_memory = peak_memory.max(alloc::peak() as u64);
        last_loss = out.loss;
        samples += rows.len();
        let done = step + 1;
        let log_now = done % t.log_steps.max(1) == 0 || done == total;
        let secs = window_start.elapsed().as_secs_f64();
        reporter.step(
            &StepLog {
                step: done,
                epoch,
                loss: out.loss,
                lr,
                samples_per_s: samples as f64 / secs.max(1e-9),
                micro_batch_size: mem.micro,
                memory_in_use: budget.in_use(),
            },
            log_now,
        );
        if log_now {
            samples = 0;
            window_start = Instant::now();
        }
        if t.eval_steps > 0 && done % t.eval_steps == 0 && done < total {
            if let Some(c) = dev_eval(&model)? {
                reporter.eval(done, "periodic", &c);
                if cfg.output.save_best && best.is_none_or(|b| c.spearman > b) {
                    best = Some(c.spearman);
                    save(
                        &model,
                        &out_dir.join("best"),
                        cfg,
                        done,
                        &format!("best dev Spearman {:.4}", c.spearman),
                    )?;
                }
            }
        }
        if opts.interrupt.load(Ordering::SeqCst) {
            reporter.finish();
            save_final(
                &model,
                cfg,
                done,
                "interrupted by Ctrl-C",
                mem.micro,
                mem.max_micro,
            )?;
            return Err(Error::Interrupted);
        }
    }
    let train_seconds = started.elapsed().as_secs_f64();
    reporter.finish();

    let dev_after = dev_eval(&model)?;
    if let Some(c) = &dev_after {
        reporter.eval(total, "after", c);
        if cfg.output.save_best && best.is_none_or(|b| c.spearman >= b) {
            best = Some(c.spearman);
            save(
                &model,
                &out_dir.join("best"),
                cfg,
                total,
                &format!("best dev Spearman {:.4}", c.spearman),
            )?;
        }
    }
    save_final(&model, cfg, total, "finished", mem.micro, mem.max_micro)?;
    let rows_seen = (total * t.batch_size).min(total.div_ceil(steps_per_epoch) * train_set.len());
    Ok(Summary {
        steps: total,
        dev_before,
        dev_after,
        best_spearman: best,
        train_seconds,
        samples_per_s: rows_seen as f64 / train_seconds.max(1e-9),
        final_loss: last_loss,
        ooms_recovered: mem.recovered,
        final_micro_batch_size: mem.micro,
        peak_memory,
        output_dir: out_dir.clone(),
    })
}

/// The AdamW update, retried on OOM: tensors already updated are not updated twice.
#[allow(clippy::too_many_arguments)]
fn apply_update(
    opt: &mut AdamW,
    model: &SentenceModel,
    grads: &optim::Grads,
    lr: f64,
    step: u64,
    injector: &Injector,
    budget: &MemoryBudget,
    mem: &mut MemState,
    reporter: &mut Reporter,
) -> Result<()> {
    let mut done = Default::default();
    let mut tries = 0;
    loop {
        let r = opt.step(&model.params.vars, grads, lr, &mut done, || {
            injector.check(step, Phase::Optimizer)?;
            budget.check("optimizer update")
        });
        match r {
            Ok(()) => return Ok(()),
            // The update holds no micro-batch to shrink: retry once what is left of it.
            Err(e) if is_oom(&e) && tries == 0 => {
                tries += 1;
                mem.recovered += 1;
                reporter.oom(&OomEvent {
                    step,
                    phase: Phase::Optimizer,
                    micro_before: mem.micro,
                    micro_after: mem.micro,
                    memory_in_use: budget.in_use(),
                    limit: budget.limit,
                });
            }
            Err(e) if is_oom(&e) => {
                return Err(Error::OutOfMemory(format!(
                    "step {step}: the optimizer update does not fit ({e}). Consider raising \
                     memory.limit or setting train.freeze_layers to train fewer tensors"
                )))
            }
            Err(e) => return Err(e),
        }
    }
}

fn read_dev(path: &Path, cfg: &Config) -> Result<Dataset> {
    let dev = read_dataset(path, cfg.data.format, None, cfg.data.limit)?;
    if dev.shape != RowShape::Scored {
        return Err(Error::config(
            "data.dev",
            format!(
                "{} must hold (sentence1, sentence2, score) rows for evaluation",
                path.display()
            ),
        ));
    }
    Ok(dev)
}

/// The memory levers in force; the OOM handler's escalation changes them mid-run.
struct Levers {
    precision: Precision,
    checkpointing: bool,
    max_seq_length: usize,
}

impl Levers {
    fn pull(
        &mut self,
        lever: &str,
        runner: &mut StepRunner,
        scaler: &mut LossScaler,
        data: &mut TokenizedData,
        model: &SentenceModel,
        set: &Dataset,
    ) -> Result<()> {
        match lever {
            "gradient_checkpointing" => self.checkpointing = true,
            "bf16" => self.precision = Precision::Bf16,
            "f16" => {
                self.precision = Precision::F16;
                *scaler = LossScaler::new(Precision::F16);
                runner.loss_scale = scaler.scale;
            }
            "max_seq_length" => {
                self.max_seq_length = (self.max_seq_length / 2).max(8);
                let mut tok = model.tokenizer.clone();
                tok.set_max_seq_length(self.max_seq_length)?;
                *data = tokenize(&tok, set)?;
            }
            other => {
                return Err(Error::config(
                    "memory.escalate",
                    format!("unknown lever `{other}`"),
                ))
            }
        }
        runner.set_levers(self.precision, self.checkpointing)
    }
}

/// Tokenizes every text of every row once, before training.
fn tokenize(tokenizer: &TextTokenizer, set: &Dataset) -> Result<TokenizedData> {
    let columns = set.shape.text_columns();
    let mut per_col = Vec::new();
    for c in 0..columns {
        let texts: Vec<&str> = set.rows.iter().map(|r| r.texts[c].as_str()).collect();
        per_col.push(tokenizer.encode(&texts)?);
    }
    let tokens = (0..set.len())
        .map(|r| (0..columns).map(|c| per_col[c][r].clone()).collect())
        .collect();
    Ok(TokenizedData {
        tokens,
        scores: set.rows.iter().map(|r| r.score).collect(),
        columns,
    })
}

/// Saves `output.dir/final` and the run state a repeated run starts from.
fn save_final(
    model: &SentenceModel,
    cfg: &Config,
    step: usize,
    status: &str,
    micro: usize,
    max_micro: usize,
) -> Result<()> {
    save(model, &cfg.output.dir.join("final"), cfg, step, status)?;
    RunState { micro, max_micro }.write(&cfg.output.dir)
}

/// Saves the model with a model card saying how it was trained.
fn save(model: &SentenceModel, dir: &Path, cfg: &Config, step: usize, status: &str) -> Result<()> {
    let t = &cfg.train;
    let card = format!(
        "---\nlibrary_name: sentence-transformers\ntags:\n- sentence-transformers\n- st-tune\n---\n\n\
         # Fine-tuned with st-tune\n\nBase model: `{}`. Trained on `{}` with the `{}` loss for {step} \
         optimizer steps ({status}).\n\n| setting | value |\n| --- | --- |\n| batch size | {} |\n\
         | learning rate | {} (warmup ratio {}, linear decay) |\n| weight decay | {} |\n\
         | max grad norm | {} |\n| max_seq_length | {} |\n| seed | {} |\n\n\
         Load it with `SentenceTransformer(\"{}\")`.\n",
        cfg.model.path,
        cfg.data.train.display(),
        t.loss,
        t.batch_size,
        t.lr,
        t.warmup_ratio,
        t.weight_decay,
        t.max_grad_norm,
        model.spec.max_seq_length,
        t.seed,
        dir.display()
    );
    model.save(dir, &card)
}

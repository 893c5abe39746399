//! One training run in the order it happens: [`Opened::open`] loads and checks everything that
//! can fail on bad input; [`Run::start`] resumes or evaluates the model before training;
//! [`Run::step`] is one optimizer step and what ends a run inside one; [`Run::after_step`] logs,
//! evaluates and keeps the best, prunes, checkpoints and answers signals; [`Run::finish`]
//! evaluates, saves `final/` and sums up.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::config::{Config, LossKind, Metric, MicroBatch};
use crate::data::batch::{text_ids, EpochBatches};
use crate::data::mix::{MixedBatch, MixedEpochs};
use crate::data::tokenized::TokenizedData;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::lock::Lock;
use crate::losses::Loss;
use crate::memory::oom::Injector;
use crate::memory::policy::MemState;
use crate::memory::{alloc, MemoryBudget};
use crate::model::SentenceModel;
use crate::train::checkpoint::{self, Progress, Restored, RunState};
use crate::train::eval::{evaluate_widths, DevScores, Scores};
use crate::train::precision::LossScaler;
use crate::train::report::{Reporter, StepLog};
use crate::train::schedule::LinearSchedule;
use crate::train::step::{Note, SetData, StepAt, Stepped, Trainer};
use crate::train::{
    card, checkpoint_to_resume, configured_micro, load, nonfinite, plan, restore, what_would_fit,
    BestDev, Loaded, Plan, Resume, RunOptions, Summary, TrainingSet, EVAL_BATCH,
};

/// What a run works on, loaded and checked before anything trains; the run borrows it.
pub struct Opened<'c> {
    cfg: &'c Config,
    _lock: Lock,
    resume: Resume,
    restored: Option<Restored>,
    model: SentenceModel,
    guide: Option<SentenceModel>,
    sets: Vec<OpenedSet>,
    dev_set: Option<Dataset>,
    budget: MemoryBudget,
    /// The OOMs to inject (`ST_TUNE_INJECT_OOM`, the tests' hook).
    injector: Injector,
    planned: Plan,
}

/// A training set as the run holds it: its rows and loss, and for batching, per row, its
/// longest text in tokens and the ids of its distinct texts.
struct OpenedSet {
    name: String,
    loss: LossKind,
    rows: Dataset,
    lengths: Vec<usize>,
    texts: Vec<Vec<u32>>,
}

impl OpenedSet {
    fn facts(&self) -> card::SetFacts<'_> {
        card::SetFacts {
            name: &self.name,
            path: &self.rows.path,
            rows: self.rows.len(),
            columns: self.rows.shape.roles(),
            loss: self.loss,
        }
    }

    fn new(set: TrainingSet) -> (Self, TokenizedData) {
        let TrainingSet {
            name,
            loss,
            rows,
            data,
        } = set;
        let lengths = data
            .tokens
            .iter()
            .map(|cols| cols.iter().map(Vec::len).max().unwrap_or(0))
            .collect();
        let row_texts: Vec<Vec<&str>> = rows
            .rows
            .iter()
            .map(|r| r.texts.iter().map(String::as_str).collect())
            .collect();
        let texts = text_ids(&row_texts);
        let opened = OpenedSet {
            name,
            loss,
            rows,
            lengths,
            texts,
        };
        (opened, data)
    }
}

impl<'c> Opened<'c> {
    /// Locks the output folder, decides where to start, loads the model and data, plans the
    /// memory and restores a checkpoint's weights; each set's tokenized data is returned apart,
    /// for the trainer to own.
    pub fn open(cfg: &'c Config, opts: &RunOptions) -> Result<(Self, Vec<TokenizedData>)> {
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
        let (lock, resume) = match (early, resume) {
            (Some(lock), Some(resume)) => (lock, resume),
            _ => (
                crate::lock::output_dir(out_dir)?,
                checkpoint_to_resume(cfg, opts.resume)?,
            ),
        };
        let budget = MemoryBudget::new(cfg.memory.limit.as_ref(), &loaded.model.device)?;
        let injector = match &opts.inject_oom {
            Some(spec) => Injector::parse(spec)?,
            None => Injector::default(),
        };
        let planned = plan(cfg, &loaded, &budget)?;
        let restored = match &resume {
            Resume::From { path, fallback } => {
                Some(restore(path, fallback.as_deref(), cfg, &loaded.model)?)
            }
            _ => None,
        };
        let Loaded {
            model,
            guide,
            sets,
            dev_set,
        } = loaded;
        std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
        let (sets, data): (Vec<_>, Vec<_>) = sets.into_iter().map(OpenedSet::new).unzip();
        let opened = Opened {
            cfg,
            _lock: lock,
            resume,
            restored,
            model,
            guide,
            sets,
            dev_set,
            budget,
            injector,
            planned,
        };
        Ok((opened, data))
    }
}

/// Whether the loop goes on after a step.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// The sweep's pruner stopped the run.
    Pruned,
}

/// A run under way: the trainer, what the loop counts between steps, and what it reports.
pub struct Run<'a> {
    o: &'a Opened<'a>,
    opts: &'a RunOptions,
    trainer: Trainer<'a>,
    progress: Progress,
    reporter: Reporter,
    saver: Saver<'a>,
    batches: MixedEpochs<'a>,
    epoch_batches: Vec<MixedBatch>,
    schedule: LinearSchedule,
    /// The first step this process runs (a resumed run's checkpoint step) and the last + 1.
    pub first: usize,
    pub total: usize,
    /// Since the last logged step: rows trained and when the window began.
    samples: usize,
    window_start: Instant,
    rows_trained: usize,
    last_loss: f32,
    peak_memory: u64,
    /// Set when the pruner stops the run: the evaluation at the rung, if any.
    pruned: Option<Option<Scores>>,
    engine: String,
}

impl<'a> Run<'a> {
    /// Batches, schedule, reporter and trainer; then the checkpoint's optimizer state and
    /// levers, or (from scratch) the evaluation before training.
    pub fn start(
        o: &'a Opened<'a>,
        data: Vec<TokenizedData>,
        opts: &'a RunOptions,
    ) -> Result<Self> {
        let (cfg, t) = (o.cfg, &o.cfg.train);
        let out_dir = &cfg.output.dir;
        // Each set cut into batches on its own (its loss picks its sampler), then mixed.
        let per_set = o.sets.iter().map(|s| {
            let group = cfg.data.group_by_length;
            let sampler = t.batch_sampler_for(s.loss);
            EpochBatches::new(&s.lengths, &s.texts, t.batch_size, t.seed, group, sampler)
        });
        let mut batches = MixedEpochs::new(per_set.collect(), cfg.data.sampler, t.seed);
        let total = t.max_steps.unwrap_or_else(|| batches.steps(t.epochs));
        let resumed_at = o.restored.as_ref().map(|r| r.progress.step);
        let reporter = Reporter::new(out_dir, opts.output, total, resumed_at)?;
        let engine = crate::engine::describe(&o.model.device);
        reporter.message(&format!("engine: {engine}"));
        if let Resume::NothingYet = o.resume {
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
        let micro = first_micro(o, &reporter)?;
        let sets = o.sets.iter().zip(data).map(|(s, data)| SetData {
            data,
            texts: Some(&s.rows),
            loss: Loss {
                kind: s.loss,
                ..Loss::from_train(t)
            },
            guide_tokens: None,
        });
        let (escalate, budget) = (&cfg.memory.escalate, &o.budget);
        let sets = sets.collect();
        let mut trainer = Trainer::on_sets(&o.model, t, escalate, budget, &o.injector, sets)?
            .with_guide(o.guide.as_ref())?;
        if let Some(spec) = &opts.inject_nonfinite {
            trainer.inject_nonfinite = nonfinite::parse_injection(spec)?;
        }
        let mut run = Run {
            o,
            opts,
            trainer,
            progress: Progress {
                step: 0,
                scaler: LossScaler::new(t.precision),
                mem: MemState::new(micro, configured_micro(t), cfg.memory.regrow_after),
                best: None,
                dev_before: None,
                nonfinite_streak: 0,
            },
            reporter,
            saver: Saver {
                model: &o.model,
                cfg,
                sets: o.sets.iter().map(OpenedSet::facts).collect(),
                started: Instant::now(),
                curves: opts.curves,
            },
            batches,
            epoch_batches: Vec::new(),
            schedule: LinearSchedule::new(t.lr, t.warmup_ratio, total),
            first: resumed_at.unwrap_or(0),
            total,
            samples: 0,
            window_start: Instant::now(),
            rows_trained: 0,
            last_loss: 0.0,
            peak_memory: 0,
            pruned: None,
            engine,
        };
        run.resume_or_evaluate()?;
        run.reporter.message(&format!(
            "training {} ({} trainable parameters) on {} rows of {}: {} steps of {} rows, micro-batch {}",
            cfg.model.path,
            o.model.params.trainable_count(),
            o.sets.iter().map(|s| s.rows.len()).sum::<usize>(),
            cfg.data.train.describe(),
            total,
            t.batch_size,
            run.progress.mem.micro
        ));
        run.saver.started = Instant::now();
        run.window_start = run.saver.started;
        alloc::reset_peak();
        Ok(run)
    }

    /// A resumed run takes its checkpoint's levers, optimizer state and progress; a fresh run
    /// evaluates the model before training (its figure is the best so far).
    fn resume_or_evaluate(&mut self) -> Result<()> {
        match &self.o.restored {
            Some(r) => {
                // The levers the OOM handler had pulled, in the order it pulled them.
                for &lever in &self.o.cfg.memory.escalate[..r.progress.mem.escalated] {
                    self.trainer.pull(lever)?;
                }
                let rows = r
                    .rows
                    .lock()
                    .map(|mut rows| std::mem::take(&mut *rows))
                    .map_err(|_| Error::Internal("restored row moments poisoned".into()))?;
                self.trainer
                    .optimizer
                    .restore(r.adam_step, r.moments.clone(), rows);
                self.progress = r.progress.clone();
                self.reporter.resumed(self.first, &r.path);
                self.reporter.start_at(self.first);
            }
            None => {
                let dev = self.evaluate(true)?;
                if let Some(d) = &dev {
                    self.reporter.eval(0, "before", &d.full, &d.widths);
                }
                self.progress.dev_before = dev.map(|d| d.full);
                self.progress.best = self
                    .progress
                    .dev_before
                    .as_ref()
                    .and_then(|c| c.chosen(self.metric()))
                    .map(|(_, value)| value);
            }
        }
        Ok(())
    }

    /// One optimizer step on step `step`'s rows; its loss. Ends the run with an error when the
    /// loss has been non-finite too many steps in a row, or when nothing fits.
    pub fn step(&mut self, step: usize) -> Result<f32> {
        let (cfg, t) = (self.o.cfg, &self.o.cfg.train);
        let (epoch, in_epoch) = self.batches.locate(step);
        // The batches are a function of (seed, epoch): a resumed run rebuilds them mid-epoch.
        if in_epoch == 0 || step == self.first {
            self.epoch_batches = self.batches.epoch(epoch);
        }
        let batch = &self.epoch_batches[in_epoch];
        let at = StepAt {
            step: step as u64,
            set: batch.set,
            rows: &batch.rows,
            lr: self.schedule.lr(step),
        };
        let mut last_nonfinite = None;
        let reporter = &mut self.reporter;
        let mut note = |note: Note| {
            if let Note::NonFinite(e) = &note {
                last_nonfinite = Some(e.clone());
            }
            report(reporter, step + 1, note)
        };
        let (scaler, mem) = (&mut self.progress.scaler, &mut self.progress.mem);
        let loss = match self.trainer.optimizer_step(at, scaler, mem, &mut note)? {
            Stepped::Done { loss } => {
                self.progress.nonfinite_streak = 0;
                loss
            }
            Stepped::NonFinite { loss } => {
                self.progress.nonfinite_streak += 1;
                let streak = self.progress.nonfinite_streak;
                if streak >= t.max_nonfinite_steps {
                    // Nothing is saved: the weights are those of the last good update, but
                    // they are what made these steps non-finite.
                    self.reporter.finish();
                    let last = last_nonfinite.expect("a skipped step is reported");
                    let newest = checkpoint::list(&cfg.output.dir)?.pop().map(|(_, p)| p);
                    let newest = newest.map(|p| p.display().to_string());
                    return Err(nonfinite::diverged(t, streak, &last, newest.as_deref()));
                }
                loss
            }
            Stepped::NothingFits(unfit) if !unfit.weights_intact() => {
                // An update cut short leaves some tensors updated and others not: a model of no
                // step, so nothing is saved; the newest checkpoint is the one to go back to.
                self.reporter.finish();
                return Err(Error::OutOfMemory(unfit.to_string()));
            }
            Stepped::NothingFits(unfit) => {
                // The weights are the last update's: saved as final/, with the run state a
                // repeated run starts from.
                let max_micro = self.progress.mem.max_micro;
                let at = SavePoint {
                    step,
                    status: "stopped: out of memory",
                    micro: 1,
                };
                self.saver.save_final(&at, max_micro)?;
                let lengths = self.o.sets.iter().flat_map(|s| &s.lengths);
                let longest = lengths.copied().max().unwrap_or(1);
                let columns = self.trainer.columns();
                let (model, budget) = (&self.o.model, &self.o.budget);
                let advice = what_would_fit(model, t, columns, max_micro, longest, budget)?;
                return Err(Error::OutOfMemory(format!("{unfit}. {advice}")));
            }
        };
        self.peak_memory = self.peak_memory.max(alloc::peak() as u64);
        self.last_loss = loss;
        let (set, rows) = (at.set, at.rows.len());
        self.samples += rows;
        self.rows_trained += rows;
        self.progress.step = step + 1;
        self.log(epoch as usize, set, at.lr, loss);
        Ok(loss)
    }

    /// The step's log line, every `train.log_steps` steps and at the last; with several
    /// training sets it names the set the step's rows (and so its loss) came from.
    fn log(&mut self, epoch: usize, set: usize, lr: f64, loss: f32) {
        let done = self.progress.step;
        let log_now = done.is_multiple_of(self.o.cfg.train.log_steps.max(1)) || done == self.total;
        let secs = self.window_start.elapsed().as_secs_f64();
        let log = StepLog {
            step: done,
            epoch,
            loss,
            dataset: (self.o.sets.len() > 1).then(|| self.o.sets[set].name.clone()),
            lr,
            samples_per_s: self.samples as f64 / secs.max(1e-9),
            micro_batch_size: self.progress.mem.micro,
            memory_in_use: self.o.budget.in_use(),
            memory_limit: self.o.budget.limit,
        };
        self.reporter.step(&log, log_now);
        if log_now {
            self.samples = 0;
            self.window_start = Instant::now();
        }
    }

    /// After step `step` (0-based): evaluate and keep the best, prune, checkpoint, and stop
    /// on a signal (with a checkpoint and `final/`).
    pub fn after_step(&mut self, step: usize, loss: f32) -> Result<Next> {
        let (cfg, t) = (self.o.cfg, &self.o.cfg.train);
        let done = step + 1;
        let mut dev_now = None;
        if t.eval_steps > 0 && done.is_multiple_of(t.eval_steps) && done < self.total {
            checkpoint::crash_point("eval", done);
            let dev = self.evaluate(true)?;
            if let Some(d) = &dev {
                self.reporter.eval(done, "periodic", &d.full, &d.widths);
            }
            dev_now = dev.map(|d| d.full);
            if let Some(c) = &dev_now {
                self.consider_best(c, done)?;
            }
        }
        if self.prune(step, loss, &mut dev_now)? {
            self.pruned = Some(dev_now);
            return Ok(Next::Pruned);
        }
        let signal = self.opts.interrupt.load(Ordering::SeqCst);
        let every = cfg.output.checkpoint_steps;
        // No checkpoint amid non-finite steps: the newest stays one taken before them.
        let periodic = every > 0 && (done.is_multiple_of(every) || done == self.total);
        if signal != 0 || (periodic && self.progress.nonfinite_streak == 0) {
            let vars = &self.o.model.params.vars;
            let optimizer = &self.trainer.optimizer;
            let staged = checkpoint::stage(&cfg.output.dir, &self.progress, cfg, vars, optimizer)?;
            // Logged before it is published: a kill in between leaves a line for a step after
            // the newest checkpoint, which --resume drops.
            self.reporter.checkpoint(done, staged.path());
            staged.publish(cfg.output.keep_checkpoints)?;
        }
        if signal != 0 {
            self.reporter.interrupted(done, signal);
            self.reporter.finish();
            let mem = &self.progress.mem;
            let at = SavePoint {
                step: done,
                status: &format!("interrupted by signal {signal}"),
                micro: mem.micro,
            };
            self.saver.save_final(&at, mem.max_micro)?;
            return Err(Error::Interrupted { signal });
        }
        Ok(Next::Continue)
    }

    /// At a rung the pruner marks, reports the run's figure (evaluating if `dev_now` has none);
    /// whether the pruner stops the run.
    fn prune(&mut self, step: usize, loss: f32, dev_now: &mut Option<Scores>) -> Result<bool> {
        let Some(p) = &self.opts.pruner else {
            return Ok(false);
        };
        let batch = self.o.cfg.train.batch_size;
        let rows = (step * batch, (step + 1) * batch);
        let Some(k) = p.rung_crossed(rows.0, rows.1) else {
            return Ok(false);
        };
        if dev_now.is_none() && p.metric() != "loss" {
            *dev_now = self.evaluate(false)?.map(|d| d.full);
        }
        let value = match p.metric() {
            "loss" => Some(loss as f64),
            name => dev_now.as_ref().and_then(|c| c.figure(name)),
        };
        let Some(v) = value.filter(|v| v.is_finite()) else {
            return Ok(false);
        };
        let stop = p.report(k, rows.1, v)?;
        if stop {
            self.reporter.pruned(step + 1, rows.1, v);
        }
        Ok(stop)
    }

    /// Saves `best/` when `scores` are at least as good as the best so far. A tie goes to the
    /// later model: it has trained longer for the same figure, and the rule is the same for a
    /// periodic and the final evaluation.
    fn consider_best(&mut self, scores: &Scores, step: usize) -> Result<()> {
        let (name, value) = scores.chosen(self.metric()).unwrap_or_default();
        let cfg = self.o.cfg;
        if cfg.output.save_best && self.progress.best.is_none_or(|b| value >= b) {
            self.progress.best = Some(value);
            let at = SavePoint {
                step,
                status: &format!("best dev {name} {value:.4}"),
                micro: self.progress.mem.micro,
            };
            self.saver.save(&cfg.output.dir.join("best"), &at, false)?;
        }
        Ok(())
    }

    /// The last evaluation (the pruner's, for a pruned run), `best/` and `final/`, and the
    /// summary.
    pub fn finish(mut self) -> Result<Summary> {
        let train_seconds = self.saver.started.elapsed().as_secs_f64();
        self.reporter.finish();
        let steps = self.progress.step;
        let was_pruned = self.pruned.is_some();
        let (dev_after, dev_after_dims) = match self.pruned.take() {
            Some(at_rung) => (at_rung, Vec::new()),
            None => match self.evaluate(true)? {
                Some(DevScores { full, widths }) => (Some(full), widths),
                None => (None, Vec::new()),
            },
        };
        if let (Some(c), false) = (&dev_after, was_pruned) {
            self.reporter.eval(self.total, "after", c, &dev_after_dims);
            self.consider_best(c, self.total)?;
        }
        let mem = &self.progress.mem;
        let at = SavePoint {
            step: steps,
            status: match was_pruned {
                true => "stopped early by the sweep's pruner",
                false => "finished",
            },
            micro: mem.micro,
        };
        self.saver.save_final(&at, mem.max_micro)?;
        let metric = dev_after
            .as_ref()
            .and_then(|c| c.chosen(self.metric()))
            .map(|(name, _)| name);
        let best = self.progress.best;
        Ok(Summary {
            steps,
            resumed_from: (self.first > 0).then_some(self.first),
            pruned_at: was_pruned.then_some(steps),
            dev_before: self.progress.dev_before.clone(),
            dev_after,
            dev_after_dims: dev_after_dims.into_iter().collect(),
            best_spearman: best.filter(|_| metric.as_deref() == Some("spearman")),
            best_dev: metric
                .zip(best)
                .map(|(metric, value)| BestDev { metric, value }),
            train_seconds,
            samples_per_s: self.rows_trained as f64 / train_seconds.max(1e-9),
            final_loss: self.last_loss,
            ooms_recovered: mem.recovered,
            final_micro_batch_size: mem.micro,
            peak_memory: self.peak_memory,
            engine: self.engine.clone(),
            planned: self.o.planned.estimate,
            output_dir: self.o.cfg.output.dir.clone(),
        })
    }

    /// `train.metric`, if set.
    fn metric(&self) -> Option<&'static str> {
        self.o.cfg.train.metric.map(Metric::as_str)
    }

    /// The dev figures, with those at each `train.matryoshka_dims` width when `widths`.
    fn evaluate(&self, widths: bool) -> Result<Option<DevScores>> {
        let dims = match (widths, &self.o.cfg.train.matryoshka_dims) {
            (true, Some(d)) => &d[..],
            _ => &[],
        };
        let model = &self.o.model;
        let dev = self.o.dev_set.as_ref();
        dev.map(|d| evaluate_widths(model, d, EVAL_BATCH, dims))
            .transpose()
    }
}

/// The micro-batch the first step runs at: the configured size or the planner's pick, or
/// smaller where the last run in this folder ended smaller.
fn first_micro(o: &Opened, reporter: &Reporter) -> Result<usize> {
    let micro = match o.cfg.train.micro_batch() {
        MicroBatch::Size(n) => n,
        // The planner's pick (one row if not even that fits: the OOM handler takes over).
        MicroBatch::Auto => o.planned.largest_fitting_micro_batch.unwrap_or(1),
    };
    // A repeated run starts from the micro-batch the last one ended with, if that was smaller.
    Ok(match RunState::read(&o.cfg.output.dir)? {
        Some(s) if o.restored.is_none() && s.max_micro == micro && s.micro < micro => {
            reporter.message(&format!(
                "starting at micro-batch {} (the last run in this folder ended there)",
                s.micro
            ));
            s.micro
        }
        _ => micro,
    })
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

/// Where a saved model's card places it in the run.
struct SavePoint<'s> {
    step: usize,
    status: &'s str,
    /// The micro-batch the run was at.
    micro: usize,
}

/// Saves the model with a model card saying how it was trained (`card.rs`): `best/` and
/// `final/`.
struct Saver<'a> {
    model: &'a SentenceModel,
    cfg: &'a Config,
    sets: Vec<card::SetFacts<'a>>,
    /// When training began (the card's training time).
    started: Instant,
    curves: Option<fn(&Path) -> Result<PathBuf>>,
}

impl Saver<'_> {
    fn save(&self, dir: &Path, at: &SavePoint, curves: bool) -> Result<()> {
        let card = card::render(&card::Facts {
            cfg: self.cfg,
            dir,
            step: at.step,
            status: at.status,
            max_seq_length: self.model.spec.max_seq_length,
            sets: &self.sets,
            micro_batch: at.micro,
            seconds: self.started.elapsed().as_secs_f64(),
            curves,
        });
        self.model.save(dir, &card)
    }

    /// Saves `output.dir/final` with the training curves (`training.png`, also beside it) and
    /// the run state a repeated run starts from (`max_micro`: the configured micro-batch).
    fn save_final(&self, at: &SavePoint, max_micro: usize) -> Result<()> {
        let out = &self.cfg.output.dir;
        // The picture is a by-product: failing to draw it must not fail the run.
        let curves = match self.curves.map(|draw| draw(out)) {
            None => None,
            Some(Ok(png)) => Some(png),
            Some(Err(e)) => {
                eprintln!(
                    "warning: training.png not drawn ({e}); `st-tune plot {}` draws it",
                    out.display()
                );
                None
            }
        };
        let dir = out.join("final");
        self.save(&dir, at, curves.is_some())?;
        if let Some(png) = curves {
            let bytes = std::fs::read(&png).map_err(|e| Error::io(&png, e))?;
            crate::atomic::write_file(&dir.join("training.png"), &bytes)?;
        }
        RunState {
            micro: at.micro,
            max_micro,
        }
        .write(out)
    }
}

//! `train(config) -> Summary`: the fine-tuning loop, top to bottom.
//!
//! Per optimizer step, in order: the rows and learning rate; the optimizer step itself
//! (`step.rs`: gradients over micro-batches, unscale, clip, AdamW, and everything done about
//! an OOM); log; evaluate and save the best; prune; checkpoint.

pub mod binary;
pub mod card;
pub mod checkpoint;
pub mod eval;
pub mod guide;
pub mod measure;
pub mod mine;
pub mod nonfinite;
pub mod optim;
pub mod passes;
pub mod precision;
pub mod prune;
pub mod report;
pub mod retrieval;
pub mod row_moments;
pub mod run;
pub mod schedule;
pub mod step;
pub mod summed_rows;
pub mod twins;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI32;
use std::sync::Arc;

use serde::Serialize;

use crate::config::{Config, LossKind, MicroBatch, ResolvedSet, TrainSection};
use crate::data::read::read_dataset;
use crate::data::tokenized::{tokenize, TokenizedData};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::losses;
use crate::memory::MemoryBudget;
use crate::model::weights::Freeze;
use crate::model::SentenceModel;
use eval::Scores;
use prune::Pruner;
use report::Output;
use run::{Next, Opened, Run};

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
    pub pruner: Option<Arc<dyn Pruner + Send + Sync>>,
    /// Draws `training.png` in the output folder from its metrics and returns its path (the
    /// CLI passes `plot::training`, a floor above this one); `None`: no picture.
    pub curves: Option<fn(&Path) -> Result<PathBuf>>,
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
            curves: None,
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
    /// GISTEmbedLoss's guide (`[guide]`), loaded for inference.
    pub guide: Option<SentenceModel>,
    /// `data.train`'s sets, in the config's order (one for a single file).
    pub sets: Vec<TrainingSet>,
    pub dev_set: Option<Dataset>,
}

/// One training set, read, checked and tokenized, with the loss it trains.
pub struct TrainingSet {
    /// How the log and the model card name it (`data.train`'s `name`, or the file's stem).
    pub name: String,
    pub loss: LossKind,
    pub rows: Dataset,
    pub data: TokenizedData,
}

impl Loaded {
    /// The most text columns a row of any set has.
    pub fn columns(&self) -> usize {
        self.sets.iter().map(|s| s.data.columns).max().unwrap_or(1)
    }

    /// How many different token ids the training sets hold: the word-table rows training
    /// touches, whose AdamW moments are kept (`row_moments.rs`).
    pub fn distinct_ids(&self) -> usize {
        let ids = self.sets.iter().flat_map(|s| s.data.distinct_ids());
        ids.collect::<std::collections::HashSet<u32>>().len()
    }

    /// The longest text of any set, in tokens.
    pub fn longest(&self) -> usize {
        let texts = self.sets.iter().flat_map(|s| &s.data.tokens);
        texts
            .flat_map(|r| r.iter().map(Vec::len))
            .max()
            .unwrap_or(1)
    }
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
    let guide = guide::load(&cfg.guide, &device)?;
    let resolved = cfg.data.train.resolve(
        cfg.data.columns.as_ref(),
        cfg.train.loss,
        cfg.data.prompts.as_ref(),
    );
    let mut read = Vec::with_capacity(resolved.len());
    for set in &resolved {
        let columns = set.columns.as_ref();
        let rows = read_dataset(&set.path, cfg.data.format, columns, cfg.data.limit)?;
        losses::check_fits(set.loss, rows.shape, &set.key("loss"), &set.path)?;
        check_teacher_width(&rows, model.spec.embedding_dim())?;
        read.push(rows);
    }
    let mut dev_set = match &cfg.data.dev {
        Some(p) => Some(read_dev(p, cfg)?),
        None => None,
    };
    if let Some(dev) = &dev_set {
        if crate::config::metric::figures(dev.shape).is_empty() {
            return Err(eval::no_evaluation(dev));
        }
    }
    set_prompts(cfg, &mut model, &resolved, &mut read, dev_set.as_mut())?;
    if let Some(metric) = &cfg.train.metric {
        let Some(dev) = &dev_set else {
            return Err(Error::config(
                "train.metric",
                "picks the best model by a dev figure, but data.dev is not set",
            ));
        };
        let figures = crate::config::metric::figures(dev.shape);
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
    let mut sets = Vec::with_capacity(read.len());
    for (set, rows) in resolved.into_iter().zip(read) {
        sets.push(TrainingSet {
            name: set.name,
            loss: set.loss,
            data: tokenize(&model.tokenizer, &rows)?,
            rows,
        });
    }
    Ok(Loaded {
        model,
        guide,
        sets,
        dev_set,
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
    let mut input =
        crate::memory::plan::plan_input(&loaded.model.plan_shape()?, t, loaded.columns())
            .with_touched_word_rows(loaded.distinct_ids());
    if let Some(guide) = &loaded.guide {
        input = input.with_guide(&guide.plan_shape()?);
    }
    let longest = loaded.longest();
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

/// Trains as `cfg` says: the loop, top to bottom (`run.rs` holds each part).
pub fn train(cfg: &Config, opts: &RunOptions) -> Result<Summary> {
    let (opened, data) = Opened::open(cfg, opts)?;
    let mut run = Run::start(&opened, data, opts)?;
    for step in run.first..run.total {
        let loss = run.step(step)?;
        if run.after_step(step, loss)? == Next::Pruned {
            break;
        }
    }
    run.finish()
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
    check_row_moments(path, &r, vars)?;
    Ok(r)
}

/// The moments a checkpoint keeps for a table's touched rows must be of a trained table, as
/// wide as it, and of rows it has.
fn check_row_moments(
    path: &Path,
    r: &checkpoint::Restored,
    vars: &std::collections::BTreeMap<String, candle_core::Var>,
) -> Result<()> {
    let file = path.join("optimizer.safetensors");
    let rows = r
        .rows
        .lock()
        .map_err(|_| Error::Internal("restored row moments poisoned".into()))?;
    for (name, moments) in rows.iter() {
        let dims = vars.get(name).map(|v| v.dims().to_vec());
        let Some(&[table_rows, width]) = dims.as_deref() else {
            return Err(Error::checkpoint(
                &file,
                format!("holds row moments of `{name}`, which this model does not train as a table: it was saved from another model"),
            ));
        };
        let outside = moments.ids().iter().find(|&&id| id as usize >= table_rows);
        if moments.width() != width || outside.is_some() {
            return Err(Error::checkpoint(
                &file,
                format!(
                    "holds moments of `{name}` for rows of width {} (row {:?}), the model's table is {table_rows} × {width}: it was saved from another model",
                    moments.width(),
                    outside
                ),
            ));
        }
    }
    Ok(())
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
    let input = crate::memory::plan::plan_input(&model.plan_shape()?, t, columns);
    Ok(crate::memory::alternatives::advice(
        &input,
        &crate::model::known::smaller_than(&model.spec.model)?,
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

/// Adds `model.prompts` to the model's own and puts the prompts named on the columns: each
/// training set's (its own `prompts`, else `data.prompts`) and the dev set's (`data.prompts`).
/// Dev columns without one get the model's default prompt, as Python's evaluators (which
/// encode without naming a prompt) do; training, as Python's trainer, only the prompts named.
fn set_prompts(
    cfg: &Config,
    model: &mut SentenceModel,
    resolved: &[ResolvedSet],
    train: &mut [Dataset],
    dev: Option<&mut Dataset>,
) -> Result<()> {
    let prompts = &mut model.spec.prompts;
    prompts.extend(cfg.model.prompts.clone().unwrap_or_default());
    let default = model
        .spec
        .default_prompt_name
        .as_ref()
        .map(|n| prompts[n].clone());
    // Every negative column of an n-tuple is prompted as "negative".
    let text_roles = |set: &Dataset| set.shape.prompt_roles();
    let declared = |name: &str, key: &str| -> Result<()> {
        if prompts.contains_key(name) {
            return Ok(());
        }
        let known: Vec<&str> = prompts.keys().map(String::as_str).collect();
        Err(Error::config(
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
        ))
    };
    let missing_role = |key: String, role: &str, set: &Dataset| {
        Error::config(
            key,
            format!(
                "is for a column role \"{role}\" that {} does not have; its text columns \
                 are {}",
                set.path.display(),
                {
                    let mut roles = text_roles(set);
                    roles.dedup();
                    roles.join(", ")
                }
            ),
        )
    };
    // data.prompts: for a role of the dev file or of any training set it applies to.
    let top = cfg.data.prompts.clone().unwrap_or_default();
    let mut top_roles: Vec<&str> = dev.as_deref().map(text_roles).unwrap_or_default();
    for (r, set) in resolved.iter().zip(train.iter()) {
        if r.prompts.as_ref() == cfg.data.prompts.as_ref() {
            top_roles.extend(text_roles(set));
        }
    }
    for (role, name) in &top {
        let key = format!("data.prompts.{role}");
        declared(name, &key)?;
        if !top_roles.contains(&role.as_str()) {
            return Err(missing_role(key, role, &train[0]));
        }
    }
    // A set's own prompts: for roles of that set.
    for (r, set) in resolved.iter().zip(train.iter_mut()) {
        let chosen = r.prompts.clone().unwrap_or_default();
        if r.prompts.as_ref() != cfg.data.prompts.as_ref() {
            for (role, name) in &chosen {
                let key = r.key(&format!("prompts.{role}"));
                if !text_roles(set).contains(&role.as_str()) {
                    return Err(missing_role(key, role, set));
                }
                declared(name, &key)?;
            }
        }
        let prompt_of = |role: &str| chosen.get(role).map(|name| prompts[name].clone());
        set.prompts = text_roles(set).iter().map(|r| prompt_of(r)).collect();
    }
    if let Some(dev) = dev {
        let prompt_of = |role: &str| top.get(role).map(|name| prompts[name].clone());
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

//! One optimizer step, top to bottom ([`Trainer::optimizer_step`]): the gradients over the
//! step's micro-batches (`passes.rs`: plain accumulation or the cached scheme), unscaling (f16),
//! clipping, the AdamW update, and the memory policy's bookkeeping.
//!
//! Every out-of-memory goes to the policy (`memory/policy.rs`, a pure function tested without a
//! model), and this file is the only place that carries out what it decides: retry the same
//! rows at a smaller micro-batch, switch a cut batch-coupled loss to the cached scheme, pull a
//! `memory.escalate` lever, retry the update, regrow, or give up.

use std::collections::BTreeSet;

use crate::config::{Lever, Precision, TrainSection};
use crate::data::tokenized::TokenizedData;
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::losses::Loss;
use crate::memory::guard::Guard;
use crate::memory::oom::{is_oom, Injector, Phase};
use crate::memory::policy::{MemState, OomAction, Scheme, StepAction, StepShape, UpdateAction};
use crate::memory::{human_bytes, MemoryBudget};
use crate::model::SentenceModel;
use crate::train::checkpoint;
use crate::train::nonfinite::{self, NonFinite};
use crate::train::optim::{clip_coefficient, grad_norm, AdamW, Grads};
use crate::train::passes::{Batch, Gradients, Outcome, Pass, Runner};
use crate::train::precision::LossScaler;

/// An OOM that was recovered, for events.jsonl and the progress line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OomEvent {
    /// 0-based, as the step counts; the files count from 1.
    pub step: u64,
    pub phase: Phase,
    pub micro_before: usize,
    pub micro_after: usize,
    pub memory_in_use: u64,
    pub limit: Option<u64>,
}

/// What a step reports as it goes (the train loop writes it to events.jsonl).
#[derive(Debug, Clone)]
pub enum Note {
    Oom(OomEvent),
    /// Micro-batch 1 did not fit: this `memory.escalate` lever was pulled.
    Escalated(Lever),
    /// f16 gradients overflowed: no update, and the loss scale is now this.
    Skipped {
        loss_scale: f64,
    },
    /// Enough clean steps: the next step tries this larger micro-batch.
    Regrew {
        micro: usize,
    },
    /// A NaN or infinite loss or gradient norm: no update (`nonfinite.rs`).
    NonFinite(NonFinite),
}

/// How an optimizer step ended.
#[derive(Debug)]
pub enum Stepped {
    /// The step's loss; its update was applied (or skipped for an f16 overflow).
    Done { loss: f32 },
    /// The loss or a gradient was NaN or infinite: the update was skipped (`nonfinite.rs`).
    NonFinite { loss: f32 },
    /// The policy gave up: see [`NothingFits`].
    NothingFits(NothingFits),
}

/// The policy gave up on a step: nothing is left to try. Rendered (`Display`) as the one
/// message naming the step, what did not fit, the memory and the keys to change.
#[derive(Debug)]
pub struct NothingFits {
    /// 0-based, as the step counts.
    pub step: u64,
    pub unfit: Unfit,
    pub memory_in_use: u64,
    pub limit: Option<u64>,
    /// The config keys that would help.
    pub consider: &'static str,
}

/// What did not fit.
#[derive(Debug)]
pub enum Unfit {
    /// Not even one row per pass, with every allowed lever pulled: data row `row` of `tokens`
    /// tokens, in `phase`. No update ran, so the weights are the previous step's.
    Row {
        phase: Phase,
        row: usize,
        tokens: usize,
    },
    /// The optimizer update, twice (`error`: the second OOM). Some tensors are updated and
    /// others not, so the weights are no step's.
    Update { error: String },
}

impl NothingFits {
    /// Whether the weights are those of a finished step (worth saving as `final/`).
    pub fn weights_intact(&self) -> bool {
        matches!(self.unfit, Unfit::Row { .. })
    }
}

impl std::fmt::Display for NothingFits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (step, consider) = (self.step, self.consider);
        match &self.unfit {
            Unfit::Row { phase, row, tokens } => write!(
                f,
                "step {step}, {phase:?} phase: even a micro-batch of 1 row does not fit (data \
                 row {row}, {tokens} tokens). Memory in use {}, limit {}. Consider {consider}",
                human_bytes(self.memory_in_use),
                self.limit
                    .map(human_bytes)
                    .unwrap_or_else(|| "the device's".into())
            ),
            Unfit::Update { error } => write!(
                f,
                "step {step}: the optimizer update does not fit ({error}). Consider {consider}"
            ),
        }
    }
}

/// The step's place in the run: its number (0-based), the training set its rows come from,
/// its rows (indices into that set) and its learning rate.
#[derive(Clone, Copy)]
pub struct StepAt<'r> {
    pub step: u64,
    pub set: usize,
    pub rows: &'r [usize],
    pub lr: f64,
}

/// One training set as the trainer works on it: its rows tokenized (as the levers pulled so
/// far left them), the texts they came from (tokenized again when `max_seq_length` is pulled;
/// None for synthetic rows, which no lever shortens) and its loss.
pub struct SetData<'a> {
    pub data: TokenizedData,
    pub texts: Option<&'a Dataset>,
    pub loss: Loss,
    /// The guide's own tokens of `data`, when it cannot read the trained model's
    /// (`train/guide.rs`); None without a guide.
    pub guide_tokens: Option<TokenizedData>,
}

/// The memory levers in force: the configured ones, then those the policy pulled.
#[derive(Debug, Clone, Copy)]
struct Levers {
    precision: Precision,
    checkpointing: bool,
    max_seq_length: usize,
}

/// What optimizer steps work with from one to the next: the passes' networks, the levers, the
/// training sets and AdamW. The loss scale and the policy's state live in the run's progress
/// (they are checkpointed there) and are lent to each step.
pub struct Trainer<'a> {
    runner: Runner<'a>,
    levers: Levers,
    sets: Vec<SetData<'a>>,
    /// `memory.escalate`: the levers the policy may pull at micro-batch 1, in order.
    escalate: Vec<Lever>,
    max_grad_norm: f64,
    pub optimizer: AdamW,
    /// The test hook's 0-based steps whose gradients become NaN (`nonfinite.rs`).
    pub inject_nonfinite: BTreeSet<u64>,
    /// GISTEmbedLoss's guide (`train/guide.rs`).
    guide: Option<&'a SentenceModel>,
}

impl<'a> Trainer<'a> {
    /// A trainer for `model` as the `[train]` section sets it up, on `data` with `train.loss`.
    pub fn new(
        model: &'a SentenceModel,
        t: &TrainSection,
        escalate: &[Lever],
        budget: &'a MemoryBudget,
        injector: &'a Injector,
        data: TokenizedData,
        texts: Option<&'a Dataset>,
    ) -> Result<Self> {
        let set = SetData {
            data,
            texts,
            loss: Loss::from_train(t),
            guide_tokens: None,
        };
        Self::on_sets(model, t, escalate, budget, injector, vec![set])
    }

    /// A trainer on several training sets, each with its own loss; a step's rows come from one.
    pub fn on_sets(
        model: &'a SentenceModel,
        t: &TrainSection,
        escalate: &[Lever],
        budget: &'a MemoryBudget,
        injector: &'a Injector,
        sets: Vec<SetData<'a>>,
    ) -> Result<Self> {
        Ok(Self {
            runner: Runner::new(model, t, t.precision, Guard { budget, injector })?,
            levers: Levers {
                precision: t.precision,
                checkpointing: t.gradient_checkpointing,
                max_seq_length: model.tokenizer.max_seq_length,
            },
            sets,
            escalate: escalate.to_vec(),
            max_grad_norm: t.max_grad_norm,
            optimizer: AdamW::new(t.weight_decay),
            inject_nonfinite: BTreeSet::new(),
            guide: None,
        })
    }

    /// Adds GISTEmbedLoss's guide model (`[guide]`): it embeds every micro-batch beside the
    /// trained model, forward only.
    pub fn with_guide(mut self, guide: Option<&'a SentenceModel>) -> Result<Self> {
        let Some(guide) = guide else {
            return Ok(self);
        };
        self.runner.set_guide(guide)?;
        self.guide = Some(guide);
        self.retokenize_for_guide()?;
        Ok(self)
    }

    /// Each set's tokens for the guide, when it cannot read the trained model's.
    fn retokenize_for_guide(&mut self) -> Result<()> {
        let Some(g) = self.guide else {
            return Ok(());
        };
        let mut trained = self.runner.model.tokenizer.clone();
        trained.set_max_seq_length(self.levers.max_seq_length)?;
        for set in &mut self.sets {
            if set.loss.kind == crate::config::LossKind::Gist {
                set.guide_tokens = crate::train::guide::tokens(&trained, &g.tokenizer, &set.data)?;
            }
        }
        Ok(())
    }

    /// Set `set`'s data as the levers pulled so far left it.
    pub fn data(&self, set: usize) -> &TokenizedData {
        &self.sets[set].data
    }

    /// The most text columns a row of any set has (what a step's memory grows with).
    pub fn columns(&self) -> usize {
        self.sets.iter().map(|s| s.data.columns).max().unwrap_or(1)
    }

    /// One optimizer step: gradients, unscale, clip, update, regrow. `notes` hears of every
    /// OOM, lever pulled, skipped update and regrow, as they happen.
    pub fn optimizer_step(
        &mut self,
        at: StepAt,
        scaler: &mut LossScaler,
        mem: &mut MemState,
        notes: &mut dyn FnMut(Note),
    ) -> Result<Stepped> {
        let StepAt {
            step,
            set,
            rows,
            lr,
        } = at;
        let gradients = self.gradients(set, rows, step, scaler, mem, notes)?;
        let Gradients { loss, mut grads } = match gradients {
            Ok(g) => g,
            Err(unfit) => return Ok(Stepped::NothingFits(unfit)),
        };
        checkpoint::crash_point("step", step as usize + 1);
        if self.inject_nonfinite.contains(&step) {
            nonfinite::poison(&mut grads)?;
        }
        scaler.unscale(&mut grads)?;
        // The one pass over the gradients: clipping needs the norm, and a NaN or infinity
        // anywhere makes it non-finite.
        let norm = grad_norm(&grads)?;
        let mut applied = true;
        if loss.is_finite() && norm.is_finite() {
            scaler.clean_step();
            let clip = clip_coefficient(norm, self.max_grad_norm);
            if let Err(unfit) = self.update(&grads, clip, lr, step, mem, notes)? {
                return Ok(Stepped::NothingFits(unfit));
            }
        } else if scaler.overflowed() && loss.is_finite() {
            // f16 with room to lower the scale: the scaler's ordinary skip.
            notes(Note::Skipped {
                loss_scale: scaler.scale,
            });
        } else {
            notes(Note::NonFinite(NonFinite::describe(
                step, loss, norm, &grads,
            )?));
            applied = false;
        }
        drop(grads);
        // The memory policy counts the step either way: its passes fitted.
        if let StepAction::Regrow { micro } = mem.step_done() {
            notes(Note::Regrew { micro });
        }
        Ok(if applied {
            Stepped::Done { loss }
        } else {
            Stepped::NonFinite { loss }
        })
    }

    /// The gradients of `rows` of training set `set` over micro-batches of `mem.micro` rows, in the scheme the
    /// policy picks. An OOM in a micro-batch goes to the policy, whose answer is carried out
    /// here: retry at its smaller size (rows done are kept), start again in the cached scheme,
    /// or start again with a lever pulled.
    pub fn gradients(
        &mut self,
        set: usize,
        rows: &[usize],
        step: u64,
        scaler: &mut LossScaler,
        mem: &mut MemState,
        notes: &mut dyn FnMut(Note),
    ) -> Result<Result<Gradients, NothingFits>> {
        let mut pass = self.start_pass(set, rows.len(), mem);
        loop {
            let batch = Batch {
                data: &self.sets[set].data,
                guide_tokens: self.sets[set].guide_tokens.as_ref(),
                rows,
                loss: self.sets[set].loss,
                step,
            };
            let (phase, at) = match self.runner.run(&mut pass, batch, mem.micro, scaler.scale)? {
                Outcome::Done(g) => return Ok(Ok(g)),
                Outcome::Oom { phase, at } => (phase, at),
            };
            let before = mem.micro;
            match mem.micro_batch_oom(self.shape(set, rows.len()), &self.escalate) {
                OomAction::Retry { micro } => {
                    notes(Note::Oom(self.oom(step, phase, before, micro)))
                }
                OomAction::SwitchToCached { micro } => {
                    notes(Note::Oom(self.oom(step, phase, before, micro)));
                    let checkpointing = self.levers.checkpointing;
                    let columns = self.sets[set].data.columns;
                    pass = Pass::new(Scheme::Cached, checkpointing, columns);
                }
                OomAction::Escalate { lever } => {
                    drop(pass);
                    self.pull(lever)?;
                    if lever == Lever::F16 {
                        *scaler = LossScaler::new(Precision::F16);
                    }
                    notes(Note::Escalated(lever));
                    pass = self.start_pass(set, rows.len(), mem);
                }
                OomAction::GiveUp { consider } => {
                    let tokens = self.sets[set].data.tokens[rows[at]].iter().map(Vec::len);
                    let tokens = tokens.max();
                    let unfit = Unfit::Row {
                        phase,
                        row: rows[at],
                        tokens: tokens.unwrap_or(0),
                    };
                    return Ok(Err(self.nothing_fits(step, unfit, consider)));
                }
            }
        }
    }

    /// AdamW on `grads` times `clip`. An OOM part way goes to the policy: the update is
    /// retried (once), skipping the tensors it already updated; then it gives up.
    fn update(
        &mut self,
        grads: &Grads,
        clip: f32,
        lr: f64,
        step: u64,
        mem: &mut MemState,
        notes: &mut dyn FnMut(Note),
    ) -> Result<Result<(), NothingFits>> {
        let mut updated = BTreeSet::new();
        let mut retried = false;
        loop {
            let (vars, guard) = (&self.runner.model.params.vars, self.runner.guard);
            let error = match self
                .optimizer
                .step(vars, grads, clip, lr, &mut updated, || {
                    guard.check(step, Phase::Optimizer, "optimizer update")
                }) {
                Ok(()) => return Ok(Ok(())),
                Err(e) if is_oom(&e) => e,
                Err(e) => return Err(e),
            };
            match mem.update_oom(retried) {
                UpdateAction::Retry => {
                    retried = true;
                    let micro = mem.micro;
                    notes(Note::Oom(self.oom(step, Phase::Optimizer, micro, micro)));
                }
                UpdateAction::GiveUp { consider } => {
                    let unfit = Unfit::Update {
                        error: error.to_string(),
                    };
                    return Ok(Err(self.nothing_fits(step, unfit, consider)));
                }
            }
        }
    }

    /// Pulls `lever` (the policy's escalation, or a resumed run restoring the levers its
    /// checkpoint had pulled).
    pub fn pull(&mut self, lever: Lever) -> Result<()> {
        let levers = &mut self.levers;
        match lever {
            Lever::GradientCheckpointing => levers.checkpointing = true,
            Lever::Bf16 | Lever::F16 => {
                levers.precision = if lever == Lever::F16 {
                    Precision::F16
                } else {
                    Precision::Bf16
                };
                self.runner.set_precision(levers.precision)?;
            }
            Lever::MaxSeqLength => {
                levers.max_seq_length = (levers.max_seq_length / 2).max(8);
                let mut tokenizer = self.runner.model.tokenizer.clone();
                tokenizer.set_max_seq_length(levers.max_seq_length)?;
                for set in &mut self.sets {
                    let texts = set.texts.ok_or_else(|| {
                        Error::Internal("max_seq_length pulled on rows without texts".into())
                    })?;
                    set.data = crate::data::tokenized::tokenize(&tokenizer, texts)?;
                }
                // The guide reads the shorter texts too, as it reads what the model reads.
                self.retokenize_for_guide()?;
            }
        }
        Ok(())
    }

    fn shape(&self, set: usize, rows: usize) -> StepShape {
        StepShape {
            rows,
            coupled: crate::losses::couples_batch(self.sets[set].loss),
            checkpointing: self.levers.checkpointing,
        }
    }

    fn start_pass(&self, set: usize, rows: usize, mem: &MemState) -> Pass {
        let scheme = mem.scheme(self.shape(set, rows));
        Pass::new(
            scheme,
            self.levers.checkpointing,
            self.sets[set].data.columns,
        )
    }

    fn oom(&self, step: u64, phase: Phase, micro_before: usize, micro_after: usize) -> OomEvent {
        let budget = self.runner.guard.budget;
        OomEvent {
            step,
            phase,
            micro_before,
            micro_after,
            memory_in_use: budget.in_use(),
            limit: budget.limit,
        }
    }

    fn nothing_fits(&self, step: u64, unfit: Unfit, consider: &'static str) -> NothingFits {
        let budget = self.runner.guard.budget;
        NothingFits {
            step,
            unfit,
            memory_in_use: budget.in_use(),
            limit: budget.limit,
            consider,
        }
    }
}

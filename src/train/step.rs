//! One optimizer step's gradients, over micro-batches, surviving out-of-memory.
//!
//! Two schemes, chosen by the loss:
//! - plain accumulation (per-row losses, or a batch that fits in one pass): each micro-batch's
//!   loss is weighted by its share of the batch and back-propagated, gradients summed;
//! - cached (GradCache, for batch-coupled losses cut into micro-batches, and for every loss under
//!   gradient checkpointing): embed the whole batch without a graph, compute the loss and its
//!   gradient with respect to the embeddings over the full batch, then re-run each micro-batch
//!   with a graph (or layer by layer, see `recompute.rs`) and back-propagate those gradients.
//!
//! On an OOM the attempt's tensors are dropped (they go out of scope), the policy halves the
//! micro-batch and the same rows are retried; work already done in the step is kept. Dropout
//! masks depend on (seed, step, row), so a retried or re-run row sees the same mask.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::data::batch::TokenBatch;

use crate::config::{Precision, TrainSection};
use crate::error::{Error, Result};
use crate::losses::{self, LossKind};
use crate::memory::oom::{is_oom, Injector, Phase};
use crate::memory::policy::{Action, Event, MemState};
use crate::memory::{human_bytes, MemoryBudget};
use crate::model::dropout::Dropout;
use crate::model::embedding_cut::{forward_cut, EmbeddingCut};
use crate::model::{Network, SentenceModel};
use crate::train::optim::Grads;
use crate::train::precision::{self, LossScaler};
use crate::train::recompute::{backward_recomputing, forward_checkpoints};

/// The tokenized training set: `tokens[row][column]`, `scores[row]`.
pub struct TokenizedData {
    pub tokens: Vec<Vec<Vec<u32>>>,
    pub scores: Vec<Option<f32>>,
    pub columns: usize,
}

/// An OOM that was recovered (or not), for events.jsonl and the progress line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OomEvent {
    pub step: u64,
    pub phase: Phase,
    pub micro_before: usize,
    pub micro_after: usize,
    pub memory_in_use: u64,
    pub limit: Option<u64>,
}

/// Everything a step needs that does not change between steps.
pub struct StepRunner<'a> {
    pub model: &'a SentenceModel,
    /// Built over the trainable vars: records a graph.
    pub train_net: Network,
    /// The same weights, detached: the cached scheme's first pass.
    pub embed_net: Network,
    pub loss: LossKind,
    pub scale: f64,
    /// `train.matryoshka_dims`: the loss summed over truncated widths.
    pub matryoshka: Option<losses::Matryoshka>,
    pub seed: u64,
    pub dropout: (f32, f32),
    pub budget: &'a MemoryBudget,
    pub injector: &'a Injector,
    /// Gradient checkpointing: recompute each layer's activations in the backward pass.
    pub checkpointing: bool,
    /// Multiplies the loss before backward (f16 dynamic loss scaling); gradients come out
    /// scaled by it too. 1 for f32 and bf16.
    pub loss_scale: f64,
}

/// Gradients and loss of one optimizer step.
pub struct StepOutput {
    pub loss: f32,
    pub grads: Grads,
}

impl<'a> StepRunner<'a> {
    /// A runner for `model` as the `[train]` section sets it up (loss, precision, checkpointing).
    pub fn new(
        model: &'a SentenceModel,
        t: &TrainSection,
        budget: &'a MemoryBudget,
        injector: &'a Injector,
    ) -> Result<Self> {
        let dtype = precision::dtype(t.precision);
        Ok(Self {
            model,
            train_net: model.build(&model.params, dtype)?,
            embed_net: model.build(&model.params.detached(), dtype)?,
            loss: t.loss,
            scale: t.scale,
            matryoshka: losses::Matryoshka::from_train(t),
            seed: t.seed,
            dropout: model.network()?.encoder.dropout_probs(),
            budget,
            injector,
            checkpointing: t.gradient_checkpointing,
            loss_scale: LossScaler::new(t.precision).scale,
        })
    }

    /// Switches precision and checkpointing (the OOM handler's escalation levers).
    pub fn set_levers(&mut self, precision: Precision, checkpointing: bool) -> Result<()> {
        let dtype = precision::dtype(precision);
        self.train_net = self.model.build(&self.model.params, dtype)?;
        self.embed_net = self.model.build(&self.model.params.detached(), dtype)?;
        self.checkpointing = checkpointing;
        Ok(())
    }

    /// Computes the gradients of optimizer step `step` over `rows` (indices into `data`).
    pub fn gradients(
        &self,
        data: &TokenizedData,
        rows: &[usize],
        step: u64,
        mem: &mut MemState,
        events: &mut Vec<OomEvent>,
    ) -> Result<StepOutput> {
        let n = rows.len();
        let mut grads = Grads::new();
        // Checkpointing always goes through a gradient on the embeddings (the cached scheme).
        if !self.checkpointing && (!losses::couples_batch(self.loss) || mem.micro >= n) {
            let mut loss = 0f32;
            let mut pos = 0;
            while pos < n {
                let m = mem.micro.min(n - pos);
                match self.plain_chunk(data, &rows[pos..pos + m], n, step, &mut grads) {
                    Ok(l) => {
                        loss += l;
                        pos += m;
                    }
                    Err(e) => self.recover(data, e, step, rows, pos, mem, events)?,
                }
                // A coupled loss cut by an OOM cannot be accumulated: switch to the cached scheme.
                if losses::couples_batch(self.loss) && mem.micro < n && pos < n {
                    grads.clear();
                    return self.cached(data, rows, step, mem, events);
                }
            }
            return Ok(StepOutput { loss, grads });
        }
        self.cached(data, rows, step, mem, events)
    }

    /// Handles a failed attempt: an OOM asks the policy for a smaller micro-batch, anything
    /// else (or an OOM at micro-batch 1) ends the step with an error.
    #[allow(clippy::too_many_arguments)]
    fn recover(
        &self,
        data: &TokenizedData,
        failed: Failed,
        step: u64,
        rows: &[usize],
        pos: usize,
        mem: &mut MemState,
        events: &mut Vec<OomEvent>,
    ) -> Result<()> {
        let Failed { phase, error: e } = failed;
        if !is_oom(&e) {
            return Err(e);
        }
        let before = mem.micro;
        match mem.decide(Event::Oom) {
            Action::Retry { micro } => {
                events.push(OomEvent {
                    step,
                    phase,
                    micro_before: before,
                    micro_after: micro,
                    memory_in_use: self.budget.in_use(),
                    limit: self.budget.limit,
                });
                Ok(())
            }
            _ => {
                let row = rows[pos];
                let tokens = data.tokens[row].iter().map(Vec::len).max().unwrap_or(0);
                Err(Error::OutOfMemory(format!(
                    "step {step}, {phase:?} phase: even a micro-batch of 1 row does not fit \
                     (data row {row}, {tokens} tokens). Memory in use {}, limit {}. Consider \
                     raising memory.limit, lowering model.max_seq_length, or setting \
                     train.freeze_layers",
                    human_bytes(self.budget.in_use()),
                    self.budget
                        .limit
                        .map(human_bytes)
                        .unwrap_or_else(|| "the device's".into())
                )))
            }
        }
    }

    /// Column `c` of `rows`, packed, on the model's device, and its dropout: masks keyed by each
    /// row's (data row, column), whatever batch it sits in.
    fn column(
        &self,
        data: &TokenizedData,
        rows: &[usize],
        c: usize,
        step: u64,
    ) -> Result<(TokenBatch, Dropout)> {
        let ids: Vec<&[u32]> = rows.iter().map(|&r| data.tokens[r][c].as_slice()).collect();
        let keys = rows.iter().map(|&r| (r as u64) << 2 | c as u64).collect();
        let drop = Dropout::train(self.dropout.0, self.dropout.1, self.seed, step, keys);
        Ok((TokenBatch::new(&ids, &self.model.device)?, drop))
    }

    /// Embeddings of every text column of `rows`, through `net`, and the embedding-layer cuts
    /// to finish their backward pass with (see `model/embedding_cut.rs`). Columns go through
    /// the encoder one at a time: the backward pass then holds one column's temporaries at
    /// a time, not both.
    fn embed(
        &self,
        net: &Network,
        data: &TokenizedData,
        rows: &[usize],
        step: u64,
    ) -> Result<(Vec<Tensor>, Vec<EmbeddingCut>)> {
        let (mut cols, mut cuts) = (Vec::new(), Vec::new());
        for c in 0..data.columns {
            let (batch, drop) = self.column(data, rows, c, step)?;
            let (emb, cut) = forward_cut(net, &batch, &drop)?;
            cols.push(emb);
            cuts.extend(cut);
        }
        Ok((cols, cuts))
    }

    /// Accumulates the gradients of the encoder's backward pass `store`, then, with the
    /// encoder's graph gone (the caller dropped it), those of the embedding layer.
    fn finish_backward(
        &self,
        grads: &mut Grads,
        store: GradStore,
        cuts: Vec<EmbeddingCut>,
    ) -> Result<()> {
        self.accumulate(grads, &store)?;
        let reached = cuts
            .iter()
            .map(|cut| cut.gradient(&store))
            .collect::<Result<Vec<_>>>()?;
        drop(store);
        for (cut, g) in cuts.into_iter().zip(reached) {
            self.accumulate(grads, &cut.backward(&self.train_net, &g)?)?;
        }
        Ok(())
    }

    fn scores(&self, data: &TokenizedData, rows: &[usize]) -> Result<Option<Tensor>> {
        if data.scores.first().is_none_or(|s| s.is_none()) {
            return Ok(None);
        }
        let s: Vec<f32> = rows
            .iter()
            .map(|&r| data.scores[r].unwrap_or(0.0))
            .collect();
        Ok(Some(Tensor::from_vec(s, rows.len(), &self.model.device)?))
    }

    /// Plain accumulation: loss of this chunk, weighted by its share of the batch.
    fn plain_chunk(
        &self,
        data: &TokenizedData,
        rows: &[usize],
        batch_len: usize,
        step: u64,
        grads: &mut Grads,
    ) -> Result<f32, Failed> {
        let (loss, cuts) = in_phase(Phase::Forward, || {
            self.budget.mark();
            self.injector.check(step, Phase::Forward)?;
            let (cols, cuts) = self.embed(&self.train_net, data, rows, step)?;
            let scores = self.scores(data, rows)?;
            let weight = rows.len() as f64 / batch_len as f64;
            let loss = (losses::compute(
                self.loss,
                self.scale,
                self.matryoshka.as_ref(),
                &cols,
                scores.as_ref(),
            )? * weight)?;
            self.budget.check("forward pass")?;
            Ok((loss, cuts))
        })?;
        in_phase(Phase::Backward, || {
            self.injector.check(step, Phase::Backward)?;
            let store = (&loss * self.loss_scale)?.backward()?;
            let value = loss.to_scalar::<f32>()?;
            drop(loss); // frees the encoder's activations before the embedding layer's pass
            self.finish_backward(grads, store, cuts)?;
            self.budget.check("backward pass")?;
            Ok(value)
        })
    }

    /// The cached (GradCache) scheme: for batch-coupled losses cut into micro-batches, and for
    /// every loss under gradient checkpointing.
    fn cached(
        &self,
        data: &TokenizedData,
        rows: &[usize],
        step: u64,
        mem: &mut MemState,
        events: &mut Vec<OomEvent>,
    ) -> Result<StepOutput> {
        let n = rows.len();
        // 1. Embeddings of the whole batch, chunk by chunk, without a graph (with checkpointing,
        //    also every row's layer inputs, kept per row so later chunks may be cut otherwise).
        let mut parts: Vec<Vec<Tensor>> = Vec::new();
        let mut ckpts: Vec<Vec<Vec<Tensor>>> = vec![Vec::new(); data.columns]; // [column][row][layer]
        let mut pos = 0;
        while pos < n {
            let m = mem.micro.min(n - pos);
            let attempt = in_phase(Phase::Forward, || {
                self.budget.mark();
                self.injector.check(step, Phase::Forward)?;
                let chunk = &rows[pos..pos + m];
                let mut cols = Vec::with_capacity(data.columns);
                let mut kept = Vec::with_capacity(data.columns);
                for c in 0..data.columns {
                    let (batch, drop) = self.column(data, chunk, c, step)?;
                    if self.checkpointing {
                        let (emb, inputs) = forward_checkpoints(&self.embed_net, &batch, &drop)?;
                        cols.push(emb);
                        kept.push(per_row(&inputs, &batch)?);
                    } else {
                        cols.push(self.embed_net.forward(&batch, &drop)?);
                    }
                }
                self.budget.check("embedding pass")?;
                Ok((cols, kept))
            });
            match attempt {
                Ok((cols, kept)) => {
                    parts.push(cols);
                    for (c, rows_kept) in kept.into_iter().enumerate() {
                        ckpts[c].extend(rows_kept);
                    }
                    pos += m;
                }
                Err(e) => self.recover(data, e, step, rows, pos, mem, events)?,
            }
        }
        // 2. The loss over the full batch, and its gradient with respect to each embedding.
        let full: Vec<Var> = (0..data.columns)
            .map(|c| {
                let col: Vec<Tensor> = parts.iter().map(|p| p[c].clone()).collect();
                Ok(Var::from_tensor(&Tensor::cat(&col, 0)?)?)
            })
            .collect::<Result<_>>()?;
        drop(parts);
        let cols: Vec<Tensor> = full.iter().map(|v| v.as_tensor().clone()).collect();
        let scores = self.scores(data, rows)?;
        let loss = losses::compute(
            self.loss,
            self.scale,
            self.matryoshka.as_ref(),
            &cols,
            scores.as_ref(),
        )?;
        let store = loss.backward()?;
        let emb_grads: Vec<Tensor> = full
            .iter()
            .map(|v| {
                let g = store
                    .get(v.as_tensor())
                    .ok_or_else(|| Error::Internal("loss has no gradient".into()))?;
                Ok((g * self.loss_scale)?)
            })
            .collect::<Result<_>>()?;
        drop(store);
        let cached = Cached {
            emb_grads,
            checkpoints: ckpts,
        };
        // 3. Push the cached gradients back through the network, chunk by chunk.
        let mut grads = Grads::new();
        let mut pos = 0;
        while pos < n {
            let m = mem.micro.min(n - pos);
            let attempt = in_phase(Phase::Backward, || {
                self.budget.mark();
                self.injector.check(step, Phase::Backward)?;
                let mut part = Grads::new();
                self.backward_chunk(data, &rows[pos..pos + m], pos, step, &cached, &mut part)?;
                self.budget.check("backward pass")?;
                Ok(part)
            });
            match attempt {
                Ok(part) => {
                    for (name, g) in part {
                        add(&mut grads, name, g)?;
                    }
                    pos += m;
                }
                Err(e) => self.recover(data, e, step, rows, pos, mem, events)?,
            }
        }
        Ok(StepOutput {
            loss: loss.to_scalar::<f32>()?,
            grads,
        })
    }

    /// Pushes the cached embedding gradients of `rows` (at `pos` in the batch) back through the
    /// network: through one graph, or layer by layer with recomputation (checkpointing).
    fn backward_chunk(
        &self,
        data: &TokenizedData,
        rows: &[usize],
        pos: usize,
        step: u64,
        cached: &Cached,
        grads: &mut Grads,
    ) -> Result<()> {
        let (m, emb_grads, ckpts) = (rows.len(), &cached.emb_grads, &cached.checkpoints);
        if !self.checkpointing {
            let (cols, cuts) = self.embed(&self.train_net, data, rows, step)?;
            let mut surrogate = Tensor::zeros((), candle_core::DType::F32, &self.model.device)?;
            for (e, g) in cols.iter().zip(emb_grads) {
                surrogate = (surrogate + (e * g.narrow(0, pos, m)?)?.sum_all()?)?;
            }
            drop(cols);
            let store = surrogate.backward()?;
            drop(surrogate);
            return self.finish_backward(grads, store, cuts);
        }
        for (c, g) in emb_grads.iter().enumerate() {
            let (batch, drop) = self.column(data, rows, c, step)?;
            let layers = ckpts[c][pos].len();
            let inputs = (0..layers)
                .map(|l| {
                    let rows: Vec<&Tensor> = ckpts[c][pos..pos + m].iter().map(|r| &r[l]).collect();
                    Ok(Tensor::cat(&rows, 0)?)
                })
                .collect::<Result<Vec<_>>>()?;
            let mut sink = |store: &GradStore| self.accumulate(grads, store);
            backward_recomputing(
                &self.train_net,
                &batch,
                &drop,
                &g.narrow(0, pos, m)?,
                inputs,
                &mut sink,
            )?;
        }
        Ok(())
    }

    /// Adds the gradient of every trainable tensor found in `store` to `grads`.
    fn accumulate(&self, grads: &mut Grads, store: &GradStore) -> Result<()> {
        for (name, var) in &self.model.params.vars {
            if let Some(g) = store.get(var.as_tensor()) {
                add(grads, name.clone(), g.detach())?;
            }
        }
        Ok(())
    }
}

/// What the cached scheme's first passes leave for its last: d loss / d embeddings per column,
/// (batch, dim), and with checkpointing every row's layer inputs, `[column][row][layer]`.
struct Cached {
    emb_grads: Vec<Tensor>,
    checkpoints: Vec<Vec<Vec<Tensor>>>,
}

/// Splits packed per-layer tensors into per-row views: `[row][layer]`.
fn per_row(inputs: &[Tensor], batch: &TokenBatch) -> Result<Vec<Vec<Tensor>>> {
    batch
        .rows()
        .map(|(off, len)| inputs.iter().map(|t| Ok(t.narrow(0, off, len)?)).collect())
        .collect()
}

fn add(grads: &mut Grads, name: String, g: Tensor) -> Result<()> {
    let sum = match grads.remove(&name) {
        Some(acc) => (acc + g)?,
        None => g,
    };
    grads.insert(name, sum);
    Ok(())
}

/// An attempt that failed, and in which phase (for the OOM event).
pub struct Failed {
    pub phase: Phase,
    pub error: Error,
}

fn in_phase<T>(phase: Phase, f: impl FnOnce() -> Result<T>) -> Result<T, Failed> {
    f().map_err(|error| Failed { phase, error })
}

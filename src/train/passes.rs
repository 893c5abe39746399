//! The passes that compute one optimizer step's gradients over its micro-batches, in either
//! scheme (`memory::policy::Scheme` says which):
//! - plain accumulation: each micro-batch's loss is weighted by its share of the batch and
//!   back-propagated, gradients summed;
//! - cached (GradCache): embed the whole batch without a graph, compute the loss and its
//!   gradient with respect to the embeddings over the full batch, then re-run each micro-batch
//!   with a graph (or layer by layer, see `model/recompute.rs`) and back-propagate those gradients.
//!
//! A pass stops at a micro-batch that runs out of memory, after dropping that attempt's tensors
//! (they go out of scope), and keeps what it has done: run again, it goes on from that
//! micro-batch, at whatever size the policy then chose. Dropout masks depend on (seed, step,
//! row), so a retried or re-run row sees the same mask.

use std::cell::RefCell;
use std::collections::HashSet;
use std::ops::Range;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId, Var};

use crate::config::{Precision, TrainSection};
use crate::data::batch::TokenBatch;
use crate::data::tokenized::TokenizedData;
use crate::error::{Error, Result};
use crate::losses::{self, Extra, Loss};
use crate::memory::guard::{Guard, Window};
use crate::memory::oom::{is_oom, Phase};
use crate::memory::policy::Scheme;
use crate::model::dropout::Dropout;
use crate::model::embedding_cut::{forward_cut, EmbeddingCut, WordRows};
use crate::model::layer_op::StepSums;
use crate::model::recompute::{backward_recomputing, forward_checkpoints};
use crate::model::sizes::DropoutProbs;
use crate::model::{Network, SentenceModel};
use crate::train::optim::{Grad, Grads};
use crate::train::precision;
use crate::train::summed_rows::SummedRows;

/// What every pass computes with: the networks at the precision in force, the loss's
/// parameters, dropout, and where an OOM is detected (the memory budget) or injected. The loss
/// itself comes with each batch: with several training sets, each has its own.
pub struct Runner<'a> {
    pub model: &'a SentenceModel,
    /// Built over the trainable vars: records a graph.
    train_net: Network,
    /// The same weights, detached: the cached scheme's first pass.
    embed_net: Network,
    /// `train.scale`; unset, each loss's default (`config::default_scale`).
    scale: Option<f64>,
    /// `train.matryoshka_dims`: the loss summed over truncated widths.
    matryoshka: Option<losses::Matryoshka>,
    seed: u64,
    dropout: DropoutProbs,
    pub guard: Guard<'a>,
    /// GISTEmbedLoss's guide (`train/guide.rs`), if the loss has one.
    guide: Option<GuideNet<'a>>,
}

/// The guide model and its network at the precision in force, over detached weights: it
/// runs forward only, without dropout.
struct GuideNet<'a> {
    model: &'a SentenceModel,
    net: Network,
}

/// The rows of one optimizer step (indices into `data`, the set they come from), the set's
/// loss, and the step's number (0-based). `guide_tokens`: the guide's own tokens of `data`'s
/// rows, when it cannot read `data`'s.
#[derive(Clone, Copy)]
pub struct Batch<'d> {
    pub data: &'d TokenizedData,
    pub guide_tokens: Option<&'d TokenizedData>,
    pub rows: &'d [usize],
    pub loss: Loss,
    pub step: u64,
}

/// The loss and gradients of one optimizer step.
pub struct Gradients {
    pub loss: f32,
    pub grads: Grads,
}

/// How a run of a pass ended.
pub enum Outcome {
    Done(Gradients),
    /// The micro-batch starting at position `at` of the batch ran out of memory in `phase`.
    Oom {
        phase: Phase,
        at: usize,
    },
}

/// A step's gradients in the making: how far the pass got, and what it has so far.
pub enum Pass {
    Plain(PlainPass),
    Cached(CachedPass),
}

pub struct PlainPass {
    /// Rows done, their summed loss and gradients.
    done: usize,
    loss: f32,
    grads: Grads,
}

pub struct CachedPass {
    /// Recompute each layer in the backward pass from the inputs kept in stage 1.
    checkpointing: bool,
    /// Stage 1: rows embedded, their embeddings per chunk `[chunk][column]` (and the guide's,
    /// if any) and, with checkpointing, every row's layer inputs.
    embedded: usize,
    parts: Vec<Vec<Tensor>>,
    guide_parts: Vec<Vec<Tensor>>,
    checkpoints: LayerInputs,
    /// Stage 2: the loss over the whole batch and its gradient on the embeddings.
    loss: Option<FullLoss>,
    /// Stage 3: rows back-propagated, and their gradients.
    done: usize,
    grads: Grads,
}

/// What the cached scheme's stage 2 leaves for stage 3: the loss (kept until the end, as its
/// value is read then), d loss / d embeddings per column, (batch, dim), and the checkpoints.
struct FullLoss {
    loss: Tensor,
    emb_grads: Vec<Tensor>,
    checkpoints: LayerInputs,
}

/// The layer inputs gradient checkpointing keeps from the cached scheme's first pass: per text
/// column, per row of the batch, the row's L+1 layer inputs (tokens, hidden). Kept per row, so
/// the backward pass may cut the batch into other micro-batches than the first pass did.
pub struct LayerInputs {
    columns: Vec<Vec<Vec<Tensor>>>,
}

impl LayerInputs {
    pub fn new(columns: usize) -> Self {
        Self {
            columns: vec![Vec::new(); columns],
        }
    }

    /// The inputs `forward_checkpoints` kept for `batch` (`columns` packed, as
    /// [`Runner::columns`] packs them), split into rows.
    fn from_packed(inputs: &[Tensor], batch: &TokenBatch, columns: usize) -> Result<Self> {
        let rows: Vec<Vec<Tensor>> = batch
            .rows()
            .map(|(off, len)| inputs.iter().map(|t| Ok(t.narrow(0, off, len)?)).collect())
            .collect::<Result<_>>()?;
        let mut split = Self::new(columns);
        for (i, row) in rows.into_iter().enumerate() {
            split.columns[i % columns.max(1)].push(row);
        }
        Ok(split)
    }

    /// Appends a later chunk's rows.
    fn extend(&mut self, later: LayerInputs) {
        for (col, rows) in self.columns.iter_mut().zip(later.columns) {
            col.extend(rows);
        }
    }

    /// Per layer, the inputs of batch rows `pos..pos + m` of every column, packed as
    /// [`Runner::columns`] packs them.
    fn packed(&self, pos: usize, m: usize) -> Result<Vec<Tensor>> {
        let layers = self.columns[0][pos].len();
        (0..layers)
            .map(|l| {
                let rows: Vec<&Tensor> = (pos..pos + m)
                    .flat_map(|r| self.columns.iter().map(move |col| &col[r][l]))
                    .collect();
                Ok(Tensor::cat(&rows, 0)?)
            })
            .collect()
    }
}

impl Pass {
    /// A pass at the start of a step's batch of `columns` text columns.
    pub fn new(scheme: Scheme, checkpointing: bool, columns: usize) -> Pass {
        match scheme {
            Scheme::Plain => Pass::Plain(PlainPass {
                done: 0,
                loss: 0.0,
                grads: Grads::new(),
            }),
            Scheme::Cached => Pass::Cached(CachedPass {
                checkpointing,
                embedded: 0,
                parts: Vec::new(),
                guide_parts: Vec::new(),
                checkpoints: LayerInputs::new(columns),
                loss: None,
                done: 0,
                grads: Grads::new(),
            }),
        }
    }
}

impl<'a> Runner<'a> {
    /// A runner for `model` as the `[train]` section sets it up, at `precision`.
    pub fn new(
        model: &'a SentenceModel,
        t: &TrainSection,
        precision: Precision,
        guard: Guard<'a>,
    ) -> Result<Self> {
        let dtype = precision::dtype(precision);
        Ok(Self {
            model,
            train_net: model.build(&model.params, dtype)?.for_step_sums(),
            embed_net: model.build(&model.params.detached(), dtype)?,
            scale: t.scale,
            matryoshka: losses::Matryoshka::from_train(t),
            seed: t.seed,
            dropout: model.spec.model.dropout(),
            guard,
            guide: None,
        })
    }

    /// Adds GISTEmbedLoss's guide, run at the same precision as the trained model.
    pub fn set_guide(&mut self, guide: &'a SentenceModel) -> Result<()> {
        let dtype = self.train_net.dtype;
        self.guide = Some(GuideNet {
            model: guide,
            net: guide.build(&guide.params.detached(), dtype)?,
        });
        Ok(())
    }

    /// Rebuilds the networks for activations in `precision` (a lever the policy may pull).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let dtype = precision::dtype(precision);
        self.train_net = self.model.build(&self.model.params, dtype)?.for_step_sums();
        self.embed_net = self.model.build(&self.model.params.detached(), dtype)?;
        if let Some(g) = &mut self.guide {
            g.net = g.model.build(&g.model.params.detached(), dtype)?;
        }
        Ok(())
    }

    /// Runs `pass` over `batch`, `micro` rows at a time, until it is done or a micro-batch runs
    /// out of memory. `loss_scale` multiplies the loss before backward (f16).
    pub fn run(
        &self,
        pass: &mut Pass,
        batch: Batch,
        micro: usize,
        loss_scale: f64,
    ) -> Result<Outcome> {
        match pass {
            Pass::Plain(p) => self.run_plain(p, batch, micro, loss_scale),
            Pass::Cached(c) => self.run_cached(c, batch, micro, loss_scale),
        }
    }

    fn run_plain(
        &self,
        p: &mut PlainPass,
        batch: Batch,
        micro: usize,
        loss_scale: f64,
    ) -> Result<Outcome> {
        let n = batch.rows.len();
        let grads = &mut p.grads;
        let attempt = |chunk| self.plain_chunk(batch, chunk, loss_scale, grads);
        if let Some(oom) = chunks(&mut p.done, n, micro, attempt, |l| {
            p.loss += l;
            Ok(())
        })? {
            if self.restarts_after(&oom) {
                *p = PlainPass {
                    done: 0,
                    loss: 0.0,
                    grads: Grads::new(),
                };
            }
            return Ok(oom);
        }
        Ok(Outcome::Done(Gradients {
            loss: p.loss,
            grads: self.finished(std::mem::take(&mut p.grads))?,
        }))
    }

    fn run_cached(
        &self,
        c: &mut CachedPass,
        batch: Batch,
        micro: usize,
        loss_scale: f64,
    ) -> Result<Outcome> {
        let n = batch.rows.len();
        // 1. Embeddings of the whole batch, chunk by chunk, without a graph (with checkpointing,
        //    also every row's layer inputs, kept per row so later chunks may be cut otherwise).
        let checkpointing = c.checkpointing;
        let attempt = |chunk| self.embed_chunk(batch, chunk, checkpointing);
        let (parts, guide_parts) = (&mut c.parts, &mut c.guide_parts);
        let checkpoints = &mut c.checkpoints;
        if let Some(oom) = chunks(&mut c.embedded, n, micro, attempt, |(cols, guide, kept)| {
            parts.push(cols);
            guide_parts.extend(guide);
            if let Some(kept) = kept {
                checkpoints.extend(kept);
            }
            Ok(())
        })? {
            return Ok(oom);
        }
        // 2. The loss over the full batch, and its gradient with respect to each embedding.
        if c.loss.is_none() {
            let parts = std::mem::take(&mut c.parts);
            let guide_parts = std::mem::take(&mut c.guide_parts);
            let columns = batch.data.columns;
            let checkpoints = std::mem::replace(&mut c.checkpoints, LayerInputs::new(columns));
            let embedded = Embedded {
                parts,
                guide_parts,
                checkpoints,
            };
            c.loss = Some(self.full_loss(batch, embedded, loss_scale)?);
        }
        let full = c.loss.as_ref().expect("set above");
        // 3. Push the cached gradients back through the network, chunk by chunk: into the
        //    step's sums in token order where the network has them, else into fresh
        //    gradients added per chunk.
        let in_order = self.sums_in_order();
        let grads = RefCell::new(std::mem::take(&mut c.grads));
        let attempt = |chunk| {
            self.attempt(
                batch.step,
                Phase::Backward,
                "backward pass",
                Window::New,
                || {
                    if in_order {
                        let grads = &mut grads.borrow_mut();
                        self.backward_chunk(batch, chunk, full, checkpointing, grads)?;
                        return Ok(None);
                    }
                    let mut part = Grads::new();
                    self.backward_chunk(batch, chunk, full, checkpointing, &mut part)?;
                    Ok(Some(part))
                },
            )
        };
        let stopped = chunks(&mut c.done, n, micro, attempt, |part| {
            for (name, g) in part.into_iter().flatten() {
                add_grad(&mut grads.borrow_mut(), name, g)?;
            }
            Ok(())
        });
        c.grads = grads.into_inner();
        if let Some(oom) = stopped? {
            if self.restarts_after(&oom) {
                c.done = 0;
                c.grads = Grads::new();
            }
            return Ok(oom);
        }
        Ok(Outcome::Done(Gradients {
            loss: full.loss.to_scalar::<f32>()?,
            grads: self.finished(std::mem::take(&mut c.grads))?,
        }))
    }

    /// Whether the network adds its gradients into the step's sums in token order
    /// (`Network::params_in_order`: the cpu engine in f32): then a step gets the same bits
    /// however it is cut into micro-batches.
    fn sums_in_order(&self) -> bool {
        !self.train_net.params_in_order().is_empty()
    }

    /// Whether a pass stopped by `oom` starts its gradients again from the first row: a
    /// backward pass adds into the step's sums in place as it goes, so one that failed half
    /// way may have added part of its micro-batch (and the sums cannot be taken apart again).
    fn restarts_after(&self, oom: &Outcome) -> bool {
        matches!(
            oom,
            Outcome::Oom {
                phase: Phase::Backward,
                ..
            }
        ) && self.sums_in_order()
    }

    /// The step's sums of the parameters the network adds into in token order, made at zero
    /// in `grads` the first time; empty where the network has none.
    fn step_sums(&self, grads: &mut Grads) -> Result<StepSums> {
        let ids: HashSet<TensorId> = self
            .train_net
            .params_in_order()
            .iter()
            .map(Tensor::id)
            .collect();
        let mut sums = StepSums::new();
        for (name, var) in &self.model.params.vars {
            let t = var.as_tensor();
            if !ids.contains(&t.id()) {
                continue;
            }
            if !grads.contains_key(name) {
                let zeros = self.train_net.zero_step_sum(t)?;
                grads.insert(name.clone(), Grad::Dense(zeros));
            }
            let Grad::Dense(sum) = &grads[name] else {
                return Err(Error::Internal(format!(
                    "{name}: summed rows cannot take in-order sums"
                )));
            };
            sums.insert(t.id(), sum.clone());
        }
        Ok(sums)
    }

    /// Runs `f`, a backward pass, with the network adding into the step's sums in `grads`.
    fn with_sums<T>(
        &self,
        grads: &mut Grads,
        f: impl FnOnce(&mut Grads, &StepSums) -> Result<T>,
    ) -> Result<T> {
        let sums = self.step_sums(grads)?;
        self.train_net.set_step_sums(&sums)?;
        let out = f(grads, &sums);
        self.train_net.set_step_sums(&StepSums::new())?;
        out
    }

    /// The step's gradients once every row is in: each step sum as its parameter's gradient
    /// (`Network::finish_step_sum`).
    fn finished(&self, mut grads: Grads) -> Result<Grads> {
        for (name, var) in &self.model.params.vars {
            if let Some(Grad::Dense(sum)) = grads.get_mut(name) {
                *sum = self.train_net.finish_step_sum(var.as_tensor(), sum)?;
            }
        }
        Ok(grads)
    }

    /// Runs `f` as one attempt at a micro-batch through the guard (see `memory/guard.rs`); a
    /// failure keeps its phase for the policy.
    fn attempt<T>(
        &self,
        step: u64,
        phase: Phase,
        what: &str,
        window: Window,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T, Failed> {
        self.guard
            .run(step, phase, what, window, f)
            .map_err(|error| Failed { phase, error })
    }

    /// Every text column of `rows`, packed row after row (packed row `r·C + c` is column `c`
    /// of row `r`, for C columns) into one batch on the model's device, and its dropout: masks
    /// keyed by each row's (data row, column), whatever batch it sits in. One pass over all the
    /// columns doubles the rows of every matrix product for pairs, which the CPU kernels run
    /// far faster than two passes of half the size. Row after row, a micro-batch's tokens are
    /// a stretch of the whole batch's, in the same order: the order the cpu engine sums the
    /// gradients in, so a cut step sums as the uncut one does.
    fn columns(
        &self,
        data: &TokenizedData,
        rows: &[usize],
        step: u64,
    ) -> Result<(TokenBatch, Dropout)> {
        let keys = rows
            .iter()
            .flat_map(|&r| (0..data.columns).map(move |c| (r as u64) << 2 | c as u64))
            .collect();
        let drop = Dropout::train(
            self.dropout.hidden,
            self.dropout.attention,
            self.seed,
            step,
            keys,
        );
        Ok((packed(data, rows, &self.model.device)?, drop))
    }

    /// The guide's embeddings of every text column of `rows` (one tensor per column, f32),
    /// packed in one pass as [`Runner::columns`] packs them; None without a guide or for a
    /// loss other than gist.
    fn guide_embeddings(&self, batch: Batch, rows: &[usize]) -> Result<Option<Vec<Tensor>>> {
        let Some(g) = &self.guide else {
            return Ok(None);
        };
        // In a run of several sets only the gist sets' batches need the guide.
        if batch.loss.kind != crate::config::LossKind::Gist {
            return Ok(None);
        }
        let data = batch.guide_tokens.unwrap_or(batch.data);
        let tokens = packed(data, rows, &g.model.device)?;
        let emb = g.net.forward(&tokens, &Dropout::off())?;
        Ok(Some(split_columns(
            &emb.to_dtype(DType::F32)?,
            data.columns,
        )?))
    }

    /// Embeddings of every text column of `rows` (one tensor per column) through `net`, in
    /// one pass (see [`Runner::columns`]), and the embedding-layer cut to finish its backward
    /// pass with (see `model/embedding_cut.rs`).
    fn embed(
        &self,
        net: &Network,
        data: &TokenizedData,
        rows: &[usize],
        step: u64,
    ) -> Result<(Vec<Tensor>, Vec<EmbeddingCut>)> {
        let (batch, drop) = self.columns(data, rows, step)?;
        let (emb, cut) = forward_cut(net, &batch, &drop)?;
        Ok((
            split_columns(&emb, data.columns)?,
            cut.into_iter().collect(),
        ))
    }

    /// Accumulates the gradients of the encoder's backward pass `store`, then, with the
    /// encoder's graph gone (the caller dropped it), those of the embedding layer (into the
    /// step's `sums` where they hold its gradients).
    fn finish_backward(
        &self,
        grads: &mut Grads,
        store: GradStore,
        cuts: Vec<EmbeddingCut>,
        sums: &StepSums,
    ) -> Result<()> {
        self.accumulate(grads, &store)?;
        let reached = cuts
            .iter()
            .map(|cut| cut.gradient(&store))
            .collect::<Result<Vec<_>>>()?;
        drop(store);
        for (cut, g) in cuts.into_iter().zip(reached) {
            if let Some(rows) = cut.backward_in_order(&self.train_net, &g, sums)? {
                self.accumulate_rows(grads, rows)?;
                continue;
            }
            let (store, rows) = cut.backward(&self.train_net, &g)?;
            self.accumulate(grads, &store)?;
            if let Some(rows) = rows {
                self.accumulate_rows(grads, rows)?;
            }
        }
        Ok(())
    }

    fn scores(&self, data: &TokenizedData, rows: &[usize]) -> Result<Option<Tensor>> {
        data.labels(rows, &self.model.device)
    }

    /// Plain accumulation: loss of the rows at `chunk` of the batch, weighted by their share of
    /// it, back-propagated into `grads`.
    fn plain_chunk(
        &self,
        batch: Batch,
        chunk: Range<usize>,
        loss_scale: f64,
        grads: &mut Grads,
    ) -> Result<f32, Failed> {
        let (data, step) = (batch.data, batch.step);
        let rows = &batch.rows[chunk];
        let (loss, cuts) =
            self.attempt(step, Phase::Forward, "forward pass", Window::New, || {
                // The guide first: its layers are freed before the model's activations pile up.
                let guide = self.guide_embeddings(batch, rows)?;
                let (cols, cuts) = self.embed(&self.train_net, data, rows, step)?;
                let scores = self.scores(data, rows)?;
                let extra = Extra {
                    labels: scores.as_ref(),
                    guide: guide.as_deref(),
                };
                let weight = rows.len() as f64 / batch.rows.len() as f64;
                let loss = (losses::compute(
                    batch.loss,
                    self.scale_for(batch.loss),
                    self.matryoshka.as_ref(),
                    &cols,
                    extra,
                )? * weight)?;
                Ok((loss, cuts))
            })?;
        self.attempt(
            step,
            Phase::Backward,
            "backward pass",
            Window::Continue,
            || {
                self.with_sums(grads, |grads, sums| {
                    let store = self.train_net.backward(&(&loss * loss_scale)?)?;
                    let value = loss.to_scalar::<f32>()?;
                    drop(loss); // frees the encoder's activations before the embedding layer's pass
                    self.finish_backward(grads, store, cuts, sums)?;
                    Ok(value)
                })
            },
        )
    }

    /// The cached scheme's stage 1 for the rows at `chunk`: their embeddings per column,
    /// without a graph, the guide's (if any), and with `checkpointing` every row's layer
    /// inputs. The guide embeds the same chunk, so a smaller micro-batch after an OOM cuts its
    /// passes too.
    fn embed_chunk(
        &self,
        batch: Batch,
        chunk: Range<usize>,
        checkpointing: bool,
    ) -> Result<ChunkEmbeddings, Failed> {
        let (data, step) = (batch.data, batch.step);
        self.attempt(step, Phase::Forward, "embedding pass", Window::New, || {
            let rows = &batch.rows[chunk];
            let guide = self.guide_embeddings(batch, rows)?;
            let (tokens, drop) = self.columns(data, rows, step)?;
            let (emb, kept) = if checkpointing {
                let (emb, inputs) = forward_checkpoints(&self.embed_net, &tokens, &drop)?;
                let kept = LayerInputs::from_packed(&inputs, &tokens, data.columns)?;
                (emb, Some(kept))
            } else {
                (self.embed_net.forward(&tokens, &drop)?, None)
            };
            Ok((split_columns(&emb, data.columns)?, guide, kept))
        })
    }

    /// The similarity scale of `loss`: `train.scale`, or the loss's default.
    fn scale_for(&self, loss: Loss) -> f64 {
        self.scale
            .unwrap_or_else(|| crate::config::default_scale(loss.kind))
    }

    /// The cached scheme's stage 2: the loss over the whole batch from the embeddings of
    /// stage 1, and its gradient on them (times `loss_scale`).
    fn full_loss(&self, batch: Batch, embedded: Embedded, loss_scale: f64) -> Result<FullLoss> {
        let Embedded {
            parts,
            guide_parts,
            checkpoints,
        } = embedded;
        let columns = batch.data.columns;
        let full: Vec<Var> = (0..columns)
            .map(|c| Ok(Var::from_tensor(&concat_column(&parts, c)?)?))
            .collect::<Result<_>>()?;
        drop(parts);
        let guide: Vec<Tensor> = match guide_parts.is_empty() {
            true => Vec::new(),
            false => (0..columns)
                .map(|c| concat_column(&guide_parts, c))
                .collect::<Result<_>>()?,
        };
        drop(guide_parts);
        let cols: Vec<Tensor> = full.iter().map(|v| v.as_tensor().clone()).collect();
        let scores = self.scores(batch.data, batch.rows)?;
        let extra = Extra {
            labels: scores.as_ref(),
            guide: (!guide.is_empty()).then_some(guide.as_slice()),
        };
        let loss = losses::compute(
            batch.loss,
            self.scale_for(batch.loss),
            self.matryoshka.as_ref(),
            &cols,
            extra,
        )?;
        let store = loss.backward()?;
        let emb_grads: Vec<Tensor> = full
            .iter()
            .map(|v| {
                let g = store
                    .get(v.as_tensor())
                    .ok_or_else(|| Error::Internal("loss has no gradient".into()))?;
                Ok((g * loss_scale)?)
            })
            .collect::<Result<_>>()?;
        drop(store);
        Ok(FullLoss {
            loss,
            emb_grads,
            checkpoints,
        })
    }

    /// The cached scheme's stage 3 for the rows at `chunk`: pushes their cached embedding
    /// gradients back through the network, through one graph, or layer by layer with
    /// recomputation (`checkpointing`).
    fn backward_chunk(
        &self,
        batch: Batch,
        chunk: Range<usize>,
        full: &FullLoss,
        checkpointing: bool,
        grads: &mut Grads,
    ) -> Result<()> {
        self.with_sums(grads, |grads, sums| {
            self.backward_chunk_into(batch, chunk, full, checkpointing, grads, sums)
        })
    }

    fn backward_chunk_into(
        &self,
        batch: Batch,
        chunk: Range<usize>,
        full: &FullLoss,
        checkpointing: bool,
        grads: &mut Grads,
        sums: &StepSums,
    ) -> Result<()> {
        let (data, step) = (batch.data, batch.step);
        let (pos, m) = (chunk.start, chunk.len());
        let rows = &batch.rows[chunk];
        let (emb_grads, ckpts) = (&full.emb_grads, &full.checkpoints);
        if !checkpointing {
            let (cols, cuts) = self.embed(&self.train_net, data, rows, step)?;
            let mut surrogate = Tensor::zeros((), candle_core::DType::F32, &self.model.device)?;
            for (e, g) in cols.iter().zip(emb_grads) {
                surrogate = (surrogate + (e * g.narrow(0, pos, m)?)?.sum_all()?)?;
            }
            drop(cols);
            let store = self.train_net.backward(&surrogate)?;
            drop(surrogate);
            return self.finish_backward(grads, store, cuts, sums);
        }
        // All columns in one recomputing pass, their rows packed as `columns` packs them.
        let (tokens, drop) = self.columns(data, rows, step)?;
        let inputs = ckpts.packed(pos, m)?;
        let grad = pack_columns(emb_grads, pos, m)?;
        let mut sink = |store: &GradStore| self.accumulate(grads, store);
        let rows = backward_recomputing(
            &self.train_net,
            &tokens,
            &drop,
            &grad,
            inputs,
            &mut sink,
            sums,
        )?;
        match rows {
            Some(rows) => self.accumulate_rows(grads, rows),
            None => Ok(()),
        }
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

    /// Adds the word table's touched rows into its gradient of summed rows (`summed_rows.rs`,
    /// created empty the first time in the step), in token order.
    fn accumulate_rows(&self, grads: &mut Grads, rows: WordRows) -> Result<()> {
        let id = rows.table.id();
        let Some((name, _)) = self
            .model
            .params
            .vars
            .iter()
            .find(|(_, v)| v.as_tensor().id() == id)
        else {
            return Err(Error::Internal(
                "the word table is not a trainable parameter".into(),
            ));
        };
        let values = rows.grads.flatten_all()?.to_vec1::<f32>()?;
        // Into the step's rows where they exist, each row's sum continuing token after token:
        // merging a micro-batch's own sums would round differently from the uncut step.
        if let Some(Grad::Rows(summed)) = grads.get_mut(name) {
            return summed.add_tokens(&rows.ids, &values);
        }
        let (vocab, width) = rows.table.dims2()?;
        let mut summed = SummedRows::new(vocab, width);
        summed.add_tokens(&rows.ids, &values)?;
        add_grad(grads, name.clone(), Grad::Rows(summed))
    }
}

/// The cached scheme's stage 1 for one chunk: its embeddings per column, the guide's (if any)
/// and, with checkpointing, its rows' layer inputs.
type ChunkEmbeddings = (Vec<Tensor>, Option<Vec<Tensor>>, Option<LayerInputs>);

/// What the cached scheme's stage 1 leaves for stage 2: per chunk, the embeddings of each
/// column and the guide's; every row's layer inputs (with checkpointing).
struct Embedded {
    parts: Vec<Vec<Tensor>>,
    guide_parts: Vec<Vec<Tensor>>,
    checkpoints: LayerInputs,
}

/// Column `c` of every chunk, in order: (batch, dim).
fn concat_column(parts: &[Vec<Tensor>], c: usize) -> Result<Tensor> {
    let col: Vec<&Tensor> = parts.iter().map(|p| &p[c]).collect();
    Ok(Tensor::cat(&col, 0)?)
}

/// Every text column of `rows` packed row after row (packed row `r·C + c` is column `c` of
/// row `r`) into one batch on `device`, with each column's prompt tokens.
fn packed(
    data: &TokenizedData,
    rows: &[usize],
    device: &candle_core::Device,
) -> Result<TokenBatch> {
    let ids: Vec<&[u32]> = rows
        .iter()
        .flat_map(|&r| (0..data.columns).map(move |c| data.tokens[r][c].as_slice()))
        .collect();
    let prompt_tokens = rows
        .iter()
        .flat_map(|_| (0..data.columns).map(|c| data.prompt_tokens[c]))
        .collect();
    Ok(TokenBatch::new(&ids, device)?.with_prompt_tokens(prompt_tokens))
}

/// The embeddings of a batch packed by [`Runner::columns`], one tensor per column.
fn split_columns(emb: &Tensor, columns: usize) -> Result<Vec<Tensor>> {
    let (n, dim) = (emb.dim(0)? / columns.max(1), emb.dim(1)?);
    let rows = emb.reshape((n, columns, dim))?;
    (0..columns)
        .map(|c| Ok(rows.narrow(1, c, 1)?.squeeze(1)?.contiguous()?))
        .collect()
}

/// Per-column gradients of rows `pos..pos + m`, packed as [`Runner::columns`] packs them.
fn pack_columns(grads: &[Tensor], pos: usize, m: usize) -> Result<Tensor> {
    let cols = grads
        .iter()
        .map(|g| g.narrow(0, pos, m))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let dim = cols.first().map_or(Ok(0), |g| g.dim(1))?;
    Ok(Tensor::stack(&cols, 1)?.reshape((m * cols.len(), dim))?)
}

fn add(grads: &mut Grads, name: String, g: Tensor) -> Result<()> {
    add_grad(grads, name, Grad::Dense(g))
}

/// `grads[name] += g`: summed rows stay rows; a dense gradient meeting rows makes both dense
/// (the rows written into a zeroed table first, as the dense sum would hold them).
fn add_grad(grads: &mut Grads, name: String, g: Grad) -> Result<()> {
    let sum = match (grads.remove(&name), g) {
        (None, g) => g,
        (Some(Grad::Rows(mut acc)), Grad::Rows(later)) => {
            acc.merge(&later)?;
            Grad::Rows(acc)
        }
        (Some(Grad::Dense(acc)), Grad::Dense(g)) => Grad::Dense((acc + g)?),
        (Some(acc), g) => {
            let device_of = |x: &Grad| match x {
                Grad::Dense(t) => Some(t.device().clone()),
                Grad::Rows(_) => None,
            };
            let device = device_of(&acc)
                .or_else(|| device_of(&g))
                .unwrap_or(candle_core::Device::Cpu);
            Grad::Dense((acc.dense(&device)? + g.dense(&device)?)?)
        }
    };
    grads.insert(name, sum);
    Ok(())
}

/// An attempt at a micro-batch that failed, and in which phase.
struct Failed {
    phase: Phase,
    error: Error,
}

impl Failed {
    /// Ends a run of the pass: an OOM goes back to the policy, any other error ends the step.
    fn stop(self, at: usize) -> Result<Outcome> {
        if !is_oom(&self.error) {
            return Err(self.error);
        }
        Ok(Outcome::Oom {
            phase: self.phase,
            at,
        })
    }
}

/// The one chunk loop: `attempt` on rows `*done..n` of the batch, `micro` rows at a time, and
/// `keep` on what each gives, `*done` counting the rows kept. Stops at the first failed attempt:
/// `Some` OOM for the policy (a run of the pass goes on from `*done`), or the error.
fn chunks<T>(
    done: &mut usize,
    n: usize,
    micro: usize,
    mut attempt: impl FnMut(Range<usize>) -> Result<T, Failed>,
    mut keep: impl FnMut(T) -> Result<()>,
) -> Result<Option<Outcome>> {
    while *done < n {
        let m = micro.min(n - *done);
        match attempt(*done..*done + m) {
            Ok(t) => keep(t)?,
            Err(failed) => return failed.stop(*done).map(Some),
        }
        *done += m;
    }
    Ok(None)
}

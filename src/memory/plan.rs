//! Preflight estimate of a training step's peak memory, from the model config, the precision,
//! the trainable parameters and the activations each token keeps for the backward pass.
//!
//! The per-token counts follow what the CPU layer (`model/layer_op.rs`) keeps for its backward
//! pass: projections and norm outputs, but no dropout products or residual sums, and no
//! attention scores (the backward pass recomputes them), so nothing grows with `len²`.
//! Calibrated on CPU. The portable engine (`engine/portable.rs`, what CUDA runs) keeps the same,
//! but its attention pads the rows into one batch and holds a few (rows, heads, L, L) f32
//! tensors while a layer runs, (rows, heads, L, 2·window) in a local layer.
//! `st-tune bench memory` prints this estimate beside the measured peak (docs/memory.md).

use serde::Serialize;

use crate::config::{Precision, TrainSection};

/// The highest layer that attends to the whole row and the highest that attends within a
/// window (the backward pass reaches each with the most activations still held below it), and
/// how many keys either side a local layer sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionLayers {
    pub top_global: Option<usize>,
    pub top_local: Option<usize>,
    pub window: usize,
}

impl AttentionLayers {
    /// `layers` layers, layer i local with `window(i)` keys either side, or global (None).
    pub fn new(layers: usize, window: impl Fn(usize) -> Option<usize>) -> Self {
        let top = |local: bool| (0..layers).rev().find(|&i| window(i).is_some() == local);
        Self {
            top_global: top(false),
            top_local: top(true),
            window: (0..layers).find_map(window).unwrap_or(0),
        }
    }

    /// Every one of `layers` layers global.
    pub fn global(layers: usize) -> Self {
        Self::new(layers, |_| None)
    }
}

/// What the estimate needs to know of the model (`SentenceModel::plan_shape`).
#[derive(Debug, Clone, Copy)]
pub struct ModelShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    /// MPNet adds a relative-position bias to every row's scores.
    pub relative_bias: bool,
    /// ModernBERT's pre-norm layer with a GeGLU feed-forward block (`model/prenorm_op.rs`).
    pub gated_ffn: bool,
    pub params: usize,
    pub trainable: usize,
    /// Elements of the word-embedding table when it trains, else 0.
    pub trainable_word_embeddings: usize,
    /// The portable engine pads the rows for attention.
    pub padded_attention: bool,
    /// Which layers attend to the whole row and which within a window.
    pub attention: AttentionLayers,
    /// AdamW keeps the word table's moments for its touched rows only, and its gradient is
    /// summed rows (the CPU; `train/row_moments.rs`); CUDA keeps both dense.
    pub word_rows: bool,
}

/// The planner's view of a model of `shape` under the `[train]` settings, on rows of
/// `columns` texts.
pub fn plan_input(shape: &ModelShape, t: &TrainSection, columns: usize) -> PlanInput {
    let layers = shape.layers;
    // A frozen bottom runs without a graph only when nothing below it trains.
    let layers_with_graph = if t.freezes_embeddings() {
        layers.saturating_sub(t.freeze_layers)
    } else {
        layers
    };
    PlanInput {
        hidden: shape.hidden,
        intermediate: shape.intermediate,
        heads: shape.heads,
        layers,
        layers_with_graph,
        relative_bias: shape.relative_bias,
        gated_ffn: shape.gated_ffn,
        params: shape.params,
        trainable: shape.trainable,
        act_bytes: if t.precision == Precision::F32 { 4 } else { 2 },
        checkpointing: t.gradient_checkpointing,
        columns,
        batch_size: t.batch_size,
        trainable_word_embeddings: shape.trainable_word_embeddings,
        trained_layers: layers.saturating_sub(t.freeze_layers),
        padded_attention: shape.padded_attention,
        attention: shape.attention,
        // Until the data is known (`with_touched_word_rows`), every row.
        touched_word_rows: (shape.word_rows && shape.trainable_word_embeddings > 0)
            .then(|| shape.trainable_word_embeddings / shape.hidden.max(1)),
        guide: None,
    }
}

impl PlanInput {
    /// The same run on data whose rows hold `distinct` different token ids: the rows of the
    /// word table whose moments AdamW keeps, when it keeps them by row.
    pub fn with_touched_word_rows(self, distinct: usize) -> PlanInput {
        let table_rows = self.trainable_word_embeddings / self.hidden.max(1);
        PlanInput {
            touched_word_rows: self.touched_word_rows.map(|_| distinct.min(table_rows)),
            ..self
        }
    }

    /// The same run with GISTEmbedLoss's guide model of `shape` beside the trained model.
    pub fn with_guide(self, shape: &ModelShape) -> PlanInput {
        PlanInput {
            guide: Some(GuideShape {
                hidden: shape.hidden,
                intermediate: shape.intermediate,
                params: shape.params,
            }),
            ..self
        }
    }
}

/// A model that only runs forward, without a graph: GISTEmbedLoss's guide.
#[derive(Debug, Clone, Copy)]
pub struct GuideShape {
    pub hidden: usize,
    pub intermediate: usize,
    pub params: usize,
}

/// What the estimate needs to know about the model and the run.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    /// Layers that keep activations for the backward pass (all of them, unless the frozen
    /// lower part runs without a graph).
    pub layers_with_graph: usize,
    /// MPNet adds a relative-position bias to every row's scores.
    pub relative_bias: bool,
    /// ModernBERT's pre-norm GeGLU layer, which keeps other activations than the post-LN one.
    pub gated_ffn: bool,
    pub params: usize,
    pub trainable: usize,
    /// Bytes per activation element: 4 (f32) or 2 (f16/bf16).
    pub act_bytes: usize,
    pub checkpointing: bool,
    /// Text columns per row (2 for pairs).
    pub columns: usize,
    /// Rows per optimizer step: a smaller micro-batch accumulates gradients.
    pub batch_size: usize,
    /// Elements of the word-embedding table when it trains, else 0.
    pub trainable_word_embeddings: usize,
    /// Encoder layers whose parameters train.
    pub trained_layers: usize,
    /// Attention over padded rows, with its scores in memory while a layer runs (the portable
    /// engine).
    pub padded_attention: bool,
    /// Which layers attend to the whole row and which within a window.
    pub attention: AttentionLayers,
    /// The word-table rows whose AdamW moments are kept (the distinct ids of the training
    /// data), when they are kept by row; None when the table's moments and gradient are dense.
    pub touched_word_rows: Option<usize>,
    /// GISTEmbedLoss's guide model (`[guide]`), if any.
    pub guide: Option<GuideShape>,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Estimate {
    pub weights: u64,
    pub optimizer: u64,
    pub gradients: u64,
    pub activations: u64,
    /// GISTEmbedLoss's guide: its f32 weights, plus its forward pass when that is the larger
    /// part of the step's peak; 0 without a guide.
    pub guide: u64,
    pub total: u64,
}

/// Estimated peak bytes of one optimizer step whose micro-batch holds rows of `lengths`
/// tokens (each column alike).
pub fn estimate(p: &PlanInput, lengths: &[usize]) -> Estimate {
    let (h, i) = (p.hidden as u64, p.intermediate as u64);
    let tokens: u64 = lengths.iter().map(|&l| l as u64).sum::<u64>() * p.columns as u64;
    let longest = lengths.iter().copied().max().unwrap_or(0) as u64;
    let act = p.act_bytes as u64;
    // Per token and layer, in the activation type, what `model/layer_op.rs` keeps: q|k|v (3h),
    // the attention context and its projection (2h), the first norm's output (h), the
    // feed-forward's first projection (i; GELU is recomputed) and its output (h), and the
    // layer's output (h). Dropout products and residual sums are recomputed.
    // ModernBERT's layer (`model/prenorm_op.rs`) keeps q|k|v after rotation (3h), the context
    // (h), the sum between its blocks (h), the GeGLU input (2i) and its output (h); its norms'
    // outputs and the GeGLU product are recomputed.
    let per_token = if p.gated_ffn {
        6 * h + 2 * i
    } else {
        8 * h + i
    };
    let per_layer = tokens * per_token * act;
    // The embedding layer's output: the layer itself is recomputed after the encoder's backward
    // pass (model/embedding_cut.rs), so its gathers and norm keep nothing here.
    let embed = tokens * h * act;
    // The backward pass of one layer (every text column in one pass) holds intermediate-sized
    // f32 temporaries whatever the activation type: about 14 bytes per token and intermediate
    // unit (calibrated against the counting allocator at the peak; docs/memory.md).
    let scratch = tokens * i * 14;
    // MPNet's relative-position bias, (heads, L, L) f32, and its gradient.
    let bias = if p.relative_bias {
        2 * p.heads as u64 * longest * longest * 4
    } else {
        0
    };
    let layer_grads = if p.gated_ffn {
        // q|k|v and the output projection, Wi (2i × h), Wo (h × i), three norm weights.
        (4 * h * h + 3 * h * i + 3 * h) * 4
    } else {
        (4 * h * h + 2 * h * i + 9 * h + i) * 4
    };
    let rows = (lengths.len() * p.columns) as u64;
    let padded = if p.padded_attention {
        // Below the top layer, the backward pass has traded the activations of the layers
        // above for their (smaller) gradients; with checkpointing, counted as held.
        let freed = match p.checkpointing {
            true => 0,
            false => per_layer.saturating_sub(layer_grads),
        };
        padded_scores(p, rows, longest, freed)
    } else {
        0
    };
    let activations = embed
        + scratch
        + padded
        + bias
        + if p.checkpointing {
            // Every layer's input, plus one layer's activations while it is recomputed.
            tokens * h * act * p.layers as u64 + per_layer
        } else {
            per_layer * p.layers_with_graph as u64
        };
    // The f32 master copy; the CPU kernels read it directly in half precision too.
    let weights = p.params as u64 * 4;
    // The word table's moments and gradient: dense, or (CPU) the moments of the rows the data
    // touches with a slot index of 4 bytes a table row, and a step's gradient as the rows the
    // step touches, at most one per token (`train/row_moments.rs`, `train/summed_rows.rs`).
    let word = p.trainable_word_embeddings as u64;
    let step_tokens = tokens * p.batch_size as u64 / lengths.len().max(1) as u64;
    let (word_moments, word_grads) = match p.touched_word_rows {
        Some(n) => (
            n as u64 * h * 8 + word / h.max(1) * 4,
            (n as u64).min(step_tokens) * h * 4,
        ),
        None => (word * 8, word * 4),
    };
    let rest = p.trainable as u64 - word.min(p.trainable as u64);
    let optimizer = rest * 8 + word_moments;
    // f32 gradients; when a step adds up several micro-batches, the sum so far and one
    // pass's besides.
    let accumulating = lengths.len() < p.batch_size;
    let one_set = rest * 4 + word_grads;
    let gradients = one_set * if accumulating { 2 } else { 1 };
    // The backward pass walks down the layers: each frees its activations (or, recomputed,
    // the copy of its input) as its parameters' gradients appear, so at any moment it holds
    // the larger of the two sets plus one layer in flight, not their sum.
    let trained_layers = p.trained_layers as u64 * layer_grads;
    let walked = if p.checkpointing {
        // The cached scheme keeps the inputs it took for the whole step, and each pass walks
        // down a concatenated copy of them.
        let inputs = tokens * h * act * p.layers as u64;
        // Its last pass, through the embedding layer, holds the word table's gradient of the
        // pass beside its other gradients and the kept inputs: a row per token, or (dense)
        // a zeroed table and the sum it is added into.
        let word_pass = match p.touched_word_rows {
            Some(_) => 2 * tokens * h * 4,
            None => 2 * word * 4,
        };
        (activations + inputs.max(trained_layers) + layer_grads).max(inputs + one_set + word_pass)
    } else {
        let kept = per_layer * p.layers_with_graph as u64;
        activations - kept + kept.max(trained_layers) + layer_grads
    };
    // The other gradients (the word table's among them) are made by the embedding layer's
    // backward pass, after the encoder's activations are freed (model/embedding_cut.rs).
    let dynamic = if accumulating {
        one_set + walked.max(one_set)
    } else {
        walked.max(one_set)
    };
    // The guide embeds the micro-batch's rows before the trained model's forward pass (see
    // train/passes.rs), so its layer in flight and the trained model's activations are not
    // held at once: the step holds the larger of the two. Its input and output (hidden per
    // token) pass one layer at a time, beside the layer's intermediate-sized temporaries.
    let (guide_weights, guide_forward) = match p.guide {
        Some(g) => {
            let (gh, gi) = (g.hidden as u64, g.intermediate as u64);
            (g.params as u64 * 4, tokens * (6 * gh + 2 * gi) * 4)
        }
        None => (0, 0),
    };
    let total = weights + optimizer + guide_weights + dynamic.max(guide_forward);
    Estimate {
        weights,
        optimizer,
        gradients,
        activations,
        guide: guide_weights + guide_forward.saturating_sub(dynamic),
        total,
    }
}

/// The portable engine's transients above the cpu engine's, at the layer where they are most:
/// its attention backward holds three to four score-sized f32 tensors at once (probabilities,
/// mask, their gradient, one temporary), its GELU backward about two (tokens, intermediate) f32
/// ones, the same size at 128 tokens. Three of the first, calibrated against the counting
/// allocator (docs/benchmarks.md, issues 21 and 26), less `freed` bytes for each layer above.
fn padded_scores(p: &PlanInput, rows: u64, len: u64, freed: u64) -> u64 {
    let a = &p.attention;
    let at = |top: Option<usize>, per_head: u64| {
        top.map_or(0, |i| {
            let above = p.layers.saturating_sub(i + 1) as u64;
            (3 * rows * p.heads as u64 * per_head * 4).saturating_sub(above * freed)
        })
    };
    at(a.top_global, len * len).max(at(a.top_local, local_scores(a.window as u64, len)))
}

/// The scores a local layer of the portable engine holds for one row and head of up to `len`
/// tokens: blocks of the whole window (2·window queries) against twice that many keys, or
/// (L, L) where that is no smaller (as `engine::portable::local_tiles` chooses).
pub fn local_scores(window: u64, len: u64) -> u64 {
    let block = (2 * window).max(1);
    (len.div_ceil(block) * block * (block + 2 * window)).min(len * len)
}

/// The largest micro-batch of `batch`, `batch / 2`, `batch / 4`, … 1 (rounding down) whose
/// estimate fits `limit`, for rows of `longest` tokens; None when not even one row fits.
pub fn largest_fitting(p: &PlanInput, batch: usize, longest: usize, limit: u64) -> Option<usize> {
    let mut micro = batch.max(1);
    loop {
        if estimate(p, &vec![longest; micro]).total <= limit {
            return Some(micro);
        }
        if micro == 1 {
            return None;
        }
        micro /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minilm() -> PlanInput {
        PlanInput {
            hidden: 384,
            intermediate: 1536,
            heads: 12,
            layers: 6,
            layers_with_graph: 6,
            relative_bias: false,
            gated_ffn: false,
            params: 22_700_000,
            trainable: 22_500_000,
            act_bytes: 4,
            checkpointing: false,
            columns: 2,
            batch_size: 32,
            trainable_word_embeddings: 30522 * 384,
            trained_layers: 6,
            padded_attention: false,
            attention: AttentionLayers::global(6),
            touched_word_rows: None,
            guide: None,
        }
    }

    #[test]
    fn activations_grow_with_tokens_and_checkpointing_shrinks_them() {
        let p = minilm();
        let small = estimate(&p, &[32; 8]);
        let big = estimate(&p, &[32; 16]);
        assert!(big.activations > small.activations * 19 / 10);
        let ckpt = estimate(
            &PlanInput {
                checkpointing: true,
                ..p
            },
            &[32; 16],
        );
        assert!(ckpt.activations < big.activations / 2);
    }

    #[test]
    fn a_modernbert_layer_counts_its_own_kept_activations() {
        let p = PlanInput {
            gated_ffn: true,
            ..minilm()
        };
        let (gated, post_ln) = (estimate(&p, &[100; 4]), estimate(&minilm(), &[100; 4]));
        // 800 tokens (2 columns of 4 rows of 100) in 6 layers, each keeping
        // (6h + 2i) − (8h + i) = i − 2h = 768 more f32 values per token.
        let more = 800 * 6 * 768 * 4;
        assert_eq!(gated.activations - post_ln.activations, more);
    }

    #[test]
    fn the_largest_fitting_micro_batch_is_found_by_halving() {
        let p = minilm();
        let limit = estimate(&p, &[128; 8]).total;
        assert_eq!(largest_fitting(&p, 32, 128, limit), Some(8));
        assert_eq!(largest_fitting(&p, 32, 128, 1), None);
    }

    #[test]
    fn a_guide_adds_its_weights_and_shrinks_the_fitting_micro_batch() {
        let p = minilm();
        let guided = p.with_guide(&ModelShape {
            hidden: 768,
            intermediate: 3072,
            heads: 12,
            layers: 12,
            relative_bias: true,
            gated_ffn: false,
            params: 109_500_000,
            trainable: 0,
            trainable_word_embeddings: 0,
            padded_attention: false,
            attention: AttentionLayers::global(6),
            word_rows: false,
        });
        let (plain, with) = (estimate(&p, &[128; 8]), estimate(&guided, &[128; 8]));
        assert!(with.total >= plain.total + 109_500_000 * 4);
        assert_eq!(with.total - plain.total, with.guide);
        assert_eq!(plain.guide, 0);
        let limit = plain.total;
        assert_eq!(largest_fitting(&p, 32, 128, limit), Some(8));
        assert!(largest_fitting(&guided, 32, 128, limit) < Some(8));
    }

    #[test]
    fn moments_kept_by_row_count_the_rows_the_data_touches() {
        let dense = minilm();
        let by_row = PlanInput {
            touched_word_rows: Some(30522),
            ..minilm()
        }
        .with_touched_word_rows(1000);
        let (d, r) = (estimate(&dense, &[32; 32]), estimate(&by_row, &[32; 32]));
        // Two f32 moments of 29,522 untouched rows of 384 fewer, a 4-byte slot index more.
        assert_eq!(d.optimizer - r.optimizer, 29_522 * 384 * 8 - 30_522 * 4);
        // The step's gradient: the 1000 rows (2048 tokens could touch more) instead of the
        // table.
        assert_eq!(d.gradients - r.gradients, (30_522 - 1000) * 384 * 4);
        // Dense stays dense whatever the data.
        assert_eq!(dense.with_touched_word_rows(5).touched_word_rows, None);
    }

    #[test]
    fn the_portable_engine_s_local_layers_count_their_scores_by_the_window() {
        // ModernBERT-like, 3 layers of 64 keys either side, at 8192 tokens a row: all local, or
        // layer 0 global.
        let run = |global: bool| PlanInput {
            padded_attention: true,
            attention: AttentionLayers::new(3, |i| (i > 0 || !global).then_some(64)),
            layers: 3,
            layers_with_graph: 3,
            ..minilm()
        };
        assert_eq!(local_scores(64, 8192), 8192 * 256);
        // At 200 tokens the blocks (256 × 256) are no smaller than (200, 200).
        assert_eq!(local_scores(64, 200), 200 * 200);
        let (local, global) = (
            estimate(&run(false), &[8192]),
            estimate(&run(true), &[8192]),
        );
        // 2 columns, 12 heads, 3 score-sized f32 tensors: at the top layer when all are local;
        // at layer 0, under two layers that freed their activations, with one global layer.
        let scores = |per_head: u64| 3 * 2 * 12 * per_head * 4;
        let plain = estimate(
            &PlanInput {
                padded_attention: false,
                ..run(false)
            },
            &[8192],
        )
        .total;
        assert_eq!(local.total - plain, scores(8192 * 256));
        assert!(global.total - plain < scores(8192 * 8192));
        assert!(global.total - plain > scores(8192 * 8192) * 9 / 10);
    }
}

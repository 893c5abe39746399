//! Preflight estimate of a training step's peak memory, from the model config, the precision,
//! the trainable parameters and the activations each token keeps for the backward pass.
//!
//! The per-token counts follow what `model::layers::EncoderLayer::forward` keeps alive in the
//! autograd graph (linear outputs and their bias sums, per-row head copies, residual sums,
//! norm outputs, dropout masks and products, feed-forward activations) and the per-row
//! attention tensors (scores, softmax, dropout mask and product: `heads · len²` each).
//! `st-tune bench memory` prints this estimate beside the measured peak (docs/memory.md).

use serde::Serialize;

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
    pub params: usize,
    pub trainable: usize,
    /// Bytes per activation element: 4 (f32) or 2 (f16/bf16).
    pub act_bytes: usize,
    pub checkpointing: bool,
    /// Text columns per row (2 for pairs).
    pub columns: usize,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Estimate {
    pub weights: u64,
    pub optimizer: u64,
    pub gradients: u64,
    pub activations: u64,
    pub total: u64,
}

/// Estimated peak bytes of one optimizer step whose micro-batch holds rows of `lengths`
/// tokens (each column alike).
pub fn estimate(p: &PlanInput, lengths: &[usize]) -> Estimate {
    let (h, i) = (p.hidden as u64, p.intermediate as u64);
    let tokens: u64 = lengths.iter().map(|&l| l as u64).sum::<u64>() * p.columns as u64;
    let sq: u64 = lengths.iter().map(|&l| (l * l) as u64).sum::<u64>() * p.columns as u64;
    let act = p.act_bytes as u64;
    // Per token and layer, counted from what `EncoderLayer::forward` keeps (19 hidden-wide and 2
    // intermediate-wide tensors with the fused f32 kernels) and scaled to what the counting
    // allocator measured at the peak of the backward pass (docs/memory.md): 27 and 3. Per row
    // and layer: scores, softmax, dropout mask and product (+ MPNet's bias) are kept, in f32,
    // and the backward pass adds as much again: 8 (10) tensors of heads · len².
    let per_layer_f32 =
        tokens * (27 * h + 3 * i) * 4 + sq * p.heads as u64 * (8 + 2 * p.relative_bias as u64) * 4;
    // Half precision on CPU keeps most tensors in f32 too (norms, softmax, casts of both
    // kinds): measured 7 % less than f32, not half.
    let per_layer = if act < 4 {
        per_layer_f32 / 100 * 93
    } else {
        per_layer_f32
    };
    let embed = tokens * 6 * h * 4;
    let activations = if p.checkpointing {
        // Every layer's input, plus one layer's activations for one text column at a time
        // while it is recomputed.
        tokens * h * act * (p.layers as u64 + 1) + per_layer / p.columns.max(1) as u64 + embed
    } else {
        per_layer * p.layers_with_graph as u64 + embed
    };
    let weights = p.params as u64 * 4 + if act < 4 { p.params as u64 * act } else { 0 };
    let optimizer = p.trainable as u64 * 8;
    // The step's accumulated gradients, and one micro-batch's being added to them.
    let gradients = p.trainable as u64 * 8;
    let total = weights + optimizer + gradients + activations;
    Estimate {
        weights,
        optimizer,
        gradients,
        activations,
        total,
    }
}

/// The largest micro-batch (a power of two no larger than `batch`) whose estimate fits `limit`,
/// for rows of `longest` tokens; None when not even one row fits.
pub fn largest_fitting(p: &PlanInput, batch: usize, longest: usize, limit: u64) -> Option<usize> {
    let mut micro = batch.next_power_of_two().min(batch.max(1));
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
            params: 22_700_000,
            trainable: 22_500_000,
            act_bytes: 4,
            checkpointing: false,
            columns: 2,
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
        assert!(ckpt.activations < big.activations / 3);
    }

    #[test]
    fn the_largest_fitting_micro_batch_is_found_by_halving() {
        let p = minilm();
        let limit = estimate(&p, &[128; 8]).total;
        assert_eq!(largest_fitting(&p, 32, 128, limit), Some(8));
        assert_eq!(largest_fitting(&p, 32, 128, 1), None);
    }
}

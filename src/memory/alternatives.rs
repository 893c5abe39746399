//! When even one row per pass does not fit: what would. The planner is run on the shapes of
//! smaller sentence-transformers models st-tune knows (`model::known`, no download needed), with
//! everything else of the run unchanged, and on the run as configured, to name the memory it
//! needs.

use crate::memory::human_bytes;
use crate::memory::plan::{estimate, AttentionLayers, PlanInput};

/// A model the planner may propose instead of the run's, from its config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub id: &'static str,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    /// MPNet adds a relative-position bias to every row's scores.
    pub relative_bias: bool,
    /// Parameters of its encoder.
    pub params: usize,
    /// Rows of its word-embedding table.
    pub vocab: usize,
    /// How far it is from the run's model (0 nearest): proposed in this order, then the larger
    /// (better) models first.
    pub distance: u8,
}

/// The `candidates` that the planner says fit `budget` at one row of `longest` tokens per pass,
/// nearest first, with their estimated peaks.
pub fn models_that_fit(
    run: &PlanInput,
    candidates: &[Candidate],
    longest: usize,
    budget: u64,
) -> Vec<(&'static str, u64)> {
    let mut fit: Vec<(u8, &'static str, u64)> = candidates
        .iter()
        .filter_map(|k| {
            let peak = estimate(&as_model(run, k), &[longest]).total;
            (peak <= budget).then_some((k.distance, k.id, peak))
        })
        .collect();
    fit.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)));
    fit.into_iter().map(|(_, id, peak)| (id, peak)).collect()
}

/// `run` with `k`'s shape: the same share of parameters trains, the same levers are on.
fn as_model(run: &PlanInput, k: &Candidate) -> PlanInput {
    let share = run.trainable as f64 / run.params.max(1) as f64;
    let frozen_layers = run.layers - run.layers_with_graph;
    PlanInput {
        hidden: k.hidden,
        intermediate: k.intermediate,
        heads: k.heads,
        layers: k.layers,
        layers_with_graph: k.layers.saturating_sub(frozen_layers),
        relative_bias: k.relative_bias,
        // Every known model is post-LN (model/known.rs), global attention only.
        gated_ffn: false,
        attention: AttentionLayers::global(k.layers),
        params: k.params,
        trainable: (k.params as f64 * share) as usize,
        trainable_word_embeddings: if run.trainable_word_embeddings > 0 {
            k.vocab * k.hidden
        } else {
            0
        },
        trained_layers: k.layers.saturating_sub(run.layers - run.trained_layers),
        ..*run
    }
}

/// One sentence for an out-of-memory message: the memory the run as configured needs, and the
/// smaller models that would fit the budget.
pub fn advice(
    run: &PlanInput,
    candidates: &[Candidate],
    micro: usize,
    longest: usize,
    budget: Option<u64>,
) -> String {
    let needs = estimate(run, &vec![longest; micro.max(1)]).total;
    let mut s = format!(
        "As configured (micro-batch {micro} of {longest}-token rows), a step needs about {} of \
         device memory",
        human_bytes(needs)
    );
    if let Some(budget) = budget {
        let fit = models_that_fit(run, candidates, longest, budget);
        if !fit.is_empty() {
            let names: Vec<String> = fit
                .iter()
                .map(|(id, peak)| format!("{id} (about {})", human_bytes(*peak)))
                .collect();
            s.push_str(&format!(
                "; smaller models that fit {} at one row per pass: {}",
                human_bytes(budget),
                names.join(", ")
            ));
        }
    }
    s.push('.');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> PlanInput {
        PlanInput {
            hidden: 768,
            intermediate: 3072,
            heads: 12,
            layers: 12,
            layers_with_graph: 12,
            relative_bias: true,
            gated_ffn: false,
            params: 109_486_464,
            trainable: 109_486_464,
            act_bytes: 4,
            checkpointing: false,
            columns: 2,
            batch_size: 16,
            trainable_word_embeddings: 30527 * 768,
            trained_layers: 12,
            padded_attention: false,
            attention: AttentionLayers::global(12),
            touched_word_rows: None,
            guide: None,
        }
    }

    fn candidate(id: &'static str, layers: usize, distance: u8) -> Candidate {
        Candidate {
            id,
            hidden: 384,
            intermediate: 1536,
            heads: 12,
            layers,
            relative_bias: false,
            params: 1_000_000 * layers,
            vocab: 30522,
            distance,
        }
    }

    #[test]
    fn the_nearest_models_that_fit_come_first_then_the_larger() {
        let run = run();
        let floor = |k: &Candidate| estimate(&as_model(&run, k), &[512]).total;
        let (far_big, near_small, near_big, too_big) = (
            candidate("far-big", 6, 1),
            candidate("near-small", 3, 0),
            candidate("near-big", 6, 0),
            candidate("too-big", 24, 0),
        );
        assert!(floor(&near_small) < floor(&near_big) && floor(&near_big) < floor(&too_big));
        let budget = (floor(&near_big) + floor(&too_big)) / 2;
        let all = [far_big, near_small, near_big.clone(), too_big];
        let fit = models_that_fit(&run, &all, 512, budget);
        let ids: Vec<&str> = fit.iter().map(|f| f.0).collect();
        assert_eq!(ids, ["near-big", "near-small", "far-big"]);
        assert_eq!(fit[0].1, floor(&near_big));
        let text = advice(&run, &all, 16, 512, Some(budget));
        assert!(
            text.contains("near-big (about") && text.contains("a step needs about"),
            "{text}"
        );
    }

    #[test]
    fn nothing_is_suggested_when_nothing_fits() {
        let all = [candidate("a", 3, 0)];
        assert!(models_that_fit(&run(), &all, 512, 1 << 20).is_empty());
        assert!(!advice(&run(), &all, 1, 512, Some(1 << 20)).contains("smaller models"));
    }
}

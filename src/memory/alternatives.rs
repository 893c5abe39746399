//! When even one row per pass does not fit: what would. The planner is run on the shapes of
//! smaller sentence-transformers models st-tune knows (no download needed), with everything
//! else of the run unchanged, and on the run as configured, to name the memory it needs.

use crate::memory::human_bytes;
use crate::memory::plan::{estimate, PlanInput};

/// A model whose shape st-tune knows.
struct Known {
    id: &'static str,
    /// "bert" or "mpnet": a smaller model of the same family is the first suggestion.
    family: &'static str,
    hidden: usize,
    intermediate: usize,
    heads: usize,
    layers: usize,
    params: usize,
}

/// From their config.json files (parameter counts of the whole model, embeddings included).
const KNOWN: &[Known] = &[
    Known {
        id: "sentence-transformers/paraphrase-MiniLM-L3-v2",
        family: "bert",
        hidden: 384,
        intermediate: 1536,
        heads: 12,
        layers: 3,
        params: 17_389_824,
    },
    Known {
        id: "sentence-transformers/all-MiniLM-L6-v2",
        family: "bert",
        hidden: 384,
        intermediate: 1536,
        heads: 12,
        layers: 6,
        params: 22_713_216,
    },
    Known {
        id: "sentence-transformers/all-MiniLM-L12-v2",
        family: "bert",
        hidden: 384,
        intermediate: 1536,
        heads: 12,
        layers: 12,
        params: 33_360_000,
    },
    Known {
        id: "sentence-transformers/all-mpnet-base-v2",
        family: "mpnet",
        hidden: 768,
        intermediate: 3072,
        heads: 12,
        layers: 12,
        params: 109_486_464,
    },
];

/// The known models smaller than the run's that the planner says fit `budget` at one row of
/// `longest` tokens per pass, same family first, with their estimated peaks.
pub fn smaller_models_that_fit(
    run: &PlanInput,
    family: &str,
    longest: usize,
    budget: u64,
) -> Vec<(&'static str, u64)> {
    let mut fit: Vec<(bool, &'static str, u64)> = KNOWN
        .iter()
        .filter(|k| k.params < run.params)
        .filter_map(|k| {
            let p = as_model(run, k);
            let peak = estimate(&p, &[longest]).total;
            (peak <= budget).then_some((k.family != family, k.id, peak))
        })
        .collect();
    // Same family first, then the larger (better) models first.
    fit.sort_by(|a, b| a.0.cmp(&b.0).then(b.2.cmp(&a.2)));
    fit.into_iter().map(|(_, id, peak)| (id, peak)).collect()
}

/// `run` with `k`'s shape: the same share of parameters trains, the same levers are on.
fn as_model(run: &PlanInput, k: &Known) -> PlanInput {
    let share = run.trainable as f64 / run.params.max(1) as f64;
    let frozen_layers = run.layers - run.layers_with_graph;
    PlanInput {
        hidden: k.hidden,
        intermediate: k.intermediate,
        heads: k.heads,
        layers: k.layers,
        layers_with_graph: k.layers.saturating_sub(frozen_layers),
        relative_bias: k.family == "mpnet",
        params: k.params,
        trainable: (k.params as f64 * share) as usize,
        // Both families use BERT's 30522-token vocabulary (MPNet 30527): close enough here.
        trainable_word_embeddings: if run.trainable_word_embeddings > 0 {
            30522 * k.hidden
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
    family: &str,
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
        let fit = smaller_models_that_fit(run, family, longest, budget);
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

    fn mpnet() -> PlanInput {
        PlanInput {
            hidden: 768,
            intermediate: 3072,
            heads: 12,
            layers: 12,
            layers_with_graph: 12,
            relative_bias: true,
            params: 109_486_464,
            trainable: 109_486_464,
            act_bytes: 4,
            checkpointing: false,
            columns: 2,
            batch_size: 16,
            trainable_word_embeddings: 30527 * 768,
            trained_layers: 12,
            padded_attention: false,
            guide: None,
        }
    }

    #[test]
    fn a_budget_too_small_for_mpnet_suggests_the_minilms_that_fit() {
        let run = mpnet();
        let mpnet_floor = estimate(&run, &[512]).total;
        let minilm = as_model(&run, &KNOWN[1]);
        let minilm_floor = estimate(&minilm, &[512]).total;
        assert!(minilm_floor < mpnet_floor);
        let budget = (minilm_floor + mpnet_floor) / 2;
        let fit = smaller_models_that_fit(&run, "mpnet", 512, budget);
        let ids: Vec<&str> = fit.iter().map(|f| f.0).collect();
        assert!(
            ids.contains(&"sentence-transformers/all-MiniLM-L6-v2"),
            "{ids:?}"
        );
        assert!(!ids.contains(&"sentence-transformers/all-mpnet-base-v2"));
        assert!(fit.iter().all(|f| f.1 <= budget));
        let text = advice(&run, "mpnet", 16, 512, Some(budget));
        assert!(
            text.contains("all-MiniLM-L6-v2") && text.contains("a step needs about"),
            "{text}"
        );
    }

    #[test]
    fn nothing_smaller_is_suggested_when_nothing_fits() {
        assert!(smaller_models_that_fit(&mpnet(), "mpnet", 512, 1 << 20).is_empty());
    }
}

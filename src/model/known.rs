//! Sentence-transformers models whose config.json st-tune carries, so that `plan` and an
//! out-of-memory stop can name smaller models that would fit (`memory::alternatives`) without
//! downloading anything. Each is parsed as any checkpoint's config is, and its shape and
//! parameter count come from the model definition, whatever its family.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::Result;
use crate::memory::alternatives::Candidate;
use crate::model::config::ModelConfig;
use crate::model::weights::Weights;
use crate::model::Encoder;

/// Hub id and the config.json keys the encoder reads.
const KNOWN: &[(&str, &str)] = &[
    (
        "sentence-transformers/paraphrase-MiniLM-L3-v2",
        r#"{"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 3,
            "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512}"#,
    ),
    (
        "sentence-transformers/all-MiniLM-L6-v2",
        r#"{"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512}"#,
    ),
    (
        "sentence-transformers/all-MiniLM-L12-v2",
        r#"{"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512}"#,
    ),
    (
        "sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2",
        r#"{"model_type": "bert", "vocab_size": 250037, "hidden_size": 384, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 1536, "max_position_embeddings": 512}"#,
    ),
    (
        "sentence-transformers/msmarco-distilbert-base-v4",
        r#"{"model_type": "distilbert", "vocab_size": 30522, "dim": 768, "n_layers": 6,
            "n_heads": 12, "hidden_dim": 3072, "max_position_embeddings": 512}"#,
    ),
    (
        "sentence-transformers/all-distilroberta-v1",
        r#"{"model_type": "roberta", "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 6,
            "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
            "type_vocab_size": 1, "pad_token_id": 1, "layer_norm_eps": 1e-5}"#,
    ),
    (
        "sentence-transformers/all-mpnet-base-v2",
        r#"{"model_type": "mpnet", "vocab_size": 30527, "hidden_size": 768, "num_hidden_layers": 12,
            "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 514,
            "relative_attention_num_buckets": 32, "pad_token_id": 1, "layer_norm_eps": 1e-5}"#,
    ),
    (
        "intfloat/multilingual-e5-base",
        r#"{"model_type": "xlm-roberta", "vocab_size": 250002, "hidden_size": 768,
            "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
            "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
            "layer_norm_eps": 1e-5}"#,
    ),
];

/// A vocabulary this large covers many scripts: the model is multilingual. A model for other
/// languages than the run's is a worse proposal than one of another family.
const MULTILINGUAL_VOCAB: usize = 100_000;

/// The known models with fewer encoder parameters than `run`'s, as the planner's candidates:
/// those for the same languages (by vocabulary) first, then those of the same family.
pub fn smaller_than(run: &ModelConfig) -> Result<Vec<Candidate>> {
    let run_params = encoder_params(run)?;
    let multilingual = |c: &ModelConfig| c.sizes().vocab >= MULTILINGUAL_VOCAB;
    let mut out = Vec::new();
    for (id, config) in KNOWN {
        let c = parse(id, config)?;
        let params = encoder_params(&c)?;
        if params >= run_params {
            continue;
        }
        let s = c.sizes();
        let other_languages = multilingual(&c) != multilingual(run);
        let other_family = std::mem::discriminant(&c) != std::mem::discriminant(run);
        out.push(Candidate {
            id,
            hidden: s.hidden,
            intermediate: s.intermediate,
            heads: s.heads,
            layers: s.layers,
            relative_bias: c.relative_bias(),
            params,
            vocab: s.vocab,
            distance: 2 * other_languages as u8 + other_family as u8,
        });
    }
    Ok(out)
}

fn parse(id: &str, config: &str) -> Result<ModelConfig> {
    let path = Path::new(id).join("config.json");
    let value: Value = serde_json::from_str(config)
        .map_err(|e| crate::Error::model(&path, format!("known config: {e}")))?;
    ModelConfig::parse(&path, &value)
}

/// Parameters of the encoder `config` defines (no pooler, no head): the elements of every
/// tensor the model definition asks for.
pub fn encoder_params(config: &ModelConfig) -> Result<usize> {
    let counter = Counter::default();
    Encoder::load(&counter, config)?;
    Ok(counter.elements.get())
}

/// Hands out storage-free tensors of the shapes asked for, counting their elements.
#[derive(Default)]
struct Counter {
    elements: std::cell::Cell<usize>,
}

impl Weights for Counter {
    fn get(&self, _name: &str, shape: &[usize]) -> Result<Tensor> {
        self.elements
            .set(self.elements.get() + shape.iter().product::<usize>());
        // One element broadcast to the shape: nothing of the shape's size is allocated.
        Ok(Tensor::zeros((), DType::F32, &Device::Cpu)?.broadcast_as(shape)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::alternatives::models_that_fit;
    use crate::memory::plan::{estimate, AttentionLayers, PlanInput};

    fn config(id: &str) -> ModelConfig {
        let (id, c) = KNOWN.iter().find(|k| k.0 == id).unwrap();
        parse(id, c).unwrap()
    }

    /// A run of `config` with everything training, f32, pairs of 16.
    fn run_of(config: &ModelConfig) -> PlanInput {
        let s = config.sizes();
        let params = encoder_params(config).unwrap();
        PlanInput {
            hidden: s.hidden,
            intermediate: s.intermediate,
            heads: s.heads,
            layers: s.layers,
            layers_with_graph: s.layers,
            relative_bias: config.relative_bias(),
            gated_ffn: config.gated_ffn(),
            params,
            trainable: params,
            act_bytes: 4,
            checkpointing: false,
            columns: 2,
            batch_size: 16,
            trainable_word_embeddings: s.vocab * s.hidden,
            trained_layers: s.layers,
            padded_attention: false,
            attention: AttentionLayers::new(s.layers, |i| config.local_window(i)),
            touched_word_rows: None,
            guide: None,
        }
    }

    fn checkpoint_elements(family: &str) -> usize {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/families")
            .join(family)
            .join("model/model.safetensors");
        // The pooler is not part of a sentence-transformer's encoder.
        candle_core::safetensors::load(path, &Device::Cpu)
            .unwrap()
            .iter()
            .filter(|(k, t)| t.dtype().is_float() && !k.starts_with("pooler."))
            .map(|(_, t)| t.elem_count())
            .sum()
    }

    #[test]
    fn every_known_config_parses() {
        for (id, c) in KNOWN {
            parse(id, c).unwrap();
        }
    }

    #[test]
    fn the_parameter_count_is_the_checkpoints_for_every_family() {
        for family in ["xlm-roberta", "roberta", "distilbert", "modernbert"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/families")
                .join(family)
                .join("model");
            let text = std::fs::read_to_string(dir.join("config.json")).unwrap();
            let c = ModelConfig::parse(&dir, &serde_json::from_str(&text).unwrap()).unwrap();
            assert_eq!(
                encoder_params(&c).unwrap(),
                checkpoint_elements(family),
                "{family}"
            );
        }
        // all-MiniLM-L6-v2's checkpoint: 22,713,216 with a 384 x 384 pooler and its bias.
        let minilm = config("sentence-transformers/all-MiniLM-L6-v2");
        assert_eq!(encoder_params(&minilm).unwrap(), 22_713_216 - 384 * 385);
    }

    #[test]
    fn a_distilbert_run_that_does_not_fit_is_offered_english_minilms_not_itself() {
        let distil = config("sentence-transformers/msmarco-distilbert-base-v4");
        let candidates = smaller_than(&distil).unwrap();
        let ids: Vec<&str> = candidates.iter().map(|c| c.id).collect();
        assert!(!ids.iter().any(|id| id.contains("distil")), "{ids:?}");
        assert!(!ids.contains(&"sentence-transformers/all-mpnet-base-v2"));
        let run = run_of(&distil);
        let l6 = candidates
            .iter()
            .find(|c| c.id == "sentence-transformers/all-MiniLM-L6-v2")
            .unwrap();
        assert_eq!(l6.vocab, 30522);
        assert_eq!(l6.distance, 1, "English, another family");
        let distil_floor = estimate(&run, &[512]).total;
        let budget = distil_floor - 1;
        let fit = models_that_fit(&run, &candidates, 512, budget);
        assert!(!fit.is_empty() && fit.iter().all(|f| f.1 <= budget));
        // The multilingual MiniLM (its 250k-row table) comes after every English one.
        let pos = |id: &str| fit.iter().position(|f| f.0 == id);
        let multi = pos("sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2");
        let l12 = pos("sentence-transformers/all-MiniLM-L12-v2").unwrap();
        assert!(multi.is_none_or(|m| m > l12), "{fit:?}");
    }

    #[test]
    fn an_xlm_roberta_run_that_does_not_fit_is_offered_the_multilingual_minilm_first() {
        let xlmr = config("intfloat/multilingual-e5-base");
        let candidates = smaller_than(&xlmr).unwrap();
        let run = run_of(&xlmr);
        let budget = estimate(&run, &[512]).total - 1;
        let fit = models_that_fit(&run, &candidates, 512, budget);
        assert_eq!(
            fit.first().map(|f| f.0),
            Some("sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"),
            "{fit:?}"
        );
        assert!(fit.iter().all(|f| f.0 != "intfloat/multilingual-e5-base"));
        // The multilingual MiniLM's word table trains: the estimate counts its 250037 rows.
        let multi = &candidates
            .iter()
            .find(|c| c.id.contains("multilingual-MiniLM"))
            .unwrap();
        assert_eq!((multi.vocab, multi.distance), (250037, 1));
    }
}

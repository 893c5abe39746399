//! The transformer's `config.json`, parsed once into one variant per model family, tagged by
//! `model_type` (as text-embeddings-inference does). Everything else asks the variant: the
//! encoder's sizes, its dropout, the tensor names of its layers and embeddings, how many tokens
//! its positions hold. Adding a family is a variant here (and in [`SUPPORTED`]) and its names
//! and sizes in a file of its own; nothing outside `model/` matches on `model_type`.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::bert::{BertConfig, RobertaConfig};
use crate::model::distilbert::DistilBertConfig;
use crate::model::embeddings::EmbeddingNames;
use crate::model::layers::LayerNames;
use crate::model::modernbert::ModernBertConfig;
use crate::model::mpnet::MpnetConfig;
use crate::model::sizes::{DropoutProbs, Sizes};

/// One model family's config.json.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "model_type")]
pub enum ModelConfig {
    #[serde(rename = "bert")]
    Bert(BertConfig),
    #[serde(rename = "mpnet")]
    Mpnet(MpnetConfig),
    #[serde(rename = "xlm-roberta")]
    XlmRoberta(RobertaConfig),
    /// RoBERTa (all-distilroberta-v1, all-roberta-large-v1): transformers' XLMRobertaModel
    /// is a copy of RobertaModel, so the same network; only the tokenizer (byte-level BPE)
    /// differs, and tokenizer.json carries that.
    #[serde(rename = "roberta")]
    Roberta(RobertaConfig),
    #[serde(rename = "distilbert")]
    DistilBert(DistilBertConfig),
    /// ModernBERT: pre-norm layers with rotary positions, local and global attention, GeGLU
    /// (`modernbert.rs`); its own layer, not the post-LN one.
    #[serde(rename = "modernbert")]
    ModernBert(ModernBertConfig),
}

/// The `model_type`s st-tune reads, for the error that names the others.
pub const SUPPORTED: &[&str] = &[
    "bert",
    "distilbert",
    "modernbert",
    "mpnet",
    "roberta",
    "xlm-roberta",
];

impl ModelConfig {
    /// Parses `config` (the contents of `path`), naming the supported types for any other.
    pub fn parse(path: &Path, config: &Value) -> Result<Self> {
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::model(path, "no `model_type` key"))?;
        if !SUPPORTED.contains(&model_type) {
            return Err(Error::model(
                path,
                format!(
                    "unknown model_type `{model_type}`; st-tune supports {}",
                    SUPPORTED
                        .iter()
                        .map(|t| format!("`{t}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let parsed: Self = serde_json::from_value(config.clone())
            .map_err(|e| Error::model(path, format!("{model_type} config: {e}")))?;
        parsed.check(path)?;
        Ok(parsed)
    }

    /// What st-tune cannot compute, refused at load time.
    fn check(&self, path: &Path) -> Result<()> {
        let act = match self {
            ModelConfig::Bert(c) => &c.hidden_act,
            ModelConfig::XlmRoberta(c) | ModelConfig::Roberta(c) => &c.bert.hidden_act,
            ModelConfig::DistilBert(c) => &c.activation,
            ModelConfig::Mpnet(_) => return Ok(()),
            ModelConfig::ModernBert(c) => return c.check(path),
        };
        if !act.starts_with("gelu") {
            return Err(Error::model(
                path,
                format!("hidden_act `{act}` is not supported (only gelu)"),
            ));
        }
        Ok(())
    }

    /// `model_type` as config.json spells it.
    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::Bert(_) => "bert",
            ModelConfig::Mpnet(_) => "mpnet",
            ModelConfig::XlmRoberta(_) => "xlm-roberta",
            ModelConfig::Roberta(_) => "roberta",
            ModelConfig::DistilBert(_) => "distilbert",
            ModelConfig::ModernBert(_) => "modernbert",
        }
    }

    pub fn sizes(&self) -> Sizes {
        match self {
            ModelConfig::Bert(c)
            | ModelConfig::XlmRoberta(RobertaConfig { bert: c, .. })
            | ModelConfig::Roberta(RobertaConfig { bert: c, .. }) => c.sizes(),
            ModelConfig::Mpnet(c) => c.sizes(),
            ModelConfig::DistilBert(c) => c.sizes(),
            ModelConfig::ModernBert(c) => c.sizes(),
        }
    }

    pub fn dropout(&self) -> DropoutProbs {
        match self {
            ModelConfig::Bert(c)
            | ModelConfig::XlmRoberta(RobertaConfig { bert: c, .. })
            | ModelConfig::Roberta(RobertaConfig { bert: c, .. }) => c.dropout(),
            ModelConfig::Mpnet(c) => c.dropout(),
            ModelConfig::DistilBert(c) => c.dropout(),
            ModelConfig::ModernBert(c) => c.dropout(),
        }
    }

    /// The tensor names of post-LN layer `i`; None for ModernBERT, whose layers are of
    /// another kind (`modernbert::ModernBertLayer` names its own).
    pub fn layer_names(&self, i: usize) -> Option<LayerNames> {
        Some(match self {
            ModelConfig::Bert(_) | ModelConfig::XlmRoberta(_) | ModelConfig::Roberta(_) => {
                crate::model::bert::layer_names(i)
            }
            ModelConfig::Mpnet(_) => crate::model::mpnet::layer_names(i),
            ModelConfig::DistilBert(_) => crate::model::distilbert::layer_names(i),
            ModelConfig::ModernBert(_) => return None,
        })
    }

    /// The embedding layer's tensors and position numbering.
    pub fn embedding_names(&self) -> EmbeddingNames {
        match self {
            ModelConfig::Bert(c) => EmbeddingNames::bert(c.type_vocab_size, 0),
            // RoBERTa and MPNet number real tokens from the padding index + 1.
            ModelConfig::XlmRoberta(c) | ModelConfig::Roberta(c) => {
                EmbeddingNames::bert(c.bert.type_vocab_size, c.pad_token_id + 1)
            }
            ModelConfig::Mpnet(c) => EmbeddingNames::without_types(c.pad_token_id + 1),
            ModelConfig::DistilBert(_) => EmbeddingNames::without_types(0),
            ModelConfig::ModernBert(c) => EmbeddingNames::modernbert(c.norm_bias),
        }
    }

    /// Whether the attention block's output gets hidden dropout before its residual sum
    /// (DistilBERT's does not).
    pub fn drops_attention_output(&self) -> bool {
        !matches!(self, ModelConfig::DistilBert(_))
    }

    /// The most tokens a text can have: the position table's rows after the offset.
    pub fn max_tokens(&self) -> usize {
        let offset = self.embedding_names().position_offset as usize;
        self.sizes().positions.saturating_sub(offset)
    }

    /// Whether the layers add MPNet's learned relative-position bias to their scores.
    pub fn relative_bias(&self) -> bool {
        matches!(self, ModelConfig::Mpnet(_))
    }

    /// Whether the layers are ModernBERT's pre-norm GeGLU ones (the memory planner counts
    /// their activations apart).
    pub fn gated_ffn(&self) -> bool {
        matches!(self, ModelConfig::ModernBert(_))
    }

    /// How many tokens either side layer `i` sees when it attends within a window (ModernBERT's
    /// local layers); None when it sees the whole row.
    pub fn local_window(&self, i: usize) -> Option<usize> {
        match self {
            ModelConfig::ModernBert(c) => c.is_local(i).then(|| c.half_window()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_unknown_model_type_is_named_with_the_supported_ones() {
        let e = ModelConfig::parse(Path::new("config.json"), &json!({"model_type": "gpt2"}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`gpt2`"), "{e}");
        for t in SUPPORTED {
            assert!(e.contains(&format!("`{t}`")), "{e}");
        }
    }

    #[test]
    fn a_missing_size_names_the_family_and_the_key() {
        let e = ModelConfig::parse(
            Path::new("config.json"),
            &json!({"model_type": "distilbert", "vocab_size": 10}),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("distilbert config") && e.contains("`dim`"),
            "{e}"
        );
    }

    #[test]
    fn roberta_is_the_xlm_roberta_network_under_its_own_name() {
        let config = |t: &str| {
            ModelConfig::parse(
                Path::new("config.json"),
                &json!({"model_type": t, "vocab_size": 50265, "hidden_size": 8,
                        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 16,
                        "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1,
                        "layer_norm_eps": 1e-5}),
            )
            .unwrap()
        };
        let (r, x) = (config("roberta"), config("xlm-roberta"));
        assert_eq!(r.model_type(), "roberta");
        assert_eq!(r.sizes(), x.sizes());
        assert_eq!(r.dropout(), x.dropout());
        assert_eq!(r.layer_names(1), x.layer_names(1));
        assert!(r.layer_names(1).is_some());
        assert_eq!(r.max_tokens(), 512);
        assert_eq!(r.embedding_names().position_offset, 2);
        assert_eq!(r.embedding_names().token_types, Some(1));
        assert!(r.drops_attention_output() && !r.relative_bias());
    }

    #[test]
    fn modernbert_reads_both_config_layouts_and_refuses_dropout_by_its_key() {
        let old = json!({"model_type": "modernbert", "vocab_size": 10, "hidden_size": 8,
                         "num_hidden_layers": 4, "num_attention_heads": 2, "intermediate_size": 12,
                         "global_attn_every_n_layers": 2, "global_rope_theta": 1000.0,
                         "local_attention": 16});
        let modern = |v: &Value| match ModelConfig::parse(Path::new("config.json"), v).unwrap() {
            ModelConfig::ModernBert(c) => c,
            other => panic!("{other:?}"),
        };
        let c = modern(&old);
        let local: Vec<bool> = (0..4).map(|i| c.is_local(i)).collect();
        assert_eq!(local, [false, true, false, true]);
        assert_eq!((c.rope_theta(0), c.rope_theta(1)), (1000.0, 10_000.0));
        assert_eq!(c.half_window(), 8);
        // transformers 5.x writes layer_types and rope_parameters, which win.
        let mut new = old.clone();
        new["layer_types"] = json!([
            "sliding_attention",
            "full_attention",
            "full_attention",
            "full_attention"
        ]);
        new["rope_parameters"] = json!({"full_attention": {"rope_theta": 5.0, "rope_type": "default"},
                                        "sliding_attention": {"rope_theta": 7.0}});
        let c = modern(&new);
        assert!(c.is_local(0) && !c.is_local(1));
        assert_eq!((c.rope_theta(0), c.rope_theta(1)), (7.0, 5.0));
        let parsed = ModelConfig::parse(Path::new("config.json"), &new).unwrap();
        assert_eq!(
            (parsed.local_window(0), parsed.local_window(1)),
            (Some(8), None)
        );
        assert!(parsed.layer_names(0).is_none() && parsed.gated_ffn());
        for (key, value) in [
            ("mlp_dropout", json!(0.1)),
            ("hidden_activation", json!("silu")),
        ] {
            let mut bad = old.clone();
            bad[key] = value;
            let e = ModelConfig::parse(Path::new("config.json"), &bad)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{e}");
        }
    }

    #[test]
    fn xlm_roberta_positions_start_after_the_padding_index() {
        let c = ModelConfig::parse(
            Path::new("config.json"),
            &json!({"model_type": "xlm-roberta", "vocab_size": 10, "hidden_size": 8,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16,
                    "max_position_embeddings": 514, "type_vocab_size": 1, "pad_token_id": 1}),
        )
        .unwrap();
        assert_eq!(c.max_tokens(), 512);
        assert_eq!(c.embedding_names().position_offset, 2);
    }
}

//! BERT (all-MiniLM-L6/L12-v2, bge-small, e5-small, ...) and XLM-RoBERTa (multilingual-e5,
//! paraphrase-multilingual-*, bge-m3) and RoBERTa (all-distilroberta-v1): the same post-LN layers
//! and tensor names; (XLM-)RoBERTa's embeddings number positions from the padding index + 1
//! (`model::embeddings`).

use serde::Deserialize;

use crate::model::layers::LayerNames;
use crate::model::sizes::{DropoutProbs, Sizes};

/// The fields of a Hugging Face BERT `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

/// An XLM-RoBERTa or RoBERTa `config.json`: BERT's fields and the padding index positions start after.
#[derive(Debug, Clone, Deserialize)]
pub struct RobertaConfig {
    #[serde(flatten)]
    pub bert: BertConfig,
    #[serde(default = "default_pad")]
    pub pad_token_id: usize,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_dropout() -> f32 {
    0.1
}
fn default_act() -> String {
    "gelu".into()
}
fn default_pad() -> usize {
    1
}

impl BertConfig {
    pub fn sizes(&self) -> Sizes {
        Sizes {
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            layers: self.num_hidden_layers,
            positions: self.max_position_embeddings,
            eps: self.layer_norm_eps,
        }
    }

    pub fn dropout(&self) -> DropoutProbs {
        DropoutProbs {
            hidden: self.hidden_dropout_prob,
            attention: self.attention_probs_dropout_prob,
        }
    }
}

pub fn layer_names(i: usize) -> LayerNames {
    let p = format!("encoder.layer.{i}");
    LayerNames {
        q: format!("{p}.attention.self.query"),
        k: format!("{p}.attention.self.key"),
        v: format!("{p}.attention.self.value"),
        o: format!("{p}.attention.output.dense"),
        attn_norm: format!("{p}.attention.output.LayerNorm"),
        ffn_in: format!("{p}.intermediate.dense"),
        ffn_out: format!("{p}.output.dense"),
        ffn_norm: format!("{p}.output.LayerNorm"),
    }
}

//! DistilBERT (msmarco-distilbert-*, multi-qa-distilbert-*): BERT's post-LN layer under other
//! names, no token types, no dropout on the attention output. Positions are learned or
//! sinusoidal (`sinusoidal_pos_embds`); either way the table is in the checkpoint and, as in the
//! pinned transformers 5.x (4.x froze a sinusoidal table), it trains.

use serde::Deserialize;

use crate::model::layers::LayerNames;
use crate::model::sizes::{DropoutProbs, Sizes};

/// The fields of a Hugging Face DistilBERT `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct DistilBertConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub hidden_dim: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_dropout")]
    pub dropout: f32,
    #[serde(default = "default_dropout")]
    pub attention_dropout: f32,
    #[serde(default = "default_act")]
    pub activation: String,
}

fn default_dropout() -> f32 {
    0.1
}
fn default_act() -> String {
    "gelu".into()
}

impl DistilBertConfig {
    pub fn sizes(&self) -> Sizes {
        Sizes {
            vocab: self.vocab_size,
            hidden: self.dim,
            intermediate: self.hidden_dim,
            heads: self.n_heads,
            layers: self.n_layers,
            positions: self.max_position_embeddings,
            // modeling_distilbert.py fixes every norm's epsilon.
            eps: 1e-12,
        }
    }

    pub fn dropout(&self) -> DropoutProbs {
        DropoutProbs {
            hidden: self.dropout,
            attention: self.attention_dropout,
        }
    }
}

pub fn layer_names(i: usize) -> LayerNames {
    let p = format!("transformer.layer.{i}");
    LayerNames {
        q: format!("{p}.attention.q_lin"),
        k: format!("{p}.attention.k_lin"),
        v: format!("{p}.attention.v_lin"),
        o: format!("{p}.attention.out_lin"),
        attn_norm: format!("{p}.sa_layer_norm"),
        ffn_in: format!("{p}.ffn.lin1"),
        ffn_out: format!("{p}.ffn.lin2"),
        ffn_norm: format!("{p}.output_layer_norm"),
    }
}

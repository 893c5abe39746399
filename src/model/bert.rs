//! BERT encoder (all-MiniLM-L6/L12-v2, bge-small, e5-small, ...), written for training:
//! dropout on embeddings, attention weights and hidden states; differentiable norms.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use crate::data::batch::TokenBatch;
use crate::error::Result;
use crate::model::dropout::Dropout;
use crate::model::layers::{Dims, EncoderLayer, LayerNames, LayerNorm};
use crate::model::weights::Weights;

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

#[derive(Debug, Clone)]
pub struct Bert {
    pub config: BertConfig,
    pub(crate) word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
    pub layers: Vec<EncoderLayer>,
}

impl Bert {
    pub fn load(w: &dyn Weights, config: BertConfig) -> Result<Self> {
        let h = config.hidden_size;
        let dims = Dims {
            hidden: h,
            heads: config.num_attention_heads,
            intermediate: config.intermediate_size,
            eps: config.layer_norm_eps,
        };
        let layers = EncoderLayer::load_stack(w, config.num_hidden_layers, dims, |p| LayerNames {
            q: format!("{p}.attention.self.query"),
            k: format!("{p}.attention.self.key"),
            v: format!("{p}.attention.self.value"),
            o: format!("{p}.attention.output.dense"),
            attn_norm: format!("{p}.attention.output.LayerNorm"),
            ffn_in: format!("{p}.intermediate.dense"),
            ffn_out: format!("{p}.output.dense"),
            ffn_norm: format!("{p}.output.LayerNorm"),
        })?;
        Ok(Self {
            word: w.get("embeddings.word_embeddings.weight", &[config.vocab_size, h])?,
            position: w.get(
                "embeddings.position_embeddings.weight",
                &[config.max_position_embeddings, h],
            )?,
            token_type: w.get(
                "embeddings.token_type_embeddings.weight",
                &[config.type_vocab_size, h],
            )?,
            norm: LayerNorm::load(w, "embeddings.LayerNorm", h, config.layer_norm_eps)?,
            layers,
            config,
        })
    }

    /// Embedding layer output, (tokens, hidden), in `dtype`.
    pub fn embed(&self, batch: &TokenBatch, drop: &Dropout, dtype: DType) -> Result<Tensor> {
        let words = self.word.index_select(&batch.ids, 0)?;
        self.embed_words(words, batch, drop, dtype)
    }

    /// The embedding layer from the rows of the word table already gathered, (tokens, hidden).
    pub fn embed_words(
        &self,
        words: Tensor,
        batch: &TokenBatch,
        drop: &Dropout,
        dtype: DType,
    ) -> Result<Tensor> {
        // Single-segment input: token type 0 everywhere, positions 0..len in each row.
        let pos: Vec<u32> = batch.lengths.iter().flat_map(|&l| 0..l as u32).collect();
        let pos = Tensor::from_vec(pos, batch.tokens(), batch.ids.device())?;
        let pos = self.position.index_select(&pos, 0)?;
        let typ = self.token_type.narrow(0, 0, 1)?;
        let x = (words + pos)?.broadcast_add(&typ)?;
        Ok(drop
            .hidden(&self.norm.forward(&x)?, &batch.lengths, 0)?
            .to_dtype(dtype)?)
    }

    /// Additive attention bias: none (packed rows have no padding to mask).
    pub fn attention_bias(&self, _batch: &TokenBatch) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

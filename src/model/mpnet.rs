//! MPNet encoder (all-mpnet-base-v2). Differs from BERT in two places: position ids start after
//! the padding index, and every layer adds a learned bias per relative-position bucket to its
//! attention scores. candle-transformers has no MPNet, so this is written from the Hugging Face
//! definition (`modeling_mpnet.py`).

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::data::batch::TokenBatch;
use crate::error::Result;
use crate::model::dropout::Dropout;
use crate::model::layers::{Dims, EncoderLayer, LayerNames, LayerNorm};
use crate::model::weights::Weights;

#[derive(Debug, Clone, Deserialize)]
pub struct MpnetConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f32,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f32,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_pad")]
    pub pad_token_id: usize,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_dropout() -> f32 {
    0.1
}
fn default_buckets() -> usize {
    32
}
fn default_pad() -> usize {
    1
}

#[derive(Debug, Clone)]
pub struct Mpnet {
    pub config: MpnetConfig,
    pub(crate) word: Tensor,
    position: Tensor,
    norm: LayerNorm,
    relative_bias: Tensor,
    pub layers: Vec<EncoderLayer>,
}

impl Mpnet {
    pub fn load(w: &dyn Weights, config: MpnetConfig) -> Result<Self> {
        let h = config.hidden_size;
        let dims = Dims {
            hidden: h,
            heads: config.num_attention_heads,
            intermediate: config.intermediate_size,
            eps: config.layer_norm_eps,
        };
        let layers = EncoderLayer::load_stack(w, config.num_hidden_layers, dims, |p| LayerNames {
            q: format!("{p}.attention.attn.q"),
            k: format!("{p}.attention.attn.k"),
            v: format!("{p}.attention.attn.v"),
            o: format!("{p}.attention.attn.o"),
            attn_norm: format!("{p}.attention.LayerNorm"),
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
            norm: LayerNorm::load(w, "embeddings.LayerNorm", h, config.layer_norm_eps)?,
            relative_bias: w.get(
                "encoder.relative_attention_bias.weight",
                &[
                    config.relative_attention_num_buckets,
                    config.num_attention_heads,
                ],
            )?,
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
        // Real tokens get positions pad+1, pad+2, ... (RoBERTa style).
        let pad = self.config.pad_token_id as u32;
        let pos: Vec<u32> = batch
            .lengths
            .iter()
            .flat_map(|&l| (0..l as u32).map(move |p| pad + 1 + p))
            .collect();
        let pos = Tensor::from_vec(pos, batch.tokens(), batch.ids.device())?;
        let pos = self.position.index_select(&pos, 0)?;
        Ok(drop
            .hidden(&self.norm.forward(&(words + pos)?)?, &batch.lengths, 0)?
            .to_dtype(dtype)?)
    }

    /// Additive attention bias, (heads, L, L) f32 for L the longest row: the learned bias of
    /// each relative-position bucket. A bucket depends only on key − query, so a row of length
    /// n takes the top-left n × n block.
    pub fn attention_bias(&self, batch: &TokenBatch) -> Result<Option<Tensor>> {
        let heads = self.config.num_attention_heads;
        let l = batch.lengths.iter().copied().max().unwrap_or(0);
        let buckets = relative_buckets(l, self.config.relative_attention_num_buckets, 128);
        let buckets =
            Tensor::from_vec(buckets, l * l, &Device::Cpu)?.to_device(batch.ids.device())?;
        // (l*l, heads) -> (heads, l, l)
        Ok(Some(
            self.relative_bias
                .index_select(&buckets, 0)?
                .reshape((l, l, heads))?
                .permute((2, 0, 1))?
                .to_dtype(DType::F32)?
                .contiguous()?,
        ))
    }
}

/// Bucket of every (query, key) pair, row-major (seq*seq), as `relative_position_bucket` in
/// `modeling_mpnet.py`: half the buckets per direction, exact below `num_buckets/4`, then
/// logarithmic up to `max_distance`. The f32 arithmetic follows PyTorch's so buckets agree.
pub fn relative_buckets(seq: usize, num_buckets: usize, max_distance: usize) -> Vec<u32> {
    let half = (num_buckets / 2) as i64;
    let max_exact = half / 2;
    let log_ratio = ((max_distance as f64) / (max_exact as f64)).ln() as f32;
    let mut out = Vec::with_capacity(seq * seq);
    for q in 0..seq as i64 {
        for k in 0..seq as i64 {
            let n = q - k; // -(memory - context)
            let mut bucket = if n < 0 { half } else { 0 };
            let n = n.abs();
            bucket += if n < max_exact {
                n
            } else {
                let scaled = ((n as f32 / max_exact as f32).ln() / log_ratio
                    * (half - max_exact) as f32) as i64;
                (max_exact + scaled).min(half - 1)
            };
            out.push(bucket as u32);
        }
    }
    out
}

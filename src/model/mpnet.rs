//! MPNet (all-mpnet-base-v2). Differs from BERT in two places: position ids start after the
//! padding index (`model::embeddings`), and every layer adds a learned bias per
//! relative-position bucket to its attention scores. candle-transformers has no MPNet, so this is written from the Hugging Face
//! definition (`modeling_mpnet.py`).

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::data::batch::TokenBatch;
use crate::error::Result;
use crate::model::layers::LayerNames;
use crate::model::relative_buckets::buckets_of_pairs;
use crate::model::sizes::{DropoutProbs, Sizes};
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

impl MpnetConfig {
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
        q: format!("{p}.attention.attn.q"),
        k: format!("{p}.attention.attn.k"),
        v: format!("{p}.attention.attn.v"),
        o: format!("{p}.attention.attn.o"),
        attn_norm: format!("{p}.attention.LayerNorm"),
        ffn_in: format!("{p}.intermediate.dense"),
        ffn_out: format!("{p}.output.dense"),
        ffn_norm: format!("{p}.output.LayerNorm"),
    }
}

/// The learned bias of each relative-position bucket, shared by every layer.
#[derive(Debug, Clone)]
pub struct RelativeBias {
    table: Tensor,
    buckets: usize,
    /// The table's gradient goes to the step's sums, one per layer, not through the graph
    /// (`Network::for_step_sums`): the bias is then computed without one.
    pub to_step_sums: bool,
}

impl RelativeBias {
    pub fn load(w: &dyn Weights, c: &MpnetConfig) -> Result<Self> {
        Ok(Self {
            table: w.get(
                "encoder.relative_attention_bias.weight",
                &[c.relative_attention_num_buckets, c.num_attention_heads],
            )?,
            buckets: c.relative_attention_num_buckets,
            to_step_sums: false,
        })
    }

    /// The (buckets, heads) table.
    pub fn table(&self) -> &Tensor {
        &self.table
    }

    /// The table's step sums at zero: one table per layer, (layers, buckets, heads), as each
    /// layer adds its rows in turn (`layer_op`); [`RelativeBias::sum_layers`] adds them up.
    pub fn zero_sums(&self, layers: usize) -> Result<Tensor> {
        let (buckets, heads) = self.table.dims2()?;
        Ok(Tensor::zeros(
            (layers, buckets, heads),
            DType::F32,
            self.table.device(),
        )?)
    }

    /// The table's gradient from its per-layer sums, (layers, buckets, heads): layer after
    /// layer, from the first, so the order depends on nothing the step was cut into.
    pub fn sum_layers(sums: &Tensor) -> Result<Tensor> {
        let (_, buckets, heads) = sums.dims3()?;
        let values = sums.flatten_all()?.to_vec1::<f32>()?;
        let mut total = vec![0f32; buckets * heads];
        for layer in values.chunks(buckets * heads) {
            total.iter_mut().zip(layer).for_each(|(t, v)| *t += v);
        }
        Ok(Tensor::from_vec(total, (buckets, heads), &Device::Cpu)?.to_device(sums.device())?)
    }

    /// Additive attention bias, (heads, L, L) f32 for L the longest row. A bucket depends
    /// only on key − query, so a row of length n takes the top-left n × n block.
    pub fn forward(&self, batch: &TokenBatch) -> Result<Tensor> {
        let heads = self.table.dim(1)?;
        let l = batch.lengths.iter().copied().max().unwrap_or(0);
        let buckets = buckets_of_pairs(l, self.buckets);
        let buckets =
            Tensor::from_vec(buckets, l * l, &Device::Cpu)?.to_device(batch.ids.device())?;
        let table = if self.to_step_sums {
            self.table.detach()
        } else {
            self.table.clone()
        };
        // (l*l, heads) -> (heads, l, l)
        Ok(table
            .index_select(&buckets, 0)?
            .reshape((l, l, heads))?
            .permute((2, 0, 1))?
            .to_dtype(DType::F32)?
            .contiguous()?)
    }
}

//! ModernBERT (gte-modernbert-base, modernbert-embed-base), written from transformers'
//! `modeling_modernbert.py`: token embeddings and a norm (no positions), pre-norm layers (layer
//! 0's attention norm is the identity) with a fused q|k|v and no biases by default, rotary
//! positions, every `global_attn_every_n_layers`-th layer global and the others local (each
//! token sees the `local_attention / 2` tokens either side), a GeGLU feed-forward block, and a
//! final norm, which st-tune applies in the last layer's op (`prenorm_op.rs`).
//!
//! Dropout: every released ModernBERT has 0 everywhere; a config with any other value is
//! refused at load time rather than trained with the wrong masks.

use std::path::Path;

use candle_core::{DType, Tensor, Var};
use serde::Deserialize;

use crate::data::batch::TokenBatch;
use crate::engine::rotary::Rotary;
use crate::engine::{Attention, Engine};
use crate::error::{Error, Result};
use crate::model::dropout::Dropout;
use crate::model::layer_op::ParamGrads;
use crate::model::prenorm_op::{Affine, PreNormOp, PreNormParams};
use crate::model::sizes::{DropoutProbs, Sizes};
use crate::model::weights::Weights;

/// The fields of a Hugging Face ModernBERT `config.json` the encoder needs. Both layouts are
/// read: transformers 4.x (`global_attn_every_n_layers`, `global_rope_theta`,
/// `local_rope_theta`) and 5.x (`layer_types`, `rope_parameters`), 5.x's winning.
#[derive(Debug, Clone, Deserialize)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub norm_bias: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    /// The whole window of a local layer: a token sees `local_attention / 2` either side.
    #[serde(default = "default_window")]
    pub local_attention: usize,
    #[serde(default = "default_every")]
    pub global_attn_every_n_layers: usize,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub global_rope_theta: Option<f64>,
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_parameters: Option<RopeByLayer>,
    #[serde(default = "default_act")]
    pub hidden_activation: String,
    #[serde(default)]
    pub embedding_dropout: f32,
    #[serde(default)]
    pub attention_dropout: f32,
    #[serde(default)]
    pub mlp_dropout: f32,
}

/// transformers 5.x's `rope_parameters`, by layer type.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeByLayer {
    pub full_attention: Option<Rope>,
    pub sliding_attention: Option<Rope>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Rope {
    pub rope_theta: Option<f64>,
    pub rope_type: Option<String>,
}

fn default_positions() -> usize {
    8192
}
fn default_eps() -> f64 {
    1e-5
}
fn default_window() -> usize {
    128
}
fn default_every() -> usize {
    3
}
fn default_act() -> String {
    "gelu".into()
}

/// transformers' defaults (`ModernBertConfig.default_theta`).
const GLOBAL_THETA: f64 = 160_000.0;
const LOCAL_THETA: f64 = 10_000.0;

impl ModernBertConfig {
    pub fn sizes(&self) -> Sizes {
        Sizes {
            vocab: self.vocab_size,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            layers: self.num_hidden_layers,
            positions: self.max_position_embeddings,
            eps: self.norm_eps,
        }
    }

    /// Always 0: [`ModernBertConfig::check`] refuses anything else.
    pub fn dropout(&self) -> DropoutProbs {
        DropoutProbs {
            hidden: 0.0,
            attention: 0.0,
        }
    }

    /// What st-tune cannot compute, named by its key.
    pub fn check(&self, path: &Path) -> Result<()> {
        let refuse = |what: String| Err(Error::model(path, format!("modernbert config: {what}")));
        if self.hidden_activation != "gelu" {
            return refuse(format!(
                "hidden_activation `{}` is not supported (only gelu)",
                self.hidden_activation
            ));
        }
        for (key, p) in [
            ("embedding_dropout", self.embedding_dropout),
            ("attention_dropout", self.attention_dropout),
            ("mlp_dropout", self.mlp_dropout),
        ] {
            if p != 0.0 {
                return refuse(format!(
                    "{key} is {p}; st-tune trains ModernBERT without dropout (every released \
                     model has 0), set it to 0.0"
                ));
            }
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
            || !(self.hidden_size / self.num_attention_heads).is_multiple_of(2)
        {
            return refuse(format!(
                "hidden_size {} is not num_attention_heads {} × an even head size",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return refuse(format!(
                    "layer_types has {} entries for {} layers",
                    types.len(),
                    self.num_hidden_layers
                ));
            }
            if let Some(t) = types
                .iter()
                .find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
            {
                return refuse(format!("layer type `{t}` is not supported"));
            }
        }
        let ropes = self.rope_parameters.iter();
        let ropes = ropes.flat_map(|r| [&r.full_attention, &r.sliding_attention]);
        for rope in ropes.flatten() {
            if let Some(t) = rope.rope_type.as_deref().filter(|t| *t != "default") {
                return refuse(format!("rope_type `{t}` is not supported (only default)"));
            }
        }
        if self.global_attn_every_n_layers == 0 {
            return refuse("global_attn_every_n_layers is 0".into());
        }
        Ok(())
    }

    /// Whether layer `i` attends within a window (local) rather than to the whole row.
    pub fn is_local(&self, i: usize) -> bool {
        match &self.layer_types {
            Some(types) => types.get(i).is_some_and(|t| t == "sliding_attention"),
            None => !i.is_multiple_of(self.global_attn_every_n_layers),
        }
    }

    /// How many tokens either side a local layer's token sees.
    pub fn half_window(&self) -> usize {
        self.local_attention / 2
    }

    /// The rotary base of layer `i`'s kind.
    pub fn rope_theta(&self, i: usize) -> f64 {
        let local = self.is_local(i);
        let by_layer = self.rope_parameters.as_ref().and_then(|r| {
            let rope = if local {
                &r.sliding_attention
            } else {
                &r.full_attention
            };
            rope.as_ref().and_then(|r| r.rope_theta)
        });
        let old = if local {
            self.local_rope_theta
        } else {
            self.global_rope_theta
        };
        by_layer
            .or(old)
            .unwrap_or(if local { LOCAL_THETA } else { GLOBAL_THETA })
    }
}

/// A weight (`{name}.weight`, shape `shape`) and, when `bias`, `{name}.bias`.
fn affine(w: &dyn Weights, name: &str, shape: &[usize], bias: bool) -> Result<Affine> {
    let weight = w.get(&format!("{name}.weight"), shape)?;
    let b = match bias {
        true => Some(w.get(&format!("{name}.bias"), &shape[..1])?),
        false => None,
    };
    Ok((weight, b))
}

/// One ModernBERT layer, run as one op (`prenorm_op.rs`).
#[derive(Debug, Clone)]
pub struct ModernBertLayer {
    params: PreNormParams,
    heads: usize,
    eps: f32,
    /// Tokens either side a local layer sees; None for a global layer.
    window: Option<usize>,
    theta: f32,
    pub engine: Engine,
    pub param_grads: ParamGrads,
}

impl ModernBertLayer {
    /// Layer `i` of `c`; the last one carries `final_norm`.
    pub fn load(w: &dyn Weights, c: &ModernBertConfig, i: usize) -> Result<Self> {
        let (h, inter) = (c.hidden_size, c.intermediate_size);
        let p = format!("layers.{i}");
        let norm = |name: &str| affine(w, name, &[h], c.norm_bias);
        let params = PreNormParams {
            attn_norm: (i > 0)
                .then(|| norm(&format!("{p}.attn_norm")))
                .transpose()?,
            qkv: affine(w, &format!("{p}.attn.Wqkv"), &[3 * h, h], c.attention_bias)?,
            o: affine(w, &format!("{p}.attn.Wo"), &[h, h], c.attention_bias)?,
            mlp_norm: norm(&format!("{p}.mlp_norm"))?,
            wi: affine(w, &format!("{p}.mlp.Wi"), &[2 * inter, h], c.mlp_bias)?,
            wo: affine(w, &format!("{p}.mlp.Wo"), &[h, inter], c.mlp_bias)?,
            final_norm: (i + 1 == c.num_hidden_layers)
                .then(|| norm("final_norm"))
                .transpose()?,
        };
        Ok(Self {
            engine: Engine::for_device(params.qkv.0.device()),
            params,
            heads: c.num_attention_heads,
            eps: c.norm_eps as f32,
            window: c.is_local(i).then(|| c.half_window()),
            theta: c.rope_theta(i) as f32,
            param_grads: ParamGrads::default(),
        })
    }

    /// x: (tokens, hidden), the rows of `batch` packed, each from position 0.
    pub fn forward(&self, x: &Tensor, batch: &TokenBatch, _drop: &Dropout) -> Result<Tensor> {
        let tensors = self.params.tensors();
        if x.rank() != 2 || tensors.iter().any(|t| t.dtype() != DType::F32) {
            return Err(Error::Internal(format!(
                "modernbert layer: expected (tokens, hidden) input and f32 weights, got {:?}",
                x.dims()
            )));
        }
        let hidden = x.dim(1)?;
        let head_dim = hidden / self.heads;
        let positions: Vec<u32> = batch.lengths.iter().flat_map(|&l| 0..l as u32).collect();
        let rope = Rotary::new(&positions, self.theta, head_dim, self.heads, x.device())?;
        let attention = Attention {
            heads: self.heads,
            scale: 1.0 / (head_dim as f32).sqrt(),
            rows: batch.rows().collect(),
            masks: None,
            window: self.window,
        };
        let trains = tensors.iter().any(Tensor::track_op);
        let mut op = PreNormOp::new(self.engine, self.eps, self.params.clone(), attention, rope);
        op.sink = trains.then(|| self.param_grads.clone());
        op.keep = trains || x.track_op();
        // The parameters are no graph inputs: below the first trained layer, a leaf stands in
        // for the input so that the backward pass reaches this op.
        let x = if trains && !x.track_op() {
            Var::from_tensor(&x.detach())?.as_tensor().clone()
        } else {
            x.contiguous()?
        };
        Ok(x.apply_op1(op)?)
    }
}

//! The embedding layer every family shares: word + position (+ token type 0) tables, layer
//! norm, dropout (ModernBERT: word table and norm only). Families differ only in whether there is a token-type table and where
//! position numbering starts (BERT and DistilBERT at 0; RoBERTa and MPNet after the padding
//! index, as `create_position_ids_from_input_ids` does for rows without padding).

use candle_core::{DType, Tensor};

use crate::data::batch::TokenBatch;
use crate::error::Result;
use crate::model::dropout::Dropout;
use crate::model::layers::LayerNorm;
use crate::model::sizes::Sizes;
use crate::model::weights::Weights;

pub const WORD: &str = "embeddings.word_embeddings.weight";
const POSITION: &str = "embeddings.position_embeddings.weight";
const TOKEN_TYPE: &str = "embeddings.token_type_embeddings.weight";
const NORM: &str = "embeddings.LayerNorm";
/// ModernBERT's word table and norm.
pub const MODERNBERT_WORD: &str = "embeddings.tok_embeddings.weight";
const MODERNBERT_NORM: &str = "embeddings.norm";

/// What a family's embedding layer holds.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddingNames {
    /// Rows of the token-type table; None when the family has none.
    pub token_types: Option<usize>,
    /// Position id of a row's first token.
    pub position_offset: u32,
    /// Whether there is a learned position table (ModernBERT's positions are rotary, applied
    /// in its layers).
    pub positions: bool,
    /// The word table's name.
    pub word: &'static str,
    /// The norm's name (`.weight`, `.bias`) and whether it has a bias.
    pub norm: &'static str,
    pub norm_bias: bool,
}

impl EmbeddingNames {
    pub fn bert(token_types: usize, position_offset: usize) -> Self {
        Self {
            token_types: Some(token_types),
            ..Self::without_types(position_offset)
        }
    }

    pub fn without_types(position_offset: usize) -> Self {
        Self {
            token_types: None,
            position_offset: position_offset as u32,
            positions: true,
            word: WORD,
            norm: NORM,
            norm_bias: true,
        }
    }

    /// Word table and norm only.
    pub fn modernbert(norm_bias: bool) -> Self {
        Self {
            token_types: None,
            position_offset: 0,
            positions: false,
            word: MODERNBERT_WORD,
            norm: MODERNBERT_NORM,
            norm_bias,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Embeddings {
    pub word: Tensor,
    position: Option<Tensor>,
    token_type: Option<Tensor>,
    norm: LayerNorm,
    position_offset: u32,
}

impl Embeddings {
    pub fn load(w: &dyn Weights, names: EmbeddingNames, s: &Sizes) -> Result<Self> {
        let h = s.hidden;
        Ok(Self {
            word: w.get(names.word, &[s.vocab, h])?,
            position: match names.positions {
                true => Some(w.get(POSITION, &[s.positions, h])?),
                false => None,
            },
            token_type: match names.token_types {
                Some(n) => Some(w.get(TOKEN_TYPE, &[n, h])?),
                None => None,
            },
            norm: match names.norm_bias {
                true => LayerNorm::load(w, names.norm, h, s.eps)?,
                false => LayerNorm::load_without_bias(w, names.norm, h, s.eps)?,
            },
            position_offset: names.position_offset,
        })
    }

    /// The embedding layer from the rows of the word table already gathered, (tokens, hidden),
    /// in `dtype`. Single-segment input: token type 0 everywhere.
    pub fn forward(
        &self,
        words: Tensor,
        batch: &TokenBatch,
        drop: &Dropout,
        dtype: DType,
    ) -> Result<Tensor> {
        let mut x = words;
        if let Some(table) = &self.position {
            let first = self.position_offset;
            let pos: Vec<u32> = batch
                .lengths
                .iter()
                .flat_map(|&l| (0..l as u32).map(move |p| first + p))
                .collect();
            let pos = Tensor::from_vec(pos, batch.tokens(), batch.ids.device())?;
            x = (x + table.index_select(&pos, 0)?)?;
        }
        if let Some(t) = &self.token_type {
            x = x.broadcast_add(&t.narrow(0, 0, 1)?)?;
        }
        Ok(drop
            .hidden(&self.norm.forward(&x)?, &batch.lengths, 0)?
            .to_dtype(dtype)?)
    }
}

//! The embedding layer every family shares: word + position (+ token type 0) tables, layer
//! norm, dropout (ModernBERT: word table and norm only). Families differ only in whether there is a token-type table and where
//! position numbering starts (BERT and DistilBERT at 0; RoBERTa and MPNet after the padding
//! index, as `create_position_ids_from_input_ids` does for rows without padding).

use candle_core::{DType, Tensor};

use crate::data::batch::TokenBatch;
use crate::engine::cpu::norm::norm_rows_backward_in_order;
use crate::engine::cpu::storage::with_slice;
use crate::error::Result;
use crate::model::dropout::Dropout;
use crate::model::layer_op::StepSums;
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
            let pos = self.positions(batch);
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

impl Embeddings {
    /// The trainable tables and norm whose gradients [`Embeddings::backward_in_order`] sums
    /// (the word table's rows go to `WordRows`); empty for a layer it does not cover
    /// (ModernBERT's norm has no bias, and no position table).
    pub fn params_in_order(&self) -> Vec<Tensor> {
        if self.position.is_none() {
            return Vec::new();
        }
        let tables = self.position.iter().chain(&self.token_type);
        tables
            .chain([&self.norm.weight, &self.norm.bias])
            .filter(|t| t.track_op())
            .cloned()
            .collect()
    }

    /// The embedding layer's backward pass in f32 on the CPU, from the gradient `g` of its
    /// output, (tokens, hidden): the position and type tables' and the norm's gradients added
    /// into `sums` token after token (see `layer_op::StepSums`), and d words returned for the
    /// word table's rows. None, having added nothing, when `sums` lacks one of them.
    pub fn backward_in_order(
        &self,
        batch: &TokenBatch,
        drop: &Dropout,
        g: &Tensor,
        sums: &StepSums,
    ) -> Result<Option<Tensor>> {
        let params = self.params_in_order();
        if params.is_empty() || params.iter().any(|p| !sums.contains_key(&p.id())) {
            return Ok(None);
        }
        let h = self.word.dim(1)?;
        let f32s = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
        };
        // The norm's input, as `forward` adds it: (word + position) + type.
        let mut x = f32s(&self.word.index_select(&batch.ids, 0)?)?;
        let pos = self.positions(batch);
        if let Some(table) = &self.position {
            let table = f32s(table)?;
            for (row, &p) in x.chunks_mut(h).zip(&pos) {
                let p = &table[p as usize * h..][..h];
                row.iter_mut().zip(p).for_each(|(x, p)| *x += p);
            }
        }
        if let Some(types) = &self.token_type {
            let first = f32s(&types.narrow(0, 0, 1)?)?;
            for row in x.chunks_mut(h) {
                row.iter_mut().zip(&first).for_each(|(x, t)| *x += t);
            }
        }
        let mut dn = f32s(g)?;
        if let Some(mask) = drop.hidden_mask(&batch.lengths, 0) {
            dn.chunks_mut(h)
                .enumerate()
                .for_each(|(t, row)| mask.apply_row(t, row));
        }
        let w = f32s(&self.norm.weight)?;
        let eps = self.norm.eps as f32;
        let sum = |p: &Tensor| sums[&p.id()].clone();
        let (nw, nb) = (sum(&self.norm.weight), sum(&self.norm.bias));
        let mut dx = Ok(Vec::new());
        with_slice(&nw, |dw| {
            with_slice(&nb, |db| {
                dx = norm_rows_backward_in_order(&x, &dn, &w, eps, (dw, db));
                Ok(())
            })
        })?;
        let dx = dx?;
        // Token after token into the tables' rows.
        if let Some(table) = &self.position {
            with_slice(&sum(table), |dt| {
                for (row, &p) in dx.chunks(h).zip(&pos) {
                    let d = &mut dt[p as usize * h..][..h];
                    d.iter_mut().zip(row).for_each(|(d, g)| *d += g);
                }
                Ok(())
            })?;
        }
        if let Some(types) = &self.token_type {
            with_slice(&sum(types), |dt| {
                for row in dx.chunks(h) {
                    dt[..h].iter_mut().zip(row).for_each(|(d, g)| *d += g);
                }
                Ok(())
            })?;
        }
        Ok(Some(Tensor::from_vec(dx, (batch.tokens(), h), g.device())?))
    }

    /// Each token's position id, rows packed as in `batch`.
    fn positions(&self, batch: &TokenBatch) -> Vec<u32> {
        let first = self.position_offset;
        batch
            .lengths
            .iter()
            .flat_map(|&l| (0..l as u32).map(move |p| first + p))
            .collect()
    }
}

//! Training forward pass with the graph cut at the embedding layer's output.
//!
//! candle keeps every activation of a graph alive until its backward pass returns, and the
//! last and largest gradients of that pass are the embedding tables' (vocab × hidden, dense).
//! Cutting the graph there lets the encoder's activations go first: the encoder's backward
//! pass stops at the cut, and [`EmbeddingCut::backward`] then recomputes the embedding layer
//! (a gather, a layer norm and dropout with the same mask) and back-propagates through it
//! alone. Same gradients, at the cost of one more embedding-layer forward pass.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::data::batch::TokenBatch;
use crate::error::{Error, Result};
use crate::model::dropout::Dropout;
use crate::model::layer_op::StepSums;
use crate::model::Network;

/// What the second half of the backward pass needs: the cut point and the batch to recompute
/// the embedding layer from.
pub struct EmbeddingCut {
    leaf: Var,
    batch: TokenBatch,
    drop: Dropout,
}

/// Sentence embeddings, (batch, dim), and the cut to finish the backward pass with; None when
/// the embedding layer does not train (frozen), so there is nothing to cut.
pub fn forward_cut(
    net: &Network,
    batch: &TokenBatch,
    drop: &Dropout,
) -> Result<(Tensor, Option<EmbeddingCut>)> {
    let (x0, cut) = embedding_leaf(net, batch, drop)?;
    let tokens = net.encoder.forward_layers(x0, batch, drop)?;
    Ok((net.head(&tokens, batch)?, cut))
}

/// The embedding layer's output: a fresh leaf when it has a graph (which is dropped here), or
/// the plain tensor of a frozen embedding layer (then frozen layers above build no graph).
fn embedding_leaf(
    net: &Network,
    batch: &TokenBatch,
    drop: &Dropout,
) -> Result<(Tensor, Option<EmbeddingCut>)> {
    let x0 = net.encoder.embed(batch, drop, net.dtype)?;
    if !x0.track_op() {
        return Ok((x0, None));
    }
    let leaf = Var::from_tensor(&x0.detach())?;
    let cut = EmbeddingCut {
        leaf: leaf.clone(),
        batch: batch.clone(),
        drop: drop.clone(),
    };
    Ok((leaf.as_tensor().clone(), Some(cut)))
}

impl EmbeddingCut {
    /// The gradient that reached the cut, from the encoder's backward pass `store`. Drop the
    /// encoder's graph (the loss) before calling [`Self::backward`] with it.
    pub fn gradient(&self, store: &GradStore) -> Result<Tensor> {
        store
            .get(self.leaf.as_tensor())
            .cloned()
            .ok_or_else(|| Error::Internal("no gradient reached the embedding layer".into()))
    }

    /// Recomputes the embedding layer with a graph and back-propagates `grad` through it:
    /// the gradients of the position and type tables and the layer norm, in the store, and
    /// those of the word table as the rows this batch touched (see [`WordRows`]).
    pub fn backward(self, net: &Network, grad: &Tensor) -> Result<(GradStore, Option<WordRows>)> {
        embedding_backward(net, &self.batch, &self.drop, grad)
    }
}

impl EmbeddingCut {
    /// [`EmbeddingCut::backward`] without a graph, in f32 on the CPU: the embedding layer's
    /// gradients added into the step's `sums` token after token (`Embeddings::backward_in_order`),
    /// and the word table's rows. None, having added nothing, when `sums` does not hold the
    /// layer's parameters: then [`EmbeddingCut::backward`] is the way.
    pub fn backward_in_order(
        &self,
        net: &Network,
        grad: &Tensor,
        sums: &StepSums,
    ) -> Result<Option<WordRows>> {
        let table = net.encoder.word_table();
        if !table.track_op() {
            return Ok(None);
        }
        let words =
            net.encoder
                .embeddings
                .backward_in_order(&self.batch, &self.drop, grad, sums)?;
        let Some(grads) = words else {
            return Ok(None);
        };
        Ok(Some(WordRows {
            table: table.clone(),
            ids: self.batch.ids.to_vec1::<u32>()?,
            grads,
        }))
    }
}

/// Back-propagates `grad`, d loss / d the embedding layer's output of `batch`, through that
/// layer recomputed with `drop`'s masks: the gradients of its other tensors in the store, and
/// the word table's as the rows `batch` touched (None when the table is frozen). Gradient
/// checkpointing's last step (`recompute.rs`) ends here too.
pub fn embedding_backward(
    net: &Network,
    batch: &TokenBatch,
    drop: &Dropout,
    grad: &Tensor,
) -> Result<(GradStore, Option<WordRows>)> {
    let table = net.encoder.word_table();
    let gathered = table.index_select(&batch.ids, 0)?;
    // The gathered rows as a leaf of their own: the graph stops there, not at the table.
    let words = table
        .track_op()
        .then(|| Var::from_tensor(&gathered.detach()))
        .transpose()?;
    let input = words.as_ref().map_or(gathered, |w| w.as_tensor().clone());
    let x0 = net.encoder.embed_words(input, batch, drop, net.dtype)?;
    let surrogate = (x0.to_dtype(DType::F32)? * grad.to_dtype(DType::F32)?)?.sum_all()?;
    let store = net.backward(&surrogate)?;
    let rows = match words {
        Some(w) => Some(WordRows {
            table: table.clone(),
            ids: batch.ids.to_vec1::<u32>()?,
            grads: store
                .get(w.as_tensor())
                .ok_or_else(|| Error::Internal("no gradient reached the word table".into()))?
                .to_dtype(DType::F32)?,
        }),
        None => None,
    };
    Ok((store, rows))
}

/// The word table's gradient as the rows one batch touched: row `ids[t]` receives row `t` of
/// `grads` (tokens, hidden). A dense (vocab, hidden) gradient per batch, as candle's gather
/// would build it, is a zeroed table-sized buffer, a copy and an addition each time, for a
/// few hundred rows; these rows are added into the step's one dense gradient instead.
pub struct WordRows {
    /// The table (its id names the parameter).
    pub table: Tensor,
    pub ids: Vec<u32>,
    pub grads: Tensor,
}

//! Gradient checkpointing: back-propagate a gradient on the sentence embeddings through the
//! network while keeping only each encoder layer's input from the forward pass. When a layer's
//! turn comes in the backward pass, its activations are recomputed from that input, with the
//! same dropout masks (they are keyed to the row, not drawn in order), so the gradients equal
//! those of the ordinary backward pass. Memory: L+1 layer inputs instead of every activation.
//! The cached scheme (`passes.rs`) takes the checkpoints in its first (embedding) pass, so the
//! whole scheme costs one forward pass more than plain training, not two.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::data::batch::TokenBatch;
use crate::error::{Error, Result};
use crate::model::dropout::Dropout;
use crate::model::embedding_cut::{embedding_backward, WordRows};
use crate::model::layer_op::StepSums;
use crate::model::{Encoder, Network};

/// The forward pass without a graph, keeping each encoder layer's input (and the last layer's
/// output): the checkpoints. Returns (sentence embeddings, checkpoints), the latter L+1
/// tensors of (tokens, hidden), rows packed as in `batch`.
pub fn forward_checkpoints(
    net: &Network,
    batch: &TokenBatch,
    drop: &Dropout,
) -> Result<(Tensor, Vec<Tensor>)> {
    let enc = &net.encoder;
    let bias = enc.attention_bias(batch)?.map(|b| b.detach());
    let mut inputs = vec![enc.embed(batch, drop, net.dtype)?.detach()];
    for (i, layer) in enc.layers().iter().enumerate() {
        // Detaching drops each layer's graph as soon as its output exists.
        let out = layer.forward(
            &inputs[i],
            batch,
            bias.as_ref(),
            drop,
            Encoder::layer_site(i),
        )?;
        inputs.push(out.detach());
    }
    let emb = net
        .head(inputs.last().expect("the embedding output"), batch)?
        .detach();
    Ok((emb, inputs))
}

/// `grad`: d loss / d sentence embeddings of `batch`, (rows, dim); `checkpoints` from
/// [`forward_checkpoints`] for the same rows. `sink` receives each partial gradient store
/// (head, every layer top-down, embeddings) to accumulate parameter gradients. Where `sums`
/// holds the embedding layer's (see `Network::params_in_order`), its gradients go there
/// instead. The word table's gradient comes back as the rows the batch touched
/// (`embedding_cut.rs`), None when frozen.
pub fn backward_recomputing(
    net: &Network,
    batch: &TokenBatch,
    drop: &Dropout,
    grad: &Tensor,
    mut checkpoints: Vec<Tensor>,
    sink: &mut dyn FnMut(&GradStore) -> Result<()>,
    sums: &StepSums,
) -> Result<Option<WordRows>> {
    let enc = &net.encoder;
    let layers = enc.layers();
    let bias = enc.attention_bias(batch)?;
    // Head: pooling, Dense, Normalize.
    let top = Var::from_tensor(&checkpoints.pop().expect("the last layer's output"))?;
    let mut g = backward_step(net, &net.head(top.as_tensor(), batch)?, grad, &top, sink)?;
    // Layers, top down, each recomputed from its input.
    for i in (0..layers.len()).rev() {
        let x = Var::from_tensor(&checkpoints.pop().expect("one input per layer"))?;
        let out = layers[i].forward(
            x.as_tensor(),
            batch,
            bias.as_ref(),
            drop,
            Encoder::layer_site(i),
        )?;
        g = backward_step(net, &out, &g, &x, sink)?;
    }
    // Embeddings (their gradient only matters when they train).
    if let Some(rows) = embeddings_in_order(net, batch, drop, &g, sums)? {
        return Ok(Some(rows));
    }
    let (store, rows) = embedding_backward(net, batch, drop, &g)?;
    sink(&store)?;
    Ok(rows)
}

/// The embedding layer's backward pass into the step's `sums`, with the word table's rows;
/// None when the sums do not hold its gradients.
fn embeddings_in_order(
    net: &Network,
    batch: &TokenBatch,
    drop: &Dropout,
    g: &Tensor,
    sums: &StepSums,
) -> Result<Option<WordRows>> {
    let table = net.encoder.word_table();
    if !table.track_op() {
        return Ok(None);
    }
    let words = net
        .encoder
        .embeddings
        .backward_in_order(batch, drop, g, sums)?;
    let Some(grads) = words else {
        return Ok(None);
    };
    Ok(Some(WordRows {
        table: table.clone(),
        ids: batch.ids.to_vec1::<u32>()?,
        grads,
    }))
}

/// Back-propagates `grad_out` from `out` and returns the gradient that reaches `input`.
fn backward_step(
    net: &Network,
    out: &Tensor,
    grad_out: &Tensor,
    input: &Var,
    sink: &mut dyn FnMut(&GradStore) -> Result<()>,
) -> Result<Tensor> {
    let store = net.backward(&(out * grad_out.to_dtype(out.dtype())?)?.sum_all()?)?;
    sink(&store)?;
    store.get(input.as_tensor()).cloned().ok_or_else(|| {
        Error::Internal("gradient checkpointing: no gradient reached a layer input".into())
    })
}

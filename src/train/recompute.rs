//! Gradient checkpointing: back-propagate a gradient on the sentence embeddings through the
//! network while keeping only each encoder layer's input from the forward pass. When a layer's
//! turn comes in the backward pass, its activations are recomputed from that input, with the
//! same dropout masks (they are keyed to the row, not drawn in order), so the gradients equal
//! those of the ordinary backward pass. Memory: L+1 layer inputs instead of every activation.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::data::batch::TokenBatch;
use crate::error::{Error, Result};
use crate::model::dropout::Dropout;
use crate::model::{Encoder, Network};

/// `grad`: d loss / d sentence embeddings of `batch`, (rows, dim). `sink` receives each partial
/// gradient store (head, every layer top-down, embeddings) to accumulate parameter gradients.
pub fn backward_recomputing(
    net: &Network,
    batch: &TokenBatch,
    drop: &Dropout,
    grad: &Tensor,
    sink: &mut dyn FnMut(&GradStore) -> Result<()>,
) -> Result<()> {
    let enc = &net.encoder;
    let layers = enc.layers();
    let bias = enc.attention_bias(batch)?;
    let detached: Vec<_> = bias
        .iter()
        .map(|b| b.as_ref().map(Tensor::detach))
        .collect();
    // Forward, keeping only layer inputs; each layer's graph is dropped with its output.
    let mut inputs = vec![enc.embed(batch, drop, net.dtype)?.detach()];
    for (i, layer) in layers.iter().enumerate() {
        let out = layer.forward(&inputs[i], batch, &detached, drop, Encoder::layer_site(i))?;
        inputs.push(out.detach());
    }
    // Head: pooling, Dense, Normalize.
    let top = Var::from_tensor(&inputs.pop().expect("at least the embedding output"))?;
    let mut g = backward_step(&net.head(top.as_tensor(), batch)?, grad, &top, sink)?;
    // Layers, top down, each recomputed from its input.
    for i in (0..layers.len()).rev() {
        let x = Var::from_tensor(&inputs.pop().expect("one input per layer"))?;
        let out = layers[i].forward(x.as_tensor(), batch, &bias, drop, Encoder::layer_site(i))?;
        g = backward_step(&out, &g, &x, sink)?;
    }
    // Embeddings (their gradient only matters when they train).
    let x0 = enc.embed(batch, drop, net.dtype)?;
    let store = (x0 * g)?.sum_all()?.backward()?;
    sink(&store)
}

/// Back-propagates `grad_out` from `out` and returns the gradient that reaches `input`.
fn backward_step(
    out: &Tensor,
    grad_out: &Tensor,
    input: &Var,
    sink: &mut dyn FnMut(&GradStore) -> Result<()>,
) -> Result<Tensor> {
    let store = (out * grad_out.to_dtype(out.dtype())?)?
        .sum_all()?
        .backward()?;
    sink(&store)?;
    store.get(input.as_tensor()).cloned().ok_or_else(|| {
        Error::Usage("gradient checkpointing: no gradient reached a layer input".into())
    })
}

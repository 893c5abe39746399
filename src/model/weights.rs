//! Named tensors of a checkpoint, and the one place that says which of them train.
//!
//! Encoders are built from a [`Weights`] view, so the same constructor serves loading real
//! weights, building the training graph (trainable tensors are `Var`s) and building a detached
//! copy for inference (no graph). Names are the checkpoint's own, so a missing or mis-shaped
//! tensor is reported with its full name and both shapes, and saving writes the same names back.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// Read access to named tensors, checked against the shape the model expects.
pub trait Weights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// Says which part of the model the following `get`s load. Only [`PartRecorder`] listens:
    /// the model definition, not the tensor names, says what freezing keeps.
    fn enter(&self, _part: Part) {}
}

/// The part of a sentence-transformer a tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The word, position and token-type tables and their norm.
    Embeddings,
    /// Encoder layer `i`, counted from the embeddings.
    Layer(usize),
    /// MPNet's relative position bias, shared by every layer.
    SharedBias,
    /// What follows the encoder (a Dense module).
    Head,
}

/// Which tensors receive gradients. Frozen tensors get no gradient and no optimizer state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Freeze {
    pub embeddings: bool,
    /// Freeze the lowest N encoder layers.
    pub layers: usize,
}

impl Freeze {
    /// Whether the tensors of `part` train.
    pub fn trains(&self, part: Part) -> bool {
        match part {
            Part::Embeddings => !self.embeddings,
            Part::Layer(i) => i >= self.layers,
            // Shared by every layer, frozen ones included: if it trained, the gradient would
            // have to flow back through the frozen layers, which then could not run without a
            // graph. So it freezes with the first frozen layer.
            Part::SharedBias => self.layers == 0,
            Part::Head => true,
        }
    }
}

/// Passes `get`s through to `inner` and notes the part each name was loaded for. A checkpoint
/// tensor the model never asks for (BERT's pooler, a masked-LM head) belongs to no part and
/// never trains: it would get no gradient.
pub struct PartRecorder<'a> {
    inner: &'a dyn Weights,
    current: std::cell::Cell<Part>,
    parts: std::cell::RefCell<BTreeMap<String, Part>>,
}

impl<'a> PartRecorder<'a> {
    pub fn new(inner: &'a dyn Weights) -> Self {
        Self {
            inner,
            current: Part::Embeddings.into(),
            parts: Default::default(),
        }
    }

    /// Each name asked for, with its part.
    pub fn into_parts(self) -> BTreeMap<String, Part> {
        self.parts.into_inner()
    }
}

impl Weights for PartRecorder<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.parts
            .borrow_mut()
            .insert(name.to_string(), self.current.get());
        self.inner.get(name, shape)
    }

    fn enter(&self, part: Part) {
        self.current.set(part);
    }
}

/// Whether AdamW applies weight decay to a tensor: not to biases and LayerNorm parameters.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || is_norm(name))
}

/// A layer norm's tensor, by the names the families give them (`LayerNorm`, `layer_norm`,
/// ModernBERT's `attn_norm`, `mlp_norm`, `final_norm`, `embeddings.norm`).
fn is_norm(name: &str) -> bool {
    name.contains("LayerNorm") || name.contains("layer_norm") || name.ends_with("norm.weight")
}

/// All tensors of one safetensors file; trainable ones are also held as `Var`s.
#[derive(Debug, Clone)]
pub struct Params {
    /// Where the tensors came from, for error messages.
    pub source: PathBuf,
    pub tensors: BTreeMap<String, Tensor>,
    pub vars: BTreeMap<String, Var>,
}

impl Params {
    pub fn from_tensors(
        source: PathBuf,
        tensors: BTreeMap<String, Tensor>,
        trainable: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        let mut out = Params {
            source,
            tensors: BTreeMap::new(),
            vars: BTreeMap::new(),
        };
        for (name, t) in tensors {
            if trainable(&name) {
                let var = Var::from_tensor(&t)?;
                out.tensors.insert(name.clone(), var.as_tensor().clone());
                out.vars.insert(name, var);
            } else {
                out.tensors.insert(name, t);
            }
        }
        Ok(out)
    }

    /// A view sharing storage with `self` but outside any graph: for inference and evaluation.
    pub fn detached(&self) -> Params {
        Params {
            source: self.source.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|(k, t)| (k.clone(), t.detach()))
                .collect(),
            vars: BTreeMap::new(),
        }
    }

    /// The common prefix of encoder tensor names ("" or "bert." and the like).
    pub fn prefix_of(&self, marker: &str) -> Option<String> {
        self.tensors
            .keys()
            .find_map(|k| k.find(marker).map(|i| k[..i].to_string()))
    }

    pub fn trainable_count(&self) -> usize {
        self.vars.values().map(|v| v.elem_count()).sum()
    }
}

impl Weights for Params {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| {
            Error::model(
                &self.source,
                format!("tensor `{name}` is missing (expected shape {shape:?})"),
            )
        })?;
        if t.dims() != shape {
            return Err(Error::model(
                &self.source,
                format!(
                    "tensor `{name}` has shape {:?}, but the model config needs {shape:?}",
                    t.dims()
                ),
            ));
        }
        Ok(t.clone())
    }
}

/// Prepends a prefix to every name asked for, so encoders can use names relative to their root.
pub struct Prefixed<'a> {
    pub inner: &'a dyn Weights,
    pub prefix: String,
}

impl Weights for Prefixed<'_> {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.inner.get(&format!("{}{name}", self.prefix), shape)
    }

    fn enter(&self, part: Part) {
        self.inner.enter(part);
    }
}

/// Hands out random tensors of whatever name and shape a model asks for, and keeps them:
/// building an encoder over it yields a complete, randomly initialised checkpoint.
pub struct RandomWeights {
    rng: std::cell::RefCell<rand::rngs::StdRng>,
    made: std::cell::RefCell<BTreeMap<String, Tensor>>,
}

impl RandomWeights {
    pub fn new(seed: u64) -> Self {
        use rand::SeedableRng;
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed).into(),
            made: Default::default(),
        }
    }

    pub fn into_tensors(self) -> BTreeMap<String, Tensor> {
        self.made.into_inner()
    }
}

impl Weights for RandomWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        use rand::Rng;
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if is_norm(name) || name.ends_with("norm.bias") {
            vec![if name.ends_with("weight") { 1.0 } else { 0.0 }; n]
        } else {
            let mut rng = self.rng.borrow_mut();
            // Box-Muller: normal(0, 0.02), BERT's initializer_range.
            (0..n)
                .map(|_| {
                    let (u, v): (f32, f32) = (rng.gen_range(f32::EPSILON..1.0), rng.gen());
                    0.02 * (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
                })
                .collect()
        };
        let t = Tensor::from_vec(data, shape, &candle_core::Device::Cpu)?;
        self.made.borrow_mut().insert(name.to_string(), t.clone());
        Ok(t)
    }
}

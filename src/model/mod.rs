//! A sentence-transformer: encoder (BERT, XLM-RoBERTa, RoBERTa, DistilBERT, MPNet or ModernBERT) ->
//! pooling ->
//! optional Dense -> optional Normalize, loaded from and saved to the folder layout Python
//! sentence-transformers uses.
//!
//! [`SentenceModel`] owns the weights ([`Params`]); a [`Network`] is the computation built over
//! them. `network()` builds over the trainable `Var`s (records a graph); `inference_network()`
//! over detached views of the same storage (no graph), for `encode` and evaluation.

pub mod bert;
pub mod config;
pub mod distilbert;
pub mod dropout;
pub mod embedding_cut;
pub mod embeddings;
pub mod folder;
pub mod hub;
pub mod known;
pub mod layer_op;
pub mod layers;
pub mod modernbert;
pub mod mpnet;
pub mod pooling;
pub mod prenorm_op;
pub mod recompute;
pub mod relative_buckets;
pub mod sizes;
pub mod weights;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use crate::data::batch::TokenBatch;
use crate::data::tokenize::TextTokenizer;
use crate::error::{Error, Result};
use config::ModelConfig;
use dropout::Dropout;
use embeddings::Embeddings;
use folder::FolderSpec;
use layer_op::{ParamGrads, StepSums};
use layers::{Dims, EncoderLayer, Linear};
use modernbert::ModernBertLayer;
use mpnet::RelativeBias;
use weights::{Freeze, Params, Part, PartRecorder, Prefixed, Weights};

/// One encoder layer: the post-LN layer of BERT, XLM-RoBERTa, RoBERTa, DistilBERT and MPNet,
/// or ModernBERT's pre-norm one. Each runs as one op over the engine's primitives.
#[derive(Debug, Clone)]
pub enum Layer {
    PostLn(EncoderLayer),
    ModernBert(ModernBertLayer),
}

impl Layer {
    /// x: (tokens, hidden), the rows of `batch` packed; `bias`: MPNet's attention bias;
    /// `site` numbers the layer's dropout sites.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: &TokenBatch,
        bias: Option<&Tensor>,
        drop: &Dropout,
        site: u64,
    ) -> Result<Tensor> {
        match self {
            Layer::PostLn(l) => l.forward(x, batch, bias, drop, site),
            Layer::ModernBert(l) => l.forward(x, batch, drop),
        }
    }

    /// Where the layer's op leaves its parameters' gradients.
    pub fn param_grads(&self) -> &ParamGrads {
        match self {
            Layer::PostLn(l) => &l.param_grads,
            Layer::ModernBert(l) => &l.param_grads,
        }
    }

    fn set_engine(&mut self, engine: crate::engine::Engine) {
        match self {
            Layer::PostLn(l) => l.engine = engine,
            Layer::ModernBert(l) => l.engine = engine,
        }
    }
}

/// The transformer module: the embedding layer, the layers, and MPNet's relative position
/// bias, as its family's config (`model_type`) names and sizes them.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub config: ModelConfig,
    embeddings: Embeddings,
    relative_bias: Option<RelativeBias>,
    layers: Vec<Layer>,
}

impl Encoder {
    /// The encoder of `config` over `w` (names relative to the encoder's root).
    pub fn load(w: &dyn Weights, config: &ModelConfig) -> Result<Self> {
        let s = config.sizes();
        let dims = Dims {
            hidden: s.hidden,
            heads: s.heads,
            intermediate: s.intermediate,
            eps: s.eps,
        };
        w.enter(Part::Embeddings);
        let embeddings = Embeddings::load(w, config.embedding_names(), &s)?;
        let layers = (0..s.layers)
            .map(|i| {
                w.enter(Part::Layer(i));
                if let ModelConfig::ModernBert(c) = config {
                    return Ok(Layer::ModernBert(ModernBertLayer::load(w, c, i)?));
                }
                let names = config.layer_names(i).ok_or_else(|| {
                    Error::Internal(format!("{}: no post-LN layer", config.model_type()))
                })?;
                let mut l = EncoderLayer::load(w, &names, dims)?;
                l.drops_attention_output = config.drops_attention_output();
                Ok(Layer::PostLn(l))
            })
            .collect::<Result<_>>()?;
        let relative_bias = match config {
            ModelConfig::Mpnet(c) => {
                w.enter(Part::SharedBias);
                Some(RelativeBias::load(w, c)?)
            }
            _ => None,
        };
        Ok(Self {
            embeddings,
            relative_bias,
            layers,
            config: config.clone(),
        })
    }

    /// Embedding layer output, (tokens, hidden).
    pub fn embed(&self, batch: &TokenBatch, drop: &Dropout, dtype: DType) -> Result<Tensor> {
        let words = self.word_table().index_select(&batch.ids, 0)?;
        self.embed_words(words, batch, drop, dtype)
    }

    /// The word-embedding table, (vocab, hidden).
    pub fn word_table(&self) -> &Tensor {
        &self.embeddings.word
    }

    /// The embedding layer from the gathered rows of the word table, (tokens, hidden).
    pub fn embed_words(
        &self,
        words: Tensor,
        batch: &TokenBatch,
        drop: &Dropout,
        dtype: DType,
    ) -> Result<Tensor> {
        self.embeddings.forward(words, batch, drop, dtype)
    }

    /// Additive attention bias shared by every layer for this batch (MPNet's relative
    /// positions; packed rows have no padding to mask).
    pub fn attention_bias(&self, batch: &TokenBatch) -> Result<Option<Tensor>> {
        self.relative_bias
            .as_ref()
            .map(|b| b.forward(batch))
            .transpose()
    }

    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Dropout site numbers of layer `i` (the embedding layer uses site 0).
    pub fn layer_site(i: usize) -> u64 {
        1 + 3 * i as u64
    }

    /// Token embeddings, (tokens, hidden), rows packed as in `batch`.
    pub fn forward(&self, batch: &TokenBatch, drop: &Dropout, dtype: DType) -> Result<Tensor> {
        self.forward_layers(self.embed(batch, drop, dtype)?, batch, drop)
    }

    /// Every encoder layer over the embedding layer's output `x`.
    pub fn forward_layers(
        &self,
        mut x: Tensor,
        batch: &TokenBatch,
        drop: &Dropout,
    ) -> Result<Tensor> {
        let bias = self.attention_bias(batch)?;
        for (i, layer) in self.layers().iter().enumerate() {
            x = layer.forward(&x, batch, bias.as_ref(), drop, Self::layer_site(i))?;
        }
        Ok(x)
    }
}

/// The computation from token ids to sentence embeddings.
#[derive(Debug, Clone)]
pub struct Network {
    pub encoder: Encoder,
    spec: FolderSpec,
    dense: Option<Linear>,
    /// Type the encoder computes in (f32, or f16/bf16 for mixed precision).
    pub dtype: DType,
}

impl Network {
    /// Runs the encoder's layers on `engine` instead of the device's (the engine comparisons).
    pub fn with_engine(mut self, engine: crate::engine::Engine) -> Self {
        for l in &mut self.encoder.layers {
            l.set_engine(engine);
        }
        self
    }

    /// Whether the engine adds the post-LN layers' gradients into a step's sums token after
    /// token (`cpu`, f32).
    fn sums_in_order(&self) -> bool {
        match self.encoder.layers.first() {
            Some(Layer::PostLn(l)) => l.engine.primitives(self.dtype).sums_in_order(),
            _ => false,
        }
    }

    /// The network as the trainer's passes run it: where it sums in order, MPNet's
    /// relative-bias table (when it trains) sums its gradient in the step's sums too, so its
    /// attention bias is computed without a graph, and every backward pass needs the sums set.
    pub fn for_step_sums(mut self) -> Self {
        let in_order = self.sums_in_order();
        if let Some(b) = &mut self.encoder.relative_bias {
            b.to_step_sums = in_order && b.table().track_op();
        }
        self
    }

    /// MPNet's relative-bias table, where its gradient goes to the step's sums.
    fn bias_in_order(&self) -> Option<&RelativeBias> {
        self.encoder
            .relative_bias
            .as_ref()
            .filter(|b| b.to_step_sums)
    }

    /// The trainable parameters whose gradients this network's backward passes add into a
    /// step's sums token after token, once [`Network::set_step_sums`] handed it them: every
    /// post-LN layer's and the embedding layer's (but the word table's, whose rows go to
    /// `embedding_cut::WordRows`), and MPNet's bias table after [`Network::for_step_sums`],
    /// where the engine sums in order (`cpu`, f32); else none.
    pub fn params_in_order(&self) -> Vec<Tensor> {
        if !self.sums_in_order() {
            return Vec::new();
        }
        let mut params = self.encoder.embeddings.params_in_order();
        for l in &self.encoder.layers {
            if let Layer::PostLn(l) = l {
                params.extend(l.params().into_iter().filter(Tensor::track_op));
            }
        }
        params.extend(self.bias_in_order().map(|b| b.table().clone()));
        params
    }

    /// A step's sum of `param` (one of [`Network::params_in_order`]) at zero: f32 of its
    /// shape, but per layer for MPNet's bias table (see [`Network::finish_step_sum`]).
    pub fn zero_step_sum(&self, param: &Tensor) -> Result<Tensor> {
        match self.bias_in_order() {
            Some(b) if b.table().id() == param.id() => b.zero_sums(self.encoder.layers.len()),
            _ => Ok(Tensor::zeros(param.shape(), DType::F32, param.device())?),
        }
    }

    /// `param`'s gradient from its step sum once the step is done: the sum itself, but MPNet's
    /// bias table's per-layer sums added up.
    pub fn finish_step_sum(&self, param: &Tensor, sum: &Tensor) -> Result<Tensor> {
        match self.bias_in_order() {
            Some(b) if b.table().id() == param.id() => RelativeBias::sum_layers(sum),
            _ => Ok(sum.clone()),
        }
    }

    /// Where the following backward passes add the gradients of the parameters `sums` holds
    /// (see [`Network::params_in_order`]); an empty map: back to fresh gradients. Layer `i`
    /// adds its attention bias's into table `i` of the bias table's sum.
    pub fn set_step_sums(&self, sums: &StepSums) -> Result<()> {
        let bias_sums = self.bias_in_order().and_then(|b| sums.get(&b.table().id()));
        for (i, l) in self.encoder.layers.iter().enumerate() {
            let layer_sums = bias_sums.map(|s| s.get(i)).transpose()?;
            l.param_grads().set_sums(sums.clone(), layer_sums);
        }
        Ok(())
    }

    /// The backward pass from `loss`, with the gradients of the one-op layers' parameters
    /// (which leave through `layer_op::ParamGrads`, not the graph) in the store like every
    /// other gradient. Use this, not `Tensor::backward`, on anything this network computed.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        let layers = self.encoder.layers();
        layers.iter().for_each(|l| l.param_grads().clear());
        let mut store = loss.backward()?;
        for l in layers {
            l.param_grads().drain_into(&mut store)?;
        }
        Ok(store)
    }

    /// Sentence embeddings, (batch, dim), f32.
    pub fn forward(&self, batch: &TokenBatch, drop: &Dropout) -> Result<Tensor> {
        let tokens = self.encoder.forward(batch, drop, self.dtype)?;
        self.head(&tokens, batch)
    }

    /// Token embeddings -> sentence embeddings: pooling, Dense, Normalize.
    pub fn head(&self, tokens: &Tensor, batch: &TokenBatch) -> Result<Tensor> {
        let mut x = self.spec.pooling.forward(tokens, batch)?;
        if let (Some(d), Some((_, cfg))) = (&self.dense, &self.spec.dense) {
            x = d.forward(&x)?;
            if cfg.activation_function.ends_with("Tanh") {
                x = x.tanh()?;
            }
        }
        if self.spec.normalize {
            x = pooling::normalize(&x)?;
        }
        Ok(x)
    }
}

/// A loaded model: folder description, tokenizer, weights and the device they live on.
#[derive(Clone)]
pub struct SentenceModel {
    pub spec: FolderSpec,
    pub tokenizer: TextTokenizer,
    pub params: Params,
    pub device: Device,
    /// Name prefix of the encoder's tensors in model.safetensors ("" or "bert." ...).
    prefix: String,
    /// The engine the layers run on instead of the device's (`st-tune bench launches`).
    pub layer_engine: Option<crate::engine::Engine>,
}

impl SentenceModel {
    /// Loads a folder or hub id. `freeze` = None loads for inference (nothing trains).
    pub fn load(model: &str, device: &Device, freeze: Option<Freeze>) -> Result<Self> {
        let root = hub::resolve(model)?;
        let spec = FolderSpec::read(&root)?;
        let tok_path = root.join("tokenizer.json");
        if !tok_path.exists() {
            return Err(Error::model(&root, "tokenizer.json not found"));
        }
        let tokenizer = TextTokenizer::load(&tok_path, spec.max_seq_length, spec.do_lower_case)?;

        let weights_path = root.join("model.safetensors");
        let mut tensors = read_safetensors(&weights_path, device)?;
        if let Some((dir, _)) = &spec.dense {
            for (k, t) in read_safetensors(&root.join(dir).join("model.safetensors"), device)? {
                tensors.insert(format!("{dir}/{k}"), t);
            }
        }
        let float: std::collections::BTreeSet<String> = tensors
            .iter()
            .filter(|(_, t)| t.dtype().is_float())
            .map(|(k, _)| k.clone())
            .collect();
        let plain = Params::from_tensors(weights_path, tensors, &|_| false)?;
        let prefix = plain
            .prefix_of(spec.model.embedding_names().word)
            .unwrap_or_default();
        // What trains is decided by the part of the model each tensor is loaded for, whatever
        // the family names it or prefixes it with.
        let recorder = PartRecorder::new(&plain);
        build_network(&spec, &prefix, &recorder, DType::F32)?;
        let parts = recorder.into_parts();
        let trainable = |name: &str| {
            float.contains(name)
                && freeze.is_some_and(|f| parts.get(name).is_some_and(|&p| f.trains(p)))
        };
        let params = Params::from_tensors(plain.source, plain.tensors, &trainable)?;
        let model = Self {
            spec,
            tokenizer,
            params,
            device: device.clone(),
            prefix,
            layer_engine: None,
        };
        model.network()?; // fail now, naming the tensor, rather than at the first batch
        Ok(model)
    }

    pub fn network(&self) -> Result<Network> {
        self.build(&self.params, DType::F32)
    }

    pub fn inference_network(&self) -> Result<Network> {
        self.build(&self.params.detached(), DType::F32)
    }

    pub fn build(&self, params: &Params, dtype: DType) -> Result<Network> {
        let net = build_network(&self.spec, &self.prefix, params, dtype)?;
        Ok(match self.layer_engine {
            Some(engine) => net.with_engine(engine),
            None => net,
        })
    }

    /// Tokenizes texts into one packed batch on the model's device.
    pub fn batch(&self, texts: &[&str]) -> Result<TokenBatch> {
        self.prompted_batch(texts, None)
    }

    /// [`SentenceModel::batch`] of `prompt` + each text, with the prompt's token count on each
    /// row (pooling leaves those tokens out when the model's `include_prompt` is false).
    pub fn prompted_batch(&self, texts: &[&str], prompt: Option<&str>) -> Result<TokenBatch> {
        let (ids, prompt_tokens) = match prompt.filter(|p| !p.is_empty()) {
            Some(p) => {
                let prompted: Vec<String> = texts.iter().map(|t| format!("{p}{t}")).collect();
                let refs: Vec<&str> = prompted.iter().map(String::as_str).collect();
                (
                    self.tokenizer.encode(&refs)?,
                    self.tokenizer.prompt_length(p)?,
                )
            }
            None => (self.tokenizer.encode(texts)?, 0),
        };
        let rows: Vec<&[u32]> = ids.iter().map(|r| r.as_slice()).collect();
        Ok(TokenBatch::new(&rows, &self.device)?
            .with_prompt_tokens(vec![prompt_tokens; rows.len()]))
    }

    /// Embeddings of `texts` without a graph, in batches of texts of similar length.
    pub fn encode(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        self.encode_prompted(texts, None, batch_size)
    }

    /// [`SentenceModel::encode`] of `prompt` + each text (the prompt's text, not its name).
    pub fn encode_prompted(
        &self,
        texts: &[&str],
        prompt: Option<&str>,
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let net = self.inference_network()?;
        let mut order: Vec<usize> = (0..texts.len()).collect();
        // Longest first, as sentence-transformers does: batches of similar length pad little.
        order.sort_by_key(|&i| std::cmp::Reverse(texts[i].len()));
        let mut out = vec![Vec::new(); texts.len()];
        for chunk in order.chunks(batch_size.max(1)) {
            let batch_texts: Vec<&str> = chunk.iter().map(|&i| texts[i]).collect();
            let batch = self.prompted_batch(&batch_texts, prompt)?;
            let emb = net.forward(&batch, &Dropout::off())?.to_vec2::<f32>()?;
            for (&i, e) in chunk.iter().zip(emb) {
                out[i] = e;
            }
        }
        Ok(out)
    }

    pub fn num_layers(&self) -> usize {
        self.spec.model.sizes().layers
    }

    /// What the memory planner needs to know of this model (`memory::plan::plan_input`
    /// adds the `[train]` settings).
    pub fn plan_shape(&self) -> Result<crate::memory::plan::ModelShape> {
        let s = self.spec.model.sizes();
        Ok(crate::memory::plan::ModelShape {
            hidden: s.hidden,
            intermediate: s.intermediate,
            heads: s.heads,
            layers: s.layers,
            relative_bias: self.spec.model.relative_bias(),
            gated_ffn: self.spec.model.gated_ffn(),
            params: self.params.tensors.values().map(|t| t.elem_count()).sum(),
            trainable: self.params.trainable_count(),
            trainable_word_embeddings: self
                .params
                .vars
                .get(&format!(
                    "{}{}",
                    self.prefix,
                    self.spec.model.embedding_names().word
                ))
                .map_or(0, |v| v.elem_count()),
            padded_attention: crate::engine::Engine::for_device(&self.device)
                == crate::engine::Engine::Portable,
            attention: crate::memory::plan::AttentionLayers::new(s.layers, |i| {
                self.spec.model.local_window(i)
            }),
            word_rows: self.device.is_cpu(),
        })
    }

    pub fn set_max_seq_length(&mut self, max: usize) -> Result<()> {
        self.spec.max_seq_length = max;
        self.tokenizer.set_max_seq_length(max)
    }

    /// Writes a sentence-transformers folder at `dir`, atomically (built beside it, then renamed).
    pub fn save(&self, dir: &Path, card: &str) -> Result<()> {
        let parent = crate::atomic::parent(dir);
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let staged = crate::atomic::sibling(dir, "tmp");
        let _ = std::fs::remove_dir_all(&staged);
        std::fs::create_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;
        self.spec.write(&staged, card)?;
        let mut files: BTreeMap<String, HashMap<String, Tensor>> = BTreeMap::new();
        for (k, t) in &self.params.tensors {
            let (file, key) = match k.split_once('/') {
                Some((dir, key)) => (format!("{dir}/model.safetensors"), key.to_string()),
                None => ("model.safetensors".to_string(), k.clone()),
            };
            files
                .entry(file)
                .or_default()
                .insert(key, t.detach().to_device(&Device::Cpu)?);
        }
        for (file, tensors) in files {
            let path = staged.join(file);
            // "format": "pt" as PyTorch writes it; some transformers versions require it.
            let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
            safetensors::serialize_to_file(&tensors, Some(meta), &path)
                .map_err(|e| Error::model(&path, format!("cannot write weights: {e}")))?;
        }
        crate::atomic::replace_dir(&staged, dir)
    }
}

/// The network of the folder `spec` over `params`, whose encoder tensors are named with
/// `prefix` ("" or "bert." and the like).
fn build_network(
    spec: &FolderSpec,
    prefix: &str,
    params: &dyn Weights,
    dtype: DType,
) -> Result<Network> {
    let w = Prefixed {
        inner: params,
        prefix: prefix.to_string(),
    };
    let encoder = Encoder::load(&w, &spec.model)?;
    let dense = match &spec.dense {
        Some((dir, cfg)) => {
            params.enter(Part::Head);
            let w = Prefixed {
                inner: params,
                prefix: format!("{dir}/"),
            };
            let mut l = Linear::load_weight(&w, "linear", cfg.in_features, cfg.out_features)?;
            if cfg.bias {
                l.bias = Some(w.get("linear.bias", &[cfg.out_features])?);
            }
            Some(l)
        }
        None => None,
    };
    Ok(Network {
        encoder,
        spec: spec.clone(),
        dense,
        dtype,
    })
}

/// Writes a copy of the model folder `like` (config, tokenizer, modules) with randomly
/// initialised weights of the same names and shapes: a stand-in for real weights where they
/// cannot be sent (the GPU check) or are not needed. Initialised as BERT is: normal(0, 0.02),
/// layer norms at weight 1, bias 0.
pub fn write_random_model(like: &Path, out: &Path, seed: u64) -> Result<()> {
    let spec = FolderSpec::read(like)?;
    let random = weights::RandomWeights::new(seed);
    Encoder::load(&random, &spec.model)?;
    let tensors = random.into_tensors();
    let params = Params::from_tensors(out.join("model.safetensors"), tensors, &|_| false)?;
    let tokenizer = TextTokenizer::load(
        &like.join("tokenizer.json"),
        spec.max_seq_length,
        spec.do_lower_case,
    )?;
    let model = SentenceModel {
        spec,
        tokenizer,
        params,
        device: Device::Cpu,
        prefix: String::new(),
        layer_engine: None,
    };
    model.save(out, &format!("# Random model\n\nRandomly initialised with the shapes of `{}` (seed {seed}); not trained.\n", like.display()))
}

fn read_safetensors(path: &Path, device: &Device) -> Result<BTreeMap<String, Tensor>> {
    if !path.exists() {
        return Err(Error::model(
            path,
            "weights file not found (st-tune reads model.safetensors)",
        ));
    }
    let raw = candle_core::safetensors::load(path, device).map_err(|e| {
        Error::model(
            path,
            format!("cannot read safetensors file (corrupt or truncated?): {e}"),
        )
    })?;
    // Float weights become f32 (the master copy); integer buffers such as position_ids stay
    // as they are, so saving writes them back unchanged.
    raw.into_iter()
        .map(|(k, t)| {
            let t = if t.dtype().is_float() {
                t.to_dtype(DType::F32)?
            } else {
                t
            };
            Ok((k, t))
        })
        .collect()
}

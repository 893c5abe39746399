//! Reading and writing a sentence-transformers folder: `modules.json` lists the modules
//! (Transformer at the root, `1_Pooling`, optional `2_Dense`, `2_Normalize`), each with its own
//! config file. A plain Hugging Face folder (no modules.json) is read as Transformer + mean
//! pooling. Writing is atomic: the folder is built beside the target and renamed into place.
//!
//! Both layouts are read: 2.x-5.x (`sentence_transformers.models.Pooling`, `pooling_mode_*`
//! flags, `max_seq_length` in sentence_bert_config.json) and 6.x
//! (`sentence_transformers.sentence_transformer.modules.pooling.Pooling`, `pooling_mode`,
//! `model_max_length` in tokenizer_config.json). A folder is written back in the layout it was
//! read in (module types, pooling config and the extra keys of sentence_bert_config.json kept),
//! so it stays loadable by every version that loaded it before; a plain Hugging Face folder is
//! written in the 2.x-5.x layout, which every version from 2.x to 6.x reads.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::pooling::PoolingConfig;
use std::collections::BTreeMap;

const TRANSFORMER: &str = "sentence_transformers.models.Transformer";
const POOLING: &str = "sentence_transformers.models.Pooling";

/// Files of the Transformer module that are copied verbatim when saving, if present.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "added_tokens.json",
    "sentencepiece.bpe.model",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleEntry {
    pub idx: usize,
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
}

/// A `Dense` module (`2_Dense/config.json`), applied after pooling.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DenseConfig {
    pub in_features: usize,
    pub out_features: usize,
    #[serde(default = "yes")]
    pub bias: bool,
    #[serde(default = "tanh")]
    pub activation_function: String,
    /// 6.x keys (`module_input_name`, ...), written back as read.
    #[serde(flatten)]
    pub other: serde_json::Map<String, Value>,
}

fn yes() -> bool {
    true
}
fn tanh() -> String {
    "torch.nn.modules.activation.Tanh".into()
}

/// Everything about a model folder except its weights.
#[derive(Debug, Clone)]
pub struct FolderSpec {
    pub root: PathBuf,
    /// `config.json` as read, written back unchanged.
    pub config: Value,
    /// `config.json` parsed, once.
    pub model: ModelConfig,
    pub max_seq_length: usize,
    pub do_lower_case: bool,
    /// `sentence_bert_config.json` as read (6.x keeps `transformer_task`, `modality_config` ...
    /// there), written back with `max_seq_length` and `do_lower_case` set.
    pub st_config: serde_json::Map<String, Value>,
    pub pooling: PoolingConfig,
    /// Named prompts (`config_sentence_transformers.json` `prompts`, plus `model.prompts`):
    /// text prepended to an input, e.g. "query" -> "query: ".
    pub prompts: BTreeMap<String, String>,
    /// The prompt sentence-transformers' `encode` applies when none is named.
    pub default_prompt_name: Option<String>,
    /// Folder name (e.g. "2_Dense") and config, when the model has a Dense module.
    pub dense: Option<(String, DenseConfig)>,
    pub normalize: bool,
    /// The module list to write back (generated for plain Hugging Face folders).
    pub modules: Vec<ModuleEntry>,
    /// True when the folder had no modules.json and mean pooling was assumed.
    pub assumed_pooling: bool,
}

impl FolderSpec {
    /// Width of the sentence embeddings: the Dense layer's output, else the pooling's.
    pub fn embedding_dim(&self) -> usize {
        match &self.dense {
            Some((_, d)) => d.out_features,
            None => self.pooling.output_dim(),
        }
    }

    /// The text of the prompt `name`, or of the default prompt when `name` is None, as
    /// sentence-transformers' `encode(prompt_name=...)` resolves it.
    pub fn prompt(&self, name: Option<&str>) -> Result<Option<&str>> {
        let Some(name) = name.or(self.default_prompt_name.as_deref()) else {
            return Ok(None);
        };
        match self.prompts.get(name) {
            Some(text) => Ok(Some(text.as_str())),
            None => {
                let known: Vec<&str> = self.prompts.keys().map(String::as_str).collect();
                Err(Error::model(
                    self.root.join("config_sentence_transformers.json"),
                    format!(
                        "has no prompt named \"{name}\"; its prompts: {}",
                        if known.is_empty() {
                            "none".into()
                        } else {
                            known.join(", ")
                        }
                    ),
                ))
            }
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::model(path, format!("invalid JSON: {e}")))
}

fn parse<T: for<'de> Deserialize<'de>>(path: &Path, v: Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::model(path, e.to_string()))
}

impl FolderSpec {
    pub fn read(root: &Path) -> Result<Self> {
        let config_path = root.join("config.json");
        let modules_path = root.join("modules.json");
        if !config_path.exists() && !modules_path.exists() {
            return Err(Error::model(
                root,
                "neither modules.json nor config.json found: not a sentence-transformers or \
                 Hugging Face model folder",
            ));
        }
        if !config_path.exists() {
            return Err(Error::model(
                root,
                "config.json not found next to modules.json",
            ));
        }
        let config = read_json(&config_path)?;
        let model = ModelConfig::parse(&config_path, &config)?;
        let hidden = model.sizes().hidden;
        let max_pos = model.sizes().positions;

        let st_config_path = root.join("sentence_bert_config.json");
        let st_config = if st_config_path.exists() {
            match read_json(&st_config_path)? {
                Value::Object(o) => o,
                _ => return Err(Error::model(&st_config_path, "is not a JSON object")),
            }
        } else {
            serde_json::Map::new()
        };
        // 6.x keeps the limit in the tokenizer's config (capped by the positions, as
        // sentence-transformers does); 2.x-5.x in sentence_bert_config.json, which wins.
        let tokenizer_limit = tokenizer_max_length(root)?.map(|m| m.min(max_pos));
        let mut max_seq_length = tokenizer_limit.unwrap_or(max_pos.min(512));
        if let Some(m) = st_config.get("max_seq_length").and_then(Value::as_u64) {
            max_seq_length = m as usize;
        }
        let do_lower_case = st_config
            .get("do_lower_case")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (prompts, default_prompt_name) = read_prompts(root)?;
        // MPNet/RoBERTa positions start after the padding index: they hold max_pos - 2 tokens.
        let positions = model.max_tokens();
        if positions == 0 {
            return Err(Error::model(
                &config_path,
                format!(
                    "max_position_embeddings is {max_pos}, but the positions start after the \
                     padding index: it needs at least {}",
                    model.embedding_names().position_offset + 1
                ),
            ));
        }
        max_seq_length = max_seq_length.min(positions);

        let mut spec = FolderSpec {
            root: root.to_path_buf(),
            config,
            model,
            max_seq_length,
            do_lower_case,
            st_config,
            pooling: PoolingConfig::mean(hidden),
            prompts,
            default_prompt_name,
            dense: None,
            normalize: false,
            modules: Vec::new(),
            assumed_pooling: false,
        };

        if !modules_path.exists() {
            spec.assumed_pooling = true;
            spec.modules = default_modules();
            return Ok(spec);
        }
        spec.modules = parse(&modules_path, read_json(&modules_path)?)?;
        for m in &spec.modules {
            let dir = root.join(&m.path);
            match m.kind.rsplit('.').next().unwrap_or("") {
                "Transformer" => {}
                "Pooling" => {
                    let p = dir.join("config.json");
                    spec.pooling = PoolingConfig::from_json(&read_json(&p)?)
                        .map_err(|e| Error::model(&p, e))?;
                }
                "Dense" => {
                    let p = dir.join("config.json");
                    let dense: DenseConfig = parse(&p, read_json(&p)?)?;
                    if dense.other.get("use_residual") == Some(&Value::Bool(true)) {
                        return Err(Error::model(
                            &p,
                            "use_residual = true (a residual Dense) is not supported by st-tune",
                        ));
                    }
                    spec.dense = Some((m.path.clone(), dense));
                }
                "Normalize" => spec.normalize = true,
                other => {
                    return Err(Error::model(
                        &modules_path,
                        format!(
                            "module type `{}` ({other}) is not supported; st-tune knows \
                             Transformer, Pooling, Dense and Normalize",
                            m.kind
                        ),
                    ))
                }
            }
        }
        Ok(spec)
    }

    /// Writes the non-weight files into `dir` (which exists and is empty).
    pub fn write(&self, dir: &Path, card: &str) -> Result<()> {
        let write = |rel: &str, text: String| -> Result<()> {
            let p = dir.join(rel);
            if let Some(parent) = p.parent() {
                fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            fs::write(&p, text).map_err(|e| Error::io(&p, e))
        };
        let pretty = |v: &Value| serde_json::to_string_pretty(v).expect("JSON values serialize");
        write("config.json", pretty(&self.config))?;
        for f in TOKENIZER_FILES {
            let src = self.root.join(f);
            if src.exists() {
                let dst = dir.join(f);
                fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
            }
        }
        let mut st_config = self.st_config.clone();
        st_config.insert("max_seq_length".into(), json!(self.max_seq_length));
        st_config.insert("do_lower_case".into(), json!(self.do_lower_case));
        write(
            "sentence_bert_config.json",
            pretty(&Value::Object(st_config)),
        )?;
        write(
            "modules.json",
            pretty(&serde_json::to_value(&self.modules).unwrap()),
        )?;
        for m in &self.modules {
            match m.kind.rsplit('.').next().unwrap_or("") {
                "Pooling" => write(
                    &format!("{}/config.json", m.path),
                    pretty(&self.pooling.to_json()),
                )?,
                "Dense" => {
                    if let Some((_, cfg)) = &self.dense {
                        write(
                            &format!("{}/config.json", m.path),
                            pretty(&serde_json::to_value(cfg).unwrap()),
                        )?;
                    }
                }
                "Normalize" => {
                    fs::create_dir_all(dir.join(&m.path)).map_err(|e| Error::io(dir, e))?;
                    // 6.x gives Normalize a config (its input and output names): kept.
                    let src = self.root.join(&m.path).join("config.json");
                    if src.exists() {
                        let dst = dir.join(&m.path).join("config.json");
                        fs::copy(&src, &dst).map_err(|e| Error::io(&src, e))?;
                    }
                }
                _ => {}
            }
        }
        let st = self.root.join("config_sentence_transformers.json");
        let mut st_cfg = if st.exists() {
            read_json(&st)?
        } else {
            json!({"prompts": {}, "default_prompt_name": null, "similarity_fn_name": "cosine"})
        };
        // Who wrote this folder: st-tune, not the base model's sentence-transformers version
        // (Python only compares `__version__.sentence_transformers`, so leaving it out is safe).
        if let Some(obj) = st_cfg.as_object_mut() {
            obj.insert("prompts".into(), json!(self.prompts));
            obj.insert(
                "default_prompt_name".into(),
                json!(self.default_prompt_name),
            );
            obj.insert(
                "__version__".into(),
                json!({"st_tune": env!("CARGO_PKG_VERSION")}),
            );
        }
        write("config_sentence_transformers.json", pretty(&st_cfg))?;
        write("README.md", card.to_string())
    }
}

/// `model_max_length` of tokenizer_config.json, where 6.x keeps the truncation length.
fn tokenizer_max_length(root: &Path) -> Result<Option<usize>> {
    let path = root.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(None);
    }
    // transformers writes a huge number (1e30) for "no limit": not a limit.
    Ok(read_json(&path)?
        .get("model_max_length")
        .and_then(Value::as_u64)
        .filter(|&m| m < 1 << 31)
        .map(|m| m as usize))
}

/// The named prompts and default prompt name of config_sentence_transformers.json.
fn read_prompts(root: &Path) -> Result<(BTreeMap<String, String>, Option<String>)> {
    let path = root.join("config_sentence_transformers.json");
    if !path.exists() {
        return Ok((BTreeMap::new(), None));
    }
    let v = read_json(&path)?;
    // 6.x saves its unset defaults as {"query": "", "document": ""} (or null values).
    let prompts: BTreeMap<String, Option<String>> = match v.get("prompts") {
        None | Some(Value::Null) => BTreeMap::new(),
        Some(p) => parse(&path, p.clone())?,
    };
    let prompts: BTreeMap<String, String> = prompts
        .into_iter()
        .filter_map(|(k, v)| Some((k, v?)))
        .collect();
    let default = match v.get("default_prompt_name") {
        None | Some(Value::Null) => None,
        Some(Value::String(name)) => Some(name.clone()),
        Some(other) => {
            return Err(Error::model(
                &path,
                format!("default_prompt_name is {other}, not a string or null"),
            ))
        }
    };
    if let Some(name) = &default {
        if !prompts.contains_key(name) {
            return Err(Error::model(
                &path,
                format!("default_prompt_name \"{name}\" is not one of its prompts"),
            ));
        }
    }
    Ok((prompts, default))
}

/// The modules of a plain Hugging Face folder: the transformer and mean pooling.
fn default_modules() -> Vec<ModuleEntry> {
    let entry = |idx: usize, path: &str, kind: &str| ModuleEntry {
        idx,
        name: idx.to_string(),
        path: path.into(),
        kind: kind.into(),
    };
    vec![entry(0, "", TRANSFORMER), entry(1, "1_Pooling", POOLING)]
}

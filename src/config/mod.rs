//! The one typed training config: a TOML file with six sections (`[model]`, `[guide]`,
//! `[data]`, `[train]`, `[memory]`, `[output]`), then `--set section.key=value` overrides on top
//! (file first, `--set` wins).
//!
//! Every key is declared once, in `keys.rs`: type, default, help, the rule its value follows,
//! and whether it changes the trained model. From that one declaration come the struct field,
//! `config --defaults` ([`defaults_toml`]), the list of valid keys in unknown-key errors, the
//! "expected …" text of type errors, the checks of [`Config::validate`], the keys a resumed run
//! may change ([`changes_result`]) and what a sweep may search over.
//!
//! Loading happens in three passes so that every error names the key at fault:
//! 1. parse TOML and apply overrides (syntax errors name the file, line and column);
//! 2. check every key against the declarations (unknown keys get a "did you mean" suggestion);
//! 3. deserialize, key by key first, so a type error reads
//!    ``config key `train.batch_size`: expected a positive integer, got "sixteen"``.
//!    Typed values are parsed here, once: `memory.limit` into a [`MemoryLimit`],
//!    `memory.escalate` into [`Lever`]s.
//!
//! [`Config::validate`], which the caller runs after `load`, applies each key's own rule and
//! the rules between keys (a micro-batch no larger than the batch): `load` alone accepts the
//! printed defaults, whose `model.path` and `data.train` are empty.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::batch::BatchSampler;
pub use crate::data::read::Format;
use crate::error::{Error, Result};

mod keys;
pub mod metric;
pub mod train_data;
pub use keys::{
    all_keys, DataSection, GuideSection, KeyDoc, MemorySection, ModelSection, OutputSection,
    TrainSection, SECTIONS,
};
pub use metric::Metric;
pub use train_data::{ResolvedSet, TrainData, TrainSet};

impl TrainSection {
    /// Whether the embedding layer trains: frozen with the layers above it unless the user
    /// says otherwise (training it would keep every frozen layer's activations).
    pub fn freezes_embeddings(&self) -> bool {
        self.freeze_embeddings.unwrap_or(self.freeze_layers > 0)
    }

    /// `batch_sampler`, or its default for the loss: no repeated text in a batch for the
    /// losses that take the batch's other texts as negatives.
    pub fn batch_sampler(&self) -> BatchSampler {
        self.batch_sampler_for(self.loss)
    }

    /// `batch_sampler`, or its default for `loss` (a training set's own loss).
    pub fn batch_sampler_for(&self, loss: LossKind) -> BatchSampler {
        self.batch_sampler.unwrap_or(match loss {
            LossKind::Mnrl | LossKind::Mnsrl | LossKind::Gist => BatchSampler::NoDuplicates,
            _ => BatchSampler::Default,
        })
    }

    /// `scale`, or its default for the loss: 100 for gist (GISTEmbedLoss's temperature 0.01),
    /// 20 for the others (MultipleNegativesRankingLoss's and CoSENTLoss's scale).
    pub fn scale(&self) -> f64 {
        self.scale.unwrap_or(default_scale(self.loss))
    }

    /// The micro-batch setting with its default filled in: the whole batch in one pass.
    pub fn micro_batch(&self) -> MicroBatch {
        self.micro_batch_size
            .unwrap_or(MicroBatch::Size(self.batch_size))
    }
}

/// The similarity scale a loss takes when `train.scale` is unset: 100 for gist
/// (GISTEmbedLoss's temperature 0.01), 20 for the others.
pub fn default_scale(loss: LossKind) -> f64 {
    match loss {
        LossKind::Gist => 100.0,
        _ => 20.0,
    }
}

/// The whole training config. See [`defaults_toml`] for every key with its meaning.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelSection,
    pub guide: GuideSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub memory: MemorySection,
    pub output: OutputSection,
}

/// The training loss; see `losses/` for what each computes and when to use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// MultipleNegativesRankingLoss: (anchor, positive[, negative]) rows.
    Mnrl,
    /// MultipleNegativesSymmetricRankingLoss: (anchor, positive[, negative]) rows.
    Mnsrl,
    /// GISTEmbedLoss: (anchor, positive[, negative]) rows and a guide model (`[guide]`).
    Gist,
    /// CoSENTLoss: (sentence1, sentence2, score) rows.
    Cosent,
    /// CosineSimilarityLoss: (sentence1, sentence2, score) rows.
    Cosine,
    /// TripletLoss: (anchor, positive, negative) rows.
    Triplet,
    /// ContrastiveLoss: (sentence1, sentence2, label) rows, label 0 or 1.
    Contrastive,
    /// OnlineContrastiveLoss: (sentence1, sentence2, label) rows, label 0 or 1.
    OnlineContrastive,
    /// MSELoss: (text, embedding) rows, the embedding a teacher's.
    Mse,
    /// MarginMSELoss: (anchor, positive, negative, margin) rows, the margin a teacher's.
    MarginMse,
}

impl LossKind {
    pub const ALL: [LossKind; 10] = [
        LossKind::Mnrl,
        LossKind::Mnsrl,
        LossKind::Gist,
        LossKind::Cosent,
        LossKind::Cosine,
        LossKind::Triplet,
        LossKind::Contrastive,
        LossKind::OnlineContrastive,
        LossKind::Mse,
        LossKind::MarginMse,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LossKind::Mnrl => "mnrl",
            LossKind::Mnsrl => "mnsrl",
            LossKind::Gist => "gist",
            LossKind::Cosent => "cosent",
            LossKind::Cosine => "cosine",
            LossKind::Triplet => "triplet",
            LossKind::Contrastive => "contrastive",
            LossKind::OnlineContrastive => "online_contrastive",
            LossKind::Mse => "mse",
            LossKind::MarginMse => "margin_mse",
        }
    }
}

impl fmt::Display for LossKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `train.distance`: how TripletLoss and the contrastive losses measure how far apart two
/// embeddings are (sentence-transformers' TripletDistanceMetric / SiameseDistanceMetric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Distance {
    /// ‖x − y‖₂.
    Euclidean,
    /// 1 − cos(x, y).
    Cosine,
    /// ‖x − y‖₁.
    Manhattan,
}

impl Distance {
    pub fn as_str(self) -> &'static str {
        match self {
            Distance::Euclidean => "euclidean",
            Distance::Cosine => "cosine",
            Distance::Manhattan => "manhattan",
        }
    }
}

impl fmt::Display for Distance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Floating-point type of the forward/backward pass (master weights stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::F16 => "f16",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `train.micro_batch_size`: a fixed number of rows per pass, or "auto" (the largest that
/// fits, found by the out-of-memory handler). In TOML: a positive integer or `"auto"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MicroBatch {
    Auto,
    Size(usize),
}

impl fmt::Display for MicroBatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MicroBatch::Auto => f.write_str("auto"),
            MicroBatch::Size(n) => write!(f, "{n}"),
        }
    }
}

impl Serialize for MicroBatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MicroBatch::Auto => s.serialize_str("auto"),
            MicroBatch::Size(n) => s.serialize_u64(*n as u64),
        }
    }
}

impl<'de> Deserialize<'de> for MicroBatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = MicroBatch;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a positive integer or \"auto\"")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<MicroBatch, E> {
                match usize::try_from(n) {
                    Ok(n) if n > 0 => Ok(MicroBatch::Size(n)),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Unsigned(n), &self)),
                }
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<MicroBatch, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Signed(n), &self)),
                }
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<MicroBatch, E> {
                if s == "auto" {
                    Ok(MicroBatch::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(s), &self))
                }
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A `memory.escalate` lever: what the OOM handler may switch on when even one row per pass
/// does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lever {
    GradientCheckpointing,
    Bf16,
    F16,
    /// Halve `model.max_seq_length` (at least 8 tokens).
    MaxSeqLength,
}

impl Lever {
    pub fn as_str(self) -> &'static str {
        match self {
            Lever::GradientCheckpointing => "gradient_checkpointing",
            Lever::Bf16 => "bf16",
            Lever::F16 => "f16",
            Lever::MaxSeqLength => "max_seq_length",
        }
    }
}

impl fmt::Display for Lever {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `memory.escalate`'s own rules: each lever once, not both half types.
fn check_levers(levers: &[Lever]) -> std::result::Result<(), String> {
    for (i, lever) in levers.iter().enumerate() {
        if levers[..i].contains(lever) {
            return Err(format!("lists \"{lever}\" twice"));
        }
    }
    if levers.contains(&Lever::Bf16) && levers.contains(&Lever::F16) {
        return Err("lists both \"bf16\" and \"f16\"; keep the one your device supports".into());
    }
    Ok(())
}

/// A parsed `memory.limit`: an absolute size, or a fraction (0, 1] of the device's memory,
/// with the text it was written as (shown in messages, written back to configs).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryLimit {
    text: String,
    amount: Amount,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Amount {
    Bytes(u64),
    Fraction(f64),
}

impl MemoryLimit {
    /// The limit in bytes on a device with `total` bytes.
    pub fn bytes_of(&self, total: u64) -> u64 {
        match self.amount {
            Amount::Bytes(b) => b,
            Amount::Fraction(f) => (total as f64 * f) as u64,
        }
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl Serialize for MemoryLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for MemoryLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_memory_limit(&text).map_err(|e| match e {
            Error::Config { msg, .. } => serde::de::Error::custom(msg),
            other => serde::de::Error::custom(other),
        })
    }
}

/// Parses "6GiB", "512MiB", "1.5GB", "800 MB", "80%". Units are case-insensitive; KB/MB/GB/TB
/// are powers of 1000, KiB/MiB/GiB/TiB powers of 1024. A bare number is rejected because
/// "6" is more likely a forgotten unit than six bytes.
pub fn parse_memory_limit(s: &str) -> Result<MemoryLimit> {
    const KEY: &str = "memory.limit";
    const HINT: &str = "write a size such as \"6GiB\", \"512MiB\" or \"80%\"";
    let s = s.trim();
    if let Some(pct) = s.strip_suffix('%') {
        let p: f64 = pct
            .trim()
            .parse()
            .map_err(|_| Error::config(KEY, format!("`{s}` is not a percentage; {HINT}")))?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(Error::config(
                KEY,
                format!("`{s}`: a percentage must be above 0% and at most 100%"),
            ));
        }
        return Ok(MemoryLimit {
            text: s.to_string(),
            amount: Amount::Fraction(p / 100.0),
        });
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let value: f64 = number
        .parse()
        .map_err(|_| Error::config(KEY, format!("`{s}` is not a size; {HINT}")))?;
    let scale: u64 = match unit.to_ascii_lowercase().as_str() {
        "b" => 1,
        "kb" => 1000,
        "mb" => 1000u64.pow(2),
        "gb" => 1000u64.pow(3),
        "tb" => 1000u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "" => {
            return Err(Error::config(
                KEY,
                format!("`{s}` has no unit; {HINT} (units: B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"),
            ))
        }
        _ => {
            return Err(Error::config(
                KEY,
                format!(
                    "unknown unit `{unit}` in `{s}`; use B, KB, MB, GB, TB, KiB, MiB, GiB, TiB or %"
                ),
            ))
        }
    };
    let bytes = (value * scale as f64).round();
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(Error::config(KEY, format!("`{s}` is not a usable size")));
    }
    Ok(MemoryLimit {
        text: s.to_string(),
        amount: Amount::Bytes(bytes as u64),
    })
}

/// The keys whose values differ between two flattened configs (see [`Config::flat`]) and that
/// `keep` selects, each as "key (A: value, B: value)" with `names` = (A, B).
pub fn differences(
    a: &BTreeMap<String, String>,
    b: &BTreeMap<String, String>,
    names: (&str, &str),
    keep: impl Fn(&str) -> bool,
) -> Vec<String> {
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| keep(k) && a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |m: &BTreeMap<String, String>| m.get(k).cloned().unwrap_or("unset".into());
            format!("{k} ({}: {}, {}: {})", names.0, show(a), names.1, show(b))
        })
        .collect()
}

/// Whether a different value of `key` ("section.key") gives a different trained model.
pub fn changes_result(key: &str) -> bool {
    let Some((section, name)) = key.split_once('.') else {
        return true;
    };
    key_doc(section, name).is_none_or(|d| d.changes_result)
}

/// Names users bring from sentence-transformers / Hugging Face, mapped to ours.
const ALIASES: &[(&str, &str)] = &[
    ("learning_rate", "train.lr"),
    ("num_train_epochs", "train.epochs"),
    ("num_epochs", "train.epochs"),
    ("train_batch_size", "train.batch_size"),
    ("per_device_train_batch_size", "train.batch_size"),
    ("warmup_steps", "train.warmup_ratio"),
    ("max_length", "model.max_seq_length"),
    ("model_name", "model.path"),
    ("model_name_or_path", "model.path"),
    ("output_dir", "output.dir"),
];

fn key_doc(section: &str, key: &str) -> Option<&'static KeyDoc> {
    all_keys().find(|k| k.section == section && k.key == key)
}

impl Config {
    /// Reads `path`, applies `overrides` (`section.key=value`, later ones win) and checks
    /// every key. Does not run [`Config::validate`].
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Config::from_toml(&text, &path.display().to_string(), overrides)
    }

    /// Like [`Config::load`] on text already in memory; `origin` names it in syntax errors.
    /// `Config::from_toml("", "--set", overrides)` builds a config from overrides alone.
    pub fn from_toml(text: &str, origin: &str, overrides: &[String]) -> Result<Config> {
        let mut root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| syntax_error(text, origin, &e))?;
        for o in overrides {
            apply_override(&mut root, o)?;
        }
        check_keys(&root)?;
        check_types(&root)?;
        toml::Value::Table(root)
            .try_into()
            .map_err(|e: toml::de::Error| Error::config(origin, e.message().to_string()))
    }

    /// Every key set, as `section.key` -> its TOML text (tables such as `data.columns` whole).
    pub fn flat(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        if let Ok(toml::Value::Table(root)) = toml::Value::try_from(self) {
            for (section, v) in root {
                if let toml::Value::Table(keys) = v {
                    for (k, v) in keys {
                        out.insert(format!("{section}.{k}"), v.to_string());
                    }
                }
            }
        }
        out
    }

    /// Each key's own rule (declared with the key in `keys.rs`), then the rules between
    /// keys; each error names the key to change.
    pub fn validate(&self) -> Result<()> {
        self.model.check_each()?;
        self.guide.check_each()?;
        self.data.check_each()?;
        self.train.check_each()?;
        self.memory.check_each()?;
        self.output.check_each()?;
        if let TrainData::Sets(sets) = &self.data.train {
            for (i, set) in sets.iter().enumerate() {
                if let Some(columns) = &set.columns {
                    crate::data::read::shape_from_roles(columns).map_err(|e| match e {
                        Error::Config { key, msg } => Error::Config {
                            key: key.replacen("data.", &format!("data.train[{i}]."), 1),
                            msg,
                        },
                        e => e,
                    })?;
                }
            }
        }
        if let Some(columns) = &self.data.columns {
            crate::data::read::shape_from_roles(columns)?;
            if let Some((role, _)) = columns.iter().find(|(_, c)| c.is_empty()) {
                return Err(Error::config(
                    format!("data.columns.{role}"),
                    "is empty; give the name of a column in the file",
                ));
            }
        }
        let t = &self.train;
        let uses_gist = self.data.train.losses(t.loss).contains(&LossKind::Gist);
        match (uses_gist, &self.guide.path) {
            (true, None) => {
                return Err(Error::config(
                    "guide.path",
                    "is required by train.loss = \"gist\" (or an entry's loss = \"gist\" in \
                     [[data.train]]): add a [guide] section naming the \
                     model that picks the false negatives, e.g. [guide] path = \
                     \"sentence-transformers/all-MiniLM-L6-v2\" (it may be model.path itself)",
                ))
            }
            (false, Some(_)) => {
                return Err(Error::config(
                    "guide.path",
                    format!(
                        "is set, but only train.loss = \"gist\" uses a guide model (train.loss \
                         is \"{}\", and no data.train entry uses gist); remove the [guide] \
                         section or use train.loss = \"gist\"",
                        t.loss
                    ),
                ))
            }
            _ => {}
        }
        if let Some(MicroBatch::Size(n)) = t.micro_batch_size {
            if n > t.batch_size {
                return Err(Error::config(
                    "train.micro_batch_size",
                    format!(
                        "({n}) is larger than train.batch_size ({}); a micro-batch is a slice \
                         of one optimizer step, so use at most {} (or \"auto\")",
                        t.batch_size, t.batch_size
                    ),
                ));
            }
        }
        match (&t.matryoshka_dims, &t.matryoshka_weights) {
            (None, Some(_)) => {
                return Err(Error::config(
                    "train.matryoshka_weights",
                    "is set but train.matryoshka_dims is not; set the widths (e.g. \
                     train.matryoshka_dims = [384, 256, 128, 64]) or remove the weights",
                ))
            }
            (Some(d), Some(w)) if d.len() != w.len() => {
                return Err(Error::config(
                    "train.matryoshka_weights",
                    format!(
                        "has {} weights but train.matryoshka_dims has {} widths ({d:?}); give \
                         one weight per width, in the same order",
                        w.len(),
                        d.len()
                    ),
                ))
            }
            _ => {}
        }
        Ok(())
    }
}

/// Applies one `--set section.key=value`. The value is read as TOML when it parses
/// (`3e-5`, `true`, `[1, 2]`, `"auto"`), else taken as text (`auto`, `6GiB`, `data/train.csv`).
/// Keys whose value is text (paths, names) always take the raw text unless it is quoted, so
/// `--set output.dir=2024-01-01` is a folder, not a date.
fn apply_override(root: &mut toml::Table, spec: &str) -> Result<()> {
    let Some((key, raw)) = spec.split_once('=') else {
        return Err(Error::config(
            spec,
            "--set expects section.key=value, e.g. --set train.lr=3e-5",
        ));
    };
    let (key, raw) = (key.trim(), raw.trim());
    let path: Vec<&str> = key.split('.').collect();
    if path.len() < 2 || path.iter().any(|p| p.is_empty()) {
        return Err(Error::config(
            key,
            format!("--set {spec}: the key must be section.key, e.g. train.lr"),
        ));
    }
    let value = if takes_text(key) && !raw.starts_with(['"', '\'']) {
        toml::Value::String(raw.to_string())
    } else {
        parse_value(raw)
    };
    let mut table = root;
    for (i, part) in path[..path.len() - 1].iter().enumerate() {
        let here = path[..=i].join(".");
        let not_a_table = || Error::config(&here, format!("--set {spec}: `{here}` is not a table"));
        table = match entry_index(part) {
            Some((name, index)) => {
                let entry = entry_of(table, name, index, &path[..i], spec)?;
                entry.as_table_mut().ok_or_else(not_a_table)?
            }
            None => table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .ok_or_else(not_a_table)?,
        };
        // A `[[data.train]]` entry: only its own keys, named here rather than by serde.
        let field = path[i + 1];
        let train_entry =
            path[..i] == ["data"] && entry_index(part).is_some_and(|e| e.0 == "train");
        if train_entry && !train_data::ENTRY_KEYS.contains(&field) {
            return Err(Error::config(
                key,
                format!(
                    "--set {spec}: `{field}` is not a key of a [[data.train]] entry; its keys \
                     are {}",
                    train_data::ENTRY_KEYS.join(", ")
                ),
            ));
        }
    }
    table.insert(path[path.len() - 1].to_string(), value);
    Ok(())
}

/// `train[2]` -> ("train", 2): a key part that picks an entry of an array of tables.
fn entry_index(part: &str) -> Option<(&str, usize)> {
    let (name, rest) = part.split_once('[')?;
    let index = rest.strip_suffix(']')?.parse().ok()?;
    Some((name, index))
}

/// Entry `index` of the array `name` under `table` (`parents` its key so far): the array must
/// be there already (given in the file), and hold that many entries.
fn entry_of<'t>(
    table: &'t mut toml::Table,
    name: &str,
    index: usize,
    parents: &[&str],
    spec: &str,
) -> Result<&'t mut toml::Value> {
    let array_key = [parents, &[name]].concat().join(".");
    let key = format!("{array_key}[{index}]");
    let entries = match table.get_mut(name) {
        Some(toml::Value::Array(entries)) => entries,
        Some(_) => {
            return Err(Error::config(
                &key,
                format!(
                    "--set {spec}: `{array_key}` is one value, not a list of [[{array_key}]] \
                     entries; set it whole, e.g. --set {array_key}=train.csv"
                ),
            ))
        }
        None => {
            return Err(Error::config(
                &key,
                format!(
                    "--set {spec}: the config has no [[{array_key}]] entries; an entry's keys \
                     can be set once the file gives it"
                ),
            ))
        }
    };
    let count = entries.len();
    entries.get_mut(index).ok_or_else(|| {
        Error::config(
            &key,
            format!(
                "--set {spec}: there is no entry [{index}]; the config has {count} \
                 [[{array_key}]] entries, [0] to [{}]",
                count.saturating_sub(1)
            ),
        )
    })
}

/// A value as TOML if it is one (dates excepted: no key takes a date), else as text.
fn parse_value(raw: &str) -> toml::Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(t) if t.len() == 1 => match t.get("v") {
            Some(toml::Value::Datetime(_)) | None => toml::Value::String(raw.to_string()),
            Some(v) => v.clone(),
        },
        _ => toml::Value::String(raw.to_string()),
    }
}

/// Whether `key` holds text (a path, a name, a column), judged from its default or example.
fn takes_text(key: &str) -> bool {
    if ["data.columns.", "data.prompts.", "model.prompts."]
        .iter()
        .any(|table| key.starts_with(table))
    {
        return true;
    }
    // A `[[data.train]]` entry's keys: all text but its loss.
    if let Some((_, field)) = key
        .strip_prefix("data.train[")
        .and_then(|k| k.split_once("]."))
    {
        return field != "loss";
    }
    let Some((section, name)) = key.split_once('.') else {
        return false;
    };
    key_doc(section, name).is_some_and(|doc| matches!(sample(doc), toml::Value::String(_)))
}

/// The value `defaults_toml` shows for `doc`: its default, or its example when it has none.
fn sample(doc: &KeyDoc) -> toml::Value {
    if let Some(v) = default_table()
        .get(doc.section)
        .and_then(|s| s.get(doc.key))
    {
        return v.clone();
    }
    let example = doc.example.unwrap_or("\"\"");
    parse_value(example)
}

fn default_table() -> toml::Table {
    match toml::Value::try_from(Config::default()) {
        Ok(toml::Value::Table(t)) => t,
        // Config holds only strings, numbers, booleans and lists, which TOML can always hold.
        other => unreachable!("Config::default() serializes to a table, got {other:?}"),
    }
}

/// Rejects unknown sections and keys, with a suggestion and the list of valid ones.
fn check_keys(root: &toml::Table) -> Result<()> {
    let section_names = || SECTIONS.iter().map(|(name, _)| *name);
    for (section, value) in root {
        if !section_names().any(|s| s == section) {
            return Err(unknown_section(section, value));
        }
        let table = value.as_table().ok_or_else(|| {
            Error::config(
                section,
                format!("expected a [{section}] section (a table), got {value}"),
            )
        })?;
        for key in table.keys() {
            if key_doc(section, key).is_none() {
                return Err(unknown_key(section, key));
            }
        }
    }
    Ok(())
}

fn unknown_section(name: &str, value: &toml::Value) -> Error {
    let valid: Vec<&str> = SECTIONS.iter().map(|(n, _)| *n).collect();
    let hint = if let Some(doc) = (!value.is_table())
        .then(|| all_keys().find(|k| k.key == name))
        .flatten()
    {
        format!(
            "keys belong to a section: did you mean `{}` (under [{}])? ",
            doc.full_key(),
            doc.section
        )
    } else if let Some((_, to)) = ALIASES.iter().find(|(from, _)| *from == name) {
        format!("did you mean `{to}`? ")
    } else if let Some(s) = closest(name, valid.iter().copied()) {
        format!("did you mean [{s}]? ")
    } else {
        String::new()
    };
    Error::config(
        name,
        format!(
            "unknown section; {hint}valid sections: {}",
            valid.join(", ")
        ),
    )
}

fn unknown_key(section: &str, key: &str) -> Error {
    let in_section = || all_keys().filter(|k| k.section == section);
    let hint = if let Some(k) = closest(key, in_section().map(|k| k.key)) {
        format!("did you mean `{section}.{k}`? ")
    } else if let Some((_, to)) = ALIASES.iter().find(|(from, _)| *from == key) {
        format!("did you mean `{to}`? ")
    } else if let Some(doc) = all_keys().find(|k| k.key == key) {
        format!("did you mean `{}`? ", doc.full_key())
    } else {
        String::new()
    };
    let mut valid: Vec<&str> = in_section().map(|k| k.key).collect();
    valid.sort_unstable();
    Error::config(
        format!("{section}.{key}"),
        format!(
            "unknown key; {hint}valid keys in [{section}]: {}",
            valid.join(", ")
        ),
    )
}

/// A TOML syntax error in `text` (read from `origin`), at the line and column it starts.
fn syntax_error(text: &str, origin: &str, e: &toml::de::Error) -> Error {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    Error::Syntax {
        file: origin.to_string(),
        line,
        column,
        msg: e.message().to_string(),
    }
}

/// Deserializes each key on its own, so a type error names the key, the value and what the
/// key takes (the table's `expects`), instead of serde's "expected usize".
fn check_types(root: &toml::Table) -> Result<()> {
    for (section, value) in root {
        let Some(table) = value.as_table() else {
            continue;
        };
        for (key, v) in table {
            let mut one_section = toml::Table::new();
            one_section.insert(key.clone(), v.clone());
            let mut one = toml::Table::new();
            one.insert(section.clone(), toml::Value::Table(one_section));
            if let Err(e) = toml::Value::Table(one).try_into::<Config>() {
                let expects = key_doc(section, key).map_or("another value", |d| d.expects);
                // A typed value's own parser (memory.limit) says what is wrong; serde's
                // generic messages ("invalid type: ...") do not.
                let why = e.message();
                let generic = [
                    "invalid type",
                    "invalid value",
                    "unknown variant",
                    "invalid length",
                ]
                .iter()
                .any(|g| why.starts_with(g));
                let msg = if generic {
                    format!("expected {expects}, got {v}")
                } else {
                    why.to_string()
                };
                return Err(Error::config(format!("{section}.{key}"), msg));
            }
        }
    }
    Ok(())
}

/// The candidate closest to `name` by edit distance, if it is close enough to be a typo.
fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|&(d, _)| d <= (name.chars().count() / 4).max(2) && d < name.chars().count())
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

/// Levenshtein distance over chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The whole config with its defaults, a comment above each key saying what it does; what
/// `st-tune config --defaults` prints. Keys without a default are shown commented out, with
/// an example value. Loading this text gives `Config::default()`.
pub fn defaults_toml() -> String {
    let defaults = default_table();
    let mut out = String::from(
        "# st-tune training config. Every key shows its default; only model.path and\n\
         # data.train are required. Override any key on the command line with\n\
         # --set section.key=value, e.g. --set train.lr=3e-5 (the command line wins);\n\
         # a [[data.train]] entry's key with --set data.train[i].key=value (i from 0).\n",
    );
    for (section, help) in SECTIONS {
        out.push_str(&format!("\n# {help}\n[{section}]\n"));
        for doc in all_keys().filter(|k| k.section == *section) {
            for line in doc.help.lines() {
                out.push_str(&format!("# {}\n", line.trim()));
            }
            match defaults.get(*section).and_then(|s| s.get(doc.key)) {
                Some(value) => out.push_str(&format!("{} = {value}\n", doc.key)),
                None => out.push_str(&format!(
                    "# {} = {}\n",
                    doc.key,
                    doc.example.unwrap_or("\"\"")
                )),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn parse(text: &str, sets: &[&str]) -> Result<Config> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::from_toml(text, "test.toml", &sets)
    }

    fn config_error(r: Result<Config>) -> (String, String) {
        match r {
            Err(Error::Config { key, msg }) => (key, msg),
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    /// The key `validate` rejects `c` for.
    fn invalid_key(c: &Config) -> String {
        match c.validate() {
            Err(Error::Config { key, .. }) => key,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    fn valid() -> Config {
        parse("[model]\npath = \"m\"\n[data]\ntrain = \"t.csv\"\n", &[]).unwrap()
    }

    #[test]
    fn a_toml_syntax_error_names_the_file_line_and_column_not_a_key() {
        match parse("[train]\nlr = = 3\n", &[]) {
            Err(e @ Error::Syntax { .. }) => {
                let Error::Syntax {
                    file, line, column, ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!((file.as_str(), *line, *column), ("test.toml", 2, 6), "{e}");
            }
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn keys_declared_neutral_are_the_only_ones_a_resume_may_change() {
        assert!(changes_result("train.lr") && changes_result("train.batch_size"));
        assert!(!changes_result("train.log_steps") && !changes_result("memory.limit"));
        assert!(
            changes_result("no.such_key"),
            "unknown keys are not waved through"
        );
    }

    #[test]
    fn printed_defaults_load_back_to_the_defaults() {
        let text = defaults_toml();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("defaults.toml");
        std::fs::write(&path, &text).unwrap();
        assert_eq!(Config::load(&path, &[]).unwrap(), Config::default());
    }

    #[test]
    fn printed_defaults_document_every_key() {
        let text = defaults_toml();
        for doc in all_keys() {
            assert!(
                text.contains(&format!("\n{} = ", doc.key))
                    || text.contains(&format!("\n# {} = ", doc.key)),
                "{} missing from defaults_toml",
                doc.full_key()
            );
        }
    }

    #[test]
    fn the_key_table_and_the_structs_name_the_same_keys() {
        // Every key the structs serialize is documented...
        for (section, table) in default_table() {
            for key in table.as_table().unwrap().keys() {
                assert!(
                    key_doc(&section, key).is_some(),
                    "{section}.{key} has no KeyDoc"
                );
            }
        }
        // ...and every documented key (with its default or example) is accepted by the structs.
        for doc in all_keys() {
            let mut one = toml::Table::new();
            one.insert(doc.key.to_string(), sample(doc));
            let mut root = toml::Table::new();
            root.insert(doc.section.to_string(), toml::Value::Table(one));
            let r: std::result::Result<Config, _> = toml::Value::Table(root).try_into();
            assert!(r.is_ok(), "{} rejected: {r:?}", doc.full_key());
            assert!(
                doc.example.is_some() || default_table()[doc.section].get(doc.key).is_some(),
                "{} has neither a default nor an example",
                doc.full_key()
            );
        }
        assert_eq!(SECTIONS.len(), default_table().len());
    }

    #[test]
    fn an_empty_file_gives_the_defaults() {
        assert_eq!(parse("", &[]).unwrap(), Config::default());
    }

    #[test]
    fn a_file_sets_keys_and_keeps_other_defaults() {
        let c = parse("[train]\nlr = 3e-5\nloss = \"mnrl\"\n", &[]).unwrap();
        assert_eq!(c.train.lr, 3e-5);
        assert_eq!(c.train.loss, LossKind::Mnrl);
        assert_eq!(c.train.batch_size, 16);
    }

    #[test]
    fn set_overrides_numbers_strings_booleans_and_wins_over_the_file() {
        let c = parse(
            "[train]\nlr = 3e-5\n",
            &[
                "train.lr=1e-4",
                "train.batch_size=64",
                "train.loss=mnrl",
                "model.path=sentence-transformers/all-MiniLM-L6-v2",
                "data.group_by_length=true",
                "memory.limit=6GiB",
                "memory.escalate=[\"bf16\", \"max_seq_length\"]",
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 1e-4);
        assert_eq!(c.train.batch_size, 64);
        assert_eq!(c.train.loss, LossKind::Mnrl);
        assert_eq!(c.model.path, "sentence-transformers/all-MiniLM-L6-v2");
        assert!(c.data.group_by_length);
        assert_eq!(
            c.memory.limit.as_ref().map(MemoryLimit::as_str),
            Some("6GiB")
        );
        assert_eq!(c.memory.escalate, [Lever::Bf16, Lever::MaxSeqLength]);
    }

    #[test]
    fn set_overrides_a_field_of_one_data_train_entry() {
        let file = "[[data.train]]\npath = \"a.csv\"\nloss = \"cosent\"\n\
                    [[data.train]]\npath = \"b.csv\"\nname = \"qa\"\n";
        let c = parse(
            file,
            &[
                "data.train[1].path=2024-01-01.csv",
                "data.train[1].loss=gist",
                "data.train[0].name=123",
                "data.train[0].columns.anchor=q",
                "data.train[0].columns.positive=d",
                "data.train[1].prompts.anchor=query",
            ],
        )
        .unwrap();
        let TrainData::Sets(sets) = &c.data.train else {
            panic!("still entries: {:?}", c.data.train)
        };
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[0].path, Path::new("a.csv"));
        assert_eq!(sets[0].loss, Some(LossKind::Cosent));
        assert_eq!(sets[0].name.as_deref(), Some("123"));
        let columns = sets[0].columns.as_ref().unwrap();
        assert_eq!(
            (columns["anchor"].as_str(), columns["positive"].as_str()),
            ("q", "d")
        );
        assert_eq!(sets[1].path, Path::new("2024-01-01.csv"));
        assert_eq!(sets[1].loss, Some(LossKind::Gist));
        assert_eq!(sets[1].name.as_deref(), Some("qa"));
        assert_eq!(sets[1].prompts.as_ref().unwrap()["anchor"], "query");
    }

    #[test]
    fn set_on_a_data_train_entry_names_a_missing_entry_or_an_unknown_key() {
        let file = "[[data.train]]\npath = \"a.csv\"\n[[data.train]]\npath = \"b.csv\"\n";
        let e = parse(file, &["data.train[2].loss=mnrl"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.train[2]") && e.contains("2 [[data.train]] entries, [0] to [1]"),
            "{e}"
        );
        let e = parse(file, &["data.train[0].los=mnrl"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.train[0].los")
                && e.contains("`los` is not a key")
                && e.contains("path, name, columns, loss, prompts"),
            "{e}"
        );
        let e = parse("[data]\ntrain = \"a.csv\"\n", &["data.train[0].loss=mnrl"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("data.train[0]") && e.contains("not a list"),
            "{e}"
        );
        let e = parse("", &["data.train[0].loss=mnrl"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [[data.train]] entries"), "{e}");
        // A bad value is still the entry's own error.
        let e = parse(file, &["data.train[1].loss=nope"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn set_with_dotted_keys_builds_nested_tables() {
        let c = parse(
            "",
            &["data.columns.anchor=query", "data.columns.positive=answer"],
        )
        .unwrap();
        let cols = c.data.columns.unwrap();
        assert_eq!(cols["anchor"], "query");
        assert_eq!(cols["positive"], "answer");
    }

    #[test]
    fn set_adds_to_columns_from_the_file() {
        let c = parse(
            "[data.columns]\nanchor = \"q\"\n",
            &["data.columns.positive=a"],
        )
        .unwrap();
        assert_eq!(c.data.columns.unwrap().len(), 2);
    }

    #[test]
    fn set_takes_text_keys_literally_unless_quoted() {
        let c = parse(
            "",
            &[
                "output.dir=2024-01-01",
                "model.path=1",
                "model.device=cuda:0",
            ],
        )
        .unwrap();
        assert_eq!(c.output.dir, PathBuf::from("2024-01-01"));
        assert_eq!(c.model.path, "1");
        assert_eq!(c.model.device, "cuda:0");
        let c = parse("", &["model.path=\"quoted\""]).unwrap();
        assert_eq!(c.model.path, "quoted");
    }

    #[test]
    fn micro_batch_size_takes_a_number_or_auto() {
        let c = parse("", &["train.micro_batch_size=8"]).unwrap();
        assert_eq!(c.train.micro_batch_size, Some(MicroBatch::Size(8)));
        let c = parse("", &["train.micro_batch_size=auto"]).unwrap();
        assert_eq!(c.train.micro_batch(), MicroBatch::Auto);
        let c = parse("", &["train.micro_batch_size=\"auto\""]).unwrap();
        assert_eq!(c.train.micro_batch(), MicroBatch::Auto);
        let c = parse("[train]\nmicro_batch_size = \"auto\"\n", &[]).unwrap();
        assert_eq!(c.train.micro_batch(), MicroBatch::Auto);
    }

    #[test]
    fn micro_batch_size_defaults_to_the_batch_size() {
        let c = parse("", &["train.batch_size=32"]).unwrap();
        assert_eq!(c.train.micro_batch(), MicroBatch::Size(32));
    }

    #[test]
    fn micro_batch_size_rejects_zero_and_other_words() {
        for bad in ["0", "-3", "big", "8.5"] {
            let (key, msg) = config_error(parse("", &[&format!("train.micro_batch_size={bad}")]));
            assert_eq!(key, "train.micro_batch_size");
            assert!(msg.contains("a positive integer or \"auto\""), "{msg}");
        }
    }

    #[test]
    fn a_set_without_equals_sign_is_named() {
        let (key, msg) = config_error(parse("", &["train.lr"]));
        assert_eq!(key, "train.lr");
        assert!(msg.contains("section.key=value"), "{msg}");
    }

    #[test]
    fn a_set_without_a_section_is_rejected() {
        let (key, msg) = config_error(parse("", &["lr=1"]));
        assert_eq!(key, "lr");
        assert!(msg.contains("section.key"), "{msg}");
    }

    #[test]
    fn an_unknown_key_suggests_the_closest_one_and_lists_the_section() {
        let (key, msg) = config_error(parse("[train]\nlrr = 1e-5\n", &[]));
        assert_eq!(key, "train.lrr");
        assert!(msg.contains("did you mean `train.lr`?"), "{msg}");
        assert!(
            msg.contains("valid keys in [train]: batch_sampler, batch_size, distance, epochs"),
            "{msg}"
        );
    }

    #[test]
    fn an_unknown_key_from_set_is_rejected_too() {
        let (key, msg) = config_error(parse("", &["train.batchsize=8"]));
        assert_eq!(key, "train.batchsize");
        assert!(msg.contains("did you mean `train.batch_size`?"), "{msg}");
    }

    #[test]
    fn a_hugging_face_name_points_to_ours() {
        let (_, msg) = config_error(parse("[train]\nlearning_rate = 1e-5\n", &[]));
        assert!(msg.contains("did you mean `train.lr`?"), "{msg}");
    }

    #[test]
    fn a_key_in_the_wrong_section_points_to_the_right_one() {
        let (key, msg) = config_error(parse("[train]\ndevice = \"cuda\"\n", &[]));
        assert_eq!(key, "train.device");
        assert!(msg.contains("did you mean `model.device`?"), "{msg}");
    }

    #[test]
    fn an_unknown_section_suggests_the_closest_one() {
        let (key, msg) = config_error(parse("[trian]\nlr = 1e-5\n", &[]));
        assert_eq!(key, "trian");
        assert!(msg.contains("did you mean [train]?"), "{msg}");
        assert!(
            msg.contains("valid sections: model, guide, data, train, memory, output"),
            "{msg}"
        );
    }

    #[test]
    fn a_key_outside_any_section_points_to_its_section() {
        let (key, msg) = config_error(parse("lr = 1e-5\n", &[]));
        assert_eq!(key, "lr");
        assert!(msg.contains("`train.lr` (under [train])"), "{msg}");
    }

    #[test]
    fn a_wrong_type_names_the_key_the_value_and_what_is_allowed() {
        let (key, msg) = config_error(parse("[train]\nbatch_size = \"sixteen\"\n", &[]));
        assert_eq!(key, "train.batch_size");
        assert_eq!(msg, "expected a positive integer, got \"sixteen\"");
        let e = parse("", &["train.batch_size=sixteen"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "config key `train.batch_size`: expected a positive integer, got \"sixteen\""
        );
    }

    #[test]
    fn a_wrong_enum_value_lists_the_choices() {
        let (key, msg) = config_error(parse("", &["train.loss=quadruplet"]));
        assert_eq!(key, "train.loss");
        assert!(
            msg.contains("one of \"mnrl\", \"mnsrl\", \"gist\", \"cosent\", \"cosine\""),
            "{msg}"
        );
        let (key, _) = config_error(parse("", &["train.precision=fp16"]));
        assert_eq!(key, "train.precision");
    }

    #[test]
    fn a_section_that_is_not_a_table_is_rejected() {
        let (key, msg) = config_error(parse("train = 5\n", &[]));
        assert_eq!(key, "train");
        assert!(msg.contains("a table"), "{msg}");
    }

    #[test]
    fn a_missing_file_is_an_io_error_naming_it() {
        let e = Config::load(Path::new("/nonexistent/st-tune.toml"), &[]).unwrap_err();
        assert!(matches!(e, Error::Io { .. }));
        assert!(e.to_string().contains("/nonexistent/st-tune.toml"));
    }

    #[test]
    fn a_complete_config_is_valid() {
        valid().validate().unwrap();
    }

    #[test]
    fn validate_requires_model_path_and_train_file() {
        assert_eq!(invalid_key(&Config::default()), "model.path");
        let mut c = valid();
        c.data.train = TrainData::default();
        assert_eq!(invalid_key(&c), "data.train");
    }

    #[test]
    fn gist_needs_a_guide_and_only_gist_takes_one() {
        let c = parse(
            "[train]\nloss = \"gist\"\n",
            &["model.path=m", "data.train=t.csv"],
        );
        let e = c.unwrap().validate().unwrap_err();
        let Error::Config { key, msg } = &e else {
            panic!("{e}")
        };
        assert_eq!(key, "guide.path");
        assert!(msg.contains("train.loss = \"gist\""), "{msg}");
        let mut c = valid();
        c.train.loss = LossKind::Gist;
        c.guide.path = Some("guide".into());
        c.validate().unwrap();
        assert_eq!(c.train.scale(), 100.0, "temperature 0.01 by default");
        c.guide.path = Some(" ".into());
        assert_eq!(invalid_key(&c), "guide.path");
        c.guide.path = Some("guide".into());
        c.train.loss = LossKind::Mnrl;
        assert_eq!(invalid_key(&c), "guide.path");
        assert_eq!(c.train.scale(), 20.0);
        c.guide.path = None;
        c.validate().unwrap();
    }

    #[test]
    fn a_micro_batch_larger_than_the_batch_is_rejected() {
        let mut c = valid();
        c.train.micro_batch_size = Some(MicroBatch::Size(32));
        let e = c.validate().unwrap_err();
        assert_eq!(
            e.to_string().split(';').next().unwrap(),
            "config key `train.micro_batch_size`: (32) is larger than train.batch_size (16)"
        );
        c.train.micro_batch_size = Some(MicroBatch::Auto);
        c.validate().unwrap();
    }

    #[test]
    fn validate_names_each_bad_number() {
        type Spoil = fn(&mut Config);
        let cases: &[(&str, Spoil)] = &[
            ("train.batch_size", |c| c.train.batch_size = 0),
            ("train.epochs", |c| c.train.epochs = 0),
            ("train.lr", |c| c.train.lr = 0.0),
            ("train.lr", |c| c.train.lr = f64::NAN),
            ("train.warmup_ratio", |c| c.train.warmup_ratio = 1.0),
            ("train.warmup_ratio", |c| c.train.warmup_ratio = -0.1),
            ("train.weight_decay", |c| c.train.weight_decay = -1.0),
            ("train.max_grad_norm", |c| {
                c.train.max_grad_norm = f64::INFINITY
            }),
            ("train.scale", |c| c.train.scale = Some(0.0)),
            ("train.log_steps", |c| c.train.log_steps = 0),
            ("train.max_steps", |c| c.train.max_steps = Some(0)),
            ("model.max_seq_length", |c| c.model.max_seq_length = Some(0)),
            ("data.limit", |c| c.data.limit = Some(0)),
            ("memory.regrow_after", |c| c.memory.regrow_after = 0),
            ("output.dir", |c| c.output.dir = PathBuf::new()),
        ];
        for (want, spoil) in cases {
            let mut c = valid();
            spoil(&mut c);
            assert_eq!(invalid_key(&c), *want);
        }
    }

    #[test]
    fn escalate_accepts_only_known_levers_once() {
        let mut c = valid();
        c.memory.escalate = vec![Lever::GradientCheckpointing, Lever::Bf16];
        c.validate().unwrap();
        let (key, msg) = config_error(parse("[memory]\nescalate = [\"gradient_checkpoint\"]", &[]));
        assert_eq!(key, "memory.escalate");
        assert!(
            msg.contains("\"gradient_checkpointing\""),
            "lists the levers: {msg}"
        );
        c.memory.escalate = vec![Lever::Bf16, Lever::Bf16];
        assert_eq!(invalid_key(&c), "memory.escalate");
        c.memory.escalate = vec![Lever::Bf16, Lever::F16];
        assert_eq!(invalid_key(&c), "memory.escalate");
    }

    #[test]
    fn a_memory_limit_is_parsed_once_when_the_config_loads() {
        let c = parse("[memory]\nlimit = \"6GiB\"", &[]).unwrap();
        assert_eq!(
            c.memory.limit.as_ref().map(|l| l.bytes_of(0)),
            Some(6 << 30)
        );
        let (key, msg) = config_error(parse("[memory]\nlimit = \"lots\"", &[]));
        assert_eq!(key, "memory.limit");
        assert!(msg.contains("`lots` is not a size"), "{msg}");
        // Written back as the user wrote it.
        assert!(toml::to_string(&c).unwrap().contains("limit = \"6GiB\""));
    }

    #[test]
    fn columns_must_form_a_row_shape() {
        let mut c = parse("", &["data.columns.anchor=q", "data.columns.positive=a"]).unwrap();
        c.model.path = "m".into();
        c.data.train = "t.csv".into();
        c.validate().unwrap();
        c.data
            .columns
            .as_mut()
            .unwrap()
            .insert("score".into(), "s".into());
        assert_eq!(invalid_key(&c), "data.columns");
    }

    #[test]
    fn memory_limits_parse_sizes_and_percentages() {
        assert_eq!(parse_memory_limit("6GiB").unwrap().bytes_of(0), 6 << 30);
        assert_eq!(parse_memory_limit("512MiB").unwrap().bytes_of(0), 512 << 20);
        assert_eq!(
            parse_memory_limit("1.5GB").unwrap().bytes_of(0),
            1_500_000_000
        );
        assert_eq!(
            parse_memory_limit("800 mb").unwrap().bytes_of(0),
            800_000_000
        );
        assert_eq!(parse_memory_limit("2KB").unwrap().bytes_of(0), 2000);
        assert_eq!(parse_memory_limit("2KiB").unwrap().bytes_of(0), 2048);
        assert_eq!(parse_memory_limit("1TiB").unwrap().bytes_of(0), 1 << 40);
        assert_eq!(parse_memory_limit("100B").unwrap().bytes_of(0), 100);
        assert_eq!(parse_memory_limit("80%").unwrap().bytes_of(1000), 800);
    }

    #[test]
    fn memory_limits_reject_bad_sizes_with_the_key() {
        for bad in [
            "6", "6G", "GiB", "0GiB", "0%", "120%", "-1GiB", "x%", "", "1.2.3MiB",
        ] {
            match parse_memory_limit(bad) {
                Err(Error::Config { key, .. }) => assert_eq!(key, "memory.limit", "{bad}"),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn edit_distance_counts_single_edits() {
        assert_eq!(edit_distance("lrr", "lr"), 1);
        assert_eq!(edit_distance("batchsize", "batch_size"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}

//! `data.train`: one training file (`train = "train.csv"`), or several training sets as an
//! array of tables (`[[data.train]]`), each with its own columns, loss and prompts. Each
//! batch then comes from one set (`data.sampler` says which set's batch comes next).
//!
//! A set's unset `columns`, `loss` or `prompts` take the top-level `data.columns`,
//! `train.loss` and `data.prompts`, so one file and a one-entry list train alike.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::LossKind;
use crate::error::Error;

/// `data.train`: a path, or the `[[data.train]]` entries.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TrainData {
    File(PathBuf),
    Sets(Vec<TrainSet>),
}

/// One `[[data.train]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSet {
    pub path: PathBuf,
    /// How logs and the model card name it; unset: the file's stem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub columns: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<LossKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<BTreeMap<String, String>>,
}

impl Default for TrainData {
    fn default() -> Self {
        TrainData::File(PathBuf::new())
    }
}

impl super::keys::Unset for TrainData {}

/// One training set with the top-level keys filled in: what loading reads and trains on.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSet {
    pub name: String,
    pub path: PathBuf,
    pub columns: Option<BTreeMap<String, String>>,
    pub loss: LossKind,
    pub prompts: Option<BTreeMap<String, String>>,
    /// The config key errors about this set name: `data.train`, or `data.train[i]` (0-based,
    /// the entry's place in the file).
    pub key: String,
}

impl TrainData {
    /// Every file, in order.
    pub fn paths(&self) -> Vec<&Path> {
        match self {
            TrainData::File(p) => vec![p.as_path()],
            TrainData::Sets(sets) => sets.iter().map(|s| s.path.as_path()).collect(),
        }
    }

    /// Applies `f` to every path (a sweep makes them absolute).
    pub fn map_paths(&mut self, f: impl Fn(&Path) -> PathBuf) {
        match self {
            TrainData::File(p) => *p = f(p),
            TrainData::Sets(sets) => sets.iter_mut().for_each(|s| s.path = f(&s.path)),
        }
    }

    /// The files for messages: `a.csv`, or `a.csv, b.csv`.
    pub fn describe(&self) -> String {
        let paths: Vec<String> = self
            .paths()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        paths.join(", ")
    }

    /// The sets with the top-level keys filled in (see the module doc).
    pub fn resolve(
        &self,
        columns: Option<&BTreeMap<String, String>>,
        loss: LossKind,
        prompts: Option<&BTreeMap<String, String>>,
    ) -> Vec<ResolvedSet> {
        let one = |path: &Path, name: Option<&String>, key: String| ResolvedSet {
            name: name.cloned().unwrap_or_else(|| stem(path)),
            path: path.to_path_buf(),
            columns: columns.cloned(),
            loss,
            prompts: prompts.cloned(),
            key,
        };
        match self {
            TrainData::File(p) => vec![one(p, None, "data.train".into())],
            TrainData::Sets(sets) => sets
                .iter()
                .enumerate()
                .map(|(i, s)| ResolvedSet {
                    columns: s.columns.clone().or_else(|| columns.cloned()),
                    loss: s.loss.unwrap_or(loss),
                    prompts: s.prompts.clone().or_else(|| prompts.cloned()),
                    ..one(&s.path, s.name.as_ref(), format!("data.train[{i}]"))
                })
                .collect(),
        }
    }

    /// The rule `data.train` follows alone: a file, or at least one entry, each with a path,
    /// a non-empty name, names distinct.
    pub fn check(&self) -> std::result::Result<(), String> {
        let sets = match self {
            TrainData::File(p) if p.as_os_str().is_empty() => {
                return Err(
                    "is required: set it to a CSV, TSV or JSON lines file, e.g. \
                            --set data.train=train.csv (or give [[data.train]] entries)"
                        .into(),
                )
            }
            TrainData::File(_) => return Ok(()),
            TrainData::Sets(sets) => sets,
        };
        if sets.is_empty() {
            return Err(
                "has no [[data.train]] entries; give at least one, each with a path".into(),
            );
        }
        let mut seen = BTreeMap::new();
        for (i, s) in sets.iter().enumerate() {
            if s.path.as_os_str().is_empty() {
                return Err(format!("[{i}].path is empty; give the set's file"));
            }
            let name = s.name.clone().unwrap_or_else(|| stem(&s.path));
            if name.trim().is_empty() {
                return Err(format!(
                    "[{i}].name is empty; name the set or remove the key"
                ));
            }
            if let Some(j) = seen.insert(name.clone(), i) {
                return Err(format!(
                    "[{i}] and [{j}] are both named \"{name}\" (a set without `name` is named \
                     after its file); give each entry a distinct name = \"...\""
                ));
            }
        }
        Ok(())
    }

    /// Whether there is more than one training set.
    pub fn is_mixed(&self) -> bool {
        matches!(self, TrainData::Sets(s) if s.len() > 1)
    }
}

/// A set's default name: its file's stem (`data/nli.csv` -> `nli`).
fn stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default()
}

impl From<&str> for TrainData {
    fn from(p: &str) -> Self {
        TrainData::File(p.into())
    }
}

impl From<PathBuf> for TrainData {
    fn from(p: PathBuf) -> Self {
        TrainData::File(p)
    }
}

/// A string is one file, an array its entries; an error in an entry names it (`entry 1:
/// unknown field ...`), which serde's untagged enums cannot.
impl<'de> Deserialize<'de> for TrainData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TrainData;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a file path or [[data.train]] entries")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<TrainData, E> {
                Ok(TrainData::File(v.into()))
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<TrainData, A::Error> {
                let mut sets = Vec::new();
                loop {
                    let i = sets.len();
                    match seq.next_element::<TrainSet>() {
                        Ok(Some(s)) => sets.push(s),
                        Ok(None) => return Ok(TrainData::Sets(sets)),
                        Err(e) => return Err(de::Error::custom(format!("entry [{i}]: {e}"))),
                    }
                }
            }
        }
        d.deserialize_any(V)
    }
}

impl ResolvedSet {
    /// The key an error about this set's `what` ("loss", "columns", "prompts.anchor") names:
    /// `data.train[1].loss` for an entry; for one file, the top-level key (`train.loss`).
    pub fn key(&self, what: &str) -> String {
        match (self.key.as_str(), what) {
            ("data.train", "loss") => "train.loss".into(),
            ("data.train", _) => format!("data.{what}"),
            (entry, _) => format!("{entry}.{what}"),
        }
    }

    /// A config error about this set's `what` (see [`ResolvedSet::key`]).
    pub fn error(&self, what: &str, msg: impl Into<String>) -> Error {
        Error::config(self.key(what), msg)
    }
}

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

/// The keys of a `[[data.train]]` entry (what `--set data.train[i].KEY=VALUE` may set).
pub const ENTRY_KEYS: &[&str] = &["path", "name", "columns", "loss", "prompts"];

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
    /// Every set's loss, in order: an entry's own, or `default` (`train.loss`).
    pub fn losses(&self, default: LossKind) -> Vec<LossKind> {
        match self {
            TrainData::File(_) => vec![default],
            TrainData::Sets(sets) => sets.iter().map(|s| s.loss.unwrap_or(default)).collect(),
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn config(text: &str) -> crate::error::Result<Config> {
        Config::from_toml(text, "test", &[])
    }

    #[test]
    fn a_path_is_one_file_and_an_array_of_tables_its_sets() {
        let c = config("[data]\ntrain = \"a.csv\"\n").unwrap();
        assert_eq!(c.data.train, TrainData::File("a.csv".into()));
        let c = config(
            "[data]\n[[data.train]]\npath = \"x/a.csv\"\nloss = \"cosent\"\n\
             [[data.train]]\npath = \"b.csv\"\nname = \"bee\"\n\
             prompts = { anchor = \"query\" }\n",
        )
        .unwrap();
        assert!(c.data.train.is_mixed());
        assert_eq!(c.data.train.describe(), "x/a.csv, b.csv");
        // A --set path replaces the entries.
        let one = Config::from_toml(
            "[data]\n[[data.train]]\npath = \"a.csv\"\n",
            "t",
            &["data.train=c.csv".into()],
        )
        .unwrap();
        assert_eq!(one.data.train, TrainData::File("c.csv".into()));
        // Written back and read again, the same.
        let again = config(&toml::to_string(&c).unwrap()).unwrap();
        assert_eq!(again.data.train, c.data.train);
    }

    #[test]
    fn unset_keys_of_an_entry_take_the_top_level_ones() {
        let c = config(
            "[data]\ncolumns = { anchor = \"q\", positive = \"p\" }\n\
             prompts = { anchor = \"query\" }\n\
             [[data.train]]\npath = \"x/a.csv\"\n\
             [[data.train]]\npath = \"b.csv\"\nname = \"bee\"\nloss = \"cosent\"\n\
             columns = { sentence1 = \"s1\", sentence2 = \"s2\", score = \"s\" }\nprompts = {}\n\
             [train]\nloss = \"mnrl\"\n",
        )
        .unwrap();
        let d = &c.data;
        let sets = d
            .train
            .resolve(d.columns.as_ref(), c.train.loss, d.prompts.as_ref());
        assert_eq!(sets[0].name, "a", "the file's stem");
        assert_eq!(sets[0].loss, LossKind::Mnrl);
        assert_eq!(sets[0].columns, d.columns);
        assert_eq!(sets[0].prompts, d.prompts);
        assert_eq!(sets[1].name, "bee");
        assert_eq!(sets[1].loss, LossKind::Cosent);
        assert_eq!(sets[1].columns.as_ref().unwrap()["score"], "s");
        assert_eq!(sets[1].prompts, Some(BTreeMap::new()));
        assert_eq!(sets[1].key("loss"), "data.train[1].loss");
        let one = TrainData::File("a.csv".into()).resolve(None, LossKind::Mnrl, None);
        assert_eq!(
            (one[0].key("loss"), one[0].key("prompts.anchor")),
            ("train.loss".to_string(), "data.prompts.anchor".to_string())
        );
    }

    #[test]
    fn bad_entries_are_refused_naming_the_entry() {
        let err = |text: &str| {
            let r = config(text).and_then(|c| c.validate());
            r.unwrap_err().to_string()
        };
        let e = err("[data]\n[[data.train]]\npath = \"a.csv\"\nlos = \"mnrl\"\n");
        assert!(e.contains("data.train") && e.contains("entry [0]"), "{e}");
        assert!(e.contains("unknown field `los`"), "{e}");
        let e = err(
            "[model]\npath = \"m\"\n[data]\n[[data.train]]\npath = \"a/t.csv\"\n\
             [[data.train]]\npath = \"b/t.csv\"\n",
        );
        assert!(e.contains("[1] and [0] are both named \"t\""), "{e}");
        let e = err("[model]\npath = \"m\"\n[data]\ntrain = []\n");
        assert!(e.contains("no [[data.train]] entries"), "{e}");
        let e = err("[model]\npath = \"m\"\n[data]\n[[data.train]]\nname = \"x\"\n");
        assert!(e.contains("entry [0]") && e.contains("path"), "{e}");
    }
}

//! The sweep file: `[sweep]` (base config, folder, method, trials, seed, metric, goal) and
//! `[space]` (config key -> values to try), checked in full before any trial runs. Every value
//! of the space is applied to the base config through the same `--set` machinery as the command
//! line, so a key's type and rules are checked by the one place that defines them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Every combination of the `[space]` lists, in order.
    Grid,
    /// `trials` independent draws; trial N's draw depends only on (seed, N).
    Random,
    /// Tree-structured Parzen Estimator: random first trials, then chosen from the history.
    Tpe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    Max,
    Min,
}

impl Goal {
    /// Orders two metric values best first (`Less` when `a` is the better one).
    pub fn best_first(self, a: f64, b: f64) -> std::cmp::Ordering {
        match self {
            Goal::Max => b.total_cmp(&a),
            Goal::Min => a.total_cmp(&b),
        }
    }

    /// Whether `a` is strictly better than `b`.
    pub fn better(self, a: f64, b: f64) -> bool {
        self.best_first(a, b).is_lt()
    }
}

/// The values one key of `[space]` may take.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    /// `[a, b, c]`: one of these.
    Choice(Vec<toml::Value>),
    /// `{ uniform = [lo, hi] }`: a float in [lo, hi).
    Uniform(f64, f64),
    /// `{ log_uniform = [lo, hi] }`: a float whose logarithm is uniform; 0 < lo < hi.
    LogUniform(f64, f64),
    /// `{ int_uniform = [lo, hi] }`: an integer in [lo, hi], both included.
    IntUniform(i64, i64),
}

/// How `[prune]` decides (see `prune.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PruneMethod {
    Median,
    Asha,
}

/// `[prune]`: stop weak trials at rungs counted in training rows (see `prune.rs`).
#[derive(Debug, Clone, PartialEq)]
pub struct PruneSpec {
    pub method: PruneMethod,
    pub min_rows: usize,
    pub reduction: usize,
    pub min_trials: usize,
}

/// What a trial's result is judged by: a figure of the end-of-training evaluation (`dev.` and
/// the name `st-tune eval --json` gives it: Spearman and Pearson for scored dev files,
/// binary-classification figures for labelled pairs, retrieval figures for pairs or triplets,
/// cosine_accuracy for triplets) or the final training loss (`train.loss`).
pub fn metrics() -> Vec<String> {
    let dev = crate::config::metric::dev_figures()
        .into_iter()
        .map(|f| format!("dev.{f}"));
    dev.chain(["train.loss".to_string()]).collect()
}

#[derive(Debug, Clone)]
pub struct Sweep {
    /// The sweep file itself.
    pub file: PathBuf,
    /// The training config every trial starts from (relative paths: to the sweep file).
    pub base: PathBuf,
    pub dir: PathBuf,
    pub method: Method,
    pub trials: usize,
    pub seed: u64,
    pub metric: String,
    pub goal: Goal,
    /// Sorted by key, so trial N's draw does not depend on the order of the file's lines.
    pub space: BTreeMap<String, Values>,
    /// `[prune]`, if a method other than "none" is set.
    pub prune: Option<PruneSpec>,
    /// The file's tables flattened (`sweep.seed`, `space.train.lr`, ...) with the base config's
    /// (`base.train.lr`, ...): what a sweep folder is checked against.
    pub fingerprint: BTreeMap<String, String>,
}

const SWEEP_KEYS: &[&str] = &["base", "dir", "method", "trials", "seed", "metric", "goal"];

impl Sweep {
    pub fn load(file: &Path) -> Result<Sweep> {
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        let bad = |msg: String| Error::sweep(file, msg);
        let root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| bad(e.to_string().trim_end().to_string()))?;
        for section in root.keys() {
            if !["sweep", "space", "prune"].contains(&section.as_str()) {
                return Err(bad(format!(
                    "unknown section [{section}]; a sweep file has [sweep], [space] and [prune]"
                )));
            }
        }
        let table = |name: &str| -> Result<toml::Table> {
            match root.get(name) {
                None => Ok(toml::Table::new()),
                Some(toml::Value::Table(t)) => Ok(t.clone()),
                Some(_) => Err(bad(format!("[{name}] must be a table"))),
            }
        };
        let (sweep, space, prune) = (table("sweep")?, table("space")?, table("prune")?);
        if let Some(k) = sweep.keys().find(|k| !SWEEP_KEYS.contains(&k.as_str())) {
            return Err(bad(format!(
                "unknown key sweep.{k}; [sweep] takes {}",
                SWEEP_KEYS.join(", ")
            )));
        }
        let prune_spec = parse_prune(&prune).map_err(&bad)?;
        let text_of = |key: &str| -> Result<Option<String>> {
            match sweep.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(v) => Err(bad(format!("sweep.{key} must be a string, not {v}"))),
            }
        };
        let int_of = |key: &str| -> Result<Option<u64>> {
            match sweep.get(key) {
                None => Ok(None),
                Some(toml::Value::Integer(n)) if *n >= 0 => Ok(Some(*n as u64)),
                Some(v) => Err(bad(format!(
                    "sweep.{key} must be a non-negative integer, not {v}"
                ))),
            }
        };

        let base_rel = text_of("base")?.ok_or_else(|| {
            bad(
                "sweep.base is required: the training config every trial starts from, \
                 relative to the sweep file"
                    .into(),
            )
        })?;
        let base = file.parent().unwrap_or(Path::new(".")).join(&base_rel);
        // Read once: every value of the space is checked against this text.
        let base_text = std::fs::read_to_string(&base)
            .map_err(|e| Error::io(&base, e))
            .map_err(|e| bad(format!("sweep.base = {base_rel:?} does not load: {e}")))?;
        let origin = base.display().to_string();
        let base_cfg = Config::from_toml(&base_text, &origin, &[])
            .and_then(|c| c.validate().map(|_| c))
            .map_err(|e| bad(format!("sweep.base = {base_rel:?} does not load: {e}")))?;
        let stem = file
            .file_stem()
            .map_or("sweep".into(), |s| s.to_string_lossy());
        let dir = PathBuf::from(text_of("dir")?.unwrap_or_else(|| format!("output/sweeps/{stem}")));
        let method = match text_of("method")?.as_deref() {
            None | Some("grid") => Method::Grid,
            Some("random") => Method::Random,
            Some("tpe") => Method::Tpe,
            Some(m) => {
                return Err(bad(format!(
                    "sweep.method = {m:?}; use \"grid\", \"random\" or \"tpe\""
                )))
            }
        };
        let metric = text_of("metric")?.unwrap_or_else(|| "dev.spearman".into());
        if !metrics().contains(&metric) {
            return Err(bad(format!(
                "sweep.metric = {metric:?}; use one of {}",
                metrics().join(", ")
            )));
        }
        if metric.starts_with("dev.") && base_cfg.data.dev.is_none() {
            return Err(bad(format!(
                "sweep.metric = {metric:?} needs a dev file: set data.dev in {base_rel}"
            )));
        }
        let goal = match text_of("goal")?.as_deref() {
            None if metric == "train.loss" => Goal::Min,
            None | Some("max") => Goal::Max,
            Some("min") => Goal::Min,
            Some(g) => return Err(bad(format!("sweep.goal = {g:?}; use \"max\" or \"min\""))),
        };

        let mut values = BTreeMap::new();
        for (key, v) in &space {
            let parsed = parse_values(key, v).map_err(&bad)?;
            check_against_base(&base_text, &origin, key, &parsed).map_err(&bad)?;
            values.insert(key.clone(), parsed);
        }
        if values.is_empty() {
            return Err(bad(
                "[space] is empty: give at least one config key and the values to try, \
                 e.g. \"train.lr\" = [1e-5, 2e-5]"
                    .into(),
            ));
        }
        let trials = match method {
            Method::Grid => {
                if let Some((k, _)) = values.iter().find(|(_, v)| !matches!(v, Values::Choice(_))) {
                    return Err(bad(format!(
                        "space.\"{k}\" is a range, which a grid cannot enumerate; give a list, \
                         or use method = \"random\""
                    )));
                }
                if sweep.contains_key("trials") {
                    return Err(bad(
                        "sweep.trials is for random sweeps; a grid runs every combination".into(),
                    ));
                }
                values
                    .values()
                    .map(|v| match v {
                        Values::Choice(c) => c.len(),
                        _ => 1,
                    })
                    .product()
            }
            Method::Random | Method::Tpe => {
                match int_of("trials")? {
                    Some(n) if n > 0 => n as usize,
                    _ => return Err(bad(
                        "sweep.trials (a positive integer) is required for random and tpe sweeps"
                            .into(),
                    )),
                }
            }
        };
        let mut fingerprint = BTreeMap::new();
        for (section, t) in [("sweep", &sweep), ("space", &space), ("prune", &prune)] {
            for (k, v) in t {
                if section == "sweep" && k == "dir" {
                    continue; // the folder may move
                }
                fingerprint.insert(format!("{section}.{k}"), v.to_string());
            }
        }
        for (k, v) in base_cfg.flat() {
            if !k.starts_with("output.") {
                fingerprint.insert(format!("base.{k}"), v);
            }
        }
        Ok(Sweep {
            file: file.to_path_buf(),
            base,
            dir,
            method,
            trials,
            seed: int_of("seed")?.unwrap_or(0),
            metric,
            goal,
            space: values,
            prune: prune_spec,
            fingerprint,
        })
    }
}

const PRUNE_KEYS: &[&str] = &["method", "min_rows", "reduction", "min_trials"];

fn parse_prune(prune: &toml::Table) -> std::result::Result<Option<PruneSpec>, String> {
    if let Some(k) = prune.keys().find(|k| !PRUNE_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "unknown key prune.{k}; [prune] takes {}",
            PRUNE_KEYS.join(", ")
        ));
    }
    let positive = |key: &str, default: usize| match prune.get(key) {
        None => Ok(default),
        Some(toml::Value::Integer(n)) if *n > 0 => Ok(*n as usize),
        Some(v) => Err(format!("prune.{key} must be a positive integer, not {v}")),
    };
    let method = match prune.get("method").and_then(toml::Value::as_str) {
        None if prune.is_empty() => return Ok(None),
        Some("none") => return Ok(None),
        Some("median") => PruneMethod::Median,
        Some("asha") => PruneMethod::Asha,
        _ => return Err("prune.method must be \"none\", \"median\" or \"asha\"".into()),
    };
    let reduction = positive("reduction", 3)?;
    if method == PruneMethod::Asha && reduction < 2 {
        return Err(format!(
            "prune.reduction is {reduction}; asha needs at least 2"
        ));
    }
    Ok(Some(PruneSpec {
        method,
        min_rows: positive("min_rows", 1000)?,
        reduction,
        min_trials: positive("min_trials", 3)?,
    }))
}

fn parse_values(key: &str, v: &toml::Value) -> std::result::Result<Values, String> {
    let at = format!("space.\"{key}\"");
    let pair = |t: &toml::Value, name: &str| -> std::result::Result<(f64, f64), String> {
        let bounds = t.as_array().filter(|a| a.len() == 2).ok_or(format!(
            "{at}: {name} takes [low, high], e.g. {{ {name} = [1e-6, 1e-4] }}"
        ))?;
        let num = |x: &toml::Value| {
            x.as_float()
                .or(x.as_integer().map(|i| i as f64))
                .ok_or(format!("{at}: {name} bounds must be numbers, not {x}"))
        };
        let (lo, hi) = (num(&bounds[0])?, num(&bounds[1])?);
        // NaN bounds fail here too.
        if lo.partial_cmp(&hi) != Some(std::cmp::Ordering::Less) {
            return Err(format!("{at}: {name} needs low < high, got [{lo}, {hi}]"));
        }
        Ok((lo, hi))
    };
    match v {
        toml::Value::Array(a) if a.is_empty() => {
            Err(format!("{at} is an empty list: give at least one value to try"))
        }
        toml::Value::Array(a) => Ok(Values::Choice(a.clone())),
        toml::Value::Table(t) if t.len() == 1 => {
            let (name, bounds) = t.iter().next().expect("one entry");
            match name.as_str() {
                "uniform" => pair(bounds, name).map(|(lo, hi)| Values::Uniform(lo, hi)),
                "log_uniform" => {
                    let (lo, hi) = pair(bounds, name)?;
                    if lo <= 0.0 {
                        return Err(format!(
                            "{at}: log_uniform needs bounds above 0, got [{lo}, {hi}]"
                        ));
                    }
                    Ok(Values::LogUniform(lo, hi))
                }
                "int_uniform" => {
                    let (lo, hi) = pair(bounds, name)?;
                    if lo.fract() != 0.0 || hi.fract() != 0.0 {
                        return Err(format!("{at}: int_uniform bounds must be integers"));
                    }
                    Ok(Values::IntUniform(lo as i64, hi as i64))
                }
                other => Err(format!(
                    "{at}: unknown range `{other}`; use uniform, log_uniform or int_uniform"
                )),
            }
        }
        _ => Err(format!(
            "{at} must be a list of values, or {{ uniform | log_uniform | int_uniform = [low, high] }}"
        )),
    }
}

/// Applies each value (each bound of a range) to the base config and validates the result,
/// so a wrong type or a value the key's rules refuse is reported before any trial runs.
fn check_against_base(
    base: &str,
    origin: &str,
    key: &str,
    values: &Values,
) -> std::result::Result<(), String> {
    let probes: Vec<toml::Value> = match values {
        Values::Choice(c) => c.clone(),
        Values::Uniform(lo, hi) | Values::LogUniform(lo, hi) => {
            vec![toml::Value::Float(*lo), toml::Value::Float(*hi)]
        }
        Values::IntUniform(lo, hi) => vec![toml::Value::Integer(*lo), toml::Value::Integer(*hi)],
    };
    if key.starts_with("output.") {
        return Err(format!(
            "space.\"{key}\": output keys are set by the sweep for each trial"
        ));
    }
    for v in probes {
        let set = format!("{key}={v}");
        Config::from_toml(base, origin, &[set])
            .and_then(|c| c.validate())
            .map_err(|e| format!("space.\"{key}\" value {v}: {e}"))?;
    }
    Ok(())
}

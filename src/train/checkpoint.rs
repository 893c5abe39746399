//! Checkpoints: everything the next optimizer step depends on, so that `train --resume`
//! continues a killed run exactly (the same weights, bit for bit on CPU, as a run never
//! interrupted). Data order and dropout masks are functions of (seed, epoch, step, row), so
//! nothing random needs saving.
//!
//! `output.dir/checkpoints/step-N/` holds:
//! - `weights.safetensors`: the trainable tensors (the f32 master weights);
//! - `optimizer.safetensors`: AdamW's moments, `m.NAME` and `v.NAME`; for a table whose moments
//!   are kept for its touched rows only (the word table, `row_moments.rs`), `rows.NAME` (u32)
//!   lists those rows and `m.NAME` and `v.NAME` hold theirs, (rows, width). An earlier version
//!   wrote that table's moments dense: they are read as such, and become row moments at the
//!   first update, exactly (a row of zeros is one never touched);
//! - `state.json`: the step, AdamW's step count, loss scaler, memory policy, best dev metric,
//!   and the resolved config;
//! - `manifest.json`, written last: the format and each file's size and CRC-32.
//!
//! A checkpoint is built in a hidden folder, fsynced, then renamed to `step-N`: a kill at any
//! instant leaves the previous checkpoints intact and at worst a hidden folder that is ignored
//! (and removed by the next save). Loading verifies the manifest, so a damaged folder is
//! refused with the name of the one to fall back to, never trusted and never skipped silently.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::memory::policy::MemState;
use crate::train::eval::Scores;
use crate::train::optim::AdamW;
use crate::train::precision::LossScaler;
use crate::train::row_moments::RowMoments;

/// Bumped when the folder's layout or `state.json` changes incompatibly.
pub const FORMAT: u32 = 1;
const FOLDER: &str = "checkpoints";
const WEIGHTS: &str = "weights.safetensors";
const OPTIMIZER: &str = "optimizer.safetensors";
const STATE: &str = "state.json";
const MANIFEST: &str = "manifest.json";

/// The training loop's state between two optimizer steps, beside the weights and moments.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: usize,
    pub scaler: LossScaler,
    pub mem: MemState,
    pub best: Option<f64>,
    pub dev_before: Option<Scores>,
    /// Non-finite steps in a row just before this one (`nonfinite.rs`); absent in
    /// checkpoints of earlier versions.
    #[serde(default)]
    pub nonfinite_streak: usize,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: u32,
    st_tune: String,
    created_unix: u64,
    progress: Progress,
    /// AdamW's update count (bias correction); differs from `step` after skipped f16 steps.
    adam_step: u64,
    config: Config,
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    files: BTreeMap<String, FileSum>,
}

#[derive(Serialize, Deserialize, PartialEq, Eq, Debug)]
struct FileSum {
    bytes: u64,
    crc32: u32,
}

/// A checkpoint read back and verified.
pub struct Restored {
    pub path: PathBuf,
    pub progress: Progress,
    pub adam_step: u64,
    pub config: Config,
    pub weights: HashMap<String, Tensor>,
    /// AdamW's dense moments by tensor name.
    pub moments: BTreeMap<String, (Tensor, Tensor)>,
    /// The moments of the tensors kept for touched rows only. Taken (moved out) by the run
    /// that resumes, so they are held once.
    pub rows: Mutex<BTreeMap<String, RowMoments>>,
}

/// `output.dir/checkpoints`.
pub fn folder(out_dir: &Path) -> PathBuf {
    out_dir.join(FOLDER)
}

/// The `step-N` folders of `out_dir`, oldest first (hidden, half-written ones are not listed).
pub fn list(out_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = folder(out_dir);
    let entries = match fs::read_dir(&root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(&root, e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(&root, e))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok());
        if let (Some(step), true) = (step, path.is_dir()) {
            found.push((step, path));
        }
    }
    found.sort();
    Ok(found)
}

/// One line about the newest checkpoint, for messages: "step-40 (saved 2026-12-02T07:01:02Z)".
pub fn describe_newest(out_dir: &Path) -> Result<Option<String>> {
    let Some((_, path)) = list(out_dir)?.pop() else {
        return Ok(None);
    };
    let saved = read_state(&path)
        .ok()
        .map(|s| {
            let t = UNIX_EPOCH + Duration::from_secs(s.created_unix);
            format!(" (saved {})", humantime::format_rfc3339_seconds(t))
        })
        .unwrap_or_default();
    Ok(Some(format!("{}{saved}", path.display())))
}

/// A checkpoint written to its hidden staging folder, not yet visible to `--resume`.
pub struct Staged {
    staged: PathBuf,
    target: PathBuf,
    out_dir: PathBuf,
}

impl Staged {
    /// Where the checkpoint will be once published: `checkpoints/step-N`.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Fsyncs the staging folder and renames it to `step-N` (atomically), then deletes all but
    /// the `keep` newest checkpoints.
    pub fn publish(self, keep: usize) -> Result<PathBuf> {
        atomic::replace_dir(&self.staged, &self.target)?;
        prune(&self.out_dir, keep)?;
        Ok(self.target)
    }
}

/// Writes the checkpoint of `progress.step` into a hidden staging folder.
pub fn stage(
    out_dir: &Path,
    progress: &Progress,
    config: &Config,
    vars: &BTreeMap<String, Var>,
    optimizer: &AdamW,
) -> Result<Staged> {
    let root = folder(out_dir);
    fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let target = root.join(format!("step-{}", progress.step));
    let staged = root.join(format!(
        ".step-{}.tmp-{}",
        progress.step,
        std::process::id()
    ));
    let _ = fs::remove_dir_all(&staged);
    fs::create_dir_all(&staged).map_err(|e| Error::io(&staged, e))?;

    let weights: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| Ok((n.clone(), v.as_tensor().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    write_tensors(&staged.join(WEIGHTS), &weights)?;
    crash_point("checkpoint", progress.step);
    let mut opt = HashMap::new();
    for (n, m, v) in optimizer.moments() {
        opt.insert(format!("m.{n}"), m.to_device(&Device::Cpu)?);
        opt.insert(format!("v.{n}"), v.to_device(&Device::Cpu)?);
    }
    for (n, r) in optimizer.row_moments() {
        let (ids, m, v) = r.saved();
        let shape = (ids.len(), r.width());
        opt.insert(format!("m.{n}"), Tensor::from_vec(m, shape, &Device::Cpu)?);
        opt.insert(format!("v.{n}"), Tensor::from_vec(v, shape, &Device::Cpu)?);
        opt.insert(format!("rows.{n}"), Tensor::new(ids, &Device::Cpu)?);
    }
    write_tensors(&staged.join(OPTIMIZER), &opt)?;
    let state = StateFile {
        format: FORMAT,
        st_tune: env!("CARGO_PKG_VERSION").to_string(),
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        progress: progress.clone(),
        adam_step: optimizer.t,
        config: config.clone(),
    };
    let text = serde_json::to_string_pretty(&state).expect("plain data serializes");
    fs::write(staged.join(STATE), text).map_err(|e| Error::io(staged.join(STATE), e))?;
    // The manifest last: a folder with a valid manifest has all its files.
    let mut files = BTreeMap::new();
    for name in [WEIGHTS, OPTIMIZER, STATE] {
        files.insert(name.to_string(), checksum(&staged.join(name))?);
    }
    let manifest = Manifest {
        format: FORMAT,
        files,
    };
    let text = serde_json::to_string_pretty(&manifest).expect("plain data serializes");
    fs::write(staged.join(MANIFEST), text).map_err(|e| Error::io(staged.join(MANIFEST), e))?;
    Ok(Staged {
        staged,
        target,
        out_dir: out_dir.to_path_buf(),
    })
}

fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::checkpoint(path, format!("cannot write: {e}")))
}

/// Deletes the oldest checkpoints beyond `keep`, and hidden folders left by killed saves.
fn prune(out_dir: &Path, keep: usize) -> Result<()> {
    let root = &folder(out_dir);
    let all = list(out_dir)?;
    for (_, path) in &all[..all.len().saturating_sub(keep)] {
        fs::remove_dir_all(path).map_err(|e| Error::io(path, e))?;
    }
    for entry in fs::read_dir(root)
        .map_err(|e| Error::io(root, e))?
        .flatten()
    {
        if entry.file_name().to_string_lossy().starts_with(".step-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    atomic::sync_dir(root)
}

/// Reads and verifies the checkpoint at `path`. `fallback` names the previous checkpoint,
/// offered in the error when this one cannot be trusted.
pub fn load(path: &Path, fallback: Option<&Path>, device: &Device) -> Result<Restored> {
    let refuse = |file: &str, why: String| {
        let todo = match fallback {
            Some(prev) => format!(
                "to resume from the previous checkpoint, {}, move {} out of the way and run \
                 again with --resume",
                prev.display(),
                path.display()
            ),
            None => "there is no earlier checkpoint: start again without --resume in a new \
                     output.dir"
                .to_string(),
        };
        Error::checkpoint(path.join(file), format!("{why}; {todo}"))
    };
    let text = fs::read_to_string(path.join(MANIFEST)).map_err(|e| {
        refuse(
            MANIFEST,
            format!("cannot be read ({e}): the checkpoint is incomplete"),
        )
    })?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| refuse(MANIFEST, format!("is damaged ({e})")))?;
    if manifest.format != FORMAT {
        return Err(refuse(
            MANIFEST,
            format!(
                "was written in checkpoint format {}; this st-tune reads format {FORMAT}",
                manifest.format
            ),
        ));
    }
    for name in [WEIGHTS, OPTIMIZER, STATE] {
        let Some(want) = manifest.files.get(name) else {
            return Err(refuse(MANIFEST, format!("does not list {name}")));
        };
        let got = checksum(&path.join(name))
            .map_err(|e| refuse(name, format!("cannot be read ({e})")))?;
        if &got != want {
            return Err(refuse(
                name,
                format!(
                    "is damaged: {} bytes with CRC-32 {:08x}, the manifest says {} bytes with \
                     {:08x}",
                    got.bytes, got.crc32, want.bytes, want.crc32
                ),
            ));
        }
    }
    let state = read_state(path).map_err(|e| refuse(STATE, e))?;
    let tensors = |name: &str| {
        candle_core::safetensors::load(path.join(name), device)
            .map_err(|e| refuse(name, format!("cannot be read ({e})")))
    };
    let weights = tensors(WEIGHTS)?;
    let mut opt = tensors(OPTIMIZER)?;
    let row_names: Vec<String> = opt
        .keys()
        .filter_map(|k| k.strip_prefix("rows.").map(str::to_string))
        .collect();
    let mut row_ids = BTreeMap::new();
    for name in row_names {
        if let Some(ids) = opt.remove(&format!("rows.{name}")) {
            row_ids.insert(name, ids);
        }
    }
    let mut moments = BTreeMap::new();
    let names: Vec<String> = opt
        .keys()
        .filter_map(|k| k.strip_prefix("m.").map(str::to_string))
        .collect();
    for name in names {
        match (
            opt.remove(&format!("m.{name}")),
            opt.remove(&format!("v.{name}")),
        ) {
            (Some(m), Some(v)) => {
                moments.insert(name, (m, v));
            }
            _ => {
                return Err(refuse(
                    OPTIMIZER,
                    format!("has no second moment for {name}"),
                ))
            }
        }
    }
    let mut rows = BTreeMap::new();
    for (name, ids) in row_ids {
        let Some((m, v)) = moments.remove(&name) else {
            return Err(refuse(
                OPTIMIZER,
                format!("lists rows of {name} without moments"),
            ));
        };
        let bad = |e: String| refuse(OPTIMIZER, format!("holds moments of {name} that {e}"));
        let values = |t: &Tensor| -> std::result::Result<Vec<f32>, String> {
            let t = t.flatten_all().map_err(|e| e.to_string())?;
            t.to_vec1::<f32>().map_err(|e| e.to_string())
        };
        let ids = ids
            .to_vec1::<u32>()
            .map_err(|e| bad(format!("are not listed as u32 row ids ({e})")))?;
        let width = m.dims().get(1).copied().unwrap_or(0);
        let (m, v) = (values(&m).map_err(&bad)?, values(&v).map_err(&bad)?);
        let r = RowMoments::from_saved(&ids, &m, &v, width)
            .map_err(|e| bad(format!("do not fit: {e}")))?;
        rows.insert(name, r);
    }
    Ok(Restored {
        path: path.to_path_buf(),
        progress: state.progress,
        adam_step: state.adam_step,
        config: state.config,
        weights,
        moments,
        rows: Mutex::new(rows),
    })
}

fn read_state(path: &Path) -> std::result::Result<StateFile, String> {
    let text = fs::read_to_string(path.join(STATE)).map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("is not a checkpoint state ({e})"))
}

fn checksum(path: &Path) -> Result<FileSum> {
    let mut file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok(FileSum {
        bytes,
        crc32: hasher.finalize(),
    })
}

/// The config keys whose values differ between a checkpoint's config and this run's and
/// that change the result (see [`crate::config::changes_result`]).
pub fn config_differences(saved: &Config, now: &Config) -> Vec<String> {
    // An unset train.scale is the loss's default: checkpoints from before it could be unset
    // wrote the 20 out, and resume runs that leave it unset.
    let resolved = |c: &Config| {
        let mut c = c.clone();
        c.train.scale = Some(c.train.scale());
        c.flat()
    };
    crate::config::differences(
        &resolved(saved),
        &resolved(now),
        ("checkpoint", "now"),
        crate::config::changes_result,
    )
}

/// Test hook: `ST_TUNE_CRASH_AT="PLACE:STEP[:SIGNAL][,...]"` sends the process SIGNAL (`KILL`,
/// the default, as a power cut would; `TERM` or `INT`, as a scheduler or Ctrl-C would; `STOP`,
/// to freeze it until SIGCONT) at that
/// place of optimizer step STEP (1-based): `step`, between backward and update; `checkpoint`,
/// half-way through writing one; `eval`, during an evaluation.
pub fn crash_point(place: &str, step: usize) {
    static SPEC: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let spec = SPEC.get_or_init(|| std::env::var(CRASH_ENV).ok());
    let Some(spec) = spec else { return };
    for item in spec.split(',') {
        let mut parts = item.trim().split(':');
        let (Some(p), Some(s)) = (parts.next(), parts.next()) else {
            continue;
        };
        if p != place || s.parse() != Ok(step) {
            continue;
        }
        #[cfg(unix)]
        {
            let signal = match parts.next() {
                Some("TERM") => libc::SIGTERM,
                Some("INT") => libc::SIGINT,
                // Frozen until SIGCONT, holding what it holds (tests of the folder lock).
                Some("STOP") => libc::SIGSTOP,
                _ => libc::SIGKILL,
            };
            // SAFETY: kill(2) on our own pid.
            unsafe {
                libc::kill(libc::getpid(), signal);
            }
            if signal != libc::SIGKILL {
                // Give the handler thread time to see it, so the step it lands in is the one
                // named (a loaded test machine may not schedule that thread at once).
                std::thread::sleep(std::time::Duration::from_millis(200));
                return;
            }
        }
        std::process::abort();
    }
}

pub const CRASH_ENV: &str = "ST_TUNE_CRASH_AT";

/// What a run leaves behind for the next run in the same output folder (`run_state.json`):
/// the micro-batch known to fit, so a repeated run does not hit the same OOMs again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunState {
    pub micro: usize,
    pub max_micro: usize,
}

impl RunState {
    const FILE: &'static str = "run_state.json";

    /// The state a previous run left in `dir`, checked: None if there is none.
    pub fn read(dir: &Path) -> Result<Option<RunState>> {
        let path = dir.join(Self::FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let bad = |msg: String| {
            Error::data(
                &path,
                0,
                format!("{msg}; delete the file to start from the configured micro-batch"),
            )
        };
        let s: RunState =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a run state ({e})")))?;
        if s.micro == 0 || s.max_micro == 0 || s.micro > s.max_micro {
            return Err(bad(format!(
                "micro {} and max_micro {} must satisfy 1 <= micro <= max_micro",
                s.micro, s.max_micro
            )));
        }
        Ok(Some(s))
    }

    /// Written atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string(self).expect("plain struct");
        crate::atomic::write_file(&dir.join(Self::FILE), text.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_keys_that_change_the_result_are_reported() {
        let a = Config::default();
        let mut b = a.clone();
        b.train.log_steps = 1;
        b.output.checkpoint_steps = 3;
        b.memory.limit = Some(crate::config::parse_memory_limit("1GiB").unwrap());
        assert!(config_differences(&a, &b).is_empty());
        b.train.lr = 1e-3;
        b.train.max_steps = Some(7);
        let d = config_differences(&a, &b);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(
            d[0].starts_with("train.lr (checkpoint: 0.00002, now: 0.001)"),
            "{d:?}"
        );
        assert!(
            d[1].starts_with("train.max_steps (checkpoint: unset, now: 7)"),
            "{d:?}"
        );
    }

    #[test]
    fn a_run_state_with_micro_zero_is_refused_naming_the_file() {
        let dir = tempfile::TempDir::new().unwrap();
        assert_eq!(RunState::read(dir.path()).unwrap(), None);
        std::fs::write(
            dir.path().join("run_state.json"),
            r#"{"micro":0,"max_micro":8}"#,
        )
        .unwrap();
        let e = RunState::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("run_state.json") && e.contains("micro 0"), "{e}");
        RunState {
            micro: 2,
            max_micro: 8,
        }
        .write(dir.path())
        .unwrap();
        assert_eq!(
            RunState::read(dir.path()).unwrap(),
            Some(RunState {
                micro: 2,
                max_micro: 8
            })
        );
    }

    #[test]
    fn an_unset_scale_resumes_a_checkpoint_that_wrote_its_default_out() {
        let mut saved = Config::default();
        saved.train.scale = Some(20.0);
        let now = Config::default();
        assert!(config_differences(&saved, &now).is_empty());
        let mut gist = Config::default();
        gist.train.loss = crate::config::LossKind::Gist;
        let mut saved_gist = gist.clone();
        saved_gist.train.scale = Some(20.0);
        let d = config_differences(&saved_gist, &gist);
        assert!(d.iter().any(|k| k.starts_with("train.scale")), "{d:?}");
    }
}

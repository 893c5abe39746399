//! The sweep folder, shared by every process that runs the sweep's trials (one machine, or many
//! with the folder on a shared filesystem). Files only, no server: records are replaced by
//! atomic renames, and a trial or the memory file is claimed with the kernel's lock on a file
//! (`src/lock.rs`: flock, which NFS carries out on the server as far as the mount allows).
//!
//! ```text
//! DIR/sweep.json          the sweep's fingerprint: a folder serves one sweep file
//! DIR/memory.json         what trials learned about memory, by memory settings
//! DIR/trial-0007/         one trial: config.toml, trial.json, train.jsonl (its --json
//!                         output), train.log (its stderr) and its training output (final/,
//!                         checkpoints/, metrics.jsonl, ...); .sweep.lock, locked while a sweep
//!                         process runs it, and .train.lock, while its `train` runs
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::atomic;
use crate::config::{Config, MicroBatch};
use crate::error::{Error, Result};
use crate::lock::{hostname, Busy, Lock};
use crate::sweep::spec::Sweep;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not started yet (no trial.json).
    Pending,
    /// A process is running it, or was when it died (then the next run resumes it).
    Running,
    Complete,
    /// Stopped early by the pruner at a rung; its model and metrics are kept.
    Pruned,
    /// Did not fit in memory even at micro-batch 1 with every allowed lever (exit 3).
    Infeasible,
    /// Stopped after `train.max_nonfinite_steps` NaN or infinite steps in a row (exit 4);
    /// TPE counts it as bad, like an infeasible trial.
    Diverged,
    Failed,
    /// Stopped by Ctrl-C or SIGTERM after a checkpoint: the next run resumes it.
    Interrupted,
}

impl Status {
    /// Whether `sweep run` leaves the trial alone (`--trial N` retries a failed one).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::Complete
                | Status::Pruned
                | Status::Infeasible
                | Status::Diverged
                | Status::Failed
        )
    }
}

/// `trial-N/trial.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialRecord {
    pub index: usize,
    pub params: BTreeMap<String, toml::Value>,
    pub status: Status,
    pub metric: Option<f64>,
    pub seconds: Option<f64>,
    pub samples_per_s: Option<f64>,
    pub peak_memory: Option<u64>,
    pub ooms_recovered: Option<usize>,
    pub final_micro_batch_size: Option<usize>,
    pub exit_code: Option<i32>,
    /// Why it failed or was infeasible.
    pub message: Option<String>,
    /// Who ran it last.
    pub host: String,
    pub pid: u32,
}

impl TrialRecord {
    pub fn new(index: usize, params: &[(String, toml::Value)]) -> Self {
        TrialRecord {
            index,
            params: params.iter().cloned().collect(),
            status: Status::Pending,
            metric: None,
            seconds: None,
            samples_per_s: None,
            peak_memory: None,
            ooms_recovered: None,
            final_micro_batch_size: None,
            exit_code: None,
            message: None,
            host: hostname(),
            pid: std::process::id(),
        }
    }
}

/// What trials with the same memory settings ([`memory_key`]) learned: the micro-batch that
/// last fitted, or that even one row does not.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemoryNote {
    pub micro: Option<usize>,
    pub infeasible: Option<String>,
    pub trial: usize,
}

pub struct Store {
    pub dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct SweepFile {
    file: PathBuf,
    fingerprint: BTreeMap<String, String>,
}

impl Store {
    /// Opens (creating) the sweep's folder, refusing one made by another sweep file.
    pub fn open(sweep: &Sweep) -> Result<Store> {
        let dir = sweep.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join("sweep.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let saved: SweepFile = serde_json::from_str(&text).map_err(|e| {
                    Error::sweep(
                        &path,
                        format!("is damaged ({e}); move it away to start over"),
                    )
                })?;
                let diffs = crate::config::differences(
                    &saved.fingerprint,
                    &sweep.fingerprint,
                    ("folder", "file"),
                    |_| true,
                );
                if !diffs.is_empty() {
                    return Err(Error::sweep(
                        &sweep.file,
                        format!(
                            "its folder {} was made by another sweep ({}): {}. Use another \
                             sweep.dir, or restore the sweep file",
                            dir.display(),
                            saved.file.display(),
                            diffs.join("; ")
                        ),
                    ));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let text = serde_json::to_string_pretty(&SweepFile {
                    file: sweep.file.clone(),
                    fingerprint: sweep.fingerprint.clone(),
                })
                .expect("plain data");
                atomic::write_file(&path, text.as_bytes())?;
            }
            Err(e) => return Err(Error::io(&path, e)),
        }
        Ok(Store { dir })
    }

    pub fn trial_dir(&self, index: usize) -> PathBuf {
        self.dir.join(format!("trial-{index:04}"))
    }

    /// The trial's record; `None` when it never started.
    pub fn record(&self, index: usize) -> Result<Option<TrialRecord>> {
        let path = self.trial_dir(index).join("trial.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                Error::sweep(
                    &path,
                    format!("is damaged ({e}); delete it to run the trial again"),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    }

    pub fn write_record(&self, r: &TrialRecord) -> Result<()> {
        let dir = self.trial_dir(r.index);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let text = serde_json::to_string_pretty(r).expect("plain data");
        atomic::write_file(&dir.join("trial.json"), text.as_bytes())
    }

    /// Claims trial `index` for this process, or says who holds it: another `sweep run`, or
    /// a `train` someone started in the trial's folder.
    pub fn claim(&self, index: usize) -> Result<Result<Lock, Busy>> {
        let dir = self.trial_dir(index);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let lock = match Lock::try_take(&dir.join(".sweep.lock"), "sweep run")? {
            Ok(lock) => lock,
            Err(busy) => return Ok(Err(busy)),
        };
        // The trial's own `train` takes this one; the claim only keeps others out.
        match Lock::holder(&dir.join(crate::lock::TRAIN_LOCK))? {
            Some(busy) => Ok(Err(busy)),
            None => Ok(Ok(lock)),
        }
    }

    /// What earlier trials learned about memory for `key`.
    pub fn memory_note(&self, key: &str) -> Result<Option<MemoryNote>> {
        Ok(self.memory_notes()?.remove(key))
    }

    /// Records what trial `trial` learned about `key`, under the memory file's lock.
    pub fn note_memory(&self, key: &str, note: MemoryNote) -> Result<()> {
        let lock_path = self.dir.join(".memory.lock");
        let started = Instant::now();
        let _lock = loop {
            let busy = match Lock::try_take(&lock_path, "sweep run")? {
                Ok(l) => break l,
                Err(busy) => busy,
            };
            if started.elapsed() > Duration::from_secs(60) {
                return Err(Error::sweep(
                    &lock_path,
                    format!("has been held for a minute by {}", busy.who()),
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut notes = self.memory_notes()?;
        notes.insert(key.to_string(), note);
        let text = serde_json::to_string_pretty(&notes).expect("plain data");
        atomic::write_file(&self.dir.join("memory.json"), text.as_bytes())
    }

    fn memory_notes(&self) -> Result<BTreeMap<String, MemoryNote>> {
        let path = self.dir.join("memory.json");
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| {
                Error::sweep(
                    &path,
                    format!("is damaged ({e}); delete it (it is only a cache)"),
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(Error::io(&path, e)),
        }
    }
}

/// What decides a trial's memory, as one string: trials that agree on it fit the same
/// micro-batch (the batch size does not matter: it is cut into micro-batches).
pub fn memory_key(cfg: &Config) -> String {
    let (m, d, t) = (&cfg.model, &cfg.data, &cfg.train);
    format!(
        "model={} max_seq_length={:?} data={} limit={:?} loss={} precision={} \
         checkpointing={} freeze_layers={} freeze_embeddings={} device={} memory.limit={:?}",
        m.path,
        m.max_seq_length,
        match &d.train {
            crate::config::TrainData::File(p) => p.display().to_string(),
            // Each set's columns and loss shape its rows too.
            sets => format!("{sets:?}"),
        },
        d.limit,
        t.loss,
        t.precision,
        t.gradient_checkpointing,
        t.freeze_layers,
        t.freezes_embeddings(),
        m.device,
        cfg.memory.limit.as_ref().map(|l| l.as_str())
    )
}

/// The configured micro-batch of `cfg`, if fixed (`"auto"` lets the planner choose).
pub fn configured_micro(cfg: &Config) -> Option<usize> {
    match cfg.train.micro_batch() {
        MicroBatch::Size(n) => Some(n),
        MicroBatch::Auto => None,
    }
}

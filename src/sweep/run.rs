//! Running trials: each in its own `st-tune train --resume` process, so memory goes back to the
//! system between trials, a crash ends one trial and not the sweep, and a trial that was
//! stopped continues from its checkpoint when the sweep runs again.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::lock::Busy;
use crate::sweep::prune::TrialPruner;
use crate::sweep::spec::Sweep;
use crate::sweep::store::{self, MemoryNote, Status, Store, TrialRecord};
use crate::sweep::tpe::{self, Observation};
use crate::sweep::trials;
use crate::train::checkpoint::RunState;

/// Trial `index`'s config: the base config, the trial's keys, and its own output folder.
/// Local paths are made absolute so the trial runs from any working directory (a scheduler's).
pub fn trial_config(
    sweep: &Sweep,
    store: &Store,
    index: usize,
    params: &[(String, toml::Value)],
) -> Result<Config> {
    let mut sets: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let out = absolute(&store.trial_dir(index));
    sets.push(format!(
        "output.dir={}",
        toml::Value::String(out.display().to_string())
    ));
    let mut cfg = Config::load(&sweep.base, &sets)?;
    cfg.data.train.map_paths(absolute);
    cfg.data.dev = cfg.data.dev.as_deref().map(absolute);
    if Path::new(&cfg.model.path).exists() {
        cfg.model.path = absolute(Path::new(&cfg.model.path)).display().to_string();
    }
    Ok(cfg)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

pub fn check_index(sweep: &Sweep, index: usize) -> Result<()> {
    if index >= sweep.trials {
        return Err(Error::sweep(
            &sweep.file,
            format!(
                "has {} trials, numbered 0 to {}; there is no trial {index}",
                sweep.trials,
                sweep.trials - 1
            ),
        ));
    }
    Ok(())
}

/// Runs trial `index` unless it is finished (a failed one only when `retry_failed`) or another
/// live process holds it (`Err`, saying which). `interrupt` is the signal this process received, if any:
/// it is passed on to the trial, which saves a checkpoint and stops.
pub fn run_trial(
    sweep: &Sweep,
    store: &Store,
    index: usize,
    retry_failed: bool,
    interrupt: &AtomicI32,
) -> Result<Result<TrialRecord, Busy>> {
    check_index(sweep, index)?;
    let earlier = store.record(index)?;
    if let Some(r) = &earlier {
        if r.status.is_final() && !(retry_failed && r.status == Status::Failed) {
            return Ok(Ok(r.clone()));
        }
    }
    let _lock = match store.claim(index)? {
        Ok(lock) => lock,
        Err(busy) => return Ok(Err(busy)),
    };
    // A trial that started before keeps its keys (TPE's depend on when it started).
    let params: Vec<(String, toml::Value)> = match earlier {
        Some(r) if !r.params.is_empty() => r.params.into_iter().collect(),
        _ => match trials::params(sweep, index) {
            Some(p) => p,
            None => tpe_suggestion(sweep, store, index)?,
        },
    };
    let dir = store.trial_dir(index);
    let cfg = trial_config(sweep, store, index, &params)?;
    let config_path = dir.join("config.toml");
    let text =
        toml::to_string(&cfg).map_err(|e| Error::Internal(format!("config to TOML: {e}")))?;
    crate::atomic::write_file(&config_path, text.as_bytes())?;

    let key = store::memory_key(&cfg);
    let note = store.memory_note(&key)?;
    let mut record = TrialRecord {
        status: Status::Running,
        ..TrialRecord::new(index, &params)
    };
    if let Some(why) = note.as_ref().and_then(|n| n.infeasible.clone()) {
        record.status = Status::Infeasible;
        record.message = Some(why);
        store.write_record(&record)?;
        return Ok(Ok(record));
    }
    start_from_known_micro(&dir, &cfg, note.as_ref())?;
    store.write_record(&record)?;

    let pruner = match &sweep.prune {
        Some(p) => {
            let path = dir.join("prune.json");
            let pruner = TrialPruner {
                method: p.method,
                min_rows: p.min_rows,
                reduction: p.reduction,
                min_trials: p.min_trials,
                metric: sweep.metric.split_once('.').map_or("", |m| m.1).to_string(),
                goal: sweep.goal,
                rungs_dir: absolute(&store.dir.join("rungs")),
                trial: index,
            };
            let text = serde_json::to_string_pretty(&pruner).expect("plain data");
            crate::atomic::write_file(&path, text.as_bytes())?;
            Some(path)
        }
        None => None,
    };
    let started = Instant::now();
    let code = train_process(&config_path, pruner.as_deref(), &dir, interrupt)?;
    record.seconds = Some(started.elapsed().as_secs_f64());
    record.exit_code = Some(code);
    let summary = summary_of(&dir.join("train.jsonl"));
    record.status = match code {
        0 if summary.as_ref().is_some_and(|s| !s["pruned_at"].is_null()) => Status::Pruned,
        0 if summary.is_some() => Status::Complete,
        3 => Status::Infeasible,
        4 => Status::Diverged,
        130 | 143 => Status::Interrupted,
        _ => Status::Failed,
    };
    if let Some(s) = &summary {
        record.metric = metric_of(s, &sweep.metric);
        if record.metric.is_none() {
            record.message = Some(format!(
                "the run reported no {} (does the dev file's evaluation have that figure?)",
                sweep.metric
            ));
        }
        record.samples_per_s = s["samples_per_s"].as_f64();
        record.peak_memory = s["peak_memory"].as_u64();
        record.ooms_recovered = s["ooms_recovered"].as_u64().map(|n| n as usize);
        record.final_micro_batch_size = s["final_micro_batch_size"].as_u64().map(|n| n as usize);
    }
    if !matches!(record.status, Status::Complete | Status::Pruned) {
        // Why it did not complete replaces any note about the metric.
        record.message = match code {
            129..=191 if code != 130 && code != 143 => Some(format!(
                "killed by signal {} (the kernel's out-of-memory killer sends 9)",
                code - 128
            )),
            _ => last_error(&dir.join("train.log")),
        };
    }
    learn_memory(store, &key, &record, &dir)?;
    store.write_record(&record)?;
    Ok(Ok(record))
}

/// TPE's keys for trial `index`, from the trials before it that have a result.
fn tpe_suggestion(
    sweep: &Sweep,
    store: &Store,
    index: usize,
) -> Result<Vec<(String, toml::Value)>> {
    let mut finished = Vec::new();
    for i in 0..index {
        if let Some(r) = store.record(i)? {
            if let Some(metric) = observed(&r) {
                finished.push((r.params.into_iter().collect::<Vec<_>>(), metric));
            }
        }
    }
    let history: Vec<Observation> = finished
        .iter()
        .map(|(params, metric)| Observation {
            params,
            metric: *metric,
        })
        .collect();
    Ok(tpe::suggest(sweep, index, &history))
}

/// What TPE learns from a trial: its metric, `Some(None)` for a trial that is bad whatever it
/// scored (infeasible, diverged), `None` for one it learns nothing from (failed, unfinished).
fn observed(r: &TrialRecord) -> Option<Option<f64>> {
    match r.status {
        Status::Complete | Status::Pruned if r.metric.is_some_and(f64::is_finite) => Some(r.metric),
        Status::Infeasible | Status::Diverged => Some(None),
        _ => None,
    }
}

/// A trial whose memory settings an earlier trial already cut down starts at that micro-batch
/// (through `run_state.json`, which `train` reads) instead of hitting the same OOMs.
fn start_from_known_micro(dir: &Path, cfg: &Config, note: Option<&MemoryNote>) -> Result<()> {
    let (Some(configured), Some(known)) =
        (store::configured_micro(cfg), note.and_then(|n| n.micro))
    else {
        return Ok(());
    };
    if known < configured && crate::train::checkpoint::list(dir)?.is_empty() {
        RunState {
            micro: known,
            max_micro: configured,
        }
        .write(dir)?;
    }
    Ok(())
}

fn learn_memory(store: &Store, key: &str, record: &TrialRecord, dir: &Path) -> Result<()> {
    let note = match record.status {
        Status::Infeasible => MemoryNote {
            micro: None,
            infeasible: Some(format!(
                "trial {} with the same memory settings did not fit even at micro-batch 1: {}",
                record.index,
                record.message.clone().unwrap_or_default()
            )),
            trial: record.index,
        },
        Status::Complete | Status::Pruned => match RunState::read(dir)? {
            Some(s) if s.micro < s.max_micro => MemoryNote {
                micro: Some(s.micro),
                infeasible: None,
                trial: record.index,
            },
            _ => return Ok(()),
        },
        _ => return Ok(()),
    };
    store.note_memory(key, note)
}

/// `st-tune train --config CONFIG --resume --json [--prune FILE]`, its stdout to `train.jsonl` and stderr to
/// `train.log` in the trial folder; returns its exit code (128 + signal if it was killed).
fn train_process(
    config: &Path,
    pruner: Option<&Path>,
    dir: &Path,
    interrupt: &AtomicI32,
) -> Result<i32> {
    let exe = std::env::current_exe().map_err(|e| Error::io("st-tune executable", e))?;
    let file = |name: &str| {
        let p = dir.join(name);
        std::fs::File::create(&p).map_err(|e| Error::io(&p, e))
    };
    let mut cmd = Command::new(exe);
    cmd.args(["train", "--resume", "--json", "--config"])
        .arg(config);
    if let Some(p) = pruner {
        cmd.arg("--prune").arg(p);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(file("train.jsonl")?)
        .stderr(file("train.log")?)
        .spawn()
        .map_err(|e| Error::io(config, e))?;
    let mut forwarded = false;
    loop {
        if let Some(status) = child.try_wait().map_err(|e| Error::io(config, e))? {
            use std::os::unix::process::ExitStatusExt;
            return Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
        }
        let signal = interrupt.load(Ordering::SeqCst);
        if signal != 0 && !forwarded {
            // SAFETY: kill(2) on our own child, which has not been reaped yet.
            unsafe { libc::kill(child.id() as i32, signal) };
            forwarded = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The `{"event": "summary"}` line of a trial's `--json` output.
fn summary_of(path: &Path) -> Option<serde_json::Value> {
    crate::train::report::read_jsonl(path)
        .ok()?
        .into_iter()
        .find(|v| v["event"] == "summary")
        .map(|mut v| v["data"].take())
}

/// `dev.FIGURE` from the end-of-training evaluation (as `eval --json` names it); `train.loss`,
/// the last step's loss.
pub fn metric_of(summary: &serde_json::Value, metric: &str) -> Option<f64> {
    match metric.split_once('.') {
        Some(("dev", name)) => summary["dev_after"][name].as_f64(),
        Some(("train", "loss")) => summary["final_loss"].as_f64(),
        _ => None,
    }
}

/// The `error: ...` line a failed trial printed, for the report.
fn last_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("error: "))
        .or_else(|| text.lines().rev().find(|l| !l.trim().is_empty()))?;
    Some(line.trim_start_matches("error: ").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tpe_counts_diverged_trials_as_bad_like_infeasible_ones_and_learns_nothing_from_failed() {
        let with = |status, metric| TrialRecord {
            status,
            metric,
            ..TrialRecord::new(0, &[])
        };
        assert_eq!(
            observed(&with(Status::Complete, Some(0.5))),
            Some(Some(0.5))
        );
        assert_eq!(observed(&with(Status::Diverged, None)), Some(None));
        assert_eq!(observed(&with(Status::Infeasible, None)), Some(None));
        assert_eq!(observed(&with(Status::Failed, Some(0.9))), None);
        assert_eq!(observed(&with(Status::Complete, Some(f64::NAN))), None);
    }
}

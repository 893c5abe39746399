//! Checkpoints and `train --resume` through the real binary: a run killed with SIGKILL (during
//! a step, half-way through writing a checkpoint, during evaluation, or at random moments) and
//! resumed until it finishes ends with the same weights, bit for bit, as the run never
//! interrupted; and a checkpoint that cannot be trusted is refused with what to do.
//!
//! The job: a tiny 2-layer BERT, CoSENT (batch-coupled, so micro-batches use the cached
//! scheme), batch 8 in micro-batches of 4, dropout on, 12 steps over 4 epochs, evaluation
//! every 3 steps, a checkpoint every 2, and OOMs injected at steps 2, 5 and 9 (before and after
//! the kills), with `regrow_after = 2` so the micro-batch shrinks and grows back across them.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

const OOMS: &str = "2:forward,5:backward,9:optimizer";

struct Job {
    dir: TempDir,
    config: PathBuf,
    steps: usize,
}

impl Job {
    fn new(precision: &str) -> Self {
        Self::with_steps(precision, 12)
    }

    fn with_steps(precision: &str, steps: usize) -> Self {
        let dir = TempDir::new().unwrap();
        let model = dir.path().join("model");
        common::tiny_model(&model, false, 2, 11);
        let data = dir.path().join("train.csv");
        common::write_data(&data, true);
        let config = dir.path().join("run.toml");
        let text = format!(
            "[model]\npath = {model:?}\n[data]\ntrain = {data:?}\ndev = {data:?}\n\
             [train]\nloss = \"cosent\"\nbatch_size = 8\nmicro_batch_size = 4\n\
             max_steps = {steps}\nlr = 1e-3\neval_steps = 3\nlog_steps = 1\nseed = 5\n\
             precision = \"{precision}\"\n[memory]\nregrow_after = 2\n\
             [output]\ndir = \"out\"\ncheckpoint_steps = 2\nkeep_checkpoints = 2\n"
        );
        std::fs::write(&config, text).unwrap();
        Self { dir, config, steps }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `st-tune train` into `out`, with `extra` arguments and `env`, not waited for.
    fn spawn(&self, out: &str, extra: &[&str], env: &[(&str, &str)]) -> std::process::Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_st-tune"));
        cmd.args(["train", "--config"])
            .arg(&self.config)
            .arg("--output")
            .arg(self.out(out))
            .args(["--json"])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env("RAYON_NUM_THREADS", "2")
            .env("ST_TUNE_INJECT_OOM", OOMS)
            .env_remove("ST_TUNE_CRASH_AT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("the st-tune binary runs")
    }

    /// Runs to the end; returns the exit status and stdout followed by stderr.
    fn run(&self, out: &str, extra: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
        let o = self.spawn(out, extra, env).wait_with_output().unwrap();
        let text =
            String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
        (o.status, text)
    }

    /// The uninterrupted run.
    fn reference(&self) -> Duration {
        let started = Instant::now();
        let (status, err) = self.run("reference", &[], &[]);
        assert!(status.success(), "{err}");
        started.elapsed()
    }
}

fn killed(status: ExitStatus) -> bool {
    status.signal() == Some(libc::SIGKILL)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

/// The step of the `resume` event a run printed (with `--json`).
fn resumed_at(stdout: &str) -> Option<u64> {
    stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["event"] == "resume")
        .and_then(|v| v["step"].as_u64())
}

/// The per-step training losses of metrics.jsonl, in file order.
fn losses(out: &Path) -> Vec<(u64, f64)> {
    lines(&out.join("metrics.jsonl"))
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| (l["step"].as_u64().unwrap(), l["loss"].as_f64().unwrap()))
        .collect()
}

/// The resumed run equals the reference: the same final weights byte for byte, the same loss
/// at every step, each step logged once, and every event line saying what it is.
fn assert_same_as_reference(job: &Job, out: &str) {
    let (a, b) = (job.out("reference"), job.out(out));
    let weights = |d: &Path| std::fs::read(d.join("final/model.safetensors")).unwrap();
    assert!(
        weights(&a) == weights(&b),
        "{out}: the resumed run's weights differ from the uninterrupted run's"
    );
    assert_eq!(losses(&a), losses(&b), "{out}: per-step losses");
    let steps: Vec<u64> = losses(&b).iter().map(|(s, _)| *s).collect();
    assert_eq!(
        steps,
        (1..=job.steps as u64).collect::<Vec<_>>(),
        "each step logged once"
    );
    let evals = |d: &Path| -> Vec<(u64, String)> {
        lines(&d.join("metrics.jsonl"))
            .iter()
            .filter(|l| l.get("spearman").is_some())
            .map(|l| (l["step"].as_u64().unwrap(), l["spearman"].to_string()))
            .collect()
    };
    assert_eq!(evals(&a), evals(&b), "{out}: evaluations");
    for e in lines(&b.join("events.jsonl")) {
        assert!(e["event"].is_string() && e["step"].is_u64(), "{e}");
    }
    let kinds = |d: &Path, kind: &str| {
        lines(&d.join("events.jsonl"))
            .iter()
            .filter(|e| e["event"] == kind)
            .map(|e| e["step"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(kinds(&a, "oom"), [2, 5, 9], "the injected OOMs happened");
    assert_eq!(kinds(&b, "oom"), kinds(&a, "oom"), "{out}: OOMs, once each");
    let saved = kinds(&b, "checkpoint");
    for step in kinds(&a, "checkpoint") {
        assert!(
            saved.contains(&step),
            "{out}: checkpoint {step} logged: {saved:?}"
        );
    }
    assert!(!kinds(&b, "resume").is_empty(), "{out}: resumes are logged");
}

/// Killed at each named place in turn (`ST_TUNE_CRASH_AT`), resumed after each kill.
fn killed_at_named_places_then_resumed(precision: &str) {
    let job = Job::new(precision);
    job.reference();
    let crashes = [
        "step:3",
        "checkpoint:6",
        "eval:9",
        "step:12",
        "checkpoint:12",
    ];
    for (i, at) in crashes.iter().enumerate() {
        let resume: &[&str] = if i == 0 { &[] } else { &["--resume"] };
        let (status, err) = job.run("killed", resume, &[("ST_TUNE_CRASH_AT", at)]);
        assert!(
            killed(status),
            "{at}: expected SIGKILL, got {status}\n{err}"
        );
    }
    // A kill during a checkpoint write leaves its hidden staging folder, never a step-N.
    let checkpoints: Vec<String> = std::fs::read_dir(job.out("killed/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        checkpoints.iter().any(|n| n.starts_with(".step-12.")),
        "{checkpoints:?}"
    );
    assert!(
        !checkpoints.contains(&"step-12".to_string()),
        "{checkpoints:?}"
    );
    let (status, err) = job.run("killed", &["--resume"], &[]);
    assert!(status.success(), "{err}");
    assert!(resumed_at(&err) == Some(10), "says it resumed: {err}");
    assert_same_as_reference(&job, "killed");
    let left: Vec<String> = std::fs::read_dir(job.out("killed/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut left = left;
    left.sort();
    assert_eq!(
        left,
        ["step-10", "step-12"],
        "keep_checkpoints = 2, staging removed"
    );
}

#[test]
fn f32_run_killed_during_a_step_a_checkpoint_and_an_eval_resumes_bit_identical() {
    killed_at_named_places_then_resumed("f32");
}

#[test]
fn bf16_run_killed_during_a_step_a_checkpoint_and_an_eval_resumes_bit_identical() {
    killed_at_named_places_then_resumed("bf16");
}

#[test]
fn a_run_killed_at_random_moments_and_resumed_each_time_ends_bit_identical() {
    // Long enough that most of a run's time is training, not starting up.
    let job = Job::with_steps("f32", 60);
    let took = job.reference().as_millis() as u64;
    // xorshift64: a seeded, repeatable sequence of kill delays, up to a quarter of the whole run.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    for attempt in 0.. {
        let mut child = job.spawn("random", &["--resume"], &[]);
        drop(child.stdout.take()); // the run must not block on a full pipe
        drop(child.stderr.take());
        let status = if attempt < 40 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            std::thread::sleep(Duration::from_millis(x % (took / 4 + 1)));
            let _ = child.kill(); // SIGKILL; a no-op if it already finished
            child.wait().unwrap()
        } else {
            child.wait().unwrap()
        };
        if killed(status) {
            kills += 1;
        } else {
            assert!(status.success(), "attempt {attempt}: {status}");
            break;
        }
    }
    eprintln!("{kills} kills in a run of {took} ms");
    assert!(kills >= 3, "only {kills} kills landed during the run");
    assert_same_as_reference(&job, "random");
}

#[test]
fn sigterm_saves_a_checkpoint_exits_143_and_resume_finishes_the_same_run() {
    let job = Job::new("f32");
    job.reference();
    // SIGTERM arrives during step 5, between two checkpoints (every 2 steps).
    let (status, text) = job.run("term", &[], &[("ST_TUNE_CRASH_AT", "step:5:TERM")]);
    assert_eq!(status.code(), Some(143), "{text}");
    let events = lines(&job.out("term/events.jsonl"));
    let interrupted: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"] == "interrupted")
        .collect();
    assert_eq!(interrupted.len(), 1, "{events:?}");
    assert_eq!(interrupted[0]["signal"], libc::SIGTERM);
    // The signal is seen at the end of step 5 (or, if it lands late, of step 6).
    let step = interrupted[0]["step"].as_u64().unwrap();
    assert!((5..=6).contains(&step), "interrupted after step {step}");
    assert!(
        job.out(&format!("term/checkpoints/step-{step}/manifest.json"))
            .exists(),
        "a checkpoint at the interrupted step {step}"
    );
    let card = std::fs::read_to_string(job.out("term/final/README.md")).unwrap();
    assert!(card.contains("interrupted by signal 15"), "{card}");
    let (status, text) = job.run("term", &["--resume"], &[]);
    assert!(status.success(), "{text}");
    assert_eq!(resumed_at(&text), Some(step), "{text}");
    assert_same_as_reference(&job, "term");
}

// ---------------------------------------------------------------------------------------------
// What a resume refuses, and what it accepts
// ---------------------------------------------------------------------------------------------

/// A finished run with checkpoints step-10 and step-12 in `out`.
fn finished(job: &Job) {
    let (status, err) = job.run("done", &[], &[]);
    assert!(status.success(), "{err}");
}

fn refused(job: &Job, extra: &[&str], needles: &[&str]) -> String {
    let mut args = vec!["--resume"];
    args.extend_from_slice(extra);
    let (status, err) = job.run("done", &args, &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.lines().any(|l| l.starts_with("error: ")) && !err.contains("panicked"),
        "{err}"
    );
    for n in needles {
        assert!(err.contains(n), "missing `{n}` in:\n{err}");
    }
    err
}

fn step12(job: &Job, file: &str) -> PathBuf {
    job.out("done/checkpoints/step-12").join(file)
}

#[test]
fn a_checkpoint_with_a_flipped_byte_is_refused_naming_the_file_and_the_previous_one() {
    let job = Job::new("f32");
    finished(&job);
    let path = step12(&job, "weights.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    refused(
        &job,
        &[],
        &[
            "step-12/weights.safetensors",
            "damaged",
            "CRC-32",
            "step-10",
        ],
    );
}

#[test]
fn a_truncated_checkpoint_file_is_refused() {
    let job = Job::new("f32");
    finished(&job);
    let path = step12(&job, "optimizer.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    refused(
        &job,
        &[],
        &["step-12/optimizer.safetensors", "bytes", "step-10"],
    );
}

#[test]
fn a_checkpoint_missing_a_file_or_its_manifest_is_refused() {
    let job = Job::new("f32");
    finished(&job);
    std::fs::remove_file(step12(&job, "state.json")).unwrap();
    refused(
        &job,
        &[],
        &["step-12/state.json", "cannot be read", "step-10"],
    );
    std::fs::remove_file(step12(&job, "manifest.json")).unwrap();
    refused(
        &job,
        &[],
        &["step-12/manifest.json", "incomplete", "step-10"],
    );
}

#[test]
fn a_checkpoint_in_another_format_is_refused_with_both_formats() {
    let job = Job::new("f32");
    finished(&job);
    let path = step12(&job, "manifest.json");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replacen("\"format\": 1", "\"format\": 99", 1)).unwrap();
    refused(
        &job,
        &[],
        &["manifest.json", "format 99", "format 1", "step-10"],
    );
}

#[test]
fn a_checkpoint_of_another_model_is_refused() {
    let job = Job::new("f32");
    finished(&job);
    // Same path, same config, but a model of another size there now.
    common::tiny_model(&job.out("model"), false, 3, 11);
    refused(&job, &[], &["weights.safetensors", "another model"]);
}

#[test]
fn resuming_with_a_config_that_changes_the_result_lists_the_keys() {
    let job = Job::new("f32");
    finished(&job);
    refused(
        &job,
        &["--set", "train.lr=0.5", "--set", "train.seed=6"],
        &["train.lr", "train.seed", "another config"],
    );
    // Keys that do not change the result may change.
    let (status, err) = job.run(
        "done",
        &[
            "--resume",
            "--set",
            "train.log_steps=5",
            "--set",
            "output.keep_checkpoints=3",
        ],
        &[],
    );
    assert!(status.success(), "{err}");
}

#[test]
fn checkpoints_without_resume_are_not_overwritten_and_resume_without_any_starts_afresh() {
    let job = Job::new("f32");
    finished(&job);
    let before = std::fs::read(step12(&job, "weights.safetensors")).unwrap();
    let (status, err) = job.run("done", &[], &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    for n in [
        "already holds checkpoints",
        "step-12",
        "saved 20",
        "--resume",
        "output.dir",
    ] {
        assert!(err.contains(n), "missing `{n}` in:\n{err}");
    }
    assert_eq!(
        std::fs::read(step12(&job, "weights.safetensors")).unwrap(),
        before
    );

    let (status, err) = job.run("fresh", &["--resume"], &[]);
    assert!(status.success(), "{err}");
    assert!(err.contains("starting from the beginning"), "{err}");
}

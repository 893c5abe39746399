//! Two promises of docs/reliability.md, through the real binary:
//!
//! - non-finite steps never reach the weights: a step whose gradients are made NaN
//!   (`ST_TUNE_INJECT_NONFINITE`) skips its update and is logged; `train.max_nonfinite_steps`
//!   of them in a row stop the run with exit 4, saving nothing, and `--resume` continues from
//!   the newest (good) checkpoint to the very weights of a run that never met them;
//! - one run per output folder: a second `train` into a folder in use is refused with exit 2
//!   naming the holder, the first ends with the weights it would have had alone, `plot` still
//!   reads the folder, and the lock of a SIGKILLed run is taken over at once.
//!
//! The job: a tiny 2-layer BERT, CoSENT, batch 8, 12 steps, a checkpoint every 2 steps.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

struct Job {
    dir: TempDir,
    config: PathBuf,
}

impl Job {
    fn new(precision: &str) -> Self {
        let dir = TempDir::new().unwrap();
        let model = dir.path().join("model");
        common::tiny_model(&model, false, 2, 11);
        let data = dir.path().join("train.csv");
        common::write_data(&data, true);
        let config = dir.path().join("run.toml");
        let text = format!(
            "[model]\npath = {model:?}\n[data]\ntrain = {data:?}\n\
             [train]\nloss = \"cosent\"\nbatch_size = 8\nmax_steps = 12\nlr = 1e-3\n\
             log_steps = 1\nseed = 5\nprecision = \"{precision}\"\n\
             [output]\ndir = \"out\"\ncheckpoint_steps = 2\nkeep_checkpoints = 2\n"
        );
        std::fs::write(&config, text).unwrap();
        Self { dir, config }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn spawn(&self, out: &str, extra: &[&str], env: &[(&str, &str)]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_st-tune"));
        cmd.args(["train", "--config"])
            .arg(&self.config)
            .arg("--output")
            .arg(self.out(out))
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env("RAYON_NUM_THREADS", "2")
            .env_remove("ST_TUNE_INJECT_OOM")
            .env_remove("ST_TUNE_INJECT_NONFINITE")
            .env_remove("ST_TUNE_CRASH_AT")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("the st-tune binary runs")
    }

    /// Runs to the end: the exit status, and stdout followed by stderr.
    fn run(&self, out: &str, extra: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
        output(self.spawn(out, extra, env))
    }

    fn reference(&self) {
        let (status, text) = self.run("reference", &[], &[]);
        assert!(status.success(), "{text}");
    }
}

fn output(child: Child) -> (ExitStatus, String) {
    let o = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    (o.status, text)
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", path.display())))
        .collect()
}

fn events(out: &Path, kind: &str) -> Vec<Value> {
    lines(&out.join("events.jsonl"))
        .into_iter()
        .filter(|e| e["event"] == kind)
        .collect()
}

fn final_weights(out: &Path) -> Vec<u8> {
    std::fs::read(out.join("final/model.safetensors")).unwrap()
}

fn checkpoints(out: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("step-"))
        .collect();
    names.sort_by_key(|n| n[5..].parse::<usize>().unwrap());
    names
}

// ---------------------------------------------------------------------------------------------
// Non-finite steps
// ---------------------------------------------------------------------------------------------

#[test]
fn a_step_with_nan_gradients_is_skipped_and_logged_in_every_precision() {
    for precision in ["f32", "bf16", "f16"] {
        let job = Job::new(precision);
        let env = [("ST_TUNE_INJECT_NONFINITE", "3,8")];
        let (status, text) = job.run("out", &[], &env);
        assert!(status.success(), "{precision}: {text}");
        let out = job.out("out");
        let skipped: Vec<u64> = events(&out, "nonfinite")
            .iter()
            .chain(&events(&out, "skipped_step"))
            .map(|e| e["step"].as_u64().unwrap())
            .collect();
        assert!(
            skipped.contains(&3) && skipped.contains(&8),
            "{precision}: {skipped:?}"
        );
        // Every skip left AdamW's update count alone: 12 steps, one update per step not skipped.
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("checkpoints/step-12/state.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            state["adam_step"].as_u64(),
            Some(12 - skipped.len() as u64),
            "{precision}: {skipped:?}"
        );
        for (name, t) in common::weights(&out) {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                v.iter().all(|x| x.is_finite()),
                "{precision}: {name} holds NaN"
            );
        }
        if precision != "f16" {
            // The scaler of f16 takes an overflow as its own while it can lower the scale.
            let e = &events(&out, "nonfinite")[0];
            assert_eq!(
                (e["step"].as_u64(), e["phase"].as_str()),
                (Some(3), Some("backward"))
            );
            assert!(
                e["tensor"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("encoder.")),
                "{e}"
            );
            assert!(e["grad_norm"].is_null() && e["loss"].is_f64(), "{e}");
        }
    }
}

#[test]
fn nonfinite_steps_in_a_row_stop_the_run_saving_nothing_and_resume_ends_as_if_never_met() {
    for precision in ["f32", "bf16"] {
        let job = Job::new(precision);
        job.reference();
        let stop = ["--set", "train.max_nonfinite_steps=3"];
        let env = [("ST_TUNE_INJECT_NONFINITE", "5,6,7")];
        let (status, text) = job.run("out", &stop, &env);
        assert_eq!(status.code(), Some(4), "{precision}: {text}");
        let out = job.out("out");
        for needle in [
            "3 steps in a row",
            "step 7",
            "step-4",
            "train.lr",
            "train.max_grad_norm",
            "train.precision",
        ] {
            assert!(
                text.contains(needle),
                "{precision}: missing `{needle}` in {text}"
            );
        }
        assert!(!text.contains("panicked"), "{text}");
        let steps: Vec<u64> = events(&out, "nonfinite")
            .iter()
            .map(|e| e["step"].as_u64().unwrap())
            .collect();
        assert_eq!(steps, [5, 6, 7], "{precision}");
        // The checkpoint of step 6 fell amid the non-finite steps: not taken, so the newest is
        // the good one of step 4, and nothing else was written.
        assert_eq!(checkpoints(&out), ["step-2", "step-4"], "{precision}");
        assert!(!out.join("final").exists(), "{precision}: final/ written");

        let (status, text) = job.run("out", &["--resume"], &[]);
        assert!(status.success(), "{precision}: {text}");
        assert!(
            final_weights(&out) == final_weights(&job.out("reference")),
            "{precision}: the resumed run's weights differ from the run without NaN"
        );
    }
}

#[test]
fn fewer_nonfinite_steps_in_a_row_than_the_limit_do_not_stop_the_run() {
    let job = Job::new("f32");
    let env = [("ST_TUNE_INJECT_NONFINITE", "2,3,4,5,7,8,9,10")];
    let (status, text) = job.run("out", &[], &env);
    assert!(status.success(), "{text}");
    assert_eq!(events(&job.out("out"), "nonfinite").len(), 8);
    // One more in a row than the limit allows, with the limit lowered for this run.
    let (status, text) = job.run("low", &["--set", "train.max_nonfinite_steps=4"], &env);
    assert_eq!(status.code(), Some(4), "{text}");
    assert!(text.contains("step 5"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// One run per output folder
// ---------------------------------------------------------------------------------------------

/// Waits until process `pid` is stopped (SIGSTOP), at most 60 s.
fn wait_stopped(child: &mut Child) {
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the first run ended before it stopped: {status:?}");
        }
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
        // "pid (comm) STATE ...": the state follows the last ')'.
        let state = stat.rsplit(')').next().unwrap().trim_start().chars().next();
        if state == Some('T') {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "never stopped");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_run_into_a_folder_in_use_is_refused_and_the_first_ends_as_if_alone() {
    let job = Job::new("f32");
    job.reference();
    // The first run freezes itself in step 5, holding the folder.
    let mut first = job.spawn("out", &[], &[("ST_TUNE_CRASH_AT", "step:5:STOP")]);
    wait_stopped(&mut first);
    let out = job.out("out");
    let before = checkpoints(&out);
    for extra in [&[][..], &["--resume"][..]] {
        let (status, text) = job.run("out", extra, &[]);
        assert_eq!(status.code(), Some(2), "{extra:?}: {text}");
        let pid = format!("pid {}", first.id());
        for needle in [
            out.display().to_string().as_str(),
            "in use",
            &pid,
            "host",
            "started",
        ] {
            assert!(
                text.contains(needle),
                "{extra:?}: missing `{needle}` in {text}"
            );
        }
        assert!(
            !text.contains("panicked") && !text.contains("resuming"),
            "{text}"
        );
    }
    assert_eq!(checkpoints(&out), before, "the refused runs wrote nothing");
    // Readers still work on the folder.
    let plot = Command::new(env!("CARGO_BIN_EXE_st-tune"))
        .args(["plot"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(plot.status.success(), "{plot:?}");

    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(first.id() as i32, libc::SIGCONT) };
    let (status, text) = output(first);
    assert!(status.success(), "{text}");
    assert!(
        final_weights(&out) == final_weights(&job.out("reference")),
        "the first run's weights differ from a run alone"
    );
    // Released: the folder takes a new run at once.
    let (status, text) = job.run("out", &["--resume"], &[]);
    assert!(status.success(), "{text}");
}

#[test]
fn the_lock_of_a_killed_run_is_taken_over_at_once() {
    let job = Job::new("f32");
    job.reference();
    let first = job.spawn("out", &[], &[("ST_TUNE_CRASH_AT", "step:5")]);
    let pid = first.id();
    let (status, _) = output(first);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let out = job.out("out");
    // The dead run's name is still in the file; only the kernel's lock is gone.
    let holder: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(".train.lock")).unwrap()).unwrap();
    assert_eq!(holder["pid"].as_u64(), Some(pid as u64), "{holder}");
    let (status, text) = job.run("out", &["--resume"], &[]);
    assert!(status.success(), "{text}");
    assert!(
        final_weights(&out) == final_weights(&job.out("reference")),
        "the resumed run's weights differ from the uninterrupted run's"
    );
}

// ---------------------------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------------------------

#[test]
fn a_run_that_cannot_write_its_checkpoint_names_the_file_and_resumes_from_the_one_before() {
    use std::os::unix::process::CommandExt;
    let job = Job::new("f32");
    job.reference();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_st-tune"));
    cmd.args(["train", "--config"])
        .arg(&job.config)
        .arg("--output")
        .arg(job.out("out"))
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "2")
        .env("ST_TUNE_CRASH_AT", "step:5:STOP")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec. An ignored SIGXFSZ turns
    // writes past the size limit into EFBIG errors, as ENOSPC would be on a full disk.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    wait_stopped(&mut child);
    // From now on no file of the run may grow past 4 KiB: the weights of step 6 cannot be
    // written (the tiny model's are about 25 KiB).
    let limit = libc::rlimit {
        rlim_cur: 4096,
        rlim_max: 4096,
    };
    // SAFETY: prlimit(2) on our own child, with a valid rlimit.
    let r = unsafe {
        libc::prlimit(
            child.id() as i32,
            libc::RLIMIT_FSIZE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
    let (status, text) = output(child);
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("error: ")
            && text.contains("weights.safetensors")
            && !text.contains("panicked"),
        "{text}"
    );
    let out = job.out("out");
    assert_eq!(checkpoints(&out), ["step-2", "step-4"]);
    let (status, text) = job.run("out", &["--resume"], &[]);
    assert!(status.success(), "{text}");
    assert!(
        text.contains("resuming after step 4") || text.contains("\"step\":4"),
        "{text}"
    );
    assert!(
        final_weights(&out) == final_weights(&job.out("reference")),
        "the resumed run's weights differ from the uninterrupted run's"
    );
}

//! `st-tune sweep` through the real binary, with tiny random models: trials are a function of
//! (file, index), each runs as its own process with its own folder and record, a rerun skips
//! what is finished and resumes what was stopped, OOM knowledge passes between trials, a trial
//! that cannot fit is infeasible and the sweep goes on, and bad sweep files are refused before
//! any trial runs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tempfile::TempDir;

struct Setup {
    dir: TempDir,
}

impl Setup {
    /// A tiny model, 24 scored rows (train and dev) and `base.toml` with `extra` lines in
    /// `[train]`.
    fn new(extra_train: &str) -> Self {
        let dir = TempDir::new().unwrap();
        common::tiny_model(&dir.path().join("model"), false, 1, 3);
        common::write_data(&dir.path().join("train.csv"), true);
        let base = format!(
            "[model]\npath = \"model\"\n[data]\ntrain = \"train.csv\"\ndev = \"train.csv\"\n\
             [train]\nloss = \"cosent\"\nmax_steps = 3\nbatch_size = 8\nlog_steps = 1\n{extra_train}\n"
        );
        std::fs::write(dir.path().join("base.toml"), base).unwrap();
        Setup { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `sweep.toml`: `[sweep]` with base and dir, then `body`.
    fn sweep(&self, sweep_keys: &str, space: &str) -> PathBuf {
        let text = format!(
            "[sweep]\nbase = \"base.toml\"\ndir = \"sweep-out\"\n{sweep_keys}\n[space]\n{space}\n"
        );
        let path = self.path("sweep.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// `st-tune ARGS` in the temporary folder (relative paths resolve there).
    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_st-tune"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env("HF_HUB_OFFLINE", "1")
            .env("RAYON_NUM_THREADS", "1")
            .env_remove("ST_TUNE_INJECT_OOM")
            .env_remove("ST_TUNE_CRASH_AT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let o = cmd.output().unwrap();
        Out {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    fn report(&self) -> Value {
        let r = self.run(&["sweep", "report", "sweep.toml", "--json"], &[]);
        r.ok();
        serde_json::from_str(r.stdout.trim()).unwrap()
    }

    fn trial_file(&self, index: usize, name: &str) -> PathBuf {
        self.path(&format!("sweep-out/trial-{index:04}/{name}"))
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Exit 2, no panic, and stderr names every needle.
    fn refused(&self, needles: &[&str]) {
        assert_eq!(
            self.code, 2,
            "stdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.starts_with("error: ") && !self.stderr.contains("panicked"),
            "{}",
            self.stderr
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "missing `{n}` in:\n{}",
                self.stderr
            );
        }
    }

    fn json_lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn a_grid_sweep_runs_every_combination_reports_best_first_and_a_rerun_skips_them() {
    let s = Setup::new("");
    s.sweep(
        "method = \"grid\"\nmetric = \"dev.spearman\"",
        "\"train.lr\" = [1e-4, 1e-3]\n\"train.batch_size\" = [4, 8]",
    );
    let listed = s.run(&["sweep", "list", "sweep.toml", "--json"], &[]);
    let listed = listed.ok().json_lines();
    let params: Vec<(u64, f64)> = listed
        .iter()
        .map(|t| {
            (
                t["params"]["train.batch_size"].as_u64().unwrap(),
                t["params"]["train.lr"].as_f64().unwrap(),
            )
        })
        .collect();
    // Keys in sorted order, the last changing fastest.
    assert_eq!(params, [(4, 1e-4), (4, 1e-3), (8, 1e-4), (8, 1e-3)]);
    assert!(listed
        .iter()
        .all(|t| t["planned_peak"].as_u64().unwrap() > 0));
    assert_eq!(listed[2]["micro_batch_size"], 8);

    s.run(&["sweep", "run", "sweep.toml"], &[]).ok();
    let report = s.report();
    let trials = report["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 4);
    assert!(trials.iter().all(|t| t["status"] == "complete"), "{report}");
    let metrics: Vec<f64> = trials
        .iter()
        .map(|t| t["metric"].as_f64().unwrap())
        .collect();
    assert!(
        metrics.windows(2).all(|w| w[0] >= w[1]),
        "best first: {metrics:?}"
    );
    assert_eq!(report["best"]["index"], trials[0]["index"]);
    assert!(
        report["plot"].as_str().unwrap().ends_with("sweep.png"),
        "the metric against each key: {report}"
    );
    assert!(s.path("sweep-out/sweep.png").exists());
    // The metric is the trial's own end-of-training evaluation.
    let i = trials[0]["index"].as_u64().unwrap() as usize;
    let after = lines(&s.trial_file(i, "metrics.jsonl"))
        .into_iter()
        .find(|l| l["label"] == "after")
        .unwrap();
    assert_eq!(after["spearman"], trials[0]["metric"]);
    // Each trial's config sets its keys and its own folder.
    let cfg: toml::Table = std::fs::read_to_string(s.trial_file(3, "config.toml"))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(cfg["train"]["batch_size"].as_integer(), Some(8));
    assert_eq!(cfg["train"]["lr"].as_float(), Some(1e-3));
    assert!(cfg["output"]["dir"]
        .as_str()
        .unwrap()
        .ends_with("trial-0003"));

    let before = std::fs::read(s.trial_file(0, "trial.json")).unwrap();
    s.run(&["sweep", "run", "sweep.toml"], &[]).ok();
    assert_eq!(
        std::fs::read(s.trial_file(0, "trial.json")).unwrap(),
        before,
        "a finished trial is not run again"
    );

    let export = s.path("best-model");
    s.run(
        &[
            "sweep",
            "report",
            "sweep.toml",
            "--export",
            export.to_str().unwrap(),
        ],
        &[],
    )
    .ok();
    assert!(export.join("model.safetensors").exists());
}

#[test]
fn random_trials_depend_only_on_the_file_and_the_index() {
    let s = Setup::new("");
    let space = "\"train.lr\" = { log_uniform = [1e-6, 1e-3] }\n\
                 \"train.warmup_ratio\" = { uniform = [0.0, 0.2] }\n\
                 \"train.seed\" = { int_uniform = [1, 1000] }\n\
                 \"train.loss\" = [\"cosent\", \"cosine\"]";
    let list = |trials: usize| {
        s.sweep(
            &format!("method = \"random\"\ntrials = {trials}\nseed = 7"),
            space,
        );
        s.run(&["sweep", "list", "sweep.toml", "--json"], &[])
            .ok()
            .json_lines()
    };
    let (five, three) = (list(5), list(3));
    assert_eq!(five.len(), 5);
    assert_eq!(
        &five[..3],
        &three[..],
        "trial N does not depend on the trial count"
    );
    for t in &five {
        let p = &t["params"];
        let lr = p["train.lr"].as_f64().unwrap();
        assert!((1e-6..=1e-3).contains(&lr), "{p}");
        let w = p["train.warmup_ratio"].as_f64().unwrap();
        assert!((0.0..0.2).contains(&w), "{p}");
        let seed = p["train.seed"].as_i64().unwrap();
        assert!((1..=1000).contains(&seed), "{p}");
    }
    let lrs: Vec<f64> = five
        .iter()
        .map(|t| t["params"]["train.lr"].as_f64().unwrap())
        .collect();
    assert!(
        lrs.windows(2).any(|w| w[0] != w[1]),
        "draws differ: {lrs:?}"
    );
}

#[test]
fn a_trial_that_cannot_fit_is_infeasible_and_the_sweep_goes_on() {
    let s = Setup::new("micro_batch_size = 4\n[memory]\nescalate = []");
    s.sweep(
        "",
        "\"memory.limit\" = [\"1KiB\", \"4GiB\"]\n\"train.lr\" = [1e-4, 1e-3]",
    );
    s.run(&["sweep", "run", "sweep.toml"], &[]).ok();
    let report = s.report();
    let status = |i: u64| {
        report["trials"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["index"] == i)
            .unwrap()
            .clone()
    };
    // Trials 0 and 1 have the 1 KiB limit: 0 ran out of memory at micro-batch 1, and 1 was
    // not even started (it shares 0's memory settings).
    assert_eq!(status(0)["status"], "infeasible", "{report}");
    assert_eq!(status(0)["exit_code"], 3);
    assert!(
        status(0)["message"].as_str().unwrap().contains("tokens"),
        "{report}"
    );
    assert_eq!(status(1)["status"], "infeasible");
    assert!(status(1)["exit_code"].is_null(), "not run: {report}");
    assert!(
        status(1)["message"].as_str().unwrap().contains("trial 0"),
        "{report}"
    );
    assert_eq!(status(2)["status"], "complete");
    assert_eq!(status(3)["status"], "complete");
    assert!(report["best"]["index"].as_u64().unwrap() >= 2);
}

#[test]
fn a_later_trial_starts_from_the_micro_batch_an_earlier_one_was_cut_to() {
    let s = Setup::new("micro_batch_size = 4");
    s.sweep("", "\"train.lr\" = [1e-4, 1e-3]");
    // Every trial meets one injected OOM in its first forward pass.
    s.run(
        &["sweep", "run", "sweep.toml"],
        &[("ST_TUNE_INJECT_OOM", "1:forward")],
    )
    .ok();
    let first_oom = |i: usize| {
        lines(&s.trial_file(i, "events.jsonl"))
            .into_iter()
            .find(|e| e["event"] == "oom")
            .unwrap()
    };
    assert_eq!(first_oom(0)["micro_before"], 4);
    assert_eq!(first_oom(0)["micro_after"], 2);
    assert_eq!(
        first_oom(1)["micro_before"],
        2,
        "trial 1 started from what trial 0 learned"
    );
    let memory: Value =
        serde_json::from_str(&std::fs::read_to_string(s.path("sweep-out/memory.json")).unwrap())
            .unwrap();
    let notes: Vec<&Value> = memory.as_object().unwrap().values().collect();
    assert_eq!(notes.len(), 1, "{memory}");
    assert_eq!(
        notes[0]["micro"], 1,
        "trial 1 was cut again, to 1: {memory}"
    );
}

#[test]
fn a_stopped_trial_resumes_from_its_checkpoint_and_a_dead_runner_is_taken_over() {
    let s = Setup::new("max_steps = 6\n[output]\ncheckpoint_steps = 2");
    let base = std::fs::read_to_string(s.path("base.toml"))
        .unwrap()
        .replace("max_steps = 3\n", "");
    std::fs::write(s.path("base.toml"), base).unwrap();
    s.sweep("", "\"train.lr\" = [1e-4, 1e-3]");
    // SIGTERM reaches trial 0 in step 3: it saves a checkpoint and stops, and so does the sweep.
    s.run(
        &["sweep", "run", "sweep.toml"],
        &[("ST_TUNE_CRASH_AT", "step:3:TERM")],
    )
    .ok();
    let report = s.report();
    assert_eq!(report["trials"][0]["status"], "interrupted", "{report}");
    assert_eq!(report["trials"][1]["status"], "pending", "{report}");
    assert!(report["best"].is_null());

    // Trial 1 looks like its runner died mid-trial (a node lost): "running", with a lock file
    // naming a process that no longer exists (the kernel released its lock when it died).
    let mut rec: Value =
        serde_json::from_str(&std::fs::read_to_string(s.trial_file(0, "trial.json")).unwrap())
            .unwrap();
    rec["index"] = 1.into();
    rec["status"] = "running".into();
    std::fs::create_dir_all(s.trial_file(1, "")).unwrap();
    std::fs::write(s.trial_file(1, "trial.json"), rec.to_string()).unwrap();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let holder = serde_json::json!({"pid": 999999999u32, "host": host.trim(),
                                    "command": "sweep run", "started_unix": 0});
    std::fs::write(s.trial_file(1, ".sweep.lock"), holder.to_string()).unwrap();

    s.run(&["sweep", "run", "sweep.toml"], &[]).ok();
    let report = s.report();
    assert!(
        report["trials"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] == "complete"),
        "{report}"
    );
    let resumed = lines(&s.trial_file(0, "events.jsonl"))
        .into_iter()
        .find(|e| e["event"] == "resume")
        .expect("trial 0 resumed from its checkpoint");
    assert!(resumed["step"].as_u64().unwrap() >= 3);
    let steps: Vec<u64> = lines(&s.trial_file(0, "metrics.jsonl"))
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    for lock in [".sweep.lock", ".train.lock"] {
        let file = std::fs::File::options()
            .write(true)
            .open(s.trial_file(1, lock))
            .unwrap();
        assert!(file.try_lock().is_ok(), "{lock} is released");
        assert_eq!(std::fs::read_to_string(s.trial_file(1, lock)).unwrap(), "");
    }
}

#[test]
fn one_trial_by_index_for_a_scheduler_and_an_index_out_of_range_is_refused() {
    let s = Setup::new("");
    s.sweep("", "\"train.lr\" = [1e-4, 1e-3, 1e-2]");
    let r = s.run(
        &["sweep", "run", "sweep.toml", "--trial", "2", "--json"],
        &[],
    );
    let line = &r.ok().json_lines()[0];
    assert_eq!(
        (line["index"].as_u64(), line["status"].as_str()),
        (Some(2), Some("complete"))
    );
    assert!(!s.trial_file(0, "trial.json").exists(), "only trial 2 ran");
    s.run(&["sweep", "run", "sweep.toml", "--trial", "3"], &[])
        .refused(&["sweep.toml", "3 trials", "0 to 2", "no trial 3"]);
}

#[test]
fn a_sweep_folder_made_by_another_sweep_file_is_refused_with_the_differences() {
    let s = Setup::new("");
    s.sweep("", "\"train.lr\" = [1e-4, 1e-3]");
    s.run(&["sweep", "run", "sweep.toml", "--trial", "0"], &[])
        .ok();
    s.sweep("", "\"train.lr\" = [1e-4, 5e-3]");
    s.run(&["sweep", "run", "sweep.toml"], &[]).refused(&[
        "sweep-out",
        "another sweep",
        "space.train.lr",
    ]);
}

#[test]
fn bad_sweep_files_are_refused_before_any_trial_runs_naming_the_key() {
    let s = Setup::new("");
    let check = |sweep_keys: &str, space: &str, needles: &[&str]| {
        s.sweep(sweep_keys, space);
        s.run(&["sweep", "run", "sweep.toml"], &[]).refused(needles);
        assert!(!s.path("sweep-out").exists(), "nothing written for {space}");
    };
    check(
        "",
        "\"train.lrr\" = [1e-4]",
        &["sweep.toml", "train.lrr", "train.lr"],
    );
    check(
        "",
        "\"train.batch_size\" = [\"big\"]",
        &["train.batch_size", "positive integer"],
    );
    check(
        "",
        "\"train.lr\" = []",
        &["space.\"train.lr\"", "empty list"],
    );
    check(
        "method = \"random\"\ntrials = 2",
        "\"train.lr\" = { log_uniform = [0.0, 1e-3] }",
        &["log_uniform", "above 0"],
    );
    check(
        "",
        "\"train.lr\" = { uniform = [1e-5, 1e-4] }",
        &["range", "method = \"random\""],
    );
    check(
        "method = \"bayes\"",
        "\"train.lr\" = [1e-4]",
        &["bayes", "\"tpe\""],
    );
    check(
        "method = \"tpe\"",
        "\"train.lr\" = [1e-4]",
        &["sweep.trials", "required"],
    );
    check(
        "",
        "\"train.lr\" = [1e-4]\n[prune]\nmethod = \"asha\"\nreduction = 1",
        &["prune.reduction", "at least 2"],
    );
    check(
        "metric = \"dev.accuracy\"",
        "\"train.lr\" = [1e-4]",
        &["dev.accuracy", "dev.spearman"],
    );
    check(
        "",
        "\"output.dir\" = [\"x\"]",
        &["output.dir", "set by the sweep"],
    );
    std::fs::write(
        s.path("sweep.toml"),
        "[sweep]\nbase = \"nope.toml\"\n[space]\n\"train.lr\" = [1e-4]\n",
    )
    .unwrap();
    s.run(&["sweep", "list", "sweep.toml"], &[]).refused(&[
        "sweep.toml",
        "sweep.base",
        "nope.toml",
    ]);
}

#[test]
fn the_median_pruner_stops_a_trial_worse_than_the_others_at_a_rung_and_keeps_its_model() {
    let s = Setup::new("max_steps = 6");
    let base = std::fs::read_to_string(s.path("base.toml"))
        .unwrap()
        .replace("max_steps = 3\n", "");
    std::fs::write(s.path("base.toml"), base).unwrap();
    // Rungs every 16 rows = every 2 steps of 8; one earlier trial is enough to compare with.
    s.sweep(
        "",
        "\"train.lr\" = [3e-3, 1e-5, 1e-2, 3e-5]\n\
         [prune]\nmethod = \"median\"\nmin_rows = 16\nmin_trials = 1",
    );
    s.run(&["sweep", "run", "sweep.toml"], &[]).ok();
    let report = s.report();
    let trials = report["trials"].as_array().unwrap();
    let pruned: Vec<&Value> = trials.iter().filter(|t| t["status"] == "pruned").collect();
    assert!(!pruned.is_empty(), "{report}");
    assert!(trials.iter().any(|t| t["status"] == "complete"), "{report}");

    // Every decision follows the rule, against the trials that ran before (one at a time).
    let rung = |k: u32, i: usize| -> Option<f64> {
        let path = s.path(&format!("sweep-out/rungs/rung-{k:02}-trial-{i:04}.json"));
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
        v["value"].as_f64()
    };
    for t in trials {
        let i = t["index"].as_u64().unwrap() as usize;
        let steps = lines(&s.trial_file(i, "metrics.jsonl"))
            .iter()
            .filter(|l| l.get("loss").is_some())
            .count();
        let last_rung = (0..3).rev().find(|&k| rung(k, i).is_some()).unwrap();
        let mine = rung(last_rung, i).unwrap();
        let below_median = |k: u32| {
            let mut earlier: Vec<f64> = (0..i).filter_map(|j| rung(k, j)).collect();
            earlier.sort_by(f64::total_cmp);
            let n = earlier.len();
            n > 0 && {
                let median = if n % 2 == 1 {
                    earlier[n / 2]
                } else {
                    (earlier[n / 2 - 1] + earlier[n / 2]) / 2.0
                };
                rung(k, i).unwrap() < median
            }
        };
        for k in 0..last_rung {
            assert!(
                !below_median(k),
                "trial {i} went on past rung {k}: {report}"
            );
        }
        if t["status"] == "pruned" {
            assert!(
                below_median(last_rung),
                "trial {i} pruned at rung {last_rung}: {report}"
            );
            assert_eq!(steps, 2 * (last_rung as usize + 1), "stopped at the rung");
            assert_eq!(t["metric"].as_f64(), Some(mine), "its metric is the rung's");
            assert!(
                s.trial_file(i, "final/model.safetensors").exists(),
                "model kept"
            );
            let events = lines(&s.trial_file(i, "events.jsonl"));
            assert!(events.iter().any(|e| e["event"] == "pruned"), "{events:?}");
        } else {
            assert_eq!(steps, 6, "trial {i} ran to the end: {report}");
            assert_eq!(last_rung, 2);
            assert!(!below_median(2), "{report}");
        }
    }
    assert_ne!(report["best"]["status"], "pruned");
}

#[test]
fn tpe_chooses_later_trials_from_the_finished_ones_reproducibly_one_at_a_time() {
    let s = Setup::new("");
    let space =
        "\"train.lr\" = { log_uniform = [1e-5, 1e-2] }\n\"train.loss\" = [\"cosent\", \"cosine\"]";
    let run = |dir: &str| {
        std::fs::write(
            s.path("sweep.toml"),
            format!(
                "[sweep]\nbase = \"base.toml\"\ndir = \"{dir}\"\nmethod = \"tpe\"\ntrials = 8\nseed = 3\n[space]\n{space}\n"
            ),
        )
        .unwrap();
        s.run(&["sweep", "run", "sweep.toml"], &[]).ok();
        s.report()
    };
    let listed = {
        s.sweep("method = \"tpe\"\ntrials = 8\nseed = 3", space);
        s.run(&["sweep", "list", "sweep.toml", "--json"], &[])
            .ok()
            .json_lines()
    };
    assert!(
        listed[..5].iter().all(|t| t["params"].is_object()),
        "random startup trials"
    );
    assert!(
        listed[5..].iter().all(|t| t["params"].is_null()),
        "chosen when they start"
    );

    let params = |report: &Value| -> Vec<(u64, String)> {
        let mut p: Vec<(u64, String)> = report["trials"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["index"].as_u64().unwrap(), t["params"].to_string()))
            .collect();
        p.sort();
        p
    };
    let (a, b) = (run("tpe-a"), run("tpe-b"));
    assert!(
        a["trials"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["status"] == "complete"),
        "{a}"
    );
    assert_eq!(params(&a), params(&b), "one at a time, the same trials");
    let lr = |t: &Value| t["params"]["train.lr"].as_f64().unwrap();
    assert!(a["trials"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| (1e-5..=1e-2).contains(&lr(t))));
}

#[test]
fn a_sweep_can_optimise_a_retrieval_figure_of_a_pairs_dev_file() {
    let s = Setup::new("");
    common::write_data(&s.path("pairs.csv"), false);
    let base = std::fs::read_to_string(s.path("base.toml"))
        .unwrap()
        .replace("\"train.csv\"", "\"pairs.csv\"")
        .replace("\"cosent\"", "\"mnrl\"");
    std::fs::write(s.path("base.toml"), base).unwrap();
    s.sweep("metric = \"dev.ndcg@10\"", "\"train.lr\" = [1e-4, 1e-2]");
    s.run(&["sweep", "run", "sweep.toml"], &[]).ok();
    let report = s.report();
    assert_eq!(report["metric"], "dev.ndcg@10");
    for t in report["trials"].as_array().unwrap() {
        assert_eq!(t["status"], "complete", "{report}");
        let i = t["index"].as_u64().unwrap() as usize;
        let after = lines(&s.trial_file(i, "metrics.jsonl"))
            .into_iter()
            .find(|l| l["label"] == "after")
            .unwrap();
        assert_eq!(after["ndcg@10"], t["metric"], "{after}");
    }
}

#[test]
fn a_trial_whose_steps_stay_non_finite_is_diverged_and_the_sweep_goes_on() {
    let s = Setup::new("max_nonfinite_steps = 2");
    s.sweep("", "\"train.lr\" = [1e-4, 1e-3]");
    // Every trial's gradients are NaN at steps 2 and 3: both stop there, exit 4.
    s.run(
        &["sweep", "run", "sweep.toml"],
        &[("ST_TUNE_INJECT_NONFINITE", "2,3")],
    )
    .ok();
    let report = s.report();
    for t in report["trials"].as_array().unwrap() {
        assert_eq!(t["status"], "diverged", "{report}");
        assert!(
            t["message"]
                .as_str()
                .is_some_and(|m| m.contains("train.lr")),
            "{report}"
        );
    }
    assert!(report["best"].is_null(), "{report}");
    assert!(
        !s.trial_file(0, "final").exists(),
        "a diverged trial saves nothing"
    );
}

#[test]
fn a_trial_another_process_holds_is_refused_naming_the_holder() {
    let s = Setup::new("");
    s.sweep("", "\"train.lr\" = [1e-4, 1e-3]");
    std::fs::create_dir_all(s.trial_file(1, "")).unwrap();
    let lock = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(s.trial_file(1, ".sweep.lock"))
        .unwrap();
    lock.try_lock().unwrap();
    let holder = serde_json::json!({"pid": std::process::id(), "host": "elsewhere",
                                    "command": "sweep run", "started_unix": 0});
    std::fs::write(s.trial_file(1, ".sweep.lock"), holder.to_string()).unwrap();
    let pid = format!("pid {}", std::process::id());
    s.run(&["sweep", "run", "sweep.toml", "--trial", "1"], &[])
        .refused(&["trial-0001", "in use", &pid, "elsewhere"]);
    // `sweep run` over all trials leaves it alone and runs the others.
    s.run(&["sweep", "run", "sweep.toml"], &[]).ok();
    let report = s.report();
    assert_eq!(report["trials"][0]["status"], "complete", "{report}");
    assert_eq!(report["trials"][1]["status"], "pending", "{report}");
    drop(lock);
}

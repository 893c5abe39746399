//! The OOM handler keeps the loss mathematically the same: a run with OOMs injected at several
//! steps and in every phase ends with the same weights as the same run without, for each loss.
//! "Same" is per tensor: max |Δw| / max |w| ≤ 1e-5 (f32, CPU).

mod common;

use std::path::Path;

use candle_core::Device;
use common::{max_relative_difference, weights, write_data};
use st_tune::config::Config;
use st_tune::train::{train, RunOptions, Summary};

fn run(dir: &Path, loss: &str, micro: usize, inject: Option<&str>, out: &str) -> Summary {
    let model = dir.join("model");
    let data = dir.join("train.csv");
    let toml = format!(
        "[model]\npath = {model:?}\n[data]\ntrain = {data:?}\n[train]\nloss = \"{loss}\"\nbatch_size = 16\n\
         micro_batch_size = {micro}\nmax_steps = 3\nlr = 1e-3\nwarmup_ratio = 0.0\n[memory]\nregrow_after = 1\n[output]\ndir = {:?}\n",
        dir.join(out)
    );
    let cfg = Config::from_toml(&toml, "test", &[]).unwrap();
    let opts = RunOptions {
        inject_oom: inject.map(str::to_string),
        ..Default::default()
    };
    train(&cfg, &opts).unwrap()
}

/// Every phase, at several steps (with regrow_after = 1 the micro-batch also grows back).
const FAULTS: &str = "1:forward,2:backward,2:optimizer,3:forward,3:backward";
const FAULT_COUNT: usize = 5;

fn same_weights_with_and_without_ooms(loss: &str, micro: usize) {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(&dir.path().join("model"), false, 2, 3);
    write_data(&dir.path().join("train.csv"), loss != "mnrl");
    let clean = run(dir.path(), loss, micro, None, "clean");
    let faulty = run(dir.path(), loss, micro, Some(FAULTS), "faulty");
    assert_eq!(clean.ooms_recovered, 0);
    assert_eq!(
        faulty.ooms_recovered, FAULT_COUNT,
        "every injected OOM is recovered"
    );
    let events = std::fs::read_to_string(dir.path().join("faulty/events.jsonl")).unwrap();
    assert_eq!(
        events
            .lines()
            .filter(|l| l.contains(r#""event":"oom""#))
            .count(),
        FAULT_COUNT,
        "each OOM is logged: {events}"
    );
    assert!((clean.final_loss - faulty.final_loss).abs() <= 1e-5 * clean.final_loss.abs().max(1.0));
    let (diff, name) =
        max_relative_difference(&dir.path().join("clean"), &dir.path().join("faulty"));
    assert!(
        diff <= 1e-5,
        "{loss}: weights differ after OOM retries: {name} by {diff}"
    );
    // Training did move the weights, so the comparison means something.
    let start =
        candle_core::safetensors::load(dir.path().join("model/model.safetensors"), &Device::Cpu)
            .unwrap();
    let end = weights(&dir.path().join("clean"));
    let name = "encoder.layer.0.output.dense.weight";
    let moved = common::max_abs_diff(&start[name], &end[name]);
    assert!(moved > 1e-4, "training moved the weights by {moved} only");
}

#[test]
fn cosine_loss_survives_ooms_with_identical_weights() {
    same_weights_with_and_without_ooms("cosine", 8);
}

#[test]
fn cosent_loss_survives_ooms_with_identical_weights() {
    same_weights_with_and_without_ooms("cosent", 8);
}

#[test]
fn mnrl_loss_survives_ooms_with_identical_weights() {
    same_weights_with_and_without_ooms("mnrl", 8);
}

#[test]
fn a_batch_cut_by_an_oom_matches_the_batch_in_one_pass() {
    // micro = batch: the clean run computes the coupled loss in one pass, the faulty run is cut
    // into micro-batches and switches to the cached scheme.
    same_weights_with_and_without_ooms("cosent", 16);
}

/// One row per pass, and an OOM at the first step: nothing left to halve.
fn run_at_the_floor(dir: &Path, escalate: &str) -> st_tune::Result<Summary> {
    let toml = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\n[train]\nloss = \"cosent\"\nbatch_size = 4\n\
         micro_batch_size = 1\nmax_steps = 2\n[memory]\nescalate = [{escalate}]\n[output]\ndir = {:?}\n",
        dir.join("model"),
        dir.join("train.csv"),
        dir.join("floor")
    );
    let cfg = Config::from_toml(&toml, "test", &[]).unwrap();
    let opts = RunOptions {
        inject_oom: Some("1:forward,1:backward".into()),
        ..Default::default()
    };
    train(&cfg, &opts)
}

#[test]
fn at_micro_batch_one_the_allowed_levers_are_pulled_in_order_and_the_run_finishes() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(&dir.path().join("model"), false, 2, 3);
    write_data(&dir.path().join("train.csv"), true);
    let s = run_at_the_floor(dir.path(), "\"gradient_checkpointing\", \"max_seq_length\"").unwrap();
    assert_eq!(s.steps, 2);
    let events = std::fs::read_to_string(dir.path().join("floor/events.jsonl")).unwrap();
    let levers: Vec<String> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "escalate")
        .map(|v| v["lever"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(levers, ["gradient_checkpointing", "max_seq_length"]);
}

#[test]
fn with_no_lever_left_the_run_stops_with_an_out_of_memory_error_and_saves() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(&dir.path().join("model"), false, 2, 3);
    write_data(&dir.path().join("train.csv"), true);
    let err = run_at_the_floor(dir.path(), "").unwrap_err();
    assert_eq!(err.exit_code(), 3);
    let msg = err.to_string();
    assert!(msg.contains("tokens") && msg.contains("Consider"), "{msg}");
    assert!(
        msg.contains("As configured (micro-batch 1 of") && msg.contains("a step needs about"),
        "names the memory the run needs: {msg}"
    );
    assert!(
        dir.path().join("floor/final/model.safetensors").exists(),
        "the last good state is saved"
    );
}

#[test]
fn a_repeated_run_in_the_same_folder_starts_from_the_micro_batch_known_to_fit() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(&dir.path().join("model"), false, 2, 3);
    write_data(&dir.path().join("train.csv"), true);
    let toml = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\n[train]\nloss = \"cosine\"\nbatch_size = 16\n\
         micro_batch_size = 16\nmax_steps = 1\nlog_steps = 1\n[output]\ncheckpoint_steps = 0\ndir = {:?}\n",
        dir.path().join("model"),
        dir.path().join("train.csv"),
        dir.path().join("out")
    );
    let cfg = Config::from_toml(&toml, "test", &[]).unwrap();
    let first = RunOptions {
        inject_oom: Some("1:forward".into()),
        ..Default::default()
    };
    assert_eq!(train(&cfg, &first).unwrap().final_micro_batch_size, 8);
    train(&cfg, &RunOptions::default()).unwrap();
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    let step: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!(step["micro_batch_size"], 8, "{metrics}");
}

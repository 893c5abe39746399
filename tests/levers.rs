//! Memory levers: gradient checkpointing gives the same gradients (and so the same weights) as
//! the ordinary backward pass; frozen tensors do not move; half precision trains.

mod common;

use std::path::Path;

use candle_core::Device;
use common::{max_relative_difference, weights, write_data};
use st_tune::config::Config;
use st_tune::train::{train, RunOptions, Summary};

fn run(dir: &Path, loss: &str, extra: &str, out: &str) -> Summary {
    run_with(dir, loss, extra, out, None)
}

fn run_with(dir: &Path, loss: &str, extra: &str, out: &str, inject: Option<&str>) -> Summary {
    let steps = if extra.contains("max_steps") {
        ""
    } else {
        "max_steps = 3\n"
    };
    let toml = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\n[train]\nloss = \"{loss}\"\nbatch_size = 8\n\
         lr = 1e-3\nwarmup_ratio = 0.0\n{steps}{extra}\n[output]\ndir = {:?}\n",
        dir.join("model"),
        dir.join("train.csv"),
        dir.join(out)
    );
    let opts = RunOptions {
        inject_oom: inject.map(str::to_string),
        ..Default::default()
    };
    train(&Config::from_toml(&toml, "test", &[]).unwrap(), &opts).unwrap()
}

fn setup(mpnet: bool, scored: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(&dir.path().join("model"), mpnet, 3, 11);
    write_data(&dir.path().join("train.csv"), scored);
    dir
}

fn checkpointing_changes_nothing(mpnet: bool, loss: &str, micro: usize) {
    let dir = setup(mpnet, loss != "mnrl");
    let plain = run(
        dir.path(),
        loss,
        &format!("micro_batch_size = {micro}"),
        "plain",
    );
    let ckpt = run(
        dir.path(),
        loss,
        &format!("micro_batch_size = {micro}\ngradient_checkpointing = true"),
        "ckpt",
    );
    assert!((plain.final_loss - ckpt.final_loss).abs() <= 1e-5 * plain.final_loss.abs().max(1.0));
    let (diff, name) = max_relative_difference(&dir.path().join("plain"), &dir.path().join("ckpt"));
    assert!(diff <= 1e-5, "checkpointing changed {name} by {diff}");
}

#[test]
fn gradient_checkpointing_gives_the_same_weights_for_bert_and_cosine() {
    checkpointing_changes_nothing(false, "cosine", 8);
}

#[test]
fn gradient_checkpointing_gives_the_same_weights_for_mpnet_and_mnrl_in_micro_batches() {
    checkpointing_changes_nothing(true, "mnrl", 4);
}

#[test]
fn checkpointing_with_ooms_cutting_the_batch_differently_in_each_pass_changes_nothing() {
    let dir = setup(true, true);
    run(dir.path(), "cosent", "micro_batch_size = 8", "plain");
    // An OOM in the backward pass of step 1 re-cuts the rows after the checkpoints were taken.
    let s = run_with(
        dir.path(),
        "cosent",
        "micro_batch_size = 8\ngradient_checkpointing = true",
        "ckpt",
        Some("1:backward,2:forward"),
    );
    assert_eq!(s.ooms_recovered, 2);
    let (diff, name) = max_relative_difference(&dir.path().join("plain"), &dir.path().join("ckpt"));
    assert!(diff <= 1e-5, "{name} differs by {diff}");
}

#[test]
fn frozen_layers_and_embeddings_do_not_move_and_the_rest_does() {
    let dir = setup(false, true);
    run(
        dir.path(),
        "cosent",
        "freeze_embeddings = true\nfreeze_layers = 2",
        "frozen",
    );
    let start =
        candle_core::safetensors::load(dir.path().join("model/model.safetensors"), &Device::Cpu)
            .unwrap();
    let end = weights(&dir.path().join("frozen"));
    for (name, t) in &start {
        let moved = common::max_abs_diff(t, &end[name]);
        let frozen = name.starts_with("embeddings.")
            || name.starts_with("encoder.layer.0.")
            || name.starts_with("encoder.layer.1.")
            || name.starts_with("pooler.");
        if frozen {
            assert_eq!(moved, 0.0, "{name} is frozen but moved");
        } else if !name.ends_with("key.bias") {
            assert!(moved > 0.0, "{name} trains but did not move");
        }
    }
}

#[test]
fn bf16_training_stays_close_to_f32() {
    let dir = setup(false, true);
    let full = run(dir.path(), "cosent", "", "f32");
    let half = run(dir.path(), "cosent", "precision = \"bf16\"", "bf16");
    // bf16 rounds activations to 8 bits of mantissa: after a few steps the weights agree with
    // f32 to a few percent, not to 1e-5.
    let (diff, name) = max_relative_difference(&dir.path().join("f32"), &dir.path().join("bf16"));
    assert!(diff < 0.1, "{name} differs from f32 by {diff}");
    assert!((half.final_loss - full.final_loss).abs() < 0.05 * full.final_loss.abs().max(1.0));
}

#[test]
fn f16_overflows_skip_the_step_and_shrink_the_loss_scale_until_training_proceeds() {
    let dir = setup(false, true);
    let f16 = run(
        dir.path(),
        "cosent",
        "precision = \"f16\"\nmax_steps = 24",
        "f16",
    );
    assert!(f16.final_loss.is_finite());
    let events = std::fs::read_to_string(dir.path().join("f16/events.jsonl")).unwrap();
    let skipped: Vec<f64> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "skipped_step")
        .map(|v| v["loss_scale"].as_f64().unwrap())
        .collect();
    // Starting at 2^16 the first steps overflow; each halves the scale, then updates go through.
    assert!(
        !skipped.is_empty() && skipped.len() < 24,
        "skipped {} of 24 steps",
        skipped.len()
    );
    assert!(
        skipped.windows(2).all(|w| w[1] == w[0] / 2.0),
        "scale halves each time: {skipped:?}"
    );
    let start =
        candle_core::safetensors::load(dir.path().join("model/model.safetensors"), &Device::Cpu)
            .unwrap();
    let end = weights(&dir.path().join("f16"));
    let name = "encoder.layer.2.output.dense.weight";
    let moved = common::max_abs_diff(&start[name], &end[name]);
    assert!(moved > 0.0, "f16 training updated the weights");
}

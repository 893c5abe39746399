//! Micro-batching is exact on the `cpu` engine in f32: a step cut into micro-batches of any
//! size, cut again by an OOM in any phase, or back-propagated layer by layer from checkpoints,
//! gives the uncut step's weights bit for bit. Every parameter gradient is summed token after
//! token into buffers that live for the whole step, and the loss of a coupled loss is taken
//! over the whole batch (the cached scheme), so no rounding depends on the cut.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{weights, write_data};
use st_tune::config::Config;
use st_tune::train::{train, RunOptions, Summary};

/// Every phase, at several steps (with regrow_after = 1 the micro-batch also grows back).
const FAULTS: &str = "1:forward,2:backward,2:optimizer,3:forward,3:backward";

fn run(dir: &Path, loss: &str, train_keys: &str, inject: Option<&str>, out: &str) -> Summary {
    let model = dir.join("model");
    let data = dir.join("train.csv");
    let toml = format!(
        "[model]\npath = {model:?}\n[data]\ntrain = {data:?}\n[train]\nloss = \"{loss}\"\nbatch_size = 16\n\
         max_steps = 3\nlr = 1e-3\nwarmup_ratio = 0.0\n{train_keys}\n[memory]\nregrow_after = 1\n[output]\ndir = {:?}\n",
        dir.join(out)
    );
    let cfg = Config::from_toml(&toml, "test", &[]).unwrap();
    let opts = RunOptions {
        inject_oom: inject.map(str::to_string),
        ..Default::default()
    };
    train(&cfg, &opts).unwrap()
}

/// The names of the tensors whose bits differ between two runs' final weights.
fn differing(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> Vec<String> {
    let bits = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f32::to_bits)
            .collect::<Vec<_>>()
    };
    let mut names: Vec<String> = a
        .iter()
        .filter(|(name, t)| bits(t) != bits(&b[*name]))
        .map(|(name, _)| name.clone())
        .collect();
    names.sort();
    names
}

fn same_bits_however_cut(mpnet: bool, loss: &str) {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(&dir.path().join("model"), mpnet, 2, 3);
    write_data(&dir.path().join("train.csv"), loss != "mnrl");
    let whole = run(dir.path(), loss, "micro_batch_size = 16", None, "whole");
    let reference = weights(&dir.path().join("whole"));
    let cuts = [
        ("micro5", "micro_batch_size = 5", None),
        ("micro4", "micro_batch_size = 4", None),
        (
            "ckpt16",
            "micro_batch_size = 16\ngradient_checkpointing = true",
            None,
        ),
        (
            "ckpt5",
            "micro_batch_size = 5\ngradient_checkpointing = true",
            None,
        ),
        ("ooms16", "micro_batch_size = 16", Some(FAULTS)),
        ("ooms8", "micro_batch_size = 8", Some(FAULTS)),
        (
            "ckpt_ooms",
            "micro_batch_size = 16\ngradient_checkpointing = true",
            Some(FAULTS),
        ),
    ];
    for (out, keys, inject) in cuts {
        let cut = run(dir.path(), loss, keys, inject, out);
        if inject.is_some() {
            assert_eq!(
                cut.ooms_recovered, 5,
                "{out}: every injected OOM is recovered"
            );
        }
        assert!(
            cut.final_loss.to_bits() == whole.final_loss.to_bits(),
            "{loss} {out}: loss {} against {}",
            cut.final_loss,
            whole.final_loss
        );
        let differ = differing(&reference, &weights(&dir.path().join(out)));
        assert!(differ.is_empty(), "{loss} {out}: other bits in {differ:?}");
    }
    // Training moved the weights, so the comparison means something.
    let start =
        candle_core::safetensors::load(dir.path().join("model/model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names = vec!["encoder.layer.0.output.dense.weight"];
    if mpnet {
        names.push("encoder.relative_attention_bias.weight");
    }
    for name in names {
        let moved = common::max_abs_diff(&start[name], &reference[name]);
        assert!(moved > 1e-4, "training moved {name} by {moved} only");
    }
}

#[test]
fn mnrl_steps_are_bit_exact_however_cut() {
    same_bits_however_cut(false, "mnrl");
}

#[test]
fn cosent_steps_are_bit_exact_however_cut() {
    same_bits_however_cut(false, "cosent");
}

/// MPNet's relative-attention-bias table, shared by every layer, is summed per layer and
/// bucket token after token too.
#[test]
fn mpnet_mnrl_steps_are_bit_exact_however_cut() {
    same_bits_however_cut(true, "mnrl");
}

#[test]
fn mpnet_cosent_steps_are_bit_exact_however_cut() {
    same_bits_however_cut(true, "cosent");
}

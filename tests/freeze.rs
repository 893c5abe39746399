//! `train.freeze_embeddings` and `train.freeze_layers` keep exactly the embedding layer and the
//! lowest layers of every family, whether the checkpoint names its tensors as
//! sentence-transformers saves them or under the architecture's prefix (`roberta.`,
//! `distilbert.`, ModernBERT's `model.`, ... as a masked-LM checkpoint does), and whatever else
//! it holds (a pooler, an LM head) stays as it was.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use common::max_abs_diff;

/// A family's model folder in `dir`, and the name root of its layers.
fn write_family(family: &str, dir: &Path) -> &'static str {
    match family {
        "bert" | "mpnet" => {
            common::tiny_model(dir, family == "mpnet", 2, 11);
            "encoder.layer"
        }
        _ => {
            let from = common::fixture(&format!("families/{family}/model"));
            copy_dir(&from, dir);
            match family {
                "distilbert" => "transformer.layer",
                "modernbert" => "layers",
                _ => "encoder.layer",
            }
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// Renames every tensor of `dir`'s checkpoint to `prefix` + name and adds an LM-head bias the
/// model never reads.
fn prefix_checkpoint(dir: &Path, prefix: &str) {
    let path = dir.join("model.safetensors");
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let mut out: HashMap<String, Tensor> = t
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect();
    out.insert(
        "lm_head.bias".into(),
        Tensor::ones(7, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&out, &path).unwrap();
}

/// Two steps through the real binary with the embeddings and the lowest layer frozen.
fn train_frozen(dir: &Path) {
    common::write_data(&dir.join("train.csv"), true);
    let toml = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\n[train]\nloss = \"cosent\"\nbatch_size = 8\n\
         lr = 1e-2\nwarmup_ratio = 0.0\nmax_steps = 2\nfreeze_embeddings = true\n\
         freeze_layers = 1\n[output]\ndir = {:?}\n",
        dir.join("model"),
        dir.join("train.csv"),
        dir.join("out")
    );
    std::fs::write(dir.join("run.toml"), toml).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_st-tune"))
        .env("CANDLE_NUM_THREADS", "1")
        .env_remove("ST_TUNE_INJECT_OOM")
        .args(["train", "--config"])
        .arg(dir.join("run.toml"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// Layer 1's eight linear and norm modules, two tensors each: what trains in the 2-layer
/// post-LN models.
const LAYER_1: usize = 16;

/// `trained`: how many tensors train (those above the lowest layer).
fn freezing_keeps_exactly_the_frozen_part(family: &str, prefix: &str, trained: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let layer = write_family(family, &dir.join("model"));
    prefix_checkpoint(&dir.join("model"), prefix);
    let start =
        candle_core::safetensors::load(dir.join("model/model.safetensors"), &Device::Cpu).unwrap();
    train_frozen(dir);
    let end = common::weights(&dir.join("out"));
    assert_eq!(start.len(), end.len(), "{family} {prefix:?}: tensors saved");
    let mut moved_count = 0;
    for (name, t) in &start {
        let local = name.strip_prefix(prefix).unwrap_or(name);
        let frozen = local.starts_with("embeddings.")
            || local.starts_with(&format!("{layer}.0."))
            || local.starts_with("encoder.relative_attention_bias")
            || local.starts_with("pooler.")
            || name.starts_with("lm_head.");
        let moved = max_abs_diff(t, &end[name]);
        if frozen {
            assert_eq!(
                moved, 0.0,
                "{family} {prefix:?}: {name} is frozen but moved"
            );
        } else {
            // The key bias's true gradient is 0 (softmax ignores a per-query constant).
            let key_bias = ["key.bias", "attn.k.bias", "k_lin.bias"];
            if !key_bias.iter().any(|k| name.ends_with(k)) {
                assert!(
                    moved > 0.0,
                    "{family} {prefix:?}: {name} trains but did not move"
                );
            }
            moved_count += 1;
        }
    }
    assert_eq!(
        moved_count, trained,
        "{family} {prefix:?}: tensors that trained"
    );
}

#[test]
fn freezing_keeps_bert_embeddings_and_lowest_layer_with_or_without_a_prefix() {
    freezing_keeps_exactly_the_frozen_part("bert", "", LAYER_1);
    freezing_keeps_exactly_the_frozen_part("bert", "bert.", LAYER_1);
}

#[test]
fn freezing_keeps_mpnet_embeddings_lowest_layer_and_shared_bias_with_or_without_a_prefix() {
    freezing_keeps_exactly_the_frozen_part("mpnet", "", LAYER_1);
    freezing_keeps_exactly_the_frozen_part("mpnet", "mpnet.", LAYER_1);
}

#[test]
fn freezing_keeps_xlm_roberta_embeddings_and_lowest_layer_with_or_without_a_prefix() {
    freezing_keeps_exactly_the_frozen_part("xlm-roberta", "", LAYER_1);
    freezing_keeps_exactly_the_frozen_part("xlm-roberta", "roberta.", LAYER_1);
}

#[test]
fn freezing_keeps_distilbert_embeddings_and_lowest_layer_with_or_without_a_prefix() {
    freezing_keeps_exactly_the_frozen_part("distilbert", "", LAYER_1);
    freezing_keeps_exactly_the_frozen_part("distilbert", "distilbert.", LAYER_1);
}

#[test]
fn freezing_keeps_modernbert_embeddings_and_lowest_layer_with_or_without_a_prefix() {
    // Layers 1 and 2 (attention norm, q|k|v, output, MLP norm, Wi, Wo; no biases) and the
    // final norm, which the last layer carries. "model." is ModernBertForMaskedLM's prefix.
    freezing_keeps_exactly_the_frozen_part("modernbert", "", 13);
    freezing_keeps_exactly_the_frozen_part("modernbert", "model.", 13);
}

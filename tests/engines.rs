//! The portable engine (candle ops, what CUDA runs) against the CPU engine (st-tune's kernels),
//! both on CPU: the same loss and every parameter gradient for the real MiniLM and MPNet, and
//! the same weights after training with every memory lever, through the real binary and
//! `ST_TUNE_ENGINE`.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, max_abs_diff, max_relative_difference, real_model, write_data};
use st_tune::engine::Engine;
use st_tune::model::dropout::Dropout;
use st_tune::model::weights::Freeze;
use st_tune::model::SentenceModel;

const TEXTS: [&str; 4] = [
    "A man is playing a guitar.",
    "The new movie is awesome, everyone says so, and the reviews agree on it.",
    "A plane is taking off.",
    "Cats",
];

/// The loss (a random functional of the embeddings, dropout on) and every trainable tensor's
/// gradient, with the layers on `engine`.
fn loss_and_grads(
    model: &SentenceModel,
    engine: Engine,
    dtype: DType,
) -> (f32, Vec<(String, Tensor)>) {
    let net = model
        .build(&model.params, dtype)
        .unwrap()
        .with_engine(engine);
    let batch = model.batch(&TEXTS).unwrap();
    let drop = Dropout::train(0.1, 0.1, 5, 2, (0..TEXTS.len() as u64).collect());
    let emb = net.forward(&batch, &drop).unwrap();
    // Fixed values, the same for both engines, each output element weighted differently.
    let probe = Tensor::arange(0f32, emb.elem_count() as f32, &Device::Cpu)
        .unwrap()
        .reshape(emb.shape())
        .unwrap()
        .sin()
        .unwrap();
    let loss = (emb * probe).unwrap().sum_all().unwrap();
    let store = net.backward(&loss).unwrap();
    let grads = model
        .params
        .vars
        .iter()
        .map(|(name, v)| {
            let g = store
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient on {engine:?}"));
            (name.clone(), g.clone())
        })
        .collect();
    (loss.to_scalar::<f32>().unwrap(), grads)
}

fn same_loss_and_gradients(name: &str, dtype: DType, tol: f32) {
    let model = SentenceModel::load(
        real_model(name).to_str().unwrap(),
        &Device::Cpu,
        Some(Freeze::default()),
    )
    .unwrap();
    let (lc, gc) = loss_and_grads(&model, Engine::Cpu, dtype);
    let (lp, gp) = loss_and_grads(&model, Engine::Portable, dtype);
    assert!(
        (lc - lp).abs() <= tol * lc.abs().max(1.0),
        "{name} {dtype:?}: loss {lc} on cpu, {lp} on portable"
    );
    assert_eq!(gc.len(), model.params.vars.len());
    let by_name: std::collections::HashMap<&str, &Tensor> =
        gc.iter().map(|(n, g)| (n.as_str(), g)).collect();
    let mut worst = (0f32, String::new());
    for ((n, a), (_, b)) in gc.iter().zip(&gp) {
        // Relative to the tensor's largest gradient: a sum of many products. The attention key
        // bias adds the same q·b to every score of a query, which softmax ignores: its true
        // gradient is 0 and both engines give rounding noise, so it is measured against the
        // query bias's gradient instead.
        let like = n
            .replace("key.bias", "query.bias")
            .replace("attn.k.bias", "attn.q.bias");
        let d = max_abs_diff(a, b) / max_abs(by_name[like.as_str()]).max(1e-12);
        if d > worst.0 {
            worst = (d, n.clone());
        }
    }
    eprintln!(
        "{name} {dtype:?}: largest difference {} in {}",
        worst.0, worst.1
    );
    assert!(
        worst.0 <= tol,
        "{name} {dtype:?}: gradient of {} differs by {}",
        worst.1,
        worst.0
    );
}

#[test]
fn minilm_has_the_same_loss_and_gradients_on_both_engines_in_f32() {
    same_loss_and_gradients("all-MiniLM-L6-v2", DType::F32, 1e-5);
}

/// 12 layers: the engines differ in GELU's erf (the CPU kernels use the Abramowitz-Stegun
/// approximation PyTorch's CPU kernels use, within 5e-7; candle's `erf` is exact to f32) and in
/// the order of their sums, and over 12 layers that reaches 1.4e-5 (measured; MiniLM 6e-6).
#[test]
fn mpnet_has_the_same_loss_and_gradients_on_both_engines_in_f32() {
    same_loss_and_gradients("all-mpnet-base-v2", DType::F32, 3e-5);
}

/// bf16 rounds every kept activation to 8 bits: the two engines' f32 sums can round to
/// neighbouring values, so they agree to bf16's precision, not to 1e-5.
#[test]
fn minilm_and_mpnet_stay_close_on_both_engines_in_bf16() {
    same_loss_and_gradients("all-MiniLM-L6-v2", DType::BF16, 0.05);
    same_loss_and_gradients("all-mpnet-base-v2", DType::BF16, 0.05);
}

/// Trains with `st-tune train` on `engine` (`cpu`, `portable`, `cpu-none`: the CPU kernels
/// with every instruction-set extension off, or `cpu-avx2`: AVX-512 off); returns the run's
/// summary.
fn train(dir: &Path, engine: &str, loss: &str, extra: &[&str], out: &str) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_st-tune"));
    let (engine_var, features) = match engine.split_once('-') {
        Some((e, features)) => (e, features),
        None => (engine, "detect"),
    };
    cmd.env("ST_TUNE_ENGINE", engine_var)
        .env("ST_TUNE_CPU_FEATURES", features)
        .env("CANDLE_NUM_THREADS", "1")
        .env_remove("ST_TUNE_INJECT_OOM");
    let toml = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\n[train]\nloss = \"{loss}\"\nbatch_size = 8\n\
         lr = 1e-3\nwarmup_ratio = 0.0\nmax_steps = 3\n[output]\ndir = {:?}\n",
        dir.join("model"),
        dir.join("train.csv"),
        dir.join(out)
    );
    let config = dir.join(format!("{out}.toml"));
    std::fs::write(&config, toml).unwrap();
    cmd.arg("train").arg("--config").arg(&config).arg("--json");
    for e in extra {
        if let Some(spec) = e.strip_prefix("inject=") {
            cmd.env("ST_TUNE_INJECT_OOM", spec);
        } else {
            cmd.args(["--set", e]);
        }
    }
    let run = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{engine} {extra:?}: {}\n{stdout}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .expect("a summary line");
    summary["data"].clone()
}

/// Every lever trains to the same weights on both engines (3 steps, f32).
fn same_weights_with(mpnet: bool, loss: &str, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(&dir.path().join("model"), mpnet, 3, 11);
    write_data(&dir.path().join("train.csv"), loss != "mnrl");
    let cpu = train(dir.path(), "cpu", loss, extra, "cpu");
    let portable = train(dir.path(), "portable", loss, extra, "portable");
    assert!(cpu["engine"].as_str().unwrap().starts_with("cpu"));
    assert_eq!(portable["engine"], "portable on cpu");
    let (a, b) = (
        cpu["final_loss"].as_f64().unwrap(),
        portable["final_loss"].as_f64().unwrap(),
    );
    assert!(
        (a - b).abs() <= 1e-5 * a.abs().max(1.0),
        "{extra:?}: loss {a} vs {b}"
    );
    let (diff, name) =
        max_relative_difference(&dir.path().join("cpu"), &dir.path().join("portable"));
    assert!(diff <= 1e-5, "{extra:?}: {name} differs by {diff}");
}

#[test]
fn bert_trains_to_the_same_weights_on_both_engines_with_micro_batches_and_checkpointing() {
    same_weights_with(false, "cosent", &["train.micro_batch_size=3"]);
    same_weights_with(
        false,
        "cosent",
        &[
            "train.micro_batch_size=4",
            "train.gradient_checkpointing=true",
        ],
    );
}

#[test]
fn mpnet_trains_to_the_same_weights_on_both_engines_with_mnrl_freezing_and_matryoshka() {
    same_weights_with(true, "mnrl", &["train.micro_batch_size=4"]);
    same_weights_with(
        true,
        "cosent",
        &["train.freeze_layers=1", "train.freeze_embeddings=true"],
    );
    same_weights_with(true, "cosent", &["train.matryoshka_dims=[16, 8]"]);
}

#[test]
fn injected_ooms_in_each_phase_change_nothing_on_the_portable_engine() {
    same_weights_with(
        false,
        "cosent",
        &[
            "train.micro_batch_size=8",
            "train.gradient_checkpointing=true",
            "inject=1:backward,2:forward",
        ],
    );
    same_weights_with(
        true,
        "mnrl",
        &[
            "train.micro_batch_size=8",
            "inject=1:forward,2:backward,3:optimizer",
        ],
    );
}

/// `ST_TUNE_CPU_FEATURES=none`: the gemm crate's forward product, scalar GELU, exp, dropout
/// masks and AdamW, on any machine; `avx2`: the AVX2 kernels (vmath, masks,
/// AdamW) on any AVX2 machine. The same training as the machine's own kernels.
#[test]
fn the_cpu_kernels_portable_and_avx2_fallbacks_train_to_the_same_weights() {
    for (mpnet, loss) in [(false, "cosent"), (true, "mnrl")] {
        let dir = tempfile::tempdir().unwrap();
        common::tiny_model(&dir.path().join("model"), mpnet, 3, 11);
        write_data(&dir.path().join("train.csv"), loss != "mnrl");
        let fast = train(dir.path(), "cpu", loss, &["train.precision=f32"], "fast");
        for features in ["none", "avx2"] {
            let engine = format!("cpu-{features}");
            let plain = train(
                dir.path(),
                &engine,
                loss,
                &["train.precision=f32"],
                features,
            );
            if features == "none" {
                assert_eq!(plain["engine"], "cpu (portable)");
            }
            let (a, b) = (
                fast["final_loss"].as_f64().unwrap(),
                plain["final_loss"].as_f64().unwrap(),
            );
            assert!(
                (a - b).abs() <= 1e-5 * a.abs().max(1.0),
                "{features}: loss {a} vs {b}"
            );
            let (diff, name) =
                max_relative_difference(&dir.path().join("fast"), &dir.path().join(features));
            assert!(diff <= 1e-5, "{features}: {name} differs by {diff}");
        }
    }
}

#[test]
fn an_unknown_engine_is_refused_with_the_variable_named() {
    let run = Command::new(env!("CARGO_BIN_EXE_st-tune"))
        .env("ST_TUNE_ENGINE", "gpu-magic")
        .args(["config", "--defaults"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(2));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("ST_TUNE_ENGINE") && err.contains("portable"),
        "{err}"
    );
}

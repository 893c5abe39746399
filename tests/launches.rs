//! `st-tune bench launches`: the tensor ops of one optimizer step are really counted. The
//! counter sees each tensor made and the planned-kernel regions apart; through the binary, the
//! portable engine makes fewer than the composed layers, the planned `cuda` kernels fewer still,
//! and each added layer adds the same number of ops to every path.

mod common;

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use common::tiny_model;
use serde_json::Value;
use st_tune::engine::launches::{count, planned_kernel, Counted};

/// candle's tensor numbers are global: the tests here take turns, so that one's tensors (the
/// tiny models' weights) do not fall inside the other's count.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn the_counter_sees_each_tensor_made_and_the_planned_regions_apart() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let x = Tensor::ones(4, DType::F32, &Device::Cpu).unwrap();
    let ((), c) = count(|| {
        let y = (&x + 1.0)?; // affine: 1
        let _z = y.reshape((2, 2))?; // a view: 1
        let _same = y.to_dtype(DType::F32)?; // the tensor itself: 0
                                             // sqr: 1; sum_all: a sum, then a reshape to 0-d: 2.
        planned_kernel(|| Ok(y.sqr()?.sum_all()?))?;
        Ok(())
    })
    .unwrap();
    let want = Counted {
        tensors: 5,
        in_regions: 3,
        regions: 1,
    };
    assert_eq!(c, want);
    assert_eq!(c.with_planned_kernels(), 3);
}

/// The binary's JSON count for a tiny BERT of `layers` layers, 4 pairs of 8 tokens.
fn launches(dir: &Path, layers: usize) -> Value {
    let model = dir.join(format!("bert{layers}"));
    tiny_model(&model, false, layers, 3);
    let config = dir.join(format!("run{layers}.toml"));
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n\n[train]\nloss = \"cosent\"\nbatch_size = 4\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_st-tune"))
        .args(["bench", "launches", "--seq", "8", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// (composed, portable, portable with the planned kernels) of one count.
fn paths(v: &Value) -> [i64; 3] {
    let n = |path: &str, key: &str| v[path][key].as_i64().unwrap();
    let total = |path: &str| n(path, "tensors") + n(path, "grad_norm");
    let planned =
        total("portable") - n("portable", "in_planned_kernels") + n("portable", "planned_kernels");
    [total("composed"), total("portable"), planned]
}

#[test]
fn the_portable_engine_issues_fewer_ops_than_composed_layers_and_each_layer_adds_the_same() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let counts: Vec<[i64; 3]> = (1..=3).map(|l| paths(&launches(dir.path(), l))).collect();
    for [composed, portable, planned] in &counts {
        assert!(
            composed > portable && portable > planned && *planned > 0,
            "{counts:?}"
        );
    }
    for path in 0..3 {
        let (one, two, three) = (counts[0][path], counts[1][path], counts[2][path]);
        assert!(two > one, "path {path}: {counts:?}");
        assert_eq!(three - two, two - one, "path {path}: {counts:?}");
    }
}

/// ModernBERT has no composed form to count against: refused by name, not counted as one.
#[test]
fn a_modernbert_model_is_refused_naming_its_type() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::fixture("families/modernbert/model");
    let config = dir.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\npath = {:?}\n\n[train]\nloss = \"cosent\"\nbatch_size = 4\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_st-tune"))
        .args(["bench", "launches", "--seq", "8", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("modernbert") && stderr.contains("post-LN"),
        "{stderr}"
    );
}

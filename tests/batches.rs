//! Duplicate-free batches (`train.batch_sampler = "no_duplicates"`, the default for mnrl) in a
//! real run over a file of repeated positives: epochs of uneven batch counts, and a run stopped
//! after every step and resumed ends with the same weights, bit for bit, as the run never
//! stopped.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicI32;
use std::sync::Arc;

use st_tune::config::Config;
use st_tune::train::{train, RunOptions};

/// 22 (anchor, positive) rows over 5 positives: batches of 4 with no text twice.
fn config(dir: &Path, out: &str) -> Config {
    let mut csv = String::from("anchor,positive\n");
    for i in 0..22 {
        csv.push_str(&format!("a man is playing {i},the dog {}\n", i % 5));
    }
    let data = dir.join("pairs.csv");
    std::fs::write(&data, csv).unwrap();
    let model = common::fixture("pooling/model");
    let sets = [
        format!("model.path={}", model.display()),
        format!("data.train={}", data.display()),
        "train.loss=mnrl".into(),
        "train.batch_size=4".into(),
        "train.epochs=3".into(),
        "train.lr=1e-3".into(),
        "train.seed=9".into(),
        format!("output.dir={}", dir.join(out).display()),
        "output.checkpoint_steps=0".into(),
    ];
    Config::from_toml("", "test", &sets).unwrap()
}

#[test]
fn a_no_duplicates_run_resumed_after_every_step_ends_bit_for_bit_as_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let whole = train(&config(tmp.path(), "whole"), &RunOptions::default()).unwrap();
    // 22 rows in batches of at most 4: 6 steps an epoch with plain batches, more where only
    // rows with the same positive are left at the end of an epoch (19 with this seed).
    assert!(whole.steps > 18, "{} steps", whole.steps);

    let cfg = config(tmp.path(), "stepwise");
    let mut runs = 0;
    let stepwise = loop {
        runs += 1;
        assert!(runs <= whole.steps + 1, "does not finish");
        // SIGINT already raised: each run does one step, checkpoints and stops.
        let opts = RunOptions {
            resume: true,
            interrupt: Arc::new(AtomicI32::new(2)),
            ..RunOptions::default()
        };
        match train(&cfg, &opts) {
            Ok(summary) => break summary,
            Err(st_tune::Error::Interrupted { .. }) => continue,
            Err(e) => panic!("run {runs}: {e}"),
        }
    };
    assert_eq!(stepwise.steps, whole.steps);
    let weights =
        |out: &str| std::fs::read(tmp.path().join(out).join("final/model.safetensors")).unwrap();
    assert!(
        weights("stepwise") == weights("whole"),
        "resumed run differs"
    );
}

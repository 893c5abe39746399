//! The CPU memory budget: going over `memory.limit` (measured by the counting allocator) is
//! handled exactly like a CUDA OOM. One test in its own binary, so no other test's allocations
//! share the process while it measures.

mod common;

use std::path::Path;

use st_tune::config::Config;
use st_tune::train::{train, RunOptions, Summary};

fn run(dir: &Path, micro: usize, limit: Option<u64>, out: &str) -> Summary {
    let mut data = String::from("sentence1,sentence2,score\n");
    for i in 0..32 {
        let words = [
            "the cat sat on the mat",
            "a man is playing guitar",
            "big red dog runs fast",
            "blue plane",
        ];
        let a = words[i % 4].repeat(1 + i % 3);
        data.push_str(&format!(
            "{a},{},{}\n",
            words[(i + 1) % 4],
            (i % 5) as f32 / 4.0
        ));
    }
    std::fs::write(dir.join("train.csv"), data).unwrap();
    let limit = limit
        .map(|l| format!("[memory]\nlimit = \"{l}B\"\n"))
        .unwrap_or_default();
    let toml = format!(
        "[model]\npath = {:?}\n[data]\ntrain = {:?}\n[train]\nloss = \"cosine\"\nbatch_size = 32\n\
         micro_batch_size = {micro}\nmax_steps = 2\n{limit}[output]\ndir = {:?}\n",
        dir.join("model"),
        dir.join("train.csv"),
        dir.join(out)
    );
    train(
        &Config::from_toml(&toml, "test", &[]).unwrap(),
        &RunOptions::default(),
    )
    .unwrap()
}

#[test]
fn going_over_the_cpu_memory_limit_halves_the_micro_batch_and_the_run_finishes() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(&dir.path().join("model"), false, 2, 5);
    let big = run(dir.path(), 32, None, "big");
    let small = run(dir.path(), 4, None, "small");
    eprintln!(
        "peak with micro 32: {} B, with micro 4: {} B",
        big.peak_memory, small.peak_memory
    );
    assert!(big.peak_memory > small.peak_memory);
    let limit = (big.peak_memory + small.peak_memory) / 2;
    let limited = run(dir.path(), 32, Some(limit), "limited");
    assert!(
        limited.ooms_recovered >= 1,
        "the limit forced at least one retry"
    );
    assert!(limited.final_micro_batch_size < 32);
    assert!(
        limited.peak_memory <= limit,
        "the micro-batches that succeeded peaked at {}, above the limit {limit}",
        limited.peak_memory
    );
    assert!((limited.final_loss - big.final_loss).abs() <= 1e-5 * big.final_loss.abs().max(1.0));
}

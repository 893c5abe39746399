//! The attention kernel recomputes scores, softmax and dropout masks in the backward pass, so the
//! memory a training step needs depends on how many tokens it holds, not on the square of its
//! rows' length (docs/memory.md). One test in its own binary: it measures with the counting
//! allocator, which other tests' allocations would disturb.

mod common;

use candle_core::Device;
use st_tune::config::{LossKind, MicroBatch, TrainSection};
use st_tune::model::weights::Freeze;
use st_tune::model::SentenceModel;
use st_tune::train::measure::measure_step;

/// Bytes a CoSENT step of `rows` pairs of `seq` tokens adds to the heap at its peak.
fn step_bytes(model: &mut SentenceModel, rows: usize, seq: usize) -> u64 {
    model.set_max_seq_length(seq).unwrap();
    let t = TrainSection {
        loss: LossKind::Cosent,
        batch_size: rows,
        micro_batch_size: Some(MicroBatch::Size(rows)),
        ..TrainSection::default()
    };
    let m = measure_step(model, &t, seq).unwrap();
    m.peak_bytes - m.baseline_bytes
}

#[test]
fn a_steps_memory_follows_its_tokens_not_the_square_of_its_row_length() {
    let dir = common::real_model("all-MiniLM-L6-v2");
    let everything = Freeze {
        embeddings: false,
        layers: 0,
    };
    let mut model =
        SentenceModel::load(dir.to_str().unwrap(), &Device::Cpu, Some(everything)).unwrap();
    // 1024 tokens per text column either way. With the composed attention, which keeps each
    // row's (12 heads, len, len) scores, probabilities and masks, the long rows measured 1.73×
    // the short ones' memory (0.85 GB against 1.47 GB); with the kernel, 1.00×.
    let short = step_bytes(&mut model, 32, 32);
    let long = step_bytes(&mut model, 8, 128);
    eprintln!("step memory: 32 rows of 32 tokens {short} B, 8 rows of 128 tokens {long} B");
    let ratio = long as f64 / short as f64;
    assert!(
        (0.9..1.1).contains(&ratio),
        "rows 4× longer at the same token count need {ratio:.2}× the memory"
    );
}

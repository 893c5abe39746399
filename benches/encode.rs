//! Encode throughput of a model on a text file (one text per line), median of 3 runs.
//! A plain timing harness (no criterion): figures go to docs/benchmarks.md, not into tests.
//!
//! cargo bench --bench encode -- MODEL_DIR TEXTS.txt [BATCH]

use std::time::Instant;

use candle_core::Device;
use st_tune::model::SentenceModel;

fn main() -> Result<(), st_tune::Error> {
    let args: Vec<String> = std::env::args().filter(|a| a != "--bench").collect();
    let (Some(model), Some(texts)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: cargo bench --bench encode -- MODEL_DIR TEXTS.txt [BATCH]");
        std::process::exit(2);
    };
    let batch: usize = args.get(3).and_then(|b| b.parse().ok()).unwrap_or(32);
    let text = std::fs::read_to_string(texts).map_err(|e| st_tune::Error::io(texts, e))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let model = SentenceModel::load(model, &Device::Cpu, None)?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        model.encode(&lines, batch)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let peak = st_tune::memory::alloc::peak() as f64 / (1u64 << 20) as f64;
    println!(
        "{} texts, batch {batch}: median {:.2} s = {:.1} sentences/s; peak heap {peak:.0} MiB",
        lines.len(),
        times[1],
        lines.len() as f64 / times[1]
    );
    Ok(())
}

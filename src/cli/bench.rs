//! `st-tune bench memory`: peak memory and step time of one training step under each memory
//! lever alone and combined, on synthetic rows of exact lengths (docs/memory.md).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde::Serialize;

use crate::config::{Config, MicroBatch, Precision};
use crate::error::Result;
use crate::memory::human_bytes;
use crate::memory::plan::estimate;
use crate::model::weights::Freeze;
use crate::model::SentenceModel;
use crate::train::measure::{measure_step, StepMeasure};

/// Measure what a training step costs.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchWhat,
}

#[derive(Debug, Subcommand)]
pub enum BenchWhat {
    /// Peak memory and time of one step under each lever (f32, bf16, f16, freezing half the
    /// layers, gradient checkpointing, all combined), at each sequence length.
    Memory(MemoryArgs),
}

#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// The run's TOML config (model, loss, batch size; data is not read).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override a config key, as for `train`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Sequence lengths to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "128,256")]
    pub seq: Vec<usize>,
    /// Which levers to measure, comma separated, from: f32, bf16, f16, freeze, ckpt, all.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f32,bf16,f16,freeze,ckpt,all"
    )]
    pub levers: Vec<String>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Row {
    lever: &'static str,
    seq: usize,
    batch: usize,
    #[serde(flatten)]
    m: StepMeasure,
    estimated_bytes: u64,
}

pub fn run(a: BenchArgs) -> Result<()> {
    let BenchWhat::Memory(a) = a.what;
    let cfg = Config::load(&a.config, &a.set)?;
    let device = crate::device::parse(&cfg.model.device)?;
    let layers = SentenceModel::load(&cfg.model.path, &device, None)?.num_layers();
    let half = layers / 2;
    let all: [(&str, &str, Precision, usize, bool); 6] = [
        ("f32", "f32 (baseline)", Precision::F32, 0, false),
        ("bf16", "bf16", Precision::Bf16, 0, false),
        ("f16", "f16", Precision::F16, 0, false),
        (
            "freeze",
            "freeze half the layers",
            Precision::F32,
            half,
            false,
        ),
        ("ckpt", "gradient checkpointing", Precision::F32, 0, true),
        (
            "all",
            "bf16 + freeze half + checkpointing",
            Precision::Bf16,
            half,
            true,
        ),
    ];
    let levers: Vec<_> = all
        .iter()
        .filter(|l| a.levers.iter().any(|k| k == l.0))
        .map(|&(_, name, p, f, c)| (name, p, f, c))
        .collect();
    if !a.json {
        println!(
            "model {}, batch {}, loss {}\n",
            cfg.model.path, cfg.train.batch_size, cfg.train.loss
        );
        println!("| lever | seq | peak memory | vs f32 | estimated (plan) | estimate error | step time | vs f32 |");
        println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    }
    for &seq in &a.seq {
        let mut base: Option<StepMeasure> = None;
        for &(name, precision, freeze_layers, ckpt) in &levers {
            let mut t = cfg.train.clone();
            t.precision = precision;
            t.gradient_checkpointing = ckpt;
            t.freeze_layers = freeze_layers;
            t.freeze_embeddings = Some(freeze_layers > 0);
            t.micro_batch_size = Some(MicroBatch::Size(t.batch_size));
            let freeze = Freeze {
                embeddings: freeze_layers > 0,
                layers: freeze_layers,
            };
            let mut model = SentenceModel::load(&cfg.model.path, &device, Some(freeze))?;
            model.set_max_seq_length(seq)?;
            let est = estimate(&model.plan_input(&t, 2)?, &vec![seq; t.batch_size]).total;
            // The planner's use: a step that cannot fit in this machine's memory is not tried.
            if device.is_cpu() && est > crate::memory::available_memory() / 10 * 9 {
                println!("| {name} | {seq} | skipped: estimated {} > 90 % of the {} available | | | | | |",
                    human_bytes(est), human_bytes(crate::memory::available_memory()));
                continue;
            }
            let m = measure_step(&model, &t, seq)?;
            drop(model);
            let b = *base.get_or_insert(m);
            if a.json {
                let row = Row {
                    lever: name,
                    seq,
                    batch: t.batch_size,
                    m,
                    estimated_bytes: est,
                };
                println!("{}", serde_json::to_string(&row).expect("plain struct"));
            } else {
                println!(
                    "| {name} | {seq} | {} | {:+.0} % | {} | {:+.0} % | {:.2} s | {:+.0} % |",
                    human_bytes(m.peak_bytes),
                    100.0 * (m.peak_bytes as f64 / b.peak_bytes as f64 - 1.0),
                    human_bytes(est),
                    100.0 * (est as f64 / m.peak_bytes as f64 - 1.0),
                    m.seconds,
                    100.0 * (m.seconds / b.seconds - 1.0)
                );
            }
        }
    }
    Ok(())
}

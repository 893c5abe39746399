//! `st-tune bench memory`: peak memory and step time of one training step under each memory
//! lever alone and combined, on synthetic rows of exact lengths (docs/memory.md).
//! `st-tune bench launches`: the tensor ops of one step, composed layers against the portable
//! engine (docs/benchmarks.md).

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;

use crate::config::{Config, MicroBatch, Precision};
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::memory::human_bytes;
use crate::memory::plan::{estimate, plan_input};
use crate::model::weights::Freeze;
use crate::model::SentenceModel;
use crate::train::measure::{count_step_launches, measure_step, StepLaunches, StepMeasure};

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
    /// The tensor ops of one optimizer step (about its kernel launches on a GPU): layers as
    /// composed autograd ops, the portable engine, and the portable engine with each planned
    /// `cuda` kernel as one launch.
    Launches(LaunchArgs),
    /// Each of st-tune's `cuda` kernels against its CPU twin, on fixed inputs (on a CPU or a
    /// build without `cuda`, the portable ops standing in for the kernels).
    Kernels(KernelArgs),
}

#[derive(Debug, Args)]
pub struct KernelArgs {
    /// The device to run the kernels on: cuda, cuda:N or cpu.
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct LaunchArgs {
    /// The run's TOML config (model, loss, batch size; data is not read).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Override a config key, as for `train`.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub set: Vec<String>,
    /// Tokens in every text.
    #[arg(long, default_value_t = 128)]
    pub seq: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
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
    /// Which levers to measure, comma separated, by their config names: f32, bf16, f16
    /// (train.precision), freeze_layers (half the layers), gradient_checkpointing, all.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f32,bf16,f16,freeze_layers,gradient_checkpointing,all"
    )]
    pub levers: Vec<BenchLever>,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A lever to measure, named as the config names it (clap refuses any other name, listing
/// these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum BenchLever {
    F32,
    Bf16,
    F16,
    /// `train.freeze_layers` at half the layers.
    FreezeLayers,
    GradientCheckpointing,
    /// bf16, half the layers frozen and gradient checkpointing together.
    All,
}

/// A step not tried: its estimate does not fit this machine's memory.
#[derive(Debug, Serialize)]
struct Skipped {
    lever: &'static str,
    seq: usize,
    estimated_bytes: u64,
    available_bytes: u64,
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
    match a.what {
        BenchWhat::Memory(a) => memory(a),
        BenchWhat::Launches(a) => launches(a),
        BenchWhat::Kernels(a) => kernels(a),
    }
}

fn kernels(a: KernelArgs) -> Result<()> {
    let device = crate::device::parse(&a.device)?;
    let checks = crate::train::twins::check(&device)?;
    if !a.json {
        println!("| kernel | on the device | CPU twin | max abs diff | max abs |");
        println!("| --- | --- | --- | --- | --- |");
    }
    for c in checks {
        if a.json {
            println!("{}", serde_json::to_string(&c).expect("plain struct"));
        } else {
            println!(
                "| {} | {} | {} | {:.1e} | {:.1e} |",
                c.kernel, c.device_side, c.twin, c.max_abs_diff, c.max_abs
            );
        }
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct LaunchRow {
    model: String,
    batch: usize,
    seq: usize,
    composed: StepLaunches,
    portable: StepLaunches,
}

fn launches(a: LaunchArgs) -> Result<()> {
    let cfg = Config::load(&a.config, &a.set)?;
    let device = crate::device::parse(&cfg.model.device)?;
    let mut t = cfg.train.clone();
    t.micro_batch_size = Some(MicroBatch::Size(t.batch_size));
    let count = |engine| -> Result<StepLaunches> {
        let mut model = SentenceModel::load(&cfg.model.path, &device, Some(Freeze::default()))?;
        // The composed reference exists for the post-LN layer only; ModernBERT's would be the
        // portable engine under another name.
        if model.spec.model.gated_ffn() {
            return Err(Error::Usage(format!(
                "bench launches: `{}` is a {} model; the composed path it counts against \
                 exists for the post-LN families (bert, mpnet, roberta, xlm-roberta, distilbert)",
                cfg.model.path,
                model.spec.model.model_type()
            )));
        }
        model.set_max_seq_length(a.seq)?;
        model.layer_engine = Some(engine);
        count_step_launches(&model, &t, a.seq)
    };
    let row = LaunchRow {
        model: cfg.model.path.clone(),
        batch: t.batch_size,
        seq: a.seq,
        composed: count(Engine::Composed)?,
        portable: count(Engine::Portable)?,
    };
    if a.json {
        println!("{}", serde_json::to_string(&row).expect("plain struct"));
        return Ok(());
    }
    let (c, p) = (&row.composed, &row.portable);
    println!(
        "model {}, loss {}, batch {} x {} tokens, one optimizer step on {}\n",
        row.model,
        t.loss,
        row.batch,
        row.seq,
        crate::device::name(&device)
    );
    println!("| path | tensor ops (views included) | of which the gradient norm | vs composed |");
    println!("| --- | --- | --- | --- |");
    let line = |name: &str, n: usize, norm: usize| {
        let ratio = n as f64 / c.total() as f64;
        println!("| {name} | {n} | {norm} | {ratio:.3} |");
    };
    line("composed layers (autograd tape)", c.total(), c.grad_norm);
    line("portable engine", p.total(), p.grad_norm);
    line(
        &format!(
            "portable + cuda kernels ({} regions of {} ops, one launch each)",
            p.planned_kernels, p.in_planned_kernels
        ),
        p.with_planned_kernels(),
        p.grad_norm,
    );
    Ok(())
}

fn memory(a: MemoryArgs) -> Result<()> {
    let cfg = Config::load(&a.config, &a.set)?;
    let device = crate::device::parse(&cfg.model.device)?;
    let layers = SentenceModel::load(&cfg.model.path, &device, None)?.num_layers();
    let half = layers / 2;
    let all: [(BenchLever, &str, Precision, usize, bool); 6] = [
        (BenchLever::F32, "f32 (baseline)", Precision::F32, 0, false),
        (BenchLever::Bf16, "bf16", Precision::Bf16, 0, false),
        (BenchLever::F16, "f16", Precision::F16, 0, false),
        (
            BenchLever::FreezeLayers,
            "freeze half the layers",
            Precision::F32,
            half,
            false,
        ),
        (
            BenchLever::GradientCheckpointing,
            "gradient checkpointing",
            Precision::F32,
            0,
            true,
        ),
        (
            BenchLever::All,
            "bf16 + freeze half + checkpointing",
            Precision::Bf16,
            half,
            true,
        ),
    ];
    let levers: Vec<_> = all
        .iter()
        .filter(|l| a.levers.contains(&l.0))
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
            let vocab = model.spec.model.sizes().vocab;
            let data = crate::train::measure::synthetic_pairs(t.batch_size, seq, vocab);
            let input = plan_input(&model.plan_shape()?, &t, 2)
                .with_touched_word_rows(data.distinct_ids().len());
            let est = estimate(&input, &vec![seq; t.batch_size]).total;
            // The planner's use: a step that cannot fit in this machine's memory is not tried.
            let available = crate::memory::available_memory();
            if device.is_cpu() && est > available / 10 * 9 {
                if a.json {
                    let row = Skipped {
                        lever: name,
                        seq,
                        estimated_bytes: est,
                        available_bytes: available,
                    };
                    println!("{}", serde_json::to_string(&row).expect("plain struct"));
                } else {
                    println!(
                        "| {name} | {seq} | skipped: estimated {} > 90 % of the {} available | | | | | |",
                        human_bytes(est),
                        human_bytes(available)
                    );
                }
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

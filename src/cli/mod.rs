//! The command line: clap definitions and dispatch. Each subcommand lives in its own file and
//! only turns arguments into a library call and its result into output.

pub mod bench;
pub mod config;
pub mod encode;
pub mod eval;
pub mod plan;
pub mod random;
pub mod sweep;
pub mod train;

use clap::{Parser, Subcommand};

use crate::error::Result;

/// Fine-tune sentence-transformer embedding models (MiniLM, MPNet, BERT) with candle, on CPU or
/// CUDA, without dying of out-of-memory.
///
/// Exit codes: 0 success; 1 other failure; 2 bad input (config, data, model, arguments, a
/// file that does not exist); 3 out of memory with nothing left to try (the last good state is
/// saved); 130 Ctrl-C and 143 SIGTERM (a checkpoint is saved; `train --resume` continues).
#[derive(Debug, Parser)]
#[command(name = "st-tune", version, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Train(train::TrainArgs),
    Encode(encode::EncodeArgs),
    Eval(eval::EvalArgs),
    Plan(plan::PlanArgs),
    Config(config::ConfigArgs),
    Bench(bench::BenchArgs),
    RandomModel(random::RandomArgs),
    Sweep(sweep::SweepArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Encode(a) => encode::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Config(a) => config::run(a),
        Command::Bench(a) => bench::run(a),
        Command::RandomModel(a) => random::run(a),
        Command::Sweep(a) => sweep::run(a),
    }
}

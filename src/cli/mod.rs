//! The command line: clap definitions and dispatch. Each subcommand lives in its own file and
//! only turns arguments into a library call and its result into output.

pub mod bench;
pub mod completions;
pub mod config;
pub mod encode;
pub mod eval;
pub mod man;
pub mod mine;
pub mod plan;
pub mod plot;
pub mod random;
pub mod sweep;
pub mod train;

use std::io::Write;

use clap::{Parser, Subcommand};

use crate::error::{Error, Result};

/// `st-tune --version`: st-tune's version, the candle version it links and whether the build
/// has CUDA (the `cuda` cargo feature; set by build.rs), e.g. `0.1.0 (candle 0.11.1, CUDA: no)`.
pub const VERSION: &str = env!("ST_TUNE_VERSION_LINE");

/// Fine-tune sentence-transformer embedding models (MiniLM, MPNet, BERT) with candle, on CPU or
/// CUDA, without dying of out-of-memory.
///
/// Exit codes: 0 success; 1 other failure; 2 bad input (config, data, model, arguments, a
/// file that does not exist); 3 out of memory with nothing left to try (the last good state is
/// saved); 130 Ctrl-C and 143 SIGTERM (a checkpoint is saved; `train --resume` continues).
#[derive(Debug, Parser)]
#[command(name = "st-tune", version = VERSION, about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Train(train::TrainArgs),
    Encode(encode::EncodeArgs),
    Eval(eval::EvalArgs),
    Mine(mine::MineArgs),
    Plan(plan::PlanArgs),
    Config(config::ConfigArgs),
    Bench(bench::BenchArgs),
    RandomModel(random::RandomArgs),
    Sweep(sweep::SweepArgs),
    Plot(plot::PlotArgs),
    Completions(completions::CompletionsArgs),
    Man(man::ManArgs),
}

pub fn run(cli: Cli) -> Result<()> {
    // A mistyped ST_TUNE_ENGINE is refused before any work, not silently replaced.
    crate::engine::Engine::from_env()?;
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Encode(a) => encode::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Mine(a) => mine::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Config(a) => config::run(a),
        Command::Bench(a) => bench::run(a),
        Command::RandomModel(a) => random::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Plot(a) => plot::run(a),
        Command::Completions(a) => completions::run(a),
        Command::Man(a) => man::run(a),
    }
}

/// Writes generated text to stdout; a reader that quit early (`| head`) is not an error.
fn print_bytes(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(Error::io("<stdout>", e)),
        _ => Ok(()),
    }
}

/// SIGINT and SIGTERM set `flag` (the signal's number), saying `message` if given, so the
/// command can stop cleanly (train: after the step, with a checkpoint); a second one quits at
/// once with 128 + the signal.
fn watch_signals(
    flag: std::sync::Arc<std::sync::atomic::AtomicI32>,
    message: Option<&'static str>,
) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use std::sync::atomic::Ordering;
    let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
        return; // No handler: the default action (exit) stays.
    };
    std::thread::spawn(move || {
        for signal in signals.forever() {
            if flag.swap(signal, Ordering::SeqCst) != 0 {
                std::process::exit(128 + signal);
            }
            if let Some(m) = message {
                eprintln!("\n{m}");
            }
        }
    });
}

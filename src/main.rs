//! Parses the command line, runs it, prints the error chain once and exits with its code.

use clap::Parser;

fn main() {
    // candle 0.11 runs element-wise ops on a spinning thread pool of its own beside rayon's
    // (which the matrix products and st-tune's kernels use); on a few cores the two pools fight,
    // and the spin-waits cost a third of a training step on short rows (docs/benchmarks.md).
    // Before any thread starts: one candle thread, unless the user chose otherwise.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    st_tune::memory::alloc::keep_freed_memory();
    let cli = st_tune::cli::Cli::parse();
    if let Err(e) = st_tune::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}

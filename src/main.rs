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
    // The command runs on one of rayon's own threads: a parallel loop started there shares
    // its work with the other threads and runs on the caller's core too, where one started
    // from the main thread would hand all of it over and put the main thread to sleep (a
    // wake-up per kernel call: 15 % of the cores sat idle in a training step).
    let result = match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(|| st_tune::cli::run(cli)),
        Err(_) => st_tune::cli::run(cli),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}

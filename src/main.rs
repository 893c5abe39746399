//! Parses the command line, runs it, prints the error chain once and exits with its code.

use clap::Parser;

fn main() {
    let cli = st_tune::cli::Cli::parse();
    if let Err(e) = st_tune::cli::run(cli) {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}

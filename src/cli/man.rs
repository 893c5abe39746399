//! `st-tune man [COMMAND]`: a man page (roff) generated from the clap definitions.

use clap::{Args, CommandFactory};

use crate::error::{Error, Result};

/// Print the man page of st-tune, or of one subcommand (st-tune-train(1) ...).
///
/// `st-tune man | man -l -` reads it; `st-tune man > st-tune.1` installs it (e.g. into
/// ~/.local/share/man/man1/).
#[derive(Debug, Args)]
pub struct ManArgs {
    /// A subcommand whose own page to print (train, eval, ...); without it, st-tune(1).
    pub command: Option<String>,
}

pub fn run(a: ManArgs) -> Result<()> {
    let cli = super::Cli::command();
    let cmd = match &a.command {
        None => cli,
        Some(name) => {
            let names: Vec<String> = cli
                .get_subcommands()
                .map(|c| c.get_name().to_string())
                .collect();
            let Some(sub) = cli.find_subcommand(name) else {
                return Err(Error::Usage(format!(
                    "no subcommand `{name}`; one of: {}",
                    names.join(", ")
                )));
            };
            // Titled st-tune-NAME(1), as git's pages are; the synopsis reads `st-tune NAME`.
            sub.clone()
                .display_name(format!("st-tune-{}", sub.get_name()))
                .bin_name(format!("st-tune {}", sub.get_name()))
        }
    };
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd)
        .source(format!("st-tune {}", super::VERSION))
        .manual("st-tune manual")
        .render(&mut buf)
        .map_err(|e| Error::Internal(format!("rendering the man page: {e}")))?;
    super::print_bytes(&buf)
}

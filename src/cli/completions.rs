//! `st-tune completions SHELL`: a completion script generated from the clap definitions.

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use crate::error::Result;

/// Print a shell completion script for st-tune.
///
/// bash: `st-tune completions bash > ~/.local/share/bash-completion/completions/st-tune`;
/// zsh: `st-tune completions zsh > "${fpath[1]}/_st-tune"`;
/// fish: `st-tune completions fish > ~/.config/fish/completions/st-tune.fish`;
/// PowerShell: `st-tune completions powershell | Out-String | Invoke-Expression` (in $PROFILE).
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete in.
    #[arg(value_enum)]
    pub shell: Shell,
}

pub fn run(a: CompletionsArgs) -> Result<()> {
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut super::Cli::command(), "st-tune", &mut buf);
    if a.shell == Shell::Bash {
        buf = fix_bash(&buf);
    }
    super::print_bytes(&buf)
}

/// clap_complete 4.6.12's bash script spells the state of a subcommand of a hyphenated binary
/// two ways: the loop builds `st__tune__subcmd__eval`, the case arms say
/// `st__subcmd__tune__subcmd__eval`, so nothing after a subcommand completed
/// (clap-rs/clap#6421, still open). The arms are made to match the loop.
fn fix_bash(script: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(script)
        .replace("st__subcmd__tune", "st__tune")
        .into_bytes()
}

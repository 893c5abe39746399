//! `st-tune config --defaults`: the whole documented config, from the same table the parser
//! checks keys against.

use clap::Args;

use crate::error::{Error, Result};

/// Print the documented training config.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Print every key with its default value and meaning, as TOML.
    #[arg(long)]
    pub defaults: bool,
}

pub fn run(a: ConfigArgs) -> Result<()> {
    if !a.defaults {
        return Err(Error::Usage(
            "nothing to do: try `st-tune config --defaults`".into(),
        ));
    }
    print!("{}", crate::config::defaults_toml());
    Ok(())
}

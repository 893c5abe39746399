//! `st-tune random-model`: a model folder with another's config and tokenizer but random
//! weights. A testing aid: the GPU check builds full-size MiniLM and MPNet shapes from it
//! where the real weights are too big to send.

use std::path::PathBuf;

use clap::Args;

use crate::error::Result;

/// Write a randomly initialised copy of a model folder (same config, tokenizer, tensor names
/// and shapes). For testing: the result is not a trained model.
#[derive(Debug, Args)]
pub struct RandomArgs {
    /// The sentence-transformers folder whose config and tokenizer to copy.
    #[arg(long)]
    pub like: PathBuf,
    /// Where to write the new folder.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: RandomArgs) -> Result<()> {
    crate::model::write_random_model(&a.like, &a.output, a.seed)?;
    println!("wrote {}", a.output.display());
    Ok(())
}

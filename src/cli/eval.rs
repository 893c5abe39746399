//! `st-tune eval`: Spearman and Pearson of cosine similarity against gold scores.

use std::path::PathBuf;

use clap::Args;

use crate::data::read::read_dataset;
use crate::data::RowShape;
use crate::error::{Error, Result};
use crate::model::SentenceModel;
use crate::train::eval::evaluate;

/// Correlate a model's cosine similarities with gold scores (sentence1,sentence2,score rows),
/// as sentence-transformers' EmbeddingSimilarityEvaluator does.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model folder or Hugging Face hub id.
    #[arg(long, short)]
    pub model: String,
    /// CSV/TSV/JSONL file with sentence1, sentence2 and score columns.
    #[arg(long, short)]
    pub data: PathBuf,
    /// Print one JSON object ({"spearman", "pearson", "pairs"}).
    #[arg(long)]
    pub json: bool,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let data = read_dataset(&a.data, None, None, None)?;
    if data.shape != RowShape::Scored {
        return Err(Error::data(
            &a.data,
            1,
            "eval needs sentence1, sentence2 and score columns",
        ));
    }
    let device = crate::device::parse(&a.device)?;
    let model = SentenceModel::load(&a.model, &device, None)?;
    let c = evaluate(&model, &data, a.batch_size)?;
    if a.json {
        println!("{}", serde_json::to_string(&c).expect("plain struct"));
    } else {
        println!(
            "spearman {:.5}\npearson  {:.5}\npairs    {}",
            c.spearman, c.pearson, c.pairs
        );
    }
    Ok(())
}

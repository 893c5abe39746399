//! `st-tune encode`: one text per line in, JSON lines `{"text", "embedding"}` out.

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::Args;

use crate::error::{Error, Result};
use crate::model::SentenceModel;

/// Embed texts with a model: one text per line in, JSON lines out.
///
/// A teacher model's output is a training file for `train.loss = "mse"` (distillation) as it is.
#[derive(Debug, Args)]
pub struct EncodeArgs {
    /// Model folder or Hugging Face hub id.
    #[arg(long, short)]
    pub model: String,
    /// Text file, one text per line (UTF-8; empty lines are an error).
    #[arg(long, short)]
    pub input: PathBuf,
    /// Where to write JSON lines; stdout when absent. Written atomically.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Put the model's prompt of this name before every text (its config_sentence_transformers.json
    /// `prompts`, e.g. "query"), as Python's `encode(texts, prompt_name=NAME)`. Unset: the
    /// model's `default_prompt_name`, if it has one.
    #[arg(long)]
    pub prompt: Option<String>,
}

pub fn run(a: EncodeArgs) -> Result<()> {
    let texts = crate::data::read::read_text_lines(&a.input)?;
    let device = crate::device::parse(&a.device)?;
    let model = SentenceModel::load(&a.model, &device, None)?;
    if model.spec.assumed_pooling {
        eprintln!("note: {} has no modules.json; using mean pooling", a.model);
    }
    let prompt = model.spec.prompt(a.prompt.as_deref())?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let emb = model.encode_prompted(&refs, prompt, a.batch_size)?;
    let mut out = String::new();
    for (t, e) in texts.iter().zip(emb) {
        out.push_str(&serde_json::json!({"text": t, "embedding": e}).to_string());
        out.push('\n');
    }
    match &a.output {
        Some(p) => crate::atomic::write_file(p, out.as_bytes()),
        None => {
            let mut w = BufWriter::new(std::io::stdout().lock());
            w.write_all(out.as_bytes())
                .map_err(|e| Error::io("<stdout>", e))
        }
    }
}

//! `st-tune mine`: hard negatives for (anchor, positive) rows, as sentence-transformers'
//! `mine_hard_negatives`, written as triplets or n-tuples.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use crate::data::read::{read_corpus, read_dataset, Format};
use crate::error::{Error, Result};
use crate::model::SentenceModel;
use crate::train::mine::{mine, MineOptions, Mined, Sampling, CORPUS_CHUNK};

/// Mine hard negatives for (anchor, positive) rows with a model, as sentence-transformers'
/// `mine_hard_negatives`: each anchor's negatives are the corpus and positive texts most
/// similar to it that are not its positives.
#[derive(Debug, Args)]
pub struct MineArgs {
    /// Model folder or Hugging Face hub id.
    #[arg(long, short)]
    pub model: String,
    /// (anchor, positive) rows: CSV, TSV or JSON lines with an anchor,positive header.
    #[arg(long, short)]
    pub data: PathBuf,
    /// Where to write: .csv or .jsonl (by the extension), written atomically.
    #[arg(long, short)]
    pub output: PathBuf,
    /// Further candidate texts, one per line, each once (the positives are candidates too).
    #[arg(long)]
    pub corpus: Option<PathBuf>,
    /// Negatives per anchor.
    #[arg(long, default_value_t = 3)]
    pub num_negatives: usize,
    /// Skip this many of the most similar candidates (they may be unlabelled positives).
    #[arg(long, default_value_t = 0)]
    pub range_min: usize,
    /// Look no further than this rank. Default: range-min + num-negatives + the most positives
    /// of an anchor, with 10 x num-negatives when a margin or --max-score is set.
    #[arg(long)]
    pub range_max: Option<usize>,
    /// Leave out candidates more similar to the anchor than this (cosine).
    #[arg(long)]
    pub max_score: Option<f32>,
    /// Keep a candidate only if its score + this is at most the anchor's lowest positive score.
    #[arg(long)]
    pub absolute_margin: Option<f32>,
    /// Keep a candidate only if its score is at most positive - |positive| x this
    /// (0.05: 5 % below the anchor's lowest positive score).
    #[arg(long)]
    pub relative_margin: Option<f32>,
    /// top: the most similar candidates of the window; random: a seeded random choice of them.
    #[arg(long, value_enum, default_value_t = Sampling::Top)]
    pub sampling: Sampling,
    /// triplet: one (anchor, positive, negative) row per negative; n-tuple: one row per
    /// (anchor, positive) with negative_1..negative_N, only where all N were found.
    #[arg(long, value_enum, default_value_t = OutputFormat::Triplet)]
    pub output_format: OutputFormat,
    /// Seed of --sampling random.
    #[arg(long, default_value_t = 12)]
    pub seed: u64,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Put the model's prompt of this name before the anchors, as Python's `query_prompt_name`.
    /// Unset: its "query" prompt if it has one (as Python's `encode_query`), else its
    /// `default_prompt_name`, if any.
    #[arg(long)]
    pub prompt: Option<String>,
    /// Put the model's prompt of this name before the corpus and positive texts, as Python's
    /// `corpus_prompt_name`. Unset: its first of "document", "passage", "corpus" (as Python's
    /// `encode_document`), else its `default_prompt_name`, if any.
    #[arg(long)]
    pub corpus_prompt: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Triplet,
    #[value(name = "n-tuple")]
    NTuple,
}

pub fn run(a: MineArgs) -> Result<()> {
    let format = match Format::from_path(&a.output) {
        Some(f @ (Format::Csv | Format::Jsonl)) => f,
        _ => {
            return Err(Error::Usage(format!(
                "--output {}: name it .csv or .jsonl",
                a.output.display()
            )))
        }
    };
    let pairs = read_dataset(&a.data, None, None, None)?;
    let corpus = match &a.corpus {
        Some(p) => read_corpus(p)?,
        None => Vec::new(),
    };
    let device = crate::device::parse(&a.device)?;
    let model = SentenceModel::load(&a.model, &device, None)?;
    if model.spec.assumed_pooling {
        eprintln!("note: {} has no modules.json; using mean pooling", a.model);
    }
    let options = MineOptions {
        num_negatives: a.num_negatives,
        range_min: a.range_min,
        range_max: a.range_max,
        max_score: a.max_score,
        absolute_margin: a.absolute_margin,
        relative_margin: a.relative_margin,
        sampling: a.sampling,
        seed: a.seed,
        query_prompt: side_prompt(&model, a.prompt.as_deref(), &["query"])?,
        corpus_prompt: side_prompt(
            &model,
            a.corpus_prompt.as_deref(),
            &["document", "passage", "corpus"],
        )?,
    };
    let bar = corpus_bar(corpus.len() + pairs.len());
    let mined = mine(
        &model,
        &device,
        &pairs,
        &corpus,
        &options,
        a.batch_size,
        &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )?;
    bar.finish_and_clear();
    let (header, rows) = table(&mined, a.output_format, a.num_negatives);
    write(&a.output, format, &header, &rows)?;
    report(&mined, &rows, a.num_negatives, a.output_format);
    Ok(())
}

/// The prompt text of one side: the one named, else the first of `usual` the model has (as
/// Python's `encode_query` / `encode_document`), else the model's default prompt.
fn side_prompt(
    model: &SentenceModel,
    named: Option<&str>,
    usual: &[&str],
) -> Result<Option<String>> {
    let name = named.or_else(|| {
        usual
            .iter()
            .copied()
            .find(|n| model.spec.prompts.contains_key(*n))
    });
    Ok(model.spec.prompt(name)?.map(str::to_string))
}

/// The output's columns and rows: one per (anchor, positive, negative), or one per
/// (anchor, positive) that got every negative.
fn table(mined: &[Mined], format: OutputFormat, n: usize) -> (Vec<String>, Vec<Vec<String>>) {
    let mut header = vec!["anchor".to_string(), "positive".to_string()];
    let mut rows = Vec::new();
    match format {
        OutputFormat::Triplet => {
            header.push("negative".into());
            for m in mined {
                for p in &m.positives {
                    for neg in &m.negatives {
                        rows.push(vec![m.anchor.clone(), p.clone(), neg.text.clone()]);
                    }
                }
            }
        }
        OutputFormat::NTuple => {
            header.extend((1..=n).map(|i| format!("negative_{i}")));
            for m in mined.iter().filter(|m| m.negatives.len() == n) {
                for p in &m.positives {
                    let mut row = vec![m.anchor.clone(), p.clone()];
                    row.extend(m.negatives.iter().map(|neg| neg.text.clone()));
                    rows.push(row);
                }
            }
        }
    }
    (header, rows)
}

fn write(path: &Path, format: Format, header: &[String], rows: &[Vec<String>]) -> Result<()> {
    let bytes = match format {
        Format::Jsonl => {
            let mut out = String::new();
            for row in rows {
                let obj: serde_json::Map<String, serde_json::Value> = header
                    .iter()
                    .zip(row)
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                    .collect();
                out.push_str(&serde_json::Value::Object(obj).to_string());
                out.push('\n');
            }
            out.into_bytes()
        }
        _ => {
            let mut w = csv::Writer::from_writer(Vec::new());
            let csv_err = |e: csv::Error| Error::Internal(format!("writing CSV: {e}"));
            w.write_record(header).map_err(csv_err)?;
            for row in rows {
                w.write_record(row).map_err(csv_err)?;
            }
            w.into_inner()
                .map_err(|e| Error::Internal(format!("writing CSV: {e}")))?
        }
    };
    // A new folder is made, as `train` makes output.dir: `--output runs/x/mined.csv` works.
    let dir = crate::atomic::parent(path);
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::atomic::write_file(path, &bytes)
}

/// A line on stderr: what was written, and the anchors short of negatives, as Python warns.
fn report(mined: &[Mined], rows: &[Vec<String>], n: usize, format: OutputFormat) {
    let short = mined.iter().filter(|m| m.negatives.len() < n).count();
    let found: usize = mined.iter().map(|m| m.negatives.len()).sum();
    eprintln!(
        "mined {found} negatives for {} anchors; wrote {} {} rows",
        mined.len(),
        rows.len(),
        match format {
            OutputFormat::Triplet => "triplet",
            OutputFormat::NTuple => "n-tuple",
        }
    );
    if short > 0 {
        eprintln!(
            "{short} anchors got fewer than {n} negatives: widen --range-max or relax \
             --max-score and the margins to find more"
        );
    }
}

/// A progress bar on stderr over the corpus texts, when stderr is a terminal and the corpus
/// is more than one chunk.
fn corpus_bar(texts: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if texts <= CORPUS_CHUNK || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(texts as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("mining {bar:30} {pos}/{len} texts  ETA {eta}")
            .expect("static template"),
    );
    bar
}

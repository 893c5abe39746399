//! `st-tune eval`: the evaluation a file's columns call for. Scored pairs: Spearman and Pearson
//! of cosine similarity against the gold scores; pairs labelled 0/1: binary classification
//! (accuracy, F1, precision, recall, AP, MCC, with thresholds); (anchor, positive[, negative])
//! rows: retrieval figures (accuracy/precision/recall@k, MRR@10, NDCG@10, MAP@100), and with a
//! negative the triplet accuracy.

use std::path::PathBuf;

use clap::Args;

use crate::data::read::read_eval_file;
use crate::error::Result;
use crate::model::SentenceModel;
use crate::train::eval::{evaluate_any, Scores};

/// Evaluate a model on a file, as sentence-transformers' evaluators do; the columns pick which.
///
/// sentence1,sentence2,score rows: Spearman and Pearson correlation of the cosine similarity with
/// the score (EmbeddingSimilarityEvaluator). sentence1,sentence2,label rows (label 0 or 1):
/// BinaryClassificationEvaluator's figures on the cosine. anchor,positive[,negative] rows:
/// retrieval (InformationRetrievalEvaluator) with the distinct anchors as queries and the
/// distinct positive and negative texts as the corpus; each anchor's positives are its relevant
/// documents. With a negative, also TripletEvaluator's accuracy (cosine_accuracy).
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Model folder or Hugging Face hub id.
    #[arg(long, short)]
    pub model: String,
    /// CSV/TSV/JSONL file with sentence1,sentence2,score, sentence1,sentence2,label or
    /// anchor,positive[,negative] columns.
    #[arg(long, short)]
    pub data: PathBuf,
    /// Print one JSON object: {"spearman", "pearson", "pairs"}; for labelled pairs
    /// {"cosine_accuracy", "cosine_accuracy_threshold", "cosine_f1", "cosine_f1_threshold",
    /// "cosine_precision", "cosine_recall", "cosine_ap", "cosine_mcc", "pairs"}; for retrieval
    /// {"accuracy@1", ..., "precision@k", "recall@k", "mrr@10", "ndcg@10", "map@100", "queries",
    /// "corpus", "similarity"[, "cosine_accuracy" with negatives]}.
    #[arg(long)]
    pub json: bool,
    /// Texts per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Extra documents for retrieval, one text per line (as `data.corpus` in training).
    #[arg(long, value_name = "FILE")]
    pub corpus: Option<PathBuf>,
    /// The model's prompt NAME before the texts of column ROLE (as `data.prompts`), e.g.
    /// `--prompt anchor=query --prompt positive=passage`; repeatable. Columns without one get
    /// the model's default_prompt_name, if it has one, as Python's evaluators do.
    #[arg(long, value_name = "ROLE=NAME")]
    pub prompt: Vec<String>,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let mut data = read_eval_file(&a.data)?;
    if let Some(corpus) = &a.corpus {
        if !data.shape.is_retrieval() {
            return Err(crate::Error::Usage(format!(
                "--corpus adds documents to a retrieval evaluation, but {} holds {}",
                a.data.display(),
                data.shape.name()
            )));
        }
        data.distractors = crate::data::read::read_corpus(corpus)?;
    }
    let device = crate::device::parse(&a.device)?;
    let model = SentenceModel::load(&a.model, &device, None)?;
    // Every negative column of an n-tuple is prompted as "negative".
    let roles = data.shape.prompt_roles();
    let mut named = std::collections::BTreeMap::new();
    for spec in &a.prompt {
        let Some((role, name)) = spec.split_once('=').filter(|(r, _)| roles.contains(r)) else {
            return Err(crate::Error::Usage(format!(
                "--prompt {spec}: give ROLE=NAME with ROLE one of {} (the columns of {})",
                {
                    let mut distinct = roles.clone();
                    distinct.dedup();
                    distinct.join(", ")
                },
                a.data.display()
            )));
        };
        named.insert(role, model.spec.prompt(Some(name))?.map(str::to_string));
    }
    let default = model.spec.prompt(None)?.map(str::to_string);
    data.prompts = roles
        .iter()
        .map(|r| named.get(r).cloned().unwrap_or_else(|| default.clone()))
        .collect();
    let scores = evaluate_any(&model, &data, a.batch_size)?;
    if a.json {
        crate::say!("{}", serde_json::to_string(&scores).expect("plain struct"));
        return Ok(());
    }
    match scores {
        Scores::Similarity(c) => crate::say!(
            "spearman {:.5}\npearson  {:.5}\npairs    {}",
            c.spearman,
            c.pearson,
            c.pairs
        ),
        Scores::Binary(b) => {
            let v = serde_json::to_value(b).expect("plain struct");
            crate::say!("pairs {}, cosine similarity", b.pairs);
            for key in crate::config::metric::BINARY {
                crate::say!("{key:<27}{:.5}", v[key].as_f64().unwrap_or(f64::NAN));
            }
        }
        Scores::Retrieval(r) => {
            let v = serde_json::to_value(&r).expect("plain struct");
            crate::say!(
                "queries {}, corpus {} (distinct texts), {} similarity",
                r.queries,
                r.corpus,
                r.similarity
            );
            for key in crate::config::metric::RETRIEVAL {
                crate::say!("{key:<13}{:.5}", v[key].as_f64().unwrap_or(f64::NAN));
            }
            if let Some(a) = r.triplet_accuracy {
                crate::say!(
                    "{:<13}{a:.5} (triplets: positive above negative)",
                    "cosine_accuracy"
                );
            }
        }
    }
    Ok(())
}

//! Every config key, declared once: its type, default, help, what a value must look like, the
//! rule a value must follow alone, and whether changing it changes the trained model. The
//! [`section!`] macro turns each declaration into the struct field, its `Default`, its
//! [`KeyDoc`] (for `config --defaults`, unknown-key and type errors, sweeps) and its check.
//! Rules between keys (a micro-batch no larger than the batch) are in `Config::validate`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Distance, Format, LossKind, MemoryLimit, MicroBatch, Precision, TrainData};
use crate::data::mix::MixSampler;
use crate::error::{Error, Result};

/// One documented config key.
pub struct KeyDoc {
    pub section: &'static str,
    pub key: &'static str,
    /// What a value must look like, for type errors: "expected {expects}, got …".
    pub expects: &'static str,
    /// One or more lines of help, printed as comments above the key.
    pub help: &'static str,
    /// A TOML value, shown (commented out) by `config --defaults` for keys unset by default.
    pub example: Option<&'static str>,
    /// Whether a different value gives a different trained model; a resumed run may change
    /// only the keys for which this is false.
    pub changes_result: bool,
}

impl KeyDoc {
    /// "section.key", as users write it in `--set` and as errors name it.
    pub fn full_key(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }
}

/// Keys unset by default are left out when a config is written back.
pub trait Unset {
    fn is_unset(&self) -> bool {
        false
    }
}

impl<T> Unset for Option<T> {
    fn is_unset(&self) -> bool {
        self.is_none()
    }
}

impl Unset for String {}
impl Unset for PathBuf {}
impl Unset for bool {}
impl Unset for usize {}
impl Unset for u64 {}
impl Unset for f64 {}
impl Unset for LossKind {}
impl Unset for Precision {}
impl Unset for crate::data::batch::BatchSampler {}
impl Unset for MixSampler {}
impl<T> Unset for Vec<T> {}

/// `section! { Name "name" { key: Type = default; expects "..."; [example "..";] [check f;]
/// [neutral;] help "..."; ... } }`: see the module doc.
macro_rules! section {
    (
        $(#[$meta:meta])*
        $name:ident $section:literal {
            $(
                $key:ident : $ty:ty = $default:expr ;
                expects $expects:expr ;
                $( example $example:literal ; )?
                $( check $check:expr ; )?
                $( neutral $neutral:tt ; )?
                help $help:literal ;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            $(
                #[doc = $help]
                #[serde(skip_serializing_if = "Unset::is_unset")]
                pub $key: $ty,
            )*
        }

        impl Default for $name {
            fn default() -> Self {
                $name { $( $key: $default, )* }
            }
        }

        impl $name {
            pub const KEYS: &'static [KeyDoc] = &[$(
                KeyDoc {
                    section: $section,
                    key: stringify!($key),
                    expects: $expects,
                    help: $help,
                    example: section!(@example $($example)?),
                    changes_result: !section!(@neutral $($neutral)?),
                },
            )*];

            /// Each key's own rule; the error names the key.
            pub fn check_each(&self) -> Result<()> {
                $($(
                    let check: fn(&$ty) -> std::result::Result<(), String> = $check;
                    check(&self.$key).map_err(|msg| {
                        Error::config(concat!($section, ".", stringify!($key)), msg)
                    })?;
                )?)*
                Ok(())
            }
        }
    };
    (@example) => { None };
    (@example $e:literal) => { Some($e) };
    (@neutral) => { false };
    (@neutral $t:tt) => { true };
}

const POSITIVE_INT: &str = "a positive integer";
const NON_NEGATIVE_INT: &str = "a non-negative integer";
const BOOL: &str = "true or false";
const PATH: &str = "a file path (a string)";

/// The sections, in file order, with one line of help each.
pub const SECTIONS: &[(&str, &str)] = &[
    ("model", "The model to fine-tune."),
    (
        "guide",
        "The guide model of train.loss = \"gist\": it finds the false in-batch negatives.",
    ),
    ("data", "Training and evaluation data."),
    ("train", "Loss, schedule and optimizer."),
    (
        "memory",
        "Memory budget, and what the out-of-memory handler may change to stay within it.",
    ),
    (
        "output",
        "Where the fine-tuned model, checkpoints and logs go.",
    ),
];

/// Every key, in the order `config --defaults` prints them.
pub fn all_keys() -> impl Iterator<Item = &'static KeyDoc> {
    [
        ModelSection::KEYS,
        GuideSection::KEYS,
        DataSection::KEYS,
        TrainSection::KEYS,
        MemorySection::KEYS,
        OutputSection::KEYS,
    ]
    .into_iter()
    .flatten()
}

section! {
    /// `[model]`: which model to fine-tune, and where.
    ModelSection "model" {
        path: String = String::new();
        expects "a string: a local folder or a hub id";
        check |p| required(p.trim().is_empty(), "set it to a local sentence-transformers folder \
            or a hub id, e.g. --set model.path=sentence-transformers/all-MiniLM-L6-v2");
        help "Required. A local sentence-transformers folder or a Hugging Face hub id,\n\
              e.g. \"sentence-transformers/all-MiniLM-L6-v2\".";

        max_seq_length: Option<usize> = None;
        expects POSITIVE_INT;
        example "256";
        check |v| at_least_one(v.unwrap_or(1));
        help "Truncate every text to this many tokens. Unset: the model's own max_seq_length.";

        prompts: Option<BTreeMap<String, String>> = None;
        expects "a table of name = \"prompt text\", e.g. { query = \"query: \", passage = \"passage: \" }";
        example "{ query = \"query: \", passage = \"passage: \" }";
        help "Named prompts: text put before an input, as sentence-transformers' `prompts`.\n\
              Added to (or replacing) the prompts the model already declares in its\n\
              config_sentence_transformers.json, used by name in data.prompts and\n\
              `st-tune encode --prompt NAME`, and saved with the model, so Python's\n\
              model.encode(texts, prompt_name=\"query\") uses them.\n\
              On the command line: --set 'model.prompts.query=\"query: \"'";

        device: String = "cpu".into();
        expects "a device name such as \"cpu\" or \"cuda\"";
        check |d| if d.trim().is_empty() { Err("is empty; use \"cpu\" or \"cuda\"".into()) } else { Ok(()) };
        neutral yes;
        help "Where to train: \"cpu\" or a GPU such as \"cuda\".";
    }
}

section! {
    /// `[guide]`: the guide model of GISTEmbedLoss. It runs forward only, on the trained
    /// model's device and engine, and is never saved.
    GuideSection "guide" {
        path: Option<String> = None;
        expects "a string: a local folder or a hub id";
        example "\"sentence-transformers/all-MiniLM-L6-v2\"";
        check |p| match p {
            Some(p) if p.trim().is_empty() => {
                Err("is empty; give a sentence-transformers folder or a hub id".into())
            }
            _ => Ok(()),
        };
        help "Required by train.loss = \"gist\" (and used by nothing else). A local\n\
              sentence-transformers folder or a Hugging Face hub id, as model.path; it may be\n\
              the model being trained (model.path), as sentence-transformers allows.\n\
              When its vocabulary differs from the model's, or its max_seq_length is\n\
              shorter, it reads the model's tokens decoded back to text, as\n\
              sentence-transformers' GISTEmbedLoss does; otherwise the model's tokens.";

        max_seq_length: Option<usize> = None;
        expects POSITIVE_INT;
        example "256";
        check |v| at_least_one(v.unwrap_or(1));
        help "Truncate the guide's inputs to this many tokens. Unset: the guide's own\n\
              max_seq_length.";
    }
}

section! {
    /// `[data]`: the training (and evaluation) files and how to read them.
    DataSection "data" {
        train: TrainData = TrainData::default();
        expects "a file path, or [[data.train]] entries (tables with path and optional name, columns, loss, prompts)";
        check TrainData::check;
        help "Required. Training file: CSV, TSV, JSON lines or Parquet with a header (or keys)\n\
              naming the columns anchor,positive[,negative[,margin]], sentence1,sentence2,score,\n\
              sentence1,sentence2,label (0 or 1) or text,embedding (a JSON list, as\n\
              `st-tune encode` writes it); train.loss says which it needs.\n\
              Several training sets: one [[data.train]] table each, with `path` and optional\n\
              `name` (default: the file's stem), `columns`, `loss` and `prompts` (unset: the\n\
              top-level data.columns, train.loss, data.prompts). Each batch comes from one set\n\
              (see data.sampler); the log and the model card name each set.";

        sampler: MixSampler = MixSampler::Proportional;
        expects "\"proportional\" or \"round_robin\"";
        help "With several [[data.train]] sets, which set each batch comes from, as\n\
              sentence-transformers' MultiDatasetBatchSamplers: \"proportional\" (every batch of\n\
              every set once per epoch, the sets in a seeded random order, so each set weighs by\n\
              its size) or \"round_robin\" (one batch of each set in turn; the epoch ends when the\n\
              smallest set runs out). One set: no effect.";

        dev: Option<PathBuf> = None;
        expects PATH;
        example "\"data/dev.csv\"";
        check |p| match p {
            Some(p) if p.as_os_str().is_empty() => {
                Err("is an empty path; remove the key to train without evaluation".into())
            }
            _ => Ok(()),
        };
        neutral yes;
        help "Evaluation file, before, during (see train.eval_steps) and after training; its\n\
              columns pick the evaluation: sentence1,sentence2,score rows give the Spearman\n\
              correlation of cosine similarity, sentence1,sentence2,label rows (0 or 1) binary\n\
              classification (cosine_ap, cosine_f1, cosine_accuracy, ...), anchor,positive\n\
              rows retrieval figures (NDCG@10, MRR@10, accuracy@k, ...), and\n\
              anchor,positive,negative rows both retrieval figures and the triplet accuracy\n\
              (cosine_accuracy).";

        corpus: Option<PathBuf> = None;
        expects PATH;
        example "\"data/corpus.txt\"";
        neutral yes;
        help "Extra documents for a retrieval dev file (pairs or triplets): one text per line\n\
              (or a .parquet file's `text` column), added to the corpus as distractors no query\n\
              is relevant to. Each text once.";

        format: Option<Format> = None;
        expects "one of \"csv\", \"tsv\", \"jsonl\", \"parquet\"";
        example "\"csv\"";
        help "File format: \"csv\", \"tsv\", \"jsonl\" or \"parquet\" (as Hugging Face `datasets`\n\
              writes it: snappy or zstd pages). Unset: taken from the file extension\n\
              (.csv, .tsv, .jsonl, .json, .parquet).";

        columns: Option<BTreeMap<String, String>> = None;
        expects "a table of role = \"column name\", e.g. { anchor = \"query\", positive = \"answer\" }";
        example "{ anchor = \"query\", positive = \"answer\" }";
        help "Which column of the file plays which role, when the header does not use the role\n\
              names. Roles: anchor, positive, negative (pairs, triplets) or sentence1,\n\
              sentence2, score (scored pairs). Other columns are ignored.\n\
              On the command line: --set data.columns.anchor=query";

        prompts: Option<BTreeMap<String, String>> = None;
        expects "a table of role = \"prompt name\", e.g. { anchor = \"query\", positive = \"passage\" }";
        example "{ anchor = \"query\", positive = \"passage\", negative = \"passage\" }";
        help "Which named prompt (model.prompts, or the model's own) each column gets, by role:\n\
              prepended in training and in evaluation (a retrieval dev file's queries get the\n\
              anchor's prompt, its documents the positive's). Roles without one get no prompt\n\
              in training and the model's default_prompt_name, if any, in evaluation.\n\
              On the command line: --set data.prompts.anchor=query";

        group_by_length: bool = false;
        expects BOOL;
        help "Put rows of similar length in the same batch, so less padding is computed.";

        limit: Option<usize> = None;
        expects POSITIVE_INT;
        example "1000";
        check |v| match v {
            Some(0) => Err("must be at least 1; remove the key to read every row".into()),
            _ => Ok(()),
        };
        help "Read only the first N rows of each file (handy for a quick smoke run).";
    }
}

section! {
    /// `[train]`: loss, schedule and optimizer.
    TrainSection "train" {
        loss: LossKind = LossKind::Cosent;
        expects "one of \"mnrl\", \"mnsrl\", \"gist\", \"cosent\", \"cosine\", \"triplet\", \"contrastive\", \"online_contrastive\", \"mse\", \"margin_mse\"";
        help "The loss (README's loss table says which to choose):\n\
              \"mnrl\" or \"mnsrl\" (MultipleNegatives[Symmetric]RankingLoss) for\n\
              anchor,positive[,negative] rows; \"gist\" (GISTEmbedLoss) for the same rows,\n\
              with a guide model ([guide]) that drops in-batch negatives it finds more\n\
              similar to the anchor than the positive is; \"triplet\" (TripletLoss) for\n\
              anchor,positive,negative rows; \"cosent\" (CoSENTLoss) or \"cosine\"\n\
              (CosineSimilarityLoss) for sentence1,sentence2,score rows; \"contrastive\" or\n\
              \"online_contrastive\" for sentence1,sentence2,label rows (label 0 or 1);\n\
              \"mse\" (MSELoss, distillation) for text,embedding rows (the teacher's embedding\n\
              as a JSON list, as `st-tune encode` writes it); \"margin_mse\" (MarginMSELoss)\n\
              for anchor,positive,negative,margin rows.";

        margin: Option<f64> = None;
        expects "a non-negative number";
        example "5.0";
        check |v| match v {
            Some(m) => non_negative(*m),
            None => Ok(()),
        };
        help "Margin of triplet (default 5), contrastive and online_contrastive (default 0.5),\n\
              and gist (default 0: an in-batch negative is dropped when the guide finds it\n\
              more similar to the anchor than the positive minus this margin, GISTEmbedLoss's\n\
              \"absolute\" strategy); the other losses ignore it.";

        distance: Option<Distance> = None;
        expects "one of \"euclidean\", \"cosine\", \"manhattan\"";
        example "\"cosine\"";
        help "Distance of triplet (default \"euclidean\"), contrastive and online_contrastive\n\
              (default \"cosine\": 1 - cosine similarity); the other losses ignore it.";

        epochs: usize = 1;
        expects POSITIVE_INT;
        check |v| at_least_one(*v);
        help "Passes over the training data.";

        max_steps: Option<usize> = None;
        expects POSITIVE_INT;
        example "1000";
        check |v| match v {
            Some(0) => Err("must be at least 1; remove the key to let train.epochs decide".into()),
            _ => Ok(()),
        };
        help "Stop after this many optimizer steps. Unset: train.epochs decides.";

        batch_size: usize = 16;
        expects POSITIVE_INT;
        check |v| at_least_one(*v);
        help "Rows per optimizer step. For mnrl this is also the number of in-batch negatives,\n\
              so it changes the loss, not only the speed.";

        micro_batch_size: Option<MicroBatch> = None;
        expects "a positive integer or \"auto\"";
        example "8";
        help "Rows per forward/backward pass; the gradients of the passes of one step are\n\
              combined, so the result matches one pass over train.batch_size rows.\n\
              \"auto\": the largest micro-batch `st-tune plan` estimates to fit memory.limit\n\
              (or the free memory). Unset: train.batch_size.";

        batch_sampler: Option<crate::data::batch::BatchSampler> = None;
        expects "one of \"no_duplicates\", \"default\"";
        example "\"no_duplicates\"";
        help "How shuffled rows are cut into batches, as sentence-transformers' BatchSamplers:\n\
              \"no_duplicates\" puts no text twice in a batch (a row whose anchor, positive or\n\
              negative the batch already holds waits for a later one, so a few batches are\n\
              smaller), \"default\" takes consecutive rows. Unset: \"no_duplicates\" for mnrl and\n\
              mnsrl, whose in-batch negatives would otherwise include copies of the positive, and\n\
              \"default\" for the other losses.";

        lr: f64 = 2e-5;
        expects "a positive number";
        check |v| positive(*v);
        help "Peak learning rate of AdamW.";

        warmup_ratio: f64 = 0.1;
        expects "a number from 0 up to (not including) 1";
        check |v| if (0.0..1.0).contains(v) { Ok(()) } else {
            Err(format!("must be from 0 up to (not including) 1, got {v}"))
        };
        help "Fraction of the steps over which the learning rate rises linearly from 0;\n\
              after that it decays linearly to 0.";

        weight_decay: f64 = 0.01;
        expects "a non-negative number";
        check |v| non_negative(*v);
        help "AdamW weight decay (not applied to biases and LayerNorm weights).";

        max_grad_norm: f64 = 1.0;
        expects "a non-negative number";
        check |v| non_negative(*v);
        help "Clip the global gradient norm to this value; 0 turns clipping off.";

        max_nonfinite_steps: usize = 5;
        expects POSITIVE_INT;
        check |v| at_least_one(*v);
        neutral yes;
        help "A step whose loss or gradient norm is NaN or infinite skips its update; this many\n\
              in a row stop the run (exit 4) without saving, leaving the newest checkpoint\n\
              and final/ as they were (docs/reliability.md).";

        seed: u64 = 42;
        expects NON_NEGATIVE_INT;
        help "Seed of shuffling, dropout and initialisation: the same seed gives the same run.";

        eval_steps: usize = 0;
        expects NON_NEGATIVE_INT;
        neutral yes;
        help "Evaluate on data.dev every N optimizer steps; 0: only before and after training.";

        log_steps: usize = 10;
        expects POSITIVE_INT;
        check |v| at_least_one(*v);
        neutral yes;
        help "Log loss and learning rate every N optimizer steps.";

        scale: Option<f64> = None;
        expects "a positive number";
        example "20.0";
        check |v| match v {
            Some(s) => positive(*s),
            None => Ok(()),
        };
        help "Similarity scale (1 / temperature) of mnrl, mnsrl, cosent and gist; the others\n\
              ignore it. Unset: 20, and 100 for gist (GISTEmbedLoss's temperature 0.01).";

        precision: Precision = Precision::F32;
        expects "one of \"f32\", \"f16\", \"bf16\"";
        help "Number type of the forward and backward pass: \"f32\", \"f16\" or \"bf16\".\n\
              Master weights and optimizer state stay f32.";

        freeze_embeddings: Option<bool> = None;
        expects BOOL;
        example "false";
        help "Do not train the embedding layer (saves its gradients and optimizer state).\n\
              Unset: frozen when freeze_layers > 0, trained otherwise. With freeze_layers > 0\n\
              and freeze_embeddings = false, the frozen layers must keep their activations for\n\
              the embeddings' gradient: measured on MiniLM, MNRL, batch 32, 256 tokens,\n\
              freeze_layers = 3 cuts peak RSS by 43 % with the embeddings frozen, by 0.4 %\n\
              without (docs/memory.md).";

        // Checked against the model's layer count when the model is loaded.
        freeze_layers: usize = 0;
        expects NON_NEGATIVE_INT;
        help "Do not train the first N transformer layers (for MPNet also the relative-position\n\
              bias every layer shares); at most the model's layer count. The embeddings\n\
              freeze with them (see freeze_embeddings): the frozen part then runs without an\n\
              autograd graph and keeps no activations.";

        gradient_checkpointing: bool = false;
        expects BOOL;
        help "Recompute activations in the backward pass instead of keeping them:\n\
              less memory, more compute.";

        // Checked against the dev file's kind of evaluation when it is read.
        metric: Option<super::Metric> = None;
        expects "a figure name such as \"spearman\" or \"ndcg@10\"";
        example "\"mrr@10\"";
        help "The dev figure that picks output.dir/best (higher is better). Unset: spearman\n\
              for a scored dev file, cosine_ap for labelled pairs, ndcg@10 for pairs or\n\
              triplets. Scored files give spearman and pearson; labelled pairs cosine_accuracy,\n\
              cosine_f1, cosine_precision, cosine_recall, cosine_ap, cosine_mcc (and the\n\
              thresholds); pairs and triplets the retrieval figures (accuracy@k, precision@k,\n\
              recall@k for k = 1, 3, 5, 10, mrr@10, ndcg@10, map@100); triplets also\n\
              cosine_accuracy (positive more similar than negative).";

        // Checked against the model's embedding dimension when the model is loaded.
        matryoshka_dims: Option<Vec<usize>> = None;
        expects "a list of positive integers, strictly decreasing, e.g. [384, 256, 128, 64]";
        example "[384, 256, 128, 64]";
        check |v| match v {
            Some(dims) => check_matryoshka_dims(dims),
            None => Ok(()),
        };
        help "Matryoshka training: the loss is also computed on the embeddings cut to each of\n\
              these widths (first N components, re-normalised) and the results are summed, as\n\
              sentence-transformers' MatryoshkaLoss does, so the model still works when users\n\
              keep only the first N dimensions. Widths strictly decreasing, at most the model's\n\
              embedding dimension (include it to keep training the full width). The dev\n\
              evaluation is then also reported at each width.";

        matryoshka_weights: Option<Vec<f64>> = None;
        expects "a list of positive numbers, one per train.matryoshka_dims width";
        example "[1.0, 1.0, 1.0, 1.0]";
        check |v| match v {
            Some(w) => check_matryoshka_weights(w),
            None => Ok(()),
        };
        help "Weight of each train.matryoshka_dims width in the summed loss, in the same\n\
              order. Unset: 1 for every width.";
    }
}

section! {
    /// `[memory]`: the budget and what the out-of-memory handler may change to stay in it.
    MemorySection "memory" {
        // The OOM handler keeps the loss exact under any budget: the same model (up to the
        // rounding of other micro-batch cuts).
        limit: Option<MemoryLimit> = None;
        expects "a size such as \"6GiB\", \"512MiB\" or \"80%\"";
        example "\"80%\"";
        neutral yes;
        help "Memory budget: a size (\"6GiB\", \"512MiB\") or a share of the device (\"80%\":\n\
              of the machine's memory on CPU, of the GPU's on CUDA). Going over it is handled\n\
              like an out-of-memory error. Unset: no limit on CPU, the free GPU memory on CUDA.";

        regrow_after: usize = 100;
        expects POSITIVE_INT;
        check |v| at_least_one(*v);
        neutral yes;
        help "After an out-of-memory retry at a smaller micro-batch, try a larger one again\n\
              after this many successful steps.";

        escalate: Vec<super::Lever> = Vec::new();
        expects "a list drawn from \"gradient_checkpointing\", \"bf16\", \"f16\", \"max_seq_length\"";
        check |levers| super::check_levers(levers);
        help "What the out-of-memory handler may change, in this order, when even a\n\
              micro-batch of one row does not fit: \"gradient_checkpointing\", \"bf16\" or\n\
              \"f16\", \"max_seq_length\" (shorter inputs). Empty: stop with an error instead.";
    }
}

section! {
    /// `[output]`: where the fine-tuned model, checkpoints and logs go.
    OutputSection "output" {
        dir: PathBuf = PathBuf::from("output/run");
        expects PATH;
        check |p| required(p.as_os_str().is_empty(), "give a folder for the model");
        neutral yes;
        help "Folder for the fine-tuned model, checkpoints and logs.";

        save_best: bool = true;
        expects BOOL;
        neutral yes;
        help "Also save the model with the best dev Spearman (NDCG@10 for a retrieval\n\
              dev file) to output.dir/best (output.dir/final always holds the last one).";

        // As the Hugging Face Trainer's save_steps: a few minutes of lost work at most on a
        // GPU, and a MiniLM checkpoint (weights and AdamW moments) writes in under a second.
        checkpoint_steps: usize = 500;
        expects NON_NEGATIVE_INT;
        neutral yes;
        help "Save a checkpoint (weights, optimizer and memory-policy state) to\n\
              output.dir/checkpoints/step-N every N optimizer steps and at the end, so that\n\
              `st-tune train --resume` continues a killed run exactly; 0 turns it off\n\
              (Ctrl-C and SIGTERM still save one).";

        keep_checkpoints: usize = 2;
        expects POSITIVE_INT;
        check |v| if *v == 0 {
            Err("must be at least 1 (the newest checkpoint is what --resume continues from); \
                 set output.checkpoint_steps = 0 to save none".into())
        } else { Ok(()) };
        neutral yes;
        help "How many of the newest checkpoints to keep; older ones are deleted.";
    }
}

fn required(missing: bool, how: &str) -> std::result::Result<(), String> {
    if missing {
        Err(format!("is required: {how}"))
    } else {
        Ok(())
    }
}

fn at_least_one(v: usize) -> std::result::Result<(), String> {
    if v == 0 {
        Err("must be at least 1".into())
    } else {
        Ok(())
    }
}

fn positive(v: f64) -> std::result::Result<(), String> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(format!("must be a positive number, got {v}"))
    }
}

fn non_negative(v: f64) -> std::result::Result<(), String> {
    if v >= 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(format!("must be a non-negative number, got {v}"))
    }
}

fn check_matryoshka_dims(dims: &[usize]) -> std::result::Result<(), String> {
    if dims.is_empty() {
        return Err(
            "is empty; give at least one width, e.g. [384, 256, 128, 64], or remove \
                    the key to train at the full width only"
                .into(),
        );
    }
    if dims.contains(&0) {
        return Err(format!("{dims:?} holds 0; every width must be at least 1"));
    }
    if let Some(w) = dims.windows(2).find(|w| w[0] <= w[1]) {
        return Err(format!(
            "{dims:?} is not strictly decreasing ({} then {}); list each width once, largest \
             first, e.g. [384, 256, 128, 64]",
            w[0], w[1]
        ));
    }
    Ok(())
}

fn check_matryoshka_weights(weights: &[f64]) -> std::result::Result<(), String> {
    match weights.iter().find(|w| !(**w > 0.0 && w.is_finite())) {
        Some(w) => Err(format!(
            "{weights:?} holds {w}; every weight must be a positive number"
        )),
        None => Ok(()),
    }
}

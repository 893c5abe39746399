//! The model card (`README.md` of a saved folder), with what sentence-transformers' own cards
//! carry: base model, loss, data, hyperparameters, the evaluation before and after with every
//! figure, the training curves, how out-of-memory was handled, hardware and time, and how to
//! use the model. Evaluations and OOM events are read back from the run's `metrics.jsonl` and
//! `events.jsonl`, the same record `st-tune plot` draws from.

use std::path::Path;

use serde_json::Value;

use crate::config::{Config, LossKind};
use crate::data::mix::MixSampler;
use crate::train::report::read_jsonl;

/// What the training loop knows that the files do not.
pub struct Facts<'a> {
    pub cfg: &'a Config,
    /// Where the card's folder is (for the usage snippet).
    pub dir: &'a Path,
    pub step: usize,
    pub status: &'a str,
    pub max_seq_length: usize,
    /// The training sets, in the config's order.
    pub sets: &'a [SetFacts<'a>],
    pub micro_batch: usize,
    pub seconds: f64,
    /// Whether `training.png` sits beside the card.
    pub curves: bool,
}

/// One training set, as the card names it.
pub struct SetFacts<'a> {
    pub name: &'a str,
    pub path: &'a Path,
    pub rows: usize,
    pub columns: Vec<String>,
    pub loss: LossKind,
}

pub fn render(f: &Facts) -> String {
    let (cfg, t) = (f.cfg, &f.cfg.train);
    let out = &cfg.output.dir;
    // The card is a by-product: files it cannot read leave sections out.
    let lines = |name: &str| read_jsonl(&out.join(name)).unwrap_or_default();
    let metrics = lines("metrics.jsonl");
    let evals: Vec<&Value> = metrics
        .iter()
        .filter(|l| l.get("label").is_some())
        .collect();
    let before = evals.iter().find(|e| e["label"] == "before");
    let after = evals
        .iter()
        .rev()
        .find(|e| e["step"].as_u64() <= Some(f.step as u64));
    let ooms = lines("events.jsonl")
        .iter()
        .filter(|e| e["event"] == "oom")
        .count();

    // A hub id gets its link and the card's base_model; a local folder is named as it is.
    let local = Path::new(&cfg.model.path).exists();
    let (base_yaml, base) = if local {
        (String::new(), format!("`{}`", cfg.model.path))
    } else {
        (
            format!("base_model: {}\n", cfg.model.path),
            format!("[`{0}`](https://huggingface.co/{0})", cfg.model.path),
        )
    };
    let mut s = format!(
        "---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\n{base_yaml}\
         tags:\n- sentence-transformers\n- st-tune\n---\n\n# Fine-tuned with st-tune\n\n\
         This is {base} fine-tuned with the {} for {} optimizer steps ({}), by st-tune {}.\n\n",
        losses_used(f.sets),
        f.step,
        f.status,
        env!("CARGO_PKG_VERSION"),
    );
    s += &data_section(f.sets, cfg.data.sampler);
    s += &format!(
        "## Training\n\n| setting | value |\n| --- | --- |\n| loss | {} (scale {}) |\n\
         | batch size | {} (micro-batch {} at the end) |\n| epochs | {} |\n| max steps | {} |\n\
         | learning rate | {} (warmup ratio {}, linear decay) |\n| weight decay | {} |\n\
         | max grad norm | {} |\n| precision | {} (f32 master weights) |\n| max_seq_length | {} |\n\
         | frozen | {} layers, embeddings {} |\n| gradient checkpointing | {} |\n| seed | {} |\n\n",
        losses_used(f.sets),
        scale_used(t, f.sets),
        t.batch_size,
        f.micro_batch,
        t.epochs,
        t.max_steps.map_or("-".into(), |n| n.to_string()),
        t.lr,
        t.warmup_ratio,
        t.weight_decay,
        t.max_grad_norm,
        t.precision,
        f.max_seq_length,
        t.freeze_layers,
        if t.freezes_embeddings() {
            "frozen"
        } else {
            "trained"
        },
        t.gradient_checkpointing,
        t.seed,
    );
    if let Some(guide) = &cfg.guide.path {
        // Insert before the table's closing blank line: the guide is a training setting.
        s.truncate(s.len() - 1);
        s += &format!("| guide model | {guide} (GISTEmbedLoss, not saved) |\n\n");
    }
    if let (Some(dev), Some(after)) = (&cfg.data.dev, after) {
        s += &format!(
            "## Evaluation\n\n`{}`, before training and after step {}:\n\n",
            dev.display(),
            after["step"]
        );
        s += "| figure | before | after |\n| --- | --- | --- |\n";
        if let Some(figures) = after.as_object() {
            for (name, v) in figures {
                let Some(value) = v
                    .as_f64()
                    .filter(|_| !matches!(name.as_str(), "step" | "pairs" | "queries" | "corpus"))
                else {
                    continue;
                };
                let was = before
                    .and_then(|b| b[name].as_f64())
                    .map_or("-".into(), |b| format!("{b:.4}"));
                s += &format!("| {name} | {was} | {value:.4} |\n");
            }
        }
        s += "\n";
    }
    if f.curves {
        s += "## Training curves\n\n![loss, learning rate, dev metric, speed and memory over the \
              steps](training.png)\n\n";
    }
    s += &format!(
        "## Memory\n\nOut-of-memory events recovered: {ooms} (st-tune halves the micro-batch and \
         retries the same rows; the batch and the loss stay exact). Micro-batch at the end: {}.{}\n\n",
        f.micro_batch,
        cfg.memory
            .limit
            .as_ref()
            .map_or(String::new(), |l| format!(" Budget: `memory.limit = \"{}\"`.", l.as_str()))
    );
    s += &format!(
        "## Hardware and time\n\n{} ({}), {} threads; {:.1} s of training.\n\n",
        cfg.model.device,
        cpu_name(),
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        f.seconds
    );
    s += &format!(
        "## Usage\n\n```python\nfrom sentence_transformers import SentenceTransformer\n\n\
         model = SentenceTransformer(\"{dir}\")\nembeddings = model.encode([\"A sentence.\", \"Another one.\"])\n```\n\n\
         ```sh\nprintf 'A sentence.\\nAnother one.\\n' > texts.txt\n\
         st-tune encode --model {dir} --input texts.txt\n```\n",
        dir = f.dir.display()
    );
    s
}

/// "`mnrl` loss", or "`mnrl` and `cosent` losses" (each loss once, in the sets' order).
fn losses_used(sets: &[SetFacts]) -> String {
    let mut kinds: Vec<&str> = Vec::new();
    for s in sets {
        if !kinds.contains(&s.loss.as_str()) {
            kinds.push(s.loss.as_str());
        }
    }
    let named: Vec<String> = kinds.iter().map(|k| format!("`{k}`")).collect();
    match named.len() {
        1 => format!("{} loss", named[0]),
        _ => format!("{} losses", named.join(" and ")),
    }
}

/// `train.scale`, or each set's loss default when it is unset (gist's differs).
fn scale_used(t: &crate::config::TrainSection, sets: &[SetFacts]) -> String {
    if let Some(scale) = t.scale {
        return scale.to_string();
    }
    let mut scales: Vec<String> = Vec::new();
    for s in sets {
        let text = format!(
            "{} for `{}`",
            crate::config::default_scale(s.loss),
            s.loss.as_str()
        );
        if !scales.contains(&text) {
            scales.push(text);
        }
    }
    match scales.as_slice() {
        [_] => crate::config::default_scale(sets[0].loss).to_string(),
        _ => scales.join(", "),
    }
}

/// The data section: the one file, or each set by name with its loss and how batches were
/// drawn from them.
fn data_section(sets: &[SetFacts], sampler: MixSampler) -> String {
    if let [one] = sets {
        return format!(
            "## Data\n\n`{}`: {} rows of ({}).\n\n",
            one.path.display(),
            one.rows,
            one.columns.join(", ")
        );
    }
    let mut s = format!(
        "## Data\n\n{} training sets; each batch from one of them, drawn {}:\n\n\
         | set | file | rows | columns | loss |\n| --- | --- | --- | --- | --- |\n",
        sets.len(),
        match sampler {
            MixSampler::RoundRobin => "round robin (one batch of each in turn)",
            MixSampler::Proportional => "in proportion to their number of batches",
        }
    );
    for set in sets {
        s += &format!(
            "| {} | `{}` | {} | {} | `{}` |\n",
            set.name,
            set.path.display(),
            set.rows,
            set.columns.join(", "),
            set.loss
        );
    }
    s + "\n"
}

fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

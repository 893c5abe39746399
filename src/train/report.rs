//! One stream of run events to three places: `metrics.jsonl` (every logged step and every
//! evaluation), `events.jsonl` (what happened to the run: each line has `"event"` — `oom`,
//! `escalate`, `regrow`, `skipped_step`, `nonfinite`, `checkpoint`, `resume`, `interrupted`, `pruned` — and `"step"`,
//! the 1-based optimizer step it concerns), and the terminal: a progress bar on a TTY, plain
//! lines otherwise, or JSON lines with `--json` (for scripts and sweeps).
//!
//! A resumed run appends to both files after dropping the lines of steps the checkpoint does
//! not hold (they are run again), so no step appears twice.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use crate::error::{Error, Result};
use crate::train::eval::Scores;
use crate::train::nonfinite::NonFinite;
use crate::train::step::OomEvent;

/// `println!` that ignores write errors: a closed stdout (the reader of a pipe quit, the
/// terminal went away) must not kill a training run, which `println!` would with a panic.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Progress bar when stdout is a terminal, plain lines otherwise.
    Human,
    /// One JSON object per line on stdout.
    Json,
    /// Nothing on stdout (library use, tests).
    Quiet,
}

/// What is logged for an optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepLog {
    pub step: usize,
    pub epoch: usize,
    pub loss: f32,
    /// With several training sets: the one this step's rows, and so its loss, came from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    pub lr: f64,
    pub samples_per_s: f64,
    pub micro_batch_size: usize,
    pub memory_in_use: u64,
    /// `memory.limit` in bytes, if any (drawn beside the memory in use).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_limit: Option<u64>,
}

pub struct Reporter {
    output: Output,
    bar: Option<ProgressBar>,
    metrics: BufWriter<File>,
    events: BufWriter<File>,
}

/// The JSON lines of `path` (metrics.jsonl, events.jsonl, a `--json` transcript); none if
/// the file does not exist. A line that does not parse (cut short by a kill, or the file of a
/// run still going) is skipped.
pub fn read_jsonl(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(path, e)),
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Opens `path` for appending; with `keep_until` set, first drops the lines whose `"step"` is
/// after it and the final evaluation (atomically), else starts the file empty.
fn open(path: &Path, keep_until: Option<usize>) -> Result<BufWriter<File>> {
    let file = match keep_until {
        None => File::create(path).map_err(|e| Error::io(path, e))?,
        Some(step) => {
            // A line cut short by a kill is dropped too, and the end-of-run evaluation, which
            // a resumed run always does again.
            let kept: String = read_jsonl(path)?
                .into_iter()
                .filter(|v| {
                    v["step"].as_u64().is_none_or(|s| s as usize <= step) && v["label"] != "after"
                })
                .map(|v| format!("{v}\n"))
                .collect();
            crate::atomic::write_file(path, kept.as_bytes())?;
            std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .map_err(|e| Error::io(path, e))?
        }
    };
    Ok(BufWriter::new(file))
}

impl Reporter {
    /// `resumed_at`: the step of the checkpoint a resumed run continues from.
    pub fn new(
        dir: &Path,
        output: Output,
        total_steps: usize,
        resumed_at: Option<usize>,
    ) -> Result<Self> {
        let bar = (output == Output::Human && std::io::stdout().is_terminal()).then(|| {
            let bar = ProgressBar::new(total_steps as u64);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  ETA {eta}")
                    .expect("static template"),
            );
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Ok(Self {
            output,
            bar,
            metrics: open(&dir.join("metrics.jsonl"), resumed_at)?,
            events: open(&dir.join("events.jsonl"), resumed_at)?,
        })
    }

    fn line(w: &mut BufWriter<File>, v: &serde_json::Value) {
        // A full disk must not kill the run: metrics are a by-product.
        let _ = writeln!(w, "{v}").and_then(|_| w.flush());
    }

    /// A human message (or a JSON `{"event": "message"}` line).
    pub fn message(&self, text: &str) {
        match (self.output, &self.bar) {
            (Output::Quiet, _) => {}
            (Output::Json, _) => say!("{}", json!({"event": "message", "text": text})),
            (Output::Human, Some(bar)) => bar.println(text),
            (Output::Human, None) => say!("{text}"),
        }
    }

    pub fn step(&mut self, log: &StepLog, print: bool) {
        let v = json!({"event": "step", "data": log});
        Self::line(&mut self.metrics, &v["data"]);
        if let Some(bar) = &self.bar {
            bar.set_position(log.step as u64);
            let set = log
                .dataset
                .as_ref()
                .map_or(String::new(), |d| format!(" ({d})"));
            bar.set_message(format!(
                "loss {:.4}{set}  lr {:.2e}  {:.1} samples/s  micro {}",
                log.loss, log.lr, log.samples_per_s, log.micro_batch_size
            ));
            return;
        }
        if !print {
            return;
        }
        match self.output {
            Output::Json => say!("{v}"),
            Output::Human => say!(
                "step {} epoch {} loss {:.4}{} lr {:.2e} {:.1} samples/s micro {}",
                log.step,
                log.epoch,
                log.loss,
                log.dataset
                    .as_ref()
                    .map_or(String::new(), |d| format!(" ({d})")),
                log.lr,
                log.samples_per_s,
                log.micro_batch_size
            ),
            Output::Quiet => {}
        }
    }

    /// One evaluation: the figures of `Scores` (correlation or retrieval) beside the step, and
    /// with Matryoshka training those at each width under "dims": {"256": {figures}, ...}.
    pub fn eval(&mut self, step: usize, label: &str, scores: &Scores, widths: &[(usize, Scores)]) {
        let mut v = json!({"event": "eval", "step": step, "label": label});
        if let serde_json::Value::Object(figures) = json!(scores) {
            v.as_object_mut().expect("an object").extend(figures);
        }
        if !widths.is_empty() {
            let dims: serde_json::Map<String, serde_json::Value> = widths
                .iter()
                .map(|(w, s)| (w.to_string(), json!(s)))
                .collect();
            v["dims"] = dims.into();
        }
        Self::line(&mut self.metrics, &v);
        match self.output {
            Output::Json => say!("{v}"),
            Output::Human => self.message(&match scores {
                Scores::Similarity(c) => format!(
                    "eval ({label}, step {step}): spearman {:.4} pearson {:.4} on {} pairs",
                    c.spearman, c.pearson, c.pairs
                ),
                Scores::Binary(b) => format!(
                    "eval ({label}, step {step}): cosine ap {:.4} f1 {:.4} accuracy {:.4} on {} \
                     pairs",
                    b.ap, b.f1, b.accuracy, b.pairs
                ),
                Scores::Retrieval(r) => format!(
                    "eval ({label}, step {step}): ndcg@10 {:.4} mrr@10 {:.4} accuracy@1 {:.4}{} \
                     on {} queries, {} documents",
                    r.ndcg_10,
                    r.mrr_10,
                    r.accuracy_1,
                    r.triplet_accuracy
                        .map(|a| format!(" triplet accuracy {a:.4}"))
                        .unwrap_or_default(),
                    r.queries,
                    r.corpus
                ),
            }),
            Output::Quiet => {}
        }
        if self.output == Output::Human && !widths.is_empty() {
            let parts: Vec<String> = widths
                .iter()
                .map(|(w, s)| format!("{w}: {:.4}", s.value()))
                .collect();
            let metric = scores.metric();
            self.message(&format!("  {metric} by width: {}", parts.join(", ")));
        }
    }

    /// One line of events.jsonl (and of stdout with `--json`).
    fn event(&mut self, event: &str, step: usize, mut fields: serde_json::Value) {
        fields["event"] = event.into();
        fields["step"] = step.into();
        Self::line(&mut self.events, &fields);
        if self.output == Output::Json {
            say!("{fields}");
        }
    }

    pub fn oom(&mut self, e: &OomEvent) {
        let fields = serde_json::to_value(e).expect("plain struct");
        // The runner counts steps from 0; the files (and ST_TUNE_INJECT_OOM) from 1.
        self.event("oom", e.step as usize + 1, fields);
        if self.output == Output::Human {
            self.message(&format!(
                "out of memory at step {} ({:?}): micro-batch {} -> {}, retrying the same rows",
                e.step + 1,
                e.phase,
                e.micro_before,
                e.micro_after
            ));
        }
    }

    /// Micro-batch 1 did not fit: a `memory.escalate` lever was pulled.
    pub fn escalated(&mut self, step: usize, lever: &str) {
        self.event("escalate", step, json!({ "lever": lever }));
        if self.output == Output::Human {
            self.message(&format!(
                "step {step}: even one row per pass ran out of memory; switching on {lever} (memory.escalate)"
            ));
        }
    }

    /// Enough clean steps: the next step tries a larger micro-batch.
    pub fn regrew(&mut self, step: usize, micro: usize) {
        self.event("regrow", step, json!({ "micro_after": micro }));
        if self.output == Output::Human {
            self.message(&format!("step {step}: trying micro-batch {micro} again"));
        }
    }

    /// An f16 step whose gradients overflowed: no update, smaller loss scale.
    pub fn skipped(&mut self, step: usize, new_scale: f64) {
        self.event("skipped_step", step, json!({ "loss_scale": new_scale }));
        if self.output == Output::Human {
            self.message(&format!(
                "step {step}: f16 gradient overflow, update skipped; loss scale now {new_scale}"
            ));
        }
    }

    /// A step whose loss or gradients were NaN or infinite: no update (`nonfinite.rs`).
    pub fn nonfinite(&mut self, e: &NonFinite) {
        let fields = serde_json::to_value(e).expect("plain struct");
        self.event("nonfinite", e.step as usize + 1, fields);
        if self.output == Output::Human {
            let place = e
                .tensor
                .as_deref()
                .map(|t| format!(", first in `{t}`"))
                .unwrap_or_default();
            self.message(&format!(
                "step {}: NaN or infinity in the {} pass{place}, update skipped",
                e.step + 1,
                format!("{:?}", e.phase).to_lowercase()
            ));
        }
    }

    pub fn checkpoint(&mut self, step: usize, path: &Path) {
        self.event("checkpoint", step, json!({ "path": path }));
    }

    pub fn resumed(&mut self, step: usize, path: &Path) {
        self.event("resume", step, json!({ "from": path }));
        if self.output == Output::Human {
            self.message(&format!(
                "resuming after step {step} from {}",
                path.display()
            ));
        }
    }

    /// A sweep's pruner stopped this trial at a rung.
    pub fn pruned(&mut self, step: usize, rows: usize, value: f64) {
        self.event("pruned", step, json!({ "rows": rows, "value": value }));
        if self.output == Output::Human {
            self.message(&format!(
                "step {step}: stopped by the sweep's pruner ({value:.4} after {rows} rows)"
            ));
        }
    }

    pub fn interrupted(&mut self, step: usize, signal: i32) {
        self.event("interrupted", step, json!({ "signal": signal }));
    }

    /// Moves the progress bar to where a resumed run starts.
    pub fn start_at(&self, step: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(step as u64);
            bar.reset_eta();
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

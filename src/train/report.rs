//! One stream of run events to three places: `metrics.jsonl` (every logged step and every
//! evaluation), `events.jsonl` (every OOM), and the terminal: a progress bar on a TTY, plain
//! lines otherwise, or JSON lines with `--json` (for scripts and sweeps).

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::json;

use crate::error::{Error, Result};
use crate::train::eval::Correlation;
use crate::train::step::OomEvent;

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
    pub lr: f64,
    pub samples_per_s: f64,
    pub micro_batch_size: usize,
    pub memory_in_use: u64,
}

pub struct Reporter {
    output: Output,
    bar: Option<ProgressBar>,
    metrics: BufWriter<File>,
    events: BufWriter<File>,
}

fn create(path: &Path) -> Result<BufWriter<File>> {
    Ok(BufWriter::new(
        File::create(path).map_err(|e| Error::io(path, e))?,
    ))
}

impl Reporter {
    pub fn new(dir: &Path, output: Output, total_steps: usize) -> Result<Self> {
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
            metrics: create(&dir.join("metrics.jsonl"))?,
            events: create(&dir.join("events.jsonl"))?,
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
            (Output::Json, _) => println!("{}", json!({"event": "message", "text": text})),
            (Output::Human, Some(bar)) => bar.println(text),
            (Output::Human, None) => println!("{text}"),
        }
    }

    pub fn step(&mut self, log: &StepLog, print: bool) {
        let v = json!({"event": "step", "data": log});
        Self::line(&mut self.metrics, &v["data"]);
        if let Some(bar) = &self.bar {
            bar.set_position(log.step as u64);
            bar.set_message(format!(
                "loss {:.4}  lr {:.2e}  {:.1} samples/s  micro {}",
                log.loss, log.lr, log.samples_per_s, log.micro_batch_size
            ));
            return;
        }
        if !print {
            return;
        }
        match self.output {
            Output::Json => println!("{v}"),
            Output::Human => println!(
                "step {} epoch {} loss {:.4} lr {:.2e} {:.1} samples/s micro {}",
                log.step, log.epoch, log.loss, log.lr, log.samples_per_s, log.micro_batch_size
            ),
            Output::Quiet => {}
        }
    }

    pub fn eval(&mut self, step: usize, label: &str, c: &Correlation) {
        let v = json!({"event": "eval", "step": step, "label": label, "spearman": c.spearman,
                       "pearson": c.pearson, "pairs": c.pairs});
        Self::line(&mut self.metrics, &v);
        match self.output {
            Output::Json => println!("{v}"),
            Output::Human => self.message(&format!(
                "eval ({label}, step {step}): spearman {:.4} pearson {:.4} on {} pairs",
                c.spearman, c.pearson, c.pairs
            )),
            Output::Quiet => {}
        }
    }

    pub fn oom(&mut self, e: &OomEvent) {
        let v = json!({"event": "oom", "data": e});
        Self::line(&mut self.events, &v["data"]);
        match self.output {
            Output::Json => println!("{v}"),
            Output::Human => self.message(&format!(
                "out of memory at step {} ({:?}): micro-batch {} -> {}, retrying the same rows",
                e.step, e.phase, e.micro_before, e.micro_after
            )),
            Output::Quiet => {}
        }
    }

    /// Micro-batch 1 did not fit: a `memory.escalate` lever was pulled.
    pub fn escalated(&mut self, step: usize, lever: &str) {
        let v = json!({"event": "escalate", "step": step, "lever": lever});
        Self::line(&mut self.events, &v);
        match self.output {
            Output::Json => println!("{v}"),
            Output::Human => self.message(&format!(
                "step {step}: even one row per pass ran out of memory; switching on {lever} (memory.escalate)"
            )),
            Output::Quiet => {}
        }
    }

    /// An f16 step whose gradients overflowed: no update, smaller loss scale.
    pub fn skipped(&mut self, step: usize, new_scale: f64) {
        let v = json!({"event": "skipped_step", "step": step, "loss_scale": new_scale});
        Self::line(&mut self.events, &v);
        match self.output {
            Output::Json => println!("{v}"),
            Output::Human => self.message(&format!(
                "step {step}: f16 gradient overflow, update skipped; loss scale now {new_scale}"
            )),
            Output::Quiet => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

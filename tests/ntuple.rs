//! n-tuples, (anchor, positive, negative_1..negative_n) rows as `st-tune mine --output-format
//! n-tuple` writes them, through the real binary: mined by `mine`, trained by `train` with every
//! hard negative, ending with the same weights when the batches are cut into micro-batches and
//! OOMs are injected (cached scheme); ragged negative columns and a loss that takes one negative
//! are refused naming the file and the key. (Loss values and gradients against Python:
//! tests/losses.rs; the same step cut or not: tests/losses.rs too.)

mod common;

use std::path::{Path, PathBuf};

use common::{st_tune, summary, Run};

/// A tiny BERT and 24 (anchor, positive) pairs of word salad.
struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        common::tiny_model(&model, false, 2, 3);
        common::write_data(&dir.path().join("pairs.csv"), false);
        Setup { dir, model }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `name.toml`: `loss` on `data`, batch 8, 3 steps, micro-batch `micro`, `extra`
    /// keys in [data], output to `name/`.
    fn config(&self, name: &str, data: &Path, loss: &str, micro: usize, extra: &str) -> PathBuf {
        let toml = format!(
            "[model]\npath = {:?}\n[data]\ntrain = {:?}\n{extra}\n[train]\nloss = \"{loss}\"\n\
             batch_size = 8\nmicro_batch_size = {micro}\nmax_steps = 3\nlr = 1e-3\n\
             warmup_ratio = 0.0\n[memory]\nregrow_after = 1\n[output]\ndir = {:?}\n",
            self.model,
            data,
            self.path(name)
        );
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        path
    }

    fn train(&self, config: &Path, inject: Option<&str>) -> Run {
        common::train_json(config, inject)
    }
}

#[test]
fn mined_n_tuples_train_with_every_negative_and_micro_batches_and_ooms_change_nothing() {
    let s = Setup::new();
    let mined = s.path("mined.csv");
    let run = st_tune(
        &[
            "mine",
            "--model",
            s.model.to_str().unwrap(),
            "--data",
            s.path("pairs.csv").to_str().unwrap(),
            "--output",
            mined.to_str().unwrap(),
            "--output-format",
            "n-tuple",
            "--num-negatives",
            "3",
        ],
        None,
    );
    assert_eq!(run.code, 0, "mine failed:\n{}", run.stderr);
    let text = std::fs::read_to_string(&mined).unwrap();
    assert_eq!(
        text.lines().next(),
        Some("anchor,positive,negative_1,negative_2,negative_3")
    );
    assert!(text.lines().count() > 9, "too few mined rows:\n{text}");

    let whole = summary(&s.train(&s.config("whole", &mined, "mnrl", 8, ""), None));
    let faults = "1:forward,2:backward,2:optimizer,3:forward";
    let cut = summary(&s.train(&s.config("cut", &mined, "mnrl", 4, ""), Some(faults)));
    assert_eq!(cut["ooms_recovered"], 4, "{cut}");
    let (a, b) = (
        whole["final_loss"].as_f64().unwrap(),
        cut["final_loss"].as_f64().unwrap(),
    );
    assert!(
        a.is_finite() && (a - b).abs() <= 1e-5 * a.abs().max(1.0),
        "{a} != {b}"
    );
    let (diff, name) = common::max_relative_difference(&s.path("whole"), &s.path("cut"));
    assert!(diff <= 1e-5, "weights differ: {name} by {diff}");

    // Every negative is trained on: the same file read as triplets (its first negative only,
    // through data.columns) ends elsewhere.
    let first = "[data.columns]\nanchor = \"anchor\"\npositive = \"positive\"\n\
                 negative = \"negative_1\"";
    let one = summary(&s.train(&s.config("one", &mined, "mnrl", 8, first), None));
    assert!(
        (one["final_loss"].as_f64().unwrap() - a).abs() > 1e-4,
        "{one} vs {whole}"
    );
    // The model card lists the file's columns.
    let card = std::fs::read_to_string(s.path("whole/final/README.md")).unwrap();
    assert!(
        card.contains("anchor, positive, negative_1, negative_2, negative_3"),
        "{card}"
    );
}

/// The error of a run refused before training: exit status not 0, nothing written.
fn refused(s: &Setup, data: &Path, loss: &str) -> String {
    let run = s.train(&s.config("bad", data, loss, 8, ""), None);
    assert_ne!(run.code, 0, "trained:\n{}", run.stderr);
    assert!(!s.path("bad/final").exists());
    run.stderr
}

#[test]
fn ragged_negatives_and_a_loss_that_takes_one_negative_are_refused_naming_file_and_key() {
    let s = Setup::new();
    let ragged = s.path("ragged.csv");
    std::fs::write(&ragged, "anchor,positive,negative_1,negative_3\na,b,c,d\n").unwrap();
    let text = refused(&s, &ragged, "mnrl");
    assert!(
        text.contains("ragged.csv:1")
            && text.contains("negative_1, negative_3")
            && text.contains("no `negative_2`"),
        "{text}"
    );

    let ntuple = s.path("ntuple.csv");
    std::fs::write(
        &ntuple,
        "anchor,positive,negative_1,negative_2,negative_3\na,b,c,d,e\n",
    )
    .unwrap();
    let text = refused(&s, &ntuple, "triplet");
    assert!(
        text.contains("train.loss")
            && text.contains("ntuple.csv")
            && text.contains("n-tuples with 3 negatives")
            && text.contains("\"mnrl\" or \"mnsrl\" or \"gist\""),
        "{text}"
    );
    let text = refused(&s, &ntuple, "margin_mse");
    assert!(
        text.contains("train.loss") && text.contains("ntuple.csv"),
        "{text}"
    );
}

//! GISTEmbedLoss through the real binary: a run with a guide model trains, ends with the same
//! weights when its batches are cut into micro-batches and OOMs are injected, and is planned
//! with the guide counted; a missing or unreadable guide is a config error naming `guide.path`
//! and the file; and on real models (MiniLM guided by MPNet) the guide reads the same tokens
//! and the loss equals Python's. (Value and gradient on fixed embeddings: tests/losses.rs.)

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

use common::{st_tune, summary, Run};

/// A tiny BERT to train, a tiny MPNet guide (the same vocabulary, another network), pairs, and a
/// config for gist with `guide` as `[guide]` (none: no section).
struct Setup {
    dir: tempfile::TempDir,
    model: PathBuf,
    guide: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (model, guide) = (dir.path().join("model"), dir.path().join("guide"));
        common::tiny_model(&model, false, 2, 3);
        common::tiny_model(&guide, true, 1, 8);
        common::write_data(&dir.path().join("train.csv"), false);
        Setup { dir, model, guide }
    }

    /// Writes `name.toml`: gist, batch 8, 3 steps, micro-batch `micro`, output to `name/`.
    fn config(&self, name: &str, guide: Option<&Path>, micro: usize) -> PathBuf {
        let root = self.dir.path();
        let guide = match guide {
            Some(g) => format!("[guide]\npath = {:?}\n", g),
            None => String::new(),
        };
        let toml = format!(
            "[model]\npath = {:?}\n{guide}[data]\ntrain = {:?}\n[train]\nloss = \"gist\"\n\
             batch_size = 8\nmicro_batch_size = {micro}\nmax_steps = 3\nlr = 1e-3\n\
             warmup_ratio = 0.0\n[memory]\nregrow_after = 1\n[output]\ndir = {:?}\n",
            self.model,
            root.join("train.csv"),
            root.join(name)
        );
        let path = root.join(format!("{name}.toml"));
        std::fs::write(&path, toml).unwrap();
        path
    }

    fn train(&self, config: &Path, inject: Option<&str>) -> Run {
        common::train_json(config, inject)
    }
}

#[test]
fn a_guided_run_ends_with_the_same_weights_under_micro_batches_and_injected_ooms() {
    let s = Setup::new();
    let whole = summary(&s.train(&s.config("whole", Some(&s.guide), 8), None));
    let faults = "1:forward,2:backward,2:optimizer,3:forward";
    let cut = summary(&s.train(&s.config("cut", Some(&s.guide), 4), Some(faults)));
    assert_eq!(cut["ooms_recovered"], 4, "{cut}");
    let (a, b) = (
        whole["final_loss"].as_f64().unwrap(),
        cut["final_loss"].as_f64().unwrap(),
    );
    assert!(
        a.is_finite() && (a - b).abs() <= 1e-5 * a.abs().max(1.0),
        "{a} != {b}"
    );
    let root = s.dir.path();
    let (diff, name) = common::max_relative_difference(&root.join("whole"), &root.join("cut"));
    assert!(diff <= 1e-5, "weights differ: {name} by {diff}");
    // The guide mattered: guided by the model itself, the same run ends elsewhere.
    let own = summary(&s.train(&s.config("own", Some(&s.model), 8), None));
    assert!(
        (own["final_loss"].as_f64().unwrap() - a).abs() > 1e-4,
        "{own}"
    );
    // Only the trained model is saved: final/ holds its tensors, none of the guide's.
    let mut saved: Vec<String> = common::weights(&root.join("whole")).into_keys().collect();
    let mut start: Vec<String> = tensors(&s.model).into_keys().collect();
    saved.sort();
    start.sort();
    assert_eq!(saved, start);
    // The model card names it among the training settings.
    let card = std::fs::read_to_string(root.join("whole/final/README.md")).unwrap();
    let row = format!(
        "| guide model | {} (GISTEmbedLoss, not saved) |\n",
        s.guide.display()
    );
    assert!(card.contains(&format!("| seed | 42 |\n{row}\n")), "{card}");
}

fn tensors(folder: &Path) -> std::collections::HashMap<String, candle_core::Tensor> {
    let file = folder.join("model.safetensors");
    candle_core::safetensors::load(file, &candle_core::Device::Cpu).unwrap()
}

#[test]
fn plan_counts_the_guide() {
    let s = Setup::new();
    let plan = |config: &Path| -> Value {
        let run = st_tune(
            &["plan", "--config", config.to_str().unwrap(), "--json"],
            None,
        );
        assert_eq!(run.code, 0, "{}", run.stderr);
        serde_json::from_str(&run.stdout).unwrap()
    };
    let guided = plan(&s.config("guided", Some(&s.guide), 8));
    // The same run with MNRL: no guide.
    let mnrl = s.config("mnrl", None, 8);
    let text = std::fs::read_to_string(&mnrl)
        .unwrap()
        .replace("\"gist\"", "\"mnrl\"");
    std::fs::write(&mnrl, text).unwrap();
    let plain = plan(&mnrl);
    let guide_weights = tensors(&s.guide)
        .values()
        .map(|t| t.elem_count() as u64 * 4)
        .sum::<u64>();
    let (g, p) = (&guided["estimate"], &plain["estimate"]);
    assert_eq!(p["guide"], 0);
    assert!(g["guide"].as_u64().unwrap() >= guide_weights, "{g}");
    assert_eq!(
        g["total"].as_u64().unwrap() - p["total"].as_u64().unwrap(),
        g["guide"].as_u64().unwrap()
    );
}

fn assert_config_error(run: &Run, needles: &[&str]) {
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(run.code, 2, "stderr:\n{}", run.stderr);
    for n in needles {
        assert!(
            run.stderr.contains(n),
            "stderr should mention {n:?}:\n{}",
            run.stderr
        );
    }
}

#[test]
fn gist_without_a_guide_section_is_a_config_error_naming_the_key() {
    let s = Setup::new();
    let run = s.train(&s.config("none", None, 8), None);
    assert_config_error(&run, &["guide.path", "train.loss = \"gist\""]);
}

#[test]
fn a_guide_that_does_not_exist_or_cannot_be_read_names_the_key_and_the_file() {
    let s = Setup::new();
    let missing = s.dir.path().join("no-such-guide");
    let run = s.train(&s.config("missing", Some(&missing), 8), None);
    assert_config_error(&run, &["guide.path", "no-such-guide"]);

    let broken = s.dir.path().join("broken-tokenizer");
    common::tiny_model(&broken, false, 1, 4);
    std::fs::write(broken.join("tokenizer.json"), "{ not json").unwrap();
    let run = s.train(&s.config("broken", Some(&broken), 8), None);
    assert_config_error(&run, &["guide.path", "broken-tokenizer/tokenizer.json"]);

    let bad_config = s.dir.path().join("bad-config");
    common::tiny_model(&bad_config, false, 1, 4);
    std::fs::write(bad_config.join("config.json"), "[1, 2").unwrap();
    let run = s.train(&s.config("bad", Some(&bad_config), 8), None);
    assert_config_error(&run, &["guide.path", "bad-config", "config.json"]);
    // Nothing trained: no output folder.
    assert!(!s.dir.path().join("bad").exists());
}

/// Real models, against Python (tests/fixtures/gist-real.json, scripts/make_gist_fixture.py):
/// all-MiniLM-L6-v2 trained, all-mpnet-base-v2 guiding. Their vocabularies differ, so the guide
/// reads the model's tokens decoded and tokenized again: the same ids as Python's, then the
/// same loss and gradient on the model's embeddings.
#[test]
fn minilm_guided_by_mpnet_reads_the_same_tokens_and_gives_the_same_loss_as_python() {
    use candle_core::{Device, Tensor, Var};
    use st_tune::data::batch::TokenBatch;
    use st_tune::data::tokenized::TokenizedData;
    use st_tune::losses::{compute, Extra, LossKind};
    use st_tune::model::dropout::Dropout;
    use st_tune::model::SentenceModel;

    let fx: Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("gist-real.json")).unwrap())
            .unwrap();
    let load = |name: &str| {
        let path = common::real_model(name);
        SentenceModel::load(path.to_str().unwrap(), &Device::Cpu, None).unwrap()
    };
    let (model, guide) = (load("all-MiniLM-L6-v2"), load("all-mpnet-base-v2"));
    let texts = |key: &str| -> Vec<String> {
        let items = fx[key].as_array().unwrap();
        items
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect()
    };
    let columns = [texts("anchors"), texts("positives")];
    let n = columns[0].len();
    let per_column: Vec<Vec<Vec<u32>>> = columns
        .iter()
        .map(|c| {
            let refs: Vec<&str> = c.iter().map(String::as_str).collect();
            model.tokenizer.encode(&refs).unwrap()
        })
        .collect();
    let data = TokenizedData {
        tokens: (0..n)
            .map(|r| per_column.iter().map(|c| c[r].clone()).collect())
            .collect(),
        scores: vec![None; n],
        teachers: Vec::new(),
        columns: 2,
        prompt_tokens: vec![0, 0],
    };
    let own = st_tune::train::guide::tokens(&model.tokenizer, &guide.tokenizer, &data)
        .unwrap()
        .expect("another vocabulary: the guide retokenizes");
    for c in 0..2 {
        for r in 0..n {
            let want: Vec<u32> = fx["guide_ids"][c][r]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as u32)
                .collect();
            assert_eq!(own.tokens[r][c], want, "column {c}, row {r}");
        }
    }
    let embed = |m: &SentenceModel, d: &TokenizedData, c: usize| -> Tensor {
        let rows: Vec<&[u32]> = d.tokens.iter().map(|r| r[c].as_slice()).collect();
        let batch = TokenBatch::new(&rows, &Device::Cpu).unwrap();
        let net = m.inference_network().unwrap();
        net.forward(&batch, &Dropout::off()).unwrap()
    };
    let vars: Vec<Var> = (0..2)
        .map(|c| Var::from_tensor(&embed(&model, &data, c)).unwrap())
        .collect();
    let cols: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let guided: Vec<Tensor> = (0..2).map(|c| embed(&guide, &own, c)).collect();
    let extra = Extra {
        labels: None,
        guide: Some(&guided),
    };
    let scale = fx["scale"].as_f64().unwrap();
    let loss = compute(LossKind::Gist, scale, None, &cols, extra).unwrap();
    let (got, want) = (
        loss.to_scalar::<f32>().unwrap() as f64,
        fx["value"].as_f64().unwrap(),
    );
    let rel = (got - want).abs() / want.abs().max(1.0);
    assert!(rel <= 1e-5, "loss {got} != {want}");
    let grads = loss.backward().unwrap();
    let mut worst = 0f32;
    for (c, var) in vars.iter().enumerate() {
        let got = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (r, row) in got.iter().enumerate() {
            for (k, x) in row.iter().enumerate() {
                let want = fx["grads"][c][r][k].as_f64().unwrap() as f32;
                worst = worst.max((x - want).abs());
            }
        }
    }
    eprintln!(
        "real models: loss {got} vs {want} (relative {rel:e}), worst gradient difference {worst:e}"
    );
    assert!(worst <= 1e-5, "gradients differ by {worst}");
}

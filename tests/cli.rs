//! The real `st-tune` binary on good and bad input: exit codes (0 success, 1 other failure,
//! 2 bad input, see `Error::exit_code`), and error messages that name the file, line, key or
//! tensor to fix, never a panic.
//!
//! Every model here is a tiny random one written by `common::tiny_model` (hidden size 16), so
//! each test runs in well under a second of compute; no test needs the real weights or a network.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use serde_json::Value;
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// What a run of the binary gave back.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `st-tune ARGS` with `env` added. The hub is kept offline, fault injection off unless
/// asked for, and candle on one thread (the test machine is small and shared).
fn run_env(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_st-tune"));
    cmd.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("ST_TUNE_INJECT_OOM");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the st-tune binary runs");
    Run {
        code: out
            .status
            .code()
            .expect("st-tune exited, not killed by a signal"),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn run(args: &[&str]) -> Run {
    run_env(args, &[])
}

impl Run {
    /// Asserts a clean success.
    fn succeeded(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts exit code `code`, no panic, and that stderr holds every one of `needles`.
    fn failed_with(&self, code: i32, needles: &[&str]) -> &Self {
        assert!(
            !self.stderr.contains("panicked"),
            "st-tune panicked:\n{}",
            self.stderr
        );
        assert_eq!(
            self.code, code,
            "exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.starts_with("error: "),
            "stderr should start with `error: `:\n{}",
            self.stderr
        );
        for n in needles {
            assert!(
                self.stderr.contains(n),
                "stderr should mention {n:?}:\n{}",
                self.stderr
            );
        }
        self
    }

    /// Non-empty stdout lines parsed as JSON.
    fn json_lines(&self) -> Vec<Value> {
        json_lines(&self.stdout)
    }
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// A tiny random model (1 layer, hidden 16) in `dir/name`.
fn tiny(dir: &TempDir, name: &str, mpnet: bool) -> PathBuf {
    let path = dir.path().join(name);
    common::tiny_model(&path, mpnet, 1, 7);
    path
}

fn write(dir: &TempDir, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Texts made only of words the tiny tokenizer knows.
const TEXTS: &[&str] = &[
    "the cat sat on the mat.",
    "a dog runs fast.",
    "a man is playing guitar.",
    "the plane is taking off!",
    "a woman is playing.",
    "the big red dog.",
    "a small blue cat.",
    "the man runs.",
    "a cat is on a mat.",
    "the woman sat.",
    "x y z",
    "dogs and cats?",
];

/// A scored CSV (sentence1,sentence2,score) of `rows` rows.
fn scored_csv(rows: usize) -> String {
    let mut out = String::from("sentence1,sentence2,score\n");
    for i in 0..rows {
        let (a, b) = (TEXTS[i % TEXTS.len()], TEXTS[(i * 5 + 3) % TEXTS.len()]);
        out.push_str(&format!("{a},{b},{:.2}\n", (i % 5) as f32 / 4.0));
    }
    out
}

/// An anchor,positive CSV of `rows` rows.
fn pairs_csv(rows: usize) -> String {
    let mut out = String::from("anchor,positive\n");
    for i in 0..rows {
        out.push_str(&format!(
            "{},{}\n",
            TEXTS[i % TEXTS.len()],
            TEXTS[(i + 1) % TEXTS.len()]
        ));
    }
    out
}

fn toml_str(p: &Path) -> String {
    toml::Value::String(s(p).to_string()).to_string()
}

/// Writes `dir/run.toml` naming the model, the training file and `dir/out`, plus `extra` TOML
/// lines under `[train]`. Returns (config path, output dir).
fn write_config(
    dir: &TempDir,
    model: &Path,
    train: &Path,
    extra_train: &str,
) -> (PathBuf, PathBuf) {
    let out = dir.path().join("out");
    let text = format!(
        "[model]\npath = {}\n\n[data]\ntrain = {}\n\n[train]\n{extra_train}\n\n[output]\ndir = {}\n",
        toml_str(model),
        toml_str(train),
        toml_str(&out)
    );
    (write(dir, "run.toml", text), out)
}

/// A tiny BERT, a 12-row scored CSV and a config for them: the usual training setup.
struct TrainSetup {
    dir: TempDir,
    model: PathBuf,
    config: PathBuf,
    out: PathBuf,
}

fn train_setup(data: &str, data_name: &str) -> TrainSetup {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "model", false);
    let train = write(&dir, data_name, data);
    let (config, out) = write_config(&dir, &model, &train, "");
    TrainSetup {
        dir,
        model,
        config,
        out,
    }
}

/// `st-tune train --config CONFIG ARGS...` with `--set` pairs for a 3-step run of 4 rows.
fn train_args<'a>(config: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        "--config",
        s(config),
        "--set",
        "train.max_steps=3",
        "--set",
        "train.batch_size=4",
    ];
    args.extend_from_slice(extra);
    args
}

/// Rewrites the model's model.safetensors after `edit` has changed its tensors.
fn edit_weights(model: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = model.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut tensors);
    candle_core::safetensors::save(&tensors, &path).unwrap();
}

/// Encodes `TEXTS[..n]` with `model`, returning the embeddings of stdout.
fn encode_ok(model: &Path, dir: &TempDir, n: usize) -> Vec<Vec<f64>> {
    let input = write(dir, "texts.txt", TEXTS[..n].join("\n") + "\n");
    let r = run(&["encode", "--model", s(model), "--input", s(&input)]);
    r.succeeded();
    embeddings(&r.json_lines(), n)
}

/// Checks `n` lines of {"text", "embedding"} in input order, each of dimension 16 and unit
/// length (the tiny models end with Normalize), and returns the embeddings.
fn embeddings(lines: &[Value], n: usize) -> Vec<Vec<f64>> {
    assert_eq!(lines.len(), n, "one JSON line per text");
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            assert_eq!(l["text"], TEXTS[i], "lines come back in input order");
            let e: Vec<f64> = l["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(e.len(), 16, "tiny models embed in 16 dimensions");
            let norm = e.iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!(
                (norm - 1.0).abs() < 1e-4,
                "normalized embedding, got norm {norm}"
            );
            e
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// encode and eval: happy paths
// ---------------------------------------------------------------------------------------------

#[test]
fn encode_prints_one_json_line_per_text_for_a_tiny_bert_model() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let emb = encode_ok(&model, &dir, 5);
    assert_ne!(emb[0], emb[1], "different texts get different embeddings");
}

#[test]
fn encode_writes_the_output_file_for_a_tiny_mpnet_model() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "mpnet", true);
    let input = write(&dir, "texts.txt", TEXTS[..4].join("\n")); // no newline at the end
    let output = dir.path().join("emb.jsonl");
    let r = run(&[
        "encode",
        "-m",
        s(&model),
        "-i",
        s(&input),
        "-o",
        s(&output),
        "--batch-size",
        "3",
    ]);
    r.succeeded();
    assert!(
        r.stdout.trim().is_empty(),
        "with --output nothing goes to stdout: {}",
        r.stdout
    );
    embeddings(&json_lines(&std::fs::read_to_string(&output).unwrap()), 4);
}

#[test]
fn eval_json_prints_spearman_pearson_and_the_number_of_pairs() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let data = write(&dir, "dev.csv", scored_csv(8));
    let r = run(&["eval", "--model", s(&model), "--data", s(&data), "--json"]);
    r.succeeded();
    let lines = r.json_lines();
    assert_eq!(lines.len(), 1, "one JSON object: {}", r.stdout);
    let c = &lines[0];
    assert_eq!(c["pairs"], 8);
    for key in ["spearman", "pearson"] {
        let v = c[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is a number: {c}"));
        assert!((-1.0..=1.0).contains(&v), "{key} = {v} is a correlation");
    }
}

use st_tune::config::metric::RETRIEVAL as RETRIEVAL_KEYS;

/// Every retrieval figure is there and lies in [0, 1].
fn assert_retrieval_figures(v: &Value) {
    for key in RETRIEVAL_KEYS {
        let x = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} is a number: {v}"));
        assert!((0.0..=1.0).contains(&x), "{key} = {x}: {v}");
    }
}

#[test]
fn eval_of_pairs_and_triplets_prints_retrieval_figures() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    // 10 rows over TEXTS (10 texts): every anchor and every positive is distinct.
    let data = write(&dir, "pairs.csv", pairs_csv(10));
    let r = run(&["eval", "--model", s(&model), "--data", s(&data), "--json"]);
    r.succeeded();
    let lines = r.json_lines();
    assert_eq!(lines.len(), 1, "one JSON object: {}", r.stdout);
    assert_retrieval_figures(&lines[0]);
    assert_eq!(lines[0]["queries"], 10);
    assert_eq!(lines[0]["corpus"], 10);
    assert_eq!(lines[0]["similarity"], "cosine");
    // One relevant document per query and all ten retrieved: recall@10 is 1.
    assert_eq!(lines[0]["recall@10"], 1.0);

    let mut triplets = String::from("anchor,positive,negative\n");
    for i in 0..6 {
        let t = |k: usize| TEXTS[(i + k) % TEXTS.len()];
        triplets.push_str(&format!("{},{},{}\n", t(0), t(1), t(5)));
    }
    let data = write(&dir, "triplets.csv", triplets);
    let r = run(&["eval", "--model", s(&model), "--data", s(&data)]);
    r.succeeded();
    for key in [
        "queries 6, corpus 10",
        "ndcg@10",
        "map@100",
        "precision@5",
        "cosine_accuracy",
    ] {
        assert!(r.stdout.contains(key), "{key}:\n{}", r.stdout);
    }
}

#[test]
fn eval_of_labelled_pairs_prints_binary_classification_figures_and_train_picks_one() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let mut labelled = String::from("sentence1,sentence2,label\n");
    for i in 0..12 {
        let (a, b) = (TEXTS[i % TEXTS.len()], TEXTS[(i * 3 + 1) % TEXTS.len()]);
        labelled.push_str(&format!("{a},{b},{}\n", i % 2));
    }
    let data = write(&dir, "labelled.csv", &labelled);
    let r = run(&["eval", "--model", s(&model), "--data", s(&data), "--json"]);
    r.succeeded();
    let lines = r.json_lines();
    assert_eq!(lines.len(), 1, "one JSON object: {}", r.stdout);
    for key in [
        "cosine_accuracy",
        "cosine_accuracy_threshold",
        "cosine_f1",
        "cosine_f1_threshold",
        "cosine_precision",
        "cosine_recall",
        "cosine_ap",
        "cosine_mcc",
    ] {
        assert!(lines[0][key].is_f64(), "{key}: {}", lines[0]);
    }
    assert_eq!(lines[0]["pairs"], 12);

    // The same file trains the contrastive losses, and as a dev file picks by any figure.
    let (config, out) = write_config(&dir, &model, &data, "loss = \"online_contrastive\"");
    let dev = format!("data.dev={}", s(&data));
    let r = run(&train_args(
        &config,
        &["--set", &dev, "--set", "train.metric=cosine_f1", "--json"],
    ));
    r.succeeded();
    let evals = eval_lines(&out);
    assert!(evals.iter().all(|e| e["cosine_f1"].is_f64()), "{evals:?}");
    assert_eq!(summary(&r)["best_dev"]["metric"], "cosine_f1");
    std::fs::remove_dir_all(&out).unwrap();
    run(&train_args(
        &config,
        &["--set", &dev, "--set", "train.metric=ndcg@10"],
    ))
    .failed_with(2, &["train.metric", "\"ndcg@10\"", "cosine_ap"]);
}

// ---------------------------------------------------------------------------------------------
// encode: bad input
// ---------------------------------------------------------------------------------------------

/// Runs encode of a valid two-line input with `model`.
fn encode_with_model(dir: &TempDir, model: &Path) -> Run {
    let input = write(dir, "texts.txt", "the cat sat.\na dog runs.\n");
    run(&["encode", "--model", s(model), "--input", s(&input)])
}

#[test]
fn encode_of_an_empty_input_file_names_the_file() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let input = write(&dir, "empty.txt", "");
    run(&["encode", "--model", s(&model), "--input", s(&input)])
        .failed_with(2, &["empty.txt: no texts"]);
}

#[test]
fn encode_names_the_line_that_is_not_utf8() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let input = write(
        &dir,
        "texts.txt",
        b"the cat sat.\na dog runs.\nthe \xff\xfe mat.\nx y z\n",
    );
    run(&["encode", "--model", s(&model), "--input", s(&input)])
        .failed_with(2, &["texts.txt:3:", "UTF-8"]);
}

#[test]
fn encode_names_an_empty_line_in_the_middle() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let input = write(&dir, "texts.txt", "the cat sat.\n\na dog runs.\n");
    run(&["encode", "--model", s(&model), "--input", s(&input)])
        .failed_with(2, &["texts.txt:2:", "empty line"]);
}

#[test]
fn encode_of_a_missing_input_file_names_it() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let input = dir.path().join("nope.txt");
    // A file that cannot be read is an I/O error: exit code 1 ("other failure").
    run(&["encode", "--model", s(&model), "--input", s(&input)]).failed_with(2, &["nope.txt"]);
}

#[test]
fn encode_rejects_an_unknown_device_and_lists_the_valid_ones() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let input = write(&dir, "texts.txt", "the cat sat.\n");
    run(&[
        "encode",
        "--model",
        s(&model),
        "--input",
        s(&input),
        "--device",
        "tpu",
    ])
    .failed_with(2, &["`tpu`", "cpu, cuda or cuda:N"]);
}

#[test]
fn encode_rejects_a_folder_without_modules_json_or_config_json() {
    let dir = TempDir::new().unwrap();
    let model = dir.path().join("not-a-model");
    std::fs::create_dir(&model).unwrap();
    encode_with_model(&dir, &model)
        .failed_with(2, &["not-a-model", "neither modules.json nor config.json"]);
}

#[test]
fn encode_rejects_a_model_path_that_is_neither_a_folder_nor_a_hub_id() {
    let dir = TempDir::new().unwrap();
    let model = dir.path().join("missing-model");
    encode_with_model(&dir, &model).failed_with(2, &["missing-model", "not a model folder"]);
}

#[test]
fn encode_names_an_unknown_model_type_in_config_json() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let cfg_path = model.join("config.json");
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["model_type"] = "deberta-v2".into();
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    // Every family st-tune reads is listed, as the error spells it.
    let supported: Vec<String> = st_tune::model::config::SUPPORTED
        .iter()
        .map(|t| format!("`{t}`"))
        .collect();
    assert!(supported.len() >= 6, "{supported:?}");
    let mut want = vec!["config.json", "unknown model_type `deberta-v2`"];
    want.extend(supported.iter().map(String::as_str));
    encode_with_model(&dir, &model).failed_with(2, &want);
}

#[test]
fn encode_names_a_missing_tensor() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let name = "encoder.layer.0.attention.self.query.weight";
    edit_weights(&model, |t| {
        t.remove(name).expect("the tiny BERT has this tensor");
    });
    encode_with_model(&dir, &model).failed_with(
        2,
        &[
            "model.safetensors",
            &format!("`{name}` is missing"),
            "[16, 16]",
        ],
    );
}

#[test]
fn encode_names_a_mis_shaped_tensor_with_both_shapes() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "mpnet", true);
    let name = "encoder.layer.0.intermediate.dense.weight";
    edit_weights(&model, |t| {
        t.insert(
            name.into(),
            Tensor::zeros((16, 16), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    });
    encode_with_model(&dir, &model).failed_with(2, &[&format!("`{name}`"), "[16, 16]", "[32, 16]"]);
}

#[test]
fn encode_rejects_a_truncated_safetensors_file() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let path = model.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    encode_with_model(&dir, &model).failed_with(2, &["model.safetensors", "corrupt or truncated"]);
}

#[test]
fn encode_names_a_missing_weights_file() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    std::fs::remove_file(model.join("model.safetensors")).unwrap();
    encode_with_model(&dir, &model).failed_with(2, &["model.safetensors", "not found"]);
}

#[test]
fn eval_of_a_header_that_fits_no_evaluation_names_the_file_and_both_layouts() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let data = write(
        &dir,
        "qa.csv",
        "question,answer\nthe cat sat.,a dog runs fast.\n",
    );
    let r = run(&["eval", "--model", s(&model), "--data", s(&data)]);
    r.failed_with(
        2,
        &[
            "qa.csv:1:",
            "`question`, `answer`",
            "fits no evaluation",
            "sentence1,sentence2,score",
            "anchor,positive[,negative]",
        ],
    );
    assert!(
        !r.stderr.contains("--set"),
        "eval has no --set: {}",
        r.stderr
    );
    let data = write(
        &dir,
        "both.csv",
        "anchor,positive,sentence1,sentence2,score\na,b,c,d,1\n",
    );
    run(&["eval", "--model", s(&model), "--data", s(&data)])
        .failed_with(2, &["both.csv:1:", "keep the columns of one"]);
    let data = write(&dir, "pairs.txt", pairs_csv(4));
    run(&["eval", "--model", s(&model), "--data", s(&data)])
        .failed_with(2, &["pairs.txt", ".csv, .tsv, .jsonl or .parquet"]);
}

#[test]
fn eval_names_the_line_of_an_empty_text_in_a_triplets_file() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "bert", false);
    let data = write(
        &dir,
        "dev.jsonl",
        "{\"anchor\": \"a cat.\", \"positive\": \"a dog.\", \"negative\": \"x\"}\n\
         {\"anchor\": \"a cat.\", \"positive\": \"a dog.\", \"negative\": \" \"}\n",
    );
    run(&["eval", "--model", s(&model), "--data", s(&data)])
        .failed_with(2, &["dev.jsonl:2:", "column `negative` is empty"]);
}

// ---------------------------------------------------------------------------------------------
// train: bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn train_with_a_missing_data_file_names_the_file() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "model", false);
    let (config, _) = write_config(&dir, &model, &dir.path().join("missing.csv"), "");
    // A file that cannot be read is an I/O error: exit code 1 ("other failure").
    run(&train_args(&config, &[])).failed_with(2, &["missing.csv"]);
}

#[test]
fn train_with_a_missing_config_file_names_the_file() {
    let dir = TempDir::new().unwrap();
    let config = dir.path().join("missing.toml");
    run(&["train", "--config", s(&config)]).failed_with(2, &["missing.toml"]);
}

#[test]
fn train_names_the_file_and_line_of_a_row_with_too_few_columns() {
    let mut data = scored_csv(6);
    data.push_str("the cat sat.,0.5\n"); // line 8: two fields under a three-column header
    let t = train_setup(&data, "train.csv");
    run(&train_args(&t.config, &[]))
        .failed_with(2, &["train.csv:8:", "expected 3 columns", "found 2"]);
}

#[test]
fn train_on_an_empty_data_file_names_the_file() {
    let t = train_setup("", "train.csv");
    run(&train_args(&t.config, &[])).failed_with(2, &["train.csv", "file is empty", "header"]);
}

#[test]
fn train_names_a_score_that_is_not_a_number() {
    let data = "sentence1,sentence2,score\nthe cat.,a dog.,0.5\nthe man.,a woman.,high\n";
    let t = train_setup(data, "train.csv");
    run(&train_args(&t.config, &[])).failed_with(2, &["train.csv:3:", "`high`", "not a number"]);
}

#[test]
fn train_names_an_empty_text() {
    let data = "anchor,positive\nthe cat.,a dog.\nthe man.,\"  \"\n";
    let t = train_setup(data, "train.csv");
    run(&train_args(&t.config, &["--set", "train.loss=mnrl"]))
        .failed_with(2, &["train.csv:3:", "column `positive` is empty"]);
}

#[test]
fn train_names_the_key_of_a_value_of_the_wrong_type() {
    let t = train_setup(&scored_csv(12), "train.csv");
    run(&[
        "train",
        "--config",
        s(&t.config),
        "--set",
        "train.batch_size=sixteen",
    ])
    .failed_with(2, &["train.batch_size", "sixteen"]);
}

#[test]
fn train_names_a_wrong_type_in_the_config_file_too() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "model", false);
    let train = write(&dir, "train.csv", scored_csv(12));
    let (config, _) = write_config(&dir, &model, &train, "lr = \"fast\"");
    run(&["train", "--config", s(&config)]).failed_with(2, &["train.lr", "fast"]);
}

#[test]
fn train_suggests_train_lr_for_the_unknown_key_train_lrr() {
    let t = train_setup(&scored_csv(12), "train.csv");
    run(&["train", "--config", s(&t.config), "--set", "train.lrr=3e-5"])
        .failed_with(2, &["train.lrr", "unknown key", "did you mean `train.lr`"]);
}

#[test]
fn train_rejects_a_micro_batch_larger_than_the_batch() {
    let t = train_setup(&scored_csv(12), "train.csv");
    run(&train_args(
        &t.config,
        &["--set", "train.micro_batch_size=8"],
    ))
    .failed_with(
        2,
        &["train.micro_batch_size", "(8)", "train.batch_size (4)"],
    );
}

#[test]
fn train_with_mnrl_on_scored_pairs_names_train_loss() {
    let t = train_setup(&scored_csv(12), "train.csv");
    run(&train_args(&t.config, &["--set", "train.loss=mnrl"]))
        .failed_with(2, &["train.loss", "`mnrl`", "scored pairs"]);
}

#[test]
fn train_with_cosent_on_anchor_positive_pairs_names_train_loss() {
    let t = train_setup(&pairs_csv(12), "train.csv");
    run(&train_args(&t.config, &["--set", "train.loss=cosent"]))
        .failed_with(2, &["train.loss", "`cosent`", "anchor-positive pairs"]);
}

#[test]
fn train_without_a_model_path_says_model_path_is_required() {
    let dir = TempDir::new().unwrap();
    let config = write(&dir, "run.toml", "");
    run(&["train", "--config", s(&config)]).failed_with(2, &["model.path", "required"]);
}

#[test]
fn train_with_a_toml_syntax_error_names_the_config_file() {
    let dir = TempDir::new().unwrap();
    let config = write(&dir, "broken.toml", "[train]\nlr = = 3\n");
    run(&["train", "--config", s(&config)]).failed_with(2, &["broken.toml", "line 2"]);
}

#[test]
fn bench_refuses_a_lever_the_config_does_not_name_listing_those_it_does() {
    run(&[
        "bench",
        "memory",
        "--config",
        "none.toml",
        "--levers",
        "f32,ckpt",
    ])
    .failed_with(2, &["ckpt", "gradient_checkpointing", "freeze_layers"]);
}

#[test]
fn config_without_defaults_says_what_to_run() {
    run(&["config"]).failed_with(2, &["config --defaults"]);
}

#[test]
fn config_defaults_lists_the_keys_and_runs_a_tiny_training_when_given_model_and_data() {
    let r = run(&["config", "--defaults"]);
    r.succeeded();
    let defaults: toml::Table = r.stdout.parse().expect("the defaults are valid TOML");
    for section in ["model", "data", "train", "memory", "output"] {
        assert!(
            defaults.contains_key(section),
            "defaults should have [{section}]:\n{}",
            r.stdout
        );
    }
    assert_eq!(
        defaults["train"]["lr"].as_float(),
        Some(2e-5),
        "train.lr is listed with its default"
    );
    assert!(
        r.stdout.contains("# Peak learning rate"),
        "each key has its help line"
    );
    let dir = TempDir::new().unwrap();
    let config = write(&dir, "defaults.toml", &r.stdout);
    let model = tiny(&dir, "model", false);
    let train = write(&dir, "train.csv", scored_csv(4));
    let out = dir.path().join("out");
    let set = |k: &str, v: &Path| format!("{k}={}", s(v));
    let (m, d, o) = (
        set("model.path", &model),
        set("data.train", &train),
        set("output.dir", &out),
    );
    run(&[
        "train",
        "-c",
        s(&config),
        "--set",
        &m,
        "--set",
        &d,
        "--set",
        &o,
        "--set",
        "train.max_steps=1",
    ])
    .succeeded();
    assert!(out.join("final/model.safetensors").exists());
}

// ---------------------------------------------------------------------------------------------
// train: happy path, reload, OOM injection
// ---------------------------------------------------------------------------------------------

/// The `--json` summary line (the last line of stdout).
fn summary(r: &Run) -> Value {
    let lines = r.json_lines();
    let last = lines
        .last()
        .unwrap_or_else(|| panic!("no JSON on stdout:\n{}", r.stdout))
        .clone();
    assert_eq!(
        last["event"], "summary",
        "the last line is the summary: {last}"
    );
    last["data"].clone()
}

fn file_lines(path: &Path) -> Vec<Value> {
    json_lines(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

#[test]
fn a_tiny_training_run_saves_a_folder_that_encode_loads() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let r = run(&train_args(&t.config, &["--json"]));
    r.succeeded();
    let sum = summary(&r);
    assert_eq!(sum["steps"], 3);
    assert_eq!(sum["ooms_recovered"], 0);
    assert!(
        sum["final_loss"].as_f64().is_some_and(f64::is_finite),
        "finite loss: {sum}"
    );
    assert_eq!(Path::new(sum["output_dir"].as_str().unwrap()), t.out);

    let final_dir = t.out.join("final");
    for f in [
        "model.safetensors",
        "modules.json",
        "config.json",
        "tokenizer.json",
        "1_Pooling/config.json",
    ] {
        assert!(final_dir.join(f).exists(), "final/{f} was saved");
    }
    let metrics = file_lines(&t.out.join("metrics.jsonl"));
    let steps: Vec<u64> = metrics.iter().filter_map(|m| m["step"].as_u64()).collect();
    assert_eq!(steps, [1, 2, 3], "one metrics line per step: {metrics:?}");
    let events = file_lines(&t.out.join("events.jsonl"));
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds, ["checkpoint"], "no OOM; one checkpoint at the end");

    // The saved folder is a working model, and training changed it.
    let trained = encode_ok(&final_dir, &t.dir, 3);
    let base = encode_ok(&t.model, &t.dir, 3);
    assert_ne!(trained, base, "three steps of training moved the weights");
}

#[test]
fn mse_distils_from_the_file_encode_writes_and_a_wrong_width_is_named() {
    let dir = TempDir::new().unwrap();
    let teacher = dir.path().join("teacher");
    common::tiny_model(&teacher, false, 1, 11);
    let student = tiny(&dir, "student", false);
    let texts = write(&dir, "texts.txt", TEXTS[..8].join("\n") + "\n");
    let train = dir.path().join("teacher.jsonl");
    run(&[
        "encode",
        "--model",
        s(&teacher),
        "--input",
        s(&texts),
        "--output",
        s(&train),
    ])
    .succeeded();
    let target = embeddings(&file_lines(&train), 8);
    let distance = |model: &Path| -> f64 {
        let got = encode_ok(model, &dir, 8);
        got.iter()
            .flatten()
            .zip(target.iter().flatten())
            .map(|(a, b)| (a - b).powi(2))
            .sum()
    };
    let (config, out) = write_config(&dir, &student, &train, "loss = \"mse\"\nlr = 5e-3");
    let r = run(&train_args(
        &config,
        &["--json", "--set", "train.max_steps=6"],
    ));
    r.succeeded();
    let before = distance(&student);
    let after = distance(&out.join("final"));
    assert!(
        after < before,
        "distillation moved the student towards the teacher: {before} -> {after}"
    );

    std::fs::remove_dir_all(&out).unwrap();
    let narrow = write(
        &dir,
        "narrow.jsonl",
        "{\"text\": \"a dog runs fast.\", \"embedding\": [0.1, 0.2, 0.3]}\n",
    );
    let (config, _) = write_config(&dir, &student, &narrow, "loss = \"mse\"");
    run(&train_args(&config, &[])).failed_with(
        2,
        &[
            "narrow.jsonl:1:",
            "3 numbers",
            "the model's embeddings have 16",
        ],
    );
}

#[test]
fn train_reads_a_parquet_file_that_datasets_wrote_and_names_a_bad_row() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "model", false);
    let train = common::fixture("parquet-labelled.parquet");
    let (config, out) = write_config(&dir, &model, &train, "loss = \"contrastive\"");
    let r = run(&train_args(&config, &["--json"]));
    r.succeeded();
    assert_eq!(summary(&r)["steps"], 3);
    std::fs::remove_dir_all(&out).unwrap();
    let bad = common::fixture("parquet-bad-label.parquet");
    let (config, _) = write_config(&dir, &model, &bad, "loss = \"contrastive\"");
    run(&train_args(&config, &[])).failed_with(
        2,
        &[
            "parquet-bad-label.parquet: row group 1, row 2",
            "must be 0 or 1",
        ],
    );
}

#[test]
fn a_tiny_mpnet_training_run_saves_a_folder_that_encode_loads() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "model", true);
    let train = write(
        &dir,
        "train.jsonl",
        pairs_csv(8)
            .lines()
            .skip(1)
            .map(|l| {
                let (a, p) = l.split_once(',').unwrap();
                serde_json::json!({"anchor": a, "positive": p}).to_string() + "\n"
            })
            .collect::<String>(),
    );
    let (config, out) = write_config(&dir, &model, &train, "loss = \"mnrl\"");
    run(&train_args(&config, &["--set", "train.micro_batch_size=2"])).succeeded();
    assert_eq!(file_lines(&out.join("metrics.jsonl")).len(), 3);
    encode_ok(&out.join("final"), &dir, 2);
}

#[test]
fn a_pairs_dev_file_is_evaluated_by_retrieval_and_picks_best_by_ndcg() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let dev = write(&t.dir, "dev.csv", pairs_csv(10));
    let r = run(&train_args(
        &t.config,
        &[
            "--json",
            "--set",
            &format!("data.dev={}", toml_str(&dev)),
            "--set",
            "train.eval_steps=2",
        ],
    ));
    r.succeeded();
    let evals: Vec<Value> = file_lines(&t.out.join("metrics.jsonl"))
        .into_iter()
        .filter(|m| m["event"] == "eval")
        .collect();
    let labels: Vec<&str> = evals.iter().filter_map(|e| e["label"].as_str()).collect();
    assert_eq!(labels, ["before", "periodic", "after"], "{evals:?}");
    for e in &evals {
        assert_retrieval_figures(e);
        assert_eq!(e["queries"], 10);
        assert!(e.get("spearman").is_none(), "{e}");
    }
    let sum = summary(&r);
    assert_eq!(sum["best_dev"]["metric"], "ndcg@10", "{sum}");
    let best = evals
        .iter()
        .map(|e| e["ndcg@10"].as_f64().unwrap())
        .fold(f64::MIN, f64::max);
    assert_eq!(sum["best_dev"]["value"].as_f64(), Some(best), "{sum}");
    assert!(sum["best_spearman"].is_null(), "{sum}");
    assert_retrieval_figures(&sum["dev_after"]);
    assert!(t.out.join("best/model.safetensors").exists());
    let card = std::fs::read_to_string(t.out.join("best/README.md")).unwrap();
    assert!(card.contains("best dev ndcg@10"), "{card}");
}

#[test]
fn a_scored_dev_file_still_picks_best_by_spearman() {
    let t = train_setup(&pairs_csv(12), "train.csv");
    let dev = write(&t.dir, "dev.csv", scored_csv(10));
    let r = run(&train_args(
        &t.config,
        &[
            "--json",
            "--set",
            "train.loss=\"mnrl\"",
            "--set",
            &format!("data.dev={}", toml_str(&dev)),
        ],
    ));
    r.succeeded();
    let sum = summary(&r);
    assert_eq!(sum["best_dev"]["metric"], "spearman", "{sum}");
    assert_eq!(sum["best_dev"]["value"], sum["best_spearman"], "{sum}");
    assert!(sum["dev_after"]["spearman"].is_number(), "{sum}");
    assert_eq!(sum["dev_after"]["pairs"], 10, "{sum}");
}

#[test]
fn injected_ooms_are_recovered_and_logged_to_events_and_json_output() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let r = run_env(
        &train_args(&t.config, &["--json"]),
        &[("ST_TUNE_INJECT_OOM", "2:forward,3:optimizer")],
    );
    r.succeeded();
    let sum = summary(&r);
    assert_eq!(sum["steps"], 3);
    assert_eq!(sum["ooms_recovered"], 2);
    assert_eq!(
        sum["final_micro_batch_size"], 2,
        "the forward OOM halved the micro-batch"
    );

    let printed: Vec<Value> = r
        .json_lines()
        .into_iter()
        .filter(|l| l["event"] == "oom")
        .collect();
    assert_eq!(printed.len(), 2, "two oom events on stdout:\n{}", r.stdout);
    let events: Vec<Value> = file_lines(&t.out.join("events.jsonl"))
        .into_iter()
        .filter(|e| e["event"] == "oom")
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        (&events[0]["step"], &events[0]["phase"]),
        (&2.into(), &"forward".into())
    );
    assert_eq!(
        (&events[0]["micro_before"], &events[0]["micro_after"]),
        (&4.into(), &2.into())
    );
    assert_eq!(
        (&events[1]["step"], &events[1]["phase"]),
        (&3.into(), &"optimizer".into())
    );
    assert_eq!(
        file_lines(&t.out.join("metrics.jsonl")).len(),
        3,
        "every step still logged"
    );
    assert!(t.out.join("final/model.safetensors").exists());
}

#[test]
fn a_bogus_oom_injection_spec_is_a_usage_error_naming_the_variable() {
    let t = train_setup(&scored_csv(12), "train.csv");
    run_env(
        &train_args(&t.config, &[]),
        &[("ST_TUNE_INJECT_OOM", "bogus")],
    )
    .failed_with(2, &["ST_TUNE_INJECT_OOM", "`bogus`", "STEP:PHASE"]);
}

// ---------------------------------------------------------------------------------------------
// Ctrl-C, the hub offline, plan, repeatability
// ---------------------------------------------------------------------------------------------

#[test]
fn ctrl_c_stops_after_the_current_step_saves_and_exits_130() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let child = Command::new(env!("CARGO_BIN_EXE_st-tune"))
        .args([
            "train",
            "--config",
            s(&t.config),
            "--set",
            "train.max_steps=100000",
            "--set",
            "train.batch_size=4",
        ])
        .args(["--set", "train.log_steps=1", "--json"])
        .env("RAYON_NUM_THREADS", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until a step has been logged, so the signal arrives mid-training.
    let metrics = t.out.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(true, |m| m.lines().count() < 2) {
        assert!(started.elapsed().as_secs() < 60, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t.out.join("final/model.safetensors").exists(),
        "what was trained is saved"
    );
    let card = std::fs::read_to_string(t.out.join("final/README.md")).unwrap();
    assert!(card.contains("interrupted"), "{card}");
}

#[test]
fn an_uncached_hub_id_offline_says_what_to_do() {
    let dir = TempDir::new().unwrap();
    let input = write(&dir, "in.txt", "hello\n");
    let r = run_env(
        &[
            "encode",
            "--model",
            "sentence-transformers/no-such-model",
            "--input",
            s(&input),
        ],
        &[("HF_HOME", s(dir.path())), ("HF_HUB_OFFLINE", "1")],
    );
    r.failed_with(2, &["HF_HUB_OFFLINE", "not in the Hugging Face cache"]);
}

#[test]
fn plan_prints_an_estimate_and_the_micro_batch_that_fits_the_limit() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let r = run(&[
        "plan",
        "--config",
        s(&t.config),
        "--set",
        "memory.limit=\"64MiB\"",
        "--json",
    ]);
    r.succeeded();
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert!(v["estimate"]["total"].as_u64().unwrap() > 0);
    assert_eq!(v["budget_bytes"].as_u64().unwrap(), 64 << 20);
    assert!(v["largest_fitting_micro_batch"].as_u64().is_some());
    let r = run(&[
        "plan",
        "--config",
        s(&t.config),
        "--set",
        "memory.limit=\"1KiB\"",
    ]);
    r.succeeded();
    assert!(r.stdout.contains("not even one row fits"), "{}", r.stdout);
    assert!(r.stdout.contains("a step needs about"), "{}", r.stdout);
}

#[test]
fn the_same_seed_and_data_give_bit_identical_weights() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let mut weights = Vec::new();
    for out in ["a", "b"] {
        let dir = t.dir.path().join(out);
        let mut args = train_args(&t.config, &["--output", s(&dir)]);
        args.push("--json");
        run_env(&args, &[("RAYON_NUM_THREADS", "2")]).succeeded();
        weights.push(std::fs::read(dir.join("final/model.safetensors")).unwrap());
    }
    assert!(
        weights[0] == weights[1],
        "two runs with the same seed differ"
    );
}

// ---------------------------------------------------------------------------------------------
// Freezing, and limits that only the loaded model knows
// ---------------------------------------------------------------------------------------------

/// The word-embedding table of `dir`'s model.safetensors.
fn word_embeddings(dir: &Path) -> Tensor {
    let t = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    t["embeddings.word_embeddings.weight"].clone()
}

#[test]
fn freeze_layers_freezes_the_embeddings_too_unless_told_otherwise_and_then_warns() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let base = word_embeddings(&t.model);
    let changed = |dir: &Path| common::max_abs_diff(&base, &word_embeddings(&dir.join("final")));

    let frozen = t.dir.path().join("frozen");
    let r = run(&train_args(
        &t.config,
        &["--set", "train.freeze_layers=1", "--output", s(&frozen)],
    ));
    r.succeeded();
    assert!(!r.stdout.contains("warning"), "{}", r.stdout);
    assert_eq!(changed(&frozen), 0.0, "embeddings frozen with the layer");

    let trained = t.dir.path().join("trained");
    let r = run(&train_args(
        &t.config,
        &[
            "--set",
            "train.freeze_layers=1",
            "--set",
            "train.freeze_embeddings=false",
            "--output",
            s(&trained),
        ],
    ));
    r.succeeded();
    assert!(
        r.stdout
            .contains("warning: train.freeze_embeddings = false"),
        "{}",
        r.stdout
    );
    assert!(changed(&trained) > 0.0, "embeddings trained when asked");
}

#[test]
fn freeze_layers_above_the_layer_count_is_a_config_error() {
    let t = train_setup(&scored_csv(12), "train.csv");
    run(&train_args(&t.config, &["--set", "train.freeze_layers=2"]))
        .failed_with(2, &["train.freeze_layers", "is 2", "1 layers", "at most 1"]);
    assert!(!t.out.exists(), "nothing written");
}

#[test]
fn max_seq_length_above_the_position_table_is_a_config_error() {
    let t = train_setup(&scored_csv(12), "train.csv");
    run(&train_args(
        &t.config,
        &["--set", "model.max_seq_length=65"],
    ))
    .failed_with(2, &["model.max_seq_length", "is 65", "64 tokens"]);
}

#[test]
fn a_saved_model_says_which_st_tune_wrote_it() {
    let t = train_setup(&scored_csv(12), "train.csv");
    run(&train_args(&t.config, &[])).succeeded();
    let text =
        std::fs::read_to_string(t.out.join("final/config_sentence_transformers.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["__version__"]["st_tune"],
        env!("CARGO_PKG_VERSION"),
        "{v}"
    );
}

// ---------------------------------------------------------------------------------------------
// shell integration: --version, completions, man
// ---------------------------------------------------------------------------------------------

/// The subcommands every completion script and the man page must name.
const SUBCOMMANDS: [&str; 10] = [
    "train",
    "encode",
    "eval",
    "mine",
    "plan",
    "config",
    "bench",
    "random-model",
    "completions",
    "man",
];

/// The version of `name` in the committed Cargo.lock.
fn locked_version(name: &str) -> String {
    let lock =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock")).unwrap();
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == format!("name = \"{name}\"") {
            let v = lines.next().unwrap();
            return v["version = \"".len()..v.len() - 1].to_string();
        }
    }
    panic!("{name} is not in Cargo.lock");
}

#[test]
fn version_names_st_tune_candle_and_whether_the_build_has_cuda() {
    let want = format!(
        "st-tune {} (candle {}, CUDA: {})",
        env!("CARGO_PKG_VERSION"),
        locked_version("candle-core"),
        if cfg!(feature = "cuda") { "yes" } else { "no" }
    );
    for flag in ["--version", "-V"] {
        let r = run(&[flag]);
        r.succeeded();
        assert_eq!(r.stdout.trim(), want);
    }
}

#[test]
fn completions_for_each_shell_name_every_subcommand() {
    for (shell, marker) in [
        ("bash", "complete -F _st__tune"),
        ("zsh", "#compdef st-tune"),
        ("fish", "complete -c st-tune"),
        ("powershell", "Register-ArgumentCompleter"),
    ] {
        let r = run(&["completions", shell]);
        r.succeeded();
        assert!(r.stdout.contains(marker), "{shell}: no {marker:?}");
        for sub in SUBCOMMANDS {
            assert!(r.stdout.contains(sub), "{shell} script lacks {sub}");
        }
    }
    run(&["completions", "tcsh"]).failed_with(2, &["tcsh", "bash", "powershell"]);
}

/// What the bash script offers for `st-tune WORDS... CUR<TAB>`.
fn bash_completes(script: &Path, words: &[&str]) -> Vec<String> {
    let words_q: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let cur = words.last().unwrap();
    let prev = words[words.len() - 2];
    let code = format!(
        "source '{}'; COMP_WORDS=({}); COMP_CWORD={}; _st__tune st-tune '{cur}' '{prev}'; \
         printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script.display(),
        words_q.join(" "),
        words.len() - 1
    );
    let out = Command::new("bash").args(["-c", &code]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_bash_script_parses_and_completes_subcommands_and_their_options() {
    let dir = TempDir::new().unwrap();
    let r = run(&["completions", "bash"]);
    r.succeeded();
    let script = write(&dir, "st-tune.bash", &r.stdout);
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    assert_eq!(bash_completes(&script, &["st-tune", "ev"]), ["eval"]);
    // After a subcommand (clap_complete's hyphenated-name bug would give nothing here).
    let eval = bash_completes(&script, &["st-tune", "eval", "--"]);
    for opt in ["--model", "--data", "--json"] {
        assert!(eval.iter().any(|o| o == opt), "{opt} in {eval:?}");
    }
    let memory = bash_completes(&script, &["st-tune", "bench", "memory", "--se"]);
    assert_eq!(memory, ["--set", "--seq"]);
}

#[test]
fn man_prints_a_page_naming_every_subcommand_and_one_per_subcommand() {
    let r = run(&["man"]);
    r.succeeded();
    assert!(r.stdout.contains(".TH st-tune 1"), "{}", r.stdout);
    assert!(r.stdout.contains(".SH SUBCOMMANDS"));
    for sub in SUBCOMMANDS {
        let page = format!("st\\-tune\\-{}(1)", sub.replace('-', "\\-"));
        assert!(r.stdout.contains(&page), "the page lists {page}");
    }
    let r = run(&["man", "eval"]);
    r.succeeded();
    assert!(r.stdout.contains(".TH st-tune-eval 1"), "{}", r.stdout);
    assert!(r.stdout.contains("\\-\\-model") && r.stdout.contains("anchor,positive"));
    run(&["man", "nope"]).failed_with(2, &["nope", "train, encode, eval"]);
}

#[test]
fn a_run_with_a_retrieval_dev_file_resumes_with_its_figures() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let dev = write(&t.dir, "dev.csv", pairs_csv(10));
    let dev_set = format!("data.dev={}", toml_str(&dev));
    let args = train_args(
        &t.config,
        &["--json", "--set", &dev_set, "--set", "train.max_steps=8"],
    );
    let stopped = run_env(&args, &[("ST_TUNE_CRASH_AT", "step:2:TERM")]);
    assert_eq!(stopped.code, 143, "{}", stopped.stderr);
    let mut resumed = args.clone();
    resumed.push("--resume");
    let r = run(&resumed);
    r.succeeded();
    let sum = summary(&r);
    // SIGTERM stops the run after the step it arrives in, or (on a busy machine) a little later.
    assert_eq!(sum["steps"], 8, "{sum}");
    let from = sum["resumed_from"].as_u64().unwrap_or(0);
    assert!(
        (2..8).contains(&from),
        "resumed after a step before the last: {sum}"
    );
    // The figures before training come back from the checkpoint's state.json.
    assert_retrieval_figures(&sum["dev_before"]);
    assert_retrieval_figures(&sum["dev_after"]);
    assert_eq!(sum["best_dev"]["metric"], "ndcg@10", "{sum}");
}

// ---------------------------------------------------------------------------------------------
// Pictures and the model card
// ---------------------------------------------------------------------------------------------

/// (width, height) of a PNG file, checking its signature.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is a PNG",
        path.display()
    );
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn a_run_draws_its_curves_and_its_card_says_what_happened() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let dev = write(&t.dir, "dev.csv", scored_csv(8));
    let r = run_env(
        &train_args(
            &t.config,
            &[
                "--set",
                &format!("data.dev={}", s(&dev)),
                "--set",
                "train.micro_batch_size=4",
            ],
        ),
        &[("ST_TUNE_INJECT_OOM", "2:forward")],
    );
    r.succeeded();
    assert!(
        r.stdout.contains("memory: measured peak") && r.stdout.contains("+ optimizer state"),
        "the end-of-run memory summary:\n{}",
        r.stdout
    );
    // Five panels (loss, lr, dev, speed, memory) of 250 px, 1000 px wide.
    assert_eq!(png_size(&t.out.join("training.png")), (1000, 1250));
    assert!(t.out.join("training.svg").exists());
    assert_eq!(png_size(&t.out.join("final/training.png")), (1000, 1250));
    let card = std::fs::read_to_string(t.out.join("final/README.md")).unwrap();
    for needle in [
        "12 rows of (sentence1, sentence2, score)",
        "| spearman |",
        "| pearson |",
        "](training.png)",
        "Out-of-memory events recovered: 1",
        "Micro-batch at the end: 2",
        "SentenceTransformer(",
        "st-tune encode --model",
    ] {
        assert!(card.contains(needle), "card lacks `{needle}`:\n{card}");
    }

    // `st-tune plot` redraws from the files alone.
    std::fs::remove_file(t.out.join("training.png")).unwrap();
    let r = run(&["plot", s(&t.out)]);
    r.succeeded();
    assert_eq!(png_size(&t.out.join("training.png")), (1000, 1250));
}

#[test]
fn plot_of_a_folder_without_metrics_names_the_file() {
    let dir = TempDir::new().unwrap();
    run(&["plot", s(dir.path())]).failed_with(2, &["metrics.jsonl", "nothing to plot"]);
}

// ---------------------------------------------------------------------------------------------
// Matryoshka training
// ---------------------------------------------------------------------------------------------

/// The eval lines of metrics.jsonl.
fn eval_lines(out: &Path) -> Vec<Value> {
    file_lines(&out.join("metrics.jsonl"))
        .into_iter()
        .filter(|m| m["event"] == "eval")
        .collect()
}

#[test]
fn matryoshka_training_reports_the_dev_figures_at_each_width() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let dev = write(&t.dir, "dev.csv", scored_csv(10));
    let dev_set = format!("data.dev={}", toml_str(&dev));
    let r = run(&train_args(
        &t.config,
        &[
            "--json",
            "--set",
            &dev_set,
            "--set",
            "train.matryoshka_dims=[16, 8, 4]",
            "--set",
            "train.matryoshka_weights=[1, 0.5, 0.5]",
        ],
    ));
    r.succeeded();
    let evals = eval_lines(&t.out);
    assert_eq!(evals.len(), 2, "before and after: {evals:?}");
    for e in &evals {
        for w in ["16", "8", "4"] {
            assert!(e["dims"][w]["spearman"].is_number(), "{w}: {e}");
            assert_eq!(e["dims"][w]["pairs"], 10, "{e}");
        }
        // The full width cut to itself is the full width.
        assert_eq!(e["dims"]["16"]["spearman"], e["spearman"], "{e}");
    }
    let sum = summary(&r);
    assert!(sum["dev_after_dims"]["4"]["spearman"].is_number(), "{sum}");
    encode_ok(&t.out.join("final"), &t.dir, 2);

    // A pairs dev file: retrieval figures at each width.
    let t = train_setup(&pairs_csv(12), "train.csv");
    let dev = write(&t.dir, "dev.csv", pairs_csv(10));
    let dev_set = format!("data.dev={}", toml_str(&dev));
    run(&train_args(
        &t.config,
        &[
            "--set",
            "train.loss=\"mnrl\"",
            "--set",
            &dev_set,
            "--set",
            "train.matryoshka_dims=[12, 2]",
        ],
    ))
    .succeeded();
    let e = &eval_lines(&t.out)[1];
    assert_retrieval_figures(&e["dims"]["12"]);
    assert_retrieval_figures(&e["dims"]["2"]);
    assert!(e["dims"].get("16").is_none(), "{e}");
}

#[test]
fn matryoshka_changes_the_trained_model() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let plain = t.dir.path().join("plain");
    let nested = t.dir.path().join("nested");
    run(&train_args(&t.config, &["--output", s(&plain)])).succeeded();
    run(&train_args(
        &t.config,
        &[
            "--output",
            s(&nested),
            "--set",
            "train.matryoshka_dims=[16, 4]",
        ],
    ))
    .succeeded();
    let (diff, name) = common::max_relative_difference(&plain, &nested);
    assert!(diff > 1e-4, "{name} moved by {diff} only");
}

#[test]
fn bad_matryoshka_settings_are_config_errors_naming_the_key() {
    let t = train_setup(&scored_csv(12), "train.csv");
    let bad = |sets: &[&str], needles: &[&str]| {
        let mut extra = Vec::new();
        for set in sets {
            extra.extend(["--set", *set]);
        }
        run(&train_args(&t.config, &extra)).failed_with(2, needles);
    };
    bad(
        &["train.matryoshka_dims=[8, 16]"],
        &["train.matryoshka_dims", "strictly decreasing", "8 then 16"],
    );
    bad(
        &["train.matryoshka_dims=[8, 8]"],
        &["train.matryoshka_dims", "strictly decreasing"],
    );
    bad(
        &["train.matryoshka_dims=[8, 0]"],
        &["train.matryoshka_dims", "at least 1"],
    );
    bad(
        &["train.matryoshka_dims=[]"],
        &["train.matryoshka_dims", "empty"],
    );
    bad(
        &["train.matryoshka_dims=[\"big\"]"],
        &["train.matryoshka_dims", "strictly decreasing"],
    );
    bad(
        &["train.matryoshka_dims=[32, 8]"],
        &[
            "train.matryoshka_dims",
            "holds 32",
            "16 dimensions",
            "at most 16",
        ],
    );
    bad(
        &[
            "train.matryoshka_dims=[16, 8, 4]",
            "train.matryoshka_weights=[1, 1]",
        ],
        &["train.matryoshka_weights", "2 weights", "3 widths"],
    );
    bad(
        &[
            "train.matryoshka_dims=[16, 8]",
            "train.matryoshka_weights=[1, -1]",
        ],
        &["train.matryoshka_weights", "positive"],
    );
    bad(
        &["train.matryoshka_weights=[1]"],
        &["train.matryoshka_weights", "train.matryoshka_dims is not"],
    );
    assert!(!t.out.exists(), "nothing written");
}

#[test]
fn train_metric_picks_the_figure_that_chooses_the_best_model() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "model", false);
    let train = write(&dir, "pairs.csv", pairs_csv(12));
    let (config, out) = write_config(&dir, &model, &train, "loss = \"mnrl\"");
    let dev = format!("data.dev={}", s(&train));
    let r = run(&train_args(
        &config,
        &["--set", &dev, "--set", "train.metric=mrr@10", "--json"],
    ));
    r.succeeded();
    let sum = summary(&r);
    assert_eq!(sum["best_dev"]["metric"], "mrr@10", "{sum}");
    let figure = |when: &str| sum[when]["mrr@10"].as_f64().unwrap();
    let best = figure("dev_before").max(figure("dev_after"));
    assert_eq!(sum["best_dev"]["value"].as_f64(), Some(best), "{sum}");
    let card = std::fs::read_to_string(out.join("best/README.md")).unwrap();
    assert!(card.contains("best dev mrr@10"), "{card}");

    // A figure the dev file's evaluation does not have, an unknown one, or no dev file at all.
    let other = dir.path().join("other");
    let bad = |metric: &str, with_dev: bool| {
        let set = format!("train.metric={metric}");
        let mut extra = vec!["--set", set.as_str(), "--output", s(&other)];
        if with_dev {
            extra.extend(["--set", dev.as_str()]);
        }
        run(&train_args(&config, &extra))
    };
    bad("spearman", true).failed_with(2, &["train.metric", "\"spearman\"", "retrieval"]);
    bad("bleu", true).failed_with(2, &["train.metric", "\"bleu\"", "mrr@10"]);
    bad("mrr@10", false).failed_with(2, &["train.metric", "data.dev is not set"]);
    assert!(!other.exists(), "nothing written");
}

#[test]
fn data_corpus_adds_distractors_to_a_retrieval_dev_file() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "model", false);
    let train = write(&dir, "pairs.csv", pairs_csv(12));
    let (config, _) = write_config(&dir, &model, &train, "loss = \"mnrl\"");
    let corpus = write(
        &dir,
        "corpus.txt",
        "the red dog.\na small blue cat.\nx y z\n",
    );
    let dev = format!("data.dev={}", s(&train));
    let with = format!("data.corpus={}", s(&corpus));
    let r = run(&train_args(
        &config,
        &["--set", &dev, "--set", &with, "--json"],
    ));
    r.succeeded();
    let sum = summary(&r);
    // pairs_csv(12)'s positives are the 12 texts; "a small blue cat." and "x y z" are among
    // them already, "the red dog." is new.
    assert_eq!(sum["dev_after"]["corpus"], 13, "{sum}");

    let out = dir.path().join("other");
    let twice = write(&dir, "twice.txt", "a text\nanother\na text\n");
    let set = format!("data.corpus={}", s(&twice));
    run(&train_args(
        &config,
        &["--set", &dev, "--set", &set, "--output", s(&out)],
    ))
    .failed_with(2, &["twice.txt:3", "line 1"]);
    let scored = write(&dir, "scored.csv", scored_csv(8));
    let set_dev = format!("data.dev={}", s(&scored));
    run(&train_args(
        &config,
        &["--set", &set_dev, "--set", &with, "--output", s(&out)],
    ))
    .failed_with(2, &["data.corpus", "scored pairs"]);
}

#[test]
fn eval_takes_a_corpus_of_distractors_for_retrieval_only() {
    let dir = TempDir::new().unwrap();
    let model = tiny(&dir, "model", false);
    let pairs = write(&dir, "pairs.csv", pairs_csv(12));
    let corpus = write(&dir, "corpus.txt", "the red dog.\n");
    let args = |data: &Path| {
        vec![
            "eval".to_string(),
            "--model".into(),
            s(&model).into(),
            "--data".into(),
            s(data).into(),
            "--corpus".into(),
            s(&corpus).into(),
            "--json".into(),
        ]
    };
    let a = args(&pairs);
    let r = run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    r.succeeded();
    let v: Value = serde_json::from_str(r.stdout.trim()).unwrap();
    assert_eq!(v["corpus"], 13, "12 positives and one distractor: {v}");
    let scored = write(&dir, "scored.csv", scored_csv(8));
    let a = args(&scored);
    run(&a.iter().map(String::as_str).collect::<Vec<_>>())
        .failed_with(2, &["--corpus", "scored pairs"]);
}

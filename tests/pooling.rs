//! Every pooling mode of sentence-transformers, in its 6.x and its 2.x-5.x folder layout, with
//! and without `include_prompt`, with and without a prompt, embeds as Python does (fixtures
//! from scripts/make_pooling_fixtures.py: a tiny BERT saved by sentence-transformers 6.2), and a
//! folder written back by st-tune keeps its layout and its embeddings. Prompts: named in the
//! config, put before the right columns, and bad names or roles reported by key.

mod common;

use std::path::Path;

use candle_core::Device;
use serde_json::Value;
use st_tune::model::SentenceModel;

fn fixture() -> Value {
    let text = std::fs::read_to_string(common::fixture("pooling/cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect()
}

/// The fixture model folder, copied into `dir` with `pooling` as its 1_Pooling/config.json.
fn model_with_pooling(dir: &Path, pooling: &Value) -> SentenceModel {
    let src = common::fixture("pooling/model");
    copy_dir(&src, dir);
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        serde_json::to_string(pooling).unwrap(),
    )
    .unwrap();
    SentenceModel::load(dir.to_str().unwrap(), &Device::Cpu, None).unwrap()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

fn max_diff(got: &[Vec<f32>], want: &Value) -> f32 {
    let mut worst = 0f32;
    for (g, w) in got.iter().zip(want.as_array().unwrap()) {
        let w = w.as_array().unwrap();
        assert_eq!(g.len(), w.len(), "embedding width");
        for (a, b) in g.iter().zip(w) {
            let b = b.as_f64().unwrap() as f32;
            // -inf (max pooling over no token) equals -inf.
            let d = if *a == b { 0.0 } else { (a - b).abs() };
            worst = worst.max(d);
        }
    }
    worst
}

/// Embeddings of the fixture sentences without a prompt ("") and with each named prompt.
fn embed_all(model: &SentenceModel, fx: &Value) -> Vec<(String, Vec<Vec<f32>>)> {
    let sentences = strings(&fx["sentences"]);
    let mut names = vec![String::new()];
    names.extend(fx["prompts"].as_object().unwrap().keys().cloned());
    names
        .into_iter()
        .map(|name| {
            let prompt = (!name.is_empty()).then(|| model.spec.prompts[&name].clone());
            let emb = model
                .encode_prompted(&sentences, prompt.as_deref(), 2)
                .unwrap();
            (name, emb)
        })
        .collect()
}

#[test]
fn every_pooling_mode_and_layout_matches_sentence_transformers() {
    let fx = fixture();
    let cases = fx["cases"].as_array().unwrap();
    assert!(
        cases.len() >= 24,
        "every mode, both layouts, include_prompt both ways"
    );
    let tmp = tempfile::tempdir().unwrap();
    for (i, case) in cases.iter().enumerate() {
        let name = case["name"].as_str().unwrap();
        let model = model_with_pooling(&tmp.path().join(i.to_string()), &case["pooling_config"]);
        assert_eq!(
            model.spec.max_seq_length, 16,
            "6.x: tokenizer_config.json's model_max_length"
        );
        for (prompt, got) in embed_all(&model, &fx) {
            let worst = max_diff(&got, &case["embeddings"][&prompt]);
            eprintln!("{name}, prompt {prompt:?}: max abs diff {worst:e}");
            assert!(
                worst <= 1e-5,
                "{name}, prompt {prompt:?}: max abs diff {worst} > 1e-5"
            );
        }
    }
}

#[test]
fn a_folder_written_back_keeps_its_layout_and_embeddings() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let pooling = &case["pooling_config"];
        let model = model_with_pooling(&tmp.path().join("in"), pooling);
        let out = tmp.path().join("out");
        model.save(&out, "# test\n").unwrap();
        let written: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("1_Pooling/config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            &written, pooling,
            "{}: pooling config written back as read",
            case["name"]
        );
        let modules = std::fs::read_to_string(out.join("modules.json")).unwrap();
        assert!(modules.contains("sentence_transformers.base.modules.transformer.Transformer"));
        let st: Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("config_sentence_transformers.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(st["prompts"]["query"], "query: ", "prompts kept");
        let again = SentenceModel::load(out.to_str().unwrap(), &Device::Cpu, None).unwrap();
        assert_eq!(again.spec.max_seq_length, 16);
        assert_eq!(
            embed_all(&again, &fx),
            embed_all(&model, &fx),
            "{}",
            case["name"]
        );
    }
}

/// A pairs file of the fixture's sentences, and a config training the fixture model on it.
fn prompt_config(dir: &Path, overrides: &[&str]) -> st_tune::config::Config {
    let fx = fixture();
    let sentences = strings(&fx["sentences"]);
    let mut csv = String::from("anchor,positive\n");
    for pair in sentences.windows(2) {
        csv.push_str(&format!("\"{}\",\"{}\"\n", pair[0], pair[1]));
    }
    let train = dir.join("pairs.csv");
    std::fs::write(&train, csv).unwrap();
    let model = common::fixture("pooling/model");
    let mut sets = vec![
        format!("model.path={}", model.display()),
        format!("data.train={}", train.display()),
        "train.loss=mnrl".into(),
    ];
    sets.extend(overrides.iter().map(|s| s.to_string()));
    st_tune::config::Config::from_toml("", "test", &sets).unwrap()
}

fn config_error(result: st_tune::Result<st_tune::train::Loaded>) -> (String, String) {
    match result {
        Err(st_tune::Error::Config { key, msg }) => (key, msg),
        Err(other) => panic!("expected a config error, got {other}"),
        Ok(_) => panic!("expected a config error, got a loaded run"),
    }
}

#[test]
fn training_texts_get_their_columns_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = prompt_config(
        tmp.path(),
        &[
            "model.prompts.question=\"question: \"",
            "data.prompts.anchor=question",
            "data.prompts.positive=passage",
        ],
    );
    let loaded = st_tune::train::load(&cfg).unwrap();
    let tok = &loaded.model.tokenizer;
    let first = &loaded.sets[0].rows.rows[0];
    let want = tok
        .encode(&[
            &format!("question: {}", first.texts[0]),
            &format!("passage: {}", first.texts[1]),
        ])
        .unwrap();
    assert_eq!(
        loaded.sets[0].data.tokens[0], want,
        "prompts prepended before tokenizing"
    );
    // [CLS] question : and [CLS] passage : (the trailing [SEP] is not the prompt's).
    assert_eq!(loaded.sets[0].data.prompt_tokens, vec![3, 3]);
    // The new prompt is saved with the model, beside the ones it declared.
    let prompts = &loaded.model.spec.prompts;
    assert_eq!(prompts["question"], "question: ");
    assert_eq!(prompts["query"], "query: ");
}

#[test]
fn a_prompt_for_a_missing_role_or_an_unknown_name_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = prompt_config(tmp.path(), &["data.prompts.negative=query"]);
    let (key, msg) = config_error(st_tune::train::load(&cfg));
    assert_eq!(key, "data.prompts.negative");
    assert!(msg.contains("anchor, positive"), "{msg}");

    let cfg = prompt_config(tmp.path(), &["data.prompts.anchor=qeury"]);
    let (key, msg) = config_error(st_tune::train::load(&cfg));
    assert_eq!(key, "data.prompts.anchor");
    assert!(
        msg.contains("\"qeury\"") && msg.contains("passage, query"),
        "{msg}"
    );

    let model = SentenceModel::load(
        common::fixture("pooling/model").to_str().unwrap(),
        &Device::Cpu,
        None,
    )
    .unwrap();
    let err = model.spec.prompt(Some("qeury")).unwrap_err().to_string();
    assert!(
        err.contains("config_sentence_transformers.json") && err.contains("qeury"),
        "{err}"
    );
    assert_eq!(model.spec.prompt(None).unwrap(), None, "no default prompt");
}

#[test]
fn a_default_prompt_name_applies_when_none_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    copy_dir(&common::fixture("pooling/model"), &dir);
    let st = dir.join("config_sentence_transformers.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&st).unwrap()).unwrap();
    cfg["default_prompt_name"] = "query".into();
    std::fs::write(&st, cfg.to_string()).unwrap();
    let model = SentenceModel::load(dir.to_str().unwrap(), &Device::Cpu, None).unwrap();
    assert_eq!(model.spec.prompt(None).unwrap(), Some("query: "));
    assert_eq!(
        model.spec.prompt(Some("passage")).unwrap(),
        Some("passage: ")
    );

    cfg["default_prompt_name"] = "nope".into();
    std::fs::write(&st, cfg.to_string()).unwrap();
    let err = SentenceModel::load(dir.to_str().unwrap(), &Device::Cpu, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("default_prompt_name \"nope\""), "{err}");
}

#[test]
fn training_leaves_the_prompt_out_of_pooling_when_include_prompt_is_false() {
    let tmp = tempfile::tempdir().unwrap();
    // The first step's loss, with the pooling's include_prompt as given, with or without prompts.
    let first_loss = |include_prompt: bool, prompts: bool| {
        let dir = tmp.path().join(format!("{include_prompt}-{prompts}"));
        let model = dir.join("model");
        copy_dir(&common::fixture("pooling/model"), &model);
        let pooling = serde_json::json!({"embedding_dimension": 16, "pooling_mode": "mean",
                                         "include_prompt": include_prompt});
        std::fs::write(model.join("1_Pooling/config.json"), pooling.to_string()).unwrap();
        let mut sets = vec![
            format!("model.path={}", model.display()),
            "train.max_steps=1".to_string(),
            format!("output.dir={}", dir.join("out").display()),
        ];
        if prompts {
            sets.extend([
                "data.prompts.anchor=query".into(),
                "data.prompts.positive=passage".into(),
            ]);
        }
        let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
        let mut cfg = prompt_config(&dir, &refs);
        cfg.output.checkpoint_steps = 0;
        st_tune::train::train(&cfg, &Default::default())
            .unwrap()
            .final_loss
    };
    assert_eq!(
        first_loss(false, false),
        first_loss(true, false),
        "no prompt, nothing to leave out"
    );
    assert_ne!(
        first_loss(false, true),
        first_loss(true, true),
        "the prompt's tokens left out"
    );
}

/// `st-tune ARGS`: (success, stdout, stderr).
fn st_tune(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_st-tune"))
        .args(args)
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

#[test]
fn encode_and_eval_take_prompts_by_name() {
    let fx = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture("pooling/model");
    let model = model.to_str().unwrap();
    let input = tmp.path().join("sentences.txt");
    std::fs::write(&input, strings(&fx["sentences"]).join("\n")).unwrap();
    let input = input.to_str().unwrap();

    // The fixture model as saved: mean pooling, 6.x layout, prompt included.
    let case = fx["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "mean include_prompt=True v6")
        .unwrap();
    let (ok, stdout, stderr) = st_tune(&["encode", "-m", model, "-i", input, "--prompt", "query"]);
    assert!(ok, "{stderr}");
    let got: Vec<Vec<f32>> = stdout
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["embedding"].clone())
        .map(|e| serde_json::from_value(e).unwrap())
        .collect();
    let worst = max_diff(&got, &case["embeddings"]["query"]);
    assert!(worst <= 1e-5, "encode --prompt query: max abs diff {worst}");

    let (ok, _, stderr) = st_tune(&["encode", "-m", model, "-i", input, "--prompt", "qeury"]);
    assert!(
        !ok && stderr.contains("no prompt named \"qeury\"") && stderr.contains("passage, query"),
        "{stderr}"
    );

    let pairs = tmp.path().join("pairs.csv");
    std::fs::write(
        &pairs,
        "anchor,positive\nshort.,a man is playing a guitar.\n",
    )
    .unwrap();
    let pairs = pairs.to_str().unwrap();
    let (ok, _, stderr) = st_tune(&[
        "eval",
        "-m",
        model,
        "-d",
        pairs,
        "--prompt",
        "sentence1=query",
    ]);
    assert!(!ok && stderr.contains("anchor, positive"), "{stderr}");
    let (ok, _, stderr) = st_tune(&["eval", "-m", model, "-d", pairs, "--prompt", "anchor=query"]);
    assert!(ok, "{stderr}");
}

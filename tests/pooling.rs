//! Every pooling mode of sentence-transformers, in its 6.x and its 2.x-5.x folder layout, with
//! and without `include_prompt`, with and without a prompt, embeds as Python does (fixtures
//! from scripts/make_pooling_fixtures.py: a tiny BERT saved by sentence-transformers 6.2), and a
//! folder written back by st-tune keeps its layout and its embeddings.

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

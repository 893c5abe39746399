//! Binary classification and triplet evaluation of the real all-MiniLM-L6-v2 match Python
//! sentence-transformers' BinaryClassificationEvaluator and TripletEvaluator (fixture from
//! scripts/make_classification_fixture.py), at the full width and cut to 128 dimensions.

mod common;

use candle_core::Device;
use serde_json::Value;
use st_tune::config::metric::BINARY as FIGURES;
use st_tune::data::read::read_dataset;
use st_tune::data::RowShape;
use st_tune::model::SentenceModel;
use st_tune::train::eval::{evaluate_widths, Scores};

fn fixture() -> Value {
    let text =
        std::fs::read_to_string(common::fixture("classification-all-MiniLM-L6-v2.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model() -> SentenceModel {
    let dir = common::real_model("all-MiniLM-L6-v2");
    SentenceModel::load(dir.to_str().unwrap(), &Device::Cpu, None).unwrap()
}

/// Every figure of `want` in `got`'s JSON, within 1e-5 (thresholds are cosines).
fn assert_figures(got: &Scores, want: &Value, label: &str) {
    let got = serde_json::to_value(got).unwrap();
    let want = want.as_object().unwrap();
    let mut worst = 0f64;
    for (key, w) in want {
        let g = got[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{label}: st-tune has no `{key}`: {got}"));
        let w = w.as_f64().unwrap();
        assert!(
            (g - w).abs() <= 1e-5,
            "{label}: {key} st-tune {g} python {w}"
        );
        worst = worst.max((g - w).abs());
    }
    eprintln!("{label}: max abs diff {worst:e}");
}

#[test]
fn labelled_pairs_match_python_binary_classification_evaluator() {
    let (fx, model) = (fixture(), model());
    let data = read_dataset(
        &common::fixture("classification-pairs.csv"),
        None,
        None,
        None,
    )
    .unwrap();
    assert_eq!(data.shape, RowShape::Labeled);
    let got = evaluate_widths(&model, &data, 64, &[128]).unwrap();
    assert_eq!(fx["binary"].as_object().unwrap().len(), FIGURES.len());
    assert_figures(&got.full, &fx["binary"], "full width");
    assert_figures(&got.widths[0].1, &fx["binary_128"], "128 dimensions");
    assert_eq!(got.full.metric(), "cosine_ap");
    assert_eq!(
        got.full.chosen(Some("cosine_f1")).unwrap().1,
        fx["binary"]["cosine_f1"].as_f64().unwrap()
    );
}

#[test]
fn triplets_give_python_triplet_accuracy_beside_the_retrieval_figures() {
    let (fx, model) = (fixture(), model());
    let data = read_dataset(
        &common::fixture("classification-triplets.csv"),
        None,
        None,
        None,
    )
    .unwrap();
    let got = evaluate_widths(&model, &data, 64, &[128]).unwrap();
    let Scores::Retrieval(r) = &got.full else {
        panic!("{:?}", got.full)
    };
    assert_eq!(r.queries as u64, fx["triplets"].as_u64().unwrap());
    let want = fx["triplet"]["cosine_accuracy"].as_f64().unwrap();
    let have = got.full.figure("cosine_accuracy").unwrap();
    assert!((have - want).abs() <= 1e-6, "{have} vs {want}");
    assert!(have < 1.0, "the fixture has wrong triplets: {have}");
    let want = fx["triplet"]["cosine_accuracy_128"].as_f64().unwrap();
    let have = got.widths[0].1.figure("cosine_accuracy").unwrap();
    assert!((have - want).abs() <= 1e-6, "128: {have} vs {want}");
    // The retrieval figures stay the default metric of a triplets file.
    assert_eq!(got.full.metric(), "ndcg@10");
}

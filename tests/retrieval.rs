//! Retrieval evaluation of the real all-MiniLM-L6-v2 matches Python sentence-transformers'
//! InformationRetrievalEvaluator (fixture from scripts/make_retrieval_fixture.py) to 1e-4, on
//! a pairs file and a triplets file that repeat texts, and the pairs with distractors
//! (`data.corpus`); small chunks change nothing.

mod common;

use candle_core::Device;
use serde_json::Value;
use st_tune::data::read::{read_corpus, read_dataset};
use st_tune::model::SentenceModel;
use st_tune::train::retrieval::{evaluate_in_chunks, evaluate_retrieval, Retrieval};

fn fixture() -> Value {
    let text = std::fs::read_to_string(common::fixture("retrieval-all-MiniLM-L6-v2.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn model() -> SentenceModel {
    let dir = common::real_model("all-MiniLM-L6-v2");
    SentenceModel::load(dir.to_str().unwrap(), &Device::Cpu, None).unwrap()
}

/// The largest difference between st-tune's figures and the fixture's, after checking the
/// query and corpus counts and that every Python metric is there.
fn worst_difference(got: &Retrieval, case: &Value) -> f64 {
    assert_eq!(got.queries as u64, case["queries"].as_u64().unwrap());
    assert_eq!(got.corpus as u64, case["corpus"].as_u64().unwrap());
    let got = serde_json::to_value(got).unwrap();
    let want = case["metrics"].as_object().unwrap();
    assert_eq!(want.len(), 15, "{want:?}");
    want.iter()
        .map(|(key, w)| {
            let g = got[key]
                .as_f64()
                .unwrap_or_else(|| panic!("st-tune has no `{key}`: {got}"));
            let d = (g - w.as_f64().unwrap()).abs();
            assert!(d <= 1e-4, "{}: {key} st-tune {g} python {w}", case["file"]);
            d
        })
        .fold(0.0, f64::max)
}

#[test]
fn retrieval_figures_match_python_information_retrieval_evaluator() {
    let (fx, model) = (fixture(), model());
    for case in fx["cases"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap();
        let mut data = read_dataset(&common::fixture(file), None, None, None).unwrap();
        if let Some(corpus) = case["corpus_file"].as_str() {
            data.distractors = read_corpus(&common::fixture(corpus)).unwrap();
        }
        let got = evaluate_retrieval(&model, &data, 64).unwrap();
        eprintln!("{file}: max abs diff {:e}", worst_difference(&got, case));
    }
}

#[test]
fn small_corpus_and_query_chunks_give_the_same_figures() {
    let (fx, model) = (fixture(), model());
    let case = &fx["cases"][1];
    let data = read_dataset(
        &common::fixture(case["file"].as_str().unwrap()),
        None,
        None,
        None,
    )
    .unwrap();
    let whole = evaluate_retrieval(&model, &data, 64).unwrap();
    for (corpus_chunk, query_chunk) in [(7, 5), (1, 1), (76, 100)] {
        let got = evaluate_in_chunks(&model, &data, 64, corpus_chunk, query_chunk).unwrap();
        worst_difference(&got, case);
        assert_eq!(
            serde_json::to_value(&got).unwrap(),
            serde_json::to_value(&whole).unwrap(),
            "chunks {corpus_chunk} x {query_chunk}"
        );
    }
}

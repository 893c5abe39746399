//! Each loss's value and its gradient with respect to the embeddings match Python
//! sentence-transformers on a fixed batch (tests/fixtures/losses.json, from
//! scripts/make_fixtures.py).

mod common;

use candle_core::{Device, Tensor, Var};
use st_tune::losses::{compute, LossKind};

fn matrix(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect()
        })
        .collect()
}

fn tensor(rows: &[Vec<f32>]) -> Tensor {
    let (n, d) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, d), &Device::Cpu).unwrap()
}

#[test]
fn every_loss_matches_python_in_value_and_gradient() {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("losses.json")).unwrap())
            .unwrap();
    let inputs = &fx["inputs"];
    let scores: Vec<f32> = inputs["scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let scores = Tensor::new(scores.as_slice(), &Device::Cpu).unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let kind = match case["loss"].as_str().unwrap() {
            "mnrl" => LossKind::Mnrl,
            "cosent" => LossKind::Cosent,
            _ => LossKind::Cosine,
        };
        let names: Vec<&str> = case["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let vars: Vec<Var> = names
            .iter()
            .map(|n| Var::from_tensor(&tensor(&matrix(&inputs[*n]))).unwrap())
            .collect();
        let cols: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let scale = case["scale"].as_f64().unwrap_or(20.0);
        let loss = compute(kind, scale, None, &cols, Some(&scores)).unwrap();
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        let want = case["value"].as_f64().unwrap();
        let label = format!("{} {:?}", case["loss"], names);
        assert!(
            (value - want).abs() <= 1e-5 * want.abs().max(1.0),
            "{label}: value {value} != {want}"
        );
        let grads = loss.backward().unwrap();
        for (name, var) in names.iter().zip(&vars) {
            let got = grads
                .get(var.as_tensor())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let want = matrix(&case["grads"][*name]);
            let worst = got
                .iter()
                .flatten()
                .zip(want.iter().flatten())
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-5,
                "{label}: gradient of {name} differs by {worst}"
            );
        }
    }
}

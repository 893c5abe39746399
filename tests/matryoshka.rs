//! Matryoshka training: the loss matches Python sentence-transformers' MatryoshkaLoss in value
//! and gradient around every loss but MSELoss (tests/fixtures/matryoshka.json, from
//! scripts/make_matryoshka_fixture.py), and a
//! training step gives the same loss and gradients whether the batch runs in one pass, is cut
//! into micro-batches (cached scheme) or is cut by an OOM.

mod common;

use candle_core::{Device, Tensor, Var};
use st_tune::config::TrainSection;
use st_tune::data::tokenized::TokenizedData;
use st_tune::losses::{compute, Extra, LossKind, Matryoshka};
use st_tune::memory::oom::Injector;
use st_tune::memory::policy::MemState;
use st_tune::memory::MemoryBudget;
use st_tune::model::weights::Freeze;
use st_tune::model::SentenceModel;
use st_tune::train::precision::LossScaler;
use st_tune::train::step::Trainer;

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn matrix(v: &serde_json::Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(floats).collect()
}

fn tensor(rows: &[Vec<f32>]) -> Tensor {
    let (n, d) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, d), &Device::Cpu).unwrap()
}

/// The loss a fixture case names; an unknown name fails the test.
fn kind(name: &str) -> LossKind {
    LossKind::ALL
        .into_iter()
        .find(|k| k.as_str() == name)
        .unwrap_or_else(|| panic!("fixture names an unknown loss `{name}`"))
}

#[test]
fn matryoshka_matches_python_in_value_and_gradient() {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("matryoshka.json")).unwrap())
            .unwrap();
    let inputs = &fx["inputs"];
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    let mut worst_value = 0f64;
    let mut worst_grad = 0f32;
    for case in cases {
        let names: Vec<&str> = case["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        let dims: Vec<usize> = case["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let weights = match case["weights"].as_array() {
            Some(w) => w.iter().map(|x| x.as_f64().unwrap()).collect(),
            None => vec![1.0; dims.len()],
        };
        let m = Matryoshka { dims, weights };
        let vars: Vec<Var> = names
            .iter()
            .map(|n| Var::from_tensor(&tensor(&matrix(&inputs[*n]))).unwrap())
            .collect();
        let cols: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let scale = case["scale"].as_f64().unwrap_or(20.0);
        let loss_name = case["loss"].as_str().unwrap();
        let labels = inputs[case["labels"].as_str().unwrap_or("scores")].clone();
        let scores = Tensor::new(floats(&labels).as_slice(), &Device::Cpu).unwrap();
        let loss = compute(
            kind(loss_name),
            scale,
            Some(&m),
            &cols,
            Extra::labels(Some(&scores)),
        )
        .unwrap();
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        let want = case["value"].as_f64().unwrap();
        let label = format!("{loss_name} {names:?} {:?} {:?}", m.dims, m.weights);
        let rel = (value - want).abs() / want.abs().max(1.0);
        worst_value = worst_value.max(rel);
        assert!(rel <= 1e-5, "{label}: value {value} != {want}");
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
            worst_grad = worst_grad.max(worst);
            assert!(
                worst <= 1e-5,
                "{label}: gradient of {name} differs by {worst}"
            );
        }
    }
    eprintln!(
        "worst relative value difference {worst_value:e}, worst gradient difference {worst_grad:e}"
    );
}

#[test]
fn a_width_larger_than_the_embeddings_is_an_error_naming_the_key() {
    let x = Tensor::ones((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
    let m = Matryoshka {
        dims: vec![8, 2],
        weights: vec![1.0, 1.0],
    };
    let e = compute(
        LossKind::Cosine,
        20.0,
        Some(&m),
        &[x.clone(), x],
        Extra::default(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("train.matryoshka_dims"), "{e}");
}

/// Rows of the tiny model's vocabulary (ids 8..38), of varied lengths.
fn data(rows: usize, scored: bool) -> TokenizedData {
    let text = |r: usize, c: usize| -> Vec<u32> {
        let len = 3 + (r * 5 + c * 3) % 6;
        (0..len)
            .map(|i| 8 + ((r * 7 + c * 11 + i * 3) % 30) as u32)
            .collect()
    };
    TokenizedData {
        tokens: (0..rows).map(|r| vec![text(r, 0), text(r, 1)]).collect(),
        scores: (0..rows)
            .map(|r| scored.then_some((r % 5) as f32 / 4.0))
            .collect(),
        teachers: Vec::new(),
        columns: 2,
        prompt_tokens: vec![0, 0],
    }
}

/// (loss, gradients) of one step over 8 rows at micro-batch `micro`, with `inject` OOMs.
fn step(
    model: &SentenceModel,
    t: &TrainSection,
    micro: usize,
    inject: &str,
) -> (f32, common::DenseGrads) {
    let budget = MemoryBudget::unlimited();
    let injector = Injector::parse(inject).unwrap();
    let scored = t.loss != LossKind::Mnrl;
    let d = data(8, scored);
    let mut trainer = Trainer::new(model, t, &[], &budget, &injector, d, None).unwrap();
    let rows: Vec<usize> = (0..8).collect();
    let mut mem = MemState::new(micro, micro, usize::MAX);
    let mut scaler = LossScaler::new(t.precision);
    let mut events = Vec::new();
    let out = trainer
        .gradients(0, &rows, 0, &mut scaler, &mut mem, &mut |n| events.push(n))
        .unwrap()
        .unwrap();
    assert_eq!(events.len(), usize::from(!inject.is_empty()));
    (out.loss, common::dense(out.grads))
}

fn max_difference(a: &common::DenseGrads, b: &common::DenseGrads) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, g)| common::max_abs_diff(g, &b[name]))
        .fold(0f32, f32::max)
}

#[test]
fn micro_batches_and_ooms_change_no_matryoshka_gradient() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(dir.path(), false, 2, 5);
    let model = SentenceModel::load(
        dir.path().to_str().unwrap(),
        &Device::Cpu,
        Some(Freeze::default()),
    )
    .unwrap();
    for loss in [LossKind::Mnrl, LossKind::Cosent, LossKind::Cosine] {
        let mut t = TrainSection {
            loss,
            batch_size: 8,
            ..Default::default()
        };
        let (plain_loss, plain) = step(&model, &t, 8, "");
        t.matryoshka_dims = Some(vec![16, 8, 4]);
        t.matryoshka_weights = Some(vec![1.0, 0.5, 2.0]);
        let (whole_loss, whole) = step(&model, &t, 8, "");
        // The widths do change the loss, so the comparisons below test something.
        assert!(
            (whole_loss - plain_loss).abs() > 1e-3,
            "{loss:?}: {whole_loss} vs {plain_loss}"
        );
        let scale = whole.values().map(common::max_abs).fold(0f32, f32::max);
        let changed = max_difference(&whole, &plain);
        assert!(changed > 0.1 * scale, "{loss:?}: {changed} of {scale}");
        for (micro, inject) in [(2, ""), (3, ""), (8, "1:forward"), (4, "1:backward")] {
            let (l, g) = step(&model, &t, micro, inject);
            let label = format!("{loss:?}, micro-batch {micro}, OOM {inject:?}");
            assert!(
                (l - whole_loss).abs() <= 1e-6 * whole_loss.abs().max(1.0),
                "{label}: loss {l} != {whole_loss}"
            );
            let d = max_difference(&g, &whole);
            assert!(
                d <= 1e-6 * scale.max(1.0),
                "{label}: gradients differ by {d} (largest {scale})"
            );
            eprintln!("{label}: loss {l}, gradients differ by {d:e} (largest {scale:e})");
        }
    }
}

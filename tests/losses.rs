//! Each loss's value and its gradient with respect to the embeddings match Python
//! sentence-transformers on a fixed batch (tests/fixtures/losses.json, from
//! scripts/make_fixtures.py, with n-tuples of three hard negatives for the ranking losses;
//! GISTEmbedLoss, which takes a guide's embeddings too, with and
//! without MatryoshkaLoss: tests/fixtures/gist.json, from scripts/make_gist_fixture.py); and a
//! training step with each loss added after MNRL, CoSENT and
//! CosineSimilarity gives the same loss and gradients whether its batch runs in one pass, is
//! cut into micro-batches (cached scheme for the batch-coupled losses) or is cut by an OOM.

mod common;

use candle_core::{Device, Tensor, Var};
use common::DenseGrads as Grads;
use st_tune::config::TrainSection;
use st_tune::data::tokenized::TokenizedData;
use st_tune::losses::{compute, Distance, Extra, Loss, LossKind, Matryoshka};
use st_tune::memory::oom::Injector;
use st_tune::memory::policy::MemState;
use st_tune::memory::MemoryBudget;
use st_tune::model::weights::Freeze;
use st_tune::model::SentenceModel;
use st_tune::train::precision::LossScaler;
use st_tune::train::step::Trainer;

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

/// The loss a fixture case names, with its parameters; an unknown name fails the test, so a
/// case added to the script cannot pass by running another loss.
fn loss_of(case: &serde_json::Value) -> Loss {
    let name = case["loss"].as_str().unwrap();
    let kind = LossKind::ALL
        .into_iter()
        .find(|k| k.as_str() == name)
        .unwrap_or_else(|| panic!("fixture names an unknown loss `{name}`"));
    let distance = case["distance"].as_str().map(|d| match d {
        "euclidean" => Distance::Euclidean,
        "cosine" => Distance::Cosine,
        "manhattan" => Distance::Manhattan,
        other => panic!("fixture names an unknown distance `{other}`"),
    });
    Loss {
        kind,
        margin: case["margin"].as_f64(),
        distance,
    }
}

/// A fixture input as a tensor: (n,) for a list of numbers, (n, d) for a list of lists.
fn input(v: &serde_json::Value) -> Tensor {
    let items = v.as_array().unwrap();
    if items[0].is_array() {
        tensor(&matrix(v))
    } else {
        let x: Vec<f32> = items.iter().map(|x| x.as_f64().unwrap() as f32).collect();
        Tensor::new(x.as_slice(), &Device::Cpu).unwrap()
    }
}

#[test]
fn every_loss_matches_python_in_value_and_gradient() {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("losses.json")).unwrap())
            .unwrap();
    let inputs = &fx["inputs"];
    let mut covered = Vec::new();
    let mut ntuples = Vec::new();
    let (mut worst_value, mut worst_grad) = (0f64, 0f32);
    for case in fx["cases"].as_array().unwrap() {
        let loss = loss_of(case);
        covered.push(loss.kind);
        if case["columns"].as_array().unwrap().len() == 5 {
            ntuples.push(loss.kind);
        }
        let labels = input(&inputs[case["labels"].as_str().unwrap()]);
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
        let loss_value = compute(loss, scale, None, &cols, Extra::labels(Some(&labels))).unwrap();
        let value = loss_value.to_scalar::<f32>().unwrap() as f64;
        let want = case["value"].as_f64().unwrap();
        let label = format!(
            "{} {:?} margin {:?} distance {:?}",
            case["loss"], names, case["margin"], case["distance"]
        );
        let rel = (value - want).abs() / want.abs().max(1.0);
        worst_value = worst_value.max(rel);
        assert!(rel <= 1e-5, "{label}: value {value} != {want}");
        let grads = loss_value.backward().unwrap();
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
    // GISTEmbedLoss takes a guide's embeddings too: its own fixture, below.
    for kind in LossKind::ALL.into_iter().filter(|k| *k != LossKind::Gist) {
        assert!(covered.contains(&kind), "no fixture case for {kind}");
    }
    // Three hard negatives (an n-tuple): MNRL as MultipleNegativesRankingLoss and as
    // CachedMultipleNegativesRankingLoss computes it, and MNSRL.
    for kind in [LossKind::Mnrl, LossKind::Mnsrl] {
        assert!(
            ntuples.contains(&kind),
            "no n-tuple fixture case for {kind}"
        );
    }
}

#[test]
fn gist_matches_python_in_value_and_gradient_with_and_without_matryoshka() {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::fixture("gist.json")).unwrap())
            .unwrap();
    let (mut worst_value, mut worst_grad) = (0f64, 0f32);
    let mut ntuples = 0;
    for case in fx["cases"].as_array().unwrap() {
        let names: Vec<&str> = case["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap())
            .collect();
        ntuples += usize::from(names.len() == 5);
        let vars: Vec<Var> = names
            .iter()
            .map(|n| Var::from_tensor(&tensor(&matrix(&fx["inputs"][*n]))).unwrap())
            .collect();
        let cols: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let guide: Vec<Tensor> = names
            .iter()
            .map(|n| tensor(&matrix(&fx["guide"][*n])))
            .collect();
        let matryoshka = case["matryoshka_dims"].as_array().map(|dims| {
            let dims: Vec<usize> = dims.iter().map(|d| d.as_u64().unwrap() as usize).collect();
            let weights = match case["matryoshka_weights"].as_array() {
                Some(w) => w.iter().map(|x| x.as_f64().unwrap()).collect(),
                None => vec![1.0; dims.len()],
            };
            Matryoshka { dims, weights }
        });
        let loss = Loss {
            kind: LossKind::Gist,
            margin: case["margin"].as_f64(),
            distance: None,
        };
        let extra = Extra {
            labels: None,
            guide: Some(&guide),
        };
        let scale = case["scale"].as_f64().unwrap();
        let value = compute(loss, scale, matryoshka.as_ref(), &cols, extra).unwrap();
        let label = format!(
            "gist {names:?} scale {scale} margin {} dims {}",
            case["margin"], case["matryoshka_dims"]
        );
        let (got, want) = (
            value.to_scalar::<f32>().unwrap() as f64,
            case["value"].as_f64().unwrap(),
        );
        let rel = (got - want).abs() / want.abs().max(1.0);
        worst_value = worst_value.max(rel);
        assert!(rel <= 1e-5, "{label}: value {got} != {want}");
        let grads = value.backward().unwrap();
        for (name, var) in names.iter().zip(&vars) {
            let got = grads
                .get(var.as_tensor())
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let want = matrix(&case["grads"][*name]);
            // Relative to the case's largest gradient, as the value is: at scale 100 and
            // Matryoshka weight 2 they reach 56, where f32 steps are 4e-6 apart.
            let largest = want.iter().flatten().fold(1f32, |m, x| m.max(x.abs()));
            let worst = got
                .iter()
                .flatten()
                .zip(want.iter().flatten())
                .map(|(a, b)| (a - b).abs() / largest)
                .fold(0f32, f32::max);
            worst_grad = worst_grad.max(worst);
            assert!(
                worst <= 1e-5,
                "{label}: gradient of {name} differs by {worst} (relative)"
            );
        }
    }
    eprintln!(
        "gist: worst relative value difference {worst_value:e}, worst relative gradient \
         difference {worst_grad:e}"
    );
    // Three hard negatives, as CachedGISTEmbedLoss takes them (GISTEmbedLoss takes one).
    assert!(ntuples >= 2, "no n-tuple gist cases");
}

/// `rows` rows of texts from the tiny model's vocabulary (ids 8..38), as many columns as `kind`
/// takes, with the labels it takes: 0/1 labels, margins, or teacher embeddings of the model's
/// width 16.
fn data(kind: LossKind, rows: usize) -> TokenizedData {
    let columns = match kind {
        LossKind::Mse => 1,
        LossKind::Triplet | LossKind::MarginMse => 3,
        _ => 2,
    };
    data_of(kind, rows, columns)
}

/// [`data`] with `columns` text columns (anchor, positive, then negatives).
fn data_of(kind: LossKind, rows: usize, columns: usize) -> TokenizedData {
    let text = |r: usize, c: usize| -> Vec<u32> {
        let len = 3 + (r * 5 + c * 3) % 6;
        (0..len)
            .map(|i| 8 + ((r * 7 + c * 11 + i * 3) % 30) as u32)
            .collect()
    };
    let score = |r: usize| match kind {
        LossKind::Contrastive | LossKind::OnlineContrastive => Some(f32::from(r.is_multiple_of(3))),
        LossKind::MarginMse => Some((r as f32 * 0.7).sin()),
        _ => None,
    };
    let teachers = match kind {
        LossKind::Mse => (0..rows)
            .map(|r| {
                (0..16)
                    .map(|i| ((r * 16 + i) as f32).cos() * 0.25)
                    .collect()
            })
            .collect(),
        _ => Vec::new(),
    };
    TokenizedData {
        tokens: (0..rows)
            .map(|r| (0..columns).map(|c| text(r, c)).collect())
            .collect(),
        scores: (0..rows).map(score).collect(),
        teachers,
        columns,
        prompt_tokens: vec![0; columns],
    }
}

/// (loss, gradients) of one step over 8 rows at micro-batch `micro`, with `inject` OOMs.
fn step(model: &SentenceModel, t: &TrainSection, micro: usize, inject: &str) -> (f32, Grads) {
    guided_step(model, None, t, micro, inject)
}

/// [`step`] with GISTEmbedLoss's guide.
fn guided_step(
    model: &SentenceModel,
    guide: Option<&SentenceModel>,
    t: &TrainSection,
    micro: usize,
    inject: &str,
) -> (f32, Grads) {
    step_on(model, guide, t, data(t.loss, 8), micro, inject)
}

/// [`guided_step`] on the 8 rows of `rows`.
fn step_on(
    model: &SentenceModel,
    guide: Option<&SentenceModel>,
    t: &TrainSection,
    rows: TokenizedData,
    micro: usize,
    inject: &str,
) -> (f32, Grads) {
    let budget = MemoryBudget::unlimited();
    let injector = Injector::parse(inject).unwrap();
    let mut trainer = Trainer::new(model, t, &[], &budget, &injector, rows, None)
        .unwrap()
        .with_guide(guide)
        .unwrap();
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

/// A tiny 2-layer model (BERT, or MPNet when `mpnet`) written to `path` and loaded.
fn tiny(path: &std::path::Path, mpnet: bool, seed: u64) -> SentenceModel {
    common::tiny_model(path, mpnet, 2, seed);
    SentenceModel::load(
        path.to_str().unwrap(),
        &Device::Cpu,
        Some(Freeze::default()),
    )
    .unwrap()
}

/// A cut step's (loss, gradients) equal the whole step's within 1e-6 (gradients relative to
/// `scale`, the whole step's largest).
fn assert_same_step(
    label: &str,
    (l, g): (f32, &Grads),
    (whole_loss, whole): (f32, &Grads),
    scale: f32,
) {
    assert!(
        (l - whole_loss).abs() <= 1e-6 * whole_loss.abs().max(1.0),
        "{label}: loss {l} != {whole_loss}"
    );
    let worst = g
        .iter()
        .map(|(n, x)| common::max_abs_diff(x, &whole[n]))
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-6 * scale.max(1.0),
        "{label}: gradients differ by {worst} (largest {scale})"
    );
}

#[test]
fn micro_batches_and_ooms_change_no_loss_or_gradient_of_the_new_losses() {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(dir.path(), false, 2, 5);
    let model = SentenceModel::load(
        dir.path().to_str().unwrap(),
        &Device::Cpu,
        Some(Freeze::default()),
    )
    .unwrap();
    let new = [
        LossKind::Mnsrl,
        LossKind::Triplet,
        LossKind::Contrastive,
        LossKind::OnlineContrastive,
        LossKind::Mse,
        LossKind::MarginMse,
    ];
    for loss in new {
        for matryoshka in [None, Some(vec![16, 8, 4])] {
            let t = TrainSection {
                loss,
                batch_size: 8,
                // Euclidean distances of the tiny model's unit embeddings are below 2: a margin
                // that keeps some rows of each contrast active.
                margin: (loss == LossKind::Triplet).then_some(0.5),
                matryoshka_dims: matryoshka.clone(),
                ..Default::default()
            };
            let (whole_loss, whole) = step(&model, &t, 8, "");
            let scale = whole.values().map(common::max_abs).fold(0f32, f32::max);
            assert!(scale > 0.0, "{loss:?}: no gradient at all");
            for (micro, inject) in [(2, ""), (3, ""), (8, "1:forward"), (4, "1:backward")] {
                let (l, g) = step(&model, &t, micro, inject);
                let label = format!("{loss:?} {matryoshka:?}, micro-batch {micro}, OOM {inject:?}");
                assert_same_step(&label, (l, &g), (whole_loss, &whole), scale);
            }
        }
    }
}

#[test]
fn micro_batches_and_ooms_change_no_gist_loss_or_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, mpnet: bool, seed: u64| tiny(&dir.path().join(name), mpnet, seed);
    let model = load("model", false, 5);
    // An MPNet guide reads the model's tokens as they are (same vocabulary); a BERT guide
    // that takes fewer tokens reads them decoded and tokenized again.
    let shared = load("mpnet-guide", true, 9);
    let mut short = load("short-guide", false, 11);
    short.set_max_seq_length(6).unwrap();
    let rows = data(LossKind::Gist, 8);
    for (name, guide) in [("shared tokens", &shared), ("retokenized", &short)] {
        let own = st_tune::train::guide::tokens(&model.tokenizer, &guide.tokenizer, &rows).unwrap();
        assert_eq!(own.is_some(), name == "retokenized", "{name}");
        for matryoshka in [None, Some(vec![16, 8, 4])] {
            let t = TrainSection {
                loss: LossKind::Gist,
                batch_size: 8,
                // The tiny models' similarities are close together: a temperature at which the
                // masked and kept candidates still matter.
                scale: Some(20.0),
                matryoshka_dims: matryoshka.clone(),
                ..Default::default()
            };
            let (whole_loss, whole) = guided_step(&model, Some(guide), &t, 8, "");
            let scale = whole.values().map(common::max_abs).fold(0f32, f32::max);
            assert!(scale > 0.0, "{name}: no gradient at all");
            // Another guide (the model itself) masks other candidates: another loss.
            let self_guided = guided_step(&model, Some(&model), &t, 8, "").0;
            assert!(
                (self_guided - whole_loss).abs() > 1e-4,
                "{name}: the guide changed nothing"
            );
            for (micro, inject) in [(2, ""), (3, ""), (8, "1:forward"), (4, "1:backward")] {
                let (l, g) = guided_step(&model, Some(guide), &t, micro, inject);
                let label =
                    format!("gist, {name}, {matryoshka:?}, micro-batch {micro}, OOM {inject:?}");
                assert_same_step(&label, (l, &g), (whole_loss, &whole), scale);
            }
        }
    }
}

/// Rows of three hard negatives (`mine --output-format n-tuple`): each ranking loss gives the
/// same loss and gradients in one pass, in micro-batches (cached scheme) and cut by OOMs.
#[test]
fn n_tuples_give_the_same_loss_and_gradients_under_micro_batches_and_ooms() {
    let dir = tempfile::tempdir().unwrap();
    let load = |name: &str, mpnet: bool, seed: u64| tiny(&dir.path().join(name), mpnet, seed);
    let model = load("model", false, 5);
    let guide = load("guide", true, 9);
    for loss in [LossKind::Mnrl, LossKind::Mnsrl, LossKind::Gist] {
        let guide = (loss == LossKind::Gist).then_some(&guide);
        let t = TrainSection {
            loss,
            batch_size: 8,
            scale: Some(20.0),
            ..Default::default()
        };
        let (whole_loss, whole) = step_on(&model, guide, &t, data_of(loss, 8, 5), 8, "");
        let scale = whole.values().map(common::max_abs).fold(0f32, f32::max);
        assert!(scale > 0.0, "{loss:?}: no gradient at all");
        // The negatives count: the same rows with one negative give another loss.
        let (triplet_loss, _) = step_on(&model, guide, &t, data_of(loss, 8, 3), 8, "");
        assert!(
            (triplet_loss - whole_loss).abs() > 1e-4,
            "{loss:?}: the extra negatives changed nothing"
        );
        for (micro, inject) in [(2, ""), (3, ""), (8, "1:forward"), (4, "1:backward")] {
            let (l, g) = step_on(&model, guide, &t, data_of(loss, 8, 5), micro, inject);
            let label = format!("{loss:?} n-tuple, micro-batch {micro}, OOM {inject:?}");
            assert_same_step(&label, (l, &g), (whole_loss, &whole), scale);
        }
    }
}

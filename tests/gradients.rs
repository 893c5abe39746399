//! Gradients reach every trainable tensor of both encoders, and the analytic gradient of a tiny
//! encoder agrees with finite differences. (candle-nn's fused norms record no backward; this is
//! the test that would catch one sneaking back in.)

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use st_tune::model::dropout::Dropout;
use st_tune::model::embedding_cut::forward_cut;
use st_tune::model::layer_op::StepSums;
use st_tune::model::weights::Freeze;
use st_tune::model::SentenceModel;

const TEXTS: [&str; 3] = [
    "the cat sat on the mat.",
    "a man is playing guitar!",
    "big red dog runs fast",
];

fn load(mpnet: bool, freeze: Freeze) -> (tempfile::TempDir, SentenceModel) {
    let dir = tempfile::tempdir().unwrap();
    common::tiny_model(dir.path(), mpnet, 2, 7);
    let m = SentenceModel::load(dir.path().to_str().unwrap(), &Device::Cpu, Some(freeze)).unwrap();
    (dir, m)
}

/// A scalar that depends on every output dimension: Σ embeddings · fixed weights.
fn objective(m: &SentenceModel, drop: &Dropout) -> Tensor {
    let net = m.network().unwrap();
    let batch = m.batch(&TEXTS).unwrap();
    weighted_sum(&net.forward(&batch, drop).unwrap())
}

/// The gradients of [`objective`], through `Network::backward` (the one-op layers hand their
/// parameters' gradients over there).
fn objective_grads(m: &SentenceModel, drop: &Dropout) -> GradStore {
    let net = m.network().unwrap();
    let batch = m.batch(&TEXTS).unwrap();
    net.backward(&weighted_sum(&net.forward(&batch, drop).unwrap()))
        .unwrap()
}

fn weighted_sum(emb: &Tensor) -> Tensor {
    let d = emb.dim(1).unwrap();
    let w: Vec<f32> = (0..3 * d)
        .map(|i| ((i * 37 % 11) as f32 - 5.0) / 5.0)
        .collect();
    let w = Tensor::from_vec(w, (3, d), &Device::Cpu).unwrap();
    (emb * w).unwrap().sum_all().unwrap()
}

fn every_trainable_tensor_gets_a_gradient(mpnet: bool) {
    let (_dir, m) = load(mpnet, Freeze::default());
    let drop = Dropout::train(0.1, 0.1, 42, 0, vec![0, 1, 2]);
    let grads = objective_grads(&m, &drop);
    assert!(!m.params.vars.is_empty());
    for (name, var) in &m.params.vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let v = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: non-finite gradient"
        );
        assert!(v.iter().any(|x| *x != 0.0), "{name}: gradient is all zero");
    }
    assert!(
        m.params.vars.keys().all(|k| !k.starts_with("pooler.")),
        "the unused pooler must not train"
    );
}

#[test]
fn gradients_reach_every_trainable_bert_tensor() {
    every_trainable_tensor_gets_a_gradient(false);
}

#[test]
fn gradients_reach_every_trainable_mpnet_tensor() {
    every_trainable_tensor_gets_a_gradient(true);
}

/// The training step's backward pass in two halves (encoder, then the recomputed embedding
/// layer; `model/embedding_cut.rs`) gives the gradients of one backward pass.
fn the_embedding_cut_changes_no_gradient(mpnet: bool) {
    let (_dir, m) = load(mpnet, Freeze::default());
    let drop = Dropout::train(0.1, 0.1, 42, 0, vec![0, 1, 2]);
    let whole = objective_grads(&m, &drop);
    let net = m.network().unwrap();
    let (emb, cut) = forward_cut(&net, &m.batch(&TEXTS).unwrap(), &drop).unwrap();
    let encoder = net.backward(&weighted_sum(&emb)).unwrap();
    let cut = cut.expect("the embeddings train");
    let g = cut.gradient(&encoder).unwrap();
    let (embedding, rows) = cut.backward(&net, &g).unwrap();
    // The word table's gradient comes as the rows the batch touched: made dense here.
    let rows = rows.expect("the word table trains");
    let ids = Tensor::from_vec(rows.ids.clone(), rows.ids.len(), rows.table.device()).unwrap();
    let word_grad = rows
        .table
        .zeros_like()
        .unwrap()
        .index_add(&ids, &rows.grads, 0)
        .unwrap();
    let mut embedding_tensors = 0;
    for (name, var) in &m.params.vars {
        let from_rows = (var.as_tensor().id() == rows.table.id()).then_some(&word_grad);
        let from_embedding = embedding.get(var.as_tensor()).or(from_rows);
        let two = match (encoder.get(var.as_tensor()), from_embedding) {
            (Some(g), None) => g.clone(),
            (None, Some(g)) => {
                embedding_tensors += 1;
                g.clone()
            }
            other => panic!("{name}: gradient from the encoder and embedding halves: {other:?}"),
        };
        let one = whole.get(var.as_tensor()).unwrap();
        let d = common::max_abs_diff(&two, one);
        assert!(
            d <= 1e-5 * common::max_abs(one).max(1.0),
            "{name}: differs by {d}"
        );
    }
    assert!(embedding_tensors >= 3, "the embedding tables and norm");
}

#[test]
fn the_embedding_cut_changes_no_bert_gradient() {
    the_embedding_cut_changes_no_gradient(false);
}

#[test]
fn the_embedding_cut_changes_no_mpnet_gradient() {
    the_embedding_cut_changes_no_gradient(true);
}

/// The trainer's network adds the layers' gradients, and MPNet's bias table's per layer and
/// bucket, into a step's sums (`Network::for_step_sums`): they are the graph's gradients.
#[test]
fn the_step_sums_hold_the_graphs_mpnet_gradients() {
    let (_dir, m) = load(true, Freeze::default());
    let drop = Dropout::train(0.1, 0.1, 42, 0, vec![0, 1, 2]);
    let whole = objective_grads(&m, &drop);
    let net = m.network().unwrap().for_step_sums();
    let sums: StepSums = net
        .params_in_order()
        .iter()
        .map(|p| (p.id(), net.zero_step_sum(p).unwrap()))
        .collect();
    net.set_step_sums(&sums).unwrap();
    let batch = m.batch(&TEXTS).unwrap();
    let store = net
        .backward(&weighted_sum(&net.forward(&batch, &drop).unwrap()))
        .unwrap();
    let mut summed = Vec::new();
    for (name, var) in &m.params.vars {
        // The embedding layer adds into the sums only after the embedding cut.
        let Some(sum) = sums.get(&var.as_tensor().id()) else {
            continue;
        };
        if !name.starts_with("encoder.") {
            continue;
        }
        assert!(
            store.get(var.as_tensor()).is_none(),
            "{name}: also a graph gradient"
        );
        let ours = net.finish_step_sum(var.as_tensor(), sum).unwrap();
        let graph = whole.get(var.as_tensor()).unwrap();
        let d = common::max_abs_diff(&ours, graph);
        let scale = common::max_abs(graph);
        assert!(
            scale > 0.0 && d <= 1e-5 * scale,
            "{name}: differs by {d} of {scale}"
        );
        summed.push(name.clone());
    }
    assert!(
        summed.iter().any(|n| n.contains("relative_attention_bias")),
        "the bias table is summed in order: {summed:?}"
    );
    assert_eq!(
        summed.len(),
        1 + 2 * 16,
        "the table and both layers' parameters"
    );
}

#[test]
fn frozen_tensors_get_no_variable_and_no_gradient() {
    let (_dir, m) = load(
        false,
        Freeze {
            embeddings: true,
            layers: 1,
        },
    );
    assert!(m
        .params
        .vars
        .keys()
        .all(|k| !k.starts_with("embeddings.") && !k.starts_with("encoder.layer.0.")));
    assert!(m
        .params
        .vars
        .keys()
        .any(|k| k.starts_with("encoder.layer.1.")));
}

#[test]
fn inference_builds_no_graph() {
    let (_dir, m) = load(false, Freeze::default());
    let net = m.inference_network().unwrap();
    let batch = m.batch(&TEXTS).unwrap();
    let emb = net.forward(&batch, &Dropout::off()).unwrap();
    assert!(
        !emb.track_op(),
        "encode output must not carry an autograd graph"
    );
}

/// Central differences on a few elements of several kinds of tensor, in f32 with a step large
/// enough for the rounding noise to stay well below the signal.
fn analytic_gradient_matches_finite_differences(mpnet: bool) {
    let (_dir, m) = load(mpnet, Freeze::default());
    let off = Dropout::off();
    let grads = objective_grads(&m, &off);
    let mut names: Vec<&String> = m
        .params
        .vars
        .keys()
        .filter(|k| {
            k.contains("LayerNorm.weight")
                || k.contains("query.weight")
                || k.contains("attn.q.weight")
                || k.contains("output.dense.bias")
                || k.contains("relative_attention_bias")
                || k.contains("word_embeddings")
        })
        .collect();
    names.truncate(8);
    let eps = 1e-2f32;
    for name in names {
        let var = &m.params.vars[name];
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // The element with the largest gradient, and a middle one.
        let top = (0..g.len())
            .max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs()))
            .unwrap();
        for &i in &[top, g.len() / 2] {
            let at = |delta: f32| {
                let mut v = base.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                objective(&m, &off)
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            var.set(&Tensor::from_vec(base.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let analytic = g[i] as f64;
            let tol = 2e-2 * analytic.abs().max(numeric.abs()) + 2e-3;
            assert!(
                (analytic - numeric).abs() <= tol,
                "{name}[{i}]: analytic {analytic} vs numeric {numeric}"
            );
        }
    }
}

#[test]
fn bert_gradient_matches_finite_differences() {
    analytic_gradient_matches_finite_differences(false);
}

#[test]
fn mpnet_gradient_matches_finite_differences() {
    analytic_gradient_matches_finite_differences(true);
}

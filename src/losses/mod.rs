//! Training losses. A loss is a function of sentence embeddings (and labels), never of the
//! model: the plain path, the cached (GradCache) path and OOM retries all call the same code.
//!
//! | loss | data | batch-coupled |
//! | --- | --- | --- |
//! | [`mnrl`] MultipleNegativesRankingLoss | (anchor, positive[, negatives...]) | yes |
//! | [`mnsrl`] MultipleNegativesSymmetricRankingLoss | (anchor, positive[, negatives...]) | yes |
//! | [`gist`] GISTEmbedLoss | (anchor, positive[, negatives...]) and the guide's embeddings | yes |
//! | [`triplet`] TripletLoss | (anchor, positive, negative) | no |
//! | [`cosent`] CoSENTLoss | (sentence1, sentence2, score) | yes |
//! | [`cosine`] CosineSimilarityLoss | (sentence1, sentence2, score) | no |
//! | [`contrastive`] ContrastiveLoss | (sentence1, sentence2, label 0/1) | no |
//! | [`online_contrastive`] OnlineContrastiveLoss | (sentence1, sentence2, label 0/1) | yes |
//! | [`mse`] MSELoss | (text, teacher embedding) | no |
//! | [`margin_mse`] MarginMSELoss | (anchor, positive, negative, teacher margin) | no |
//!
//! A batch-coupled loss compares every row with every other row of the batch (or picks rows by
//! batch statistics), so it is not the mean of per-micro-batch losses: the trainer computes it
//! over the whole batch (cached scheme). The others are means over rows, and plain gradient
//! accumulation is exact for them.
//!
//! [`matryoshka`] wraps any of them: the same loss at several truncated widths, summed
//! (`train.matryoshka_dims`).

pub mod contrastive;
pub mod cosent;
pub mod cosine;
pub mod gist;
pub mod margin_mse;
pub mod matryoshka;
pub mod mnrl;
pub mod mnsrl;
pub mod mse;
pub mod online_contrastive;
pub mod triplet;

use candle_core::{Tensor, D};

use crate::config::TrainSection;
pub use crate::config::{Distance, LossKind};
use crate::data::RowShape;
use crate::error::{Error, Result};
pub use matryoshka::Matryoshka;

/// A loss with its parameters: `train.loss`, `train.margin`, `train.distance`. `None` takes the
/// loss's own default, as sentence-transformers' classes do (see each loss's module).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loss {
    pub kind: LossKind,
    pub margin: Option<f64>,
    pub distance: Option<Distance>,
}

impl Loss {
    pub fn from_train(t: &TrainSection) -> Self {
        Loss {
            kind: t.loss,
            margin: t.margin,
            distance: t.distance,
        }
    }

    /// The margin in force: `train.margin`, else 5 for TripletLoss, 0 for GISTEmbedLoss and
    /// 0.5 for the contrastive losses (sentence-transformers' defaults).
    pub fn margin(&self) -> f64 {
        self.margin.unwrap_or(match self.kind {
            LossKind::Triplet => 5.0,
            LossKind::Gist => 0.0,
            _ => 0.5,
        })
    }

    /// The distance in force: `train.distance`, else euclidean for TripletLoss and cosine for
    /// the contrastive losses.
    pub fn distance(&self) -> Distance {
        self.distance.unwrap_or(match self.kind {
            LossKind::Triplet => Distance::Euclidean,
            _ => Distance::Cosine,
        })
    }
}

impl From<LossKind> for Loss {
    fn from(kind: LossKind) -> Self {
        Loss {
            kind,
            margin: None,
            distance: None,
        }
    }
}

/// What a loss takes besides the trained model's embeddings: `labels` the scores, 0/1 labels
/// or margins (batch,), or the teacher embeddings (batch, dim) of MSELoss; `guide` the guide
/// model's embeddings of each text column (GISTEmbedLoss).
#[derive(Clone, Copy, Default)]
pub struct Extra<'t> {
    pub labels: Option<&'t Tensor>,
    pub guide: Option<&'t [Tensor]>,
}

impl<'t> Extra<'t> {
    pub fn labels(labels: Option<&'t Tensor>) -> Self {
        Extra {
            labels,
            guide: None,
        }
    }
}

/// The loss of one batch. `columns[i]` holds the embeddings of the i-th text column,
/// (batch, dim) f32; `extra` the labels or guide embeddings the loss takes. With
/// `matryoshka`, the loss is summed over its widths (see [`matryoshka`]); MSELoss's teacher
/// embeddings are cut with the columns, the guide's embeddings are not (they only pick the
/// negatives, as in sentence-transformers, where MatryoshkaLoss cuts the trained model's
/// output only).
pub fn compute(
    loss: impl Into<Loss>,
    scale: f64,
    matryoshka: Option<&Matryoshka>,
    columns: &[Tensor],
    extra: Extra,
) -> Result<Tensor> {
    let loss = loss.into();
    match matryoshka {
        Some(m) if loss.kind == LossKind::Mse => {
            let n = columns.len();
            let with_teacher = [columns, &[need(extra.labels)?.clone()]].concat();
            m.loss(&with_teacher, |cut| {
                single(loss, scale, &cut[..n], Extra::labels(Some(&cut[n])))
            })
        }
        Some(m) => m.loss(columns, |cut| single(loss, scale, cut, extra)),
        None => single(loss, scale, columns, extra),
    }
}

/// One loss at the embeddings' full width.
fn single(loss: Loss, scale: f64, columns: &[Tensor], extra: Extra) -> Result<Tensor> {
    let (c, labels) = (columns, extra.labels);
    match loss.kind {
        LossKind::Mnrl => mnrl::loss(c, scale),
        LossKind::Mnsrl => mnsrl::loss(c, scale),
        LossKind::Gist => {
            let guide = extra.guide.ok_or_else(|| {
                Error::Internal("GISTEmbedLoss needs the guide's embeddings".into())
            })?;
            gist::loss(c, guide, scale, loss.margin())
        }
        LossKind::Cosent => cosent::loss(&c[0], &c[1], need(labels)?, scale),
        LossKind::Cosine => cosine::loss(&c[0], &c[1], need(labels)?),
        LossKind::Triplet => triplet::loss(&c[0], &c[1], &c[2], loss.distance(), loss.margin()),
        LossKind::Contrastive => {
            contrastive::loss(&c[0], &c[1], need(labels)?, loss.distance(), loss.margin())
        }
        LossKind::OnlineContrastive => {
            online_contrastive::loss(&c[0], &c[1], need(labels)?, loss.distance(), loss.margin())
        }
        LossKind::Mse => mse::loss(c, need(labels)?),
        LossKind::MarginMse => margin_mse::loss(&c[0], &c[1], &c[2], need(labels)?),
    }
}

fn need(labels: Option<&Tensor>) -> Result<&Tensor> {
    labels.ok_or_else(|| Error::Internal("this loss needs a label column".into()))
}

/// Whether the loss couples the rows of a batch (and so needs the cached scheme to be exact
/// under micro-batching).
pub fn couples_batch(loss: impl Into<Loss>) -> bool {
    matches!(
        loss.into().kind,
        LossKind::Mnrl
            | LossKind::Mnsrl
            | LossKind::Gist
            | LossKind::Cosent
            | LossKind::OnlineContrastive
    )
}

/// The row shapes a loss trains on.
pub fn fits(kind: LossKind, shape: RowShape) -> bool {
    match kind {
        LossKind::Mnrl | LossKind::Mnsrl | LossKind::Gist => shape.is_retrieval(),
        LossKind::Triplet => matches!(shape, RowShape::Negatives(1) | RowShape::Margin),
        LossKind::Cosent | LossKind::Cosine => shape == RowShape::Scored,
        LossKind::Contrastive | LossKind::OnlineContrastive => shape == RowShape::Labeled,
        LossKind::Mse => shape == RowShape::Distill,
        LossKind::MarginMse => shape == RowShape::Margin,
    }
}

/// Checks, before training, that the data has what the loss needs; the error names `key`
/// (`train.loss`, or a training set's `data.train[i].loss`) and the file.
pub fn check_fits(
    kind: LossKind,
    shape: RowShape,
    key: &str,
    file: &std::path::Path,
) -> Result<()> {
    if fits(kind, shape) {
        return Ok(());
    }
    let needs = match kind {
        LossKind::Mnrl | LossKind::Mnsrl | LossKind::Gist => {
            "anchor,positive[,negative or ,negative_1,...,negative_n] rows"
        }
        LossKind::Triplet => "anchor,positive,negative rows",
        LossKind::Cosent | LossKind::Cosine => "sentence1,sentence2,score rows",
        LossKind::Contrastive | LossKind::OnlineContrastive => {
            "sentence1,sentence2,label rows (label 0 or 1)"
        }
        LossKind::Mse => "text,embedding rows (the teacher's embedding as a JSON list)",
        LossKind::MarginMse => "anchor,positive,negative,margin rows",
    };
    let others: Vec<String> = LossKind::ALL
        .into_iter()
        .filter(|k| fits(*k, shape))
        .map(|k| format!("\"{k}\""))
        .collect();
    let columns_key = key
        .replace("train.loss", "data.loss")
        .replace(".loss", ".columns");
    Err(Error::config(
        key,
        format!(
            "`{}` needs {needs}, but the training data {} has {} ({}); for those \
             use {key} = {}, or map other columns with {columns_key}",
            kind.as_str(),
            file.display(),
            shape.name(),
            shape.roles().join(","),
            others.join(" or ")
        ),
    ))
}

/// How far apart matching rows are: (n,). `eps` is added to x − y for the euclidean and
/// manhattan distances (`F.pairwise_distance` does, TripletLoss's distances do not).
pub fn distance(a: &Tensor, b: &Tensor, metric: Distance, eps: f64) -> Result<Tensor> {
    Ok(match metric {
        Distance::Cosine => (1.0 - cos_sim_pairwise(a, b)?)?,
        Distance::Euclidean => ((a - b)? + eps)?.sqr()?.sum(D::Minus1)?.sqrt()?,
        Distance::Manhattan => ((a - b)? + eps)?.abs()?.sum(D::Minus1)?,
    })
}

/// Cosine similarity of every row of `a` with every row of `b`: (n, m).
pub fn cos_sim_matrix(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a = crate::model::pooling::normalize(a)?;
    let b = crate::model::pooling::normalize(b)?;
    Ok(a.matmul(&b.t()?)?)
}

/// Cosine similarity of matching rows: (n,).
pub fn cos_sim_pairwise(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let a = crate::model::pooling::normalize(a)?;
    let b = crate::model::pooling::normalize(b)?;
    Ok((a * b)?.sum(D::Minus1)?)
}

/// log Σ exp(x) over the last dimension, stable, with a gradient.
pub fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let s = x
        .broadcast_sub(&max)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?;
    Ok((s + max)?.squeeze(D::Minus1)?)
}

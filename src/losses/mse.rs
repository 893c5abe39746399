//! MSELoss (distillation): the mean squared error between the student's embedding of each text
//! and the teacher's embedding of it, over every component.
//!
//! | input | shape |
//! | --- | --- |
//! | text | (batch, dim) |
//! | embedding (the teacher's) | (batch, dim) |
//!
//! Use it to distil a (larger) teacher into the model, or to make a model multilingual: the
//! teacher embeds the source texts once (`st-tune encode --model TEACHER` writes the
//! `{"text", "embedding"}` JSON lines this loss reads) and the student learns to give the
//! same vectors. The teacher's dimension must equal the model's. Per row (no coupling).
//! Under Matryoshka training the teacher's embedding is cut and re-normalised like the
//! student's. Reimers & Gurevych 2020, "Making Monolingual Sentence Embeddings Multilingual
//! using Knowledge Distillation".

use candle_core::{DType, Tensor};

use crate::error::Result;

/// `columns`: the student's embeddings per text column, each compared with `teacher`; the
/// mean over columns, as sentence-transformers' EmbedDistillLoss averages them.
pub fn loss(columns: &[Tensor], teacher: &Tensor) -> Result<Tensor> {
    let teacher = teacher.to_dtype(DType::F32)?.detach();
    let per_column = columns
        .iter()
        .map(|c| Ok((c - &teacher)?.sqr()?.mean_all()?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&per_column, 0)?.mean_all()?)
}

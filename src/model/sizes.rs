//! The numbers every family's config.json gives under its own names: the encoder's sizes and
//! its dropout. Apart from `config.rs` so that the family files can return them without
//! importing the enum that imports them.

/// The sizes of an encoder, whatever its family calls them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sizes {
    pub vocab: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub layers: usize,
    /// Rows of the position table.
    pub positions: usize,
    /// Layer-norm epsilon (every norm of the model).
    pub eps: f64,
}

/// Dropout probabilities from config.json.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutProbs {
    /// On the embedding layer's output and the layers' residual branches.
    pub hidden: f32,
    /// On the attention probabilities.
    pub attention: f32,
}

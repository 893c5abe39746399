//! Rotary position embeddings (RoFormer; ModernBERT's positions): each head's query and key are
//! rotated, pair (d, d + head_dim/2) by the angle `position · θ^(-2d/head_dim)`, so that their
//! dot product depends on the distance between the two tokens. The rotation is orthogonal: its
//! backward pass is the rotation by the opposite angle.

use candle_core::{Device, Tensor};

use crate::error::Result;

/// The angles of one batch: cos and sin of every (token, frequency), (tokens, head_dim/2) f32,
/// for rows packed as the batch packs them.
#[derive(Debug, Clone)]
pub struct Rotary {
    pub heads: usize,
    pub cos: Tensor,
    pub sin: Tensor,
}

impl Rotary {
    /// The tables for tokens at `positions` with base `theta`, as transformers computes them in
    /// f32 (`inv_freq = 1 / θ^(2d/dim)`, then `position · inv_freq`), so the angles agree.
    pub fn new(
        positions: &[u32],
        theta: f32,
        head_dim: usize,
        heads: usize,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|d| 1.0 / theta.powf((2 * d) as f32 / head_dim as f32))
            .collect();
        let (mut cos, mut sin) = (
            Vec::with_capacity(positions.len() * half),
            Vec::with_capacity(positions.len() * half),
        );
        for &p in positions {
            for f in &inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let shape = (positions.len(), half);
        Ok(Self {
            heads,
            cos: Tensor::from_vec(cos, shape, &Device::Cpu)?.to_device(device)?,
            sin: Tensor::from_vec(sin, shape, &Device::Cpu)?.to_device(device)?,
        })
    }
}

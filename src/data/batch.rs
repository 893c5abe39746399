//! Micro-batches of token ids: each padded only to its own longest row, with the row ids that
//! key dropout masks. Row order (seeded shuffle, optional length grouping) is decided here too.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::Result;

/// Token ids of a batch of texts, right-padded: `ids` (batch, seq) u32, `mask` (batch, seq) f32
/// with 1 on real tokens. `row_ids` name each row for dropout (see `model::dropout`).
#[derive(Debug, Clone)]
pub struct TokenBatch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub lengths: Vec<usize>,
    pub row_ids: Vec<u64>,
}

impl TokenBatch {
    pub fn new(rows: &[&[u32]], row_ids: Vec<u64>, pad_id: u32, device: &Device) -> Result<Self> {
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut mask = Vec::with_capacity(rows.len() * seq);
        for r in rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(pad_id, seq - r.len()));
            mask.extend(std::iter::repeat_n(1f32, r.len()));
            mask.extend(std::iter::repeat_n(0f32, seq - r.len()));
        }
        let n = rows.len();
        Ok(Self {
            ids: Tensor::from_vec(ids, (n, seq), device)?,
            mask: Tensor::from_vec(mask, (n, seq), device)?,
            lengths: rows.iter().map(|r| r.len()).collect(),
            row_ids,
        })
    }

    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Token slots (padded) and real tokens, for throughput and padding reports.
    pub fn token_counts(&self) -> (usize, usize) {
        let seq = self.ids.dims().get(1).copied().unwrap_or(0);
        (self.len() * seq, self.lengths.iter().sum())
    }
}

/// The order rows are visited in one epoch: a permutation seeded by (seed, epoch). With
/// `group_by_length`, the permutation is cut into windows of `batch_size * 50` rows, each window
/// sorted by length and cut into batches, and the batches shuffled: little padding, still random.
pub fn epoch_order(
    lengths: &[usize],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    group_by_length: bool,
) -> Vec<usize> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9));
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.shuffle(&mut rng);
    if !group_by_length || batch_size <= 1 {
        return order;
    }
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for window in order.chunks(batch_size * 50) {
        let mut w = window.to_vec();
        w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        batches.extend(w.chunks(batch_size).map(|c| c.to_vec()));
    }
    batches.shuffle(&mut rng);
    batches.concat()
}

//! Micro-batches of token ids: each padded only to its own longest row, with the row ids that
//! key dropout masks. Row order (seeded shuffle, optional length grouping) is decided here too.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::error::Result;

/// Token ids of a batch of texts, packed without padding: row r's tokens are
/// `ids[offsets[r] .. offsets[r] + lengths[r]]`. Encoders work on all tokens at once where a
/// layer is per-token (linear layers, norms, feed-forward) and row by row only in attention,
/// so no compute or memory goes to padding (55 % of the slots of a padded STS-B batch).
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// (tokens,) u32.
    pub ids: Tensor,
    pub lengths: Vec<usize>,
    pub offsets: Vec<usize>,
}

impl TokenBatch {
    pub fn new(rows: &[&[u32]], device: &Device) -> Result<Self> {
        let mut ids = Vec::with_capacity(rows.iter().map(|r| r.len()).sum());
        let mut offsets = Vec::with_capacity(rows.len());
        for r in rows {
            offsets.push(ids.len());
            ids.extend_from_slice(r);
        }
        let n = ids.len();
        Ok(Self {
            ids: Tensor::from_vec(ids, n, device)?,
            lengths: rows.iter().map(|r| r.len()).collect(),
            offsets,
        })
    }

    /// Number of rows (texts).
    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Number of tokens of all rows together.
    pub fn tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    /// Rows as (offset, length) pairs.
    pub fn rows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.offsets
            .iter()
            .copied()
            .zip(self.lengths.iter().copied())
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

/// Moves the `batch_size` longest rows to the front of `order` (swapping them with the rows that
/// were there), so the first step is the most memory-hungry one and an OOM shows in the first
/// seconds of a run rather than hours in.
pub fn longest_first(order: &mut [usize], lengths: &[usize], batch_size: usize) {
    let mut by_len: Vec<usize> = (0..order.len()).collect();
    by_len.sort_by_key(|&p| (std::cmp::Reverse(lengths[order[p]]), p));
    let mut longest: Vec<usize> = by_len.into_iter().take(batch_size).collect();
    longest.sort_unstable();
    // Positions already in the first batch stay; the others swap with the front's short rows.
    let front: Vec<usize> = (0..batch_size.min(order.len()))
        .filter(|p| !longest.contains(p))
        .collect();
    let mut free = front.into_iter();
    for p in longest.into_iter().filter(|&p| p >= batch_size) {
        let q = free
            .next()
            .expect("as many free front slots as longest rows outside the front");
        order.swap(p, q);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_batch_holds_the_longest_rows() {
        let lengths = [3, 9, 1, 7, 2, 8, 5];
        let mut order = epoch_order(&lengths, 2, 42, 0, false);
        longest_first(&mut order, &lengths, 3);
        let mut first: Vec<usize> = order[..3].iter().map(|&i| lengths[i]).collect();
        first.sort_unstable();
        assert_eq!(first, vec![7, 8, 9]);
        let mut all = order.clone();
        all.sort_unstable();
        assert_eq!(all, (0..7).collect::<Vec<_>>(), "still a permutation");
    }

    #[test]
    fn length_grouping_keeps_similar_lengths_together() {
        let lengths: Vec<usize> = (0..400).map(|i| (i * 37) % 100).collect();
        let order = epoch_order(&lengths, 8, 1, 0, true);
        let spread: usize = order
            .chunks(8)
            .map(|c| {
                c.iter().map(|&i| lengths[i]).max().unwrap()
                    - c.iter().map(|&i| lengths[i]).min().unwrap()
            })
            .sum();
        assert!(
            spread / 50 < 10,
            "average spread within a batch {}",
            spread / 50
        );
    }
}

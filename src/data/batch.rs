//! Micro-batches of token ids, packed without padding (see [`TokenBatch`]); the dropout keys
//! are the trainer's (`train/passes.rs`). Row order (seeded shuffle, optional length
//! grouping) and the cut into batches (optionally with no text twice in a batch) are decided
//! here too.

use std::collections::HashSet;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

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
    /// How many leading tokens of each row are its prompt's ([CLS] included): pooling leaves
    /// them out when the model's `include_prompt` is false. Zeros unless set.
    pub prompt_tokens: Vec<usize>,
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
            prompt_tokens: vec![0; rows.len()],
        })
    }

    /// The same batch with each row's prompt token count (see `prompt_tokens`).
    pub fn with_prompt_tokens(mut self, prompt_tokens: Vec<usize>) -> Self {
        assert_eq!(prompt_tokens.len(), self.len(), "one prompt length per row");
        self.prompt_tokens = prompt_tokens;
        self
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

/// How the shuffled rows are cut into batches (`train.batch_sampler`), as
/// sentence-transformers' `BatchSamplers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchSampler {
    /// Consecutive rows of the shuffled order (`BatchSamplers.BATCH_SAMPLER`).
    Default,
    /// No text twice in a batch (`BatchSamplers.NO_DUPLICATES`): with in-batch negatives
    /// (mnrl), a repeated text would otherwise be scored as a negative of itself.
    NoDuplicates,
}

impl BatchSampler {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchSampler::Default => "default",
            BatchSampler::NoDuplicates => "no_duplicates",
        }
    }
}

/// The batches of one epoch, as sentence-transformers' `NoDuplicatesBatchSampler` cuts them:
/// walk the rows still waiting, in `order`, and take each whose texts (`texts[row]`, ids of
/// distinct strings) the batch does not hold yet, until it has `batch_size` rows; the rows
/// passed over wait, in order, for the next batch. A batch that cannot be filled is used as it
/// is, so every row is trained on once. Deterministic in `order`.
pub fn no_duplicate_batches(
    order: &[usize],
    texts: &[Vec<u32>],
    batch_size: usize,
) -> Vec<Vec<usize>> {
    let mut waiting = order.to_vec();
    let mut batches = Vec::new();
    while !waiting.is_empty() {
        let mut batch = Vec::with_capacity(batch_size);
        let mut held: HashSet<u32> = HashSet::new();
        let mut passed = Vec::new();
        let mut taken = 0;
        for &row in &waiting {
            taken += 1;
            if texts[row].iter().any(|t| held.contains(t)) {
                passed.push(row);
                continue;
            }
            held.extend(texts[row].iter().copied());
            batch.push(row);
            if batch.len() == batch_size {
                break;
            }
        }
        passed.extend_from_slice(&waiting[taken..]);
        waiting = passed;
        batches.push(batch);
    }
    batches
}

/// Every epoch's batches, a pure function of (seed, epoch): a resumed run or a retried step
/// gets the same rows. The first epoch starts with the longest rows (see [`longest_first`]).
pub struct EpochBatches<'a> {
    pub lengths: &'a [usize],
    /// Ids of each row's distinct texts; used by [`BatchSampler::NoDuplicates`].
    pub texts: &'a [Vec<u32>],
    pub batch_size: usize,
    pub seed: u64,
    pub group_by_length: bool,
    pub sampler: BatchSampler,
    /// Number of batches of the epochs counted so far.
    counts: Vec<usize>,
}

impl<'a> EpochBatches<'a> {
    pub fn new(
        lengths: &'a [usize],
        texts: &'a [Vec<u32>],
        batch_size: usize,
        seed: u64,
        group_by_length: bool,
        sampler: BatchSampler,
    ) -> Self {
        Self {
            lengths,
            texts,
            batch_size: batch_size.max(1),
            seed,
            group_by_length,
            sampler,
            counts: Vec::new(),
        }
    }

    /// The batches of `epoch` (0-based), in training order.
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        let bs = self.batch_size;
        let mut order = epoch_order(self.lengths, bs, self.seed, epoch, self.group_by_length);
        if epoch == 0 {
            longest_first(&mut order, self.lengths, bs);
        }
        match self.sampler {
            BatchSampler::Default => order.chunks(bs).map(<[usize]>::to_vec).collect(),
            BatchSampler::NoDuplicates => no_duplicate_batches(&order, self.texts, bs),
        }
    }

    fn count(&mut self, epoch: usize) -> usize {
        while self.counts.len() <= epoch {
            let e = self.counts.len();
            let n = match self.sampler {
                BatchSampler::Default => self.lengths.len().div_ceil(self.batch_size),
                BatchSampler::NoDuplicates => self.epoch(e as u64).len(),
            };
            self.counts.push(n.max(1));
        }
        self.counts[epoch]
    }

    /// Optimizer steps of the first `epochs` epochs.
    pub fn steps(&mut self, epochs: usize) -> usize {
        (0..epochs).map(|e| self.count(e)).sum()
    }

    /// (epoch, batch within it) of optimizer step `step` (0-based).
    pub fn locate(&mut self, mut step: usize) -> (u64, usize) {
        let mut epoch = 0;
        while step >= self.count(epoch) {
            step -= self.count(epoch);
            epoch += 1;
        }
        (epoch as u64, step)
    }
}

/// Ids of each row's distinct texts (equal strings, equal ids), for
/// [`BatchSampler::NoDuplicates`].
pub fn text_ids(rows: &[Vec<&str>]) -> Vec<Vec<u32>> {
    let mut ids: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    rows.iter()
        .map(|texts| {
            let mut row: Vec<u32> = texts
                .iter()
                .map(|t| {
                    let next = ids.len() as u32;
                    *ids.entry(t).or_insert(next)
                })
                .collect();
            row.sort_unstable();
            row.dedup();
            row
        })
        .collect()
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
    fn no_batch_holds_a_text_twice_and_every_row_is_used_once() {
        // 200 (anchor, positive) rows over only 8 positives, each repeated 25 times.
        let owned: Vec<(String, String)> = (0..200)
            .map(|i| (format!("q{i}"), format!("p{}", i % 8)))
            .collect();
        let rows: Vec<Vec<&str>> = owned
            .iter()
            .map(|(a, p)| vec![a.as_str(), p.as_str()])
            .collect();
        let ids = text_ids(&rows);
        let lengths = vec![5; rows.len()];
        let plan = EpochBatches::new(&lengths, &ids, 6, 3, false, BatchSampler::NoDuplicates);
        for epoch in 0..2 {
            let batches = plan.epoch(epoch);
            for b in &batches {
                let texts: Vec<&str> = b.iter().flat_map(|&r| rows[r].iter().copied()).collect();
                let distinct: HashSet<&str> = texts.iter().copied().collect();
                assert_eq!(distinct.len(), texts.len(), "batch {b:?} repeats a text");
                assert!(b.len() <= 6);
            }
            let mut all: Vec<usize> = batches.concat();
            all.sort_unstable();
            assert_eq!(all, (0..200).collect::<Vec<_>>(), "every row once");
            // Full batches but the last few: 8 positives fill 6 slots until they run out.
            assert!(batches.len() < 200 / 6 + 8, "{} batches", batches.len());
        }
        // The plain sampler puts repeated positives together here.
        let plain = EpochBatches::new(&lengths, &ids, 6, 3, false, BatchSampler::Default);
        assert!(plain.epoch(0).iter().any(|b| {
            let p: HashSet<&str> = b.iter().map(|&r| rows[r][1]).collect();
            p.len() < b.len()
        }));
    }

    #[test]
    fn no_n_tuple_batch_holds_a_text_twice_in_any_column() {
        // Mined n-tuples: each row's three negatives are the positives of the next rows, as
        // hard negatives mined from the positives are.
        let owned: Vec<Vec<String>> = (0..60)
            .map(|i| {
                let mut row = vec![format!("q{i}"), format!("p{i}")];
                row.extend((1..=3).map(|k| format!("p{}", (i + k) % 60)));
                row
            })
            .collect();
        let rows: Vec<Vec<&str>> = owned
            .iter()
            .map(|r| r.iter().map(String::as_str).collect())
            .collect();
        let ids = text_ids(&rows);
        let lengths = vec![5; rows.len()];
        let plan = EpochBatches::new(&lengths, &ids, 8, 7, false, BatchSampler::NoDuplicates);
        let batches = plan.epoch(0);
        for b in &batches {
            let texts: Vec<&str> = b.iter().flat_map(|&r| rows[r].iter().copied()).collect();
            let distinct: HashSet<&str> = texts.iter().copied().collect();
            assert_eq!(distinct.len(), texts.len(), "batch {b:?} repeats a text");
        }
        let mut all: Vec<usize> = batches.concat();
        all.sort_unstable();
        assert_eq!(all, (0..60).collect::<Vec<_>>(), "every row once");
        // Without the sampler a negative shows up as another row's positive.
        let plain = EpochBatches::new(&lengths, &ids, 8, 7, false, BatchSampler::Default);
        assert!(plain.epoch(0).iter().any(|b| {
            let texts: Vec<&str> = b.iter().flat_map(|&r| rows[r].iter().copied()).collect();
            texts.iter().collect::<HashSet<_>>().len() < texts.len()
        }));
    }

    #[test]
    fn the_batches_are_a_function_of_seed_and_epoch() {
        let owned: Vec<String> = (0..50).map(|i| format!("t{}", i % 7)).collect();
        let rows: Vec<Vec<&str>> = owned
            .iter()
            .enumerate()
            .map(|(i, t)| vec![t.as_str(), owned[(i * 3) % 50].as_str()])
            .collect();
        let ids = text_ids(&rows);
        let lengths: Vec<usize> = (0..50).map(|i| i % 9 + 1).collect();
        let mut a = EpochBatches::new(&lengths, &ids, 4, 11, true, BatchSampler::NoDuplicates);
        let b = EpochBatches::new(&lengths, &ids, 4, 11, true, BatchSampler::NoDuplicates);
        assert_eq!(a.epoch(1), b.epoch(1));
        assert_ne!(a.epoch(0), a.epoch(1));
        // Steps are located across epochs of different batch counts.
        let (e0, e1) = (a.epoch(0).len(), a.epoch(1).len());
        assert_eq!(a.steps(2), e0 + e1);
        assert_eq!(a.locate(e0 - 1), (0, e0 - 1));
        assert_eq!(a.locate(e0), (1, 0));
        assert_eq!(a.locate(e0 + e1), (2, 0));
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

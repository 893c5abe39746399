//! The batch order of a run over several training sets: every batch from one set, the sets
//! taken in turn or in proportion to their size, as sentence-transformers'
//! `MultiDatasetBatchSamplers` (`ROUND_ROBIN`, `PROPORTIONAL`) order them. Each set is cut into
//! batches on its own ([`EpochBatches`]: shuffle, length grouping, no duplicates); this module
//! only decides which set's next batch comes next. The order is a pure function of
//! (seed, epoch), so a resumed run or a retried step gets the same rows. `train` runs every
//! run through it: one file is one set, whose batches it gives unchanged.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::batch::EpochBatches;

/// How batches of several sets are interleaved, as sentence-transformers'
/// `MultiDatasetBatchSamplers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MixSampler {
    /// One batch of each set in turn, for as many full rounds as the set with the fewest
    /// batches has (`RoundRobinBatchSampler`): each set weighs the same; the larger sets'
    /// other batches are not used that epoch.
    RoundRobin,
    /// Every batch of every set once, the sets in a seeded random order
    /// (`ProportionalBatchSampler`): each set weighs by its number of batches.
    Proportional,
}

impl MixSampler {
    pub fn as_str(self) -> &'static str {
        match self {
            MixSampler::RoundRobin => "round_robin",
            MixSampler::Proportional => "proportional",
        }
    }
}

/// One optimizer step's rows: `rows` index into training set `set`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MixedBatch {
    pub set: usize,
    pub rows: Vec<usize>,
}

/// Interleaves the sets' batches of one epoch (`per_set[s]`: set s's batches, in order).
pub fn interleave(
    per_set: Vec<Vec<Vec<usize>>>,
    sampler: MixSampler,
    seed: u64,
    epoch: u64,
) -> Vec<MixedBatch> {
    match sampler {
        MixSampler::RoundRobin => {
            let rounds = per_set.iter().map(Vec::len).min().unwrap_or(0);
            let mut sets: Vec<_> = per_set.into_iter().map(Vec::into_iter).collect();
            let mut out = Vec::with_capacity(rounds * sets.len());
            for _ in 0..rounds {
                for (set, batches) in sets.iter_mut().enumerate() {
                    let rows = batches.next().expect("every set has `rounds` batches");
                    out.push(MixedBatch { set, rows });
                }
            }
            out
        }
        MixSampler::Proportional => {
            let mut labels: Vec<usize> = per_set
                .iter()
                .enumerate()
                .flat_map(|(set, b)| std::iter::repeat_n(set, b.len()))
                .collect();
            // Its own stream, apart from the one that shuffles each set's rows.
            let mix_seed = seed ^ 0x6D69_785F_7365_7473 ^ epoch.wrapping_mul(0x9E37_79B9);
            labels.shuffle(&mut rand::rngs::StdRng::seed_from_u64(mix_seed));
            let mut sets: Vec<_> = per_set.into_iter().map(Vec::into_iter).collect();
            labels
                .into_iter()
                .map(|set| MixedBatch {
                    set,
                    rows: sets[set].next().expect("one label per batch"),
                })
                .collect()
        }
    }
}

/// Every epoch's mixed batches, as [`EpochBatches`] gives one set's: a pure function of the
/// sets' own plans, the sampler and (seed, epoch).
pub struct MixedEpochs<'a> {
    pub sets: Vec<EpochBatches<'a>>,
    pub sampler: MixSampler,
    pub seed: u64,
    /// Number of batches of the epochs counted so far.
    counts: Vec<usize>,
}

impl<'a> MixedEpochs<'a> {
    pub fn new(sets: Vec<EpochBatches<'a>>, sampler: MixSampler, seed: u64) -> Self {
        Self {
            sets,
            sampler,
            seed,
            counts: Vec::new(),
        }
    }

    /// The batches of `epoch` (0-based), in training order.
    pub fn epoch(&self, epoch: u64) -> Vec<MixedBatch> {
        let per_set = self.sets.iter().map(|s| s.epoch(epoch)).collect();
        interleave(per_set, self.sampler, self.seed, epoch)
    }

    fn count(&mut self, epoch: usize) -> usize {
        while self.counts.len() <= epoch {
            let e = self.counts.len() as u64;
            let n = self.epoch(e).len();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::{text_ids, BatchSampler};

    /// Set s holds `sizes[s]` rows of distinct texts and lengths 1..=9.
    struct Sets {
        lengths: Vec<Vec<usize>>,
        texts: Vec<Vec<Vec<u32>>>,
    }

    impl Sets {
        fn new(sizes: &[usize]) -> Self {
            let lengths = sizes
                .iter()
                .map(|&n| (0..n).map(|i| i % 9 + 1).collect())
                .collect();
            let texts = sizes
                .iter()
                .map(|&n| {
                    let owned: Vec<String> = (0..n).map(|i| format!("t{i}")).collect();
                    text_ids(&owned.iter().map(|t| vec![t.as_str()]).collect::<Vec<_>>())
                })
                .collect();
            Self { lengths, texts }
        }

        fn plan(&self, batch: usize, seed: u64, sampler: MixSampler) -> MixedEpochs<'_> {
            let sets = (0..self.lengths.len())
                .map(|s| {
                    let (l, t) = (&self.lengths[s], &self.texts[s]);
                    EpochBatches::new(l, t, batch, seed, false, BatchSampler::Default)
                })
                .collect();
            MixedEpochs::new(sets, sampler, seed)
        }
    }

    #[test]
    fn round_robin_takes_one_batch_of_each_set_in_turn_until_the_smallest_runs_out() {
        // Batches of 4: 10, 3 and 5 batches.
        let sets = Sets::new(&[40, 12, 17]);
        let mut plan = sets.plan(4, 7, MixSampler::RoundRobin);
        let batches = plan.epoch(0);
        assert_eq!(batches.len(), 3 * 3, "three full rounds");
        let order: Vec<usize> = batches.iter().map(|b| b.set).collect();
        assert_eq!(order, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
        // Each set's batches are its own plan's first ones, in its order.
        for s in 0..3 {
            let own: Vec<Vec<usize>> = plan.sets[s].epoch(0).into_iter().take(3).collect();
            let got: Vec<Vec<usize>> = batches
                .iter()
                .filter(|b| b.set == s)
                .map(|b| b.rows.clone())
                .collect();
            assert_eq!(got, own);
        }
        assert_eq!(plan.steps(2), 18);
    }

    #[test]
    fn proportional_uses_every_batch_of_every_set_once_in_a_seeded_order() {
        let sets = Sets::new(&[40, 12, 17]);
        let mut plan = sets.plan(4, 7, MixSampler::Proportional);
        let batches = plan.epoch(0);
        assert_eq!(batches.len(), 10 + 3 + 5);
        for (s, n) in [(0, 40), (1, 12), (2, 17)] {
            let mut rows: Vec<usize> = batches
                .iter()
                .filter(|b| b.set == s)
                .flat_map(|b| b.rows.iter().copied())
                .collect();
            rows.sort_unstable();
            assert_eq!(rows, (0..n).collect::<Vec<_>>(), "set {s}: every row once");
        }
        let order = |b: &[MixedBatch]| b.iter().map(|b| b.set).collect::<Vec<_>>();
        // Not one set after the other: the sets are mixed.
        let sets_in_order = order(&batches);
        let runs = sets_in_order.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(runs > 3, "order {sets_in_order:?}");
        // A function of (seed, epoch): the same plan again gives the same order, another
        // epoch or seed another.
        let again = sets.plan(4, 7, MixSampler::Proportional);
        assert_eq!(again.epoch(0), batches);
        assert_ne!(order(&plan.epoch(1)), sets_in_order);
        let other_seed = sets.plan(4, 8, MixSampler::Proportional);
        assert_ne!(order(&other_seed.epoch(0)), sets_in_order);
        assert_eq!(plan.steps(2), 36);
    }

    #[test]
    fn one_set_gives_its_own_batches_under_either_sampler() {
        let sets = Sets::new(&[23]);
        for sampler in [MixSampler::RoundRobin, MixSampler::Proportional] {
            let plan = sets.plan(5, 3, sampler);
            let rows: Vec<Vec<usize>> = plan.epoch(1).into_iter().map(|b| b.rows).collect();
            assert_eq!(rows, plan.sets[0].epoch(1), "{sampler:?}");
        }
    }

    #[test]
    fn steps_are_located_across_epochs() {
        let sets = Sets::new(&[9, 30]);
        let mut plan = sets.plan(4, 1, MixSampler::Proportional);
        let per_epoch = 3 + 8;
        assert_eq!(plan.locate(per_epoch - 1), (0, per_epoch - 1));
        assert_eq!(plan.locate(per_epoch), (1, 0));
        assert_eq!(plan.locate(2 * per_epoch + 2), (2, 2));
    }
}

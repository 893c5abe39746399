//! Pruning: a trial reports its dev metric at rungs counted in training rows seen (so trials
//! with different batch sizes are compared at the same progress), reads what the other trials
//! of the sweep reported at the same rung, and stops early when it is out:
//! - `median`: worse than the median of the others at that rung, once `min_trials` others have
//!   reported there (Optuna's MedianPruner);
//! - `asha`: not in the best 1/`reduction` of the trials at that rung, once `reduction` of them
//!   have reported (the rule of asynchronous successive halving; rungs at min_rows ×
//!   reduction^k).
//!
//! The decisions are pure functions; reports are one small file per (rung, trial) in
//! `DIR/rungs/`, written atomically, so concurrent trials on a shared filesystem need no lock.
//! With concurrent trials a decision depends on who reported first; run one at a time for a
//! reproducible sweep.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::sweep::spec::{Goal, PruneMethod};

/// What a trial's training process needs to prune itself (`train --prune FILE`, written by the
/// sweep runner).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrialPruner {
    pub method: PruneMethod,
    /// The first rung, in training rows seen.
    pub min_rows: usize,
    /// Rung spacing (asha: the next rung is `reduction` times further) and asha's cut.
    pub reduction: usize,
    /// median: how many other trials must have reported at a rung before it prunes.
    pub min_trials: usize,
    /// `spearman` or `pearson` (the dev evaluation's figure), or `loss`.
    pub metric: String,
    pub goal: Goal,
    /// The sweep's `rungs/` folder.
    pub rungs_dir: PathBuf,
    pub trial: usize,
}

/// Rung k is at `min_rows × reduction^k` rows for asha, at `min_rows × (k + 1)` for median.
pub fn rung_rows(method: PruneMethod, min_rows: usize, reduction: usize, k: u32) -> usize {
    match method {
        PruneMethod::Asha => min_rows.saturating_mul(reduction.saturating_pow(k)),
        PruneMethod::Median => min_rows.saturating_mul(k as usize + 1),
    }
}

/// The rungs passed when the rows seen go from `before` to `after`; the last one counts.
pub fn rung_crossed(p: &TrialPruner, before: usize, after: usize) -> Option<u32> {
    (0..64u32)
        .take_while(|&k| rung_rows(p.method, p.min_rows, p.reduction, k) <= after)
        .filter(|&k| rung_rows(p.method, p.min_rows, p.reduction, k) > before)
        .last()
}

/// Median rule: prune when `mine` is worse than the median of `others` (needs `min_trials`).
pub fn median_prunes(goal: Goal, mine: f64, others: &[f64], min_trials: usize) -> bool {
    if others.len() < min_trials.max(1) {
        return false;
    }
    let mut sorted = others.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    goal.better(median, mine)
}

/// ASHA rule: keep the best ⌈all / reduction⌉ of the trials at this rung (`mine` included);
/// with fewer than `reduction` trials there, everyone continues.
pub fn asha_prunes(goal: Goal, mine: f64, others: &[f64], reduction: usize) -> bool {
    let all = others.len() + 1;
    if all < reduction.max(2) {
        return false;
    }
    let keep = all.div_ceil(reduction.max(2));
    let ahead = others.iter().filter(|&&o| goal.better(o, mine)).count();
    ahead >= keep
}

#[derive(Serialize, Deserialize)]
struct Report {
    trial: usize,
    rung: u32,
    rows: usize,
    value: f64,
}

impl crate::train::prune::Pruner for TrialPruner {
    fn metric(&self) -> &str {
        &self.metric
    }

    fn rung_crossed(&self, before: usize, after: usize) -> Option<u32> {
        rung_crossed(self, before, after)
    }

    /// Records this trial's `value` at rung `k` and says whether the trial should stop.
    fn report(&self, k: u32, rows: usize, value: f64) -> Result<bool> {
        std::fs::create_dir_all(&self.rungs_dir).map_err(|e| Error::io(&self.rungs_dir, e))?;
        let mine = Report {
            trial: self.trial,
            rung: k,
            rows,
            value,
        };
        let path = self
            .rungs_dir
            .join(format!("rung-{k:02}-trial-{:04}.json", self.trial));
        let text = serde_json::to_string(&mine).expect("plain data");
        crate::atomic::write_file(&path, text.as_bytes())?;
        let others = self.others_at(k)?;
        Ok(match self.method {
            PruneMethod::Median => median_prunes(self.goal, value, &others, self.min_trials),
            PruneMethod::Asha => asha_prunes(self.goal, value, &others, self.reduction),
        })
    }
}

impl TrialPruner {
    pub fn read(path: &Path) -> Result<TrialPruner> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::sweep(path, format!("is not a pruner file ({e})")))
    }

    fn others_at(&self, k: u32) -> Result<Vec<f64>> {
        let prefix = format!("rung-{k:02}-trial-");
        let mut out = Vec::new();
        let entries =
            std::fs::read_dir(&self.rungs_dir).map_err(|e| Error::io(&self.rungs_dir, e))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.starts_with(&prefix) || !name.ends_with(".json") {
                continue; // other rungs, and staging files of atomic writes
            }
            let Ok(text) = std::fs::read_to_string(entry.path()) else {
                continue;
            };
            if let Ok(r) = serde_json::from_str::<Report>(&text) {
                if r.trial != self.trial && r.value.is_finite() {
                    out.push(r.value);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_prunes_only_below_the_median_and_after_enough_trials() {
        assert!(
            !median_prunes(Goal::Max, 0.1, &[0.5, 0.6], 3),
            "too few others"
        );
        assert!(median_prunes(Goal::Max, 0.1, &[0.5, 0.6, 0.7], 3));
        assert!(!median_prunes(Goal::Max, 0.65, &[0.5, 0.6, 0.7], 3));
        assert!(
            !median_prunes(Goal::Max, 0.6, &[0.5, 0.6, 0.7], 3),
            "ties continue"
        );
        assert!(
            median_prunes(Goal::Min, 0.9, &[0.5, 0.6, 0.7, 0.8], 3),
            "loss: lower is better"
        );
    }

    #[test]
    fn asha_keeps_the_best_fraction() {
        // 6 trials at the rung, reduction 3: the best 2 continue.
        let others = [0.1, 0.2, 0.3, 0.4, 0.5];
        assert!(!asha_prunes(Goal::Max, 0.6, &others, 3));
        assert!(!asha_prunes(Goal::Max, 0.45, &others, 3), "second best");
        assert!(asha_prunes(Goal::Max, 0.35, &others, 3));
        assert!(
            !asha_prunes(Goal::Max, 0.0, &[0.9], 3),
            "fewer than 3 at the rung"
        );
    }

    #[test]
    fn rungs_count_rows_so_batch_sizes_compare() {
        let p = |method| TrialPruner {
            method,
            min_rows: 100,
            reduction: 3,
            min_trials: 1,
            metric: "spearman".into(),
            goal: Goal::Max,
            rungs_dir: PathBuf::new(),
            trial: 0,
        };
        let asha = p(PruneMethod::Asha);
        assert_eq!(rung_crossed(&asha, 0, 99), None);
        assert_eq!(rung_crossed(&asha, 96, 112), Some(0));
        assert_eq!(rung_crossed(&asha, 112, 128), None);
        assert_eq!(rung_crossed(&asha, 288, 320), Some(1), "rung 1 at 300 rows");
        assert_eq!(
            rung_crossed(&asha, 0, 1000),
            Some(2),
            "several at once: the last"
        );
        let median = p(PruneMethod::Median);
        assert_eq!(rung_crossed(&median, 190, 210), Some(1), "every 100 rows");
    }
}

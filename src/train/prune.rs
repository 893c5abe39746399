//! What the loop asks of a pruner, which stops a run early when it falls behind others (a
//! sweep's trials: `sweep/prune.rs` implements it above this floor).

use crate::error::Result;

pub trait Pruner {
    /// The figure judged: a dev figure's name (`spearman`, `ndcg@10`, ...) or `loss`.
    fn metric(&self) -> &str;

    /// The rung passed when the training rows seen go from `before` to `after` (the last one
    /// counts), if any.
    fn rung_crossed(&self, before: usize, after: usize) -> Option<u32>;

    /// Records the run's `value` at rung `k`, after `rows` rows; whether the run should stop.
    fn report(&self, k: u32, rows: usize, value: f64) -> Result<bool>;
}

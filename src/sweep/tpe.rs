//! Tree-structured Parzen Estimator (Bergstra et al. 2011), one key at a time as Optuna's
//! default `TPESampler` does: the trials so far are split into the best quarter ("good") and
//! the rest ("bad"); for each key, candidates are drawn from a density fitted to the good
//! values, and the one with the largest good/bad density ratio is taken.
//!
//! Infeasible trials (they could not fit in memory) and diverged ones (NaN or infinite steps)
//! go to the bad group whatever their score (they have none): the sampler learns to avoid that region, as a constraint, rather than
//! scoring it as a bad result. Failed trials are left out.
//!
//! Trial N's keys depend on the trials before it that had finished when it started: run one
//! trial at a time and the sweep is reproducible; concurrent trials see different histories.

use crate::sweep::draw::{round, SplitMix64};
use crate::sweep::spec::{Sweep, Values};

/// Random trials before TPE takes over.
pub const STARTUP_TRIALS: usize = 5;
const CANDIDATES: usize = 24;

/// One finished trial as TPE sees it: its keys, and its metric (`None`: infeasible or
/// diverged).
pub struct Observation<'a> {
    pub params: &'a [(String, toml::Value)],
    pub metric: Option<f64>,
}

/// Trial `index`'s keys from the history.
pub fn suggest(sweep: &Sweep, index: usize, history: &[Observation]) -> Vec<(String, toml::Value)> {
    let mut scored: Vec<&Observation> = history.iter().filter(|o| o.metric.is_some()).collect();
    scored.sort_by(|a, b| {
        let (x, y) = (a.metric.unwrap_or(0.0), b.metric.unwrap_or(0.0));
        sweep.goal.best_first(x, y)
    });
    let n_good = (scored.len() as f64 * 0.25).ceil().max(1.0) as usize;
    let good: Vec<&Observation> = scored.iter().take(n_good).copied().collect();
    let bad: Vec<&Observation> = scored
        .iter()
        .skip(n_good)
        .copied()
        .chain(history.iter().filter(|o| o.metric.is_none()))
        .collect();
    let mut rng = SplitMix64::new(sweep.seed ^ 0x7470_6500 ^ (index as u64) << 20);
    sweep
        .space
        .iter()
        .map(|(key, values)| {
            let pick = |obs: &[&Observation]| -> Vec<toml::Value> {
                obs.iter()
                    .filter_map(|o| o.params.iter().find(|(k, _)| k == key))
                    .map(|(_, v)| v.clone())
                    .collect()
            };
            let v = suggest_one(values, &pick(&good), &pick(&bad), &mut rng);
            (key.clone(), v)
        })
        .collect()
}

fn suggest_one(
    values: &Values,
    good: &[toml::Value],
    bad: &[toml::Value],
    rng: &mut SplitMix64,
) -> toml::Value {
    match values {
        Values::Choice(choices) => {
            // Counts plus a prior of one per choice.
            let weight = |obs: &[toml::Value], c: &toml::Value| {
                (obs.iter().filter(|v| *v == c).count() as f64 + 1.0)
                    / (obs.len() + choices.len()) as f64
            };
            let l: Vec<f64> = choices.iter().map(|c| weight(good, c)).collect();
            let best = (0..CANDIDATES)
                .map(|_| sample_discrete(&l, rng.unit()))
                .max_by(|&a, &b| {
                    let ratio = |i: usize| l[i] / weight(bad, &choices[i]);
                    ratio(a).total_cmp(&ratio(b)).then(b.cmp(&a))
                })
                .unwrap_or(0);
            choices[best].clone()
        }
        Values::Uniform(lo, hi) => {
            let x = numeric(*lo, *hi, good, bad, rng, |v| v);
            toml::Value::Float(round(x))
        }
        Values::LogUniform(lo, hi) => {
            let x = numeric(lo.ln(), hi.ln(), good, bad, rng, f64::ln).exp();
            toml::Value::Float(round(x.clamp(*lo, *hi)))
        }
        Values::IntUniform(lo, hi) => {
            let x = numeric(*lo as f64 - 0.5, *hi as f64 + 0.5, good, bad, rng, |v| v);
            toml::Value::Integer((x.round() as i64).clamp(*lo, *hi))
        }
    }
}

/// The candidate in [lo, hi] (in the space `to_space` maps values into) with the best
/// l(x) / g(x), each a Parzen estimator: a Gaussian per observation plus a uniform prior.
fn numeric(
    lo: f64,
    hi: f64,
    good: &[toml::Value],
    bad: &[toml::Value],
    rng: &mut SplitMix64,
    to_space: impl Fn(f64) -> f64,
) -> f64 {
    let points = |obs: &[toml::Value]| -> Vec<f64> {
        obs.iter()
            .filter_map(|v| v.as_float().or(v.as_integer().map(|i| i as f64)))
            .map(&to_space)
            .collect()
    };
    let (g, b) = (points(good), points(bad));
    let width = hi - lo;
    // Bandwidth shrinking with more observations (Scott's rule on the range).
    let sigma = |n: usize| width / (n as f64 + 1.0).powf(0.2) / 2.0;
    let density = |x: f64, pts: &[f64]| {
        let s = sigma(pts.len());
        let prior = 1.0 / width;
        let kernels: f64 = pts
            .iter()
            .map(|p| {
                (-(x - p).powi(2) / (2.0 * s * s)).exp() / (s * (2.0 * std::f64::consts::PI).sqrt())
            })
            .sum();
        (prior + kernels) / (pts.len() as f64 + 1.0)
    };
    (0..CANDIDATES)
        .map(|_| {
            // From l: the prior with weight 1, each good point's Gaussian with weight 1.
            let pick = (rng.unit() * (g.len() + 1) as f64) as usize;
            let x = match g.get(pick) {
                Some(center) => center + sigma(g.len()) * normal(rng),
                None => lo + rng.unit() * width,
            };
            x.clamp(lo, hi)
        })
        .max_by(|&x, &y| {
            let ratio = |v: f64| density(v, &g) / density(v, &b);
            ratio(x).total_cmp(&ratio(y))
        })
        .unwrap_or(lo)
}

fn sample_discrete(weights: &[f64], u: f64) -> usize {
    let total: f64 = weights.iter().sum();
    let mut acc = 0.0;
    for (i, w) in weights.iter().enumerate() {
        acc += w / total;
        if u < acc {
            return i;
        }
    }
    weights.len() - 1
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut SplitMix64) -> f64 {
    let (u1, u2) = (rng.unit().max(1e-300), rng.unit());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_suggestions_move_towards_the_good_trials() {
        // Good trials near 0.8, bad ones near 0.2, on [0, 1]: suggestions land near 0.8.
        let good: Vec<toml::Value> = [0.78, 0.8, 0.82].map(toml::Value::Float).to_vec();
        let bad: Vec<toml::Value> = [0.1, 0.2, 0.25, 0.3, 0.15].map(toml::Value::Float).to_vec();
        let mut rng = SplitMix64::new(1);
        let xs: Vec<f64> = (0..20)
            .map(|_| numeric(0.0, 1.0, &good, &bad, &mut rng, |v| v))
            .collect();
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        assert!(mean > 0.6, "{xs:?}");
    }

    #[test]
    fn choices_favour_the_good_ones() {
        let values = Values::Choice(vec!["a".into(), "b".into(), "c".into()]);
        let good: Vec<toml::Value> = vec!["b".into(), "b".into()];
        let bad: Vec<toml::Value> = vec!["a".into(), "c".into(), "a".into(), "c".into()];
        let mut rng = SplitMix64::new(2);
        let picks: Vec<toml::Value> = (0..10)
            .map(|_| suggest_one(&values, &good, &bad, &mut rng))
            .collect();
        assert!(picks.iter().all(|p| p.as_str() == Some("b")), "{picks:?}");
    }
}

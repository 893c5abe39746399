//! Which keys trial N sets. For grid and random sweeps (and TPE's first trials) a function of
//! (sweep file, N) only, so trials come out the same in any order, at any concurrency, on any
//! machine; later TPE trials are chosen from the history when they start (`tpe.rs`).

use crate::sweep::draw::{round, SplitMix64};
use crate::sweep::spec::{Method, Sweep, Values};
use crate::sweep::tpe::STARTUP_TRIALS;

/// Trial `index`'s (key, value) pairs in key order; `None` for a TPE trial past the startup
/// ones, whose keys are chosen from the finished trials when it starts.
pub fn params(sweep: &Sweep, index: usize) -> Option<Vec<(String, toml::Value)>> {
    match sweep.method {
        Method::Grid => Some(grid(sweep, index)),
        Method::Random => Some(random(sweep, index)),
        Method::Tpe if index < STARTUP_TRIALS => Some(random(sweep, index)),
        Method::Tpe => None,
    }
}

/// Mixed-radix digits of `index`, the last key changing fastest (like nested loops).
fn grid(sweep: &Sweep, index: usize) -> Vec<(String, toml::Value)> {
    let mut rest = index;
    let mut out: Vec<(String, toml::Value)> = sweep
        .space
        .iter()
        .rev()
        // A grid holds lists only (checked when the sweep file loads).
        .filter_map(|(key, values)| match values {
            Values::Choice(choices) => {
                let pick = choices[rest % choices.len()].clone();
                rest /= choices.len();
                Some((key.clone(), pick))
            }
            _ => None,
        })
        .collect();
    out.reverse();
    out
}

fn random(sweep: &Sweep, index: usize) -> Vec<(String, toml::Value)> {
    let mut rng = SplitMix64::new(sweep.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    sweep
        .space
        .iter()
        .map(|(key, values)| {
            let u = rng.unit();
            let v = match values {
                Values::Choice(c) => c[((u * c.len() as f64) as usize).min(c.len() - 1)].clone(),
                Values::Uniform(lo, hi) => toml::Value::Float(round(lo + u * (hi - lo))),
                Values::LogUniform(lo, hi) => {
                    toml::Value::Float(round((lo.ln() + u * (hi.ln() - lo.ln())).exp()))
                }
                Values::IntUniform(lo, hi) => {
                    // In i128: [i64::MIN, i64::MAX] spans more than an i64 holds.
                    let (lo, hi) = (*lo as i128, *hi as i128);
                    let at = ((u * (hi - lo + 1) as f64) as i128).min(hi - lo);
                    toml::Value::Integer((lo + at) as i64)
                }
            };
            (key.clone(), v)
        })
        .collect()
}

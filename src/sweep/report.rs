//! `st-tune sweep report`: every trial's record, best first, as a table or JSON, and the best
//! trial's model copied out.

use std::path::Path;

use serde_json::json;

use crate::error::{Error, Result};
use crate::memory::human_bytes;
use crate::sweep::spec::Sweep;
use crate::sweep::store::{Status, Store, TrialRecord};
use crate::sweep::{best, trials};

/// All trials' records (pending ones included), best first: complete trials by the metric,
/// then the rest by index.
pub fn records(sweep: &Sweep, store: &Store) -> Result<Vec<TrialRecord>> {
    let mut all = Vec::new();
    for i in 0..sweep.trials {
        all.push(match store.record(i)? {
            Some(r) => r,
            // A TPE trial not started yet has no keys yet.
            None => TrialRecord::new(i, &trials::params(sweep, i).unwrap_or_default()),
        });
    }
    let ranked = |r: &TrialRecord| match (r.status, r.metric) {
        (Status::Complete, Some(m)) if m.is_finite() => Some(m),
        _ => None,
    };
    all.sort_by(|a, b| {
        let by_metric = match (ranked(a), ranked(b)) {
            (Some(x), Some(y)) => sweep.goal.best_first(x, y),
            (x, y) => y.is_some().cmp(&x.is_some()),
        };
        by_metric.then(a.index.cmp(&b.index))
    });
    Ok(all)
}

pub fn to_json(sweep: &Sweep, records: &[TrialRecord]) -> serde_json::Value {
    json!({
        "metric": sweep.metric,
        "trials": records,
        "best": best(sweep, records),
    })
}

pub fn to_table(sweep: &Sweep, records: &[TrialRecord]) -> String {
    let mut out = format!(
        "{:>5}  {:<11}  {:>12}  {:>8}  {:>9}  {:>10}  {:>4}  {:>5}  params / why\n",
        "trial", "status", sweep.metric, "time", "samples/s", "peak", "ooms", "micro"
    );
    for r in records {
        let num = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("-".into(), f);
        let params: Vec<String> = r.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut tail = params.join(" ");
        if let Some(m) = &r.message {
            tail.push_str(&format!("  ({m})"));
        }
        out.push_str(&format!(
            "{:>5}  {:<11}  {:>12}  {:>8}  {:>9}  {:>10}  {:>4}  {:>5}  {tail}\n",
            r.index,
            format!("{:?}", r.status).to_lowercase(),
            num(r.metric, &|m| format!("{m:.4}")),
            num(r.seconds, &|s| format!("{s:.1} s")),
            num(r.samples_per_s, &|s| format!("{s:.1}")),
            r.peak_memory.map_or("-".into(), human_bytes),
            r.ooms_recovered.map_or("-".into(), |n| n.to_string()),
            r.final_micro_batch_size
                .map_or("-".into(), |n| n.to_string()),
        ));
    }
    out
}

/// Copies the best trial's `final/` model folder to `to` (atomically: a complete folder or
/// nothing).
pub fn export_best(sweep: &Sweep, store: &Store, records: &[TrialRecord], to: &Path) -> Result<()> {
    let Some(b) = best(sweep, records) else {
        return Err(Error::sweep(
            &sweep.file,
            "no trial is complete yet, so there is no best model to export",
        ));
    };
    let from = store.trial_dir(b.index).join("final");
    let parent = crate::atomic::parent(to);
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    let staged = crate::atomic::sibling(to, "tmp");
    let _ = std::fs::remove_dir_all(&staged);
    copy_dir(&from, &staged)?;
    crate::atomic::replace_dir(&staged, to)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let path = entry.map_err(|e| Error::io(from, e))?.path();
        let target = to.join(path.file_name().expect("a directory entry has a name"));
        if path.is_dir() {
            copy_dir(&path, &target)?;
        } else {
            std::fs::copy(&path, &target).map_err(|e| Error::io(&path, e))?;
        }
    }
    Ok(())
}

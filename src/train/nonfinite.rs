//! The guard that keeps non-finite numbers out of the weights. A step whose loss or global
//! gradient norm (the one clipping computes anyway, `optim::grad_norm`) is NaN or infinite
//! skips its update; `train.max_nonfinite_steps` such steps in a row stop the run before it
//! saves anything (`Error::Diverged`, exit 4), so no checkpoint and no `final/` ever holds
//! the weights that made them.
//!
//! f16's loss scaler skips an overflowing step too, and halves its scale: while the scale can
//! still be lowered (above 1) and the loss is finite, that is the scaler's ordinary probing and
//! is not counted here; once it cannot, the step counts like any other non-finite one.
//!
//! Test hook: `ST_TUNE_INJECT_NONFINITE="STEP[,STEP...]"` (1-based, as events.jsonl counts)
//! turns the gradient of the last trainable tensor (by name) into NaN at those steps.

use std::collections::BTreeSet;

use candle_core::Storage;

use crate::config::{Precision, TrainSection};
use crate::error::{Error, Result};
use crate::memory::oom::Phase;
use crate::train::optim::{Grad, Grads};

pub const INJECT_ENV: &str = "ST_TUNE_INJECT_NONFINITE";

/// A step whose update was skipped, for events.jsonl.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NonFinite {
    /// 0-based, as the step counts; the files count from 1.
    pub step: u64,
    /// `forward` when the loss itself is not finite, `backward` when only gradients are not.
    pub phase: Phase,
    /// The first tensor, by name, whose gradient holds a NaN or an infinity (none when the
    /// loss was already non-finite and every gradient happens to be finite).
    pub tensor: Option<String>,
    /// The loss and the global gradient norm, as JSON numbers or null (NaN, infinity).
    pub loss: Option<f32>,
    pub grad_norm: Option<f64>,
}

impl NonFinite {
    /// What a step with this `loss` and gradient `norm` reports (the tensor is looked for only
    /// here, on the rare bad step, so a good step reads its gradients once).
    pub fn describe(step: u64, loss: f32, norm: f64, grads: &Grads) -> Result<Self> {
        Ok(NonFinite {
            step,
            phase: if loss.is_finite() {
                Phase::Backward
            } else {
                Phase::Forward
            },
            tensor: first_nonfinite(grads)?,
            loss: loss.is_finite().then_some(loss),
            grad_norm: norm.is_finite().then_some(norm),
        })
    }
}

/// The first gradient, by name, that holds a NaN or an infinity.
pub fn first_nonfinite(grads: &Grads) -> Result<Option<String>> {
    for (name, g) in grads {
        let g = match g {
            Grad::Rows(r) => {
                if !r.values().iter().all(|x| x.is_finite()) {
                    return Ok(Some(name.clone()));
                }
                continue;
            }
            Grad::Dense(g) => g,
        };
        let g = g.to_dtype(candle_core::DType::F32)?.flatten_all()?;
        let (s, l) = g.storage_and_layout();
        let finite = match (&*s, l.contiguous_offsets()) {
            (Storage::Cpu(candle_core::CpuStorage::F32(v)), Some((a, b))) => {
                v[a..b].iter().all(|x| x.is_finite())
            }
            _ => {
                drop(s);
                g.to_vec1::<f32>()?.iter().all(|x| x.is_finite())
            }
        };
        if !finite {
            return Ok(Some(name.clone()));
        }
    }
    Ok(None)
}

/// The 0-based steps `ST_TUNE_INJECT_NONFINITE` names.
pub fn parse_injection(spec: &str) -> Result<BTreeSet<u64>> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|item| {
            item.parse::<u64>()
                .ok()
                .and_then(|s| s.checked_sub(1))
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "{INJECT_ENV}: bad entry `{item}`; expected steps counted from 1, \
                         separated by commas"
                    ))
                })
        })
        .collect()
}

/// The test hook: the last trainable tensor's gradient becomes NaN.
pub fn poison(grads: &mut Grads) -> Result<()> {
    match grads.values_mut().next_back() {
        Some(Grad::Dense(g)) => *g = g.affine(f64::NAN, 0.0)?,
        Some(Grad::Rows(r)) => r.values_mut().fill(f32::NAN),
        None => {}
    }
    Ok(())
}

/// The error that stops a run after `streak` non-finite steps in a row, the last `last`;
/// `newest` is the newest checkpoint, left as it was.
pub fn diverged(t: &TrainSection, streak: usize, last: &NonFinite, newest: Option<&str>) -> Error {
    let what = match (&last.phase, &last.tensor) {
        (Phase::Forward, _) => "the loss".to_string(),
        (_, Some(name)) => format!("the gradient of `{name}`"),
        _ => "the gradient norm".to_string(),
    };
    let kept = match newest {
        Some(n) => format!("the newest checkpoint ({n}) and final/ are as they were"),
        None => "no checkpoint was taken and final/ is as it was".to_string(),
    };
    let (clipping, clip_advice) = if t.max_grad_norm > 0.0 {
        (
            format!("clipping at train.max_grad_norm = {}", t.max_grad_norm),
            "a lower train.max_grad_norm",
        )
    } else {
        (
            "no clipping (train.max_grad_norm = 0)".to_string(),
            "train.max_grad_norm = 1.0",
        )
    };
    let precision = match t.precision {
        Precision::F16 => ", or train.precision = \"bf16\" or \"f32\" (f16's range is narrow)",
        Precision::Bf16 => ", or train.precision = \"f32\"",
        Precision::F32 => " (train.precision = \"f32\" already has the widest range)",
    };
    Error::Diverged(format!(
        "{streak} steps in a row had a NaN or infinite loss or gradient \
         (train.max_nonfinite_steps = {}), the last step {} ({what}). Their updates were \
         skipped and the run stopped without saving: {kept}. The likely cause is a learning \
         rate too high for this model (train.lr = {:e}, with {clipping}). Consider a lower \
         train.lr, {clip_advice}{precision}",
        t.max_nonfinite_steps,
        last.step + 1,
        t.lr,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn grads(values: &[(&str, &[f32])]) -> Grads {
        values
            .iter()
            .map(|(n, v)| (n.to_string(), Tensor::new(*v, &Device::Cpu).unwrap().into()))
            .collect()
    }

    #[test]
    fn the_first_tensor_by_name_holding_a_nan_or_infinity_is_named() {
        let g = grads(&[
            ("a", &[1.0, 2.0]),
            ("b", &[f32::INFINITY]),
            ("c", &[f32::NAN]),
        ]);
        assert_eq!(first_nonfinite(&g).unwrap().as_deref(), Some("b"));
        assert_eq!(first_nonfinite(&grads(&[("a", &[1.0])])).unwrap(), None);
        // A strided view goes the slow way and is still read.
        let m = Tensor::new(&[[1.0f32, f32::NAN], [2.0, 3.0]], &Device::Cpu).unwrap();
        let g = Grads::from([("t".to_string(), m.t().unwrap().into())]);
        assert_eq!(first_nonfinite(&g).unwrap().as_deref(), Some("t"));
        // Summed rows are read too, and poisoned like a dense gradient.
        let mut rows = crate::train::summed_rows::SummedRows::new(3, 1);
        rows.add_tokens(&[2], &[1.0]).unwrap();
        let mut g = Grads::from([("w".to_string(), Grad::Rows(rows))]);
        assert_eq!(first_nonfinite(&g).unwrap(), None);
        poison(&mut g).unwrap();
        assert_eq!(first_nonfinite(&g).unwrap().as_deref(), Some("w"));
    }

    #[test]
    fn a_non_finite_loss_is_the_forward_phase_and_gradients_the_backward() {
        let g = grads(&[("a", &[1.0]), ("z", &[2.0])]);
        let e = NonFinite::describe(4, f32::NAN, 1.0, &g).unwrap();
        assert_eq!((e.phase, e.tensor, e.loss), (Phase::Forward, None, None));
        let mut g = g;
        poison(&mut g).unwrap();
        let e = NonFinite::describe(4, 0.5, f64::NAN, &g).unwrap();
        assert_eq!(e.phase, Phase::Backward);
        assert_eq!(
            e.tensor.as_deref(),
            Some("z"),
            "the hook poisons the last tensor"
        );
        assert_eq!((e.loss, e.grad_norm), (Some(0.5), None));
    }

    #[test]
    fn the_hook_takes_steps_from_one_and_rejects_anything_else() {
        assert_eq!(parse_injection("3, 5,").unwrap(), BTreeSet::from([2, 4]));
        for bad in ["0", "x", "3:forward", "-1"] {
            assert!(parse_injection(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_stop_message_names_the_step_the_cause_and_the_keys_to_change() {
        let t = TrainSection {
            lr: 1e30,
            max_grad_norm: 0.0,
            ..Default::default()
        };
        let last = NonFinite {
            step: 6,
            phase: Phase::Forward,
            tensor: None,
            loss: None,
            grad_norm: None,
        };
        let msg = diverged(&t, 5, &last, Some("checkpoints/step-2")).to_string();
        for needle in [
            "5 steps in a row",
            "step 7",
            "the loss",
            "checkpoints/step-2",
            "train.lr = 1e30",
            "train.max_grad_norm = 0",
            "train.precision",
        ] {
            assert!(msg.contains(needle), "missing `{needle}` in {msg}");
        }
        let t = TrainSection {
            precision: Precision::F16,
            ..t
        };
        let msg = diverged(&t, 5, &last, None).to_string();
        assert!(msg.contains("no checkpoint was taken"), "{msg}");
        assert!(msg.contains("\"bf16\" or \"f32\""), "{msg}");
    }
}

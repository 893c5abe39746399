//! Recognising out-of-memory errors, and raising them on purpose.
//!
//! candle reports a CUDA OOM as `Error::Cuda(..)` holding a cudarc `DriverError` with
//! `CUDA_ERROR_OUT_OF_MEMORY` (or a cuBLAS allocation failure), often inside `WithBacktrace`,
//! `Context` or `WithPath` wrappers. [`is_oom`] walks those wrappers and checks the error's
//! type, never its message. The CPU memory budget and fault injection raise [`DeviceOom`]
//! inside the same `Error::Cuda` wrapper, so every OOM takes the same path through the trainer.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Mutex;

use crate::error::Error;

/// An out-of-memory condition detected by st-tune itself (CPU budget, injected fault).
#[derive(Debug, Clone)]
pub struct DeviceOom {
    pub what: String,
}

impl fmt::Display for DeviceOom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "out of memory: {}", self.what)
    }
}

impl std::error::Error for DeviceOom {}

/// A candle error shaped like the ones CUDA OOMs produce.
pub fn oom_error(what: impl Into<String>) -> Error {
    let inner = candle_core::Error::Cuda(Box::new(DeviceOom { what: what.into() }));
    Error::Candle(inner.bt())
}

pub fn is_oom(e: &Error) -> bool {
    match e {
        Error::Candle(c) => candle_is_oom(c),
        _ => false,
    }
}

fn candle_is_oom(e: &candle_core::Error) -> bool {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, .. } | C::Context { inner, .. } | C::WithPath { inner, .. } => {
            candle_is_oom(inner)
        }
        C::Cuda(inner) => std_is_oom(inner.as_ref()),
        C::WrappedContext { wrapped, .. } => std_is_oom(wrapped.as_ref()),
        _ => false,
    }
}

/// Walks a std error's source chain looking for a known OOM type.
fn std_is_oom(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<DeviceOom>() || cuda_is_oom(err) {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(feature = "cuda")]
fn cuda_is_oom(e: &(dyn std::error::Error + 'static)) -> bool {
    use candle_core::cuda_backend::cudarc::{cublas, driver};
    use candle_core::cuda_backend::CudaError;
    let driver_oom =
        |d: &driver::DriverError| d.0 == driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY;
    if let Some(d) = e.downcast_ref::<driver::DriverError>() {
        return driver_oom(d);
    }
    match e.downcast_ref::<CudaError>() {
        Some(CudaError::Cuda(d)) | Some(CudaError::Load { cuda: d, .. }) => driver_oom(d),
        Some(CudaError::Cublas(c)) => {
            c.0 == cublas::sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED
        }
        _ => false,
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_is_oom(_e: &(dyn std::error::Error + 'static)) -> bool {
    false
}

/// The phases of an optimizer step in which an OOM can be injected or can happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Forward,
    Backward,
    Optimizer,
}

impl Phase {
    fn parse(s: &str) -> Option<Phase> {
        match s {
            "forward" => Some(Phase::Forward),
            "backward" => Some(Phase::Backward),
            "optimizer" => Some(Phase::Optimizer),
            _ => None,
        }
    }
}

/// Fault injection for tests: `ST_TUNE_INJECT_OOM="STEP:PHASE[,STEP:PHASE...]"` raises one
/// OOM (shaped like CUDA's) the first time optimizer step STEP reaches PHASE. STEP counts from 1,
/// as metrics.jsonl and events.jsonl do.
#[derive(Debug, Default)]
pub struct Injector {
    /// (0-based step, phase), as the optimizer step counts.
    pending: Mutex<BTreeSet<(u64, Phase)>>,
}

impl Injector {
    pub const ENV: &'static str = "ST_TUNE_INJECT_OOM";

    pub fn parse(spec: &str) -> Result<Self, Error> {
        let mut set = BTreeSet::new();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let parsed = item.split_once(':').and_then(|(s, p)| {
                let step = s.trim().parse::<u64>().ok()?.checked_sub(1)?;
                Some((step, Phase::parse(p.trim())?))
            });
            match parsed {
                Some(x) => {
                    set.insert(x);
                }
                None => {
                    return Err(Error::Usage(format!(
                        "{}: bad entry `{item}`; expected STEP:PHASE with STEP from 1 and PHASE forward, backward or optimizer",
                        Self::ENV
                    )))
                }
            }
        }
        Ok(Self {
            pending: Mutex::new(set),
        })
    }

    /// Fails once at (0-based step, phase) if that was asked for.
    pub fn check(&self, step: u64, phase: Phase) -> Result<(), Error> {
        if self
            .pending
            .lock()
            .expect("injector lock")
            .remove(&(step, phase))
        {
            return Err(oom_error(format!(
                "injected by {} at step {}, {phase:?}",
                Self::ENV,
                step + 1
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_is_found_through_backtrace_and_context_wrappers() {
        let plain = candle_core::Error::Cuda(Box::new(DeviceOom { what: "x".into() }));
        let wrapped = plain.bt().context("in forward").with_path("/tmp/x");
        assert!(is_oom(&Error::Candle(wrapped)));
    }

    #[test]
    fn other_errors_are_not_oom() {
        let shape = candle_core::Error::Msg("out of memory".into()); // text alone does not count
        assert!(!is_oom(&Error::Candle(shape.bt())));
        assert!(!is_oom(&Error::Usage("out of memory".into())));
        let other_cuda = candle_core::Error::Cuda(Box::new(std::io::Error::other("launch failed")));
        assert!(!is_oom(&Error::Candle(other_cuda)));
    }

    #[test]
    fn injector_fires_once_per_entry() {
        let inj = Injector::parse("3:forward, 4:optimizer").unwrap();
        assert!(inj.check(1, Phase::Forward).is_ok());
        let e = inj.check(2, Phase::Forward).unwrap_err();
        assert!(is_oom(&e));
        assert!(inj.check(2, Phase::Forward).is_ok());
        assert!(inj.check(3, Phase::Backward).is_ok());
        assert!(is_oom(&inj.check(3, Phase::Optimizer).unwrap_err()));
    }

    #[test]
    fn injector_rejects_bad_specs() {
        assert!(Injector::parse("2:sideways").is_err());
        assert!(Injector::parse("two:forward").is_err());
        assert!(Injector::parse("0:forward").is_err(), "steps count from 1");
    }
}

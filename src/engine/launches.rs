//! Counting the tensor ops a training step issues: about the kernel launches it would make on a
//! GPU, measured on any device (`st-tune bench launches`, docs/benchmarks.md).
//!
//! candle numbers every tensor it makes from one global counter, so the numbers of two fresh
//! tensors, one made before and one after a step, bound the tensors the step made. That count
//! includes views (reshape, narrow, transpose, broadcast, detach), which launch nothing, and
//! misses nothing that makes a tensor. Ops that return their input (a cast to the same type, a
//! `contiguous` of a contiguous tensor) make none and are not counted.
//!
//! A few regions of the portable engine are to become one kernel each on CUDA (`cuda`
//! kernels: AdamW over all parameters, the layer-norm backward, dropout masks). While a count
//! runs, [`planned_kernel`] records how many tensors each such region made, so the count with
//! those kernels is the step's count less the regions' plus one per region.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

static COUNTING: AtomicBool = AtomicBool::new(false);
/// Tensors made inside planned-kernel regions, the regions run, and the probes made to count
/// them (each probe is a tensor too).
static IN_REGIONS: AtomicUsize = AtomicUsize::new(0);
static REGIONS: AtomicUsize = AtomicUsize::new(0);
static PROBES: AtomicUsize = AtomicUsize::new(0);

/// The number candle gives the next tensor, read by making one (a 0-d tensor, no storage to
/// speak of): that probe itself takes a number.
pub fn next_tensor_number() -> Result<usize> {
    let t = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    // `TensorId` keeps its number private; its Debug form is `TensorId(n)`.
    let id = format!("{:?}", t.id());
    let digits: String = id.chars().filter(char::is_ascii_digit).collect();
    digits
        .parse()
        .map_err(|_| crate::Error::Internal(format!("unexpected tensor id form {id}")))
}

/// What [`count`] saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    /// Tensors made, views included, probes excluded.
    pub tensors: usize,
    /// Of those, made inside planned-kernel regions.
    pub in_regions: usize,
    /// Planned-kernel regions run.
    pub regions: usize,
}

impl Counted {
    /// The count with each planned region as one launch.
    pub fn with_planned_kernels(&self) -> usize {
        self.tensors - self.in_regions + self.regions
    }
}

/// Runs `f` and counts the tensors it made. Counts nest badly: not reentrant, one at a time.
pub fn count<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, Counted)> {
    IN_REGIONS.store(0, Ordering::SeqCst);
    REGIONS.store(0, Ordering::SeqCst);
    PROBES.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    let before = next_tensor_number();
    let out = f();
    let after = next_tensor_number();
    COUNTING.store(false, Ordering::SeqCst);
    let (before, out, after) = (before?, out?, after?);
    // The second probe and the regions' probes are not the step's.
    let made = after - before - 1 - PROBES.load(Ordering::SeqCst);
    Ok((
        out,
        Counted {
            tensors: made,
            in_regions: IN_REGIONS.load(Ordering::SeqCst),
            regions: REGIONS.load(Ordering::SeqCst),
        },
    ))
}

/// Runs `f`, a region that a `cuda` kernel does in one launch; while [`count`] runs, records
/// the tensors it made.
pub fn planned_kernel<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !COUNTING.load(Ordering::Relaxed) {
        return f();
    }
    let before = next_tensor_number()?;
    let out = f()?;
    let after = next_tensor_number()?;
    PROBES.fetch_add(2, Ordering::SeqCst);
    IN_REGIONS.fetch_add(after - before - 1, Ordering::SeqCst);
    REGIONS.fetch_add(1, Ordering::SeqCst);
    Ok(out)
}

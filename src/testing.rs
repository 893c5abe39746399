//! Helpers for the kernel tests: comparing tensors and gradients.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

/// max |a − b| over all elements, in f32.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    let (a, b) = (
        a.to_dtype(DType::F32).unwrap(),
        b.to_dtype(DType::F32).unwrap(),
    );
    max_abs(&(a - b).unwrap())
}

/// max |t| over all elements, in f32.
pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// The gradients of `Σ y ⊙ probe`: a random linear functional of `y`, so every output element
/// sends back a different gradient.
pub fn grads_through(y: &Tensor, probe: &Tensor) -> GradStore {
    (y * probe).unwrap().sum_all().unwrap().backward().unwrap()
}

/// Asserts that `a` and `c`, two computations of the same function of `vars`, agree to `tol`
/// in value and in the gradient of every var.
pub fn assert_same_function(a: &Tensor, c: &Tensor, probe: &Tensor, vars: &[&Var], tol: f32) {
    assert!(max_diff(a, c) < tol, "values differ by {}", max_diff(a, c));
    let (ga, gc) = (grads_through(a, probe), grads_through(c, probe));
    for v in vars {
        let d = max_diff(ga.get(v).unwrap(), gc.get(v).unwrap());
        assert!(d < tol, "gradients differ by {d}");
    }
}

/// GFLOP/s of `f`, which does `flops` floating-point operations: the fastest of 9 runs after
/// one warm-up (load from elsewhere only slows a run). For the ignored kernel timings.
pub fn gflops(flops: f64, f: &mut dyn FnMut()) -> f64 {
    f();
    let fastest = (0..9)
        .map(|_| {
            let at = std::time::Instant::now();
            f();
            at.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min);
    flops / fastest / 1e9
}
